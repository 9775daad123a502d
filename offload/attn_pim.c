// The "pim:PRESET" attention/KV device: the host device computes the values (so they are its bits)
// while a DRAM-bank PIM timing model (offload/pim_sim.h) runs the same GEMVs, q.K^T and p.V per
// query row and head, over the KV as it would lie in the part, and counts simulated time and energy.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "offload/attn_impl.h"
#include "offload/pim_sim.h"

// --- types

typedef struct {
    attn_params_t p;
    attn_dev_t *host;    // the values (owned)
    pim_sim_t *sim;      // the timing
    pim_config_t cfg;
    int group;           // query heads per KV head
    int n_kvh;           // KV heads here
    size_t row_bytes;    // bytes of a k (or v) row: KV heads * head_dim * elt
    int64_t rows_head;   // bank rows one (layer, KV head) of K takes at the longest n_ctx
    int n_ctx_max;
    uint64_t kv_bytes;   // KV the part holds now (capacity check)
} pim_t;

// --- the device

static int pim_seq_new(void *ctx, int seq, int n_ctx) {
    pim_t *d = ctx;
    const uint64_t need = 2ull * (uint64_t)d->p.n_layer * (uint64_t)n_ctx * d->row_bytes;
    if (d->kv_bytes + need > d->cfg.capacity) return MLM_EFULL;
    int rc = attn_dev_seq_new(d->host, seq, n_ctx);
    if (rc != 0) return rc;
    d->kv_bytes += need;
    if (n_ctx > d->n_ctx_max) { // sequences share the layout's rows: the longest sizes it
        d->n_ctx_max = n_ctx;
        d->rows_head = pim_sim_rows(d->sim, n_ctx);
    }
    return 0;
}

static void pim_seq_drop(void *ctx, int seq) {
    pim_t *d = ctx;
    // the wrapper drops only live sequences; their size was counted at seq_new
    attn_stats_t before, after;
    attn_dev_stats(d->host, &before);
    attn_dev_seq_drop(d->host, seq);
    attn_dev_stats(d->host, &after);
    d->kv_bytes -= before.kv_bytes - after.kv_bytes;
}

static int pim_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    pim_t *d = ctx;
    int rc = attn_dev_append(d->host, seq, layer, pos, k, v, n);
    if (rc == 0) pim_sim_write(d->sim, 2ull * (uint64_t)n * d->row_bytes);
    return rc;
}

static int pim_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    pim_t *d = ctx;
    int rc = attn_dev_attend(d->host, seq, layer, q, n, pos0, out);
    if (rc != 0) return rc;
    // K of (layer, KV head) at rows [2 * idx * rows_head, ...), its V right after
    for (int i = 0; i < n; i++)
        for (int h = d->p.h0; h < d->p.h1; h++) {
            const int kvh = h / d->group - d->p.kv0;
            const int64_t base = 2 * ((int64_t)layer * d->n_kvh + kvh) * d->rows_head;
            pim_sim_pass(d->sim, 0, pos0 + i + 1, base);
            pim_sim_pass(d->sim, 1, pos0 + i + 1, base + d->rows_head);
        }
    return 0;
}

static void pim_stats(void *ctx, attn_stats_t *out) {
    const pim_t *d = ctx;
    attn_stats_t hs;
    attn_dev_stats(d->host, &hs);
    pim_sim_stats_t ss;
    pim_sim_stats(d->sim, &ss);
    out->kv_bytes = hs.kv_bytes;
    out->kv_bytes_ram = hs.kv_bytes_ram; // the simulated part's contents live in this process
    out->bytes_to_dev = ss.n.io_bytes;
    out->sim_time_ms = ss.time_ms;
    out->sim_energy_mj = ss.energy_mj;
}

static void pim_free(void *ctx) {
    pim_t *d = ctx;
    if (!d) return;
    attn_dev_free(&d->host);
    pim_sim_free(&d->sim);
    free(d);
}

static const struct attn_dev_i pim_iface = {
    .seq_new = pim_seq_new,
    .append = pim_append,
    .attend = pim_attend,
    .seq_drop = pim_seq_drop,
    .stats = pim_stats,
    .free = pim_free,
};

// --- public API

int attn_pim_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen) {
    *out = NULL;
    int rc = attn_params_check(p, err, errlen);
    if (rc != 0) return rc;
    if (p->kv_type == QT_Q8_0) // the timing model lays out whole elements of 2 or 4 bytes
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "attention device pim: simulates an F16 or F32 KV cache, not Q8_0");
    pim_config_t cfg;
    if (pim_preset(arg && *arg ? arg : "hbm2-pim", &cfg) != 0)
        return mlm_fail(err, errlen, MLM_ENOTFOUND, "attention device pim: no preset '%s' (have: %s)", arg,
                        pim_preset_names());
    pim_t *d = calloc(1, sizeof *d);
    if (!d) return MLM_ENOMEM;
    d->p = *p;
    d->cfg = cfg;
    d->group = p->n_head / p->n_head_kv;
    d->n_kvh = p->kv1 - p->kv0;
    const int elt = p->kv_type == QT_F16 ? 2 : 4;
    d->row_bytes = (size_t)d->n_kvh * (size_t)p->head_dim * (size_t)elt;
    d->sim = pim_sim_new(&cfg, p->head_dim, elt);
    if (!d->sim || (rc = attn_host_new(&d->host, p, "", err, errlen)) != 0) {
        pim_free(d);
        return rc ? rc : MLM_ENOMEM;
    }
    char name[48];
    snprintf(name, sizeof name, "pim:%s", cfg.name);
    if (!(*out = attn_dev_wrap(&pim_iface, d, name, p))) return MLM_ENOMEM;
    return 0;
}
