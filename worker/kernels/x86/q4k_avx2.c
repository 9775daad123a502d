// x86 kernels (q4k_avx2): repacked Q4_K groups (MMP_Q4_KX16) times Q8_K activation rows, AVX2.
//
// The same per-row lanes and float order as q4k_avx512.c (and so the bits of vec_dot_q4_K), with
// a ymm holding lane L of 8 rows: a 16-row group is computed as two halves of 8 rows, and the
// scales are applied with madd + add instead of vpdpwssd (the same exact integers).
#include <immintrin.h>
#include <string.h>

#include "worker/kernels/x86/x86_mm.h"

// --- helpers

#define AI static inline __attribute__((always_inline))

#ifndef Q4K_PF2
#define Q4K_PF2 (2 * MMP_Q4K_SB_BYTES) // bytes ahead decode prefetches (0: none)
#endif
#ifndef Q4K_TILE_T2
#define Q4K_TILE_T2 4 // activation rows per tile in the matrix-matrix case (best measured: 4 > 2 > 1)
#endif

AI __m256i bcast_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// Scales of one sub-block of rows 8h..8h+7 (the group's 16 bytes at sc) as i16 pairs (s, s).
AI __m256i q4k_scale_pairs(const uint8_t *sc, int h) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)sc));
    const int r = 8 * h;
    const __m256i idx = _mm256_setr_epi32(
        (int)(0x80008000u | (uint32_t)(r + 0) * 0x10001u), (int)(0x80008000u | (uint32_t)(r + 1) * 0x10001u),
        (int)(0x80008000u | (uint32_t)(r + 2) * 0x10001u), (int)(0x80008000u | (uint32_t)(r + 3) * 0x10001u),
        (int)(0x80008000u | (uint32_t)(r + 4) * 0x10001u), (int)(0x80008000u | (uint32_t)(r + 5) * 0x10001u),
        (int)(0x80008000u | (uint32_t)(r + 6) * 0x10001u), (int)(0x80008000u | (uint32_t)(r + 7) * 0x10001u));
    return _mm256_shuffle_epi8(v, idx);
}

// NT activation rows (1..4) against rows 8h..8h+7 of one Q4_K group; out[t][n] for row 8h + n.
AI void q4k_half(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, int h, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[4][8], accm[4][4]; // (token, lane) float lanes of the 8 rows
    const block_q8_K *xr[4]; // (token) activation rows, (nb) super-blocks each
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        xr[t] = (const block_q8_K *)(xq + (size_t)t * xs);
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) acc[t][l] = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) accm[t][k] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *sb = grp + (size_t)b * MMP_Q4K_SB_BYTES;
        if (NT == 1 && h == 0 && Q4K_PF2 > 0) // decode: the first half streams the group in (the second finds it cached)
#pragma GCC unroll 37
            for (int l = 0; l < MMP_Q4K_SB_BYTES / 64; l++) _mm_prefetch((const char *)sb + Q4K_PF2 + 64 * l, _MM_HINT_T0);
        __m256i sc[8]; // (sub-block c) the 8 rows' scales as i16 pairs
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) sc[c] = q4k_scale_pairs(sb + MMP_Q4K_SCALES + 16 * c, h);
        const __m256 wd = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(sb + MMP_Q4K_D + 16 * h)));
        const __m256 wdm = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(sb + MMP_Q4K_DMIN + 16 * h)));
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) {
            __m256i s[4]; // (token) integer lane l of the 8 rows
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) s[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m256i q = _mm256_load_si256((const __m256i *)(sb + 64 * (4 * l + j) + 32 * h));
                const __m256i lo = _mm256_and_si256(q, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
#pragma GCC unroll 4
                for (int t = 0; t < NT; t++) {
                    const int8_t *xb = xr[t][b].qs + 64 * j + 4 * l;
                    const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bcast_i32(xb)), sc[2 * j]);
                    const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bcast_i32(xb + 32)), sc[2 * j + 1]);
                    s[t] = _mm256_add_epi32(s[t], _mm256_add_epi32(plo, phi));
                }
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                const __m256 d = _mm256_mul_ps(_mm256_set1_ps(xr[t][b].d), wd); // x.d * d, as the reference
                acc[t][l] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s[t]), acc[t][l]);
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const __m256 dmin = _mm256_mul_ps(_mm256_set1_ps(-xr[t][b].d), wdm);
            int32_t bs[4]; // (4) i16 pairs: sums of x over sub-blocks 2k, 2k + 1
            _mm_storeu_si128((__m128i *)bs, _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xr[t][b].bsums),
                                                           _mm_loadu_si128((const __m128i *)(xr[t][b].bsums + 8))));
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i mp = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *)(sb + MMP_Q4K_MINS + 32 * k + 16 * h)));
                const __m256i p = _mm256_madd_epi16(mp, _mm256_set1_epi32(bs[k]));
                accm[t][k] = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(p), accm[t][k]);
            }
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        const __m256 *a = acc[t], *n = accm[t];
        const __m256 r = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
                                       _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])));
        const __m256 mn = _mm256_add_ps(_mm256_add_ps(n[0], n[2]), _mm256_add_ps(n[1], n[3]));
        _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(r, mn));
    }
}

// NT activation rows against the rows of one group selected by mask (each half only when needed).
AI void q4k_tile(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                 uint32_t mask) {
    float out[4 * 8]; // (NT, 8) one half's outputs
    for (int h = 0; h < 2; h++) {
        if (!(mask >> (8 * h) & 0xffu)) continue;
        q4k_half(grp, nb, xq, xs, NT, h, out);
        for (int t = 0; t < NT; t++)
            for (int n = 0; n < 8; n++)
                if (mask >> (8 * h + n) & 1u) y[(size_t)t * ys + 8 * h + n] = out[8 * t + n];
    }
}

// --- public API

void mmp_q4_kx16_avx2(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                      uint32_t mask) {
    for (int t = 0; t < nt;) {
        const int left = nt - t;
        const uint8_t *xt = xq + (size_t)t * xs;
        float *yt = y + (size_t)t * ys;
        switch (left >= Q4K_TILE_T2 ? Q4K_TILE_T2 : left) {
#if Q4K_TILE_T2 >= 4
        case 4: q4k_tile(grp, nb, xt, xs, 4, yt, ys, mask); t += 4; break;
        case 3: q4k_tile(grp, nb, xt, xs, 3, yt, ys, mask); t += 3; break;
#endif
        case 2: q4k_tile(grp, nb, xt, xs, 2, yt, ys, mask); t += 2; break;
        default: q4k_tile(grp, nb, xt, xs, 1, yt, ys, mask); t += 1; break;
        }
    }
}
