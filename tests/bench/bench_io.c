// Benchmark of the ways to stream weights from disk under a memory limit: O_DIRECT pread into a ring of
// buffers, buffered pread (dropping or keeping what it read), mmap + madvise; the "window" weight
// provider streaming a model with each; and what repacking a streamed Q4_0 block would cost.
//
// usage: bench_io [-d DIR] [-s MB] [-u MB] [-c LIMIT_MB] [-r REPS] [-m MODEL [-t TOKENS] [-b BUDGET_MB]]
//   -d DIR    where the test file is written (default /var/tmp); -s its size (default 2048 MB)
//   -u MB     bytes per read, the size of a streamed unit (default 16)
//   -c MB     memory cgroup limit each measurement runs in, page cache included (default 256; 0 = none)
//   -r REPS   passes per method (default 3; the best is reported, with the median)
//   -m MODEL  also stream this GGUF through the window provider with each io method (-t tokens, default 4;
//             -b its memory budget in MiB, default: w=2 buffers and nothing pinned)
// Every run starts cold: the file's pages are dropped from the page cache first. Each method runs in a
// child process inside its own memory cgroup (when cgroups are writable) whose peak is reported: buffered
// reads and mmap fill the page cache the cgroup counts, O_DIRECT does not.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cluster/launch.h"
#include "cluster/memcg.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/rng.h"
#include "offload/weights.h"
#include "worker/kernels/matmul.h"
#include "worker/kernels/threadpool.h"

// --- types

#define MIB (1ull << 20)
#define MAX_REPS 16

typedef enum { M_DIRECT, M_PREAD_DROP, M_PREAD_KEEP, M_MMAP, M_N } method_t;
static const char *const method_names[M_N] = {"O_DIRECT pread, 2 buffers", "buffered pread + DONTNEED",
                                              "buffered pread (pages kept)", "mmap + WILLNEED/DONTNEED"};

// What a measuring child reports back through its pipe.
typedef struct {
    double mb_s;             // bytes / wall time
    double stall_ms;         // provider runs: acquire waiting
    double read_ms;          // provider runs: time reading
    uint64_t vmhwm;          // the child's VmHWM at the end
    int rc;                  // 0, or what failed
} report_t;

typedef struct {
    const char *dir;
    uint64_t size;           // test file bytes
    uint64_t unit;           // bytes per read
    uint64_t limit;          // cgroup limit (0 = none)
    int reps;
    const char *model;
    int tokens;
    uint64_t budget;         // provider runs (0 = forced window of 2)
} opts_t;

// --- helpers

static void drop_cache(const char *path) {
    const int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

// Writes a file of n bytes of pseudo-random data (not compressible, not sparse), synced. 0 or -1.
static int make_file(const char *path, uint64_t n) {
    const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return -1;
    uint64_t *buf = malloc(MIB); // (MIB / 8) one chunk
    uint64_t seed = 7;
    int rc = buf ? 0 : -1;
    for (uint64_t off = 0; rc == 0 && off < n; off += MIB) {
        for (size_t i = 0; i < MIB / 8; i++) buf[i] = mlm_rng_next(&seed);
        if (write(fd, buf, MIB) != (ssize_t)MIB) rc = -1;
    }
    free(buf);
    if (rc == 0 && fsync(fd) != 0) rc = -1;
    close(fd);
    return rc;
}

// One pass over the file with method m, unit bytes at a time. Returns MB/s or a negative value.
static double raw_pass(method_t m, const char *path, uint64_t size, uint64_t unit) {
    const int fd = open(path, O_RDONLY | (m == M_DIRECT ? O_DIRECT : 0));
    if (fd < 0) return -1;
    void *bufs[2] = {NULL, NULL}; // (unit) a ring of two buffers
    const uint8_t *map = NULL;
    if (m == M_MMAP) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            close(fd);
            return -1;
        }
    } else if (posix_memalign(&bufs[0], 4096, unit) != 0 || posix_memalign(&bufs[1], 4096, unit) != 0) {
        close(fd);
        return -1;
    }
    volatile uint64_t sink = 0;
    const double t0 = mlm_now_ms();
    int bad = 0;
    for (uint64_t off = 0, i = 0; off < size && !bad; off += unit, i++) {
        const uint64_t n = size - off < unit ? size - off : unit;
        if (m == M_MMAP) {
            if (off + n < size) (void)madvise((void *)(map + off + n), size - off - n < unit ? size - off - n : unit, MADV_WILLNEED);
            for (uint64_t k = 0; k < n; k += 4096) sink += map[off + k];
            (void)madvise((void *)(map + off), n, MADV_DONTNEED);
            (void)posix_fadvise(fd, (off_t)off, (off_t)n, POSIX_FADV_DONTNEED);
        } else {
            uint8_t *b = bufs[i & 1];
            for (uint64_t got = 0; got < n;) {
                const ssize_t r = pread(fd, b + got, n - got, (off_t)(off + got));
                if (r <= 0) {
                    bad = 1;
                    break;
                }
                got += (uint64_t)r;
            }
            sink += b[0];
            if (m == M_PREAD_DROP) (void)posix_fadvise(fd, (off_t)off, (off_t)n, POSIX_FADV_DONTNEED);
        }
    }
    const double ms = mlm_now_ms() - t0;
    if (map) munmap((void *)map, size);
    free(bufs[0]);
    free(bufs[1]);
    close(fd);
    (void)sink;
    return bad ? -1 : (double)size / 1e3 / ms;
}

// The window provider over the model: every unit acquired and released in the forward pass's order,
// tokens times, with nothing computed: the reader's own rate.
static report_t provider_pass(const opts_t *o, const char *io) {
    report_t r = {0};
    char err[512], name[64];
    gguf_t *g = NULL;
    model_hparams_t hp;
    weights_t *w = NULL;
    if ((r.rc = gguf_open(&g, o->model, err, sizeof err)) != 0 || (r.rc = hparams_read(g, &hp, err, sizeof err)) != 0)
        return r;
    const shard_slice_t sl = shard_full(hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_embd, hp.n_ff, hp.n_vocab);
    const weights_params_t wp = {.g = g, .hp = &hp, .slice = &sl, .budget_bytes = o->budget, .n_ctx = 64};
    if (o->budget) snprintf(name, sizeof name, "window:io=%s", io);
    else snprintf(name, sizeof name, "window:w=2,pin=0,io=%s", io);
    if ((r.rc = weights_new(&w, name, &wp, err, sizeof err)) != 0) {
        fprintf(stderr, "bench_io: %s: %s\n", name, err);
        gguf_close(&g);
        return r;
    }
    weights_stats_t s0, s1;
    weights_stats(w, &s0);
    const double t0 = mlm_now_ms();
    for (int t = 0; t < o->tokens && r.rc == 0; t++)
        for (int l = 0; l <= hp.n_layer && r.rc == 0; l++) {
            const int id = l < hp.n_layer ? l : WEIGHTS_OUT;
            const layer_weights_t *L;
            if ((r.rc = weights_acquire(w, id, WEIGHTS_DENSE, &L)) == 0) weights_release(w, id, WEIGHTS_DENSE);
        }
    const double ms = mlm_now_ms() - t0;
    weights_stats(w, &s1);
    r.mb_s = (double)(s1.bytes_read - s0.bytes_read) / 1e3 / ms;
    r.stall_ms = s1.stall_ms - s0.stall_ms;
    r.read_ms = s1.read_ms - s0.read_ms;
    weights_free(&w);
    gguf_close(&g);
    return r;
}

// Runs fn in a child inside a fresh memory cgroup (limit o->limit) when cgroups are writable; *peak
// gets the group's peak (0 without one). The child's report, rc -1 when it died.
typedef report_t (*child_fn)(const opts_t *o, int arg, const char *sarg);

static report_t in_child(const opts_t *o, child_fn fn, int arg, const char *sarg, uint64_t *peak) {
    report_t r = {.rc = -1};
    *peak = 0;
    memcg_t *g = NULL;
    char name[64], err[512];
    snprintf(name, sizeof name, "meshlm-benchio-%d", (int)getpid());
    if (memcg_new(&g, name, o->limit, err, sizeof err) != 0) g = NULL;
    int gate[2], back[2];
    if (pipe(gate) != 0 || pipe(back) != 0) return r;
    const pid_t pid = fork();
    if (pid == 0) {
        close(gate[1]);
        close(back[0]);
        char c;
        if (read(gate[0], &c, 1) < 0) _exit(3);
        report_t rep = fn(o, arg, sarg);
        rep.vmhwm = launch_vmhwm(getpid());
        if (write(back[1], &rep, sizeof rep) != (ssize_t)sizeof rep) _exit(4);
        _exit(0);
    }
    close(gate[0]);
    close(back[1]);
    if (g && memcg_add(g, pid, err, sizeof err) != 0) fprintf(stderr, "bench_io: %s\n", err);
    close(gate[1]);
    if (read(back[0], &r, sizeof r) != (ssize_t)sizeof r) r.rc = -1;
    close(back[0]);
    int st;
    waitpid(pid, &st, 0);
    if (g) *peak = memcg_peak(g);
    memcg_destroy(&g);
    return r;
}

static report_t raw_child(const opts_t *o, int m, const char *path) {
    report_t r = {0};
    r.mb_s = raw_pass((method_t)m, path, o->size, o->unit);
    r.rc = r.mb_s < 0 ? -1 : 0;
    return r;
}

static report_t provider_child(const opts_t *o, int unused, const char *io) { return provider_pass(o, io); }

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// --- repacking: what a streamed Q4_0 block would cost to repack, and what the packed layout buys

typedef struct {
    const kernels_t *k;
    const mm_weight_t *w;
    const void *xq;
    float *y;
} mm_job_t;

static void mm_job(void *arg, int ith, int nth) {
    const mm_job_t *j = arg;
    const int64_t a = j->w->row_align, groups = (j->w->rows + a - 1) / a, per = (groups + nth - 1) / nth;
    int64_t r0 = ith * per * a, r1 = (ith + 1) * per * a;
    if (r1 > j->w->rows) r1 = j->w->rows;
    if (r0 < r1) mm_rows(j->k, j->w, j->xq, 0, 1, j->y, 0, r0, r1);
}

// A TinyLlama-1.1B block in Q4_0 (q, k, v, o, gate, up, down): repack time, and nt=1 products with
// 1 and 2 threads on the plain and the packed layout.
static void bench_repack(int reps) {
    static const int64_t shp[7][2] = {{2048, 2048}, {256, 2048}, {256, 2048}, {2048, 2048},
                                      {5632, 2048}, {5632, 2048}, {2048, 5632}}; // (rows, cols)
    const kernels_t *k = kernels_best();
    uint8_t *data[7];            // (rows, row bytes) each matrix in the file's layout
    mm_weight_t plain[7], packed[7];
    size_t bytes = 0;
    uint64_t seed = 3;
    float *f = malloc(5632 * sizeof(float)); // (cols) one row before quantizing
    for (int i = 0; i < 7; i++) {
        const size_t rb = qtype_row_size(QT_Q4_0, shp[i][1]);
        data[i] = malloc(rb * (size_t)shp[i][0]);
        for (int64_t r = 0; r < shp[i][0]; r++) {
            for (int64_t c = 0; c < shp[i][1]; c++) f[c] = (float)((double)(mlm_rng_next(&seed) >> 11) / 9007199254740992.0 - 0.5);
            quant_quantize_ref(QT_Q4_0, f, data[i] + (size_t)r * rb, shp[i][1]);
        }
        bytes += rb * (size_t)shp[i][0];
        mm_weight_init(&plain[i], k, QT_Q4_0, shp[i][0], shp[i][1], data[i], false);
    }
    free(f);
    double best_pack = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = mlm_now_ms();
        for (int i = 0; i < 7; i++) mm_weight_init(&packed[i], k, QT_Q4_0, shp[i][0], shp[i][1], data[i], true);
        const double ms = mlm_now_ms() - t0;
        if (ms < best_pack) best_pack = ms;
        if (r + 1 < reps)
            for (int i = 0; i < 7; i++) mm_weight_release(&packed[i]);
    }
    printf("\nrepacking a TinyLlama-1.1B block in Q4_0 (%.1f MB, isa %s): %.1f ms on one thread (%.0f MB/s)\n",
           (double)bytes / 1e6, k->isa, best_pack, (double)bytes / 1e3 / best_pack);
    void *xq = aligned_alloc(64, 5632 * 4 + 4096);
    float *x = malloc(5632 * sizeof(float)), *y = malloc(5632 * sizeof(float));
    for (int c = 0; c < 5632; c++) x[c] = (float)((double)(mlm_rng_next(&seed) >> 11) / 9007199254740992.0 - 0.5);
    printf("| threads | layout | block ms (nt=1) | GB/s |\n|---|---|---|---|\n");
    for (int nth = 1; nth <= 2; nth++) {
        tpool_t *pool = tpool_new(nth);
        for (int lay = 0; lay < 2; lay++) {
            mm_weight_t *ws = lay ? packed : plain;
            double best = 1e30;
            for (int r = 0; r < reps * 3; r++) {
                const double t0 = mlm_now_ms();
                for (int i = 0; i < 7; i++) {
                    mm_quantize_act(k, QT_Q4_0, x, xq, shp[i][1]);
                    mm_job_t j = {k, &ws[i], xq, y};
                    tpool_run(pool, mm_job, &j);
                }
                const double ms = mlm_now_ms() - t0;
                if (ms < best) best = ms;
            }
            printf("| %d | %s | %.2f | %.1f |\n", nth, lay ? "packed (repack)" : "file's rows", best,
                   (double)bytes / 1e6 / best);
        }
        tpool_destroy(&pool);
    }
    for (int i = 0; i < 7; i++) {
        mm_weight_release(&packed[i]);
        free(data[i]);
    }
    free(xq);
    free(x);
    free(y);
}

// --- main

int main(int argc, char **argv) {
    opts_t o = {.dir = "/var/tmp", .size = 2048 * MIB, .unit = 16 * MIB, .limit = 256 * MIB, .reps = 3, .tokens = 4};
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "-d")) o.dir = v;
        else if (!strcmp(a, "-s")) o.size = (uint64_t)atoll(v) * MIB;
        else if (!strcmp(a, "-u")) o.unit = (uint64_t)atoll(v) * MIB;
        else if (!strcmp(a, "-c")) o.limit = (uint64_t)atoll(v) * MIB;
        else if (!strcmp(a, "-r")) o.reps = atoi(v);
        else if (!strcmp(a, "-m")) o.model = v;
        else if (!strcmp(a, "-t")) o.tokens = atoi(v);
        else if (!strcmp(a, "-b")) o.budget = (uint64_t)atoll(v) * MIB;
        else {
            fprintf(stderr, "usage: %s [-d DIR] [-s MB] [-u MB] [-c LIMIT_MB] [-r REPS] [-m MODEL [-t TOKENS] [-b MB]]\n",
                    argv[0]);
            return 2;
        }
    }
    if (o.reps < 1 || o.reps > MAX_REPS || o.size < o.unit || o.unit < MIB || o.tokens < 1) {
        fprintf(stderr, "bench_io: bad options\n");
        return 2;
    }
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/meshlm-bench-io-%d.bin", o.dir, (int)getpid());
    const bool cg = memcg_probe(NULL, 0, err, sizeof err) > 0;
    printf("bench_io: %s, %.0f MB file, %.0f MiB per read, %d passes; cgroup limit %s\n", o.dir, (double)o.size / 1e6,
           (double)o.unit / MIB, o.reps, cg ? (o.limit ? "set" : "none (measuring only)") : err);
    if (cg && o.limit) printf("  (each method runs in a memory cgroup of %.0f MiB that counts the page cache)\n",
                              (double)o.limit / MIB);
    if (make_file(path, o.size) != 0) {
        fprintf(stderr, "bench_io: cannot write %s: %s\n", path, strerror(errno));
        unlink(path);
        return 1;
    }
    // Passes interleave the methods (pass 1 of each, then pass 2 ...), so that a drift of the machine
    // (other processes on its disk) does not favour one method.
    static const char *const ios[] = {"direct", "pread", "mmap"};
    const int n_rows = M_N + (o.model ? 3 : 0);
    double v[M_N + 3][MAX_REPS];
    uint64_t hwm[M_N + 3] = {0}, peak[M_N + 3] = {0};
    int n[M_N + 3] = {0};
    for (int r = 0; r < o.reps; r++)
        for (int m = 0; m < n_rows; m++) {
            const bool prov = m >= M_N;
            drop_cache(prov ? o.model : path);
            uint64_t pk;
            const report_t rep = prov ? in_child(&o, provider_child, 0, ios[m - M_N], &pk) : in_child(&o, raw_child, m, path, &pk);
            if (rep.rc != 0) continue;
            v[m][n[m]++] = rep.mb_s;
            if (rep.vmhwm > hwm[m]) hwm[m] = rep.vmhwm;
            if (pk > peak[m]) peak[m] = pk;
        }
    unlink(path);
    for (int m = 0; m < n_rows; m++) {
        if (m == 0) printf("\n| method | best MB/s | median MB/s | VmHWM MiB | cgroup peak MiB |\n|---|---|---|---|---|\n");
        if (m == M_N) {
            printf("\nwindow provider on %s, %d tokens, %s:\n", o.model, o.tokens,
                   o.budget ? "sized by its budget" : "2 buffers, nothing pinned");
            printf("| io | best MB/s | median MB/s | VmHWM MiB | cgroup peak MiB |\n|---|---|---|---|---|\n");
        }
        const char *label = m < M_N ? method_names[m] : ios[m - M_N];
        if (!n[m]) {
            printf("| %s | failed | | | |\n", label);
            continue;
        }
        qsort(v[m], (size_t)n[m], sizeof v[m][0], cmp_double);
        printf("| %s | %.0f | %.0f | %.1f | %s%.1f |\n", label, v[m][n[m] - 1], v[m][n[m] / 2], (double)hwm[m] / MIB,
               cg ? "" : "-", cg ? (double)peak[m] / MIB : 0.0);
    }
    fflush(stdout);
    bench_repack(o.reps);
    return 0;
}
