// Tensor-parallel suite: N nodes (threads, in-memory gather) give the single node's logits bit for bit.
#include <CUnit/CUnit.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan.h"
#include "ref_cases.h"
#include "test_util.h"
#include "core/err.h"
#include "worker/model/model.h"

// --- helpers: an in-memory gather for threads

#define MAX_N 8

typedef struct {
    pthread_barrier_t bar;       // all nodes meet twice per gather
    const void *mine[MAX_N];     // each node's block, valid between the barriers
    size_t len[MAX_N];
} group_t;

typedef struct {
    group_t *g;
    int index;
} member_t;

static int mem_gather(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    member_t *mb = ctx;
    group_t *g = mb->g;
    g->mine[mb->index] = mine;
    g->len[mb->index] = my_len;
    pthread_barrier_wait(&g->bar);
    int n = 0, rc = 0;
    while (n < MAX_N && g->mine[n]) n++;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (g->len[i] != lens[i]) rc = MLM_EPROTO;
        else memcpy((uint8_t *)out + at, g->mine[i], lens[i]);
        at += lens[i];
    }
    pthread_barrier_wait(&g->bar);
    return rc;
}

typedef struct {
    model_t *m;                  // this node's model (holding its slice)
    model_tp_t tp;               // group description
    member_t member;
    const int32_t *tokens;
    int n_tok;
    float *logits;               // (n_tok, n_vocab) result
    int rc;
} node_run_t;

static void *node_main(void *p) {
    node_run_t *r = p;
    char err[256];
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = r->n_tok + 8, .n_batch = 11, .n_threads = 1, .tp = &r->tp};
    r->rc = model_ctx_new(&c, r->m, &co, err, sizeof err);
    if (r->rc != 0) {
        fprintf(stderr, "node %d: %s\n", r->member.index, err);
        return NULL;
    }
    // Prompt in one call, then token by token, as generation does.
    int half = r->n_tok / 2;
    r->rc = model_eval(c, r->tokens, half, r->logits, true);
    for (int i = half; r->rc == 0 && i < r->n_tok; i++)
        r->rc = model_eval(c, r->tokens + i, 1, r->logits + (size_t)i * model_hparams(r->m)->n_vocab, true);
    model_ctx_destroy(&c);
    return NULL;
}

// Runs the reference case's token sequence on n nodes with the given speeds; 0 when every node's
// logits equal the single node's bit for bit.
static int run_case(const char *case_name, const char *speeds, bool via_files) {
    ref_case_t rc;
    if (ref_load(case_name, &rc) != 0) return -1;
    char err[512];
    int n_tok = rc.n_prompt + rc.n_greedy;
    int32_t *toks = malloc((size_t)n_tok * sizeof *toks);
    memcpy(toks, rc.prompt_tokens, (size_t)rc.n_prompt * sizeof *toks);
    memcpy(toks + rc.n_prompt, rc.greedy, (size_t)rc.n_greedy * sizeof *toks);
    model_t *whole = NULL;
    CU_ASSERT_EQUAL_FATAL(model_load(&whole, rc.model_path, NULL, err, sizeof err), 0);
    const int nv = model_hparams(whole)->n_vocab;
    float *ref = malloc((size_t)n_tok * nv * sizeof(float));
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = n_tok + 8, .n_batch = 11, .n_threads = 1};
    CU_ASSERT_EQUAL_FATAL(model_ctx_new(&c, whole, &co, err, sizeof err), 0);
    int half = n_tok / 2, bad = 0;
    CU_ASSERT_EQUAL(model_eval(c, toks, half, ref, true), 0);
    for (int i = half; i < n_tok; i++) CU_ASSERT_EQUAL(model_eval(c, toks + i, 1, ref + (size_t)i * nv, true), 0);
    model_ctx_destroy(&c);

    plan_node_t nodes[MAX_N];
    int n = plan_parse_nodes(speeds, nodes, MAX_N, err, sizeof err);
    plan_t *plan = malloc(sizeof *plan);
    CU_ASSERT_EQUAL_FATAL(plan_tp(model_gguf(whole), nodes, n, n_tok + 8, plan, err, sizeof err), 0);
    shard_slice_t slices[MAX_N];
    for (int i = 0; i < n; i++) slices[i] = plan->shard[i].s;
    group_t g;
    memset(&g, 0, sizeof g);
    pthread_barrier_init(&g.bar, NULL, (unsigned)n);
    node_run_t runs[MAX_N];
    pthread_t th[MAX_N];
    char *dir = via_files ? test_tmpdir() : NULL;
    for (int i = 0; i < n; i++) {
        node_run_t *r = &runs[i];
        memset(r, 0, sizeof *r);
        model_load_opts_t lo = {.repack = true, .slice = &slices[i]};
        char path[1024];
        const char *from = rc.model_path;
        if (via_files) { // each node loads a shard file holding only its rows
            snprintf(path, sizeof path, "%s/node%d.gguf", dir, i);
            CU_ASSERT_EQUAL_FATAL(shard_file_write(model_gguf(whole), &slices[i], model_hparams(whole)->head_dim,
                                                   NULL, path, err, sizeof err), 0);
            from = path;
        }
        if (model_load(&r->m, from, &lo, err, sizeof err) != 0) {
            fprintf(stderr, "node %d load: %s\n", i, err);
            CU_FAIL_FATAL("node load");
        }
        r->member = (member_t){&g, i};
        r->tp = (model_tp_t){n, i, slices, mem_gather, &r->member, NULL, NULL};
        r->tokens = toks;
        r->n_tok = n_tok;
        r->logits = malloc((size_t)n_tok * nv * sizeof(float));
    }
    for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, node_main, &runs[i]);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < n; i++) {
        CU_ASSERT_EQUAL(runs[i].rc, 0);
        if (runs[i].rc == 0 && memcmp(runs[i].logits, ref, (size_t)n_tok * nv * sizeof(float)) != 0) {
            fprintf(stderr, "  %s on %s%s: node %d logits differ from one node's\n", case_name, speeds,
                    via_files ? " (shard files)" : "", i);
            bad++;
        }
        free(runs[i].logits);
        model_destroy(&runs[i].m);
    }
    pthread_barrier_destroy(&g.bar);
    if (dir) test_rm_dir(dir);
    free(plan);
    free(ref);
    free(toks);
    model_destroy(&whole);
    ref_free(&rc);
    return bad;
}

// --- tests

static void test_dense_layouts(void) {
    const char *cases[] = {"stories260K.p1", "synth-dense-Q4_K_M.p1", "synth-dense-Q8_0.p1", "llama-2-tiny-random.p1"};
    const char *layouts[] = {"1", "2", "3", "4", "2,1", "1,3,1", "5,1,1,2"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (size_t j = 0; j < sizeof layouts / sizeof *layouts; j++)
            CU_ASSERT_EQUAL(run_case(cases[i], layouts[j], false), 0);
}

static void test_moe_layouts(void) {
    const char *cases[] = {"synth-moe-Q4_K_M.p1", "stories260K-moe8x-top2-permuted.p0", "synth-moe-F16.p0"};
    const char *layouts[] = {"2", "3", "2,1,1"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (size_t j = 0; j < sizeof layouts / sizeof *layouts; j++)
            CU_ASSERT_EQUAL(run_case(cases[i], layouts[j], false), 0);
}

static void test_shard_file_nodes(void) {
    CU_ASSERT_EQUAL(run_case("synth-dense-Q4_0.p1", "1,2,1", true), 0);
    CU_ASSERT_EQUAL(run_case("synth-moe-Q8_0.p0", "3,1", true), 0);
}

int test_tp_suite(void) {
    CU_pSuite s = CU_add_suite("tp", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "dense models, 1-4 nodes, even and uneven", test_dense_layouts) ||
        !CU_add_test(s, "MoE models", test_moe_layouts) ||
        !CU_add_test(s, "nodes loading shard files", test_shard_file_nodes))
        return -1;
    return 0;
}
