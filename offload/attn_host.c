// The reference attention/KV device: each sequence's cache is two flat arrays in this process's
// memory, (n_layer, n_ctx, KV row) of F16, F32 or Q8_0 blocks, and attend runs llama.cpp's sums (attn_calc:
// ops_attention for every (query row, head), split between the pool's threads).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "offload/attn_impl.h"

typedef struct {
    uint8_t *k, *v;     // (n_layer, n_ctx, kvd) of the cache type; NULL when not allocated
    int n_ctx;
} host_seq_t;

typedef struct {
    attn_params_t p;
    attn_calc_t *calc;  // the arithmetic and its scratch
    size_t kvd;         // floats of a k / v row: (kv1 - kv0) * head_dim
    size_t row_bytes;   // bytes of a k / v row in the cache type
    host_seq_t *seqs;   // (n_seq_max)
    uint64_t kv_bytes;
} host_t;

static int host_seq_new(void *ctx, int seq, int n_ctx) {
    host_t *h = ctx;
    host_seq_t *s = &h->seqs[seq];
    const size_t bytes = (size_t)h->p.n_layer * (size_t)n_ctx * h->row_bytes;
    if (attn_calc_reserve(h->calc, n_ctx) != 0) return MLM_ENOMEM; // scratch grows with the longest sequence
    s->k = calloc(1, bytes + 1);
    s->v = calloc(1, bytes + 1);
    if (!s->k || !s->v) {
        free(s->k);
        free(s->v);
        s->k = s->v = NULL;
        return MLM_ENOMEM;
    }
    s->n_ctx = n_ctx;
    h->kv_bytes += 2 * bytes;
    return 0;
}

static void host_seq_drop(void *ctx, int seq) {
    host_t *h = ctx;
    host_seq_t *s = &h->seqs[seq];
    h->kv_bytes -= 2 * (size_t)h->p.n_layer * (size_t)s->n_ctx * h->row_bytes;
    free(s->k);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int host_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    host_t *h = ctx;
    const host_seq_t *s = &h->seqs[seq];
    const size_t at = ((size_t)layer * (size_t)s->n_ctx + (size_t)pos) * h->row_bytes;
    const size_t cnt = (size_t)n * h->kvd;
    attn_store_rows(s->k + at, k, cnt, h->p.kv_type);
    attn_store_rows(s->v + at, v, cnt, h->p.kv_type);
    return 0;
}

static int host_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    host_t *h = ctx;
    const host_seq_t *s = &h->seqs[seq];
    const size_t lay = (size_t)layer * (size_t)s->n_ctx * h->row_bytes;
    attn_calc_run(h->calc, s->k + lay, s->v + lay, q, n, pos0, out);
    return 0;
}

static void host_stats(void *ctx, attn_stats_t *out) {
    const host_t *h = ctx;
    out->kv_bytes = h->kv_bytes;
    out->kv_bytes_ram = h->kv_bytes;
}

static void host_free(void *ctx) {
    host_t *h = ctx;
    if (!h) return;
    for (int s = 0; h->seqs && s < h->p.n_seq_max; s++)
        if (h->seqs[s].n_ctx) host_seq_drop(h, s);
    free(h->seqs);
    attn_calc_free(&h->calc);
    free(h);
}

static const struct attn_dev_i host_iface = {
    .seq_new = host_seq_new,
    .append = host_append,
    .attend = host_attend,
    .seq_drop = host_seq_drop,
    .stats = host_stats,
    .free = host_free,
};

int attn_host_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen) {
    *out = NULL;
    if (arg && *arg) return mlm_fail(err, errlen, MLM_EINVAL, "attention device host takes no argument (got '%s')", arg);
    int rc = attn_params_check(p, err, errlen);
    if (rc != 0) return rc;
    host_t *h = calloc(1, sizeof *h);
    if (!h) return MLM_ENOMEM;
    h->p = *p;
    if (h->p.n_seq_max < 1) h->p.n_seq_max = 1;
    h->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    h->row_bytes = attn_row_bytes(p);
    h->seqs = calloc((size_t)h->p.n_seq_max, sizeof *h->seqs);
    h->calc = attn_calc_new(&h->p);
    if (!h->seqs || !h->calc) {
        host_free(h);
        return MLM_ENOMEM;
    }
    if (!(*out = attn_dev_wrap(&host_iface, h, "host", &h->p))) return MLM_ENOMEM;
    return 0;
}
