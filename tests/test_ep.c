// Expert-parallel suite: members holding whole experts (threads over the inproc and zmq transports) give the single node's logits bit for bit.
#include <CUnit/CUnit.h>
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cluster/launch.h"
#include "coordinator/runtime/cluster.h"
#include "core/clock.h"
#include "core/err.h"
#include "parallel/plan.h"
#include "parallel/shard.h"
#include "proto/msg_io.h"
#include "ref_cases.h"
#include "test_util.h"
#include "transport/comm.h"
#include "transport/comm_inproc.h"
#include "transport/comm_open.h"
#include "transport/gatherv.h"
#include "worker/model/model.h"

// --- types

#define MAX_RANKS 4
#define MAX_OWN (64 * 64)          // owner table entries (n_layer * n_expert) the suite's models need
#define N_PROMPT 13                // a prompt of 13 tokens in chunks of 8: a chunk of 8 and one of 5
#define N_DECODE 3                 // then 3 tokens one at a time
#define N_BATCH 8
#define DL_MS 20000

typedef struct {
    const char *model;             // relative to shared/
    const char *transport;         // "inproc" or "zmq"
    int n;                         // ranks
    int n_stages;                  // 1, or 2: ranks [0, n/2) hold the first half of the blocks, the rest the second
    bool lead;                     // attention on each group's leader (model_ep_t.lead), else replicated
    int replicas;                  // with lead, > 1: expert e is held by its owner and the next replicas - 1
                                   // members (model_ep_t.holders)
    uint64_t holders[MAX_OWN];     // (n_layer, n_expert) the holders when replicas > 1
    uint8_t owner[MAX_OWN];        // (n_layer, n_expert) member index inside its stage's group
    const float *ref;              // (N_PROMPT + N_DECODE, n_vocab) the single node's logits
    const char *weights;           // weight provider of each member (NULL: mmap), loaded with its experts'
                                   // mask (every block's experts it owns or holds) when set
    char *dir;                     // zmq: directory of the ipc endpoints
    int mismatches[MAX_RANKS];     // per rank: logit rows that differ from ref (of the rows it produces)
    int rows[MAX_RANKS];           // per rank: logit rows compared
    int rc[MAX_RANKS];             // per rank: first error
} ep_case_t;

// What one member's group collectives need: its comm and the group's ranks [first, first + n).
typedef struct {
    comm_t *c;
    int first, n;
} ep_member_t;

// --- helpers

static int ep_alltoallv(void *ctx, const void *send, const size_t *send_lens, void *recv, const size_t *recv_lens) {
    ep_member_t *m = ctx;
    return comm_alltoallv(m->c, m->first, m->n, send, send_lens, recv, recv_lens, DL_MS);
}

static int ep_gather(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    ep_member_t *m = ctx;
    return comm_allgatherv_range(m->c, m->first, m->n, mine, my_len, out, lens, DL_MS);
}

static int ep_send(void *ctx, int member, const void *buf, size_t len) {
    ep_member_t *m = ctx;
    return comm_send1(m->c, m->first + member, buf, len, DL_MS);
}

static int ep_recv(void *ctx, int member, void *buf, size_t cap, size_t *len) {
    ep_member_t *m = ctx;
    comm_msg_t msg;
    int rc = comm_recv(m->c, m->first + member, &msg, NULL, DL_MS);
    if (rc != 0) return rc;
    if (msg.n != 1 || msg.len[0] > cap) rc = MLM_EPROTO;
    else memcpy(buf, msg.data[0], *len = msg.len[0]);
    comm_msg_free(&msg);
    return rc;
}

static void prompt_tokens(int32_t *tok, int n, int n_vocab) {
    for (int i = 0; i < n; i++) tok[i] = (int32_t)((1 + 37 * i) % n_vocab);
}

// The single node's logits of the prompt (every row) and the decoded tokens, (N_PROMPT + N_DECODE, n_vocab),
// on repacked weights or (repack false) on the file's layout, which the expert cache computes on.
static float *reference_logits_on(const char *path, bool repack, int *n_vocab) {
    char err[256];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = repack};
    if (model_load(&m, path, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "\n%s\n", err);
        return NULL;
    }
    const int V = model_hparams(m)->n_vocab;
    model_ctx_opts_t o = {.n_ctx = 64, .n_batch = N_BATCH, .n_threads = 1};
    model_ctx_t *c = NULL;
    float *out = malloc((size_t)(N_PROMPT + N_DECODE) * V * sizeof(float));
    int32_t tok[N_PROMPT + N_DECODE];
    prompt_tokens(tok, N_PROMPT + N_DECODE, V);
    int rc = out ? model_ctx_new(&c, m, &o, err, sizeof err) : MLM_ENOMEM;
    if (rc == 0) rc = model_eval(c, tok, N_PROMPT, out, true);
    for (int i = 0; rc == 0 && i < N_DECODE; i++) rc = model_eval(c, tok + N_PROMPT + i, 1, out + (size_t)(N_PROMPT + i) * V, false);
    model_ctx_destroy(&c);
    model_destroy(&m);
    if (rc != 0) {
        free(out);
        return NULL;
    }
    *n_vocab = V;
    return out;
}

static int open_comm(ep_case_t *k, comm_inproc_group_t *g, int rank, comm_t **out) {
    char err[256];
    if (strcmp(k->transport, "inproc") == 0) return comm_inproc_join(g, rank, out);
    char eps[MAX_RANKS][256];
    const char *ptrs[MAX_RANKS];
    for (int r = 0; r < k->n; r++) {
        snprintf(eps[r], sizeof eps[r], "ipc://%s/r%d", k->dir, r);
        ptrs[r] = eps[r];
    }
    comm_open_opts_t o = {.rank = rank, .size = k->n, .endpoints = ptrs, .timeout_ms = DL_MS};
    int rc = comm_open(out, "zmq", &o, err, sizeof err);
    if (rc != 0) fprintf(stderr, "\nzmq rank %d: %s\n", rank, err);
    return rc;
}

typedef struct {
    ep_case_t *k;
    comm_inproc_group_t *g;
    int rank;
} rank_arg_t;

// One member: its stage's blocks (every row), its group's experts, the same calls as the single node.
static void *rank_main(void *p) {
    rank_arg_t *a = p;
    ep_case_t *k = a->k;
    const int r = a->rank, per = k->n / k->n_stages, stage = r / per;
    char err[256], path[1024];
    comm_t *c = NULL;
    model_t *m = NULL, *probe = NULL;
    model_ctx_t *ctx = NULL;
    float *logits = NULL, *hid = NULL;
    int rc = open_comm(k, a->g, r, &c);
    if (rc == 0) rc = model_load(&probe, test_shared_path(path, sizeof path, k->model), NULL, err, sizeof err);
    model_hparams_t hp = {0};
    if (rc == 0) hp = *model_hparams(probe);
    model_destroy(&probe);
    shard_slice_t s = shard_full(hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_embd, hp.n_ff, hp.n_vocab);
    s.l0 = stage == 0 ? 0 : hp.n_layer / 2;
    s.l1 = k->n_stages == 1 || stage == 1 ? hp.n_layer : hp.n_layer / 2;
    model_load_opts_t lo = {.slice = &s, .repack = true}; // as the reference loads (repacked kernels)
    uint64_t mask[4] = {0}; // with k->weights: the experts this member computes in any block
    for (int i = 0; k->weights && i < hp.n_layer * hp.n_expert; i++) {
        const int me = r - stage * per, e = i % (hp.n_expert > 0 ? hp.n_expert : 1);
        if (k->owner[i] == me || (k->replicas > 1 && (k->holders[i] >> me & 1))) mask[e >> 6] |= 1ull << (e & 63);
    }
    if (k->weights) lo.weights = k->weights, lo.experts = mask;
    if (rc == 0) rc = model_load(&m, path, &lo, err, sizeof err);
    ep_member_t mb = {c, stage * per, per};
    model_ep_t ep = {.n_nodes = per, .index = r - stage * per, .n_layer = hp.n_layer, .n_expert = hp.n_expert,
                     .owner = k->owner, .alltoallv = ep_alltoallv, .gather = ep_gather, .ctx = &mb,
                     .lead = k->lead, .send = ep_send, .recv = ep_recv,
                     .holders = k->replicas > 1 ? k->holders : NULL};
    model_ctx_opts_t o = {.n_ctx = 64, .n_batch = N_BATCH, .n_threads = 1, .ep = &ep};
    if (rc == 0) rc = model_ctx_new(&ctx, m, &o, err, sizeof err);
    if (rc != 0) fprintf(stderr, "\nrank %d: %s (%s)\n", r, mlm_strerror(rc), err);
    const int V = hp.n_vocab, E = hp.n_embd;
    const bool last = stage == k->n_stages - 1;
    int32_t tok[N_PROMPT + N_DECODE];
    prompt_tokens(tok, N_PROMPT + N_DECODE, V > 0 ? V : 1);
    logits = malloc((size_t)(N_PROMPT + N_DECODE) * (V > 0 ? V : 1) * sizeof(float));
    hid = malloc((size_t)N_PROMPT * (E > 0 ? E : 1) * sizeof(float));
    // (first token, count) of each step: the prompt, then one token at a time
    for (int st = 0; rc == 0 && st <= N_DECODE; st++) {
        const int t0 = st == 0 ? 0 : N_PROMPT + st - 1, nt = st == 0 ? N_PROMPT : 1;
        float *out = logits + (size_t)t0 * V;
        if (k->n_stages == 1) {
            rc = model_eval(ctx, tok + t0, nt, out, st == 0);
        } else if (stage == 0) { // hands its residual stream to its counterpart in the next stage
            rc = model_eval_stage(ctx, tok + t0, NULL, nt, hid, NULL, false);
            if (rc == 0) rc = comm_send1(c, r + per, hid, (size_t)nt * E * sizeof(float), DL_MS);
        } else {
            comm_msg_t msg;
            rc = comm_recv(c, r - per, &msg, NULL, DL_MS);
            if (rc == 0 && (msg.n != 1 || msg.len[0] != (size_t)nt * E * sizeof(float))) rc = MLM_EPROTO;
            if (rc == 0) memcpy(hid, msg.data[0], msg.len[0]);
            if (rc == 0) comm_msg_free(&msg);
            if (rc == 0) rc = model_eval_stage(ctx, NULL, hid, nt, NULL, out, st == 0);
        }
        if (rc != 0) fprintf(stderr, "\nrank %d step %d: %s\n", r, st, mlm_strerror(rc));
    }
    if (rc == 0 && last && (!k->lead || r == stage * per)) { // with attention on the leader, it alone has logits
        for (int row = 0; row < N_PROMPT + N_DECODE; row++) {
            k->rows[r]++;
            k->mismatches[r] += memcmp(logits + (size_t)row * V, k->ref + (size_t)row * V, (size_t)V * sizeof(float)) != 0;
        }
    }
    k->rc[r] = rc;
    free(logits);
    free(hid);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
    comm_destroy(&c);
    return NULL;
}

// Runs case k on k->n threads and asserts every last-stage member got the reference bits.
static void run_case(ep_case_t *k, const char *what) {
    pthread_t th[MAX_RANKS];
    rank_arg_t args[MAX_RANKS];
    comm_inproc_group_t *g = NULL;
    if (strcmp(k->transport, "inproc") == 0) {
        CU_ASSERT_FATAL(comm_inproc_group_new(&g, k->n, 0) == 0);
    } else {
        k->dir = test_tmpdir();
    }
    for (int r = 0; r < k->n; r++) {
        args[r] = (rank_arg_t){k, g, r};
        pthread_create(&th[r], NULL, rank_main, &args[r]);
    }
    for (int r = 0; r < k->n; r++) pthread_join(th[r], NULL);
    comm_inproc_group_release(&g);
    if (k->dir) test_rm_dir(k->dir);
    k->dir = NULL;
    const int per = k->n / k->n_stages;
    for (int r = 0; r < k->n; r++) {
        CU_ASSERT_EQUAL(k->rc[r], 0);
        if (r >= k->n - per) { // the last stage produces the logits (its leader alone with k->lead)
            CU_ASSERT_EQUAL(k->rows[r], k->lead && r > k->n - per ? 0 : N_PROMPT + N_DECODE);
            CU_ASSERT_EQUAL(k->mismatches[r], 0);
            if (k->mismatches[r] || k->rc[r])
                fprintf(stderr, "\n%s (%s, %s%s, rank %d): %d of %d rows differ, rc %d\n", what, k->model,
                        k->transport, k->lead ? ", attention on the leader" : "", r, k->mismatches[r], k->rows[r],
                        k->rc[r]);
        }
    }
}

// Owner tables (member inside a group of `per`): by expert id, in contiguous uneven blocks, and
// shifted per layer (each block places its experts differently).
static void own_round_robin(uint8_t *own, int nl, int ne, int per) {
    for (int l = 0; l < nl; l++)
        for (int e = 0; e < ne; e++) own[l * ne + e] = (uint8_t)(e % per);
}

static void own_uneven(uint8_t *own, int nl, int ne, int per) { // member 0 holds the most, the last the fewest
    for (int l = 0; l < nl; l++)
        for (int e = 0; e < ne; e++) {
            int m = 0, at = 0;
            for (int j = 0; j < per; j++) { // member j gets ne*(per-j)/(sum) experts, at least one
                int cnt = ne * (per - j) * 2 / (per * (per + 1));
                if (cnt < 1) cnt = 1;
                if (j == per - 1) cnt = ne - at;
                if (e >= at && e < at + cnt) m = j;
                at += cnt;
            }
            own[l * ne + e] = (uint8_t)m;
        }
}

static void own_shifted(uint8_t *own, int nl, int ne, int per) { // member 0 owns nothing in layer 0
    for (int l = 0; l < nl; l++)
        for (int e = 0; e < ne; e++) own[l * ne + e] = (uint8_t)(l == 0 ? 1 + e % (per - 1) : (e + 3 * l) % per);
}

typedef void (*own_fn)(uint8_t *own, int nl, int ne, int per);

static void run_model_weights(const char *model, const char *transport, int n, int n_stages, own_fn own, bool lead,
                              int replicas, const char *weights, const char *what) {
    char path[1024];
    int V = 0;
    float *ref = reference_logits_on(test_shared_path(path, sizeof path, model), !weights, &V);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
    model_t *m = NULL;
    char err[256];
    CU_ASSERT_FATAL(model_load(&m, path, NULL, err, sizeof err) == 0);
    const model_hparams_t hp = *model_hparams(m);
    model_destroy(&m);
    CU_ASSERT_FATAL(hp.n_expert > 0 && hp.n_layer * hp.n_expert <= MAX_OWN);
    ep_case_t *k = calloc(1, sizeof *k);
    k->model = model;
    k->transport = transport;
    k->n = n;
    k->n_stages = n_stages;
    k->lead = lead;
    k->replicas = replicas;
    k->ref = ref;
    k->weights = weights;
    own(k->owner, hp.n_layer, hp.n_expert, n / n_stages);
    int held[MAX_RANKS] = {0}; // the placement really spreads the experts: every member owns some
    for (int i = 0; i < hp.n_layer * hp.n_expert; i++) held[k->owner[i]]++;
    for (int j = 0; j < n / n_stages; j++) CU_ASSERT(held[j] > 0);
    for (int i = 0; i < hp.n_layer * hp.n_expert; i++)
        for (int r = 0; r < replicas; r++) k->holders[i] |= 1ull << ((k->owner[i] + r) % (n / n_stages));
    run_case(k, what);
    free(k);
    free(ref);
}

static void run_model_mode(const char *model, const char *transport, int n, int n_stages, own_fn own, bool lead,
                           int replicas, const char *what) {
    run_model_weights(model, transport, n, n_stages, own, lead, replicas, NULL, what);
}

// Both ways of running the group: attention replicated on every member, and on the leader alone.
static void run_model(const char *model, const char *transport, int n, int n_stages, own_fn own, const char *what) {
    run_model_mode(model, transport, n, n_stages, own, false, 1, what);
    run_model_mode(model, transport, n, n_stages, own, true, 1, what);
}

// --- tests

#define SYNTH "models/synth/synth-moe-Q4_0.gguf"
#define SYNTH_F16 "models/synth/synth-moe-F16.gguf"
#define MOE8 "models/derived/stories260K-moe8x-top2-permuted.gguf"
#define MOE4 "models/derived/stories260K-moe4x-top4-split.gguf"

static void test_ep2_even(void) {
    run_model(MOE8, "inproc", 2, 1, own_round_robin, "2 members, 4 experts each");
    run_model(SYNTH, "inproc", 2, 1, own_round_robin, "2 members, even");
}

static void test_ep3_uneven(void) {
    run_model(MOE8, "inproc", 3, 1, own_uneven, "3 members, uneven");
    run_model(MOE4, "inproc", 3, 1, own_shifted, "3 members, top-4, shifted per layer");
    run_model(SYNTH_F16, "inproc", 3, 1, own_uneven, "3 members, F16 experts");
}

static void test_ep4(void) {
    run_model(MOE8, "inproc", 4, 1, own_round_robin, "4 members, even");
    run_model(SYNTH, "inproc", 4, 1, own_shifted, "4 members, shifted per layer");
}

static void test_ep_pipeline(void) {
    run_model(MOE8, "inproc", 4, 2, own_round_robin, "2 stages of 2 members");
    run_model(SYNTH, "inproc", 4, 2, own_shifted, "2 stages of 2 members, shifted");
}

static void test_ep_zmq(void) {
    run_model(MOE8, "zmq", 3, 1, own_uneven, "3 members over zmq");
    run_model(MOE4, "zmq", 4, 2, own_uneven, "2 stages of 2 members over zmq");
}

// Replicas (attention on the leader): each expert held by 2, 3 or every member of its group, each
// batch computed by whichever holder the leader picks; the single node's bits all the same.
static void test_ep_replicas(void) {
    run_model_mode(MOE8, "inproc", 4, 1, own_round_robin, true, 2, "4 members, 2 holders per expert");
    run_model_mode(SYNTH, "inproc", 3, 1, own_uneven, true, 3, "3 members, every member holds every expert");
    run_model_mode(MOE4, "inproc", 4, 2, own_shifted, true, 2, "2 stages of 2, top-4, every member holds all");
    run_model_mode(MOE8, "zmq", 3, 1, own_uneven, true, 2, "3 members over zmq, 2 holders per expert");
}

// Each member caching its placed experts ("experts" provider with the member's mask): one or two
// slots per block, read from the file when a token routes there, with and without reading ahead, the
// single node's bits all the same; and a member's cache serves only its own experts.
static void test_ep_expert_cache(void) {
    run_model_weights(MOE8, "inproc", 2, 1, own_round_robin, false, 1, "experts:n=1,prefetch=off",
                      "2 members, 1 of 4 cached per block");
    run_model_weights(MOE8, "inproc", 3, 1, own_uneven, true, 1, "experts:n=2,prefetch=on",
                      "3 members, uneven, 2 cached per block, prefetch");
    run_model_weights(SYNTH, "inproc", 4, 2, own_round_robin, true, 1, "experts:n=1", "2 stages of 2, 1 cached");
    run_model_weights(MOE8, "inproc", 4, 1, own_round_robin, true, 2, "experts:n=1,policy=lfu",
                      "4 members, 2 holders per expert, 1 cached");
    run_model_weights(MOE4, "inproc", 3, 1, own_shifted, false, 1, "experts:n=off", "3 members, no cache");
    // a member's provider: its experts counted and read on use, another member's refused
    char path[1024], err[256];
    model_t *m = NULL;
    const uint64_t mask[4] = {0x5}; // experts 0 and 2 of 8
    model_load_opts_t lo = {.weights = "experts:n=1,prefetch=off", .experts = mask};
    CU_ASSERT_FATAL(model_load(&m, test_shared_path(path, sizeof path, MOE8), &lo, err, sizeof err) == 0);
    weights_t *w = model_weights(m);
    char d[160];
    weights_describe(w, d, sizeof d);
    CU_ASSERT_PTR_NOT_NULL(strstr(d, "1 of 2 placed here per block"));
    const layer_weights_t *lw = NULL;
    CU_ASSERT_EQUAL(weights_acquire(w, 0, 1, &lw), MLM_ENOTFOUND);
    CU_ASSERT_NOT_EQUAL(weights_acquire(w, 0, 8, &lw), 0); // no expert 8
    for (int i = 0; i < 3; i++) { // 0 (miss), 0 (hit), 2 (miss, evicts 0)
        const int e = i < 2 ? 0 : 2;
        CU_ASSERT_EQUAL_FATAL(weights_acquire(w, 0, e, &lw), 0);
        CU_ASSERT(lw->w_gate.rows > 0);
        weights_release(w, 0, e);
    }
    weights_stats_t st;
    weights_stats(w, &st);
    CU_ASSERT_EQUAL(st.expert_hits, 1);
    CU_ASSERT_EQUAL(st.expert_misses, 2);
    model_destroy(&m);
}

// A member with attention on its leader, fed one scripted message per block: what a hostile or broken
// leader could send (test_ep_hostile).
typedef struct {
    uint8_t msg[1 << 16];
    size_t len;
    int sent;          // blocks this member answered
} script_t;

static int script_recv(void *ctx, int member, void *buf, size_t cap, size_t *len) {
    script_t *s = ctx;
    if (member != 0 || s->len > cap) return MLM_EPROTO; // a member hears the leader alone
    memcpy(buf, s->msg, *len = s->len);
    return 0;
}

static int script_send(void *ctx, int member, const void *buf, size_t len) {
    (void)buf;
    (void)len;
    script_t *s = ctx;
    s->sent += member == 0;
    return member == 0 ? 0 : MLM_EPROTO;
}

// Builds the leader's message for one token (nt 1): header, the top-k ids, then `rows` rows of n_embd.
static void script_msg(script_t *s, int nt, int rows_hdr, const int32_t *sel, int k, int rows, int E) {
    int32_t hdr[2] = {nt, rows_hdr};
    memcpy(s->msg, hdr, sizeof hdr);
    memcpy(s->msg + sizeof hdr, sel, (size_t)k * sizeof(int32_t));
    s->len = sizeof hdr + (size_t)k * sizeof(int32_t) + (size_t)rows * E * sizeof(float);
    memset(s->msg + sizeof hdr + (size_t)k * sizeof(int32_t), 0, (size_t)rows * E * sizeof(float));
}

// A leader's message a member cannot take is refused (MLM_EPROTO) before anything is computed with it:
// another chunk size, a row count that disagrees with the routing, an expert id out of range or one
// the member does not hold, a truncated or an overlong message. A well-formed one is answered.
static void test_ep_hostile(void) {
    char path[1024], err[256];
    model_t *m = NULL;
    CU_ASSERT_FATAL(model_load(&m, test_shared_path(path, sizeof path, MOE8), NULL, err, sizeof err) == 0);
    const model_hparams_t *hp = model_hparams(m);
    const int k = hp->n_expert_used, E = hp->n_embd;
    CU_ASSERT_FATAL(k == 2 && (size_t)E * 4 * 2 + 64 < sizeof ((script_t *)0)->msg);
    uint8_t own[MAX_OWN];
    for (int i = 0; i < hp->n_layer * hp->n_expert; i++) own[i] = (uint8_t)(i % hp->n_expert >= 4); // 4-7: member 1
    script_t *s = calloc(1, sizeof *s);
    model_ep_t ep = {.n_nodes = 2, .index = 1, .n_layer = hp->n_layer, .n_expert = hp->n_expert, .owner = own,
                     .ctx = s, .lead = true, .send = script_send, .recv = script_recv};
    model_ctx_opts_t o = {.n_ctx = 16, .n_threads = 1, .ep = &ep};
    const int32_t tok = 1;
    struct {
        int nt, rows_hdr, sel0, sel1, rows;
        long extra;
        int want;
    } cases[] = {
        {1, 1, 4, 5, 1, 0, 0},            // well formed: experts 4 and 5 on this token's row
        {1, 0, -1, -1, 0, 0, 0},          // nothing for this member this time
        {2, 1, 4, 5, 1, 0, MLM_EPROTO},   // another chunk size
        {1, 0, 4, 5, 0, 0, MLM_EPROTO},   // routed here but no row
        {1, 2, 4, 5, 2, 0, MLM_EPROTO},   // more rows than tokens routed here
        {1, 1, 4, 8, 1, 0, MLM_EPROTO},   // an id past n_expert
        {1, 1, 4, -2, 1, 0, MLM_EPROTO},  // a negative id other than -1
        {1, 1, 0, 5, 1, 0, MLM_EPROTO},   // expert 0 is not held here
        {1, 1, 4, 5, 1, -4, MLM_EPROTO},  // truncated
        {1, 1, 4, 5, 1, 4, MLM_EPROTO},   // 4 bytes too many
        {1, 1, 4, 5, 1, -(long)(E * 4 + 12), MLM_EPROTO}, // shorter than its header
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        model_ctx_t *c = NULL;
        CU_ASSERT_EQUAL_FATAL(model_ctx_new(&c, m, &o, err, sizeof err), 0);
        const int32_t sel[2] = {cases[i].sel0, cases[i].sel1};
        script_msg(s, cases[i].nt, cases[i].rows_hdr, sel, k, cases[i].rows, E);
        s->len = (size_t)((long)s->len + cases[i].extra);
        s->sent = 0;
        const int rc = model_eval(c, &tok, 1, NULL, false);
        CU_ASSERT_EQUAL(rc, cases[i].want);
        if (rc != cases[i].want) fprintf(stderr, "\nhostile case %zu: rc %d, want %d\n", i, rc, cases[i].want);
        if (cases[i].want == 0) CU_ASSERT_EQUAL(s->sent, hp->n_layer); // one answer per block
        model_ctx_destroy(&c);
    }
    free(s);
    model_destroy(&m);
}

// A group the context cannot run is refused before anything is computed.
static void test_ep_refused(void) {
    char path[1024], err[256];
    model_t *m = NULL;
    CU_ASSERT_FATAL(model_load(&m, test_shared_path(path, sizeof path, MOE8), NULL, err, sizeof err) == 0);
    const model_hparams_t *hp = model_hparams(m);
    uint8_t own[MAX_OWN] = {0};
    ep_member_t mb = {0};
    model_ep_t ep = {.n_nodes = 2, .index = 0, .n_layer = hp->n_layer, .n_expert = hp->n_expert, .owner = own,
                     .alltoallv = ep_alltoallv, .gather = ep_gather, .ctx = &mb};
    model_ctx_opts_t o = {.n_ctx = 16, .n_threads = 1, .ep = &ep};
    model_ctx_t *c = NULL;
    own[3] = 2; // an owner outside the group
    CU_ASSERT_EQUAL(model_ctx_new(&c, m, &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NULL(c);
    own[3] = 1;
    ep.n_expert = hp->n_expert + 1; // a table of another shape
    CU_ASSERT_EQUAL(model_ctx_new(&c, m, &o, err, sizeof err), MLM_EINVAL);
    ep.n_expert = hp->n_expert;
    CU_ASSERT_EQUAL(model_ctx_new(&c, m, &o, err, sizeof err), 0);
    model_ctx_destroy(&c);
    model_destroy(&m);
    // a node placed experts 1 and 5 prepares only those: another is not there to acquire
    const uint64_t mask[4] = {(1u << 1) | (1u << 5), 0, 0, 0};
    model_load_opts_t lo = {.repack = true, .experts = mask};
    model_t *mm = NULL;
    CU_ASSERT_FATAL(model_load(&mm, path, &lo, err, sizeof err) == 0);
    CU_ASSERT_STRING_EQUAL(weights_name(model_weights(mm)), "mmap");
    const layer_weights_t *X = NULL;
    CU_ASSERT_EQUAL(weights_acquire(model_weights(mm), 0, 5, &X), 0);
    if (X) weights_release(model_weights(mm), 0, 5);
    CU_ASSERT_EQUAL(weights_acquire(model_weights(mm), 1, 0, &X), MLM_ENOTFOUND);
    model_destroy(&mm);
    lo.weights = "window"; // which streams every expert
    CU_ASSERT_EQUAL(model_load(&mm, path, &lo, err, sizeof err), MLM_EUNSUPPORTED);
    // a dense model has no experts to place
    CU_ASSERT_FATAL(model_load(&m, test_shared_path(path, sizeof path, "models/stories260K.gguf"), NULL, err, sizeof err) == 0);
    ep.n_layer = model_hparams(m)->n_layer;
    ep.n_expert = 0;
    CU_ASSERT_EQUAL(model_ctx_new(&c, m, &o, err, sizeof err), MLM_EINVAL);
    model_destroy(&m);
}

// --- real worker processes: the cluster runtime with placed experts

// A reference case's logits on one node, fed as generation does (prompt, then one token at a time),
// in chunks of n_batch (0 = the default) so a pipeline's micro-batches give the same chunks.
static float *case_single(const ref_case_t *rc, int n_batch) {
    char err[256];
    model_t *m = NULL;
    if (model_load(&m, rc->model_path, NULL, err, sizeof err) != 0) return NULL;
    const int nv = model_hparams(m)->n_vocab, rows = rc->n_prompt + rc->n_greedy;
    float *lg = malloc((size_t)rows * nv * sizeof(float));
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = rows + 8, .n_threads = 1, .n_batch = n_batch};
    int r = lg ? model_ctx_new(&c, m, &co, err, sizeof err) : MLM_ENOMEM;
    if (r == 0) r = model_eval(c, rc->prompt_tokens, rc->n_prompt, lg, true);
    for (int i = 0; r == 0 && i < rc->n_greedy; i++) r = model_eval(c, &rc->greedy[i], 1, lg + (size_t)(rc->n_prompt + i) * nv, true);
    model_ctx_destroy(&c);
    model_destroy(&m);
    if (r != 0) {
        free(lg);
        return NULL;
    }
    return lg;
}

typedef struct {
    const char *case_name;   // shared/reference case
    int n_workers;
    int ep;                  // members per stage (--ep)
    int pp;                  // stages (0 = one)
    const char *speeds;      // node speeds (uneven expert counts), or NULL
    bool coord_shard;        // the coordinator computes the first member's share
    bool tcp;
    int replicas;            // --ep-replicas (0 = the planner's: 1 without budgets)
    bool all;                // --ep-attn all (attention replicated)
    int hot;                 // > 0: --ep-hot with counts making experts 7, 5, 3 (in that order) the most popular;
                             // < 0: -hot of them, the counts of block l rotated by l + 1 (write_hot_counts)
} ep_cluster_t;

// The block count of the model at path (0 if it cannot be read).
static int model_layers(const char *path) {
    char err[256];
    gguf_t *g = NULL;
    plan_model_t *pm = malloc(sizeof *pm);
    int n = 0;
    if (pm && gguf_open(&g, path, err, sizeof err) == 0 && plan_model_from_gguf(g, pm, err, sizeof err) == 0)
        n = pm->n_layer;
    gguf_close(&g);
    free(pm);
    return n;
}

// Writes routing counts for n_layer blocks of 8 experts in which 7, 5, 3, 1 are picked most (in that
// order) to path; with rotate, block l's counts are turned by l + 1 experts (expert (e + l + 1) % 8
// gets e's count: each block's hot experts differ from its neighbour's). 0 or -1.
static int write_hot_counts(const char *path, int n_layer, bool rotate) {
    static const int c[8] = {5, 20, 5, 30, 5, 40, 5, 90};
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "# test counts\nlayers %d experts 8 top_k 2 tokens 100\n", n_layer);
    for (int l = 0; l < n_layer; l++) {
        fprintf(f, "%d:", l);
        for (int e = 0; e < 8; e++) fprintf(f, " %d", c[rotate ? (e - (l + 1) % 8 + 8) % 8 : e]);
        fprintf(f, "\n");
    }
    return fclose(f) == 0 ? 0 : -1;
}

// Runs the case on local worker processes with placed experts: every logit row must equal one
// node's. Returns the rows that differ, or -1 (reported). *plan_out gets the plan. With cache, the
// workers have no model file: their shards are streamed into that cache directory (or taken from it);
// *st (if given) gets the cluster's stats.
static int run_ep(const ep_cluster_t *k, const char *cache, plan_t *plan_out, cluster_stats_t *st) {
    ref_case_t rc;
    if (ref_load(k->case_name, &rc) != 0) return -1;
    const int rows = rc.n_prompt + rc.n_greedy, nv = rc.n_vocab, ub = k->pp > 1 ? 4 : 0;
    float *ref = case_single(&rc, ub), *lg = malloc((size_t)rows * nv * sizeof(float));
    char err[1024];
    launch_t l;
    launch_opts_t lo = {.exe = test_meshlm_bin(), .model_path = cache ? NULL : rc.model_path, .n_threads = 1,
                        .tcp = k->tcp, .cache_dir = cache};
    int bad = -1;
    if (!ref || !lg || !lo.exe || launch_local(&l, k->n_workers, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "launch: %s\n", lo.exe ? err : "MESHLM_BIN not set");
        free(ref);
        free(lg);
        ref_free(&rc);
        return -1;
    }
    const char *eps[LAUNCH_MAX];
    for (int i = 0; i < l.n; i++) eps[i] = l.endpoint[i];
    char hot[64];
    snprintf(hot, sizeof hot, "/tmp/meshlm-test-hot-%d.txt", (int)getpid());
    if (k->hot && write_hot_counts(hot, model_layers(rc.model_path), k->hot < 0) != 0)
        fprintf(stderr, "cannot write %s\n", hot);
    cluster_opts_t co = {.model_path = rc.model_path, .workers = eps, .n_workers = l.n, .speeds = k->speeds,
                         .coordinator_shard = k->coord_shard, .n_ctx = rows + 8, .n_threads = 1, .timeout_ms = 10000,
                         .pp = k->pp > 0 ? k->pp : 1, .ep = k->ep, .ubatch = ub, .keep_all = true,
                         .ep_replicas = k->replicas, .ep_replicated = k->all, .ep_hot_file = k->hot ? hot : NULL,
                         .ep_hot = k->hot < 0 ? -k->hot : k->hot};
    cluster_t *cl = NULL;
    if (cluster_open(&cl, &co, err, sizeof err) != 0) {
        fprintf(stderr, "  %s: cluster_open: %s\n", k->case_name, err);
    } else {
        if (plan_out) *plan_out = *cluster_plan(cl);
        if (st) *st = *cluster_stats(cl);
        int r = cluster_eval(cl, rc.prompt_tokens, rc.n_prompt, lg, true);
        for (int i = 0; r == 0 && i < rc.n_greedy; i++)
            r = cluster_eval(cl, &rc.greedy[i], 1, lg + (size_t)(rc.n_prompt + i) * nv, true);
        if (r != 0) {
            fprintf(stderr, "  %s (%s): eval: %s (%s)\n", k->case_name, cluster_plan(cl)->layout, mlm_strerror(r),
                    cluster_error(cl));
        } else {
            bad = 0;
            for (int i = 0; i < rows; i++)
                bad += memcmp(lg + (size_t)i * nv, ref + (size_t)i * nv, (size_t)nv * sizeof(float)) != 0;
            if (bad) fprintf(stderr, "  %s (%s): %d of %d rows differ from one node\n", k->case_name,
                             cluster_plan(cl)->layout, bad, rows);
        }
        cluster_close(&cl, true);
    }
    launch_reap(&l, 5000);
    if (k->hot) unlink(hot);
    free(ref);
    free(lg);
    ref_free(&rc);
    return bad;
}

static int run_ep_cluster(const ep_cluster_t *k, plan_t *plan_out) { return run_ep(k, NULL, plan_out, NULL); }

// Experts per member of shard i (of every block of its stage).
static int experts_of(const plan_t *p, int i) {
    int k = 0;
    for (int e = 0; e < 256; e++) k += plan_has_expert(p, i, e);
    return k;
}

// Experts shard i computes in block il (hot second copies included).
static int block_experts_of(const plan_t *p, int i, int il) {
    int k = 0;
    for (int e = 0; e < 256; e++) k += plan_holds_expert(p, i, il, e);
    return k;
}

static void test_ep_workers(void) {
    static const ep_cluster_t cases[] = {
        {"stories260K-moe8x-top2-permuted.p0", 2, 2, 0, NULL, false, false, 0, false, 0},   // 4 + 4 experts
        {"synth-moe-Q4_0.p0", 3, 3, 0, NULL, false, true, 0, false, 0},                     // 3 + 3 + 2, over tcp
        {"stories260K-moe8x-top2-permuted.p1", 3, 3, 0, "4,1,1", false, false, 0, false, 0}, // uneven by speed
        {"synth-moe-Q4_0.p1", 4, 4, 0, "1,1,2,1", false, false, 0, false, 0},               // 4 members, uneven
        {"stories260K-moe4x-top4-split.p0", 4, 2, 2, NULL, false, false, 0, false, 0},      // 2 stages of 2 members
        {"synth-moe-F16.p0", 3, 3, 0, NULL, true, false, 0, false, 0},                      // the coordinator is a member
        {"stories260K-moe8x-top2-permuted.p0", 3, 3, 0, NULL, false, false, 2, false, 0}, // 2 holders per expert
        {"synth-moe-Q4_0.p0", 4, 2, 2, NULL, false, false, 2, false, 0},                 // 2 stages of 2, every member all
        {"stories260K-moe8x-top2-permuted.p1", 3, 3, 0, "4,1,1", false, false, 0, true, 0}, // attention replicated
        {"stories260K-moe8x-top2-permuted.p0", 3, 3, 0, NULL, false, false, 0, false, 3}, // hot 7, 5, 3 on 2 each
        {"synth-moe-Q4_0.p0", 4, 2, 2, NULL, false, false, 0, false, 1}, // 2 stages of 2, expert 7 on both of each
        {"synth-moe-Q4_0.p1", 3, 3, 0, NULL, false, false, 0, false, -2}, // other hot experts in every block
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        plan_t *p = calloc(1, sizeof *p);
        CU_ASSERT_EQUAL(run_ep_cluster(&cases[i], p), 0);
        CU_ASSERT(p->ep);
        CU_ASSERT(p->ep_lead == !cases[i].all);
        CU_ASSERT_EQUAL(p->ep_replicas, cases[i].replicas ? cases[i].replicas : 1);
        const int members = cases[i].coord_shard ? cases[i].n_workers + 1 : cases[i].n_workers;
        CU_ASSERT_EQUAL(p->n, cases[i].coord_shard ? cases[i].ep : members);
        int total = 0, most = 0, least = 1 << 20;
        for (int j = 0; j < p->n; j++) {
            const int e = experts_of(p, j);
            total += e;
            most = e > most ? e : most;
            least = e < least ? e : least;
        }
        CU_ASSERT(least >= 1);
        const int hot = cases[i].hot < 0 ? -cases[i].hot : cases[i].hot;
        CU_ASSERT_EQUAL(p->ep_hot, hot);
        CU_ASSERT_EQUAL(total, p->ep_replicas * p->n_stages * (strstr(cases[i].case_name, "moe4x") ? 4 : 8));
        for (int st = 0; st < p->n_stages; st++) // each block: every expert r times, its hot ones once more
            for (int il = p->shard[p->stage_first[st]].s.l0; il < p->shard[p->stage_first[st]].s.l1; il++) {
                int in_block = 0;
                for (int j = p->stage_first[st]; j < p->stage_first[st + 1]; j++) in_block += block_experts_of(p, j, il);
                CU_ASSERT_EQUAL(in_block, p->ep_replicas * (strstr(cases[i].case_name, "moe4x") ? 4 : 8) + hot);
                for (int h = 0; h < hot; h++) { // the hottest of the block (7, 5, 3; rotated by il + 1) on 2
                    int holders = 0;
                    const int e = cases[i].hot > 0 ? 7 - 2 * h : (7 - 2 * h + il + 1) % 8;
                    for (int j = p->stage_first[st]; j < p->stage_first[st + 1]; j++) holders += plan_holds_expert(p, j, il, e);
                    CU_ASSERT_EQUAL(holders, 2);
                }
            }
        if (cases[i].speeds) CU_ASSERT(most > least); // the faster member computes more experts
        free(p);
    }
}

// Workers without the model receive shard files holding only their own experts' planes (protocol
// 1.9): the logits are still one node's, each cached file names its experts and holds that many
// planes of every expert tensor, the bytes streamed are those files' (under 1.25 times the model's
// size, where whole blocks for both members would be twice it), and a second run loads them from the cache.
static void test_ep_streamed(void) {
    const ep_cluster_t k = {"synth-moe-Q4_0.p0", 2, 2, 0, NULL, false, false, 0, false, 0};
    char *dir = test_tmpdir();
    plan_t *p = calloc(1, sizeof *p);
    cluster_stats_t st;
    CU_ASSERT_EQUAL_FATAL(run_ep(&k, dir, p, &st), 0);
    CU_ASSERT(p->ep && p->n == 2);
    CU_ASSERT_EQUAL(st.from_cache, 0);
    char path[1024], err[256];
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load(k.case_name, &rc), 0);
    struct stat ms;
    CU_ASSERT_EQUAL_FATAL(stat(rc.model_path, &ms), 0);
    // the experts once and the rest (0.7 of 4.2 MB) twice: 4.9 MB, where whole blocks would be 8.4 MB
    CU_ASSERT(st.shard_bytes_sent > (uint64_t)ms.st_size && st.shard_bytes_sent < (uint64_t)ms.st_size * 5 / 4);
    DIR *d = opendir(dir);
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    uint64_t on_disk = 0;
    int files = 0, held[2] = {0, 0};
    for (struct dirent *de; (de = readdir(d));) {
        if (!strstr(de->d_name, ".gguf")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        CU_ASSERT_PTR_NOT_NULL(strstr(de->d_name, "-x"));
        gguf_t *g = NULL;
        CU_ASSERT_EQUAL_FATAL(gguf_open(&g, path, err, sizeof err), 0);
        on_disk += gguf_file_size(g);
        shard_slice_t s;
        bool is_shard = false;
        CU_ASSERT(shard_file_slice(g, &s, &is_shard) == 0 && is_shard && s.placed);
        const int n = shard_expert_count(&s, 8);
        if (files < 2) held[files] = n;
        CU_ASSERT(n >= 1 && n < 8);
        int exps = 0;
        for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
            const gguf_tensor_t *t = gguf_tensor(g, i);
            if (!shard_expert_tensor(t->name)) continue;
            CU_ASSERT_EQUAL(t->ne[2], n);
            exps++;
        }
        CU_ASSERT_EQUAL(exps, 12); // 3 per block, 4 blocks
        gguf_close(&g);
        files++;
    }
    closedir(d);
    CU_ASSERT_EQUAL(files, 2);
    CU_ASSERT_EQUAL(held[0] + held[1], 8);
    CU_ASSERT_EQUAL(on_disk, st.shard_bytes_sent);
    // again: every share from the cache, nothing streamed, the same logits
    CU_ASSERT_EQUAL(run_ep(&k, dir, p, &st), 0);
    CU_ASSERT_EQUAL(st.from_cache, 2);
    CU_ASSERT_EQUAL(st.shard_bytes_sent, 0);
    ref_free(&rc);
    free(p);
    test_rm_dir(dir);
}

// meshlm plan names the experts each node holds of each block.
static void test_ep_plan_output(void) {
    const char *exe = test_meshlm_bin();
    CU_ASSERT_PTR_NOT_NULL_FATAL(exe);
    char path[1024], cmd[2300], out[16384];
    snprintf(cmd, sizeof cmd, "%s plan -m %s --nodes 2,1,1 --ep 3 2>&1", exe,
             test_shared_path(path, sizeof path, SYNTH));
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "plan ep3"));
    // speeds 2,1,1 over 8 experts: 4, 2 and 2
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "layers 0-3: node-0 experts 0-3; node-1 experts 4-5; node-2 experts 6-7"));
    if (!strstr(out, "node-0 experts 0-3")) fprintf(stderr, "\n%s\n", out);
    // with stages: each stage names its layers
    snprintf(cmd, sizeof cmd, "%s plan -m %s --nodes 4 --ep 2 --pp 2 2>&1", exe, path);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "plan pp2 x ep2"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "layers 0-1: node-0 experts 0-3; node-1 experts 4-7"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "layers 2-3: node-2 experts 0-3; node-3 experts 4-7"));
    // hot experts: each block's own (the rotated counts make expert l block l's favourite), on a member
    // that does not own it
    char hot[64];
    snprintf(hot, sizeof hot, "/tmp/meshlm-test-hot-plan-%d.txt", (int)getpid());
    CU_ASSERT_EQUAL_FATAL(write_hot_counts(hot, 4, true), 0);
    snprintf(cmd, sizeof cmd, "%s plan -m %s --nodes 2,1,1 --ep 3 --ep-hot %s:1 2>&1", exe, path, hot);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "the 1 most popular of each block on 2 nodes"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "layer 0, second copies: expert 0 on node-1"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "layer 3, second copies: expert 3 on node-1"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "layer 1, second copies: expert 1 on node-"));
    if (!strstr(out, "layer 0, second copies")) fprintf(stderr, "\n%s\n", out);
    // the same in --json: each shard's experts and its copies as [layer, expert]
    snprintf(cmd, sizeof cmd, "%s plan -m %s --nodes 2,1,1 --ep 3 --ep-hot %s:1 --json 2>&1", exe, path, hot);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    unlink(hot);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"experts\": [4, 5], \"hot_copies\": [[0, 0], [1, 1], [2, 2], [3, 3]]"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"experts\": [0, 1, 2, 3], \"hot_copies\": []"));
    // placed experts over budgets that cannot hold them: refused with --expert-cache all, otherwise (by
    // default, or --expert-cache auto) each node keeps what fits (Mixtral-8x7B Q4_0 on four 5 GiB nodes: 1
    // of its 2 per block), in the table and --json; sliced shares under the same budgets keep their rows of
    // 6 of 8
    snprintf(cmd, sizeof cmd, "%s plan --preset mixtral-8x7b --nodes 1:5G,1:5G,1:5G,1:5G --ep 4 --expert-cache all 2>&1",
             exe);
    CU_ASSERT_NOT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "placed experts do not fit: node node-0"));
    snprintf(cmd, sizeof cmd, "%s plan --preset mixtral-8x7b --nodes 1:5G,1:5G,1:5G,1:5G --ep 4 2>&1", exe);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "each node caching what its budget holds"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "node-3 experts 6-7 (1 per block resident)"));
    snprintf(cmd, sizeof cmd, "%s plan --preset mixtral-8x7b --nodes 1:5G,1:5G,1:5G,1:5G --ep 4 --expert-cache auto 2>&1",
             exe);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "each node caching what its budget holds"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "node-3 experts 6-7 (1 per block resident)"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "| cache 1 of 2 "));
    snprintf(cmd, sizeof cmd, "%s plan --preset mixtral-8x7b --nodes 1:5G,1:5G,1:5G,1:5G --ep 4 --expert-cache auto --json 2>&1",
             exe);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "\"experts\": [6, 7], \"hot_copies\": [], \"experts_resident\": 1, \"experts_held\": 2"));
    snprintf(cmd, sizeof cmd, "%s plan --preset mixtral-8x7b --nodes 1:5G,1:5G,1:5G,1:5G --ep off --expert-cache auto 2>&1",
             exe);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "| cache 6 of 8 "));
    if (!strstr(out, "| cache 6 of 8 ")) fprintf(stderr, "\n%s\n", out);
    snprintf(cmd, sizeof cmd, "%s plan --preset mixtral-8x7b --nodes 4 --expert-cache 0 2>&1", exe);
    CU_ASSERT_NOT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "--expert-cache wants experts per block (1 or more), auto or all, not '0'"));
    // a dense model has nothing to place
    snprintf(cmd, sizeof cmd, "%s plan -m %s --nodes 2 --ep 2 2>&1", exe,
             test_shared_path(path, sizeof path, "models/stories260K.gguf"));
    CU_ASSERT_NOT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "no experts to place"));
}

// Routing counts: parsed and normalised per block; every malformed form refused naming its line.
static void test_ep_routing_counts(void) {
    char err[512];
    plan_model_t *pm = calloc(1, sizeof *pm);
    snprintf(pm->name, sizeof pm->name, "m");
    pm->n_layer = 2;
    pm->n_expert = 4;
    pm->n_expert_used = 2;
    double pop[8];
    CU_ASSERT_EQUAL(plan_popularity_parse("# c\n\nlayers 2 experts 4 top_k 2 tokens 2\n0: 3 1 0 0\n 1:0 0 0 0 \n", pm, pop,
                                          err, sizeof err),
                    0);
    CU_ASSERT(pop[0] == 0.75 && pop[1] == 0.25 && pop[2] == 0 && pop[3] == 0);
    CU_ASSERT(pop[4] == 0.25 && pop[7] == 0.25); // a block with no picks: uniform
    static const struct {
        const char *text, *says;
    } bad[] = {
        {"0: 1 1 1 1\n", "line 1: expected \"layers"},
        {"layers 3 experts 4 top_k 2 tokens 2\n", "3 layers of 4 experts, but m has 2 layers of 4"},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 1 1\n", "line 2: count 3 of block 0"},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 1 1 1 1\n", "more than 4 counts"},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 -1 1 1\n", "count 1 of block 0 is not a whole number"},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 1.5 1 1\n", "count 1 of block 0"},
        {"layers 2 experts 4 top_k 2 tokens 2\n1: 1 1 1 1\n", "line 2: expected \"0: \""},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 1 1 1\n", "counts for 1 of the 2 blocks"},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 1 1 1\n1: 1 1 1 1\n2: 1 1 1 1\n", "line 4: more than the 2"},
        {"# nothing\n", "no \"layers L"},
        {"layers 2 experts 4 top_k 2 tokens 2\n0: 1 1 1 nan\n", "count 3 of block 0"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = 0;
        CU_ASSERT_EQUAL(plan_popularity_parse(bad[i].text, pm, pop, err, sizeof err), MLM_EFORMAT);
        if (!strstr(err, bad[i].says)) fprintf(stderr, "\n  case %zu: '%s' lacks '%s'\n", i, err, bad[i].says);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, bad[i].says));
    }
    CU_ASSERT_EQUAL(plan_popularity_load("/nonexistent/counts.txt", pm, pop, err, sizeof err) != 0, 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "/nonexistent/counts.txt"));
    pm->n_expert = 0;
    CU_ASSERT_EQUAL(plan_popularity_parse("layers 2 experts 4 top_k 2 tokens 2\n", pm, pop, err, sizeof err), MLM_EINVAL);
    free(pm);
}

// --- the planner

static void fast_nodes(plan_node_t *nd, int n, double lat_us, double link_bw) {
    memset(nd, 0, sizeof *nd * (size_t)n);
    for (int i = 0; i < n; i++) {
        snprintf(nd[i].name, sizeof nd[i].name, "n%d", i);
        nd[i].gflops = 400;
        nd[i].mem_bw = 100e9;
        nd[i].lat_us = lat_us;
        nd[i].link_bw = link_bw;
    }
}

// Placement follows speed and memory; every expert of a stage has one owner; the automatic choice
// takes placed experts where the exchanges dominate and sliced ones where compute does.
// Hot experts: the most popular get a second holder, each on the member with the least expected
// expert work; the prediction draws experts by popularity; budgets and wrong plans refused.
static void test_ep_hot_planner(void) {
    char err[512];
    plan_model_t *pm = malloc(sizeof *pm);
    CU_ASSERT_EQUAL_FATAL(plan_model_from_preset("mixtral-8x7b", "Q4_0", pm, err, sizeof err), 0);
    double *pop = calloc((size_t)pm->n_layer * 8, sizeof *pop);
    for (int il = 0; il < pm->n_layer; il++) { // experts 0 and 1 (both on n0) take 70% of the picks
        pop[il * 8 + 0] = 0.4;
        pop[il * 8 + 1] = 0.3;
        for (int e = 2; e < 8; e++) pop[il * 8 + e] = 0.05;
    }
    plan_node_t nd[4];
    fast_nodes(nd, 4, 1000, 125e6);
    plan_t *u = calloc(1, sizeof *u), *q = calloc(1, sizeof *q), *h = calloc(1, sizeof *h);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, u, err, sizeof err), 0); // uniform routing
    pm->popularity = pop;
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, q, err, sizeof err), 0);
    CU_ASSERT(q->cost.token_ms > u->cost.token_ms); // n0 computes most tokens' experts now
    *h = *q;
    CU_ASSERT_EQUAL_FATAL(plan_ep_hot(pm, h, 2, err, sizeof err), 0);
    CU_ASSERT_EQUAL(h->ep_hot, 2);
    // in every block: expert 0 to n1 (n1-n3 equally idle, 2 experts each: the first), then expert 1 to n2
    // (n1 now has half of 0); the placement of every block stays as it was
    CU_ASSERT(experts_of(h, 0) == 2 && experts_of(h, 1) == 2 && experts_of(h, 2) == 2 && experts_of(h, 3) == 2);
    for (int il = 0; il < pm->n_layer; il++) {
        CU_ASSERT(plan_holds_expert(h, 0, il, 0) && plan_holds_expert(h, 1, il, 0) && !plan_holds_expert(h, 2, il, 0) &&
                  !plan_holds_expert(h, 3, il, 0));
        CU_ASSERT(plan_holds_expert(h, 0, il, 1) && plan_holds_expert(h, 2, il, 1) && !plan_holds_expert(h, 1, il, 1) &&
                  !plan_holds_expert(h, 3, il, 1));
        CU_ASSERT(block_experts_of(h, 0, il) == 2 && block_experts_of(h, 1, il) == 3 && block_experts_of(h, 2, il) == 3 &&
                  block_experts_of(h, 3, il) == 2);
    }
    CU_ASSERT_EQUAL(h->shard[1].weight_bytes, q->shard[1].weight_bytes * 3 / 2);
    CU_ASSERT(h->cost.token_ms < q->cost.token_ms);
    // through plan_make (--ep 4 --ep-hot): the same placement
    plan_opts_t o = {.n_ctx = 4096, .keep_all = true, .pp = 1, .ep = 4, .ep_hot = 2};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &o, q, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(q->ep_hot == 2 && memcmp(q->ep_hot_n, h->ep_hot_n, sizeof h->ep_hot_n) == 0 &&
              memcmp(q->ep_hot_of, h->ep_hot_of, sizeof h->ep_hot_of) == 0);
    o.ep_replicas = 2;
    CU_ASSERT_EQUAL(plan_make(pm, nd, 4, &o, q, NULL, 0, NULL, err, sizeof err), MLM_EINVAL);
    o.ep_replicas = 0;
    o.ep_replicated = true;
    CU_ASSERT_EQUAL(plan_make(pm, nd, 4, &o, q, NULL, 0, NULL, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--ep-hot"));
    // wrong plans and counts
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, false, 1, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_ep_hot(pm, q, 2, err, sizeof err), MLM_EINVAL); // attention replicated
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 2, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_ep_hot(pm, q, 2, err, sizeof err), MLM_EINVAL); // replicas already
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_ep_hot(pm, q, 0, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(plan_ep_hot(pm, q, 9, err, sizeof err), MLM_EINVAL);
    // budgets: members with room for their 2 experts only: no second copy anywhere
    for (int i = 1; i < 4; i++) nd[i].mem_budget = u->shard[i].peak_bytes + ((uint64_t)1 << 20);
    nd[0].mem_budget = u->shard[0].peak_bytes + ((uint64_t)1 << 20);
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL(plan_ep_hot(pm, q, 1, err, sizeof err), MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "hot expert 0"));
    // room on n3 alone: both copies go there
    nd[3].mem_budget = 0;
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, q, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(plan_ep_hot(pm, q, 2, err, sizeof err), 0);
    CU_ASSERT(plan_holds_expert(q, 3, 5, 0) && plan_holds_expert(q, 3, 5, 1) && block_experts_of(q, 3, 5) == 4 &&
              block_experts_of(q, 1, 5) == 2);
    // popularity that differs per block: block l's favourite is expert (l * 3) % 8, and its copy goes to a
    // member that does not own it; the prediction falls below the plain placement's
    for (int il = 0; il < pm->n_layer; il++)
        for (int e = 0; e < 8; e++) pop[il * 8 + e] = e == (il * 3) % 8 ? 0.65 : 0.05;
    fast_nodes(nd, 4, 1000, 125e6);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, q, err, sizeof err), 0);
    *h = *q;
    CU_ASSERT_EQUAL_FATAL(plan_ep_hot(pm, h, 1, err, sizeof err), 0);
    for (int il = 0; il < pm->n_layer; il++) {
        const int fav = (il * 3) % 8;
        CU_ASSERT(h->ep_hot_n[il] == 1 && h->ep_hot_of[il][0].expert == fav && !plan_has_expert(h, h->ep_hot_of[il][0].shard, fav));
        int holders = 0;
        for (int j = 0; j < 4; j++) holders += plan_holds_expert(h, j, il, fav);
        CU_ASSERT_EQUAL(holders, 2);
    }
    CU_ASSERT(h->cost.token_ms < q->cost.token_ms);
    free(u);
    free(q);
    free(h);
    free(pop);
    free(pm);
}

// Members that cache their experts: under budgets too small for their placed experts the plan keeps
// as many per block as fit (at least one) instead of refusing, counts the misses' reads from disk in
// the predicted time, and is refused only when not even one expert per block fits; a fixed N is kept.
static void test_ep_planner_cached(void) {
    char err[512];
    plan_model_t *pm = malloc(sizeof *pm);
    plan_t *p = malloc(sizeof *p), *r = malloc(sizeof *r);
    CU_ASSERT_EQUAL_FATAL(plan_model_from_preset("mixtral-8x7b", "Q4_0", pm, err, sizeof err), 0);
    uint64_t ex = 0; // one expert of every block
    for (int il = 0; il < pm->n_layer; il++)
        ex += (pm->row_bytes[il][PLAN_W_GATE] + pm->row_bytes[il][PLAN_W_UP]) * (uint64_t)pm->n_ff +
              pm->row_bytes[il][PLAN_W_DOWN] * (uint64_t)pm->n_embd;
    plan_node_t nd[4];
    fast_nodes(nd, 4, 1000, 125e6);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, r, err, sizeof err), 0); // no budgets: resident
    for (int i = 0; i < 4; i++) nd[i].mem_budget = 5ull << 30, nd[i].disk_bw = 1e9;
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, p, err, sizeof err), MLM_EFULL); // 2 experts need 7 GiB
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "do not fit"));
    CU_ASSERT_EQUAL_FATAL(plan_ep_cached(pm, nd, 4, 1, 4096, true, 1, -1, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(p->ep_cache, -1);
    for (int i = 0; i < 4; i++) {
        const plan_shard_t *sh = &p->shard[i];
        CU_ASSERT_EQUAL(plan_shard_n_experts(sh), 2);
        CU_ASSERT_EQUAL(sh->ep_cached, 1); // one of its two per block fits beside the rest
        CU_ASSERT(sh->peak_bytes <= nd[i].mem_budget);
        CU_ASSERT_EQUAL(sh->weight_bytes, r->shard[i].weight_bytes - ex);
        // a routed expert (2 of 8 per token land here: 0.5 per block) misses half the time
        CU_ASSERT_EQUAL(sh->st.stream_bytes, (uint64_t)(0.5 * (double)ex * 2 * 2 / 8));
        CU_ASSERT(sh->disk_ms > 0);
    }
    CU_ASSERT(p->cost.disk_ms > 0 && p->cost.token_ms > r->cost.token_ms + p->cost.disk_ms * 0.5);
    // budgets holding everything: nothing cached away, the resident plan's figures
    for (int i = 0; i < 4; i++) nd[i].mem_budget = 16ull << 30;
    CU_ASSERT_EQUAL_FATAL(plan_ep_cached(pm, nd, 4, 1, 4096, true, 1, -1, p, err, sizeof err), 0);
    for (int i = 0; i < 4; i++) CU_ASSERT_EQUAL(p->shard[i].ep_cached, 0);
    CU_ASSERT_DOUBLE_EQUAL(p->cost.token_ms, r->cost.token_ms, 1e-9);
    // a fixed N of 1 caches even where more would fit; below one per block it is refused
    CU_ASSERT_EQUAL_FATAL(plan_ep_cached(pm, nd, 4, 1, 4096, true, 1, 1, p, err, sizeof err), 0);
    for (int i = 0; i < 4; i++) CU_ASSERT_EQUAL(p->shard[i].ep_cached, 1);
    for (int i = 0; i < 4; i++) nd[i].mem_budget = 2ull << 30; // the leader's dense part alone is over 1 GiB, + 3 GiB of one expert per block
    CU_ASSERT_EQUAL(plan_ep_cached(pm, nd, 4, 1, 4096, true, 1, -1, p, err, sizeof err), MLM_EFULL);
    // through the search: the automatic choice still compares them with sliced experts
    plan_opts_t o = {.n_ctx = 4096, .ep = 4, .expert_cache = -1};
    for (int i = 0; i < 4; i++) nd[i].mem_budget = 5ull << 30;
    CU_ASSERT_EQUAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(p->ep && p->shard[1].ep_cached == 1);
    o.expert_cache = 0;
    CU_ASSERT_EQUAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), MLM_EFULL);
    // sliced experts under the same budgets: each share keeps its rows of as many experts per block as
    // fit and reads the routed others, instead of streaming every unit through the window
    plan_opts_t so = {.n_ctx = 4096, .ep = -1, .tp = 4, .expert_cache = -1};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &so, p, NULL, 0, NULL, err, sizeof err), 0);
    so.expert_cache = 0;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &so, r, NULL, 0, NULL, err, sizeof err), 0);
    for (int i = 0; i < 4; i++) {
        const plan_shard_t *c = &p->shard[i], *w = &r->shard[i];
        CU_ASSERT(c->ep_cached >= 1 && c->ep_cached < 8 && c->ep_cache_of == 8);
        CU_ASSERT(c->peak_bytes <= nd[i].mem_budget);
        CU_ASSERT(w->ep_cached == 0 && w->st.streams && w->st.window > 0); // the window without a cache
        CU_ASSERT(c->st.stream_bytes > 0 && c->st.stream_bytes < w->st.stream_bytes / 2);
        // per token: top-2 of 8 per block, each a miss with 1 - kept / 8, its rows of one expert
        uint64_t one = 0;
        for (int il = 0; il < pm->n_layer; il++)
            one += (pm->row_bytes[il][PLAN_W_GATE] + pm->row_bytes[il][PLAN_W_UP]) * (uint64_t)(c->s.f1 - c->s.f0) +
                   pm->row_bytes[il][PLAN_W_DOWN] * (uint64_t)(c->s.e1 - c->s.e0);
        CU_ASSERT_EQUAL(c->st.stream_bytes, (uint64_t)(2.0 * (1.0 - c->ep_cached / 8.0) * (double)one));
    }
    CU_ASSERT(p->cost.token_ms < r->cost.token_ms / 2);
    // one node whose budget holds not one expert per block (3 GiB: 3.0 GiB of experts alone): a pool of
    // slots its blocks share, every routed expert read per token (k x its rows of one expert per block),
    // predicted well below the window, which reads every block whole
    plan_node_t one[1];
    fast_nodes(one, 1, 1000, 125e6);
    one[0].mem_budget = 3ull << 30, one[0].disk_bw = 1e9;
    so = (plan_opts_t){.n_ctx = 4096, .ep = -1, .expert_cache = -1};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, one, 1, &so, p, NULL, 0, NULL, err, sizeof err), 0);
    so.expert_cache = 0;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, one, 1, &so, r, NULL, 0, NULL, err, sizeof err), 0);
    const plan_shard_t *ps = &p->shard[0], *ws = &r->shard[0];
    CU_ASSERT(ps->ep_cached == 0 && ps->ep_pool >= 1 && ps->ep_pool < pm->n_layer);
    CU_ASSERT(ps->peak_bytes <= one[0].mem_budget);
    CU_ASSERT_EQUAL(ps->st.stream_bytes, 2 * ex); // top-2, every block's two experts read
    CU_ASSERT(ws->ep_pool == 0 && ws->st.streams && ws->st.window > 0);
    CU_ASSERT(p->cost.token_ms < r->cost.token_ms / 2);
    char *txt = NULL;
    size_t tlen = 0;
    FILE *f = open_memstream(&txt, &tlen);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    plan_table(p, pm, f);
    fclose(f);
    CU_ASSERT_PTR_NOT_NULL(strstr(txt, "| pool of "));
    free(txt);
    fprintf(stderr, "\n  3 GiB node: a pool of %d slots, %.0f ms/token (the window %.0f) ", ps->ep_pool, p->cost.token_ms,
            r->cost.token_ms);
    free(p);
    free(r);
    free(pm);
}

static void test_ep_planner(void) {
    char err[512];
    plan_model_t *pm = malloc(sizeof *pm);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_EQUAL_FATAL(plan_model_from_preset("mixtral-8x7b", "Q4_0", pm, err, sizeof err), 0);
    plan_node_t nd[4];
    fast_nodes(nd, 4, 1000, 125e6);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, false, 1, p, err, sizeof err), 0);
    CU_ASSERT(p->ep && p->n == 4 && p->n_stages == 1);
    for (int e = 0; e < 8; e++) {
        int owners = 0;
        for (int i = 0; i < 4; i++) owners += plan_has_expert(p, i, e);
        CU_ASSERT_EQUAL(owners, 1);
    }
    CU_ASSERT(experts_of(p, 0) == 2 && experts_of(p, 3) == 2);
    CU_ASSERT(p->cost.token_ms > 0 && p->cost.comm_ms > 0);
    // each member holds the replicated blocks and its experts: 2 of 8 of the expert bytes
    CU_ASSERT(p->shard[0].weight_bytes < pm->weight_bytes / 3);
    // attention on the leader: the others hold their experts and nothing else (no KV either), the
    // leader what it held; the predicted token is no slower (one attention instead of four, same exchanges)
    plan_t *q = calloc(1, sizeof *q);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 1, q, err, sizeof err), 0);
    CU_ASSERT(q->ep_lead && !p->ep_lead);
    CU_ASSERT_EQUAL(q->shard[0].weight_bytes, p->shard[0].weight_bytes);
    CU_ASSERT(q->shard[0].kv_bytes > 0 && q->shard[1].kv_bytes == 0);
    uint64_t ex = 0; // one expert of every block
    for (int il = 0; il < pm->n_layer; il++)
        ex += (pm->row_bytes[il][PLAN_W_GATE] + pm->row_bytes[il][PLAN_W_UP]) * (uint64_t)pm->n_ff +
              pm->row_bytes[il][PLAN_W_DOWN] * (uint64_t)pm->n_embd;
    CU_ASSERT_EQUAL(q->shard[1].weight_bytes, 2 * ex);
    CU_ASSERT(q->shard[1].peak_bytes < p->shard[1].peak_bytes - p->shard[1].kv_bytes);
    CU_ASSERT(q->cost.token_ms > 0 && q->cost.token_ms <= p->cost.token_ms);
    // replicas: every expert on 2 members (the owner and the next), twice a member's expert bytes, and
    // a token's two experts no longer wait on one member: predicted faster; not with attention replicated
    plan_t *q2 = calloc(1, sizeof *q2);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 2, q2, err, sizeof err), 0);
    CU_ASSERT_EQUAL(q2->ep_replicas, 2);
    for (int e = 0; e < 8; e++) {
        int holders = 0;
        for (int i = 0; i < 4; i++) holders += plan_has_expert(q2, i, e);
        CU_ASSERT_EQUAL(holders, 2);
    }
    CU_ASSERT(experts_of(q2, 1) == 4 && q2->shard[1].weight_bytes == 4 * ex);
    CU_ASSERT(q2->cost.token_ms < q->cost.token_ms);
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, false, 2, q2, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 5, q2, err, sizeof err), MLM_EINVAL);
    // a budget that holds 2 experts per block on the members but not 4: 2 replicas do not fit
    nd[2].mem_budget = q->shard[2].peak_bytes + ((uint64_t)1 << 20);
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, true, 2, q2, err, sizeof err), MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "replicas"));
    // the automatic count, with budgets on every node: the fastest that fits (2 with room for it)
    for (int i = 0; i < 4; i++) nd[i].mem_budget = (uint64_t)64 << 30;
    plan_opts_t ro = {.n_ctx = 4096, .keep_all = true, .pp = 1, .ep = 4};
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &ro, q2, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(q2->ep && q2->ep_lead && q2->ep_replicas == 2);
    for (int i = 0; i < 4; i++) nd[i].mem_budget = 0; // without budgets: one holder unless asked
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &ro, q2, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_EQUAL(q2->ep_replicas, 1);
    ro.ep_replicas = 3;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &ro, q2, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT_EQUAL(q2->ep_replicas, 3);
    free(q2);
    free(q);
    // memory-aware: a member whose budget holds the replicated part and one expert per block gets one
    nd[1].mem_budget = p->shard[0].peak_bytes - ((uint64_t)1 << 20); // just too small for two
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, false, 1, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(experts_of(p, 1), 1);
    CU_ASSERT(p->shard[1].peak_bytes <= nd[1].mem_budget);
    CU_ASSERT_EQUAL(experts_of(p, 0) + experts_of(p, 1) + experts_of(p, 2) + experts_of(p, 3), 8);
    nd[1].mem_budget = 1u << 30; // not even the replicated blocks fit
    CU_ASSERT_EQUAL(plan_ep(pm, nd, 4, 1, 4096, false, 1, p, err, sizeof err), MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "n1"));
    // speed-aware: twice the rate, twice the experts
    fast_nodes(nd, 4, 1000, 125e6);
    nd[0].gflops = 800;
    nd[0].mem_bw = 200e9;
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, false, 1, p, err, sizeof err), 0);
    CU_ASSERT(experts_of(p, 0) > experts_of(p, 1));
    // pipelines of expert-parallel groups: 2 stages of 2, each placing all 8 experts
    fast_nodes(nd, 4, 1000, 125e6);
    CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 2, 4096, false, 1, p, err, sizeof err), 0);
    CU_ASSERT(p->n_stages == 2 && p->shard[2].s.l0 == 16 && p->shard[0].s.l1 == 16);
    CU_ASSERT(experts_of(p, 0) + experts_of(p, 1) == 8 && experts_of(p, 2) + experts_of(p, 3) == 8);
    CU_ASSERT_STRING_EQUAL(p->layout, "pp2 x ep2");
    // the automatic choice: slow links (5 ms, 300 Mbit/s) favour placed experts (2 exchanges per block
    // against an all-gather per routed expert), fast ones sliced experts (each node reads a quarter)
    plan_opts_t o = {.n_ctx = 4096, .keep_all = true, .pp = 1}; // one stage: tp4 against ep4
    fast_nodes(nd, 4, 5000, 37.5e6);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(p->ep);
    CU_ASSERT(p->placed_ms > 0 && p->sliced_ms > p->placed_ms);
    fast_nodes(nd, 4, 10, 10e9);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(!p->ep);
    CU_ASSERT(p->placed_ms > p->sliced_ms && p->sliced_ms > 0);
    // forced, and refused
    o.ep = 2;
    o.pp = 0;
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(p->ep && p->n_stages == 2 && p->n == 4);
    o.ep = -1;
    o.pp = 1;
    fast_nodes(nd, 4, 5000, 37.5e6);
    CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
    CU_ASSERT(!p->ep);
    o.ep = 2;
    o.tp = 2;
    CU_ASSERT_EQUAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), MLM_EINVAL);
    free(pm);
    free(p);
}

// 4 one-thread nodes on one machine's 2 cores (local workers): sliced experts compute on all 4 at once
// (twice as slow), placed experts with attention on the leader compute on the leader alone, then on
// the 2 holders of the token's 2 experts (2 replicas): no slower. With attention replicated every
// member computes it at once: slower.
static void test_ep_shared_cores(void) {
    char err[512];
    plan_model_t *pm = malloc(sizeof *pm);
    plan_t *p = malloc(sizeof *p);
    CU_ASSERT_EQUAL_FATAL(plan_model_from_preset("mixtral-8x7b", "Q4_0", pm, err, sizeof err), 0);
    pm->n_layer = 4; // the benchmark's 4-block file
    plan_node_t nd[4];
    double alone[3] = {0};
    for (int shared = 0; shared < 2; shared++) {
        fast_nodes(nd, 4, 1000, 125e6);
        for (int i = 0; i < 4; i++) {
            nd[i].gflops = 90;
            nd[i].mem_bw = 6e9;
            if (shared) nd[i].cpu_id = 1, nd[i].cores = 2, nd[i].threads = 1;
        }
        plan_opts_t o = {.n_ctx = 4096, .keep_all = true, .pp = 1, .tp = 4, .ep = -1};
        CU_ASSERT_EQUAL_FATAL(plan_make(pm, nd, 4, &o, p, NULL, 0, NULL, err, sizeof err), 0);
        CU_ASSERT_FATAL(!p->ep);
        const double sliced = p->cost.token_ms;
        CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, true, 2, p, err, sizeof err), 0);
        const double lead = p->cost.token_ms;
        CU_ASSERT_EQUAL_FATAL(plan_ep(pm, nd, 4, 1, 4096, false, 1, p, err, sizeof err), 0);
        const double all = p->cost.token_ms;
        if (!shared) {
            alone[0] = sliced, alone[1] = lead, alone[2] = all;
            continue;
        }
        CU_ASSERT(sliced > 1.6 * alone[0]);
        CU_ASSERT_DOUBLE_EQUAL(lead, alone[1], 1e-9);
        CU_ASSERT(all > 1.2 * alone[2]);
        fprintf(stderr, "\n  ms/token alone / on 2 cores: sliced %.1f / %.1f, placed (leader, 2 holders) %.1f / %.1f, "
                "placed (attention replicated) %.1f / %.1f ", alone[0], sliced, alone[1], lead, alone[2], all);
    }
    free(pm);
    free(p);
}

// An expert-parallel plan goes only to workers of protocol 1.5 or newer: --ep with a 1.4 worker is
// refused naming it and both versions, and the automatic choice keeps experts sliced. A 1.7 worker
// gets placed experts with attention replicated (attention on the leader is 1.8); an 1.8 worker is
// refused --ep-hot (second copies per block are 1.9).
static void test_ep_old_worker(void) {
    char path[1024], err[512];
    test_shared_path(path, sizeof path, SYNTH);
    for (int k = 0; k < 5; k++) {
        comm_t *ctl[2], *data[2];
        CU_ASSERT_EQUAL_FATAL(comm_inproc_new_group(ctl, 2), 0);
        CU_ASSERT_EQUAL_FATAL(comm_inproc_new_group(data, 2), 0);
        pthread_t th;
        test_old_worker_t ow = {ctl[1], k < 2 ? 4 : k < 4 ? 7 : 8};
        pthread_create(&th, NULL, test_old_worker_main, &ow);
        cluster_opts_t co = {.model_path = path, .control = ctl[0], .data = data[0], .same_file = true,
                             .coordinator_shard = true, .n_ctx = 64, .n_threads = 1, .timeout_ms = 5000, .pp = 1,
                             .keep_all = true, .ep = k % 2 || k == 4 ? 2 : 0,
                             .ep_hot_file = k == 4 ? "/nonexistent/counts.txt" : NULL};
        cluster_t *cl = NULL;
        CU_ASSERT_EQUAL_FATAL(cluster_new(&cl, &co, err, sizeof err), 0);
        CU_ASSERT_EQUAL(cluster_hello(cl, err, sizeof err), 0);
        err[0] = 0;
        int rc = cluster_make_plan(cl, err, sizeof err);
        if (k == 0) {
            CU_ASSERT_EQUAL(rc, 0);
            CU_ASSERT(!cluster_plan(cl)->ep);
        } else if (k == 3) { // 1.7, --ep 2: placed, attention replicated
            CU_ASSERT_EQUAL(rc, 0);
            CU_ASSERT(cluster_plan(cl)->ep && !cluster_plan(cl)->ep_lead);
        } else if (k == 2) {
            CU_ASSERT_EQUAL(rc, 0);
        } else if (k == 4) { // refused before the counts are read
            CU_ASSERT_EQUAL(rc, MLM_EUNSUPPORTED);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "speaks protocol 1.8"));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "drop --ep-hot"));
        } else {
            CU_ASSERT_EQUAL(rc, MLM_EUNSUPPORTED);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "speaks protocol 1.4"));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "no expert parallelism (1.5"));
        }
        cluster_close(&cl, true);
        pthread_join(th, NULL);
        for (int r = 0; r < 2; r++) {
            comm_destroy(&ctl[r]);
            comm_destroy(&data[r]);
        }
    }
}

int test_ep_suite(void) {
    CU_pSuite s = CU_add_suite("ep", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "2 members, even placements", test_ep2_even) ||
        !CU_add_test(s, "3 members, uneven placements", test_ep3_uneven) ||
        !CU_add_test(s, "4 members", test_ep4) ||
        !CU_add_test(s, "pipeline of two expert-parallel groups", test_ep_pipeline) ||
        !CU_add_test(s, "over zmq", test_ep_zmq) ||
        !CU_add_test(s, "members caching their placed experts", test_ep_expert_cache) ||
        !CU_add_test(s, "replicated experts, attention on the leader", test_ep_replicas) ||
        !CU_add_test(s, "inconsistent groups refused", test_ep_refused) ||
        !CU_add_test(s, "a leader's malformed messages refused", test_ep_hostile) ||
        !CU_add_test(s, "worker processes with placed experts", test_ep_workers) ||
        !CU_add_test(s, "meshlm plan names the experts of each node", test_ep_plan_output) ||
        !CU_add_test(s, "workers without the model receive only their experts", test_ep_streamed) ||
        !CU_add_test(s, "planner: placement, memory, speed, sliced or placed", test_ep_planner) ||
        !CU_add_test(s, "planner: members caching their placed experts under small budgets", test_ep_planner_cached) ||
        !CU_add_test(s, "routing counts parsed, malformed ones refused", test_ep_routing_counts) ||
        !CU_add_test(s, "planner: a second holder for the popular experts", test_ep_hot_planner) ||
        !CU_add_test(s, "planner: nodes sharing a machine's cores, sliced against placed", test_ep_shared_cores) ||
        !CU_add_test(s, "protocol 1.4 and 1.7 workers", test_ep_old_worker))
        return -1;
    return 0;
}
