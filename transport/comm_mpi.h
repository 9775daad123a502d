// MPI comm backend: the ranks of MPI_COMM_WORLD (launched by mpirun), non-blocking MPI calls polled against deadlines.
#ifndef MESHLM_COMM_MPI_H
#define MESHLM_COMM_MPI_H

#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"
#include "transport/comm_open.h"

// Wire format, version 1.0. A comm message of n frames is one MPI message of MPI_BYTE on a private
// duplicate of MPI_COMM_WORLD (tag COMM_MPI_TAG):
//   u32 magic COMM_MPI_MAGIC, u8 major, u8 minor, u8 n (frames), u8 0, u64 len[n], frame bytes...
// (all little-endian). A message without a valid header, with another major version, or whose
// lengths do not add up is consumed and reported as MLM_EPROTO; one over max_msg_bytes is consumed
// and reported as MLM_ERANGE (*from = its sender).
#define COMM_MPI_MAGIC 0x494d4c4du  // "MLMI"
#define COMM_MPI_MAJOR 1
#define COMM_MPI_MINOR 0
#define COMM_MPI_TAG 0x6d6c         // every message on the private communicator

typedef struct {
    size_t max_msg_bytes;       // largest message (sum of frames) sent or accepted; default 256 MiB (< 2 GiB)
    size_t max_pending_bytes;   // sent bytes not yet delivered before send waits; default 512 MiB
    int connect_timeout_ms;     // deadline of the communicator duplication in comm_mpi_new; default 10000
    int linger_ms;              // comm_destroy waits at most this long for pending sends; default 1000
} comm_mpi_opts_t;

void comm_mpi_opts_default(comm_mpi_opts_t *o);

// Creates this process's rank of a comm spanning MPI_COMM_WORLD (rank and size are MPI's). The
// caller has called MPI_Init_thread with at least MPI_THREAD_FUNNELED and uses the comm only from
// the thread that called it (MPI_THREAD_SERIALIZED or more: from any one thread at a time). It must
// not call MPI_Finalize before comm_destroy. Every rank calls comm_mpi_new at the same point (it
// duplicates MPI_COMM_WORLD with MPI_Comm_idup, within connect_timeout_ms). opts NULL = defaults.
// On success *out is a new comm (caller destroys). On failure returns MLM_EINVAL (MPI not
// initialized, thread level too low), MLM_ETIMEOUT (a rank never joined) or MLM_EPEER (MPI error)
// with the reason in err.
//
// Semantics: send copies the frames, starts an MPI_Isend and returns; it waits (up to its
// deadline, then MLM_ETIMEOUT, nothing sent) only while more than max_pending_bytes are still
// undelivered, so ranks that all send before they receive cannot deadlock on MPI's rendezvous
// protocol. recv polls MPI_Improbe, then MPI_Imrecv + MPI_Test, against its deadline. Messages
// from one peer arrive in order (MPI's non-overtaking rule); recv(COMM_ANY) takes the message MPI
// matches first, i.e. the earliest arrived. Errors are returned, not fatal (MPI_ERRORS_RETURN on
// the private communicator): an MPI failure talking to a peer is MLM_EPEER. Under plain Open MPI a
// crashed rank usually ends the whole job; a frozen one yields MLM_ETIMEOUT. Barrier and
// all-reduce use the generic deterministic algorithms of comm.c (MPI_Allreduce does not promise a
// summation order). comm_destroy waits up to linger_ms for undelivered sends, then cancels them
// (buffers of sends MPI will not release are leaked rather than freed under it).
int comm_mpi_new(comm_t **out, char *err, size_t errlen);
int comm_mpi_new_opts(comm_t **out, const comm_mpi_opts_t *opts, char *err, size_t errlen);

// comm_open("mpi"): comm_mpi_new_opts with o's timeout_ms (start) and max_msg_bytes (o may be
// NULL); rank and size are MPI's.
int comm_mpi_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen);

#endif
