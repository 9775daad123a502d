// Planner memory rule: what a share weighs block by block in either tensor-parallel mode, and the window it streams through.
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_impl.h"
#include "core/err.h"

// --- helpers

// Bytes of the activation buffers (PLAN_ACT_BATCH tokens); the last stage also holds logits.
static uint64_t act_bytes(const plan_model_t *pm, bool last) {
    const uint64_t hd = (uint64_t)pm->head_dim;
    uint64_t act = PLAN_ACT_BATCH * 4u *
                   ((uint64_t)pm->n_embd * 6u + (uint64_t)pm->n_head * hd * 2u + (uint64_t)pm->n_ff * 3u);
    if (last) act += (uint64_t)pm->n_vocab * 4u * 2u;
    return act;
}

// Bytes of `cols` columns of rows `row_bytes` long holding `total` columns, whole blocks assumed
// (rounded up when the cut is not on a block boundary).
static uint64_t col_bytes(uint64_t row_bytes, int cols, int total) {
    if (total <= 0 || cols <= 0) return 0;
    return (row_bytes * (uint64_t)cols + (uint64_t)total - 1) / (uint64_t)total;
}

// Bytes of block il of slice s: its rows of q/k/v/gate/up, its rows (exact) or columns
// (all-reduce) of attn_output and ffn_down, and the block's vectors.
static uint64_t block_bytes(const plan_model_t *pm, const shard_slice_t *s, int mode, int il) {
    const uint64_t *r = pm->row_bytes[il];
    const uint64_t hd = (uint64_t)pm->head_dim, nexp = pm->n_expert > 0 ? (uint64_t)pm->n_expert : 1u;
    const uint64_t h = (uint64_t)(s->h1 - s->h0), kv = (uint64_t)(s->kv1 - s->kv0), e = (uint64_t)(s->e1 - s->e0),
                   f = (uint64_t)(s->f1 - s->f0);
    uint64_t b = r[PLAN_W_Q] * h * hd + (r[PLAN_W_K] + r[PLAN_W_V]) * kv * hd + pm->vec_bytes[il] +
                 (r[PLAN_W_GATE] + r[PLAN_W_UP]) * f * nexp;
    if (mode == PLAN_TP_ALLREDUCE) {
        b += col_bytes(r[PLAN_W_O], s->h1 - s->h0, pm->n_head) * (uint64_t)pm->n_embd;
        b += col_bytes(r[PLAN_W_DOWN], s->f1 - s->f0, pm->n_ff) * (uint64_t)pm->n_embd * nexp;
    } else {
        b += r[PLAN_W_O] * e + r[PLAN_W_DOWN] * e * nexp;
    }
    return b;
}

static bool slice_ok(const plan_model_t *pm, const shard_slice_t *s) {
    return s->l0 >= 0 && s->l0 <= s->l1 && s->l1 <= pm->n_layer && s->h0 >= 0 && s->h0 <= s->h1 &&
           s->h1 <= pm->n_head && s->kv0 >= 0 && s->kv0 <= s->kv1 && s->kv1 <= pm->n_head_kv && s->e0 >= 0 &&
           s->e0 <= s->e1 && s->e1 <= pm->n_embd && s->f0 >= 0 && s->f0 <= s->f1 && s->f1 <= pm->n_ff &&
           s->v0 >= 0 && s->v0 <= s->v1 && s->v1 <= pm->n_vocab;
}

static int gcd(int a, int b) {
    while (b) {
        const int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// --- internal API (plan_impl.h)

// The part of a KV of kv bytes that node nd counts in its fixed bytes before its weights are sized.
static uint64_t kv_in_fixed(const plan_node_t *nd, uint64_t kv) {
    if (!nd) return kv;
    switch (nd->kv_dev) {
    case PLAN_KV_FILE: return nd->kv_ram ? (nd->kv_ram < kv ? nd->kv_ram : kv) : 0; // no fixed share: sized after
    case PLAN_KV_STORAGE:
    case PLAN_KV_PIM: return 0;
    default: return kv;
    }
}

int plan_size_share(const plan_model_t *pm, const shard_slice_t *s, int mode, int n_ctx, const plan_node_t *nd,
                    uint64_t budget, plan_stream_t *st, uint64_t *weights, uint64_t *kv, uint64_t *kv_fixed) {
    memset(st, 0, sizeof *st);
    if (!slice_ok(pm, s) || n_ctx < 0) return MLM_EINVAL;
    const bool first = s->l0 == 0, last = s->l1 == pm->n_layer;
    const uint64_t v = (uint64_t)(s->v1 - s->v0);
    uint64_t units = 0, biggest = 0;
    int n_units = 0;
    for (int il = s->l0; il < s->l1; il++, n_units++) {
        const uint64_t u = block_bytes(pm, s, mode, il);
        units += u;
        if (u > biggest) biggest = u;
    }
    const uint64_t out_unit = last ? pm->out_row_bytes * v : 0;
    if (out_unit) {
        units += out_unit;
        if (out_unit > biggest) biggest = out_unit;
        n_units++;
    }
    const uint64_t embd = first && !(last && pm->tied_output) ? pm->embd_row_bytes * v : 0;
    const uint64_t kv_b = (uint64_t)(s->l1 - s->l0) * (uint64_t)n_ctx * (uint64_t)(s->kv1 - s->kv0) *
                          (uint64_t)pm->head_dim * 2u * 2u;
    const uint64_t kv_f = kv_in_fixed(nd, kv_b);
    const uint64_t fixed = kv_f + act_bytes(pm, last) + (last ? pm->out_norm_bytes : 0);
    if (weights) *weights = units + embd + (last ? pm->out_norm_bytes : 0);
    if (kv) *kv = kv_b;
    if (kv_fixed) *kv_fixed = kv_f;
    st->n_units = n_units;
    st->unit_bytes = biggest;
    st->fixed_bytes = fixed;
    st->min_budget = fixed + biggest;
    if (!budget || fixed + units + embd <= budget) { // all resident, as without a budget
        st->pinned = n_units;
        st->pinned_bytes = units;
        st->resident_bytes = st->peak_bytes = fixed + units + embd;
        return 0;
    }
    st->streams = true;
    // The token's embedding row, read on demand by whichever member holds it.
    const uint64_t embd_tok = first && pm->n_vocab > 0 ? (uint64_t)llround((double)pm->embd_row_bytes * (double)v /
                                                                          (double)pm->n_vocab)
                                                       : 0;
    if (fixed + units <= budget) { // every unit fits once the embedding rows stay on disk
        st->pinned = n_units;
        st->pinned_bytes = units;
        st->resident_bytes = st->peak_bytes = fixed + units;
        st->stream_bytes = embd_tok;
        return 0;
    }
    if (st->min_budget > budget) { // describe the minimum: one buffer, nothing pinned
        st->window = n_units > 0 ? 1 : 0;
        st->resident_bytes = fixed;
        st->peak_bytes = st->min_budget;
        st->stream_bytes = units + embd_tok;
        return MLM_ERANGE;
    }
    int w = fixed + (uint64_t)PLAN_STREAM_WINDOW * biggest <= budget ? PLAN_STREAM_WINDOW : 1;
    uint64_t pinned = 0;
    int np = 0;
    for (int il = s->l0; il <= s->l1; il++) { // blocks in order, then the output rows
        const uint64_t u = il < s->l1 ? block_bytes(pm, s, mode, il) : out_unit;
        if (il == s->l1 && !out_unit) break;
        if (fixed + pinned + u + (uint64_t)w * biggest > budget) break;
        pinned += u;
        np++;
    }
    if (w > n_units - np) w = n_units - np;
    st->pinned = np;
    st->pinned_bytes = pinned;
    st->window = w;
    st->resident_bytes = fixed + pinned;
    st->peak_bytes = fixed + pinned + (uint64_t)w * biggest;
    st->stream_bytes = units - pinned + embd_tok;
    return 0;
}

bool plan_kv_place(const plan_node_t *nd, plan_shard_t *s, uint64_t kv_fixed) {
    uint64_t ram = kv_fixed;
    if (nd->kv_dev == PLAN_KV_FILE && !nd->kv_ram) { // the RAM share is what the budget leaves
        const uint64_t bud = nd->mem_budget, left = !bud ? s->kv_bytes : bud > s->peak_bytes ? bud - s->peak_bytes : 0;
        ram = left < s->kv_bytes ? left : s->kv_bytes;
        s->peak_bytes += ram;
        s->st.peak_bytes += ram;
        s->st.resident_bytes += ram;
    }
    s->kv_ram_bytes = ram;
    s->kv_dev_bytes = s->kv_bytes - ram;
    return !nd->kv_cap || s->kv_dev_bytes <= nd->kv_cap;
}

// Sliced share i of a MoE model over its budget with an expert cache (plan_t.ep_cache, exact mode, KV
// on the host): its dense parts, KV cache and activations resident, its rows of N experts per block in
// cache slots (N as the cache is asked, or as many as fit), the routed others read from disk when used
// (k of n_expert per block per token, a miss with 1 - N / n_expert: routing assumed uniform). False
// Below one per block (auto only) a pool of slots the blocks share, which hits little: every routed
// expert read (the "experts" provider's pool). False when not even one expert fits (the window then
// stays).
static bool cache_experts(const plan_model_t *pm, plan_t *p, int i, int rc) {
    plan_shard_t *s = &p->shard[i];
    const plan_node_t *nd = &p->node[s->node];
    const uint64_t bud = nd->mem_budget;
    const int ne = pm->n_expert, k = pm->n_expert_used > 0 ? pm->n_expert_used : 1;
    if ((rc != 0 && rc != MLM_ERANGE) || !p->ep_cache || p->ep || ne <= 0 || p->tp_mode != PLAN_TP_EXACT || !bud ||
        nd->kv_dev != PLAN_KV_HOST || !s->st.streams)
        return false;
    plan_stream_t all;
    uint64_t w = 0, kv = 0, kvf = 0;
    if (plan_size_share(pm, &s->s, PLAN_TP_EXACT, p->n_ctx, nd, 0, &all, &w, &kv, &kvf) != 0) return false;
    uint64_t ex = 0, one = 0, slot = 0; // its rows of one expert of every block, that in cache slots
    uint64_t slot1 = 0;                 // the largest of one block's in a slot
    double per_tok = 0;
    for (int il = s->s.l0; il < s->s.l1; il++) {
        const uint64_t *r = pm->row_bytes[il];
        const uint64_t e = (r[PLAN_W_GATE] + r[PLAN_W_UP]) * (uint64_t)(s->s.f1 - s->s.f0) +
                           r[PLAN_W_DOWN] * (uint64_t)(s->s.e1 - s->s.e0);
        one += e;
        slot += e + PLAN_EXPERT_SLOT_SLACK;
        if (e + PLAN_EXPERT_SLOT_SLACK > slot1) slot1 = e + PLAN_EXPERT_SLOT_SLACK;
    }
    ex = one * (uint64_t)ne;
    if (!one || all.resident_bytes < ex) return false;
    const uint64_t base = all.resident_bytes - ex; // KV, activations, dense parts, embedding rows
    if (base + slot > bud) {
        if (p->ep_cache > 0 || k >= ne || base + slot1 > bud) return false;
        const uint64_t np = (bud - base) / slot1;
        s->st = all;
        s->st.streams = true;
        s->st.window = 0;
        s->st.resident_bytes = s->st.peak_bytes = base + np * slot1;
        s->st.stream_bytes = (uint64_t)k * one;
        s->weight_bytes = w - ex + np * (slot1 - PLAN_EXPERT_SLOT_SLACK);
        s->peak_bytes = s->st.peak_bytes;
        s->ep_pool = (int)np;
        s->ep_cache_of = ne;
        return s->peak_bytes <= bud;
    }
    uint64_t n = p->ep_cache > 0 ? (uint64_t)p->ep_cache : (bud - base) / slot;
    if (n >= (uint64_t)ne) return false; // all of them would fit: nothing to cache away
    if (n < 1) n = 1;
    per_tok = (double)k * (1.0 - (double)n / ne) * (double)one;
    s->st = all;
    s->st.streams = true;
    s->st.window = 0;
    s->st.resident_bytes = s->st.peak_bytes = base + n * slot;
    s->st.stream_bytes = (uint64_t)per_tok;
    s->weight_bytes = w - one * ((uint64_t)ne - n);
    s->peak_bytes = s->st.peak_bytes;
    s->ep_cached = (int)n;
    s->ep_cache_of = ne;
    return s->peak_bytes <= bud;
}

bool plan_size_shard(const plan_model_t *pm, plan_t *p, int i, bool stream) {
    plan_shard_t *s = &p->shard[i];
    const plan_node_t *nd = &p->node[s->node];
    const uint64_t bud = nd->mem_budget;
    uint64_t kv_fixed = 0;
    int rc = plan_size_share(pm, &s->s, p->tp_mode, p->n_ctx, nd, stream ? bud : 0, &s->st, &s->weight_bytes,
                             &s->kv_bytes, &kv_fixed);
    s->peak_bytes = s->st.peak_bytes;
    s->ep_cached = s->ep_cache_of = s->ep_pool = 0;
    if (stream && cache_experts(pm, p, i, rc)) rc = 0; // an expert cache instead of the window
    const bool dev_ok = plan_kv_place(nd, s, kv_fixed);
    return rc == 0 && (!bud || s->peak_bytes <= bud) && dev_ok;
}

void plan_mode_grains(const plan_model_t *pm, int mode, int *grain_heads, int *grain_ffn) {
    *grain_heads = 1;
    *grain_ffn = PLAN_FFN_GRAIN;
    if (mode != PLAN_TP_ALLREDUCE) return;
    const int ob = pm->col_block[PLAN_W_O] > 0 ? pm->col_block[PLAN_W_O] : 1;
    const int db = pm->col_block[PLAN_W_DOWN] > 0 ? pm->col_block[PLAN_W_DOWN] : 1;
    const int hd = pm->head_dim > 0 ? pm->head_dim : 1;
    *grain_heads = ob / gcd(ob, hd); // the fewest heads whose columns are whole blocks
    *grain_ffn = PLAN_FFN_GRAIN / gcd(PLAN_FFN_GRAIN, db) * db;
}

bool plan_parse_rate(const char *s, double *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || !isfinite(v) || !(v > 0)) return false;
    switch (toupper((unsigned char)*end)) {
    case 'K': v *= 1e3; end++; break;
    case 'M': v *= 1e6; end++; break;
    case 'G': v *= 1e9; end++; break;
    case 'T': v *= 1e12; end++; break;
    default: break;
    }
    if (toupper((unsigned char)*end) == 'B') end++;
    if (!strcmp(end, "/s")) end += 2;
    if (*end) return false;
    *out = v;
    return true;
}

// --- public API

int plan_window(const plan_model_t *pm, const shard_slice_t *s, int mode, int n_ctx, uint64_t budget,
                plan_stream_t *out) {
    if (!pm || !s || !out || (mode != PLAN_TP_EXACT && mode != PLAN_TP_ALLREDUCE)) return MLM_EINVAL;
    return plan_size_share(pm, s, mode, n_ctx, NULL, budget, out, NULL, NULL, NULL);
}

const char *plan_kv_dev_name(int kind) {
    switch (kind) {
    case PLAN_KV_HOST: return "host";
    case PLAN_KV_FILE: return "file";
    case PLAN_KV_STORAGE: return "storage";
    case PLAN_KV_PIM: return "pim";
    default: return "?";
    }
}

int plan_kv_dev_kind(const char *dev) {
    if (!dev || !*dev) return PLAN_KV_HOST;
    const size_t len = strcspn(dev, ":");
    for (int k = PLAN_KV_HOST; k <= PLAN_KV_PIM; k++)
        if (strlen(plan_kv_dev_name(k)) == len && !strncmp(dev, plan_kv_dev_name(k), len)) return k;
    return -1;
}

const char *plan_tp_mode_name(int mode) {
    switch (mode) {
    case PLAN_TP_EXACT: return "exact";
    case PLAN_TP_ALLREDUCE: return "allreduce";
    case PLAN_TP_AUTO: return "auto";
    default: return "?";
    }
}
