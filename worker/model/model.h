// A llama-family model (dense or Mixtral-style MoE) bound to a GGUF file, and its forward pass.
#ifndef MESHLM_MODEL_H
#define MESHLM_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "offload/attn.h"
#include "offload/weights.h"
#include "worker/format/gguf.h"
#include "worker/format/hparams.h"
#include "worker/kernels/kernels.h"
#include "worker/kernels/quant.h"
#include "parallel/shard.h"

typedef struct {
    bool repack;                  // allow kernels to repack weights into a faster layout (copies them)
    const kernels_t *kern;        // NULL = kernels_best()
    const shard_slice_t *slice;   // rows to hold (NULL = all); a shard file must hold exactly these
    const char *weights;          // weight provider by name (offload/weights.h; NULL = chosen by mem_budget:
                                  // "mmap", or "window" when the share does not fit it resident)
    uint64_t mem_budget;          // this node's memory for the model: weights + KV cache of n_ctx positions +
                                  // activations (0 = no limit). A budget below one streamed unit and the rest
                                  // is refused before any weight is read (MLM_ERANGE, err names the minimum)
    int n_ctx;                    // positions the budget holds a KV cache for (0 = min(n_ctx_train, 4096),
                                  // model_ctx_new's default)
    float expert_skip;            // MoE adaptive gating (AdapMoE): a token drops an expert of rank >= 1 whose
                                  // renormalised router weight is below this, the rest renormalised to sum
                                  // to 1 (0 = off, the reference's routing). CHANGES OUTPUTS when on
    // Optional, for tools that study routing: called from the forward pass with each MoE block's choices
    // for a chunk, sel (nt, k) experts in rank order (-1: dropped by expert_skip); borrowed for the call.
    void (*on_route)(void *arg, int layer, const int *sel, int nt, int k);
    void *on_route_arg;
    const uint64_t *experts;      // (4) placed experts (model_ep_t): bit e set = this node computes expert e of
                                  // its blocks; only those are prepared (mapped, "mmap"), NULL = every expert
    const uint32_t *block_experts; // with experts: (layer << 8 | expert) also prepared, in that block alone
    int n_block_experts;           // (hot second copies, PlanNode.block_experts; borrowed for the call)
    bool experts_only;            // with experts: nothing but those experts is computed here (model_ep_t.lead,
                                  // a member other than the leader): the rest is mapped, never prepared
    const char *cols_path;        // an all-reduce slice streamed from a whole model file: the slice's columns
                                  // file (shard_file_write_cols), which must hold exactly this slice; the
                                  // column-cut matrices stream from it (offload/weights.h cols_g); NULL = none
    struct model *reuse;          // optional: an earlier share of the same model (the same tensor bytes, e.g.
                                  // the last plan's) whose repacked rows this load takes instead of reading
                                  // and repacking them again (weights_params_t.reuse). Borrowed for the call;
                                  // it may compute more slowly afterwards: destroy it once this load is done
} model_load_opts_t;

typedef struct model model_t;

// Opens path, checks the architecture and every tensor's shape, and prepares the weights.
// On failure returns a negative MLM_ code and a message in err.
int model_load(model_t **out, const char *path, const model_load_opts_t *opts, char *err, size_t errlen);

void model_destroy(model_t **self_p);

const model_hparams_t *model_hparams(const model_t *m);
const gguf_t *model_gguf(const model_t *m);   // borrowed until model_destroy
const kernels_t *model_kernels(const model_t *m);
// Name of the dominant weight type (e.g. "Q4_0"), for tables.
const char *model_type_name(const model_t *m);
// The rows this model holds (everything unless loaded with a slice or from a shard file).
const shard_slice_t *model_slice(const model_t *m);
// The weight provider the forward pass acquires from (for its name and stats; borrowed).
weights_t *model_weights(const model_t *m);

// Tensor parallelism: gathers one block from every node. Node i contributes lens[i] bytes (mine,
// my_len, is this node's); out receives all blocks concatenated in node order. Every node calls it
// the same number of times in the same order. Returns 0 or a negative MLM_ code (peer lost, ...).
typedef int (*model_gather_fn)(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens);

// Tensor parallelism in all-reduce mode: sums buf (n floats) over the group's nodes in place; every
// node receives the same bits (the sum is done in a fixed node order). Called, like the gather, the
// same number of times in the same order on every node. Returns 0 or a negative MLM_ code.
typedef int (*model_allreduce_fn)(void *ctx, float *buf, size_t n);

typedef struct {
    int n_nodes;                  // nodes in the group
    int index;                    // this node's index
    const shard_slice_t *slices;  // (n_nodes) every node's slice in node order (borrowed for the ctx's life)
    model_gather_fn gather;       // the collective
    void *gather_ctx;             // its argument
    // Optional: delivers the vocabulary blocks of the logits to wherever they are wanted, instead of
    // gathering them on every node. Returns 0 when out was filled here (as a gather would), 1 when
    // the logits went elsewhere (model_eval then leaves its logits buffer untouched), or an error.
    // Called even by a group of one node, so a node can serve a coordinator that computes nothing.
    model_gather_fn gather_logits;
    // All-reduce mode (the slices' cols set, Megatron style): the collective that sums the partial
    // attn_output and ffn_down products, two per block (arguments: gather_ctx). Required then with
    // more than one node; unused in exact mode.
    model_allreduce_fn allreduce;
} model_tp_t;

// Expert parallelism: exchanges blocks of bytes with every member of the expert-parallel group at
// once. Member j receives block j of send (send_lens[j] bytes, blocks concatenated in member order);
// recv receives block j from member j (recv_lens[j] bytes, known beforehand). Every member calls it
// the same number of times in the same order. Returns 0 or a negative MLM_ code.
typedef int (*model_alltoallv_fn)(void *ctx, const void *send, const size_t *send_lens, void *recv,
                                  const size_t *recv_lens);

// Placed experts with attention on the leader (model_ep_t.lead): one block of bytes to or from
// member `member` of the group (point to point). recv takes the block's length from the sender: at
// most cap bytes land in buf and *len says how many; a longer block is an error (MLM_EPROTO).
typedef int (*model_send_fn)(void *ctx, int member, const void *buf, size_t len);
typedef int (*model_recv_fn)(void *ctx, int member, void *buf, size_t cap, size_t *len);

// An expert-parallel group: members that each hold whole experts (every FFN unit and hidden row of
// them) and compute them for the whole group, while everything else (attention, router, embedding,
// output) is replicated: each member holds the full residual stream and routes every token itself,
// with the same bits. Per MoE block the members compute, for every (top-k rank, expert) they own, the
// same token batch a single node would; the rows go by alltoallv to each token's home member (the
// chunk's tokens cut into n_nodes contiguous ranges, member order), which adds them into the token's
// sum in rank order (top-1 first) exactly as a single node does; the homes' sums are then gathered
// (gather, node order) so every member holds the block's output. The logits are a single node's bits.
typedef struct {
    int n_nodes;                  // members of the group (1 = alone: every expert is this node's)
    int index;                    // this member's index
    int n_layer, n_expert;        // the owner table's shape (the model's)
    const uint8_t *owner;         // (n_layer, n_expert) the member computing expert e of block l:
                                  // owner[l * n_expert + e] (borrowed for the ctx's life)
    model_alltoallv_fn alltoallv; // the exchange of expert rows
    model_gather_fn gather;       // the gather of the homes' sums (lens per member, in member order)
    void *ctx;                    // argument of all the exchanges
    // Attention on the leader (protocol 1.8): member 0 alone computes attention, norms, router, the
    // residual stream and the output; per MoE block it sends every other member the routing (top-k
    // ids of every token) and the normed rows of the tokens routed to that member's experts, computes
    // its own experts meanwhile, takes back each member's expert rows and adds them in rank order
    // with the router weights, exactly as one node does. The other members compute experts only: no
    // attention, no KV cache entries, no residual stream, no logits (their model_eval leaves the
    // logits untouched and their hidden_out undefined). 2 exchanges per block as the replicated way,
    // with none of its repeated attention; send and recv are required then, alltoallv and gather not.
    bool lead;
    model_send_fn send;
    model_recv_fn recv;
    // Replicas (attention on the leader only): (n_layer, n_expert) bit j set = member j holds expert e
    // of block l, the owner's bit always among them; NULL = each expert on its owner alone. The leader
    // gives each (rank, expert) batch, whole, to the holder with the least work so far, so a token's
    // experts spread over more members; the bits stay the single node's (every batch is the same).
    const uint64_t *holders;
} model_ep_t;

typedef struct {
    int n_ctx;             // positions the KV cache holds (0 = min(n_ctx_train, 4096))
    int n_batch;           // tokens per forward chunk (0 = 64)
    int n_threads;         // 0 = number of online CPUs
    bool kv_f32;           // F32 KV cache instead of the default F16 (what llama.cpp uses)
    bool kv_q8;            // Q8_0 KV cache (blocks of 32 with an F16 scale, dequantized in the attention; not
                           // with kv_f32): 0.53x the F16 cache's bytes; CHANGES OUTPUTS (tests/test_kv.c bounds
                           // the logits' difference); head_dim a multiple of 32; host and file devices
    const model_tp_t *tp;  // tensor-parallel group (NULL = this model computes everything alone)
    const char *attn_dev;  // attention/KV device by name (offload/attn.h; NULL = "host")
    uint64_t kv_ram;       // the KV's share of this node's RAM, for a device that pages past it ("file";
                           // attn_params_t.ram_bytes; 0 = no limit); see model_kv_ram_share
    const model_ep_t *ep;  // expert-parallel group (NULL = this node computes every expert of its slice); only
                           // with a model holding every row of its blocks and no tensor-parallel group of 2+
} model_ctx_opts_t;

typedef struct model_ctx model_ctx_t;

// What mem_budget leaves for the KV cache once the model's share (weights as the budget holds them,
// activations) is counted: the RAM share of a paging KV device. 1 (everything spills) when nothing is
// left; 0 (no limit) without a budget.
uint64_t model_kv_ram_share(const model_t *m, uint64_t mem_budget);

// A context: an attention/KV device holding one sequence, scratch buffers and a thread pool. The
// model is borrowed until model_ctx_destroy.
int model_ctx_new(model_ctx_t **out, const model_t *m, const model_ctx_opts_t *opts, char *err, size_t errlen);
void model_ctx_destroy(model_ctx_t **self_p);

// Feeds n tokens at the next positions. With all_logits, logits receives n rows of n_vocab;
// otherwise only the last token's row (logits may be NULL to skip the output layer). In a
// tensor-parallel group every node makes the same calls and every node receives the full logits:
// in exact mode bit-identical to a single node's; in all-reduce mode (slices with cols set) the
// same on every node and run to run, but the hidden-size products are summed across the nodes in
// another order than one node's dot products, so they differ from a single node's in the last bits
// (tests/test_allreduce.c bounds it). Returns 0, MLM_ERANGE when the cache would overflow,
// MLM_EINVAL for a bad token id, or the collective's error.
int model_eval(model_ctx_t *c, const int32_t *tokens, int n, float *logits, bool all_logits);

// A pipeline stage's step (the model holds blocks [l0, l1) of its slice). The first stage reads
// tokens (hidden_in NULL); a later stage reads hidden_in, n rows of n_embd floats, the residual
// stream the stage before handed out. A stage that is not the last writes its residual stream to
// hidden_out (n, n_embd) and ignores logits; the last produces logits as model_eval does. The
// residual stream crosses stages unchanged, so a pipeline gives a single node's bits as long as
// the chunks are the same (n_batch, or the micro-batch size when it is smaller).
// MLM_EINVAL when the inputs do not match the stage.
int model_eval_stage(model_ctx_t *c, const int32_t *tokens, const float *hidden_in, int n, float *hidden_out,
                     float *logits, bool all_logits);

int model_ctx_pos(const model_ctx_t *c);      // tokens in the cache
// From now on every token of a step is computed in the order it would be alone (its products and its
// attention a token at a time where a batch would sum in another order), so a chunk of n tokens leaves
// the cache and the logits bit for bit as n single-token steps do: a replay of decode steps in one
// chunk. Slower than a batch for F32/F16/BF16 and Q8_0 weights; the other types keep their batches.
void model_ctx_set_one_order(model_ctx_t *c, bool on);
int model_ctx_n_ctx(const model_ctx_t *c);
void model_ctx_reset(model_ctx_t *c);         // forget the cache
// The context's attention/KV device (for its name and stats; NULL on a node without query heads).
attn_dev_t *model_ctx_attn(const model_ctx_t *c);

#endif
