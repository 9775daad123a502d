// libFuzzer target: arbitrary bytes through both tokenizers (encode, decode, streaming detokenizer).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/format/gguf.h"
#include "worker/text/tokenizer.h"

// --- helpers

typedef struct {
    tokenizer_t *spm;   // llama SentencePiece vocab
    tokenizer_t *bpe;   // GPT-2 byte-level BPE vocab
} fuzz_state_t;

static fuzz_state_t *state(void) {
    static fuzz_state_t st; // loaded once per fuzzing process; read-only afterwards
    static int loaded;
    if (loaded) return &st;
    loaded = 1;
    const char *shared = getenv("MESHLM_SHARED");
    if (!shared || !*shared) shared = MESHLM_SHARED_DEFAULT;
    const char *names[2] = {"models/vocab/ggml-vocab-llama-spm.gguf", "models/vocab/ggml-vocab-gpt-2.gguf"};
    tokenizer_t **dst[2] = {&st.spm, &st.bpe};
    for (int i = 0; i < 2; i++) {
        char path[1024], err[512];
        snprintf(path, sizeof path, "%s/%s", shared, names[i]);
        gguf_t *g = NULL;
        if (gguf_open(&g, path, err, sizeof err) != 0 || tokenizer_from_gguf(dst[i], g, err, sizeof err) != 0) {
            fprintf(stderr, "fuzz_tokenizer: %s\n", err);
            abort();
        }
        gguf_close(&g);
    }
    return &st;
}

static void run_one(const tokenizer_t *t, const uint8_t *data, size_t size, bool special) {
    int32_t toks[4096]; // (cap) ids
    int n = tokenizer_encode(t, (const char *)data, size, true, special, toks, 4096);
    if (n < 0) return;
    if (n > 4096) n = 4096;
    for (int i = 0; i < n; i++)
        if (toks[i] < 0 || toks[i] >= tokenizer_n_vocab(t)) abort();
    char out[64]; // streaming chunk
    tok_stream_t s = {0};
    for (int i = 0; i < n; i++) tokenizer_stream_push(t, &s, toks[i], out, sizeof out);
    tokenizer_stream_flush(t, &s, out, sizeof out);
}

// --- entry point

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 8192) return 0;
    fuzz_state_t *st = state();
    run_one(st->spm, data, size, false);
    run_one(st->spm, data, size, true);
    run_one(st->bpe, data, size, false);
    run_one(st->bpe, data, size, true);
    return 0;
}
