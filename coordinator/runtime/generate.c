// The generation loop: evaluate the prompt, then sample and feed one token at a time.
#include "coordinator/runtime/generate.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/runtime/cluster.h"
#include "core/clock.h"
#include "core/err.h"
#include "worker/model/model.h"
#include "worker/text/tokenizer.h"

// --- helpers

static int append(char **buf, size_t *len, size_t *cap, const char *s, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t nc = (*cap ? *cap * 2 : 256);
        while (nc < *len + n + 1) nc *= 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return MLM_ENOMEM;
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = 0;
    return 0;
}

static int write_rows(const gen_opts_t *o, const float *rows, size_t n_floats, char *err, size_t errlen) {
    errno = 0;
    if (fwrite(rows, sizeof(float), n_floats, o->logits_out) != n_floats)
        return mlm_fail(err, errlen, MLM_EIO, "%s: cannot write logits: %s", o->logits_path ? o->logits_path : "logits",
                        errno ? strerror(errno) : "short write");
    return 0;
}

static int model_eval_fn(void *ctx, const int32_t *t, int n, float *logits, bool all) {
    return model_eval(ctx, t, n, logits, all);
}
static void model_reset_fn(void *ctx) { model_ctx_reset(ctx); }
static int cluster_eval_fn(void *ctx, const int32_t *t, int n, float *logits, bool all) {
    return cluster_eval(ctx, t, n, logits, all);
}
static void cluster_reset_fn(void *ctx) { cluster_reset(ctx); }

// --- public API

gen_engine_t gen_engine_model(struct model_ctx *ctx, int n_vocab) {
    return (gen_engine_t){ctx, n_vocab, model_eval_fn, model_reset_fn};
}

gen_engine_t gen_engine_cluster(struct cluster *cl, int n_vocab) {
    return (gen_engine_t){cl, n_vocab, cluster_eval_fn, cluster_reset_fn};
}

int gen_run(const gen_engine_t *eng, const struct tokenizer *tok, const int32_t *prompt_tokens, int n_prompt,
            const gen_opts_t *o, gen_result_t *res, char *err, size_t errlen) {
    memset(res, 0, sizeof *res);
    if (n_prompt <= 0) return mlm_fail(err, errlen, MLM_EINVAL, "empty prompt: nothing to evaluate");
    const int nv = eng->n_vocab;
    const bool all = o->logits_out != NULL;
    float *logits = malloc((size_t)(all ? n_prompt : 1) * (size_t)nv * sizeof(float)); // (rows, n_vocab)
    res->tokens = malloc(((size_t)(o->n_predict > 0 ? o->n_predict : 0) + 1) * sizeof(int32_t));
    sampler_t *smp = sampler_new(&o->sp, nv);
    size_t text_cap = 0;
    int rc = 0;
    if (!logits || !res->tokens || !smp || append(&res->text, &res->text_len, &text_cap, "", 0) != 0) {
        rc = mlm_fail(err, errlen, MLM_ENOMEM, "out of memory for %d logit rows", all ? n_prompt : 1);
        goto out;
    }
    for (int i = 0; i < n_prompt; i++) sampler_accept(smp, prompt_tokens[i]);
    double t0 = mlm_now_ms();
    rc = eng->eval(eng->ctx, prompt_tokens, n_prompt, logits, all);
    res->prompt_ms = mlm_now_ms() - t0;
    if (rc != 0) {
        mlm_fail(err, errlen, rc, "prompt evaluation failed: %s", mlm_strerror(rc));
        goto out;
    }
    if (all && (rc = write_rows(o, logits, (size_t)n_prompt * nv, err, errlen)) != 0) goto out;
    const float *last = logits + (all ? (size_t)(n_prompt - 1) * nv : 0);
    tok_stream_t ts = {0};
    char piece[256];
    double g0 = mlm_now_ms();
    for (int i = 0; i < o->n_predict; i++) {
        int32_t t = sampler_sample(smp, last);
        sampler_accept(smp, t);
        res->tokens[res->n_tokens++] = t;
        bool eog = tokenizer_is_eog(tok, t);
        if (!eog) {
            int n = tokenizer_stream_push(tok, &ts, t, piece, sizeof piece);
            if (n > 0) {
                if (o->stream) {
                    fwrite(piece, 1, (size_t)n, o->stream);
                    fflush(o->stream);
                }
                if ((rc = append(&res->text, &res->text_len, &text_cap, piece, (size_t)n)) != 0) goto out;
            }
        }
        bool stop = (eog && !o->ignore_eos) || i + 1 == o->n_predict;
        if (stop && !all) break;
        // Feed the token (for --logits also the last one, so every generated token has its row).
        rc = eng->eval(eng->ctx, &t, 1, logits, false);
        if (rc != 0) {
            mlm_fail(err, errlen, rc, "evaluation of generated token %d failed: %s", i, mlm_strerror(rc));
            goto out;
        }
        res->n_gen_evals++;
        last = logits;
        if (all && (rc = write_rows(o, logits, (size_t)nv, err, errlen)) != 0) goto out;
        if (stop) break;
    }
    {
        int n = tokenizer_stream_flush(tok, &ts, piece, sizeof piece);
        if (n > 0) {
            if (o->stream) fwrite(piece, 1, (size_t)n, o->stream);
            if ((rc = append(&res->text, &res->text_len, &text_cap, piece, (size_t)n)) != 0) goto out;
        }
    }
    res->gen_ms = mlm_now_ms() - g0;
out:
    free(logits);
    sampler_destroy(&smp);
    if (rc != 0) gen_result_free(res);
    return rc;
}

void gen_result_free(gen_result_t *r) {
    free(r->tokens);
    free(r->text);
    r->tokens = NULL;
    r->text = NULL;
    r->n_tokens = 0;
    r->text_len = 0;
}
