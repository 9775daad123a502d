// x86 kernels (legacy_avx512): repacked Q4_1, Q5_0 and Q5_1 groups (MMP_Q4_1X16, MMP_Q5_0X16, MMP_Q5_1X16)
// times their activation rows (Q8_1; Q8_0 with the lane corrections of x86_mm.h; Q8_1), AVX-512 VNNI.
//
// Every output keeps the bits of that type's AVX2 vec_dot (k_avx2.c): integer lane L (0..7) of a block
// sums q * x over elements 4L..4L+3 (Q5_0: (q - 16) * x), is converted and added into float lane L with
// one fma by d_w * d_x; Q4_1 and Q5_1 add m_w * s_x of each block into one float apart; at the end the 8
// lanes are summed as hsum_ps_256 does, then the min sum. Here a zmm holds one lane of the 16 rows of a
// group (x86_mm.h): the zmm of quants j gives lane j from its low nibbles and lane 4 + j from its high
// ones, each one vpdpbusd against a broadcast activation dword, so the per-row work runs 16 rows at a
// time; the integer lanes are exact, so only which elements share a lane matters.
#include <immintrin.h>
#include <stddef.h>
#include <string.h>

#include "worker/kernels/x86/x86_mm.h"

// --- helpers

#define AI static inline __attribute__((always_inline))

#define LEG_TILE_T 3 // activation rows per tile in the matrix-matrix case (8 float lanes each: 24 zmm)

AI __m512i bcast_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

AI float f16_at(const void *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// The 5th bits (qh: a dword per row) of the 4 elements in each dword of a quant zmm whose byte c holds
// element first + c: a mask with byte c of row n set when bit first + c of row n's qh is.
AI __mmask64 q5_bits(__m512i qh, const int first) {
    const __m512i rep = _mm512_set_epi8(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0, 12, 12, 12, 12, 8, 8, 8, 8, 4,
                                        4, 4, 4, 0, 0, 0, 0, 12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0, 12, 12, 12,
                                        12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
    const __m512i v = _mm512_shuffle_epi8(_mm512_srli_epi32(qh, (unsigned)first), rep); // byte 0 of each dword, 4 times
    return _mm512_test_epi8_mask(v, _mm512_set1_epi32(0x08040201));
}

// NT activation rows (1..3) against one group of 16 rows of pack P (nb blocks): y[t * ys + n] for the
// rows n in m. Decode (NT = 1) prefetches each block pair pf bytes ahead in one burst (0: none), never
// at or past end.
AI void leg_tile(const int P, const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y,
                 size_t ys, __mmask16 m, size_t pf, const uint8_t *end) {
    const int Q5 = P != MMP_Q4_1X16, MIN = P != MMP_Q5_0X16;
    const size_t xb = MIN ? sizeof(block_q8_1) : sizeof(block_q8_0);
    const size_t xqs = MIN ? offsetof(block_q8_1, qs) : offsetof(block_q8_0, qs);
    const size_t pb = mmp_legacy_pair_bytes(P), d_off = mmp_legacy_d_off(P), m_off = mmp_legacy_m_off(P);
    const __m512i m4 = _mm512_set1_epi8(0x0f), m16 = _mm512_set1_epi8(0x10);
    __m512 acc[LEG_TILE_T][8], summ[LEG_TILE_T]; // (token, lane) float lanes of the 16 rows; the mins' sums
    const uint8_t *corr[LEG_TILE_T];             // (token) Q5_0: the activation row's lane corrections (x86_mm.h)
#pragma GCC unroll 3
    for (int t = 0; t < NT; t++) {
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) acc[t][l] = _mm512_setzero_ps();
        summ[t] = _mm512_setzero_ps();
        corr[t] = xq + (size_t)t * xs + mmp_act_tail_off(nb);
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pair = grp + (size_t)(b >> 1) * pb;
        const size_t h = (size_t)(b & 1);
        if (NT == 1 && pf > 0 && h == 0 && pair + pf < end)
            for (size_t ln = 0; ln < pb / 64; ln++) _mm_prefetch((const char *)pair + pf + 64 * ln, _MM_HINT_T0);
        const uint8_t *q = pair + 256 * h;
        const __m512 wd = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(pair + d_off + 32 * h)));
        const uint8_t *xbk[LEG_TILE_T]; // (token) activation block b
        __m512 dv[LEG_TILE_T];          // (token) d_w * d_x of the 16 rows
#pragma GCC unroll 3
        for (int t = 0; t < NT; t++) {
            xbk[t] = xq + (size_t)t * xs + (size_t)b * xb;
            dv[t] = _mm512_mul_ps(wd, _mm512_set1_ps(f16_at(xbk[t])));
        }
        if (MIN) {
            const __m512 wm = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(pair + m_off + 32 * h)));
#pragma GCC unroll 3
            for (int t = 0; t < NT; t++)
                summ[t] = _mm512_add_ps(summ[t], _mm512_mul_ps(wm, _mm512_set1_ps(f16_at(xbk[t] + offsetof(block_q8_1, s)))));
        }
        const __m512i qh = Q5 ? _mm512_load_si512(pair + mmp_legacy_qh_off() + 64 * h) : _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_load_si512(q + 64 * j);
            __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            if (Q5) {
                lo = _mm512_mask_add_epi8(lo, q5_bits(qh, 4 * j), lo, m16);
                hi = _mm512_mask_add_epi8(hi, q5_bits(qh, 16 + 4 * j), hi, m16);
            }
#pragma GCC unroll 3
            for (int t = 0; t < NT; t++) {
                const __m512i xl = bcast_i32(xbk[t] + xqs + 4 * j), xh = bcast_i32(xbk[t] + xqs + 16 + 4 * j);
                // Q5_0: q = u - 16, each lane starting from the row tail's -16 * sum(x) of its elements
                const __m512i cl = MIN ? _mm512_setzero_si512() : bcast_i32(corr[t] + 4 * (8 * b + j));
                const __m512i ch = MIN ? _mm512_setzero_si512() : bcast_i32(corr[t] + 4 * (8 * b + 4 + j));
                const __m512i il = _mm512_dpbusd_epi32(cl, lo, xl), ih = _mm512_dpbusd_epi32(ch, hi, xh);
                acc[t][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il), dv[t], acc[t][j]);
                acc[t][4 + j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ih), dv[t], acc[t][4 + j]);
            }
        }
    }
#pragma GCC unroll 3
    for (int t = 0; t < NT; t++) {
        const __m512 *a = acc[t];
        __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                 _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])));
        if (MIN) r = _mm512_add_ps(r, summ[t]);
        _mm512_mask_storeu_ps(y + (size_t)t * ys, m, r);
    }
}

AI void leg_groups(const int P, const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                   size_t ys, __mmask16 m) {
    for (int t = 0; t < nt;) {
        const int left = nt - t;
        const uint8_t *xt = xq + (size_t)t * xs;
        float *yt = y + (size_t)t * ys;
        if (left >= 3) leg_tile(P, grp, nb, xt, xs, 3, yt, ys, m, 0, NULL), t += 3;
        else if (left == 2) leg_tile(P, grp, nb, xt, xs, 2, yt, ys, m, 0, NULL), t += 2;
        else leg_tile(P, grp, nb, xt, xs, 1, yt, ys, m, 0, NULL), t += 1;
    }
}

AI void leg_decn(const int P, const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                 size_t pf) {
    const uint8_t *end = g0 + (size_t)ng * gstride;
    for (int g = 0; g < ng; g++)
        leg_tile(P, g0 + (size_t)g * gstride, nb, xq, 0, 1, y + (size_t)g * MMP_ROWS, 0, (__mmask16)0xffff, pf, end);
}

// --- public API

void mmp_legacy_avx512(int pack, const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                       size_t ys, uint32_t mask) {
    const __mmask16 m = (__mmask16)mask;
    switch (pack) {
    case MMP_Q4_1X16: leg_groups(MMP_Q4_1X16, grp, nb, xq, xs, nt, y, ys, m); break;
    case MMP_Q5_0X16: leg_groups(MMP_Q5_0X16, grp, nb, xq, xs, nt, y, ys, m); break;
    case MMP_Q5_1X16: leg_groups(MMP_Q5_1X16, grp, nb, xq, xs, nt, y, ys, m); break;
    default: break;
    }
}

void mmp_legacy_decn_avx512(int pack, const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq,
                            float *y, size_t pf) {
    switch (pack) {
    case MMP_Q4_1X16: leg_decn(MMP_Q4_1X16, g0, gstride, ng, nb, xq, y, pf); break;
    case MMP_Q5_0X16: leg_decn(MMP_Q5_0X16, g0, gstride, ng, nb, xq, y, pf); break;
    case MMP_Q5_1X16: leg_decn(MMP_Q5_1X16, g0, gstride, ng, nb, xq, y, pf); break;
    default: break;
    }
}
