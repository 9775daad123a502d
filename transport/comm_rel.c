// Reliable delivery over a lossy comm: sequence numbers, cumulative acknowledgements, RTT-timed retransmission, duplicate suppression.
#include "transport/comm_rel.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/bytes.h"
#include "core/err.h"
#include "core/rng.h"

// --- types

#define KIND_DATA 1
#define KIND_ACK 2
#define FLAG_MERGED 1               // the header is appended to the last frame
#define FLAG_GAP 2                  // the receiver holds messages past a missing one (ack names it)
#define SLICE_MS 10                 // a blocked call looks at other peers' traffic and timers this often
#define PUMP_MAX 4096               // messages taken from the inner comm per non-blocking pass
#define SEND_MS 100                 // deadline of a retransmission or an acknowledgement on the inner comm

static const uint8_t MAGIC[4] = {'M', 'L', 'R', 'L'};

// Header layout (little-endian), COMM_REL_HEADER_BYTES:
//   0 magic "MLRL" | 4 kind | 5 flags | 6 u16 zero | 8 u32 epoch | 12 u32 seq | 16 u32 base
//   | 20 u32 ack epoch (0 = none) | 24 u32 ack (next sequence number expected from the peer)
typedef struct {
    int kind, flags;
    uint32_t epoch, seq, base, ack_epoch, ack;
} hdr_t;

// A message sent and not yet acknowledged.
typedef struct out_item {
    struct out_item *next;
    uint32_t seq;
    int n;                          // caller's frames
    size_t len[COMM_MAX_FRAMES];    // their lengths
    uint8_t *buf;                   // (sum len + COMM_REL_HEADER_BYTES) the frames back to back, then the header
    size_t bytes;                   // sum len
    int64_t sent_ns;                // first sent
    int64_t last_ns;                // last copy sent
    int64_t due_ns;                 // next retransmission
    int tries;                      // copies sent
} out_item_t;

// A message received: ready for the caller, or held until the ones before it arrive.
typedef struct in_item {
    struct in_item *next;
    uint64_t order;                 // when it became ready (COMM_ANY picks the oldest)
    uint32_t seq;                   // held: its sequence number
    int err;                        // 0, or the inner comm's error for this message
    comm_msg_t msg;                 // frames (owned), header removed
} in_item_t;

typedef struct {
    // sending
    uint32_t next_seq;              // of the next new message
    out_item_t *out_head, *out_tail; // unacknowledged, in sequence order
    int n_out;
    size_t out_bytes;
    double srtt_ns, rttvar_ns;      // round-trip estimate (valid when have_rtt), reported
    double min_rtt_ns;              // the floor of the round trips (a low estimate that rises slowly
                                    // towards what is measured): the timeouts follow it
    bool have_rtt;
    int64_t rto_ns;                 // current timeout for new messages
    int64_t resent_ns;              // when a copy was last sent again (messages sent before it give no round trip)
    // receiving
    bool known;                     // the peer's epoch is known
    bool talked;                    // the peer has sent us headers (a plain message then means a restart)
    uint32_t peer_epoch;
    uint32_t expected;              // next sequence number to deliver
    in_item_t *held;                // early messages, sorted by seq
    int n_held;
    bool ack_due;                   // received something not yet acknowledged
    int64_t ack_ns;                 // when an acknowledgement last went to the peer
    in_item_t *rq_head, *rq_tail;   // ready for the caller, in order
} peer_t;

typedef struct {
    comm_t *inner;                  // wrapped comm (owned)
    pthread_mutex_t mu;             // held by every call and by the sender thread while it works
    pthread_cond_t cv;              // wakes the sender thread (new message, stop)
    pthread_t thread;
    bool has_thread, stop;
    comm_rel_opts_t o;              // with defaults filled in
    uint32_t epoch;                 // this wrapper's
    peer_t *peer;                   // (n_peer) grows with the inner comm (a link comm's size may grow)
    int n_peer;
    uint64_t order;                 // ready messages so far
    comm_rel_stats_t st;
    char name[48];                  // "<inner>+rel"
} rl_ctx_t;

// --- helpers

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void hdr_put(uint8_t *p, const hdr_t *h) {
    memcpy(p, MAGIC, 4);
    p[4] = (uint8_t)h->kind;
    p[5] = (uint8_t)h->flags;
    p[6] = p[7] = 0;
    mlm_put32(p + 8, h->epoch);
    mlm_put32(p + 12, h->seq);
    mlm_put32(p + 16, h->base);
    mlm_put32(p + 20, h->ack_epoch);
    mlm_put32(p + 24, h->ack);
}

static bool hdr_get(const uint8_t *p, hdr_t *h) {
    if (memcmp(p, MAGIC, 4) != 0 || (p[4] != KIND_DATA && p[4] != KIND_ACK)) return false;
    h->kind = p[4];
    h->flags = p[5];
    h->epoch = mlm_get32(p + 8);
    h->seq = mlm_get32(p + 12);
    h->base = mlm_get32(p + 16);
    h->ack_epoch = mlm_get32(p + 20);
    h->ack = mlm_get32(p + 24);
    return h->epoch != 0;
}

// Removes the header from m (its own last frame, or the tail of the last frame). true with *h.
static bool hdr_strip(comm_msg_t *m, hdr_t *h) {
    if (m->n < 1 || !m->data[m->n - 1]) return false;
    const int last = m->n - 1;
    const uint8_t *d = m->data[last];
    const size_t len = m->len[last];
    if (len == COMM_REL_HEADER_BYTES && hdr_get(d, h) && !(h->flags & FLAG_MERGED)) {
        free(m->data[last]);
        m->data[last] = NULL;
        m->len[last] = 0;
        m->n--;
        return true;
    }
    if (len > COMM_REL_HEADER_BYTES && hdr_get(d + len - COMM_REL_HEADER_BYTES, h) && (h->flags & FLAG_MERGED)) {
        m->len[last] = len - COMM_REL_HEADER_BYTES;
        return true;
    }
    return false;
}

static int grow(rl_ctx_t *r, int p) {
    if (p < r->n_peer) return 0;
    peer_t *np = realloc(r->peer, (size_t)(p + 1) * sizeof *np);
    if (!np) return MLM_ENOMEM;
    for (int i = r->n_peer; i <= p; i++) {
        memset(&np[i], 0, sizeof np[i]);
        np[i].rto_ns = (int64_t)r->o.rto_init_ms * 1000000;
    }
    r->peer = np;
    r->n_peer = p + 1;
    return 0;
}

static void in_free(in_item_t *it) {
    comm_msg_free(&it->msg);
    free(it);
}

static void out_free(out_item_t *it) {
    free(it->buf);
    free(it);
}

static void ready_push(rl_ctx_t *r, peer_t *pe, in_item_t *it) {
    it->order = r->order++;
    it->next = NULL;
    if (pe->rq_tail) pe->rq_tail->next = it;
    else pe->rq_head = it;
    pe->rq_tail = it;
}

static void drop_sending(peer_t *pe) {
    for (out_item_t *it = pe->out_head, *nx; it; it = nx) nx = it->next, out_free(it);
    pe->out_head = pe->out_tail = NULL;
    pe->n_out = 0;
    pe->out_bytes = 0;
}

static void drop_held(peer_t *pe) {
    for (in_item_t *it = pe->held, *nx; it; it = nx) nx = it->next, in_free(it);
    pe->held = NULL;
    pe->n_held = 0;
}

static void peer_clear(peer_t *pe) {
    drop_sending(pe);
    drop_held(pe);
    for (in_item_t *it = pe->rq_head, *nx; it; it = nx) nx = it->next, in_free(it);
    pe->rq_head = pe->rq_tail = NULL;
}

static int64_t clamp_rto(const rl_ctx_t *r, double ns) {
    const double lo = r->o.rto_min_ms * 1e6, hi = r->o.rto_max_ms * 1e6;
    return (int64_t)(ns < lo ? lo : ns > hi ? hi : ns);
}

// Frees what the peer acknowledges (everything before ack); a message sent once gives a round trip.
static void on_ack(rl_ctx_t *r, peer_t *pe, uint32_t ack) {
    const int64_t t = now_ns();
    while (pe->out_head && (int32_t)(ack - pe->out_head->seq) > 0) {
        out_item_t *it = pe->out_head;
        // Karn: only unambiguous samples, and none that waited behind a repaired loss
        if (it->tries == 1 && it->sent_ns > pe->resent_ns) {
            const double rtt = (double)(t - it->sent_ns);
            if (!pe->have_rtt) {
                pe->srtt_ns = pe->min_rtt_ns = rtt;
                pe->rttvar_ns = rtt / 2;
                pe->have_rtt = true;
            } else {
                const double d = pe->srtt_ns > rtt ? pe->srtt_ns - rtt : rtt - pe->srtt_ns;
                pe->rttvar_ns = 0.75 * pe->rttvar_ns + 0.25 * d;
                pe->srtt_ns = 0.875 * pe->srtt_ns + 0.125 * rtt;
                pe->min_rtt_ns = rtt < pe->min_rtt_ns ? rtt : pe->min_rtt_ns + (rtt - pe->min_rtt_ns) / 64;
            }
            // A round trip here includes the time the receiver spent elsewhere before it took the
            // message in (computing, waiting on another comm), so SRTT + 4 RTTVAR (RFC 6298) would
            // wait out the peer's compute after every loss. The floor is the network's round trip:
            // a timeout of four of them sends a message to a busy receiver again now and then (a
            // duplicate it discards) and repairs a loss to a waiting one at once.
            pe->rto_ns = clamp_rto(r, 4 * pe->min_rtt_ns);
        }
        pe->out_head = it->next;
        if (!pe->out_head) pe->out_tail = NULL;
        pe->n_out--;
        pe->out_bytes -= it->bytes;
        out_free(it);
        // new data acknowledged: the timer restarts for the oldest still outstanding
        if (pe->out_head && pe->out_head->due_ns < t + pe->rto_ns) pe->out_head->due_ns = t + pe->rto_ns;
    }
}

// How often a gap is reported again, and its message sent again at most: a round trip (the
// minimum timeout before one is measured), not less than the minimum timeout.
static int64_t gap_ns(const rl_ctx_t *r, const peer_t *pe) {
    const int64_t lo = (int64_t)r->o.rto_min_ms * 1000000;
    const int64_t rt = pe->have_rtt ? (int64_t)(pe->min_rtt_ns * 2) : 2 * lo;
    return rt > lo ? rt : lo;
}

// The header of a message to peer p now (the acknowledgement is refreshed at every copy).
static hdr_t hdr_for(const rl_ctx_t *r, const peer_t *pe, int kind, uint32_t seq) {
    hdr_t h = {.kind = kind, .epoch = r->epoch, .seq = seq};
    h.base = pe->out_head ? pe->out_head->seq : pe->next_seq;
    if (pe->known) h.ack_epoch = pe->peer_epoch, h.ack = pe->expected;
    if (pe->n_held > 0) h.flags |= FLAG_GAP;
    return h;
}

// Puts a copy of it on the wire to peer p.
static int send_item(rl_ctx_t *r, int p, out_item_t *it, int timeout_ms) {
    peer_t *pe = &r->peer[p];
    comm_iov_t iov[COMM_MAX_FRAMES];
    hdr_t h = hdr_for(r, pe, KIND_DATA, it->seq);
    if (it->n == COMM_MAX_FRAMES) h.flags |= FLAG_MERGED;
    hdr_put(it->buf + it->bytes, &h);
    size_t at = 0;
    for (int i = 0; i < it->n; i++) {
        iov[i] = (comm_iov_t){it->buf + at, it->len[i]};
        at += it->len[i];
    }
    int n = it->n;
    if (n == COMM_MAX_FRAMES) iov[n - 1].len += COMM_REL_HEADER_BYTES; // the header follows the last frame's bytes
    else iov[n++] = (comm_iov_t){it->buf + it->bytes, COMM_REL_HEADER_BYTES};
    int rc = comm_send(r->inner, p, iov, n, timeout_ms);
    if (rc == 0) pe->ack_due = false, pe->ack_ns = now_ns(); // it carried the acknowledgement
    it->last_ns = now_ns();
    return rc;
}

// Sends the oldest unacknowledged message again now (its timeout passed, or the peer reports a
// gap at it), with its timeout doubled.
static void resend_head(rl_ctx_t *r, int p) {
    peer_t *pe = &r->peer[p];
    out_item_t *it = pe->out_head;
    const int64_t t = now_ns();
    int64_t rto = pe->rto_ns;
    for (int k = 0; k < it->tries && rto < (int64_t)r->o.rto_max_ms * 1000000; k++) rto *= 2;
    it->due_ns = t + clamp_rto(r, (double)rto);
    it->tries++;
    pe->resent_ns = t;
    if (send_item(r, p, it, SEND_MS) == 0) r->st.resent++;
}

// Files one message from peer src.
static void intake(rl_ctx_t *r, int src, comm_msg_t *m) {
    if (src < 0 || grow(r, src) != 0) {
        comm_msg_free(m);
        return;
    }
    peer_t *pe = &r->peer[src];
    hdr_t h;
    if (!hdr_strip(m, &h)) { // no header: a peer without this layer, or one that started afresh
        if (pe->talked) {
            drop_sending(pe);
            drop_held(pe);
            pe->known = pe->talked = false;
        }
        in_item_t *it = calloc(1, sizeof *it);
        if (!it) {
            comm_msg_free(m);
            return;
        }
        it->msg = *m;
        ready_push(r, pe, it);
        return;
    }
    pe->talked = true;
    if (h.ack_epoch == r->epoch) {
        on_ack(r, pe, h.ack);
        // the peer holds later messages and misses this one: send it again without waiting for its
        // timeout (at most once per minimum timeout, however many reports say so)
        out_item_t *hd = pe->out_head;
        if ((h.flags & FLAG_GAP) && hd && hd->seq == h.ack && now_ns() - hd->last_ns >= gap_ns(r, pe)) resend_head(r, src);
    }
    if (h.kind == KIND_ACK) {
        comm_msg_free(m);
        return;
    }
    if (!pe->known || h.epoch != pe->peer_epoch) { // a new peer, or a new wrapper at its rank
        drop_held(pe);
        pe->known = true;
        pe->peer_epoch = h.epoch;
        pe->expected = h.base;
    }
    pe->ack_due = true;
    const int32_t d = (int32_t)(h.seq - pe->expected);
    if (d < 0) {
        r->st.dups++;
        comm_msg_free(m);
        return;
    }
    in_item_t *it = calloc(1, sizeof *it);
    if (!it) { // not taken: the sender sends it again
        comm_msg_free(m);
        return;
    }
    it->msg = *m;
    it->seq = h.seq;
    if (d > 0) { // early: hold it, in order, once
        in_item_t **pp = &pe->held;
        while (*pp && (int32_t)((*pp)->seq - h.seq) < 0) pp = &(*pp)->next;
        if ((*pp && (*pp)->seq == h.seq) || pe->n_held >= COMM_REL_MAX_HELD) {
            r->st.dups += *pp && (*pp)->seq == h.seq;
            in_free(it);
            return;
        }
        it->next = *pp;
        *pp = it;
        pe->n_held++;
        r->st.held++;
        return;
    }
    ready_push(r, pe, it);
    pe->expected++;
    while (pe->held && pe->held->seq == pe->expected) {
        in_item_t *nx = pe->held->next;
        ready_push(r, pe, pe->held);
        pe->held = nx;
        pe->n_held--;
        pe->expected++;
    }
}

// Takes one message from the inner comm (peer or COMM_ANY) within timeout_ms. 0 when a message was
// filed; 1 when the inner comm reported an error about one peer, which is filed in that peer's queue
// (once: not again behind the same error) so it is reported in its place; otherwise the inner
// comm's code (MLM_ETIMEOUT, or an error that names no peer) with *src as it said.
static int take(rl_ctx_t *r, int peer, int timeout_ms, int *src) {
    comm_msg_t m;
    *src = -1;
    int rc = comm_recv(r->inner, peer, &m, src, timeout_ms);
    if (rc == 0) {
        intake(r, *src, &m);
        return 0;
    }
    if (rc == MLM_ETIMEOUT || *src < 0 || grow(r, *src) != 0) return rc;
    peer_t *pe = &r->peer[*src];
    if (pe->rq_tail && pe->rq_tail->err == rc) return 1;
    in_item_t *it = calloc(1, sizeof *it);
    if (!it) return rc;
    it->err = rc;
    ready_push(r, pe, it);
    return 1;
}

static void send_acks(rl_ctx_t *r) {
    const int64_t t = now_ns();
    for (int p = 0; p < r->n_peer; p++) {
        peer_t *pe = &r->peer[p];
        // a gap is reported again while it lasts: the report or the copy it asked for may be lost too
        if (pe->n_held > 0 && t - pe->ack_ns >= gap_ns(r, pe)) pe->ack_due = true;
        if (!pe->ack_due) continue;
        pe->ack_ns = t;
        uint8_t b[COMM_REL_HEADER_BYTES];
        hdr_t h = hdr_for(r, pe, KIND_ACK, pe->next_seq);
        hdr_put(b, &h);
        const comm_iov_t iov = {b, sizeof b};
        if (comm_send(r->inner, p, &iov, 1, SEND_MS) == 0) r->st.acks++;
        pe->ack_due = false; // a lost acknowledgement is made good by the next copy's
    }
}

// A peer's oldest unacknowledged message whose timeout passed is sent again (the receiver holds
// what came after it, so its next acknowledgement covers them too).
static void resend_due(rl_ctx_t *r) {
    const int64_t t = now_ns();
    for (int p = 0; p < r->n_peer; p++)
        if (r->peer[p].out_head && r->peer[p].out_head->due_ns <= t) resend_head(r, p);
}

// Everything that needs no waiting: what arrived, acknowledgements, retransmissions due.
static void progress(rl_ctx_t *r) {
    int src;
    for (int i = 0; i < PUMP_MAX && take(r, COMM_ANY, 0, &src) == 0; i++) {
    }
    send_acks(r);
    resend_due(r);
}

// The earliest retransmission due (ns), or -1.
static int64_t next_due(const rl_ctx_t *r) {
    int64_t best = -1;
    for (int p = 0; p < r->n_peer; p++) {
        const out_item_t *it = r->peer[p].out_head; // only the oldest has a running timer
        if (it && (best < 0 || it->due_ns < best)) best = it->due_ns;
    }
    return best;
}

// The ready queue a recv(peer) serves next, or NULL.
static peer_t *pick(rl_ctx_t *r, int peer) {
    if (peer != COMM_ANY) return peer < r->n_peer && r->peer[peer].rq_head ? &r->peer[peer] : NULL;
    peer_t *best = NULL;
    for (int p = 0; p < r->n_peer; p++)
        if (r->peer[p].rq_head && (!best || r->peer[p].rq_head->order < best->rq_head->order)) best = &r->peer[p];
    return best;
}

static int deliver(rl_ctx_t *r, peer_t *pe, comm_msg_t *out, int *from) {
    in_item_t *it = pe->rq_head;
    pe->rq_head = it->next;
    if (!pe->rq_head) pe->rq_tail = NULL;
    *from = (int)(pe - r->peer);
    const int err = it->err;
    if (!err) {
        *out = it->msg;
        memset(&it->msg, 0, sizeof it->msg);
        r->st.delivered++;
    }
    in_free(it);
    return err;
}

// Milliseconds to wait on the inner comm: until the deadline dl (ns, -1 none), the next
// retransmission, and at most SLICE_MS.
static int wait_ms(const rl_ctx_t *r, int64_t dl) {
    const int64_t t = now_ns();
    int64_t until = t + (int64_t)SLICE_MS * 1000000;
    const int64_t due = next_due(r);
    if (due >= 0 && due < until) until = due;
    if (dl >= 0 && dl < until) until = dl;
    const int64_t ms = (until - t + 999999) / 1000000;
    return ms < 0 ? 0 : (int)ms;
}

static void *sender_main(void *arg) {
    rl_ctx_t *r = arg;
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        const int64_t due = next_due(r);
        if (due < 0) {
            pthread_cond_wait(&r->cv, &r->mu);
            continue;
        }
        if (now_ns() < due) {
            struct timespec ts = {(time_t)(due / 1000000000), (long)(due % 1000000000)};
            pthread_cond_timedwait(&r->cv, &r->mu, &ts);
            continue;
        }
        progress(r);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

// --- backend

static const char *rl_name(void *ctx) { return ((rl_ctx_t *)ctx)->name; }
static int rl_rank(void *ctx) { return comm_rank(((rl_ctx_t *)ctx)->inner); }
static int rl_size(void *ctx) { return comm_size(((rl_ctx_t *)ctx)->inner); }

static int rl_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    rl_ctx_t *r = ctx;
    if (n < 0 || n > COMM_MAX_FRAMES) return MLM_EINVAL;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += frames[i].len;
    const int64_t dl = timeout_ms < 0 ? -1 : now_ns() + (int64_t)timeout_ms * 1000000;
    pthread_mutex_lock(&r->mu);
    int rc = grow(r, peer);
    if (rc != 0) goto out;
    // a full window waits for acknowledgements
    while (r->peer[peer].n_out > 0 && (r->peer[peer].n_out >= r->o.window_msgs ||
                                       r->peer[peer].out_bytes + total > r->o.window_bytes)) {
        progress(r);
        if (dl >= 0 && now_ns() >= dl) {
            rc = MLM_ETIMEOUT;
            goto out;
        }
        int src;
        rc = take(r, COMM_ANY, wait_ms(r, dl), &src);
        if (rc != 0 && rc != MLM_ETIMEOUT && rc != 1) goto out;
        rc = 0;
    }
    out_item_t *it = calloc(1, sizeof *it);
    uint8_t *buf = it ? malloc(total + COMM_REL_HEADER_BYTES) : NULL;
    if (!buf) {
        free(it);
        rc = MLM_ENOMEM;
        goto out;
    }
    it->buf = buf;
    it->n = n;
    it->bytes = total;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        it->len[i] = frames[i].len;
        if (frames[i].len) memcpy(buf + at, frames[i].ptr, frames[i].len);
        at += frames[i].len;
    }
    peer_t *pe = &r->peer[peer];
    it->seq = pe->next_seq;
    const int left = dl < 0 ? -1 : (int)((dl - now_ns()) / 1000000);
    rc = send_item(r, peer, it, left < 0 && dl >= 0 ? 0 : left);
    if (rc != 0) { // not on the wire: the sequence number stays free
        out_free(it);
        goto out;
    }
    pe->next_seq++;
    it->tries = 1;
    it->sent_ns = it->last_ns;
    it->due_ns = it->sent_ns + pe->rto_ns;
    if (pe->out_tail) pe->out_tail->next = it;
    else pe->out_head = it;
    pe->out_tail = it;
    pe->n_out++;
    pe->out_bytes += total;
    r->st.sent++;
    pthread_cond_signal(&r->cv); // the sender thread's next wake-up may be earlier now
out:
    pthread_mutex_unlock(&r->mu);
    return rc;
}

static int rl_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    rl_ctx_t *r = ctx;
    const int64_t dl = timeout_ms < 0 ? -1 : now_ns() + (int64_t)timeout_ms * 1000000;
    *from = -1;
    pthread_mutex_lock(&r->mu);
    int rc = peer == COMM_ANY ? 0 : grow(r, peer);
    while (rc == 0) {
        progress(r);
        peer_t *pe = pick(r, peer);
        if (pe) {
            rc = deliver(r, pe, out, from);
            break;
        }
        if (dl >= 0 && now_ns() >= dl) {
            rc = MLM_ETIMEOUT;
            break;
        }
        // wait on the peer itself, so the inner comm reports its loss
        int src = -1;
        rc = take(r, peer, wait_ms(r, dl), &src);
        if (rc == MLM_ETIMEOUT || rc == 1) rc = 0;
        else if (rc != 0) *from = src >= 0 ? src : peer;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

static void rl_free(rl_ctx_t *r, bool destroy_inner) {
    if (r->has_thread) {
        pthread_mutex_lock(&r->mu);
        r->stop = true;
        pthread_cond_signal(&r->cv);
        pthread_mutex_unlock(&r->mu);
        pthread_join(r->thread, NULL);
    }
    for (int p = 0; p < r->n_peer; p++) peer_clear(&r->peer[p]);
    free(r->peer);
    if (destroy_inner) comm_destroy(&r->inner);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

static void rl_destroy(void *ctx) {
    rl_ctx_t *r = ctx;
    if (!r) return;
    // acknowledge what came in last, so its sender does not send it again to a closed end
    pthread_mutex_lock(&r->mu);
    if (r->inner) send_acks(r);
    pthread_mutex_unlock(&r->mu);
    rl_free(r, true);
}

static const struct comm_backend_i rel_iface = {
    .name = rl_name,
    .rank = rl_rank,
    .size = rl_size,
    .send = rl_send,
    .recv = rl_recv,
    .destroy = rl_destroy,
    // collectives run over rl_send/rl_recv (comm.c)
};

// --- public API

int comm_rel_wrap(comm_t **c, const comm_rel_opts_t *o, char *err, size_t errlen) {
    if (!c || !*c) return mlm_fail(err, errlen, MLM_EINVAL, "comm_rel_wrap: no comm");
    rl_ctx_t *r = calloc(1, sizeof *r);
    if (!r) return mlm_fail(err, errlen, MLM_ENOMEM, "comm_rel_wrap: out of memory");
    if (o) r->o = *o;
    if (r->o.window_msgs <= 0) r->o.window_msgs = 4096;
    if (!r->o.window_bytes) r->o.window_bytes = (size_t)256 << 20;
    if (r->o.rto_min_ms <= 0) r->o.rto_min_ms = 2;
    if (r->o.rto_max_ms <= 0) r->o.rto_max_ms = 200;
    if (r->o.rto_max_ms < r->o.rto_min_ms) r->o.rto_max_ms = r->o.rto_min_ms;
    if (r->o.rto_init_ms <= 0) r->o.rto_init_ms = 20;
    uint64_t seed = (uint64_t)now_ns() ^ (uint64_t)getpid() << 32 ^ (uint64_t)(uintptr_t)r;
    r->epoch = (uint32_t)mlm_mix64(seed);
    if (!r->epoch) r->epoch = 1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    r->inner = *c;
    int size = comm_size(*c);
    if (size > 0 && grow(r, size - 1) != 0) goto oom;
    snprintf(r->name, sizeof r->name, "%s+rel", comm_name(*c));
    comm_t *outer = comm_new(&rel_iface, r);
    if (!outer) goto oom;
    if (!r->o.no_thread) {
        if (pthread_create(&r->thread, NULL, sender_main, r) != 0) {
            r->inner = NULL;
            comm_destroy(&outer); // frees r, leaves the inner comm alone
            return mlm_fail(err, errlen, MLM_ENOMEM, "comm_rel_wrap: cannot start the sender thread");
        }
        r->has_thread = true;
    }
    *c = outer;
    return 0;
oom:
    r->inner = NULL;
    rl_free(r, false);
    return mlm_fail(err, errlen, MLM_ENOMEM, "comm_rel_wrap: out of memory");
}

comm_t *comm_rel_inner(const comm_t *c) {
    rl_ctx_t *r = c ? comm_backend_ctx(c, &rel_iface) : NULL;
    return r ? r->inner : NULL;
}

int comm_rel_unwrap(comm_t **c) {
    rl_ctx_t *r = c && *c ? comm_backend_ctx(*c, &rel_iface) : NULL;
    if (!r) return MLM_EINVAL;
    comm_t *inner = r->inner;
    r->inner = NULL; // rl_destroy leaves it alone
    comm_destroy(c);
    *c = inner;
    return 0;
}

void comm_rel_stats(const comm_t *c, comm_rel_stats_t *out) {
    memset(out, 0, sizeof *out);
    rl_ctx_t *r = c ? comm_backend_ctx(c, &rel_iface) : NULL;
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    *out = r->st;
    double srtt = 0;
    int n = 0;
    for (int p = 0; p < r->n_peer; p++) {
        if (r->peer[p].have_rtt) srtt += r->peer[p].srtt_ns, n++;
        if (r->peer[p].rto_ns / 1e6 > out->rto_ms) out->rto_ms = r->peer[p].rto_ns / 1e6;
    }
    out->srtt_ms = n ? srtt / n / 1e6 : 0;
    pthread_mutex_unlock(&r->mu);
}
