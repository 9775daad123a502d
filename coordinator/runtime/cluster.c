// Coordinator side of a cluster: the object and its phases (hello, plan, shard loading with slice
// streaming, data plane), each a separate call over one control comm (the link backend to ZeroMQ
// workers, or MPI / in-process ranks). Steps are in cluster_step.c, recovery in cluster_recover.c.
#include "coordinator/runtime/cluster_impl.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cluster/launch.h"
#include "core/clock.h"
#include "offload/attn.h"
#include "core/err.h"
#include "core/sha256.h"
#include "proto/msg_io.h"
#include "transport/comm_link.h"
#include "transport/comm_open.h"
#include "worker/node/node.h"

#define CHUNK_BYTES (4u << 20)  // shard streaming chunk

// --- helpers


// A free TCP port on the given local IPv4 address, below the ephemeral range when it can (bound and
// released: a small race other programs could win). Tries a few candidates, then lets the kernel pick.
static int free_port(struct in_addr ip) {
    static unsigned seed;
    if (!seed) seed = (unsigned)getpid() ^ (unsigned)time(NULL);
    for (int attempt = 0; attempt < 50; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) return -1;
        const int want = attempt < 49 ? launch_candidate_port(&seed) : 0;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)want), .sin_addr = ip};
        socklen_t len = sizeof a;
        int port = -1;
        if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
            port = ntohs(a.sin_port);
        close(fd);
        if (port > 0) return port;
    }
    return -1;
}

// This machine's address on the route to a worker's tcp://HOST:PORT (a connected UDP socket sends
// nothing but learns the source address the kernel would use). Loopback when that fails.
static struct in_addr local_addr_towards(const char *endpoint) {
    struct in_addr out = {htonl(INADDR_LOOPBACK)};
    char host[128];
    const char *h = endpoint + 6, *colon = strrchr(endpoint, ':');
    if (!colon || colon <= h || (size_t)(colon - h) >= sizeof host) return out;
    memcpy(host, h, (size_t)(colon - h));
    host[colon - h] = 0;
    struct sockaddr_in peer = {.sin_family = AF_INET, .sin_port = htons(9)};
    if (inet_pton(AF_INET, host, &peer.sin_addr) != 1) return out;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) return out;
    struct sockaddr_in me;
    socklen_t len = sizeof me;
    if (connect(fd, (struct sockaddr *)&peer, sizeof peer) == 0 && getsockname(fd, (struct sockaddr *)&me, &len) == 0)
        out = me.sin_addr;
    close(fd);
    return out;
}

static void coordinator_endpoint(const cluster_t *c, char *out, size_t cap) {
    if (c->o.data_endpoint) {
        snprintf(out, cap, "%s", c->o.data_endpoint);
    } else if (c->o.n_workers > 0 && strncmp(c->o.workers[0], "ipc://", 6) == 0) {
        snprintf(out, cap, "%s.coord%ld", c->o.workers[0], (long)getpid());
    } else {
        struct in_addr ip = local_addr_towards(c->o.workers[0]);
        char txt[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &ip, txt, sizeof txt);
        // A free port that is not a worker's data port (those are bound only once the plan arrives).
        for (int attempt = 0; attempt < 20; attempt++) {
            snprintf(out, cap, "tcp://%s:%d", txt, free_port(ip));
            bool clash = false;
            for (int i = 0; i < c->o.n_workers; i++) clash |= strcmp(out, c->w[i].data_endpoint) == 0;
            if (!clash) break;
        }
    }
}

// Counts a worker's step report (a RESULT without a tensor) into the statistics.
void cl_count_report(cluster_t *c, int wi, const msg_result_t *r) {
    c->w[wi].reports++;
    c->w[wi].busy_ms += (double)r->compute_ns / 1e6;
    c->w[wi].wait_ms += (double)r->comm_ns / 1e6;
    c->w[wi].shm_collectives += r->shm_collectives;
    c->stats.reports++;
    c->stats.busy_ms += (double)r->compute_ns / 1e6;
    c->stats.wait_ms += (double)r->comm_ns / 1e6;
}

// Waits for a message of type want from worker wi; step reports of earlier steps that arrive first
// are counted and skipped. An ERROR is returned as its code with its text.
int cl_recv_type(cluster_t *c, int wi, msg_type_t want, msg_t *m, comm_msg_t *raw, char *err, size_t errlen) {
    const int64_t dl = mlm_deadline(c->timeout_ms);
    for (;;) {
        int rc = msg_recv(c->ctl, c->w[wi].peer, m, raw, NULL, mlm_left_ms(dl), err, errlen);
        if (rc != 0)
            return mlm_fail(err, errlen, rc, "worker %s: no %s within %d ms (%s)", c->w[wi].endpoint,
                            msg_type_name(want), c->timeout_ms, mlm_strerror(rc));
        c->w[wi].heard_ms = mlm_now_ms();
        const bool report = m->type == MSG_RESULT && m->result.kind == MSG_RESULT_NONE;
        const bool step_error = m->type == MSG_ERROR && m->error.step_id != 0;
        if (step_error) cl_note_error(c, wi, &m->error);
        const bool stale_ack = m->type == MSG_LOAD_SHARD_ACK && m->load_shard_ack.plan_id != 0 &&
                               m->load_shard_ack.plan_id != c->plan_id; // an earlier plan's
        if (stale_ack || (m->type != want && (report || step_error || m->type == MSG_HEARTBEAT || m->type == MSG_HELLO))) {
            // a step report, a failed step's notice (that step is over), or a late answer to a
            // liveness ping or a re-greeting: counted, skipped
            if (report) cl_count_report(c, wi, &m->result);
            msg_clear(m);
            comm_msg_free(raw);
            continue;
        }
        if (m->type == MSG_ERROR) {
            rc = mlm_fail(err, errlen, m->error.code < 0 ? m->error.code : MLM_EPROTO, "worker %s: %s",
                          c->w[wi].endpoint, m->error.text);
        } else if (m->type != want) {
            rc = mlm_fail(err, errlen, MLM_EPROTO, "worker %s: expected %s, got %s", c->w[wi].endpoint,
                          msg_type_name(want), msg_type_name(m->type));
        }
        if (rc != 0) {
            msg_clear(m);
            comm_msg_free(raw);
        }
        return rc;
    }
}

static int say_hello(cluster_t *c, char *err, size_t errlen) {
    for (int i = 0; i < c->o.n_workers; i++) {
        worker_t *w = &c->w[i];
        msg_t m;
        msg_init(&m, MSG_HELLO);
        snprintf(m.hello.node_id, sizeof m.hello.node_id, "coordinator");
        m.hello.role = MSG_ROLE_COORDINATOR;
        m.hello.n_cores = 1;
        m.hello.link_rank = w->peer;
        const char *ft = fault_spec_text(c->faults);
        if (strlen(ft) >= sizeof m.hello.faults)
            return mlm_fail(err, errlen, MLM_EINVAL, "the fault spec is longer than %zu bytes", sizeof m.hello.faults - 1);
        snprintf(m.hello.faults, sizeof m.hello.faults, "%s", ft);
        char e2[256];
        int rc = msg_send(c->ctl, w->peer, &m, c->timeout_ms, e2, sizeof e2);
        if (rc != 0) return mlm_fail(err, errlen, rc, "worker %s: %s", w->endpoint, e2);
    }
    for (int i = 0; i < c->o.n_workers; i++) {
        msg_t m;
        comm_msg_t raw;
        int rc = cl_recv_type(c, i, MSG_HELLO, &m, &raw, err, errlen);
        if (rc != 0) return rc;
        c->w[i].hello = m.hello;
        msg_clear(&m);
        comm_msg_free(&raw);
        for (int j = 0; j < i; j++)
            if (!strcmp(c->w[j].hello.node_id, c->w[i].hello.node_id))
                return mlm_fail(err, errlen, MLM_EINVAL, "workers %s and %s share the node id %s", c->w[j].endpoint,
                                c->w[i].endpoint, c->w[i].hello.node_id);
    }
    // From here on both ends emulate the links (each worker turned them on after its HELLO answer).
    if (fault_has_link_rules(c->faults) && !c->ctl_wrapped) {
        const fault_wrap_opts_t wo = {.reliable = true}; // drops on the control link are sent again
        int rc = comm_fault_wrap_opts(&c->ctl, c->faults, &wo, err, errlen);
        if (rc != 0) return rc;
        c->ctl_wrapped = true;
    }
    return 0;
}

// Control-link measurement: small heartbeats for latency (half the median round trip), then one
// PING_BYTES probe for bandwidth. Workers answer both at once.
#define PING_ROUNDS 5
#define PING_BYTES (1u << 20)

static int ping_once(cluster_t *c, int wi, uint64_t seq, const void *payload, size_t len, double *ms, char *err,
                     size_t errlen) {
    msg_t m;
    if (payload) {
        msg_init(&m, MSG_SLICE_DATA);
        msg_slice_data_t *sd = &m.slice_data;
        snprintf(sd->tensor, sizeof sd->tensor, "%s", NODE_PING_TENSOR);
        sd->type = QT_I8;
        sd->n_dims = 1;
        sd->ne[0] = (int64_t)len;
        sd->end = (int64_t)len;
        sd->plan_id = seq;
        sd->total = len;
        sd->data = payload;
        sd->len = len;
    } else {
        msg_init(&m, MSG_HEARTBEAT);
        snprintf(m.heartbeat.node_id, sizeof m.heartbeat.node_id, "coordinator");
        m.heartbeat.seq = seq;
    }
    const double t0 = mlm_now_ms();
    int rc = msg_send(c->ctl, c->w[wi].peer, &m, c->timeout_ms, err, errlen);
    comm_msg_t raw;
    if (rc == 0) rc = cl_recv_type(c, wi, MSG_HEARTBEAT, &m, &raw, err, errlen);
    if (rc != 0) return rc;
    *ms = mlm_now_ms() - t0;
    rc = m.heartbeat.seq == seq ? 0 : MLM_EPROTO;
    if (rc != 0) snprintf(err, errlen, "worker %s: ping answered out of order", c->w[wi].endpoint);
    msg_clear(&m);
    comm_msg_free(&raw);
    return rc;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int measure_links(cluster_t *c, char *err, size_t errlen) {
    uint8_t *buf = calloc(1, PING_BYTES);
    if (!buf) return MLM_ENOMEM;
    int rc = 0;
    c->stats.link_lat_us = 0;
    c->stats.link_bw = 0;
    for (int i = 0; i < c->o.n_workers && rc == 0; i++) {
        double t[PING_ROUNDS], big = 0;
        for (int k = 0; k < PING_ROUNDS && rc == 0; k++) rc = ping_once(c, i, (uint64_t)k + 1, NULL, 0, &t[k], err, errlen);
        if (rc == 0) rc = ping_once(c, i, 1000, buf, PING_BYTES, &big, err, errlen);
        if (rc != 0) break;
        qsort(t, PING_ROUNDS, sizeof t[0], cmp_double);
        worker_t *w = &c->w[i];
        w->lat_us = t[PING_ROUNDS / 2] * 1e3 / 2;
        const double extra = big - t[PING_ROUNDS / 2]; // the payload's own transfer time
        w->bw = extra > 1e-3 ? PING_BYTES / (extra / 1e3) : 1e11;
        if (w->lat_us > c->stats.link_lat_us) c->stats.link_lat_us = w->lat_us;
        if (c->stats.link_bw == 0 || w->bw < c->stats.link_bw) c->stats.link_bw = w->bw;
        if (c->o.verbose)
            fprintf(stderr, "meshlm: link to %s: %.0f us one way, %.0f MB/s\n", w->endpoint, w->lat_us, w->bw / 1e6);
    }
    free(buf);
    return rc;
}

// The workers a plan is made over: every live worker that is not a standby, and as many live
// standbys as there are lost workers that are not.
static void pick_candidates(cluster_t *c) {
    int missing = 0;
    c->n_cand = 0;
    for (int i = 0; i < c->o.n_workers; i++)
        if (!c->w[i].standby) {
            if (c->w[i].lost || c->w[i].disk_full) missing++;
            else c->cand[c->n_cand++] = i;
        }
    for (int i = 0; i < c->o.n_workers && missing > 0; i++)
        if (c->w[i].standby && !c->w[i].lost && !c->w[i].disk_full) {
            c->cand[c->n_cand++] = i;
            missing--;
        }
}

// This machine's figures, measured once; with local workers also its disk (they stream from the
// coordinator's model file on this machine's disk).
static const profile_t *here_profile(cluster_t *c) {
    const char *disk = c->o.local_profile ? c->o.model_path : NULL;
    if (c->here_state == 0)
        c->here_state = profile_node(&c->here, c->o.n_threads, disk, 300, c->o.mem_budget) == 0 ? 1 : -1;
    return c->here_state > 0 ? &c->here : NULL;
}

// What the planner knows about the computing candidates: the coordinator first when it computes,
// then the candidate workers in the order given.
// The planner's shm_id of a node whose data endpoint is ep: 1 for ipc (this host: a tensor-parallel group
// of them exchanges through shared memory, pipe_set_shm), 0 when emulated links or $MESHLM_SHM rule it out.
static int same_host_shm(const cluster_t *c, const char *ep) {
    return strncmp(ep, "ipc://", 6) == 0 && !fault_has_link_rules(c->faults) && pipe_shm_allowed() ? 1 : 0;
}

static int describe_nodes(cluster_t *c, plan_node_t *nodes, int n_compute, char *err, size_t errlen) {
    const int off = c->o.coordinator_shard ? 1 : 0;
    if (c->o.speeds) { // one figure per worker (and the coordinator first): keep the candidates'
        plan_node_t all[PLAN_MAX_NODES];
        int n = plan_parse_nodes(c->o.speeds, all, PLAN_MAX_NODES, err, errlen);
        if (n < 0) return n;
        if (n != c->o.n_workers + off)
            return mlm_fail(err, errlen, MLM_EINVAL, "--speeds lists %d nodes but %d compute", n, c->o.n_workers + off);
        if (off) nodes[0] = all[0];
        for (int j = 0; j < c->n_cand; j++) nodes[j + off] = all[c->cand[j] + off];
    } else {
        plan_parse_nodes("64", nodes, PLAN_MAX_NODES, err, errlen);
    }
    const qtype_t t = (qtype_t)qtype_from_name(model_type_name(c->full));
    const long nproc = sysconf(_SC_NPROCESSORS_ONLN);
    const int ncpu = nproc > 0 ? (int)nproc : 1;
    bool measured = !c->o.speeds;
    for (int j = 0; j < c->n_cand; j++) measured &= c->w[c->cand[j]].hello.n_speeds > 0 || c->o.local_profile;
    const profile_t *here = measured && (c->o.local_profile || off) ? here_profile(c) : NULL;
    for (int j = 0; j < c->n_cand; j++) {
        const worker_t *w = &c->w[c->cand[j]];
        plan_node_t *nd = &nodes[j + off];
        const msg_hello_t *h = &w->hello;
        snprintf(nd->name, sizeof nd->name, "%s", h->node_id);
        if (!nd->mem_budget) nd->mem_budget = h->ram_budget_bytes;
        nd->mem_bw = (double)h->mem_bw_bytes_s;
        nd->disk_bw = (double)h->disk_read_bw_bytes_s;
        if (c->o.local_profile) { // local workers share this machine's disk and cores
            nd->disk_id = 1;
            nd->cpu_id = 1;
            nd->cores = ncpu;
            nd->threads = c->o.n_threads > 0 ? c->o.n_threads : ncpu;
        }
        nd->lat_us = w->lat_us;
        nd->link_bw = w->bw;
        nd->shm_id = same_host_shm(c, w->endpoint);
        double best = 0, sum = 0;
        for (int k = 0; k < h->n_speeds; k++) {
            sum += h->speeds[k].gflops;
            if (h->speeds[k].type == (uint32_t)t) best = h->speeds[k].gflops;
        }
        if (h->n_speeds) nd->gflops = best > 0 ? best : sum / h->n_speeds;
        if (!h->n_speeds && c->o.local_profile && here) { // a local worker: this machine's figures
            nd->gflops = profile_gflops(here, t);
            nd->mem_bw = here->mem_bw;
            if (!nd->disk_bw) nd->disk_bw = here->disk_bw;
        }
        if (measured) nd->speed = nd->gflops;
    }
    // --kv-device reaches every worker in the PLAN: the planner counts each node's KV where it lives
    // (a worker's own --kv-device is not in its HELLO, and its capacity is not checked here)
    const int kv = c->o.kv_device ? plan_kv_dev_kind(c->o.kv_device) : 0;
    for (int j = 0; kv > 0 && j < c->n_cand + off; j++) nodes[j].kv_dev = kv;
    if (off) {
        snprintf(nodes[0].name, sizeof nodes[0].name, "coordinator");
        if (!nodes[0].mem_budget) nodes[0].mem_budget = c->o.mem_budget;
        if (measured && here) {
            nodes[0].speed = nodes[0].gflops = profile_gflops(here, t);
            nodes[0].mem_bw = here->mem_bw;
        }
        if (c->o.local_profile) { // beside its local workers, on the same cores
            nodes[0].cpu_id = 1;
            nodes[0].cores = ncpu;
            nodes[0].threads = c->o.n_threads > 0 ? c->o.n_threads : ncpu;
        }
    }
    for (int j = 0; c->o.verbose && j < c->n_cand + off; j++) {
        const plan_node_t *nd = &nodes[j];
        fprintf(stderr, "meshlm: node %s: %.1f GFLOP/s, %.1f GB/s memory (0: unknown, the planner's defaults)", nd->name,
                nd->gflops, nd->mem_bw / 1e9);
        if (nd->cpu_id > 0) fprintf(stderr, ", %d thread(s) on this machine's %d cores", nd->threads, nd->cores);
        fprintf(stderr, "\n");
    }
    return 0;
}

// The first candidate worker whose HELLO says a protocol older than 1.minor, or -1.
static int older_worker(const cluster_t *c, unsigned minor) {
    for (int j = 0; j < c->n_cand; j++) {
        const msg_hello_t *h = &c->w[c->cand[j]].hello;
        if (h->proto_major <= MSG_PROTO_MAJOR && h->proto_minor < minor) return c->cand[j];
    }
    return -1;
}

// MLM_EUNSUPPORTED: worker wi (older than 1.minor) lacks what a feature needs; advice says what to do.
static int refuse_older(const cluster_t *c, int wi, unsigned minor, const char *lacks, const char *advice, char *err,
                        size_t errlen) {
    const msg_hello_t *h = &c->w[wi].hello;
    return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "worker %s speaks protocol %u.%u, which %s (1.%u and newer); %s",
                    c->w[wi].endpoint, (unsigned)h->proto_major, (unsigned)h->proto_minor, lacks, minor, advice);
}

// Whether every candidate worker runs all-reduce plans (protocol 1.4 or newer). When one does not
// and want is ALLREDUCE: MLM_EUNSUPPORTED naming it; AUTO: *mode becomes EXACT.
static int tp_mode_for_workers(cluster_t *c, plan_tp_mode_t want, plan_tp_mode_t *mode, char *err, size_t errlen) {
    *mode = want;
    const int old = want != PLAN_TP_EXACT ? older_worker(c, MSG_MINOR_TP_MODE) : -1;
    if (old >= 0 && want == PLAN_TP_ALLREDUCE)
        return refuse_older(c, old, MSG_MINOR_TP_MODE, "has no all-reduce tensor parallelism",
                            "use --tp-mode exact or update it", err, errlen);
    if (old >= 0) *mode = PLAN_TP_EXACT;
    return 0;
}

static int make_plan(cluster_t *c, char *err, size_t errlen) {
    const int off = c->o.coordinator_shard ? 1 : 0;
    pick_candidates(c);
    const int n_compute = c->n_cand + off;
    if (c->n_cand == 0 && !off) return mlm_fail(err, errlen, MLM_EPEER, "no worker left to plan over");
    if (n_compute < 1 || n_compute > PLAN_MAX_NODES) {
        snprintf(err, errlen, "%d computing nodes (1..%d)", n_compute, PLAN_MAX_NODES);
        return MLM_EINVAL;
    }
    plan_node_t nodes[PLAN_MAX_NODES];
    int rc = describe_nodes(c, nodes, n_compute, err, errlen);
    if (rc != 0) return rc;
    const model_hparams_t *hp = model_hparams(c->full);
    int n_ctx = c->o.n_ctx > 0 ? c->o.n_ctx : (hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    c->o.n_ctx = n_ctx;
    // The coordinator shares its LAN: its link is as good as the best worker's.
    if (off && !c->o.data && c->o.n_workers > 0) { // (an in-process data plane has no endpoints)
        char ep[256];
        coordinator_endpoint(c, ep, sizeof ep);
        nodes[0].shm_id = same_host_shm(c, ep);
    }
    for (int j = 0; off && j < c->n_cand; j++) {
        const worker_t *w = &c->w[c->cand[j]];
        if (nodes[0].lat_us == 0 || w->lat_us < nodes[0].lat_us) nodes[0].lat_us = w->lat_us;
        if (w->bw > nodes[0].link_bw) nodes[0].link_bw = w->bw;
    }
    plan_tp_mode_t mode;
    if ((rc = tp_mode_for_workers(c, c->o.tp_mode, &mode, err, errlen)) != 0) return rc;
    int ep = c->o.ep;
    const int old_ep = ep >= 0 ? older_worker(c, MSG_MINOR_EP) : -1; // placed experts: 1.5 on every worker
    if (old_ep >= 0 && ep >= 2)
        return refuse_older(c, old_ep, MSG_MINOR_EP, "has no expert parallelism", "drop --ep or update it", err, errlen);
    if (old_ep >= 0) ep = -1;
    if (c->o.ep_hot_file && (c->o.ep_replicated || c->o.ep_replicas > 1 || c->o.plan_file))
        return mlm_fail(err, errlen, MLM_EINVAL, "--ep-hot needs attention on the leader (--ep-attn lead), no "
                                                 "--ep-replicas and no --plan file");
    if (c->o.ep_replicated && c->o.ep_replicas > 1)
        return mlm_fail(err, errlen, MLM_EINVAL, "--ep-replicas %d needs attention on the leader (--ep-attn lead)",
                        c->o.ep_replicas);
    const int old_hot = c->o.ep_hot_file ? older_worker(c, MSG_MINOR_EP_BLOCK) : -1; // second copies per block
    if (old_hot >= 0)
        return refuse_older(c, old_hot, MSG_MINOR_EP_BLOCK, "holds no per-block copies of hot experts",
                            "drop --ep-hot or update it", err, errlen);
    // attention on the leader needs protocol 1.8 on every worker
    const bool ep_repl = c->o.ep_replicated || older_worker(c, MSG_MINOR_EP_LEAD) >= 0;
    const int old_curve = c->o.curve && !c->o.data ? older_worker(c, MSG_MINOR_CURVE) : -1; // a plain data plane
    if (old_curve >= 0)
        return refuse_older(c, old_curve, MSG_MINOR_CURVE, "has no CurveZMQ data plane",
                            "its activations would cross in plaintext; update it", err, errlen);
    plan_model_t *pm = malloc(sizeof *pm);
    if (!pm) return MLM_ENOMEM;
    rc = plan_model_from_gguf(model_gguf(c->full), pm, err, errlen);
    double *pop = NULL; // the routing counts' popularity (--ep-hot)
    if (rc == 0 && c->o.ep_hot_file) {
        if (pm->n_expert <= 0) rc = mlm_fail(err, errlen, MLM_EINVAL, "--ep-hot: %s has no experts", pm->name);
        else if (!(pop = malloc((size_t)pm->n_layer * (size_t)pm->n_expert * sizeof *pop))) rc = MLM_ENOMEM;
        else rc = plan_popularity_load(c->o.ep_hot_file, pm, pop, err, errlen);
        pm->popularity = pop;
    }
    if (rc == 0 && c->o.plan_file) {
        plan_spec_t spec;
        rc = plan_file_load(c->o.plan_file, &spec, err, errlen);
        if (rc == 0 && c->o.tp_mode_set && c->o.tp_mode != PLAN_TP_AUTO) spec.tp_mode = mode; // overrides the file's
        if (rc == 0 && spec.tp_mode == PLAN_TP_ALLREDUCE)
            rc = tp_mode_for_workers(c, PLAN_TP_ALLREDUCE, &mode, err, errlen);
        if (rc == 0) rc = plan_from_spec(pm, nodes, n_compute, &spec, n_ctx, c->plan, err, errlen);
        if (rc == 0) { // predict it as it will run
            c->plan->coord_apart = off == 0;
            c->plan->ubatch = c->o.ubatch > 0 ? c->o.ubatch : 16;
            plan_predict(pm, c->plan);
        }
    } else if (rc == 0) {
        // A forced layout that no longer fits the nodes left after a loss shrinks to them.
        int pp = c->o.pp, tp = c->o.tp;
        if (c->n_lost_total > 0) {
            if (pp > n_compute) pp = n_compute;
            if (tp > 0 && (pp > 0 ? pp : 1) * tp > n_compute) tp = 0;
            // placed experts over fewer members; one member left holds them all (sliced over one)
            const int stages = pp > 0 ? pp : 1;
            if (ep >= 2 && stages * ep > n_compute) ep = n_compute / stages >= 2 ? n_compute / stages : -1;
        }
        // A share that does not fit its node's budget resident streams through the weight window.
        plan_opts_t po = {.n_ctx = n_ctx, .pp = pp, .tp = tp, .keep_all = c->o.keep_all,
                          .pin_first = off != 0, .ubatch = c->o.ubatch > 0 ? c->o.ubatch : 16,
                          .coord_apart = off == 0, .tp_mode = mode, .ep = ep, .ep_replicated = ep_repl,
                          .ep_replicas = ep_repl ? 1 : ep >= 2 && c->o.ep_replicas > ep ? ep : c->o.ep_replicas};
        po.expert_cache = c->o.expert_cache ? c->o.expert_cache : -1; // 0: auto, as the workers under a budget
        if (pop && !ep_repl) po.ep_hot = c->o.ep_hot > 0 ? c->o.ep_hot : pm->n_expert_used;
        if (po.ep_hot > pm->n_expert) po.ep_hot = pm->n_expert;
        rc = plan_make(pm, nodes, n_compute, &po, c->plan, NULL, 0, NULL, err, errlen);
    }
    free(pop);
    free(pm);
    if (rc != 0) return rc;
    if (c->o.verbose && c->plan->why[0]) fprintf(stderr, "meshlm: plan %s: %s\n", c->plan->layout, c->plan->why);
    const plan_t *pl = c->plan;
    if (off && (pl->n < 1 || pl->shard[0].node != 0)) {
        snprintf(err, errlen, "the plan must start with the coordinator's own share");
        return MLM_EINVAL;
    }
    // Ranks: 0 is the coordinator; the plan's shards follow in order (the coordinator's own share,
    // when it computes, is rank 0).
    c->n_nodes = pl->n + (off ? 0 : 1);
    for (int i = 0; i < c->o.n_workers; i++) c->w[i].rank = -1;
    c->slices[0] = (shard_slice_t){0};
    c->rank_worker[0] = -1;
    for (int i = 0; i < pl->n; i++) {
        const int r = i + (off ? 0 : 1), j = pl->shard[i].node - off, wi = j >= 0 ? c->cand[j] : -1;
        c->slices[r] = pl->shard[i].s;
        c->slices[r].cols = pl->tp_mode == PLAN_TP_ALLREDUCE; // what the workers derive from the PLAN
        if (wi >= 0) {
            c->rank_worker[r] = wi;
            c->w[wi].rank = r;
        }
    }
    if (c->o.data) { // a given data plane: its ranks are the plan's nodes, every worker in order
        bool ok = c->n_nodes == comm_size(c->o.data);
        for (int i = 0; ok && i < c->o.n_workers; i++) ok = c->w[i].rank == i + 1;
        if (!ok)
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "with a fixed set of ranks (MPI) the plan must use every rank in rank order, the "
                            "coordinator's share first; this plan (%s) does not", pl->layout);
    }
    c->stats.n_compute = pl->n;
    c->ubatch = c->o.ubatch > 0 ? c->o.ubatch : (pl->n_stages > 1 ? 16 : 0);
    for (int r = 0; r < c->n_nodes; r++) {
        msg_plan_node_t *p = &c->pnodes[r];
        const shard_slice_t *s = &c->slices[r];
        const int wi = c->rank_worker[r];
        memset(p, 0, sizeof *p);
        p->index = (uint32_t)r;
        snprintf(p->node_id, sizeof p->node_id, "%s", wi < 0 ? "coordinator" : c->w[wi].hello.node_id);
        p->layers = (msg_range_t){s->l0, s->l1};
        p->heads = (msg_range_t){s->h0, s->h1};
        p->kv_heads = (msg_range_t){s->kv0, s->kv1};
        p->n_ffn = 1;
        p->ffn[0] = (msg_range_t){s->f0, s->f1};
        p->hidden = (msg_range_t){s->e0, s->e1};
        p->vocab = (msg_range_t){s->v0, s->v1};
        for (int e = 0; pl->ep && r >= (off ? 0 : 1) && e < hp->n_expert && e < MSG_MAX_EXPERTS; e++)
            if (plan_has_expert(pl, r - (off ? 0 : 1), e)) p->experts[p->n_experts++] = (uint16_t)e;
        for (int il = s->l0; pl->ep && r >= (off ? 0 : 1) && il < s->l1 && il < PLAN_MAX_LAYERS; il++) // 1.9
            for (int h = 0; h < pl->ep_hot_n[il] && p->n_block_experts < MSG_MAX_BLOCK_EXPERTS; h++)
                if (pl->ep_hot_of[il][h].shard == r - (off ? 0 : 1))
                    p->block_experts[p->n_block_experts++] = (uint32_t)il << 8 | pl->ep_hot_of[il][h].expert;
        // a computing share of placed experts holds those alone (what a 1.9 worker derives from the PLAN)
        if (pl->ep && s->l1 > s->l0) {
            shard_set_experts(&c->slices[r], p->experts, (int)p->n_experts);
            for (int j = 0; j < p->n_block_experts; j++) shard_add_expert(&c->slices[r], (int)(p->block_experts[j] & 255u));
        }
        if (r >= (off ? 0 : 1)) { // the links the planner assumed, so every group chooses star or ring alike
            const plan_node_t *nd = &pl->node[pl->shard[r - (off ? 0 : 1)].node];
            p->link_lat_us = (float)nd->lat_us;
            p->link_bw = nd->link_bw > 0 ? (uint64_t)nd->link_bw : 0;
        }
        if (c->o.data) snprintf(p->endpoint, sizeof p->endpoint, "rank:%d", r);
        else if (wi >= 0) snprintf(p->endpoint, sizeof p->endpoint, "%s", c->w[wi].data_endpoint);
        else coordinator_endpoint(c, p->endpoint, sizeof p->endpoint);
        if (c->o.curve && !c->o.data) { // the data plane's keys: the worker's from --curve-peers, else our own
            const char *key = wi >= 0 ? curve_peer_key(&c->o.curve->peers, c->w[wi].endpoint) : c->o.curve->self.pub;
            if (!key)
                return mlm_fail(err, errlen, MLM_EINVAL, "no CurveZMQ key is listed for worker %s (add 'KEY %s' to "
                                "the peers file)", c->w[wi].endpoint, c->w[wi].endpoint);
            snprintf(p->curve_key, sizeof p->curve_key, "%s", key);
        }
    }
    return 0;
}

static int send_plan(cluster_t *c, char *err, size_t errlen) {
    const model_hparams_t *hp = model_hparams(c->full);
    msg_t m;
    msg_init(&m, MSG_PLAN);
    msg_plan_t *p = &m.plan;
    p->plan_id = c->plan_id = ((uint64_t)getpid() << 20 ^ (uint64_t)time(NULL)) + (uint64_t)++c->n_plans * 0x9e37u;
    memcpy(p->model_sha256, c->sha, 32);
    p->n_layer = (uint32_t)hp->n_layer;
    p->n_head = (uint32_t)hp->n_head;
    p->n_head_kv = (uint32_t)hp->n_head_kv;
    p->n_ff = (uint32_t)hp->n_ff;
    p->n_expert = (uint32_t)hp->n_expert;
    p->n_embd = (uint32_t)hp->n_embd;
    p->n_vocab = (uint32_t)hp->n_vocab;
    p->n_ctx = (uint32_t)c->o.n_ctx;
    p->kv_type = c->o.kv_q8 ? QT_Q8_0 : c->o.kv_f32 ? QT_F32 : QT_F16;
    p->n_batch = c->o.n_batch > 0 ? (uint32_t)c->o.n_batch : 0;
    p->tp_mode = c->plan->ep ? (c->plan->ep_lead ? MSG_TP_EXPERT_LEAD : MSG_TP_EXPERT)
                 : c->plan->tp_mode == PLAN_TP_ALLREDUCE ? MSG_TP_ALLREDUCE
                                                         : MSG_TP_EXACT;
    if (c->o.kv_device && snprintf(p->kv_device, sizeof p->kv_device, "%s", c->o.kv_device) >= (int)sizeof p->kv_device)
        return mlm_fail(err, errlen, MLM_ERANGE, "--kv-device '%s' is longer than %d bytes", c->o.kv_device,
                        MSG_DEVICE_MAX - 1);
    p->n_nodes = c->n_nodes;
    p->nodes = c->pnodes;
    for (int i = 0; i < c->o.n_workers; i++) {
        if (c->w[i].rank < 0) continue; // left out of this plan
        char e2[256];
        int rc = msg_send(c->ctl, c->w[i].peer, &m, c->timeout_ms, e2, sizeof e2);
        if (rc != 0) return mlm_fail(err, errlen, rc, "worker %s: %s", c->w[i].endpoint, e2);
    }
    return 0;
}

// Waits for worker wi's HEARTBEATs until it has written all but `credit` of the `sent` bytes (a
// worker with a memory budget paces its shard so). 0, or the error of the link or the worker.
static int await_written(cluster_t *c, int wi, uint64_t sent, uint64_t credit, uint64_t *written, char *err,
                         size_t errlen) {
    while (sent - *written > credit) {
        msg_t m;
        comm_msg_t raw;
        char e2[256];
        int rc = msg_recv(c->ctl, c->w[wi].peer, &m, &raw, NULL, c->timeout_ms, e2, sizeof e2);
        if (rc != 0) return mlm_fail(err, errlen, rc, "worker %s: waiting for it to write its shard: %s",
                                     c->w[wi].endpoint, e2);
        if (m.type == MSG_HEARTBEAT && m.heartbeat.seq > *written) *written = m.heartbeat.seq;
        else if (m.type != MSG_HEARTBEAT)
            rc = mlm_fail(err, errlen, m.type == MSG_ERROR ? m.error.code : MLM_EPROTO,
                          "worker %s stopped receiving its shard: %s", c->w[wi].endpoint,
                          m.type == MSG_ERROR ? m.error.text : msg_type_name(m.type));
        msg_clear(&m);
        comm_msg_free(&raw);
        if (rc != 0) return rc;
    }
    return 0;
}

// Streams the worker's shard file (written from the coordinator's copy) as SLICE_DATA chunks, at most
// `credit` bytes ahead of what the worker has written when it asked for pacing (credit 0: no limit).
static int stream_shard(cluster_t *c, int wi, const gguf_t *src, int head_dim, uint64_t credit, char *err,
                        size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "%s/meshlm-shard-%ld-%d.gguf", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
             (long)getpid(), wi);
    shard_slice_t sl = c->slices[c->w[wi].rank];
    const msg_hello_t *h = &c->w[wi].hello;
    if (sl.placed && h->proto_major <= MSG_PROTO_MAJOR && h->proto_minor < MSG_MINOR_EP_BLOCK) {
        sl.placed = 0; // a 1.8 worker reads every expert's plane from its shard file
        memset(sl.experts, 0, sizeof sl.experts);
    }
    int rc = shard_file_write(src, &sl, head_dim, c->sha, path, err, errlen);
    if (rc != 0) return rc;
    FILE *f = fopen(path, "rb");
    uint8_t *buf = malloc(CHUNK_BYTES);
    if (!f || !buf) rc = MLM_EIO;
    uint64_t total = 0, off = 0, written = 0;
    const bool show = isatty(2) != 0;
    const double t0 = mlm_now_ms();
    if (rc == 0) {
        fseek(f, 0, SEEK_END);
        total = (uint64_t)ftell(f);
        rewind(f);
    }
    while (rc == 0 && off < total) {
        size_t n = fread(buf, 1, CHUNK_BYTES, f);
        if (n == 0) {
            rc = MLM_EIO;
            break;
        }
        msg_t m;
        msg_init(&m, MSG_SLICE_DATA);
        msg_slice_data_t *sd = &m.slice_data;
        sd->plan_id = c->plan_id; // 1.5
        snprintf(sd->tensor, sizeof sd->tensor, "shard.gguf");
        sd->type = QT_I8;
        sd->n_dims = 1;
        sd->ne[0] = (int64_t)total;
        sd->dim = 0;
        sd->begin = 0;
        sd->end = (int64_t)total;
        sd->offset = off;
        sd->total = total;
        sd->data = buf;
        sd->len = n;
        rc = msg_send(c->ctl, c->w[wi].peer, &m, c->timeout_ms, err, errlen);
        off += n;
        if (rc == 0 && credit && off < total) rc = await_written(c, wi, off, credit, &written, err, errlen);
        if (show) {
            double el = (mlm_now_ms() - t0) / 1e3;
            fprintf(stderr, "\rmeshlm: shard %d -> %s: %.1f / %.1f MB (%.0f MB/s)   ", wi + 1, c->w[wi].endpoint,
                    (double)off / 1e6, (double)total / 1e6, el > 0 ? (double)off / 1e6 / el : 0.0);
            if (off >= total) fputc('\n', stderr);
        }
    }
    if (f) fclose(f);
    free(buf);
    unlink(path);
    if (rc == 0) c->stats.shard_bytes_sent += total;
    else if (!err[0]) snprintf(err, errlen, "streaming the shard to %s failed", c->w[wi].endpoint);
    return rc;
}

static int load_shards(cluster_t *c, char *err, size_t errlen) {
    c->stats.worker_load_ms = 0;
    for (int i = 0; i < c->o.n_workers; i++) {
        if (c->w[i].rank < 0) continue;
        msg_t m;
        msg_init(&m, MSG_LOAD_SHARD);
        m.load_shard.plan_id = c->plan_id; // 1.5: a worker ignores one of another plan
        m.load_shard.node_index = (uint32_t)c->w[i].rank;
        m.load_shard.via_coordinator = !c->w[i].hello.has_model || memcmp(c->w[i].hello.model_sha256, c->sha, 32) != 0;
        char e2[256];
        int rc = msg_send(c->ctl, c->w[i].peer, &m, c->timeout_ms, e2, sizeof e2);
        if (rc != 0) return mlm_fail(err, errlen, rc, "worker %s: %s", c->w[i].endpoint, e2);
    }
    for (int i = 0; i < c->o.n_workers; i++) {
        if (c->w[i].rank < 0) continue;
        msg_t m;
        comm_msg_t raw;
        int rc = cl_recv_type(c, i, MSG_LOAD_SHARD_ACK, &m, &raw, err, errlen);
        if (rc != 0) return rc;
        int status = m.load_shard_ack.status;
        bool cached = m.load_shard_ack.from_cache;
        double ack_ms = (double)m.load_shard_ack.ms;
        const uint64_t credit = status == MLM_ENOTFOUND ? m.load_shard_ack.bytes : 0; // its pacing, if it asks
        msg_clear(&m);
        comm_msg_free(&raw);
        if (status == MLM_ENOTFOUND) { // it has neither the model nor a cached shard: send it
            if (c->o.verbose) fprintf(stderr, "meshlm: streaming shard %d to %s\n", i + 1, c->w[i].endpoint);
            if ((rc = stream_shard(c, i, model_gguf(c->full), model_hparams(c->full)->head_dim, credit, err, errlen)) != 0)
                return rc;
            if ((rc = cl_recv_type(c, i, MSG_LOAD_SHARD_ACK, &m, &raw, err, errlen)) != 0) return rc;
            status = m.load_shard_ack.status;
            ack_ms = (double)m.load_shard_ack.ms;
            msg_clear(&m);
            comm_msg_free(&raw);
            c->stats.streamed++;
        } else if (cached) {
            c->stats.from_cache++;
        } else if (status == 0) {
            c->stats.from_file++;
        }
        if (status == 0 && ack_ms > c->stats.worker_load_ms) c->stats.worker_load_ms = ack_ms;
        if (status != 0) { // the worker follows a failed ack with an ERROR that says why
            char why[MSG_TEXT_MAX] = "";
            if (msg_recv(c->ctl, c->w[i].peer, &m, &raw, NULL, 1000, why, sizeof why) == 0) {
                snprintf(why, sizeof why, "%s", m.type == MSG_ERROR ? m.error.text : mlm_strerror(status));
                msg_clear(&m);
                comm_msg_free(&raw);
            } else {
                snprintf(why, sizeof why, "%s", mlm_strerror(status));
            }
            if (status == MLM_EFULL) c->w[i].disk_full = true; // left out of later plans
            return mlm_fail(err, errlen, status, "worker %s could not load its shard: %s", c->w[i].endpoint, why);
        }
    }
    return 0;
}

// --- public API

int cluster_new(cluster_t **out, const cluster_opts_t *o, char *err, size_t errlen) {
    *out = NULL;
    const int n_workers = o->control ? comm_size(o->control) - 1 : o->n_workers;
    const int min_workers = o->control && o->coordinator_shard ? 0 : 1; // one MPI rank computes alone
    if (n_workers < min_workers || n_workers >= MSG_MAX_NODES)
        return mlm_fail(err, errlen, MLM_EINVAL, "need %d..%d workers, have %d", min_workers, MSG_MAX_NODES - 1,
                        n_workers);
    if (o->control && (comm_rank(o->control) != 0 || !o->data))
        return mlm_fail(err, errlen, MLM_EINVAL, "a given control comm needs rank 0 and a given data plane");
    if (o->data && comm_size(o->data) != n_workers + 1)
        return mlm_fail(err, errlen, MLM_EINVAL, "the data plane has %d ranks for %d workers and the coordinator",
                        comm_size(o->data), n_workers);
    cluster_t *c = calloc(1, sizeof *c);
    if (!c) return MLM_ENOMEM;
    c->o = *o;
    c->o.n_workers = n_workers;
    c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 30000;
    c->n_nodes = n_workers + 1;
    c->w = calloc((size_t)n_workers, sizeof *c->w);
    c->plan = calloc(1, sizeof *c->plan);
    c->slices = calloc((size_t)c->n_nodes, sizeof *c->slices);
    c->pnodes = calloc((size_t)c->n_nodes, sizeof *c->pnodes);
    c->rank_worker = calloc((size_t)c->n_nodes, sizeof *c->rank_worker);
    int rc = (c->w && c->plan && c->slices && c->pnodes && c->rank_worker) ? 0 : MLM_ENOMEM;
    for (int i = 0; rc == 0 && i < n_workers; i++) {
        worker_t *w = &c->w[i];
        w->peer = i + 1;
        w->rank = -1;
        w->lost_report = -1;
        w->standby = i >= n_workers - o->n_standby;
        if (o->control) {
            snprintf(w->endpoint, sizeof w->endpoint, "rank %d", i + 1);
        } else {
            snprintf(w->endpoint, sizeof w->endpoint, "%s", o->workers[i]);
            if (comm_link_data_endpoint(w->endpoint, w->data_endpoint, sizeof w->data_endpoint) != 0)
                rc = mlm_fail(err, errlen, MLM_EINVAL, "worker endpoint %s: want tcp://HOST:PORT or ipc:///PATH",
                              w->endpoint);
        }
    }
    // Emulated links ($MESHLM_FAULTS) apply to the channels this side makes (the link, ZeroMQ data).
    if (rc == 0 && !o->control) rc = fault_from_env(&c->faults, err, errlen);
    if (rc == 0 && !o->same_file && o->model_sha256) memcpy(c->sha, o->model_sha256, 32);
    else if (rc == 0 && !o->same_file) rc = sha256_file(o->model_path, c->sha, err, errlen);
    model_load_opts_t flo = {.repack = false};
    if (rc == 0) rc = model_load(&c->full, o->model_path, &flo, err, errlen);
    if (rc == 0 && o->control) {
        c->ctl = o->control;
    } else if (rc == 0) {
        const char *eps[MSG_MAX_NODES];
        for (int i = 0; i < n_workers; i++) eps[i] = c->w[i].endpoint;
        // ZMTP heartbeats on every link: a frozen worker's connection drops within about hb ms.
        comm_open_opts_t co = {.rank = 0, .size = c->n_nodes, .endpoints = eps, .curve = c->o.curve};
        comm_open_heartbeat(&co, c->o.heartbeat_ms);
        rc = comm_open(&c->ctl, "link", &co, err, errlen);
        c->ctl_owned = rc == 0;
    }
    if (rc != 0) {
        cluster_close(&c, false);
        return rc;
    }
    *out = c;
    return 0;
}

int cluster_hello(cluster_t *c, char *err, size_t errlen) {
    const double t0 = mlm_now_ms();
    int rc = say_hello(c, err, errlen);
    if (rc != 0 && c->o.curve && (rc == MLM_ETIMEOUT || rc == MLM_EPEER)) {
        const size_t n = strlen(err);
        snprintf(err + n, errlen > n ? errlen - n : 0, "; with CurveZMQ: the worker refuses a coordinator whose key "
                 "it does not list (its log says so), and a worker key that is not the one in --curve-peers fails the "
                 "handshake");
    }
    if (rc == 0) rc = measure_links(c, err, errlen);
    if (rc == 0) c->phase = PHASE_HELLO;
    c->stats.load_ms += mlm_now_ms() - t0;
    return rc;
}

// Ends the current plan on this side: the coordinator's contexts, model and data plane. Every
// sequence starts again at position 0 (the nodes drop their caches when a new plan arrives). A
// slice held without a memory budget is kept for the next load (c->kept).
static void end_plan(cluster_t *c) {
    for (int i = 0; i < CLUSTER_MAX_SEQS; i++) {
        model_ctx_destroy(&c->ctx[i]);
        c->pos[i] = 0;
    }
    if (c->model && !c->o.mem_budget) {
        model_destroy(&c->kept);
        c->kept = c->model;
        c->model = NULL;
    }
    model_destroy(&c->model);
    pipe_node_free(&c->pipe);
    memset(&c->pipe, 0, sizeof c->pipe);
    if (c->comm != c->o.data) comm_destroy(&c->comm);
    c->comm = NULL;
}

int cluster_make_plan(cluster_t *c, char *err, size_t errlen) {
    if (c->phase < PHASE_HELLO) return mlm_fail(err, errlen, MLM_ESTATE, "plan before hello");
    cl_readmit(c); // lost workers that answer again are taken in at this plan
    const double t0 = mlm_now_ms();
    end_plan(c);
    c->phase = PHASE_HELLO;
    int rc = make_plan(c, err, errlen);
    if (rc == 0) rc = send_plan(c, err, errlen);
    if (rc == 0) c->phase = PHASE_PLANNED;
    if (rc == 0 && c->o.on_plan) c->o.on_plan(c->o.on_plan_arg, c->plan);
    c->stats.load_ms += mlm_now_ms() - t0;
    return rc;
}

// The coordinator's own share (an empty slice when it computes nothing), within its budget. An
// all-reduce share that streams (its columns lie apart in the model file) reads them from a columns
// file of its slice (the rest from the model file), written for this load into $TMPDIR and unlinked
// once the window has it open.
static int load_own_share(cluster_t *c, char *err, size_t errlen) {
    // a paging KV device spills what the budget leaves no room for: the budget plans the weights alone
    const bool pages = attn_dev_pages(c->o.kv_device) && c->o.coordinator_shard && c->o.mem_budget;
    model_load_opts_t lo = {.repack = true, .slice = &c->slices[0], .n_ctx = pages ? 1 : c->o.n_ctx,
                            .mem_budget = c->o.coordinator_shard ? c->o.mem_budget : 0,
                            .weights = c->o.weights, .expert_skip = c->o.expert_skip};
    const model_hparams_t *hp = model_hparams(c->full);
    uint64_t mask[4] = {0}; // placed experts: the ones this share computes
    for (int j = 0; j < c->pnodes[0].n_experts; j++) mask[c->pnodes[0].experts[j] >> 6] |= (uint64_t)1 << (c->pnodes[0].experts[j] & 63);
    if (c->plan->ep && c->o.coordinator_shard) {
        lo.experts = mask;
        lo.block_experts = c->pnodes[0].block_experts;
        lo.n_block_experts = c->pnodes[0].n_block_experts;
    }
    const weights_params_t wp = {.g = model_gguf(c->full), .hp = hp, .slice = lo.slice, .budget_bytes = lo.mem_budget,
                                 .n_ctx = lo.n_ctx};
    bool need = false;
    lo.reuse = c->kept; // the rows the last plan's slice has in common with this one
    int rc = weights_need_shard_file(&wp, &need, err, errlen);
    if (rc != 0 || !need) {
        rc = model_load(&c->model, c->o.model_path, &lo, err, errlen);
        model_destroy(&c->kept);
        return rc;
    }
    char path[300];
    snprintf(path, sizeof path, "%s/meshlm-share-%ld.cols.gguf", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
             (long)getpid());
    rc = shard_file_write_cols(model_gguf(c->full), lo.slice, hp->head_dim, c->sha, path, err, errlen);
    lo.cols_path = path;
    if (rc == 0) rc = model_load(&c->model, c->o.model_path, &lo, err, errlen);
    model_destroy(&c->kept);
    unlink(path);
    return rc;
}

// The coordinator's end of the data plane: the given one, or ZeroMQ over the plan's endpoints.
static int open_data_plane(cluster_t *c, char *err, size_t errlen) {
    if (c->o.data) {
        c->comm = c->o.data;
        return 0;
    }
    const char *eps[MSG_MAX_NODES], *keys[MSG_MAX_NODES]; // (n_nodes) each rank's endpoint and CurveZMQ key
    for (int i = 0; i < c->n_nodes; i++) eps[i] = c->pnodes[i].endpoint, keys[i] = c->pnodes[i].curve_key;
    // with keys the data plane is CurveZMQ too: this coordinator's rank uses its own key pair
    comm_open_opts_t co = {.rank = 0, .size = c->n_nodes, .endpoints = eps, .timeout_ms = c->timeout_ms,
                           .fault_spec = c->faults, .fail_on_any_loss = true,
                           .session = (uint16_t)(c->plan_id | 1), .curve = c->o.curve,
                           .curve_keys = c->o.curve ? keys : NULL};
    comm_open_heartbeat(&co, c->o.heartbeat_ms);
    int rc = comm_open(&c->comm, fault_has_link_rules(c->faults) ? "fault:zmq" : "zmq", &co, err, errlen);
    for (int i = 0; rc != 0 && i < c->o.n_workers; i++) // a worker that failed to set up says why
        if (c->w[i].rank >= 0 && cl_drain_reports(c, i, 100) != 0) {
            size_t k = strlen(err);
            snprintf(err + k, errlen > k ? errlen - k : 0, " (%s)", c->errbuf);
            break;
        }
    return rc;
}

int cluster_load(cluster_t *c, char *err, size_t errlen) {
    if (c->phase < PHASE_PLANNED) return mlm_fail(err, errlen, MLM_ESTATE, "load before a plan");
    const double t0 = mlm_now_ms();
    int rc = load_shards(c, err, errlen);
    c->shards_ms = mlm_now_ms() - t0;
    // A worker whose disk is full cannot take its shard. The others have opened their data planes
    // and wait in its handshake until their deadline, so this plan is given up with the worker's
    // reason; the worker is left out of every later plan (disk_full).
    if (rc == 0) rc = open_data_plane(c, err, errlen);
    if (rc == 0) rc = load_own_share(c, err, errlen);
    if (rc == 0) {
        const model_hparams_t *hp = model_hparams(c->model);
        rc = pipe_node_init(&c->pipe, c->comm, 0, c->slices, c->n_nodes, hp->n_layer, hp->n_embd, hp->n_vocab,
                            c->timeout_ms, err, errlen);
    }
    if (rc == 0) { // the same link figures the workers take from the PLAN
        double lat[MSG_MAX_NODES], bw[MSG_MAX_NODES]; // (n_nodes) one-way us, bytes/s
        for (int i = 0; i < c->n_nodes; i++) lat[i] = c->pnodes[i].link_lat_us, bw[i] = (double)c->pnodes[i].link_bw;
        pipe_set_links(&c->pipe, lat, bw);
    }
    if (rc == 0 && c->plan->ep) { // the same groups the workers make from the PLAN's expert lists
        const model_hparams_t *hp = model_hparams(c->full);
        rc = pipe_set_experts(&c->pipe, c->pnodes, hp->n_layer, hp->n_expert, c->plan->ep_lead, err, errlen);
    }
    if (rc == 0 && !c->o.data) { // a group on one host: its collectives through shared memory
        const char *eps[MSG_MAX_NODES]; // (n_nodes) the plan's data endpoints
        for (int i = 0; i < c->n_nodes; i++) eps[i] = c->pnodes[i].endpoint;
        rc = pipe_set_shm(&c->pipe, eps, err, errlen);
    }
    c->computes = c->o.coordinator_shard;
    if (rc == 0 && c->computes) {
        model_ctx_t *ctx0;
        if ((rc = cl_seq_ctx(c, 0, &ctx0)) != 0) snprintf(err, errlen, "%s", c->errbuf);
    }
    if (rc == 0) c->phase = PHASE_LOADED;
    else end_plan(c);
    c->plane_ms = mlm_now_ms() - t0 - c->shards_ms;
    c->stats.load_ms += mlm_now_ms() - t0;
    return rc;
}

void cluster_set_layout(cluster_t *c, int pp, int tp, bool keep_all, const char *plan_file) {
    c->o.pp = pp;
    c->o.tp = tp;
    c->o.keep_all = keep_all;
    c->o.plan_file = plan_file;
}

int cluster_open(cluster_t **out, const cluster_opts_t *o, char *err, size_t errlen) {
    cluster_t *c = NULL;
    int rc = cluster_new(&c, o, err, errlen);
    if (rc == 0) rc = cluster_hello(c, err, errlen);
    if (rc == 0) rc = cluster_make_plan(c, err, errlen);
    if (rc == 0 && o->drop_cache) launch_drop_cache(o->model_path);
    if (rc == 0) rc = cluster_load(c, err, errlen);
    if (rc != 0) {
        cluster_close(&c, false);
        return rc;
    }
    *out = c;
    return 0;
}

const model_t *cluster_model(const cluster_t *c) { return c->full; }
const plan_t *cluster_plan(const cluster_t *c) { return c->plan; }
const cluster_stats_t *cluster_stats(const cluster_t *c) { return &c->stats; }
const char *cluster_error(const cluster_t *c) { return c->errbuf; }

void cluster_close(cluster_t **self_p, bool exit_workers) {
    if (!self_p || !*self_p) return;
    cluster_t *c = *self_p;
    end_plan(c);
    for (int i = 0; c->ctl && i < c->o.n_workers; i++) {
        msg_t m;
        msg_init(&m, MSG_SHUTDOWN);
        snprintf(m.shutdown.reason, sizeof m.shutdown.reason, "%s", exit_workers ? "exit" : "plan done");
        char err[128];
        msg_send(c->ctl, c->w[i].peer, &m, 1000, err, sizeof err);
    }
    if (c->ctl_owned) comm_destroy(&c->ctl);
    model_destroy(&c->kept);
    model_destroy(&c->full);
    free(c->w);
    free(c->plan);
    free(c->slices);
    free(c->pnodes);
    free(c->rank_worker);
    fault_free(&c->faults);
    for (int i = 0; i < CLUSTER_MAX_SEQS; i++) {
        free(c->hist[i].tokens);
        free(c->hist[i].steps);
    }
    free(c);
    *self_p = NULL;
}
