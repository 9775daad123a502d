// meshlm plan: choose (or check) how a model is split over nodes and print the shard table, without running.
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

#include "coordinator/cli/cli.h"
#include "coordinator/cli/layout_args.h"
#include "parallel/plan.h"
#include "core/err.h"
#include "core/fs.h"
#include "offload/pim_sim.h"

// --- helpers

#define MAX_ALTS 8
#define NODES_FILE_MAX (1u << 24) // bytes of a --nodes-file

static void plan_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm plan (-m FILE | --preset NAME [--quant TYPE]) (--nodes SPEC | --nodes-file F)\n"
            "                   [-c N_CTX] [--pp S] [--tp T] [--tp-mode M] [--ep N|off] [--ep-attn lead|all]\n"
            "                   [--ep-replicas N] [--ep-hot FILE[:N]] [--expert-cache N|auto|all] [--keep-all]\n"
            "                   [--pin-first] [--no-stream]\n"
            "                   [--plan FILE] [--out FILE]\n"
            "                   [--explain] [--json]\n"
            "  -m, --model FILE   GGUF model (only mapped, no weights read)\n"
            "  --preset NAME      a known model shape instead of a file (tinyllama-1.1b, llama-2-70b, mixtral-8x7b, ...)\n"
            "  --quant TYPE       the preset's weight type (default Q4_0)\n"
            "  --nodes SPEC       N equal nodes, or per node speed[:budget][@LAT_MS/MBIT][:disk=RATE][:disk_id=N],\n"
            "                     e.g. 2,1,1:512M or 1:2G@1/1000:disk=950M (speed is relative; budget is memory for\n"
            "                     weights + KV cache + activations; disk= the disk's read bandwidth in bytes/s;\n"
            "                     nodes with one disk_id share one disk; :shm_id=N nodes with one shm_id share one\n"
            "                     host's memory (a tensor-parallel group of them exchanges through shared\n"
            "                     memory, as --local workers do); :cpu_id=N:cores=C:threads=T nodes with one\n"
            "                     cpu_id run on one machine of C cores, T threads each: computing at once\n"
            "                     they slow each other (as --local workers do); :kv=host|file|storage|pim its KV\n"
            "                     device, :kv_ram=SIZE a file device's RAM share, :kv_cap=SIZE its capacity)\n"
            "  --nodes-file F     one node per line: NAME key=value ... with speed= gflops= mem_bw= (bytes/s,\n"
            "                     e.g. 20G) mem= (budget) lat_ms= mbit= disk= (bytes/s) disk_id= shm_id=\n"
            "                     cpu_id= cores= threads=\n"
            "  -c, --ctx-size N   context positions the KV cache is sized for (default 4096)\n"
            "  --pp S             exactly S pipeline stages    --tp T   exactly T nodes per stage\n"
            "  --tp-mode M        exact (default: all-gathers, bit-identical to one node), allreduce (2 all-reduces\n"
            "                     per block, not bit-exact) or auto (the faster predicted)\n"
            "  --ep N|off         MoE: experts placed whole on stages of N nodes (expert parallelism), or off:\n"
            "                     sliced only (default: the faster predicted)\n"
            "  --ep-attn lead|all placed experts with attention on each stage's first node, the others holding\n"
            "                     experts only (lead, default), or attention replicated on every member (all)\n"
            "  --ep-replicas N    with lead: every expert on N members of its stage, each token's experts given\n"
            "                     to the least busy holders (default 1; with a budget on every node, the\n"
            "                     fastest predicted count up to top-k that fits)\n"
            "  --ep-hot FILE[:N]  with lead: a second copy of each block's N most popular experts (default N:\n"
            "                     top-k, at most 16), from FILE's routing counts (meshlm inspect MODEL --routing\n"
            "                     T --routing-out FILE); expert times are then predicted block by block\n"
            "  --expert-cache N|auto|all  experts cached (as the workers' --expert-cache): each node keeps N\n"
            "                     per block (auto, the default: as many as its budget holds; below one per\n"
            "                     block a sliced share keeps a pool of slots its blocks share) and reads the\n"
            "                     others from disk on use; placed experts are refused when one per block does\n"
            "                     not fit. all: every expert resident (placed experts over a budget refused)\n"
            "  --keep-all         every node computes          --pin-first  node 0 (coordinator) is rank 0\n"
            "  --no-stream        refuse shares that do not fit their budgets (default: they stream weights\n"
            "                     from disk through a window of units)\n"
            "  --ubatch U         prefill micro-batch (default %d)  --prompt N  prompt length (default %d)\n"
            "  --plan FILE        use this hand-written plan instead of searching\n"
            "  --out FILE         write the plan in the plan file format (for --plan)\n"
            "  --explain          compare the chosen plan with the best alternatives, both TP modes, and show\n"
            "                     per node its resident bytes, window, streamed MB and disk ms per token\n"
            "  --json             print the plan and alternatives as JSON\n"
            "  --kv-device DEV    where the KV cache lives on every node that names none (kv= in --nodes): host\n"
            "                     (all in its budget), file:DIR[,ram=SIZE] (its RAM share in the budget, the\n"
            "                     rest against DIR's free space), storage:EP, pim:PRESET (none in RAM, all\n"
            "                     against the device's capacity); the KV table says where each node's KV is\n"
            "  --kv-cap SIZE      the capacity of a KV device that states none (a kvstore's free space)\n"
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

// Gives every node that names no KV device of its own (kv= in its spec) the --kv-device dev (NULL: host):
// its kind, a file device's fixed RAM share (",ram=SIZE") and capacity (the free space under DIR), a PIM
// preset's capacity; a node's own kv=pim without kv_cap gets the preset's (hbm2-pim unless --kv-device
// names one); cap (--kv-cap, 0 = none) is the capacity of any other device that states none. 0 or an
// error in err.
static int kv_nodes(plan_node_t *nodes, int n, const char *dev, uint64_t cap, char *err, size_t errlen) {
    const int kind = plan_kv_dev_kind(dev);
    if (kind < 0) return mlm_fail(err, errlen, MLM_ENOTFOUND, "--kv-device: no KV device '%s' (have: host file storage pim)", dev);
    const char *colon = dev ? strchr(dev, ':') : NULL;
    char arg[512];
    snprintf(arg, sizeof arg, "%s", colon ? colon + 1 : "");
    uint64_t ram = 0, dev_cap = cap;
    if (kind == PLAN_KV_FILE) {
        char *opt = strchr(arg, ',');
        if (opt) *opt++ = 0;
        for (char *save = NULL, *o = opt ? strtok_r(opt, ",", &save) : NULL; o; o = strtok_r(NULL, ",", &save))
            if (!strncmp(o, "ram=", 4) && plan_parse_size(o + 4, &ram) != 0)
                return mlm_fail(err, errlen, MLM_EINVAL, "--kv-device: bad ram= '%s'", o + 4);
        struct statvfs vfs;
        if (!cap && arg[0] && statvfs(arg, &vfs) == 0) dev_cap = (uint64_t)vfs.f_bavail * vfs.f_frsize;
    } else if (kind == PLAN_KV_PIM) {
        pim_config_t pc;
        if (pim_preset(arg[0] ? arg : "hbm2-pim", &pc) != 0)
            return mlm_fail(err, errlen, MLM_ENOTFOUND, "--kv-device: no PIM preset '%s' (have: %s)", arg,
                            pim_preset_names());
        if (!cap) dev_cap = pc.capacity;
    }
    pim_config_t def;
    const bool have_def = pim_preset(kind == PLAN_KV_PIM && arg[0] ? arg : "hbm2-pim", &def) == 0;
    for (int i = 0; i < n; i++) {
        if (nodes[i].kv_dev == PLAN_KV_HOST && kind != PLAN_KV_HOST) { // its own kv= wins
            nodes[i].kv_dev = kind;
            if (!nodes[i].kv_ram) nodes[i].kv_ram = ram;
            if (!nodes[i].kv_cap) nodes[i].kv_cap = dev_cap;
        }
        // a node's own kv=pim without kv_cap: the part's capacity (--kv-device's preset, else hbm2-pim)
        if (nodes[i].kv_dev == PLAN_KV_PIM && !nodes[i].kv_cap && have_def) nodes[i].kv_cap = cap ? cap : def.capacity;
        if (nodes[i].kv_dev != PLAN_KV_PIM && nodes[i].kv_dev != PLAN_KV_HOST && !nodes[i].kv_cap) nodes[i].kv_cap = cap;
    }
    return 0;
}

// Where each computing node's KV cache lives at the plan's n_ctx (the planner's kv_ram_bytes and
// kv_dev_bytes): its device, the bytes in its RAM (in its budget) and on the device, and the device's
// capacity when known. dev: --kv-device (NULL: none), which names the directory, endpoint or preset of
// the nodes that took it.
static void kv_table(const plan_t *p, const char *dev, FILE *f) {
    const int kind = plan_kv_dev_kind(dev);
    const char *colon = dev ? strchr(dev, ':') : NULL;
    char arg[256];
    snprintf(arg, sizeof arg, "%.*s", colon ? (int)strcspn(colon + 1, ",") : 0, colon ? colon + 1 : "");
    pim_config_t pc;
    const bool pim_ok = pim_preset(kind == PLAN_KV_PIM && arg[0] ? arg : "hbm2-pim", &pc) == 0;
    if (dev) fprintf(f, "KV cache at n_ctx %d on %s:\n", p->n_ctx, dev);
    else fprintf(f, "KV cache at n_ctx %d:\n", p->n_ctx);
    fprintf(f, "| rank | %-16s | %-7s | %10s | %10s | %10s | %10s | %s\n", "node", "device", "KV", "in RAM", "on device",
            "capacity", "where");
    for (int i = 0; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        const plan_node_t *nd = &p->node[s->node];
        char a[32], b[32], c[32], d[32], where[384] = "its memory";
        kv_fmt(a, sizeof a, s->kv_bytes);
        kv_fmt(b, sizeof b, s->kv_ram_bytes);
        kv_fmt(c, sizeof c, s->kv_dev_bytes);
        if (nd->kv_cap) kv_fmt(d, sizeof d, nd->kv_cap);
        else snprintf(d, sizeof d, "-");
        const bool named = nd->kv_dev == kind && arg[0]; // the --kv-device says where
        switch (nd->kv_dev) {
        case PLAN_KV_FILE:
            snprintf(where, sizeof where, "RAM up to %s, then files in %s", nd->kv_ram ? "its ram= share" : "what its budget leaves",
                     named ? arg : "a directory");
            break;
        case PLAN_KV_STORAGE:
            snprintf(where, sizeof where, "the kvstore process at %s", named ? arg : "its endpoint");
            break;
        case PLAN_KV_PIM:
            snprintf(where, sizeof where, "the simulated %s part (capacity %s)", pim_ok ? pc.name : "?", d);
            break;
        default:
            if (nd->mem_budget && s->st.streams)
                snprintf(where, sizeof where, "its memory (its share is over the budget: weights stream)");
            break;
        }
        fprintf(f, "| %4d | %-16.16s | %-7s | %10s | %10s | %10s | %10s | %s\n", i, nd->name,
                plan_kv_dev_name(nd->kv_dev), a, b, c, d, where);
    }
}

// --- public API

int cmd_plan(int argc, char **argv) {
    enum { O_NODES = 256, O_NODES_FILE, O_PRESET, O_QUANT, O_PP, O_TP, O_KEEP, O_PIN, O_PLAN, O_OUT, O_EXPLAIN,
           O_JSON, O_UBATCH, O_PROMPT, O_TP_MODE, O_NO_STREAM, O_KVDEV, O_EP, O_KVCAP, O_EP_ATTN, O_EP_REPLICAS, O_EP_HOT,
           O_EXPERT_CACHE };
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
        {"ep-attn", required_argument, 0, O_EP_ATTN}, {"ep-replicas", required_argument, 0, O_EP_REPLICAS},
        {"expert-cache", required_argument, 0, O_EXPERT_CACHE},
        {"ep-hot", required_argument, 0, O_EP_HOT},
        {"kv-cap", required_argument, 0, O_KVCAP},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0}};
    const char *model = NULL, *preset = NULL, *quant = NULL, *spec = NULL, *nodes_file = NULL, *plan_path = NULL,
               *out_path = NULL, *hot_path = NULL;
    bool explain = false, json = false, mode_given = false;
    const char *kv_dev = NULL; // --kv-device: where the KV of every node that names none lives
    uint64_t kv_cap = 0;       // --kv-cap: the capacity of a KV device that states none
    plan_opts_t po = {.n_ctx = 4096, .expert_cache = -1}; // auto: what the workers do under a budget
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
        case O_KVCAP: bad |= plan_parse_size(optarg, &kv_cap) != 0 || !kv_cap; break;
        case O_EP: bad |= layout_args_ep(optarg, &po.ep); break;
        case O_EP_REPLICAS: bad |= positive(optarg, &po.ep_replicas); break;
        case O_EXPERT_CACHE:
            if (!strcmp(optarg, "auto")) {
                po.expert_cache = -1;
            } else if (!strcmp(optarg, "all")) {
                po.expert_cache = 0; // every placed expert resident: over a budget refused
            } else if (positive(optarg, &po.expert_cache) != 0) {
                fprintf(stderr, "meshlm plan: --expert-cache wants experts per block (1 or more), auto or all, not '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case O_EP_HOT: {
            layout_args_t la = {0};
            if (layout_args_option(&la, LA_EP_HOT, optarg, "plan") < 0) bad = 1;
            hot_path = la.ep_hot_file;
            po.ep_hot = la.ep_hot;
            break;
        }
        case O_EP_ATTN:
            bad |= strcmp(optarg, "lead") != 0 && strcmp(optarg, "all") != 0;
            po.ep_replicated = strcmp(optarg, "all") == 0;
            break;
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
    if (n > 0 && kv_nodes(nodes, n, kv_dev, kv_cap, err, sizeof err) != 0) n = -1;
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
    double *pop = NULL; // --ep-hot's popularity
    if (rc == 0 && hot_path) {
        if (plan_path) rc = mlm_fail(err, sizeof err, MLM_EINVAL, "--ep-hot and --plan exclude each other");
        else if (pm->n_expert <= 0) rc = mlm_fail(err, sizeof err, MLM_EINVAL, "--ep-hot: %s has no experts", pm->name);
        else if (!(pop = malloc((size_t)pm->n_layer * (size_t)pm->n_expert * sizeof *pop))) rc = MLM_ENOMEM;
        else rc = plan_popularity_load(hot_path, pm, pop, err, sizeof err);
        pm->popularity = pop;
        if (rc == 0 && po.ep_hot == 0) po.ep_hot = pm->n_expert_used;
        if (po.ep_hot > pm->n_expert) po.ep_hot = pm->n_expert;
    }
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
    free(pop);
    free(pm);
    free(best);
    free(alts);
    return rc == 0 ? 0 : 1;
}
