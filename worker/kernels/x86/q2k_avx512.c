// x86 kernels (q2k_avx512): repacked Q2_K groups (MMP_Q2_KX16) times Q8_K activation rows, AVX-512 VNNI.
//
// The zmm lanes are the 16 rows of a group (x86_mm.h): a zmm of quants holds, per row, 4 consecutive
// elements of one 16-element sub-block in each of its 4 bit pairs. Decode masks each bit pair in place
// (q << 2j, no shift) and feeds it to vpdpbusd against the broadcast activation dword, into one i32
// accumulator per sub-block, divided back by 4^j once per sub-block (exact: every term is a multiple
// of it). Each sub-block sum times its 4-bit scale, and each 4-bit min times the sub-block's activation
// sum (Q8_K's bsums), go through vpdpwssd into the super-block's two exact integer sums per row; one fma
// each (by d_w * d_x, then by -d_x * dmin_w) adds them to the row's float chain: the order of every Q2_K
// dot product, so the bits of vec_dot and of the reference.
#include <immintrin.h>
#include <string.h>

#include "worker/kernels/x86/x86_mm.h"

// --- helpers

#define AI static inline __attribute__((always_inline))

#define Q2K_PF MMP_Q2K_SB_BYTES // bytes ahead one group's decode prefetches (a run of groups: the tuning's)

AI __m512i bcast_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// The 16 rows' scale and min bytes of sub-block s as i32 (each below 16, so an i16 pair (v, 0)).
AI void q2k_scale_min(const uint8_t *sb, int s, __m512i *sc, __m512i *mn) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(sb + MMP_Q2K_SCALES + 16 * s)));
    *sc = _mm512_and_si512(v, _mm512_set1_epi32(15));
    *mn = _mm512_srli_epi32(v, 4);
}

// The activation sum of sub-block s as the i16 pair (sum, 0) in every dword.
AI __m512i q2k_bsum(const block_q8_K *x, int s) { return _mm512_set1_epi32((int32_t)(uint16_t)x->bsums[s]); }

// Adds the super-block's two integer sums to the 16 rows' float chain.
AI __m512 q2k_finish(const uint8_t *sb, float xd, __m512i isum, __m512i msum, __m512 acc) {
    const __m512 wd = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + MMP_Q2K_D)));
    const __m512 wm = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + MMP_Q2K_DMIN)));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_set1_ps(xd), wd), acc);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(_mm512_set1_ps(-xd), wm), acc);
}

// One activation row against ng full groups of 16 Q2_K rows, gstride bytes apart (decode): y[16 g + n].
// At the top of each super-block the walk prefetches the whole super-block pf bytes on (one burst, as
// the Q3_K and Q4_K decodes), never past the last group (another thread's rows, or nothing).
AI void q2k_decode(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const block_q8_K *x, float *y, __mmask16 m,
                   size_t pf) {
    const uint8_t *end = g0 + (size_t)ng * gstride;
    for (int g = 0; g < ng; g++) {
        const uint8_t *grp = g0 + (size_t)g * gstride;
        __m512 acc = _mm512_setzero_ps(); // the 16 rows' float chains
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *sb = grp + (size_t)b * MMP_Q2K_SB_BYTES;
            if (pf > 0 && sb + pf < end)
                for (int ln = 0; ln < MMP_Q2K_SB_BYTES / 64; ln++) _mm_prefetch((const char *)sb + pf + 64 * ln, _MM_HINT_T0);
            __m512i isum = _mm512_setzero_si512(), msum = _mm512_setzero_si512();
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m512i a[8]; // (2j + half) sub-block 8h + 2j + half: sum of (q << 2j) * x
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_si512();
#pragma GCC unroll 8
                for (int l4 = 0; l4 < 8; l4++) {
                    const int half = l4 >> 2;
                    const __m512i qz = _mm512_load_si512(sb + 64 * (8 * h + l4));
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        const __m512i lo = _mm512_and_si512(qz, _mm512_set1_epi8((char)(3 << (2 * j))));
                        a[2 * j + half] = _mm512_dpbusd_epi32(a[2 * j + half], lo, bcast_i32(x[b].qs + 128 * h + 32 * j + 4 * l4));
                    }
                }
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) {
                    const int j = k >> 1, s = 8 * h + k;
                    const __m512i p = j ? _mm512_srai_epi32(a[k], (unsigned)(2 * j)) : a[k]; // |p| < 2^13: an i16
                    __m512i sc, mn;
                    q2k_scale_min(sb, s, &sc, &mn);
                    isum = _mm512_dpwssd_epi32(isum, p, sc);
                    msum = _mm512_dpwssd_epi32(msum, mn, q2k_bsum(&x[b], s));
                }
            }
            acc = q2k_finish(sb, x[b].d, isum, msum, acc);
        }
        _mm512_mask_storeu_ps(y + (size_t)g * MMP_ROWS, m, acc);
    }
}

// NT activation rows (2..4) against one group of 16 Q2_K rows: y[t * ys + n] for the rows n in m.
AI void q2k_tile(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                 __mmask16 m) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512 acc[4];           // (token) the 16 rows' float chains
    const block_q8_K *xr[4]; // (token) activation rows, nb super-blocks each
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        xr[t] = (const block_q8_K *)(xq + (size_t)t * xs);
        acc[t] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *sb = grp + (size_t)b * MMP_Q2K_SB_BYTES;
        __m512i isum[4], msum[4]; // (token) the super-block's integer sums of the 16 rows
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) isum[t] = msum[t] = _mm512_setzero_si512();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
#pragma GCC unroll 2
                for (int half = 0; half < 2; half++) {
                    const int s = 8 * h + 2 * j + half; // the sub-block: elements 16s..16s+15
                    __m512i a[4];                       // (token) its sum of q * x
#pragma GCC unroll 4
                    for (int t = 0; t < NT; t++) a[t] = _mm512_setzero_si512();
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) {
                        const int l4 = 4 * half + c; // elements 128h + 32j + 4 l4 .. + 3
                        const __m512i qz = _mm512_load_si512(sb + 64 * (8 * h + l4));
                        const __m512i lo = _mm512_and_si512(j ? _mm512_srli_epi16(qz, (unsigned)(2 * j)) : qz, m3);
#pragma GCC unroll 4
                        for (int t = 0; t < NT; t++)
                            a[t] = _mm512_dpbusd_epi32(a[t], lo, bcast_i32(xr[t][b].qs + 128 * h + 32 * j + 4 * l4));
                    }
                    __m512i sc, mn;
                    q2k_scale_min(sb, s, &sc, &mn);
#pragma GCC unroll 4
                    for (int t = 0; t < NT; t++) {
                        isum[t] = _mm512_dpwssd_epi32(isum[t], a[t], sc);
                        msum[t] = _mm512_dpwssd_epi32(msum[t], mn, q2k_bsum(&xr[t][b], s));
                    }
                }
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) acc[t] = q2k_finish(sb, xr[t][b].d, isum[t], msum[t], acc[t]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + (size_t)t * ys, m, acc[t]);
}

// --- public API

void mmp_q2_kx16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                             size_t pf) {
    q2k_decode(g0, gstride, ng, nb, (const block_q8_K *)xq, y, (__mmask16)0xffff, pf);
}

void mmp_q2_kx16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                        uint32_t mask) {
    const __mmask16 m = (__mmask16)mask;
#define Q2K_TILE(xt, yt, NT) q2k_tile(grp, nb, xt, xs, NT, yt, ys, m)
#define Q2K_ONE(xt, yt) q2k_decode(grp, 0, 1, nb, (const block_q8_K *)(xt), yt, m, Q2K_PF)
    MMP_TILES_2_4(nt, xq, xs, y, ys, Q2K_TILE, Q2K_ONE)
#undef Q2K_TILE
#undef Q2K_ONE
}
