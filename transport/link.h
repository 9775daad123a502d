// Control link: one coordinator-to-worker connection over ZeroMQ, message frames with deadlines.
#ifndef MESHLM_LINK_H
#define MESHLM_LINK_H

#include <stddef.h>

#include "transport/comm.h"

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

// Closes without lingering; accepts NULL and NULLs the pointer.
void link_destroy(link_t **self_p);

#endif
