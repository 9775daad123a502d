// Request bodies of the completion routes: JSON (cJSON) validated field by field into a generation request.
#include "coordinator/serve/request.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

// --- internals

static int refuse(serve_request_t *r, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int refuse(serve_request_t *r, int status, const char *code, const char *fmt, ...) {
    free(r->tokens);
    r->tokens = NULL;
    r->status = status;
    snprintf(r->code, sizeof r->code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->msg, sizeof r->msg, fmt, ap);
    va_end(ap);
    return -1;
}

// A number field: absent (or null) leaves *out; present must be a number in [lo, hi]. 0 or -1 (refused).
static int num_field(serve_request_t *r, const cJSON *j, const char *name, double lo, double hi, double *out) {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, name);
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsNumber(f) || isnan(f->valuedouble) || f->valuedouble < lo || f->valuedouble > hi)
        return refuse(r, 400, "invalid_request", "'%s' must be a number from %g to %g", name, lo, hi);
    *out = f->valuedouble;
    return 0;
}

static int bool_field(serve_request_t *r, const cJSON *j, const char *name, bool *out) {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, name);
    if (!f || cJSON_IsNull(f)) return 0;
    if (!cJSON_IsBool(f)) return refuse(r, 400, "invalid_request", "'%s' must be true or false", name);
    *out = cJSON_IsTrue(f);
    return 0;
}

// Sampling, max_tokens (default def_max), stop, stream and ignore_eos, shared by both routes.
static int common_fields(const serve_request_ctx_t *ctx, serve_request_t *r, const cJSON *j, int def_max) {
    serve_req_params_t *p = &r->p;
    p->sp = sampler_params_default();
    double v = def_max;
    if (num_field(r, j, "max_tokens", -1e18, 1e18, &v) || num_field(r, j, "max_completion_tokens", -1e18, 1e18, &v))
        return -1;
    if (v != floor(v) || v < 1 || v > ctx->n_ctx)
        return refuse(r, 400, "invalid_request", "'max_tokens' must be an integer from 1 to %d (the context), not %g",
                      ctx->n_ctx, v);
    p->n_predict = (int)v;
    double t = p->sp.temp, tp = p->sp.top_p, mp = p->sp.min_p, tk = p->sp.top_k, seed = -1, rp = p->sp.repeat_penalty;
    if (num_field(r, j, "temperature", 0, 2, &t) || num_field(r, j, "top_p", 0, 1, &tp) ||
        num_field(r, j, "min_p", 0, 1, &mp) || num_field(r, j, "top_k", 0, 1e9, &tk) ||
        num_field(r, j, "seed", 0, 1.8e19, &seed) || num_field(r, j, "repeat_penalty", 0, 10, &rp))
        return -1;
    p->sp.temp = (float)t;
    p->sp.greedy = t == 0;
    p->sp.top_p = (float)tp;
    p->sp.min_p = (float)mp;
    p->sp.top_k = (int)tk;
    p->sp.repeat_penalty = (float)rp;
    if (seed >= 0) p->sp.seed = (uint64_t)seed;
    double n = 1;
    if (num_field(r, j, "n", 1, 1, &n)) return refuse(r, 400, "invalid_request", "'n' must be 1 (one choice per request)");
    if (bool_field(r, j, "stream", &r->stream) || bool_field(r, j, "ignore_eos", &p->ignore_eos)) return -1;
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(j, "stop");
    int ns = 0;
    if (cJSON_IsString(stop)) {
        if (strlen(stop->valuestring) >= SERVE_STOP_LEN) ns = -1;
        else if (stop->valuestring[0]) snprintf(p->stop[ns++], SERVE_STOP_LEN, "%s", stop->valuestring);
    } else if (cJSON_IsArray(stop)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, stop) {
            if (!cJSON_IsString(e) || ns == SERVE_MAX_STOPS - 1 || strlen(e->valuestring) >= SERVE_STOP_LEN) {
                ns = -1;
                break;
            }
            if (e->valuestring[0]) snprintf(p->stop[ns++], SERVE_STOP_LEN, "%s", e->valuestring);
        }
    } else if (stop && !cJSON_IsNull(stop)) {
        ns = -1;
    }
    if (ns < 0)
        return refuse(r, 400, "invalid_request", "'stop' must be a string or up to %d strings of under %d bytes",
                      SERVE_MAX_STOPS - 1, SERVE_STOP_LEN);
    return 0;
}

// Tokenizes text into r->tokens: 0 or -1 (refused).
static int tokenize(const serve_request_ctx_t *ctx, serve_request_t *r, const char *text, bool add_bos, bool special) {
    const size_t len = strlen(text);
    const size_t cap = (size_t)ctx->n_ctx * 4 + 8; // more tokens than this cannot fit anyway
    const int room = (int)(len + 8 < cap ? len + 8 : cap);
    r->tokens = malloc((size_t)room * sizeof *r->tokens);
    if (!r->tokens) return refuse(r, 500, "server_error", "out of memory for the prompt");
    const int n = tokenizer_encode(ctx->tok, text, len, add_bos, special, r->tokens, room);
    if (n > room || n == MLM_ERANGE)
        return refuse(r, 400, "context_length_exceeded", "the prompt is longer than the context of %d positions",
                      ctx->n_ctx);
    if (n < 0) return refuse(r, 400, "invalid_prompt", "cannot tokenize the prompt: %s", mlm_strerror(n));
    if (n == 0) return refuse(r, 400, "invalid_prompt", "the prompt is empty");
    r->p.prompt = r->tokens;
    r->p.n_prompt = n;
    return 0;
}

// The chat's messages rendered through the template and tokenized.
static int chat_prompt(const serve_request_ctx_t *ctx, serve_request_t *r, const cJSON *j) {
    const cJSON *ms = cJSON_GetObjectItemCaseSensitive(j, "messages");
    const int n = cJSON_IsArray(ms) ? cJSON_GetArraySize(ms) : 0;
    if (n < 1 || n > 1024) return refuse(r, 400, "invalid_messages", "'messages' must be an array of 1 to 1024 messages");
    chat_msg_t *m = calloc((size_t)n, sizeof *m);
    if (!m) return refuse(r, 500, "server_error", "out of memory");
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, ms) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(e, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        m[i].role = cJSON_IsString(role) ? role->valuestring : NULL;
        m[i].content = cJSON_IsString(content) ? content->valuestring : NULL;
        i++;
    }
    char why[256];
    char *text = chat_render(ctx->chat, m, n, why, sizeof why);
    free(m);
    if (!text) return refuse(r, 400, "invalid_messages", "%s", why);
    const int rc = tokenize(ctx, r, text, false, true);
    free(text);
    return rc;
}

// --- public API

int serve_request_parse(const serve_request_ctx_t *ctx, const char *body, size_t len, bool chat, serve_request_t *r) {
    memset(r, 0, sizeof *r);
    cJSON *j = cJSON_ParseWithLength(body, len);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return refuse(r, 400, "invalid_json", "the request body must be a JSON object");
    }
    int rc = 0;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    if (model && !cJSON_IsNull(model) && !cJSON_IsString(model)) {
        rc = refuse(r, 400, "invalid_model", "'model' must be a string");
    } else if (cJSON_IsString(model) && strcmp(model->valuestring, ctx->model_id) != 0) {
        rc = refuse(r, 404, "model_not_found", "the model '%.200s' does not exist (this server has '%s')",
                    model->valuestring, ctx->model_id);
    } else if (chat) {
        rc = chat_prompt(ctx, r, j);
    } else {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prompt");
        if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 && cJSON_IsString(cJSON_GetArrayItem(p, 0)))
            p = cJSON_GetArrayItem(p, 0);
        rc = cJSON_IsString(p) ? tokenize(ctx, r, p->valuestring, ctx->add_bos, false)
                               : refuse(r, 400, "invalid_prompt", "'prompt' must be a string (or an array of one string)");
    }
    const int room = ctx->n_ctx - r->p.n_prompt;
    if (rc == 0 && room < 1)
        rc = refuse(r, 400, "context_length_exceeded",
                    "the prompt (%d tokens) does not leave room in the context of %d positions", r->p.n_prompt,
                    ctx->n_ctx);
    // default max_tokens: 16 for completions (OpenAI's), the rest of the context for a chat
    if (rc == 0) rc = common_fields(ctx, r, j, chat ? room : (room < 16 ? room : 16));
    if (rc == 0 && (int64_t)r->p.n_prompt + r->p.n_predict > ctx->n_ctx)
        rc = refuse(r, 400, "context_length_exceeded",
                    "the prompt (%d tokens) and max_tokens (%d) exceed the context of %d positions", r->p.n_prompt,
                    r->p.n_predict, ctx->n_ctx);
    if (rc == 0 && chat) { // the template's end of turn ends the answer, unless the vocabulary ends it itself
        const char *st = chat_stop_text(ctx->chat);
        const int32_t id = tokenizer_find(ctx->tok, st, strlen(st));
        if (id < 0 || !tokenizer_is_eog(ctx->tok, id)) snprintf(r->p.stop[SERVE_MAX_STOPS - 1], SERVE_STOP_LEN, "%s", st);
    }
    cJSON_Delete(j);
    return rc;
}

void serve_request_free(serve_request_t *r) {
    free(r->tokens);
    r->tokens = NULL;
}
