// CUnit suite "transport": one conformance table run over every comm backend opened by name (inproc, zmq ipc/tcp, link, fault:inproc; mpi under mpirun), and the control link's own cases.
#include <CUnit/CUnit.h>
#include <arpa/inet.h>
#include <mpi.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "core/clock.h"
#include "core/err.h"
#include "test_util.h"
#include "transport/comm.h"
#include "transport/comm_inproc.h"
#include "transport/comm_link.h"
#include "transport/comm_open.h"
#include "transport/comm_shm.h"
#include "transport/fault.h"
#include "transport/gatherv.h"

#define MAXN 5
#define EP_LEN 192
#define SLACK_MS 1000   // upper bounds are generous: the machine is shared and has 2 cores
#define LIMIT 4096      // max_msg_bytes of rank 0 in the oversize check
#define OPEN_MS 10000   // deadline of opening a world (zmq handshake, mpi start, link greeting)
#define DL_MS 10000     // deadline of an exchange that should succeed

// --- the backends and their worlds

typedef struct {
    const char *label;      // shown in failures
    const char *name;       // comm_open name
    bool tcp;               // zmq, link: loopback tcp endpoints rather than ipc
    bool star;              // only rank 0 and each other rank are joined (the control link)
    bool mpi;               // one rank per MPI process (the table runs under mpirun)
    bool shared_limit;      // the size limit is the world's, so the sender refuses (inproc)
    const char *faults;     // spec of a fault: backend
    double min_lat_us;      // comm_ping's latency is at least this (the emulated delay)
    int sizes[5];           // world sizes to run, 0-terminated
} backend_t;

static const backend_t BACKENDS[] = {
    {"inproc", "inproc", .shared_limit = true, .sizes = {1, 2, 3, 5}},
    {"zmq ipc", "zmq", .sizes = {2, 3}},
    {"zmq tcp", "zmq", .tcp = true, .sizes = {3}},
    {"link ipc", "link", .star = true, .sizes = {2, 3}},
    {"link tcp", "link", .tcp = true, .star = true, .sizes = {4}},
    {"fault:inproc", "fault:inproc", .shared_limit = true, .faults = "delay:link=*:ms=3", .min_lat_us = 3000,
     .sizes = {2, 3}},
};
static const backend_t MPI_BACKEND = {"mpi", "mpi", .mpi = true};

// What one rank of a check knows: its world, nothing shared with the other ranks (so the table runs
// unchanged on MPI processes).
typedef struct {
    const backend_t *b;     // backend under test
    int rank, N;            // this rank, world size
} tctx_t;

typedef struct {
    const char *name;       // shown in failures
    bool mesh;              // needs every pair of ranks joined: on a star backend only with N == 2
    bool loses_rank;        // a rank leaves mid-check (not under MPI)
    bool small_limit;       // rank 0 (the whole world on shared_limit backends) opens with LIMIT
    int min_n;              // smallest world it makes sense in
    int (*run)(comm_t **c, const tctx_t *t); // one rank's part; returns its failures (may destroy *c)
} check_t;

#define EXPECT(cond, ...)                                                                                   \
    do {                                                                                                    \
        if (!(cond)) {                                                                                      \
            bad++;                                                                                          \
            fprintf(stderr, "\n[%s N=%d rank %d] %s:%d: ", t->b->label, t->N, t->rank, __func__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                                                                   \
        }                                                                                                   \
    } while (0)

// --- helpers

static void sleep_ms(double ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)((ms - (time_t)(ms / 1000) * 1000) * 1e6)};
    nanosleep(&ts, NULL);
}

static uint64_t mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint8_t pat(int a, int b, size_t i) { return (uint8_t)mix((uint64_t)a * 1000003u + (uint64_t)b * 7919u + i); }

static bool joined(const tctx_t *t, int a, int b) { return !t->b->star || a == 0 || b == 0; }

// n distinct TCP ports on the loopback, below the ephemeral range (so an outgoing connection cannot
// take one between the pick and the bind), each checked free by binding it. 0 or -1.
static int pick_ports(int n, int *ports) {
    int lo = 32768; // the ephemeral range's start
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%d", &lo) != 1) lo = 32768;
        fclose(f);
    }
    if (lo <= 21000) return -1;
    uint64_t st = (uint64_t)getpid() * 0x100000001b3ull ^ (uint64_t)mlm_now_us();
    for (int i = 0, tries = 0; i < n; tries++) {
        if (tries > 1000) return -1;
        int p = 20000 + (int)((st = mix(st)) % (uint64_t)(lo - 20000 - 1));
        bool dup = false;
        for (int k = 0; k < i; k++) dup = dup || ports[k] == p || ports[k] == p + 1;
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        bool ok = fd >= 0 && !dup && bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
        if (fd >= 0) close(fd);
        if (ok) ports[i++] = p;
    }
    return 0;
}

typedef struct {
    const backend_t *b;
    int N;
    size_t limit0;                  // rank 0's max_msg_bytes (0 = default)
    comm_inproc_group_t *group;     // inproc backends
    char *dir;                      // ipc endpoints live here
    char eps[MAXN][EP_LEN];         // zmq: one per rank; link: one per worker
    const char *ptrs[MAXN];
} world_t;

static int world_prepare(world_t *w, const backend_t *b, int N, bool small_limit) {
    memset(w, 0, sizeof *w);
    w->b = b;
    w->N = N;
    w->limit0 = small_limit ? LIMIT : 0;
    if (strstr(b->name, "inproc")) return comm_inproc_group_new(&w->group, N, w->limit0);
    if (b->mpi) return 0;
    const int n = b->star ? N - 1 : N;
    int ports[MAXN];
    if (b->tcp && pick_ports(n, ports) != 0) return -1;
    if (!b->tcp && !(w->dir = test_tmpdir())) return -1;
    for (int i = 0; i < n; i++) {
        if (b->tcp) snprintf(w->eps[i], EP_LEN, "tcp://127.0.0.1:%d", ports[i]);
        else snprintf(w->eps[i], EP_LEN, "ipc://%s/r%d", w->dir, i);
        w->ptrs[i] = w->eps[i];
    }
    return 0;
}

static void world_release(world_t *w) {
    comm_inproc_group_release(&w->group);
    if (w->dir) {
        for (int i = 0; i < MAXN; i++) // ZeroMQ leaves its ipc socket files behind
            if (!strncmp(w->eps[i], "ipc://", 6)) unlink(w->eps[i] + 6);
        rmdir(w->dir);
        free(w->dir);
        w->dir = NULL;
    }
}

// Opens rank's comm by name; on the star backend rank 0 then greets every worker (a worker of the
// control link can only answer) and the workers wait for it. 0 or the error (printed).
static int open_rank(world_t *w, int rank, comm_t **out) {
    comm_open_opts_t o = {.rank = rank, .size = w->N, .endpoints = w->ptrs, .group = w->group, .timeout_ms = OPEN_MS,
                          .max_msg_bytes = rank == 0 ? w->limit0 : 0, .faults = w->b->faults};
    char err[256] = "";
    int rc = comm_open(out, w->b->name, &o, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "\n[%s N=%d rank %d] comm_open: %s\n", w->b->label, w->N, rank, err);
        return rc;
    }
    if (!w->b->star) return 0;
    for (int p = 1; rank == 0 && p < w->N && rc == 0; p++) rc = comm_send1(*out, p, "hi", 2, OPEN_MS);
    if (rank > 0) {
        comm_msg_t m;
        rc = comm_recv(*out, 0, &m, NULL, OPEN_MS);
        if (rc == 0 && (m.n != 1 || m.len[0] != 2 || memcmp(m.data[0], "hi", 2) != 0)) rc = MLM_EPROTO;
        comm_msg_free(&m);
    }
    if (rc != 0) fprintf(stderr, "\n[%s N=%d rank %d] greeting: %s\n", w->b->label, w->N, rank, mlm_strerror(rc));
    return rc;
}

// --- checks: point to point

// Message k from s to d: frame 0 = {s, d, k} (12 bytes), then a shape per k: zero-length frames,
// COMM_MAX_FRAMES frames, a larger frame, and no frames at all.
#define P2P_K 5
static int p2p_frames(int s, int d, int k, uint32_t hdr[3], uint8_t *body /* (4000) */, comm_iov_t *f) {
    hdr[0] = (uint32_t)s, hdr[1] = (uint32_t)d, hdr[2] = (uint32_t)k;
    for (size_t i = 0; i < 4000; i++) body[i] = pat(s * 16 + d, k, i);
    f[0] = (comm_iov_t){hdr, 12};
    switch (k) {
    case 0: return 1;
    case 1:
        f[1] = (comm_iov_t){NULL, 0};
        f[2] = (comm_iov_t){body, 37};
        f[3] = (comm_iov_t){NULL, 0};
        return 4;
    case 2:
        for (int i = 1; i < COMM_MAX_FRAMES; i++) f[i] = (comm_iov_t){body + 100 * i, (size_t)(i * 7) % 5};
        return COMM_MAX_FRAMES;
    case 3: f[1] = (comm_iov_t){body, 4000}; return 2;
    default: return 0;
    }
}

static int msg_matches(const comm_msg_t *m, const comm_iov_t *f, int n) {
    if (m->n != n) return 0;
    for (int i = 0; i < n; i++)
        if (m->len[i] != f[i].len || (f[i].len && memcmp(m->data[i], f[i].ptr, f[i].len) != 0)) return 0;
    return 1;
}

// Every joined pair exchanges P2P_K messages of every shape; receivers drain their peers in reverse
// order (so each peer's messages wait in their own queue) and see each peer's in order.
static int check_p2p(comm_t **c, const tctx_t *t) {
    int bad = 0;
    uint32_t hdr[3];
    uint8_t *body = malloc(4000);
    comm_iov_t f[COMM_MAX_FRAMES];
    for (int d = 0; d < t->N; d++)
        for (int k = 0; k < P2P_K && d != t->rank && joined(t, t->rank, d); k++) {
            int n = p2p_frames(t->rank, d, k, hdr, body, f);
            int rc = comm_send(*c, d, f, n, DL_MS);
            EXPECT(rc == 0, "send %d to %d: %s", k, d, mlm_strerror(rc));
        }
    for (int s = t->N - 1; s >= 0; s--)
        for (int k = 0; k < P2P_K && s != t->rank && joined(t, s, t->rank); k++) {
            comm_msg_t m;
            int from = -7;
            int rc = comm_recv(*c, s, &m, &from, DL_MS);
            EXPECT(rc == 0, "recv %d from %d: %s", k, s, mlm_strerror(rc));
            if (rc != 0) continue;
            int n = p2p_frames(s, t->rank, k, hdr, body, f);
            EXPECT(from == s, "message %d from %d says from = %d", k, s, from);
            EXPECT(msg_matches(&m, f, n), "message %d from %d: %d frames, content differs", k, s, m.n);
            comm_msg_free(&m);
        }
    comm_msg_t m;
    int rc = comm_recv(*c, COMM_ANY, &m, NULL, 0);
    EXPECT(rc == MLM_ETIMEOUT || t->N == 1, "nothing left over: %s", mlm_strerror(rc));
    if (rc == 0) comm_msg_free(&m);
    EXPECT(comm_send1(*c, t->rank, "self", 4, 100) == MLM_EINVAL, "send to self");
    EXPECT(comm_send1(*c, t->N, "x", 1, 100) == MLM_EINVAL, "send past the world");
    free(body);
    return bad;
}

// Every other rank sends rank 0 three messages; recv(COMM_ANY) names each sender and keeps each
// sender's order.
static int check_any(comm_t **c, const tctx_t *t) {
    int bad = 0;
    if (t->rank != 0) {
        for (uint32_t k = 0; k < 3; k++) {
            uint32_t v[2] = {(uint32_t)t->rank, k};
            int rc = comm_send1(*c, 0, v, sizeof v, DL_MS);
            EXPECT(rc == 0, "send %u: %s", k, mlm_strerror(rc));
        }
        return bad;
    }
    uint32_t next[MAXN] = {0};
    for (int i = 0; i < 3 * (t->N - 1); i++) {
        comm_msg_t m;
        int from = -7;
        int rc = comm_recv(*c, COMM_ANY, &m, &from, DL_MS);
        EXPECT(rc == 0, "recv(ANY) %d: %s", i, mlm_strerror(rc));
        if (rc != 0) break;
        const uint32_t *v = m.data[0];
        bool ok = m.n == 1 && m.len[0] == 8 && from >= 1 && from < t->N;
        EXPECT(ok && v[0] == (uint32_t)from, "recv(ANY) %d: from = %d, message says %u", i, from, ok ? v[0] : 0);
        EXPECT(ok && v[1] == next[from], "recv(ANY) from %d: message %u, expected %u", from, ok ? v[1] : 0,
               ok ? next[from] : 0);
        if (ok) next[from]++;
        comm_msg_free(&m);
    }
    comm_msg_t m;
    int rc = comm_recv(*c, COMM_ANY, &m, NULL, 0);
    EXPECT(rc == MLM_ETIMEOUT, "nothing left over: %s", mlm_strerror(rc));
    if (rc == 0) comm_msg_free(&m);
    return bad;
}

// A recv with nothing to receive returns MLM_ETIMEOUT near its deadline; a poll (0 ms) at once.
static int check_deadline(comm_t **c, const tctx_t *t) {
    int bad = 0;
    const int peer = t->rank == 0 ? 1 : 0;
    comm_msg_t m;
    double t0 = mlm_now_ms();
    int rc = comm_recv(*c, peer, &m, NULL, 150);
    double el = mlm_now_ms() - t0;
    EXPECT(rc == MLM_ETIMEOUT, "recv(%d, 150 ms): %s", peer, mlm_strerror(rc));
    EXPECT(el >= 149.5 && el < 150 + SLACK_MS, "recv(%d, 150 ms) took %.1f ms", peer, el);
    t0 = mlm_now_ms();
    rc = comm_recv(*c, COMM_ANY, &m, NULL, 0);
    el = mlm_now_ms() - t0;
    EXPECT(rc == MLM_ETIMEOUT, "recv(ANY, 0): %s", mlm_strerror(rc));
    EXPECT(el < 50, "recv(ANY, 0) took %.1f ms", el);
    return bad;
}

// The last rank sends rank 0 one message and goes away: rank 0 still gets the message, then
// MLM_EPEER, and sends fail alike.
static int check_peer_gone(comm_t **c, const tctx_t *t) {
    int bad = 0;
    const int L = t->N - 1;
    if (t->rank == L) {
        int rc = comm_send1(*c, 0, "last", 4, DL_MS);
        EXPECT(rc == 0, "send: %s", mlm_strerror(rc));
        comm_destroy(c);
        return bad;
    }
    if (t->rank != 0) return 0;
    comm_msg_t m;
    int rc = comm_recv(*c, L, &m, NULL, DL_MS);
    EXPECT(rc == 0 && m.n == 1 && m.len[0] == 4 && !memcmp(m.data[0], "last", 4), "last message: %s",
           mlm_strerror(rc));
    if (rc == 0) comm_msg_free(&m);
    // the contract allows MLM_ETIMEOUT by the deadline; every backend here notices the loss at once
    double t0 = mlm_now_ms();
    rc = comm_recv(*c, L, &m, NULL, 3000);
    double el = mlm_now_ms() - t0;
    EXPECT(rc == MLM_EPEER, "recv from the lost rank: %s", mlm_strerror(rc));
    EXPECT(el < SLACK_MS, "recv from the lost rank took %.0f ms", el);
    if (rc == 0) comm_msg_free(&m);
    t0 = mlm_now_ms();
    rc = comm_send1(*c, L, "x", 1, 3000);
    el = mlm_now_ms() - t0;
    EXPECT(rc == MLM_EPEER, "send to the lost rank: %s", mlm_strerror(rc));
    EXPECT(el < SLACK_MS, "send to the lost rank took %.0f ms", el);
    return bad;
}

// Rank 0 accepts at most LIMIT bytes: rank 1's larger message is dropped with MLM_ERANGE naming its
// sender (or refused by rank 1 when the limit is the world's), and the next one gets through.
static int check_oversize(comm_t **c, const tctx_t *t) {
    int bad = 0;
    uint8_t *big = malloc(5000);
    for (size_t i = 0; i < 5000; i++) big[i] = pat(1, 0, i);
    if (t->rank == 1) {
        int rc = comm_send1(*c, 0, big, 5000, DL_MS);
        EXPECT(rc == (t->b->shared_limit ? MLM_ERANGE : 0), "5000 bytes to a %d-byte limit: %s", LIMIT,
               mlm_strerror(rc));
        rc = comm_send1(*c, 0, big, LIMIT - 64, DL_MS);
        EXPECT(rc == 0, "%d bytes: %s", LIMIT - 64, mlm_strerror(rc));
        rc = comm_send1(*c, 0, "after", 5, DL_MS);
        EXPECT(rc == 0, "small message after: %s", mlm_strerror(rc));
    } else if (t->rank == 0) {
        int rc = comm_send1(*c, 1, big, 5000, DL_MS);
        EXPECT(rc == MLM_ERANGE, "a send over the sender's own limit: %s", mlm_strerror(rc));
        comm_msg_t m;
        int from = -7;
        if (!t->b->shared_limit) {
            rc = comm_recv(*c, 1, &m, &from, DL_MS);
            EXPECT(rc == MLM_ERANGE && from == 1, "oversized message: %s from %d", mlm_strerror(rc), from);
            if (rc == 0) comm_msg_free(&m);
        }
        rc = comm_recv(*c, 1, &m, &from, DL_MS);
        EXPECT(rc == 0 && m.n == 1 && m.len[0] == LIMIT - 64 && !memcmp(m.data[0], big, LIMIT - 64),
               "message under the limit: %s", mlm_strerror(rc));
        if (rc == 0) comm_msg_free(&m);
        rc = comm_recv(*c, 1, &m, &from, DL_MS);
        EXPECT(rc == 0 && m.n == 1 && m.len[0] == 5 && !memcmp(m.data[0], "after", 5), "message after: %s",
               mlm_strerror(rc));
        if (rc == 0) comm_msg_free(&m);
    }
    free(big);
    return bad;
}

// --- checks: collectives

// One rank arrives 60 ms late (the last, then the root): no rank leaves the barrier before it
// arrived. Ranks share CLOCK_MONOTONIC (one machine); rank 0 gathers everyone's times.
static int check_barrier(comm_t **c, const tctx_t *t) {
    int bad = 0;
    const int lates[2] = {t->N - 1, 0};
    for (int round = 0; round < 2; round++) {
        if (t->rank == lates[round]) sleep_ms(60);
        double times[2] = {mlm_now_ms(), 0}, all[MAXN][2]; // arrival, departure
        int rc = comm_barrier(*c, DL_MS);
        times[1] = mlm_now_ms();
        EXPECT(rc == 0, "barrier %d: %s", round, mlm_strerror(rc));
        rc = comm_gather(*c, 0, times, sizeof times, t->rank == 0 ? all : NULL, DL_MS);
        EXPECT(rc == 0, "gather of the times: %s", mlm_strerror(rc));
        double last_in = 0;
        for (int r = 0; r < t->N && t->rank == 0; r++) last_in = all[r][0] > last_in ? all[r][0] : last_in;
        for (int r = 0; r < t->N && t->rank == 0; r++)
            EXPECT(all[r][1] >= last_in, "barrier %d: rank %d left %.2f ms before the last rank came", round, r,
                   last_in - all[r][1]);
    }
    return bad;
}

static int check_broadcast(comm_t **c, const tctx_t *t) {
    int bad = 0;
    const int roots[2] = {0, t->b->star ? 0 : t->N - 1};
    uint8_t buf[1000];
    for (int i = 0; i < 2; i++) {
        const int root = roots[i];
        for (size_t k = 0; k < sizeof buf; k++) buf[k] = t->rank == root ? pat(root, i, k) : 0;
        int rc = comm_broadcast(*c, root, buf, sizeof buf, DL_MS);
        EXPECT(rc == 0, "broadcast from %d: %s", root, mlm_strerror(rc));
        int wrong = 0;
        for (size_t k = 0; k < sizeof buf; k++) wrong += buf[k] != pat(root, i, k);
        EXPECT(wrong == 0, "broadcast from %d: %d bytes differ", root, wrong);
    }
    int rc = comm_broadcast(*c, 0, NULL, 0, DL_MS);
    EXPECT(rc == 0, "empty broadcast: %s", mlm_strerror(rc));
    return bad;
}

static int check_gather(comm_t **c, const tctx_t *t) {
    int bad = 0;
    const int roots[2] = {0, t->b->star ? 0 : (t->N > 1 ? 1 : 0)};
    uint8_t mine[13], all[MAXN * 13];
    for (int i = 0; i < 2; i++) {
        const int root = roots[i];
        for (int k = 0; k < 13; k++) mine[k] = pat(t->rank, 100 + i, (size_t)k);
        memset(all, 0, sizeof all);
        int rc = comm_gather(*c, root, mine, 13, t->rank == root ? all : NULL, DL_MS);
        EXPECT(rc == 0, "gather at %d: %s", root, mlm_strerror(rc));
        int wrong = 0;
        for (int p = 0; p < t->N && t->rank == root; p++)
            for (int k = 0; k < 13; k++) wrong += all[p * 13 + k] != pat(p, 100 + i, (size_t)k);
        EXPECT(wrong == 0, "gather at %d: %d bytes differ", root, wrong);
    }
    return bad;
}

static int check_allgather(comm_t **c, const tctx_t *t) {
    int bad = 0;
    uint8_t mine[13], all[MAXN * 13];
    for (int k = 0; k < 13; k++) mine[k] = pat(t->rank, 200, (size_t)k);
    int rc = comm_allgather(*c, mine, 13, all, DL_MS);
    EXPECT(rc == 0, "allgather: %s", mlm_strerror(rc));
    int wrong = 0;
    for (int p = 0; p < t->N; p++)
        for (int k = 0; k < 13; k++) wrong += all[p * 13 + k] != pat(p, 200, (size_t)k);
    EXPECT(wrong == 0, "allgather: %d bytes differ", wrong);
    return bad;
}

// Blocks of different sizes, rank 1's empty.
static int check_allgatherv(comm_t **c, const tctx_t *t) {
    int bad = 0;
    size_t lens[MAXN], total = 0;
    for (int r = 0; r < t->N; r++) total += lens[r] = r == 1 ? 0 : 5 + 37 * (size_t)r;
    uint8_t mine[200], *all = malloc(total + 1);
    for (size_t k = 0; k < lens[t->rank]; k++) mine[k] = pat(t->rank, 300, k);
    int rc = comm_allgatherv(*c, mine, lens[t->rank], all, lens, DL_MS);
    EXPECT(rc == 0, "allgatherv: %s", mlm_strerror(rc));
    int wrong = 0;
    size_t off = 0;
    for (int p = 0; p < t->N; p++)
        for (size_t k = 0; k < lens[p]; k++) wrong += all[off++] != pat(p, 300, k);
    EXPECT(wrong == 0, "allgatherv: %d bytes differ", wrong);
    free(all);
    return bad;
}

// Block sizes of comm_alltoallv: rank a to rank b (some empty, the rest different).
static size_t a2a_len(int a, int b) { return (a + 2 * b) % 3 == 0 ? 0 : 3 + 7 * (size_t)a + 11 * (size_t)b; }

// One all-to-all among ranks [first, first + n): every byte lands in its block, and a call where
// this rank's sizes disagree with its peer's is refused as malformed by the receiver.
static int alltoallv_range(comm_t **c, const tctx_t *t, int first, int n, int tag) {
    int bad = 0;
    const int me = t->rank - first;
    size_t sl[MAXN] = {0}, rl[MAXN] = {0}, st = 0, rt = 0;
    for (int j = 0; j < n; j++) st += sl[j] = a2a_len(me, j), rt += rl[j] = a2a_len(j, me);
    uint8_t *snd = calloc(st + 1, 1), *rcv = malloc(rt + 1); // (st) bytes to send, (rt) received
    size_t off = 0;
    for (int j = 0; j < n; j++)
        for (size_t k = 0; k < sl[j]; k++) snd[off++] = pat(first + me, tag + j, k);
    memset(rcv, 0xee, rt + 1);
    int rc = comm_alltoallv(*c, first, n, snd, sl, rcv, rl, DL_MS);
    EXPECT(rc == 0, "alltoallv [%d, %d): %s", first, first + n, mlm_strerror(rc));
    int wrong = 0;
    off = 0;
    for (int j = 0; j < n; j++)
        for (size_t k = 0; k < rl[j]; k++) wrong += rcv[off++] != pat(first + j, tag + me, k);
    EXPECT(wrong == 0, "alltoallv [%d, %d): %d bytes differ", first, first + n, wrong);
    EXPECT(rcv[rt] == 0xee, "alltoallv wrote past its receive blocks");
    free(snd);
    free(rcv);
    return bad;
}

static int check_alltoallv(comm_t **c, const tctx_t *t) {
    int bad = alltoallv_range(c, t, 0, t->N, 400);
    bad += alltoallv_range(c, t, 0, t->N, 600); // the range sequence numbers the calls alike
    // last (range calls are numbered per range member): a sub-range, the ranks but 0
    if (t->N >= 3 && t->rank >= 1) bad += alltoallv_range(c, t, 1, t->N - 1, 500);
    size_t one[MAXN] = {0};
    int rc = comm_alltoallv(*c, t->N, 1, NULL, one, NULL, one, DL_MS);
    EXPECT(rc == MLM_EINVAL, "alltoallv over a range without the caller: %s", mlm_strerror(rc));
    return bad;
}

// Inputs whose sum depends on the order of the additions (1e8 + 1 - 1e8 ...): x is (N, n).
static void make_inputs(float *x, int N, size_t n, uint64_t seed) {
    static const float v[] = {1e8f, 1.0f, -1e8f, 3.0f, -7.5e7f, 0.25f, 2.5e7f, -1.0f, 1e-3f, 5e7f};
    for (size_t k = 0; k < (size_t)N * n; k++) {
        uint64_t h = mix(seed * 1000003u + k);
        x[k] = v[h % 10] * (1.0f + (float)((h >> 40) & 1023) / 1024.0f);
    }
}

// The summation orders comm.h promises. STAR: rank order; RING: chunk c from rank c onwards.
static void ref_sum(const float *x, int N, size_t n, comm_algo_t algo, float *out) {
    for (int c = 0; c < N; c++) {
        size_t lo = n * (size_t)c / (size_t)N, hi = n * (size_t)(c + 1) / (size_t)N;
        for (size_t i = lo; i < hi; i++) {
            int first = algo == COMM_ALGO_RING ? c : 0;
            float acc = x[(size_t)first * n + i];
            for (int j = 1; j < N; j++) acc = acc + x[(size_t)((first + j) % N) * n + i];
            out[i] = acc;
        }
    }
}

static int allreduce_algo(comm_t **c, const tctx_t *t, comm_algo_t algo) {
    int bad = 0;
    static const size_t sizes[] = {1, 7, 1001};
    for (int s = 0; s < 3; s++) {
        const size_t n = sizes[s];
        float *x = malloc((size_t)t->N * n * sizeof(float)), *want = malloc(n * sizeof(float));
        float *buf = malloc(n * sizeof(float));
        make_inputs(x, t->N, n, 77 + n);
        ref_sum(x, t->N, n, algo, want);
        memcpy(buf, x + (size_t)t->rank * n, n * sizeof(float));
        comm_allreduce_opts_t o = {algo, 0};
        int rc = comm_allreduce_ex(*c, buf, n, &o, DL_MS);
        EXPECT(rc == 0, "%s all-reduce of %zu: %s", comm_algo_name(algo), n, mlm_strerror(rc));
        EXPECT(memcmp(buf, want, n * sizeof(float)) == 0, "%s all-reduce of %zu: not the contract's bits",
               comm_algo_name(algo), n);
        free(x);
        free(want);
        free(buf);
    }
    return bad;
}

static int check_allreduce_star(comm_t **c, const tctx_t *t) { return allreduce_algo(c, t, COMM_ALGO_STAR); }
static int check_allreduce_ring(comm_t **c, const tctx_t *t) { return allreduce_algo(c, t, COMM_ALGO_RING); }

// Ranks 0 and 1 measure their link and get the same figures; then comm_calibrate gives every rank
// the same AUTO choice.
static int check_ping(comm_t **c, const tctx_t *t) {
    int bad = 0;
    double fig[2] = {0, 0}; // latency us, bandwidth bytes/s
    if (t->rank <= 1) {
        int rc = comm_ping(*c, 1 - t->rank, 5, &fig[0], &fig[1], DL_MS);
        EXPECT(rc == 0, "ping: %s", mlm_strerror(rc));
        EXPECT(fig[0] > 0 && fig[1] > 0, "ping figures %.1f us, %.0f B/s", fig[0], fig[1]);
        EXPECT(fig[0] >= t->b->min_lat_us, "latency %.1f us, the emulated delay is %.0f us", fig[0], t->b->min_lat_us);
        if (t->rank == 1) {
            rc = comm_send1(*c, 0, fig, sizeof fig, DL_MS);
            EXPECT(rc == 0, "send figures: %s", mlm_strerror(rc));
        } else {
            comm_msg_t m;
            rc = comm_recv(*c, 1, &m, NULL, DL_MS);
            EXPECT(rc == 0 && m.len[0] == sizeof fig && !memcmp(m.data[0], fig, sizeof fig),
                   "rank 1 measured other figures (%s)", mlm_strerror(rc));
            if (rc == 0) comm_msg_free(&m);
        }
    }
    int rc = comm_calibrate(*c, 4 * DL_MS);
    EXPECT(rc == 0, "calibrate: %s", mlm_strerror(rc));
    int pick = comm_choose_algo(*c, 64 << 10), picks[MAXN] = {0};
    rc = comm_gather(*c, 0, &pick, sizeof pick, t->rank == 0 ? picks : NULL, DL_MS);
    EXPECT(rc == 0, "gather of the choices: %s", mlm_strerror(rc));
    // A control-link worker knows only ranks up to its own (comm_link.h: its size is rank + 1), so the
    // rule sees another rank count there; the link is a star and runs no AUTO all-reduce.
    for (int r = 0; r < t->N && t->rank == 0 && !t->b->star; r++)
        EXPECT(picks[r] == pick, "rank %d chose %d, rank 0 %d", r, picks[r], pick);
    return bad;
}

static const check_t CHECKS[] = {
    {"point-to-point order, frames, zero-length", .run = check_p2p},
    {"COMM_ANY names the sender", .min_n = 2, .run = check_any},
    {"deadlines", .min_n = 2, .run = check_deadline},
    {"a peer goes away", .loses_rank = true, .min_n = 2, .run = check_peer_gone},
    {"oversize messages", .small_limit = true, .min_n = 2, .run = check_oversize},
    {"barrier", .run = check_barrier},
    {"broadcast", .run = check_broadcast},
    {"gather", .run = check_gather},
    {"allgather", .mesh = true, .run = check_allgather},
    {"allgatherv", .mesh = true, .run = check_allgatherv},
    {"alltoallv", .mesh = true, .run = check_alltoallv},
    {"all-reduce star bit-exact", .run = check_allreduce_star},
    {"all-reduce ring bit-exact", .mesh = true, .run = check_allreduce_ring},
    {"comm_ping and calibrate", .min_n = 2, .run = check_ping},
};
#define N_CHECKS ((int)(sizeof CHECKS / sizeof CHECKS[0]))

static bool applies(const check_t *k, const backend_t *b, int N) {
    return N >= k->min_n && !(k->mesh && b->star && N > 2) && !(k->loses_rank && b->mpi);
}

// --- running the table on threads

typedef struct {
    world_t *w;
    const check_t *k;
    int rank;
    comm_t *c;
    int bad;
} rank_job_t;

static void *rank_main(void *p) {
    rank_job_t *j = p;
    if (open_rank(j->w, j->rank, &j->c) != 0) {
        j->bad = 1;
        return NULL;
    }
    tctx_t t = {j->w->b, j->rank, j->w->N};
    j->bad = j->k->run(&j->c, &t);
    return NULL;
}

// Runs check k over backend b with N ranks on threads. Failures, as counted by the ranks.
static int run_check_threads(const backend_t *b, const check_t *k, int N) {
    world_t w;
    if (world_prepare(&w, b, N, k->small_limit) != 0) {
        fprintf(stderr, "\n[%s N=%d] cannot prepare the world\n", b->label, N);
        return 1;
    }
    pthread_t th[MAXN];
    rank_job_t jobs[MAXN];
    for (int r = 0; r < N; r++) {
        jobs[r] = (rank_job_t){&w, k, r, NULL, 0};
        pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    int bad = 0;
    for (int r = 0; r < N; r++) {
        pthread_join(th[r], NULL);
        bad += jobs[r].bad;
    }
    for (int r = 0; r < N; r++) comm_destroy(&jobs[r].c);
    world_release(&w);
    return bad;
}

static void run_table(const backend_t *b) {
    for (int s = 0; b->sizes[s]; s++)
        for (int i = 0; i < N_CHECKS; i++) {
            if (!applies(&CHECKS[i], b, b->sizes[s])) continue;
            int bad = run_check_threads(b, &CHECKS[i], b->sizes[s]);
            if (bad) fprintf(stderr, "\n%s, %d ranks, %s: %d failure(s)\n", b->label, b->sizes[s], CHECKS[i].name, bad);
            CU_ASSERT_EQUAL(bad, 0);
        }
}

static void test_inproc(void) { run_table(&BACKENDS[0]); }
static void test_zmq_ipc(void) { run_table(&BACKENDS[1]); }
static void test_zmq_tcp(void) { run_table(&BACKENDS[2]); }
static void test_link_ipc(void) { run_table(&BACKENDS[3]); }
static void test_link_tcp(void) { run_table(&BACKENDS[4]); }
static void test_fault_inproc(void) { run_table(&BACKENDS[5]); }

// --- running the table on MPI ranks (under mpirun, see tests/transport_mpi.sh)

static void test_mpi(void) {
    int provided = 0, init = 0;
    MPI_Initialized(&init);
    if (!init && MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
        CU_FAIL("MPI_Init_thread failed");
        return;
    }
    int rank = 0, N = 0, total = 0, ran = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &N);
    CU_ASSERT_FATAL(N >= 2 && N <= MAXN);
    for (int i = 0; i < N_CHECKS; i++) {
        const check_t *k = &CHECKS[i];
        if (!applies(k, &MPI_BACKEND, N)) continue;
        world_t w;
        world_prepare(&w, &MPI_BACKEND, N, k->small_limit);
        comm_t *c = NULL;
        int bad = open_rank(&w, rank, &c) != 0;
        if (!bad) {
            tctx_t t = {&MPI_BACKEND, rank, N};
            bad = k->run(&c, &t);
        }
        MPI_Barrier(MPI_COMM_WORLD); // nobody leaves while a peer still reads this world
        comm_destroy(&c);
        if (bad) fprintf(stderr, "\nmpi rank %d of %d, %s: %d failure(s)\n", rank, N, k->name, bad);
        CU_ASSERT_EQUAL(bad, 0);
        total += bad;
        ran++;
    }
    printf("\ntransport mpi rank %d of %d: %d checks, %d failures\n", rank, N, ran, total);
    MPI_Finalize();
}

// --- the control link's own cases

static void link_open_opts(comm_open_opts_t *o, int rank, int size, const char *const *eps) {
    *o = (comm_open_opts_t){.rank = rank, .size = size, .endpoints = eps, .timeout_ms = OPEN_MS};
}

// A worker process: listens at ep, answers every message with its bytes reversed, until killed.
static pid_t spawn_echo(const char *ep) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    comm_t *c = NULL;
    char err[256];
    comm_open_opts_t o = {.listen = ep};
    if (comm_open(&c, "link", &o, err, sizeof err) != 0) _exit(10);
    for (double end = mlm_now_ms() + 60000; mlm_now_ms() < end;) { // an orphan does not linger
        comm_msg_t m;
        if (comm_recv(c, 0, &m, NULL, 1000) != 0) continue;
        comm_send(c, 0, (comm_iov_t[]){{m.data[0], m.len[0]}}, m.n > 0 ? 1 : 0, 1000);
        comm_msg_free(&m);
    }
    _exit(0);
}

static int echo(comm_t *c, int peer, const char *text, int timeout_ms) {
    int rc = comm_send1(c, peer, text, strlen(text), timeout_ms);
    if (rc != 0) return rc;
    comm_msg_t m;
    int from = -1;
    rc = comm_recv(c, peer, &m, &from, timeout_ms);
    if (rc != 0) return rc;
    if (from != peer || m.n != 1 || m.len[0] != strlen(text) || memcmp(m.data[0], text, m.len[0])) rc = MLM_EPROTO;
    comm_msg_free(&m); // a mismatched reply (a late answer to an earlier message) is freed too
    return rc;
}

// The coordinator c sends to worker 1 (comm wk, in this thread), which answers. 0 or MLM_E*.
static int echo_once(comm_t *c, comm_t *wk) {
    comm_msg_t m;
    int rc = comm_send1(c, 1, "ping", 4, DL_MS);
    if (rc == 0) rc = comm_recv(wk, 0, &m, NULL, DL_MS);
    if (rc != 0) return rc;
    comm_msg_free(&m);
    rc = comm_send1(wk, 0, "pong", 4, DL_MS);
    if (rc == 0) rc = comm_recv(c, 1, &m, NULL, DL_MS);
    if (rc == 0 && (m.len[0] != 4 || memcmp(m.data[0], "pong", 4))) rc = MLM_EPROTO;
    if (rc == 0) comm_msg_free(&m);
    return rc;
}

// A worker process killed while the coordinator waits on it: MLM_EPEER at once (never a hang), the
// other worker still answers, and a worker started again at the endpoint is reachable again.
static void test_link_killed(void) {
    for (int tcp = 0; tcp < 2; tcp++) {
        world_t w;
        backend_t b = {"link", "link", .tcp = tcp, .star = true};
        CU_ASSERT_FATAL(world_prepare(&w, &b, 3, false) == 0);
        pid_t pid[2] = {spawn_echo(w.ptrs[0]), spawn_echo(w.ptrs[1])};
        comm_t *c = NULL;
        comm_open_opts_t o;
        link_open_opts(&o, 0, 3, w.ptrs);
        char err[256];
        CU_ASSERT_FATAL(comm_open(&c, "link", &o, err, sizeof err) == 0);
        CU_ASSERT_EQUAL(echo(c, 1, "one", DL_MS), 0);
        CU_ASSERT_EQUAL(echo(c, 2, "two", DL_MS), 0);
        // kill worker 1 while the coordinator waits for it
        comm_msg_t m;
        pid_t killer = fork();
        if (killer == 0) {
            sleep_ms(100);
            kill(pid[0], SIGKILL);
            _exit(0);
        }
        double t0 = mlm_now_ms();
        int rc = comm_recv(c, 1, &m, NULL, 3000);
        double el = mlm_now_ms() - t0;
        waitpid(killer, NULL, 0);
        waitpid(pid[0], NULL, 0);
        fprintf(stderr, "[link %s: killed worker -> %s after %.0f ms] ", tcp ? "tcp" : "ipc", mlm_strerror(rc), el);
        CU_ASSERT_EQUAL(rc, MLM_EPEER);
        CU_ASSERT(el >= 90 && el < 1000);
        CU_ASSERT_EQUAL(comm_send1(c, 1, "x", 1, 500), MLM_EPEER);
        rc = comm_recv(c, COMM_ANY, &m, NULL, 200); // the live worker keeps the ANY wait alive
        CU_ASSERT_EQUAL(rc, MLM_ETIMEOUT);
        CU_ASSERT_EQUAL(echo(c, 2, "still", DL_MS), 0);
        // a new worker process at the same endpoint
        if (!tcp) unlink(w.ptrs[0] + 6);
        pid[0] = spawn_echo(w.ptrs[0]);
        rc = MLM_EPEER;
        for (int i = 0; i < 100 && rc == MLM_EPEER; i++) { // reconnecting takes a few retry intervals
            sleep_ms(20);
            rc = echo(c, 1, "again", 2000);
        }
        CU_ASSERT_EQUAL(rc, 0);
        // both workers gone: recv(ANY) says so instead of waiting out its deadline
        for (int i = 0; i < 2; i++) {
            kill(pid[i], SIGKILL);
            waitpid(pid[i], NULL, 0);
        }
        t0 = mlm_now_ms();
        rc = comm_recv(c, COMM_ANY, &m, NULL, 3000);
        CU_ASSERT_EQUAL(rc, MLM_EPEER);
        CU_ASSERT(mlm_now_ms() - t0 < 2000);
        comm_destroy(&c);
        world_release(&w);
    }
}

// A worker stopped past the link's heartbeat timeout and then continued: its connection is dropped
// and made again, and sends in between wait for it instead of calling the worker lost (a STEP given
// up that way once made every worker of a chaos run look lost). Every send over 400 ms after the
// continue succeeds, and the worker still answers.
static void test_link_stopped_worker(void) {
    world_t w;
    backend_t b = {"link", "link", .star = true};
    CU_ASSERT_FATAL(world_prepare(&w, &b, 2, false) == 0);
    pid_t pid = spawn_echo(w.ptrs[0]);
    comm_t *c = NULL;
    comm_open_opts_t o;
    link_open_opts(&o, 0, 2, w.ptrs);
    comm_open_heartbeat(&o, 400); // 80 ms heartbeats, a connection silent 240 ms is dropped
    char err[256];
    CU_ASSERT_FATAL(comm_open(&c, "link", &o, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(echo(c, 1, "before", DL_MS), 0);
    kill(pid, SIGSTOP);
    sleep_ms(350);
    kill(pid, SIGCONT);
    int sent = 0, failed = 0, first_rc = 0;
    for (double end = mlm_now_ms() + 400; mlm_now_ms() < end; sleep_ms(1)) {
        int rc = comm_send1(c, 1, "x", 1, 2000);
        if (rc == 0) sent++;
        else if (failed++ == 0) first_rc = rc;
        comm_msg_t m;
        while (comm_recv(c, 1, &m, NULL, 0) == 0) comm_msg_free(&m); // replies, as they come
    }
    fprintf(stderr, "[link: %d sends after a 350 ms stop, %d failed (%s)] ", sent, failed, mlm_strerror(first_rc));
    CU_ASSERT(sent > 50);
    CU_ASSERT_EQUAL(failed, 0);
    int rc = MLM_EPEER;
    for (int i = 0; i < 20 && rc != 0; i++) rc = echo(c, 1, "after", 500); // a reply may have gone down with the old connection
    CU_ASSERT_EQUAL(rc, 0);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    comm_destroy(&c);
    world_release(&w);
}

// The worker answers whichever coordinator spoke last; before anyone spoke it has no peer.
static void test_link_new_coordinator(void) {
    world_t w;
    backend_t b = {"link", "link", .star = true};
    CU_ASSERT_FATAL(world_prepare(&w, &b, 2, false) == 0);
    comm_t *wk = NULL, *c1 = NULL, *c2 = NULL;
    comm_open_opts_t o = {.listen = w.ptrs[0]};
    char err[256];
    CU_ASSERT_FATAL(comm_open(&wk, "link", &o, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(comm_rank(wk), 1);
    CU_ASSERT_EQUAL(comm_size(wk), 2);
    CU_ASSERT_STRING_EQUAL(comm_name(wk), "link");
    CU_ASSERT_EQUAL(comm_send1(wk, 0, "x", 1, 100), MLM_EPEER); // nobody spoke yet
    link_open_opts(&o, 0, 2, w.ptrs);
    CU_ASSERT_FATAL(comm_open(&c1, "link", &o, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(comm_size(c1), 2);
    comm_msg_t m;
    int from = -1;
    CU_ASSERT_EQUAL(comm_send1(c1, 1, "c1", 2, DL_MS), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(wk, COMM_ANY, &m, &from, DL_MS), 0);
    CU_ASSERT(from == 0 && m.len[0] == 2 && !memcmp(m.data[0], "c1", 2));
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_send1(wk, 0, "to c1", 5, DL_MS), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(c1, 1, &m, &from, DL_MS), 0);
    CU_ASSERT(from == 1 && m.len[0] == 5);
    comm_msg_free(&m);
    comm_destroy(&c1); // the first coordinator vanishes, a second one comes
    CU_ASSERT_FATAL(comm_open(&c2, "link", &o, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(comm_send1(c2, 1, "c2", 2, DL_MS), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(wk, 0, &m, &from, DL_MS), 0);
    CU_ASSERT(m.len[0] == 2 && !memcmp(m.data[0], "c2", 2));
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_send1(wk, 0, "to c2", 5, DL_MS), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(c2, 1, &m, &from, DL_MS), 0);
    CU_ASSERT(m.len[0] == 5 && !memcmp(m.data[0], "to c2", 5));
    comm_msg_free(&m);
    // the control-link rank: peers other than the coordinator are out of reach
    CU_ASSERT_EQUAL(comm_link_set_rank(wk, 3), 0);
    CU_ASSERT(comm_rank(wk) == 3 && comm_size(wk) == 4);
    CU_ASSERT_EQUAL(comm_send1(wk, 2, "x", 1, 100), MLM_EPEER);
    CU_ASSERT_EQUAL(comm_recv(wk, 1, &m, NULL, 100), MLM_EPEER);
    CU_ASSERT_EQUAL(comm_link_set_rank(wk, 0), MLM_EINVAL);
    CU_ASSERT_EQUAL(comm_link_set_rank(c2, 2), MLM_EINVAL); // the coordinator is rank 0
    // traffic with the coordinator goes on under the new rank
    CU_ASSERT_EQUAL(echo_once(c2, wk), 0);
    comm_destroy(&c2);
    comm_destroy(&wk);
    world_release(&w);
}

// Garbage from a raw socket is dropped as MLM_EPROTO and the link stays usable.
static void test_link_malformed(void) {
    world_t w;
    backend_t b = {"link", "link", .star = true};
    CU_ASSERT_FATAL(world_prepare(&w, &b, 2, false) == 0);
    comm_t *wk = NULL, *c = NULL;
    comm_open_opts_t o = {.listen = w.ptrs[0]};
    char err[256];
    CU_ASSERT_FATAL(comm_open(&wk, "link", &o, err, sizeof err) == 0);
    void *zc = zmq_ctx_new(), *raw = zmq_socket(zc, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(raw, ZMQ_LINGER, &zero, sizeof zero);
    CU_ASSERT_FATAL(zmq_connect(raw, w.ptrs[0]) == 0);
    comm_msg_t m;
    zmq_send(raw, "garbage", 7, 0); // no envelope
    CU_ASSERT_EQUAL(comm_recv(wk, 0, &m, NULL, DL_MS), MLM_EPROTO);
    uint8_t env[COMM_LINK_ENVELOPE_BYTES] = {0x4d, 0x4c, 0x4d, 0x4c, COMM_LINK_MAJOR, 0, COMM_LINK_DATA, 3};
    zmq_send(raw, env, sizeof env, ZMQ_SNDMORE); // the frame count lies
    zmq_send(raw, "x", 1, 0);
    CU_ASSERT_EQUAL(comm_recv(wk, 0, &m, NULL, DL_MS), MLM_EPROTO);
    env[4] = 9; // another major version
    zmq_send(raw, env, sizeof env, 0);
    CU_ASSERT_EQUAL(comm_recv(wk, 0, &m, NULL, DL_MS), MLM_EPROTO);
    env[4] = COMM_LINK_MAJOR, env[7] = 1; // well-formed: delivered, and its sender becomes the peer
    zmq_send(raw, env, sizeof env, ZMQ_SNDMORE);
    zmq_send(raw, "raw ok", 6, 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(wk, 0, &m, NULL, DL_MS), 0);
    CU_ASSERT(m.n == 1 && m.len[0] == 6 && !memcmp(m.data[0], "raw ok", 6));
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_send1(wk, 0, "back", 4, DL_MS), 0);
    uint8_t got[64];
    zmq_pollitem_t it = {raw, 0, ZMQ_POLLIN, 0};
    CU_ASSERT_FATAL(zmq_poll(&it, 1, DL_MS) == 1);
    CU_ASSERT_EQUAL(zmq_recv(raw, got, sizeof got, 0), COMM_LINK_ENVELOPE_BYTES);
    CU_ASSERT(got[0] == 0x4d && got[7] == 1);
    CU_ASSERT_EQUAL(zmq_recv(raw, got, sizeof got, 0), 4);
    // a real coordinator still gets through
    link_open_opts(&o, 0, 2, w.ptrs);
    CU_ASSERT_FATAL(comm_open(&c, "link", &o, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(comm_send1(c, 1, "real", 4, DL_MS), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(wk, 0, &m, NULL, DL_MS), 0);
    CU_ASSERT(m.len[0] == 4 && !memcmp(m.data[0], "real", 4));
    comm_msg_free(&m);
    zmq_close(raw);
    zmq_ctx_term(zc);
    comm_destroy(&c);
    comm_destroy(&wk);
    world_release(&w);
}

// --- the control link under fault emulation, as the runtime drives it

typedef struct {
    const char *ep;
    const char *spec;
    int rank;
    int rc;
    int delivered[40];      // message k (coordinator to worker) arrived
} fault_worker_t;

// Greets like the runtime: the HELLO (the rank) arrives plain, the answer goes plain, then the
// worker wraps its comm; then it answers each message with its index until "bye".
static void *fault_worker_main(void *p) {
    fault_worker_t *fw = p;
    comm_t *c = NULL;
    char err[256];
    comm_open_opts_t o = {.listen = fw->ep};
    if ((fw->rc = comm_open(&c, "link", &o, err, sizeof err)) != 0) return NULL;
    comm_msg_t m;
    fw->rc = comm_recv(c, 0, &m, NULL, OPEN_MS);
    if (fw->rc == 0) {
        fw->rank = m.n == 1 && m.len[0] == 4 ? *(int *)m.data[0] : -1;
        comm_msg_free(&m);
    }
    if (fw->rc == 0) fw->rc = comm_link_set_rank(c, fw->rank);
    if (fw->rc == 0) fw->rc = comm_send1(c, 0, "hello", 5, DL_MS);
    fault_spec_t *s = NULL;
    if (fw->rc == 0) fw->rc = fault_parse(fw->spec, &s, err, sizeof err);
    if (fw->rc == 0) fw->rc = comm_fault_wrap(&c, s, err, sizeof err);
    fault_free(&s);
    while (fw->rc == 0) {
        int rc = comm_recv(c, 0, &m, NULL, 3000);
        if (rc == MLM_ETIMEOUT) break;
        if (rc != 0) {
            fw->rc = rc;
            break;
        }
        bool bye = m.len[0] == 3 && !memcmp(m.data[0], "bye", 3);
        if (!bye && m.len[0] == 4) {
            int k = *(int *)m.data[0];
            if (k >= 0 && k < 40) fw->delivered[k]++;
            comm_send1(c, 0, &k, sizeof k, DL_MS);
        }
        comm_msg_free(&m);
        if (bye) break;
    }
    comm_destroy(&c);
    return NULL;
}

static void test_link_faults(void) {
    const char *spec_text = "delay:link=0-2:ms=40,drop:link=0-1:p=0.3,seed=5";
    fault_spec_t *spec = NULL;
    char err[256];
    CU_ASSERT_FATAL(fault_parse(spec_text, &spec, err, sizeof err) == 0);
    world_t w;
    backend_t b = {"link", "link", .star = true};
    CU_ASSERT_FATAL(world_prepare(&w, &b, 3, false) == 0);
    fault_worker_t fw[2] = {{.ep = w.ptrs[0], .spec = spec_text}, {.ep = w.ptrs[1], .spec = spec_text}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, fault_worker_main, &fw[i]);
    comm_t *c = NULL;
    comm_open_opts_t o;
    link_open_opts(&o, 0, 3, w.ptrs);
    CU_ASSERT_FATAL(comm_open(&c, "link", &o, err, sizeof err) == 0);
    for (int r = 1; r <= 2; r++) CU_ASSERT_EQUAL(comm_send1(c, r, &r, sizeof r, DL_MS), 0);
    for (int r = 1; r <= 2; r++) {
        comm_msg_t m;
        CU_ASSERT_EQUAL_FATAL(comm_recv(c, r, &m, NULL, DL_MS), 0); // the plain answer: no stamp frame
        CU_ASSERT(m.n == 1 && m.len[0] == 5 && !memcmp(m.data[0], "hello", 5));
        comm_msg_free(&m);
    }
    CU_ASSERT_EQUAL_FATAL(comm_fault_wrap(&c, spec, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(comm_name(c), "link+fault");
    // link 0-2: 40 ms each way; link 0-1: no delay, 30% of the coordinator's messages dropped,
    // exactly those fault_decide names (the worker sees MLM_ETIMEOUT, the coordinator no answer)
    for (int k = 0; k < 3; k++) {
        double t0 = mlm_now_ms();
        comm_msg_t m;
        CU_ASSERT_EQUAL(comm_send1(c, 2, &k, sizeof k, DL_MS), 0);
        CU_ASSERT_EQUAL_FATAL(comm_recv(c, 2, &m, NULL, DL_MS), 0);
        double rtt = mlm_now_ms() - t0;
        CU_ASSERT(rtt >= 79.5 && rtt < 80 + SLACK_MS);
        CU_ASSERT(m.len[0] == 4 && *(int *)m.data[0] == k);
        comm_msg_free(&m);
    }
    // drops happen both ways on link 0-1: the worker's j-th answer is dropped as fault_decide says too
    int n_drop = 0, wrong = 0, n_rtt = 0, answers = 0;
    double rtts[40];
    for (int k = 0; k < 40; k++) {
        fault_decision_t d, back;
        fault_decide(spec, 0, 1, (uint64_t)k, &d);
        fault_decide(spec, 1, 0, (uint64_t)answers, &back);
        const bool lost = d.drop || back.drop;
        n_drop += d.drop;
        answers += !d.drop;
        comm_msg_t m;
        double t0 = mlm_now_ms();
        CU_ASSERT_EQUAL(comm_send1(c, 1, &k, sizeof k, DL_MS), 0);
        int rc = comm_recv(c, 1, &m, NULL, lost ? 60 : DL_MS);
        if (rc == 0 && !lost) rtts[n_rtt++] = mlm_now_ms() - t0;
        wrong += lost ? rc != MLM_ETIMEOUT : (rc != 0 || *(int *)m.data[0] != k);
        if (rc == 0) comm_msg_free(&m);
    }
    CU_ASSERT(n_drop >= 4 && n_drop <= 24); // the rule really drops, and not everything
    CU_ASSERT_EQUAL(wrong, 0);
    int below = 0; // link 0-1 has no delay: most round trips are far under link 0-2's 80 ms
    for (int i = 0; i < n_rtt; i++) below += rtts[i] < 40;
    CU_ASSERT(n_rtt > 0 && below * 2 > n_rtt);
    for (int r = 1; r <= 2; r++) comm_send1(c, r, "bye", 3, DL_MS);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) CU_ASSERT_EQUAL(fw[i].rc, 0);
    CU_ASSERT(fw[0].rank == 1 && fw[1].rank == 2);
    for (int k = 0; k < 40; k++) { // worker 1 saw exactly the messages that were not dropped
        fault_decision_t d;
        fault_decide(spec, 0, 1, (uint64_t)k, &d);
        CU_ASSERT_EQUAL(fw[0].delivered[k], d.drop ? 0 : 1);
    }
    // unwrapping gives the plain link back (a worker greeting a new coordinator does this)
    CU_ASSERT_EQUAL(comm_fault_unwrap(&c), 0);
    CU_ASSERT_STRING_EQUAL(comm_name(c), "link");
    CU_ASSERT_EQUAL(comm_fault_unwrap(&c), MLM_EINVAL);
    comm_destroy(&c);
    fault_free(&spec);
    world_release(&w);
}

// --- opening by name

static void test_open_names(void) {
    comm_t *c = (comm_t *)&c; // must come back NULL on failure
    char err[256] = "";
    CU_ASSERT_EQUAL(comm_open(&c, "carrier-pigeon", NULL, err, sizeof err), MLM_EINVAL);
    CU_ASSERT(c == NULL);
    CU_ASSERT(strstr(err, "carrier-pigeon") && strstr(err, "zmq") && strstr(err, "link") && strstr(err, "fault:"));
    int n = 0;
    for (; comm_open_name(n); n++) {
    }
    CU_ASSERT_EQUAL(n, 4);
    CU_ASSERT_STRING_EQUAL(comm_open_name(0), "zmq");
    CU_ASSERT_PTR_NULL(comm_open_name(-1));
    CU_ASSERT_EQUAL(comm_open(&c, "fault:carrier-pigeon", NULL, err, sizeof err), MLM_EINVAL);
    // every backend refuses what it cannot use
    comm_open_opts_t o = {.rank = 0, .size = 2};
    CU_ASSERT_EQUAL(comm_open(&c, "zmq", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(comm_open(&c, "inproc", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT(strstr(err, "group") != NULL);
    CU_ASSERT_EQUAL(comm_open(&c, "link", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(comm_open(&c, "mpi", &o, err, sizeof err), MLM_EINVAL); // MPI not initialised here
    CU_ASSERT(c == NULL);
    // inproc ranks one by one; a rank joins once; ranks that never joined are gone after release
    comm_inproc_group_t *g = NULL;
    CU_ASSERT_FATAL(comm_inproc_group_new(&g, 3, 0) == 0);
    comm_t *a = NULL, *b2 = NULL;
    o = (comm_open_opts_t){.rank = 0, .size = 3, .group = g};
    CU_ASSERT_FATAL(comm_open(&a, "inproc", &o, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(comm_open(&c, "inproc", &o, err, sizeof err), MLM_EINVAL);
    o.rank = 1;
    o.size = 4;
    CU_ASSERT_EQUAL(comm_open(&c, "inproc", &o, err, sizeof err), MLM_EINVAL);
    o.size = 0;
    CU_ASSERT_FATAL(comm_open(&b2, "inproc", &o, err, sizeof err) == 0);
    CU_ASSERT(comm_rank(b2) == 1 && comm_size(b2) == 3);
    CU_ASSERT_EQUAL(comm_send1(a, 2, "queued for rank 2", 17, 100), 0); // rank 2 may still join
    comm_inproc_group_release(&g);
    CU_ASSERT_PTR_NULL(g);
    CU_ASSERT_EQUAL(comm_send1(a, 2, "x", 1, 100), MLM_EPEER);
    CU_ASSERT_EQUAL(comm_send1(a, 1, "x", 1, 100), 0);
    comm_msg_t m;
    CU_ASSERT_EQUAL(comm_recv(b2, 0, &m, NULL, 100), 0);
    comm_msg_free(&m);
    comm_destroy(&a);
    comm_destroy(&b2);
    // fault:<name>: the spec from the options, the text, or $MESHLM_FAULTS; none at all is refused
    char *saved = getenv("MESHLM_FAULTS") ? strdup(getenv("MESHLM_FAULTS")) : NULL;
    unsetenv("MESHLM_FAULTS");
    const char *texts[3] = {NULL, "delay:link=*:oops", NULL};
    const int want[3] = {MLM_EINVAL, MLM_EINVAL, 0};
    const char *in_err[3] = {"MESHLM_FAULTS", "oops", ""};
    for (int i = 0; i < 3; i++) {
        if (i == 2) setenv("MESHLM_FAULTS", "delay:link=*:ms=1", 1);
        CU_ASSERT_FATAL(comm_inproc_group_new(&g, 1, 0) == 0);
        o = (comm_open_opts_t){.rank = 0, .size = 1, .group = g, .faults = texts[i]};
        err[0] = 0;
        CU_ASSERT_EQUAL(comm_open(&c, "fault:inproc", &o, err, sizeof err), want[i]);
        CU_ASSERT(strstr(err, in_err[i]) != NULL);
        CU_ASSERT((c != NULL) == (want[i] == 0));
        if (c) CU_ASSERT_STRING_EQUAL(comm_name(c), "inproc+fault");
        comm_destroy(&c);
        comm_inproc_group_release(&g);
    }
    fault_spec_t *spec = NULL; // a parsed spec wins over the text
    CU_ASSERT_FATAL(fault_parse("delay:link=0-1:ms=1", &spec, err, sizeof err) == 0);
    CU_ASSERT_FATAL(comm_inproc_group_new(&g, 2, 0) == 0);
    o = (comm_open_opts_t){.rank = 1, .size = 2, .group = g, .faults = "not a spec", .fault_spec = spec};
    CU_ASSERT_EQUAL(comm_open(&c, "fault:inproc", &o, err, sizeof err), 0);
    CU_ASSERT(c && comm_rank(c) == 1);
    comm_destroy(&c);
    comm_inproc_group_release(&g);
    fault_free(&spec);
    if (saved) setenv("MESHLM_FAULTS", saved, 1);
    else unsetenv("MESHLM_FAULTS");
    free(saved);
}

// --- shared-memory collectives of a group on one host (transport/comm_shm.h)

#define SHM_SLOT 8192
#define SHM_FLOATS 2000

typedef struct {
    world_t *w;
    int rank;
    int bad;
} shm_job_t;

// rank's addend i of an all-reduce: magnitudes apart by rank, so the summation order shows in the bits
static float shm_addend(int rank, size_t i) {
    const float scale[3] = {1e7f, 1.0f, -1e7f};
    return scale[rank % 3] * ((float)pat(rank, 77, i) + 0.37f) + (float)pat(rank, 78, i) * 1e-3f;
}

// One rank of a 3-rank ZeroMQ world: shared-memory all-gathers and all-reduces give the bits the
// comm's own collectives give (STAR and RING orders, which differ), oversize blocks are refused
// before anything is published, a subgroup works beside the world, and one member declining keeps
// the whole group on the comm.
static void *shm_rank(void *p) {
    shm_job_t *j = p;
    comm_t *c = NULL;
    if (open_rank(j->w, j->rank, &c) != 0) {
        j->bad++;
        return NULL;
    }
    const tctx_t tc = {j->w->b, j->rank, j->w->N}, *t = &tc;
    const int N = t->N, me = t->rank;
    int bad = 0;
    char err[256] = "";
    comm_shm_t *s = NULL;
    int rc = comm_shm_open(&s, c, 0, N, SHM_SLOT, true, DL_MS, err, sizeof err);
    EXPECT(rc == 0 && s, "open: %s %s", mlm_strerror(rc), err);
    uint8_t *in = malloc(SHM_SLOT + 1), *o1 = malloc((size_t)N * (SHM_SLOT + 1)), *o2 = malloc((size_t)N * (SHM_SLOT + 1));
    float *x = malloc(SHM_FLOATS * sizeof(float)), *a = malloc(SHM_FLOATS * sizeof(float)),
          *b = malloc(SHM_FLOATS * sizeof(float)), *star = malloc(SHM_FLOATS * sizeof(float));
    for (int it = 0; s && it < 40; it++) { // sizes 0 .. SHM_SLOT, even and odd slots in turn
        size_t lens[MAXN], total = 0;
        for (int r = 0; r < N; r++) total += lens[r] = it == 39 ? SHM_SLOT : ((size_t)it * 911 + (size_t)r * 2503) % (SHM_SLOT + 1);
        for (size_t i = 0; i < lens[me]; i++) in[i] = pat(me, it, i);
        memset(o1, 0xa5, total);
        rc = comm_shm_allgatherv(s, in, lens[me], o1, lens, DL_MS);
        EXPECT(rc == 0, "shm all-gather %d: %s", it, mlm_strerror(rc));
        rc = comm_allgatherv_range(c, 0, N, in, lens[me], o2, lens, DL_MS);
        EXPECT(rc == 0, "comm all-gather %d: %s", it, mlm_strerror(rc));
        EXPECT(memcmp(o1, o2, total) == 0, "all-gather %d: shared memory and messages differ", it);
    }
    int differ = 0; // elements whose STAR and RING sums differ (N = 3)
    for (int algo = COMM_ALGO_STAR; s && algo <= COMM_ALGO_RING; algo++)
        for (int it = 0; it < 3; it++) {
            const size_t n = it == 0 ? SHM_FLOATS : (size_t)(it * 7); // n < N leaves some ring chunks empty
            for (size_t i = 0; i < n; i++) x[i] = a[i] = b[i] = shm_addend(me, i + (size_t)it);
            rc = comm_shm_allreduce(s, a, n, (comm_algo_t)algo, DL_MS);
            EXPECT(rc == 0, "shm all-reduce %s: %s", comm_algo_name((comm_algo_t)algo), mlm_strerror(rc));
            const comm_allreduce_opts_t o = {(comm_algo_t)algo, 0};
            rc = comm_allreduce_range(c, 0, N, b, n, &o, DL_MS);
            EXPECT(rc == 0, "comm all-reduce %s: %s", comm_algo_name((comm_algo_t)algo), mlm_strerror(rc));
            EXPECT(memcmp(a, b, n * sizeof(float)) == 0, "all-reduce %s of %zu: bits differ from the comm's",
                   comm_algo_name((comm_algo_t)algo), n);
            if (algo == COMM_ALGO_STAR && it == 0) memcpy(star, a, n * sizeof(float));
            if (algo == COMM_ALGO_RING && it == 0)
                for (size_t i = 0; i < n; i++) differ += memcmp(&star[i], &a[i], sizeof(float)) != 0;
        }
    EXPECT(!s || N < 3 || differ > 0, "STAR and RING sums never differ: the orders are not exercised");
    size_t big[MAXN];
    for (int r = 0; r < N; r++) big[r] = r == N - 1 ? SHM_SLOT + 1 : 16;
    EXPECT(!comm_shm_fits(s, SHM_SLOT + 1) && comm_shm_fits(s, SHM_SLOT), "fits");
    rc = s ? comm_shm_allgatherv(s, in, big[me], o1, big, DL_MS) : MLM_ERANGE;
    EXPECT(rc == MLM_ERANGE, "oversize all-gather: %s", mlm_strerror(rc));
    rc = s ? comm_shm_allreduce(s, x, SHM_SLOT / 4 + 1, COMM_ALGO_STAR, DL_MS) : MLM_ERANGE;
    EXPECT(rc == MLM_ERANGE, "oversize all-reduce: %s", mlm_strerror(rc));
    size_t four[MAXN] = {4, 4, 4, 4, 4};
    uint32_t word = 0x1000u + (uint32_t)me, words[MAXN] = {0};
    rc = s ? comm_shm_allgatherv(s, &word, 4, words, four, DL_MS) : MLM_EINVAL; // the sequence is intact
    EXPECT(rc == 0 && words[0] == 0x1000u && words[N - 1] == 0x1000u + (uint32_t)(N - 1), "after the refusals: %s",
           mlm_strerror(rc));
    comm_shm_destroy(&s);
    comm_shm_destroy(&s); // idempotent
    if (me >= 1) { // ranks 1 .. N-1 alone
        rc = comm_shm_open(&s, c, 1, N - 1, 64, true, DL_MS, err, sizeof err);
        EXPECT(rc == 0 && s, "subgroup open: %s %s", mlm_strerror(rc), err);
        rc = s ? comm_shm_allgatherv(s, &word, 4, words, four, DL_MS) : MLM_EINVAL;
        EXPECT(rc == 0 && words[0] == 0x1001u, "subgroup all-gather: %s", mlm_strerror(rc));
        comm_shm_destroy(&s);
    }
    rc = comm_shm_open(&s, c, 0, N, 64, me != N - 1, DL_MS, err, sizeof err); // the last member declines
    EXPECT(rc == 0 && !s, "declined: %s, segment %p", mlm_strerror(rc), (void *)s);
    comm_shm_destroy(&s);
    rc = comm_shm_open(&s, c, 0, 1, 64, true, DL_MS, err, sizeof err);
    EXPECT(rc == MLM_EINVAL && !s, "a group of one: %s", mlm_strerror(rc));
    EXPECT(comm_barrier(c, DL_MS) == 0, "barrier");
    free(in), free(o1), free(o2), free(x), free(a), free(b), free(star);
    comm_destroy(&c);
    j->bad = bad;
    return NULL;
}

static void test_shm_collectives(void) {
    if (access("/dev/shm", W_OK) != 0) { // shm_open has nowhere to create a segment: groups keep to the comm
        fprintf(stderr, "(skipped: no writable /dev/shm) ");
        return;
    }
    world_t w;
    CU_ASSERT_FATAL(world_prepare(&w, &BACKENDS[1], 3, false) == 0); // zmq over ipc
    pthread_t th[3];
    shm_job_t jobs[3];
    for (int r = 0; r < 3; r++) {
        jobs[r] = (shm_job_t){&w, r, 0};
        pthread_create(&th[r], NULL, shm_rank, &jobs[r]);
    }
    for (int r = 0; r < 3; r++) {
        pthread_join(th[r], NULL);
        CU_ASSERT_EQUAL(jobs[r].bad, 0);
    }
    world_release(&w);
}

// One member of three of a group that stops taking part (member 2 never calls): member 0, with a
// short deadline, times out (MLM_ETIMEOUT) and abandons the segment; member 1, with a long one, leaves
// its collective at once with MLM_EPEER instead of waiting out its deadline; later collectives are
// refused (MLM_EPEER) on every member, member 2's included.
typedef struct {
    world_t *w;
    int rank;
    int rc, rc_after;
    double ms, t_end; // how long its collective took, and when it ended (mlm_now_ms)
    comm_shm_t *s;
    pthread_barrier_t *opened;
} shm_stop_t;

static void *shm_stop_rank(void *p) {
    shm_stop_t *j = p;
    comm_t *c = NULL;
    char err[256];
    const size_t lens[3] = {8, 8, 8};
    uint64_t v = (uint64_t)j->rank, out[3];
    j->rc = MLM_EINVAL;
    if (open_rank(j->w, j->rank, &c) != 0 || comm_shm_open(&j->s, c, 0, 3, 64, true, DL_MS, err, sizeof err) != 0 ||
        !j->s || comm_shm_allgatherv(j->s, &v, 8, out, lens, DL_MS) != 0) {
        pthread_barrier_wait(j->opened);
        comm_destroy(&c);
        return NULL;
    }
    pthread_barrier_wait(j->opened);
    const double t0 = mlm_now_ms();
    if (j->rank == 2) { // stops taking part until both others have left
        sleep_ms(600);
        j->rc = 0;
    } else {
        j->rc = comm_shm_allgatherv(j->s, &v, 8, out, lens, j->rank == 0 ? 300 : 20000);
    }
    j->t_end = mlm_now_ms();
    j->ms = j->t_end - t0;
    j->rc_after = comm_shm_allgatherv(j->s, &v, 8, out, lens, 200);
    comm_shm_destroy(&j->s);
    comm_destroy(&c);
    return NULL;
}

static void test_shm_abandoned(void) {
    if (access("/dev/shm", W_OK) != 0) {
        fprintf(stderr, "(skipped: no writable /dev/shm) ");
        return;
    }
    world_t w;
    CU_ASSERT_FATAL(world_prepare(&w, &BACKENDS[1], 3, false) == 0);
    pthread_barrier_t opened;
    pthread_barrier_init(&opened, NULL, 3);
    pthread_t th[3];
    shm_stop_t jobs[3];
    for (int r = 0; r < 3; r++) {
        jobs[r] = (shm_stop_t){.w = &w, .rank = r, .opened = &opened};
        pthread_create(&th[r], NULL, shm_stop_rank, &jobs[r]);
    }
    for (int r = 0; r < 3; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&opened);
    world_release(&w);
    fprintf(stderr, "[shm: stopped member: %s after %.0f ms, the other %s after %.0f ms] ", mlm_strerror(jobs[0].rc),
            jobs[0].ms, mlm_strerror(jobs[1].rc), jobs[1].ms);
    CU_ASSERT_EQUAL(jobs[0].rc, MLM_ETIMEOUT);
    CU_ASSERT(jobs[0].ms >= 299 && jobs[0].ms < 300 + SLACK_MS);
    CU_ASSERT_EQUAL(jobs[1].rc, MLM_EPEER);
    CU_ASSERT(jobs[1].t_end - jobs[0].t_end < 100); // within a nap of member 0's giving up, not at 20 s
    for (int r = 0; r < 3; r++) CU_ASSERT_EQUAL(jobs[r].rc_after, MLM_EPEER);
}

// A member process that stops taking part: the deadline (MLM_ETIMEOUT), after which the segment is
// abandoned (the next collective MLM_EPEER at once); in a second segment, once the member is killed,
// MLM_EPEER well before the deadline (the comm's probes find it gone).
static void test_shm_lost_peer(void) {
    if (access("/dev/shm", W_OK) != 0) { // shm_open has nowhere to create a segment: groups keep to the comm
        fprintf(stderr, "(skipped: no writable /dev/shm) ");
        return;
    }
    world_t w;
    CU_ASSERT_FATAL(world_prepare(&w, &BACKENDS[1], 2, false) == 0);
    const size_t lens[2] = {8, 8};
    pid_t pid = fork();
    if (pid == 0) { // one collective in each of two segments, a pause between them
        comm_t *c = NULL;
        comm_shm_t *s = NULL;
        char err[256];
        uint64_t v = 2, out[2];
        if (open_rank(&w, 1, &c) != 0 || comm_shm_open(&s, c, 0, 2, 64, true, DL_MS, err, sizeof err) != 0 || !s ||
            comm_shm_allgatherv(s, &v, 8, out, lens, DL_MS) != 0)
            _exit(10);
        sleep_ms(600);
        comm_shm_destroy(&s);
        if (comm_shm_open(&s, c, 0, 2, 64, true, DL_MS, err, sizeof err) != 0 || !s ||
            comm_shm_allgatherv(s, &v, 8, out, lens, DL_MS) != 0)
            _exit(11);
        sleep_ms(30000); // killed long before
        _exit(0);
    }
    comm_t *c = NULL;
    comm_shm_t *s = NULL;
    char err[256] = "";
    uint64_t v = 1, out[2] = {0, 0};
    CU_ASSERT_FATAL(open_rank(&w, 0, &c) == 0);
    CU_ASSERT_EQUAL(comm_shm_open(&s, c, 0, 2, 64, true, DL_MS, err, sizeof err), 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_EQUAL(comm_shm_allgatherv(s, &v, 8, out, lens, DL_MS), 0);
    CU_ASSERT(out[0] == 1 && out[1] == 2);
    double t0 = mlm_now_ms();
    int rc = comm_shm_allgatherv(s, &v, 8, out, lens, 300);
    double el = mlm_now_ms() - t0;
    CU_ASSERT_EQUAL(rc, MLM_ETIMEOUT);
    CU_ASSERT(el >= 299 && el < 300 + SLACK_MS);
    t0 = mlm_now_ms(); // the timeout abandoned the segment: the next collective says so at once
    CU_ASSERT_EQUAL(comm_shm_allgatherv(s, &v, 8, out, lens, 20000), MLM_EPEER);
    CU_ASSERT(mlm_now_ms() - t0 < 50);
    comm_shm_destroy(&s);
    CU_ASSERT_EQUAL(comm_shm_open(&s, c, 0, 2, 64, true, DL_MS, err, sizeof err), 0);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_EQUAL(comm_shm_allgatherv(s, &v, 8, out, lens, DL_MS), 0);
    kill(pid, SIGKILL);
    int st = 0;
    waitpid(pid, &st, 0);
    CU_ASSERT(WIFSIGNALED(st)); // it got through its parts (else it exits 10 or 11)
    t0 = mlm_now_ms();
    rc = comm_shm_allgatherv(s, &v, 8, out, lens, 20000);
    el = mlm_now_ms() - t0;
    fprintf(stderr, "[shm: killed member -> %s after %.0f ms] ", mlm_strerror(rc), el);
    CU_ASSERT_EQUAL(rc, MLM_EPEER);
    CU_ASSERT(el < 2000);
    comm_shm_destroy(&s);
    comm_destroy(&c);
    world_release(&w);
}

// --- suite

int test_transport_suite(void) {
    CU_pSuite s = CU_add_suite("transport", NULL, NULL);
    if (!s) return -1;
    if (getenv("MESHLM_TRANSPORT_MPI")) // under mpirun: the table over MPI only (tests/transport_mpi.sh)
        return CU_add_test(s, "conformance: mpi", test_mpi) ? 0 : -1;
    if (!CU_add_test(s, "opening by name", test_open_names) ||
        !CU_add_test(s, "conformance: inproc", test_inproc) ||
        !CU_add_test(s, "conformance: zmq ipc", test_zmq_ipc) ||
        !CU_add_test(s, "conformance: zmq tcp", test_zmq_tcp) ||
        !CU_add_test(s, "conformance: link ipc", test_link_ipc) ||
        !CU_add_test(s, "conformance: link tcp", test_link_tcp) ||
        !CU_add_test(s, "conformance: fault:inproc (3 ms delay)", test_fault_inproc) ||
        !CU_add_test(s, "link: worker process killed and restarted", test_link_killed) ||
        !CU_add_test(s, "link: a stopped and continued worker is sent to, not lost", test_link_stopped_worker) ||
        !CU_add_test(s, "link: a new coordinator, control-link ranks", test_link_new_coordinator) ||
        !CU_add_test(s, "link: malformed frames", test_link_malformed) ||
        !CU_add_test(s, "link: fault emulation through the wrapper", test_link_faults) ||
        !CU_add_test(s, "shm: collectives equal the comm's, subgroups, declining", test_shm_collectives) ||
        !CU_add_test(s, "shm: a member stops, then is killed", test_shm_lost_peer) ||
        !CU_add_test(s, "shm: a member gives up, the others leave at once", test_shm_abandoned))
        return -1;
    return 0;
}
