// Runtime suite: the coordinator's cluster object and the node executor in one process, over in-process
// control and data comms (the same messages ZeroMQ workers and MPI ranks exchange). Logits equal one
// node's bit for bit; the phases are separate calls, so a cluster re-plans and re-loads mid-request.
#include <CUnit/CUnit.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "coordinator/runtime/cluster.h"
#include "core/err.h"
#include "proto/msg_io.h"
#include "test_util.h"
#include "transport/comm_inproc.h"
#include "worker/model/model.h"
#include "worker/node/node.h"

// --- helpers

#define MAX_RANKS 4

typedef struct {
    comm_t *ctl[MAX_RANKS];     // control group: rank 0 is the coordinator
    comm_t *data[MAX_RANKS];    // data-plane group
    pthread_t th[MAX_RANKS];
    node_opts_t o[MAX_RANKS];   // each node's options
    char ids[MAX_RANKS][24];
    int rc[MAX_RANKS];          // node_run's result
    char err[MAX_RANKS][256];
    int n;                      // ranks in all
} world_t;

typedef struct {
    world_t *w;
    int rank;
} node_arg_t;

static node_arg_t args[MAX_RANKS];

static void *node_main(void *p) {
    node_arg_t *a = p;
    world_t *w = a->w;
    w->rc[a->rank] = node_run(&w->o[a->rank], &w->ctl[a->rank], w->err[a->rank], sizeof w->err[a->rank]);
    return NULL;
}

// n ranks: rank 0 stays with the caller (the coordinator), ranks 1..n-1 run node_run on threads.
// model_path NULL: the nodes have no model and receive their shards into cache_dir.
static void world_start(world_t *w, int n, const char *model_path, const char *cache_dir) {
    memset(w, 0, sizeof *w);
    w->n = n;
    CU_ASSERT_EQUAL_FATAL(comm_inproc_new_group(w->ctl, n), 0);
    CU_ASSERT_EQUAL_FATAL(comm_inproc_new_group(w->data, n), 0);
    for (int r = 1; r < n; r++) {
        snprintf(w->ids[r], sizeof w->ids[r], "node-%d", r);
        w->o[r] = (node_opts_t){.model_path = model_path, .same_file = model_path != NULL, .data = w->data[r],
                                .node_id = w->ids[r], .n_threads = 1, .timeout_ms = 20000, .no_profile = true,
                                .exit_on_peer_loss = true, .cache_dir = cache_dir};
        args[r] = (node_arg_t){w, r};
        pthread_create(&w->th[r], NULL, node_main, &args[r]);
    }
}

// Joins the nodes (the cluster told them to exit, or its control comm is gone) and frees the comms.
static void world_stop(world_t *w) {
    for (int r = 1; r < w->n; r++) {
        pthread_join(w->th[r], NULL);
        CU_ASSERT_EQUAL(w->rc[r], 0);
        if (w->rc[r] != 0) fprintf(stderr, "node %d: %s\n", r, w->err[r]);
    }
    for (int r = 0; r < w->n; r++) {
        comm_destroy(&w->ctl[r]);
        comm_destroy(&w->data[r]);
    }
}

// One node's logits for every position of tokens (chunks of n_batch).
static float *single_node(const char *path, const int32_t *tokens, int n, int n_batch, int *n_vocab) {
    char err[256];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = true};
    CU_ASSERT_EQUAL_FATAL(model_load(&m, path, &lo, err, sizeof err), 0);
    model_ctx_t *ctx = NULL;
    model_ctx_opts_t co = {.n_ctx = 128, .n_batch = n_batch, .n_threads = 1};
    CU_ASSERT_EQUAL_FATAL(model_ctx_new(&ctx, m, &co, err, sizeof err), 0);
    *n_vocab = model_hparams(m)->n_vocab;
    float *out = malloc((size_t)n * (size_t)*n_vocab * sizeof *out);
    CU_ASSERT_EQUAL_FATAL(model_eval(ctx, tokens, n, out, true), 0);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
    return out;
}

static int vocab_of(const char *path) {
    char err[256];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = false};
    CU_ASSERT_EQUAL_FATAL(model_load(&m, path, &lo, err, sizeof err), 0);
    int nv = model_hparams(m)->n_vocab;
    model_destroy(&m);
    return nv;
}

static void fill_tokens(int32_t *t, int n, int n_vocab, uint64_t seed) {
    for (int i = 0; i < n; i++) t[i] = (int32_t)(test_rng_next(&seed) % (uint64_t)n_vocab);
}

static cluster_opts_t opts_for(world_t *w, const char *path, int pp, int n_batch) {
    return (cluster_opts_t){.model_path = path, .control = w->ctl[0], .data = w->data[0], .same_file = true,
                            .coordinator_shard = true, .n_ctx = 128, .n_batch = n_batch, .n_threads = 1,
                            .timeout_ms = 20000, .pp = pp, .keep_all = true};
}

// --- tests

#define N_TOK 12

static const char *const models[] = {"stories260K.gguf", "synth/synth-moe-Q8_0.gguf", "synth/synth-dense-Q4_K_M.gguf"};

// 3 ranks (the coordinator's share and two nodes) as one tensor-parallel group and as 3 stages.
static void test_layouts_equal_one_node(void) {
    for (size_t mi = 0; mi < sizeof models / sizeof *models; mi++) {
        char path[1024], rel[256];
        snprintf(rel, sizeof rel, "models/%s", models[mi]);
        test_shared_path(path, sizeof path, rel);
        int32_t tok[N_TOK];
        int nv = vocab_of(path);
        fill_tokens(tok, N_TOK, nv, 7 + mi);
        float *want = single_node(path, tok, N_TOK, 4, &nv);
        for (int pp = 1; pp <= 3; pp += 2) {
            world_t w;
            world_start(&w, 3, path, NULL);
            cluster_opts_t co = opts_for(&w, path, pp, 4);
            co.ubatch = 4; // pipeline micro-batches of the chunk size: the same chunking as one node
            cluster_t *c = NULL;
            char err[512] = "";
            int rc = cluster_open(&c, &co, err, sizeof err);
            if (rc != 0) fprintf(stderr, "%s: %s\n", models[mi], err);
            CU_ASSERT_EQUAL_FATAL(rc, 0);
            CU_ASSERT_EQUAL(cluster_plan(c)->n_stages, pp);
            float *got = calloc((size_t)N_TOK * (size_t)nv, sizeof *got);
            CU_ASSERT_EQUAL(cluster_eval(c, tok, N_TOK, got, true), 0);
            CU_ASSERT(memcmp(got, want, (size_t)N_TOK * (size_t)nv * sizeof *got) == 0);
            cluster_close(&c, true);
            world_stop(&w);
            free(got);
        }
        free(want);
    }
}

// The phases are separate calls: after 5 tokens the cluster re-plans (tensor parallel -> 3 stages),
// re-loads, replays the 5 tokens and goes on; every logit row equals one node's run of all 12.
static void test_replan_mid_request(void) {
    char path[1024];
    test_shared_path(path, sizeof path, "models/stories260K.gguf");
    int32_t tok[N_TOK];
    int nv = vocab_of(path);
    fill_tokens(tok, N_TOK, nv, 99);
    float *want = single_node(path, tok, N_TOK, 1, &nv); // one token per chunk, as decode steps
    world_t w;
    world_start(&w, 3, path, NULL);
    cluster_opts_t co = opts_for(&w, path, 1, 1);
    cluster_t *c = NULL;
    char err[512] = "";
    float *row = malloc((size_t)nv * sizeof *row);
    CU_ASSERT_EQUAL_FATAL(cluster_new(&c, &co, err, sizeof err), 0);
    CU_ASSERT_EQUAL(cluster_eval(c, tok, 1, row, false), MLM_ESTATE);     // no plan loaded yet
    CU_ASSERT_EQUAL(cluster_load(c, err, sizeof err), MLM_ESTATE);       // load before a plan
    CU_ASSERT_EQUAL(cluster_make_plan(c, err, sizeof err), MLM_ESTATE);  // plan before hello
    CU_ASSERT_EQUAL_FATAL(cluster_hello(c, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(cluster_make_plan(c, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(cluster_load(c, err, sizeof err), 0);
    CU_ASSERT_EQUAL(cluster_plan(c)->n_stages, 1);
    int bad = 0;
    for (int i = 0; i < 5; i++) {
        CU_ASSERT_EQUAL_FATAL(cluster_eval(c, &tok[i], 1, row, false), 0);
        bad += memcmp(row, want + (size_t)i * nv, (size_t)nv * sizeof *row) != 0;
    }
    cluster_set_layout(c, 3, 0, true, NULL);
    CU_ASSERT_EQUAL_FATAL(cluster_make_plan(c, err, sizeof err), 0);
    CU_ASSERT_EQUAL(cluster_eval(c, tok, 1, row, false), MLM_ESTATE); // between plan and load
    int rc = cluster_load(c, err, sizeof err);
    if (rc != 0) fprintf(stderr, "re-load: %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(cluster_plan(c)->n_stages, 3);
    for (int i = 0; i < 5; i++) CU_ASSERT_EQUAL_FATAL(cluster_eval(c, &tok[i], 1, NULL, false), 0); // replay
    for (int i = 5; i < N_TOK; i++) {
        CU_ASSERT_EQUAL_FATAL(cluster_eval(c, &tok[i], 1, row, false), 0);
        bad += memcmp(row, want + (size_t)i * nv, (size_t)nv * sizeof *row) != 0;
    }
    CU_ASSERT_EQUAL(bad, 0);
    cluster_close(&c, true);
    world_stop(&w);
    free(row);
    free(want);
}

// Nodes without the model receive their shards into a cache directory whose parents do not exist
// yet (made with them), and compute the same logits.
static void test_streamed_into_new_cache_dir(void) {
    char path[1024];
    test_shared_path(path, sizeof path, "models/stories260K.gguf");
    int32_t tok[N_TOK];
    int nv = vocab_of(path);
    fill_tokens(tok, N_TOK, nv, 3);
    float *want = single_node(path, tok, N_TOK, 4, &nv);
    char *dir = test_tmpdir();
    char cache[1024];
    snprintf(cache, sizeof cache, "%s/not/there/yet", dir);
    world_t w;
    world_start(&w, 3, NULL, cache);
    cluster_opts_t co = opts_for(&w, path, 1, 4);
    co.same_file = false; // the nodes have no file: the coordinator hashes it and streams the shards
    cluster_t *c = NULL;
    char err[512] = "";
    int rc = cluster_open(&c, &co, err, sizeof err);
    if (rc != 0) fprintf(stderr, "%s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(cluster_stats(c)->streamed, 2);
    float *got = calloc((size_t)N_TOK * (size_t)nv, sizeof *got);
    rc = cluster_eval(c, tok, N_TOK, got, true);
    if (rc != 0) fprintf(stderr, "streamed: %s\n", cluster_error(c));
    CU_ASSERT_EQUAL(rc, 0);
    CU_ASSERT(memcmp(got, want, (size_t)N_TOK * (size_t)nv * sizeof *got) == 0);
    cluster_close(&c, true);
    world_stop(&w);
    struct stat st;
    CU_ASSERT(stat(cache, &st) == 0 && S_ISDIR(st.st_mode));
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CU_ASSERT_EQUAL(system(cmd), 0);
    free(dir);
    free(got);
    free(want);
}

// A node whose cache directory cannot be made says which directory and why; the cluster names it.
static void test_cache_dir_error_names_path(void) {
    char path[1024];
    test_shared_path(path, sizeof path, "models/stories260K.gguf");
    char *dir = test_tmpdir();
    char blocker[1024], cache[1100];
    snprintf(blocker, sizeof blocker, "%s/file", dir);
    FILE *f = fopen(blocker, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fclose(f);
    snprintf(cache, sizeof cache, "%s/sub", blocker); // a regular file is in the way
    world_t w;
    world_start(&w, 2, NULL, cache);
    cluster_opts_t co = opts_for(&w, path, 1, 4);
    co.same_file = false;
    cluster_t *c = NULL;
    char err[512] = "";
    CU_ASSERT_NOT_EQUAL(cluster_open(&c, &co, err, sizeof err), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "rank 1"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, blocker));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "cannot create directory"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "Not a directory"));
    if (!strstr(err, "Not a directory")) fprintf(stderr, "error was: %s\n", err);
    // the nodes still serve: tell them to exit over the control comm
    cluster_opts_t again = opts_for(&w, path, 1, 4);
    CU_ASSERT_EQUAL(cluster_new(&c, &again, err, sizeof err), 0);
    cluster_close(&c, true);
    world_stop(&w);
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CU_ASSERT_EQUAL(system(cmd), 0);
    free(dir);
}

// Sends a 2-node PLAN (the coordinator, then node-1) whose keys are k0 and k1 ("" = none) and a
// LOAD_SHARD for node-1; returns the text of the ERROR node-1 answers with ("" if it answers without one).
static void plan_with_keys(comm_t *ctl, uint64_t id, const char *k0, const char *k1, char *why, size_t cap) {
    msg_plan_node_t nd[2];
    memset(nd, 0, sizeof nd);
    for (int i = 0; i < 2; i++) {
        nd[i].index = (uint32_t)i;
        snprintf(nd[i].node_id, sizeof nd[i].node_id, "%s", i ? "node-1" : "coordinator");
        snprintf(nd[i].endpoint, sizeof nd[i].endpoint, "tcp://127.0.0.1:%d", 9 + i); // never reached
        nd[i].layers = (msg_range_t){0, 5};
        nd[i].heads = (msg_range_t){4 * i, 4 * i + 4};
        nd[i].kv_heads = (msg_range_t){2 * i, 2 * i + 2};
        nd[i].n_ffn = 1;
        nd[i].ffn[0] = (msg_range_t){86 * i, 86 * i + 86};
        snprintf(nd[i].curve_key, sizeof nd[i].curve_key, "%s", i ? k1 : k0);
    }
    msg_t m;
    msg_init(&m, MSG_PLAN);
    m.plan = (msg_plan_t){.plan_id = id, .n_layer = 5, .n_head = 8, .n_head_kv = 4, .n_ff = 172, .n_ctx = 64,
                          .kv_type = QT_F16, .n_nodes = 2, .nodes = nd};
    char err[256];
    CU_ASSERT_EQUAL_FATAL(msg_send(ctl, 1, &m, 5000, err, sizeof err), 0);
    msg_init(&m, MSG_LOAD_SHARD);
    m.load_shard = (msg_load_shard_t){.plan_id = id, .node_index = 1};
    CU_ASSERT_EQUAL_FATAL(msg_send(ctl, 1, &m, 5000, err, sizeof err), 0);
    snprintf(why, cap, "%s", "");
    for (int k = 0; k < 2; k++) { // the ack, then the ERROR
        msg_t r;
        comm_msg_t raw;
        if (msg_recv(ctl, 1, &r, &raw, NULL, 5000, err, sizeof err) != 0) break;
        if (r.type == MSG_LOAD_SHARD_ACK) CU_ASSERT_NOT_EQUAL(r.load_shard_ack.status, 0);
        if (r.type == MSG_ERROR) snprintf(why, cap, "%s", r.error.text);
        msg_clear(&r);
        comm_msg_free(&raw);
        if (why[0]) break;
    }
}

// A worker with a CurveZMQ key pair and a ZeroMQ data plane refuses a plan whose data plane has no
// keys (it must not fall back to plaintext), and one that lists another key for it; a worker without
// keys refuses a plan with keys. Each refusal comes as the LOAD_SHARD's failed ack and an ERROR that
// says why, and the node goes on serving.
static void test_plan_keys_refused(void) {
    curve_conf_t *cv = calloc(1, sizeof *cv);
    curve_keypair_t other;
    char err[256], why[600];
    CU_ASSERT_EQUAL_FATAL(curve_keygen(&cv->self, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(curve_keygen(&other, err, sizeof err), 0);
    for (int keyed = 1; keyed >= 0; keyed--) {
        world_t w; // a control group only: node-1 makes a ZeroMQ data plane for each plan
        memset(&w, 0, sizeof w);
        w.n = 2;
        CU_ASSERT_EQUAL_FATAL(comm_inproc_new_group(w.ctl, 2), 0);
        w.o[1] = (node_opts_t){.node_id = "node-1", .n_threads = 1, .timeout_ms = 5000, .no_profile = true,
                               .exit_on_peer_loss = true, .curve = keyed ? cv : NULL};
        args[1] = (node_arg_t){&w, 1};
        pthread_create(&w.th[1], NULL, node_main, &args[1]);
        if (keyed) {
            plan_with_keys(w.ctl[0], 11, "", "", why, sizeof why);
            CU_ASSERT_PTR_NOT_NULL(strstr(why, "no CurveZMQ key for node coordinator"));
            CU_ASSERT_PTR_NOT_NULL(strstr(why, "does not fall back to plaintext"));
            plan_with_keys(w.ctl[0], 12, other.pub, other.pub, why, sizeof why);
            CU_ASSERT_PTR_NOT_NULL(strstr(why, "lists CurveZMQ key"));
            CU_ASSERT_PTR_NOT_NULL(strstr(why, cv->self.pub));
        } else {
            plan_with_keys(w.ctl[0], 13, other.pub, cv->self.pub, why, sizeof why);
            CU_ASSERT_PTR_NOT_NULL(strstr(why, "no key pair (--curve-key)"));
        }
        if (!strstr(why, "CurveZMQ") && !strstr(why, "key pair")) fprintf(stderr, "node said: %s\n", why);
        msg_t m;
        msg_init(&m, MSG_SHUTDOWN);
        snprintf(m.shutdown.reason, sizeof m.shutdown.reason, "exit");
        CU_ASSERT_EQUAL(msg_send(w.ctl[0], 1, &m, 5000, err, sizeof err), 0);
        world_stop(&w);
    }
    free(cv);
}

// --- registration

int test_runtime_suite(void) {
    CU_pSuite s = CU_add_suite("runtime", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "in-process cluster: TP and 3 stages equal one node", test_layouts_equal_one_node) ||
        !CU_add_test(s, "re-plan and re-load mid-request, replay, same logits", test_replan_mid_request) ||
        !CU_add_test(s, "shards streamed into a cache dir made with its parents", test_streamed_into_new_cache_dir) ||
        !CU_add_test(s, "a cache dir that cannot be made is named with the cause", test_cache_dir_error_names_path) ||
        !CU_add_test(s, "a keyed worker refuses a plan without data-plane keys", test_plan_keys_refused))
        return -1;
    return 0;
}
