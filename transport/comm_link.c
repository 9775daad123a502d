// Control-link comm backend: one DEALER per worker on the coordinator (watched by a socket monitor), one ROUTER on the worker answering the last sender.
#include "transport/comm_link.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "core/bytes.h"
#include "core/clock.h"
#include "core/err.h"

// --- types

#define LK_ID_MAX 256           // longest ZeroMQ routing id
#define LK_POLL_MS 50           // longest single wait, so monitor events and retries are seen
#define LK_DOWN_GRACE_RECONNECTS 4 // a send to a dropped connection waits this many reconnect intervals

typedef struct {
    void *zctx;                 // ZeroMQ context (owned)
    comm_link_opts_t o;         // options in force
    bool listening;             // worker side (ROUTER) rather than coordinator side (DEALERs)
    int rank;                   // 0 on the coordinator; the link rank on the worker (1 until set)
    int size;                   // n + 1 on the coordinator; rank + 1 on the worker
    // coordinator side
    int n;                      // workers
    void **sock;                // (n) DEALER connected to worker i + 1
    void **mon;                 // (n) PAIR receiving the monitor events of sock[i]
    bool *down;                 // (n) the connection dropped and is not back
    int next_any;               // worker a recv(COMM_ANY) looks at first (round robin)
    // worker side
    void *router;               // ROUTER bound to the endpoint
    uint8_t peer[LK_ID_MAX];    // (peer_len) routing id of the coordinator that spoke last
    size_t peer_len;            // 0 until a coordinator spoke
    curve_zap_t *zap;           // with CurveZMQ: the handler admitting only the coordinators' keys
} lk_ctx_t;

// --- helpers

static void envelope(uint8_t out[COMM_LINK_ENVELOPE_BYTES], int n) {
    mlm_put32(out, COMM_LINK_MAGIC);
    out[4] = COMM_LINK_MAJOR;
    out[5] = COMM_LINK_MINOR;
    out[6] = COMM_LINK_DATA;
    out[7] = (uint8_t)n;
}

static void setopt_int(void *sock, int opt, int v) { zmq_setsockopt(sock, opt, &v, sizeof v); }

static void common_opts(lk_ctx_t *k, void *sock) {
    setopt_int(sock, ZMQ_LINGER, k->o.linger_ms);
    if (k->o.heartbeat_ivl_ms > 0) {
        setopt_int(sock, ZMQ_HEARTBEAT_IVL, k->o.heartbeat_ivl_ms);
        setopt_int(sock, ZMQ_HEARTBEAT_TIMEOUT, k->o.heartbeat_timeout_ms);
        setopt_int(sock, ZMQ_HEARTBEAT_TTL, k->o.heartbeat_timeout_ms);
    }
}

// Reads the monitor events of worker i waiting now: a dropped connection marks it down, a new one up.
static void watch(lk_ctx_t *k, int i) {
    for (;;) {
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, k->mon[i], ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        uint16_t what = 0;
        if (zmq_msg_size(&ev) >= 2) memcpy(&what, zmq_msg_data(&ev), 2); // host order, from this process
        bool more = zmq_msg_more(&ev);
        zmq_msg_close(&ev);
        while (more) { // the endpoint frame
            zmq_msg_init(&addr);
            if (zmq_msg_recv(&addr, k->mon[i], ZMQ_DONTWAIT) < 0) more = false;
            else more = zmq_msg_more(&addr);
            zmq_msg_close(&addr);
        }
        if (what == ZMQ_EVENT_CONNECTED) k->down[i] = false;
        if (what == ZMQ_EVENT_DISCONNECTED) k->down[i] = true;
        if (getenv("MESHLM_DEBUG_LINK") && (what == ZMQ_EVENT_CONNECTED || what == ZMQ_EVENT_DISCONNECTED))
            fprintf(stderr, "[link %06.0f] worker %d %s\n", fmod(mlm_now_ms(), 1e6), i + 1, what == ZMQ_EVENT_CONNECTED ? "connected" : "disconnected");
    }
}

// Reads one message waiting on sock (DONTWAIT) into out. 0, MLM_ETIMEOUT (none waiting),
// MLM_ERANGE (over the limit: dropped), MLM_EPROTO (malformed: dropped) or MLM_ENOMEM. On the
// listening side the sender of a well-formed message becomes the peer.
static int take(lk_ctx_t *k, void *sock, comm_msg_t *out) {
    memset(out, 0, sizeof *out);
    uint8_t id[LK_ID_MAX];      // (id_len) routing id of the sender (listening side)
    size_t id_len = 0;
    int part = 0, rc = 0, want = -1;
    size_t total = 0;
    bool more = true;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            if (part == 0) return MLM_ETIMEOUT;
            rc = MLM_EPROTO; // the parts of one message arrive together; should not happen
            break;
        }
        more = zmq_msg_more(&m);
        const uint8_t *d = zmq_msg_data(&m);
        const size_t len = zmq_msg_size(&m);
        const int env_part = k->listening ? 1 : 0;
        if (k->listening && part == 0) {
            if (len <= sizeof id) memcpy(id, d, id_len = len);
        } else if (part == env_part) {
            if (len != COMM_LINK_ENVELOPE_BYTES || mlm_get32(d) != COMM_LINK_MAGIC || d[4] != COMM_LINK_MAJOR ||
                d[6] != COMM_LINK_DATA || d[7] > COMM_MAX_FRAMES)
                rc = MLM_EPROTO;
            else
                want = d[7];
        } else if (rc == 0 && out->n >= want) {
            rc = MLM_EPROTO;
        } else if (rc == 0 && (total += len) > k->o.max_msg_bytes) {
            rc = MLM_ERANGE;
        } else if (rc == 0) {
            out->data[out->n] = malloc(len ? len : 1);
            if (!out->data[out->n]) rc = MLM_ENOMEM;
            else {
                if (len) memcpy(out->data[out->n], d, len);
                out->len[out->n++] = len;
            }
        }
        zmq_msg_close(&m);
        part++;
    }
    if (rc == 0 && (want < 0 || out->n != want)) rc = MLM_EPROTO;
    if (k->listening && want >= 0 && id_len > 0) { // a coordinator spoke (even if too much)
        memcpy(k->peer, id, id_len);
        k->peer_len = id_len;
    }
    if (rc != 0) comm_msg_free(out);
    return rc;
}

// Sends envelope + frames on sock without waiting (after the routing id on the listening side).
// 0, MLM_ETIMEOUT (no room now: try again), MLM_EPEER (the peer's connection is gone).
static int put(lk_ctx_t *k, void *sock, const comm_iov_t *f, int n) {
    uint8_t env[COMM_LINK_ENVELOPE_BYTES];
    envelope(env, n);
    if (k->listening && zmq_send(sock, k->peer, k->peer_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return errno == EHOSTUNREACH ? MLM_EPEER : MLM_ETIMEOUT;
    // once the first part is queued the rest of the message is accepted as a whole
    if (zmq_send(sock, env, sizeof env, (n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0)
        return errno == EHOSTUNREACH ? MLM_EPEER : MLM_ETIMEOUT;
    for (int i = 0; i < n; i++)
        if (zmq_send(sock, f[i].ptr, f[i].len, (i + 1 < n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) return MLM_EPEER;
    return 0;
}

static int wait_ms(int64_t dl) {
    int left = mlm_left_ms(dl);
    return left < 0 || left > LK_POLL_MS ? LK_POLL_MS : left;
}

// --- coordinator side

static int co_send(lk_ctx_t *k, int peer, const comm_iov_t *f, int n, int timeout_ms) {
    const int i = peer - 1;
    const int64_t dl = mlm_deadline(timeout_ms);
    int64_t down_dl = -1; // while the connection is down: how long to wait for it to be made again
    for (;;) {
        watch(k, i);
        if (k->down[i]) {
            // A connection dropped by a heartbeat timeout (a worker stopped for a moment) is made again
            // within a reconnect interval or two: a send waits that long for it, up to its own deadline,
            // before it calls the worker lost (a message given up here would end the step and, with the
            // others waiting in it for this worker, make every worker look lost).
            if (down_dl < 0) {
                down_dl = mlm_deadline(LK_DOWN_GRACE_RECONNECTS * k->o.reconnect_ivl_ms);
                if (getenv("MESHLM_DEBUG_LINK"))
                    fprintf(stderr, "[link %06.0f] send to worker %d: connection down, waiting for it\n",
                            fmod(mlm_now_ms(), 1e6), peer);
            }
            if (mlm_passed(down_dl) || mlm_passed(dl) || timeout_ms == 0) return MLM_EPEER;
            zmq_pollitem_t mi = {k->mon[i], 0, ZMQ_POLLIN, 0};
            if (zmq_poll(&mi, 1, wait_ms(down_dl)) < 0 && errno != EINTR) return MLM_EIO;
            continue;
        }
        zmq_pollitem_t it[2] = {{k->sock[i], 0, ZMQ_POLLOUT, 0}, {k->mon[i], 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(it, 2, 0) < 0 && errno != EINTR) return MLM_EIO;
        if (it[0].revents & ZMQ_POLLOUT) {
            int rc = put(k, k->sock[i], f, n);
            if (rc != MLM_ETIMEOUT) return rc;
        }
        if (mlm_passed(dl) || timeout_ms == 0) return MLM_ETIMEOUT;
        if (zmq_poll(it, 2, wait_ms(dl)) < 0 && errno != EINTR) return MLM_EIO;
    }
}

static int co_recv(lk_ctx_t *k, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    const int64_t dl = mlm_deadline(timeout_ms);
    const int lo = peer == COMM_ANY ? 0 : peer - 1, cnt = peer == COMM_ANY ? k->n : 1;
    zmq_pollitem_t *it = calloc(2 * (size_t)cnt, sizeof *it); // (2 * cnt) sockets, then monitors
    if (!it) return MLM_ENOMEM;
    for (int j = 0; j < cnt; j++) {
        it[j] = (zmq_pollitem_t){k->sock[lo + j], 0, ZMQ_POLLIN, 0};
        it[cnt + j] = (zmq_pollitem_t){k->mon[lo + j], 0, ZMQ_POLLIN, 0};
    }
    int rc = MLM_ETIMEOUT;
    for (;;) {
        bool all_down = true;
        for (int j = 0; j < cnt; j++) { // round robin over the workers asked
            const int i = lo + (peer == COMM_ANY ? (k->next_any + j) % k->n : 0);
            watch(k, i);
            rc = take(k, k->sock[i], out);
            if (rc != MLM_ETIMEOUT) {
                *from = i + 1;
                if (peer == COMM_ANY) k->next_any = (i + 1) % k->n;
                goto done;
            }
            all_down = all_down && k->down[i];
        }
        if (all_down) {
            rc = MLM_EPEER;
            goto done;
        }
        if (mlm_passed(dl) || timeout_ms == 0) {
            rc = MLM_ETIMEOUT;
            goto done;
        }
        if (zmq_poll(it, 2 * cnt, wait_ms(dl)) < 0 && errno != EINTR) {
            rc = MLM_EIO;
            goto done;
        }
    }
done:
    free(it);
    return rc;
}

// --- worker side

static int wk_send(lk_ctx_t *k, int peer, const comm_iov_t *f, int n, int timeout_ms) {
    if (peer != 0 || k->peer_len == 0) return MLM_EPEER;
    const int64_t dl = mlm_deadline(timeout_ms);
    for (;;) {
        int rc = put(k, k->router, f, n);
        if (rc != MLM_ETIMEOUT) return rc;
        if (mlm_passed(dl) || timeout_ms == 0) return MLM_ETIMEOUT;
        struct timespec ts = {0, 1000000}; // the coordinator's queue is full: retry shortly
        nanosleep(&ts, NULL);
    }
}

static int wk_recv(lk_ctx_t *k, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    if (peer != 0 && peer != COMM_ANY) return MLM_EPEER;
    const int64_t dl = mlm_deadline(timeout_ms);
    for (;;) {
        int rc = take(k, k->router, out);
        if (rc != MLM_ETIMEOUT) {
            *from = 0;
            return rc;
        }
        if (mlm_passed(dl) || timeout_ms == 0) return MLM_ETIMEOUT;
        zmq_pollitem_t it = {k->router, 0, ZMQ_POLLIN, 0};
        int left = mlm_left_ms(dl);
        if (zmq_poll(&it, 1, left < 0 ? -1 : left) < 0 && errno != EINTR) return MLM_EIO;
    }
}

// --- backend

static const char *lk_name(void *ctx) { return "link"; }
static int lk_rank(void *ctx) { return ((lk_ctx_t *)ctx)->rank; }
static int lk_size(void *ctx) { return ((lk_ctx_t *)ctx)->size; }

static int lk_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    lk_ctx_t *k = ctx;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += frames[i].len;
    if (total > k->o.max_msg_bytes) return MLM_ERANGE;
    return k->listening ? wk_send(k, peer, frames, n, timeout_ms) : co_send(k, peer, frames, n, timeout_ms);
}

static int lk_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    lk_ctx_t *k = ctx;
    *from = -1;
    return k->listening ? wk_recv(k, peer, out, from, timeout_ms) : co_recv(k, peer, out, from, timeout_ms);
}

static void lk_destroy(void *ctx) {
    lk_ctx_t *k = ctx;
    if (!k) return;
    for (int i = 0; i < k->n; i++) {
        if (k->sock && k->sock[i]) {
            zmq_socket_monitor(k->sock[i], NULL, 0);
            zmq_close(k->sock[i]);
        }
        if (k->mon && k->mon[i]) zmq_close(k->mon[i]);
    }
    if (k->router) zmq_close(k->router);
    curve_zap_stop(&k->zap); // closes its socket: before the context ends
    if (k->zctx) zmq_ctx_term(k->zctx);
    free(k->sock);
    free(k->mon);
    free(k->down);
    free(k);
}

static const struct comm_backend_i link_iface = {
    .name = lk_name,
    .rank = lk_rank,
    .size = lk_size,
    .send = lk_send,
    .recv = lk_recv,
    .destroy = lk_destroy,
};

static lk_ctx_t *lk_new(const comm_link_opts_t *opts) {
    lk_ctx_t *k = calloc(1, sizeof *k);
    if (!k) return NULL;
    if (opts) k->o = *opts;
    else comm_link_opts_default(&k->o);
    if (!k->o.max_msg_bytes) k->o.max_msg_bytes = (size_t)256 << 20;
    if (k->o.heartbeat_timeout_ms <= 0) k->o.heartbeat_timeout_ms = 5000;
    if (k->o.reconnect_ivl_ms <= 0) k->o.reconnect_ivl_ms = 50;
    if (k->o.linger_ms < 0) k->o.linger_ms = 0;
    k->zctx = zmq_ctx_new();
    if (!k->zctx) {
        free(k);
        return NULL;
    }
    return k;
}

// Wraps k in a comm. 0, or MLM_ENOMEM (k destroyed).
static int finish(comm_t **out, lk_ctx_t *k, char *err, size_t errlen) {
    k->o.curve = NULL; // borrowed for the call only (the key handler keeps its own copy)
    comm_t *c = comm_new(&link_iface, k);
    if (!c) {
        lk_destroy(k);
        return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    }
    *out = c;
    return 0;
}

// --- public API

void comm_link_opts_default(comm_link_opts_t *o) {
    o->max_msg_bytes = (size_t)256 << 20;
    o->linger_ms = 100;
    o->heartbeat_ivl_ms = 0;
    o->heartbeat_timeout_ms = 5000;
    o->reconnect_ivl_ms = 50;
}

int comm_link_connect(comm_t **out, const char *const *endpoints, int n, const comm_link_opts_t *opts, char *err,
                      size_t errlen) {
    if (out) *out = NULL;
    if (!out || !endpoints || n < 1) return mlm_fail(err, errlen, MLM_EINVAL, "link: bad arguments (%d workers)", n);
    lk_ctx_t *k = lk_new(opts);
    if (!k) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    k->n = n;
    k->size = n + 1;
    k->sock = calloc((size_t)n, sizeof *k->sock);
    k->mon = calloc((size_t)n, sizeof *k->mon);
    k->down = calloc((size_t)n, sizeof *k->down);
    if (!k->sock || !k->mon || !k->down) {
        lk_destroy(k);
        return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        char mon_ep[64];
        snprintf(mon_ep, sizeof mon_ep, "inproc://link-monitor-%d", i);
        k->sock[i] = zmq_socket(k->zctx, ZMQ_DEALER);
        if (!k->sock[i]) {
            lk_destroy(k);
            return mlm_fail(err, errlen, MLM_EIO, "cannot create a ZeroMQ socket: %s", zmq_strerror(errno));
        }
        common_opts(k, k->sock[i]);
        if (k->o.curve) { // the worker must hold the secret of the key listed for its endpoint
            const char *sk = endpoints[i] ? curve_peer_key(&k->o.curve->peers, endpoints[i]) : NULL;
            if (!sk) {
                lk_destroy(k);
                return mlm_fail(err, errlen, MLM_EINVAL, "no key is listed for worker %s (CurveZMQ: add 'KEY %s' to the peers file)",
                                endpoints[i] ? endpoints[i] : "(null)", endpoints[i] ? endpoints[i] : "ENDPOINT");
            }
            zmq_setsockopt(k->sock[i], ZMQ_CURVE_SERVERKEY, sk, CURVE_KEY_LEN);
            zmq_setsockopt(k->sock[i], ZMQ_CURVE_PUBLICKEY, k->o.curve->self.pub, CURVE_KEY_LEN);
            zmq_setsockopt(k->sock[i], ZMQ_CURVE_SECRETKEY, k->o.curve->self.sec, CURVE_KEY_LEN);
        }
        // no ZMQ_IMMEDIATE: with it a dropped connection discards the messages the worker sent last
        setopt_int(k->sock[i], ZMQ_RECONNECT_IVL, k->o.reconnect_ivl_ms);
        if (zmq_socket_monitor(k->sock[i], mon_ep, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) != 0 ||
            !(k->mon[i] = zmq_socket(k->zctx, ZMQ_PAIR)) || zmq_connect(k->mon[i], mon_ep) != 0) {
            int e = errno;
            lk_destroy(k);
            return mlm_fail(err, errlen, MLM_EIO, "cannot monitor a ZeroMQ socket: %s", zmq_strerror(e));
        }
        if (!endpoints[i] || zmq_connect(k->sock[i], endpoints[i]) != 0) {
            int e = errno;
            lk_destroy(k);
            return mlm_fail(err, errlen, MLM_EIO, "cannot connect to %s: %s", endpoints[i] ? endpoints[i] : "(null)",
                            zmq_strerror(e));
        }
    }
    return finish(out, k, err, errlen);
}

int comm_link_listen(comm_t **out, const char *endpoint, const comm_link_opts_t *opts, char *err, size_t errlen) {
    if (out) *out = NULL;
    if (!out || !endpoint) return mlm_fail(err, errlen, MLM_EINVAL, "link: no endpoint");
    lk_ctx_t *k = lk_new(opts);
    if (!k) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    k->listening = true;
    k->rank = 1;
    k->size = 2;
    k->router = zmq_socket(k->zctx, ZMQ_ROUTER);
    if (!k->router) {
        lk_destroy(k);
        return mlm_fail(err, errlen, MLM_EIO, "cannot create a ZeroMQ socket: %s", zmq_strerror(errno));
    }
    common_opts(k, k->router);
    setopt_int(k->router, ZMQ_ROUTER_MANDATORY, 1); // a vanished coordinator is an error, not a silent drop
    if (k->o.curve) { // only coordinators holding a listed key get in (the ZAP handler checks each)
        int rc = curve_zap_start(&k->zap, k->zctx, &k->o.curve->peers, "link", err, errlen);
        if (rc != 0) {
            lk_destroy(k);
            return rc;
        }
        setopt_int(k->router, ZMQ_CURVE_SERVER, 1);
        zmq_setsockopt(k->router, ZMQ_CURVE_SECRETKEY, k->o.curve->self.sec, CURVE_KEY_LEN);
        zmq_setsockopt(k->router, ZMQ_ZAP_DOMAIN, "meshlm", 6);
    }
    if (zmq_bind(k->router, endpoint) != 0) {
        int e = errno;
        lk_destroy(k);
        return mlm_fail(err, errlen, MLM_EIO, "cannot listen on %s: %s", endpoint, zmq_strerror(e));
    }
    return finish(out, k, err, errlen);
}

int comm_link_heartbeat_ms(const comm_t *c) {
    const lk_ctx_t *k = c ? comm_backend_ctx(c, &link_iface) : NULL;
    return k && k->o.heartbeat_ivl_ms > 0 ? k->o.heartbeat_ivl_ms + k->o.heartbeat_timeout_ms : 0;
}

int comm_link_set_rank(comm_t *c, int rank) {
    lk_ctx_t *k = c ? comm_backend_ctx(c, &link_iface) : NULL;
    if (!k || !k->listening || rank < 1) return MLM_EINVAL;
    k->rank = rank;
    k->size = rank + 1;
    return 0;
}

int comm_link_set_max_bytes(comm_t *c, size_t max_msg_bytes) {
    lk_ctx_t *k = c ? comm_backend_ctx(c, &link_iface) : NULL;
    if (!k || max_msg_bytes == 0) return MLM_EINVAL;
    k->o.max_msg_bytes = max_msg_bytes;
    return 0;
}

int comm_link_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen) {
    if (out) *out = NULL;
    if (!o) return mlm_fail(err, errlen, MLM_EINVAL, "link: needs endpoints");
    comm_link_opts_t lo;
    comm_link_opts_default(&lo);
    if (o->max_msg_bytes) lo.max_msg_bytes = o->max_msg_bytes;
    if (o->heartbeat_ivl_ms) lo.heartbeat_ivl_ms = o->heartbeat_ivl_ms < 0 ? 0 : o->heartbeat_ivl_ms;
    if (o->heartbeat_timeout_ms > 0) lo.heartbeat_timeout_ms = o->heartbeat_timeout_ms;
    lo.curve = o->curve;
    if (!o->listen && o->rank == 0) {
        if (!o->endpoints || o->size < 2)
            return mlm_fail(err, errlen, MLM_EINVAL, "link: the coordinator needs size >= 2 and the workers' endpoints");
        return comm_link_connect(out, o->endpoints, o->size - 1, &lo, err, errlen);
    }
    const char *ep = o->listen;
    if (!ep && (!o->endpoints || o->rank < 1 || o->rank >= o->size))
        return mlm_fail(err, errlen, MLM_EINVAL, "link: rank %d of %d has no endpoint to listen on", o->rank, o->size);
    if (!ep) ep = o->endpoints[o->rank - 1];
    int rc = comm_link_listen(out, ep, &lo, err, errlen);
    if (rc == 0 && o->rank >= 1) rc = comm_link_set_rank(*out, o->rank);
    if (rc != 0 && *out) comm_destroy(out);
    return rc;
}

int comm_link_data_endpoint(const char *control, char *out, size_t cap) {
    if (strncmp(control, "ipc://", 6) == 0) {
        int n = snprintf(out, cap, "%s.data", control);
        return n > 0 && (size_t)n < cap ? 0 : MLM_EINVAL;
    }
    if (strncmp(control, "tcp://", 6) != 0) return MLM_EINVAL;
    const char *colon = strrchr(control, ':');
    if (!colon || colon < control + 6) return MLM_EINVAL;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 1 || port >= 65535) return MLM_EINVAL;
    int n = snprintf(out, cap, "%.*s:%ld", (int)(colon - control), control, port + 1);
    return n > 0 && (size_t)n < cap ? 0 : MLM_EINVAL;
}
