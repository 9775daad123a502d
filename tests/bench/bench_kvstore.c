// Benchmark: decode attention at long contexts on the host device and on storage:ENDPOINT (a kvstore): link
// bytes per token beside the KV bytes the attention reads, and time per token, for a model's attention shape.
//
// usage: bench_kvstore MODEL.gguf ENDPOINT [-c 1024,4096] [-n 16] [-t 1]
// The context is filled by appending seeded k/v rows (the prompt's attention, which is the same on both
// devices, is not what is measured), then n decode steps append one row and attend one query in every
// layer, as the forward pass does. Start the kvstore first: meshlm kvstore --listen ENDPOINT --dir DIR.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"
#include "offload/attn.h"
#include "worker/format/gguf.h"
#include "worker/format/hparams.h"
#include "worker/kernels/threadpool.h"
#include "worker/node/attn_storage.h"

// --- helpers

static void fill(float *x, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((int)(seed >> 40 & 0xffff) - 32768) / 32768.0f;
    }
}

typedef struct {
    double ms_per_token;     // wall time of a decode step (every layer)
    double link_per_token;   // bytes to and from the device per step
    double read_per_token;   // KV bytes the attention read per step
    double flash_ms;         // the kvstore's modelled flash time per step
} result_t;

// Fills the context to ctx positions, then n decode steps. 0 or an error.
static int run(const char *dev, const attn_params_t *p, int ctx, int n, result_t *r, float *out_last) {
    char err[512];
    attn_dev_t *d = NULL;
    int rc = attn_dev_new(&d, dev, p, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", dev, err);
        return rc;
    }
    const size_t kvd = (size_t)(p->kv1 - p->kv0) * p->head_dim, qd = (size_t)(p->h1 - p->h0) * p->head_dim;
    const int chunk = 64;
    float *k = malloc((size_t)chunk * kvd * 4), *v = malloc((size_t)chunk * kvd * 4), *q = malloc(qd * 4),
          *out = malloc(qd * 4);
    rc = attn_dev_seq_new(d, 0, ctx + n);
    for (int pos = 0; rc == 0 && pos < ctx; pos += chunk) {
        const int m = pos + chunk <= ctx ? chunk : ctx - pos;
        for (int l = 0; rc == 0 && l < p->n_layer; l++) {
            fill(k, (size_t)m * kvd, (uint64_t)(pos * 131 + l));
            fill(v, (size_t)m * kvd, (uint64_t)(pos * 137 + l + 7));
            rc = attn_dev_append(d, 0, l, pos, k, v, m);
        }
    }
    // one attend of the last layer sends the append a storage device holds back, outside the timing
    fill(q, qd, 5);
    if (rc == 0) rc = attn_dev_attend(d, 0, p->n_layer - 1, q, 1, ctx - 1, out);
    attn_stats_t a, b;
    attn_dev_stats(d, &a);
    const double t0 = mlm_now_ms();
    for (int i = 0; rc == 0 && i < n; i++)
        for (int l = 0; rc == 0 && l < p->n_layer; l++) {
            fill(k, kvd, (uint64_t)(ctx + i) * 31 + l);
            fill(v, kvd, (uint64_t)(ctx + i) * 37 + l);
            fill(q, qd, (uint64_t)(ctx + i) * 41 + l);
            rc = attn_dev_append(d, 0, l, ctx + i, k, v, 1);
            if (rc == 0) rc = attn_dev_attend(d, 0, l, q, 1, ctx + i, out);
        }
    const double ms = mlm_now_ms() - t0;
    attn_dev_stats(d, &b);
    if (rc == 0) {
        r->ms_per_token = ms / n;
        r->link_per_token = (double)(b.bytes_to_dev + b.bytes_from_dev - a.bytes_to_dev - a.bytes_from_dev) / n;
        r->read_per_token = (double)(b.bytes_read - a.bytes_read) / n;
        r->flash_ms = (b.sim_time_ms - a.sim_time_ms) / n;
        memcpy(out_last, out, qd * 4);
    } else {
        fprintf(stderr, "%s: %s\n", dev, mlm_strerror(rc));
    }
    attn_dev_free(&d);
    free(k);
    free(v);
    free(q);
    free(out);
    return rc;
}

// --- main

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_kvstore MODEL.gguf ENDPOINT [-c 1024,4096] [-n 16] [-t 1]\n");
        return 2;
    }
    const char *model = argv[1], *ep = argv[2], *ctxs = "1024,4096";
    int n = 16, threads = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-c")) ctxs = argv[i + 1];
        else if (!strcmp(argv[i], "-n")) n = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) threads = atoi(argv[i + 1]);
    }
    attn_storage_register();
    char err[512];
    gguf_t *g = NULL;
    model_hparams_t hp;
    if (gguf_open(&g, model, err, sizeof err) != 0 || hparams_read(g, &hp, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", model, err);
        return 1;
    }
    gguf_close(&g);
    tpool_t *pool = tpool_new(threads);
    const attn_params_t p = {.n_layer = hp.n_layer, .head_dim = hp.head_dim, .n_head = hp.n_head,
                             .n_head_kv = hp.n_head_kv, .h0 = 0, .h1 = hp.n_head, .kv0 = 0, .kv1 = hp.n_head_kv,
                             .kv_type = QT_F16, .n_seq_max = 1, .pool = pool};
    char dev[600];
    snprintf(dev, sizeof dev, "storage:%s,timeout=60000", ep);
    printf("%s: %d layers, %d heads / %d KV heads of %d, F16 cache; %d decode steps after the context, %d thread(s)\n\n",
           model, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, n, threads);
    printf("| context | link KiB/token | KV read MiB/token (shipping it) | ratio | storage ms/token | flash ms/token (modelled) | host ms/token | same outputs |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    const size_t qd = (size_t)hp.n_head * hp.head_dim;
    float *o1 = malloc(qd * 4), *o2 = malloc(qd * 4);
    int code = 0;
    for (const char *c = ctxs; *c;) {
        const int ctx = atoi(c);
        result_t s = {0}, h = {0};
        if (ctx < 1 || run(dev, &p, ctx, n, &s, o1) != 0 || run("host", &p, ctx, n, &h, o2) != 0) {
            code = 1;
            break;
        }
        printf("| %d | %.1f | %.2f | %.0fx | %.2f | %.2f | %.2f | %s |\n", ctx, s.link_per_token / 1024.0,
               s.read_per_token / 1048576.0, s.read_per_token / s.link_per_token, s.ms_per_token, s.flash_ms,
               h.ms_per_token, memcmp(o1, o2, qd * 4) ? "no" : "yes");
        fflush(stdout);
        const char *comma = strchr(c, ',');
        c = comma ? comma + 1 : c + strlen(c);
    }
    free(o1);
    free(o2);
    tpool_destroy(&pool);
    return code;
}
