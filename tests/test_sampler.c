// CUnit suite "sampler": argmax and ties, top-k/top-p/min-p candidate sets, penalty, seeding.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/runtime/sampler.h"
#include "core/err.h"

// --- helpers

// Hand-made 8-token distribution; logits are log-probabilities.
static const double base_p[8] = {0.40, 0.20, 0.15, 0.10, 0.08, 0.04, 0.02, 0.01};

static void base_logits(float *l) {
    for (int i = 0; i < 8; i++) l[i] = (float)log(base_p[i]);
}

static sampler_params_t plain_params(void) {
    sampler_params_t p = sampler_params_default();
    p.temp = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    return p;
}

// Samples n_seeds * per_seed times and counts tokens; returns 0 if every token was in [0, 8).
static int draw_counts(sampler_params_t p, int n_seeds, int per_seed, long *counts) {
    float l[8];
    base_logits(l);
    memset(counts, 0, 8 * sizeof *counts);
    for (int s = 0; s < n_seeds; s++) {
        p.seed = 1000 + (uint64_t)s * 7919;
        sampler_t *sm = sampler_new(&p, 8);
        if (!sm) return -1;
        for (int i = 0; i < per_seed; i++) {
            int32_t t = sampler_sample(sm, l);
            if (t < 0 || t >= 8) {
                sampler_destroy(&sm);
                return -1;
            }
            counts[t]++;
        }
        sampler_destroy(&sm);
    }
    return 0;
}

// Asserts that only tokens with want[t] > 0 appear, and that frequencies match want (normalised)
// within a loose chi-square bound.
static void check_dist(const long *counts, const double *want, long total) {
    double wsum = 0;
    for (int t = 0; t < 8; t++) wsum += want[t];
    double chi2 = 0;
    int df = -1;
    for (int t = 0; t < 8; t++) {
        if (want[t] <= 0) {
            CU_ASSERT_EQUAL(counts[t], 0);
            continue;
        }
        CU_ASSERT(counts[t] > 0);
        double e = want[t] / wsum * (double)total;
        chi2 += (counts[t] - e) * (counts[t] - e) / e;
        df++;
    }
    // df <= 7: p < 1e-4 needs chi2 > ~30; use 40 so the seeded test is not flaky by construction
    CU_ASSERT(chi2 < 40.0);
}

static uint64_t test_rng(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void random_logits(float *l, int n, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < n; i++) l[i] = (float)((double)(test_rng(&x) >> 11) * 0x1.0p-53 * 8.0 - 4.0);
}

// --- tests

static void test_argmax_and_ties(void) {
    sampler_params_t p = sampler_params_default();
    p.greedy = true;
    sampler_t *s = sampler_new(&p, 6);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    float l[6] = {0.1f, 3.0f, -2.0f, 2.5f, 3.0f, 1.0f};
    CU_ASSERT_EQUAL(sampler_sample(s, l), 1); // tie 1 vs 4: lowest id
    float m[6] = {-5, -4, -3, -2, -1, -0.5f};
    CU_ASSERT_EQUAL(sampler_sample(s, m), 5);
    float nan_first[6] = {NAN, 1.0f, 2.0f, NAN, 0.0f, 2.0f};
    CU_ASSERT_EQUAL(sampler_sample(s, nan_first), 2);
    CU_ASSERT_EQUAL(sampler_sample(s, NULL), MLM_EINVAL);
    CU_ASSERT_EQUAL(sampler_sample(NULL, l), MLM_EINVAL);
    sampler_destroy(&s);
    CU_ASSERT_PTR_NULL(s);
    sampler_destroy(&s);
    sampler_destroy(NULL);

    // temp <= 0 is greedy too
    p = sampler_params_default();
    p.temp = 0.0f;
    s = sampler_new(&p, 6);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    for (int i = 0; i < 10; i++) CU_ASSERT_EQUAL(sampler_sample(s, l), 1);
    sampler_destroy(&s);

    CU_ASSERT_PTR_NULL(sampler_new(&p, 0));
    CU_ASSERT_PTR_NULL(sampler_new(NULL, 10));
}

static void test_top_k1_is_greedy(void) {
    enum { N = 32000 };
    float *l = malloc(N * sizeof *l);
    CU_ASSERT_PTR_NOT_NULL_FATAL(l);
    sampler_params_t pk = sampler_params_default();
    pk.top_k = 1;
    pk.temp = 1.5f;
    sampler_params_t pg = sampler_params_default();
    pg.greedy = true;
    sampler_t *sk = sampler_new(&pk, N), *sg = sampler_new(&pg, N);
    CU_ASSERT_PTR_NOT_NULL_FATAL(sk);
    CU_ASSERT_PTR_NOT_NULL_FATAL(sg);
    for (int r = 0; r < 20; r++) {
        random_logits(l, N, 77 + r);
        if (r % 2) l[N - 3] = l[N - 10] = 10.0f; // a tie at the top: both must take the lower id
        int32_t a = sampler_sample(sk, l), b = sampler_sample(sg, l);
        CU_ASSERT_EQUAL(a, b);
        if (r % 2) CU_ASSERT_EQUAL(a, N - 10);
    }
    sampler_destroy(&sk);
    sampler_destroy(&sg);
    free(l);
}

static void test_top_k_set(void) {
    sampler_params_t p = plain_params();
    p.top_k = 3;
    long c[8];
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 20, 1000, c), 0);
    double want[8] = {0.40, 0.20, 0.15, 0, 0, 0, 0, 0};
    check_dist(c, want, 20000);
}

static void test_top_p_set(void) {
    sampler_params_t p = plain_params();
    p.top_p = 0.7f; // cumulative .40 .60 .75: keeps 3
    long c[8];
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 20, 1000, c), 0);
    double want[8] = {0.40, 0.20, 0.15, 0, 0, 0, 0, 0};
    check_dist(c, want, 20000);

    p.top_p = 0.9f; // .40 .60 .75 .85 .93: keeps 5
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 20, 1000, c), 0);
    double want5[8] = {0.40, 0.20, 0.15, 0.10, 0.08, 0, 0, 0};
    check_dist(c, want5, 20000);
}

static void test_min_p_set(void) {
    sampler_params_t p = plain_params();
    p.min_p = 0.19f; // threshold 0.076: keeps .40 .20 .15 .10 .08
    long c[8];
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 20, 1000, c), 0);
    double want[8] = {0.40, 0.20, 0.15, 0.10, 0.08, 0, 0, 0};
    check_dist(c, want, 20000);

    // top-p 0.9 keeps 5, min-p 0.3 (threshold .12) keeps 3: the chain keeps 3
    p.top_p = 0.9f;
    p.min_p = 0.3f;
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 20, 1000, c), 0);
    double want3[8] = {0.40, 0.20, 0.15, 0, 0, 0, 0, 0};
    check_dist(c, want3, 20000);
}

static void test_temperature(void) {
    sampler_params_t p = plain_params();
    p.top_k = 3;
    p.temp = 0.5f; // p^2: .16 .04 .0225
    long c[8];
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 20, 1000, c), 0);
    double want[8] = {0.16, 0.04, 0.0225, 0, 0, 0, 0, 0};
    check_dist(c, want, 20000);

    // no filters at all: the full distribution
    p = plain_params();
    CU_ASSERT_EQUAL_FATAL(draw_counts(p, 40, 1000, c), 0);
    check_dist(c, base_p, 40000);
}

static void test_repeat_penalty(void) {
    sampler_params_t p = sampler_params_default();
    p.greedy = true;
    p.repeat_penalty = 1.5f;
    p.repeat_last_n = 2;
    sampler_t *s = sampler_new(&p, 5);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    float pos[5] = {2.0f, 1.9f, 0.0f, -1.0f, -3.0f};
    CU_ASSERT_EQUAL(sampler_sample(s, pos), 0);
    sampler_accept(s, 0); // 2.0 / 1.5 = 1.33 < 1.9
    CU_ASSERT_EQUAL(sampler_sample(s, pos), 1);
    CU_ASSERT_EQUAL(pos[0], 2.0f); // logits untouched
    sampler_accept(s, 3);
    sampler_accept(s, 4); // token 0 left the window of 2
    CU_ASSERT_EQUAL(sampler_sample(s, pos), 0);

    float neg[5] = {-1.0f, -1.2f, -5.0f, -6.0f, -7.0f};
    sampler_reset(s);
    CU_ASSERT_EQUAL(sampler_sample(s, neg), 0);
    sampler_accept(s, 0); // -1.0 * 1.5 = -1.5 < -1.2
    CU_ASSERT_EQUAL(sampler_sample(s, neg), 1);
    sampler_reset(s);
    CU_ASSERT_EQUAL(sampler_sample(s, neg), 0);
    sampler_destroy(&s);

    // a token repeated in the window is penalised once, not once per occurrence
    p.repeat_penalty = 1.2f;
    p.repeat_last_n = 8;
    s = sampler_new(&p, 5);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    float twice[5] = {2.0f, 1.5f, 0, 0, 0}; // 2/1.2 = 1.67 > 1.5; 2/1.44 = 1.39 < 1.5
    sampler_accept(s, 0);
    sampler_accept(s, 0);
    CU_ASSERT_EQUAL(sampler_sample(s, twice), 0);
    sampler_destroy(&s);
}

static void run_seq(uint64_t seed, int32_t *out, int n) {
    enum { V = 32000 };
    float *l = malloc(V * sizeof *l);
    sampler_params_t p = sampler_params_default();
    p.seed = seed;
    p.top_k = 200;
    p.top_p = 0.99f;
    p.min_p = 0.0f;
    p.temp = 1.0f;
    p.repeat_penalty = 1.1f;
    sampler_t *s = sampler_new(&p, V);
    if (!s || !l) {
        for (int i = 0; i < n; i++) out[i] = -1;
    } else {
        for (int i = 0; i < n; i++) {
            random_logits(l, V, 1234 + (uint64_t)i);
            out[i] = sampler_sample(s, l);
            sampler_accept(s, out[i]);
        }
    }
    sampler_destroy(&s);
    free(l);
}

static void test_seeding(void) {
    enum { N = 100 };
    int32_t a[N], b[N], c[N];
    run_seq(42, a, N);
    run_seq(42, b, N);
    run_seq(43, c, N);
    CU_ASSERT(a[0] >= 0);
    CU_ASSERT_EQUAL(memcmp(a, b, sizeof a), 0);
    int diff = 0;
    for (int i = 0; i < N; i++) diff += a[i] != c[i];
    CU_ASSERT(diff > N / 2);

    // reset replays the same draws
    sampler_params_t p = plain_params();
    p.seed = 9;
    sampler_t *s = sampler_new(&p, 8);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    float l[8];
    base_logits(l);
    int32_t first[50];
    for (int i = 0; i < 50; i++) first[i] = sampler_sample(s, l);
    sampler_reset(s);
    for (int i = 0; i < 50; i++) CU_ASSERT_EQUAL(sampler_sample(s, l), first[i]);
    sampler_destroy(&s);
}

static void test_speed_32k(void) {
    enum { V = 32000, ITERS = 300 };
    float *l = malloc(V * sizeof *l);
    CU_ASSERT_PTR_NOT_NULL_FATAL(l);
    random_logits(l, V, 5);
    sampler_params_t p = sampler_params_default();
    sampler_t *s = sampler_new(&p, V);
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long sum = 0;
    for (int i = 0; i < ITERS; i++) {
        l[i] += 0.5f;
        int32_t t = sampler_sample(s, l);
        CU_ASSERT(t >= 0 && t < V);
        sum += t;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = ((t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6) / ITERS;
    CU_ASSERT(ms < 5.0); // ~0.1 ms optimised; generous for sanitizer builds
    CU_ASSERT(sum > 0);
    sampler_destroy(&s);
    free(l);
}

// --- suite

int test_sampler_suite(void) {
    CU_pSuite s = CU_add_suite("sampler", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "argmax and ties", test_argmax_and_ties) ||
        !CU_add_test(s, "top-k 1 equals greedy", test_top_k1_is_greedy) ||
        !CU_add_test(s, "top-k candidate set", test_top_k_set) ||
        !CU_add_test(s, "top-p candidate set", test_top_p_set) ||
        !CU_add_test(s, "min-p candidate set", test_min_p_set) ||
        !CU_add_test(s, "temperature", test_temperature) ||
        !CU_add_test(s, "repetition penalty", test_repeat_penalty) ||
        !CU_add_test(s, "seeding", test_seeding) ||
        !CU_add_test(s, "speed on 32k vocab", test_speed_32k))
        return -1;
    return 0;
}
