// The ranks of an mpirun job as a cluster: MPI started, one communicator for control and one for the
// data plane (meshlm mpi, meshlm serve --mpi).
#ifndef MESHLM_MPI_RANKS_H
#define MESHLM_MPI_RANKS_H

#include "transport/comm.h"

// MPI_Init_thread (SERIALIZED) and the two communicators. 0, or 1 with the reason printed (a rank that
// cannot open its first communicator ends the job: no one could be told).
int mpi_ranks_open(comm_t **ctl, comm_t **data, int timeout_ms);

// Destroys the communicators and finalizes MPI; a non-zero code on a job of several ranks aborts it
// instead (a frozen rank would hang MPI_Finalize). Accepts NULL comms.
void mpi_ranks_close(comm_t **ctl, comm_t **data, int code);

#endif
