// Planner suite: splits cover every unit once, follow speed, replicate KV heads, respect budgets.
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan.h"
#include "test_util.h"
#include "worker/err.h"

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
            CU_ASSERT_EQUAL_FATAL(plan_tp(m, nodes, n, 256, p, err, sizeof err), 0);
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
    CU_ASSERT_EQUAL_FATAL(plan_tp(m, nodes, 3, 128, p, err, sizeof err), 0);
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
    CU_ASSERT_EQUAL_FATAL(plan_tp(m, nodes, 2, 64, p, err, sizeof err), 0);
    CU_ASSERT(p->shard[0].peak_bytes <= 4u << 20);
    CU_ASSERT(p->shard[1].weight_bytes > 2 * p->shard[0].weight_bytes);
    // Too little memory in all: refused, naming how much is missing.
    CU_ASSERT_EQUAL_FATAL(plan_parse_nodes("1:2M,1:2M", nodes, 4, err, sizeof err), 2);
    CU_ASSERT_EQUAL(plan_tp(m, nodes, 2, 64, p, err, sizeof err), MLM_EFULL);
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

int test_plan_suite(void) {
    CU_pSuite s = CU_add_suite("plan", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "splits tile every unit for 1..8 nodes", test_cover_every_unit) ||
        !CU_add_test(s, "faster nodes get more, KV heads replicated", test_speed_and_replication) ||
        !CU_add_test(s, "memory budgets shift work or refuse", test_budgets) ||
        !CU_add_test(s, "node and size specs", test_parse))
        return -1;
    return 0;
}
