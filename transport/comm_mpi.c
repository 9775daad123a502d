// MPI comm backend: one framed MPI message per comm message, MPI_Isend/MPI_Improbe/MPI_Imrecv polled against deadlines.
#include "transport/comm_mpi.h"

#include <limits.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/bytes.h"
#include "core/clock.h"
#include "core/err.h"

// --- types

#define HDR_FIXED 8                 // magic u32, major u8, minor u8, n u8, reserved u8
#define HDR_BYTES(n) (HDR_FIXED + 8 * (size_t)(n))
#define MAX_PENDING 4096            // outstanding requests before send waits

// A send (or an abandoned receive) MPI still owns; buf is freed when the request completes.
typedef struct {
    MPI_Request req;                // the request
    void *buf;                      // its buffer (owned; freed on completion)
    size_t bytes;                   // bytes of buf
} mpi_pending_t;

typedef struct {
    MPI_Comm comm;                  // private duplicate of MPI_COMM_WORLD
    int rank;                       // this rank in it
    int size;                       // ranks
    comm_mpi_opts_t o;              // limits and deadlines
    mpi_pending_t *pend;            // (cap_pend) requests not yet complete, oldest first
    int n_pend;                     // used entries of pend
    int cap_pend;                   // allocated entries of pend
    size_t pend_bytes;              // sum of pend[i].bytes
    bool has_stuck;                 // a matched message could not be received (no memory for it)
    MPI_Message stuck;              // that message, received and dropped by the next recv
    int stuck_count;                // its bytes
} mpi_ctx_t;

// --- helpers



// Backoff between polls: spin a little (low latency), then sleep up to 200 us so that ranks
// oversubscribing the cores leave them to the ranks that compute.
static void backoff(int *spins) {
    if (++*spins < 64) return;
    long ns = (long)(*spins - 63) * 10000L;
    if (ns > 200000L) ns = 200000L;
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

// Frees the buffers of completed requests, keeping the rest in order.
static void reap(mpi_ctx_t *x) {
    int k = 0;
    for (int i = 0; i < x->n_pend; i++) {
        int done = 0;
        if (MPI_Test(&x->pend[i].req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) done = 1; // failed: MPI let go of it
        if (done) {
            free(x->pend[i].buf);
            x->pend_bytes -= x->pend[i].bytes;
        } else {
            x->pend[k++] = x->pend[i];
        }
    }
    x->n_pend = k;
}

// Hands a request and its buffer to the pending list (MPI owns buf until the request completes).
static int park(mpi_ctx_t *x, MPI_Request req, void *buf, size_t bytes) {
    if (x->n_pend == x->cap_pend) {
        int cap = x->cap_pend ? x->cap_pend * 2 : 16;
        mpi_pending_t *p = realloc(x->pend, (size_t)cap * sizeof *p);
        if (!p) return MLM_ENOMEM;
        x->pend = p;
        x->cap_pend = cap;
    }
    x->pend[x->n_pend++] = (mpi_pending_t){req, buf, bytes};
    x->pend_bytes += bytes;
    return 0;
}

// Splits a received wire message (buf, count bytes; ownership passes here) into out's frames.
static int unpack(uint8_t *buf, size_t count, comm_msg_t *out) {
    if (count < HDR_FIXED || mlm_get32(buf) != COMM_MPI_MAGIC || buf[4] != COMM_MPI_MAJOR || buf[6] > COMM_MAX_FRAMES) {
        free(buf);
        return MLM_EPROTO;
    }
    const int n = buf[6];
    if (count < HDR_BYTES(n)) {
        free(buf);
        return MLM_EPROTO;
    }
    size_t len[COMM_MAX_FRAMES], sum = 0;
    for (int i = 0; i < n; i++) {
        uint64_t l = mlm_get64(buf + HDR_FIXED + 8 * (size_t)i);
        if (l > count - HDR_BYTES(n) - sum) {
            free(buf);
            return MLM_EPROTO;
        }
        len[i] = (size_t)l;
        sum += len[i];
    }
    if (sum != count - HDR_BYTES(n)) {
        free(buf);
        return MLM_EPROTO;
    }
    memset(out, 0, sizeof *out);
    const uint8_t *p = buf + HDR_BYTES(n);
    for (int i = 1; i < n; i++) { // frames 1.. get their own buffers; frame 0 reuses buf below
        p += len[i - 1];
        out->data[i] = malloc(len[i] ? len[i] : 1);
        if (!out->data[i]) {
            for (int k = 1; k < i; k++) free(out->data[k]);
            memset(out, 0, sizeof *out);
            free(buf);
            return MLM_ENOMEM;
        }
        if (len[i]) memcpy(out->data[i], p, len[i]);
        out->len[i] = len[i];
    }
    if (n > 0) {
        if (len[0]) memmove(buf, buf + HDR_BYTES(n), len[0]);
        out->data[0] = buf;
        out->len[0] = len[0];
    } else {
        free(buf);
    }
    out->n = n;
    return 0;
}

// --- backend

static const char *mpi_name(void *ctx) { return "mpi"; }
static int mpi_rank(void *ctx) { return ((mpi_ctx_t *)ctx)->rank; }
static int mpi_size(void *ctx) { return ((mpi_ctx_t *)ctx)->size; }

static int mpi_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    mpi_ctx_t *x = ctx;
    if (peer < 0 || peer >= x->size || n < 0 || n > COMM_MAX_FRAMES) return MLM_EINVAL;
    size_t sum = 0;
    for (int i = 0; i < n; i++) {
        if (frames[i].len > x->o.max_msg_bytes - sum) return MLM_ERANGE;
        sum += frames[i].len;
    }
    const size_t total = HDR_BYTES(n) + sum;
    if (total > (size_t)INT_MAX) return MLM_ERANGE;
    const int64_t dl = mlm_deadline(timeout_ms);
    int spins = 0;
    for (;;) { // wait while too much is still undelivered
        reap(x);
        if (x->n_pend == 0 || (x->n_pend < MAX_PENDING && x->pend_bytes + total <= x->o.max_pending_bytes)) break;
        if (mlm_passed(dl) || timeout_ms == 0) return MLM_ETIMEOUT;
        backoff(&spins);
    }
    uint8_t *buf = malloc(total);
    if (!buf) return MLM_ENOMEM;
    mlm_put32(buf, COMM_MPI_MAGIC);
    buf[4] = COMM_MPI_MAJOR;
    buf[5] = COMM_MPI_MINOR;
    buf[6] = (uint8_t)n;
    buf[7] = 0;
    size_t off = HDR_BYTES(n);
    for (int i = 0; i < n; i++) {
        mlm_put64(buf + HDR_FIXED + 8 * (size_t)i, frames[i].len);
        if (frames[i].len) memcpy(buf + off, frames[i].ptr, frames[i].len);
        off += frames[i].len;
    }
    MPI_Request req;
    if (MPI_Isend(buf, (int)total, MPI_BYTE, peer, COMM_MPI_TAG, x->comm, &req) != MPI_SUCCESS) {
        free(buf);
        return MLM_EPEER;
    }
    if (park(x, req, buf, total) != 0) { // cannot track it: wait for it here
        MPI_Wait(&req, MPI_STATUS_IGNORE);
        free(buf);
    }
    return 0;
}

static int mpi_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    mpi_ctx_t *x = ctx;
    if (peer != COMM_ANY && (peer < 0 || peer >= x->size)) return MLM_EINVAL;
    const int src = peer == COMM_ANY ? MPI_ANY_SOURCE : peer;
    const int64_t dl = mlm_deadline(timeout_ms);
    if (x->has_stuck) { // a matched message must be received before anything else
        void *sink = malloc(x->stuck_count ? (size_t)x->stuck_count : 1);
        if (!sink) return MLM_ENOMEM;
        MPI_Mrecv(sink, x->stuck_count, MPI_BYTE, &x->stuck, MPI_STATUS_IGNORE);
        free(sink);
        x->has_stuck = false;
    }
    MPI_Message mh;
    MPI_Status st;
    int flag = 0, spins = 0;
    for (;;) {
        if (x->n_pend) reap(x);
        if (MPI_Improbe(src, COMM_MPI_TAG, x->comm, &flag, &mh, &st) != MPI_SUCCESS) return MLM_EPEER;
        if (flag) break;
        if (mlm_passed(dl) || timeout_ms == 0) return MLM_ETIMEOUT;
        backoff(&spins);
    }
    int count = 0;
    if (MPI_Get_count(&st, MPI_BYTE, &count) != MPI_SUCCESS || count == MPI_UNDEFINED) count = -1;
    if (count < 0) count = 0; // MPI_BYTE always has a count
    // A message is received whole even when it is dropped: Open MPI may write all of a truncated
    // message into the buffer (seen with its shared-memory transport).
    uint8_t *buf = malloc(count ? (size_t)count : 1);
    if (!buf) {
        x->has_stuck = true;
        x->stuck = mh;
        x->stuck_count = count;
        *from = st.MPI_SOURCE;
        return MLM_ENOMEM;
    }
    if ((size_t)count > HDR_BYTES(COMM_MAX_FRAMES) + x->o.max_msg_bytes) { // too big to accept: dropped
        MPI_Mrecv(buf, count, MPI_BYTE, &mh, MPI_STATUS_IGNORE);
        free(buf);
        *from = st.MPI_SOURCE;
        return MLM_ERANGE;
    }
    MPI_Request req;
    if (MPI_Imrecv(buf, count, MPI_BYTE, &mh, &req) != MPI_SUCCESS) {
        free(buf);
        return MLM_EPEER;
    }
    for (spins = 0;;) {
        int done = 0;
        if (MPI_Test(&req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
            free(buf);
            return MLM_EPEER;
        }
        if (done) break;
        if (mlm_passed(dl)) { // matched but not delivered in time: MPI keeps writing into buf
            if (park(x, req, buf, 0) != 0) {
                MPI_Wait(&req, MPI_STATUS_IGNORE);
                free(buf);
            }
            return MLM_ETIMEOUT;
        }
        backoff(&spins);
    }
    int rc = unpack(buf, (size_t)count, out);
    *from = st.MPI_SOURCE;
    size_t sum = 0;
    for (int i = 0; rc == 0 && i < out->n; i++) sum += out->len[i];
    if (rc == 0 && sum > x->o.max_msg_bytes) { // within the header's slack but over the limit
        comm_msg_free(out);
        rc = MLM_ERANGE;
    }
    return rc;
}

static void mpi_destroy(void *ctx) {
    mpi_ctx_t *x = ctx;
    if (!x) return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
        const int64_t dl = mlm_deadline(x->o.linger_ms);
        int spins = 0;
        for (reap(x); x->n_pend && !mlm_passed(dl); reap(x)) backoff(&spins);
        for (int i = 0; i < x->n_pend; i++) MPI_Cancel(&x->pend[i].req);
        const int64_t dl2 = mlm_deadline(100);
        for (reap(x); x->n_pend && !mlm_passed(dl2); reap(x)) backoff(&spins);
        for (int i = 0; i < x->n_pend; i++) MPI_Request_free(&x->pend[i].req); // buffers leaked on purpose
        if (x->comm != MPI_COMM_NULL) MPI_Comm_free(&x->comm);
    }
    free(x->pend);
    free(x);
}

static const struct comm_backend_i mpi_iface = {
    .name = mpi_name,
    .rank = mpi_rank,
    .size = mpi_size,
    .send = mpi_send,
    .recv = mpi_recv,
    .destroy = mpi_destroy,
    // barrier and allreduce_f32 stay NULL: comm.c's generic ones are deterministic and have deadlines
};

// --- public API

void comm_mpi_opts_default(comm_mpi_opts_t *o) {
    o->max_msg_bytes = (size_t)256 << 20;
    o->max_pending_bytes = (size_t)512 << 20;
    o->connect_timeout_ms = 10000;
    o->linger_ms = 1000;
}

int comm_mpi_new(comm_t **out, char *err, size_t errlen) { return comm_mpi_new_opts(out, NULL, err, errlen); }

int comm_mpi_new_opts(comm_t **out, const comm_mpi_opts_t *opts, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    comm_mpi_opts_t o;
    if (opts) o = *opts;
    else comm_mpi_opts_default(&o);
    if (o.max_msg_bytes > (size_t)INT_MAX - HDR_BYTES(COMM_MAX_FRAMES)) o.max_msg_bytes = (size_t)INT_MAX - HDR_BYTES(COMM_MAX_FRAMES);
    int init = 0, fin = 0, level = MPI_THREAD_SINGLE;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (!init || fin) {
        snprintf(err, errlen, "MPI is not initialized (call MPI_Init_thread first)");
        return MLM_EINVAL;
    }
    MPI_Query_thread(&level);
    if (level < MPI_THREAD_FUNNELED) {
        snprintf(err, errlen, "MPI thread level %d is below MPI_THREAD_FUNNELED", level);
        return MLM_EINVAL;
    }
    mpi_ctx_t *x = calloc(1, sizeof *x);
    if (!x) return MLM_ENOMEM;
    x->o = o;
    x->comm = MPI_COMM_NULL;
    MPI_Request req;
    if (MPI_Comm_idup(MPI_COMM_WORLD, &x->comm, &req) != MPI_SUCCESS) {
        snprintf(err, errlen, "MPI_Comm_idup failed");
        free(x);
        return MLM_EPEER;
    }
    const int64_t dl = mlm_deadline(o.connect_timeout_ms);
    int done = 0, spins = 0;
    while (MPI_Test(&req, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && !done && !mlm_passed(dl)) backoff(&spins);
    if (!done) { // the communicator never formed: the request stays with MPI
        snprintf(err, errlen, "not every MPI rank joined within %d ms", o.connect_timeout_ms);
        free(x);
        return MLM_ETIMEOUT;
    }
    MPI_Comm_set_errhandler(x->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(x->comm, &x->rank);
    MPI_Comm_size(x->comm, &x->size);
    comm_t *c = comm_new(&mpi_iface, x);
    if (!c) {
        mpi_destroy(x);
        return MLM_ENOMEM;
    }
    *out = c;
    return 0;
}

int comm_mpi_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen) {
    comm_mpi_opts_t mo;
    comm_mpi_opts_default(&mo);
    if (o && o->timeout_ms > 0) mo.connect_timeout_ms = o->timeout_ms;
    if (o && o->max_msg_bytes) mo.max_msg_bytes = o->max_msg_bytes;
    return comm_mpi_new_opts(out, &mo, err, errlen);
}
