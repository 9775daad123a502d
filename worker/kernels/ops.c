// Element-wise and attention operators, with the floating-point operation order of llama.cpp's CPU
// backend on x86 (AVX-512 build): same lanes, same fused multiply-adds, same reduction trees.
//
// The reference rounds activations to 8 bits before every quantized matmul, so a last-bit
// difference anywhere upstream can flip one rounding and then shows up as ~1% in the logits of a
// random-weight model. Everything here therefore reproduces the reference bits, not just values:
//   - exp: ggml's vectorized expf (AVX-512 form) for blocks of 16, libm expf for the rest;
//   - 16-lane horizontal sums use the tree of GCC's _mm512_reduce_add_ps;
//   - attention dot products follow the kernel the reference picks: one 16-lane fma chain per
//     output (llamafile's tinyBLAS, batches of 2+ tokens) or ggml_vec_dot_f16 (single token:
//     4 x 16 lanes per 64 elements, then a double-precision tail).
#include "worker/kernels/ops.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OPS_X86 1
#endif

// --- helpers: exact scalar building blocks

// Sum of 16 floats in the order of _mm512_reduce_add_ps: halves, then quarters, then pairs.
static float reduce16(const float *v) { // v: (16)
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = v[i + 8] + v[i];
    for (int i = 0; i < 4; i++) s4[i] = s8[i + 4] + s8[i];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// x * 2^n for integral n with |n| <= 192, rounded once (what vscalefps does): two exact steps.
static float scale_pow2(float x, float n) {
    const int k = (int)n, k1 = k / 2, k2 = k - k1;
    return (x * mlm_bits_to_f32((uint32_t)(127 + k1) << 23)) * mlm_bits_to_f32((uint32_t)(127 + k2) << 23);
}

// ggml's AVX-512 expf (a polynomial after range reduction, max error ~1.5 ulp), lane by lane.
static float v_expf1(float x) {
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)), u,
                         fmaf(0x1.ffffecp-1f, b, 1.0f));
    return scale_pow2(j, n);
}

// --- helpers: AVX-512 versions (same operations, 16 lanes at a time)

static bool g_force_scalar; // ops_force_scalar (tests)

void ops_force_scalar(bool on) { g_force_scalar = on; }

#ifdef OPS_X86
static bool have_avx512(void) {
    if (g_force_scalar) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

__attribute__((target("avx512f,avx512dq"))) static __m512 v_expf16(__m512 x) {
    const __m512 r = _mm512_set1_ps(0x1.8p23f);
    const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), r);
    const __m512 n = _mm512_sub_ps(z, r);
    const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
    const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192), _CMP_GT_OQ);
    const __m512 u = _mm512_mul_ps(b, b);
    const __m512 j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f)), u,
                        _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f))),
        u, _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f)));
    const __m512 res = _mm512_scalef_ps(j, n);
    if (!big) return res;
    const __m512 alt = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_LE_OQ),
                                            _mm512_set1_ps(INFINITY), _mm512_setzero_ps());
    return _mm512_mask_blend_ps(big, res, alt);
}

// y = exp(x - mx) over blocks of 16 (n a multiple of 16); returns the sum as the reference does.
__attribute__((target("avx512f,avx512dq"))) static double exp_blocks_avx512(float *y, const float *x, int n, float mx) {
    double sum = 0.0;
    for (int i = 0; i < n; i += 16) {
        const __m512 e = v_expf16(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(y + i, e);
        sum += (double)_mm512_reduce_add_ps(e);
    }
    return sum;
}

__attribute__((target("avx512f,avx512dq"))) static void silu_blocks_avx512(float *g, const float *u, int n) {
    for (int i = 0; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = v_expf16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
}

// acc[(t % nl) * hd + d] = fma(p[t], v[t][d], acc[...]) for t in [0, n): per-lane chains, d vectorized.
__attribute__((target("avx512f,avx512dq,f16c"))) static void
pv_lanes_avx512(float *acc, int nl, const float *p, const void *v, size_t stride, int n, int hd, bool f16) {
    for (int t = 0; t < n; t++) {
        float *a = acc + (size_t)(t % nl) * hd;
        const __m512 pt = _mm512_set1_ps(p[t]);
        int d = 0;
        if (f16) {
            const mlm_f16_t *vr = (const mlm_f16_t *)v + (size_t)t * stride;
            for (; d + 16 <= hd; d += 16) {
                const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vr + d)));
                _mm512_storeu_ps(a + d, _mm512_fmadd_ps(pt, vv, _mm512_loadu_ps(a + d)));
            }
            for (; d < hd; d++) a[d] = fmaf(p[t], mlm_f16_to_f32(vr[d]), a[d]);
        } else {
            const float *vr = (const float *)v + (size_t)t * stride;
            for (; d + 16 <= hd; d += 16)
                _mm512_storeu_ps(a + d, _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + d), _mm512_loadu_ps(a + d)));
            for (; d < hd; d++) a[d] = fmaf(p[t], vr[d], a[d]);
        }
    }
}

// y[i] = x[i] rounded to F16 (to nearest even, as mlm_f32_to_f16) for whole blocks of 16; returns
// the elements done.
__attribute__((target("avx512f,avx512dq,f16c"))) static int round_f16_avx512(float *y, const float *x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    return i;
}

// x[i] = x[i] * s rounded to F16, for whole blocks of 16; returns the elements done.
__attribute__((target("avx512f,avx512dq,f16c"))) static int scale_round_f16_avx512(float *x, int n, float s) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(s));
        _mm512_storeu_ps(x + i, _mm512_cvtph_ps(_mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
    return i;
}

// The single-token tail, d vectorized: out[d] = head[d] + sum over t in [t0, t1) in order of p[t] * v[t][d]
// (the product rounded to float, then added in double for F16, fma in float for F32), the same
// operations per d as the scalar loop. hd % 16 == 0.
// head[d] is the 64 lanes' sum (acc: (64, hd)) in the scalar loop's tree, or 0 when t0 == 0.
__attribute__((target("avx512f,avx512dq,f16c"))) static void pv_tail_avx512(float *out, const float *acc, const float *p,
                                                                           const void *v, size_t stride, int t0, int t1,
                                                                           int hd, bool f16) {
    float head[256];
    for (int d = 0; d < hd; d += 16) {
        if (t0 == 0) {
            _mm512_storeu_ps(head + d, _mm512_setzero_ps());
            continue;
        }
        __m512 L[16];
#define ACC(l) _mm512_loadu_ps(acc + (size_t)(l) * hd + d)
        for (int l = 0; l < 16; l++) L[l] = _mm512_add_ps(_mm512_add_ps(ACC(l), ACC(l + 32)), _mm512_add_ps(ACC(l + 16), ACC(l + 48)));
#undef ACC
        for (int i = 0; i < 8; i++) L[i] = _mm512_add_ps(L[i + 8], L[i]);
        for (int i = 0; i < 4; i++) L[i] = _mm512_add_ps(L[i + 4], L[i]);
        _mm512_storeu_ps(head + d, _mm512_add_ps(_mm512_add_ps(L[0], L[2]), _mm512_add_ps(L[1], L[3])));
    }
    for (int d0 = 0; d0 < hd; d0 += 64) {
        const int nc = hd - d0 < 64 ? (hd - d0) / 16 : 4; // 16-column chunks in this pass
        if (f16) {
            __m512d lo[4], hi[4];
            for (int c = 0; c < nc; c++) {
                const __m512 h = _mm512_loadu_ps(head + d0 + 16 * c);
                lo[c] = _mm512_cvtps_pd(_mm512_castps512_ps256(h));
                hi[c] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(h, 1));
            }
            for (int t = t0; t < t1; t++) {
                const mlm_f16_t *vr = (const mlm_f16_t *)v + (size_t)t * stride + d0;
                const __m512 pt = _mm512_set1_ps(p[t]);
                for (int c = 0; c < nc; c++) {
                    const __m512 pr = _mm512_mul_ps(pt, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vr + 16 * c))));
                    lo[c] = _mm512_add_pd(lo[c], _mm512_cvtps_pd(_mm512_castps512_ps256(pr)));
                    hi[c] = _mm512_add_pd(hi[c], _mm512_cvtps_pd(_mm512_extractf32x8_ps(pr, 1)));
                }
            }
            for (int c = 0; c < nc; c++) {
                const __m256 a = _mm512_cvtpd_ps(lo[c]), b = _mm512_cvtpd_ps(hi[c]);
                _mm512_storeu_ps(out + d0 + 16 * c, _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1));
            }
        } else {
            __m512 a[4];
            for (int c = 0; c < nc; c++) a[c] = _mm512_loadu_ps(head + d0 + 16 * c);
            for (int t = t0; t < t1; t++) {
                const float *vr = (const float *)v + (size_t)t * stride + d0;
                const __m512 pt = _mm512_set1_ps(p[t]);
                for (int c = 0; c < nc; c++) a[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 16 * c), a[c]);
            }
            for (int c = 0; c < nc; c++) _mm512_storeu_ps(out + d0 + 16 * c, a[c]);
        }
    }
}

// q . k over hd elements (hd % 16 == 0) in either of qk_dot's orders, 16 lanes per register.
__attribute__((target("avx512f,avx512dq,f16c"))) static float qk_dot_avx512(const float *q, const void *kbase, size_t off,
                                                                          int hd, bool f16, bool tiled) {
    const mlm_f16_t *kh = (const mlm_f16_t *)kbase + off;
    const float *kf = (const float *)kbase + off;
#define KV16(e) (f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kh + (e)))) : _mm512_loadu_ps(kf + (e)))
    if (tiled) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < hd; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), KV16(c), acc);
        return _mm512_reduce_add_ps(acc);
    }
    const int np = hd & ~63;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int i = 0; i < np; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), KV16(i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), KV16(i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 32), KV16(i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 48), KV16(i + 48), a3);
    }
#undef KV16
    const float head = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
    if (f16) {
        double sd = head;
        for (int e = np; e < hd; e++) sd += (double)(q[e] * _cvtsh_ss(kh[e]));
        return (float)sd;
    }
    float sf = head;
    for (int e = np; e < hd; e++) sf = fmaf(q[e], kf[e], sf);
    return sf;
}
#endif

static float kv_at(const void *base, size_t idx, bool f16) {
    return f16 ? mlm_f16_to_f32(((const mlm_f16_t *)base)[idx]) : ((const float *)base)[idx];
}

// y = exp(x - mx) for n elements: blocks of 16 with the vector expf, the tail with libm expf;
// returns sum(y) accumulated as the reference does (block sums in float, added in double).
static double softmax_exp(float *y, const float *x, int n, float mx, bool simd) {
    const int nb = n & ~15;
    double sum = 0.0;
#ifdef OPS_X86
    if (simd && nb > 0) {
        sum = exp_blocks_avx512(y, x, nb, mx);
    } else
#endif
    {
        (void)simd;
        for (int i = 0; i < nb; i += 16) {
            for (int l = 0; l < 16; l++) y[i + l] = v_expf1(x[i + l] - mx);
            sum += (double)reduce16(y + i);
        }
    }
    for (int i = nb; i < n; i++) {
        y[i] = expf(x[i] - mx);
        sum += (double)y[i];
    }
    return sum;
}

// One score q.k over hd elements with the reference's kernel for this case.
//   tiled: one 16-lane fma chain (tinyBLAS), needs hd % 16 == 0;
//   otherwise ggml_vec_dot: 4 x 16 lanes per 64 elements (F16: tail in double; F32: tail in float).
static float qk_dot(const float *q, const void *kbase, size_t off, int hd, bool f16, bool tiled, bool simd) {
#ifdef OPS_X86
    if (simd && hd % 16 == 0) return qk_dot_avx512(q, kbase, off, hd, f16, tiled);
#endif
    (void)simd;
    if (tiled) {
        float acc[16] = {0};
        for (int c = 0; c < hd; c += 16)
            for (int l = 0; l < 16; l++) acc[l] = fmaf(q[c + l], kv_at(kbase, off + (size_t)(c + l), f16), acc[l]);
        return reduce16(acc);
    }
    const int np = hd & ~63;
    float s4[4][16] = {{0}};
    for (int i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) {
                const int e = i + 16 * j + l;
                s4[j][l] = fmaf(q[e], kv_at(kbase, off + (size_t)e, f16), s4[j][l]);
            }
    for (int l = 0; l < 16; l++) s4[0][l] = (s4[0][l] + s4[2][l]) + (s4[1][l] + s4[3][l]);
    const float head = np > 0 ? reduce16(s4[0]) : 0.0f;
    if (f16) {
        double sd = head;
        for (int e = np; e < hd; e++) sd += (double)(q[e] * kv_at(kbase, off + (size_t)e, f16));
        return (float)sd;
    }
    float sf = head;
    for (int e = np; e < hd; e++) sf = fmaf(q[e], kv_at(kbase, off + (size_t)e, f16), sf);
    return sf;
}

// --- public API

void ops_rmsnorm(float *y, const float *x, const float *w, int n, float eps) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)(x[i] * x[i]); // float products, double sum
    const float mean = (float)(sum / n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] * scale) * w[i];
}

void ops_rope(float *x, int n_heads, int head_dim, int n_rot, int pos, float base, float freq_scale,
              const float *freq_factors) {
    const float theta_scale = powf(base, -2.0f / (float)n_rot);
    float cs[2 * 256]; // (n_rot / 2) pairs of cos, sin; n_rot <= head_dim <= 512
    float theta = (float)pos;
    for (int i0 = 0; i0 < n_rot; i0 += 2) {
        const float ff = freq_factors ? freq_factors[i0 / 2] : 1.0f;
        sincosf(freq_scale * (theta / ff), &cs[i0 + 1], &cs[i0]);
        theta *= theta_scale;
    }
    // llama.cpp's compiled loop rounds b*s and b*c and fuses the other product: a*c - (b*s), a*s + (b*c).
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i0 = 0; i0 < n_rot; i0 += 2) {
            const float c = cs[i0], s = cs[i0 + 1];
            const float a = v[i0], b = v[i0 + 1];
            v[i0] = fmaf(a, c, -(b * s));
            v[i0 + 1] = fmaf(a, s, b * c);
        }
    }
}

void ops_silu_mul(float *g, const float *u, int rows, int cols) {
    int nb = 0;
#ifdef OPS_X86
    const bool simd = have_avx512();
    nb = simd ? cols & ~15 : 0;
#endif
    for (int r = 0; r < rows; r++) {
        float *gr = g + (size_t)r * cols;
        const float *ur = u + (size_t)r * cols;
#ifdef OPS_X86
        if (nb) silu_blocks_avx512(gr, ur, nb);
#endif
        for (int i = nb; i < (cols & ~15); i++) {
            const float x = gr[i];
            gr[i] = (x / (1.0f + v_expf1(0.0f - x))) * ur[i];
        }
        for (int i = cols & ~15; i < cols; i++) {
            const float x = gr[i];
            gr[i] = (x / (1.0f + expf(-x))) * ur[i];
        }
    }
}

size_t ops_attention_scratch(int n_ctx, int head_dim) {
    const size_t n = ((size_t)n_ctx + 63) & ~(size_t)63;
    return n + (size_t)head_dim + 64 * (size_t)head_dim;
}

void ops_attention(float *out, const float *q, const void *k, const void *v, size_t row_stride, int npos, int n_kv,
                   int head_dim, float scale, bool f16, bool batched, float *scratch) {
    const int hd = head_dim;
    float *sc = scratch;                                               // (n_kv rounded up to 64)
    float *qr = scratch + (((size_t)(n_kv > npos ? n_kv : npos) + 63) & ~(size_t)63); // (hd)
    float *acc = qr + hd;                                              // (64, hd)
    bool simd = false;
#ifdef OPS_X86
    simd = have_avx512();
#endif
    // q is converted to the cache type before the product (F16: rounded to half).
    int d0 = 0;
#ifdef OPS_X86
    if (simd && f16) d0 = round_f16_avx512(qr, q, hd);
#endif
    for (int d = d0; d < hd; d++) qr[d] = f16 ? mlm_f16_to_f32(mlm_f32_to_f16(q[d])) : q[d];
    const bool tiled_qk = batched && hd % 16 == 0;
    float mx = -INFINITY;
    for (int t = 0; t < npos; t++) {
        const float s = qk_dot(qr, k, (size_t)t * row_stride, hd, f16, tiled_qk, simd) * scale;
        sc[t] = s;
        mx = s > mx ? s : mx;
    }
    // Masked positions up to the next multiple of 16 are exp(-inf) = 0 in the reference's blocks.
    const int nexp = (npos + 15) & ~15;
    for (int t = npos; t < nexp; t++) sc[t] = -INFINITY;
    const double sum = softmax_exp(sc, sc, nexp, mx, simd);
    const float inv = (float)(1.0 / sum);
    int t0 = 0;
#ifdef OPS_X86
    if (simd && f16) t0 = scale_round_f16_avx512(sc, npos, inv);
#endif
    for (int t = t0; t < npos; t++) {
        const float p = sc[t] * inv;
        sc[t] = f16 ? mlm_f16_to_f32(mlm_f32_to_f16(p)) : p; // the probabilities enter an F16 product
    }
    // out[d] = sum_t p[t] v[t][d] with the reference's lanes: tiled (batch, hd % 4 == 0): lane t % 16;
    // single token: ggml_vec_dot over n_kv, lanes t % 64 below n_kv & ~63, then a tail in double/float.
    const bool tiled_pv = batched && hd % 4 == 0;
    const int nl = tiled_pv ? 16 : 64;
    const int nsimd = tiled_pv ? npos : (npos < (n_kv & ~63) ? npos : (n_kv & ~63));
    if (nsimd > 0) memset(acc, 0, (size_t)nl * hd * sizeof(float)); // no lanes in use: nothing to clear
#ifdef OPS_X86
    if (nsimd == 0) {
        // every position is in the tail
    } else if (simd)
        pv_lanes_avx512(acc, nl, sc, v, row_stride, nsimd, hd, f16);
    else
#endif
        for (int t = 0; t < nsimd; t++)
            for (int d = 0; d < hd; d++)
                acc[(size_t)(t % nl) * hd + d] = fmaf(sc[t], kv_at(v, (size_t)t * row_stride + d, f16),
                                                      acc[(size_t)(t % nl) * hd + d]);
#ifdef OPS_X86
    if (!tiled_pv && simd && hd % 16 == 0 && hd <= 256) {
        pv_tail_avx512(out, acc, sc, v, row_stride, nsimd, npos, hd, f16);
        return;
    }
#endif
    for (int d = 0; d < hd; d++) {
        float lanes[16];
        if (tiled_pv) {
            for (int l = 0; l < 16; l++) lanes[l] = acc[(size_t)l * hd + d];
            out[d] = reduce16(lanes);
            continue;
        }
        float head = 0.0f;
        if (nsimd > 0) {
            for (int l = 0; l < 16; l++)
                lanes[l] = (acc[(size_t)l * hd + d] + acc[(size_t)(l + 32) * hd + d]) +
                           (acc[(size_t)(l + 16) * hd + d] + acc[(size_t)(l + 48) * hd + d]);
            head = reduce16(lanes);
        }
        if (f16) {
            double sd = head;
            for (int t = nsimd; t < npos; t++) sd += (double)(sc[t] * kv_at(v, (size_t)t * row_stride + d, f16));
            out[d] = (float)sd;
        } else {
            float sf = head;
            for (int t = nsimd; t < npos; t++) sf = fmaf(sc[t], kv_at(v, (size_t)t * row_stride + d, f16), sf);
            out[d] = sf;
        }
    }
}

void ops_topk_route(const float *logits, int n_expert, int k, int *sel, float *w) {
    float p[1024];   // (n_expert) probabilities; n_expert <= 1024 is checked at load
    int order[1024]; // (n_expert) expert ids sorted by probability
    float mx = -INFINITY;
    for (int e = 0; e < n_expert; e++) mx = logits[e] > mx ? logits[e] : mx;
    bool simd = false;
#ifdef OPS_X86
    simd = have_avx512();
#endif
    const double sum = softmax_exp(p, logits, n_expert, mx, simd);
    const float inv = (float)(1.0 / sum);
    for (int e = 0; e < n_expert; e++) p[e] = p[e] * inv;
    // ggml's argsort (descending): swap whenever a later entry is strictly larger.
    for (int e = 0; e < n_expert; e++) order[e] = e;
    for (int a = 0; a < n_expert; a++)
        for (int b = a + 1; b < n_expert; b++)
            if (p[order[a]] < p[order[b]]) {
                const int t = order[a];
                order[a] = order[b];
                order[b] = t;
            }
    double wsum = 0.0;
    for (int j = 0; j < k; j++) {
        sel[j] = order[j];
        w[j] = p[order[j]];
        wsum += (double)w[j];
    }
    const float ws = (float)wsum;
    for (int j = 0; j < k; j++) w[j] /= ws;
}
