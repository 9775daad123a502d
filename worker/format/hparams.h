// Llama-family hyperparameters read from a GGUF file's metadata and tensor table (no weights touched).
#ifndef MESHLM_HPARAMS_H
#define MESHLM_HPARAMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/format/gguf.h"

typedef struct {
    char arch[32];         // general.architecture ("llama")
    int n_vocab;           // rows of token_embd (meshlm.shard.n_vocab in a shard file)
    int n_embd;            // hidden size
    int n_layer;           // transformer blocks
    int n_head;            // query heads
    int n_head_kv;         // key/value heads (GQA when < n_head)
    int head_dim;          // n_embd / n_head unless the file says otherwise
    int n_rot;             // rotated dims per head (rope.dimension_count)
    int n_ff;              // FFN hidden size (per expert for MoE)
    int n_expert;          // 0 for dense
    int n_expert_used;     // top-k
    int n_ctx_train;       // context_length
    float rms_eps;         // layer_norm_rms_epsilon
    float rope_base;       // rope.freq_base (10000 when absent)
    float rope_freq_scale; // 1 / rope.scaling.factor for linear scaling, else 1
    bool tied_output;      // no output.weight: token_embd is the output matrix
    int64_t n_params;      // elements of all tensors
    size_t weight_bytes;   // bytes of all tensors in the file
    char type_name[16];    // the dominant weight type among the matrices ("Q4_0")
} model_hparams_t;

// Reads and checks the hyperparameters of an opened GGUF. 0, or MLM_EUNSUPPORTED (another
// architecture) / MLM_EFORMAT (a key missing or inconsistent) with the file and key named in err.
int hparams_read(const gguf_t *g, model_hparams_t *hp, char *err, size_t errlen);

#endif
