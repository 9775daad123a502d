// meshlm run: load a GGUF model on this machine, tokenize a prompt, and stream a generation.
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster/launch.h"
#include "cluster/registry.h"
#include "coordinator/cli/cli.h"
#include "coordinator/cli/curve_args.h"
#include "coordinator/cli/fault_args.h"
#include "coordinator/runtime/cluster.h"
#include "coordinator/cli/gen_args.h"
#include "coordinator/cli/expert_args.h"
#include "coordinator/cli/layout_args.h"
#include "coordinator/cli/mem_report.h"
#include "coordinator/cli/reg_workers.h"
#include "coordinator/runtime/generate.h"
#include "core/err.h"
#include "offload/attn.h"
#include "core/sha256.h"
#include "worker/model/model.h"
#include "worker/text/tokenizer.h"

// --- helpers

typedef struct {
    gen_args_t g;             // model, prompt, sampling, output
    char *workers;            // --workers a,b,c (owned copy)
    const char *registry;     // --registry URL: the workers and standbys are found there
    registry_t *reg;          // open while the run lasts (the plan is published there), or NULL
    int local;                // --local N
    bool local_tcp;           // --local-tcp
    bool local_no_model;      // --local-no-model: workers receive their slices
    const char *cache_dir;    // --cache-dir for local workers
    bool coord_shard;         // --coordinator-shard
    const char *speeds;       // --speeds
    int timeout_ms;           // --timeout
    const char *data_endpoint; // --data-endpoint
    bool verbose;             // --verbose
    bool show_plan;           // --show-plan
    layout_args_t lay;        // --pp, --tp, --plan, --ubatch, --keep-all, --mem-budget, --local-mem
    expert_args_t ex;         // --expert-cache, --expert-policy, --expert-prefetch, --expert-skip
    const char *faults;       // --faults SPEC (NULL: $MESHLM_FAULTS)
    curve_args_t curve;       // --curve-key, --curve-peers
    const curve_conf_t *curve_conf; // read from them, or NULL
} run_args_t;

static void run_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm run -m FILE (-p TEXT | -f FILE) [options]\n"
            GEN_ARGS_USAGE
            "cluster:\n"
            "      --workers LIST      comma-separated worker endpoints (tcp://HOST:PORT or ipc:///PATH)\n"
            "      --registry URL      find the workers and standbys in a registry (redis://HOST:PORT, see\n"
            "                          meshlm worker --registry); the plan is published there\n"
            "      --local N           start N worker processes on this machine for this run\n"
            "      --local-tcp         local workers on loopback TCP instead of ipc sockets\n"
            "      --local-no-model    local workers get no model file: their slices are streamed and cached\n"
            "      --cache-dir DIR     shard cache of local workers\n"
            "      --coordinator-shard the coordinator computes a share too\n"
            "      --speeds LIST       relative speeds of the computing nodes, e.g. 2,1 (default equal)\n"
            "      --timeout MS        deadline of each exchange and collective (default 30000)\n"
            "      --data-endpoint EP  the coordinator's data-plane endpoint (default: its address towards the\n"
            "                          first worker, on a free port)\n"
            "      --show-plan         print the plan (who holds which layers) on stderr before generating\n"
            "      --verbose           cluster progress on stderr\n"
            LAYOUT_MEM_USAGE
            EXPERT_ARGS_USAGE
            LAYOUT_FAULT_USAGE
            FAULT_ARGS_USAGE
            CURVE_ARGS_USAGE
            LAYOUT_ARGS_USAGE
            "at the end, stderr (and --json's \"memory\") reports every process's peak resident set (VmHWM)\n"
            "and the peak of each local worker's memory cgroup\n");
}

enum { O_WORKERS = GA_NEXT, O_LOCAL, O_LOCAL_TCP, O_LOCAL_NOMODEL, O_CACHE, O_CSHARD, O_SPEEDS, O_TIMEOUT,
       O_VERBOSE, O_DATA_EP, O_SHOW_PLAN, O_REGISTRY };

static int parse_args(int argc, char **argv, run_args_t *a, const char *cmd) {
    static const struct option opts[] = {
        GEN_ARGS_LONGOPTS, {"workers", required_argument, 0, O_WORKERS}, {"registry", required_argument, 0, O_REGISTRY}, {"local", required_argument, 0, O_LOCAL},
        {"local-tcp", no_argument, 0, O_LOCAL_TCP}, {"local-no-model", no_argument, 0, O_LOCAL_NOMODEL},
        {"cache-dir", required_argument, 0, O_CACHE}, {"coordinator-shard", no_argument, 0, O_CSHARD},
        {"speeds", required_argument, 0, O_SPEEDS}, {"timeout", required_argument, 0, O_TIMEOUT},
        {"verbose", no_argument, 0, O_VERBOSE}, {"data-endpoint", required_argument, 0, O_DATA_EP},
        {"show-plan", no_argument, 0, O_SHOW_PLAN},
        LAYOUT_ARGS_LONGOPTS, LAYOUT_MEM_LONGOPTS, LAYOUT_FAULT_LONGOPTS, FAULT_ARGS_LONGOPTS, CURVE_ARGS_LONGOPTS,
        EXPERT_ARGS_LONGOPTS,
        {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    gen_args_init(&a->g);
    expert_args_init(&a->ex);
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, GEN_ARGS_SHORTOPTS, opts, NULL)) != -1) {
        int r = gen_args_option(&a->g, ch, optarg, cmd);
        if (r == 0) r = layout_args_option(&a->lay, ch, optarg, cmd);
        if (r == 0) r = curve_args_option(&a->curve, ch, optarg);
        if (r == 0) r = expert_args_option(&a->ex, ch, optarg, cmd);
        if (r < 0) return 1;
        if (r > 0) continue;
        switch (ch) {
        case O_WORKERS: free(a->workers); a->workers = strdup(optarg); break;
        case O_REGISTRY: a->registry = optarg; break;
        case O_LOCAL: a->local = atoi(optarg); break;
        case O_LOCAL_TCP: a->local_tcp = true; break;
        case O_LOCAL_NOMODEL: a->local_no_model = true; break;
        case O_CACHE: a->cache_dir = optarg; break;
        case O_CSHARD: a->coord_shard = true; break;
        case O_SPEEDS: a->speeds = optarg; break;
        case O_TIMEOUT: a->timeout_ms = atoi(optarg); break;
        case O_VERBOSE: a->verbose = true; break;
        case O_SHOW_PLAN: a->show_plan = true; break;
        case O_DATA_EP: a->data_endpoint = optarg; break;
        case FA_FAULTS: a->faults = optarg; break;
        case 'h': run_usage(stdout); return -1;
        default: run_usage(stderr); return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "meshlm %s: unexpected argument '%s'\n", cmd, argv[optind]);
        return 1;
    }
    if (gen_args_check(&a->g, cmd) != 0) {
        run_usage(stderr);
        return 1;
    }
    if (a->local < 0 || (a->local > 0 && a->workers)) {
        fprintf(stderr, "meshlm %s: use either --local N or --workers LIST\n", cmd);
        return 1;
    }
    if (curve_args_load(&a->curve, cmd, &a->curve_conf) != 0) return 1;
    if (a->curve_conf && a->local > 0) {
        fprintf(stderr, "meshlm %s: --curve-key is for remote workers (--workers or --registry); local workers are "
                "reached over this machine's own sockets\n", cmd);
        return 1;
    }
    if (a->lay.local_mem_set && a->local == 0) {
        fprintf(stderr, "meshlm %s: --local-mem limits the workers started with --local N, and there are none\n", cmd);
        return 1;
    }
    return 0;
}

// Splits "a,b,c" in place into at most max pointers; returns the count.
static int split_list(char *s, const char **out, int max) {
    int n = 0;
    for (char *tok = strtok(s, ","); tok && n < max; tok = strtok(NULL, ",")) out[n++] = tok;
    return n;
}

static int run_main(run_args_t *a);

// After a failure: names the local workers that have died, and how (the OOM killer of their cgroup).
static void say_dead_workers(launch_t *lw) {
    char why[2048];
    if (lw && launch_check(lw, 500, why, sizeof why) > 0) fprintf(stderr, "meshlm run: %s\n", why);
}

// Parses, runs and frees: the whole of `run` and of `coordinator` (which insists on --workers).
static int run_command(int argc, char **argv, const char *cmd) {
    run_args_t a;
    int prc = parse_args(argc, argv, &a, cmd ? cmd : "run");
    registry_t *reg = NULL;
    int n_standby = 0;
    if (prc == 0 && a.registry && (a.workers || a.local > 0)) {
        fprintf(stderr, "meshlm %s: use one of --registry URL, --workers LIST and --local N\n", cmd ? cmd : "run");
        prc = 1;
    } else if (prc == 0 && a.registry) {
        prc = reg_workers_find(a.registry, cmd ? cmd : "run", &a.workers, &n_standby, &reg) == 0 ? 0 : 1;
        a.lay.n_standby += n_standby;
        a.reg = reg;
    }
    if (prc == 0 && cmd && !a.workers) {
        fprintf(stderr, "meshlm %s: --workers LIST or --registry URL is required (or use 'meshlm run --local N')\n", cmd);
        prc = 1;
    }
    const int code = prc != 0 ? (prc < 0 ? 0 : 2) : run_main(&a);
    registry_destroy(&reg);
    free(a.workers);
    gen_args_free(&a.g);
    return code;
}

// The local engine with the KV device's counters taken after the prompt's evaluation, so the
// decode steps' share of a simulated time or of the bytes read from a tier can be told apart.
typedef struct {
    gen_engine_t in;           // the model's engine
    model_ctx_t *ctx;          // borrowed
    int evals;                 // evaluations since the reset (the first is the prompt)
    attn_stats_t prompt;       // the device's counters after it
} kv_watch_t;

static int watch_eval(void *arg, const int32_t *tokens, int n, float *logits, bool all_logits) {
    kv_watch_t *w = arg;
    const int rc = w->in.eval(w->in.ctx, tokens, n, logits, all_logits);
    if (w->evals++ == 0) attn_dev_stats(model_ctx_attn(w->ctx), &w->prompt);
    return rc;
}

static void watch_reset(void *arg) {
    kv_watch_t *w = arg;
    w->in.reset(w->in.ctx);
    w->evals = 0;
}

// --- public API

int cmd_run(int argc, char **argv) { return run_command(argc, argv, NULL); }

int cmd_coordinator(int argc, char **argv) { return run_command(argc, argv, "coordinator"); }

static int run_main(run_args_t *ap) {
    run_args_t a = *ap;
    char err[1024] = "";
    char wname[96]; // the expert cache's provider name (expert_args_provider)
    model_t *m = NULL;
    cluster_t *cl = NULL;
    launch_t *lw = NULL;
    tokenizer_t *tok = NULL;
    model_ctx_t *ctx = NULL;
    int32_t *pt = NULL;
    FILE *lf = NULL;
    fault_args_t fa = {0};    // the fault schedule (--faults, $MESHLM_FAULTS)
    int code = 1, rc;
    const bool distributed = a.workers || a.local > 0;
    const model_t *mm = NULL; // the model whose metadata and tokenizer we use
    const char *eps[LAUNCH_MAX]; // (n_workers) worker endpoints
    int n_workers = 0;
    uint8_t sha[32];          // the model's SHA-256 with --local (hashed once for every process)
    char sha_hex[65] = "";    // ... in hex, for the workers' command lines
    // a.lay.mem_budget is this process's own budget too (single node or --coordinator-shard): a share
    // that does not fit it streams through the weight window (offload/weights.h).
    if (!distributed && a.faults) {
        fprintf(stderr, "meshlm run: --faults needs workers (--local N or --workers LIST)\n");
        goto out;
    }
    if (!distributed) {
        // a paging KV device keeps what its RAM share cannot hold in files: the budget plans the weights
        // alone, and the KV gets what they leave (model_kv_ram_share)
        const bool pages = attn_dev_pages(a.g.kv_device) && a.lay.mem_budget;
        model_load_opts_t lo = {.repack = a.g.repack, .mem_budget = a.lay.mem_budget, .n_ctx = pages ? 1 : a.g.n_ctx,
                                .weights = expert_args_provider(&a.ex, wname, sizeof wname), .expert_skip = a.ex.skip};
        if ((rc = model_load(&m, a.g.model, &lo, err, sizeof err)) != 0) {
            fprintf(stderr, "meshlm run: %s\n", err[0] ? err : mlm_strerror(rc));
            goto out;
        }
        mm = m;
        if (a.verbose || a.ex.set || (a.lay.mem_budget && strcmp(weights_name(model_weights(m)), "mmap") != 0)) {
            char how[160];
            weights_describe(model_weights(m), how, sizeof how);
            fprintf(stderr, "meshlm: weights: %s\n", how);
        }
    } else {
        if (a.local > 0) {
            // The model is hashed once here for the coordinator and its workers (a 39 GB file took
            // minutes when five processes hashed it at once).
            if (sha256_file(a.g.model, sha, err, sizeof err) != 0) {
                fprintf(stderr, "meshlm run: %s\n", err);
                goto out;
            }
            sha256_hex(sha, sha_hex);
            lw = calloc(1, sizeof *lw);
            launch_opts_t lo = {.model_path = a.local_no_model ? NULL : a.g.model, .cache_dir = a.cache_dir,
                                .n_threads = a.g.n_threads, .tcp = a.local_tcp, .verbose = a.verbose,
                                .mem_budget = a.lay.mem_budget, .mem_limit = layout_args_local_mem(&a.lay),
                                .extra_argv = a.ex.argv, .n_extra = a.ex.n_argv,
                                .model_sha256 = sha_hex, .timeout_ms = a.timeout_ms}; // the run's deadlines
            if (!lw || launch_local(lw, a.local, &lo, err, sizeof err) != 0) {
                fprintf(stderr, "meshlm run: %s\n", err);
                goto out;
            }
            if (lw->cg_note[0]) fprintf(stderr, "meshlm: %s\n", lw->cg_note);
            for (int i = 0; i < lw->n; i++) eps[i] = lw->endpoint[i];
            n_workers = lw->n;
        } else {
            n_workers = split_list(a.workers, eps, LAUNCH_MAX);
        }
        // The schedule's spec (with its board) goes into $MESHLM_FAULTS, which the cluster hands on.
        if (fault_args_setup(&fa, a.faults, lw, n_workers, true, "run") != 0) goto out;
        cluster_opts_t co = {.model_path = a.g.model, .model_sha256 = a.local > 0 ? sha : NULL, .workers = eps,
                             .n_workers = n_workers, .speeds = a.speeds,
                             .coordinator_shard = a.coord_shard, .n_ctx = a.g.n_ctx, .n_threads = a.g.n_threads,
                             .mem_budget = a.lay.mem_budget,
                             .weights = expert_args_provider(&a.ex, wname, sizeof wname), .expert_skip = a.ex.skip,
                             .timeout_ms = a.timeout_ms, .kv_f32 = a.g.kv_f32, .kv_q8 = a.g.kv_q8, .kv_device = a.g.kv_device, .verbose = a.verbose,
                             .data_endpoint = a.data_endpoint, .pp = a.lay.pp, .tp = a.lay.tp, .ep = a.lay.ep, .ep_replicated = a.lay.ep_replicated, .ep_replicas = a.lay.ep_replicas, .ep_hot_file = a.lay.ep_hot_file, .ep_hot = a.lay.ep_hot, .expert_cache = expert_args_plan(&a.ex),
                             .keep_all = a.lay.keep_all, .plan_file = a.lay.plan_file, .ubatch = a.lay.ubatch,
                             .local_profile = a.local > 0, .recover = !a.lay.no_recover,
                             .heartbeat_ms = a.lay.heartbeat_ms, .n_standby = a.lay.n_standby,
                             .on_plan = a.reg ? reg_workers_publish_plan : NULL, .on_plan_arg = a.reg,
                             .tp_mode = a.lay.tp_mode, .tp_mode_set = a.lay.tp_mode_set,
                             .drop_cache = lw && lw->mem_limit && !a.local_no_model, .curve = a.curve_conf};
        if ((rc = cluster_open(&cl, &co, err, sizeof err)) != 0) {
            fprintf(stderr, "meshlm run: cluster: %s\n", err);
            say_dead_workers(lw);
            goto out;
        }
        mm = cluster_model(cl);
        char line[512];
        if (plan_left_out(cluster_plan(cl), a.coord_shard ? 1 : 0, "workers", line, sizeof line) > 0)
            fprintf(stderr, "meshlm: %s\n", line);
        if (a.verbose) plan_print(cluster_plan(cl), model_gguf(mm), stderr);
        if (a.show_plan) plan_print_brief(cluster_plan(cl), stderr);
    }
    if ((rc = tokenizer_from_gguf(&tok, model_gguf(mm), err, sizeof err)) != 0) {
        fprintf(stderr, "meshlm run: tokenizer: %s\n", err[0] ? err : mlm_strerror(rc));
        goto out;
    }
    size_t plen = strlen(a.g.prompt);
    int cap = (int)plen + 8;
    pt = malloc((size_t)cap * sizeof *pt);
    int np = pt ? tokenizer_encode(tok, a.g.prompt, plen, !a.g.no_bos && tokenizer_add_bos(tok), false, pt, cap) : MLM_ENOMEM;
    if (np < 0 || np > cap) {
        fprintf(stderr, "meshlm run: cannot tokenize the prompt: %s\n", np < 0 ? mlm_strerror(np) : "too long");
        goto out;
    }
    const model_hparams_t *hp = model_hparams(mm);
    gen_engine_t eng;
    kv_watch_t watch = {0}; // the local context's KV device counters after the prompt
    if (!distributed) {
        model_ctx_opts_t co = {.n_ctx = a.g.n_ctx, .n_batch = a.g.n_batch, .n_threads = a.g.n_threads, .kv_f32 = a.g.kv_f32,
                               .kv_q8 = a.g.kv_q8,
                               .attn_dev = a.g.kv_device};
        if (co.n_ctx == 0) {
            int need = np + a.g.n_predict + 1;
            int def = hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
            co.n_ctx = need > def ? need : def;
        }
        if (np + a.g.n_predict + 1 > co.n_ctx) {
            fprintf(stderr, "meshlm run: prompt (%d tokens) + %d to generate exceed the context of %d positions (-c)\n",
                    np, a.g.n_predict, co.n_ctx);
            goto out;
        }
        const int sized = a.g.n_ctx > 0 ? a.g.n_ctx : (hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
        if (attn_dev_pages(a.g.kv_device)) co.kv_ram = model_kv_ram_share(m, a.lay.mem_budget);
        else if (a.lay.mem_budget && co.n_ctx > sized) { // the budget was checked for a smaller KV cache
            fprintf(stderr, "meshlm run: prompt (%d tokens) + %d to generate need %d positions; with --mem-budget, "
                    "give them as -c %d so the budget counts their KV cache\n", np, a.g.n_predict, co.n_ctx, co.n_ctx);
            goto out;
        }
        if ((rc = model_ctx_new(&ctx, m, &co, err, sizeof err)) != 0) {
            fprintf(stderr, "meshlm run: %s\n", err);
            goto out;
        }
        eng = gen_engine_model(ctx, hp->n_vocab);
        if (model_ctx_attn(ctx)) {
            watch = (kv_watch_t){.in = eng, .ctx = ctx};
            eng = (gen_engine_t){.ctx = &watch, .n_vocab = hp->n_vocab, .eval = watch_eval, .reset = watch_reset};
        }
    } else {
        eng = gen_engine_cluster(cl, hp->n_vocab);
        if (fa.spec) eng = fault_args_engine(&fa, &eng, true); // each generated token is reported to the schedule
    }
    if (a.g.logits_path && !(lf = fopen(a.g.logits_path, "wb"))) {
        fprintf(stderr, "meshlm run: %s: cannot create: %s\n", a.g.logits_path, strerror(errno));
        goto out;
    }
    a.g.gen.n_predict = a.g.n_predict;
    a.g.gen.stream = a.g.json ? NULL : stdout;
    a.g.gen.logits_out = lf;
    a.g.gen.logits_path = a.g.logits_path;
    gen_result_t res;
    if (fault_args_start(&fa, "run") != 0) goto out;
    rc = gen_run(&eng, tok, pt, np, &a.g.gen, &res, err, sizeof err);
    faultsched_stop(fa.sched); // every frozen or slowed worker continues
    if (rc != 0) {
        fprintf(stderr, "\nmeshlm run: %s\n", err);
        if (cl && cluster_error(cl)[0]) fprintf(stderr, "meshlm run: %s\n", cluster_error(cl));
        say_dead_workers(lw);
        goto out;
    }
    if (lf && fclose(lf) != 0) {
        lf = NULL;
        fprintf(stderr, "meshlm run: %s: writing failed: %s\n", a.g.logits_path, strerror(errno));
        gen_result_free(&res);
        goto out;
    }
    lf = NULL;
    mem_report_t *mr = malloc(sizeof *mr); // before the workers are told to exit
    if (mr) mem_report_collect(mr, lw, eps, lw ? 0 : n_workers);
    if (a.g.json) {
        cJSON *extras = cJSON_CreateObject();
        if (extras && mr) cJSON_AddItemToObject(extras, "memory", mem_report_json(mr));
        if (extras && cl) cJSON_AddItemToObject(extras, "recoveries", cluster_recoveries_json(cl));
        if (extras && fa.sched) cJSON_AddItemToObject(extras, "faults", faultsched_log_json(fa.sched));
        if (extras && ctx && model_ctx_attn(ctx)) {
            attn_stats_t ks;
            attn_dev_stats(model_ctx_attn(ctx), &ks);
            cJSON *o = cJSON_AddObjectToObject(extras, "kv_device");
            cJSON_AddStringToObject(o, "name", attn_dev_name(model_ctx_attn(ctx)));
            cJSON_AddNumberToObject(o, "kv_bytes", (double)ks.kv_bytes);
            cJSON_AddNumberToObject(o, "kv_bytes_ram", (double)ks.kv_bytes_ram);
            cJSON_AddNumberToObject(o, "bytes_read", (double)ks.bytes_read);
            cJSON_AddNumberToObject(o, "bytes_written", (double)ks.bytes_written);
            cJSON_AddNumberToObject(o, "time_ms", ks.time_ms);
            cJSON_AddBoolToObject(o, "simulated", ks.sim_time_ms > 0 || ks.sim_energy_mj > 0);
            cJSON_AddNumberToObject(o, "sim_time_ms", ks.sim_time_ms);
            cJSON_AddNumberToObject(o, "sim_energy_mj", ks.sim_energy_mj);
            // the generated tokens' part (after the prompt's evaluation)
            cJSON_AddNumberToObject(o, "decode_sim_time_ms", ks.sim_time_ms - watch.prompt.sim_time_ms);
            cJSON_AddNumberToObject(o, "decode_sim_energy_mj", ks.sim_energy_mj - watch.prompt.sim_energy_mj);
            cJSON_AddNumberToObject(o, "decode_bytes_read", (double)(ks.bytes_read - watch.prompt.bytes_read));
            cJSON_AddNumberToObject(o, "decode_time_ms", ks.time_ms - watch.prompt.time_ms);
        }
        gen_print_json_extra(pt, np, &res, extras);
    } else {
        printf("\n");
        fflush(stdout);
    }
    fprintf(stderr, "meshlm: prompt %d tokens in %.1f ms (%.1f tokens/s); generation %d tokens in %.1f ms (%.1f tokens/s)\n",
            np, res.prompt_ms, res.prompt_ms > 0 ? np * 1000.0 / res.prompt_ms : 0.0, res.n_tokens, res.gen_ms,
            res.gen_ms > 0 ? res.n_gen_evals * 1000.0 / res.gen_ms : 0.0);
    if (cl) {
        const cluster_stats_t *st = cluster_stats(cl);
        fprintf(stderr, "meshlm: cluster of %d worker(s) ready in %.0f ms (%d mapped the model, %d from cache, %d streamed %.1f MB)\n",
                cluster_plan(cl)->n, st->load_ms, st->from_file, st->from_cache, st->streamed,
                (double)st->shard_bytes_sent / 1e6);
    }
    if (mr) mem_report_line(mr, stderr);
    free(mr);
    char kvline[512];
    if (ctx && model_ctx_attn(ctx) && (a.g.kv_device || a.verbose) &&
        attn_dev_describe(model_ctx_attn(ctx), kvline, sizeof kvline) > 0)
        fprintf(stderr, "meshlm: %s\n", kvline);
    char streamed[256];
    if (m && weights_read_summary(model_weights(m), streamed, sizeof streamed) > 0)
        fprintf(stderr, "meshlm: weights streamed: %s\n", streamed);
    if (m && !strcmp(weights_name(model_weights(m)), "experts")) {
        weights_stats_t ws;
        weights_stats(model_weights(m), &ws);
        expert_args_summary(&ws, np + res.n_tokens, streamed, sizeof streamed);
        fprintf(stderr, "meshlm: %s\n", streamed);
    }
    gen_result_free(&res);
    code = 0;
out:
    if (lf) fclose(lf);
    free(pt);
    model_ctx_destroy(&ctx);
    tokenizer_destroy(&tok);
    model_destroy(&m);
    fault_args_free(&fa); // before the workers are told to go: none stays stopped
    cluster_close(&cl, lw != NULL);
    if (lw) {
        launch_reap(lw, 5000);
        free(lw);
    }
    return code;
}
