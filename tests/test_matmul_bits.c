// CUnit suite "matmul_bits": every table's mm_rows, with either decode tuning (kern_tune_t), gives the scalar
// table's bits for the types the logits depend on bit for bit.
//
// Small shapes, so that the suite also runs quickly under qemu-user (the cross-compiled Arm tests):
// packed Q4_0 groups, plain Q8_0, Q4_K, Q3_K, Q5_K and Q2_K (repacked on AVX-512), Q6_K and F32/F16 rows (both the
// one-token and the tiled orders).
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "worker/kernels/matmul.h"

// --- helpers

static const char *const isas[] = {"avx2", "avx512", "neon", "neon-dotprod"};

// y = mm_rows over [r0, rows) for nt tokens with table k (weights prepared with repack); y: (nt, rows).
static void run(const kernels_t *k, qtype_t t, int64_t rows, int64_t cols, const void *w, const float *x, int nt,
                 int64_t r0, float *y) {
    mm_weight_t mw;
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&mw, k, t, rows, cols, w, true), 0);
    const size_t xs = mm_act_row_bytes(t, cols);
    uint8_t *xq = malloc((size_t)nt * xs); // (nt, xs)
    CU_ASSERT_FATAL(xq != NULL);
    for (int i = 0; i < nt; i++) mm_quantize_act(k, t, x + (size_t)i * cols, xq + (size_t)i * xs, cols);
    for (size_t i = 0; i < (size_t)nt * rows; i++) y[i] = -1.0f;
    mm_rows(k, &mw, xq, xs, nt, y, (size_t)rows, r0, rows);
    free(xq);
    mm_weight_release(&mw);
}

// One type and shape, for nt = 1, 2, 5 tokens and the row ranges [0, rows) and [16, rows): each
// available table against the scalar table, bit for bit; returns mismatches.
static int check_shape(qtype_t t, int64_t rows, int64_t cols, uint64_t seed) {
    const int nt = 5; // the most tokens
    static const int nts[] = {1, 2, 5};
    static const int64_t r0s[] = {0, 16}; // a whole matrix, and a later thread's share
    const size_t rb = qtype_row_size(t, cols);
    float *f = malloc(sizeof(float) * (size_t)cols * (size_t)(rows > nt ? rows : nt));
    uint8_t *w = malloc((size_t)rows * rb);                              // (rows, rb)
    float *x = malloc(sizeof(float) * (size_t)cols * (size_t)nt);        // (nt, cols)
    float *want = malloc(sizeof(float) * (size_t)nt * (size_t)rows);     // (nt, rows)
    float *got = malloc(sizeof(float) * (size_t)nt * (size_t)rows);      // (nt, rows)
    CU_ASSERT_FATAL(f && w && x && want && got);
    test_fill_floats(f, rows * cols, seed, 2.0f);
    for (int64_t r = 0; r < rows; r++) CU_ASSERT_EQUAL_FATAL(quant_quantize_ref(t, f + r * cols, w + (size_t)r * rb, cols), 0);
    test_fill_floats(x, (int64_t)nt * cols, seed + 7, 2.0f);
    int bad = 0;
    for (size_t a = 0; a < sizeof nts / sizeof nts[0]; a++)
        for (size_t b = 0; b < sizeof r0s / sizeof r0s[0]; b++) {
            const int n_tok = nts[a];
            const int64_t r0 = r0s[b];
            run(kernels_for_isa("scalar"), t, rows, cols, w, x, n_tok, r0, want);
            for (size_t i = 0; i < 3 * sizeof isas / sizeof isas[0]; i++) {
                const kernels_t *ki = kernels_for_isa(isas[i / 3]);
                if (!ki) continue;
                kernels_t kc = *ki; // each table with each decode tuning, and two streams where a kernel has them
                kc.tune = i % 3 == 0 ? kern_tune_intel() : i % 3 == 1 ? kern_tune_amd()
                        : (kern_tune_t){.name = "two streams", .q4_groups = 2, .q4_pf = 0, .q8_groups = 2, .q8_pf = 0, .q6_rows = 2, .q6_pf = 0, .f16_rows = 1};
                const kernels_t *k = &kc;
                run(k, t, rows, cols, w, x, n_tok, r0, got);
                for (int tk = 0; tk < n_tok; tk++)
                    for (int64_t r = r0; r < rows; r++) {
                        const size_t at = (size_t)tk * rows + r;
                        if (memcmp(&got[at], &want[at], sizeof(float)) != 0 && bad++ == 0)
                            fprintf(stderr, "\n  %s (%s) %s %lldx%lld nt=%d rows [%lld, %lld) row %lld tok %d: got %.9g, scalar %.9g\n",
                                    k->isa, k->tune.name, qtype_name(t), (long long)rows, (long long)cols, n_tok, (long long)r0,
                                    (long long)rows, (long long)r, tk, got[at], want[at]);
                    }
            }
        }
    free(f);
    free(w);
    free(x);
    free(want);
    free(got);
    return bad;
}

// --- tests

static void test_same_bits(void) {
    static const qtype_t types[] = {QT_Q4_0, QT_Q8_0, QT_Q4_K, QT_Q3_K, QT_Q5_K, QT_Q2_K, QT_Q6_K, QT_F16, QT_F32};
    int bad = 0;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        const qtype_t t = types[i];
        const int64_t blck = qtype_traits(t)->blck;
        // 35 rows: two full 16-row groups and a partial one; columns: a few blocks, and for F32/F16 a
        // length with a 64-element head and a tail (100) as well as a tiled one (multiple of 16)
        const int64_t cols_list[] = {blck == 1 ? 100 : blck * 3, blck == 1 ? 192 : blck * 8};
        for (size_t c = 0; c < 2; c++) bad += check_shape(t, 35, cols_list[c], 40 + 7 * i + 3 * c);
    }
    CU_ASSERT_EQUAL(bad, 0);
}

// BF16 on AVX-512: every output is one 16-lane fma chain (float_tile's order) whether it is decoded alone
// (bf16_dec_rows: 4 rows a pass with Intel's tuning, 1 with AMD's, prefetched) or computed in a batch of
// tokens, so a token's logits do not depend on how many tokens came with it.
static void test_bf16_decode_is_batch_bits(void) {
    const kernels_t *k512 = kernels_for_isa("avx512");
    if (!k512) return; // no AVX-512 here: nothing to compare (the other tables run vec_dot alone)
    const int nt = 5;
    const int64_t shapes[][2] = {{36, 192}, {37, 200}, {5, 1000}}; // tiled batch; tails; rows < one 4-row pass
    int bad = 0, compared = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int64_t rows = shapes[s][0], cols = shapes[s][1];
        const size_t rb = qtype_row_size(QT_BF16, cols);
        float *f = malloc(sizeof(float) * (size_t)rows * (size_t)cols), *x = malloc(sizeof(float) * (size_t)nt * (size_t)cols);
        uint8_t *w = malloc((size_t)rows * rb);
        float *batch = malloc(sizeof(float) * (size_t)nt * (size_t)rows), *one = malloc(sizeof(float) * (size_t)rows);
        CU_ASSERT_FATAL(f && x && w && batch && one);
        test_fill_floats(f, rows * cols, 900 + s, 2.0f);
        for (int64_t r = 0; r < rows; r++) CU_ASSERT_EQUAL_FATAL(quant_quantize_ref(QT_BF16, f + r * cols, w + (size_t)r * rb, cols), 0);
        test_fill_floats(x, (int64_t)nt * cols, 950 + s, 2.0f);
        for (int tu = 0; tu < 2; tu++) {
            kernels_t kc = *k512;
            kc.tune = tu == 0 ? kern_tune_intel() : kern_tune_amd();
            run(&kc, QT_BF16, rows, cols, w, x, nt, 0, batch);
            for (int t = 0; t < nt; t++) {
                run(&kc, QT_BF16, rows, cols, w, x + (size_t)t * (size_t)cols, 1, 0, one);
                for (int64_t r = 0; r < rows; r++, compared++)
                    if (memcmp(&one[r], &batch[(size_t)t * (size_t)rows + r], sizeof(float)) != 0 && bad++ == 0)
                        fprintf(stderr, "\n  BF16 (%s) %lldx%lld row %lld tok %d: decode %.9g, batch %.9g\n", kc.tune.name,
                                (long long)rows, (long long)cols, (long long)r, t, one[r], batch[(size_t)t * (size_t)rows + r]);
            }
        }
        free(f), free(x), free(w), free(batch), free(one);
    }
    CU_ASSERT_EQUAL(compared, 2 * 5 * (36 + 37 + 5));
    CU_ASSERT_EQUAL(bad, 0);
}

// --- public API

int test_matmul_bits_suite(void) {
    CU_pSuite s = CU_add_suite("matmul_bits", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "every table gives the scalar table's bits", test_same_bits)) return -1;
    if (!CU_add_test(s, "BF16 on AVX-512: a decoded token has a batch's bits", test_bf16_decode_is_batch_bits)) return -1;
    return 0;
}
