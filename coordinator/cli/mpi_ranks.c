// The ranks of an mpirun job: MPI start and end, the control and data communicators.
#include "coordinator/cli/mpi_ranks.h"

#include <mpi.h>
#include <stdio.h>

#include "core/err.h"
#include "transport/comm_open.h"

// --- public API

int mpi_ranks_open(comm_t **ctl, comm_t **data, int timeout_ms) {
    *ctl = *data = NULL;
    // The comm is used from one thread at a time, but model threads exist: SERIALIZED is what we ask.
    int provided = MPI_THREAD_SINGLE, argc = 0;
    char **argv = NULL;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "meshlm: MPI_Init_thread failed\n");
        return 1;
    }
    char err[512] = "";
    comm_open_opts_t mo = {.timeout_ms = timeout_ms};
    int rc = comm_open(ctl, "mpi", &mo, err, sizeof err);
    if (rc != 0) { // no comm to tell the others through: the last resort ends the whole job
        int me = -1;
        MPI_Comm_rank(MPI_COMM_WORLD, &me);
        fprintf(stderr, "meshlm: rank %d: %s\n", me, err[0] ? err : mlm_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }
    if ((rc = comm_open(data, "mpi", &mo, err, sizeof err)) != 0) {
        fprintf(stderr, "meshlm: rank %d: %s\n", comm_rank(*ctl), err);
        return 1;
    }
    return 0;
}

void mpi_ranks_close(comm_t **ctl, comm_t **data, int code) {
    comm_destroy(data);
    const int size = *ctl ? comm_size(*ctl) : 1;
    comm_destroy(ctl); // flushes the failure notices (linger) before a possible abort
    int up = 0;
    MPI_Initialized(&up);
    if (!up) return;
    if (code != 0 && size > 1) MPI_Abort(MPI_COMM_WORLD, code);
    MPI_Finalize();
}
