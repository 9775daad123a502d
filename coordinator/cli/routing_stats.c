// Routing statistics of a MoE model: a seeded token sequence decoded one token at a time, the routers'
// choices collected through model_load_opts_t.on_route.
#include "coordinator/cli/routing_stats.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "offload/expert_sim.h"
#include "worker/model/model.h"

// --- types

typedef struct {
    int n_layer, k;
    int tok;                   // the token being evaluated
    int *sel;                  // (n_tokens, n_layer, k) every token's choices per block
} trace_t;

// --- helpers

static void on_route(void *arg, int layer, const int *sel, int nt, int k) {
    trace_t *t = arg;
    if (nt != 1 || k != t->k) return;
    memcpy(t->sel + ((size_t)t->tok * t->n_layer + layer) * k, sel, (size_t)k * sizeof *sel);
}

static bool overlap(const int *a, const int *b, int k) {
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++)
            if (a[i] >= 0 && a[i] == b[j]) return true;
    return false;
}

static double choose(int n, int r) {
    if (r < 0 || r > n) return 0;
    double c = 1;
    for (int i = 1; i <= r; i++) c = c * (n - r + i) / i;
    return c;
}

// --- public API

int routing_stats_measure(const char *path, int n_tokens, int n_threads, routing_stats_t *out, char *err,
                          size_t errlen) {
    memset(out, 0, sizeof *out);
    trace_t t = {0};
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = false, .on_route = on_route, .on_route_arg = &t, .n_ctx = n_tokens + 8};
    int rc = model_load(&m, path, &lo, err, errlen);
    if (rc != 0) return rc;
    const model_hparams_t *hp = model_hparams(m);
    if (hp->n_expert <= 0) {
        model_destroy(&m);
        return mlm_fail(err, errlen, MLM_EINVAL, "%s is not a MoE model", path);
    }
    const int L = hp->n_layer, E = hp->n_expert, k = hp->n_expert_used, T = n_tokens;
    t.n_layer = L;
    t.k = k;
    t.sel = malloc((size_t)T * L * k * sizeof *t.sel);
    long *count = calloc((size_t)L * E, sizeof *count); // (L, E) top-k picks
    float *logits = malloc((size_t)hp->n_vocab * sizeof *logits);
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = T + 8, .n_batch = 1, .n_threads = n_threads};
    if (!t.sel || !count || !logits) rc = MLM_ENOMEM;
    if (rc == 0) rc = model_ctx_new(&c, m, &co, err, errlen);
    uint64_t seed = 0x5eed;
    for (int i = 0; rc == 0 && i < T; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        const int32_t tok = (int32_t)((seed >> 33) % (uint64_t)hp->n_vocab);
        t.tok = i;
        rc = model_eval(c, &tok, 1, logits, false);
    }
    if (rc == 0) {
        out->n_layer = L;
        out->n_expert = E;
        out->k = k;
        out->n_tokens = T;
        out->chance_top1 = 1.0 / E;
        out->chance_overlap = 1.0 - choose(E - k, k) / choose(E, k);
        const int at[3] = {0, L / 2, L - 1};
        for (int l = 0; l < L; l++) {
            long total = 0, mx = 0, mn = -1, m1 = 0, m2 = 0, same = 0, ov = 0;
            for (int i = 0; i < T; i++)
                for (int r = 0; r < k; r++) {
                    const int e = t.sel[((size_t)i * L + l) * k + r];
                    if (e >= 0) count[(size_t)l * E + e]++;
                }
            for (int e = 0; e < E; e++) {
                const long n = count[(size_t)l * E + e];
                total += n;
                if (n > mx) mx = n;
                if (mn < 0 || n < mn) mn = n;
                if (n > m1) {
                    m2 = m1;
                    m1 = n;
                } else if (n > m2) {
                    m2 = n;
                }
            }
            for (int i = 1; i < T; i++) {
                const int *a = t.sel + ((size_t)(i - 1) * L + l) * k, *b = t.sel + ((size_t)i * L + l) * k;
                same += a[0] == b[0];
                ov += overlap(a, b, k);
            }
            out->max_share += total ? (double)mx / total : 0;
            out->min_share += total ? (double)mn / total : 0;
            out->top2_share += total ? (double)(m1 + m2) / total : 0;
            const double ct = T > 1 ? (double)same / (T - 1) : 0, co2 = T > 1 ? (double)ov / (T - 1) : 0;
            out->cons_top1 += ct;
            out->cons_overlap += co2;
            for (int j = 0; j < 3; j++)
                if (at[j] == l) {
                    out->cons_top1_at[j] = ct;
                    out->cons_overlap_at[j] = co2;
                }
            if (l + 1 < L) {
                long s2 = 0, o2 = 0;
                for (int i = 0; i < T; i++) {
                    const int *a = t.sel + ((size_t)i * L + l) * k, *b = t.sel + ((size_t)i * L + l + 1) * k;
                    s2 += a[0] == b[0];
                    o2 += overlap(a, b, k);
                }
                out->adj_top1 += (double)s2 / T;
                out->adj_overlap += (double)o2 / T;
            }
        }
        out->max_share /= L;
        out->min_share /= L;
        out->top2_share /= L;
        out->cons_top1 /= L;
        out->cons_overlap /= L;
        if (L > 1) {
            out->adj_top1 /= L - 1;
            out->adj_overlap /= L - 1;
        }
    }
    const int n_cache = E - 1 < 4 * k ? E - 1 : 4 * k;
    if (rc == 0 && n_cache > 0 && !(out->cache = calloc((size_t)n_cache, sizeof *out->cache))) rc = MLM_ENOMEM;
    for (int n = 1; rc == 0 && n <= n_cache; n++) {
        exsim_result_t r[3];
        for (int p = EXSIM_LRU; rc == 0 && p <= EXSIM_OPT; p++) rc = exsim_replay(t.sel, T, L, k, E, n, p, &r[p]);
        if (rc == 0) {
            routing_cache_t *rc_n = &out->cache[out->n_cache++];
            rc_n->n = n;
            rc_n->lru = r[EXSIM_LRU].uses ? (double)r[EXSIM_LRU].hits / r[EXSIM_LRU].uses : 0;
            rc_n->lfu = r[EXSIM_LFU].uses ? (double)r[EXSIM_LFU].hits / r[EXSIM_LFU].uses : 0;
            rc_n->opt = r[EXSIM_OPT].uses ? (double)r[EXSIM_OPT].hits / r[EXSIM_OPT].uses : 0;
        }
    }
    if (rc != 0) {
        free(out->cache);
        out->cache = NULL;
        out->n_cache = 0;
    }
    model_ctx_destroy(&c);
    model_destroy(&m);
    free(t.sel);
    if (rc == 0) out->count = count;
    else free(count);
    free(logits);
    return rc;
}

int routing_stats_write(const routing_stats_t *s, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "w");
    if (!f) return mlm_fail(err, errlen, MLM_EIO, "%s: cannot create: %s", path, strerror(errno));
    fprintf(f, "# meshlm routing counts: the router's picks of each expert per block over %d tokens\n", s->n_tokens);
    fprintf(f, "layers %d experts %d top_k %d tokens %d\n", s->n_layer, s->n_expert, s->k, s->n_tokens);
    for (int l = 0; l < s->n_layer; l++) {
        fprintf(f, "%d:", l);
        for (int e = 0; e < s->n_expert; e++) fprintf(f, " %ld", s->count ? s->count[(size_t)l * s->n_expert + e] : 0L);
        fprintf(f, "\n");
    }
    const bool bad = ferror(f) != 0;
    if (fclose(f) != 0 || bad) return mlm_fail(err, errlen, MLM_EIO, "%s: write failed: %s", path, strerror(errno));
    return 0;
}

void routing_stats_free(routing_stats_t *s) {
    if (!s) return;
    free(s->count);
    s->count = NULL;
    free(s->cache);
    s->cache = NULL;
    s->n_cache = 0;
}

void routing_stats_print(const routing_stats_t *s, FILE *f) {
    fprintf(f, "routing over %d tokens (%d blocks, %d experts, top-%d):\n", s->n_tokens, s->n_layer, s->n_expert, s->k);
    fprintf(f, "  expert popularity per block: most chosen %.1f%%, least %.1f%%, top two %.1f%% of picks (uniform %.1f%%)\n",
            100 * s->max_share, 100 * s->min_share, 100 * s->top2_share, 100.0 / s->n_expert);
    fprintf(f, "  consecutive tokens, same top-1: %.1f%% (first/middle/last block %.1f/%.1f/%.1f%%; chance %.1f%%; "
               "Mixtral 8x7B ~14/27/22%%)\n",
            100 * s->cons_top1, 100 * s->cons_top1_at[0], 100 * s->cons_top1_at[1], 100 * s->cons_top1_at[2],
            100 * s->chance_top1);
    fprintf(f, "  consecutive tokens, top-%d sets overlap: %.1f%% (%.1f/%.1f/%.1f%%; chance %.1f%%; Mixtral ~46/62/52%%)\n",
            s->k, 100 * s->cons_overlap, 100 * s->cons_overlap_at[0], 100 * s->cons_overlap_at[1],
            100 * s->cons_overlap_at[2], 100 * s->chance_overlap);
    fprintf(f, "  adjacent blocks, same token: same top-1 %.1f%%, top-%d sets overlap %.1f%%\n", 100 * s->adj_top1, s->k,
            100 * s->adj_overlap);
    if (s->n_cache == 0) return;
    fprintf(f, "expert cache hit rates on these tokens (--expert-cache N; optimal: Belady's, which knows every\n"
               "future pick, the most any policy can hit; where reading experts is the bottleneck a cache makes a\n"
               "token at most 1 / (1 - hit rate) times faster than no cache):\n");
    fprintf(f, "  %9s %7s %7s %8s %19s\n", "per block", "LRU", "LFU", "optimal", "bound (optimal)");
    for (int i = 0; i < s->n_cache; i++) {
        const routing_cache_t *c = &s->cache[i];
        fprintf(f, "  %9d %6.1f%% %6.1f%% %7.1f%% %18.2fx\n", c->n, 100 * c->lru, 100 * c->lfu, 100 * c->opt,
                c->opt < 1 ? 1 / (1 - c->opt) : 0.0);
    }
}
