// The `meshlm kvstore` server: a table of sessions, each a KV-store device, answering KvRequests over a comm.
#include "worker/node/kvserver.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/fp16.h"
#include "core/fs.h"
#include "offload/kvstore_dev.h"
#include "worker/kernels/quant.h"
#include "worker/kernels/threadpool.h"

// --- types

#define KVSRV_POLL_MS 200      // longest wait before stop is asked again
#define KVSRV_SEND_MS 5000     // deadline of a reply

typedef struct {
    uint64_t id;               // 0 = a free slot
    attn_dev_t *dev;           // the session's KV-store device (owned)
    attn_params_t p;           // its shape
    size_t kvd, qd;            // elements of a k / v row and of a q / out row
    char err[MSG_TEXT_MAX];    // the device's detail of its last failure
    kvserver_session_stats_t st;
} kvsrv_session_t;

struct kvserver {
    char dir[1024];            // the store's directory
    double internal_bw;        // bytes/s, 0 = no model
    FILE *log;                 // borrowed, may be NULL
    tpool_t *pool;             // attention threads (owned)
    kvsrv_session_t *sess;     // (max_sessions)
    int max_sessions;
    uint64_t next_id;          // the next session's id (from 1)
    float *fk, *fv, *fq;       // (fcap) request rows as F32
    size_t fcap;
    float *out;                // (out_cap) attention outputs of the last ATTEND
    size_t out_cap;
};

// --- helpers

__attribute__((format(printf, 3, 4)))
static void reply_fail(msg_t *rep, int code, const char *fmt, ...) {
    rep->kv_reply.status = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rep->kv_reply.text, sizeof rep->kv_reply.text, fmt, ap);
    va_end(ap);
}

static kvsrv_session_t *find(kvserver_t *s, uint64_t id) {
    for (int i = 0; id && i < s->max_sessions; i++)
        if (s->sess[i].id == id) return &s->sess[i];
    return NULL;
}

// Grows the F32 buffers to n floats each. 0 or MLM_ENOMEM.
static int grow_f32(kvserver_t *s, size_t n) {
    if (n <= s->fcap) return 0;
    float *k = realloc(s->fk, n * 4), *v = k ? realloc(s->fv, n * 4) : NULL, *q = v ? realloc(s->fq, n * 4) : NULL;
    if (k) s->fk = k;
    if (v) s->fv = v;
    if (q) s->fq = q;
    if (!k || !v || !q) return MLM_ENOMEM;
    s->fcap = n;
    return 0;
}

// A received tensor of the session's rows (width elements each, F16 or F32 as allowed) as floats.
static int rows_f32(const msg_tensor_t *t, size_t width, int32_t allowed16, float *dst, const char *what, msg_t *rep) {
    if ((size_t)t->ne[0] != width || (t->type != QT_F32 && t->type != allowed16)) {
        reply_fail(rep, MLM_EFORMAT, "%s rows of %lld %s elements, the session's are %zu", what, (long long)t->ne[0],
                   qtype_name(t->type), width);
        return MLM_EFORMAT;
    }
    const size_t cnt = width * (size_t)t->ne[1];
    if (t->type == QT_F32) {
        memcpy(dst, t->data, cnt * 4);
    } else {
        const uint8_t *b = t->data;
        for (size_t i = 0; i < cnt; i++) {
            mlm_f16_t h;
            memcpy(&h, b + 2 * i, 2);
            dst[i] = mlm_f16_to_f32(h);
        }
    }
    return 0;
}

// The device's failure as the reply: its own detail when it gave one.
static void reply_dev(msg_t *rep, kvsrv_session_t *ss, int rc, const char *what) {
    if (ss->err[0]) reply_fail(rep, rc, "%s", ss->err);
    else reply_fail(rep, rc, "%s: %s", what, mlm_strerror(rc));
}

static void session_close(kvserver_t *s, kvsrv_session_t *ss, const char *why) {
    if (s->log) {
        fprintf(s->log, "kvstore: session %llu %s after %llu requests\n", (unsigned long long)ss->id, why,
                (unsigned long long)ss->st.requests);
        kvserver_print_session(s->log, ss->id, &ss->st, s->internal_bw);
        fflush(s->log);
    }
    attn_dev_free(&ss->dev);
    memset(ss, 0, sizeof *ss);
}

static void do_open(kvserver_t *s, const msg_kv_request_t *r, msg_t *rep) {
    kvsrv_session_t *ss = NULL;
    for (int i = 0; i < s->max_sessions && !ss; i++)
        if (!s->sess[i].id) ss = &s->sess[i];
    if (!ss) {
        reply_fail(rep, MLM_EFULL, "the kvstore has %d sessions open (its limit)", s->max_sessions);
        return;
    }
    const msg_kv_shape_t *sh = &r->shape;
    attn_params_t p = {.n_layer = (int)sh->n_layer, .head_dim = (int)sh->head_dim, .n_head = (int)sh->n_head,
                       .n_head_kv = (int)sh->n_head_kv, .h0 = sh->heads.begin, .h1 = sh->heads.end,
                       .kv0 = sh->kv_heads.begin, .kv1 = sh->kv_heads.end, .kv_type = (qtype_t)sh->kv_type,
                       .n_seq_max = (int)sh->n_seq_max, .pool = s->pool};
    char prefix[64], err[MSG_TEXT_MAX];
    const uint64_t id = s->next_id++;
    snprintf(prefix, sizeof prefix, "kv-%ld-%llu", (long)getpid(), (unsigned long long)id);
    memset(ss, 0, sizeof *ss);
    kvstore_opts_t o = {.dir = s->dir, .prefix = prefix, .internal_bw = s->internal_bw, .errbuf = ss->err,
                        .errcap = sizeof ss->err};
    int rc = kvstore_dev_new(&ss->dev, &p, &o, err, sizeof err);
    if (rc != 0) {
        reply_fail(rep, rc, "%s", err);
        return;
    }
    ss->id = id;
    ss->p = p;
    ss->kvd = (size_t)(p.kv1 - p.kv0) * (size_t)p.head_dim;
    ss->qd = (size_t)(p.h1 - p.h0) * (size_t)p.head_dim;
    ss->st.n_layer = p.n_layer;
    rep->kv_reply.session = id;
    if (s->log) {
        fprintf(s->log, "kvstore: session %llu open: %d layers, heads %d-%d, KV heads %d-%d of %d, %s cache, %d sequence(s)\n",
                (unsigned long long)id, p.n_layer, p.h0, p.h1 - 1, p.kv0, p.kv1 - 1, p.head_dim, qtype_name(p.kv_type),
                p.n_seq_max);
        fflush(s->log);
    }
}

static void do_attend(kvserver_t *s, kvsrv_session_t *ss, const msg_kv_request_t *r, msg_t *rep) {
    int rc;
    if (r->has_kv) {
        if (grow_f32(s, (size_t)r->append_n * ss->kvd) != 0) {
            reply_fail(rep, MLM_ENOMEM, "out of memory");
            return;
        }
        const int32_t t16 = ss->p.kv_type == QT_F16 ? QT_F16 : QT_F32;
        if (rows_f32(&r->k, ss->kvd, t16, s->fk, "k", rep) || rows_f32(&r->v, ss->kvd, t16, s->fv, "v", rep)) return;
        if ((rc = attn_dev_append(ss->dev, r->seq, r->layer, r->append_pos, s->fk, s->fv, (int)r->append_n)) != 0) {
            reply_dev(rep, ss, rc, "append");
            return;
        }
    }
    if (r->op != MSG_KV_ATTEND) return;
    const size_t cnt = (size_t)r->n * ss->qd;
    if (grow_f32(s, cnt) != 0) {
        reply_fail(rep, MLM_ENOMEM, "out of memory");
        return;
    }
    if (cnt > s->out_cap) {
        float *o = realloc(s->out, cnt * 4);
        if (!o) {
            reply_fail(rep, MLM_ENOMEM, "out of memory");
            return;
        }
        s->out = o;
        s->out_cap = cnt;
    }
    // q in F16 is exact only for an F16 cache (ops_attention rounds q to half there)
    if (rows_f32(&r->q, ss->qd, ss->p.kv_type == QT_F16 ? QT_F16 : QT_F32, s->fq, "q", rep)) return;
    if ((rc = attn_dev_attend(ss->dev, r->seq, r->layer, s->fq, (int)r->n, r->pos, s->out)) != 0) {
        reply_dev(rep, ss, rc, "attend");
        return;
    }
    msg_kv_reply_t *o = &rep->kv_reply;
    o->has_out = true;
    o->out = (msg_tensor_t){.type = QT_F32, .n_dims = 2, .ne = {(int64_t)ss->qd, r->n, 1, 1}, .nbytes = cnt * 4,
                            .data = s->out};
}

// --- public API

int kvserver_new(kvserver_t **out, const kvserver_opts_t *o, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    if (!o || !o->dir || !*o->dir) return mlm_fail(err, errlen, MLM_EINVAL, "kvstore: no directory");
    if (strlen(o->dir) >= 800) return mlm_fail(err, errlen, MLM_EINVAL, "kvstore: directory name too long");
    int rc = mlm_mkdir_p(o->dir, err, errlen);
    if (rc != 0) return rc;
    kvserver_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    snprintf(s->dir, sizeof s->dir, "%s", o->dir);
    s->internal_bw = o->internal_bw > 0 ? o->internal_bw : 0;
    s->log = o->log;
    s->max_sessions = o->max_sessions > 0 ? o->max_sessions : 64;
    s->next_id = 1;
    s->sess = calloc((size_t)s->max_sessions, sizeof *s->sess);
    s->pool = tpool_new(o->n_threads > 0 ? o->n_threads : 1);
    if (!s->sess || !s->pool) {
        kvserver_destroy(&s);
        return mlm_fail(err, errlen, MLM_ENOMEM, "kvstore: out of memory");
    }
    *out = s;
    return 0;
}

void kvserver_destroy(kvserver_t **self_p) {
    if (!self_p || !*self_p) return;
    kvserver_t *s = *self_p;
    for (int i = 0; s->sess && i < s->max_sessions; i++)
        if (s->sess[i].id) session_close(s, &s->sess[i], "closed as the kvstore stops");
    tpool_destroy(&s->pool); // after the devices that borrow it
    free(s->sess);
    free(s->fk);
    free(s->fv);
    free(s->fq);
    free(s->out);
    free(s);
    *self_p = NULL;
}

int kvserver_sessions(const kvserver_t *s) {
    int n = 0;
    for (int i = 0; s && i < s->max_sessions; i++) n += s->sess[i].id != 0;
    return n;
}

void kvserver_handle(kvserver_t *s, const msg_kv_request_t *r, uint64_t bytes_in, msg_t *rep) {
    msg_init(rep, MSG_KV_REPLY);
    msg_kv_reply_t *o = &rep->kv_reply;
    o->session = r->session;
    o->req_id = r->req_id;
    if (r->op == MSG_KV_OPEN) {
        do_open(s, r, rep);
        kvsrv_session_t *ss = find(s, o->session);
        if (ss) ss->st.requests++, ss->st.link_in += bytes_in;
        return;
    }
    kvsrv_session_t *ss = find(s, r->session);
    if (!ss) {
        reply_fail(rep, MLM_ESTATE, "no session %llu in this kvstore (it restarted, or the session was closed)",
                   (unsigned long long)r->session);
        return;
    }
    ss->st.requests++;
    ss->st.link_in += bytes_in;
    ss->err[0] = 0;
    const double t0 = mlm_now_ms();
    attn_stats_t before;
    attn_dev_stats(ss->dev, &before);
    int rc;
    if (r->layer >= ss->p.n_layer && (r->op == MSG_KV_APPEND || r->op == MSG_KV_ATTEND)) {
        reply_fail(rep, MLM_EINVAL, "layer %d of a session of %d layers", (int)r->layer, ss->p.n_layer);
        return;
    }
    switch (r->op) {
    case MSG_KV_CLOSE:
        session_close(s, ss, "closed by its device");
        return;
    case MSG_KV_SEQ_NEW:
        if ((rc = attn_dev_seq_new(ss->dev, r->seq, (int)r->n_ctx)) != 0) reply_dev(rep, ss, rc, "seq_new");
        break;
    case MSG_KV_SEQ_DROP:
        attn_dev_seq_drop(ss->dev, r->seq);
        break;
    case MSG_KV_APPEND:
    case MSG_KV_ATTEND:
        do_attend(s, ss, r, rep);
        break;
    default: // MSG_KV_STATS
        break;
    }
    attn_stats_t st;
    attn_dev_stats(ss->dev, &st);
    o->stats = (msg_kv_stats_t){.kv_bytes = st.kv_bytes, .bytes_read = st.bytes_read, .bytes_written = st.bytes_written,
                                .compute_ns = (uint64_t)(st.time_ms * 1e6), .flash_ns = (uint64_t)(st.sim_time_ms * 1e6)};
    if (r->op == MSG_KV_ATTEND && r->n == 1 && o->status == 0) {
        ss->st.decode_rows++;
        ss->st.decode_in += bytes_in;
        ss->st.decode_read += st.bytes_read - before.bytes_read;
        ss->st.decode_ms += mlm_now_ms() - t0;
        ss->st.decode_flash_ms += st.sim_time_ms - before.sim_time_ms;
    }
}

void kvserver_count_reply(kvserver_t *s, const msg_kv_request_t *r, uint64_t bytes_out) {
    kvsrv_session_t *ss = find(s, r->session);
    if (!ss) return;
    ss->st.link_out += bytes_out;
    if (r->op == MSG_KV_ATTEND && r->n == 1) ss->st.decode_out += bytes_out;
}

void kvserver_print_session(FILE *f, uint64_t id, const kvserver_session_stats_t *st, double internal_bw) {
    const double tokens = st->n_layer > 0 ? (double)st->decode_rows / st->n_layer : 0;
    if (tokens <= 0) {
        fprintf(f, "kvstore: session %llu: no single-token decode steps; link %.1f KiB in, %.1f KiB out\n",
                (unsigned long long)id, st->link_in / 1024.0, st->link_out / 1024.0);
        return;
    }
    const double link = (double)(st->decode_in + st->decode_out) / tokens;
    fprintf(f, "kvstore: session %llu: %.0f decode tokens: link %.1f KiB/token (%.1f in: q, k, v; %.1f out) against "
               "%.2f MiB/token to ship its KV; kvstore %.3f ms/token (measured)",
            (unsigned long long)id, tokens, link / 1024.0, st->decode_in / tokens / 1024.0, st->decode_out / tokens / 1024.0,
            (double)st->decode_read / tokens / 1048576.0, st->decode_ms / tokens);
    if (internal_bw > 0)
        fprintf(f, "; flash reads %.3f ms/token (modelled at %.0f MB/s internal)", st->decode_flash_ms / tokens,
                internal_bw / 1e6);
    fputc('\n', f);
}

// Sends rep to whoever spoke last and counts its bytes against r's session (r may be NULL).
static int send_reply(kvserver_t *s, comm_t *c, const msg_t *rep, const msg_kv_request_t *r) {
    msg_buf_t b;
    char err[256];
    int rc = msg_encode(rep, NULL, &b, err, sizeof err);
    if (rc == 0) {
        rc = comm_send(c, 0, b.iov, b.n, KVSRV_SEND_MS);
        uint64_t bytes = 0;
        for (int i = 0; i < b.n; i++) bytes += b.iov[i].len;
        if (rc == 0 && r) kvserver_count_reply(s, r, bytes);
        if (rc != 0 && s->log) fprintf(s->log, "kvstore: a reply was not delivered: %s\n", mlm_strerror(rc));
    } else if (s->log) {
        fprintf(s->log, "kvstore: cannot encode a reply: %s\n", err);
    }
    msg_buf_free(&b);
    return rc;
}

int kvserver_serve(kvserver_t *s, comm_t *c, bool (*stop)(void *arg), void *stop_arg, char *err, size_t errlen) {
    const msg_limits_t lim = msg_limits_default();
    while (!stop || !stop(stop_arg)) {
        comm_msg_t raw;
        int from = -1;
        int rc = comm_recv(c, COMM_ANY, &raw, &from, KVSRV_POLL_MS);
        if (rc == MLM_ETIMEOUT) continue;
        msg_t rep;
        msg_init(&rep, MSG_KV_REPLY);
        if (rc == MLM_EPROTO || rc == MLM_ERANGE) { // dropped by the link: tell the sender
            reply_fail(&rep, rc, "the kvstore refused a %s message", rc == MLM_ERANGE ? "too large" : "malformed");
            if (s->log) fprintf(s->log, "kvstore: %s\n", rep.kv_reply.text);
            send_reply(s, c, &rep, NULL);
            continue;
        }
        if (rc != 0) return mlm_fail(err, errlen, rc, "kvstore: receiving: %s", mlm_strerror(rc));
        msg_t m;
        char why[MSG_TEXT_MAX - 64];
        uint64_t bytes_in = 0;
        for (int i = 0; i < raw.n; i++) bytes_in += raw.len[i];
        rc = msg_decode(&raw, &lim, &m, why, sizeof why);
        if (rc == 0 && m.type != MSG_KV_REQUEST) {
            snprintf(why, sizeof why, "a %s message (the kvstore takes KV_REQUEST only)", msg_type_name(m.type));
            rc = MLM_EPROTO;
        }
        if (rc != 0) {
            reply_fail(&rep, rc, "the kvstore refused %s", why);
            if (s->log) fprintf(s->log, "kvstore: %s\n", rep.kv_reply.text);
            send_reply(s, c, &rep, NULL);
        } else {
            kvserver_handle(s, &m.kv_request, bytes_in, &rep);
            send_reply(s, c, &rep, &m.kv_request);
        }
        msg_clear(&m);
        comm_msg_free(&raw);
    }
    return 0;
}
