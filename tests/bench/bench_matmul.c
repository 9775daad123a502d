// Benchmark of mm_rows on TinyLlama-1.1B shapes: GB/s streamed at nt=1, GMAC/s at nt=64, model tokens/s.
//
// usage: bench_matmul [-t TYPES] [-j THREADS] [-r REPS] [-d 1] [-c 1] [-p 0]   e.g. -t Q4_0,Q8_0 -j 1,2 -r 5
// (-d 1: decode only, skips nt=64; -c 1: every pass reads the first copy of each shape, so the weights
// come from the caches and the GB/s is the kernel's compute ceiling, not DRAM's; -p 0: plain rows, not
// repacked, in malloc'd memory)
// MESHLM_ISA=scalar|avx2|avx512 picks the kernel table. Every layer gets its own copy of each
// matrix (22 layers x q,k,v,o,gate,up,down + output, as in the model), so nt=1 streams from DRAM
// rather than from the 32 MB L3. Activations are quantized before timing starts.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "worker/kernels/matmul.h"
#include "worker/kernels/threadpool.h"

// --- types

#define N_LAYER 22
#define NT_PROMPT 64

typedef struct {
    const char *name;   // tensor names in the model
    int64_t rows, cols; // output x input features
    int per_layer;      // matrices of this shape per layer (0: one for the whole model)
} shape_t;

static const shape_t shapes[] = {
    {"attn_q/o  2048x2048", 2048, 2048, 2},
    {"attn_k/v   256x2048", 256, 2048, 2},
    {"ffn_gate/up 5632x2048", 5632, 2048, 2},
    {"ffn_down  2048x5632", 2048, 5632, 1},
    {"output   32000x2048", 32000, 2048, 0},
};
#define N_SHAPE (sizeof shapes / sizeof shapes[0])

typedef struct {
    int n;              // copies
    mm_weight_t *w;     // (n)
    void **data;        // (n) plain rows still referenced by unpacked weights, else NULL
} stack_t_;

typedef struct {
    const kernels_t *k;
    const mm_weight_t *w;
    const uint8_t *xq;  // (nt, xs)
    size_t xs;
    int nt;
    float *y;           // (nt, ys)
    size_t ys;
} job_t;

static int cache_resident; // -c 1: every copy index reads copy 0
static bool repack = true;  // -p 0: plain rows (the file's layout, as meshlm --no-repack)

// --- helpers

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng_next(uint64_t *st) {
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill_floats(float *x, int64_t n, uint64_t seed) { // x: (n)
    uint64_t st = seed;
    for (int64_t i = 0; i < n; i++) x[i] = (float)((double)(rng_next(&st) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

// Splits rows between threads at multiples of row_align.
static void job_run(void *arg, int ith, int nth) {
    const job_t *j = arg;
    const int64_t a = j->w->row_align, groups = (j->w->rows + a - 1) / a;
    const int64_t per = (groups + nth - 1) / nth;
    int64_t r0 = ith * per * a, r1 = (ith + 1) * per * a;
    if (r1 > j->w->rows) r1 = j->w->rows;
    if (r0 < r1) mm_rows(j->k, j->w, j->xq, j->xs, j->nt, j->y, j->ys, r0, r1);
}

static int stack_build(stack_t_ *s, const kernels_t *k, qtype_t t, const shape_t *sh, uint64_t seed) {
    const int64_t tmpl_rows = 64;
    const size_t rb = qtype_row_size(t, sh->cols);
    float *f = malloc(sizeof(float) * tmpl_rows * sh->cols);
    uint8_t *tmpl = malloc(rb * tmpl_rows); // (tmpl_rows, rb)
    if (!f || !tmpl) return -1;
    fill_floats(f, tmpl_rows * sh->cols, seed);
    for (int64_t r = 0; r < tmpl_rows; r++) quant_quantize_ref(t, f + r * sh->cols, tmpl + r * rb, sh->cols);
    free(f);
    s->n = sh->per_layer ? sh->per_layer * N_LAYER : 1;
    s->w = calloc(s->n, sizeof *s->w);
    s->data = calloc(s->n, sizeof *s->data);
    if (!s->w || !s->data) return -1;
    for (int c = 0; c < s->n; c++) {
        uint8_t *d = malloc(rb * sh->rows); // (rows, rb)
        if (!d) return -1;
        for (int64_t r = 0; r < sh->rows; r++) memcpy(d + r * rb, tmpl + (r % tmpl_rows) * rb, rb);
        if (mm_weight_init(&s->w[c], k, t, sh->rows, sh->cols, d, repack) != 0) return -1;
        if (s->w[c].packed) free(d);
        else s->data[c] = d;
    }
    free(tmpl);
    return 0;
}

static void stack_free(stack_t_ *s) {
    for (int c = 0; c < s->n; c++) {
        mm_weight_release(&s->w[c]);
        free(s->data[c]);
    }
    free(s->w);
    free(s->data);
    memset(s, 0, sizeof *s);
}

// Best-of-reps seconds for one pass over every copy of a shape.
static double time_shape(tpool_t *pool, job_t *j, const stack_t_ *s, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (int c = 0; c < s->n; c++) {
            j->w = &s->w[cache_resident ? 0 : c];
            tpool_run(pool, job_run, j);
        }
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

// Best-of-reps seconds for the model order: per layer q, k, v, o, gate, up, down; then output.
static double time_model(tpool_t *pool, job_t *jobs, const stack_t_ *st, int reps) {
    static const int order[7][2] = {{0, 0}, {1, 0}, {1, 1}, {0, 1}, {2, 0}, {2, 1}, {3, 0}}; // (shape, copy in layer)
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (int l = 0; l < N_LAYER; l++)
            for (int m = 0; m < 7; m++) {
                const int sh = order[m][0];
                job_t *j = &jobs[sh];
                j->w = &st[sh].w[cache_resident ? 0 : l * shapes[sh].per_layer + order[m][1]];
                tpool_run(pool, job_run, j);
            }
        jobs[4].w = &st[4].w[0];
        tpool_run(pool, job_run, &jobs[4]);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

// --- main

int main(int argc, char **argv) {
    const char *types_arg = "Q4_0,Q8_0,Q4_K,Q6_K,F16", *threads_arg = "1,2";
    int reps = 3, decode_only = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "-t") == 0) types_arg = argv[i + 1];
        else if (strcmp(argv[i], "-j") == 0) threads_arg = argv[i + 1];
        else if (strcmp(argv[i], "-r") == 0) reps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "-d") == 0) decode_only = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "-c") == 0) cache_resident = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "-p") == 0) repack = atoi(argv[i + 1]) != 0;
        else {
            fprintf(stderr, "usage: %s [-t TYPES] [-j THREADS] [-r REPS] [-d 1] [-c 1] [-p 0]\n", argv[0]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    const kernels_t *k = kernels_best();
    printf("bench_matmul: isa=%s (%s) reps=%d (best of), TinyLlama-1.1B shapes, %d layers + output%s\n", k->isa, k->tune.name, reps, N_LAYER,
           cache_resident ? ", cache-resident (one copy of each shape)" : "");

    char tbuf[256];
    snprintf(tbuf, sizeof tbuf, "%s", types_arg);
    for (char *save = NULL, *tn = strtok_r(tbuf, ",", &save); tn; tn = strtok_r(NULL, ",", &save)) {
        int t = qtype_from_name(tn);
        const qtype_traits_t *tr = qtype_traits(t);
        if (!tr || !tr->has_kernels) {
            fprintf(stderr, "bench_matmul: no kernels for type %s\n", tn);
            return 2;
        }
        stack_t_ st[N_SHAPE];
        memset(st, 0, sizeof st);
        double model_bytes = 0, model_macs = 0;
        for (size_t s = 0; s < N_SHAPE; s++) {
            if (stack_build(&st[s], k, t, &shapes[s], 11 + s) != 0) {
                fprintf(stderr, "bench_matmul: out of memory building %s\n", shapes[s].name);
                return 1;
            }
            model_bytes += (double)st[s].n * qtype_row_size(t, shapes[s].cols) * shapes[s].rows;
            model_macs += (double)st[s].n * shapes[s].rows * shapes[s].cols;
        }
        // activations (NT_PROMPT rows per input width) and outputs
        job_t jobs[N_SHAPE];
        uint8_t *xq[N_SHAPE];
        const size_t ys = 32000;
        float *y = malloc(sizeof(float) * NT_PROMPT * ys);
        for (size_t s = 0; s < N_SHAPE; s++) {
            const int64_t cols = shapes[s].cols;
            const size_t xs = mm_act_row_bytes(t, cols);
            float *x = malloc(sizeof(float) * cols);
            xq[s] = malloc(xs * NT_PROMPT);
            for (int i = 0; i < NT_PROMPT; i++) {
                fill_floats(x, cols, 1000 + i);
                mm_quantize_act(k, t, x, xq[s] + i * xs, cols);
            }
            free(x);
            jobs[s] = (job_t){.k = k, .xq = xq[s], .xs = xs, .y = y, .ys = ys};
        }
        printf("\n%s: %.0f MB of weights per token (%s)\n", tr->name, model_bytes / 1e6,
               st[0].w[0].pack ? "repacked 16-row groups" : "plain rows");
        printf("  %-3s %-22s %10s %8s %12s %8s\n", "thr", "shape", "nt=1 us", "GB/s", "nt=64 us", "GMAC/s");

        char jbuf[64];
        snprintf(jbuf, sizeof jbuf, "%s", threads_arg);
        for (char *s2 = NULL, *jn = strtok_r(jbuf, ",", &s2); jn; jn = strtok_r(NULL, ",", &s2)) {
            const int nth = atoi(jn);
            tpool_t *pool = tpool_new(nth);
            if (!pool) {
                fprintf(stderr, "bench_matmul: cannot start %d threads\n", nth);
                return 1;
            }
            for (size_t s = 0; s < N_SHAPE; s++) {
                const double bytes = (double)qtype_row_size(t, shapes[s].cols) * shapes[s].rows;
                const double macs = (double)shapes[s].rows * shapes[s].cols;
                jobs[s].nt = 1;
                double t1 = time_shape(pool, &jobs[s], &st[s], reps) / st[s].n;
                jobs[s].nt = NT_PROMPT;
                double t64 = decode_only ? 1e30 : time_shape(pool, &jobs[s], &st[s], reps) / st[s].n;
                if (decode_only)
                    printf("  %-3d %-22s %10.1f %8.1f\n", nth, shapes[s].name, t1 * 1e6, bytes / t1 / 1e9);
                else
                    printf("  %-3d %-22s %10.1f %8.1f %12.1f %8.1f\n", nth, shapes[s].name, t1 * 1e6, bytes / t1 / 1e9,
                           t64 * 1e6, macs * NT_PROMPT / t64 / 1e9);
            }
            for (size_t s = 0; s < N_SHAPE; s++) jobs[s].nt = 1;
            double m1 = time_model(pool, jobs, st, reps);
            for (size_t s = 0; s < N_SHAPE; s++) jobs[s].nt = NT_PROMPT;
            double m64 = decode_only ? 1e30 : time_model(pool, jobs, st, reps);
            printf("  %-3d model matmuls: decode %.1f tok/s (%.1f GB/s), prompt %.1f tok/s (%.1f GMAC/s)\n", nth,
                   1.0 / m1, model_bytes / m1 / 1e9, NT_PROMPT / m64, model_macs * NT_PROMPT / m64 / 1e9);
            fflush(stdout);
            tpool_destroy(&pool);
        }
        for (size_t s = 0; s < N_SHAPE; s++) {
            stack_free(&st[s]);
            free(xq[s]);
        }
        free(y);
    }
    return 0;
}
