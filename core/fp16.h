// Half (IEEE binary16) and bfloat16 conversions, scalar and exact (round to nearest even).
#ifndef MESHLM_FP16_H
#define MESHLM_FP16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t mlm_f16_t;   // IEEE binary16 bits
typedef uint16_t mlm_bf16_t;  // bfloat16 bits (top half of a float32)

static inline float mlm_bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t mlm_f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// binary16 -> float32, exact for every input including subnormals, inf and NaN.
static inline float mlm_f16_to_f32(mlm_f16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return mlm_bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return mlm_bits_to_f32(sign);
        // subnormal: value = man * 2^-24
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return mlm_bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// float32 -> binary16 with round to nearest even (what F16C's vcvtps2ph does with mode 0).
static inline mlm_f16_t mlm_f32_to_f16(float f) {
    uint32_t x = mlm_f32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (mlm_f16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u) return (mlm_f16_t)(sign | 0x7c00u); // rounds to >= 65520: overflow to inf
    if (ax < 0x38800000u) { // below the smallest normal half: subnormal or zero
        if (ax < 0x33000000u) return (mlm_f16_t)sign; // < 2^-25: rounds to zero
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; // 14 + (112 - e) ... number of bits dropped: (126 - e)
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (mlm_f16_t)(sign | r);
    }
    uint32_t r = ax - 0x38000000u; // rebias exponent 127 -> 15
    uint32_t out = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) out++;
    return (mlm_f16_t)(sign | out);
}

static inline float mlm_bf16_to_f32(mlm_bf16_t h) { return mlm_bits_to_f32((uint32_t)h << 16); }

// float32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
static inline mlm_bf16_t mlm_f32_to_bf16(float f) {
    uint32_t u = mlm_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (mlm_bf16_t)((u >> 16) | 64u);
    return (mlm_bf16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

#endif
