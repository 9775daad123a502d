// Sending and receiving whole protocol messages over a control link.
#ifndef MESHLM_MSG_IO_H
#define MESHLM_MSG_IO_H

#include "proto/msg.h"
#include "transport/link.h"

// Encodes and sends m. 0 or a negative MLM_ code (message in err).
int msg_send_link(link_t *l, const msg_t *m, int timeout_ms, char *err, size_t errlen);

// Receives and decodes one message into *out; raw keeps the frames that out's tensors borrow
// (free both with msg_clear and comm_msg_free). MLM_ETIMEOUT when nothing came by the deadline.
int msg_recv_link(link_t *l, msg_t *out, comm_msg_t *raw, int timeout_ms, char *err, size_t errlen);

#endif
