// x86 kernels (q_avx512): F32/F16/BF16/Q4_0/Q8_0 dot products, activation quantizers and packed matmul tiles (AVX-512 + VNNI).
//
// Activation quantizers give the same bytes as quant_quantize_ref: Q8_0/Q8_1 scale by 127/amax and
// round half to even (llama.cpp's x86 rounding, as the reference), Q8_K rounds to nearest even like
// the reference's nearest_int, F16 uses vcvtps2ph (RNE, subnormals exact) and BF16 uses integer RNE (not
// vcvtneps2bf16, which treats subnormal inputs as zero).
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

AI float load_f32(const void *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

AI __m512i bcast_i32(const void *p) { return _mm512_set1_epi32(load_i32(p)); }

// n floats of type t (F32, F16 or BF16) at p + i, expanded to float32; masked lanes read as 0.
AI __m512 load_as_f32(qtype_t t, const uint8_t *p, int64_t i, __mmask16 m) {
    if (t == QT_F32) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
    if (t == QT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AI __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u); }

// --- dot products (one row)

AI float dot_float(qtype_t t, int64_t n, const void *w, const void *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(load_as_f32(t, w, i, 0xffff), load_as_f32(t, x, i, 0xffff), a0);
        a1 = _mm512_fmadd_ps(load_as_f32(t, w, i + 16, 0xffff), load_as_f32(t, x, i + 16, 0xffff), a1);
        a2 = _mm512_fmadd_ps(load_as_f32(t, w, i + 32, 0xffff), load_as_f32(t, x, i + 32, 0xffff), a2);
        a3 = _mm512_fmadd_ps(load_as_f32(t, w, i + 48, 0xffff), load_as_f32(t, x, i + 48, 0xffff), a3);
    }
    for (; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        a0 = _mm512_fmadd_ps(load_as_f32(t, w, i, m), load_as_f32(t, x, i, m), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

static void vec_dot_f32(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_F32, n, w, x); }
static void vec_dot_f16(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_F16, n, w, x); }
static void vec_dot_bf16(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_BF16, n, w, x); }

// Q4_0 / Q8_0 . Q8_0 as llama.cpp's x86 vec_dot: i32 lane L = elements 4L..4L+3 of a block, one
// fma chain of 8 float lanes over the blocks, hsum in its order (bit-identical results).
AI float hsum8_ps(__m256 a) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static void vec_dot_q4_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_0 *w = vw;   // (n / 32)
    const block_q8_0 *x = vx;   // (n / 32)
    const int64_t nb = n / QK4_0;
    const __m256i m4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i q = _mm_loadu_si128((const __m128i *)w[b].qs);
        __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4); // elements 0..15, 16..31
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nib, xv);
        __m256i c = _mm256_dpbusd_epi32(_mm256_setzero_si256(), eight, xv);
        __m256 d = _mm256_set1_ps(f16_to_f32(w[b].d) * f16_to_f32(x[b].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(p, c)), acc);
    }
    *s = hsum8_ps(acc);
}

static void vec_dot_q8_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q8_0 *w = vw;   // (n / 32)
    const block_q8_0 *x = vx;   // (n / 32)
    const int64_t nb = n / QK8_0;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)w[b].qs);
        __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        __m256 d = _mm256_set1_ps(f16_to_f32(w[b].d) * f16_to_f32(x[b].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum8_ps(acc);
}

// --- activation quantizers

// One block of 32: q = rint(x * 127 / amax), d = amax / 127 (as the reference); returns sum(q).
AI int quant_block32(const float *x, mlm_f16_t *dh, int8_t *qs, float *dout) {
    __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *dh = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    *dout = d;
    __m512 vid = _mm512_set1_ps(id);
    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
    __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
    _mm_storeu_si128((__m128i *)qs, _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(qs + 16), _mm512_cvtsepi32_epi8(i1));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
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
        __m512 amaxv = _mm512_setzero_ps();
        for (int j = 0; j < 16; j++) amaxv = _mm512_max_ps(amaxv, _mm512_abs_ps(_mm512_loadu_ps(x + 16 * j)));
        float amax = _mm512_reduce_max_ps(amaxv);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        // the reference keeps the first element whose magnitude is amax (with its sign)
        float maxv = 0.0f;
        for (int j = 0; j < 16; j++) {
            __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + 16 * j)), _mm512_set1_ps(amax), _CMP_EQ_OQ);
            if (hit) {
                maxv = x[16 * j + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.0f / maxv;
        const __m512 vs = _mm512_set1_ps(iscale);
        const __m512i top = _mm512_set1_epi32(127);
        for (int j = 0; j < 16; j++) {
            __m512i q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * j), vs)), top);
            _mm_storeu_si128((__m128i *)(y[b].qs + 16 * j), _mm512_cvtsepi32_epi8(q));
            y[b].bsums[j] = (int16_t)_mm512_reduce_add_epi32(q);
        }
        y[b].d = 1.0f / iscale;
    }
}

static void from_float_f16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy; // (n)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(y + i, m, h);
    }
}

static void from_float_bf16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy; // (n)
    const __m512i lsb = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(64);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512i u = _mm512_castps_si512(v);
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
        _mm256_mask_storeu_epi16(y + i, m, _mm512_cvtepi32_epi16(r));
    }
}

// --- packed 16-row group kernels (layout in x86_mm.h)

#ifndef MMP_PREFETCH
#define MMP_PREFETCH 2048 // bytes ahead of the Q4_0 block pair being read that decode prefetches (0: none)
#endif
#ifndef MMP_PREFETCH_HINT
#define MMP_PREFETCH_HINT _MM_HINT_T0 // cache level the decode prefetch fills
#endif
#ifndef MMP_PREFETCH_Q8
#define MMP_PREFETCH_Q8 2048 // the same for packed Q8_0
#endif

// Integer dot of block b of a Q4_0 group (quants v0..v3, one dword per row) with activation block
// qs xb, started from corr: the high nibbles are used in place as 16 * hi (v & 0xf0, no shift) in a
// second chain whose sum is divided by 16 exactly at the end (two chains for latency). Same integer
// as the 8-step single chain of q4x16_tile.
AI __m512i q4x16_isum_split(__m512i v0, __m512i v1, __m512i v2, __m512i v3, const uint8_t *xb, int32_t corr) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i sa = _mm512_dpbusd_epi32(_mm512_set1_epi32(corr), _mm512_and_si512(v0, m4), bcast_i32(xb));
    __m512i sb = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_andnot_si512(m4, v0), bcast_i32(xb + 16));
    sa = _mm512_dpbusd_epi32(sa, _mm512_and_si512(v1, m4), bcast_i32(xb + 4));
    sb = _mm512_dpbusd_epi32(sb, _mm512_andnot_si512(m4, v1), bcast_i32(xb + 20));
    sa = _mm512_dpbusd_epi32(sa, _mm512_and_si512(v2, m4), bcast_i32(xb + 8));
    sb = _mm512_dpbusd_epi32(sb, _mm512_andnot_si512(m4, v2), bcast_i32(xb + 24));
    sa = _mm512_dpbusd_epi32(sa, _mm512_and_si512(v3, m4), bcast_i32(xb + 12));
    sb = _mm512_dpbusd_epi32(sb, _mm512_andnot_si512(m4, v3), bcast_i32(xb + 28));
    return _mm512_add_epi32(sa, _mm512_srai_epi32(sb, 4));
}

#define Q4_PAIR 576 // mmp_pair_bytes(MMP_Q4_0X16)

// One activation row against one group of 16 Q4_0 rows (decode): the group is one linear stream
// of block pairs (x86_mm.h), prefetched MMP_PREFETCH bytes ahead; each row's sum is one fma chain
// over the blocks in order.
AI void q4x16_decode(const uint8_t *grp, int64_t nb, const uint8_t *xr, float *y, __mmask16 m) {
    const size_t toff = mmp_act_tail_off(nb);
    const uint8_t *corr = xr + toff;              // (nb) int32
    const uint8_t *dx = xr + toff + (size_t)nb * 4; // (nb) float
    __m512 acc = _mm512_setzero_ps();
    int64_t b = 0;
    for (const uint8_t *p = grp; b + 2 <= nb; b += 2, p += Q4_PAIR) {
        if (MMP_PREFETCH) {
#pragma GCC unroll 9
            for (int l = 0; l < 9; l++) _mm_prefetch((const char *)p + MMP_PREFETCH + 64 * l, MMP_PREFETCH_HINT);
        }
        const uint8_t *xb = xr + (size_t)b * sizeof(block_q8_0) + 2;
        __m512i s0 = q4x16_isum_split(_mm512_load_si512(p), _mm512_load_si512(p + 64), _mm512_load_si512(p + 128),
                                      _mm512_load_si512(p + 192), xb, load_i32(corr + 4 * b));
        __m512i s1 = q4x16_isum_split(_mm512_load_si512(p + 256), _mm512_load_si512(p + 320),
                                      _mm512_load_si512(p + 384), _mm512_load_si512(p + 448),
                                      xb + sizeof(block_q8_0), load_i32(corr + 4 * b + 4));
        __m512 d0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p + 512)));
        __m512 d1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p + 544)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, _mm512_set1_ps(load_f32(dx + 4 * b))), acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(d1, _mm512_set1_ps(load_f32(dx + 4 * b + 4))), acc);
    }
    if (b < nb) { // odd nb: the last pair holds one block
        const uint8_t *p = mmp_block_quants(MMP_Q4_0X16, grp, b);
        __m512i s0 = q4x16_isum_split(_mm512_load_si512(p), _mm512_load_si512(p + 64), _mm512_load_si512(p + 128),
                                      _mm512_load_si512(p + 192), xr + (size_t)b * sizeof(block_q8_0) + 2, load_i32(corr + 4 * b));
        __m512 d0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)mmp_block_scales(MMP_Q4_0X16, grp, b)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(d0, _mm512_set1_ps(load_f32(dx + 4 * b))), acc);
    }
    _mm512_mask_storeu_ps(y, m, acc);
}

// NG groups of 16 Q4_0 rows against one activation row (decode), walked side by side: NG streams
// in flight per thread instead of one (each prefetched pf bytes ahead); each row's sum is the same fma
// chain as q4x16_decode's. nb even; group k at g0 + k * gstride, its rows to y + 16 k.
AI void q4x16_decode_n(const uint8_t *g0, size_t gstride, const int NG, int64_t nb, const uint8_t *xr, float *y,
                       size_t pf) {
    const size_t toff = mmp_act_tail_off(nb);
    const uint8_t *corr = xr + toff;
    const uint8_t *dx = xr + toff + (size_t)nb * 4;
    __m512 acc[4];
#pragma GCC unroll 4
    for (int k = 0; k < NG; k++) acc[k] = _mm512_setzero_ps();
    for (int64_t b = 0; b + 2 <= nb; b += 2) {
        const size_t o = (size_t)(b / 2) * Q4_PAIR;
        const uint8_t *xb = xr + (size_t)b * sizeof(block_q8_0) + 2;
        const __m512 s0 = _mm512_set1_ps(load_f32(dx + 4 * b)), s1 = _mm512_set1_ps(load_f32(dx + 4 * b + 4));
        const int32_t c0 = load_i32(corr + 4 * b), c1 = load_i32(corr + 4 * b + 4);
#pragma GCC unroll 4
        for (int k = 0; k < NG; k++) {
            const uint8_t *p = g0 + (size_t)k * gstride + o;
            if (pf) {
#pragma GCC unroll 9
                for (int l = 0; l < 9; l++) _mm_prefetch((const char *)p + pf + 64 * l, MMP_PREFETCH_HINT);
            }
            __m512i i0 = q4x16_isum_split(_mm512_load_si512(p), _mm512_load_si512(p + 64), _mm512_load_si512(p + 128),
                                          _mm512_load_si512(p + 192), xb, c0);
            __m512i i1 = q4x16_isum_split(_mm512_load_si512(p + 256), _mm512_load_si512(p + 320),
                                          _mm512_load_si512(p + 384), _mm512_load_si512(p + 448),
                                          xb + sizeof(block_q8_0), c1);
            __m512 d0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p + 512)));
            __m512 d1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p + 544)));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(d0, s0), acc[k]);
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(d1, s1), acc[k]);
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < NG; k++) _mm512_storeu_ps(y + 16 * k, acc[k]);
}

void mmp_q4_0x16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xr, float *y,
                             size_t pf) {
    if (ng == 4) q4x16_decode_n(g0, gstride, 4, nb, xr, y, pf);
    else if (ng == 3) q4x16_decode_n(g0, gstride, 3, nb, xr, y, pf);
    else if (ng == 2) q4x16_decode_n(g0, gstride, 2, nb, xr, y, pf);
    else q4x16_decode_n(g0, gstride, 1, nb, xr, y, pf);
}

// NT activation rows (1..8) against block b of a Q4_0 group (quants q, scales sc): one fma per row
// and token into acc, the integer sum as one dpbusd chain in element order.
AI void q4x16_block(const uint8_t *q, const uint8_t *sc, int64_t b, int64_t nb, const uint8_t *const *xr, size_t toff,
                    const int NT, __m512 *acc) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i v0 = _mm512_load_si512(q), v1 = _mm512_load_si512(q + 64);
    __m512i v2 = _mm512_load_si512(q + 128), v3 = _mm512_load_si512(q + 192);
    __m512i l0 = _mm512_and_si512(v0, m4), l1 = _mm512_and_si512(v1, m4);
    __m512i l2 = _mm512_and_si512(v2, m4), l3 = _mm512_and_si512(v3, m4);
    __m512i h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4), h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
    __m512i h2 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4), h3 = _mm512_and_si512(_mm512_srli_epi16(v3, 4), m4);
    __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)sc));
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        const uint8_t *xb = xr[t] + (size_t)b * sizeof(block_q8_0) + 2; // qs of block b
        const int32_t corr = load_i32(xr[t] + toff + (size_t)b * 4);
        const float dx = load_f32(xr[t] + toff + (size_t)(nb + b) * 4);
        __m512i s = _mm512_dpbusd_epi32(_mm512_set1_epi32(corr), l0, bcast_i32(xb));
        s = _mm512_dpbusd_epi32(s, l1, bcast_i32(xb + 4));
        s = _mm512_dpbusd_epi32(s, l2, bcast_i32(xb + 8));
        s = _mm512_dpbusd_epi32(s, l3, bcast_i32(xb + 12));
        s = _mm512_dpbusd_epi32(s, h0, bcast_i32(xb + 16));
        s = _mm512_dpbusd_epi32(s, h1, bcast_i32(xb + 20));
        s = _mm512_dpbusd_epi32(s, h2, bcast_i32(xb + 24));
        s = _mm512_dpbusd_epi32(s, h3, bcast_i32(xb + 28));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[t]);
    }
}

// NT activation rows (1..8) against one group of 16 Q4_0 rows.
AI void q4x16_tile(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                   __mmask16 m) {
    if (NT == 1) {
        q4x16_decode(grp, nb, xq, y, m);
        return;
    }
    const size_t toff = mmp_act_tail_off(nb);
    __m512 acc[8];
    const uint8_t *xr[8];
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        acc[t] = _mm512_setzero_ps();
        xr[t] = xq + (size_t)t * xs;
    }
    int64_t b = 0;
    for (const uint8_t *p = grp; b + 2 <= nb; b += 2, p += Q4_PAIR) {
        q4x16_block(p, p + 512, b, nb, xr, toff, NT, acc);
        q4x16_block(p + 256, p + 544, b + 1, nb, xr, toff, NT, acc);
    }
    if (b < nb)
        q4x16_block(mmp_block_quants(MMP_Q4_0X16, grp, b), mmp_block_scales(MMP_Q4_0X16, grp, b), b, nb, xr, toff, NT, acc);
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + (size_t)t * ys, m, acc[t]);
}

// NT activation rows (1..3) against one group of 16 Q8_0 rows (stored as q + 128), each output in
// vec_dot_q8_0's order and bits: zmm L of a block holds integer lane L of the 16 rows, formed exactly
// as dpbusd(corr_L, w + 128, x[4L..4L+3]) with corr_L = -128 * sum(x[4L..4L+3]) from the activation's
// tail; then acc_L = fma(dw * dx, float(lane L), acc_L) per row, and at the end hsum_float_8's tree
// over the 8 lanes. Per (block, token) that is 8 dpbusd, 8 conversions and 8 fmas for 16 rows: a
// third of the vector work of the plain-row kernels, so decode is bound by the read, not by the core.
AI void q8x16_tile(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                   __mmask16 m) {
    const size_t toff = mmp_act_tail_off(nb), doff = mmp_act_d_off(nb, MMP_Q8_LANES);
    __m512 acc[3][8]; // (token, lane) the 16 rows
    const uint8_t *xr[3];
#pragma GCC unroll 3
    for (int t = 0; t < NT; t++) {
        xr[t] = xq + (size_t)t * xs;
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) acc[t][l] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = mmp_block_quants(MMP_Q8_0X16, grp, b);
        const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)mmp_block_scales(MMP_Q8_0X16, grp, b)));
        __m512 dv[3];
        const uint8_t *xb[3], *cr[3];
#pragma GCC unroll 3
        for (int t = 0; t < NT; t++) {
            dv[t] = _mm512_mul_ps(dw, _mm512_set1_ps(load_f32(xr[t] + doff + (size_t)b * 4)));
            xb[t] = xr[t] + (size_t)b * sizeof(block_q8_0) + 2;
            cr[t] = xr[t] + toff + (size_t)b * 4 * MMP_Q8_LANES;
        }
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) {
            if (NT == 1 && MMP_PREFETCH_Q8 > 0) { // spread over the lanes (a burst of 17 per pair stalled the
                                                  // core on Zen 5): this block's quant lines, the pair's scales
                _mm_prefetch((const char *)q + MMP_PREFETCH_Q8 + 64 * l, _MM_HINT_T0);
                if (l == 0 && (b & 1) == 0) _mm_prefetch((const char *)q + MMP_PREFETCH_Q8 + 1024, _MM_HINT_T0);
            }
            const __m512i v = _mm512_load_si512(q + 64 * l);
#pragma GCC unroll 3
            for (int t = 0; t < NT; t++) {
                const __m512i s = _mm512_dpbusd_epi32(bcast_i32(cr[t] + 4 * l), v, bcast_i32(xb[t] + 4 * l));
                acc[t][l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dv[t], acc[t][l]);
            }
        }
    }
#pragma GCC unroll 3
    for (int t = 0; t < NT; t++) {
        const __m512 *a = acc[t];
        const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                       _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])));
        _mm512_mask_storeu_ps(y + (size_t)t * ys, m, r);
    }
}

// NG (1..2) full groups of 16 Q8_0 rows against one activation row (decode), walked side by side (NG
// streams per thread, each prefetched pf bytes ahead); each row's lanes and sums are q8x16_tile's (NT =
// 1), so its bits.
AI void q8x16_decode_n(const uint8_t *g0, size_t gstride, const int NG, int64_t nb, const uint8_t *xr, float *y,
                       size_t pf) {
    const size_t toff = mmp_act_tail_off(nb), doff = mmp_act_d_off(nb, MMP_Q8_LANES);
    __m512 acc[2][8]; // (group, lane) the 16 rows
#pragma GCC unroll 2
    for (int k = 0; k < NG; k++)
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) acc[k][l] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = xr + (size_t)b * sizeof(block_q8_0) + 2, *cr = xr + toff + (size_t)b * 4 * MMP_Q8_LANES;
        const __m512 dx = _mm512_set1_ps(load_f32(xr + doff + (size_t)b * 4));
#pragma GCC unroll 2
        for (int k = 0; k < NG; k++) {
            const uint8_t *grp = g0 + (size_t)k * gstride, *q = mmp_block_quants(MMP_Q8_0X16, grp, b);
            if (pf > 0 && (b & 1) == 0) {
#pragma GCC unroll 17
                for (int l = 0; l < 17; l++) _mm_prefetch((const char *)q + pf + 64 * l, _MM_HINT_T0);
            }
            const __m512 dv = _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)mmp_block_scales(MMP_Q8_0X16, grp, b))), dx);
#pragma GCC unroll 8
            for (int l = 0; l < 8; l++) {
                const __m512i s = _mm512_dpbusd_epi32(bcast_i32(cr + 4 * l), _mm512_load_si512(q + 64 * l), bcast_i32(xb + 4 * l));
                acc[k][l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dv, acc[k][l]);
            }
        }
    }
#pragma GCC unroll 2
    for (int k = 0; k < NG; k++) {
        const __m512 *a = acc[k];
        _mm512_storeu_ps(y + 16 * k, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                                                   _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]))));
    }
}

void mmp_q8_0x16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xr, float *y,
                             size_t pf) {
    if (ng == 2) q8x16_decode_n(g0, gstride, 2, nb, xr, y, pf);
    else q8x16_decode_n(g0, gstride, 1, nb, xr, y, pf);
}

#define Q_TILE_T 6 // activation rows per register tile in the matrix-matrix case (best measured on Zen 4)

// Runs TILE(n) on tiles of Q_TILE_T activation rows, then one tile of the remaining 1..Q_TILE_T-1.
#define FOR_TOKEN_TILES(TILE)                                                                      \
    for (int t = 0; t < nt;) {                                                                     \
        const int left = nt - t;                                                                   \
        const uint8_t *xt = xq + (size_t)t * xs;                                                   \
        float *yt = y + (size_t)t * ys;                                                            \
        switch (left >= Q_TILE_T ? Q_TILE_T : left) {                                              \
        case 6: TILE(6); t += 6; break;                                                            \
        case 5: TILE(5); t += 5; break;                                                            \
        case 4: TILE(4); t += 4; break;                                                            \
        case 3: TILE(3); t += 3; break;                                                            \
        case 2: TILE(2); t += 2; break;                                                            \
        default: TILE(1); t += 1; break;                                                           \
        }                                                                                          \
    }

void mmp_q4_0x16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                        uint32_t mask) {
    const __mmask16 m = (__mmask16)mask;
#define Q4_TILE(n) q4x16_tile(grp, nb, xt, xs, n, yt, ys, m)
    FOR_TOKEN_TILES(Q4_TILE)
#undef Q4_TILE
}

void mmp_q8_0x16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                        uint32_t mask) {
    const __mmask16 m = (__mmask16)mask;
    int t = 0;
    for (; t + 3 <= nt; t += 3) q8x16_tile(grp, nb, xq + (size_t)t * xs, xs, 3, y + (size_t)t * ys, ys, m);
    if (nt - t == 2) q8x16_tile(grp, nb, xq + (size_t)t * xs, xs, 2, y + (size_t)t * ys, ys, m);
    else if (nt - t == 1) q8x16_tile(grp, nb, xq + (size_t)t * xs, xs, 1, y + (size_t)t * ys, ys, m);
}

// --- plain Q8_0 rows: R weight rows x T activation rows, each output in vec_dot_q8_0's order
//
// vec_dot_q8_0 forms, per block, 8 int32 lanes (lane L = sum of products 4L..4L+3) as
// dpbusd(|w|, sign(x, w)), then acc = fma(dw * dx, float(lanes), acc). The tiles form the same exact
// lane integers as dpbusd(-128 * sum(w), x + 128, w): x + 128 = x ^ 0x80 is unsigned and the offset
// 128 * sum(w) is one dpbusd per weight block, so each (row, token) costs one dpbusd instead of a
// sign and a dpbusd; the scale product dw * dx is the same float product as the reference's.

#ifndef Q8_TILE_ZMM
#define Q8_TILE_ZMM 1 // 1: two tokens' 8-lane chains in one zmm; 0: one ymm per output
#endif
#ifndef Q8_TILE_R
#define Q8_TILE_R 4   // weight rows per register tile
#endif
#ifndef Q8_TILE_T
#define Q8_TILE_T 8   // activation rows per register tile (even)
#endif

// -128 * (sum of each 4-byte group of the weight block wv), the chain start of its lanes.
AI __m256i q8_lane_offset(__m256i wv) {
    return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), wv));
}

AI void q8_0_tile_ymm(const uint8_t *w, size_t wrow, const uint8_t *x, size_t xs, const int R, const int T, float *y,
                      size_t ys, int64_t nb) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[Q8_TILE_R][Q8_TILE_T];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xu[Q8_TILE_T];
        __m256 dx[Q8_TILE_T];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const block_q8_0 *xb = (const block_q8_0 *)(x + (size_t)t * xs) + b;
            xu[t] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb->qs), flip);
            dx[t] = _mm256_set1_ps(f16_to_f32(xb->d));
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const block_q8_0 *wb = (const block_q8_0 *)(w + (size_t)r * wrow) + b;
            const __m256i wv = _mm256_loadu_si256((const __m256i *)wb->qs);
            const __m256i off = q8_lane_offset(wv);
            const __m256 dw = _mm256_set1_ps(f16_to_f32(wb->d));
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const __m256i p = _mm256_dpbusd_epi32(off, xu[t], wv);
                acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[t]), _mm256_cvtepi32_ps(p), acc[r][t]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) y[(size_t)t * ys + r] = hsum8_ps(acc[r][t]);
}

// The same with T even: tokens 2j and 2j+1 share a zmm (low and high 8 lanes, the weight block
// repeated in both halves); each half is still one output's chain.
AI void q8_0_tile_zmm(const uint8_t *w, size_t wrow, const uint8_t *x, size_t xs, const int R, const int T, float *y,
                      size_t ys, int64_t nb) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m512 acc[Q8_TILE_R][Q8_TILE_T / 2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int j = 0; j < T / 2; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i xu[Q8_TILE_T / 2];
        __m512 dx[Q8_TILE_T / 2];
#pragma GCC unroll 8
        for (int j = 0; j < T / 2; j++) {
            const block_q8_0 *x0 = (const block_q8_0 *)(x + (size_t)(2 * j) * xs) + b;
            const block_q8_0 *x1 = (const block_q8_0 *)(x + (size_t)(2 * j + 1) * xs) + b;
            const __m256i u0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x0->qs), flip);
            const __m256i u1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x1->qs), flip);
            xu[j] = _mm512_inserti64x4(_mm512_castsi256_si512(u0), u1, 1);
            dx[j] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(f16_to_f32(x0->d))),
                                       _mm256_set1_ps(f16_to_f32(x1->d)), 1);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const block_q8_0 *wb = (const block_q8_0 *)(w + (size_t)r * wrow) + b;
            const __m256i wv = _mm256_loadu_si256((const __m256i *)wb->qs);
            const __m512i ww = _mm512_broadcast_i64x4(wv);
            const __m512i off = _mm512_broadcast_i64x4(q8_lane_offset(wv));
            const __m512 dw = _mm512_set1_ps(f16_to_f32(wb->d));
#pragma GCC unroll 8
            for (int j = 0; j < T / 2; j++) {
                const __m512i p = _mm512_dpbusd_epi32(off, xu[j], ww);
                acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx[j]), _mm512_cvtepi32_ps(p), acc[r][j]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int j = 0; j < T / 2; j++) {
            y[(size_t)(2 * j) * ys + r] = hsum8_ps(_mm512_castps512_ps256(acc[r][j]));
            y[(size_t)(2 * j + 1) * ys + r] = hsum8_ps(_mm512_extractf32x8_ps(acc[r][j], 1));
        }
}

// Token pairs prepared once for many weight rows: for block b and pair j, at buf + (b * np + j) * 128,
// the two tokens' qs ^ 0x80 (low, high 32 bytes) and then their scales dx as 8 + 8 floats, so the
// tile below reads them as whole-zmm operands.
#ifndef Q8_ROW_CHUNK
#define Q8_ROW_CHUNK 128 // weight rows per chunk the token tiles sweep (a multiple of Q8_TILE_R; 128 rows of 2048 columns = 272 KB)
#endif
#define Q8_PREP_MAX_NB 256 // blocks per row the prepared buffer holds (8192 columns; longer rows use q8_0_tile_zmm)

static void q8_0_prep_pairs(const uint8_t *x, size_t xs, int np, int64_t nb, uint8_t *buf) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int j = 0; j < np; j++) {
        const block_q8_0 *x0 = (const block_q8_0 *)(x + (size_t)(2 * j) * xs);
        const block_q8_0 *x1 = (const block_q8_0 *)(x + (size_t)(2 * j + 1) * xs);
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = buf + ((size_t)b * np + j) * 128;
            _mm256_store_si256((__m256i *)o, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x0[b].qs), flip));
            _mm256_store_si256((__m256i *)(o + 32), _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)x1[b].qs), flip));
            _mm256_store_ps((float *)(o + 64), _mm256_set1_ps(f16_to_f32(x0[b].d)));
            _mm256_store_ps((float *)(o + 96), _mm256_set1_ps(f16_to_f32(x1[b].d)));
        }
    }
}

// R weight rows x NP prepared token pairs (q8_0_tile_zmm's arithmetic, activations from buf).
AI void q8_0_tile_prep(const uint8_t *w, size_t wrow, const uint8_t *buf, const int R, const int NP, float *y,
                       size_t ys, int64_t nb) {
    __m512 acc[Q8_TILE_R][Q8_TILE_T / 2];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int j = 0; j < NP; j++) acc[r][j] = _mm512_setzero_ps();
    const block_q8_0 *wr[Q8_TILE_R];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) wr[r] = (const block_q8_0 *)(w + (size_t)r * wrow);
    for (int64_t b = 0; b < nb; b++, buf += (size_t)NP * 128) {
        // one weight row at a time (its block repeated in both halves, its lane offsets, its scale)
        // against every pair: the pairs' operands come from L1, leaving registers to the accumulators
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)wr[r][b].qs);
            const __m512i ww = _mm512_broadcast_i64x4(wv);
            const __m512i off = _mm512_broadcast_i64x4(q8_lane_offset(wv));
            const __m512 dw = _mm512_set1_ps(f16_to_f32(wr[r][b].d));
#pragma GCC unroll 8
            for (int j = 0; j < NP; j++) {
                const __m512i p = _mm512_dpbusd_epi32(off, _mm512_load_si512(buf + (size_t)j * 128), ww);
                const __m512 d = _mm512_mul_ps(dw, _mm512_load_ps(buf + (size_t)j * 128 + 64));
                acc[r][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[r][j]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int j = 0; j < NP; j++) {
            y[(size_t)(2 * j) * ys + r] = hsum8_ps(_mm512_castps512_ps256(acc[r][j]));
            y[(size_t)(2 * j + 1) * ys + r] = hsum8_ps(_mm512_extractf32x8_ps(acc[r][j], 1));
        }
}

// nr rows x 2 * NP tokens from a prepared buffer: tiles of Q8_TILE_R rows, then single rows.
AI void q8_0_rows_prep(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *buf, const int NP, float *y,
                       size_t ys, int64_t nb) {
    int64_t r = 0;
    for (; r + Q8_TILE_R <= nr; r += Q8_TILE_R) q8_0_tile_prep(w + (size_t)r * wrow, wrow, buf, Q8_TILE_R, NP, y + r, ys, nb);
    for (; r < nr; r++) q8_0_tile_prep(w + (size_t)r * wrow, wrow, buf, 1, NP, y + r, ys, nb);
}

// Full tiles of Q8_TILE_T tokens, then the remaining tokens one at a time (ymm), for R rows.
AI void q8_0_rows(const uint8_t *w, size_t wrow, const uint8_t *x, size_t xs, int nt, float *y, size_t ys, int64_t nb,
                  const int R) {
    int t = 0;
    for (; t + Q8_TILE_T <= nt; t += Q8_TILE_T) {
        if (Q8_TILE_ZMM) q8_0_tile_zmm(w, wrow, x + (size_t)t * xs, xs, R, Q8_TILE_T, y + (size_t)t * ys, ys, nb);
        else q8_0_tile_ymm(w, wrow, x + (size_t)t * xs, xs, R, Q8_TILE_T, y + (size_t)t * ys, ys, nb);
    }
    for (; t < nt; t++) q8_0_tile_ymm(w, wrow, x + (size_t)t * xs, xs, R, 1, y + (size_t)t * ys, ys, nb);
}

void mmq_q8_0_avx512(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt, float *y,
                     size_t ys, int64_t n) {
    const int64_t nb = n / QK8_0;
    if (nb <= Q8_PREP_MAX_NB && nt >= 2 && Q8_TILE_ZMM) {
        // chunks of rows that stay in L2 outside, token tiles inside them, rows of the chunk inside
        // that: each tile's activations are prepared once per chunk
        _Alignas(64) uint8_t buf[Q8_PREP_MAX_NB * (Q8_TILE_T / 2) * 128]; // (nb, pairs, 128)
        const int nt2 = nt & ~1;
        for (int64_t r0 = 0; r0 < nr; r0 += Q8_ROW_CHUNK) {
            const int64_t nrc = nr - r0 < Q8_ROW_CHUNK ? nr - r0 : Q8_ROW_CHUNK;
            const uint8_t *wc = w + (size_t)r0 * wrow;
            int t = 0;
            for (; t + Q8_TILE_T <= nt2; t += Q8_TILE_T) {
                q8_0_prep_pairs(x + (size_t)t * xs, xs, Q8_TILE_T / 2, nb, buf);
                q8_0_rows_prep(wc, wrow, nrc, buf, Q8_TILE_T / 2, y + (size_t)t * ys + r0, ys, nb);
            }
            for (; t < nt2; t += 2) {
                q8_0_prep_pairs(x + (size_t)t * xs, xs, 1, nb, buf);
                q8_0_rows_prep(wc, wrow, nrc, buf, 1, y + (size_t)t * ys + r0, ys, nb);
            }
        }
        x += (size_t)nt2 * xs;
        y += (size_t)nt2 * ys;
        nt -= nt2;
        if (nt == 0) return;
    }
    int64_t r = 0;
    for (; r + Q8_TILE_R <= nr; r += Q8_TILE_R) q8_0_rows(w + (size_t)r * wrow, wrow, x, xs, nt, y + r, ys, nb, Q8_TILE_R);
    for (; r < nr; r++) q8_0_rows(w + (size_t)r * wrow, wrow, x, xs, nt, y + r, ys, nb, 1);
}

// --- plain Q8_0 rows x one activation row (decode)
//
// Each output in vec_dot_q8_0's order and bits: lane L of block b is the exact integer
// sum_k w[4L+k] * x[4L+k], formed as dpbusd(-128 * sum_k x[4L+k], w ^ 0x80, x) (w ^ 0x80 = w + 128 is
// unsigned), so a (row, block) costs one xor and one dpbusd instead of abs, sign and dpbusd; the
// correction depends on the activation only and is formed once per block for Q8_DEC_R rows, which also
// share the activation load and its scale; then fma(dw * dx, float(lanes), acc) per row as the reference.

#ifndef Q8_DEC_R
#define Q8_DEC_R 8 // weight rows per pass over the activation row
#endif
#ifndef Q8_DEC_PF
#define Q8_DEC_PF 16 // blocks each row is prefetched ahead (544 bytes, into the next pass near the end: 1.15x on 2048-column rows; none 20-30% slower)
#endif

AI void q8_0_dec_tile(const uint8_t *w, size_t wrow, const block_q8_0 *x, const int R, float *y, int64_t nb) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[Q8_DEC_R];
    const block_q8_0 *wr[Q8_DEC_R];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
        wr[r] = (const block_q8_0 *)(w + (size_t)r * wrow);
    }
    // the R rows' block scales come in one gather (the dword at each block's start: d, then 2 quants)
    const __m256i rowoff = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)wrow));
    const __mmask8 rmask = (__mmask8)((1u << R) - 1u);
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i corr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, xv));
        const __m256i dw16 = _mm256_mmask_i32gather_epi32(_mm256_setzero_si256(), rmask, rowoff, (const int *)(w + (size_t)b * sizeof(block_q8_0)), 1);
        const __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(dw16)), _mm256_set1_ps(f16_to_f32(x[b].d)));
        if ((b & 1) == 0) { // a cache line holds about two blocks
            // near a row's end, the same row of the next pass (prefetches never fault past the matrix)
            const size_t pf = b + Q8_DEC_PF < nb ? (size_t)(b + Q8_DEC_PF) * sizeof(block_q8_0)
                                                 : (size_t)R * wrow + (size_t)(b + Q8_DEC_PF - nb) * sizeof(block_q8_0);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)wr[r] + pf, _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wr[r][b].qs), flip);
            const __m256i p = _mm256_dpbusd_epi32(corr, wu, xv);
            acc[r] = _mm256_fmadd_ps(_mm256_permutexvar_ps(_mm256_set1_epi32(r), sc), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) y[r] = hsum8_ps(acc[r]);
}

void mmv_q8_0_avx512(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, float *y, int64_t n) {
    const int64_t nb = n / QK8_0;
    int64_t r = 0;
    for (; r + Q8_DEC_R <= nr; r += Q8_DEC_R) q8_0_dec_tile(w + (size_t)r * wrow, wrow, (const block_q8_0 *)x, Q8_DEC_R, y + r, nb);
    for (; r < nr; r++) q8_0_dec_tile(w + (size_t)r * wrow, wrow, (const block_q8_0 *)x, 1, y + r, nb);
}

// --- plain float rows: R weight rows x T activation rows register tile

AI void float_tile(qtype_t type, const uint8_t *w, size_t wrow, const uint8_t *x, size_t xs, const int R, const int T,
                   float *y, size_t ys, int64_t n) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) xv[t] = load_as_f32(type, x + (size_t)t * xs, i, m);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m512 wv = load_as_f32(type, w + (size_t)r * wrow, i, m);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) y[(size_t)t * ys + r] = _mm512_reduce_add_ps(acc[r][t]);
}

AI void float_all(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                  float *y, size_t ys, int64_t n) {
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) {
        const uint8_t *wr = w + (size_t)r * wrow;
        int t = 0;
        for (; t + 4 <= nt; t += 4) float_tile(type, wr, wrow, x + (size_t)t * xs, xs, 4, 4, y + (size_t)t * ys + r, ys, n);
        for (; t < nt; t++) float_tile(type, wr, wrow, x + (size_t)t * xs, xs, 4, 1, y + (size_t)t * ys + r, ys, n);
    }
    for (; r < nr; r++) {
        const uint8_t *wr = w + (size_t)r * wrow;
        int t = 0;
        for (; t + 4 <= nt; t += 4) float_tile(type, wr, wrow, x + (size_t)t * xs, xs, 1, 4, y + (size_t)t * ys + r, ys, n);
        for (; t < nt; t++) float_tile(type, wr, wrow, x + (size_t)t * xs, xs, 1, 1, y + (size_t)t * ys + r, ys, n);
    }
}

// --- F16 and BF16 batches: activations converted once per chunk of rows
//
// The tiled order (one 16-lane fma chain per output, then _mm512_reduce_add_ps) as float_tile, but
// the activation rows are converted to float32 once per F16_RC weight rows (into a stack buffer) and
// the tiles are F16_R rows x F16_T tokens: per 16 columns a tile converts F16_R weight vectors and
// does F16_R * F16_T fmas with the float32 activations, where float_tile also converts every
// activation vector again for every 4 rows.

#ifndef F16_RC
#define F16_RC 64      // weight rows per chunk (their F16 rows stay in L2 while the token tiles sweep them)
#endif
#ifndef F16_R
#define F16_R 4        // weight rows per register tile
#endif
#ifndef F16_T
#define F16_T 6        // activation rows per register tile
#endif
#define F16_MAXC 8192  // columns the converted-activation buffer holds (longer rows use float_all)
static_assert(F16_T >= 1 && F16_T <= 6 && F16_R >= 1 && F16_R <= 4, "F16 tile: at most 4 x 6 (registers)");

AI void f16_tile_xf(qtype_t type, const uint8_t *w, size_t wrow, const float *xf, const int R, const int T, float *y,
                    size_t ys, int64_t n) {
    __m512 acc[F16_R][F16_T]; // (rows, tokens, 16) fma chains
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 xv[F16_T]; // (tokens, 16) activations of these columns
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) xv[t] = _mm512_load_ps(xf + (size_t)t * (size_t)n + i);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 wv = load_as_f32(type, w + (size_t)r * wrow, i, 0xffff);
#pragma GCC unroll 6
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int t = 0; t < T; t++) y[(size_t)t * ys + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// Rows [0, nr) x T converted activation rows: tiles of F16_R rows, then single rows.
AI void f16_rows_xf(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const float *xf, const int T, float *y,
                    size_t ys, int64_t n) {
    int64_t r = 0;
    for (; r + F16_R <= nr; r += F16_R) f16_tile_xf(type, w + (size_t)r * wrow, wrow, xf, F16_R, T, y + r, ys, n);
    for (; r < nr; r++) f16_tile_xf(type, w + (size_t)r * wrow, wrow, xf, 1, T, y + r, ys, n);
}

// F16 (or BF16) rows x nt activation rows of that type in the tiled order (n a multiple of 16, n <= F16_MAXC).
static void f16_tiled(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                      float *y, size_t ys, int64_t n) {
    _Alignas(64) float xf[F16_T * F16_MAXC]; // (tc, n) the token tile's activations as float32
    for (int64_t r0 = 0; r0 < nr; r0 += F16_RC) {
        const int64_t nrc = nr - r0 < F16_RC ? nr - r0 : F16_RC;
        const uint8_t *wc = w + (size_t)r0 * wrow;
        for (int t = 0; t < nt; t += F16_T) {
            const int tc = nt - t < F16_T ? nt - t : F16_T;
            for (int j = 0; j < tc; j++)
                for (int64_t i = 0; i < n; i += 16)
                    _mm512_store_ps(xf + (size_t)j * (size_t)n + i, load_as_f32(type, x + (size_t)(t + j) * xs, i, 0xffff));
            float *yt = y + (size_t)t * ys + r0;
#define F16_CASE(c)                                                                                                    \
    (type == QT_F16 ? f16_rows_xf(QT_F16, wc, wrow, nrc, xf, (c) < F16_T ? (c) : F16_T, yt, ys, n)                        \
                    : f16_rows_xf(QT_BF16, wc, wrow, nrc, xf, (c) < F16_T ? (c) : F16_T, yt, ys, n))
            switch (tc) { // a tile of the remaining tokens (tc < F16_T only at the end)
            case 1: F16_CASE(1); break;
            case 2: F16_CASE(2); break;
            case 3: F16_CASE(3); break;
            case 4: F16_CASE(4); break;
            case 5: F16_CASE(5); break;
            default: F16_CASE(F16_T); break;
            }
#undef F16_CASE
        }
    }
}

// One row x one token in ggml_vec_dot_f32/f16's order: 4 x 16 lanes per 64 elements, combined as
// (a0 + a2) + (a1 + a3) and reduced; then the tail: F32 adds rounded products in runs of 8 and fuses
// the last n % 8 (as the reference's compiled loop does), F16 sums exact products in double.
AI float float_dot_vd(qtype_t type, const uint8_t *w, const uint8_t *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const int64_t np = n & ~(int64_t)63;
    for (int64_t i = 0; i < np; i += 64) {
        a0 = _mm512_fmadd_ps(load_as_f32(type, w, i, 0xffff), load_as_f32(type, x, i, 0xffff), a0);
        a1 = _mm512_fmadd_ps(load_as_f32(type, w, i + 16, 0xffff), load_as_f32(type, x, i + 16, 0xffff), a1);
        a2 = _mm512_fmadd_ps(load_as_f32(type, w, i + 32, 0xffff), load_as_f32(type, x, i + 32, 0xffff), a2);
        a3 = _mm512_fmadd_ps(load_as_f32(type, w, i + 48, 0xffff), load_as_f32(type, x, i + 48, 0xffff), a3);
    }
    const float head = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    if (type == QT_F32) {
        const float *wf = (const float *)w, *xf = (const float *)x;
        const int64_t n8 = np + ((n - np) & ~(int64_t)7);
        float sf = head;
        for (int64_t i = np; i < n8; i++) sf += wf[i] * xf[i];
        for (int64_t i = n8; i < n; i++) sf = fmaf(wf[i], xf[i], sf);
        return sf;
    }
    double sd = head;
    for (int64_t i = np; i < n; i++) sd += (double)(f16_to_f32(((const mlm_f16_t *)w)[i]) * f16_to_f32(((const mlm_f16_t *)x)[i]));
    return (float)sd;
}

// Decode of R rows of 2-byte elements (F16, BF16) at column i: the 2 lines of each row that step i reads,
// pf columns on; past a row's end (n columns) in the next pass's row (prefetches never fault).
AI void prefetch_rows_2b(const uint8_t *w, size_t wrow, int64_t i, int64_t pf, int64_t n, const int R) {
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const char *at = i + pf < n ? (const char *)(w + (size_t)r * wrow) + 2 * (i + pf)
                                    : (const char *)(w + (size_t)(r + R) * wrow) + 2 * (i + pf - n);
        _mm_prefetch(at, _MM_HINT_T0);
        _mm_prefetch(at + 64, _MM_HINT_T0);
    }
}

// F16 rows x one F16 activation row in float_dot_vd's order and bits, 4 rows per pass: each 64-element
// step converts the activation once for the 4 rows (decode reads the weights once; this halves the
// conversions per weight byte).
#ifndef F16_DEC_PF
#define F16_DEC_PF 2048 // columns prefetched ahead over the rows of a pass together: F16_DEC_PF / R per row
                        // (4 rows: 512 each, which measured like 256 on Intel; 1 row: 2048 = 4 KB, the
                        // best of 256-8192 on AMD Zen 5), near a row's end into the next pass's row
#endif

static inline __attribute__((always_inline)) void f16_dot_vd_rows(const uint8_t *w, size_t wrow, const uint8_t *x,
                                                                   float *y, int64_t n, const int R) {
    __m512 a[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) a[r][j] = _mm512_setzero_ps();
    const int64_t np = n & ~(int64_t)63;
    for (int64_t i = 0; i < np; i += 64) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) xv[j] = load_as_f32(QT_F16, x, i + 16 * j, 0xffff);
        prefetch_rows_2b(w, wrow, i, F16_DEC_PF / R, n, R);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
                a[r][j] = _mm512_fmadd_ps(load_as_f32(QT_F16, w + (size_t)r * wrow, i + 16 * j, 0xffff), xv[j], a[r][j]);
    }
    for (int r = 0; r < R; r++) {
        const float head = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][2]), _mm512_add_ps(a[r][1], a[r][3])));
        double sd = head;
        const mlm_f16_t *wr = (const mlm_f16_t *)(w + (size_t)r * wrow), *xr = (const mlm_f16_t *)x;
        for (int64_t i = np; i < n; i++) sd += (double)(f16_to_f32(wr[i]) * f16_to_f32(xr[i]));
        y[r] = (float)sd;
    }
}

// BF16 rows x one BF16 activation row in float_tile's order and bits (one 16-lane fma chain per row, the
// tail masked), R rows per pass sharing each activation vector (kern_tune_t.f16_rows: 4, else 1), the weights prefetched BF16_DEC_PF
// columns ahead over the pass's rows (float_tile's hardware-prefetched walk read 15 GB/s a core).
#ifndef BF16_DEC_PF
#define BF16_DEC_PF 2048 // columns ahead over the rows of a pass together (BF16_DEC_PF / R per row)
#endif

static inline __attribute__((always_inline)) void bf16_dec_rows(const uint8_t *w, size_t wrow, const uint8_t *x,
                                                                float *y, int64_t n, const int R) {
    __m512 a[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();
    const int64_t pf = BF16_DEC_PF / R; // columns ahead in each row
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) xv[j] = load_as_f32(QT_BF16, x, i + 16 * j, 0xffff);
        prefetch_rows_2b(w, wrow, i, pf, n, R);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                a[r] = _mm512_fmadd_ps(load_as_f32(QT_BF16, w + (size_t)r * wrow, i + 16 * j, 0xffff), xv[j], a[r]);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 xv = load_as_f32(QT_BF16, x, i, m);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) a[r] = _mm512_fmadd_ps(load_as_f32(QT_BF16, w + (size_t)r * wrow, i, m), xv, a[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(a[r]);
}

void mmp_float_avx512(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                      float *y, size_t ys, int64_t n, bool tiled, int dec_rows) {
    if (type == QT_BF16 && nt == 1) {
        int64_t r = 0;
        if (dec_rows >= 4)
            for (; r + 4 <= nr; r += 4) bf16_dec_rows(w + (size_t)r * wrow, wrow, x, y + r, n, 4);
        for (; r < nr; r++) bf16_dec_rows(w + (size_t)r * wrow, wrow, x, y + r, n, 1);
        return;
    }
    if (!tiled && type == QT_F16 && nt == 1) {
        int64_t r = 0;
        if (dec_rows >= 4)
            for (; r + 4 <= nr; r += 4) f16_dot_vd_rows(w + (size_t)r * wrow, wrow, x, y + r, n, 4);
        for (; r < nr; r++) f16_dot_vd_rows(w + (size_t)r * wrow, wrow, x, y + r, n, 1); // prefetched, one stream
        return;
    }
    if (!tiled && type != QT_BF16) {
        for (int t = 0; t < nt; t++)
            for (int64_t r = 0; r < nr; r++)
                y[(size_t)t * ys + r] = type == QT_F32 ? float_dot_vd(QT_F32, w + (size_t)r * wrow, x + (size_t)t * xs, n)
                                                       : float_dot_vd(QT_F16, w + (size_t)r * wrow, x + (size_t)t * xs, n);
        return;
    }
    if ((type == QT_F16 || type == QT_BF16) && n % 16 == 0 && n <= F16_MAXC) {
        f16_tiled(type, w, wrow, nr, x, xs, nt, y, ys, n);
        return;
    }
    switch (type) {
    case QT_F32: float_all(QT_F32, w, wrow, nr, x, xs, nt, y, ys, n); break;
    case QT_F16: float_all(QT_F16, w, wrow, nr, x, xs, nt, y, ys, n); break;
    case QT_BF16: float_all(QT_BF16, w, wrow, nr, x, xs, nt, y, ys, n); break;
    default: break;
    }
}

// --- memory stream (kern_read_sum_fn): four independent 64-byte loads per step

#ifndef READ_STREAMS
#define READ_STREAMS 4 // quarters of the buffer read side by side, as the decode kernels read several groups or
                       // rows at once (2 threads here: 22-24 GB/s against 18-19 for one stream per thread)
#endif

static uint64_t read_sum(const void *p, size_t n) {
    const uint8_t *b = p;
    const size_t nc = n / 256, q = READ_STREAMS > 1 ? nc / READ_STREAMS : 0; // 256-byte chunks, per stream
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (size_t i = 0; i < q * 256; i += 256)
#pragma GCC unroll 4
        for (int s = 0; s < READ_STREAMS; s++) {
            const uint8_t *c = b + (size_t)s * q * 256 + i;
            a[s] = _mm512_add_epi64(a[s], _mm512_add_epi64(_mm512_add_epi64(_mm512_load_si512(c), _mm512_load_si512(c + 64)),
                                                           _mm512_add_epi64(_mm512_load_si512(c + 128), _mm512_load_si512(c + 192))));
        }
    for (size_t i = (READ_STREAMS > 1 ? READ_STREAMS : 0) * q * 256; i + 256 <= n; i += 256) // the rest, one stream
        a[0] = _mm512_add_epi64(a[0], _mm512_add_epi64(_mm512_add_epi64(_mm512_load_si512(b + i), _mm512_load_si512(b + i + 64)),
                                                       _mm512_add_epi64(_mm512_load_si512(b + i + 128), _mm512_load_si512(b + i + 192))));
    // the lanes summed unsigned (_mm512_reduce_add_epi64 adds signed: overflow is undefined)
    uint64_t lanes[8]; // (8)
    _mm512_storeu_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(a[0], a[1]), _mm512_add_epi64(a[2], a[3])));
    uint64_t s = 0;
    for (int i = 0; i < 8; i++) s += lanes[i];
    return s;
}

// --- table

void kern_x86_q_avx512_fill(kernels_t *k) {
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
