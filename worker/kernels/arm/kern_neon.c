// Arm kernels for plain Armv8-A NEON (no dot product instructions): the bodies are in neon_body.h.
#define NEON_FILL kern_arm_neon_fill
#define NEON_MMP_Q4_0 mmp_q4_0x16_neon
#define NEON_MM_FLOAT mmp_float_neon
#include "worker/kernels/arm/neon_body.h"
