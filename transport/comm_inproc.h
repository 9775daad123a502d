// In-process comm backend: N ranks inside one process, one thread per rank, joined by mutex/condvar queues.
#ifndef MESHLM_COMM_INPROC_H
#define MESHLM_COMM_INPROC_H

#include "transport/comm.h"
#include "transport/comm_open.h"

// Creates size connected comms, out[r] being rank r; each is used from one thread at a time.
// The ranks share one group that lives until the last of them is destroyed (comm_destroy on each;
// caller owns every out[r]). Sends never block (queues are unbounded); recv waits with its
// deadline. Destroying a rank makes it vanish: the others get MLM_EPEER when sending to it and,
// once its queued messages are consumed, when receiving from it.
// 0, MLM_EINVAL (size < 1) or MLM_ENOMEM (then out is untouched).
int comm_inproc_new_group(comm_t **out /* (size) */, int size);

// A group whose ranks are made one by one (each by the thread that will use it, e.g. through
// comm_open("inproc")). Messages to a rank that has not joined yet wait for it; once the handle
// is released, ranks that never joined count as destroyed. max_msg_bytes bounds a message (sum of
// frames; over it send returns MLM_ERANGE); 0 = no limit. 0 (caller releases *out), MLM_EINVAL or
// MLM_ENOMEM.
typedef struct comm_inproc_group comm_inproc_group_t;
int comm_inproc_group_new(comm_inproc_group_t **out, int size, size_t max_msg_bytes);

// Makes rank `rank` of the group (caller destroys *out); safe to call from several threads at
// once. 0, MLM_EINVAL (rank out of range or already made) or MLM_ENOMEM.
int comm_inproc_join(comm_inproc_group_t *g, int rank, comm_t **out);

// Releases the handle (the ranks keep the group alive); accepts NULL and NULLs the pointer.
void comm_inproc_group_release(comm_inproc_group_t **self_p);

// comm_open("inproc"): comm_inproc_join(o->group, o->rank). o->size, when set, must be the
// group's size. The group's message limit is the one it was made with.
int comm_inproc_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen);

#endif
