// x86 kernels (q4k_avx512): repacked Q4_K and Q5_K groups (MMP_Q4_KX16, MMP_Q5_KX16) times Q8_K activation
// rows, AVX-512 VNNI.
//
// Every output keeps the bits of vec_dot_q4_K (k_avx512.c, llama.cpp's x86 order): per super-block,
// integer lane L (0..7) of a row sums scale(c) * q * x over elements 4L..4L+3 of each 32-element
// sub-block c, and is added into float lane L with one fma by d_w * d_x; the mins go into 4 float
// lanes (lane k: sub-blocks 2k and 2k + 1) by -d_x * dmin_w; at the end the 8 lanes are summed as
// hsum_ps_256 does and the 4 min lanes as its SSE tail. Here the zmm lanes are the 16 rows of a
// group instead: one zmm holds lane L of 16 rows, so the same per-row fmas and sums run 16 rows at
// a time, vertically, and no transposition is needed. The integer sums are exact (maddubs pairs
// of nibble x int8 stay far below i16 saturation), so their order is free.
//
// The scales and mins are unpacked once at load time (x86_mm.h), so a super-block costs per 16
// rows 8 shuffles for the scales, 32 loads of quants, and per token 64 maddubs + vpdpwssd pairs.
// Several tokens share each weight load and nibble split (a tile of tokens x 16 rows).
#include <immintrin.h>
#include <string.h>

#include "worker/kernels/x86/x86_mm.h"

// --- helpers

#define AI static inline __attribute__((always_inline))

#define Q4K_TILE_T 8 // activation rows per tile in the matrix-matrix case
#define Q4K_PF MMP_Q4K_SB_BYTES // bytes ahead one group's decode prefetches (a run of groups: the tuning's)

AI __m512i bcast_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// The 16 rows' scales of one sub-block (16 bytes at sc) as i16 pairs (s, s), dword n for row n:
// vpdpwssd then multiplies both i16 pair sums of row n's dword by its scale.
AI __m512i q4k_scale_pairs(const uint8_t *sc) {
    const __m512i v = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)sc));
    const __m512i idx = _mm512_set_epi32(
        (int)0x800f800f, (int)0x800e800e, (int)0x800d800d, (int)0x800c800c, (int)0x800b800b, (int)0x800a800a,
        (int)0x80098009, (int)0x80088008, (int)0x80078007, (int)0x80068006, (int)0x80058005, (int)0x80048004,
        (int)0x80038003, (int)0x80028002, (int)0x80018001, (int)0x80008000);
    return _mm512_shuffle_epi8(v, idx);
}

// The 16 mins pairs (m(2k), m(2k+1)) of pair k as i16, dword n for row n.
AI __m512i q4k_min_pairs(const uint8_t *sb, int k) {
    return _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *)(sb + MMP_Q4K_MINS + 32 * k)));
}

// Q5_K: 16 added to the low nibbles (sub-block 2j) and the high ones (2j + 1) of lane l where their
// 5th bit (bits 2j and 2j + 1 of the qh bytes) is set.
AI void q5_add_bits(const uint8_t *sb, int l, int j, __m512i m16, __m512i *lo, __m512i *hi) {
    const __m512i qh = _mm512_load_si512(sb + MMP_Q5K_QH + 64 * l);
    *lo = _mm512_mask_add_epi8(*lo, _mm512_test_epi8_mask(qh, _mm512_set1_epi8((char)(1 << (2 * j)))), *lo, m16);
    *hi = _mm512_mask_add_epi8(*hi, _mm512_test_epi8_mask(qh, _mm512_set1_epi8((char)(2 << (2 * j)))), *hi, m16);
}

// NT activation rows (1..8) against one group of 16 Q4_K rows: y[t * ys + n] for the rows n in m.
// Decode (NT = 1) prefetches the whole super-block pf bytes ahead (0: none) at the top of each one, but
// not at or past end: on AMD Zen 5 one burst of 37 lines read 37-38 GB/s a core and 47-48 with 2 threads
// at 51 GB/s of read bandwidth, where 5 lines spread over each of the 8 lanes read 34 and 41 (2026-12-04).
// Q5 (MMP_Q5_KX16): each nibble gains 16 where its 5th bit is set, and the mins go into one float per
// row (summs) instead of 4 lanes, as the Q5_K vec_dot adds them.
AI void q4k_tile(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                 __mmask16 m, size_t pf, const uint8_t *end, const int Q5) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m16 = _mm512_set1_epi8(0x10);
    const size_t sbb = Q5 ? MMP_Q5K_SB_BYTES : MMP_Q4K_SB_BYTES;
    const int lines = (int)(sbb / 64); // decode prefetch: the lines of a super-block
    __m512 acc[8][8], accm[8][4], summs[8]; // (token, lane) float lanes of the 16 rows; Q5_K's min sums
    const block_q8_K *xr[8]; // (token) activation rows, (nb) super-blocks each
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        xr[t] = (const block_q8_K *)(xq + (size_t)t * xs);
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) acc[t][l] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) accm[t][k] = _mm512_setzero_ps();
        summs[t] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *sb = grp + (size_t)b * sbb;
        if (NT == 1 && pf > 0 && sb + pf < end) // decode: the super-block pf bytes on, in one burst
            for (int p = 0; p < lines; p++) _mm_prefetch((const char *)sb + pf + 64 * p, _MM_HINT_T0);
        __m512i sc[8]; // (sub-block c) the 16 rows' scales as i16 pairs
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) sc[c] = q4k_scale_pairs(sb + MMP_Q4K_SCALES + 16 * c);
        const __m512 wd = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + MMP_Q4K_D)));
        __m512 dv[8]; // (token) x.d * d of the 16 rows
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) dv[t] = _mm512_mul_ps(_mm512_set1_ps(xr[t][b].d), wd); // x.d * d, as the reference
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) {
            __m512i s[8]; // (token) integer lane l of the 16 rows
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++) s[t] = _mm512_setzero_si512();
            if (NT == 1) { // decode: 4 independent chains per lane (the sums are exact: the same bits)
                __m512i c4[4];
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    const __m512i q = _mm512_load_si512(sb + 64 * (4 * l + j));
                    __m512i lo = _mm512_and_si512(q, m4);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
                    if (Q5) q5_add_bits(sb, l, j, m16, &lo, &hi);
                    const int8_t *xb = xr[0][b].qs + 64 * j + 4 * l;
                    const __m512i a = _mm512_madd_epi16(_mm512_maddubs_epi16(lo, bcast_i32(xb)), sc[2 * j]);
                    c4[j] = _mm512_dpwssd_epi32(a, _mm512_maddubs_epi16(hi, bcast_i32(xb + 32)), sc[2 * j + 1]);
                }
                s[0] = _mm512_add_epi32(_mm512_add_epi32(c4[0], c4[1]), _mm512_add_epi32(c4[2], c4[3]));
            } else
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m512i q = _mm512_load_si512(sb + 64 * (4 * l + j));
                __m512i lo = _mm512_and_si512(q, m4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
                if (Q5) q5_add_bits(sb, l, j, m16, &lo, &hi);
#pragma GCC unroll 8
                for (int t = 0; t < NT; t++) {
                    const int8_t *xb = xr[t][b].qs + 64 * j + 4 * l;
                    s[t] = _mm512_dpwssd_epi32(s[t], _mm512_maddubs_epi16(lo, bcast_i32(xb)), sc[2 * j]);
                    s[t] = _mm512_dpwssd_epi32(s[t], _mm512_maddubs_epi16(hi, bcast_i32(xb + 32)), sc[2 * j + 1]);
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++) acc[t][l] = _mm512_fmadd_ps(dv[t], _mm512_cvtepi32_ps(s[t]), acc[t][l]);
        }
        // the mins: pair k of each row times the sums of x over sub-blocks 2k and 2k + 1
        const __m512 wdm = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + MMP_Q4K_DMIN)));
        __m512i mp[4]; // (pair k) the 16 rows' mins of sub-blocks 2k, 2k + 1 as i16 pairs
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) mp[k] = q4k_min_pairs(sb, k);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const __m512 dmin = _mm512_mul_ps(_mm512_set1_ps(-xr[t][b].d), wdm);
            int32_t bs[4]; // (4) i16 pairs: sums of x over sub-blocks 2k, 2k + 1
            _mm_storeu_si128((__m128i *)bs, _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xr[t][b].bsums),
                                                           _mm_loadu_si128((const __m128i *)(xr[t][b].bsums + 8))));
            __m512i mall = _mm512_setzero_si512(); // Q5_K: the 4 pairs' exact sum
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m512i p = _mm512_madd_epi16(mp[k], _mm512_set1_epi32(bs[k]));
                if (Q5) mall = _mm512_add_epi32(mall, p);
                else accm[t][k] = _mm512_fmadd_ps(dmin, _mm512_cvtepi32_ps(p), accm[t][k]);
            }
            if (Q5) summs[t] = _mm512_fmadd_ps(dmin, _mm512_cvtepi32_ps(mall), summs[t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        const __m512 *a = acc[t], *n = accm[t];
        const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                       _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])));
        const __m512 mn = Q5 ? summs[t] : _mm512_add_ps(_mm512_add_ps(n[0], n[2]), _mm512_add_ps(n[1], n[3]));
        _mm512_mask_storeu_ps(y + (size_t)t * ys, m, _mm512_add_ps(r, mn));
    }
}

// --- public API

#define Q4K_PUBLIC(NAME, DECN, Q5, SBB)                                                                          \
    void DECN(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y, size_t pf) {  \
        const uint8_t *end = g0 + (size_t)ng * gstride;                                                        \
        for (int g = 0; g < ng; g++)                                                                           \
            q4k_tile(g0 + (size_t)g * gstride, nb, xq, 0, 1, y + (size_t)g * MMP_ROWS, 0, (__mmask16)0xffff, pf, \
                     end, Q5);                                                                                 \
    }                                                                                                          \
    void NAME(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,       \
              uint32_t mask) {                                                                                 \
        const __mmask16 m = (__mmask16)mask;                                                                   \
        for (int t = 0; t < nt;) {                                                                             \
            const int left = nt - t;                                                                           \
            const uint8_t *xt = xq + (size_t)t * xs;                                                           \
            float *yt = y + (size_t)t * ys;                                                                    \
            switch (left >= Q4K_TILE_T ? Q4K_TILE_T : left) {                                                  \
            case 8: q4k_tile(grp, nb, xt, xs, 8, yt, ys, m, 0, NULL, Q5); t += 8; break;                      \
            case 7: q4k_tile(grp, nb, xt, xs, 7, yt, ys, m, 0, NULL, Q5); t += 7; break;                      \
            case 6: q4k_tile(grp, nb, xt, xs, 6, yt, ys, m, 0, NULL, Q5); t += 6; break;                      \
            case 5: q4k_tile(grp, nb, xt, xs, 5, yt, ys, m, 0, NULL, Q5); t += 5; break;                      \
            case 4: q4k_tile(grp, nb, xt, xs, 4, yt, ys, m, 0, NULL, Q5); t += 4; break;                      \
            case 3: q4k_tile(grp, nb, xt, xs, 3, yt, ys, m, 0, NULL, Q5); t += 3; break;                      \
            case 2: q4k_tile(grp, nb, xt, xs, 2, yt, ys, m, 0, NULL, Q5); t += 2; break;                      \
            default: q4k_tile(grp, nb, xt, xs, 1, yt, ys, m, Q4K_PF, grp + (size_t)nb * (SBB), Q5); t += 1; break; \
            }                                                                                                  \
        }                                                                                                      \
    }

Q4K_PUBLIC(mmp_q4_kx16_avx512, mmp_q4_kx16_decn_avx512, 0, MMP_Q4K_SB_BYTES)
Q4K_PUBLIC(mmp_q5_kx16_avx512, mmp_q5_kx16_decn_avx512, 1, MMP_Q5K_SB_BYTES)
