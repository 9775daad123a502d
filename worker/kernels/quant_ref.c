// Scalar reference kernels for every tensor type: dequantize, quantize and dot product (the test oracle).
#include "worker/kernels/quant.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "core/bytes.h"
#include "core/err.h"

// --- types

// One K-quant super-block expanded into integers: x[i] = d*sc[j]*q[i] - dmin*mn[j], j = i / sub.
typedef struct {
    int8_t q[QK_K];  // (QK_K) quant values, already centred for types without a min
    int sc[16];      // (QK_K / sub) integer sub-block scales
    int mn[16];      // (QK_K / sub) integer sub-block mins (0 for symmetric types)
    int sub;         // elements per sub-block: 16 or 32
    float d;         // super-block scale
    float dmin;      // super-block scale of the mins (0 for symmetric types)
} kblock_t;

// --- helpers: rounding and small math

// Round to nearest, ties to even (the default FP rounding mode). This is what llama.cpp's
// nearest_int (float magic-number trick) computes for every |v| < 2^22.
static inline int nearest_int(float v) {
    if (!(fabsf(v) < 4194304.f)) return v > 0 ? 4194304 : (v < 0 ? -4194304 : 0); // inf, NaN, huge
    return (int)lrintf(v);
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Truncating float -> int conversion like a C cast, saturated so that NaN and huge inputs
// stay defined behaviour.
static inline int trunc_sat(float v) {
    if (!(v > -1e9f && v < 1e9f)) return v > 0 ? 1000000000 : (v < 0 ? -1000000000 : 0);
    return (int)v;
}

// --- helpers: K-quant unpacking (block bytes -> kblock_t)

// The j-th 6-bit scale and min of a Q4_K / Q5_K scales array.
static void scale_min_k4(int j, const uint8_t *s, int *sc, int *m) { // s: (K_SCALE_SIZE)
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Inverse of scale_min_k4 for all 8 pairs (values 0..63).
static void pack_scale_min_k4(const int *sc, const int *m, uint8_t *s) { // sc, m: (8); s: (12)
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
    }
}

// Q2_K: element e = 128n + 32s + l sits in qs[32n + l] bits 2s..2s+1; sub-block e / 16.
static void unpack_q2_K(const block_q2_K *b, kblock_t *k) {
    k->sub = 16;
    k->d = mlm_f16_to_f32(b->d);
    k->dmin = mlm_f16_to_f32(b->dmin);
    for (int j = 0; j < 16; j++) {
        k->sc[j] = b->scales[j] & 0xF;
        k->mn[j] = b->scales[j] >> 4;
    }
    for (int e = 0; e < QK_K; e++) {
        int n = e / 128, s = (e % 128) / 32, l = e % 32;
        k->q[e] = (int8_t)((b->qs[32 * n + l] >> (2 * s)) & 3);
    }
}

// The i-th (0..15) 6-bit Q3_K scale, still biased by 32.
static int q3_K_scale(const uint8_t *s, int i) { // s: (12)
    int lo = i < 8 ? (s[i] & 0xF) : (s[i - 8] >> 4);
    int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return lo | (hi << 4);
}

// Q3_K: low 2 bits as in Q2_K; hmask[l] bit (4n + s) set means "no -4 offset".
static void unpack_q3_K(const block_q3_K *b, kblock_t *k) {
    k->sub = 16;
    k->d = mlm_f16_to_f32(b->d);
    k->dmin = 0.0f;
    for (int j = 0; j < 16; j++) {
        k->sc[j] = q3_K_scale(b->scales, j) - 32;
        k->mn[j] = 0;
    }
    for (int e = 0; e < QK_K; e++) {
        int n = e / 128, s = (e % 128) / 32, l = e % 32;
        int lo = (b->qs[32 * n + l] >> (2 * s)) & 3;
        int hb = (b->hmask[l] >> (4 * n + s)) & 1;
        k->q[e] = (int8_t)(lo - (hb ? 0 : 4));
    }
}

// Q4_K: element e = 64c + r; r < 32 is the low nibble of qs[32c + r] (sub-block 2c), else the
// high nibble of qs[32c + r - 32] (sub-block 2c + 1).
static void unpack_q4_K(const block_q4_K *b, kblock_t *k) {
    k->sub = 32;
    k->d = mlm_f16_to_f32(b->d);
    k->dmin = mlm_f16_to_f32(b->dmin);
    for (int j = 0; j < 8; j++) scale_min_k4(j, b->scales, &k->sc[j], &k->mn[j]);
    for (int e = 0; e < QK_K; e++) {
        int c = e / 64, r = e % 64;
        k->q[e] = (int8_t)(r < 32 ? (b->qs[32 * c + r] & 0xF) : (b->qs[32 * c + r - 32] >> 4));
    }
}

// Q5_K: Q4_K plus a 5th bit from qh[r % 32], bit 2c (first 32 of chunk c) or 2c + 1 (next 32).
static void unpack_q5_K(const block_q5_K *b, kblock_t *k) {
    k->sub = 32;
    k->d = mlm_f16_to_f32(b->d);
    k->dmin = mlm_f16_to_f32(b->dmin);
    for (int j = 0; j < 8; j++) scale_min_k4(j, b->scales, &k->sc[j], &k->mn[j]);
    for (int e = 0; e < QK_K; e++) {
        int c = e / 64, r = e % 64;
        int lo = r < 32 ? (b->qs[32 * c + r] & 0xF) : (b->qs[32 * c + r - 32] >> 4);
        int hb = (b->qh[r % 32] >> (2 * c + (r >= 32))) & 1;
        k->q[e] = (int8_t)(lo | (hb << 4));
    }
}

// Q6_K: element e = 128h + 32t + l: low nibble of ql[64h + l + 32(t & 1)] (high nibble when
// t >= 2), top 2 bits from qh[32h + l] bits 2t..2t+1, minus 32; sub-block e / 16.
static void unpack_q6_K(const block_q6_K *b, kblock_t *k) {
    k->sub = 16;
    k->d = mlm_f16_to_f32(b->d);
    k->dmin = 0.0f;
    for (int j = 0; j < 16; j++) {
        k->sc[j] = b->scales[j];
        k->mn[j] = 0;
    }
    for (int e = 0; e < QK_K; e++) {
        int h = e / 128, t = (e % 128) / 32, l = e % 32;
        int lo = (b->ql[64 * h + l + 32 * (t & 1)] >> (4 * (t >> 1))) & 0xF;
        int hi = (b->qh[32 * h + l] >> (2 * t)) & 3;
        k->q[e] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

static void unpack_q8_K(const block_q8_K *b, kblock_t *k) {
    k->sub = 16;
    k->d = b->d;
    k->dmin = 0.0f;
    for (int j = 0; j < 16; j++) {
        k->sc[j] = 1;
        k->mn[j] = 0;
    }
    memcpy(k->q, b->qs, QK_K);
}

// Unpacks block i of a row of K-quant type t; false for a type that is not a K-quant.
static bool unpack_k(qtype_t t, const void *row, int64_t i, kblock_t *k) {
    switch (t) {
    case QT_Q2_K: unpack_q2_K((const block_q2_K *)row + i, k); return true;
    case QT_Q3_K: unpack_q3_K((const block_q3_K *)row + i, k); return true;
    case QT_Q4_K: unpack_q4_K((const block_q4_K *)row + i, k); return true;
    case QT_Q5_K: unpack_q5_K((const block_q5_K *)row + i, k); return true;
    case QT_Q6_K: unpack_q6_K((const block_q6_K *)row + i, k); return true;
    case QT_Q8_K: unpack_q8_K((const block_q8_K *)row + i, k); return true;
    default: return false;
    }
}

// --- helpers: dequantize

static void dequant_q4_0(const block_q4_0 *b, float *y, int64_t nb) { // y: (nb * 32)
    for (int64_t i = 0; i < nb; i++, y += QK4_0) {
        const float d = mlm_f16_to_f32(b[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = (float)((b[i].qs[j] & 0xF) - 8) * d;
            y[j + QK4_0 / 2] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(const block_q4_1 *b, float *y, int64_t nb) { // y: (nb * 32)
    for (int64_t i = 0; i < nb; i++, y += QK4_1) {
        const float d = mlm_f16_to_f32(b[i].d), m = mlm_f16_to_f32(b[i].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            y[j] = (float)(b[i].qs[j] & 0xF) * d + m;
            y[j + QK4_1 / 2] = (float)(b[i].qs[j] >> 4) * d + m;
        }
    }
}

// The 5-bit value of element j (0..31) of a Q5_0 / Q5_1 block.
static int q5_value(const uint8_t *qs, uint32_t qh, int j) { // qs: (16)
    int lo = j < 16 ? (qs[j] & 0xF) : (qs[j - 16] >> 4);
    return lo | (int)(((qh >> j) & 1u) << 4);
}

static void dequant_q5_0(const block_q5_0 *b, float *y, int64_t nb) { // y: (nb * 32)
    for (int64_t i = 0; i < nb; i++, y += QK5_0) {
        const float d = mlm_f16_to_f32(b[i].d);
        const uint32_t qh = mlm_get32(b[i].qh);
        for (int j = 0; j < QK5_0; j++) y[j] = (float)(q5_value(b[i].qs, qh, j) - 16) * d;
    }
}

static void dequant_q5_1(const block_q5_1 *b, float *y, int64_t nb) { // y: (nb * 32)
    for (int64_t i = 0; i < nb; i++, y += QK5_1) {
        const float d = mlm_f16_to_f32(b[i].d), m = mlm_f16_to_f32(b[i].m);
        const uint32_t qh = mlm_get32(b[i].qh);
        for (int j = 0; j < QK5_1; j++) y[j] = (float)q5_value(b[i].qs, qh, j) * d + m;
    }
}

static void dequant_q8_0(const block_q8_0 *b, float *y, int64_t nb) { // y: (nb * 32)
    for (int64_t i = 0; i < nb; i++, y += QK8_0) {
        const float d = mlm_f16_to_f32(b[i].d);
        for (int j = 0; j < QK8_0; j++) y[j] = (float)b[i].qs[j] * d;
    }
}

static void dequant_q8_1(const block_q8_1 *b, float *y, int64_t nb) { // y: (nb * 32)
    for (int64_t i = 0; i < nb; i++, y += QK8_1) {
        const float d = mlm_f16_to_f32(b[i].d);
        for (int j = 0; j < QK8_1; j++) y[j] = (float)b[i].qs[j] * d;
    }
}

// Any K-quant: y = (d*sc)*q - dmin*mn, the same float operations as llama.cpp's dequantizers.
static void dequant_k(qtype_t t, const void *src, float *y, int64_t nb) { // y: (nb * 256)
    kblock_t k;
    for (int64_t i = 0; i < nb; i++, y += QK_K) {
        unpack_k(t, src, i, &k);
        for (int j = 0; j < QK_K / k.sub; j++) {
            const float dl = k.d * (float)k.sc[j];
            const float ml = k.dmin * (float)k.mn[j];
            for (int l = 0; l < k.sub; l++) y[j * k.sub + l] = dl * (float)k.q[j * k.sub + l] - ml;
        }
    }
}

// --- helpers: quantizers for the 32-element block types
// The activation quantizers Q8_0 and Q8_1 round as llama.cpp does on x86 (its AVX path, used for
// every quantized matmul there, also for repacked Q4_0): id = 127/amax and round half to even. Its
// portable _ref rounds half away from zero with id = 1/d; the two differ on a few values per
// thousand, and random-weight models amplify one flipped rounding into visible logit changes.

static void quant_q8_0(const float *x, block_q8_0 *b, int64_t nb) { // x: (nb * 32)
    for (int64_t i = 0; i < nb; i++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        b[i].d = mlm_f32_to_f16(d);
        for (int j = 0; j < QK8_0; j++) b[i].qs[j] = (int8_t)clampi(trunc_sat(rintf(x[j] * id)), -127, 127);
    }
}

static void quant_q8_1(const float *x, block_q8_1 *b, int64_t nb) { // x: (nb * 32)
    for (int64_t i = 0; i < nb; i++, x += QK8_1) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_1; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        b[i].d = mlm_f32_to_f16(d);
        int sum = 0;
        for (int j = 0; j < QK8_1; j++) {
            b[i].qs[j] = (int8_t)clampi(trunc_sat(rintf(x[j] * id)), -127, 127);
            sum += b[i].qs[j];
        }
        b[i].s = mlm_f32_to_f16((float)sum * d);
    }
}

// The signed value with the largest magnitude (first one wins ties) of x[0..n).
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static void quant_q4_0(const float *x, block_q4_0 *b, int64_t nb) { // x: (nb * 32)
    for (int64_t i = 0; i < nb; i++, x += QK4_0) {
        const float d = signed_absmax(x, QK4_0) / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = mlm_f32_to_f16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            int q0 = clampi(trunc_sat(x[j] * id + 8.5f), 0, 15);
            int q1 = clampi(trunc_sat(x[j + QK4_0 / 2] * id + 8.5f), 0, 15);
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void minmax(const float *x, int n, float *lo, float *hi) {
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        mn = fminf(mn, x[j]);
        mx = fmaxf(mx, x[j]);
    }
    *lo = mn;
    *hi = mx;
}

static void quant_q4_1(const float *x, block_q4_1 *b, int64_t nb) { // x: (nb * 32)
    for (int64_t i = 0; i < nb; i++, x += QK4_1) {
        float lo, hi;
        minmax(x, QK4_1, &lo, &hi);
        const float d = (hi - lo) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = mlm_f32_to_f16(d);
        b[i].m = mlm_f32_to_f16(lo);
        for (int j = 0; j < QK4_1 / 2; j++) {
            int q0 = clampi(trunc_sat((x[j] - lo) * id + 0.5f), 0, 15);
            int q1 = clampi(trunc_sat((x[j + QK4_1 / 2] - lo) * id + 0.5f), 0, 15);
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

// Stores 32 5-bit values into a Q5_0 / Q5_1 qs + qh pair.
static void pack_q5(const int *q, uint8_t *qs, uint8_t *qh) { // q: (32); qs: (16); qh: (4)
    uint32_t h = 0;
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
    for (int j = 0; j < 32; j++) h |= (uint32_t)((q[j] >> 4) & 1) << j;
    mlm_put32(qh, h);
}

static void quant_q5_0(const float *x, block_q5_0 *b, int64_t nb) { // x: (nb * 32)
    int q[QK5_0]; // (32) 5-bit values
    for (int64_t i = 0; i < nb; i++, x += QK5_0) {
        const float d = signed_absmax(x, QK5_0) / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = mlm_f32_to_f16(d);
        for (int j = 0; j < QK5_0; j++) q[j] = clampi(trunc_sat(x[j] * id + 16.5f), 0, 31);
        pack_q5(q, b[i].qs, b[i].qh);
    }
}

static void quant_q5_1(const float *x, block_q5_1 *b, int64_t nb) { // x: (nb * 32)
    int q[QK5_1]; // (32) 5-bit values
    for (int64_t i = 0; i < nb; i++, x += QK5_1) {
        float lo, hi;
        minmax(x, QK5_1, &lo, &hi);
        const float d = (hi - lo) / 31.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = mlm_f32_to_f16(d);
        b[i].m = mlm_f32_to_f16(lo);
        for (int j = 0; j < QK5_1; j++) q[j] = clampi(trunc_sat((x[j] - lo) * id + 0.5f), 0, 31);
        pack_q5(q, b[i].qs, b[i].qh);
    }
}

// Q8_K exactly as llama.cpp's reference: scale -127/max of the signed absmax, round half to
// even, clamp at 127, d = 1/iscale. An all-zero block gets d = 0, zero quants and zero bsums.
static void quant_q8_K(const float *x, block_q8_K *b, int64_t nb) { // x: (nb * 256)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        const float max = signed_absmax(x, QK_K);
        memset(b[i].qs, 0, sizeof(b[i].qs));
        memset(b[i].bsums, 0, sizeof(b[i].bsums));
        b[i].d = 0.0f;
        if (max == 0.0f) continue;
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            int v = nearest_int(iscale * x[j]);
            b[i].qs[j] = (int8_t)clampi(v, -128, 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += b[i].qs[16 * g + j];
            b[i].bsums[g] = (int16_t)sum;
        }
        b[i].d = 1.0f / iscale;
    }
}

// --- helpers: K-quant weight quantizers (own design: least-squares fits per sub-block)

// Least-squares s, b for x ~= s*L + b given integer levels L; returns false when degenerate.
// With nonpos_b the offset is constrained to b <= 0 (a "min" stored as a positive number).
static bool lsq_affine(const float *x, const int *L, int n, bool nonpos_b, float *s, float *b) {
    double sl = 0, sll = 0, sx = 0, sxl = 0;
    for (int i = 0; i < n; i++) {
        sl += L[i];
        sll += (double)L[i] * L[i];
        sx += x[i];
        sxl += (double)x[i] * L[i];
    }
    double det = n * sll - sl * sl;
    double ss, bb;
    if (det > 0) {
        ss = (n * sxl - sl * sx) / det;
        bb = (sll * sx - sl * sxl) / det;
    } else {
        ss = 0;
        bb = sx / n;
    }
    if (nonpos_b && bb > 0) {
        bb = 0;
        ss = sll > 0 ? sxl / sll : 0;
    }
    if (!(ss > 0)) return false;
    *s = (float)ss;
    *b = (float)bb;
    return true;
}

// Squared error of x against s*L + b where L is the best level in [lo, hi] for each x.
static double affine_err(const float *x, int n, float s, float b, int lo, int hi, int *L) { // L: (n) out
    double err = 0;
    for (int i = 0; i < n; i++) {
        int l = s != 0.0f ? clampi(nearest_int((x[i] - b) / s), lo, hi) : 0;
        if (L) L[i] = l;
        double e = (double)s * l + b - x[i];
        err += e * e;
    }
    return err;
}

// Fits x ~= s*L - m with L in 0..nmax, s >= 0 and m >= 0, by trying a fan of scales around the
// min-max one, least-squares refitting each, and keeping the one with the smallest error.
static void fit_scale_min(const float *x, int n, int nmax, float *s_out, float *m_out) { // x: (n <= 32)
    int L[32]; // (n) trial levels
    float lo, hi;
    minmax(x, n, &lo, &hi);
    if (lo > 0) lo = 0;
    if (hi <= lo) {
        *s_out = 0.0f;
        *m_out = -lo;
        return;
    }
    float best_s = (hi - lo) / nmax, best_b = lo;
    double best = affine_err(x, n, best_s, best_b, 0, nmax, NULL);
    for (int k = -8; k <= 12; k++) {
        float s0 = (hi - lo) / (nmax + 0.1f * k);
        float s, b;
        affine_err(x, n, s0, lo, 0, nmax, L);
        for (int it = 0; it < 3; it++) {
            if (!lsq_affine(x, L, n, true, &s, &b)) break;
            double err = affine_err(x, n, s, b, 0, nmax, L);
            if (err < best) {
                best = err;
                best_s = s;
                best_b = b;
            }
        }
    }
    *s_out = best_s;
    *m_out = -best_b;
}

// Fits x ~= s*L with L in -nneg..nneg-1 (s may be negative), trying scales that put the signed
// absmax near either end of the range and keeping the least-squares best.
static float fit_scale_sym(const float *x, int n, int nneg) { // x: (n <= 32)
    int L[32]; // (n) trial levels
    const float max = signed_absmax(x, n);
    if (max == 0.0f) return 0.0f;
    float best_s = max / -(float)nneg;
    double best = affine_err(x, n, best_s, 0.0f, -nneg, nneg - 1, NULL);
    for (int side = 0; side < 2; side++) {
        for (int k = -8; k <= 8; k++) {
            float target = side == 0 ? -(nneg + 0.1f * k) : (nneg - 1 + 0.1f * k);
            if (target == 0.0f) continue;
            float s0 = max / target;
            affine_err(x, n, s0, 0.0f, -nneg, nneg - 1, L);
            double sxl = 0, sll = 0;
            for (int i = 0; i < n; i++) {
                sxl += (double)x[i] * L[i];
                sll += (double)L[i] * L[i];
            }
            if (sll <= 0) continue;
            float s = (float)(sxl / sll);
            double err = affine_err(x, n, s, 0.0f, -nneg, nneg - 1, NULL);
            if (err < best) {
                best = err;
                best_s = s;
            }
        }
    }
    return best_s;
}

// Quantizes one super-block with a min (Q2_K: nmax 3, 4-bit scales; Q4_K: 15 / 6-bit; Q5_K:
// 31 / 6-bit). Outputs the f16 scales, integer sub-block scales/mins and levels 0..nmax.
static void quant_super_min(const float *x, int sub, int nmax, int qmax, mlm_f16_t *dh, mlm_f16_t *dminh,
                            int *sc, int *mq, int *L) { // x, L: (256); sc, mq: (256 / sub)
    const int nsub = QK_K / sub;
    float s[16], m[16]; // (nsub) float sub-block scales and mins
    float smax = 0.0f, mmax = 0.0f;
    for (int j = 0; j < nsub; j++) {
        fit_scale_min(x + j * sub, sub, nmax, &s[j], &m[j]);
        smax = fmaxf(smax, s[j]);
        mmax = fmaxf(mmax, m[j]);
    }
    *dh = mlm_f32_to_f16(smax / qmax);
    *dminh = mlm_f32_to_f16(mmax / qmax);
    const float d = mlm_f16_to_f32(*dh), dmin = mlm_f16_to_f32(*dminh);
    for (int j = 0; j < nsub; j++) {
        const float *xs = x + j * sub;
        // try the two nearest integer scales and mins, keep the pair with the smallest error
        int s0 = d > 0 ? clampi((int)floorf(s[j] / d), 0, qmax) : 0;
        int m0 = dmin > 0 ? clampi((int)floorf(m[j] / dmin), 0, qmax) : 0;
        double best = INFINITY;
        for (int a = 0; a < 2; a++) {
            for (int c = 0; c < 2; c++) {
                int si = clampi(s0 + a, 0, qmax), mi = clampi(m0 + c, 0, qmax);
                double err = affine_err(xs, sub, d * si, -(dmin * mi), 0, nmax, NULL);
                if (err < best) {
                    best = err;
                    sc[j] = si;
                    mq[j] = mi;
                }
            }
        }
        affine_err(xs, sub, d * sc[j], -(dmin * mq[j]), 0, nmax, L + j * sub);
    }
}

// Quantizes one symmetric super-block (Q3_K: nneg 4, 6-bit signed scales; Q6_K: nneg 32, 8-bit
// scales). Outputs the f16 scale, integer sub-block scales and levels -nneg..nneg-1.
static void quant_super_sym(const float *x, int nneg, int qmax, mlm_f16_t *dh, int *sc, int *L) {
    float s[16]; // (16) float sub-block scales
    float amax = 0.0f;
    for (int j = 0; j < 16; j++) {
        s[j] = fit_scale_sym(x + 16 * j, 16, nneg);
        amax = fmaxf(amax, fabsf(s[j]));
    }
    *dh = mlm_f32_to_f16(amax / qmax);
    const float d = mlm_f16_to_f32(*dh);
    for (int j = 0; j < 16; j++) {
        const float *xs = x + 16 * j;
        int s0 = d > 0 ? clampi((int)floorf(s[j] / d), -qmax, qmax) : 0;
        double best = INFINITY;
        for (int a = 0; a < 2; a++) {
            int si = clampi(s0 + a, -qmax, qmax);
            double err = affine_err(xs, 16, d * si, 0.0f, -nneg, nneg - 1, NULL);
            if (err < best) {
                best = err;
                sc[j] = si;
            }
        }
        affine_err(xs, 16, d * sc[j], 0.0f, -nneg, nneg - 1, L + 16 * j);
    }
}

static void quant_q2_K(const float *x, block_q2_K *b, int64_t nb) { // x: (nb * 256)
    int sc[16], mq[16], L[QK_K]; // (16), (16), (256)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quant_super_min(x, 16, 3, 15, &b[i].d, &b[i].dmin, sc, mq, L);
        for (int j = 0; j < 16; j++) b[i].scales[j] = (uint8_t)(sc[j] | (mq[j] << 4));
        memset(b[i].qs, 0, sizeof(b[i].qs));
        for (int e = 0; e < QK_K; e++) {
            int n = e / 128, s = (e % 128) / 32, l = e % 32;
            b[i].qs[32 * n + l] |= (uint8_t)(L[e] << (2 * s));
        }
    }
}

static void quant_q3_K(const float *x, block_q3_K *b, int64_t nb) { // x: (nb * 256)
    int sc[16], L[QK_K]; // (16), (256)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quant_super_sym(x, 4, 31, &b[i].d, sc, L);
        memset(b[i].scales, 0, sizeof(b[i].scales));
        for (int j = 0; j < 16; j++) {
            int u = sc[j] + 32; // 1..63
            if (j < 8) b[i].scales[j] |= (uint8_t)(u & 0xF);
            else b[i].scales[j - 8] |= (uint8_t)((u & 0xF) << 4);
            b[i].scales[8 + j % 4] |= (uint8_t)((u >> 4) << (2 * (j / 4)));
        }
        memset(b[i].qs, 0, sizeof(b[i].qs));
        memset(b[i].hmask, 0, sizeof(b[i].hmask));
        for (int e = 0; e < QK_K; e++) {
            int n = e / 128, s = (e % 128) / 32, l = e % 32;
            int u = L[e] + 4; // 0..7
            b[i].qs[32 * n + l] |= (uint8_t)((u & 3) << (2 * s));
            if (u & 4) b[i].hmask[l] |= (uint8_t)(1u << (4 * n + s));
        }
    }
}

static void quant_q4_K(const float *x, block_q4_K *b, int64_t nb) { // x: (nb * 256)
    int sc[8], mq[8], L[QK_K]; // (8), (8), (256)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quant_super_min(x, 32, 15, 63, &b[i].d, &b[i].dmin, sc, mq, L);
        pack_scale_min_k4(sc, mq, b[i].scales);
        for (int c = 0; c < 4; c++)
            for (int r = 0; r < 32; r++)
                b[i].qs[32 * c + r] = (uint8_t)(L[64 * c + r] | (L[64 * c + 32 + r] << 4));
    }
}

static void quant_q5_K(const float *x, block_q5_K *b, int64_t nb) { // x: (nb * 256)
    int sc[8], mq[8], L[QK_K]; // (8), (8), (256)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quant_super_min(x, 32, 31, 63, &b[i].d, &b[i].dmin, sc, mq, L);
        pack_scale_min_k4(sc, mq, b[i].scales);
        memset(b[i].qh, 0, sizeof(b[i].qh));
        for (int c = 0; c < 4; c++) {
            for (int r = 0; r < 32; r++) {
                int a = L[64 * c + r], h = L[64 * c + 32 + r];
                b[i].qs[32 * c + r] = (uint8_t)((a & 0xF) | ((h & 0xF) << 4));
                b[i].qh[r] |= (uint8_t)(((a >> 4) << (2 * c)) | ((h >> 4) << (2 * c + 1)));
            }
        }
    }
}

static void quant_q6_K(const float *x, block_q6_K *b, int64_t nb) { // x: (nb * 256)
    int sc[16], L[QK_K]; // (16), (256)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quant_super_sym(x, 32, 127, &b[i].d, sc, L);
        for (int j = 0; j < 16; j++) b[i].scales[j] = (int8_t)sc[j];
        memset(b[i].ql, 0, sizeof(b[i].ql));
        memset(b[i].qh, 0, sizeof(b[i].qh));
        for (int e = 0; e < QK_K; e++) {
            int h = e / 128, t = (e % 128) / 32, l = e % 32;
            int u = L[e] + 32; // 0..63
            b[i].ql[64 * h + l + 32 * (t & 1)] |= (uint8_t)((u & 0xF) << (4 * (t >> 1)));
            b[i].qh[32 * h + l] |= (uint8_t)((u >> 4) << (2 * t));
        }
    }
}

// --- helpers: dot products

// Sum of 8 float lanes in the order of llama.cpp's x86 horizontal add:
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
static float hsum8(const float *l) { // l: (8)
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// Q4_0 and Q8_0 . Q8_0 with llama.cpp's x86 vec_dot order: 8 integer lanes per block (lane L sums
// elements 4L..4L+3), one fma per block into each float lane by d_w * d_x, then hsum8.
static void dot_q4_0_q8_0(int64_t nb, float *s, const block_q4_0 *w, const block_q8_0 *x) {
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++) {
        int8_t q[QK4_0]; // centred values, element order
        for (int j = 0; j < QK4_0 / 2; j++) {
            q[j] = (int8_t)((w[i].qs[j] & 0xF) - 8);
            q[j + QK4_0 / 2] = (int8_t)((w[i].qs[j] >> 4) - 8);
        }
        const float d = mlm_f16_to_f32(w[i].d) * mlm_f16_to_f32(x[i].d);
        for (int l = 0; l < 8; l++) {
            int32_t lane = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) lane += q[e] * x[i].qs[e];
            acc[l] = fmaf(d, (float)lane, acc[l]);
        }
    }
    *s = hsum8(acc);
}

static void dot_q4_1_q8_1(int64_t nb, float *s, const block_q4_1 *w, const block_q8_1 *x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int sumi = 0;
        for (int j = 0; j < QK4_1 / 2; j++) {
            sumi += (w[i].qs[j] & 0xF) * x[i].qs[j];
            sumi += (w[i].qs[j] >> 4) * x[i].qs[j + QK4_1 / 2];
        }
        sum += (mlm_f16_to_f32(w[i].d) * mlm_f16_to_f32(x[i].d)) * (float)sumi +
               mlm_f16_to_f32(w[i].m) * mlm_f16_to_f32(x[i].s);
    }
    *s = sum;
}

static void dot_q5_0_q8_0(int64_t nb, float *s, const block_q5_0 *w, const block_q8_0 *x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint32_t qh = mlm_get32(w[i].qh);
        int sumi = 0;
        for (int j = 0; j < QK5_0; j++) sumi += (q5_value(w[i].qs, qh, j) - 16) * x[i].qs[j];
        sum += (float)sumi * mlm_f16_to_f32(w[i].d) * mlm_f16_to_f32(x[i].d);
    }
    *s = sum;
}

static void dot_q5_1_q8_1(int64_t nb, float *s, const block_q5_1 *w, const block_q8_1 *x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint32_t qh = mlm_get32(w[i].qh);
        int sumi = 0;
        for (int j = 0; j < QK5_1; j++) sumi += q5_value(w[i].qs, qh, j) * x[i].qs[j];
        sum += (mlm_f16_to_f32(w[i].d) * mlm_f16_to_f32(x[i].d)) * (float)sumi +
               mlm_f16_to_f32(w[i].m) * mlm_f16_to_f32(x[i].s);
    }
    *s = sum;
}

static void dot_q8_0_q8_0(int64_t nb, float *s, const block_q8_0 *w, const block_q8_0 *x) {
    float acc[8] = {0};
    for (int64_t i = 0; i < nb; i++) {
        const float d = mlm_f16_to_f32(w[i].d) * mlm_f16_to_f32(x[i].d);
        for (int l = 0; l < 8; l++) {
            int32_t lane = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) lane += w[i].qs[e] * x[i].qs[e];
            acc[l] = fmaf(d, (float)lane, acc[l]);
        }
    }
    *s = hsum8(acc);
}

// Q8_1 . Q8_1: both sides are q*d; the s fields are not needed.
static void dot_q8_1_q8_1(int64_t nb, float *s, const block_q8_1 *w, const block_q8_1 *x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int sumi = 0;
        for (int j = 0; j < QK8_1; j++) sumi += w[i].qs[j] * x[i].qs[j];
        sum += (float)sumi * mlm_f16_to_f32(w[i].d) * mlm_f16_to_f32(x[i].d);
    }
    *s = sum;
}

// Any K-quant . Q8_K: per sub-block integer sums times the integer scales, scaled by d_w*d_x;
// the mins come in through the Q8_K group sums: - dmin*d_x*sum_j(mn_j * bsum_j).
static void dot_k_q8_K(qtype_t t, int64_t nb, float *s, const void *w, const block_q8_K *x) {
    kblock_t k;
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        unpack_k(t, w, i, &k);
        int32_t isum = 0, msum = 0;
        const int groups = k.sub / 16; // Q8_K bsums groups per sub-block
        for (int j = 0; j < QK_K / k.sub; j++) {
            int32_t si = 0, bs = 0;
            for (int l = 0; l < k.sub; l++) si += k.q[j * k.sub + l] * x[i].qs[j * k.sub + l];
            for (int g = 0; g < groups; g++) bs += x[i].bsums[j * groups + g];
            isum += k.sc[j] * si;
            msum += k.mn[j] * bs;
        }
        if (t == QT_Q3_K) {
            sum = fmaf(x[i].d * k.d, (float)isum, sum); // one fma chain (x86_mm.h)
        } else if (t == QT_Q2_K) { // one fma chain: the scaled sum, then the mins (x86_mm.h)
            sum = fmaf(x[i].d * k.d, (float)isum, sum);
            sum = fmaf(-x[i].d * k.dmin, (float)msum, sum);
        } else {
            sum += k.d * x[i].d * (float)isum - k.dmin * x[i].d * (float)msum;
        }
    }
    *s = sum;
}


// Q4_K, Q5_K, Q6_K . Q8_K with llama.cpp's x86 float order, so that every ISA gives the same bits:
// integer lane L (0..7) sums scale * q * x over elements 4L..4L+3 of each 32-element chunk; once
// per super-block each lane is added into float lane L with one fma by d_w * d_x. The mins go to 4
// float lanes (Q4_K, lane k: sub-blocks 2k and 2k+1) or one float (Q5_K), added at the end.
static void dot_k_lanes(qtype_t t, int64_t nb, float *s, const void *w, const block_q8_K *x) {
    kblock_t k;
    float acc[8] = {0}, accm[4] = {0}, summs = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        unpack_k(t, w, i, &k);
        const float d = x[i].d * k.d;
        const float dmin = -x[i].d * k.dmin;
        int32_t lane[8] = {0};
        for (int e = 0; e < QK_K; e++) lane[(e % 32) / 4] += k.sc[e / k.sub] * k.q[e] * x[i].qs[e];
        for (int l = 0; l < 8; l++) acc[l] = fmaf(d, (float)lane[l], acc[l]);
        if (t == QT_Q6_K) continue;
        int32_t mall = 0;
        for (int p = 0; p < 4; p++) {
            const int32_t s0 = x[i].bsums[4 * p] + x[i].bsums[4 * p + 1];
            const int32_t s1 = x[i].bsums[4 * p + 2] + x[i].bsums[4 * p + 3];
            const int32_t m = k.mn[2 * p] * s0 + k.mn[2 * p + 1] * s1;
            accm[p] = fmaf(dmin, (float)m, accm[p]);
            mall += m;
        }
        summs = fmaf(dmin, (float)mall, summs);
    }
    float r = hsum8(acc);
    if (t == QT_Q4_K) r += (accm[0] + accm[2]) + (accm[1] + accm[3]);
    if (t == QT_Q5_K) r += summs;
    *s = r;
}

// --- public API

void quant_dequantize_ref(qtype_t t, const void *src, float *dst, int64_t n) {
    const qtype_traits_t *tr = qtype_traits(t);
    if (!tr || n < 0 || n % tr->blck != 0) {
        for (int64_t i = 0; i < n; i++) dst[i] = NAN;
        return;
    }
    const int64_t nb = n / tr->blck;
    switch (t) {
    case QT_F32: memmove(dst, src, (size_t)n * sizeof(float)); return;
    case QT_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = mlm_f16_to_f32(((const mlm_f16_t *)src)[i]);
        return;
    case QT_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = mlm_bf16_to_f32(((const mlm_bf16_t *)src)[i]);
        return;
    case QT_Q4_0: dequant_q4_0(src, dst, nb); return;
    case QT_Q4_1: dequant_q4_1(src, dst, nb); return;
    case QT_Q5_0: dequant_q5_0(src, dst, nb); return;
    case QT_Q5_1: dequant_q5_1(src, dst, nb); return;
    case QT_Q8_0: dequant_q8_0(src, dst, nb); return;
    case QT_Q8_1: dequant_q8_1(src, dst, nb); return;
    case QT_Q2_K:
    case QT_Q3_K:
    case QT_Q4_K:
    case QT_Q5_K:
    case QT_Q6_K:
    case QT_Q8_K: dequant_k(t, src, dst, nb); return;
    default:
        for (int64_t i = 0; i < n; i++) dst[i] = NAN;
        return;
    }
}

int quant_quantize_ref(qtype_t t, const float *src, void *dst, int64_t n) {
    const qtype_traits_t *tr = qtype_traits(t);
    if (!tr || !tr->can_quantize) return MLM_EUNSUPPORTED;
    if (n < 0 || n % tr->blck != 0) return MLM_EINVAL;
    const int64_t nb = n / tr->blck;
    switch (t) {
    case QT_F32: memmove(dst, src, (size_t)n * sizeof(float)); return 0;
    case QT_F16:
        for (int64_t i = 0; i < n; i++) ((mlm_f16_t *)dst)[i] = mlm_f32_to_f16(src[i]);
        return 0;
    case QT_BF16:
        for (int64_t i = 0; i < n; i++) ((mlm_bf16_t *)dst)[i] = mlm_f32_to_bf16(src[i]);
        return 0;
    case QT_Q4_0: quant_q4_0(src, dst, nb); return 0;
    case QT_Q4_1: quant_q4_1(src, dst, nb); return 0;
    case QT_Q5_0: quant_q5_0(src, dst, nb); return 0;
    case QT_Q5_1: quant_q5_1(src, dst, nb); return 0;
    case QT_Q8_0: quant_q8_0(src, dst, nb); return 0;
    case QT_Q8_1: quant_q8_1(src, dst, nb); return 0;
    case QT_Q2_K: quant_q2_K(src, dst, nb); return 0;
    case QT_Q3_K: quant_q3_K(src, dst, nb); return 0;
    case QT_Q4_K: quant_q4_K(src, dst, nb); return 0;
    case QT_Q5_K: quant_q5_K(src, dst, nb); return 0;
    case QT_Q6_K: quant_q6_K(src, dst, nb); return 0;
    case QT_Q8_K: quant_q8_K(src, dst, nb); return 0;
    default: return MLM_EUNSUPPORTED;
    }
}

// F32, F16 and BF16 dot products accumulate in double and round once at the end.
void quant_vec_dot_ref(qtype_t t, int64_t n, float *s, const void *w, const void *x) {
    const qtype_traits_t *tr = qtype_traits(t);
    if (!tr || n < 0 || n % tr->blck != 0) {
        *s = NAN;
        return;
    }
    const int64_t nb = n / tr->blck;
    double acc = 0.0;
    switch (t) {
    case QT_F32:
        for (int64_t i = 0; i < n; i++) acc += (double)((const float *)w)[i] * ((const float *)x)[i];
        *s = (float)acc;
        return;
    case QT_F16:
        for (int64_t i = 0; i < n; i++)
            acc += (double)mlm_f16_to_f32(((const mlm_f16_t *)w)[i]) * mlm_f16_to_f32(((const mlm_f16_t *)x)[i]);
        *s = (float)acc;
        return;
    case QT_BF16:
        for (int64_t i = 0; i < n; i++)
            acc += (double)mlm_bf16_to_f32(((const mlm_bf16_t *)w)[i]) * mlm_bf16_to_f32(((const mlm_bf16_t *)x)[i]);
        *s = (float)acc;
        return;
    case QT_Q4_0: dot_q4_0_q8_0(nb, s, w, x); return;
    case QT_Q4_1: dot_q4_1_q8_1(nb, s, w, x); return;
    case QT_Q5_0: dot_q5_0_q8_0(nb, s, w, x); return;
    case QT_Q5_1: dot_q5_1_q8_1(nb, s, w, x); return;
    case QT_Q8_0: dot_q8_0_q8_0(nb, s, w, x); return;
    case QT_Q8_1: dot_q8_1_q8_1(nb, s, w, x); return;
    case QT_Q4_K:
    case QT_Q5_K:
    case QT_Q6_K: dot_k_lanes(t, nb, s, w, x); return;
    case QT_Q2_K:
    case QT_Q3_K:
    case QT_Q8_K: dot_k_q8_K(t, nb, s, w, x); return;
    default: *s = NAN; return;
    }
}
