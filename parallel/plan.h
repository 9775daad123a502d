// Planner: pipeline stages (layer ranges) and tensor-parallel groups inside them: who holds which
// layers, heads, KV heads, FFN units and output rows, and what a layout is predicted to cost.
#ifndef MESHLM_PLAN_H
#define MESHLM_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "worker/format/gguf.h"
#include "parallel/shard.h"

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
    double weight;           // its tensor-parallel weight inside its stage (what split its rows; plan files write it)
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
    int ubatch;                     // prefill micro-batch tokens the cost assumes (0 = PLAN_DEFAULT_UBATCH)
    int n_prompt;                   // prompt tokens the prefill figure assumes (0 = PLAN_DEFAULT_N_PROMPT)
    bool coord_apart;               // the coordinator is none of the offered nodes: its step message and
                                    // the logits travel to and from node 0 too (its link: the best offered)
} plan_t;

// --- model description: shapes and bytes, no weights needed

#define PLAN_MAX_LAYERS 256

// The matrices of a block. Each is cut by output rows: q (n_head*head_dim rows), k and v
// (n_head_kv*head_dim), o = attn_output (n_embd), gate and up (n_ff, per expert), down (n_embd, per expert).
enum { PLAN_W_Q, PLAN_W_K, PLAN_W_V, PLAN_W_O, PLAN_W_GATE, PLAN_W_UP, PLAN_W_DOWN, PLAN_W_MATS };

// What the planner needs to know about a model: its shapes and what each row of each matrix
// weighs. Built from a loaded (mmap'd) model or from a preset and a quant type.
typedef struct {
    char name[64];             // model file name or preset id
    int n_vocab;               // rows of token_embd and output
    int n_embd;                // hidden size
    int n_layer;               // transformer blocks (<= PLAN_MAX_LAYERS)
    int n_head;                // query heads
    int n_head_kv;             // KV heads
    int head_dim;              // floats per head
    int n_ff;                  // FFN units (per expert for MoE)
    int n_expert;              // 0 for dense
    int n_expert_used;         // experts per token (top-k); 0 for dense
    bool tied_output;          // token_embd doubles as the output matrix
    int wtype;                 // dominant weight type (qtype_t), what gflops figures refer to
    uint64_t row_bytes[PLAN_MAX_LAYERS][PLAN_W_MATS]; // (n_layer, PLAN_W_MATS) bytes of one row (one expert's for gate/up/down); 0 = no such tensor
    uint64_t vec_bytes[PLAN_MAX_LAYERS]; // (n_layer) block tensors every member holds whole: norms, router
    uint64_t embd_row_bytes;   // one row of token_embd
    uint64_t out_row_bytes;    // one row of the output matrix (token_embd's when tied)
    uint64_t out_norm_bytes;   // output_norm
    uint64_t weight_bytes;     // every weight of the model
    double bytes_per_weight;   // weight bytes per matrix element (0.5625 for Q4_0)
} plan_model_t;

// Describes the model in an opened GGUF (reads its metadata and tensor table only). 0, or
// MLM_ERANGE when it has more than PLAN_MAX_LAYERS blocks, or hparams_read's errors, with a message.
int plan_model_from_gguf(const gguf_t *g, plan_model_t *pm, char *err, size_t errlen);

// Describes preset `name` (worker/model_presets.h) quantized to `quant` ("Q4_0", "Q8_0", "F16", ...;
// NULL = Q4_0) without any file: every matrix in that type (a row length the type's blocks do not
// divide falls back to Q8_0, then F16), norms F32, untied output. 0, MLM_ENOTFOUND (no such
// preset) or MLM_EINVAL (unknown type), with a message.
int plan_model_from_preset(const char *name, const char *quant, plan_model_t *pm, char *err, size_t errlen);

// --- cost model
//
// Figures a node does not state (0 in plan_node_t) take these defaults:
#define PLAN_GFLOPS_PER_SPEED 20.0  // gflops = 20 * speed (speed <= 0 counts as 1)
#define PLAN_DEFAULT_MEM_BW 20e9    // bytes/s of weight streaming
// Decode streams weights at this fraction of a node's measured read bandwidth (profile_node reads
// a 64 MiB buffer; TinyLlama Q4_0 decode on the test machines: 24.2 GB/s against 33.9 measured).
#define PLAN_MEM_EFFICIENCY 0.72
#define PLAN_DEFAULT_LAT_US 100.0   // one-way link latency
#define PLAN_DEFAULT_LINK_BW 125e6  // bytes/s: 1 Gbit/s
// Prompt processing: a token of a batch costs this many times less than a decoded token (decode is
// bound by reading the weights, a batch reads them once): 239 vs 68.6 tok/s for llama.cpp, 132 vs
// 39.7 for meshlm with 1 thread on the test machines, about 3.5x.
#define PLAN_PREFILL_SPEEDUP 3.5
#define PLAN_DEFAULT_UBATCH 32      // prefill micro-batch tokens
#define PLAN_DEFAULT_N_PROMPT 64    // prompt tokens the prefill figure is for
//
// The model, per generated token:
// - a node computes 2 flops per weight of its slice (only the routed experts for MoE) at its
//   gflops, and streams those weights' bytes at its mem_bw; it takes the larger of the two;
// - a stage takes its slowest member's time plus its group's all-gathers: per block four (attention
//   output, attn_output rows, FFN units per routed expert, ffn_down rows, all F32), and on the first
//   stage one of the token's embedding row. An all-gather costs the largest latency of the group
//   plus, over members, the largest of (bytes it sends, bytes it receives) / its link bandwidth: a
//   switched LAN where each node's own link is the bottleneck. A message between two nodes has the
//   larger of their latencies;
// - a stage hands n_embd F32 to every member of the next stage (from its first member), the last
//   stage sends its vocabulary rows of logits (F32) to the coordinator, and the coordinator's step
//   message to the first stage costs one latency. Offered node 0 is the coordinator's machine,
//   whether or not it computes: these messages use its link, and the part it computes itself
//   does not travel.
// token_ms is the sum over stages (one sequence visits them in turn). Prefill: micro-batches of u
// tokens (plan_t.ubatch) over a prompt of n_prompt tokens take (m + S - 1) times the slowest stage's
// time for u tokens (m = micro-batches, S = stages), each stage taking u decode-token times / PLAN_PREFILL_SPEEDUP per
// micro-batch (at least the time to read its weights once).

// Fills p->cost from the shards' slices and the nodes' figures (defaults above for unknown ones).
void plan_predict(const plan_model_t *pm, plan_t *p);

// --- planning

// Constraints and inputs of a plan search. Zero-initialised means: search everything.
typedef struct {
    int n_ctx;         // positions the KV cache is sized for (0 = 4096)
    int pp;            // pipeline stages (0 = search)
    int tp;            // nodes per stage (0 = search)
    bool keep_all;     // every offered node computes (none left out)
    bool pin_first;    // node 0 (the coordinator) computes and is shard 0 of stage 0
    int ubatch;        // prefill micro-batch tokens (0 = PLAN_DEFAULT_UBATCH)
    bool coord_apart;  // the coordinator computes nothing and is not node 0 (see plan_t.coord_apart)
    int n_prompt;      // prompt tokens for the prefill figure (0 = PLAN_DEFAULT_N_PROMPT)
    bool heuristic;    // use the heuristic search even where every layout would be tried (tests compare them)
} plan_opts_t;

#define PLAN_EXHAUSTIVE_MAX 8  // up to this many offered nodes every layout is tried

// Chooses a layout for pm over the offered nodes: which nodes compute (a node whose inclusion makes
// the predicted token time worse is left out; never node 0 under pin_first), how many pipeline
// stages, which consecutive nodes (in offered order) form each stage, blocks per stage in
// proportion to the stage's throughput and inside every member's budget, and each stage's
// tensor-parallel split by speed. Every layout is tried for n <= PLAN_EXHAUSTIVE_MAX; beyond, a
// heuristic (fastest-first node sets, every stage count, balanced and even stage cuts, then greedy
// removal of nodes). *best gets the smallest token_ms (ties: fewer nodes, then fewer stages) with
// layout, why and cost filled; alts (may be NULL) up to max_alts next-best plans of other layouts,
// best first, *n_alts their count. Returns 0; MLM_EINVAL for bad options (err says which);
// MLM_EFULL when nothing fits, err saying how much memory is missing in all and on the worst node;
// MLM_ENOMEM.
int plan_make(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_opts_t *o, plan_t *best,
              plan_t *alts, int max_alts, int *n_alts, char *err, size_t errlen);

// Splits m over n nodes in proportion to their speed, within their memory budgets, as one
// tensor-parallel group (one stage, shard i = node i); cost predicted. Returns 0, MLM_EINVAL (bad
// n), or MLM_EFULL when the model does not fit: err says which node lacks how much.
int plan_tp(const gguf_t *g, const plan_node_t *nodes, int n, int n_ctx, plan_t *out, char *err, size_t errlen);

// --- hand-written plans
//
// A plan file, version 1 (text, '#' starts a comment, blank lines are ignored):
//   # meshlm plan v1
//   stage layers=0-10 nodes=0,1
//   stage layers=11-21 nodes=2:2,3
// One `stage` line per pipeline stage, in order; `layers=A-B` (inclusive, or `layers=A`) are its
// blocks, `nodes=` the offered node indices of its tensor-parallel group in rank order, each with
// an optional `:W` weight (its share of the stage's rows is W / sum of W; without weights the
// group is split by speed and may shift rows to stay within budgets). A "# meshlm plan vN" comment
// names the version; a newer N is refused.

#define PLAN_FILE_VERSION 1

// A parsed plan file: what the user asked for, before the model and nodes are known.
typedef struct {
    int n_stages;
    int l0[PLAN_MAX_NODES];          // (n_stages) stage k holds blocks [l0[k], l1[k])
    int l1[PLAN_MAX_NODES];
    int line[PLAN_MAX_NODES];        // (n_stages) the file line of each stage, for messages
    int first[PLAN_MAX_NODES + 1];   // stage k's entries are [first[k], first[k+1]); first[n_stages] == n
    int n;                           // entries in all
    int node[PLAN_MAX_NODES];        // (n) offered node index of each entry
    double weight[PLAN_MAX_NODES];   // (n) its tensor-parallel weight; 0 = by speed
} plan_spec_t;

// Parses plan file text. 0, or MLM_EFORMAT (MLM_EUNSUPPORTED for a newer version, MLM_ERANGE for
// too many stages or nodes) with "line N: ..." in err.
int plan_file_parse(const char *text, plan_spec_t *spec, char *err, size_t errlen);

// Reads and parses a plan file; errors name the file ("FILE:N: ..."); MLM_EIO when it cannot be read.
int plan_file_load(const char *path, plan_spec_t *spec, char *err, size_t errlen);

// Builds the plan a spec describes over the offered nodes and predicts its cost. Checks that the
// stages' blocks tile 0..n_layer-1 in order, that every node index is offered and used at most once,
// and that every member fits its budget (explicit weights are kept as given). 0, MLM_EINVAL (bad
// spec: err names the line), MLM_EFULL (err names the node and how much it lacks).
int plan_from_spec(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_spec_t *spec, int n_ctx,
                   plan_t *out, char *err, size_t errlen);

// Writes p in the plan file format; parsing it back and plan_from_spec with the same nodes give
// the same shards. 0 or MLM_EIO.
int plan_file_write(const plan_t *p, FILE *f);

// --- nodes

// Parses a node list "N" (N equal nodes), or comma-separated items "speed[:budget][@LAT_MS/MBIT]"
// such as "2,1,1:512M" or "1:4G@1/1000" (budgets take K/M/G suffixes, powers of 1024; the link is
// its one-way latency in ms and Mbit/s). Returns the node count or a negative MLM_ code.
int plan_parse_nodes(const char *spec, plan_node_t *nodes, int max, char *err, size_t errlen);

// Parses a node file: one node per line, "name key=value ...", keys speed=, gflops=, mem_bw= (bytes/s,
// K/M/G are powers of 1000: 20G), mem= (budget, K/M/G powers of 1024), lat_ms=, lat_us=, mbit=;
// '#' comments. Returns the node count or a negative MLM_ code with "line N: ..." in err.
int plan_parse_nodes_file(const char *text, plan_node_t *nodes, int max, char *err, size_t errlen);

// Parses a byte size with an optional K/M/G/T suffix (powers of 1024); returns 0 or MLM_EINVAL.
int plan_parse_size(const char *s, uint64_t *out);

// --- printing

// Prints the shard table (stage, layers, rows, bytes per shard).
void plan_print(const plan_t *p, const gguf_t *g, FILE *f);
void plan_table(const plan_t *p, const plan_model_t *pm, FILE *f);

// Prints the chosen plan and up to two alternatives: layout, nodes, predicted compute / memory /
// comm ms per token, token_ms, tokens/s, prefill tokens/s and why; then the chosen shard table.
void plan_explain(FILE *f, const plan_model_t *pm, const plan_t *best, const plan_t *alts, int n_alts);

// Writes the chosen plan and the alternatives as one JSON object.
void plan_write_json(FILE *f, const plan_model_t *pm, const plan_t *best, const plan_t *alts, int n_alts);

// Prints a few lines: layout, predicted speed, then per stage its layers and which node holds what
// (heads and weight bytes when the stage is a tensor-parallel group).
void plan_print_brief(const plan_t *p, FILE *f);

// The offered nodes from index `first` on (1 skips a computing coordinator at node 0) that no shard
// names: returns how many, and when there are any writes one line into buf (cap bytes), "the plan
// uses U of N <noun>: NAME left out: <reason>" (the reason from p->why, as --explain gives it).
int plan_left_out(const plan_t *p, int first, const char *noun, char *buf, size_t cap);

#endif
