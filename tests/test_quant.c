// CUnit suite "quant": fp16/bf16 conversions, block layouts, quantizer accuracy and reference dot products.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "worker/kernels/quant.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

// --- helpers

// splitmix64 generator; state lives in the caller.
static uint64_t rng_next(uint64_t *st) {
    uint64_t z = (*st += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *st) { return ((rng_next(st) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

// Fills x with N(0,1) samples (Box-Muller).
static void fill_normal(float *x, int64_t n, uint64_t seed) { // x: (n)
    uint64_t st = seed;
    for (int64_t i = 0; i < n; i += 2) {
        double u1 = rng_uniform(&st), u2 = rng_uniform(&st);
        double r = sqrt(-2.0 * log(u1));
        x[i] = (float)(r * cos(6.283185307179586 * u2));
        if (i + 1 < n) x[i + 1] = (float)(r * sin(6.283185307179586 * u2));
    }
}

static void fill_bytes(void *p, size_t n, uint64_t seed) {
    uint64_t st = seed;
    for (size_t i = 0; i < n; i++) ((uint8_t *)p)[i] = (uint8_t)rng_next(&st);
}

static double rel_rms(const float *a, const float *b, int64_t n) {
    double e = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        s += (double)a[i] * a[i];
    }
    return sqrt(e / s);
}

static bool f16_is_nan(mlm_f16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

#ifdef HAVE_X86
__attribute__((target("f16c"))) static mlm_f16_t hw_f32_to_f16(float f) { return (mlm_f16_t)_cvtss_sh(f, 0); }
__attribute__((target("f16c"))) static float hw_f16_to_f32(mlm_f16_t h) { return _cvtsh_ss(h); }
static bool have_f16c(void) { return __builtin_cpu_supports("f16c"); }
#endif

// --- fp16 / bf16

static void test_f16_roundtrip(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = mlm_f16_to_f32((mlm_f16_t)h);
        mlm_f16_t back = mlm_f32_to_f16(f);
        if (f16_is_nan((mlm_f16_t)h)) {
            if (!isnan(f) || !f16_is_nan(back)) bad++;
        } else if (back != h) {
            bad++;
        }
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(mlm_f16_to_f32(0x3c00), 1.0f);
    CU_ASSERT_EQUAL(mlm_f16_to_f32(0xc000), -2.0f);
    CU_ASSERT_EQUAL(mlm_f16_to_f32(0x0001), ldexpf(1.0f, -24));
    CU_ASSERT_EQUAL(mlm_f16_to_f32(0x7bff), 65504.0f);
    CU_ASSERT(isinf(mlm_f16_to_f32(0x7c00)));
    CU_ASSERT_EQUAL(mlm_f32_to_f16(65520.0f), 0x7c00);   // tie at the top rounds to inf
    CU_ASSERT_EQUAL(mlm_f32_to_f16(65519.0f), 0x7bff);
    CU_ASSERT_EQUAL(mlm_f32_to_f16(ldexpf(1.0f, -25)), 0x0000); // half the smallest subnormal: tie to even 0
    CU_ASSERT_EQUAL(mlm_f32_to_f16(ldexpf(3.0f, -25)), 0x0002); // 1.5 * 2^-24: tie to even 2
    CU_ASSERT_EQUAL(mlm_f32_to_f16(-0.0f), 0x8000);
}

static void test_f16_vs_f16c(void) {
#ifdef HAVE_X86
    if (!have_f16c()) {
        fprintf(stderr, "(no F16C on this CPU: skipped) ");
        return;
    }
    int bad = 0;
    // ~10M bit patterns spread over the whole 32-bit space (odd stride hits every low-bit mix)
    const uint32_t stride = 427;
    uint64_t count = 0;
    for (uint64_t u = 0; u <= 0xffffffffull; u += stride, count++) {
        float f = mlm_bits_to_f32((uint32_t)u);
        if (mlm_f32_to_f16(f) != hw_f32_to_f16(f)) bad++;
    }
    CU_ASSERT(count > 10000000);
    // every tie between adjacent halves (subnormal and normal), their f32 neighbours, both signs
    for (uint32_t h = 0; h < 0x7c00; h++) {
        double mid = 0.5 * ((double)mlm_f16_to_f32((mlm_f16_t)h) + mlm_f16_to_f32((mlm_f16_t)(h + 1)));
        float t = (float)mid;
        CU_ASSERT_FATAL((double)t == mid);
        float cand[3] = {t, nextafterf(t, 0.0f), nextafterf(t, INFINITY)}; // (3) tie and neighbours
        for (int k = 0; k < 3; k++) {
            if (mlm_f32_to_f16(cand[k]) != hw_f32_to_f16(cand[k])) bad++;
            if (mlm_f32_to_f16(-cand[k]) != hw_f32_to_f16(-cand[k])) bad++;
        }
    }
    // f16 -> f32 of every pattern matches the hardware bit for bit, except that F16C sets the
    // quiet bit of signalling NaNs and the software conversion keeps the payload as is
    for (uint32_t h = 0; h < 65536; h++) {
        float a = mlm_f16_to_f32((mlm_f16_t)h), b = hw_f16_to_f32((mlm_f16_t)h);
        if (f16_is_nan((mlm_f16_t)h)) bad += !(isnan(a) && isnan(b));
        else if (mlm_f32_to_bits(a) != mlm_f32_to_bits(b)) bad++;
    }
    CU_ASSERT_EQUAL(bad, 0);
#endif
}

static void test_bf16(void) {
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(1.0f), 0x3f80);
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(-2.0f), 0xc000);
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(1.0f + ldexpf(1.0f, -8)), 0x3f80);  // tie: stays even
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)), 0x3f82); // tie: rounds up to even
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(1.0f + ldexpf(1.0f, -8) + ldexpf(1.0f, -20)), 0x3f81); // above tie
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(3.14159265f), 0x4049);
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(INFINITY), 0x7f80);
    CU_ASSERT_EQUAL(mlm_f32_to_bf16(mlm_bits_to_f32(0x7f7fffffu)), 0x7f80); // FLT_MAX overflows to inf
    mlm_bf16_t n1 = mlm_f32_to_bf16(mlm_bits_to_f32(0x7f800001u)); // signalling NaN, payload in low bits
    CU_ASSERT((n1 & 0x7f80) == 0x7f80 && (n1 & 0x7f) != 0);
    CU_ASSERT(isnan(mlm_bf16_to_f32(mlm_f32_to_bf16(NAN))));
    CU_ASSERT_EQUAL(mlm_bf16_to_f32(0x3f81), 1.0078125f);
}

// --- known-value blocks

static void test_known_q4_0(void) {
    block_q4_0 b;
    b.d = 0x3c00; // 1.0
    for (int j = 0; j < 16; j++) b.qs[j] = (uint8_t)(j | ((15 - j) << 4));
    float y[32]; // (32)
    quant_dequantize_ref(QT_Q4_0, &b, y, 32);
    for (int j = 0; j < 16; j++) {
        CU_ASSERT_EQUAL(y[j], (float)(j - 8));
        CU_ASSERT_EQUAL(y[16 + j], (float)(7 - j));
    }
    CU_ASSERT_EQUAL(y[0], -8.0f);
    CU_ASSERT_EQUAL(y[15], 7.0f);
}

static void test_known_q4_1(void) {
    block_q4_1 b;
    b.d = 0x3800; // 0.5
    b.m = 0xbc00; // -1.0
    for (int j = 0; j < 16; j++) b.qs[j] = (uint8_t)(j | ((15 - j) << 4));
    float y[32]; // (32)
    quant_dequantize_ref(QT_Q4_1, &b, y, 32);
    for (int j = 0; j < 16; j++) {
        CU_ASSERT_EQUAL(y[j], 0.5f * j - 1.0f);
        CU_ASSERT_EQUAL(y[16 + j], 0.5f * (15 - j) - 1.0f);
    }
}

static void test_known_q5_0(void) {
    block_q5_0 b;
    b.d = 0x4000; // 2.0
    for (int j = 0; j < 16; j++) b.qs[j] = (uint8_t)(j | ((15 - j) << 4));
    // qh as little-endian u32 0xAAAA5555: bit j set for even j < 16 and odd j >= 16
    b.qh[0] = 0x55;
    b.qh[1] = 0x55;
    b.qh[2] = 0xaa;
    b.qh[3] = 0xaa;
    float y[32]; // (32)
    quant_dequantize_ref(QT_Q5_0, &b, y, 32);
    CU_ASSERT_EQUAL(y[0], 0.0f);    // 0 | 16 = 16 -> 0
    CU_ASSERT_EQUAL(y[1], -30.0f);  // 1 -> -15 * 2
    CU_ASSERT_EQUAL(y[2], 4.0f);    // 2 | 16 = 18 -> 2 * 2
    CU_ASSERT_EQUAL(y[16], -2.0f);  // 15, bit clear -> -1 * 2
    CU_ASSERT_EQUAL(y[17], 28.0f);  // 14 | 16 = 30 -> 14 * 2
    CU_ASSERT_EQUAL(y[31], 0.0f);   // qs[15] high nibble 0, bit 31 set: 16 -> 0
    CU_ASSERT_EQUAL(y[30], -30.0f); // qs[14] high nibble 1, bit 30 clear: 1 -> -15 * 2
    for (int j = 0; j < 32; j++) {
        int lo = j < 16 ? j : 15 - (j - 16);
        int hb = j < 16 ? (j % 2 == 0) : (j % 2 == 1);
        CU_ASSERT_EQUAL(y[j], 2.0f * ((lo | (hb << 4)) - 16));
    }
}

static void test_known_q8_0(void) {
    block_q8_0 b;
    b.d = 0x3400; // 0.25
    for (int j = 0; j < 32; j++) b.qs[j] = (int8_t)(8 * j - 128);
    float y[32]; // (32)
    quant_dequantize_ref(QT_Q8_0, &b, y, 32);
    for (int j = 0; j < 32; j++) CU_ASSERT_EQUAL(y[j], 0.25f * (8 * j - 128));
}

static void test_known_q4_K(void) {
    // scales (1,2,3,4,17,33,50,63), mins (0,5,10,63,16,32,48,7), packed by hand
    static const int sc[8] = {1, 2, 3, 4, 17, 33, 50, 63};
    static const int mn[8] = {0, 5, 10, 63, 16, 32, 48, 7};
    static const uint8_t packed[12] = {0x41, 0x82, 0xc3, 0xc4, 0x40, 0x85, 0xca, 0x3f, 0x01, 0x01, 0x02, 0x7f};
    block_q4_K b;
    b.d = 0x3c00;    // 1.0
    b.dmin = 0x3800; // 0.5
    memcpy(b.scales, packed, 12);
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < 32; r++) b.qs[32 * c + r] = (uint8_t)((r & 15) | ((15 - (r & 15)) << 4));
    float y[QK_K]; // (256)
    quant_dequantize_ref(QT_Q4_K, &b, y, QK_K);
    for (int e = 0; e < QK_K; e++) {
        int r = e % 64, q = r < 32 ? (r & 15) : 15 - ((r - 32) & 15), j = e / 32;
        CU_ASSERT_EQUAL(y[e], (float)(sc[j] * q) - 0.5f * mn[j]);
    }
    CU_ASSERT_EQUAL(y[255], 63.0f * 0 - 3.5f); // last element: sub-block 7, q = 15 - 15
    CU_ASSERT_EQUAL(y[224], 63.0f * 15 - 3.5f);
}

static void test_known_q6_K(void) {
    block_q6_K b;
    memset(&b, 0, sizeof(b));
    b.d = 0x3800; // 0.5
    for (int j = 0; j < 16; j++) b.scales[j] = (int8_t)(j - 8);
    // all low nibbles 0xF, high bits 0: every q = 15 - 32 = -17, except element 0 (q = 63 - 32)
    memset(b.ql, 0xff, sizeof(b.ql));
    b.qh[0] = 0x03;
    float y[QK_K]; // (256)
    quant_dequantize_ref(QT_Q6_K, &b, y, QK_K);
    CU_ASSERT_EQUAL(y[0], 0.5f * -8 * 31);
    for (int e = 1; e < QK_K; e++) CU_ASSERT_EQUAL(y[e], 0.5f * (e / 16 - 8) * -17);
    // a high-bit pattern: qh[32 + 5] = 0b10'00'00'00 -> element 128 + 96 + 5 gets +32
    b.qh[0] = 0;
    b.qh[32 + 5] = 0x80;
    quant_dequantize_ref(QT_Q6_K, &b, y, QK_K);
    CU_ASSERT_EQUAL(y[128 + 96 + 5], 0.5f * (229 / 16 - 8) * (47 - 32));
    CU_ASSERT_EQUAL(y[128 + 5], 0.5f * (133 / 16 - 8) * -17);
}

// --- layouts: compare against the loop-form dequantizers written from the format description

static void oracle_q2_K(const block_q2_K *b, float *y) { // y: (256)
    const float d = mlm_f16_to_f32(b->d), dmin = mlm_f16_to_f32(b->dmin);
    const uint8_t *q = b->qs;
    int is = 0;
    for (int n = 0; n < QK_K; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; half++) {
                int s = b->scales[is++];
                for (int l = 0; l < 16; l++)
                    *y++ = d * (s & 0xF) * ((q[l + 16 * half] >> shift) & 3) - dmin * (s >> 4);
            }
        }
        q += 32;
    }
}

static void oracle_q3_K(const block_q3_K *b, float *y) { // y: (256)
    int sc[16]; // (16)
    for (int i = 0; i < 16; i++) {
        int lo = i < 8 ? (b->scales[i] & 0xF) : (b->scales[i - 8] >> 4);
        int hi = (b->scales[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
        sc[i] = (lo | (hi << 4)) - 32;
    }
    const float d = mlm_f16_to_f32(b->d);
    const uint8_t *q = b->qs;
    int is = 0, m = 1;
    for (int n = 0; n < QK_K; n += 128) {
        for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
            for (int half = 0; half < 2; half++) {
                float dl = d * sc[is++];
                for (int l = 16 * half; l < 16 * half + 16; l++)
                    *y++ = dl * ((int)((q[l] >> shift) & 3) - ((b->hmask[l] & m) ? 0 : 4));
            }
        }
        q += 32;
    }
}

static void oracle_q45_K(const uint8_t *scales, const uint8_t *qs, const uint8_t *qh, float d, float dmin,
                         float *y) { // y: (256); qh NULL for Q4_K
    for (int c = 0; c < 4; c++) {
        for (int part = 0; part < 2; part++) {
            int j = 2 * c + part, sc, m;
            if (j < 4) {
                sc = scales[j] & 63;
                m = scales[j + 4] & 63;
            } else {
                sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
                m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
            }
            for (int l = 0; l < 32; l++) {
                int q = part ? (qs[32 * c + l] >> 4) : (qs[32 * c + l] & 0xF);
                if (qh && (qh[l] >> j) & 1) q += 16;
                *y++ = d * sc * q - dmin * m;
            }
        }
    }
}

static void oracle_q6_K(const block_q6_K *b, float *y) { // y: (256)
    const float d = mlm_f16_to_f32(b->d);
    const uint8_t *ql = b->ql, *qh = b->qh;
    const int8_t *sc = b->scales;
    for (int n = 0; n < QK_K; n += 128) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// Random bytes with sane f16 scales, then compare with the oracle (to 1e-6 relative of the max).
static void check_layout(qtype_t t, uint64_t seed) {
    union {
        block_q2_K q2;
        block_q3_K q3;
        block_q4_K q4;
        block_q5_K q5;
        block_q6_K q6;
    } b;
    float y[QK_K], r[QK_K]; // (256) each
    for (int rep = 0; rep < 20; rep++) {
        fill_bytes(&b, sizeof(b), seed + rep);
        switch (t) {
        case QT_Q2_K: b.q2.d = 0x3c00; b.q2.dmin = 0x3400; oracle_q2_K(&b.q2, r); break;
        case QT_Q3_K: b.q3.d = 0x3800; oracle_q3_K(&b.q3, r); break;
        case QT_Q4_K:
            b.q4.d = 0x3c00;
            b.q4.dmin = 0x3800;
            oracle_q45_K(b.q4.scales, b.q4.qs, NULL, 1.0f, 0.5f, r);
            break;
        case QT_Q5_K:
            b.q5.d = 0x3c00;
            b.q5.dmin = 0x3800;
            oracle_q45_K(b.q5.scales, b.q5.qs, b.q5.qh, 1.0f, 0.5f, r);
            break;
        case QT_Q6_K: b.q6.d = 0x3800; oracle_q6_K(&b.q6, r); break;
        default: CU_FAIL("bad type"); return;
        }
        quant_dequantize_ref(t, &b, y, QK_K);
        int bad = 0;
        for (int i = 0; i < QK_K; i++) bad += y[i] != r[i];
        CU_ASSERT_EQUAL(bad, 0);
    }
}

static void test_layout_k(void) {
    check_layout(QT_Q2_K, 100);
    check_layout(QT_Q3_K, 200);
    check_layout(QT_Q4_K, 300);
    check_layout(QT_Q5_K, 400);
    check_layout(QT_Q6_K, 500);
}

// --- quantizer accuracy

typedef struct {
    qtype_t t;    // type under test
    double bound; // relative RMS error allowed on N(0,1) data
} acc_case_t;

// The simple absmax quantizers (Q8_0, Q8_1, Q8_K, Q5_0, Q4_0) are fixed by llama.cpp's rounding
// and land at 0.54%, 0.54%, 0.68%, 4.2% and 8.5% on this data, so their bounds sit just above.
static const acc_case_t acc_cases[] = {
    {QT_F32, 0.0},    {QT_F16, 0.0005}, {QT_BF16, 0.004}, {QT_Q8_0, 0.006}, {QT_Q8_1, 0.006},
    {QT_Q8_K, 0.0075}, {QT_Q6_K, 0.02}, {QT_Q5_K, 0.04},  {QT_Q5_0, 0.045}, {QT_Q5_1, 0.04},
    {QT_Q4_K, 0.08},  {QT_Q4_0, 0.09},  {QT_Q4_1, 0.08},  {QT_Q3_K, 0.15},  {QT_Q2_K, 0.30},
};

static void test_accuracy(void) {
    enum { N = 4096 };
    float *x = malloc(N * sizeof(float)), *y = malloc(N * sizeof(float)); // (N) each
    uint8_t *q = malloc(N * 4); // row of any type
    CU_ASSERT_FATAL(x && y && q);
    fill_normal(x, N, 42);
    for (size_t c = 0; c < sizeof(acc_cases) / sizeof(acc_cases[0]); c++) {
        const acc_case_t *ac = &acc_cases[c];
        CU_ASSERT_EQUAL(quant_quantize_ref(ac->t, x, q, N), 0);
        quant_dequantize_ref(ac->t, q, y, N);
        double e = rel_rms(x, y, N);
        if (getenv("MESHLM_QUANT_VERBOSE")) fprintf(stderr, "\n%s: rel rms %.5f", qtype_name(ac->t), e);
        if (!(e <= ac->bound)) fprintf(stderr, "\n%s: rel rms %.5f > %.5f\n", qtype_name(ac->t), e, ac->bound);
        CU_ASSERT(e <= ac->bound);
    }
    // blocks with a single spike, all-equal values, all zeros and positive-only data stay sane
    for (size_t c = 0; c < sizeof(acc_cases) / sizeof(acc_cases[0]); c++) {
        const acc_case_t *ac = &acc_cases[c];
        for (int i = 0; i < 512; i++) x[i] = 0.0f;
        x[3] = 5.0f;
        for (int i = 256; i < 512; i++) x[i] = 1.5f + (float)(i % 7) * 0.25f;
        CU_ASSERT_EQUAL(quant_quantize_ref(ac->t, x, q, 512), 0);
        quant_dequantize_ref(ac->t, q, y, 512);
        int finite = 1;
        for (int i = 0; i < 512; i++) finite &= isfinite(y[i]) != 0;
        CU_ASSERT(finite);
        CU_ASSERT(fabsf(y[0]) <= 0.5f);
        CU_ASSERT(fabsf(y[3] - 5.0f) <= 0.5f);
        CU_ASSERT(rel_rms(x + 256, y + 256, 256) <= 2 * ac->bound + 1e-6);
    }
    free(x);
    free(y);
    free(q);
}

static void test_quantize_errors(void) {
    float x[64] = {0}; // (64)
    uint8_t q[1024];   // output scratch
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q4_0, x, q, 31), MLM_EINVAL);
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q4_K, x, q, 64), MLM_EINVAL);
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_I8, x, q, 64), MLM_EUNSUPPORTED);
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_F64, x, q, 64), MLM_EUNSUPPORTED);
    CU_ASSERT_EQUAL(quant_quantize_ref((qtype_t)4, x, q, 64), MLM_EUNSUPPORTED);
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q8_0, x, q, 0), 0);
}

// --- reference dot products

static void test_vec_dot(void) {
    enum { N = 4096 };
    float *w = malloc(N * sizeof(float)), *x = malloc(N * sizeof(float));   // (N) each
    float *wd = malloc(N * sizeof(float)), *xd = malloc(N * sizeof(float)); // (N) dequantized
    uint8_t *wq = malloc(N * 4), *xq = malloc(N * 4);
    CU_ASSERT_FATAL(w && x && wd && xd && wq && xq);
    fill_normal(w, N, 7);
    fill_normal(x, N, 8);
    for (int t = 0; t < QT_COUNT; t++) {
        const qtype_traits_t *tr = qtype_traits(t);
        if (!tr || !tr->has_kernels) continue;
        for (int len = N; len >= (int)tr->blck && len >= 256; len /= 4) {
            CU_ASSERT_EQUAL_FATAL(quant_quantize_ref((qtype_t)t, w, wq, len), 0);
            CU_ASSERT_EQUAL_FATAL(quant_quantize_ref(tr->vec_dot_type, x, xq, len), 0);
            quant_dequantize_ref((qtype_t)t, wq, wd, len);
            quant_dequantize_ref(tr->vec_dot_type, xq, xd, len);
            double dq = 0, dabs = 0, exact = 0, errvar = 0;
            for (int i = 0; i < len; i++) {
                dq += (double)wd[i] * xd[i];
                dabs += fabs((double)wd[i] * xd[i]);
                exact += (double)w[i] * x[i];
                double a = ((double)wd[i] - w[i]) * x[i], b = (double)w[i] * ((double)xd[i] - x[i]);
                errvar += a * a + b * b;
            }
            float s = NAN;
            quant_vec_dot_ref((qtype_t)t, len, &s, wq, xq);
            double tol = 1e-4 * dabs + 1e-6;
            if (!(fabs(s - dq) <= tol)) fprintf(stderr, "\n%s n=%d: dot %.6f vs dequant dot %.6f\n", tr->name, len, s, dq);
            CU_ASSERT(fabs(s - dq) <= tol);
            // within the quantization error of the float dot: 6 sigma of the first-order error
            double qtol = 6.0 * sqrt(errvar) + 1e-5 * dabs;
            if (!(fabs(s - exact) <= qtol)) fprintf(stderr, "\n%s n=%d: dot %.6f vs exact %.6f\n", tr->name, len, s, exact);
            CU_ASSERT(fabs(s - exact) <= qtol);
        }
    }
    free(w);
    free(x);
    free(wd);
    free(xd);
    free(wq);
    free(xq);
}

// K-quant weights with nonzero mins against a Q8_K activation with known bsums: hand-checkable.
static void test_vec_dot_k_mins(void) {
    block_q4_K w;
    memset(&w, 0, sizeof(w));
    w.d = 0x3c00;    // 1.0
    w.dmin = 0x3c00; // 1.0
    // sub-block scales 1..8 (j < 4 direct; j >= 4 low nibbles in scales[8..11]), mins all 2
    for (int j = 0; j < 4; j++) {
        w.scales[j] = (uint8_t)(j + 1);
        w.scales[j + 4] = 2;
        w.scales[j + 8] = (uint8_t)((j + 5) | (2 << 4));
    }
    memset(w.qs, 0x11, sizeof(w.qs)); // every q = 1
    block_q8_K x;
    memset(&x, 0, sizeof(x));
    x.d = 0.5f;
    for (int i = 0; i < QK_K; i++) x.qs[i] = 2;
    for (int g = 0; g < 16; g++) x.bsums[g] = 32;
    // each element: w = sc_j*1 - 2, x = 1; sum = 32 * sum_j (sc_j - 2) = 32 * (36 - 16) = 640
    float s = 0;
    quant_vec_dot_ref(QT_Q4_K, QK_K, &s, &w, &x);
    CU_ASSERT_EQUAL(s, 640.0f);
}

// --- activation quantizers: exact bytes

static void test_act_q8_0(void) {
    float x[96]; // (3 blocks of 32)
    memset(x, 0, sizeof(x));
    // block 0: amax 127 -> d = 1, id = 127/amax = 1; ties round to even (llama.cpp's x86 quantizer)
    const float v0[] = {127.0f, 0.5f, -0.5f, 1.5f, 2.5f, -2.5f, 126.6f, -127.0f, 0.49999997f, 3.2f, -3.7f};
    const int8_t q0[] = {127, 0, 0, 2, 2, -2, 127, -127, 0, 3, -4};
    memcpy(x, v0, sizeof(v0));
    // block 1: all zero. block 2: amax 63.5 -> d = 0.5, id = 2
    x[64] = -63.5f;
    x[65] = 0.25f;
    x[66] = 0.75f;
    x[67] = -0.25f;
    x[68] = 10.0f;
    block_q8_0 b[3];
    memset(b, 0xee, sizeof(b));
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q8_0, x, b, 96), 0);
    CU_ASSERT_EQUAL(b[0].d, 0x3c00);
    for (size_t j = 0; j < sizeof(q0); j++) CU_ASSERT_EQUAL(b[0].qs[j], q0[j]);
    for (int j = (int)sizeof(q0); j < 32; j++) CU_ASSERT_EQUAL(b[0].qs[j], 0);
    CU_ASSERT_EQUAL(b[1].d, 0x0000);
    for (int j = 0; j < 32; j++) CU_ASSERT_EQUAL(b[1].qs[j], 0);
    CU_ASSERT_EQUAL(b[2].d, 0x3800);
    CU_ASSERT_EQUAL(b[2].qs[0], -127);
    CU_ASSERT_EQUAL(b[2].qs[1], 0);  // 0.5 -> 0 (even)
    CU_ASSERT_EQUAL(b[2].qs[2], 2);  // 1.5 -> 2 (even)
    CU_ASSERT_EQUAL(b[2].qs[3], 0);  // -0.5 -> 0 (even)
    CU_ASSERT_EQUAL(b[2].qs[4], 20);
    // d is rounded to f16 from the float amax/127: amax 1 -> d = 1/127 -> f16 0x2008
    float x1[32] = {1.0f, 0.5f}; // (32)
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q8_0, x1, b, 32), 0);
    CU_ASSERT_EQUAL(b[0].d, mlm_f32_to_f16(1.0f / 127.0f));
    CU_ASSERT_EQUAL(b[0].d, 0x2008);
    CU_ASSERT_EQUAL(b[0].qs[0], 127);
    CU_ASSERT_EQUAL(b[0].qs[1], 64); // 0.5 * 127 = 63.5 -> 64 (even)
}

static void test_act_q8_1(void) {
    float x[64]; // (2 blocks of 32)
    memset(x, 0, sizeof(x));
    const float v0[] = {127.0f, 0.5f, -0.5f, 1.5f, 2.5f, -2.5f, -100.0f, 7.0f};
    const int8_t q0[] = {127, 0, 0, 2, 2, -2, -100, 7}; // ties to even
    memcpy(x, v0, sizeof(v0));
    block_q8_1 b[2];
    memset(b, 0xee, sizeof(b));
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q8_1, x, b, 64), 0);
    CU_ASSERT_EQUAL(b[0].d, 0x3c00);
    for (size_t j = 0; j < sizeof(q0); j++) CU_ASSERT_EQUAL(b[0].qs[j], q0[j]);
    // s = d * sum(qs) = 127 + 0 + 0 + 2 + 2 - 2 - 100 + 7 = 36 -> f16(36) = 0x5080
    CU_ASSERT_EQUAL(b[0].s, 0x5080);
    CU_ASSERT_EQUAL(b[1].d, 0);
    CU_ASSERT_EQUAL(b[1].s, 0);
    for (int j = 0; j < 32; j++) CU_ASSERT_EQUAL(b[1].qs[j], 0);
    // s uses the unrounded float d: amax 2 -> d = 2/127, sum = 127 + 64 = 191 (1.0 * 63.5 -> 64, even)
    float x1[32] = {2.0f, 1.0f}; // (32)
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q8_1, x1, b, 32), 0);
    CU_ASSERT_EQUAL(b[0].qs[1], 64);
    CU_ASSERT_EQUAL(b[0].s, mlm_f32_to_f16(191.0f * (2.0f / 127.0f)));
}

static void test_act_q8_K(void) {
    float *x = calloc(3 * QK_K, sizeof(float)); // (3 blocks of 256)
    block_q8_K *b = malloc(3 * sizeof(block_q8_K));
    CU_ASSERT_FATAL(x && b);
    // block 0: max = +127 (first of two with |x| = 127) -> iscale = -1; ties round to even
    x[0] = 127.0f;
    x[1] = 0.5f;   // -0.5 -> 0
    x[2] = 1.5f;   // -1.5 -> -2
    x[3] = 2.5f;   // -2.5 -> -2
    x[4] = -0.5f;  // 0.5 -> 0
    x[5] = -3.5f;  // 3.5 -> 4
    x[16] = -127.0f; // 127
    x[17] = 0.6f;  // -1
    x[255] = 10.0f;
    // block 1: max = -63.5 -> iscale = 2, d = 0.5
    float *x1 = x + QK_K;
    x1[0] = 0.25f;  // 0.5 -> 0
    x1[1] = 0.75f;  // 1.5 -> 2
    x1[2] = -63.5f; // -127
    x1[3] = 63.5f;  // 127 (same |x|, later: not the max)
    x1[40] = -1.25f; // -2.5 -> -2
    // block 2: all zero
    memset(b, 0xee, 3 * sizeof(block_q8_K));
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q8_K, x, b, 3 * QK_K), 0);
    CU_ASSERT_EQUAL(b[0].d, -1.0f);
    const int8_t q0[] = {-127, 0, -2, -2, 0, 4};
    for (int j = 0; j < 6; j++) CU_ASSERT_EQUAL(b[0].qs[j], q0[j]);
    CU_ASSERT_EQUAL(b[0].qs[16], 127);
    CU_ASSERT_EQUAL(b[0].qs[17], -1);
    CU_ASSERT_EQUAL(b[0].qs[255], -10);
    CU_ASSERT_EQUAL(b[0].bsums[0], -127 - 2 - 2 + 4);
    CU_ASSERT_EQUAL(b[0].bsums[1], 127 - 1);
    CU_ASSERT_EQUAL(b[0].bsums[15], -10);
    for (int g = 2; g < 15; g++) CU_ASSERT_EQUAL(b[0].bsums[g], 0);
    CU_ASSERT_EQUAL(b[1].d, 0.5f);
    CU_ASSERT_EQUAL(b[1].qs[0], 0);
    CU_ASSERT_EQUAL(b[1].qs[1], 2);
    CU_ASSERT_EQUAL(b[1].qs[2], -127);
    CU_ASSERT_EQUAL(b[1].qs[3], 127);
    CU_ASSERT_EQUAL(b[1].qs[40], -2);
    CU_ASSERT_EQUAL(b[1].bsums[0], 2);
    CU_ASSERT_EQUAL(b[1].bsums[2], -2);
    CU_ASSERT_EQUAL(b[2].d, 0.0f);
    int nz = 0;
    for (int j = 0; j < QK_K; j++) nz += b[2].qs[j] != 0;
    for (int g = 0; g < 16; g++) nz += b[2].bsums[g] != 0;
    CU_ASSERT_EQUAL(nz, 0);
    free(x);
    free(b);
}

// Weight quantizers for the 32-element types round like llama.cpp's reference.
static void test_weight_q4_0_q5_0(void) {
    float x[32] = {0}; // (32)
    x[0] = -8.0f; // signed absmax -> d = 1
    x[1] = 7.0f;
    x[2] = 0.4f;  // 0.4 + 8.5 = 8.9 -> 8 -> 0
    x[3] = 0.5f;  // 9.0 -> 9 -> 1
    x[17] = -3.0f;
    block_q4_0 b;
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q4_0, x, &b, 32), 0);
    CU_ASSERT_EQUAL(b.d, 0x3c00);
    CU_ASSERT_EQUAL(b.qs[0] & 0xF, 0);
    CU_ASSERT_EQUAL(b.qs[1] & 0xF, 15);
    CU_ASSERT_EQUAL(b.qs[2] & 0xF, 8);
    CU_ASSERT_EQUAL(b.qs[3] & 0xF, 9);
    CU_ASSERT_EQUAL(b.qs[1] >> 4, 5);
    x[0] = 16.0f; // d = -1
    block_q5_0 c;
    CU_ASSERT_EQUAL(quant_quantize_ref(QT_Q5_0, x, &c, 32), 0);
    CU_ASSERT_EQUAL(c.d, 0xbc00);
    float y[32]; // (32)
    quant_dequantize_ref(QT_Q5_0, &c, y, 32);
    CU_ASSERT_EQUAL(y[0], 16.0f);
    CU_ASSERT_EQUAL(y[1], 7.0f);
    CU_ASSERT_EQUAL(y[17], -3.0f);
}

// --- suite

int test_quant_suite(void) {
    CU_pSuite s = CU_add_suite("quant", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "f16 round trip", test_f16_roundtrip) ||
        !CU_add_test(s, "f16 matches F16C", test_f16_vs_f16c) ||
        !CU_add_test(s, "bf16 rounding", test_bf16) ||
        !CU_add_test(s, "Q4_0 known block", test_known_q4_0) ||
        !CU_add_test(s, "Q4_1 known block", test_known_q4_1) ||
        !CU_add_test(s, "Q5_0 known block", test_known_q5_0) ||
        !CU_add_test(s, "Q8_0 known block", test_known_q8_0) ||
        !CU_add_test(s, "Q4_K known block", test_known_q4_K) ||
        !CU_add_test(s, "Q6_K known block", test_known_q6_K) ||
        !CU_add_test(s, "K-quant layouts", test_layout_k) ||
        !CU_add_test(s, "quantizer accuracy", test_accuracy) ||
        !CU_add_test(s, "quantize errors", test_quantize_errors) ||
        !CU_add_test(s, "vec_dot vs dequantized dot", test_vec_dot) ||
        !CU_add_test(s, "vec_dot Q4_K mins", test_vec_dot_k_mins) ||
        !CU_add_test(s, "Q8_0 activation bytes", test_act_q8_0) ||
        !CU_add_test(s, "Q8_1 activation bytes", test_act_q8_1) ||
        !CU_add_test(s, "Q8_K activation bytes", test_act_q8_K) ||
        !CU_add_test(s, "Q4_0/Q5_0 weight rounding", test_weight_q4_0_q5_0))
        return -1;
    return 0;
}
