// Reliable delivery over a comm that can lose messages: per-peer sequence numbers, acknowledgements, retransmission, duplicate suppression.
#ifndef MESHLM_COMM_REL_H
#define MESHLM_COMM_REL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"

// A real network under TCP does not lose messages: a lost segment is sent again by the sender's
// kernel after a retransmission timeout. The fault wrapper (transport/fault.h) discards messages
// above TCP (`drop`, a partition's cut), so the links of a cluster that emulates them run this layer
// over it, as TCP runs over a lossy IP network:
//   - every message to a peer carries this end's epoch (a random number per wrapper), a sequence
//     number (0, 1, ... per peer), the oldest sequence number it still holds for that peer (base),
//     and a cumulative acknowledgement of what it has received from the peer (ack epoch and next
//     sequence number expected): COMM_REL_HEADER_BYTES, as a frame of its own after the caller's
//     frames (appended to the last frame when there are already COMM_MAX_FRAMES);
//   - a receiver delivers a peer's messages in sequence order, holds ones that arrive early (at
//     most COMM_REL_MAX_HELD per peer), discards duplicates, and acknowledges what it received in
//     a header-only message (one per batch it takes in) or on its next message to that peer;
//   - a sender keeps a copy of each message until it is acknowledged (at most window_msgs messages
//     and window_bytes bytes per peer: a send beyond them waits for acknowledgements, within its
//     deadline). The oldest unacknowledged message is sent again when its timeout passes (the
//     receiver holds what came after it, so one acknowledgement then covers them all), or at once
//     when the receiver reports a gap at it (a later message came first). RTO = 4 x the floor of
//     the measured round trips of messages sent once (Karn's rule; not SRTT + 4 RTTVAR, see
//     on_ack: a round trip here includes the receiver's compute), within [rto_min_ms,
//     rto_max_ms], doubled at each retry of that message, restarted whenever new data is
//     acknowledged;
//   - a background thread sends what is due while the caller is busy elsewhere (computing, or
//     waiting on another comm): a step's last hand-off is sent again even when its sender has gone
//     back to its control link. It takes the wrapper's lock, which every call holds, so the inner
//     comm is still used by one thread at a time.
// A message without a header (a peer that does not run this layer: a HELLO from a fresh process)
// is delivered as it is; one from a peer that ran the layer before means that peer started afresh,
// and everything held for it and from it is dropped. A peer whose epoch changes (a new wrapper at
// the same rank) is taken from its base on. Errors of the inner comm (a lost peer, a deadline) are
// reported as they are. Without loss the cost is the header on every message and one
// acknowledgement per batch received, and nothing at all on links that are not wrapped.

#define COMM_REL_HEADER_BYTES 28
#define COMM_REL_MAX_HELD 4096          // early messages held per peer (the default window)

typedef struct {
    int window_msgs;                    // unacknowledged messages per peer before a send waits (0 = 4096)
    size_t window_bytes;                // their bytes (0 = 256 MiB)
    int rto_init_ms;                    // before the first round trip is measured (0 = 20)
    int rto_min_ms;                     // 0 = 5
    int rto_max_ms;                     // 0 = 200: losses here are random, not congestion; a peer that
                                        // stays silent is the heartbeats' business, not this layer's
    bool no_thread;                     // no background sender: retransmission only inside calls (tests)
} comm_rel_opts_t;

// Replaces *c by a comm that owns the old one and delivers over it reliably (above). Rank and size
// are the inner comm's, the name "<inner>+rel". Every rank of a world must be wrapped (an unwrapped
// receiver would see the header as an extra frame). 0, or MLM_ENOMEM / MLM_EINVAL with err (then
// *c is unchanged and still the caller's).
int comm_rel_wrap(comm_t **c, const comm_rel_opts_t *o, char *err, size_t errlen);

// The comm a rel wrapper wraps, or NULL when c is not one. Borrowed like c.
comm_t *comm_rel_inner(const comm_t *c);

// Undoes comm_rel_wrap: *c becomes the inner comm; what the wrapper held is discarded. 0, or
// MLM_EINVAL (*c is not a rel wrapper; nothing changes).
int comm_rel_unwrap(comm_t **c);

typedef struct {
    uint64_t sent;                      // messages sent (first copies)
    uint64_t resent;                    // copies sent again after their timeout
    uint64_t acks;                      // header-only acknowledgements sent
    uint64_t dups;                      // duplicates received and discarded
    uint64_t held;                      // messages that arrived early and were held
    uint64_t delivered;                 // messages delivered to the caller
    double srtt_ms;                     // smoothed round trip over all peers measured (0 = none yet)
    double rto_ms;                      // the largest current timeout over the peers
} comm_rel_stats_t;

// What the wrapper has done so far (all zero when c is not a rel wrapper).
void comm_rel_stats(const comm_t *c, comm_rel_stats_t *out);

#endif
