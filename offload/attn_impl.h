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

// --- the host's attention arithmetic, for devices that keep their cache their own way

// Runs exactly what the host device runs (ops_attention per (query row, head), heads split between
// the pool's threads) over a layer's cache handed over as contiguous rows: a device that pages or
// simulates its cache gives the host's bits by gathering the rows it attends over into one buffer.
typedef struct attn_calc attn_calc_t;

// For shape p (borrowed pool). NULL when out of memory.
attn_calc_t *attn_calc_new(const attn_params_t *p);

// Grows the scratch (and for a Q8_0 cache the F32 copy of one layer's k and v rows, 2 x n_ctx x kvd
// floats) for sequences of up to n_ctx positions: 0 or MLM_ENOMEM.
int attn_calc_reserve(attn_calc_t *c, int n_ctx);

// out (n, (h1 - h0) * head_dim) = attention of the n query rows q at positions [pos0, pos0 + n) over
// kc, vc: (pos0 + n, (kv1 - kv0) * head_dim) rows of the cache type (F16, F32, or Q8_0: dequantized
// into an F32 copy of those rows first, then the F32 arithmetic). Needs attn_calc_reserve for at least
// pos0 + n positions first.
void attn_calc_run(attn_calc_t *c, const void *kc, const void *vc, const float *q, int n, int pos0, float *out);

// Frees; accepts NULL and NULLs the pointer.
void attn_calc_free(attn_calc_t **self_p);

// Stores cnt floats (whole rows) as the cache type t: F32 copied, F16 rounded as the host device rounds,
// Q8_0 quantized as llama.cpp's reference does (cnt a multiple of 32).
void attn_store_rows(void *dst, const float *src, size_t cnt, qtype_t t);

// Bytes of one k (or v) row, (kv1 - kv0) * head_dim elements, in the cache type.
size_t attn_row_bytes(const attn_params_t *p);

// --- the devices

int attn_host_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen);
// "file:DIR[,ram=SIZE][,block=N][,cache=N]": paged KV, RAM then files in DIR (offload/attn_file.c)
int attn_file_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen);
// "pim:PRESET": host arithmetic, time and energy from a DRAM-bank PIM timing model (offload/attn_pim.c)
int attn_pim_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen);

#endif
