// Planner suite: splits cover every unit once, follow speed and budgets; layout search, cost, plan files.
#include <CUnit/CUnit.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan.h"
#include "worker/model/model.h"
#include "test_util.h"
#include "core/err.h"

// --- helpers

static model_t *load(const char *rel) {
    char path[1024], err[512];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = false};
    if (model_load(&m, test_shared_path(path, sizeof path, rel), &lo, err, sizeof err) != 0)
        fprintf(stderr, "plan test: %s\n", err);
    return m;
}

// Ranges [lo, hi) of consecutive nodes must tile [0, total) in order.
static int tiles(const plan_t *p, int total, int which) {
    int at = 0;
    for (int i = 0; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        int lo = which == 0 ? s->s.h0 : which == 1 ? s->s.e0 : which == 2 ? s->s.f0 : s->s.v0;
        int hi = which == 0 ? s->s.h1 : which == 1 ? s->s.e1 : which == 2 ? s->s.f1 : s->s.v1;
        if (lo != at || hi < lo) return 0;
        at = hi;
    }
    return at == total;
}

// --- tests

static void test_cover_every_unit(void) {
    const char *models[] = {"models/stories260K.gguf", "models/llama-2-tiny-random.gguf",
                            "models/synth/synth-dense-Q4_K_M.gguf", "models/synth/synth-moe-Q8_0.gguf"};
    plan_t *p = malloc(sizeof *p);
    for (size_t k = 0; k < sizeof models / sizeof *models; k++) {
        model_t *m = load(models[k]);
        CU_ASSERT_PTR_NOT_NULL_FATAL(m);
        const model_hparams_t *hp = model_hparams(m);
        for (int n = 1; n <= 8; n++) {
            plan_node_t nodes[8];
            char err[256];
            CU_ASSERT_EQUAL(plan_parse_nodes("8", nodes, 8, err, sizeof err), 8);
            CU_ASSERT_EQUAL_FATAL(plan_tp(model_gguf(m), nodes, n, 256, p, err, sizeof err), 0);
            CU_ASSERT(tiles(p, hp->n_head, 0));
            CU_ASSERT(tiles(p, hp->n_embd, 1));
            CU_ASSERT(tiles(p, hp->n_ff, 2));
            CU_ASSERT(tiles(p, hp->n_vocab, 3));
            int group = hp->n_head / hp->n_head_kv;
            for (int i = 0; i < n; i++) {
                const plan_shard_t *s = &p->shard[i];
                if (s->s.h1 > s->s.h0) { // its KV heads are exactly those its query heads use
                    CU_ASSERT_EQUAL(s->s.kv0, s->s.h0 / group);
                    CU_ASSERT_EQUAL(s->s.kv1, (s->s.h1 - 1) / group + 1);
                }
                CU_ASSERT(s->peak_bytes >= s->weight_bytes + s->kv_bytes);
            }
        }
        model_destroy(&m);
    }
    free(p);
}

static void test_speed_and_replication(void) {
    model_t *m = load("models/synth/synth-dense-Q8_0.gguf"); // 8 heads, 2 KV heads, FFN 768
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    plan_node_t nodes[4];
    char err[256];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("2,1,1", nodes, 4, err, sizeof err), 3);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_EQUAL_FATAL(plan_tp(model_gguf(m), nodes, 3, 128, p, err, sizeof err), 0);
    // Twice as fast: half the heads, FFN units and hidden rows.
    CU_ASSERT_EQUAL(p->shard[0].s.h1 - p->shard[0].s.h0, 4);
    CU_ASSERT_EQUAL(p->shard[1].s.h1 - p->shard[1].s.h0, 2);
    CU_ASSERT_EQUAL(p->shard[0].s.f1 - p->shard[0].s.f0, 384);
    CU_ASSERT_EQUAL(p->shard[0].s.e1 - p->shard[0].s.e0, 128);
    CU_ASSERT(p->shard[0].weight_bytes > p->shard[1].weight_bytes * 17 / 10);
    // Nodes 1 and 2 share KV head 1 (heads 4-5 and 6-7): replicated, not split.
    CU_ASSERT_EQUAL(p->shard[1].s.kv0, 1);
    CU_ASSERT_EQUAL(p->shard[2].s.kv0, 1);
    CU_ASSERT_EQUAL(p->shard[1].kv_bytes, p->shard[2].kv_bytes);
    free(p);
    model_destroy(&m);
}

static void test_budgets(void) {
    model_t *m = load("models/synth/synth-dense-F32.gguf"); // ~13 MB of weights
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    plan_node_t nodes[4];
    char err[512] = "";
    plan_t *p = malloc(sizeof *p);
    // A small budget on node 0 moves work to node 1 while both stay within budget.
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:4M,1", nodes, 4, err, sizeof err), 2);
    CU_ASSERT_EQUAL_FATAL(plan_tp(model_gguf(m), nodes, 2, 64, p, err, sizeof err), 0);
    CU_ASSERT(p->shard[0].peak_bytes <= 4u << 20);
    CU_ASSERT(p->shard[1].weight_bytes > 2 * p->shard[0].weight_bytes);
    // Too little memory in all: refused, naming how much is missing.
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:2M,1:2M", nodes, 4, err, sizeof err), 2);
    CU_ASSERT_EQUAL(plan_tp(model_gguf(m), nodes, 2, 64, p, err, sizeof err), MLM_EFULL);
    CU_ASSERT(strstr(err, "does not fit") != NULL);
    CU_ASSERT(strstr(err, "short") != NULL);
    free(p);
    model_destroy(&m);
}

static void test_parse(void) {
    plan_node_t nodes[8];
    char err[256];
    uint64_t b = 0;
    CU_ASSERT_EQUAL(plan_parse_size("512M", &b), 0);
    CU_ASSERT_EQUAL(b, 512ull << 20);
    CU_ASSERT_EQUAL(plan_parse_size("1.5G", &b), 0);
    CU_ASSERT_EQUAL(b, 3ull << 29);
    CU_ASSERT_EQUAL(plan_parse_size("12Q", &b), MLM_EINVAL);
    CU_ASSERT_EQUAL(plan_parse_nodes("3", nodes, 8, err, sizeof err), 3);
    CU_ASSERT_EQUAL(plan_parse_nodes("2,1:1G", nodes, 8, err, sizeof err), 2);
    CU_ASSERT_EQUAL(nodes[1].mem_budget, 1ull << 30);
    CU_ASSERT(plan_parse_nodes("0", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(plan_parse_nodes("9", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(plan_parse_nodes("1,-2", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(plan_parse_nodes("1,,1", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(plan_parse_nodes("1:lots", nodes, 8, err, sizeof err) < 0);
}

// --- helpers: whole plans

// NULL when p is a well-formed plan of pm over its offered nodes (stages tile the blocks in order,
// each stage's rows tile every unit, vocabulary rows only on the first and last stage, every node
// at most once and within its budget, resident or streaming by plan_window's rule; in all-reduce
// mode every member holds every hidden row and its column cuts fall on quant blocks); otherwise
// what is wrong.
static const char *plan_problem(const plan_model_t *pm, const plan_t *p) {
    static char why[160];
    if (p->n < 1 || p->n_stages < 1 || p->stage_first[0] != 0 || p->stage_first[p->n_stages] != p->n) return "stage bounds";
    if (p->tp_mode != PLAN_TP_EXACT && p->tp_mode != PLAN_TP_ALLREDUCE) return "tp mode";
    const bool ar = p->tp_mode == PLAN_TP_ALLREDUCE;
    bool used[PLAN_MAX_NODES] = {0};
    int at = 0;
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        if (b <= a) return "an empty stage";
        const int l0 = p->shard[a].s.l0, l1 = p->shard[a].s.l1;
        if (l0 != at || l1 <= l0) return "layers do not tile";
        at = l1;
        const bool vocab = l0 == 0 || l1 == pm->n_layer;
        int h = 0, e = 0, f = 0, v = 0;
        for (int i = a; i < b; i++) {
            const plan_shard_t *s = &p->shard[i];
            if (s->s.l0 != l0 || s->s.l1 != l1) return "members differ in layers";
            if (s->stage != k) return "stage field";
            if (s->node < 0 || s->node >= p->n_nodes || used[s->node]) return "node used twice or not offered";
            used[s->node] = true;
            if (s->s.h0 != h || s->s.f0 != f || s->s.v0 != v) return "rows do not tile";
            if (ar ? s->s.e0 != 0 || s->s.e1 != pm->n_embd : s->s.e0 != e) return "hidden rows";
            if (ar && b - a > 1 && ((s->s.h0 * pm->head_dim) % pm->col_block[PLAN_W_O] ||
                                    s->s.f0 % pm->col_block[PLAN_W_DOWN]))
                return "an all-reduce column cut inside a quant block";
            h = s->s.h1, e = s->s.e1, f = s->s.f1, v = s->s.v1;
            const int group = pm->n_head / pm->n_head_kv;
            if (s->s.h1 > s->s.h0 && (s->s.kv0 != s->s.h0 / group || s->s.kv1 != (s->s.h1 - 1) / group + 1))
                return "KV heads";
            const uint64_t bud = p->node[s->node].mem_budget;
            if (bud && s->peak_bytes > bud) {
                snprintf(why, sizeof why, "node %d over budget: %llu > %llu", s->node,
                         (unsigned long long)s->peak_bytes, (unsigned long long)bud);
                return why;
            }
            // The shard's window is what plan_window gives for its slice and budget.
            plan_stream_t st;
            if (plan_window(pm, &s->s, p->tp_mode, p->n_ctx, p->resident_only ? 0 : bud, &st) != 0) return "plan_window refuses it";
            if (memcmp(&st, &s->st, sizeof st) != 0) return "window differs from plan_window's";
            if (s->peak_bytes != s->st.peak_bytes) return "peak is not the window's";
            if (!s->st.streams) {
                if (s->peak_bytes < s->weight_bytes + s->kv_bytes) return "peak below weights + KV";
                if (s->disk_ms != 0) return "disk time without streaming";
            } else {
                if (!bud) return "streams without a budget";
                if (s->st.window < 1 && s->st.pinned < s->st.n_units) return "units stream without a window";
                if (s->st.peak_bytes != s->st.resident_bytes + (uint64_t)s->st.window * s->st.unit_bytes)
                    return "peak is not resident + window";
                if (s->st.stream_bytes > 0 && !(s->disk_ms > 0)) return "streams without disk time";
                if (s->st.min_budget > bud) return "budget below the minimum";
            }
        }
        if (h != pm->n_head || e != pm->n_embd || f != pm->n_ff) return "a stage's rows do not cover the units";
        if (v != (vocab ? pm->n_vocab : 0)) return "vocabulary rows on the wrong stages";
    }
    if (at != pm->n_layer) return "layers do not reach n_layer";
    if (!(p->cost.token_ms > 0) || !(p->cost.prefill_tok_s > 0)) return "no cost";
    if (p->cost.disk_ms < 0 || (p->cost.token_ms < p->cost.comm_ms)) return "cost parts";
    return NULL;
}

#define ASSERT_PLAN(pm, p)                                                                                            \
    do {                                                                                                               \
        const char *prob_ = plan_problem(pm, p);                                                                       \
        if (prob_) fprintf(stderr, "plan %s: %s\n", (p)->layout, prob_);                                               \
        CU_ASSERT_PTR_NULL(prob_);                                                                                     \
    } while (0)

static plan_model_t *preset(const char *name, const char *quant) {
    plan_model_t *pm = malloc(sizeof *pm);
    char err[256];
    if (pm && plan_model_from_preset(name, quant, pm, err, sizeof err) != 0) {
        fprintf(stderr, "plan test: %s\n", err);
        free(pm);
        return NULL;
    }
    return pm;
}

static bool uses_node(const plan_t *p, int node) {
    for (int i = 0; i < p->n; i++)
        if (p->shard[i].node == node) return true;
    return false;
}

// --- tests: the planner

static void test_model_description(void) {
    // A described file gives the same byte counts plan_tp always had.
    model_t *m = load("models/synth/synth-moe-Q8_0.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    plan_model_t *pm = malloc(sizeof *pm);
    char err[256];
    CU_ASSERT_EQUAL_FATAL(plan_model_from_gguf(model_gguf(m), pm, err, sizeof err), 0);
    const model_hparams_t *hp = model_hparams(m);
    CU_ASSERT_EQUAL(pm->n_layer, hp->n_layer);
    CU_ASSERT_EQUAL(pm->n_expert, hp->n_expert);
    plan_node_t nodes[1];
    plan_parse_nodes("1", nodes, 1, err, sizeof err);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_EQUAL_FATAL(plan_tp(model_gguf(m), nodes, 1, 64, p, err, sizeof err), 0);
    // One node holds every weight: its bytes are the file's tensors (rope factors aside).
    CU_ASSERT(p->shard[0].weight_bytes <= hp->weight_bytes);
    CU_ASSERT(p->shard[0].weight_bytes * 100 >= hp->weight_bytes * 99);
    CU_ASSERT(p->cost.token_ms > 0);
    model_destroy(&m);
    // Presets: TinyLlama Q4_0 weighs what llama.cpp's file does (582 MB read per token, plus the
    // embedding table, of which a token reads one row).
    CU_ASSERT_EQUAL_FATAL(plan_model_from_preset("tinyllama-1.1b", "Q4_0", pm, err, sizeof err), 0);
    const double read = (double)pm->weight_bytes - (double)pm->embd_row_bytes * pm->n_vocab;
    CU_ASSERT(read > 575e6 && read < 590e6);
    CU_ASSERT_DOUBLE_EQUAL(pm->bytes_per_weight, 18.0 / 32, 1e-9);
    CU_ASSERT_EQUAL_FATAL(plan_model_from_preset("mixtral-8x7b", "Q4_K", pm, err, sizeof err), 0);
    CU_ASSERT(pm->weight_bytes > 24ull << 30 && pm->weight_bytes < 28ull << 30); // 46.7 B weights at 4.5 bits
    CU_ASSERT_EQUAL(plan_model_from_preset("llama-9", "Q4_0", pm, err, sizeof err), MLM_ENOTFOUND);
    CU_ASSERT(strstr(err, "llama-2-70b") != NULL);
    CU_ASSERT_EQUAL(plan_model_from_preset("tiny", "Q9_9", pm, err, sizeof err), MLM_EINVAL);
    // A row length the type's blocks do not divide falls back to a type that takes it.
    CU_ASSERT_EQUAL(plan_model_from_preset("tiny", "Q4_K", pm, err, sizeof err), 0);
    CU_ASSERT(pm->row_bytes[0][PLAN_W_Q] > 0);
    free(p);
    free(pm);
}

static void test_faster_node_gets_more(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("3,1", nodes, 4, err, sizeof err), 2);
    plan_t *p = malloc(sizeof *p);
    // Two stages: the three times faster node takes about three quarters of the blocks.
    plan_opts_t o = {.n_ctx = 512, .pp = 2, .tp = 1, .keep_all = true};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 2, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_EQUAL(p->n_stages, 2);
    CU_ASSERT_EQUAL(p->shard[0].s.l1 - p->shard[0].s.l0, 17); // 22 * 3/4 = 16.5, the tie to the first stage
    CU_ASSERT_STRING_EQUAL(p->layout, "pp2");
    // One group: three quarters of every kind of row.
    o.pp = 1, o.tp = 2;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 2, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_EQUAL(p->shard[0].s.h1 - p->shard[0].s.h0, 24);
    CU_ASSERT_EQUAL(p->shard[0].s.f1 - p->shard[0].s.f0, 4224);
    CU_ASSERT_EQUAL(p->shard[0].s.e1 - p->shard[0].s.e0, 1536);
    CU_ASSERT(p->shard[0].weight_bytes > 2 * p->shard[1].weight_bytes);
    // Measured figures outrank speed: a node with twice the gflops of the other gets twice the rows
    // (decode on 20 GB/s memory stays compute-bound at these rates).
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1,1", nodes, 4, err, sizeof err), 2);
    nodes[0].gflops = 10;
    nodes[1].gflops = 5;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 2, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_EQUAL(p->shard[0].s.h1 - p->shard[0].s.h0, 21); // 2/3 of 32
    free(p);
    free(pm);
}

static void test_budgets_and_refusal(void) {
    plan_model_t *pm = preset("llama-2-7b", "Q4_0"); // 3.6 GiB of weights, 0.5 GiB of KV at 1024 positions
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512] = "";
    plan_t *p = malloc(sizeof *p), *alts = malloc(sizeof *alts * 4);
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:2G,1:2G,1:1G,1", nodes, 4, err, sizeof err), 4);
    plan_opts_t o = {.n_ctx = 1024, .keep_all = true};
    int n_alts = 0;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    for (int i = 0; i < n_alts; i++) ASSERT_PLAN(pm, &alts[i]);
    // Without the unlimited node: 5 GiB for 4.2 GiB of need, still fits, every node within budget.
    o.keep_all = false;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 3, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_EQUAL(p->n, 3); // every node is needed for the memory
    // 3 GiB cannot hold it resident: without streaming refused, naming how much is missing and where.
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:1G,1:1G,1:1G", nodes, 4, err, sizeof err), 3);
    o.no_stream = true;
    CU_ASSERT_EQUAL(plan_make(pm, nodes, 3, &o, p, alts, 4, &n_alts, err, sizeof err), MLM_EFULL);
    CU_ASSERT(strstr(err, "does not fit") != NULL);
    CU_ASSERT(strstr(err, "missing") != NULL);
    CU_ASSERT(strstr(err, "short") != NULL);
    CU_ASSERT(strstr(err, "GiB") != NULL);
    CU_ASSERT_EQUAL(n_alts, 0);
    // Streaming, it runs on them: every node holds a window of its blocks within its budget.
    o.no_stream = false;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 3, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_STRING_EQUAL(p->layout, "tp3");
    for (int i = 0; i < p->n; i++) CU_ASSERT(p->shard[i].st.streams && p->shard[i].peak_bytes <= 1u << 30);
    CU_ASSERT(p->cost.disk_ms > 0);
    free(p);
    free(alts);
    free(pm);
}

static void test_slow_link_left_out(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1@0.05/10000,1@0.05/10000,1@0.05/10000,1@20/10", nodes, 4, err, sizeof err),
                          4);
    CU_ASSERT_DOUBLE_EQUAL(nodes[3].lat_us, 20000, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(nodes[3].link_bw, 10e6 / 8, 1e-9);
    plan_t *p = malloc(sizeof *p), *alts = malloc(sizeof *alts * 4);
    plan_opts_t o = {.n_ctx = 1024};
    int n_alts = 0;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_STRING_EQUAL(p->layout, "tp3"); // fast links: the other three share every layer
    CU_ASSERT(!uses_node(p, 3));
    CU_ASSERT(strstr(p->why, "node-3 left out") != NULL);
    CU_ASSERT(strstr(p->why, "20 ms / 10 Mbit link") != NULL);
    const double without = p->cost.token_ms;
    o.keep_all = true;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_EQUAL(p->n, 4);
    CU_ASSERT(uses_node(p, 3));
    CU_ASSERT(p->cost.token_ms > without);
    free(p);
    free(alts);
    free(pm);
}

// The one line run/bench print when nodes are left out, and the brief plan print, on the same slow link.
static void test_left_out_line(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512], line[512], want[600];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1@0.05/10000,1@0.05/10000,1@0.05/10000,1@20/10", nodes, 4, err, sizeof err),
                          4);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    plan_opts_t o = {.n_ctx = 1024};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_left_out(p, 0, "workers", line, sizeof line), 1);
    snprintf(want, sizeof want, "the plan uses 3 of 4 workers: %s", p->why);
    CU_ASSERT_STRING_EQUAL(line, want);
    CU_ASSERT_EQUAL(strncmp(line, "the plan uses 3 of 4 workers: node-3 left out: its 20 ms / 10 Mbit link", 71), 0);
    CU_ASSERT_EQUAL(plan_left_out(p, 1, "workers", line, sizeof line), 1); // node 0 is a computing coordinator
    CU_ASSERT_EQUAL(strncmp(line, "the plan uses 2 of 3 workers: ", 30), 0);
    CU_ASSERT_EQUAL(plan_left_out(p, 0, "workers", NULL, 0), 1);

    // the brief print: layout, then which node holds which layers and heads
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    plan_print_brief(p, f);
    fclose(f);
    CU_ASSERT_EQUAL(strncmp(text, "plan tp3: 1 stage(s) on 3 node(s), predicted ", 45), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\n  stage 0: layers 0-21 on node-0 (heads 0-"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "), node-2 (heads "));
    CU_ASSERT_PTR_NULL(strstr(text, "node-3"));
    free(text);

    // every node kept: nothing to say, and the buffer is left alone
    o.keep_all = true;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    strcpy(line, "untouched");
    CU_ASSERT_EQUAL(plan_left_out(p, 0, "workers", line, sizeof line), 0);
    CU_ASSERT_STRING_EQUAL(line, "untouched");

    // a hand-written plan without node 3: the names come from the plan, the reason is its why
    plan_spec_t spec;
    CU_ASSERT_EQUAL_FATAL(plan_file_parse("stage layers=0-10 nodes=0\nstage layers=11-21 nodes=1,2\n", &spec, err,
                                          sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(plan_from_spec(pm, nodes, 4, &spec, 1024, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_left_out(p, 0, "nodes", line, sizeof line), 1);
    CU_ASSERT_STRING_EQUAL(line, "the plan uses 3 of 4 nodes: node-3 left out (a hand-written plan)");
    f = open_memstream(&text, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    plan_print_brief(p, f);
    fclose(f);
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\n  stage 0: layers 0-10 on node-0 ("));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\n  stage 1: layers 11-21 on node-1 (heads 0-"));
    free(text);
    free(p);
    free(pm);
}

static void test_prediction_is_consistent(void) {
    const char *specs[] = {"1@0.05/10000,1@0.05/10000,1@0.05/10000,1@0.05/10000", "1@1/1000,1@1/1000,1@1/1000,1@1/1000",
                           "4:600M,2:600M,1:400M,1:400M,1"};
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_t *p = malloc(sizeof *p), *alts = malloc(sizeof *alts * 8), *again = malloc(sizeof *again);
    for (size_t k = 0; k < sizeof specs / sizeof *specs; k++) {
        plan_node_t nodes[8];
        char err[512];
        const int n = plan_parse_nodes(specs[k], nodes, 8, err, sizeof err);
        plan_opts_t o = {.n_ctx = 2048};
        int n_alts = 0;
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, n, &o, p, alts, 8, &n_alts, err, sizeof err), 0);
        ASSERT_PLAN(pm, p);
        CU_ASSERT(n_alts >= 2);
        for (int i = 0; i < n_alts; i++) {
            ASSERT_PLAN(pm, &alts[i]);
            CU_ASSERT(p->cost.token_ms <= alts[i].cost.token_ms);
            CU_ASSERT(strcmp(p->layout, alts[i].layout) != 0);
            if (i) CU_ASSERT(alts[i - 1].cost.token_ms <= alts[i].cost.token_ms);
        }
        // The cost is a function of the plan: predicting again gives the same figures.
        *again = *p;
        plan_predict(pm, again);
        CU_ASSERT_DOUBLE_EQUAL(again->cost.token_ms, p->cost.token_ms, 1e-9);
        CU_ASSERT(fabs(p->cost.token_ms - (p->cost.comm_ms + fmax(p->cost.compute_ms, p->cost.memory_ms))) <
                  p->cost.token_ms * 0.5 + 1e-9);
    }
    // Fast links and equal nodes: tensor parallelism over all four beats one node; slow links: one node.
    plan_node_t nodes[4];
    char err[512];
    plan_parse_nodes(specs[0], nodes, 4, err, sizeof err);
    plan_opts_t o = {.n_ctx = 2048};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(p->layout, "tp4");
    CU_ASSERT(strstr(p->why, "all 4 nodes") != NULL);
    plan_parse_nodes("1@5/100,1@5/100,1@5/100,1@5/100", nodes, 4, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(p->layout, "tp1");
    CU_ASSERT_EQUAL(p->shard[0].node, 0); // the coordinator's own machine: nothing to send it
    free(p);
    free(alts);
    free(again);
    free(pm);
}

static void test_forced_pp_tp(void) {
    const char *models[] = {"tinyllama-1.1b", "mixtral-8x7b"};
    for (size_t k = 0; k < 2; k++) {
        plan_model_t *pm = preset(models[k], "Q4_0");
        CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
        plan_node_t nodes[4];
        char err[512];
        plan_parse_nodes("2,1,1,1", nodes, 4, err, sizeof err);
        plan_t *p = malloc(sizeof *p);
        plan_opts_t o = {.n_ctx = 1024, .pp = 2, .tp = 2};
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
        ASSERT_PLAN(pm, p);
        CU_ASSERT_EQUAL(p->n_stages, 2);
        CU_ASSERT_EQUAL(p->stage_first[1], 2);
        CU_ASSERT_EQUAL(p->n, 4);
        CU_ASSERT_STRING_EQUAL(p->layout, "pp2xtp2");
        CU_ASSERT(strstr(p->why, "--pp 2 --tp 2") != NULL);
        // The faster stage (nodes 0 and 1: 3 of 5 speed units) holds more blocks.
        CU_ASSERT(p->shard[0].s.l1 > pm->n_layer / 2);
        // Three stages of one: the middle stage holds no vocabulary rows (checked by ASSERT_PLAN).
        o.pp = 3, o.tp = 1;
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
        ASSERT_PLAN(pm, p);
        CU_ASSERT_EQUAL(p->n_stages, 3);
        CU_ASSERT_EQUAL(p->shard[1].s.v1, 0);
        // Impossible requests are refused.
        o.pp = 3, o.tp = 2;
        CU_ASSERT_EQUAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), MLM_EINVAL);
        o.pp = 0, o.tp = 3, o.keep_all = true;
        CU_ASSERT_EQUAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), MLM_EINVAL);
        free(p);
        free(pm);
    }
}

static void test_pin_first(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    // Node 0 is slow and far away: left out unless pinned.
    plan_parse_nodes("0.2@10/50,1@0.05/10000,1@0.05/10000", nodes, 4, err, sizeof err);
    plan_t *p = malloc(sizeof *p);
    plan_opts_t o = {.n_ctx = 1024};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 3, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT(!uses_node(p, 0));
    CU_ASSERT(strstr(p->why, "node-0 left out") != NULL);
    o.pin_first = true;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 3, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_EQUAL(p->shard[0].node, 0);
    CU_ASSERT_EQUAL(p->shard[0].stage, 0);
    free(p);
    free(pm);
}

// Writes p to a string in the plan file format (caller frees).
static char *plan_text(const plan_t *p) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return NULL;
    int rc = plan_file_write(p, f);
    fclose(f);
    if (rc != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

static void test_plan_file_round_trip(void) {
    plan_model_t *pm = preset("llama-2-7b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    const char *specs[] = {"3:2G,2:2G,1:1G,1:1G", "1,1,1,1,1", "2:1500M,1,1:700M"};
    plan_t *p = malloc(sizeof *p), *q = malloc(sizeof *q);
    plan_spec_t *spec = malloc(sizeof *spec);
    for (size_t k = 0; k < sizeof specs / sizeof *specs; k++) {
        for (int pp = 1; pp <= 2; pp++) {
            plan_node_t nodes[8];
            char err[512];
            const int n = plan_parse_nodes(specs[k], nodes, 8, err, sizeof err);
            plan_opts_t o = {.n_ctx = 1024, .pp = pp, .keep_all = true};
            int rc = plan_make(pm, nodes, n, &o, p, NULL, 0, NULL, err, sizeof err);
            if (rc == MLM_EINVAL) continue;
            CU_ASSERT_EQUAL_FATAL(rc, 0);
            char *text = plan_text(p);
            CU_ASSERT_PTR_NOT_NULL_FATAL(text);
            CU_ASSERT(strstr(text, "# meshlm plan v1") == text);
            CU_ASSERT_EQUAL_FATAL(plan_file_parse(text, spec, err, sizeof err), 0);
            CU_ASSERT_EQUAL(spec->n_stages, p->n_stages);
            rc = plan_from_spec(pm, nodes, n, spec, 1024, q, err, sizeof err);
            if (rc) fprintf(stderr, "%s\n%s\n", text, err);
            CU_ASSERT_EQUAL_FATAL(rc, 0);
            CU_ASSERT_EQUAL(q->n, p->n);
            CU_ASSERT_EQUAL(q->n_stages, p->n_stages);
            for (int i = 0; i < p->n; i++) {
                CU_ASSERT(memcmp(&q->shard[i].s, &p->shard[i].s, sizeof p->shard[i].s) == 0);
                CU_ASSERT_EQUAL(q->shard[i].node, p->shard[i].node);
                CU_ASSERT_EQUAL(q->shard[i].stage, p->shard[i].stage);
                CU_ASSERT_EQUAL(q->shard[i].peak_bytes, p->shard[i].peak_bytes);
            }
            CU_ASSERT_STRING_EQUAL(q->layout, p->layout);
            CU_ASSERT_DOUBLE_EQUAL(q->cost.token_ms, p->cost.token_ms, 1e-9);
            free(text);
        }
    }
    // A hand-written plan without weights: split by speed; with weights: as given.
    plan_node_t nodes[4];
    char err[512];
    plan_parse_nodes("2,1,1,1", nodes, 4, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(plan_file_parse("# meshlm plan v1\n\nstage layers=0-9 nodes=0,1  # first\n"
                                          "stage layers=10-31 nodes=3:1,2:3\n",
                                          spec, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(plan_from_spec(pm, nodes, 4, spec, 1024, q, err, sizeof err), 0);
    ASSERT_PLAN(pm, q);
    CU_ASSERT_STRING_EQUAL(q->layout, "pp2xtp2");
    CU_ASSERT_EQUAL(q->shard[0].s.h1, 21);  // 2:1 of 32 heads
    CU_ASSERT_EQUAL(q->shard[2].node, 3);
    CU_ASSERT_EQUAL(q->shard[2].s.h1, 8);   // 1:3 of 32 heads
    CU_ASSERT_EQUAL(q->shard[2].s.l0, 10);
    free(spec);
    free(p);
    free(q);
    free(pm);
}

static void test_plan_file_errors(void) {
    static const struct {
        const char *text;
        int rc;           // from parse (MLM_OK: parse passes and plan_from_spec fails with from_rc)
        int from_rc;
        const char *want; // in the message
    } cases[] = {
        {"stage layers=0-x nodes=0\n", MLM_EFORMAT, 0, "line 1: bad layer range"},
        {"\n\nstgae layers=0-31 nodes=0\n", MLM_EFORMAT, 0, "line 3: expected 'stage'"},
        {"stage nodes=0\n", MLM_EFORMAT, 0, "line 1: a stage needs layers="},
        {"stage layers=0-31\n", MLM_EFORMAT, 0, "line 1: a stage needs nodes="},
        {"stage layers=0-31 nodes=0:-1\n", MLM_EFORMAT, 0, "line 1: bad node '0:-1'"},
        {"stage layers=0-31 nodes=0,,1\n", MLM_EFORMAT, 0, "line 1: bad node list"},
        {"stage layers=0-31 nodes=0 speed=2\n", MLM_EFORMAT, 0, "line 1: unknown key 'speed'"},
        {"stage layers=9-3 nodes=0\n", MLM_EFORMAT, 0, "line 1: layer range 9-3 runs backwards"},
        {"# meshlm plan v9\nstage layers=0-31 nodes=0\n", MLM_EUNSUPPORTED, 0, "line 1: plan file version 9"},
        {"# nothing\n", MLM_EFORMAT, 0, "no 'stage' lines"},
        {"stage layers=0-10 nodes=0\nstage layers=12-31 nodes=1\n", 0, MLM_EINVAL, "line 2: layers 12-31"},
        {"stage layers=1-31 nodes=0\n", 0, MLM_EINVAL, "line 1: layers 1-31 do not start"},
        {"stage layers=0-31 nodes=0,0\n", 0, MLM_EINVAL, "line 1: node 0 is already in the stage on line 1"},
        {"stage layers=0-10 nodes=1\n# c\nstage layers=11-31 nodes=2,1\n", 0, MLM_EINVAL,
         "line 3: node 1 is already in the stage on line 1"},
        {"# c\nstage layers=0-31 nodes=5\n", 0, MLM_EINVAL, "line 2: node 5 is not offered"},
        {"stage layers=0-10 nodes=0\n", 0, MLM_EINVAL, "line 1: the stages cover layers 0-10 but the model has 0-31"},
        {"stage layers=0-40 nodes=0\n", 0, MLM_EINVAL, "line 1: layers 0-40 run past"},
        {"stage layers=0-31 nodes=0:1,1\n", 0, MLM_EINVAL, "line 1: give a :weight to every node"},
        {"tp mode=fast\nstage layers=0-31 nodes=0\n", MLM_EFORMAT, 0, "line 1: unknown mode 'fast'"},
        {"tp\nstage layers=0-31 nodes=0\n", MLM_EFORMAT, 0, "line 1: 'tp' needs mode="},
        {"tp mode=exact mode=allreduce\n", MLM_EFORMAT, 0, "line 1: expected 'tp mode=exact|allreduce'"},
        {"tp mode=exact\n# c\ntp mode=allreduce\n", MLM_EFORMAT, 0, "line 3: a second 'tp' line"},
        {"# meshlm plan v3\nstage layers=0-31 nodes=0\n", MLM_EUNSUPPORTED, 0, "plan file version 3 is newer"},
        {"stage layers=0-15 nodes=0\nstage layers=16-31 nodes=1:1,2:9\n", 0, MLM_EFULL,
         "line 2: node 2 (node-2) needs at least "},
    };
    plan_model_t *pm = preset("llama-2-7b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    plan_parse_nodes("1,1:3G,1:200M", nodes, 4, err, sizeof err); // node 2: too small even to stream 9/10 of a stage
    plan_spec_t *spec = malloc(sizeof *spec);
    plan_t *p = malloc(sizeof *p);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        err[0] = 0;
        int rc = plan_file_parse(cases[k].text, spec, err, sizeof err);
        if (rc == 0) rc = plan_from_spec(pm, nodes, 3, spec, 1024, p, err, sizeof err);
        const int want = cases[k].rc ? cases[k].rc : cases[k].from_rc;
        if (rc != want || !strstr(err, cases[k].want))
            fprintf(stderr, "case %zu: rc %d (want %d), '%s' (want '%s')\n", k, rc, want, err, cases[k].want);
        CU_ASSERT_EQUAL(rc, want);
        CU_ASSERT(strstr(err, cases[k].want) != NULL);
    }
    // Files: errors name the file.
    char *dir = test_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/bad.plan", dir);
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs("stage layers=0-31 nodes=0\nstage\n", f);
    fclose(f);
    CU_ASSERT_EQUAL(plan_file_load(path, spec, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT(strstr(err, "bad.plan: line 2") != NULL);
    snprintf(path, sizeof path, "%s/missing.plan", dir);
    CU_ASSERT_EQUAL(plan_file_load(path, spec, err, sizeof err), MLM_EIO);
    CU_ASSERT_EQUAL(strncmp(err, path, strlen(path)), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, strerror(ENOENT)));
    test_rm_dir(dir);
    free(spec);
    free(p);
    free(pm);
}

static void test_nodes_file(void) {
    plan_node_t nodes[8];
    char err[256];
    const char *text = "# lab\n"
                       "desk   gflops=80 mem_bw=40G mem=16G lat_ms=0.2 mbit=1000\n"
                       "\n"
                       "pi-4 speed=0.25 mem=3.5G lat_us=900 mbit=100  # wifi\n";
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes_file(text, nodes, 8, err, sizeof err), 2);
    CU_ASSERT_STRING_EQUAL(nodes[0].name, "desk");
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].gflops, 80, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].mem_bw, 40e9, 1e-3);
    CU_ASSERT_EQUAL(nodes[0].mem_budget, 16ull << 30);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].lat_us, 200, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].link_bw, 125e6, 1e-3);
    CU_ASSERT_DOUBLE_EQUAL(nodes[1].speed, 0.25, 1e-12);
    CU_ASSERT_EQUAL(nodes[1].mem_budget, 7ull << 29);
    CU_ASSERT_DOUBLE_EQUAL(nodes[1].lat_us, 900, 1e-9);
    CU_ASSERT(plan_parse_nodes_file("a gflops=1\nb gflop=2\n", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(strstr(err, "line 2: unknown key 'gflop'") != NULL);
    CU_ASSERT(plan_parse_nodes_file("a mem=lots\n", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(strstr(err, "line 1: bad value 'lots' for mem") != NULL);
    CU_ASSERT(plan_parse_nodes_file("speed=2\n", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(plan_parse_nodes_file("# none\n", nodes, 8, err, sizeof err) < 0);
    // The command-line form with links.
    CU_ASSERT_EQUAL(plan_parse_nodes("1:4G@1/1000,2@0.5/100", nodes, 8, err, sizeof err), 2);
    CU_ASSERT_EQUAL(nodes[0].mem_budget, 4ull << 30);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].lat_us, 1000, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(nodes[1].link_bw, 12.5e6, 1e-3);
    CU_ASSERT(plan_parse_nodes("1@1", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT(plan_parse_nodes("1@1/0", nodes, 8, err, sizeof err) < 0);
}

static void test_70b_on_small_nodes(void) {
    plan_model_t *pm = preset("llama-2-70b", "Q4_0"); // 36 GiB of weights
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("2:16G@0.2/1000,1.5:12G@0.2/1000,1:8G@0.5/1000,0.5:6G@1/300", nodes, 4,
                                           err, sizeof err), 4);
    plan_t *p = malloc(sizeof *p), *alts = malloc(sizeof *alts * 4);
    plan_opts_t o = {.n_ctx = 4096};
    int n_alts = 0;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    CU_ASSERT_EQUAL(p->n, 4); // 42 GiB offered for about 38 needed: every node must hold a part
    for (int i = 0; i < n_alts; i++) ASSERT_PLAN(pm, &alts[i]);
    for (int i = 0; i < p->n; i++) CU_ASSERT(!p->shard[i].st.streams); // it fits resident: nothing streams
    CU_ASSERT_EQUAL(p->cost.disk_ms, 0);
    // 8G/8G/4G/2G is 22 GiB: resident only, refused with the missing amount; streaming, a plan.
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("2:8G,1.5:8G,1:4G,0.5:2G", nodes, 4, err, sizeof err), 4);
    o.no_stream = true;
    CU_ASSERT_EQUAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), MLM_EFULL);
    CU_ASSERT(strstr(err, "GiB missing") != NULL);
    o.no_stream = false;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    for (int i = 0; i < n_alts; i++) ASSERT_PLAN(pm, &alts[i]);
    CU_ASSERT(p->cost.disk_ms > 0);
    // At 2.6 bits per weight (Q2_K) and 1024 positions it fits in the same 22 GiB resident.
    free(pm);
    pm = preset("llama-2-70b", "Q2_K");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    o.n_ctx = 512;
    o.no_stream = true;
    int rc = plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err);
    if (rc) fprintf(stderr, "70b Q2_K: %s\n", err);
    CU_ASSERT_EQUAL(rc, 0);
    if (rc == 0) ASSERT_PLAN(pm, p);
    free(p);
    free(alts);
    free(pm);
}

static void test_random_node_sets(void) {
    const char *presets[] = {"tinyllama-1.1b", "llama-2-7b", "mixtral-8x7b", "llama-3-8b", "tiny"};
    const char *quants[] = {"Q4_0", "Q8_0", "Q4_K", "F16"};
    plan_t *p = malloc(sizeof *p), *alts = malloc(sizeof *alts * 3);
    plan_spec_t *spec = malloc(sizeof *spec);
    uint64_t rng = 12345;
    int ok = 0, full = 0, streamed = 0, allreduce = 0; // plans in which a node streams; all-reduce plans
    for (int it = 0; it < 100; it++) {
        plan_model_t *pm = preset(presets[test_rng_next(&rng) % 5], quants[test_rng_next(&rng) % 4]);
        CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
        const int n = 1 + (int)(test_rng_next(&rng) % (it % 10 == 9 ? 40 : 12));
        plan_node_t nodes[PLAN_MAX_NODES];
        memset(nodes, 0, sizeof nodes);
        double total = 0;
        for (int i = 0; i < n; i++) {
            snprintf(nodes[i].name, sizeof nodes[i].name, "r%d", i);
            nodes[i].speed = 0.25 * (double)(1 + test_rng_next(&rng) % 8);
            if (test_rng_next(&rng) % 2) nodes[i].gflops = 5 + (double)(test_rng_next(&rng) % 100);
            if (test_rng_next(&rng) % 2) nodes[i].mem_bw = 5e9 + (double)(test_rng_next(&rng) % 50) * 1e9;
            if (test_rng_next(&rng) % 3 || it % 4 == 3) {
                const double frac = it % 4 == 3 ? 0.02 + (double)(test_rng_next(&rng) % 100) / 500 // small: streams
                                                 : 0.1 + (double)(test_rng_next(&rng) % 100) / 100;
                nodes[i].mem_budget = (uint64_t)((double)pm->weight_bytes * frac);
                total += (double)nodes[i].mem_budget;
            }
            if (test_rng_next(&rng) % 2) nodes[i].lat_us = 20 + (double)(test_rng_next(&rng) % 20000);
            if (test_rng_next(&rng) % 2) nodes[i].link_bw = 1e6 + (double)(test_rng_next(&rng) % 1000) * 1e6;
            if (test_rng_next(&rng) % 2) nodes[i].disk_bw = 50e6 + (double)(test_rng_next(&rng) % 3000) * 1e6;
            if (test_rng_next(&rng) % 3 == 0) nodes[i].disk_id = 1 + (int)(test_rng_next(&rng) % 3);
        }
        plan_opts_t o = {.n_ctx = 64 << (test_rng_next(&rng) % 6)};
        const unsigned r = (unsigned)(test_rng_next(&rng) % 8);
        o.keep_all = r == 1;
        o.pin_first = r == 2 || r == 3;
        if (r == 4) o.pp = 1 + (int)(test_rng_next(&rng) % (unsigned)n);
        if (r == 5) o.tp = 1 + (int)(test_rng_next(&rng) % (unsigned)n);
        o.heuristic = r == 6;
        o.tp_mode = (plan_tp_mode_t)(test_rng_next(&rng) % 3);
        o.no_stream = test_rng_next(&rng) % 5 == 0;
        char err[512] = "";
        int n_alts = 0;
        const int rc = plan_make(pm, nodes, n, &o, p, alts, 3, &n_alts, err, sizeof err);
        if (rc == 0) {
            ok++;
            ASSERT_PLAN(pm, p);
            if (o.pin_first) CU_ASSERT_EQUAL(p->shard[0].node, 0);
            if (o.keep_all) CU_ASSERT_EQUAL(p->n, n);
            if (o.pp) CU_ASSERT_EQUAL(p->n_stages, o.pp);
            for (int i = 0; o.no_stream && i < p->n; i++) CU_ASSERT(!p->shard[i].st.streams);
            bool any = false;
            for (int i = 0; i < p->n; i++) any |= p->shard[i].st.streams;
            streamed += any;
            allreduce += p->tp_mode == PLAN_TP_ALLREDUCE;
            CU_ASSERT(p->cost.exact_ms > 0 || p->cost.allreduce_ms > 0);
            if (o.tp_mode == PLAN_TP_AUTO && p->cost.exact_ms > 0 && p->cost.allreduce_ms > 0)
                CU_ASSERT(p->cost.token_ms <= fmin(p->cost.exact_ms, p->cost.allreduce_ms) * (1 + 1e-9));
            if (o.tp_mode != PLAN_TP_AUTO && p->tp_mode == PLAN_TP_ALLREDUCE) CU_ASSERT_EQUAL(o.tp_mode, PLAN_TP_ALLREDUCE);
            for (int i = 0; i < n_alts; i++) {
                ASSERT_PLAN(pm, &alts[i]);
                CU_ASSERT(p->cost.token_ms <= alts[i].cost.token_ms * (1 + 1e-9));
            }
            // Its plan file reproduces it.
            char *text = plan_text(p);
            CU_ASSERT_PTR_NOT_NULL_FATAL(text);
            CU_ASSERT_EQUAL(plan_file_parse(text, spec, err, sizeof err), 0);
            plan_t *q = &alts[0];
            CU_ASSERT_EQUAL(plan_from_spec(pm, nodes, n, spec, o.n_ctx, q, err, sizeof err), 0);
            CU_ASSERT_EQUAL(q->tp_mode, p->tp_mode);
            for (int i = 0; i < p->n; i++) CU_ASSERT(memcmp(&q->shard[i].s, &p->shard[i].s, sizeof q->shard[i].s) == 0);
            free(text);
        } else {
            full += rc == MLM_EFULL;
            CU_ASSERT(rc == MLM_EFULL || rc == MLM_EINVAL);
            CU_ASSERT(strlen(err) > 10);
        }
        (void)total;
        free(pm);
    }
    CU_ASSERT(ok > 50);
    if (streamed < 10 || allreduce < 5) fprintf(stderr, "random plans: %d stream, %d all-reduce\n", streamed, allreduce);
    CU_ASSERT(streamed >= 10 && allreduce >= 5);
    free(spec);
    free(p);
    free(alts);
}

static void test_heuristic_close_to_exhaustive(void) {
    plan_model_t *pm = preset("llama-2-13b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_t *p = malloc(sizeof *p), *h = malloc(sizeof *h);
    uint64_t rng = 777;
    double worst = 1;
    for (int it = 0; it < 20; it++) {
        const int n = 5 + (int)(test_rng_next(&rng) % 4);
        plan_node_t nodes[8];
        memset(nodes, 0, sizeof nodes);
        for (int i = 0; i < n; i++) {
            snprintf(nodes[i].name, sizeof nodes[i].name, "h%d", i);
            nodes[i].speed = 0.5 + (double)(test_rng_next(&rng) % 4);
            nodes[i].mem_budget = (uint64_t)(2 + test_rng_next(&rng) % 8) << 30;
            nodes[i].lat_us = (double)(50 + test_rng_next(&rng) % 3000);
            nodes[i].link_bw = (double)(10 + test_rng_next(&rng) % 1000) * 1e6;
        }
        char err[512];
        plan_opts_t o = {.n_ctx = 2048};
        const int rc = plan_make(pm, nodes, n, &o, p, NULL, 0, NULL, err, sizeof err);
        o.heuristic = true;
        const int rh = plan_make(pm, nodes, n, &o, h, NULL, 0, NULL, err, sizeof err);
        CU_ASSERT_EQUAL(rc, rh);
        if (rc || rh) continue;
        ASSERT_PLAN(pm, h);
        CU_ASSERT(p->cost.token_ms <= h->cost.token_ms * (1 + 1e-9)); // exhaustive is the optimum
        worst = fmax(worst, h->cost.token_ms / p->cost.token_ms);
    }
    if (worst > 1.1) fprintf(stderr, "heuristic worst ratio %.3f\n", worst);
    CU_ASSERT(worst < 1.25);
    // 64 nodes: the heuristic answers and tiles.
    plan_node_t nodes[PLAN_MAX_NODES];
    char err[512];
    memset(nodes, 0, sizeof nodes);
    for (int i = 0; i < PLAN_MAX_NODES; i++) {
        snprintf(nodes[i].name, sizeof nodes[i].name, "n%d", i);
        nodes[i].speed = 0.5 + (double)(i % 4);
        nodes[i].mem_budget = (uint64_t)(1 + i % 3) << 30;
        nodes[i].lat_us = i % 5 ? 100 : 5000;
    }
    plan_opts_t o = {.n_ctx = 2048};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, PLAN_MAX_NODES, &o, h, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, h);
    free(p);
    free(h);
    free(pm);
}

// --- tests: weight streaming

// A 4-way exact share of llama-2-70b: nodes' quarter of every block, first and last stage.
static shard_slice_t quarter_70b(void) {
    shard_slice_t s = shard_full(80, 64, 8, 8192, 28672, 32000);
    s.h1 = 16, s.kv1 = 2, s.e1 = 2048, s.f1 = 7168, s.v1 = 8000;
    return s;
}

static void test_window_rule(void) {
    plan_model_t *pm = preset("llama-2-70b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    const shard_slice_t s = quarter_70b();
    plan_stream_t st, st2;
    // One block of the share by hand: Q4_0 rows of 8192 are 4608 bytes, of 28672 16128 bytes.
    const uint64_t block = 2048ull * 4608 + 2 * 256ull * 4608 + 2048ull * 4608 + 2 * 7168ull * 4608 +
                           2048ull * 16128 + 2 * 4 * 8192;
    const uint64_t out_rows = 8000ull * 4608, embd_rows = 8000ull * 4608;
    const uint64_t kv = 80ull * 4096 * 256 * 2 * 2; // 2 KV heads of 128, K and V in F16
    // No budget: everything resident, as before streaming.
    CU_ASSERT_EQUAL_FATAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, 0, &st), 0);
    CU_ASSERT(!st.streams);
    CU_ASSERT_EQUAL(st.n_units, 81);
    CU_ASSERT_EQUAL(st.pinned, 81);
    CU_ASSERT_EQUAL(st.window, 0);
    CU_ASSERT_EQUAL(st.stream_bytes, 0);
    CU_ASSERT_EQUAL(st.unit_bytes, block);
    CU_ASSERT_EQUAL(st.pinned_bytes, 80 * block + out_rows);
    const uint64_t fixed = st.fixed_bytes;
    CU_ASSERT(fixed > kv && fixed < kv + (64ull << 20)); // KV + activations + output norm
    CU_ASSERT_EQUAL(st.peak_bytes, fixed + 80 * block + out_rows + embd_rows);
    CU_ASSERT_EQUAL(st.min_budget, fixed + block);
    const uint64_t resident = st.peak_bytes;
    // A budget that holds it: the same.
    CU_ASSERT_EQUAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, resident, &st2), 0);
    CU_ASSERT(!st2.streams);
    CU_ASSERT_EQUAL(st2.peak_bytes, resident);
    // 2 GiB: two buffers, the first blocks kept, the rest read every token.
    const uint64_t two = 2ull << 30;
    CU_ASSERT_EQUAL_FATAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, two, &st), 0);
    CU_ASSERT(st.streams);
    CU_ASSERT_EQUAL(st.window, 2);
    CU_ASSERT_EQUAL(st.pinned, (int)((two - fixed - 2 * block) / block));
    CU_ASSERT_EQUAL(st.pinned_bytes, (uint64_t)st.pinned * block);
    CU_ASSERT_EQUAL(st.resident_bytes, fixed + st.pinned_bytes);
    CU_ASSERT_EQUAL(st.peak_bytes, fixed + st.pinned_bytes + 2 * block);
    CU_ASSERT(st.peak_bytes <= two && st.peak_bytes + block > two);
    // Streamed: the other blocks, the output rows and a quarter of a token's embedding row on average.
    CU_ASSERT_EQUAL(st.stream_bytes, (uint64_t)(80 - st.pinned) * block + out_rows + 4608 / 4);
    // At the minimum: one buffer, nothing kept; a byte less is refused with the minimum named.
    CU_ASSERT_EQUAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, st.min_budget, &st2), 0);
    CU_ASSERT(st2.streams);
    CU_ASSERT_EQUAL(st2.window, 1);
    CU_ASSERT_EQUAL(st2.pinned, 0);
    CU_ASSERT_EQUAL(st2.peak_bytes, st.min_budget);
    CU_ASSERT_EQUAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, st.min_budget - 1, &st2), MLM_ERANGE);
    CU_ASSERT_EQUAL(st2.min_budget, st.min_budget);
    // More budget keeps more and reads less, and the peak stays within the budget.
    uint64_t last_stream = UINT64_MAX;
    int last_pinned = -1;
    for (uint64_t bud = st.min_budget; bud < resident; bud += 97ull << 20) {
        CU_ASSERT_EQUAL_FATAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, bud, &st2), 0);
        CU_ASSERT(st2.peak_bytes <= bud);
        CU_ASSERT(st2.pinned >= last_pinned && st2.stream_bytes <= last_stream);
        const int left = st2.n_units - st2.pinned, w = bud >= fixed + 2 * block ? 2 : 1; // at most the units left
        CU_ASSERT_EQUAL(st2.window, left < w ? left : w);
        last_pinned = st2.pinned, last_stream = st2.stream_bytes;
    }
    // Every block except the embedding rows fits: everything kept, only the token's row is read.
    CU_ASSERT_EQUAL(plan_window(pm, &s, PLAN_TP_EXACT, 4096, resident - 1, &st2), 0);
    CU_ASSERT(st2.streams);
    CU_ASSERT_EQUAL(st2.pinned, 81);
    CU_ASSERT_EQUAL(st2.window, 0);
    CU_ASSERT_EQUAL(st2.stream_bytes, 4608 / 4);
    // The all-reduce cut of the same quarter (columns of attn_output and ffn_down) weighs the same.
    shard_slice_t c = s;
    c.e0 = 0, c.e1 = 8192;
    CU_ASSERT_EQUAL(plan_window(pm, &c, PLAN_TP_ALLREDUCE, 4096, two, &st2), 0);
    CU_ASSERT_EQUAL(st2.unit_bytes, block);
    CU_ASSERT_EQUAL(st2.pinned, st.pinned);
    // Slices outside the model and unknown modes are refused.
    c.f1 = 30000;
    CU_ASSERT_EQUAL(plan_window(pm, &c, PLAN_TP_EXACT, 4096, two, &st2), MLM_EINVAL);
    CU_ASSERT_EQUAL(plan_window(pm, &s, PLAN_TP_AUTO, 4096, two, &st2), MLM_EINVAL);
    free(pm);
}

// Prints a plan's --explain and JSON into strings (caller frees).
static void reports(const plan_model_t *pm, const plan_t *p, const plan_t *alts, int n_alts, char **explain,
                    char **json) {
    size_t len = 0;
    FILE *f = open_memstream(explain, &len);
    plan_explain(f, pm, p, alts, n_alts);
    fclose(f);
    f = open_memstream(json, &len);
    plan_write_json(f, pm, p, alts, n_alts);
    fclose(f);
}

static void test_70b_streams_on_2g_nodes(void) {
    plan_model_t *pm = preset("llama-2-70b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:2G,1:2G,1:2G,1:2G", nodes, 4, err, sizeof err), 4);
    plan_t *p = malloc(sizeof *p), *alts = malloc(sizeof *alts * 4);
    plan_opts_t o = {.n_ctx = 4096};
    int n_alts = 0;
    const int rc = plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err);
    if (rc) fprintf(stderr, "70b on 4 x 2G: %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    ASSERT_PLAN(pm, p);
    for (int i = 0; i < n_alts; i++) ASSERT_PLAN(pm, &alts[i]);
    // Tensor parallelism: every node streams only its quarter.
    CU_ASSERT_STRING_EQUAL(p->layout, "tp4");
    CU_ASSERT_EQUAL(p->tp_mode, PLAN_TP_EXACT);
    const double disk_bw = PLAN_DEFAULT_DISK_BW * PLAN_DISK_EFFICIENCY;
    for (int i = 0; i < 4; i++) {
        const plan_shard_t *s = &p->shard[i];
        CU_ASSERT(s->st.streams);
        CU_ASSERT_EQUAL(s->st.window, 2);
        CU_ASSERT(s->st.pinned > 0 && s->st.pinned < s->st.n_units);
        CU_ASSERT(s->peak_bytes <= 2ull << 30);
        CU_ASSERT_DOUBLE_EQUAL(s->disk_ms, (double)s->st.stream_bytes / disk_bw * 1e3, 1e-6);
        CU_ASSERT(s->weight_bytes > 9ull << 30 && s->weight_bytes < 10ull << 30);
    }
    // Disk-bound: the time per token is the reads plus the last unit's compute and exchanges.
    const double d = p->shard[0].disk_ms;
    CU_ASSERT(d > 8100 && d < 9000); // about 8.2 GB at 950 MB/s
    CU_ASSERT(p->cost.token_ms >= d);
    CU_ASSERT(p->cost.token_ms <= d + (p->cost.compute_ms + p->cost.comm_ms) / 40 + p->cost.comm_ms);
    CU_ASSERT_DOUBLE_EQUAL(p->cost.disk_ms, d, 1e-9);
    CU_ASSERT(p->cost.exact_ms == p->cost.token_ms && p->cost.allreduce_ms > 0);
    // --explain and --json carry the same per node.
    char *ex = NULL, *js = NULL, want[160];
    reports(pm, p, alts, n_alts, &ex, &js);
    CU_ASSERT_PTR_NOT_NULL(strstr(ex, "| tp mode   |"));
    CU_ASSERT_PTR_NOT_NULL(strstr(ex, "tensor-parallel modes of tp4: exact "));
    CU_ASSERT_PTR_NOT_NULL(strstr(ex, "disk ms"));
    snprintf(want, sizeof want, "| %-16s | %11.1f |", "2 (12/81 units)", (double)p->shard[0].st.stream_bytes / 1e6);
    if (p->shard[0].st.pinned == 12) CU_ASSERT_PTR_NOT_NULL(strstr(ex, want));
    snprintf(want, sizeof want, "| %9.2f |", p->shard[3].disk_ms);
    CU_ASSERT_PTR_NOT_NULL(strstr(ex, want));
    CU_ASSERT_PTR_NOT_NULL(strstr(js, "\"tp_mode\": \"exact\""));
    CU_ASSERT_PTR_NOT_NULL(strstr(js, "\"streams\": true, \"n_units\": 81"));
    snprintf(want, sizeof want, "\"disk_ms\": %.4f", p->shard[0].disk_ms);
    CU_ASSERT_PTR_NOT_NULL(strstr(js, want));
    free(ex);
    free(js);
    // Below the minimum of every layout: refused, naming the smallest budget it needs.
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:400M,1:400M,1:400M,1:400M", nodes, 4, err, sizeof err), 4);
    CU_ASSERT_EQUAL(plan_make(pm, nodes, 4, &o, p, alts, 4, &n_alts, err, sizeof err), MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "does not fit even streaming"));
    plan_stream_t st;
    const shard_slice_t q = quarter_70b();
    plan_window(pm, &q, PLAN_TP_EXACT, 4096, 0, &st);
    CU_ASSERT(st.min_budget > 400u << 20 && st.min_budget < 1u << 30);
    snprintf(want, sizeof want, "needs a budget of at least %.1f MiB", (double)st.min_budget / (1 << 20));
    if (!strstr(err, want)) fprintf(stderr, "want '%s' in '%s'\n", want, err);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, want)); // tp4 is the layout that needs least per node
    free(p);
    free(alts);
    free(pm);
}

// Token time of llama-2-70b on the node list, tensor parallel over all of them.
static double tp_ms(const plan_model_t *pm, const char *spec, plan_t *p) {
    plan_node_t nodes[PLAN_MAX_NODES];
    char err[512];
    const int n = plan_parse_nodes(spec, nodes, PLAN_MAX_NODES, err, sizeof err);
    plan_opts_t o = {.n_ctx = 4096, .pp = 1, .keep_all = true};
    if (n < 1 || plan_make(pm, nodes, n, &o, p, NULL, 0, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", spec, err);
        return -1;
    }
    ASSERT_PLAN(pm, p);
    return p->cost.token_ms;
}

// Nodes of one host (shm_id) price a tensor-parallel group's exchanges at shared-memory cost: per
// token 89 collectives (4 all-gathers per block of 22, the embedding row) at PLAN_SHM_LAT_US and a
// copy of every block, against a 1 ms link latency each; a group over two hosts keeps the link's price.
// Nodes on one machine's cores (cpu_id, cores, threads): a tensor-parallel group's members compute at
// once, so 4 one-thread members on 2 cores (r = 2 threads per core) each take r = 2 times their time
// alone and the time-sharing's loss on top, 1 + PLAN_OVERSUB_LOSS: 3 times (3 members, r = 1.5:
// 1.5 * 1.25; 4 cores: alone; 2 threads each on 2 cores, r = 4: 6 times); a pipeline's stages compute
// in turn in decode, so 4 stages on 2 cores keep their time; parse errors name the field.
static void test_shared_cores(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_FATAL(tp_ms(pm, "1@1/1000,1@1/1000,1@1/1000,1@1/1000", p) > 0);
    const double alone = p->shard[0].memory_ms, alone_c = p->shard[0].compute_ms;
    CU_ASSERT(alone > 0);
    const char *two = "1@1/1000:cpu_id=1:cores=2:threads=1";
    char spec[512];
    snprintf(spec, sizeof spec, "%s,%s,%s,%s", two, two, two, two);
    CU_ASSERT_FATAL(tp_ms(pm, spec, p) > 0);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].memory_ms, 2 * (1 + PLAN_OVERSUB_LOSS) * alone, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[3].compute_ms, 2 * (1 + PLAN_OVERSUB_LOSS) * alone_c, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(PLAN_OVERSUB_LOSS, 0.5, 1e-12); // the figures below
    CU_ASSERT_FATAL(tp_ms(pm, "1@1/1000,1@1/1000,1@1/1000", p) > 0);
    const double alone3 = p->shard[0].memory_ms;
    snprintf(spec, sizeof spec, "%s,%s,%s", two, two, two);
    CU_ASSERT_FATAL(tp_ms(pm, spec, p) > 0);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].memory_ms, 1.5 * 1.25 * alone3, 1e-9);
    const char *four = "1@1/1000:cpu_id=1:cores=4:threads=1";
    snprintf(spec, sizeof spec, "%s,%s,%s,%s", four, four, four, four);
    CU_ASSERT_FATAL(tp_ms(pm, spec, p) > 0);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].memory_ms, alone, 1e-9);
    const char *busy = "1@1/1000:cpu_id=1:cores=2:threads=2";
    snprintf(spec, sizeof spec, "%s,%s,%s,%s", busy, busy, busy, busy);
    CU_ASSERT_FATAL(tp_ms(pm, spec, p) > 0);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].memory_ms, 4 * 1.5 * alone, 1e-9);
    // two machines of 2 cores, 2 members each: no slowdown
    snprintf(spec, sizeof spec, "%s,%s,1@1/1000:cpu_id=2:cores=2:threads=1,1@1/1000:cpu_id=2:cores=2:threads=1", two, two);
    CU_ASSERT_FATAL(tp_ms(pm, spec, p) > 0);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].memory_ms, alone, 1e-9);
    // a pipeline of 4 stages: decode keeps each stage's time
    plan_node_t nodes[4];
    char err[256];
    plan_opts_t o = {.n_ctx = 4096, .pp = 4, .keep_all = true};
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1@1/1000,1@1/1000,1@1/1000,1@1/1000", nodes, 4, err, sizeof err), 4);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    const double pp_alone = p->cost.token_ms;
    snprintf(spec, sizeof spec, "%s,%s,%s,%s", two, two, two, two);
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes(spec, nodes, 4, err, sizeof err), 4);
    CU_ASSERT(nodes[2].cpu_id == 1 && nodes[2].cores == 2 && nodes[2].threads == 1);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_DOUBLE_EQUAL(p->cost.token_ms, pp_alone, 1e-9);
    CU_ASSERT_EQUAL(plan_parse_nodes("1:cores=0", nodes, 2, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad cores '0'"));
    CU_ASSERT_EQUAL(plan_parse_nodes("1:threads=x", nodes, 2, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad threads 'x'"));
    CU_ASSERT_EQUAL(plan_parse_nodes_file("a speed=1 cpu_id=2 cores=8 threads=4\n", nodes, 2, err, sizeof err), 1);
    CU_ASSERT(nodes[0].cpu_id == 2 && nodes[0].cores == 8 && nodes[0].threads == 4);
    CU_ASSERT_EQUAL(plan_parse_nodes_file("a speed=1 cores=0\n", nodes, 2, err, sizeof err), MLM_EFORMAT);
    free(p);
    free(pm);
}

static void test_shm_group(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_FATAL(tp_ms(pm, "1@1/1000,1@1/1000", p) > 0);
    const double link = p->shard[0].comm_ms;
    CU_ASSERT(link > 89 * 1.0);
    CU_ASSERT_FATAL(tp_ms(pm, "1@1/1000:shm_id=1,1@1/1000:shm_id=1", p) > 0);
    // every block's 4 all-gathers copy 2048 + 2048 + 5632 + 2048 floats, the embedding row 2048
    const double bytes = 4.0 * (22 * (2048 + 2048 + 5632 + 2048) + 2048);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].comm_ms, 89 * PLAN_SHM_LAT_US / 1e3 + bytes / PLAN_SHM_BW * 1e3, 1e-9);
    CU_ASSERT_FATAL(tp_ms(pm, "1@1/1000:shm_id=1,1@1/1000:shm_id=2", p) > 0);
    CU_ASSERT_DOUBLE_EQUAL(p->shard[0].comm_ms, link, 1e-9);
    plan_node_t nodes[2];
    char err[256];
    CU_ASSERT_EQUAL(plan_parse_nodes("1:shm_id=0", nodes, 2, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad shm_id '0'"));
    CU_ASSERT_EQUAL(plan_parse_nodes_file("a speed=1 shm_id=3\n", nodes, 2, err, sizeof err), 1);
    CU_ASSERT_EQUAL(nodes[0].shm_id, 3);
    free(p);
    free(pm);
}

static void test_disk_bandwidth_and_nodes(void) {
    plan_model_t *pm = preset("llama-2-70b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_t *p = malloc(sizeof *p);
    // A slower disk: slower tokens, in proportion while the disk binds.
    const double fast = tp_ms(pm, "1:2G:disk=950M,1:2G:disk=950M,1:2G:disk=950M,1:2G:disk=950M", p);
    const double fast_disk = p->cost.disk_ms;
    const double slow = tp_ms(pm, "1:2G:disk=400M,1:2G:disk=400M,1:2G:disk=400M,1:2G:disk=400M", p);
    CU_ASSERT(fast > 0 && slow > fast * 2.2);
    CU_ASSERT_DOUBLE_EQUAL(p->cost.disk_ms / fast_disk, 950.0 / 400.0, 1e-6);
    // One slow disk: the split moves rows off it, so the group is slower than with four fast disks but
    // well ahead of four slow ones.
    const double one_slow = tp_ms(pm, "1:2G,1:2G,1:2G,1:2G:disk=400M", p);
    CU_ASSERT(one_slow > fast && one_slow < 0.6 * slow);
    CU_ASSERT(p->shard[3].s.f1 - p->shard[3].s.f0 < p->shard[0].s.f1 - p->shard[0].s.f0);
    // More nodes in a tensor-parallel group: each streams less, the token is faster.
    const double t2 = tp_ms(pm, "1:2G,1:2G", p);
    const double d2 = p->shard[0].st.stream_bytes;
    const double t8 = tp_ms(pm, "1:2G,1:2G,1:2G,1:2G,1:2G,1:2G,1:2G,1:2G", p);
    const double d8 = p->shard[0].st.stream_bytes;
    CU_ASSERT(t2 > fast * 2 && fast > t8 * 1.5);
    CU_ASSERT(d2 > 3 * d8);
    // Four workers of one machine read one disk: they share it, together at PLAN_DISK_PARALLEL
    // times one reader's bandwidth.
    const double shared = tp_ms(pm, "1:2G:disk_id=1,1:2G:disk_id=1,1:2G:disk_id=1,1:2G:disk_id=1", p);
    CU_ASSERT_DOUBLE_EQUAL(p->cost.disk_ms / fast_disk, 4.0 / PLAN_DISK_PARALLEL, 1e-9);
    CU_ASSERT(shared > 0.95 * 4.0 / PLAN_DISK_PARALLEL * fast);
    // A pipeline's stages read in turn, so a shared disk costs it little (but it gets no parallel
    // reads either); with a disk each, tensor parallelism reads four disks at once and wins.
    plan_node_t nodes[4];
    char err[512];
    plan_parse_nodes("1:2G:disk_id=1,1:2G:disk_id=1,1:2G:disk_id=1,1:2G:disk_id=1", nodes, 4, err, sizeof err);
    plan_opts_t o = {.n_ctx = 4096, .pp = 4, .keep_all = true};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, p);
    const double pp_shared = p->cost.token_ms;
    CU_ASSERT(pp_shared < shared * PLAN_DISK_PARALLEL * 1.1 && pp_shared > shared);
    plan_parse_nodes("1:2G,1:2G,1:2G,1:2G", nodes, 4, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(fabs(p->cost.token_ms - pp_shared) < 0.02 * pp_shared);
    CU_ASSERT(p->cost.token_ms > 3 * fast);
    // A node with memory to spare takes more of the stage and reads less.
    const double mixed = tp_ms(pm, "1:8G,1:2G,1:2G,1:2G", p);
    CU_ASSERT(mixed < fast * 0.95);
    CU_ASSERT(p->shard[0].s.h1 - p->shard[0].s.h0 > 16);
    free(p);
    free(pm);
}

// --- tests: tensor-parallel modes

static void test_tp_modes(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0"); // 22 blocks, 32 heads of 64, FFN 5632, n_embd 2048
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[8];
    char err[512];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1@1/1000,1@1/1000", nodes, 8, err, sizeof err), 2);
    plan_t *ex = malloc(sizeof *ex), *ar = malloc(sizeof *ar), *au = malloc(sizeof *au);
    plan_opts_t o = {.n_ctx = 1024, .pp = 1, .tp = 2, .keep_all = true};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 2, &o, ex, NULL, 0, NULL, err, sizeof err), 0);
    o.tp_mode = PLAN_TP_ALLREDUCE;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 2, &o, ar, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, ex);
    ASSERT_PLAN(pm, ar);
    CU_ASSERT_EQUAL(ex->tp_mode, PLAN_TP_EXACT);
    CU_ASSERT_EQUAL(ar->tp_mode, PLAN_TP_ALLREDUCE);
    // The same work, split differently: attn_output and ffn_down by columns, every hidden row.
    CU_ASSERT_DOUBLE_EQUAL(ar->cost.compute_ms, ex->cost.compute_ms, 1e-9 * ex->cost.compute_ms);
    CU_ASSERT_EQUAL(ar->shard[1].s.e0, 0);
    CU_ASSERT_EQUAL(ar->shard[1].s.e1, 2048);
    CU_ASSERT_EQUAL(ar->shard[0].weight_bytes, ex->shard[0].weight_bytes);
    // Exchanges per block by hand (1 ms, 125 MB/s): exact, 4 all-gathers of the halves of the heads'
    // outputs (16 x 64 floats), the hidden rows (1024), the FFN units (2816) and the hidden rows again;
    // all-reduce, 2 of 2048 floats, ring (2 (N-1) (L + b / (N B))) beating star (2 L + 2 (N-1) b / B).
    const double L = 1e-3, B = 125e6;
    const double exact_blk = 4 * L + 4.0 * (1024 + 1024 + 2816 + 1024) / B;
    const double ring = 2 * (L + 4.0 * 2048 / (2 * B)), star = 2 * L + 2 * 4.0 * 2048 / B;
    CU_ASSERT(ring < star);
    CU_ASSERT_DOUBLE_EQUAL(ex->cost.comm_ms - ar->cost.comm_ms, 22 * (exact_blk - 2 * ring) * 1e3, 1e-6);
    // Each knows the other's figure.
    CU_ASSERT_DOUBLE_EQUAL(ex->cost.allreduce_ms, ar->cost.token_ms, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(ar->cost.exact_ms, ex->cost.token_ms, 1e-9);
    // Latency-bound links (20 ms): both pay 4 latencies per block (2 all-reduces of 2 hops against 4
    // one-hop all-gathers) and the star sends more bytes through its root: exact is no slower, and
    // auto keeps exact. Bandwidth-bound links (0.05 ms, 100 Mbit): the ring all-reduce moves fewer
    // bytes than the exact all-gathers (no FFN-wide gather): allreduce wins and auto takes it.
    const char *specs[2] = {"1:2G@20/1000,1:2G@20/1000,1:2G@20/1000,1:2G@20/1000",
                            "1:2G@0.05/100,1:2G@0.05/100,1:2G@0.05/100,1:2G@0.05/100"};
    free(pm);
    pm = preset("llama-2-70b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    for (int k = 0; k < 2; k++) {
        CU_ASSERT_EQUAL_FATAL(plan_parse_nodes(specs[k], nodes, 8, err, sizeof err), 4);
        plan_opts_t a = {.n_ctx = 4096, .pp = 1, .keep_all = true};
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &a, ex, NULL, 0, NULL, err, sizeof err), 0);
        a.tp_mode = PLAN_TP_ALLREDUCE;
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &a, ar, NULL, 0, NULL, err, sizeof err), 0);
        a.tp_mode = PLAN_TP_AUTO;
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &a, au, NULL, 0, NULL, err, sizeof err), 0);
        ASSERT_PLAN(pm, ar);
        ASSERT_PLAN(pm, au);
        if (k == 0) {
            CU_ASSERT(ex->cost.comm_ms <= ar->cost.comm_ms);
            CU_ASSERT(ex->cost.token_ms <= ar->cost.token_ms);
            CU_ASSERT_EQUAL(au->tp_mode, PLAN_TP_EXACT);
        } else {
            CU_ASSERT(ar->cost.comm_ms < 0.8 * ex->cost.comm_ms);
            CU_ASSERT(ar->cost.token_ms < ex->cost.token_ms);
            CU_ASSERT_EQUAL(au->tp_mode, PLAN_TP_ALLREDUCE);
            CU_ASSERT_PTR_NOT_NULL(strstr(au->why, "--tp-mode auto: allreduce"));
        }
        // Auto takes the smaller of the two predictions it reports.
        CU_ASSERT_DOUBLE_EQUAL(au->cost.token_ms, fmin(au->cost.exact_ms, au->cost.allreduce_ms), 1e-9);
        CU_ASSERT_DOUBLE_EQUAL(au->cost.token_ms, fmin(ex->cost.token_ms, ar->cost.token_ms), 1e-6 * au->cost.token_ms);
    }
    // K-quants: column cuts on 256-element blocks, so heads of 128 go by twos and FFN units by 256.
    free(pm);
    pm = preset("llama-2-7b", "Q4_K");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    CU_ASSERT_EQUAL(pm->col_block[PLAN_W_O], 256);
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1,1,1", nodes, 8, err, sizeof err), 3);
    o = (plan_opts_t){.n_ctx = 1024, .pp = 1, .keep_all = true, .tp_mode = PLAN_TP_ALLREDUCE};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 3, &o, ar, NULL, 0, NULL, err, sizeof err), 0);
    ASSERT_PLAN(pm, ar);
    CU_ASSERT_EQUAL(ar->grain_heads, 2);
    CU_ASSERT_EQUAL(ar->grain_ffn, 256);
    for (int i = 0; i < 3; i++) CU_ASSERT(ar->shard[i].s.h0 % 2 == 0 && ar->shard[i].s.f0 % 256 == 0);
    // A pipeline of single nodes has no group to split: it is the same plan in either mode.
    o.pp = 3;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 3, &o, ar, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_EQUAL(ar->tp_mode, PLAN_TP_EXACT);
    CU_ASSERT_DOUBLE_EQUAL(ar->cost.exact_ms, ar->cost.allreduce_ms, 0);
    // A bad mode is refused.
    o.tp_mode = (plan_tp_mode_t)7;
    CU_ASSERT_EQUAL(plan_make(pm, nodes, 3, &o, ar, NULL, 0, NULL, err, sizeof err), MLM_EINVAL);
    free(ex);
    free(ar);
    free(au);
    free(pm);
}

static void test_plan_file_modes(void) {
    plan_model_t *pm = preset("llama-2-7b", "Q4_0");
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    plan_node_t nodes[4];
    char err[512];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("2:2G,1:2G,1:2G,1:1G", nodes, 4, err, sizeof err), 4);
    plan_t *p = malloc(sizeof *p), *q = malloc(sizeof *q);
    plan_spec_t *spec = malloc(sizeof *spec);
    for (int mode = PLAN_TP_EXACT; mode <= PLAN_TP_ALLREDUCE; mode++) {
        plan_opts_t o = {.n_ctx = 2048, .pp = 2, .tp = 2, .tp_mode = (plan_tp_mode_t)mode};
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nodes, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
        ASSERT_PLAN(pm, p);
        CU_ASSERT_EQUAL(p->tp_mode, mode);
        char *text = plan_text(p);
        CU_ASSERT_PTR_NOT_NULL_FATAL(text);
        // Exact plans stay version 1 (older meshlm reads them); all-reduce ones are version 2.
        CU_ASSERT_PTR_NOT_NULL(strstr(text, mode ? "# meshlm plan v2" : "# meshlm plan v1"));
        CU_ASSERT_EQUAL(strstr(text, "\ntp mode=allreduce\n") != NULL, mode == PLAN_TP_ALLREDUCE);
        CU_ASSERT_EQUAL_FATAL(plan_file_parse(text, spec, err, sizeof err), 0);
        CU_ASSERT_EQUAL(spec->tp_mode, mode);
        CU_ASSERT_EQUAL_FATAL(plan_from_spec(pm, nodes, 4, spec, 2048, q, err, sizeof err), 0);
        ASSERT_PLAN(pm, q);
        CU_ASSERT_EQUAL(q->tp_mode, mode);
        for (int i = 0; i < p->n; i++) {
            CU_ASSERT(memcmp(&q->shard[i].s, &p->shard[i].s, sizeof q->shard[i].s) == 0);
            CU_ASSERT_EQUAL(q->shard[i].st.window, p->shard[i].st.window);
        }
        CU_ASSERT_DOUBLE_EQUAL(q->cost.token_ms, p->cost.token_ms, 1e-9 * p->cost.token_ms);
        CU_ASSERT(q->cost.exact_ms > 0 && q->cost.allreduce_ms > 0);
        free(text);
    }
    // The mode line by hand; a v1 file is exact.
    CU_ASSERT_EQUAL(plan_file_parse("# meshlm plan v2\ntp mode=allreduce\nstage layers=0-31 nodes=0,1\n", spec, err,
                                    sizeof err), 0);
    CU_ASSERT_EQUAL(spec->tp_mode, PLAN_TP_ALLREDUCE);
    CU_ASSERT_EQUAL(plan_file_parse("stage layers=0-31 nodes=0,1\ntp mode=exact\n", spec, err, sizeof err), 0);
    CU_ASSERT_EQUAL(spec->tp_mode, PLAN_TP_EXACT);
    CU_ASSERT_EQUAL(plan_file_parse("# meshlm plan v1\nstage layers=0-31 nodes=0,1\n", spec, err, sizeof err), 0);
    CU_ASSERT_EQUAL(spec->tp_mode, PLAN_TP_EXACT);
    CU_ASSERT_EQUAL_FATAL(plan_from_spec(pm, nodes, 4, spec, 2048, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL(q->tp_mode, PLAN_TP_EXACT);
    free(spec);
    free(p);
    free(q);
    free(pm);
}

static void test_node_specs_disk(void) {
    plan_node_t nodes[8];
    char err[256];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:2G@1/1000:disk=950M:disk_id=1,2:disk=1.2G,0.5@0.5/100:4G", nodes, 8, err,
                                           sizeof err), 3);
    CU_ASSERT_EQUAL(nodes[0].mem_budget, 2ull << 30);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].lat_us, 1000, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].disk_bw, 950e6, 1e-3);
    CU_ASSERT_EQUAL(nodes[0].disk_id, 1);
    CU_ASSERT_DOUBLE_EQUAL(nodes[1].speed, 2, 1e-12);
    CU_ASSERT_EQUAL(nodes[1].mem_budget, 0);
    CU_ASSERT_DOUBLE_EQUAL(nodes[1].disk_bw, 1.2e9, 1e-3);
    CU_ASSERT_EQUAL(nodes[1].disk_id, 0);
    CU_ASSERT_DOUBLE_EQUAL(nodes[2].link_bw, 12.5e6, 1e-3);
    CU_ASSERT_EQUAL(nodes[2].mem_budget, 4ull << 30);
    static const struct {
        const char *spec, *want;
    } bad[] = {
        {"1:disk=fast", "bad disk bandwidth 'fast'"}, {"1:disk_id=0", "bad disk_id '0'"},
        {"1:2G:3G", "bad node field '3G'"},           {"1:color=red", "unknown node option 'color'"},
        {"1::2G", "an empty field"},                  {"1:2G:", "an empty field"},
        {"1@1/1000:2G@2/100", "bad link '2/100'"},    {"x:2G", "bad speed 'x'"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        err[0] = 0;
        CU_ASSERT(plan_parse_nodes(bad[k].spec, nodes, 8, err, sizeof err) < 0);
        if (!strstr(err, bad[k].want)) fprintf(stderr, "%s: '%s' (want '%s')\n", bad[k].spec, err, bad[k].want);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, bad[k].want));
    }
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes_file("a mem=2G disk=950M disk_id=3\nb disk=2G/s\n", nodes, 8, err, sizeof err),
                          2);
    CU_ASSERT_DOUBLE_EQUAL(nodes[0].disk_bw, 950e6, 1e-3);
    CU_ASSERT_EQUAL(nodes[0].disk_id, 3);
    CU_ASSERT_DOUBLE_EQUAL(nodes[1].disk_bw, 2e9, 1e-3);
    CU_ASSERT(plan_parse_nodes_file("a disk_id=x\n", nodes, 8, err, sizeof err) < 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "line 1: bad value 'x' for disk_id"));
}

// --- tests: where each node's KV lives (plan_node_t.kv_dev)

// The single node's plan of TinyLlama at 4096 positions on node nd: 0 or plan_make's code.
static int plan_one(const plan_model_t *pm, const plan_node_t *nd, plan_t *p, char *err, size_t errlen) {
    const plan_opts_t o = {.n_ctx = 4096};
    return plan_make(pm, nd, 1, &o, p, NULL, 0, NULL, err, errlen);
}

static void test_kv_devices(void) {
    plan_model_t *pm = preset("tinyllama-1.1b", "Q4_0");
    plan_t *p = malloc(sizeof *p), *q = malloc(sizeof *q);
    CU_ASSERT_PTR_NOT_NULL_FATAL(pm);
    CU_ASSERT_PTR_NOT_NULL_FATAL(p);
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    char err[512];
    const uint64_t kv = 22ull * 4096 * 4 * 64 * 2 * 2; // layers x positions x KV heads x head_dim x (k, v) x F16
    CU_ASSERT_EQUAL(kv, 92274688ull);
    // host, no budget: all of it in RAM and in the peak
    plan_node_t nd = {.name = "n", .speed = 1};
    CU_ASSERT_EQUAL_FATAL(plan_one(pm, &nd, p, err, sizeof err), 0);
    const plan_shard_t *s = &p->shard[0];
    CU_ASSERT_EQUAL(s->kv_bytes, kv);
    CU_ASSERT_EQUAL(s->kv_ram_bytes, kv);
    CU_ASSERT_EQUAL(s->kv_dev_bytes, 0);
    CU_ASSERT(!s->st.streams);
    const uint64_t peak_host = s->peak_bytes, rest = peak_host - kv; // weights + activations + output norm
    CU_ASSERT(rest > s->weight_bytes && rest < s->weight_bytes + (64ull << 20));
    // file without a fixed share, budget = rest + kv / 4: the weights stay resident and the KV gets
    // what they leave, a quarter in RAM and three quarters in the file
    nd.kv_dev = PLAN_KV_FILE;
    nd.mem_budget = rest + kv / 4;
    CU_ASSERT_EQUAL_FATAL(plan_one(pm, &nd, p, err, sizeof err), 0);
    CU_ASSERT(!s->st.streams);
    CU_ASSERT_EQUAL(s->kv_bytes, kv);
    CU_ASSERT_EQUAL(s->kv_ram_bytes, kv / 4);
    CU_ASSERT_EQUAL(s->kv_dev_bytes, kv - kv / 4);
    CU_ASSERT_EQUAL(s->peak_bytes, nd.mem_budget);
    // ... where a host node with that budget has to stream weights to hold its KV
    plan_node_t host = nd;
    host.kv_dev = PLAN_KV_HOST;
    CU_ASSERT_EQUAL_FATAL(plan_one(pm, &host, q, err, sizeof err), 0);
    CU_ASSERT(q->shard[0].st.streams);
    CU_ASSERT_EQUAL(q->shard[0].kv_ram_bytes, kv);
    CU_ASSERT(q->shard[0].peak_bytes <= host.mem_budget);
    // file with the budget of the host's peak: everything fits in RAM, nothing spills
    nd.mem_budget = peak_host;
    CU_ASSERT_EQUAL_FATAL(plan_one(pm, &nd, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(s->kv_ram_bytes, kv);
    CU_ASSERT_EQUAL(s->kv_dev_bytes, 0);
    // file with a fixed share (ram=16M): exactly that in RAM, in the peak; the rest on the device,
    // checked against its capacity
    nd.mem_budget = 0;
    nd.kv_ram = 16ull << 20;
    CU_ASSERT_EQUAL_FATAL(plan_one(pm, &nd, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(s->kv_ram_bytes, 16ull << 20);
    CU_ASSERT_EQUAL(s->kv_dev_bytes, kv - (16ull << 20));
    CU_ASSERT_EQUAL(s->peak_bytes, rest + (16ull << 20));
    nd.kv_cap = kv - (16ull << 20);
    CU_ASSERT_EQUAL(plan_one(pm, &nd, p, err, sizeof err), 0);
    nd.kv_cap = kv - (16ull << 20) - 1;
    CU_ASSERT_EQUAL(plan_one(pm, &nd, p, err, sizeof err), MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "keeps 72.0 MiB of KV on its file device, which holds 72.0 MiB"));
    // storage and pim: none of it in RAM, all of it against the device's capacity
    for (int kind = PLAN_KV_STORAGE; kind <= PLAN_KV_PIM; kind++) {
        plan_node_t d = {.name = "d", .speed = 1, .kv_dev = kind, .kv_cap = kv};
        CU_ASSERT_EQUAL_FATAL(plan_one(pm, &d, p, err, sizeof err), 0);
        CU_ASSERT_EQUAL(s->kv_ram_bytes, 0);
        CU_ASSERT_EQUAL(s->kv_dev_bytes, kv);
        CU_ASSERT_EQUAL(s->peak_bytes, rest);
        d.mem_budget = rest; // a budget that could not hold any KV on host
        CU_ASSERT_EQUAL(plan_one(pm, &d, p, err, sizeof err), 0);
        CU_ASSERT(!s->st.streams);
        d.kv_cap = kv / 2;
        err[0] = 0;
        CU_ASSERT_EQUAL(plan_one(pm, &d, p, err, sizeof err), MLM_EFULL);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, kind == PLAN_KV_PIM ? "on its pim device, which holds 44.0 MiB (44.0 MiB short)"
                                                               : "on its storage device, which holds 44.0 MiB (44.0 MiB short)"));
    }
    // Two nodes in one group: the one whose kvstore holds a quarter of the KV gets a share whose KV fits it
    // (one KV head of the four), the other the rest; without the cap they split evenly.
    plan_node_t two[2] = {{.name = "a", .speed = 1}, {.name = "b", .speed = 1, .kv_dev = PLAN_KV_STORAGE}};
    const plan_opts_t o = {.n_ctx = 4096, .tp = 2, .pp = 1, .keep_all = true};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, two, 2, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_EQUAL(p->shard[1].kv_dev_bytes, kv / 2);
    CU_ASSERT_EQUAL(p->shard[1].kv_ram_bytes, 0);
    CU_ASSERT_EQUAL(p->shard[0].kv_ram_bytes, kv / 2);
    two[1].kv_cap = kv / 4;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, two, 2, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(p->shard[1].kv_dev_bytes <= kv / 4 && p->shard[1].kv_dev_bytes > 0);
    CU_ASSERT(p->shard[1].s.h1 - p->shard[1].s.h0 < 16);
    CU_ASSERT_EQUAL(p->shard[0].kv_bytes, p->shard[0].kv_ram_bytes);
    // a hand-written plan is checked the same way, naming the line, the node and the device
    plan_spec_t *spec = malloc(sizeof *spec);
    CU_ASSERT_PTR_NOT_NULL_FATAL(spec);
    CU_ASSERT_EQUAL_FATAL(plan_file_parse("stage layers=0-21 nodes=1\n", spec, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_from_spec(pm, two, 2, spec, 4096, q, err, sizeof err), MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "line 1: node 1 (b) keeps 88.0 MiB of KV for layers 0-21 on its storage device, "
                                       "which holds 22.0 MiB"));
    two[1].kv_cap = kv;
    CU_ASSERT_EQUAL(plan_from_spec(pm, two, 2, spec, 4096, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL(q->shard[0].kv_dev_bytes, kv);
    CU_ASSERT_EQUAL(q->shard[0].kv_ram_bytes, 0);
    two[1].kv_cap = kv / 4;
    free(spec);
    // JSON carries each shard's device and bytes
    char *json = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&json, &len);
    plan_write_json(f, pm, p, NULL, 0);
    fclose(f);
    char want[160];
    snprintf(want, sizeof want, "\"kv_device\": \"storage\", \"kv_ram_bytes\": 0, \"kv_dev_bytes\": %llu, \"kv_cap\": %llu",
             (unsigned long long)p->shard[1].kv_dev_bytes, (unsigned long long)(kv / 4));
    CU_ASSERT_PTR_NOT_NULL(strstr(json, want));
    free(json);
    free(pm);
    free(p);
    free(q);
}

static void test_kv_node_specs(void) {
    plan_node_t nodes[4];
    char err[256];
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:2G:kv=file:kv_ram=64M:kv_cap=20G,1:kv=pim,1:kv=storage:kv_cap=1T,1", nodes,
                                           4, err, sizeof err), 4);
    CU_ASSERT_EQUAL(nodes[0].kv_dev, PLAN_KV_FILE);
    CU_ASSERT_EQUAL(nodes[0].kv_ram, 64ull << 20);
    CU_ASSERT_EQUAL(nodes[0].kv_cap, 20ull << 30);
    CU_ASSERT_EQUAL(nodes[0].mem_budget, 2ull << 30);
    CU_ASSERT_EQUAL(nodes[1].kv_dev, PLAN_KV_PIM);
    CU_ASSERT_EQUAL(nodes[1].kv_cap, 0);
    CU_ASSERT_EQUAL(nodes[2].kv_dev, PLAN_KV_STORAGE);
    CU_ASSERT_EQUAL(nodes[2].kv_cap, 1ull << 40);
    CU_ASSERT_EQUAL(nodes[3].kv_dev, PLAN_KV_HOST);
    CU_ASSERT(plan_parse_nodes("1:kv=disk", nodes, 4, err, sizeof err) < 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad KV device 'disk'"));
    CU_ASSERT(plan_parse_nodes("1:kv_cap=0", nodes, 4, err, sizeof err) < 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad kv_cap '0'"));
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes_file("a kv=storage kv_cap=2G\nb kv=file kv_ram=1G\n", nodes, 4, err, sizeof err),
                          2);
    CU_ASSERT_EQUAL(nodes[0].kv_dev, PLAN_KV_STORAGE);
    CU_ASSERT_EQUAL(nodes[0].kv_cap, 2ull << 30);
    CU_ASSERT_EQUAL(nodes[1].kv_dev, PLAN_KV_FILE);
    CU_ASSERT_EQUAL(nodes[1].kv_ram, 1ull << 30);
    CU_ASSERT(plan_parse_nodes_file("a kv=file:/x\n", nodes, 4, err, sizeof err) < 0);
    CU_ASSERT_EQUAL(plan_kv_dev_kind("file:/var/kv,ram=1G"), PLAN_KV_FILE);
    CU_ASSERT_EQUAL(plan_kv_dev_kind("storage:tcp://h:5700"), PLAN_KV_STORAGE);
    CU_ASSERT_EQUAL(plan_kv_dev_kind("pim:upmem"), PLAN_KV_PIM);
    CU_ASSERT_EQUAL(plan_kv_dev_kind(NULL), PLAN_KV_HOST);
    CU_ASSERT_EQUAL(plan_kv_dev_kind("files"), -1);
}

int test_plan_suite(void) {
    CU_pSuite s = CU_add_suite("plan", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "splits tile every unit for 1..8 nodes", test_cover_every_unit) ||
        !CU_add_test(s, "faster nodes get more, KV heads replicated", test_speed_and_replication) ||
        !CU_add_test(s, "memory budgets shift work or refuse", test_budgets) ||
        !CU_add_test(s, "node and size specs", test_parse) ||
        !CU_add_test(s, "model description from files and presets", test_model_description) ||
        !CU_add_test(s, "a faster node gets more blocks and rows", test_faster_node_gets_more) ||
        !CU_add_test(s, "budgets respected; a plan that cannot fit is refused", test_budgets_and_refusal) ||
        !CU_add_test(s, "a node on a slow link is left out unless keep_all", test_slow_link_left_out) ||
        !CU_add_test(s, "the chosen plan predicts no worse than any alternative", test_prediction_is_consistent) ||
        !CU_add_test(s, "forced --pp/--tp layouts tile blocks and rows", test_forced_pp_tp) ||
        !CU_add_test(s, "pin_first keeps the coordinator at rank 0", test_pin_first) ||
        !CU_add_test(s, "plan files round-trip", test_plan_file_round_trip) ||
        !CU_add_test(s, "bad plan files name the line", test_plan_file_errors) ||
        !CU_add_test(s, "left-out nodes in one line; the brief plan print", test_left_out_line) ||
        !CU_add_test(s, "node files and link specs", test_nodes_file) ||
        !CU_add_test(s, "llama-2-70b preset on four small nodes", test_70b_on_small_nodes) ||
        !CU_add_test(s, "100 random node sets", test_random_node_sets) ||
        !CU_add_test(s, "heuristic search against the exhaustive one; 64 nodes", test_heuristic_close_to_exhaustive) ||
        !CU_add_test(s, "plan_window: resident, windows, kept units, the minimum", test_window_rule) ||
        !CU_add_test(s, "llama-2-70b streams on four 2 GiB nodes", test_70b_streams_on_2g_nodes) ||
        !CU_add_test(s, "disk bandwidth, shared disks and group size", test_disk_bandwidth_and_nodes) ||
        !CU_add_test(s, "a group on one host prices shared memory", test_shm_group) ||
        !CU_add_test(s, "nodes on one machine's cores slow each other when computing at once", test_shared_cores) ||
        !CU_add_test(s, "exact and all-reduce tensor parallelism predicted", test_tp_modes) ||
        !CU_add_test(s, "plan files carry the tensor-parallel mode", test_plan_file_modes) ||
        !CU_add_test(s, "node specs with disks", test_node_specs_disk) ||
        !CU_add_test(s, "KV per node by device: RAM share, device bytes, capacity", test_kv_devices) ||
        !CU_add_test(s, "node specs with KV devices", test_kv_node_specs))
        return -1;
    return 0;
}
