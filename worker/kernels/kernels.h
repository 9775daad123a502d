// Kernel dispatch: per instruction set, the dot products and activation quantizers for each type.
#ifndef MESHLM_KERNELS_H
#define MESHLM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "worker/kernels/quant.h"

// *s = dot(w, x) over n elements; w of the weight type, x of its vec_dot_type.
typedef void (*kern_vec_dot_fn)(int64_t n, float *s, const void *w, const void *x);
// Converts n floats into an activation type (Q8_0, Q8_1, Q8_K, F16, BF16).
typedef void (*kern_from_float_fn)(const float *x, void *y, int64_t n);
// The sum of the n / 8 little-endian u64 words at p (64-byte aligned, n a multiple of 256), read with
// the widest loads the instruction set has and several streams at once, as the matmuls read weights: how
// fast one thread streams memory (8-byte loads measured 6-7 GB/s where 64-byte loads read 9-10, and four
// streams of them 11-13, as fast as the decode kernels read).
typedef uint64_t (*kern_read_sum_fn)(const void *p, size_t n);

// How a decode kernel (one token: every weight read once) walks its weights: how many streams side by
// side per thread, and how far ahead each is prefetched. More streams in flight hide memory latency on
// some cores; on others they defeat the hardware prefetchers, which follow a few long sequential streams
// best (README "Speed": on Intel Sapphire Rapids several streams were 1.16x one for Q4_0; on AMD Zen 5
// one stream, software-prefetched across rows, was 1.08-1.3x for every type). Results are the same bits
// either way: each output row keeps its own arithmetic.
typedef struct {
    const char *name;        // "intel" or "amd"
    int q4_groups;           // packed Q4_0 (16-row groups): groups walked side by side (1..4)
    int q4_pf;               // bytes ahead packed Q4_0 decode prefetches each stream (AVX-512; 0: none)
    int q8_groups;           // packed Q8_0: the same (1..2)
    int q8_pf;               // bytes ahead packed Q8_0 decode prefetches each stream when q8_groups > 1 (0:
                             // none); one group runs the group kernel, 2 KB ahead (its walk of one group
                             // read 8 KB ahead was 1.18x at 85 GB/s but 0.9x at 50 on Zen 5)
    int q6_rows;             // Q6_K rows per pass (1, 2 or 4)
    int q6_pf;               // super-blocks each Q6_K row is prefetched ahead (0: none)
    int f16_rows;            // F16 and BF16 rows per decode pass (1 or 4)
    int k_pf;                // bytes ahead repacked Q3_K and Q4_K decode prefetch their run of groups
                             // (AVX-512; 0: none; never past the run, whose end is another thread's rows)
} kern_tune_t;

typedef struct kernels {
    const char *isa;                          // "scalar", "avx2", "avx512", "neon", "neon-dotprod"
    kern_tune_t tune;                         // decode walk (the AVX-512 table's follows the CPU's vendor,
                                              // or $MESHLM_TUNE=intel|amd; the others' are intel's)
    kern_vec_dot_fn vec_dot[QT_COUNT];        // by weight type; NULL -> scalar reference
    kern_from_float_fn from_float[QT_COUNT];  // by activation type; NULL -> scalar reference
    kern_read_sum_fn read_sum;                // NULL -> plain C
} kernels_t;

// The decode tunings (kern_tune_t) measured best on Intel (several streams per thread for every type)
// and on AMD (one stream for every type).
kern_tune_t kern_tune_intel(void);
kern_tune_t kern_tune_amd(void);

// The best table this CPU runs. The environment variable MESHLM_ISA=scalar|avx2|avx512|neon|neon-dotprod forces
// one (falling back to the best available when the CPU lacks it). Never NULL.
const kernels_t *kernels_best(void);

// The table for one instruction set, or NULL when this CPU (or this build) lacks it.
const kernels_t *kernels_for_isa(const char *isa);

// Calls the table's vec_dot or the reference when it has none.
void kern_vec_dot(const kernels_t *k, qtype_t t, int64_t n, float *s, const void *w, const void *x);
// Calls the table's from_float or the reference when it has none.
void kern_from_float(const kernels_t *k, qtype_t act_type, const float *x, void *y, int64_t n);
// Calls the table's read_sum or plain C when it has none.
uint64_t kern_read_sum(const kernels_t *k, const void *p, size_t n);

#endif
