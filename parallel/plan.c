// Planner entry points: the one-group tensor-parallel split, node specs and the shard table.
#include "parallel/plan.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_impl.h"
#include "core/err.h"

// --- helpers

// Parses "LAT_MS/MBIT" into a node's link figures.
static int parse_link(const char *s, plan_node_t *nd) {
    char *end;
    double lat = strtod(s, &end);
    if (end == s || *end != '/' || !(lat >= 0)) return MLM_EINVAL;
    const char *m = end + 1;
    double mbit = strtod(m, &end);
    if (end == m || *end || !(mbit > 0)) return MLM_EINVAL;
    nd->lat_us = lat * 1e3;
    nd->link_bw = mbit * 1e6 / 8;
    return 0;
}

// One node item: fields separated by ':' (speed first, then an optional budget and key=value
// options); the link "@LAT_MS/MBIT" ends the speed or budget field.
static int parse_item(char *item, plan_node_t *nd, char *err, size_t errlen) {
    const size_t len = strlen(item);
    if (item[0] == ':' || item[len - 1] == ':' || strstr(item, "::"))
        return mlm_fail(err, errlen, MLM_EINVAL, "an empty field in node '%s'", item);
    char *save = NULL, *field = strtok_r(item, ":", &save);
    bool have_budget = false, link = false;
    for (int k = 0; field; k++, field = strtok_r(NULL, ":", &save)) {
        char *eq = strchr(field, '='), *at = eq ? NULL : strchr(field, '@');
        if (at) {
            *at = 0;
            if (link || parse_link(at + 1, nd) != 0)
                return mlm_fail(err, errlen, MLM_EINVAL, "bad link '%s' (want LAT_MS/MBIT, e.g. 1/1000, once)", at + 1);
            link = true;
        }
        if (k == 0) {
            char *end;
            nd->speed = strtod(field, &end);
            if (end == field || *end || !(nd->speed > 0))
                return mlm_fail(err, errlen, MLM_EINVAL, "bad speed '%s' (want a positive number)", field);
        } else if (eq) {
            *eq = 0;
            const char *v = eq + 1;
            char *end;
            long id;
            if (!strcmp(field, "disk")) {
                if (!plan_parse_rate(v, &nd->disk_bw))
                    return mlm_fail(err, errlen, MLM_EINVAL, "bad disk bandwidth '%s' (want bytes/s, e.g. 950M)", v);
            } else if (!strcmp(field, "disk_id")) {
                id = strtol(v, &end, 10);
                if (end == v || *end || id < 1 || id >= 1000000)
                    return mlm_fail(err, errlen, MLM_EINVAL, "bad disk_id '%s' (want a positive integer)", v);
                nd->disk_id = (int)id;
            } else if (!strcmp(field, "shm_id")) {
                id = strtol(v, &end, 10);
                if (end == v || *end || id < 1 || id >= 1000000)
                    return mlm_fail(err, errlen, MLM_EINVAL, "bad shm_id '%s' (want a positive integer)", v);
                nd->shm_id = (int)id;
            } else if (!strcmp(field, "cpu_id") || !strcmp(field, "cores") || !strcmp(field, "threads")) {
                id = strtol(v, &end, 10);
                if (end == v || *end || id < 1 || id >= 1000000)
                    return mlm_fail(err, errlen, MLM_EINVAL, "bad %s '%s' (want a positive integer)", field, v);
                *(field[0] == 'c' ? (field[1] == 'p' ? &nd->cpu_id : &nd->cores) : &nd->threads) = (int)id;
            } else if (!strcmp(field, "kv")) {
                nd->kv_dev = plan_kv_dev_kind(v);
                if (nd->kv_dev < 0 || strchr(v, ':'))
                    return mlm_fail(err, errlen, MLM_EINVAL, "bad KV device '%s' (want host, file, storage or pim)", v);
            } else if (!strcmp(field, "kv_ram") || !strcmp(field, "kv_cap")) {
                uint64_t *dst = field[3] == 'r' ? &nd->kv_ram : &nd->kv_cap;
                if (plan_parse_size(v, dst) != 0 || !*dst)
                    return mlm_fail(err, errlen, MLM_EINVAL, "bad %s '%s' (want a size, e.g. 512M or 20G)", field, v);
            } else {
                return mlm_fail(err, errlen, MLM_EINVAL,
                                "unknown node option '%s' (disk=, disk_id=, shm_id=, cpu_id=, cores=, threads=, kv=, kv_ram= or "
                                "kv_cap=)", field);
            }
        } else if (!have_budget && k == 1) {
            if (plan_parse_size(field, &nd->mem_budget) != 0)
                return mlm_fail(err, errlen, MLM_EINVAL, "bad memory budget '%s' (want e.g. 512M or 2G)", field);
            have_budget = true;
        } else {
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "bad node field '%s' (want speed[:budget][@LAT_MS/MBIT][:disk=RATE][:disk_id=N][:shm_id=N][:cpu_id=N]"
                            "[:cores=N][:threads=N][:kv=DEV]"
                            "[:kv_ram=SIZE][:kv_cap=SIZE])", field);
        }
    }
    return 0;
}

// --- public API

int plan_tp(const gguf_t *g, const plan_node_t *nodes, int n, int n_ctx, plan_t *out, char *err, size_t errlen) {
    if (n < 1 || n > PLAN_MAX_NODES)
        return mlm_fail(err, errlen, MLM_EINVAL, "node count %d is outside 1..%d", n, PLAN_MAX_NODES);
    plan_model_t *pm = malloc(sizeof *pm);
    if (!pm) return MLM_ENOMEM;
    int rc = plan_model_from_gguf(g, pm, err, errlen);
    if (rc != 0) {
        free(pm);
        return rc;
    }
    memset(out, 0, sizeof *out);
    out->n = n;
    out->n_nodes = n;
    out->n_stages = 1;
    out->stage_first[1] = n;
    out->n_ctx = n_ctx;
    double w[PLAN_MAX_NODES];
    for (int i = 0; i < n; i++) {
        out->node[i] = nodes[i];
        out->shard[i].node = i;
        w[i] = nodes[i].speed > 0 ? nodes[i].speed : 1.0;
    }
    plan_layout_name(out);
    plan_short_t sh = {.worst_node = -1};
    rc = plan_fit_stage(pm, out, 0, n, 0, pm->n_layer, w, PLAN_FIT_ADJUST, &sh);
    if (rc == 0) {
        plan_predict(pm, out);
        snprintf(out->why, sizeof out->why, "one tensor-parallel group over all %d node(s), split by speed", n);
    } else {
        plan_short_message(err, errlen, &sh, nodes, "the plan");
    }
    free(pm);
    return rc;
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
    if (!spec || !*spec) return mlm_fail(err, errlen, MLM_EINVAL, "empty node list");
    char *end;
    long count = strtol(spec, &end, 10);
    if (*end == 0) { // "N": N equal nodes
        if (count < 1 || count > max)
            return mlm_fail(err, errlen, MLM_EINVAL, "node count %ld is outside 1..%d", count, max);
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
        if (n == max) return mlm_fail(err, errlen, MLM_ERANGE, "more than %d nodes", max);
        char item[128];
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= sizeof item) return mlm_fail(err, errlen, MLM_EINVAL, "bad node item in '%s'", spec);
        memcpy(item, p, len);
        item[len] = 0;
        p += len + (p[len] == ',');
        plan_node_t *nd = &nodes[n];
        memset(nd, 0, sizeof *nd);
        snprintf(nd->name, sizeof nd->name, "node-%d", n);
        int rc = parse_item(item, nd, err, errlen);
        if (rc != 0) return rc;
        n++;
    }
    return n;
}

void plan_print(const plan_t *p, const gguf_t *g, FILE *f) {
    plan_model_t *pm = malloc(sizeof *pm);
    char err[256];
    if (pm && plan_model_from_gguf(g, pm, err, sizeof err) == 0) plan_table(p, pm, f);
    else fprintf(f, "plan %s: %d node(s) (model not describable)\n", p->layout, p->n);
    free(pm);
}

void plan_table(const plan_t *p, const plan_model_t *pm, FILE *f) {
    fprintf(f, "plan %s: %d node(s) in %d stage(s); %d layers, %d heads / %d KV heads, FFN %d%s, vocab %d, n_ctx %d\n",
            p->layout[0] ? p->layout : "?", p->n, p->n_stages, pm->n_layer, pm->n_head, pm->n_head_kv, pm->n_ff,
            pm->n_expert ? " per expert" : "", pm->n_vocab, p->n_ctx);
    if (p->tp_mode == PLAN_TP_ALLREDUCE)
        fprintf(f, "tensor parallel: allreduce (attn_output and ffn_down cut by columns: the member's heads and FFN "
                   "units; 2 all-reduces per block)\n");
    fprintf(f, "| %-4s | %-5s | %-7s | %-4s | %-12s | %6s | %-9s | %-8s | %-11s | %-11s | %-13s | %10s | %10s | %10s | "
               "%10s | %-16s |\n",
            "rank", "stage", "layers", "node", "name", "GF/s", "heads", "KV heads", "hidden rows", "FFN units",
            "vocab rows", "weights", "KV cache", "peak", "budget", "window (kept)");
    for (int i = 0; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        const plan_node_t *nd = &p->node[s->node];
        char l[24], h[24], kv[24], e[24], fr[24], v[24], wb[24], kb[24], pb[24], bb[24], wn[40];
        snprintf(l, sizeof l, s->s.l1 > s->s.l0 ? "%d-%d" : "-", s->s.l0, s->s.l1 - 1);
        snprintf(h, sizeof h, "%d-%d (%d)", s->s.h0, s->s.h1 - 1, s->s.h1 - s->s.h0);
        if (s->s.h1 == s->s.h0) snprintf(h, sizeof h, "-");
        snprintf(kv, sizeof kv, s->s.kv1 > s->s.kv0 ? "%d-%d" : "-", s->s.kv0, s->s.kv1 - 1);
        snprintf(e, sizeof e, s->s.e1 > s->s.e0 ? "%d-%d" : "-", s->s.e0, s->s.e1 - 1);
        snprintf(fr, sizeof fr, s->s.f1 > s->s.f0 ? "%d-%d" : "-", s->s.f0, s->s.f1 - 1);
        snprintf(v, sizeof v, s->s.v1 > s->s.v0 ? "%d-%d" : "-", s->s.v0, s->s.v1 - 1);
        plan_fmt_bytes(wb, sizeof wb, s->weight_bytes);
        plan_fmt_bytes(kb, sizeof kb, s->kv_bytes);
        plan_fmt_bytes(pb, sizeof pb, s->peak_bytes);
        if (nd->mem_budget) plan_fmt_bytes(bb, sizeof bb, nd->mem_budget);
        else snprintf(bb, sizeof bb, "-");
        plan_fmt_weights(wn, sizeof wn, s);
        fprintf(f, "| %-4d | %-5d | %-7s | %-4d | %-12s | %6.1f | %-9s | %-8s | %-11s | %-11s | %-13s | %10s | %10s | "
                   "%10s | %10s | %-16s |\n",
                i, s->stage, l, s->node, nd->name, plan_node_gflops(nd), h, kv, e, fr, v, wb, kb, pb, bb, wn);
    }
}
