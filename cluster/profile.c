// Node profiling: short timed runs of the real kernels, a memory stream and a file read.
#include "cluster/profile.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <stdbool.h>
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
#define MEM_BYTES (64u << 20)    // the disk read's total, and the memory stream's buffer at least
#define MEM_MAX_BYTES (256u << 20) // the memory stream's buffer at most (twice the last-level cache below it)
#define MIN_BYTES (1u << 20)     // ... and at least (a smaller budget is below any node's minimum)
#define DISK_CHUNK (16u << 20)   // bytes per read call, as the weight window reads
#define DISK_ALIGN 4096          // O_DIRECT offset, length and buffer alignment
#define HUGE_ALIGN (2u << 20)    // the memory stream's buffer alignment (a huge page)

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
    const kernels_t *k;
    const uint8_t *buf;    // (n) bytes to read
    size_t n;
    uint64_t sum[64];      // per-thread sinks (kept so the reads are not optimised away)
} mem_job_t;

// Each thread reads its 256-byte aligned part with the kernels' widest loads (kern_read_sum).
static void mem_fn(void *arg, int ith, int nth) {
    mem_job_t *j = arg;
    const size_t units = j->n / 256, a = units * (size_t)ith / (size_t)nth * 256,
                 b = units * (size_t)(ith + 1) / (size_t)nth * 256;
    j->sum[ith & 63] = kern_read_sum(j->k, j->buf + a, b - a);
}

// Bytes per second reading up to `total` bytes of path into buf (cap bytes, DISK_ALIGN aligned), from
// the disk rather than the page cache: with O_DIRECT, or where the file system refuses it (tmpfs, some
// FUSE) buffered after dropping the file's cached pages (POSIX_FADV_DONTNEED), and dropping what the
// read cached. A file of more than 4 x total is read in chunks spread over it, not from its start:
// every tool reads a model's first megabytes (header, hash), so a virtual machine's host may hold
// them in its cache, and a 70B run's profile read them at 1.4x the disk's rate. 0 when the file
// cannot be read.
static double disk_read_bw(const char *path, void *buf, size_t cap, size_t total) {
    bool direct = true;
    int fd = open(path, O_RDONLY | O_DIRECT);
    if (fd < 0 && errno == EINVAL) {
        direct = false;
        fd = open(path, O_RDONLY);
    }
    if (fd < 0) return 0;
    if (!direct) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    const size_t chunk = cap < DISK_CHUNK ? cap : DISK_CHUNK;
    struct stat st;
    const uint64_t size = fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
    const uint64_t n_chunks = (total + chunk - 1) / chunk;
    const bool spread = size > 4 * (uint64_t)total && n_chunks > 0;
    size_t got = 0;
    ssize_t r = 0;
    const int64_t s0 = mlm_now_us();
    for (uint64_t i = 0; got < total; i++) {
        const uint64_t off = spread ? size * (2 * i + 1) / (2 * n_chunks) / DISK_ALIGN * DISK_ALIGN : got;
        if ((r = pread(fd, buf, chunk, (off_t)off)) <= 0) break;
        got += (size_t)r;
        if ((size_t)r < chunk) break; // the end of the file
    }
    const double d = (double)(mlm_now_us() - s0) / 1e6;
    if (!direct) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return r >= 0 && got > 0 && d > 0 ? (double)got / d : 0;
}

// --- public API

uint64_t profile_stream_bytes(void) {
    long llc = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (llc <= 0) llc = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    size_t want = llc > 0 ? 2 * (size_t)llc : MEM_BYTES;
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && want > (size_t)pages / 8 * (size_t)page) want = (size_t)pages / 8 * (size_t)page; // small boards
    if (want < MEM_BYTES) want = MEM_BYTES;
    if (want > MEM_MAX_BYTES) want = MEM_MAX_BYTES;
    return (want + MIN_BYTES - 1) & ~(size_t)(MIN_BYTES - 1);
}

int profile_node(profile_t *p, int n_threads, const char *model_path, int budget_ms, uint64_t mem_budget) {
    memset(p, 0, sizeof *p);
    if (n_threads <= 0) n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads <= 0) n_threads = 1;
    p->n_threads = n_threads;
    // The memory stream and the disk read share one buffer of at most half the budget, so that the
    // profile (which runs before any weights are loaded) stays within it.
    size_t mem_bytes = (size_t)profile_stream_bytes();
    if (mem_budget > 0 && mem_budget / 2 < mem_bytes) mem_bytes = (size_t)(mem_budget / 2) & ~(size_t)(MIN_BYTES - 1);
    if (mem_bytes < MIN_BYTES) mem_bytes = MIN_BYTES;
    tpool_t *pool = tpool_new(n_threads);
    const kernels_t *k = kernels_best();
    const qtype_t types[] = {QT_Q4_0, QT_Q8_0, QT_Q4_K, QT_Q6_K, QT_F16};
    const int nt = (int)(sizeof types / sizeof *types);
    const double per = (budget_ms > 0 ? budget_ms : 300) / 1000.0 / (nt + 2);
    const size_t wbytes = qtype_row_size(QT_F16, PROF_COLS) * PROF_ROWS; // the largest of the types
    uint8_t *w = malloc(wbytes);
    float *x = malloc(PROF_COLS * sizeof(float)), *y = malloc(PROF_ROWS * sizeof(float));
    void *xq = malloc(PROF_COLS * 4 + 4096);
    uint8_t *mem = NULL; // (mem_bytes) the memory stream, then the disk read's buffer
    if (posix_memalign((void **)&mem, HUGE_ALIGN, mem_bytes) != 0) mem = NULL;
#ifdef MADV_HUGEPAGE
    // in huge pages where the kernel gives them, as the weights get them (worker/kernels/matmul.c)
    else (void)madvise(mem, mem_bytes, MADV_HUGEPAGE);
#endif
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
    memset(mem, 1, mem_bytes);
    mem_job_t mj = {k, mem, mem_bytes, {0}};
    int reps = 0;
    double t0 = (mlm_now_ms() / 1e3), el = 0;
    while ((el = (mlm_now_ms() / 1e3) - t0) < per || reps < 2) {
        tpool_run(pool, mem_fn, &mj);
        reps++;
    }
    p->mem_bw = (double)mem_bytes * reps / el;
    if (model_path) p->disk_bw = disk_read_bw(model_path, mem, mem_bytes, MEM_BYTES);
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
