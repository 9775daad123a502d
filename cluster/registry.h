// The node registry: who is in the cluster (workers, standbys, coordinators), their profiles, states and heartbeats.
#ifndef MESHLM_REGISTRY_H
#define MESHLM_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cluster/profile.h"
#include "proto/msg.h"

// A registry is a store of member records opened by URL:
//   redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?prefix=P&timeout=MS]   a Redis server (hiredis)
//   mem://NAME (or NULL, "", "mem")                                     the embedded in-process store
// Redis keys, all under the prefix P (default "meshlm"):
//   P:node:<id>   the member's record (JSON, below), no TTL: it outlives the member until reaped
//   P:hb:<id>     the heartbeat key (value: the record's seq), SET ... PX ttl: gone = the member is lost
//   P:members     a set of ids (the index; nothing ever scans the keyspace)
//   P:epoch       a counter bumped by every join, leave, state change, reap and plan
//   P:plan        the coordinator's published plan (text)
// Every Redis call has a deadline (timeout, default 2000 ms, for the connect and each reply); a
// server that goes away gives MLM_EPEER or MLM_ETIMEOUT with an error naming the URL, never a hang,
// and the next call connects again. SIGPIPE is blocked around every write.
// Each mem:// open is a store of its own; registry_dup shares it (a beater thread, a second user).
// A handle is used by one thread at a time; registry_dup gives another thread a handle of its own.
// Times: a live member's age comes from its heartbeat's TTL left (the store's clock); a lost
// member's age from the wall clock of the member's last beat, so reaping across machines trusts
// their clocks to within the grace period.

// --- records

#define REGISTRY_RECORD_VERSION 1            // "v" of a record; fields are only ever added
#define REGISTRY_ID_MAX MSG_ID_MAX           // node ids, including the NUL (as in a HELLO)
#define REGISTRY_ENDPOINT_MAX MSG_ENDPOINT_MAX // control endpoints, including the NUL
#define REGISTRY_HOST_MAX 64                 // host names, including the NUL
#define REGISTRY_MAX_SPEEDS MSG_MAX_SPEEDS   // measured weight types in a profile
#define REGISTRY_RECORD_MAX 16384            // bytes of one serialized record; longer ones are malformed
#define REGISTRY_MAX_MEMBERS 1024            // records one list returns at most
#define REGISTRY_PLAN_MAX ((size_t)4 << 20)  // bytes of a published plan
#define REGISTRY_DEFAULT_TTL_MS 3000         // heartbeat TTL when a caller gives none
#define REGISTRY_DEFAULT_TIMEOUT_MS 2000     // Redis deadline when the URL gives none

// Values are only appended.
typedef enum {
    REGISTRY_ROLE_WORKER = 0,       // computes shares of plans
    REGISTRY_ROLE_STANDBY = 1,      // a spare: planned only when a worker is lost (or asked for)
    REGISTRY_ROLE_COORDINATOR = 2,  // drives requests, publishes the plan
    REGISTRY_ROLE_COUNT,
} registry_role_t;

// Values are only appended.
typedef enum {
    REGISTRY_STATE_STARTING = 0,    // joined, still measuring itself / hashing its model
    REGISTRY_STATE_IDLE = 1,        // ready, in no plan
    REGISTRY_STATE_LOADING = 2,     // loading its share of a plan
    REGISTRY_STATE_SERVING = 3,     // computing steps of a plan
    REGISTRY_STATE_DRAINING = 4,    // finishing its work before it leaves
    REGISTRY_STATE_LOST = 5,        // its heartbeat expired (reported by the store, never written by a member)
    REGISTRY_STATE_COUNT,
} registry_state_t;

typedef struct {
    int32_t type;                   // weight qtype_t (worker/kernels/quant.h)
    double gflops;                  // measured matmul GFLOP/s with that weight type
} registry_speed_t;

// The figures a HELLO carries (proto/msg.h msg_hello_t), so the coordinator can plan before it connects.
typedef struct {
    uint32_t n_cores;               // compute threads the node uses (>= 1 once measured, 0 = unknown)
    uint64_t mem_budget;            // bytes for weights + KV cache (0 = unlimited)
    int n_speeds;
    registry_speed_t speed[REGISTRY_MAX_SPEEDS]; // (n_speeds) distinct types
    uint64_t mem_bw;                // bytes/s memory bandwidth (0 = not measured)
    uint64_t disk_bw;               // bytes/s reading the model file (0 = none)
    bool has_model;                 // a local copy of the model
    uint8_t model_sha256[32];       // valid when has_model
    uint64_t model_size;            // bytes, valid when has_model
} registry_profile_t;

// One member. The fields down to ttl_ms are stored; age_ms is measured by the store when read.
typedef struct {
    char id[REGISTRY_ID_MAX];             // printable ASCII without spaces, not empty
    registry_role_t role;
    char endpoint[REGISTRY_ENDPOINT_MAX]; // control endpoint peers reach it at (may be empty for a coordinator)
    registry_state_t state;               // as written, or REGISTRY_STATE_LOST when read after its heartbeat expired
    registry_profile_t prof;
    uint64_t seq;                         // bumped by every join and beat
    int64_t beat_unix_ms;                 // the writer's wall clock at the last heartbeat (ms since 1970)
    int64_t joined_unix_ms;               // ... when it joined
    int ttl_ms;                           // its heartbeat TTL
    int32_t pid;                          // process id on its host (0 = unknown)
    char host[REGISTRY_HOST_MAX];         // its host name ("" = unknown)
    int64_t age_ms;                       // read: time since the last heartbeat (alive: as the store's
                                          // clock says, from the TTL left; lost: at least ttl_ms)
} registry_member_t;

const char *registry_role_name(registry_role_t r);    // "worker", "standby", "coordinator" ("?" otherwise)
int registry_role_from_name(const char *name);        // the role, or -1
const char *registry_state_name(registry_state_t s);  // "starting", "idle", ..., "lost" ("?" otherwise)
int registry_state_from_name(const char *name);       // the state, or -1

// Whether id is a valid member id: 1..REGISTRY_ID_MAX-1 printable ASCII characters, no spaces.
bool registry_id_valid(const char *id);

// Serializes m as one line of JSON, version REGISTRY_RECORD_VERSION. With with_age the line also
// carries "age_ms" (the parser ignores it). *out is malloc'ed (caller frees). 0, MLM_EINVAL (a field
// out of its range: bad id, role, state, counts) or MLM_ENOMEM.
int registry_record_format(const registry_member_t *m, bool with_age, char **out);

// Parses a record written by registry_record_format (of this or a later version: unknown fields
// are ignored) from len bytes of untrusted text (no NUL needed). Every field is checked: types,
// ranges, id and endpoint characters, hex digest, distinct speed types. 0 with *out filled (age_ms
// 0), or MLM_EFORMAT with the reason in err (and *out unspecified).
int registry_record_parse(const char *text, size_t len, registry_member_t *out, char *err, size_t errlen);

// Profile from this node's measurement (p may be NULL: not measured), its threads and budget.
void registry_profile_from(registry_profile_t *out, const profile_t *p, uint32_t n_cores, uint64_t mem_budget);
// Profile from a HELLO's figures, and back (the HELLO's other fields are left as they are).
void registry_profile_from_hello(registry_profile_t *out, const msg_hello_t *h);
void registry_profile_to_hello(const registry_profile_t *p, msg_hello_t *h);

// --- the interface

// A backend is a table of functions over its own context (ggml-backend style). The wrappers below
// check arguments, stamp records and do the shared logic (join conflicts, beats, reaping, watching);
// a backend only stores. Every function returns 0 or a negative MLM_ code with the reason in err.
struct registry_i {
    const char *(*name)(void *ctx);   // "redis", "mem"
    // Writes m's record and (re)arms its heartbeat for m->ttl_ms; bumps the epoch when bump.
    int (*put)(void *ctx, const registry_member_t *m, bool bump, char *err, size_t errlen);
    // Reads one record with its age_ms and state (LOST when the heartbeat is gone). MLM_ENOTFOUND when absent.
    int (*get)(void *ctx, const char *id, registry_member_t *out, char *err, size_t errlen);
    // Deletes id's record and heartbeat and bumps the epoch; MLM_ENOTFOUND when there was no record.
    int (*del)(void *ctx, const char *id, char *err, size_t errlen);
    // Every record (alive or lost), as get; *out malloc'ed (caller frees, may be NULL when *n is 0).
    // Malformed records are left out and counted in *skipped (with a reason in warn, cap bytes).
    int (*list)(void *ctx, registry_member_t **out, int *n, int *skipped, char *warn, size_t cap, char *err,
                size_t errlen);
    int (*epoch)(void *ctx, uint64_t *out, char *err, size_t errlen);
    int (*set_plan)(void *ctx, const char *text, size_t len, char *err, size_t errlen); // bumps the epoch
    // The plan (malloc'ed, NUL-terminated, caller frees); MLM_ENOTFOUND when none was published.
    int (*get_plan)(void *ctx, char **text, char *err, size_t errlen);
    // A second context on the same store (its own connection: a context is used by one thread at a time).
    int (*dup)(void *ctx, void **out, char *err, size_t errlen);
    void (*destroy)(void *ctx);
    // optional (NULL: "127.0.0.1"): the local address this process reaches the store from, e.g. to
    // advertise a worker listening on 0.0.0.0.
    int (*local_addr)(void *ctx, char *buf, size_t cap, char *err, size_t errlen);
};

typedef struct registry registry_t;

// Wraps a backend; takes ownership of ctx (iface->destroy is called by registry_destroy). url is
// copied (what registry_url returns). NULL on allocation failure (ctx is then destroyed).
registry_t *registry_new(const struct registry_i *iface, void *ctx, const char *url);

// Opens a registry by URL (see the top of this file; NULL or "" = a fresh embedded store). Redis is
// connected at once: a server that does not answer within the deadline is an error naming the URL.
// 0 with *out set (caller destroys), or MLM_EINVAL (bad URL), MLM_EPEER / MLM_ETIMEOUT / MLM_EIO
// (cannot reach or log in to the server), MLM_ENOMEM; the reason in err.
int registry_open(registry_t **out, const char *url, char *err, size_t errlen);

// A second handle on the same store with its own connection (for another thread); 0 or as registry_open.
int registry_dup(registry_t *r, registry_t **out, char *err, size_t errlen);

// Closes the handle (accepts NULL, NULLs the pointer). Members it joined stay until they leave or expire.
void registry_destroy(registry_t **self_p);

const char *registry_name(const registry_t *r);   // "redis" or "mem"
const char *registry_url(const registry_t *r);    // the URL as opened, password replaced by "***"
// The last error of a call on r ("" after a success); borrowed until the next call on r.
const char *registry_error(const registry_t *r);

// Worker side. Publishes rec (its id, role, endpoint, state other than LOST, profile, pid, host;
// seq, joined and beat times are stamped here) with a heartbeat that expires after ttl_ms (<= 0:
// REGISTRY_DEFAULT_TTL_MS). A live member of the same id at another endpoint is MLM_ESTATE (names
// taken); joining again with the same endpoint replaces the record (a restarted or updated member).
// 0, MLM_EINVAL, MLM_ESTATE or a store error.
int registry_join(registry_t *r, const registry_member_t *rec, int ttl_ms);

// Refreshes id's heartbeat (its TTL) and sets its state (not LOST); call it every ttl/3 or so. The
// record is the one this handle joined (or, when it joined through another handle, the stored one):
// a member reaped while it was frozen comes back with its next beat. 0, MLM_EINVAL, MLM_ENOTFOUND
// (never joined and not in the store) or a store error.
int registry_beat(registry_t *r, const char *id, registry_state_t state);

// Removes id's record and heartbeat. 0, MLM_ENOTFOUND (not there) or a store error. Stop its
// beater first, or the next beat publishes it again.
int registry_leave(registry_t *r, const char *id);

// Coordinator side. One member as registry_list reports it. 0, MLM_ENOTFOUND or a store error.
int registry_get(registry_t *r, const char *id, registry_member_t *out);

// Every member, sorted by id: live ones with their state and age, those whose heartbeat expired
// with state LOST (until reaped). Malformed records (someone else writing the keys) are skipped
// with one warning on stderr per new set of them (registry_skipped counts them). *members is
// malloc'ed (caller frees; NULL when *n is 0). 0 or a store error (*members NULL, *n 0).
int registry_list(registry_t *r, registry_member_t **members, int *n);

// Malformed records the last registry_list on r skipped.
int registry_skipped(const registry_t *r);

// Removes the records of members lost for longer than grace_ms (age_ms > ttl_ms + grace_ms), and
// ids in the index without a record. *removed (may be NULL) gets how many members were removed.
// 0 or a store error.
int registry_reap(registry_t *r, int grace_ms, int *removed);

// Membership epoch: a counter that changes with every join, leave, state change, reap and plan
// (a heartbeat expiring does not change it: it is seen by registry_list or the caller's own heartbeats).
int registry_epoch(registry_t *r, uint64_t *epoch);

// Waits until the epoch differs from *epoch (then stores it there and returns 0) or timeout_ms
// passes (MLM_ETIMEOUT). Polls every 50 ms. A store error ends the wait with that error.
int registry_watch(registry_t *r, uint64_t *epoch, int timeout_ms);

// The coordinator's plan, as text (at most REGISTRY_PLAN_MAX bytes); publishing bumps the epoch.
int registry_publish_plan(registry_t *r, const char *text);
// *text malloc'ed (caller frees). 0, MLM_ENOTFOUND (none published) or a store error.
int registry_get_plan(registry_t *r, char **text);

// The local address (numeric host) this process reaches the store from: "127.0.0.1" for the
// embedded store. 0 or a store error.
int registry_local_addr(registry_t *r, char *buf, size_t cap);

// --- the beater: a thread that keeps a member's heartbeat alive

typedef struct registry_beater registry_beater_t;

// Starts a thread that beats for id every period_ms (<= 0: the member's ttl / 3) through its own
// handle (registry_dup of r). id must have joined through r. While it runs, change the member's state
// or record through the beater, not through registry_beat. A failing beat is retried every period
// (one line on stderr when beats start failing and one when they succeed again). 0 with *out set,
// MLM_ENOTFOUND (id did not join through r), or as registry_dup.
int registry_beater_start(registry_beater_t **out, registry_t *r, const char *id, int period_ms);

// Sets the state published from the next beat on, which happens at once (not LOST; ignored then).
void registry_beater_set_state(registry_beater_t *b, registry_state_t state);

// Replaces the published record (same id; its profile, endpoint, role and state) at once.
// MLM_EINVAL when rec is not valid or names another id.
int registry_beater_update(registry_beater_t *b, const registry_member_t *rec);

// Beats published and failed so far, and the last failure's text (cap bytes; "" when none).
void registry_beater_stats(registry_beater_t *b, uint64_t *beats, uint64_t *failures, char *last_err, size_t cap);

// Stops the thread (within one store deadline) and frees it; accepts NULL, NULLs the pointer. The
// member stays published until it leaves or its heartbeat expires.
void registry_beater_stop(registry_beater_t **self_p);

#endif
