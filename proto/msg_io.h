// Sending and receiving whole protocol messages over any comm (the control channel of every backend).
#ifndef MESHLM_MSG_IO_H
#define MESHLM_MSG_IO_H

#include "proto/msg.h"
#include "transport/comm.h"

// Encodes m and sends it to peer. 0 or a negative MLM_ code (message in err, naming the type).
int msg_send(comm_t *c, int peer, const msg_t *m, int timeout_ms, char *err, size_t errlen);

// Receives one message from peer (or COMM_ANY; *from, when not NULL, gets the sender) and decodes it
// into *out; raw keeps the frames that out's tensors borrow (free both with msg_clear and
// comm_msg_free; on failure both are already freed). MLM_ETIMEOUT when nothing came by the deadline;
// a malformed message is consumed and reported (MLM_EPROTO / MLM_EFORMAT / MLM_ERANGE) with the
// reason in err.
int msg_recv(comm_t *c, int peer, msg_t *out, comm_msg_t *raw, int *from, int timeout_ms, char *err, size_t errlen);

#endif
