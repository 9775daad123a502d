// Shared-memory collectives for a group of ranks on one host: a tensor-parallel group's all-gathers
// and all-reduces through a shared segment instead of ZeroMQ messages.
#ifndef MESHLM_COMM_SHM_H
#define MESHLM_COMM_SHM_H

#include <stdbool.h>
#include <stddef.h>

#include "transport/comm.h"

// A group's attachment to its segment. The segment holds, for each member, a sequence word and two
// slots of slot_bytes (even and odd collectives alternate), so a member writes its block once and
// every other member copies it out; no message, no I/O thread and no system call on the way when
// both sides are running (a waiter spins briefly, then sleeps on a futex).
typedef struct comm_shm comm_shm_t;

#define COMM_SHM_SLOT_BYTES ((size_t)1 << 20) // default slot: a decode step's blocks and small batches

// Collective among ranks [first, first + n) of c (the caller is one of them; n >= 2), made by every
// member at the same point of its sequence of calls on c: the first member creates a segment and
// offers it (over c) when want is true; each other member attaches and answers; the first member
// removes the segment's name (it lives on while mapped) and tells everyone whether all attached.
// *out is then the attachment, or NULL when any member did not want or could not attach (a member
// whose comm runs through a fault wrapper or another host says no): the group then keeps to c.
// Peer loss while waiting in a collective is learned from c (comm_zmq_poll_lost), so c must be the
// plain ZeroMQ comm of the group's plan. 0, or MLM_ETIMEOUT / MLM_EPEER / MLM_EPROTO from the
// exchange on c (err says which member), with *out NULL.
int comm_shm_open(comm_shm_t **out, comm_t *c, int first, int n, size_t slot_bytes, bool want, int timeout_ms,
                  char *err, size_t errlen);
void comm_shm_destroy(comm_shm_t **self_p);

// Whether a block of len bytes fits a slot. Every member decides alike from the same sizes.
bool comm_shm_fits(const comm_shm_t *s, size_t len);

// comm_allgatherv_range through the segment: lens (n entries) as there, each <= slot_bytes (else
// MLM_ERANGE, before anything is written). 0, or MLM_ETIMEOUT (deadline) / MLM_EPEER (a peer of c
// lost, or another member left a collective on an error): the segment is then unusable and the group
// should be rebuilt, as after any failed collective. A member that fails marks the segment abandoned,
// so every other member leaves its collective at once (MLM_EPEER) and can answer its coordinator,
// instead of waiting for a block that will never be written until its own deadline.
int comm_shm_allgatherv(comm_shm_t *s, const void *in, size_t len, void *out, const size_t *lens, int timeout_ms);

// comm_allreduce_range (sum of n floats in place, no compression) through the segment, with algo's
// summation order (comm.h: STAR a left fold in member order, RING chunk c folded from member c on),
// so the bits equal what algo gives over messages. n * 4 <= slot_bytes, else MLM_ERANGE. Errors as
// comm_shm_allgatherv.
int comm_shm_allreduce(comm_shm_t *s, float *buf, size_t n, comm_algo_t algo, int timeout_ms);

#endif
