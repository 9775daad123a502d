// llama-family forward pass: RMSNorm, RoPE (NORM mode), GQA attention over an F16/F32 KV cache,
// SwiGLU FFN or Mixtral-style top-k experts, computed with the matmul kernels on a thread pool.
#include "worker/model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/err.h"
#include "worker/kernels/matmul.h"
#include "worker/kernels/ops.h"
#include "worker/kernels/threadpool.h"

// --- types

// Jobs below this many multiply-adds run on the calling thread: waking a worker costs more.
#define PAR_MIN_WORK 65536.0
#define PLAN_NODES_MAX 64 // nodes in a tensor-parallel group

typedef struct {
    const float *attn_norm;    // (n_embd)
    mm_weight_t wq;            // (n_head*head_dim rows, n_embd cols)
    mm_weight_t wk;            // (n_head_kv*head_dim, n_embd)
    mm_weight_t wv;            // (n_head_kv*head_dim, n_embd)
    mm_weight_t wo;            // (n_embd, n_head*head_dim)
    const float *ffn_norm;     // (n_embd)
    mm_weight_t w_gate;        // dense: (n_ff, n_embd)
    mm_weight_t w_up;          // dense: (n_ff, n_embd)
    mm_weight_t w_down;        // dense: (n_embd, n_ff)
    mm_weight_t gate_inp;      // MoE router: (n_expert, n_embd)
    mm_weight_t *e_gate;       // MoE: (n_expert) of (n_ff, n_embd)
    mm_weight_t *e_up;         // MoE: (n_expert) of (n_ff, n_embd)
    mm_weight_t *e_down;       // MoE: (n_expert) of (n_embd, n_ff)
    qtype_t e_type;            // MoE: element type of the expert matrices
} layer_t;

struct model {
    gguf_t *g;                      // the mapped file (owned)
    model_hparams_t hp;             // shapes
    const kernels_t *kern;          // kernel table used for every matmul
    const gguf_tensor_t *tok_embd;  // (n_vocab, n_embd) any type, rows dequantized on lookup
    const float *out_norm;          // (n_embd)
    mm_weight_t output;             // (n_vocab, n_embd)
    const float *rope_freqs;        // (n_rot/2) frequency divisors, or NULL
    layer_t *layers;                // (n_layer)
    float **owned;                  // F32 copies of norm vectors stored in other types
    int n_owned;
    shard_slice_t slice;            // rows held
    bool shard_file;                // the file holds only those rows (else they are cut from it)
};

struct model_ctx {
    const model_t *m;          // borrowed
    tpool_t *pool;             // owned
    int n_ctx;                 // cache capacity in positions
    int n_batch;               // tokens per chunk
    int pos;                   // tokens already in the cache
    qtype_t kv_type;           // QT_F16 or QT_F32
    size_t kv_elt;             // bytes per cache element
    model_tp_t tp;             // tensor-parallel group (n_nodes 1 = alone)
    int Hl, KVl, El, Fl, Vl;   // this node's local widths: heads, KV heads, hidden rows, FFN units, vocab rows
    uint8_t *k_cache;          // (l1 - l0 blocks, n_ctx, KVl*head_dim) of kv_type
    uint8_t *v_cache;          // (l1 - l0 blocks, n_ctx, KVl*head_dim) of kv_type
    float *x;                  // (n_batch, n_embd) residual stream (replicated on every node)
    float *xn;                 // (n_batch, n_embd) normed input of the current block
    float *q;                  // (n_batch, Hl*head_dim)
    float *k;                  // (n_batch, KVl*head_dim)
    float *v;                  // (n_batch, KVl*head_dim)
    float *att_l;              // (n_batch, Hl*head_dim) this node's heads' attention output
    float *att;                // (n_batch, n_head*head_dim) all heads (aliases att_l alone)
    float *scores;             // (n_threads, ops_attention_scratch(n_ctx, head_dim)) per-thread scratch
    float *y_l;                // (n_batch, El) this node's rows of a hidden-size product
    float *tmp;                // (n_batch, n_embd) block output before the residual add
    float *ffn_g;              // (n_batch, Fl)
    float *ffn_u;              // (n_batch, Fl)
    float *ffn_h;              // (n_batch, n_ff) all FFN units (aliases ffn_g alone)
    float *router;             // (n_batch, n_expert)
    int *sel;                  // (n_batch, n_expert_used) chosen experts
    float *sel_w;              // (n_batch, n_expert_used) their weights
    int *e_tok;                // (n_batch) tokens routed to one expert
    float *e_x;                // (n_batch, n_embd) gathered inputs for one expert (MoE)
    float *e_y;                // (n_batch, El) one expert's output rows (MoE)
    float *acc_l;              // (n_batch, El) MoE sum of this node's rows (aliases tmp alone)
    float *logit_l;            // (n_batch, Vl) this node's vocabulary rows
    uint8_t *gbuf;             // (gbuf_cap) gather landing buffer, all nodes' blocks
    size_t gbuf_cap;
    size_t *glen;              // (n_nodes) block lengths of the current gather
    void *xq_a;                // (n_batch, act row bytes) quantized activations
    void *xq_b;                // (n_batch, act row bytes) for a second weight type in a group
    void *xq_c;                // (n_batch, act row bytes) for a third
    size_t xq_cap;             // bytes of each xq buffer
};

// --- helpers: loading

static int fail(char *err, size_t errlen, int code, const char *fmt, const char *a, const char *b) {
    if (err && errlen) snprintf(err, errlen, fmt, a, b);
    return code;
}

// Finds a tensor and checks its shape (ne[i] == want[i] for i < nd; -1 = any). NULL + err if absent/wrong.
static const gguf_tensor_t *want_tensor(const model_t *m, const char *name, int nd, int64_t w0, int64_t w1,
                                        int64_t w2, bool required, int *rc, char *err, size_t errlen) {
    const gguf_tensor_t *t = gguf_find_tensor(m->g, name);
    if (!t) {
        if (required) *rc = fail(err, errlen, MLM_EFORMAT, "%s: tensor %s is missing", gguf_path(m->g), name);
        return NULL;
    }
    int64_t want[3] = {w0, w1, w2};
    for (int i = 0; i < GGUF_MAX_DIMS; i++) {
        int64_t w = i < nd ? want[i] : 1;
        if (w >= 0 && t->ne[i] != w) {
            char buf[256];
            snprintf(buf, sizeof buf, "has shape [%lld, %lld, %lld, %lld], expected dim %d = %lld",
                     (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3], i,
                     (long long)w);
            *rc = fail(err, errlen, MLM_EFORMAT, "tensor %s %s", name, buf);
            return NULL;
        }
    }
    return t;
}

// A float vector view of a 1-D tensor, converting (and owning a copy) when it is not F32.
static const float *vec_f32(model_t *m, const gguf_tensor_t *t, int *rc) {
    if (t->type == QT_F32) return t->data;
    const qtype_traits_t *tr = qtype_traits(t->type);
    int64_t n = gguf_tensor_nelements(t);
    if (!tr || !tr->has_kernels || n % tr->blck) {
        *rc = MLM_EUNSUPPORTED;
        return NULL;
    }
    float *buf = malloc((size_t)n * sizeof(float));
    float **list = realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *list);
    if (!buf || !list) {
        free(buf);
        if (list) m->owned = list;
        *rc = MLM_ENOMEM;
        return NULL;
    }
    m->owned = list;
    m->owned[m->n_owned++] = buf;
    quant_dequantize_ref(t->type, t->data, buf, n);
    return buf;
}

// Binds rows [r0, r1) of plane `expert` of t as a weight (a shard file already holds only those rows).
static int weight_rows(model_t *m, mm_weight_t *w, const gguf_tensor_t *t, int64_t expert, int64_t r0, int64_t r1,
                       bool repack, char *err, size_t errlen) {
    memset(w, 0, sizeof *w);
    if (r1 <= r0) return 0; // this node holds none of it
    int64_t cols = t->ne[0];
    size_t row_bytes = qtype_row_size(t->type, cols);
    int64_t skip = m->shard_file ? 0 : r0;
    const uint8_t *data = (const uint8_t *)t->data + ((size_t)expert * (size_t)t->ne[1] + (size_t)skip) * row_bytes;
    int rc = mm_weight_init(w, m->kern, t->type, r1 - r0, cols, data, repack);
    if (rc != 0)
        return fail(err, errlen, rc, "tensor %s: type %s cannot be used for a matrix product", t->name,
                    qtype_name(t->type));
    return 0;
}

// Finds a matrix of full shape [cols, full_rows(, planes)], checks the rows the file holds for
// this model's slice, and binds them (every plane for 3-D expert tensors).
static int bind(model_t *m, mm_weight_t *w, const char *name, int64_t cols, int64_t full_rows, int planes,
                bool repack, char *err, size_t errlen) {
    int64_t r0, r1;
    shard_tensor_rows(&m->slice, name, full_rows, m->hp.head_dim, &r0, &r1);
    if (m->shard_file && r1 == r0) { // a shard file leaves out tensors of which it holds no row
        for (int e = 0; e < planes; e++) memset(&w[e], 0, sizeof w[e]);
        return 0;
    }
    int rc = 0;
    const gguf_tensor_t *t = want_tensor(m, name, planes > 1 ? 3 : 2, cols, m->shard_file ? r1 - r0 : full_rows,
                                         planes > 1 ? planes : 0, true, &rc, err, errlen);
    if (!t) return rc;
    for (int e = 0; e < (planes > 1 ? planes : 1); e++)
        if ((rc = weight_rows(m, &w[e], t, e, r0, r1, repack, err, errlen)) != 0) return rc;
    return 0;
}

static int load_tensors(model_t *m, const shard_slice_t *want, bool repack, char *err, size_t errlen) {
    model_hparams_t *hp = &m->hp;
    int rc = 0;
    int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim, KV = (int64_t)hp->n_head_kv * hp->head_dim;
    shard_slice_t in_file;
    if ((rc = shard_file_slice(m->g, &in_file, &m->shard_file)) != 0)
        return fail(err, errlen, rc, "%s: inconsistent meshlm.shard keys%s", gguf_path(m->g), "");
    m->slice = shard_full(hp->n_layer, hp->n_head, hp->n_head_kv, hp->n_embd, hp->n_ff, hp->n_vocab);
    if (m->shard_file) {
        if (in_file.l1 < 0) in_file.l1 = hp->n_layer; // written before pipeline stages: every block
        if (want && memcmp(want, &in_file, sizeof in_file) != 0)
            return fail(err, errlen, MLM_EINVAL, "%s: the shard file holds other rows than the plan asks for%s",
                        gguf_path(m->g), "");
        m->slice = in_file;
    } else if (want) {
        m->slice = *want;
    }
    const shard_slice_t *sl = &m->slice;
    if (sl->h0 < 0 || sl->h1 > hp->n_head || sl->kv0 < 0 || sl->kv1 > hp->n_head_kv || sl->e0 < 0 || sl->e1 > E ||
        sl->f0 < 0 || sl->f1 > hp->n_ff || sl->v0 < 0 || sl->v1 > hp->n_vocab || sl->h1 < sl->h0 || sl->kv1 < sl->kv0 ||
        sl->e1 < sl->e0 || sl->f1 < sl->f0 || sl->v1 < sl->v0 || sl->l0 < 0 || sl->l1 > hp->n_layer || sl->l1 < sl->l0)
        return fail(err, errlen, MLM_EINVAL, "%s: slice outside the model's shape%s", gguf_path(m->g), "");
    if (sl->h1 > sl->h0) { // a node's query heads need exactly its KV heads
        int group = hp->n_head / hp->n_head_kv;
        if (sl->kv0 != sl->h0 / group || sl->kv1 != (sl->h1 - 1) / group + 1)
            return fail(err, errlen, MLM_EINVAL, "%s: slice's KV heads do not match its query heads%s", gguf_path(m->g), "");
    }
    // An empty layer range holds no block, no embedding and no output (a coordinator that only
    // tokenizes and samples).
    const bool first = sl->l0 == 0 && sl->l1 > 0, last = sl->l1 == hp->n_layer && sl->l1 > sl->l0;
    if (first || (last && hp->tied_output)) {
        m->tok_embd = want_tensor(m, "token_embd.weight", 2, E, -1, 0, true, &rc, err, errlen);
        if (!m->tok_embd) return rc;
        if (!qtype_traits(m->tok_embd->type)->has_kernels)
            return fail(err, errlen, MLM_EUNSUPPORTED, "token_embd.weight: type %s is not supported%s",
                        qtype_name(m->tok_embd->type), "");
        if (m->tok_embd->ne[1] != (m->shard_file ? sl->v1 - sl->v0 : hp->n_vocab))
            return fail(err, errlen, MLM_EFORMAT, "token_embd.weight: row count does not match the slice%s%s", "", "");
    }
    const gguf_tensor_t *t;
    if (last) {
        t = want_tensor(m, "output_norm.weight", 1, E, 0, 0, true, &rc, err, errlen);
        if (!t || !(m->out_norm = vec_f32(m, t, &rc))) return rc ? rc : MLM_EFORMAT;
        if ((rc = bind(m, &m->output, hp->tied_output ? "token_embd.weight" : "output.weight", E, hp->n_vocab, 1,
                       repack, err, errlen)) != 0)
            return rc;
    }
    t = gguf_find_tensor(m->g, "rope_freqs.weight");
    if (t) {
        if (t->type != QT_F32 || gguf_tensor_nelements(t) != hp->n_rot / 2)
            return fail(err, errlen, MLM_EFORMAT, "rope_freqs.weight: expected %s with n_rot/2 elements%s", "F32", "");
        m->rope_freqs = t->data;
    }
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return MLM_ENOMEM;
    for (int il = sl->l0; il < sl->l1; il++) {
        layer_t *L = &m->layers[il];
        char name[96];
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix), name)
#define B2(field, suffix, cols, rows) \
    if ((rc = bind(m, &L->field, NAME(suffix), cols, rows, 1, repack, err, errlen)) != 0) return rc;
#define T1(field, suffix)                                                                            \
    if (!(t = want_tensor(m, NAME(suffix), 1, E, 0, 0, true, &rc, err, errlen))) return rc;          \
    if (!(L->field = vec_f32(m, t, &rc))) return rc ? rc : MLM_EFORMAT;
        T1(attn_norm, "attn_norm");
        T1(ffn_norm, "ffn_norm");
        B2(wq, "attn_q", E, Q);
        B2(wk, "attn_k", E, KV);
        B2(wv, "attn_v", E, KV);
        B2(wo, "attn_output", Q, E);
        if (hp->n_expert == 0) {
            B2(w_gate, "ffn_gate", E, hp->n_ff);
            B2(w_up, "ffn_up", E, hp->n_ff);
            B2(w_down, "ffn_down", hp->n_ff, E);
        } else {
            B2(gate_inp, "ffn_gate_inp", E, hp->n_expert);
            int ne = hp->n_expert;
            L->e_gate = calloc((size_t)ne, sizeof(mm_weight_t));
            L->e_up = calloc((size_t)ne, sizeof(mm_weight_t));
            L->e_down = calloc((size_t)ne, sizeof(mm_weight_t));
            if (!L->e_gate || !L->e_up || !L->e_down) return MLM_ENOMEM;
            if ((rc = bind(m, L->e_gate, NAME("ffn_gate_exps"), E, hp->n_ff, ne, repack, err, errlen)) != 0 ||
                (rc = bind(m, L->e_up, NAME("ffn_up_exps"), E, hp->n_ff, ne, repack, err, errlen)) != 0 ||
                (rc = bind(m, L->e_down, NAME("ffn_down_exps"), hp->n_ff, E, ne, repack, err, errlen)) != 0)
                return rc;
            t = gguf_find_tensor(m->g, NAME("ffn_gate_exps"));
            if (!t) t = gguf_find_tensor(m->g, NAME("ffn_down_exps")); // a shard without FFN units
            L->e_type = t ? t->type : QT_F32;
        }
#undef T1
#undef B2
#undef NAME
    }
    return 0;
}

// --- public API: model

int model_load(model_t **out, const char *path, const model_load_opts_t *opts, char *err, size_t errlen) {
    *out = NULL;
    model_t *m = calloc(1, sizeof *m);
    if (!m) return MLM_ENOMEM;
    m->kern = (opts && opts->kern) ? opts->kern : kernels_best();
    bool repack = opts ? opts->repack : true;
    int rc = gguf_open(&m->g, path, err, errlen);
    if (rc == 0) rc = hparams_read(m->g, &m->hp, err, errlen);
    if (rc == 0) rc = load_tensors(m, opts ? opts->slice : NULL, repack, err, errlen);
    if (rc != 0) {
        if (rc == MLM_ENOMEM && err && errlen) snprintf(err, errlen, "%s: out of memory while loading", path);
        model_destroy(&m);
        return rc;
    }
    *out = m;
    return 0;
}

static void release_layer(layer_t *L, int n_expert) {
    mm_weight_release(&L->wq);
    mm_weight_release(&L->wk);
    mm_weight_release(&L->wv);
    mm_weight_release(&L->wo);
    mm_weight_release(&L->w_gate);
    mm_weight_release(&L->w_up);
    mm_weight_release(&L->w_down);
    mm_weight_release(&L->gate_inp);
    for (int e = 0; e < n_expert; e++) {
        if (L->e_gate) mm_weight_release(&L->e_gate[e]);
        if (L->e_up) mm_weight_release(&L->e_up[e]);
        if (L->e_down) mm_weight_release(&L->e_down[e]);
    }
    free(L->e_gate);
    free(L->e_up);
    free(L->e_down);
}

void model_destroy(model_t **self_p) {
    if (!self_p || !*self_p) return;
    model_t *m = *self_p;
    if (m->layers)
        for (int i = 0; i < m->hp.n_layer; i++) release_layer(&m->layers[i], m->hp.n_expert);
    free(m->layers);
    mm_weight_release(&m->output);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    gguf_close(&m->g);
    free(m);
    *self_p = NULL;
}

const model_hparams_t *model_hparams(const model_t *m) { return &m->hp; }
const gguf_t *model_gguf(const model_t *m) { return m->g; }
const kernels_t *model_kernels(const model_t *m) { return m->kern; }
const char *model_type_name(const model_t *m) { return m->hp.type_name; }
const shard_slice_t *model_slice(const model_t *m) { return &m->slice; }

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
                 (o.tp->n_nodes > 1 && !o.tp->gather) ||
                 memcmp(&o.tp->slices[o.tp->index], sl, sizeof *sl) != 0)) {
        snprintf(err, errlen, "tensor-parallel group is inconsistent with the model's slice");
        return MLM_EINVAL;
    }
    shard_slice_t rows = *sl; // a pipeline stage alone holds every row of its blocks
    rows.l0 = full.l0;
    rows.l1 = full.l1;
    if (!o.tp && memcmp(&rows, &full, sizeof full) != 0) {
        snprintf(err, errlen, "a model holding a slice needs a tensor-parallel group to run");
        return MLM_EINVAL;
    }
    if (sl->l1 <= sl->l0) {
        snprintf(err, errlen, "a model holding no blocks cannot run");
        return MLM_EINVAL;
    }
    model_ctx_t *c = calloc(1, sizeof *c);
    if (!c) return MLM_ENOMEM;
    c->m = m;
    c->n_ctx = o.n_ctx;
    c->n_batch = o.n_batch;
    c->kv_type = o.kv_f32 ? QT_F32 : QT_F16;
    c->kv_elt = o.kv_f32 ? 4 : 2;
    c->tp = o.tp ? *o.tp : (model_tp_t){.n_nodes = 1, .index = 0, .slices = &m->slice};
    const bool alone = c->tp.n_nodes == 1;
    c->Hl = sl->h1 - sl->h0;
    c->KVl = sl->kv1 - sl->kv0;
    c->El = sl->e1 - sl->e0;
    c->Fl = sl->f1 - sl->f0;
    c->Vl = sl->v1 - sl->v0;
    const size_t B = (size_t)o.n_batch, E = (size_t)hp->n_embd, hd = (size_t)hp->head_dim;
    const size_t Qd = (size_t)hp->n_head * hd, F = (size_t)hp->n_ff, NV = (size_t)hp->n_vocab;
    const size_t KVl = (size_t)c->KVl * hd, Ql = (size_t)c->Hl * hd;
    size_t kv_bytes = (size_t)(sl->l1 - sl->l0) * (size_t)c->n_ctx * KVl * c->kv_elt; // its blocks only
    size_t maxin = E > Qd ? E : Qd;
    if (F > maxin) maxin = F;
    c->xq_cap = B * (maxin * 4 + 64); // generous: F32 rows are the widest activation type
    c->pool = tpool_new(o.n_threads);
    c->k_cache = calloc(1, kv_bytes + 1);
    c->v_cache = calloc(1, kv_bytes + 1);
    c->x = malloc(B * E * 4);
    c->xn = malloc(B * E * 4);
    c->tmp = malloc(B * E * 4);
    c->q = malloc(B * Ql * 4 + 4);
    c->att_l = malloc(B * Ql * 4 + 4);
    c->att = alone ? c->att_l : malloc(B * Qd * 4);
    c->k = malloc(B * KVl * 4 + 4);
    c->v = malloc(B * KVl * 4 + 4);
    c->scores = malloc((size_t)o.n_threads * ops_attention_scratch(c->n_ctx, hp->head_dim) * 4);
    c->y_l = alone ? c->tmp : malloc(B * (size_t)c->El * 4 + 4);
    c->ffn_g = malloc(B * (size_t)c->Fl * 4 + 4);
    c->ffn_u = malloc(B * (size_t)c->Fl * 4 + 4);
    c->ffn_h = alone ? c->ffn_g : malloc(B * F * 4);
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
        c->e_x = malloc(B * E * 4);
        c->e_y = malloc(B * (size_t)c->El * 4 + 4);
        c->acc_l = alone ? c->tmp : malloc(B * (size_t)c->El * 4 + 4);
        moe_ok = c->router && c->sel && c->sel_w && c->e_tok && c->e_x && c->e_y && c->acc_l;
    }
    if (!c->pool || !c->k_cache || !c->v_cache || !c->x || !c->xn || !c->tmp || !c->q || !c->att_l || !c->k || !c->v ||
        !c->scores || !c->ffn_g || !c->ffn_u || !c->xq_a || !c->xq_b || !c->xq_c || !moe_ok || !tp_ok) {
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
    tpool_destroy(&c->pool);
    if (c->att != c->att_l) free(c->att);
    if (c->y_l != c->tmp) free(c->y_l);
    if (c->ffn_h != c->ffn_g) free(c->ffn_h);
    if (c->acc_l != c->tmp) free(c->acc_l);
    free(c->k_cache);
    free(c->v_cache);
    free(c->x);
    free(c->xn);
    free(c->tmp);
    free(c->q);
    free(c->att_l);
    free(c->k);
    free(c->v);
    free(c->scores);
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
    free(c->e_x);
    free(c->e_y);
    free(c);
    *self_p = NULL;
}

int model_ctx_pos(const model_ctx_t *c) { return c->pos; }
int model_ctx_n_ctx(const model_ctx_t *c) { return c->n_ctx; }
void model_ctx_reset(model_ctx_t *c) { c->pos = 0; }

// --- helpers: compute

typedef struct {
    const mm_weight_t *w;  // matrix
    const void *xq;        // (nt, xq_stride bytes) activations in its act type
    size_t xq_stride;      // bytes between activation rows
    int nt;                // activation rows
    float *y;              // (nt, y_stride) output
    size_t y_stride;       // floats between output rows
} mm_task_t;

typedef struct {
    const kernels_t *k;    // kernel table
    mm_task_t t[3];        // independent products computed in one parallel job
    int n;                 // tasks used
} mm_job_t;

static void mm_job_fn(void *arg, int ith, int nth) {
    mm_job_t *job = arg;
    for (int i = 0; i < job->n; i++) {
        const mm_task_t *t = &job->t[i];
        int64_t al = t->w->row_align > 0 ? t->w->row_align : 1;
        int64_t nblk = (t->w->rows + al - 1) / al;
        int64_t b0 = nblk * ith / nth, b1 = nblk * (ith + 1) / nth;
        int64_t r0 = b0 * al, r1 = b1 * al;
        if (r1 > t->w->rows) r1 = t->w->rows;
        if (r0 < r1) mm_rows(job->k, t->w, t->xq, t->xq_stride, t->nt, t->y, t->y_stride, r0, r1);
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
    mm_job_t job = {.k = c->m->kern, .n = 0};
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

// --- helpers: tensor-parallel exchange

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

// x <- embedding rows of the tokens. Each node holds the rows of its vocabulary range.
static int embed(model_ctx_t *c, const int32_t *tokens, int nt) {
    const model_t *m = c->m;
    const int E = m->hp.n_embd;
    const size_t erb = qtype_row_size(m->tok_embd->type, E);
    const int skip = m->shard_file ? m->slice.v0 : 0;
    const uint8_t *base = m->tok_embd->data;
    if (c->tp.n_nodes == 1) {
        for (int i = 0; i < nt; i++)
            quant_dequantize_ref(m->tok_embd->type, base + (size_t)(tokens[i] - skip) * erb, c->x + (size_t)i * E, E);
        return 0;
    }
    int mine = 0; // rows this node contributes, in token order, staged in xn
    for (int i = 0; i < nt; i++)
        if (tokens[i] >= m->slice.v0 && tokens[i] < m->slice.v1)
            quant_dequantize_ref(m->tok_embd->type, base + (size_t)(tokens[i] - skip) * erb,
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

// --- helpers: blocks

typedef struct {
    model_ctx_t *c;
    int layer;
    int nt;                // tokens in this chunk
    int pos0;              // position of the first
} att_job_t;

static void attention_fn(void *arg, int ith, int nth) {
    att_job_t *job = arg;
    model_ctx_t *c = job->c;
    const model_hparams_t *hp = &c->m->hp;
    const int hd = hp->head_dim, Hl = c->Hl, group = hp->n_head / hp->n_head_kv;
    const int h0 = c->m->slice.h0, kv0 = c->m->slice.kv0;
    const size_t kvd = (size_t)c->KVl * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t lay = (size_t)(job->layer - c->m->slice.l0);
    const uint8_t *kc = c->k_cache + lay * c->n_ctx * kvd * c->kv_elt;
    const uint8_t *vc = c->v_cache + lay * c->n_ctx * kvd * c->kv_elt;
    float *sc = c->scores + (size_t)ith * ops_attention_scratch(c->n_ctx, hd);
    const int n_kv = (job->pos0 + job->nt + 31) & ~31; // the reference pads its KV view to 32
    const bool f16 = c->kv_type == QT_F16;
    const int total = job->nt * Hl;
    for (int item = total * ith / nth; item < total * (ith + 1) / nth; item++) {
        const int i = item / Hl, hl = item % Hl, kvh = (h0 + hl) / group - kv0;
        const size_t off = (size_t)kvh * hd * c->kv_elt;
        ops_attention(c->att_l + (size_t)i * Hl * hd + (size_t)hl * hd, c->q + (size_t)i * Hl * hd + (size_t)hl * hd,
                      kc + off, vc + off, kvd, job->pos0 + i + 1, n_kv, hd, scale, f16, job->nt > 1, sc);
    }
}

static void store_kv(model_ctx_t *c, int layer, int nt, int pos0) {
    const size_t kvd = (size_t)c->KVl * c->m->hp.head_dim;
    const size_t lay = (size_t)(layer - c->m->slice.l0);
    uint8_t *kc = c->k_cache + (lay * c->n_ctx + (size_t)pos0) * kvd * c->kv_elt;
    uint8_t *vc = c->v_cache + (lay * c->n_ctx + (size_t)pos0) * kvd * c->kv_elt;
    size_t n = (size_t)nt * kvd;
    if (c->kv_type == QT_F32) {
        memcpy(kc, c->k, n * 4);
        memcpy(vc, c->v, n * 4);
        return;
    }
    mlm_f16_t *k16 = (mlm_f16_t *)kc, *v16 = (mlm_f16_t *)vc;
    for (size_t i = 0; i < n; i++) {
        k16[i] = mlm_f32_to_f16(c->k[i]);
        v16[i] = mlm_f32_to_f16(c->v[i]);
    }
}

static int ffn_dense(model_ctx_t *c, const layer_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const mm_weight_t *ws[2] = {&L->w_gate, &L->w_up};
    float *ys[2] = {c->ffn_g, c->ffn_u};
    matmul_shared(c, c->xn, nt, 2, ws, ys);
    ops_silu_mul(c->ffn_g, c->ffn_u, nt, c->Fl);
    int rc = gather_cols(c, c->ffn_g, nt, G_FFN, hp->n_ff, c->ffn_h);
    if (rc != 0) return rc;
    matmul1(c, &L->w_down, c->ffn_h, nt, c->y_l);
    return gather_cols(c, c->y_l, nt, G_HIDDEN, hp->n_embd, c->tmp);
}

// Router: softmax over experts, keep the top k, renormalize their weights to sum to 1.
static void moe_route(model_ctx_t *c, const layer_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int ne = hp->n_expert, k = hp->n_expert_used;
    matmul1(c, &L->gate_inp, c->xn, nt, c->router);
    for (int i = 0; i < nt; i++)
        ops_topk_route(c->router + (size_t)i * ne, ne, k, c->sel + (size_t)i * k, c->sel_w + (size_t)i * k);
}

static int ffn_moe(model_ctx_t *c, const layer_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd, F = hp->n_ff, Fl = c->Fl, El = c->El, k = hp->n_expert_used;
    moe_route(c, L, nt);
    memset(c->acc_l, 0, (size_t)nt * El * sizeof(float));
    // Experts are visited in rank order (every token's top-1 first), so each token's sum is
    // accumulated top-1 first, then top-2, ... whatever the expert ids.
    for (int rank = 0; rank < k; rank++) {
        for (int e = 0; e < hp->n_expert; e++) {
            int n = 0;
            for (int i = 0; i < nt; i++)
                if (c->sel[(size_t)i * k + rank] == e) c->e_tok[n++] = i;
            if (n == 0) continue;
            for (int j = 0; j < n; j++)
                memcpy(c->e_x + (size_t)j * E, c->xn + (size_t)c->e_tok[j] * E, (size_t)E * sizeof(float));
            // The reference's expert product (mul_mat_id) takes one token at a time, which for
            // F32/F16 weights is a different summation order than its batched matmul.
            const int step = mm_act_type(L->e_type) == L->e_type ? 1 : n;
            for (int j = 0; j < n; j += step) {
                const mm_weight_t *ws[2] = {&L->e_gate[e], &L->e_up[e]};
                float *ys[2] = {c->ffn_g + (size_t)j * Fl, c->ffn_u + (size_t)j * Fl};
                matmul_shared(c, c->e_x + (size_t)j * E, step, 2, ws, ys);
            }
            ops_silu_mul(c->ffn_g, c->ffn_u, n, Fl);
            int rc = gather_cols(c, c->ffn_g, n, G_FFN, F, c->ffn_h);
            if (rc != 0) return rc;
            for (int j = 0; j < n; j += step)
                matmul1(c, &L->e_down[e], c->ffn_h + (size_t)j * F, step, c->e_y + (size_t)j * El);
            for (int j = 0; j < n; j++) {
                const int i = c->e_tok[j];
                const float w = c->sel_w[(size_t)i * k + rank];
                float *dst = c->acc_l + (size_t)i * El;
                const float *src = c->e_y + (size_t)j * El;
                for (int d = 0; d < El; d++) dst[d] += w * src[d];
            }
        }
    }
    return gather_cols(c, c->acc_l, nt, G_HIDDEN, E, c->tmp);
}

// One chunk through this node's blocks: the first stage embeds tokens, a later one starts from
// hidden_in; a stage that is not the last hands its residual stream out through hidden_out.
static int eval_chunk(model_ctx_t *c, const int32_t *tokens, const float *hidden_in, int nt, float *hidden_out,
                      float *logits, bool all_logits, bool want_last) {
    const model_t *m = c->m;
    const model_hparams_t *hp = &m->hp;
    const int E = hp->n_embd, hd = hp->head_dim;
    const int pos0 = c->pos;
    int rc = 0;
    if (tokens) rc = embed(c, tokens, nt);
    else memcpy(c->x, hidden_in, (size_t)nt * E * sizeof(float));
    for (int il = m->slice.l0; rc == 0 && il < m->slice.l1; il++) {
        const layer_t *L = &m->layers[il];
        for (int i = 0; i < nt; i++) ops_rmsnorm(c->xn + (size_t)i * E, c->x + (size_t)i * E, L->attn_norm, E, hp->rms_eps);
        const mm_weight_t *ws[3] = {&L->wq, &L->wk, &L->wv};
        float *ys[3] = {c->q, c->k, c->v};
        matmul_shared(c, c->xn, nt, 3, ws, ys);
        for (int i = 0; i < nt; i++) {
            ops_rope(c->q + (size_t)i * c->Hl * hd, c->Hl, hd, hp->n_rot, pos0 + i, hp->rope_base, hp->rope_freq_scale,
                     m->rope_freqs);
            ops_rope(c->k + (size_t)i * c->KVl * hd, c->KVl, hd, hp->n_rot, pos0 + i, hp->rope_base,
                     hp->rope_freq_scale, m->rope_freqs);
        }
        store_kv(c, il, nt, pos0);
        att_job_t aj = {c, il, nt, pos0};
        // Heads are independent: split them between threads as soon as there is a little work.
        double work = (double)nt * c->Hl * (pos0 + nt) * hd;
        tpool_run_n(c->pool, attention_fn, &aj, work < PAR_MIN_WORK / 32 ? 1 : tpool_size(c->pool));
        if ((rc = gather_cols(c, c->att_l, nt, G_HEADS, hp->n_head * hd, c->att)) != 0) break;
        matmul1(c, &L->wo, c->att, nt, c->y_l);
        if ((rc = gather_cols(c, c->y_l, nt, G_HIDDEN, E, c->tmp)) != 0) break;
        for (size_t i = 0; i < (size_t)nt * E; i++) c->x[i] += c->tmp[i];
        for (int i = 0; i < nt; i++) ops_rmsnorm(c->xn + (size_t)i * E, c->x + (size_t)i * E, L->ffn_norm, E, hp->rms_eps);
        rc = hp->n_expert > 0 ? ffn_moe(c, L, nt) : ffn_dense(c, L, nt);
        if (rc != 0) break;
        for (size_t i = 0; i < (size_t)nt * E; i++) c->x[i] += c->tmp[i];
    }
    if (rc != 0) return rc; // the cache holds a partial step: the caller resets or replays
    c->pos += nt;
    if (m->slice.l1 < hp->n_layer) {
        memcpy(hidden_out, c->x, (size_t)nt * E * sizeof(float));
        return 0;
    }
    if (!logits || (!all_logits && !want_last)) return 0;
    int first = all_logits ? 0 : nt - 1;
    int n_out = nt - first;
    for (int i = first; i < nt; i++)
        ops_rmsnorm(c->xn + (size_t)(i - first) * E, c->x + (size_t)i * E, m->out_norm, E, hp->rms_eps);
    float *out_l = c->tp.n_nodes == 1 ? logits : c->logit_l;
    matmul1(c, &m->output, c->xn, n_out, out_l);
    if (c->tp.gather_logits) return deliver_logits(c, out_l, n_out, logits);
    return gather_cols(c, out_l, n_out, G_VOCAB, hp->n_vocab, logits);
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
