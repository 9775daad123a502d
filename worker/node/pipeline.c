// Pipeline execution: stages from the ranks' slices, micro-batches, hand-offs and logit rows.
#include "worker/node/pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transport/gatherv.h"
#include "core/clock.h"
#include "core/err.h"

// --- helpers

static bool computes(const shard_slice_t *s) { return s->l1 > s->l0; }

static bool same_stage(const shard_slice_t *a, const shard_slice_t *b) { return a->l0 == b->l0 && a->l1 == b->l1; }

// Tensor-parallel exchange inside this rank's group.
static int pipe_gather(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    pipe_node_t *p = ctx;
    const double t0 = mlm_now_ms();
    bool fits = p->shm != NULL;
    for (int i = 0; fits && i < p->n; i++) fits = comm_shm_fits(p->shm, lens[i]);
    int rc = fits ? comm_shm_allgatherv(p->shm, mine, my_len, out, lens, p->timeout_ms)
                  : comm_allgatherv_range(p->comm, p->first, p->n, mine, my_len, out, lens, p->timeout_ms);
    p->shm_collectives += fits;
    p->gather_ms += mlm_now_ms() - t0;
    for (int i = 0; i < p->n; i++) p->gather_bytes += (uint64_t)lens[i] * (uint64_t)(p->n - 1);
    p->gathers++;
    return rc;
}

// All-reduce mode: the sum of the group's partial products, star or ring as the group's links say.
static int pipe_allreduce(void *ctx, float *buf, size_t n) {
    pipe_node_t *p = ctx;
    const double t0 = mlm_now_ms();
    const comm_algo_t algo = comm_choose_algo_n(p->comm, p->n, n * sizeof(float));
    const comm_allreduce_opts_t o = {algo, 0};
    const bool fits = comm_shm_fits(p->shm, n * sizeof(float));
    int rc = fits ? comm_shm_allreduce(p->shm, buf, n, algo, p->timeout_ms)
                  : comm_allreduce_range(p->comm, p->first, p->n, buf, n, &o, p->timeout_ms);
    p->shm_collectives += fits;
    p->gather_ms += mlm_now_ms() - t0;
    p->gather_bytes += 2u * (uint64_t)(p->n - 1) * n * sizeof(float); // either algorithm, all members
    p->allreduces++;
    if (algo == COMM_ALGO_RING) p->allreduces_ring++;
    return rc;
}

// The last stage's logit rows go to rank 0 only. Returns 0 when they landed in out (rank 0 is in
// the group), 1 when they went elsewhere.
static int pipe_logits(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    pipe_node_t *p = ctx;
    if (p->n == 1 && p->rank == 0) return 0; // alone at the root: the rows already are in place
    const double t0 = mlm_now_ms();
    int rc = comm_gatherv_root(p->comm, 0, p->first, p->n, mine, my_len, out, lens, p->timeout_ms);
    p->gather_ms += mlm_now_ms() - t0;
    if (p->rank != 0) p->gather_bytes += my_len;
    return rc != 0 ? rc : (p->rank == 0 ? 0 : 1);
}

// Expert parallelism: expert rows to the tokens' home members of this rank's stage.
static int pipe_alltoallv(void *ctx, const void *send, const size_t *send_lens, void *recv, const size_t *recv_lens) {
    pipe_node_t *p = ctx;
    const double t0 = mlm_now_ms();
    int rc = comm_alltoallv(p->comm, p->first, p->n, send, send_lens, recv, recv_lens, p->timeout_ms);
    p->gather_ms += mlm_now_ms() - t0;
    for (int i = 0; i < p->n; i++)
        if (i != p->rank - p->first) p->gather_bytes += send_lens[i];
    return rc;
}

// Placed experts with attention on the leader: one block to or from a member of this rank's stage.
static int pipe_ep_send(void *ctx, int member, const void *buf, size_t len) {
    pipe_node_t *p = ctx;
    const double t0 = mlm_now_ms();
    int rc = comm_send1(p->comm, p->first + member, buf, len, p->timeout_ms);
    p->gather_ms += mlm_now_ms() - t0;
    p->gather_bytes += len;
    return rc;
}

static int pipe_ep_recv(void *ctx, int member, void *buf, size_t cap, size_t *len) {
    pipe_node_t *p = ctx;
    const double t0 = mlm_now_ms();
    comm_msg_t m;
    int rc = comm_recv(p->comm, p->first + member, &m, NULL, p->timeout_ms);
    p->gather_ms += mlm_now_ms() - t0;
    if (rc != 0) return rc;
    if (m.n != 1 || m.len[0] > cap) rc = MLM_EPROTO;
    else if ((*len = m.len[0]) > 0) memcpy(buf, m.data[0], m.len[0]);
    comm_msg_free(&m);
    return rc;
}

// Expert parallelism: every member holds the whole logits; the stage's first rank sends them.
static int pipe_logits_ep(void *ctx, const void *mine, size_t my_len, void *out, const size_t *lens) {
    pipe_node_t *p = ctx;
    if (p->rank != p->first) return 1;
    if (p->rank == 0) return 0; // the rows already are in place
    const double t0 = mlm_now_ms();
    int rc = comm_send1(p->comm, 0, mine, my_len, p->timeout_ms);
    p->gather_ms += mlm_now_ms() - t0;
    p->gather_bytes += my_len;
    return rc != 0 ? rc : 1;
}

static int grow(void **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    void *nb = realloc(*buf, need);
    if (!nb) return MLM_ENOMEM;
    *buf = nb;
    *cap = need;
    return 0;
}

static int recv_hidden(pipe_node_t *p, int nt) {
    const size_t want = (size_t)nt * (size_t)p->n_embd * sizeof(float);
    const double t0 = mlm_now_ms();
    comm_msg_t m;
    int rc = comm_recv(p->comm, p->prev_leader, &m, NULL, p->timeout_ms);
    p->wait_ms += mlm_now_ms() - t0;
    if (rc != 0) return rc;
    if (m.n != 1 || m.len[0] != want) rc = MLM_EPROTO;
    else memcpy(p->hin, m.data[0], want);
    comm_msg_free(&m);
    return rc;
}

// --- public API

int pipe_node_init(pipe_node_t *p, comm_t *comm, int rank, const shard_slice_t *slices, int n_ranks, int n_layer,
                   int n_embd, int n_vocab, int timeout_ms, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    p->comm = comm;
    p->timeout_ms = timeout_ms;
    p->rank = rank;
    p->n_ranks = n_ranks;
    p->slices = slices;
    p->n_embd = n_embd;
    p->n_vocab = n_vocab;
    p->stage = -1;
    p->prev_leader = -1;
    if (rank < 0 || rank >= n_ranks) {
        snprintf(err, errlen, "rank %d outside the plan's %d ranks", rank, n_ranks);
        return MLM_EINVAL;
    }
    // Stages in rank order; rank 0 alone may hold nothing.
    int at = computes(&slices[0]) ? 0 : 1, layer = 0, prev_first = -1;
    while (at < n_ranks) {
        int first = at;
        if (!computes(&slices[first]) || slices[first].l0 != layer) {
            snprintf(err, errlen, "rank %d holds blocks %d-%d where the pipeline needs block %d next", first,
                     slices[first].l0, slices[first].l1 - 1, layer);
            return MLM_EINVAL;
        }
        while (at < n_ranks && same_stage(&slices[at], &slices[first])) at++;
        const int n = at - first;
        if (rank >= first && rank < at) {
            p->stage = p->n_stages;
            p->first = first;
            p->n = n;
            p->prev_leader = prev_first;
        }
        if (p->stage >= 0 && p->stage == p->n_stages - 1) { // the stage after this rank's
            p->next_first = first;
            p->next_n = n;
        }
        p->last_first = first;
        p->last_n = n;
        prev_first = first;
        layer = slices[first].l1;
        p->n_stages++;
    }
    if (layer != n_layer) {
        snprintf(err, errlen, "the plan's stages end at block %d of %d", layer, n_layer);
        return MLM_EINVAL;
    }
    if (p->stage >= 0)
        p->tp = (model_tp_t){p->n, rank - p->first, slices + p->first, pipe_gather, p, pipe_logits, pipe_allreduce};
    return 0;
}

int pipe_set_experts(pipe_node_t *p, const msg_plan_node_t *nodes, int n_layer, int n_expert, bool lead, char *err,
                     size_t errlen) {
    p->ep = true;
    if (p->stage < 0) return 0;
    if (n_expert < 1 || n_expert > MSG_MAX_EXPERTS || n_layer < 1 || p->n > 255)
        return mlm_fail(err, errlen, MLM_EINVAL, "placed experts: %d experts, %d blocks, %d members", n_expert, n_layer, p->n);
    if (p->n > 64)
        for (int i = 0; i < p->n; i++)
            if (nodes[p->first + i].n_block_experts > 0)
                return mlm_fail(err, errlen, MLM_EINVAL, "second copies of experts in a group of %d members (at most 64)",
                                p->n);
    free(p->ep_owner);
    free(p->ep_holders);
    p->ep_holders = NULL;
    const size_t cells = (size_t)n_layer * (size_t)n_expert;
    p->ep_owner = malloc(cells);
    uint64_t *hold = calloc(cells, sizeof *hold); // (n_layer, n_expert) the stage's members holding each
    int16_t *first = malloc(cells * sizeof *first), *second = malloc(cells * sizeof *second); // its first two
    if (!p->ep_owner || !hold || !first || !second) {
        free(hold);
        free(first);
        free(second);
        return MLM_ENOMEM;
    }
    memset(first, 0xff, cells * sizeof *first); // -1: none
    memset(second, 0xff, cells * sizeof *second);
    const int l0 = p->slices[p->rank].l0, l1 = p->slices[p->rank].l1;
    for (int i = 0; i < p->n; i++) { // members in order: the first holder of each is its owner
        const msg_plan_node_t *nd = &nodes[p->first + i];
        for (int j = 0; j < nd->n_experts + nd->n_block_experts; j++) {
            const bool every = j < nd->n_experts; // experts[] hold it in every block, block_experts in one
            const uint32_t v = every ? nd->experts[j] : nd->block_experts[j - nd->n_experts];
            const int e = every ? (int)v : (int)(v & 255u), lb = every ? 0 : (int)(v >> 8);
            for (int l = lb; e < n_expert && l < (every ? n_layer : lb + 1) && l < n_layer; l++) {
                const size_t at = (size_t)l * n_expert + e;
                if (first[at] < 0) first[at] = (int16_t)i;
                else if (first[at] != i && second[at] < 0) second[at] = (int16_t)i;
                if (p->n <= 64) hold[at] |= 1ull << i;
            }
        }
    }
    bool replicas = false;
    int rc = 0;
    for (int l = 0; l < n_layer && rc == 0; l++)
        for (int e = 0; e < n_expert && rc == 0; e++) {
            const size_t at = (size_t)l * n_expert + e;
            const int owner = first[at];
            if (second[at] >= 0) {
                if (!lead)
                    rc = mlm_fail(err, errlen, MLM_EINVAL,
                                  "expert %d is placed on ranks %d and %d of one stage (replicas need attention on the "
                                  "leader)",
                                  e, p->first + owner, p->first + second[at]);
                replicas = true;
            }
            if (owner < 0 && l >= l0 && l < l1)
                rc = mlm_fail(err, errlen, MLM_EINVAL, "expert %d of layer %d is placed on no rank of stage %d (ranks %d-%d)",
                              e, l, p->stage, p->first, p->first + p->n - 1);
            p->ep_owner[at] = (uint8_t)(owner < 0 ? 0 : owner);
        }
    free(first);
    free(second);
    if (rc == 0 && replicas && p->n > 64)
        rc = mlm_fail(err, errlen, MLM_EINVAL, "replicated experts in a group of %d members (at most 64)", p->n);
    if (rc != 0 || !replicas) {
        free(hold);
        if (rc != 0) return rc;
    } else {
        p->ep_holders = hold; // every holder of each expert of each block
    }
    p->tp = (model_tp_t){1, 0, p->slices + p->rank, pipe_gather, p, pipe_logits_ep, NULL};
    p->ep_group = (model_ep_t){.n_nodes = p->n, .index = p->rank - p->first, .n_layer = n_layer,
                               .n_expert = n_expert, .owner = p->ep_owner, .alltoallv = pipe_alltoallv,
                               .gather = pipe_gather, .ctx = p, .lead = lead, .send = pipe_ep_send,
                               .recv = pipe_ep_recv, .holders = p->ep_holders};
    return 0;
}

_Static_assert(COMM_SHM_SLOT_BYTES == PLAN_SHM_SLOT_BYTES, "the planner prices the slot transport uses");

bool pipe_shm_allowed(void) {
    const char *env = getenv("MESHLM_SHM");
    return !(env && (strcmp(env, "off") == 0 || strcmp(env, "0") == 0));
}

int pipe_set_shm(pipe_node_t *p, const char *const *endpoints, char *err, size_t errlen) {
    if (p->stage < 0 || p->n < 2) return 0;
    for (int r = p->first; r < p->first + p->n; r++)
        if (!endpoints[r] || strncmp(endpoints[r], "ipc://", 6) != 0) return 0;
    const bool want = pipe_shm_allowed() && strcmp(comm_name(p->comm), "zmq") == 0;
    comm_shm_destroy(&p->shm);
    return comm_shm_open(&p->shm, p->comm, p->first, p->n, COMM_SHM_SLOT_BYTES, want, p->timeout_ms, err, errlen);
}

void pipe_node_free(pipe_node_t *p) {
    comm_shm_destroy(&p->shm);
    p->shm_collectives = 0;
    free(p->ep_owner);
    free(p->ep_holders);
    p->ep_owner = NULL;
    p->ep_holders = NULL;
    p->ep = false;
    p->ep_group = (model_ep_t){.n_nodes = 1};
    free(p->hin);
    free(p->hout);
    free(p->lbuf);
    p->hin = p->hout = NULL;
    p->lbuf = NULL;
    p->hcap = p->lcap = 0;
}

void pipe_set_links(pipe_node_t *p, const double *lat_us, const double *bw) {
    if (p->stage < 0 || !lat_us || !bw) return;
    double lat = 0, low = 0;
    for (int r = p->first; r < p->first + p->n; r++) {
        if (lat_us[r] > lat) lat = lat_us[r];
        if (bw[r] > 0 && (low == 0 || bw[r] < low)) low = bw[r];
    }
    comm_set_link(p->comm, lat > 0 ? lat : -1, low); // unknown figures leave the comm's as they are
}

void pipe_stats_reset(pipe_node_t *p) {
    p->busy_ms = p->wait_ms = p->gather_ms = 0;
    p->gather_bytes = p->gathers = p->handoff_bytes = 0;
    p->allreduces = p->allreduces_ring = 0;
    p->shm_collectives = 0;
}

int pipe_ubatch(int n, int ubatch) { return ubatch <= 0 || ubatch > n ? n : ubatch; }

bool pipe_lands_logits(const pipe_node_t *p) { return p->rank == 0 && p->stage >= 0 && p->stage == p->n_stages - 1; }

int pipe_node_step(pipe_node_t *p, model_ctx_t *ctx, const int32_t *tokens, int n, int ubatch, float *logits,
                   bool all_logits) {
    if (p->stage < 0) return 0;
    const int u = pipe_ubatch(n, ubatch);
    const size_t E = (size_t)p->n_embd;
    if (p->hcap < (size_t)u * E) {
        size_t cap = 0;
        int rc = grow((void **)&p->hin, &cap, (size_t)u * E * sizeof(float));
        cap = 0;
        if (rc == 0) rc = grow((void **)&p->hout, &cap, (size_t)u * E * sizeof(float));
        if (rc != 0) return rc;
        p->hcap = (size_t)u * E;
    }
    const bool land = pipe_lands_logits(p);
    // attention on the leader: the other members have no residual stream, only leaders hand it on
    const bool lead = p->ep && p->ep_group.lead, expert_only = lead && p->rank != p->first;
    for (int done = 0; done < n;) {
        const int nt = n - done < u ? n - done : u;
        const bool last_mb = done + nt == n;
        int rc = 0;
        if (p->prev_leader >= 0 && !expert_only && (rc = recv_hidden(p, nt)) != 0) return rc;
        float *lp = NULL;
        if (logits && (all_logits || last_mb)) lp = land && all_logits ? logits + (size_t)done * p->n_vocab : logits;
        if (p->ep && p->rank != p->first) lp = NULL; // placed experts: the stage's first rank alone sends logits
        const double t0 = mlm_now_ms(), g0 = p->gather_ms;
        rc = model_eval_stage(ctx, p->prev_leader < 0 ? tokens + done : NULL, p->prev_leader >= 0 ? p->hin : NULL, nt,
                              p->next_n ? p->hout : NULL, lp, all_logits);
        p->busy_ms += mlm_now_ms() - t0 - (p->gather_ms - g0);
        if (rc != 0) return rc;
        if (p->next_n && p->rank == p->first) { // the leader hands the residual stream on
            for (int r = p->next_first; r < p->next_first + (lead ? 1 : p->next_n); r++) {
                if ((rc = comm_send1(p->comm, r, p->hout, (size_t)nt * E * sizeof(float), p->timeout_ms)) != 0)
                    return rc;
                p->handoff_bytes += (uint64_t)nt * E * sizeof(float);
            }
        }
        done += nt;
    }
    return 0;
}

int pipe_recv_logits(pipe_node_t *p, int n, int ubatch, float *logits, bool all_logits) {
    const int u = pipe_ubatch(n, ubatch);
    size_t lens[PIPE_MAX_RANKS];
    if (p->last_n > PIPE_MAX_RANKS) return MLM_EINVAL;
    const int senders = p->ep ? 1 : p->last_n; // placed experts: the last stage's first rank alone
    for (int done = 0; done < n;) {
        const int nt = n - done < u ? n - done : u;
        const bool last_mb = done + nt == n;
        if (all_logits || last_mb) {
            const int n_out = all_logits ? nt : 1;
            size_t sum = 0;
            for (int i = 0; i < senders; i++) {
                const shard_slice_t *s = &p->slices[p->last_first + i];
                lens[i] = (size_t)n_out * (size_t)(s->v1 - s->v0) * sizeof(float);
                sum += lens[i];
            }
            int rc = grow((void **)&p->lbuf, &p->lcap, sum);
            const double t0 = mlm_now_ms();
            if (rc == 0)
                rc = comm_gatherv_root(p->comm, 0, p->last_first, senders, NULL, 0, p->lbuf, lens, p->timeout_ms);
            p->gather_ms += mlm_now_ms() - t0;
            p->gather_bytes += sum;
            if (rc != 0) return rc;
            float *dst = logits + (all_logits ? (size_t)done * p->n_vocab : 0);
            const uint8_t *src = p->lbuf;
            for (int i = 0; i < senders; i++) {
                const shard_slice_t *s = &p->slices[p->last_first + i];
                const size_t w = (size_t)(s->v1 - s->v0);
                for (int t = 0; t < n_out; t++)
                    memcpy(dst + (size_t)t * p->n_vocab + s->v0, src + (size_t)t * w * 4, w * 4);
                src += lens[i];
            }
        }
        done += nt;
    }
    return 0;
}
