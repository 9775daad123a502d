// Control link (the old one-connection API) over the link comm backend: same wire, plus link_set_faults' one-message hold.
#include "transport/link.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <time.h>

#include "core/clock.h"
#include "core/err.h"
#include "transport/comm_link.h"

// --- types

struct link {
    comm_t *c;             // link comm (owned): listening side (peer 0) or one worker (peer 1)
    int peer;              // the peer's rank in c
    bool faults;           // link_set_faults in force: stamp sends, model receives
    fault_path_t path;     // model of the messages from the peer to this end
    bool has_held;         // held is a received message waiting to be due
    comm_msg_t held;       // (owned) frames of that message
    int64_t held_due;      // when it is due, CLOCK_MONOTONIC ns
};

// --- helpers

// The link comm's options for this API: no lingering on close, as before.
static void link_opts(comm_link_opts_t *o) {
    comm_link_opts_default(o);
    o->linger_ms = 0;
}

static int link_wrap(link_t **out, comm_t *c, int peer) {
    link_t *l = calloc(1, sizeof *l);
    if (!l) {
        comm_destroy(&c);
        return MLM_ENOMEM;
    }
    l->c = c;
    l->peer = peer;
    *out = l;
    return 0;
}

// Receives one message as it is on the wire, at most max_bytes of frames.
static int recv_raw(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms) {
    comm_link_set_max_bytes(l->c, max_bytes ? max_bytes : 1);
    int rc = comm_recv(l->c, l->peer, out, NULL, timeout_ms);
    if (rc == 0 && max_bytes == 0 && out->n > 0 && out->len[0] > 0) { // a limit of 0 admits empty frames only
        comm_msg_free(out);
        rc = MLM_ERANGE;
    }
    if (rc == 0 && out->n == 0) rc = MLM_EPROTO; // link messages have at least one frame
    return rc;
}

// link_recv under link_set_faults: one message is held at a time (the link is FIFO, so nothing
// behind it can be due earlier).
static int recv_faults(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms) {
    memset(out, 0, sizeof *out);
    const int64_t dl = mlm_deadline(timeout_ms); // us
    for (;;) {
        if (!l->has_held) {
            if (!l->faults) return recv_raw(l, out, max_bytes, mlm_left_ms(dl));
            comm_msg_t m;
            size_t cap = max_bytes > SIZE_MAX - FAULT_STAMP_BYTES ? max_bytes : max_bytes + FAULT_STAMP_BYTES;
            int rc = recv_raw(l, &m, cap, mlm_left_ms(dl));
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
        if (dl >= 0 && t >= dl * 1000) return MLM_ETIMEOUT;
        const int64_t wait = (dl >= 0 && dl * 1000 < l->held_due ? dl * 1000 : l->held_due) - t;
        struct timespec ts = {(time_t)(wait / 1000000000), (long)(wait % 1000000000)};
        nanosleep(&ts, NULL);
    }
}

// --- public API

int link_listen(link_t **out, const char *endpoint, char *err, size_t errlen) {
    *out = NULL;
    comm_link_opts_t o;
    link_opts(&o);
    comm_t *c = NULL;
    int rc = comm_link_listen(&c, endpoint, &o, err, errlen);
    return rc != 0 ? rc : link_wrap(out, c, 0);
}

int link_connect(link_t **out, const char *endpoint, char *err, size_t errlen) {
    *out = NULL;
    comm_link_opts_t o;
    link_opts(&o);
    comm_t *c = NULL;
    int rc = comm_link_connect(&c, &endpoint, 1, &o, err, errlen);
    return rc != 0 ? rc : link_wrap(out, c, 1);
}

int link_send(link_t *l, const comm_iov_t *frames, int n, int timeout_ms) {
    if (!l || n < 1 || n > COMM_MAX_FRAMES) return MLM_EINVAL;
    if (l->faults) return fault_send_stamped(l->c, l->peer, frames, n, timeout_ms);
    return comm_send(l->c, l->peer, frames, n, timeout_ms);
}

int link_recv(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms) {
    if (!l || !out) return MLM_EINVAL;
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
    comm_destroy(&l->c);
    comm_msg_free(&l->held);
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
