// The reference weight provider: every unit of the slice is bound once, at creation, to the mapped
// GGUF (repacked into the kernels' layout when asked); acquire hands out a pointer, release does nothing.
//
// All-reduce slices (shard_slice_t.cols) cut attn_output and ffn_down by columns. In the model file
// a row's column slice lies at a stride (one piece per row), so it is copied into a contiguous
// matrix of the slice's columns at bind time (freed again when the kernels repack it into their own
// copy): the node then holds only its share (1/N of those matrices) and the products run the same
// kernels, repacked layouts included, as any row-cut matrix. The alternative, a row stride in
// mm_weight_t, would touch every kernel and give up the repacked layouts. Measured with
// tests/bench/bench_colslice on TinyLlama-1.1B shapes, node 0 of 2, one thread: the copy costs
// 124 ms at load for Q8_0 (184 MB of attn_output/ffn_down columns, 1.5 GB/s from the page cache;
// Q4_0 is repacked either way and loads as fast as its row cut), and decode spends 3.5 ms per token
// in those products (Q4_0; Q8_0 17.8 ms) against 22.0 ms (23.9 ms) reading each row's columns in
// place. A shard file written for the slice holds the columns contiguously already.
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/err.h"
#include "offload/weights_impl.h"

typedef struct {
    weights_params_t p;        // p.hp and p.slice point at the copies below
    model_hparams_t hp;
    shard_slice_t slice;
    const kernels_t *kern;
    layer_weights_t in;        // WEIGHTS_IN
    layer_weights_t out;       // WEIGHTS_OUT
    layer_weights_t *blocks;   // (n_layer) dense parts; only [l0, l1) are bound
    layer_weights_t *experts;  // (n_layer * n_expert) one expert's FFN each
    void **owned;              // copies the units point into: F32 norm vectors stored in other types,
                               // contiguous column slices of a model file's matrices
    int n_owned;
    uint64_t bytes;            // weight bytes the units expose (mapped rows or repacked copies)
    bool masked;               // placed experts: only the experts in mask are bound
    uint64_t mask[4];          // bit e = expert e is bound (when masked)
    struct bound *bound;       // (n_bound) every matrix bound, for a later share (weights_matrix)
    int n_bound, cap_bound;
    uint64_t reused;           // bytes taken from p.reuse at creation
    uint32_t *block;           // (n_block) hot second copies held in one block: layer << 8 | expert
    int n_block;
} mmap_t;

// A matrix bound from the file: which tensor, plane and rows of it.
struct bound {
    char name[96];             // the tensor's name
    int plane;                 // plane of a 3-D expert tensor (0 for a matrix)
    int64_t r0;                // tensor row of the matrix's row 0
    int64_t c0, c1;            // tensor columns it holds
    mm_weight_t *w;            // the unit's field (in blocks, experts or out)
};

// Whether the share computes expert e of block il: every expert without a mask, else the mask's, or a
// hot second copy of block il (whose planes a shard file of the slice holds: its experts are the union).
static bool holds_expert(const mmap_t *m, int il, int e) {
    if (!m->masked || (m->mask[e >> 6] >> (e & 63) & 1u)) return true;
    for (int j = 0; j < m->n_block; j++)
        if (m->block[j] == ((uint32_t)il << 8 | (uint32_t)e)) return shard_holds_expert(&m->slice, e);
    return false;
}

// --- binding

// Keeps buf (malloc'd) until the provider is freed. 0 or MLM_ENOMEM (buf is then freed).
static int own(mmap_t *m, void *buf) {
    void **list = realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *list);
    if (!list) {
        free(buf);
        return MLM_ENOMEM;
    }
    m->owned = list;
    m->owned[m->n_owned++] = buf;
    return 0;
}

// A float vector view of a 1-D tensor, converting (and owning a copy) when it is not F32.
static const float *vec_f32(mmap_t *m, const gguf_tensor_t *t, int *rc) {
    m->bytes += t->nbytes;
    if (t->type == QT_F32) return t->data;
    const qtype_traits_t *tr = qtype_traits(t->type);
    int64_t n = gguf_tensor_nelements(t);
    if (!tr || !tr->has_kernels || n % tr->blck) {
        *rc = MLM_EUNSUPPORTED;
        return NULL;
    }
    float *buf = malloc((size_t)n * sizeof(float));
    if (!buf || own(m, buf) != 0) {
        *rc = MLM_ENOMEM;
        return NULL;
    }
    quant_dequantize_ref(t->type, t->data, buf, n);
    return buf;
}

// Notes a bound matrix for weights_matrix. 0 or MLM_ENOMEM.
static int note_bound(mmap_t *m, mm_weight_t *w, const char *name, int plane, int64_t r0, int64_t c0, int64_t c1) {
    if (m->n_bound == m->cap_bound) {
        const int cap = m->cap_bound ? 2 * m->cap_bound : 64;
        struct bound *b = realloc(m->bound, (size_t)cap * sizeof *b);
        if (!b) return MLM_ENOMEM;
        m->bound = b;
        m->cap_bound = cap;
    }
    struct bound *b = &m->bound[m->n_bound++];
    snprintf(b->name, sizeof b->name, "%s", name);
    b->plane = plane;
    b->r0 = r0;
    b->c0 = c0;
    b->c1 = c1;
    b->w = w;
    return 0;
}

// Binds rows [r0, r0 + rows) of a tensor (cols columns [c0, c1) of it) from data into w, taking what
// the earlier share p.reuse holds of them: the whole repacked copy when it holds the very same rows
// (moved: it keeps the plain rows), else the rows in common (mm_weight_init_take: its copy is taken
// over and reshaped in place, or where it cannot be, copied from). Without reuse, or for a matrix
// that is not repacked, mm_weight_init.
static int init_matrix(mmap_t *m, mm_weight_t *w, const gguf_tensor_t *t, int plane, int64_t r0, int64_t rows,
                       int64_t cols, int64_t c0, int64_t c1, const void *data, bool repack) {
    int64_t pr0 = 0, pc0 = 0, pc1 = 0;
    mm_weight_t *prev = repack && m->p.reuse ? weights_matrix(m->p.reuse, t->name, plane, &pr0, &pc0, &pc1) : NULL;
    if (!prev || !prev->packed || pc0 != c0 || pc1 != c1 || prev->type != t->type || prev->cols != cols)
        return mm_weight_init(w, m->kern, t->type, rows, cols, data, repack);
    if (pr0 == r0 && prev->rows == rows && prev->data) { // the very same rows: move the repacked copy
        *w = *prev;
        w->data = data;
        prev->packed = NULL; // prev computes from its plain rows from now on
        prev->packed_map = 0;
        prev->pack = 0;
        prev->row_align = 1;
        m->reused += (uint64_t)rows * w->row_bytes;
        return 0;
    }
    int64_t taken = 0;
    int rc = mm_weight_init_take(w, m->kern, t->type, rows, cols, data, prev, pr0 - r0, &taken);
    if (rc == 0) m->reused += (uint64_t)taken * w->row_bytes;
    return rc;
}

// Binds the located rows of plane `plane` as a weight (zeroed when the slice holds none).
static int bind_plane(mmap_t *m, mm_weight_t *w, const weights_loc_t *loc, int plane, bool repack, char *err,
                      size_t errlen) {
    memset(w, 0, sizeof *w);
    if (!loc->t || loc->r1 <= loc->r0) return 0; // this node holds none of it
    const gguf_tensor_t *t = loc->t;
    int rc = init_matrix(m, w, t, plane, loc->r0, loc->r1 - loc->r0, t->ne[0], 0, t->ne[0], weights_loc_data(loc, plane),
                         repack);
    if (rc != 0)
        return mlm_fail(err, errlen, rc, "tensor %s: type %s cannot be used for a matrix product", t->name,
                        qtype_name(t->type));
    // Without a budget the share stays resident: rows the kernels read in the file's layout are copied
    // into huge pages (mm_weight_copy_huge; about 25% faster decode for Q8_0 and F16 than from the
    // mapping's 4 KB pages). Under a budget the file's pages stay, which the kernel may reclaim.
    if (repack && !m->p.budget_bytes && (rc = mm_weight_copy_huge(w)) != 0) {
        mm_weight_release(w);
        return mlm_fail(err, errlen, rc, "tensor %s: no memory for its %zu bytes", t->name,
                        (size_t)w->rows * w->row_bytes);
    }
    if ((rc = note_bound(m, w, t->name, plane, loc->r0, 0, t->ne[0])) != 0) {
        mm_weight_release(w);
        return rc;
    }
    m->bytes += (size_t)(loc->r1 - loc->r0) * w->row_bytes;
    if (w->packed || w->copy) { // the kernels read the copy only: the mapped rows' own pages can go
        const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), src = (uintptr_t)weights_loc_data(loc, plane);
        const uintptr_t a = (src + pg - 1) / pg * pg, b = (src + (size_t)w->rows * w->row_bytes) / pg * pg;
        // packed: file pages leave (a buffer's stay); a huge-page copy (no budget) only unmaps them from
        // this process, and the page cache keeps them for the next plan's share
        if (b > a) (void)madvise((void *)a, b - a, w->packed ? MADV_PAGEOUT : MADV_DONTNEED);
    }
    return 0;
}

// Where the slice's columns [c0, c1) of a matrix cut by columns (all-reduce mode) are.
typedef struct {
    const gguf_tensor_t *t;   // the file's tensor; NULL when the slice holds none of its columns
    int64_t c0, c1;           // columns of the full tensor the slice holds
    bool contiguous;          // the file holds just those columns (a shard file)
} cols_loc_t;

// Whether the slice cuts matrix `name` of cols columns by columns other than all of them, and which.
static bool cut_by_cols(const mmap_t *m, const char *name, int64_t cols, int64_t *c0, int64_t *c1) {
    shard_tensor_cols(&m->slice, name, cols, m->hp.head_dim, c0, c1);
    return m->slice.cols && !(*c0 == 0 && *c1 == cols);
}

// Finds a column-cut matrix of full shape [cols, rows(, planes)] holding columns [c0, c1), checks its
// shape and that the columns are whole quant blocks. 0, MLM_EFORMAT or MLM_EINVAL with a message.
static int locate_cols(mmap_t *m, const char *name, int64_t cols, int64_t rows, int planes, int64_t c0, int64_t c1,
                       cols_loc_t *loc, char *err, size_t errlen) {
    memset(loc, 0, sizeof *loc);
    loc->c0 = c0;
    loc->c1 = c1;
    if (m->p.shard_file && c1 == c0) return 0; // a shard file leaves out tensors of which it holds no column
    int rc = 0;
    loc->contiguous = m->p.shard_file;
    loc->t = weights_want_tensor(&m->p, name, planes > 1 ? 3 : 2, m->p.shard_file ? c1 - c0 : cols, rows,
                                 planes > 1 ? planes : 0, true, &rc, err, errlen);
    if (!loc->t) return rc;
    if (!loc->contiguous && !shard_cols_aligned(loc->t->type, cols, c0, c1))
        return mlm_fail(err, errlen, MLM_EINVAL,
                        "tensor %s: columns %lld-%lld are not whole %s blocks of %u; the all-reduce split must cut "
                        "its heads and FFN units at block multiples",
                        name, (long long)c0, (long long)c1 - 1, qtype_name(loc->t->type),
                        (unsigned)qtype_traits(loc->t->type)->blck);
    return 0;
}

// Binds plane `plane` of the located columns as a weight of rows x (c1 - c0) (zeroed when none): in
// place from a shard file, else through a contiguous copy of each row's slice.
static int bind_plane_cols(mmap_t *m, mm_weight_t *w, const cols_loc_t *loc, int plane, bool repack, char *err,
                           size_t errlen) {
    memset(w, 0, sizeof *w);
    if (!loc->t || loc->c1 <= loc->c0) return 0;
    const gguf_tensor_t *t = loc->t;
    const int64_t rows = t->ne[1], nc = loc->c1 - loc->c0;
    const size_t rb = qtype_row_size(t->type, t->ne[0]);              // a file row
    const size_t cb = qtype_row_size(t->type, nc);                    // a row of the slice
    const size_t skip = qtype_row_size(t->type, loc->c0);             // bytes before c0 in a file row
    const uint8_t *base = (const uint8_t *)t->data + (size_t)plane * (size_t)rows * rb;
    uint8_t *copy = NULL;                                             // (rows, cb) when not contiguous
    if (!loc->contiguous) {
        if (!(copy = malloc((size_t)rows * cb))) return MLM_ENOMEM;
        for (int64_t r = 0; r < rows; r++) memcpy(copy + (size_t)r * cb, base + (size_t)r * rb + skip, cb);
    }
    int rc = init_matrix(m, w, t, plane, 0, rows, nc, loc->c0, loc->c1, copy ? copy : base, repack);
    if (rc == 0 && (rc = note_bound(m, w, t->name, plane, 0, loc->c0, loc->c1)) != 0) mm_weight_release(w);
    if (rc != 0) {
        free(copy);
        memset(w, 0, sizeof *w);
        return mlm_fail(err, errlen, rc, "tensor %s: type %s cannot be used for a matrix product", t->name,
                        qtype_name(t->type));
    }
    if (copy && w->packed) { // the kernels' repacked copy is all the products read
        free(copy);
        w->data = NULL;
    } else if (copy && (rc = own(m, copy)) != 0) {
        mm_weight_release(w);
        memset(w, 0, sizeof *w);
        return rc;
    }
    m->bytes += (size_t)rows * cb;
    return 0;
}

// Finds a matrix of full shape [cols, full_rows], checks the rows (or, cut by columns, the columns)
// the file holds for the slice and binds them.
static int bind(mmap_t *m, mm_weight_t *w, const char *name, int64_t cols, int64_t full_rows, bool repack,
                char *err, size_t errlen) {
    int64_t c0, c1;
    if (cut_by_cols(m, name, cols, &c0, &c1)) {
        cols_loc_t cl;
        int rc = locate_cols(m, name, cols, full_rows, 1, c0, c1, &cl, err, errlen);
        return rc ? rc : bind_plane_cols(m, w, &cl, 0, repack, err, errlen);
    }
    weights_loc_t loc;
    int rc = weights_locate(&m->p, name, cols, full_rows, 1, &loc, err, errlen);
    return rc ? rc : bind_plane(m, w, &loc, 0, repack, err, errlen);
}

// The same for a 3-D expert tensor: plane e goes to field w of unit experts[e] (each expert's matrix
// cut the same way).
static int bind_experts(mmap_t *m, int il, layer_weights_t *units, size_t field, const char *name, int64_t cols,
                        int64_t full_rows, bool repack, char *err, size_t errlen) {
    const int ne = m->hp.n_expert;
    int64_t c0, c1;
    int rc;
    if (cut_by_cols(m, name, cols, &c0, &c1)) {
        cols_loc_t cl;
        rc = locate_cols(m, name, cols, full_rows, ne, c0, c1, &cl, err, errlen);
        for (int e = 0; rc == 0 && e < ne; e++)
            if (holds_expert(m, il, e))
                rc = bind_plane_cols(m, (mm_weight_t *)((uint8_t *)&units[e] + field), &cl, e, repack, err, errlen);
        return rc;
    }
    weights_loc_t loc;
    rc = weights_locate(&m->p, name, cols, full_rows, ne, &loc, err, errlen);
    for (int e = 0; rc == 0 && e < ne; e++)
        if (holds_expert(m, il, e))
            rc = bind_plane(m, (mm_weight_t *)((uint8_t *)&units[e] + field), &loc, e, repack, err, errlen);
    return rc;
}

// Starts reading, in large requests, the rows of every matrix the slice holds that the earlier share
// (p.reuse) does not give: binding then faults them in one page at a time from the page cache, not
// from the disk (a recovery's survivor reads its new rows at the disk's speed, and the reads overlap
// the repacking). A hint: nothing fails. Matrices cut by columns are left to the faults.
static void read_ahead(mmap_t *m) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int64_t i = 0; i < gguf_n_tensors(m->p.g); i++) {
        const gguf_tensor_t *t = gguf_tensor(m->p.g, i);
        if (!t || t->n_dims != 2 || !shard_holds_tensor(&m->slice, t->name, m->hp.n_layer, m->hp.tied_output)) continue;
        if (!m->hp.tied_output && strcmp(t->name, "token_embd.weight") == 0) continue; // looked up, not multiplied
        int64_t r0, r1, c0, c1; // the tensor rows held; a shard file's row k is tensor row r0 + k
        shard_tensor_rows(&m->slice, t->name, t->ne[1], m->hp.head_dim, &r0, &r1);
        shard_tensor_cols(&m->slice, t->name, t->ne[0], m->hp.head_dim, &c0, &c1);
        const int64_t base = m->p.shard_file ? r0 : 0;
        if (r1 <= r0 || r1 - base > t->ne[1] || c0 != 0 || c1 != t->ne[0]) continue;
        int64_t pr0 = 0, pr1 = 0, pc0 = 0, pc1 = 0; // tensor rows [pr0, pr1) the earlier share gives
        const mm_weight_t *prev = weights_matrix(m->p.reuse, t->name, 0, &pr0, &pc0, &pc1);
        if (prev && prev->packed && prev->type == t->type && pc0 == 0 && pc1 == t->ne[0]) pr1 = pr0 + prev->rows;
        else pr0 = pr1 = r0;
        const int64_t run[2][2] = {{r0, pr0 < r1 ? (pr0 > r0 ? pr0 : r0) : r1}, {pr1 > r0 ? (pr1 < r1 ? pr1 : r1) : r0, r1}};
        const size_t rb = qtype_row_size(t->type, t->ne[0]);
        for (int k = 0; k < 2; k++) {
            if (run[k][1] <= run[k][0]) continue;
            const uintptr_t a = ((uintptr_t)t->data + (size_t)(run[k][0] - base) * rb) / pg * pg;
            const uintptr_t b = (uintptr_t)t->data + (size_t)(run[k][1] - base) * rb;
            (void)madvise((void *)a, b - a, MADV_WILLNEED);
        }
    }
}

static int bind_all(mmap_t *m, bool repack, char *err, size_t errlen) {
    const model_hparams_t *hp = &m->hp;
    const shard_slice_t *sl = &m->slice;
    const weights_params_t *p = &m->p;
    int rc = 0;
    const int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim, KV = (int64_t)hp->n_head_kv * hp->head_dim;
    const weights_info_t info = weights_info_for(hp, sl);
    const bool dense_repack = repack && !p->experts_only; // an expert-only member never touches the rest
    // An empty layer range holds no block, no embedding and no output (a coordinator that only
    // tokenizes and samples).
    const gguf_tensor_t *t;
    if ((rc = weights_tok_embd(p, &info, &m->in.tok_embd, &t, err, errlen)) != 0) return rc;
    if (info.has_in) m->bytes += (size_t)(m->in.tok_embd.r1 - m->in.tok_embd.r0) * m->in.tok_embd.row_bytes;
    if (info.has_out) {
        t = weights_want_tensor(p, "output_norm.weight", 1, E, 0, 0, true, &rc, err, errlen);
        if (!t || !(m->out.out_norm = vec_f32(m, t, &rc))) return rc ? rc : MLM_EFORMAT;
        if ((rc = bind(m, &m->out.output, hp->tied_output ? "token_embd.weight" : "output.weight", E, hp->n_vocab,
                       dense_repack, err, errlen)) != 0)
            return rc;
    }
    if ((rc = weights_rope_freqs(p, &t, err, errlen)) != 0) return rc;
    const float *rope_freqs = t ? t->data : NULL;
    for (int il = sl->l0; il < sl->l1; il++) {
        layer_weights_t *L = &m->blocks[il];
        L->rope_freqs = rope_freqs;
        char name[96];
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix), name)
#define B2(field, suffix, cols, rows) \
    if ((rc = bind(m, &L->field, NAME(suffix), cols, rows, dense_repack, err, errlen)) != 0) return rc;
#define T1(field, suffix)                                                                        \
    if (!(t = weights_want_tensor(p, NAME(suffix), 1, E, 0, 0, true, &rc, err, errlen))) return rc; \
    if (!(L->field = vec_f32(m, t, &rc))) return rc ? rc : MLM_EFORMAT;
        T1(attn_norm, "attn_norm");
        T1(ffn_norm, "ffn_norm");
        B2(wq, "attn_q", E, Q);
        B2(wk, "attn_k", E, KV);
        B2(wv, "attn_v", E, KV);
        B2(wo, "attn_output", Q, E);
        if (hp->n_expert == 0) {
            B2(w_gate, "ffn_gate", E, hp->n_ff);
            B2(w_up, "ffn_up", E, hp->n_ff);
            B2(w_down, "ffn_down", hp->n_ff, E);
        } else {
            B2(gate_inp, "ffn_gate_inp", E, hp->n_expert);
            layer_weights_t *X = &m->experts[(size_t)il * hp->n_expert];
            if ((rc = bind_experts(m, il, X, offsetof(layer_weights_t, w_gate), NAME("ffn_gate_exps"), E, hp->n_ff,
                                   repack, err, errlen)) != 0 ||
                (rc = bind_experts(m, il, X, offsetof(layer_weights_t, w_up), NAME("ffn_up_exps"), E, hp->n_ff, repack,
                                   err, errlen)) != 0 ||
                (rc = bind_experts(m, il, X, offsetof(layer_weights_t, w_down), NAME("ffn_down_exps"), hp->n_ff, E,
                                   repack, err, errlen)) != 0)
                return rc;
            t = gguf_find_tensor(p->g, NAME("ffn_gate_exps"));
            if (!t) t = gguf_find_tensor(p->g, NAME("ffn_down_exps")); // a shard without FFN units
            L->e_type = t ? t->type : QT_F32;
        }
#undef T1
#undef B2
#undef NAME
    }
    return 0;
}

// --- the table

static int mmap_acquire(void *ctx, int layer, int expert, const layer_weights_t **out) {
    mmap_t *m = ctx;
    if (layer >= 0 && expert >= 0 && !holds_expert(m, layer, expert)) return MLM_ENOTFOUND; // placed on another node
    if (layer >= 0)
        *out = expert < 0 ? &m->blocks[layer] : &m->experts[(size_t)layer * (size_t)m->hp.n_expert + (size_t)expert];
    else
        *out = layer == WEIGHTS_IN ? &m->in : &m->out;
    return 0;
}

static void mmap_stats(void *ctx, weights_stats_t *out) {
    const mmap_t *m = ctx;
    out->bytes_held = m->bytes;
    out->bytes_peak = m->bytes;
    out->bytes_reused = m->reused;
}

static void mmap_describe(void *ctx, char *buf, size_t cap) {
    const mmap_t *m = ctx;
    if (m->reused) snprintf(buf, cap, "mmap, %.1f of %.1f MB taken from the last share", (double)m->reused / 1e6,
                            (double)m->bytes / 1e6);
    else snprintf(buf, cap, "mmap");
}

static mm_weight_t *mmap_matrix(void *ctx, const char *name, int plane, int64_t *r0, int64_t *c0, int64_t *c1) {
    mmap_t *m = ctx;
    for (int i = 0; i < m->n_bound; i++) {
        const struct bound *b = &m->bound[i];
        if (b->plane != plane || strcmp(b->name, name) != 0) continue;
        *r0 = b->r0;
        *c0 = b->c0;
        *c1 = b->c1;
        return b->w;
    }
    return NULL;
}

static void release_unit(layer_weights_t *L) {
    mm_weight_t *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->gate_inp, &L->w_gate, &L->w_up, &L->w_down, &L->output};
    for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) mm_weight_release(ws[i]);
}

static void mmap_free(void *ctx) {
    mmap_t *m = ctx;
    if (!m) return;
    const size_t nl = (size_t)m->hp.n_layer, ne = (size_t)m->hp.n_expert;
    for (size_t i = 0; m->blocks && i < nl; i++) release_unit(&m->blocks[i]);
    for (size_t i = 0; m->experts && i < nl * ne; i++) release_unit(&m->experts[i]);
    release_unit(&m->out);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->bound);
    free(m->block);
    free(m->blocks);
    free(m->experts);
    free(m);
}

static const struct weights_i mmap_iface = {
    .acquire = mmap_acquire,
    .release = NULL, // nothing to give back: every unit stays bound
    .prefetch = NULL, // the page cache reads ahead
    .stats = mmap_stats,
    .describe = mmap_describe,
    .free = mmap_free,
    .matrix = mmap_matrix,
};

int weights_mmap_new(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen) {
    *out = NULL;
    if (arg && *arg) return mlm_fail(err, errlen, MLM_EINVAL, "weight provider mmap takes no argument (got '%s')", arg);
    mmap_t *m = calloc(1, sizeof *m);
    if (!m) return MLM_ENOMEM;
    m->hp = *p->hp;
    m->slice = *p->slice;
    m->p = *p;
    m->p.hp = &m->hp;
    m->p.slice = &m->slice;
    m->kern = p->kern ? p->kern : kernels_best();
    m->masked = p->experts != NULL || p->slice->placed;
    if (p->experts) memcpy(m->mask, p->experts, sizeof m->mask);
    else memset(m->mask, 0xff, sizeof m->mask);
    for (int e = 0; p->slice->placed && e < 64 * (int)(sizeof m->mask / sizeof m->mask[0]); e++)
        if (!shard_holds_expert(p->slice, e)) m->mask[e >> 6] &= ~((uint64_t)1 << (e & 63)); // nor the slice's
    m->p.experts = NULL; // the copy above
    if (p->experts && p->n_block_experts > 0) {
        if (!(m->block = malloc((size_t)p->n_block_experts * sizeof *m->block))) {
            free(m);
            return MLM_ENOMEM;
        }
        memcpy(m->block, p->block_experts, (size_t)p->n_block_experts * sizeof *m->block);
        m->n_block = p->n_block_experts;
    }
    m->p.block_experts = NULL;
    m->p.n_block_experts = 0;
    const size_t nl = (size_t)m->hp.n_layer, ne = (size_t)m->hp.n_expert;
    m->blocks = calloc(nl ? nl : 1, sizeof *m->blocks);
    m->experts = ne ? calloc(nl * ne, sizeof *m->experts) : NULL;
    if (p->repack && m->p.reuse) read_ahead(m);
    int rc = (!m->blocks || (ne && !m->experts)) ? MLM_ENOMEM : bind_all(m, p->repack, err, errlen);
    m->p.reuse = NULL; // borrowed for the binding only
    if (rc != 0) {
        mmap_free(m);
        return rc;
    }
    const weights_info_t info = weights_info_for(&m->hp, &m->slice);
    if (!(*out = weights_wrap(&mmap_iface, m, "mmap", &info))) return MLM_ENOMEM;
    return 0;
}
