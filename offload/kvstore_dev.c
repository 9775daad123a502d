// The KV store's engine: an attention/KV device over one sparse file per sequence, appended with pwrite
// and attended in place through a read-only mapping with attn_calc (the host device's arithmetic).
#include "offload/kvstore_dev.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "offload/attn_impl.h"

// --- types

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
    attn_calc_t *calc;   // the host device's arithmetic (owned)
    size_t kvd;          // elements of a k / v row
    size_t elt;          // bytes per cache element
    size_t row_bytes;    // kvd * elt
    bool f16;
    kvs_seq_t *seqs;     // (n_seq_max)
    uint8_t *conv;       // (conv_cap) rows converted to the cache type before they are written
    size_t conv_cap;
    uint64_t kv_bytes, bytes_read, bytes_written;
    double time_ms, flash_ms;
} kvs_t;

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
    if (attn_calc_reserve(s->calc, n_ctx) != 0) return MLM_ENOMEM;
    snprintf(q->path, sizeof q->path, "%s/%s-s%d.kv", s->dir, s->prefix, seq);
    const size_t len = 2 * (size_t)s->p.n_layer * (size_t)n_ctx * s->row_bytes;
    q->fd = open(q->path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (q->fd < 0) return kvs_fail(s, io_code(errno), "%s: cannot create: %s", q->path, strerror(errno));
    if (ftruncate(q->fd, (off_t)len) != 0) {
        const int rc = kvs_fail(s, io_code(errno), "%s: cannot size to %zu bytes: %s", q->path, len, strerror(errno));
        seq_close(s, q);
        return rc;
    }
    q->map = mmap(NULL, len, PROT_READ, MAP_SHARED, q->fd, 0);
    if (q->map == MAP_FAILED) {
        const int e = errno;
        const int rc = kvs_fail(s, e == ENOMEM ? MLM_ENOMEM : MLM_EIO, "%s: cannot map %zu bytes: %s", q->path, len,
                                strerror(e));
        q->map = NULL;
        seq_close(s, q);
        return rc;
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
    attn_store_rows(s->conv, x, cnt, QT_F16);
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

static int kvs_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    kvs_t *s = ctx;
    const kvs_seq_t *sq = &s->seqs[seq];
    const double t0 = mlm_now_ms();
    const uint8_t *kc = sq->map + (size_t)2 * layer * sq->n_ctx * s->row_bytes;
    attn_calc_run(s->calc, kc, kc + (size_t)sq->n_ctx * s->row_bytes, q, n, pos0, out);
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
    attn_calc_free(&s->calc);
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
    if (p->kv_type == QT_Q8_0) // rows travel and are stored as halves or floats
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "kvstore device: an F16 or F32 KV cache, not Q8_0");
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
    s->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    s->f16 = p->kv_type == QT_F16;
    s->elt = s->f16 ? 2 : 4;
    s->row_bytes = s->kvd * s->elt;
    s->calc = attn_calc_new(&s->p);
    s->seqs = calloc((size_t)s->p.n_seq_max, sizeof *s->seqs);
    int *lens = calloc((size_t)s->p.n_seq_max * (size_t)p->n_layer, sizeof *lens); // (n_seq_max, n_layer)
    if (!s->calc || !s->seqs || !lens) {
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
