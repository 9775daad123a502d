// Public comm wrappers and the generic collectives (barrier, broadcast, gather, all-gather, all-reduce) built on send/recv.
#include "transport/comm.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/bytes.h"
#include "core/clock.h"
#include "core/err.h"
#include "worker/kernels/quant.h"

// --- types

// Collective message kinds (frame 0 of every collective message). Values are only appended.
enum {
    OP_BARRIER_UP = 1,
    OP_BARRIER_DOWN = 2,
    OP_BCAST = 3,
    OP_GATHER = 4,
    OP_ALLGATHER = 5,
    OP_STAR_UP = 6,
    OP_STAR_DOWN = 7,
    OP_RING_RS = 8,
    OP_RING_AG = 9,
    OP_PING = 10,
    OP_CALIB = 11,
    OP_ALLTOALLV = 12,
};

#define COLL_MAGIC 0x4b4d4c4du   // "MLMK" little-endian
#define COLL_HDR_BYTES 16        // magic u32, op u16, flags u16, seq u32, aux u32
#define PING_BW_BYTES (1u << 20) // bandwidth probe size
#define COMM_A2A_MAX 256         // ranks in one comm_alltoallv

struct comm {
    const struct comm_backend_i *iface; // backend table (static storage in the backend)
    void *ctx;                          // backend context (owned: iface->destroy)
    uint32_t seq;                       // collectives started so far (the same count on every rank)
    uint32_t *ping_seq;                 // (n_ping) comm_ping calls made with each peer
    int n_ping;                         // entries of ping_seq (a link comm's size may grow)
    comm_algo_t force_algo;             // STAR/RING forced for AUTO calls, AUTO = the rule
    bool compress;                      // default COMM_AR_Q8_0 for comm_allreduce_f32
    double lat_us;                      // link latency for the AUTO rule, microseconds
    double bw;                          // link bandwidth for the AUTO rule, bytes/s
    uint32_t range_seq;                 // range collectives started so far (the same count on every
                                        // rank of the range: a sequence of its own, see comm.h)
    comm_counters_t counters;           // messages and collectives so far (comm_get_counters)
};

// The ranks a collective runs over: [first, first + n), this rank being first + me.
typedef struct {
    int first, n, me;
} span_t;

// --- helpers

// Sends one collective message: header frame + payload frame.
static int coll_send(comm_t *c, int peer, int op, uint32_t seq, uint32_t aux, const void *payload, size_t len,
                     int64_t dl) {
    uint8_t hdr[COLL_HDR_BYTES];
    mlm_put32(hdr, COLL_MAGIC);
    mlm_put16(hdr + 4, (uint16_t)op);
    mlm_put16(hdr + 6, 0);
    mlm_put32(hdr + 8, seq);
    mlm_put32(hdr + 12, aux);
    comm_iov_t f[2] = {{hdr, sizeof hdr}, {payload, len}};
    c->counters.msgs_sent++;
    c->counters.bytes_sent += sizeof hdr + len;
    return c->iface->send(c->ctx, peer, f, 2, mlm_left_ms(dl));
}

// Receives the collective message (op, seq, aux) of exactly len payload bytes from peer into *m
// (payload = m->data[1], caller frees with comm_msg_free). Stale messages from earlier, failed
// collectives are dropped; anything else unexpected is MLM_EPROTO.
static int coll_recv(comm_t *c, int peer, int op, uint32_t seq, uint32_t aux, size_t len, comm_msg_t *m,
                     int64_t dl) {
    for (;;) {
        memset(m, 0, sizeof *m);
        int from = -1;
        int rc = c->iface->recv(c->ctx, peer, m, &from, mlm_left_ms(dl));
        if (rc != 0) return rc;
        if (m->n != 2 || m->len[0] != COLL_HDR_BYTES || mlm_get32(m->data[0]) != COLL_MAGIC) {
            comm_msg_free(m);
            return MLM_EPROTO;
        }
        const uint8_t *h = m->data[0];
        uint32_t hseq = mlm_get32(h + 8);
        if ((int32_t)(hseq - seq) < 0) { // left over from a collective that failed here
            comm_msg_free(m);
            continue;
        }
        if (hseq != seq || mlm_get16(h + 4) != op || mlm_get32(h + 12) != aux || m->len[1] != len) {
            comm_msg_free(m);
            return MLM_EPROTO;
        }
        return 0;
    }
}

// Receives into dst (len bytes).
static int coll_recv_into(comm_t *c, int peer, int op, uint32_t seq, uint32_t aux, void *dst, size_t len,
                          int64_t dl) {
    comm_msg_t m;
    int rc = coll_recv(c, peer, op, seq, aux, len, &m, dl);
    if (rc != 0) return rc;
    if (len) memcpy(dst, m.data[1], len);
    comm_msg_free(&m);
    return 0;
}

static void add_f32(float *acc, const float *x, size_t n) { // acc, x: (n)
    for (size_t i = 0; i < n; i++) acc[i] = acc[i] + x[i];
}

// Q8_0 bytes for n floats (the last block zero-padded).
static size_t q8_bytes(size_t n) { return (n + QK8_0 - 1) / QK8_0 * sizeof(block_q8_0); }

static void q8_pack(const float *x, size_t n, block_q8_0 *dst) { // x: (n), dst: (ceil(n/32))
    size_t full = n / QK8_0 * QK8_0;
    if (full) quant_quantize_ref(QT_Q8_0, x, dst, (int64_t)full);
    if (full < n) {
        float tail[QK8_0] = {0};
        memcpy(tail, x + full, (n - full) * sizeof(float));
        quant_quantize_ref(QT_Q8_0, tail, dst + full / QK8_0, QK8_0);
    }
}

static void q8_unpack(const block_q8_0 *src, size_t n, float *dst) { // src: (ceil(n/32)), dst: (n)
    size_t full = n / QK8_0 * QK8_0;
    if (full) quant_dequantize_ref(QT_Q8_0, src, dst, (int64_t)full);
    if (full < n) {
        float tail[QK8_0];
        quant_dequantize_ref(QT_Q8_0, src + full / QK8_0, tail, QK8_0);
        memcpy(dst + full, tail, (n - full) * sizeof(float));
    }
}

// --- all-reduce algorithms

// Star: gather to the span's first rank, fold in rank order, broadcast.
static int ar_star(comm_t *c, span_t sp, float *buf, size_t n, bool q8, uint32_t seq, int64_t dl) {
    const int N = sp.n, r = sp.me, root = sp.first;
    const size_t bytes = q8 ? q8_bytes(n) : n * sizeof(float);
    int rc = 0;
    block_q8_0 *q = NULL;       // (ceil(n/32)) quantized contribution or result
    float *tmp = NULL;          // (n) dequantized contribution
    if (q8) {
        q = malloc(bytes ? bytes : 1);
        tmp = malloc(n * sizeof(float));
        if (!q || !tmp) {
            rc = MLM_ENOMEM;
            goto out;
        }
    }
    if (r != 0) {
        if (q8) q8_pack(buf, n, q);
        rc = coll_send(c, root, OP_STAR_UP, seq, 0, q8 ? (const void *)q : buf, bytes, dl);
        if (rc == 0) rc = coll_recv_into(c, root, OP_STAR_DOWN, seq, 0, q8 ? (void *)q : buf, bytes, dl);
        if (rc == 0 && q8) q8_unpack(q, n, buf);
        goto out;
    }
    for (int p = 1; p < N && rc == 0; p++) {
        comm_msg_t m;
        rc = coll_recv(c, sp.first + p, OP_STAR_UP, seq, 0, bytes, &m, dl);
        if (rc != 0) break;
        if (q8) {
            q8_unpack(m.data[1], n, tmp);
            add_f32(buf, tmp, n);
        } else {
            add_f32(buf, m.data[1], n);
        }
        comm_msg_free(&m);
    }
    if (rc != 0) goto out;
    if (q8) {
        q8_pack(buf, n, q);
        q8_unpack(q, n, buf); // the root keeps what everyone else receives
    }
    for (int p = 1; p < N && rc == 0; p++)
        rc = coll_send(c, sp.first + p, OP_STAR_DOWN, seq, 0, q8 ? (const void *)q : buf, bytes, dl);
out:
    free(q);
    free(tmp);
    return rc;
}

// Element range of ring chunk k: [*lo, *hi). With q8 chunks are whole Q8_0 blocks.
static void ring_chunk(size_t n, int N, int k, bool q8, size_t *lo, size_t *hi) {
    if (!q8) {
        *lo = n * (size_t)k / (size_t)N;
        *hi = n * (size_t)(k + 1) / (size_t)N;
        return;
    }
    size_t nb = (n + QK8_0 - 1) / QK8_0;
    *lo = nb * (size_t)k / (size_t)N * QK8_0;
    *hi = nb * (size_t)(k + 1) / (size_t)N * QK8_0;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

// Ring: reduce-scatter then all-gather on 0 -> 1 -> ... -> N-1 -> 0 (ranks of the span). Chunk k
// starts at rank k and is completed at rank k-1, so it is folded in the order k, k+1, ..., k-1.
static int ar_ring(comm_t *c, span_t sp, float *buf, size_t n, bool q8, uint32_t seq, int64_t dl) {
    const int N = sp.n, r = sp.me;
    const int next = (r + 1) % N, prev = (r + N - 1) % N;
    const int to = sp.first + next, from = sp.first + prev;
    int rc = 0;
    block_q8_0 *qall = NULL; // (ceil(n/32)) quantized chunks (all-gather phase), indexed like buf
    block_q8_0 *qtmp = NULL; // (ceil(n/32)) one quantized outgoing chunk
    float *tmp = NULL;       // (n) one dequantized incoming chunk
    if (q8) {
        size_t qb = q8_bytes(n);
        qall = malloc(qb ? qb : 1);
        qtmp = malloc(qb ? qb : 1);
        tmp = malloc(n * sizeof(float));
        if (!qall || !qtmp || !tmp) {
            rc = MLM_ENOMEM;
            goto out;
        }
    }
    for (int s = 0; s < N - 1 && rc == 0; s++) { // reduce-scatter
        int ks = (r - s + 2 * N) % N, kr = (r - s - 1 + 2 * N) % N;
        size_t slo, shi, rlo, rhi;
        ring_chunk(n, N, ks, q8, &slo, &shi);
        ring_chunk(n, N, kr, q8, &rlo, &rhi);
        if (q8) {
            q8_pack(buf + slo, shi - slo, qtmp);
            rc = coll_send(c, to, OP_RING_RS, seq, (uint32_t)s, qtmp, q8_bytes(shi - slo), dl);
        } else {
            rc = coll_send(c, to, OP_RING_RS, seq, (uint32_t)s, buf + slo, (shi - slo) * sizeof(float), dl);
        }
        if (rc != 0) break;
        comm_msg_t m;
        size_t want = q8 ? q8_bytes(rhi - rlo) : (rhi - rlo) * sizeof(float);
        rc = coll_recv(c, from, OP_RING_RS, seq, (uint32_t)s, want, &m, dl);
        if (rc != 0) break;
        if (q8) {
            q8_unpack(m.data[1], rhi - rlo, tmp);
            add_f32(buf + rlo, tmp, rhi - rlo);
        } else {
            add_f32(buf + rlo, m.data[1], rhi - rlo);
        }
        comm_msg_free(&m);
    }
    if (rc != 0) goto out;
    if (q8) { // the owner of a complete chunk keeps exactly what it sends
        size_t lo, hi;
        ring_chunk(n, N, next, true, &lo, &hi);
        q8_pack(buf + lo, hi - lo, qall + lo / QK8_0);
        q8_unpack(qall + lo / QK8_0, hi - lo, buf + lo);
    }
    for (int s = 0; s < N - 1 && rc == 0; s++) { // all-gather
        int ks = (r + 1 - s + 2 * N) % N, kr = (r - s + 2 * N) % N;
        size_t slo, shi, rlo, rhi;
        ring_chunk(n, N, ks, q8, &slo, &shi);
        ring_chunk(n, N, kr, q8, &rlo, &rhi);
        if (q8) {
            rc = coll_send(c, to, OP_RING_AG, seq, (uint32_t)s, qall + slo / QK8_0, q8_bytes(shi - slo), dl);
            if (rc == 0) rc = coll_recv_into(c, from, OP_RING_AG, seq, (uint32_t)s, qall + rlo / QK8_0, q8_bytes(rhi - rlo), dl);
            if (rc == 0) q8_unpack(qall + rlo / QK8_0, rhi - rlo, buf + rlo);
        } else {
            rc = coll_send(c, to, OP_RING_AG, seq, (uint32_t)s, buf + slo, (shi - slo) * sizeof(float), dl);
            if (rc == 0) rc = coll_recv_into(c, from, OP_RING_AG, seq, (uint32_t)s, buf + rlo, (rhi - rlo) * sizeof(float), dl);
        }
    }
out:
    free(qall);
    free(qtmp);
    free(tmp);
    return rc;
}

// --- public API

void comm_msg_free(comm_msg_t *m) {
    if (!m) return;
    for (int i = 0; i < m->n && i < COMM_MAX_FRAMES; i++) free(m->data[i]);
    memset(m, 0, sizeof *m);
}

comm_t *comm_new(const struct comm_backend_i *iface, void *ctx) {
    if (!iface || !iface->send || !iface->recv || !iface->rank || !iface->size) return NULL;
    comm_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->iface = iface;
    c->ctx = ctx;
    int n = iface->size(ctx);
    c->n_ping = n > 0 ? n : 1;
    c->ping_seq = calloc((size_t)c->n_ping, sizeof *c->ping_seq);
    if (!c->ping_seq) {
        free(c);
        return NULL;
    }
    c->lat_us = 100.0;
    c->bw = 125e6;
    const char *env = getenv("MESHLM_ALLREDUCE");
    if (env && strcasecmp(env, "star") == 0) c->force_algo = COMM_ALGO_STAR;
    if (env && strcasecmp(env, "ring") == 0) c->force_algo = COMM_ALGO_RING;
    return c;
}

void comm_destroy(comm_t **self_p) {
    if (!self_p || !*self_p) return;
    comm_t *c = *self_p;
    if (c->iface->destroy) c->iface->destroy(c->ctx);
    free(c->ping_seq);
    free(c);
    *self_p = NULL;
}

void *comm_backend_ctx(const comm_t *c, const struct comm_backend_i *iface) {
    return c && c->iface == iface ? c->ctx : NULL;
}

const char *comm_name(const comm_t *c) { return c->iface->name ? c->iface->name(c->ctx) : "comm"; }
int comm_rank(const comm_t *c) { return c->iface->rank(c->ctx); }
int comm_size(const comm_t *c) { return c->iface->size(c->ctx); }

int comm_send(comm_t *c, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    if (!c || peer < 0 || peer >= comm_size(c) || peer == comm_rank(c)) return MLM_EINVAL;
    if (n < 0 || n > COMM_MAX_FRAMES || (n > 0 && !frames)) return MLM_EINVAL;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        if (frames[i].len && !frames[i].ptr) return MLM_EINVAL;
        bytes += frames[i].len;
    }
    c->counters.msgs_sent++;
    c->counters.bytes_sent += bytes;
    return c->iface->send(c->ctx, peer, frames, n, timeout_ms);
}

int comm_send1(comm_t *c, int peer, const void *buf, size_t len, int timeout_ms) {
    comm_iov_t f = {buf, len};
    return comm_send(c, peer, &f, 1, timeout_ms);
}

int comm_recv(comm_t *c, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    if (!c || !out) return MLM_EINVAL;
    if (peer != COMM_ANY && (peer < 0 || peer >= comm_size(c) || peer == comm_rank(c))) return MLM_EINVAL;
    memset(out, 0, sizeof *out);
    int dummy;
    return c->iface->recv(c->ctx, peer, out, from ? from : &dummy, timeout_ms);
}

int comm_barrier(comm_t *c, int timeout_ms) {
    if (!c) return MLM_EINVAL;
    if (c->iface->barrier) return c->iface->barrier(c->ctx, timeout_ms);
    const int N = comm_size(c), r = comm_rank(c);
    const uint32_t seq = c->seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    int rc = 0;
    if (N == 1) return 0;
    if (r != 0) {
        rc = coll_send(c, 0, OP_BARRIER_UP, seq, 0, NULL, 0, dl);
        if (rc == 0) rc = coll_recv_into(c, 0, OP_BARRIER_DOWN, seq, 0, NULL, 0, dl);
        return rc;
    }
    for (int p = 1; p < N && rc == 0; p++) rc = coll_recv_into(c, p, OP_BARRIER_UP, seq, 0, NULL, 0, dl);
    for (int p = 1; p < N && rc == 0; p++) rc = coll_send(c, p, OP_BARRIER_DOWN, seq, 0, NULL, 0, dl);
    return rc;
}

int comm_broadcast(comm_t *c, int root, void *buf, size_t len, int timeout_ms) {
    if (!c || root < 0 || root >= comm_size(c) || (len && !buf)) return MLM_EINVAL;
    const int N = comm_size(c), r = comm_rank(c);
    const uint32_t seq = c->seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    if (r != root) return coll_recv_into(c, root, OP_BCAST, seq, 0, buf, len, dl);
    int rc = 0;
    for (int p = 0; p < N && rc == 0; p++)
        if (p != root) rc = coll_send(c, p, OP_BCAST, seq, 0, buf, len, dl);
    return rc;
}

int comm_gather(comm_t *c, int root, const void *in, size_t len, void *out, int timeout_ms) {
    if (!c || root < 0 || root >= comm_size(c) || (len && !in)) return MLM_EINVAL;
    const int N = comm_size(c), r = comm_rank(c);
    if (r == root && len && !out) return MLM_EINVAL;
    const uint32_t seq = c->seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    if (r != root) return coll_send(c, root, OP_GATHER, seq, 0, in, len, dl);
    int rc = 0;
    if (len) memmove((uint8_t *)out + (size_t)r * len, in, len);
    for (int p = 0; p < N && rc == 0; p++)
        if (p != root) rc = coll_recv_into(c, p, OP_GATHER, seq, 0, (uint8_t *)out + (size_t)p * len, len, dl);
    return rc;
}

int comm_allgather(comm_t *c, const void *in, size_t len, void *out, int timeout_ms) {
    if (!c || (len && (!in || !out))) return MLM_EINVAL;
    const int N = comm_size(c), r = comm_rank(c);
    const uint32_t seq = c->seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    uint8_t *o = out;
    if (len) memmove(o + (size_t)r * len, in, len);
    int rc = 0;
    for (int s = 0; s < N - 1 && rc == 0; s++) {
        int ks = (r - s + 2 * N) % N, kr = (r - s - 1 + 2 * N) % N;
        rc = coll_send(c, (r + 1) % N, OP_ALLGATHER, seq, (uint32_t)s, o + (size_t)ks * len, len, dl);
        if (rc == 0) rc = coll_recv_into(c, (r + N - 1) % N, OP_ALLGATHER, seq, (uint32_t)s, o + (size_t)kr * len, len, dl);
    }
    return rc;
}

comm_algo_t comm_choose_algo(const comm_t *c, size_t bytes) { return comm_choose_algo_n(c, comm_size(c), bytes); }

comm_algo_t comm_choose_algo_n(const comm_t *c, int n_ranks, size_t bytes) {
    if (c->force_algo != COMM_ALGO_AUTO) return c->force_algo;
    const double N = n_ranks;
    if (N <= 1) return COMM_ALGO_STAR;
    const double L = c->lat_us * 1e-6, B = c->bw > 0 ? c->bw : 1.0, b = (double)bytes;
    double star = 2 * L + 2 * (N - 1) * b / B;
    double ring = 2 * (N - 1) * (L + b / (N * B));
    return star <= ring ? COMM_ALGO_STAR : COMM_ALGO_RING;
}

void comm_set_algo(comm_t *c, comm_algo_t algo) { c->force_algo = algo; }
void comm_set_compress(comm_t *c, bool q8_0) { c->compress = q8_0; }

void comm_set_link(comm_t *c, double lat_us, double bw_bytes_per_s) {
    if (lat_us >= 0) c->lat_us = lat_us;
    if (bw_bytes_per_s > 0) c->bw = bw_bytes_per_s;
}

const char *comm_algo_name(comm_algo_t algo) {
    switch (algo) {
    case COMM_ALGO_AUTO: return "auto";
    case COMM_ALGO_STAR: return "star";
    case COMM_ALGO_RING: return "ring";
    default: return "?";
    }
}

int comm_allreduce_ex(comm_t *c, float *buf, size_t n, const comm_allreduce_opts_t *opts, int timeout_ms) {
    if (!c || (n && !buf)) return MLM_EINVAL;
    comm_algo_t algo = opts ? opts->algo : COMM_ALGO_AUTO;
    const bool q8 = opts ? (opts->flags & COMM_AR_Q8_0) != 0 : c->compress;
    if (algo != COMM_ALGO_AUTO && algo != COMM_ALGO_STAR && algo != COMM_ALGO_RING) return MLM_EINVAL;
    if (n == 0 || comm_size(c) == 1) return 0;
    if (algo == COMM_ALGO_AUTO) algo = comm_choose_algo(c, q8 ? q8_bytes(n) : n * sizeof(float));
    c->counters.allreduces++;
    if (algo == COMM_ALGO_RING) c->counters.allreduces_ring++;
    if (c->iface->allreduce_f32 && !q8) return c->iface->allreduce_f32(c->ctx, buf, n, algo, timeout_ms);
    const uint32_t seq = c->seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    const span_t sp = {0, comm_size(c), comm_rank(c)};
    return algo == COMM_ALGO_RING ? ar_ring(c, sp, buf, n, q8, seq, dl) : ar_star(c, sp, buf, n, q8, seq, dl);
}

int comm_allreduce_range(comm_t *c, int first, int n_ranks, float *buf, size_t n, const comm_allreduce_opts_t *opts,
                         int timeout_ms) {
    if (!c || (n && !buf)) return MLM_EINVAL;
    const span_t sp = {first, n_ranks, comm_rank(c) - first};
    if (first < 0 || n_ranks < 1 || first + n_ranks > comm_size(c) || sp.me < 0 || sp.me >= n_ranks) return MLM_EINVAL;
    comm_algo_t algo = opts ? opts->algo : COMM_ALGO_AUTO;
    const bool q8 = opts ? (opts->flags & COMM_AR_Q8_0) != 0 : c->compress;
    if (algo != COMM_ALGO_AUTO && algo != COMM_ALGO_STAR && algo != COMM_ALGO_RING) return MLM_EINVAL;
    if (n == 0 || n_ranks == 1) return 0;
    if (algo == COMM_ALGO_AUTO) algo = comm_choose_algo_n(c, n_ranks, q8 ? q8_bytes(n) : n * sizeof(float));
    c->counters.allreduces++;
    if (algo == COMM_ALGO_RING) c->counters.allreduces_ring++;
    const uint32_t seq = c->range_seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    return algo == COMM_ALGO_RING ? ar_ring(c, sp, buf, n, q8, seq, dl) : ar_star(c, sp, buf, n, q8, seq, dl);
}

int comm_alltoallv(comm_t *c, int first, int n, const void *send, const size_t *send_lens, void *recv,
                   const size_t *recv_lens, int timeout_ms) {
    if (!c || !send_lens || !recv_lens) return MLM_EINVAL;
    const int me = comm_rank(c) - first;
    if (first < 0 || n < 1 || first + n > comm_size(c) || me < 0 || me >= n) return MLM_EINVAL;
    size_t s_off[COMM_A2A_MAX], r_off[COMM_A2A_MAX], s_tot = 0, r_tot = 0; // (n) block offsets in send / recv
    if (n > COMM_A2A_MAX) return MLM_EINVAL;
    for (int j = 0; j < n; j++) s_off[j] = s_tot, s_tot += send_lens[j], r_off[j] = r_tot, r_tot += recv_lens[j];
    if ((s_tot && !send) || (r_tot && !recv) || send_lens[me] != recv_lens[me]) return MLM_EINVAL;
    if (c->iface->alltoallv) return c->iface->alltoallv(c->ctx, first, n, send, send_lens, recv, recv_lens, timeout_ms);
    const uint8_t *s = send;
    uint8_t *r = recv;
    if (recv_lens[me]) memcpy(r + r_off[me], s + s_off[me], recv_lens[me]);
    if (n == 1) return 0;
    const uint32_t seq = c->range_seq++;
    const int64_t dl = mlm_deadline(timeout_ms);
    int rc = 0;
    for (int step = 1; step < n && rc == 0; step++) { // rotated, so no rank is everyone's first
        const int j = (me + step) % n;
        rc = coll_send(c, first + j, OP_ALLTOALLV, seq, 0, s + s_off[j], send_lens[j], dl);
    }
    for (int step = 1; step < n && rc == 0; step++) {
        const int j = (me - step + n) % n;
        rc = coll_recv_into(c, first + j, OP_ALLTOALLV, seq, 0, r + r_off[j], recv_lens[j], dl);
    }
    return rc;
}

void comm_get_counters(const comm_t *c, comm_counters_t *out) {
    if (c) *out = c->counters;
    else memset(out, 0, sizeof *out);
}

int comm_allreduce_f32(comm_t *c, float *buf, size_t n, comm_algo_t algo, int timeout_ms) {
    if (!c) return MLM_EINVAL;
    comm_allreduce_opts_t o = {algo, c->compress ? COMM_AR_Q8_0 : 0};
    return comm_allreduce_ex(c, buf, n, &o, timeout_ms);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int comm_ping(comm_t *c, int peer, int n, double *lat_us, double *bw_bytes_per_s, int timeout_ms) {
    if (!c || peer < 0 || peer >= comm_size(c) || peer == comm_rank(c) || n < 1 || n > 100000) return MLM_EINVAL;
    if (peer >= c->n_ping) { // the comm grew since comm_new (comm_link_set_rank)
        uint32_t *g = realloc(c->ping_seq, (size_t)(peer + 1) * sizeof *g);
        if (!g) return MLM_ENOMEM;
        memset(g + c->n_ping, 0, (size_t)(peer + 1 - c->n_ping) * sizeof *g);
        c->ping_seq = g;
        c->n_ping = peer + 1;
    }
    const int64_t dl = mlm_deadline(timeout_ms);
    const uint32_t seq = c->ping_seq[peer]++;
    const bool lead = comm_rank(c) < peer;
    uint8_t small[8] = {0};
    double res[2] = {0, 0}; // latency us, bandwidth bytes/s
    double *rtt = malloc((size_t)n * sizeof *rtt);
    uint8_t *big = calloc(1, PING_BW_BYTES);
    int rc = (!rtt || !big) ? MLM_ENOMEM : 0;
    for (int i = 0; i <= n && rc == 0; i++) { // round 0 warms up
        if (lead) {
            int64_t t0 = mlm_now_us();
            rc = coll_send(c, peer, OP_PING, seq, (uint32_t)i, small, sizeof small, dl);
            if (rc == 0) rc = coll_recv_into(c, peer, OP_PING, seq, (uint32_t)i, small, sizeof small, dl);
            if (i > 0) rtt[i - 1] = (double)(mlm_now_us() - t0);
        } else {
            rc = coll_recv_into(c, peer, OP_PING, seq, (uint32_t)i, small, sizeof small, dl);
            if (rc == 0) rc = coll_send(c, peer, OP_PING, seq, (uint32_t)i, small, sizeof small, dl);
        }
    }
    const uint32_t bw_tag = (uint32_t)n + 1, res_tag = (uint32_t)n + 2;
    if (rc == 0 && lead) {
        qsort(rtt, (size_t)n, sizeof *rtt, cmp_double);
        double med = rtt[n / 2];
        int64_t t0 = mlm_now_us();
        rc = coll_send(c, peer, OP_PING, seq, bw_tag, big, PING_BW_BYTES, dl);
        if (rc == 0) rc = coll_recv_into(c, peer, OP_PING, seq, bw_tag, small, sizeof small, dl);
        double t = (double)(mlm_now_us() - t0) - med; // one transfer without the ack's round trip
        res[0] = med / 2;
        res[1] = PING_BW_BYTES / ((t > 1 ? t : 1) * 1e-6);
        if (rc == 0) rc = coll_send(c, peer, OP_PING, seq, res_tag, res, sizeof res, dl);
    } else if (rc == 0) {
        rc = coll_recv_into(c, peer, OP_PING, seq, bw_tag, big, PING_BW_BYTES, dl);
        if (rc == 0) rc = coll_send(c, peer, OP_PING, seq, bw_tag, small, sizeof small, dl);
        if (rc == 0) rc = coll_recv_into(c, peer, OP_PING, seq, res_tag, res, sizeof res, dl);
    }
    free(rtt);
    free(big);
    if (rc == 0) {
        if (lat_us) *lat_us = res[0];
        if (bw_bytes_per_s) *bw_bytes_per_s = res[1];
    }
    return rc;
}

int comm_calibrate(comm_t *c, int timeout_ms) {
    if (!c) return MLM_EINVAL;
    const int N = comm_size(c), r = comm_rank(c);
    const int64_t dl = mlm_deadline(timeout_ms);
    double link[2] = {0, 0}; // worst latency us, worst bandwidth bytes/s
    int rc = 0;
    if (r == 0) {
        for (int p = 1; p < N && rc == 0; p++) {
            double lat = 0, bw = 0;
            rc = comm_ping(c, p, 8, &lat, &bw, mlm_left_ms(dl));
            if (rc == 0 && lat > link[0]) link[0] = lat;
            if (rc == 0 && (link[1] == 0 || bw < link[1])) link[1] = bw;
        }
    } else {
        rc = comm_ping(c, 0, 8, NULL, NULL, mlm_left_ms(dl));
    }
    const uint32_t seq = c->seq++;
    if (rc != 0) return rc;
    if (r == 0) {
        for (int p = 1; p < N && rc == 0; p++) rc = coll_send(c, p, OP_CALIB, seq, 0, link, sizeof link, dl);
    } else {
        rc = coll_recv_into(c, 0, OP_CALIB, seq, 0, link, sizeof link, dl);
    }
    if (rc == 0 && N > 1) comm_set_link(c, link[0], link[1]);
    return rc;
}
