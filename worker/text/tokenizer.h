// Tokenizer: text <-> token ids with ids identical to llama.cpp (SentencePiece-style and GPT-2 BPE).
#ifndef MESHLM_TOKENIZER_H
#define MESHLM_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/format/gguf.h"

typedef struct tokenizer tokenizer_t;

// Token types as stored in tokenizer.ggml.token_type (llama.cpp's numbering).
enum {
    TOK_TYPE_UNDEFINED = 0,
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER_DEFINED = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
};

// Vocabulary kinds (tokenizer.ggml.model).
typedef enum {
    TOK_KIND_SPM = 0,   // "llama": SentencePiece-style scored merges with <0xNN> byte fallback
    TOK_KIND_BPE = 1,   // "gpt2": byte-level BPE with ranked merges
} tok_kind_t;

// Builds a tokenizer from the tokenizer.ggml.* keys of g: model, tokens, scores, token_type,
// merges, bos/eos/unk/pad/sep/eot/eom ids, add_bos_token, add_eos_token, add_space_prefix, pre.
// Everything is copied: the result does not depend on g after return.
// Models other than "llama" and "gpt2" (and gpt2 pre-tokenizers other than GPT-2's regex) give
// MLM_EUNSUPPORTED; missing or malformed keys give MLM_ENOTFOUND / MLM_EFORMAT. On failure *out
// is NULL and err (if not NULL) names the key.
int tokenizer_from_gguf(tokenizer_t **out, const gguf_t *g, char *err, size_t errlen);

// Frees; accepts NULL and NULLs the pointer.
void tokenizer_destroy(tokenizer_t **self_p);

// Encodes text[0..len) as llama.cpp's llama_tokenize does. add_bos puts the BOS id first (pass
// tokenizer_add_bos(t) to follow the model); EOS is never appended. parse_special matches control
// and unknown tokens written literally in the text ("<s>"); user-defined tokens are always matched.
// Returns the number of tokens; if it exceeds cap, only the first cap were written and the caller
// retries with a bigger buffer. Negative MLM_ code on failure (MLM_EINVAL, MLM_ENOMEM).
int tokenizer_encode(const tokenizer_t *t, const char *text, size_t len, bool add_bos, bool parse_special,
                     int32_t *out, int cap);

int tokenizer_n_vocab(const tokenizer_t *t);
tok_kind_t tokenizer_kind(const tokenizer_t *t);
int32_t tokenizer_bos(const tokenizer_t *t);   // -1 if none
int32_t tokenizer_eos(const tokenizer_t *t);   // -1 if none
int32_t tokenizer_unk(const tokenizer_t *t);   // -1 if none
bool tokenizer_add_bos(const tokenizer_t *t);  // the model wants BOS first
bool tokenizer_add_eos(const tokenizer_t *t);  // the model wants EOS last

// End of generation: eos, eot, eom, and tokens llama.cpp recognises by text ("<|endoftext|>",
// "<|im_end|>", "<|eot_id|>", ...). False for ids out of range.
bool tokenizer_is_eog(const tokenizer_t *t, int32_t tok);

// Vocabulary text of a token (e.g. "▁the", "<0x0A>", "Ġthe"), NUL-terminated, borrowed until
// tokenizer_destroy; NULL if tok is out of range.
const char *tokenizer_token_text(const tokenizer_t *t, int32_t tok);
int tokenizer_token_type(const tokenizer_t *t, int32_t tok);   // TOK_TYPE_*, or MLM_EINVAL
float tokenizer_token_score(const tokenizer_t *t, int32_t tok); // 0 if out of range
int32_t tokenizer_find(const tokenizer_t *t, const char *text, size_t len); // exact text -> id, or -1

// The bytes of a token as llama.cpp's token_to_piece renders it with special=false: SPM "▁" ->
// ' ', "<0xNN>" -> that byte; GPT-2 byte-level characters -> bytes; control and unknown tokens
// (e.g. <s>) -> nothing; user-defined tokens -> their text. Returns the byte count; if it exceeds
// cap only cap bytes were written. MLM_EINVAL for an out-of-range token.
int tokenizer_token_piece(const tokenizer_t *t, int32_t tok, char *buf, size_t cap);

// Concatenated pieces of toks[0..n) (no NUL terminator). Returns the total byte count; if it
// exceeds cap only cap bytes were written. MLM_EINVAL if a token is out of range.
int tokenizer_decode(const tokenizer_t *t, const int32_t *toks, int n, char *buf, size_t cap);

// --- streaming detokenizer

// State of a stream; zero-initialise it ({0}) before the first push.
typedef struct tok_stream {
    unsigned char pend[8];  // (npend) bytes of an incomplete UTF-8 sequence held back
    int npend;              // 0..3
} tok_stream_t;

// Appends the token's piece to the pending bytes and writes out only complete, well-formed UTF-8:
// an incomplete sequence at the end is held back for the next token, ill-formed bytes become
// U+FFFD (one per maximal ill-formed subpart). Returns the number of bytes written. If cap is too
// small returns MLM_ERANGE and leaves s unchanged; cap >= 3 * (piece length + 3) always suffices.
// MLM_EINVAL for an out-of-range token.
int tokenizer_stream_push(const tokenizer_t *t, tok_stream_t *s, int32_t tok, char *out, size_t cap);

// Ends the stream: held bytes are written as U+FFFD (at most 3 bytes) and s is reset.
// Returns bytes written, or MLM_ERANGE (s unchanged) if cap is too small.
int tokenizer_stream_flush(const tokenizer_t *t, tok_stream_t *s, char *out, size_t cap);

#endif
