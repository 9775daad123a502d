// CUnit suite "replay": decode steps replayed as one chunk in one-token order (model_ctx_set_one_order)
// give every logit row and the cache the bits of the single-token steps, on every weight type.
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "core/err.h"
#include "ref_cases.h"
#include "worker/model/model.h"

// --- helpers

#define N_STEPS 8 // decode steps replayed

typedef struct {
    int rows_differing;  // logit rows of the chunk differing from the single steps'
    int after_differing; // the decode step after the chunk differs (the caches differ)
} replay_diff_t;

// Runs the case's prompt as one chunk, then its first N_STEPS greedy tokens one step each and one more
// step, and again with those N_STEPS tokens as one chunk (in one-token order when one_order) and the
// same last step; counts the rows that differ. 0, or -1 when the case or model cannot be loaded.
static int replay_case(const char *name, bool one_order, replay_diff_t *d) {
    memset(d, 0, sizeof *d);
    ref_case_t rc;
    if (ref_load(name, &rc) != 0) return -1;
    char err[256];
    model_t *m = NULL;
    if (rc.n_greedy < N_STEPS + 1 || model_load(&m, rc.model_path, NULL, err, sizeof err) != 0) {
        ref_free(&rc);
        return -1;
    }
    const int nv = model_hparams(m)->n_vocab;
    float *one = malloc((size_t)(N_STEPS + 1) * nv * sizeof(float));   // (N_STEPS + 1, nv) single steps
    float *chunk = malloc((size_t)(N_STEPS + 1) * nv * sizeof(float)); // (N_STEPS + 1, nv) the chunk, then the step
    model_ctx_opts_t co = {.n_ctx = rc.n_prompt + N_STEPS + 8, .n_threads = 1};
    model_ctx_t *a = NULL, *b = NULL;
    int rcode = -1;
    if (one && chunk && model_ctx_new(&a, m, &co, err, sizeof err) == 0 &&
        model_ctx_new(&b, m, &co, err, sizeof err) == 0) {
        int r = model_eval(a, rc.prompt_tokens, rc.n_prompt, one, false);
        for (int i = 0; r == 0 && i <= N_STEPS; i++) r = model_eval(a, &rc.greedy[i], 1, one + (size_t)i * nv, false);
        if (r == 0) r = model_eval(b, rc.prompt_tokens, rc.n_prompt, chunk, false);
        model_ctx_set_one_order(b, one_order);
        if (r == 0) r = model_eval(b, rc.greedy, N_STEPS, chunk, true);
        model_ctx_set_one_order(b, false);
        if (r == 0) r = model_eval(b, &rc.greedy[N_STEPS], 1, chunk + (size_t)N_STEPS * nv, false);
        if (r == 0) {
            for (int i = 0; i < N_STEPS; i++)
                d->rows_differing += memcmp(one + (size_t)i * nv, chunk + (size_t)i * nv, (size_t)nv * sizeof(float)) != 0;
            d->after_differing =
                memcmp(one + (size_t)N_STEPS * nv, chunk + (size_t)N_STEPS * nv, (size_t)nv * sizeof(float)) != 0;
            rcode = 0;
        }
    }
    model_ctx_destroy(&a);
    model_ctx_destroy(&b);
    model_destroy(&m);
    free(one);
    free(chunk);
    ref_free(&rc);
    return rcode;
}

// --- tests

// F32, F16, Q8_0, Q4_0, K-quants, dense and MoE: the chunk in one-token order equals the single steps
// bit for bit, and so does the step after it.
static void test_one_order_equals_steps(void) {
    static const char *const cases[] = {"stories260K.p0",         "stories260K-F16.p0",        "stories260K-Q8_0.p0",
                                        "stories260K-Q4_0.p0",    "synth-dense-Q4_K_M.p0",     "synth-dense-Q6_K.p0",
                                        "synth-dense-F16.p0",     "synth-moe-Q8_0.p0",         "synth-moe-Q4_0.p0",
                                        "synth-moe-F16.p0",       "llama-2-tiny-random.p0"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        replay_diff_t d;
        const int rc = replay_case(cases[i], true, &d);
        CU_ASSERT_EQUAL(rc, 0);
        CU_ASSERT_EQUAL(d.rows_differing, 0);
        CU_ASSERT_EQUAL(d.after_differing, 0);
        if (rc != 0 || d.rows_differing || d.after_differing)
            fprintf(stderr, "\n  %s: rc %d, %d of %d chunk rows and %d after differ\n", cases[i], rc, d.rows_differing,
                    N_STEPS, d.after_differing);
    }
}

// The control: the same chunk as a plain batch sums in the batch's order (F32 and F16 products,
// attention), and its rows differ from the single steps' (which is why a replay needs the one-token order).
static void test_batch_order_differs(void) {
    static const char *const cases[] = {"stories260K.p0", "stories260K-F16.p0", "synth-dense-Q4_K_M.p0"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        replay_diff_t d;
        CU_ASSERT_EQUAL(replay_case(cases[i], false, &d), 0);
        CU_ASSERT(d.rows_differing > 0);
    }
}

int test_replay_suite(void) {
    CU_pSuite s = CU_add_suite("replay", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "a chunk in one-token order gives the single steps' bits", test_one_order_equals_steps) ||
        !CU_add_test(s, "a plain batch of the same tokens does not", test_batch_order_differs))
        return -1;
    return 0;
}
