// Control link over ZeroMQ: ROUTER on the worker (replies go to the last sender), DEALER on the coordinator.
#include "transport/link.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "core/err.h"

// --- types

struct link {
    void *zctx;            // owned ZeroMQ context
    void *sock;            // ROUTER (listening) or DEALER (connecting)
    bool router;           // frames carry a peer identity first
    unsigned char peer[256]; // identity of the last sender (ROUTER side)
    size_t peer_len;       // 0 until someone spoke
    bool faults;           // link_set_faults in force: stamp sends, model receives
    fault_path_t path;     // model of the messages from the peer to this end
    bool has_held;         // held is a received message waiting to be due
    comm_msg_t held;       // (owned) frames of that message
    int64_t held_due;      // when it is due, CLOCK_MONOTONIC ns
};

// --- helpers

static int link_open(link_t **out, int type, const char *endpoint, bool bind, char *err, size_t errlen) {
    *out = NULL;
    link_t *l = calloc(1, sizeof *l);
    if (!l) return MLM_ENOMEM;
    l->router = type == ZMQ_ROUTER;
    l->zctx = zmq_ctx_new();
    l->sock = l->zctx ? zmq_socket(l->zctx, type) : NULL;
    if (!l->sock) {
        snprintf(err, errlen, "cannot create a ZeroMQ socket: %s", zmq_strerror(zmq_errno()));
        link_destroy(&l);
        return MLM_EIO;
    }
    int zero = 0, one = 1;
    zmq_setsockopt(l->sock, ZMQ_LINGER, &zero, sizeof zero);
    if (l->router) zmq_setsockopt(l->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    int rc = bind ? zmq_bind(l->sock, endpoint) : zmq_connect(l->sock, endpoint);
    if (rc != 0) {
        snprintf(err, errlen, "cannot %s %s: %s", bind ? "listen on" : "connect to", endpoint, zmq_strerror(zmq_errno()));
        link_destroy(&l);
        return MLM_EIO;
    }
    *out = l;
    return 0;
}

static int wait_for(void *sock, short events, int timeout_ms) {
    zmq_pollitem_t it = {sock, 0, events, 0};
    int n = zmq_poll(&it, 1, timeout_ms);
    if (n < 0) return MLM_EIO;
    return n == 0 ? MLM_ETIMEOUT : 0;
}

// Sends frames as they are (link_send without faults).
static int send_raw(link_t *l, const comm_iov_t *frames, int n, int timeout_ms) {
    if (l->router && l->peer_len == 0) return MLM_EPEER;
    int rc = wait_for(l->sock, ZMQ_POLLOUT, timeout_ms);
    if (rc != 0) return rc;
    if (l->router && zmq_send(l->sock, l->peer, l->peer_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return zmq_errno() == EHOSTUNREACH ? MLM_EPEER : MLM_ETIMEOUT;
    for (int i = 0; i < n; i++) {
        int flags = ZMQ_DONTWAIT | (i + 1 < n ? ZMQ_SNDMORE : 0);
        if (zmq_send(l->sock, frames[i].ptr, frames[i].len, flags) < 0)
            return zmq_errno() == EHOSTUNREACH ? MLM_EPEER : MLM_ETIMEOUT;
    }
    return 0;
}

// Receives one message as it is on the wire (link_recv without faults).
static int recv_raw(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms) {
    memset(out, 0, sizeof *out);
    int rc = wait_for(l->sock, ZMQ_POLLIN, timeout_ms);
    if (rc != 0) return rc;
    bool first = true, more = true, bad_count = false, too_big = false;
    size_t total = 0;
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, l->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&part);
            comm_msg_free(out);
            return MLM_EPROTO;
        }
        more = zmq_msg_more(&part);
        size_t len = zmq_msg_size(&part);
        if (l->router && first) {
            if (len <= sizeof l->peer) {
                memcpy(l->peer, zmq_msg_data(&part), len);
                l->peer_len = len;
            }
        } else if (out->n == COMM_MAX_FRAMES) {
            bad_count = true;
        } else if ((total += len) > max_bytes) {
            too_big = true;
        } else if (!bad_count && !too_big) {
            void *copy = malloc(len ? len : 1);
            if (copy) memcpy(copy, zmq_msg_data(&part), len);
            out->data[out->n] = copy;
            out->len[out->n] = len;
            out->n++;
        }
        first = false;
        zmq_msg_close(&part);
    }
    if (bad_count || too_big || out->n == 0) {
        comm_msg_free(out);
        return too_big ? MLM_ERANGE : MLM_EPROTO;
    }
    for (int i = 0; i < out->n; i++)
        if (!out->data[i]) {
            comm_msg_free(out);
            return MLM_ENOMEM;
        }
    return 0;
}

// Milliseconds left before dl (ns, rounded up), 0 once it passed, -1 without a deadline.
static int left_ms(int64_t dl) {
    if (dl < 0) return -1;
    int64_t r = dl - fault_now_ns();
    if (r <= 0) return 0;
    r = (r + 999999) / 1000000;
    return r > 0x7fffffff ? 0x7fffffff : (int)r;
}

// link_recv under link_set_faults: one message is held at a time (the link is FIFO, so nothing
// behind it can be due earlier).
static int recv_faults(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms) {
    memset(out, 0, sizeof *out);
    const int64_t dl = timeout_ms < 0 ? -1 : fault_now_ns() + (int64_t)timeout_ms * 1000000;
    for (;;) {
        if (!l->has_held) {
            if (!l->faults) return recv_raw(l, out, max_bytes, left_ms(dl));
            comm_msg_t m;
            size_t cap = max_bytes > SIZE_MAX - FAULT_STAMP_BYTES ? max_bytes : max_bytes + FAULT_STAMP_BYTES;
            int rc = recv_raw(l, &m, cap, left_ms(dl));
            if (rc != 0) return rc;
            int64_t stamp = -1;
            if (!fault_stamp_strip(&m, &stamp)) stamp = -1;
            size_t total = 0;
            for (int i = 0; i < m.n; i++) total += m.len[i];
            if (total > max_bytes) {
                comm_msg_free(&m);
                return MLM_ERANGE;
            }
            int64_t due = fault_path_admit(&l->path, stamp, total, fault_now_ns());
            if (due < 0) { // dropped
                comm_msg_free(&m);
                continue;
            }
            l->held = m;
            l->held_due = due;
            l->has_held = true;
        }
        const int64_t t = fault_now_ns();
        if (t >= l->held_due) {
            *out = l->held;
            memset(&l->held, 0, sizeof l->held);
            l->has_held = false;
            return 0;
        }
        if (dl >= 0 && t >= dl) return MLM_ETIMEOUT;
        const int64_t wait = (dl >= 0 && dl < l->held_due ? dl : l->held_due) - t;
        struct timespec ts = {(time_t)(wait / 1000000000), (long)(wait % 1000000000)};
        nanosleep(&ts, NULL);
    }
}

// --- public API

int link_listen(link_t **out, const char *endpoint, char *err, size_t errlen) {
    return link_open(out, ZMQ_ROUTER, endpoint, true, err, errlen);
}

int link_connect(link_t **out, const char *endpoint, char *err, size_t errlen) {
    return link_open(out, ZMQ_DEALER, endpoint, false, err, errlen);
}

int link_send(link_t *l, const comm_iov_t *frames, int n, int timeout_ms) {
    if (!l || n < 1 || n > COMM_MAX_FRAMES) return MLM_EINVAL;
    if (l->faults) {
        comm_iov_t wire[COMM_MAX_FRAMES];
        uint8_t stamp[FAULT_STAMP_BYTES];
        void *merged = NULL;
        int k = fault_stamp_frames(frames, n, wire, stamp, &merged);
        if (k < 0) return k;
        int rc = send_raw(l, wire, k, timeout_ms);
        free(merged);
        return rc;
    }
    return send_raw(l, frames, n, timeout_ms);
}

int link_recv(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms) {
    if (l->faults || l->has_held) return recv_faults(l, out, max_bytes, timeout_ms);
    return recv_raw(l, out, max_bytes, timeout_ms);
}

void link_set_faults(link_t *l, const fault_spec_t *spec, int my_rank, int peer_rank) {
    if (!l) return;
    l->faults = spec != NULL;
    if (spec) fault_path_init(&l->path, spec, peer_rank, my_rank);
}

void link_destroy(link_t **self_p) {
    if (!self_p || !*self_p) return;
    link_t *l = *self_p;
    if (l->sock) zmq_close(l->sock);
    comm_msg_free(&l->held);
    if (l->zctx) zmq_ctx_term(l->zctx);
    free(l);
    *self_p = NULL;
}

int link_data_endpoint(const char *control, char *out, size_t cap) {
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
