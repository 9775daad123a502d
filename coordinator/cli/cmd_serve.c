// meshlm serve: an OpenAI-compatible HTTP API over this node or a cluster, with continuous batching.
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster/launch.h"
#include "coordinator/cli/cli.h"
#include "coordinator/cli/curve_args.h"
#include "coordinator/cli/mpi_ranks.h"
#include "coordinator/cli/reg_workers.h"
#include "coordinator/cli/layout_args.h"
#include "coordinator/runtime/cluster.h"
#include "coordinator/serve/http.h"
#include "coordinator/serve/sched.h"
#include "core/err.h"
#include "core/fs.h"
#include "worker/model/model.h"
#include "worker/node/node.h"
#include "worker/text/tokenizer.h"

// --- helpers

typedef struct {
    const char *model;        // -m FILE
    const char *host;         // --host (default 127.0.0.1)
    int port;                 // --port (default 8080; 0 = a free one, printed)
    int parallel;             // --parallel N sequences in flight
    int queue;                // --queue N waiting requests
    const char *api_key;      // --api-key KEY (or --api-key-file FILE)
    char *key_buf;            // the file's key (owned)
    const char *chat;         // --chat-template NAME
    const char *model_id;     // --model-id NAME
    int n_ctx, n_threads, n_batch;
    int local;                // --local N
    char *workers;            // --workers LIST (owned copy; also filled from --registry)
    const char *registry;     // --registry URL: the workers and standbys are found there
    bool mpi;                 // --mpi: the ranks of an mpirun job are the cluster (rank 0 serves)
    int timeout_ms;
    bool verbose;
    const char *port_file;    // --port-file FILE: the port written once listening (for scripts)
    layout_args_t lay;
    curve_args_t curve;       // --curve-key, --curve-peers (remote workers)
} serve_args_t;

static void serve_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm serve -m FILE [--local N | --workers LIST | --registry URL] [options]\n"
            "       mpirun -np N meshlm serve --mpi -m FILE [options]\n"
            "OpenAI-compatible HTTP API: POST /v1/completions, POST /v1/chat/completions (\"stream\": true for\n"
            "server-sent events), GET /v1/models, /health, /metrics (Prometheus text), / (status page).\n"
            "  -m, --model FILE        GGUF model\n"
            "      --host ADDR         IPv4 address to listen on (default 127.0.0.1)\n"
            "      --port P            TCP port (default 8080; 0 = any free port, printed on stderr)\n"
            "      --port-file FILE    write the port there once listening\n"
            "      --parallel N        sequences in flight, sharing the steps (default 4, at most %d)\n"
            "      --queue N           requests that may wait for a sequence; more get 429 (default 64)\n"
            "      --api-key KEY       requests to /v1/ and /metrics need 'Authorization: Bearer KEY'\n"
            "      --api-key-file FILE the key from a file (first line)\n"
            "      --chat-template T   llama-2, llama-3 or chatml (default: from the model's metadata)\n"
            "      --model-id NAME     the model's name in the API (default: the file name)\n"
            "  -c, --ctx-size N        positions per sequence (default: min(model's, 4096))\n"
            "  -t, --threads N         threads (default: all cores)\n"
            "  -b, --batch-size N      prompt tokens per sequence per step (default 64)\n"
            "cluster:\n"
            "      --local N           start N worker processes on this machine\n"
            "      --workers LIST      comma-separated worker endpoints (tcp://HOST:PORT or ipc:///PATH)\n"
            "      --registry URL      the workers and standbys of a node registry (redis://HOST:PORT); the plan\n"
            "                          is published there\n"
            "      --mpi               under mpirun: every rank computes a share, rank 0 serves HTTP (MPI is for\n"
            "                          trusted networks only: nothing on it is authenticated)\n"
            "      --timeout MS        deadline of each exchange (default 30000)\n"
            "      --verbose           cluster progress on stderr\n"
            LAYOUT_MEM_USAGE LAYOUT_FAULT_USAGE LAYOUT_ARGS_USAGE CURVE_ARGS_USAGE,
            SERVE_MAX_SEQS);
}

enum { O_HOST = 2000, O_PORT, O_PARALLEL, O_QUEUE, O_KEY, O_KEYFILE, O_CHAT, O_ID, O_LOCAL, O_WORKERS, O_TIMEOUT,
       O_VERBOSE, O_PORTFILE, O_REGISTRY, O_MPI };

static int int_arg(const char *s, const char *name, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "meshlm serve: %s wants an integer from %d to %d, not '%s'\n", name, lo, hi, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

// 0 ok, 1 bad usage, -1 --help printed.
static int parse_args(int argc, char **argv, serve_args_t *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"ctx-size", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 't'}, {"batch-size", required_argument, 0, 'b'},
        {"host", required_argument, 0, O_HOST}, {"port", required_argument, 0, O_PORT},
        {"parallel", required_argument, 0, O_PARALLEL}, {"queue", required_argument, 0, O_QUEUE},
        {"api-key", required_argument, 0, O_KEY}, {"api-key-file", required_argument, 0, O_KEYFILE},
        {"chat-template", required_argument, 0, O_CHAT}, {"model-id", required_argument, 0, O_ID},
        {"local", required_argument, 0, O_LOCAL}, {"workers", required_argument, 0, O_WORKERS},
        {"timeout", required_argument, 0, O_TIMEOUT}, {"verbose", no_argument, 0, O_VERBOSE},
        {"port-file", required_argument, 0, O_PORTFILE}, {"registry", required_argument, 0, O_REGISTRY},
        {"mpi", no_argument, 0, O_MPI}, {"help", no_argument, 0, 'h'},
        LAYOUT_ARGS_LONGOPTS, LAYOUT_MEM_LONGOPTS, LAYOUT_FAULT_LONGOPTS, CURVE_ARGS_LONGOPTS, {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    a->port = 8080;
    a->parallel = 4;
    a->queue = 64;
    optind = 1;
    int ch, bad = 0;
    while (!bad && (ch = getopt_long(argc, argv, "m:c:t:b:h", opts, NULL)) != -1) {
        int r = layout_args_option(&a->lay, ch, optarg, "serve");
        if (r == 0) r = curve_args_option(&a->curve, ch, optarg);
        if (r == 1) continue;
        if (r < 0) return 1;
        switch (ch) {
        case 'm': a->model = optarg; break;
        case 'c': bad = int_arg(optarg, "-c", 1, 1 << 24, &a->n_ctx); break;
        case 't': bad = int_arg(optarg, "-t", 1, 1024, &a->n_threads); break;
        case 'b': bad = int_arg(optarg, "-b", 1, 4096, &a->n_batch); break;
        case O_HOST: a->host = optarg; break;
        case O_PORT: bad = int_arg(optarg, "--port", 0, 65535, &a->port); break;
        case O_PARALLEL: bad = int_arg(optarg, "--parallel", 1, SERVE_MAX_SEQS, &a->parallel); break;
        case O_QUEUE: bad = int_arg(optarg, "--queue", 0, 100000, &a->queue); break;
        case O_KEY: a->api_key = optarg; break;
        case O_KEYFILE: {
            char err[256];
            free(a->key_buf);
            if (mlm_read_file(optarg, 4096, &a->key_buf, NULL, err, sizeof err) != 0) {
                fprintf(stderr, "meshlm serve: --api-key-file: %s\n", err);
                return 1;
            }
            a->key_buf[strcspn(a->key_buf, "\r\n")] = 0;
            if (!a->key_buf[0]) {
                fprintf(stderr, "meshlm serve: --api-key-file %s: the first line is empty\n", optarg);
                return 1;
            }
            a->api_key = a->key_buf;
            break;
        }
        case O_CHAT:
            if (chat_template_by_name(optarg) < 0) {
                fprintf(stderr, "meshlm serve: --chat-template wants llama-2, llama-3 or chatml, not '%s'\n", optarg);
                return 1;
            }
            a->chat = optarg;
            break;
        case O_ID: a->model_id = optarg; break;
        case O_LOCAL: bad = int_arg(optarg, "--local", 1, LAUNCH_MAX, &a->local); break;
        case O_WORKERS:
            free(a->workers);
            a->workers = strdup(optarg);
            break;
        case O_TIMEOUT: bad = int_arg(optarg, "--timeout", 1, 3600000, &a->timeout_ms); break;
        case O_VERBOSE: a->verbose = true; break;
        case O_PORTFILE: a->port_file = optarg; break;
        case O_REGISTRY: a->registry = optarg; break;
        case O_MPI: a->mpi = true; break;
        case 'h': serve_usage(stdout); return -1;
        default: serve_usage(stderr); return 1;
        }
    }
    if (bad) return 1;
    if (optind < argc) {
        fprintf(stderr, "meshlm serve: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (!a->model) {
        fprintf(stderr, "meshlm serve: -m FILE is required\n");
        return 1;
    }
    if ((a->local > 0) + (a->workers != NULL) + (a->registry != NULL) + a->mpi > 1) {
        fprintf(stderr, "meshlm serve: use one of --local N, --workers LIST, --registry URL and --mpi\n");
        return 1;
    }
    return 0;
}

static char *status_of(void *s) { return serve_status(s); }

static volatile sig_atomic_t g_stop; // set by SIGINT / SIGTERM (the one static a signal handler needs)

static void on_signal(int sig) { g_stop = sig; }

static int serve_main(serve_args_t *a) {
    char err[1024] = "";
    int code = 1;
    model_t *m = NULL;
    cluster_t *cl = NULL;
    launch_t *lw = NULL;
    tokenizer_t *tok = NULL;
    serve_engine_t eng = {0};
    serve_t *s = NULL;
    serve_http_t *h = NULL;
    const model_t *mm = NULL;
    const char *eps[LAUNCH_MAX];
    int n_workers = 0;
    registry_t *reg = NULL;
    comm_t *ctl = NULL, *data = NULL; // --mpi: the control and data communicators
    if (a->registry) {
        int n_standby = 0;
        if (reg_workers_find(a->registry, "serve", &a->workers, &n_standby, &reg) != 0) goto out;
        a->lay.n_standby += n_standby;
    }
    if (a->mpi && mpi_ranks_open(&ctl, &data, a->timeout_ms) != 0) goto out;
    if (ctl && comm_rank(ctl) > 0) { // a rank that computes its share for rank 0
        char id[32];
        snprintf(id, sizeof id, "rank-%d", comm_rank(ctl));
        node_opts_t no = {.model_path = a->model, .same_file = true, .data = data, .node_id = id,
                          .n_threads = a->n_threads, .timeout_ms = a->timeout_ms, .no_profile = true,
                          .mem_budget = a->lay.mem_budget, .exit_on_peer_loss = true};
        code = node_run(&no, &ctl, err, sizeof err) == 0 ? 0 : 1;
        if (code != 0) fprintf(stderr, "meshlm serve: rank %d: %s\n", comm_rank(ctl), err);
        goto out;
    }
    const bool distributed = a->local > 0 || a->workers || ctl;
    const curve_conf_t *curve = NULL;
    if (curve_args_load(&a->curve, "serve", &curve) != 0) goto out;
    if (curve && !a->workers) {
        fprintf(stderr, "meshlm serve: --curve-key is for remote workers (--workers or --registry)\n");
        goto out;
    }
    if (!distributed) {
        model_load_opts_t lo = {.repack = true, .mem_budget = a->lay.mem_budget, .n_ctx = a->n_ctx};
        if (model_load(&m, a->model, &lo, err, sizeof err) != 0) {
            fprintf(stderr, "meshlm serve: %s\n", err);
            goto out;
        }
        mm = m;
    } else {
        if (a->local > 0) {
            lw = calloc(1, sizeof *lw);
            launch_opts_t lo = {.model_path = a->model, .n_threads = a->n_threads, .verbose = a->verbose,
                                .mem_budget = a->lay.mem_budget, .mem_limit = layout_args_local_mem(&a->lay)};
            if (!lw || launch_local(lw, a->local, &lo, err, sizeof err) != 0) {
                fprintf(stderr, "meshlm serve: %s\n", err);
                goto out;
            }
            if (lw->cg_note[0]) fprintf(stderr, "meshlm: %s\n", lw->cg_note);
            for (int i = 0; i < lw->n; i++) eps[i] = lw->endpoint[i];
            n_workers = lw->n;
        } else if (a->workers) {
            for (char *t = strtok(a->workers, ","); t && n_workers < LAUNCH_MAX; t = strtok(NULL, ",")) eps[n_workers++] = t;
        }
        cluster_opts_t co = {.model_path = a->model, .workers = eps, .n_workers = n_workers, .n_ctx = a->n_ctx,
                             .n_threads = a->n_threads, .mem_budget = a->lay.mem_budget, .timeout_ms = a->timeout_ms,
                             .verbose = a->verbose, .pp = a->lay.pp, .tp = a->lay.tp, .keep_all = a->lay.keep_all,
                             .plan_file = a->lay.plan_file, .ubatch = a->lay.ubatch, .local_profile = a->local > 0,
                             .recover = !a->lay.no_recover, .heartbeat_ms = a->lay.heartbeat_ms,
                             .n_standby = a->lay.n_standby, .tp_mode = a->lay.tp_mode,
                             .tp_mode_set = a->lay.tp_mode_set, .drop_cache = lw && lw->mem_limit,
                             .ep = a->lay.ep, .ep_replicated = a->lay.ep_replicated, .ep_replicas = a->lay.ep_replicas, .ep_hot_file = a->lay.ep_hot_file, .ep_hot = a->lay.ep_hot,
                             .curve = curve, .on_plan = reg ? reg_workers_publish_plan : NULL, .on_plan_arg = reg};
        if (ctl) { // every rank computes; rank 0 leads the first stage (one tensor-parallel group by default)
            co.workers = NULL;
            co.n_workers = 0;
            co.control = ctl;
            co.data = data;
            co.same_file = true;
            co.coordinator_shard = true;
            co.keep_all = true;
            co.pp = a->lay.pp ? a->lay.pp : (a->lay.tp ? 0 : 1);
        }
        if (cluster_open(&cl, &co, err, sizeof err) != 0) {
            fprintf(stderr, "meshlm serve: cluster: %s\n", err);
            goto out;
        }
        mm = cluster_model(cl);
        plan_print_brief(cluster_plan(cl), stderr);
    }
    if (tokenizer_from_gguf(&tok, model_gguf(mm), err, sizeof err) != 0) {
        fprintf(stderr, "meshlm serve: tokenizer: %s\n", err);
        goto out;
    }
    const model_hparams_t *hp = model_hparams(mm);
    const int n_ctx = a->n_ctx > 0 ? a->n_ctx : (hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    int rc;
    if (!distributed) {
        model_ctx_opts_t co = {.n_ctx = n_ctx, .n_batch = a->n_batch, .n_threads = a->n_threads};
        rc = serve_engine_local(&eng, m, &co, a->parallel, err, sizeof err);
    } else {
        rc = serve_engine_cluster(&eng, cl, n_ctx, a->n_batch, err, sizeof err);
    }
    serve_opts_t so = {.parallel = a->parallel, .queue_max = a->queue};
    if (rc != 0 || serve_new(&s, &eng, tok, &so, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm serve: %s\n", err);
        goto out;
    }
    const char *why = "--chat-template";
    const chat_template_t chat = a->chat ? (chat_template_t)chat_template_by_name(a->chat)
                                         : chat_template_detect(model_gguf(mm), tok, &why);
    char id[128];
    if (a->model_id) snprintf(id, sizeof id, "%s", a->model_id);
    else {
        const char *base = strrchr(a->model, '/');
        snprintf(id, sizeof id, "%s", base ? base + 1 : a->model);
    }
    serve_http_opts_t ho = {.host = a->host, .port = a->port, .api_key = a->api_key, .model_id = id, .n_ctx = n_ctx,
                            .add_bos = tokenizer_add_bos(tok), .chat = chat,
                            .status_json = status_of, .status_arg = s};
    if (serve_http_start(&h, s, tok, &ho, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm serve: %s\n", err);
        goto out;
    }
    const int port = serve_http_port(h);
    fprintf(stderr, "meshlm serve: %s on http://%s:%d/ (%d sequences in flight, queue %d, context %d, chat template "
            "%s from %s%s)\n", id, a->host ? a->host : "127.0.0.1", port, a->parallel, a->queue, n_ctx,
            chat_template_name(chat), why, a->api_key ? ", bearer key required" : "");
    if (a->port_file) {
        FILE *pf = fopen(a->port_file, "w");
        if (!pf || fprintf(pf, "%d\n", port) < 0 || fclose(pf) != 0) {
            fprintf(stderr, "meshlm serve: %s: cannot write the port: %s\n", a->port_file, strerror(errno));
            goto out;
        }
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    while (!g_stop) pause();
    fprintf(stderr, "meshlm serve: stopping (signal %d)\n", (int)g_stop);
    code = 0;
out:
    serve_http_stop(&h);     // no request thread left ...
    serve_destroy(&s);       // ... then the scheduler
    serve_engine_destroy(&eng);
    tokenizer_destroy(&tok);
    model_destroy(&m);
    cluster_close(&cl, lw != NULL || ctl);
    if (lw) {
        launch_reap(lw, 5000);
        free(lw);
    }
    registry_destroy(&reg);
    if (a->mpi) mpi_ranks_close(&ctl, &data, code);
    return code;
}

// --- public API

int cmd_serve(int argc, char **argv) {
    serve_args_t a;
    const int prc = parse_args(argc, argv, &a);
    const int code = prc != 0 ? (prc < 0 ? 0 : 2) : serve_main(&a);
    free(a.workers);
    free(a.key_buf);
    return code;
}
