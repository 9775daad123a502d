// Tensor-parallel partition planner: who holds which heads, KV heads, FFN units and output rows.
#ifndef MESHLM_PLAN_H
#define MESHLM_PLAN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "worker/model.h"
#include "worker/shard.h"

#define PLAN_MAX_NODES 64

// What the planner knows about a node.
typedef struct {
    char name[64];           // label (address or "local-3")
    double speed;            // relative compute speed (any unit; only ratios matter); <= 0 means 1
    uint64_t mem_budget;     // bytes the node may use for weights + KV cache; 0 = unlimited
} plan_node_t;

// One node's share. Every matrix is split by output rows, so each dot product runs whole on one
// node in the same order as on a single node: any layout gives the single-node bits.
typedef struct {
    shard_slice_t s;         // its rows (KV heads replicated when nodes outnumber them)
    uint64_t weight_bytes;   // bytes of its weight slices
    uint64_t kv_bytes;       // its KV cache for n_ctx positions (F16)
    uint64_t peak_bytes;     // expected peak: weights + KV + activations
} plan_shard_t;

typedef struct {
    int n;                          // nodes
    int n_ctx;                      // positions the plan was sized for
    plan_shard_t shard[PLAN_MAX_NODES];
    plan_node_t node[PLAN_MAX_NODES];
} plan_t;

// Splits m over n nodes in proportion to their speed, within their memory budgets. Returns 0,
// MLM_EINVAL (bad n), or MLM_EFULL when the model does not fit: err says which node lacks how much.
int plan_tp(const model_t *m, const plan_node_t *nodes, int n, int n_ctx, plan_t *out, char *err, size_t errlen);

// Parses a node list "N" (N equal nodes), or comma-separated "speed[:budget]" items such as
// "2,1,1:512M" (budgets take K/M/G suffixes). Returns the node count or a negative MLM_ code.
int plan_parse_nodes(const char *spec, plan_node_t *nodes, int max, char *err, size_t errlen);

// Parses a byte size with an optional K/M/G/T suffix (powers of 1024); returns 0 or MLM_EINVAL.
int plan_parse_size(const char *s, uint64_t *out);

// Prints the shard table.
void plan_print(const plan_t *p, const model_t *m, FILE *f);

#endif
