// An API request's body (untrusted JSON) into a generation request: the prompt's tokens (a chat rendered
// through its template first), sampling, max_tokens, stop strings, streaming. Every refusal has the
// HTTP status, an OpenAI-style error code and a message.
#ifndef MESHLM_SERVE_REQUEST_H
#define MESHLM_SERVE_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/serve/chat.h"
#include "coordinator/serve/sched.h"
#include "worker/text/tokenizer.h"

typedef struct {
    const tokenizer_t *tok;
    const char *model_id;     // the one model a request may name
    int n_ctx;                // positions per sequence
    bool add_bos;             // completions start with BOS
    chat_template_t chat;
} serve_request_ctx_t;

typedef struct {
    serve_req_params_t p;     // p.prompt points at tokens
    int32_t *tokens;          // (p.n_prompt) owned: serve_request_free
    bool stream;              // "stream": true
    int status;               // on a refusal: 400, 404 or 500
    char code[32];            // ... "invalid_json", "model_not_found", "context_length_exceeded", ...
    char msg[512];            // ... and why
} serve_request_t;

// Parses a /v1/completions (chat false) or /v1/chat/completions body of len bytes. 0, or -1 with
// r->status, r->code and r->msg set (nothing to free then).
int serve_request_parse(const serve_request_ctx_t *ctx, const char *body, size_t len, bool chat, serve_request_t *r);
void serve_request_free(serve_request_t *r);

#endif
