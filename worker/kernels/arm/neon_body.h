// NEON kernel bodies, compiled twice (kern_neon.c plain, kern_dotprod.c with SDOT): dot products and activation quantizers.
//
// Dot products. Q4_0, Q8_0, Q4_K and Q6_K give quant_vec_dot_ref's bits exactly: the reference keeps
// 8 float lanes where integer lane L (0..7) sums the products of elements 4L..4L+3 of each 32-element
// chunk, adds it once per block with one fma by d_w * d_x, and ends with hsum8. Two int32x4 registers
// are those 8 lanes: SDOT (vdotq_s32) sums exactly 4 adjacent int8 products per lane, and without it
// SMULL + two pairwise adds give the same integer sums. F32/F16/BF16 accumulate in float (16 lanes),
// within the test tolerance of the reference's double sum, as the x86 kernels do.
//
// Activation quantizers (Q8_0, Q8_1, Q8_K, F16, BF16) give quant_quantize_ref's bytes: FCVTNS rounds
// to nearest even like rintf / nearest_int, FMAXNM ignores NaN like fmaxf, FCVT f32->f16 is IEEE RNE.
#include <arm_neon.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "worker/kernels/arm/arm.h"

#if !defined(NEON_FILL) || !defined(NEON_MMP_Q4_0) || !defined(NEON_MM_FLOAT)
#error "define NEON_FILL, NEON_MMP_Q4_0 and NEON_MM_FLOAT (the public names) before including neon_body.h"
#endif

#define AI static inline __attribute__((always_inline))

// --- helpers

// One f16 (a block scale) to float with the hardware conversion (exact, subnormals included).
AI float f16_to_f32(mlm_f16_t h) { return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0); }

// float to f16, round to nearest even (as mlm_f32_to_f16).
AI mlm_f16_t f32_to_f16(float f) { return vget_lane_u16(vreinterpret_u16_f16(vcvt_f16_f32(vdupq_n_f32(f))), 0); }

// acc + per lane L: a[4L]*b[4L] + ... + a[4L+3]*b[4L+3] (int8 products summed in int32).
#ifdef __ARM_FEATURE_DOTPROD
AI int32x4_t dot4(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
#else
AI int32x4_t dot4(int32x4_t acc, int8x16_t a, int8x16_t b) {
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b)); // products 0..7
    const int16x8_t hi = vmull_high_s8(a, b);                       // products 8..15
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
}
#endif

// The reference's hsum8 of lanes l0..l3 (lo) and l4..l7 (hi): ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)).
AI float hsum8(float32x4_t lo, float32x4_t hi) {
    const float32x4_t v = vaddq_f32(lo, hi);                               // l0+l4, l1+l5, l2+l6, l3+l7
    const float32x2_t w = vadd_f32(vget_low_f32(v), vget_high_f32(v));     // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
    return vget_lane_f32(w, 0) + vget_lane_f32(w, 1);
}

AI int8x16_t as_s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

// --- dot products: plain types (tolerance, not bits)

AI float32x4_t load4_f32(qtype_t t, const uint8_t *p, int64_t i) {
    if (t == QT_F32) return vld1q_f32((const float *)p + i);
    const uint16x4_t h = vld1_u16((const uint16_t *)p + i);
    if (t == QT_F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); // bf16: the top half of a float
}

AI float scalar_f32(qtype_t t, const uint8_t *p, int64_t i) {
    if (t == QT_F32) return ((const float *)p)[i];
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return t == QT_F16 ? mlm_f16_to_f32(h) : mlm_bf16_to_f32(h);
}

AI float dot_float(qtype_t t, int64_t n, const void *vw, const void *vx) {
    const uint8_t *w = vw, *x = vx; // (n) elements of type t each
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, load4_f32(t, w, i), load4_f32(t, x, i));
        a1 = vfmaq_f32(a1, load4_f32(t, w, i + 4), load4_f32(t, x, i + 4));
        a2 = vfmaq_f32(a2, load4_f32(t, w, i + 8), load4_f32(t, x, i + 8));
        a3 = vfmaq_f32(a3, load4_f32(t, w, i + 12), load4_f32(t, x, i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, load4_f32(t, w, i), load4_f32(t, x, i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s += scalar_f32(t, w, i) * scalar_f32(t, x, i);
    return s;
}

static void vec_dot_f32(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_F32, n, w, x); }
static void vec_dot_f16(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_F16, n, w, x); }
static void vec_dot_bf16(int64_t n, float *s, const void *w, const void *x) { *s = dot_float(QT_BF16, n, w, x); }

// --- dot products: 32-element blocks (the reference's bits)

static void vec_dot_q4_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_0 *w = vw; // (n / 32)
    const block_q8_0 *x = vx; // (n / 32)
    const int64_t nb = n / QK4_0;
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    const int8x16_t eight = vdupq_n_s8(8);
    const int32x4_t zero = vdupq_n_s32(0);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0; // float lanes 0..3, 4..7
    for (int64_t b = 0; b < nb; b++) {
        const uint8x16_t q = vld1q_u8(w[b].qs);
        const int8x16_t lo = vsubq_s8(as_s8(vandq_u8(q, m4)), eight); // elements 0..15
        const int8x16_t hi = vsubq_s8(as_s8(vshrq_n_u8(q, 4)), eight); // elements 16..31
        const int32x4_t s0 = dot4(zero, lo, vld1q_s8(x[b].qs));
        const int32x4_t s1 = dot4(zero, hi, vld1q_s8(x[b].qs + 16));
        const float d = f16_to_f32(w[b].d) * f16_to_f32(x[b].d);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(s0), d);
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(s1), d);
    }
    *s = hsum8(acc0, acc1);
}

static void vec_dot_q8_0(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q8_0 *w = vw; // (n / 32)
    const block_q8_0 *x = vx; // (n / 32)
    const int64_t nb = n / QK8_0;
    const int32x4_t zero = vdupq_n_s32(0);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0; // float lanes 0..3, 4..7
    for (int64_t b = 0; b < nb; b++) {
        const int32x4_t s0 = dot4(zero, vld1q_s8(w[b].qs), vld1q_s8(x[b].qs));
        const int32x4_t s1 = dot4(zero, vld1q_s8(w[b].qs + 16), vld1q_s8(x[b].qs + 16));
        const float d = f16_to_f32(w[b].d) * f16_to_f32(x[b].d);
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(s0), d);
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(s1), d);
    }
    *s = hsum8(acc0, acc1);
}

// --- dot products: K-quants against Q8_K (the reference's bits)

// The 8 6-bit scales (sc) and 8 6-bit mins (mn) of a Q4_K/Q5_K scales array, sub-block order:
// j < 4 in the low 6 bits of bytes j (scale) and j + 4 (min); j >= 4 in the nibbles of byte j + 4
// with their top 2 bits in the top bits of bytes j - 4 (scale) and j (min).
AI void scales_mins_k4(const uint8_t *p, uint8_t sc[8], uint8_t mn[8]) { // p: (12)
    for (int j = 0; j < 4; j++) {
        sc[j] = p[j] & 63;
        mn[j] = p[j + 4] & 63;
        sc[j + 4] = (uint8_t)((p[j + 8] & 0x0f) | ((p[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4));
    }
}

static void vec_dot_q4_k(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q4_K *w = vw; // (n / 256)
    const block_q8_K *x = vx; // (n / 256)
    const int64_t nb = n / QK_K;
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    const int32x4_t zero = vdupq_n_s32(0);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, accm = acc0; // lanes 0..3, 4..7; mins of pairs 0..3
    for (int64_t b = 0; b < nb; b++) {
        uint8_t sc[8], mn[8]; // per sub-block of 32
        scales_mins_k4(w[b].scales, sc, mn);
        const float d = x[b].d * f16_to_f32(w[b].d);
        const float dmin = -x[b].d * f16_to_f32(w[b].dmin);
        const uint8_t *q = w[b].qs;  // (128): chunk c = 32 bytes, low nibbles sub-block 2c, high 2c + 1
        const int8_t *xq = x[b].qs;  // (256)
        int32x4_t l0 = zero, l1 = zero; // integer lanes 0..3, 4..7
        for (int c = 0; c < 4; c++, q += 32, xq += 64) {
            const uint8x16_t qa = vld1q_u8(q), qb = vld1q_u8(q + 16);
            const int32x4_t a0 = dot4(zero, as_s8(vandq_u8(qa, m4)), vld1q_s8(xq));
            const int32x4_t a1 = dot4(zero, as_s8(vandq_u8(qb, m4)), vld1q_s8(xq + 16));
            const int32x4_t b0 = dot4(zero, as_s8(vshrq_n_u8(qa, 4)), vld1q_s8(xq + 32));
            const int32x4_t b1 = dot4(zero, as_s8(vshrq_n_u8(qb, 4)), vld1q_s8(xq + 48));
            l0 = vmlaq_n_s32(vmlaq_n_s32(l0, a0, sc[2 * c]), b0, sc[2 * c + 1]);
            l1 = vmlaq_n_s32(vmlaq_n_s32(l1, a1, sc[2 * c]), b1, sc[2 * c + 1]);
        }
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(l0), d);
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(l1), d);
        // mins: sums of 32 activations per sub-block (pairs of bsums) times the mins, pairs of sub-blocks per lane
        const int16x8_t bs = vpaddq_s16(vld1q_s16(x[b].bsums), vld1q_s16(x[b].bsums + 8));
        const int16x8_t mv = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mn)));
        const int32x4_t m = vpaddq_s32(vmull_s16(vget_low_s16(bs), vget_low_s16(mv)), vmull_high_s16(bs, mv));
        accm = vfmaq_n_f32(accm, vcvtq_f32_s32(m), dmin);
    }
    const float r = hsum8(acc0, acc1);
    *s = r + ((vgetq_lane_f32(accm, 0) + vgetq_lane_f32(accm, 2)) + (vgetq_lane_f32(accm, 1) + vgetq_lane_f32(accm, 3)));
}

// One 32-element chunk of a Q6_K block: 6-bit values (lo | hi, hi already in bits 4..5) minus 32 times
// 32 activations; elements 0..15 (scale s0) go to lanes 0..3, 16..31 (scale s1) to lanes 4..7.
AI void q6_chunk(uint8x16_t lo_a, uint8x16_t lo_b, uint8x16_t hi_a, uint8x16_t hi_b, const int8_t *xq, int s0, int s1,
                 int32x4_t *l0, int32x4_t *l1) {
    const int8x16_t off = vdupq_n_s8(32);
    const int8x16_t qa = vsubq_s8(as_s8(vorrq_u8(lo_a, hi_a)), off);
    const int8x16_t qb = vsubq_s8(as_s8(vorrq_u8(lo_b, hi_b)), off);
    const int32x4_t zero = vdupq_n_s32(0);
    *l0 = vmlaq_n_s32(*l0, dot4(zero, qa, vld1q_s8(xq)), s0);
    *l1 = vmlaq_n_s32(*l1, dot4(zero, qb, vld1q_s8(xq + 16)), s1);
}

static void vec_dot_q6_k(int64_t n, float *s, const void *vw, const void *vx) {
    const block_q6_K *w = vw; // (n / 256)
    const block_q8_K *x = vx; // (n / 256)
    const int64_t nb = n / QK_K;
    const uint8x16_t m4 = vdupq_n_u8(0x0f), m3 = vdupq_n_u8(0x03), m30 = vdupq_n_u8(0x30);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0; // float lanes 0..3, 4..7
    for (int64_t b = 0; b < nb; b++) {
        const float d = x[b].d * f16_to_f32(w[b].d);
        const uint8_t *ql = w[b].ql;    // (128): half h = 64 bytes
        const uint8_t *qh = w[b].qh;    // (64): half h = 32 bytes
        const int8_t *sc = w[b].scales; // (16): one per 16 elements
        const int8_t *xq = x[b].qs;     // (256)
        int32x4_t l0 = vdupq_n_s32(0), l1 = l0; // integer lanes 0..3, 4..7
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, xq += 128) {
            const uint8x16_t L0 = vld1q_u8(ql), L1 = vld1q_u8(ql + 16), L2 = vld1q_u8(ql + 32), L3 = vld1q_u8(ql + 48);
            const uint8x16_t H0 = vld1q_u8(qh), H1 = vld1q_u8(qh + 16);
            // chunk t (elements 32t..32t+31 of the half): low 4 bits from ql[l + 32(t & 1)] (high nibble
            // when t >= 2), bits 4..5 from bits 2t..2t+1 of qh[l]
            q6_chunk(vandq_u8(L0, m4), vandq_u8(L1, m4), vshlq_n_u8(vandq_u8(H0, m3), 4), vshlq_n_u8(vandq_u8(H1, m3), 4),
                     xq, sc[0], sc[1], &l0, &l1);
            q6_chunk(vandq_u8(L2, m4), vandq_u8(L3, m4), vandq_u8(vshlq_n_u8(H0, 2), m30), vandq_u8(vshlq_n_u8(H1, 2), m30),
                     xq + 32, sc[2], sc[3], &l0, &l1);
            q6_chunk(vshrq_n_u8(L0, 4), vshrq_n_u8(L1, 4), vandq_u8(H0, m30), vandq_u8(H1, m30), xq + 64, sc[4], sc[5], &l0,
                     &l1);
            q6_chunk(vshrq_n_u8(L2, 4), vshrq_n_u8(L3, 4), vandq_u8(vshrq_n_u8(H0, 2), m30), vandq_u8(vshrq_n_u8(H1, 2), m30),
                     xq + 96, sc[6], sc[7], &l0, &l1);
        }
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(l0), d);
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(l1), d);
    }
    *s = hsum8(acc0, acc1);
}

// --- activation quantizers (the reference's bytes)

// Largest |x| of 4k floats, NaN ignored (fmaxf's rule), 0 when every value is 0 or NaN.
AI float absmax(const float *x, int k4) { // x: (4 * k4)
    float32x4_t m = vdupq_n_f32(0.0f);
    for (int j = 0; j < k4; j++) m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(x + 4 * j)));
    return vmaxnmvq_f32(m);
}

// 16 floats times scale, rounded to nearest even, clamped to [lo, hi], stored as int8; returns their sum.
AI int32_t round16(const float *x, float scale, int32_t lo, int32_t hi, int8_t *q) { // x: (16); q: (16)
    int32x4_t v[4];
    for (int j = 0; j < 4; j++)
        v[j] = vmaxq_s32(vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 4 * j), scale)), vdupq_n_s32(hi)),
                         vdupq_n_s32(lo));
    const int16x8_t a = vcombine_s16(vqmovn_s32(v[0]), vqmovn_s32(v[1]));
    const int16x8_t b = vcombine_s16(vqmovn_s32(v[2]), vqmovn_s32(v[3]));
    vst1q_s8(q, vcombine_s8(vqmovn_s16(a), vqmovn_s16(b)));
    return vaddvq_s32(vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])));
}

// One block of 32: d = amax / 127, q = rint(x * 127 / amax) (as the reference); returns sum(q).
AI int32_t quant_block32(const float *x, mlm_f16_t *dh, int8_t *qs, float *dout) { // x, qs: (32)
    const float amax = absmax(x, 8);
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *dh = f32_to_f16(d);
    *dout = d;
    return round16(x, id, -127, 127, qs) + round16(x + 16, id, -127, 127, qs + 16);
}

static void from_float_q8_0(const float *x, void *vy, int64_t n) {
    block_q8_0 *y = vy; // (n / 32)
    float d;
    for (int64_t b = 0; b < n / QK8_0; b++) (void)quant_block32(x + b * QK8_0, &y[b].d, y[b].qs, &d);
}

static void from_float_q8_1(const float *x, void *vy, int64_t n) {
    block_q8_1 *y = vy; // (n / 32)
    for (int64_t b = 0; b < n / QK8_1; b++) {
        float d;
        const int32_t sum = quant_block32(x + b * QK8_1, &y[b].d, y[b].qs, &d);
        y[b].s = f32_to_f16((float)sum * d);
    }
}

static void from_float_q8_k(const float *x, void *vy, int64_t n) {
    block_q8_K *y = vy; // (n / 256)
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        const float amax = absmax(x, QK_K / 4);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        // the reference keeps the first element whose magnitude is amax (with its sign)
        float maxv = 0.0f;
        for (int j = 0; j < QK_K; j += 4) {
            if (vmaxvq_u32(vceqq_f32(vabsq_f32(vld1q_f32(x + j)), vdupq_n_f32(amax))) == 0) continue;
            int e = j;
            while (!(x[e] == amax || x[e] == -amax)) e++;
            maxv = x[e];
            break;
        }
        const float iscale = -127.0f / maxv;
        for (int g = 0; g < QK_K / 16; g++) y[b].bsums[g] = (int16_t)round16(x + 16 * g, iscale, -128, 127, y[b].qs + 16 * g);
        y[b].d = 1.0f / iscale;
    }
}

static void from_float_f16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy; // (n)
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = mlm_f32_to_f16(x[i]);
}

static void from_float_bf16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy; // (n)
    const uint32x4_t one = vdupq_n_u32(1), bias = vdupq_n_u32(0x7fff), quiet = vdupq_n_u32(64);
    const uint32x4_t abs_mask = vdupq_n_u32(0x7fffffffu), inf = vdupq_n_u32(0x7f800000u);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const uint32x4_t u = vreinterpretq_u32_f32(vld1q_f32(x + i));
        const uint32x4_t top = vshrq_n_u32(u, 16);
        const uint32x4_t rn = vshrq_n_u32(vaddq_u32(u, vaddq_u32(bias, vandq_u32(top, one))), 16);
        const uint32x4_t nan = vcgtq_u32(vandq_u32(u, abs_mask), inf);
        vst1_u16(y + i, vmovn_u32(vbslq_u32(nan, vorrq_u32(top, quiet), rn)));
    }
    for (; i < n; i++) y[i] = mlm_f32_to_bf16(x[i]);
}

// --- matmul: packed Q4_0 groups and plain F32/F16 rows in the portable kernels' orders (matmul.c)

// One packed 16-row Q4_0 group (x86_mm.h layout) against nt activation rows, in group_scalar's
// order: per row one fma chain over the blocks of (corr + integer dot) * (d_w * d_x).
void NEON_MMP_Q4_0(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                   uint32_t mask) {
    const size_t toff = mmp_act_tail_off(nb);
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (int t = 0; t < nt; t++) {
        const uint8_t *xr = xq + (size_t)t * xs; // one activation row: nb Q8_0 blocks, then the tail
        float32x4_t acc[4];                      // rows 4r..4r+3
        for (int r = 0; r < 4; r++) acc[r] = vdupq_n_f32(0.0f);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = mmp_block_quants(MMP_Q4_0X16, grp, b); // (4, 16 rows, 4 bytes)
            const int8_t *xb = ((const block_q8_0 *)xr)[b].qs;        // (32)
            int32_t corr;
            float dx;
            memcpy(&corr, xr + toff + (size_t)b * 4, 4);
            memcpy(&dx, xr + toff + (size_t)(nb + b) * 4, 4);
            int32x4_t isum[4];
            for (int r = 0; r < 4; r++) isum[r] = vdupq_n_s32(corr);
            for (int j = 0; j < 4; j++) {
                uint32_t xl, xh; // activation elements 4j..4j+3 (low nibbles) and 16+4j.. (high nibbles)
                memcpy(&xl, xb + 4 * j, 4);
                memcpy(&xh, xb + 16 + 4 * j, 4);
                const int8x16_t bl = vreinterpretq_s8_u32(vdupq_n_u32(xl)), bh = vreinterpretq_s8_u32(vdupq_n_u32(xh));
                for (int r = 0; r < 4; r++) {
                    const uint8x16_t v = vld1q_u8(q + 64 * j + 16 * r); // dword j of rows 4r..4r+3
                    isum[r] = dot4(dot4(isum[r], as_s8(vandq_u8(v, m4)), bl), as_s8(vshrq_n_u8(v, 4)), bh);
                }
            }
            const uint16_t *sc = (const uint16_t *)mmp_block_scales(MMP_Q4_0X16, grp, b); // (16) f16
            for (int r = 0; r < 4; r++) {
                const float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + 4 * r)));
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(isum[r]), vmulq_n_f32(dw, dx));
            }
        }
        float out[16]; // (16 rows)
        for (int r = 0; r < 4; r++) vst1q_f32(out + 4 * r, acc[r]);
        for (int i = 0; i < MMP_ROWS; i++)
            if (mask >> i & 1u) y[(size_t)t * ys + i] = out[i];
    }
}

// The reference's 16-lane sum: halves, quarters, then (s0 + s2) + (s1 + s3); q0..q3 hold lanes 0..15.
AI float reduce16(float32x4_t q0, float32x4_t q1, float32x4_t q2, float32x4_t q3) {
    const float32x4_t s4 = vaddq_f32(vaddq_f32(q3, q1), vaddq_f32(q2, q0));
    const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
    return vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
}

// One F32/F16 output in matmul.c's float_dot_exact order: tiled = one 16-lane fma chain; otherwise
// 4 x 16 lanes per 64 elements, then the tail (F32: rounded products in runs of 8, the last n % 8
// fused; F16: exact products summed in double).
AI float float_dot_exact(qtype_t t, const uint8_t *w, const uint8_t *x, int64_t n, bool tiled) {
    if (tiled) { // n is a multiple of 16
        float32x4_t a[4];
        for (int q = 0; q < 4; q++) a[q] = vdupq_n_f32(0.0f);
        for (int64_t c = 0; c < n; c += 16)
            for (int q = 0; q < 4; q++) a[q] = vfmaq_f32(a[q], load4_f32(t, w, c + 4 * q), load4_f32(t, x, c + 4 * q));
        return reduce16(a[0], a[1], a[2], a[3]);
    }
    float32x4_t a[4][4]; // (16-lane group j, quarter q)
    for (int j = 0; j < 4; j++)
        for (int q = 0; q < 4; q++) a[j][q] = vdupq_n_f32(0.0f);
    const int64_t np = n & ~(int64_t)63;
    for (int64_t i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int q = 0; q < 4; q++)
                a[j][q] = vfmaq_f32(a[j][q], load4_f32(t, w, i + 16 * j + 4 * q), load4_f32(t, x, i + 16 * j + 4 * q));
    float32x4_t c[4];
    for (int q = 0; q < 4; q++) c[q] = vaddq_f32(vaddq_f32(a[0][q], a[2][q]), vaddq_f32(a[1][q], a[3][q]));
    const float head = reduce16(c[0], c[1], c[2], c[3]);
    if (t == QT_F32) {
        const int64_t n8 = np + ((n - np) & ~(int64_t)7);
        float sf = head;
        for (int64_t i = np; i < n8; i++) {
            const float p = scalar_f32(t, w, i) * scalar_f32(t, x, i); // rounded, then added
            sf += p;
        }
        for (int64_t i = n8; i < n; i++) sf = fmaf(scalar_f32(t, w, i), scalar_f32(t, x, i), sf);
        return sf;
    }
    double sd = head;
    for (int64_t i = np; i < n; i++) sd += (double)(scalar_f32(t, w, i) * scalar_f32(t, x, i));
    return (float)sd;
}

void NEON_MM_FLOAT(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                   float *y, size_t ys, int64_t n, bool tiled) {
    for (int64_t r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            y[(size_t)t * ys + r] = type == QT_F32 ? float_dot_exact(QT_F32, w + (size_t)r * wrow, x + (size_t)t * xs, n, tiled)
                                                   : float_dot_exact(QT_F16, w + (size_t)r * wrow, x + (size_t)t * xs, n, tiled);
}

// --- table

void NEON_FILL(kernels_t *k) {
    k->vec_dot[QT_F32] = vec_dot_f32;
    k->vec_dot[QT_F16] = vec_dot_f16;
    k->vec_dot[QT_BF16] = vec_dot_bf16;
    k->vec_dot[QT_Q4_0] = vec_dot_q4_0;
    k->vec_dot[QT_Q8_0] = vec_dot_q8_0;
    k->vec_dot[QT_Q4_K] = vec_dot_q4_k;
    k->vec_dot[QT_Q6_K] = vec_dot_q6_k;
    k->from_float[QT_Q8_0] = from_float_q8_0;
    k->from_float[QT_Q8_1] = from_float_q8_1;
    k->from_float[QT_Q8_K] = from_float_q8_k;
    k->from_float[QT_F16] = from_float_f16;
    k->from_float[QT_BF16] = from_float_bf16;
}
