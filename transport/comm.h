// Moving bytes between ranks: one interface (send/recv with deadlines, collectives), many backends.
#ifndef MESHLM_COMM_H
#define MESHLM_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COMM_ANY (-1)           // recv from whichever peer has a message
#define COMM_MAX_FRAMES 16      // frames in one message

// One frame of an outgoing message (borrowed for the duration of the call).
typedef struct {
    const void *ptr;
    size_t len;
} comm_iov_t;

// A received message: n frames, each owned by the message until comm_msg_free.
typedef struct {
    int n;                              // frames
    void *data[COMM_MAX_FRAMES];        // frame bytes (owned)
    size_t len[COMM_MAX_FRAMES];        // frame lengths
} comm_msg_t;

void comm_msg_free(comm_msg_t *m);      // frees the frames; accepts a zeroed struct

typedef enum {
    COMM_ALGO_AUTO = 0,  // choose by message size and measured link latency
    COMM_ALGO_STAR = 1,  // gather to rank 0, sum in rank order, broadcast (fewest round trips)
    COMM_ALGO_RING = 2,  // reduce-scatter + all-gather around the ring (least bytes per link)
} comm_algo_t;

// A backend is a table of functions over its own context (ggml-backend style). Optional entries
// may be NULL: comm.c then supplies a generic implementation built on send/recv.
struct comm_backend_i {
    const char *(*name)(void *ctx);
    int (*rank)(void *ctx);
    int (*size)(void *ctx);
    // Sends one message of n frames to peer. 0, MLM_ETIMEOUT, MLM_EPEER (peer gone), MLM_ERANGE (too big).
    int (*send)(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms);
    // Receives the next message from peer (or COMM_ANY; *from gets the sender). Messages from one
    // peer arrive in the order they were sent. 0, MLM_ETIMEOUT, MLM_EPEER, MLM_EPROTO (malformed),
    // MLM_ERANGE (over this end's size limit); both drop that message (*from names its sender when
    // known) and the comm stays usable.
    int (*recv)(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms);
    void (*destroy)(void *ctx);
    // optional
    int (*barrier)(void *ctx, int timeout_ms);
    int (*allreduce_f32)(void *ctx, float *buf, size_t n, comm_algo_t algo, int timeout_ms);
    // comm_alltoallv among ranks [first, first + n) (arguments and contract as there). NULL: the generic
    // one in comm.c over send/recv, which every backend here uses (zmq, mpi, inproc, link, and the
    // fault wrapper, whose faults then apply to each of its messages).
    int (*alltoallv)(void *ctx, int first, int n, const void *send, const size_t *send_lens, void *recv,
                     const size_t *recv_lens, int timeout_ms);
};

typedef struct comm comm_t;

// Wraps a backend; takes ownership of ctx (iface->destroy is called by comm_destroy).
comm_t *comm_new(const struct comm_backend_i *iface, void *ctx);
void comm_destroy(comm_t **self_p);

// The backend context of c when c runs on the table iface, else NULL: a backend's own extra
// functions (comm_link_set_rank, comm_fault_unwrap, ...) reach their context this way. Borrowed
// until comm_destroy.
void *comm_backend_ctx(const comm_t *c, const struct comm_backend_i *iface);

const char *comm_name(const comm_t *c);
int comm_rank(const comm_t *c);
int comm_size(const comm_t *c);

int comm_send(comm_t *c, int peer, const comm_iov_t *frames, int n, int timeout_ms);
int comm_send1(comm_t *c, int peer, const void *buf, size_t len, int timeout_ms);   // one frame
int comm_recv(comm_t *c, int peer, comm_msg_t *out, int *from, int timeout_ms);

// Collectives over all ranks. Every rank calls them in the same order. Sums are deterministic:
// the same inputs give the same bits on every rank whatever the arrival order.
int comm_barrier(comm_t *c, int timeout_ms);
int comm_broadcast(comm_t *c, int root, void *buf, size_t len, int timeout_ms);
int comm_gather(comm_t *c, int root, const void *in, size_t len, void *out /* (size, len) at root */, int timeout_ms);
int comm_allreduce_f32(comm_t *c, float *buf, size_t n, comm_algo_t algo, int timeout_ms);

// --- deadlines, extra collectives, all-reduce options, link measurement
//
// Deadlines: every call that can block takes timeout_ms, the longest it may block in total (a
// collective's timeout covers the whole collective, not each message). 0 polls once; a negative
// value waits forever and is meant for interactive tools only (never in tests or the data path).
// A peer that disappears yields MLM_EPEER (when the backend notices) or MLM_ETIMEOUT (when it
// cannot tell a dead peer from a slow one) by the deadline, never a hang. After a failed
// collective the buffers are unspecified and the comm should be rebuilt over the survivors.
// Collective messages carry a small header (op, collective sequence number); a stale message
// left over from a failed collective is dropped, any other mismatch is MLM_EPROTO. Point-to-point
// messages must be consumed before the next collective involving the same peers.
//
// All-reduce summation order (bit-exact contract, identical on every rank):
//   STAR: element i = ((x0[i] + x1[i]) + x2[i]) + ... + x(N-1)[i]   (rank order, left fold)
//   RING: chunk c = elements [c*n/N, (c+1)*n/N) is folded in the order c, c+1, ..., N-1, 0, ..., c-1
//   (for N <= 2 both orders give the same bits). With Q8_0 compression chunks are whole 32-element
//   blocks: chunk c = blocks [c*nb/N, (c+1)*nb/N) of nb = ceil(n/32).
// Floats travel as little-endian IEEE-754 bytes (every supported machine is little-endian).

// Gathers len bytes from every rank into out (size, len) on every rank (ring all-gather).
int comm_allgather(comm_t *c, const void *in, size_t len, void *out /* (size, len) */, int timeout_ms);

#define COMM_AR_Q8_0 1u       // comm_allreduce_opts_t.flags: send contributions as Q8_0 blocks

typedef struct {
    comm_algo_t algo;         // AUTO: per-call choice (see comm_choose_algo)
    uint32_t flags;           // COMM_AR_* bits
} comm_allreduce_opts_t;

// All-reduce (sum) of n floats in place on every rank. opts NULL = {AUTO, comm default flags}.
// With COMM_AR_Q8_0 every transmitted partial sum (and the final result) is quantized to Q8_0
// (34 bytes per 32 floats, as distributed-llama does); the result is still deterministic and the
// same bits on every rank; error per element is about sum over hops of amax(block)/254.
// 0, or MLM_ETIMEOUT / MLM_EPEER / MLM_EPROTO / MLM_ENOMEM; on failure buf is unspecified.
int comm_allreduce_ex(comm_t *c, float *buf, size_t n, const comm_allreduce_opts_t *opts, int timeout_ms);

// The algorithm AUTO picks for an all-reduce of `bytes` payload bytes per rank: a forced choice
// (comm_set_algo or $MESHLM_ALLREDUCE=star|ring read by comm_new) wins; otherwise with link
// latency L and bandwidth B (comm_set_link / comm_calibrate, defaults 100 us and 125 MB/s):
//   star = 2*L + 2*(N-1)*bytes/B   (gather and broadcast rounds overlap at the root)
//   ring = 2*(N-1)*(L + bytes/(N*B))
// and the smaller wins (star on ties). Every rank must see the same inputs to choose alike, so
// link figures are set collectively (comm_calibrate) or from configuration, never per rank.
comm_algo_t comm_choose_algo(const comm_t *c, size_t bytes);
// The same rule for an all-reduce among n_ranks ranks (comm_allreduce_range's group).
comm_algo_t comm_choose_algo_n(const comm_t *c, int n_ranks, size_t bytes);
void comm_set_algo(comm_t *c, comm_algo_t algo);         // AUTO = use the rule again
void comm_set_compress(comm_t *c, bool q8_0);            // default flags of comm_allreduce_f32
void comm_set_link(comm_t *c, double lat_us, double bw_bytes_per_s);
const char *comm_algo_name(comm_algo_t algo);           // "auto", "star", "ring"

// All-reduce (sum) of n floats in place among ranks [first, first + n_ranks) only (the caller is one
// of them; a tensor-parallel group inside a plan's data plane): the algorithms and summation orders
// above with the members numbered 0..n_ranks-1 from first (STAR's root is rank first); AUTO chooses
// as comm_choose_algo_n(c, n_ranks, bytes). Range all-reduces number their messages in a sequence of
// their own, apart from the whole-comm collectives: every member makes the same range calls in the
// same order, and a rank takes part in one range at a time (a stale message from a failed range
// call is dropped as above). A backend's own allreduce_f32 (whole comm) is not used. 0, MLM_EINVAL
// (the caller is not in the range), or as comm_allreduce_ex.
int comm_allreduce_range(comm_t *c, int first, int n_ranks, float *buf, size_t n, const comm_allreduce_opts_t *opts,
                         int timeout_ms);

// All-to-all with sizes per pair among ranks [first, first + n) (the caller is one of them; an
// expert-parallel group exchanging tokens with the owners of their experts). send holds n blocks
// in rank order, block j (send_lens[j] bytes, 0 allowed) for rank first + j; recv receives n
// blocks in rank order, block j (recv_lens[j] bytes) from rank first + j. Both sides know every
// size beforehand (as MPI_Alltoallv): a block of another size is MLM_EPROTO. The caller's own
// block is copied. send and recv must not overlap. Numbered in the range sequence
// (comm_allreduce_range's): every member makes the same range calls in the same order. One round:
// each rank sends its n-1 blocks, then receives n-1. 0, MLM_EINVAL (caller not in the range), or
// MLM_ETIMEOUT / MLM_EPEER / MLM_EPROTO by the deadline; recv is then unspecified.
int comm_alltoallv(comm_t *c, int first, int n /* <= 256 */, const void *send, const size_t *send_lens /* (n) */, void *recv,
                   const size_t *recv_lens /* (n) */, int timeout_ms);

// What a comm has done since comm_new, counted by the wrapper for every backend (a fault wrapper
// and the comm it wraps count separately).
typedef struct {
    uint64_t msgs_sent;        // messages sent: comm_send calls and every message of a collective
    uint64_t bytes_sent;       // their bytes (frames, collective headers included)
    uint64_t allreduces;       // all-reduces started (comm_allreduce_ex / _f32 / _range with >= 2 ranks
                               // and n > 0)
    uint64_t allreduces_ring;  // of which ran the ring algorithm (the rest: star)
} comm_counters_t;

void comm_get_counters(const comm_t *c, comm_counters_t *out);

// Measures the link to peer: n small ping-pongs (latency = half the median round trip, in
// microseconds) and one 1 MiB transfer (bandwidth, bytes/s). Both ranks call it naming each
// other (the lower rank leads) and both receive the same figures. 0 or MLM_E*.
int comm_ping(comm_t *c, int peer, int n, double *lat_us, double *bw_bytes_per_s, int timeout_ms);

// Collective: rank 0 pings every peer, takes the worst latency and bandwidth, broadcasts them and
// every rank calls comm_set_link with them, so AUTO chooses alike everywhere. 0 or MLM_E*.
int comm_calibrate(comm_t *c, int timeout_ms);

#endif
