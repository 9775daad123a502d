// Tensor-parallel planner: capability-weighted splits of heads, hidden rows, FFN units and vocabulary.
#include "parallel/plan.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "worker/err.h"

// --- helpers

#define HIDDEN_GRAIN 16  // hidden rows of attn_output / ffn_down per split step
#define FFN_GRAIN 16     // FFN units per split step (the packed kernels work on 16-row groups)
#define VOCAB_GRAIN 16   // output rows per split step
#define MAX_ITERS 32     // budget-fitting rounds

// Splits units (in grains of `grain`, the last grain may be short) over n nodes in proportion to
// w[i], largest remainder first; writes [lo[i], hi[i]).
static void split_units(int units, int grain, const double *w, int n, int *lo, int *hi) {
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

static uint64_t rows_bytes(const gguf_t *g, const char *name, int64_t rows, int per_expert) {
    const gguf_tensor_t *t = gguf_find_tensor(g, name);
    if (!t || rows <= 0) return 0;
    uint64_t b = (uint64_t)qtype_row_size(t->type, t->ne[0]) * (uint64_t)rows;
    return per_expert ? b * (uint64_t)(t->ne[2] > 0 ? t->ne[2] : 1) : b;
}

static uint64_t vec_bytes(const gguf_t *g, const char *name) {
    const gguf_tensor_t *t = gguf_find_tensor(g, name);
    return t ? t->nbytes : 0;
}

// Bytes of node s's slices of every tensor, plus its KV cache and activation buffers.
static void shard_bytes(const model_t *m, plan_shard_t *s, int n_ctx) {
    const gguf_t *g = model_gguf(m);
    const model_hparams_t *hp = model_hparams(m);
    const int hd = hp->head_dim, moe = hp->n_expert > 0;
    uint64_t w = 0;
    char name[96];
    for (int il = 0; il < hp->n_layer; il++) {
#define NM(sfx) (snprintf(name, sizeof name, "blk.%d.%s.weight", il, sfx), name)
        w += rows_bytes(g, NM("attn_q"), (int64_t)(s->s.h1 - s->s.h0) * hd, 0);
        w += rows_bytes(g, NM("attn_k"), (int64_t)(s->s.kv1 - s->s.kv0) * hd, 0);
        w += rows_bytes(g, NM("attn_v"), (int64_t)(s->s.kv1 - s->s.kv0) * hd, 0);
        w += rows_bytes(g, NM("attn_output"), s->s.e1 - s->s.e0, 0);
        w += vec_bytes(g, NM("attn_norm")) + vec_bytes(g, NM("ffn_norm"));
        if (moe) {
            w += vec_bytes(g, NM("ffn_gate_inp"));
            w += rows_bytes(g, NM("ffn_gate_exps"), s->s.f1 - s->s.f0, 1);
            w += rows_bytes(g, NM("ffn_up_exps"), s->s.f1 - s->s.f0, 1);
            w += rows_bytes(g, NM("ffn_down_exps"), s->s.e1 - s->s.e0, 1);
        } else {
            w += rows_bytes(g, NM("ffn_gate"), s->s.f1 - s->s.f0, 0);
            w += rows_bytes(g, NM("ffn_up"), s->s.f1 - s->s.f0, 0);
            w += rows_bytes(g, NM("ffn_down"), s->s.e1 - s->s.e0, 0);
        }
#undef NM
    }
    w += vec_bytes(g, "output_norm.weight");
    const char *out = gguf_find_tensor(g, "output.weight") ? "output.weight" : "token_embd.weight";
    w += rows_bytes(g, out, s->s.v1 - s->s.v0, 0);
    // The embedding table is split like the output: a node keeps the rows of its vocabulary range
    // and answers lookups for them.
    if (!hp->tied_output) w += rows_bytes(g, "token_embd.weight", s->s.v1 - s->s.v0, 0);
    s->weight_bytes = w;
    s->kv_bytes = (uint64_t)hp->n_layer * (uint64_t)n_ctx * (uint64_t)(s->s.kv1 - s->s.kv0) * hd * 2u * 2u;
    const uint64_t batch = 64;
    uint64_t act = batch * 4u * ((uint64_t)hp->n_embd * 6u + (uint64_t)hp->n_head * hd * 2u + (uint64_t)hp->n_ff * 3u);
    act += (uint64_t)hp->n_vocab * 4u * 2u;
    s->peak_bytes = s->weight_bytes + s->kv_bytes + act;
}

static void fmt_bytes(char *buf, size_t cap, uint64_t b) {
    if (b >= (1ull << 30)) snprintf(buf, cap, "%.2f GiB", (double)b / (1ull << 30));
    else if (b >= (1ull << 20)) snprintf(buf, cap, "%.1f MiB", (double)b / (1ull << 20));
    else snprintf(buf, cap, "%.1f KiB", (double)b / 1024.0);
}

// --- public API

int plan_tp(const model_t *m, const plan_node_t *nodes, int n, int n_ctx, plan_t *out, char *err, size_t errlen) {
    const model_hparams_t *hp = model_hparams(m);
    if (n < 1 || n > PLAN_MAX_NODES) {
        snprintf(err, errlen, "node count %d is outside 1..%d", n, PLAN_MAX_NODES);
        return MLM_EINVAL;
    }
    memset(out, 0, sizeof *out);
    out->n = n;
    out->n_nodes = n;
    out->n_stages = 1;
    out->stage_first[1] = n;
    out->n_ctx = n_ctx;
    snprintf(out->layout, sizeof out->layout, "tp%d", n);
    double w[PLAN_MAX_NODES];
    for (int i = 0; i < n; i++) {
        out->node[i] = nodes[i];
        out->shard[i].node = i;
        out->shard[i].s.l1 = hp->n_layer;
        w[i] = nodes[i].speed > 0 ? nodes[i].speed : 1.0;
    }
    const int group = hp->n_head / hp->n_head_kv;
    for (int iter = 0; iter < MAX_ITERS; iter++) {
        int lo[PLAN_MAX_NODES], hi[PLAN_MAX_NODES];
        split_units(hp->n_head, 1, w, n, lo, hi);
        for (int i = 0; i < n; i++) {
            plan_shard_t *s = &out->shard[i];
            s->s.h0 = lo[i];
            s->s.h1 = hi[i];
            s->s.kv0 = s->s.h1 > s->s.h0 ? s->s.h0 / group : 0;
            s->s.kv1 = s->s.h1 > s->s.h0 ? (s->s.h1 - 1) / group + 1 : 0;
        }
        split_units(hp->n_embd, HIDDEN_GRAIN, w, n, lo, hi);
        for (int i = 0; i < n; i++) out->shard[i].s.e0 = lo[i], out->shard[i].s.e1 = hi[i];
        split_units(hp->n_ff, FFN_GRAIN, w, n, lo, hi);
        for (int i = 0; i < n; i++) out->shard[i].s.f0 = lo[i], out->shard[i].s.f1 = hi[i];
        split_units(hp->n_vocab, VOCAB_GRAIN, w, n, lo, hi);
        for (int i = 0; i < n; i++) out->shard[i].s.v0 = lo[i], out->shard[i].s.v1 = hi[i];
        bool over = false;
        for (int i = 0; i < n; i++) {
            shard_bytes(m, &out->shard[i], n_ctx);
            const uint64_t b = nodes[i].mem_budget;
            if (b && out->shard[i].peak_bytes > b) {
                over = true;
                w[i] *= 0.95 * (double)b / (double)out->shard[i].peak_bytes; // shrink its share
            }
        }
        if (!over) return 0;
    }
    // Still over budget: report the total shortfall and the worst node.
    uint64_t need = 0, have = 0, worst_miss = 0;
    int worst = 0;
    for (int i = 0; i < n; i++) {
        need += out->shard[i].peak_bytes;
        have += nodes[i].mem_budget ? nodes[i].mem_budget : out->shard[i].peak_bytes;
        uint64_t miss = nodes[i].mem_budget && out->shard[i].peak_bytes > nodes[i].mem_budget
                            ? out->shard[i].peak_bytes - nodes[i].mem_budget : 0;
        if (miss > worst_miss) worst_miss = miss, worst = i;
    }
    char a[32], b[32], c[32];
    fmt_bytes(a, sizeof a, need);
    fmt_bytes(b, sizeof b, have);
    fmt_bytes(c, sizeof c, worst_miss);
    snprintf(err, errlen,
             "the model does not fit: the plan needs %s in all and the nodes' budgets give %s; node %d (%s) "
             "is %s short even with the smallest share it can take", a, b, worst, nodes[worst].name, c);
    return MLM_EFULL;
}

int plan_parse_size(const char *s, uint64_t *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0) return MLM_EINVAL;
    double mul = 1;
    switch (toupper((unsigned char)*end)) {
    case 0: break;
    case 'K': mul = 1024.0; end++; break;
    case 'M': mul = 1024.0 * 1024; end++; break;
    case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: return MLM_EINVAL;
    }
    if (toupper((unsigned char)*end) == 'B' || toupper((unsigned char)*end) == 'I') end++;
    if (*end) return MLM_EINVAL;
    *out = (uint64_t)(v * mul);
    return 0;
}

int plan_parse_nodes(const char *spec, plan_node_t *nodes, int max, char *err, size_t errlen) {
    if (!spec || !*spec) {
        snprintf(err, errlen, "empty node list");
        return MLM_EINVAL;
    }
    char *end;
    long count = strtol(spec, &end, 10);
    if (*end == 0) { // "N": N equal nodes
        if (count < 1 || count > max) {
            snprintf(err, errlen, "node count %ld is outside 1..%d", count, max);
            return MLM_EINVAL;
        }
        for (int i = 0; i < count; i++) {
            memset(&nodes[i], 0, sizeof nodes[i]);
            snprintf(nodes[i].name, sizeof nodes[i].name, "node-%d", i);
            nodes[i].speed = 1.0;
        }
        return (int)count;
    }
    int n = 0;
    const char *p = spec;
    while (*p) {
        if (n == max) {
            snprintf(err, errlen, "more than %d nodes", max);
            return MLM_ERANGE;
        }
        char item[128];
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= sizeof item) {
            snprintf(err, errlen, "bad node item in '%s'", spec);
            return MLM_EINVAL;
        }
        memcpy(item, p, len);
        item[len] = 0;
        p += len + (p[len] == ',');
        plan_node_t *nd = &nodes[n];
        memset(nd, 0, sizeof *nd);
        snprintf(nd->name, sizeof nd->name, "node-%d", n);
        char *colon = strchr(item, ':');
        if (colon) *colon = 0;
        nd->speed = strtod(item, &end);
        if (end == item || *end || !(nd->speed > 0)) {
            snprintf(err, errlen, "bad speed '%s' (want a positive number)", item);
            return MLM_EINVAL;
        }
        if (colon && plan_parse_size(colon + 1, &nd->mem_budget) != 0) {
            snprintf(err, errlen, "bad memory budget '%s' (want e.g. 512M or 2G)", colon + 1);
            return MLM_EINVAL;
        }
        n++;
    }
    return n;
}

void plan_print(const plan_t *p, const model_t *m, FILE *f) {
    const model_hparams_t *hp = model_hparams(m);
    fprintf(f, "tensor-parallel plan: %d node(s), %d layers, %d heads / %d KV heads, FFN %d%s, vocab %d, n_ctx %d\n",
            p->n, hp->n_layer, hp->n_head, hp->n_head_kv, hp->n_ff, hp->n_expert ? " per expert" : "", hp->n_vocab,
            p->n_ctx);
    fprintf(f, "| %-4s | %-12s | %5s | %-9s | %-8s | %-11s | %-11s | %-13s | %10s | %10s | %10s | %10s |\n", "node",
            "name", "speed", "heads", "KV heads", "hidden rows", "FFN units", "vocab rows", "weights", "KV cache",
            "peak", "budget");
    for (int i = 0; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        char h[24], kv[24], e[24], fr[24], v[24], wb[24], kb[24], pb[24], bb[24];
        snprintf(h, sizeof h, "%d-%d (%d)", s->s.h0, s->s.h1 - 1, s->s.h1 - s->s.h0);
        if (s->s.h1 == s->s.h0) snprintf(h, sizeof h, "-");
        snprintf(kv, sizeof kv, s->s.kv1 > s->s.kv0 ? "%d-%d" : "-", s->s.kv0, s->s.kv1 - 1);
        snprintf(e, sizeof e, s->s.e1 > s->s.e0 ? "%d-%d" : "-", s->s.e0, s->s.e1 - 1);
        snprintf(fr, sizeof fr, s->s.f1 > s->s.f0 ? "%d-%d" : "-", s->s.f0, s->s.f1 - 1);
        snprintf(v, sizeof v, s->s.v1 > s->s.v0 ? "%d-%d" : "-", s->s.v0, s->s.v1 - 1);
        fmt_bytes(wb, sizeof wb, s->weight_bytes);
        fmt_bytes(kb, sizeof kb, s->kv_bytes);
        fmt_bytes(pb, sizeof pb, s->peak_bytes);
        if (p->node[s->node].mem_budget) fmt_bytes(bb, sizeof bb, p->node[s->node].mem_budget);
        else snprintf(bb, sizeof bb, "-");
        fprintf(f, "| %-4d | %-12s | %5.2f | %-9s | %-8s | %-11s | %-11s | %-13s | %10s | %10s | %10s | %10s |\n", i,
                p->node[s->node].name, p->node[s->node].speed > 0 ? p->node[s->node].speed : 1.0, h, kv, e, fr, v, wb,
                kb, pb, bb);
    }
}
