// The storage attention device: a client of `meshlm kvstore` that ships q and new k/v rows, receives outputs.
#include "worker/node/attn_storage.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/fp16.h"
#include "offload/attn_impl.h"
#include "proto/msg.h"
#include "transport/comm.h"
#include "transport/comm_link.h"

// --- types

#define STOR_CLOSE_MS 1000    // deadline of the goodbye when the device is freed
#define STOR_PEER 1           // the store's rank on the link

typedef struct {
    attn_params_t p;
    char ep[256];             // the store's endpoint
    int timeout_ms;           // deadline of one request
    comm_t *c;                // the link to the store (owned)
    uint64_t session;         // the store's id for this device (0 before OPEN's reply)
    uint64_t next_req;        // the last request id used
    size_t kvd, qd;           // elements of a k / v row and of a q / out row
    size_t elt;               // bytes per element on the wire (the cache type's)
    bool f16;                 // F16 cache: rows travel as halves
    int dead;                 // once the store is lost or silent: the code every later call fails with
    // the append held back for the attend that follows it
    bool pend;
    int pend_seq, pend_layer, pend_pos, pend_n;
    uint8_t *pk, *pv;         // (pkcap), (pvcap) k and v rows of the held-back append, wire type
    size_t pkcap, pvcap;
    uint8_t *qb;              // (qcap) q rows in the wire type
    size_t qcap;
    attn_stats_t st;          // time_ms and link bytes measured here; the store's counters from its last reply
    char errstr[MSG_TEXT_MAX + 256]; // the last failure
} stor_t;

// --- helpers

__attribute__((format(printf, 4, 5)))
static int stor_fail(stor_t *s, int code, bool say, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->errstr, sizeof s->errstr, fmt, ap);
    va_end(ap);
    if (say) fprintf(stderr, "meshlm: %s\n", s->errstr);
    return code;
}

// Rows of cnt floats in the wire type, in *buf (grown to hold them). NULL when out of memory.
static const void *wire_rows(stor_t *s, const float *x, size_t cnt, uint8_t **buf, size_t *cap) {
    const size_t bytes = cnt * s->elt;
    if (bytes > *cap) {
        uint8_t *b = realloc(*buf, bytes);
        if (!b) return NULL;
        *buf = b;
        *cap = bytes;
    }
    if (!s->f16) {
        memcpy(*buf, x, bytes);
        return *buf;
    }
    mlm_f16_t *h = (mlm_f16_t *)*buf;
    for (size_t i = 0; i < cnt; i++) h[i] = mlm_f32_to_f16(x[i]);
    return *buf;
}

static msg_tensor_t rows_tensor(const stor_t *s, const void *data, size_t width, int n) {
    return (msg_tensor_t){.type = s->f16 ? QT_F16 : QT_F32, .n_dims = 2, .ne = {(int64_t)width, n, 1, 1},
                          .nbytes = width * (size_t)n * s->elt, .data = data};
}

// One request and its reply, within the deadline. out (rows x qd floats) receives an ATTEND's
// answer. say: a failure is also a line on stderr. 0 or the failure's code (errstr says why).
static int call(stor_t *s, msg_t *req, const char *what, float *out, int rows, bool say) {
    if (s->dead) return s->dead;
    const double t0 = mlm_now_ms();
    const int64_t dl = mlm_deadline(s->timeout_ms);
    msg_kv_request_t *r = &req->kv_request;
    r->session = s->session;
    r->req_id = ++s->next_req;
    msg_buf_t b;
    char err[MSG_TEXT_MAX];
    int rc = msg_encode(req, NULL, &b, err, sizeof err);
    if (rc != 0) {
        msg_buf_free(&b);
        return stor_fail(s, rc, say, "storage device %s: %s: %s", s->ep, what, err);
    }
    for (int i = 0; i < b.n; i++) s->st.bytes_to_dev += b.iov[i].len;
    rc = comm_send(s->c, STOR_PEER, b.iov, b.n, s->timeout_ms);
    msg_buf_free(&b);
    while (rc == 0) {
        comm_msg_t raw;
        int from = -1;
        rc = comm_recv(s->c, STOR_PEER, &raw, &from, mlm_passed(dl) ? 0 : mlm_left_ms(dl));
        if (rc != 0) break;
        for (int i = 0; i < raw.n; i++) s->st.bytes_from_dev += raw.len[i];
        msg_t m;
        rc = msg_decode(&raw, NULL, &m, err, sizeof err);
        if (rc != 0) {
            comm_msg_free(&raw);
            s->st.time_ms += mlm_now_ms() - t0;
            return stor_fail(s, rc, say, "storage device %s: %s: a malformed reply: %s", s->ep, what, err);
        }
        const msg_kv_reply_t *o = &m.kv_reply;
        const bool ours = m.type == MSG_KV_REPLY && o->req_id == r->req_id;
        const bool refusal = m.type == MSG_KV_REPLY && o->req_id == 0 && o->status < 0; // it could not read ours
        if (!ours && !refusal) { // a late answer to an abandoned request
            msg_clear(&m);
            comm_msg_free(&raw);
            continue;
        }
        if (ours) {
            s->st.kv_bytes = o->stats.kv_bytes;
            s->st.bytes_read = o->stats.bytes_read;
            s->st.bytes_written = o->stats.bytes_written;
            s->st.sim_time_ms = (double)o->stats.flash_ns / 1e6;
        }
        if (o->status < 0) {
            rc = stor_fail(s, o->status, say, "storage device %s: %s: the kvstore says: %s", s->ep, what, o->text);
        } else if (out && (!o->has_out || o->out.ne[0] != (int64_t)s->qd || o->out.ne[1] != rows)) {
            rc = stor_fail(s, MLM_EPROTO, say, "storage device %s: %s: the reply has no output of %d rows", s->ep, what,
                           rows);
        } else if (out) {
            memcpy(out, o->out.data, (size_t)rows * s->qd * sizeof(float));
        }
        if (ours && r->op == MSG_KV_OPEN && rc == 0) s->session = o->session;
        msg_clear(&m);
        comm_msg_free(&raw);
        s->st.time_ms += mlm_now_ms() - t0;
        return rc;
    }
    s->st.time_ms += mlm_now_ms() - t0;
    s->dead = rc == MLM_ETIMEOUT || rc == MLM_EPEER ? rc : MLM_EPEER;
    if (rc == MLM_ETIMEOUT)
        return stor_fail(s, rc, say, "storage device: the kvstore at %s did not answer within %d ms (%s)", s->ep,
                         s->timeout_ms, what);
    return stor_fail(s, s->dead, say, "storage device: the kvstore at %s was lost mid-request (%s): %s", s->ep, what,
                     mlm_strerror(rc));
}

// Sends the held-back append on its own.
static int flush(stor_t *s, bool say) {
    if (!s->pend) return 0;
    s->pend = false;
    msg_t m;
    msg_init(&m, MSG_KV_REQUEST);
    msg_kv_request_t *r = &m.kv_request;
    r->op = MSG_KV_APPEND;
    r->seq = s->pend_seq;
    r->layer = s->pend_layer;
    r->has_kv = true;
    r->append_pos = s->pend_pos;
    r->append_n = (uint32_t)s->pend_n;
    r->k = rows_tensor(s, s->pk, s->kvd, s->pend_n);
    r->v = rows_tensor(s, s->pv, s->kvd, s->pend_n);
    char what[96];
    snprintf(what, sizeof what, "append to sequence %d layer %d", r->seq, r->layer);
    return call(s, &m, what, NULL, 0, say);
}

// --- the device

static int stor_seq_new(void *ctx, int seq, int n_ctx) {
    stor_t *s = ctx;
    int rc = flush(s, true);
    if (rc != 0) return rc;
    msg_t m;
    msg_init(&m, MSG_KV_REQUEST);
    m.kv_request.op = MSG_KV_SEQ_NEW;
    m.kv_request.seq = seq;
    m.kv_request.n_ctx = (uint32_t)n_ctx;
    char what[96];
    snprintf(what, sizeof what, "new sequence %d of %d positions", seq, n_ctx);
    return call(s, &m, what, NULL, 0, true);
}

static int stor_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    stor_t *s = ctx;
    if (s->dead) return s->dead;
    int rc = flush(s, true);
    if (rc != 0) return rc;
    const size_t cnt = (size_t)n * s->kvd;
    if (!wire_rows(s, k, cnt, &s->pk, &s->pkcap) || !wire_rows(s, v, cnt, &s->pv, &s->pvcap)) return MLM_ENOMEM;
    s->pend = true;
    s->pend_seq = seq;
    s->pend_layer = layer;
    s->pend_pos = pos;
    s->pend_n = n;
    return 0;
}

static int stor_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    stor_t *s = ctx;
    if (s->dead) return s->dead;
    int rc = 0;
    if (s->pend && (s->pend_seq != seq || s->pend_layer != layer) && (rc = flush(s, true)) != 0) return rc;
    msg_t m;
    msg_init(&m, MSG_KV_REQUEST);
    msg_kv_request_t *r = &m.kv_request;
    r->op = MSG_KV_ATTEND;
    r->seq = seq;
    r->layer = layer;
    r->pos = pos0;
    r->n = (uint32_t)n;
    if (s->pend) { // the append this attend follows travels with it
        s->pend = false;
        r->has_kv = true;
        r->append_pos = s->pend_pos;
        r->append_n = (uint32_t)s->pend_n;
        r->k = rows_tensor(s, s->pk, s->kvd, s->pend_n);
        r->v = rows_tensor(s, s->pv, s->kvd, s->pend_n);
    }
    const void *qw = wire_rows(s, q, (size_t)n * s->qd, &s->qb, &s->qcap);
    if (!qw) return MLM_ENOMEM;
    r->has_q = true;
    r->q = rows_tensor(s, qw, s->qd, n);
    char what[96];
    snprintf(what, sizeof what, "attend sequence %d layer %d at %d", seq, layer, pos0);
    return call(s, &m, what, out, n, true);
}

static void stor_seq_drop(void *ctx, int seq) {
    stor_t *s = ctx;
    if (s->pend && s->pend_seq == seq) s->pend = false; // its rows go with it
    if (s->dead || flush(s, true) != 0) return;
    msg_t m;
    msg_init(&m, MSG_KV_REQUEST);
    m.kv_request.op = MSG_KV_SEQ_DROP;
    m.kv_request.seq = seq;
    call(s, &m, "drop a sequence", NULL, 0, true);
}

static void stor_stats(void *ctx, attn_stats_t *out) {
    const stor_t *s = ctx;
    out->time_ms = s->st.time_ms;
    out->kv_bytes = s->st.kv_bytes;
    out->kv_bytes_ram = 0;
    out->bytes_to_dev = s->st.bytes_to_dev;
    out->bytes_from_dev = s->st.bytes_from_dev;
    out->bytes_read = s->st.bytes_read;
    out->bytes_written = s->st.bytes_written;
    out->sim_time_ms = s->st.sim_time_ms;
}

static void stor_free(void *ctx) {
    stor_t *s = ctx;
    if (!s) return;
    if (s->c && s->session && !s->dead) { // the store drops the session and its files
        msg_t m;
        msg_init(&m, MSG_KV_REQUEST);
        m.kv_request.op = MSG_KV_CLOSE;
        s->timeout_ms = s->timeout_ms < STOR_CLOSE_MS ? s->timeout_ms : STOR_CLOSE_MS;
        call(s, &m, "close", NULL, 0, false);
    }
    comm_destroy(&s->c);
    free(s->pk);
    free(s->pv);
    free(s->qb);
    free(s);
}

static const struct attn_dev_i stor_iface = {
    .seq_new = stor_seq_new,
    .append = stor_append,
    .attend = stor_attend,
    .seq_drop = stor_seq_drop,
    .stats = stor_stats,
    .free = stor_free,
};

// --- public API

int attn_storage_register(void) {
    int rc = attn_dev_register("storage", attn_storage_new);
    return rc == MLM_ESTATE ? 0 : rc;
}

int attn_storage_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen) {
    *out = NULL;
    int rc = attn_params_check(p, err, errlen);
    if (rc != 0) return rc;
    if (!arg || (strncmp(arg, "tcp://", 6) != 0 && strncmp(arg, "ipc://", 6) != 0))
        return mlm_fail(err, errlen, MLM_EINVAL, "storage device: give the kvstore's endpoint (storage:tcp://HOST:PORT "
                        "or storage:ipc:///PATH), not '%s'", arg ? arg : "");
    if (p->kv_type == QT_Q8_0) // the link carries halves or floats
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "storage device: an F16 or F32 KV cache, not Q8_0");
    stor_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    s->p = *p;
    if (s->p.n_seq_max < 1) s->p.n_seq_max = 1;
    s->timeout_ms = ATTN_STORAGE_TIMEOUT_MS;
    const char *comma = strchr(arg, ',');
    const size_t eplen = comma ? (size_t)(comma - arg) : strlen(arg);
    if (eplen >= sizeof s->ep) {
        stor_free(s);
        return mlm_fail(err, errlen, MLM_EINVAL, "storage device: endpoint longer than %zu bytes", sizeof s->ep - 1);
    }
    memcpy(s->ep, arg, eplen);
    if (comma) {
        char *end = NULL;
        long ms = strncmp(comma + 1, "timeout=", 8) == 0 ? strtol(comma + 9, &end, 10) : -1;
        if (!end || *end || ms < 1 || ms > 3600000) {
            stor_free(s);
            return mlm_fail(err, errlen, MLM_EINVAL, "storage device: unknown option '%s' (timeout=MS)", comma + 1);
        }
        s->timeout_ms = (int)ms;
    }
    s->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    s->qd = (size_t)(p->h1 - p->h0) * (size_t)p->head_dim;
    s->f16 = p->kv_type == QT_F16;
    s->elt = s->f16 ? 2 : 4;
    const char *eps[1] = {s->ep};
    if ((rc = comm_link_connect(&s->c, eps, 1, NULL, err, errlen)) != 0) {
        stor_free(s);
        return rc;
    }
    msg_t m;
    msg_init(&m, MSG_KV_REQUEST);
    msg_kv_request_t *r = &m.kv_request;
    r->op = MSG_KV_OPEN;
    r->shape = (msg_kv_shape_t){.n_layer = (uint32_t)p->n_layer, .head_dim = (uint32_t)p->head_dim,
                                .n_head = (uint32_t)p->n_head, .n_head_kv = (uint32_t)p->n_head_kv,
                                .heads = {p->h0, p->h1}, .kv_heads = {p->kv0, p->kv1}, .kv_type = p->kv_type,
                                .n_seq_max = (uint32_t)s->p.n_seq_max};
    if ((rc = call(s, &m, "open a session", NULL, 0, false)) != 0) {
        if (rc == MLM_ETIMEOUT)
            mlm_fail(err, errlen, rc, "storage device: no kvstore answered at %s within %d ms (start one with "
                     "meshlm kvstore --listen %s --dir DIR)", s->ep, s->timeout_ms, s->ep);
        else
            mlm_fail(err, errlen, rc, "%s", s->errstr);
        stor_free(s);
        return rc;
    }
    if (!(*out = attn_dev_wrap(&stor_iface, s, "storage", &s->p))) return MLM_ENOMEM;
    return 0;
}
