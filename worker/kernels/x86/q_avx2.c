// x86 kernels (q_avx2): F32/F16/BF16/Q4_0/Q8_0 dot products, activation quantizers and packed matmul tiles (AVX2/FMA/F16C).
//
// Activation quantizers give the same bytes as quant_quantize_ref: Q8_0/Q8_1 scale by 127/amax and
// round half to even (llama.cpp's x86 rounding, as the reference), Q8_K rounds to nearest even like
// the reference's nearest_int, F16 uses vcvtps2ph (RNE) and BF16 integer RNE.
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "worker/kernels/x86/x86.h"
#include "worker/kernels/x86/x86_mm.h"

// --- helpers

#define AI static inline __attribute__((always_inline))

AI float f16_to_f32(mlm_f16_t h) { return _cvtsh_ss(h); }

AI int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

AI __m256i bcast_i32(const void *p) { return _mm256_set1_epi32(load_i32(p)); }

AI float hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

AI float hmax_ps(__m256 v) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

AI int hsum_epi32(__m256i v) {
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return _mm_cvtsi128_si32(r);
}

AI __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

// Four vectors of 8 int32 (each within int8 range) -> 32 int8 in order.
AI __m256i pack_i32x4_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

AI __m256 load_as_f32(qtype_t t, const uint8_t *p, int64_t i) {
    if (t == QT_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (t == QT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AI float scalar_as_f32(qtype_t t, const uint8_t *p, int64_t i) {
    if (t == QT_F32) return ((const float *)p)[i];
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return t == QT_F16 ? mlm_f16_to_f32(h) : mlm_bf16_to_f32(h);
}

// --- dot products (one row)

AI float dot_float(qtype_t t, int64_t n, const void *vw, const void *vx) {
    const uint8_t *w = vw, *x = vx;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(load_as_f32(t, w, i), load_as_f32(t, x, i), a0);
        a1 = _mm256_fmadd_ps(load_as_f32(t, w, i + 8), load_as_f32(t, x, i + 8), a1);
        a2 = _mm256_fmadd_ps(load_as_f32(t, w, i + 16), load_as_f32(t, x, i + 16), a2);
        a3 = _mm256_fmadd_ps(load_as_f32(t, w, i + 24), load_as_f32(t, x, i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load_as_f32(t, w, i), load_as_f32(t, x, i), a0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += scalar_as_f32(t, w, i) * scalar_as_f32(t, x, i);
    return s;
}

static void vec_dot_f32(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_F32, n, w, x); }
static void vec_dot_f16(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_F16, n, w, x); }
static void vec_dot_bf16(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_BF16, n, w, x); }

static void vec_dot_q4_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_0 *w = vw;   // (n / 32)
    const block_q8_0 *x = vx;   // (n / 32)
    const int64_t nb = n / QK4_0;
    const __m256i m4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i q = _mm_loadu_si128((const __m128i *)w[b].qs);
        __m256i qv = _mm256_sub_epi8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4), eight);
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(qv, qv), _mm256_sign_epi8(xv, qv)), ones);
        __m256 d = _mm256_set1_ps(f16_to_f32(w[b].d) * f16_to_f32(x[b].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc); // one chain, as the reference
    }
    *s = hsum_ps(acc);
}

static void vec_dot_q8_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q8_0 *w = vw;   // (n / 32)
    const block_q8_0 *x = vx;   // (n / 32)
    const int64_t nb = n / QK8_0;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)w[b].qs);
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones);
        __m256 d = _mm256_set1_ps(f16_to_f32(w[b].d) * f16_to_f32(x[b].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc); // one chain, as the reference
    }
    *s = hsum_ps(acc);
}

// --- activation quantizers

// One block of 32: q = rint(x * 127 / amax), d = amax / 127 (as the reference); returns sum(q).
AI int quant_block32(const float *x, mlm_f16_t *dh, int8_t *qs, float *dout) {
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    float amax = hmax_ps(_mm256_max_ps(_mm256_max_ps(abs_ps(v0), abs_ps(v1)), _mm256_max_ps(abs_ps(v2), abs_ps(v3))));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *dh = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    *dout = d;
    __m256 vid = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
    _mm256_storeu_si256((__m256i *)qs, pack_i32x4_i8(i0, i1, i2, i3));
    return hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
}

static void from_float_q8_0(const float *x, void *vy, int64_t n) {
    block_q8_0 *y = vy; // (n / 32)
    float d;
    for (int64_t b = 0; b < n / QK8_0; b++) quant_block32(x + b * QK8_0, &y[b].d, y[b].qs, &d);
}

static void from_float_q8_1(const float *x, void *vy, int64_t n) {
    block_q8_1 *y = vy; // (n / 32)
    for (int64_t b = 0; b < n / QK8_1; b++) {
        float d;
        int sum = quant_block32(x + b * QK8_1, &y[b].d, y[b].qs, &d);
        y[b].s = _cvtss_sh((float)sum * d, _MM_FROUND_TO_NEAREST_INT);
    }
}

static void from_float_q8_k(const float *x, void *vy, int64_t n) {
    block_q8_K *y = vy; // (n / 256)
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        __m256 amaxv = _mm256_setzero_ps();
        for (int j = 0; j < 32; j++) amaxv = _mm256_max_ps(amaxv, abs_ps(_mm256_loadu_ps(x + 8 * j)));
        float amax = hmax_ps(amaxv);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        // the reference keeps the first element whose magnitude is amax (with its sign)
        float maxv = 0.0f;
        for (int j = 0; j < 32; j++) {
            int hit = _mm256_movemask_ps(_mm256_cmp_ps(abs_ps(_mm256_loadu_ps(x + 8 * j)), _mm256_set1_ps(amax), _CMP_EQ_OQ));
            if (hit) {
                maxv = x[8 * j + __builtin_ctz((unsigned)hit)];
                break;
            }
        }
        const float iscale = -127.0f / maxv;
        const __m256 vs = _mm256_set1_ps(iscale);
        const __m256i top = _mm256_set1_epi32(127);
        for (int j = 0; j < 8; j++) {
            const float *xj = x + 32 * j;
            __m256i i0 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xj), vs)), top);
            __m256i i1 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xj + 8), vs)), top);
            __m256i i2 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xj + 16), vs)), top);
            __m256i i3 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xj + 24), vs)), top);
            _mm256_storeu_si256((__m256i *)(y[b].qs + 32 * j), pack_i32x4_i8(i0, i1, i2, i3));
            y[b].bsums[2 * j] = (int16_t)hsum_epi32(_mm256_add_epi32(i0, i1));
            y[b].bsums[2 * j + 1] = (int16_t)hsum_epi32(_mm256_add_epi32(i2, i3));
        }
        y[b].d = 1.0f / iscale;
    }
}

static void from_float_f16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy; // (n)
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) y[i] = mlm_f32_to_f16(x[i]);
}

static void from_float_bf16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy; // (n)
    const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(64);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i r[2];
        for (int h = 0; h < 2; h++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * h);
            __m256i u = _mm256_castps_si256(v);
            __m256i hi = _mm256_srli_epi32(u, 16);
            __m256i rn = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(hi, lsb))), 16);
            __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            r[h] = _mm256_blendv_epi8(rn, _mm256_or_si256(hi, quiet), nan);
        }
        __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
        _mm256_storeu_si256((__m256i *)(y + i), p);
    }
    for (; i < n; i++) y[i] = mlm_f32_to_bf16(x[i]);
}

// --- packed 16-row group kernels (layout in x86_mm.h), eight rows per ymm half

AI void store_rows8(float *y, uint32_t bits, __m256 v) {
    if (bits == 0xffu) {
        _mm256_storeu_ps(y, v);
    } else if (bits) {
        const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), sel), sel);
        _mm256_maskstore_ps(y, m, v);
    }
}

// NT activation rows (1..4) against one half (8 rows) of a 16-row Q4_0 group.
AI void half_tile(const uint8_t *grp, int64_t nb, int h, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                  uint32_t bits) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const size_t toff = mmp_act_tail_off(nb);
    __m256 acc[4];
    const uint8_t *xr[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        acc[t] = _mm256_setzero_ps();
        xr[t] = xq + (size_t)t * xs;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = mmp_block_quants(MMP_Q4_0X16, grp, b) + (size_t)h * 32;
        __m256i s[4];
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) s[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(q + 64 * j));
            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                const uint8_t *xb = xr[t] + (size_t)b * sizeof(block_q8_0) + 2;
                __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast_i32(xb + 4 * j)),
                                             _mm256_maddubs_epi16(hi, bcast_i32(xb + 16 + 4 * j)));
                s[t] = _mm256_add_epi32(s[t], _mm256_madd_epi16(p, ones));
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) s[t] = _mm256_add_epi32(s[t], _mm256_set1_epi32(load_i32(xr[t] + toff + (size_t)b * 4)));
        __m256 dw = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(mmp_block_scales(MMP_Q4_0X16, grp, b) + (size_t)h * 16)));
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            float dx;
            memcpy(&dx, xr[t] + toff + (size_t)(nb + b) * 4, 4);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) store_rows8(y + (size_t)t * ys + 8 * h, bits, acc[t]);
}

AI void group_all(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                  uint32_t mask) {
    for (int h = 0; h < 2; h++) {
        const uint32_t bits = (mask >> (8 * h)) & 0xffu;
        if (!bits) continue;
        int t = 0;
        for (; t + 4 <= nt; t += 4) half_tile(grp, nb, h, xq + (size_t)t * xs, xs, 4, y + (size_t)t * ys, ys, bits);
        for (; t < nt; t++) half_tile(grp, nb, h, xq + (size_t)t * xs, xs, 1, y + (size_t)t * ys, ys, bits);
    }
}

#ifndef MMP_PREFETCH_AVX2
#define MMP_PREFETCH_AVX2 2048 // bytes ahead of the block pair being read that decode prefetches (0: none)
#endif

// NG (1..4) groups of 16 Q4_0 rows against one activation row (decode), both halves of each group in
// one pass and the groups side by side: NG prefetched streams per thread where half_tile reads each
// group twice. Each half's sums are half_tile's (NT = 1) operations in its order, so the bits are its.
AI void q4x16_decode_n_avx2(const uint8_t *g0, size_t gstride, const int NG, int64_t nb, const uint8_t *xr, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const size_t toff = mmp_act_tail_off(nb);
    __m256 acc[4][2];
#pragma GCC unroll 4
    for (int k = 0; k < NG; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = xr + (size_t)b * sizeof(block_q8_0) + 2;
        const __m256i corr = _mm256_set1_epi32(load_i32(xr + toff + (size_t)b * 4));
        float dx;
        memcpy(&dx, xr + toff + (size_t)(nb + b) * 4, 4);
        const __m256 dxv = _mm256_set1_ps(dx);
#pragma GCC unroll 4
        for (int k = 0; k < NG; k++) {
            const uint8_t *grp = g0 + (size_t)k * gstride;
            const uint8_t *q = mmp_block_quants(MMP_Q4_0X16, grp, b);
            if (MMP_PREFETCH_AVX2 && (b & 1) == 0) // q starts a pair (9 lines)
#pragma GCC unroll 9
                for (int l = 0; l < 9; l++) _mm_prefetch((const char *)q + MMP_PREFETCH_AVX2 + 64 * l, _MM_HINT_T0);
            const uint8_t *sc = mmp_block_scales(MMP_Q4_0X16, grp, b);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 64 * j + 32 * h));
                    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast_i32(xb + 4 * j)),
                                                       _mm256_maddubs_epi16(hi, bcast_i32(xb + 16 + 4 * j)));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                }
                s = _mm256_add_epi32(s, corr);
                const __m256 dw = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(sc + (size_t)h * 16)));
                acc[k][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dxv), acc[k][h]);
            }
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NG; k++) {
        _mm256_storeu_ps(y + 16 * k, acc[k][0]);
        _mm256_storeu_ps(y + 16 * k + 8, acc[k][1]);
    }
}

void mmp_q4_0x16_decn_avx2(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xr, float *y) {
    if (ng == 4) q4x16_decode_n_avx2(g0, gstride, 4, nb, xr, y);
    else if (ng == 3) q4x16_decode_n_avx2(g0, gstride, 3, nb, xr, y);
    else if (ng == 2) q4x16_decode_n_avx2(g0, gstride, 2, nb, xr, y);
    else q4x16_decode_n_avx2(g0, gstride, 1, nb, xr, y);
}

void mmp_q4_0x16_avx2(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                      uint32_t mask) {
    group_all(grp, nb, xq, xs, nt, y, ys, mask);
}

// --- plain F32 / F16 rows in the reference's orders (x86_mm.h), 16 lanes as two ymm halves

// One output: tiled = one 16-lane fma chain (tinyBLAS); otherwise ggml_vec_dot_f32/f16's order.
// A 16-lane reduction is hsum(hi + lo), the tree of _mm512_reduce_add_ps.
AI float float_dot_exact(qtype_t t, const uint8_t *w, const uint8_t *x, int64_t n, bool tiled) {
    if (tiled) {
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int64_t c = 0; c < n; c += 16) {
            lo = _mm256_fmadd_ps(load_as_f32(t, w, c), load_as_f32(t, x, c), lo);
            hi = _mm256_fmadd_ps(load_as_f32(t, w, c + 8), load_as_f32(t, x, c + 8), hi);
        }
        return hsum_ps(_mm256_add_ps(hi, lo));
    }
    __m256 a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
    const int64_t np = n & ~(int64_t)63;
    for (int64_t i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int h = 0; h < 2; h++)
                a[j][h] = _mm256_fmadd_ps(load_as_f32(t, w, i + 16 * j + 8 * h), load_as_f32(t, x, i + 16 * j + 8 * h), a[j][h]);
    __m256 c[2];
    for (int h = 0; h < 2; h++) c[h] = _mm256_add_ps(_mm256_add_ps(a[0][h], a[2][h]), _mm256_add_ps(a[1][h], a[3][h]));
    const float head = hsum_ps(_mm256_add_ps(c[1], c[0]));
    if (t == QT_F32) {
        const int64_t n8 = np + ((n - np) & ~(int64_t)7);
        float sf = head;
        for (int64_t i = np; i < n8; i++) sf += scalar_as_f32(t, w, i) * scalar_as_f32(t, x, i);
        for (int64_t i = n8; i < n; i++) sf = fmaf(scalar_as_f32(t, w, i), scalar_as_f32(t, x, i), sf);
        return sf;
    }
    double sd = head;
    for (int64_t i = np; i < n; i++) sd += (double)(scalar_as_f32(t, w, i) * scalar_as_f32(t, x, i));
    return (float)sd;
}

void mmp_float_avx2(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                    float *y, size_t ys, int64_t n, bool tiled) {
    for (int64_t r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            y[(size_t)t * ys + r] = type == QT_F32 ? float_dot_exact(QT_F32, w + (size_t)r * wrow, x + (size_t)t * xs, n, tiled)
                                                   : float_dot_exact(QT_F16, w + (size_t)r * wrow, x + (size_t)t * xs, n, tiled);
}

// --- memory stream (kern_read_sum_fn): the buffer's quarters read side by side (four streams, as the
// decode kernels read several rows or groups at once), 128 bytes of each per step

static uint64_t read_sum(const void *p, size_t n) {
    const uint8_t *b = p;
    const size_t q = n / 128 / 4; // 128-byte chunks per stream
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (size_t i = 0; i < q * 128; i += 128)
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            const uint8_t *c = b + (size_t)s * q * 128 + i;
            a[s] = _mm256_add_epi64(a[s], _mm256_add_epi64(_mm256_add_epi64(_mm256_load_si256((const __m256i *)c), _mm256_load_si256((const __m256i *)(c + 32))),
                                                           _mm256_add_epi64(_mm256_load_si256((const __m256i *)(c + 64)), _mm256_load_si256((const __m256i *)(c + 96)))));
        }
    for (size_t i = 4 * q * 128; i + 128 <= n; i += 128) // the rest, one stream
        a[0] = _mm256_add_epi64(a[0], _mm256_add_epi64(_mm256_add_epi64(_mm256_load_si256((const __m256i *)(b + i)), _mm256_load_si256((const __m256i *)(b + i + 32))),
                                                       _mm256_add_epi64(_mm256_load_si256((const __m256i *)(b + i + 64)), _mm256_load_si256((const __m256i *)(b + i + 96)))));
    uint64_t lanes[4]; // (4)
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(a[0], a[1]), _mm256_add_epi64(a[2], a[3])));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

// --- table

void kern_x86_q_avx2_fill(kernels_t *k) {
    k->read_sum = read_sum;
    k->vec_dot[QT_F32] = vec_dot_f32;
    k->vec_dot[QT_F16] = vec_dot_f16;
    k->vec_dot[QT_BF16] = vec_dot_bf16;
    k->vec_dot[QT_Q4_0] = vec_dot_q4_0;
    k->vec_dot[QT_Q8_0] = vec_dot_q8_0;
    k->from_float[QT_Q8_0] = from_float_q8_0;
    k->from_float[QT_Q8_1] = from_float_q8_1;
    k->from_float[QT_Q8_K] = from_float_q8_k;
    k->from_float[QT_F16] = from_float_f16;
    k->from_float[QT_BF16] = from_float_bf16;
}
