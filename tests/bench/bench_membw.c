// Benchmark of the machine's DRAM read bandwidth: threads summing disjoint slices of a large buffer.
//
// usage: bench_membw [-s MB] [-j THREADS] [-r REPS]   e.g. -s 2048 -j 1,2 -r 7
// Each pass has every thread sum its contiguous slice (kern_read_sum of the best kernel table: 64-byte
// loads with AVX-512, 32 with AVX2, else plain C, as the node profile reads) of a buffer much larger
// than the caches; the pass time is from the first
// thread's start to the last thread's end. Prints the best and the median pass in GB/s (1e9 bytes/s),
// the ceiling decode (which reads every weight once per token) is compared with.
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core/clock.h"
#include "worker/kernels/kernels.h"

// --- types

#define MAX_THREADS 64

typedef struct {
    const uint8_t *p;        // this thread's slice, (n) bytes
    size_t n;                // bytes, a multiple of 256
    const kernels_t *k;      // the kernels' read_sum (the node profile's memory stream)
    uint64_t sum;            // result, kept so the loads cannot be dropped
} slice_t;

// --- helpers

static void *slice_run(void *arg) {
    slice_t *s = arg;
    s->sum = kern_read_sum(s->k, s->p, s->n);
    return NULL;
}

// One pass of nth threads over buf (bytes); returns its seconds, or -1 when a thread fails to start.
static double pass(const uint8_t *buf, size_t bytes, int nth, const kernels_t *k, uint64_t *sink) {
    pthread_t th[MAX_THREADS];
    slice_t sl[MAX_THREADS];
    const size_t per = (bytes / (size_t)nth) & ~(size_t)255;
    const int64_t t0 = mlm_now_us();
    int started = 0;
    for (int i = 0; i < nth; i++) {
        sl[i] = (slice_t){.p = buf + (size_t)i * per, .n = per, .k = k};
        if (pthread_create(&th[i], NULL, slice_run, &sl[i]) != 0) break;
        started++;
    }
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        *sink += sl[i].sum;
    }
    if (started != nth) return -1.0;
    return (double)(mlm_now_us() - t0) * 1e-6 * ((double)bytes / (double)(per * (size_t)nth));
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

// --- main

int main(int argc, char **argv) {
    size_t mb = 2048;
    const char *threads = "1,2";
    int reps = 7;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "-s") == 0) mb = (size_t)atol(argv[i + 1]);
        else if (strcmp(argv[i], "-j") == 0) threads = argv[i + 1];
        else if (strcmp(argv[i], "-r") == 0) reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [-s MB] [-j THREADS] [-r REPS]\n", argv[0]);
            return 2;
        }
    }
    if (mb < 16 || reps < 1 || reps > 1000) {
        fprintf(stderr, "bench_membw: -s needs >= 16 MB and -r 1..1000\n");
        return 2;
    }
    __builtin_cpu_init();
    const kernels_t *k = kernels_best(); // its read_sum: the widest loads (MESHLM_ISA picks another)
    const size_t bytes = mb << 20;
    uint8_t *buf = NULL; // (bytes)
    if (posix_memalign((void **)&buf, (size_t)2 << 20, bytes) != 0) {
        fprintf(stderr, "bench_membw: cannot allocate %zu MB\n", mb);
        return 1;
    }
#ifdef MADV_HUGEPAGE
    (void)madvise(buf, bytes, MADV_HUGEPAGE); // a hint: as the packed weights get
#endif
    for (size_t i = 0; i < bytes; i += 8) {
        const uint64_t v = i * 0x9e3779b97f4a7c15ull;
        memcpy(buf + i, &v, 8);
    }
    printf("read bandwidth, %zu MB buffer, %s loads, %d passes\n", mb, k->isa, reps);
    printf("  %-7s %10s %10s\n", "threads", "best GB/s", "med GB/s");
    uint64_t sink = 0;
    double secs[1000]; // (reps)
    for (const char *t = threads; *t;) {
        const int nth = atoi(t);
        if (nth < 1 || nth > MAX_THREADS) {
            fprintf(stderr, "bench_membw: threads must be 1..%d\n", MAX_THREADS);
            free(buf);
            return 2;
        }
        (void)pass(buf, bytes, nth, k, &sink); // warm-up
        for (int r = 0; r < reps; r++) secs[r] = pass(buf, bytes, nth, k, &sink);
        qsort(secs, (size_t)reps, sizeof secs[0], cmp_double);
        if (secs[0] <= 0) {
            fprintf(stderr, "bench_membw: cannot start %d threads\n", nth);
            free(buf);
            return 1;
        }
        printf("  %-7d %10.1f %10.1f\n", nth, (double)bytes / secs[0] * 1e-9, (double)bytes / secs[reps / 2] * 1e-9);
        const char *c = strchr(t, ',');
        t = c ? c + 1 : t + strlen(t);
    }
    printf("  (checksum %llx)\n", (unsigned long long)sink);
    free(buf);
    return 0;
}
