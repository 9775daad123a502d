// Node profiling: short timed runs of the real kernels, a memory stream and a file read.
#include "cluster/profile.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "worker/kernels/matmul.h"
#include "worker/kernels/threadpool.h"

// --- helpers

#define PROF_ROWS 1024
#define PROF_COLS 4096
#define MEM_BYTES (64u << 20)

typedef struct {
    const kernels_t *k;
    const mm_weight_t *w;
    const void *xq;
    float *y;
} mv_job_t;

static void mv_fn(void *arg, int ith, int nth) {
    mv_job_t *j = arg;
    int64_t al = j->w->row_align > 0 ? j->w->row_align : 1, nb = (j->w->rows + al - 1) / al;
    int64_t r0 = nb * ith / nth * al, r1 = nb * (ith + 1) / nth * al;
    if (r1 > j->w->rows) r1 = j->w->rows;
    if (r0 < r1) mm_rows(j->k, j->w, j->xq, 0, 1, j->y, (size_t)j->w->rows, r0, r1);
}

typedef struct {
    const uint64_t *buf;   // (n) words to read
    size_t n;
    uint64_t sum[64];      // per-thread sinks (kept so the reads are not optimised away)
} mem_job_t;

static void mem_fn(void *arg, int ith, int nth) {
    mem_job_t *j = arg;
    size_t a = j->n * (size_t)ith / (size_t)nth, b = j->n * (size_t)(ith + 1) / (size_t)nth;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = a; i + 4 <= b; i += 4) {
        s0 += j->buf[i];
        s1 += j->buf[i + 1];
        s2 += j->buf[i + 2];
        s3 += j->buf[i + 3];
    }
    j->sum[ith & 63] = s0 ^ s1 ^ s2 ^ s3;
}

// --- public API

int profile_node(profile_t *p, int n_threads, const char *model_path, int budget_ms) {
    memset(p, 0, sizeof *p);
    if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads <= 0) n_threads = 1;
    p->n_threads = n_threads;
    tpool_t *pool = tpool_new(n_threads);
    const kernels_t *k = kernels_best();
    const qtype_t types[] = {QT_Q4_0, QT_Q8_0, QT_Q4_K, QT_Q6_K, QT_F16};
    const int nt = (int)(sizeof types / sizeof *types);
    const double per = (budget_ms > 0 ? budget_ms : 300) / 1000.0 / (nt + 2);
    const size_t wbytes = qtype_row_size(QT_F16, PROF_COLS) * PROF_ROWS; // the largest of the types
    uint8_t *w = malloc(wbytes);
    float *x = malloc(PROF_COLS * sizeof(float)), *y = malloc(PROF_ROWS * sizeof(float));
    void *xq = malloc(PROF_COLS * 4 + 4096);
    uint64_t *mem = malloc(MEM_BYTES);
    if (!pool || !w || !x || !y || !xq || !mem) {
        tpool_destroy(&pool);
        free(w), free(x), free(y), free(xq), free(mem);
        return MLM_ENOMEM;
    }
    // Weight bytes only need to be valid numbers: small scales, arbitrary quants.
    for (size_t i = 0; i < wbytes; i++) w[i] = (uint8_t)(i * 2654435761u >> 24) & 0x3b;
    for (int i = 0; i < PROF_COLS; i++) x[i] = (float)((i % 17) - 8) * 0.01f;
    for (int t = 0; t < nt; t++) {
        mm_weight_t mw;
        if (mm_weight_init(&mw, k, types[t], PROF_ROWS, PROF_COLS, w, true) != 0) continue;
        mm_quantize_act(k, types[t], x, xq, PROF_COLS);
        mv_job_t job = {k, &mw, xq, y};
        int reps = 0;
        double t0 = (mlm_now_ms() / 1e3), el = 0;
        while ((el = (mlm_now_ms() / 1e3) - t0) < per || reps < 3) {
            tpool_run(pool, mv_fn, &job);
            reps++;
        }
        p->type[p->n_types] = types[t];
        p->gflops[p->n_types] = 2.0 * PROF_ROWS * PROF_COLS * reps / el / 1e9;
        p->n_types++;
        mm_weight_release(&mw);
    }
    memset(mem, 1, MEM_BYTES);
    mem_job_t mj = {mem, MEM_BYTES / 8, {0}};
    int reps = 0;
    double t0 = (mlm_now_ms() / 1e3), el = 0;
    while ((el = (mlm_now_ms() / 1e3) - t0) < per || reps < 2) {
        tpool_run(pool, mem_fn, &mj);
        reps++;
    }
    p->mem_bw = (double)MEM_BYTES * reps / el;
    if (model_path) {
        int fd = open(model_path, O_RDONLY);
        if (fd >= 0) {
            size_t got = 0;
            ssize_t r;
            double s0 = (mlm_now_ms() / 1e3);
            while (got < MEM_BYTES && (r = read(fd, mem, 1 << 20)) > 0) got += (size_t)r;
            double d = (mlm_now_ms() / 1e3) - s0;
            if (got > 0 && d > 0) p->disk_bw = (double)got / d;
            close(fd);
        }
    }
    tpool_destroy(&pool);
    free(w), free(x), free(y), free(xq), free(mem);
    return 0;
}

double profile_gflops(const profile_t *p, qtype_t t) {
    double sum = 0;
    for (int i = 0; i < p->n_types; i++) {
        if (p->type[i] == t) return p->gflops[i];
        sum += p->gflops[i];
    }
    return p->n_types ? sum / p->n_types : 1.0;
}
