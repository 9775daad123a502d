// Fault injection: fault schedules parsed from text, and a comm wrapper that emulates per-link delay, jitter, bandwidth, loss and drops.
#ifndef MESHLM_FAULT_H
#define MESHLM_FAULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"

// --- fault specs
//
// A spec is text: comma-separated rules, each `kind:key=value:key=value`, for example
//   delay:link=0-1:ms=40:jitter=5,bw:link=*:mbit=100,drop:link=1-3:p=0.05,kill:worker=2:after_tokens=5,seed=7
// Enforced by the transport (comm_fault_wrap over any comm, the control link too), on messages of a link:
//   delay:link=L:ms=X[:jitter=Y]   one-way delay X ms plus a uniform 0..Y ms (Y default 0)
//   bw:link=L:mbit=R               R Mbit/s: a message of n bytes occupies its direction of the link for
//                                  n*8/R us, and messages on one direction queue behind each other
//   loss:link=L:p=P[:rto_ms=R]     TCP-like loss: with probability P a message arrives late by the
//                                  retransmission timeout R ms (default 200); it is not lost
//   drop:link=L:p=P                with probability P the message is discarded (its receiver times out)
//   seed=N                         seed of the random decisions (default 0; at most once)
// Stored for the fault schedule (fault_event), not enforced here:
//   kill:worker=N:after_tokens=K            the worker dies after K generated tokens
//   freeze:worker=N:after_tokens=K:ms=M     the worker stops for M ms after K generated tokens
//   partition:link=L:after_tokens=K         the link carries nothing after K generated tokens
// Links are undirected: L is `A-B` (ranks A != B), `A-*` (every link of A) or `*` (every link).
// Ranks are those of the data plane: the coordinator is rank 0, workers 1..N. When several rules
// of one kind match a link the most specific wins (A-B over A-* over *), among equals the last.
// Numbers: ranks, worker, after_tokens and seed are decimal integers; ms, jitter, mbit, rto_ms and
// p are decimal reals (ms, jitter, rto_ms in [0, 3600000], mbit > 0, p in [0, 1]). Spaces around
// rules are ignored. The empty text is a valid spec without rules.
//
// Every random decision (drop, loss, jitter) of the n-th message (n = 0, 1, ...) from rank s to rank
// d is a pure function of (seed, s, d, n) (fault_decide): the same spec and seed make the same
// decisions every run, whatever the timing.

// Typical use, on every rank right after its comm and link are made:
//   fault_spec_t *spec = NULL;                       // coordinator: fault_from_env; workers: fault_parse
//   if (fault_from_env(&spec, err, sizeof err) != 0) ...;          //   of the text the coordinator sent
//   comm_fault_wrap(&comm, spec, err, sizeof err);   // data plane (nothing happens when spec is NULL)
//   comm_fault_wrap(&ctl, spec, err, sizeof err);    // control link, once the HELLOs are answered
//   ... hand fault_spec_text(spec) to the workers; fault_event(spec, i) drives kill/freeze/partition ...
//   fault_free(&spec);                               // the comm and the link keep what they need

typedef struct fault_spec fault_spec_t;

#define FAULT_ANY (-1)              // `*` in a link

// Rule kinds. Values are only appended.
typedef enum {
    FAULT_DELAY = 1,
    FAULT_BW = 2,
    FAULT_LOSS = 3,
    FAULT_DROP = 4,
    FAULT_KILL = 5,
    FAULT_FREEZE = 6,
    FAULT_PARTITION = 7,
} fault_kind_t;

// A scheduled event (kill, freeze, partition), in the order of the text.
typedef struct {
    fault_kind_t kind;              // FAULT_KILL, FAULT_FREEZE or FAULT_PARTITION
    int worker;                     // kill, freeze: the worker's rank; else -1
    int a, b;                       // partition: link ends (a < b; b or both FAULT_ANY for `A-*`, `*`); else -1
    int64_t after_tokens;           // fires once this many tokens have been generated
    double ms;                      // freeze: how long; else 0
} fault_event_t;

// Effective parameters of one link (the same in both directions); zeros mean "no such fault".
typedef struct {
    double delay_ms;                // one-way delay
    double jitter_ms;               // plus a uniform 0..jitter_ms
    double mbit;                    // bandwidth in Mbit/s; 0 = not limited
    double loss_p;                  // probability that a message is late by rto_ms
    double rto_ms;                  // retransmission timeout of a "lost" message (200 unless set)
    double drop_p;                  // probability that a message is discarded
} fault_link_t;

// The random decisions for one message.
typedef struct {
    bool drop;                      // discarded
    bool lost;                      // arrives late by rto_ms
    double jitter_ms;               // extra delay in [0, jitter_ms)
} fault_decision_t;

// Parses text into a new spec (*out, caller frees with fault_free). On failure returns MLM_EINVAL
// (MLM_ENOMEM) with err naming the rule (its 1-based index and text) and what is wrong; *out is
// then NULL. err may be NULL.
int fault_parse(const char *text, fault_spec_t **out, char *err, size_t errlen);

// Reads $MESHLM_FAULTS. Unset or blank: *out = NULL and 0. Otherwise as fault_parse (the error
// names the variable).
int fault_from_env(fault_spec_t **out, char *err, size_t errlen);

// Frees a spec; accepts NULL and NULLs the pointer.
void fault_free(fault_spec_t **self_p);

// Canonical text of the spec: rules in their order, numbers in their shortest exact form, links as
// `A-B` with A < B, the defaults spelled out, `seed=N` last when set. fault_parse of it gives the
// same spec (and the same text), so a coordinator can hand it to workers. Borrowed until fault_free;
// "" for NULL.
const char *fault_spec_text(const fault_spec_t *s);

uint64_t fault_seed(const fault_spec_t *s);                 // 0 when unset or s is NULL
bool fault_has_link_rules(const fault_spec_t *s);           // any delay, bw, loss or drop rule

// Effective parameters of the link between ranks a and b (order does not matter). s NULL or no
// matching rule: all zero except rto_ms = 200.
void fault_link_params(const fault_spec_t *s, int a, int b, fault_link_t *out);

// Scheduled events (kill, freeze, partition). fault_event returns NULL out of range; borrowed until fault_free.
int fault_n_events(const fault_spec_t *s);
const fault_event_t *fault_event(const fault_spec_t *s, int i);

// The decisions for message number `counter` (0-based, in send order) from rank src to rank dst.
// Pure: depends only on the seed, the link's parameters, src, dst and counter.
void fault_decide(const fault_spec_t *s, int src, int dst, uint64_t counter, fault_decision_t *out);

const char *fault_kind_name(fault_kind_t k);                // "delay", "bw", ...; "?" if unknown

// --- the receive-side model of one direction (used by the comm wrapper and the control link)
//
// A sender appends a stamp: FAULT_STAMP_BYTES = 8-byte magic + u64 little-endian CLOCK_MONOTONIC
// nanoseconds of the send. When the message already has COMM_MAX_FRAMES frames the stamp is
// appended to the bytes of the last frame instead (another magic tells the two forms apart).
// The receiver strips it and holds the message until
//   due = max(min(stamp, now) + delay + jitter [+ rto if lost], due of the previous message) [+ bytes*8/mbit us]
// so one direction is FIFO (a jittered message never overtakes an earlier one) and a bandwidth-
// limited link serializes. min(stamp, now) means a stamp from the future (a clock that is not
// shared, or a hostile peer) cannot hold a message longer than the delay itself.
// CLOCK_MONOTONIC is shared by all processes of one machine, network namespaces included: the
// emulation is meant for an emulated LAN on one machine (local workers, or namespaces with veth
// pairs). Across real machines the stamps are meaningless and the receiver falls back to arrival
// time (stamp > now), or to no delay at all (stamp far in the past).

#define FAULT_STAMP_BYTES 16

typedef struct {
    fault_link_t p;                 // parameters of the link
    uint64_t seed;                  // the spec's seed
    int src, dst;                   // sender and receiver rank
    uint64_t count;                 // messages admitted so far (the decisions' counter)
    int64_t last_due;               // due time of the previous message, ns (FIFO, serialization)
    uint64_t dropped;               // messages discarded so far
    uint64_t late;                  // messages "lost" (late by rto) so far
} fault_path_t;

// Monotonic nanoseconds (CLOCK_MONOTONIC), the clock of the stamps.
int64_t fault_now_ns(void);

// Frames to put on the wire for frames[0..n) plus a stamp of now: fills out (at most
// COMM_MAX_FRAMES entries; stamp is storage for the stamp frame) and returns their count, or
// MLM_EINVAL (n out of 0..COMM_MAX_FRAMES) / MLM_ENOMEM. With n == COMM_MAX_FRAMES the last frame is
// copied with the stamp behind it into *merged (caller frees; NULL otherwise).
int fault_stamp_frames(const comm_iov_t *frames, int n, comm_iov_t out[COMM_MAX_FRAMES],
                       uint8_t stamp[FAULT_STAMP_BYTES], void **merged);

// comm_send of frames[0..n) plus a stamp of now (fault_stamp_frames): what a faulty sender puts
// on the wire. comm_send's codes, or MLM_EINVAL / MLM_ENOMEM.
int fault_send_stamped(comm_t *c, int peer, const comm_iov_t *frames, int n, int timeout_ms);

// Removes a trailing stamp (either form) from m and returns true with *stamp_ns set; returns false
// and leaves m as it is when m carries none (wrong size or magic).
bool fault_stamp_strip(comm_msg_t *m, int64_t *stamp_ns);

// Prepares the path of messages from src to dst under spec s (NULL: no faults).
void fault_path_init(fault_path_t *pa, const fault_spec_t *s, int src, int dst);

// Admits the next message of the path (bytes of user frames, stamp_ns < 0 for an unstamped one,
// taken at now_ns): returns the time it is due (ns, CLOCK_MONOTONIC), or -1 if it is dropped.
int64_t fault_path_admit(fault_path_t *pa, int64_t stamp_ns, size_t bytes, int64_t now_ns);

// --- the comm wrapper

// Replaces *c by a comm that owns the old one and emulates the spec's link rules on every message
// it receives (see above); rank and size are the inner comm's, the name is "<inner>+fault". Sends
// add a stamp; receives strip it and hold the message until it is due; dropped messages vanish
// (the receiver sees MLM_ETIMEOUT). Messages from one peer keep their order; recv(COMM_ANY) returns
// the held message that is due first; a deadline is kept: if nothing is due by then the call
// returns MLM_ETIMEOUT and the held messages stay for a later call. A message without a valid stamp
// is delivered as it is, timed from its arrival. The collectives of comm.c run over the wrapper's
// send/recv, so they see the delays.
// Every rank of the world must be wrapped with the same spec (an unwrapped receiver would see the
// stamp as an extra frame). Wrap right after creating the comm, before any collective or comm_set_*
// call (those settings live on the outer comm). spec is read during the call only. No threads are
// added; the comm is used from one thread at a time, like any other.
// spec NULL: *c is left as it is and 0 is returned. Otherwise 0, or MLM_EINVAL / MLM_ENOMEM with err
// filled and *c unchanged (still the caller's).
int comm_fault_wrap(comm_t **c, const fault_spec_t *spec, char *err, size_t errlen);

// Undoes comm_fault_wrap: when *c is a fault wrapper, replaces it by the comm it wraps and frees
// the wrapper (messages it still held are discarded). An end switches the emulation off this way,
// e.g. a worker that answers a new coordinator's HELLO plainly, then wraps again with the new spec
// and rank. 0, or MLM_EINVAL (*c is not a fault wrapper; nothing changes).
//
// The control link (transport/comm_link.h) is emulated the same way: the coordinator wraps its
// link comm (ranks 0..n) once every worker has answered its HELLO; a worker calls
// comm_link_set_rank with the rank the HELLO named, answers plainly, then wraps. A message without
// a stamp (the HELLO) is delivered as it is by a wrapped receiver.
int comm_fault_unwrap(comm_t **c);

#endif
