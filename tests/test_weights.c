// Weight provider conformance: every provider in `providers` must hand out, for every unit of a
// slice (the embedding, each block's dense part, each expert, the output head), exactly the rows
// of the GGUF tensors that slice holds, the same again after a release, refuse ids the model does
// not have (MLM_EINVAL) or the slice does not hold (MLM_ERANGE), survive any prefetch hint, and
// count its calls as offload/weights.h says. A new provider adds a row to `providers`.
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "core/err.h"
#include "offload/weights.h"
#include "offload/weights_impl.h"
#include "parallel/plan.h"
#include "parallel/shard.h"
#include "worker/format/gguf_write.h"
#include "worker/model/model.h"

// --- the table of providers

typedef struct {
    const char *label;       // for messages
    const char *name;        // registry name (weights_new)
    bool repack;             // ask for the kernels' layout
    size_t budget;           // weights_params_t.budget_bytes
    bool maps_file;          // units without repacking point into the file mapping (nothing copied)
} provider_row_t;

static const provider_row_t providers[] = {
    {"mmap, repacked", "mmap", true, 0, true},
    {"mmap, plain rows", "mmap", false, 0, true},
    {"window, 1 buffer, O_DIRECT", "window:w=1", false, 0, false},
    {"window, 2 buffers, 1 pinned, pread", "window:w=2,pin=1,io=pread", false, 0, false},
    {"window, 3 buffers, mmap", "window:w=3,io=mmap", false, 0, true},
    {"window, no budget: all pinned", "window", false, 0, false},
    {"experts, 1 per block, no prefetch", "experts:n=1,prefetch=off", false, 0, false},
    {"experts, 2 per block, LFU, prefetch", "experts:n=2,policy=lfu", false, 0, false},
    {"experts, no cache", "experts:n=off", false, 0, false},
};
#define N_PROVIDERS (sizeof providers / sizeof providers[0])

// --- the cases: a model, the slice a node holds, and whether the node reads a shard file

typedef struct {
    const char *model;       // under shared/, or "tied" for a derived model (see make_tied)
    const char *nodes;       // plan_tp node list, NULL for the whole model
    int node;                // which node's slice
    int l0, l1;              // blocks of the slice (-1: all)
    bool shard_file;         // the provider reads a shard file holding only the slice
} case_t;

static const case_t cases[] = {
    {"models/stories260K.gguf", NULL, 0, -1, -1, false},
    {"models/stories260K.gguf", "1,2", 1, -1, -1, false},
    {"models/stories260K.gguf", NULL, 0, 1, 4, false},       // a middle pipeline stage
    {"models/stories260K.gguf", "2,1", 0, 3, 5, true},       // the last stage's first node, from its shard file
    {"models/llama-2-tiny-random.gguf", NULL, 0, -1, -1, false},
    {"models/synth/synth-dense-Q4_0.gguf", NULL, 0, -1, -1, false},
    {"models/synth/synth-dense-Q4_0.gguf", "1,2,1", 2, 0, 2, true},
    {"models/synth/synth-dense-Q4_K_M.gguf", "1,1", 0, -1, -1, false},
    {"models/synth/synth-moe-Q8_0.gguf", NULL, 0, -1, -1, false},
    {"models/synth/synth-moe-Q8_0.gguf", "3,1", 1, -1, -1, false},
    {"models/synth/synth-moe-Q8_0.gguf", "1,1", 0, 2, 4, true},
    {"models/synth/synth-moe-Q4_0.gguf", NULL, 0, -1, -1, false},
    {"models/synth/synth-moe-Q4_0.gguf", "1,1", 1, 0, 1, false},
    {"models/derived/stories260K-moe8x-top2-permuted.gguf", "1,1", 0, -1, -1, false},
    {"tied", NULL, 0, -1, -1, false},                        // tied output, rope_freqs
    {"tied", "1,1", 1, 2, 5, true},
};
#define N_CASES (sizeof cases / sizeof cases[0])

// --- helpers: a derived model with a tied output and RoPE frequency factors

typedef struct {
    const gguf_t *src;
    const float *freqs;
} tied_fill_t;

static int tied_fill(void *ctx, int64_t i, void *buf, size_t nbytes, char *err, size_t errlen) {
    tied_fill_t *f = ctx;
    int64_t k = 0; // the i-th written tensor: the source's minus output.weight, then rope_freqs
    for (int64_t j = 0; j < gguf_n_tensors(f->src); j++) {
        const gguf_tensor_t *t = gguf_tensor(f->src, j);
        if (!strcmp(t->name, "output.weight")) continue;
        if (k++ == i) {
            memcpy(buf, t->data, nbytes);
            return 0;
        }
    }
    memcpy(buf, f->freqs, nbytes);
    return 0;
}

// stories260K without output.weight (token_embd becomes the output matrix) and with a
// rope_freqs.weight tensor. Returns the path (caller frees) or NULL.
static char *make_tied(const char *dir) {
    char src_path[1024], err[256];
    test_shared_path(src_path, sizeof src_path, "models/stories260K.gguf");
    gguf_t *src = NULL;
    if (gguf_open(&src, src_path, err, sizeof err) != 0) return NULL;
    model_hparams_t hp;
    if (hparams_read(src, &hp, err, sizeof err) != 0) {
        gguf_close(&src);
        return NULL;
    }
    gguf_writer_t *w = gguf_writer_new();
    gguf_writer_copy_kv(w, src, "");
    for (int64_t j = 0; j < gguf_n_tensors(src); j++) {
        const gguf_tensor_t *t = gguf_tensor(src, j);
        if (strcmp(t->name, "output.weight") != 0) gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne);
    }
    const int64_t nf = hp.n_rot / 2;
    float *freqs = malloc((size_t)nf * sizeof(float));
    for (int64_t i = 0; i < nf; i++) freqs[i] = 1.0f + 0.25f * (float)i;
    gguf_writer_add_tensor(w, "rope_freqs.weight", QT_F32, 1, &nf);
    char *path = malloc(strlen(dir) + 16);
    sprintf(path, "%s/tied.gguf", dir);
    tied_fill_t f = {src, freqs};
    int rc = gguf_writer_write_file(w, path, tied_fill, &f, err, sizeof err);
    gguf_writer_destroy(&w);
    gguf_close(&src);
    free(freqs);
    if (rc != 0) {
        fprintf(stderr, "  tied model: %s\n", err);
        free(path);
        return NULL;
    }
    return path;
}

// --- helpers: checking units against the GGUF

typedef struct {
    const provider_row_t *prov;
    const case_t *cs;
    const gguf_t *truth;        // the whole model (the rows every provider must reproduce)
    const gguf_t *file;         // what the provider reads (truth, or a shard file)
    model_hparams_t hp;
    shard_slice_t slice;
    int fails;
    uint64_t acquires, releases, prefetches; // the calls made that stats must count
} ctx_t;

#define CHECK(cond, ...)                                                                            \
    do {                                                                                            \
        if (!(cond)) {                                                                              \
            if (x->fails < 8) {                                                                     \
                fprintf(stderr, "  [%s | %s node %d l%d-%d%s] ", x->prov->label, x->cs->model, x->cs->node, \
                        x->slice.l0, x->slice.l1, x->cs->shard_file ? " shard" : "");               \
                fprintf(stderr, __VA_ARGS__);                                                       \
                fputc('\n', stderr);                                                                \
            }                                                                                       \
            x->fails++;                                                                             \
        }                                                                                           \
    } while (0)

static bool in_file_map(const gguf_t *g, const void *p) {
    const uint8_t *b = gguf_base(g);
    return (const uint8_t *)p >= b && (const uint8_t *)p < b + gguf_file_size(g);
}

// Matrix w must be rows [r0, r1) (the slice's) of plane `plane` of tensor name in the whole model.
static void check_matrix(ctx_t *x, const mm_weight_t *w, const char *name, int plane, const char *what) {
    const gguf_tensor_t *t = gguf_find_tensor(x->truth, name);
    CHECK(t != NULL, "%s: %s missing from the model", what, name);
    if (!t) return;
    int64_t r0, r1;
    shard_tensor_rows(&x->slice, name, t->ne[1], x->hp.head_dim, &r0, &r1);
    if (r1 <= r0) {
        CHECK(w->rows == 0, "%s: %s holds %lld rows, the slice none", what, name, (long long)w->rows);
        return;
    }
    CHECK(w->rows == r1 - r0 && w->cols == t->ne[0] && w->type == t->type, "%s: %s is %lld x %lld %s, want %lld x %lld %s",
          what, name, (long long)w->rows, (long long)w->cols, qtype_name(w->type), (long long)(r1 - r0),
          (long long)t->ne[0], qtype_name(t->type));
    if (w->rows != r1 - r0 || w->cols != t->ne[0] || w->type != t->type) return;
    const size_t rb = qtype_row_size(t->type, t->ne[0]);
    CHECK(w->row_bytes == rb, "%s: %s row_bytes %zu, want %zu", what, name, w->row_bytes, rb);
    uint8_t *row = malloc(rb);
    const uint8_t *want = (const uint8_t *)t->data + ((size_t)plane * (size_t)t->ne[1] + (size_t)r0) * rb;
    int bad = 0;
    for (int64_t r = 0; r < w->rows; r++) {
        mm_weight_get_row(w, r, row);
        if (memcmp(row, want + (size_t)r * rb, rb) != 0 && bad++ == 0)
            CHECK(false, "%s: %s plane %d row %lld differs from the file", what, name, plane, (long long)(r0 + r));
    }
    free(row);
    if (x->prov->maps_file && w->pack == 0)
        CHECK(in_file_map(x->file, w->data), "%s: %s was copied out of the file mapping", what, name);
}

// Vector v (n_embd floats) must be tensor name dequantized.
static void check_vec(ctx_t *x, const float *v, const char *name, const char *what) {
    const gguf_tensor_t *t = gguf_find_tensor(x->truth, name);
    CHECK(t && v, "%s: %s %s", what, name, t ? "not provided" : "missing from the model");
    if (!t || !v) return;
    const int64_t n = gguf_tensor_nelements(t);
    float *want = malloc((size_t)n * sizeof(float));
    quant_dequantize_ref(t->type, t->data, want, n);
    CHECK(memcmp(v, want, (size_t)n * sizeof(float)) == 0, "%s: %s differs from the file", what, name);
    free(want);
}

static bool zero_weight(const mm_weight_t *w) { return w->rows == 0; }

// Everything of unit (layer, expert) that the provider handed out as L.
static void check_unit(ctx_t *x, int layer, int expert, const layer_weights_t *L) {
    char what[64], name[96];
    snprintf(what, sizeof what, "unit (%d, %d)", layer, expert);
    const int nx = x->hp.n_expert;
    if (layer == WEIGHTS_IN) {
        const weights_rows_t *r = &L->tok_embd;
        const gguf_tensor_t *t = gguf_find_tensor(x->truth, "token_embd.weight");
        const size_t rb = qtype_row_size(t->type, t->ne[0]);
        CHECK(r->type == t->type && r->cols == t->ne[0] && r->row_bytes == rb && r->r0 == x->slice.v0 &&
                  r->r1 == x->slice.v1 && r->data,
              "%s: token_embd rows [%lld, %lld) of %s, want [%d, %d) of %s", what, (long long)r->r0, (long long)r->r1,
              qtype_name(r->type), x->slice.v0, x->slice.v1, qtype_name(t->type));
        if (r->data && r->r1 == x->slice.v1 && r->r0 == x->slice.v0)
            CHECK(memcmp(r->data, (const uint8_t *)t->data + (size_t)r->r0 * rb, (size_t)(r->r1 - r->r0) * rb) == 0,
                  "%s: token_embd rows differ from the file", what);
        CHECK(!L->attn_norm && !L->out_norm && zero_weight(&L->wq) && zero_weight(&L->output), "%s: fields of another unit set", what);
        return;
    }
    if (layer == WEIGHTS_OUT) {
        check_vec(x, L->out_norm, "output_norm.weight", what);
        check_matrix(x, &L->output, x->hp.tied_output ? "token_embd.weight" : "output.weight", 0, what);
        CHECK(!L->attn_norm && !L->tok_embd.data && zero_weight(&L->wq) && zero_weight(&L->w_gate),
              "%s: fields of another unit set", what);
        return;
    }
#define N(suffix) (snprintf(name, sizeof name, "blk.%d.%s.weight", layer, suffix), name)
    if (expert >= 0) {
        check_matrix(x, &L->w_gate, N("ffn_gate_exps"), expert, what);
        check_matrix(x, &L->w_up, N("ffn_up_exps"), expert, what);
        check_matrix(x, &L->w_down, N("ffn_down_exps"), expert, what);
        CHECK(!L->attn_norm && !L->ffn_norm && zero_weight(&L->wq) && zero_weight(&L->gate_inp) && !L->tok_embd.data &&
                  zero_weight(&L->output),
              "%s: an expert unit sets more than its FFN", what);
        return;
    }
    check_vec(x, L->attn_norm, N("attn_norm"), what);
    check_vec(x, L->ffn_norm, N("ffn_norm"), what);
    check_matrix(x, &L->wq, N("attn_q"), 0, what);
    check_matrix(x, &L->wk, N("attn_k"), 0, what);
    check_matrix(x, &L->wv, N("attn_v"), 0, what);
    check_matrix(x, &L->wo, N("attn_output"), 0, what);
    if (nx == 0) {
        check_matrix(x, &L->w_gate, N("ffn_gate"), 0, what);
        check_matrix(x, &L->w_up, N("ffn_up"), 0, what);
        check_matrix(x, &L->w_down, N("ffn_down"), 0, what);
        CHECK(zero_weight(&L->gate_inp), "%s: a dense block with a router", what);
    } else {
        check_matrix(x, &L->gate_inp, N("ffn_gate_inp"), 0, what);
        CHECK(zero_weight(&L->w_gate) && zero_weight(&L->w_up) && zero_weight(&L->w_down),
              "%s: a MoE block's dense part holds FFN matrices", what);
        const gguf_tensor_t *t = gguf_find_tensor(x->truth, N("ffn_gate_exps"));
        CHECK(t && L->e_type == t->type, "%s: e_type %s", what, qtype_name(L->e_type));
    }
    const gguf_tensor_t *rf = gguf_find_tensor(x->truth, "rope_freqs.weight");
    if (rf) CHECK(L->rope_freqs && !memcmp(L->rope_freqs, rf->data, rf->nbytes), "%s: rope_freqs differ", what);
    else CHECK(L->rope_freqs == NULL, "%s: rope_freqs without a tensor", what);
#undef N
}

// Every unit the slice holds, as (layer, expert) pairs; returns the count.
static int held_units(const ctx_t *x, int (*ids)[2], int cap) {
    int n = 0;
    if (x->slice.l0 == 0 && x->slice.l1 > 0 && n < cap) ids[n][0] = WEIGHTS_IN, ids[n++][1] = WEIGHTS_DENSE;
    for (int l = x->slice.l0; l < x->slice.l1; l++)
        for (int e = -1; e < x->hp.n_expert && n < cap; e++) ids[n][0] = l, ids[n++][1] = e;
    if (x->slice.l1 == x->hp.n_layer && x->slice.l1 > x->slice.l0 && n < cap)
        ids[n][0] = WEIGHTS_OUT, ids[n++][1] = WEIGHTS_DENSE;
    return n;
}

static int acquire(ctx_t *x, weights_t *w, int layer, int expert, const layer_weights_t **L) {
    int rc = weights_acquire(w, layer, expert, L);
    if (rc == 0) x->acquires++;
    return rc;
}

static void release(ctx_t *x, weights_t *w, int layer, int expert) {
    weights_release(w, layer, expert);
    x->releases++;
}

// --- the conformance checks of one provider on one case

typedef struct {
    int layer, expert, want;  // an id and the code acquire must give for it
} bad_id_t;

static void run_case(ctx_t *x, weights_t *w) {
    int ids[512][2];
    const int n = held_units(x, ids, 512);
    const layer_weights_t *L, *L2;
    // 1. every unit: acquire, compare with the file, release
    for (int i = 0; i < n; i++) {
        int rc = acquire(x, w, ids[i][0], ids[i][1], &L);
        CHECK(rc == 0, "acquire (%d, %d): %s", ids[i][0], ids[i][1], mlm_strerror(rc));
        if (rc != 0) continue;
        check_unit(x, ids[i][0], ids[i][1], L);
        release(x, w, ids[i][0], ids[i][1]);
    }
    // 2. prefetch hints of every kind, good and bad, change nothing
    int all[64];
    for (int e = 0; e < x->hp.n_expert && e < 64; e++) all[e] = x->hp.n_expert - 1 - e;
    const int bad_e[3] = {0, x->hp.n_expert + 3, -7};
    for (int l = -3; l <= x->hp.n_layer; l++) {
        weights_prefetch(w, l, NULL, 0);
        weights_prefetch(w, l, all, x->hp.n_expert < 64 ? x->hp.n_expert : 64);
        weights_prefetch(w, l, bad_e, 3);
        weights_prefetch(w, l, NULL, 5);
        weights_prefetch(w, l, all, -1);
        x->prefetches += 5;
    }
    // 3. again, each unit held twice at once and released twice; the same rows come back
    for (int i = 0; i < n; i++) {
        int rc = acquire(x, w, ids[i][0], ids[i][1], &L);
        int rc2 = acquire(x, w, ids[i][0], ids[i][1], &L2);
        CHECK(rc == 0 && rc2 == 0, "acquire twice (%d, %d): %s / %s", ids[i][0], ids[i][1], mlm_strerror(rc),
              mlm_strerror(rc2));
        if (rc == 0) check_unit(x, ids[i][0], ids[i][1], L);
        if (rc2 == 0) check_unit(x, ids[i][0], ids[i][1], L2);
        if (rc2 == 0) release(x, w, ids[i][0], ids[i][1]);
        if (rc == 0) release(x, w, ids[i][0], ids[i][1]);
    }
    // 4. ids the model does not have, and units outside the slice
    const int nl = x->hp.n_layer, nx = x->hp.n_expert;
    bad_id_t bad[16];
    int nb = 0;
    bad[nb++] = (bad_id_t){nl, WEIGHTS_DENSE, MLM_EINVAL};
    bad[nb++] = (bad_id_t){-3, WEIGHTS_DENSE, MLM_EINVAL};
    bad[nb++] = (bad_id_t){x->slice.l0, nx, MLM_EINVAL};  // one past the experts (or any expert of a dense model)
    bad[nb++] = (bad_id_t){x->slice.l0, -2, MLM_EINVAL};
    bad[nb++] = (bad_id_t){WEIGHTS_IN, 0, MLM_EINVAL};
    bad[nb++] = (bad_id_t){WEIGHTS_OUT, 1, MLM_EINVAL};
    if (x->slice.l0 > 0) {
        bad[nb++] = (bad_id_t){x->slice.l0 - 1, WEIGHTS_DENSE, MLM_ERANGE};
        bad[nb++] = (bad_id_t){WEIGHTS_IN, WEIGHTS_DENSE, MLM_ERANGE};
        if (nx) bad[nb++] = (bad_id_t){0, nx - 1, MLM_ERANGE};
    }
    if (x->slice.l1 < nl) {
        bad[nb++] = (bad_id_t){x->slice.l1, WEIGHTS_DENSE, MLM_ERANGE};
        bad[nb++] = (bad_id_t){WEIGHTS_OUT, WEIGHTS_DENSE, MLM_ERANGE};
        if (nx) bad[nb++] = (bad_id_t){nl - 1, 0, MLM_ERANGE};
    }
    for (int i = 0; i < nb; i++) {
        static const layer_weights_t dummy;
        L = &dummy; // acquire must set it to NULL
        int rc = weights_acquire(w, bad[i].layer, bad[i].expert, &L);
        CHECK(rc == bad[i].want && L == NULL, "acquire (%d, %d) gave %s, want %s (out %s)", bad[i].layer,
              bad[i].expert, mlm_strerror(rc), mlm_strerror(bad[i].want), L ? "set" : "NULL");
        weights_release(w, bad[i].layer, bad[i].expert); // ignored: not counted
    }
    CHECK(weights_acquire(w, x->slice.l0, WEIGHTS_DENSE, NULL) == MLM_EINVAL, "acquire with out NULL");
    // 5. the counters
    weights_stats_t st;
    weights_stats(w, &st);
    CHECK(st.acquires == x->acquires && st.releases == x->releases && st.prefetches == x->prefetches,
          "stats count %llu acquires, %llu releases, %llu hints; made %llu, %llu, %llu",
          (unsigned long long)st.acquires, (unsigned long long)st.releases, (unsigned long long)st.prefetches,
          (unsigned long long)x->acquires, (unsigned long long)x->releases, (unsigned long long)x->prefetches);
    CHECK(st.hits + st.misses == 0 || st.hits + st.misses == st.acquires, "hits %llu + misses %llu != acquires",
          (unsigned long long)st.hits, (unsigned long long)st.misses);
    CHECK(st.prefetch_used + st.prefetch_wasted <= st.misses + st.hits + st.prefetches * 64,
          "prefetch counters out of proportion");
    CHECK(st.bytes_held <= st.bytes_peak, "bytes_held %llu > bytes_peak %llu", (unsigned long long)st.bytes_held,
          (unsigned long long)st.bytes_peak);
    CHECK(st.stall_ms >= 0, "negative stall time");
    if (x->prov->budget) CHECK(st.bytes_peak <= x->prov->budget, "peak %llu over the budget",
                               (unsigned long long)st.bytes_peak);
}

// The slice of case cs for a model of shape hp (plan_tp's split, then the block range).
static int case_slice(const case_t *cs, const gguf_t *g, const model_hparams_t *hp, shard_slice_t *out) {
    *out = shard_full(hp->n_layer, hp->n_head, hp->n_head_kv, hp->n_embd, hp->n_ff, hp->n_vocab);
    if (cs->nodes) {
        char err[256];
        plan_node_t nodes[8];
        int n = plan_parse_nodes(cs->nodes, nodes, 8, err, sizeof err);
        plan_t *plan = malloc(sizeof *plan);
        int rc = n > 0 ? plan_tp(g, nodes, n, 64, plan, err, sizeof err) : n;
        if (rc == 0) *out = plan->shard[cs->node].s;
        else fprintf(stderr, "  plan %s: %s\n", cs->nodes, err);
        free(plan);
        if (rc != 0) return rc;
    }
    if (cs->l0 >= 0) out->l0 = cs->l0, out->l1 = cs->l1;
    return 0;
}

static void test_conformance(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char *tied = make_tied(dir);
    CU_ASSERT_PTR_NOT_NULL_FATAL(tied);
    int total_fails = 0, runs = 0;
    for (size_t ci = 0; ci < N_CASES; ci++) {
        const case_t *cs = &cases[ci];
        char path[1024], err[512];
        if (!strcmp(cs->model, "tied")) snprintf(path, sizeof path, "%s", tied);
        else test_shared_path(path, sizeof path, cs->model);
        gguf_t *truth = NULL, *shard = NULL;
        CU_ASSERT_EQUAL_FATAL(gguf_open(&truth, path, err, sizeof err), 0);
        ctx_t x0 = {.cs = cs, .truth = truth, .file = truth};
        CU_ASSERT_EQUAL_FATAL(hparams_read(truth, &x0.hp, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(case_slice(cs, truth, &x0.hp, &x0.slice), 0);
        if (cs->shard_file) {
            char sp[1100];
            snprintf(sp, sizeof sp, "%s/shard%zu.gguf", dir, ci);
            CU_ASSERT_EQUAL_FATAL(shard_file_write(truth, &x0.slice, x0.hp.head_dim, NULL, sp, err, sizeof err), 0);
            CU_ASSERT_EQUAL_FATAL(gguf_open(&shard, sp, err, sizeof err), 0);
            x0.file = shard;
        }
        model_hparams_t file_hp; // what a loader reads from the file it has
        CU_ASSERT_EQUAL_FATAL(hparams_read(x0.file, &file_hp, err, sizeof err), 0);
        for (size_t pi = 0; pi < N_PROVIDERS; pi++) {
            ctx_t xs = x0, *x = &xs;
            x->prov = &providers[pi];
            const weights_params_t wp = {.g = x->file, .hp = &file_hp, .slice = &x->slice, .shard_file = cs->shard_file,
                                         .repack = x->prov->repack, .budget_bytes = x->prov->budget};
            weights_t *w = NULL;
            int rc = weights_new(&w, x->prov->name, &wp, err, sizeof err);
            CHECK(rc == 0, "weights_new: %s", err);
            if (rc == 0) {
                const size_t nl = strcspn(x->prov->name, ":"); // the registered name, without the argument
                CU_ASSERT(strlen(weights_name(w)) == nl && !strncmp(weights_name(w), x->prov->name, nl));
                run_case(x, w);
            }
            weights_free(&w);
            CU_ASSERT_PTR_NULL(w);
            total_fails += x->fails;
            runs++;
        }
        gguf_close(&shard);
        gguf_close(&truth);
    }
    CU_ASSERT_EQUAL(total_fails, 0);
    CU_ASSERT_EQUAL(runs, (int)(N_CASES * N_PROVIDERS));
    free(tied);
    test_rm_dir(dir);
}

// Logits of 12 tokens (chunks of 8 and 2, then two single tokens) with the named provider; the
// provider's counters before and after in s0, s1. NULL on failure.
static float *forward(const char *path, const char *name, bool repack, size_t budget, int *nv,
                      const model_hparams_t **hp_out, weights_stats_t *s0, weights_stats_t *s1) {
    char err[512];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = repack, .weights = name, .mem_budget = budget};
    if (model_load(&m, path, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "  load %s with %s: %s\n", path, name ? name : "default", err);
        return NULL;
    }
    static model_hparams_t hp;
    hp = *model_hparams(m);
    *hp_out = &hp;
    *nv = hp.n_vocab;
    int32_t toks[12];
    for (int i = 0; i < 12; i++) toks[i] = (i * 37 + 11) % hp.n_vocab;
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = 32, .n_batch = 8, .n_threads = 2};
    float *lg = malloc((size_t)12 * hp.n_vocab * sizeof(float));
    int rc = model_ctx_new(&c, m, &co, err, sizeof err);
    weights_stats(model_weights(m), s0);
    if (rc == 0) rc = model_eval(c, toks, 10, lg, true);
    if (rc == 0) rc = model_eval(c, toks + 10, 1, lg + (size_t)10 * hp.n_vocab, true);
    if (rc == 0) rc = model_eval(c, toks + 11, 1, lg + (size_t)11 * hp.n_vocab, true);
    weights_stats(model_weights(m), s1);
    model_ctx_destroy(&c);
    model_destroy(&m);
    if (rc != 0) {
        fprintf(stderr, "  eval %s with %s: %s\n", path, name ? name : "default", mlm_strerror(rc));
        free(lg);
        return NULL;
    }
    return lg;
}

// The forward pass over each provider: the reference provider's logits (at the same repack
// setting), every acquire released, one acquire per unit used (embedding, blocks, routed experts,
// output) and hints given.
static void test_forward_pass(void) {
    const char *models[] = {"models/stories260K.gguf", "models/synth/synth-moe-Q4_0.gguf",
                            "models/synth/synth-dense-Q4_0.gguf"};
    for (size_t mi = 0; mi < sizeof models / sizeof models[0]; mi++) {
        char path[1024];
        test_shared_path(path, sizeof path, models[mi]);
        for (size_t pi = 0; pi < N_PROVIDERS; pi++) {
            const provider_row_t *pr = &providers[pi];
            int nv = 0;
            const model_hparams_t *hp = NULL;
            weights_stats_t r0, r1, s0, s1;
            float *ref = forward(path, NULL, pr->repack, 0, &nv, &hp, &r0, &r1);
            float *lg = forward(path, pr->name, pr->repack, pr->budget, &nv, &hp, &s0, &s1);
            CU_ASSERT_PTR_NOT_NULL(ref);
            CU_ASSERT_PTR_NOT_NULL(lg);
            if (ref && lg) {
                if (memcmp(ref, lg, (size_t)12 * nv * sizeof(float)) != 0) {
                    fprintf(stderr, "  %s: %s logits differ from the reference provider's\n", models[mi], pr->label);
                    CU_FAIL("logits differ");
                }
                const uint64_t acq = s1.acquires - s0.acquires;
                CU_ASSERT_EQUAL(acq, s1.releases - s0.releases);
                CU_ASSERT_EQUAL(acq, r1.acquires - r0.acquires); // the forward pass asks every provider alike
                if (hp->n_expert == 0) {
                    CU_ASSERT_EQUAL(acq, 4 * (uint64_t)(hp->n_layer + 2)); // 4 chunks
                } else {
                    CU_ASSERT(acq > 4 * (uint64_t)(hp->n_layer + 2));
                }
                CU_ASSERT(s1.prefetches > s0.prefetches);
            }
            free(ref);
            free(lg);
        }
    }
}

static void test_names_and_args(void) {
    char path[1024], err[512] = "";
    test_shared_path(path, sizeof path, "models/stories260K.gguf");
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, path, err, sizeof err), 0);
    model_hparams_t hp;
    CU_ASSERT_EQUAL_FATAL(hparams_read(g, &hp, err, sizeof err), 0);
    shard_slice_t sl = shard_full(hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_embd, hp.n_ff, hp.n_vocab);
    weights_params_t wp = {.g = g, .hp = &hp, .slice = &sl, .repack = true};
    weights_t *w = NULL;
    CU_ASSERT_EQUAL(weights_new(&w, "no-such-provider", &wp, err, sizeof err), MLM_ENOTFOUND);
    CU_ASSERT(strstr(err, "mmap") != NULL); // the message lists what there is
    CU_ASSERT_PTR_NULL(w);
    CU_ASSERT_EQUAL(weights_new(&w, "mmap:extra", &wp, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(weights_new(&w, NULL, &wp, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(weights_name(w), "mmap");
    weights_free(&w);
    CU_ASSERT_EQUAL(weights_new(&w, "mmap", NULL, err, sizeof err), MLM_EINVAL);
    CU_ASSERT(strstr(weights_names(), "mmap") != NULL);
    // a provider of a higher layer registers under its own name
    CU_ASSERT_EQUAL(weights_register("mmap-alias", weights_mmap_new), 0);
    CU_ASSERT_EQUAL(weights_register("mmap-alias", weights_mmap_new), MLM_ESTATE);
    CU_ASSERT_EQUAL(weights_register("a:b", weights_mmap_new), MLM_EINVAL);
    CU_ASSERT_EQUAL(weights_register("", weights_mmap_new), MLM_EINVAL);
    CU_ASSERT(strstr(weights_names(), "mmap-alias") != NULL);
    CU_ASSERT_EQUAL(weights_new(&w, "mmap-alias", &wp, err, sizeof err), 0);
    CU_ASSERT_PTR_NOT_NULL(w);
    weights_free(&w);
    // the NULL object is refused, not dereferenced
    const layer_weights_t *L;
    CU_ASSERT_EQUAL(weights_acquire(NULL, 0, WEIGHTS_DENSE, &L), MLM_EINVAL);
    weights_release(NULL, 0, WEIGHTS_DENSE);
    weights_prefetch(NULL, 0, NULL, 0);
    weights_stats_t st;
    weights_stats(NULL, &st);
    CU_ASSERT_EQUAL(st.acquires, 0);
    weights_free(NULL);
    gguf_close(&g);
    // and through the model
    model_t *m = NULL;
    model_load_opts_t lo = {.weights = "nope"};
    CU_ASSERT_EQUAL(model_load(&m, path, &lo, err, sizeof err), MLM_ENOTFOUND);
    CU_ASSERT_PTR_NULL(m);
}

int test_weights_suite(void) {
    CU_pSuite s = CU_add_suite("weights", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "every provider gives every unit's rows of every slice", test_conformance)) return -1;
    if (!CU_add_test(s, "the forward pass over every provider", test_forward_pass)) return -1;
    if (!CU_add_test(s, "registry and bad arguments", test_names_and_args)) return -1;
    return 0;
}
