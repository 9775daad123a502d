// Recovery: a worker lost in a step is confirmed, the cluster plans again over the survivors and
// standbys, reloads, replays every sequence's steps with the same chunks and redoes the step.
#include "coordinator/runtime/cluster_impl.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"
#include "proto/msg_io.h"
#include "transport/comm_zmq.h"

// --- recovery

#define REPLAY_CHUNK 64 // decode steps replayed in one chunk at most

// Whether every worker of the plan computes a chunk in one-token order (protocol 1.7).
static bool one_order_ok(const cluster_t *c) {
    for (int i = 0; i < c->o.n_workers; i++) {
        const msg_hello_t *h = &c->w[i].hello;
        if (c->w[i].rank >= 0 && h->proto_major <= MSG_PROTO_MAJOR && h->proto_minor < MSG_MINOR_ONE_ORDER) return false;
    }
    return true;
}

// Appends a step of n tokens to a sequence's history. 0 or MLM_ENOMEM.
static int hist_add(seq_hist_t *h, const int32_t *tokens, int n, int pos) {
    if (pos + n > h->cap) {
        int cap = h->cap ? h->cap : 64;
        while (cap < pos + n) cap *= 2;
        int32_t *t = realloc(h->tokens, (size_t)cap * sizeof *t);
        if (t) h->tokens = t;
        int *s = realloc(h->steps, (size_t)cap * sizeof *s);
        if (s) h->steps = s;
        if (!t || !s) return MLM_ENOMEM;
        h->cap = cap;
    }
    memcpy(h->tokens + pos, tokens, (size_t)n * sizeof *tokens);
    h->steps[h->n_steps++] = n;
    return 0;
}

#define PING_POLL_MS 20 // how often a ping wait looks at the data plane's own heartbeats

// Marks lost every worker still waited for whose data-plane connection from this coordinator has
// dropped or timed out meanwhile (its heartbeats, which run to every member of the plan): a frozen
// worker that comes back inside the ping wait still answers, late, but it was gone. Returns how many.
// Brings the coordinator's view of its data plane up to date: files what arrived and probes the
// peers that are due, so comm_zmq_peer_lost sees connections the heartbeats have dropped.
static void poll_data_plane(cluster_t *c) {
    comm_t *in = c->comm ? (comm_t *)comm_fault_inner(c->comm, -1, NULL) : NULL;
    if (in) (void)comm_zmq_poll_lost(in, COMM_ANY);
}

static int data_plane_lost(cluster_t *c, bool *waiting) {
    if (!c->comm) return 0;
    poll_data_plane(c);
    int n = 0;
    for (int i = 0; i < c->o.n_workers && i < MSG_MAX_NODES; i++)
        if (waiting[i] && c->w[i].rank >= 0 && comm_zmq_peer_lost(c->comm, c->w[i].rank)) {
            waiting[i] = false;
            c->w[i].lost = true;
            n++;
        }
    return n;
}

// Pings every worker of the current plan at once and returns how many did not answer within
// timeout_ms (a worker whose link dropped fails at once, and one the data plane's heartbeats lose
// meanwhile as soon as they do); those are marked lost. Step reports and errors that come first are
// consumed.
static int ping_plan(cluster_t *c, int timeout_ms) {
    const uint64_t seq = 0x8000000000000000ull | ++c->step_id;
    bool waiting[MSG_MAX_NODES] = {false};
    int n_wait = 0;
    char err[256];
    for (int i = 0; i < c->o.n_workers; i++) {
        if (c->w[i].rank < 0 || c->w[i].lost) continue;
        msg_t m;
        msg_init(&m, MSG_HEARTBEAT);
        snprintf(m.heartbeat.node_id, sizeof m.heartbeat.node_id, "coordinator");
        m.heartbeat.seq = seq;
        if (msg_send(c->ctl, c->w[i].peer, &m, timeout_ms, err, sizeof err) != 0) c->w[i].lost = true;
        else waiting[i] = true, n_wait++;
    }
    const int64_t dl = mlm_deadline(timeout_ms);
    while (n_wait > 0) {
        msg_t m;
        comm_msg_t raw;
        int from = -1;
        const int left = mlm_left_ms(dl);
        int rc = msg_recv(c->ctl, COMM_ANY, &m, &raw, &from, left < PING_POLL_MS ? left : PING_POLL_MS, err, sizeof err);
        n_wait -= data_plane_lost(c, waiting);
        if (rc == MLM_ETIMEOUT && left <= PING_POLL_MS) break;
        if (rc == MLM_ETIMEOUT) continue;
        if (from < 1 || from > c->o.n_workers) {
            if (rc == 0) msg_clear(&m), comm_msg_free(&raw);
            if (rc != 0 && rc != MLM_EPEER) break;
            continue;
        }
        worker_t *w = &c->w[from - 1];
        if (rc == MLM_EPEER) { // its link dropped
            if (waiting[from - 1]) waiting[from - 1] = false, n_wait--, w->lost = true;
            continue;
        }
        if (rc != 0) continue;
        w->heard_ms = mlm_now_ms();
        if (m.type == MSG_RESULT && m.result.kind == MSG_RESULT_NONE) cl_count_report(c, from - 1, &m.result);
        if (m.type == MSG_ERROR) cl_note_error(c, from - 1, &m.error);
        if (m.type == MSG_HEARTBEAT && m.heartbeat.seq == seq && waiting[from - 1]) waiting[from - 1] = false, n_wait--;
        msg_clear(&m);
        comm_msg_free(&raw);
    }
    int lost = 0;
    for (int i = 0; i < c->o.n_workers; i++)
        if (waiting[i]) c->w[i].lost = true;
    for (int i = 0; i < c->o.n_workers; i++) lost += c->w[i].rank >= 0 && c->w[i].lost;
    return lost;
}

// Greets lost workers again (a frozen worker that was continued, a restarted one): those that
// answer within a short time are taken in at this plan. The HELLOs go out to all of them first and
// the answers are awaited together, so a dead worker costs that time once, not once each.
void cl_readmit(cluster_t *c) {
    char err[256];
    bool asked[MSG_MAX_NODES] = {false};
    int n_asked = 0;
    for (int i = 0; i < c->o.n_workers && i < MSG_MAX_NODES; i++) {
        worker_t *w = &c->w[i];
        if (!w->lost) continue;
        if (w->just_lost) { // lost in the recovery that makes this plan: no use asking yet
            w->just_lost = false;
            continue;
        }
        if (w->greet_ms > 0 && mlm_now_ms() - w->greet_ms < CL_GREET_EVERY_MS) continue;
        msg_t m;
        msg_init(&m, MSG_HELLO);
        snprintf(m.hello.node_id, sizeof m.hello.node_id, "coordinator");
        m.hello.role = MSG_ROLE_COORDINATOR;
        m.hello.n_cores = 1;
        m.hello.link_rank = w->peer;
        snprintf(m.hello.faults, sizeof m.hello.faults, "%s", fault_spec_text(c->faults));
        if (msg_send(c->ctl, w->peer, &m, 50, err, sizeof err) != 0) continue;
        asked[i] = true;
        n_asked++;
    }
    const int64_t dl = mlm_deadline(200);
    for (int i = 0; i < c->o.n_workers && i < MSG_MAX_NODES; i++)
        if (asked[i]) c->w[i].greet_ms = mlm_now_ms(); // until it answers
    for (int i = 0; i < c->o.n_workers && i < MSG_MAX_NODES && n_asked > 0; i++) {
        worker_t *w = &c->w[i];
        msg_t m;
        comm_msg_t raw;
        while (asked[i] && msg_recv(c->ctl, w->peer, &m, &raw, NULL, mlm_left_ms(dl), err, sizeof err) == 0) {
            const bool hello = m.type == MSG_HELLO;
            if (hello) w->hello = m.hello;
            msg_clear(&m);
            comm_msg_free(&raw);
            if (hello) {
                w->greet_ms = 0;
                asked[i] = false;
                n_asked--;
                w->lost = false;
                w->heard_ms = mlm_now_ms();
                fprintf(stderr, "meshlm: worker %s is back and is taken in at this plan\n", w->hello.node_id);
            }
        }
    }
}

// After a failed step: confirms which workers are gone, plans over the rest (and standbys),
// reloads, and replays every sequence's steps so the caches are as they were. 0, or why not.
static int recover(cluster_t *c, int step_rc, cluster_recovery_t *r) {
    char err[512] = "";
    const double t0 = mlm_now_ms();
    const int hb = cl_hb_ms(c);
    // Survivors notice the loss through their own data-plane heartbeats within about hb and then
    // answer; the lost ones never do.
    // The data plane may already know who is gone (a dropped connection, a heartbeat timeout): then
    // no one needs asking. Otherwise every worker of the plan is pinged; survivors notice the loss
    // through their own data-plane heartbeats within about hb and then answer, the lost never do.
    int lost = 0;
    poll_data_plane(c);
    for (int i = 0; i < c->o.n_workers; i++)
        if (c->w[i].rank >= 0 && comm_zmq_peer_lost(c->comm, c->w[i].rank)) c->w[i].lost = true, lost++;
    if (getenv("MESHLM_DEBUG_RECOVERY"))
        for (int i = 0; i < c->o.n_workers; i++)
            fprintf(stderr, "  [recover] worker %d %s rank %d data-lost %d\n", i, c->w[i].hello.node_id, c->w[i].rank,
                    c->w[i].rank >= 0 && comm_zmq_peer_lost(c->comm, c->w[i].rank));
    if (lost == 0) lost = ping_plan(c, 2 * hb);
    // Every worker answers, but one says its step lost another (alive) worker on the data plane: the
    // link between them is cut. The blame goes to the later of the two in the order the workers were
    // given (the higher node number), whichever of them noticed: that one is left out of this plan
    // (and greeted again at the next).
    int cut_from = -1;
    for (int i = 0; lost == 0 && i < c->o.n_workers; i++) {
        const worker_t *w = &c->w[i];
        const int j = w->rank >= 0 && !w->lost && w->lost_report >= 0 ? c->rank_worker[w->lost_report] : -1;
        if (j < 0 || j == i || c->w[j].lost || c->w[j].rank < 0) continue;
        const int blame = i > j ? i : j, other = i > j ? j : i;
        c->w[blame].lost = true; // (just lost: the plan made now goes without it, the next greets it)
        cut_from = other;
        lost = 1;
    }
    for (int i = 0; i < c->o.n_workers; i++) {
        c->w[i].lost_report = -1;
        c->w[i].just_lost = c->w[i].rank >= 0 && c->w[i].lost; // not greeted by this recovery's plan
    }
    c->n_lost_total += lost;
    const double t1 = mlm_now_ms();
    int first = -1;
    for (int i = 0; i < c->o.n_workers; i++)
        if (c->w[i].rank >= 0 && c->w[i].lost && first < 0) first = i;
    if (first >= 0) {
        const worker_t *w = &c->w[first];
        snprintf(r->worker, sizeof r->worker, "%.63s", w->hello.node_id[0] ? w->hello.node_id : w->endpoint);
        if (cut_from >= 0)
            snprintf(r->what, sizeof r->what, "cut off from %.30s (partition between workers)",
                     c->w[cut_from].hello.node_id);
        else
            snprintf(r->what, sizeof r->what, "lost (%s)%s", mlm_strerror(step_rc), lost > 1 ? " with others" : "");
        // from the last sign of life: its last message, or the failed step's start if that is later
        // from the last sign of life; a cut worker answers pings, so its cut counts from the step's start
        r->detect_ms = t1 - (cut_from < 0 && w->heard_ms > c->step_t0 ? w->heard_ms : c->step_t0);
    } else {
        snprintf(r->worker, sizeof r->worker, "-");
        snprintf(r->what, sizeof r->what, "step failed (%s), every worker answers: plan again", mlm_strerror(step_rc));
        r->detect_ms = t1 - t0;
    }
    fprintf(stderr, "meshlm: fault: worker %s %s; detected in %.0f ms; re-planning\n", r->worker, r->what,
            r->detect_ms);
    const double tp = mlm_now_ms();
    int rc = cluster_make_plan(c, err, sizeof err);
    r->plan_ms = mlm_now_ms() - tp;
    if (rc == 0) rc = cluster_load(c, err, sizeof err);
    r->shards_ms = c->shards_ms;
    r->plane_ms = c->plane_ms;
    const double tr = mlm_now_ms();
    int replayed = 0;
    // Runs of decode steps (one token each) go again as one chunk in one-token order, which leaves the
    // caches with the bits the steps left (protocol 1.7 on every worker); other steps as they were.
    const bool merge = rc == 0 && one_order_ok(c);
    for (int s = 0; rc == 0 && s < CLUSTER_MAX_SEQS; s++) {
        seq_hist_t *h = &c->hist[s];
        int at = 0;
        for (int k = 0; rc == 0 && k < h->n_steps;) {
            const int32_t *tk = h->tokens + at;
            int n = h->steps[k], run = 1;
            while (merge && h->steps[k] == 1 && k + run < h->n_steps && h->steps[k + run] == 1 && run < REPLAY_CHUNK) run++;
            if (run > 1) n = run;
            float *none = NULL;
            c->one_order = run > 1;
            rc = cl_eval_once(c, 1, &s, &tk, &n, &none, false);
            c->one_order = false;
            at += n;
            k += run;
        }
        replayed += at;
    }
    r->replayed = replayed;
    r->replay_ms = mlm_now_ms() - tr;
    r->nodes_after = c->plan ? c->plan->n : 0;
    r->rc = rc;
    if (rc != 0 && !err[0]) snprintf(err, sizeof err, "%s", c->errbuf);
    if (rc != 0) snprintf(c->errbuf, sizeof c->errbuf, "recovery failed: %.480s", err);
    return rc;
}

// One step per sequence with history kept for replay, and, when a worker is lost, recovery and the
// step again (a few times at most).
int cl_eval_seqs(cluster_t *c, int n_seqs, const int *seq, const int32_t *const *tokens, const int *n,
                     float *const *logits, bool all_logits) {
    int rc = cl_eval_once(c, n_seqs, seq, tokens, n, logits, all_logits);
    for (int attempt = 0; rc != 0 && c->o.recover && !c->o.data && attempt < 3; attempt++) {
        if (rc == MLM_EINVAL || rc == MLM_ERANGE || rc == MLM_ENOMEM || rc == MLM_ESTATE) break;
        cluster_recovery_t r = {0};
        const double t0 = mlm_now_ms(); // the failure is noticed: recovery time runs from here
        rc = recover(c, rc, &r);
        const double ts = mlm_now_ms();
        if (rc == 0) rc = cl_eval_once(c, n_seqs, seq, tokens, n, logits, all_logits);
        r.step_ms = mlm_now_ms() - ts;
        r.rc = rc;
        r.recover_ms = mlm_now_ms() - t0;
        if (c->n_rec < CLUSTER_MAX_RECOVERIES) c->rec[c->n_rec++] = r;
        if (rc == 0)
            fprintf(stderr, "meshlm: recovered: %d node(s) now, %d token(s) replayed, %.0f ms from detection to the step done "
                            "(confirm %.0f, plan %.0f, load %.0f, data plane %.0f, replay %.0f, step %.0f)\n",
                    r.nodes_after, r.replayed, r.recover_ms, r.recover_ms - r.plan_ms - r.shards_ms - r.plane_ms - r.replay_ms - r.step_ms,
                    r.plan_ms, r.shards_ms, r.plane_ms, r.replay_ms, r.step_ms);
        else
            fprintf(stderr, "meshlm: recovery failed: %s\n", c->errbuf);
    }
    for (int k = 0; rc == 0 && k < n_seqs; k++) {
        seq_hist_t *h = &c->hist[seq[k]];
        if (c->pos[seq[k]] == n[k]) h->n_steps = 0; // the step started the sequence afresh
        if (hist_add(h, tokens[k], n[k], c->pos[seq[k]] - n[k]) != 0) rc = MLM_ENOMEM;
    }
    return rc;
}

const cluster_recovery_t *cluster_recoveries(const cluster_t *c, int *n) {
    *n = c->n_rec;
    return c->rec;
}

cJSON *cluster_recoveries_json(const cluster_t *c) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < c->n_rec; i++) {
        const cluster_recovery_t *r = &c->rec[i];
        cJSON *o = cJSON_CreateObject();
        if (!o) break;
        cJSON_AddStringToObject(o, "worker", r->worker);
        cJSON_AddStringToObject(o, "what", r->what);
        cJSON_AddNumberToObject(o, "detection_ms", r->detect_ms);
        cJSON_AddNumberToObject(o, "recovery_ms", r->recover_ms);
        cJSON_AddNumberToObject(o, "replayed_tokens", r->replayed);
        cJSON_AddNumberToObject(o, "nodes_after", r->nodes_after);
        cJSON_AddBoolToObject(o, "recovered", r->rc == 0);
        cJSON_AddNumberToObject(o, "plan_ms", r->plan_ms);
        cJSON_AddNumberToObject(o, "load_ms", r->shards_ms);
        cJSON_AddNumberToObject(o, "data_plane_ms", r->plane_ms);
        cJSON_AddNumberToObject(o, "replay_ms", r->replay_ms);
        cJSON_AddNumberToObject(o, "step_ms", r->step_ms);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

cJSON *cluster_status_json(const cluster_t *c) {
    cJSON *j = cJSON_CreateObject();
    if (!j) return NULL;
    const plan_t *pl = c->plan;
    const double now = mlm_now_ms();
    cJSON_AddStringToObject(j, "layout", pl ? pl->layout : "");
    cJSON_AddStringToObject(j, "tp_mode", pl && pl->tp_mode == PLAN_TP_ALLREDUCE ? "allreduce" : "exact");
    cJSON_AddNumberToObject(j, "n_ctx", c->o.n_ctx);
    cJSON_AddNumberToObject(j, "steps", (double)c->stats.steps);
    cJSON_AddNumberToObject(j, "step_ms", c->stats.steps ? c->stats.step_ms / (double)c->stats.steps : 0);
    int recovered = 0;
    for (int i = 0; i < c->n_rec; i++) recovered += c->rec[i].rc == 0;
    cJSON_AddNumberToObject(j, "faults", c->n_rec);
    cJSON_AddNumberToObject(j, "recovered", recovered);
    cJSON *nodes = cJSON_AddArrayToObject(j, "nodes");
    for (int i = 0; nodes && i < c->o.n_workers; i++) {
        const worker_t *w = &c->w[i];
        cJSON *o = cJSON_CreateObject();
        if (!o) break;
        cJSON_AddStringToObject(o, "id", w->hello.node_id[0] ? w->hello.node_id : w->endpoint);
        cJSON_AddStringToObject(o, "endpoint", w->endpoint);
        cJSON_AddStringToObject(o, "state", w->lost ? "lost" : w->standby ? "standby" : w->rank >= 0 ? "computing" : "idle");
        cJSON_AddNumberToObject(o, "heartbeat_age_ms", w->heard_ms > 0 ? now - w->heard_ms : -1);
        cJSON_AddNumberToObject(o, "rank", w->rank);
        cJSON_AddNumberToObject(o, "cores", w->hello.n_cores);
        cJSON_AddNumberToObject(o, "mem_budget_bytes", (double)w->hello.ram_budget_bytes);
        cJSON_AddNumberToObject(o, "mem_bw_gb_s", (double)w->hello.mem_bw_bytes_s / 1e9);
        cJSON_AddNumberToObject(o, "reports", (double)w->reports);
        cJSON_AddNumberToObject(o, "compute_ms", w->reports ? w->busy_ms / (double)w->reports : 0);
        cJSON_AddNumberToObject(o, "wait_ms", w->reports ? w->wait_ms / (double)w->reports : 0);
        cJSON_AddNumberToObject(o, "step_ms", w->reports ? (w->busy_ms + w->wait_ms) / (double)w->reports : 0);
        cJSON_AddNumberToObject(o, "utilisation", w->busy_ms + w->wait_ms > 0 ? w->busy_ms / (w->busy_ms + w->wait_ms) : 0);
        cJSON_AddItemToArray(nodes, o);
    }
    cJSON *sh = cJSON_AddArrayToObject(j, "shards");
    for (int i = 0; sh && pl && i < pl->n; i++) {
        const plan_shard_t *s = &pl->shard[i];
        cJSON *o = cJSON_CreateObject();
        if (!o) break;
        cJSON_AddStringToObject(o, "node", pl->node[s->node].name);
        cJSON_AddNumberToObject(o, "stage", s->stage);
        cJSON_AddNumberToObject(o, "l0", s->s.l0);
        cJSON_AddNumberToObject(o, "l1", s->s.l1);
        cJSON_AddNumberToObject(o, "h0", s->s.h0);
        cJSON_AddNumberToObject(o, "h1", s->s.h1);
        cJSON_AddNumberToObject(o, "f0", s->s.f0);
        cJSON_AddNumberToObject(o, "f1", s->s.f1);
        cJSON_AddNumberToObject(o, "v0", s->s.v0);
        cJSON_AddNumberToObject(o, "v1", s->s.v1);
        cJSON_AddNumberToObject(o, "weight_bytes", (double)s->weight_bytes);
        cJSON_AddNumberToObject(o, "predicted_ms", s->busy_ms);
        cJSON_AddItemToArray(sh, o);
    }
    cJSON_AddItemToObject(j, "recoveries", cluster_recoveries_json(c));
    return j;
}

int cluster_ping(cluster_t *c, int timeout_ms) {
    if (!c->plan || c->phase < PHASE_LOADED) return 0;
    c->step_t0 = mlm_now_ms();
    const int lost = ping_plan(c, timeout_ms > 0 ? timeout_ms : c->timeout_ms);
    if (lost == 0 || !c->o.recover || c->o.data) return lost;
    cluster_recovery_t r = {0}; // re-plan now rather than at the next step
    const double t0 = mlm_now_ms();
    r.rc = recover(c, MLM_EPEER, &r);
    r.recover_ms = mlm_now_ms() - t0;
    if (c->n_rec < CLUSTER_MAX_RECOVERIES) c->rec[c->n_rec++] = r;
    if (r.rc == 0)
        fprintf(stderr, "meshlm: recovered between steps: %d node(s) now, %d token(s) replayed, %.0f ms\n", r.nodes_after,
                r.replayed, r.recover_ms);
    else
        fprintf(stderr, "meshlm: recovery failed: %s\n", c->errbuf);
    return lost;
}
