// Planner: pipeline stages (layer ranges) and tensor-parallel groups inside them: who holds which
// layers, heads, KV heads, FFN units and output rows, and what a layout is predicted to cost.
#ifndef MESHLM_PLAN_H
#define MESHLM_PLAN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "worker/model.h"
#include "worker/shard.h"

#define PLAN_MAX_NODES 64

// What the planner knows about a node. Unknown figures are 0 and the planner assumes defaults.
typedef struct {
    char name[64];           // label (address or "local-3")
    double speed;            // relative compute speed (any unit; only ratios matter); <= 0 means 1
    uint64_t mem_budget;     // bytes the node may use for weights + KV cache; 0 = unlimited
    double gflops;           // measured matmul GFLOP/s with the model's weight type (0 = unknown)
    double mem_bw;           // measured memory read bandwidth, bytes/s (0 = unknown)
    double lat_us;           // one-way latency of its link to the cluster, microseconds (0 = unknown)
    double link_bw;          // bandwidth of that link, bytes/s (0 = unknown)
} plan_node_t;

// One computing node's share. Every matrix is split by output rows, so each dot product runs whole
// on one node in the same order as on a single node, and pipeline stages hand over the residual
// stream unchanged: any layout gives the single-node bits.
typedef struct {
    shard_slice_t s;         // its layers and rows (KV heads replicated when nodes outnumber them)
    int node;                // which offered node (index into plan_t.node)
    int stage;               // its pipeline stage
    uint64_t weight_bytes;   // bytes of its weight slices
    uint64_t kv_bytes;       // its KV cache for n_ctx positions (F16)
    uint64_t peak_bytes;     // expected peak: weights + KV + activations
} plan_shard_t;

// Predicted cost of a plan, per generated token (decode) unless said otherwise.
typedef struct {
    double compute_ms;       // matmul time: per stage the slowest member, summed over stages
    double memory_ms;        // weight streaming time at each node's memory bandwidth (same sum)
    double comm_ms;          // tensor-parallel exchanges + stage hand-offs + logits to the coordinator
    double token_ms;         // predicted time per token: per stage max(compute, memory) + comm
    double prefill_tok_s;    // predicted prompt tokens/s with micro-batches in flight
} plan_cost_t;

typedef struct {
    int n;                          // computing nodes (shards), in rank order: stage by stage
    int n_stages;                   // pipeline stages (1 = pure tensor parallelism)
    int stage_first[PLAN_MAX_NODES + 1]; // shard index where stage k starts; stage_first[n_stages] == n
    int n_ctx;                      // positions the plan was sized for
    int n_nodes;                    // nodes offered (node[]); the ones no shard names are left out
    plan_shard_t shard[PLAN_MAX_NODES];
    plan_node_t node[PLAN_MAX_NODES];
    plan_cost_t cost;               // filled by the planner (zero when not predicted)
    char layout[48];                // "tp4", "pp2", "pp2 x tp2", ...
    char why[256];                  // one line: why this plan (or why nodes were left out)
} plan_t;

// Splits m over n nodes in proportion to their speed, within their memory budgets, as one
// tensor-parallel group (one stage, shard i = node i). Returns 0, MLM_EINVAL (bad n), or
// MLM_EFULL when the model does not fit: err says which node lacks how much.
int plan_tp(const model_t *m, const plan_node_t *nodes, int n, int n_ctx, plan_t *out, char *err, size_t errlen);

// Parses a node list "N" (N equal nodes), or comma-separated "speed[:budget]" items such as
// "2,1,1:512M" (budgets take K/M/G suffixes). Returns the node count or a negative MLM_ code.
int plan_parse_nodes(const char *spec, plan_node_t *nodes, int max, char *err, size_t errlen);

// Parses a byte size with an optional K/M/G/T suffix (powers of 1024); returns 0 or MLM_EINVAL.
int plan_parse_size(const char *s, uint64_t *out);

// Prints the shard table.
void plan_print(const plan_t *p, const model_t *m, FILE *f);

#endif
