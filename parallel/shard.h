// Model slices: which rows of each tensor a tensor-parallel node holds, and shard files that store them.
#ifndef MESHLM_SHARD_H
#define MESHLM_SHARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/format/gguf.h"

#define SHARD_EXPERTS_MAX 256 // experts a placed slice can name
#define SHARD_EXPERT_WORDS (SHARD_EXPERTS_MAX / 32)

// A node's share of a llama-family model. In exact mode (cols 0) every matrix is cut by output rows
// only. In all-reduce mode (cols 1, Megatron style) attn_output and ffn_down (per expert) are cut by
// COLUMNS instead: the node holds every row (e0..e1 spans 0..n_embd) of the columns of its query
// heads [h0*head_dim, h1*head_dim) and of its FFN units [f0, f1), and its products are partial sums
// that the group adds up. Column ranges must be whole quant blocks of the tensor's rows.
typedef struct {
    int h0, h1;    // query heads [h0, h1): rows [h0*head_dim, h1*head_dim) of attn_q
    int kv0, kv1;  // KV heads [kv0, kv1): rows of attn_k and attn_v
    int e0, e1;    // hidden rows [e0, e1) of attn_output and ffn_down (per expert)
    int f0, f1;    // FFN units [f0, f1): rows of ffn_gate and ffn_up (per expert)
    int v0, v1;    // vocabulary rows [v0, v1) of output and token_embd
    int l0, l1;    // transformer blocks [l0, l1) (a pipeline stage). The first stage (l0 == 0) holds
                   // the embedding rows, the last (l1 == n_layer) output_norm and the output rows;
                   // a middle stage holds neither. l0 == l1 == 0 with nothing else: an empty slice.
    int cols;      // 1: all-reduce mode, attn_output / ffn_down cut by columns (see above); 0: exact mode
    int placed;    // 1: placed experts (expert parallelism): of the 3-D expert tensors (ffn_*_exps) the
                   // slice holds only the experts in `experts`, whole; 0: every expert (with its rows)
    uint32_t experts[SHARD_EXPERT_WORDS]; // with placed: bit e (word e / 32) = expert e held
} shard_slice_t;

// The slice that holds everything.
shard_slice_t shard_full(int n_layer, int n_head, int n_head_kv, int n_embd, int n_ff, int n_vocab);

// Whether the slice holds expert e of its blocks' 3-D expert tensors: always without placed experts.
bool shard_holds_expert(const shard_slice_t *s, int e);

// The plane of expert e in a shard file written for s: e itself without placed experts, else the
// number of held experts below e (their planes are stored in expert order). -1 when s does not hold e.
int shard_expert_plane(const shard_slice_t *s, int e);

// The experts among [0, n_expert) that s holds: n_expert without placed experts.
int shard_expert_count(const shard_slice_t *s, int n_expert);

// Marks s as holding experts ids[0..n) (placed experts; ids outside [0, SHARD_EXPERTS_MAX) are ignored).
void shard_set_experts(shard_slice_t *s, const uint16_t *ids, int n);

// Adds expert e to a placed slice's experts (a hot second copy in some of its blocks: a shard file
// holds the expert's planes of every block).
void shard_add_expert(shard_slice_t *s, int e);

// Whether tensor `name` is a 3-D expert tensor (blk.N.ffn_{gate,up,down}_exps.weight).
bool shard_expert_tensor(const char *name);

// Whether a slice holds tensor `name` at all: blocks outside [l0, l1) are left out, token_embd
// belongs to the first stage (and to the last when tied is set: it is then the output matrix),
// output_norm and output to the last stage. Other names (rope_freqs) are always held.
bool shard_holds_tensor(const shard_slice_t *s, const char *name, int n_layer, bool tied);

// Rows [*r0, *r1) of tensor `name` (ne[1] rows of ne[0]) that a slice holds; the whole tensor for
// vectors and tensors the slice does not cut (norms, router, rope factors). head_dim converts heads.
void shard_tensor_rows(const shard_slice_t *s, const char *name, int64_t ne1, int head_dim, int64_t *r0, int64_t *r1);

// Columns [*c0, *c1) of each row of tensor `name` (ne[0] columns) that a slice holds: the head or
// FFN-unit columns of attn_output and ffn_down(_exps) in all-reduce mode, else every column.
void shard_tensor_cols(const shard_slice_t *s, const char *name, int64_t ne0, int head_dim, int64_t *c0, int64_t *c1);

// Whether columns [c0, c1) of a row of type `type` (a qtype_t) and ne0 elements are whole quant
// blocks (32 elements for Q4_0/Q8_0, 256 for K-quants, any for F32/F16): a column slice must be.
bool shard_cols_aligned(int type, int64_t ne0, int64_t c0, int64_t c1);

// Checks every tensor a slice cuts by columns in g (a whole model file: their columns must be whole
// quant blocks). 0, or MLM_EINVAL naming the tensor, its type and the columns.
int shard_check_cols(const gguf_t *g, const shard_slice_t *s, int head_dim, char *err, size_t errlen);

// Reads the meshlm.shard.* keys of a shard file (meshlm.shard.experts, ascending expert ids: a placed
// slice). 0 and *is_shard = true when present (slice set),
// 0 and false for an ordinary model file, MLM_EFORMAT when the keys are inconsistent. A shard file
// without l0/l1 keys (written before pipeline stages) holds every block: l0 = 0, l1 = -1 (the
// caller substitutes n_layer).
int shard_file_slice(const gguf_t *g, shard_slice_t *slice, bool *is_shard);

// Writes a GGUF holding only the rows (and, in all-reduce mode, the columns; with placed experts, the
// planes of the experts held, in expert order, with the key meshlm.shard.experts) of slice from src (all
// metadata copied, plus meshlm.shard.* keys, meshlm.shard.cols when slice->cols, and the source's
// sha256 if given), to path via a temporary name. 0, MLM_EIO / MLM_EFULL, or MLM_EINVAL for
// columns that are not whole quant blocks.
int shard_file_write(const gguf_t *src, const shard_slice_t *slice, int head_dim, const uint8_t sha256[32],
                     const char *path, char *err, size_t errlen);

// A columns file: as shard_file_write, but only the matrices an all-reduce slice cuts by columns
// (attn_output, ffn_down and their experts' planes), each holding the slice's columns contiguously,
// and the key meshlm.shard.cols_only. A node streaming its share reads those from it and every other
// tensor from the model file itself, so the cache holds a third of a share instead of all of it.
// MLM_EINVAL for a slice without columns; otherwise as shard_file_write.
int shard_file_write_cols(const gguf_t *src, const shard_slice_t *slice, int head_dim, const uint8_t sha256[32],
                          const char *path, char *err, size_t errlen);

// Whether g is a columns file (shard_file_write_cols): it is not a model, and loads only beside one.
bool shard_file_cols_only(const gguf_t *g);

#endif
