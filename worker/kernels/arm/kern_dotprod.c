// Arm kernels for Armv8.2-A NEON with SDOT (built with +dotprod): the bodies are in neon_body.h.
#define NEON_FILL kern_arm_dotprod_fill
#define NEON_MMP_Q4_0 mmp_q4_0x16_dotprod
#define NEON_MM_FLOAT mmp_float_dotprod
#include "worker/kernels/arm/neon_body.h"
