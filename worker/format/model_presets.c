// Table of model shapes (published hyperparameters of each model family).
#include "worker/format/model_presets.h"

#include <stddef.h>
#include <strings.h>

// --- table

static const model_preset_t presets[] = {
    // name            display            dim  layer head kv   ff     vocab   ctx   rope   eps   E  k
    {"tiny", "meshlm tiny", 64, 2, 4, 2, 128, 32000, 512, 10000.0f, 1e-5f, 0, 0},
    {"tiny-k", "meshlm tiny-k", 256, 2, 4, 2, 512, 32000, 512, 10000.0f, 1e-5f, 0, 0},
    {"tinyllama-1.1b", "TinyLlama 1.1B", 2048, 22, 32, 4, 5632, 32000, 2048, 10000.0f, 1e-5f, 0, 0},
    {"llama-2-7b", "Llama 2 7B", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0f, 1e-5f, 0, 0},
    {"llama-2-13b", "Llama 2 13B", 5120, 40, 40, 40, 13824, 32000, 4096, 10000.0f, 1e-5f, 0, 0},
    {"llama-2-70b", "Llama 2 70B", 8192, 80, 64, 8, 28672, 32000, 4096, 10000.0f, 1e-5f, 0, 0},
    {"llama-3-8b", "Llama 3 8B", 4096, 32, 32, 8, 14336, 128256, 8192, 500000.0f, 1e-5f, 0, 0},
    {"mixtral-8x7b", "Mixtral 8x7B", 4096, 32, 32, 8, 14336, 32000, 32768, 1000000.0f, 1e-5f, 8, 2},
};

// --- public API

const model_preset_t *model_preset_find(const char *name) {
    if (!name) return NULL;
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++)
        if (!strcasecmp(presets[i].name, name)) return &presets[i];
    return NULL;
}

const model_preset_t *model_preset_at(int i) {
    if (i < 0 || (size_t)i >= sizeof presets / sizeof presets[0]) return NULL;
    return &presets[i];
}
