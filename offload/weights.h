// Weight providers: the forward pass asks for a unit of weights (a block's dense part, one expert
// of a block, the input embedding, the output head) just before it uses it and releases it right
// after. A provider decides where the bytes live: "mmap" (the reference) binds every unit at
// creation from the mapped GGUF and hands out pointers; later providers stream blocks from disk
// through a sliding window under a memory budget ("window", offload/weights_window.c) or cache
// experts, behind the same calls.
#ifndef MESHLM_OFFLOAD_WEIGHTS_H
#define MESHLM_OFFLOAD_WEIGHTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "parallel/plan.h"
#include "parallel/shard.h"
#include "worker/format/gguf.h"
#include "worker/format/hparams.h"
#include "worker/kernels/kernels.h"
#include "worker/kernels/matmul.h"

// --- units

// Layer ids besides the blocks [0, n_layer): the global units.
enum {
    WEIGHTS_IN = -1,   // the token embedding (the first pipeline stage holds it)
    WEIGHTS_OUT = -2,  // the output norm and output matrix (the last stage holds them)
};
// Expert id of a block's dense part (attention, norms, router, a dense model's FFN); also the only
// expert id of WEIGHTS_IN and WEIGHTS_OUT.
#define WEIGHTS_DENSE (-1)

// Rows [r0, r1) of a tensor used by lookup (not by a matrix product), in the file's encoding.
typedef struct {
    qtype_t type;          // element type
    int64_t cols;          // elements per row
    size_t row_bytes;      // bytes per row
    int64_t r0, r1;        // the rows held, as row ids of the whole tensor
    const uint8_t *data;   // (r1 - r0, row_bytes): row r starts at data + (r - r0) * row_bytes
} weights_rows_t;

// The weights of one unit, ready for the matmul kernels (repacked when the provider was asked to)
// and cut to the node's slice (matrices hold only its rows; a matrix of which it holds no row is
// zeroed: rows == 0). Which fields are set depends on the unit; the rest are zero / NULL.
typedef struct layer_weights {
    // -- block l, WEIGHTS_DENSE
    const float *attn_norm;    // (n_embd)
    mm_weight_t wq;            // (heads h0..h1 rows of head_dim, n_embd cols)
    mm_weight_t wk;            // (KV heads kv0..kv1, n_embd)
    mm_weight_t wv;            // (KV heads kv0..kv1, n_embd)
    mm_weight_t wo;            // (hidden rows e0..e1, n_head*head_dim)
    const float *ffn_norm;     // (n_embd)
    mm_weight_t gate_inp;      // MoE router (n_expert, n_embd); zero in a dense model
    qtype_t e_type;            // MoE: element type of the expert matrices in the file
    const float *rope_freqs;   // (n_rot/2) RoPE frequency factors, or NULL (the same for every block)
    // -- the FFN: a dense model's block (WEIGHTS_DENSE), or one expert of a MoE block (expert >= 0,
    //    which sets only these three)
    mm_weight_t w_gate;        // (FFN units f0..f1, n_embd)
    mm_weight_t w_up;          // (FFN units f0..f1, n_embd)
    mm_weight_t w_down;        // (hidden rows e0..e1, n_ff)
    // -- WEIGHTS_IN
    weights_rows_t tok_embd;   // vocabulary rows v0..v1 of token_embd, n_embd cols, any type
    // -- WEIGHTS_OUT
    const float *out_norm;     // (n_embd)
    mm_weight_t output;        // (vocabulary rows v0..v1, n_embd)
} layer_weights_t;

// Counters since creation. The wrapper counts calls the same way for every provider; the rest is
// what a provider that moves bytes measures, and stays zero for one that does not (mmap).
typedef struct {
    uint64_t acquires;         // acquire calls that succeeded
    uint64_t releases;         // release calls with a valid unit id
    uint64_t prefetches;       // prefetch hints received (valid or not; a hint may be ignored)
    uint64_t hits;             // acquires served from memory without reading (caching providers)
    uint64_t misses;           // acquires that had to read the unit first
    uint64_t prefetch_used;    // units read on a hint that were acquired before being dropped
    uint64_t prefetch_wasted;  // units read on a hint and dropped unused
    uint64_t evictions;        // units dropped from memory to make room
    uint64_t bytes_read;       // bytes read from storage by the provider itself
    double stall_ms;           // time acquire spent waiting for bytes
    uint64_t bytes_held;       // weight bytes behind the units held in memory now (mmap: all the
                               // slice's rows, mapped or repacked)
    uint64_t bytes_peak;       // the most bytes_held has been
    double read_ms;            // time the provider's reads took (a background reader's included), so
                               // 1 - stall_ms / read_ms is the share of reading hidden behind compute
    uint64_t units_read;       // units read from storage (each read of a streamed unit counts)
                               // ("window" counts the units passing through its window in bytes_read,
                               // read_ms and units_read, not the one-time load of its pinned units)
    uint64_t expert_hits;      // the hits that were MoE experts (a caching provider's hit rate is
    uint64_t expert_misses;    // expert_hits / (expert_hits + expert_misses): dense parts always hit)
    uint64_t prefetch_reads;   // units read on a speculative guess ("experts": the next block's router
                               // applied to the current hidden state); prefetch_used of them were used
    uint64_t guesses_paused;   // blocks whose next block was not guessed because reading was the bottleneck
                               // ("experts" with prefetch=auto)
    uint64_t bytes_reused;     // weight bytes taken at creation from the provider given as
                               // weights_params_t.reuse instead of being read and repacked ("mmap")
} weights_stats_t;

// What a provider is made from.
typedef struct {
    const gguf_t *g;              // the opened file (borrowed for the provider's life)
    const model_hparams_t *hp;    // its shapes (copied)
    const shard_slice_t *slice;   // the rows to provide (checked against hp by the caller; copied)
    bool shard_file;              // g holds only those rows (a shard file), not the whole model
    const gguf_t *cols_g;         // all-reduce slice of a whole model file: a columns file of the slice
                                  // (shard_file_write_cols) that "window" streams the column-cut matrices
                                  // from, contiguous, while the rest comes from g; NULL = none (borrowed)
    const kernels_t *kern;        // kernels the weights are prepared for (NULL = kernels_best())
    bool repack;                  // allow kernels to repack weights into a faster layout ("window" computes
                                  // on the file's layout and ignores it: see weights_window.c)
    uint64_t budget_bytes;        // the node's memory budget: weights + KV cache of n_ctx positions +
                                  // activations, as plan_window (parallel/plan.h) counts them; 0 = none.
                                  // Sizes "window"; "mmap" ignores it
    int n_ctx;                    // KV positions the budget also holds (the contexts' n_ctx)
    const uint64_t *experts;      // (4) placed experts: bit e set = this node computes expert e, and only those
                                  // are prepared ("mmap"; acquiring another is MLM_ENOTFOUND; "window"
                                  // refuses a mask); NULL = every expert (copied)
    const uint32_t *block_experts; // with experts: (layer << 8 | expert) also prepared, in that block only
    int n_block_experts;           // (hot second copies; borrowed for weights_new)
    bool experts_only;            // with experts: the node computes its experts and nothing else (a member
                                  // of an expert-parallel group with attention on its leader): the other
                                  // matrices are mapped, never repacked or copied, so they cost no memory
    struct weights *reuse;        // optional: the provider of an earlier share of the same model (the same
                                  // tensor bytes); "mmap" takes the repacked rows this share has in common
                                  // with it instead of reading and repacking them (a matrix with the very
                                  // same rows is moved: reuse then computes it from the file's rows, slower
                                  // but still right). Borrowed for weights_new; free it after. NULL = none
} weights_params_t;

typedef struct weights weights_t;

// --- registry

// Makes the provider called name ("mmap", "window", "experts": offload/experts.h). Text after a ':' in name is the provider's
// argument ("window:w=2,io=pread"). NULL or "" chooses by the budget (weights_choose): "mmap" when
// there is none or the share fits it resident, "experts" (as many per block as the budget holds) for a
// MoE share whose experts do not fit but one of each block does, "window" when it streams otherwise,
// and a refusal when even one unit does not fit. Checks every tensor the slice needs. 0, or a negative MLM_ code with a message
// in err (MLM_ENOTFOUND: no provider of that name; MLM_ERANGE: the budget is below the minimum).
int weights_new(weights_t **out, const char *name, const weights_params_t *p, char *err, size_t errlen);

// How the node's share holds within p->budget_bytes by plan_window's rule (its slice's cuts: exact, or
// all-reduce when slice->cols), into *st (may be NULL). 0; MLM_ERANGE when the budget is below the minimum, with err saying
// "--mem-budget B is below the M this node needs: one block of U, KV cache K (N positions),
// activations A"; or plan_model_from_gguf's errors.
int weights_plan(const weights_params_t *p, plan_stream_t *st, char *err, size_t errlen);

// The provider weights_new picks for name NULL: "mmap", "experts" or "window" (see weights_new; placed
// experts: "mmap", or "experts" when they do not fit), or a refusal as weights_plan's.
int weights_choose(const weights_params_t *p, const char **name, char *err, size_t errlen);

// Whether the share streams under p->budget_bytes while cut by columns (all-reduce mode) from a whole
// model file, whose column slices lie apart: "window" reads them from a columns file of the slice
// (shard_file_write_cols, given as p->cols_g) or reads the whole share from a shard file of the slice
// (shard_file_write), which the caller writes first. 0 with *need set, or weights_plan's refusal.
int weights_need_shard_file(const weights_params_t *p, bool *need, char *err, size_t errlen);

// Frees the provider (every unit must have been released); accepts NULL and NULLs the pointer.
void weights_free(weights_t **self_p);

// Names of the registered providers, space-separated (for --help).
const char *weights_names(void);

// The provider's name as registered ("mmap").
const char *weights_name(const weights_t *w);

// One line into buf (cap bytes) on how the provider holds the weights: its name, or for "window"
// "window: 1 of 65 units pinned, 2 x 0.7 MiB buffers, io=direct".
void weights_describe(const weights_t *w, char *buf, size_t cap);

// --- use (from any thread: every context of a model shares its provider)

// Hands out unit (layer, expert) until the matching release: layer in [0, n_layer) with expert
// WEIGHTS_DENSE or an expert id in [0, n_expert), or WEIGHTS_IN / WEIGHTS_OUT with WEIGHTS_DENSE.
// May block while the unit is read. Returns 0 (*out set), MLM_EINVAL for an id the model does not
// have (or out NULL), MLM_ERANGE for a unit outside the provider's slice (a block outside [l0, l1),
// IN off the first stage, OUT off the last), or the provider's error (MLM_EIO, MLM_ENOMEM, ...).
// A unit may be acquired again before it is released (each acquire needs its release).
int weights_acquire(weights_t *w, int layer, int expert, const layer_weights_t **out);

// Gives a unit back: its pointer must not be used after. Ids that acquire refuses are ignored.
void weights_release(weights_t *w, int layer, int expert);

// A hint that units will be acquired soon, in this order: the dense part of layer when n == 0,
// else experts[0..n) of it. May start reads, may do nothing; never fails, ignores bad ids.
void weights_prefetch(weights_t *w, int layer, const int *experts, int n);

// The residual stream x (n rows of n_embd floats) entering block layer's FFN, for a provider that
// guesses the next block's experts from it (copied before return; never blocks on I/O, never fails;
// ignored by providers that do not guess, and for ids acquire refuses).
void weights_observe(weights_t *w, int layer, const float *x, int n);

// The bound matrix of tensor `name` (plane `plane` of a 3-D expert tensor, else 0), for building a
// later share from this one (weights_params_t.reuse): NULL when the provider holds none of it or
// keeps no bound matrices (only "mmap" does). *r0 receives the tensor row its row 0 is, *c0 and *c1
// the columns it holds. Borrowed until weights_free; a caller may take its repacked copy (move it
// out and leave the plain rows), nothing else.
mm_weight_t *weights_matrix(weights_t *w, const char *name, int plane, int64_t *r0, int64_t *c0, int64_t *c1);

// Counters (see weights_stats_t).
void weights_stats(const weights_t *w, weights_stats_t *out);

// One line into buf (cap bytes) on what a provider that reads has read: "8201.4 MB read in 323 units
// (845 MB/s while reading), waited 5793 ms (40% of reading hidden behind compute)"; "" when it has read
// nothing (mmap). Returns the length written.
int weights_read_summary(const weights_t *w, char *buf, size_t cap);

#endif
