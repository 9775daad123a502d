// Pipeline execution: one rank's part of a step through stages of tensor-parallel groups.
#ifndef MESHLM_PIPELINE_H
#define MESHLM_PIPELINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"
#include "transport/comm_shm.h"
#include "worker/model/model.h"
#include "parallel/shard.h"
#include "proto/msg.h"

// The ranks of a plan, as the data plane numbers them: rank r holds slices[r]. A stage is a run
// of consecutive ranks with the same block range; its ranks form a tensor-parallel group. Rank 0
// is the coordinator: it either belongs to the first stage or holds an empty slice (l0 == l1) and
// computes nothing. Stage k's first rank (its leader) hands the residual stream of every
// micro-batch to every rank of stage k + 1; the last stage sends its logit rows to rank 0.
//
// Message order per pair of ranks (the data plane keeps each pair's messages in order): inside a
// group the all-gathers (and, in all-reduce mode, the all-reduces) of the forward pass; leader ->
// next stage: one hidden block per micro-batch (nt * n_embd F32); last stage -> rank 0: the logit
// rows of every micro-batch that asks for logits. Nothing else travels, so no tags are needed.
#define PIPE_MAX_RANKS 64

typedef struct {
    comm_t *comm;               // the plan's data plane (borrowed)
    int timeout_ms;             // deadline of each exchange
    int rank, n_ranks;
    int n_stages;
    int stage;                  // this rank's stage, -1 when it computes nothing
    int first, n;               // its group: ranks [first, first + n)
    int prev_leader;            // where its input comes from (-1: it reads tokens)
    int next_first, next_n;     // the next stage's ranks (next_n == 0: this is the last stage)
    int last_first, last_n;     // the last stage's ranks (whose logit rows go to rank 0)
    int n_embd, n_vocab;
    const shard_slice_t *slices; // (n_ranks) borrowed for the life of the struct
    model_tp_t tp;              // this rank's tensor-parallel group, for model_ctx_new
    float *hin, *hout;          // (ubatch, n_embd) hand-off buffers
    size_t hcap;                // floats in each
    uint8_t *lbuf;              // landing buffer for logit rows (pipe_recv_logits)
    size_t lcap;
    // counters, accumulated until pipe_stats_reset
    double busy_ms;             // computing (model time minus its exchanges)
    double wait_ms;             // waiting for input from the stage before
    double gather_ms;           // in tensor-parallel exchanges, all-reduces included (transfer + waiting
                                // for the group)
    uint64_t gather_bytes;      // bytes the group's members sent each other (counted here for all)
    uint64_t gathers;           // all-gather rounds
    uint64_t allreduces;        // all-reduces (all-reduce mode: 2 per block and chunk)
    uint64_t allreduces_ring;   // of which ran the ring algorithm (the rest: star)
    uint64_t handoff_bytes;     // hidden-state bytes this rank sent to the next stage
    // expert parallelism (pipe_set_experts): every stage is an expert-parallel group
    bool ep;                    // the plan places experts whole
    uint8_t *ep_owner;          // (n_layer, n_expert) member of this rank's group computing each expert (owned)
    uint64_t *ep_holders;       // (n_layer, n_expert) with replicas: every member holding it (owned), else NULL
    model_ep_t ep_group;        // this rank's expert-parallel group, for model_ctx_new (n_nodes 1 otherwise)
    // same host (pipe_set_shm): the group's all-gathers and all-reduces through shared memory
    comm_shm_t *shm;            // the group's segment (owned), NULL when the group keeps to comm
    uint64_t shm_collectives;   // all-gathers and all-reduces that went through it
} pipe_node_t;

// Works out the stages from every rank's slice (they must tile the model's blocks in rank order)
// and this rank's place. 0 or MLM_EINVAL with the reason in err.
int pipe_node_init(pipe_node_t *p, comm_t *comm, int rank, const shard_slice_t *slices, int n_ranks, int n_layer,
                   int n_embd, int n_vocab, int timeout_ms, char *err, size_t errlen);
void pipe_node_free(pipe_node_t *p);

// Switches the plan to placed experts as the PLAN's nodes (n_ranks of them) place them: rank r computes
// nodes[r].experts in every block of its stage and each (layer << 8 | expert) of nodes[r].block_experts
// in that block alone (a hot expert's second copy). Each stage becomes an expert-parallel group (model_ep_t)
// over its ranks: p->tp turns into a group of one (every rank holds every row of its blocks) and
// p->ep_group describes the experts, exchanged with comm_alltoallv and gathered among the stage's
// ranks; only a stage's first rank sends logit rows (whole) to rank 0. With lead, attention runs on
// each stage's first rank alone (model_ep_t.lead; the others compute experts only) and the expert
// rows go point to point between it and each member; an expert may then have several holders
// (replicas, second copies: the leader gives each batch to one of them). Every slice must hold every
// row. 0, or MLM_EINVAL when an expert of a block of this rank's stage has no owner, or two without lead
// (err says which).
int pipe_set_experts(pipe_node_t *p, const msg_plan_node_t *nodes, int n_layer, int n_expert, bool lead, char *err,
                     size_t errlen);

// The links of the plan's ranks (lat_us: one-way latency in microseconds, bw: bytes/s, n_ranks
// entries each, 0 = unknown): this rank's group takes its largest latency and smallest bandwidth as
// the data plane's link figures (comm_set_link), from which each all-reduce chooses star or ring
// (comm_choose_algo_n) alike on every member; the planner predicts with the same rule. Nothing
// changes when the group's figures are all unknown (the comm's defaults).
void pipe_set_links(pipe_node_t *p, const double *lat_us, const double *bw);
void pipe_stats_reset(pipe_node_t *p);

// Moves this rank's group's all-gathers and all-reduces into a shared segment when the group runs
// on one host: every member's data endpoint (endpoints: n_ranks, the plan's) is ipc://. Then it is a
// collective of the group (comm_shm_open), made by every member right after pipe_node_init (and
// pipe_set_experts); a member declines, and the whole group keeps to the comm, when its data plane is
// not plain ZeroMQ (emulated links wrap it) or $MESHLM_SHM is "off". A collective whose blocks
// exceed a slot (large prefill batches) still goes over the comm, alike on every member. 0, or the
// handshake's error (a member lost or late) with err filled.
int pipe_set_shm(pipe_node_t *p, const char *const *endpoints, char *err, size_t errlen);

// Whether shared memory may be used at all ($MESHLM_SHM is not "off" or "0"); the planner's shm_id.
bool pipe_shm_allowed(void);

// Micro-batch size used for a step of n tokens: ubatch (0 = all of them) capped at n.
int pipe_ubatch(int n, int ubatch);

// Runs this rank's share of a step: n tokens at the context's next positions, in micro-batches of
// `ubatch` (so each stage works on micro-batch j while the next works on j - 1). logits follows
// model_eval (NULL = none, all_logits = every row) and is written only where the rows land: on
// rank 0 when it is in the last stage. A rank that computes nothing returns 0 at once.
// 0 or the first error (MLM_EPEER / MLM_ETIMEOUT from a lost peer, MLM_EPROTO for a block of the
// wrong size).
int pipe_node_step(pipe_node_t *p, model_ctx_t *ctx, const int32_t *tokens, int n, int ubatch, float *logits,
                   bool all_logits);

// Whether the logit rows of a step land in this rank through pipe_node_step (rank 0 in the last
// stage) rather than through pipe_recv_logits.
bool pipe_lands_logits(const pipe_node_t *p);

// Rank 0 outside the last stage: receives the logit rows of a step the last stage computed
// (micro-batches as in pipe_node_step) into logits (n_vocab floats per row).
int pipe_recv_logits(pipe_node_t *p, int n, int ubatch, float *logits, bool all_logits);

#endif
