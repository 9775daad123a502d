// The HTTP API: OpenAI-compatible completions and chat completions (streamed as server-sent events),
// models, health, Prometheus metrics and the status page, over libmicrohttpd.
#ifndef MESHLM_SERVE_HTTP_H
#define MESHLM_SERVE_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "coordinator/serve/chat.h"
#include "coordinator/serve/sched.h"
#include "worker/text/tokenizer.h"

typedef struct serve_http serve_http_t;

typedef struct {
    const char *host;         // IPv4 address to bind (NULL = 127.0.0.1)
    int port;                 // 0 = a free port (serve_http_port tells which)
    const char *api_key;      // requests must carry "Authorization: Bearer KEY" (NULL = none)
    const char *model_id;     // the model's name in /v1/models and responses
    size_t max_body;          // largest request body (0 = 1 MiB)
    int n_ctx;                // positions per sequence: max_tokens + the prompt must fit
    bool add_bos;             // completions start with BOS (as `meshlm run`)
    chat_template_t chat;     // template for /v1/chat/completions
    int max_connections;      // open connections at most (0 = 256)
    // The status page's and /metrics' view of the cluster: a JSON object text made by status_json
    // (called from request threads; may be NULL), owned by the caller.
    char *(*status_json)(void *arg);
    void *status_arg;
} serve_http_opts_t;

// Starts serving in threads of its own. s and tok are borrowed until serve_http_stop. 0, or
// MLM_EIO with the address in err (cannot bind), MLM_EINVAL (bad host).
int serve_http_start(serve_http_t **out, serve_t *s, const tokenizer_t *tok, const serve_http_opts_t *o, char *err,
                     size_t errlen);
int serve_http_port(const serve_http_t *h);
// Stops accepting and waits for the connections' threads; accepts NULL, NULLs the pointer.
void serve_http_stop(serve_http_t **self_p);

#endif
