// CUnit suite "matmul": mm_rows for every type, ISA, repack choice, token count and row split vs quant_vec_dot_ref.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "core/err.h"
#include "worker/kernels/matmul.h"

// --- helpers

#define MAX_NT 70

static const char *const isas[] = {"scalar", "avx2", "avx512", "neon", "neon-dotprod"};

// A problem: a weight matrix, MAX_NT activation rows, and the oracle's outputs.
typedef struct {
    qtype_t type;
    int64_t rows, cols;
    uint8_t *w;        // (rows, row_bytes) plain quantized rows
    uint8_t *xq;       // (MAX_NT, xs) activation rows from mm_quantize_act
    size_t xs;         // bytes between activation rows
    float *ref;        // (MAX_NT, rows) quant_vec_dot_ref
    double *tol;       // (MAX_NT, rows) 1e-5 * sum |w_i x_i|
} problem_t;

static void problem_init(problem_t *p, const kernels_t *k, qtype_t t, int64_t rows, int64_t cols, uint64_t seed) {
    memset(p, 0, sizeof *p);
    p->type = t;
    p->rows = rows;
    p->cols = cols;
    const size_t rb = qtype_row_size(t, cols);
    const qtype_t at = mm_act_type(t);
    p->w = malloc((size_t)rows * rb);
    p->xs = mm_act_row_bytes(t, cols);
    p->xq = malloc(MAX_NT * p->xs);
    p->ref = malloc(sizeof(float) * MAX_NT * rows);
    p->tol = malloc(sizeof(double) * MAX_NT * rows);
    float *f = malloc(sizeof(float) * cols * (rows > MAX_NT ? rows : MAX_NT));
    float *wf = malloc(sizeof(float) * cols * rows), *xf = malloc(sizeof(float) * cols * MAX_NT);
    test_fill_floats(f, rows * cols, seed, 2.0f);
    for (int64_t r = 0; r < rows; r++) quant_quantize_ref(t, f + r * cols, p->w + r * rb, cols);
    test_fill_floats(f, MAX_NT * cols, seed + 12345, 2.0f);
    for (int i = 0; i < MAX_NT; i++) mm_quantize_act(k, t, f + i * cols, p->xq + i * p->xs, cols);
    for (int64_t r = 0; r < rows; r++) quant_dequantize_ref(t, p->w + r * rb, wf + r * cols, cols);
    for (int i = 0; i < MAX_NT; i++) quant_dequantize_ref(at, p->xq + i * p->xs, xf + i * cols, cols);
    for (int i = 0; i < MAX_NT; i++)
        for (int64_t r = 0; r < rows; r++) {
            quant_vec_dot_ref(t, cols, &p->ref[i * rows + r], p->w + r * rb, p->xq + i * p->xs);
            double s = 0;
            for (int64_t c = 0; c < cols; c++) s += fabs((double)wf[r * cols + c] * xf[i * cols + c]);
            p->tol[i * rows + r] = 1e-5 * s + 1e-30;
        }
    free(f);
    free(wf);
    free(xf);
}

static void problem_free(problem_t *p) {
    free(p->w);
    free(p->xq);
    free(p->ref);
    free(p->tol);
}

// mm_rows over [r0, r1) for nt tokens into a NaN-filled y; rows outside stay NaN, rows inside match.
// Returns the number of mismatches (and prints the first).
static int run_range(const kernels_t *k, const mm_weight_t *w, const problem_t *p, int nt, int64_t r0, int64_t r1,
                     float *y, size_t ys) {
    for (size_t i = 0; i < (size_t)nt * ys; i++) y[i] = NAN;
    mm_rows(k, w, p->xq, p->xs, nt, y, ys, r0, r1);
    int bad = 0;
    for (int t = 0; t < nt; t++)
        for (int64_t r = 0; r < (int64_t)ys; r++) {
            float got = y[t * ys + r];
            bool ok;
            if (r < r0 || r >= r1) ok = isnan(got);
            else ok = fabs((double)got - p->ref[t * p->rows + r]) <= p->tol[t * p->rows + r];
            if (!ok && bad++ == 0)
                fprintf(stderr, "\n  %s %s%s %lldx%lld nt=%d [%lld,%lld) row %lld tok %d: got %.9g want %.9g\n", k->isa,
                        qtype_name(p->type), w->pack ? " packed" : "", (long long)p->rows, (long long)p->cols, nt,
                        (long long)r0, (long long)r1, (long long)r, t, got,
                        r < p->rows ? p->ref[t * p->rows + r] : NAN);
        }
    return bad;
}

// All token counts and row splits for one problem, weight prepared with or without repack.
// all_nt: every token count; else 1, 5 and 70 (1 and 5 in a sanitizer build, where the 70-token
// products of the big shapes cost minutes and the small shapes still run every count).
static void check_problem(const kernels_t *k, const problem_t *p, bool repack, bool all_nt) {
    static const int nts[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 31, 33, 64, 70};
    const int few_max = TEST_SANITIZED ? 5 : 70;
    mm_weight_t w;
    uint8_t *copy = malloc(qtype_row_size(p->type, p->cols) * p->rows);
    memcpy(copy, p->w, qtype_row_size(p->type, p->cols) * p->rows);
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, p->type, p->rows, p->cols, copy, repack), 0);
    if (w.packed) memset(copy, 0xff, qtype_row_size(p->type, p->cols) * p->rows); // packed weights no longer read data
    CU_ASSERT(w.row_align >= 1);
    const size_t ys = (size_t)p->rows + 3; // extra columns must stay untouched
    float *y = malloc(sizeof(float) * MAX_NT * ys);
    int bad = 0;
    for (size_t i = 0; i < sizeof nts / sizeof nts[0]; i++) {
        const int nt = nts[i];
        if (!all_nt && ((nt != 1 && nt != 5 && nt != 70) || nt > few_max)) continue;
        bad += run_range(k, &w, p, nt, 0, p->rows, y, ys);
        // three threads' worth of row ranges, split at multiples of row_align
        const int64_t a = w.row_align;
        int64_t c1 = (p->rows / 3) / a * a, c2 = (2 * p->rows / 3) / a * a;
        if (c1 > 0) bad += run_range(k, &w, p, nt, 0, c1, y, ys);
        if (c2 > c1) bad += run_range(k, &w, p, nt, c1, c2, y, ys);
        if (p->rows > c2) bad += run_range(k, &w, p, nt, c2, p->rows, y, ys);
        // a single aligned group in the middle, and the last (possibly partial) group
        if (p->rows > a) bad += run_range(k, &w, p, nt, a, p->rows > 2 * a ? 2 * a : p->rows, y, ys);
        bad += run_range(k, &w, p, nt, (p->rows - 1) / a * a, p->rows, y, ys);
    }
    CU_ASSERT_EQUAL(bad, 0);
    free(y);
    mm_weight_release(&w);
    mm_weight_release(&w); // idempotent
    CU_ASSERT_PTR_NULL(w.packed);
    free(copy);
}

// Column counts for a type: the minimum block, a few odd multiples, non-multiples of 256 for plain types.
static int cols_for(qtype_t t, int64_t *out) {
    const int64_t b = qtype_traits(t)->blck;
    if (b == 1) {
        out[0] = 64, out[1] = 33, out[2] = 200, out[3] = 1;
        return 4;
    }
    if (b == 32) {
        out[0] = 32, out[1] = 64, out[2] = 96, out[3] = 352;
        return 4;
    }
    out[0] = 256, out[1] = 768;
    return 2;
}

// --- tests

static void test_all_types_small(void) {
    static const int64_t row_counts[] = {1, 15, 16, 17, 40, 172};
    // One oracle per problem for every ISA: activations quantize to the same bytes on each
    // (act_bytes_match_scalar), so the scalar table's are every table's.
    const kernels_t *scalar = kernels_for_isa("scalar");
    for (int t = 0; t < QT_COUNT; t++) {
        const qtype_traits_t *tr = qtype_traits(t);
        if (!tr || !tr->has_kernels) continue;
        int64_t cols[4];
        int nc = cols_for(t, cols);
        for (int c = 0; c < nc; c++)
            for (size_t r = 0; r < sizeof row_counts / sizeof row_counts[0]; r++) {
                problem_t p;
                problem_init(&p, scalar, t, row_counts[r], cols[c], 1000 + 97 * t + 13 * c + r);
                bool full = c == 0 || row_counts[r] == 172;
                for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
                    const kernels_t *k = kernels_for_isa(isas[i]);
                    if (!k) continue;
                    check_problem(k, &p, false, full);
                    check_problem(k, &p, true, full);
                }
                problem_free(&p);
            }
    }
}

// Bigger Q4_0 / Q8_0 / F16 shapes: 2049 rows (one row past a group), longer rows.
static void test_large_rows(void) {
    static const qtype_t types[] = {QT_Q4_0, QT_Q8_0, QT_F16, QT_F32};
    for (size_t j = 0; j < sizeof types / sizeof types[0]; j++) {
        problem_t p; // one oracle for every ISA, as in all_types_small
        problem_init(&p, kernels_for_isa("scalar"), types[j], 2049, 640, 77 + j);
        for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
            const kernels_t *k = kernels_for_isa(isas[i]);
            if (k) check_problem(k, &p, true, false);
        }
        problem_free(&p);
    }
}

// Activations quantized by any ISA are interchangeable (same bytes), so mixing tables is safe.
static void test_act_bytes_match_scalar(void) {
    static const qtype_t types[] = {QT_Q4_0, QT_Q8_0, QT_Q4_K, QT_F16, QT_BF16, QT_F32, QT_Q4_1, QT_Q5_0};
    const int64_t cols = 512;
    float x[512];
    test_fill_floats(x, cols, 5, 2.0f);
    for (size_t j = 0; j < sizeof types / sizeof types[0]; j++) {
        const size_t n = mm_act_row_bytes(types[j], cols);
        CU_ASSERT(n >= qtype_row_size(mm_act_type(types[j]), cols));
        uint8_t *a = calloc(1, n), *b = calloc(1, n);
        mm_quantize_act(kernels_for_isa("scalar"), types[j], x, a, cols);
        for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
            const kernels_t *k = kernels_for_isa(isas[i]);
            if (!k) continue;
            memset(b, 0, n);
            mm_quantize_act(k, types[j], x, b, cols);
            CU_ASSERT(memcmp(a, b, n) == 0);
        }
        free(a);
        free(b);
    }
}

static void test_weight_init_errors(void) {
    mm_weight_t w;
    uint8_t buf[4096] = {0};
    const kernels_t *k = kernels_best();
    CU_ASSERT_EQUAL(mm_weight_init(&w, k, QT_Q8_K, 4, 256, buf, true), MLM_EUNSUPPORTED);
    CU_ASSERT_EQUAL(mm_weight_init(&w, k, QT_Q4_0, 4, 48, buf, true), MLM_EINVAL);
    CU_ASSERT_EQUAL(mm_weight_init(&w, k, QT_Q4_0, 0, 64, buf, true), MLM_EINVAL);
    CU_ASSERT_EQUAL(mm_weight_init(&w, k, QT_Q4_0, 20, 64, buf, true), 0);
    CU_ASSERT_EQUAL(w.row_align, 16);
    CU_ASSERT_PTR_NOT_NULL(w.packed);
    CU_ASSERT_EQUAL((uintptr_t)w.packed % 64, 0);
    mm_weight_release(&w);
    CU_ASSERT_EQUAL(mm_weight_init(&w, k, QT_Q4_0, 20, 64, buf, false), 0);
    CU_ASSERT_EQUAL(w.row_align, 1);
    CU_ASSERT_PTR_NULL(w.packed);
    mm_weight_release(&w);
    mm_weight_t z;
    memset(&z, 0, sizeof z);
    mm_weight_release(&z);
    mm_weight_release(NULL);
    CU_ASSERT_EQUAL(mm_act_type(QT_Q4_K), QT_Q8_K);
    CU_ASSERT_EQUAL(mm_act_type(QT_Q4_0), QT_Q8_0);
    CU_ASSERT_EQUAL(mm_act_row_bytes(QT_F16, 100), 200);
}

// Q8_0 weights (plain rows, or the AVX-512 table's 16-row groups) follow vec_dot_q8_0's order for every token count (the reference uses
// it, or tinyBLAS's identical per-output 8-lane chain, for batches): the bits must match vec_dot.
static void test_q8_0_batch_bits(void) {
    static const int64_t shapes[][2] = {{13, 352}, {40, 2048}};
    static const int nts[] = {1, 2, 7, 8, 9, 16, 23, 64, 70};
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        const kernels_t *k = kernels_for_isa(isas[i]);
        if (!k) continue;
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            problem_t p;
            problem_init(&p, k, QT_Q8_0, shapes[s][0], shapes[s][1], 500 + s);
            const size_t rb = qtype_row_size(QT_Q8_0, p.cols);
            mm_weight_t w;
            CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, QT_Q8_0, p.rows, p.cols, p.w, true), 0);
            float *y = malloc(sizeof(float) * MAX_NT * (size_t)p.rows);
            int bad = 0;
            for (size_t j = 0; j < sizeof nts / sizeof nts[0]; j++) {
                const int nt = nts[j];
                // rows [1, rows) so tiles start at an odd row, as a thread's share may
                mm_rows(k, &w, p.xq, p.xs, nt, y, (size_t)p.rows, 1, p.rows);
                for (int t = 0; t < nt; t++)
                    for (int64_t r = 1; r < p.rows; r++) {
                        float want;
                        kern_vec_dot(k, QT_Q8_0, p.cols, &want, p.w + (size_t)r * rb, p.xq + (size_t)t * p.xs);
                        const float got = y[(size_t)t * p.rows + r];
                        if (memcmp(&got, &want, sizeof got) != 0 && bad++ == 0)
                            fprintf(stderr, "\n  %s Q8_0 %lldx%lld nt=%d row %lld tok %d: got %.9g want %.9g\n", k->isa,
                                    (long long)p.rows, (long long)p.cols, nt, (long long)r, t, got, want);
                    }
            }
            CU_ASSERT_EQUAL(bad, 0);
            free(y);
            mm_weight_release(&w);
            problem_free(&p);
        }
    }
}

// Decode (one activation row) gives the same bits as the per-row dot product on every ISA: the
// quantized types as kern_vec_dot of the same table, F16 as the scalar table's ggml_vec_dot order; row
// ranges that start and end off the kernels' row blocks (4, 8 and groups of 16), rows with a tail past 64
// columns; packed Q4_0 against the scalar table's packed kernel.
static void test_decode_bits(void) {
    enum { NR = 101 }; // 6 full groups of 16 and 5 rows: packed decode walks up to 4 groups at once
    static const qtype_t types[] = {QT_F16, QT_Q4_0, QT_Q8_0, QT_Q4_K, QT_Q6_K, QT_Q5_K, QT_Q2_K};
    static const int64_t ranges[][2] = {{0, 37}, {1, 37}, {3, 11}, {8, 16}, {36, 37}, {0, NR}, {16, NR}, {32, 80}};
    const kernels_t *ks = kernels_for_isa("scalar");
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        const kernels_t *k = kernels_for_isa(isas[i]);
        if (!k) continue;
        for (size_t j = 0; j < sizeof types / sizeof types[0]; j++) {
            const int64_t cols = types[j] == QT_F16 ? 2048 + 40 : 2048;
            problem_t p;
            problem_init(&p, k, types[j], NR, cols, 900 + j);
            const size_t rb = qtype_row_size(types[j], cols);
            mm_weight_t w;
            CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, types[j], p.rows, cols, p.w, true), 0);
            float y[NR], want[NR];
            int bad = 0, checked = 0;
            for (size_t g = 0; g < sizeof ranges / sizeof ranges[0]; g++) {
                const int64_t r0 = ranges[g][0], r1 = ranges[g][1];
                for (int64_t r = 0; r < NR; r++) y[r] = NAN;
                mm_rows(k, &w, p.xq, p.xs, 1, y, NR, r0, r1);
                // F16 and packed Q4_0: the scalar table's bits (Q4_0's are the repacked reference's, not vec_dot's)
                const bool oracle_rows = types[j] == QT_F16 || types[j] == QT_Q4_0;
                if (oracle_rows) mm_rows(ks, &w, p.xq, p.xs, 1, want, NR, r0, r1);
                for (int64_t r = r0; r < r1; r++) {
                    if (!oracle_rows) kern_vec_dot(k, types[j], cols, &want[r], p.w + (size_t)r * rb, p.xq);
                    checked++;
                    if (memcmp(&y[r], &want[r], sizeof y[r]) != 0 && bad++ == 0)
                        fprintf(stderr, "\n  %s %s decode [%lld,%lld) row %lld: got %.9g want %.9g\n", k->isa,
                                qtype_name(types[j]), (long long)r0, (long long)r1, (long long)r, y[r], want[r]);
                }
                for (int64_t r = 0; r < NR; r++)
                    if ((r < r0 || r >= r1) && !isnan(y[r])) bad++;
            }
            CU_ASSERT_EQUAL(checked, 37 + 36 + 8 + 8 + 1 + NR + (NR - 16) + 48);
            CU_ASSERT_EQUAL(bad, 0);
            // and within the oracle's tolerance (the bits above could agree on a wrong value)
            mm_rows(k, &w, p.xq, p.xs, 1, y, NR, 0, NR);
            int far = 0;
            for (int64_t r = 0; r < NR; r++) far += !(fabs((double)y[r] - p.ref[r]) <= p.tol[r]);
            CU_ASSERT_EQUAL(far, 0);
            mm_weight_release(&w);
            problem_free(&p);
        }
    }
}

// mm_weight_copy_huge: a matrix of 2 MB or more computes from its huge-page copy (the source may
// then be overwritten) with the bits it had from the source, 1 and 5 tokens; a smaller one, and a
// repacked one, are left on their rows; release frees the copy.
static void test_copy_huge(void) {
    const kernels_t *k = kernels_best();
    static const qtype_t types[] = {QT_Q6_K, QT_F16};
    for (size_t j = 0; j < sizeof types / sizeof types[0]; j++) {
        const int64_t cols = 1024, nr = types[j] == QT_Q6_K ? 2560 : 1040; // 2.15 MB, 2.13 MB
        problem_t p;
        problem_init(&p, k, types[j], nr, cols, 77 + j);
        const size_t bytes = qtype_row_size(types[j], cols) * (size_t)nr;
        CU_ASSERT_FATAL(bytes >= ((size_t)2 << 20));
        uint8_t *src = malloc(bytes);
        memcpy(src, p.w, bytes);
        mm_weight_t w;
        CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, types[j], nr, cols, src, true), 0);
        CU_ASSERT_PTR_NULL(w.packed);
        float *a = malloc(sizeof(float) * 5 * (size_t)nr), *b = malloc(sizeof(float) * 5 * (size_t)nr);
        for (int nt = 1; nt <= 5; nt += 4) {
            mm_rows(k, &w, p.xq, p.xs, nt, a, (size_t)nr, 0, nr);
            if (nt == 1) {
                CU_ASSERT_EQUAL(mm_weight_copy_huge(&w), 0);
                CU_ASSERT(w.copy != NULL && w.data == w.copy && w.data != src);
                memset(src, 0x55, bytes); // the copy is all it reads now
            }
            mm_rows(k, &w, p.xq, p.xs, nt, b, (size_t)nr, 0, nr);
            CU_ASSERT_EQUAL(memcmp(a, b, sizeof(float) * (size_t)nt * (size_t)nr), 0);
            memcpy(src, p.w, bytes);
        }
        CU_ASSERT_EQUAL(mm_weight_copy_huge(&w), 0); // a second call keeps the copy
        mm_weight_release(&w);
        CU_ASSERT(w.copy == NULL && w.data == NULL);
        mm_weight_release(&w);
        CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, types[j], 16, cols, src, true), 0); // small: stays
        CU_ASSERT_EQUAL(mm_weight_copy_huge(&w), 0);
        CU_ASSERT(w.copy == NULL && w.data == src);
        mm_weight_release(&w);
        free(a), free(b), free(src);
        problem_free(&p);
    }
    problem_t q; // repacked Q4_0: left as it is
    problem_init(&q, k, QT_Q4_0, 64, 1024, 5);
    mm_weight_t w;
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, QT_Q4_0, 64, 1024, q.w, true), 0);
    CU_ASSERT_EQUAL(mm_weight_copy_huge(&w), 0);
    CU_ASSERT(w.copy == NULL && (w.packed != NULL || w.data == q.w));
    mm_weight_release(&w);
    problem_free(&q);
}

// Repacked K-quants (x86: Q4_K in 16-row groups with the scales unpacked; AVX-512 also Q3_K, Q5_K, Q2_K): decode
// and the token tiles of a batch give, for 1..17 tokens, rows that are not a multiple of 16, row
// ranges that start and end inside a group and 1..5 super-blocks, the bits of the scalar table's
// vec_dot (which every table's vec_dot gives); the weights are read from the packed copy only, and
// get_row gives back the file bytes.
// Q4_1, Q5_0 and Q5_1 (x86_lanes): the AVX2 table's vec_dot is the reference (the scalar one sums in
// another order), so the tables compared are AVX2's and AVX-512's (repacked); the shapes are counted in
// blocks of 32 (odd counts leave the last pair of a group half empty).
static void check_k_packed_bits_as(qtype_t type, bool x86_lanes) {
    static const int64_t shapes[][2] = {{37, 768}, {17, 256}, {50, 1280}, {5, 512}};
    static const int64_t shapes32[][2] = {{37, 96}, {17, 32}, {50, 1280}, {5, 160}};
    enum { NT = 17 };
    const kernels_t *ks = kernels_for_isa(x86_lanes ? "avx2" : "scalar");
    if (!ks) return; // no AVX2 here: nothing has the x86 lanes to compare
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int64_t rows = x86_lanes ? shapes32[s][0] : shapes[s][0], cols = x86_lanes ? shapes32[s][1] : shapes[s][1];
        const size_t rb = qtype_row_size(type, cols);
        problem_t p;
        problem_init(&p, kernels_for_isa("scalar"), type, rows, cols, 4000 + s);
        float *want = malloc(sizeof(float) * NT * (size_t)rows); // (NT, rows) scalar vec_dot
        const size_t ys = (size_t)rows + 3;
        float *y = malloc(sizeof(float) * NT * ys); // (NT, ys)
        uint8_t *copy = malloc((size_t)rows * rb);  // (rows, rb) what the weight is made from
        uint8_t *row = malloc(rb);                  // (rb)
        CU_ASSERT_FATAL(want && y && copy && row);
        for (int t = 0; t < NT; t++)
            for (int64_t r = 0; r < rows; r++)
                kern_vec_dot(ks, type, cols, &want[t * rows + r], p.w + (size_t)r * rb, p.xq + (size_t)t * p.xs);
        // the ranges: the whole matrix, from the second group, inside one group, one row, the last rows
        const int64_t ranges[][2] = {{0, rows}, {16, rows}, {3, 21}, {rows / 2, rows / 2 + 1}, {rows - 5, rows}};
        for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
            const kernels_t *k = kernels_for_isa(isas[i]);
            if (!k || (x86_lanes && strcmp(k->isa, "avx2") != 0 && strcmp(k->isa, "avx512") != 0)) continue;
            memcpy(copy, p.w, (size_t)rows * rb);
            mm_weight_t w;
            CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, type, rows, cols, copy, true), 0);
#ifdef MESHLM_HAVE_X86
            if (type == QT_Q4_K || !strcmp(k->isa, "avx512")) {
                CU_ASSERT_PTR_NOT_NULL(w.packed);
                CU_ASSERT_EQUAL(w.row_align, 16);
            }
#endif
            if (w.packed) memset(copy, 0xff, (size_t)rows * rb); // computed from the packed copy only
            int bad = 0, checked = 0;
            for (int64_t r = 0; r < rows; r++) {
                mm_weight_get_row(&w, r, row);
                bad += memcmp(row, p.w + (size_t)r * rb, rb) != 0;
            }
            CU_ASSERT_EQUAL(bad, 0);
            for (int nt = 1; nt <= NT; nt++)
                for (size_t g = 0; g < sizeof ranges / sizeof ranges[0]; g++) {
                    const int64_t r0 = ranges[g][0], r1 = ranges[g][1] < rows ? ranges[g][1] : rows;
                    if (r0 < 0 || r0 >= r1) continue;
                    for (size_t e = 0; e < (size_t)NT * ys; e++) y[e] = NAN;
                    mm_rows(k, &w, p.xq, p.xs, nt, y, ys, r0, r1);
                    for (int t = 0; t < NT; t++)
                        for (int64_t r = 0; r < (int64_t)ys; r++) {
                            const float got = y[(size_t)t * ys + r];
                            if (t >= nt || r < r0 || r >= r1) { // untouched
                                bad += !isnan(got);
                                continue;
                            }
                            checked++;
                            if (memcmp(&got, &want[t * rows + r], sizeof got) != 0 && bad++ == 0)
                                fprintf(stderr, "\n  %s %s %lldx%lld nt=%d [%lld,%lld) row %lld tok %d: got %.9g want %.9g\n",
                                        k->isa, qtype_name(type), (long long)rows, (long long)cols, nt, (long long)r0, (long long)r1,
                                        (long long)r, t, got, want[t * rows + r]);
                        }
                }
            CU_ASSERT(checked > 0);
            CU_ASSERT_EQUAL(bad, 0);
            mm_weight_release(&w);
        }
        // and the scalar vec_dot is within the oracle's tolerance (the bits above could agree on a wrong value)
        int far = 0;
        for (int t = 0; t < NT; t++)
            for (int64_t r = 0; r < rows; r++) far += !(fabs((double)want[t * rows + r] - p.ref[t * rows + r]) <= p.tol[t * rows + r]);
        CU_ASSERT_EQUAL(far, 0);
        free(want);
        free(y);
        free(copy);
        free(row);
        problem_free(&p);
    }
}

static void check_k_packed_bits(qtype_t type) { check_k_packed_bits_as(type, false); }
static void test_q4_k_packed_bits(void) { check_k_packed_bits(QT_Q4_K); }
static void test_q3_k_packed_bits(void) { check_k_packed_bits(QT_Q3_K); }
static void test_q5_k_packed_bits(void) { check_k_packed_bits(QT_Q5_K); }
static void test_q2_k_packed_bits(void) { check_k_packed_bits(QT_Q2_K); }
static void test_legacy_packed_bits(void) {
    check_k_packed_bits_as(QT_Q4_1, true);
    check_k_packed_bits_as(QT_Q5_0, true);
    check_k_packed_bits_as(QT_Q5_1, true);
}

// Batches of Q6_K and F16 rows (the tiles that unpack or convert a weight once for several tokens)
// give, for every token count 1..17 and past the tiles' token chunks, the bits of the scalar table's
// per-(row, token) product: Q6_K its vec_dot_q6_K (every table's vec_dot has those bits, see the
// matmul_bits suite), F16 float_dot_exact in the order mm_rows picks (tiled or ggml_vec_dot). Row
// counts off the 4-row tiles, ranges starting at odd rows, several super-blocks; and each output
// within the oracle's tolerance.
static void test_batch_bits(void) {
    static const struct {
        qtype_t t;
        int64_t rows, cols;
    } shapes[] = {{QT_Q6_K, 13, 768},  {QT_Q6_K, 44, 1536}, {QT_Q6_K, 3, 256},  {QT_F16, 44, 2112},
                  {QT_F16, 20, 784},   {QT_F16, 13, 200},   {QT_F16, 8, 8208}};
    static const int64_t ranges[][2] = {{0, 0}, {1, 0}, {5, -2}}; // r1 relative to rows when <= 0
    const kernels_t *ks = kernels_for_isa("scalar");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        problem_t p; // one oracle for every ISA, as in all_types_small
        problem_init(&p, ks, shapes[s].t, shapes[s].rows, shapes[s].cols, 700 + s);
        for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
            const kernels_t *k = kernels_for_isa(isas[i]);
            if (!k) continue;
            const size_t rb = qtype_row_size(p.type, p.cols), ys = (size_t)p.rows;
            mm_weight_t w;
            CU_ASSERT_EQUAL_FATAL(mm_weight_init(&w, k, p.type, p.rows, p.cols, p.w, true), 0);
            float *y = malloc(sizeof(float) * MAX_NT * ys), *want = malloc(sizeof(float) * MAX_NT * ys); // (MAX_NT, ys)
            CU_ASSERT_FATAL(y && want);
            if (p.type == QT_F16) mm_rows(ks, &w, p.xq, p.xs, MAX_NT, want, ys, 0, p.rows); // tiled order: nt >= 2
            else // Q6_K: vec_dot_q6_K per (token, row), once for every range and token count
                for (int t = 0; t < MAX_NT; t++)
                    for (int64_t r = 0; r < p.rows; r++)
                        kern_vec_dot(ks, QT_Q6_K, p.cols, &want[(size_t)t * ys + r], p.w + (size_t)r * rb,
                                     p.xq + (size_t)t * p.xs);
            int bad = 0, far = 0, checked = 0;
            for (int nt = 1; nt <= MAX_NT; nt = nt < 17 ? nt + 1 : nt < 33 ? nt + 8 : nt == 33 ? 64 : nt + 6) {
                float want1[64]; // (rows) the one-token order
                if (p.type == QT_F16 && nt == 1) mm_rows(ks, &w, p.xq, p.xs, 1, want1, 1, 0, p.rows); // decode order
                for (size_t g = 0; g < sizeof ranges / sizeof ranges[0]; g++) {
                    const int64_t r0 = ranges[g][0], r1 = p.rows + ranges[g][1];
                    if (r0 >= r1) continue;
                    for (size_t j = 0; j < (size_t)nt * ys; j++) y[j] = NAN;
                    mm_rows(k, &w, p.xq, p.xs, nt, y, ys, r0, r1);
                    for (int t = 0; t < nt; t++)
                        for (int64_t r = 0; r < p.rows; r++) {
                            const float got = y[(size_t)t * ys + r];
                            if (r < r0 || r >= r1) {
                                bad += !isnan(got);
                                continue;
                            }
                            const float ref = p.type == QT_F16 && nt == 1 ? want1[r] : want[(size_t)t * ys + r];
                            checked++;
                            far += !(fabs((double)got - p.ref[t * p.rows + r]) <= p.tol[t * p.rows + r]);
                            if (memcmp(&got, &ref, sizeof got) != 0 && bad++ == 0)
                                fprintf(stderr, "\n  %s %s %lldx%lld nt=%d [%lld,%lld) row %lld tok %d: got %.9g want %.9g\n",
                                        k->isa, qtype_name(p.type), (long long)p.rows, (long long)p.cols, nt, (long long)r0,
                                        (long long)r1, (long long)r, t, got, ref);
                        }
                }
            }
            CU_ASSERT(checked > 0);
            CU_ASSERT_EQUAL(bad, 0);
            CU_ASSERT_EQUAL(far, 0);
            free(y);
            free(want);
            mm_weight_release(&w);
        }
        problem_free(&p);
    }
}

// --- public API

int test_matmul_suite(void) {
    CU_pSuite s = CU_add_suite("matmul", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "weight_init_errors", test_weight_init_errors) ||
        !CU_add_test(s, "act_bytes_match_scalar", test_act_bytes_match_scalar) ||
        !CU_add_test(s, "all_types_small", test_all_types_small) || !CU_add_test(s, "large_rows", test_large_rows) ||
        !CU_add_test(s, "q8_0_batch_bits", test_q8_0_batch_bits) || !CU_add_test(s, "decode_bits", test_decode_bits) ||
        !CU_add_test(s, "q4_k_packed_bits", test_q4_k_packed_bits) ||
        !CU_add_test(s, "q3_k_packed_bits", test_q3_k_packed_bits) ||
        !CU_add_test(s, "q5_k_packed_bits", test_q5_k_packed_bits) ||
        !CU_add_test(s, "q2_k_packed_bits", test_q2_k_packed_bits) ||
        !CU_add_test(s, "q4_1_q5_0_q5_1_packed_bits", test_legacy_packed_bits) ||
        !CU_add_test(s, "batch_bits", test_batch_bits) || !CU_add_test(s, "copy_huge", test_copy_huge))
        return -1;
    return 0;
}
