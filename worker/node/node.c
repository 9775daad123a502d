// The node executor: hello, plan, shard loading (local file, cache, or streamed by the coordinator), steps,
// over any control comm. ZeroMQ workers, MPI ranks and in-process test nodes all run this state machine.
#include "worker/node/node.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cluster/profile.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/fs.h"
#include "core/sha256.h"
#include "offload/attn.h"
#include "proto/msg_io.h"
#include "transport/comm_link.h"
#include "transport/comm_open.h"
#include "transport/comm_zmq.h"
#include "transport/fault.h"
#include "worker/model/model.h"
#include "worker/node/pipeline.h"

// --- types

typedef struct {
    const node_opts_t *o;
    comm_t **ctl;               // control channel (borrowed; peer 0 is the coordinator); its fault wrapper
                                // replaces it when the coordinator's HELLO asks for emulated links
    char node_id[64];
    char cache_dir[1024];
    bool have_sha;              // model_path hashed
    uint8_t sha[32];            // of model_path
    uint64_t model_size;
    // current plan
    bool planned;
    msg_plan_t plan;            // copy of the plan header (nodes below)
    msg_plan_node_t *nodes;     // (plan.n_nodes) owned copy
    int index;                  // this worker's node index
    shard_slice_t *slices;      // (plan.n_nodes) every node's slice
    model_t *model;             // this worker's shard
    model_t *kept;              // the shard of the plan before, kept after a plan ends so that the next load
                                // takes the repacked rows the two shares have in common (NULL: none)
    uint8_t kept_sha[32];       // the model kept is a share of
    model_ctx_t *ctx[NODE_MAX_SEQS]; // one KV cache per sequence in flight (seq_id), made on first use
    model_ctx_opts_t ctx_opts;  // how they are made
    comm_t *comm;               // data plane of the plan (o->data when given, else made for the plan)
    int timeout_ms;             // per exchange and control message
    pipe_node_t pipe;           // its stage, group and hand-offs
    fault_spec_t *faults;       // links to emulate, as the coordinator's HELLO said (NULL = none)
    int link_rank;              // this node's rank on the control link (from the HELLO)
    bool ctl_wrapped;           // *ctl is the fault-injecting wrapper over the channel it was given
    float *logits;              // (max rows, n_vocab) scratch for the output gather
    size_t logits_cap;          // floats
    profile_t prof;             // measured at start (n_types 0 when skipped)
} node_t;

// --- helpers

static void vlog(const node_t *n, const char *what, const char *detail) {
    if (n->o->verbose) // the time (ms, mod 10^6) lines the workers' lines up with the coordinator's faults
        fprintf(stderr, "[%s %06.0f] %s %s\n", n->node_id, fmod(mlm_now_ms(), 1e6), what, detail ? detail : "");
}

static void set_state(const node_t *n, node_state_t s) {
    if (n->o->on_state) n->o->on_state(n->o->state_arg, s);
}

// Ends the plan: contexts, data plane and plan copies go. With keep, a shard held without a memory
// budget is kept (n->kept) for the next load to take from (a recovery's re-plan mostly gives the
// survivors rows they hold); otherwise, and at a SHUTDOWN, it is freed with any shard kept before.
static void end_plan(node_t *n, bool keep) {
    char streamed[256];
    if (n->o->verbose && n->model && weights_read_summary(model_weights(n->model), streamed, sizeof streamed) > 0)
        vlog(n, "weights streamed:", streamed);
    for (int i = 0; i < NODE_MAX_SEQS; i++) model_ctx_destroy(&n->ctx[i]);
    if (!keep || n->model) model_destroy(&n->kept);
    if (keep && n->model && !n->o->mem_budget) {
        n->kept = n->model;
        memcpy(n->kept_sha, n->plan.model_sha256, sizeof n->kept_sha);
        n->model = NULL;
    }
    model_destroy(&n->model);
    pipe_node_free(&n->pipe);
    if (n->comm != n->o->data) comm_destroy(&n->comm);
    n->comm = NULL;
    free(n->nodes);
    free(n->slices);
    free(n->logits);
    n->nodes = NULL;
    n->slices = NULL;
    n->logits = NULL;
    n->logits_cap = 0;
    n->planned = false;
    // What the plan freed goes back to the system, not only to the heap: under a memory budget the
    // next share is sized to the budget, and freed heap pages still count against the node's memory
    // cgroup (a survivor of a loss was killed for 35 MB of them).
    if (n->o->mem_budget) malloc_trim(0);
}

// An ERROR about step (0: none); lost_node names the plan node the step lost on the data plane
// (-1: none), so the coordinator can put a cut link's blame on one of its ends.
static int send_error_lost(node_t *n, int code, const char *text, uint64_t step, int lost_node) {
    msg_t m;
    msg_init(&m, MSG_ERROR);
    m.error.lost_node = lost_node;
    m.error.code = code < 0 ? code : MLM_EPROTO;
    snprintf(m.error.text, sizeof m.error.text, "%.60s: %.400s", n->node_id, text);
    m.error.step_id = step;
    char err[256];
    return msg_send(*n->ctl, 0, &m, n->timeout_ms, err, sizeof err);
}

static int send_error(node_t *n, int code, const char *text, uint64_t step) { // text is cut to fit
    return send_error_lost(n, code, text, step, -1);
}

// A node's slice in a plan: in all-reduce mode every computing node cuts attn_output and ffn_down
// by columns (the coordinator's slices say the same, cluster.c).
static shard_slice_t slice_of(const msg_plan_node_t *p, msg_tp_mode_t mode) {
    shard_slice_t s = {p->heads.begin, p->heads.end, p->kv_heads.begin, p->kv_heads.end, p->hidden.begin,
                       p->hidden.end, 0, 0, p->vocab.begin, p->vocab.end, p->layers.begin, p->layers.end, 0, 0, {0}};
    if (p->n_ffn > 0) s.f0 = p->ffn[0].begin, s.f1 = p->ffn[0].end;
    s.cols = mode == MSG_TP_ALLREDUCE && s.l1 > s.l0;
    // placed experts: the slice holds its experts only (a shard file streamed to it has just their planes)
    if ((mode == MSG_TP_EXPERT || mode == MSG_TP_EXPERT_LEAD) && s.l1 > s.l0) {
        shard_set_experts(&s, p->experts, (int)p->n_experts);
        for (int j = 0; j < p->n_block_experts; j++) shard_add_expert(&s, (int)(p->block_experts[j] & 255u));
    }
    return s;
}

// This worker's disk as the fault spec says (disk:worker=N:slow=F, disk:worker=N:full; N is its
// control-link rank). {1, false} without a spec or a rule.
static fault_disk_t disk_of(const node_t *n) {
    fault_disk_t d;
    fault_disk(n->faults, n->link_rank, &d);
    return d;
}

// A disk that a write of shard data goes to at least as slowly as: the page cache takes small writes
// far faster than a disk, so a factor of only the measured time slows them by next to nothing.
#define DISK_REF_BYTES_PER_MS 1e6 // 1 GB/s

// A slow disk: an operation on shard data that took ms (measured) takes F times as long; one that
// wrote bytes (0 for a read) counts as at least as long as the bytes took at DISK_REF_BYTES_PER_MS.
static void disk_wait(const node_t *n, double ms, double bytes) {
    const double f = disk_of(n).slow;
    if (f <= 1 || ms < 0) return;
    const double base = fmax(ms, bytes / DISK_REF_BYTES_PER_MS);
    const double extra = f * base - ms;
    if (extra <= 0) return;
    struct timespec ts = {(time_t)(extra / 1000), (long)(fmod(extra, 1000.0) * 1e6)};
    nanosleep(&ts, NULL);
}

// Emulated links on the control channel, as the coordinator's HELLO asked: the channel takes the rank
// the coordinator gave it (a link comm learns it only now) and is wrapped by the fault-injecting
// transport. plain_ctl takes the wrapper off again, so a new coordinator is greeted plainly.
static void plain_ctl(node_t *n) {
    if (n->ctl_wrapped) comm_fault_unwrap(n->ctl);
    n->ctl_wrapped = false;
}

static int ctl_faults(node_t *n, char *err, size_t errlen) {
    if (!fault_has_link_rules(n->faults)) return 0;
    comm_link_set_rank(*n->ctl, n->link_rank); // MLM_EINVAL for other backends, whose rank is fixed
    const fault_wrap_opts_t wo = {.reliable = true}; // drops on the control link are sent again
    int rc = comm_fault_wrap_opts(n->ctl, n->faults, &wo, err, errlen);
    n->ctl_wrapped = rc == 0;
    return rc;
}

static int on_hello(node_t *n, const msg_hello_t *from) {
    // The coordinator decides which faults every link of the run emulates.
    char err[256];
    fault_free(&n->faults);
    n->link_rank = from->link_rank;
    plain_ctl(n); // the HELLO answer travels plain, like the HELLO
    if (from->faults[0] && fault_parse(from->faults, &n->faults, err, sizeof err) != 0) {
        vlog(n, "bad fault spec from the coordinator:", err);
        return send_error(n, MLM_EINVAL, err, 0);
    }
    msg_t m;
    msg_init(&m, MSG_HELLO);
    msg_hello_t *h = &m.hello;
    snprintf(h->node_id, sizeof h->node_id, "%s", n->node_id);
    h->role = MSG_ROLE_WORKER;
    snprintf(h->endpoint, sizeof h->endpoint, "%s", n->o->listen ? n->o->listen : "");
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    h->n_cores = (uint32_t)(n->o->n_threads > 0 ? n->o->n_threads : (cores > 0 ? cores : 1));
    h->ram_budget_bytes = n->o->mem_budget;
    h->n_speeds = n->prof.n_types < MSG_MAX_SPEEDS ? n->prof.n_types : MSG_MAX_SPEEDS;
    for (int i = 0; i < h->n_speeds; i++) h->speeds[i] = (msg_speed_t){n->prof.type[i], (float)n->prof.gflops[i]};
    h->mem_bw_bytes_s = (uint64_t)n->prof.mem_bw;
    h->disk_read_bw_bytes_s = (uint64_t)n->prof.disk_bw;
    h->has_model = n->have_sha;
    if (n->have_sha) {
        memcpy(h->model_sha256, n->sha, 32);
        h->model_size = n->model_size;
    }
    int rc = msg_send(*n->ctl, 0, &m, n->timeout_ms, err, sizeof err); // the answer travels plain, like the HELLO
    if (rc == 0 && (rc = ctl_faults(n, err, sizeof err)) != 0) vlog(n, "cannot emulate the links:", err);
    return rc;
}

// Link measurement: a heartbeat (or a ping payload) is answered at once with a heartbeat
// carrying the same sequence number.
static int on_ping(node_t *n, uint64_t seq) {
    msg_t m;
    msg_init(&m, MSG_HEARTBEAT);
    snprintf(m.heartbeat.node_id, sizeof m.heartbeat.node_id, "%s", n->node_id);
    m.heartbeat.seq = seq;
    m.heartbeat.unix_ms = (uint64_t)time(NULL) * 1000u;
    char err[256];
    return msg_send(*n->ctl, 0, &m, n->timeout_ms, err, sizeof err);
}

// The attention/KV device of this node's KV: its own --kv-device, else the plan's, else NULL (host).
static const char *kv_device(const node_t *n) {
    if (n->o->kv_device && *n->o->kv_device) return n->o->kv_device;
    return n->plan.kv_device[0] ? n->plan.kv_device : NULL;
}

// Makes the node's attention/KV device once and drops it: a name or an argument it refuses (an
// unknown preset, a directory that is not there) fails the load with the reason, not the first step.
static int probe_kv_device(node_t *n, char *err, size_t errlen) {
    const shard_slice_t *sl = model_slice(n->model);
    const model_hparams_t *hp = model_hparams(n->model);
    if (sl->h1 <= sl->h0 || !kv_device(n)) return 0; // no attention here, or the host device
    const attn_params_t ap = {.n_layer = sl->l1 - sl->l0, .head_dim = hp->head_dim, .n_head = hp->n_head,
                              .n_head_kv = hp->n_head_kv, .h0 = sl->h0, .h1 = sl->h1, .kv0 = sl->kv0, .kv1 = sl->kv1,
                              .kv_type = n->plan.kv_type == QT_F32 || n->plan.kv_type == QT_Q8_0 ? (qtype_t)n->plan.kv_type : QT_F16,
                              .n_seq_max = 1};
    attn_dev_t *d = NULL;
    char e2[400];
    int rc = attn_dev_new(&d, kv_device(n), &ap, e2, sizeof e2);
    attn_dev_free(&d);
    return rc ? mlm_fail(err, errlen, rc, "attention device %s: %s", kv_device(n), e2) : 0;
}

static int on_plan(node_t *n, const msg_plan_t *p) {
    end_plan(n, true);
    n->plan = *p;
    n->nodes = malloc((size_t)p->n_nodes * sizeof *n->nodes);
    n->slices = malloc((size_t)p->n_nodes * sizeof *n->slices);
    if (!n->nodes || !n->slices) return MLM_ENOMEM;
    memcpy(n->nodes, p->nodes, (size_t)p->n_nodes * sizeof *n->nodes);
    n->plan.nodes = n->nodes;
    n->index = -1;
    for (int i = 0; i < p->n_nodes; i++) {
        n->slices[i] = slice_of(&n->nodes[i], p->tp_mode);
        if (strcmp(n->nodes[i].node_id, n->node_id) == 0) n->index = i;
    }
    if (n->index < 0) return send_error(n, MLM_EINVAL, "this node is not in the plan", 0), MLM_EINVAL;
    n->planned = true;
    vlog(n, "plan", "received");
    return 0;
}

// Whether a LOAD_SHARD, STEP or shard chunk of plan plan_id belongs to another plan than this node's (protocol
// 1.5; 0 = an older coordinator, which does not say): then it is ignored, and said so.
static bool other_plan(const node_t *n, uint64_t plan_id, const char *what) {
    if (!plan_id || plan_id == n->plan.plan_id) return false; // (the last plan's id stays after it ends)
    fprintf(stderr, "[%s] ignoring %s of plan %016llx (this node's plan: %016llx)\n", n->node_id, what,
            (unsigned long long)plan_id, (unsigned long long)n->plan.plan_id);
    return true;
}

// A worker with a memory budget paces the shard it receives: the ENOTFOUND ack's `bytes` tells the
// coordinator how far it may send ahead of what the worker has written (a credit of budget / 8, within
// these bounds), and each half credit written is waited for on the disk, dropped from the page cache
// and acknowledged with a HEARTBEAT whose seq is the bytes written. Queued chunks and cached pages of
// a shard larger than the budget (which the worker's memory cgroup counts) stay within the credit.
#define SHARD_CREDIT_MIN (8u << 20)
#define SHARD_CREDIT_MAX (64u << 20)

static uint64_t shard_credit(const node_t *n) {
    const uint64_t b = n->o->mem_budget / 8;
    if (!n->o->mem_budget) return 0; // no budget: no pacing
    return b < SHARD_CREDIT_MIN ? SHARD_CREDIT_MIN : b > SHARD_CREDIT_MAX ? SHARD_CREDIT_MAX : b;
}

// Writes back bytes [from, to) of f and drops them from the page cache.
static void shard_flush(FILE *f, int64_t from, int64_t to) {
    fflush(f);
    const int fd = fileno(f);
    (void)sync_file_range(fd, from, to - from,
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    (void)posix_fadvise(fd, from, to - from, POSIX_FADV_DONTNEED);
}

// Receives the shard file as SLICE_DATA chunks into path (through a temporary name). Returns the
// bytes received, or a negative code with the reason (naming the file and the system's error) in err.
static int64_t receive_shard(node_t *n, const char *path, char *err, size_t errlen) {
    const uint64_t credit = shard_credit(n);
    char tmp[1200], e2[256];
    snprintf(tmp, sizeof tmp, "%s.part%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) return mlm_fail(err, errlen, MLM_EIO, "cannot create %s: %s", tmp, strerror(errno));
    int64_t got = 0, total = -1, flushed = 0;
    int rc = 0, wrc = 0; // wrc: the first write failure; the rest of the stream is still taken off the link
    const bool full = disk_of(n).full;
    while (rc == 0 && (total < 0 || got < total)) {
        msg_t m;
        comm_msg_t raw;
        rc = msg_recv(*n->ctl, 0, &m, &raw, NULL, n->timeout_ms, e2, sizeof e2);
        if (rc != 0) {
            mlm_fail(err, errlen, rc, "receiving the shard from the coordinator: %s", e2);
            break;
        }
        if (m.type == MSG_SLICE_DATA && other_plan(n, m.slice_data.plan_id, "a shard chunk")) {
            // an earlier plan's stream, sent again late: not this shard's bytes
        } else if (m.type != MSG_SLICE_DATA || (int64_t)m.slice_data.offset != got) {
            rc = mlm_fail(err, errlen, MLM_EPROTO, "receiving the shard: expected a chunk at byte %lld, got %s",
                          (long long)got, msg_type_name(m.type));
        } else {
            total = (int64_t)m.slice_data.total;
            const double w0 = mlm_now_ms();
            if (wrc == 0 && full) { // disk:worker=N:full, as the fault spec says
                wrc = mlm_fail(err, errlen, MLM_EFULL, "writing the shard into the cache at %s: %s (disk:worker=%d:full)",
                               path, strerror(ENOSPC), n->link_rank);
            } else if (wrc == 0 && fwrite(m.slice_data.data, 1, m.slice_data.len, f) != m.slice_data.len) {
                wrc = mlm_fail(err, errlen, errno == ENOSPC ? MLM_EFULL : MLM_EIO, "writing the shard into the cache at %s: %s",
                               path, strerror(errno));
            }
            if (wrc == 0) disk_wait(n, mlm_now_ms() - w0, (double)m.slice_data.len);
            got += (int64_t)m.slice_data.len;
            if (credit && rc == 0 && (uint64_t)(got - flushed) >= credit / 2) { // paced even after a failed write
                if (wrc == 0) shard_flush(f, flushed, got);
                flushed = got;
                msg_t hb;
                msg_init(&hb, MSG_HEARTBEAT);
                snprintf(hb.heartbeat.node_id, sizeof hb.heartbeat.node_id, "%s", n->node_id);
                hb.heartbeat.seq = (uint64_t)got;
                if ((rc = msg_send(*n->ctl, 0, &hb, n->timeout_ms, e2, sizeof e2)) != 0)
                    mlm_fail(err, errlen, rc, "acknowledging the shard's bytes: %s", e2);
            }
        }
        msg_clear(&m);
        comm_msg_free(&raw);
    }
    if (rc == 0) rc = wrc;
    if (rc == 0 && credit && got > flushed) shard_flush(f, flushed, got);
    if (fclose(f) != 0 && rc == 0) rc = mlm_fail(err, errlen, MLM_EIO, "writing %s: %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0)
        rc = mlm_fail(err, errlen, MLM_EIO, "renaming %s to %s: %s", tmp, path, strerror(errno));
    if (rc != 0) {
        unlink(tmp);
        return rc;
    }
    return got;
}

// Whether the plan's data plane can be authenticated as this worker requires: with --curve-key every
// node of the plan must carry a key and this node's must be its own (no fallback to plaintext);
// without one, a plan with keys cannot be served. A given data plane (MPI, in-process) has no keys.
// 0, or MLM_EPROTO / MLM_EINVAL with err saying why.
static int check_plan_keys(const node_t *n, char *err, size_t errlen) {
    if (n->o->data) return 0;
    const curve_conf_t *cv = n->o->curve;
    for (int i = 0; i < n->plan.n_nodes; i++) {
        const char *key = n->nodes[i].curve_key;
        if (cv && !key[0])
            return mlm_fail(err, errlen, MLM_EPROTO,
                            "the plan's data plane has no CurveZMQ key for node %s (%s): this worker runs with "
                            "--curve-key and does not fall back to plaintext (the coordinator needs protocol 1.%d "
                            "and --curve-key)",
                            n->nodes[i].node_id, n->nodes[i].endpoint, MSG_MINOR_CURVE);
        if (!cv && key[0])
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "the plan's data plane uses CurveZMQ, but this worker has no key pair (--curve-key)");
    }
    if (cv && strcmp(n->nodes[n->index].curve_key, cv->self.pub) != 0)
        return mlm_fail(err, errlen, MLM_EPROTO, "the plan lists CurveZMQ key %s for this node, but its key is %s",
                        n->nodes[n->index].curve_key, cv->self.pub);
    return 0;
}

// The plan's data plane: the one the node was given (MPI, in-process: every rank of it is in the
// plan, in order), or a ZeroMQ comm over the endpoints the plan lists, authenticated with the plan's
// keys when it has them (check_plan_keys). Emulated links wrap it.
static int open_data_plane(node_t *n, char *err, size_t errlen) {
    if (n->o->data) {
        n->comm = n->o->data;
        if (comm_size(n->comm) != n->plan.n_nodes || comm_rank(n->comm) != n->index)
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "the plan has %d nodes and puts this one at %d, but its data plane has %d ranks and this is rank %d",
                            n->plan.n_nodes, n->index, comm_size(n->comm), comm_rank(n->comm));
        return 0;
    }
    const char *eps[MSG_MAX_NODES], *keys[MSG_MAX_NODES]; // (n_nodes) each node's endpoint and CurveZMQ key
    for (int i = 0; i < n->plan.n_nodes; i++) eps[i] = n->nodes[i].endpoint, keys[i] = n->nodes[i].curve_key;
    int rc = check_plan_keys(n, err, errlen);
    if (rc != 0) return rc;
    comm_open_opts_t co = {.rank = n->index, .size = n->plan.n_nodes, .endpoints = eps, .timeout_ms = n->timeout_ms,
                           .fault_spec = n->faults, .fail_on_any_loss = true,
                           .session = (uint16_t)(n->plan.plan_id | 1), .curve = n->o->curve,
                           .curve_keys = n->o->curve ? keys : NULL};
    comm_open_heartbeat(&co, n->o->heartbeat_ms);
    return comm_open(&n->comm, fault_has_link_rules(n->faults) ? "fault:zmq" : "zmq", &co, err, errlen);
}

// The files a worker with the model loads its share from: the model file, and for an all-reduce share
// that streams under the budget (its columns lie apart in the model file) a columns file
// (shard_file_write_cols: attn_output and ffn_down's columns, about a third of the share) written once
// into the cache at `cached`.cols (an MPI rank, whose model is not hashed, writes a file of its own
// into the cache and *unlink_after says to remove it once loaded). A whole shard file cached at
// `cached` by an earlier version is used as it is. 0, or why the columns file was not written.
static int share_file(node_t *n, const shard_slice_t *sl, const char *cached, char *tmp, size_t cap,
                      const char **from, const char **cols, bool *unlink_after, char *err, size_t errlen) {
    *from = n->o->model_path;
    *cols = NULL;
    *unlink_after = false;
    if (!n->o->mem_budget || !sl->cols) return 0;
    if (!n->o->same_file && access(cached, R_OK) == 0) {
        *from = cached;
        return 0;
    }
    const int len = n->o->same_file ? snprintf(tmp, cap, "%s/share-%ld.cols.gguf", n->cache_dir, (long)getpid())
                                    : snprintf(tmp, cap, "%s.cols", cached);
    if (len < 0 || (size_t)len >= cap) return mlm_fail(err, errlen, MLM_EINVAL, "cache directory path too long: %s", n->cache_dir);
    if (!n->o->same_file && access(tmp, R_OK) == 0) {
        *cols = tmp;
        return 0;
    }
    gguf_t *g = NULL;
    model_hparams_t hp;
    bool need = false;
    int rc = gguf_open(&g, n->o->model_path, err, errlen);
    if (rc == 0) rc = hparams_read(g, &hp, err, errlen);
    if (rc == 0) {
        const weights_params_t wp = {.g = g, .hp = &hp, .slice = sl, .budget_bytes = n->o->mem_budget,
                                     .n_ctx = (int)n->plan.n_ctx};
        rc = weights_need_shard_file(&wp, &need, err, errlen);
    }
    if (rc == 0 && need) {
        rc = mlm_mkdir_p(n->cache_dir, err, errlen);
        if (rc == 0 && disk_of(n).full)
            rc = mlm_fail(err, errlen, MLM_EFULL, "writing the shard into the cache at %s: %s (disk:worker=%d:full)", tmp,
                          strerror(ENOSPC), n->link_rank);
        const double w0 = mlm_now_ms();
        if (rc == 0) rc = shard_file_write_cols(g, sl, hp.head_dim, n->sha, tmp, err, errlen);
        if (rc == 0) {
            struct stat st;
            disk_wait(n, mlm_now_ms() - w0, stat(tmp, &st) == 0 ? (double)st.st_size : 0);
        }
        if (rc == 0) {
            *cols = tmp;
            *unlink_after = n->o->same_file;
        }
    }
    gguf_close(&g);
    return rc == MLM_ERANGE ? 0 : rc; // a budget below the minimum: model_load says so
}

// model_load of this node's share; a slow disk (disk:worker=N:slow=F) makes the reading F times as long.
static int load_share(node_t *n, const char *from, const model_load_opts_t *lo, char *err, size_t errlen) {
    const double t0 = mlm_now_ms();
    int rc = model_load(&n->model, from, lo, err, errlen);
    if (rc == 0) disk_wait(n, mlm_now_ms() - t0, 0);
    return rc;
}

static bool placed_experts(const node_t *n) {
    return n->plan.tp_mode == MSG_TP_EXPERT || n->plan.tp_mode == MSG_TP_EXPERT_LEAD;
}

// Whether this node is its stage's first (the nodes before it hold other blocks).
static bool stage_leader(const node_t *n) {
    const msg_plan_node_t *me = &n->nodes[n->index];
    for (int i = 0; i < n->index; i++)
        if (n->nodes[i].layers.begin == me->layers.begin && n->nodes[i].layers.end == me->layers.end) return false;
    return true;
}

// Placed experts (MSG_TP_EXPERT, _LEAD): every node's experts lists, as the stages' expert-parallel groups.
static int plan_experts(node_t *n, const model_hparams_t *hp, char *err, size_t errlen) {
    if (hp->n_expert < 1 || (uint32_t)hp->n_expert != n->plan.n_expert)
        return mlm_fail(err, errlen, MLM_EINVAL, "an expert-parallel plan for %u experts; the model has %d",
                        (unsigned)n->plan.n_expert, hp->n_expert);
    return pipe_set_experts(&n->pipe, n->nodes, hp->n_layer, hp->n_expert, n->plan.tp_mode == MSG_TP_EXPERT_LEAD, err,
                            errlen);
}

static int on_load(node_t *n, const msg_load_shard_t *ls) {
    char err[512] = "", path[1100];
    if (other_plan(n, ls->plan_id, "LOAD_SHARD")) return 0;
    if (!n->planned || ls->node_index != (uint32_t)n->index) return send_error(n, MLM_ESTATE, "LOAD_SHARD without a plan for this node", 0), MLM_ESTATE;
    const double t0 = mlm_now_ms();
    const shard_slice_t *sl = &n->slices[n->index];
    msg_t ack;
    msg_init(&ack, MSG_LOAD_SHARD_ACK);
    ack.load_shard_ack.plan_id = n->plan.plan_id;
    ack.load_shard_ack.node_index = (uint32_t)n->index;
    int rc = check_plan_keys(n, err, sizeof err); // a data plane it would refuse: said before any loading
    if (rc != 0) goto failed;
    // Within the budget the plan's share is mapped, or streamed through the weight window from the
    // model file or the cached shard file.
    // a paging KV device spills what the budget leaves no room for: the budget plans the weights alone
    const bool pages = attn_dev_pages(kv_device(n)) && n->o->mem_budget;
    model_load_opts_t lo = {.repack = true, .slice = sl, .mem_budget = n->o->mem_budget,
                            .n_ctx = pages ? 1 : (int)n->plan.n_ctx, .weights = n->o->weights,
                            .expert_skip = n->o->expert_skip};
    uint64_t mask[4] = {0}; // placed experts: the ones this node computes
    for (int j = 0; j < n->nodes[n->index].n_experts; j++) mask[n->nodes[n->index].experts[j] >> 6] |= (uint64_t)1 << (n->nodes[n->index].experts[j] & 63);
    if (placed_experts(n)) {
        lo.experts = mask;
        lo.block_experts = n->nodes[n->index].block_experts;
        lo.n_block_experts = n->nodes[n->index].n_block_experts;
    }
    lo.experts_only = n->plan.tp_mode == MSG_TP_EXPERT_LEAD && !stage_leader(n); // it computes experts alone
    // The last plan's shard of the same model gives the rows the two shares have in common (freed
    // once this share is built); a budget's window streams and takes nothing from it.
    if (n->kept && memcmp(n->kept_sha, n->plan.model_sha256, 32) != 0) model_destroy(&n->kept);
    lo.reuse = n->kept;
    const bool local = n->have_sha && memcmp(n->sha, n->plan.model_sha256, 32) == 0;
    node_cache_path(n->cache_dir, n->plan.model_sha256, sl, path, sizeof path);
    if (local) {
        char own[1100];
        const char *from, *cols;
        bool tmp;
        rc = share_file(n, sl, path, own, sizeof own, &from, &cols, &tmp, err, sizeof err);
        lo.cols_path = cols;
        if (rc == 0) rc = load_share(n, from, &lo, err, sizeof err);
        if (tmp) unlink(own); // streamed through its open descriptor until the plan ends
    } else if (access(path, R_OK) == 0) {
        rc = load_share(n, path, &lo, err, sizeof err);
        ack.load_shard_ack.from_cache = rc == 0;
        if (rc != 0) unlink(path); // unusable cache entry: fetch it again
    } else {
        rc = MLM_ENOTFOUND;
    }
    if (rc == MLM_ENOTFOUND || (rc != 0 && !local)) {
        // Ask the coordinator for the shard file, then load it from the cache.
        rc = mlm_mkdir_p(n->cache_dir, err, sizeof err);
        if (rc == 0) {
            ack.load_shard_ack.status = MLM_ENOTFOUND;
            ack.load_shard_ack.bytes = shard_credit(n); // how far the coordinator may send ahead (0 = no limit)
            if ((rc = msg_send(*n->ctl, 0, &ack, n->timeout_ms, err, sizeof err)) != 0) return rc;
            int64_t got = receive_shard(n, path, err, sizeof err);
            if (got < 0) {
                rc = (int)got;
            } else {
                ack.load_shard_ack.bytes = (uint64_t)got;
                rc = load_share(n, path, &lo, err, sizeof err);
            }
        }
    }
    model_destroy(&n->kept); // what the new share needs of it is taken
    if (rc == 0) rc = probe_kv_device(n, err, sizeof err);
    if (rc == 0) {
        const model_hparams_t *hp = model_hparams(n->model);
        ack.load_shard_ack.status = 0;
        ack.load_shard_ack.ms = (uint64_t)(mlm_now_ms() - t0);
        if ((rc = msg_send(*n->ctl, 0, &ack, n->timeout_ms, err, sizeof err)) != 0) return rc;
        rc = open_data_plane(n, err, sizeof err);
        if (rc == 0)
            rc = pipe_node_init(&n->pipe, n->comm, n->index, n->slices, n->plan.n_nodes, hp->n_layer, hp->n_embd,
                                hp->n_vocab, n->timeout_ms, err, sizeof err);
        if (rc == 0) { // the group's links, as the coordinator measured them, choose star or ring
            double lat[MSG_MAX_NODES], bw[MSG_MAX_NODES]; // (n_nodes) one-way us, bytes/s
            for (int i = 0; i < n->plan.n_nodes; i++) {
                lat[i] = n->nodes[i].link_lat_us;
                bw[i] = (double)n->nodes[i].link_bw;
            }
            pipe_set_links(&n->pipe, lat, bw);
            if (placed_experts(n)) rc = plan_experts(n, hp, err, sizeof err);
            if (rc == 0 && !n->o->data) {
                const char *eps[MSG_MAX_NODES]; // (n_nodes) the plan's data endpoints
                for (int i = 0; i < n->plan.n_nodes; i++) eps[i] = n->nodes[i].endpoint;
                rc = pipe_set_shm(&n->pipe, eps, err, sizeof err);
            }
            n->ctx_opts = (model_ctx_opts_t){.n_ctx = (int)n->plan.n_ctx, .n_threads = n->o->n_threads,
                                             .n_batch = (int)n->plan.n_batch, .tp = &n->pipe.tp,
                                             .kv_f32 = n->plan.kv_type == QT_F32, .kv_q8 = n->plan.kv_type == QT_Q8_0, .ep = &n->pipe.ep_group,
                                             .attn_dev = kv_device(n),
                                             .kv_ram = attn_dev_pages(kv_device(n))
                                                           ? model_kv_ram_share(n->model, n->o->mem_budget)
                                                           : 0};
            if (rc == 0) rc = model_ctx_new(&n->ctx[0], n->model, &n->ctx_opts, err, sizeof err);
            n->logits_cap = (size_t)64 * (size_t)hp->n_vocab;
            n->logits = rc == 0 ? malloc(n->logits_cap * sizeof(float)) : NULL;
            if (rc == 0 && !n->logits) rc = MLM_ENOMEM;
        }
        if (rc != 0) { // the coordinator waits in its own data-plane setup: tell it why
            vlog(n, "data plane failed:", err);
            send_error(n, rc, err, 0);
            end_plan(n, true);
        } else {
            char how[200];
            weights_describe(model_weights(n->model), how, sizeof how);
            vlog(n, ack.load_shard_ack.from_cache ? "loaded (from cache):" : "loaded:", how);
        }
        return 0;
    }
failed:
    // The coordinator hears why: the ack's status, then an ERROR whose text names the file and cause.
    vlog(n, "load failed:", err);
    ack.load_shard_ack.status = rc;
    char e2[128];
    msg_send(*n->ctl, 0, &ack, n->timeout_ms, e2, sizeof e2);
    send_error(n, rc, err, 0);
    end_plan(n, true);
    return 0;
}

static int on_step(node_t *n, const msg_step_t *st) {
    if (other_plan(n, st->plan_id, "STEP")) return 0;
    if (!n->ctx[0]) return send_error(n, MLM_ESTATE, "STEP before the shard is loaded", st->step_id);
    if (st->seq_id >= NODE_MAX_SEQS) return send_error(n, MLM_ERANGE, "sequence id out of range", st->step_id);
    model_ctx_t **cp = &n->ctx[st->seq_id];
    if (!*cp) {
        char err[256];
        if (model_ctx_new(cp, n->model, &n->ctx_opts, err, sizeof err) != 0)
            return send_error(n, MLM_ENOMEM, err, st->step_id);
    }
    model_ctx_t *ctx = *cp;
    if (st->has_hidden || !st->tokens) return send_error(n, MLM_EUNSUPPORTED, "hidden states travel on the data plane", st->step_id);
    if (st->pos == 0) model_ctx_reset(ctx);
    if (st->pos != model_ctx_pos(ctx))
        return send_error(n, MLM_ESTATE, "step position does not follow this node's cache", st->step_id);
    const int nv = model_hparams(n->model)->n_vocab;
    const bool all = st->logits == MSG_LOGITS_ALL;
    const size_t need = (size_t)(all ? st->n_tokens : 1) * (size_t)nv;
    if (need > n->logits_cap) {
        float *nl = realloc(n->logits, need * sizeof(float));
        if (!nl) return send_error(n, MLM_ENOMEM, "out of memory for logits", st->step_id);
        n->logits = nl;
        n->logits_cap = need;
    }
    const double b0 = n->pipe.busy_ms, w0 = n->pipe.wait_ms + n->pipe.gather_ms;
    const uint64_t s0 = n->pipe.shm_collectives;
    model_ctx_set_one_order(ctx, st->one_order); // 1.7: a replay of decode steps in one chunk
    int rc = pipe_node_step(&n->pipe, ctx, st->tokens, (int)st->n_tokens, (int)st->ubatch,
                            st->logits == MSG_LOGITS_NONE ? NULL : n->logits, all);
    model_ctx_set_one_order(ctx, false);
    if (rc != 0) {
        char text[256];
        int lost = -1; // the data-plane peer it lost (a dead node, or a cut link's other end)
        for (int r = 0; r < n->plan.n_nodes && lost < 0; r++)
            if (r != n->index && comm_zmq_peer_lost(n->comm, r)) lost = r;
        snprintf(text, sizeof text, "step %llu failed: %s", (unsigned long long)st->step_id, mlm_strerror(rc));
        if (lost >= 0) snprintf(text + strlen(text), sizeof text - strlen(text), " (lost %s)", n->nodes[lost].node_id);
        vlog(n, "step failed:", text);
        send_error_lost(n, rc, text, st->step_id, lost);
        end_plan(n, true); // a lost peer ends the plan; the coordinator re-plans
        return 0;
    }
    // The step's report: how long this node computed and how long it waited (pipeline utilisation).
    msg_t m;
    msg_init(&m, MSG_RESULT);
    m.result.plan_id = n->plan.plan_id;
    m.result.step_id = st->step_id;
    m.result.node_index = (uint32_t)n->index;
    m.result.kind = MSG_RESULT_NONE;
    m.result.compute_ns = (uint64_t)((n->pipe.busy_ms - b0) * 1e6);
    m.result.comm_ns = (uint64_t)((n->pipe.wait_ms + n->pipe.gather_ms - w0) * 1e6);
    m.result.shm_collectives = n->pipe.shm_collectives - s0;
    char err[256];
    return msg_send(*n->ctl, 0, &m, n->timeout_ms, err, sizeof err);
}

// --- public API

int node_cache_path(const char *dir, const uint8_t sha256[32], const shard_slice_t *s, char *out, size_t cap) {
    char hex[65];
    sha256_hex(sha256, hex);
    char ex[2 + 8 * SHARD_EXPERT_WORDS + 1] = ""; // placed experts: "-x" and the mask in hex, last word first
    if (s->placed) {
        int w = SHARD_EXPERT_WORDS - 1, at = snprintf(ex, sizeof ex, "-x");
        while (w > 0 && !s->experts[w]) w--;
        for (; w >= 0; w--) at += snprintf(ex + at, sizeof ex - (size_t)at, "%08x", (unsigned)s->experts[w]);
    }
    int k = snprintf(out, cap, "%s/%.16s-l%d-%d-h%d-%d-kv%d-%d-e%d-%d-f%d-%d-v%d-%d%s%s.gguf", dir, hex, s->l0, s->l1,
                     s->h0, s->h1, s->kv0, s->kv1, s->e0, s->e1, s->f0, s->f1, s->v0, s->v1, s->cols ? "-cols" : "", ex);
    return k > 0 && (size_t)k < cap ? 0 : MLM_ERANGE;
}

int node_run(const node_opts_t *o, comm_t **ctl, char *err, size_t errlen) {
    node_t n;
    memset(&n, 0, sizeof n);
    n.o = o;
    n.ctl = ctl;
    n.timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 30000;
    if (o->node_id) snprintf(n.node_id, sizeof n.node_id, "%s", o->node_id);
    else snprintf(n.node_id, sizeof n.node_id, "worker-%ld", (long)getpid());
    const char *cd = o->cache_dir ? o->cache_dir : getenv("MESHLM_CACHE");
    if (cd && *cd) snprintf(n.cache_dir, sizeof n.cache_dir, "%s", cd);
    else snprintf(n.cache_dir, sizeof n.cache_dir, "%s/.cache/meshlm", getenv("HOME") ? getenv("HOME") : "/tmp");
    if (o->model_path) {
        struct stat stt;
        if (stat(o->model_path, &stt) != 0)
            return mlm_fail(err, errlen, MLM_EIO, "%s: %s", o->model_path, strerror(errno));
        n.model_size = (uint64_t)stt.st_size;
        // The same file as the coordinator's (MPI ranks): it stands for the plan's model unhashed.
        int rc = 0;
        if (o->model_sha256) memcpy(n.sha, o->model_sha256, 32);
        else if (!o->same_file) rc = sha256_file(o->model_path, n.sha, err, errlen);
        if (rc != 0) return rc;
        n.have_sha = true;
    }
    if (o->profile) n.prof = *o->profile;
    else if (!o->no_profile && profile_node(&n.prof, o->n_threads, o->model_path, 300, o->mem_budget) == 0 && o->verbose) {
        fprintf(stderr, "[%s] profile: %.1f GB/s memory, %.1f GFLOP/s Q4_0, %.1f GFLOP/s Q8_0, disk %.0f MB/s\n",
                n.node_id, n.prof.mem_bw / 1e9, profile_gflops(&n.prof, QT_Q4_0), profile_gflops(&n.prof, QT_Q8_0),
                n.prof.disk_bw / 1e6);
    }
    int rc = 0;
    bool stop = false;
    while (!stop) {
        msg_t m;
        comm_msg_t raw;
        char e2[512];
        rc = msg_recv(*n.ctl, 0, &m, &raw, NULL, 1000, e2, sizeof e2);
        if (rc == MLM_ETIMEOUT) continue;
        if (rc == MLM_EPEER && o->exit_on_peer_loss) { // the coordinator of a fixed world (MPI, in-process) is gone
            mlm_fail(err, errlen, rc, "the coordinator is gone");
            break;
        }
        if (rc != 0) { // malformed message: say so, keep serving
            vlog(&n, "bad message:", e2);
            send_error(&n, rc, e2, 0);
            continue;
        }
        vlog(&n, "got", msg_type_name(m.type));
        switch (m.type) {
        case MSG_HELLO: rc = on_hello(&n, &m.hello); break;
        case MSG_PLAN: set_state(&n, NODE_LOADING); rc = on_plan(&n, &m.plan); break;
        case MSG_LOAD_SHARD:
            rc = on_load(&n, &m.load_shard);
            set_state(&n, n.ctx[0] ? NODE_SERVING : NODE_IDLE);
            break;
        case MSG_STEP: rc = on_step(&n, &m.step); break;
        case MSG_SHUTDOWN:
            end_plan(&n, false);
            set_state(&n, NODE_IDLE);
            stop = strcmp(m.shutdown.reason, "exit") == 0;
            rc = 0;
            break;
        case MSG_HEARTBEAT: rc = on_ping(&n, m.heartbeat.seq); break;
        case MSG_SLICE_DATA: // a bandwidth probe outside shard streaming
            rc = strcmp(m.slice_data.tensor, NODE_PING_TENSOR) == 0 ? on_ping(&n, m.slice_data.plan_id)
                                                                      : send_error(&n, MLM_EPROTO, "unexpected slice data", 0);
            break;
        default: rc = send_error(&n, MLM_EPROTO, "unexpected message", 0); break;
        }
        msg_clear(&m);
        comm_msg_free(&raw);
        if (rc == MLM_ENOMEM) {
            mlm_fail(err, errlen, rc, "out of memory");
            break;
        }
        rc = 0;
    }
    end_plan(&n, false);
    plain_ctl(&n);
    fault_free(&n.faults);
    return rc;
}

int node_serve(const node_opts_t *o, char *err, size_t errlen) {
    comm_t *ctl = NULL;
    comm_open_opts_t co = {.listen = o->listen, .curve = o->curve};
    comm_open_heartbeat(&co, o->heartbeat_ms); // a vanished coordinator's link drops
    int rc = comm_open(&ctl, "link", &co, err, errlen);
    if (rc != 0) return rc;
    if (o->verbose) fprintf(stderr, "[%s] listening on %s\n", o->node_id ? o->node_id : "worker", o->listen);
    rc = node_run(o, &ctl, err, errlen);
    comm_destroy(&ctl);
    return rc;
}
