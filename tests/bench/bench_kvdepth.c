// Benchmark: decode tokens/s of the whole model at a deep context (1k .. 32k) on one attention/KV device.
//
// usage: bench_kvdepth MODEL.gguf -d DEVICE -c CTX [-p PREFILL] [-n DECODE] [-t THREADS] [--kv-ram-frac F]
//   DEVICE: host, file:DIR, storage:ENDPOINT, pim:PRESET (as --kv-device). --kv-ram-frac F (file only): the
//   node gets the --mem-budget whose RAM share of the KV (model_kv_ram_share) is F of the KV at CTX + DECODE
//   positions, loaded the way `meshlm run --mem-budget B --kv-device file:DIR` loads it.
//
// What is measured, exactly. A real prefill of PREFILL tokens (default 256) runs through the forward pass
// into the device. The device's positions [PREFILL, CTX) are then filled by appending that prefill's own k
// and v rows again, repeated (position i holds the rows of position i mod PREFILL, every layer), straight
// to the device: a prefill of CTX tokens (about 100 TFLOP at 32k on TinyLlama) is out of reach on a shared
// 2-core machine. Then DECODE tokens (default 4, greedy) run through the whole forward pass; a bench-only
// wrapper device shifts the model's positions by CTX - PREFILL, so every layer appends its new row at CTX + i
// and attends over all CTX + i + 1 positions of the device, exactly the work of a decode step at depth
// CTX (the rotary angles of the new q and k are those of position PREFILL + i: the same cost; the tokens
// produced are not meaningful and are not compared across devices). Reported per configuration: the fill
// time (not a decode time), decode tok/s (wall time of the DECODE steps), the median and the fastest
// step's wall time, this process's CPU time per step (all threads; a kvstore's is its own), the device's
// KV bytes (all, in RAM), per decode token the bytes read from a slower tier (file), the bytes on the link
// (storage) and the simulated attention time (pim: a timing model, not measured), and the process's peak
// RSS (VmHWM; it includes the recorded prefill rows, PREFILL x layers x 2 x kv_dim floats, freed before
// the decode) and its RSS at the end.
// One JSON line on stdout.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "core/clock.h"
#include "core/err.h"
#include "offload/attn.h"
#include "offload/attn_impl.h"
#include "worker/model/model.h"
#include "worker/node/attn_storage.h"

// --- the bench-only shifting wrapper device

// The bench's handle on the wrapper: filled by the bench before attn_dev_new, ctx written back by it.
typedef struct shift_cfg shift_cfg_t;

typedef struct {
    attn_dev_t *inner;   // the measured device (owned)
    shift_cfg_t *cfg;    // the bench's handle (borrowed)
    int n_layer;         // layers
    size_t kvd;          // floats per k or v row
    float *rec_k;        // (n_layer, n_rec, kvd) k rows of the real prefill
    float *rec_v;        // (n_layer, n_rec, kvd) v rows
    int n_rec;           // positions recorded
    int shift;           // added to the model's positions once the fill is done
} shift_dev_t;

struct shift_cfg {
    const char *inner;   // device spec of the measured device
    int capacity;        // positions its sequence is made with (CTX + DECODE)
    int n_rec;           // prefill positions to record
    shift_dev_t *dev;    // set by the constructor
};

static int sh_seq_new(void *ctx, int seq, int n_ctx) {
    shift_dev_t *s = ctx;
    (void)n_ctx;
    return attn_dev_seq_new(s->inner, seq, s->cfg->capacity);
}

static int sh_append(void *ctx, int seq, int layer, int pos, const float *k, const float *v, int n) {
    shift_dev_t *s = ctx;
    for (int i = 0; i < n && pos + i < s->n_rec; i++) {
        memcpy(s->rec_k + ((size_t)layer * s->n_rec + pos + i) * s->kvd, k + (size_t)i * s->kvd, s->kvd * 4);
        memcpy(s->rec_v + ((size_t)layer * s->n_rec + pos + i) * s->kvd, v + (size_t)i * s->kvd, s->kvd * 4);
    }
    return attn_dev_append(s->inner, seq, layer, pos + s->shift, k, v, n);
}

static int sh_attend(void *ctx, int seq, int layer, const float *q, int n, int pos0, float *out) {
    shift_dev_t *s = ctx;
    return attn_dev_attend(s->inner, seq, layer, q, n, pos0 + s->shift, out);
}

static void sh_seq_drop(void *ctx, int seq) { attn_dev_seq_drop(((shift_dev_t *)ctx)->inner, seq); }

static void sh_stats(void *ctx, attn_stats_t *out) { attn_dev_stats(((shift_dev_t *)ctx)->inner, out); }

static void sh_free(void *ctx) {
    shift_dev_t *s = ctx;
    attn_dev_free(&s->inner);
    free(s->rec_k);
    free(s->rec_v);
    free(s);
}

static const struct attn_dev_i shift_iface = {sh_seq_new, sh_append, sh_attend, sh_seq_drop, sh_stats, sh_free};

// "shift:<address of a shift_cfg_t>": the bench passes its handle through the device argument.
static int shift_new(attn_dev_t **out, const attn_params_t *p, const char *arg, char *err, size_t errlen) {
    shift_cfg_t *cfg = NULL;
    if (sscanf(arg, "%p", (void **)&cfg) != 1 || !cfg) return mlm_fail(err, errlen, MLM_EINVAL, "shift: no handle");
    shift_dev_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    s->cfg = cfg;
    s->n_layer = p->n_layer;
    s->kvd = (size_t)(p->kv1 - p->kv0) * p->head_dim;
    s->n_rec = cfg->n_rec;
    s->rec_k = malloc((size_t)p->n_layer * s->n_rec * s->kvd * 4);
    s->rec_v = malloc((size_t)p->n_layer * s->n_rec * s->kvd * 4);
    int rc = s->rec_k && s->rec_v ? attn_dev_new(&s->inner, cfg->inner, p, err, errlen) : MLM_ENOMEM;
    if (rc == 0 && !(*out = attn_dev_wrap(&shift_iface, s, "shift", p))) return MLM_ENOMEM; // s freed by the wrap
    if (rc != 0) {
        sh_free(s);
        return rc;
    }
    cfg->dev = s;
    return 0;
}

// Fills the inner device's positions [n_rec, ctx) of sequence 0 with the recorded rows repeated, then frees
// the recording and shifts the model's positions to ctx. 0 or the device's error.
static int shift_fill(shift_dev_t *s, int ctx) {
    int rc = 0;
    for (int pos = s->n_rec; rc == 0 && pos < ctx;) {
        const int src = pos % s->n_rec, m = ctx - pos < s->n_rec - src ? ctx - pos : s->n_rec - src;
        for (int l = 0; rc == 0 && l < s->n_layer; l++)
            rc = attn_dev_append(s->inner, 0, l, pos, s->rec_k + ((size_t)l * s->n_rec + src) * s->kvd,
                                 s->rec_v + ((size_t)l * s->n_rec + src) * s->kvd, m);
        pos += m;
    }
    free(s->rec_k);
    free(s->rec_v);
    s->rec_k = s->rec_v = NULL;
    s->n_rec = 0;
    s->shift = ctx - s->cfg->n_rec;
    return rc;
}

// --- helpers

// A /proc/self/status field in bytes ("VmHWM:"), 0 when absent.
static uint64_t status_bytes(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t v = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) v = strtoull(line + strlen(key), NULL, 10) * 1024;
    if (f) fclose(f);
    return v;
}

// CPU time of this process (user + system, every thread), ms.
static double cpu_ms(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

// --- main

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : NULL, *dev = "host";
    int ctx = 1024, n_pre = 256, n_dec = 4, threads = 2;
    double frac = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-d")) dev = argv[i + 1];
        else if (!strcmp(argv[i], "-c")) ctx = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-p")) n_pre = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-n")) n_dec = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--kv-ram-frac")) frac = atof(argv[i + 1]);
        else path = NULL;
    }
    if (!path || ctx < 2 || n_pre < 1 || n_pre > ctx || n_dec < 1 || threads < 1 || frac < 0 || frac > 1) {
        fprintf(stderr, "usage: bench_kvdepth MODEL.gguf -d DEVICE -c CTX [-p PREFILL] [-n DECODE] [-t THREADS] "
                        "[--kv-ram-frac F]\n");
        return 2;
    }
    attn_storage_register();
    if (attn_dev_register("shift", shift_new) != 0) return 1;
    char err[1024];
    model_t *m = NULL;
    model_load_opts_t lo = {.n_ctx = 1};
    int rc = model_load(&m, path, &lo, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", path, err);
        return 1;
    }
    const model_hparams_t *hp = model_hparams(m);
    const int cap = ctx + n_dec;
    const uint64_t kv_total = (uint64_t)cap * hp->n_layer * 2 * hp->n_head_kv * hp->head_dim * 2; // F16 cache
    uint64_t budget = 0, kv_ram = 0;
    if (frac > 0) {
        // the budget whose RAM share of the KV is frac of it: share(B) = B - (weights + activations)
        const uint64_t big = 1ull << 40, fixed = big - model_kv_ram_share(m, big);
        kv_ram = (uint64_t)((double)kv_total * frac);
        budget = fixed + kv_ram;
        model_destroy(&m);
        lo.mem_budget = budget; // as meshlm run loads a paging device's node: the budget plans the weights
        if ((rc = model_load(&m, path, &lo, err, sizeof err)) != 0) {
            fprintf(stderr, "%s: %s\n", path, err);
            return 1;
        }
        kv_ram = model_kv_ram_share(m, budget);
    }
    char spec[64];
    shift_cfg_t cfg = {.inner = dev, .capacity = cap, .n_rec = n_pre};
    snprintf(spec, sizeof spec, "shift:%p", (void *)&cfg);
    model_ctx_t *c = NULL;
    const model_ctx_opts_t co = {.n_ctx = n_pre + n_dec, .n_batch = 64, .n_threads = threads, .attn_dev = spec,
                                 .kv_ram = kv_ram};
    if ((rc = model_ctx_new(&c, m, &co, err, sizeof err)) != 0) {
        fprintf(stderr, "%s: %s\n", dev, err);
        model_destroy(&m);
        return 1;
    }
    int32_t *toks = malloc(sizeof *toks * (size_t)n_pre);   // (n_pre) prompt token ids
    float *logits = malloc(sizeof *logits * (size_t)hp->n_vocab); // (n_vocab)
    for (int i = 0; i < n_pre; i++) toks[i] = i == 0 ? 1 : 3 + (int32_t)((i * 7919u) % (unsigned)(hp->n_vocab - 3));
    const double t0 = mlm_now_ms();
    rc = model_eval(c, toks, n_pre, logits, false);
    const double t1 = mlm_now_ms();
    if (rc == 0) rc = shift_fill(cfg.dev, ctx);
    const double t2 = mlm_now_ms();
    attn_dev_t *d = model_ctx_attn(c);
    attn_stats_t a, b;
    attn_dev_stats(d, &a);
    int tok = argmax(logits, hp->n_vocab);
    double *step = calloc((size_t)n_dec, sizeof *step); // (n_dec) ms of each decode step
    const double t3 = mlm_now_ms(), c3 = cpu_ms();
    for (int i = 0; rc == 0 && step && i < n_dec; i++) {
        const double s0 = mlm_now_ms();
        rc = model_eval(c, &tok, 1, logits, false);
        tok = argmax(logits, hp->n_vocab);
        step[i] = mlm_now_ms() - s0;
    }
    const double dec_ms = mlm_now_ms() - t3, dec_cpu = cpu_ms() - c3;
    if (!step) rc = MLM_ENOMEM;
    else qsort(step, (size_t)n_dec, sizeof *step, cmp_double);
    attn_dev_stats(d, &b);
    if (rc != 0) {
        fprintf(stderr, "%s at %d: %s\n", dev, ctx, mlm_strerror(rc));
    } else {
        printf("{\"device\": \"%s\", \"ctx\": %d, \"prefill\": %d, \"decode\": %d, \"threads\": %d, "
               "\"mem_budget\": %llu, \"kv_ram_share\": %llu, \"prefill_s\": %.2f, \"fill_s\": %.2f, "
               "\"decode_tok_s\": %.4f, \"decode_ms_per_token\": %.2f, \"median_ms_per_token\": %.2f, \"min_ms_per_token\": %.2f, \"cpu_ms_per_token\": %.2f, \"kv_bytes\": %llu, \"kv_bytes_ram\": %llu, "
               "\"read_per_token\": %.0f, \"written_per_token\": %.0f, \"link_per_token\": %.0f, "
               "\"sim_ms_per_token\": %.4f, \"tier_ms_per_token\": %.2f, \"vmhwm\": %llu, \"vmrss\": %llu, "
               "\"last_token\": %d}\n",
               dev, ctx, n_pre, n_dec, threads, (unsigned long long)budget, (unsigned long long)kv_ram,
               (t1 - t0) / 1e3, (t2 - t1) / 1e3, n_dec * 1e3 / dec_ms, dec_ms / n_dec,
               n_dec % 2 ? step[n_dec / 2] : (step[n_dec / 2 - 1] + step[n_dec / 2]) / 2, step[0], dec_cpu / n_dec,
               (unsigned long long)b.kv_bytes, (unsigned long long)b.kv_bytes_ram,
               (double)(b.bytes_read - a.bytes_read) / n_dec, (double)(b.bytes_written - a.bytes_written) / n_dec,
               (double)(b.bytes_to_dev + b.bytes_from_dev - a.bytes_to_dev - a.bytes_from_dev) / n_dec,
               (b.sim_time_ms - a.sim_time_ms) / n_dec, (b.time_ms - a.time_ms) / n_dec,
               (unsigned long long)status_bytes("VmHWM:"), (unsigned long long)status_bytes("VmRSS:"), tok);
    }
    free(step);
    free(toks);
    free(logits);
    model_ctx_destroy(&c);
    model_destroy(&m);
    return rc == 0 ? 0 : 1;
}
