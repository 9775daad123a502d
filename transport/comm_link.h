// Control-link comm backend: a coordinator (rank 0) and its workers (ranks 1..n) over ZeroMQ, a star with deadlines and peer-loss detection.
#ifndef MESHLM_COMM_LINK_H
#define MESHLM_COMM_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"
#include "transport/comm_open.h"
#include "transport/curve.h"

// Wire format, version 1.0. Every message is: [envelope (8 bytes)] [user frame 0] ... [user frame n-1]
//   u32 magic COMM_LINK_MAGIC, u8 major, u8 minor, u8 kind (COMM_LINK_DATA), u8 n (user frames)
// (little-endian). A message without a valid envelope, with another major version or whose frame
// count disagrees with n is dropped and reported as MLM_EPROTO; one whose user frames add up to
// more than max_msg_bytes is dropped and reported as MLM_ERANGE. The link stays usable either way.
#define COMM_LINK_MAGIC 0x4c4d4c4du // "MLML"
#define COMM_LINK_MAJOR 1
#define COMM_LINK_MINOR 0
#define COMM_LINK_ENVELOPE_BYTES 8
enum {
    COMM_LINK_DATA = 0,             // user frames follow
};

// Typical use (the runtime's HELLO; see also comm_fault_unwrap in transport/fault.h):
//   coordinator: comm_open(&c, "link", {rank 0, size n + 1, endpoints}) ... send each worker its
//                HELLO (naming its rank i and the fault spec), receive every answer, then
//                comm_fault_wrap(&c, spec) when the spec has link rules
//   worker:      comm_open(&w, "link", {.listen = ep}); on a HELLO: comm_fault_unwrap(&w) if wrapped,
//                comm_link_set_rank(w, i), answer plainly, then comm_fault_wrap(&w, spec)
// A wrapped end delivers an unstamped message (a new coordinator's HELLO) as it is.

typedef struct {
    size_t max_msg_bytes;       // largest accepted message (sum of user frames); default 256 MiB
    int linger_ms;              // comm_destroy waits at most this long to flush sends; default 100
    int heartbeat_ivl_ms;       // ZMTP heartbeats (drop silent connections); 0 = off (default)
    int heartbeat_timeout_ms;   // a connection silent this long is dropped; default 5000
    int reconnect_ivl_ms;       // coordinator: retry a lost or absent worker this often; default 50
    const curve_conf_t *curve;  // CurveZMQ (borrowed for the call): the coordinator dials each worker with
                                // the key its peers list gives the endpoint (none: MLM_EINVAL) and its own
                                // keys; a worker admits only coordinators whose key is listed, and logs
                                // each refusal. NULL = plain (default)
} comm_link_opts_t;

void comm_link_opts_default(comm_link_opts_t *o);

// Coordinator side: a comm of size n + 1 and rank 0 whose peer i (1..n) is the worker listening
// at endpoints[i-1] (tcp://HOST:PORT or ipc:///PATH). Connections complete in the background: a
// message sent before its worker is there waits for it, and the recv deadline covers the wait.
// recv(COMM_ANY) returns the next message from any worker with *from = its rank. Only rank 0 and a
// worker are joined: the star collectives (barrier, broadcast and gather rooted at 0, STAR
// all-reduce) work; those that need worker-to-worker traffic (RING all-reduce, all-gather) work
// only when n == 1 and otherwise fail by their deadline.
// Peer loss: once a worker's connection drops (process killed, heartbeat timeout) send and recv on
// it return MLM_EPEER at once (messages that arrived before are still delivered first) until a
// worker is back at its endpoint (a message queued for the old one may then reach the new one); a
// frozen worker, or one that never came, gives MLM_ETIMEOUT at the deadline.
// opts NULL = defaults. 0 (caller destroys *out), or MLM_EINVAL / MLM_EIO / MLM_ENOMEM with err.
int comm_link_connect(comm_t **out, const char *const *endpoints /* (n) */, int n, const comm_link_opts_t *opts,
                      char *err, size_t errlen);

// Worker side: binds endpoint and answers whichever coordinator spoke last (a new coordinator may
// connect after the previous one vanished). Peer 0 is that coordinator; the comm's rank is 1 and
// its size 2 until comm_link_set_rank. recv(0) or recv(COMM_ANY) waits for the next message from
// any coordinator (MLM_ETIMEOUT at the deadline: the worker cannot tell a vanished coordinator from
// a quiet one). send(0) before any coordinator spoke is MLM_EPEER, as is a send to a coordinator
// whose connection is gone. opts NULL = defaults. 0 (caller destroys *out), or MLM_EIO with err
// (address in use, bad endpoint) / MLM_EINVAL / MLM_ENOMEM.
int comm_link_listen(comm_t **out, const char *endpoint, const comm_link_opts_t *opts, char *err, size_t errlen);

// Worker side: sets this end's rank to the control-link rank the coordinator assigned (1..n, told
// in its HELLO), so that fault rules naming link (0, rank) apply (wrap with comm_fault_wrap after
// this call). The comm then has size rank + 1: peer 0 is the coordinator and peers 1..rank-1 are
// other workers it cannot reach (send and recv with them are MLM_EPEER). 0, or MLM_EINVAL (c is
// not the listening side of a link comm, e.g. already wrapped, or rank < 1).
int comm_link_set_rank(comm_t *c, int rank);

// The data-plane endpoint that goes with a control endpoint: tcp://H:P -> tcp://H:(P+1),
// ipc://PATH -> ipc://PATH.data. 0, or MLM_EINVAL for another form (or an output that does not fit).
int comm_link_data_endpoint(const char *control, char *out, size_t cap);

// How long a silent connection of link comm c lasts (heartbeat interval + timeout, ms); 0 when its
// heartbeats are off or c is not a link comm. The fault wrapper loses a cut peer after as long.
int comm_link_heartbeat_ms(const comm_t *c);

// Changes the per-message size limit (sum of user frames) of a link comm. 0 or MLM_EINVAL.
int comm_link_set_max_bytes(comm_t *c, size_t max_msg_bytes);

// comm_open("link"): rank 0 = comm_link_connect(o->endpoints, o->size - 1); rank r >= 1 =
// comm_link_listen(o->listen or o->endpoints[r - 1]) then comm_link_set_rank(r); o->listen with
// a rank <= 0 listens as rank 1 (set it later). Reads max_msg_bytes and the heartbeats too.
int comm_link_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen);

#endif
