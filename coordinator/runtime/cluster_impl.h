// Inside the cluster object: its state and the calls its three files share (cluster.c: the object and its
// phases; cluster_step.c: steps and statistics; cluster_recover.c: losses, re-plans and replays).
#ifndef MESHLM_CLUSTER_IMPL_H
#define MESHLM_CLUSTER_IMPL_H

#include "cluster/profile.h"
#include "coordinator/runtime/cluster.h"
#include "proto/msg.h"
#include "transport/comm.h"
#include "transport/fault.h"
#include "worker/node/pipeline.h"

// --- types


typedef struct {
    int peer;                   // its rank on the control comm (i + 1)
    char endpoint[MSG_ENDPOINT_MAX]; // its control endpoint, or "rank N" (MPI, in-process): its name in messages
    char data_endpoint[MSG_ENDPOINT_MAX];
    msg_hello_t hello;          // what it said about itself
    int rank;                   // its data-plane rank, -1 when the plan leaves it out
    double lat_us, bw;          // measured control link: one-way latency, bytes/s
    uint64_t reports;           // step reports received
    double busy_ms, wait_ms;    // summed over those reports: computing; waiting for exchanges
    uint64_t reports0;          // reports, busy_ms and wait_ms at the last cluster_stats_reset
    double busy0, wait0;
    uint64_t shm_collectives, shm0; // its exchanges through shared memory: summed over the reports, at the reset
    bool standby;               // held back from plans until a worker is lost (cluster_opts_t.n_standby)
    bool lost;                  // lost (killed, frozen, cut off): left out of plans until it answers again
    bool greeted;               // answered a HELLO since it was last lost
    bool disk_full;             // could not take its shard into its cache (MLM_EFULL): left out of plans
    int lost_report;            // the plan node (data-plane rank) its last failed step lost, -1 none
    bool just_lost;             // lost in the recovery under way: its plan does not greet it again
    double greet_ms;            // when it was last greeted in vain (mlm_now_ms): greeted again at a plan
                                // only CL_GREET_EVERY_MS later (a dead worker would cost every
                                // recovery the greeting's wait)
    double heard_ms;            // when a message from it last arrived (mlm_now_ms)
} worker_t;

// What a sequence went through, so its caches can be rebuilt after a loss: its tokens and the
// sizes of the steps that carried them (a replay uses the same chunks, so it gives the same bits).
typedef struct {
    int32_t *tokens;            // (cap) fed so far, pos of them
    int *steps;                 // (cap) token count of each step
    int n_steps;
    int cap;
} seq_hist_t;

struct cluster {
    cluster_opts_t o;
    int timeout_ms;
    uint8_t sha[32];            // of the model file (zero with same_file)
    comm_t *ctl;                // control channel: rank 0 is the coordinator, worker i is peer i + 1
    bool ctl_owned;             // made here (the link backend) rather than given (o.control)
    bool ctl_wrapped;           // ctl is the fault-injecting wrapper over the link comm (owned with it)
    model_t *full;              // the whole model, mapped without repacking: metadata, planning, streaming
    int phase;                  // PHASE_*: how far the cluster has come
    worker_t *w;                // (n_workers)
    int n_nodes;                // data-plane ranks: rank 0 is the coordinator, then the plan's workers
    plan_t *plan;               // shares of the computing nodes (shard order = rank order)
    shard_slice_t *slices;      // (n_nodes) by rank; rank 0 empty unless the coordinator computes
    msg_plan_node_t *pnodes;    // (n_nodes) as sent
    int *rank_worker;           // (n_nodes) worker index of each rank, -1 for the coordinator
    comm_t *comm;               // data plane (o.data when given, else made for the plan)
    pipe_node_t pipe;           // the coordinator's place in the pipeline
    fault_spec_t *faults;       // $MESHLM_FAULTS: links to emulate (NULL = none), handed to the workers
    model_t *model;             // the coordinator's slice (empty unless it computes)
    model_t *kept;              // its slice of the plan before, kept for the next load to take the
                                // repacked rows the two have in common from (NULL: none)
    model_ctx_t *ctx[CLUSTER_MAX_SEQS]; // its context per sequence, only when it computes
    bool computes;              // the coordinator holds a share
    int pos[CLUSTER_MAX_SEQS];  // tokens in the cluster's caches, per sequence
    int ubatch;                 // micro-batch tokens of a step
    uint64_t step_id;
    cluster_stats_t stats;
    char errbuf[512];           // last failure, for cluster_error
    int cand[MSG_MAX_NODES];    // worker index of each offered worker node of the current plan
    int n_cand;
    profile_t here;             // this machine, measured once (for local workers and the coordinator)
    int here_state;             // 0 not measured, 1 measured, -1 failed
    seq_hist_t hist[CLUSTER_MAX_SEQS];
    cluster_recovery_t rec[CLUSTER_MAX_RECOVERIES];
    int n_rec;
    int n_lost_total;           // workers lost so far (forced layouts then shrink to the nodes left)
    uint64_t plan_id;           // the current plan's (its data plane's session is its low bits)
    double step_t0;             // when the last step started (mlm_now_ms)
    int n_plans;                // plans made
    double shards_ms, plane_ms; // the last cluster_load: shares loaded, then data plane and own share
    bool one_order;             // the steps sent now are computed in one-token order (a replay's chunks)
};

#define CL_GREET_EVERY_MS 2000

enum { PHASE_NEW = 0, PHASE_HELLO = 1, PHASE_PLANNED = 2, PHASE_LOADED = 3 };

// --- shared calls

static inline int cl_hb_ms(const cluster_t *c) { return c->o.heartbeat_ms > 0 ? c->o.heartbeat_ms : 1000; }

// Counts a worker's step report (a RESULT without a tensor) into the statistics.
void cl_count_report(cluster_t *c, int wi, const msg_result_t *r);

// Waits for a message of type want from worker wi (step reports, failed steps' notices and late
// answers that come first are consumed). 0, or the failure with err naming the worker.
int cl_recv_type(cluster_t *c, int wi, msg_type_t want, msg_t *m, comm_msg_t *raw, char *err, size_t errlen);

// Notes what a worker's ERROR says it lost on the data plane (a failed step's lost_node).
void cl_note_error(cluster_t *c, int wi, const msg_error_t *e);

// Reads the step reports (and errors) waiting on worker wi's link, waiting up to timeout_ms for the
// first. 0, or the code of an ERROR message (its text in errbuf).
int cl_drain_reports(cluster_t *c, int wi, int timeout_ms);

// The coordinator's context for sequence seq (made on first use when it computes). 0 or MLM_E*.
int cl_seq_ctx(cluster_t *c, int seq, model_ctx_t **out);

// One step for each of n_seqs sequences, no recovery (cluster_step.c). 0 or the step's failure.
int cl_eval_once(cluster_t *c, int n_seqs, const int *seq, const int32_t *const *tokens, const int *n,
                 float *const *logits, bool all_logits);

// The same with history kept for replay and, when a worker is lost, recovery (cluster_recover.c).
int cl_eval_seqs(cluster_t *c, int n_seqs, const int *seq, const int32_t *const *tokens, const int *n,
                 float *const *logits, bool all_logits);

// Greets lost workers again; those that answer are taken in at the next plan (cluster_recover.c).
void cl_readmit(cluster_t *c);

#endif
