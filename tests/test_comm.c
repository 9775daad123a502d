// CUnit suite "comm": what the transport conformance suite does not cover: all-reduce under jitter and Q8_0, the AUTO rule, collective deadlines, the ZeroMQ handshake, wire and real processes.
#include <CUnit/CUnit.h>
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "test_util.h"
#include "transport/comm.h"
#include "transport/comm_inproc.h"
#include "transport/comm_zmq.h"
#include "transport/curve.h"
#include "core/err.h"
#include "worker/kernels/quant.h"

#define MAXN 5
#define EP_LEN 192
#define SLACK_MS 1000   // generous: the machine is shared

// --- helpers

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static uint64_t rng_next(uint64_t *st) {
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Inputs whose sum depends on the order of the additions (1e8 + 1 - 1e8 ...): x is (N, n).
static void make_inputs(float *x, int N, size_t n, uint64_t seed) {
    static const float v[] = {1e8f, 1.0f, -1e8f, 3.0f, -7.5e7f, 0.25f, 2.5e7f, -1.0f, 1e-3f, 5e7f};
    uint64_t st = seed;
    for (size_t k = 0; k < (size_t)N * n; k++) {
        uint64_t h = rng_next(&st);
        x[k] = v[h % 10] * (1.0f + (float)((h >> 40) & 1023) / 1024.0f);
    }
}

// Smooth inputs for the Q8_0 tests: x is (N, n), block scales vary.
static void make_smooth(float *x, int N, size_t n, uint64_t seed) {
    uint64_t st = seed;
    for (size_t k = 0; k < (size_t)N * n; k++) {
        double u = (double)(rng_next(&st) >> 11) / 9007199254740992.0;
        x[k] = (float)((u * 2 - 1) * (1 + (k / 32) % 7));
    }
}

// The contract's summation orders (comm.h): star folds in rank order, ring chunk k from rank k.
static void ref_star(const float *x, int N, size_t n, float *out) {
    memcpy(out, x, n * sizeof(float));
    for (int r = 1; r < N; r++)
        for (size_t i = 0; i < n; i++) out[i] = out[i] + x[(size_t)r * n + i];
}

static void ref_ring(const float *x, int N, size_t n, float *out) {
    for (int k = 0; k < N; k++) {
        size_t lo = n * (size_t)k / (size_t)N, hi = n * (size_t)(k + 1) / (size_t)N;
        for (size_t i = lo; i < hi; i++) {
            float acc = x[(size_t)k * n + i];
            for (int j = 1; j < N; j++) acc = acc + x[(size_t)((k + j) % N) * n + i];
            out[i] = acc;
        }
    }
}


static void destroy_all(comm_t **cs, int N) {
    for (int r = 0; r < N; r++) comm_destroy(&cs[r]);
}

// A wrapper backend that sleeps a random 0..max_us before every send: arrival orders vary.
typedef struct {
    comm_t *inner;      // wrapped comm (owned)
    uint64_t rng;       // delay generator state
    int max_us;         // largest delay
} jitter_t;

static const char *jt_name(void *ctx) { return "jitter"; }
static int jt_rank(void *ctx) { return comm_rank(((jitter_t *)ctx)->inner); }
static int jt_size(void *ctx) { return comm_size(((jitter_t *)ctx)->inner); }
static int jt_send(void *ctx, int peer, const comm_iov_t *f, int n, int timeout_ms) {
    jitter_t *j = ctx;
    sleep_us((long)(rng_next(&j->rng) % (uint64_t)(j->max_us + 1)));
    return comm_send(j->inner, peer, f, n, timeout_ms);
}
static int jt_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    return comm_recv(((jitter_t *)ctx)->inner, peer, out, from, timeout_ms);
}
static void jt_destroy(void *ctx) {
    jitter_t *j = ctx;
    comm_destroy(&j->inner);
    free(j);
}
static const struct comm_backend_i jitter_iface = {
    .name = jt_name, .rank = jt_rank, .size = jt_size, .send = jt_send, .recv = jt_recv, .destroy = jt_destroy,
};

// An inproc group of N ranks, each wrapped in a jitter backend seeded by seed.
static int jitter_group(comm_t **cs, int N, uint64_t seed, int max_us) {
    comm_t *in[MAXN];
    int rc = comm_inproc_new_group(in, N);
    if (rc != 0) return rc;
    for (int r = 0; r < N; r++) {
        jitter_t *j = calloc(1, sizeof *j);
        j->inner = in[r];
        j->rng = seed * 1000 + (uint64_t)r;
        j->max_us = max_us;
        cs[r] = comm_new(&jitter_iface, j);
    }
    return 0;
}

// --- all-reduce job shared by the inproc, threaded-zmq and process tests

typedef struct {
    int N;
    size_t n;
    const float *x;         // (N, n) inputs
    float *out;             // (N, n) results per rank
    int rc[MAXN];           // per rank
    comm_algo_t algo;
    uint32_t flags;
    int jitter_us;          // sleep before the call (random per rank)
    uint64_t seed;
} ar_job_t;

static void ar_body(comm_t *c, int r, void *arg) {
    ar_job_t *j = arg;
    float *buf = j->out + (size_t)r * j->n;
    memcpy(buf, j->x + (size_t)r * j->n, j->n * sizeof(float));
    if (j->jitter_us) {
        uint64_t st = j->seed * 7 + (uint64_t)r;
        sleep_us((long)(rng_next(&st) % (uint64_t)j->jitter_us));
    }
    comm_allreduce_opts_t o = {j->algo, j->flags};
    j->rc[r] = comm_allreduce_ex(c, buf, j->n, &o, 10000);
}

// True if every rank's result is bit-identical to want (n).
static bool all_equal_bits(const float *out, int N, size_t n, const float *want) {
    for (int r = 0; r < N; r++)
        if (memcmp(out + (size_t)r * n, want, n * sizeof(float)) != 0) return false;
    return true;
}

// --- inproc: point to point

// The per-peer order, frame shapes and COMM_ANY's sender of every backend are in the transport
// conformance suite (tests/test_transport.c); inproc also delivers recv(ANY) oldest first overall.
static void test_inproc_any_oldest(void) {
    comm_t *cs[3];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    CU_ASSERT_EQUAL(comm_send1(cs[2], 0, "first", 5, 100), 0);
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "second", 6, 100), 0);
    CU_ASSERT_EQUAL(comm_send1(cs[2], 0, "third", 5, 100), 0);
    const char *want[3] = {"first", "second", "third"};
    const int wfrom[3] = {2, 1, 2};
    for (int i = 0; i < 3; i++) {
        comm_msg_t m;
        int from = -1;
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], COMM_ANY, &m, &from, 100), 0);
        CU_ASSERT_EQUAL(from, wfrom[i]);
        CU_ASSERT(m.n == 1 && m.len[0] == strlen(want[i]) && memcmp(m.data[0], want[i], m.len[0]) == 0);
        comm_msg_free(&m);
    }
    destroy_all(cs, 3);
    comm_destroy(&cs[0]); // idempotent on NULL
}

// Star and ring all-reduce over cs: every rank equals the contract's order, bit for bit.
static void check_allreduce_exact(comm_t **cs, int N, size_t n, uint64_t seed, int jitter_us) {
    float *x = malloc((size_t)N * n * sizeof(float)), *out = malloc((size_t)N * n * sizeof(float));
    float *ws = malloc(n * sizeof(float)), *wr = malloc(n * sizeof(float));
    make_inputs(x, N, n, seed);
    ref_star(x, N, n, ws);
    ref_ring(x, N, n, wr);
    for (int a = 0; a < 2; a++) {
        ar_job_t j = {.N = N, .n = n, .x = x, .out = out, .algo = a ? COMM_ALGO_RING : COMM_ALGO_STAR,
                      .jitter_us = jitter_us, .seed = seed};
        test_run_ranks(cs, N, ar_body, &j);
        for (int r = 0; r < N; r++) CU_ASSERT_EQUAL(j.rc[r], 0);
        CU_ASSERT(all_equal_bits(out, N, n, a ? wr : ws));
    }
    free(x);
    free(out);
    free(ws);
    free(wr);
}

static void test_inproc_allreduce_deterministic(void) {
    static const size_t sizes[] = {1, 3, 7, 64, 1001};
    for (int N = 1; N <= MAXN; N++) {
        for (int run = 0; run < 12; run++) {
            comm_t *cs[MAXN];
            CU_ASSERT_FATAL(jitter_group(cs, N, (uint64_t)(run * 10 + N), 400) == 0);
            size_t n = sizes[run % 5];
            check_allreduce_exact(cs, N, n, 1234 + (uint64_t)n, 600); // same inputs for a given n
            destroy_all(cs, N);
        }
    }
    // the inputs really are order-sensitive: star and ring differ somewhere for N >= 3
    float x[3 * 1001], s[1001], r[1001];
    make_inputs(x, 3, 1001, 1234 + 1001);
    ref_star(x, 3, 1001, s);
    ref_ring(x, 3, 1001, r);
    CU_ASSERT(memcmp(s, r, sizeof s) != 0);
}

// Q8_0 error bound per element: star quantizes every contribution but the root's and the result,
// ring every partial sum it forwards (at most N-1 hops, each partial <= the sum of amaxes) and the
// result. d = amax/127 in fp16 gives an error of at most amax*(0.5 + 127*2^-11)/127 per quantization.
static void test_allreduce_q8(void) {
    const size_t n = 100; // not a multiple of 32: the last block is padded
    for (int N = 2; N <= MAXN; N++) {
        float *x = malloc((size_t)N * n * sizeof(float)), *out = malloc((size_t)N * n * sizeof(float));
        float *first = malloc((size_t)N * n * sizeof(float));
        make_smooth(x, N, n, 77 + (uint64_t)N);
        for (int a = 0; a < 2; a++) {
            for (int run = 0; run < 4; run++) {
                comm_t *cs[MAXN];
                CU_ASSERT_FATAL(jitter_group(cs, N, (uint64_t)run, 300) == 0);
                ar_job_t j = {.N = N, .n = n, .x = x, .out = out, .algo = a ? COMM_ALGO_RING : COMM_ALGO_STAR,
                              .flags = COMM_AR_Q8_0, .jitter_us = 500, .seed = (uint64_t)run};
                test_run_ranks(cs, N, ar_body, &j);
                destroy_all(cs, N);
                for (int r = 0; r < N; r++) CU_ASSERT_EQUAL(j.rc[r], 0);
                CU_ASSERT(all_equal_bits(out, N, n, out)); // same bits on every rank
                if (run == 0) memcpy(first, out, (size_t)N * n * sizeof(float));
                else CU_ASSERT(memcmp(first, out, (size_t)N * n * sizeof(float)) == 0); // and across runs
            }
            const double per_q = (0.5 + 127.0 / 2048.0) / 127.0;
            int bad = 0;
            double worst = 0;
            for (size_t b = 0; b < (n + 31) / 32; b++) {
                size_t lo = b * 32, hi = lo + 32 < n ? lo + 32 : n;
                double amax_sum = 0, amax_res = 0;
                for (int r = 0; r < N; r++) {
                    double am = 0;
                    for (size_t i = lo; i < hi; i++) am = fmax(am, fabs(x[(size_t)r * n + i]));
                    amax_sum += am;
                }
                for (size_t i = lo; i < hi; i++) amax_res = fmax(amax_res, fabs(out[i]));
                double bound = (a ? (N - 1) * amax_sum + amax_res : amax_sum + amax_res) * per_q * 1.01 + 1e-5;
                for (size_t i = lo; i < hi; i++) {
                    double exact = 0;
                    for (int r = 0; r < N; r++) exact += x[(size_t)r * n + i];
                    double e = fabs(out[i] - exact);
                    worst = fmax(worst, e / bound);
                    bad += e > bound;
                }
            }
            CU_ASSERT_EQUAL(bad, 0);
            CU_ASSERT(worst > 0); // it really was quantized
        }
        free(x);
        free(out);
        free(first);
    }
}

static void test_auto_choice(void) {
    comm_t *cs[4];
    char *saved = getenv("MESHLM_ALLREDUCE") ? strdup(getenv("MESHLM_ALLREDUCE")) : NULL;
    setenv("MESHLM_ALLREDUCE", "ring", 1); // the environment forces a choice for comms made now
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
    CU_ASSERT_EQUAL(comm_choose_algo(cs[0], 16), COMM_ALGO_RING);
    destroy_all(cs, 2);
    if (saved) setenv("MESHLM_ALLREDUCE", saved, 1);
    else unsetenv("MESHLM_ALLREDUCE");
    free(saved);
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 4) == 0);
    comm_set_algo(cs[0], COMM_ALGO_AUTO); // whatever the environment says
    comm_set_link(cs[0], 100, 125e6);
    CU_ASSERT_EQUAL(comm_choose_algo(cs[0], 4096), COMM_ALGO_STAR);     // small: latency-bound
    CU_ASSERT_EQUAL(comm_choose_algo(cs[0], 4 << 20), COMM_ALGO_RING);  // large: bandwidth-bound
    comm_set_link(cs[0], 20000, 125e6);                                 // a slow WAN-like link
    CU_ASSERT_EQUAL(comm_choose_algo(cs[0], 256 << 10), COMM_ALGO_STAR);
    comm_set_algo(cs[0], COMM_ALGO_RING);
    CU_ASSERT_EQUAL(comm_choose_algo(cs[0], 16), COMM_ALGO_RING);
    comm_set_algo(cs[0], COMM_ALGO_AUTO);
    CU_ASSERT_STRING_EQUAL(comm_algo_name(COMM_ALGO_RING), "ring");
    destroy_all(cs, 4);
    // AUTO on all ranks picks the same algorithm: result equals one of the two contracts
    for (int N = 2; N <= 4; N++) {
        CU_ASSERT_FATAL(comm_inproc_new_group(cs, N) == 0);
        size_t n = 5000;
        float *x = malloc((size_t)N * n * 4), *out = malloc((size_t)N * n * 4), *w = malloc(n * 4);
        make_inputs(x, N, n, 99);
        ar_job_t j = {.N = N, .n = n, .x = x, .out = out, .algo = COMM_ALGO_AUTO};
        test_run_ranks(cs, N, ar_body, &j);
        for (int r = 0; r < N; r++) CU_ASSERT_EQUAL(j.rc[r], 0);
        if (comm_choose_algo(cs[0], n * 4) == COMM_ALGO_RING) ref_ring(x, N, n, w);
        else ref_star(x, N, n, w);
        CU_ASSERT(all_equal_bits(out, N, n, w));
        free(x);
        free(out);
        free(w);
        destroy_all(cs, N);
    }
}

// --- deadlines and peer loss (inproc)

typedef struct {
    int rc[MAXN];
    double ms[MAXN];
    int skip;           // rank that does not take part (-1: none)
    int timeout_ms;
    comm_algo_t algo;
    int late_rank;      // this rank sleeps late_ms before its call
    int late_ms;
} fail_job_t;

static void fail_body(comm_t *c, int r, void *arg) {
    fail_job_t *j = arg;
    if (r == j->skip) return;
    if (r == j->late_rank) sleep_us(j->late_ms * 1000L);
    float buf[64] = {1};
    double t0 = now_ms();
    j->rc[r] = comm_allreduce_f32(c, buf, 64, j->algo, j->timeout_ms);
    j->ms[r] = now_ms() - t0;
}

static void test_inproc_deadlines(void) {
    comm_t *cs[3];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    comm_msg_t m; // (recv deadlines of every backend: tests/test_transport.c)
    // a collective one rank never joins: the others time out by their deadline
    for (int a = 0; a < 2; a++) {
        fail_job_t j = {.skip = 2, .timeout_ms = 300, .algo = a ? COMM_ALGO_RING : COMM_ALGO_STAR, .late_rank = -1};
        test_run_ranks(cs, 3, fail_body, &j);
        for (int r = 0; r < 2; r++) {
            CU_ASSERT_EQUAL(j.rc[r], MLM_ETIMEOUT);
            CU_ASSERT(j.ms[r] >= 299.5 && j.ms[r] < 300 + SLACK_MS);
        }
    }
    destroy_all(cs, 3);

    // a late rank: the early one times out, the stale message is dropped, the next collective works
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
    fail_job_t j = {.skip = -1, .timeout_ms = 100, .algo = COMM_ALGO_STAR, .late_rank = 0, .late_ms = 250};
    test_run_ranks(cs, 2, fail_body, &j);
    CU_ASSERT_EQUAL(j.rc[1], MLM_ETIMEOUT);
    CU_ASSERT_EQUAL(j.rc[0], 0); // rank 1's contribution was still queued; its copy of the result goes stale
    check_allreduce_exact(cs, 2, 33, 5, 0);
    destroy_all(cs, 2);

    // a destroyed rank is a lost peer: MLM_EPEER well before the deadline
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    CU_ASSERT_EQUAL(comm_send1(cs[2], 0, "last", 4, 100), 0);
    comm_destroy(&cs[2]);
    CU_ASSERT_EQUAL(comm_send1(cs[0], 2, "x", 1, 100), MLM_EPEER);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 2, &m, NULL, 100), 0); // queued before it left
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 2, &m, NULL, 100), MLM_EPEER);
    fail_job_t k = {.skip = 2, .timeout_ms = 2000, .algo = COMM_ALGO_STAR, .late_rank = -1};
    test_run_ranks(cs, 3, fail_body, &k);
    CU_ASSERT_EQUAL(k.rc[0], MLM_EPEER);
    CU_ASSERT(k.ms[0] < 500);
    CU_ASSERT(k.rc[1] == MLM_EPEER || k.rc[1] == MLM_ETIMEOUT);
    CU_ASSERT(k.ms[1] < 2000 + SLACK_MS);
    destroy_all(cs, 3);
}

// --- ZeroMQ helpers

// n distinct free loopback TCP ports (bound to port 0 and released).
static int free_ports(int n, int *ports) {
    int fds[MAXN], rc = 0;
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof a;
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof a) != 0 ||
            getsockname(fds[i], (struct sockaddr *)&a, &al) != 0)
            rc = -1;
        ports[i] = ntohs(a.sin_port);
    }
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
    return rc;
}

// Endpoints for N ranks: ipc sockets under dir, or loopback tcp with free ports.
static int make_endpoints(bool tcp, int N, const char *dir, const char *tag, char eps[][EP_LEN], const char **ptrs) {
    int ports[MAXN];
    if (tcp && free_ports(N, ports) != 0) return -1;
    for (int r = 0; r < N; r++) {
        if (tcp) snprintf(eps[r], EP_LEN, "tcp://127.0.0.1:%d", ports[r]);
        else snprintf(eps[r], EP_LEN, "ipc://%s/%s-r%d", dir, tag, r);
        ptrs[r] = eps[r];
    }
    return 0;
}

typedef struct {
    int rank, size;
    const char *const *eps;
    const comm_zmq_opts_t *opts;
    comm_t *c;
    int rc;
    char err[512];
    double ms;      // how long comm_zmq_new took
} zmq_new_arg_t;

static void *zmq_new_main(void *p) {
    zmq_new_arg_t *a = p;
    const double t0 = now_ms();
    a->rc = comm_zmq_new(&a->c, a->rank, a->size, a->eps, a->opts, a->err, sizeof a->err);
    a->ms = now_ms() - t0;
    return NULL;
}

// Creates an N-rank zmq world inside this process (one thread per rank during the handshake).
static int zmq_world_threads(comm_t **cs, int N, const char *const *eps, const comm_zmq_opts_t *o) {
    pthread_t th[MAXN];
    zmq_new_arg_t a[MAXN];
    for (int r = 0; r < N; r++) {
        a[r] = (zmq_new_arg_t){.rank = r, .size = N, .eps = eps, .opts = o};
        pthread_create(&th[r], NULL, zmq_new_main, &a[r]);
    }
    int rc = 0;
    for (int r = 0; r < N; r++) {
        pthread_join(th[r], NULL);
        cs[r] = a[r].c;
        if (a[r].rc != 0) {
            fprintf(stderr, "zmq rank %d: %s\n", r, a[r].err);
            rc = a[r].rc;
        }
    }
    if (rc != 0) destroy_all(cs, N);
    return rc;
}

// Reads exactly len bytes from fd before deadline (monotonic ms). 0 or -1.
static int read_full(int fd, void *buf, size_t len, double deadline) {
    size_t got = 0;
    while (got < len) {
        int left = (int)(deadline - now_ms());
        if (left <= 0) return -1;
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, left) <= 0) continue;
        ssize_t k = read(fd, (uint8_t *)buf + got, len - got);
        if (k <= 0) return -1;
        got += (size_t)k;
    }
    return 0;
}

static void write_full(int fd, const void *buf, size_t len) {
    size_t put = 0;
    while (put < len) {
        ssize_t k = write(fd, (const uint8_t *)buf + put, len - put);
        if (k <= 0) return;
        put += (size_t)k;
    }
}

// Waits for pid until deadline, then kills it. Exit status or -1.
static int reap(pid_t pid, double deadline) {
    int st = 0;
    for (;;) {
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        if (w < 0) return -1;
        if (now_ms() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return -1;
        }
        sleep_us(2000);
    }
}

// A forked rank: creates its comm, runs fn with the write end of its pipe, exits with 0/1 (10: no comm).
typedef int (*proc_fn)(comm_t *c, int rank, int fd, void *arg);

static pid_t spawn_rank(int rank, int N, const char *const *eps, const comm_zmq_opts_t *o, proc_fn fn, void *arg,
                        int *rfd) {
    int p[2];
    if (pipe(p) != 0) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        comm_t *c = NULL;
        char err[256];
        if (comm_zmq_new(&c, rank, N, eps, o, err, sizeof err) != 0) {
            fprintf(stderr, "rank %d: %s\n", rank, err);
            _exit(10);
        }
        int rc = fn(c, rank, p[1], arg);
        comm_destroy(&c);
        close(p[1]);
        _exit(rc ? 1 : 0);
    }
    close(p[1]);
    *rfd = p[0];
    return pid;
}

static void test_zmq_handshake(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    char eps[MAXN][EP_LEN];
    const char *ptrs[MAXN];
    CU_ASSERT_FATAL(make_endpoints(false, 3, dir, "hs", eps, ptrs) == 0);
    comm_zmq_opts_t o;
    comm_zmq_opts_default(&o);
    o.connect_timeout_ms = 1500;
    // rank 1 believes in a world of 3: both sides refuse
    pthread_t th[2];
    zmq_new_arg_t a[2] = {{.rank = 0, .size = 2, .eps = ptrs, .opts = &o}, {.rank = 1, .size = 3, .eps = ptrs, .opts = &o}};
    double t0 = now_ms();
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, zmq_new_main, &a[i]);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    if (a[0].rc != MLM_EPROTO) fprintf(stderr, "rank0 %d: %s / rank1 %d: %s\n", a[0].rc, a[0].err, a[1].rc, a[1].err);
    CU_ASSERT_EQUAL(a[0].rc, MLM_EPROTO);
    CU_ASSERT(strstr(a[0].err, "3 ranks") != NULL);
    CU_ASSERT(a[1].rc == MLM_EPROTO || a[1].rc == MLM_ETIMEOUT);
    CU_ASSERT(now_ms() - t0 < 1500 + SLACK_MS);
    CU_ASSERT(a[0].c == NULL && a[1].c == NULL);
    // nobody there: the handshake deadline fires
    comm_t *c = NULL;
    char err[256];
    o.connect_timeout_ms = 300;
    t0 = now_ms();
    CU_ASSERT_EQUAL(comm_zmq_new(&c, 0, 2, ptrs, &o, err, sizeof err), MLM_ETIMEOUT);
    CU_ASSERT(now_ms() - t0 >= 299 && now_ms() - t0 < 300 + SLACK_MS);
    CU_ASSERT(strstr(err, "rank(s) 1") != NULL);
    // bad endpoints
    const char *bad[2] = {"bogus://nowhere", ptrs[1]};
    CU_ASSERT(comm_zmq_new(&c, 0, 2, bad, &o, err, sizeof err) < 0 && c == NULL);
    const char *bad2[2] = {"bind=;connect=", ptrs[1]};
    CU_ASSERT_EQUAL(comm_zmq_new(&c, 0, 2, bad2, &o, err, sizeof err), MLM_EINVAL);
    // separate bind and connect addresses ("lo" is the loopback interface's name)
    int ports[2];
    CU_ASSERT_FATAL(free_ports(2, ports) == 0);
    char e2[2][EP_LEN];
    const char *p2[2] = {e2[0], e2[1]};
    snprintf(e2[0], EP_LEN, "bind=tcp://lo:%d;connect=tcp://127.0.0.1:%d", ports[0], ports[0]);
    snprintf(e2[1], EP_LEN, "connect=tcp://127.0.0.1:%d;bind=tcp://127.0.0.1:%d", ports[1], ports[1]);
    comm_t *cs[2];
    CU_ASSERT_FATAL(zmq_world_threads(cs, 2, p2, NULL) == 0);
    comm_msg_t m;
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "hi", 2, 1000), 0);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, NULL, 2000), 0);
    comm_msg_free(&m);
    destroy_all(cs, 2);
    rmdir(dir);
    free(dir);
}

// Raw ZeroMQ socket speaking (and breaking) the wire format to rank 0.
static void raw_send(void *s, const void *env, size_t envlen, const void *body, size_t bodylen, bool has_body) {
    zmq_send(s, env, envlen, has_body ? ZMQ_SNDMORE : 0);
    if (has_body) zmq_send(s, body, bodylen, 0);
}

static void test_zmq_bad_frames(void) {
    int ports[2];
    CU_ASSERT_FATAL(free_ports(2, ports) == 0);
    char eps[2][EP_LEN];
    const char *ptrs[2] = {eps[0], eps[1]};
    for (int r = 0; r < 2; r++) snprintf(eps[r], EP_LEN, "tcp://127.0.0.1:%d", ports[r]);
    comm_zmq_opts_t o;
    comm_zmq_opts_default(&o);
    o.max_msg_bytes = 4096;
    comm_t *cs[2];
    CU_ASSERT_FATAL(zmq_world_threads(cs, 2, ptrs, &o) == 0);
    void *zc = zmq_ctx_new();
    void *raw = zmq_socket(zc, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(raw, ZMQ_LINGER, &zero, sizeof zero);
    CU_ASSERT_FATAL(zmq_connect(raw, eps[0]) == 0);
    uint8_t env[COMM_ZMQ_ENVELOPE_BYTES];
    uint8_t *big = calloc(1, 5000);
    comm_msg_t m;
    int from = 7;

    raw_send(raw, "garbage", 7, NULL, 0, false); // no envelope
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 2000), MLM_EPROTO);
    CU_ASSERT_EQUAL(from, -1);
    comm_zmq_envelope(env, COMM_ZMQ_DATA, 1, 2, 1); // oversized, but from a valid rank
    raw_send(raw, env, sizeof env, big, 5000, true);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, &from, 2000), MLM_ERANGE);
    comm_zmq_envelope(env, COMM_ZMQ_DATA, 1, 2, 1);
    env[0] ^= 0xff; // bad magic
    raw_send(raw, env, sizeof env, "x", 1, true);
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 2000), MLM_EPROTO);
    comm_zmq_envelope(env, COMM_ZMQ_DATA, 7, 2, 1); // no such rank
    raw_send(raw, env, sizeof env, "x", 1, true);
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 2000), MLM_EPROTO);
    comm_zmq_envelope(env, COMM_ZMQ_DATA, 1, 2, 3); // frame count lies
    raw_send(raw, env, sizeof env, "x", 1, true);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, &from, 2000), MLM_EPROTO);
    env[4] = 9; // another major version
    raw_send(raw, env, sizeof env, "x", 1, true);
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 2000), MLM_EPROTO);
    comm_zmq_envelope(env, COMM_ZMQ_DATA, 1, 2, 1); // a well-formed message still gets through
    raw_send(raw, env, sizeof env, "raw ok", 6, true);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, &from, 2000), 0);
    CU_ASSERT(from == 1 && m.n == 1 && m.len[0] == 6 && memcmp(m.data[0], "raw ok", 6) == 0);
    comm_msg_free(&m);
    // the real connection survived in both directions
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "real ok", 7, 1000), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, &from, 2000), 0);
    CU_ASSERT(m.len[0] == 7 && memcmp(m.data[0], "real ok", 7) == 0);
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_send1(cs[0], 1, "back", 4, 1000), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[1], 0, &m, &from, 2000), 0);
    comm_msg_free(&m);
    // oversized sends are refused at the sender
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, big, 5000, 1000), MLM_ERANGE);
    // garbage of unknown origin does not disturb a recv from a named peer; recv(ANY) reports it
    raw_send(raw, "junk", 4, NULL, 0, false);
    sleep_us(50000);
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "y", 1, 1000), 0);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, &from, 2000), 0);
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 100), MLM_EPROTO);
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 100), MLM_ETIMEOUT);
    free(big);
    zmq_close(raw);
    zmq_ctx_term(zc);
    destroy_all(cs, 2);
}

// --- ZeroMQ with real processes

#define PROC_N 1003

typedef struct {
    const float *x;     // (N, PROC_N) inputs
} proc_ar_arg_t;

// Child rank: star, ring, star+Q8, ring+Q8 all-reduce; writes the four results to fd.
static int proc_allreduce(comm_t *c, int r, int fd, void *arg) {
    const proc_ar_arg_t *a = arg;
    float *buf = malloc(PROC_N * sizeof(float));
    int bad = 0;
    for (int k = 0; k < 4; k++) {
        memcpy(buf, a->x + (size_t)r * PROC_N, PROC_N * sizeof(float));
        comm_allreduce_opts_t o = {(k & 1) ? COMM_ALGO_RING : COMM_ALGO_STAR, k >= 2 ? COMM_AR_Q8_0 : 0};
        if (comm_allreduce_ex(c, buf, PROC_N, &o, 10000) != 0) bad++;
        write_full(fd, buf, PROC_N * sizeof(float));
    }
    if (comm_barrier(c, 10000) != 0) bad++;
    free(buf);
    return bad;
}

static void test_zmq_processes_allreduce(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    for (int N = 2; N <= 4; N++) {
        float *x = malloc((size_t)N * PROC_N * sizeof(float));
        make_inputs(x, N, PROC_N, 500 + (uint64_t)N);
        for (int i = 0; i < PROC_N; i += 3) x[i] = x[i] * 1e-8f + 0.5f; // some smooth values for Q8
        // the inproc reference, computed by the same library in threads
        float *want = malloc(4 * (size_t)PROC_N * sizeof(float)), *out = malloc((size_t)N * PROC_N * sizeof(float));
        for (int k = 0; k < 4; k++) {
            comm_t *cs[MAXN];
            CU_ASSERT_FATAL(comm_inproc_new_group(cs, N) == 0);
            ar_job_t j = {.N = N, .n = PROC_N, .x = x, .out = out, .algo = (k & 1) ? COMM_ALGO_RING : COMM_ALGO_STAR,
                          .flags = k >= 2 ? COMM_AR_Q8_0 : 0};
            test_run_ranks(cs, N, ar_body, &j);
            destroy_all(cs, N);
            CU_ASSERT(all_equal_bits(out, N, PROC_N, out));
            memcpy(want + (size_t)k * PROC_N, out, PROC_N * sizeof(float));
        }
        float ws[PROC_N], wr[PROC_N];
        ref_star(x, N, PROC_N, ws);
        ref_ring(x, N, PROC_N, wr);
        CU_ASSERT(memcmp(ws, want, sizeof ws) == 0 && memcmp(wr, want + PROC_N, sizeof wr) == 0);
        for (int t = 0; t < 2; t++) {
            char eps[MAXN][EP_LEN];
            const char *ptrs[MAXN];
            char tag[16];
            snprintf(tag, sizeof tag, "ar%d", N);
            CU_ASSERT_FATAL(make_endpoints(t == 1, N, dir, tag, eps, ptrs) == 0);
            proc_ar_arg_t arg = {x};
            pid_t pid[MAXN];
            int fd[MAXN];
            for (int r = 0; r < N; r++) pid[r] = spawn_rank(r, N, ptrs, NULL, proc_allreduce, &arg, &fd[r]);
            double dl = now_ms() + 20000;
            float *got = malloc(4 * (size_t)PROC_N * sizeof(float));
            int mismatch = 0;
            for (int r = 0; r < N; r++) {
                if (read_full(fd[r], got, 4 * (size_t)PROC_N * sizeof(float), dl) != 0) mismatch += 100;
                else mismatch += memcmp(got, want, 4 * (size_t)PROC_N * sizeof(float)) != 0;
                close(fd[r]);
            }
            for (int r = 0; r < N; r++) CU_ASSERT_EQUAL(reap(pid[r], dl), 0);
            if (mismatch) fprintf(stderr, "zmq %s N=%d: mismatch %d\n", t ? "tcp" : "ipc", N, mismatch);
            CU_ASSERT_EQUAL(mismatch, 0);
            free(got);
        }
        free(x);
        free(want);
        free(out);
    }
    rmdir(dir);
    free(dir);
}

typedef struct {
    comm_algo_t algo;
    int timeout_ms;
} proc_kill_arg_t;

// Child rank: one good all-reduce, then ranks 0/1 report 'E' and enter the next one (result rc
// and elapsed ms to fd); rank 2 reports 'R' and waits to be killed.
static int proc_kill(comm_t *c, int r, int fd, void *arg) {
    const proc_kill_arg_t *a = arg;
    float buf[4096];
    for (int i = 0; i < 4096; i++) buf[i] = (float)(i + r);
    if (comm_allreduce_f32(c, buf, 4096, a->algo, 10000) != 0) return 1;
    if (r == 2) {
        write_full(fd, "R", 1);
        for (int i = 0; i < 300; i++) sleep_us(100000);
        return 1;
    }
    write_full(fd, "E", 1);
    double t0 = now_ms();
    int res[2];
    res[0] = comm_allreduce_f32(c, buf, 4096, a->algo, a->timeout_ms);
    res[1] = (int)(now_ms() - t0);
    write_full(fd, res, sizeof res);
    return 0;
}

// Three ranks; rank 2 gets signal sig while ranks 0 and 1 wait for it inside an all-reduce with
// the given deadline. res[r] = {rc, elapsed ms} of ranks 0 and 1.
static void run_loss(const char *dir, bool tcp, comm_algo_t algo, int sig, const comm_zmq_opts_t *o, int timeout_ms,
                     int res[2][2]) {
    const int N = 3;
    char eps[MAXN][EP_LEN];
    const char *ptrs[MAXN];
    CU_ASSERT_FATAL(make_endpoints(tcp, N, dir, "loss", eps, ptrs) == 0);
    proc_kill_arg_t arg = {algo, timeout_ms};
    pid_t pid[MAXN];
    int fd[MAXN];
    for (int r = 0; r < N; r++) pid[r] = spawn_rank(r, N, ptrs, o, proc_kill, &arg, &fd[r]);
    double dl = now_ms() + 15000;
    char ch[MAXN] = {0};
    for (int r = 0; r < N; r++) CU_ASSERT(read_full(fd[r], &ch[r], 1, dl) == 0);
    CU_ASSERT(ch[0] == 'E' && ch[1] == 'E' && ch[2] == 'R');
    sleep_us(150000); // the survivors are inside the collective, waiting for rank 2
    kill(pid[2], sig);
    res[0][0] = res[1][0] = 1;
    for (int r = 0; r < 2; r++) CU_ASSERT(read_full(fd[r], res[r], sizeof res[r], dl) == 0);
    if (sig != SIGKILL) kill(pid[2], SIGKILL);
    for (int r = 0; r < N; r++) {
        close(fd[r]);
        reap(pid[r], dl);
    }
    fprintf(stderr, "[%s %s sig %d: rank0 %s after %d ms, rank1 %s after %d ms] ", tcp ? "tcp" : "ipc",
            comm_algo_name(algo), sig, mlm_strerror(res[0][0]), res[0][1], mlm_strerror(res[1][0]), res[1][1]);
}

static void test_zmq_peer_killed(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    for (int t = 0; t < 2; t++) {
        int res[2][2];
        run_loss(dir, t == 1, t ? COMM_ALGO_RING : COMM_ALGO_STAR, SIGKILL, NULL, 2000, res);
        CU_ASSERT_EQUAL(res[0][0], MLM_EPEER); // rank 0 waits on rank 2 directly in both algorithms
        CU_ASSERT(res[0][1] < 2000);
        CU_ASSERT(res[1][0] == MLM_EPEER || res[1][0] == MLM_ETIMEOUT);
        CU_ASSERT(res[1][1] < 2000 + SLACK_MS);
    }
    rmdir(dir);
    free(dir);
}

// A raw DEALER that presents key pair k to the CURVE server with public key server at ep: the first
// handshake event within 3 s (ZMQ_EVENT_HANDSHAKE_SUCCEEDED, _FAILED_AUTH, ...), or 0 for none.
static int curve_knock(const curve_keypair_t *k, const char *server, const char *ep) {
    void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_DEALER), *mon = zmq_socket(ctx, ZMQ_PAIR);
    const int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, server, CURVE_KEY_LEN);
    zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, k->pub, CURVE_KEY_LEN);
    zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, k->sec, CURVE_KEY_LEN);
    zmq_socket_monitor(s, "inproc://knock", ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                                                ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL);
    zmq_connect(mon, "inproc://knock");
    zmq_connect(s, ep);
    zmq_pollitem_t it = {mon, 0, ZMQ_POLLIN, 0};
    int event = 0;
    if (zmq_poll(&it, 1, 3000) > 0) {
        uint8_t head[6];
        char addr[256];
        if (zmq_recv(mon, head, sizeof head, 0) == 6 && zmq_recv(mon, addr, sizeof addr, 0) >= 0) {
            uint16_t e;
            memcpy(&e, head, 2);
            event = e;
        }
    }
    zmq_socket_monitor(s, NULL, 0);
    zmq_close(mon);
    zmq_close(s);
    zmq_ctx_term(ctx);
    return event;
}

// CurveZMQ worlds: every rank with its own key pair and the world's keys. A world whose keys agree
// opens and carries messages; a stranger's key is refused by a rank's key check while a listed key
// gets through it; a rank holding another key than the one the others list for it fails at once
// (refused, naming the rank that refused it), and the others fail at their deadline naming it and
// the key they refused. Missing keys are refused before anything is bound.
static void test_zmq_curve(void) {
    curve_keypair_t k[4]; // ranks 0..2, then a stranger
    char err[512];
    for (int i = 0; i < 4; i++) CU_ASSERT_EQUAL_FATAL(curve_keygen(&k[i], err, sizeof err), 0);
    char eps[MAXN][EP_LEN];
    const char *ptrs[MAXN];
    CU_ASSERT_FATAL(make_endpoints(true, 3, NULL, "cv", eps, ptrs) == 0);
    const char *keys[3] = {k[0].pub, k[1].pub, k[2].pub};
    comm_zmq_opts_t o[3];
    pthread_t th[3];
    zmq_new_arg_t a[3];
    for (int r = 0; r < 3; r++) {
        comm_zmq_opts_default(&o[r]);
        o[r].connect_timeout_ms = 5000;
        o[r].curve = &k[r];
        o[r].curve_keys = keys;
        a[r] = (zmq_new_arg_t){.rank = r, .size = 3, .eps = ptrs, .opts = &o[r]};
    }
    for (int r = 0; r < 3; r++) pthread_create(&th[r], NULL, zmq_new_main, &a[r]);
    for (int r = 0; r < 3; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 3; r++) {
        if (a[r].rc) fprintf(stderr, "curve rank %d: %s\n", r, a[r].err);
        CU_ASSERT_EQUAL(a[r].rc, 0);
    }
    comm_t *cs[3] = {a[0].c, a[1].c, a[2].c};
    if (cs[0] && cs[1] && cs[2]) {
        comm_msg_t m;
        CU_ASSERT_EQUAL(comm_send1(cs[2], 0, "secret", 6, 1000), 0);
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 2, &m, NULL, 2000), 0);
        CU_ASSERT(m.n == 1 && m.len[0] == 6 && memcmp(m.data[0], "secret", 6) == 0);
        comm_msg_free(&m);
        CU_ASSERT_EQUAL(comm_send1(cs[0], 1, "x", 1, 1000), 0);
        CU_ASSERT_EQUAL(comm_recv(cs[1], 0, &m, NULL, 2000), 0);
        comm_msg_free(&m);
        // a stranger's key is refused by rank 0's key check; rank 1's key (listed) passes it
        CU_ASSERT_EQUAL(curve_knock(&k[3], k[0].pub, eps[0]), ZMQ_EVENT_HANDSHAKE_FAILED_AUTH);
        CU_ASSERT_EQUAL(curve_knock(&k[1], k[0].pub, eps[0]), ZMQ_EVENT_HANDSHAKE_SUCCEEDED);
        // the world still works after both
        CU_ASSERT_EQUAL(comm_send1(cs[1], 2, "y", 1, 1000), 0);
        CU_ASSERT_EQUAL(comm_recv(cs[2], 1, &m, NULL, 2000), 0);
        comm_msg_free(&m);
    }
    destroy_all(cs, 3);

    // rank 2 holds the stranger's key; ranks 0 and 1 list rank 2's real one
    CU_ASSERT_FATAL(make_endpoints(true, 3, NULL, "cv", eps, ptrs) == 0);
    const char *keys2[3] = {k[0].pub, k[1].pub, k[3].pub}; // what rank 2 believes
    for (int r = 0; r < 3; r++) o[r].connect_timeout_ms = 2500;
    o[2].curve = &k[3];
    o[2].curve_keys = keys2;
    for (int r = 0; r < 3; r++) a[r].c = NULL;
    for (int r = 0; r < 3; r++) pthread_create(&th[r], NULL, zmq_new_main, &a[r]);
    for (int r = 0; r < 3; r++) pthread_join(th[r], NULL);
    const double took[3] = {a[0].ms, a[1].ms, a[2].ms};
    if (a[2].rc != MLM_EPROTO) fprintf(stderr, "rank 2: %d %s\n", a[2].rc, a[2].err);
    CU_ASSERT_EQUAL(a[2].rc, MLM_EPROTO); // refused by 0 or 1, at once
    CU_ASSERT(strstr(a[2].err, "refused this rank's CurveZMQ key") != NULL && strstr(a[2].err, k[3].pub) != NULL);
    CU_ASSERT(took[2] < 1500); // after ZQ_REFUSE_GRACE_MS of redials
    for (int r = 0; r < 2; r++) {
        CU_ASSERT_EQUAL(a[r].rc, MLM_ETIMEOUT);
        CU_ASSERT(took[r] < 2500 + SLACK_MS);
        CU_ASSERT(strstr(a[r].err, "rank(s) 2") != NULL);
        CU_ASSERT(strstr(a[r].err, k[3].pub) != NULL); // the key it refused, named
        if (!strstr(a[r].err, k[3].pub)) fprintf(stderr, "rank %d: %s\n", r, a[r].err);
    }
    CU_ASSERT(a[0].c == NULL && a[1].c == NULL && a[2].c == NULL);

    // no keys for the world, or a world that lists another key for this rank: refused up front
    comm_t *c = NULL;
    o[0].curve_keys = NULL;
    CU_ASSERT_EQUAL(comm_zmq_new(&c, 0, 3, ptrs, &o[0], err, sizeof err), MLM_EINVAL);
    o[0].curve_keys = keys2;
    o[0].curve = &k[1];
    CU_ASSERT_EQUAL(comm_zmq_new(&c, 0, 3, ptrs, &o[0], err, sizeof err), MLM_EINVAL);
    CU_ASSERT(strstr(err, "lists") != NULL);
    CU_ASSERT_PTR_NULL(c);
}

// A frozen peer (SIGSTOP) keeps its connections open: without heartbeats the survivors hit their
// deadline; with fast heartbeats the dead link is dropped and they see MLM_EPEER well before it.
static void test_zmq_peer_frozen(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    comm_zmq_opts_t o;
    comm_zmq_opts_default(&o);
    o.heartbeat_ivl_ms = 0;
    int res[2][2];
    run_loss(dir, false, COMM_ALGO_STAR, SIGSTOP, &o, 600, res);
    CU_ASSERT_EQUAL(res[0][0], MLM_ETIMEOUT);
    CU_ASSERT(res[0][1] >= 599 && res[0][1] < 600 + SLACK_MS);
    CU_ASSERT(res[1][0] == MLM_EPEER || res[1][0] == MLM_ETIMEOUT);
    CU_ASSERT(res[1][1] < 600 + SLACK_MS);
    o.heartbeat_ivl_ms = 100;
    o.heartbeat_timeout_ms = 400;
    run_loss(dir, true, COMM_ALGO_RING, SIGSTOP, &o, 5000, res);
    CU_ASSERT_EQUAL(res[0][0], MLM_EPEER);
    CU_ASSERT(res[0][1] < 2500);
    CU_ASSERT(res[1][0] == MLM_EPEER || res[1][0] == MLM_ETIMEOUT);
    CU_ASSERT(res[1][1] < 5000 + SLACK_MS);
    rmdir(dir);
    free(dir);
}

// --- suite

int test_comm_suite(void) {
    CU_pSuite s = CU_add_suite("comm", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "inproc COMM_ANY oldest first", test_inproc_any_oldest) ||
        !CU_add_test(s, "inproc all-reduce bit-exact under jitter", test_inproc_allreduce_deterministic) ||
        !CU_add_test(s, "all-reduce Q8_0 bound and determinism", test_allreduce_q8) ||
        !CU_add_test(s, "AUTO algorithm choice", test_auto_choice) ||
        !CU_add_test(s, "inproc deadlines and lost peers", test_inproc_deadlines) ||
        !CU_add_test(s, "zmq handshake and endpoints", test_zmq_handshake) ||
        !CU_add_test(s, "zmq malformed and oversized frames", test_zmq_bad_frames) ||
        !CU_add_test(s, "zmq processes all-reduce = inproc", test_zmq_processes_allreduce) ||
        !CU_add_test(s, "zmq peer killed mid-collective", test_zmq_peer_killed) ||
        !CU_add_test(s, "zmq frozen peer: deadline or heartbeat", test_zmq_peer_frozen) ||
        !CU_add_test(s, "zmq CurveZMQ world: listed keys only", test_zmq_curve))
        return -1;
    return 0;
}
