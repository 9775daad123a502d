// In-process comm backend: per-(destination, source) message queues guarded by one mutex, one condvar per rank.
#include "transport/comm_inproc.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/err.h"

// --- types

typedef struct inproc_item {
    struct inproc_item *next;   // next message in the same queue
    uint64_t stamp;             // arrival order over the whole group
    comm_msg_t msg;             // the frames (owned)
} inproc_item_t;

typedef struct {
    pthread_mutex_t mu;         // guards everything below
    pthread_cond_t *cv;         // (size) signalled when rank r's queues grow or a peer leaves
    inproc_item_t **head;       // (size, size) queue [dst * size + src], oldest first
    inproc_item_t **tail;       // (size, size) last item of each queue
    bool *gone;                 // (size) rank destroyed, or never joined once the group was released
    bool *joined;               // (size) rank made (comm_inproc_join)
    int size;                   // ranks
    int live;                   // joined ranks not yet destroyed, plus one while the handle is held (freed at 0)
    bool released;              // the handle was released: ranks that never joined are gone
    size_t max_msg_bytes;       // largest message (sum of frames); SIZE_MAX = no limit
    uint64_t stamp;             // messages sent so far
} inproc_group_t;

struct comm_inproc_group {
    inproc_group_t *g;          // the group (shared with the joined ranks)
};

typedef struct {
    inproc_group_t *g;          // shared group (freed by the last rank)
    int rank;                   // this rank
} inproc_ctx_t;

// --- helpers

static void deadline_ts(struct timespec *ts, int timeout_ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static void item_free(inproc_item_t *it) {
    comm_msg_free(&it->msg);
    free(it);
}

// Queue of rank `dst` holding the oldest message for a recv(peer), or -1.
static int pick(inproc_group_t *g, int dst, int peer) {
    if (peer != COMM_ANY) return g->head[dst * g->size + peer] ? peer : -1;
    int best = -1;
    for (int s = 0; s < g->size; s++) {
        inproc_item_t *h = g->head[dst * g->size + s];
        if (h && (best < 0 || h->stamp < g->head[dst * g->size + best]->stamp)) best = s;
    }
    return best;
}

static bool all_peers_gone(inproc_group_t *g, int self) {
    for (int s = 0; s < g->size; s++)
        if (s != self && !g->gone[s]) return false;
    return true;
}

static void group_free(inproc_group_t *g) {
    if (!g) return;
    if (g->head)
        for (int i = 0; i < g->size * g->size; i++)
            for (inproc_item_t *it = g->head[i], *nx; it; it = nx) {
                nx = it->next;
                item_free(it);
            }
    if (g->cv)
        for (int r = 0; r < g->size; r++) pthread_cond_destroy(&g->cv[r]);
    pthread_mutex_destroy(&g->mu);
    free(g->cv);
    free(g->head);
    free(g->tail);
    free(g->gone);
    free(g->joined);
    free(g);
}

// Drops one reference (a destroyed rank or the released handle); the last one frees the group.
static void group_unref(inproc_group_t *g) {
    pthread_mutex_lock(&g->mu);
    int left = --g->live;
    pthread_mutex_unlock(&g->mu);
    if (left == 0) group_free(g);
}

// --- backend

static const char *ip_name(void *ctx) { return "inproc"; }
static int ip_rank(void *ctx) { return ((inproc_ctx_t *)ctx)->rank; }
static int ip_size(void *ctx) { return ((inproc_ctx_t *)ctx)->g->size; }

static int ip_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    inproc_ctx_t *x = ctx;
    inproc_group_t *g = x->g;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += frames[i].len;
    if (total > g->max_msg_bytes) return MLM_ERANGE;
    inproc_item_t *it = calloc(1, sizeof *it);
    if (!it) return MLM_ENOMEM;
    for (int i = 0; i < n; i++) {
        it->msg.data[i] = malloc(frames[i].len ? frames[i].len : 1);
        if (!it->msg.data[i]) {
            it->msg.n = i;
            item_free(it);
            return MLM_ENOMEM;
        }
        if (frames[i].len) memcpy(it->msg.data[i], frames[i].ptr, frames[i].len);
        it->msg.len[i] = frames[i].len;
    }
    it->msg.n = n;
    pthread_mutex_lock(&g->mu);
    if (g->gone[peer]) {
        pthread_mutex_unlock(&g->mu);
        item_free(it);
        return MLM_EPEER;
    }
    int q = peer * g->size + x->rank;
    it->stamp = g->stamp++;
    if (g->tail[q]) g->tail[q]->next = it;
    else g->head[q] = it;
    g->tail[q] = it;
    pthread_cond_signal(&g->cv[peer]);
    pthread_mutex_unlock(&g->mu);
    return 0;
}

static int ip_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    inproc_ctx_t *x = ctx;
    inproc_group_t *g = x->g;
    struct timespec dl;
    if (timeout_ms >= 0) deadline_ts(&dl, timeout_ms);
    int rc = 0;
    pthread_mutex_lock(&g->mu);
    for (;;) {
        int s = pick(g, x->rank, peer);
        if (s >= 0) {
            int q = x->rank * g->size + s;
            inproc_item_t *it = g->head[q];
            g->head[q] = it->next;
            if (!g->head[q]) g->tail[q] = NULL;
            *out = it->msg;
            *from = s;
            free(it);
            break;
        }
        if (peer != COMM_ANY ? g->gone[peer] : all_peers_gone(g, x->rank)) {
            rc = MLM_EPEER;
            break;
        }
        int w = timeout_ms < 0 ? pthread_cond_wait(&g->cv[x->rank], &g->mu)
                               : pthread_cond_timedwait(&g->cv[x->rank], &g->mu, &dl);
        if (w != 0 && pick(g, x->rank, peer) < 0) {
            rc = MLM_ETIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

static void ip_destroy(void *ctx) {
    inproc_ctx_t *x = ctx;
    if (!x) return;
    inproc_group_t *g = x->g;
    pthread_mutex_lock(&g->mu);
    g->gone[x->rank] = true;
    for (int s = 0; s < g->size; s++) { // nobody will read these any more
        int q = x->rank * g->size + s;
        for (inproc_item_t *it = g->head[q], *nx; it; it = nx) {
            nx = it->next;
            item_free(it);
        }
        g->head[q] = g->tail[q] = NULL;
    }
    for (int r = 0; r < g->size; r++) pthread_cond_broadcast(&g->cv[r]);
    pthread_mutex_unlock(&g->mu);
    group_unref(g);
    free(x);
}

static const struct comm_backend_i inproc_iface = {
    .name = ip_name,
    .rank = ip_rank,
    .size = ip_size,
    .send = ip_send,
    .recv = ip_recv,
    .destroy = ip_destroy,
};

// --- public API

int comm_inproc_group_new(comm_inproc_group_t **out, int size, size_t max_msg_bytes) {
    if (!out || size < 1) return MLM_EINVAL;
    *out = NULL;
    comm_inproc_group_t *h = calloc(1, sizeof *h);
    inproc_group_t *g = calloc(1, sizeof *g);
    if (!h || !g) {
        free(h);
        free(g);
        return MLM_ENOMEM;
    }
    pthread_mutex_init(&g->mu, NULL);
    g->size = size;
    g->live = 1;
    g->max_msg_bytes = max_msg_bytes ? max_msg_bytes : SIZE_MAX;
    g->head = calloc((size_t)size * size, sizeof *g->head);
    g->tail = calloc((size_t)size * size, sizeof *g->tail);
    g->gone = calloc((size_t)size, sizeof *g->gone);
    g->joined = calloc((size_t)size, sizeof *g->joined);
    if (!g->head || !g->tail || !g->gone || !g->joined || !(g->cv = calloc((size_t)size, sizeof *g->cv))) {
        group_free(g); // no condvar initialised yet
        free(h);
        return MLM_ENOMEM;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    for (int r = 0; r < size; r++) pthread_cond_init(&g->cv[r], &ca);
    pthread_condattr_destroy(&ca);
    h->g = g;
    *out = h;
    return 0;
}

int comm_inproc_join(comm_inproc_group_t *h, int rank, comm_t **out) {
    if (!h || !out || rank < 0 || rank >= h->g->size) return MLM_EINVAL;
    inproc_group_t *g = h->g;
    inproc_ctx_t *x = calloc(1, sizeof *x);
    if (!x) return MLM_ENOMEM;
    x->g = g;
    x->rank = rank;
    pthread_mutex_lock(&g->mu);
    bool taken = g->joined[rank];
    if (!taken) {
        g->joined[rank] = true;
        g->live++;
    }
    pthread_mutex_unlock(&g->mu);
    if (taken) {
        free(x);
        return MLM_EINVAL;
    }
    comm_t *c = comm_new(&inproc_iface, x);
    if (!c) {
        ip_destroy(x); // the rank leaves at once
        return MLM_ENOMEM;
    }
    *out = c;
    return 0;
}

void comm_inproc_group_release(comm_inproc_group_t **self_p) {
    if (!self_p || !*self_p) return;
    inproc_group_t *g = (*self_p)->g;
    pthread_mutex_lock(&g->mu);
    g->released = true;
    for (int r = 0; r < g->size; r++) g->gone[r] = g->gone[r] || !g->joined[r];
    for (int r = 0; r < g->size; r++) pthread_cond_broadcast(&g->cv[r]);
    pthread_mutex_unlock(&g->mu);
    group_unref(g);
    free(*self_p);
    *self_p = NULL;
}

int comm_inproc_new_group(comm_t **out, int size) {
    if (!out || size < 1) return MLM_EINVAL;
    comm_inproc_group_t *h = NULL;
    int rc = comm_inproc_group_new(&h, size, 0);
    if (rc != 0) return rc;
    comm_t **made = calloc((size_t)size, sizeof *made);
    for (int r = 0; rc == 0 && r < size; r++) rc = made ? comm_inproc_join(h, r, &made[r]) : MLM_ENOMEM;
    comm_inproc_group_release(&h);
    if (rc != 0) {
        for (int r = 0; made && r < size; r++) comm_destroy(&made[r]);
        free(made);
        return rc;
    }
    for (int r = 0; r < size; r++) out[r] = made[r];
    free(made);
    return 0;
}

int comm_inproc_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen) {
    if (!o || !o->group) return mlm_fail(err, errlen, MLM_EINVAL, "inproc: needs a group (comm_inproc_group_new)");
    if (o->size && o->size != o->group->g->size)
        return mlm_fail(err, errlen, MLM_EINVAL, "inproc: size %d, the group has %d ranks", o->size, o->group->g->size);
    int rc = comm_inproc_join(o->group, o->rank, out);
    if (rc != 0) return mlm_fail(err, errlen, rc, "inproc: cannot make rank %d of %d: %s", o->rank, o->group->g->size, mlm_strerror(rc));
    return 0;
}
