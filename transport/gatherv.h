// All-gather of blocks of different sizes, each rank's block sent straight to every other rank.
#ifndef MESHLM_GATHERV_H
#define MESHLM_GATHERV_H

#include <stddef.h>

#include "transport/comm.h"

// Rank r contributes lens[r] bytes (in, len = lens[my rank]); every rank receives all blocks
// concatenated in rank order in out. One round: latency of one hop, (size-1) sends per rank.
// 0, or MLM_ETIMEOUT / MLM_EPEER / MLM_EPROTO (a block of the wrong size) by the deadline.
int comm_allgatherv(comm_t *c, const void *in, size_t len, void *out, const size_t *lens, int timeout_ms);

// The same among ranks [first, first + n) only (the caller is one of them); lens has n entries.
int comm_allgatherv_range(comm_t *c, int first, int n, const void *in, size_t len, void *out, const size_t *lens,
                          int timeout_ms);

// Gathers blocks at root from ranks [first, first + n) (root may be outside that range, and then
// contributes nothing): out, at root only, receives the blocks in rank order. Non-roots just send.
int comm_gatherv_root(comm_t *c, int root, int first, int n, const void *in, size_t len, void *out,
                      const size_t *lens, int timeout_ms);

#endif
