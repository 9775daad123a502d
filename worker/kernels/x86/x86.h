// Fill functions of the x86 kernel files: each sets the entries it implements in a table.
#ifndef MESHLM_KERNELS_X86_H
#define MESHLM_KERNELS_X86_H

#include "worker/kernels/kernels.h"

// Plain and legacy-quant types (F32, F16, BF16, Q4_0, Q8_0, activation quantizers): q_*.c
void kern_x86_q_avx2_fill(kernels_t *k);
void kern_x86_q_avx512_fill(kernels_t *k);
// K-quants and the other legacy quants (Q4_1, Q5_0, Q5_1, Q2_K..Q6_K): k_*.c
void kern_x86_k_avx2_fill(kernels_t *k);
void kern_x86_k_avx512_fill(kernels_t *k);

#endif
