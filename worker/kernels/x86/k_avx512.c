// x86 kernels (k_avx512): AVX-512 VNNI dot products of Q2_K, Q4_K, Q5_K, Q6_K with Q8_K activations.
//
// Q4_K, Q5_K and Q6_K follow llama.cpp's x86 lane layout exactly (see below), with vpdpwssd fusing
// the scale multiply and the i32 accumulation. Q2_K expands weights to unsigned bytes and vpdpbusd
// multiplies them with the signed Q8_K bytes, 4 products per i32 lane; two products are packed to
// i16 (vpackssdw, never saturating) and vpdpwssd applies the per-group scales; its mins come out of
// the integer sum through the Q8_K bsums. Q3_K, Q4_1, Q5_0 and Q5_1 keep the AVX2 kernels.
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "worker/kernels/x86/k_common.h"
#include "worker/kernels/x86/x86.h"
#include "worker/kernels/x86/x86_mm.h"

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

// --- K-quants

// Q4_K, Q5_K and Q6_K give the same bits as llama.cpp's AVX2 kernels (and k_avx2.c): i32 lane L
// sums scale * q * x over elements 4L..4L+3 of every 32-element chunk, one fma per super-block
// into 8 float lanes, the mins kept apart (Q4_K: 4 float lanes, Q5_K: one float) until the end.
// maddubs forms the i16 pair sums; vpdpwssd applies the scales and accumulates in one step.

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

// Q4_K / Q5_K mins times the sub-block sums of x: lane k = m(2k) * sum(2k) + m(2k+1) * sum(2k+1).
static inline __m128i kq_mins_prod(__m128i sm, const int16_t *bsums) {
    const __m128i b0 = _mm_loadu_si128((const __m128i *)bsums);
    const __m128i b1 = _mm_loadu_si128((const __m128i *)(bsums + 8));
    return _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)), _mm_hadd_epi16(b0, b1));
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
        const __m128i sm = kq_scales_mins_k4(w[i].scales);
        accm = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(kq_mins_prod(sm, x[i].bsums)), accm);
        const __m256i scl = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = load256(q + 32 * j);
            const __m256i plo = _mm256_maddubs_epi16(_mm256_and_si256(qb, m4), load256(y + 64 * j));
            const __m256i phi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), load256(y + 64 * j + 32));
            sumi = _mm256_dpwssd_epi32(sumi, plo, scale_all(scl, 2 * j));
            sumi = _mm256_dpwssd_epi32(sumi, phi, scale_all(scl, 2 * j + 1));
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
        const __m128i sm = kq_scales_mins_k4(w[i].scales);
        const __m128i pm = kq_mins_prod(sm, x[i].bsums);
        const __m128i pm2 = _mm_add_epi32(pm, _mm_unpackhi_epi64(pm, pm));
        const int msum = _mm_cvtsi128_si32(_mm_add_epi32(pm2, _mm_shuffle_epi32(pm2, 1)));
        summs = _mm_fmadd_ss(_mm_set_ss(dmin), _mm_set_ss((float)msum), summs);
        const __m256i scl = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        const uint8_t *q = w[i].qs;
        const int8_t *y = x[i].qs;
        const __m256i qh = load256(w[i].qh); // bit 2j of byte l: 5th bit of element 64j + l, 2j+1: 64j + 32 + l
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = load256(q + 32 * j);
            __m256i lo = _mm256_and_si256(qb, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4);
            lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * j)))), lo, m16);
            hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * j + 1)))), hi, m16);
            sumi = _mm256_dpwssd_epi32(sumi, _mm256_maddubs_epi16(lo, load256(y + 64 * j)), scale_all(scl, 2 * j));
            sumi = _mm256_dpwssd_epi32(sumi, _mm256_maddubs_epi16(hi, load256(y + 64 * j + 32)), scale_all(scl, 2 * j + 1));
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
            // (q - 32) * x as i16 pair sums: stored q times x minus 32 times x
            const __m256i p0 = _mm256_sub_epi16(_mm256_maddubs_epi16(q0, y0), _mm256_maddubs_epi16(m32, y0));
            const __m256i p1 = _mm256_sub_epi16(_mm256_maddubs_epi16(q1, y1), _mm256_maddubs_epi16(m32, y1));
            const __m256i p2 = _mm256_sub_epi16(_mm256_maddubs_epi16(q2, y2), _mm256_maddubs_epi16(m32, y2));
            const __m256i p3 = _mm256_sub_epi16(_mm256_maddubs_epi16(q3, y3), _mm256_maddubs_epi16(m32, y3));
            sumi = _mm256_dpwssd_epi32(sumi, p0, scale_pair(scl, 0));
            sumi = _mm256_dpwssd_epi32(sumi, p1, scale_pair(scl, 2));
            sumi = _mm256_dpwssd_epi32(sumi, p2, scale_pair(scl, 4));
            sumi = _mm256_dpwssd_epi32(sumi, p3, scale_pair(scl, 6));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps_256(acc);
}

// Q2_K: one float chain per row, two fmas per super-block with its exact integer sums (as every Q2_K dot
// product, x86_mm.h).
static void vec_dot_q2_K(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q2_K *w = vw;
    const block_q8_K *x = vx;
    const int64_t nb = n / QK_K;
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0f);
    const __m512i shift01 = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i shift23 = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    const __m512i pat = pack_pattern(0, 4);
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const __m128i sb = _mm_loadu_si128((const __m128i *)w[i].scales); // scale low nibble, min high
        const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sb, m4));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sb, 4), m4));
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
        const __m256i mp = _mm256_madd_epi16(mn16, load256(x[i].bsums));
        const int32_t ms = _mm512_reduce_add_epi32(_mm512_inserti64x4(_mm512_setzero_si512(), mp, 0));
        acc = fmaf(x[i].d * f16_to_f32(w[i].d), (float)_mm512_reduce_add_epi32(sumi), acc);
        acc = fmaf(-x[i].d * f16_to_f32(w[i].dmin), (float)ms, acc);
    }
    *s = acc;
}

// --- Q6_K matrix products (rows x tokens)
//
// Every output keeps vec_dot_q6_K's bits: its 8 i32 lanes (lane L sums scale * (q - 32) * x over
// elements 4L..4L+3 of every 32-element chunk of a super-block) are exact integers, so they may be
// formed in any order; then per super-block acc = fma(dx * dw, float(lanes), acc) in 8 float lanes
// and the hsum of hsum_ps_256. A zmm here covers 64 elements (two chunks: i32 lanes 0..7 and 8..15),
// the two halves of its sum are added at the end of the super-block (the lanes of both chunks).
//
// Batches (nt >= 2), per tile of 4 rows and up to Q6_TC tokens: each row's super-block is unpacked
// once into a small buffer (q - 32 as int8, the i16 scale of each element pair, the lane offset
// below) and used for every token. With the activation made unsigned, x + 128 = x ^ 0x80,
// maddubs(x + 128, q - 32) = x * (q - 32) + 128 * (q - 32) per element, so each lane starts from
// -128 * sum(scale * (q - 32)), a per-row constant: a (row, token) costs 4 maddubs and 4 vpdpwssd.
// Decode (one token), 4 rows per pass (or 2 or 1: kern_tune_t.q6_rows): the activation's 32 * x pair sums are formed once per
// super-block for the 4 rows and subtracted from maddubs(q, x) (vec_dot_q6_K's arithmetic).

#ifndef Q6_TC
#define Q6_TC 32 // tokens per chunk of a batch (accumulators on the stack)
#endif
#define Q6_R 4   // rows per tile (pairs of rows share a zmm of float lanes)

#define Q6_AI static inline __attribute__((always_inline))

// One row's super-block unpacked for the batch tiles.
typedef struct {
    __m512i q[4];  // (4, 64) int8 q - 32, elements 64m .. 64m + 63
    __m512i s[4];  // (4, 32) int16 scale of element pair 2w, 2w + 1 of those 64 elements
    __m512i off;   // (16) int32 -128 * sum(scale * (q - 32)) over each lane's elements (both chunk halves)
} q6_row_t;

// Indexes for vpermw: zmm m's i16 word w takes scale 4m + w / 8 (the sub-block of its element pair).
Q6_AI void q6_scale_idx(__m512i idx[4]) {
    for (int m = 0; m < 4; m++) {
        uint16_t v[32]; // (32) word indexes
        for (int w = 0; w < 32; w++) v[w] = (uint16_t)(4 * m + w / 8);
        memcpy(&idx[m], v, sizeof v);
    }
}

// The 6-bit values q (0..63) of super-block b in element order (4 zmm of 64) and the i16 scales.
// Element 128h + 32t + l: low nibble of ql[64h + l + 32(t & 1)] (high nibble when t >= 2), bits
// 2t, 2t+1 of qh[32h + l] on top. zmm 2h holds t = 0, 1 (shift qh left by 4 and 2, per half), zmm
// 2h + 1 holds t = 2, 3 (shift right by 0 and 2).
Q6_AI void q6_unpack(const block_q6_K *b, const __m512i idx[4], __m512i q[4], __m512i s[4]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i shl = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4), shr = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    for (int h = 0; h < 2; h++) {
        const __m512i l = load512(b->ql + 64 * h);
        const __m512i qh = bcast256(b->qh + 32 * h);
        const __m512i hi0 = _mm512_and_si512(_mm512_sllv_epi64(qh, shl), m30);
        const __m512i hi1 = _mm512_and_si512(_mm512_srlv_epi64(qh, shr), m30);
        q[2 * h] = _mm512_ternarylogic_epi32(m4, l, hi0, 0xCA);                          // m4 ? l : hi0
        q[2 * h + 1] = _mm512_ternarylogic_epi32(m4, _mm512_srli_epi16(l, 4), hi1, 0xCA); // m4 ? l >> 4 : hi1
    }
    const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales)));
    for (int m = 0; m < 4; m++) s[m] = _mm512_permutexvar_epi16(idx[m], sc);
}

Q6_AI void q6_row_prep(const block_q6_K *b, const __m512i idx[4], q6_row_t *o) {
    const __m512i m32 = _mm512_set1_epi8(32), u128 = _mm512_set1_epi8((char)0x80);
    __m512i q[4]; // (4, 64) q (0..63)
    q6_unpack(b, idx, q, o->s);
    __m512i off = _mm512_setzero_si512();
    for (int m = 0; m < 4; m++) {
        o->q[m] = _mm512_sub_epi8(q[m], m32);
        off = _mm512_dpwssd_epi32(off, _mm512_maddubs_epi16(u128, o->q[m]), o->s[m]);
    }
    o->off = _mm512_sub_epi32(_mm512_setzero_si512(), off);
}

// The i32 lanes of one super-block of rows a (zmm low half) and b (high half): the chunk halves added.
Q6_AI __m512i q6_fold2(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Rows [0, R) (R <= Q6_R; an odd last row is paired with itself) x nt <= Q6_TC tokens.
Q6_AI void q6_tile(const uint8_t *w, size_t wrow, const uint8_t *x, size_t xs, int nt, float *y, size_t ys, int64_t nb,
                   const int R) {
    const int NP = (R + 1) / 2;
    const __m512i u128 = _mm512_set1_epi8((char)0x80);
    __m512i idx[4]; // (4, 32) vpermw indexes
    q6_scale_idx(idx);
    __m512 acc[Q6_R / 2][Q6_TC]; // (pairs, tokens) 8 float lanes of row 2p (low) and 2p + 1 (high)
    for (int p = 0; p < NP; p++)
        for (int t = 0; t < nt; t++) acc[p][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        q6_row_t rw[Q6_R]; // (rows) this super-block of each row, unpacked
        __m512 dw[Q6_R / 2]; // (pairs, 16) the rows' d, 8 lanes each
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) q6_row_prep((const block_q6_K *)(w + (size_t)r * wrow) + b, idx, &rw[r]);
#pragma GCC unroll 2
        for (int p = 0; p < NP; p++) {
            const int r1 = 2 * p + 1 < R ? 2 * p + 1 : 2 * p;
            const block_q6_K *b0 = (const block_q6_K *)(w + (size_t)(2 * p) * wrow) + b;
            const block_q6_K *b1 = (const block_q6_K *)(w + (size_t)r1 * wrow) + b;
            dw[p] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(f16_to_f32(b0->d))),
                                       _mm256_set1_ps(f16_to_f32(b1->d)), 1);
        }
        for (int t = 0; t < nt; t++) {
            const block_q8_K *xb = (const block_q8_K *)(x + (size_t)t * xs) + b;
            __m512i xu[4]; // (4, 64) the token's x ^ 0x80
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++) xu[m] = _mm512_xor_si512(load512(xb->qs + 64 * m), u128);
            const __m512 dx = _mm512_set1_ps(xb->d);
#pragma GCC unroll 2
            for (int p = 0; p < NP; p++) {
                const q6_row_t *ra = &rw[2 * p], *rb = &rw[2 * p + 1 < R ? 2 * p + 1 : 2 * p];
                __m512i sa = ra->off, sb = rb->off;
#pragma GCC unroll 4
                for (int m = 0; m < 4; m++) {
                    sa = _mm512_dpwssd_epi32(sa, _mm512_maddubs_epi16(xu[m], ra->q[m]), ra->s[m]);
                    if (2 * p + 1 < R) sb = _mm512_dpwssd_epi32(sb, _mm512_maddubs_epi16(xu[m], rb->q[m]), rb->s[m]);
                }
                acc[p][t] = _mm512_fmadd_ps(_mm512_mul_ps(dx, dw[p]), _mm512_cvtepi32_ps(q6_fold2(sa, sb)), acc[p][t]);
            }
        }
    }
    for (int p = 0; p < NP; p++)
        for (int t = 0; t < nt; t++) {
            y[(size_t)t * ys + 2 * p] = hsum_ps_256(_mm512_castps512_ps256(acc[p][t]));
            if (2 * p + 1 < R) y[(size_t)t * ys + 2 * p + 1] = hsum_ps_256(_mm512_extractf32x8_ps(acc[p][t], 1));
        }
}

// Rows [0, R) x one activation row (decode), vec_dot_q6_K's arithmetic with the activation's pair
// sums shared by the rows; each row's next super-blocks are prefetched.
// pf: super-blocks each row is prefetched ahead (kern_tune_t.q6_pf; 0: none), into the next pass near
// the row's end (on Intel 16 with 4 rows, 3.4 KB each, was 1.3x faster than 4 within the row; on AMD
// Zen 5 one row with 40, 8.4 KB, 1.1x faster than 16).
Q6_AI void q6_dec(const uint8_t *w, size_t wrow, const block_q8_K *x, float *y, int64_t nb, const int R, int64_t pf) {
    const int NP = (R + 1) / 2;
    const __m512i m32 = _mm512_set1_epi8(32);
    __m512i idx[4]; // (4, 32) vpermw indexes
    q6_scale_idx(idx);
    __m512 acc[Q6_R / 2]; // (pairs, 16) 8 float lanes of row 2p (low) and 2p + 1 (high)
    for (int p = 0; p < NP; p++) acc[p] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i xv[4], xm[4]; // (4, 64) x bytes, (4, 32) i16 pair sums 32 * x
#pragma GCC unroll 4
        for (int m = 0; m < 4; m++) {
            xv[m] = load512(x[b].qs + 64 * m);
            xm[m] = _mm512_maddubs_epi16(m32, xv[m]);
        }
        const __m512 dx = _mm512_set1_ps(x[b].d);
        __m512i sum[Q6_R]; // (rows, 16) i32 lanes of both chunk halves
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const block_q6_K *wb = (const block_q6_K *)(w + (size_t)r * wrow) + b;
            if (pf) { // near the row's end, the same row of the next pass (prefetches never fault)
                const char *at = b + pf < nb ? (const char *)(wb + pf)
                                             : (const char *)((const block_q6_K *)(w + (size_t)(r + R) * wrow) + (b + pf - nb));
                for (int c = 0; c < 4; c++) _mm_prefetch(at + 64 * c, _MM_HINT_T0);
            }
            __m512i q[4], s[4]; // (4, 64) q, (4, 32) i16 scales
            q6_unpack(wb, idx, q, s);
            sum[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++)
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_sub_epi16(_mm512_maddubs_epi16(q[m], xv[m]), xm[m]), s[m]);
        }
#pragma GCC unroll 2
        for (int p = 0; p < NP; p++) {
            const int r1 = 2 * p + 1 < R ? 2 * p + 1 : 2 * p;
            const block_q6_K *b0 = (const block_q6_K *)(w + (size_t)(2 * p) * wrow) + b;
            const block_q6_K *b1 = (const block_q6_K *)(w + (size_t)r1 * wrow) + b;
            const __m512 dw = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(f16_to_f32(b0->d))),
                                                 _mm256_set1_ps(f16_to_f32(b1->d)), 1);
            acc[p] = _mm512_fmadd_ps(_mm512_mul_ps(dx, dw), _mm512_cvtepi32_ps(q6_fold2(sum[2 * p], sum[r1])), acc[p]);
        }
    }
    for (int p = 0; p < NP; p++) {
        y[2 * p] = hsum_ps_256(_mm512_castps512_ps256(acc[p]));
        if (2 * p + 1 < R) y[2 * p + 1] = hsum_ps_256(_mm512_extractf32x8_ps(acc[p], 1));
    }
}

void mmq_q6_K_avx512(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt, float *y,
                     size_t ys, int64_t n, int dec_rows, int pf) {
    const int64_t nb = n / QK_K;
    if (nt == 1) {
        const block_q8_K *xk = (const block_q8_K *)x;
        int64_t r = 0;
        if (dec_rows >= 4)
            for (; r + 4 <= nr; r += 4) q6_dec(w + (size_t)r * wrow, wrow, xk, y + r, nb, 4, pf);
        for (; dec_rows >= 2 && r + 2 <= nr; r += 2) q6_dec(w + (size_t)r * wrow, wrow, xk, y + r, nb, 2, pf);
        for (; r < nr; r++) q6_dec(w + (size_t)r * wrow, wrow, xk, y + r, nb, 1, pf);
        return;
    }
    for (int t = 0; t < nt; t += Q6_TC) {
        const int tc = nt - t < Q6_TC ? nt - t : Q6_TC;
        const uint8_t *xt = x + (size_t)t * xs;
        float *yt = y + (size_t)t * ys;
        int64_t r = 0;
        for (; r + Q6_R <= nr; r += Q6_R) q6_tile(w + (size_t)r * wrow, wrow, xt, xs, tc, yt + r, ys, nb, Q6_R);
        for (; r + 2 <= nr; r += 2) q6_tile(w + (size_t)r * wrow, wrow, xt, xs, tc, yt + r, ys, nb, 2);
        for (; r < nr; r++) q6_tile(w + (size_t)r * wrow, wrow, xt, xs, tc, yt + r, ys, nb, 1);
    }
}

// --- public API

void kern_x86_k_avx512_fill(kernels_t *k) {
    k->vec_dot[QT_Q2_K] = vec_dot_q2_K;
    k->vec_dot[QT_Q4_K] = vec_dot_q4_K;
    k->vec_dot[QT_Q5_K] = vec_dot_q5_K;
    k->vec_dot[QT_Q6_K] = vec_dot_q6_K;
}
