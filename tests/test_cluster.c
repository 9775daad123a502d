// Cluster suite: real worker processes over ipc/tcp give the single node's logits bit for bit;
// shard streaming and caching; a killed worker is an error within the deadline.
#include <CUnit/CUnit.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "cluster/launch.h"
#include "coordinator/runtime/cluster.h"
#include "ref_cases.h"
#include "test_util.h"
#include "core/err.h"

// --- helpers

// Logits of the case's sequence on one node, fed as generation does: prompt, then one at a time.
// n_batch 0 = the default chunk; a pipeline's micro-batch size gives the same chunks.
static float *single_node(const ref_case_t *rc, int n_batch, int *n_tok, int *n_layer) {
    char err[256];
    model_t *m = NULL;
    if (model_load(&m, rc->model_path, NULL, err, sizeof err) != 0) return NULL;
    const int nv = model_hparams(m)->n_vocab, rows = rc->n_prompt + rc->n_greedy;
    *n_layer = model_hparams(m)->n_layer;
    float *lg = malloc((size_t)rows * nv * sizeof(float));
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = rows + 8, .n_threads = 1, .n_batch = n_batch};
    model_ctx_new(&c, m, &co, err, sizeof err);
    model_eval(c, rc->prompt_tokens, rc->n_prompt, lg, true);
    for (int i = 0; i < rc->n_greedy; i++)
        model_eval(c, &rc->greedy[i], 1, lg + (size_t)(rc->n_prompt + i) * nv, true);
    model_ctx_destroy(&c);
    model_destroy(&m);
    *n_tok = rows;
    return lg;
}

// Starts n local workers (1 thread, with the model file) and points eps at their endpoints. 0 or -1.
static int start_workers(launch_t *l, int n, const char *model, const char **eps) {
    char err[512];
    launch_opts_t lo = {.exe = test_meshlm_bin(), .model_path = model, .n_threads = 1};
    if (!lo.exe || launch_local(l, n, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "launch: %s\n", lo.exe ? err : "MESHLM_BIN not set");
        return -1;
    }
    for (int i = 0; i < l->n; i++) eps[i] = l->endpoint[i];
    return 0;
}

// Feeds the case's sequence to the cluster as generation does (prompt, then one token at a time)
// and compares every logit row with ref. Returns the number of rows that differ, or -1 when a step
// failed (reported on stderr).
static int eval_vs_ref(cluster_t *cl, const ref_case_t *rc, const float *ref, int rows, const char *what) {
    const int nv = rc->n_vocab;
    float *lg = malloc((size_t)rows * nv * sizeof(float));
    if (!lg) return -1;
    int r = cluster_eval(cl, rc->prompt_tokens, rc->n_prompt, lg, true);
    for (int i = 0; r == 0 && i < rc->n_greedy; i++)
        r = cluster_eval(cl, &rc->greedy[i], 1, lg + (size_t)(rc->n_prompt + i) * nv, true);
    int bad = -1;
    if (r != 0) {
        fprintf(stderr, "  %s: eval: %s (%s)\n", what, mlm_strerror(r), cluster_error(cl));
    } else {
        bad = 0;
        for (int i = 0; i < rows; i++)
            bad += memcmp(lg + (size_t)i * nv, ref + (size_t)i * nv, (size_t)nv * sizeof(float)) != 0;
        if (bad) fprintf(stderr, "  %s: %d rows differ from one node\n", what, bad);
    }
    free(lg);
    return bad;
}

typedef struct {
    int n_workers;
    const char *speeds;
    bool tcp;
    bool coord_shard;
    bool no_model;           // workers receive their slices
    const char *cache_dir;
    int pp;                  // pipeline stages (capped at the model's blocks; 0 = one)
    int ubatch;              // micro-batch tokens (0 = default)
} layout_t;

// Runs the case on a local cluster; returns the number of logit rows that differ from one node's
// (or -1 on a failure), and the cluster stats in *st.
static int run_cluster(const char *case_name, const layout_t *ly, cluster_stats_t *st) {
    ref_case_t rc;
    if (ref_load(case_name, &rc) != 0) return -1;
    int rows = 0, bad = -1, n_layer = 0;
    float *ref = single_node(&rc, ly->ubatch, &rows, &n_layer);
    char err[1024];
    launch_t l;
    launch_opts_t lo = {.exe = test_meshlm_bin(), .model_path = ly->no_model ? NULL : rc.model_path,
                        .cache_dir = ly->cache_dir, .n_threads = 1, .tcp = ly->tcp};
    if (!ref || !lo.exe || launch_local(&l, ly->n_workers, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "launch: %s\n", lo.exe ? err : "MESHLM_BIN not set");
        free(ref);
        ref_free(&rc);
        return -1;
    }
    const char *eps[LAUNCH_MAX];
    for (int i = 0; i < l.n; i++) eps[i] = l.endpoint[i];
    cluster_opts_t co = {.model_path = rc.model_path, .workers = eps, .n_workers = l.n, .speeds = ly->speeds,
                         .coordinator_shard = ly->coord_shard, .n_ctx = rows + 8, .n_threads = 1, .timeout_ms = 10000,
                         .pp = ly->pp == 0 ? 1 : ly->pp < n_layer ? ly->pp : n_layer, .ubatch = ly->ubatch,
                         .keep_all = true};
    cluster_t *cl = NULL;
    if (cluster_open(&cl, &co, err, sizeof err) != 0) {
        fprintf(stderr, "  %s: cluster_open: %s\n", case_name, err);
    } else {
        char what[160];
        snprintf(what, sizeof what, "%s on %d workers (%s)", case_name, l.n, cluster_plan(cl)->layout);
        bad = eval_vs_ref(cl, &rc, ref, rows, what);
        if (st) *st = *cluster_stats(cl);
        cluster_close(&cl, true);
    }
    launch_reap(&l, 5000);
    free(ref);
    ref_free(&rc);
    return bad;
}

// --- tests

static void test_bit_exact_layouts(void) {
    // One case per model file in shared/reference (the .p0 cases), on 1-4 worker processes with even
    // and uneven splits, over ipc and tcp, with and without a coordinator share.
    char **names = NULL;
    int n = ref_list(&names);
    CU_ASSERT_FATAL(n >= 40);
    char *cache = test_tmpdir();
    const layout_t layouts[] = {
        {1, NULL, false, false, false, NULL, 0, 0}, {2, NULL, false, false, false, NULL, 0, 0},
        {3, "2,1,1", false, false, false, NULL, 0, 0}, {4, NULL, true, false, false, NULL, 0, 0},
        {2, "1,2,1", true, true, false, NULL, 0, 0},
        // pipelines: 2 stages, micro-batches of 4; coordinator + 2 workers as 3 stages; 2 stages x
        // 2-node groups over tcp; 3 stages of workers without the model file
        {2, NULL, false, false, false, NULL, 2, 4}, {2, NULL, false, true, false, NULL, 3, 3},
        {4, "1,2,1,1", true, false, false, NULL, 2, 3}, {3, NULL, false, false, true, cache, 3, 5},
    };
    int models = 0;
    for (int i = 0; i < n; i++) {
        size_t l = strlen(names[i]);
        if (l < 3 || strcmp(names[i] + l - 3, ".p0") != 0) continue;
        models++;
        for (size_t j = 0; j < sizeof layouts / sizeof *layouts; j++)
            CU_ASSERT_EQUAL(run_cluster(names[i], &layouts[j], NULL), 0);
    }
    CU_ASSERT(models >= 18);
    ref_names_free(names, n);
    test_rm_dir(cache);
}

static void test_shard_streaming_and_cache(void) {
    char *dir = test_tmpdir();
    layout_t ly = {2, NULL, false, false, true, dir, 0, 0};
    cluster_stats_t st;
    // First run: workers have no model file, so both shards are streamed and cached.
    CU_ASSERT_EQUAL(run_cluster("synth-dense-Q8_0.p0", &ly, &st), 0);
    CU_ASSERT_EQUAL(st.streamed, 2);
    CU_ASSERT(st.shard_bytes_sent > 1000000); // about the model's 3.5 MB
    CU_ASSERT_EQUAL(st.from_cache, 0);
    // Second run: the same slices come from the cache and nothing is transferred.
    CU_ASSERT_EQUAL(run_cluster("synth-dense-Q8_0.p0", &ly, &st), 0);
    CU_ASSERT_EQUAL(st.streamed, 0);
    CU_ASSERT_EQUAL(st.shard_bytes_sent, 0);
    CU_ASSERT_EQUAL(st.from_cache, 2);
    test_rm_dir(dir);
}

static void test_killed_worker(void) {
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load("stories260K.p0", &rc), 0);
    char err[1024];
    launch_t l;
    const char *eps[LAUNCH_MAX];
    CU_ASSERT_EQUAL_FATAL(start_workers(&l, 3, rc.model_path, eps), 0);
    const int deadline = 2000;
    cluster_opts_t co = {.model_path = rc.model_path, .workers = eps, .n_workers = l.n, .n_ctx = 128,
                         .n_threads = 1, .timeout_ms = deadline, .pp = 1, .keep_all = true};
    cluster_t *cl = NULL;
    CU_ASSERT_EQUAL_FATAL(cluster_open(&cl, &co, err, sizeof err), 0);
    float *lg = malloc((size_t)rc.n_vocab * sizeof(float));
    CU_ASSERT_EQUAL(cluster_eval(cl, rc.prompt_tokens, rc.n_prompt, lg, false), 0);
    kill(l.pid[1], SIGKILL); // worker 1 dies between steps
    double t0 = mlm_now_ms();
    int r = cluster_eval(cl, &rc.greedy[0], 1, lg, false);
    double el = mlm_now_ms() - t0;
    CU_ASSERT(r == MLM_EPEER || r == MLM_ETIMEOUT);
    CU_ASSERT(el < deadline * 2 + 1000); // a clean error within the deadline, not a hang
    CU_ASSERT(strlen(cluster_error(cl)) > 0);
    fprintf(stderr, "  killed worker: %s after %.0f ms: %s\n", mlm_strerror(r), el, cluster_error(cl));
    free(lg);
    cluster_close(&cl, true);
    launch_reap(&l, 3000);
    ref_free(&rc);
}

// The planner measures every worker's link (through the emulated links of $MESHLM_FAULTS, which the
// coordinator hands to the workers) and leaves out the worker behind a 40 ms link; the run still
// gives one node's logits. Then the same with --keep-all: the slow worker computes too.
static void test_slow_link_left_out(void) {
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load("synth-dense-Q8_0.p0", &rc), 0);
    int rows = 0, n_layer = 0;
    float *ref = single_node(&rc, 4, &rows, &n_layer);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
    char err[1024];
    for (int keep = 0; keep < 2; keep++) {
        launch_t l;
        const char *eps[LAUNCH_MAX];
        CU_ASSERT_EQUAL_FATAL(start_workers(&l, 3, rc.model_path, eps), 0);
        setenv("MESHLM_FAULTS", "delay:link=0-3:ms=40", 1); // worker 3's link (control rank 3)
        cluster_opts_t co = {.model_path = rc.model_path, .workers = eps, .n_workers = l.n, .n_ctx = rows + 8,
                             .n_threads = 1, .timeout_ms = 10000, .pp = 2, .ubatch = 4, .keep_all = keep};
        cluster_t *cl = NULL;
        int r = cluster_open(&cl, &co, err, sizeof err);
        unsetenv("MESHLM_FAULTS");
        CU_ASSERT_EQUAL_FATAL(r, 0);
        const plan_t *pl = cluster_plan(cl);
        const cluster_stats_t *cs = cluster_stats(cl);
        CU_ASSERT(cs->link_lat_us >= 40000); // the slow link was measured as such
        int slow_in = 0;
        for (int i = 0; i < pl->n; i++) slow_in |= pl->shard[i].node == 2;
        CU_ASSERT_EQUAL(pl->n, keep ? 3 : 2);
        CU_ASSERT_EQUAL(slow_in, keep);
        CU_ASSERT_EQUAL(pl->n_stages, 2);
        if (!keep) CU_ASSERT(strstr(pl->why, "left out") != NULL);
        fprintf(stderr, "  slow link (keep_all %d): %s, %s\n", keep, pl->layout, pl->why);
        CU_ASSERT_EQUAL(eval_vs_ref(cl, &rc, ref, rows, "slow link"), 0);
        cluster_close(&cl, true);
        launch_reap(&l, 3000);
    }
    free(ref);
    ref_free(&rc);
}

// A hand-written plan file: two stages with the workers in the reverse of their --workers order and
// uneven rows; the run follows it and still gives one node's logits.
static void test_plan_file(void) {
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load("synth-moe-Q4_0.p0", &rc), 0);
    int rows = 0, n_layer = 0;
    float *ref = single_node(&rc, 5, &rows, &n_layer);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
    char *dir = test_tmpdir(), path[1024], err[1024];
    snprintf(path, sizeof path, "%s/two-stages.plan", dir);
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fprintf(f, "# meshlm plan v1\nstage layers=0 nodes=2\nstage layers=1-3 nodes=1:3,0:1\n");
    fclose(f);
    launch_t l;
    const char *eps[LAUNCH_MAX];
    CU_ASSERT_EQUAL_FATAL(start_workers(&l, 3, rc.model_path, eps), 0);
    cluster_opts_t co = {.model_path = rc.model_path, .workers = eps, .n_workers = l.n, .n_ctx = rows + 8,
                         .n_threads = 1, .timeout_ms = 10000, .plan_file = path, .ubatch = 5};
    cluster_t *cl = NULL;
    int r = cluster_open(&cl, &co, err, sizeof err);
    if (r != 0) fprintf(stderr, "  plan file: %s\n", err);
    CU_ASSERT_EQUAL_FATAL(r, 0);
    const plan_t *pl = cluster_plan(cl);
    CU_ASSERT_EQUAL(pl->n_stages, 2);
    CU_ASSERT_EQUAL(pl->n, 3);
    CU_ASSERT(pl->shard[0].node == 2 && pl->shard[1].node == 1 && pl->shard[2].node == 0);
    CU_ASSERT(pl->shard[0].s.l0 == 0 && pl->shard[0].s.l1 == 1 && pl->shard[1].s.l1 == 4);
    const int f1 = pl->shard[1].s.f1 - pl->shard[1].s.f0, f2 = pl->shard[2].s.f1 - pl->shard[2].s.f0;
    CU_ASSERT(f1 > 2 * f2); // weights 3:1
    CU_ASSERT_EQUAL(eval_vs_ref(cl, &rc, ref, rows, "plan file"), 0);
    cluster_close(&cl, true);
    launch_reap(&l, 3000);
    test_rm_dir(dir);
    free(ref);
    ref_free(&rc);
}

// Several requests in flight through a 2-stage pipeline: three sequences (two prompts of one model,
// one of them twice, started at different times) advance one token per step together; each one's
// logits equal one node's run of that sequence alone, token by token.
// Three sequences in flight (one starts late) through a 2-stage pipeline, one token each per step;
// with kill_step >= 0 a third worker is killed before that step and the cluster recovers (every
// sequence is replayed). Every row equals the sequence's own single-node run.
static void sequences_in_flight(int n_workers, int kill_step) {
    const char *cases[2] = {"synth-dense-Q4_0.p0", "synth-dense-Q4_0.p1"};
    ref_case_t rc[2];
    CU_ASSERT_EQUAL_FATAL(ref_load(cases[0], &rc[0]), 0);
    CU_ASSERT_EQUAL_FATAL(ref_load(cases[1], &rc[1]), 0);
    char err[1024];
    model_t *m = NULL;
    CU_ASSERT_EQUAL_FATAL(model_load(&m, rc[0].model_path, NULL, err, sizeof err), 0);
    const int nv = model_hparams(m)->n_vocab;
    // Sequence k's tokens: case k % 2's prompt and greedy continuation; sequence 2 starts 3 steps late.
    enum { K = 3, DELAY = 3 };
    int len[K];
    int32_t *tok[K];
    float *want[K];
    for (int k = 0; k < K; k++) {
        const ref_case_t *r = &rc[k % 2];
        len[k] = r->n_prompt + r->n_greedy;
        tok[k] = malloc((size_t)len[k] * sizeof(int32_t));
        memcpy(tok[k], r->prompt_tokens, (size_t)r->n_prompt * sizeof(int32_t));
        memcpy(tok[k] + r->n_prompt, r->greedy, (size_t)r->n_greedy * sizeof(int32_t));
        want[k] = malloc((size_t)len[k] * nv * sizeof(float));
        model_ctx_t *c = NULL;
        model_ctx_opts_t co = {.n_ctx = len[k] + 8, .n_threads = 1};
        CU_ASSERT_EQUAL_FATAL(model_ctx_new(&c, m, &co, err, sizeof err), 0);
        for (int i = 0; i < len[k]; i++) model_eval(c, &tok[k][i], 1, want[k] + (size_t)i * nv, false);
        model_ctx_destroy(&c);
    }
    launch_t l;
    const char *eps[LAUNCH_MAX];
    CU_ASSERT_EQUAL_FATAL(start_workers(&l, n_workers, rc[0].model_path, eps), 0);
    cluster_opts_t co = {.model_path = rc[0].model_path, .workers = eps, .n_workers = l.n, .n_ctx = 128,
                         .n_threads = 1, .timeout_ms = 10000, .pp = 2, .keep_all = true,
                         .recover = kill_step >= 0, .heartbeat_ms = 500};
    cluster_t *cl = NULL;
    CU_ASSERT_EQUAL_FATAL(cluster_open(&cl, &co, err, sizeof err), 0);
    CU_ASSERT_EQUAL(cluster_plan(cl)->n_stages, 2);
    float *lg = malloc((size_t)K * nv * sizeof(float));
    int bad = 0, steps = 0;
    for (int t = 0; t < len[0] + DELAY || t < len[1] + DELAY; t++) {
        int seqs[K], n = 0;
        int32_t now[K];
        for (int k = 0; k < K; k++) {
            const int i = t - (k == 2 ? DELAY : 0); // this sequence's position
            if (i >= 0 && i < len[k]) seqs[n] = k, now[n++] = tok[k][i];
        }
        if (n == 0) continue;
        if (steps == kill_step) kill(l.pid[n_workers - 1], SIGKILL);
        CU_ASSERT_EQUAL_FATAL(cluster_eval_seqs(cl, n, seqs, now, lg), 0);
        steps++;
        for (int j = 0; j < n; j++) {
            const int k = seqs[j], i = t - (k == 2 ? DELAY : 0);
            bad += memcmp(lg + (size_t)j * nv, want[k] + (size_t)i * nv, (size_t)nv * sizeof(float)) != 0;
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT(steps >= len[0]);
    int n_rec = 0;
    cluster_recoveries(cl, &n_rec);
    CU_ASSERT_EQUAL(n_rec, kill_step >= 0 ? 1 : 0);
    cluster_close(&cl, true);
    launch_reap(&l, 3000);
    free(lg);
    for (int k = 0; k < K; k++) free(tok[k]), free(want[k]);
    model_destroy(&m);
    ref_free(&rc[0]);
    ref_free(&rc[1]);
}

static void test_sequences_in_flight(void) { sequences_in_flight(2, -1); }
static void test_sequences_recover(void) { sequences_in_flight(3, 6); }

int test_cluster_suite(void) {
    CU_pSuite s = CU_add_suite("cluster", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "every reference model on 1-4 worker processes: bit-exact", test_bit_exact_layouts) ||
        !CU_add_test(s, "workers without the model: streamed once, then cached", test_shard_streaming_and_cache) ||
        !CU_add_test(s, "a killed worker is an error within the deadline", test_killed_worker) ||
        !CU_add_test(s, "the planner leaves out a worker behind a slow link", test_slow_link_left_out) ||
        !CU_add_test(s, "a hand-written plan file is followed", test_plan_file) ||
        !CU_add_test(s, "several sequences in flight through a pipeline", test_sequences_in_flight) ||
        !CU_add_test(s, "sequences in flight all recover from a killed worker", test_sequences_recover))
        return -1;
    return 0;
}
