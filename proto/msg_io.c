// Protocol messages over a comm: encode + send, receive + decode with the default limits.
#include "proto/msg_io.h"

#include <string.h>

#include "core/err.h"

// --- public API

int msg_send(comm_t *c, int peer, const msg_t *m, int timeout_ms, char *err, size_t errlen) {
    msg_buf_t b;
    msg_limits_t lim = msg_limits_default();
    int rc = msg_encode(m, &lim, &b, err, errlen);
    if (rc == 0) {
        rc = comm_send(c, peer, b.iov, b.n, timeout_ms);
        if (rc != 0) mlm_fail(err, errlen, rc, "sending %s: %s", msg_type_name(m->type), mlm_strerror(rc));
    }
    msg_buf_free(&b);
    return rc;
}

int msg_recv(comm_t *c, int peer, msg_t *out, comm_msg_t *raw, int *from, int timeout_ms, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    memset(raw, 0, sizeof *raw);
    int rc = comm_recv(c, peer, raw, from, timeout_ms);
    if (rc != 0) return mlm_fail(err, errlen, rc, "receiving: %s", mlm_strerror(rc));
    msg_limits_t lim = msg_limits_default();
    rc = msg_decode(raw, &lim, out, err, errlen);
    if (rc != 0) comm_msg_free(raw);
    return rc;
}
