// meshlm chaos: a workload of R requests on N local workers, fault-free and under a fault schedule: speed, detection and recovery, lost and changed outputs, scaling, an SVG timeline.
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster/faultsched.h"
#include "cluster/launch.h"
#include "coordinator/cli/cli.h"
#include "coordinator/cli/fault_args.h"
#include "coordinator/cli/layout_args.h"
#include "coordinator/runtime/cluster.h"
#include "core/clock.h"
#include "core/err.h"
#include "worker/model/model.h"
#include "worker/text/tokenizer.h"

// --- types

#define MAX_REQUESTS 256
#define MAX_TOKENS 4096             // per request
#define MAX_RETRIES 6               // a request the cluster could not carry on is brought back this often
#define MAX_MARKS 256               // recoveries and re-plans drawn on the timeline
#define BIN_MS 250.0                // tokens/s of the timeline per bin
#define SCALE_MAX 4                 // --scale: N = 1..4
#define DETECT_TARGET_MS 1000.0     // issue 12's targets
#define RECOVER_TARGET_MS 2000.0

static const char *const PROMPTS[] = {
    "Once upon a time", "The little dog", "One day, a girl named Lily", "Tom and his friend",
    "In a big forest", "The sun was shining", "There was a small bird", "Mom said",
};
#define N_PROMPTS ((int)(sizeof PROMPTS / sizeof PROMPTS[0]))

typedef struct {
    const char *model;
    int local;                      // --local N
    int requests;                   // -R
    int n_gen;                      // -n
    const char *prompt;             // -p (NULL: the built-in prompts in turn)
    const char *faults;             // --faults (NULL: $MESHLM_FAULTS, else the default schedule)
    bool seed_set;                  // --seed
    uint64_t seed;
    const char *svg;                // --svg FILE
    bool json;
    bool scale;                     // --scale
    int threads;                    // -t per worker
    int timeout_ms;                 // --timeout
    bool local_tcp;
    bool verbose;
    layout_args_t lay;              // --pp, --tp, --plan, --ubatch, --heartbeat-ms, --standby, ...
} chaos_args_t;

// A span drawn on the timeline: a recovery (confirmation to the step done) or a re-plan that takes
// workers back.
typedef struct {
    bool recovery;                  // else a re-plan between requests
    double start_ms, end_ms;        // since the workload started
    cluster_recovery_t r;           // recovery: what the cluster reported
    int nodes;                      // computing nodes after it
} mark_t;

// One workload run on n_workers workers, with or without the schedule.
typedef struct {
    int n_workers;
    bool faulty;
    bool ran;                       // the cluster came up and the workload ran
    char error[512];                // why not
    char layout[48];                // the first plan's
    int nodes;                      // computing nodes of the first plan
    double ms;                      // wall time of the workload
    int64_t tokens;                 // generated tokens of completed requests
    int32_t *out;                   // (requests, n_gen) generated tokens, -1 where none
    uint64_t *hash;                 // (requests, n_gen) hash of the logits row each was sampled from
    bool *done;                     // (requests) the request completed
    int retries;                    // requests brought back after the cluster gave up on a step
    double *tok_t;                  // (requests * n_gen) when each generated token was sampled, ms
    int n_tok;
    mark_t marks[MAX_MARKS];
    int n_marks;
    faultsched_entry_t *events;     // (n_events) the scheduler's log (owned copy)
    int n_events;
    char spec[600];                 // the spec that ran (with its seed; the board left out)
} run_t;

// --- helpers: arguments

static void chaos_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm chaos -m FILE [--local N] [-R requests] [-n tokens] [--faults SPEC] [options]\n"
            "Runs R greedy requests of n tokens one after another on N local workers, first fault-free (the\n"
            "reference), then under the fault schedule, and reports tokens/s with and without the faults,\n"
            "every fault's detection and recovery time, requests lost and outputs differing from the\n"
            "reference (both must be 0: the exit code is 1 otherwise).\n"
            "  -m, --model FILE        GGUF model\n"
            "      --local N           local worker processes (default 3)\n"
            "  -R, --requests N        requests (default 4)\n"
            "  -n, --n-predict N       tokens generated per request (default 16)\n"
            "  -p, --prompt TEXT       every request's prompt (default: 8 short prompts in turn)\n"
            "  -t, --threads N         threads per worker (default 1)\n"
            "      --faults SPEC       the schedule (default $MESHLM_FAULTS; without either, with N >= 3:\n"
            "                          a kill, a freeze, a partition and 5%% drops on link 1-2)\n"
            "      --seed S            the schedule's seed (replaces its seed=)\n"
            "      --timeout MS        step and exchange deadline (default 2000: a dropped message costs this)\n"
            "      --svg FILE          write the timeline: tokens/s per 250 ms, faults and recoveries marked\n"
            "      --scale             add a table for N = 1..4, with and without the faults (the schedule's\n"
            "                          rules about workers beyond N left out)\n"
            "      --json              print one JSON object instead of the report\n"
            "      --local-tcp         workers on loopback TCP instead of ipc sockets\n"
            "      --verbose           cluster progress on stderr\n"
            "every worker stays in the plan (--keep-all); the heartbeat defaults to 500 ms here\n"
            LAYOUT_FAULT_USAGE
            LAYOUT_ARGS_USAGE);
}

enum { C_LOCAL = 1400, C_SEED, C_SVG, C_JSON, C_SCALE, C_TIMEOUT, C_TCP, C_VERBOSE };

// 0 to run, 1 usage error, -1 help printed.
static int parse_args(int argc, char **argv, chaos_args_t *a) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},     {"requests", required_argument, 0, 'R'},
        {"n-predict", required_argument, 0, 'n'}, {"prompt", required_argument, 0, 'p'},
        {"threads", required_argument, 0, 't'},   {"local", required_argument, 0, C_LOCAL},
        {"seed", required_argument, 0, C_SEED},   {"svg", required_argument, 0, C_SVG},
        {"json", no_argument, 0, C_JSON},         {"scale", no_argument, 0, C_SCALE},
        {"timeout", required_argument, 0, C_TIMEOUT}, {"local-tcp", no_argument, 0, C_TCP},
        {"verbose", no_argument, 0, C_VERBOSE},   {"help", no_argument, 0, 'h'},
        FAULT_ARGS_LONGOPTS, LAYOUT_ARGS_LONGOPTS, LAYOUT_FAULT_LONGOPTS, {0, 0, 0, 0}};
    *a = (chaos_args_t){.local = 3, .requests = 4, .n_gen = 16, .threads = 1, .timeout_ms = 2000};
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "m:R:n:p:t:h", opts, NULL)) != -1) {
        int lr = layout_args_option(&a->lay, ch, optarg, "chaos");
        if (lr < 0) return 1;
        if (lr > 0) continue;
        char *end = NULL;
        switch (ch) {
        case 'm': a->model = optarg; break;
        case 'R': a->requests = atoi(optarg); break;
        case 'n': a->n_gen = atoi(optarg); break;
        case 'p': a->prompt = optarg; break;
        case 't': a->threads = atoi(optarg); break;
        case C_LOCAL: a->local = atoi(optarg); break;
        case C_SEED:
            errno = 0;
            a->seed = strtoull(optarg, &end, 10);
            if (errno || !end || *end || optarg[0] == '-') {
                fprintf(stderr, "meshlm chaos: --seed wants an unsigned integer, not '%s'\n", optarg);
                return 1;
            }
            a->seed_set = true;
            break;
        case C_SVG: a->svg = optarg; break;
        case C_JSON: a->json = true; break;
        case C_SCALE: a->scale = true; break;
        case C_TIMEOUT: a->timeout_ms = atoi(optarg); break;
        case C_TCP: a->local_tcp = true; break;
        case C_VERBOSE: a->verbose = true; break;
        case FA_FAULTS: a->faults = optarg; break;
        case 'h': chaos_usage(stdout); return -1;
        default: chaos_usage(stderr); return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "meshlm chaos: unexpected argument '%s'\n", argv[optind]);
        return 1;
    }
    if (!a->model) {
        fprintf(stderr, "meshlm chaos: -m MODEL is required\n");
        return 1;
    }
    if (a->local < 1 || a->local > LAUNCH_MAX || a->requests < 1 || a->requests > MAX_REQUESTS || a->n_gen < 1 ||
        a->n_gen > MAX_TOKENS || a->threads < 0 || a->timeout_ms < 1) {
        fprintf(stderr, "meshlm chaos: --local 1..%d, -R 1..%d, -n 1..%d, -t >= 0 and --timeout > 0\n", LAUNCH_MAX,
                MAX_REQUESTS, MAX_TOKENS);
        return 1;
    }
    if (a->lay.heartbeat_ms == 0) a->lay.heartbeat_ms = 500;
    a->lay.keep_all = true;
    return 0;
}

// The schedule: --faults, else $MESHLM_FAULTS, else the (a kill, a freeze, a partition and
// 5% drops on the data link of workers 1 and 2 from the workload's start), spread over its tokens. NULL with a message
// when there is none or it does not parse.
static fault_spec_t *schedule_of(const chaos_args_t *a) {
    char err[512], text[512];
    fault_spec_t *s = NULL;
    int rc = 0;
    if (a->faults) {
        rc = fault_parse(a->faults, &s, err, sizeof err);
    } else if ((rc = fault_from_env(&s, err, sizeof err)) == 0 && !s) {
        if (a->local < 3) {
            fprintf(stderr, "meshlm chaos: no schedule (--faults SPEC or $MESHLM_FAULTS); the default needs --local 3 or more\n");
            return NULL;
        }
        const int total = a->requests * a->n_gen;
        snprintf(text, sizeof text,
                 "kill:worker=%d:after_tokens=%d,freeze:worker=%d:after_tokens=%d:ms=1200,"
                 "partition:link=0-1:after_tokens=%d:ms=1200,drop:link=1-2:p=0.05:at_ms=0,seed=1",
                 a->local, total / 8 > 0 ? total / 8 : 1, a->local - 1, (3 * total) / 8, (5 * total) / 8);
        rc = fault_parse(text, &s, err, sizeof err);
    }
    if (rc == 0 && s && a->seed_set) rc = fault_set_seed(s, a->seed) == 0 ? 0 : MLM_ENOMEM;
    if (rc != 0) {
        fprintf(stderr, "meshlm chaos: %s%s\n", a->faults ? "--faults: " : "", rc == MLM_ENOMEM ? "out of memory" : err);
        fault_free(&s);
    }
    return s;
}

// --- helpers: one run

// FNV-1a over a logits row: equal rows, equal hashes (the comparison is bit for bit).
static uint64_t row_hash(const float *row, int n) {
    const uint8_t *p = (const uint8_t *)row;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < (size_t)n * sizeof(float); i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static int32_t argmax(const float *row, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (row[i] > row[best]) best = i;
    return best;
}

static void run_free(run_t *r) {
    free(r->out);
    free(r->hash);
    free(r->done);
    free(r->tok_t);
    free(r->events);
    memset(r, 0, sizeof *r);
}

// Records the recoveries the cluster made since *seen, placed back to back so that the last ends at
// now_ms (a call that recovered twice did so one after the other).
static void take_recoveries(run_t *r, const cluster_t *cl, int *seen, double now_ms) {
    int n = 0;
    const cluster_recovery_t *rec = cluster_recoveries(cl, &n);
    double end[CLUSTER_MAX_RECOVERIES]; // (n) when each new one ended
    double t = now_ms;
    for (int k = n - 1; k >= *seen; k--) {
        end[k] = t;
        t -= rec[k].recover_ms;
    }
    for (int k = *seen; k < n && r->n_marks < MAX_MARKS; k++) {
        const double start = end[k] - rec[k].recover_ms;
        r->marks[r->n_marks++] = (mark_t){.recovery = true, .start_ms = start > 0 ? start : 0, .end_ms = end[k],
                                          .r = rec[k], .nodes = rec[k].nodes_after};
    }
    *seen = n;
}

// Re-plans over the workers that answer (lost ones that came back are taken in) and, when pt is
// given, replays a request so far: its prompt and its n generated tokens. 0 or the failure.
static int replan(cluster_t *cl, const int32_t *pt, int np, const int32_t *gen, int n, float *logits, char *err,
                  size_t errlen) {
    int rc = cluster_make_plan(cl, err, errlen);
    if (rc == 0) rc = cluster_load(cl, err, errlen);
    if (rc != 0 || !pt) return rc;
    cluster_reset(cl);
    rc = cluster_eval(cl, pt, np, logits, false);
    for (int i = 0; rc == 0 && i < n; i++) rc = cluster_eval(cl, &gen[i], 1, logits, false);
    if (rc != 0) snprintf(err, errlen, "%s", cluster_error(cl));
    return rc;
}

// Runs the workload on n_workers fresh local workers, under spec when it is not NULL.
static void run_workload(const chaos_args_t *a, const fault_spec_t *spec, int n_workers, run_t *r) {
    memset(r, 0, sizeof *r);
    r->n_workers = n_workers;
    r->faulty = spec != NULL;
    const int R = a->requests, N = a->n_gen;
    r->out = malloc((size_t)R * N * sizeof *r->out);
    r->hash = calloc((size_t)R * N, sizeof *r->hash);
    r->done = calloc((size_t)R, sizeof *r->done);
    r->tok_t = calloc((size_t)R * N, sizeof *r->tok_t);
    if (!r->out || !r->hash || !r->done || !r->tok_t) {
        snprintf(r->error, sizeof r->error, "out of memory");
        return;
    }
    for (int i = 0; i < R * N; i++) r->out[i] = -1;
    char err[1024] = "";
    launch_t *lw = calloc(1, sizeof *lw);
    launch_opts_t lo = {.model_path = a->model, .n_threads = a->threads, .tcp = a->local_tcp, .verbose = a->verbose,
                        .timeout_ms = a->timeout_ms}; // a worker waits no longer than the coordinator
    fault_args_t fa = {0};
    cluster_t *cl = NULL;
    tokenizer_t *tok = NULL;
    float *logits = NULL;
    int32_t *pt = NULL;
    if (!lw || launch_local(lw, n_workers, &lo, err, sizeof err) != 0) {
        snprintf(r->error, sizeof r->error, "%.480s", lw ? err : "out of memory");
        free(lw);
        return;
    }
    // The schedule: its spec (with the board) in $MESHLM_FAULTS for the cluster, or no spec at all.
    char *saved = getenv("MESHLM_FAULTS") ? strdup(getenv("MESHLM_FAULTS")) : NULL;
    unsetenv("MESHLM_FAULTS");
    fault_spec_t *use = NULL;
    if (spec && fault_restrict(spec, n_workers, &use, err, sizeof err) != 0) {
        snprintf(r->error, sizeof r->error, "%.480s", err);
        goto out;
    }
    if (use) {
        snprintf(r->spec, sizeof r->spec, "%s", fault_spec_text(use));
        if (fault_args_setup(&fa, fault_spec_text(use), lw, n_workers, a->verbose, "chaos") != 0) {
            snprintf(r->error, sizeof r->error, "the schedule cannot run on %d workers", n_workers);
            goto out;
        }
    }
    const char *eps[LAUNCH_MAX];
    for (int i = 0; i < lw->n; i++) eps[i] = lw->endpoint[i];
    const int max_prompt = 64;
    cluster_opts_t co = {.model_path = a->model, .workers = eps, .n_workers = lw->n, .n_ctx = max_prompt + N + 8,
                         .n_threads = a->threads, .timeout_ms = a->timeout_ms, .verbose = a->verbose, .pp = a->lay.pp,
                         .tp = a->lay.tp, .ep = a->lay.ep, .ep_replicated = a->lay.ep_replicated, .ep_replicas = a->lay.ep_replicas, .ep_hot_file = a->lay.ep_hot_file, .ep_hot = a->lay.ep_hot, .keep_all = true, .plan_file = a->lay.plan_file, .ubatch = a->lay.ubatch,
                         .local_profile = true, .recover = !a->lay.no_recover, .heartbeat_ms = a->lay.heartbeat_ms,
                         .n_standby = a->lay.n_standby};
    if (cluster_open(&cl, &co, err, sizeof err) != 0) {
        snprintf(r->error, sizeof r->error, "cluster: %.480s", err);
        goto out;
    }
    snprintf(r->layout, sizeof r->layout, "%s", cluster_plan(cl)->layout);
    r->nodes = cluster_plan(cl)->n;
    const model_t *mm = cluster_model(cl);
    const int nv = model_hparams(mm)->n_vocab;
    logits = malloc((size_t)nv * sizeof *logits);
    pt = malloc((size_t)max_prompt * sizeof *pt);
    if (!logits || !pt || tokenizer_from_gguf(&tok, model_gguf(mm), err, sizeof err) != 0) {
        snprintf(r->error, sizeof r->error, "tokenizer: %.480s", logits && pt ? err : "out of memory");
        goto out;
    }
    if (fault_args_start(&fa, "chaos") != 0) goto out;
    r->ran = true;
    const double t0 = mlm_now_ms();
    int seen = 0, ended = 0;
    for (int q = 0; q < R; q++) {
        // Lost workers may be back (a freeze or a partition ended): take them in between requests.
        if (fa.sched && faultsched_ended(fa.sched) > ended) {
            ended = faultsched_ended(fa.sched);
            if (cluster_plan(cl)->n < r->nodes && r->n_marks < MAX_MARKS) {
                const double s0 = mlm_now_ms() - t0;
                const int prc = replan(cl, NULL, 0, NULL, 0, NULL, err, sizeof err);
                take_recoveries(r, cl, &seen, mlm_now_ms() - t0);
                if (prc == 0 && r->n_marks < MAX_MARKS)
                    r->marks[r->n_marks++] = (mark_t){.start_ms = s0, .end_ms = mlm_now_ms() - t0, .nodes = cluster_plan(cl)->n};
            }
        }
        const char *text = a->prompt ? a->prompt : PROMPTS[q % N_PROMPTS];
        const int np = tokenizer_encode(tok, text, strlen(text), tokenizer_add_bos(tok), false, pt, max_prompt);
        if (np <= 0 || np > max_prompt) {
            snprintf(r->error, sizeof r->error, "cannot tokenize the prompt '%.400s'", text);
            break;
        }
        int32_t *gen = r->out + (size_t)q * N;
        int n_done = 0, retries = 0;
        cluster_reset(cl);
        int rc = cluster_eval(cl, pt, np, logits, false);
        for (;;) {
            take_recoveries(r, cl, &seen, mlm_now_ms() - t0);
            if (rc != 0) { // the cluster gave up on a step: re-plan and replay the request so far
                if (retries++ == MAX_RETRIES) break;
                r->retries += retries == 1;
                // Every worker has given the failed step up by its own deadline (and a frozen or cut-off
                // one may be back): re-planning earlier would find some still waiting in it.
                usleep((useconds_t)(a->timeout_ms > a->lay.heartbeat_ms ? a->timeout_ms : a->lay.heartbeat_ms) * 1000);
                const double s0 = mlm_now_ms() - t0;
                rc = replan(cl, pt, np, gen, n_done, logits, err, sizeof err);
                take_recoveries(r, cl, &seen, mlm_now_ms() - t0);
                if (rc == 0 && r->n_marks < MAX_MARKS)
                    r->marks[r->n_marks++] = (mark_t){.start_ms = s0, .end_ms = mlm_now_ms() - t0, .nodes = cluster_plan(cl)->n};
                continue;
            }
            if (n_done == N) break;
            gen[n_done] = argmax(logits, nv);
            r->hash[(size_t)q * N + n_done] = row_hash(logits, nv);
            r->tok_t[r->n_tok++] = mlm_now_ms() - t0;
            n_done++;
            fault_args_tokens(&fa, 1); // events after this many generated tokens fire now
            if (n_done == N) break;
            rc = cluster_eval(cl, &gen[n_done - 1], 1, logits, false);
        }
        if (n_done == N) {
            r->done[q] = true;
            r->tokens += N;
        } else if (a->verbose) {
            fprintf(stderr, "meshlm chaos: request %d lost: %s\n", q + 1, cluster_error(cl));
        }
    }
    r->ms = mlm_now_ms() - t0;
    take_recoveries(r, cl, &seen, r->ms);
out:
    faultsched_stop(fa.sched);
    if (fa.sched) {
        int n = 0;
        const faultsched_entry_t *ev = faultsched_log(fa.sched, &n);
        r->events = n ? malloc((size_t)n * sizeof *r->events) : NULL;
        if (r->events) {
            memcpy(r->events, ev, (size_t)n * sizeof *ev);
            r->n_events = n;
        }
    }
    fault_args_free(&fa); // no worker stays stopped
    cluster_close(&cl, true);
    launch_reap(lw, 5000);
    free(lw);
    tokenizer_destroy(&tok);
    free(logits);
    free(pt);
    fault_free(&use);
    if (saved) setenv("MESHLM_FAULTS", saved, 1);
    free(saved);
    // the spec shown is the one that ran, without the run's board
    char *b = strstr(r->spec, ",board=");
    if (b) {
        char *rest = strchr(b + 1, ',');
        memmove(b, rest ? rest : b + strlen(b), strlen(rest ? rest : b + strlen(b)) + 1);
    }
}

// Requests of run whose tokens differ from ref's (both completed), and logit rows that differ.
static void compare(const chaos_args_t *a, const run_t *ref, const run_t *run, int *lost, int *differ, int *rows) {
    *lost = *differ = *rows = 0;
    const int N = a->n_gen;
    for (int q = 0; q < a->requests; q++) {
        if (!run->done[q]) {
            (*lost)++;
            continue;
        }
        if (!ref->done[q]) continue;
        bool same = true;
        for (int i = 0; i < N; i++) {
            const size_t k = (size_t)q * N + i;
            same = same && run->out[k] == ref->out[k];
            *rows += run->hash[k] != ref->hash[k];
        }
        *differ += !same;
    }
}

static double tok_s(const run_t *r) { return r->ms > 0 ? (double)r->tokens * 1000.0 / r->ms : 0; }

static void link_name(int a, int b, char *buf, size_t cap) {
    if (a == FAULT_ANY) snprintf(buf, cap, "*");
    else if (b == FAULT_ANY) snprintf(buf, cap, "%d-*", a);
    else snprintf(buf, cap, "%d-%d", a, b);
}

// A short label of a scheduler entry for the picture: "kill w3", "freeze w2", "cut 0-1", "slow w1".
static void event_label(const faultsched_entry_t *e, char *buf, size_t cap) {
    char l[32];
    switch (e->kind) {
    case FAULT_KILL: snprintf(buf, cap, "kill w%d", e->worker); break;
    case FAULT_FREEZE: snprintf(buf, cap, "freeze w%d", e->worker); break;
    case FAULT_SLOW: snprintf(buf, cap, "slow w%d", e->worker); break;
    case FAULT_PARTITION:
        link_name(e->a, e->b, l, sizeof l);
        snprintf(buf, cap, "cut %s", l);
        break;
    default: snprintf(buf, cap, "%s", fault_kind_name(e->kind)); break;
    }
}

// --- helpers: the picture

// Writes s with &, <, > and " escaped.
static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '&') fputs("&amp;", f);
        else if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

// A round step for about n ticks over [0, span].
static double nice_step(double span, int n) {
    double raw = span / n, p = 1;
    while (p * 10 <= raw) p *= 10;
    while (p > raw) p /= 10;
    return raw <= p ? p : raw <= 2 * p ? 2 * p : raw <= 5 * p ? 5 * p : 10 * p;
}

// Tokens/s per BIN_MS bin of a run's token times: bins[i] for [i * BIN_MS, (i + 1) * BIN_MS), the
// last bin over the part the run lasted.
static int bin_rates(const run_t *r, double *bins, int cap) {
    const int n = (int)(r->ms / BIN_MS) + 1;
    const int nb = n < cap ? n : cap;
    for (int i = 0; i < nb; i++) bins[i] = 0;
    for (int i = 0; i < r->n_tok; i++) {
        const int k = (int)(r->tok_t[i] / BIN_MS);
        if (k >= 0 && k < nb) bins[k] += 1;
    }
    for (int i = 0; i < nb; i++) {
        const double len = (i + 1) * BIN_MS < r->ms ? BIN_MS : r->ms - i * BIN_MS;
        bins[i] = len > 1 ? bins[i] * 1000.0 / len : 0;
    }
    return nb;
}

// Where the window of scheduler entry i ends (its end entry), or span.
static double window_end(const run_t *run, int i, double span) {
    for (int j = i + 1; j < run->n_events; j++)
        if (run->events[j].end && run->events[j].event == run->events[i].event) return run->events[j].t_ms;
    return span;
}

// The timeline of the run under faults: its tokens/s per bin, the fault-free run's average as a
// reference line, fault marks (windows of freezes and partitions shaded, of slow and link rules as
// a band on top), recoveries shaded from the confirmed loss to the step done again (the detection
// before it as a band at the bottom), re-plans that took workers back. 0 or MLM_EIO.
static int write_svg(const char *path, const chaos_args_t *a, const run_t *ref, const run_t *run, int lost, int differ) {
    FILE *f = fopen(path, "w");
    if (!f) return MLM_EIO;
    enum { W = 1000, H = 500, L = 70, RGT = 30, TOP = 96, BOT = 76 };
    const int pw = W - L - RGT, ph = H - TOP - BOT;
    double bins[4096]; // (nb) tokens/s per bin
    const int nb = bin_rates(run, bins, 4096);
    double span = run->ms;
    for (int i = 0; i < run->n_events; i++)
        if (run->events[i].t_ms > span) span = run->events[i].t_ms;
    if (span < BIN_MS) span = BIN_MS;
    double top = 1;
    for (int i = 0; i < nb; i++) top = bins[i] > top ? bins[i] : top;
    const double ref_rate = tok_s(ref);
    const bool ref_on = ref_rate <= 4 * top; // far above: named, not drawn to scale
    if (ref_on && ref_rate > top) top = ref_rate;
    const double ystep = nice_step(top * 1.1, 5);
    top = ystep * (int)(top * 1.1 / ystep + 0.999);
    const double xstep = nice_step(span / 1000.0, 10);
#define X(ms) (L + (ms) / span * pw)
#define Y(v) (TOP + ph - (v) / top * ph)
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n",
            W, H, W, H);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", W, H);
    const char *base = strrchr(a->model, '/') ? strrchr(a->model, '/') + 1 : a->model;
    fprintf(f, "<text x=\"%d\" y=\"22\" font-size=\"16\" font-weight=\"bold\">meshlm chaos: ", L);
    xml_text(f, base);
    fprintf(f, " on %d workers (%s), %d requests x %d tokens: %d lost, %d differing</text>\n", run->n_workers,
            run->layout, a->requests, a->n_gen, lost, differ);
    const size_t len = strlen(run->spec), cut = 140; // the schedule, on two lines when long
    for (int line = 0; line < 2 && (size_t)line * cut < len; line++) {
        char part[150];
        snprintf(part, sizeof part, "%.*s", (int)cut, run->spec + (size_t)line * cut);
        fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"11\" fill=\"#444\">%s", L, 40 + 14 * line, line ? "" : "schedule: ");
        xml_text(f, part);
        fprintf(f, "</text>\n");
    }
    fprintf(f, "<text x=\"%d\" y=\"70\" font-size=\"11\" fill=\"#444\">%lld tokens in %.2f s: %.1f tokens/s with faults, "
               "%.1f fault-free; step timeout %d ms, heartbeat %d ms</text>\n",
            L, (long long)run->tokens, run->ms / 1000, tok_s(run), ref_rate, a->timeout_ms, a->lay.heartbeat_ms);
    // windows: freezes and partitions shaded; slow and link rules as a band on top
    int band = 0;
    for (int i = 0; i < run->n_events; i++) {
        const faultsched_entry_t *e = &run->events[i];
        if (e->end || e->kind == FAULT_KILL) continue;
        const double x0 = X(e->t_ms), x1 = X(window_end(run, i, span));
        if (e->kind == FAULT_FREEZE || e->kind == FAULT_PARTITION) {
            fprintf(f, "<rect class=\"window\" x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"#d62728\" "
                       "fill-opacity=\"0.10\"/>\n",
                    x0, TOP, x1 - x0, ph);
        } else {
            char lab[64];
            event_label(e, lab, sizeof lab);
            fprintf(f, "<g class=\"window\"><rect x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"9\" fill=\"#9467bd\" "
                       "fill-opacity=\"0.45\"/><text x=\"%.1f\" y=\"%d\" font-size=\"9\" fill=\"#5b3f87\">",
                    x0, TOP + 1 + 10 * (band % 3), x1 - x0, x1 - 4, TOP + 9 + 10 * (band % 3));
            xml_text(f, lab);
            fprintf(f, "</text></g>\n");
            band++;
        }
    }
    // recoveries (and their detection) and re-plans
    for (int i = 0; i < run->n_marks; i++) {
        const mark_t *m = &run->marks[i];
        fprintf(f, "<rect class=\"%s\" x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"%s\" fill-opacity=\"0.35\">"
                   "<title>",
                m->recovery ? "recovery" : "replan", X(m->start_ms), TOP, X(m->end_ms) - X(m->start_ms) + 1, ph,
                m->recovery ? "#ff7f0e" : "#2ca02c");
        if (m->recovery) {
            xml_text(f, m->r.worker);
            fprintf(f, " ");
            xml_text(f, m->r.what);
            fprintf(f, ": detected in %.0f ms, recovered in %.0f ms, %d nodes after", m->r.detect_ms, m->r.recover_ms,
                    m->nodes);
        } else {
            fprintf(f, "re-plan taking workers back: %d nodes", m->nodes);
        }
        fprintf(f, "</title></rect>\n");
        if (!m->recovery) continue;
        const double d0 = m->start_ms - m->r.detect_ms > 0 ? m->start_ms - m->r.detect_ms : 0;
        fprintf(f, "<rect class=\"detection\" x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"8\" fill=\"#b35806\" "
                   "fill-opacity=\"0.6\"/>\n",
                X(d0), TOP + ph - 8, X(m->start_ms) - X(d0) + 1);
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" font-size=\"10\" fill=\"#b35806\">%.0f/%.0f</text>\n", X(m->start_ms) + 2,
                TOP + ph - 12 - 12 * (i % 3), m->r.detect_ms, m->r.recover_ms);
    }
    // axes and grid
    fprintf(f, "<g stroke=\"#ddd\">\n");
    for (double v = 0; v <= top + 1e-9; v += ystep)
        fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\"/>\n", L, Y(v), L + pw, Y(v));
    fprintf(f, "</g>\n<g font-size=\"11\" text-anchor=\"end\">\n");
    for (double v = 0; v <= top + 1e-9; v += ystep) fprintf(f, "<text x=\"%d\" y=\"%.1f\">%g</text>\n", L - 6, Y(v) + 4, v);
    fprintf(f, "</g>\n<g font-size=\"11\" text-anchor=\"middle\">\n");
    for (double t = 0; t * 1000 <= span + 1e-6; t += xstep)
        fprintf(f, "<text x=\"%.1f\" y=\"%d\">%g</text>\n", X(t * 1000), TOP + ph + 16, t);
    fprintf(f, "</g>\n");
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, TOP + ph, L + pw, TOP + ph);
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", L, TOP, L, TOP + ph);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">time since the first request (s)</text>\n", L + pw / 2,
            TOP + ph + 34);
    fprintf(f, "<text transform=\"translate(18 %d) rotate(-90)\" text-anchor=\"middle\">tokens/s (per %.0f ms)</text>\n",
            TOP + ph / 2, BIN_MS);
    // the fault-free average, and the run under faults as steps
    if (ref_on)
        fprintf(f, "<line class=\"fault-free\" x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#666\" "
                   "stroke-dasharray=\"6 4\" stroke-width=\"1.5\"/>\n",
                L, Y(ref_rate), L + pw, Y(ref_rate));
    else
        fprintf(f, "<text class=\"fault-free\" x=\"%d\" y=\"%d\" text-anchor=\"end\" font-size=\"11\" fill=\"#666\">"
                   "fault-free: %.0f tokens/s (off this scale)</text>\n",
                L + pw - 4, TOP + 40, ref_rate);
    fprintf(f, "<polyline class=\"faults\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"");
    for (int i = 0; i < nb; i++) {
        const double x0 = i * BIN_MS, x1 = (i + 1) * BIN_MS < run->ms ? (i + 1) * BIN_MS : run->ms;
        fprintf(f, "%.1f,%.1f %.1f,%.1f ", X(x0), Y(bins[i]), X(x1), Y(bins[i]));
    }
    fprintf(f, "\"/>\n");
    // fault marks with their labels, staggered
    int shown = 0;
    for (int i = 0; i < run->n_events; i++) {
        const faultsched_entry_t *e = &run->events[i];
        if (e->end || !(e->kind == FAULT_KILL || e->kind == FAULT_FREEZE || e->kind == FAULT_PARTITION)) continue;
        char lab[64];
        event_label(e, lab, sizeof lab);
        fprintf(f, "<g class=\"fault\"><line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#d62728\" stroke-width=\"1.5\"/>"
                   "<text x=\"%.1f\" y=\"%d\" font-size=\"11\" fill=\"#d62728\">",
                X(e->t_ms), TOP - 8, X(e->t_ms), TOP + ph, X(e->t_ms) + 3, TOP + 42 + 13 * (shown % 4));
        xml_text(f, lab);
        fprintf(f, "</text><title>");
        xml_text(f, e->what);
        fprintf(f, "</title></g>\n");
        shown++;
    }
    // legend, under the axis
    const int ly = H - 14;
    fprintf(f, "<g font-size=\"11\">\n");
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"%d\" y=\"%d\">with faults</text>\n",
            L, ly - 4, L + 24, ly - 4, L + 30, ly);
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#666\" stroke-dasharray=\"6 4\"/><text x=\"%d\" y=\"%d\">fault-free average</text>\n",
            L + 110, ly - 4, L + 134, ly - 4, L + 140, ly);
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#d62728\" stroke-width=\"1.5\"/><text x=\"%d\" y=\"%d\">fault (window shaded)</text>\n",
            L + 262, ly - 10, L + 262, ly + 2, L + 268, ly);
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"10\" fill=\"#ff7f0e\" fill-opacity=\"0.35\"/><text x=\"%d\" y=\"%d\">"
               "recovery (detected/recovered ms)</text>\n",
            L + 400, ly - 10, L + 418, ly);
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"8\" fill=\"#b35806\" fill-opacity=\"0.6\"/><text x=\"%d\" y=\"%d\">detection</text>\n",
            L + 610, ly - 9, L + 628, ly);
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"10\" fill=\"#2ca02c\" fill-opacity=\"0.35\"/><text x=\"%d\" y=\"%d\">re-plan</text>\n",
            L + 700, ly - 10, L + 718, ly);
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"9\" fill=\"#9467bd\" fill-opacity=\"0.45\"/><text x=\"%d\" y=\"%d\">slow, link rule</text>\n",
            L + 775, ly - 9, L + 793, ly);
    fprintf(f, "</g>\n</svg>\n");
#undef X
#undef Y
    return fclose(f) == 0 ? 0 : MLM_EIO;
}

// --- helpers: the report

static cJSON *run_json(const run_t *r, const run_t *ref, const chaos_args_t *a) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddNumberToObject(o, "workers", r->n_workers);
    cJSON_AddBoolToObject(o, "faults", r->faulty);
    if (!r->ran) {
        cJSON_AddStringToObject(o, "error", r->error);
        return o;
    }
    cJSON_AddStringToObject(o, "layout", r->layout);
    cJSON_AddNumberToObject(o, "nodes", r->nodes);
    cJSON_AddNumberToObject(o, "seconds", r->ms / 1000.0);
    cJSON_AddNumberToObject(o, "tokens", (double)r->tokens);
    cJSON_AddNumberToObject(o, "tokens_per_s", tok_s(r));
    int lost = 0, differ = 0, rows = 0;
    if (ref && ref->ran) {
        compare(a, ref, r, &lost, &differ, &rows);
        cJSON_AddNumberToObject(o, "requests_lost", lost);
        cJSON_AddNumberToObject(o, "outputs_differing", differ);
        cJSON_AddNumberToObject(o, "logit_rows_differing", rows);
    }
    cJSON_AddNumberToObject(o, "requests_retried", r->retries);
    if (r->faulty) cJSON_AddStringToObject(o, "spec", r->spec);
    cJSON *rec = cJSON_AddArrayToObject(o, "recoveries");
    for (int i = 0; rec && i < r->n_marks; i++) {
        const mark_t *m = &r->marks[i];
        if (!m->recovery) continue;
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "worker", m->r.worker);
        cJSON_AddStringToObject(x, "what", m->r.what);
        cJSON_AddNumberToObject(x, "at_ms", m->start_ms);
        cJSON_AddNumberToObject(x, "detection_ms", m->r.detect_ms);
        cJSON_AddNumberToObject(x, "recovery_ms", m->r.recover_ms);
        cJSON_AddNumberToObject(x, "replayed_tokens", m->r.replayed);
        cJSON_AddNumberToObject(x, "nodes_after", m->r.nodes_after);
        cJSON_AddBoolToObject(x, "recovered", m->r.rc == 0);
        cJSON_AddNumberToObject(x, "plan_ms", m->r.plan_ms);
        cJSON_AddNumberToObject(x, "load_ms", m->r.shards_ms);
        cJSON_AddNumberToObject(x, "data_plane_ms", m->r.plane_ms);
        cJSON_AddNumberToObject(x, "replay_ms", m->r.replay_ms);
        cJSON_AddNumberToObject(x, "step_ms", m->r.step_ms);
        cJSON_AddItemToArray(rec, x);
    }
    cJSON *ev = cJSON_AddArrayToObject(o, "events");
    for (int i = 0; ev && i < r->n_events; i++) {
        const faultsched_entry_t *e = &r->events[i];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "t_ms", e->t_ms);
        cJSON_AddNumberToObject(x, "tokens", (double)e->tokens);
        cJSON_AddStringToObject(x, "kind", fault_kind_name(e->kind));
        cJSON_AddBoolToObject(x, "end", e->end);
        cJSON_AddStringToObject(x, "what", e->what);
        cJSON_AddItemToArray(ev, x);
    }
    return o;
}

static void print_report(const chaos_args_t *a, const run_t *ref, const run_t *run, int lost, int differ, int rows) {
    const char *base = strrchr(a->model, '/') ? strrchr(a->model, '/') + 1 : a->model;
    printf("meshlm chaos: %s on %d local workers (%s), %d requests x %d tokens; timeout %d ms, heartbeat %d ms\n", base,
           run->n_workers, run->layout, a->requests, a->n_gen, a->timeout_ms, a->lay.heartbeat_ms);
    printf("schedule: %s\n\n", run->spec);
    printf("| run         | tokens | seconds | tokens/s |\n|-------------|--------|---------|----------|\n");
    printf("| fault-free  | %6lld | %7.2f | %8.1f |\n", (long long)ref->tokens, ref->ms / 1000, tok_s(ref));
    printf("| with faults | %6lld | %7.2f | %8.1f |\n\n", (long long)run->tokens, run->ms / 1000, tok_s(run));
    if (run->n_events) {
        printf("| t ms   | tokens | event |\n|--------|--------|-------|\n");
        for (int i = 0; i < run->n_events; i++)
            printf("| %6.0f | %6lld | %s |\n", run->events[i].t_ms, (long long)run->events[i].tokens, run->events[i].what);
        printf("\n");
    }
    int n_rec = 0;
    double worst_det = 0, worst_rec = 0;
    for (int i = 0; i < run->n_marks; i++) n_rec += run->marks[i].recovery;
    if (n_rec) {
        printf("| t ms   | worker   | what                                     | detection ms | recovery ms | replayed | nodes after |\n"
               "|--------|----------|------------------------------------------|--------------|-------------|----------|-------------|\n");
        for (int i = 0; i < run->n_marks; i++) {
            const mark_t *m = &run->marks[i];
            if (!m->recovery) continue;
            printf("| %6.0f | %-8s | %-40.40s | %12.0f | %11.0f | %8d | %11d |\n", m->start_ms, m->r.worker, m->r.what,
                   m->r.detect_ms, m->r.recover_ms, m->r.replayed, m->r.nodes_after);
            if (m->r.detect_ms > worst_det) worst_det = m->r.detect_ms;
            if (m->r.recover_ms > worst_rec) worst_rec = m->r.recover_ms;
        }
        printf("\n");
    }
    const int total_rows = a->requests * a->n_gen;
    printf("requests lost: %d of %d; outputs differing: %d of %d (logit rows differing: %d of %d); requests retried: %d\n",
           lost, a->requests, differ, a->requests - lost, rows, total_rows, run->retries);
    if (n_rec)
        printf("worst detection %.0f ms (target %.0f), worst recovery %.0f ms (target %.0f); %d recoveries\n", worst_det,
               DETECT_TARGET_MS, worst_rec, RECOVER_TARGET_MS, n_rec);
}

// --- public API

int cmd_chaos(int argc, char **argv) {
    chaos_args_t a;
    int prc = parse_args(argc, argv, &a);
    if (prc != 0) return prc < 0 ? 0 : 2;
    fault_spec_t *spec = schedule_of(&a);
    if (!spec) return 2;
    if (!a.json)
        fprintf(stderr, "meshlm chaos: %d requests x %d tokens on %d workers, fault-free, then under %s\n", a.requests,
                a.n_gen, a.local, fault_spec_text(spec));
    run_t runs[2 * SCALE_MAX + 2]; // [0] fault-free and [1] faulty at --local; then N = 1..4 pairs
    memset(runs, 0, sizeof runs);
    run_workload(&a, NULL, a.local, &runs[0]);
    if (runs[0].ran) run_workload(&a, spec, a.local, &runs[1]);
    int code = 0;
    if (!runs[0].ran || !runs[1].ran) {
        fprintf(stderr, "meshlm chaos: %s\n", !runs[0].ran ? runs[0].error : runs[1].error);
        code = 1;
    }
    int lost = 0, differ = 0, rows = 0;
    if (code == 0) {
        compare(&a, &runs[0], &runs[1], &lost, &differ, &rows);
        if (lost || differ) code = 1;
        for (int q = 0; q < a.requests; q++)
            if (!runs[0].done[q]) code = 1; // the reference itself failed
    }
    if (code == 0 && a.scale) {
        for (int n = 1; n <= SCALE_MAX; n++) {
            run_t *p = &runs[2 * n];
            if (n == a.local) continue; // the main runs
            if (!a.json) fprintf(stderr, "meshlm chaos: scaling: %d worker(s)\n", n);
            run_workload(&a, NULL, n, &p[0]);
            if (p[0].ran) run_workload(&a, spec, n, &p[1]);
        }
    }
    if (code == 0 && a.svg && write_svg(a.svg, &a, &runs[0], &runs[1], lost, differ) != 0) {
        fprintf(stderr, "meshlm chaos: %s: cannot write: %s\n", a.svg, strerror(errno));
        code = 1;
    }
    if (a.json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "model", a.model);
        cJSON_AddNumberToObject(o, "requests", a.requests);
        cJSON_AddNumberToObject(o, "tokens_per_request", a.n_gen);
        cJSON_AddNumberToObject(o, "timeout_ms", a.timeout_ms);
        cJSON_AddNumberToObject(o, "heartbeat_ms", a.lay.heartbeat_ms);
        cJSON_AddStringToObject(o, "spec", fault_spec_text(spec));
        cJSON_AddItemToObject(o, "fault_free", run_json(&runs[0], NULL, &a));
        cJSON_AddItemToObject(o, "with_faults", run_json(&runs[1], &runs[0], &a));
        if (a.scale) {
            cJSON *sc = cJSON_AddArrayToObject(o, "scale");
            for (int n = 1; sc && n <= SCALE_MAX; n++) {
                const run_t *p = n == a.local ? &runs[0] : &runs[2 * n];
                cJSON *row = cJSON_CreateObject();
                cJSON_AddNumberToObject(row, "workers", n);
                cJSON_AddItemToObject(row, "fault_free", run_json(&p[0], NULL, &a));
                cJSON_AddItemToObject(row, "with_faults", run_json(&p[1], &p[0], &a));
                cJSON_AddItemToArray(sc, row);
            }
        }
        cJSON_AddBoolToObject(o, "ok", code == 0);
        char *txt = cJSON_Print(o);
        if (txt) printf("%s\n", txt);
        free(txt);
        cJSON_Delete(o);
    } else if (runs[0].ran && runs[1].ran) {
        print_report(&a, &runs[0], &runs[1], lost, differ, rows);
        if (a.scale) {
            printf("\n| workers | layout | fault-free tokens/s | with faults tokens/s | slowdown | lost | differing | recoveries |\n"
                   "|---------|--------|---------------------|----------------------|----------|------|-----------|------------|\n");
            for (int n = 1; n <= SCALE_MAX; n++) {
                const run_t *p = n == a.local ? &runs[0] : &runs[2 * n];
                if (!p[0].ran || !p[1].ran) {
                    printf("| %7d | -      | %s |\n", n, !p[0].ran ? p[0].error : p[1].error);
                    continue;
                }
                int l = 0, d = 0, rw = 0, nr = 0;
                compare(&a, &p[0], &p[1], &l, &d, &rw);
                for (int i = 0; i < p[1].n_marks; i++) nr += p[1].marks[i].recovery;
                printf("| %7d | %-6s | %19.1f | %20.1f | %7.0f%% | %4d | %9d | %10d |\n", n, p[0].layout, tok_s(&p[0]),
                       tok_s(&p[1]), tok_s(&p[0]) > 0 ? 100.0 * (1 - tok_s(&p[1]) / tok_s(&p[0])) : 0, l, d, nr);
            }
        }
        if (a.svg) printf("\ntimeline: %s\n", a.svg);
    }
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) run_free(&runs[i]);
    fault_free(&spec);
    return code;
}
