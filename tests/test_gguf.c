// CUnit suite "gguf": the GGUF reader on every shared model, hand-built edge cases and corrupted copies.
#include <CUnit/CUnit.h>
#include <errno.h>
#include <dirent.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "worker/format/gguf.h"

// --- helpers: byte builder for hand-made GGUF files

typedef struct {
    uint8_t *p;              // bytes (NULL until the first put)
    size_t n;                // bytes written
    size_t cap;              // allocated
} bb_t;

static void bb_put(bb_t *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) abort();  // test-only: out of memory is not a case under test here
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void bb_u8(bb_t *b, uint8_t v) { bb_put(b, &v, 1); }

static void bb_u32(bb_t *b, uint32_t v) {
    uint8_t t[4];
    for (int i = 0; i < 4; i++) t[i] = (uint8_t)(v >> (8 * i));
    bb_put(b, t, 4);
}

static void bb_u64(bb_t *b, uint64_t v) {
    uint8_t t[8];
    for (int i = 0; i < 8; i++) t[i] = (uint8_t)(v >> (8 * i));
    bb_put(b, t, 8);
}

static void bb_strn(bb_t *b, const char *s, size_t n) {
    bb_u64(b, n);
    bb_put(b, s, n);
}

static void bb_str(bb_t *b, const char *s) { bb_strn(b, s, strlen(s)); }

static void bb_hdr(bb_t *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    bb_put(b, "GGUF", 4);
    bb_u32(b, version);
    bb_u64(b, n_tensors);
    bb_u64(b, n_kv);
}

static void bb_kv_u32(bb_t *b, const char *key, uint32_t v) {
    bb_str(b, key);
    bb_u32(b, GGUF_VT_UINT32);
    bb_u32(b, v);
}

static void bb_kv_str(bb_t *b, const char *key, const char *v) {
    bb_str(b, key);
    bb_u32(b, GGUF_VT_STRING);
    bb_str(b, v);
}

static void bb_tinfo(bb_t *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type, uint64_t off) {
    bb_str(b, name);
    bb_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) bb_u64(b, ne[d]);
    bb_u32(b, type);
    bb_u64(b, off);
}

// Pads to the alignment, then appends n data bytes (value i & 0xff).
static void bb_data(bb_t *b, size_t align, size_t n) {
    while (b->n % align) bb_u8(b, 0);
    for (size_t i = 0; i < n; i++) bb_u8(b, (uint8_t)i);
}

// Opens b's bytes; returns the code, keeps the message in err.
static int bb_open(const bb_t *b, gguf_t **g, char *err, size_t errlen) {
    err[0] = '\0';
    return gguf_open_mem(g, b->p, b->n, "hand.gguf", err, errlen);
}

// Asserts that b is refused with code and a message naming the file and containing needle.
static void expect_fail(const bb_t *b, int code, const char *needle) {
    gguf_t *g = NULL;
    char err[512];
    int rc = bb_open(b, &g, err, sizeof err);
    CU_ASSERT_EQUAL(rc, code);
    CU_ASSERT_PTR_NULL(g);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "hand.gguf"));
    if (!strstr(err, needle)) fprintf(stderr, "\n  message '%s' lacks '%s'\n", err, needle);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, needle));
    gguf_close(&g);
}

// --- helpers: shared models

static void *load_model(const char *rel, size_t *len) {
    char path[1024];
    test_shared_path(path, sizeof path, rel);
    void *buf = test_read_file(path, len);
    if (!buf) fprintf(stderr, "\n  cannot read %s\n", path);
    return buf;
}

// Checks what every successfully opened file must satisfy; returns the number of problems.
static int check_invariants(const gguf_t *g) {
    int bad = 0;
    const uint8_t *base = gguf_base(g);
    size_t size = gguf_file_size(g);
    if (gguf_data_offset(g) > size) bad++;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        const uint8_t *d = t->data;
        if (!t->name || d < base || d > base + size || t->nbytes > (size_t)(base + size - d)) bad++;
        if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS) bad++;
        if (t->offset % gguf_alignment(g)) bad++;
        if (t->nbytes != qtype_row_size(t->type, t->ne[0]) * (size_t)(t->ne[1] * t->ne[2] * t->ne[3])) bad++;
        if (gguf_find_tensor(g, t->name) != t) bad++;
        if (t->nbytes) {
            volatile uint8_t touch = (uint8_t)(d[0] ^ d[t->nbytes - 1]);  // ASan checks both ends
            (void)touch;
        }
    }
    char buf[256];
    for (int64_t i = 0; i < gguf_n_kv(g); i++) {
        const char *key = gguf_kv_key(g, i);
        const gguf_value_t *v = gguf_kv_value(g, i);
        if (!key || !v || gguf_find(g, key) != v) bad++;
        int n = gguf_value_format(v, buf, sizeof buf, 8);
        if (n < 0 || strlen(buf) != ((size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1)) bad++;
    }
    return bad;
}

// Lists *.gguf under dir (recursively) into a growing array of malloc'd paths.
static void list_gguf(const char *dir, char ***paths, size_t *n) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        char *p = malloc(len);
        if (!p) break;
        snprintf(p, len, "%s/%s", dir, e->d_name);
        struct stat st;
        size_t nl = strlen(e->d_name);
        if (stat(p, &st) == 0 && S_ISDIR(st.st_mode)) {
            list_gguf(p, paths, n);
            free(p);
        } else if (nl > 5 && strcmp(e->d_name + nl - 5, ".gguf") == 0) {
            char **np = realloc(*paths, (*n + 1) * sizeof **paths);
            if (!np) {
                free(p);
                break;
            }
            *paths = np;
            (*paths)[(*n)++] = p;
        } else {
            free(p);
        }
    }
    closedir(d);
}

// --- helpers: layout walker for trusted (real, v2/v3) files, to aim corruptions at fields

typedef struct {
    size_t *at;              // (n) start offsets of header fields, ascending
    size_t n;                // fields recorded
    size_t cap;              // allocated
    size_t header_end;       // end of the last tensor info
    size_t first_key_len;    // offset of kv[0]'s key length
    size_t first_arr_count;  // offset of the first array's count (0 if none)
    size_t first_dim;        // offset of tensor[0]'s ne[0] (0 if no tensors)
    size_t first_ttype;      // offset of tensor[0]'s type
    size_t first_toff;       // offset of tensor[0]'s data offset
    size_t last_toff;        // offset of the last tensor's data offset
} layout_t;

static void lay_mark(layout_t *l, size_t off) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 1024;
        size_t *p = realloc(l->at, l->cap * sizeof *p);
        if (!p) abort();  // test-only
        l->at = p;
    }
    l->at[l->n++] = off;
}

static uint64_t le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static size_t vt_size(uint32_t t) {
    static const size_t sz[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < GGUF_VT_COUNT ? sz[t] : 0;
}

static size_t walk_value(const uint8_t *p, size_t pos, uint32_t t, layout_t *l, bool mark_items) {
    if (t == GGUF_VT_STRING) {
        if (mark_items) lay_mark(l, pos);
        return pos + 8 + le(p + pos, 8);
    }
    if (t != GGUF_VT_ARRAY) return pos + vt_size(t);
    uint32_t et = (uint32_t)le(p + pos, 4);
    lay_mark(l, pos);
    lay_mark(l, pos + 4);
    if (!l->first_arr_count) l->first_arr_count = pos + 4;
    uint64_t n = le(p + pos + 4, 8);
    pos += 12;
    lay_mark(l, pos);
    if (vt_size(et)) return pos + n * vt_size(et);
    for (uint64_t i = 0; i < n; i++) pos = walk_value(p, pos, et, l, true);
    return pos;
}

static void walk_layout(const uint8_t *p, layout_t *l) {
    memset(l, 0, sizeof *l);
    uint64_t n_tensors = le(p + 8, 8), n_kv = le(p + 16, 8);
    for (size_t o = 0; o <= 24; o += 4) lay_mark(l, o);
    size_t pos = 24;
    l->first_key_len = pos;
    for (uint64_t i = 0; i < n_kv; i++) {
        lay_mark(l, pos);
        pos += 8 + le(p + pos, 8);
        lay_mark(l, pos);
        uint32_t t = (uint32_t)le(p + pos, 4);
        pos += 4;
        lay_mark(l, pos);
        pos = walk_value(p, pos, t, l, false);
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        lay_mark(l, pos);
        pos += 8 + le(p + pos, 8);
        lay_mark(l, pos);
        uint32_t nd = (uint32_t)le(p + pos, 4);
        pos += 4;
        if (i == 0) l->first_dim = pos;
        for (uint32_t d = 0; d < nd; d++, pos += 8) lay_mark(l, pos);
        lay_mark(l, pos);
        if (i == 0) l->first_ttype = pos;
        pos += 4;
        lay_mark(l, pos);
        if (i == 0) l->first_toff = pos;
        l->last_toff = pos;
        pos += 8;
    }
    lay_mark(l, pos);
    l->header_end = pos;
}

// Deterministic xorshift64* generator.
static uint64_t rng_next(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

// End of the bytes a successful open needs: the header, and every tensor's data.
static size_t required_end(const gguf_t *g, const layout_t *l) {
    size_t end = l->header_end;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        size_t e = gguf_data_offset(g) + (size_t)t->offset + t->nbytes;
        if (e > end) end = e;
    }
    return end;
}

// --- tests: real files

static void test_open_all_models(void) {
    char models[1024];
    test_shared_path(models, sizeof models, "models");
    char **paths = NULL;
    size_t n = 0;
    list_gguf(models, &paths, &n);
    CU_ASSERT(n >= 20);
    int opened = 0, refused_v1 = 0;
    for (size_t i = 0; i < n; i++) {
        gguf_t *g = NULL;
        char err[512] = "";
        int rc = gguf_open(&g, paths[i], err, sizeof err);
        if (strstr(paths[i], "legacy/tinyllamas-stories-260k-f32.gguf")) {
            CU_ASSERT_EQUAL(rc, MLM_EUNSUPPORTED);
            CU_ASSERT_PTR_NULL(g);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "version 1"));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, paths[i]));
            refused_v1++;
        } else {
            if (rc) fprintf(stderr, "\n  %s: %s\n", paths[i], err);
            CU_ASSERT_EQUAL_FATAL(rc, 0);
            CU_ASSERT_STRING_EQUAL(gguf_path(g), paths[i]);
            CU_ASSERT(gguf_version(g) == 2 || gguf_version(g) == 3);
            CU_ASSERT_EQUAL(check_invariants(g), 0);
            struct stat st;
            CU_ASSERT(stat(paths[i], &st) == 0 && (size_t)st.st_size == gguf_file_size(g));
            if (strstr(paths[i], "/vocab/")) CU_ASSERT_EQUAL(gguf_n_tensors(g), 0);
            opened++;
        }
        gguf_close(&g);
        CU_ASSERT_PTR_NULL(g);
        free(paths[i]);
    }
    free(paths);
    CU_ASSERT_EQUAL(refused_v1, 1);
    CU_ASSERT(opened >= 19);
}

static void test_stories260k(void) {
    char path[1024];
    gguf_t *g = NULL;
    char err[512] = "";
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/stories260K.gguf"), err,
                                    sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_version(g), 3);
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 48);
    CU_ASSERT_EQUAL(gguf_n_kv(g), 19);
    CU_ASSERT_EQUAL(gguf_file_size(g), 1185376);
    CU_ASSERT_EQUAL(gguf_alignment(g), 32);
    CU_ASSERT_EQUAL(gguf_data_offset(g), 14176);
    uint32_t u32 = 0;
    CU_ASSERT_EQUAL(gguf_get_u32(g, "llama.block_count", &u32), 0);
    CU_ASSERT_EQUAL(u32, 5);
    CU_ASSERT_EQUAL(gguf_get_u32(g, "llama.embedding_length", &u32), 0);
    CU_ASSERT_EQUAL(u32, 64);
    uint64_t u64 = 0;
    CU_ASSERT_EQUAL(gguf_get_u64(g, "llama.feed_forward_length", &u64), 0);
    CU_ASSERT_EQUAL(u64, 172);
    int64_t i64 = 0;
    CU_ASSERT_EQUAL(gguf_get_i64(g, "llama.attention.head_count_kv", &i64), 0);
    CU_ASSERT_EQUAL(i64, 4);
    float f = 0;
    CU_ASSERT_EQUAL(gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f), 0);
    CU_ASSERT_EQUAL(f, 1e-5f);
    CU_ASSERT_EQUAL(gguf_get_f32(g, "llama.context_length", &f), 0);  // integer -> float
    CU_ASSERT_EQUAL(f, 2048.0f);
    const char *s = NULL;
    size_t len = 0;
    CU_ASSERT_EQUAL(gguf_get_str(g, "general.architecture", &s, &len), 0);
    CU_ASSERT(len == 5 && memcmp(s, "llama", 5) == 0);
    CU_ASSERT_EQUAL(gguf_get_u32(g, "no.such.key", &u32), MLM_ENOTFOUND);
    CU_ASSERT_EQUAL(gguf_get_str(g, "llama.block_count", &s, &len), MLM_EFORMAT);
    CU_ASSERT_EQUAL(gguf_get_u32(g, "general.architecture", &u32), MLM_EFORMAT);
    bool b;
    CU_ASSERT_EQUAL(gguf_get_bool(g, "llama.block_count", &b), MLM_EFORMAT);

    const gguf_value_t *tok = gguf_find(g, "tokenizer.ggml.tokens");
    CU_ASSERT_PTR_NOT_NULL_FATAL(tok);
    CU_ASSERT_EQUAL(tok->type, GGUF_VT_ARRAY);
    CU_ASSERT_EQUAL(tok->v.arr.type, GGUF_VT_STRING);
    CU_ASSERT_EQUAL(tok->v.arr.n, 512);
    CU_ASSERT_PTR_NULL(tok->v.arr.raw);
    CU_ASSERT(tok->v.arr.items[1].v.str.len == 3 && memcmp(tok->v.arr.items[1].v.str.ptr, "<s>", 3) == 0);
    CU_ASSERT_EQUAL(gguf_arr_i64(tok, 0, &i64), MLM_EFORMAT);  // strings are not numbers
    char buf[256];
    int n = gguf_value_format(tok, buf, sizeof buf, 3);
    CU_ASSERT_STRING_EQUAL(buf, "[\"<unk>\", \"<s>\", \"</s>\", ... (512 items)]");
    CU_ASSERT_EQUAL(n, (int)strlen(buf));

    const gguf_value_t *tt = gguf_find(g, "tokenizer.ggml.token_type");
    CU_ASSERT_PTR_NOT_NULL_FATAL(tt);
    CU_ASSERT_EQUAL(tt->v.arr.type, GGUF_VT_INT32);
    CU_ASSERT_EQUAL(gguf_arr_i64(tt, 0, &i64), 0);
    CU_ASSERT_EQUAL(i64, 2);  // <unk> is UNKNOWN
    CU_ASSERT_EQUAL(gguf_arr_i64(tt, 3, &i64), 0);
    CU_ASSERT_EQUAL(i64, 6);  // <0x00> is BYTE
    CU_ASSERT_EQUAL(gguf_arr_i64(tt, 512, &i64), MLM_ERANGE);
    CU_ASSERT_EQUAL(gguf_arr_f32(tt, 1, &f), 0);
    CU_ASSERT_EQUAL(f, 3.0f);
    const gguf_value_t *sc = gguf_find(g, "tokenizer.ggml.scores");
    CU_ASSERT_PTR_NOT_NULL_FATAL(sc);
    CU_ASSERT_EQUAL(sc->v.arr.type, GGUF_VT_FLOAT32);
    CU_ASSERT_EQUAL(sc->v.arr.n, 512);
    CU_ASSERT_EQUAL(gguf_arr_f32(sc, 511, &f), 0);
    CU_ASSERT_EQUAL(gguf_arr_f32(sc, 512, &f), MLM_ERANGE);

    const gguf_tensor_t *t = gguf_find_tensor(g, "token_embd.weight");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL(t->type, QT_F32);
    CU_ASSERT_EQUAL(t->n_dims, 2);
    CU_ASSERT_EQUAL(t->ne[0], 64);
    CU_ASSERT_EQUAL(t->ne[1], 512);
    CU_ASSERT_EQUAL(t->ne[2], 1);
    CU_ASSERT_EQUAL(t->nbytes, 64 * 512 * 4);
    CU_ASSERT_EQUAL(gguf_tensor_nelements(t), 64 * 512);
    CU_ASSERT_PTR_EQUAL(t->data, (const uint8_t *)gguf_base(g) + gguf_data_offset(g) + t->offset);
    CU_ASSERT_PTR_EQUAL(gguf_tensor(g, 0), t);
    CU_ASSERT_PTR_NULL(gguf_tensor(g, 48));
    CU_ASSERT_PTR_NULL(gguf_tensor(g, -1));
    CU_ASSERT_PTR_NULL(gguf_find_tensor(g, "token_embd"));
    const gguf_tensor_t *last = gguf_tensor(g, 47);
    CU_ASSERT_STRING_EQUAL(last->name, "blk.4.ffn_norm.weight");
    // the last tensor ends exactly at the end of the file
    CU_ASSERT_EQUAL(gguf_data_offset(g) + last->offset + last->nbytes, gguf_file_size(g));
    int64_t params = 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) params += gguf_tensor_nelements(gguf_tensor(g, i));
    CU_ASSERT_EQUAL(params, 292800);
    gguf_close(&g);
}

static void test_other_models(void) {
    char path[1024], err[512];
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/llama-2-tiny-random.gguf"), err,
                                    sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 12);
    CU_ASSERT_EQUAL(gguf_n_kv(g), 18);
    const gguf_value_t *tok = gguf_find(g, "tokenizer.ggml.tokens");
    CU_ASSERT(tok && tok->type == GGUF_VT_ARRAY && tok->v.arr.type == GGUF_VT_STRING && tok->v.arr.n == 32000);
    const gguf_tensor_t *t = gguf_find_tensor(g, "token_embd.weight");
    CU_ASSERT(t && t->type == QT_F16 && t->ne[0] == 8 && t->ne[1] == 32000 && t->nbytes == 8 * 32000 * 2);
    uint32_t ft = 0;
    CU_ASSERT(gguf_get_u32(g, "general.file_type", &ft) == 0 && ft == 1);
    gguf_close(&g);

    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/synth/synth-dense-Q4_K_M.gguf"),
                                    err, sizeof err), 0);
    int q4k = 0, q6k = 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *x = gguf_tensor(g, i);
        if (x->type == QT_Q4_K) {
            q4k++;
            CU_ASSERT_EQUAL(x->nbytes, (size_t)(x->ne[0] / 256) * 144 * (size_t)x->ne[1]);
        }
        if (x->type == QT_Q6_K) {
            q6k++;
            CU_ASSERT_EQUAL(x->nbytes, (size_t)(x->ne[0] / 256) * 210 * (size_t)x->ne[1]);
        }
    }
    CU_ASSERT(q4k > 0);
    CU_ASSERT(q6k > 0);
    gguf_close(&g);

    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/vocab/ggml-vocab-gpt-2.gguf"),
                                    err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 0);
    tok = gguf_find(g, "tokenizer.ggml.tokens");
    CU_ASSERT(tok && tok->v.arr.n == 50257);
    const gguf_value_t *merges = gguf_find(g, "tokenizer.ggml.merges");
    CU_ASSERT(merges && merges->v.arr.type == GGUF_VT_STRING && merges->v.arr.n == 50000);
    // "Ġ t": UTF-8 kept as is by the formatter
    char buf[64];
    gguf_value_format(&merges->v.arr.items[0], buf, sizeof buf, 8);
    CU_ASSERT_STRING_EQUAL(buf, "\"\xc4\xa0 t\"");
    gguf_close(&g);

    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/vocab/ggml-vocab-llama-spm.gguf"),
                                    err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 0);
    bool add_bos = false;
    CU_ASSERT(gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos) == 0 && add_bos);
    gguf_close(&g);
}

// The one value-size table the reader and the writer share, against the format's (the table above).
static void test_vtype_size(void) {
    for (int t = -1; t <= GGUF_VT_COUNT + 1; t++) CU_ASSERT_EQUAL(gguf_vtype_size(t), vt_size((uint32_t)t));
    CU_ASSERT_EQUAL(gguf_vtype_size(GGUF_VT_FLOAT64), 8);
    CU_ASSERT_EQUAL(gguf_vtype_size(GGUF_VT_BOOL), 1);
    CU_ASSERT_EQUAL(gguf_vtype_size(GGUF_VT_STRING), 0);
}

static void test_open_errors(void) {
    gguf_t *g = NULL;
    char err[512] = "";
    CU_ASSERT_EQUAL(gguf_open(&g, "/nonexistent/dir/model.gguf", err, sizeof err), MLM_EIO);
    CU_ASSERT_PTR_NULL(g);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "/nonexistent/dir/model.gguf"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, strerror(ENOENT))); // and the system's reason
    CU_ASSERT_EQUAL(gguf_open(&g, test_shared_dir(), err, sizeof err), MLM_EIO);  // a directory
    CU_ASSERT_PTR_NOT_NULL(strstr(err, test_shared_dir()));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, strerror(EISDIR)));

    // a truncated copy on disk: the message names the path
    size_t len = 0;
    uint8_t *buf = load_model("models/stories260K.gguf", &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char path[1024];
    snprintf(path, sizeof path, "%s/truncated.gguf", dir);
    FILE *f = fopen(path, "wb");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    CU_ASSERT_EQUAL(fwrite(buf, 1, len / 2, f), len / 2);
    fclose(f);
    CU_ASSERT_EQUAL(gguf_open(&g, path, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT_PTR_NULL(g);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, path));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "at offset"));
    // an empty file
    f = fopen(path, "wb");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fclose(f);
    CU_ASSERT_EQUAL(gguf_open(&g, path, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, path));
    unlink(path);
    rmdir(dir);
    free(dir);
    free(buf);

    // NULL-safety
    gguf_close(&g);
    gguf_close(NULL);
    CU_ASSERT_EQUAL(gguf_open_mem(&g, NULL, 0, NULL, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "<memory>"));
    CU_ASSERT_EQUAL(gguf_open_mem(NULL, "GGUF", 4, "x", err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_n_kv(NULL), 0);
    CU_ASSERT_PTR_NULL(gguf_find(NULL, "a"));
    CU_ASSERT_PTR_NULL(gguf_find_tensor(NULL, "a"));
}

static void test_close_twice(void) {
    char path[1024], err[256];
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/stories260K.gguf"), err,
                                    sizeof err), 0);
    gguf_t *copy = g;
    (void)copy;
    gguf_close(&g);
    CU_ASSERT_PTR_NULL(g);
    gguf_close(&g);  // second close of the NULLed pointer is a no-op
    CU_ASSERT_PTR_NULL(g);
}

// --- tests: hand-built files

// A valid v3 file with every value kind and two tensors.
static void build_good(bb_t *b) {
    bb_hdr(b, 3, 2, 9);
    bb_kv_str(b, "general.architecture", "llama");
    bb_kv_u32(b, "general.alignment", 64);
    bb_str(b, "a.ints");  // int16 array
    bb_u32(b, GGUF_VT_ARRAY);
    bb_u32(b, GGUF_VT_INT16);
    bb_u64(b, 10);
    for (int i = 1; i <= 10; i++) bb_put(b, (uint8_t[]){(uint8_t)(i * -1), 0xff}, 2);  // -1 .. -10
    bb_str(b, "a.nested");  // [[1, 2], [3]] as uint8
    bb_u32(b, GGUF_VT_ARRAY);
    bb_u32(b, GGUF_VT_ARRAY);
    bb_u64(b, 2);
    bb_u32(b, GGUF_VT_UINT8);
    bb_u64(b, 2);
    bb_u8(b, 1);
    bb_u8(b, 2);
    bb_u32(b, GGUF_VT_UINT8);
    bb_u64(b, 1);
    bb_u8(b, 3);
    bb_str(b, "a.text");
    bb_u32(b, GGUF_VT_STRING);
    bb_str(b, "q\"b\\c\n\x01\xc3\xa9\xff");
    bb_str(b, "a.neg");
    bb_u32(b, GGUF_VT_INT8);
    bb_u8(b, 0xfb);  // -5
    bb_str(b, "a.big");
    bb_u32(b, GGUF_VT_UINT64);
    bb_u64(b, UINT64_MAX);
    bb_str(b, "a.flag");
    bb_u32(b, GGUF_VT_BOOL);
    bb_u8(b, 1);
    bb_str(b, "a.f64");
    bb_u32(b, GGUF_VT_FLOAT64);
    double d = 0.1;
    bb_put(b, &d, 8);
    bb_tinfo(b, "w", 2, (uint64_t[]){4, 2}, QT_F32, 0);
    bb_tinfo(b, "q", 1, (uint64_t[]){64}, QT_Q4_0, 64);
    bb_data(b, 64, 64 + 36);
}

static void test_hand_good(void) {
    bb_t b = {0};
    build_good(&b);
    gguf_t *g = NULL;
    char err[512];
    int rc = bb_open(&b, &g, err, sizeof err);
    if (rc) fprintf(stderr, "\n  %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(gguf_alignment(g), 64);
    CU_ASSERT_EQUAL(gguf_data_offset(g) % 64, 0);
    CU_ASSERT_EQUAL(gguf_data_offset(g) + 64 + 36, b.n);
    CU_ASSERT_EQUAL(check_invariants(g), 0);
    char buf[256];
    CU_ASSERT_EQUAL(gguf_value_format(gguf_find(g, "a.ints"), buf, sizeof buf, 3), 28);
    CU_ASSERT_STRING_EQUAL(buf, "[-1, -2, -3, ... (10 items)]");
    gguf_value_format(gguf_find(g, "a.ints"), buf, sizeof buf, 0);
    CU_ASSERT_STRING_EQUAL(buf, "[... (10 items)]");
    gguf_value_format(gguf_find(g, "a.ints"), buf, sizeof buf, -1);
    CU_ASSERT_STRING_EQUAL(buf, "[-1, -2, -3, -4, -5, -6, -7, -8, -9, -10]");
    gguf_value_format(gguf_find(g, "a.nested"), buf, sizeof buf, 8);
    CU_ASSERT_STRING_EQUAL(buf, "[[1, 2], [3]]");
    gguf_value_format(gguf_find(g, "a.text"), buf, sizeof buf, 8);
    CU_ASSERT_STRING_EQUAL(buf, "\"q\\\"b\\\\c\\n\\x01\xc3\xa9\\xff\"");
    gguf_value_format(gguf_find(g, "a.f64"), buf, sizeof buf, 8);
    CU_ASSERT_STRING_EQUAL(buf, "0.1");
    gguf_value_format(gguf_find(g, "a.flag"), buf, sizeof buf, 8);
    CU_ASSERT_STRING_EQUAL(buf, "true");
    gguf_value_format(gguf_find(g, "a.big"), buf, sizeof buf, 8);
    CU_ASSERT_STRING_EQUAL(buf, "18446744073709551615");
    // truncating output behaves like snprintf
    char small[5];
    CU_ASSERT_EQUAL(gguf_value_format(gguf_find(g, "a.big"), small, sizeof small, 8), 20);
    CU_ASSERT_STRING_EQUAL(small, "1844");
    CU_ASSERT_EQUAL(gguf_value_format(gguf_find(g, "a.big"), NULL, 0, 8), 20);

    int64_t i64 = 0;
    uint64_t u64 = 0;
    uint32_t u32 = 0;
    float f = 0;
    bool bo = false;
    CU_ASSERT(gguf_get_i64(g, "a.neg", &i64) == 0 && i64 == -5);
    CU_ASSERT_EQUAL(gguf_get_u64(g, "a.neg", &u64), MLM_EFORMAT);
    CU_ASSERT_EQUAL(gguf_get_u32(g, "a.big", &u32), MLM_EFORMAT);
    CU_ASSERT_EQUAL(gguf_get_i64(g, "a.big", &i64), MLM_EFORMAT);
    CU_ASSERT(gguf_get_u64(g, "a.big", &u64) == 0 && u64 == UINT64_MAX);
    CU_ASSERT(gguf_get_f32(g, "a.neg", &f) == 0 && f == -5.0f);
    CU_ASSERT(gguf_get_f32(g, "a.f64", &f) == 0 && f == 0.1f);
    CU_ASSERT_EQUAL(gguf_get_f32(g, "a.text", &f), MLM_EFORMAT);
    CU_ASSERT(gguf_get_bool(g, "a.flag", &bo) == 0 && bo);
    const gguf_value_t *ints = gguf_find(g, "a.ints");
    CU_ASSERT(gguf_arr_i64(ints, 9, &i64) == 0 && i64 == -10);
    gguf_value_t e;
    CU_ASSERT(gguf_arr_get(ints, 4, &e) == 0 && e.type == GGUF_VT_INT16 && e.v.i == -5);
    CU_ASSERT_EQUAL(gguf_arr_get(gguf_find(g, "a.nested"), 0, &e), MLM_EFORMAT);
    CU_ASSERT_EQUAL(gguf_arr_i64(gguf_find(g, "a.flag"), 0, &i64), MLM_EFORMAT);  // not an array

    const gguf_tensor_t *q = gguf_find_tensor(g, "q");
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    CU_ASSERT_EQUAL(q->nbytes, 36);
    CU_ASSERT_EQUAL(((const uint8_t *)q->data)[0], 64);  // data byte i holds i & 0xff
    CU_ASSERT_STRING_EQUAL(gguf_vtype_name(GGUF_VT_FLOAT32), "float32");
    CU_ASSERT_STRING_EQUAL(gguf_vtype_name(99), "unknown");
    gguf_close(&g);
    free(b.p);
}

static void test_hand_versions(void) {
    bb_t b = {0};
    bb_hdr(&b, 1, 0, 0);
    expect_fail(&b, MLM_EUNSUPPORTED, "version 1 is not supported");
    b.n = 0;
    bb_put(&b, "GGUF", 4);
    bb_put(&b, (uint8_t[]){0, 0, 0, 3}, 4);  // big-endian 3
    bb_u64(&b, 0);
    bb_u64(&b, 0);
    expect_fail(&b, MLM_EUNSUPPORTED, "big-endian");
    b.n = 0;
    bb_hdr(&b, 4, 0, 0);
    expect_fail(&b, MLM_EUNSUPPORTED, "version 4");
    b.n = 0;
    bb_hdr(&b, 0, 0, 0);
    expect_fail(&b, MLM_EFORMAT, "version 0");
    b.n = 0;
    bb_put(&b, "GGML", 4);
    bb_u32(&b, 3);
    expect_fail(&b, MLM_EFORMAT, "magic at offset 0");
    b.n = 0;
    bb_put(&b, "GG", 2);
    expect_fail(&b, MLM_EFORMAT, "too short");
    b.n = 0;
    bb_hdr(&b, 2, 0, 1);  // version 2 is the same layout
    bb_kv_u32(&b, "x", 7);
    gguf_t *g = NULL;
    char err[256];
    CU_ASSERT_EQUAL(bb_open(&b, &g, err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_version(g), 2);
    CU_ASSERT_EQUAL(gguf_data_offset(g), b.n);  // no tensors: clamped to the file size
    gguf_close(&g);
    free(b.p);
}

static void test_hand_metadata_errors(void) {
    bb_t b = {0};
    bb_hdr(&b, 3, 0, 1);
    bb_kv_u32(&b, "general.alignment", 48);
    expect_fail(&b, MLM_EFORMAT, "power of two");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_kv_u32(&b, "general.alignment", 0);
    expect_fail(&b, MLM_EFORMAT, "power of two");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_kv_str(&b, "general.alignment", "32");
    expect_fail(&b, MLM_EFORMAT, "'general.alignment' value");
    b.n = 0;
    bb_hdr(&b, 3, 0, 2);
    bb_kv_u32(&b, "k", 1);
    bb_kv_u32(&b, "k", 2);
    expect_fail(&b, MLM_EFORMAT, "kv[1] 'k' key at offset 41: duplicate key (first at kv[0])");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_strn(&b, "a\0b", 3);
    bb_u32(&b, GGUF_VT_UINT8);
    bb_u8(&b, 0);
    expect_fail(&b, MLM_EFORMAT, "NUL");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k");
    bb_u32(&b, 13);
    bb_u8(&b, 0);
    expect_fail(&b, MLM_EFORMAT, "unknown value type 13");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k");
    bb_u32(&b, GGUF_VT_BOOL);
    bb_u8(&b, 2);
    expect_fail(&b, MLM_EFORMAT, "not 0 or 1");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k");
    bb_u32(&b, GGUF_VT_ARRAY);
    bb_u32(&b, 77);
    bb_u64(&b, 0);
    expect_fail(&b, MLM_EFORMAT, "unknown array element type 77");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k");
    bb_u32(&b, GGUF_VT_STRING);
    bb_u64(&b, 100);
    bb_put(&b, "short", 5);
    expect_fail(&b, MLM_EFORMAT, "string length 100 exceeds the 5 bytes left");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1);
    bb_str(&b, "k");
    bb_u32(&b, GGUF_VT_ARRAY);
    bb_u32(&b, GGUF_VT_UINT32);
    bb_u64(&b, 3);
    bb_u32(&b, 1);
    bb_u32(&b, 2);
    expect_fail(&b, MLM_EFORMAT, "kv[0] 'k' value at offset 41: array of 3 uint32 cannot fit");
    b.n = 0;
    bb_hdr(&b, 3, 0, 1000);
    bb_kv_u32(&b, "k", 1);
    expect_fail(&b, MLM_EFORMAT, "n_kv at offset 16");

    // nesting: GGUF_MAX_ARRAY_DEPTH levels are fine, one more is refused
    for (int depth = GGUF_MAX_ARRAY_DEPTH; depth <= GGUF_MAX_ARRAY_DEPTH + 1; depth++) {
        b.n = 0;
        bb_hdr(&b, 3, 0, 1);
        bb_str(&b, "deep");
        bb_u32(&b, GGUF_VT_ARRAY);
        for (int k = 0; k < depth - 1; k++) {
            bb_u32(&b, GGUF_VT_ARRAY);
            bb_u64(&b, 1);
        }
        bb_u32(&b, GGUF_VT_UINT8);
        bb_u64(&b, 1);
        bb_u8(&b, 9);
        if (depth == GGUF_MAX_ARRAY_DEPTH) {
            gguf_t *g = NULL;
            char err[256];
            CU_ASSERT_EQUAL(bb_open(&b, &g, err, sizeof err), 0);
            char buf[64];
            gguf_value_format(gguf_find(g, "deep"), buf, sizeof buf, 8);
            CU_ASSERT_STRING_EQUAL(buf, "[[[[[[[[9]]]]]]]]");
            gguf_close(&g);
        } else {
            expect_fail(&b, MLM_EFORMAT, "nested more than 8 deep");
        }
    }
    free(b.p);
}

static void test_hand_tensor_errors(void) {
    bb_t b = {0};
    bb_hdr(&b, 3, 2, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, QT_F32, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, QT_F32, 32);
    bb_data(&b, 32, 64);
    expect_fail(&b, MLM_EFORMAT, "tensor[1] 'w' name at offset 57: duplicate tensor name (first at tensor[0])");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 5, (uint64_t[]){1, 1, 1, 1, 1}, QT_F32, 0);
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EFORMAT, "n_dims is 5");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, 99, 0);
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EUNSUPPORTED, "tensor[0] 'w' type at offset");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, 4, 0);  // Q4_2, removed from the format
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EUNSUPPORTED, "unknown tensor type id 4");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 2, (uint64_t[]){33, 1}, QT_Q4_0, 0);
    bb_data(&b, 32, 64);
    expect_fail(&b, MLM_EFORMAT, "row length 33 is not a multiple of the Q4_0 block size 32");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "blk.0.attn_q.weight", 2, (uint64_t[]){1ull << 32, 1ull << 32}, QT_F32, 0);
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EFORMAT, "tensor[0] 'blk.0.attn_q.weight' dims at offset 63: element count overflows");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 2, (uint64_t[]){1ull << 62, 1}, QT_F32, 0);
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EFORMAT, "byte size overflows");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){UINT64_MAX}, QT_F32, 0);
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EFORMAT, "negative");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, QT_F32, 16);
    bb_data(&b, 32, 64);
    expect_fail(&b, MLM_EFORMAT, "not a multiple of the alignment 32");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){16}, QT_F32, 0);
    bb_data(&b, 32, 63);
    expect_fail(&b, MLM_EFORMAT, "runs past the end");
    b.n = 0;
    bb_hdr(&b, 3, 2, 0);
    bb_tinfo(&b, "a", 1, (uint64_t[]){16}, QT_F32, 0);
    bb_tinfo(&b, "b", 1, (uint64_t[]){8}, QT_F32, 32);
    bb_data(&b, 32, 96);
    expect_fail(&b, MLM_EFORMAT, "tensor[1] 'b' offset at offset 82: data overlaps tensor[0] 'a'");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, QT_F32, 0);  // data section missing entirely
    expect_fail(&b, MLM_EFORMAT, "past the end of the file");
    b.n = 0;
    bb_hdr(&b, 3, 1, 0);
    bb_tinfo(&b, "w\x1b", 0, NULL, QT_F32, 0);
    bb_data(&b, 32, 32);
    expect_fail(&b, MLM_EFORMAT, "tensor[0] 'w\\x1b' n_dims");
    b.n = 0;
    bb_hdr(&b, 3, 1ull << 40, 0);
    expect_fail(&b, MLM_EFORMAT, "n_tensors at offset 8");

    // a zero-sized tensor is valid and sits inside the file
    b.n = 0;
    bb_hdr(&b, 3, 2, 0);
    bb_tinfo(&b, "empty", 2, (uint64_t[]){0, 4}, QT_F32, 0);
    bb_tinfo(&b, "w", 1, (uint64_t[]){8}, QT_F32, 0);
    bb_data(&b, 32, 32);
    gguf_t *g = NULL;
    char err[256];
    CU_ASSERT_EQUAL(bb_open(&b, &g, err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_tensor_nelements(gguf_find_tensor(g, "empty")), 0);
    CU_ASSERT_EQUAL(check_invariants(g), 0);
    gguf_close(&g);
    free(b.p);
}

// --- tests: corrupted copies of real files

typedef struct {
    const char *rel;         // path under shared/
    int mutations;           // random bit flips / byte overwrites to try
} corrupt_case_t;

static const corrupt_case_t corrupt_cases[] = {
    {"models/stories260K.gguf", 250},
    {"models/llama-2-tiny-random.gguf", 120},
    {"models/derived/stories260K-Q4_0.gguf", 250},
    {"models/synth/synth-dense-Q4_K_M.gguf", 250},
    {"models/vocab/ggml-vocab-gpt-2.gguf", 40},
};

// Opens an exact-size copy of buf[0, len) (so ASan sees any over-read); returns the code.
static int open_copy(const uint8_t *buf, size_t len, const char *name, char *err, size_t errlen) {
    uint8_t *copy = malloc(len ? len : 1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(copy);
    memcpy(copy, buf, len);
    gguf_t *g = NULL;
    int rc = gguf_open_mem(&g, copy, len, name, err, errlen);
    if (rc == 0) CU_ASSERT_EQUAL(check_invariants(g), 0);
    gguf_close(&g);
    free(copy);
    return rc;
}

static void truncations(const uint8_t *buf, size_t len, const char *name, const layout_t *l, size_t need,
                        uint64_t *seed, int *n_tested) {
    // candidate lengths: every field boundary (sampled evenly when there are many) and its neighbours,
    // the data section edges, and random cuts
    size_t cand[560];
    size_t nc = 0;
    size_t step = l->n / 150 + 1;
    for (size_t k = 0; k < l->n && nc + 3 <= 450; k += (k < 64 ? 1 : step)) {
        cand[nc++] = l->at[k];
        cand[nc++] = l->at[k] + 1;
        if (l->at[k]) cand[nc++] = l->at[k] - 1;
    }
    cand[nc++] = need - 1;
    cand[nc++] = need > 4096 ? need - 4096 : 0;
    cand[nc++] = len - 1;
    for (int k = 0; k < 100; k++) cand[nc++] = (size_t)(rng_next(seed) % len);
    char err[512];
    for (size_t k = 0; k < nc; k++) {
        size_t cut = cand[k];
        if (cut >= len) continue;
        err[0] = '\0';
        int rc = open_copy(buf, cut, name, err, sizeof err);
        if (cut < need) {
            if (rc != MLM_EFORMAT) fprintf(stderr, "\n  %s cut at %zu: rc %d (%s)\n", name, cut, rc, err);
            CU_ASSERT_EQUAL(rc, MLM_EFORMAT);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, name));
        } else {
            CU_ASSERT_EQUAL(rc, 0);
        }
        (*n_tested)++;
    }
}

static void mutations(uint8_t *buf, size_t len, const char *name, const layout_t *l, int count, uint64_t *seed,
                      int *n_tested) {
    char err[512];
    for (int k = 0; k < count; k++) {
        uint64_t r = rng_next(seed);
        // half the time hit a field start (where lengths and counts live), else anywhere in the header
        size_t pos = (r & 1) ? l->at[(r >> 1) % l->n] + (size_t)((r >> 40) % 8) : (size_t)((r >> 1) % l->header_end);
        if (pos >= len) continue;
        uint8_t old = buf[pos];
        if (r & 2)
            buf[pos] ^= (uint8_t)(1u << ((r >> 33) % 8));
        else
            buf[pos] = (uint8_t)(r >> 48);
        err[0] = '\0';
        gguf_t *g = NULL;
        int rc = gguf_open_mem(&g, buf, len, name, err, sizeof err);
        if (rc == 0) {
            CU_ASSERT_EQUAL(check_invariants(g), 0);
        } else {
            CU_ASSERT(rc == MLM_EFORMAT || rc == MLM_EUNSUPPORTED);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, name));
        }
        gguf_close(&g);
        buf[pos] = old;
        (*n_tested)++;
    }
}

static void put_le(uint8_t *p, size_t n, uint64_t v) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void targeted(uint8_t *buf, size_t len, const char *name, const layout_t *l, int *n_tested) {
    struct {
        size_t at;           // field offset (0 = absent)
        size_t width;        // bytes
    } fields[] = {
        {8, 8}, {16, 8}, {l->first_key_len, 8}, {l->first_arr_count, 8},
        {l->first_dim, 8}, {l->first_ttype, 4}, {l->first_toff, 8}, {l->last_toff, 8},
    };
    const uint64_t huge8[] = {UINT64_MAX, 1ull << 63, (1ull << 63) - 1, 1ull << 62, 1ull << 40,
                              (uint64_t)len * 2 + 64};
    const uint64_t huge4[] = {UINT32_MAX, 0x7fffffffu, 1000, 19, 40};
    char err[512];
    for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) {
        if (!fields[f].at) continue;
        uint8_t old[8];
        memcpy(old, buf + fields[f].at, fields[f].width);
        size_t nv = fields[f].width == 8 ? sizeof huge8 / sizeof huge8[0] : sizeof huge4 / sizeof huge4[0];
        for (size_t k = 0; k < nv; k++) {
            put_le(buf + fields[f].at, fields[f].width, fields[f].width == 8 ? huge8[k] : huge4[k]);
            err[0] = '\0';
            gguf_t *g = NULL;
            int rc = gguf_open_mem(&g, buf, len, name, err, sizeof err);
            if (rc != MLM_EFORMAT && rc != MLM_EUNSUPPORTED)
                fprintf(stderr, "\n  %s field at %zu = huge #%zu: rc %d\n", name, fields[f].at, k, rc);
            CU_ASSERT(rc == MLM_EFORMAT || rc == MLM_EUNSUPPORTED);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, name));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, " at offset "));
            gguf_close(&g);
            (*n_tested)++;
        }
        memcpy(buf + fields[f].at, old, fields[f].width);
    }
}

static void test_corruption(void) {
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    int n_tested = 0;
    for (size_t c = 0; c < sizeof corrupt_cases / sizeof corrupt_cases[0]; c++) {
        size_t len = 0;
        uint8_t *file = load_model(corrupt_cases[c].rel, &len);
        CU_ASSERT_PTR_NOT_NULL_FATAL(file);
        uint8_t *buf = malloc(len);  // exact size, so ASan sees a read one past the end
        CU_ASSERT_PTR_NOT_NULL_FATAL(buf);
        memcpy(buf, file, len);
        free(file);
        const char *name = strrchr(corrupt_cases[c].rel, '/') + 1;
        gguf_t *g = NULL;
        char err[512];
        CU_ASSERT_EQUAL_FATAL(gguf_open_mem(&g, buf, len, name, err, sizeof err), 0);
        layout_t l;
        walk_layout(buf, &l);
        CU_ASSERT_EQUAL(gguf_data_offset(g), gguf_n_tensors(g) ? (l.header_end + 31) / 32 * 32 : len);
        size_t need = required_end(g, &l);
        gguf_close(&g);
        CU_ASSERT(need <= len);

        truncations(buf, len, name, &l, need, &seed, &n_tested);
        mutations(buf, len, name, &l, corrupt_cases[c].mutations, &seed, &n_tested);
        targeted(buf, len, name, &l, &n_tested);
        // the buffer is restored after every mutation: it still opens
        CU_ASSERT_EQUAL(gguf_open_mem(&g, buf, len, name, err, sizeof err), 0);
        gguf_close(&g);
        free(l.at);
        free(buf);
    }
    CU_ASSERT(n_tested >= 1000);
}

// --- suite

int test_gguf_suite(void) {
    CU_pSuite s = CU_add_suite("gguf", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "open every shared model", test_open_all_models) ||
        !CU_add_test(s, "stories260K values", test_stories260k) ||
        !CU_add_test(s, "tiny llama, Q4_K_M, vocab files", test_other_models) ||
        !CU_add_test(s, "open errors and NULL safety", test_open_errors) ||
        !CU_add_test(s, "value type sizes", test_vtype_size) ||
        !CU_add_test(s, "close twice", test_close_twice) ||
        !CU_add_test(s, "hand-built file: values and format", test_hand_good) ||
        !CU_add_test(s, "hand-built: versions", test_hand_versions) ||
        !CU_add_test(s, "hand-built: metadata errors", test_hand_metadata_errors) ||
        !CU_add_test(s, "hand-built: tensor errors", test_hand_tensor_errors) ||
        !CU_add_test(s, "corrupted copies", test_corruption))
        return -1;
    return 0;
}
