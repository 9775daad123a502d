// Coordinator side of a cluster: hello, plan, shard loading with slice streaming, data plane, steps.
#include "worker/clock.h"
#include "coordinator/cluster.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cluster/profile.h"
#include "proto/msg_io.h"
#include "transport/comm_zmq.h"
#include "transport/gatherv.h"
#include "transport/link.h"
#include "worker/err.h"
#include "worker/sha256.h"

// --- types

#define CHUNK_BYTES (4u << 20)  // shard streaming chunk

typedef struct {
    link_t *link;               // control link
    char endpoint[MSG_ENDPOINT_MAX];
    char data_endpoint[MSG_ENDPOINT_MAX];
    msg_hello_t hello;          // what it said about itself
} worker_t;

typedef struct {
    comm_t *comm;
    int timeout_ms;
    cluster_stats_t *stats;     // counters to update
    int n;                      // ranks
} cl_gather_t;

static int cl_logits(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens);

struct cluster {
    cluster_opts_t o;
    int timeout_ms;
    uint8_t sha[32];            // of the model file
    worker_t *w;                // (n_workers)
    int n_nodes;                // workers + 1 (the coordinator is node 0)
    plan_t *plan;               // shares of the computing nodes
    shard_slice_t *slices;      // (n_nodes) node 0 = coordinator (empty unless it computes)
    msg_plan_node_t *pnodes;    // (n_nodes) as sent
    model_t *model;             // the coordinator's slice (empty unless it computes)
    model_ctx_t *ctx;           // its context, only when it computes
    bool computes;              // the coordinator holds a share
    int pos;                    // tokens in the cluster's caches
    uint8_t *lbuf;              // (n_batch rows of n_vocab floats) landing buffer for logit rows
    size_t lbuf_cap;
    cl_gather_t gc;
    model_tp_t tp;
    uint64_t step_id;
    cluster_stats_t stats;
    char errbuf[512];           // last failure, for cluster_error
};

// --- helpers

// Logit rows of every computing node land at the coordinator.
static int cl_logits(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    cl_gather_t *g = ctx;
    const double t0 = mlm_now_ms();
    int rc = comm_gatherv_root(g->comm, 0, 0, g->n, mine, my_len, out, lens, g->timeout_ms);
    g->stats->gather_ms += mlm_now_ms() - t0;
    for (int r = 1; r < g->n; r++) g->stats->gather_bytes += (uint64_t)lens[r];
    return rc;
}

static int cl_gather(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    cl_gather_t *g = ctx;
    const double t0 = mlm_now_ms();
    int rc = comm_allgatherv(g->comm, mine, my_len, out, lens, g->timeout_ms);
    g->stats->gather_ms += mlm_now_ms() - t0;
    for (int r = 0; r < g->n; r++) g->stats->gather_bytes += (uint64_t)lens[r] * (uint64_t)(g->n - 1);
    g->stats->gathers++;
    return rc;
}

// A free TCP port on the given local IPv4 address (bound and released: a small race other
// programs could win).
static int free_port(struct in_addr ip) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr = ip};
    socklen_t len = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
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

static int recv_type(cluster_t *c, int wi, msg_type_t want, msg_t *m, comm_msg_t *raw, char *err, size_t errlen) {
    int rc = msg_recv_link(c->w[wi].link, m, raw, c->timeout_ms, err, errlen);
    if (rc != 0) {
        snprintf(err, errlen, "worker %s: no answer within %d ms (%s)", c->w[wi].endpoint, c->timeout_ms,
                 mlm_strerror(rc));
        return rc;
    }
    if (m->type == MSG_ERROR) {
        snprintf(err, errlen, "worker %s: %s", c->w[wi].endpoint, m->error.text);
        rc = m->error.code < 0 ? m->error.code : MLM_EPROTO;
    } else if (m->type != want) {
        snprintf(err, errlen, "worker %s: expected %s, got %s", c->w[wi].endpoint, msg_type_name(want),
                 msg_type_name(m->type));
        rc = MLM_EPROTO;
    }
    if (rc != 0) {
        msg_clear(m);
        comm_msg_free(raw);
    }
    return rc;
}

static int say_hello(cluster_t *c, char *err, size_t errlen) {
    for (int i = 0; i < c->o.n_workers; i++) {
        worker_t *w = &c->w[i];
        snprintf(w->endpoint, sizeof w->endpoint, "%s", c->o.workers[i]);
        int rc = link_connect(&w->link, w->endpoint, err, errlen);
        if (rc == 0 && link_data_endpoint(w->endpoint, w->data_endpoint, sizeof w->data_endpoint) != 0) {
            snprintf(err, errlen, "worker endpoint %s: want tcp://HOST:PORT or ipc:///PATH", w->endpoint);
            rc = MLM_EINVAL;
        }
        if (rc != 0) return rc;
        msg_t m;
        msg_init(&m, MSG_HELLO);
        snprintf(m.hello.node_id, sizeof m.hello.node_id, "coordinator");
        m.hello.role = MSG_ROLE_COORDINATOR;
        m.hello.n_cores = 1;
        if ((rc = msg_send_link(w->link, &m, c->timeout_ms, err, errlen)) != 0) return rc;
    }
    for (int i = 0; i < c->o.n_workers; i++) {
        msg_t m;
        comm_msg_t raw;
        int rc = recv_type(c, i, MSG_HELLO, &m, &raw, err, errlen);
        if (rc != 0) return rc;
        c->w[i].hello = m.hello;
        msg_clear(&m);
        comm_msg_free(&raw);
        for (int j = 0; j < i; j++)
            if (!strcmp(c->w[j].hello.node_id, c->w[i].hello.node_id)) {
                snprintf(err, errlen, "workers %s and %s share the node id %s", c->w[j].endpoint, c->w[i].endpoint,
                         c->w[i].hello.node_id);
                return MLM_EINVAL;
            }
    }
    return 0;
}

static int make_plan(cluster_t *c, const model_t *full, char *err, size_t errlen) {
    const int n_compute = c->o.n_workers + (c->o.coordinator_shard ? 1 : 0);
    plan_node_t nodes[PLAN_MAX_NODES];
    if (n_compute < 1 || n_compute > PLAN_MAX_NODES) {
        snprintf(err, errlen, "%d computing nodes (1..%d)", n_compute, PLAN_MAX_NODES);
        return MLM_EINVAL;
    }
    if (c->o.speeds) {
        int n = plan_parse_nodes(c->o.speeds, nodes, PLAN_MAX_NODES, err, errlen);
        if (n < 0) return n;
        if (n != n_compute) {
            snprintf(err, errlen, "--speeds lists %d nodes but %d compute", n, n_compute);
            return MLM_EINVAL;
        }
    } else {
        // Measured speed for the model's main weight type, when every worker reported one.
        plan_parse_nodes("64", nodes, PLAN_MAX_NODES, err, errlen);
        int t = qtype_from_name(model_type_name(full));
        bool all = true;
        for (int i = 0; i < c->o.n_workers; i++) all &= c->w[i].hello.n_speeds > 0;
        for (int i = 0; all && i < c->o.n_workers; i++) {
            double best = 0, sum = 0;
            for (int j = 0; j < c->w[i].hello.n_speeds; j++) {
                sum += c->w[i].hello.speeds[j].gflops;
                if (c->w[i].hello.speeds[j].type == t) best = c->w[i].hello.speeds[j].gflops;
            }
            nodes[i + (c->o.coordinator_shard ? 1 : 0)].speed = best > 0 ? best : sum / c->w[i].hello.n_speeds;
        }
        if (all && c->o.coordinator_shard) {
            profile_t me;
            if (profile_node(&me, c->o.n_threads, NULL, 300) == 0) nodes[0].speed = profile_gflops(&me, (qtype_t)t);
        }
    }
    for (int i = 0; i < n_compute; i++) {
        int wi = i - (c->o.coordinator_shard ? 1 : 0);
        if (wi >= 0) {
            snprintf(nodes[i].name, sizeof nodes[i].name, "%s", c->w[wi].hello.node_id);
            if (!nodes[i].mem_budget) nodes[i].mem_budget = c->w[wi].hello.ram_budget_bytes;
        } else {
            snprintf(nodes[i].name, sizeof nodes[i].name, "coordinator");
        }
    }
    const model_hparams_t *hp = model_hparams(full);
    int n_ctx = c->o.n_ctx > 0 ? c->o.n_ctx : (hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    c->o.n_ctx = n_ctx;
    int rc = plan_tp(full, nodes, n_compute, n_ctx, c->plan, err, errlen);
    if (rc != 0) return rc;
    // Node 0 is the coordinator; it holds nothing unless it computes.
    c->slices[0] = c->o.coordinator_shard ? c->plan->shard[0].s : (shard_slice_t){0};
    for (int i = 0; i < c->o.n_workers; i++) c->slices[1 + i] = c->plan->shard[i + (c->o.coordinator_shard ? 1 : 0)].s;
    for (int i = 0; i < c->n_nodes; i++) {
        msg_plan_node_t *p = &c->pnodes[i];
        const shard_slice_t *s = &c->slices[i];
        memset(p, 0, sizeof *p);
        p->index = (uint32_t)i;
        snprintf(p->node_id, sizeof p->node_id, "%s", i == 0 ? "coordinator" : c->w[i - 1].hello.node_id);
        p->layers = (msg_range_t){0, hp->n_layer};
        p->heads = (msg_range_t){s->h0, s->h1};
        p->kv_heads = (msg_range_t){s->kv0, s->kv1};
        p->n_ffn = 1;
        p->ffn[0] = (msg_range_t){s->f0, s->f1};
        p->hidden = (msg_range_t){s->e0, s->e1};
        p->vocab = (msg_range_t){s->v0, s->v1};
        if (i > 0) snprintf(p->endpoint, sizeof p->endpoint, "%s", c->w[i - 1].data_endpoint);
        else coordinator_endpoint(c, p->endpoint, sizeof p->endpoint);
    }
    return 0;
}

static int send_plan(cluster_t *c, const model_t *full, char *err, size_t errlen) {
    const model_hparams_t *hp = model_hparams(full);
    msg_t m;
    msg_init(&m, MSG_PLAN);
    msg_plan_t *p = &m.plan;
    p->plan_id = (uint64_t)getpid() << 20 ^ (uint64_t)time(NULL);
    memcpy(p->model_sha256, c->sha, 32);
    p->n_layer = (uint32_t)hp->n_layer;
    p->n_head = (uint32_t)hp->n_head;
    p->n_head_kv = (uint32_t)hp->n_head_kv;
    p->n_ff = (uint32_t)hp->n_ff;
    p->n_expert = (uint32_t)hp->n_expert;
    p->n_embd = (uint32_t)hp->n_embd;
    p->n_vocab = (uint32_t)hp->n_vocab;
    p->n_ctx = (uint32_t)c->o.n_ctx;
    p->kv_type = c->o.kv_f32 ? QT_F32 : QT_F16;
    p->n_nodes = c->n_nodes;
    p->nodes = c->pnodes;
    for (int i = 0; i < c->o.n_workers; i++) {
        int rc = msg_send_link(c->w[i].link, &m, c->timeout_ms, err, errlen);
        if (rc != 0) return rc;
    }
    return 0;
}

// Streams the worker's shard file (written from the coordinator's copy) as SLICE_DATA chunks.
static int stream_shard(cluster_t *c, int wi, const gguf_t *src, int head_dim, char *err, size_t errlen) {
    char path[256];
    snprintf(path, sizeof path, "%s/meshlm-shard-%ld-%d.gguf", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
             (long)getpid(), wi);
    int rc = shard_file_write(src, &c->slices[1 + wi], head_dim, c->sha, path, err, errlen);
    if (rc != 0) return rc;
    FILE *f = fopen(path, "rb");
    uint8_t *buf = malloc(CHUNK_BYTES);
    if (!f || !buf) rc = MLM_EIO;
    uint64_t total = 0, off = 0;
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
        rc = msg_send_link(c->w[wi].link, &m, c->timeout_ms, err, errlen);
        off += n;
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

static int load_shards(cluster_t *c, const model_t *full, char *err, size_t errlen) {
    for (int i = 0; i < c->o.n_workers; i++) {
        msg_t m;
        msg_init(&m, MSG_LOAD_SHARD);
        m.load_shard.node_index = (uint32_t)(i + 1);
        m.load_shard.via_coordinator = !c->w[i].hello.has_model || memcmp(c->w[i].hello.model_sha256, c->sha, 32) != 0;
        int rc = msg_send_link(c->w[i].link, &m, c->timeout_ms, err, errlen);
        if (rc != 0) return rc;
    }
    for (int i = 0; i < c->o.n_workers; i++) {
        msg_t m;
        comm_msg_t raw;
        int rc = recv_type(c, i, MSG_LOAD_SHARD_ACK, &m, &raw, err, errlen);
        if (rc != 0) return rc;
        int status = m.load_shard_ack.status;
        bool cached = m.load_shard_ack.from_cache;
        msg_clear(&m);
        comm_msg_free(&raw);
        if (status == MLM_ENOTFOUND) { // it has neither the model nor a cached shard: send it
            if (c->o.verbose) fprintf(stderr, "meshlm: streaming shard %d to %s\n", i + 1, c->w[i].endpoint);
            if ((rc = stream_shard(c, i, model_gguf(full), model_hparams(full)->head_dim, err, errlen)) != 0) return rc;
            if ((rc = recv_type(c, i, MSG_LOAD_SHARD_ACK, &m, &raw, err, errlen)) != 0) return rc;
            status = m.load_shard_ack.status;
            msg_clear(&m);
            comm_msg_free(&raw);
            c->stats.streamed++;
        } else if (cached) {
            c->stats.from_cache++;
        } else if (status == 0) {
            c->stats.from_file++;
        }
        if (status != 0) {
            snprintf(err, errlen, "worker %s could not load its shard: %s", c->w[i].endpoint, mlm_strerror(status));
            return status;
        }
    }
    return 0;
}

// --- public API

int cluster_open(cluster_t **out, const cluster_opts_t *o, char *err, size_t errlen) {
    *out = NULL;
    if (o->n_workers < 1 || o->n_workers >= MSG_MAX_NODES) {
        snprintf(err, errlen, "need 1..%d workers", MSG_MAX_NODES - 1);
        return MLM_EINVAL;
    }
    cluster_t *c = calloc(1, sizeof *c);
    if (!c) return MLM_ENOMEM;
    c->o = *o;
    c->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 30000;
    c->gc.timeout_ms = c->timeout_ms;
    c->n_nodes = o->n_workers + 1;
    c->gc.stats = &c->stats;
    c->gc.n = c->n_nodes;
    c->w = calloc((size_t)o->n_workers, sizeof *c->w);
    c->plan = calloc(1, sizeof *c->plan);
    c->slices = calloc((size_t)c->n_nodes, sizeof *c->slices);
    c->pnodes = calloc((size_t)c->n_nodes, sizeof *c->pnodes);
    const double t0 = mlm_now_ms();
    model_t *full = NULL;
    int rc = (c->w && c->plan && c->slices && c->pnodes) ? 0 : MLM_ENOMEM;
    model_load_opts_t flo = {.repack = false};
    if (rc == 0) rc = sha256_file(o->model_path, c->sha, err, errlen);
    if (rc == 0) rc = model_load(&full, o->model_path, &flo, err, errlen);
    if (rc == 0) rc = say_hello(c, err, errlen);
    if (rc == 0) rc = make_plan(c, full, err, errlen);
    if (rc == 0) rc = send_plan(c, full, err, errlen);
    if (rc == 0) rc = load_shards(c, full, err, errlen);
    if (rc == 0) {
        const char *eps[MSG_MAX_NODES];
        for (int i = 0; i < c->n_nodes; i++) eps[i] = c->pnodes[i].endpoint;
        comm_zmq_opts_t zo;
        comm_zmq_opts_default(&zo);
        zo.connect_timeout_ms = c->timeout_ms;
        rc = comm_zmq_new(&c->gc.comm, 0, c->n_nodes, eps, &zo, err, errlen);
    }
    model_destroy(&full);
    if (rc == 0) {
        model_load_opts_t lo = {.repack = true, .slice = &c->slices[0]};
        rc = model_load(&c->model, o->model_path, &lo, err, errlen);
    }
    c->computes = o->coordinator_shard;
    if (rc == 0 && c->computes) {
        c->tp = (model_tp_t){c->n_nodes, 0, c->slices, cl_gather, &c->gc, cl_logits};
        model_ctx_opts_t co = {.n_ctx = c->o.n_ctx, .n_threads = o->n_threads, .kv_f32 = o->kv_f32, .tp = &c->tp};
        rc = model_ctx_new(&c->ctx, c->model, &co, err, errlen);
    }
    if (rc == 0 && !c->computes) {
        c->lbuf_cap = (size_t)64 * (size_t)model_hparams(c->model)->n_vocab * sizeof(float);
        c->lbuf = malloc(c->lbuf_cap);
        if (!c->lbuf) rc = MLM_ENOMEM;
    }
    if (rc != 0) {
        cluster_close(&c, false);
        return rc;
    }
    c->stats.load_ms = mlm_now_ms() - t0;
    *out = c;
    return 0;
}

const model_t *cluster_model(const cluster_t *c) { return c->model; }
const plan_t *cluster_plan(const cluster_t *c) { return c->plan; }
const cluster_stats_t *cluster_stats(const cluster_t *c) { return &c->stats; }
const char *cluster_error(const cluster_t *c) { return c->errbuf; }

// The coordinator computes nothing: the logit rows of the workers land here.
static int receive_logits(cluster_t *c, int n_out, float *logits) {
    const model_hparams_t *hp = model_hparams(c->model);
    const int nw = c->o.n_workers;
    size_t lens[MSG_MAX_NODES], sum = 0;
    for (int i = 0; i < nw; i++) {
        const shard_slice_t *s = &c->slices[1 + i];
        lens[i] = (size_t)n_out * (size_t)(s->v1 - s->v0) * sizeof(float);
        sum += lens[i];
    }
    if (sum > c->lbuf_cap) {
        uint8_t *nb = realloc(c->lbuf, sum);
        if (!nb) return MLM_ENOMEM;
        c->lbuf = nb;
        c->lbuf_cap = sum;
    }
    const double t0 = mlm_now_ms();
    int rc = comm_gatherv_root(c->gc.comm, 0, 1, nw, NULL, 0, c->lbuf, lens, c->timeout_ms);
    c->stats.gather_ms += mlm_now_ms() - t0;
    c->stats.gather_bytes += sum;
    if (rc != 0) return rc;
    const uint8_t *p = c->lbuf;
    for (int i = 0; i < nw; i++) {
        const shard_slice_t *s = &c->slices[1 + i];
        const size_t w = (size_t)(s->v1 - s->v0);
        for (int t = 0; t < n_out; t++) memcpy(logits + (size_t)t * hp->n_vocab + s->v0, p + (size_t)t * w * 4, w * 4);
        p += lens[i];
    }
    return 0;
}

int cluster_eval(cluster_t *c, const int32_t *tokens, int n, float *logits, bool all_logits) {
    if (n <= 0 || c->pos + n > c->o.n_ctx) return n <= 0 ? MLM_EINVAL : MLM_ERANGE;
    const int n_vocab = model_hparams(c->model)->n_vocab;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= n_vocab) return MLM_EINVAL;
    msg_t m;
    msg_init(&m, MSG_STEP);
    msg_step_t *st = &m.step;
    st->step_id = ++c->step_id;
    st->pos = c->pos;
    st->n_tokens = (uint32_t)n;
    st->tokens = tokens;
    st->logits = !logits ? MSG_LOGITS_NONE : all_logits ? MSG_LOGITS_ALL : MSG_LOGITS_LAST;
    char err[256];
    for (int i = 0; i < c->o.n_workers; i++) {
        int rc = msg_send_link(c->w[i].link, &m, c->timeout_ms, err, sizeof err);
        if (rc != 0) {
            snprintf(c->errbuf, sizeof c->errbuf, "worker %s: %s", c->w[i].endpoint, err);
            return rc;
        }
    }
    int rc = 0;
    if (c->computes) {
        rc = model_eval(c->ctx, tokens, n, logits, all_logits);
    } else {
        if (logits) rc = receive_logits(c, all_logits ? n : 1, logits);
        // The workers' all-gathers, which the coordinator does not see, follow from the plan: per
        // token and layer every computing node sends its block of the attention output, the two
        // hidden-size products and the FFN units (per routed expert) to the others, plus the embedding.
        const model_hparams_t *hp = model_hparams(c->model);
        const uint64_t nc = (uint64_t)c->o.n_workers;
        const uint64_t per_layer = (uint64_t)hp->n_head * hp->head_dim + 2u * (uint64_t)hp->n_embd +
                                   (uint64_t)hp->n_ff * (uint64_t)(hp->n_expert ? hp->n_expert_used : 1);
        c->stats.gather_bytes += (uint64_t)n * ((uint64_t)hp->n_layer * per_layer + (uint64_t)hp->n_embd) * 4u * (nc - 1);
    }
    c->stats.steps++;
    c->stats.tokens += (uint64_t)n;
    if (rc == 0) {
        c->pos += n;
    } else {
        // Name the worker that reported a failure, if one did.
        snprintf(c->errbuf, sizeof c->errbuf, "step %llu failed: %s (a worker stopped answering within %d ms)",
                 (unsigned long long)st->step_id, mlm_strerror(rc), c->timeout_ms);
        for (int i = 0; i < c->o.n_workers; i++) {
            msg_t e;
            comm_msg_t raw;
            if (msg_recv_link(c->w[i].link, &e, &raw, 0, err, sizeof err) == 0) {
                if (e.type == MSG_ERROR)
                    snprintf(c->errbuf, sizeof c->errbuf, "step %llu failed: %.400s", (unsigned long long)st->step_id,
                             e.error.text);
                msg_clear(&e);
                comm_msg_free(&raw);
            }
        }
    }
    return rc;
}

void cluster_reset(cluster_t *c) {
    c->pos = 0;
    if (c->ctx) model_ctx_reset(c->ctx);
}

void cluster_stats_reset(cluster_t *c) {
    c->stats.steps = c->stats.tokens = c->stats.gather_bytes = c->stats.gathers = 0;
    c->stats.gather_ms = 0;
}

void cluster_close(cluster_t **self_p, bool exit_workers) {
    if (!self_p || !*self_p) return;
    cluster_t *c = *self_p;
    model_ctx_destroy(&c->ctx);
    model_destroy(&c->model);
    for (int i = 0; c->w && i < c->o.n_workers; i++) {
        if (!c->w[i].link) continue;
        msg_t m;
        msg_init(&m, MSG_SHUTDOWN);
        snprintf(m.shutdown.reason, sizeof m.shutdown.reason, "%s", exit_workers ? "exit" : "plan done");
        char err[128];
        msg_send_link(c->w[i].link, &m, 1000, err, sizeof err);
    }
    comm_destroy(&c->gc.comm);
    for (int i = 0; c->w && i < c->o.n_workers; i++) link_destroy(&c->w[i].link);
    free(c->w);
    free(c->plan);
    free(c->slices);
    free(c->pnodes);
    free(c->lbuf);
    free(c);
    *self_p = NULL;
}
