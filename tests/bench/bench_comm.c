// bench_comm: ping-pong latency, bandwidth and all-reduce time (star vs ring, f32 vs Q8_0) over ZeroMQ ipc/tcp loopback with N processes.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "transport/comm.h"
#include "transport/comm_open.h"
#include "core/clock.h"
#include "core/err.h"

// --- helpers

#define MAX_RANKS 16
#define EP_LEN 160

typedef struct {
    int ranks;          // processes
    int reps;           // timed all-reduces per size and algorithm
    bool ipc, tcp;      // transports to measure
} bench_opts_t;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// Distinct loopback ports chosen by the kernel (all bound to port 0 at once, then released).
static int free_ports(int n, int *ports) {
    int fds[MAX_RANKS], rc = 0;
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
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

// Median time (us) of reps all-reduces of n floats; every rank calls it, rank 0's figure is printed.
static int time_allreduce(comm_t *c, size_t n, comm_algo_t algo, uint32_t flags, int reps, double *med_us) {
    float *buf = malloc(n * sizeof(float));
    double *t = malloc((size_t)reps * sizeof *t);
    if (!buf || !t) return MLM_ENOMEM;
    for (size_t i = 0; i < n; i++) buf[i] = (float)((i * 7 + (size_t)comm_rank(c)) % 13) * 0.25f;
    comm_allreduce_opts_t o = {algo, flags};
    int rc = 0;
    for (int w = 0; w < 2 && rc == 0; w++) rc = comm_allreduce_ex(c, buf, n, &o, 30000);
    for (int r = 0; r < reps && rc == 0; r++) {
        rc = comm_barrier(c, 30000);
        double t0 = mlm_now_ms();
        if (rc == 0) rc = comm_allreduce_ex(c, buf, n, &o, 30000);
        t[r] = (mlm_now_ms() - t0) * 1e3;
    }
    if (rc == 0) {
        qsort(t, (size_t)reps, sizeof *t, cmp_double);
        *med_us = t[reps / 2];
    }
    free(buf);
    free(t);
    return rc;
}

// One rank's whole benchmark; rank 0 prints.
static int run_rank(int rank, int N, const char *const *eps, const char *kind, const bench_opts_t *bo) {
    comm_t *c = NULL;
    char err[256];
    comm_open_opts_t o = {.rank = rank, .size = N, .endpoints = eps};
    int rc = comm_open(&c, "zmq", &o, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "rank %d: %s\n", rank, err);
        return rc;
    }
    if (rank <= 1) {
        double lat = 0, bw = 0;
        rc = comm_ping(c, 1 - rank, 200, &lat, &bw, 30000);
        if (rc == 0 && rank == 0)
            printf("%s N=%d: ping-pong latency %.1f us (one way, median of 200), bandwidth %.0f MB/s (1 MiB)\n", kind, N,
                   lat, bw / 1e6);
    }
    if (rc == 0) rc = comm_calibrate(c, 30000);
    static const size_t sizes[] = {256, 4096, 65536, 1 << 20};
    if (rank == 0 && rc == 0)
        printf("%-9s %10s %10s %10s %10s %10s  %s\n", "floats", "star us", "ring us", "star-q8", "ring-q8", "auto",
               "(median of reps)");
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes && rc == 0; s++) {
        double t[4] = {0};
        for (int k = 0; k < 4 && rc == 0; k++)
            rc = time_allreduce(c, sizes[s], (k & 1) ? COMM_ALGO_RING : COMM_ALGO_STAR, k >= 2 ? COMM_AR_Q8_0 : 0,
                                sizes[s] >= (1 << 20) ? (bo->reps + 3) / 4 : bo->reps, &t[k]);
        if (rank == 0 && rc == 0)
            printf("%-9zu %10.1f %10.1f %10.1f %10.1f %10s\n", sizes[s], t[0], t[1], t[2], t[3],
                   comm_algo_name(comm_choose_algo(c, sizes[s] * sizeof(float))));
    }
    if (rc != 0) fprintf(stderr, "rank %d: %s\n", rank, mlm_strerror(rc));
    comm_destroy(&c);
    return rc;
}

// Forks N ranks over one transport and waits for them.
static int run_world(const bench_opts_t *bo, bool tcp) {
    const int N = bo->ranks;
    char eps[MAX_RANKS][EP_LEN];
    const char *ptrs[MAX_RANKS];
    int ports[MAX_RANKS];
    char dir[] = "/tmp/bench_comm-XXXXXX";
    if (tcp && free_ports(N, ports) != 0) return 1;
    if (!tcp && !mkdtemp(dir)) return 1;
    for (int r = 0; r < N; r++) {
        if (tcp) snprintf(eps[r], EP_LEN, "tcp://127.0.0.1:%d", ports[r]);
        else snprintf(eps[r], EP_LEN, "ipc://%s/r%d", dir, r);
        ptrs[r] = eps[r];
    }
    fflush(stdout);
    pid_t pid[MAX_RANKS];
    for (int r = 0; r < N; r++) {
        pid[r] = fork();
        if (pid[r] == 0) {
            int rc = run_rank(r, N, ptrs, tcp ? "tcp" : "ipc", bo);
            fflush(stdout);
            _exit(rc == 0 ? 0 : 1);
        }
    }
    int bad = 0;
    for (int r = 0; r < N; r++) {
        int st = 0;
        waitpid(pid[r], &st, 0);
        bad += !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    if (!tcp) rmdir(dir);
    return bad;
}

// --- main

int main(int argc, char **argv) {
    bench_opts_t bo = {.ranks = 4, .reps = 40, .ipc = true, .tcp = true};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc) bo.ranks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) bo.reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            const char *t = argv[++i];
            bo.ipc = !strcmp(t, "ipc") || !strcmp(t, "both");
            bo.tcp = !strcmp(t, "tcp") || !strcmp(t, "both");
        } else {
            fprintf(stderr, "usage: bench_comm [-n ranks (2..%d)] [-r reps] [-t ipc|tcp|both]\n", MAX_RANKS);
            return 2;
        }
    }
    if (bo.ranks < 2 || bo.ranks > MAX_RANKS || bo.reps < 1) {
        fprintf(stderr, "bench_comm: ranks must be 2..%d and reps >= 1\n", MAX_RANKS);
        return 2;
    }
    int bad = 0;
    if (bo.ipc) bad += run_world(&bo, false);
    if (bo.tcp) bad += run_world(&bo, true);
    return bad ? 1 : 0;
}
