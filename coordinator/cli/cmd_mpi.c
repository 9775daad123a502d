// meshlm mpi: tensor-parallel generation over the ranks of an mpirun job (rank 0 samples and prints, like `run`).
#include <cjson/cJSON.h>
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "coordinator/cli/gen_args.h"
#include "coordinator/runtime/generate.h"
#include "coordinator/cli/layout_args.h"
#include "worker/node/pipeline.h"
#include "parallel/plan.h"
#include "transport/comm_mpi.h"
#include "transport/gatherv.h"
#include "core/clock.h"
#include "core/err.h"
#include "worker/model/model.h"
#include "worker/text/tokenizer.h"

// --- types

// Control messages from rank 0 (and failure notices from any rank), two frames:
//   frame 0: u32 STEP_MAGIC, u16 STEP_VERSION, u16 kind, u32 n, u32 pos, u32 flags, u32 ubatch (little-endian)
//   frame 1: STEP: n int32 tokens; FAIL: the reason as text; otherwise empty.
// Two frames, so a notice that lands inside comm_allgatherv (one frame per block) fails it at once.
#define STEP_MAGIC 0x534d4c4du   // "MLMS"
#define STEP_VERSION 2          // 2: the last word is the micro-batch size (was 0)
#define STEP_HDR_BYTES 24
enum { K_STEP = 1, K_RESET = 2, K_STOP = 3, K_FAIL = 4 }; // only ever appended
#define F_ALL_LOGITS 1u          // flags: all_logits
#define F_LOGITS 2u              // flags: logits wanted (non-NULL)

typedef struct {
    gen_args_t g;             // model, prompt, sampling, output (shared with run)
    const char *speeds;       // --speeds
    int timeout_ms;           // --timeout
    bool selftest;            // --selftest
    bool verbose;             // --verbose
    layout_args_t lay;        // --pp, --tp, --plan, --ubatch, --keep-all
} mpi_args_t;

// Rank 0's engine: broadcasts every step, then computes its share.
typedef struct {
    comm_t *comm;             // borrowed
    model_ctx_t *ctx;         // borrowed
    pipe_node_t *pipe;        // its place in the pipeline (borrowed)
    int ubatch;               // micro-batch tokens
    int timeout_ms;           // per message
    int rc;                   // first failure of a reset (reported by the next eval)
} mpi_engine_t;

// --- helpers

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int send_ctl(comm_t *c, int peer, int kind, uint32_t n, uint32_t pos, uint32_t flags, const void *body,
                    size_t len, int timeout_ms) {
    uint8_t h[STEP_HDR_BYTES] = {0};
    put32(h, STEP_MAGIC);
    h[4] = STEP_VERSION;
    h[6] = (uint8_t)kind;
    put32(h + 8, n);
    put32(h + 12, pos);
    put32(h + 16, flags & 0xffu);
    put32(h + 20, flags >> 8); // the micro-batch size rides in flags' upper bits
    comm_iov_t f[2] = {{h, sizeof h}, {body, len}};
    return comm_send(c, peer, f, 2, timeout_ms);
}

// Sends a control message to every other rank; the first error wins.
static int send_ctl_all(comm_t *c, int kind, uint32_t n, uint32_t pos, uint32_t flags, const void *body, size_t len,
                        int timeout_ms) {
    int rc = 0;
    for (int r = 0; r < comm_size(c); r++) {
        if (r == comm_rank(c)) continue;
        int e = send_ctl(c, r, kind, n, pos, flags, body, len, timeout_ms);
        if (e != 0 && rc == 0) rc = e;
    }
    return rc;
}

// Tells every other rank this one failed (best effort), so none waits for it until its deadline.
static void notify_failure(comm_t *c, const char *why) {
    if (c && comm_size(c) > 1) send_ctl_all(c, K_FAIL, 0, 0, 0, why, strlen(why), 1000);
}

static int engine_eval(void *ctx, const int32_t *t, int n, float *logits, bool all) {
    mpi_engine_t *e = ctx;
    if (e->rc != 0) return e->rc;
    if (n < 0) return MLM_EINVAL;
    uint8_t *body = malloc((size_t)n * 4 + 1);
    if (!body) return MLM_ENOMEM;
    for (int i = 0; i < n; i++) put32(body + 4 * (size_t)i, (uint32_t)t[i]);
    uint32_t flags = (all ? F_ALL_LOGITS : 0) | (logits ? F_LOGITS : 0) | (uint32_t)e->ubatch << 8;
    int rc = send_ctl_all(e->comm, K_STEP, (uint32_t)n, (uint32_t)model_ctx_pos(e->ctx), flags, body, (size_t)n * 4,
                          e->timeout_ms);
    free(body);
    if (rc != 0) return e->rc = rc;
    rc = pipe_node_step(e->pipe, e->ctx, t, n, e->ubatch, logits, all);
    if (rc == 0 && logits && !pipe_lands_logits(e->pipe)) rc = pipe_recv_logits(e->pipe, n, e->ubatch, logits, all);
    return rc;
}

static void engine_reset(void *ctx) {
    mpi_engine_t *e = ctx;
    int rc = send_ctl_all(e->comm, K_RESET, 0, 0, 0, NULL, 0, e->timeout_ms);
    if (rc != 0 && e->rc == 0) e->rc = rc;
    model_ctx_reset(e->ctx);
}

// Ranks > 0: run every step rank 0 announces until STOP. 0, or a negative code with err set.
static int follow(comm_t *comm, model_ctx_t *ctx, pipe_node_t *pipe, int n_vocab, int timeout_ms, char *err,
                  size_t errlen) {
    float *logits = NULL;     // (rows, n_vocab) scratch, rows = the largest step seen
    size_t cap = 0;           // floats in logits
    int32_t *toks = NULL;     // (n) the step's tokens
    int rc = 0;
    for (;;) {
        comm_msg_t m;
        rc = comm_recv(comm, 0, &m, NULL, timeout_ms);
        if (rc != 0) {
            snprintf(err, errlen, "waiting for a step from rank 0: %s", mlm_strerror(rc));
            break;
        }
        const uint8_t *h = m.data[0];
        if (m.n != 2 || m.len[0] != STEP_HDR_BYTES || get32(h) != STEP_MAGIC || h[4] != STEP_VERSION) {
            comm_msg_free(&m);
            snprintf(err, errlen, "malformed control message from rank 0");
            rc = MLM_EPROTO;
            break;
        }
        const int kind = h[6];
        const uint32_t n = get32(h + 8), pos = get32(h + 12), flags = get32(h + 16), ubatch = get32(h + 20);
        if (kind == K_STOP) {
            comm_msg_free(&m);
            break;
        }
        if (kind == K_FAIL) {
            snprintf(err, errlen, "rank 0 failed: %.*s", (int)(m.len[1] < 400 ? m.len[1] : 400), (const char *)m.data[1]);
            comm_msg_free(&m);
            rc = MLM_EPEER;
            break;
        }
        if (kind == K_RESET) {
            comm_msg_free(&m);
            model_ctx_reset(ctx);
            continue;
        }
        if (kind != K_STEP || n == 0 || m.len[1] != (size_t)n * 4 || (int64_t)pos != model_ctx_pos(ctx) ||
            (int64_t)n > model_ctx_n_ctx(ctx) - model_ctx_pos(ctx)) {
            snprintf(err, errlen, "bad step from rank 0 (kind %d, %u tokens at %u; this rank is at %d of %d)", kind, n,
                     pos, model_ctx_pos(ctx), model_ctx_n_ctx(ctx));
            comm_msg_free(&m);
            rc = MLM_EPROTO;
            break;
        }
        const bool all = flags & F_ALL_LOGITS;
        size_t need = (size_t)(all ? n : 1) * (size_t)n_vocab;
        if ((flags & F_LOGITS) && need > cap) {
            float *p = realloc(logits, need * sizeof *p);
            if (!p) rc = MLM_ENOMEM;
            else logits = p, cap = need;
        }
        int32_t *tp = rc == 0 ? realloc(toks, (size_t)n * sizeof *toks) : NULL;
        if (!tp) {
            comm_msg_free(&m);
            snprintf(err, errlen, "out of memory");
            rc = MLM_ENOMEM;
            break;
        }
        toks = tp;
        for (uint32_t i = 0; i < n; i++) toks[i] = (int32_t)get32((const uint8_t *)m.data[1] + 4 * (size_t)i);
        comm_msg_free(&m);
        rc = pipe_node_step(pipe, ctx, toks, (int)n, (int)ubatch, (flags & F_LOGITS) ? logits : NULL, all);
        if (rc != 0) {
            snprintf(err, errlen, "evaluation of %u tokens at %u failed: %s", n, pos, mlm_strerror(rc));
            break;
        }
    }
    free(logits);
    free(toks);
    return rc;
}

static void mpi_usage(FILE *f) {
    fprintf(f,
            "usage: mpirun -np N meshlm mpi -m FILE -p TEXT [options]\n"
            "  every rank loads its tensor-parallel slice of FILE; rank 0 tokenizes, samples and prints\n"
            GEN_ARGS_USAGE
            "  (the model path must be the same on every rank)\n"
            "      --speeds LIST       relative speeds of the ranks, e.g. 2,1,1 (default equal)\n"
            "      --timeout MS        deadline of each message and collective (default 30000)\n"
            "      --selftest          check the MPI transport (order, deadlines, gathers) instead; no model\n"
            "      --verbose           plan and progress on stderr (rank 0)\n"
            LAYOUT_ARGS_USAGE);
}

enum { O_SPEEDS = GA_NEXT, O_TIMEOUT, O_SELFTEST, O_VERBOSE };

// 0 to go on, -1 after --help, 1 on a usage error.
static int parse_args(int argc, char **argv, mpi_args_t *a) {
    static const struct option opts[] = {GEN_ARGS_LONGOPTS,
                                         {"speeds", required_argument, 0, O_SPEEDS},
                                         {"timeout", required_argument, 0, O_TIMEOUT},
                                         {"selftest", no_argument, 0, O_SELFTEST},
                                         {"verbose", no_argument, 0, O_VERBOSE},
                                         LAYOUT_ARGS_LONGOPTS,
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    gen_args_init(&a->g);
    a->timeout_ms = 30000;
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, GEN_ARGS_SHORTOPTS, opts, NULL)) != -1) {
        int r = gen_args_option(&a->g, ch, optarg, "mpi");
        if (r == 0) r = layout_args_option(&a->lay, ch, optarg, "mpi");
        if (r < 0) return 1;
        if (r > 0) continue;
        switch (ch) {
        case O_SPEEDS: a->speeds = optarg; break;
        case O_TIMEOUT: a->timeout_ms = atoi(optarg); break;
        case O_SELFTEST: a->selftest = true; break;
        case O_VERBOSE: a->verbose = true; break;
        case 'h': mpi_usage(stdout); return -1;
        default: mpi_usage(stderr); return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "meshlm mpi: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (!a->selftest && gen_args_check(&a->g, "mpi") != 0) {
        mpi_usage(stderr);
        return 1;
    }
    if (a->timeout_ms <= 0) {
        fprintf(stderr, "meshlm mpi: --timeout must be positive\n");
        return 1;
    }
    return 0;
}

// --- selftest: the transport's contract on real MPI ranks

#define CHECK(cond, ...)                                                                                     \
    do {                                                                                                     \
        checks++;                                                                                            \
        if (!(cond)) {                                                                                       \
            fails++;                                                                                         \
            fprintf(stderr, "mpi selftest rank %d: FAIL line %d: ", me, __LINE__);                           \
            fprintf(stderr, __VA_ARGS__);                                                                    \
            fputc('\n', stderr);                                                                             \
        }                                                                                                    \
    } while (0)

static uint8_t pattern(int rank, int msg, size_t i) { return (uint8_t)(rank * 31 + msg * 7 + i * 13); }

// 0 when every check passed on this rank.
static int selftest(comm_t *c, int timeout_ms) {
    const int me = comm_rank(c), N = comm_size(c);
    int checks = 0, fails = 0;
    enum { NMSG = 6 };
    // 1. Multi-frame messages from each peer arrive whole and in order (one is large: rendezvous).
    for (int step = 1; step < N; step++) {
        int peer = (me + step) % N;
        for (int k = 0; k < NMSG; k++) {
            size_t big = k == 3 ? 300000 : (size_t)k * 10;
            uint8_t *p = malloc(big + 1);
            for (size_t i = 0; i < big; i++) p[i] = pattern(me, k, i);
            uint32_t seq = (uint32_t)k;
            comm_iov_t f[3] = {{&seq, 4}, {NULL, 0}, {p, big}};
            int rc = comm_send(c, peer, f, 3, timeout_ms);
            CHECK(rc == 0, "send %d to %d: %s", k, peer, mlm_strerror(rc));
            free(p);
        }
    }
    for (int step = 1; step < N; step++) {
        int peer = (me - step + N) % N;
        for (int k = 0; k < NMSG; k++) {
            comm_msg_t m;
            int from = -1;
            int rc = comm_recv(c, peer, &m, &from, timeout_ms);
            CHECK(rc == 0, "recv %d from %d: %s", k, peer, mlm_strerror(rc));
            if (rc != 0) continue;
            size_t big = k == 3 ? 300000 : (size_t)k * 10;
            bool ok = m.n == 3 && from == peer && m.len[0] == 4 && *(uint32_t *)m.data[0] == (uint32_t)k &&
                      m.len[1] == 0 && m.len[2] == big;
            for (size_t i = 0; ok && i < big; i++) ok = ((uint8_t *)m.data[2])[i] == pattern(peer, k, i);
            CHECK(ok, "message %d from %d arrived wrong or out of order", k, peer);
            comm_msg_free(&m);
        }
    }
    // 2. recv(COMM_ANY) takes every peer's messages, each peer's in order.
    if (N > 1) {
        if (me != 0) {
            for (int k = 0; k < 3; k++) {
                uint32_t v = (uint32_t)(me * 100 + k);
                CHECK(comm_send1(c, 0, &v, 4, timeout_ms) == 0, "send to 0");
            }
            comm_msg_t m; // nothing more goes to rank 0 before it has all of them
            int rc = comm_recv(c, 0, &m, NULL, timeout_ms);
            CHECK(rc == 0 && m.n == 1 && m.len[0] == 3 && !memcmp(m.data[0], "ack", 3), "ack from 0: %s",
                  mlm_strerror(rc));
            if (rc == 0) comm_msg_free(&m);
        } else {
            int next[PLAN_MAX_NODES] = {0};
            for (int k = 0; k < 3 * (N - 1); k++) {
                comm_msg_t m;
                int from = -1;
                int rc = comm_recv(c, COMM_ANY, &m, &from, timeout_ms);
                CHECK(rc == 0, "recv any: %s", mlm_strerror(rc));
                if (rc != 0) break;
                bool ok = from > 0 && from < N && m.n == 1 && m.len[0] == 4 &&
                          *(uint32_t *)m.data[0] == (uint32_t)(from * 100 + next[from]);
                CHECK(ok, "recv any: message from %d out of order", from);
                if (from > 0 && from < N && from < PLAN_MAX_NODES) next[from]++;
                comm_msg_free(&m);
            }
            for (int r = 1; r < N; r++) CHECK(comm_send1(c, r, "ack", 3, timeout_ms) == 0, "ack to %d", r);
        }
    }
    // 3. A recv nobody answers returns MLM_ETIMEOUT at its deadline, and a poll (0 ms) at once.
    // Rank 0 goes first while the others wait for its "go"; then the others, each on a peer that
    // sends it nothing until the barrier after this test (rank 0 sends DOWN only once all are UP).
    {
        int rc = comm_barrier(c, timeout_ms);
        CHECK(rc == 0, "barrier: %s", mlm_strerror(rc));
        comm_msg_t m;
        if (me != 0) {
            rc = comm_recv(c, 0, &m, NULL, timeout_ms);
            CHECK(rc == 0 && m.n == 1 && m.len[0] == 2 && !memcmp(m.data[0], "go", 2), "go from rank 0: %s",
                  mlm_strerror(rc));
            if (rc == 0) comm_msg_free(&m);
        }
        int peer = N > 1 ? (me + 1) % N : COMM_ANY;
        double t0 = mlm_now_ms();
        rc = comm_recv(c, peer, &m, NULL, 200);
        double dt = mlm_now_ms() - t0;
        CHECK(rc == MLM_ETIMEOUT, "recv with nothing sent: %s", mlm_strerror(rc));
        CHECK(dt >= 190 && dt < 3000, "recv deadline of 200 ms fired after %.0f ms", dt);
        if (rc == 0) comm_msg_free(&m);
        t0 = mlm_now_ms();
        rc = comm_recv(c, peer, &m, NULL, 0);
        dt = mlm_now_ms() - t0;
        CHECK(rc == MLM_ETIMEOUT && dt < 100, "recv poll: %s after %.0f ms", mlm_strerror(rc), dt);
        if (rc == 0) comm_msg_free(&m);
        for (int r = 1; me == 0 && r < N; r++) CHECK(comm_send1(c, r, "go", 2, timeout_ms) == 0, "go to %d", r);
        rc = comm_barrier(c, timeout_ms);
        CHECK(rc == 0, "barrier: %s", mlm_strerror(rc));
    }
    // 4. A message over the size limit is refused before anything is sent.
    if (N > 1) {
        static const char one = 1;
        comm_iov_t f[2] = {{&one, 1}, {&one, (size_t)1 << 40}};
        int rc = comm_send(c, (me + 1) % N, f, 2, timeout_ms);
        CHECK(rc == MLM_ERANGE, "oversized send: %s", mlm_strerror(rc));
    }
    // 5. comm_allgatherv with a different size per rank (one of them empty, one large).
    {
        size_t lens[PLAN_MAX_NODES], total = 0;
        for (int r = 0; r < N && r < PLAN_MAX_NODES; r++) total += lens[r] = r == 1 ? 0 : (size_t)(r + 1) * 40000 + 3;
        uint8_t *in = malloc(lens[me] + 1), *out = malloc(total + 1);
        for (size_t i = 0; i < lens[me]; i++) in[i] = pattern(me, 9, i);
        int rc = comm_allgatherv(c, in, lens[me], out, lens, timeout_ms);
        CHECK(rc == 0, "allgatherv: %s", mlm_strerror(rc));
        bool ok = rc == 0;
        size_t off = 0;
        for (int r = 0; ok && r < N; r++) {
            for (size_t i = 0; ok && i < lens[r]; i++) ok = out[off + i] == pattern(r, 9, i);
            off += lens[r];
        }
        CHECK(ok, "allgatherv: wrong bytes");
        free(in);
        free(out);
    }
    // 6. All-reduce (generic STAR and RING): the documented summation order, the same bits everywhere.
    for (int algo = COMM_ALGO_STAR; algo <= COMM_ALGO_RING; algo++) {
        enum { NF = 1000 };
        float *x = malloc(NF * sizeof *x), *want = malloc(NF * sizeof *want);
        for (int i = 0; i < NF; i++) x[i] = (float)((i * 37 + me * 101) % 997) / 7.0f - 50.0f + 1e-3f * (float)me;
        for (int i = 0; i < NF; i++) { // STAR: rank-order left fold
            float acc = 0;
            for (int r = 0; r < N; r++) {
                float v = (float)((i * 37 + r * 101) % 997) / 7.0f - 50.0f + 1e-3f * (float)r;
                acc = r == 0 ? v : acc + v;
            }
            want[i] = acc;
        }
        int rc = comm_allreduce_f32(c, x, NF, (comm_algo_t)algo, timeout_ms);
        CHECK(rc == 0, "allreduce %s: %s", comm_algo_name((comm_algo_t)algo), mlm_strerror(rc));
        if (algo == COMM_ALGO_STAR || N <= 2)
            CHECK(rc == 0 && memcmp(x, want, NF * sizeof *x) == 0, "allreduce star: not the rank-order sum");
        // every rank the same bits: gather everyone's result and compare
        float *all = malloc((size_t)N * NF * sizeof *all);
        rc = comm_allgather(c, x, NF * sizeof *x, all, timeout_ms);
        CHECK(rc == 0, "allgather: %s", mlm_strerror(rc));
        for (int r = 1; rc == 0 && r < N; r++)
            CHECK(memcmp(all, all + (size_t)r * NF, NF * sizeof *x) == 0, "allreduce %s: rank %d has other bits",
                  comm_algo_name((comm_algo_t)algo), r);
        free(all);
        free(x);
        free(want);
    }
    int rc = comm_barrier(c, timeout_ms);
    CHECK(rc == 0, "barrier: %s", mlm_strerror(rc));
    printf("mpi selftest rank %d of %d: %s (%d checks, %d failed)\n", me, N, fails ? "FAIL" : "PASS", checks, fails);
    fflush(stdout);
    return fails ? 1 : 0;
}

// --- generation on every rank

// Loads this rank's slice, then rank 0 generates and the others follow. 0 or 1 (reported on stderr).
static int generate(comm_t *comm, mpi_args_t *a) {
    const int me = comm_rank(comm), N = comm_size(comm);
    char err[1024] = "";
    model_t *full = NULL, *m = NULL;
    tokenizer_t *tok = NULL;
    model_ctx_t *ctx = NULL;
    int32_t *pt = NULL;
    plan_t *plan = calloc(1, sizeof *plan);
    shard_slice_t *slices = calloc((size_t)N, sizeof *slices);
    FILE *lf = NULL;
    int rc = plan && slices ? 0 : MLM_ENOMEM, np = 0, n_ctx = 0;
    if (rc != 0) snprintf(err, sizeof err, "out of memory");
    // Every rank derives the same plan from the same file, prompt and options: no exchange needed.
    model_load_opts_t flo = {.repack = false};
    if (rc == 0) rc = model_load(&full, a->g.model, &flo, err, sizeof err);
    if (rc == 0 && (rc = tokenizer_from_gguf(&tok, model_gguf(full), err, sizeof err)) != 0)
        snprintf(err + strlen(err), sizeof err - strlen(err), " (tokenizer)");
    if (rc == 0) {
        size_t plen = strlen(a->g.prompt);
        int cap = (int)plen + 8;
        pt = malloc((size_t)cap * sizeof *pt);
        np = pt ? tokenizer_encode(tok, a->g.prompt, plen, !a->g.no_bos && tokenizer_add_bos(tok), false, pt, cap)
                : MLM_ENOMEM;
        if (np <= 0 || np > cap) {
            snprintf(err, sizeof err, "cannot tokenize the prompt: %s", np < 0 ? mlm_strerror(np) : "empty or too long");
            rc = np < 0 ? np : MLM_EINVAL;
        }
    }
    if (rc == 0) {
        const model_hparams_t *hp = model_hparams(full);
        n_ctx = a->g.n_ctx;
        if (n_ctx == 0) {
            int need = np + a->g.n_predict + 1;
            int def = hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
            n_ctx = need > def ? need : def;
        }
        if (np + a->g.n_predict + 1 > n_ctx) {
            snprintf(err, sizeof err, "prompt (%d tokens) + %d to generate exceed the context of %d positions (-c)", np,
                     a->g.n_predict, n_ctx);
            rc = MLM_ERANGE;
        }
    }
    if (rc == 0) {
        plan_node_t nodes[PLAN_MAX_NODES];
        char spec[16];
        snprintf(spec, sizeof spec, "%d", N);
        int n = plan_parse_nodes(a->speeds ? a->speeds : spec, nodes, PLAN_MAX_NODES, err, sizeof err);
        if (n < 0) {
            rc = n;
        } else if (n != N) {
            snprintf(err, sizeof err, "--speeds lists %d nodes but the job has %d ranks", n, N);
            rc = MLM_EINVAL;
        } else {
            // Every rank is a computing node; rank 0 (which samples) leads the first stage.
            plan_model_t *pm = malloc(sizeof *pm);
            rc = pm ? plan_model_from_gguf(model_gguf(full), pm, err, sizeof err) : MLM_ENOMEM;
            if (rc == 0 && a->lay.plan_file) {
                plan_spec_t spec;
                rc = plan_file_load(a->lay.plan_file, &spec, err, sizeof err);
                if (rc == 0) rc = plan_from_spec(pm, nodes, N, &spec, n_ctx, plan, err, sizeof err);
            } else if (rc == 0) {
                // Without --pp/--tp every rank computes in one tensor-parallel group, as before.
                plan_opts_t po = {.n_ctx = n_ctx, .pp = a->lay.pp ? a->lay.pp : (a->lay.tp ? 0 : 1), .tp = a->lay.tp,
                                  .keep_all = true, .pin_first = true, .ubatch = a->lay.ubatch};
                rc = plan_make(pm, nodes, N, &po, plan, NULL, 0, NULL, err, sizeof err);
            }
            free(pm);
            if (rc == 0 && (plan->n != N || plan->shard[0].node != 0)) {
                snprintf(err, sizeof err, "the plan must use every rank, rank 0 first");
                rc = MLM_EINVAL;
            }
            for (int i = 0; rc == 0 && i < N; i++) slices[i] = plan->shard[i].s;
            if (rc == 0 && me == 0 && a->verbose) plan_print(plan, model_gguf(full), stderr);
        }
    }
    tokenizer_destroy(&tok);
    model_destroy(&full);
    model_load_opts_t lo = {.repack = a->g.repack, .slice = &slices[me]};
    if (rc == 0) rc = model_load(&m, a->g.model, &lo, err, sizeof err);
    pipe_node_t pipe;
    memset(&pipe, 0, sizeof pipe);
    if (rc == 0) {
        const model_hparams_t *hp = model_hparams(m);
        rc = pipe_node_init(&pipe, comm, me, slices, N, hp->n_layer, hp->n_embd, hp->n_vocab, a->timeout_ms, err,
                            sizeof err);
    }
    const int ubatch = a->lay.ubatch > 0 ? a->lay.ubatch : (pipe.n_stages > 1 ? 16 : 0);
    if (rc == 0) {
        model_ctx_opts_t co = {.n_ctx = n_ctx, .n_batch = a->g.n_batch, .n_threads = a->g.n_threads, .kv_f32 = a->g.kv_f32,
                               .tp = &pipe.tp};
        rc = model_ctx_new(&ctx, m, &co, err, sizeof err);
    }
    if (rc == 0 && me == 0 && (rc = tokenizer_from_gguf(&tok, model_gguf(m), err, sizeof err)) != 0)
        snprintf(err + strlen(err), sizeof err - strlen(err), " (tokenizer)");
    if (rc == 0 && me == 0 && a->g.logits_path && !(lf = fopen(a->g.logits_path, "wb"))) {
        snprintf(err, sizeof err, "cannot create %s", a->g.logits_path);
        rc = MLM_EIO;
    }
    if (rc != 0) { // nothing computed yet: tell the others so none waits for this rank
        fprintf(stderr, "meshlm mpi: rank %d: %s\n", me, err[0] ? err : mlm_strerror(rc));
        notify_failure(comm, err);
        goto out;
    }
    if (me != 0) {
        rc = follow(comm, ctx, &pipe, model_hparams(m)->n_vocab, a->timeout_ms, err, sizeof err);
        if (rc != 0) {
            fprintf(stderr, "meshlm mpi: rank %d: %s\n", me, err);
            notify_failure(comm, err);
        }
        goto out;
    }
    mpi_engine_t e = {comm, ctx, &pipe, ubatch, a->timeout_ms, 0};
    gen_engine_t eng = {&e, model_hparams(m)->n_vocab, engine_eval, engine_reset};
    a->g.gen.n_predict = a->g.n_predict;
    a->g.gen.stream = a->g.json ? NULL : stdout;
    a->g.gen.logits_out = lf;
    gen_result_t res;
    rc = gen_run(&eng, tok, pt, np, &a->g.gen, &res, err, sizeof err);
    if (rc == 0 && lf) {
        int bad = fclose(lf) != 0;
        lf = NULL;
        if (bad) {
            snprintf(err, sizeof err, "writing %s failed", a->g.logits_path);
            rc = MLM_EIO;
            gen_result_free(&res);
        }
    }
    if (rc != 0) {
        fprintf(stderr, "\nmeshlm mpi: rank 0: %s\n", err);
        notify_failure(comm, err);
        goto out;
    }
    // Tell the followers to finish before printing, so a follower that cannot be reached fails the run.
    rc = send_ctl_all(comm, K_STOP, 0, 0, 0, NULL, 0, a->timeout_ms);
    if (rc != 0) {
        fprintf(stderr, "meshlm mpi: rank 0: stopping the other ranks: %s\n", mlm_strerror(rc));
        gen_result_free(&res);
        goto out;
    }
    if (a->g.json) {
        gen_print_json(pt, np, &res);
    } else {
        printf("\n");
    }
    fflush(stdout);
    fprintf(stderr,
            "meshlm: %d MPI rank(s); prompt %d tokens in %.1f ms (%.1f tokens/s); generation %d tokens in %.1f ms "
            "(%.1f tokens/s)\n",
            N, np, res.prompt_ms, res.prompt_ms > 0 ? np * 1000.0 / res.prompt_ms : 0.0, res.n_tokens, res.gen_ms,
            res.gen_ms > 0 ? res.n_gen_evals * 1000.0 / res.gen_ms : 0.0);
    gen_result_free(&res);
out:
    if (lf) fclose(lf);
    free(pt);
    model_ctx_destroy(&ctx);
    tokenizer_destroy(&tok);
    model_destroy(&m);
    pipe_node_free(&pipe);
    free(slices);
    free(plan);
    return rc == 0 ? 0 : 1;
}

// --- public API

int cmd_mpi(int argc, char **argv) {
    mpi_args_t a;
    int prc = parse_args(argc, argv, &a);
    if (prc != 0) {
        gen_args_free(&a.g);
        return prc < 0 ? 0 : 2;
    }
    // The comm is used only from this thread, but model threads exist: SERIALIZED is what we ask.
    int provided = MPI_THREAD_SINGLE;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "meshlm mpi: MPI_Init_thread failed\n");
        return 1;
    }
    char err[512] = "";
    comm_t *comm = NULL;
    comm_mpi_opts_t mo;
    comm_mpi_opts_default(&mo);
    mo.connect_timeout_ms = a.timeout_ms;
    int rc = comm_mpi_new_opts(&comm, &mo, err, sizeof err);
    if (rc != 0) { // no comm to tell the others through: the last resort ends the whole job
        int me = -1;
        MPI_Comm_rank(MPI_COMM_WORLD, &me);
        fprintf(stderr, "meshlm mpi: rank %d: %s\n", me, err[0] ? err : mlm_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }
    int code = a.selftest ? selftest(comm, a.timeout_ms) : generate(comm, &a);
    const int size = comm_size(comm);
    comm_destroy(&comm); // flushes the failure notices (linger) before a possible abort
    if (code != 0 && size > 1 && !a.selftest) {
        // MPI_Finalize waits for every rank; one that is frozen or stuck would hang this one. The
        // failure is reported and the others were told: the last resort ends the job non-zero.
        MPI_Abort(MPI_COMM_WORLD, code);
    }
    MPI_Finalize();
    gen_args_free(&a.g);
    return code;
}
