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
#define PLAN_REBALANCE_ROUNDS 2    // rounds moving a streaming split toward equal predicted times

// A node's figures with the defaults of plan.h filled in.
double plan_node_gflops(const plan_node_t *nd);
double plan_node_mem_bw(const plan_node_t *nd);   // bytes/s
double plan_node_lat_us(const plan_node_t *nd);
double plan_node_link_bw(const plan_node_t *nd);  // bytes/s
double plan_node_disk_bw(const plan_node_t *nd);  // bytes/s the disk reads sequentially (not yet derated)
// How much slower node nd computes when the nodes of shards [a, b) of p with busy[j - a] set (all of
// them when busy is NULL) compute at the same time: r = their threads on nd's machine (cpu_id) over
// its cores, at least 1, and past 1 the time-sharing's loss on top (PLAN_OVERSUB_LOSS).
double plan_cpu_share(const plan_t *p, int a, int b, const bool *busy, const plan_node_t *nd);
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
    uint64_t need;           // sum of the members' peaks (streaming: their minimum budgets)
    uint64_t have;           // sum of their budgets (a member without one counts its peak)
    uint64_t worst_short;    // the largest peak - budget of one member
    int worst_node;          // that member's offered index (-1: none)
    bool stream;             // the members were sized streaming: peaks are the smallest budgets that stream
    uint64_t dev_short;      // the largest kv_dev_bytes - kv_cap of one member (its KV device too small)
    int dev_node;            // that member's offered index (-1: none)
} plan_short_t;

void plan_short_add(plan_short_t *sh, const plan_t *p, int a, int b);

// plan_fit_stage flags.
#define PLAN_FIT_ADJUST 1u   // members over their budget give rows to the others
#define PLAN_FIT_STREAM 2u   // when the stage cannot fit resident, its members stream
#define PLAN_FIT_BALANCE 4u  // with ADJUST and STREAM: rebalance a streaming split by predicted times

// Splits the rows of blocks [l0, l1) over the stage members p->shard[a..b) (their node and stage
// already set) in p->tp_mode by weights w (b - a of them, > 0), and fills slices, weights, bytes and
// windows. With ADJUST, members over their budget give rows to the others until all fit resident.
// When that fails and STREAM is set, the members stream (plan_window); with ADJUST, members below
// their minimum give rows away, and with BALANCE the split is then moved toward equal predicted
// member times, disk reads included. 0, or MLM_EFULL (sh, when not NULL, gets the missing amounts
// of the last attempt).
int plan_fit_stage(const plan_model_t *pm, plan_t *p, int a, int b, int l0, int l1, const double *w, unsigned flags,
                   plan_short_t *sh);

// --- streaming and slices (plan_stream.c)

// Sizes shard s (cut by mode) by plan_window's rule within budget (0: resident), also giving its
// weight and KV cache bytes and, in kv_fixed, the part of the KV counted in its fixed bytes on node nd
// (NULL: a host node, all of it). 0, MLM_ERANGE (below the minimum) or MLM_EINVAL.
int plan_size_share(const plan_model_t *pm, const shard_slice_t *s, int mode, int n_ctx, const plan_node_t *nd,
                    uint64_t budget, plan_stream_t *st, uint64_t *weights, uint64_t *kv, uint64_t *kv_fixed);

// Places a sized shard's KV on its node nd: kv_ram_bytes and kv_dev_bytes from its kv_bytes and the
// kv_fixed bytes plan_size_share counted; a file device without a fixed share also gets what the budget
// leaves above the shard's peak (added to peak_bytes and st.peak_bytes). False when the device part is
// over the node's kv_cap.
bool plan_kv_place(const plan_node_t *nd, plan_shard_t *s, uint64_t kv_fixed);

// Fills p->shard[i]'s bytes and window from its slice, by p's mode and n_ctx, within its node's
// budget when stream is set (resident otherwise). True when it fits its budget.
bool plan_size_shard(const plan_model_t *pm, plan_t *p, int i, bool stream);

// Split steps of heads and FFN units in a mode: 1 and PLAN_FFN_GRAIN in exact mode; in all-reduce
// mode whole quant blocks of attn_output's and ffn_down's columns.
void plan_mode_grains(const plan_model_t *pm, int mode, int *grain_heads, int *grain_ffn);

// A rate with an optional K/M/G/T suffix in powers of 1000 ("950M" = 950e6), optional "B" or "B/s".
bool plan_parse_rate(const char *s, double *out);

// --- cost helpers

// ms of an all-reduce of `bytes` per member over p->shard[a..b): star or ring by comm_choose_algo's
// rule with the group's largest latency and smallest link bandwidth; *star says which (may be NULL).
double plan_allreduce_ms(const plan_t *p, int a, int b, double bytes, bool *star);

// Decode ms of member i of stage [a, b) on its own: compute or memory with its disk reads (a
// shared disk's other streaming members of [a, b) counted), without exchanges.
double plan_member_ms(const plan_model_t *pm, const plan_t *p, int a, int b, int i);

// A member's decode time as a function of how much it holds, x (its share of a stage's rows, or
// its stage's blocks), by plan_window's rule with its bytes and compute scaled linearly in x from a
// reference slice: used to balance streaming members and stages before sizing them exactly.
typedef struct {
    double c;                // compute-or-memory ms per unit of x
    double units;            // bytes of its units per unit of x
    double kv;               // KV cache bytes per unit of x
    double embd;             // token_embd row bytes per unit of x (resident when everything fits)
    double unit0, unit1;     // its largest unit: unit0 + unit1 * x bytes
    double fixed;            // activations and output norm, bytes
    double budget;           // bytes (0 = unlimited)
    double disk;             // disk bytes per ms it reads at
} plan_scale_t;

// The model of member i of p (its stage starts at shard a) scaled from its own slice (by_blocks: x
// counts blocks) or, by share, from the whole stage's rows.
void plan_scale_of(const plan_model_t *pm, const plan_t *p, int a, int i, bool by_blocks, plan_scale_t *m);

// The largest x in [0, hi] whose predicted time is at most t ms (0 when none).
double plan_scale_max(const plan_scale_t *m, double t, double hi);

// Predicts p's layout in the other tensor-parallel mode too (same nodes, stages and blocks; the
// stages re-split in that mode) and sets cost.exact_ms and cost.allreduce_ms (0 for a mode that
// does not fit). A plan without a tensor-parallel group gets its token_ms in both.
void plan_predict_modes(const plan_model_t *pm, plan_t *p);

// Names p's layout from its stage sizes: "tp4", "pp2", "pp2xtp2", "pp3 (2+1+1)".
void plan_layout_name(plan_t *p);

void plan_fmt_bytes(char *buf, size_t cap, uint64_t b);

// A share's weights column: "cache 2 of 8" (experts per block), "pool of 23" (expert slots its blocks
// share), "2 (1/33 units)" (the window: buffers, pinned of all units) or "- (resident)".
void plan_fmt_weights(char *buf, size_t cap, const plan_shard_t *s);

// "the model does not fit ..." from a shortfall.
void plan_short_message(char *err, size_t errlen, const plan_short_t *sh, const plan_node_t *nodes, const char *where);

#endif
