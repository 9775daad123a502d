// Opening a comm by backend name ("zmq", "mpi", "inproc", "link", "fault:<name>"): the one table of transport backends.
#ifndef MESHLM_COMM_OPEN_H
#define MESHLM_COMM_OPEN_H

#include <stddef.h>

#include "transport/comm.h"
#include "transport/curve.h"
#include "transport/fault.h"

typedef struct comm_inproc_group comm_inproc_group_t; // transport/comm_inproc.h

// What the backends need; zero means "the backend's default" for every number. Each backend reads
// only its fields (listed per field) and refuses what it cannot use with MLM_EINVAL.
typedef struct {
    int rank;                       // zmq, inproc, link: this rank (link: 0 = coordinator, r >= 1 = worker r); mpi: MPI's
    int size;                       // zmq, inproc, link: ranks in the world (link: workers + 1); mpi: MPI's
    const char *const *endpoints;   // zmq: (size) one per rank; link: (size - 1) the workers', worker r's at [r - 1]
    const char *listen;             // link, worker side: endpoint to listen on (else endpoints[rank - 1]);
                                    //   with it a rank <= 0 means "not known yet" (1 until comm_link_set_rank)
    comm_inproc_group_t *group;     // inproc: the group this rank joins (borrowed; comm_inproc_group_new)
    int timeout_ms;                 // zmq: handshake deadline; mpi: start deadline
    size_t max_msg_bytes;           // zmq, mpi, link: largest message (sum of frames); inproc: the group's
    int heartbeat_ivl_ms;           // zmq, link: ZMTP heartbeat interval; < 0 = off (link's default is off)
    int heartbeat_timeout_ms;       // zmq, link: a connection silent this long is dropped
    bool fail_on_any_loss;          // zmq: once any peer is lost every call fails (a plan's data plane)
    uint16_t session;               // zmq: the world's id (messages of another world on the same endpoints
                                    //   are dropped): a plan's data plane uses the plan id's low bits
    const char *faults;             // fault:<name>: spec text; NULL = $MESHLM_FAULTS
    const fault_spec_t *fault_spec; // fault:<name>: a parsed spec, wins over faults (read during the call)
    const curve_conf_t *curve;      // link: CurveZMQ keys (transport/curve.h); zmq: its self is this rank's key
                                    //   pair (the peers are not read: curve_keys says whom to admit); NULL = plain
    const char *const *curve_keys;  // zmq, with curve: (size) every rank's public key (a plan's data plane: the
                                    //   PLAN's keys); the world admits only these
} comm_open_opts_t;

// Opens this rank's comm of backend `name`:
//   "zmq"          comm_zmq_new(rank, size, endpoints): every rank calls it at about the same time
//   "mpi"          comm_mpi_new_opts over MPI_COMM_WORLD (the caller has initialised MPI)
//   "inproc"       joins o->group as o->rank (ranks of one group usually live on threads of one process)
//   "link"         the control link: rank 0 connects to the size - 1 workers' endpoints, a worker listens
//   "fault:<name>" opens <name> with the same options and wraps it with comm_fault_wrap; the spec is
//                  o->fault_spec, else the text o->faults, else $MESHLM_FAULTS (none at all: MLM_EINVAL).
//                  Link rules name ranks: a link worker that learns its rank later opens "link" and
//                  wraps after comm_link_set_rank (transport/comm_link.h)
// o NULL = all defaults (enough only for "mpi"). 0 (caller destroys *out), or the backend's error
// (MLM_EINVAL for an unknown name, listing the known ones) with err filled; *out is then NULL.
int comm_open(comm_t **out, const char *name, const comm_open_opts_t *o, char *err, size_t errlen);

// Sets o's ZMTP heartbeats so that a peer silent for hb_ms (0 = 1000) is dropped within it, with a
// fifth of it left for the loss to reach the caller: a PING every hb_ms / 5, and the connection
// closed when nothing arrives within 3/5 of hb_ms after one (so 3/5 to 4/5 of hb_ms of silence).
static inline void comm_open_heartbeat(comm_open_opts_t *o, int hb_ms) {
    const int hb = hb_ms > 0 ? hb_ms : 1000, ivl = hb / 5 > 0 ? hb / 5 : 1;
    o->heartbeat_ivl_ms = ivl;
    o->heartbeat_timeout_ms = hb - 2 * ivl > 0 ? hb - 2 * ivl : 1;
}

// The i-th backend name comm_open knows (i = 0, 1, ...), NULL past the last; static storage.
const char *comm_open_name(int i);

#endif
