// Benchmark of the all-reduce mode's column slices: binding time and bytes of a node's share (exact
// row cut vs column cut), and decode time of its column-cut attn_output / ffn_down products bound
// as a contiguous copy (what weights_mmap does) vs read in place at the file's row stride (one
// plain row at a time: what a strided mm_weight would do, without the repacked layout).
//
// usage: bench_colslice MODEL.gguf [NODES (2)] [REPS (200)]      one thread, node 0 of NODES
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "offload/weights.h"
#include "parallel/plan.h"
#include "worker/kernels/matmul.h"
#include "worker/model/model.h"

// --- helpers

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Node 0's slice of n equal nodes in `mode` (cols set in all-reduce mode).
static int slice_of(const gguf_t *g, int n, plan_tp_mode_t mode, shard_slice_t *out) {
    char err[256];
    plan_model_t *pm = malloc(sizeof *pm);
    plan_t *p = malloc(sizeof *p);
    plan_node_t nodes[PLAN_MAX_NODES];
    char spec[16];
    snprintf(spec, sizeof spec, "%d", n);
    int rc = plan_model_from_gguf(g, pm, err, sizeof err);
    if (rc == 0 && plan_parse_nodes(spec, nodes, PLAN_MAX_NODES, err, sizeof err) != n) rc = -1;
    plan_opts_t po = {.n_ctx = 512, .pp = 1, .tp = n, .keep_all = true, .no_stream = true, .tp_mode = mode};
    if (rc == 0) rc = plan_make(pm, nodes, n, &po, p, NULL, 0, NULL, err, sizeof err);
    if (rc == 0) {
        *out = p->shard[0].s;
        out->cols = mode == PLAN_TP_ALLREDUCE;
    } else {
        fprintf(stderr, "plan: %s\n", err);
    }
    free(pm);
    free(p);
    return rc;
}

// Loads path with the slice; prints the time and the bytes bound. Returns the model or NULL.
static model_t *load(const char *path, const shard_slice_t *s, const char *what) {
    char err[512];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = true, .slice = s};
    const double t0 = now_ms();
    if (model_load(&m, path, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", what, err);
        return NULL;
    }
    weights_stats_t st;
    weights_stats(model_weights(m), &st);
    printf("%-34s load %8.1f ms, %8.1f MB bound\n", what, now_ms() - t0, (double)st.bytes_held / 1e6);
    return m;
}

// ms per product of w with one activation row (REPS times, best of 3 rounds).
static double time_product(const mm_weight_t *w, int reps) {
    const kernels_t *k = kernels_best();
    float *x = malloc((size_t)w->cols * sizeof *x), *y = malloc((size_t)w->rows * sizeof *y);
    void *xq = malloc(mm_act_row_bytes(w->type, w->cols) + 64);
    for (int64_t i = 0; i < w->cols; i++) x[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    mm_quantize_act(k, w->type, x, xq, w->cols);
    double best = 1e30;
    for (int round = 0; round < 3; round++) {
        const double t0 = now_ms();
        for (int r = 0; r < reps; r++) mm_rows(k, w, xq, 0, 1, y, (size_t)w->rows, 0, w->rows);
        const double t = (now_ms() - t0) / reps;
        if (t < best) best = t;
    }
    free(x);
    free(y);
    free(xq);
    return best;
}

// The same product read in place from the file: one plain (not repacked) row per weight.
static double time_strided(const gguf_tensor_t *t, int64_t c0, int64_t c1, int reps) {
    const kernels_t *k = kernels_best();
    const int64_t rows = t->ne[1], nc = c1 - c0;
    const size_t rb = qtype_row_size(t->type, t->ne[0]), skip = qtype_row_size(t->type, c0);
    mm_weight_t *ws = calloc((size_t)rows, sizeof *ws);
    for (int64_t r = 0; r < rows; r++)
        mm_weight_init(&ws[r], k, t->type, 1, nc, (const uint8_t *)t->data + (size_t)r * rb + skip, false);
    float *x = malloc((size_t)nc * sizeof *x), *y = malloc((size_t)rows * sizeof *y);
    void *xq = malloc(mm_act_row_bytes(t->type, nc) + 64);
    for (int64_t i = 0; i < nc; i++) x[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    mm_quantize_act(k, t->type, x, xq, nc);
    double best = 1e30;
    for (int round = 0; round < 3; round++) {
        const double t0 = now_ms();
        for (int rep = 0; rep < reps; rep++)
            for (int64_t r = 0; r < rows; r++) mm_rows(k, &ws[r], xq, 0, 1, y + r, 1, 0, 1);
        const double el = (now_ms() - t0) / reps;
        if (el < best) best = el;
    }
    free(ws);
    free(x);
    free(y);
    free(xq);
    return best;
}

// --- main

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_colslice MODEL.gguf [NODES] [REPS]\n");
        return 2;
    }
    const char *path = argv[1];
    const int n = argc > 2 ? atoi(argv[2]) : 2, reps = argc > 3 ? atoi(argv[3]) : 200;
    char err[256];
    gguf_t *g = NULL;
    if (gguf_open(&g, path, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    shard_slice_t ex, ar;
    if (slice_of(g, n, PLAN_TP_EXACT, &ex) != 0 || slice_of(g, n, PLAN_TP_ALLREDUCE, &ar) != 0) return 1;
    printf("%s, node 0 of %d, isa %s\n", path, n, kernels_best()->isa);
    model_t *whole = load(path, NULL, "whole model");
    model_destroy(&whole);
    model_t *me = load(path, &ex, "exact slice (rows)");
    model_t *ma = load(path, &ar, "all-reduce slice (rows + columns)");
    if (!me || !ma) return 1;
    const layer_weights_t *L;
    if (weights_acquire(model_weights(ma), 0, WEIGHTS_DENSE, &L) != 0) return 1;
    const model_hparams_t *hp = model_hparams(ma);
    const gguf_tensor_t *to = gguf_find_tensor(g, "blk.0.attn_output.weight");
    const gguf_tensor_t *td = gguf_find_tensor(g, "blk.0.ffn_down.weight");
    if (!to || !td) return 1;
    const double o_copy = time_product(&L->wo, reps), d_copy = time_product(&L->w_down, reps);
    const double o_str = time_strided(to, (int64_t)ar.h0 * hp->head_dim, (int64_t)ar.h1 * hp->head_dim, reps);
    const double d_str = time_strided(td, ar.f0, ar.f1, reps);
    printf("attn_output %lld x %lld (%s): contiguous copy %.3f ms, in place at the row stride %.3f ms\n",
           (long long)L->wo.rows, (long long)L->wo.cols, qtype_name(L->wo.type), o_copy, o_str);
    printf("ffn_down    %lld x %lld (%s): contiguous copy %.3f ms, in place at the row stride %.3f ms\n",
           (long long)L->w_down.rows, (long long)L->w_down.cols, qtype_name(L->w_down.type), d_copy, d_str);
    printf("per token over %d blocks: copy %.2f ms, strided %.2f ms\n", hp->n_layer,
           hp->n_layer * (o_copy + d_copy), hp->n_layer * (o_str + d_str));
    weights_release(model_weights(ma), 0, WEIGHTS_DENSE);
    model_destroy(&me);
    model_destroy(&ma);
    gguf_close(&g);
    return 0;
}
