// Chat templates: llama-2 ([INST]), llama-3 (header ids) and chatml (<|im_start|>).
#include "coordinator/serve/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// --- internals

static const char *const names[CHAT_COUNT] = {"llama-2", "llama-3", "chatml"};

typedef struct {
    char *buf;
    size_t len, cap;
    int bad;
} sb_t;

static void put(sb_t *b, const char *s) {
    const size_t n = strlen(s);
    if (b->bad) return;
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 256;
        while (nc < b->len + n + 1) nc *= 2;
        char *nb = realloc(b->buf, nc);
        if (!nb) {
            b->bad = 1;
            return;
        }
        b->buf = nb;
        b->cap = nc;
    }
    memcpy(b->buf + b->len, s, n + 1);
    b->len += n;
}

static int role_ok(const char *r) { return !strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant"); }

// llama-2: [INST] with the system prompt folded into the first user turn.
static void render_llama2(sb_t *b, const chat_msg_t *m, int n) {
    const char *sys = NULL;
    int first = 1;
    for (int i = 0; i < n; i++) {
        if (!strcmp(m[i].role, "system")) {
            sys = m[i].content;
            continue;
        }
        if (!strcmp(m[i].role, "user")) {
            put(b, "<s>[INST] ");
            if (first && sys) {
                put(b, "<<SYS>>\n");
                put(b, sys);
                put(b, "\n<</SYS>>\n\n");
            }
            put(b, m[i].content);
            put(b, " [/INST]");
            first = 0;
        } else {
            put(b, " ");
            put(b, m[i].content);
            put(b, " </s>");
        }
    }
}

static void render_llama3(sb_t *b, const chat_msg_t *m, int n) {
    put(b, "<|begin_of_text|>");
    for (int i = 0; i < n; i++) {
        put(b, "<|start_header_id|>");
        put(b, m[i].role);
        put(b, "<|end_header_id|>\n\n");
        put(b, m[i].content);
        put(b, "<|eot_id|>");
    }
    put(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void render_chatml(sb_t *b, const chat_msg_t *m, int n) {
    for (int i = 0; i < n; i++) {
        put(b, "<|im_start|>");
        put(b, m[i].role);
        put(b, "\n");
        put(b, m[i].content);
        put(b, "<|im_end|>\n");
    }
    put(b, "<|im_start|>assistant\n");
}

// --- public API

int chat_template_by_name(const char *name) {
    for (int i = 0; i < CHAT_COUNT; i++)
        if (!strcmp(name, names[i])) return i;
    if (!strcmp(name, "llama2")) return CHAT_LLAMA2;
    if (!strcmp(name, "llama3")) return CHAT_LLAMA3;
    return -1;
}

const char *chat_template_name(chat_template_t t) { return (unsigned)t < CHAT_COUNT ? names[t] : "?"; }

chat_template_t chat_template_detect(const gguf_t *g, const tokenizer_t *tok, const char **why) {
    const char *s;
    size_t len;
    const char *w = "default";
    chat_template_t t = CHAT_LLAMA2;
    if (gguf_get_str(g, "tokenizer.chat_template", &s, &len) == 0) {
        char *tpl = strndup(s, len);
        if (tpl && strstr(tpl, "<|im_start|>")) t = CHAT_CHATML, w = "tokenizer.chat_template";
        else if (tpl && strstr(tpl, "<|start_header_id|>")) t = CHAT_LLAMA3, w = "tokenizer.chat_template";
        else if (tpl && strstr(tpl, "[INST]")) t = CHAT_LLAMA2, w = "tokenizer.chat_template";
        else w = "tokenizer.chat_template not recognised: default";
        free(tpl);
    } else if (tokenizer_find(tok, "<|im_start|>", 12) >= 0) {
        t = CHAT_CHATML, w = "vocabulary has <|im_start|>";
    } else if (tokenizer_find(tok, "<|start_header_id|>", 19) >= 0) {
        t = CHAT_LLAMA3, w = "vocabulary has <|start_header_id|>";
    }
    if (why) *why = w;
    return t;
}

char *chat_render(chat_template_t t, const chat_msg_t *msgs, int n, char *err, size_t errlen) {
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !role_ok(msgs[i].role) || !msgs[i].content) {
            snprintf(err, errlen, "messages[%d]: role must be system, user or assistant, with a string content", i);
            return NULL;
        }
    sb_t b = {0};
    put(&b, "");
    if (t == CHAT_LLAMA3) render_llama3(&b, msgs, n);
    else if (t == CHAT_CHATML) render_chatml(&b, msgs, n);
    else render_llama2(&b, msgs, n);
    if (b.bad) {
        free(b.buf);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    return b.buf;
}

const char *chat_stop_text(chat_template_t t) {
    return t == CHAT_CHATML ? "<|im_end|>" : t == CHAT_LLAMA3 ? "<|eot_id|>" : "</s>";
}
