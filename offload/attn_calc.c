// The host device's attention arithmetic over contiguous rows, shared by devices that keep their cache elsewhere.
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/fp16.h"
#include "offload/attn_impl.h"
#include "worker/kernels/ops.h"
#include "worker/kernels/quant.h"

// --- types

// Jobs below this many multiply-adds run on the calling thread (the host device's threshold).
#define PAR_MIN_WORK (65536.0 / 32)

struct attn_calc {
    attn_params_t p;    // the shape (pool borrowed)
    int Hl;             // query heads attended here
    int group;          // query heads per KV head
    size_t kvd;         // elements of a k / v row
    size_t elt;         // bytes per element of the rows ops_attention reads (4 for a Q8_0 cache's F32 copy)
    bool f16;           // F16 cache
    bool q8;            // Q8_0 cache: rows are dequantized into stage first
    size_t row_bytes;   // bytes of a cache row (kvd elements of the cache type)
    float *stage;       // (2, stage_ctx, kvd) a Q8_0 cache's k then v rows in F32; NULL otherwise
    int stage_ctx;      // positions stage holds
    float scale;        // 1 / sqrt(head_dim)
    int n_threads;      // the pool's threads (1 without one)
    float *scratch;     // (n_threads, scratch_per) ops_attention's scratch, 64-byte aligned per thread
    size_t scratch_per; // floats per thread (a multiple of 16)
    int scratch_ctx;    // positions it is sized for
};

// Dequantizes rows [0, n) of a Q8_0 cache's k and v into the F32 stage, rows split between threads.
typedef struct {
    const attn_calc_t *c;
    const uint8_t *kc, *vc; // (n, row_bytes) Q8_0 rows
    int n;
} dequant_job_t;

typedef struct {
    const attn_calc_t *c;
    const uint8_t *kc, *vc; // (pos0 + n, kvd) of the cache type
    const float *q;         // (n, Hl * head_dim)
    float *out;             // (n, Hl * head_dim)
    int n, pos0;
    atomic_int next;        // the next unclaimed chunk of (token, head) items
} calc_job_t;

// (token, head) items per claimed chunk: a causal prefill's later tokens attend over more positions,
// so a static split gave the last thread the most work; threads claim chunks instead.
#define CALC_CHUNKS 8 // chunks per thread

// --- helpers

static void calc_fn(void *arg, int ith, int nth) {
    calc_job_t *job = arg;
    const attn_calc_t *c = job->c;
    const int hd = c->p.head_dim, Hl = c->Hl;
    float *sc = c->scratch + (size_t)ith * c->scratch_per;
    const int n_kv = (job->pos0 + job->n + 31) & ~31; // the reference pads its KV view to 32
    const int total = job->n * Hl, n_chunk = total < nth * CALC_CHUNKS ? total : nth * CALC_CHUNKS;
    for (int ch; (ch = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed)) < n_chunk;) {
        const int i0 = (int)((int64_t)total * ch / n_chunk), i1 = (int)((int64_t)total * (ch + 1) / n_chunk);
        for (int item = i0; item < i1; item++) {
            const int i = item / Hl, hl = item % Hl, kvh = (c->p.h0 + hl) / c->group - c->p.kv0;
            const size_t off = (size_t)kvh * hd * c->elt;
            const size_t qo = (size_t)i * Hl * hd + (size_t)hl * hd;
            ops_attention(job->out + qo, job->q + qo, job->kc + off, job->vc + off, c->kvd, job->pos0 + i + 1, n_kv,
                          hd, c->scale, c->f16, job->n > 1, sc);
        }
    }
}

static void dequant_fn(void *arg, int ith, int nth) {
    const dequant_job_t *job = arg;
    const attn_calc_t *c = job->c;
    const int r0 = (int)((int64_t)job->n * ith / nth), r1 = (int)((int64_t)job->n * (ith + 1) / nth);
    float *ks = c->stage, *vs = c->stage + (size_t)c->stage_ctx * c->kvd;
    if (r1 <= r0) return;
    quant_dequantize_ref(QT_Q8_0, job->kc + (size_t)r0 * c->row_bytes, ks + (size_t)r0 * c->kvd,
                         (int64_t)(r1 - r0) * (int64_t)c->kvd);
    quant_dequantize_ref(QT_Q8_0, job->vc + (size_t)r0 * c->row_bytes, vs + (size_t)r0 * c->kvd,
                         (int64_t)(r1 - r0) * (int64_t)c->kvd);
}

// --- public API

attn_calc_t *attn_calc_new(const attn_params_t *p) {
    attn_calc_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->p = *p;
    c->Hl = p->h1 - p->h0;
    c->group = p->n_head / p->n_head_kv;
    c->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    c->f16 = p->kv_type == QT_F16;
    c->q8 = p->kv_type == QT_Q8_0;
    c->elt = c->f16 ? 2 : 4; // a Q8_0 cache is attended over its F32 copy
    c->row_bytes = attn_row_bytes(p);
    c->scale = 1.0f / sqrtf((float)p->head_dim);
    c->n_threads = p->pool ? tpool_size(p->pool) : 1;
    return c;
}

int attn_calc_reserve(attn_calc_t *c, int n_ctx) {
    if (n_ctx <= c->scratch_ctx) return 0;
    const size_t per = (ops_attention_scratch(n_ctx, c->p.head_dim) + 15) & ~(size_t)15;
    float *sc = NULL;
    if (posix_memalign((void **)&sc, 64, (size_t)c->n_threads * per * sizeof(float)) != 0) return MLM_ENOMEM;
    if (c->q8) {
        float *st = malloc(2 * (size_t)n_ctx * c->kvd * sizeof(float));
        if (!st) {
            free(sc);
            return MLM_ENOMEM;
        }
        free(c->stage);
        c->stage = st;
        c->stage_ctx = n_ctx;
    }
    free(c->scratch);
    c->scratch = sc;
    c->scratch_per = per;
    c->scratch_ctx = n_ctx;
    return 0;
}

void attn_calc_run(attn_calc_t *c, const void *kc, const void *vc, const float *q, int n, int pos0, float *out) {
    const double work = (double)n * c->Hl * (pos0 + n) * c->p.head_dim;
    if (c->q8) { // dequantize the rows attended over, then the F32 arithmetic on the copy
        dequant_job_t dj = {c, kc, vc, pos0 + n};
        const double dw = (double)(pos0 + n) * (double)c->kvd;
        if (!c->p.pool) dequant_fn(&dj, 0, 1);
        else tpool_run_n(c->p.pool, dequant_fn, &dj, dw < PAR_MIN_WORK * 4 ? 1 : c->n_threads);
        kc = c->stage;
        vc = c->stage + (size_t)c->stage_ctx * c->kvd;
    }
    calc_job_t job = {.c = c, .kc = kc, .vc = vc, .q = q, .out = out, .n = n, .pos0 = pos0};
    atomic_init(&job.next, 0);
    if (!c->p.pool) calc_fn(&job, 0, 1);
    else tpool_run_n(c->p.pool, calc_fn, &job, work < PAR_MIN_WORK ? 1 : c->n_threads);
}

void attn_calc_free(attn_calc_t **self_p) {
    if (!self_p || !*self_p) return;
    free((*self_p)->scratch);
    free((*self_p)->stage);
    free(*self_p);
    *self_p = NULL;
}

size_t attn_row_bytes(const attn_params_t *p) {
    const size_t kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    switch (p->kv_type) {
    case QT_F16: return kvd * 2;
    case QT_Q8_0: return qtype_row_size(QT_Q8_0, (int64_t)kvd);
    default: return kvd * 4;
    }
}

void attn_store_rows(void *dst, const float *src, size_t cnt, qtype_t t) {
    if (t == QT_Q8_0) {
        quant_quantize_ref(QT_Q8_0, src, dst, (int64_t)cnt);
        return;
    }
    if (t != QT_F16) {
        memcpy(dst, src, cnt * 4);
        return;
    }
    mlm_f16_t *d = dst;
    for (size_t i = 0; i < cnt; i++) d[i] = mlm_f32_to_f16(src[i]);
}
