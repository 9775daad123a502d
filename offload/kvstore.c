// The KV store's engine: an attention/KV device over one sparse file per sequence, appended with pwrite
// and attended in place through a read-only mapping with ops_attention (the host device's arithmetic).
#include "offload/kvstore.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/fp16.h"
#include "offload/attn_impl.h"
#include "worker/kernels/ops.h"

// --- types

// Jobs below this many multiply-adds run on the calling thread (as the host device decides).
#define KVS_PAR_MIN_WORK (65536.0 / 32)
#define KVS_PATH_MAX 1024

typedef struct {
    int fd;              // the sequence file, -1 when not allocated
    uint8_t *map;        // (n_layer, 2, n_ctx, row_bytes) read-only mapping of the whole file
    size_t map_len;      // its bytes
    int n_ctx;
    int *len;            // (n_layer) positions held per layer
    char path[KVS_PATH_MAX + 192]; // dir + "/" + prefix + "-s<seq>.kv"
} kvs_seq_t;

typedef struct {
    attn_params_t p;
    char dir[KVS_PATH_MAX];
    char prefix[128];
    double internal_bw;  // bytes/s, 0 = no model
    char *errbuf;        // the owner's detail buffer (may be NULL)
    size_t errcap;
    int Hl;              // query heads attended here
    int group;           // query heads per KV head
    size_t kvd;          // elements of a k / v row
    size_t elt;          // bytes per cache element
    size_t row_bytes;    // kvd * elt
    bool f16;
    float scale;         // 1 / sqrt(head_dim)
    kvs_seq_t *seqs;     // (n_seq_max)
    uint8_t *conv;       // (conv_cap) rows converted to the cache type before they are written
    size_t conv_cap;
    float *scratch;      // (n_threads, scratch_per) ops_attention scratch, 64-byte aligned
    size_t scratch_per;  // floats per thread (a multiple of 16)
    int scratch_ctx;     // the n_ctx it is sized for
    int n_threads;
    uint64_t kv_bytes, bytes_read, bytes_written;
    double time_ms, flash_ms;
} kvs_t;

typedef struct {
    const kvs_t *s;
    const uint8_t *kc, *vc; // the layer's k and v rows (mapped)
    const float *q;
    float *out;
    int n, pos0;
} kvs_job_t;

// --- helpers

__attribute__((format(printf, 3, 4)))
static int kvs_fail(kvs_t *s, int code, const char *fmt, ...) {
    if (s->errbuf && s->errcap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->errbuf, s->errcap, fmt, ap);
        va_end(ap);
    }
    return code;
}

// MLM_EFULL for the errors that mean the drive (or the caller's share of it) is full.
static int io_code(int e) { return e == ENOSPC || e == EDQUOT || e == EFBIG ? MLM_EFULL : MLM_EIO; }

// Writes len bytes at off, resuming after short writes.
static int write_all(kvs_t *s, const kvs_seq_t *q, const uint8_t *buf, size_t len, off_t off, int layer) {
    while (len > 0) {
        ssize_t w = pwrite(q->fd, buf, len, off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            const int e = w < 0 ? errno : ENOSPC;
            return kvs_fail(s, io_code(e), "%s: %s (appending to layer %d)", q->path, strerror(e), layer);
        }
        buf += w;
        len -= (size_t)w;
        off += w;
    }
    return 0;
}

static void seq_close(kvs_t *s, kvs_seq_t *q) {
    if (q->map) munmap(q->map, q->map_len);
    if (q->fd >= 0) {
        close(q->fd);
        unlink(q->path);
    }
    for (int l = 0; l < s->p.n_layer; l++) s->kv_bytes -= 2 * (uint64_t)q->len[l] * s->row_bytes;
    int *len = q->len;
    memset(len, 0, (size_t)s->p.n_layer * sizeof *len);
    memset(q, 0, sizeof *q);
    q->len = len;
    q->fd = -1;
}

// --- the device

static int kvs_seq_new(void *ctx, int seq, int n_ctx) {
    kvs_t *s = ctx;
    kvs_seq_t *q = &s->seqs[seq];
    if (n_ctx > s->scratch_ctx) { // scratch grows with the longest sequence
        const size_t per = (ops_attention_scratch(n_ctx, s->p.head_dim) + 15) & ~(size_t)15;
        float *sc = NULL;
        if (posix_memalign((void **)&sc, 64, (size_t)s->n_threads * per * sizeof(float)) != 0) return MLM_ENOMEM;
        free(s->scratch);
        s->scratch = sc;
        s->scratch_per = per;
        s->scratch_ctx = n_ctx;
    }
    snprintf(q->path, sizeof q->path, "%s/%s-s%d.kv", s->dir, s->prefix, seq);
    const size_t len = 2 * (size_t)s->p.n_layer * (size_t)n_ctx * s->row_bytes;
    q->fd = open(q->path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (q->fd < 0) return kvs_fail(s, io_code(errno), "%s: cannot create: %s", q->path, strerror(errno));
    if (ftruncate(q->fd, (off_t)len) != 0) {
        const int e = errno;
        seq_close(s, q);
        return kvs_fail(s, io_code(e), "%s: cannot size to %zu bytes: %s", q->path, len, strerror(e));
    }
    q->map = mmap(NULL, len, PROT_READ, MAP_SHARED, q->fd, 0);
    if (q->map == MAP_FAILED) {
        const int e = errno;
        q->map = NULL;
        seq_close(s, q);
        return kvs_fail(s, e == ENOMEM ? MLM_ENOMEM : MLM_EIO, "%s: cannot map %zu bytes: %s", q->path, len, strerror(e));
    }
    q->map_len = len;
    q->n_ctx = n_ctx;
    return 0;
}

static void kvs_seq_drop(void *ctx, int seq) {
    kvs_t *s = ctx;
    seq_close(s, &s->seqs[seq]);
}

// Converts cnt floats to the cache type in s->conv (grown as needed). NULL when out of memory.
static const uint8_t *to_cache(kvs_t *s, const float *x, size_t cnt) {
    if (!s->f16) return (const uint8_t *)x;
    if (cnt * 2 > s->conv_cap) {
        uint8_t *b = realloc(s->conv, cnt * 2);
        if (!b) return NULL;
        s->conv = b;
        s->conv_cap = cnt * 2;
    }
    mlm_f16_t *h = (mlm_f16_t *)s->conv;
    for (size_t i = 0; i < cnt; i++) h[i] = mlm_f32_to_f16(x[i]);
    return s->conv;
}

static int kvs_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    kvs_t *s = ctx;
    kvs_seq_t *q = &s->seqs[seq];
    const double t0 = mlm_now_ms();
    const size_t cnt = (size_t)n * s->kvd, bytes = (size_t)n * s->row_bytes;
    const off_t kat = (off_t)(((size_t)2 * layer * q->n_ctx + (size_t)pos) * s->row_bytes);
    const off_t vat = kat + (off_t)((size_t)q->n_ctx * s->row_bytes);
    // the layer forgets what lay past pos first, so a failed write leaves it short, never stale
    s->kv_bytes -= 2 * (uint64_t)q->len[layer] * s->row_bytes;
    q->len[layer] = pos;
    s->kv_bytes += 2 * (uint64_t)pos * s->row_bytes;
    const uint8_t *rows = to_cache(s, k, cnt);
    if (!rows) return kvs_fail(s, MLM_ENOMEM, "out of memory converting %d rows", n);
    int rc = write_all(s, q, rows, bytes, kat, layer);
    if (rc == 0 && !(rows = to_cache(s, v, cnt))) rc = kvs_fail(s, MLM_ENOMEM, "out of memory converting %d rows", n);
    if (rc == 0) rc = write_all(s, q, rows, bytes, vat, layer);
    if (rc != 0) return rc;
    q->len[layer] = pos + n;
    s->kv_bytes += 2 * (uint64_t)bytes;
    s->bytes_written += 2 * (uint64_t)bytes;
    s->time_ms += mlm_now_ms() - t0;
    return 0;
}

static void attend_fn(void *arg, int ith, int nth) {
    const kvs_job_t *job = arg;
    const kvs_t *s = job->s;
    const int hd = s->p.head_dim, Hl = s->Hl;
    float *sc = s->scratch + (size_t)ith * s->scratch_per;
    const int n_kv = (job->pos0 + job->n + 31) & ~31; // the reference pads its KV view to 32
    const int total = job->n * Hl;
    for (int item = total * ith / nth; item < total * (ith + 1) / nth; item++) {
        const int i = item / Hl, hl = item % Hl, kvh = (s->p.h0 + hl) / s->group - s->p.kv0;
        const size_t off = (size_t)kvh * hd * s->elt;
        const size_t qo = (size_t)i * Hl * hd + (size_t)hl * hd;
        ops_attention(job->out + qo, job->q + qo, job->kc + off, job->vc + off, s->kvd, job->pos0 + i + 1, n_kv, hd,
                      s->scale, s->f16, job->n > 1, sc);
    }
}

static int kvs_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    kvs_t *s = ctx;
    const kvs_seq_t *sq = &s->seqs[seq];
    const double t0 = mlm_now_ms();
    const uint8_t *kc = sq->map + (size_t)2 * layer * sq->n_ctx * s->row_bytes;
    kvs_job_t job = {s, kc, kc + (size_t)sq->n_ctx * s->row_bytes, q, out, n, pos0};
    const double work = (double)n * s->Hl * (pos0 + n) * s->p.head_dim;
    if (!s->p.pool) attend_fn(&job, 0, 1);
    else tpool_run_n(s->p.pool, attend_fn, &job, work < KVS_PAR_MIN_WORK ? 1 : s->n_threads);
    const uint64_t read = 2 * (uint64_t)(pos0 + n) * s->row_bytes; // every row the last query sees, k and v
    s->bytes_read += read;
    if (s->internal_bw > 0) s->flash_ms += (double)read / s->internal_bw * 1e3;
    s->time_ms += mlm_now_ms() - t0;
    return 0;
}

static void kvs_stats(void *ctx, attn_stats_t *out) {
    const kvs_t *s = ctx;
    out->kv_bytes = s->kv_bytes;
    out->kv_bytes_ram = 0;
    out->bytes_read = s->bytes_read;
    out->bytes_written = s->bytes_written;
    out->time_ms = s->time_ms;
    out->sim_time_ms = s->flash_ms;
}

static void kvs_free(void *ctx) {
    kvs_t *s = ctx;
    if (!s) return;
    for (int i = 0; s->seqs && i < s->p.n_seq_max; i++)
        if (s->seqs[i].len) seq_close(s, &s->seqs[i]);
    if (s->seqs) free(s->seqs[0].len);
    free(s->seqs);
    free(s->conv);
    free(s->scratch);
    free(s);
}

static const struct attn_dev_i kvs_iface = {
    .seq_new = kvs_seq_new,
    .append = kvs_append,
    .attend = kvs_attend,
    .seq_drop = kvs_seq_drop,
    .stats = kvs_stats,
    .free = kvs_free,
};

// --- public API

int kvstore_dev_new(attn_dev_t **out, const attn_params_t *p, const kvstore_opts_t *o, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    if (!p || !o || !o->dir || !*o->dir) return mlm_fail(err, errlen, MLM_EINVAL, "kvstore device: no directory");
    int rc = attn_params_check(p, err, errlen);
    if (rc != 0) return rc;
    if (strlen(o->dir) + 200 >= KVS_PATH_MAX) return mlm_fail(err, errlen, MLM_EINVAL, "kvstore device: directory name too long");
    struct stat stt;
    if (stat(o->dir, &stt) != 0 || !S_ISDIR(stt.st_mode))
        return mlm_fail(err, errlen, MLM_ENOTFOUND, "%s: not a directory", o->dir);
    kvs_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    s->p = *p;
    if (s->p.n_seq_max < 1) s->p.n_seq_max = 1;
    snprintf(s->dir, sizeof s->dir, "%s", o->dir);
    snprintf(s->prefix, sizeof s->prefix, "%s", o->prefix && *o->prefix ? o->prefix : "kv");
    s->internal_bw = o->internal_bw > 0 ? o->internal_bw : 0;
    s->errbuf = o->errbuf;
    s->errcap = o->errcap;
    s->Hl = p->h1 - p->h0;
    s->group = p->n_head / p->n_head_kv;
    s->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    s->f16 = p->kv_type == QT_F16;
    s->elt = s->f16 ? 2 : 4;
    s->row_bytes = s->kvd * s->elt;
    s->scale = 1.0f / sqrtf((float)p->head_dim);
    s->n_threads = p->pool ? tpool_size(p->pool) : 1;
    s->seqs = calloc((size_t)s->p.n_seq_max, sizeof *s->seqs);
    int *lens = calloc((size_t)s->p.n_seq_max * (size_t)p->n_layer, sizeof *lens); // (n_seq_max, n_layer)
    if (!s->seqs || !lens) {
        free(lens);
        kvs_free(s);
        return MLM_ENOMEM;
    }
    for (int i = 0; i < s->p.n_seq_max; i++) {
        s->seqs[i].fd = -1;
        s->seqs[i].len = lens + (size_t)i * (size_t)p->n_layer;
    }
    if (!(*out = attn_dev_wrap(&kvs_iface, s, "kvstore", &s->p))) return MLM_ENOMEM;
    return 0;
}
