// Planner reports: the --explain comparison of the chosen plan with its alternatives, and JSON.
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "parallel/plan_impl.h"
#include "worker/kernels/quant.h"

// --- helpers

static void node_list(const plan_t *p, char *buf, size_t cap) {
    size_t at = 0;
    buf[0] = 0;
    for (int k = 0; k < p->n_stages && at < cap; k++)
        for (int i = p->stage_first[k]; i < p->stage_first[k + 1] && at < cap; i++)
            at += (size_t)snprintf(buf + at, cap - at, "%s%d", i == 0 ? "" : i == p->stage_first[k] ? " | " : ",",
                                   p->shard[i].node);
}

static void row(FILE *f, const char *label, const plan_t *p) {
    char nodes[160];
    node_list(p, nodes, sizeof nodes);
    const double tps = p->cost.token_ms > 0 ? 1e3 / p->cost.token_ms : 0;
    fprintf(f, "| %-8s | %-18s | %-9s | %-20s | %8.2f | %8.2f | %9.2f | %8.2f | %9.2f | %7.3f | %9.1f |\n", label,
            p->layout, plan_tp_mode_name(p->tp_mode), nodes, p->cost.compute_ms, p->cost.memory_ms, p->cost.disk_ms,
            p->cost.comm_ms, p->cost.token_ms, tps, p->cost.prefill_tok_s);
}

// The first tensor-parallel stage of p: [*a, *b). False when every stage has one member.
static bool first_group(const plan_t *p, int *a, int *b) {
    for (int k = 0; k < p->n_stages; k++)
        if (p->stage_first[k + 1] - p->stage_first[k] > 1) {
            *a = p->stage_first[k];
            *b = p->stage_first[k + 1];
            return true;
        }
    return false;
}

// One line comparing the two tensor-parallel modes of the chosen layout.
static void modes_line(FILE *f, const plan_model_t *pm, const plan_t *p) {
    int a, b;
    if (!first_group(p, &a, &b)) {
        fprintf(f, "tensor-parallel mode: none (no stage has more than one node)\n");
        return;
    }
    bool star = true;
    plan_allreduce_ms(p, a, b, 4.0 * pm->n_embd, &star);
    char e[32] = "does not fit", r[32] = "does not fit";
    if (p->cost.exact_ms > 0) snprintf(e, sizeof e, "%.2f ms/token", p->cost.exact_ms);
    if (p->cost.allreduce_ms > 0) snprintf(r, sizeof r, "%.2f ms/token", p->cost.allreduce_ms);
    fprintf(f, "tensor-parallel modes of %s: exact %s (4 all-gathers per block, bit-exact); allreduce %s (2 %s "
               "all-reduces per block); this plan: %s\n",
            p->layout, e, r, star ? "star" : "ring", plan_tp_mode_name(p->tp_mode));
}

// Per node of p, per token: what stays resident, the window, what it reads from disk and how long
// each part takes.
static void node_rows(FILE *f, const plan_t *p) {
    fprintf(f, "| %-4s | %-12s | %10s | %-16s | %11s | %9s | %9s | %10s | %10s | %9s | %9s |\n", "rank", "name",
            "resident", "window (kept)", "disk MB/tok", "disk MB/s", "disk ms", "compute ms", "memory ms", "comm ms",
            "busy ms");
    for (int i = 0; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        const plan_node_t *nd = &p->node[s->node];
        char res[24], wn[40];
        plan_fmt_bytes(res, sizeof res, s->st.resident_bytes);
        plan_fmt_weights(wn, sizeof wn, s);
        fprintf(f, "| %-4d | %-12s | %10s | %-16s | %11.1f | %9.0f | %9.2f | %10.2f | %10.2f | %9.2f | %9.2f |\n", i,
                nd->name, res, wn, (double)s->st.stream_bytes / 1e6, plan_node_disk_bw(nd) / 1e6, s->disk_ms,
                s->compute_ms, s->memory_ms, s->comm_ms, s->busy_ms);
    }
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        const unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void json_plan(FILE *f, const plan_t *p) {
    fprintf(f, "{\"layout\": ");
    json_str(f, p->layout);
    fprintf(f, ", \"tp_mode\": \"%s\", \"why\": ", plan_tp_mode_name(p->tp_mode));
    json_str(f, p->why);
    fprintf(f,
            ", \"n_ctx\": %d, \"n_stages\": %d, \"cost\": {\"compute_ms\": %.4f, \"memory_ms\": %.4f, \"disk_ms\": "
            "%.4f, \"comm_ms\": %.4f, \"token_ms\": %.4f, \"tokens_per_s\": %.4f, \"prefill_tok_s\": %.4f, "
            "\"exact_ms\": %.4f, \"allreduce_ms\": %.4f}, \"stages\": [",
            p->n_ctx, p->n_stages, p->cost.compute_ms, p->cost.memory_ms, p->cost.disk_ms, p->cost.comm_ms,
            p->cost.token_ms, p->cost.token_ms > 0 ? 1e3 / p->cost.token_ms : 0, p->cost.prefill_tok_s,
            p->cost.exact_ms, p->cost.allreduce_ms);
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        fprintf(f, "%s{\"layers\": [%d, %d], \"shards\": [", k ? ", " : "", b > a ? p->shard[a].s.l0 : 0,
                b > a ? p->shard[a].s.l1 : 0);
        for (int i = a; i < b; i++) {
            const plan_shard_t *s = &p->shard[i];
            fprintf(f, "%s{\"rank\": %d, \"node\": %d, \"name\": ", i > a ? ", " : "", i, s->node);
            json_str(f, p->node[s->node].name);
            fprintf(f,
                    ", \"heads\": [%d, %d], \"kv_heads\": [%d, %d], \"hidden\": [%d, %d], \"ffn\": [%d, %d], "
                    "\"vocab\": [%d, %d], \"weight\": %.6g, \"weight_bytes\": %llu, \"kv_bytes\": %llu, "
                    "\"peak_bytes\": %llu, \"budget\": %llu, \"kv_device\": \"%s\", \"kv_ram_bytes\": %llu, "
                    "\"kv_dev_bytes\": %llu, \"kv_cap\": %llu",
                    s->s.h0, s->s.h1, s->s.kv0, s->s.kv1, s->s.e0, s->s.e1, s->s.f0, s->s.f1, s->s.v0, s->s.v1,
                    s->weight, (unsigned long long)s->weight_bytes, (unsigned long long)s->kv_bytes,
                    (unsigned long long)s->peak_bytes, (unsigned long long)p->node[s->node].mem_budget,
                    plan_kv_dev_name(p->node[s->node].kv_dev), (unsigned long long)s->kv_ram_bytes,
                    (unsigned long long)s->kv_dev_bytes, (unsigned long long)p->node[s->node].kv_cap);
            fprintf(f,
                    ", \"streams\": %s, \"n_units\": %d, \"pinned\": %d, \"window\": %d, \"unit_bytes\": %llu, "
                    "\"resident_bytes\": %llu, \"stream_bytes\": %llu, \"min_budget\": %llu, \"disk_bw\": %.0f, "
                    "\"compute_ms\": %.4f, \"memory_ms\": %.4f, \"disk_ms\": %.4f, \"comm_ms\": %.4f, "
                    "\"busy_ms\": %.4f",
                    s->st.streams ? "true" : "false", s->st.n_units, s->st.pinned, s->st.window,
                    (unsigned long long)s->st.unit_bytes, (unsigned long long)s->st.resident_bytes,
                    (unsigned long long)s->st.stream_bytes, (unsigned long long)s->st.min_budget,
                    plan_node_disk_bw(&p->node[s->node]), s->compute_ms, s->memory_ms, s->disk_ms, s->comm_ms,
                    s->busy_ms);
            if (p->ep) { // placed experts: those of every block, then the hot second copies as [layer, expert]
                fprintf(f, ", \"experts\": [");
                for (int e = 0, n = 0; e < 256; e++)
                    if (plan_has_expert(p, i, e)) fprintf(f, "%s%d", n++ ? ", " : "", e);
                fprintf(f, "], \"hot_copies\": [");
                for (int il = s->s.l0, n = 0; il < s->s.l1 && il < PLAN_MAX_LAYERS; il++)
                    for (int h = 0; h < p->ep_hot_n[il]; h++)
                        if (p->ep_hot_of[il][h].shard == i) fprintf(f, "%s[%d, %d]", n++ ? ", " : "", il, p->ep_hot_of[il][h].expert);
                fprintf(f, "]");
            }
            if (s->ep_cached > 0) { // an expert cache: of each block's experts it holds, those kept
                fprintf(f, ", \"experts_resident\": %d, \"experts_held\": %d", s->ep_cached, s->ep_cache_of);
            }
            if (s->ep_pool > 0) fprintf(f, ", \"expert_pool\": %d", s->ep_pool); // slots its blocks share
            fprintf(f, "}");
        }
        fprintf(f, "]}");
    }
    fprintf(f, "]}");
}

// --- public API

void plan_explain(FILE *f, const plan_model_t *pm, const plan_t *best, const plan_t *alts, int n_alts) {
    char wb[32];
    plan_fmt_bytes(wb, sizeof wb, pm->weight_bytes);
    fprintf(f, "model %s: %d layers, %d heads / %d KV heads, FFN %d%s, vocab %d, %s, %s of weights; n_ctx %d\n",
            pm->name, pm->n_layer, pm->n_head, pm->n_head_kv, pm->n_ff, pm->n_expert ? " per expert" : "", pm->n_vocab,
            qtype_name(pm->wtype), wb, best->n_ctx);
    fprintf(f, "nodes offered (node 0 is the coordinator's machine):\n");
    for (int j = 0; j < best->n_nodes; j++) {
        const plan_node_t *nd = &best->node[j];
        char bud[32] = "unlimited";
        if (nd->mem_budget) plan_fmt_bytes(bud, sizeof bud, nd->mem_budget);
        char disk[32] = "";
        if (nd->disk_id > 0) snprintf(disk, sizeof disk, " (disk %d)", nd->disk_id);
        fprintf(f, "  %2d %-14s %7.1f GFLOP/s %6.1f GB/s  disk %4.0f MB/s%s  budget %-10s  link %.3g ms / %.0f Mbit\n",
                j, nd->name, plan_node_gflops(nd), plan_node_mem_bw(nd) / 1e9, plan_node_disk_bw(nd) / 1e6, disk, bud,
                plan_node_lat_us(nd) / 1e3, plan_node_link_bw(nd) * 8 / 1e6);
    }
    fprintf(f, "\n| %-8s | %-18s | %-9s | %-20s | %8s | %8s | %9s | %8s | %9s | %7s | %9s |\n", "plan", "layout",
            "tp mode", "nodes (| = stage)", "compute", "memory", "disk", "comm", "ms/token", "tok/s", "prefill/s");
    row(f, "chosen", best);
    char label[16];
    for (int i = 0; i < n_alts && i < 2; i++) {
        snprintf(label, sizeof label, "alt %d", i + 1);
        row(f, label, &alts[i]);
    }
    fprintf(f, "\n");
    modes_line(f, pm, best);
    fprintf(f, "chosen: %s\n", best->why);
    for (int i = 0; i < n_alts && i < 2; i++) fprintf(f, "alt %d (%s): %s\n", i + 1, alts[i].layout, alts[i].why);
    fprintf(f, "\n");
    for (int k = 0; k < best->n_stages; k++) {
        const int a = best->stage_first[k], b = best->stage_first[k + 1];
        if (b <= a) continue;
        fprintf(f, "stage %d: layers %d-%d (%d) on", k, best->shard[a].s.l0, best->shard[a].s.l1 - 1,
                best->shard[a].s.l1 - best->shard[a].s.l0);
        for (int i = a; i < b; i++) fprintf(f, "%s %s", i > a ? "," : "", best->node[best->shard[i].node].name);
        fprintf(f, "\n");
    }
    fprintf(f, "\nper node and token (chosen plan; disk ms counts the other readers of a shared disk; comm ms is its "
               "stage's exchanges; busy ms overlaps the disk with the rest):\n");
    node_rows(f, best);
    fprintf(f, "\n");
    plan_print_experts(best, pm->n_expert, f);
    plan_table(best, pm, f);
}

void plan_write_json(FILE *f, const plan_model_t *pm, const plan_t *best, const plan_t *alts, int n_alts) {
    fprintf(f, "{\"model\": {\"name\": ");
    json_str(f, pm->name);
    fprintf(f,
            ", \"type\": \"%s\", \"n_layer\": %d, \"n_head\": %d, \"n_head_kv\": %d, \"n_embd\": %d, \"n_ff\": %d, "
            "\"n_expert\": %d, \"n_vocab\": %d, \"weight_bytes\": %llu}, \"plan\": ",
            qtype_name(pm->wtype), pm->n_layer, pm->n_head, pm->n_head_kv, pm->n_embd, pm->n_ff, pm->n_expert,
            pm->n_vocab, (unsigned long long)pm->weight_bytes);
    json_plan(f, best);
    fprintf(f, ", \"alternatives\": [");
    for (int i = 0; i < n_alts; i++) {
        if (i) fprintf(f, ", ");
        json_plan(f, &alts[i]);
    }
    fprintf(f, "]}\n");
}

void plan_print_brief(const plan_t *p, FILE *f) {
    fprintf(f, "plan %s%s: %d stage(s) on %d node(s)", p->layout[0] ? p->layout : "?",
            p->tp_mode == PLAN_TP_ALLREDUCE ? " (allreduce)" : "", p->n_stages, p->n);
    if (p->cost.token_ms > 0)
        fprintf(f, ", predicted %.3g ms/token (%.0f tokens/s)", p->cost.token_ms, 1e3 / p->cost.token_ms);
    fprintf(f, "\n");
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        if (b <= a) continue;
        const int l0 = p->shard[a].s.l0, l1 = p->shard[a].s.l1;
        if (l1 - l0 == 1) fprintf(f, "  stage %d: layer %d on", k, l0);
        else fprintf(f, "  stage %d: layers %d-%d on", k, l0, l1 - 1);
        for (int i = a; i < b; i++) {
            const plan_shard_t *s = &p->shard[i];
            char wb[32];
            plan_fmt_bytes(wb, sizeof wb, s->weight_bytes);
            fprintf(f, "%s %s (", i > a ? "," : "", p->node[s->node].name);
            char ex[256];
            int copies = 0; // hot second copies, one expert of one block each
            for (int il = s->s.l0; p->ep && il < s->s.l1 && il < PLAN_MAX_LAYERS; il++)
                for (int h = 0; h < p->ep_hot_n[il]; h++) copies += p->ep_hot_of[il][h].shard == i;
            if (p->ep) fprintf(f, "experts %s, ", plan_experts_str(p, i, 256, ex, sizeof ex));
            if (copies) fprintf(f, "%d hot cop%s, ", copies, copies == 1 ? "y" : "ies");
            else if (b - a > 1) fprintf(f, "heads %d-%d, ", s->s.h0, s->s.h1 - 1);
            fprintf(f, "%s of weights", wb);
            if (s->st.streams)
                fprintf(f, ", streamed: window %d, %d/%d units kept", s->st.window, s->st.pinned, s->st.n_units);
            fprintf(f, ")");
        }
        fprintf(f, "\n");
    }
}

int plan_left_out(const plan_t *p, int first, const char *noun, char *buf, size_t cap) {
    bool used[PLAN_MAX_NODES] = {0}; // (n_nodes) whether a shard names the node
    for (int i = 0; i < p->n; i++)
        if (p->shard[i].node >= 0 && p->shard[i].node < PLAN_MAX_NODES) used[p->shard[i].node] = true;
    int offered = 0, n_used = 0;
    char names[160] = "";            // the left-out nodes' names, comma-separated
    size_t at = 0;
    for (int j = first > 0 ? first : 0; j < p->n_nodes && j < PLAN_MAX_NODES; j++) {
        offered++;
        if (used[j]) {
            n_used++;
        } else if (at < sizeof names) {
            at += (size_t)snprintf(names + at, sizeof names - at, "%s%s", at ? ", " : "", p->node[j].name);
        }
    }
    const int left = offered - n_used;
    if (left > 0 && buf && cap) {
        if (strstr(p->why, " left out"))  // the planner's line names them and says why
            snprintf(buf, cap, "the plan uses %d of %d %s: %s", n_used, offered, noun, p->why);
        else
            snprintf(buf, cap, "the plan uses %d of %d %s: %s left out (%s)", n_used, offered, noun, names,
                     p->why[0] ? p->why : "no reason given");
    }
    return left;
}
