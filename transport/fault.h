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
//   drop:link=L:p=P                with probability P the message is discarded: a reliable wrapper
//                                  (fault_wrap_opts_t.reliable, every cluster link) sends it again after
//                                  its retransmission timeout; a raw one loses it (its receiver times out)
//   ...[:T[:for_ms=M]]             any of these four with a trigger T is in force only from T on, for M ms
//                                  (without for_ms: to the end of the run); without one, all along
//   partition:link=L:T[:ms=M]      from trigger T on, for M ms (without ms: to the end of the run), the
//                                  link carries nothing in either direction; an end that was given a
//                                  heartbeat (comm_fault_wrap_opts) also loses the peer once the cut
//                                  has lasted that long, as a real connection's heartbeat would
// Carried out by the fault scheduler (cluster/faultsched.h) on local worker processes:
//   kill:worker=N:T                     SIGKILL
//   freeze:worker=N:T:ms=M              SIGSTOP, and SIGCONT M ms later
//   slow:worker=N:factor=F[:T][:ms=M]   the worker runs 1/F of the time (its compute takes F times as
//                                       long) from T (default: the start) for M ms (default: to the end)
// Stored for the worker's disk I/O (fault_disk), not enforced here:
//   disk:worker=N:slow=F                its disk reads and writes take F times as long (a write at
//                                       least F times its bytes at 1 GB/s)
//   disk:worker=N:full                  its disk is full (writes fail with "no space")
// Triggers T: `after_tokens=K` (once K tokens have been generated in the run) or `at_ms=T` (T ms
// after the schedule starts). Other entries: `seed=N` (the random decisions, default 0) and
// `board=PATH` (the file through which a scheduler announces event windows to every process of the
// run, see the board below; written by the scheduler, not by hand); each at most once.
// Links are undirected: L is `A-B` (ranks A != B), `A-*` (every link of A) or `*` (every link).
// Ranks name nodes: the coordinator is 0 and the workers 1..N in the order the coordinator was
// given them (their control-link ranks); a data plane's wrapper learns which node each of its
// ranks is (see comm_fault_wrap), so a rule keeps naming the same workers after a re-plan.
// Worker N is 1..N; `worker=*` in kill, freeze and slow is one worker chosen by the seed
// (fault_pick_worker), in disk every worker. When several link (disk) rules of one kind match the
// most specific wins (A-B over A-* over *; worker=N over *), among equals the last.
// Numbers: ranks, worker, after_tokens and seed are decimal integers; ms, at_ms, jitter, mbit,
// rto_ms, factor, slow and p are decimal reals (ms, at_ms, jitter, rto_ms in [0, 3600000], mbit > 0,
// p in [0, 1], factor and slow in [1, 100]). Spaces around rules are ignored. The empty text is a
// valid spec without rules. At most FAULT_MAX_EVENTS events (kill, freeze, partition, slow, and link
// rules with a trigger). Windows (partitions, link rules with a trigger) need the board: a process
// that cannot map it enforces none of them.
//
// Every random decision (drop, loss, jitter) of the n-th message (n = 0, 1, ...) from node s to
// node d is a pure function of (seed, s, d, n) (fault_decide): the same spec and seed make the same
// decisions every run, whatever the timing. n counts the messages of one channel (the control link,
// or the data planes) since the spec was parsed: a data plane made for a new plan goes on counting,
// so a replay after a drop does not meet the same drop again.

// Typical use, on every rank right after its comm and link are made:
//   fault_spec_t *spec = NULL;                       // coordinator: fault_from_env; workers: fault_parse
//   if (fault_from_env(&spec, err, sizeof err) != 0) ...;          //   of the text the coordinator sent
//   comm_fault_wrap(&comm, spec, err, sizeof err);   // data plane (nothing happens when spec is NULL)
//   comm_fault_wrap(&ctl, spec, err, sizeof err);    // control link, once the HELLOs are answered
//   ... hand fault_spec_text(spec) to the workers; a scheduler carries out kill/freeze/slow ...
//   fault_free(&spec);                               // the comm and the link keep what they need

typedef struct fault_spec fault_spec_t;

#define FAULT_ANY (-1)              // `*` in a link or worker
#define FAULT_MAX_EVENTS 256        // events in one spec (each has a board slot)

// Rule kinds. Values are only appended.
typedef enum {
    FAULT_DELAY = 1,
    FAULT_BW = 2,
    FAULT_LOSS = 3,
    FAULT_DROP = 4,
    FAULT_KILL = 5,
    FAULT_FREEZE = 6,
    FAULT_PARTITION = 7,
    FAULT_SLOW = 8,
    FAULT_DISK = 9,
} fault_kind_t;

// A scheduled event, in the order of the text: a kill, freeze, partition or slow, or a link rule
// (delay, bw, loss, drop) with a trigger, whose window the scheduler opens.
typedef struct {
    fault_kind_t kind;              // FAULT_KILL, FAULT_FREEZE, FAULT_PARTITION, FAULT_SLOW, or a link kind
    int worker;                     // kill, freeze, slow: the worker (1..; FAULT_ANY = chosen by the seed); else -1
    int a, b;                       // partition, link rules: link ends (a < b; b or both FAULT_ANY for `A-*`, `*`); else -1
    int64_t after_tokens;           // fires once this many tokens have been generated; -1 when at_ms triggers it
    double ms;                      // how long: freeze; partition, slow and link rules' for_ms (0 = to the end of the run)
    double at_ms;                   // fires this long after the schedule starts; -1 when after_tokens triggers it
    double factor;                  // slow: compute takes this many times as long; else 0
    int slot;                       // its index among the events: its slot on the board
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

// A worker's disk (disk rules); slow 1 and full false mean "no such fault".
typedef struct {
    double slow;                    // reads and writes take this many times as long
    bool full;                      // writes fail: no space left
} fault_disk_t;

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
// `A-B` with A < B, the defaults spelled out, then `board=PATH` and `seed=N` last when set.
// fault_parse of it gives the same spec (and the same text), so a coordinator can hand it to
// workers. Borrowed until fault_free or the next fault_set_*; "" for NULL.
const char *fault_spec_text(const fault_spec_t *s);

uint64_t fault_seed(const fault_spec_t *s);                 // 0 when unset or s is NULL
const char *fault_board_path(const fault_spec_t *s);        // board=PATH, or NULL
// Whether the transport has anything to do: a delay, bw, loss, drop or partition rule (both ends of
// every link must then be wrapped).
bool fault_has_link_rules(const fault_spec_t *s);

// Set the seed (seed=N) and the board (board=PATH: an absolute path without spaces or commas, at
// most 255 bytes; NULL removes it); the text follows. 0, or MLM_EINVAL / MLM_ENOMEM (s unchanged).
int fault_set_seed(fault_spec_t *s, uint64_t seed);
int fault_set_board(fault_spec_t *s, const char *path);

// A new spec (*out, caller frees) with what concerns nodes 0..n_workers only: rules naming a worker
// or a link end beyond n_workers are left out (`*` stays), the seed and the board stay. For running
// one schedule on fewer workers. 0, or MLM_ENOMEM / MLM_EINVAL.
int fault_restrict(const fault_spec_t *s, int n_workers, fault_spec_t **out, char *err, size_t errlen);

// Effective parameters of the link between ranks a and b (order does not matter) from the rules in
// force all along (link rules with a trigger are left out: the wrapper adds them in their windows).
// s NULL or no matching rule: all zero except rto_ms = 200.
void fault_link_params(const fault_spec_t *s, int a, int b, fault_link_t *out);

// Worker w's disk (disk rules). s NULL or no matching rule: {1, false}.
void fault_disk(const fault_spec_t *s, int worker, fault_disk_t *out);

// Scheduled events (see fault_event_t). fault_event returns NULL out of range; borrowed until fault_free.
int fault_n_events(const fault_spec_t *s);
const fault_event_t *fault_event(const fault_spec_t *s, int i);

// The worker an event with worker=* hits among workers 1..n_workers: a pure function of the seed
// and the event's index. The event's own worker when it names one; -1 for n_workers < 1.
int fault_pick_worker(const fault_spec_t *s, int event, int n_workers);

// Whether partition event e's link joins ranks x and y (order does not matter).
bool fault_event_cuts(const fault_event_t *e, int x, int y);

// The decisions for message number `counter` (0-based, in send order) from rank src to rank dst.
// Pure: depends only on the seed, the link's parameters, src, dst and counter.
void fault_decide(const fault_spec_t *s, int src, int dst, uint64_t counter, fault_decision_t *out);

const char *fault_kind_name(fault_kind_t k);                // "delay", "bw", ...; "?" if unknown

// This process's node number (0 = coordinator, worker N = N), which wrappers of s use as their own
// rank in the rules (and announce to their peers, see comm_fault_wrap). A wrapper over a control
// link records its rank here itself; call this where no control link tells it. -1 = not known.
void fault_set_identity(fault_spec_t *s, int identity);
int fault_identity(const fault_spec_t *s);

// --- the board: event windows every process of one machine sees
//
// A small file (FAULT_BOARD_BYTES) that the scheduler maps read-write and every wrapper of a spec
// with `board=PATH` maps read-only: for each event slot, the CLOCK_MONOTONIC time its window opens
// and closes. The scheduler opens a partition's window when its trigger fires (after a token count
// only it sees, or at a time), and both ends of the link then drop its messages alike. A process
// that cannot map the board (another machine) enforces no windows. Layout (little-endian): magic
// "MLMBOARD", u32 version 1, u32 slots (FAULT_MAX_EVENTS), then slots x i64 start ns (0 = not open),
// then slots x i64 end ns (INT64_MAX = open-ended).

typedef struct fault_board fault_board_t;
#define FAULT_BOARD_BYTES (16 + 16 * FAULT_MAX_EVENTS)

// Creates a board file from a mkstemp template (ending in XXXXXX; the chosen name is
// fault_board_file), every window closed, mapped read-write. 0, or MLM_EIO / MLM_EINVAL / MLM_ENOMEM
// with err. The creator's fault_board_destroy removes the file.
int fault_board_create(fault_board_t **out, const char *path_template, char *err, size_t errlen);

// Maps an existing board read-only. 0, or MLM_EIO (cannot open or map) / MLM_EFORMAT (not a board).
int fault_board_open(fault_board_t **out, const char *path, char *err, size_t errlen);

// Unmaps (and for the creator removes the file); accepts NULL, NULLs the pointer.
void fault_board_destroy(fault_board_t **self_p);

const char *fault_board_file(const fault_board_t *b);     // its path; borrowed until destroy

// Opens slot's window [start_ns, end_ns) (end_ns INT64_MAX: open-ended; start_ns 0 closes it). Only
// the creator writes. 0, or MLM_EINVAL (slot out of range, or a read-only board).
int fault_board_set(fault_board_t *b, int slot, int64_t start_ns, int64_t end_ns);

// Whether slot's window contains t_ns; *start_ns (may be NULL) gets when it opened.
bool fault_board_active(const fault_board_t *b, int slot, int64_t t_ns, int64_t *start_ns);

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
// call (those settings live on the outer comm). The wrapper keeps a copy of spec (sharing its
// identity and message counters); no threads are added; the comm is used from one thread at a
// time, like any other.
// Nodes: over a control link (inner comm "link") ranks are node numbers, and the wrapper records
// its rank as the spec's identity (fault_set_identity). Over any other comm, a wrapper whose spec
// knows its identity first sends every peer a small announcement of it (one frame, consumed by the
// peer's wrapper), so rules, decisions and windows follow nodes, not ranks. Until a peer's
// announcement is in (it comes before anything else from it), no window applies to that peer; a
// peer that sends something else first knows no node, and its rank stands for it.
// spec NULL: *c is left as it is and 0 is returned. Otherwise 0, or MLM_EINVAL / MLM_ENOMEM with err
// filled and *c unchanged (still the caller's).
int comm_fault_wrap(comm_t **c, const fault_spec_t *spec, char *err, size_t errlen);

typedef struct {
    int heartbeat_ms;               // > 0: a peer whose link has been cut (partition) this long is lost:
                                    // send and recv with it fail with MLM_EPEER from then on, as a
                                    // heartbeat timeout drops a real connection; 0 = a cut only drops
    bool fail_on_any_loss;          // once any peer is lost every call fails (a plan's data plane)
    bool reliable;                  // when the spec can discard messages (drop, partition), put the
                                    // reliable layer (transport/comm_rel.h) on top: a discarded message
                                    // is sent again after a retransmission timeout, as TCP would, and
                                    // costs that timeout instead of a receiver's deadline. comm_open
                                    // ("fault:...") and the cluster's links set it; without it a drop
                                    // is lost for good (the raw model the fault tests check).
} fault_wrap_opts_t;

// comm_fault_wrap with options (o NULL = all zero). comm_open("fault:...") passes its heartbeat
// (interval + timeout) and fail_on_any_loss. Over a control link the link's own heartbeat is the
// default (comm_link_heartbeat_ms), and a peer lost to a cut is back once the cut ends, as the link
// reconnects; its workers' ends only see silence on recv (a worker cannot tell a lost coordinator
// from a quiet one) and MLM_EPEER on send. Over other comms a lost peer stays lost.
int comm_fault_wrap_opts(comm_t **c, const fault_spec_t *spec, const fault_wrap_opts_t *o, char *err, size_t errlen);

// When c is a fault wrapper: the comm it wraps, with *peer_lost telling whether the wrapper has
// lost peer to a partition; otherwise c itself and *peer_lost false. Borrowed like c.
const comm_t *comm_fault_inner(const comm_t *c, int peer, bool *peer_lost);

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
