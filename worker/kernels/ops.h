// Element-wise and attention operators of the forward pass (pure functions over buffers).
#ifndef MESHLM_OPS_H
#define MESHLM_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/fp16.h"

// y = x / rms(x) * w over n elements (y may alias x).
void ops_rmsnorm(float *y, const float *x, const float *w, int n, float eps);

// Rotates adjacent pairs of the first n_rot dims of each of n_heads heads (head_dim apart) by
// pos * base^(-i/n_rot) * freq_scale / freq_factors[i/2] (llama's NORM mode). freq_factors may be NULL.
void ops_rope(float *x, int n_heads, int head_dim, int n_rot, int pos, float base, float freq_scale,
              const float *freq_factors);

// g = silu(g) * u over rows x cols (row-major, rows restart the reference's 16-element blocks).
void ops_silu_mul(float *g, const float *u, int rows, int cols);

// Floats of scratch one ops_attention call needs for up to n_ctx cached positions.
size_t ops_attention_scratch(int n_ctx, int head_dim);

// One attention head for one query: out = softmax(scale * q.K^T) V over npos cached positions.
// k, v: npos rows, row_stride elements apart, of F16 (f16 = true) or F32 values. With an F16 cache
// q and the probabilities are rounded to F16 as llama.cpp's F16 matmuls do. The reference's
// arithmetic depends on how it was called: batched = the query came in a batch of 2+ tokens;
// n_kv = the padded cache length it attended over (pad32 of the last position + 1 in the batch).
// scratch: ops_attention_scratch(n_ctx, head_dim) floats with n_ctx >= n_kv and >= npos.
void ops_attention(float *out, const float *q, const void *k, const void *v, size_t row_stride, int npos, int n_kv,
                   int head_dim, float scale, bool f16, bool batched, float *scratch);

// Tests: true makes every operator here take its scalar path (which gives the same bits as the
// vector one); not thread-safe against running operators.
void ops_force_scalar(bool on);

// Mixture-of-experts gating: softmax over n_expert logits, keep the k largest (ggml's argsort
// order), renormalize their weights to sum to 1. sel: (k) chosen experts in rank order, w: (k) their weights.
void ops_topk_route(const float *logits, int n_expert, int k, int *sel, float *w);

#endif
