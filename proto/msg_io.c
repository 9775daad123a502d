// Protocol messages over a control link: encode + send, receive + decode with the default limits.
#include "proto/msg_io.h"

#include <stdio.h>
#include <string.h>

#include "core/err.h"

// --- public API

int msg_send_link(link_t *l, const msg_t *m, int timeout_ms, char *err, size_t errlen) {
    msg_buf_t b;
    msg_limits_t lim = msg_limits_default();
    int rc = msg_encode(m, &lim, &b, err, errlen);
    if (rc == 0) {
        rc = link_send(l, b.iov, b.n, timeout_ms);
        if (rc != 0) snprintf(err, errlen, "sending %s: %s", msg_type_name(m->type), mlm_strerror(rc));
    }
    msg_buf_free(&b);
    return rc;
}

int msg_recv_link(link_t *l, msg_t *out, comm_msg_t *raw, int timeout_ms, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    msg_limits_t lim = msg_limits_default();
    int rc = link_recv(l, raw, lim.max_header + 4 * lim.max_payload + 64, timeout_ms);
    if (rc != 0) {
        snprintf(err, errlen, "receiving: %s", mlm_strerror(rc));
        return rc;
    }
    rc = msg_decode(raw, &lim, out, err, errlen);
    if (rc != 0) comm_msg_free(raw);
    return rc;
}
