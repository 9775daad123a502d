// The `storage:ENDPOINT` attention/KV device: the KV cache lives in a `meshlm kvstore` process, which
// appends k/v rows to its files and attends next to them; only q, the new k/v rows and the outputs
// cross the link (a "link" comm: ZeroMQ DEALER to the store's ROUTER).
#ifndef MESHLM_NODE_ATTN_STORAGE_H
#define MESHLM_NODE_ATTN_STORAGE_H

#include <stddef.h>

#include "offload/attn.h"

#define ATTN_STORAGE_TIMEOUT_MS 10000 // default deadline of one request

// Registers "storage" with attn_dev_register (offload/attn.h), so attn_dev_new(..., "storage:EP", ...)
// makes this device. 0, also when it is already registered; or attn_dev_register's error.
int attn_storage_register(void);

// The device. arg: "ENDPOINT[,timeout=MS]" (tcp://HOST:PORT or ipc:///PATH; MS: the deadline of each
// request, default ATTN_STORAGE_TIMEOUT_MS). It opens a session with the store (waiting for it up to
// the deadline), then every call is one request and its reply, except that an append is held back
// and sent with the attend that follows it on the same sequence and layer (one round trip per layer
// and step): a failed held-back append is reported by that attend (or the next call). k, v and q
// travel in the cache type (an F16 cache's rows as halves: the same bits the store would round to).
// A store that dies, stops answering by the deadline, or refuses a request fails the call with
// MLM_EPEER / MLM_ETIMEOUT / its code (MLM_EFULL for a full disk), and one line on stderr naming the
// endpoint and, for a full disk, the file; after a lost or silent store every later call fails at
// once with the same code. Stats: time_ms = measured round trips; bytes_to_dev / bytes_from_dev =
// every frame sent and received; kv_bytes, bytes_read, bytes_written and sim_time_ms (the store's
// modelled flash time) as the store reported them last; kv_bytes_ram = 0.
// 0, or MLM_EINVAL (bad argument), MLM_ETIMEOUT / MLM_EPEER (no store answered), or the store's
// refusal, with err.
int attn_storage_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen);

#endif
