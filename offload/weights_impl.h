// For weight provider implementations: the function table, the wrapper that checks arguments and
// counts calls for them, and the tensor lookups every provider makes the same way.
#ifndef MESHLM_OFFLOAD_WEIGHTS_IMPL_H
#define MESHLM_OFFLOAD_WEIGHTS_IMPL_H

#include "offload/weights.h"

// The calls a provider implements over its ctx. The wrapper has checked every id before a call:
// layer is a block of the slice with WEIGHTS_DENSE or a valid expert, or a held global unit. One
// provider serves every context of a model, so calls may come from several threads at once.
struct weights_i {
    // Required. Sets *out (valid until the matching release) or returns a negative MLM_ code.
    int (*acquire)(void *ctx, int layer, int expert, const layer_weights_t **out);
    // Optional (NULL: nothing to do). Called once per successful acquire, in any order.
    void (*release)(void *ctx, int layer, int expert);
    // Optional (NULL: hints are dropped). Must not block on I/O.
    void (*prefetch)(void *ctx, int layer, const int *experts, int n);
    // Optional (NULL: zeros). Fills the provider's fields; the wrapper sets acquires, releases, prefetches.
    void (*stats)(void *ctx, weights_stats_t *out);
    // Optional (NULL: the provider's name). One line on how the provider holds the weights.
    void (*describe)(void *ctx, char *buf, size_t cap);
    // Optional. Frees ctx.
    void (*free)(void *ctx);
    // Optional (NULL: ignored). The residual stream entering block layer's FFN (weights_observe);
    // must copy what it keeps and not block on I/O.
    void (*observe)(void *ctx, int layer, const float *x, int n);
    // Optional (NULL: none). The bound matrix of a tensor (weights_matrix).
    mm_weight_t *(*matrix)(void *ctx, const char *name, int plane, int64_t *r0, int64_t *c0, int64_t *c1);
};

// Which unit ids a provider holds, for the wrapper's checks.
typedef struct {
    int n_layer;      // the model's blocks
    int n_expert;     // the model's experts per block (0: dense)
    int l0, l1;       // blocks held
    bool has_in;      // WEIGHTS_IN held (first stage)
    bool has_out;     // WEIGHTS_OUT held (last stage)
} weights_info_t;

// Wraps an implementation into the public object. NULL when out of memory (ctx is then freed with
// iface->free). name is copied.
weights_t *weights_wrap(const struct weights_i *iface, void *ctx, const char *name, const weights_info_t *info);

// The unit ids a slice holds, from the model's shapes.
weights_info_t weights_info_for(const model_hparams_t *hp, const shard_slice_t *slice);

// A provider's constructor; arg is the text after "name:" ("" when none).
typedef int (*weights_new_fn)(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen);

// Adds a provider to the registry weights_new looks names up in (the built-ins are always there),
// for implementations that live in a higher layer. 0, MLM_EINVAL (empty name, a ':' in it, over 31
// characters), MLM_ESTATE (the name is taken), MLM_EFULL (16 providers).
int weights_register(const char *name, weights_new_fn make);

// --- tensor lookups shared by providers (all checks a provider makes before reading a byte)

// Finds tensor name in p->g and checks its shape: ne[i] == want[i] for i < nd (-1 = any), 1 beyond.
// NULL when absent (*rc = MLM_EFORMAT with a message if required) or shaped otherwise (*rc set).
const gguf_tensor_t *weights_want_tensor(const weights_params_t *p, const char *name, int nd, int64_t w0,
                                         int64_t w1, int64_t w2, bool required, int *rc, char *err,
                                         size_t errlen);

// The token embedding when the slice needs it (info->has_in, or a tied output): checks its type and rows and,
// when info->has_in, fills *rows (type, cols, row bytes, the slice's vocabulary rows and their bytes). 0 (*t NULL
// when not needed), or MLM_EFORMAT / MLM_EUNSUPPORTED with a message.
int weights_tok_embd(const weights_params_t *p, const weights_info_t *info, weights_rows_t *rows,
                     const gguf_tensor_t **t, char *err, size_t errlen);

// The optional rope_freqs.weight (F32, n_rot/2 values): 0 with *t NULL when absent, or MLM_EFORMAT.
int weights_rope_freqs(const weights_params_t *p, const gguf_tensor_t **t, char *err, size_t errlen);

// Where the slice's rows of a matrix of full shape [cols, full_rows(, planes)] are.
typedef struct {
    const gguf_tensor_t *t;   // the file's tensor; NULL when the slice holds none of its rows
    int64_t r0, r1;           // rows of the full tensor the slice holds (r1 <= r0: none)
    int64_t skip;             // rows of the file's tensor (per plane) before row r0: r0, or 0 in a shard file
    int planes;               // planes (experts) of a 3-D tensor, 1 for a matrix
    const shard_slice_t *held; // a shard file of placed experts: it stores only the experts this slice
                               // holds (shard_expert_plane maps an expert to its plane); NULL = every plane
} weights_loc_t;

// Finds the matrix and checks the rows the file holds for the slice. planes > 1: a 3-D expert
// tensor (a shard file of placed experts holds only the slice's experts: loc->t is NULL when it
// holds none). 0, or MLM_EFORMAT with a message.
int weights_locate(const weights_params_t *p, const char *name, int64_t cols, int64_t full_rows, int planes,
                   weights_loc_t *loc, char *err, size_t errlen);

// The bytes of plane (expert) `plane`'s rows [r0, r1) in the file (loc->t != NULL; with loc->held,
// an expert the slice holds).
static inline const uint8_t *weights_loc_data(const weights_loc_t *loc, int plane) {
    const size_t rb = qtype_row_size(loc->t->type, loc->t->ne[0]);
    if (loc->held) plane = shard_expert_plane(loc->held, plane);
    return (const uint8_t *)loc->t->data + ((size_t)plane * (size_t)loc->t->ne[1] + (size_t)loc->skip) * rb;
}

// --- the providers

int weights_mmap_new(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen);
int weights_window_new(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen);
int weights_experts_new(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen);

#endif
