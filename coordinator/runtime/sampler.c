// Token sampler: penalty -> top-k (heap select) -> top-p -> min-p -> temperature -> xoshiro256** draw.
#include "coordinator/runtime/sampler.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

// --- types

struct sampler {
    sampler_params_t p;   // parameters as given to sampler_new
    int n_vocab;          // vocabulary size
    float *work;          // (n_vocab) logits after sanitising and the repetition penalty
    int32_t *cand;        // (n_vocab) candidate token ids, best first once sorted
    double *prob;         // (n_vocab) unnormalised probabilities of the final candidates
    uint8_t *mark;        // (n_vocab) 1 while a token's penalty has been applied this step
    int32_t *hist;        // (hist_cap) ring buffer of accepted tokens
    int hist_cap;         // repeat_last_n, at least 1
    int hist_len;         // tokens in the ring (<= hist_cap)
    int hist_head;        // next write position
    uint64_t rng[4];      // xoshiro256** state
};

// --- helpers: PRNG

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    uint64_t r = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return r;
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&x);
}

// Uniform double in [0, 1).
static double rng_uniform(uint64_t s[4]) { return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53; }

// --- helpers: ordering

// True if token a ranks before token b: higher logit, then lower id.
static inline int better(const float *w, int32_t a, int32_t b) {
    return w[a] > w[b] || (w[a] == w[b] && a < b);
}

// Restores the heap property below node i of a heap whose root is its worst element.
static void heap_sift_down(const float *w, int32_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && better(w, h[m], h[l])) m = l;
        if (r < n && better(w, h[m], h[r])) m = r;
        if (m == i) return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

// Sorts ids best first (merge sort, insertion sort below 24; tmp holds n ids). n is top_k or the
// min-p survivors, so this is short in practice; with neither filter it is O(n log n) once.
static void sort_merge(const float *w, int32_t *c, int32_t *tmp, int n) {
    if (n < 24) {
        for (int i = 1; i < n; i++) {
            int32_t x = c[i];
            int j = i - 1;
            while (j >= 0 && better(w, x, c[j])) {
                c[j + 1] = c[j];
                j--;
            }
            c[j + 1] = x;
        }
        return;
    }
    int h = n / 2;
    sort_merge(w, c, tmp, h);
    sort_merge(w, c + h, tmp, n - h);
    int i = 0, j = h, k = 0;
    while (i < h && j < n) tmp[k++] = better(w, c[j], c[i]) ? c[j++] : c[i++];
    while (i < h) tmp[k++] = c[i++];
    while (j < n) tmp[k++] = c[j++];
    memcpy(c, tmp, (size_t)n * sizeof *c);
}

// --- helpers: steps

static void apply_penalty(sampler_t *s) {
    float pen = s->p.repeat_penalty;
    if (pen == 1.0f || pen <= 0.0f || s->p.repeat_last_n <= 0 || s->hist_len == 0) return;
    for (int i = 0; i < s->hist_len; i++) {
        int32_t t = s->hist[i];
        if (s->mark[t]) continue;
        s->mark[t] = 1;
        float *l = &s->work[t];
        if (*l > 0) *l /= pen;
        else *l *= pen;
    }
    for (int i = 0; i < s->hist_len; i++) s->mark[s->hist[i]] = 0;
}

static int32_t argmax(const float *w, int n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (w[i] > w[best]) best = i;
    return best;
}

// Keeps the k best ids of all n in cand[0..k), unsorted. O(n log k).
static void select_top_k(const float *w, int32_t *cand, int n, int k) {
    for (int32_t i = 0; i < k; i++) cand[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--) heap_sift_down(w, cand, k, i);
    for (int32_t i = k; i < n; i++) {
        if (!better(w, i, cand[0])) continue;
        cand[0] = i;
        heap_sift_down(w, cand, k, 0);
    }
}

// --- public API

sampler_params_t sampler_params_default(void) {
    sampler_params_t p = {
        .temp = 0.8f,
        .top_k = 40,
        .top_p = 0.95f,
        .min_p = 0.05f,
        .repeat_penalty = 1.0f,
        .repeat_last_n = 64,
        .seed = SAMPLER_DEFAULT_SEED,
        .greedy = false,
    };
    return p;
}

sampler_t *sampler_new(const sampler_params_t *p, int n_vocab) {
    if (!p || n_vocab <= 0) return NULL;
    if (isnan(p->temp) || isnan(p->top_p) || isnan(p->min_p) || isnan(p->repeat_penalty)) return NULL;
    sampler_t *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->hist_cap = p->repeat_last_n > 0 ? p->repeat_last_n : 1;
    s->work = malloc((size_t)n_vocab * sizeof *s->work);
    s->cand = malloc((size_t)n_vocab * 2 * sizeof *s->cand); // second half: merge scratch
    s->prob = malloc((size_t)n_vocab * sizeof *s->prob);
    s->mark = calloc((size_t)n_vocab, 1);
    s->hist = calloc((size_t)s->hist_cap, sizeof *s->hist);
    if (!s->work || !s->cand || !s->prob || !s->mark || !s->hist) {
        sampler_destroy(&s);
        return NULL;
    }
    rng_seed(s->rng, p->seed);
    return s;
}

void sampler_destroy(sampler_t **self_p) {
    if (!self_p || !*self_p) return;
    sampler_t *s = *self_p;
    free(s->work);
    free(s->cand);
    free(s->prob);
    free(s->mark);
    free(s->hist);
    free(s);
    *self_p = NULL;
}

void sampler_accept(sampler_t *s, int32_t tok) {
    if (!s || tok < 0 || tok >= s->n_vocab) return;
    s->hist[s->hist_head] = tok;
    s->hist_head = (s->hist_head + 1) % s->hist_cap;
    if (s->hist_len < s->hist_cap) s->hist_len++;
}

void sampler_reset(sampler_t *s) {
    if (!s) return;
    s->hist_len = 0;
    s->hist_head = 0;
    rng_seed(s->rng, s->p.seed);
}

int32_t sampler_sample(sampler_t *s, const float *logits) {
    if (!s || !logits) return MLM_EINVAL;
    const int n = s->n_vocab;
    float *w = s->work;
    for (int i = 0; i < n; i++) {
        float l = logits[i];
        if (isnan(l)) l = -INFINITY;
        else if (l > FLT_MAX) l = FLT_MAX;
        w[i] = l;
    }
    apply_penalty(s);
    if (s->p.greedy || !(s->p.temp > 0.0f)) return argmax(w, n);

    // top-k: the candidate set is a best-first prefix from here on
    int32_t *c = s->cand;
    int32_t *scratch = s->cand + n;
    int k = (s->p.top_k > 0 && s->p.top_k < n) ? s->p.top_k : n;
    if (k < n) {
        select_top_k(w, c, n, k);
    } else {
        for (int32_t i = 0; i < n; i++) c[i] = i;
    }
    float maxl = w[argmax(w, n)];
    if (maxl == -INFINITY) return argmax(w, n);

    // softmax normaliser over the top-k set (temperature comes last, as in llama.cpp's chain)
    double sum = 0.0;
    for (int i = 0; i < k; i++) sum += exp((double)w[c[i]] - (double)maxl);

    // min-p keeps p_i >= min_p * p_max, i.e. logit >= max + log(min_p); renormalising after top-p
    // does not change that ratio, so it can filter before sorting. top-p and min-p each keep a
    // best-first prefix, so the result is the shorter of the two.
    int m = k;
    if (s->p.min_p > 0.0f && s->p.min_p <= 1.0f) {
        double thr = (double)maxl + log((double)s->p.min_p);
        m = 0;
        for (int i = 0; i < k; i++)
            if ((double)w[c[i]] >= thr) c[m++] = c[i];
        if (m == 0) c[m++] = argmax(w, n); // unreachable in exact arithmetic; keep one token
    }
    sort_merge(w, c, scratch, m);
    if (s->p.top_p < 1.0f) {
        double target = (double)s->p.top_p * sum, cum = 0.0;
        int keep = m;
        for (int i = 0; i < m; i++) {
            cum += exp((double)w[c[i]] - (double)maxl);
            if (cum >= target) {
                keep = i + 1;
                break;
            }
        }
        m = keep < 1 ? 1 : keep;
    }

    // temperature, then draw
    double inv_t = 1.0 / (double)s->p.temp, tot = 0.0;
    for (int i = 0; i < m; i++) {
        s->prob[i] = exp(((double)w[c[i]] - (double)maxl) * inv_t);
        tot += s->prob[i];
    }
    double u = rng_uniform(s->rng) * tot, acc = 0.0;
    for (int i = 0; i < m; i++) {
        acc += s->prob[i];
        if (u < acc) return c[i];
    }
    return c[m - 1];
}
