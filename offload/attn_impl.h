// For attention/KV device implementations: the function table and the wrapper that checks
// arguments, tracks each sequence's length per layer and counts calls for them.
#ifndef MESHLM_OFFLOAD_ATTN_IMPL_H
#define MESHLM_OFFLOAD_ATTN_IMPL_H

#include "offload/attn.h"

// The calls a device implements over its ctx. The wrapper has checked everything attn.h promises
// before a call: seq is allocated (except for seq_new), layer and positions are in range, rows are
// not NULL, append does not skip a position, attend reads appended positions only.
struct attn_dev_i {
    int (*seq_new)(void *ctx, int seq, int n_ctx);                                              // required
    int (*append)(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n); // required
    int (*attend)(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out);    // required
    void (*seq_drop)(void *ctx, int seq);       // optional (NULL: nothing to free)
    void (*stats)(void *ctx, attn_stats_t *out); // optional: the device's fields (the wrapper sets the rest)
    void (*free)(void *ctx);                    // optional
};

// Wraps an implementation into the public object (p is copied, n_seq_max 0 made 1). NULL when out
// of memory (ctx is then freed with iface->free). name is copied.
attn_dev_t *attn_dev_wrap(const struct attn_dev_i *iface, void *ctx, const char *name, const attn_params_t *p);

// Checks a shape: 0, or MLM_EINVAL / MLM_EUNSUPPORTED with a message.
int attn_params_check(const attn_params_t *p, char *err, size_t errlen);

// A device's constructor; arg is the text after "name:" ("" when none). p has passed
// attn_params_check.
typedef int (*attn_dev_new_fn)(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen);

// Adds a device to the registry attn_dev_new looks names up in (the built-ins are always there),
// for devices that live in a higher layer (one that talks to a storage process over a transport).
// 0, MLM_EINVAL (empty name, a ':' in it, over 31 characters), MLM_ESTATE (the name is taken),
// MLM_EFULL (16 devices).
int attn_dev_register(const char *name, attn_dev_new_fn make);

// --- the devices

int attn_host_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen);

#endif
