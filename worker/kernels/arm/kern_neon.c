// Arm kernels for plain Armv8-A NEON (no dot product instructions): the bodies are in neon_body.h.
#define NEON_FILL kern_arm_neon_fill
#include "worker/kernels/arm/neon_body.h"
