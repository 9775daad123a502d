// libFuzzer target: arbitrary bytes as the body of /v1/completions and /v1/chat/completions (serve_request_parse),
// through each chat template, on a real vocabulary.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/serve/request.h"
#include "worker/format/gguf.h"

// --- helpers

static tokenizer_t *vocab(void) {
    static tokenizer_t *tok; // loaded once per fuzzing process; read-only afterwards
    if (tok) return tok;
    const char *shared = getenv("MESHLM_SHARED");
    if (!shared || !*shared) shared = MESHLM_SHARED_DEFAULT;
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/models/stories260K.gguf", shared);
    gguf_t *g = NULL;
    if (gguf_open(&g, path, err, sizeof err) != 0 || tokenizer_from_gguf(&tok, g, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_request: %s\n", err);
        abort();
    }
    gguf_close(&g);
    return tok;
}

// --- entry point

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const serve_request_ctx_t ctx = {.tok = vocab(), .model_id = "m", .n_ctx = 64 + data[0] % 512,
                                     .add_bos = data[0] & 1, .chat = (chat_template_t)(data[0] % CHAT_COUNT)};
    serve_request_t r;
    const bool chat = (data[0] >> 7) & 1;
    if (serve_request_parse(&ctx, (const char *)data + 1, size - 1, chat, &r) == 0) {
        // what is accepted fits the context and names real tokens
        if (r.p.n_prompt < 1 || r.p.n_predict < 1 || r.p.n_prompt + r.p.n_predict > ctx.n_ctx) abort();
        for (int i = 0; i < r.p.n_prompt; i++)
            if (r.tokens[i] < 0 || r.tokens[i] >= tokenizer_n_vocab(ctx.tok)) abort();
        for (int i = 0; i < SERVE_MAX_STOPS; i++)
            if (strlen(r.p.stop[i]) >= SERVE_STOP_LEN) abort();
        serve_request_free(&r);
    } else if (r.status < 400 || r.status > 599 || !r.code[0] || !r.msg[0] || r.tokens) {
        abort();
    }
    return 0;
}
