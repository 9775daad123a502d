// The "file" attention/KV device: a paged KV cache (offload/kv_store.h) in RAM up to the device's RAM
// share, then in a file of DIR; attend gathers the layer's rows into one staging buffer and runs
// the host's arithmetic on it, so the outputs are the host device's bits.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"
#include "offload/attn_impl.h"
#include "offload/kv_store.h"
#include "parallel/plan.h"

// --- types

typedef struct {
    attn_params_t p;
    kv_store_t *st;      // the blocks
    attn_calc_t *calc;   // the host's arithmetic
    size_t kvd;          // elements of a k / v row
    size_t row_bytes;    // bytes of a row in the cache type
    uint8_t *kst, *vst;  // (stage_ctx, kvd) one layer's rows gathered for attend
    int stage_ctx;
    uint8_t *ck, *cv;    // (conv_rows, kvd) appended rows in the cache type
    int conv_rows;
    uint64_t ram_cap;    // the RAM share (0 = none)
    double time_ms;      // spent gathering rows (the tiers' reads)
} file_t;

// --- helpers

// Parses "DIR[,ram=SIZE][,block=N][,cache=N]" into the store's parameters; dir is copied into dirbuf.
static int parse_arg(const char *arg, kv_store_params_t *kp, uint64_t *ram, char *dirbuf, size_t cap, char *err,
                     size_t errlen) {
    const char *comma = strchr(arg, ',');
    const size_t dl = comma ? (size_t)(comma - arg) : strlen(arg);
    if (dl == 0 || dl >= cap)
        return mlm_fail(err, errlen, MLM_EINVAL, "attention device file wants file:DIR[,ram=SIZE][,block=N][,cache=N]");
    memcpy(dirbuf, arg, dl);
    dirbuf[dl] = 0;
    for (const char *o = comma; o && *o;) {
        o++;
        const char *next = strchr(o, ',');
        char item[64];
        const size_t il = next ? (size_t)(next - o) : strlen(o);
        if (il >= sizeof item) return mlm_fail(err, errlen, MLM_EINVAL, "attention device file: option too long");
        memcpy(item, o, il);
        item[il] = 0;
        int ok = 0;
        if (!strncmp(item, "ram=", 4)) ok = plan_parse_size(item + 4, ram) == 0;
        else if (!strncmp(item, "block=", 6)) ok = (kp->block_pos = atoi(item + 6)) > 0;
        else if (!strncmp(item, "cache=", 6)) ok = (kp->cache_blocks = atoi(item + 6)) > 0;
        if (!ok) return mlm_fail(err, errlen, MLM_EINVAL, "attention device file: bad option '%s' (ram=SIZE, block=N, cache=N)", item);
        o = next;
    }
    return 0;
}

static int grow(uint8_t **a, uint8_t **b, size_t bytes) {
    uint8_t *na = realloc(*a, bytes + 1);
    if (!na) return MLM_ENOMEM;
    *a = na;
    uint8_t *nb = realloc(*b, bytes + 1);
    if (!nb) return MLM_ENOMEM;
    *b = nb;
    return 0;
}

// --- the device

static int file_seq_new(void *ctx, int seq, int n_ctx) {
    file_t *f = ctx;
    if (n_ctx > f->stage_ctx) {
        if (grow(&f->kst, &f->vst, (size_t)n_ctx * f->row_bytes) != 0) return MLM_ENOMEM;
        f->stage_ctx = n_ctx;
    }
    int rc = attn_calc_reserve(f->calc, n_ctx);
    return rc ? rc : kv_store_seq_new(f->st, seq, n_ctx);
}

static void file_seq_drop(void *ctx, int seq) { kv_store_seq_drop(((file_t *)ctx)->st, seq); }

static int file_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    file_t *f = ctx;
    if (n > f->conv_rows) {
        if (grow(&f->ck, &f->cv, (size_t)n * f->row_bytes) != 0) return MLM_ENOMEM;
        f->conv_rows = n;
    }
    attn_store_rows(f->ck, k, (size_t)n * f->kvd, f->p.kv_type);
    attn_store_rows(f->cv, v, (size_t)n * f->kvd, f->p.kv_type);
    const double t0 = mlm_now_ms();
    int rc = kv_store_write(f->st, seq, layer, pos, f->ck, f->cv, n);
    f->time_ms += mlm_now_ms() - t0;
    return rc;
}

static int file_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    file_t *f = ctx;
    const double t0 = mlm_now_ms();
    int rc = kv_store_read(f->st, seq, layer, 0, pos0 + n, f->kst, f->vst);
    f->time_ms += mlm_now_ms() - t0;
    if (rc != 0) return rc;
    attn_calc_run(f->calc, f->kst, f->vst, q, n, pos0, out);
    return 0;
}

static void file_stats(void *ctx, attn_stats_t *out) {
    const file_t *f = ctx;
    kv_store_stats_t ks;
    kv_store_stats(f->st, &ks);
    out->kv_bytes = ks.bytes_ram + ks.bytes_file;
    out->kv_bytes_ram = ks.bytes_ram; // the read cache and the staging buffer hold copies, not counted
    out->bytes_read = ks.bytes_read;
    out->bytes_written = ks.bytes_written;
    out->time_ms = f->time_ms;
}

static void file_free(void *ctx) {
    file_t *f = ctx;
    if (!f) return;
    kv_store_destroy(&f->st);
    attn_calc_free(&f->calc);
    free(f->kst);
    free(f->vst);
    free(f->ck);
    free(f->cv);
    free(f);
}

static const struct attn_dev_i file_iface = {
    .seq_new = file_seq_new,
    .append = file_append,
    .attend = file_attend,
    .seq_drop = file_seq_drop,
    .stats = file_stats,
    .free = file_free,
};

// --- public API

int attn_file_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen) {
    *out = NULL;
    int rc = attn_params_check(p, err, errlen);
    if (rc != 0) return rc;
    kv_store_params_t kp = {.n_layer = p->n_layer, .n_seq_max = p->n_seq_max};
    char dir[2048];
    uint64_t ram = p->ram_bytes;
    if ((rc = parse_arg(arg ? arg : "", &kp, &ram, dir, sizeof dir, err, errlen)) != 0) return rc;
    file_t *f = calloc(1, sizeof *f);
    if (!f) return MLM_ENOMEM;
    f->p = *p;
    f->kvd = (size_t)(p->kv1 - p->kv0) * (size_t)p->head_dim;
    f->row_bytes = attn_row_bytes(p);
    f->ram_cap = ram;
    kp.row_bytes = f->row_bytes;
    kp.dir = dir;
    // The RAM share holds the read cache and the RAM blocks: the blocks' cap is what the cache leaves
    // of it (1 byte when nothing is left: every block spills). The staging buffer, one layer's rows
    // (2 * n_ctx * row bytes), is working memory outside the share.
    if (ram) {
        const size_t bp = kp.block_pos ? (size_t)kp.block_pos : KV_STORE_BLOCK_POS;
        const uint64_t cache = (uint64_t)(kp.cache_blocks ? kp.cache_blocks : KV_STORE_CACHE_BLOCKS) * 2 * bp * f->row_bytes;
        kp.ram_bytes = ram > cache ? ram - cache : 1;
    }
    f->calc = attn_calc_new(p);
    if (!f->calc || (rc = kv_store_new(&f->st, &kp, err, errlen)) != 0) {
        file_free(f);
        return rc ? rc : MLM_ENOMEM;
    }
    if (!(*out = attn_dev_wrap(&file_iface, f, "file", p))) return MLM_ENOMEM;
    return 0;
}
