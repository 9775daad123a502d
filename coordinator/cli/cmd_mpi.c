// meshlm mpi: generation over the ranks of an mpirun job. Rank 0 is the coordinator (it samples and prints,
// like `run`, and computes a share); every other rank runs the node executor. They exchange the same
// proto/ messages as ZeroMQ workers, on one MPI communicator for control and one for the data plane.
#include <errno.h>
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "coordinator/cli/gen_args.h"
#include "coordinator/cli/layout_args.h"
#include "coordinator/cli/mpi_ranks.h"
#include "coordinator/runtime/cluster.h"
#include "coordinator/runtime/generate.h"
#include "core/clock.h"
#include "core/err.h"
#include "parallel/plan.h"
#include "proto/msg_io.h"
#include "transport/comm_open.h"
#include "worker/format/hparams.h"
#include "worker/model/model.h"
#include "worker/node/node.h"
#include "worker/text/tokenizer.h"

// --- types

typedef struct {
    gen_args_t g;             // model, prompt, sampling, output (shared with run)
    const char *speeds;       // --speeds
    int timeout_ms;           // --timeout
    bool verbose;             // --verbose
    layout_args_t lay;        // --pp, --tp, --plan, --ubatch, --keep-all, --mem-budget
} mpi_args_t;

// --- helpers

// Rank 0, before a cluster exists or after it failed to come up: tells every other rank to stop
// (best effort), so none waits for this one until its deadline.
static void stop_all(comm_t *ctl) {
    for (int r = 1; r < comm_size(ctl); r++) {
        msg_t m;
        msg_init(&m, MSG_SHUTDOWN);
        snprintf(m.shutdown.reason, sizeof m.shutdown.reason, "exit");
        char err[128];
        msg_send(ctl, r, &m, 1000, err, sizeof err);
    }
}

static void mpi_usage(FILE *f) {
    fprintf(f,
            "usage: mpirun -np N meshlm mpi -m FILE -p TEXT [options]\n"
            "  every rank loads its tensor-parallel slice of FILE; rank 0 tokenizes, samples and prints\n"
            GEN_ARGS_USAGE
            "  (the model path must be the same on every rank)\n"
            "      --speeds LIST       relative speeds of the ranks, e.g. 2,1,1 (default equal)\n"
            "      --timeout MS        deadline of each message and collective (default 30000)\n"
            "      --verbose           plan and progress on stderr (rank 0)\n"
            "      --mem-budget SIZE   memory of every rank for weights + KV cache + activations (K, M, G, T:\n"
            "                          powers of 1024); a share that does not fit it streams its weights from\n"
            "                          the model file through a sliding window (default: no budget)\n"
            LAYOUT_ARGS_USAGE);
}

enum { O_SPEEDS = GA_NEXT, O_TIMEOUT, O_VERBOSE };

// 0 to go on, -1 after --help, 1 on a usage error.
static int parse_args(int argc, char **argv, mpi_args_t *a) {
    static const struct option opts[] = {GEN_ARGS_LONGOPTS,
                                         {"speeds", required_argument, 0, O_SPEEDS},
                                         {"timeout", required_argument, 0, O_TIMEOUT},
                                         {"verbose", no_argument, 0, O_VERBOSE},
                                         {"mem-budget", required_argument, 0, LA_MEM_BUDGET},
                                         LAYOUT_ARGS_LONGOPTS,
                                         {0, 0, 0, 0}};
    memset(a, 0, sizeof *a);
    gen_args_init(&a->g);
    a->timeout_ms = 30000;
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, GEN_ARGS_SHORTOPTS, opts, NULL)) != -1) {
        int r = gen_args_option(&a->g, ch, optarg, "mpi");
        if (r == 0) r = layout_args_option(&a->lay, ch, optarg, "mpi");
        if (r < 0) return 1;
        if (r > 0) continue;
        switch (ch) {
        case O_SPEEDS: a->speeds = optarg; break;
        case O_TIMEOUT: a->timeout_ms = atoi(optarg); break;
        case O_VERBOSE: a->verbose = true; break;
        case 'h': mpi_usage(stdout); return -1;
        default: mpi_usage(stderr); return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "meshlm mpi: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (gen_args_check(&a->g, "mpi") != 0) {
        mpi_usage(stderr);
        return 1;
    }
    if (a->timeout_ms <= 0) {
        fprintf(stderr, "meshlm mpi: --timeout must be positive\n");
        return 1;
    }
    return 0;
}

// Ranks > 0 run the node executor on the control comm (peer 0 is rank 0), over the data comm.
static int follow(comm_t **ctl, comm_t *data, mpi_args_t *a) {
    char id[32], err[1024] = "";
    snprintf(id, sizeof id, "rank-%d", comm_rank(*ctl));
    node_opts_t o = {.model_path = a->g.model, .same_file = true, .data = data, .node_id = id,
                     .n_threads = a->g.n_threads, .timeout_ms = a->timeout_ms, .no_profile = true,
                     .mem_budget = a->lay.mem_budget,
                     .exit_on_peer_loss = true, .verbose = a->verbose && getenv("MESHLM_MPI_TRACE")};
    int rc = node_run(&o, ctl, err, sizeof err);
    if (rc != 0) fprintf(stderr, "meshlm mpi: rank %d: %s\n", comm_rank(*ctl), err);
    return rc == 0 ? 0 : 1;
}

// Rank 0: tokenizes, then drives the other ranks as a cluster (the same hello / plan / load / step
// messages ZeroMQ workers get) with its own share as node 0, samples and prints.
static int lead(comm_t *ctl, comm_t *data, mpi_args_t *a) {
    const int N = comm_size(ctl);
    char err[1024] = "";
    gguf_t *g = NULL;
    tokenizer_t *tok = NULL;
    cluster_t *cl = NULL;
    int32_t *pt = NULL;
    FILE *lf = NULL;
    int np = 0, n_ctx = 0;
    int rc = gguf_open(&g, a->g.model, err, sizeof err);
    if (rc == 0 && (rc = tokenizer_from_gguf(&tok, g, err, sizeof err)) != 0)
        snprintf(err + strlen(err), sizeof err - strlen(err), " (tokenizer)");
    if (rc == 0) {
        size_t plen = strlen(a->g.prompt);
        int cap = (int)plen + 8;
        pt = malloc((size_t)cap * sizeof *pt);
        np = pt ? tokenizer_encode(tok, a->g.prompt, plen, !a->g.no_bos && tokenizer_add_bos(tok), false, pt, cap)
                : MLM_ENOMEM;
        if (np <= 0 || np > cap)
            rc = mlm_fail(err, sizeof err, np < 0 ? np : MLM_EINVAL, "cannot tokenize the prompt: %s",
                          np < 0 ? mlm_strerror(np) : "empty or too long");
    }
    if (rc == 0) {
        model_hparams_t hp;
        rc = hparams_read(g, &hp, err, sizeof err);
        n_ctx = a->g.n_ctx;
        if (rc == 0 && n_ctx == 0) {
            int need = np + a->g.n_predict + 1;
            int def = hp.n_ctx_train > 0 && hp.n_ctx_train < 4096 ? hp.n_ctx_train : 4096;
            n_ctx = need > def ? need : def;
        }
        if (rc == 0 && np + a->g.n_predict + 1 > n_ctx)
            rc = mlm_fail(err, sizeof err, MLM_ERANGE,
                          "prompt (%d tokens) + %d to generate exceed the context of %d positions (-c)", np,
                          a->g.n_predict, n_ctx);
    }
    if (rc == 0 && a->g.logits_path && !(lf = fopen(a->g.logits_path, "wb")))
        rc = mlm_fail(err, sizeof err, MLM_EIO, "cannot create %s: %s", a->g.logits_path, strerror(errno));
    // Every rank computes; rank 0 leads the first stage. Without --pp/--tp one tensor-parallel group.
    cluster_opts_t co = {.model_path = a->g.model, .control = ctl, .data = data, .same_file = true,
                         .speeds = a->speeds, .coordinator_shard = true, .n_ctx = n_ctx, .n_batch = a->g.n_batch,
                         .n_threads = a->g.n_threads, .timeout_ms = a->timeout_ms, .kv_f32 = a->g.kv_f32, .kv_q8 = a->g.kv_q8, .kv_device = a->g.kv_device,
                         .mem_budget = a->lay.mem_budget,
                         .verbose = a->verbose, .pp = a->lay.pp ? a->lay.pp : (a->lay.tp ? 0 : 1), .tp = a->lay.tp, .ep = a->lay.ep, .ep_replicated = a->lay.ep_replicated, .ep_replicas = a->lay.ep_replicas, .ep_hot_file = a->lay.ep_hot_file, .ep_hot = a->lay.ep_hot,
                         .keep_all = true, .plan_file = a->lay.plan_file, .ubatch = a->lay.ubatch,
                         .tp_mode = a->lay.tp_mode, .tp_mode_set = a->lay.tp_mode_set};
    if (rc == 0) rc = cluster_open(&cl, &co, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "meshlm mpi: rank 0: %s\n", err[0] ? err : mlm_strerror(rc));
        stop_all(ctl);
        goto out;
    }
    if (a->verbose) plan_print(cluster_plan(cl), g, stderr);
    gen_engine_t eng = gen_engine_cluster(cl, model_hparams(cluster_model(cl))->n_vocab);
    a->g.gen.n_predict = a->g.n_predict;
    a->g.gen.stream = a->g.json ? NULL : stdout;
    a->g.gen.logits_out = lf;
    gen_result_t res;
    rc = gen_run(&eng, tok, pt, np, &a->g.gen, &res, err, sizeof err);
    if (rc == 0 && lf) {
        int bad = fclose(lf) != 0;
        lf = NULL;
        if (bad) {
            rc = mlm_fail(err, sizeof err, MLM_EIO, "writing %s: %s", a->g.logits_path, strerror(errno));
            gen_result_free(&res);
        }
    }
    if (rc != 0) {
        fprintf(stderr, "\nmeshlm mpi: rank 0: %s%s%s\n", err, cluster_error(cl)[0] ? ": " : "", cluster_error(cl));
        cluster_close(&cl, true);
        goto out;
    }
    // Stop the other ranks before printing, so a rank that cannot be reached fails the run.
    cluster_close(&cl, true);
    if (a->g.json) {
        gen_print_json(pt, np, &res);
    } else {
        printf("\n");
    }
    fflush(stdout);
    fprintf(stderr,
            "meshlm: %d MPI rank(s); prompt %d tokens in %.1f ms (%.1f tokens/s); generation %d tokens in %.1f ms "
            "(%.1f tokens/s)\n",
            N, np, res.prompt_ms, res.prompt_ms > 0 ? np * 1000.0 / res.prompt_ms : 0.0, res.n_tokens, res.gen_ms,
            res.gen_ms > 0 ? res.n_gen_evals * 1000.0 / res.gen_ms : 0.0);
    gen_result_free(&res);
out:
    if (lf) fclose(lf);
    free(pt);
    tokenizer_destroy(&tok);
    gguf_close(&g);
    return rc == 0 ? 0 : 1;
}

// --- public API

int cmd_mpi(int argc, char **argv) {
    mpi_args_t a;
    int prc = parse_args(argc, argv, &a);
    if (prc != 0) {
        gen_args_free(&a.g);
        return prc < 0 ? 0 : 2;
    }
    comm_t *comm = NULL, *data = NULL; // control and data communicators
    if (mpi_ranks_open(&comm, &data, a.timeout_ms) != 0) {
        mpi_ranks_close(&comm, &data, 1);
        gen_args_free(&a.g);
        return 1;
    }
    const int code = comm_rank(comm) == 0 ? lead(comm, data, &a) : follow(&comm, data, &a);
    mpi_ranks_close(&comm, &data, code);
    gen_args_free(&a.g);
    return code;
}
