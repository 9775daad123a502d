// Benchmark of each type's decode kernel on its own: one activation row against a weight matrix that stays in cache.
//
// usage: bench_decode [-t TYPES] [-r REPS]   e.g. -t F16,Q8_0,Q4_0,Q4_K,Q6_K -r 400
// MESHLM_ISA=scalar|avx2|avx512 picks the kernel table. The matrix (256 x 2048) fits in L2, so this
// measures how fast the kernel can consume weight bytes when memory is not the limit: decode reaches
// the read bandwidth only when this rate is well above the bandwidth per core. Time is the thread's
// CPU time (best of 5 batches of REPS products), so other processes on a shared machine disturb it
// far less than wall time (a cache evicted by a context switch still costs).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "worker/kernels/matmul.h"

// --- helpers

#define ROWS 256
#define COLS 2048

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

// Fills x (n) with reproducible values in [-1, 1).
static void fill_floats(float *x, int64_t n, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((int)(seed >> 40) % 2000 - 1000) / 1000.0f;
    }
}

// Bytes per CPU second one thread's decode kernel consumes for type t, or a negative value on failure.
static double rate(const kernels_t *k, qtype_t t, int reps, float *y0) {
    const size_t rb = qtype_row_size(t, COLS);
    float *wf = malloc(sizeof(float) * ROWS * COLS);           // (ROWS, COLS)
    uint8_t *w = aligned_alloc(64, (rb * ROWS + 63) / 64 * 64); // (ROWS, rb)
    const size_t xb = (mm_act_row_bytes(t, COLS) + 63) / 64 * 64;
    uint8_t *xq = aligned_alloc(64, xb);                       // (xb) one activation row
    float *y = malloc(sizeof(float) * ROWS);                   // (ROWS)
    double best = -1.0;
    mm_weight_t mw = {0};
    if (!wf || !w || !xq || !y) goto done;
    fill_floats(wf, (int64_t)ROWS * COLS, 1);
    for (int64_t r = 0; r < ROWS; r++)
        if (quant_quantize_ref(t, wf + r * COLS, w + (size_t)r * rb, COLS) != 0) goto done;
    if (mm_weight_init(&mw, k, t, ROWS, COLS, w, true) != 0) goto done;
    mm_quantize_act(k, t, wf, xq, COLS);
    mm_rows(k, &mw, xq, xb, 1, y, ROWS, 0, ROWS);
    for (int a = 0; a < 5; a++) {
        const double t0 = cpu_seconds();
        for (int i = 0; i < reps; i++) mm_rows(k, &mw, xq, xb, 1, y, ROWS, 0, ROWS);
        const double dt = cpu_seconds() - t0;
        if (dt > 0 && (best < 0 || dt < best)) best = dt;
    }
    *y0 = y[0];
    if (best > 0) best = (double)rb * ROWS * reps / best;
done:
    mm_weight_release(&mw);
    free(wf);
    free(w);
    free(xq);
    free(y);
    return best;
}

// --- main

int main(int argc, char **argv) {
    const char *types = "F16,Q8_0,Q4_0,Q4_K,Q6_K";
    int reps = 400;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "-t") == 0) types = argv[i + 1];
        else if (strcmp(argv[i], "-r") == 0) reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [-t TYPES] [-r REPS]\n", argv[0]);
            return 2;
        }
    }
    if (reps < 1) reps = 1;
    const kernels_t *k = kernels_best();
    printf("decode kernels in cache, isa=%s, %dx%d matrix, 1 thread, thread CPU time\n", k->isa, ROWS, COLS);
    char list[256];
    snprintf(list, sizeof list, "%s", types);
    for (char *save = NULL, *s = strtok_r(list, ",", &save); s; s = strtok_r(NULL, ",", &save)) {
        const int t = qtype_from_name(s);
        float y0 = 0.0f;
        const double r = t < 0 ? -1.0 : rate(k, (qtype_t)t, reps, &y0);
        if (r < 0) printf("  %-5s (no kernel)\n", s);
        else printf("  %-5s %6.1f GB/s per core   (y[0] = %.6g)\n", s, r * 1e-9, y0);
    }
    return 0;
}
