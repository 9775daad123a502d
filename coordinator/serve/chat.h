// Chat templates: OpenAI-style messages into the prompt text a model was trained on.
#ifndef MESHLM_SERVE_CHAT_H
#define MESHLM_SERVE_CHAT_H

#include <stddef.h>

#include "worker/format/gguf.h"
#include "worker/text/tokenizer.h"

typedef enum { CHAT_LLAMA2 = 0, CHAT_LLAMA3, CHAT_CHATML, CHAT_COUNT } chat_template_t;

typedef struct {
    const char *role;     // "system", "user" or "assistant"
    const char *content;
} chat_msg_t;

// The template named name ("llama-2", "llama-3", "chatml"); -1 for an unknown name.
int chat_template_by_name(const char *name);
const char *chat_template_name(chat_template_t t);

// The template a model file asks for: tokenizer.chat_template recognised by its markers
// (<|im_start|> chatml, <|start_header_id|> llama-3, [INST] llama-2); without one, the special tokens
// its vocabulary has; llama-2 otherwise. *why (may be NULL) says which rule decided.
chat_template_t chat_template_detect(const gguf_t *g, const tokenizer_t *tok, const char **why);

// The prompt for msgs (n of them), ending where the assistant's answer starts; special tokens are
// written as text (tokenize with special-token parsing). Caller frees. NULL: out of memory, or
// MLM_EINVAL-worthy input (a role other than the three), with the reason in err.
char *chat_render(chat_template_t t, const chat_msg_t *msgs, int n, char *err, size_t errlen);

// Text that ends an answer in template t when the vocabulary does not mark it as end of generation
// ("<|im_end|>", "<|eot_id|>", "</s>").
const char *chat_stop_text(chat_template_t t);

#endif
