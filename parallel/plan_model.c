// Planner model: what a model weighs per row (from a file or a preset), and fitting a stage's split within budgets.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_impl.h"
#include "core/err.h"
#include "worker/format/hparams.h"
#include "worker/format/model_presets.h"
#include "worker/kernels/quant.h"

// --- helpers

#define FIT_ITERS 48  // budget-fitting rounds of one stage

bool plan_waterfill(double total, const double *w, const double *cap, int n, double *out, bool *bound) {
    double sumcap = 0;
    for (int i = 0; i < n; i++) sumcap += cap[i];
    *bound = false;
    if (sumcap < total * (1 - 1e-12)) {
        for (int i = 0; i < n; i++) out[i] = sumcap > 0 ? cap[i] * total / sumcap : total / n;
        *bound = true;
        return false;
    }
    bool fixed[PLAN_MAX_NODES] = {0};
    for (;;) {
        double rem = total, wsum = 0;
        for (int i = 0; i < n; i++) {
            if (fixed[i]) rem -= cap[i];
            else wsum += w[i];
        }
        bool any = false;
        for (int i = 0; i < n; i++)
            if (!fixed[i] && (wsum <= 0 || rem * w[i] / wsum > cap[i])) fixed[i] = any = true;
        if (any) {
            *bound = true;
            continue;
        }
        for (int i = 0; i < n; i++) out[i] = fixed[i] ? cap[i] : rem * w[i] / wsum;
        return true;
    }
}

// The type a preset row of n elements is stored in: `type`, or Q8_0, then F16, when its blocks do
// not divide n.
static int row_type_or(int type, int64_t n) {
    if (n <= 0 || qtype_row_size((qtype_t)type, n)) return type;
    return qtype_row_size(QT_Q8_0, n) ? QT_Q8_0 : QT_F16;
}

static uint64_t row_size_or(int type, int64_t n) {
    return n > 0 ? qtype_row_size((qtype_t)row_type_or(type, n), n) : 0;
}

static int blck_of(int type) {
    const qtype_traits_t *tr = qtype_traits(type);
    return tr && tr->blck > 0 ? (int)tr->blck : 1;
}

// Cuts the rows of blocks [l0, l1) over p->shard[a..b) by weights u, in p's mode, and records
// the weights (sizes are not computed).
static void split_stage(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *u) {
    const int g = b - a, group = pm->n_head / (pm->n_head_kv > 0 ? pm->n_head_kv : 1);
    const bool vocab = l0 == 0 || l1 == pm->n_layer, ar = p->tp_mode == PLAN_TP_ALLREDUCE;
    plan_mode_grains(pm, p->tp_mode, &p->grain_heads, &p->grain_ffn);
    int lo[PLAN_MAX_NODES], hi[PLAN_MAX_NODES]; // (g) each member's units [lo, hi)
    plan_split_units(pm->n_head, p->grain_heads, u, g, lo, hi);
    for (int i = 0; i < g; i++) {
        shard_slice_t *s = &p->shard[a + i].s;
        memset(s, 0, sizeof *s);
        s->l0 = l0;
        s->l1 = l1;
        s->h0 = lo[i];
        s->h1 = hi[i];
        s->kv0 = s->h1 > s->h0 ? s->h0 / group : 0;
        s->kv1 = s->h1 > s->h0 ? (s->h1 - 1) / group + 1 : 0;
        p->shard[a + i].weight = u[i];
    }
    if (ar) { // attn_output and ffn_down by columns: every member holds every row of its columns
        for (int i = 0; i < g; i++) p->shard[a + i].s.e0 = 0, p->shard[a + i].s.e1 = pm->n_embd;
    } else {
        plan_split_units(pm->n_embd, PLAN_HIDDEN_GRAIN, u, g, lo, hi);
        for (int i = 0; i < g; i++) p->shard[a + i].s.e0 = lo[i], p->shard[a + i].s.e1 = hi[i];
    }
    plan_split_units(pm->n_ff, p->grain_ffn, u, g, lo, hi);
    for (int i = 0; i < g; i++) p->shard[a + i].s.f0 = lo[i], p->shard[a + i].s.f1 = hi[i];
    if (vocab) {
        plan_split_units(pm->n_vocab, PLAN_VOCAB_GRAIN, u, g, lo, hi);
        for (int i = 0; i < g; i++) p->shard[a + i].s.v0 = lo[i], p->shard[a + i].s.v1 = hi[i];
    }
}

// What a member of blocks [l0, l1) needs with no rows at all: its peak resident, or its minimum
// budget streaming (KV cache none, activations, output norm, the blocks' vectors).
static uint64_t empty_need(const plan_model_t *pm, const plan_t *p, int l0, int l1, bool stream) {
    shard_slice_t e = {0};
    e.l0 = l0;
    e.l1 = l1;
    plan_stream_t st;
    plan_size_share(pm, &e, p->tp_mode, p->n_ctx, NULL, 0, &st, NULL, NULL, NULL);
    return stream ? st.min_budget : st.peak_bytes;
}

// Lowers member i's share cap so that need = fixed + var * (its share) / (its current share) stays
// within budget bud.
static void cap_share(double *cap, int i, const double *u, int g, double bud, double fixed, double var) {
    double tot = 0;
    for (int j = 0; j < g; j++) tot += u[j];
    const double share = tot > 0 ? u[i] / tot : 0;
    if (bud <= fixed || var <= 0) cap[i] = 0;
    else cap[i] = fmin(cap[i], share * (bud - fixed) / var * 0.995);
    if (cap[i] < 1e-9) cap[i] = 0;
}

// The slowest member's decode time of stage [a, b) without exchanges.
static double stage_solo_ms(const plan_model_t *pm, const plan_t *p, int a, int b) {
    double t = 0;
    for (int i = a; i < b; i++) t = fmax(t, plan_member_ms(pm, p, a, b, i));
    return t;
}

// Whether the members' budgets could hold blocks [l0, l1) at all (a member without one can).
static bool resident_possible(const plan_model_t *pm, const plan_t *p, int a, int b, int l0, int l1) {
    uint64_t have = 0, weights = 0;
    for (int i = a; i < b; i++) {
        const uint64_t bud = p->node[p->shard[i].node].mem_budget;
        if (!bud) return true;
        have += bud;
    }
    shard_slice_t all = shard_full(pm->n_layer, pm->n_head, pm->n_head_kv, pm->n_embd, pm->n_ff, pm->n_vocab);
    all.l0 = l0;
    all.l1 = l1;
    if (!(l0 == 0 || l1 == pm->n_layer)) all.v1 = 0;
    plan_stream_t st;
    plan_size_share(pm, &all, PLAN_TP_EXACT, p->n_ctx, NULL, 0, &st, &weights, NULL, NULL);
    return have >= weights;
}

// Splits blocks [l0, l1) over p->shard[a..b) by w, resident or streaming, and with adjust lowers
// the shares of members over their budget (resident) or below their minimum (streaming) until all
// fit. cap gets the final share caps, use the weights of the split left in place. True when it fits.
static bool fit_members(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *w, bool adjust,
                        bool stream, double *cap, double *use) {
    const int g = b - a;
    double sw[PLAN_MAX_NODES] = {0}; // (g) water-filled weights
    for (int i = 0; i < g; i++) cap[i] = 1.0;
    // What a member holds with no rows at all: the blocks' vectors, the output norm, activations.
    const double empty = (double)empty_need(pm, p, l0, l1, stream);
    for (int iter = 0; iter < FIT_ITERS; iter++) {
        bool bound, ok = plan_waterfill(1.0, w, cap, g, sw, &bound);
        for (int i = 0; i < g; i++) use[i] = bound ? sw[i] : w[i]; // unbounded: the weights (plan_tp's splits)
        split_stage(pm, p, a, b, l0, l1, use);
        bool over = false;
        for (int i = 0; i < g; i++) {
            const plan_shard_t *s = &p->shard[a + i];
            if (plan_size_shard(pm, p, a + i, stream)) continue;
            over = true;
            if (!adjust) continue;
            const plan_node_t *nd = &p->node[s->node];
            const double need = stream ? (double)s->st.min_budget : (double)s->peak_bytes;
            if (nd->mem_budget && need > (double)nd->mem_budget)
                cap_share(cap, i, use, g, (double)nd->mem_budget, empty, need - empty);
            if (nd->kv_cap && s->kv_dev_bytes > nd->kv_cap) // its KV device is too small for its share's KV
                cap_share(cap, i, use, g, (double)nd->kv_cap, 0, (double)s->kv_dev_bytes);
        }
        if (!over) return true;
        if (!adjust || !ok) return false;
    }
    return false;
}

// The shares (x, summing to 1, each within cap) that give the members equal predicted times by
// the scaled model of their current split. False when the caps do not add up to the stage.
static bool equal_time_shares(const plan_model_t *pm, const plan_t *p, int a, int b, const double *cap, double *x) {
    const int g = b - a;
    plan_scale_t m[PLAN_MAX_NODES]; // (g) each member's scaled model
    double cap_sum = 0, hi = 0;
    for (int i = 0; i < g; i++) {
        plan_scale_of(pm, p, a, a + i, false, &m[i]);
        cap_sum += cap[i];
        hi = fmax(hi, plan_member_ms(pm, p, a, b, a + i));
    }
    if (cap_sum < 1 - 1e-9 || !(hi > 0)) return false;
    double sum = 0;
    for (int grow = 0; grow < 60; grow++, hi *= 2) { // a time at which the caps are reached
        sum = 0;
        for (int i = 0; i < g; i++) sum += plan_scale_max(&m[i], hi, cap[i]);
        if (sum >= 1) break;
    }
    if (sum < 1) return false;
    double lo = 0;
    for (int it = 0; it < 40; it++) {
        const double mid = 0.5 * (lo + hi);
        sum = 0;
        for (int i = 0; i < g; i++) sum += plan_scale_max(&m[i], mid, cap[i]);
        if (sum >= 1) hi = mid;
        else lo = mid;
    }
    for (int i = 0; i < g; i++) x[i] = plan_scale_max(&m[i], hi, cap[i]);
    return true;
}

// A streaming stage's split moved toward equal member times (disk reads included), within the
// caps; keeps the best split tried. use holds the weights of the split in place and is updated.
static void rebalance_stage(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *cap,
                            double *use) {
    const int g = b - a;
    double best[PLAN_MAX_NODES], x[PLAN_MAX_NODES], sw[PLAN_MAX_NODES]; // (g) best weights, equal-time shares, capped
    memcpy(best, use, sizeof *use * (size_t)g);
    double best_t = 0, least = INFINITY;
    for (int i = a; i < b; i++) {
        const double t = plan_member_ms(pm, p, a, b, i);
        best_t = fmax(best_t, t);
        least = fmin(least, t);
    }
    if (best_t <= least * 1.01) return; // balanced already
    bool moved = false;
    for (int round = 0; round < PLAN_REBALANCE_ROUNDS && equal_time_shares(pm, p, a, b, cap, x); round++) {
        bool bound;
        plan_waterfill(1.0, x, cap, g, sw, &bound);
        for (int i = 0; i < g; i++) use[i] = bound ? sw[i] : x[i];
        split_stage(pm, p, a, b, l0, l1, use);
        bool ok = true;
        for (int i = a; i < b; i++) ok &= plan_size_shard(pm, p, i, true);
        const double t = ok ? stage_solo_ms(pm, p, a, b) : INFINITY;
        moved = true;
        if (!(t < best_t * (1 - 1e-6))) break;
        best_t = t;
        memcpy(best, use, sizeof *use * (size_t)g);
        moved = false;
    }
    if (moved) { // the last try was no better: back to the best
        memcpy(use, best, sizeof *use * (size_t)g);
        split_stage(pm, p, a, b, l0, l1, use);
        for (int i = a; i < b; i++) plan_size_shard(pm, p, i, true);
    }
}

// --- internal API (plan_impl.h)

void plan_split_units(int units, int grain, const double *w, int n, int *lo, int *hi) {
    const int ngr = (units + grain - 1) / grain;
    double total = 0;
    for (int i = 0; i < n; i++) total += w[i];
    int cnt[PLAN_MAX_NODES], given = 0;
    double frac[PLAN_MAX_NODES];
    for (int i = 0; i < n; i++) {
        double exact = total > 0 ? ngr * w[i] / total : (double)ngr / n;
        cnt[i] = (int)floor(exact);
        frac[i] = exact - cnt[i];
        given += cnt[i];
    }
    while (given < ngr) { // hand out the rest by largest remainder (lowest index on ties)
        int best = 0;
        for (int i = 1; i < n; i++)
            if (frac[i] > frac[best]) best = i;
        cnt[best]++;
        frac[best] = -1;
        given++;
    }
    int at = 0;
    for (int i = 0; i < n; i++) {
        lo[i] = at * grain < units ? at * grain : units;
        at += cnt[i];
        hi[i] = at * grain < units ? at * grain : units;
    }
}

void plan_short_add(plan_short_t *sh, const plan_t *p, int a, int b) {
    for (int i = a; i < b; i++) {
        const plan_shard_t *s = &p->shard[i];
        const uint64_t bud = p->node[s->node].mem_budget;
        sh->need += s->peak_bytes;
        sh->have += bud ? bud : s->peak_bytes;
        sh->stream |= s->st.streams;
        if (bud && s->peak_bytes > bud && s->peak_bytes - bud > sh->worst_short) {
            sh->worst_short = s->peak_bytes - bud;
            sh->worst_node = s->node;
        }
        const uint64_t cap = p->node[s->node].kv_cap;
        if (cap && s->kv_dev_bytes > cap && s->kv_dev_bytes - cap > sh->dev_short) {
            sh->dev_short = s->kv_dev_bytes - cap;
            sh->dev_node = s->node;
        }
    }
}

int plan_fit_stage(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *w, unsigned flags,
                   plan_short_t *sh) {
    const int g = b - a;
    const bool adjust = flags & PLAN_FIT_ADJUST, stream = flags & PLAN_FIT_STREAM;
    double cap[PLAN_MAX_NODES] = {0}; // (g) the most each member's share may be (fractions of the stage)
    double use[PLAN_MAX_NODES] = {0}; // (g) the weights the split in place was cut by
    const bool resident = !stream || resident_possible(pm, p, a, b, l0, l1);
    if (resident && fit_members(pm, p, a, b, l0, l1, w, adjust, false, cap, use)) return 0;
    if (stream && fit_members(pm, p, a, b, l0, l1, w, adjust, true, cap, use)) {
        if (adjust && (flags & PLAN_FIT_BALANCE) && g > 1) rebalance_stage(pm, p, a, b, l0, l1, cap, use);
        return 0;
    }
    if (sh) plan_short_add(sh, p, a, b);
    return MLM_EFULL;
}

void plan_layout_name(plan_t *p) {
    const int S = p->n_stages;
    bool ones = true, equal = true;
    for (int k = 0; k < S; k++) {
        const int sz = p->stage_first[k + 1] - p->stage_first[k];
        if (sz != 1) ones = false;
        if (sz != p->stage_first[1] - p->stage_first[0]) equal = false;
    }
    if (S == 1) snprintf(p->layout, sizeof p->layout, "tp%d", p->n);
    else if (ones) snprintf(p->layout, sizeof p->layout, "pp%d", S);
    else if (equal) snprintf(p->layout, sizeof p->layout, "pp%dxtp%d", S, p->stage_first[1]);
    else {
        size_t at = (size_t)snprintf(p->layout, sizeof p->layout, "pp%d (", S);
        for (int k = 0; k < S; k++) {
            char part[16];
            int len = snprintf(part, sizeof part, "%s%d", k ? "+" : "", p->stage_first[k + 1] - p->stage_first[k]);
            if (at + (size_t)len + 2 > sizeof p->layout) {
                snprintf(p->layout + (at < sizeof p->layout - 5 ? at : sizeof p->layout - 5),
                         sizeof p->layout - (at < sizeof p->layout - 5 ? at : sizeof p->layout - 5), "+..)");
                return;
            }
            memcpy(p->layout + at, part, (size_t)len);
            at += (size_t)len;
        }
        p->layout[at++] = ')';
        p->layout[at] = 0;
    }
}

void plan_fmt_bytes(char *buf, size_t cap, uint64_t b) {
    if (b >= (1ull << 30)) snprintf(buf, cap, "%.2f GiB", (double)b / (1ull << 30));
    else if (b >= (1ull << 20)) snprintf(buf, cap, "%.1f MiB", (double)b / (1ull << 20));
    else snprintf(buf, cap, "%.1f KiB", (double)b / 1024.0);
}

void plan_fmt_weights(char *buf, size_t cap, const plan_shard_t *s) {
    if (s->ep_cached > 0) snprintf(buf, cap, "cache %d of %d", s->ep_cached, s->ep_cache_of);
    else if (s->ep_pool > 0) snprintf(buf, cap, "pool of %d", s->ep_pool);
    else if (s->st.streams) snprintf(buf, cap, "%d (%d/%d units)", s->st.window, s->st.pinned, s->st.n_units);
    else snprintf(buf, cap, "- (resident)");
}

void plan_short_message(char *err, size_t errlen, const plan_short_t *sh, const plan_node_t *nodes, const char *where) {
    char a[32], b[32], c[32], d[32], m[32];
    plan_fmt_bytes(a, sizeof a, sh->need);
    plan_fmt_bytes(b, sizeof b, sh->have);
    plan_fmt_bytes(c, sizeof c, sh->need > sh->have ? sh->need - sh->have : sh->worst_short);
    plan_fmt_bytes(d, sizeof d, sh->worst_short);
    const int wn = sh->worst_node >= 0 ? sh->worst_node : 0;
    if (sh->dev_short && !sh->worst_short) { // every budget holds its share: a KV device is too small
        const plan_node_t *nd = &nodes[sh->dev_node];
        plan_fmt_bytes(m, sizeof m, nd->kv_cap + sh->dev_short);
        plan_fmt_bytes(b, sizeof b, nd->kv_cap);
        plan_fmt_bytes(d, sizeof d, sh->dev_short);
        snprintf(err, errlen,
                 "the KV cache does not fit: in %s node %d (%s) keeps %s of KV on its %s device, which holds %s "
                 "(%s short)", where ? where : "the plan", sh->dev_node, nd->name, m, plan_kv_dev_name(nd->kv_dev), b, d);
        return;
    }
    if (sh->stream) {
        plan_fmt_bytes(m, sizeof m, nodes[wn].mem_budget + sh->worst_short);
        plan_fmt_bytes(b, sizeof b, nodes[wn].mem_budget);
        snprintf(err, errlen,
                 "the model does not fit even streaming its weights from disk: in %s node %d (%s) needs a budget "
                 "of at least %s (its KV cache, activations and one unit of weights) but has %s (%s short)",
                 where ? where : "the plan", wn, nodes[wn].name, m, b, d);
        return;
    }
    snprintf(err, errlen,
             "the model does not fit: %s needs %s in all and the nodes' budgets give %s (%s missing); node %d (%s) "
             "is %s short even with the smallest share it can take",
             where ? where : "the plan", a, b, c, wn, nodes[wn].name, d);
}

// --- public API

int plan_model_from_gguf(const gguf_t *g, plan_model_t *pm, char *err, size_t errlen) {
    memset(pm, 0, sizeof *pm);
    model_hparams_t hpv;
    int rc = hparams_read(g, &hpv, err, errlen);
    if (rc != 0) return rc;
    const model_hparams_t *hp = &hpv;
    if (hp->n_layer < 1 || hp->n_layer > PLAN_MAX_LAYERS)
        return mlm_fail(err, errlen, MLM_ERANGE, "%d blocks: the planner handles 1..%d", hp->n_layer, PLAN_MAX_LAYERS);
    snprintf(pm->name, sizeof pm->name, "%.63s", hp->arch);
    pm->n_vocab = hp->n_vocab;
    pm->n_embd = hp->n_embd;
    pm->n_layer = hp->n_layer;
    pm->n_head = hp->n_head;
    pm->n_head_kv = hp->n_head_kv;
    pm->head_dim = hp->head_dim;
    pm->n_ff = hp->n_ff;
    pm->n_expert = hp->n_expert;
    pm->n_expert_used = hp->n_expert_used;
    pm->tied_output = hp->tied_output;
    pm->wtype = qtype_from_name(hp->type_name);
    if (pm->wtype < 0) pm->wtype = QT_F32;
    pm->weight_bytes = hp->weight_bytes;
    const bool moe = hp->n_expert > 0;
    static const char *const dense[PLAN_W_MATS] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_gate", "ffn_up", "ffn_down"};
    static const char *const exps[PLAN_W_MATS] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
    double mat_bytes = 0, mat_elems = 0;
    char name[96];
    for (int il = 0; il < hp->n_layer; il++) {
        for (int k = 0; k < PLAN_W_MATS; k++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", il, moe ? exps[k] : dense[k]);
            const gguf_tensor_t *t = gguf_find_tensor(g, name);
            if (!t) continue;
            pm->row_bytes[il][k] = qtype_row_size(t->type, t->ne[0]);
            if (blck_of(t->type) > pm->col_block[k]) pm->col_block[k] = blck_of(t->type);
            mat_bytes += (double)t->nbytes;
            mat_elems += (double)t->ne[0] * (double)(t->ne[1] > 0 ? t->ne[1] : 1) * (double)(t->ne[2] > 0 ? t->ne[2] : 1);
        }
        const char *vecs[] = {"attn_norm", "ffn_norm", "ffn_gate_inp"};
        for (size_t k = 0; k < sizeof vecs / sizeof *vecs; k++) {
            if (k == 2 && !moe) continue;
            snprintf(name, sizeof name, "blk.%d.%s.weight", il, vecs[k]);
            const gguf_tensor_t *t = gguf_find_tensor(g, name);
            if (t) pm->vec_bytes[il] += t->nbytes;
        }
    }
    const gguf_tensor_t *te = gguf_find_tensor(g, "token_embd.weight");
    const gguf_tensor_t *to = gguf_find_tensor(g, "output.weight");
    const gguf_tensor_t *tn = gguf_find_tensor(g, "output_norm.weight");
    if (te) pm->embd_row_bytes = qtype_row_size(te->type, te->ne[0]);
    if (!to) to = te;
    if (to) pm->out_row_bytes = qtype_row_size(to->type, to->ne[0]);
    if (tn) pm->out_norm_bytes = tn->nbytes;
    pm->bytes_per_weight = mat_elems > 0 ? mat_bytes / mat_elems : 4.0;
    return 0;
}

int plan_model_from_preset(const char *name, const char *quant, plan_model_t *pm, char *err, size_t errlen) {
    const model_preset_t *ps = model_preset_find(name);
    memset(pm, 0, sizeof *pm);
    if (!ps) {
        size_t at = (size_t)snprintf(err, errlen, "no preset '%s' (have:", name ? name : "");
        for (int i = 0; model_preset_at(i) && at < errlen; i++)
            at += (size_t)snprintf(err + at, errlen - at, " %s", model_preset_at(i)->name);
        if (at < errlen) snprintf(err + at, errlen - at, ")");
        return MLM_ENOTFOUND;
    }
    const int type = qtype_from_name(quant ? quant : "Q4_0");
    const qtype_traits_t *tr = type >= 0 ? qtype_traits(type) : NULL;
    if (!tr || !tr->has_kernels)
        return mlm_fail(err, errlen, MLM_EINVAL,
                        "unknown or unsupported weight type '%s' (e.g. Q4_0, Q8_0, Q4_K, Q6_K, F16)",
                        quant ? quant : "");
    if (ps->n_layer > PLAN_MAX_LAYERS)
        return mlm_fail(err, errlen, MLM_ERANGE, "%d blocks: the planner handles 1..%d", ps->n_layer, PLAN_MAX_LAYERS);
    snprintf(pm->name, sizeof pm->name, "%s", ps->name);
    pm->n_vocab = ps->n_vocab;
    pm->n_embd = ps->n_embd;
    pm->n_layer = ps->n_layer;
    pm->n_head = ps->n_head;
    pm->n_head_kv = ps->n_head_kv;
    pm->head_dim = ps->n_embd / ps->n_head;
    pm->n_ff = ps->n_ff;
    pm->n_expert = ps->n_expert;
    pm->n_expert_used = ps->n_expert_used;
    pm->tied_output = false;
    pm->wtype = type;
    const int64_t ne = ps->n_embd, qd = (int64_t)ps->n_head * pm->head_dim;
    const double nexp = ps->n_expert > 0 ? ps->n_expert : 1;
    double mat_bytes = 0, mat_elems = 0;
    for (int il = 0; il < ps->n_layer; il++) {
        uint64_t *r = pm->row_bytes[il];
        r[PLAN_W_Q] = r[PLAN_W_K] = r[PLAN_W_V] = row_size_or(type, ne);
        r[PLAN_W_O] = row_size_or(type, qd);
        r[PLAN_W_GATE] = r[PLAN_W_UP] = row_size_or(type, ne);
        r[PLAN_W_DOWN] = row_size_or(type, ps->n_ff);
        pm->vec_bytes[il] = 2u * 4u * (uint64_t)ne + (ps->n_expert > 0 ? 4u * (uint64_t)ne * ps->n_expert : 0);
        const int64_t rows[PLAN_W_MATS] = {ne, ne, ne, qd, ne, ne, ps->n_ff}; // row lengths
        for (int k = 0; k < PLAN_W_MATS; k++) pm->col_block[k] = blck_of(row_type_or(type, rows[k]));
        const double kvd = (double)ps->n_head_kv * pm->head_dim;
        mat_bytes += r[PLAN_W_Q] * (double)qd + (r[PLAN_W_K] + r[PLAN_W_V]) * kvd + r[PLAN_W_O] * (double)ne +
                     nexp * ((r[PLAN_W_GATE] + r[PLAN_W_UP]) * (double)ps->n_ff + r[PLAN_W_DOWN] * (double)ne);
        mat_elems += (double)ne * (double)qd * 2 + 2.0 * ne * kvd + nexp * 3.0 * ne * ps->n_ff;
        pm->weight_bytes += pm->vec_bytes[il];
    }
    pm->embd_row_bytes = pm->out_row_bytes = row_size_or(type, ne);
    pm->out_norm_bytes = 4u * (uint64_t)ne;
    pm->weight_bytes += (uint64_t)mat_bytes + 2u * pm->embd_row_bytes * (uint64_t)ps->n_vocab + pm->out_norm_bytes;
    pm->bytes_per_weight = mat_bytes / mat_elems;
    return 0;
}

