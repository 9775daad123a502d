// Model slices: the row-cut rule for each llama tensor, and shard files (GGUF with only a node's rows).
#include "parallel/shard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "worker/format/gguf_write.h"

// --- helpers

static bool ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

#define N_KEYS 12
#define N_KEYS_V1 10 // files written before pipeline stages have no l0/l1

static const char *const slice_keys[N_KEYS] = {"h0", "h1", "kv0", "kv1", "e0", "e1", "f0", "f1", "v0", "v1", "l0", "l1"};

static int *slice_field(shard_slice_t *s, int i) {
    int *f[N_KEYS] = {&s->h0, &s->h1, &s->kv0, &s->kv1, &s->e0, &s->e1, &s->f0, &s->f1, &s->v0, &s->v1, &s->l0, &s->l1};
    return f[i];
}

// The block index of a "blk.N." tensor name, or -1.
static int block_of(const char *name) {
    if (strncmp(name, "blk.", 4) != 0) return -1;
    char *end;
    long v = strtol(name + 4, &end, 10);
    return end != name + 4 && *end == '.' && v >= 0 && v < (1 << 20) ? (int)v : -1;
}

// Blocks in a model file: one more than the highest blk.N index.
static int count_blocks(const gguf_t *g) {
    int n = 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        int b = block_of(gguf_tensor(g, i)->name);
        if (b + 1 > n) n = b + 1;
    }
    return n;
}

typedef struct {
    const gguf_t *src;          // source model
    const shard_slice_t *slice; // rows to copy
    int head_dim;
    const int64_t *src_index;   // writer tensor i is source tensor src_index[i]
} fill_ctx_t;

// Copies tensor i's rows (for every expert of a 3-D tensor) into buf; of a column-cut tensor, the
// slice's columns of each row (whole blocks: a row's bytes are its blocks in order).
static int fill_tensor(void *ctx, int64_t i, void *buf, size_t nbytes, char *err, size_t errlen) {
    fill_ctx_t *fc = ctx;
    const gguf_tensor_t *t = gguf_tensor(fc->src, fc->src_index[i]);
    int64_t r0, r1, c0, c1;
    shard_tensor_rows(fc->slice, t->name, t->ne[1], fc->head_dim, &r0, &r1);
    shard_tensor_cols(fc->slice, t->name, t->ne[0], fc->head_dim, &c0, &c1);
    const size_t rb = qtype_row_size(t->type, t->ne[0]);
    const size_t cb0 = qtype_row_size(t->type, c0), cbn = qtype_row_size(t->type, c1 - c0); // column bytes
    const int64_t planes = t->ne[2] * t->ne[3];
    const bool some = fc->slice->placed && shard_expert_tensor(t->name) && t->n_dims == 3; // held experts' planes
    size_t at = 0;
    for (int64_t p = 0; p < planes; p++) {
        if (some && !shard_holds_expert(fc->slice, (int)p)) continue;
        const uint8_t *src = (const uint8_t *)t->data + ((size_t)p * (size_t)t->ne[1] + (size_t)r0) * rb;
        size_t len = (size_t)(r1 - r0) * cbn;
        if (at + len > nbytes)
            return mlm_fail(err, errlen, MLM_ESTATE, "shard: tensor %s slice larger than its entry", t->name);
        if (cbn == rb) {
            memcpy((uint8_t *)buf + at, src, len);
        } else {
            for (int64_t r = 0; r < r1 - r0; r++)
                memcpy((uint8_t *)buf + at + (size_t)r * cbn, src + (size_t)r * rb + cb0, cbn);
        }
        // a large model is read once: its pages leave this process as they are copied (a worker in a
        // small cgroup would otherwise count the whole file's pages it touched in its resident set)
        gguf_drop_pages(fc->src, src, (size_t)(r1 - r0) * rb);
        at += len;
    }
    return 0;
}

// The tensors a slice may cut by columns.
static bool col_cut(const char *name, bool *heads) {
    *heads = ends_with(name, ".attn_output.weight");
    return *heads || ends_with(name, ".ffn_down.weight") || ends_with(name, ".ffn_down_exps.weight");
}

// --- public API

bool shard_expert_tensor(const char *name) {
    return block_of(name) >= 0 && (ends_with(name, ".ffn_gate_exps.weight") || ends_with(name, ".ffn_up_exps.weight") ||
                                   ends_with(name, ".ffn_down_exps.weight"));
}

bool shard_holds_expert(const shard_slice_t *s, int e) {
    if (!s->placed) return true;
    return e >= 0 && e < SHARD_EXPERTS_MAX && (s->experts[e >> 5] >> (e & 31) & 1u);
}

int shard_expert_plane(const shard_slice_t *s, int e) {
    if (!s->placed) return e;
    if (!shard_holds_expert(s, e)) return -1;
    int n = 0;
    for (int w = 0; w < e >> 5; w++) n += __builtin_popcount(s->experts[w]);
    return n + __builtin_popcount(s->experts[e >> 5] & ((1u << (e & 31)) - 1u));
}

int shard_expert_count(const shard_slice_t *s, int n_expert) {
    if (!s->placed) return n_expert;
    int n = 0;
    for (int e = 0; e < n_expert && e < SHARD_EXPERTS_MAX; e++) n += shard_holds_expert(s, e);
    return n;
}

void shard_add_expert(shard_slice_t *s, int e) {
    if (e >= 0 && e < SHARD_EXPERTS_MAX) s->experts[e >> 5] |= 1u << (e & 31);
}

void shard_set_experts(shard_slice_t *s, const uint16_t *ids, int n) {
    s->placed = 1;
    memset(s->experts, 0, sizeof s->experts);
    for (int i = 0; i < n; i++)
        if (ids[i] < SHARD_EXPERTS_MAX) s->experts[ids[i] >> 5] |= 1u << (ids[i] & 31);
}

shard_slice_t shard_full(int n_layer, int n_head, int n_head_kv, int n_embd, int n_ff, int n_vocab) {
    return (shard_slice_t){0, n_head, 0, n_head_kv, 0, n_embd, 0, n_ff, 0, n_vocab, 0, n_layer, 0, 0, {0}};
}

void shard_tensor_cols(const shard_slice_t *s, const char *name, int64_t ne0, int head_dim, int64_t *c0, int64_t *c1) {
    *c0 = 0;
    *c1 = ne0;
    bool heads;
    if (!s->cols || !col_cut(name, &heads)) return;
    *c0 = heads ? (int64_t)s->h0 * head_dim : s->f0;
    *c1 = heads ? (int64_t)s->h1 * head_dim : s->f1;
    if (*c0 < 0) *c0 = 0;
    if (*c1 > ne0) *c1 = ne0;
    if (*c1 < *c0) *c1 = *c0;
}

bool shard_cols_aligned(int type, int64_t ne0, int64_t c0, int64_t c1) {
    const qtype_traits_t *tr = qtype_traits(type);
    const int64_t b = tr && tr->blck > 0 ? (int64_t)tr->blck : 1;
    return c0 >= 0 && c0 <= c1 && c1 <= ne0 && c0 % b == 0 && (c1 % b == 0 || c1 == ne0);
}

int shard_check_cols(const gguf_t *g, const shard_slice_t *s, int head_dim, char *err, size_t errlen) {
    if (!s->cols) return 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        bool heads;
        if (!col_cut(t->name, &heads)) continue;
        int64_t c0, c1;
        shard_tensor_cols(s, t->name, t->ne[0], head_dim, &c0, &c1);
        if (!shard_cols_aligned(t->type, t->ne[0], c0, c1))
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "%s: columns %lld-%lld of %s (%s) are not whole quant blocks of %u; the all-reduce split "
                            "must cut at multiples of the block",
                            gguf_path(g), (long long)c0, (long long)c1 - 1, t->name, qtype_name(t->type),
                            (unsigned)qtype_traits(t->type)->blck);
    }
    return 0;
}

bool shard_holds_tensor(const shard_slice_t *s, const char *name, int n_layer, bool tied) {
    const int b = block_of(name);
    if (b >= 0) return b >= s->l0 && b < s->l1;
    const bool first = s->l0 == 0, last = s->l1 == n_layer;
    if (!strcmp(name, "token_embd.weight")) return first || (tied && last);
    if (!strcmp(name, "output.weight") || !strcmp(name, "output_norm.weight")) return last;
    return true;
}

void shard_tensor_rows(const shard_slice_t *s, const char *name, int64_t ne1, int head_dim, int64_t *r0, int64_t *r1) {
    *r0 = 0;
    *r1 = ne1;
    if (ends_with(name, ".attn_q.weight")) {
        *r0 = (int64_t)s->h0 * head_dim;
        *r1 = (int64_t)s->h1 * head_dim;
    } else if (ends_with(name, ".attn_k.weight") || ends_with(name, ".attn_v.weight")) {
        *r0 = (int64_t)s->kv0 * head_dim;
        *r1 = (int64_t)s->kv1 * head_dim;
    } else if (ends_with(name, ".attn_output.weight") || ends_with(name, ".ffn_down.weight") ||
               ends_with(name, ".ffn_down_exps.weight")) {
        *r0 = s->e0;
        *r1 = s->e1;
    } else if (ends_with(name, ".ffn_gate.weight") || ends_with(name, ".ffn_up.weight") ||
               ends_with(name, ".ffn_gate_exps.weight") || ends_with(name, ".ffn_up_exps.weight")) {
        *r0 = s->f0;
        *r1 = s->f1;
    } else if (!strcmp(name, "output.weight") || !strcmp(name, "token_embd.weight")) {
        *r0 = s->v0;
        *r1 = s->v1;
    }
    if (*r0 < 0) *r0 = 0;
    if (*r1 > ne1) *r1 = ne1;
    if (*r1 < *r0) *r1 = *r0;
}

int shard_file_slice(const gguf_t *g, shard_slice_t *slice, bool *is_shard) {
    *is_shard = false;
    char key[64];
    int found = 0;
    slice->l0 = 0;
    slice->l1 = -1;
    int found_l = 0;
    for (int i = 0; i < N_KEYS; i++) {
        snprintf(key, sizeof key, "meshlm.shard.%s", slice_keys[i]);
        int64_t v;
        int rc = gguf_get_i64(g, key, &v);
        if (rc == MLM_ENOTFOUND) continue;
        if (rc != 0 || v < 0 || v > (1 << 30)) return MLM_EFORMAT;
        *slice_field(slice, i) = (int)v;
        if (i < N_KEYS_V1) found++;
        else found_l++;
    }
    slice->cols = 0;
    if (found == 0 && found_l == 0) return 0;
    int64_t cols = 0; // written only for all-reduce slices
    int rc = gguf_get_i64(g, "meshlm.shard.cols", &cols);
    if (rc == 0 && (cols < 0 || cols > 1)) return MLM_EFORMAT;
    if (rc != 0 && rc != MLM_ENOTFOUND) return MLM_EFORMAT;
    slice->cols = (int)cols;
    slice->placed = 0;
    memset(slice->experts, 0, sizeof slice->experts);
    const gguf_value_t *ex = gguf_find(g, "meshlm.shard.experts"); // placed experts, ascending ids
    if (ex) {
        if (ex->type != GGUF_VT_ARRAY || ex->v.arr.n > SHARD_EXPERTS_MAX) return MLM_EFORMAT;
        slice->placed = 1;
        int64_t prev = -1;
        for (uint64_t i = 0; i < ex->v.arr.n; i++) {
            int64_t id;
            if (gguf_arr_i64(ex, i, &id) != 0 || id <= prev || id >= SHARD_EXPERTS_MAX) return MLM_EFORMAT;
            slice->experts[id >> 5] |= 1u << (id & 31);
            prev = id;
        }
    }
    if (found != N_KEYS_V1 || found_l == 1 || slice->h1 < slice->h0 || slice->kv1 < slice->kv0 ||
        slice->e1 < slice->e0 || slice->f1 < slice->f0 || slice->v1 < slice->v0 || (found_l && slice->l1 < slice->l0))
        return MLM_EFORMAT;
    *is_shard = true;
    return 0;
}

// shard_file_write, or with cols_only shard_file_write_cols.
static int write_share(const gguf_t *src, const shard_slice_t *slice, int head_dim, const uint8_t sha256[32],
                       const char *path, bool cols_only, char *err, size_t errlen) {
    if (cols_only && !slice->cols)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: a columns file is for an all-reduce slice", path);
    int rc = shard_check_cols(src, slice, head_dim, err, errlen);
    if (rc != 0) return rc;
    gguf_writer_t *w = gguf_writer_new();
    if (!w) return mlm_fail(err, errlen, MLM_ENOMEM, "%s: out of memory", path);
    rc = gguf_writer_copy_kv(w, src, "");
    if (rc > 0) rc = 0; // the number of keys copied
    for (int i = 0; rc == 0 && i < N_KEYS; i++) {
        char key[64];
        snprintf(key, sizeof key, "meshlm.shard.%s", slice_keys[i]);
        rc = gguf_writer_set_i32(w, key, *slice_field((shard_slice_t *)slice, i));
    }
    if (rc == 0 && slice->cols) rc = gguf_writer_set_i32(w, "meshlm.shard.cols", 1);
    if (rc == 0 && cols_only) rc = gguf_writer_set_i32(w, "meshlm.shard.cols_only", 1);
    if (rc == 0 && sha256) rc = gguf_writer_set_arr(w, "meshlm.shard.source_sha256", GGUF_VT_UINT8, sha256, 32);
    if (rc == 0 && slice->placed) { // the experts held, ascending: their planes, in this order
        uint32_t ids[SHARD_EXPERTS_MAX];
        uint64_t n = 0;
        for (int e = 0; e < SHARD_EXPERTS_MAX; e++)
            if (shard_holds_expert(slice, e)) ids[n++] = (uint32_t)e;
        rc = gguf_writer_set_arr(w, "meshlm.shard.experts", GGUF_VT_UINT32, ids, n);
    }
    const gguf_tensor_t *emb = gguf_find_tensor(src, "token_embd.weight");
    if (rc == 0 && emb) rc = gguf_writer_set_i64(w, "meshlm.shard.n_vocab", emb->ne[1]);
    const int n_layer = count_blocks(src);
    int64_t *src_index = malloc(sizeof(int64_t) * (size_t)(gguf_n_tensors(src) + 1));
    if (!src_index) rc = MLM_ENOMEM;
    const bool tied = gguf_find_tensor(src, "output.weight") == NULL;
    for (int64_t i = 0; rc == 0 && i < gguf_n_tensors(src); i++) {
        const gguf_tensor_t *t = gguf_tensor(src, i);
        if (!shard_holds_tensor(slice, t->name, n_layer, tied)) continue;
        int64_t r0, r1, c0, c1, ne[GGUF_MAX_DIMS];
        shard_tensor_rows(slice, t->name, t->ne[1], head_dim, &r0, &r1);
        shard_tensor_cols(slice, t->name, t->ne[0], head_dim, &c0, &c1);
        if (r1 == r0 || c1 == c0) continue; // none of its rows or columns (a node with no heads): left out
        if (cols_only && c1 - c0 == t->ne[0]) continue; // not cut by columns: read from the model file
        memcpy(ne, t->ne, sizeof ne);
        ne[0] = c1 - c0;
        ne[1] = r1 - r0;
        if (slice->placed && shard_expert_tensor(t->name) && t->n_dims == 3 &&
            (ne[2] = shard_expert_count(slice, t->ne[2] < SHARD_EXPERTS_MAX ? (int)t->ne[2] : SHARD_EXPERTS_MAX)) == 0)
            continue; // none of its experts held here
        int64_t idx = gguf_writer_add_tensor(w, t->name, t->type, t->n_dims < 2 && ne[1] != 1 ? 2 : t->n_dims, ne);
        if (idx < 0) rc = (int)idx;
        else src_index[idx] = i;
    }
    if (rc != 0) {
        mlm_fail(err, errlen, rc, "%s: cannot describe the shard file: %s", path, mlm_strerror(rc));
    } else {
        fill_ctx_t fc = {src, slice, head_dim, src_index};
        rc = gguf_writer_write_file(w, path, fill_tensor, &fc, err, errlen);
    }
    free(src_index);
    gguf_writer_destroy(&w);
    return rc;
}

int shard_file_write(const gguf_t *src, const shard_slice_t *slice, int head_dim, const uint8_t sha256[32],
                     const char *path, char *err, size_t errlen) {
    return write_share(src, slice, head_dim, sha256, path, false, err, errlen);
}

int shard_file_write_cols(const gguf_t *src, const shard_slice_t *slice, int head_dim, const uint8_t sha256[32],
                          const char *path, char *err, size_t errlen) {
    return write_share(src, slice, head_dim, sha256, path, true, err, errlen);
}

bool shard_file_cols_only(const gguf_t *g) {
    int64_t v = 0;
    return gguf_get_i64(g, "meshlm.shard.cols_only", &v) == 0 && v == 1;
}
