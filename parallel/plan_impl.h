// Planner internals shared by plan.c, plan_model.c, plan_search.c and plan_file.c (not a public interface).
#ifndef MESHLM_PLAN_IMPL_H
#define MESHLM_PLAN_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "parallel/plan.h"

#define PLAN_HIDDEN_GRAIN 16  // hidden rows of attn_output / ffn_down per split step
#define PLAN_FFN_GRAIN 16     // FFN units per split step (the packed kernels work on 16-row groups)
#define PLAN_VOCAB_GRAIN 16   // output rows per split step
#define PLAN_ACT_BATCH 64     // tokens the activation buffers are sized for (model_ctx's n_batch)

// A node's figures with the defaults of plan.h filled in.
double plan_node_gflops(const plan_node_t *nd);
double plan_node_mem_bw(const plan_node_t *nd);   // bytes/s
double plan_node_lat_us(const plan_node_t *nd);
double plan_node_link_bw(const plan_node_t *nd);  // bytes/s
// Decode throughput in matrix elements per second: the slower of its compute and its memory.
double plan_node_rate(const plan_model_t *pm, const plan_node_t *nd);

// Water-filling: out[i] = min(cap[i], lambda * w[i]) with the out[] (n of them) summing to total.
// Returns false (and the caps scaled to sum to total) when the caps sum to less; *bound says
// whether any cap was reached.
bool plan_waterfill(double total, const double *w, const double *cap, int n, double *out, bool *bound);

// Splits units (in grains of `grain`, the last grain may be short) over n nodes in proportion to
// w[i], largest remainder first (lowest index on ties); writes [lo[i], hi[i]).
void plan_split_units(int units, int grain, const double *w, int n, int *lo, int *hi);

// What was missing when a layout did not fit: summed over the members tried.
typedef struct {
    uint64_t need;           // sum of the members' peaks
    uint64_t have;           // sum of their budgets (a member without one counts its peak)
    uint64_t worst_short;    // the largest peak - budget of one member
    int worst_node;          // that member's offered index (-1: none)
} plan_short_t;

void plan_short_add(plan_short_t *sh, const plan_t *p, int a, int b);

// Splits the rows of blocks [l0, l1) over the stage members p->shard[a..b) (their node and stage
// already set) by weights w (b - a of them, > 0), and fills slices, weights and bytes. With adjust,
// members over their budget give rows to the others until all fit. 0, or MLM_EFULL (sh, when not
// NULL, gets the missing amounts of the last attempt).
int plan_fit_stage(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *w, bool adjust,
                   plan_short_t *sh);

// Names p's layout from its stage sizes: "tp4", "pp2", "pp2xtp2", "pp3 (2+1+1)".
void plan_layout_name(plan_t *p);

void plan_fmt_bytes(char *buf, size_t cap, uint64_t b);

// "the model does not fit ..." from a shortfall.
void plan_short_message(char *err, size_t errlen, const plan_short_t *sh, const plan_node_t *nodes, const char *where);

#endif
