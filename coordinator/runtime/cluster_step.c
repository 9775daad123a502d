// The cluster's steps: every node's share of a step for one or several sequences, step reports and
// statistics.
#include "coordinator/runtime/cluster_impl.h"

#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "offload/attn.h"
#include "core/err.h"
#include "proto/msg_io.h"

// --- steps

void cl_note_error(cluster_t *c, int wi, const msg_error_t *e) {
    if (e->lost_node >= 0 && e->lost_node < c->n_nodes) c->w[wi].lost_report = e->lost_node;
}

// Reads the step reports (and errors) waiting on worker wi's link, waiting up to timeout_ms for
// the first. Returns 0, or the code of an ERROR message (its text in errbuf).
int cl_drain_reports(cluster_t *c, int wi, int timeout_ms) {
    char err[256];
    int rc = 0;
    for (;;) {
        msg_t m;
        comm_msg_t raw;
        if (msg_recv(c->ctl, c->w[wi].peer, &m, &raw, NULL, timeout_ms, err, sizeof err) != 0) break;
        timeout_ms = 0;
        if (m.type == MSG_RESULT && m.result.kind == MSG_RESULT_NONE) {
            cl_count_report(c, wi, &m.result);
        } else if (m.type == MSG_ERROR) {
            cl_note_error(c, wi, &m.error);
            snprintf(c->errbuf, sizeof c->errbuf, "%.400s", m.error.text);
            rc = m.error.code < 0 ? m.error.code : MLM_EPROTO;
        }
        msg_clear(&m);
        comm_msg_free(&raw);
    }
    return rc;
}

// The exchanges of n tokens that the coordinator does not see, when it computes nothing: per token
// and layer every member of a stage's group sends its block of the attention output, the two
// hidden-size products and the FFN units (per routed expert) to the others (all-reduce mode: two
// all-reduces of n_embd floats, 2 (g-1) n_embd floats sent in all by either algorithm; placed
// experts: the routed rows to their home and its sums back); stage 0 exchanges the embedding (not
// with placed experts: every member holds every row); each stage hands n_embd floats per token to
// every rank of the next.
static uint64_t unseen_bytes(const cluster_t *c, uint64_t n) {
    const model_hparams_t *hp = model_hparams(c->model);
    const uint64_t per_layer = c->plan->tp_mode == PLAN_TP_ALLREDUCE
                                   ? 4u * (uint64_t)hp->n_embd
                                   : (uint64_t)hp->n_head * hp->head_dim + 2u * (uint64_t)hp->n_embd +
                                         (uint64_t)hp->n_ff * (uint64_t)(hp->n_expert ? hp->n_expert_used : 1);
    const plan_t *pl = c->plan;
    uint64_t floats = 0;
    for (int k = 0; k < pl->n_stages; k++) {
        const uint64_t g = (uint64_t)(pl->stage_first[k + 1] - pl->stage_first[k]);
        const shard_slice_t *s = &pl->shard[pl->stage_first[k]].s;
        // placed experts: per block the routed rows that leave their owner for the home (on average
        // k (g-1)/g of n_embd each, uniform routing) and the home's sums to the g-1 others
        // (attention on the leader: those rows out to their owners and back, k (g-1)/g each way)
        const double away = (double)hp->n_expert_used * (double)(g - 1) / (double)(g ? g : 1);
        const uint64_t ep_layer = (uint64_t)llround((double)hp->n_embd * (pl->ep_lead ? 2.0 * away : away + (double)(g - 1)));
        floats += (uint64_t)(s->l1 - s->l0) * (pl->ep ? ep_layer : per_layer * (g - 1));
        if (k == 0 && !pl->ep) floats += (uint64_t)hp->n_embd * (g - 1);
        if (k + 1 < pl->n_stages)
            floats += (uint64_t)hp->n_embd * (pl->ep_lead ? 1u : (uint64_t)(pl->stage_first[k + 2] - pl->stage_first[k + 1]));
    }
    return n * floats * 4u;
}

// The coordinator's context for sequence seq (made on first use when it computes).
int cl_seq_ctx(cluster_t *c, int seq, model_ctx_t **out) {
    *out = NULL;
    if (!c->computes) return 0;
    if (!c->ctx[seq]) {
        char err[256];
        model_ctx_opts_t co = {.n_ctx = c->o.n_ctx, .n_batch = c->o.n_batch, .n_threads = c->o.n_threads,
                               .kv_f32 = c->o.kv_f32, .kv_q8 = c->o.kv_q8, .tp = &c->pipe.tp, .ep = &c->pipe.ep_group,
                               .attn_dev = c->o.kv_device,
                               .kv_ram = attn_dev_pages(c->o.kv_device) && c->o.coordinator_shard
                                             ? model_kv_ram_share(c->model, c->o.mem_budget)
                                             : 0};
        int rc = model_ctx_new(&c->ctx[seq], c->model, &co, err, sizeof err);
        if (rc != 0) {
            snprintf(c->errbuf, sizeof c->errbuf, "sequence %d: %s", seq, err);
            return rc;
        }
    }
    *out = c->ctx[seq];
    return 0;
}

// One step for each of n_seqs sequences: seq[i] takes n[i] tokens (tokens[i]); logits[i] (or NULL)
// receives its rows as in model_eval. Every STEP goes out first, so the stages work on different
// sequences at once; then the coordinator computes its share of each in order and collects the
// logits in order.
int cl_eval_once(cluster_t *c, int n_seqs, const int *seq, const int32_t *const *tokens, const int *n,
                     float *const *logits, bool all_logits) {
    if (c->phase != PHASE_LOADED) return MLM_ESTATE;
    const int n_vocab = model_hparams(c->model)->n_vocab;
    uint64_t total = 0;
    for (int k = 0; k < n_seqs; k++) {
        if (seq[k] < 0 || seq[k] >= CLUSTER_MAX_SEQS || n[k] <= 0) return MLM_EINVAL;
        if (c->pos[seq[k]] + n[k] > c->o.n_ctx) return MLM_ERANGE;
        for (int j = 0; j < k; j++)
            if (seq[j] == seq[k]) return MLM_EINVAL; // one step per sequence
        for (int i = 0; i < n[k]; i++)
            if (tokens[k][i] < 0 || tokens[k][i] >= n_vocab) return MLM_EINVAL;
        total += (uint64_t)n[k];
    }
    const double t0 = c->step_t0 = mlm_now_ms();
    for (int i = 0; i < c->o.n_workers; i++) {
        if (c->w[i].rank >= 0) cl_drain_reports(c, i, 0); // earlier steps' reports
        c->w[i].lost_report = -1;
    }
    char err[256];
    const uint64_t first_step = c->step_id + 1;
    for (int k = 0; k < n_seqs; k++) {
        msg_t m;
        msg_init(&m, MSG_STEP);
        msg_step_t *st = &m.step;
        st->plan_id = c->plan_id; // 1.5: a worker ignores a step of another plan
        st->step_id = ++c->step_id;
        st->seq_id = (uint64_t)seq[k];
        st->pos = c->pos[seq[k]];
        st->n_tokens = (uint32_t)n[k];
        st->tokens = tokens[k];
        st->logits = !logits[k] ? MSG_LOGITS_NONE : all_logits ? MSG_LOGITS_ALL : MSG_LOGITS_LAST;
        st->ubatch = (uint32_t)c->ubatch;
        st->one_order = c->one_order;
        for (int i = 0; i < c->o.n_workers; i++) {
            if (c->w[i].rank < 0) continue;
            int rc = msg_send(c->ctl, c->w[i].peer, &m, c->timeout_ms, err, sizeof err);
            if (rc != 0) {
                snprintf(c->errbuf, sizeof c->errbuf, "worker %s: %s", c->w[i].endpoint, err);
                return rc;
            }
        }
    }
    int rc = 0;
    const double b0 = c->pipe.busy_ms, w0 = c->pipe.wait_ms + c->pipe.gather_ms;
    for (int k = 0; rc == 0 && c->computes && k < n_seqs; k++) {
        model_ctx_t *ctx;
        if ((rc = cl_seq_ctx(c, seq[k], &ctx)) != 0) break;
        if (c->pos[seq[k]] == 0) model_ctx_reset(ctx);
        model_ctx_set_one_order(ctx, c->one_order);
        rc = pipe_node_step(&c->pipe, ctx, tokens[k], n[k], c->ubatch, logits[k], all_logits);
        model_ctx_set_one_order(ctx, false);
    }
    for (int k = 0; rc == 0 && k < n_seqs; k++)
        if (logits[k] && !pipe_lands_logits(&c->pipe)) rc = pipe_recv_logits(&c->pipe, n[k], c->ubatch, logits[k], all_logits);
    if (c->computes) {
        c->stats.busy_ms += c->pipe.busy_ms - b0;
        c->stats.wait_ms += c->pipe.wait_ms + c->pipe.gather_ms - w0;
    }
    c->stats.gather_ms = c->pipe.gather_ms;
    c->stats.gathers = c->pipe.gathers;
    c->stats.allreduces = c->pipe.allreduces;
    if (c->computes) c->stats.gather_bytes = c->pipe.gather_bytes + c->pipe.handoff_bytes;
    else c->stats.gather_bytes = c->pipe.gather_bytes + unseen_bytes(c, c->stats.tokens + total);
    c->stats.steps += (uint64_t)n_seqs;
    c->stats.tokens += total;
    c->stats.step_ms += mlm_now_ms() - t0;
    if (rc == 0) {
        for (int k = 0; k < n_seqs; k++) c->pos[seq[k]] += n[k];
    } else {
        // Name the worker that reported a failure, if one did.
        snprintf(c->errbuf, sizeof c->errbuf, "step %llu failed: %s (a worker stopped answering within %d ms)",
                 (unsigned long long)first_step, mlm_strerror(rc), c->timeout_ms);
        char first[sizeof c->errbuf] = "";
        for (int i = 0; i < c->o.n_workers; i++) // every worker's (what each lost is noted), the first named
            if (c->w[i].rank >= 0 && cl_drain_reports(c, i, 0) != 0 && !first[0]) snprintf(first, sizeof first, "%s", c->errbuf);
        if (first[0]) snprintf(c->errbuf, sizeof c->errbuf, "%s", first);
    }
    return rc;
}

// --- public API

int cluster_eval(cluster_t *c, const int32_t *tokens, int n, float *logits, bool all_logits) {
    const int seq = 0;
    return cl_eval_seqs(c, 1, &seq, &tokens, &n, &logits, all_logits);
}

int cluster_eval_seqs(cluster_t *c, int n_seqs, const int *seqs, const int32_t *tokens, float *logits) {
    if (n_seqs < 1 || n_seqs > CLUSTER_MAX_SEQS) return MLM_EINVAL;
    const int32_t *tk[CLUSTER_MAX_SEQS];
    int n[CLUSTER_MAX_SEQS];
    float *lg[CLUSTER_MAX_SEQS];
    const int nv = model_hparams(c->full)->n_vocab;
    for (int k = 0; k < n_seqs; k++) {
        tk[k] = tokens + k;
        n[k] = 1;
        lg[k] = logits ? logits + (size_t)k * nv : NULL;
    }
    return cl_eval_seqs(c, n_seqs, seqs, tk, n, lg, false);
}

int cluster_eval_batch(cluster_t *c, int n_seqs, const int *seqs, const int32_t *const *tokens, const int *n,
                       float *const *logits) {
    if (n_seqs < 1 || n_seqs > CLUSTER_MAX_SEQS) return MLM_EINVAL;
    return cl_eval_seqs(c, n_seqs, seqs, tokens, n, logits, false);
}

int cluster_seq_pos(const cluster_t *c, int seq) { return seq < 0 || seq >= CLUSTER_MAX_SEQS ? 0 : c->pos[seq]; }

void cluster_reset_seq(cluster_t *c, int seq) {
    if (seq < 0 || seq >= CLUSTER_MAX_SEQS) return;
    c->pos[seq] = 0; // the next step starts at position 0, which resets every node's cache
    c->hist[seq].n_steps = 0;
}

int cluster_sync_stats(cluster_t *c, int timeout_ms) {
    const double deadline = mlm_now_ms() + timeout_ms;
    for (int i = 0; i < c->o.n_workers; i++) {
        while (c->w[i].rank >= 0 && c->w[i].reports < c->step_id) {
            const double left = deadline - mlm_now_ms();
            if (left <= 0) return MLM_ETIMEOUT;
            if (cl_drain_reports(c, i, (int)left) != 0) return MLM_EPEER;
        }
    }
    return 0;
}

void cluster_reset(cluster_t *c) {
    for (int i = 0; i < CLUSTER_MAX_SEQS; i++) cluster_reset_seq(c, i);
}

void cluster_stats_reset(cluster_t *c) {
    cluster_sync_stats(c, 1000);
    c->stats.steps = c->stats.tokens = c->stats.gather_bytes = c->stats.gathers = c->stats.reports = 0;
    c->stats.allreduces = 0;
    c->stats.gather_ms = c->stats.step_ms = c->stats.busy_ms = c->stats.wait_ms = 0;
    pipe_stats_reset(&c->pipe);
    for (int i = 0; i < c->o.n_workers; i++) {
        worker_t *w = &c->w[i];
        w->reports0 = w->reports;
        w->busy0 = w->busy_ms;
        w->wait0 = w->wait_ms;
        w->shm0 = w->shm_collectives;
    }
}

int cluster_node_times(const cluster_t *c, cluster_node_time_t *out, int max) {
    const plan_t *pl = c->plan;
    if (!pl || c->phase < PHASE_LOADED) return 0;
    const int first = c->n_nodes - pl->n; // rank of the plan's first share (0: the coordinator computes)
    int n = 0;
    for (int r = first; r < c->n_nodes && n < max; r++) {
        cluster_node_time_t *t = &out[n++];
        memset(t, 0, sizeof *t);
        t->rank = r;
        t->transfer_ms = pl->shard[r - first].comm_ms;
        const int wi = c->rank_worker[r];
        if (wi < 0) { // the coordinator's own share
            snprintf(t->node, sizeof t->node, "coordinator");
            t->steps = c->stats.steps;
            t->compute_ms = c->pipe.busy_ms;
            t->comm_ms = c->pipe.wait_ms + c->pipe.gather_ms;
            t->shm_collectives = c->pipe.shm_collectives;
            continue;
        }
        const worker_t *w = &c->w[wi];
        snprintf(t->node, sizeof t->node, "%.63s", w->hello.node_id[0] ? w->hello.node_id : w->endpoint);
        t->steps = w->reports - w->reports0;
        t->compute_ms = w->busy_ms - w->busy0;
        t->comm_ms = w->wait_ms - w->wait0;
        t->shm_collectives = w->shm_collectives - w->shm0;
    }
    return n;
}
