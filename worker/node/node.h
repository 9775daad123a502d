// The node executor: answers a coordinator, loads its shard, computes its part of every step. ZeroMQ
// workers, MPI ranks and in-process test nodes run this same state machine over the same messages.
#ifndef MESHLM_NODE_H
#define MESHLM_NODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cluster/profile.h"
#include "parallel/shard.h"
#include "transport/comm.h"
#include "transport/curve.h"

// What a node is doing, for whoever watches it.
typedef enum { NODE_IDLE = 0, NODE_LOADING = 1, NODE_SERVING = 2 } node_state_t;

typedef struct {
    const char *listen;      // control endpoint (tcp://HOST:PORT or ipc:///path); data plane is next to it
    const char *model_path;  // a local copy of the model, or NULL (slices then arrive from the coordinator)
    const char *cache_dir;   // where received shards are kept (NULL = $MESHLM_CACHE or ~/.cache/meshlm)
    const char *node_id;     // name in plans (NULL = "worker-<pid>")
    int n_threads;           // 0 = all cores
    uint64_t mem_budget;     // bytes for weights + KV cache + activations (0 = unlimited), reported to the
                             // coordinator; a share that does not fit resident streams through the weight window
    const char *weights;     // weight provider by name (offload/weights.h; NULL = chosen by mem_budget)
    float expert_skip;       // MoE adaptive gating threshold (model_load_opts_t.expert_skip; 0 = off)
    int timeout_ms;          // deadline of each collective and control exchange (0 = 30000)
    const char *kv_device;   // attention/KV device (offload/attn.h) of this node's KV: wins over the plan's
                             // (NULL = the plan's, else host)
    bool verbose;            // log each message on stderr
    bool no_profile;         // skip measuring the machine at start (the planner then assumes equal speed)
    bool same_file;          // model_path is the coordinator's own file (MPI ranks): used without hashing
    comm_t *data;            // a ready data plane whose ranks are the plan's nodes in order (MPI, in-process;
                             // borrowed), or NULL: a ZeroMQ data plane is made for each plan from its endpoints
    bool exit_on_peer_loss;  // return when the control channel reports the coordinator lost (MPI, in-process)
    const profile_t *profile; // this machine's figures, measured already (then not measured again), or NULL
    const uint8_t *model_sha256; // (32) model_path's hash, computed already (then not hashed again), or NULL
    void (*on_state)(void *arg, node_state_t state); // told when the node's state changes (e.g. to publish
    void *state_arg;                                  // it in a registry), or NULL
    int heartbeat_ms;        // links (control and data) drop a peer silent this long (0 = 1000): a frozen
                             // peer is noticed, and a step waiting on the plan's nodes fails when any is lost
    const curve_conf_t *curve; // CurveZMQ (transport/curve.h): node_serve's control link admits the coordinator
                               // keys listed, and every plan's ZeroMQ data plane uses this key pair and admits
                               // only the plan's keys (a plan without keys is refused); NULL = plain
} node_opts_t;

// A SLICE_DATA message naming this tensor is a bandwidth probe: the worker answers it, like a
// HEARTBEAT, with a HEARTBEAT whose seq is the probe's plan_id (the coordinator measures links so).
#define NODE_PING_TENSOR "meshlm.ping"

// Sequences a worker keeps in flight at once (STEP seq_id 0..NODE_MAX_SEQS-1), each with its own KV cache.
#define NODE_MAX_SEQS 16

// Serves plans from the coordinator at peer 0 of the control channel *ctl (borrowed; when the HELLO
// asks for emulated links they are switched on in it) one after another until a SHUTDOWN with reason
// "exit" (returns 0) or a fatal error (negative MLM_ code, message in err). A lost peer ends the
// current plan only; a lost coordinator ends the loop only with exit_on_peer_loss.
int node_run(const node_opts_t *o, comm_t **ctl, char *err, size_t errlen);

// A worker process: listens on o->listen (the control link backend) and runs node_run on it.
int node_serve(const node_opts_t *o, char *err, size_t errlen);

// Cache file name for a model hash and a slice (under dir); an all-reduce slice's name ends in "-cols",
// a slice of placed experts's in "-x" and its expert mask in hex.
int node_cache_path(const char *dir, const uint8_t sha256[32], const shard_slice_t *slice, char *out, size_t cap);

#endif
