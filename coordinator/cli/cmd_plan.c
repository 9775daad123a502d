// meshlm plan: choose (or check) how a model is split over nodes and print the shard table, without running.
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "coordinator/cli/layout_args.h"
#include "parallel/plan.h"
#include "core/err.h"
#include "core/fs.h"
#include "offload/attn.h"
#include "offload/pim_sim.h"

// --- helpers

#define MAX_ALTS 8
#define NODES_FILE_MAX (1u << 24) // bytes of a --nodes-file

static void plan_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm plan (-m FILE | --preset NAME [--quant TYPE]) (--nodes SPEC | --nodes-file F)\n"
            "                   [-c N_CTX] [--pp S] [--tp T] [--tp-mode M] [--ep N|off] [--keep-all] [--pin-first]\n"
            "                   [--no-stream] [--plan FILE] [--out FILE] [--explain] [--json]\n"
            "  -m, --model FILE   GGUF model (only mapped, no weights read)\n"
            "  --preset NAME      a known model shape instead of a file (tinyllama-1.1b, llama-2-70b, mixtral-8x7b, ...)\n"
            "  --quant TYPE       the preset's weight type (default Q4_0)\n"
            "  --nodes SPEC       N equal nodes, or per node speed[:budget][@LAT_MS/MBIT][:disk=RATE][:disk_id=N],\n"
            "                     e.g. 2,1,1:512M or 1:2G@1/1000:disk=950M (speed is relative; budget is memory for\n"
            "                     weights + KV cache + activations; disk= the disk's read bandwidth in bytes/s;\n"
            "                     nodes with one disk_id share one disk)\n"
            "  --nodes-file F     one node per line: NAME key=value ... with speed= gflops= mem_bw= (bytes/s,\n"
            "                     e.g. 20G) mem= (budget) lat_ms= mbit= disk= (bytes/s) disk_id=\n"
            "  -c, --ctx-size N   context positions the KV cache is sized for (default 4096)\n"
            "  --pp S             exactly S pipeline stages    --tp T   exactly T nodes per stage\n"
            "  --tp-mode M        exact (default: all-gathers, bit-identical to one node), allreduce (2 all-reduces\n"
            "                     per block, not bit-exact) or auto (the faster predicted)\n"
            "  --ep N|off         MoE: experts placed whole on stages of N nodes (expert parallelism; attention\n"
            "                     replicated), or off: sliced only (default: the faster predicted)\n"
            "  --keep-all         every node computes          --pin-first  node 0 (coordinator) is rank 0\n"
            "  --no-stream        refuse shares that do not fit their budgets (default: they stream weights\n"
            "                     from disk through a window of units)\n"
            "  --ubatch U         prefill micro-batch (default %d)  --prompt N  prompt length (default %d)\n"
            "  --plan FILE        use this hand-written plan instead of searching\n"
            "  --out FILE         write the plan in the plan file format (for --plan)\n"
            "  --explain          compare the chosen plan with the best alternatives, both TP modes, and show\n"
            "                     per node its resident bytes, window, streamed MB and disk ms per token\n"
            "  --json             print the plan and alternatives as JSON\n"
            "  --kv-device DEV    where every node's KV cache lives (host, file:DIR, storage:EP, pim:PRESET):\n"
            "                     the KV table gives each node's KV at n_ctx, its part in RAM and spilled\n"
            "Node 0 is the coordinator's machine. Unknown figures default to 20 GFLOP/s per unit of speed,\n"
            "20 GB/s memory, a %.0f MB/s disk, 0.1 ms / 1 Gbit links.\n",
            PLAN_DEFAULT_UBATCH, PLAN_DEFAULT_N_PROMPT, PLAN_DEFAULT_DISK_BW / 1e6);
}

static int positive(const char *s, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < 1 || v > 1 << 20) return -1;
    *out = (int)v;
    return 0;
}

// "12.0 MiB" style.
static void kv_fmt(char *b, size_t cap, uint64_t v) {
    if (v >= (1ull << 30)) snprintf(b, cap, "%.2f GiB", (double)v / (1ull << 30));
    else snprintf(b, cap, "%.1f MiB", (double)v / (1ull << 20));
}

// Where each computing node's KV cache lives at the plan's n_ctx: the device, the bytes in RAM and
// the bytes past its RAM share (a paging device's file tier), or in the device (PIM, storage). A
// paging device's RAM share is the node's budget less its weights and activations.
static void kv_table(const plan_t *p, const char *dev, FILE *f) {
    const char *d = dev && *dev ? dev : "host";
    pim_config_t pc;
    const char *colon = strchr(d, ':');
    const bool pim = !strncmp(d, "pim", 3) && (!d[3] || d[3] == ':');
    const bool pim_ok = pim && pim_preset(colon ? colon + 1 : "hbm2-pim", &pc) == 0;
    const bool storage = !strncmp(d, "storage", 7);
    fprintf(f, "KV cache at n_ctx %d on %s:\n", p->n_ctx, d);
    fprintf(f, "| rank | %-16s | %10s | %10s | %10s | %s\n", "node", "KV", "in RAM", "spilled", "where");
    for (int i = 0; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        const uint64_t kv = s->kv_bytes, bud = p->node[s->node].mem_budget;
        uint64_t ram = kv, spill = 0;
        char where[160] = "this node's memory";
        if (storage) { // before the paging devices: attn_dev_pages counts it, but none of its KV is in RAM
            ram = 0;
            snprintf(where, sizeof where, "the kvstore process at %s", colon ? colon + 1 : "?");
        } else if (attn_dev_pages(d)) {
            // planned without it: the peak is the weights and activations (and a 1-position KV)
            const uint64_t rest = s->peak_bytes;
            const uint64_t share = !bud ? kv : bud > rest ? bud - rest : 0;
            ram = kv < share ? kv : share;
            spill = kv - ram;
            snprintf(where, sizeof where, "RAM up to its share, then files in %s", colon ? colon + 1 : "?");
        } else if (pim) {
            ram = 0;
            char cap[32];
            kv_fmt(cap, sizeof cap, pim_ok ? pc.capacity : 0);
            if (pim_ok) snprintf(where, sizeof where, "the simulated %s part (capacity %s)%s", pc.name, cap,
                                 kv > pc.capacity ? ": OVER ITS CAPACITY" : "");
            else snprintf(where, sizeof where, "no PIM preset '%s' (have: %s)", colon ? colon + 1 : "", pim_preset_names());
        } else if (bud && s->peak_bytes > bud) {
            snprintf(where, sizeof where, "this node's memory (its share is over the budget: weights stream)");
        }
        char a[32], b[32], c[32];
        kv_fmt(a, sizeof a, kv);
        kv_fmt(b, sizeof b, ram);
        kv_fmt(c, sizeof c, spill);
        fprintf(f, "| %4d | %-16.16s | %10s | %10s | %10s | %s\n", i, p->node[s->node].name, a, b, c, where);
    }
}

// --- public API

int cmd_plan(int argc, char **argv) {
    enum { O_NODES = 256, O_NODES_FILE, O_PRESET, O_QUANT, O_PP, O_TP, O_KEEP, O_PIN, O_PLAN, O_OUT, O_EXPLAIN,
           O_JSON, O_UBATCH, O_PROMPT, O_TP_MODE, O_NO_STREAM, O_KVDEV, O_EP };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},       {"nodes", required_argument, 0, O_NODES},
        {"nodes-file", required_argument, 0, O_NODES_FILE}, {"preset", required_argument, 0, O_PRESET},
        {"quant", required_argument, 0, O_QUANT},   {"ctx-size", required_argument, 0, 'c'},
        {"pp", required_argument, 0, O_PP},         {"tp", required_argument, 0, O_TP},
        {"keep-all", no_argument, 0, O_KEEP},       {"pin-first", no_argument, 0, O_PIN},
        {"plan", required_argument, 0, O_PLAN},     {"out", required_argument, 0, O_OUT},
        {"explain", no_argument, 0, O_EXPLAIN},     {"json", no_argument, 0, O_JSON},
        {"ubatch", required_argument, 0, O_UBATCH}, {"prompt", required_argument, 0, O_PROMPT},
        {"tp-mode", required_argument, 0, O_TP_MODE}, {"no-stream", no_argument, 0, O_NO_STREAM},
        {"kv-device", required_argument, 0, O_KVDEV}, {"ep", required_argument, 0, O_EP},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0}};
    const char *model = NULL, *preset = NULL, *quant = NULL, *spec = NULL, *nodes_file = NULL, *plan_path = NULL,
               *out_path = NULL;
    bool explain = false, json = false, mode_given = false;
    const char *kv_dev = NULL; // --kv-device: where every node's KV lives
    plan_opts_t po = {.n_ctx = 4096};
    int ch, bad = 0;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "m:c:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'm': model = optarg; break;
        case O_NODES: spec = optarg; break;
        case O_NODES_FILE: nodes_file = optarg; break;
        case O_PRESET: preset = optarg; break;
        case O_QUANT: quant = optarg; break;
        case 'c': bad |= positive(optarg, &po.n_ctx); break;
        case O_PP: bad |= positive(optarg, &po.pp); break;
        case O_TP: bad |= positive(optarg, &po.tp); break;
        case O_KEEP: po.keep_all = true; break;
        case O_PIN: po.pin_first = true; break;
        case O_PLAN: plan_path = optarg; break;
        case O_OUT: out_path = optarg; break;
        case O_EXPLAIN: explain = true; break;
        case O_JSON: json = true; break;
        case O_UBATCH: bad |= positive(optarg, &po.ubatch); break;
        case O_PROMPT: bad |= positive(optarg, &po.n_prompt); break;
        case O_TP_MODE: bad |= layout_args_tp_mode(optarg, &po.tp_mode); mode_given = true; break;
        case O_NO_STREAM: po.no_stream = true; break;
        case O_KVDEV: kv_dev = optarg; break;
        case O_EP: bad |= layout_args_ep(optarg, &po.ep); break;
        case 'h': plan_usage(stdout); return 0;
        default: plan_usage(stderr); return 2;
        }
    }
    if (bad || !model == !preset || !spec == !nodes_file || optind < argc || (quant && !preset)) {
        plan_usage(stderr);
        return 2;
    }
    char err[1024];
    plan_node_t nodes[PLAN_MAX_NODES];
    int n;
    if (spec) {
        n = plan_parse_nodes(spec, nodes, PLAN_MAX_NODES, err, sizeof err);
    } else {
        char *text = NULL, inner[512];
        n = mlm_read_file(nodes_file, NODES_FILE_MAX, &text, NULL, err, sizeof err);
        if (n == 0) n = plan_parse_nodes_file(text, nodes, PLAN_MAX_NODES, inner, sizeof inner);
        if (n < 0 && text) mlm_fail(err, sizeof err, n, "%s: %s", nodes_file, inner);
        free(text);
    }
    if (n < 0) {
        fprintf(stderr, "meshlm plan: %s\n", err);
        return 2;
    }
    plan_model_t *pm = malloc(sizeof *pm);
    plan_t *best = malloc(sizeof *best), *alts = malloc(sizeof *alts * MAX_ALTS);
    int rc = pm && best && alts ? 0 : MLM_ENOMEM, n_alts = 0;
    if (rc == 0 && preset) {
        rc = plan_model_from_preset(preset, quant, pm, err, sizeof err);
    } else if (rc == 0) {
        gguf_t *g = NULL;
        rc = gguf_open(&g, model, err, sizeof err);
        if (rc == 0) {
            rc = plan_model_from_gguf(g, pm, err, sizeof err);
            const char *base = strrchr(model, '/');
            snprintf(pm->name, sizeof pm->name, "%s", base ? base + 1 : model);
        }
        gguf_close(&g); // the description keeps no pointer into the file
    }
    // A paging KV device spills what a node's budget cannot hold: the layout is planned for the weights
    // and activations (a 1-position KV), and every share's KV is then counted at n_ctx for the KV table.
    const int n_ctx = po.n_ctx;
    const bool pages = attn_dev_pages(kv_dev);
    if (pages) po.n_ctx = 1;
    if (rc == 0 && plan_path) {
        plan_spec_t *ps = malloc(sizeof *ps);
        rc = ps ? plan_file_load(plan_path, ps, err, sizeof err) : MLM_ENOMEM;
        if (rc == 0) {
            char inner[512];
            if (mode_given && po.tp_mode != PLAN_TP_AUTO) ps->tp_mode = po.tp_mode; // overrides the file's
            rc = plan_from_spec(pm, nodes, n, ps, po.n_ctx, best, inner, sizeof inner);
            if (rc != 0) mlm_fail(err, sizeof err, rc, "%s: %s", plan_path, inner);
        }
        if (rc == 0) {
            best->ubatch = po.ubatch;
            best->n_prompt = po.n_prompt;
            plan_predict(pm, best);
        }
        free(ps);
    } else if (rc == 0) {
        rc = plan_make(pm, nodes, n, &po, best, alts, MAX_ALTS, &n_alts, err, sizeof err);
    }
    if (rc == 0 && pages) {
        for (int i = 0; i < best->n; i++) best->shard[i].kv_bytes *= (uint64_t)n_ctx; // linear in positions
        best->n_ctx = n_ctx;
        printf("(%s pages the KV: the budgets hold the weights and activations; the KV table says where the KV is)\n",
               kv_dev);
    }
    if (rc == 0 && out_path) {
        FILE *f = fopen(out_path, "w");
        if (!f) rc = mlm_fail(err, sizeof err, MLM_EIO, "%s: cannot create: %s", out_path, strerror(errno));
        else if (plan_file_write(best, f) != 0)
            rc = mlm_fail(err, sizeof err, MLM_EIO, "%s: write failed: %s", out_path, strerror(errno));
        if (f && fclose(f) != 0 && rc == 0)
            rc = mlm_fail(err, sizeof err, MLM_EIO, "%s: write failed: %s", out_path, strerror(errno));
    }
    if (rc == 0) {
        if (json) {
            plan_write_json(stdout, pm, best, alts, n_alts);
        } else if (explain) {
            plan_explain(stdout, pm, best, alts, n_alts);
        } else {
            plan_print_experts(best, pm->n_expert, stdout);
            plan_table(best, pm, stdout);
            int streams = 0;
            for (int i = 0; i < best->n; i++) streams += best->shard[i].st.streams;
            printf("predicted %.2f ms/token (%.3g tokens/s), prefill %.3g tokens/s", best->cost.token_ms,
                   best->cost.token_ms > 0 ? 1e3 / best->cost.token_ms : 0, best->cost.prefill_tok_s);
            if (streams)
                printf("; %d of %d node(s) stream weights from disk (%.2f ms/token of disk reads)", streams, best->n,
                       best->cost.disk_ms);
            if (best->cost.exact_ms > 0 && best->cost.allreduce_ms > 0 &&
                best->cost.exact_ms != best->cost.allreduce_ms)
                printf("; tp mode %s (exact %.2f, allreduce %.2f ms/token)", plan_tp_mode_name(best->tp_mode),
                       best->cost.exact_ms, best->cost.allreduce_ms);
            printf("; %s\n", best->why);
            kv_table(best, kv_dev, stdout);
        }
    } else {
        fprintf(stderr, "meshlm plan: %s\n", rc == MLM_ENOMEM ? "out of memory" : err);
    }
    free(pm);
    free(best);
    free(alts);
    return rc == 0 ? 0 : 1;
}
