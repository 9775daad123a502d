// ZeroMQ comm backend: a bound ROUTER receives from every peer, a connecting ROUTER sends to them; per-peer queues.
#include "transport/comm_zmq.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "core/bytes.h"
#include "core/clock.h"
#include "core/err.h"
#include "transport/fault.h"

// --- types

typedef struct zq_item {
    struct zq_item *next;       // next item of the same queue
    uint64_t stamp;             // arrival order over all queues
    int err;                    // 0 = message, else the MLM_E* this slot reports (message dropped)
    int src;                    // sender rank, -1 if unknown
    comm_msg_t msg;             // user frames (owned) when err == 0
} zq_item_t;

typedef struct {
    zq_item_t *head;            // oldest
    zq_item_t *tail;            // newest
    int n;                      // items
} zq_queue_t;

#define ZQ_ANON_MAX 64          // rejected messages of unknown origin kept for recv(ANY)
#define ZQ_EP_MAX 512           // longest endpoint string
#define ZQ_HELLO_EVERY_MS 10    // the handshake repeats its HELLOs this often until they are acknowledged
#define ZQ_GRACE_MS 20          // after a peer is seen gone, wait this long for its last messages
#define ZQ_REFUSE_GRACE_MS 300  // a refusing rank keeps delivering its HELLO this long, then leaves

typedef struct {
    void *zctx;                 // ZeroMQ context (owned)
    void *in;                   // ROUTER bound to this rank's endpoint: receives from all peers
    void *out;                  // ROUTER connected to every peer (ROUTER_MANDATORY, IMMEDIATE): sends
    int rank;                   // this rank
    int size;                   // ranks in the world
    comm_zmq_opts_t o;          // options in force
    zq_queue_t *q;              // (size) received messages per source rank
    zq_queue_t anon;            // rejected messages that name no valid rank
    bool *lost;                 // (size) peer gone for good (unreachable or said BYE)
    bool *left;                 // (size) of those, the ones that said BYE (left cleanly)
    bool *hello;                // (size) HELLO received from peer
    bool *heard;                // (size) peer's HELLO said it has ours (the handshake with it is complete)
    int64_t *next_probe;        // (size) monotonic us of the next liveness probe
    uint64_t stamp;             // messages queued so far
    uint64_t rejected;          // messages dropped as malformed, oversized or unknown
    char proto_err[192];        // first handshake mismatch seen ("" if none)
    // CurveZMQ (opts.curve): the key check of the bound socket, and what the handshake learns
    curve_zap_t *zap;           // ZAP handler admitting only the world's keys (NULL = plain world)
    void *mon;                  // PAIR receiving the outbound socket's handshake failures (handshake phase only)
    char (*conn)[ZQ_EP_MAX];    // (size) the endpoint this rank dials for each peer
    int64_t *refused_at;        // (size) monotonic us of the peer's first refusal of this rank's key (0 = none)
    int64_t *redial_at;         // (size) when to dial the refusing peer again (0 = not due)
    int *shake_failed;          // (size) CURVE handshakes with the peer that failed otherwise (e.g. it
                                // does not hold the key listed for it)
} zq_ctx_t;

#define ZQ_MON_EP "inproc://meshlm.zmq.handshake" // the outbound socket's monitor (one per context)
#define ZQ_REDIAL_MS 50         // a peer that refused this rank's key is dialled again after this long ...
                                // ... until ZQ_REFUSE_GRACE_MS after its first refusal (the refusal may come from
                                // a socket of an earlier world still going away), then the handshake fails

// --- helpers

// ZeroMQ routing ids must not start with a zero byte: a letter, then the rank.
static void routing_id(uint8_t id[5], char tag, int rank) {
    id[0] = (uint8_t)tag;
    mlm_put32(id + 1, (uint32_t)rank);
}

static void item_free(zq_item_t *it) {
    comm_msg_free(&it->msg);
    free(it);
}

static void queue_push(zq_ctx_t *z, zq_queue_t *q, zq_item_t *it) {
    it->stamp = z->stamp++;
    if (q->tail) q->tail->next = it;
    else q->head = it;
    q->tail = it;
    q->n++;
}

static zq_item_t *queue_pop(zq_queue_t *q) {
    zq_item_t *it = q->head;
    if (!it) return NULL;
    q->head = it->next;
    if (!q->head) q->tail = NULL;
    q->n--;
    it->next = NULL;
    return it;
}

static void queue_clear(zq_queue_t *q) {
    for (zq_item_t *it; (it = queue_pop(q));) item_free(it);
}

// Records a dropped message: attributed to rank src (its queue reports err) or, if src < 0, to the
// anonymous queue that only recv(ANY) reports.
static void push_err(zq_ctx_t *z, int src, int err) {
    z->rejected++;
    zq_queue_t *q = src >= 0 ? &z->q[src] : &z->anon;
    if (src < 0 && q->n >= ZQ_ANON_MAX) item_free(queue_pop(q));
    zq_item_t *it = calloc(1, sizeof *it);
    if (!it) return;
    it->err = err;
    it->src = src;
    queue_push(z, q, it);
}

// Sends one message (envelope + frames) without waiting. 0, or the errno of the failure
// (EAGAIN: queue full, EHOSTUNREACH: no connection to peer).
static int send_parts(zq_ctx_t *z, int peer, int kind, const comm_iov_t *f, int n) {
    uint8_t id[5], env[COMM_ZMQ_ENVELOPE_BYTES];
    routing_id(id, 'p', peer);
    comm_zmq_envelope(env, kind, z->rank, (uint32_t)z->size | (uint32_t)z->o.session << 16, n);
    if (zmq_send(z->out, id, sizeof id, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return errno ? errno : EIO;
    // the first part decided routing: the rest of the message is accepted as a whole
    if (zmq_send(z->out, env, sizeof env, (n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) return EIO;
    for (int i = 0; i < n; i++)
        if (zmq_send(z->out, f[i].ptr, f[i].len, (i + 1 < n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) return EIO;
    return 0;
}

// A HELLO to peer with byte 7 of the envelope = state (a HELLO has no frames): 0 we lack the peer's
// HELLO, 1 we have it, 2 we have it and know the peer has ours.
static int send_hello(zq_ctx_t *z, int peer, int state) {
    uint8_t id[5], env[COMM_ZMQ_ENVELOPE_BYTES];
    routing_id(id, 'p', peer);
    comm_zmq_envelope(env, COMM_ZMQ_HELLO, z->rank, (uint32_t)z->size | (uint32_t)z->o.session << 16, state);
    if (zmq_send(z->out, id, sizeof id, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return errno ? errno : EIO;
    return zmq_send(z->out, env, sizeof env, ZMQ_DONTWAIT) < 0 ? EIO : 0;
}

// Reads and files one message from the inbound socket. 1 if one was taken, 0 if none waited.
static int take_one(zq_ctx_t *z) {
    zmq_msg_t part[COMM_MAX_FRAMES + 2]; // routing id, envelope, user frames
    int np = 0, more = 1;
    bool overflow = false, broken = false;
    while (more) {
        zmq_msg_t spare, *m = np < COMM_MAX_FRAMES + 2 ? &part[np] : &spare;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, z->in, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(m);
            if (np == 0 && !overflow) return 0;
            broken = true; // parts of one message arrive together; should not happen
            break;
        }
        more = zmq_msg_more(m);
        if (m == &spare) {
            overflow = true;
            zmq_msg_close(m);
        } else {
            np++;
        }
    }
    const uint8_t *e = NULL;
    if (!broken && np >= 2 && zmq_msg_size(&part[1]) == COMM_ZMQ_ENVELOPE_BYTES) e = zmq_msg_data(&part[1]);
    if (!e || mlm_get32(e) != COMM_ZMQ_MAGIC) {
        push_err(z, -1, MLM_EPROTO);
        goto done;
    }
    const int major = e[4], minor = e[5], kind = e[6], nf = e[7];
    const uint32_t src = mlm_get32(e + 8), world = mlm_get32(e + 12) & 0xffffu, session = mlm_get32(e + 12) >> 16;
    if (session != z->o.session) goto done; // a message of another world on the same endpoints: stale
    if (major != COMM_ZMQ_MAJOR) {
        if (!z->proto_err[0])
            snprintf(z->proto_err, sizeof z->proto_err, "a peer speaks protocol %d.%d, rank %d speaks %d.%d", major,
                     minor, z->rank, COMM_ZMQ_MAJOR, COMM_ZMQ_MINOR);
        push_err(z, -1, MLM_EPROTO);
        goto done;
    }
    if (world != (uint32_t)z->size) {
        if (kind == COMM_ZMQ_HELLO && !z->proto_err[0])
            snprintf(z->proto_err, sizeof z->proto_err, "rank %u says the world has %u ranks, rank %d has %d", src,
                     world, z->rank, z->size);
        push_err(z, -1, MLM_EPROTO);
        goto done;
    }
    if (src >= (uint32_t)z->size || src == (uint32_t)z->rank) {
        push_err(z, -1, MLM_EPROTO);
        goto done;
    }
    switch (kind) {
    case COMM_ZMQ_HELLO: // byte 7: 0 the sender lacks our HELLO, 1 it has it, 2 it also knows we have its
        z->hello[src] = true;
        if (nf >= 1) z->heard[src] = true;
        if (nf < 2) send_hello(z, (int)src, z->heard[src] ? 2 : 1); // answered at once, whatever we are doing
        break;
    case COMM_ZMQ_PROBE: break;
    case COMM_ZMQ_BYE: z->lost[src] = z->left[src] = true; break;
    case COMM_ZMQ_DATA: {
        if (overflow || nf > COMM_MAX_FRAMES || nf != np - 2) {
            push_err(z, (int)src, MLM_EPROTO);
            break;
        }
        size_t total = 0;
        for (int i = 2; i < np; i++) total += zmq_msg_size(&part[i]);
        if (total > z->o.max_msg_bytes) {
            push_err(z, (int)src, MLM_ERANGE);
            break;
        }
        zq_item_t *it = calloc(1, sizeof *it);
        if (!it) {
            push_err(z, (int)src, MLM_ENOMEM);
            break;
        }
        it->src = (int)src;
        for (int i = 0; i < nf; i++) {
            size_t len = zmq_msg_size(&part[i + 2]);
            it->msg.data[i] = malloc(len ? len : 1);
            if (!it->msg.data[i]) break;
            if (len) memcpy(it->msg.data[i], zmq_msg_data(&part[i + 2]), len);
            it->msg.len[i] = len;
            it->msg.n = i + 1;
        }
        if (it->msg.n != nf) {
            item_free(it);
            push_err(z, (int)src, MLM_ENOMEM);
            break;
        }
        queue_push(z, &z->q[src], it);
        break;
    }
    default: z->rejected++; break; // a kind from a newer minor version: ignored
    }
done:
    for (int i = 0; i < np; i++) zmq_msg_close(&part[i]);
    return 1;
}

// Waits up to wait_ms for inbound traffic, then files everything that arrived. 0 or MLM_EIO.
static int drain(zq_ctx_t *z, int wait_ms) {
    zmq_pollitem_t it = {z->in, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, wait_ms) < 0 && errno != EINTR) return MLM_EIO;
    while (take_one(z) > 0) {
    }
    return 0;
}

// The queue to serve a recv(peer) from, or NULL.
static zq_queue_t *pick(zq_ctx_t *z, int peer) {
    if (peer != COMM_ANY) return z->q[peer].head ? &z->q[peer] : NULL;
    zq_queue_t *best = z->anon.head ? &z->anon : NULL;
    for (int s = 0; s < z->size; s++)
        if (z->q[s].head && (!best || z->q[s].head->stamp < best->head->stamp)) best = &z->q[s];
    return best;
}

static int deliver(zq_queue_t *q, comm_msg_t *out, int *from) {
    zq_item_t *it = queue_pop(q);
    int err = it->err;
    *from = it->src;
    if (!err) {
        *out = it->msg;
        memset(&it->msg, 0, sizeof it->msg);
    }
    item_free(it);
    return err;
}

static bool any_lost(const zq_ctx_t *z) {
    for (int s = 0; s < z->size; s++)
        if (s != z->rank && z->lost[s]) return true;
    return false;
}

static bool gone(zq_ctx_t *z, int peer) {
    if (z->o.fail_on_any_loss && any_lost(z)) return true;
    if (peer != COMM_ANY) return z->lost[peer];
    for (int s = 0; s < z->size; s++)
        if (s != z->rank && !z->lost[s]) return false;
    return true;
}

// Probes peer (or every live peer) if its probe is due; an unroutable peer is marked lost.
static void probe(zq_ctx_t *z, int peer) {
    int64_t t = mlm_now_us();
    for (int s = 0; s < z->size; s++) {
        if (s == z->rank || z->lost[s] || (peer != COMM_ANY && s != peer) || t < z->next_probe[s]) continue;
        z->next_probe[s] = t + (int64_t)z->o.probe_ivl_ms * 1000;
        if (send_parts(z, s, COMM_ZMQ_PROBE, NULL, 0) == EHOSTUNREACH) z->lost[s] = true;
    }
}

static int setopt_int(void *sock, int opt, int v) { return zmq_setsockopt(sock, opt, &v, sizeof v); }

// An ipc endpoint of a world with a session gets the session in its path: a world made for a new
// plan then never meets the previous world's socket at the same path (still bound there until its
// owner takes the new plan, or closing: a connection that reached it and died with it left the new
// world's handshake, or its first sends, with no route to that rank). TCP ports stay as given.
static int with_session(char *ep, uint16_t session) {
    if (!session || strncmp(ep, "ipc://", 6) != 0) return 0;
    size_t k = strlen(ep);
    if (k + 7 >= ZQ_EP_MAX) return MLM_EINVAL;
    snprintf(ep + k, ZQ_EP_MAX - k, ".s%04x", (unsigned)session);
    return 0;
}

// Splits "bind=A;connect=B" (either part optional) or a plain endpoint into bind and connect.
static int split_endpoint(const char *s, char *bind, char *conn) {
    if (!s || !*s || strlen(s) >= ZQ_EP_MAX) return MLM_EINVAL;
    if (strncmp(s, "bind=", 5) != 0 && strncmp(s, "connect=", 8) != 0) {
        strcpy(bind, s);
        strcpy(conn, s);
        return 0;
    }
    bind[0] = conn[0] = 0;
    char tmp[ZQ_EP_MAX];
    strcpy(tmp, s);
    char *save = NULL;
    for (char *tok = strtok_r(tmp, ";", &save); tok; tok = strtok_r(NULL, ";", &save)) {
        if (strncmp(tok, "bind=", 5) == 0) strcpy(bind, tok + 5);
        else if (strncmp(tok, "connect=", 8) == 0) strcpy(conn, tok + 8);
        else return MLM_EINVAL;
    }
    if (!bind[0]) strcpy(bind, conn);
    if (!conn[0]) strcpy(conn, bind);
    return bind[0] ? 0 : MLM_EINVAL;
}

// split_endpoint, with the world's session in ipc paths.
static int parse_endpoint(const zq_ctx_t *z, const char *s, char *bind, char *conn) {
    int rc = split_endpoint(s, bind, conn);
    if (rc == 0) rc = with_session(bind, z->o.session);
    if (rc == 0) rc = with_session(conn, z->o.session);
    return rc;
}

// --- backend

static const char *zq_name(void *ctx) { return "zmq"; }
static int zq_rank(void *ctx) { return ((zq_ctx_t *)ctx)->rank; }
static int zq_size(void *ctx) { return ((zq_ctx_t *)ctx)->size; }

static int zq_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    zq_ctx_t *z = ctx;
    if (z->lost[peer] || (z->o.fail_on_any_loss && any_lost(z))) return MLM_EPEER;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += frames[i].len;
    if (total > z->o.max_msg_bytes) return MLM_ERANGE;
    const int64_t dl = mlm_deadline(timeout_ms);
    for (;;) {
        int e = send_parts(z, peer, COMM_ZMQ_DATA, frames, n);
        if (e == 0) return 0;
        if (e == EHOSTUNREACH) {
            z->lost[peer] = true;
            return MLM_EPEER;
        }
        if (e != EAGAIN && e != EINTR) return MLM_EPEER;
        int left = mlm_left_ms(dl);
        if (left == 0) return MLM_ETIMEOUT;
        if (drain(z, left < 0 || left > 2 ? 2 : left) != 0) return MLM_EIO; // keep our inbox moving meanwhile
    }
}

static int zq_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    zq_ctx_t *z = ctx;
    const int64_t dl = mlm_deadline(timeout_ms);
    *from = -1;
    for (;;) {
        if (drain(z, 0) != 0) return MLM_EIO;
        zq_queue_t *q = pick(z, peer);
        if (q) return deliver(q, out, from);
        int left = mlm_left_ms(dl);
        if (gone(z, peer)) { // its last messages may still be on the way: a short grace
            if (drain(z, left < 0 || left > ZQ_GRACE_MS ? ZQ_GRACE_MS : left) != 0) return MLM_EIO;
            q = pick(z, peer);
            return q ? deliver(q, out, from) : MLM_EPEER;
        }
        if (left == 0) return MLM_ETIMEOUT;
        probe(z, z->o.fail_on_any_loss ? COMM_ANY : peer);
        if (gone(z, peer)) continue;
        int wait = z->o.probe_ivl_ms;
        if (left >= 0 && left < wait) wait = left;
        if (drain(z, wait) != 0) return MLM_EIO;
    }
}

// Stops watching the outbound socket's handshakes.
static void monitor_stop(zq_ctx_t *z) {
    if (!z->mon) return;
    zmq_socket_monitor(z->out, NULL, 0);
    zmq_close(z->mon);
    z->mon = NULL;
}

static void zq_free(zq_ctx_t *z) {
    if (!z) return;
    monitor_stop(z);
    // The inbound socket never sends, so it has nothing to linger for (and its connections stop taking
    // input once it closes: see zq_start on heartbeats).
    if (z->in) setopt_int(z->in, ZMQ_LINGER, 0);
    if (z->in) zmq_close(z->in);
    if (z->out) zmq_close(z->out);
    curve_zap_stop(&z->zap); // its socket closes: before the context ends
    if (z->zctx) zmq_ctx_term(z->zctx);
    if (z->q)
        for (int s = 0; s < z->size; s++) queue_clear(&z->q[s]);
    queue_clear(&z->anon);
    free(z->q);
    free(z->lost);
    free(z->left);
    free(z->hello);
    free(z->heard);
    free(z->next_probe);
    free(z->conn);
    free(z->refused_at);
    free(z->redial_at);
    free(z->shake_failed);
    free(z);
}

static void zq_destroy(void *ctx) {
    zq_ctx_t *z = ctx;
    if (!z) return;
    for (int s = 0; s < z->size; s++) // tell live peers we leave (best effort, after our data)
        if (s != z->rank && !z->lost[s]) send_parts(z, s, COMM_ZMQ_BYE, NULL, 0);
    zq_free(z);
}

static const struct comm_backend_i zmq_iface = {
    .name = zq_name,
    .rank = zq_rank,
    .size = zq_size,
    .send = zq_send,
    .recv = zq_recv,
    .destroy = zq_destroy,
};

bool comm_zmq_peer_lost(const comm_t *c, int peer) {
    bool cut = false;
    c = comm_fault_inner(c, peer, &cut); // through a fault wrapper, which may have lost peer to a partition
    if (cut) return true;
    const zq_ctx_t *z = c ? comm_backend_ctx(c, &zmq_iface) : NULL;
    return z && peer >= 0 && peer < z->size && peer != z->rank && z->lost[peer] && !z->left[peer];
}

bool comm_zmq_poll_lost(comm_t *c, int peer) {
    zq_ctx_t *z = c ? comm_backend_ctx(c, &zmq_iface) : NULL;
    if (!z || (peer != COMM_ANY && (peer < 0 || peer >= z->size || peer == z->rank))) return false;
    if (drain(z, 0) != 0) return true;
    probe(z, z->o.fail_on_any_loss ? COMM_ANY : peer);
    return gone(z, peer);
}

// CurveZMQ on both sockets: the bound one is a CURVE server whose ZAP handler admits only the world's
// keys; the outbound one presents this rank's key (each connect then sets the peer's server key), and
// its handshake failures are watched until the hello phase ends. 0 or MLM_E* with err filled.
static int curve_setup(zq_ctx_t *z, char *err, size_t errlen) {
    const curve_keypair_t *k = z->o.curve;
    if (!curve_key_valid(k->pub) || !curve_key_valid(k->sec))
        return mlm_fail(err, errlen, MLM_EINVAL, "rank %d: its own CurveZMQ key pair is not valid", z->rank);
    if (!z->o.curve_keys) return mlm_fail(err, errlen, MLM_EINVAL, "CurveZMQ needs every rank's public key");
    curve_peers_t *peers = calloc(1, sizeof *peers); // the keys admitted: every rank's, each once
    if (!peers) return MLM_ENOMEM;
    int rc = 0;
    for (int p = 0; p < z->size && rc == 0; p++) {
        const char *key = z->o.curve_keys[p];
        if (!curve_key_valid(key)) {
            rc = mlm_fail(err, errlen, MLM_EINVAL, "rank %d has no CurveZMQ key (40 Z85 characters)", p);
            break;
        }
        bool seen = false;
        for (int i = 0; i < peers->n && !seen; i++) seen = !strcmp(peers->key[i], key);
        if (!seen && peers->n == CURVE_MAX_PEERS) rc = mlm_fail(err, errlen, MLM_EFULL, "over %d keys", CURVE_MAX_PEERS);
        else if (!seen) memcpy(peers->key[peers->n++], key, CURVE_KEY_LEN + 1);
    }
    if (rc == 0 && strcmp(z->o.curve_keys[z->rank], k->pub) != 0)
        rc = mlm_fail(err, errlen, MLM_EINVAL, "rank %d holds the CurveZMQ key %s, but the world lists %s for it",
                      z->rank, k->pub, z->o.curve_keys[z->rank]);
    char who[64];
    snprintf(who, sizeof who, "data plane rank %d", z->rank);
    if (rc == 0) rc = curve_zap_start(&z->zap, z->zctx, peers, who, err, errlen);
    free(peers);
    if (rc != 0) return rc;
    const int one = 1;
    if (zmq_setsockopt(z->in, ZMQ_CURVE_SERVER, &one, sizeof one) != 0 ||
        zmq_setsockopt(z->in, ZMQ_CURVE_SECRETKEY, k->sec, CURVE_KEY_LEN) != 0 ||
        zmq_setsockopt(z->in, ZMQ_ZAP_DOMAIN, "meshlm", 6) != 0 ||
        zmq_setsockopt(z->out, ZMQ_CURVE_PUBLICKEY, k->pub, CURVE_KEY_LEN) != 0 ||
        zmq_setsockopt(z->out, ZMQ_CURVE_SECRETKEY, k->sec, CURVE_KEY_LEN) != 0)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "CurveZMQ: %s", zmq_strerror(errno));
    const int ev = ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                   ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL;
    if (zmq_socket_monitor(z->out, ZQ_MON_EP, ev) != 0 || !(z->mon = zmq_socket(z->zctx, ZMQ_PAIR)) ||
        zmq_connect(z->mon, ZQ_MON_EP) != 0)
        return mlm_fail(err, errlen, MLM_EIO, "cannot watch the CurveZMQ handshakes: %s", zmq_strerror(errno));
    return 0;
}

// The rank this rank dials at endpoint ep (as a monitor event names it), or -1.
static int rank_at(const zq_ctx_t *z, const char *ep) {
    for (int p = 0; p < z->size; p++)
        if (p != z->rank && !strcmp(z->conn[p], ep)) return p;
    return -1;
}

// Dials peer p again (a refused CURVE connection is not retried by ZeroMQ itself).
static void redial(zq_ctx_t *z, int p) {
    uint8_t id[5];
    z->redial_at[p] = 0;
    zmq_disconnect(z->out, z->conn[p]);
    routing_id(id, 'p', p);
    zmq_setsockopt(z->out, ZMQ_CONNECT_ROUTING_ID, id, sizeof id);
    zmq_setsockopt(z->out, ZMQ_CURVE_SERVERKEY, z->o.curve_keys[p], CURVE_KEY_LEN);
    zmq_connect(z->out, z->conn[p]);
}

// Files the outbound socket's handshake failures and dials refusing peers again when due. MLM_EPROTO
// with err naming the peer once one has refused this rank's key for ZQ_REFUSE_GRACE_MS, else 0.
static int curve_events(zq_ctx_t *z, char *err, size_t errlen) {
    for (;;) {
        zmq_msg_t m[2];
        zmq_msg_init(&m[0]);
        zmq_msg_init(&m[1]);
        const bool got = zmq_msg_recv(&m[0], z->mon, ZMQ_DONTWAIT) >= 0 && zmq_msg_more(&m[0]) &&
                         zmq_msg_recv(&m[1], z->mon, 0) >= 0;
        if (!got || zmq_msg_size(&m[0]) < 6) {
            zmq_msg_close(&m[0]);
            zmq_msg_close(&m[1]);
            break;
        }
        const uint8_t *e = zmq_msg_data(&m[0]); // u16 event, u32 value (host order)
        uint16_t event;
        uint32_t value;
        memcpy(&event, e, 2);
        memcpy(&value, e + 2, 4);
        char ep[ZQ_EP_MAX];
        const size_t n = zmq_msg_size(&m[1]) < sizeof ep - 1 ? zmq_msg_size(&m[1]) : sizeof ep - 1;
        memcpy(ep, zmq_msg_data(&m[1]), n);
        ep[n] = 0;
        zmq_msg_close(&m[0]);
        zmq_msg_close(&m[1]);
        const int p = rank_at(z, ep);
        if (p < 0) continue;
        if (event != ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
            z->shake_failed[p]++;
            continue;
        }
        const int64_t now = mlm_now_us();
        if (!z->refused_at[p]) z->refused_at[p] = now;
        if (now - z->refused_at[p] >= (int64_t)ZQ_REFUSE_GRACE_MS * 1000)
            return mlm_fail(err, errlen, MLM_EPROTO,
                            "rank %d: rank %d at %s refused this rank's CurveZMQ key %s (status %u): it does not "
                            "admit that key",
                            z->rank, p, ep, z->o.curve->pub, (unsigned)value);
        z->redial_at[p] = now + (int64_t)ZQ_REDIAL_MS * 1000;
    }
    for (int p = 0; p < z->size; p++)
        if (z->redial_at[p] && mlm_now_us() >= z->redial_at[p]) redial(z, p);
    return 0;
}

// Appends to err (k bytes used) why the CURVE handshake did not complete: the peers whose handshake
// failed, and the last connection this rank refused.
static void curve_why(zq_ctx_t *z, char *err, size_t errlen, int k) {
    for (int p = 0; p < z->size && k > 0 && (size_t)k < errlen; p++)
        if (p != z->rank && !(z->hello[p] && z->heard[p]) && z->shake_failed[p])
            k += snprintf(err + k, errlen - (size_t)k, "; rank %d (%s) failed %d CurveZMQ handshakes (it holds another "
                          "key than the one listed)", p, z->conn[p], z->shake_failed[p]);
    char addr[256], key[CURVE_KEY_LEN + 1];
    curve_zap_last_refused(z->zap, addr, sizeof addr, key);
    if (addr[0] && k > 0 && (size_t)k < errlen)
        snprintf(err + k, errlen - (size_t)k, "; refused %d connection(s), the last from %s with key %s",
                 curve_zap_refused(z->zap), addr, key);
}

// Binds, connects and runs the hello phase. 0 or MLM_E* with err filled.
static int zq_start(zq_ctx_t *z, const char *const *endpoints, char *err, size_t errlen) {
    char bind[ZQ_EP_MAX], conn[ZQ_EP_MAX];
    const int hb = z->o.heartbeat_ivl_ms, hbt = z->o.heartbeat_timeout_ms;
    void *socks[2] = {z->in, z->out};
    for (int i = 0; i < 2; i++) setopt_int(socks[i], ZMQ_LINGER, z->o.linger_ms);
    // Heartbeats on the outbound connections only: a peer is found gone when a send or probe there fails
    // (its connection dropped, or timed out by these heartbeats). The inbound socket's connections have
    // no heartbeat timer: libzmq 4.3.4 aborts (stream_engine_base.cpp:331, out_event's !_io_error) when
    // one fires on a connection whose input stopped (its pipe detached while the socket closes, or full)
    // and whose peer then hung up, which a torn-down world hit in CI. The peers still answer our pings.
    if (hb > 0) {
        setopt_int(z->out, ZMQ_HEARTBEAT_IVL, hb);
        setopt_int(z->out, ZMQ_HEARTBEAT_TIMEOUT, hbt);
        setopt_int(z->out, ZMQ_HEARTBEAT_TTL, hbt);
    }
    setopt_int(z->in, ZMQ_RCVHWM, z->o.hwm);
    setopt_int(z->in, ZMQ_ROUTER_HANDOVER, 1); // a peer that reconnects replaces its old connection
    setopt_int(z->out, ZMQ_SNDHWM, z->o.hwm);
    setopt_int(z->out, ZMQ_ROUTER_MANDATORY, 1); // unroutable (peer gone) is an error, not a silent drop
    setopt_int(z->out, ZMQ_IMMEDIATE, 1);        // queue only on live connections
    setopt_int(z->out, ZMQ_RECONNECT_IVL, 20);
    setopt_int(z->out, ZMQ_RECONNECT_IVL_MAX, 500);
    uint8_t id[5];
    // The outbound id names the world too: a stale socket of an earlier world (a cut-off worker's,
    // reconnecting by itself) would otherwise take over this rank's connection at a peer's ROUTER
    // (ZMQ_ROUTER_HANDOVER), and that peer would hear only the stale world.
    id[0] = 'r';
    mlm_put16(id + 1, (uint16_t)z->rank);
    mlm_put16(id + 3, z->o.session);
    zmq_setsockopt(z->out, ZMQ_ROUTING_ID, id, sizeof id);
    // with ZMQ_IMMEDIATE the connecting ROUTER learns a peer's routing id from the peer's own
    // handshake, so the inbound socket announces the id its peers address it by
    routing_id(id, 'p', z->rank);
    zmq_setsockopt(z->in, ZMQ_ROUTING_ID, id, sizeof id);
    if (z->o.curve) {
        int rc = curve_setup(z, err, errlen);
        if (rc != 0) return rc;
    }

    if (parse_endpoint(z, endpoints[z->rank], bind, conn) != 0) {
        snprintf(err, errlen, "bad endpoint for rank %d: '%s'", z->rank, endpoints[z->rank] ? endpoints[z->rank] : "");
        return MLM_EINVAL;
    }
    if (zmq_bind(z->in, bind) != 0) {
        snprintf(err, errlen, "rank %d cannot bind %s: %s", z->rank, bind, zmq_strerror(errno));
        return MLM_EIO;
    }
    for (int p = 0; p < z->size; p++) {
        if (p == z->rank) continue;
        if (parse_endpoint(z, endpoints[p], bind, conn) != 0) {
            snprintf(err, errlen, "bad endpoint for rank %d: '%s'", p, endpoints[p] ? endpoints[p] : "");
            return MLM_EINVAL;
        }
        routing_id(id, 'p', p);
        zmq_setsockopt(z->out, ZMQ_CONNECT_ROUTING_ID, id, sizeof id);
        if (z->o.curve) zmq_setsockopt(z->out, ZMQ_CURVE_SERVERKEY, z->o.curve_keys[p], CURVE_KEY_LEN); // this connect's
        snprintf(z->conn[p], ZQ_EP_MAX, "%s", conn);
        if (zmq_connect(z->out, conn) != 0) {
            snprintf(err, errlen, "rank %d cannot connect to rank %d at %s: %s", z->rank, p, conn, zmq_strerror(errno));
            return MLM_EIO;
        }
    }

    // Every rank says HELLO to every peer, again every ZQ_HELLO_EVERY_MS until the peer's own HELLO
    // says it has ours: a HELLO can land on a socket that is going away (the previous world's, still
    // bound at the same endpoint while it lingers), so one send is not proof of delivery. A HELLO
    // of state 0 or 1 is answered at once (take_one), so both ends learn, without waiting for each
    // other's whole handshake, that the other has theirs.
    bool *said = calloc((size_t)z->size, sizeof *said); // a HELLO went out to the peer at least once
    if (!said) return MLM_ENOMEM;
    const int64_t dl = mlm_now_us() + (int64_t)z->o.connect_timeout_ms * 1000;
    int64_t refuse_at = -1, next_say = 0; // after a mismatch, keep saying hello briefly so the peer learns why
    int rc = 0;
    for (;;) {
        bool done = true, all_said = true;
        const bool say = mlm_now_us() >= next_say;
        if (say) next_say = mlm_now_us() + ZQ_HELLO_EVERY_MS * 1000;
        for (int p = 0; p < z->size; p++) {
            if (p == z->rank) continue;
            if (say && !(z->hello[p] && z->heard[p]) && send_hello(z, p, z->hello[p] ? 1 : 0) == 0)
                said[p] = true;
            done = done && z->hello[p] && z->heard[p];
            all_said = all_said && said[p];
        }
        if (z->proto_err[0] && refuse_at < 0) refuse_at = mlm_now_us() + (int64_t)ZQ_REFUSE_GRACE_MS * 1000;
        if (refuse_at >= 0 && (all_said || mlm_now_us() >= refuse_at || mlm_now_us() >= dl)) {
            snprintf(err, errlen, "handshake refused: %s", z->proto_err);
            rc = MLM_EPROTO;
            break;
        }
        if (done && refuse_at < 0) break;
        if (mlm_now_us() >= dl) {
            int k = snprintf(err, errlen, "rank %d: no handshake within %d ms with rank(s)", z->rank, z->o.connect_timeout_ms);
            for (int p = 0; p < z->size && k > 0 && (size_t)k < errlen; p++)
                if (p != z->rank && !(z->hello[p] && z->heard[p])) k += snprintf(err + k, errlen - (size_t)k, " %d", p);
            if (z->mon) curve_why(z, err, errlen, k);
            rc = MLM_ETIMEOUT;
            break;
        }
        if (drain(z, 10) != 0) {
            snprintf(err, errlen, "rank %d: zmq_poll failed: %s", z->rank, zmq_strerror(errno));
            rc = MLM_EIO;
            break;
        }
        if (z->mon && (rc = curve_events(z, err, errlen)) != 0) break;
    }
    free(said);
    monitor_stop(z); // the world is up (or failed): its handshakes are no longer watched
    return rc;
}

// --- public API

void comm_zmq_envelope(uint8_t *out, int kind, int src, uint32_t world, int nframes) {
    mlm_put32(out, COMM_ZMQ_MAGIC);
    out[4] = COMM_ZMQ_MAJOR;
    out[5] = COMM_ZMQ_MINOR;
    out[6] = (uint8_t)kind;
    out[7] = (uint8_t)nframes;
    mlm_put32(out + 8, (uint32_t)src);
    mlm_put32(out + 12, world);
}

void comm_zmq_opts_default(comm_zmq_opts_t *o) {
    memset(o, 0, sizeof *o); // every field not set below is off / 0
    o->max_msg_bytes = (size_t)256 << 20;
    o->connect_timeout_ms = 10000;
    o->probe_ivl_ms = 50;
    o->heartbeat_ivl_ms = 1000;
    o->heartbeat_timeout_ms = 5000;
    o->linger_ms = 1000;
    o->hwm = 10000;
}

int comm_zmq_new(comm_t **out, int rank, int size, const char *const *endpoints, const comm_zmq_opts_t *opts,
                 char *err, size_t errlen) {
    char dummy[8];
    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = 0;
    if (!out || !endpoints || size < 1 || rank < 0 || rank >= size) {
        snprintf(err, errlen, "bad arguments (rank %d, size %d)", rank, size);
        return MLM_EINVAL;
    }
    zq_ctx_t *z = calloc(1, sizeof *z);
    if (!z) return MLM_ENOMEM;
    z->rank = rank;
    z->size = size;
    comm_zmq_opts_default(&z->o);
    if (opts) {
        if (opts->max_msg_bytes) z->o.max_msg_bytes = opts->max_msg_bytes;
        if (opts->connect_timeout_ms >= 0) z->o.connect_timeout_ms = opts->connect_timeout_ms;
        if (opts->probe_ivl_ms > 0) z->o.probe_ivl_ms = opts->probe_ivl_ms;
        if (opts->heartbeat_ivl_ms >= 0) z->o.heartbeat_ivl_ms = opts->heartbeat_ivl_ms;
        if (opts->heartbeat_timeout_ms > 0) z->o.heartbeat_timeout_ms = opts->heartbeat_timeout_ms;
        if (opts->linger_ms >= 0) z->o.linger_ms = opts->linger_ms;
        if (opts->hwm >= 0) z->o.hwm = opts->hwm;
        z->o.fail_on_any_loss = opts->fail_on_any_loss;
        z->o.session = opts->session;
        z->o.curve = opts->curve;
        z->o.curve_keys = opts->curve_keys;
    }
    z->q = calloc((size_t)size, sizeof *z->q);
    z->lost = calloc((size_t)size, sizeof *z->lost);
    z->left = calloc((size_t)size, sizeof *z->left);
    z->hello = calloc((size_t)size, sizeof *z->hello);
    z->heard = calloc((size_t)size, sizeof *z->heard);
    z->next_probe = calloc((size_t)size, sizeof *z->next_probe);
    z->conn = calloc((size_t)size, sizeof *z->conn);
    z->refused_at = calloc((size_t)size, sizeof *z->refused_at);
    z->redial_at = calloc((size_t)size, sizeof *z->redial_at);
    z->shake_failed = calloc((size_t)size, sizeof *z->shake_failed);
    z->zctx = zmq_ctx_new();
    if (z->zctx) {
        z->in = zmq_socket(z->zctx, ZMQ_ROUTER);
        z->out = zmq_socket(z->zctx, ZMQ_ROUTER);
    }
    if (!z->q || !z->lost || !z->hello || !z->heard || !z->next_probe || !z->conn || !z->refused_at || !z->redial_at ||
        !z->shake_failed || !z->in || !z->out) {
        snprintf(err, errlen, "out of memory or zmq sockets");
        zq_free(z);
        return MLM_ENOMEM;
    }
    int rc = zq_start(z, endpoints, err, errlen);
    z->o.curve = NULL; // borrowed for the call only
    z->o.curve_keys = NULL;
    if (rc != 0) { // let a HELLO already queued reach its peer, briefly
        setopt_int(z->in, ZMQ_LINGER, 0);
        setopt_int(z->out, ZMQ_LINGER, ZQ_REFUSE_GRACE_MS);
        zq_free(z);
        return rc;
    }
    comm_t *c = comm_new(&zmq_iface, z);
    if (!c) {
        zq_destroy(z);
        snprintf(err, errlen, "out of memory");
        return MLM_ENOMEM;
    }
    *out = c;
    return 0;
}

int comm_zmq_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen) {
    if (!o || !o->endpoints) return mlm_fail(err, errlen, MLM_EINVAL, "zmq: needs rank, size and endpoints");
    comm_zmq_opts_t zo;
    comm_zmq_opts_default(&zo);
    if (o->timeout_ms > 0) zo.connect_timeout_ms = o->timeout_ms;
    if (o->max_msg_bytes) zo.max_msg_bytes = o->max_msg_bytes;
    if (o->heartbeat_ivl_ms) zo.heartbeat_ivl_ms = o->heartbeat_ivl_ms < 0 ? 0 : o->heartbeat_ivl_ms;
    if (o->heartbeat_timeout_ms > 0) zo.heartbeat_timeout_ms = o->heartbeat_timeout_ms;
    zo.fail_on_any_loss = o->fail_on_any_loss;
    zo.session = o->session;
    zo.curve = o->curve ? &o->curve->self : NULL;
    zo.curve_keys = o->curve_keys;
    return comm_zmq_new(out, o->rank, o->size, o->endpoints, &zo, err, errlen);
}
