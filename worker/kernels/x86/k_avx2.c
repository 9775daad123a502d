// x86 kernels (k_avx2): AVX2 dot products of the K-quants and Q4_1/Q5_0/Q5_1 with their activation types.
//
// Weights are expanded to unsigned bytes and multiplied with the signed activation bytes by
// maddubs (u8 x s8 -> pairs summed into i16, never saturating here: |q| <= 63, |x| <= 128), then
// madd applies the per-group scales while widening to i32. Offsets (K-quant mins, the -4 of Q3_K,
// the -16 of Q5_0) are taken out of the integer sum with the activation group sums, so every integer
// sum is exact; Q4_K, Q5_K and Q6_K also keep llama.cpp's float lanes and order (see below).
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "worker/kernels/x86/k_common.h"
#include "worker/kernels/x86/x86.h"
#include "worker/kernels/x86/x86_mm.h"

// --- helpers

static inline float f16_to_f32(mlm_f16_t h) { return _cvtsh_ss(h); }

static inline float hsum_ps_256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The sum of the 8 i32 lanes of v (exact while it fits).
static inline int32_t hsum_epi32_256(__m256i v) {
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
    return _mm_cvtsi128_si32(a);
}

static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

// i16 vector with scale k (of the 8 i16 scales in each 128-bit lane of v) in every element.
static inline __m256i scale_all(__m256i v, int k) {
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)((2 * k) | ((2 * k + 1) << 8))));
}

// i16 vector with scale k in the low 128-bit lane and scale k + 1 in the high one (groups of 16).
static inline __m256i scale_pair(__m256i v, int k) {
    const __m128i lo = _mm_set1_epi16((short)((2 * k) | ((2 * k + 1) << 8)));
    const __m128i hi = _mm_set1_epi16((short)((2 * k + 2) | ((2 * k + 3) << 8)));
    return _mm256_shuffle_epi8(v, _mm256_set_m128i(hi, lo));
}

// 32 bits -> 32 bytes: byte i is 0xff when bit i of the 4 bytes at p is set, else 0.
static inline __m256i bytes_from_bits(const uint8_t *p) {
    uint32_t b;
    memcpy(&b, p, 4);
    const __m256i spread = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                              0x0202020202020202, 0x0303030303030303);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

// 16 packed bytes -> 32 nibbles: low nibbles are elements 0..15, high nibbles 16..31.
static inline __m256i nibbles_32(const uint8_t *p) {
    const __m128i q = _mm_loadu_si128((const __m128i *)p);
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
}

// --- K-quants

// Q4_K, Q5_K and Q6_K reproduce llama.cpp's AVX2 kernels bit for bit: 8 i32 lanes, lane L summing
// scale * q * x over elements 4L..4L+3 of every 32-element chunk, one fma per super-block into 8
// float lanes, and the mins (Q4_K: 4 float lanes of pairs of sub-blocks; Q5_K: one float) kept
// apart until the end. The integer sums are exact, so only which elements share a lane matters.

// Q4_K / Q5_K: the 8 mins as i16 times the 8 sub-block sums of x (pairs of bsums): 4 i32 lanes,
// lane k = m(2k) * sum(2k) + m(2k+1) * sum(2k+1).
static inline __m128i kq_mins_prod(uint64_t mn, const int16_t *bsums) {
    const __m128i b0 = _mm_loadu_si128((const __m128i *)bsums);
    const __m128i b1 = _mm_loadu_si128((const __m128i *)(bsums + 8));
    return _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn)), _mm_hadd_epi16(b0, b1));
}

static void vec_dot_q4_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const float dmin = -x[i].d * f16_to_f32(w[i].dmin);
        uint64_t sc, mn;
        kq_unpack_scales_k4(w[i].scales, &sc, &mn);
        accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(kq_mins_prod(mn, x[i].bsums)), accm);
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = load256(q + 32 * j);
            const __m256i lo = _mm256_and_si256(qb, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(y + 64 * j)), scale_all(sc16, 2 * j));
            const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(y + 64 * j + 32)),
                                                  scale_all(sc16, 2 * j + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    accm = _mm_add_ps(accm, _mm_movehl_ps(accm, accm));
    accm = _mm_add_ss(accm, _mm_movehdup_ps(accm));
    *s = hsum_ps_256(acc) + _mm_cvtss_f32(accm);
}

static void vec_dot_q5_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q5_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i m16 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    __m128 summs = _mm_setzero_ps(); // lane 0: sum of dmin * (integer min term) over blocks
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const float dmin = -x[i].d * f16_to_f32(w[i].dmin);
        uint64_t sc, mn;
        kq_unpack_scales_k4(w[i].scales, &sc, &mn);
        const __m128i pm = kq_mins_prod(mn, x[i].bsums);
        const __m128i pm2 = _mm_add_epi32(pm, _mm_unpackhi_epi64(pm, pm));
        const int msum = _mm_cvtsi128_si32(_mm_add_epi32(pm2, _mm_shuffle_epi32(pm2, 1)));
        summs = _mm_fmadd_ss(_mm_set_ss(dmin), _mm_set_ss((float)msum), summs);

        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        __m256i hb = load256(w[i].qh); // bit 2j: 5th bit of chunk j's low nibbles, bit 2j+1: high nibbles
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = load256(q + 32 * j);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(qb, m4),
                                               _mm256_and_si256(_mm256_slli_epi16(hb, 4), m16));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                                               _mm256_and_si256(_mm256_slli_epi16(hb, 3), m16));
            hb = _mm256_srli_epi16(hb, 2);
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load256(y + 64 * j)), scale_all(sc16, 2 * j));
            const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load256(y + 64 * j + 32)),
                                                  scale_all(sc16, 2 * j + 1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_256(acc) + _mm_cvtss_f32(summs);
}

static void vec_dot_q6_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q6_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i m30 = _mm256_set1_epi8(0x30);
    const __m256i m32 = _mm256_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales));
        __m256i sumi = _mm256_setzero_si256();
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
            const __m256i y0 = load256(y), y1 = load256(y + 32), y2 = load256(y + 64), y3 = load256(y + 96);
            // (q - 32) * x in i16 pairs: the stored q times x minus 32 times x
            const __m256i p0 = _mm256_sub_epi16(_mm256_maddubs_epi16(q0, y0), _mm256_maddubs_epi16(m32, y0));
            const __m256i p1 = _mm256_sub_epi16(_mm256_maddubs_epi16(q1, y1), _mm256_maddubs_epi16(m32, y1));
            const __m256i p2 = _mm256_sub_epi16(_mm256_maddubs_epi16(q2, y2), _mm256_maddubs_epi16(m32, y2));
            const __m256i p3 = _mm256_sub_epi16(_mm256_maddubs_epi16(q3, y3), _mm256_maddubs_epi16(m32, y3));
            const __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(p0, scale_pair(scl, 0)),
                                                 _mm256_madd_epi16(p1, scale_pair(scl, 2)));
            const __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(p2, scale_pair(scl, 4)),
                                                 _mm256_madd_epi16(p3, scale_pair(scl, 6)));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(s01, s23));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_256(acc);
}

// Q2_K: per super-block the exact integer sums of scale * q * x and of min * bsum, each added to one
// float chain with an fma (by d_w * d_x, then by -d_x * dmin_w), as every Q2_K dot product (x86_mm.h).
static void vec_dot_q2_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q2_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const __m128i sb = _mm_loadu_si128((const __m128i *)w[i].scales); // scale low nibble, min high
        const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sb, m4));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sb, 4), m4));
        const int32_t msum = hsum_epi32_256(_mm256_madd_epi16(mn16, load256(x[i].bsums)));
        __m256i sum0 = _mm256_setzero_si256();
        __m256i sum1 = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i scl = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            const __m256i qb = load256(w[i].qs + 32 * h);
            const int8_t *y = x[i].qs + 128 * h;
            const __m256i q0 = _mm256_and_si256(qb, m3);
            const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(qb, 2), m3);
            const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m3);
            const __m256i q3 = _mm256_and_si256(_mm256_srli_epi16(qb, 6), m3);
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(q0, load256(y)), scale_pair(scl, 0)));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(_mm256_maddubs_epi16(q1, load256(y + 32)), scale_pair(scl, 2)));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(q2, load256(y + 64)), scale_pair(scl, 4)));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(_mm256_maddubs_epi16(q3, load256(y + 96)), scale_pair(scl, 6)));
        }
        const int32_t isum = hsum_epi32_256(_mm256_add_epi32(sum0, sum1));
        acc = fmaf(x[i].d * f16_to_f32(w[i].d), (float)isum, acc);
        acc = fmaf(-x[i].d * f16_to_f32(w[i].dmin), (float)msum, acc);
    }
    *s = acc;
}

static void vec_dot_q3_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q3_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i m4 = _mm256_set1_epi8(4);
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const float d = x[i].d * f16_to_f32(w[i].d);
        int8_t sc8[16];
        kq_unpack_scales_q3(w[i].scales, sc8);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc8));
        // stored value u = low 2 bits + 4 * high bit = q + 4: take 4 * sum_g sc_g * bsums_g out
        const __m256i bias = _mm256_slli_epi32(_mm256_madd_epi16(sc16, load256(x[i].bsums)), 2);
        __m256i sum0 = _mm256_setzero_si256();
        __m256i sum1 = _mm256_sub_epi32(sum0, bias);
        __m256i hm = load256(w[i].hmask); // bit 4h+j of byte l: high bit of element 128h + 32j + l
        for (int h = 0; h < 2; h++) {
            const __m256i scl = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            const __m256i qb = load256(w[i].qs + 32 * h);
            const int8_t *y = x[i].qs + 128 * h;
            for (int j = 0; j < 4; j++) {
                const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(qb, 2 * j), m3);
                const __m256i u = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hm, 2), m4));
                hm = _mm256_srli_epi16(hm, 1);
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, load256(y + 32 * j)), scale_pair(scl, 2 * j));
                if (j & 1)
                    sum1 = _mm256_add_epi32(sum1, p);
                else
                    sum0 = _mm256_add_epi32(sum0, p);
            }
        }
        // the super-block's exact sum (|sum| < 2^23: exact in a float), one fma: every Q3_K product's order
        acc = fmaf(d, (float)hsum_epi32_256(_mm256_add_epi32(sum0, sum1)), acc);
    }
    *s = acc;
}

// --- 32-element legacy quants

static void vec_dot_q4_1(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_1 *w = vw;
    const block_q8_1 *x = vx;
    const int64_t nb = n / QK4_1;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float summ = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const float d = f16_to_f32(w[i].d) * f16_to_f32(x[i].d);
        summ += f16_to_f32(w[i].m) * f16_to_f32(x[i].s);
        const __m256i q = nibbles_32(w[i].qs);
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, load256(x[i].qs)), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps_256(acc) + summ;
}

static void vec_dot_q5_1(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q5_1 *w = vw;
    const block_q8_1 *x = vx;
    const int64_t nb = n / QK5_1;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m16 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    float summ = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const float d = f16_to_f32(w[i].d) * f16_to_f32(x[i].d);
        summ += f16_to_f32(w[i].m) * f16_to_f32(x[i].s);
        const __m256i q = _mm256_or_si256(nibbles_32(w[i].qs), _mm256_and_si256(bytes_from_bits(w[i].qh), m16));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, load256(x[i].qs)), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps_256(acc) + summ;
}

static void vec_dot_q5_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q5_0 *w = vw;
    const block_q8_0 *x = vx;
    const int64_t nb = n / QK5_0;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m16 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = f16_to_f32(w[i].d) * f16_to_f32(x[i].d);
        // u = q + 16 in 0..31: sum u*x - 16*sum x (exact even for x = -128)
        const __m256i u = _mm256_or_si256(nibbles_32(w[i].qs), _mm256_and_si256(bytes_from_bits(w[i].qh), m16));
        const __m256i y = load256(x[i].qs);
        const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(u, y), _mm256_maddubs_epi16(m16, y));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc);
    }
    *s = hsum_ps_256(acc);
}

// --- Q6_K batches (rows x tokens)
//
// vec_dot_q6_K's bits per (row, token) (the lane integers are exact, see k_avx512.c), with each
// row's super-block unpacked once per tile of 4 rows x up to 32 tokens: q - 32 as int8 and the
// scale pattern of each 32-element chunk are kept in a small buffer; with the activation made
// unsigned (x ^ 0x80 = x + 128) maddubs(x + 128, q - 32) = x * (q - 32) + 128 * (q - 32), so each
// lane starts from the row's -128 * sum(scale * (q - 32)): a (row, token) costs 8 maddubs, 8 madd, 8 add.

#define Q6A_TC 32 // tokens per chunk (accumulators on the stack)
#define Q6A_R 4   // rows per tile

typedef struct {
    __m256i q[8];  // (8, 32) int8 q - 32 of chunk c (elements 32c .. 32c + 31)
    __m256i s[8];  // (8, 16) int16 scale of each element pair of chunk c
    __m256i off;   // (8) int32 -128 * sum(scale * (q - 32)) over each lane's elements
} q6a_row_t;

static inline __attribute__((always_inline)) void q6a_row_prep(const block_q6_K *b, q6a_row_t *o) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30), m32 = _mm256_set1_epi8(32);
    const __m256i u128 = _mm256_set1_epi8((char)0x80);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    __m256i off = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        const __m256i scl = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11) : _mm256_permute2x128_si256(sc16, sc16, 0x00);
        const __m256i qh = load256(b->qh + 32 * h);
        const __m256i l0 = load256(b->ql + 64 * h), l1 = load256(b->ql + 64 * h + 32);
        __m256i q[4]; // (4, 32) q of chunks 4h .. 4h + 3
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
        for (int t = 0; t < 4; t++) {
            o->q[4 * h + t] = _mm256_sub_epi8(q[t], m32);
            o->s[4 * h + t] = scale_pair(scl, 2 * t);
            off = _mm256_add_epi32(off, _mm256_madd_epi16(_mm256_maddubs_epi16(u128, o->q[4 * h + t]), o->s[4 * h + t]));
        }
    }
    o->off = _mm256_sub_epi32(_mm256_setzero_si256(), off);
}

static inline __attribute__((always_inline)) void q6a_tile(const uint8_t *w, size_t wrow, const uint8_t *x, size_t xs,
                                                           int nt, float *y, size_t ys, int64_t nb, const int R) {
    const __m256i u128 = _mm256_set1_epi8((char)0x80);
    __m256 acc[Q6A_R][Q6A_TC]; // (rows, tokens) 8 float lanes each
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        q6a_row_t rw[Q6A_R]; // (rows) this super-block of each row, unpacked
        __m256 dw[Q6A_R];    // (rows, 8) the row's d
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const block_q6_K *wb = (const block_q6_K *)(w + (size_t)r * wrow) + b;
            q6a_row_prep(wb, &rw[r]);
            dw[r] = _mm256_set1_ps(f16_to_f32(wb->d));
        }
        for (int t = 0; t < nt; t++) {
            const block_q8_K *xb = (const block_q8_K *)(x + (size_t)t * xs) + b;
            __m256i xu[8]; // (8, 32) the token's x ^ 0x80
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) xu[c] = _mm256_xor_si256(load256(xb->qs + 32 * c), u128);
            const __m256 dx = _mm256_set1_ps(xb->d);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                __m256i sum = rw[r].off;
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++)
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(xu[c], rw[r].q[c]), rw[r].s[c]));
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dx, dw[r]), _mm256_cvtepi32_ps(sum), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) y[(size_t)t * ys + r] = hsum_ps_256(acc[r][t]);
}

void mmq_q6_K_avx2(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt, float *y, size_t ys,
                   int64_t n) {
    const int64_t nb = n / QK_K;
    for (int t = 0; t < nt; t += Q6A_TC) {
        const int tc = nt - t < Q6A_TC ? nt - t : Q6A_TC;
        const uint8_t *xt = x + (size_t)t * xs;
        float *yt = y + (size_t)t * ys;
        int64_t r = 0;
        for (; r + Q6A_R <= nr; r += Q6A_R) q6a_tile(w + (size_t)r * wrow, wrow, xt, xs, tc, yt + r, ys, nb, Q6A_R);
        for (; r < nr; r++) q6a_tile(w + (size_t)r * wrow, wrow, xt, xs, tc, yt + r, ys, nb, 1);
    }
}

// --- public API

void kern_x86_k_avx2_fill(kernels_t *k) {
    k->vec_dot[QT_Q2_K] = vec_dot_q2_K;
    k->vec_dot[QT_Q3_K] = vec_dot_q3_K;
    k->vec_dot[QT_Q4_K] = vec_dot_q4_K;
    k->vec_dot[QT_Q5_K] = vec_dot_q5_K;
    k->vec_dot[QT_Q6_K] = vec_dot_q6_K;
    k->vec_dot[QT_Q4_1] = vec_dot_q4_1;
    k->vec_dot[QT_Q5_0] = vec_dot_q5_0;
    k->vec_dot[QT_Q5_1] = vec_dot_q5_1;
}
