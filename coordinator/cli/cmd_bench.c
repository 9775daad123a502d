// meshlm bench: prompt-processing and generation speed in a llama-bench style table.
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/clock.h"
#include "cluster/launch.h"
#include "coordinator/cli/cli.h"
#include "coordinator/cli/fault_args.h"
#include "coordinator/cli/gen_args.h"
#include "coordinator/runtime/cluster.h"
#include "coordinator/cli/expert_args.h"
#include "coordinator/cli/layout_args.h"
#include "coordinator/cli/mem_report.h"
#include "coordinator/runtime/generate.h"
#include "core/err.h"
#include "core/sha256.h"
#include "core/rng.h"
#include "offload/attn.h"
#include "worker/model/model.h"

// --- helpers

#define MAX_MODELS 8
#define MAX_REPS 100
#define O_KVDEV 3100 // --kv-device (above the layout, fault and shared option ids)
#define O_KVTYPE 3101 // --kv-type

typedef struct {
    const char *models[MAX_MODELS];  // -m, repeatable
    int n_models;
    int threads[8];                  // -t list
    int n_threads;
    int n_prompt;                    // -p (0 = skip)
    int n_gen;                       // -n (0 = skip)
    int reps;                        // -r
    bool json;
    bool repack;
    int local;                       // --local N worker processes
    bool local_tcp;                  // --local-tcp
    char *workers;                   // --workers LIST (owned)
    bool coord_shard;                // --coordinator-shard
    const char *speeds;              // --speeds
    layout_args_t lay;               // --pp, --tp, --plan, --ubatch, --keep-all, --mem-budget, --local-mem
    expert_args_t ex;                // --expert-cache, --expert-policy, --expert-prefetch, --expert-skip
    const char *lan;                 // --lan MBIT:MS emulated links (fault-injecting transport)
    int parallel;                    // --parallel K: tg with K sequences in flight (cluster only)
    const char *faults;              // --faults SPEC (with --lan: its links are added)
    const char *kv_device;           // --kv-device (NULL = host)
    bool kv_q8;                      // --kv-type q8_0 (changes outputs)
} bench_args_t;

// The memory of one (model, threads) configuration's processes, for the table after the speed table.
typedef struct {
    char label[64];                  // the model column of the speed table
    int threads;                     // its threads column
    mem_report_t r;
} bench_mem_t;

typedef struct {
    double avg, sd;                  // tokens/s
    double samples[MAX_REPS];        // tokens/s per repetition
    int n;
} bench_stat_t;

static void bench_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm bench -m FILE [-m FILE ...] [options]\n"
            "  -t, --threads N[,N...]  thread counts to test (default: all cores)\n"
            "  -p, --n-prompt N        prompt tokens for the pp test (default 64; 0 skips)\n"
            "  -n, --n-gen N           generated tokens for the tg test (default 32; 0 skips)\n"
            "  -r, --repetitions N     repetitions per test (default 3)\n"
            "      --no-repack         compute on the file's layout\n"
            "      --local N           run on N local worker processes (threads: -t per process)\n"
            "      --local-tcp         local workers over loopback TCP instead of ipc\n"
            "      --workers LIST      run on remote workers (tcp://HOST:PORT,...)\n"
            "      --coordinator-shard the coordinator computes a share too\n"
            "      --speeds LIST       relative speeds of the computing nodes\n"
            "      --lan MBIT:MS       emulate every link at MBIT Mbit/s and MS ms one way (sets MESHLM_FAULTS\n"
            "                          for the coordinator and the local workers), e.g. 1000:1 or 300:5\n"
            "      --parallel K        tg with K sequences in flight at once (a cluster's stages then work\n"
            "                          on different sequences); t/s counts every sequence's tokens\n"
            "      --json              print a JSON array instead of the table\n"
            "      --kv-type f16|q8_0  KV cache type (q8_0: blocks of 32, 0.53x f16's memory, CHANGES OUTPUTS)\n"
            KV_DEVICE_USAGE
            LAYOUT_MEM_USAGE
            EXPERT_ARGS_USAGE
            LAYOUT_FAULT_USAGE
            FAULT_ARGS_USAGE
            LAYOUT_ARGS_USAGE
            "after the speed table, a memory table gives every process's peak resident set (VmHWM) and the\n"
            "peak of each local worker's memory cgroup (in --json: \"memory\" in each result)\n");
}

static int parse_list(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static void stat_finish(bench_stat_t *s) {
    double sum = 0, sq = 0;
    for (int i = 0; i < s->n; i++) sum += s->samples[i];
    s->avg = s->n ? sum / s->n : 0;
    for (int i = 0; i < s->n; i++) sq += (s->samples[i] - s->avg) * (s->samples[i] - s->avg);
    s->sd = s->n > 1 ? sqrt(sq / (s->n - 1)) : 0;
}

// One pp or tg measurement series on an engine (a local context or a cluster).
static int run_test(const gen_engine_t *eng, bool prompt, int n, int reps, bench_stat_t *st) {
    int32_t *toks = malloc((size_t)n * sizeof *toks);
    float *logits = malloc((size_t)eng->n_vocab * sizeof *logits);
    if (!toks || !logits) {
        free(toks);
        free(logits);
        return MLM_ENOMEM;
    }
    uint64_t seed = 42;
    for (int i = 0; i < n; i++) toks[i] = (int32_t)(mlm_rng_next(&seed) % (uint64_t)eng->n_vocab);
    int rc = 0;
    st->n = 0;
    for (int r = -1; r < reps && rc == 0; r++) { // r == -1 is the warm-up
        eng->reset(eng->ctx);
        double t0 = mlm_now_ms();
        if (prompt) {
            rc = eng->eval(eng->ctx, toks, n, logits, false);
        } else {
            for (int i = 0; i < n && rc == 0; i++) rc = eng->eval(eng->ctx, &toks[i], 1, logits, false);
        }
        double ms = mlm_now_ms() - t0;
        if (r >= 0 && rc == 0) st->samples[st->n++] = n * 1000.0 / ms;
    }
    stat_finish(st);
    free(toks);
    free(logits);
    return rc;
}

// tg with par sequences in flight on a cluster: every step advances each sequence by one token
// (reported to the fault schedule fa).
static int run_test_par(cluster_t *cl, int n_vocab, int n, int reps, int par, fault_args_t *fa, bench_stat_t *st) {
    int32_t *toks = malloc((size_t)n * par * sizeof *toks);
    float *logits = malloc((size_t)par * n_vocab * sizeof *logits);
    int seqs[CLUSTER_MAX_SEQS];
    if (!toks || !logits) {
        free(toks);
        free(logits);
        return MLM_ENOMEM;
    }
    uint64_t seed = 42;
    for (int i = 0; i < n * par; i++) toks[i] = (int32_t)(mlm_rng_next(&seed) % (uint64_t)n_vocab);
    for (int k = 0; k < par; k++) seqs[k] = k;
    int rc = 0;
    st->n = 0;
    for (int r = -1; r < reps && rc == 0; r++) { // r == -1 is the warm-up
        cluster_reset(cl);
        double t0 = mlm_now_ms();
        for (int i = 0; i < n && rc == 0; i++) {
            fault_args_tokens(fa, par);
            rc = cluster_eval_seqs(cl, par, seqs, toks + (size_t)i * par, logits);
        }
        double ms = mlm_now_ms() - t0;
        if (r >= 0 && rc == 0) st->samples[st->n++] = (double)n * par * 1000.0 / ms;
    }
    stat_finish(st);
    free(toks);
    free(logits);
    return rc;
}

static void fmt_size(char *buf, size_t cap, double bytes) {
    if (bytes >= 1024.0 * 1024 * 1024) snprintf(buf, cap, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
    else snprintf(buf, cap, "%.2f MiB", bytes / (1024.0 * 1024));
}

static void fmt_params(char *buf, size_t cap, double n) {
    if (n >= 1e9) snprintf(buf, cap, "%.2f B", n / 1e9);
    else if (n >= 1e6) snprintf(buf, cap, "%.2f M", n / 1e6);
    else snprintf(buf, cap, "%.2f K", n / 1e3);
}

// Bytes of weights one decode step reads: every tensor but the embedding table, plus one of its rows.
static double bytes_per_token(const model_t *m) {
    const gguf_t *g = model_gguf(m);
    const model_hparams_t *hp = model_hparams(m);
    const gguf_tensor_t *emb = gguf_find_tensor(g, "token_embd.weight");
    double b = (double)hp->weight_bytes;
    if (emb && !hp->tied_output) b -= (double)emb->nbytes - (double)emb->nbytes / (double)hp->n_vocab;
    if (hp->n_expert > 0) {
        // Only the chosen experts are read: scale the expert tensors by used/total.
        double exp_bytes = 0;
        for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
            const gguf_tensor_t *t = gguf_tensor(g, i);
            if (strstr(t->name, "_exps.")) exp_bytes += (double)t->nbytes;
        }
        b -= exp_bytes * (1.0 - (double)hp->n_expert_used / hp->n_expert);
    }
    return b;
}

// After a failure: names the local workers that have died, and how (the OOM killer of their cgroup).
static void say_dead_workers(launch_t *lw) {
    char why[2048];
    if (lw && launch_check(lw, 500, why, sizeof why) > 0) fprintf(stderr, "meshlm bench: %s\n", why);
}

// --- public API

int cmd_bench(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"threads", required_argument, 0, 't'},
        {"n-prompt", required_argument, 0, 'p'}, {"n-gen", required_argument, 0, 'n'},
        {"repetitions", required_argument, 0, 'r'}, {"json", no_argument, 0, 'j'},
        {"no-repack", no_argument, 0, 'R'}, {"local", required_argument, 0, 'L'},
        {"local-tcp", no_argument, 0, 'P'}, {"workers", required_argument, 0, 'W'},
        {"coordinator-shard", no_argument, 0, 'S'}, {"speeds", required_argument, 0, 'V'},
        {"lan", required_argument, 0, 'E'}, {"parallel", required_argument, 0, 'K'},
        {"kv-device", required_argument, 0, O_KVDEV}, {"kv-type", required_argument, 0, O_KVTYPE},
        LAYOUT_ARGS_LONGOPTS, LAYOUT_MEM_LONGOPTS, LAYOUT_FAULT_LONGOPTS,
        FAULT_ARGS_LONGOPTS, EXPERT_ARGS_LONGOPTS, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    bench_args_t a = {.n_prompt = 64, .n_gen = 32, .reps = 3, .repack = true};
    expert_args_init(&a.ex);
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "m:t:p:n:r:h", opts, NULL)) != -1) {
        int lr = layout_args_option(&a.lay, ch, optarg, "bench");
        if (lr == 0) lr = expert_args_option(&a.ex, ch, optarg, "bench");
        if (lr < 0) return 2;
        if (lr > 0) continue;
        switch (ch) {
        case 'm':
            if (a.n_models == MAX_MODELS) {
                fprintf(stderr, "meshlm bench: at most %d models\n", MAX_MODELS);
                return 2;
            }
            a.models[a.n_models++] = optarg;
            break;
        case 't':
            if ((a.n_threads = parse_list(optarg, a.threads, 8)) <= 0) {
                fprintf(stderr, "meshlm bench: bad thread list '%s'\n", optarg);
                return 2;
            }
            break;
        case 'p': a.n_prompt = atoi(optarg); break;
        case 'n': a.n_gen = atoi(optarg); break;
        case 'r': a.reps = atoi(optarg); break;
        case 'j': a.json = true; break;
        case 'R': a.repack = false; break;
        case 'L': a.local = atoi(optarg); break;
        case 'P': a.local_tcp = true; break;
        case 'W': free(a.workers); a.workers = strdup(optarg); break;
        case 'S': a.coord_shard = true; break;
        case 'V': a.speeds = optarg; break;
        case 'E': a.lan = optarg; break;
        case 'K': a.parallel = atoi(optarg); break;
        case FA_FAULTS: a.faults = optarg; break;
        case O_KVDEV: a.kv_device = optarg; break;
        case O_KVTYPE:
            if (strcmp(optarg, "f16") && strcasecmp(optarg, "q8_0")) {
                fprintf(stderr, "meshlm bench: --kv-type must be f16 or q8_0\n");
                return 2;
            }
            a.kv_q8 = !strcasecmp(optarg, "q8_0");
            break;
        case 'h': bench_usage(stdout); return 0;
        default: bench_usage(stderr); return 2;
        }
    }
    if (a.n_models == 0 || a.reps < 1 || a.reps > MAX_REPS || a.n_prompt < 0 || a.n_gen < 0 || optind < argc ||
        a.parallel < 0 || a.parallel > CLUSTER_MAX_SEQS) {
        bench_usage(stderr);
        return 2;
    }
    char kerr[256];
    if (attn_dev_known(a.kv_device, kerr, sizeof kerr) != 0) {
        fprintf(stderr, "meshlm bench: --kv-device: %s\n", kerr);
        free(a.workers);
        return 2;
    }
    if (a.lay.local_mem_set && a.local == 0) {
        fprintf(stderr, "meshlm bench: --local-mem limits the workers started with --local N, and there are none\n");
        free(a.workers);
        return 2;
    }
    if (a.n_threads == 0) {
        a.threads[0] = 0;
        a.n_threads = 1;
    }
    if (a.lan) { // every process of the run (local workers inherit it) emulates the links
        double mbit = 0, ms = -1;
        if (sscanf(a.lan, "%lf:%lf", &mbit, &ms) != 2 || !(mbit > 0) || !(ms >= 0)) {
            fprintf(stderr, "meshlm bench: --lan wants MBIT:MS, e.g. 1000:1, not '%s'\n", a.lan);
            return 2;
        }
        char spec[128];
        snprintf(spec, sizeof spec, "delay:link=*:ms=%g,bw:link=*:mbit=%g", ms, mbit);
        setenv("MESHLM_FAULTS", spec, 1);
    }
    const bool dist = a.local > 0 || a.workers;
    char *faults = NULL; // --faults, with --lan's links first
    if (a.faults && !dist) {
        fprintf(stderr, "meshlm bench: --faults needs workers (--local N or --workers LIST)\n");
        free(a.workers);
        return 2;
    }
    if (a.faults && a.lan && asprintf(&faults, "%s,%s", getenv("MESHLM_FAULTS"), a.faults) < 0) faults = NULL;
    else if (a.faults) faults = strdup(a.faults);
    cJSON *jarr = a.json ? cJSON_CreateArray() : NULL;
    if (!a.json) {
        printf("| %-24s | %10s | %8s | %-14s | %7s | %6s | %16s | %12s |%s\n", "model", "size", "params", "backend",
               "threads", "test", "t/s", "weights GB/s",
               dist ? " layout | predicted t/s | TTFT ms | util | comm ms/tok | KiB/tok |" : "");
        printf("| %.24s | %.10s | %.8s | %.14s | %.7s | %.6s | %.16s | %.12s |%s\n", "------------------------------",
               "------------", "----------", "----------------", "---------", "--------", "------------------",
               "------------", dist ? " ------ | ------------- | ------- | ---- | ----------- | ------- |" : "");
    }
    int code = 0;
    bench_mem_t *mems[MAX_MODELS * 8] = {0}; // (n_mems) one per configuration that ran
    int n_mems = 0;
    bool said_cg_note = false; // the "no memory cgroups" line is printed once
    for (int mi = 0; mi < a.n_models; mi++) {
        char err[1024] = "";
        model_t *m = NULL;
        mem_report_reset_self(); // this process's peak from here on is this model's
        // a.lay.mem_budget is this process's own budget too: alone, a model that does not fit it streams
        // through the weight window (its KV cache sized for the longest test); in a cluster, the
        // coordinator's own share (--coordinator-shard) does.
        const int need_ctx = (a.n_prompt > a.n_gen ? a.n_prompt : a.n_gen) + 8;
        const bool pages = attn_dev_pages(a.kv_device) && a.lay.mem_budget; // the KV spills past its share
        char wname[96]; // the expert cache's provider name
        model_load_opts_t lo = {.repack = a.repack && !dist, .mem_budget = dist ? 0 : a.lay.mem_budget,
                                .n_ctx = pages ? 1 : need_ctx, .expert_skip = a.ex.skip,
                                .weights = dist ? NULL : expert_args_provider(&a.ex, wname, sizeof wname)};
        if (model_load(&m, a.models[mi], &lo, err, sizeof err) != 0) {
            fprintf(stderr, "meshlm bench: %s\n", err);
            code = 1;
            continue;
        }
        const model_hparams_t *hp = model_hparams(m);
        char name[64], size[32], params[32];
        const double np = (double)hp->n_params;
        char sz[16];
        if (np >= 1e9) snprintf(sz, sizeof sz, "%.0fB", np / 1e9);
        else snprintf(sz, sizeof sz, "%.0fM", np / 1e6);
        snprintf(name, sizeof name, "%s %s%s %s", hp->arch, hp->n_expert ? "MoE " : "", sz, model_type_name(m));
        fmt_size(size, sizeof size, (double)hp->weight_bytes);
        fmt_params(params, sizeof params, (double)hp->n_params);
        const double bpt = bytes_per_token(m);
        for (int ti = 0; ti < a.n_threads; ti++) {
            model_ctx_t *c = NULL;
            cluster_t *cl = NULL;
            launch_t *lw = NULL;
            fault_args_t fa = {0};     // this configuration's fault schedule
            gen_engine_t eng;
            const int need = need_ctx;
            char backend[48];
            snprintf(backend, sizeof backend, "CPU %s %s", model_kernels(m)->isa, model_kernels(m)->tune.name);
            if (!dist) {
                model_ctx_opts_t co = {.n_ctx = need, .n_batch = a.n_prompt > 0 ? a.n_prompt : 64,
                                       .n_threads = a.threads[ti], .attn_dev = a.kv_device, .kv_q8 = a.kv_q8,
                                       .kv_ram = pages ? model_kv_ram_share(m, a.lay.mem_budget) : 0};
                if (model_ctx_new(&c, m, &co, err, sizeof err) != 0) {
                    fprintf(stderr, "meshlm bench: %s\n", err);
                    code = 1;
                    continue;
                }
                eng = gen_engine_model(c, hp->n_vocab);
            } else {
                const char *eps[LAUNCH_MAX];
                int nw = 0;
                uint8_t sha[32];       // the model's SHA-256 with --local (hashed once for every process)
                char sha_hex[65] = ""; // ... in hex, for the workers' command lines
                char *list = a.workers ? strdup(a.workers) : NULL;
                if (a.local > 0) {
                    // hashed once here for the coordinator and the workers
                    if (sha256_file(a.models[mi], sha, err, sizeof err) != 0) {
                        fprintf(stderr, "meshlm bench: %s\n", err);
                        free(list);
                        code = 1;
                        continue;
                    }
                    sha256_hex(sha, sha_hex);
                    lw = calloc(1, sizeof *lw);
                    launch_opts_t lo2 = {.model_path = a.models[mi], .n_threads = a.threads[ti], .tcp = a.local_tcp,
                                         .mem_budget = a.lay.mem_budget, .mem_limit = layout_args_local_mem(&a.lay),
                                         .extra_argv = a.ex.argv, .n_extra = a.ex.n_argv, .model_sha256 = sha_hex};
                    if (!lw || launch_local(lw, a.local, &lo2, err, sizeof err) != 0) {
                        fprintf(stderr, "meshlm bench: %s\n", err);
                        free(lw);
                        free(list);
                        code = 1;
                        continue;
                    }
                    if (lw->cg_note[0] && !said_cg_note) fprintf(stderr, "meshlm: %s\n", lw->cg_note);
                    said_cg_note |= lw->cg_note[0] != 0;
                    for (int i = 0; i < lw->n; i++) eps[i] = lw->endpoint[i];
                    nw = lw->n;
                } else {
                    for (char *t = strtok(list, ","); t && nw < LAUNCH_MAX; t = strtok(NULL, ",")) eps[nw++] = t;
                }
                if (fault_args_setup(&fa, faults, lw, nw, true, "bench") != 0) { // $MESHLM_FAULTS for the cluster
                    if (lw) launch_reap(lw, 3000);
                    free(lw);
                    free(list);
                    code = 1;
                    continue;
                }
                cluster_opts_t co = {.model_path = a.models[mi], .model_sha256 = lw ? sha : NULL, .workers = eps,
                                     .n_workers = nw, .speeds = a.speeds,
                                     .coordinator_shard = a.coord_shard, .n_ctx = need, .n_threads = a.threads[ti],
                                     .mem_budget = a.lay.mem_budget,
                                     .weights = expert_args_provider(&a.ex, wname, sizeof wname),
                                     .expert_skip = a.ex.skip,
                                     .pp = a.lay.pp, .tp = a.lay.tp, .ep = a.lay.ep, .ep_replicated = a.lay.ep_replicated, .ep_replicas = a.lay.ep_replicas, .ep_hot_file = a.lay.ep_hot_file, .ep_hot = a.lay.ep_hot, .expert_cache = expert_args_plan(&a.ex), .keep_all = a.lay.keep_all,
                                     .plan_file = a.lay.plan_file, .ubatch = a.lay.ubatch,
                                     .local_profile = a.local > 0, .recover = !a.lay.no_recover,
                                     .heartbeat_ms = a.lay.heartbeat_ms, .n_standby = a.lay.n_standby,
                                     .tp_mode = a.lay.tp_mode, .tp_mode_set = a.lay.tp_mode_set,
                                     .drop_cache = lw && lw->mem_limit, .kv_device = a.kv_device,
                                     .kv_q8 = a.kv_q8};
                int rc = cluster_open(&cl, &co, err, sizeof err);
                free(list);
                if (rc != 0) {
                    fprintf(stderr, "meshlm bench: cluster: %s\n", err);
                    fault_args_free(&fa);
                    say_dead_workers(lw);
                    if (lw) launch_reap(lw, 3000);
                    free(lw);
                    code = 1;
                    continue;
                }
                eng = gen_engine_cluster(cl, hp->n_vocab);
                if (fa.spec) eng = fault_args_engine(&fa, &eng, false); // tg tokens go to the schedule
                char line[512];
                if (plan_left_out(cluster_plan(cl), a.coord_shard ? 1 : 0, "workers", line, sizeof line) > 0)
                    fprintf(stderr, "meshlm: %s\n", line);
                snprintf(backend, sizeof backend, "%d x %s", cluster_plan(cl)->n, a.local_tcp || a.workers ? "tcp" : "ipc");
            }
            int nthr = a.threads[ti] ? a.threads[ti] : (int)sysconf(_SC_NPROCESSORS_ONLN);
            const int first_item = jarr ? cJSON_GetArraySize(jarr) : 0; // this configuration's results
            if (fault_args_start(&fa, "bench") != 0) code = 1;
            for (int test = 0; test < 2; test++) {
                bool pp = test == 0;
                int n = pp ? a.n_prompt : a.n_gen;
                if (n == 0) continue;
                bench_stat_t st;
                if (cl) cluster_stats_reset(cl);
                const int par = cl && !pp && a.parallel > 1 ? a.parallel : 1;
                fa.first_is_prompt = pp; // a pp eval is a prompt, not generated tokens
                const bool experts = !dist && !strcmp(weights_name(model_weights(m)), "experts");
                weights_stats_t ws0, ws1, wd;
                weights_stats(model_weights(m), &ws0);
                int rc = par > 1 ? run_test_par(cl, hp->n_vocab, n, a.reps, par, &fa, &st) : run_test(&eng, pp, n, a.reps, &st);
                if (rc != 0) {
                    fprintf(stderr, "meshlm bench: %s failed: %s%s%s\n", a.models[mi], mlm_strerror(rc),
                            cl ? ": " : "", cl ? cluster_error(cl) : "");
                    say_dead_workers(lw);
                    code = 1;
                    continue;
                }
                double comm_ms = 0, kib = 0, util = 0, pred = 0;
                cluster_node_time_t nt[MSG_MAX_NODES]; // where each computing node's time went
                int n_nt = 0;
                double ntok = 0;                        // tokens the cluster carried in this test
                if (cl) {
                    cluster_sync_stats(cl, 5000);
                    n_nt = cluster_node_times(cl, nt, MSG_MAX_NODES);
                    const cluster_stats_t *cs = cluster_stats(cl);
                    ntok = (double)cs->tokens;
                    comm_ms = cs->tokens ? cs->gather_ms / (double)cs->tokens : 0;
                    kib = cs->tokens ? (double)cs->gather_bytes / (double)cs->tokens / 1024.0 : 0;
                    util = cs->step_ms > 0 && cs->n_compute ? cs->busy_ms / (cs->n_compute * cs->step_ms) : 0;
                    const plan_cost_t *pc = &cluster_plan(cl)->cost;
                    pred = pp ? pc->prefill_tok_s : (pc->token_ms > 0 ? 1000.0 / pc->token_ms : 0);
                }
                const double ttft = pp && st.avg > 0 ? n * 1000.0 / st.avg : 0;
                weights_stats(model_weights(m), &ws1);
                wd = ws1; // this test's counters (its warm-up included: reps + 1 runs)
                wd.expert_hits -= ws0.expert_hits;
                wd.expert_misses -= ws0.expert_misses;
                wd.prefetch_reads -= ws0.prefetch_reads;
                wd.prefetch_used -= ws0.prefetch_used;
                wd.bytes_read -= ws0.bytes_read;
                wd.stall_ms -= ws0.stall_ms;
                const int wtok = n * (a.reps + 1);
                if (experts && !a.json) {
                    char line[256];
                    expert_args_summary(&wd, wtok, line, sizeof line);
                    fprintf(stderr, "meshlm: %s %s: %s\n", name, pp ? "pp" : "tg", line);
                }
                char tname[16], ts[40], bw[16];
                if (par > 1) snprintf(tname, sizeof tname, "tg%dx%d", n, par);
                else snprintf(tname, sizeof tname, "%s%d", pp ? "pp" : "tg", n);
                snprintf(ts, sizeof ts, "%.2f ± %.2f", st.avg, st.sd);
                if (pp) snprintf(bw, sizeof bw, "-");
                else snprintf(bw, sizeof bw, "%.1f", bpt * st.avg / 1e9);
                if (a.json) {
                    cJSON *o = cJSON_CreateObject();
                    cJSON_AddStringToObject(o, "model", a.models[mi]);
                    cJSON_AddStringToObject(o, "model_type", name);
                    cJSON_AddNumberToObject(o, "model_size", (double)hp->weight_bytes);
                    cJSON_AddNumberToObject(o, "model_n_params", (double)hp->n_params);
                    cJSON_AddStringToObject(o, "backend", backend);
                    cJSON_AddNumberToObject(o, "n_threads", nthr);
                    cJSON_AddStringToObject(o, "test", tname);
                    cJSON_AddNumberToObject(o, "n_prompt", pp ? n : 0);
                    cJSON_AddNumberToObject(o, "n_gen", pp ? 0 : n);
                    cJSON_AddNumberToObject(o, "avg_ts", st.avg);
                    cJSON_AddNumberToObject(o, "stddev_ts", st.sd);
                    cJSON *sa = cJSON_AddArrayToObject(o, "samples_ts");
                    for (int i = 0; i < st.n; i++) cJSON_AddItemToArray(sa, cJSON_CreateNumber(st.samples[i]));
                    cJSON_AddNumberToObject(o, "weight_bytes_per_token", bpt);
                    if (!pp) cJSON_AddNumberToObject(o, "weights_gbps", bpt * st.avg / 1e9);
                    if (experts) {
                        const double uses = (double)(wd.expert_hits + wd.expert_misses);
                        cJSON_AddNumberToObject(o, "expert_hit_rate", uses > 0 ? (double)wd.expert_hits / uses : 0);
                        cJSON_AddNumberToObject(o, "expert_prefetch_accuracy",
                                                wd.prefetch_reads ? (double)wd.prefetch_used / (double)wd.prefetch_reads : 0);
                        cJSON_AddNumberToObject(o, "expert_stall_ms_per_token", wd.stall_ms / wtok);
                        cJSON_AddNumberToObject(o, "expert_bytes_read_per_token", (double)wd.bytes_read / wtok);
                    }
                    if (cl) {
                        cJSON_AddNumberToObject(o, "nodes", cluster_plan(cl)->n);
                        cJSON_AddStringToObject(o, "layout", cluster_plan(cl)->layout);
                        cJSON_AddStringToObject(o, "tp_mode", plan_tp_mode_name(cluster_plan(cl)->tp_mode));
                        cJSON_AddNumberToObject(o, "predicted_ts", pred);
                        if (pp) cJSON_AddNumberToObject(o, "ttft_ms", ttft);
                        cJSON_AddNumberToObject(o, "utilisation", util);
                        cJSON_AddNumberToObject(o, "comm_ms_per_token", comm_ms);
                        cJSON_AddNumberToObject(o, "comm_bytes_per_token", kib * 1024.0);
                        cJSON_AddItemToObject(o, "recoveries", cluster_recoveries_json(cl));
                        cJSON *na = cJSON_AddArrayToObject(o, "node_times");
                        for (int k = 0; k < n_nt && ntok > 0; k++) {
                            cJSON *t = cJSON_CreateObject();
                            cJSON_AddStringToObject(t, "node", nt[k].node);
                            cJSON_AddNumberToObject(t, "rank", nt[k].rank);
                            cJSON_AddNumberToObject(t, "compute_ms_per_token", nt[k].compute_ms / ntok);
                            cJSON_AddNumberToObject(t, "exchange_ms_per_token", nt[k].comm_ms / ntok);
                            cJSON_AddNumberToObject(t, "shm_collectives_per_token", (double)nt[k].shm_collectives / ntok);
                            if (!pp) {
                                const double wait = nt[k].comm_ms / ntok - nt[k].transfer_ms;
                                cJSON_AddNumberToObject(t, "transfer_ms_per_token", nt[k].transfer_ms);
                                cJSON_AddNumberToObject(t, "wait_ms_per_token", wait > 0 ? wait : 0);
                            }
                            cJSON_AddItemToArray(na, t);
                        }
                    }
                    cJSON_AddItemToArray(jarr, o);
                } else {
                    char extra[160] = "", tt[16] = "-";
                    if (pp) snprintf(tt, sizeof tt, "%.1f", ttft);
                    char lay[64] = ""; // all-reduce groups say so after the layout
                    if (cl)
                        snprintf(lay, sizeof lay, "%s%s", cluster_plan(cl)->layout,
                                 cluster_plan(cl)->tp_mode == PLAN_TP_ALLREDUCE ? " ar" : "");
                    if (cl)
                        snprintf(extra, sizeof extra, " %6s | %13.1f | %7s | %4.2f | %11.3f | %7.1f |", lay, pred, tt,
                                 util, comm_ms, kib);
                    printf("| %-24s | %10s | %8s | %-14s | %7d | %6s | %16s | %12s |%s\n", name, size, params, backend,
                           nthr, tname, ts, bw, extra);
                    fflush(stdout);
                    // where each node's time per token went: computing, in exchanges (the plan's figure for
                    // the transfer at the measured links, and the rest: waiting for peers or the stage before)
                    char where[1024];
                    int at = 0;
                    for (int k = 0; k < n_nt && ntok > 0 && at < (int)sizeof where - 1; k++) {
                        const double ex = nt[k].comm_ms / ntok, wait = ex - nt[k].transfer_ms;
                        if (nt[k].shm_collectives) // the plan's transfer figure is for the links, not shared memory
                            at += snprintf(where + at, sizeof where - (size_t)at,
                                           "%s%s compute %.1f, exchanges %.1f (%.0f per token in shared memory)",
                                           k ? "; " : "", nt[k].node, nt[k].compute_ms / ntok, ex,
                                           (double)nt[k].shm_collectives / ntok);
                        else if (pp)
                            at += snprintf(where + at, sizeof where - (size_t)at, "%s%s compute %.1f, exchanges %.1f",
                                           k ? "; " : "", nt[k].node, nt[k].compute_ms / ntok, ex);
                        else
                            at += snprintf(where + at, sizeof where - (size_t)at,
                                           "%s%s compute %.1f, exchanges %.1f (transfer %.1f, waiting %.1f)", k ? "; " : "",
                                           nt[k].node, nt[k].compute_ms / ntok, ex, nt[k].transfer_ms, wait > 0 ? wait : 0);
                    }
                    if (at > 0) fprintf(stderr, "meshlm: %s %s, ms per token: %s\n", name, tname, where);
                }
            }
            bench_mem_t *bm = n_mems < MAX_MODELS * 8 ? calloc(1, sizeof *bm) : NULL; // before the workers exit
            if (bm) {
                snprintf(bm->label, sizeof bm->label, "%s", name);
                bm->threads = nthr;
                const char *remote[LAUNCH_MAX];
                int n_remote = 0;
                char *list = a.workers && !lw ? strdup(a.workers) : NULL;
                for (char *t = list ? strtok(list, ",") : NULL; t && n_remote < LAUNCH_MAX; t = strtok(NULL, ","))
                    remote[n_remote++] = t;
                mem_report_collect(&bm->r, lw, remote, n_remote);
                free(list);
                for (int i = first_item; jarr && i < cJSON_GetArraySize(jarr); i++) {
                    cJSON_AddItemToObject(cJSON_GetArrayItem(jarr, i), "memory", mem_report_json(&bm->r));
                    if (fa.sched) cJSON_AddItemToObject(cJSON_GetArrayItem(jarr, i), "faults", faultsched_log_json(fa.sched));
                }
                mems[n_mems++] = bm;
            }
            char streamed[256];
            if (!dist && weights_read_summary(model_weights(m), streamed, sizeof streamed) > 0) {
                char how[160];
                weights_describe(model_weights(m), how, sizeof how);
                fprintf(stderr, "meshlm: %s, %d threads: weights %s; streamed %s\n", name, nthr, how, streamed);
            }
            char kvline[512];
            if (c && a.kv_device && model_ctx_attn(c) && attn_dev_describe(model_ctx_attn(c), kvline, sizeof kvline) > 0) {
                fprintf(stderr, "meshlm: %s, %d threads: %s\n", name, nthr, kvline);
                attn_stats_t ks;
                attn_dev_stats(model_ctx_attn(c), &ks);
                for (int i = first_item; jarr && i < cJSON_GetArraySize(jarr); i++) {
                    cJSON *o = cJSON_AddObjectToObject(cJSON_GetArrayItem(jarr, i), "kv_device");
                    cJSON_AddStringToObject(o, "name", attn_dev_name(model_ctx_attn(c)));
                    cJSON_AddNumberToObject(o, "kv_bytes", (double)ks.kv_bytes);
                    cJSON_AddNumberToObject(o, "kv_bytes_ram", (double)ks.kv_bytes_ram);
                    cJSON_AddNumberToObject(o, "bytes_read", (double)ks.bytes_read);
                    cJSON_AddNumberToObject(o, "bytes_written", (double)ks.bytes_written);
                    cJSON_AddBoolToObject(o, "simulated", ks.sim_time_ms > 0);
                    cJSON_AddNumberToObject(o, "sim_time_ms", ks.sim_time_ms); // summed over every test and repetition
                    cJSON_AddNumberToObject(o, "sim_energy_mj", ks.sim_energy_mj);
                }
            }
            model_ctx_destroy(&c);
            fault_args_free(&fa); // no worker stays stopped
            cluster_close(&cl, lw != NULL);
            if (lw) {
                launch_reap(lw, 5000);
                free(lw);
            }
        }
        model_destroy(&m);
    }
    if (a.json) {
        char *s = cJSON_Print(jarr);
        if (s) printf("%s\n", s);
        free(s);
        cJSON_Delete(jarr);
    } else if (n_mems > 0) {
        printf("\n");
        for (int i = 0; i < n_mems; i++)
            mem_report_table(&mems[i]->r, mems[i]->label, mems[i]->threads, i == 0, stdout);
    }
    for (int i = 0; i < n_mems; i++) free(mems[i]);
    free(a.workers);
    free(faults);
    return code;
}
