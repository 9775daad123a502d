// The HTTP API over libmicrohttpd (a thread per connection): request parsing with cJSON, the
// OpenAI-compatible routes, server-sent events, errors as JSON, metrics and the status page.
#include "coordinator/serve/http.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "core/clock.h"
#include "core/err.h"
#include "coordinator/serve/page.h"
#include "coordinator/serve/request.h"

// --- types

struct serve_http {
    struct MHD_Daemon *d;
    serve_t *s;
    const tokenizer_t *tok;
    serve_http_opts_t o;
    char host[64];
    char model_id[128];
    atomic_uint_fast64_t ids;      // response ids
    atomic_uint_fast64_t http_errors; // 4xx / 5xx answers
};

typedef struct {                   // one connection's request body
    char *body;                    // (len + 1) NUL-terminated
    size_t len, cap;
    bool too_big;
} conn_t;

typedef struct {                   // a streamed answer
    serve_http_t *h;
    serve_req_t *r;
    bool chat;
    bool sent_role, sent_end;
    uint64_t id;
    time_t created;
    char *out;                     // (out_len) formatted events not yet handed to MHD
    size_t out_len, out_off, out_cap;
} stream_t;

// --- responses

static enum MHD_Result answer(struct MHD_Connection *c, unsigned status, const char *type, const char *body) {
    struct MHD_Response *rs = MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!rs) return MHD_NO;
    MHD_add_response_header(rs, "Content-Type", type);
    MHD_add_response_header(rs, "Access-Control-Allow-Origin", "*");
    const enum MHD_Result r = MHD_queue_response(c, status, rs);
    MHD_destroy_response(rs);
    return r;
}

static enum MHD_Result answer_json(struct MHD_Connection *c, unsigned status, cJSON *j) {
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!txt) return answer(c, 500, "application/json", "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\"}}");
    const enum MHD_Result r = answer(c, status, "application/json", txt);
    free(txt);
    return r;
}

// An OpenAI-style error: {"error":{"message","type","param","code"}}.
static enum MHD_Result answer_error(serve_http_t *h, struct MHD_Connection *c, unsigned status, const char *code,
                                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static enum MHD_Result answer_error(serve_http_t *h, struct MHD_Connection *c, unsigned status, const char *code,
                                    const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    atomic_fetch_add(&h->http_errors, 1);
    cJSON *j = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(j, "error");
    cJSON_AddStringToObject(e, "message", msg);
    cJSON_AddStringToObject(e, "type", status >= 500 ? "server_error" : status == 401 ? "authentication_error"
                                       : status == 429 ? "rate_limit_error" : "invalid_request_error");
    cJSON_AddNullToObject(e, "param");
    cJSON_AddStringToObject(e, "code", code);
    return answer_json(c, status, j);
}

static const char *finish_name(serve_finish_t f) {
    return f == SERVE_STOP ? "stop" : f == SERVE_LENGTH ? "length" : f == SERVE_CANCELLED ? "cancelled" : "error";
}

// --- streaming

static int out_put(stream_t *st, const char *s, size_t n) {
    if (st->out_len + n > st->out_cap) {
        size_t nc = st->out_cap ? st->out_cap * 2 : 1024;
        while (nc < st->out_len + n) nc *= 2;
        char *nb = realloc(st->out, nc);
        if (!nb) return -1;
        st->out = nb;
        st->out_cap = nc;
    }
    memcpy(st->out + st->out_len, s, n);
    st->out_len += n;
    return 0;
}

// "data: JSON\n\n" for j (deleted).
static void put_data(stream_t *st, cJSON *j) {
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!txt) return;
    out_put(st, "data: ", 6);
    out_put(st, txt, strlen(txt));
    out_put(st, "\n\n", 2);
    free(txt);
}

// One event: data: {chunk}\n\n with text (NULL: none) and finish (NULL: still going).
static void put_event(stream_t *st, const char *text, size_t len, const char *finish) {
    serve_http_t *h = st->h;
    cJSON *j = cJSON_CreateObject(), *ch = NULL, *c0 = cJSON_CreateObject();
    char id[48];
    snprintf(id, sizeof id, "%s-%llu", st->chat ? "chatcmpl" : "cmpl", (unsigned long long)st->id);
    cJSON_AddStringToObject(j, "id", id);
    cJSON_AddStringToObject(j, "object", st->chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddNumberToObject(j, "created", (double)st->created);
    cJSON_AddStringToObject(j, "model", h->model_id);
    ch = cJSON_AddArrayToObject(j, "choices");
    cJSON_AddItemToArray(ch, c0);
    cJSON_AddNumberToObject(c0, "index", 0);
    char *piece = strndup(text ? text : "", text ? len : 0);
    if (st->chat) {
        cJSON *d = cJSON_AddObjectToObject(c0, "delta");
        if (!st->sent_role) {
            cJSON_AddStringToObject(d, "role", "assistant");
            st->sent_role = true;
        }
        if (text) cJSON_AddStringToObject(d, "content", piece ? piece : "");
    } else {
        cJSON_AddStringToObject(c0, "text", piece ? piece : "");
        cJSON_AddNullToObject(c0, "logprobs");
    }
    free(piece);
    if (finish) cJSON_AddStringToObject(c0, "finish_reason", finish);
    else cJSON_AddNullToObject(c0, "finish_reason");
    put_data(st, j);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream_t *st = cls;
    while (st->out_off == st->out_len) {
        st->out_off = st->out_len = 0;
        if (st->sent_end) return MHD_CONTENT_READER_END_OF_STREAM;
        char text[4096];
        bool done = false;
        const size_t n = serve_req_read(st->r, text, sizeof text, 1000, &done);
        if (n > 0) put_event(st, text, n, NULL);
        if (done) {
            serve_req_info_t info;
            serve_req_info(st->r, &info);
            if (info.finish == SERVE_FAILED) {
                cJSON *j = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(j, "error");
                cJSON_AddStringToObject(e, "message", info.err);
                cJSON_AddStringToObject(e, "type", "server_error");
                put_data(st, j);
            } else {
                put_event(st, NULL, 0, finish_name(info.finish));
            }
            out_put(st, "data: [DONE]\n\n", 14);
            st->sent_end = true;
        }
    }
    size_t n = st->out_len - st->out_off;
    if (n > max) n = max;
    memcpy(buf, st->out + st->out_off, n);
    st->out_off += n;
    return (ssize_t)n;
}

static void stream_free(void *cls) { // the answer ended or the client went away: its sequence is freed
    stream_t *st = cls;
    serve_req_release(&st->r);
    free(st->out);
    free(st);
}

// --- the completion routes

// Is the client still there? (a closed socket reads as end of file)
static bool client_gone(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return false;
    char b;
    const ssize_t r = recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static enum MHD_Result run_request(serve_http_t *h, struct MHD_Connection *c, serve_request_t *q, bool chat) {
    serve_req_t *r = NULL;
    char err[256];
    const int rc = serve_submit(h->s, &q->p, &r, err, sizeof err);
    if (rc == MLM_EFULL) return answer_error(h, c, 429, "queue_full", "%s; try again later", err);
    if (rc == MLM_ESTATE) return answer_error(h, c, 503, "shutting_down", "%s", err);
    if (rc == MLM_ERANGE) return answer_error(h, c, 400, "context_length_exceeded", "%s", err);
    if (rc != 0) return answer_error(h, c, 500, "server_error", "%s", err);
    const uint64_t id = atomic_fetch_add(&h->ids, 1) + 1;
    if (q->stream) {
        stream_t *st = calloc(1, sizeof *st);
        struct MHD_Response *rs = st ? MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 8192, stream_read, st,
                                                                         stream_free) : NULL;
        if (!rs) {
            free(st);
            serve_req_release(&r);
            return answer_error(h, c, 500, "server_error", "out of memory");
        }
        *st = (stream_t){.h = h, .r = r, .chat = chat, .id = id, .created = time(NULL)};
        MHD_add_response_header(rs, "Content-Type", "text/event-stream");
        MHD_add_response_header(rs, "Cache-Control", "no-cache");
        MHD_add_response_header(rs, "Access-Control-Allow-Origin", "*");
        const enum MHD_Result res = MHD_queue_response(c, 200, rs);
        MHD_destroy_response(rs);
        return res;
    }
    // Whole answer: wait, and give the sequence up if the client leaves.
    char *text = NULL;
    size_t len = 0;
    bool done = false;
    while (!done) {
        char buf[4096];
        const size_t n = serve_req_read(r, buf, sizeof buf, 200, &done);
        if (n > 0) {
            char *nb = realloc(text, len + n + 1);
            if (!nb) break;
            text = nb;
            memcpy(text + len, buf, n);
            len += n;
            text[len] = 0;
        }
        if (!done && client_gone(c)) {
            serve_req_release(&r); // cancels: the sequence is freed
            free(text);
            return MHD_NO;
        }
    }
    serve_req_info_t info;
    serve_req_info(r, &info);
    int32_t *ids = malloc(((size_t)info.n_gen + 1) * sizeof *ids);
    const int n_ids = ids ? serve_req_tokens(r, ids, info.n_gen) : 0;
    serve_req_release(&r);
    if (info.finish == SERVE_FAILED) {
        free(text);
        free(ids);
        return answer_error(h, c, 503, "generation_failed", "generation failed: %s", info.err);
    }
    cJSON *j = cJSON_CreateObject(), *ch, *c0 = cJSON_CreateObject();
    char sid[48];
    snprintf(sid, sizeof sid, "%s-%llu", chat ? "chatcmpl" : "cmpl", (unsigned long long)id);
    cJSON_AddStringToObject(j, "id", sid);
    cJSON_AddStringToObject(j, "object", chat ? "chat.completion" : "text_completion");
    cJSON_AddNumberToObject(j, "created", (double)time(NULL));
    cJSON_AddStringToObject(j, "model", h->model_id);
    ch = cJSON_AddArrayToObject(j, "choices");
    cJSON_AddItemToArray(ch, c0);
    cJSON_AddNumberToObject(c0, "index", 0);
    if (chat) {
        cJSON *m = cJSON_AddObjectToObject(c0, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        cJSON_AddStringToObject(m, "content", text ? text : "");
    } else {
        cJSON_AddStringToObject(c0, "text", text ? text : "");
        cJSON_AddNullToObject(c0, "logprobs");
    }
    cJSON_AddStringToObject(c0, "finish_reason", finish_name(info.finish));
    cJSON *u = cJSON_AddObjectToObject(j, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", info.n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", info.n_gen);
    cJSON_AddNumberToObject(u, "total_tokens", info.n_prompt + info.n_gen);
    cJSON *x = cJSON_AddObjectToObject(j, "meshlm"); // ours: the token ids and the timings
    cJSON *arr = cJSON_AddArrayToObject(x, "tokens");
    for (int i = 0; i < n_ids; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids[i]));
    cJSON_AddNumberToObject(x, "queued_ms", info.queued_ms);
    cJSON_AddNumberToObject(x, "ttft_ms", info.ttft_ms);
    cJSON_AddNumberToObject(x, "total_ms", info.total_ms);
    free(text);
    free(ids);
    return answer_json(c, 200, j);
}

static enum MHD_Result do_completion(serve_http_t *h, struct MHD_Connection *c, const conn_t *cn, bool chat) {
    const serve_request_ctx_t ctx = {.tok = h->tok, .model_id = h->model_id, .n_ctx = h->o.n_ctx,
                                     .add_bos = h->o.add_bos, .chat = h->o.chat};
    serve_request_t q;
    if (serve_request_parse(&ctx, cn->body ? cn->body : "", cn->len, chat, &q) != 0)
        return answer_error(h, c, (unsigned)q.status, q.code, "%s", q.msg);
    const enum MHD_Result res = run_request(h, c, &q, chat);
    serve_request_free(&q);
    return res;
}

// --- the other routes

static enum MHD_Result do_models(serve_http_t *h, struct MHD_Connection *c) {
    cJSON *j = cJSON_CreateObject(), *d = cJSON_CreateArray(), *m = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "object", "list");
    cJSON_AddItemToObject(j, "data", d);
    cJSON_AddItemToArray(d, m);
    cJSON_AddStringToObject(m, "id", h->model_id);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "meshlm");
    return answer_json(c, 200, j);
}

static enum MHD_Result do_health(serve_http_t *h, struct MHD_Connection *c) {
    serve_stats_t st;
    serve_stats(h->s, &st);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "status", st.broken ? "error" : "ok");
    if (st.broken) cJSON_AddStringToObject(j, "error", st.last_error);
    cJSON_AddNumberToObject(j, "active", st.active);
    cJSON_AddNumberToObject(j, "queued", st.queued);
    return answer_json(c, st.broken ? 503 : 200, j);
}

typedef struct {                   // a growing text
    char *b;
    size_t len, cap;
} text_t;

static void tprintf(text_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tprintf(text_t *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (t->len + (size_t)n + 1 > t->cap) {
        size_t nc = t->cap ? t->cap * 2 : 4096;
        while (nc < t->len + (size_t)n + 1) nc *= 2;
        char *nb = realloc(t->b, nc);
        if (!nb) return;
        t->b = nb;
        t->cap = nc;
    }
    va_start(ap, fmt);
    vsnprintf(t->b + t->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

static void metric(text_t *t, const char *name, const char *type, const char *help, double v) {
    tprintf(t, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static double jnum(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static enum MHD_Result do_metrics(serve_http_t *h, struct MHD_Connection *c) {
    serve_stats_t st;
    serve_stats(h->s, &st);
    text_t t = {0};
    metric(&t, "meshlm_requests_total", "counter", "Requests accepted.", (double)st.requests);
    metric(&t, "meshlm_requests_rejected_total", "counter", "Requests refused because the queue was full.",
           (double)st.rejected);
    metric(&t, "meshlm_requests_failed_total", "counter", "Requests that failed.", (double)st.failed);
    metric(&t, "meshlm_requests_cancelled_total", "counter", "Requests whose client went away.", (double)st.cancelled);
    metric(&t, "meshlm_http_errors_total", "counter", "Answers with a 4xx or 5xx status.",
           (double)atomic_load(&h->http_errors));
    metric(&t, "meshlm_prompt_tokens_total", "counter", "Prompt tokens evaluated.", (double)st.prompt_tokens);
    metric(&t, "meshlm_generated_tokens_total", "counter", "Tokens generated.", (double)st.gen_tokens);
    metric(&t, "meshlm_tokens_per_second", "gauge", "Tokens generated per second over the last seconds.", st.tok_s);
    metric(&t, "meshlm_queue_length", "gauge", "Requests waiting for a sequence slot.", st.queued);
    metric(&t, "meshlm_sequences_active", "gauge", "Sequences in flight.", st.active);
    metric(&t, "meshlm_sequences_max", "gauge", "Sequences in flight at most (--parallel).", st.parallel);
    metric(&t, "meshlm_steps_total", "counter", "Batched steps.", (double)st.steps);
    metric(&t, "meshlm_step_seconds_total", "counter", "Time spent in steps.", st.step_ms / 1000.0);
    // the cluster's view: faults, recoveries, each node's time per step
    char *view = h->o.status_json ? h->o.status_json(h->o.status_arg) : NULL;
    cJSON *v = view ? cJSON_Parse(view) : NULL;
    free(view);
    if (v) {
        metric(&t, "meshlm_faults_total", "counter", "Workers lost.", jnum(v, "faults"));
        metric(&t, "meshlm_recoveries_total", "counter", "Losses recovered from.", jnum(v, "recovered"));
        tprintf(&t, "# HELP meshlm_node_step_ms Mean time a node spent per step, computing and waiting (ms).\n"
                    "# TYPE meshlm_node_step_ms gauge\n");
        const cJSON *nd;
        cJSON_ArrayForEach(nd, cJSON_GetObjectItemCaseSensitive(v, "nodes")) {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(nd, "id");
            if (cJSON_IsString(id)) tprintf(&t, "meshlm_node_step_ms{node=\"%s\"} %.6g\n", id->valuestring, jnum(nd, "step_ms"));
        }
        cJSON_Delete(v);
    }
    const enum MHD_Result r = t.b ? answer(c, 200, "text/plain; version=0.0.4", t.b) : answer(c, 500, "text/plain", "out of memory\n");
    free(t.b);
    return r;
}

static enum MHD_Result do_status(serve_http_t *h, struct MHD_Connection *c) {
    serve_stats_t st;
    serve_stats(h->s, &st);
    char *view = h->o.status_json ? h->o.status_json(h->o.status_arg) : NULL;
    cJSON *j = view ? cJSON_Parse(view) : NULL;
    free(view);
    if (!j) j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "model", h->model_id);
    cJSON *s = cJSON_AddObjectToObject(j, "server");
    cJSON_AddNumberToObject(s, "requests", (double)st.requests);
    cJSON_AddNumberToObject(s, "rejected", (double)st.rejected);
    cJSON_AddNumberToObject(s, "failed", (double)st.failed);
    cJSON_AddNumberToObject(s, "generated_tokens", (double)st.gen_tokens);
    cJSON_AddNumberToObject(s, "tokens_per_s", st.tok_s);
    cJSON_AddNumberToObject(s, "active", st.active);
    cJSON_AddNumberToObject(s, "queued", st.queued);
    cJSON_AddNumberToObject(s, "parallel", st.parallel);
    cJSON_AddNumberToObject(s, "steps", (double)st.steps);
    cJSON_AddBoolToObject(s, "broken", st.broken);
    return answer_json(c, 200, j);
}

// --- dispatch

static bool authorized(serve_http_t *h, struct MHD_Connection *c) {
    if (!h->o.api_key) return true;
    const char *a = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    return a && !strncmp(a, "Bearer ", 7) && !strcmp(a + 7, h->o.api_key);
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                              const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    serve_http_t *h = cls;
    const bool post = !strcmp(method, "POST");
    if (post) { // gather the body first
        conn_t *cn = *con_cls;
        if (!cn) {
            if (!(cn = calloc(1, sizeof *cn))) return MHD_NO;
            *con_cls = cn;
            return MHD_YES;
        }
        if (*upload_size) {
            if (!cn->too_big && cn->len + *upload_size > h->o.max_body) cn->too_big = true;
            if (!cn->too_big) {
                if (cn->len + *upload_size + 1 > cn->cap) {
                    size_t nc = cn->cap ? cn->cap * 2 : 4096;
                    while (nc < cn->len + *upload_size + 1) nc *= 2;
                    char *nb = realloc(cn->body, nc);
                    if (!nb) return MHD_NO;
                    cn->body = nb;
                    cn->cap = nc;
                }
                memcpy(cn->body + cn->len, upload, *upload_size);
                cn->len += *upload_size;
                cn->body[cn->len] = 0;
            }
            *upload_size = 0;
            return MHD_YES;
        }
    }
    const bool api = !strncmp(url, "/v1/", 4) || !strcmp(url, "/metrics");
    if (api && !authorized(h, c)) return answer_error(h, c, 401, "invalid_api_key", "a valid 'Authorization: Bearer KEY' header is required");
    const bool is_completion = !strcmp(url, "/v1/completions"), is_chat = !strcmp(url, "/v1/chat/completions");
    if (is_completion || is_chat) {
        if (!post) return answer_error(h, c, 405, "method_not_allowed", "%s takes POST", url);
        conn_t *cn = *con_cls;
        if (cn->too_big) return answer_error(h, c, 413, "request_too_large", "the request body is over %zu bytes", h->o.max_body);
        return do_completion(h, c, cn, is_chat);
    }
    if (post) return answer_error(h, c, !strcmp(url, "/v1/models") || !strcmp(url, "/health") ? 405 : 404, "not_found",
                                  "no POST route %s", url);
    if (strcmp(method, "GET") && strcmp(method, "HEAD"))
        return answer_error(h, c, 405, "method_not_allowed", "method %s is not served", method);
    if (!strcmp(url, "/v1/models")) return do_models(h, c);
    if (!strcmp(url, "/health")) return do_health(h, c);
    if (!strcmp(url, "/metrics")) return do_metrics(h, c);
    if (!strcmp(url, "/api/status")) return do_status(h, c);
    if (!strcmp(url, "/") || !strcmp(url, "/index.html")) return answer(c, 200, "text/html; charset=utf-8", serve_page_html());
    return answer_error(h, c, 404, "not_found", "no route %s", url);
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    conn_t *cn = *con_cls;
    if (cn) {
        free(cn->body);
        free(cn);
        *con_cls = NULL;
    }
}

// --- public API

int serve_http_start(serve_http_t **out, serve_t *s, const tokenizer_t *tok, const serve_http_opts_t *o, char *err,
                     size_t errlen) {
    *out = NULL;
    serve_http_t *h = calloc(1, sizeof *h);
    if (!h) return MLM_ENOMEM;
    h->s = s;
    h->tok = tok;
    h->o = *o;
    if (!h->o.max_body) h->o.max_body = (size_t)1 << 20;
    if (!h->o.max_connections) h->o.max_connections = 256;
    snprintf(h->host, sizeof h->host, "%s", o->host && *o->host ? o->host : "127.0.0.1");
    if (!strcmp(h->host, "localhost")) snprintf(h->host, sizeof h->host, "127.0.0.1");
    snprintf(h->model_id, sizeof h->model_id, "%s", o->model_id ? o->model_id : "meshlm");
    h->o.model_id = h->model_id;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o->port)};
    if (inet_pton(AF_INET, h->host, &sa.sin_addr) != 1) {
        free(h);
        return mlm_fail(err, errlen, MLM_EINVAL, "--host %s: not an IPv4 address", o->host);
    }
    h->d = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG,
                            (uint16_t)o->port, NULL, NULL, handle, h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)h->o.max_connections,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600, MHD_OPTION_NOTIFY_COMPLETED, completed, h,
                            MHD_OPTION_END);
    if (!h->d) {
        free(h);
        return mlm_fail(err, errlen, MLM_EIO, "cannot listen on %s:%d (in use, or not an address of this machine)",
                        o->host ? o->host : "127.0.0.1", o->port);
    }
    *out = h;
    return 0;
}

int serve_http_port(const serve_http_t *h) {
    const union MHD_DaemonInfo *i = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    return i ? i->port : 0;
}

void serve_http_stop(serve_http_t **self_p) {
    if (!self_p || !*self_p) return;
    MHD_stop_daemon((*self_p)->d);
    free(*self_p);
    *self_p = NULL;
}
