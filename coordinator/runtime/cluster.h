// The coordinator's side of a cluster: workers, plan, shard loading, and distributed steps.
#ifndef MESHLM_CLUSTER_H
#define MESHLM_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "parallel/plan.h"
#include "proto/msg.h"
#include "transport/comm.h"
#include "transport/curve.h"
#include "worker/model/model.h"

typedef struct {
    const char *model_path;          // the GGUF the coordinator has
    const uint8_t *model_sha256;     // (32) its SHA-256 when the caller has it (not hashed again), or NULL
    const char *const *workers;      // (n_workers) control endpoints of running workers (the link backend)
    int n_workers;
    comm_t *control;                 // instead of workers: a ready control comm whose rank 0 is this
                                     // coordinator and ranks 1..N the workers (MPI, in-process; borrowed)
    comm_t *data;                    // a ready data plane of the same ranks (required with control; every
                                     // plan must then use every rank in order), or NULL: ZeroMQ per plan
    bool same_file;                  // every worker reads model_path itself (MPI): nothing is hashed or streamed
    int n_batch;                     // tokens per forward chunk on every node (0 = their default, 64)
    const char *speeds;              // relative speeds of the computing nodes ("2,1"), NULL = equal
    bool coordinator_shard;          // the coordinator computes a share too (it is node 0 of the plan)
    const char *data_endpoint;       // the coordinator's data-plane endpoint (NULL = derived)
    int n_ctx;                       // KV positions (0 = min(model's, 4096))
    int n_threads;                   // the coordinator's threads for its own share (0 = all)
    uint64_t mem_budget;             // the coordinator's memory budget for its own share (weights + KV cache
                                     // + activations; 0 = none): planned as node 0's budget, and the share
                                     // streams through the weight window when it does not fit resident
    const char *weights;             // the weight provider of its own share (offload/weights.h; NULL = chosen by
                                     // mem_budget)
    float expert_skip;               // MoE adaptive gating of its own share (model_load_opts_t.expert_skip)
    int timeout_ms;                  // each control exchange and collective (0 = 30000)
    const curve_conf_t *curve;       // CurveZMQ on the control link and every plan's ZeroMQ data plane: this
                                     // coordinator's keys and each worker endpoint's key (transport/curve.h),
                                     // sent in the PLAN (protocol 1.6; older workers are refused); NULL = plain
    bool drop_cache;                 // cluster_open drops the model's page cache between planning and loading,
                                     // so local workers' memory cgroups are charged for their shards
    bool kv_f32;
    bool kv_q8;                      // Q8_0 KV cache (model_ctx_opts_t.kv_q8), sent in the PLAN's kv_type
    const char *kv_device;           // attention/KV device of every node without its own --kv-device, sent in the
                                     // PLAN (protocol 1.5) and used for the coordinator's own share (NULL = host)
    bool verbose;                    // print progress on stderr
    // Layout. Without any of these the planner chooses (tensor, pipeline or hybrid; nodes too slow
    // to help are left out) from the nodes' measured speed, memory and links.
    int pp;                          // pipeline stages (0 = the planner chooses)
    int tp;                          // nodes per stage (0 = the planner chooses)
    int ep;                          // MoE: 0 = the planner chooses sliced or placed experts, N >= 2 = experts
                                     // placed whole on stages of N workers (--ep N), -1 = sliced only
    bool ep_replicated;              // placed experts with attention on every member (--ep-attn all), not on
                                     // each stage's first alone (the default; needs protocol 1.8 workers, an
                                     // older one makes the plan replicated)
    int ep_replicas;                 // with attention on the leader: holders of each expert (plan_opts_t.ep_replicas)
    const char *ep_hot_file;         // routing counts (plan_popularity_load): the popular experts get a second
                                     // holder (plan_opts_t.ep_hot) and the planner draws experts by popularity
    int ep_hot;                      // with ep_hot_file: how many per stage (0 = the model's top-k)
    int expert_cache;                // the workers cache their experts (--expert-cache, given to local workers):
                                     // the planner sizes placed experts with it (plan_opts_t.expert_cache;
                                     // 0 = auto, what a worker does under a budget without the option)
    bool keep_all;                   // never leave a node out
    const char *plan_file;           // a hand-written plan (parallel/plan.h file format), or NULL
    plan_tp_mode_t tp_mode;          // how tensor-parallel groups cut a block: EXACT (default, bit-identical
                                     // to one node), ALLREDUCE or AUTO (the faster predicted); with a plan
                                     // file its `tp mode=` line, unless tp_mode_set with EXACT or ALLREDUCE.
                                     // All-reduce plans need workers of protocol 1.4 or newer: AUTO then
                                     // stays exact, ALLREDUCE is refused naming the older worker
    bool tp_mode_set;                // tp_mode was given (--tp-mode)
    int ubatch;                      // micro-batch tokens in flight through a pipeline (0 = 16 with
                                     // several stages, the whole chunk with one)
    int n_standby;                   // the last n_standby workers are standbys: they join a plan only to
                                     // replace lost workers
    bool recover;                    // a worker lost in a step: re-plan over the survivors (and standbys),
                                     // reload, replay every sequence's tokens and redo the step
    int heartbeat_ms;                // a frozen or cut-off worker is detected within this (0 = 1000): the
                                     // links' heartbeat timeout and the answer time of a liveness probe
    void (*on_plan)(void *arg, const plan_t *p); // called after every plan is sent (e.g. to publish it), or NULL
    void *on_plan_arg;
    bool local_profile;              // workers that did not profile themselves (local ones, started with
                                     // --no-profile so they do not measure each other) get this
                                     // machine's figures, measured once by the coordinator with n_threads
} cluster_opts_t;

typedef struct {
    double load_ms;                  // from first HELLO to the data plane being up
    double worker_load_ms;           // the slowest worker's own time to take and load its last share
                                     // (its LOAD_SHARD_ACK: receiving, writing, reading)
    uint64_t shard_bytes_sent;       // shard file bytes streamed to workers without the model
    int from_cache;                  // workers that loaded from their shard cache
    int from_file;                   // workers that mapped their own copy of the model
    int streamed;                    // workers that received their shard
    uint64_t steps;                  // cluster_eval calls
    uint64_t tokens;                 // tokens they carried
    double gather_ms;                // time the coordinator spent in all-gathers (transfer + waiting for peers)
    uint64_t gather_bytes;           // bytes all nodes sent each other per step (counted when the coordinator
                                     // computes, derived from the plan otherwise) plus the logit rows
    uint64_t gathers;                // all-gather rounds
    uint64_t allreduces;             // all-reduces the coordinator's group made (all-reduce mode, when it computes)
    double step_ms;                  // wall time of the steps (cluster_eval calls)
    double busy_ms;                  // summed over the computing nodes: time computing (their step reports)
    double wait_ms;                  // summed: time waiting for the stage before or for exchanges
    uint64_t reports;                // step reports received from workers
    int n_compute;                   // computing nodes in the plan
    double link_lat_us;              // worst measured control-link latency (one way) to a worker
    double link_bw;                  // lowest measured control-link bandwidth, bytes/s
} cluster_stats_t;

// One loss and what the cluster did about it.
typedef struct {
    char worker[MSG_ID_MAX];         // the lost worker's node id (or endpoint)
    char what[96];                   // "lost (peer lost)", "no answer within 1000 ms", ...
    double detect_ms;                // from the last message heard from it to the loss being confirmed
    double recover_ms;               // from the confirmation to the failed step done again
    int replayed;                    // tokens replayed to rebuild the caches
    int nodes_after;                 // computing nodes in the new plan
    int rc;                          // 0 recovered, else why not (the step then failed)
    // where recover_ms went (ms): planning again (PLAN to every worker), the workers loading their
    // shares (LOAD_SHARD to the last ack), the new data plane's handshake and the coordinator's own
    // share, replaying every sequence's tokens, and the failed step done again
    double plan_ms, shards_ms, plane_ms, replay_ms, step_ms;
} cluster_recovery_t;
#define CLUSTER_MAX_RECOVERIES 64

typedef struct cluster cluster_t;

// The phases, each a separate call so a caller can re-plan and re-load in the middle of a request
// (after a node is lost, or to change the layout) without a restart. Every one returns 0 or a
// negative MLM_ code with a message naming the worker in err.
//   cluster_new    maps the model (metadata only), opens the control channel; no message yet
//   cluster_hello  HELLO to every worker (their profiles, the links to emulate), link measurement
//   cluster_make_plan  plans over the workers (and the coordinator's share) and sends PLAN; again after a
//                  load ends the current plan: every sequence restarts at position 0 (replay it)
//   cluster_load   every node loads its shard (own file, cache, or streamed), the data plane comes up
// cluster_open does all four. Calling a phase before the one it needs is MLM_ESTATE.
int cluster_new(cluster_t **out, const cluster_opts_t *o, char *err, size_t errlen);
int cluster_hello(cluster_t *c, char *err, size_t errlen);
int cluster_make_plan(cluster_t *c, char *err, size_t errlen);
int cluster_load(cluster_t *c, char *err, size_t errlen);
int cluster_open(cluster_t **out, const cluster_opts_t *o, char *err, size_t errlen);

// Changes the layout the next cluster_make_plan asks for (as cluster_opts_t's pp, tp, keep_all,
// plan_file; plan_file is borrowed until then).
void cluster_set_layout(cluster_t *c, int pp, int tp, bool keep_all, const char *plan_file);

// The whole model, mapped without repacking: metadata, tokenizer and shapes (stable for the
// cluster's life, across re-plans).
const model_t *cluster_model(const cluster_t *c);
const plan_t *cluster_plan(const cluster_t *c);
const cluster_stats_t *cluster_stats(const cluster_t *c);

// Where a computing node's time went since the last cluster_stats_reset (call cluster_sync_stats
// first so every step's report is in): what it measured of itself, and what the plan predicts its
// exchanges take on the measured links.
typedef struct {
    char node[MSG_ID_MAX];           // its node id; "coordinator" for the coordinator's own share
    int rank;                        // its data-plane rank
    uint64_t steps;                  // step reports counted
    double compute_ms;               // summed: computing
    double comm_ms;                  // summed: in exchanges (sending, receiving, waiting for peers) and
                                     // waiting for the stage before
    double transfer_ms;              // predicted per decoded token: its stage's exchanges at the measured
                                     // latency and bandwidth (plan_shard_t.comm_ms); the rest of comm_ms
                                     // is waiting
    uint64_t shm_collectives;        // summed: its exchanges made through shared memory (pipe_set_shm)
} cluster_node_time_t;

// Fills out (up to max) for every computing node of the plan in rank order; returns how many (0
// before cluster_load).
int cluster_node_times(const cluster_t *c, cluster_node_time_t *out, int max);

// One step on every node (same contract as model_eval); MLM_ESTATE before cluster_load. On a lost worker: MLM_EPEER or
// MLM_ETIMEOUT within the deadline, and cluster_error() names the worker when it could tell.
int cluster_eval(cluster_t *c, const int32_t *tokens, int n, float *logits, bool all_logits);

// Several requests in flight: one token for each of n_seqs sequences (seqs: distinct ids in
// 0..CLUSTER_MAX_SEQS-1, each with its own KV cache on every node; cluster_eval is sequence 0).
// Every step is sent before any is computed, so pipeline stages work on different sequences at
// once. logits (n_seqs rows of n_vocab, or NULL) receives each sequence's next-token row. 0 or as
// cluster_eval.
#define CLUSTER_MAX_SEQS 16
int cluster_eval_seqs(cluster_t *c, int n_seqs, const int *seqs, const int32_t *tokens, float *logits);
// Continuous batching: sequence seqs[k] takes n[k] tokens (tokens[k]: a prompt chunk or one generated
// token) in one step; logits[k] (or NULL) receives the row of its last token. Each sequence is computed
// as it would be alone, so its rows equal cluster_eval's for the same chunks. 0 or as cluster_eval.
int cluster_eval_batch(cluster_t *c, int n_seqs, const int *seqs, const int32_t *const *tokens, const int *n,
                       float *const *logits);
int cluster_seq_pos(const cluster_t *c, int seq); // positions sequence seq holds (0 for an unknown one)
void cluster_reset_seq(cluster_t *c, int seq); // forget one sequence
void cluster_reset(cluster_t *c);              // forget every sequence
// Zeroes the step counters (steps, tokens, gather_*, step/busy/wait times), e.g. after a warm-up.
void cluster_stats_reset(cluster_t *c);
// Waits (up to timeout_ms) for every worker's report of every step so far, so busy_ms and wait_ms
// are complete; 0 or MLM_ETIMEOUT. Pipeline utilisation = busy_ms / (n_compute * step_ms).
int cluster_sync_stats(cluster_t *c, int timeout_ms);
const char *cluster_error(const cluster_t *c);

// The losses so far and what was done (at most CLUSTER_MAX_RECOVERIES, oldest first); *n gets the count.
const cluster_recovery_t *cluster_recoveries(const cluster_t *c, int *n);

// The same as a JSON array (caller owns it): [{"worker","what","detection_ms","recovery_ms",
// "replayed_tokens","nodes_after","recovered"}, ...].
struct cJSON *cluster_recoveries_json(const cluster_t *c);

// Between steps: pings the plan's workers and waits up to timeout_ms for their answers (their heartbeat
// ages restart); returns how many did not answer. Those are lost: with recovery on, the cluster re-plans
// over the others at once (a recovery entry, the sequences replayed), else the next step fails.
int cluster_ping(cluster_t *c, int timeout_ms);

// The cluster for a status page: {"layout","tp_mode","n_ctx","steps","step_ms","faults","recovered",
// "nodes":[{"id","endpoint","state","heartbeat_age_ms","rank","cores","mem_budget_bytes","mem_bw_gb_s","reports","compute_ms",
// "wait_ms","step_ms","utilisation"}], "shards":[{"node","stage","l0","l1","h0","h1","f0","f1","v0","v1",
// "weight_bytes","predicted_ms"}], "recoveries":[...]} (caller owns it). Call it from the thread that steps.
struct cJSON *cluster_status_json(const cluster_t *c);

// Ends the plan on every worker (and stops them with exit_workers); accepts NULL, NULLs the pointer.
void cluster_close(cluster_t **self_p, bool exit_workers);

#endif
