// Node profiling: measured matmul throughput per weight type, memory and disk read bandwidth.
#ifndef MESHLM_PROFILE_H
#define MESHLM_PROFILE_H

#include <stdint.h>

#include "worker/kernels/quant.h"

#define PROFILE_MAX_TYPES 8

typedef struct {
    int n_types;
    qtype_t type[PROFILE_MAX_TYPES];    // weight types measured
    double gflops[PROFILE_MAX_TYPES];   // decode matrix-vector throughput (2 flops per weight)
    double mem_bw;                      // bytes/s streamed by all threads
    double disk_bw;                     // bytes/s reading the model file from the disk (0 when none)
    int n_threads;                      // threads used
} profile_t;

// Measures this machine with n_threads (0 = all cores) in about budget_ms. model_path (or NULL) is
// read for the disk figure: 64 MiB of it from the disk, not the page cache (O_DIRECT, or where the
// file system refuses that, buffered after dropping the file's cached pages), 16 MiB per call like
// the weight window. Its one buffer (memory stream and disk reads) is profile_stream_bytes(), at
// most half of a mem_budget (0 = none) and at least 1 MiB. Returns 0 or MLM_ENOMEM.
int profile_node(profile_t *p, int n_threads, const char *model_path, int budget_ms, uint64_t mem_budget);

// Bytes of the memory stream's buffer without a budget: twice the CPU's last-level cache (a buffer
// the cache holds measures the cache), at most an eighth of the RAM, 64 to 256 MiB.
uint64_t profile_stream_bytes(void);

// Throughput for a type (or, when it was not measured, the mean of the measured ones).
double profile_gflops(const profile_t *p, qtype_t t);

#endif
