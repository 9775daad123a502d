// x86 kernels (k_avx512): SIMD dot products tested against the scalar references in worker/quant.c.
#include "x86.h"

void kern_x86_k_avx512_fill(kernels_t *k) {
    (void)k;
}
