// Continuous batching over a serve engine: one thread admits queued requests into free sequence slots
// and steps every sequence in flight together (a prompt chunk or one generated token each).
#include "coordinator/serve/sched.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/err.h"

// --- types

struct serve_req {
    struct serve *s;            // the scheduler (outlives its requests: serve_destroy comes after the last release)
    pthread_cond_t news;        // its reader: text or the end
    int refs;                   // the caller's and the scheduler's
    serve_req_params_t p;       // p.prompt points at prompt
    int32_t *prompt;            // (n_prompt) owned copy
    int32_t *gen;               // (n_predict) generated ids
    int n_gen;
    int fed;                    // prompt tokens evaluated
    int32_t last;               // the token to feed next (decode)
    int seq;                    // sequence slot, -1 while queued
    sampler_t *smp;
    tok_stream_t ts;
    char *text;                 // (text_cap) generated text; [0, visible) may be read
    size_t text_len, text_cap, visible, read;
    serve_finish_t finish;
    bool cancel;
    double t_submit, t_admit, t_first, t_end; // ms
    char err[256];
    serve_req_t *next;          // in the queue
};

struct serve {
    serve_engine_t *eng;
    const tokenizer_t *tok;
    serve_opts_t o;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work;        // the scheduler: a request came or one was cancelled
    bool stopping;
    serve_req_t *head, *tail;   // queue
    int queued;
    serve_req_t *slot[SERVE_MAX_SEQS]; // (o.parallel) requests in flight
    float *logits;              // (o.parallel, n_vocab)
    serve_stats_t st;
    double rate_t[64];          // (64) ring of (time ms, tokens generated so far) samples, one per step
    uint64_t rate_n[64];
    int rate_i;
    char *status;               // the engine's latest snapshot (JSON text), or NULL
    double status_ms;           // when it was taken
    double idle_ms;             // when the engine's idle hook last ran
};

// --- internals

static void req_unref(serve_req_t *r) { // under the lock, or when no one else holds r
    if (--r->refs > 0) return;
    pthread_cond_destroy(&r->news);
    sampler_destroy(&r->smp);
    free(r->prompt);
    free(r->gen);
    free(r->text);
    free(r);
}

static int text_append(serve_req_t *r, const char *s, size_t n) {
    if (r->text_len + n + 1 > r->text_cap) {
        size_t nc = r->text_cap ? r->text_cap * 2 : 256;
        while (nc < r->text_len + n + 1) nc *= 2;
        char *nb = realloc(r->text, nc);
        if (!nb) return MLM_ENOMEM;
        r->text = nb;
        r->text_cap = nc;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = 0;
    return 0;
}

// After new text: ends the request at a stop string, or shows all text but a tail that could still
// become one.
static void check_stops(serve_req_t *r) {
    size_t hold = 0;
    for (int i = 0; i < SERVE_MAX_STOPS; i++) {
        const char *st = r->p.stop[i];
        const size_t sl = strlen(st);
        if (!sl) continue;
        const char *hit = strstr(r->text + (r->visible > sl ? r->visible - sl : 0), st);
        if (hit) {
            r->text_len = (size_t)(hit - r->text);
            r->text[r->text_len] = 0;
            r->visible = r->text_len;
            r->finish = SERVE_STOP;
            return;
        }
        for (size_t k = sl - 1; k > hold; k--) // the longest tail that is a prefix of st
            if (k <= r->text_len && memcmp(r->text + r->text_len - k, st, k) == 0) {
                hold = k;
                break;
            }
    }
    r->visible = r->text_len - hold;
}

static void finish(serve_t *s, serve_req_t *r, serve_finish_t why) {
    if (r->finish == SERVE_RUNNING || why == SERVE_FAILED || why == SERVE_CANCELLED) r->finish = why;
    char piece[32];
    const int n = tokenizer_stream_flush(s->tok, &r->ts, piece, sizeof piece);
    if (n > 0 && r->finish != SERVE_STOP) text_append(r, piece, (size_t)n);
    if (r->finish != SERVE_STOP) r->visible = r->text_len;
    r->t_end = mlm_now_ms();
    pthread_cond_signal(&r->news);
    if (r->finish == SERVE_FAILED) s->st.failed++;
    if (r->finish == SERVE_CANCELLED) s->st.cancelled++;
}

// Takes the sampled token t of request r; true when r has ended.
static bool take_token(serve_t *s, serve_req_t *r, int32_t t) {
    sampler_accept(r->smp, t);
    r->gen[r->n_gen++] = t;
    s->st.gen_tokens++;
    if (r->n_gen == 1) r->t_first = mlm_now_ms();
    const bool eog = tokenizer_is_eog(s->tok, t);
    if (!eog) {
        char piece[512];
        const int n = tokenizer_stream_push(s->tok, &r->ts, t, piece, sizeof piece);
        if (n > 0 && text_append(r, piece, (size_t)n) != 0) {
            snprintf(r->err, sizeof r->err, "out of memory for the generated text");
            finish(s, r, SERVE_FAILED);
            return true;
        }
        check_stops(r);
        if (r->finish == SERVE_STOP) {
            finish(s, r, SERVE_STOP);
            return true;
        }
    }
    if (eog && !r->p.ignore_eos) {
        finish(s, r, SERVE_STOP);
        return true;
    }
    if (r->n_gen == r->p.n_predict) {
        finish(s, r, SERVE_LENGTH);
        return true;
    }
    r->last = t;
    return false;
}

static void release_slot(serve_t *s, int i) {
    serve_req_t *r = s->slot[i];
    s->slot[i] = NULL;
    s->st.active--;
    s->eng->drop(s->eng->ctx, i);
    req_unref(r);
}

// Takes the engine's snapshot (from the stepping thread, outside the lock) when the last is old.
static void take_snapshot(serve_t *s, bool force) {
    if (!s->eng->snapshot || (!force && mlm_now_ms() - s->status_ms < 250)) return;
    char *txt = s->eng->snapshot(s->eng->ctx);
    pthread_mutex_lock(&s->mu);
    free(s->status);
    s->status = txt;
    s->status_ms = mlm_now_ms();
    pthread_mutex_unlock(&s->mu);
}

static void *sched_main(void *arg) {
    serve_t *s = arg;
    const int P = s->o.parallel, nv = s->eng->n_vocab;
    take_snapshot(s, true);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        // cancelled requests leave their slots
        for (int i = 0; i < P; i++)
            if (s->slot[i] && s->slot[i]->cancel) {
                finish(s, s->slot[i], SERVE_CANCELLED);
                release_slot(s, i);
            }
        // admit queued requests into free slots
        for (int i = 0; i < P && s->head; i++) {
            if (s->slot[i]) continue;
            serve_req_t *r = s->head;
            s->head = r->next;
            if (!s->head) s->tail = NULL;
            s->queued--;
            if (r->cancel) { // cancelled while queued
                finish(s, r, SERVE_CANCELLED);
                req_unref(r);
                i--;
                continue;
            }
            r->seq = i;
            r->t_admit = mlm_now_ms();
            s->slot[i] = r;
            s->st.active++;
        }
        if (s->stopping) break;
        if (s->st.active == 0) { // idle: wake now and then to refresh the snapshot (heartbeat ages)
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 500 * 1000000L;
            ts.tv_sec += ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            if (pthread_cond_timedwait(&s->work, &s->mu, &ts) != 0 && !s->stopping && !s->head) {
                pthread_mutex_unlock(&s->mu);
                if (s->eng->idle && mlm_now_ms() - s->idle_ms >= 1000) {
                    s->eng->idle(s->eng->ctx);
                    s->idle_ms = mlm_now_ms();
                }
                take_snapshot(s, false);
                pthread_mutex_lock(&s->mu);
            }
            continue;
        }
        int seqs[SERVE_MAX_SEQS], n[SERVE_MAX_SEQS], k = 0;
        const int32_t *tk[SERVE_MAX_SEQS];
        float *lg[SERVE_MAX_SEQS];
        serve_req_t *who[SERVE_MAX_SEQS];
        for (int i = 0; i < P; i++) {
            serve_req_t *r = s->slot[i];
            if (!r) continue;
            seqs[k] = i;
            who[k] = r;
            lg[k] = s->logits + (size_t)k * nv;
            if (r->fed < r->p.n_prompt) {
                tk[k] = r->prompt + r->fed;
                n[k] = r->p.n_prompt - r->fed < s->eng->n_batch ? r->p.n_prompt - r->fed : s->eng->n_batch;
            } else {
                tk[k] = &r->last;
                n[k] = 1;
            }
            k++;
        }
        pthread_mutex_unlock(&s->mu);
        char err[256] = "";
        const double t0 = mlm_now_ms();
        const int rc = s->eng->step(s->eng->ctx, k, seqs, tk, n, lg, err, sizeof err);
        const double dt = mlm_now_ms() - t0;
        take_snapshot(s, rc != 0);
        pthread_mutex_lock(&s->mu);
        s->st.steps++;
        s->st.step_ms += dt;
        s->rate_t[s->rate_i % 64] = mlm_now_ms();
        s->rate_n[s->rate_i % 64] = s->st.gen_tokens; // before this step's tokens: counted at the next sample
        s->rate_i++;
        for (int j = 0; j < k; j++) {
            serve_req_t *r = who[j];
            if (rc != 0) {
                snprintf(r->err, sizeof r->err, "%s", err[0] ? err : mlm_strerror(rc));
                finish(s, r, SERVE_FAILED);
                release_slot(s, seqs[j]);
                continue;
            }
            bool ended;
            if (r->fed < r->p.n_prompt) {
                r->fed += n[j];
                s->st.prompt_tokens += (uint64_t)n[j];
                if (r->fed < r->p.n_prompt) continue;
            }
            if (r->cancel) continue; // left at the top of the loop
            ended = take_token(s, r, sampler_sample(r->smp, lg[j]));
            if (r->visible > r->read) pthread_cond_signal(&r->news);
            if (ended) release_slot(s, seqs[j]);
        }
        if (rc != 0) {
            s->st.broken = true;
            snprintf(s->st.last_error, sizeof s->st.last_error, "%s", err[0] ? err : mlm_strerror(rc));
        }
    }
    // shutting down: everything still here fails
    for (int i = 0; i < P; i++)
        if (s->slot[i]) {
            snprintf(s->slot[i]->err, sizeof s->slot[i]->err, "server shutting down");
            finish(s, s->slot[i], SERVE_FAILED);
            release_slot(s, i);
        }
    while (s->head) {
        serve_req_t *r = s->head;
        s->head = r->next;
        snprintf(r->err, sizeof r->err, "server shutting down");
        finish(s, r, SERVE_FAILED);
        req_unref(r);
    }
    s->tail = NULL;
    s->queued = 0;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

// --- public API

int serve_new(serve_t **out, serve_engine_t *eng, const tokenizer_t *tok, const serve_opts_t *o, char *err,
              size_t errlen) {
    *out = NULL;
    if (o->parallel < 1 || o->parallel > eng->max_seqs)
        return mlm_fail(err, errlen, MLM_EINVAL, "--parallel %d is outside 1..%d", o->parallel, eng->max_seqs);
    if (o->queue_max < 0) return mlm_fail(err, errlen, MLM_EINVAL, "--queue %d is negative", o->queue_max);
    serve_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    s->eng = eng;
    s->tok = tok;
    s->o = *o;
    s->st.parallel = o->parallel;
    s->st.queue_max = o->queue_max;
    s->logits = malloc((size_t)o->parallel * (size_t)eng->n_vocab * sizeof(float));
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    if (!s->logits || pthread_create(&s->thread, NULL, sched_main, s) != 0) {
        free(s->logits);
        free(s);
        return mlm_fail(err, errlen, MLM_ENOMEM, "cannot start the scheduler");
    }
    *out = s;
    return 0;
}

void serve_destroy(serve_t **self_p) {
    if (!self_p || !*self_p) return;
    serve_t *s = *self_p;
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work);
    free(s->logits);
    free(s->status);
    free(s);
    *self_p = NULL;
}

int serve_submit(serve_t *s, const serve_req_params_t *p, serve_req_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (p->n_prompt < 1 || p->n_predict < 1) return mlm_fail(err, errlen, MLM_EINVAL, "empty prompt or no tokens to make");
    if ((int64_t)p->n_prompt + p->n_predict > s->eng->n_ctx)
        return mlm_fail(err, errlen, MLM_ERANGE,
                        "the prompt (%d tokens) and max_tokens (%d) exceed the context of %d positions", p->n_prompt,
                        p->n_predict, s->eng->n_ctx);
    serve_req_t *r = calloc(1, sizeof *r);
    if (!r) return MLM_ENOMEM;
    pthread_cond_init(&r->news, NULL);
    r->p = *p;
    r->prompt = malloc((size_t)p->n_prompt * sizeof *r->prompt);
    r->gen = malloc((size_t)p->n_predict * sizeof *r->gen);
    r->smp = sampler_new(&p->sp, s->eng->n_vocab);
    if (!r->prompt || !r->gen || !r->smp || text_append(r, "", 0) != 0) {
        r->refs = 1;
        req_unref(r);
        return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory for a request");
    }
    memcpy(r->prompt, p->prompt, (size_t)p->n_prompt * sizeof *r->prompt);
    r->p.prompt = r->prompt;
    for (int i = 0; i < p->n_prompt; i++) sampler_accept(r->smp, p->prompt[i]);
    r->seq = -1;
    r->s = s;
    r->refs = 2;
    r->t_submit = mlm_now_ms();
    pthread_mutex_lock(&s->mu);
    const int free_slots = s->o.parallel - s->st.active;
    if (s->stopping || (s->queued >= s->o.queue_max + (free_slots > 0 ? free_slots : 0))) {
        const bool stopping = s->stopping;
        s->st.rejected++;
        pthread_mutex_unlock(&s->mu);
        r->refs = 1;
        req_unref(r);
        return stopping ? mlm_fail(err, errlen, MLM_ESTATE, "the server is shutting down")
                        : mlm_fail(err, errlen, MLM_EFULL, "the queue is full (%d waiting)", s->o.queue_max);
    }
    if (s->tail) s->tail->next = r;
    else s->head = r;
    s->tail = r;
    s->queued++;
    s->st.requests++;
    pthread_cond_signal(&s->work);
    pthread_mutex_unlock(&s->mu);
    *out = r;
    return 0;
}

size_t serve_req_read(serve_req_t *r, char *buf, size_t cap, int timeout_ms, bool *done) {
    serve_t *s = r->s;
    pthread_mutex_lock(&s->mu);
    const double until = mlm_now_ms() + timeout_ms;
    while (r->read == r->visible && r->finish == SERVE_RUNNING) {
        const double left = until - mlm_now_ms();
        if (left <= 0) break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        const long ns = ts.tv_nsec + (long)(left * 1e6);
        ts.tv_sec += ns / 1000000000L;
        ts.tv_nsec = ns % 1000000000L;
        pthread_cond_timedwait(&r->news, &s->mu, &ts);
    }
    size_t n = r->visible - r->read;
    if (n > cap) n = cap;
    memcpy(buf, r->text + r->read, n);
    r->read += n;
    *done = r->finish != SERVE_RUNNING && r->read == r->visible;
    pthread_mutex_unlock(&s->mu);
    return n;
}

void serve_req_info(serve_req_t *r, serve_req_info_t *out) {
    serve_t *s = r->s;
    pthread_mutex_lock(&s->mu);
    const double now = mlm_now_ms();
    *out = (serve_req_info_t){.n_prompt = r->p.n_prompt, .n_gen = r->n_gen, .finish = r->finish};
    out->queued_ms = (r->seq >= 0 || r->t_admit > 0 ? r->t_admit : now) - r->t_submit;
    out->ttft_ms = r->t_first > 0 ? r->t_first - r->t_submit : 0;
    out->total_ms = (r->t_end > 0 ? r->t_end : now) - r->t_submit;
    snprintf(out->err, sizeof out->err, "%s", r->err);
    pthread_mutex_unlock(&s->mu);
}

int serve_req_tokens(serve_req_t *r, int32_t *ids, int cap) {
    serve_t *s = r->s;
    pthread_mutex_lock(&s->mu);
    const int n = r->n_gen < cap ? r->n_gen : cap;
    memcpy(ids, r->gen, (size_t)n * sizeof *ids);
    pthread_mutex_unlock(&s->mu);
    return n;
}

void serve_req_cancel(serve_req_t *r) {
    serve_t *s = r->s;
    pthread_mutex_lock(&s->mu);
    if (r->finish == SERVE_RUNNING) {
        r->cancel = true;
        pthread_cond_signal(&s->work);
    }
    pthread_mutex_unlock(&s->mu);
}

void serve_req_release(serve_req_t **rp) {
    if (!rp || !*rp) return;
    serve_req_t *r = *rp;
    serve_t *s = r->s;
    pthread_mutex_lock(&s->mu);
    if (r->finish == SERVE_RUNNING) {
        r->cancel = true;
        pthread_cond_signal(&s->work);
    }
    req_unref(r);
    pthread_mutex_unlock(&s->mu);
    *rp = NULL;
}

void serve_stats(serve_t *s, serve_stats_t *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    out->queued = s->queued;
    // the rate over the samples of the last 5 s (and up to now: an idle server falls to 0)
    const double now = mlm_now_ms();
    out->tok_s = 0;
    for (int k = 1; k <= 64 && k <= s->rate_i; k++) {
        const int i = (s->rate_i - k) % 64;
        if (now - s->rate_t[i] > 5000) break;
        if (now - s->rate_t[i] > 200) out->tok_s = (double)(s->st.gen_tokens - s->rate_n[i]) * 1000.0 / (now - s->rate_t[i]);
    }
    pthread_mutex_unlock(&s->mu);
}

char *serve_status(serve_t *s) {
    pthread_mutex_lock(&s->mu);
    char *txt = s->status ? strdup(s->status) : NULL;
    pthread_mutex_unlock(&s->mu);
    return txt;
}
