// In-process comm backend: N ranks inside one process, one thread per rank, joined by mutex/condvar queues.
#ifndef MESHLM_COMM_INPROC_H
#define MESHLM_COMM_INPROC_H

#include "transport/comm.h"

// Creates size connected comms, out[r] being rank r; each is used from one thread at a time.
// The ranks share one group that lives until the last of them is destroyed (comm_destroy on each;
// caller owns every out[r]). Sends never block (queues are unbounded); recv waits with its
// deadline. Destroying a rank makes it vanish: the others get MLM_EPEER when sending to it and,
// once its queued messages are consumed, when receiving from it.
// 0, MLM_EINVAL (size < 1) or MLM_ENOMEM (then out is untouched).
int comm_inproc_new_group(comm_t **out /* (size) */, int size);

#endif
