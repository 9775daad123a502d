// Helpers shared by the x86 K-quant kernel files (k_avx2.c, k_avx512.c, both built with AVX2): scale unpacking.
#ifndef MESHLM_KERNELS_X86_K_COMMON_H
#define MESHLM_KERNELS_X86_K_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "worker/kernels/quant.h"

// --- Q4_K / Q5_K scales

// Unpacks the 12 scale bytes of a Q4_K/Q5_K super-block into 8 6-bit scales (*sc, byte k = scale of
// sub-block k) and 8 6-bit mins (*mn, same order). Bytes 0..3 hold scales 0..3 (low 6 bits), bytes
// 4..7 mins 0..3; bytes 8..11 hold the low nibbles of scales 4..7 (low) and mins 4..7 (high), whose
// top 2 bits are the top bits of bytes 0..3 (scales) and 4..7 (mins).
static inline void kq_unpack_scales_k4(const uint8_t *p, uint64_t *sc, uint64_t *mn) {
    uint32_t a, b, c;
    memcpy(&a, p, 4);
    memcpy(&b, p + 4, 4);
    memcpy(&c, p + 8, 4);
    const uint32_t sc_lo = a & 0x3f3f3f3fu;
    const uint32_t mn_lo = b & 0x3f3f3f3fu;
    const uint32_t sc_hi = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
    *sc = sc_lo | (uint64_t)sc_hi << 32;
    *mn = mn_lo | (uint64_t)mn_hi << 32;
}

// The same unpacking in SSE/AVX2 registers: returns 16 bytes, scales 0..7 then mins 0..7. Reads 16
// bytes at p (the 12 scale bytes and the first 4 quant bytes that follow them in the block).
static inline __m128i kq_scales_mins_k4(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);           // dwords a, b, c, (quants)
    const __m128i t1 = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)); // a, c, b, c
    const __m128i t2 = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)); // a, a, b, b
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(t1, _mm_set_epi32(4, 0, 0, 0)),
                                     _mm_set_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi32(t2, 2), _mm_set_epi32(0x30303030, 0, 0x30303030, 0));
    return _mm_or_si128(lo, hi);
}

// Two f16 at p (d, dmin of a K-quant block) times the activation scale: lanes 0, 1 = d * xd, dmin * xd.
static inline __m128 kq_d_dmin(const void *p, float xd) {
    uint32_t u;
    memcpy(&u, p, 4);
    return _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)u)), _mm_set1_ps(xd));
}

// --- Q3_K scales

// Unpacks the 12 scale bytes of a Q3_K super-block into 16 signed scales (6-bit value - 32), one per
// group of 16 elements, written to out[16]. Bytes 0..7 carry the low nibbles (scales 0..7 in the low
// halves, 8..15 in the high halves), bytes 8..11 the top 2 bits, 4 per byte.
static inline void kq_unpack_scales_q3(const uint8_t *p, int8_t out[16]) {
    uint32_t a0, a1, t;
    memcpy(&a0, p, 4);
    memcpy(&a1, p + 4, 4);
    memcpy(&t, p + 8, 4);
    uint32_t v[4];
    v[0] = (a0 & 0x0f0f0f0fu) | ((t & 0x03030303u) << 4);
    v[1] = (a1 & 0x0f0f0f0fu) | (((t >> 2) & 0x03030303u) << 4);
    v[2] = ((a0 >> 4) & 0x0f0f0f0fu) | (((t >> 4) & 0x03030303u) << 4);
    v[3] = ((a1 >> 4) & 0x0f0f0f0fu) | (((t >> 6) & 0x03030303u) << 4);
    uint8_t u[16];
    memcpy(u, v, 16);
    for (int i = 0; i < 16; i++) out[i] = (int8_t)(u[i] - 32);
}

#endif
