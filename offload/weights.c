// Weight providers: the registry, the checking wrapper, and the tensor lookups providers share.
#include "offload/weights.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/names.h"
#include "offload/experts.h"
#include "offload/weights_impl.h"

struct weights {
    const struct weights_i *iface;
    void *ctx;
    weights_info_t info;
    char name[32];
    _Atomic uint64_t n_acquire, n_release, n_prefetch; // a model may be shared by contexts on several threads
};

// --- registry

static mlm_names_t providers = MLM_NAMES_INIT(3, {"mmap", (mlm_name_fn)weights_mmap_new},
                                              {"window", (mlm_name_fn)weights_window_new},
                                              {"experts", (mlm_name_fn)weights_experts_new});

int weights_register(const char *name, weights_new_fn make) { return mlm_names_add(&providers, name, (mlm_name_fn)make); }

// The constructor registered as the first len bytes of name, or NULL.
static weights_new_fn find_maker(const char *name, size_t len) {
    return (weights_new_fn)mlm_names_find(&providers, name, len);
}

// "12.3 MiB" / "1.50 GiB" into buf.
static const char *fmt_bytes(char *buf, size_t cap, uint64_t b) {
    if (b >= (1ull << 30)) snprintf(buf, cap, "%.2f GiB", (double)b / (double)(1ull << 30));
    else snprintf(buf, cap, "%.1f MiB", (double)b / (double)(1ull << 20));
    return buf;
}

int weights_plan(const weights_params_t *p, plan_stream_t *st, char *err, size_t errlen) {
    plan_stream_t mine;
    if (!st) st = &mine;
    memset(st, 0, sizeof *st);
    if (!p || !p->g || !p->slice) return mlm_fail(err, errlen, MLM_EINVAL, "weights: missing parameters");
    plan_model_t *pm = malloc(sizeof *pm); // large: row sizes of every block
    if (!pm) return MLM_ENOMEM;
    int rc = plan_model_from_gguf(p->g, pm, err, errlen);
    const int n_ctx = p->n_ctx > 0 ? p->n_ctx : 0;
    const int mode = p->slice->cols ? PLAN_TP_ALLREDUCE : PLAN_TP_EXACT; // how the share is cut
    if (rc == 0) rc = plan_window(pm, p->slice, mode, n_ctx, p->budget_bytes, st);
    if (rc == MLM_ERANGE) {
        const shard_slice_t *s = p->slice;
        const bool last = s->l1 == pm->n_layer && s->l1 > s->l0;
        const uint64_t kv = (uint64_t)(s->l1 - s->l0) * (uint64_t)n_ctx * (uint64_t)(s->kv1 - s->kv0) *
                            (uint64_t)pm->head_dim * 4u; // k and v, F16
        const bool out_unit = last && pm->out_row_bytes * (uint64_t)(s->v1 - s->v0) == st->unit_bytes;
        char b[32], m[32], u[32], k[32], a[32];
        mlm_fail(err, errlen, MLM_ERANGE,
                 "--mem-budget %s is below the %s this node needs: %s of %s, KV cache %s (%d positions), "
                 "activations %s",
                 fmt_bytes(b, sizeof b, p->budget_bytes), fmt_bytes(m, sizeof m, st->min_budget),
                 out_unit ? "the output rows" : "one block", fmt_bytes(u, sizeof u, st->unit_bytes),
                 fmt_bytes(k, sizeof k, kv), n_ctx,
                 fmt_bytes(a, sizeof a, st->fixed_bytes > kv ? st->fixed_bytes - kv : 0));
    }
    free(pm);
    return rc;
}

// Experts of each block the share holds: placed ones (p->experts, or a placed slice's), else all.
static int experts_held(const weights_params_t *p) {
    int n = 0;
    if (p->experts)
        for (int w = 0; w < 4; w++) n += __builtin_popcountll(p->experts[w]);
    else if (p->slice->placed)
        for (int w = 0; w < SHARD_EXPERT_WORDS; w++) n += __builtin_popcount(p->slice->experts[w]);
    else n = p->hp ? p->hp->n_expert : 0;
    return n;
}

int weights_choose(const weights_params_t *p, const char **name, char *err, size_t errlen) {
    const bool placed = p && (p->experts || (p->slice && p->slice->placed));
    *name = "mmap";
    if (!p || !p->budget_bytes) return 0;
    // A MoE share over its budget caches its experts (N per block, as many as the budget holds) where one
    // of each block fits beside the rest: it then reads only the routed experts it misses, where the
    // window would stream every unit it cannot pin each token. Placed experts never stream.
    const bool moe = p->hp && p->hp->n_expert > 0 && p->hp->n_expert <= 256 && p->slice && !p->slice->cols;
    plan_stream_t st = {0};
    int rc = placed ? 0 : weights_plan(p, &st, err, errlen);
    if (moe && (placed || rc == MLM_ERANGE || (rc == 0 && st.streams))) {
        int fit = 0, pool = 0, prc = MLM_ERANGE;
        uint64_t need = 0;
        char why[512];
        const int frc = experts_fit(p, &fit, why, sizeof why);
        // below one expert per block a pool of slots shared by the blocks still reads only the routed
        // experts, where the window reads whole blocks (all their experts) and a placed share would not fit
        const bool poolable = frc == MLM_ERANGE && p->hp->n_expert_used < experts_held(p);
        if (poolable) prc = experts_pool_fit(p, &pool, &need, why, sizeof why);
        if ((frc == 0 && fit < experts_held(p)) || (poolable && prc == 0 && pool >= 1)) {
            *name = "experts";
            if (err && errlen) err[0] = 0;
            return 0;
        }
        // neither fits: say the smaller of the two minimums (a pool's is usually below a whole block)
        if (rc == MLM_ERANGE && poolable && prc == MLM_ERANGE && need < st.min_budget && err && errlen)
            snprintf(err, errlen, "%s", why);
    }
    if (rc == 0 && st.streams) *name = "window";
    return rc;
}

int weights_need_shard_file(const weights_params_t *p, bool *need, char *err, size_t errlen) {
    *need = false;
    if (!p || !p->slice || !p->slice->cols || !p->budget_bytes || p->shard_file) return 0;
    plan_stream_t st;
    int rc = weights_plan(p, &st, err, errlen);
    *need = rc == 0 && st.streams;
    return rc;
}

int weights_new(weights_t **out, const char *name, const weights_params_t *p, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    if (!p || !p->g || !p->hp || !p->slice) return mlm_fail(err, errlen, MLM_EINVAL, "weights: missing parameters");
    if (!name || !*name) {
        int rc = weights_choose(p, &name, err, errlen);
        if (rc != 0) return rc;
    }
    const char *colon = strchr(name, ':');
    const size_t len = colon ? (size_t)(colon - name) : strlen(name);
    const weights_new_fn make = find_maker(name, len);
    if (make) return make(out, p, colon ? colon + 1 : "", err, errlen);
    return mlm_fail(err, errlen, MLM_ENOTFOUND, "no weight provider '%.*s' (have: %s)", (int)len, name, weights_names());
}

const char *weights_names(void) { return mlm_names_list(&providers); }

weights_t *weights_wrap(const struct weights_i *iface, void *ctx, const char *name, const weights_info_t *info) {
    weights_t *w = calloc(1, sizeof *w);
    if (!w) {
        if (iface->free) iface->free(ctx);
        return NULL;
    }
    w->iface = iface;
    w->ctx = ctx;
    w->info = *info;
    snprintf(w->name, sizeof w->name, "%s", name);
    return w;
}

weights_info_t weights_info_for(const model_hparams_t *hp, const shard_slice_t *sl) {
    return (weights_info_t){
        .n_layer = hp->n_layer,
        .n_expert = hp->n_expert,
        .l0 = sl->l0,
        .l1 = sl->l1,
        .has_in = sl->l0 == 0 && sl->l1 > 0,
        .has_out = sl->l1 == hp->n_layer && sl->l1 > sl->l0,
    };
}

void weights_free(weights_t **self_p) {
    if (!self_p || !*self_p) return;
    weights_t *w = *self_p;
    if (w->iface->free) w->iface->free(w->ctx);
    free(w);
    *self_p = NULL;
}

const char *weights_name(const weights_t *w) { return w->name; }

void weights_describe(const weights_t *w, char *buf, size_t cap) {
    if (!buf || !cap) return;
    if (!w) snprintf(buf, cap, "none");
    else if (w->iface->describe) w->iface->describe(w->ctx, buf, cap);
    else snprintf(buf, cap, "%s", w->name);
}

// --- use

// 0 for a unit the provider holds, MLM_EINVAL for an id the model does not have, MLM_ERANGE for
// one outside the slice.
static int check_unit(const weights_info_t *in, int layer, int expert) {
    if (layer == WEIGHTS_IN || layer == WEIGHTS_OUT) {
        if (expert != WEIGHTS_DENSE) return MLM_EINVAL;
        return (layer == WEIGHTS_IN ? in->has_in : in->has_out) ? 0 : MLM_ERANGE;
    }
    if (layer < 0 || layer >= in->n_layer) return MLM_EINVAL;
    if (expert != WEIGHTS_DENSE && (expert < 0 || expert >= in->n_expert)) return MLM_EINVAL;
    return layer >= in->l0 && layer < in->l1 ? 0 : MLM_ERANGE;
}

int weights_acquire(weights_t *w, int layer, int expert, const layer_weights_t **out) {
    if (!w || !out) return MLM_EINVAL;
    int rc = check_unit(&w->info, layer, expert);
    if (rc == 0) rc = w->iface->acquire(w->ctx, layer, expert, out);
    if (rc != 0) {
        *out = NULL;
        return rc;
    }
    atomic_fetch_add_explicit(&w->n_acquire, 1, memory_order_relaxed);
    return 0;
}

void weights_release(weights_t *w, int layer, int expert) {
    if (!w || check_unit(&w->info, layer, expert) != 0) return;
    if (w->iface->release) w->iface->release(w->ctx, layer, expert);
    atomic_fetch_add_explicit(&w->n_release, 1, memory_order_relaxed);
}

void weights_prefetch(weights_t *w, int layer, const int *experts, int n) {
    if (!w) return;
    atomic_fetch_add_explicit(&w->n_prefetch, 1, memory_order_relaxed);
    if (!w->iface->prefetch || n < 0 || (n > 0 && !experts)) return;
    if (n == 0 && check_unit(&w->info, layer, WEIGHTS_DENSE) != 0) return;
    for (int i = 0; i < n; i++)
        if (experts[i] == WEIGHTS_DENSE || check_unit(&w->info, layer, experts[i]) != 0) return;
    w->iface->prefetch(w->ctx, layer, experts, n);
}

void weights_observe(weights_t *w, int layer, const float *x, int n) {
    if (!w || !x || n <= 0 || !w->iface->observe || check_unit(&w->info, layer, WEIGHTS_DENSE) != 0) return;
    w->iface->observe(w->ctx, layer, x, n);
}

mm_weight_t *weights_matrix(weights_t *w, const char *name, int plane, int64_t *r0, int64_t *c0, int64_t *c1) {
    if (!w || !name || !r0 || !c0 || !c1 || !w->iface->matrix) return NULL;
    return w->iface->matrix(w->ctx, name, plane, r0, c0, c1);
}

void weights_stats(const weights_t *w, weights_stats_t *out) {
    memset(out, 0, sizeof *out);
    if (!w) return;
    if (w->iface->stats) w->iface->stats(w->ctx, out);
    out->acquires = atomic_load_explicit(&((weights_t *)w)->n_acquire, memory_order_relaxed);
    out->releases = atomic_load_explicit(&((weights_t *)w)->n_release, memory_order_relaxed);
    out->prefetches = atomic_load_explicit(&((weights_t *)w)->n_prefetch, memory_order_relaxed);
}

int weights_read_summary(const weights_t *w, char *buf, size_t cap) {
    if (!buf || !cap) return 0;
    buf[0] = 0;
    weights_stats_t s;
    weights_stats(w, &s);
    if (!s.units_read) return 0;
    const double hidden = s.read_ms > 0 ? 1.0 - (s.stall_ms < s.read_ms ? s.stall_ms : s.read_ms) / s.read_ms : 0;
    const int n = snprintf(buf, cap,
                           "%.1f MB read in %llu units (%.0f MB/s while reading), waited %.0f ms (%.0f%% of "
                           "reading hidden behind compute)",
                           (double)s.bytes_read / 1e6, (unsigned long long)s.units_read,
                           s.read_ms > 0 ? (double)s.bytes_read / 1e3 / s.read_ms : 0.0, s.stall_ms, 100.0 * hidden);
    return n < 0 ? 0 : n;
}

// --- tensor lookups

const gguf_tensor_t *weights_want_tensor(const weights_params_t *p, const char *name, int nd, int64_t w0,
                                         int64_t w1, int64_t w2, bool required, int *rc, char *err,
                                         size_t errlen) {
    const gguf_tensor_t *t = gguf_find_tensor(p->g, name);
    if (!t) {
        if (required) *rc = mlm_fail(err, errlen, MLM_EFORMAT, "%s: tensor %s is missing", gguf_path(p->g), name);
        return NULL;
    }
    const int64_t want[3] = {w0, w1, w2};
    for (int i = 0; i < GGUF_MAX_DIMS; i++) {
        const int64_t w = i < nd ? want[i] : 1;
        if (w >= 0 && t->ne[i] != w) {
            *rc = mlm_fail(err, errlen, MLM_EFORMAT,
                           "tensor %s has shape [%lld, %lld, %lld, %lld], expected dim %d = %lld", name,
                           (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3], i,
                           (long long)w);
            return NULL;
        }
    }
    return t;
}

int weights_tok_embd(const weights_params_t *p, const weights_info_t *info, weights_rows_t *rows,
                     const gguf_tensor_t **t, char *err, size_t errlen) {
    const model_hparams_t *hp = p->hp;
    const shard_slice_t *sl = p->slice;
    *t = NULL;
    if (!info->has_in && !(info->has_out && hp->tied_output)) return 0;
    int rc = 0;
    if (!(*t = weights_want_tensor(p, "token_embd.weight", 2, hp->n_embd, -1, 0, true, &rc, err, errlen))) return rc;
    if (!qtype_traits((*t)->type)->has_kernels)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "token_embd.weight: type %s is not supported",
                        qtype_name((*t)->type));
    if ((*t)->ne[1] != (p->shard_file ? sl->v1 - sl->v0 : hp->n_vocab))
        return mlm_fail(err, errlen, MLM_EFORMAT, "token_embd.weight: row count does not match the slice");
    if (info->has_in) {
        rows->type = (*t)->type;
        rows->cols = hp->n_embd;
        rows->row_bytes = qtype_row_size((*t)->type, hp->n_embd);
        rows->r0 = sl->v0;
        rows->r1 = sl->v1;
        rows->data = (const uint8_t *)(*t)->data + (p->shard_file ? 0 : (size_t)sl->v0 * rows->row_bytes);
    }
    return 0;
}

int weights_rope_freqs(const weights_params_t *p, const gguf_tensor_t **t, char *err, size_t errlen) {
    *t = gguf_find_tensor(p->g, "rope_freqs.weight");
    if (*t && ((*t)->type != QT_F32 || gguf_tensor_nelements(*t) != p->hp->n_rot / 2))
        return mlm_fail(err, errlen, MLM_EFORMAT, "rope_freqs.weight: expected F32 with n_rot/2 elements");
    return 0;
}

int weights_locate(const weights_params_t *p, const char *name, int64_t cols, int64_t full_rows, int planes,
                   weights_loc_t *loc, char *err, size_t errlen) {
    memset(loc, 0, sizeof *loc);
    loc->planes = planes > 1 ? planes : 1;
    shard_tensor_rows(p->slice, name, full_rows, p->hp->head_dim, &loc->r0, &loc->r1);
    if (p->shard_file && loc->r1 == loc->r0) return 0; // a shard file leaves out tensors of which it holds no row
    if (p->shard_file && planes > 1 && p->slice->placed) { // only the slice's own experts are in the file
        loc->held = p->slice;
        if ((planes = shard_expert_count(p->slice, planes)) == 0) return 0;
    }
    int rc = 0;
    loc->t = weights_want_tensor(p, name, planes > 1 || loc->held ? 3 : 2, cols,
                                 p->shard_file ? loc->r1 - loc->r0 : full_rows, planes > 1 || loc->held ? planes : 0,
                                 true, &rc, err, errlen);
    if (!loc->t) return rc;
    loc->skip = p->shard_file ? 0 : loc->r0;
    return 0;
}
