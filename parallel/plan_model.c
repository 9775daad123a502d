// Planner model: what a model weighs per row (from a file or a preset), stage fitting within budgets, predicted cost.
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

// Sums over blocks [l0, l1) of the per-row bytes of each matrix and of the whole vectors.
typedef struct {
    double r[PLAN_W_MATS];  // bytes of one row of each matrix, summed over the blocks
    double vec;             // norms and routers of the blocks
} range_sums_t;

static void range_sums(const plan_model_t *pm, int l0, int l1, range_sums_t *rs) {
    memset(rs, 0, sizeof *rs);
    for (int il = l0; il < l1; il++) {
        for (int k = 0; k < PLAN_W_MATS; k++) rs->r[k] += (double)pm->row_bytes[il][k];
        rs->vec += (double)pm->vec_bytes[il];
    }
}

static uint64_t act_bytes(const plan_model_t *pm, bool last) {
    const uint64_t hd = (uint64_t)pm->head_dim;
    uint64_t act = PLAN_ACT_BATCH * 4u *
                   ((uint64_t)pm->n_embd * 6u + (uint64_t)pm->n_head * hd * 2u + (uint64_t)pm->n_ff * 3u);
    if (last) act += (uint64_t)pm->n_vocab * 4u * 2u;
    return act;
}

// Weight, KV and peak bytes of a shard whose slice is set.
static void shard_bytes(const plan_model_t *pm, const range_sums_t *rs, plan_shard_t *s, int n_ctx) {
    const shard_slice_t *sl = &s->s;
    const double hd = pm->head_dim, nexp = pm->n_expert > 0 ? pm->n_expert : 1;
    const double h = sl->h1 - sl->h0, kv = sl->kv1 - sl->kv0, e = sl->e1 - sl->e0, f = sl->f1 - sl->f0,
                 v = sl->v1 - sl->v0;
    const bool first = sl->l0 == 0, last = sl->l1 == pm->n_layer;
    double w = rs->r[PLAN_W_Q] * h * hd + (rs->r[PLAN_W_K] + rs->r[PLAN_W_V]) * kv * hd + rs->r[PLAN_W_O] * e +
               rs->vec + (rs->r[PLAN_W_GATE] + rs->r[PLAN_W_UP]) * f * nexp + rs->r[PLAN_W_DOWN] * e * nexp;
    if (last) w += (double)pm->out_norm_bytes + (double)pm->out_row_bytes * v;
    if (first && !(last && pm->tied_output)) w += (double)pm->embd_row_bytes * v;
    s->weight_bytes = (uint64_t)llround(w);
    s->kv_bytes = (uint64_t)(sl->l1 - sl->l0) * (uint64_t)n_ctx * (uint64_t)(sl->kv1 - sl->kv0) *
                  (uint64_t)pm->head_dim * 2u * 2u;
    s->peak_bytes = s->weight_bytes + s->kv_bytes + act_bytes(pm, last);
}

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

// Work of one shard per token (or per micro-batch of u tokens): matrix elements multiplied and
// weight bytes read.
static void shard_work(const plan_model_t *pm, const range_sums_t *rs, const plan_shard_t *s, int u, double *elems,
                       double *bytes) {
    const shard_slice_t *sl = &s->s;
    const double hd = pm->head_dim, ne = pm->n_embd, L = sl->l1 - sl->l0;
    const double h = sl->h1 - sl->h0, kv = sl->kv1 - sl->kv0, e = sl->e1 - sl->e0, f = sl->f1 - sl->f0,
                 v = sl->v1 - sl->v0;
    const bool moe = pm->n_expert > 0;
    const double k_used = moe ? (pm->n_expert_used > 0 ? pm->n_expert_used : 1) : 1;
    // Experts a micro-batch touches (each token picks k of E at random).
    double k_read = k_used;
    if (moe && u > 1) k_read = pm->n_expert * (1 - pow(1 - k_used / pm->n_expert, u));
    double el = L * (h * hd * ne + 2 * kv * hd * ne + e * pm->n_head * hd + 2 * f * ne * k_used +
                     e * pm->n_ff * k_used + (moe ? ne * pm->n_expert : 0));
    double by = rs->r[PLAN_W_Q] * h * hd + (rs->r[PLAN_W_K] + rs->r[PLAN_W_V]) * kv * hd + rs->r[PLAN_W_O] * e +
                rs->vec + (rs->r[PLAN_W_GATE] + rs->r[PLAN_W_UP]) * f * k_read + rs->r[PLAN_W_DOWN] * e * k_read;
    if (sl->l1 == pm->n_layer) {
        el += v * ne;
        by += (double)pm->out_row_bytes * v + (double)pm->out_norm_bytes;
    }
    *elems = el * u;
    *bytes = by;
}

static double max2(double a, double b) { return a > b ? a : b; }
static double min2(double a, double b) { return a < b ? a : b; }

// ms for an all-gather of bytes[i] from each member of p->shard[a..b).
static double allgather_ms(const plan_t *p, int a, int b, const double *bytes) {
    const int g = b - a;
    if (g < 2) return 0;
    double total = 0, lat = 0, worst = 0;
    for (int i = 0; i < g; i++) total += bytes[i];
    for (int i = 0; i < g; i++) {
        const plan_node_t *nd = &p->node[p->shard[a + i].node];
        lat = max2(lat, plan_node_lat_us(nd));
        worst = max2(worst, max2(bytes[i] * (g - 1), total - bytes[i]) / plan_node_link_bw(nd));
    }
    return lat / 1e3 + worst * 1e3;
}

// One stage's exchanges for u tokens: its per-block all-gathers and, on the first stage, the
// embedding rows.
static double stage_comm_ms(const plan_model_t *pm, const plan_t *p, int a, int b, int u) {
    const int g = b - a;
    if (g < 2) return 0;
    double attn[PLAN_MAX_NODES], orow[PLAN_MAX_NODES], ffn[PLAN_MAX_NODES], down[PLAN_MAX_NODES];
    const double k_used = pm->n_expert > 0 ? (pm->n_expert_used > 0 ? pm->n_expert_used : 1) : 1;
    for (int i = 0; i < g; i++) {
        const shard_slice_t *sl = &p->shard[a + i].s;
        attn[i] = 4.0 * u * (sl->h1 - sl->h0) * pm->head_dim;
        orow[i] = 4.0 * u * (sl->e1 - sl->e0);
        ffn[i] = 4.0 * u * (sl->f1 - sl->f0) * k_used;
        down[i] = orow[i];
    }
    const shard_slice_t *s0 = &p->shard[a].s;
    double t = (s0->l1 - s0->l0) *
               (allgather_ms(p, a, b, attn) + allgather_ms(p, a, b, orow) + allgather_ms(p, a, b, ffn) +
                allgather_ms(p, a, b, down));
    if (s0->l0 == 0) { // the token's embedding row, from whichever member holds it (worst case)
        double lat = 0, worst = 0;
        for (int i = 0; i < g; i++) {
            const plan_node_t *nd = &p->node[p->shard[a + i].node];
            lat = max2(lat, plan_node_lat_us(nd));
            worst = max2(worst, 4.0 * u * pm->n_embd * (g - 1) / plan_node_link_bw(nd));
        }
        t += lat / 1e3 + worst * 1e3;
    }
    return t;
}

// Stage k hands u rows of the residual stream from its first member to every member of stage k+1.
static double handoff_ms(const plan_model_t *pm, const plan_t *p, int k, int u) {
    const int a = p->stage_first[k + 1], b = p->stage_first[k + 2];
    const plan_node_t *lead = &p->node[p->shard[p->stage_first[k]].node];
    const double row = 4.0 * u * pm->n_embd;
    double lat = plan_node_lat_us(lead), t = row * (b - a) / plan_node_link_bw(lead);
    for (int i = a; i < b; i++) {
        const plan_node_t *nd = &p->node[p->shard[i].node];
        lat = max2(lat, plan_node_lat_us(nd));
        t = max2(t, row / plan_node_link_bw(nd));
    }
    return lat / 1e3 + t * 1e3;
}

// The coordinator (offered node 0) sends the step to the first stage and receives the last stage's
// logit rows; what it computes itself does not travel.
static double coordinator_ms(const plan_model_t *pm, const plan_t *p) {
    const plan_node_t *coord = p->n_nodes > 0 ? &p->node[0] : NULL;
    double c_lat = coord ? plan_node_lat_us(coord) : PLAN_DEFAULT_LAT_US;
    double c_bw = coord ? plan_node_link_bw(coord) : PLAN_DEFAULT_LINK_BW;
    const int local = p->coord_apart ? -1 : 0; // the offered node whose share needs no message
    for (int i = 0; p->coord_apart && i < p->n_nodes; i++) { // a coordinator apart: the best link offered
        c_lat = i == 0 ? plan_node_lat_us(&p->node[i]) : min2(c_lat, plan_node_lat_us(&p->node[i]));
        c_bw = i == 0 ? plan_node_link_bw(&p->node[i]) : max2(c_bw, plan_node_link_bw(&p->node[i]));
    }
    double t = 0, lat = 0;
    bool any = false;
    for (int i = p->stage_first[0]; i < p->stage_first[1]; i++)
        if (p->shard[i].node != local) any = true, lat = max2(lat, plan_node_lat_us(&p->node[p->shard[i].node]));
    if (any) t += max2(lat, c_lat) / 1e3;
    double sum = 0, worst = 0;
    lat = 0;
    any = false;
    for (int i = p->stage_first[p->n_stages - 1]; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        if (s->node == local || s->s.v1 <= s->s.v0) continue;
        const plan_node_t *nd = &p->node[s->node];
        const double b = 4.0 * (s->s.v1 - s->s.v0);
        any = true;
        sum += b;
        lat = max2(lat, plan_node_lat_us(nd));
        worst = max2(worst, b / plan_node_link_bw(nd));
    }
    (void)pm;
    if (any) t += max2(lat, c_lat) / 1e3 + max2(worst, sum / c_bw) * 1e3;
    return t;
}

static uint64_t row_size_or(int type, int64_t n) {
    if (n <= 0) return 0;
    size_t r = qtype_row_size((qtype_t)type, n);
    if (!r) r = qtype_row_size(QT_Q8_0, n);
    if (!r) r = qtype_row_size(QT_F16, n);
    return r;
}

// --- internal API (plan_impl.h)

double plan_node_gflops(const plan_node_t *nd) {
    if (nd->gflops > 0) return nd->gflops;
    return PLAN_GFLOPS_PER_SPEED * (nd->speed > 0 ? nd->speed : 1.0);
}

double plan_node_mem_bw(const plan_node_t *nd) { return nd->mem_bw > 0 ? nd->mem_bw : PLAN_DEFAULT_MEM_BW; }

// What the matmuls get of a measured bandwidth when they stream weights (the default is already
// such a figure).
static double stream_bw(const plan_node_t *nd) {
    return nd->mem_bw > 0 ? nd->mem_bw * PLAN_MEM_EFFICIENCY : PLAN_DEFAULT_MEM_BW;
}
double plan_node_lat_us(const plan_node_t *nd) { return nd->lat_us > 0 ? nd->lat_us : PLAN_DEFAULT_LAT_US; }
double plan_node_link_bw(const plan_node_t *nd) { return nd->link_bw > 0 ? nd->link_bw : PLAN_DEFAULT_LINK_BW; }

double plan_node_rate(const plan_model_t *pm, const plan_node_t *nd) {
    const double bpw = pm && pm->bytes_per_weight > 0 ? pm->bytes_per_weight : 0.5625;
    const double t = max2(2.0 / (plan_node_gflops(nd) * 1e9), bpw / stream_bw(nd));
    return 1.0 / t;
}

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
        if (bud && s->peak_bytes > bud && s->peak_bytes - bud > sh->worst_short) {
            sh->worst_short = s->peak_bytes - bud;
            sh->worst_node = s->node;
        }
    }
}

int plan_fit_stage(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *w, bool adjust,
                   plan_short_t *sh) {
    const int g = b - a, group = pm->n_head / (pm->n_head_kv > 0 ? pm->n_head_kv : 1);
    const bool first = l0 == 0, last = l1 == pm->n_layer;
    range_sums_t rs;
    range_sums(pm, l0, l1, &rs);
    double cap[PLAN_MAX_NODES], sw[PLAN_MAX_NODES];
    for (int i = 0; i < g; i++) cap[i] = 1.0;
    for (int iter = 0; iter < FIT_ITERS; iter++) {
        bool bound, ok = plan_waterfill(1.0, w, cap, g, sw, &bound);
        const double *use = bound ? sw : w; // unbounded: the weights themselves (plan_tp's exact splits)
        int lo[PLAN_MAX_NODES], hi[PLAN_MAX_NODES];
        plan_split_units(pm->n_head, 1, use, g, lo, hi);
        for (int i = 0; i < g; i++) {
            shard_slice_t *s = &p->shard[a + i].s;
            memset(s, 0, sizeof *s);
            s->l0 = l0;
            s->l1 = l1;
            s->h0 = lo[i];
            s->h1 = hi[i];
            s->kv0 = s->h1 > s->h0 ? s->h0 / group : 0;
            s->kv1 = s->h1 > s->h0 ? (s->h1 - 1) / group + 1 : 0;
        }
        plan_split_units(pm->n_embd, PLAN_HIDDEN_GRAIN, use, g, lo, hi);
        for (int i = 0; i < g; i++) p->shard[a + i].s.e0 = lo[i], p->shard[a + i].s.e1 = hi[i];
        plan_split_units(pm->n_ff, PLAN_FFN_GRAIN, use, g, lo, hi);
        for (int i = 0; i < g; i++) p->shard[a + i].s.f0 = lo[i], p->shard[a + i].s.f1 = hi[i];
        if (first || last) {
            plan_split_units(pm->n_vocab, PLAN_VOCAB_GRAIN, use, g, lo, hi);
            for (int i = 0; i < g; i++) p->shard[a + i].s.v0 = lo[i], p->shard[a + i].s.v1 = hi[i];
        }
        bool over = false;
        for (int i = 0; i < g; i++) {
            plan_shard_t *s = &p->shard[a + i];
            s->weight = use[i];
            shard_bytes(pm, &rs, s, p->n_ctx);
            const uint64_t bud = p->node[s->node].mem_budget;
            if (!bud || s->peak_bytes <= bud) continue;
            over = true;
            if (!adjust) continue;
            // What it holds with no rows at all: the blocks' vectors, the output norm, activations.
            plan_shard_t empty = *s;
            memset(&empty.s, 0, sizeof empty.s);
            empty.s.l0 = l0;
            empty.s.l1 = l1;
            shard_bytes(pm, &rs, &empty, p->n_ctx);
            const double fixed = (double)empty.peak_bytes, var = (double)s->peak_bytes - fixed;
            double share = 0, tot = 0;
            for (int j = 0; j < g; j++) tot += use[j];
            share = tot > 0 ? use[i] / tot : 0;
            if ((double)bud <= fixed || var <= 0) cap[i] = 0;
            else cap[i] = fmin(cap[i], share * ((double)bud - fixed) / var * 0.995);
            if (cap[i] < 1e-9) cap[i] = 0;
        }
        if (!over) return 0;
        if (!adjust || !ok) break;
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

void plan_short_message(char *err, size_t errlen, const plan_short_t *sh, const plan_node_t *nodes, const char *where) {
    char a[32], b[32], c[32], d[32];
    plan_fmt_bytes(a, sizeof a, sh->need);
    plan_fmt_bytes(b, sizeof b, sh->have);
    plan_fmt_bytes(c, sizeof c, sh->need > sh->have ? sh->need - sh->have : sh->worst_short);
    plan_fmt_bytes(d, sizeof d, sh->worst_short);
    const int wn = sh->worst_node >= 0 ? sh->worst_node : 0;
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

void plan_predict(const plan_model_t *pm, plan_t *p) {
    const int u = p->ubatch > 0 ? p->ubatch : PLAN_DEFAULT_UBATCH;
    const int n_prompt = p->n_prompt > 0 ? p->n_prompt : PLAN_DEFAULT_N_PROMPT;
    plan_cost_t c = {0};
    double worst_stage = 0; // prefill: the slowest stage's time for one micro-batch
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        if (b <= a) continue;
        range_sums_t rs;
        range_sums(pm, p->shard[a].s.l0, p->shard[a].s.l1, &rs);
        double mc = 0, mm = 0, mt = 0, pt = 0;
        for (int i = a; i < b; i++) {
            const plan_node_t *nd = &p->node[p->shard[i].node];
            double el, by;
            shard_work(pm, &rs, &p->shard[i], 1, &el, &by);
            const double tc = 2 * el / (plan_node_gflops(nd) * 1e9) * 1e3, tm = by / stream_bw(nd) * 1e3;
            mc = max2(mc, tc);
            mm = max2(mm, tm);
            mt = max2(mt, max2(tc, tm));
            // A batched micro-batch costs u tokens' decode time divided by the speed-up, but never
            // less than reading the weights once.
            const double pc = u * max2(tc, tm) / PLAN_PREFILL_SPEEDUP;
            shard_work(pm, &rs, &p->shard[i], u, &el, &by);
            pt = max2(pt, max2(pc, by / stream_bw(nd) * 1e3));
        }
        double comm = stage_comm_ms(pm, p, a, b, 1), pcomm = stage_comm_ms(pm, p, a, b, u);
        if (k + 1 < p->n_stages) {
            comm += handoff_ms(pm, p, k, 1);
            pcomm += handoff_ms(pm, p, k, u);
        }
        c.compute_ms += mc;
        c.memory_ms += mm;
        c.comm_ms += comm;
        c.token_ms += mt + comm;
        worst_stage = max2(worst_stage, pt + pcomm);
    }
    const double coord = coordinator_ms(pm, p);
    c.comm_ms += coord;
    c.token_ms += coord;
    const int micro = (n_prompt + u - 1) / u;
    const double prefill_ms = (micro + p->n_stages - 1) * worst_stage + coord;
    c.prefill_tok_s = prefill_ms > 0 ? n_prompt / (prefill_ms / 1e3) : 0;
    p->cost = c;
}
