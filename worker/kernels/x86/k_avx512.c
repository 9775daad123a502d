// x86 kernels (k_avx512): AVX-512 VNNI dot products of Q2_K, Q4_K, Q5_K, Q6_K with Q8_K activations.
//
// K-quant weights are expanded to unsigned bytes (0..63) and vpdpbusd multiplies them with the signed
// Q8_K bytes, summing 4 products per i32 lane (|lane| <= 4 * 63 * 128, so it fits an i16). Each
// 128-bit lane of a product then belongs to one group of 16 elements; two products are packed to
// i16 (vpackssdw, never saturating) and vpdpwssd multiplies them with the per-group scales while
// accumulating in i32. Offsets (mins, the -32 of Q6_K) come out of the integer sum through the Q8_K
// bsums, so every integer sum is exact. Q4_K/Q5_K/Q6_K use 256-bit vectors: on Zen 4 (512-bit ops
// run as two halves) that measured faster than the 512-bit layout, which needs extra shifts to
// line nibbles up with the activations. Q3_K, Q4_1, Q5_0 and Q5_1 keep the AVX2 kernels.
#include <immintrin.h>
#include <string.h>

#include "k_common.h"
#include "x86.h"

// --- helpers

static inline float f16_to_f32(mlm_f16_t h) { return _cvtsh_ss(h); }

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline __m512i load512(const void *p) { return _mm512_loadu_si512(p); }

// The 32 bytes at p in both 256-bit halves.
static inline __m512i bcast256(const void *p) { return _mm512_broadcast_i64x4(load256(p)); }

static inline __m512i dpbusd0(__m512i u, __m512i s) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s); }

static inline float hsum_ps_512(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline float hsum_ps_256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Shuffle control that turns 8 i16 scales (in every 128-bit lane) into the pattern matching
// packs(P, Q) where 128-bit lane k of P belongs to scale a + k and of Q to scale b + k:
// lane k = [s(a+k) x4, s(b+k) x4].
static inline __m512i pack_pattern(int a, int b) {
    uint16_t pat[32];
    for (int k = 0; k < 4; k++)
        for (int e = 0; e < 8; e++) {
            const int sidx = e < 4 ? a + k : b + k;
            pat[8 * k + e] = (uint16_t)((2 * sidx) | ((2 * sidx + 1) << 8));
        }
    __m512i v;
    memcpy(&v, pat, sizeof v);
    return v;
}

// i16 shuffle control for packs(P, Q) of two 32-element products of 16-element groups a..a+3 (P: a, a+1;
// Q: a+2, a+3): 128-bit lane 0 = [s(a) x4, s(a+2) x4], lane 1 = [s(a+1) x4, s(a+3) x4].
static inline __m256i cross_pattern(int a) {
    const short g0 = (short)((2 * a) | ((2 * a + 1) << 8)), g1 = (short)((2 * a + 2) | ((2 * a + 3) << 8));
    const short g2 = (short)((2 * a + 4) | ((2 * a + 5) << 8)), g3 = (short)((2 * a + 6) | ((2 * a + 7) << 8));
    return _mm256_setr_epi16(g0, g0, g0, g0, g2, g2, g2, g2, g1, g1, g1, g1, g3, g3, g3, g3);
}

// i16 shuffle control, the same in both 128-bit lanes: [s(a) x4, s(a+1) x4] (of 8 i16 per lane),
// matching packs(P, Q) with P summing sub-block a and Q sub-block a + 1.
static inline __m256i pair_pattern(int a) {
    const short lo = (short)((2 * a) | ((2 * a + 1) << 8)), hi = (short)((2 * a + 2) | ((2 * a + 3) << 8));
    return _mm256_setr_epi16(lo, lo, lo, lo, hi, hi, hi, hi, lo, lo, lo, lo, hi, hi, hi, hi);
}

// --- K-quants

static void vec_dot_q4_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m128i dup_mins = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    __m256 acc = _mm256_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m128 dd = kq_d_dmin(&w[i].d, x[i].d);
        const __m128i sm = kq_scales_mins_k4(w[i].scales);
        const __m256i mdup = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, dup_mins));
        accm = _mm256_fnmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                                _mm256_cvtepi32_ps(_mm256_madd_epi16(mdup, load256(x[i].bsums))), accm);
        const __m256i scl = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = load256(q + 32 * j);
            const __m256i plo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(qb, m4), load256(y + 64 * j));
            const __m256i phi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                                                    load256(y + 64 * j + 32));
            // 128-bit lane = [4 sums of sub-block 2j, 4 of 2j+1]
            const __m256i sc = _mm256_shuffle_epi8(scl, pair_pattern(2 * j));
            if (j & 1)
                sum1 = _mm256_dpwssd_epi32(sum1, _mm256_packs_epi32(plo, phi), sc);
            else
                sum0 = _mm256_dpwssd_epi32(sum0, _mm256_packs_epi32(plo, phi), sc);
        }
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    *s = hsum_ps_256(_mm256_add_ps(acc, accm));
}

static void vec_dot_q5_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q5_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i m16 = _mm256_set1_epi8(0x10);
    const __m128i dup_mins = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    __m256 acc = _mm256_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m128 dd = kq_d_dmin(&w[i].d, x[i].d);
        const __m128i sm = kq_scales_mins_k4(w[i].scales);
        const __m256i mdup = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, dup_mins));
        accm = _mm256_fnmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                                _mm256_cvtepi32_ps(_mm256_madd_epi16(mdup, load256(x[i].bsums))), accm);
        const __m256i scl = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        const __m256i qh = load256(w[i].qh); // bit 2j of byte l: 5th bit of element 64j + l, 2j+1: 64j + 32 + l
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = load256(q + 32 * j);
            __m256i lo = _mm256_and_si256(qb, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
            lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * j)))), lo, m16);
            hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * j + 1)))), hi, m16);
            const __m256i plo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, load256(y + 64 * j));
            const __m256i phi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, load256(y + 64 * j + 32));
            const __m256i sc = _mm256_shuffle_epi8(scl, pair_pattern(2 * j));
            if (j & 1)
                sum1 = _mm256_dpwssd_epi32(sum1, _mm256_packs_epi32(plo, phi), sc);
            else
                sum0 = _mm256_dpwssd_epi32(sum0, _mm256_packs_epi32(plo, phi), sc);
        }
        acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    *s = hsum_ps_256(_mm256_add_ps(acc, accm));
}

static void vec_dot_q6_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i m30 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales));
        const __m256i bias = _mm256_slli_epi32(_mm256_madd_epi16(sc16, load256(x[i].bsums)), 5);
        __m256i sum0 = _mm256_setzero_si256();
        __m256i sum1 = _mm256_sub_epi32(sum0, bias);
        for (int h = 0; h < 2; h++) {
            const __m256i scl = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            const uint8_t *ql = w[i].ql + 64 * h;
            const __m256i qh = load256(w[i].qh + 32 * h);
            const int8_t *y = x[i].qs + 128 * h;
            const __m256i l0 = load256(ql);
            const __m256i l1 = load256(ql + 32);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                               _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            const __m256i p0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q0, load256(y));
            const __m256i p1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q1, load256(y + 32));
            const __m256i p2 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q2, load256(y + 64));
            const __m256i p3 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q3, load256(y + 96));
            // packs(p0, p1): lane 0 = [groups 0, 2], lane 1 = [groups 1, 3]; packs(p2, p3) likewise + 4
            sum0 = _mm256_dpwssd_epi32(sum0, _mm256_packs_epi32(p0, p1), _mm256_shuffle_epi8(scl, cross_pattern(0)));
            sum1 = _mm256_dpwssd_epi32(sum1, _mm256_packs_epi32(p2, p3), _mm256_shuffle_epi8(scl, cross_pattern(4)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    *s = hsum_ps_256(acc);
}

static void vec_dot_q2_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q2_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m512i shift01 = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i shift23 = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    const __m512i pat = pack_pattern(0, 4);
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const float dmin = -x[i].d * f16_to_f32(w[i].dmin);
        const __m128i sb = _mm_loadu_si128((const __m128i *)w[i].scales); // scale low nibble, min high
        const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sb, m4));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sb, 4), m4));
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_madd_epi16(mn16, load256(x[i].bsums))),
                               accm);
        __m512i sumi = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            const __m512i scl = _mm512_broadcast_i32x4(h ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
            const __m512i qb = bcast256(w[i].qs + 32 * h);
            const int8_t *y = x[i].qs + 128 * h;
            // elements 0..63 of this half from bit pairs 0,1; 64..127 from bit pairs 2,3
            const __m512i p0 = dpbusd0(_mm512_and_si512(_mm512_srlv_epi64(qb, shift01), m3), load512(y));
            const __m512i p1 = dpbusd0(_mm512_and_si512(_mm512_srlv_epi64(qb, shift23), m3), load512(y + 64));
            sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(p0, p1), _mm512_shuffle_epi8(scl, pat));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_512(acc) + hsum_ps_256(accm);
}

// --- public API

void kern_x86_k_avx512_fill(kernels_t *k) {
    k->vec_dot[QT_Q2_K] = vec_dot_q2_K;
    k->vec_dot[QT_Q4_K] = vec_dot_q4_K;
    k->vec_dot[QT_Q5_K] = vec_dot_q5_K;
    k->vec_dot[QT_Q6_K] = vec_dot_q6_K;
}
