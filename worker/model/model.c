// llama-family forward pass: RMSNorm, RoPE (NORM mode), GQA attention, SwiGLU FFN or Mixtral-style
// top-k experts, computed with the matmul kernels on a thread pool. It talks to two devices only:
// a weight provider (offload/weights.h) it acquires each unit of weights from just before use and
// releases right after, and an attention/KV device (offload/attn.h) that keeps the sequence's k and
// v and computes attention for its q.
#include "worker/model/model.h"
#include <stdatomic.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/err.h"
#include "offload/attn.h"
#include "offload/weights.h"
#include "worker/kernels/matmul.h"
#include "worker/kernels/ops.h"
#include "worker/kernels/threadpool.h"

// --- types

// Jobs below this many multiply-adds run on the calling thread: waking a worker costs more.
#define PAR_MIN_WORK 65536.0
#define PLAN_NODES_MAX 64 // nodes in a tensor-parallel group

struct model {
    gguf_t *g;                      // the mapped file (owned)
    gguf_t *cols_g;                 // its columns file (model_load_opts_t.cols_path), or NULL (owned)
    model_hparams_t hp;             // shapes
    const kernels_t *kern;          // kernel table used for every matmul
    weights_t *w;                   // the weight provider the forward pass acquires units from (owned)
    shard_slice_t slice;            // rows held
    bool shard_file;                // the file holds only those rows (else they are cut from it)
    float expert_skip;              // model_load_opts_t.expert_skip (0 = off)
    void (*on_route)(void *arg, int layer, const int *sel, int nt, int k); // model_load_opts_t.on_route
    void *on_route_arg;
};

struct model_ctx {
    const model_t *m;          // borrowed
    tpool_t *pool;             // owned
    attn_dev_t *attn;          // attention/KV device holding this context's sequence (owned)
    int n_ctx;                 // cache capacity in positions
    int n_batch;               // tokens per chunk
    int pos;                   // tokens already in the cache
    bool one_order;            // every token of a chunk gets the bits it would get alone (model_ctx_set_one_order)
    model_tp_t tp;             // tensor-parallel group (n_nodes 1 = alone)
    bool ar;                   // all-reduce mode: attn_output / ffn_down cut by columns, partial sums
                               // added up by tp.allreduce (the slice's cols)
    int Hl, KVl, El, Fl, Vl;   // this node's local widths: heads, KV heads, hidden rows, FFN units, vocab rows
    float *x;                  // (n_batch, n_embd) residual stream (replicated on every node)
    float *xn;                 // (n_batch, n_embd) normed input of the current block
    float *q;                  // (n_batch, Hl*head_dim)
    float *k;                  // (n_batch, KVl*head_dim)
    float *v;                  // (n_batch, KVl*head_dim)
    float *att_l;              // (n_batch, Hl*head_dim) this node's heads' attention output
    float *att;                // (n_batch, n_head*head_dim) all heads (aliases att_l alone or in
                               // all-reduce mode)
    float *y_l;                // (n_batch, El) this node's rows of a hidden-size product (aliases tmp
                               // alone or in all-reduce mode)
    float *tmp;                // (n_batch, n_embd) block output before the residual add (in all-reduce
                               // mode this node's partial sum, then the group's sum)
    float *ffn_g;              // (n_batch, Fl)
    float *ffn_u;              // (n_batch, Fl)
    float *ffn_h;              // (n_batch, n_ff) all FFN units (aliases ffn_g alone or in all-reduce mode)
    float *router;             // (n_batch, n_expert)
    int *sel;                  // (n_batch, n_expert_used) chosen experts
    float *sel_w;              // (n_batch, n_expert_used) their weights
    int *e_tok;                // (n_batch) tokens routed to one expert
    int *e_order;              // (n_expert) experts of a layer in the order they are visited
    float *e_x;                // (n_batch, n_embd) gathered inputs for one expert (MoE)
    float *e_y;                // (n_batch, El) one expert's output rows (MoE)
    float *acc_l;              // (n_batch, El) MoE sum of this node's rows (aliases tmp alone or in
                               // all-reduce mode)
    float *logit_l;            // (n_batch, Vl) this node's vocabulary rows
    uint8_t *gbuf;             // (gbuf_cap) gather landing buffer, all nodes' blocks
    size_t gbuf_cap;
    size_t *glen;              // (n_nodes) block lengths of the current gather
    void *xq_a;                // (n_batch, act row bytes) quantized activations
    void *xq_b;                // (n_batch, act row bytes) for a second weight type in a group
    void *xq_c;                // (n_batch, act row bytes) for a third
    size_t xq_cap;             // bytes of each xq buffer
    model_ep_t ep;             // expert-parallel group (n_nodes 1 = alone)
    float *ep_send;            // (n_batch * n_expert_used, n_embd) expert rows for the tokens' homes, by home
    float *ep_recv;            // (n_batch * n_expert_used, n_embd) expert rows of this home's tokens, by sender
    int *ep_row;               // (n_batch, n_expert_used) row of ep_recv holding token i's rank-r expert output
    size_t *ep_slen;           // (ep.n_nodes) bytes of ep_send for each home
    size_t *ep_rlen;           // (ep.n_nodes) bytes of ep_recv from each member
    uint8_t *ep_asg;           // (n_expert_used, n_expert) the member computing each (rank, expert) batch
    int *ep_cnt;               // (3 n_expert_used n_expert) ep_assign_holders' scratch
    uint8_t *ep_msg;           // (ep_msg_cap) attention on the leader: the routing and rows of one member
    size_t ep_msg_cap;
};

// --- helpers: loading

// The rows this model holds: the shard file's (which must be what the caller asks for, if it asks),
// else the requested slice, else everything; checked against the model's shape.
static int resolve_slice(model_t *m, const shard_slice_t *want, char *err, size_t errlen) {
    const model_hparams_t *hp = &m->hp;
    shard_slice_t in_file;
    int rc = shard_file_slice(m->g, &in_file, &m->shard_file);
    if (rc != 0) return mlm_fail(err, errlen, rc, "%s: inconsistent meshlm.shard keys", gguf_path(m->g));
    m->slice = shard_full(hp->n_layer, hp->n_head, hp->n_head_kv, hp->n_embd, hp->n_ff, hp->n_vocab);
    if (m->shard_file) {
        if (in_file.l1 < 0) in_file.l1 = hp->n_layer; // written before pipeline stages: every block
        if (want && memcmp(want, &in_file, sizeof in_file) != 0)
            return mlm_fail(err, errlen, MLM_EINVAL, "%s: the shard file holds other rows than the plan asks for",
                            gguf_path(m->g));
        m->slice = in_file;
    } else if (want) {
        m->slice = *want;
    }
    const shard_slice_t *sl = &m->slice;
    if (sl->h0 < 0 || sl->h1 > hp->n_head || sl->kv0 < 0 || sl->kv1 > hp->n_head_kv || sl->e0 < 0 || sl->e1 > hp->n_embd ||
        sl->f0 < 0 || sl->f1 > hp->n_ff || sl->v0 < 0 || sl->v1 > hp->n_vocab || sl->h1 < sl->h0 || sl->kv1 < sl->kv0 ||
        sl->e1 < sl->e0 || sl->f1 < sl->f0 || sl->v1 < sl->v0 || sl->l0 < 0 || sl->l1 > hp->n_layer || sl->l1 < sl->l0)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: slice outside the model's shape", gguf_path(m->g));
    if (sl->placed && (sl->cols || hp->n_expert <= 0 || shard_expert_count(sl, SHARD_EXPERTS_MAX) >
                                                           shard_expert_count(sl, hp->n_expert)))
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: a slice of placed experts names experts the model (%d) lacks%s",
                        gguf_path(m->g), hp->n_expert, sl->cols ? ", or is cut by columns" : "");
    if (sl->cols && (sl->cols != 1 || sl->e0 != 0 || sl->e1 != hp->n_embd))
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: an all-reduce slice holds every hidden row", gguf_path(m->g));
    if (sl->h1 > sl->h0) { // a node's query heads need exactly its KV heads
        int group = hp->n_head / hp->n_head_kv;
        if (sl->kv0 != sl->h0 / group || sl->kv1 != (sl->h1 - 1) / group + 1)
            return mlm_fail(err, errlen, MLM_EINVAL, "%s: slice's KV heads do not match its query heads",
                            gguf_path(m->g));
    }
    return 0;
}

// Opens the columns file at path for the model's all-reduce slice: it must be one, of this slice.
static int open_cols(model_t *m, const char *path, char *err, size_t errlen) {
    int rc = gguf_open(&m->cols_g, path, err, errlen);
    if (rc != 0) return rc;
    shard_slice_t in_file;
    bool is_shard = false;
    rc = shard_file_slice(m->cols_g, &in_file, &is_shard);
    if (rc == 0 && in_file.l1 < 0) in_file.l1 = m->hp.n_layer;
    if (rc != 0 || !is_shard || !shard_file_cols_only(m->cols_g) || m->shard_file ||
        memcmp(&in_file, &m->slice, sizeof in_file) != 0)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: not the columns file of this slice of %s", path, gguf_path(m->g));
    return 0;
}

// --- public API: model

int model_load(model_t **out, const char *path, const model_load_opts_t *opts, char *err, size_t errlen) {
    *out = NULL;
    model_t *m = calloc(1, sizeof *m);
    if (!m) return MLM_ENOMEM;
    m->kern = (opts && opts->kern) ? opts->kern : kernels_best();
    m->expert_skip = opts && opts->expert_skip > 0 ? opts->expert_skip : 0;
    m->on_route = opts ? opts->on_route : NULL;
    m->on_route_arg = opts ? opts->on_route_arg : NULL;
    int rc = gguf_open(&m->g, path, err, errlen);
    if (rc == 0) rc = hparams_read(m->g, &m->hp, err, errlen);
    if (rc == 0 && shard_file_cols_only(m->g))
        rc = mlm_fail(err, errlen, MLM_EINVAL, "%s: a columns file holds part of a share; it loads beside its model file",
                      path);
    if (rc == 0) rc = resolve_slice(m, opts ? opts->slice : NULL, err, errlen);
    if (rc == 0 && opts && opts->cols_path) rc = open_cols(m, opts->cols_path, err, errlen);
    if (rc == 0) {
        const weights_params_t wp = {
            .g = m->g,
            .hp = &m->hp,
            .slice = &m->slice,
            .shard_file = m->shard_file,
            .cols_g = m->cols_g,
            .kern = m->kern,
            .repack = opts ? opts->repack : true,
            .budget_bytes = opts ? opts->mem_budget : 0,
            .n_ctx = opts && opts->n_ctx > 0 ? opts->n_ctx
                                             : (m->hp.n_ctx_train > 0 && m->hp.n_ctx_train < 4096 ? m->hp.n_ctx_train : 4096),
            .experts = opts ? opts->experts : NULL,
            .experts_only = opts && opts->experts && opts->experts_only,
            .block_experts = opts && opts->experts ? opts->block_experts : NULL,
            .n_block_experts = opts && opts->experts ? opts->n_block_experts : 0,
            .reuse = opts && opts->reuse ? opts->reuse->w : NULL,
        };
        const char *wname = opts ? opts->weights : NULL; // NULL: by the budget (weights_choose; placed experts
                                                          // are mapped, or cached over a budget, never streamed)
        rc = weights_new(&m->w, wname, &wp, err, errlen);
    }
    if (rc != 0) {
        if (rc == MLM_ENOMEM && err && errlen) snprintf(err, errlen, "%s: out of memory while loading", path);
        model_destroy(&m);
        return rc;
    }
    *out = m;
    return 0;
}

void model_destroy(model_t **self_p) {
    if (!self_p || !*self_p) return;
    model_t *m = *self_p;
    weights_free(&m->w);
    gguf_close(&m->cols_g);
    gguf_close(&m->g);
    free(m);
    *self_p = NULL;
}

const model_hparams_t *model_hparams(const model_t *m) { return &m->hp; }
const gguf_t *model_gguf(const model_t *m) { return m->g; }
const kernels_t *model_kernels(const model_t *m) { return m->kern; }
const char *model_type_name(const model_t *m) { return m->hp.type_name; }
const shard_slice_t *model_slice(const model_t *m) { return &m->slice; }
weights_t *model_weights(const model_t *m) { return m->w; }

uint64_t model_kv_ram_share(const model_t *m, uint64_t mem_budget) {
    if (!mem_budget) return 0;
    const weights_params_t wp = {.g = m->g, .hp = &m->hp, .slice = &m->slice, .shard_file = m->shard_file,
                                 .kern = m->kern, .budget_bytes = mem_budget, .n_ctx = 1};
    plan_stream_t st;
    char err[256];
    if (weights_plan(&wp, &st, err, sizeof err) != 0 || st.peak_bytes >= mem_budget) return 1;
    return mem_budget - st.peak_bytes;
}

// --- public API: context

int model_ctx_new(model_ctx_t **out, const model_t *m, const model_ctx_opts_t *opts, char *err, size_t errlen) {
    *out = NULL;
    const model_hparams_t *hp = &m->hp;
    model_ctx_opts_t o = opts ? *opts : (model_ctx_opts_t){0};
    if (o.n_ctx <= 0) o.n_ctx = hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    if (o.n_batch <= 0) o.n_batch = 64;
    if (o.n_threads <= 0) o.n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (o.n_threads <= 0) o.n_threads = 1;
    const shard_slice_t *sl = &m->slice;
    const shard_slice_t full = shard_full(hp->n_layer, hp->n_head, hp->n_head_kv, hp->n_embd, hp->n_ff, hp->n_vocab);
    if (o.tp && (o.tp->n_nodes < 1 || o.tp->n_nodes > PLAN_NODES_MAX || o.tp->index < 0 || o.tp->index >= o.tp->n_nodes || !o.tp->slices ||
                 (o.tp->n_nodes > 1 && !o.tp->gather) || (o.tp->n_nodes > 1 && sl->cols && !o.tp->allreduce) ||
                 memcmp(&o.tp->slices[o.tp->index], sl, sizeof *sl) != 0)) {
        snprintf(err, errlen, "tensor-parallel group is inconsistent with the model's slice");
        return MLM_EINVAL;
    }
    for (int i = 0; o.tp && i < o.tp->n_nodes; i++)
        if (o.tp->slices[i].cols != sl->cols) {
            snprintf(err, errlen, "tensor-parallel group mixes exact and all-reduce slices");
            return MLM_EINVAL;
        }
    shard_slice_t rows = *sl; // a pipeline stage alone holds every row of its blocks
    rows.l0 = full.l0;
    rows.l1 = full.l1;
    rows.placed = 0; // placed experts are whole: every row of each expert held
    memset(rows.experts, 0, sizeof rows.experts);
    if (!o.tp && memcmp(&rows, &full, sizeof full) != 0) {
        snprintf(err, errlen, "a model holding a slice needs a tensor-parallel group to run");
        return MLM_EINVAL;
    }
    if (sl->placed && shard_expert_count(sl, hp->n_expert) < hp->n_expert && !(o.ep && o.ep->n_nodes > 1)) {
        snprintf(err, errlen, "a model holding %d of its %d experts needs an expert-parallel group to run",
                 shard_expert_count(sl, hp->n_expert), hp->n_expert);
        return MLM_EINVAL;
    }
    if (sl->l1 <= sl->l0) {
        snprintf(err, errlen, "a model holding no blocks cannot run");
        return MLM_EINVAL;
    }
    if (o.ep && o.ep->n_nodes > 1) {
        bool ok = o.ep->index >= 0 && o.ep->index < o.ep->n_nodes && o.ep->n_nodes <= PLAN_NODES_MAX &&
                  o.ep->owner && (o.ep->lead ? o.ep->send && o.ep->recv : o.ep->alltoallv && o.ep->gather) &&
                  o.ep->n_layer == hp->n_layer &&
                  o.ep->n_expert == hp->n_expert && hp->n_expert > 0 && (!o.tp || o.tp->n_nodes == 1) &&
                  memcmp(&rows, &full, sizeof full) == 0;
        for (int i = 0; ok && i < hp->n_layer * hp->n_expert; i++) ok = o.ep->owner[i] < o.ep->n_nodes;
        const uint64_t members = o.ep->n_nodes >= 64 ? ~0ull : (1ull << o.ep->n_nodes) - 1;
        for (int i = 0; ok && o.ep->holders && i < hp->n_layer * hp->n_expert; i++)
            ok = o.ep->lead && (o.ep->holders[i] >> o.ep->owner[i] & 1) && !(o.ep->holders[i] & ~members);
        if (!ok) {
            snprintf(err, errlen, "expert-parallel group is inconsistent with the model (it needs a MoE model holding "
                                  "every row of its blocks, no tensor-parallel group, owners below %d)",
                     o.ep->n_nodes);
            return MLM_EINVAL;
        }
    }
    model_ctx_t *c = calloc(1, sizeof *c);
    if (!c) return MLM_ENOMEM;
    c->m = m;
    c->n_ctx = o.n_ctx;
    c->n_batch = o.n_batch;
    c->tp = o.tp ? *o.tp : (model_tp_t){.n_nodes = 1, .index = 0, .slices = &m->slice};
    const bool alone = c->tp.n_nodes == 1;
    c->ar = sl->cols != 0;
    const bool whole = alone || c->ar; // a node that never gathers activation columns
    c->Hl = sl->h1 - sl->h0;
    c->KVl = sl->kv1 - sl->kv0;
    c->El = sl->e1 - sl->e0;
    c->Fl = sl->f1 - sl->f0;
    c->Vl = sl->v1 - sl->v0;
    const size_t B = (size_t)o.n_batch, E = (size_t)hp->n_embd, hd = (size_t)hp->head_dim;
    const size_t Qd = (size_t)hp->n_head * hd, F = (size_t)hp->n_ff, NV = (size_t)hp->n_vocab;
    const size_t KVl = (size_t)c->KVl * hd, Ql = (size_t)c->Hl * hd;
    const qtype_t kv_type = o.kv_q8 ? QT_Q8_0 : o.kv_f32 ? QT_F32 : QT_F16;
    const size_t kv_row = kv_type == QT_Q8_0 ? qtype_row_size(QT_Q8_0, (int64_t)KVl) : KVl * (o.kv_f32 ? 4 : 2);
    const size_t kv_bytes = (size_t)(sl->l1 - sl->l0) * (size_t)c->n_ctx * kv_row; // its blocks only
    size_t maxin = E > Qd ? E : Qd;
    if (F > maxin) maxin = F;
    c->xq_cap = B * (maxin * 4 + 64); // generous: F32 rows are the widest activation type
    c->pool = tpool_new(o.n_threads);
    int rc = 0;
    if (c->pool && c->Hl > 0) { // a node without query heads has no attention to compute
        const attn_params_t ap = {
            .n_layer = sl->l1 - sl->l0,
            .head_dim = hp->head_dim,
            .n_head = hp->n_head,
            .n_head_kv = hp->n_head_kv,
            .h0 = sl->h0,
            .h1 = sl->h1,
            .kv0 = sl->kv0,
            .kv1 = sl->kv1,
            .kv_type = kv_type,
            .n_seq_max = 1,
            .pool = c->pool,
            .ram_bytes = o.kv_ram,
        };
        rc = attn_dev_new(&c->attn, o.attn_dev, &ap, err, errlen);
        if (rc == 0 && (rc = attn_dev_seq_new(c->attn, 0, c->n_ctx)) != 0 && rc != MLM_ENOMEM)
            mlm_fail(err, errlen, rc, "attention device %s: cannot hold %d positions: %s", attn_dev_name(c->attn),
                     c->n_ctx, mlm_strerror(rc));
        if (rc != 0 && rc != MLM_ENOMEM) { // ENOMEM: reported below with the cache's size
            model_ctx_destroy(&c);
            return rc;
        }
    }
    c->x = malloc(B * E * 4);
    c->xn = malloc(B * E * 4);
    c->tmp = malloc(B * E * 4);
    c->q = malloc(B * Ql * 4 + 4);
    c->att_l = malloc(B * Ql * 4 + 4);
    c->att = whole ? c->att_l : malloc(B * Qd * 4);
    c->k = malloc(B * KVl * 4 + 4);
    c->v = malloc(B * KVl * 4 + 4);
    c->y_l = whole ? c->tmp : malloc(B * (size_t)c->El * 4 + 4);
    c->ffn_g = malloc(B * (size_t)c->Fl * 4 + 4);
    c->ffn_u = malloc(B * (size_t)c->Fl * 4 + 4);
    c->ffn_h = whole ? c->ffn_g : malloc(B * F * 4);
    c->logit_l = alone ? NULL : malloc(B * (size_t)c->Vl * 4 + 4);
    c->xq_a = malloc(c->xq_cap);
    c->xq_b = malloc(c->xq_cap);
    c->xq_c = malloc(c->xq_cap);
    bool tp_ok = alone;
    if (!alone) {
        size_t widest = Qd > E ? Qd : E;
        if (F > widest) widest = F;
        if (NV > widest) widest = NV;
        c->gbuf_cap = B * widest * 4;
        c->gbuf = malloc(c->gbuf_cap);
        c->glen = calloc((size_t)c->tp.n_nodes, sizeof *c->glen);
        tp_ok = c->gbuf && c->glen && c->att && c->y_l && c->ffn_h && c->logit_l;
    }
    bool moe_ok = true;
    if (hp->n_expert > 0) {
        c->router = malloc(B * (size_t)hp->n_expert * 4);
        c->sel = malloc(B * (size_t)hp->n_expert_used * sizeof(int));
        c->sel_w = malloc(B * (size_t)hp->n_expert_used * 4);
        c->e_tok = malloc(B * sizeof(int));
        c->e_order = malloc((size_t)hp->n_expert * sizeof(int));
        c->e_x = malloc(B * E * 4);
        c->e_y = malloc(B * (size_t)c->El * 4 + 4);
        c->acc_l = whole ? c->tmp : malloc(B * (size_t)c->El * 4 + 4);
        moe_ok = c->router && c->sel && c->sel_w && c->e_tok && c->e_order && c->e_x && c->e_y && c->acc_l;
    }
    c->ep = o.ep && o.ep->n_nodes > 1 ? *o.ep : (model_ep_t){.n_nodes = 1};
    if (c->ep.n_nodes > 1) {
        const size_t rows = B * (size_t)hp->n_expert_used;
        c->ep_send = malloc(rows * E * 4);
        c->ep_recv = malloc(rows * E * 4);
        c->ep_row = malloc(rows * sizeof(int));
        c->ep_slen = calloc((size_t)c->ep.n_nodes, sizeof(size_t));
        c->ep_rlen = calloc((size_t)c->ep.n_nodes, sizeof(size_t));
        c->ep_msg_cap = 2 * sizeof(int32_t) + B * (size_t)hp->n_expert_used * sizeof(int32_t) + B * E * 4;
        c->ep_msg = malloc(c->ep_msg_cap);
        c->ep_asg = malloc((size_t)hp->n_expert_used * (size_t)hp->n_expert);
        c->ep_cnt = malloc(3 * (size_t)hp->n_expert_used * (size_t)hp->n_expert * sizeof(int));
        moe_ok = moe_ok && c->ep_send && c->ep_recv && c->ep_row && c->ep_slen && c->ep_rlen && c->ep_msg && c->ep_asg &&
                 c->ep_cnt;
    }
    if (!c->pool || rc != 0 || !c->x || !c->xn || !c->tmp || !c->q || !c->att_l || !c->k || !c->v || !c->ffn_g ||
        !c->ffn_u || !c->xq_a || !c->xq_b || !c->xq_c || !moe_ok || !tp_ok) {
        if (err && errlen)
            snprintf(err, errlen, "cannot allocate a context of %d positions (%.1f MiB KV cache)", c->n_ctx,
                     2.0 * (double)kv_bytes / 1048576.0);
        model_ctx_destroy(&c);
        return MLM_ENOMEM;
    }
    *out = c;
    return 0;
}

void model_ctx_destroy(model_ctx_t **self_p) {
    if (!self_p || !*self_p) return;
    model_ctx_t *c = *self_p;
    attn_dev_free(&c->attn); // before the pool it borrows
    tpool_destroy(&c->pool);
    if (c->att != c->att_l) free(c->att);
    if (c->y_l != c->tmp) free(c->y_l);
    if (c->ffn_h != c->ffn_g) free(c->ffn_h);
    if (c->acc_l != c->tmp) free(c->acc_l);
    free(c->x);
    free(c->xn);
    free(c->tmp);
    free(c->q);
    free(c->att_l);
    free(c->k);
    free(c->v);
    free(c->ffn_g);
    free(c->ffn_u);
    free(c->logit_l);
    free(c->gbuf);
    free(c->glen);
    free(c->xq_a);
    free(c->xq_b);
    free(c->xq_c);
    free(c->router);
    free(c->sel);
    free(c->sel_w);
    free(c->e_tok);
    free(c->e_order);
    free(c->e_x);
    free(c->e_y);
    free(c->ep_send);
    free(c->ep_recv);
    free(c->ep_row);
    free(c->ep_slen);
    free(c->ep_rlen);
    free(c->ep_msg);
    free(c->ep_asg);
    free(c->ep_cnt);
    free(c);
    *self_p = NULL;
}

int model_ctx_pos(const model_ctx_t *c) { return c->pos; }
void model_ctx_set_one_order(model_ctx_t *c, bool on) { c->one_order = on; }
int model_ctx_n_ctx(const model_ctx_t *c) { return c->n_ctx; }
void model_ctx_reset(model_ctx_t *c) { c->pos = 0; } // the next step's appends rewind the device's sequence
attn_dev_t *model_ctx_attn(const model_ctx_t *c) { return c->attn; }

// --- helpers: compute

typedef struct {
    const mm_weight_t *w;  // matrix
    const void *xq;        // (nt, xq_stride bytes) activations in its act type
    size_t xq_stride;      // bytes between activation rows
    int nt;                // activation rows
    float *y;              // (nt, y_stride) output
    size_t y_stride;       // floats between output rows
} mm_task_t;

// A matmul's rows are cut into one contiguous range per thread, each walked in MM_CHUNKS chunks claimed
// from the range's counter: a thread streams its own range front to back, then helps with the chunks
// left in the others' ranges, so a thread that gets its core less (another process on its core or its
// memory channel) ends up with less of the work instead of the other one waiting at the end. 0: the
// static ranges alone. At most MM_STEAL_MAX threads share (more: static ranges).
#ifndef MM_CHUNKS
#define MM_CHUNKS 16
#endif
#define MM_STEAL_MAX 16

typedef struct {
    const kernels_t *k;    // kernel table
    mm_task_t t[3];        // independent products computed in one parallel job
    int n;                 // tasks used
    bool one_order;        // each token's products summed as if it came alone (mm_rows_one_order)
    atomic_int next[3][MM_STEAL_MAX]; // each task's next unclaimed chunk of each thread's range
} mm_job_t;

static void mm_job_rows(const mm_job_t *job, const mm_task_t *t, int64_t r0, int64_t r1) {
    if (r1 > t->w->rows) r1 = t->w->rows;
    if (r0 < r1) (job->one_order ? mm_rows_one_order : mm_rows)(job->k, t->w, t->xq, t->xq_stride, t->nt, t->y,
                                                                t->y_stride, r0, r1);
}

static void mm_job_fn(void *arg, int ith, int nth) {
    mm_job_t *job = arg;
    for (int i = 0; i < job->n; i++) {
        const mm_task_t *t = &job->t[i];
        const int64_t al = t->w->row_align > 0 ? t->w->row_align : 1, nblk = (t->w->rows + al - 1) / al;
        const int64_t n_chunk = (int64_t)nth * (MM_CHUNKS > 0 ? MM_CHUNKS : 1);
        if (MM_CHUNKS == 0 || nth == 1 || nth > MM_STEAL_MAX || nblk < n_chunk) {
            mm_job_rows(job, t, nblk * ith / nth * al, nblk * (ith + 1) / nth * al);
            continue;
        }
        for (int d = 0; d < nth; d++) { // its own range first, then the next ones'
            const int o = (ith + d) % nth;
            for (int ch; (ch = atomic_fetch_add_explicit(&job->next[i][o], 1, memory_order_relaxed)) < MM_CHUNKS;) {
                const int64_t c = (int64_t)o * MM_CHUNKS + ch;
                mm_job_rows(job, t, nblk * c / n_chunk * al, nblk * (c + 1) / n_chunk * al);
            }
        }
    }
}

// Quantizes nt rows of x (cols wide, x_stride floats apart) for weights of type wtype into buf.
// Returns the activation pointer and its row stride (F32 activations are used in place).
static const void *quantize_rows(const model_ctx_t *c, qtype_t wtype, const float *x, size_t x_stride, int nt,
                                 int64_t cols, void *buf, size_t *stride) {
    if (mm_act_type(wtype) == QT_F32) {
        *stride = x_stride * sizeof(float);
        return x;
    }
    size_t rb = mm_act_row_bytes(wtype, cols);
    for (int t = 0; t < nt; t++) mm_quantize_act(c->m->kern, wtype, x + (size_t)t * x_stride, (uint8_t *)buf + (size_t)t * rb, cols);
    *stride = rb;
    return buf;
}

// Runs up to three products that share one input x (nt rows of cols floats): y_i = W_i x.
// Activation rows are quantized once per weight type (their layout can depend on the weight type).
static void matmul_shared(model_ctx_t *c, const float *x, int nt, int n, const mm_weight_t *const *ws,
                          float *const *ys) {
    mm_job_t job = {.k = c->m->kern, .n = 0, .one_order = c->one_order};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < MM_STEAL_MAX; j++) atomic_init(&job.next[i][j], 0);
    void *bufs[3] = {c->xq_a, c->xq_b, c->xq_c};
    qtype_t done_type[3];
    const void *done_q[3];
    size_t done_s[3];
    int n_done = 0;
    for (int i = 0; i < n; i++) {
        if (ws[i]->rows == 0) continue; // this node holds none of these rows
        int j = 0;
        while (j < n_done && done_type[j] != ws[i]->type) j++;
        if (j == n_done) {
            done_type[j] = ws[i]->type;
            done_q[j] = quantize_rows(c, ws[i]->type, x, (size_t)ws[i]->cols, nt, ws[i]->cols, bufs[j], &done_s[j]);
            n_done++;
        }
        job.t[job.n++] = (mm_task_t){ws[i], done_q[j], done_s[j], nt, ys[i], (size_t)ws[i]->rows};
    }
    double macs = 0;
    for (int i = 0; i < n; i++) macs += (double)ws[i]->rows * (double)ws[i]->cols * nt;
    tpool_run_n(c->pool, mm_job_fn, &job, macs < PAR_MIN_WORK ? 1 : tpool_size(c->pool));
}

static void matmul1(model_ctx_t *c, const mm_weight_t *w, const float *x, int nt, float *y) {
    const mm_weight_t *ws[1] = {w};
    float *ys[1] = {y};
    matmul_shared(c, x, nt, 1, ws, ys);
}

// y (nt, n_embd) <- this node's partial sum of a column-cut product W x (x: nt rows of W's columns);
// zeros when it holds none of W's columns. MLM_ESTATE when the bound matrix is not the expected cut.
static int matmul_partial(model_ctx_t *c, const mm_weight_t *w, int64_t cols, const float *x, int nt, float *y) {
    const int E = c->m->hp.n_embd;
    if (cols == 0 || w->rows == 0) {
        if (w->rows != 0 || cols != 0) return MLM_ESTATE;
        memset(y, 0, (size_t)nt * (size_t)E * sizeof(float));
        return 0;
    }
    if (w->rows != E || w->cols != cols) return MLM_ESTATE;
    matmul1(c, w, x, nt, y);
    return 0;
}

// --- helpers: tensor-parallel exchange

// buf (nt, n_embd) <- the sum of every node's partial buf (all-reduce mode).
static int sum_partials(model_ctx_t *c, float *buf, int nt) {
    if (c->tp.n_nodes == 1) return 0;
    return c->tp.allreduce(c->tp.gather_ctx, buf, (size_t)nt * (size_t)c->m->hp.n_embd);
}

enum { G_HEADS, G_HIDDEN, G_FFN, G_VOCAB };

// Columns [lo, hi) of a full activation row that node i computes, for each kind of product.
static void node_cols(const model_ctx_t *c, int node, int kind, int *lo, int *hi) {
    const shard_slice_t *s = &c->tp.slices[node];
    const int hd = c->m->hp.head_dim;
    switch (kind) {
    case G_HEADS: *lo = s->h0 * hd; *hi = s->h1 * hd; break;
    case G_HIDDEN: *lo = s->e0; *hi = s->e1; break;
    case G_FFN: *lo = s->f0; *hi = s->f1; break;
    default: *lo = s->v0; *hi = s->v1; break;
    }
}

// full (nt rows of total floats) <- every node's block (nt rows of its own width), via the gather.
// Alone, the local block already is the full matrix.
static int gather_cols(model_ctx_t *c, const float *loc, int nt, int kind, int total, float *full) {
    if (c->tp.n_nodes == 1) {
        if (loc != full) memcpy(full, loc, (size_t)nt * (size_t)total * sizeof(float));
        return 0;
    }
    size_t sum = 0;
    for (int i = 0; i < c->tp.n_nodes; i++) {
        int lo, hi;
        node_cols(c, i, kind, &lo, &hi);
        c->glen[i] = (size_t)nt * (size_t)(hi - lo) * sizeof(float);
        sum += c->glen[i];
    }
    if (sum > c->gbuf_cap) return MLM_ERANGE;
    int rc = c->tp.gather(c->tp.gather_ctx, loc, c->glen[c->tp.index], c->gbuf, c->glen);
    if (rc != 0) return rc;
    const uint8_t *p = c->gbuf;
    for (int i = 0; i < c->tp.n_nodes; i++) {
        int lo, hi;
        node_cols(c, i, kind, &lo, &hi);
        const size_t w = (size_t)(hi - lo);
        for (int t = 0; t < nt; t++) memcpy(full + (size_t)t * total + lo, p + (size_t)t * w * 4, w * 4);
        p += c->glen[i];
    }
    return 0;
}

// Hands this node's vocabulary rows of the logits (nt rows) to the group's logits consumer; fills
// full (nt, n_vocab) when the rows land here.
static int deliver_logits(model_ctx_t *c, const float *loc, int nt, float *full) {
    const int total = c->m->hp.n_vocab;
    size_t lens[PLAN_NODES_MAX];
    size_t sum = 0;
    for (int i = 0; i < c->tp.n_nodes; i++) {
        int lo, hi;
        node_cols(c, i, G_VOCAB, &lo, &hi);
        lens[i] = (size_t)nt * (size_t)(hi - lo) * sizeof(float);
        sum += lens[i];
    }
    uint8_t *land = c->gbuf;
    if (c->tp.n_nodes == 1 || sum > c->gbuf_cap) land = NULL; // alone: the rows go elsewhere or stay in full
    int rc = c->tp.gather_logits(c->tp.gather_ctx, loc, lens[c->tp.index], land, lens);
    if (rc != 0) return rc == 1 ? 0 : rc;
    if (!land) return loc == full ? 0 : MLM_ESTATE;
    const uint8_t *p = land;
    for (int i = 0; i < c->tp.n_nodes; i++) {
        int lo, hi;
        node_cols(c, i, G_VOCAB, &lo, &hi);
        const size_t w = (size_t)(hi - lo);
        for (int t = 0; t < nt; t++) memcpy(full + (size_t)t * total + lo, p + (size_t)t * w * 4, w * 4);
        p += lens[i];
    }
    return 0;
}

// x <- embedding rows of the tokens, from emb (the WEIGHTS_IN unit). Each node holds the rows of
// its vocabulary range.
static int embed_rows(model_ctx_t *c, const weights_rows_t *emb, const int32_t *tokens, int nt) {
    const int E = c->m->hp.n_embd;
    const size_t erb = emb->row_bytes;
    if (c->tp.n_nodes == 1) {
        for (int i = 0; i < nt; i++)
            quant_dequantize_ref(emb->type, emb->data + (size_t)(tokens[i] - emb->r0) * erb, c->x + (size_t)i * E, E);
        return 0;
    }
    int mine = 0; // rows this node contributes, in token order, staged in xn
    for (int i = 0; i < nt; i++)
        if (tokens[i] >= emb->r0 && tokens[i] < emb->r1)
            quant_dequantize_ref(emb->type, emb->data + (size_t)(tokens[i] - emb->r0) * erb,
                                 c->xn + (size_t)mine++ * E, E);
    for (int n = 0; n < c->tp.n_nodes; n++) {
        int cnt = 0;
        for (int i = 0; i < nt; i++) cnt += tokens[i] >= c->tp.slices[n].v0 && tokens[i] < c->tp.slices[n].v1;
        c->glen[n] = (size_t)cnt * (size_t)E * sizeof(float);
    }
    int rc = c->tp.gather(c->tp.gather_ctx, c->xn, (size_t)mine * E * sizeof(float), c->gbuf, c->glen);
    if (rc != 0) return rc;
    size_t off[PLAN_NODES_MAX]; // running read offset into each node's block
    size_t at = 0;
    for (int n = 0; n < c->tp.n_nodes && n < PLAN_NODES_MAX; n++) off[n] = at, at += c->glen[n];
    for (int i = 0; i < nt; i++) {
        int n = 0;
        while (n < c->tp.n_nodes - 1 && !(tokens[i] >= c->tp.slices[n].v0 && tokens[i] < c->tp.slices[n].v1)) n++;
        memcpy(c->x + (size_t)i * E, c->gbuf + off[n], (size_t)E * sizeof(float));
        off[n] += (size_t)E * sizeof(float);
    }
    return 0;
}

static int embed(model_ctx_t *c, const int32_t *tokens, int nt) {
    const layer_weights_t *in;
    int rc = weights_acquire(c->m->w, WEIGHTS_IN, WEIGHTS_DENSE, &in);
    if (rc != 0) return rc;
    rc = embed_rows(c, &in->tok_embd, tokens, nt);
    weights_release(c->m->w, WEIGHTS_IN, WEIGHTS_DENSE);
    return rc;
}

// --- helpers: blocks

static int ffn_dense(model_ctx_t *c, const layer_weights_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const mm_weight_t *ws[2] = {&L->w_gate, &L->w_up};
    float *ys[2] = {c->ffn_g, c->ffn_u};
    matmul_shared(c, c->xn, nt, 2, ws, ys);
    ops_silu_mul(c->ffn_g, c->ffn_u, nt, c->Fl);
    if (c->ar) { // its FFN units' columns of ffn_down: a partial sum
        int rc = matmul_partial(c, &L->w_down, c->Fl, c->ffn_g, nt, c->tmp);
        return rc ? rc : sum_partials(c, c->tmp, nt);
    }
    int rc = gather_cols(c, c->ffn_g, nt, G_FFN, hp->n_ff, c->ffn_h);
    if (rc != 0) return rc;
    matmul1(c, &L->w_down, c->ffn_h, nt, c->y_l);
    return gather_cols(c, c->y_l, nt, G_HIDDEN, hp->n_embd, c->tmp);
}

// Router: softmax over experts, keep the top k, renormalize their weights to sum to 1. With adaptive
// gating (expert_skip) experts of rank >= 1 below the threshold are dropped (sel -1) and the kept
// weights renormalized again.
static void moe_route(model_ctx_t *c, const layer_weights_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int ne = hp->n_expert, k = hp->n_expert_used;
    const float skip = c->m->expert_skip;
    matmul1(c, &L->gate_inp, c->xn, nt, c->router);
    for (int i = 0; i < nt; i++) {
        int *sel = c->sel + (size_t)i * k;
        float *w = c->sel_w + (size_t)i * k;
        ops_topk_route(c->router + (size_t)i * ne, ne, k, sel, w);
        if (skip <= 0) continue;
        float kept = w[0];
        for (int r = 1; r < k; r++) {
            if (w[r] < skip) sel[r] = -1;
            else kept += w[r];
        }
        for (int r = 0; r < k; r++) w[r] = sel[r] < 0 ? 0.0f : w[r] / kept;
    }
}

// One expert's FFN over the n tokens gathered in e_x: e_y (n, El) receives its output rows.
static int moe_expert(model_ctx_t *c, const layer_weights_t *X, qtype_t e_type, int n) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd, F = hp->n_ff, Fl = c->Fl, El = c->El;
    // The reference's expert product (mul_mat_id) takes one token at a time, which for F32/F16
    // weights is a different summation order than its batched matmul.
    const int step = mm_act_type(e_type) == e_type ? 1 : n;
    for (int j = 0; j < n; j += step) {
        const mm_weight_t *ws[2] = {&X->w_gate, &X->w_up};
        float *ys[2] = {c->ffn_g + (size_t)j * Fl, c->ffn_u + (size_t)j * Fl};
        matmul_shared(c, c->e_x + (size_t)j * E, step, 2, ws, ys);
    }
    ops_silu_mul(c->ffn_g, c->ffn_u, n, Fl);
    if (c->ar) { // its FFN units' columns of the expert's ffn_down: partial sums (n, n_embd)
        for (int j = 0; j < n; j += step) {
            int rc = matmul_partial(c, &X->w_down, Fl, c->ffn_g + (size_t)j * Fl, step, c->e_y + (size_t)j * El);
            if (rc != 0) return rc;
        }
    } else {
        int rc = gather_cols(c, c->ffn_g, n, G_FFN, F, c->ffn_h);
        if (rc != 0) return rc;
        for (int j = 0; j < n; j += step)
            matmul1(c, &X->w_down, c->ffn_h + (size_t)j * F, step, c->e_y + (size_t)j * El);
    }
    return 0;
}

// Expert e of block il over the n tokens gathered in e_x (moe_gather_tokens), acquired for the call:
// e_y receives its rows.
static int moe_run_expert(model_ctx_t *c, int il, const layer_weights_t *L, int e, int n) {
    const layer_weights_t *X;
    int rc = weights_acquire(c->m->w, il, e, &X);
    if (rc != 0) return rc;
    rc = moe_expert(c, X, L->e_type, n);
    weights_release(c->m->w, il, e);
    return rc;
}

// dst (w) += w * src (w): one expert's output added into a token's sum. The single node and an
// expert-parallel home both add through here, so the sums are the same bits.
static void moe_add(float *dst, const float *src, float w, int width) {
    for (int d = 0; d < width; d++) dst[d] += w * src[d];
}

// The tokens routed to expert e at top-k rank `rank` into e_tok, and their rows of xn into e_x
// (the batch every node computes that expert for, in token order). Returns their count.
static int moe_gather_tokens(model_ctx_t *c, int rank, int e, int nt) {
    const int E = c->m->hp.n_embd, k = c->m->hp.n_expert_used;
    int n = 0;
    for (int i = 0; i < nt; i++)
        if (c->sel[(size_t)i * k + rank] == e) c->e_tok[n++] = i;
    for (int j = 0; j < n; j++) memcpy(c->e_x + (size_t)j * E, c->xn + (size_t)c->e_tok[j] * E, (size_t)E * sizeof(float));
    return n;
}

// The expert-parallel home of token i of a chunk of nt: the chunk cut into n_nodes contiguous ranges.
static int ep_home(const model_ctx_t *c, int i, int nt) { return (int)((int64_t)i * c->ep.n_nodes / nt); }

// Every (rank, expert) batch of block il to its owner (ep_asg), as the group without replicas runs.
static void ep_assign_owners(model_ctx_t *c, int il) {
    const int k = c->m->hp.n_expert_used, ne = c->m->hp.n_expert;
    for (int rank = 0; rank < k; rank++) memcpy(c->ep_asg + (size_t)rank * ne, c->ep.owner + (size_t)il * ne, (size_t)ne);
}

// The experts of block il whose batches ep_asg gives this member and the chunk's routing (c->sel)
// uses, in the order a single node visits them (rank, then expert id), into e_order; hinted to the
// provider. Returns the count.
static int ep_own_order(model_ctx_t *c, int il, int nt) {
    const int k = c->m->hp.n_expert_used, ne = c->m->hp.n_expert, me = c->ep.index;
    int n_order = 0;
    for (int rank = 0; rank < k; rank++)
        for (int e = 0; e < ne; e++) {
            bool used = false, seen = false;
            const bool mine = c->ep_asg[(size_t)rank * ne + e] == me;
            for (int i = 0; i < nt && !used && mine; i++) used = c->sel[(size_t)i * k + rank] == e;
            for (int j = 0; used && j < n_order && !seen; j++) seen = c->e_order[j] == e;
            if (used && !seen) c->e_order[n_order++] = e;
        }
    weights_prefetch(c->m->w, il, c->e_order, n_order);
    return n_order;
}

// The batches of block il ep_asg gives this member (rank by rank, expert by expert, each over the
// batch a single node gives it), their output rows appended to out in that order. *n_rows: rows written.
static int ep_own_experts(model_ctx_t *c, int il, const layer_weights_t *L, int nt, float *out, int *n_rows) {
    const int E = c->m->hp.n_embd, k = c->m->hp.n_expert_used, ne = c->m->hp.n_expert, me = c->ep.index;
    int at = 0;
    for (int rank = 0; rank < k; rank++)
        for (int e = 0; e < ne; e++) {
            if (c->ep_asg[(size_t)rank * ne + e] != me) continue;
            const int n = moe_gather_tokens(c, rank, e, nt);
            if (n == 0) continue;
            const int rc = moe_run_expert(c, il, L, e, n);
            if (rc != 0) return rc;
            memcpy(out + (size_t)at * E, c->e_y, (size_t)n * E * sizeof(float));
            at += n;
        }
    *n_rows = at;
    return 0;
}

// Expert parallelism (model_ep_t): this member computes the experts it owns for the chunk (by rank,
// then expert id, as alone), hands each row to its token's home by alltoallv, adds the rows of its
// home tokens in rank order, and gathers every home's sums into tmp. The rows travel in an order
// both sides derive from the routing they share: rank, expert id, token.
static int ffn_moe_ep(model_ctx_t *c, int il, const layer_weights_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd, k = hp->n_expert_used, ne = hp->n_expert, N = c->ep.n_nodes, me = c->ep.index;
    const uint8_t *own = c->ep.owner + (size_t)il * ne;
    // rows for each home, counted first so each home's block starts at a known row
    int s_at[PLAN_NODES_MAX + 1] = {0}; // (N + 1) first row of ep_send for each home, then its next free row
    int r_at[PLAN_NODES_MAX + 1] = {0}; // (N + 1) first row of ep_recv from each member, then the next unread
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < k; r++) {
            if (c->sel[(size_t)i * k + r] < 0) continue; // dropped by adaptive gating
            const int owner = own[c->sel[(size_t)i * k + r]], home = ep_home(c, i, nt);
            if (owner == me) s_at[home + 1]++;
            if (home == me) r_at[owner + 1]++;
        }
    for (int h = 0; h < N; h++) {
        c->ep_slen[h] = (size_t)s_at[h + 1] * E * sizeof(float);
        c->ep_rlen[h] = (size_t)r_at[h + 1] * E * sizeof(float);
        s_at[h + 1] += s_at[h];
        r_at[h + 1] += r_at[h];
    }
    ep_assign_owners(c, il);
    ep_own_order(c, il, nt);
    int mine = 0, q = 0; // its rows land in ep_recv first (free until the exchange), in (rank, expert, token) order
    int rc = ep_own_experts(c, il, L, nt, c->ep_recv, &mine);
    if (rc != 0) return rc;
    for (int rank = 0; rank < k; rank++) // then to their homes' blocks of ep_send, in that order
        for (int e = 0; e < ne; e++)
            for (int i = 0; i < nt && own[e] == me; i++)
                if (c->sel[(size_t)i * k + rank] == e) {
                    const int h = ep_home(c, i, nt);
                    memcpy(c->ep_send + (size_t)s_at[h]++ * E, c->ep_recv + (size_t)q++ * E, (size_t)E * sizeof(float));
                }
    if (q != mine) return MLM_EINVAL; // cannot happen: the same routing walked twice
    rc = c->ep.alltoallv(c->ep.ctx, c->ep_send, c->ep_slen, c->ep_recv, c->ep_rlen);
    if (rc != 0) return rc;
    // where each of this home's (token, rank) rows landed: the senders' order replayed
    for (int rank = 0; rank < k; rank++)
        for (int e = 0; e < ne; e++)
            for (int i = 0; i < nt; i++)
                if (c->sel[(size_t)i * k + rank] == e && ep_home(c, i, nt) == me) c->ep_row[(size_t)i * k + rank] = r_at[own[e]]++;
    int lo = nt, hi = 0; // this home's tokens [lo, hi)
    for (int i = 0; i < nt; i++)
        if (ep_home(c, i, nt) == me) lo = i < lo ? i : lo, hi = i + 1;
    if (hi < lo) lo = hi = 0;
    float *acc = c->acc_l + (size_t)lo * E; // acc_l is tmp (the whole rows): the sums gather in place
    memset(acc, 0, (size_t)(hi - lo) * E * sizeof(float));
    for (int rank = 0; rank < k; rank++)
        for (int i = lo; i < hi; i++)
            if (c->sel[(size_t)i * k + rank] >= 0)
                moe_add(c->acc_l + (size_t)i * E, c->ep_recv + (size_t)c->ep_row[(size_t)i * k + rank] * E,
                        c->sel_w[(size_t)i * k + rank], E);
    size_t lens[PLAN_NODES_MAX]; // (N) bytes of each home's sums
    for (int h = 0; h < N; h++) {
        int cnt = 0;
        for (int i = 0; i < nt; i++) cnt += ep_home(c, i, nt) == h;
        lens[h] = (size_t)cnt * E * sizeof(float);
    }
    // the gather lands in ep_recv (its rows are added already), then moves to tmp
    rc = c->ep.gather(c->ep.ctx, acc, lens[me], c->ep_recv, lens);
    if (rc == 0) memcpy(c->tmp, c->ep_recv, (size_t)nt * E * sizeof(float));
    return rc;
}

// Whether token i of the chunk has a batch ep_asg gives member j.
static bool ep_routed_to(const model_ctx_t *c, int i, int j) {
    const int k = c->m->hp.n_expert_used, ne = c->m->hp.n_expert;
    for (int r = 0; r < k; r++) {
        const int e = c->sel[(size_t)i * k + r];
        if (e >= 0 && c->ep_asg[(size_t)r * ne + e] == j) return true;
    }
    return false;
}

// Attention on the leader: each (rank, expert) batch of block il to one member holding the expert
// (model_ep_t.holders; its owner without): the batches of experts with fewer holders first (an expert
// on one member leaves no choice; one with a second copy then goes where there is least work), the
// largest first among those, each to the holder with the least work so far (a batch costs its rows
// plus EP_BATCH_COST for reading the expert), ties to the lower index. Deterministic: only the leader
// runs it and tells each member its batches.
#define EP_BATCH_COST 16
#define EP_KEY_HOLDERS 24 // a batch's sort key: (64 - its holders) << EP_KEY_HOLDERS | its rows
static int cmp_batch(const void *a, const void *b) { // (key, index) pairs: larger keys first, then index
    const int *x = a, *y = b;
    return x[0] != y[0] ? (x[0] > y[0] ? -1 : 1) : (x[1] > y[1]) - (x[1] < y[1]);
}

static void ep_assign_holders(model_ctx_t *c, int il, int nt) {
    const int k = c->m->hp.n_expert_used, ne = c->m->hp.n_expert, N = c->ep.n_nodes;
    ep_assign_owners(c, il);
    if (!c->ep.holders) return;
    const uint64_t *hold = c->ep.holders + (size_t)il * ne;
    int *cnt = c->ep_cnt, n_b = 0; // (k * ne) rows of each batch, then the used batches as (rows, index) pairs
    memset(cnt, 0, (size_t)k * ne * sizeof *cnt);
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < k; r++)
            if (c->sel[(size_t)i * k + r] >= 0) cnt[(size_t)r * ne + c->sel[(size_t)i * k + r]]++;
    int *pairs = c->ep_cnt + (size_t)k * ne;
    for (int q = 0; q < k * ne; q++)
        if (cnt[q] > 0) {
            const int few = 64 - __builtin_popcountll(hold[q % ne]); // cnt[q] <= nt, far below 2^24
            pairs[2 * n_b] = few << EP_KEY_HOLDERS | cnt[q], pairs[2 * n_b + 1] = q, n_b++;
        }
    qsort(pairs, (size_t)n_b, 2 * sizeof *pairs, cmp_batch);
    int load[PLAN_NODES_MAX] = {0};
    for (int b = 0; b < n_b; b++) {
        const int q = pairs[2 * b + 1], e = q % ne;
        int to = c->ep.owner[(size_t)il * ne + e];
        for (int j = 0; j < N; j++)
            if ((hold[e] >> j & 1) && load[j] < load[to]) to = j;
        load[to] += cnt[q] + EP_BATCH_COST;
        c->ep_asg[q] = (uint8_t)to;
    }
}

// Attention on the leader, the leader's side of an MoE block (model_ep_t.lead): the routing and the
// routed rows to every other member (message: int32 nt, int32 rows, int32 sel[nt * k], then the
// rows of xn in token order), its own experts meanwhile, then each member's expert rows back (in
// the order that member computed them: rank, expert id, token), added into tmp in rank order.
static int ffn_moe_lead(model_ctx_t *c, int il, const layer_weights_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd, k = hp->n_expert_used, ne = hp->n_expert, N = c->ep.n_nodes;
    const uint8_t *asg = c->ep_asg;
    ep_assign_holders(c, il, nt);
    int rc = 0;
    for (int j = 1; j < N && rc == 0; j++) { // its batches' routing (the rest -1) and rows
        int32_t *hdr = (int32_t *)c->ep_msg;
        float *rows = (float *)(hdr + 2 + (size_t)nt * k);
        int n = 0;
        for (int i = 0; i < nt; i++)
            if (ep_routed_to(c, i, j)) memcpy(rows + (size_t)n++ * E, c->xn + (size_t)i * E, (size_t)E * sizeof(float));
        hdr[0] = nt;
        hdr[1] = n;
        for (size_t q = 0; q < (size_t)nt * k; q++) {
            const int e = c->sel[q];
            hdr[2 + q] = e >= 0 && asg[(q % k) * ne + e] == j ? e : -1;
        }
        rc = c->ep.send(c->ep.ctx, j, c->ep_msg, (size_t)((uint8_t *)(rows + (size_t)n * E) - c->ep_msg));
    }
    if (rc != 0) return rc;
    // rows of each member in ep_recv: member j's block starts at r_at[j]
    int r_at[PLAN_NODES_MAX + 1] = {0};
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < k; r++)
            if (c->sel[(size_t)i * k + r] >= 0) r_at[asg[(size_t)r * ne + c->sel[(size_t)i * k + r]] + 1]++;
    for (int j = 0; j < N; j++) r_at[j + 1] += r_at[j];
    ep_own_order(c, il, nt);
    int mine = 0;
    if ((rc = ep_own_experts(c, il, L, nt, c->ep_recv, &mine)) != 0) return rc;
    if (mine != r_at[1]) return MLM_EINVAL; // cannot happen: the same routing counted twice
    for (int j = 1; j < N; j++) {
        const size_t want = (size_t)(r_at[j + 1] - r_at[j]) * E * sizeof(float);
        size_t got = 0;
        if ((rc = c->ep.recv(c->ep.ctx, j, c->ep_recv + (size_t)r_at[j] * E, want, &got)) != 0) return rc;
        if (got != want) return MLM_EPROTO;
    }
    // where each (token, rank) row landed: every member's order replayed
    for (int rank = 0; rank < k; rank++)
        for (int e = 0; e < ne; e++)
            for (int i = 0; i < nt; i++)
                if (c->sel[(size_t)i * k + rank] == e) c->ep_row[(size_t)i * k + rank] = r_at[asg[(size_t)rank * ne + e]]++;
    memset(c->tmp, 0, (size_t)nt * E * sizeof(float));
    for (int rank = 0; rank < k; rank++)
        for (int i = 0; i < nt; i++)
            if (c->sel[(size_t)i * k + rank] >= 0)
                moe_add(c->tmp + (size_t)i * E, c->ep_recv + (size_t)c->ep_row[(size_t)i * k + rank] * E,
                        c->sel_w[(size_t)i * k + rank], E);
    return 0;
}

// Attention on the leader, another member's side of block il: the leader's routing and rows in,
// this member's experts over them, their rows back to the leader.
static int ffn_moe_member(model_ctx_t *c, int il, const layer_weights_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd, k = hp->n_expert_used, ne = hp->n_expert, me = c->ep.index;
    const uint8_t *own = c->ep.owner + (size_t)il * ne;
    const uint64_t *hold = c->ep.holders ? c->ep.holders + (size_t)il * ne : NULL;
    size_t len = 0;
    int rc = c->ep.recv(c->ep.ctx, 0, c->ep_msg, c->ep_msg_cap, &len);
    if (rc != 0) return rc;
    const int32_t *hdr = (const int32_t *)c->ep_msg;
    const size_t head = (2 + (size_t)nt * k) * sizeof(int32_t);
    if (len < head || hdr[0] != nt || hdr[1] < 0 || hdr[1] > nt || len != head + (size_t)hdr[1] * E * sizeof(float))
        return MLM_EPROTO;
    memset(c->ep_asg, 0xff, (size_t)k * ne); // the batches the leader gives this member: those named
    for (size_t q = 0; q < (size_t)nt * k; q++) {
        const int e = hdr[2 + q];
        if (e < -1 || e >= ne || (e >= 0 && !(hold ? hold[e] >> me & 1 : own[e] == me))) return MLM_EPROTO;
        c->sel[q] = e;
        if (e >= 0) c->ep_asg[(q % k) * ne + e] = (uint8_t)me;
    }
    const float *rows = (const float *)(c->ep_msg + head);
    int n = 0;
    for (int i = 0; i < nt; i++)
        if (ep_routed_to(c, i, me)) {
            if (n == hdr[1]) return MLM_EPROTO;
            memcpy(c->xn + (size_t)i * E, rows + (size_t)n++ * E, (size_t)E * sizeof(float));
        }
    if (n != hdr[1]) return MLM_EPROTO;
    ep_own_order(c, il, nt);
    int mine = 0;
    if ((rc = ep_own_experts(c, il, L, nt, c->ep_send, &mine)) != 0) return rc;
    return c->ep.send(c->ep.ctx, 0, c->ep_send, (size_t)mine * E * sizeof(float));
}

static int ffn_moe(model_ctx_t *c, int il, const layer_weights_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int El = c->El, k = hp->n_expert_used, ne = hp->n_expert;
    moe_route(c, L, nt);
    if (c->m->on_route) c->m->on_route(c->m->on_route_arg, il, c->sel, nt, k);
    if (c->ep.n_nodes > 1) return c->ep.lead ? ffn_moe_lead(c, il, L, nt) : ffn_moe_ep(c, il, L, nt);
    // Experts are visited in rank order (every token's top-1 first), so each token's sum is
    // accumulated top-1 first, then top-2, ... whatever the expert ids. The provider hears which
    // experts come, in that order, before the first is acquired.
    int n_order = 0;
    for (int rank = 0; rank < k; rank++)
        for (int e = 0; e < ne; e++) {
            bool used = false, seen = false;
            for (int i = 0; i < nt && !used; i++) used = c->sel[(size_t)i * k + rank] == e;
            for (int j = 0; used && j < n_order && !seen; j++) seen = c->e_order[j] == e;
            if (used && !seen) c->e_order[n_order++] = e;
        }
    weights_prefetch(c->m->w, il, c->e_order, n_order);
    weights_observe(c->m->w, il, c->x, nt); // a caching provider guesses block il + 1's experts from it
    memset(c->acc_l, 0, (size_t)nt * El * sizeof(float));
    for (int rank = 0; rank < k; rank++) {
        for (int e = 0; e < ne; e++) {
            const int n = moe_gather_tokens(c, rank, e, nt);
            if (n == 0 || (c->ar && c->Fl == 0)) continue; // all-reduce mode: no units, nothing to add
            const int rc = moe_run_expert(c, il, L, e, n);
            if (rc != 0) return rc;
            for (int j = 0; j < n; j++) {
                const int i = c->e_tok[j];
                moe_add(c->acc_l + (size_t)i * El, c->e_y + (size_t)j * El, c->sel_w[(size_t)i * k + rank], El);
            }
        }
    }
    if (c->ar) return sum_partials(c, c->acc_l, nt); // acc_l is tmp
    return gather_cols(c, c->acc_l, nt, G_HIDDEN, hp->n_embd, c->tmp);
}

// A member of an expert-parallel group with attention on its leader, other than the leader: it
// computes experts and nothing else.
static bool ep_expert_only(const model_ctx_t *c) { return c->ep.n_nodes > 1 && c->ep.lead && c->ep.index > 0; }

// Block il (acquired as L) over the chunk's nt tokens at positions pos0...
static int eval_block(model_ctx_t *c, int il, const layer_weights_t *L, int nt, int pos0) {
    const model_t *m = c->m;
    const model_hparams_t *hp = &m->hp;
    const int E = hp->n_embd, hd = hp->head_dim;
    int rc;
    if (ep_expert_only(c)) return ffn_moe_member(c, il, L, nt);
    for (int i = 0; i < nt; i++) ops_rmsnorm(c->xn + (size_t)i * E, c->x + (size_t)i * E, L->attn_norm, E, hp->rms_eps);
    const mm_weight_t *ws[3] = {&L->wq, &L->wk, &L->wv};
    float *ys[3] = {c->q, c->k, c->v};
    matmul_shared(c, c->xn, nt, 3, ws, ys);
    for (int i = 0; i < nt; i++) {
        ops_rope(c->q + (size_t)i * c->Hl * hd, c->Hl, hd, hp->n_rot, pos0 + i, hp->rope_base, hp->rope_freq_scale,
                 L->rope_freqs);
        ops_rope(c->k + (size_t)i * c->KVl * hd, c->KVl, hd, hp->n_rot, pos0 + i, hp->rope_base, hp->rope_freq_scale,
                 L->rope_freqs);
    }
    if (c->attn) { // the device keeps k and v (rounded to its cache type) and attends next to them
        const int lay = il - m->slice.l0;
        if ((rc = attn_dev_append(c->attn, 0, lay, pos0, c->k, c->v, nt)) != 0) return rc;
        if (c->one_order) { // each token attends as it would alone (a batch sums in another order)
            const size_t qd = (size_t)c->Hl * hd;
            for (int i = 0; i < nt; i++)
                if ((rc = attn_dev_attend(c->attn, 0, lay, c->q + i * qd, 1, pos0 + i, c->att_l + i * qd)) != 0) return rc;
        } else if ((rc = attn_dev_attend(c->attn, 0, lay, c->q, nt, pos0, c->att_l)) != 0) {
            return rc;
        }
    }
    if (c->ar) { // its heads' columns of attn_output: a partial sum, added up over the group
        if ((rc = matmul_partial(c, &L->wo, (int64_t)c->Hl * hd, c->att_l, nt, c->tmp)) != 0) return rc;
        if ((rc = sum_partials(c, c->tmp, nt)) != 0) return rc;
    } else {
        if ((rc = gather_cols(c, c->att_l, nt, G_HEADS, hp->n_head * hd, c->att)) != 0) return rc;
        matmul1(c, &L->wo, c->att, nt, c->y_l);
        if ((rc = gather_cols(c, c->y_l, nt, G_HIDDEN, E, c->tmp)) != 0) return rc;
    }
    for (size_t i = 0; i < (size_t)nt * E; i++) c->x[i] += c->tmp[i];
    for (int i = 0; i < nt; i++) ops_rmsnorm(c->xn + (size_t)i * E, c->x + (size_t)i * E, L->ffn_norm, E, hp->rms_eps);
    rc = hp->n_expert > 0 ? ffn_moe(c, il, L, nt) : ffn_dense(c, L, nt);
    if (rc != 0) return rc;
    for (size_t i = 0; i < (size_t)nt * E; i++) c->x[i] += c->tmp[i];
    return 0;
}

// Logits of rows [first, nt) of the residual stream through the output unit O.
static int eval_output(model_ctx_t *c, const layer_weights_t *O, int first, int nt, float *logits) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd;
    const int n_out = nt - first;
    for (int i = first; i < nt; i++)
        ops_rmsnorm(c->xn + (size_t)(i - first) * E, c->x + (size_t)i * E, O->out_norm, E, hp->rms_eps);
    float *out_l = c->tp.n_nodes == 1 ? logits : c->logit_l;
    matmul1(c, &O->output, c->xn, n_out, out_l);
    if (c->tp.gather_logits) return deliver_logits(c, out_l, n_out, logits);
    return gather_cols(c, out_l, n_out, G_VOCAB, hp->n_vocab, logits);
}

// One chunk through this node's blocks: the first stage embeds tokens, a later one starts from
// hidden_in; a stage that is not the last hands its residual stream out through hidden_out. Every
// unit of weights is acquired just before its use and released right after; the next is hinted.
static int eval_chunk(model_ctx_t *c, const int32_t *tokens, const float *hidden_in, int nt, float *hidden_out,
                      float *logits, bool all_logits, bool want_last) {
    const model_t *m = c->m;
    const model_hparams_t *hp = &m->hp;
    const int E = hp->n_embd;
    const int pos0 = c->pos;
    const bool out_wanted = m->slice.l1 == hp->n_layer && logits && (all_logits || want_last);
    int rc = 0;
    weights_prefetch(m->w, m->slice.l0, NULL, 0);
    if (!ep_expert_only(c)) { // an expert-only member has no residual stream
        if (tokens) rc = embed(c, tokens, nt);
        else memcpy(c->x, hidden_in, (size_t)nt * E * sizeof(float));
    }
    for (int il = m->slice.l0; rc == 0 && il < m->slice.l1; il++) {
        const layer_weights_t *L;
        if ((rc = weights_acquire(m->w, il, WEIGHTS_DENSE, &L)) != 0) break;
        if (il + 1 < m->slice.l1) weights_prefetch(m->w, il + 1, NULL, 0);
        else if (out_wanted) weights_prefetch(m->w, WEIGHTS_OUT, NULL, 0);
        rc = eval_block(c, il, L, nt, pos0);
        weights_release(m->w, il, WEIGHTS_DENSE);
    }
    if (rc != 0) return rc; // the cache holds a partial step: the caller resets or replays
    c->pos += nt;
    if (m->slice.l1 < hp->n_layer) {
        if (!ep_expert_only(c)) memcpy(hidden_out, c->x, (size_t)nt * E * sizeof(float));
        return 0;
    }
    if (!out_wanted || ep_expert_only(c)) return 0;
    const layer_weights_t *O;
    if ((rc = weights_acquire(m->w, WEIGHTS_OUT, WEIGHTS_DENSE, &O)) != 0) return rc;
    rc = eval_output(c, O, all_logits ? 0 : nt - 1, nt, logits);
    weights_release(m->w, WEIGHTS_OUT, WEIGHTS_DENSE);
    return rc;
}

// --- public API: evaluation

int model_eval_stage(model_ctx_t *c, const int32_t *tokens, const float *hidden_in, int n, float *hidden_out,
                     float *logits, bool all_logits) {
    const model_hparams_t *hp = &c->m->hp;
    const shard_slice_t *sl = &c->m->slice;
    if (n <= 0) return MLM_EINVAL;
    if (c->pos + n > c->n_ctx) return MLM_ERANGE;
    if ((sl->l0 == 0) != (tokens != NULL) || (sl->l0 > 0 && !hidden_in) || (sl->l1 < hp->n_layer && !hidden_out))
        return MLM_EINVAL;
    for (int i = 0; tokens && i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab) return MLM_EINVAL;
    if (hp->head_dim > 512) return MLM_EUNSUPPORTED;
    for (int done = 0; done < n;) {
        int nt = n - done < c->n_batch ? n - done : c->n_batch;
        bool last = done + nt == n;
        float *out = logits;
        if (logits && all_logits) out = logits + (size_t)done * hp->n_vocab;
        const size_t h = (size_t)done * hp->n_embd;
        int rc = eval_chunk(c, tokens ? tokens + done : NULL, hidden_in ? hidden_in + h : NULL, nt,
                            hidden_out ? hidden_out + h : NULL, out, all_logits, last);
        if (rc != 0) return rc;
        done += nt;
    }
    return 0;
}

int model_eval(model_ctx_t *c, const int32_t *tokens, int n, float *logits, bool all_logits) {
    return model_eval_stage(c, tokens, NULL, n, NULL, logits, all_logits);
}
