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
    // peer arrive in the order they were sent. 0, MLM_ETIMEOUT, MLM_EPEER, MLM_EPROTO (malformed).
    int (*recv)(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms);
    void (*destroy)(void *ctx);
    // optional
    int (*barrier)(void *ctx, int timeout_ms);
    int (*allreduce_f32)(void *ctx, float *buf, size_t n, comm_algo_t algo, int timeout_ms);
};

typedef struct comm comm_t;

// Wraps a backend; takes ownership of ctx (iface->destroy is called by comm_destroy).
comm_t *comm_new(const struct comm_backend_i *iface, void *ctx);
void comm_destroy(comm_t **self_p);

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

#endif
