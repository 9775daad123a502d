// Control link: one coordinator-to-worker connection over ZeroMQ, message frames with deadlines.
#ifndef MESHLM_LINK_H
#define MESHLM_LINK_H

#include <stddef.h>

#include "transport/comm.h"
#include "transport/fault.h"

typedef struct link link_t;

// Worker side: binds endpoint (tcp://HOST:PORT or ipc:///path) and answers whichever coordinator
// spoke last. 0, or MLM_EIO with a message (address in use, bad endpoint).
int link_listen(link_t **out, const char *endpoint, char *err, size_t errlen);

// Coordinator side: connects to a worker's endpoint (the connection completes in the background;
// the first send/recv deadline covers it). 0 or MLM_EIO.
int link_connect(link_t **out, const char *endpoint, char *err, size_t errlen);

// Sends one message of n frames (to the last peer heard from, on the listening side).
// 0, MLM_ETIMEOUT (no room before the deadline), MLM_EPEER (no peer yet), MLM_EINVAL.
int link_send(link_t *l, const comm_iov_t *frames, int n, int timeout_ms);

// Receives one message. 0, MLM_ETIMEOUT, MLM_ERANGE (over max_bytes: dropped, link usable),
// MLM_EPROTO (too many frames: dropped).
int link_recv(link_t *l, comm_msg_t *out, size_t max_bytes, int timeout_ms);

// The data-plane endpoint that goes with a control endpoint: tcp://H:P -> tcp://H:(P+1),
// ipc://PATH -> ipc://PATH.data. 0, or MLM_EINVAL for another form.
int link_data_endpoint(const char *control, char *out, size_t cap);

// Emulates a fault spec's link rules on this link (see transport/fault.h): from now on link_send
// appends a stamp frame and link_recv strips a trailing stamp and holds each message until it is due
// (delay, jitter, bandwidth, loss of the link peer_rank -> my_rank) or discards it (drop: the
// receiver sees MLM_ETIMEOUT). A message without a stamp is delivered as it is; a held message that
// is not due by the deadline stays for the next link_recv (MLM_ETIMEOUT). Ranks are data-plane
// ranks: the coordinator is 0, workers 1..N; on the listening (worker) side the peer is the
// coordinator. Both ends must turn it on (on an end without it the stamp is an extra frame). spec
// is read during the call only; each call starts the decision counter again. spec NULL turns it
// off (a message already held is still delivered).
void link_set_faults(link_t *l, const fault_spec_t *spec, int my_rank, int peer_rank);

// Closes without lingering; accepts NULL and NULLs the pointer.
void link_destroy(link_t **self_p);

#endif
