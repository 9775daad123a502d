// All-gather with per-rank sizes over point-to-point sends (used by the tensor-parallel forward pass).
#include "transport/gatherv.h"

#include <stdint.h>
#include <string.h>

#include "worker/clock.h"
#include "worker/err.h"

// --- helpers

static int left_ms(int64_t deadline) {
    int64_t l = deadline - (int64_t)mlm_now_ms();
    return l > 0 ? (int)l : 0;
}

// --- public API

int comm_allgatherv(comm_t *c, const void *in, size_t len, void *out, const size_t *lens, int timeout_ms) {
    const int n = comm_size(c), me = comm_rank(c);
    if (len != lens[me]) return MLM_EINVAL;
    const int64_t deadline = (int64_t)mlm_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    size_t off_me = 0;
    for (int r = 0; r < me; r++) off_me += lens[r];
    if (len) memcpy((uint8_t *)out + off_me, in, len);
    for (int step = 1; step < n; step++) { // send in a rotated order so no rank is everyone's first
        int peer = (me + step) % n;
        int rc = comm_send1(c, peer, in, len, left_ms(deadline));
        if (rc != 0) return rc;
    }
    size_t off = 0;
    for (int r = 0; r < n; r++) {
        if (r != me) {
            comm_msg_t m;
            int rc = comm_recv(c, r, &m, NULL, left_ms(deadline));
            if (rc != 0) return rc;
            if (m.n != 1 || m.len[0] != lens[r]) {
                comm_msg_free(&m);
                return MLM_EPROTO;
            }
            if (lens[r]) memcpy((uint8_t *)out + off, m.data[0], lens[r]);
            comm_msg_free(&m);
        }
        off += lens[r];
    }
    return 0;
}
