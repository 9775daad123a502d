// x86 kernels (k_avx512): AVX-512 VNNI dot products of the K-quants and Q4_1/Q5_0/Q5_1 with their activations.
//
// K-quant weights are expanded to unsigned bytes (0..63) and vpdpbusd multiplies them with the signed
// Q8_K bytes, summing 4 products per i32 lane (|lane| <= 4 * 63 * 128, so it fits an i16). Each
// 128-bit lane of a product then belongs to one group of 16 elements; two products are packed to
// i16 (vpackssdw, never saturating) and vpdpwssd multiplies them with the per-group scales while
// accumulating in i32. Offsets (mins, the -32 of Q6_K, the -4 of Q3_K) come out of the integer sum
// through the Q8_K bsums, so every integer sum is exact.
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

// Shuffle control for Q4_K/Q5_K, whose products hold one 32-element sub-block per 256-bit half:
// packs(P_j, P_j+1) has 128-bit lanes 0,1 = [s(2j) x4, s(2j+2) x4] and lanes 2,3 = [s(2j+1) x4, s(2j+3) x4].
static inline __m512i pack_pattern_k4(int j) {
    uint16_t pat[32];
    for (int k = 0; k < 4; k++)
        for (int e = 0; e < 8; e++) {
            const int sidx = 2 * j + (k >= 2) + (e < 4 ? 0 : 2);
            pat[8 * k + e] = (uint16_t)((2 * sidx) | ((2 * sidx + 1) << 8));
        }
    __m512i v;
    memcpy(&v, pat, sizeof v);
    return v;
}

// Q4_K/Q5_K mins term: sum_k m_k * (bsums[2k] + bsums[2k+1]) as 8 i32 lanes.
static inline __m256i mins_k4(uint64_t mn, const int16_t *bsums) {
    const __m128i mn8 = _mm_cvtsi64_si128((long long)mn);
    const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
    return _mm256_madd_epi16(mn16, load256(bsums));
}

// --- K-quants

static void vec_dot_q4_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0); // low / high nibbles per half
    const __m512i pat01 = pack_pattern_k4(0), pat23 = pack_pattern_k4(2);
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const float dmin = -x[i].d * f16_to_f32(w[i].dmin);
        uint64_t sc, mn;
        kq_unpack_scales_k4(w[i].scales, &sc, &mn);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins_k4(mn, x[i].bsums)), accm);

        const __m512i scl = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        // P_j: chunk j's low nibbles (sub-block 2j) in the low half, high nibbles (2j+1) in the high half
        __m512i p[4];
        for (int j = 0; j < 4; j++) {
            const __m512i nib = _mm512_and_si512(_mm512_srlv_epi64(bcast256(q + 32 * j), shift), m4);
            p[j] = dpbusd0(nib, load512(y + 64 * j));
        }
        __m512i sumi = _mm512_madd_epi16(_mm512_packs_epi32(p[0], p[1]), _mm512_shuffle_epi8(scl, pat01));
        sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(p[2], p[3]), _mm512_shuffle_epi8(scl, pat23));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_512(acc) + hsum_ps_256(accm);
}

static void vec_dot_q5_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q5_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i m16 = _mm512_set1_epi8(0x10);
    const __m512i shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    const __m512i pat01 = pack_pattern_k4(0), pat23 = pack_pattern_k4(2);
    __m512 acc = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const float dmin = -x[i].d * f16_to_f32(w[i].dmin);
        uint64_t sc, mn;
        kq_unpack_scales_k4(w[i].scales, &sc, &mn);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins_k4(mn, x[i].bsums)), accm);

        const __m512i scl = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        const __m512i qh = bcast256(w[i].qh); // bit 2j of byte l: 5th bit of element 64j + l, 2j+1: 64j + 32 + l
        __m512i p[4];
        for (int j = 0; j < 4; j++) {
            const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * j))),
                                                   _mm256_set1_epi8((char)(1 << (2 * j + 1))), 1);
            __m512i nib = _mm512_and_si512(_mm512_srlv_epi64(bcast256(q + 32 * j), shift), m4);
            nib = _mm512_mask_add_epi8(nib, _mm512_test_epi8_mask(qh, bit), nib, m16);
            p[j] = dpbusd0(nib, load512(y + 64 * j));
        }
        __m512i sumi = _mm512_madd_epi16(_mm512_packs_epi32(p[0], p[1]), _mm512_shuffle_epi8(scl, pat01));
        sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(p[2], p[3]), _mm512_shuffle_epi8(scl, pat23));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_512(acc) + hsum_ps_256(accm);
}

static void vec_dot_q6_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i m30 = _mm512_set1_epi8(0x30);
    const __m512i shl = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4); // qh bits 0,1 / 2,3 -> 4,5
    const __m512i shr = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0); // qh bits 4,5 / 6,7 -> 4,5
    const __m512i pat = pack_pattern(0, 4);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales));
        // stored values are q + 32: take 32 * sum_g sc_g * bsums_g out of the sum
        const __m256i bias = _mm256_slli_epi32(_mm256_madd_epi16(sc16, load256(x[i].bsums)), 5);
        __m512i sumi = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), bias));
        for (int h = 0; h < 2; h++) {
            const __m512i scl = _mm512_broadcast_i32x4(h ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
            const __m512i ql = load512(w[i].ql + 64 * h);
            const __m512i qh = bcast256(w[i].qh + 32 * h);
            const int8_t *y = x[i].qs + 128 * h;
            // elements 0..63 of this half from the low nibbles, 64..127 from the high nibbles
            const __m512i lo = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_sllv_epi64(qh, shl), m30));
            const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                               _mm512_and_si512(_mm512_srlv_epi64(qh, shr), m30));
            const __m512i plo = dpbusd0(lo, load512(y));
            const __m512i phi = dpbusd0(hi, load512(y + 64));
            sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(plo, phi), _mm512_shuffle_epi8(scl, pat));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_512(acc);
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

static void vec_dot_q3_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q3_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i four = _mm512_set1_epi8(4);
    const __m512i shift01 = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i shift23 = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    const __m512i pat = pack_pattern(0, 4);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        int8_t sc8[16];
        kq_unpack_scales_q3(w[i].scales, sc8);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc8));
        // stored value u = low 2 bits + 4 * high bit = q + 4: take 4 * sum_g sc_g * bsums_g out
        const __m256i bias = _mm256_slli_epi32(_mm256_madd_epi16(sc16, load256(x[i].bsums)), 2);
        __m512i sumi = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), bias));
        const __m512i hm = bcast256(w[i].hmask); // bit 4h+j of byte l: high bit of element 128h + 32j + l
        for (int h = 0; h < 2; h++) {
            const __m512i scl = _mm512_broadcast_i32x4(h ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
            const __m512i qb = bcast256(w[i].qs + 32 * h);
            const int8_t *y = x[i].qs + 128 * h;
            const __m512i bit01 = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (4 * h))),
                                                     _mm256_set1_epi8((char)(1 << (4 * h + 1))), 1);
            const __m512i bit23 = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (4 * h + 2))),
                                                     _mm256_set1_epi8((char)(1 << (4 * h + 3))), 1);
            __m512i u0 = _mm512_and_si512(_mm512_srlv_epi64(qb, shift01), m3);
            __m512i u1 = _mm512_and_si512(_mm512_srlv_epi64(qb, shift23), m3);
            u0 = _mm512_mask_add_epi8(u0, _mm512_test_epi8_mask(hm, bit01), u0, four);
            u1 = _mm512_mask_add_epi8(u1, _mm512_test_epi8_mask(hm, bit23), u1, four);
            const __m512i p0 = dpbusd0(u0, load512(y));
            const __m512i p1 = dpbusd0(u1, load512(y + 64));
            sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(p0, p1), _mm512_shuffle_epi8(scl, pat));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_512(acc);
}

// --- public API

void kern_x86_k_avx512_fill(kernels_t *k) {
    k->vec_dot[QT_Q2_K] = vec_dot_q2_K;
    k->vec_dot[QT_Q3_K] = vec_dot_q3_K;
    k->vec_dot[QT_Q4_K] = vec_dot_q4_K;
    k->vec_dot[QT_Q5_K] = vec_dot_q5_K;
    k->vec_dot[QT_Q6_K] = vec_dot_q6_K;
}
