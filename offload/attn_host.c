// The reference attention/KV device: each sequence's cache is two flat arrays in this process's
// memory, (n_layer, n_ctx, KV row) of F16 or F32, and attend runs ops_attention (llama.cpp's sums)
// for every (query row, head), split between the pool's threads.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/fp16.h"
#include "offload/attn_impl.h"
#include "worker/kernels/ops.h"

// Jobs below this many multiply-adds run on the calling thread: waking a worker costs more.
#define PAR_MIN_WORK (65536.0 / 32)

typedef struct {
    uint8_t *k, *v;     // (n_layer, n_ctx, kvd) of the cache type; NULL when not allocated
    int n_ctx;
} host_seq_t;

typedef struct {
    attn_params_t p;
    int Hl;             // query heads attended here
    int group;          // query heads per KV head
    size_t kvd;         // floats of a k / v row: (kv1 - kv0) * head_dim
    size_t elt;         // bytes per cache element
    bool f16;
    float scale;        // 1 / sqrt(head_dim)
    host_seq_t *seqs;   // (n_seq_max)
    float *scratch;     // (n_threads, scratch_per) per-thread scratch of ops_attention, 64-byte aligned
    size_t scratch_per; // floats per thread (a multiple of 16)
    int scratch_ctx;    // the n_ctx it is sized for
    int n_threads;
    uint64_t kv_bytes;
} host_t;

static int host_seq_new(void *ctx, int seq, int n_ctx) {
    host_t *h = ctx;
    host_seq_t *s = &h->seqs[seq];
    const size_t bytes = (size_t)h->p.n_layer * (size_t)n_ctx * h->kvd * h->elt;
    if (n_ctx > h->scratch_ctx) { // scratch grows with the longest sequence
        // each thread's part starts on its own cache line: threads never write a line another writes
        const size_t per = (ops_attention_scratch(n_ctx, h->p.head_dim) + 15) & ~(size_t)15;
        float *sc = NULL;
        if (posix_memalign((void **)&sc, 64, (size_t)h->n_threads * per * sizeof(float)) != 0) return MLM_ENOMEM;
        free(h->scratch);
        h->scratch = sc;
        h->scratch_per = per;
        h->scratch_ctx = n_ctx;
    }
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
    h->kv_bytes -= 2 * (size_t)h->p.n_layer * (size_t)s->n_ctx * h->kvd * h->elt;
    free(s->k);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int host_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    host_t *h = ctx;
    const host_seq_t *s = &h->seqs[seq];
    const size_t at = ((size_t)layer * (size_t)s->n_ctx + (size_t)pos) * h->kvd * h->elt;
    const size_t cnt = (size_t)n * h->kvd;
    if (!h->f16) {
        memcpy(s->k + at, k, cnt * 4);
        memcpy(s->v + at, v, cnt * 4);
        return 0;
    }
    mlm_f16_t *k16 = (mlm_f16_t *)(s->k + at), *v16 = (mlm_f16_t *)(s->v + at);
    for (size_t i = 0; i < cnt; i++) {
        k16[i] = mlm_f32_to_f16(k[i]);
        v16[i] = mlm_f32_to_f16(v[i]);
    }
    return 0;
}

typedef struct {
    const host_t *h;
    const uint8_t *kc, *vc;  // the layer's cache
    const float *q;
    float *out;
    int n, pos0;
} att_job_t;

static void attend_fn(void *arg, int ith, int nth) {
    const att_job_t *job = arg;
    const host_t *h = job->h;
    const int hd = h->p.head_dim, Hl = h->Hl;
    float *sc = h->scratch + (size_t)ith * h->scratch_per;
    const int n_kv = (job->pos0 + job->n + 31) & ~31; // the reference pads its KV view to 32
    const int total = job->n * Hl;
    for (int item = total * ith / nth; item < total * (ith + 1) / nth; item++) {
        const int i = item / Hl, hl = item % Hl, kvh = (h->p.h0 + hl) / h->group - h->p.kv0;
        const size_t off = (size_t)kvh * hd * h->elt;
        const size_t qo = (size_t)i * Hl * hd + (size_t)hl * hd;
        ops_attention(job->out + qo, job->q + qo, job->kc + off, job->vc + off, h->kvd, job->pos0 + i + 1, n_kv, hd,
                      h->scale, h->f16, job->n > 1, sc);
    }
}

static int host_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    host_t *h = ctx;
    const host_seq_t *s = &h->seqs[seq];
    const size_t lay = (size_t)layer * (size_t)s->n_ctx * h->kvd * h->elt;
    att_job_t job = {h, s->k + lay, s->v + lay, q, out, n, pos0};
    // Heads are independent: split them between threads as soon as there is a little work.
    const double work = (double)n * h->Hl * (pos0 + n) * h->p.head_dim;
    if (!h->p.pool) attend_fn(&job, 0, 1);
    else tpool_run_n(h->p.pool, attend_fn, &job, work < PAR_MIN_WORK ? 1 : h->n_threads);
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
    free(h->scratch);
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
    h->Hl = p->h1 - p->h0;
    h->group = p->n_head / p->n_head_kv;
    h->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    h->f16 = p->kv_type == QT_F16;
    h->elt = h->f16 ? 2 : 4;
    h->scale = 1.0f / sqrtf((float)p->head_dim);
    h->n_threads = p->pool ? tpool_size(p->pool) : 1;
    h->seqs = calloc((size_t)h->p.n_seq_max, sizeof *h->seqs);
    if (!h->seqs) {
        host_free(h);
        return MLM_ENOMEM;
    }
    if (!(*out = attn_dev_wrap(&host_iface, h, "host", &h->p))) return MLM_ENOMEM;
    return 0;
}
