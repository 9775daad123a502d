// Arm kernels for Armv8.2-A NEON with SDOT (built with +dotprod): the bodies are in neon_body.h.
#define NEON_FILL kern_arm_dotprod_fill
#include "worker/kernels/arm/neon_body.h"
