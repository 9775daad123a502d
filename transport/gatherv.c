// All-gather with per-rank sizes over point-to-point sends (used by the tensor-parallel forward pass).
#include "transport/gatherv.h"

#include <stdint.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"

// --- helpers

static int recv_block(comm_t *c, int peer, void *dst, size_t want, int timeout_ms) {
    comm_msg_t m;
    int rc = comm_recv(c, peer, &m, NULL, timeout_ms);
    if (rc != 0) return rc;
    if (m.n != 1 || m.len[0] != want) {
        comm_msg_free(&m);
        return MLM_EPROTO;
    }
    if (want) memcpy(dst, m.data[0], want);
    comm_msg_free(&m);
    return 0;
}

// --- public API

int comm_allgatherv(comm_t *c, const void *in, size_t len, void *out, const size_t *lens, int timeout_ms) {
    return comm_allgatherv_range(c, 0, comm_size(c), in, len, out, lens, timeout_ms);
}

int comm_allgatherv_range(comm_t *c, int first, int n, const void *in, size_t len, void *out, const size_t *lens,
                          int timeout_ms) {
    const int me = comm_rank(c) - first;
    if (me < 0 || me >= n || first < 0 || first + n > comm_size(c) || len != lens[me]) return MLM_EINVAL;
    const int64_t deadline = mlm_deadline(timeout_ms);
    size_t off_me = 0;
    for (int r = 0; r < me; r++) off_me += lens[r];
    if (len) memcpy((uint8_t *)out + off_me, in, len);
    for (int step = 1; step < n; step++) { // send in a rotated order so no rank is everyone's first
        int peer = first + (me + step) % n;
        int rc = comm_send1(c, peer, in, len, mlm_left_ms(deadline));
        if (rc != 0) return rc;
    }
    size_t off = 0;
    for (int r = 0; r < n; r++) {
        if (r != me) {
            int rc = recv_block(c, first + r, (uint8_t *)out + off, lens[r], mlm_left_ms(deadline));
            if (rc != 0) return rc;
        }
        off += lens[r];
    }
    return 0;
}

int comm_gatherv_root(comm_t *c, int root, int first, int n, const void *in, size_t len, void *out,
                      const size_t *lens, int timeout_ms) {
    const int rank = comm_rank(c);
    const int64_t deadline = mlm_deadline(timeout_ms);
    if (rank != root) return comm_send1(c, root, in, len, mlm_left_ms(deadline));
    size_t off = 0;
    for (int r = 0; r < n; r++) {
        int peer = first + r;
        if (peer == rank) {
            if (len != lens[r]) return MLM_EINVAL;
            if (len) memcpy((uint8_t *)out + off, in, len);
        } else {
            int rc = recv_block(c, peer, (uint8_t *)out + off, lens[r], mlm_left_ms(deadline));
            if (rc != 0) return rc;
        }
        off += lens[r];
    }
    return 0;
}
