// Fill functions of the Arm NEON kernel files: each sets the entries it implements in a table.
#ifndef MESHLM_KERNELS_ARM_H
#define MESHLM_KERNELS_ARM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/kernels/kernels.h"
#include "worker/kernels/x86/x86_mm.h"

// Armv8-A Advanced SIMD (every AArch64 CPU): kern_neon.c
void kern_arm_neon_fill(kernels_t *k);
// The same kernels with the Armv8.2-A dot product (SDOT, HWCAP_ASIMDDP): kern_dotprod.c
void kern_arm_dotprod_fill(kernels_t *k);

// Packed 16-row Q4_0 groups (layout and contract of mmp_group_fn in x86_mm.h, which is not x86-only),
// the same bits as matmul.c's portable group kernel.
void mmp_q4_0x16_neon(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                      uint32_t mask);
void mmp_q4_0x16_dotprod(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                         uint32_t mask);

// Plain F32 / F16 rows (contract of mmp_float_avx2 in x86_mm.h): the same bits as matmul.c's portable
// float_dot_exact, so every table gives the same logits.
void mmp_float_neon(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                    float *y, size_t ys, int64_t n, bool tiled);
void mmp_float_dotprod(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                       float *y, size_t ys, int64_t n, bool tiled);

#endif
