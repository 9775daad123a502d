// llama-family forward pass: RMSNorm, RoPE (NORM mode), GQA attention over an F16/F32 KV cache,
// SwiGLU FFN or Mixtral-style top-k experts, computed with the matmul kernels on a thread pool.
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "matmul.h"
#include "ops.h"
#include "threadpool.h"

// --- types

// Jobs below this many multiply-adds run on the calling thread: waking a worker costs more.
#define PAR_MIN_WORK 65536.0

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
    char type_name[16];             // dominant weight type
};

struct model_ctx {
    const model_t *m;          // borrowed
    tpool_t *pool;             // owned
    int n_ctx;                 // cache capacity in positions
    int n_batch;               // tokens per chunk
    int pos;                   // tokens already in the cache
    qtype_t kv_type;           // QT_F16 or QT_F32
    size_t kv_elt;             // bytes per cache element
    uint8_t *k_cache;          // (n_layer, n_ctx, kv_dim) of kv_type
    uint8_t *v_cache;          // (n_layer, n_ctx, kv_dim) of kv_type
    float *x;                  // (n_batch, n_embd) residual stream
    float *xn;                 // (n_batch, n_embd) normed input of the current block
    float *q;                  // (n_batch, q_dim)
    float *k;                  // (n_batch, kv_dim)
    float *v;                  // (n_batch, kv_dim)
    float *att;                // (n_batch, q_dim) attention output before wo
    float *scores;             // (n_threads, ops_attention_scratch(n_ctx, head_dim)) per-thread scratch
    float *tmp;                // (n_batch, n_embd) block output before the residual add
    float *ffn_g;              // (n_batch, n_ff)
    float *ffn_u;              // (n_batch, n_ff)
    float *router;             // (n_batch, n_expert)
    int *sel;                  // (n_batch, n_expert_used) chosen experts
    float *sel_w;              // (n_batch, n_expert_used) their weights
    int *e_tok;                // (n_batch) tokens routed to one expert
    float *e_x;                // (n_batch, n_embd) gathered inputs for one expert (MoE)
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

static int kv_int(const gguf_t *g, const char *arch, const char *suffix, int64_t *out, bool required, char *err,
                  size_t errlen) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_i64(g, key, out);
    if (rc == MLM_ENOTFOUND && !required) return 0;
    if (rc != 0) return fail(err, errlen, MLM_EFORMAT, "%s: metadata key %s missing or not an integer", gguf_path(g), key);
    return 0;
}

static int kv_float(const gguf_t *g, const char *arch, const char *suffix, float *out) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_f32(g, key, out);
    return rc == MLM_ENOTFOUND ? 0 : rc;
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

static int weight_from(model_t *m, mm_weight_t *w, const gguf_tensor_t *t, int64_t expert, bool repack, char *err,
                       size_t errlen) {
    int64_t rows = t->ne[1], cols = t->ne[0];
    size_t row_bytes = qtype_row_size(t->type, cols);
    const uint8_t *data = (const uint8_t *)t->data + (size_t)expert * (size_t)rows * row_bytes;
    int rc = mm_weight_init(w, m->kern, t->type, rows, cols, data, repack);
    if (rc != 0)
        return fail(err, errlen, rc, "tensor %s: type %s cannot be used for a matrix product", t->name,
                    qtype_name(t->type));
    return 0;
}

static void hparams_read_arch(const gguf_t *g, char *arch, size_t cap) {
    const char *s;
    size_t len;
    arch[0] = 0;
    if (gguf_get_str(g, "general.architecture", &s, &len) == 0) {
        if (len >= cap) len = cap - 1;
        memcpy(arch, s, len);
        arch[len] = 0;
    }
}

static int load_hparams(model_t *m, char *err, size_t errlen) {
    model_hparams_t *hp = &m->hp;
    const gguf_t *g = m->g;
    hparams_read_arch(g, hp->arch, sizeof hp->arch);
    if (strcmp(hp->arch, "llama") != 0)
        return fail(err, errlen, MLM_EUNSUPPORTED, "%s: architecture '%s' is not supported (only llama and Mixtral-style llama MoE)",
                    gguf_path(g), hp->arch[0] ? hp->arch : "(none)");
    const char *a = hp->arch;
    int64_t v;
    int rc;
#define GETI(suffix, field, req)                                         \
    v = 0;                                                               \
    if ((rc = kv_int(g, a, suffix, &v, req, err, errlen)) != 0) return rc; \
    hp->field = (int)v;
    GETI("embedding_length", n_embd, true);
    GETI("block_count", n_layer, true);
    GETI("feed_forward_length", n_ff, true);
    GETI("attention.head_count", n_head, true);
    hp->n_head_kv = hp->n_head;
    GETI("attention.head_count_kv", n_head_kv, false);
    if (hp->n_head_kv == 0) hp->n_head_kv = hp->n_head;
    GETI("context_length", n_ctx_train, false);
    GETI("expert_count", n_expert, false);
    GETI("expert_used_count", n_expert_used, false);
    hp->head_dim = hp->n_head > 0 ? hp->n_embd / hp->n_head : 0;
    v = hp->head_dim;
    if ((rc = kv_int(g, a, "attention.key_length", &v, false, err, errlen)) != 0) return rc;
    hp->head_dim = (int)v;
    hp->n_rot = hp->head_dim;
    GETI("rope.dimension_count", n_rot, false);
    if (hp->n_rot == 0) hp->n_rot = hp->head_dim;
#undef GETI
    hp->rms_eps = 1e-5f;
    hp->rope_base = 10000.0f;
    hp->rope_freq_scale = 1.0f;
    kv_float(g, a, "attention.layer_norm_rms_epsilon", &hp->rms_eps);
    kv_float(g, a, "rope.freq_base", &hp->rope_base);
    float factor = 0;
    char key[96];
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    const char *st;
    size_t stl;
    bool linear = gguf_get_str(g, key, &st, &stl) == 0 && stl == 6 && memcmp(st, "linear", 6) == 0;
    if (kv_float(g, a, "rope.scaling.factor", &factor) == 0 && factor > 0) {
        snprintf(key, sizeof key, "%s.rope.scaling.type", a);
        bool none = gguf_get_str(g, key, &st, &stl) == 0 && stl == 4 && memcmp(st, "none", 4) == 0;
        if (linear || !none) hp->rope_freq_scale = 1.0f / factor;
    }
    if (hp->n_embd <= 0 || hp->n_layer <= 0 || hp->n_head <= 0 || hp->n_head_kv <= 0 || hp->n_ff <= 0 ||
        hp->head_dim <= 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2 != 0 ||
        hp->n_layer > 100000 || hp->n_embd > (1 << 20) || hp->n_ff > (1 << 22) || hp->n_head > 4096)
        return fail(err, errlen, MLM_EFORMAT, "%s: inconsistent hyperparameters (%s)", gguf_path(g),
                    "embedding/head/layer counts");
    if (hp->n_expert < 0 || hp->n_expert > 1024 || hp->n_expert_used < 0 || hp->n_expert_used > hp->n_expert ||
        (hp->n_expert > 0 && hp->n_expert_used == 0))
        return fail(err, errlen, MLM_EFORMAT, "%s: inconsistent expert counts%s", gguf_path(g), "");
    if (!(hp->rms_eps > 0 && hp->rms_eps < 1) || !(hp->rope_base > 0))
        return fail(err, errlen, MLM_EFORMAT, "%s: bad rms epsilon or rope base%s", gguf_path(g), "");
    return 0;
}

static int load_tensors(model_t *m, bool repack, char *err, size_t errlen) {
    model_hparams_t *hp = &m->hp;
    int rc = 0;
    int64_t E = hp->n_embd, Q = (int64_t)hp->n_head * hp->head_dim, KV = (int64_t)hp->n_head_kv * hp->head_dim;
    m->tok_embd = want_tensor(m, "token_embd.weight", 2, E, -1, 0, true, &rc, err, errlen);
    if (!m->tok_embd) return rc;
    hp->n_vocab = (int)m->tok_embd->ne[1];
    if (!qtype_traits(m->tok_embd->type)->has_kernels)
        return fail(err, errlen, MLM_EUNSUPPORTED, "token_embd.weight: type %s is not supported%s",
                    qtype_name(m->tok_embd->type), "");
    const gguf_tensor_t *t = want_tensor(m, "output_norm.weight", 1, E, 0, 0, true, &rc, err, errlen);
    if (!t || !(m->out_norm = vec_f32(m, t, &rc))) return rc ? rc : MLM_EFORMAT;
    t = want_tensor(m, "output.weight", 2, E, hp->n_vocab, 0, false, &rc, err, errlen);
    if (rc) return rc;
    hp->tied_output = t == NULL;
    if ((rc = weight_from(m, &m->output, t ? t : m->tok_embd, 0, repack, err, errlen)) != 0) return rc;
    t = gguf_find_tensor(m->g, "rope_freqs.weight");
    if (t) {
        if (t->type != QT_F32 || gguf_tensor_nelements(t) != hp->n_rot / 2)
            return fail(err, errlen, MLM_EFORMAT, "rope_freqs.weight: expected %s with n_rot/2 elements%s", "F32", "");
        m->rope_freqs = t->data;
    }
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return MLM_ENOMEM;
    for (int il = 0; il < hp->n_layer; il++) {
        layer_t *L = &m->layers[il];
        char name[96];
#define T2(field, suffix, r0, r1)                                                                    \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);                                     \
    if (!(t = want_tensor(m, name, 2, r0, r1, 0, true, &rc, err, errlen))) return rc;                \
    if ((rc = weight_from(m, &L->field, t, 0, repack, err, errlen)) != 0) return rc;
#define T1(field, suffix)                                                                            \
    snprintf(name, sizeof name, "blk.%d.%s.weight", il, suffix);                                     \
    if (!(t = want_tensor(m, name, 1, E, 0, 0, true, &rc, err, errlen))) return rc;                  \
    if (!(L->field = vec_f32(m, t, &rc))) return rc ? rc : MLM_EFORMAT;
        T1(attn_norm, "attn_norm");
        T1(ffn_norm, "ffn_norm");
        T2(wq, "attn_q", E, Q);
        T2(wk, "attn_k", E, KV);
        T2(wv, "attn_v", E, KV);
        T2(wo, "attn_output", Q, E);
        if (hp->n_expert == 0) {
            T2(w_gate, "ffn_gate", E, hp->n_ff);
            T2(w_up, "ffn_up", E, hp->n_ff);
            T2(w_down, "ffn_down", hp->n_ff, E);
        } else {
            T2(gate_inp, "ffn_gate_inp", E, hp->n_expert);
            int ne = hp->n_expert;
            L->e_gate = calloc((size_t)ne, sizeof(mm_weight_t));
            L->e_up = calloc((size_t)ne, sizeof(mm_weight_t));
            L->e_down = calloc((size_t)ne, sizeof(mm_weight_t));
            if (!L->e_gate || !L->e_up || !L->e_down) return MLM_ENOMEM;
            const char *sfx[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
            mm_weight_t *dst[3] = {L->e_gate, L->e_up, L->e_down};
            for (int j = 0; j < 3; j++) {
                snprintf(name, sizeof name, "blk.%d.%s.weight", il, sfx[j]);
                t = want_tensor(m, name, 3, j < 2 ? E : hp->n_ff, j < 2 ? hp->n_ff : E, ne, true, &rc, err, errlen);
                if (!t) return rc;
                for (int e = 0; e < ne; e++)
                    if ((rc = weight_from(m, &dst[j][e], t, e, repack, err, errlen)) != 0) return rc;
            }
        }
#undef T1
#undef T2
    }
    return 0;
}

// Totals, and the dominant weight type: the most common type among the matrices (2-D and up).
static void count_params(model_t *m) {
    int64_t counts[QT_COUNT] = {0};
    for (int64_t i = 0; i < gguf_n_tensors(m->g); i++) {
        const gguf_tensor_t *t = gguf_tensor(m->g, i);
        m->hp.n_params += gguf_tensor_nelements(t);
        m->hp.weight_bytes += t->nbytes;
        if ((unsigned)t->type < QT_COUNT && t->n_dims >= 2) counts[t->type]++;
    }
    int best = QT_F32;
    for (int i = 0; i < QT_COUNT; i++)
        if (counts[i] > counts[best]) best = i;
    snprintf(m->type_name, sizeof m->type_name, "%s", qtype_name(best));
}

// --- public API: model

int model_load(model_t **out, const char *path, const model_load_opts_t *opts, char *err, size_t errlen) {
    *out = NULL;
    model_t *m = calloc(1, sizeof *m);
    if (!m) return MLM_ENOMEM;
    m->kern = (opts && opts->kern) ? opts->kern : kernels_best();
    bool repack = opts ? opts->repack : true;
    int rc = gguf_open(&m->g, path, err, errlen);
    if (rc == 0) rc = load_hparams(m, err, errlen);
    if (rc == 0) rc = load_tensors(m, repack, err, errlen);
    if (rc != 0) {
        if (rc == MLM_ENOMEM && err && errlen) snprintf(err, errlen, "%s: out of memory while loading", path);
        model_destroy(&m);
        return rc;
    }
    count_params(m);
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
const char *model_type_name(const model_t *m) { return m->type_name; }

// --- public API: context

int model_ctx_new(model_ctx_t **out, const model_t *m, const model_ctx_opts_t *opts, char *err, size_t errlen) {
    *out = NULL;
    const model_hparams_t *hp = &m->hp;
    model_ctx_opts_t o = opts ? *opts : (model_ctx_opts_t){0};
    if (o.n_ctx <= 0) o.n_ctx = hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    if (o.n_batch <= 0) o.n_batch = 64;
    if (o.n_threads <= 0) o.n_threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (o.n_threads <= 0) o.n_threads = 1;
    model_ctx_t *c = calloc(1, sizeof *c);
    if (!c) return MLM_ENOMEM;
    c->m = m;
    c->n_ctx = o.n_ctx;
    c->n_batch = o.n_batch;
    c->kv_type = o.kv_f32 ? QT_F32 : QT_F16;
    c->kv_elt = o.kv_f32 ? 4 : 2;
    size_t B = (size_t)o.n_batch, E = (size_t)hp->n_embd, Qd = (size_t)hp->n_head * hp->head_dim;
    size_t KVd = (size_t)hp->n_head_kv * hp->head_dim, F = (size_t)hp->n_ff;
    size_t kv_bytes = (size_t)hp->n_layer * (size_t)c->n_ctx * KVd * c->kv_elt;
    size_t maxin = E > Qd ? E : Qd;
    if (F > maxin) maxin = F;
    c->xq_cap = B * (maxin * 4 + 64); // generous: F32 rows are the widest activation type
    c->pool = tpool_new(o.n_threads);
    c->k_cache = calloc(1, kv_bytes);
    c->v_cache = calloc(1, kv_bytes);
    c->x = malloc(B * E * 4);
    c->xn = malloc(B * E * 4);
    c->tmp = malloc(B * E * 4);
    c->q = malloc(B * Qd * 4);
    c->att = malloc(B * Qd * 4);
    c->k = malloc(B * KVd * 4);
    c->v = malloc(B * KVd * 4);
    c->scores = malloc((size_t)o.n_threads * ops_attention_scratch(c->n_ctx, hp->head_dim) * 4);
    c->ffn_g = malloc(B * F * 4);
    c->ffn_u = malloc(B * F * 4);
    c->xq_a = malloc(c->xq_cap);
    c->xq_b = malloc(c->xq_cap);
    c->xq_c = malloc(c->xq_cap);
    bool moe_ok = true;
    if (hp->n_expert > 0) {
        c->router = malloc(B * (size_t)hp->n_expert * 4);
        c->sel = malloc(B * (size_t)hp->n_expert_used * sizeof(int));
        c->sel_w = malloc(B * (size_t)hp->n_expert_used * 4);
        c->e_tok = malloc(B * sizeof(int));
        c->e_x = malloc(B * E * 4);
        moe_ok = c->router && c->sel && c->sel_w && c->e_tok && c->e_x;
    }
    if (!c->pool || !c->k_cache || !c->v_cache || !c->x || !c->xn || !c->tmp || !c->q || !c->att || !c->k || !c->v ||
        !c->scores || !c->ffn_g || !c->ffn_u || !c->xq_a || !c->xq_b || !c->xq_c || !moe_ok) {
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
    free(c->k_cache);
    free(c->v_cache);
    free(c->x);
    free(c->xn);
    free(c->tmp);
    free(c->q);
    free(c->att);
    free(c->k);
    free(c->v);
    free(c->scores);
    free(c->ffn_g);
    free(c->ffn_u);
    free(c->xq_a);
    free(c->xq_b);
    free(c->xq_c);
    free(c->router);
    free(c->sel);
    free(c->sel_w);
    free(c->e_tok);
    free(c->e_x);
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
    mm_job_t job = {.k = c->m->kern, .n = n};
    void *bufs[3] = {c->xq_a, c->xq_b, c->xq_c};
    qtype_t done_type[3];
    const void *done_q[3];
    size_t done_s[3];
    int n_done = 0;
    for (int i = 0; i < n; i++) {
        int j = 0;
        while (j < n_done && done_type[j] != ws[i]->type) j++;
        if (j == n_done) {
            done_type[j] = ws[i]->type;
            done_q[j] = quantize_rows(c, ws[i]->type, x, (size_t)ws[i]->cols, nt, ws[i]->cols, bufs[j], &done_s[j]);
            n_done++;
        }
        job.t[i] = (mm_task_t){ws[i], done_q[j], done_s[j], nt, ys[i], (size_t)ws[i]->rows};
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
    const int hd = hp->head_dim, nh = hp->n_head, group = hp->n_head / hp->n_head_kv;
    const size_t kvd = (size_t)hp->n_head_kv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const uint8_t *kc = c->k_cache + (size_t)job->layer * c->n_ctx * kvd * c->kv_elt;
    const uint8_t *vc = c->v_cache + (size_t)job->layer * c->n_ctx * kvd * c->kv_elt;
    float *sc = c->scores + (size_t)ith * ops_attention_scratch(c->n_ctx, hd);
    const int n_kv = (job->pos0 + job->nt + 31) & ~31; // the reference pads its KV view to 32
    const bool f16 = c->kv_type == QT_F16;
    const int total = job->nt * nh;
    for (int item = total * ith / nth; item < total * (ith + 1) / nth; item++) {
        const int i = item / nh, h = item % nh, kvh = h / group;
        const size_t off = (size_t)kvh * hd * c->kv_elt;
        ops_attention(c->att + (size_t)i * nh * hd + (size_t)h * hd, c->q + (size_t)i * nh * hd + (size_t)h * hd,
                      kc + off, vc + off, kvd, job->pos0 + i + 1, n_kv, hd, scale, f16, job->nt > 1, sc);
    }
}

static void store_kv(model_ctx_t *c, int layer, int nt, int pos0) {
    const model_hparams_t *hp = &c->m->hp;
    const size_t kvd = (size_t)hp->n_head_kv * hp->head_dim;
    uint8_t *kc = c->k_cache + ((size_t)layer * c->n_ctx + (size_t)pos0) * kvd * c->kv_elt;
    uint8_t *vc = c->v_cache + ((size_t)layer * c->n_ctx + (size_t)pos0) * kvd * c->kv_elt;
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

static void ffn_dense(model_ctx_t *c, const layer_t *L, int nt) {
    const int F = c->m->hp.n_ff;
    const mm_weight_t *ws[2] = {&L->w_gate, &L->w_up};
    float *ys[2] = {c->ffn_g, c->ffn_u};
    matmul_shared(c, c->xn, nt, 2, ws, ys);
    ops_silu_mul(c->ffn_g, c->ffn_u, nt, F);
    matmul1(c, &L->w_down, c->ffn_g, nt, c->tmp);
}

// Router: softmax over experts, keep the top k, renormalize their weights to sum to 1.
static void moe_route(model_ctx_t *c, const layer_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int ne = hp->n_expert, k = hp->n_expert_used;
    matmul1(c, &L->gate_inp, c->xn, nt, c->router);
    for (int i = 0; i < nt; i++)
        ops_topk_route(c->router + (size_t)i * ne, ne, k, c->sel + (size_t)i * k, c->sel_w + (size_t)i * k);
}

static void ffn_moe(model_ctx_t *c, const layer_t *L, int nt) {
    const model_hparams_t *hp = &c->m->hp;
    const int E = hp->n_embd, F = hp->n_ff, k = hp->n_expert_used;
    moe_route(c, L, nt);
    memset(c->tmp, 0, (size_t)nt * E * sizeof(float));
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
            const mm_weight_t *ws[2] = {&L->e_gate[e], &L->e_up[e]};
            float *ys[2] = {c->ffn_g, c->ffn_u};
            matmul_shared(c, c->e_x, n, 2, ws, ys);
            ops_silu_mul(c->ffn_g, c->ffn_u, n, F);
            matmul1(c, &L->e_down[e], c->ffn_g, n, c->e_x);
            for (int j = 0; j < n; j++) {
                const int i = c->e_tok[j];
                const float w = c->sel_w[(size_t)i * k + rank];
                float *dst = c->tmp + (size_t)i * E;
                const float *src = c->e_x + (size_t)j * E;
                for (int d = 0; d < E; d++) dst[d] += w * src[d];
            }
        }
    }
}

static int eval_chunk(model_ctx_t *c, const int32_t *tokens, int nt, float *logits, bool all_logits, bool want_last) {
    const model_t *m = c->m;
    const model_hparams_t *hp = &m->hp;
    const int E = hp->n_embd, nh = hp->n_head, nkv = hp->n_head_kv, hd = hp->head_dim;
    const int pos0 = c->pos;
    size_t erb = qtype_row_size(m->tok_embd->type, E);
    for (int i = 0; i < nt; i++)
        quant_dequantize_ref(m->tok_embd->type, (const uint8_t *)m->tok_embd->data + (size_t)tokens[i] * erb,
                             c->x + (size_t)i * E, E);
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_t *L = &m->layers[il];
        for (int i = 0; i < nt; i++) ops_rmsnorm(c->xn + (size_t)i * E, c->x + (size_t)i * E, L->attn_norm, E, hp->rms_eps);
        const mm_weight_t *ws[3] = {&L->wq, &L->wk, &L->wv};
        float *ys[3] = {c->q, c->k, c->v};
        matmul_shared(c, c->xn, nt, 3, ws, ys);
        for (int i = 0; i < nt; i++) {
            ops_rope(c->q + (size_t)i * nh * hd, nh, hd, hp->n_rot, pos0 + i, hp->rope_base, hp->rope_freq_scale,
                     m->rope_freqs);
            ops_rope(c->k + (size_t)i * nkv * hd, nkv, hd, hp->n_rot, pos0 + i, hp->rope_base, hp->rope_freq_scale,
                     m->rope_freqs);
        }
        store_kv(c, il, nt, pos0);
        att_job_t aj = {c, il, nt, pos0};
        double work = (double)nt * nh * (pos0 + nt) * hd;
        tpool_run_n(c->pool, attention_fn, &aj, work < PAR_MIN_WORK ? 1 : tpool_size(c->pool));
        matmul1(c, &L->wo, c->att, nt, c->tmp);
        for (size_t i = 0; i < (size_t)nt * E; i++) c->x[i] += c->tmp[i];
        for (int i = 0; i < nt; i++) ops_rmsnorm(c->xn + (size_t)i * E, c->x + (size_t)i * E, L->ffn_norm, E, hp->rms_eps);
        if (hp->n_expert > 0)
            ffn_moe(c, L, nt);
        else
            ffn_dense(c, L, nt);
        for (size_t i = 0; i < (size_t)nt * E; i++) c->x[i] += c->tmp[i];
    }
    c->pos += nt;
    if (!logits || (!all_logits && !want_last)) return 0;
    int first = all_logits ? 0 : nt - 1;
    int n_out = nt - first;
    for (int i = first; i < nt; i++)
        ops_rmsnorm(c->xn + (size_t)(i - first) * E, c->x + (size_t)i * E, m->out_norm, E, hp->rms_eps);
    matmul1(c, &m->output, c->xn, n_out, logits);
    return 0;
}

// --- public API: evaluation

int model_eval(model_ctx_t *c, const int32_t *tokens, int n, float *logits, bool all_logits) {
    const model_hparams_t *hp = &c->m->hp;
    if (n <= 0) return MLM_EINVAL;
    if (c->pos + n > c->n_ctx) return MLM_ERANGE;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab) return MLM_EINVAL;
    if (hp->head_dim > 512) return MLM_EUNSUPPORTED;
    for (int done = 0; done < n;) {
        int nt = n - done < c->n_batch ? n - done : c->n_batch;
        bool last = done + nt == n;
        float *out = logits;
        if (logits && all_logits) out = logits + (size_t)done * hp->n_vocab;
        int rc = eval_chunk(c, tokens + done, nt, out, all_logits, last);
        if (rc != 0) return rc;
        done += nt;
    }
    return 0;
}
