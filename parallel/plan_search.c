// Layout search: which nodes compute, how many pipeline stages, which nodes form each stage, chosen by predicted cost.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_impl.h"
#include "core/err.h"

// --- types

// A layout before it is sized: the nodes that compute and how they are cut into stages.
typedef struct {
    int m;                          // nodes used
    int idx[PLAN_MAX_NODES];        // (m) their offered indices, increasing
    int n_stages;
    int first[PLAN_MAX_NODES + 1];  // stage k is idx[first[k] .. first[k+1])
} layout_t;

// A sized and predicted layout.
typedef struct {
    bool valid;
    layout_t lay;
    plan_tp_mode_t mode;            // its tensor-parallel mode (EXACT or ALLREDUCE)
    plan_cost_t cost;
    char name[48];                  // plan_t.layout
} cand_t;

#define MAX_KEPT 1024  // distinct layout names remembered for alternatives

typedef struct {
    const plan_model_t *pm;
    const plan_node_t *nodes;       // (n) offered, borrowed
    int n;
    plan_opts_t o;
    double rate[PLAN_MAX_NODES];    // (n) decode throughput, weights/s
    plan_t *scratch;                // sized here, owned
    cand_t best;
    cand_t *kept;                   // (MAX_KEPT) the best plan of each layout name, owned
    int n_kept;
    plan_short_t closest;           // the failed layout that missed least
    double closest_miss;            // its missing bytes (< 0: none failed yet)
    char closest_name[48];
    long evals;
} search_t;

// --- helpers: sizing a layout

// Integer blocks per stage, >= 1 and <= cap[k] each, summing to total, in proportion to w.
static bool alloc_layers(int total, const double *w, const int *cap, int S, int *L) {
    double capd[PLAN_MAX_NODES] = {0}, x[PLAN_MAX_NODES], sum = 0;
    for (int k = 0; k < S; k++) {
        if (cap[k] < 1) return false;
        capd[k] = cap[k];
        sum += cap[k];
    }
    if (sum < total) return false;
    bool bound;
    plan_waterfill(total, w, capd, S, x, &bound); // continuous: x[k] = min(cap[k], lambda * w[k])
    int given = 0;
    for (int k = 0; k < S; k++) {
        L[k] = (int)floor(x[k] + 1e-9);
        if (L[k] < 1) L[k] = 1;
        if (L[k] > cap[k]) L[k] = cap[k];
        given += L[k];
    }
    while (given < total) {
        int best = -1;
        for (int k = 0; k < S; k++)
            if (L[k] < cap[k] && (best < 0 || x[k] - L[k] > x[best] - L[best])) best = k;
        if (best < 0) return false;
        L[best]++;
        given++;
    }
    while (given > total) {
        int best = -1;
        for (int k = 0; k < S; k++)
            if (L[k] > 1 && (best < 0 || x[k] - L[k] < x[best] - L[best])) best = k;
        if (best < 0) return false;
        L[best]--;
        given--;
    }
    return true;
}

// Blocks a stage is tried with when its capacity is measured: the first stage starts at 0, the
// last ends at n_layer, a middle one sits just after block 0.
static void probe_range(int k, int S, int n_layer, int L, int *l0, int *l1) {
    if (S == 1) *l0 = 0, *l1 = n_layer;
    else if (k == 0) *l0 = 0, *l1 = L;
    else if (k == S - 1) *l0 = n_layer - L, *l1 = n_layer;
    else *l0 = 1, *l1 = 1 + L;
}

// The most blocks stage k holds within its members' budgets (0: not even one), resident or streaming.
static int stage_cap(const plan_model_t *pm, plan_t *p, int k, const double *w, bool stream) {
    const int S = p->n_stages, a = p->stage_first[k], b = p->stage_first[k + 1];
    const int maxL = S == 1 ? pm->n_layer : pm->n_layer - (S - 1);
    int l0, l1;
    probe_range(k, S, pm->n_layer, maxL, &l0, &l1);
    const unsigned fl = PLAN_FIT_ADJUST | (stream ? PLAN_FIT_STREAM : 0); // capacity only: no balancing
    if (plan_fit_stage(pm, p, a, b, l0, l1, w + a, fl, NULL) == 0) return maxL;
    if (S == 1) return 0;
    probe_range(k, S, pm->n_layer, 1, &l0, &l1);
    if (plan_fit_stage(pm, p, a, b, l0, l1, w + a, fl, NULL) != 0) return 0;
    int lo = 1, hi = maxL; // lo fits, hi does not
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        probe_range(k, S, pm->n_layer, mid, &l0, &l1);
        if (plan_fit_stage(pm, p, a, b, l0, l1, w + a, fl, NULL) == 0) lo = mid;
        else hi = mid;
    }
    return lo;
}

static unsigned fit_flags(bool stream) { return PLAN_FIT_ADJUST | (stream ? PLAN_FIT_STREAM | PLAN_FIT_BALANCE : 0); }

// Fits every stage of p with L[k] blocks; failed[k] (may be NULL) says which did not fit. True when all fit.
static bool fit_all(const plan_model_t *pm, plan_t *p, const double *w, const int *L, bool stream, bool *failed) {
    bool ok = true;
    for (int k = 0, l = 0; k < p->n_stages; l += L[k], k++) {
        const bool bad = plan_fit_stage(pm, p, p->stage_first[k], p->stage_first[k + 1], l, l + L[k],
                                        w + p->stage_first[k], fit_flags(stream), NULL) != 0;
        if (failed) failed[k] = bad;
        ok &= !bad;
    }
    return ok;
}

// Blocks per stage (x, summing to n_layer, within cap) that give the stages equal predicted times
// by the scaled model of their members' current slices. False when none is found.
static bool equal_time_blocks(const plan_model_t *pm, const plan_t *p, const int *cap, double *x) {
    const int S = p->n_stages;
    plan_scale_t *m = malloc(sizeof *m * (size_t)p->n); // (n) each shard's model, x = its stage's blocks
    if (!m) return false;
    double hi = 0, sum = 0;
    for (int k = 0; k < S; k++)
        for (int i = p->stage_first[k]; i < p->stage_first[k + 1]; i++) {
            plan_scale_of(pm, p, p->stage_first[k], i, true, &m[i]);
            hi = fmax(hi, p->shard[i].busy_ms);
        }
    // The blocks stage k takes within t ms: as many as its slowest member manages.
    double t = hi > 0 ? hi : 1;
    for (int pass = 0; pass < 2; pass++) { // pass 0 finds a time that reaches n_layer, pass 1 bisects
        double lo = 0;
        for (int it = 0; it < 40; it++) {
            const double at = pass ? 0.5 * (lo + t) : t;
            sum = 0;
            for (int k = 0; k < S; k++) {
                double xk = cap[k];
                for (int i = p->stage_first[k]; i < p->stage_first[k + 1]; i++)
                    xk = fmin(xk, plan_scale_max(&m[i], at, cap[k]));
                x[k] = xk;
                sum += xk;
            }
            if (!pass) {
                if (sum >= pm->n_layer) break;
                t *= 2;
            } else if (sum >= pm->n_layer) {
                t = at;
            } else {
                lo = at;
            }
        }
        if (!pass && sum < pm->n_layer) break;
    }
    for (int k = 0; k < S; k++) {
        double xk = cap[k];
        for (int i = p->stage_first[k]; i < p->stage_first[k + 1]; i++) xk = fmin(xk, plan_scale_max(&m[i], t, cap[k]));
        x[k] = fmax(xk, 1e-3);
    }
    free(m);
    return sum >= pm->n_layer;
}

// A streaming layout's blocks moved toward equal stage times (disk reads included), within the
// caps. Leaves p sized (and predicted) by the best allocation tried.
static void rebalance_stages(const plan_model_t *pm, plan_t *p, const double *w, const int *cap, int *L) {
    const int S = p->n_stages;
    int best[PLAN_MAX_NODES], next[PLAN_MAX_NODES]; // (S) blocks per stage: the best so far, the next try
    memcpy(best, L, sizeof *L * (size_t)S);
    plan_predict(pm, p);
    double best_t = p->cost.token_ms, x[PLAN_MAX_NODES]; // (S) equal-time blocks
    bool moved = false;
    for (int round = 0; round < PLAN_REBALANCE_ROUNDS && equal_time_blocks(pm, p, cap, x); round++) {
        if (!alloc_layers(pm->n_layer, x, cap, S, next) || !memcmp(next, L, sizeof *L * (size_t)S)) break;
        memcpy(L, next, sizeof *L * (size_t)S);
        moved = true;
        if (!fit_all(pm, p, w, L, true, NULL)) break;
        plan_predict(pm, p);
        if (!(p->cost.token_ms < best_t * (1 - 1e-6))) break;
        best_t = p->cost.token_ms;
        memcpy(best, L, sizeof *L * (size_t)S);
        moved = false;
    }
    if (moved) {
        memcpy(L, best, sizeof *L * (size_t)S);
        fit_all(pm, p, w, L, true, NULL);
    }
}

// Sizes the layout in p (stages and members set): blocks per stage by throughput within budgets,
// then each stage's split, resident or (stream) streaming. 0 or MLM_EFULL (sh filled).
static int size_stages_as(const plan_model_t *pm, plan_t *p, const double *w, bool budgets, bool stream,
                          plan_short_t *sh) {
    const bool account = stream || p->resident_only; // the resident pass's shortfall matters without streaming
    const int S = p->n_stages, nl = pm->n_layer;
    double W[PLAN_MAX_NODES] = {0};
    int cap[PLAN_MAX_NODES] = {0}, L[PLAN_MAX_NODES] = {0};
    for (int k = 0; k < S; k++) {
        W[k] = 0;
        for (int i = p->stage_first[k]; i < p->stage_first[k + 1]; i++) W[k] += w[i];
        cap[k] = budgets ? stage_cap(pm, p, k, w, stream) : nl;
    }
    int capped[PLAN_MAX_NODES]; // (S) caps lowered by stages that did not fit
    memcpy(capped, cap, sizeof cap);
    for (int round = 0; round <= nl * S; round++) {
        if (!alloc_layers(nl, W, capped, S, L)) break;
        bool failed[PLAN_MAX_NODES]; // (S) which stages did not fit
        if (fit_all(pm, p, w, L, stream, failed)) {
            bool streams = false;
            for (int i = 0; i < p->n; i++) streams |= p->shard[i].st.streams;
            if (streams && S > 1) rebalance_stages(pm, p, w, capped, L);
            return 0;
        }
        for (int k = 0; k < S; k++)
            if (failed[k]) capped[k] = L[k] - 1;
    }
    if (!account) return MLM_EFULL;
    // Does not fit: what the proportional layout would miss.
    for (int k = 0; k < S; k++) cap[k] = nl;
    if (!alloc_layers(nl, W, cap, S, L))
        for (int k = 0; k < S; k++) L[k] = k < nl % S ? nl / S + 1 : nl / S;
    for (int k = 0, l = 0; k < S; l += L[k], k++) {
        plan_fit_stage(pm, p, p->stage_first[k], p->stage_first[k + 1], l, l + L[k], w + p->stage_first[k],
                       PLAN_FIT_ADJUST | (stream ? PLAN_FIT_STREAM : 0), NULL);
        plan_short_add(sh, p, p->stage_first[k], p->stage_first[k + 1]);
    }
    return MLM_EFULL;
}

// Sizes p resident when it can, else (unless resident_only) streaming. 0 or MLM_EFULL (sh filled
// by the last attempt).
static int size_stages(const plan_model_t *pm, plan_t *p, const double *w, plan_short_t *sh) {
    bool budgets = false;
    for (int i = 0; i < p->n; i++) budgets |= p->node[p->shard[i].node].mem_budget > 0;
    int rc = size_stages_as(pm, p, w, budgets, false, sh);
    if (rc != MLM_EFULL || p->resident_only) return rc;
    *sh = (plan_short_t){.worst_node = -1};
    return size_stages_as(pm, p, w, budgets, true, sh);
}

// Builds and predicts layout lay in tensor-parallel mode `mode` into p. 0, MLM_EFULL (sh filled)
// or MLM_EINVAL.
static int build(search_t *s, const layout_t *lay, plan_tp_mode_t mode, plan_t *p, plan_short_t *sh) {
    const plan_model_t *pm = s->pm;
    const int S = lay->n_stages, m = lay->m;
    if (S < 1 || S > pm->n_layer || m < S) return MLM_EINVAL;
    p->n = m;
    p->n_stages = S;
    p->n_ctx = s->o.n_ctx;
    p->n_nodes = s->n;
    p->ubatch = s->o.ubatch;
    p->n_prompt = s->o.n_prompt;
    p->coord_apart = s->o.coord_apart;
    p->tp_mode = mode;
    p->resident_only = s->o.no_stream;
    p->ep = false; // sliced experts
    p->ep_cache = s->o.expert_cache;
    p->sliced_ms = p->placed_ms = 0;
    for (int i = 0; i < m && i < PLAN_MAX_NODES; i++) memset(p->shard[i].experts, 0, sizeof p->shard[i].experts);
    memset(&p->cost, 0, sizeof p->cost);
    p->why[0] = 0;
    memcpy(p->node, s->nodes, sizeof *s->nodes * (size_t)s->n);
    double w[PLAN_MAX_NODES];
    for (int k = 0; k <= S; k++) p->stage_first[k] = lay->first[k];
    for (int k = 0; k < S; k++)
        for (int i = lay->first[k]; i < lay->first[k + 1]; i++) {
            memset(&p->shard[i], 0, sizeof p->shard[i]);
            p->shard[i].node = lay->idx[i];
            p->shard[i].stage = k;
            w[i] = s->rate[lay->idx[i]];
        }
    int rc = size_stages(pm, p, w, sh);
    if (rc != 0) return rc;
    plan_layout_name(p);
    plan_predict(pm, p);
    return 0;
}

// --- helpers: search

// a beats b: less time (within rounding), then fewer nodes, then fewer stages.
static bool better(const cand_t *a, const cand_t *b) {
    if (!b->valid) return a->valid;
    if (!a->valid) return false;
    const double tol = 1e-9 * fmax(a->cost.token_ms, b->cost.token_ms) + 1e-12;
    if (a->cost.token_ms < b->cost.token_ms - tol) return true;
    if (a->cost.token_ms > b->cost.token_ms + tol) return false;
    if (a->mode != b->mode) return a->mode == PLAN_TP_EXACT; // bit-exact on ties
    if (a->lay.m != b->lay.m) return a->lay.m < b->lay.m;
    if (a->lay.n_stages != b->lay.n_stages) return a->lay.n_stages < b->lay.n_stages;
    for (int i = 0; i < a->lay.m; i++) // then the earlier offered nodes
        if (a->lay.idx[i] != b->lay.idx[i]) return a->lay.idx[i] < b->lay.idx[i];
    for (int k = 1; k < a->lay.n_stages; k++) // then the earlier stage cuts
        if (a->lay.first[k] != b->lay.first[k]) return a->lay.first[k] < b->lay.first[k];
    return false;
}

static bool has_group(const layout_t *lay) {
    for (int k = 0; k < lay->n_stages; k++)
        if (lay->first[k + 1] - lay->first[k] > 1) return true;
    return false;
}

// Builds and predicts a layout in one mode into *c (valid false when it does not fit),
// remembering the failure that missed least.
static void evaluate_as(search_t *s, const layout_t *lay, plan_tp_mode_t mode, cand_t *c) {
    s->evals++;
    c->valid = false;
    c->mode = mode;
    plan_short_t sh = {.worst_node = -1};
    const int rc = build(s, lay, mode, s->scratch, &sh);
    if (rc == MLM_EFULL) {
        const double miss = sh.need > sh.have ? (double)(sh.need - sh.have) : (double)sh.worst_short;
        if (s->closest_miss < 0 || miss < s->closest_miss) {
            s->closest = sh;
            s->closest_miss = miss;
            plan_layout_name(s->scratch);
            snprintf(s->closest_name, sizeof s->closest_name, "%s", s->scratch->layout);
        }
        return;
    }
    if (rc != 0) return;
    c->valid = true;
    c->lay = *lay;
    c->cost = s->scratch->cost;
    snprintf(c->name, sizeof c->name, "%s", s->scratch->layout);
}

// The layout in the asked mode, or with AUTO in the faster of the two (a layout without a
// tensor-parallel group is the same in both: exact).
static void evaluate(search_t *s, const layout_t *lay, cand_t *c) {
    const plan_tp_mode_t asked = s->o.tp_mode;
    if (asked != PLAN_TP_AUTO || !has_group(lay)) {
        evaluate_as(s, lay, asked == PLAN_TP_ALLREDUCE && has_group(lay) ? PLAN_TP_ALLREDUCE : PLAN_TP_EXACT, c);
        return;
    }
    cand_t ar;
    evaluate_as(s, lay, PLAN_TP_EXACT, c);
    evaluate_as(s, lay, PLAN_TP_ALLREDUCE, &ar);
    if (better(&ar, c)) *c = ar;
}

// Evaluates a layout and keeps it if it is the best so far, or the best of its layout name.
// Returns its token_ms (INFINITY when it does not fit).
static double consider(search_t *s, const layout_t *lay) {
    cand_t c;
    evaluate(s, lay, &c);
    if (!c.valid) return INFINITY;
    if (better(&c, &s->best)) s->best = c;
    int k = 0;
    while (k < s->n_kept && strcmp(s->kept[k].name, c.name) != 0) k++;
    if (k < s->n_kept) {
        if (better(&c, &s->kept[k])) s->kept[k] = c;
    } else if (s->n_kept < MAX_KEPT) {
        s->kept[s->n_kept++] = c;
    }
    return c.cost.token_ms;
}

static bool stage_sizes_ok(const search_t *s, const layout_t *lay) {
    if (s->o.pp && lay->n_stages != s->o.pp) return false;
    if (lay->n_stages > s->pm->n_layer) return false;
    if (s->o.tp)
        for (int k = 0; k < lay->n_stages; k++)
            if (lay->first[k + 1] - lay->first[k] != s->o.tp) return false;
    return true;
}

// Every node subset and every cut of it into consecutive stages.
static void search_all(search_t *s) {
    const int n = s->n;
    const unsigned full = (1u << n) - 1;
    for (unsigned mask = full; mask >= 1; mask--) {
        if (s->o.pin_first && !(mask & 1u)) continue;
        if (s->o.keep_all && mask != full) continue;
        layout_t lay = {0};
        for (int i = 0; i < n; i++)
            if (mask & (1u << i)) lay.idx[lay.m++] = i;
        if (s->o.tp && lay.m % s->o.tp) continue;
        if (s->o.pp && lay.m < s->o.pp) continue;
        for (unsigned cuts = 0; cuts < (1u << (lay.m - 1)); cuts++) {
            lay.n_stages = 0;
            lay.first[lay.n_stages++] = 0;
            for (int i = 1; i < lay.m; i++)
                if (cuts & (1u << (i - 1))) lay.first[lay.n_stages++] = i;
            lay.first[lay.n_stages] = lay.m;
            if (stage_sizes_ok(s, &lay)) consider(s, &lay);
        }
    }
}

// Cuts m nodes into S stages: even counts (variant 0) or balanced by throughput (variant 1).
static void cut_stages(const search_t *s, layout_t *lay, int S, int variant) {
    const int m = lay->m;
    lay->n_stages = S;
    if (variant == 0) {
        for (int k = 0; k <= S; k++) lay->first[k] = m * k / S;
        return;
    }
    double cum[PLAN_MAX_NODES + 1] = {0};
    for (int i = 0; i < m; i++) cum[i + 1] = cum[i] + s->rate[lay->idx[i]];
    int pos = 0;
    lay->first[0] = 0;
    for (int k = 0; k < S - 1; k++) {
        const double target = cum[m] * (k + 1) / S;
        int end = pos + 1;
        while (end < m - (S - 1 - k) && cum[end] + s->rate[lay->idx[end]] / 2 <= target) end++;
        lay->first[k + 1] = end;
        pos = end;
    }
    lay->first[S] = m;
}

// The best of stage counts [s_lo, s_hi] for one node set (even and balanced cuts).
static double eval_set(search_t *s, const int *idx, int m, int s_lo, int s_hi) {
    layout_t lay = {.m = m};
    memcpy(lay.idx, idx, sizeof *idx * (size_t)m);
    double best = INFINITY;
    if (s_lo < 1) s_lo = 1;
    if (s_hi > m) s_hi = m;
    if (s_hi > s->pm->n_layer) s_hi = s->pm->n_layer;
    for (int S = s_lo; S <= s_hi; S++) {
        layout_t even;
        for (int v = 0; v < 2; v++) {
            cut_stages(s, &lay, S, v);
            if (v == 1 && !memcmp(even.first, lay.first, sizeof *lay.first * (size_t)(S + 1))) continue;
            if (v == 0) even = lay;
            if (stage_sizes_ok(s, &lay)) best = fmin(best, consider(s, &lay));
        }
    }
    return best;
}

static int cmp_desc(const void *a, const void *b, const double *key) {
    const int x = *(const int *)a, y = *(const int *)b;
    return key[x] > key[y] ? -1 : key[x] < key[y] ? 1 : x - y;
}

// Sorts node indices by key, largest first (insertion sort: n <= 64).
static void sort_by(int *order, int n, const double *key) {
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && cmp_desc(&order[j - 1], &order[j], key) > 0; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
}

// Fastest-first node sets of every size (by throughput, and by throughput over link cost), every
// stage count; then greedy removal and addition of single nodes while the prediction improves.
static void search_heuristic(search_t *s) {
    const int n = s->n;
    int all[PLAN_MAX_NODES];
    for (int i = 0; i < n; i++) all[i] = i;
    const int want = s->o.pp && s->o.tp ? s->o.pp * s->o.tp : 0;
    if (s->o.keep_all) {
        eval_set(s, all, n, 1, n);
        return;
    }
    double key[2][PLAN_MAX_NODES];
    for (int i = 0; i < n; i++) {
        key[0][i] = s->rate[i];
        // Throughput discounted by what one exchange of an n_embd row costs on its link.
        const double ex = plan_node_lat_us(&s->nodes[i]) * 1e-6 + 4.0 * s->pm->n_embd / plan_node_link_bw(&s->nodes[i]);
        key[1][i] = 1.0 / (1.0 / s->rate[i] + ex * 4 * s->pm->n_layer / (s->pm->weight_bytes / s->pm->bytes_per_weight));
    }
    for (int ord = 0; ord < 2; ord++) {
        int order[PLAN_MAX_NODES];
        memcpy(order, all, sizeof all[0] * (size_t)n);
        sort_by(order, n, key[ord]);
        for (int k = 1; k <= n; k++) {
            bool in[PLAN_MAX_NODES] = {0};
            for (int j = 0; j < k; j++) in[order[j]] = true;
            if (s->o.pin_first) in[0] = true;
            int idx[PLAN_MAX_NODES], m = 0;
            for (int i = 0; i < n; i++)
                if (in[i]) idx[m++] = i;
            if (want && m != want) continue;
            if (s->o.tp && m % s->o.tp) continue;
            eval_set(s, idx, m, 1, m);
        }
    }
    if (want || s->o.tp) return; // fixed set sizes: no single-node moves
    // Greedy moves from the best set found.
    if (!s->best.valid) {
        eval_set(s, all, n, 1, n);
        if (!s->best.valid) return;
    }
    for (int round = 0; round < 2 * n; round++) {
        const cand_t cur = s->best;
        const int S = cur.lay.n_stages;
        bool in[PLAN_MAX_NODES] = {0};
        for (int i = 0; i < cur.lay.m; i++) in[cur.lay.idx[i]] = true;
        for (int j = 0; j < n; j++) {
            if (in[j] && s->o.pin_first && j == 0) continue;
            if (in[j] && cur.lay.m == 1) continue;
            int idx[PLAN_MAX_NODES], m = 0;
            for (int i = 0; i < n; i++)
                if (in[i] != (i == j)) idx[m++] = i;
            const int s0 = in[j] ? S - 1 : S;
            eval_set(s, idx, m, s0 - 1 > 0 ? s0 - 1 : 1, s0 + 1);
        }
        if (!better(&s->best, &cur)) break;
    }
}

// --- helpers: explaining

// The best layout of exactly the node set idx (m nodes, increasing) into *out.
// Also, when grouped is not NULL, the one with the least compute and memory time (comm aside) in
// which node `node` shares a stage with another node.
static bool less_work(const cand_t *a, const cand_t *b) {
    if (!a->valid) return false;
    if (!b->valid) return true;
    return a->cost.token_ms - a->cost.comm_ms < b->cost.token_ms - b->cost.comm_ms;
}

static bool shares_stage(const layout_t *lay, int node) {
    for (int k = 0; k < lay->n_stages; k++)
        for (int i = lay->first[k]; i < lay->first[k + 1]; i++)
            if (lay->idx[i] == node) return lay->first[k + 1] - lay->first[k] > 1;
    return false;
}

static void best_of_set(search_t *s, const int *idx, int m, cand_t *out, int node, cand_t *grouped) {
    layout_t lay = {.m = m};
    memcpy(lay.idx, idx, sizeof *idx * (size_t)m);
    out->valid = false;
    if (grouped) grouped->valid = false;
    cand_t c;
    if (m <= 10) {
        for (unsigned cuts = 0; cuts < (1u << (m - 1)); cuts++) {
            lay.n_stages = 0;
            lay.first[lay.n_stages++] = 0;
            for (int i = 1; i < m; i++)
                if (cuts & (1u << (i - 1))) lay.first[lay.n_stages++] = i;
            lay.first[lay.n_stages] = m;
            if (!stage_sizes_ok(s, &lay)) continue;
            evaluate(s, &lay, &c);
            if (better(&c, out)) *out = c;
            if (grouped && shares_stage(&lay, node) && less_work(&c, grouped)) *grouped = c;
        }
        return;
    }
    for (int S = 1; S <= m && S <= s->pm->n_layer; S++)
        for (int v = 0; v < 2; v++) {
            cut_stages(s, &lay, S, v);
            if (!stage_sizes_ok(s, &lay)) continue;
            evaluate(s, &lay, &c);
            if (better(&c, out)) *out = c;
            if (grouped && shares_stage(&lay, node) && less_work(&c, grouped)) *grouped = c;
        }
}

// The chosen node set plus node j, increasing, into idx; returns its size.
static int set_plus(const search_t *s, int j, int *idx) {
    int m = 0;
    bool in[PLAN_MAX_NODES] = {0};
    for (int i = 0; i < s->best.lay.m; i++) in[s->best.lay.idx[i]] = true;
    in[j] = true;
    for (int i = 0; i < s->n; i++)
        if (in[i]) idx[m++] = i;
    return m;
}

static void fmt_ms(char *buf, size_t cap, double ms) { snprintf(buf, cap, ms >= 1000 ? "%.0f" : "%.3g", ms); }

// One line: which nodes were left out and why (what the plan would cost with each one added),
// or why this layout among those with every node.
static void why_best(search_t *s, plan_t *p) {
    size_t at = 0;
    char *w = p->why;
    const size_t cap = sizeof p->why;
#define ADD(...) (at += at < cap ? (size_t)snprintf(w + at, cap - at, __VA_ARGS__) : 0)
    if (s->o.pp || s->o.tp) {
        ADD("asked for");
        if (s->o.pp) ADD(" --pp %d", s->o.pp);
        if (s->o.tp) ADD(" --tp %d", s->o.tp);
        ADD("; ");
    }
    bool in[PLAN_MAX_NODES] = {0};
    for (int i = 0; i < p->n; i++) in[p->shard[i].node] = true;
    // Each left-out node's reason (the first few), then nodes with the same reason share a sentence.
    enum { TOLD = 8 };
    char reason[TOLD][160];
    int who[TOLD], left = 0, n_r = 0;
    char a[24], b[24];
    fmt_ms(a, sizeof a, p->cost.token_ms);
    for (int j = 0; j < s->n; j++) {
        if (in[j]) continue;
        if (left++ >= TOLD) continue;
        const plan_node_t *nd = &s->nodes[j];
        char *r = reason[n_r];
        who[n_r++] = j;
        int idx[PLAN_MAX_NODES];
        const int m = set_plus(s, j, idx);
        if ((s->o.pp && s->o.tp) || (s->o.tp && m % s->o.tp)) {
            snprintf(r, sizeof reason[0], "the asked layout has room for %d node(s)", p->n);
            continue;
        }
        cand_t c = {0}, t = {0};
        best_of_set(s, idx, m, &c, j, &t);
        if (!c.valid) {
            snprintf(r, sizeof reason[0], "no layout with it fits the memory budgets");
            continue;
        }
        fmt_ms(b, sizeof b, c.cost.token_ms);
        // In a tensor-parallel group it would take work off the others; does the exchange eat that?
        const double saved = t.valid ? (p->cost.token_ms - p->cost.comm_ms) - (t.cost.token_ms - t.cost.comm_ms) : 0;
        const double d_comm = t.valid ? t.cost.comm_ms - p->cost.comm_ms : 0;
        double slowest = INFINITY;
        for (int i = 0; i < p->n; i++) slowest = fmin(slowest, s->rate[p->shard[i].node]);
        const double lat = plan_node_lat_us(nd) / 1e3, mbit = plan_node_link_bw(nd) * 8 / 1e6;
        if (saved > 0 && d_comm > saved && s->rate[j] >= 0.5 * slowest)
            snprintf(r, sizeof reason[0], "its %.3g ms / %.0f Mbit link costs more than its compute saves (%s vs %s ms/token)",
                     lat, mbit, a, b);
        else if (saved > 0 && d_comm > saved)
            snprintf(r, sizeof reason[0], "it is too slow to pay for the exchanges it adds (%s vs %s ms/token)", a, b);
        else
            snprintf(r, sizeof reason[0], "it is too slow to help (%s vs %s ms/token with it, %s)", a, b, c.name);
    }
    bool done[TOLD] = {0};
    int groups = 0, named = 0;
    for (int i = 0; i < n_r; i++) {
        if (done[i]) continue;
        if (groups++ == 3) break;
        if (groups > 1) ADD("; ");
        int same = 0;
        for (int k = i; k < n_r; k++) {
            if (done[k] || strcmp(reason[k], reason[i])) continue;
            done[k] = true;
            named++;
            ADD("%s%s", same++ ? ", " : "", s->nodes[who[k]].name);
        }
        ADD(" left out: ");
        for (const char *r = reason[i]; *r;) { // plural wording for a group
            static const char *const from[] = {"its ", "link costs", "it is "};
            static const char *const to[] = {"their ", "links cost", "each is "};
            size_t k = 0;
            while (same > 1 && k < 3 && strncmp(r, from[k], strlen(from[k]))) k++;
            if (same > 1 && k < 3) {
                ADD("%s", to[k]);
                r += strlen(from[k]);
            } else {
                ADD("%c", *r);
                r++; // not inside ADD: it skips its arguments once the line is full
            }
        }
    }
    if (left > named) ADD("; %d more left out", left - named);
    if (!left) {
        const cand_t *next = NULL;
        for (int k = 0; k < s->n_kept; k++)
            if (strcmp(s->kept[k].name, p->layout) && (!next || better(&s->kept[k], next))) next = &s->kept[k];
        if (s->n == 1) ADD("a single node");
        else if (s->o.keep_all && !next) ADD("all %d nodes (--keep-all); the only layout that fits", s->n);
        else if (!next && s->o.pp && s->o.tp) ADD("all %d nodes", s->n);
        else if (!next) ADD("all %d nodes; the only layout that fits the budgets", s->n);
        else {
            fmt_ms(b, sizeof b, next->cost.token_ms);
            ADD("all %d nodes%s; fastest predicted layout (%s ms/token; next best %s at %s)", s->n,
                s->o.keep_all ? " (--keep-all)" : "", a, next->name, b);
        }
    }
    if (at >= cap && cap > 4) memcpy(w + cap - 4, "...", 4);
#undef ADD
}

// Heuristic search only: adds any single left-out node that makes the best plan better, until none does.
static void polish(search_t *s) {
    for (int round = 0; round < s->n && s->best.valid && !s->o.keep_all && !s->o.tp; round++) {
        const cand_t cur = s->best;
        bool in[PLAN_MAX_NODES] = {0};
        for (int i = 0; i < cur.lay.m; i++) in[cur.lay.idx[i]] = true;
        for (int j = 0; j < s->n; j++) {
            if (in[j]) continue;
            int idx[PLAN_MAX_NODES];
            const int m = set_plus(s, j, idx);
            cand_t c;
            best_of_set(s, idx, m, &c, j, NULL);
            if (better(&c, &s->best)) s->best = c;
        }
        if (!better(&s->best, &cur)) break;
    }
}

static void why_alt(const plan_t *best, plan_t *p) {
    const double bw = best->cost.token_ms - best->cost.comm_ms, aw = p->cost.token_ms - p->cost.comm_ms;
    const double ratio = best->cost.token_ms > 0 ? p->cost.token_ms / best->cost.token_ms : 0;
    if (p->cost.comm_ms - best->cost.comm_ms >= aw - bw)
        snprintf(p->why, sizeof p->why, "%.2fx the chosen plan's time: more exchange (comm %.1f vs %.1f ms)", ratio,
                 p->cost.comm_ms, best->cost.comm_ms);
    else
        snprintf(p->why, sizeof p->why,
                 "%.2fx the chosen plan's time: slower compute, memory or disk (%.1f vs %.1f ms)", ratio, aw, bw);
}

// Sets p's cost.exact_ms and cost.allreduce_ms: its own token time, and that of its layout built
// in the other mode as the search builds layouts (0 when that does not fit).
static void both_modes(search_t *s, const layout_t *lay, plan_t *p) {
    if (!has_group(lay)) {
        p->cost.exact_ms = p->cost.allreduce_ms = p->cost.token_ms;
        return;
    }
    const plan_tp_mode_t other = p->tp_mode == PLAN_TP_ALLREDUCE ? PLAN_TP_EXACT : PLAN_TP_ALLREDUCE;
    plan_short_t sh = {.worst_node = -1};
    const double t = build(s, lay, other, s->scratch, &sh) == 0 ? s->scratch->cost.token_ms : 0;
    p->cost.exact_ms = other == PLAN_TP_EXACT ? t : p->cost.token_ms;
    p->cost.allreduce_ms = other == PLAN_TP_ALLREDUCE ? t : p->cost.token_ms;
}

// Appends to the chosen plan's why line which tensor-parallel mode it runs in when AUTO chose it.
static void why_mode(const plan_opts_t *o, plan_t *p) {
    if (o->tp_mode != PLAN_TP_AUTO || p->cost.exact_ms <= 0 || p->cost.allreduce_ms <= 0) return;
    if (p->cost.exact_ms == p->cost.allreduce_ms) return; // no tensor-parallel group
    const size_t at = strlen(p->why);
    char a[24], b[24];
    fmt_ms(a, sizeof a, p->cost.exact_ms);
    fmt_ms(b, sizeof b, p->cost.allreduce_ms);
    if (at + 8 < sizeof p->why)
        snprintf(p->why + at, sizeof p->why - at, "; --tp-mode auto: %s (exact %s, allreduce %s ms/token)",
                 plan_tp_mode_name(p->tp_mode), a, b);
}

// --- public API

// The fastest plan with placed experts over all n nodes (every stage count whose stages have 2 or more
// members, at most one per expert), or, with o->ep >= 2, the forced one: stages of o->ep members
// (o->pp of them, else as many as the nodes make), over the first nodes. Each with o->ep_replicas
// holders per expert, or (0) 1, and when every node has a budget each count up to top-k that fits.
// 0 or plan_ep's error.
static int best_ep(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_opts_t *o, plan_t *out,
                   char *err, size_t errlen) {
    const bool lead = !o->ep_replicated;
    int r_lo = o->ep_replicas > 0 ? o->ep_replicas : 1, r_hi = r_lo;
    bool budgets = n > 0;
    for (int i = 0; i < n; i++) budgets = budgets && nodes[i].mem_budget > 0;
    if (o->ep_replicas == 0 && lead && budgets) r_hi = pm->n_expert_used > 1 ? pm->n_expert_used : 1;
    if (o->ep_hot > 0) { // a second copy of the popular experts only
        if (!lead || o->ep_replicas > 1)
            return mlm_fail(err, errlen, MLM_EINVAL, "--ep-hot needs attention on the leader and no --ep-replicas");
        r_lo = r_hi = 1;
    }
    if (o->ep >= 2) {
        const int pp = o->pp > 0 ? o->pp : (n / o->ep > 0 ? n / o->ep : 1);
        if (pp * o->ep > n)
            return mlm_fail(err, errlen, MLM_EINVAL, "--ep %d in %d stage(s) needs %d nodes; %d offered", o->ep, pp,
                            pp * o->ep, n);
    }
    plan_t *t = malloc(sizeof *t);
    if (!t) return MLM_ENOMEM;
    int rc = MLM_EINVAL, found = 0;
    for (int pp = 1; pp <= n && pp <= pm->n_layer; pp++) {
        const int forced_pp = o->ep >= 2 ? (o->pp > 0 ? o->pp : (n / o->ep > 0 ? n / o->ep : 1)) : 0;
        if (forced_pp && pp != forced_pp) continue;
        const int nn = o->ep >= 2 ? pp * o->ep : n;
        if (!forced_pp && ((o->pp && pp != o->pp) || n / pp < 2 || n / pp > pm->n_expert)) continue;
        for (int r = r_lo; r <= r_hi && (r == r_lo || r <= nn / pp); r++) { // auto: up to the members
            char e2[256];
            int rc2 = plan_ep_cached(pm, nodes, nn, pp, o->n_ctx, lead, r, o->expert_cache, t, e2, sizeof e2);
            if (rc2 == 0 && o->ep_hot > 0) rc2 = plan_ep_hot(pm, t, o->ep_hot, e2, sizeof e2);
            if (rc2 != 0) {
                if (!found && (r == r_lo || forced_pp)) rc = mlm_fail(err, errlen, rc2, "%s", e2);
                continue;
            }
            t->coord_apart = o->coord_apart;
            t->ubatch = o->ubatch;
            t->n_prompt = o->n_prompt;
            plan_predict_ep(pm, t);
            if (!found || t->cost.token_ms < out->cost.token_ms) *out = *t;
            found = 1;
            rc = 0;
        }
    }
    free(t);
    return rc;
}

static int plan_make_sliced(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_opts_t *opts,
                            plan_t *best, plan_t *alts, int max_alts, int *n_alts, char *err, size_t errlen);

int plan_make(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_opts_t *opts, plan_t *best,
              plan_t *alts, int max_alts, int *n_alts, char *err, size_t errlen) {
    plan_opts_t o = opts ? *opts : (plan_opts_t){0};
    if (o.n_ctx <= 0) o.n_ctx = 4096;
    if (n_alts) *n_alts = 0;
    if (o.ep >= 2 || o.ep == 1 || o.ep < -1) {
        if (o.ep < 2) return mlm_fail(err, errlen, MLM_EINVAL, "--ep %d: placed experts need 2 or more members", o.ep);
        if (o.tp) return mlm_fail(err, errlen, MLM_EINVAL, "--ep and --tp exclude each other (a stage either places or slices experts)");
        if (pm->n_expert <= 0) return mlm_fail(err, errlen, MLM_EINVAL, "--ep: %s has no experts to place", pm->name);
        return best_ep(pm, nodes, n, &o, best, err, errlen);
    }
    int rc = plan_make_sliced(pm, nodes, n, &o, best, alts, max_alts, n_alts, err, errlen);
    // Placed experts compete only when nothing asks for sliced ones: no --tp, no all-reduce mode, no
    // coordinator share (--ep places experts there too, but the automatic choice leaves it sliced)
    if (o.ep < 0 || pm->n_expert <= 0 || o.tp || o.pin_first || o.tp_mode == PLAN_TP_ALLREDUCE) return rc;
    plan_t *ep = malloc(sizeof *ep);
    if (!ep) return rc;
    char e2[256];
    if (best_ep(pm, nodes, n, &o, ep, e2, sizeof e2) == 0) {
        const double sliced = rc == 0 ? best->cost.token_ms : 0;
        if (rc != 0 || ep->cost.token_ms < sliced) { // placed experts predicted faster (or the only fit)
            *best = *ep;
            if (n_alts) *n_alts = 0;
            rc = 0;
            if (sliced > 0)
                snprintf(best->why, sizeof best->why,
                         "experts placed whole: predicted %.2f ms/token against %.2f with sliced experts",
                         ep->cost.token_ms, sliced);
            else
                snprintf(best->why, sizeof best->why, "experts placed whole: sliced experts do not fit");
        }
        best->sliced_ms = sliced;
        best->placed_ms = ep->cost.token_ms;
    }
    free(ep);
    return rc;
}

static int plan_make_sliced(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_opts_t *opts,
                            plan_t *best, plan_t *alts, int max_alts, int *n_alts, char *err, size_t errlen) {
    plan_opts_t o = opts ? *opts : (plan_opts_t){0};
    if (n_alts) *n_alts = 0;
    if (o.n_ctx <= 0) o.n_ctx = 4096;
    if (n < 1 || n > PLAN_MAX_NODES)
        return mlm_fail(err, errlen, MLM_EINVAL, "node count %d is outside 1..%d", n, PLAN_MAX_NODES);
    if (o.pp < 0 || o.tp < 0 || o.pp > pm->n_layer || (o.pp ? o.pp : 1) * (o.tp ? o.tp : 1) > n)
        return mlm_fail(err, errlen, MLM_EINVAL, "cannot make %d stage(s) of %d node(s) from %d nodes and %d layers",
                        o.pp ? o.pp : 1, o.tp ? o.tp : 1, n, pm->n_layer);
    if (o.tp_mode != PLAN_TP_EXACT && o.tp_mode != PLAN_TP_ALLREDUCE && o.tp_mode != PLAN_TP_AUTO)
        return mlm_fail(err, errlen, MLM_EINVAL, "unknown tensor-parallel mode %d", (int)o.tp_mode);
    if (o.keep_all && ((o.tp && n % o.tp) || (o.pp && o.tp && o.pp * o.tp != n)))
        return mlm_fail(err, errlen, MLM_EINVAL, "--keep-all uses all %d nodes, which do not make stages of %d", n,
                        o.tp);
    search_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    s->scratch = malloc(sizeof *s->scratch);
    s->kept = malloc(sizeof *s->kept * MAX_KEPT);
    if (!s->scratch || !s->kept) {
        free(s->scratch);
        free(s->kept);
        free(s);
        return MLM_ENOMEM;
    }
    s->pm = pm;
    s->nodes = nodes;
    s->n = n;
    s->o = o;
    s->closest_miss = -1;
    for (int i = 0; i < n; i++) s->rate[i] = plan_node_rate(pm, &nodes[i]);
    if (n <= PLAN_EXHAUSTIVE_MAX && !o.heuristic) search_all(s);
    else search_heuristic(s), polish(s);
    int rc = 0;
    if (!s->best.valid) {
        if (s->closest_miss >= 0) {
            char where[80];
            snprintf(where, sizeof where, "the closest layout (%s)", s->closest_name);
            plan_short_message(err, errlen, &s->closest, nodes, where);
            rc = MLM_EFULL;
        } else {
            rc = mlm_fail(err, errlen, MLM_EINVAL, "no layout matches the options (%d nodes, --pp %d, --tp %d)", n,
                          o.pp, o.tp);
        }
    } else {
        plan_short_t sh = {.worst_node = -1};
        build(s, &s->best.lay, s->best.mode, best, &sh);
        why_best(s, best);
        both_modes(s, &s->best.lay, best);
        why_mode(&o, best);
        // Alternatives: the best plan of every other layout name, best first.
        int got = 0;
        bool used[MAX_KEPT] = {0};
        while (alts && got < max_alts) {
            int pick = -1;
            for (int k = 0; k < s->n_kept; k++)
                if (!used[k] && strcmp(s->kept[k].name, best->layout) && (pick < 0 || better(&s->kept[k], &s->kept[pick])))
                    pick = k;
            if (pick < 0) break;
            used[pick] = true;
            if (build(s, &s->kept[pick].lay, s->kept[pick].mode, &alts[got], &sh) != 0) continue;
            both_modes(s, &s->kept[pick].lay, &alts[got]);
            why_alt(best, &alts[got]);
            got++;
        }
        if (n_alts) *n_alts = got;
    }
    free(s->scratch);
    free(s->kept);
    free(s);
    return rc;
}
