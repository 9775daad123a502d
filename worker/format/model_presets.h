// Shapes of well-known llama-architecture models, for gen-model and for planning without a file.
#ifndef MESHLM_MODEL_PRESETS_H
#define MESHLM_MODEL_PRESETS_H

#include <stdint.h>

typedef struct {
    const char *name;        // preset id: "tinyllama-1.1b"
    const char *display;     // general.name base: "TinyLlama 1.1B"
    int n_embd;              // model dimension
    int n_layer;             // transformer blocks
    int n_head;              // query heads
    int n_head_kv;           // key/value heads (GQA when < n_head)
    int n_ff;                // FFN hidden size (per expert for MoE)
    int n_vocab;             // vocabulary size
    int n_ctx;               // training context length
    float rope_base;         // RoPE frequency base
    float rms_eps;           // RMSNorm epsilon
    int n_expert;            // 0 for dense
    int n_expert_used;       // experts per token (0 for dense)
} model_preset_t;

// The preset named name (case-insensitive), or NULL.
const model_preset_t *model_preset_find(const char *name);

// The i-th preset for listing, or NULL past the end.
const model_preset_t *model_preset_at(int i);

#endif
