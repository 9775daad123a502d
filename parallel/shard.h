// Model slices: which rows of each tensor a tensor-parallel node holds, and shard files that store them.
#ifndef MESHLM_SHARD_H
#define MESHLM_SHARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/format/gguf.h"

// A node's share of a llama-family model. Every matrix is cut by output rows only.
typedef struct {
    int h0, h1;    // query heads [h0, h1): rows [h0*head_dim, h1*head_dim) of attn_q
    int kv0, kv1;  // KV heads [kv0, kv1): rows of attn_k and attn_v
    int e0, e1;    // hidden rows [e0, e1) of attn_output and ffn_down (per expert)
    int f0, f1;    // FFN units [f0, f1): rows of ffn_gate and ffn_up (per expert)
    int v0, v1;    // vocabulary rows [v0, v1) of output and token_embd
    int l0, l1;    // transformer blocks [l0, l1) (a pipeline stage). The first stage (l0 == 0) holds
                   // the embedding rows, the last (l1 == n_layer) output_norm and the output rows;
                   // a middle stage holds neither. l0 == l1 == 0 with nothing else: an empty slice.
} shard_slice_t;

// The slice that holds everything.
shard_slice_t shard_full(int n_layer, int n_head, int n_head_kv, int n_embd, int n_ff, int n_vocab);

// Whether a slice holds tensor `name` at all: blocks outside [l0, l1) are left out, token_embd
// belongs to the first stage (and to the last when tied is set: it is then the output matrix),
// output_norm and output to the last stage. Other names (rope_freqs) are always held.
bool shard_holds_tensor(const shard_slice_t *s, const char *name, int n_layer, bool tied);

// Rows [*r0, *r1) of tensor `name` (ne[1] rows of ne[0]) that a slice holds; the whole tensor for
// vectors and tensors the slice does not cut (norms, router, rope factors). head_dim converts heads.
void shard_tensor_rows(const shard_slice_t *s, const char *name, int64_t ne1, int head_dim, int64_t *r0, int64_t *r1);

// Reads the meshlm.shard.* keys of a shard file. 0 and *is_shard = true when present (slice set),
// 0 and false for an ordinary model file, MLM_EFORMAT when the keys are inconsistent. A shard file
// without l0/l1 keys (written before pipeline stages) holds every block: l0 = 0, l1 = -1 (the
// caller substitutes n_layer).
int shard_file_slice(const gguf_t *g, shard_slice_t *slice, bool *is_shard);

// Writes a GGUF holding only the rows of slice from src (all metadata copied, plus meshlm.shard.*
// keys and the source's sha256 if given), to path via a temporary name. 0 or MLM_EIO / MLM_EFULL.
int shard_file_write(const gguf_t *src, const shard_slice_t *slice, int head_dim, const uint8_t sha256[32],
                     const char *path, char *err, size_t errlen);

#endif
