// Fill functions of the Arm NEON kernel files: each sets the entries it implements in a table.
#ifndef MESHLM_KERNELS_ARM_H
#define MESHLM_KERNELS_ARM_H

#include "worker/kernels/kernels.h"

// Armv8-A Advanced SIMD (every AArch64 CPU): kern_neon.c
void kern_arm_neon_fill(kernels_t *k);
// The same kernels with the Armv8.2-A dot product (SDOT, HWCAP_ASIMDDP): kern_dotprod.c
void kern_arm_dotprod_fill(kernels_t *k);

#endif
