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
#define PLAN_EP_HOT_MAX 16 // hot experts per block with a second copy (--ep-hot N)
#define PLAN_MAX_LAYERS 256

// Where a node keeps its KV cache: its attention/KV device (offload/attn.h) by kind, for the budget.
typedef enum {
    PLAN_KV_HOST = 0,        // in its RAM: the whole KV counts against its budget
    PLAN_KV_FILE = 1,        // paged: RAM up to its share (kv_ram, or what its budget leaves once its weights
                             // and activations are counted), the rest in a file on its disk (against kv_cap)
    PLAN_KV_STORAGE = 2,     // in a kvstore process: none in its RAM, all of it against kv_cap
    PLAN_KV_PIM = 3,         // in a PIM part: none in its RAM, all of it against the part's capacity (kv_cap)
} plan_kv_dev_t;

// "host", "file", "storage", "pim" ("?" for another value).
const char *plan_kv_dev_name(int kind);

// The kind of a --kv-device string: its name before ':' ("file:/var/kv,ram=1G" is PLAN_KV_FILE; NULL or
// "" is PLAN_KV_HOST), or -1 when it names no kind the planner knows.
int plan_kv_dev_kind(const char *dev);

// What the planner knows about a node. Unknown figures are 0 and the planner assumes defaults.
typedef struct {
    char name[64];           // label (address or "local-3")
    double speed;            // relative compute speed (any unit; only ratios matter); <= 0 means 1
    uint64_t mem_budget;     // bytes the node may use for weights + KV cache + activations; 0 = unlimited
    double gflops;           // measured matmul GFLOP/s with the model's weight type (0 = unknown)
    double mem_bw;           // measured memory read bandwidth, bytes/s (0 = unknown)
    double lat_us;           // one-way latency of its link to the cluster, microseconds (0 = unknown)
    double link_bw;          // bandwidth of that link, bytes/s (0 = unknown)
    double disk_bw;          // sequential O_DIRECT read bandwidth of the disk it streams weights from,
                             // bytes/s (0 = unknown; the worker's HELLO carries it as disk_read_bw_bytes_s)
    int disk_id;             // nodes with the same disk_id > 0 read from one physical disk and split its
                             // bandwidth while they stream at the same time (local workers of one
                             // machine); 0 = a disk of its own
    int shm_id;              // nodes with the same shm_id > 0 share one host's memory: a tensor-parallel
                             // group of them exchanges through shared memory (local workers over ipc,
                             // worker/node/pipeline.h pipe_set_shm); 0 = over its link
    int cpu_id;              // nodes with the same cpu_id > 0 run on one machine's cores (local workers): when
                             // more of their threads compute at once than it has cores, each goes slower by
                             // that ratio (tensor-parallel members all at once; a pipeline's stages, or an
                             // expert group's leader and the members given the token's experts, in turns);
                             // 0 = cores of its own
    int cores;               // that machine's cores (with cpu_id; 0 = as many as the threads: no slowdown)
    int threads;             // threads it computes with (with cpu_id; 0 = 1)
    int kv_dev;              // where its KV cache lives (plan_kv_dev_t; 0 = host RAM)
    uint64_t kv_ram;         // PLAN_KV_FILE: its RAM share of the KV when fixed (file:DIR,ram=SIZE), counted in
                             // its budget; 0 = whatever its budget leaves (or all of it without a budget)
    uint64_t kv_cap;         // bytes its KV device can hold past the RAM share (file: its disk's free space;
                             // storage: the kvstore's; pim: the part's); 0 = unknown, not checked
} plan_node_t;

// How the members of a tensor-parallel group cut a block and exchange activations.
typedef enum {
    PLAN_TP_EXACT = 0,       // every matrix cut by output rows; 4 all-gathers per block (attention
                             // output, attn_output rows, FFN units, ffn_down rows); each dot product
                             // runs whole on one node: bit-identical to a single node
    PLAN_TP_ALLREDUCE = 1,   // Megatron style: a member holds heads h0..h1 (attn_q/k/v rows and the
                             // matching attn_output columns) and FFN units f0..f1 (ffn_gate/up rows and
                             // ffn_down columns), every member keeps the whole residual stream, and a
                             // block needs 2 all-reduces of n_embd floats (star or ring, chosen as
                             // comm_choose_algo does); sums in another order: not bit-exact
    PLAN_TP_AUTO = 2,        // plan_opts_t only: the mode with the smaller predicted token time
} plan_tp_mode_t;

// "exact", "allreduce", "auto".
const char *plan_tp_mode_name(int mode);

// How a node holds its share within its memory budget (plan_window below).
typedef struct {
    bool streams;            // the share does not fit resident: token_embd rows are read on demand and
                             // units [pinned, n_units) pass through a window of buffers
    int n_units;             // its units in order: one per block l0..l1-1, then the output rows (last stage)
    int pinned;              // units [0, pinned) stay loaded for the plan's life (n_units when not streaming)
    int window;              // buffers of the sliding window, each unit_bytes (0 when nothing passes through it)
    uint64_t unit_bytes;     // one buffer: the largest of its units
    uint64_t fixed_bytes;    // always resident: KV cache, activations, output_norm
    uint64_t pinned_bytes;   // bytes of the pinned units
    uint64_t resident_bytes; // fixed + pinned units (+ token_embd rows when not streaming)
    uint64_t stream_bytes;   // read from disk per token: the units past pinned, plus on average the
                             // share of the token's embedding row it holds (0 when not streaming)
    uint64_t peak_bytes;     // resident + window * unit_bytes (weights + KV + activations when resident)
    uint64_t min_budget;     // the smallest budget it streams in: fixed + one unit buffer
} plan_stream_t;

// One computing node's share. In exact mode every matrix is split by output rows, so each dot
// product runs whole on one node in the same order as on a single node, and pipeline stages hand
// over the residual stream unchanged: any layout gives the single-node bits. In all-reduce mode
// (plan_t.tp_mode) e0..e1 is 0..n_embd on every member: attn_output and ffn_down are cut by columns
// (its heads' and its FFN units' columns) instead.
typedef struct {
    shard_slice_t s;         // its layers and rows (KV heads replicated when nodes outnumber them)
    int node;                // which offered node (index into plan_t.node)
    int stage;               // its pipeline stage
    uint64_t weight_bytes;   // bytes of its weight slices (on disk when it streams)
    uint64_t kv_bytes;       // its KV cache for n_ctx positions (F16)
    uint64_t kv_ram_bytes;   // of kv_bytes, in its node's RAM (counted in peak_bytes): all of it on host, the
                             // RAM share on file, none on storage and pim
    uint64_t kv_dev_bytes;   // the rest, on its node's KV device (file tier, kvstore, PIM part): checked
                             // against the node's kv_cap when that is known
    uint64_t peak_bytes;     // expected peak in RAM: weights + its KV in RAM + activations, or the streaming
                             // peak (st.peak_bytes) plus a paging device's RAM share
    double weight;           // its tensor-parallel weight inside its stage (what split its rows; plan files write it)
    plan_stream_t st;        // how it stays within its budget (plan_window with its node's budget)
    double compute_ms;       // predicted per token (plan_predict): its matmuls at its gflops
    double memory_ms;        // reading its weights from memory at its bandwidth
    double disk_ms;          // reading its streamed units from disk (a shared disk's other readers counted)
    double comm_ms;          // its stage's exchanges: tensor-parallel all-gathers or all-reduces, hand-off
    double busy_ms;          // its time per token: compute or memory overlapped with the disk, plus its
                             // stage's exchanges
    uint64_t experts[4];     // expert parallelism (plan_t.ep): bit e set = it computes expert e of every
                             // block of its stage (256 experts at most); unused otherwise
    int ep_cached;           // with plan_t.ep_cache: experts of each block it keeps resident when fewer than
                             // it holds (an expert cache reads the others from disk on use; sliced experts:
                             // its rows of that many); 0 = all resident
    int ep_cache_of;         // with ep_cached: the experts of each block it holds (placed ones, or n_expert)
    int ep_pool;             // a sliced MoE share whose budget holds not one expert per block (auto cache):
                             // slots shared by its blocks, every routed expert read when used; 0 = none
} plan_shard_t;

// Predicted cost of a plan, per generated token (decode) unless said otherwise.
typedef struct {
    double compute_ms;       // matmul time: per stage the slowest member, summed over stages
    double memory_ms;        // weight streaming time at each node's memory bandwidth (same sum)
    double disk_ms;          // reading streamed weights from disk (same sum; 0 when nothing streams)
    double comm_ms;          // tensor-parallel exchanges + stage hand-offs + logits to the coordinator
    double token_ms;         // predicted time per token: per stage max(compute, memory, disk) + comm
    double prefill_tok_s;    // predicted prompt tokens/s with micro-batches in flight
    double exact_ms;         // token_ms of this layout in exact mode (plan_make / plan_from_spec; 0 = unknown)
    double allreduce_ms;     // token_ms of this layout in all-reduce mode (0 = unknown or does not fit)
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
    plan_tp_mode_t tp_mode;         // EXACT or ALLREDUCE (never AUTO)
    bool resident_only;             // sized without streaming (plan_opts_t.no_stream)
    int grain_heads;                // heads per split step (1; all-reduce mode: whole quant blocks of
                                    // attn_output's columns)
    int grain_ffn;                  // FFN units per split step (PLAN_FFN_GRAIN or whole ffn_down blocks)
    bool ep;                        // expert parallelism: every member of a stage holds every row of its
                                    // blocks but computes only its experts (shard.experts: each expert of
                                    // a stage has exactly one member); attention, router, embedding and
                                    // output are replicated (tp_mode is then EXACT and unused)
    bool ep_lead;                   // with ep: attention, router, embedding and output on each stage's first
                                    // member alone; the others hold and compute their experts only
    int ep_replicas;                // with ep_lead: members holding each expert (1 = its owner alone); the
                                    // first member gives each batch to the holder with the least work
    int ep_hot;                     // with ep_lead: the ep_hot most popular experts of each block (the model's
                                    // popularity of that block) hold a second copy in that block (0: none)
    uint8_t ep_hot_n[PLAN_MAX_LAYERS]; // with ep_hot: second copies in block l (ep_hot_of[l][0..n))
    struct {
        uint8_t expert;             // the expert of block l
        uint8_t shard;              // the member (shard index) that holds a second copy of it in block l
    } ep_hot_of[PLAN_MAX_LAYERS][PLAN_EP_HOT_MAX];
    int ep_cache;                   // MoE: shares cache their experts (plan_opts_t.expert_cache): N per block
                                    // resident, -1 as many as each budget holds; 0 = all resident. Placed
                                    // experts are sized so (plan_ep_cached); a sliced share over its budget
                                    // keeps its rows of as many per block as fit instead of streaming
                                    // through the window (exact mode, KV cache on the host)
    double sliced_ms;               // MoE: token_ms of the best plan with sliced experts (0 = unknown)
    double placed_ms;               // MoE: token_ms of the best plan with placed experts (0 = unknown)
} plan_t;

// --- model description: shapes and bytes, no weights needed


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
    int col_block[PLAN_W_MATS]; // elements per quant block along a row of each matrix (the largest over
                                // the blocks; 1 for F16/F32): all-reduce mode cuts attn_output and
                                // ffn_down columns only at these steps
    const double *popularity;   // MoE: (n_layer, n_expert) each block's share of the router's picks per expert
                                // (plan_popularity_load; each block sums to 1), or NULL: uniform. Borrowed.
} plan_model_t;

// Describes the model in an opened GGUF (reads its metadata and tensor table only). 0, or
// MLM_ERANGE when it has more than PLAN_MAX_LAYERS blocks, or hparams_read's errors, with a message.
int plan_model_from_gguf(const gguf_t *g, plan_model_t *pm, char *err, size_t errlen);

// Describes preset `name` (worker/model_presets.h) quantized to `quant` ("Q4_0", "Q8_0", "F16", ...;
// NULL = Q4_0) without any file: every matrix in that type (a row length the type's blocks do not
// divide falls back to Q8_0, then F16), norms F32, untied output. 0, MLM_ENOTFOUND (no such
// preset) or MLM_EINVAL (unknown type), with a message.
int plan_model_from_preset(const char *name, const char *quant, plan_model_t *pm, char *err, size_t errlen);

// --- weight streaming
//
// One rule sizes a node's share within its memory budget, used by the planner and by the node's
// runtime alike (plan_window). A node's units, in order: one per block l0..l1-1 (every blk.N.*
// tensor of its slice: its matrix rows or columns, the norms, the router), then on the last stage
// the output matrix's vocabulary rows (token_embd's rows when tied). Always resident ("fixed"):
// the KV cache for n_ctx positions (F16; for a planned node only its part counted in RAM: all of it on
// PLAN_KV_HOST, a fixed file share, none on storage or PIM, while a file device without a fixed share
// takes what the budget leaves after sizing), the activations (PLAN_ACT_BATCH tokens) and output_norm.
// - budget 0, or fixed + every unit + its token_embd rows fit the budget: nothing streams (today's
//   layout: peak = weights + KV + activations).
// - otherwise the node streams. Its token_embd rows are never resident: a token's row is read on
//   demand. When fixed + every unit fits, every unit is pinned and the window is 0. Else the window
//   has PLAN_STREAM_WINDOW buffers (1 when only one fits), each the size of its largest unit; units
//   are pinned in order from the first while fixed + pinned + window buffers fit; the window is then
//   at most the number of units left. Units [pinned, n_units) stream: a background reader loads the
//   next of them into a free buffer while earlier units compute and communicate, and a buffer is
//   free again once its unit has been used, so every token reads every streamed unit once (reads
//   bypass the page cache: O_DIRECT). The reader cycles on into the next token: while the node
//   computes its pinned units or waits for the next token it already fills the window with that
//   token's first streamed units. Peak = fixed + pinned units + window * largest unit.
// - fixed + one buffer above the budget: refused (MLM_ERANGE) with the minimum budget named.
#define PLAN_STREAM_WINDOW 2        // buffers of the sliding window when they fit
// Disk figures a node does not state: the test machines' NVMe disk reads 950 MB/s sequentially
// with O_DIRECT (DESIGN.md, measured 2026-12-01).
#define PLAN_DEFAULT_DISK_BW 950e6  // bytes/s
#define PLAN_EXPERT_SLOT_SLACK (3u * 2u * 4096u) // an expert cache slot's room past one expert's bytes: each of
                                                 // its 3 matrices read as the 4 KiB-aligned extent around it
// Streaming reads units at this fraction of the disk's sequential bandwidth (one reader, 16 MiB
// O_DIRECT calls like profile_node's; the target for the reader is at least 0.8). Measured
// by tests/bench/bench_70b.sh (2026-12-02): a lone window reader (one pipeline stage, or one node)
// reads at the rate dd's 16 MiB O_DIRECT reads get, so 1.0; with 0.9 the 4-stage pipeline was
// predicted 28% slow and one node 5-9% slow.
#define PLAN_DISK_EFFICIENCY 1.0
// Readers of one disk at the same time (disk_id) share it, but together they get up to this many
// times one reader's bandwidth: an NVMe or virtio disk serves several queued requests at once, and
// each window reader keeps only one 16 MiB read in flight. Calibrated by tests/bench/bench_70b.sh
// (2026-12-02, README "70B on four 2 GiB workers"): four exact-TP workers streaming llama-2-70b Q4_0
// from one virtio disk read 32.9 GB per token in 23.8 s, 1383 MB/s together, 1.92x the 721 MB/s the
// coordinator's profile measured for one stream (each reader 376-427 MB/s while reading): with 0.9
// for efficiency, 2.1; the figure is rounded down to 2 (predicted 25.3 s, +6%). Splitting the
// bandwidth n ways (the model before this calibration) predicted 50.7 s, 2.1x too slow. Two more
// runs (same day, efficiency 1.0): all-reduce TP, four readers at 357-394 MB/s each while reading,
// 1.73x dd's 852 MB/s for one stream; exact TP, 348-402 MB/s each, 1.62x dd's 912 MB/s. Together
// with the first run's figure against dd's one stream: 1.6 (README "70B on four 2 GiB workers").
#define PLAN_DISK_PARALLEL 1.6

// Sizes the share `s` (cut as `mode` says: PLAN_TP_EXACT or PLAN_TP_ALLREDUCE) of model pm for n_ctx
// positions within `budget` bytes (0 = unlimited) by the rule above, into *out. Returns 0, or
// MLM_ERANGE when the budget is below the minimum (out then describes that minimum: window 1,
// nothing pinned, and out->min_budget is the smallest budget that works), or MLM_EINVAL for a
// slice outside the model.
int plan_window(const plan_model_t *pm, const shard_slice_t *s, int mode, int n_ctx, uint64_t budget,
                plan_stream_t *out);

// --- cost model
//
// Figures a node does not state (0 in plan_node_t) take these defaults:
#define PLAN_GFLOPS_PER_SPEED 20.0  // gflops = 20 * speed (speed <= 0 counts as 1)
#define PLAN_DEFAULT_MEM_BW 20e9    // bytes/s of weight streaming
// Decode streams weights at this fraction of a node's measured read bandwidth (profile_node reads
// twice the last-level cache with the kernels' loads; TinyLlama Q4_0 decode on the 2-core test
// machine: 13.0-13.6 GB/s against 17.0-17.7 with 2 threads, 7.0-8.1 against 7.3-10.1 with one).
#define PLAN_MEM_EFFICIENCY 0.8
#define PLAN_DEFAULT_LAT_US 100.0   // one-way link latency
// A group on one host (plan_node_t.shm_id): each all-gather or all-reduce whose blocks fit a slot of
// PLAN_SHM_SLOT_BYTES (transport/comm_shm.h's COMM_SHM_SLOT_BYTES) costs PLAN_SHM_LAT_US (measured:
// 10-20 us per collective on the 2-core test machine, waits on the peer included) and a copy of every
// block at PLAN_SHM_BW; larger ones go over the links.
#define PLAN_SHM_SLOT_BYTES (1u << 20)
#define PLAN_SHM_LAT_US 15.0
// Members that exchange after every piece of work and outnumber their machine's cores (r threads per
// core, r > 1) lose more than the factor r: the scheduler runs a member whose peers already wait on
// it only in its next slice. Their compute and memory times take r * (1 + PLAN_OVERSUB_LOSS * min(1,
// r - 1)). Measured on the 2-core machine with 4 one-thread workers (r = 2): sliced Mixtral-shaped
// experts over emulated 1 Gbit/s links 6.3-7.6 tokens/s against 10.0 predicted from r alone (1.3-1.6x),
// TinyLlama tp4 1.2x (shared memory) and 1.5x (ZeroMQ) slower than r alone predicts; 2 workers on 2
// cores (r = 1) as predicted.
#define PLAN_OVERSUB_LOSS 0.5
#define PLAN_SHM_BW 4e9             // bytes/s
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
//   gflops, and reads those weights' bytes at its mem_bw; it takes the larger of the two (c);
// - a streaming node also reads its stream_bytes from disk at PLAN_DISK_EFFICIENCY * disk_bw,
//   divided among the members of its stage that stream from the same disk at the same time (d).
//   Its units compute in order, cu = (c + x) / n_units each (x: its stage's exchanges), pinned
//   ones first; its reader reads the S streamed units back to back, r = d / S each, at most
//   `window` units ahead of them, and while the token is on other stages (or with the coordinator)
//   it reads ahead up to the window (pre). With 2+ buffers the node takes
//   max(c + x + wait for the first read, reads done + cu), the reads being done after
//   max(S r - pre, max(pinned compute, r - pre) + cu + (S - window) r); with one buffer reads and
//   units alternate: max(pinned compute, r - pre) + cu + (S - 1)(r + cu);
// - a stage takes its slowest member's time. Its exchanges: exact mode, per block four all-gathers
//   (attention output, attn_output rows, FFN units per routed expert, ffn_down rows, all F32);
//   all-reduce mode, per block two all-reduces of n_embd F32, star (2 L + 2 (N-1) b / B) or ring
//   (2 (N-1) (L + b / (N B))) whichever is smaller, L the group's largest latency and B its smallest
//   bandwidth (comm_choose_algo's rule); either mode on the first stage one all-gather of the
//   token's embedding row. An all-gather costs the largest latency of the group plus, over members,
//   the largest of (bytes it sends, bytes it receives) / its link bandwidth: a switched LAN where
//   each node's own link is the bottleneck. A message between two nodes has the larger of their
//   latencies;
// - a stage hands n_embd F32 to every member of the next stage (from its first member), the last
//   stage sends its vocabulary rows of logits (F32) to the coordinator, and the coordinator's step
//   message to the first stage costs one latency. Offered node 0 is the coordinator's machine,
//   whether or not it computes: these messages use its link, and the part it computes itself
//   does not travel.
// token_ms is the sum over stages (one sequence visits them in turn). Prefill: micro-batches of u
// tokens (plan_t.ubatch) over a prompt of n_prompt tokens take (m + S - 1) times the slowest stage's
// time for u tokens (m = micro-batches, S = stages), each stage taking u decode-token times / PLAN_PREFILL_SPEEDUP per
// micro-batch (at least the time to read its weights once, and with streaming its disk reads,
// which every stage on a shared disk then makes at the same time).

// Fills p->cost (all but exact_ms / allreduce_ms, of which it sets p->tp_mode's) and each shard's
// compute_ms, memory_ms, disk_ms, comm_ms and busy_ms from the shards' slices, windows and the nodes'
// figures (defaults above for unknown ones).
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
    plan_tp_mode_t tp_mode; // EXACT (default), ALLREDUCE, or AUTO: each layout in the faster mode
    bool no_stream;    // refuse shares that do not fit their budgets resident (no weight streaming)
    int ep;            // MoE expert parallelism: 0 = the planner chooses sliced or placed experts by predicted
                       // time; N >= 2 = placed experts, stages of N members (plan_ep); -1 = sliced only
    bool ep_replicated; // placed experts with attention replicated on every member (--ep-attn all), instead of
                        // on each stage's first member alone (plan_t.ep_lead, the default)
    int ep_replicas;    // with attention on the leader: holders of each expert (--ep-replicas N); 0 = 1, or
                        // when every offered node has a budget, the fastest predicted count up to top-k
                        // whose shares fit
    int ep_hot;         // with attention on the leader and one holder per expert: the ep_hot most popular
                        // experts of each stage (pm->popularity, summed over the stage's blocks) get a second
                        // holder, the member with the least expected expert work that has room (--ep-hot)
    int expert_cache;   // placed experts: each member keeps N of its experts per block resident and reads
                        // the others from disk when used (--expert-cache N; the "experts" weight provider);
                        // -1 = as many as its budget holds (auto); 0 = every placed expert resident
} plan_opts_t;

#define PLAN_EXHAUSTIVE_MAX 8  // up to this many offered nodes every layout is tried

// Chooses a layout for pm over the offered nodes: which nodes compute (a node whose inclusion makes
// the predicted token time worse is left out; never node 0 under pin_first), how many pipeline
// stages, which consecutive nodes (in offered order) form each stage, blocks per stage in
// proportion to the stage's throughput and inside every member's budget, and each stage's
// tensor-parallel split by speed. A layout whose shares cannot fit their budgets resident streams
// (unless no_stream): blocks and splits are then rebalanced by the predicted times, disk included,
// and each member's window is plan_window's. Every layout is tried for n <= PLAN_EXHAUSTIVE_MAX;
// beyond, a heuristic (fastest-first node sets, every stage count, balanced and even stage cuts,
// then greedy removal of nodes). With tp_mode AUTO each layout with a tensor-parallel group is
// predicted in both modes and takes the faster (exact on ties). *best gets the smallest token_ms
// (ties: exact mode, fewer nodes, then fewer stages) with layout, why and cost filled (cost.exact_ms
// and cost.allreduce_ms: the same layout in each mode); alts (may be NULL) up to max_alts next-best
// plans of other layouts, best first, *n_alts their count. Returns 0; MLM_EINVAL for bad options
// (err says which); MLM_EFULL when nothing fits, err saying how much memory is missing in all and
// on the worst node, or, when even streaming does not fit, the smallest budget that node needs, or
// which node's KV device (kv_cap) cannot hold its KV past the RAM share; MLM_ENOMEM.
int plan_make(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_opts_t *o, plan_t *best,
              plan_t *alts, int max_alts, int *n_alts, char *err, size_t errlen);

// --- expert parallelism
//
// A plan with placed experts (plan_t.ep): stages of consecutive nodes in offered order, each stage a
// group whose members hold every row of the stage's blocks (attention, router, norms replicated: the
// residual stream is whole on every member) and compute only their own experts, whole. Blocks are
// split over stages evenly (the first stages take one more when they do not divide); a stage's
// experts go to its members in proportion to their decode rate, in id order (member 0 the first ids),
// every member at least one, within budgets (a member whose budget cannot hold its experts gives
// them to the others; nothing streams). Predicted per token and stage: a member takes its replicated
// weights (compute or memory, the slower) plus one expert of each block per routed expert it owns;
// the stage takes the expected slowest member, the token's top-k experts drawn uniformly (routing
// assumed uniform; a fixed sequence of draws, so the figure is repeatable). Per block an all-to-all
// (the routed experts' output rows, n_embd F32 each, to the token's home member) and a gather of the
// home's n_embd F32 sums to every member, one latency each plus the bytes over the home's link;
// hand-offs, logits and the step message as plan_predict says.
// With lead (plan_t.ep_lead) only a stage's first member holds and computes what is not an expert (and
// the KV cache); the others hold their experts alone. Per block the first member sends each member
// the rows routed to its experts and takes their outputs back (one latency each way plus the bytes,
// the slowest member's link); the stage waits for the first member's replicated work and then its
// expected slowest member's experts; the residual stream goes to the next stage's first member only.

// Places experts over nodes [0, n) in `pp` stages of members (n / pp each, the first stages one more
// when it does not divide) for n_ctx positions, predicting the cost. 0, MLM_EINVAL (a dense model,
// more than 256 experts, fewer experts than members, pp out of range) or MLM_EFULL (err names the
// node and what it lacks), with the reason in err.
int plan_ep(const plan_model_t *pm, const plan_node_t *nodes, int n, int pp, int n_ctx, bool lead, int replicas,
            plan_t *out, char *err, size_t errlen);

// plan_ep with members that cache their experts (cache as plan_opts_t.expert_cache: N per block
// resident, -1 as many as each budget holds, 0 all resident): a member is then sized with its cache
// (plan_shard_t.ep_cached) and only refused when not even one expert per block fits, and its predicted
// time counts the misses' reads from disk (hits assumed in proportion to the experts it keeps, as for
// uniform routing).
int plan_ep_cached(const plan_model_t *pm, const plan_node_t *nodes, int n, int pp, int n_ctx, bool lead, int replicas,
                   int cache, plan_t *out, char *err, size_t errlen);

// Predicts an expert-parallel plan's cost (the rule above) into p->cost and its shards' figures. With
// pm->popularity the token's top-k experts are drawn by popularity (summed over each stage's blocks)
// instead of uniformly.
void plan_predict_ep(const plan_model_t *pm, plan_t *p);

// Gives the `hot` most popular experts of every stage of an expert-parallel plan with attention on the
// leader (p->ep_lead, one holder per expert) a second holder: each to the member of its stage that does
// not hold it, has room in its budget, and has the least expected expert work (the popularity of its
// experts, each divided by its holders; ties: fewer experts, then the earlier member); popularity from
// pm->popularity summed over the stage's blocks (uniform without it: the lowest ids first). Predicts the
// cost again. 0; MLM_EINVAL (not such a plan, hot outside 1..n_expert); MLM_EFULL naming the expert and
// the stage when no member has room.
int plan_ep_hot(const plan_model_t *pm, plan_t *p, int hot, char *err, size_t errlen);

// Routing counts (what `meshlm inspect FILE --routing N --routing-out OUT` writes): '#' comments, then
// "layers L experts E top_k K tokens T", then L lines "l: c_0 ... c_(E-1)" (blocks in order, counts of
// the router's picks, integers >= 0). Parses text for pm's shape into pop (n_layer * n_expert), each
// block's counts divided by their sum (a block with none: uniform). 0 or MLM_EFORMAT naming the line
// and what is wrong (another model's shape included).
int plan_popularity_parse(const char *text, const plan_model_t *pm, double *pop, char *err, size_t errlen);

// Reads and parses a routing counts file (errors name the path). 0 or an MLM_ code.
int plan_popularity_load(const char *path, const plan_model_t *pm, double *pop, char *err, size_t errlen);

// Placed experts shard sh holds in every block of its stage (the bits of sh->experts).
int plan_shard_n_experts(const plan_shard_t *sh);

// Whether shard i of an expert-parallel plan computes expert e (of every block of its stage).
static inline bool plan_has_expert(const plan_t *p, int i, int e) {
    return e >= 0 && e < 256 && (p->shard[i].experts[e >> 6] >> (e & 63) & 1u) != 0;
}

// Whether shard i computes expert e of block l: of every block, or as block l's hot second copy.
static inline bool plan_holds_expert(const plan_t *p, int i, int l, int e) {
    if (plan_has_expert(p, i, e)) return true;
    for (int h = 0; l >= 0 && l < PLAN_MAX_LAYERS && h < p->ep_hot_n[l]; h++)
        if (p->ep_hot_of[l][h].expert == e && p->ep_hot_of[l][h].shard == i) return true;
    return false;
}

// Prints where the experts are: "experts placed (sliced X ms/token, placed Y ms/token)", then per
// stage its layers and per member the experts it computes of each of them. Nothing for other plans.
void plan_print_experts(const plan_t *p, int n_expert, FILE *f);

// Writes shard i's experts as "0-2,5" into buf (cap bytes); returns buf.
char *plan_experts_str(const plan_t *p, int i, int n_expert, char *buf, size_t cap);

// Splits m over n nodes in proportion to their speed, within their memory budgets, as one
// tensor-parallel group in exact mode (one stage, shard i = node i), all resident (no streaming);
// cost predicted. Returns 0, MLM_EINVAL (bad n), or MLM_EFULL when the model does not fit: err says
// which node lacks how much.
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
// names the version; a newer N is refused. Version 2 adds one optional line, at most once:
//   tp mode=allreduce            (or mode=exact, the default and all a v1 file can say)
// plan_file_write writes v1 for exact plans (older readers take them) and v2 with this line for
// all-reduce plans. Windows are not written: each node derives its own from its budget (plan_window).

#define PLAN_FILE_VERSION 2

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
    plan_tp_mode_t tp_mode;          // from a `tp mode=` line (EXACT without one)
} plan_spec_t;

// Parses plan file text. 0, or MLM_EFORMAT (MLM_EUNSUPPORTED for a newer version, MLM_ERANGE for
// too many stages or nodes) with "line N: ..." in err.
int plan_file_parse(const char *text, plan_spec_t *spec, char *err, size_t errlen);

// Reads and parses a plan file; errors name the file ("FILE:N: ..."); MLM_EIO when it cannot be read.
int plan_file_load(const char *path, plan_spec_t *spec, char *err, size_t errlen);

// Builds the plan a spec describes over the offered nodes and predicts its cost (and the other
// tensor-parallel mode's, into cost.exact_ms / allreduce_ms). Checks that the stages' blocks tile
// 0..n_layer-1 in order, that every node index is offered and used at most once, and that every
// member fits its budget, resident or streaming (explicit weights are kept as given). 0,
// MLM_EINVAL (bad spec: err names the line), MLM_EFULL (err names the node and how much it lacks,
// or the smallest budget it streams in).
int plan_from_spec(const plan_model_t *pm, const plan_node_t *nodes, int n, const plan_spec_t *spec, int n_ctx,
                   plan_t *out, char *err, size_t errlen);

// Writes p in the plan file format; parsing it back and plan_from_spec with the same nodes give
// the same shards. 0 or MLM_EIO.
int plan_file_write(const plan_t *p, FILE *f);

// --- nodes

// Parses a node list "N" (N equal nodes), or comma-separated items
// "speed[:budget][@LAT_MS/MBIT][:disk=RATE][:disk_id=N][:kv=DEV][:kv_ram=SIZE][:kv_cap=SIZE]" such as
// "2,1,1:512M", "1:4G@1/1000" or "1:2G@1/1000:disk=950M:disk_id=1:kv=file:kv_cap=20G" (budgets and
// sizes take K/M/G suffixes, powers of 1024; the link is its one-way latency in ms and Mbit/s; disk=
// is the disk's read bandwidth in bytes/s, K/M/G powers of 1000; disk_id= groups nodes on one disk;
// kv= host|file|storage|pim, kv_ram= and kv_cap= as in plan_node_t). Returns the node count or a
// negative MLM_ code.
int plan_parse_nodes(const char *spec, plan_node_t *nodes, int max, char *err, size_t errlen);

// Parses a node file: one node per line, "name key=value ...", keys speed=, gflops=, mem_bw= (bytes/s,
// K/M/G are powers of 1000: 20G), mem= (budget, K/M/G powers of 1024), lat_ms=, lat_us=, mbit=,
// disk= (read bandwidth, bytes/s like mem_bw), disk_id=, kv= (host|file|storage|pim), kv_ram=, kv_cap=
// (sizes like mem=); '#' comments. Returns the node count or a
// negative MLM_ code with "line N: ..." in err.
int plan_parse_nodes_file(const char *text, plan_node_t *nodes, int max, char *err, size_t errlen);

// Parses a byte size with an optional K/M/G/T suffix (powers of 1024); returns 0 or MLM_EINVAL.
int plan_parse_size(const char *s, uint64_t *out);

// --- printing

// Prints the shard table (stage, layers, rows, bytes per shard, window when it streams).
void plan_print(const plan_t *p, const gguf_t *g, FILE *f);
void plan_table(const plan_t *p, const plan_model_t *pm, FILE *f);

// Prints the chosen plan and up to two alternatives: layout, tensor-parallel mode, nodes, predicted
// compute / memory / disk / comm ms per token, token_ms, tokens/s, prefill tokens/s and why; both
// modes' predictions; per node of the chosen plan its resident bytes, window, streamed MB and disk,
// compute, memory and busy ms per token; then the chosen shard table.
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
