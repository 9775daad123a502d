// CUnit suite "kernels": every ISA table's vec_dot and from_float against the scalar references, and the table choice.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "worker/kernels/kernels.h"
#include "worker/kernels/quant.h"

// --- helpers

static const char *const isas[] = {"scalar", "avx2", "avx512", "neon", "neon-dotprod"};
static const qtype_t act_types[] = {QT_Q8_0, QT_Q8_1, QT_Q8_K, QT_F16, QT_BF16};

// Sum of |w_i * x_i| in double: the scale the summation-order tolerance is relative to.
static double abs_dot(qtype_t wt, qtype_t xt, const void *w, const void *x, int64_t n) {
    float *wf = malloc((size_t)n * sizeof(float)), *xf = malloc((size_t)n * sizeof(float));
    quant_dequantize_ref(wt, w, wf, n);
    quant_dequantize_ref(xt, x, xf, n);
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += fabs((double)wf[i] * xf[i]);
    free(wf);
    free(xf);
    return s;
}

// One weight type at one length n on one table: vec_dot vs quant_vec_dot_ref.
static void check_vec_dot(const kernels_t *k, qtype_t t, int64_t n, uint64_t seed) {
    const qtype_traits_t *tr = qtype_traits(t);
    const qtype_t xt = tr->vec_dot_type;
    float *wf = malloc((size_t)n * sizeof(float)), *xf = malloc((size_t)n * sizeof(float));
    void *w = malloc(qtype_row_size(t, n)), *x = malloc(qtype_row_size(xt, n));
    test_fill_floats(wf, n, seed, 4.0f);
    test_fill_floats(xf, n, seed * 7 + 1, 4.0f);
    CU_ASSERT_EQUAL_FATAL(quant_quantize_ref(t, wf, w, n), 0);
    CU_ASSERT_EQUAL_FATAL(quant_quantize_ref(xt, xf, x, n), 0);
    float ref = NAN, got = NAN;
    quant_vec_dot_ref(t, n, &ref, w, x);
    kern_vec_dot(k, t, n, &got, w, x);
    double tol = 1e-5 * abs_dot(t, xt, w, x, n) + 1e-30;
    if (!(fabs((double)got - ref) <= tol))
        fprintf(stderr, "\n  vec_dot %s %s n=%lld: got %.9g want %.9g (tol %.3g)\n", k->isa, tr->name, (long long)n,
                got, ref, tol);
    CU_ASSERT(fabs((double)got - ref) <= tol);
    // the NEON block-quant kernels keep the reference's lanes and fma order: the same bits
    const bool exact_type = t == QT_Q4_0 || t == QT_Q8_0 || t == QT_Q4_K || t == QT_Q6_K;
    if (exact_type && strncmp(k->isa, "neon", 4) == 0) {
        if (memcmp(&got, &ref, sizeof got) != 0)
            fprintf(stderr, "\n  vec_dot %s %s n=%lld: got %.9g, reference %.9g (bits differ)\n", k->isa, tr->name,
                    (long long)n, got, ref);
        CU_ASSERT(memcmp(&got, &ref, sizeof got) == 0);
    }
    free(wf);
    free(xf);
    free(w);
    free(x);
}

// One activation type at length n: from_float must produce the reference's bytes exactly.
static void check_from_float(const kernels_t *k, qtype_t at, const float *x, int64_t n, const char *what) {
    const size_t bytes = qtype_row_size(at, n);
    uint8_t *want = malloc(bytes), *got = malloc(bytes);
    memset(want, 0xAA, bytes);
    memset(got, 0x55, bytes);
    CU_ASSERT_EQUAL_FATAL(quant_quantize_ref(at, x, want, n), 0);
    kern_from_float(k, at, x, got, n);
    size_t bad = bytes;
    for (size_t i = 0; i < bytes && bad == bytes; i++)
        if (want[i] != got[i]) bad = i;
    if (bad != bytes)
        fprintf(stderr, "\n  from_float %s %s n=%lld (%s): byte %zu is %02x, want %02x\n", k->isa, qtype_name(at),
                (long long)n, what, bad, got[bad], want[bad]);
    CU_ASSERT_EQUAL(bad, bytes);
    free(want);
    free(got);
}

// --- tests

static void test_vec_dot_all_types(void) {
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        const kernels_t *k = kernels_for_isa(isas[i]);
        if (!k) continue;
        for (int t = 0; t < QT_COUNT; t++) {
            const qtype_traits_t *tr = qtype_traits(t);
            if (!tr || !tr->has_kernels) continue;
            static const int64_t plain_n[] = {1, 7, 16, 33, 64, 100, 255, 256, 1000, 4099};
            static const int64_t block_mul[] = {1, 2, 3, 5, 7, 8, 9, 16, 33};
            if (tr->blck == 1) {
                for (size_t j = 0; j < sizeof plain_n / sizeof plain_n[0]; j++)
                    check_vec_dot(k, t, plain_n[j], 100 + 31 * t + j);
            } else {
                for (size_t j = 0; j < sizeof block_mul / sizeof block_mul[0]; j++)
                    check_vec_dot(k, t, tr->blck * block_mul[j], 200 + 31 * t + j);
            }
        }
    }
}

static void test_from_float_random(void) {
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        const kernels_t *k = kernels_for_isa(isas[i]);
        if (!k) continue;
        for (size_t a = 0; a < sizeof act_types / sizeof act_types[0]; a++) {
            const qtype_t at = act_types[a];
            const int64_t blck = qtype_traits(at)->blck;
            static const int64_t muls[] = {1, 3, 8, 11};
            for (size_t j = 0; j < 4; j++) {
                int64_t n = blck == 1 ? 37 * muls[j] : blck * muls[j];
                float *x = malloc((size_t)n * sizeof(float));
                test_fill_floats(x, n, 900 + 17 * a + j, 4.0f);
                check_from_float(k, at, x, n, "random");
                free(x);
            }
        }
    }
}

// Exact .5 ties (every activation quantizer rounds them to even), all-zero blocks, a block whose
// largest magnitude appears with both signs, and for F16/BF16 arbitrary bit patterns.
static void test_from_float_edges(void) {
    const int64_t n = 512;
    float *x = malloc((size_t)n * sizeof(float));
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        const kernels_t *k = kernels_for_isa(isas[i]);
        if (!k) continue;
        // amax 127 per 32-block -> d = 1, id = 1: x * id lands exactly on k + 0.5
        for (int64_t j = 0; j < n; j++) x[j] = (j % 32 == 0) ? 127.0f : (float)((j % 64) - 32) + 0.5f;
        for (size_t a = 0; a < 3; a++) check_from_float(k, act_types[a], x, n, "ties");
        // Q8_K: max 127 -> iscale -1, values k + 0.5 tie to even
        for (int64_t j = 0; j < n; j++) x[j] = (j % 256 == 5) ? -127.0f : (float)((j % 50) - 25) + 0.5f;
        check_from_float(k, QT_Q8_K, x, n, "ties K");
        // zero blocks and equal-magnitude extremes of opposite sign
        memset(x, 0, (size_t)n * sizeof(float));
        x[300] = 3.0f;
        x[301] = -3.0f;
        x[40] = -2.0f;
        x[41] = 2.0f;
        for (size_t a = 0; a < 5; a++) check_from_float(k, act_types[a], x, n, "zeros/signs");
        // raw bit patterns: subnormals, overflow to inf, NaN, rounding boundaries
        uint64_t st = 77;
        for (int64_t j = 0; j < n; j++) {
            uint32_t u = (uint32_t)test_rng_next(&st);
            if (j % 4 == 1) u = (u & 0x80000000u) | (0x33000000u + (u & 0x05ffffffu)); // around f16 subnormals
            if (j % 4 == 2) u = (u & 0x80000000u) | (0x477f0000u + (u & 0x0001ffffu)); // around 65504
            if (j % 8 == 3) u = (u & 0xffff0000u) | 0x8000u;                           // bf16 tie
            memcpy(&x[j], &u, 4);
        }
        check_from_float(k, QT_F16, x, n, "bits");
        check_from_float(k, QT_BF16, x, n, "bits");
        check_from_float(k, QT_F16, x, n - 5, "bits tail");
        check_from_float(k, QT_BF16, x, n - 9, "bits tail");
    }
    free(x);
}

// The tables are filled for the types this file's ISA kernels cover.
static void test_tables_filled(void) {
    const kernels_t *k = kernels_for_isa("avx2");
    if (k) {
        CU_ASSERT_PTR_NOT_NULL(k->vec_dot[QT_Q4_0]);
        CU_ASSERT_PTR_NOT_NULL(k->vec_dot[QT_Q8_0]);
        CU_ASSERT_PTR_NOT_NULL(k->from_float[QT_Q8_K]);
    }
    k = kernels_for_isa("avx512");
    if (k) {
        CU_ASSERT_PTR_NOT_NULL(k->vec_dot[QT_F16]);
        CU_ASSERT_PTR_NOT_NULL(k->from_float[QT_BF16]);
    }
    // the Arm tables: the decode types and every activation quantizer
    static const char *const arm[] = {"neon", "neon-dotprod"};
    for (size_t i = 0; i < 2; i++) {
        k = kernels_for_isa(arm[i]);
        if (!k) continue;
        CU_ASSERT_STRING_EQUAL(k->isa, arm[i]);
        static const qtype_t wt[] = {QT_F16, QT_Q8_0, QT_Q4_0, QT_Q4_K, QT_Q6_K};
        for (size_t j = 0; j < sizeof wt / sizeof wt[0]; j++) CU_ASSERT_PTR_NOT_NULL(k->vec_dot[wt[j]]);
        for (size_t j = 0; j < sizeof act_types / sizeof act_types[0]; j++) CU_ASSERT_PTR_NOT_NULL(k->from_float[act_types[j]]);
    }
    CU_ASSERT_STRING_EQUAL(kernels_for_isa("scalar")->isa, "scalar");
    CU_ASSERT_PTR_NULL(kernels_for_isa("no-such-isa"));
}

// kernels_best follows MESHLM_ISA when this CPU has the table, and otherwise picks the best table;
// with MESHLM_EXPECT_ISA set (CI under qemu with a chosen CPU, tests/isa_test.sh) the choice must be it.
static void test_best_table(void) {
    const char *expect = getenv("MESHLM_EXPECT_ISA");
    if (expect && *expect) {
        const kernels_t *b = kernels_best();
        CU_ASSERT_STRING_EQUAL(b->isa, expect);
        if (strcmp(b->isa, expect) != 0) fprintf(stderr, "\n  kernels_best is %s, expected %s\n", b->isa, expect);
    }
    const char *saved = getenv("MESHLM_ISA");
    char *keep = saved ? strdup(saved) : NULL;
    unsetenv("MESHLM_ISA");
    const kernels_t *best = kernels_best();
    // the preference order: the first available of these is the best
    static const char *const order[] = {"avx512", "avx2", "neon-dotprod", "neon", "scalar"};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (kernels_for_isa(order[i])) {
            CU_ASSERT_STRING_EQUAL(best->isa, order[i]);
            break;
        }
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        setenv("MESHLM_ISA", isas[i], 1);
        const kernels_t *k = kernels_for_isa(isas[i]);
        CU_ASSERT_PTR_EQUAL(kernels_best(), k ? k : best);
    }
    setenv("MESHLM_ISA", "no-such-isa", 1);
    CU_ASSERT_PTR_EQUAL(kernels_best(), best);
    if (keep) setenv("MESHLM_ISA", keep, 1);
    else unsetenv("MESHLM_ISA");
    free(keep);
}

// kern_read_sum (the profile's memory stream) gives the exact u64 sum of the words on every table,
// wrapping included, for lengths of 256 bytes and multiples; the x86 tables have their own loops.
static void test_read_sum(void) {
    const size_t n = 256 * 37; // bytes
    uint64_t *buf = NULL; // (n / 8)
    CU_ASSERT_FATAL(posix_memalign((void **)&buf, 64, n) == 0);
    uint64_t want = 0, want1 = 0; // all words, the first 256 bytes' words
    for (size_t i = 0; i < n / 8; i++) {
        buf[i] = 0x9e3779b97f4a7c15ull * (i + 1); // sums wrap
        want += buf[i];
        if (i < 32) want1 += buf[i];
    }
    CU_ASSERT(want != 0 && want1 != 0);
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        const kernels_t *k = kernels_for_isa(isas[i]);
        if (!k) continue;
        CU_ASSERT_EQUAL(kern_read_sum(k, buf, n), want);
        CU_ASSERT_EQUAL(kern_read_sum(k, buf, 256), want1);
        CU_ASSERT_EQUAL(kern_read_sum(k, buf, 0), 0);
    }
    const kernels_t *k = kernels_for_isa("avx2");
    if (k) CU_ASSERT_PTR_NOT_NULL(k->read_sum);
    k = kernels_for_isa("avx512");
    if (k) CU_ASSERT_PTR_NOT_NULL(k->read_sum);
    free(buf);
}

// --- public API

int test_kernels_suite(void) {
    CU_pSuite s = CU_add_suite("kernels", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "tables_filled", test_tables_filled) || !CU_add_test(s, "best_table", test_best_table) || !CU_add_test(s, "vec_dot_all_types", test_vec_dot_all_types) ||
        !CU_add_test(s, "from_float_random", test_from_float_random) ||
        !CU_add_test(s, "from_float_edges", test_from_float_edges) || !CU_add_test(s, "read_sum", test_read_sum))
        return -1;
    return 0;
}
