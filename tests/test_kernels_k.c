// CUnit suite "kernels_k": AVX2 / AVX-512 / NEON dot products of K-quants and Q4_1/Q5_0/Q5_1 vs the reference.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "worker/kernels/kernels.h"
#include "worker/kernels/quant.h"

// --- types

// The weight types this suite covers (the k_avx2.c / k_avx512.c kernels).
static const qtype_t k_types[] = {QT_Q4_K, QT_Q6_K, QT_Q5_K, QT_Q5_0, QT_Q4_1, QT_Q5_1, QT_Q2_K, QT_Q3_K};
#define N_K_TYPES (int)(sizeof k_types / sizeof k_types[0])

static const char *const isas[] = {"avx2", "avx512", "neon", "neon-dotprod"};

// Whether a table must have a kernel for t: the x86 tables cover every type here, the Arm ones the
// K-quants of decode (Q4_K, Q6_K); types a table lacks run the reference and are not checked here.
static int isa_covers(const char *isa, qtype_t t) {
    if (strncmp(isa, "neon", 4) == 0) return t == QT_Q4_K || t == QT_Q6_K;
    return 1;
}

// Weight fill modes: random bytes with sane scales, scales 1.0 (exact integer results), every quant
// byte 0xff with scales +65504, every byte 0 with scales -65504, random bytes with subnormal scales.
enum { W_RANDOM, W_EXACT, W_MAX, W_MIN, W_TINY };
// Activation fill modes: random bytes (including -128), values in [-3, 3], all 127, all -128.
enum { X_RANDOM, X_SMALL, X_MAX, X_MIN };

// One weight block decoded to integers: value_e = d * sc[e] * q[e] - dmin * mn[e]. For Q4_1/Q5_1
// the min m is added once per block as m * x.s instead (dmin holds m).
typedef struct {
    int q[QK_K];     // quant per element, offsets applied (signed for Q3_K, Q6_K, Q5_0)
    int sc[QK_K];    // integer scale per element (1 for the 32-element types)
    int mn[QK_K];    // integer min per element (Q2_K, Q4_K, Q5_K), else 0
    double d, dmin;  // block scales
} wblock_t;

// --- helpers: random numbers and f16 fields

static uint64_t rng_next(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_unif(uint64_t *x) { return (double)(rng_next(x) >> 11) * (1.0 / 9007199254740992.0); }

static double f16(const void *p) {
    mlm_f16_t h;
    memcpy(&h, p, 2);
    return mlm_f16_to_f32(h);
}

static void put_f16(void *p, float v) {
    mlm_f16_t h = mlm_f32_to_f16(v);
    memcpy(p, &h, 2);
}

static void put_f16_bits(void *p, uint16_t h) { memcpy(p, &h, 2); }

// Offsets of the f16 scale fields of a weight block; returns their count.
static int f16_fields(qtype_t t, size_t off[2]) {
    switch (t) {
    case QT_Q4_1: off[0] = offsetof(block_q4_1, d); off[1] = offsetof(block_q4_1, m); return 2;
    case QT_Q5_0: off[0] = offsetof(block_q5_0, d); return 1;
    case QT_Q5_1: off[0] = offsetof(block_q5_1, d); off[1] = offsetof(block_q5_1, m); return 2;
    case QT_Q2_K: off[0] = offsetof(block_q2_K, d); off[1] = offsetof(block_q2_K, dmin); return 2;
    case QT_Q3_K: off[0] = offsetof(block_q3_K, d); return 1;
    case QT_Q4_K: off[0] = offsetof(block_q4_K, d); off[1] = offsetof(block_q4_K, dmin); return 2;
    case QT_Q5_K: off[0] = offsetof(block_q5_K, d); off[1] = offsetof(block_q5_K, dmin); return 2;
    case QT_Q6_K: off[0] = offsetof(block_q6_K, d); return 1;
    default: return 0;
    }
}

// --- helpers: filling blocks

static void fill_w(qtype_t t, void *w, int64_t n, int mode, uint64_t *r) {
    const qtype_traits_t *tr = qtype_traits(t);
    const int64_t nb = n / tr->blck;
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *p = (uint8_t *)w + b * tr->type_size;
        for (size_t i = 0; i < tr->type_size; i++)
            p[i] = mode == W_MAX ? 0xff : mode == W_MIN ? 0x00 : (uint8_t)rng_next(r);
        if (t == QT_Q6_K && (mode == W_MAX || mode == W_MIN))
            memset(((block_q6_K *)p)->scales, mode == W_MAX ? 0x7f : 0x80, QK_K / 16);
        size_t off[2];
        const int nf = f16_fields(t, off);
        for (int f = 0; f < nf; f++) {
            switch (mode) {
            case W_RANDOM: {
                double v = 0.0005 + 0.05 * rng_unif(r);
                put_f16(p + off[f], (float)(rng_next(r) & 1 ? -v : v));
                break;
            }
            case W_EXACT: put_f16_bits(p + off[f], 0x3c00); break;                // 1.0
            case W_MAX: put_f16_bits(p + off[f], 0x7bff); break;                  // 65504
            case W_MIN: put_f16_bits(p + off[f], 0xfbff); break;                  // -65504
            default: put_f16_bits(p + off[f], rng_next(r) & 1 ? 0x0001 : 0x8001); // +-2^-24
            }
        }
    }
}

static int8_t x_value(int mode, uint64_t *r) {
    switch (mode) {
    case X_SMALL: return (int8_t)((int)(rng_next(r) % 7) - 3);
    case X_MAX: return 127;
    case X_MIN: return -128;
    default: return (int8_t)rng_next(r);
    }
}

// Fills n activations of type at (Q8_K, Q8_0 or Q8_1) with consistent bsums / s fields.
static void fill_x(qtype_t at, void *x, int64_t n, int mode, uint64_t *r) {
    const int extreme = mode == X_MAX || mode == X_MIN;
    if (at == QT_Q8_K) {
        block_q8_K *b = x;
        for (int64_t i = 0; i < n / QK_K; i++) {
            b[i].d = mode == X_SMALL ? 1.0f : extreme ? 100.0f : (float)(0.001 + 0.1 * rng_unif(r));
            for (int e = 0; e < QK_K; e++) b[i].qs[e] = x_value(mode, r);
            for (int g = 0; g < QK_K / 16; g++) {
                int s = 0;
                for (int e = 0; e < 16; e++) s += b[i].qs[16 * g + e];
                b[i].bsums[g] = (int16_t)s;
            }
        }
    } else if (at == QT_Q8_0) {
        block_q8_0 *b = x;
        for (int64_t i = 0; i < n / QK8_0; i++) {
            put_f16(&b[i].d, mode == X_SMALL ? 1.0f : extreme ? 65504.0f : (float)(0.001 + 0.1 * rng_unif(r)));
            for (int e = 0; e < QK8_0; e++) b[i].qs[e] = x_value(mode, r);
        }
    } else {
        block_q8_1 *b = x;
        for (int64_t i = 0; i < n / QK8_1; i++) {
            const float d = mode == X_SMALL ? 1.0f : extreme ? 8.0f : (float)(0.001 + 0.1 * rng_unif(r));
            int s = 0;
            for (int e = 0; e < QK8_1; e++) {
                b[i].qs[e] = x_value(mode, r);
                s += b[i].qs[e];
            }
            put_f16(&b[i].d, d);
            put_f16(&b[i].s, d * (float)s);
        }
    }
}

// --- helpers: an independent oracle (decode each element, dot in double)

static void scale_min_k4(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Decodes weight block b (index ib) of type t into wb; returns the block's element count.
static int decode_w(qtype_t t, const void *w, int64_t ib, wblock_t *wb) {
    memset(wb, 0, sizeof *wb);
    switch (t) {
    case QT_Q4_K:
    case QT_Q5_K: {
        const uint8_t *scales, *qs, *qh = NULL;
        if (t == QT_Q4_K) {
            const block_q4_K *b = (const block_q4_K *)w + ib;
            wb->d = f16(&b->d), wb->dmin = f16(&b->dmin), scales = b->scales, qs = b->qs;
        } else {
            const block_q5_K *b = (const block_q5_K *)w + ib;
            wb->d = f16(&b->d), wb->dmin = f16(&b->dmin), scales = b->scales, qs = b->qs, qh = b->qh;
        }
        for (int j = 0; j < 4; j++) {
            int s0, m0, s1, m1;
            scale_min_k4(2 * j, scales, &s0, &m0);
            scale_min_k4(2 * j + 1, scales, &s1, &m1);
            for (int l = 0; l < 32; l++) {
                int e = 64 * j + l;
                wb->q[e] = qs[32 * j + l] & 0xf;
                wb->q[e + 32] = qs[32 * j + l] >> 4;
                if (qh) {
                    wb->q[e] += 16 * ((qh[l] >> (2 * j)) & 1);
                    wb->q[e + 32] += 16 * ((qh[l] >> (2 * j + 1)) & 1);
                }
                wb->sc[e] = s0, wb->mn[e] = m0;
                wb->sc[e + 32] = s1, wb->mn[e + 32] = m1;
            }
        }
        return QK_K;
    }
    case QT_Q6_K: {
        const block_q6_K *b = (const block_q6_K *)w + ib;
        wb->d = f16(&b->d);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            for (int l = 0; l < 32; l++) {
                int e = 128 * h + l;
                wb->q[e] = ((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32;
                wb->q[e + 32] = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
                wb->q[e + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                wb->q[e + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            }
        }
        for (int e = 0; e < QK_K; e++) wb->sc[e] = b->scales[e / 16];
        return QK_K;
    }
    case QT_Q2_K: {
        const block_q2_K *b = (const block_q2_K *)w + ib;
        wb->d = f16(&b->d), wb->dmin = f16(&b->dmin);
        for (int e = 0; e < QK_K; e++) {
            int h = e / 128, j = (e % 128) / 32, l = e % 32;
            wb->q[e] = (b->qs[32 * h + l] >> (2 * j)) & 3;
            wb->sc[e] = b->scales[e / 16] & 0xf;
            wb->mn[e] = b->scales[e / 16] >> 4;
        }
        return QK_K;
    }
    case QT_Q3_K: {
        const block_q3_K *b = (const block_q3_K *)w + ib;
        wb->d = f16(&b->d);
        for (int e = 0; e < QK_K; e++) {
            int h = e / 128, j = (e % 128) / 32, l = e % 32, g = e / 16;
            int hbit = (b->hmask[l] >> (4 * h + j)) & 1;
            wb->q[e] = ((b->qs[32 * h + l] >> (2 * j)) & 3) - (hbit ? 0 : 4);
            int lo = g < 8 ? b->scales[g] & 0xf : b->scales[g - 8] >> 4;
            int hi = (b->scales[8 + g % 4] >> (2 * (g / 4))) & 3;
            wb->sc[e] = (lo | (hi << 4)) - 32;
        }
        return QK_K;
    }
    case QT_Q4_1:
    case QT_Q5_0:
    case QT_Q5_1: {
        const uint8_t *qs;
        uint32_t qh = 0;
        if (t == QT_Q4_1) {
            const block_q4_1 *b = (const block_q4_1 *)w + ib;
            wb->d = f16(&b->d), wb->dmin = f16(&b->m), qs = b->qs;
        } else if (t == QT_Q5_0) {
            const block_q5_0 *b = (const block_q5_0 *)w + ib;
            wb->d = f16(&b->d), qs = b->qs;
            memcpy(&qh, b->qh, 4);
        } else {
            const block_q5_1 *b = (const block_q5_1 *)w + ib;
            wb->d = f16(&b->d), wb->dmin = f16(&b->m), qs = b->qs;
            memcpy(&qh, b->qh, 4);
        }
        for (int e = 0; e < 32; e++) {
            int q = e < 16 ? qs[e] & 0xf : qs[e - 16] >> 4;
            q += 16 * ((qh >> e) & 1);
            wb->q[e] = t == QT_Q5_0 ? q - 16 : q;
            wb->sc[e] = 1;
        }
        return 32;
    }
    default: return 0;
    }
}

// dot(w, x) in double from the decoded elements; *mag = the sum of the magnitudes of every term, the
// scale the float rounding of any summation order is measured against.
static double oracle_dot(qtype_t t, int64_t n, const void *w, const void *x, double *mag) {
    wblock_t *wb = malloc(sizeof *wb);
    if (!wb) return NAN;
    const qtype_traits_t *tr = qtype_traits(t);
    double sum = 0, m = 0;
    for (int64_t ib = 0; ib < n / tr->blck; ib++) {
        const int be = decode_w(t, w, ib, wb);
        for (int e = 0; e < be; e++) {
            const int64_t ge = ib * be + e; // global element index
            double dx;
            int xq;
            if (tr->vec_dot_type == QT_Q8_K) {
                const block_q8_K *b = (const block_q8_K *)x + ge / QK_K;
                dx = b->d, xq = b->qs[ge % QK_K];
            } else if (tr->vec_dot_type == QT_Q8_0) {
                const block_q8_0 *b = (const block_q8_0 *)x + ge / QK8_0;
                dx = f16(&b->d), xq = b->qs[ge % QK8_0];
            } else {
                const block_q8_1 *b = (const block_q8_1 *)x + ge / QK8_1;
                dx = f16(&b->d), xq = b->qs[ge % QK8_1];
            }
            const double a = wb->d * wb->sc[e] * wb->q[e] * dx * xq;
            const double c = -wb->dmin * wb->mn[e] * dx * xq;
            sum += a + c;
            m += fabs(a) + fabs(c);
        }
        if (t == QT_Q4_1 || t == QT_Q5_1) {
            const double c = wb->dmin * f16(&((const block_q8_1 *)x)[ib].s);
            sum += c;
            m += fabs(c);
        }
    }
    free(wb);
    *mag = m;
    return sum;
}

// --- helpers: checking one case

// Runs type t at n elements with the given fill modes through every available ISA and compares with
// the reference and the oracle: within 1e-5 of the term magnitude, or bit-exact when exact is set.
static void check_case(qtype_t t, int64_t n, int wmode, int xmode, uint64_t seed, int exact) {
    const qtype_traits_t *tr = qtype_traits(t);
    const qtype_t at = tr->vec_dot_type;
    void *w = malloc(qtype_row_size(t, n));
    void *x = malloc(qtype_row_size(at, n));
    CU_ASSERT_FATAL(w != NULL && x != NULL);
    uint64_t r = seed;
    fill_w(t, w, n, wmode, &r);
    fill_x(at, x, n, xmode, &r);

    double mag;
    const double want = oracle_dot(t, n, w, x, &mag);
    float ref = NAN;
    quant_vec_dot_ref(t, n, &ref, w, x);
    const double tol = exact ? 0.0 : 1e-5 * mag;
    CU_ASSERT(isfinite(want) && isfinite(ref));
    CU_ASSERT(fabs(ref - want) <= tol);
    if (!(fabs(ref - want) <= tol) )
        fprintf(stderr, "\n  %s n=%lld w%d x%d: reference %.9g, oracle %.9g\n", tr->name, (long long)n,
                wmode, xmode, ref, want);

    for (size_t k = 0; k < sizeof isas / sizeof isas[0]; k++) {
        const kernels_t *kt = kernels_for_isa(isas[k]);
        if (!kt) continue;
        if (!isa_covers(isas[k], t)) continue;
        CU_ASSERT_PTR_NOT_NULL(kt->vec_dot[t]);
        if (!kt->vec_dot[t]) continue;
        float got = NAN;
        kt->vec_dot[t](n, &got, w, x);
        const int ok = fabs(got - want) <= tol && fabs(got - ref) <= (exact ? 0.0 : 1e-5 * mag);
        CU_ASSERT(ok);
        if (!ok )
            fprintf(stderr, "\n  %s %s n=%lld w%d x%d: got %.9g, reference %.9g, oracle %.9g (tol %.3g)\n",
                    tr->name, isas[k], (long long)n, wmode, xmode, got, ref, want, tol);
    }
    free(w);
    free(x);
}

static int is_k_type(qtype_t t) { return qtype_traits(t)->blck == QK_K; }

// --- tests

static void test_random(void) {
    static const int64_t nk[] = {256, 512, 2048, 5632};
    static const int64_t n32[] = {32, 64, 96, 160, 224, 1024, 2080, 4096};
    for (int i = 0; i < N_K_TYPES; i++) {
        const qtype_t t = k_types[i];
        const int64_t *ns = is_k_type(t) ? nk : n32;
        const int cnt = is_k_type(t) ? 4 : 8;
        for (int j = 0; j < cnt; j++)
            for (int rep = 0; rep < 3; rep++)
                check_case(t, ns[j], W_RANDOM, X_RANDOM, 1000u * (uint64_t)t + 10u * (uint64_t)j + (uint64_t)rep, 0);
    }
}

static void test_exact(void) {
    for (int i = 0; i < N_K_TYPES; i++) {
        const qtype_t t = k_types[i];
        const int64_t n = is_k_type(t) ? 512 : 1024;
        for (int rep = 0; rep < 4; rep++) check_case(t, n, W_EXACT, X_SMALL, 77u + (uint64_t)rep, 1);
    }
}

static void test_extremes(void) {
    static const int wmodes[] = {W_MAX, W_MIN, W_TINY};
    static const int xmodes[] = {X_MAX, X_MIN, X_RANDOM};
    for (int i = 0; i < N_K_TYPES; i++) {
        const qtype_t t = k_types[i];
        const int64_t n = is_k_type(t) ? 512 : 128;
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++) check_case(t, n, wmodes[a], xmodes[b], 5u + (uint64_t)(a * 3 + b), 0);
    }
}

// Prints ns per weight block at n = 4096 for the reference and each ISA (timing only, not asserted).
static void test_speed(void) {
    const int64_t n = 4096;
    for (int i = 0; i < N_K_TYPES; i++) {
        const qtype_t t = k_types[i];
        const qtype_traits_t *tr = qtype_traits(t);
        void *w = malloc(qtype_row_size(t, n));
        void *x = malloc(qtype_row_size(tr->vec_dot_type, n));
        CU_ASSERT_FATAL(w != NULL && x != NULL);
        uint64_t r = 99;
        fill_w(t, w, n, W_RANDOM, &r);
        fill_x(tr->vec_dot_type, x, n, X_RANDOM, &r);
        fprintf(stderr, "\n  %-5s n=%lld ns/block:", tr->name, (long long)n);
        for (int k = -1; k < (int)(sizeof isas / sizeof isas[0]); k++) {
            const kernels_t *kt = k < 0 ? NULL : kernels_for_isa(isas[k]);
            kern_vec_dot_fn f = kt ? kt->vec_dot[t] : NULL;
            if (k >= 0 && !f) continue;
            const int reps = k < 0 ? 20 : 2000;
            float v = 0, acc = 0;
            double best = 1e30; // best of 5 rounds, ns per call
            for (int round = 0; round < 5; round++) {
                struct timespec t0, t1;
                clock_gettime(CLOCK_MONOTONIC, &t0);
                for (int rep = 0; rep < reps; rep++) {
                    if (f)
                        f(n, &v, w, x);
                    else
                        quant_vec_dot_ref(t, n, &v, w, x);
                    acc += v;
                }
                clock_gettime(CLOCK_MONOTONIC, &t1);
                const double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
                if (ns / reps < best) best = ns / reps;
            }
            CU_ASSERT(isfinite(acc));
            fprintf(stderr, " %s %.2f", k < 0 ? "ref" : isas[k], best / (double)(n / tr->blck));
        }
        free(w);
        free(x);
    }
    fprintf(stderr, "\n");
}

// --- suite

int test_kernels_k_suite(void) {
    CU_pSuite s = CU_add_suite("kernels_k", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "random blocks, n = 256..5632 / 32..4096", test_random) ||
        !CU_add_test(s, "unit scales: bit-exact integer results", test_exact) ||
        !CU_add_test(s, "extreme quants and scales", test_extremes) ||
        !CU_add_test(s, "speed at n = 4096 (printed)", test_speed))
        return -1;
    return 0;
}
