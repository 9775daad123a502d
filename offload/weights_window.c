// The sliding-window weight provider: a share that does not fit its memory budget keeps its first
// units pinned and streams the rest, one unit (a block, or the output rows) at a time, through a ring
// of buffers that a background reader fills ahead of the forward pass; plan_window sizes both.
//
// Reading (measured, see README "Weight streaming"): O_DIRECT pread of aligned extents into the ring
// (io=direct, the default), buffered pread that drops the pages it read from the page cache
// (io=pread), or the file mapping made resident ahead with MADV_WILLNEED and dropped after use
// (io=mmap). Units are bound in the file's own layout, never repacked: a node that streams computes
// as `--no-repack` does. The token embedding stays in the file mapping; a token's row is paged in
// when the forward pass reads it and dropped again at release.
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "offload/weights_impl.h"

// --- types

#define WIN_ALIGN 4096u             // O_DIRECT alignment of file offsets, lengths and buffer addresses
#define WIN_CHUNK (16u << 20)       // bytes per read call (the reader checks for shutdown between them)
#define WIN_MAX_OVERFLOW 8          // extra buffers made when a unit is wanted and every buffer is held

typedef enum { IO_DIRECT, IO_PREAD, IO_MMAP } win_io_t;
static const char *const io_names[] = {"direct", "pread", "mmap"};

typedef enum { B_MAT, B_VEC, B_VEC_CONV } bind_kind_t;

// The files a window reads: the model (or shard) file, and an all-reduce share's columns file.
enum { SRC_MODEL, SRC_COLS, N_SRC };

// One tensor part of a unit: where it is in the file and where it lands in the unit's buffer.
typedef struct {
    int src;                 // which file (SRC_*)
    uint64_t off;            // file offset of its first byte
    uint64_t len;            // bytes
    size_t at;               // offset of its first byte in the unit's buffer
} piece_t;

// One read: pieces next to each other in the file, widened to WIN_ALIGN boundaries.
typedef struct {
    int src;                 // which file (SRC_*)
    uint64_t off, len;       // file range (multiples of WIN_ALIGN)
    uint64_t need;           // bytes from off that pieces use (a read may end short of len only past them)
    size_t at;               // where it lands in the buffer (a multiple of WIN_ALIGN)
} extent_t;

// Where one field of a unit's layer_weights_t comes from.
typedef struct {
    bind_kind_t kind;
    int piece;               // its bytes
    int expert;              // -1: the unit's dense part; e >= 0: expert e
    size_t field;            // offsetof the mm_weight_t (B_MAT) or const float * (B_VEC*) in layer_weights_t
    qtype_t type;            // element type in the file
    int64_t rows, cols;      // B_MAT: rows held and row length; B_VEC*: elements in cols
    size_t conv_at;          // B_VEC_CONV: offset of its F32 copy in the buffer's conversion area
} bind_t;

// A unit: one block's tensors of the slice (its dense part and every expert), or the output rows.
typedef struct {
    int layer;               // block id, or WEIGHTS_OUT
    piece_t *pieces;         // (n_pieces)
    int n_pieces;
    extent_t *ext;           // (n_ext) in file order
    int n_ext;
    bind_t *binds;           // (n_binds)
    int n_binds;
    qtype_t e_type;          // MoE block: the expert matrices' type
    size_t ext_bytes;        // buffer bytes of the extents
    size_t conv_bytes;       // buffer bytes of F32 copies of vectors stored in other types (after the extents)
    uint64_t read_bytes;     // bytes a load reads (the extents)
} unit_t;

typedef enum { S_ABSENT, S_FREE, S_LOADING, S_READY, S_FAILED } slot_state_t;

// A buffer of the ring (or a pinned unit's own buffer) and the unit in it.
typedef struct {
    slot_state_t state;
    int unit;                // unit index while LOADING / READY / FAILED
    int refs;                // acquires not yet released
    bool used;               // acquired since it was loaded
    bool stale;              // dropped while its read was under way: freed when the read ends
    bool overflow;           // an extra buffer beyond the window, freed with the slot
    int err;                 // S_FAILED: the read's error
    uint8_t *buf;            // (cap) the unit's extents then its F32 copies (io=mmap: the copies only)
    size_t cap;
    layer_weights_t dense;   // the unit bound in buf (a block's dense part, or the output rows)
    layer_weights_t *experts; // (n_expert) a MoE block's experts bound in buf
} slot_t;

typedef struct {
    weights_params_t p;      // p.hp and p.slice point at the copies below
    model_hparams_t hp;
    shard_slice_t slice;
    const kernels_t *kern;
    win_io_t io;
    struct {
        const gguf_t *g;     // NULL: no such file (SRC_COLS without p.cols_g)
        int fd;              // open for pread (O_DIRECT for io=direct); -1 for a gguf without a file
        uint64_t size;
        const uint8_t *map;  // its mapping (gguf_base): token_embd, io=mmap units, files without a path
    } f[N_SRC];
    unit_t *units;           // (n_units) plan_window's order: blocks l0..l1-1, then the output rows
    int n_units;
    int n_blocks;            // l1 - l0
    int pinned;              // units [0, pinned) stay loaded
    int window;              // ring buffers for units [pinned, n_units)
    bool streams;            // token_embd rows are dropped from memory after each use
    slot_t *pins;            // (pinned)
    slot_t *slots;           // (window + WIN_MAX_OVERFLOW) the ring, then overflow entries (S_ABSENT when unused)
    int n_slots;
    size_t slot_bytes;       // a ring buffer: the largest streamed unit's
    layer_weights_t in;      // WEIGHTS_IN: token_embd rows in the mapping
    int in_refs;
    const uint8_t *in_page;  // page-aligned start of those rows in the mapping
    size_t in_len;           // bytes from in_page to the page after the last row
    float *out_norm;         // (n_embd) output_norm, resident on the last stage
    float *rope_freqs;       // (n_rot / 2) RoPE factors, or NULL
    uint64_t resident;       // bytes always held: pinned units' buffers, out_norm, rope_freqs
    pthread_t reader;
    bool reader_on;
    pthread_mutex_t mu;      // guards everything below and the slots
    pthread_cond_t work;     // the reader may have something to do
    pthread_cond_t done;     // a read ended
    bool stop;
    int next;                // the streamed unit the reader loads next
    int expect;              // the unit the forward pass acquires next (-1: unknown)
    weights_stats_t st;      // the provider's counters
} win_t;

// --- helpers: planning units

static int add_piece(unit_t *u, int src, uint64_t off, uint64_t len) {
    piece_t *np = realloc(u->pieces, (size_t)(u->n_pieces + 1) * sizeof *np);
    if (!np) return MLM_ENOMEM;
    u->pieces = np;
    u->pieces[u->n_pieces] = (piece_t){.src = src, .off = off, .len = len};
    return u->n_pieces++;
}

static int add_bind(unit_t *u, bind_t b) {
    bind_t *nb = realloc(u->binds, (size_t)(u->n_binds + 1) * sizeof *nb);
    if (!nb) return MLM_ENOMEM;
    u->binds = nb;
    u->binds[u->n_binds++] = b;
    return 0;
}

static uint64_t file_off(const win_t *w, int src, const void *p) { return (uint64_t)((const uint8_t *)p - w->f[src].map); }

// Plane `plane` of the located rows as field `field` of expert `expert` (-1: the dense part).
static int add_matrix(win_t *w, unit_t *u, int expert, size_t field, const weights_loc_t *loc, int plane) {
    if (!loc->t || loc->r1 <= loc->r0) return 0; // this node holds none of it: the field stays zero
    const gguf_tensor_t *t = loc->t;
    const size_t rb = qtype_row_size(t->type, t->ne[0]);
    const int pc = add_piece(u, SRC_MODEL, file_off(w, SRC_MODEL, weights_loc_data(loc, plane)), (uint64_t)(loc->r1 - loc->r0) * rb);
    if (pc < 0) return pc;
    return add_bind(u, (bind_t){.kind = B_MAT, .piece = pc, .expert = expert, .field = field, .type = t->type,
                                .rows = loc->r1 - loc->r0, .cols = t->ne[0]});
}

static int add_vector(win_t *w, unit_t *u, size_t field, const gguf_tensor_t *t, char *err, size_t errlen) {
    const int64_t n = gguf_tensor_nelements(t);
    bind_t b = {.kind = B_VEC, .expert = -1, .field = field, .type = t->type, .cols = n};
    if (t->type != QT_F32) {
        const qtype_traits_t *tr = qtype_traits(t->type);
        if (!tr || !tr->has_kernels || n % tr->blck)
            return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "%s: type %s cannot be read as floats", t->name,
                            qtype_name(t->type));
        b.kind = B_VEC_CONV;
        b.conv_at = u->conv_bytes;
        u->conv_bytes += ((size_t)n * sizeof(float) + 63) & ~(size_t)63;
    }
    if ((b.piece = add_piece(u, SRC_MODEL, file_off(w, SRC_MODEL, t->data), t->nbytes)) < 0) return b.piece;
    return add_bind(u, b);
}

static int cmp_piece_off(const void *a, const void *b, void *ctx) {
    const piece_t *p = ctx, *x = &p[*(const int *)a], *y = &p[*(const int *)b];
    if (x->src != y->src) return x->src < y->src ? -1 : 1;
    return x->off < y->off ? -1 : x->off > y->off;
}

// Groups the pieces into aligned extents in file order and lays them out in the buffer.
static int lay_out(unit_t *u) {
    int *order = malloc((size_t)(u->n_pieces ? u->n_pieces : 1) * sizeof *order); // (n_pieces) by file offset
    u->ext = calloc((size_t)(u->n_pieces ? u->n_pieces : 1), sizeof *u->ext);
    if (!order || !u->ext) {
        free(order);
        return MLM_ENOMEM;
    }
    for (int i = 0; i < u->n_pieces; i++) order[i] = i;
    qsort_r(order, (size_t)u->n_pieces, sizeof *order, cmp_piece_off, u->pieces);
    for (int k = 0; k < u->n_pieces; k++) {
        const piece_t *pc = &u->pieces[order[k]];
        const uint64_t a = pc->off / WIN_ALIGN * WIN_ALIGN, end = pc->off + pc->len;
        const uint64_t b = (end + WIN_ALIGN - 1) / WIN_ALIGN * WIN_ALIGN;
        extent_t *e = u->n_ext ? &u->ext[u->n_ext - 1] : NULL;
        if (e && e->src == pc->src && a <= e->off + e->len) { // touches the previous extent: one read
            if (b > e->off + e->len) e->len = b - e->off;
            if (end - e->off > e->need) e->need = end - e->off;
        } else {
            u->ext[u->n_ext++] = (extent_t){.src = pc->src, .off = a, .len = b - a, .need = end - a};
        }
    }
    size_t at = 0;
    for (int i = 0; i < u->n_ext; i++) {
        u->ext[i].at = at;
        at += (size_t)u->ext[i].len;
        u->read_bytes += u->ext[i].len;
    }
    u->ext_bytes = at;
    for (int k = 0, e = 0; k < u->n_pieces; k++) { // pieces in file order meet the extents in order
        piece_t *pc = &u->pieces[order[k]];
        while (pc->src != u->ext[e].src || pc->off >= u->ext[e].off + u->ext[e].len) e++;
        pc->at = u->ext[e].at + (size_t)(pc->off - u->ext[e].off);
    }
    free(order);
    return 0;
}

// An all-reduce slice's columns of matrix `name` (cols columns, rows rows, planes planes): from a
// shard file or a columns file, which hold them contiguously (every row of the columns, plane after
// plane), as field `field` of the dense part (planes 1) or of each expert. *cut is false when the
// slice does not cut it by columns (it is then located by rows). A model file's column slices lie at
// a stride, one piece per row: refused (MLM_EUNSUPPORTED), the node streams them from a columns file.
static int add_cols(win_t *w, unit_t *u, size_t field, const char *name, int64_t cols, int64_t rows, int planes,
                    bool *cut, char *err, size_t errlen) {
    int64_t c0, c1;
    shard_tensor_cols(&w->slice, name, cols, w->hp.head_dim, &c0, &c1);
    *cut = w->slice.cols && !(c0 == 0 && c1 == cols);
    const int src = w->p.shard_file ? SRC_MODEL : SRC_COLS;
    if (!*cut || c1 == c0) return 0; // not cut; or none of its columns held (the field stays zero)
    if (src == SRC_COLS && !w->f[SRC_COLS].g)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED,
                        "%s: tensor %s: an all-reduce slice's columns are streamed from a columns or shard file "
                        "(in the model file each row's columns lie apart)", gguf_path(w->p.g), name);
    int rc = 0;
    weights_params_t in = w->p; // the file that holds the columns contiguously
    in.g = w->f[src].g;
    in.shard_file = true;
    const gguf_tensor_t *t = weights_want_tensor(&in, name, planes > 1 ? 3 : 2, c1 - c0, rows, planes > 1 ? planes : 0,
                                                 true, &rc, err, errlen);
    if (!t) return rc;
    const size_t plane_bytes = qtype_row_size(t->type, c1 - c0) * (size_t)rows;
    for (int e = 0; e < planes; e++) {
        const int pc = add_piece(u, src, file_off(w, src, (const uint8_t *)t->data + (size_t)e * plane_bytes), plane_bytes);
        if (pc < 0) return pc;
        if ((rc = add_bind(u, (bind_t){.kind = B_MAT, .piece = pc, .expert = planes > 1 ? e : -1, .field = field,
                                       .type = t->type, .rows = rows, .cols = c1 - c0})) != 0)
            return rc;
    }
    return 0;
}

// The pieces of block il (its dense part and every expert) or of the output rows (il == WEIGHTS_OUT).
static int plan_unit(win_t *w, unit_t *u, int il, char *err, size_t errlen) {
    const model_hparams_t *hp = &w->hp;
    const weights_params_t *p = &w->p;
    const int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim, KV = (int64_t)hp->n_head_kv * hp->head_dim;
    u->layer = il;
    weights_loc_t loc;
    int rc = 0;
    if (il == WEIGHTS_OUT) {
        rc = weights_locate(p, hp->tied_output ? "token_embd.weight" : "output.weight", E, hp->n_vocab, 1, &loc, err,
                            errlen);
        if (rc == 0) rc = add_matrix(w, u, -1, offsetof(layer_weights_t, output), &loc, 0);
        return rc ? rc : lay_out(u);
    }
    char name[96];
    const gguf_tensor_t *t;
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix), name)
#define VEC(field, suffix)                                                                          \
    if (!(t = weights_want_tensor(p, NAME(suffix), 1, E, 0, 0, true, &rc, err, errlen))) return rc; \
    if ((rc = add_vector(w, u, offsetof(layer_weights_t, field), t, err, errlen)) != 0) return rc;
#define MAT(field, suffix, cols, rows)                                                                  \
    if ((rc = weights_locate(p, NAME(suffix), cols, rows, 1, &loc, err, errlen)) != 0 ||                \
        (rc = add_matrix(w, u, -1, offsetof(layer_weights_t, field), &loc, 0)) != 0)                    \
        return rc;
    VEC(attn_norm, "attn_norm");
    VEC(ffn_norm, "ffn_norm");
    MAT(wq, "attn_q", E, Q);
    MAT(wk, "attn_k", E, KV);
    MAT(wv, "attn_v", E, KV);
    bool cut;
    if ((rc = add_cols(w, u, offsetof(layer_weights_t, wo), NAME("attn_output"), Q, E, 1, &cut, err, errlen)) != 0)
        return rc;
    if (!cut) MAT(wo, "attn_output", Q, E);
    if (hp->n_expert == 0) {
        MAT(w_gate, "ffn_gate", E, hp->n_ff);
        MAT(w_up, "ffn_up", E, hp->n_ff);
        if ((rc = add_cols(w, u, offsetof(layer_weights_t, w_down), NAME("ffn_down"), hp->n_ff, E, 1, &cut, err,
                           errlen)) != 0)
            return rc;
        if (!cut) MAT(w_down, "ffn_down", hp->n_ff, E);
    } else {
        MAT(gate_inp, "ffn_gate_inp", E, hp->n_expert);
        static const struct {
            const char *suffix;
            size_t field;
            bool down;
        } exps[3] = {{"ffn_gate_exps", offsetof(layer_weights_t, w_gate), false},
                     {"ffn_up_exps", offsetof(layer_weights_t, w_up), false},
                     {"ffn_down_exps", offsetof(layer_weights_t, w_down), true}};
        for (int k = 0; k < 3; k++) {
            const int64_t cols = exps[k].down ? hp->n_ff : E, rows = exps[k].down ? E : hp->n_ff;
            if ((rc = add_cols(w, u, exps[k].field, NAME(exps[k].suffix), cols, rows, hp->n_expert, &cut, err,
                               errlen)) != 0)
                return rc;
            if (cut) continue;
            if ((rc = weights_locate(p, NAME(exps[k].suffix), cols, rows, hp->n_expert, &loc, err, errlen)) != 0)
                return rc;
            for (int e = 0; e < hp->n_expert; e++)
                if ((rc = add_matrix(w, u, e, exps[k].field, &loc, e)) != 0) return rc;
        }
        t = gguf_find_tensor(p->g, NAME("ffn_gate_exps"));
        if (!t) t = gguf_find_tensor(p->g, NAME("ffn_down_exps")); // a shard without FFN units
        u->e_type = t ? t->type : QT_F32;
    }
#undef MAT
#undef VEC
#undef NAME
    return lay_out(u);
}

static void unit_free(unit_t *u) {
    free(u->pieces);
    free(u->ext);
    free(u->binds);
}

// --- helpers: memory

// Page-aligned anonymous memory (returned to the system when freed); NULL for 0 bytes or on failure.
static uint8_t *buf_alloc(size_t bytes) {
    if (!bytes) return NULL;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void buf_free(uint8_t *p, size_t bytes) {
    if (p) munmap(p, bytes);
}

// Buffer bytes unit u needs: its extents (not with io=mmap, which uses the mapping) and F32 copies.
static size_t unit_buf_bytes(const win_t *w, const unit_t *u) {
    return (w->io == IO_MMAP ? 0 : u->ext_bytes) + u->conv_bytes;
}

// Bytes behind the units in memory now (under mu): resident ones, ring buffers (or, with io=mmap,
// the mapped units the ring holds).
static void count_held(win_t *w) {
    uint64_t held = w->resident;
    for (int i = 0; i < w->n_slots; i++) {
        const slot_t *s = &w->slots[i];
        if (s->state == S_ABSENT) continue;
        held += s->cap;
        if (w->io == IO_MMAP && (s->state == S_LOADING || s->state == S_READY)) held += w->units[s->unit].read_bytes;
    }
    w->st.bytes_held = held;
    if (held > w->st.bytes_peak) w->st.bytes_peak = held;
}

// --- helpers: reading

// Reads extent e of the file into dst (io=direct / pread) or pages it in (io=mmap). 0 or MLM_EIO.
static int read_extent(win_t *w, const extent_t *e, uint8_t *dst) {
    const int fd = w->f[e->src].fd;
    const uint8_t *map = w->f[e->src].map;
    const uint64_t size = w->f[e->src].size;
    if (w->io == IO_MMAP) {
        const uint8_t *src = map + e->off;
        const size_t len = (size_t)(e->off + e->len > size ? size - e->off : e->len);
        (void)madvise((void *)src, len, MADV_WILLNEED);
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < len; i += WIN_ALIGN) sink ^= src[i]; // wait for the pages to arrive
        (void)sink;
        return 0;
    }
    if (fd < 0) { // a gguf without a file: copy from its bytes
        const size_t len = (size_t)(e->off + e->len > size ? size - e->off : e->len);
        memcpy(dst, map + e->off, len);
        return 0;
    }
    uint64_t done = 0;
    while (done < e->len) {
        const size_t n = e->len - done > WIN_CHUNK ? WIN_CHUNK : (size_t)(e->len - done);
        const ssize_t r = pread(fd, dst + done, n, (off_t)(e->off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return MLM_EIO;
        if (r == 0) break; // end of file: only the alignment tail may be missing
        if (w->io == IO_PREAD) (void)posix_fadvise(fd, (off_t)(e->off + done), r, POSIX_FADV_DONTNEED);
        done += (uint64_t)r;
    }
    return done >= e->need ? 0 : MLM_EIO;
}

// Binds unit u's fields into slot s (its bytes in s->buf, or in the mapping with io=mmap).
static int bind_unit(win_t *w, slot_t *s, const unit_t *u) {
    memset(&s->dense, 0, sizeof s->dense);
    if (s->experts) memset(s->experts, 0, (size_t)w->hp.n_expert * sizeof *s->experts);
    if (u->layer >= 0) {
        s->dense.rope_freqs = w->rope_freqs;
        s->dense.e_type = u->e_type;
    } else {
        s->dense.out_norm = w->out_norm;
    }
    uint8_t *conv = s->buf + (w->io == IO_MMAP ? 0 : u->ext_bytes);
    for (int i = 0; i < u->n_binds; i++) {
        const bind_t *b = &u->binds[i];
        const piece_t *pc = &u->pieces[b->piece];
        const uint8_t *src = w->io == IO_MMAP ? w->f[pc->src].map + pc->off : s->buf + pc->at;
        uint8_t *L = (uint8_t *)(b->expert < 0 ? &s->dense : &s->experts[b->expert]);
        if (b->kind == B_MAT) {
            int rc = mm_weight_init((mm_weight_t *)(L + b->field), w->kern, b->type, b->rows, b->cols, src, false);
            if (rc != 0) return rc;
        } else if (b->kind == B_VEC) {
            *(const float **)(L + b->field) = (const float *)src;
        } else {
            float *f = (float *)(conv + b->conv_at);
            quant_dequantize_ref(b->type, src, f, b->cols);
            *(const float **)(L + b->field) = f;
        }
    }
    return 0;
}

// Reads unit ui into slot s and binds it. Called without the lock; a streamed unit's read counts
// into the stats under it (the pinned units' one-time load does not).
static int load_unit(win_t *w, slot_t *s, int ui) {
    const unit_t *u = &w->units[ui];
    const double t0 = mlm_now_ms();
    int rc = 0;
    for (int i = 0; rc == 0 && i < u->n_ext; i++) rc = read_extent(w, &u->ext[i], s->buf + u->ext[i].at);
    if (rc == 0) rc = bind_unit(w, s, u);
    const double ms = mlm_now_ms() - t0;
    if (ui < w->pinned) return rc;
    pthread_mutex_lock(&w->mu);
    w->st.read_ms += ms;
    if (rc == 0) {
        w->st.bytes_read += u->read_bytes;
        w->st.units_read++;
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

// Gives up the pages of a streamed unit read through the mapping: out of this process, out of the
// page cache.
static void drop_mapped(win_t *w, const unit_t *u) {
    for (int i = 0; i < u->n_ext; i++) {
        const extent_t *e = &u->ext[i];
        const uint64_t size = w->f[e->src].size;
        const size_t len = (size_t)(e->off + e->len > size ? size - e->off : e->len);
        (void)madvise((void *)(w->f[e->src].map + e->off), len, MADV_DONTNEED);
        if (w->f[e->src].fd >= 0) (void)posix_fadvise(w->f[e->src].fd, (off_t)e->off, (off_t)len, POSIX_FADV_DONTNEED);
    }
}

// --- helpers: the ring (every function here runs under mu)

static int streamed(const win_t *w) { return w->n_units - w->pinned; }
static int cyc(const win_t *w, int u) { return u + 1 < w->n_units ? u + 1 : w->pinned; }
// Steps from a to b going forward through the streamed units.
static int dist(const win_t *w, int a, int b) {
    const int S = streamed(w);
    return ((b - a) % S + S) % S;
}

// The slot holding (or reading) unit u, not counting stale ones; NULL when none.
static slot_t *find(win_t *w, int u) {
    for (int i = 0; i < w->n_slots; i++) {
        slot_t *s = &w->slots[i];
        if (s->unit == u && !s->stale && (s->state == S_LOADING || s->state == S_READY || s->state == S_FAILED)) return s;
    }
    return NULL;
}

// Empties slot s: an overflow slot gives its buffer back.
static void slot_clear(win_t *w, slot_t *s) {
    if (w->io == IO_MMAP && s->state == S_READY) drop_mapped(w, &w->units[s->unit]);
    s->state = S_FREE;
    s->unit = -1;
    s->refs = 0;
    s->used = s->stale = false;
    if (s->overflow) {
        buf_free(s->buf, s->cap);
        free(s->experts);
        s->buf = NULL;
        s->experts = NULL;
        s->cap = 0;
        s->state = S_ABSENT;
    }
    count_held(w);
    pthread_cond_broadcast(&w->work);
}

// Drops a unit read ahead that will not be used before the ring comes round to it again.
static void drop_unused(win_t *w, slot_t *s) {
    w->st.prefetch_wasted++;
    w->st.evictions++;
    if (s->state == S_LOADING) s->stale = true; // the reader frees it when the read ends
    else slot_clear(w, s);
}

// The forward pass went from `expect` to u: units read for the ones in between were skipped (the
// output rows of a prompt chunk that needs no logits) and make room.
static void drop_skipped(win_t *w, int u) {
    if (w->expect < w->pinned || w->expect == u) return;
    for (int i = 0; i < w->n_slots; i++) {
        slot_t *s = &w->slots[i];
        if ((s->state == S_READY || s->state == S_LOADING) && !s->stale && !s->used && s->refs == 0 &&
            dist(w, w->expect, s->unit) < dist(w, w->expect, u))
            drop_unused(w, s);
    }
}

// Unit u is wanted and neither loaded nor being read: the reader goes there next. Units read ahead
// that are not among the window's next units from u are dropped; a buffer is made when every one
// is held.
static int reposition(win_t *w, int u) {
    w->next = u;
    bool room = false;
    for (int i = 0; i < w->n_slots; i++) {
        slot_t *s = &w->slots[i];
        if ((s->state == S_READY || s->state == S_LOADING) && !s->stale && !s->used && s->refs == 0 &&
            dist(w, u, s->unit) >= w->window)
            drop_unused(w, s);
        if (s->state == S_FAILED && s->unit != u && s->refs == 0) { // a failed read ahead: tried again when wanted
            s->state = S_FREE;
            slot_clear(w, s);
        }
        room |= s->state == S_FREE || (s->stale && s->state == S_LOADING);
    }
    if (!room) { // the farthest unit read ahead makes room, else an extra buffer
        slot_t *far = NULL;
        for (int i = 0; i < w->n_slots; i++) {
            slot_t *s = &w->slots[i];
            if (s->state == S_READY && !s->used && s->refs == 0 && (!far || dist(w, u, s->unit) > dist(w, u, far->unit)))
                far = s;
        }
        if (far) {
            drop_unused(w, far);
        } else {
            slot_t *s = NULL;
            for (int i = w->window; i < w->n_slots && !s; i++)
                if (w->slots[i].state == S_ABSENT) s = &w->slots[i];
            if (!s) return MLM_ENOMEM; // more units held at once than the ring and its spare buffers
            s->cap = w->slot_bytes;
            s->buf = buf_alloc(s->cap);
            s->experts = w->hp.n_expert ? calloc((size_t)w->hp.n_expert, sizeof *s->experts) : NULL;
            if ((s->cap && !s->buf) || (w->hp.n_expert && !s->experts)) {
                buf_free(s->buf, s->cap);
                free(s->experts);
                s->buf = NULL;
                s->experts = NULL;
                s->cap = 0;
                return MLM_ENOMEM;
            }
            s->state = S_FREE;
            s->unit = -1;
            s->overflow = true;
            count_held(w);
        }
    }
    pthread_cond_broadcast(&w->work);
    return 0;
}

// --- the reader

static void *reader_main(void *arg) {
    win_t *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        slot_t *s = NULL;
        for (int i = 0; i < w->n_slots && !s; i++)
            if (w->slots[i].state == S_FREE) s = &w->slots[i];
        int v = -1;
        for (int k = 0; s && k < streamed(w) && v < 0; k++) { // the next unit not in the ring yet
            if (!find(w, w->next)) v = w->next;
            else w->next = cyc(w, w->next);
        }
        if (v < 0) {
            pthread_cond_wait(&w->work, &w->mu);
            continue;
        }
        s->state = S_LOADING;
        s->unit = v;
        s->refs = 0;
        s->used = s->stale = false;
        w->next = cyc(w, v);
        count_held(w);
        pthread_mutex_unlock(&w->mu);
        const int rc = load_unit(w, s, v);
        pthread_mutex_lock(&w->mu);
        if (s->stale) {
            s->state = rc == 0 ? S_READY : S_FREE;
            slot_clear(w, s);
        } else {
            s->state = rc == 0 ? S_READY : S_FAILED;
            s->err = rc;
        }
        pthread_cond_broadcast(&w->done);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

// --- the table

static int unit_of(const win_t *w, int layer) { return layer == WEIGHTS_OUT ? w->n_blocks : layer - w->slice.l0; }

static const layer_weights_t *part(const slot_t *s, int expert) { return expert < 0 ? &s->dense : &s->experts[expert]; }

static int win_acquire(void *ctx, int layer, int expert, const layer_weights_t **out) {
    win_t *w = ctx;
    pthread_mutex_lock(&w->mu);
    if (layer == WEIGHTS_IN) {
        w->in_refs++;
        w->st.hits++;
        pthread_mutex_unlock(&w->mu);
        *out = &w->in;
        return 0;
    }
    const int u = unit_of(w, layer);
    if (u < w->pinned) {
        w->st.hits++;
        pthread_mutex_unlock(&w->mu);
        *out = part(&w->pins[u], expert);
        return 0;
    }
    const double t0 = mlm_now_ms();
    bool waited = false;
    slot_t *s;
    int rc = 0;
    for (;;) {
        s = find(w, u);
        if (s && s->state == S_READY) break;
        if (s && s->state == S_FAILED) {
            rc = s->err;
            s->state = S_FREE; // a later acquire reads it again
            slot_clear(w, s);
            break;
        }
        if (!s && (rc = reposition(w, u)) != 0) break;
        waited = true;
        pthread_cond_wait(&w->done, &w->mu);
    }
    if (waited) w->st.stall_ms += mlm_now_ms() - t0;
    if (rc == 0) { // only a unit handed out is a hit or a miss (as the wrapper counts acquires)
        if (waited) w->st.misses++;
        else w->st.hits++;
        if (!s->used) {
            s->used = true;
            if (!waited) w->st.prefetch_used++;
            drop_skipped(w, u);
        }
        s->refs++;
        w->expect = cyc(w, u);
        *out = part(s, expert);
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

static void win_release(void *ctx, int layer, int expert) {
    win_t *w = ctx;
    pthread_mutex_lock(&w->mu);
    if (layer == WEIGHTS_IN) {
        if (--w->in_refs == 0 && w->streams && w->in_len) (void)madvise((void *)w->in_page, w->in_len, MADV_DONTNEED);
    } else {
        const int u = unit_of(w, layer);
        for (int i = 0; u >= w->pinned && i < w->n_slots; i++) {
            slot_t *s = &w->slots[i];
            if (s->unit == u && s->state == S_READY && s->refs > 0) {
                if (--s->refs == 0) slot_clear(w, s); // used: its buffer takes the next unit
                break;
            }
        }
    }
    pthread_mutex_unlock(&w->mu);
}

static void win_prefetch(void *ctx, int layer, const int *experts, int n) {
    win_t *w = ctx;
    if (layer == WEIGHTS_IN) return;
    const int u = unit_of(w, layer); // an expert hint is one for its block: the block is the unit
    pthread_mutex_lock(&w->mu);
    if (u >= w->pinned && !find(w, u) && w->next != u) {
        w->next = u;
        pthread_cond_broadcast(&w->work);
    }
    pthread_mutex_unlock(&w->mu);
}

static void win_stats(void *ctx, weights_stats_t *out) {
    win_t *w = ctx;
    pthread_mutex_lock(&w->mu);
    *out = w->st;
    pthread_mutex_unlock(&w->mu);
}

static void win_describe(void *ctx, char *buf, size_t cap) {
    const win_t *w = ctx;
    snprintf(buf, cap, "window: %d of %d units pinned, %d x %.1f MiB buffers, io=%s", w->pinned, w->n_units, w->window,
             (double)w->slot_bytes / (double)(1u << 20), io_names[w->io]);
}

static void win_free(void *ctx) {
    win_t *w = ctx;
    if (!w) return;
    if (w->reader_on) {
        pthread_mutex_lock(&w->mu);
        w->stop = true;
        pthread_cond_broadcast(&w->work);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->reader, NULL);
    }
    for (int i = 0; w->slots && i < w->n_slots; i++) {
        buf_free(w->slots[i].buf, w->slots[i].cap);
        free(w->slots[i].experts);
    }
    for (int i = 0; w->pins && i < w->pinned; i++) {
        buf_free(w->pins[i].buf, w->pins[i].cap);
        free(w->pins[i].experts);
    }
    for (int i = 0; w->units && i < w->n_units; i++) unit_free(&w->units[i]);
    free(w->units);
    free(w->slots);
    free(w->pins);
    free(w->out_norm);
    free(w->rope_freqs);
    for (int i = 0; i < N_SRC; i++)
        if (w->f[i].fd >= 0) close(w->f[i].fd);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->done);
    free(w);
}

static const struct weights_i window_iface = {
    .acquire = win_acquire,
    .release = win_release,
    .prefetch = win_prefetch,
    .stats = win_stats,
    .describe = win_describe,
    .free = win_free,
};

// --- helpers: creation

// "w=N,pin=N,io=direct|pread|mmap": a forced window and pinned count (instead of plan_window's) and
// the reading method. -1 where not given.
static int parse_arg(const char *arg, int *win, int *pin, int *io, char *err, size_t errlen) {
    *win = *pin = *io = -1;
    char buf[128];
    if (strlen(arg) >= sizeof buf) return mlm_fail(err, errlen, MLM_EINVAL, "window: argument too long");
    snprintf(buf, sizeof buf, "%s", arg);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(kv, '=');
        char *end = NULL;
        long v = eq ? strtol(eq + 1, &end, 10) : -1;
        const bool num = eq && end != eq + 1 && !*end && v >= 0 && v < 1 << 20;
        if (eq && !strncmp(kv, "w=", 2) && num && v > 0) *win = (int)v;
        else if (eq && !strncmp(kv, "pin=", 4) && num) *pin = (int)v;
        else if (eq && !strncmp(kv, "io=", 3) && !strcmp(eq + 1, "direct")) *io = IO_DIRECT;
        else if (eq && !strncmp(kv, "io=", 3) && !strcmp(eq + 1, "pread")) *io = IO_PREAD;
        else if (eq && !strncmp(kv, "io=", 3) && !strcmp(eq + 1, "mmap")) *io = IO_MMAP;
        else
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "weight provider window: bad argument '%s' (want w=N, pin=N, io=direct|pread|mmap)", kv);
    }
    return 0;
}

// Opens file `src` for pread (O_DIRECT when asked and possible: otherwise io falls back to pread).
static int open_file(win_t *w, int src, char *err, size_t errlen) {
    w->f[src].fd = -1;
    if (!w->f[src].g) return 0;
    const char *path = gguf_path(w->f[src].g);
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC | (w->io == IO_DIRECT ? O_DIRECT : 0));
    if (fd < 0 && w->io == IO_DIRECT) { // a file system without direct I/O (tmpfs): buffered reads
        w->io = IO_PREAD;
        fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0 || fstat(fd, &st) != 0 || (uint64_t)st.st_size != w->f[src].size) {
        if (fd >= 0) close(fd);
        if (w->f[src].size && w->f[src].map) return 0; // a gguf over memory (or a file replaced since): its bytes
        return mlm_fail(err, errlen, MLM_EIO, "%s: cannot open for reading: %s", path, strerror(errno));
    }
    w->f[src].fd = fd;
    return 0;
}

// The token embedding rows, output_norm and rope_freqs: checked and bound as the mmap provider does.
static int bind_globals(win_t *w, char *err, size_t errlen) {
    const model_hparams_t *hp = &w->hp;
    const shard_slice_t *sl = &w->slice;
    const weights_params_t *p = &w->p;
    const weights_info_t info = weights_info_for(hp, sl);
    const int64_t E = hp->n_embd;
    int rc = 0;
    const gguf_tensor_t *t;
    if ((rc = weights_tok_embd(p, &info, &w->in.tok_embd, &t, err, errlen)) != 0) return rc;
    if (info.has_in) {
        const weights_rows_t *r = &w->in.tok_embd;
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
        const uintptr_t a = (uintptr_t)r->data / pg * pg;
        const uintptr_t b = ((uintptr_t)r->data + (size_t)(r->r1 - r->r0) * r->row_bytes + pg - 1) / pg * pg;
        w->in_page = (const uint8_t *)a;
        w->in_len = (size_t)(b - a);
        if (!w->streams) w->resident += (uint64_t)(r->r1 - r->r0) * r->row_bytes;
    }
    if (info.has_out) {
        if (!(t = weights_want_tensor(p, "output_norm.weight", 1, E, 0, 0, true, &rc, err, errlen))) return rc;
        if (!(w->out_norm = malloc((size_t)E * sizeof(float)))) return MLM_ENOMEM;
        const qtype_traits_t *tr = qtype_traits(t->type);
        if (!tr || !tr->has_kernels || E % tr->blck)
            return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "output_norm.weight: type %s is not supported",
                            qtype_name(t->type));
        quant_dequantize_ref(t->type, t->data, w->out_norm, E);
        w->resident += (uint64_t)E * sizeof(float);
    }
    if ((rc = weights_rope_freqs(p, &t, err, errlen)) != 0) return rc;
    if (t) {
        if (!(w->rope_freqs = malloc(t->nbytes))) return MLM_ENOMEM;
        memcpy(w->rope_freqs, t->data, t->nbytes);
        w->resident += t->nbytes;
    }
    return 0;
}

// A slot's buffer and expert table for units of `bytes` bytes. 0 or MLM_ENOMEM.
static int slot_init(win_t *w, slot_t *s, size_t bytes) {
    s->state = S_FREE;
    s->unit = -1;
    s->cap = bytes;
    s->buf = buf_alloc(bytes);
    s->experts = w->hp.n_expert ? calloc((size_t)w->hp.n_expert, sizeof *s->experts) : NULL;
    return (bytes && !s->buf) || (w->hp.n_expert && !s->experts) ? MLM_ENOMEM : 0;
}

// Reads the pinned units, in order, into buffers of their own.
static int load_pinned(win_t *w, char *err, size_t errlen) {
    for (int i = 0; i < w->pinned; i++) {
        slot_t *s = &w->pins[i];
        const size_t bytes = unit_buf_bytes(w, &w->units[i]);
        if (slot_init(w, s, bytes) != 0) return MLM_ENOMEM;
        w->resident += bytes + (w->io == IO_MMAP ? w->units[i].read_bytes : 0);
        const int rc = load_unit(w, s, i);
        if (rc != 0)
            return mlm_fail(err, errlen, rc, "%s: cannot read unit %d (%s): %s", gguf_path(w->p.g), i,
                            mlm_strerror(rc), rc == MLM_EIO ? strerror(errno) : "");
        s->state = S_READY;
    }
    return 0;
}

// --- public API

int weights_window_new(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen) {
    *out = NULL;
    int force_w, force_pin, io;
    if (p->experts || p->slice->placed)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "weight provider window streams every expert; placed experts are mapped (mmap)");
    int rc = parse_arg(arg ? arg : "", &force_w, &force_pin, &io, err, errlen);
    if (rc != 0) return rc;
    plan_stream_t plan;
    if (force_w < 0 && force_pin < 0 && (rc = weights_plan(p, &plan, err, errlen)) != 0) return rc;
    win_t *w = calloc(1, sizeof *w);
    if (!w) return MLM_ENOMEM;
    for (int i = 0; i < N_SRC; i++) w->f[i].fd = -1;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    w->hp = *p->hp;
    w->slice = *p->slice;
    w->p = *p;
    w->p.hp = &w->hp;
    w->p.slice = &w->slice;
    w->kern = p->kern ? p->kern : kernels_best();
    if (io < 0) { // $MESHLM_WINDOW_IO picks the method for every window of the process (benchmarks)
        const char *env = getenv("MESHLM_WINDOW_IO");
        for (int i = 0; env && i < 3; i++)
            if (!strcmp(env, io_names[i])) io = i;
    }
    w->io = io >= 0 ? (win_io_t)io : IO_DIRECT;
    const gguf_t *files[N_SRC] = {p->g, p->shard_file ? NULL : p->cols_g};
    for (int i = 0; i < N_SRC; i++) {
        w->f[i].g = files[i];
        w->f[i].map = files[i] ? gguf_base(files[i]) : NULL;
        w->f[i].size = files[i] ? gguf_file_size(files[i]) : 0;
    }
    w->expect = -1;
    const weights_info_t info = weights_info_for(&w->hp, &w->slice);
    w->n_blocks = info.l1 > info.l0 ? info.l1 - info.l0 : 0;
    w->n_units = w->n_blocks + (info.has_out ? 1 : 0);
    if (force_w >= 0 || force_pin >= 0) {
        w->pinned = force_pin >= 0 ? force_pin : 0;
        w->window = force_w >= 0 ? force_w : 1;
        w->streams = true;
    } else {
        w->pinned = plan.pinned;
        w->window = plan.window;
        w->streams = plan.streams;
    }
    if (w->pinned > w->n_units) w->pinned = w->n_units;
    if (w->window > w->n_units - w->pinned) w->window = w->n_units - w->pinned;
    if (w->window < 1 && w->pinned < w->n_units) w->window = 1;
    w->next = w->pinned;
    w->units = calloc((size_t)(w->n_units ? w->n_units : 1), sizeof *w->units);
    rc = w->units ? 0 : MLM_ENOMEM;
    for (int i = 0; rc == 0 && i < w->n_units; i++)
        rc = plan_unit(w, &w->units[i], i < w->n_blocks ? w->slice.l0 + i : WEIGHTS_OUT, err, errlen);
    for (int i = 0; rc == 0 && i < N_SRC; i++) rc = open_file(w, i, err, errlen);
    if (rc == 0) rc = bind_globals(w, err, errlen);
    if (rc == 0 && w->streams && w->in_len) (void)madvise((void *)w->in_page, w->in_len, MADV_RANDOM); // a row, not its neighbours
    for (int i = w->pinned; rc == 0 && i < w->n_units; i++) {
        const size_t b = unit_buf_bytes(w, &w->units[i]);
        if (b > w->slot_bytes) w->slot_bytes = b;
    }
    w->pins = calloc((size_t)(w->pinned ? w->pinned : 1), sizeof *w->pins);
    w->n_slots = w->window > 0 ? w->window + WIN_MAX_OVERFLOW : 0;
    w->slots = calloc((size_t)(w->n_slots ? w->n_slots : 1), sizeof *w->slots);
    if (rc == 0 && (!w->pins || !w->slots)) rc = MLM_ENOMEM;
    for (int i = 0; rc == 0 && i < w->n_slots; i++) {
        if (i < w->window) rc = slot_init(w, &w->slots[i], w->slot_bytes);
        else w->slots[i] = (slot_t){.state = S_ABSENT, .unit = -1};
    }
    if (rc == 0) rc = load_pinned(w, err, errlen);
    if (rc == MLM_ENOMEM) mlm_fail(err, errlen, rc, "weight window: out of memory for its buffers");
    if (rc == 0 && w->window > 0) {
        pthread_mutex_lock(&w->mu);
        count_held(w);
        pthread_mutex_unlock(&w->mu);
        if (pthread_create(&w->reader, NULL, reader_main, w) != 0)
            rc = mlm_fail(err, errlen, MLM_ENOMEM, "weight window: cannot start its reader thread");
        else w->reader_on = true;
    } else if (rc == 0) {
        count_held(w);
    }
    if (rc != 0) {
        win_free(w);
        return rc;
    }
    if (!(*out = weights_wrap(&window_iface, w, "window", &info))) return MLM_ENOMEM;
    return 0;
}
