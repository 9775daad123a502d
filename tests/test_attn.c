// Attention/KV device conformance: every device in `devices` must give the reference host device's
// attention outputs bit for bit (and a naive attention's within a tight tolerance) for MHA, GQA and
// a tensor-parallel node's heads, over chunks of several tokens and single tokens, keep several
// sequences apart, refuse what offload/attn.h refuses, reuse a dropped sequence id, rewind a
// sequence, and count its calls. A new device adds a row to `devices`. The storage rows talk to a
// real `meshlm kvstore` process the suite starts ($MESHLM_BIN) and stops.
#include <CUnit/CUnit.h>
#include <math.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "core/fp16.h"
#include "offload/attn.h"
#include "offload/attn_impl.h"
#include "worker/kernels/ops.h"
#include "worker/kernels/threadpool.h"
#include "worker/model/model.h"
#include "worker/node/attn_storage.h"

// --- the table of devices

typedef struct {
    const char *label;   // for messages
    const char *name;    // registry name (attn_dev_new)
    qtype_t kv_type;     // the cache type it is asked for
} device_row_t;

// In a name, '@' stands for a fresh temporary directory (the file device unlinks its file at once,
// so the directory is removed right after the device is made).
// The kvstore the storage rows use: "storage:ipc://..." once the suite has started it.
static char storage_name[512] = "storage:(no kvstore: MESHLM_BIN not set)";

static const device_row_t devices[] = {
    {"host F16", "host", QT_F16},
    {"host F32", "host", QT_F32},
    {"file F16 (all in RAM)", "file:@", QT_F16},
    {"file F16 (every block spilled, 2-block cache)", "file:@,ram=1,block=16,cache=2", QT_F16},
    {"file F32 (part spilled)", "file:@,ram=24K,block=8,cache=3", QT_F32},
    {"pim hbm2-pim F16", "pim:hbm2-pim", QT_F16},
    {"pim neupims F32", "pim:neupims", QT_F32},
    {"pim aim-gddr6 F16", "pim:aim-gddr6", QT_F16},
    {"pim upmem F16", "pim", QT_F16},
    {"storage F16", storage_name, QT_F16},
    {"storage F32", storage_name, QT_F32},
};

// attn_dev_new on a row's name with '@' replaced by a fresh directory (removed again after).
static int dev_new(attn_dev_t **d, const char *name, const attn_params_t *p, char *err, size_t errlen) {
    const char *at = strchr(name, '@');
    if (!at) return attn_dev_new(d, name, p, err, errlen);
    char *dir = test_tmpdir(), full[1024];
    snprintf(full, sizeof full, "%.*s%s%s", (int)(at - name), name, dir, at + 1);
    int rc = attn_dev_new(d, full, p, err, errlen);
    rmdir(dir);
    free(dir);
    return rc;
}

// The registered name a row's device reports ("file:..." is "file"; pim says its preset).
static void dev_reported(const char *name, char *out, size_t cap) {
    if (!strncmp(name, "pim", 3)) snprintf(out, cap, "pim:%s", name[3] == ':' ? name + 4 : "hbm2-pim");
    else snprintf(out, cap, "%.*s", (int)strcspn(name, ":"), name);
}
#define N_DEVICES (sizeof devices / sizeof devices[0])

// --- shapes and the token stream

typedef struct {
    const char *label;
    int n_head, n_head_kv, head_dim;
    int h0, h1, kv0, kv1;  // the heads the device serves
    int n_layer;
} shape_t;

static const shape_t shapes[] = {
    {"MHA", 4, 4, 16, 0, 4, 0, 4, 2},
    {"GQA 4:1", 8, 2, 32, 0, 8, 0, 2, 2},
    {"TP node heads 2-5", 8, 2, 32, 2, 6, 0, 2, 1},
    {"GQA 2:1, head_dim 48", 6, 3, 48, 0, 6, 0, 3, 1},
    {"MQA, heads 1-2 of 4, head_dim 64", 4, 1, 64, 1, 3, 0, 1, 2},
};
#define N_SHAPES (sizeof shapes / sizeof shapes[0])

// Chunk sizes fed in order: batches of several tokens and single tokens, past 64 positions (where
// the reference's single-token sums change lanes).
static const int chunks[] = {7, 1, 1, 24, 1, 33, 1, 1, 2, 20, 1};
#define N_CHUNKS (sizeof chunks / sizeof chunks[0])
#define N_POS 92   // sum of chunks
#define N_CTX 100

typedef struct {
    const shape_t *sh;
    int qd, kvd;          // floats of a q row and of a k / v row
    float *k, *v, *q;     // (n_layer, N_POS, kvd / qd) the stream's rows
} stream_t;

static void stream_make(stream_t *s, const shape_t *sh, uint64_t seed) {
    s->sh = sh;
    s->qd = (sh->h1 - sh->h0) * sh->head_dim;
    s->kvd = (sh->kv1 - sh->kv0) * sh->head_dim;
    const size_t nk = (size_t)sh->n_layer * N_POS * s->kvd, nq = (size_t)sh->n_layer * N_POS * s->qd;
    s->k = malloc(nk * sizeof(float));
    s->v = malloc(nk * sizeof(float));
    s->q = malloc(nq * sizeof(float));
    // scales up to 2: scores of a few units, softmaxes from flat to peaked, as in a real model
    test_fill_floats(s->k, (int64_t)nk, seed * 3 + 1, 2.0f);
    test_fill_floats(s->v, (int64_t)nk, seed * 3 + 2, 2.0f);
    test_fill_floats(s->q, (int64_t)nq, seed * 3 + 3, 2.0f);
}

static void stream_free(stream_t *s) {
    free(s->k);
    free(s->v);
    free(s->q);
}

static const float *rows_at(const float *base, const stream_t *s, int layer, int pos, int width) {
    return base + ((size_t)layer * N_POS + (size_t)pos) * (size_t)width;
}

static attn_params_t params_for(const shape_t *sh, qtype_t kv_type, int n_seq, tpool_t *pool) {
    return (attn_params_t){.n_layer = sh->n_layer, .head_dim = sh->head_dim, .n_head = sh->n_head,
                           .n_head_kv = sh->n_head_kv, .h0 = sh->h0, .h1 = sh->h1, .kv0 = sh->kv0, .kv1 = sh->kv1,
                           .kv_type = kv_type, .n_seq_max = n_seq, .pool = pool};
}

// Feeds chunk ci of the stream to seq (every layer: append, then attend) and writes the outputs of
// every layer to out (n_layer, chunk, qd). Returns the first error.
static int feed_chunk(attn_dev_t *d, int seq, const stream_t *s, int ci, float *out) {
    int pos = 0;
    for (int i = 0; i < ci; i++) pos += chunks[i];
    const int n = chunks[ci];
    for (int l = 0; l < s->sh->n_layer; l++) {
        int rc = attn_dev_append(d, seq, l, pos, rows_at(s->k, s, l, pos, s->kvd), rows_at(s->v, s, l, pos, s->kvd), n);
        if (rc == 0) rc = attn_dev_attend(d, seq, l, rows_at(s->q, s, l, pos, s->qd), n, pos, out + (size_t)l * n * s->qd);
        if (rc != 0) return rc;
    }
    return 0;
}

// All chunks; out: for each chunk in order, (n_layer, chunk, qd).
static int feed_all(attn_dev_t *d, int seq, const stream_t *s, float *out) {
    size_t at = 0;
    for (size_t ci = 0; ci < N_CHUNKS; ci++) {
        int rc = feed_chunk(d, seq, s, (int)ci, out + at);
        if (rc != 0) return rc;
        at += (size_t)s->sh->n_layer * chunks[ci] * s->qd;
    }
    return 0;
}

static size_t out_floats(const stream_t *s) { return (size_t)s->sh->n_layer * N_POS * s->qd; }

// --- the arithmetic the host device must reproduce: ops_attention over a flat cache, called as
// the forward pass called it before the device existed (k and v rounded to the cache type when
// stored, the KV view padded to 32, batched for chunks of 2+)

static void oracle_run(const stream_t *s, qtype_t kv_type, float *out) {
    const shape_t *sh = s->sh;
    const int hd = sh->head_dim, Hl = sh->h1 - sh->h0, group = sh->n_head / sh->n_head_kv;
    const bool f16 = kv_type == QT_F16;
    const size_t elt = f16 ? 2 : 4, kvd = (size_t)s->kvd;
    uint8_t *kc = calloc((size_t)sh->n_layer * N_CTX * kvd, elt), *vc = calloc((size_t)sh->n_layer * N_CTX * kvd, elt);
    float *scratch = malloc(ops_attention_scratch(N_CTX, hd) * sizeof(float));
    size_t at = 0;
    int pos0 = 0;
    for (size_t ci = 0; ci < N_CHUNKS; ci++) {
        const int n = chunks[ci];
        for (int l = 0; l < sh->n_layer; l++) {
            const size_t base = ((size_t)l * N_CTX + (size_t)pos0) * kvd;
            const float *k = rows_at(s->k, s, l, pos0, s->kvd), *v = rows_at(s->v, s, l, pos0, s->kvd);
            for (size_t i = 0; i < (size_t)n * kvd; i++) {
                if (f16) {
                    ((mlm_f16_t *)kc)[base + i] = mlm_f32_to_f16(k[i]);
                    ((mlm_f16_t *)vc)[base + i] = mlm_f32_to_f16(v[i]);
                } else {
                    ((float *)kc)[base + i] = k[i];
                    ((float *)vc)[base + i] = v[i];
                }
            }
            const uint8_t *kl = kc + (size_t)l * N_CTX * kvd * elt, *vl = vc + (size_t)l * N_CTX * kvd * elt;
            for (int i = 0; i < n; i++)
                for (int hl = 0; hl < Hl; hl++) {
                    const size_t off = (size_t)((sh->h0 + hl) / group - sh->kv0) * hd * elt;
                    ops_attention(out + at + ((size_t)l * n + (size_t)i) * s->qd + (size_t)hl * hd,
                                  rows_at(s->q, s, l, pos0 + i, s->qd) + (size_t)hl * hd, kl + off, vl + off, kvd,
                                  pos0 + i + 1, (pos0 + n + 31) & ~31, hd, 1.0f / sqrtf((float)hd), f16, n > 1, scratch);
                }
        }
        at += (size_t)sh->n_layer * n * s->qd;
        pos0 += n;
    }
    free(kc);
    free(vc);
    free(scratch);
}

// --- the naive attention: the cache values as the type stores them, sums in double

static double stored(float x, qtype_t t) { return t == QT_F16 ? mlm_f16_to_f32(mlm_f32_to_f16(x)) : x; }

// Worst |out - naive| / max|v| over the whole stream (out as feed_all lays it out).
static double naive_error(const stream_t *s, qtype_t kv_type, const float *out) {
    const shape_t *sh = s->sh;
    const int hd = sh->head_dim, Hl = sh->h1 - sh->h0, group = sh->n_head / sh->n_head_kv;
    double vmax = 0, worst = 0;
    for (size_t i = 0; i < (size_t)sh->n_layer * N_POS * s->kvd; i++) vmax = fmax(vmax, fabs(s->v[i]));
    double *p = malloc(N_POS * sizeof(double));
    size_t at = 0;
    int pos0 = 0;
    for (size_t ci = 0; ci < N_CHUNKS; ci++) {
        const int n = chunks[ci];
        for (int l = 0; l < sh->n_layer; l++)
            for (int i = 0; i < n; i++)
                for (int hl = 0; hl < Hl; hl++) {
                    const int kvh = (sh->h0 + hl) / group - sh->kv0, npos = pos0 + i + 1;
                    const float *q = rows_at(s->q, s, l, pos0 + i, s->qd) + (size_t)hl * hd;
                    double mx = -INFINITY, sum = 0;
                    for (int t = 0; t < npos; t++) {
                        const float *k = rows_at(s->k, s, l, t, s->kvd) + (size_t)kvh * hd;
                        double dot = 0;
                        for (int d = 0; d < hd; d++) dot += (double)q[d] * stored(k[d], kv_type);
                        p[t] = dot / sqrt((double)hd);
                        mx = fmax(mx, p[t]);
                    }
                    for (int t = 0; t < npos; t++) sum += (p[t] = exp(p[t] - mx));
                    const float *o = out + at + ((size_t)l * n + (size_t)i) * s->qd + (size_t)hl * hd;
                    for (int d = 0; d < hd; d++) {
                        double acc = 0;
                        for (int t = 0; t < npos; t++)
                            acc += p[t] / sum * stored(rows_at(s->v, s, l, t, s->kvd)[(size_t)kvh * hd + d], kv_type);
                        worst = fmax(worst, fabs(o[d] - acc));
                    }
                }
        at += (size_t)sh->n_layer * n * s->qd;
        pos0 += n;
    }
    free(p);
    return worst / vmax;
}

// --- the conformance checks

typedef struct {
    const device_row_t *dev;
    const shape_t *sh;
    int fails;
} ctx_t;

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            if (x->fails < 8) {                                                          \
                fprintf(stderr, "  [%s | %s] ", x->dev->label, x->sh->label);            \
                fprintf(stderr, __VA_ARGS__);                                            \
                fputc('\n', stderr);                                                     \
            }                                                                            \
            x->fails++;                                                                  \
        }                                                                                \
    } while (0)

static attn_dev_t *make(ctx_t *x, const char *name, qtype_t t, int n_seq, tpool_t *pool) {
    char err[256];
    attn_params_t p = params_for(x->sh, t, n_seq, pool);
    attn_dev_t *d = NULL;
    int rc = dev_new(&d, name, &p, err, sizeof err);
    CHECK(rc == 0, "attn_dev_new(%s): %s", name, err);
    return d;
}

// 1. one sequence against the reference host device (bits), which must give the oracle's bits, and
// against the naive attention (tolerance); 2. with and without a pool; 3. a rewind from 0 gives
// the same bits again.
static void check_one_sequence(ctx_t *x, tpool_t *pool) {
    stream_t s;
    stream_make(&s, x->sh, 7);
    const size_t no = out_floats(&s);
    float *ref = calloc(no, sizeof(float)), *got = calloc(no, sizeof(float)), *again = calloc(no, sizeof(float));
    attn_dev_t *r = make(x, "host", x->dev->kv_type, 1, NULL);
    attn_dev_t *d = make(x, x->dev->name, x->dev->kv_type, 1, pool);
    if (r && d) {
        CHECK(attn_dev_seq_new(r, 0, N_CTX) == 0 && feed_all(r, 0, &s, ref) == 0, "reference run failed");
        oracle_run(&s, x->dev->kv_type, again);
        CHECK(memcmp(ref, again, no * sizeof(float)) == 0, "the host device strays from ops_attention's bits");
        int rc = attn_dev_seq_new(d, 0, N_CTX);
        if (rc == 0) rc = feed_all(d, 0, &s, got);
        CHECK(rc == 0, "run: %s", mlm_strerror(rc));
        CHECK(memcmp(ref, got, no * sizeof(float)) == 0, "outputs differ from the host device's");
        const double err = naive_error(&s, x->dev->kv_type, got);
        const double tol = x->dev->kv_type == QT_F16 ? 1e-3 : 5e-7; // F16: q and the probabilities are halves too (measured 2.6e-4, 1.1e-7)
        CHECK(err <= tol, "off the naive attention by %.3g of max|v| (limit %.1g)", err, tol);
        for (int l = 0; l < x->sh->n_layer; l++) CHECK(attn_dev_seq_len(d, 0, l) == N_POS, "layer %d length", l);
        rc = feed_all(d, 0, &s, again); // appending at 0 rewinds
        CHECK(rc == 0 && memcmp(ref, again, no * sizeof(float)) == 0, "a rewound sequence gives other outputs (%s)",
              mlm_strerror(rc));
        attn_stats_t st;
        attn_dev_stats(d, &st);
        const uint64_t rows = 2 * (uint64_t)N_POS * x->sh->n_layer;
        CHECK(st.appended == rows && st.attended == rows && st.seqs == 1,
              "stats: appended %llu attended %llu seqs %llu, want %llu %llu 1", (unsigned long long)st.appended,
              (unsigned long long)st.attended, (unsigned long long)st.seqs, (unsigned long long)rows,
              (unsigned long long)rows);
        CHECK(st.kv_bytes > 0 && st.kv_bytes_ram <= st.kv_bytes && st.time_ms >= 0 && st.sim_time_ms >= 0,
              "stats: kv_bytes %llu ram %llu time %.3f", (unsigned long long)st.kv_bytes,
              (unsigned long long)st.kv_bytes_ram, st.time_ms);
        if (!strcmp(x->dev->name, "host")) {
            const uint64_t want = 2ull * x->sh->n_layer * N_CTX * (uint64_t)s.kvd * (x->dev->kv_type == QT_F16 ? 2 : 4);
            CHECK(st.kv_bytes == want && st.kv_bytes_ram == want && st.bytes_to_dev == 0 && st.bytes_read == 0 && st.time_ms == 0,
                  "host stats: kv_bytes %llu, want %llu", (unsigned long long)st.kv_bytes, (unsigned long long)want);
        }
        if (strstr(x->dev->name, "ram=1,")) { // every block spilled: all of it written, and read back
            CHECK(st.bytes_written == rows * (uint64_t)s.kvd * 2 * 2 && st.bytes_read > 0, // k and v halves
                  "file stats: written %llu read %llu", (unsigned long long)st.bytes_written,
                  (unsigned long long)st.bytes_read);
        } else if (!strncmp(x->dev->name, "file", 4) && !strchr(x->dev->name, ',')) {
            CHECK(st.bytes_written == 0 && st.bytes_read == 0, "file stats: nothing spilled without a RAM share");
        }
        if (!strncmp(x->dev->name, "pim", 3))
            CHECK(st.sim_time_ms > 0 && st.sim_energy_mj > 0 && st.time_ms == 0, "pim stats: sim %.6f ms %.6f mJ",
                  st.sim_time_ms, st.sim_energy_mj);
        else CHECK(st.sim_time_ms == 0 && st.sim_energy_mj == 0, "a device that simulates nothing reports simulated time");
        attn_dev_seq_drop(d, 0);
        attn_dev_stats(d, &st);
        CHECK(st.seqs == 0, "seqs %llu after the drop", (unsigned long long)st.seqs);
    }
    attn_dev_free(&r);
    attn_dev_free(&d);
    CHECK(d == NULL, "attn_dev_free leaves the pointer");
    free(ref);
    free(got);
    free(again);
    stream_free(&s);
}

// Three sequences fed chunk by chunk in turn give what each gives alone; a dropped one is
// allocated again and gives a fresh sequence's outputs.
static void check_sequences(ctx_t *x, tpool_t *pool) {
    enum { NS = 3 };
    stream_t s[NS];
    float *alone[NS], *mixed[NS];
    attn_dev_t *d = make(x, x->dev->name, x->dev->kv_type, NS, pool);
    for (int i = 0; i < NS; i++) {
        stream_make(&s[i], x->sh, 100 + (uint64_t)i);
        alone[i] = calloc(out_floats(&s[i]), sizeof(float));
        mixed[i] = calloc(out_floats(&s[i]), sizeof(float));
        attn_dev_t *r = make(x, "host", x->dev->kv_type, 1, NULL);
        if (r && attn_dev_seq_new(r, 0, N_CTX) == 0) CHECK(feed_all(r, 0, &s[i], alone[i]) == 0, "reference run");
        attn_dev_free(&r);
    }
    if (d) {
        for (int i = 0; i < NS; i++) CHECK(attn_dev_seq_new(d, i, N_CTX) == 0, "seq_new %d", i);
        size_t at = 0;
        for (size_t ci = 0; ci < N_CHUNKS; ci++) {
            for (int i = 0; i < NS; i++) CHECK(feed_chunk(d, i, &s[i], (int)ci, mixed[i] + at) == 0, "seq %d chunk %zu", i, ci);
            at += (size_t)x->sh->n_layer * chunks[ci] * s[0].qd;
        }
        for (int i = 0; i < NS; i++)
            CHECK(memcmp(alone[i], mixed[i], out_floats(&s[i]) * sizeof(float)) == 0, "sequence %d mixed with others differs", i);
        // drop one, reuse its id: it starts empty and gives a fresh run's outputs; the others are untouched
        attn_dev_seq_drop(d, 1);
        CHECK(attn_dev_seq_len(d, 1, 0) == 0, "a dropped sequence keeps a length");
        const float *q = s[1].q;
        float out[4096];
        CHECK(attn_dev_attend(d, 1, 0, q, 1, 0, out) == MLM_ESTATE, "attend on a dropped sequence");
        CHECK(attn_dev_seq_new(d, 1, N_CTX) == 0, "seq_new after drop");
        memset(mixed[1], 0, out_floats(&s[1]) * sizeof(float));
        CHECK(feed_all(d, 1, &s[1], mixed[1]) == 0, "reused sequence run");
        CHECK(memcmp(alone[1], mixed[1], out_floats(&s[1]) * sizeof(float)) == 0, "a reused sequence id differs");
        for (int i = 0; i < NS; i++) CHECK(attn_dev_seq_len(d, i, x->sh->n_layer - 1) == N_POS, "seq %d length", i);
        attn_stats_t st;
        attn_dev_stats(d, &st);
        CHECK(st.seqs == NS, "seqs %llu", (unsigned long long)st.seqs);
    }
    attn_dev_free(&d);
    for (int i = 0; i < NS; i++) {
        free(alone[i]);
        free(mixed[i]);
        stream_free(&s[i]);
    }
}

// Everything attn.h refuses.
static void check_refusals(ctx_t *x, tpool_t *pool) {
    stream_t s;
    stream_make(&s, x->sh, 9);
    attn_dev_t *d = make(x, x->dev->name, x->dev->kv_type, 2, pool);
    float *out = calloc((size_t)N_POS * s.qd, sizeof(float));
    if (d) {
        const float *k = s.k, *v = s.v, *q = s.q;
        const int nl = x->sh->n_layer;
        CHECK(attn_dev_seq_new(d, 0, 0) == MLM_EINVAL, "seq_new n_ctx 0");
        CHECK(attn_dev_seq_new(d, -1, 8) == MLM_EINVAL, "seq_new seq -1");
        CHECK(attn_dev_seq_new(d, 2, 8) == MLM_EINVAL, "seq_new seq n_seq_max");
        CHECK(attn_dev_append(d, 0, 0, 0, k, v, 1) == MLM_ESTATE, "append to an unallocated sequence");
        CHECK(attn_dev_attend(d, 0, 0, q, 1, 0, out) == MLM_ESTATE, "attend on an unallocated sequence");
        CHECK(attn_dev_seq_new(d, 0, 8) == 0, "seq_new");
        CHECK(attn_dev_seq_new(d, 0, 8) == MLM_ESTATE, "seq_new twice");
        CHECK(attn_dev_append(d, 0, nl, 0, k, v, 1) == MLM_EINVAL, "append layer n_layer");
        CHECK(attn_dev_append(d, 0, -1, 0, k, v, 1) == MLM_EINVAL, "append layer -1");
        CHECK(attn_dev_append(d, 0, 0, 0, k, v, 0) == MLM_EINVAL, "append n 0");
        CHECK(attn_dev_append(d, 0, 0, 0, NULL, v, 1) == MLM_EINVAL, "append k NULL");
        CHECK(attn_dev_append(d, 0, 0, 1, k, v, 1) == MLM_EINVAL, "append skipping position 0");
        CHECK(attn_dev_append(d, 0, 0, 0, k, v, 9) == MLM_ERANGE, "append past n_ctx");
        CHECK(attn_dev_append(d, 0, 0, 0, k, v, 5) == 0, "append 5");
        CHECK(attn_dev_append(d, 0, 0, 5, k, v, 4) == MLM_ERANGE, "append 5 + 4 > 8");
        CHECK(attn_dev_append(d, 0, 0, 5, k, v, 3) == 0, "append up to n_ctx");
        CHECK(attn_dev_append(d, 0, 0, 8, k, v, 1) == MLM_ERANGE, "append at n_ctx");
        CHECK(attn_dev_attend(d, 0, 0, q, 8, 1, out) == MLM_ERANGE, "attend past the appended positions");
        CHECK(attn_dev_attend(d, 0, 0, q, 8, 0, out) == 0, "attend all");
        if (nl > 1) CHECK(attn_dev_attend(d, 0, 1, q, 1, 0, out) == MLM_ERANGE, "attend a layer with nothing appended");
        CHECK(attn_dev_attend(d, 0, 0, q, 0, 0, out) == MLM_EINVAL, "attend n 0");
        CHECK(attn_dev_attend(d, 0, 0, q, 1, -1, out) == MLM_EINVAL, "attend pos0 -1");
        CHECK(attn_dev_attend(d, 0, 0, q, 1, 0, NULL) == MLM_EINVAL, "attend out NULL");
        CHECK(attn_dev_append(d, 0, 0, 2, k, v, 1) == 0 && attn_dev_seq_len(d, 0, 0) == 3, "a rewind to 2 keeps 3");
        CHECK(attn_dev_attend(d, 0, 0, q, 1, 3, out) == MLM_ERANGE, "attend a forgotten position");
        attn_dev_seq_drop(d, 1); // unknown: nothing happens
        attn_dev_seq_drop(d, 7);
        attn_stats_t st;
        attn_dev_stats(d, &st);
        CHECK(st.seqs == 1 && st.appended == 5 + 3 + 1 && st.attended == 8, "stats after refusals: %llu %llu %llu",
              (unsigned long long)st.seqs, (unsigned long long)st.appended, (unsigned long long)st.attended);
    }
    attn_dev_free(&d);
    free(out);
    stream_free(&s);
}

// ops_attention's vector paths give its scalar path's bits: single tokens (tails before and past
// the 64-position lanes, F16 and F32 caches, head sizes 64, 128 and 80) and batched queries.
static void test_ops_simd_bits(void) {
    enum { NPOS_MAX = 150, HD_MAX = 128 };
    const int hds[] = {64, 128, 80};
    const int nposs[] = {1, 5, 63, 64, 65, 100, 130, 150};
    float *scratch = malloc(ops_attention_scratch(NPOS_MAX + 32, HD_MAX) * sizeof(float));
    float *kf = malloc((size_t)NPOS_MAX * HD_MAX * sizeof(float)), *vf = malloc((size_t)NPOS_MAX * HD_MAX * sizeof(float));
    mlm_f16_t *kh = malloc((size_t)NPOS_MAX * HD_MAX * sizeof(mlm_f16_t)), *vh = malloc((size_t)NPOS_MAX * HD_MAX * sizeof(mlm_f16_t));
    float q[HD_MAX], a[HD_MAX], b[HD_MAX];
    uint32_t seed = 12345;
    for (int i = 0; i < NPOS_MAX * HD_MAX; i++) {
        seed = seed * 1664525u + 1013904223u;
        kf[i] = (float)((int)(seed >> 9) % 2001 - 1000) / 400.0f;
        seed = seed * 1664525u + 1013904223u;
        vf[i] = (float)((int)(seed >> 9) % 2001 - 1000) / 300.0f;
        kh[i] = mlm_f32_to_f16(kf[i]);
        vh[i] = mlm_f32_to_f16(vf[i]);
    }
    for (int i = 0; i < HD_MAX; i++) q[i] = (float)((i * 37) % 29 - 14) / 7.0f;
    int checked = 0, bad = 0;
    for (size_t h = 0; h < sizeof hds / sizeof hds[0]; h++)
        for (size_t n = 0; n < sizeof nposs / sizeof nposs[0]; n++)
            for (int f16 = 0; f16 <= 1; f16++)
                for (int batched = 0; batched <= 1; batched++) {
                    const int hd = hds[h], npos = nposs[n], n_kv = (npos + 31) & ~31;
                    const void *k = f16 ? (const void *)kh : (const void *)kf, *v = f16 ? (const void *)vh : (const void *)vf;
                    const float scale = 1.0f / sqrtf((float)hd);
                    ops_attention(a, q, k, v, HD_MAX, npos, n_kv, hd, scale, f16, batched, scratch);
                    ops_force_scalar(true);
                    ops_attention(b, q, k, v, HD_MAX, npos, n_kv, hd, scale, f16, batched, scratch);
                    ops_force_scalar(false);
                    checked++;
                    if (memcmp(a, b, (size_t)hd * sizeof(float)) != 0 && bad++ < 3)
                        fprintf(stderr, "\n  ops_attention hd %d npos %d %s%s: vector and scalar bits differ\n", hd, npos,
                                f16 ? "F16" : "F32", batched ? " batched" : "");
                }
    CU_ASSERT_EQUAL(checked, 3 * 8 * 2 * 2);
    CU_ASSERT_EQUAL(bad, 0);
    free(scratch);
    free(kf);
    free(vf);
    free(kh);
    free(vh);
}

static void test_conformance(void) {
    tpool_t *pool = tpool_new(2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(pool);
    int fails = 0;
    for (size_t di = 0; di < N_DEVICES; di++)
        for (size_t si = 0; si < N_SHAPES; si++) {
            ctx_t c = {.dev = &devices[di], .sh = &shapes[si]};
            check_one_sequence(&c, pool);
            check_one_sequence(&c, NULL);
            check_sequences(&c, pool);
            check_refusals(&c, pool);
            fails += c.fails;
        }
    CU_ASSERT_EQUAL(fails, 0);
    tpool_destroy(&pool);
}

static void test_registry_and_shapes(void) {
    char err[256] = "";
    attn_dev_t *d = NULL;
    attn_params_t p = params_for(&shapes[1], QT_F16, 1, NULL);
    CU_ASSERT_EQUAL(attn_dev_new(&d, "no-such-device", &p, err, sizeof err), MLM_ENOTFOUND);
    CU_ASSERT(strstr(err, "host") != NULL);
    CU_ASSERT_PTR_NULL(d);
    CU_ASSERT_EQUAL(attn_dev_new(&d, "host:arg", &p, err, sizeof err), MLM_EINVAL);
    CU_ASSERT(strstr(attn_dev_names(), "host") != NULL);
    // a device of a higher layer registers under its own name
    CU_ASSERT_EQUAL(attn_dev_register("host-alias", attn_host_new), 0);
    CU_ASSERT_EQUAL(attn_dev_register("host-alias", attn_host_new), MLM_ESTATE);
    CU_ASSERT_EQUAL(attn_dev_register("x:y", attn_host_new), MLM_EINVAL);
    CU_ASSERT(strstr(attn_dev_names(), "host-alias") != NULL);
    CU_ASSERT_EQUAL(attn_dev_new(&d, "host-alias", &p, err, sizeof err), 0);
    CU_ASSERT_PTR_NOT_NULL(d);
    attn_dev_free(&d);
    attn_params_t bad = p;
    bad.h0 = 1, bad.h1 = 8, bad.kv0 = 1; // head 1 reads KV head 0
    CU_ASSERT_EQUAL(attn_dev_new(&d, NULL, &bad, err, sizeof err), MLM_EINVAL);
    bad = p;
    bad.n_head = 7; // not a multiple of the KV heads
    CU_ASSERT_EQUAL(attn_dev_new(&d, NULL, &bad, err, sizeof err), MLM_EINVAL);
    bad = p;
    bad.kv_type = QT_Q4_0; // F16, F32 and Q8_0 caches only
    CU_ASSERT_EQUAL(attn_dev_new(&d, NULL, &bad, err, sizeof err), MLM_EUNSUPPORTED);
    CU_ASSERT_EQUAL(attn_dev_new(&d, NULL, NULL, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(attn_dev_new(&d, NULL, &p, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(attn_dev_name(d), "host");
    CU_ASSERT_EQUAL(attn_dev_seq_new(d, 0, 4), 0);
    attn_dev_free(&d); // with a live sequence
    CU_ASSERT_PTR_NULL(d);
    attn_dev_free(NULL);
    attn_stats_t st;
    attn_dev_stats(NULL, &st);
    CU_ASSERT_EQUAL(st.seqs, 0);
    CU_ASSERT_EQUAL(attn_dev_seq_new(NULL, 0, 4), MLM_EINVAL);
}

// The forward pass over each device row (its cache type as kv_f32): the logits of the default
// device, the device's counters, and an unknown name refused.
static void test_forward_pass(void) {
    char path[1024], err[512];
    test_shared_path(path, sizeof path, "models/synth/synth-moe-Q8_0.gguf");
    model_t *m = NULL;
    CU_ASSERT_EQUAL_FATAL(model_load(&m, path, NULL, err, sizeof err), 0);
    const model_hparams_t *hp = model_hparams(m);
    const int nv = hp->n_vocab, n_tok = 9;
    int32_t toks[9];
    for (int i = 0; i < n_tok; i++) toks[i] = (i * 53 + 7) % nv;
    for (size_t di = 0; di < N_DEVICES; di++) {
        float *lg[2];
        for (int run = 0; run < 2; run++) { // 0: the default device, 1: this row's
            model_ctx_t *c = NULL;
            char *dir = test_tmpdir(), name[1024];
            const char *at = strchr(devices[di].name, '@');
            if (at) snprintf(name, sizeof name, "%.*s%s%s", (int)(at - devices[di].name), devices[di].name, dir, at + 1);
            else snprintf(name, sizeof name, "%s", devices[di].name);
            model_ctx_opts_t co = {.n_ctx = 16, .n_batch = 4, .n_threads = 2, .kv_f32 = devices[di].kv_type == QT_F32,
                                   .attn_dev = run ? name : NULL};
            CU_ASSERT_EQUAL_FATAL(model_ctx_new(&c, m, &co, err, sizeof err), 0);
            lg[run] = malloc((size_t)n_tok * nv * sizeof(float));
            CU_ASSERT_EQUAL(model_eval(c, toks, 6, lg[run], true), 0); // chunks of 4 and 2
            for (int i = 6; i < n_tok; i++) CU_ASSERT_EQUAL(model_eval(c, toks + i, 1, lg[run] + (size_t)i * nv, true), 0);
            attn_stats_t st;
            attn_dev_stats(model_ctx_attn(c), &st);
            CU_ASSERT_EQUAL(st.appended, (uint64_t)n_tok * hp->n_layer);
            CU_ASSERT_EQUAL(st.attended, (uint64_t)n_tok * hp->n_layer);
            char want[64];
            dev_reported(run ? devices[di].name : "host", want, sizeof want);
            CU_ASSERT_STRING_EQUAL(attn_dev_name(model_ctx_attn(c)), want);
            model_ctx_destroy(&c);
            rmdir(dir);
            free(dir);
        }
        CU_ASSERT_EQUAL(memcmp(lg[0], lg[1], (size_t)n_tok * nv * sizeof(float)), 0);
        free(lg[0]);
        free(lg[1]);
    }
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = 16, .attn_dev = "nope"};
    CU_ASSERT_EQUAL(model_ctx_new(&c, m, &co, err, sizeof err), MLM_ENOTFOUND);
    CU_ASSERT_PTR_NULL(c);
    model_destroy(&m);
}

// --- the kvstore process of the storage rows

static pid_t kvstore_pid = -1;
static char *kvstore_dir;

static int suite_init(void) {
    attn_storage_register();
    const char *bin = test_meshlm_bin();
    if (!bin || !(kvstore_dir = test_tmpdir())) return 0; // the storage rows then fail, naming why
    char ep[400], dir[400];
    snprintf(ep, sizeof ep, "ipc://%s/kv.sock", kvstore_dir);
    snprintf(dir, sizeof dir, "%s/kv", kvstore_dir);
    const char *args[] = {bin, "kvstore", "--listen", ep, "--dir", dir, "-q", NULL};
    kvstore_pid = test_spawn(args, NULL);
    snprintf(storage_name, sizeof storage_name, "storage:%s", ep);
    return 0;
}

static int suite_cleanup(void) {
    if (kvstore_pid > 0) {
        kill(kvstore_pid, SIGTERM);
        waitpid(kvstore_pid, NULL, 0);
        kvstore_pid = -1;
    }
    if (kvstore_dir) {
        char sub[512];
        snprintf(sub, sizeof sub, "%s/kv", kvstore_dir);
        rmdir(sub); // empty: every session's files were removed as it closed
        test_rm_dir(kvstore_dir);
        kvstore_dir = NULL;
    }
    return 0;
}

int test_attn_suite(void) {
    CU_pSuite s = CU_add_suite("attn", suite_init, suite_cleanup);
    if (!s) return -1;
    if (!CU_add_test(s, "ops_attention's vector paths give its scalar path's bits", test_ops_simd_bits)) return -1;
    if (!CU_add_test(s, "every device gives the host device's bits on every shape", test_conformance)) return -1;
    if (!CU_add_test(s, "registry and shapes", test_registry_and_shapes)) return -1;
    if (!CU_add_test(s, "the forward pass over every device", test_forward_pass)) return -1;
    return 0;
}
