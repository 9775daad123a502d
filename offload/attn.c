// Attention/KV devices: the registry and the checking wrapper.
#include "offload/attn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/names.h"
#include "offload/attn_impl.h"

typedef struct {
    int n_ctx;       // capacity; 0 = not allocated
    int *len;        // (n_layer) positions appended per layer
} seq_state_t;

struct attn_dev {
    const struct attn_dev_i *iface;
    void *ctx;
    attn_params_t p;
    char name[32];
    seq_state_t *seqs;   // (n_seq_max)
    int *lens;           // (n_seq_max, n_layer) backing the seqs' len
    attn_stats_t counts; // appended, attended, seqs
};

// --- registry

static mlm_names_t devices = MLM_NAMES_INIT(3, {"host", (mlm_name_fn)attn_host_new}, {"file", (mlm_name_fn)attn_file_new},
                                             {"pim", (mlm_name_fn)attn_pim_new});

int attn_dev_register(const char *name, attn_dev_new_fn make) { return mlm_names_add(&devices, name, (mlm_name_fn)make); }

// The constructor registered as the first len bytes of name, or NULL.
static attn_dev_new_fn find_maker(const char *name, size_t len) {
    return (attn_dev_new_fn)mlm_names_find(&devices, name, len);
}

int attn_dev_new(attn_dev_t **out, const char *name, const attn_params_t *p, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    if (!p) return mlm_fail(err, errlen, MLM_EINVAL, "attention device: missing parameters");
    int rc = attn_params_check(p, err, errlen);
    if (rc != 0) return rc;
    if (!name || !*name) name = "host";
    const char *colon = strchr(name, ':');
    const size_t len = colon ? (size_t)(colon - name) : strlen(name);
    const attn_dev_new_fn make = find_maker(name, len);
    if (make) return make(out, p, colon ? colon + 1 : "", err, errlen);
    return mlm_fail(err, errlen, MLM_ENOTFOUND, "no attention device '%.*s' (have: %s)", (int)len, name,
                    attn_dev_names());
}

int attn_dev_known(const char *name, char *err, size_t errlen) {
    if (!name || !*name) return 0;
    const char *colon = strchr(name, ':');
    const size_t len = colon ? (size_t)(colon - name) : strlen(name);
    if (find_maker(name, len)) return 0;
    return mlm_fail(err, errlen, MLM_ENOTFOUND, "no attention device '%.*s' (have: %s)", (int)len, name,
                    attn_dev_names());
}

const char *attn_dev_names(void) { return mlm_names_list(&devices); }

int attn_params_check(const attn_params_t *p, char *err, size_t errlen) {
    if (p->n_layer < 1 || p->head_dim < 1 || p->n_head < 1 || p->n_head_kv < 1 || p->n_head % p->n_head_kv != 0 ||
        p->n_seq_max < 0)
        return mlm_fail(err, errlen, MLM_EINVAL, "attention device: bad shape (%d layers, %d heads / %d KV heads of %d)",
                        p->n_layer, p->n_head, p->n_head_kv, p->head_dim);
    if (p->h0 < 0 || p->h1 > p->n_head || p->h1 <= p->h0 || p->kv0 < 0 || p->kv1 > p->n_head_kv || p->kv1 <= p->kv0)
        return mlm_fail(err, errlen, MLM_EINVAL, "attention device: heads [%d, %d) / KV heads [%d, %d) outside the model",
                        p->h0, p->h1, p->kv0, p->kv1);
    const int group = p->n_head / p->n_head_kv;
    if (p->h0 / group < p->kv0 || (p->h1 - 1) / group >= p->kv1)
        return mlm_fail(err, errlen, MLM_EINVAL, "attention device: heads [%d, %d) read KV heads outside [%d, %d)",
                        p->h0, p->h1, p->kv0, p->kv1);
    if (p->kv_type != QT_F16 && p->kv_type != QT_F32 && p->kv_type != QT_Q8_0)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "attention device: KV cache type %s (F16, F32 or Q8_0)",
                        qtype_name(p->kv_type));
    if (p->kv_type == QT_Q8_0 && p->head_dim % 32 != 0)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED,
                        "attention device: a Q8_0 KV cache needs head_dim a multiple of 32 (blocks of 32), not %d",
                        p->head_dim);
    return 0;
}

attn_dev_t *attn_dev_wrap(const struct attn_dev_i *iface, void *ctx, const char *name, const attn_params_t *p) {
    attn_dev_t *d = calloc(1, sizeof *d);
    const int ns = p->n_seq_max > 0 ? p->n_seq_max : 1;
    if (d) {
        d->seqs = calloc((size_t)ns, sizeof *d->seqs);
        d->lens = calloc((size_t)ns * (size_t)p->n_layer, sizeof *d->lens);
    }
    if (!d || !d->seqs || !d->lens) {
        if (d) free(d->seqs), free(d->lens), free(d);
        if (iface->free) iface->free(ctx);
        return NULL;
    }
    d->iface = iface;
    d->ctx = ctx;
    d->p = *p;
    d->p.n_seq_max = ns;
    for (int s = 0; s < ns; s++) d->seqs[s].len = d->lens + (size_t)s * (size_t)p->n_layer;
    snprintf(d->name, sizeof d->name, "%s", name);
    return d;
}

void attn_dev_free(attn_dev_t **self_p) {
    if (!self_p || !*self_p) return;
    attn_dev_t *d = *self_p;
    for (int s = 0; s < d->p.n_seq_max; s++) attn_dev_seq_drop(d, s);
    if (d->iface->free) d->iface->free(d->ctx);
    free(d->seqs);
    free(d->lens);
    free(d);
    *self_p = NULL;
}

const char *attn_dev_name(const attn_dev_t *d) { return d->name; }

// --- sequences

// The allocated sequence seq with a valid layer, or NULL with *rc set.
static seq_state_t *seq_at(attn_dev_t *d, int seq, int layer, int *rc) {
    if (!d || seq < 0 || seq >= d->p.n_seq_max || layer < 0 || layer >= d->p.n_layer) {
        *rc = MLM_EINVAL;
        return NULL;
    }
    if (d->seqs[seq].n_ctx == 0) {
        *rc = MLM_ESTATE;
        return NULL;
    }
    return &d->seqs[seq];
}

int attn_dev_seq_new(attn_dev_t *d, int seq, int n_ctx) {
    if (!d || seq < 0 || seq >= d->p.n_seq_max || n_ctx < 1) return MLM_EINVAL;
    seq_state_t *s = &d->seqs[seq];
    if (s->n_ctx != 0) return MLM_ESTATE;
    int rc = d->iface->seq_new(d->ctx, seq, n_ctx);
    if (rc != 0) return rc;
    s->n_ctx = n_ctx;
    memset(s->len, 0, (size_t)d->p.n_layer * sizeof *s->len);
    d->counts.seqs++;
    return 0;
}

int attn_dev_append(attn_dev_t *d, int seq, int layer, int pos, const float *k, const float *v, int n) {
    int rc = 0;
    seq_state_t *s = seq_at(d, seq, layer, &rc);
    if (!s) return rc;
    if (n < 1 || pos < 0 || pos > s->len[layer] || !k || !v) return MLM_EINVAL;
    if (pos + n > s->n_ctx) return MLM_ERANGE;
    rc = d->iface->append(d->ctx, seq, layer, pos, k, v, n);
    if (rc != 0) return rc;
    s->len[layer] = pos + n;
    d->counts.appended += (uint64_t)n;
    return 0;
}

int attn_dev_attend(attn_dev_t *d, int seq, int layer, const float *q, int n, int pos0, float *out) {
    int rc = 0;
    seq_state_t *s = seq_at(d, seq, layer, &rc);
    if (!s) return rc;
    if (n < 1 || pos0 < 0 || !q || !out) return MLM_EINVAL;
    if (pos0 + n > s->len[layer]) return MLM_ERANGE;
    rc = d->iface->attend(d->ctx, seq, layer, q, n, pos0, out);
    if (rc != 0) return rc;
    d->counts.attended += (uint64_t)n;
    return 0;
}

int attn_dev_seq_len(const attn_dev_t *d, int seq, int layer) {
    if (!d || seq < 0 || seq >= d->p.n_seq_max || layer < 0 || layer >= d->p.n_layer) return 0;
    return d->seqs[seq].n_ctx ? d->seqs[seq].len[layer] : 0;
}

void attn_dev_seq_drop(attn_dev_t *d, int seq) {
    if (!d || seq < 0 || seq >= d->p.n_seq_max || d->seqs[seq].n_ctx == 0) return;
    if (d->iface->seq_drop) d->iface->seq_drop(d->ctx, seq);
    d->seqs[seq].n_ctx = 0;
    d->counts.seqs--;
}

// "12.0 MiB" style sizes.
static void fmt_mib(char *b, size_t cap, uint64_t bytes) {
    if (bytes >= (1ull << 30)) snprintf(b, cap, "%.2f GiB", (double)bytes / (1ull << 30));
    else if (bytes >= (1ull << 20)) snprintf(b, cap, "%.1f MiB", (double)bytes / (1ull << 20));
    else snprintf(b, cap, "%.1f KiB", (double)bytes / 1024);
}

int attn_dev_describe(const attn_dev_t *d, char *buf, size_t cap) {
    if (!d) return snprintf(buf, cap, "no attention device");
    attn_stats_t st;
    attn_dev_stats(d, &st);
    char kv[32], ram[32], rd[32], wr[32];
    fmt_mib(kv, sizeof kv, st.kv_bytes);
    fmt_mib(ram, sizeof ram, st.kv_bytes_ram);
    fmt_mib(rd, sizeof rd, st.bytes_read);
    fmt_mib(wr, sizeof wr, st.bytes_written);
    int n = snprintf(buf, cap, "KV device %s: KV %s (%s in RAM)", d->name, kv, ram);
    if (!strcmp(d->name, "storage")) { // across a link: what crossed it, and the kvstore's reads
        char to[32], from[32];
        fmt_mib(to, sizeof to, st.bytes_to_dev);
        fmt_mib(from, sizeof from, st.bytes_from_dev);
        n += snprintf(buf + (n < (int)cap ? n : (int)cap), n < (int)cap ? cap - (size_t)n : 0,
                      ", link %s sent %s received, %.1f ms waiting on it; its attention read %s", to, from,
                      st.time_ms, rd);
        if (st.sim_time_ms > 0)
            n += snprintf(buf + (n < (int)cap ? n : (int)cap), n < (int)cap ? cap - (size_t)n : 0,
                          " (MODELLED flash reads: %.3f ms at the kvstore's --internal-bw)", st.sim_time_ms);
        return n;
    }
    if (st.bytes_read || st.bytes_written)
        n += snprintf(buf + (n < (int)cap ? n : (int)cap), n < (int)cap ? cap - (size_t)n : 0,
                      ", spilled tier read %s written %s, %.1f ms on tiers", rd, wr, st.time_ms);
    if (st.sim_time_ms > 0 || st.sim_energy_mj > 0)
        n += snprintf(buf + (n < (int)cap ? n : (int)cap), n < (int)cap ? cap - (size_t)n : 0,
                      "; SIMULATED attention (timing model, not measured): %.3f ms, %.4f mJ over %llu query rows",
                      st.sim_time_ms, st.sim_energy_mj, (unsigned long long)st.attended);
    return n;
}

bool attn_dev_pages(const char *name) {
    if (!name) return false;
    return (!strncmp(name, "file", 4) && (!name[4] || name[4] == ':')) ||
           (!strncmp(name, "storage", 7) && (!name[7] || name[7] == ':')); // all of it in a kvstore
}

void attn_dev_stats(const attn_dev_t *d, attn_stats_t *out) {
    memset(out, 0, sizeof *out);
    if (!d) return;
    if (d->iface->stats) d->iface->stats(d->ctx, out);
    out->appended = d->counts.appended;
    out->attended = d->counts.attended;
    out->seqs = d->counts.seqs;
}
