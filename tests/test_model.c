// Model suite: every llama.cpp reference case reproduced on one node (logits and greedy tokens).
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ref_cases.h"
#include "test_util.h"
#include "core/err.h"
#include "worker/model/model.h"

// --- helpers

static int argmax(const float *row, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (row[i] > row[best]) best = i;
    return best;
}

// Checks one case with one kernel table; returns the number of failed checks.
static int check_case(const ref_case_t *rc, const kernels_t *kern, int n_threads, double *worst_out) {
    char err[512];
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = true, .kern = kern};
    if (model_load(&m, rc->model_path, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "  %s: load failed: %s\n", rc->name, err);
        return 1;
    }
    const model_hparams_t *hp = model_hparams(m);
    int fails = 0;
    const int rows = rc->n_prompt + rc->n_greedy;
    const double frac = ref_tolerance(model_type_name(m));
    if (hp->n_vocab != rc->n_vocab) {
        fprintf(stderr, "  %s: n_vocab %d != %d\n", rc->name, hp->n_vocab, rc->n_vocab);
        model_destroy(&m);
        return 1;
    }
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = rows + 8, .n_batch = 64, .n_threads = n_threads};
    if (model_ctx_new(&c, m, &co, err, sizeof err) != 0) {
        fprintf(stderr, "  %s: ctx failed: %s\n", rc->name, err);
        model_destroy(&m);
        return 1;
    }
    // Teacher-forced logits over prompt + greedy tokens.
    int32_t *seq = malloc((size_t)rows * sizeof *seq);
    float *lg = malloc((size_t)rows * (size_t)hp->n_vocab * sizeof *lg);
    memcpy(seq, rc->prompt_tokens, (size_t)rc->n_prompt * sizeof *seq);
    memcpy(seq + rc->n_prompt, rc->greedy, (size_t)rc->n_greedy * sizeof *seq);
    // Fed as the reference was made: the prompt as one batch, then one token per call (llama.cpp
    // sums in another order for a token that arrives in a batch than for one that arrives alone).
    int r = model_eval(c, seq, rc->n_prompt, lg, true);
    for (int i = rc->n_prompt; r == 0 && i < rows; i++) r = model_eval(c, seq + i, 1, lg + (size_t)i * hp->n_vocab, true);
    if (r != 0) {
        fprintf(stderr, "  %s: eval failed: %s\n", rc->name, mlm_strerror(r));
        fails++;
    }
    double worst = 0;
    for (int i = 0; r == 0 && i < rows; i++) {
        double md, range;
        ref_row_diff(lg + (size_t)i * hp->n_vocab, rc->logits + (size_t)i * hp->n_vocab, hp->n_vocab, &md, &range);
        double ratio = md / range;
        if (!(ratio <= worst)) worst = ratio;
        if (!(ratio <= frac)) {
            if (fails < 3) fprintf(stderr, "  %s: row %d max diff %.6g = %.4f%% of range %.4g (limit %.2f%%)\n",
                                   rc->name, i, md, 100 * ratio, range, 100 * frac);
            fails++;
        }
    }
    // Free-running greedy continuation from the prompt.
    model_ctx_reset(c);
    int32_t tok;
    r = model_eval(c, rc->prompt_tokens, rc->n_prompt, lg, false);
    int compared = 0;
    for (int i = 0; r == 0 && i < rc->n_greedy; i++) {
        const float *ref_row = rc->logits + (size_t)(rc->n_prompt - 1 + i) * hp->n_vocab;
        double md, range;
        ref_row_diff(ref_row, ref_row, hp->n_vocab, &md, &range);
        if (ref_row_gap(ref_row, hp->n_vocab) <= 2 * frac * range) break; // reference allows divergence from here
        tok = argmax(lg, hp->n_vocab);
        if (tok != rc->greedy[i]) {
            fprintf(stderr, "  %s: greedy step %d: token %d, reference %d\n", rc->name, i, tok, rc->greedy[i]);
            fails++;
            break;
        }
        compared++;
        r = model_eval(c, &tok, 1, lg, false);
    }
    printf("  %-36s %-6s isa=%-6s t=%d worst logit diff %.4f%% of range (limit %.2f%%), greedy %d/%d steps checked\n",
           rc->name, model_type_name(m), kern->isa, n_threads, 100 * worst, 100 * frac, compared, rc->n_greedy);
    if (worst_out) *worst_out = worst;
    free(seq);
    free(lg);
    model_ctx_destroy(&c);
    model_destroy(&m);
    return fails;
}

// --- tests

static void test_reference_cases(void) {
    char **names = NULL;
    int n = ref_list(&names);
    CU_ASSERT_FATAL(n >= 40); // shared/reference has 42 cases
    const kernels_t *best = kernels_best();
    for (int i = 0; i < n; i++) {
        ref_case_t rc;
        CU_ASSERT_EQUAL_FATAL(ref_load(names[i], &rc), 0);
        int f = check_case(&rc, best, 2, NULL);
        CU_ASSERT_EQUAL(f, 0);
        ref_free(&rc);
    }
    ref_names_free(names, n);
}

static void test_reference_cases_scalar(void) {
    // The scalar reference kernels alone must also reproduce llama.cpp (a subset: one per model file).
    char **names = NULL;
    int n = ref_list(&names);
    CU_ASSERT_FATAL(n > 0);
    const kernels_t *scalar = kernels_for_isa("scalar");
    CU_ASSERT_PTR_NOT_NULL_FATAL(scalar);
    for (int i = 0; i < n; i++) {
        size_t l = strlen(names[i]);
        if (l < 3 || strcmp(names[i] + l - 3, ".p0") != 0) continue;
        ref_case_t rc;
        CU_ASSERT_EQUAL_FATAL(ref_load(names[i], &rc), 0);
        struct stat st;
        if (TEST_SANITIZED && stat(rc.model_path, &st) == 0 && st.st_size > (5 << 20)) {
            // minutes each in a sanitizer build: the release stage runs them; the scalar kernels of
            // their types run under the sanitizers in the matmul suite
            printf("\n  %-36s scalar case left to the release build (sanitizers)", rc.name);
            ref_free(&rc);
            continue;
        }
        CU_ASSERT_EQUAL(check_case(&rc, scalar, 1, NULL), 0);
        ref_free(&rc);
    }
    ref_names_free(names, n);
}

static void test_threads_bit_identical(void) {
    // Row splits between threads must not change a single bit of the logits.
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load("synth-dense-Q4_K_M.p1", &rc), 0);
    char err[256];
    model_t *m = NULL;
    CU_ASSERT_EQUAL_FATAL(model_load(&m, rc.model_path, NULL, err, sizeof err), 0);
    const int nv = model_hparams(m)->n_vocab;
    float *a = malloc((size_t)rc.n_prompt * nv * sizeof(float));
    float *b = malloc((size_t)rc.n_prompt * nv * sizeof(float));
    for (int t = 1; t <= 3; t++) {
        model_ctx_t *c = NULL;
        model_ctx_opts_t co = {.n_ctx = 128, .n_batch = 7, .n_threads = t};
        CU_ASSERT_EQUAL_FATAL(model_ctx_new(&c, m, &co, err, sizeof err), 0);
        CU_ASSERT_EQUAL(model_eval(c, rc.prompt_tokens, rc.n_prompt, t == 1 ? a : b, true), 0);
        if (t > 1) CU_ASSERT_EQUAL(memcmp(a, b, (size_t)rc.n_prompt * nv * sizeof(float)), 0);
        model_ctx_destroy(&c);
    }
    free(a);
    free(b);
    model_destroy(&m);
    ref_free(&rc);
}

static void test_bad_inputs(void) {
    char err[512] = "";
    model_t *m = NULL;
    // A tokenizer-only GGUF has no weights: a clear error, not a crash.
    char path[1024];
    test_shared_path(path, sizeof path, "models/vocab/ggml-vocab-llama-spm.gguf");
    int rc = model_load(&m, path, NULL, err, sizeof err);
    CU_ASSERT(rc < 0);
    CU_ASSERT_PTR_NULL(m);
    CU_ASSERT(strstr(err, "token_embd.weight") != NULL || strstr(err, "architecture") != NULL);
    // Token ids out of range and cache overflow are refused.
    test_shared_path(path, sizeof path, "models/stories260K.gguf");
    CU_ASSERT_EQUAL_FATAL(model_load(&m, path, NULL, err, sizeof err), 0);
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = 4, .n_threads = 1};
    CU_ASSERT_EQUAL_FATAL(model_ctx_new(&c, m, &co, err, sizeof err), 0);
    int32_t bad[1] = {512};
    CU_ASSERT_EQUAL(model_eval(c, bad, 1, NULL, false), MLM_EINVAL);
    int32_t five[5] = {1, 2, 3, 4, 5};
    CU_ASSERT_EQUAL(model_eval(c, five, 5, NULL, false), MLM_ERANGE);
    CU_ASSERT_EQUAL(model_ctx_pos(c), 0);
    model_ctx_destroy(&c);
    model_ctx_destroy(&c);
    model_destroy(&m);
    model_destroy(&m);
}

int test_model_suite(void) {
    CU_pSuite s = CU_add_suite("model", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "every reference case, best kernels", test_reference_cases)) return -1;
    // With a table forced (tests/isa_test.sh) the scalar cases would only repeat the plain suite's run
    const char *isa = getenv("MESHLM_ISA");
    if ((!isa || !strcmp(isa, "scalar")) &&
        !CU_add_test(s, "reference p0 cases, scalar kernels", test_reference_cases_scalar))
        return -1;
    if (!CU_add_test(s, "thread count does not change logits", test_threads_bit_identical)) return -1;
    if (!CU_add_test(s, "bad model and inputs give errors", test_bad_inputs)) return -1;
    return 0;
}
