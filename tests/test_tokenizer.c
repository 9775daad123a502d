// CUnit suite "tokenizer": llama.cpp's vocab test vectors, reference prompts, pieces, streaming, unicode.
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "worker/format/gguf.h"
#include "worker/text/tokenizer.h"
#include "worker/text/unicode.h"

#define VOCAB_SEP "\n__ggml_vocab_test__\n"
#define MAX_TOKS 4096

// --- helpers

// Opens a GGUF, builds its tokenizer and closes the file again (the tokenizer must not need it).
static tokenizer_t *load_tok_path(const char *path) {
    char err[256];  // error text
    gguf_t *g = NULL;
    int rc = gguf_open(&g, path, err, sizeof err);
    if (rc) {
        fprintf(stderr, "\n  gguf_open %s: %s\n", path, err);
        return NULL;
    }
    tokenizer_t *t = NULL;
    rc = tokenizer_from_gguf(&t, g, err, sizeof err);
    if (rc) fprintf(stderr, "\n  tokenizer_from_gguf %s: %s\n", path, err);
    gguf_close(&g);
    return t;
}

static tokenizer_t *load_tok(const char *rel) {
    char path[1024];  // absolute path under shared/
    return load_tok_path(test_shared_path(path, sizeof path, rel));
}

// Finds a model file by name under shared/models and its subfolders; 0 if found.
static int find_model(const char *name, char *out, size_t cap) {
    static const char *const dirs[] = {"models", "models/derived", "models/synth", "models/legacy", "models/vocab"};
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++) {
        char rel[512];  // relative candidate path
        snprintf(rel, sizeof rel, "%s/%s", dirs[i], name);
        test_shared_path(out, cap, rel);
        if (access(out, R_OK) == 0) return 0;
    }
    return -1;
}

// Strict UTF-8 validity, written independently of worker/unicode.c.
static bool utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else return false;
        if (i + need >= n) return false;  // truncated
        for (size_t k = 1; k <= need; k++) {
            unsigned b = s[i + k];
            unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
            if (b < l || b > h) return false;
        }
        i += need + 1;
    }
    return true;
}

// WHATWG-style UTF-8 decode with replacement, re-encoded: the oracle for the streaming decoder.
static size_t utf8_replace(const unsigned char *s, size_t n, unsigned char *out) {
    size_t o = 0;
    unsigned needed = 0, seen = 0, lo = 0x80, hi = 0xBF;
    size_t start = 0;  // first byte of the sequence being decoded
    for (size_t i = 0; i < n; i++) {
        unsigned b = s[i];
        if (needed == 0) {
            start = i;
            if (b <= 0x7F) out[o++] = (unsigned char)b;
            else if (b >= 0xC2 && b <= 0xDF) needed = 1;
            else if (b >= 0xE0 && b <= 0xEF) { if (b == 0xE0) lo = 0xA0; if (b == 0xED) hi = 0x9F; needed = 2; }
            else if (b >= 0xF0 && b <= 0xF4) { if (b == 0xF0) lo = 0x90; if (b == 0xF4) hi = 0x8F; needed = 3; }
            else { memcpy(out + o, "\xEF\xBF\xBD", 3); o += 3; }
            continue;
        }
        if (b < lo || b > hi) {
            needed = seen = 0, lo = 0x80, hi = 0xBF;
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i--;  // reprocess this byte
            continue;
        }
        lo = 0x80, hi = 0xBF;
        if (++seen == needed) {
            memcpy(out + o, s + start, needed + 1);
            o += needed + 1;
            needed = seen = 0;
        }
    }
    if (needed) { memcpy(out + o, "\xEF\xBF\xBD", 3); o += 3; }
    return o;
}

static int hex_val(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Decodes a hex string into bytes (caller frees); NULL on bad input.
static unsigned char *unhex(const char *h, size_t *n) {
    size_t l = strlen(h);
    if (l % 2) return NULL;
    unsigned char *b = malloc(l / 2 + 1);  // (l / 2) decoded bytes
    if (!b) return NULL;
    for (size_t i = 0; i < l / 2; i++) {
        int x = hex_val(h[2 * i]), y = hex_val(h[2 * i + 1]);
        if (x < 0 || y < 0) { free(b); return NULL; }
        b[i] = (unsigned char)(x * 16 + y);
    }
    *n = l / 2;
    return b;
}

static void print_escaped(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7F && c != '\\') fputc(c, stderr);
        else fprintf(stderr, "\\x%02x", c);
    }
}

// Encodes s and compares with the expected line of ids ("" = no tokens); prints a mismatch.
static bool check_case(const tokenizer_t *t, const char *name, int idx, const char *s, size_t n, const char *line) {
    int32_t want[MAX_TOKS];  // expected ids
    int nw = 0;
    for (const char *p = line; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p) break;
        if (nw < MAX_TOKS) want[nw++] = (int32_t)v;
        p = end;
    }
    int32_t got[MAX_TOKS];  // encoder output
    int ng = tokenizer_encode(t, s, n, false, false, got, MAX_TOKS);
    bool ok = ng == nw && memcmp(got, want, (size_t)nw * sizeof *got) == 0;
    if (!ok) {
        fprintf(stderr, "\n  %s case %d \"", name, idx);
        print_escaped(s, n);
        fprintf(stderr, "\"\n    want:");
        for (int i = 0; i < nw; i++) fprintf(stderr, " %d", want[i]);
        fprintf(stderr, "\n    got: ");
        for (int i = 0; i < ng && i < MAX_TOKS; i++) fprintf(stderr, " %d", got[i]);
        fprintf(stderr, " (%d)\n", ng);
    }
    return ok;
}

// Runs the .inp/.out vectors of one vocab; checks every case and the decode round trip.
static void run_vocab_vectors(const char *vocab) {
    char rel[256];  // relative paths of the three files
    snprintf(rel, sizeof rel, "models/vocab/%s", vocab);
    tokenizer_t *t = load_tok(rel);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    char path[1024];  // absolute path of the .inp / .out file
    size_t inp_len, out_len;
    snprintf(rel, sizeof rel, "models/vocab/%s.inp", vocab);
    char *inp = test_read_file(test_shared_path(path, sizeof path, rel), &inp_len);
    snprintf(rel, sizeof rel, "models/vocab/%s.out", vocab);
    char *out = test_read_file(test_shared_path(path, sizeof path, rel), &out_len);
    CU_ASSERT_PTR_NOT_NULL(inp);
    CU_ASSERT_PTR_NOT_NULL(out);
    if (!inp || !out) {
        free(inp), free(out);
        tokenizer_destroy(&t);
        return;
    }
    int n_cases = 0, n_ok = 0, n_rt = 0;
    char *s = inp, *line = out;
    size_t seplen = strlen(VOCAB_SEP);
    for (;;) {
        char *sep = strstr(s, VOCAB_SEP);  // every case is followed by the separator
        if (!sep) break;
        char *nl = strchr(line, '\n');
        CU_ASSERT_PTR_NOT_NULL(nl);
        if (!nl) break;
        *nl = 0;
        size_t n = (size_t)(sep - s);
        n_ok += check_case(t, vocab, n_cases, s, n, line);

        // round trip: decode(encode(s)) == s (SPM adds one leading space to non-empty text)
        int32_t toks[MAX_TOKS];  // ids of s
        int nt = tokenizer_encode(t, s, n, false, false, toks, MAX_TOKS);
        char dec[8192];          // decoded bytes
        int nd = nt >= 0 && nt <= MAX_TOKS ? tokenizer_decode(t, toks, nt, dec, sizeof dec) : -1;
        const char *d = dec;
        if (nd > 0 && tokenizer_kind(t) == TOK_KIND_SPM && dec[0] == ' ') d++, nd--;
        bool rt = nd == (int)n && memcmp(d, s, n) == 0;
        if (!rt) {
            fprintf(stderr, "\n  %s round trip %d: \"", vocab, n_cases);
            print_escaped(s, n);
            fprintf(stderr, "\" -> \"");
            if (nd > 0) print_escaped(d, (size_t)nd);
            fprintf(stderr, "\"\n");
        }
        n_rt += rt;

        n_cases++;
        s = sep + seplen;
        line = nl + 1;
    }
    CU_ASSERT_EQUAL(*s, 0);  // nothing after the last separator
    CU_ASSERT_EQUAL(n_cases, 46);
    CU_ASSERT_EQUAL(n_ok, n_cases);
    CU_ASSERT_EQUAL(n_rt, n_cases);
    free(inp), free(out);
    tokenizer_destroy(&t);
}

// Pushes toks through a stream; checks every chunk is valid UTF-8; returns the concatenated output.
static size_t stream_all(const tokenizer_t *t, const int32_t *toks, int n, char *out, size_t cap) {
    tok_stream_t st = {0};
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        char chunk[512];  // one push's output
        int w = tokenizer_stream_push(t, &st, toks[i], chunk, sizeof chunk);
        CU_ASSERT(w >= 0);
        if (w < 0) return o;
        CU_ASSERT(utf8_valid((unsigned char *)chunk, (size_t)w));
        if (o + (size_t)w <= cap) memcpy(out + o, chunk, (size_t)w);
        o += (size_t)w;
    }
    char chunk[8];  // flush output
    int w = tokenizer_stream_flush(t, &st, chunk, sizeof chunk);
    CU_ASSERT(w >= 0 && w <= 3);
    if (w > 0 && o + (size_t)w <= cap) memcpy(out + o, chunk, (size_t)w);
    CU_ASSERT_EQUAL(st.npend, 0);
    return o + (size_t)(w > 0 ? w : 0);
}

static int json_ids(const cJSON *arr, int32_t *out, int cap) {
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr) {
        if (n < cap) out[n] = (int32_t)it->valuedouble;
        n++;
    }
    return n;
}

// --- tests

static void test_unicode_flags(void) {
    CU_ASSERT(uni_flags('a') & UNI_LETTER);
    CU_ASSERT(uni_flags('Z') & UNI_LETTER);
    CU_ASSERT(uni_flags('5') & UNI_NUMBER);
    CU_ASSERT_EQUAL(uni_flags(' '), UNI_SEPARATOR | UNI_WHITESPACE);
    CU_ASSERT_EQUAL(uni_flags('\n'), UNI_CONTROL | UNI_WHITESPACE);
    CU_ASSERT_EQUAL(uni_flags(0x1C), UNI_CONTROL);  // not White_Space, unlike Python's isspace
    CU_ASSERT(uni_flags(0x3000) & UNI_WHITESPACE);
    CU_ASSERT(uni_flags(0x00A0) & UNI_WHITESPACE);
    CU_ASSERT(uni_flags(0x4E00) & UNI_LETTER);       // CJK ideograph
    CU_ASSERT(uni_flags(0x00BD) & UNI_NUMBER);       // ½ (No)
    CU_ASSERT(uni_flags(0x0301) & UNI_ACCENT_MARK);
    CU_ASSERT(uni_flags('!') & UNI_PUNCTUATION);
    CU_ASSERT(uni_flags('$') & UNI_SYMBOL);
    CU_ASSERT(uni_flags(0x1F600) & UNI_SYMBOL);      // emoji (So)
    CU_ASSERT_EQUAL(uni_flags(0x0378), 0);           // unassigned
    CU_ASSERT_EQUAL(uni_flags(0x110000), 0);
    CU_ASSERT(uni_flags(0x10FFFD) & UNI_CONTROL);    // private use
}

static void test_unicode_utf8(void) {
    size_t adv;
    CU_ASSERT_EQUAL(uni_decode((const unsigned char *)"\xC3\xA9", 2, &adv), 0xE9);
    CU_ASSERT_EQUAL(adv, 2);
    CU_ASSERT_EQUAL(uni_decode((const unsigned char *)"\xF0\x9F\x98\x80", 4, &adv), 0x1F600);
    CU_ASSERT_EQUAL(adv, 4);
    CU_ASSERT_EQUAL(uni_decode((const unsigned char *)"\xE6\x97", 2, &adv), UNI_REPLACEMENT);  // truncated
    CU_ASSERT_EQUAL(adv, 1);
    CU_ASSERT_EQUAL(uni_decode((const unsigned char *)"\x80", 1, &adv), UNI_REPLACEMENT);
    CU_ASSERT_EQUAL(uni_decode((const unsigned char *)"\xC0\x80", 2, &adv), 0);  // lenient, like llama.cpp
    CU_ASSERT_EQUAL(adv, 2);
    char u[4];  // encoded bytes
    CU_ASSERT_EQUAL(uni_encode(0x2581, u), 3);
    CU_ASSERT_EQUAL(memcmp(u, "\xE2\x96\x81", 3), 0);
    CU_ASSERT_EQUAL(uni_encode(0x110000, u), 0);

    size_t l;
    CU_ASSERT_EQUAL(uni_utf8_check((const unsigned char *)"\xE6\x97\xA5", 3, &l), 1);
    CU_ASSERT_EQUAL(l, 3);
    CU_ASSERT_EQUAL(uni_utf8_check((const unsigned char *)"\xE6\x97", 2, &l), 0);
    CU_ASSERT_EQUAL(l, 2);
    CU_ASSERT_EQUAL(uni_utf8_check((const unsigned char *)"\xE6\x41", 2, &l), -1);
    CU_ASSERT_EQUAL(l, 1);
    CU_ASSERT_EQUAL(uni_utf8_check((const unsigned char *)"\xED\xA0\x80", 3, &l), -1);  // surrogate
    CU_ASSERT_EQUAL(l, 1);
    CU_ASSERT_EQUAL(uni_utf8_check((const unsigned char *)"\xF0\x9F\x41", 3, &l), -1);
    CU_ASSERT_EQUAL(l, 2);
    CU_ASSERT_EQUAL(uni_utf8_check((const unsigned char *)"\xFF", 1, &l), -1);
}

static void test_byte_level_map(void) {
    CU_ASSERT_EQUAL(uni_byte_to_cp('A'), 'A');
    CU_ASSERT_EQUAL(uni_byte_to_cp(' '), 0x120);   // 'Ġ'
    CU_ASSERT_EQUAL(uni_byte_to_cp('\n'), 0x10A);  // 'Ċ'
    CU_ASSERT_EQUAL(uni_byte_to_cp(0), 0x100);
    CU_ASSERT_EQUAL(uni_byte_to_cp(0xAD), 0x143);  // the last one
    bool seen[324] = {false};  // codepoints 0..323 used by the map
    for (int b = 0; b < 256; b++) {
        uint32_t c = uni_byte_to_cp((uint8_t)b);
        CU_ASSERT(c < 324);
        if (c < 324) {
            CU_ASSERT(!seen[c]);
            seen[c] = true;
        }
        CU_ASSERT_EQUAL(uni_cp_to_byte(c), b);
    }
    CU_ASSERT_EQUAL(uni_cp_to_byte(0x20), -1);
    CU_ASSERT_EQUAL(uni_cp_to_byte(0x144), -1);
}

static void test_vocab_llama_spm(void) { run_vocab_vectors("ggml-vocab-llama-spm.gguf"); }

static void test_vocab_gpt2(void) { run_vocab_vectors("ggml-vocab-gpt-2.gguf"); }

static void test_vocab_metadata(void) {
    tokenizer_t *t = load_tok("models/vocab/ggml-vocab-llama-spm.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL(tokenizer_kind(t), TOK_KIND_SPM);
    CU_ASSERT_EQUAL(tokenizer_n_vocab(t), 32000);
    CU_ASSERT_EQUAL(tokenizer_bos(t), 1);
    CU_ASSERT_EQUAL(tokenizer_eos(t), 2);
    CU_ASSERT_EQUAL(tokenizer_unk(t), 0);
    CU_ASSERT(tokenizer_add_bos(t));
    CU_ASSERT(!tokenizer_add_eos(t));
    CU_ASSERT(tokenizer_is_eog(t, 2));
    CU_ASSERT(!tokenizer_is_eog(t, 1));
    CU_ASSERT(!tokenizer_is_eog(t, 32000));
    CU_ASSERT_STRING_EQUAL(tokenizer_token_text(t, 13), "<0x0A>");
    CU_ASSERT_EQUAL(tokenizer_token_type(t, 13), TOK_TYPE_BYTE);
    CU_ASSERT_EQUAL(tokenizer_token_type(t, 1), TOK_TYPE_CONTROL);
    CU_ASSERT_EQUAL(tokenizer_find(t, "\xE2\x96\x81Hello", 8), 15043);
    CU_ASSERT_EQUAL(tokenizer_find(t, "no such token!", 14), -1);
    CU_ASSERT_PTR_NULL(tokenizer_token_text(t, -1));

    char buf[32];  // piece bytes
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 15043, buf, sizeof buf), 6);
    CU_ASSERT_EQUAL(memcmp(buf, " Hello", 6), 0);
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 13, buf, sizeof buf), 1);
    CU_ASSERT_EQUAL(buf[0], '\n');
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 1, buf, sizeof buf), 0);  // <s>
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 0, buf, sizeof buf), 0);  // <unk>
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 15043, buf, 2), 6);       // too small: length, partial write
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 32000, buf, sizeof buf), MLM_EINVAL);

    // count-then-retry contract and BOS
    int32_t ids[8];  // small output buffer
    int n = tokenizer_encode(t, "Hello world", 11, true, false, ids, 2);
    CU_ASSERT_EQUAL(n, 3);
    CU_ASSERT_EQUAL(ids[0], 1);
    CU_ASSERT_EQUAL(ids[1], 15043);
    CU_ASSERT_EQUAL(tokenizer_encode(t, "Hello world", 11, true, false, NULL, 0), 3);
    CU_ASSERT_EQUAL(tokenizer_encode(t, "", 0, true, false, ids, 8), 1);  // BOS only
    CU_ASSERT_EQUAL(tokenizer_encode(t, "", 0, false, false, ids, 8), 0);
    CU_ASSERT_EQUAL(tokenizer_encode(t, NULL, 3, false, false, ids, 8), MLM_EINVAL);
    tokenizer_destroy(&t);
    CU_ASSERT_PTR_NULL(t);
    tokenizer_destroy(&t);
    tokenizer_destroy(NULL);

    t = load_tok("models/vocab/ggml-vocab-gpt-2.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL(tokenizer_kind(t), TOK_KIND_BPE);
    CU_ASSERT_EQUAL(tokenizer_n_vocab(t), 50257);
    CU_ASSERT_EQUAL(tokenizer_bos(t), 50256);
    CU_ASSERT_EQUAL(tokenizer_eos(t), 50256);
    CU_ASSERT(tokenizer_is_eog(t, 50256));
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 18435, buf, sizeof buf), 6);  // "ĠHello"
    CU_ASSERT_EQUAL(memcmp(buf, " Hello", 6), 0);
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 198, buf, sizeof buf), 1);    // "Ċ"
    CU_ASSERT_EQUAL(buf[0], '\n');
    CU_ASSERT_EQUAL(tokenizer_token_piece(t, 50256, buf, sizeof buf), 0);  // <|endoftext|> is control
    tokenizer_destroy(&t);
}

static void test_parse_special(void) {
    tokenizer_t *t = load_tok("models/vocab/ggml-vocab-llama-spm.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    int32_t a[64], b[64];  // ids
    // "<s>" is a control token: matched only with parse_special; text after it gets a space prefix
    int na = tokenizer_encode(t, "<s>Hello</s>", 12, false, true, a, 64);
    int nb = tokenizer_encode(t, "Hello", 5, false, false, b, 64);
    CU_ASSERT_EQUAL(na, 3);
    CU_ASSERT_EQUAL(nb, 1);
    CU_ASSERT_EQUAL(a[0], 1);
    CU_ASSERT_EQUAL(a[1], 15043);  // "▁Hello"
    CU_ASSERT_EQUAL(a[2], 2);
    // repeated and adjacent special tokens, text in between
    na = tokenizer_encode(t, "<s><s>Hello</s>Hello", 20, true, true, a, 64);
    CU_ASSERT_EQUAL(na, 6);
    CU_ASSERT(na == 6 && a[0] == 1 && a[1] == 1 && a[2] == 1 && a[3] == 15043 && a[4] == 2 && a[5] == 15043);
    na = tokenizer_encode(t, "<s>Hello</s>", 12, false, false, a, 64);
    CU_ASSERT(na > 3);
    for (int i = 0; i < na && i < 64; i++) CU_ASSERT(a[i] != 1 && a[i] != 2);
    char dec[64];  // decoded text
    int nd = tokenizer_decode(t, a, na, dec, sizeof dec);
    CU_ASSERT_EQUAL(nd, 13);
    CU_ASSERT_EQUAL(memcmp(dec, " <s>Hello</s>", 13), 0);
    tokenizer_destroy(&t);

    t = load_tok("models/vocab/ggml-vocab-gpt-2.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    na = tokenizer_encode(t, "Hi<|endoftext|> there", 21, false, true, a, 64);
    CU_ASSERT_EQUAL(na, 3);
    CU_ASSERT_EQUAL(a[1], 50256);
    CU_ASSERT_EQUAL(a[2], 612);  // "Ġthere"
    na = tokenizer_encode(t, "Hi<|endoftext|> there", 21, false, false, a, 64);
    CU_ASSERT(na > 3);
    for (int i = 0; i < na && i < 64; i++) CU_ASSERT(a[i] != 50256);
    tokenizer_destroy(&t);
}

static void test_reference_prompts(void) {
    char dir[1024];  // shared/reference
    DIR *d = opendir(test_shared_path(dir, sizeof dir, "reference"));
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    int n_files = 0, n_prompt_ok = 0, n_text_ok = 0, n_stream_ok = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t l = strlen(de->d_name);
        if (l < 5 || strcmp(de->d_name + l - 5, ".json") != 0) continue;
        char path[2048];  // the json file
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        size_t jl;
        char *js = test_read_file(path, &jl);
        CU_ASSERT_PTR_NOT_NULL(js);
        if (!js) continue;
        cJSON *root = cJSON_Parse(js);
        free(js);
        CU_ASSERT_PTR_NOT_NULL(root);
        if (!root) continue;
        n_files++;
        const cJSON *model = cJSON_GetObjectItem(root, "model"), *prompt = cJSON_GetObjectItem(root, "prompt");
        const cJSON *pt = cJSON_GetObjectItem(root, "prompt_tokens"), *gt = cJSON_GetObjectItem(root, "greedy_tokens");
        const cJSON *hex = cJSON_GetObjectItem(root, "greedy_text_hex");
        char mpath[1024];  // model file
        tokenizer_t *t = NULL;
        if (cJSON_IsString(model) && find_model(model->valuestring, mpath, sizeof mpath) == 0)
            t = load_tok_path(mpath);
        CU_ASSERT_PTR_NOT_NULL(t);
        if (t && cJSON_IsString(prompt) && cJSON_IsArray(pt) && cJSON_IsArray(gt) && cJSON_IsString(hex)) {
            int32_t want[MAX_TOKS], got[MAX_TOKS];  // prompt ids
            int nw = json_ids(pt, want, MAX_TOKS);
            int ng = tokenizer_encode(t, prompt->valuestring, strlen(prompt->valuestring), true, false, got, MAX_TOKS);
            if (ng == nw && memcmp(got, want, (size_t)nw * sizeof *got) == 0) n_prompt_ok++;
            else fprintf(stderr, "\n  %s: prompt tokens differ (%d vs %d)\n", de->d_name, ng, nw);

            int32_t gen[MAX_TOKS];  // greedy continuation
            int ngen = json_ids(gt, gen, MAX_TOKS);
            size_t nb = 0;
            unsigned char *bytes = unhex(hex->valuestring, &nb);
            CU_ASSERT_PTR_NOT_NULL(bytes);
            char text[8192];  // concatenated pieces
            size_t nt = 0;
            for (int i = 0; i < ngen; i++) {
                int w = tokenizer_token_piece(t, gen[i], text + nt, sizeof text - nt);
                CU_ASSERT(w >= 0);
                if (w > 0) nt += (size_t)w;
            }
            if (bytes && nt == nb && memcmp(text, bytes, nb) == 0) n_text_ok++;
            else fprintf(stderr, "\n  %s: greedy text differs\n", de->d_name);
            CU_ASSERT_EQUAL(tokenizer_decode(t, gen, ngen, NULL, 0), (int)nt);

            char streamed[16384];       // stream output
            unsigned char want_s[16384]; // oracle: the bytes with ill-formed parts replaced
            size_t ns = stream_all(t, gen, ngen, streamed, sizeof streamed);
            size_t nws = bytes ? utf8_replace(bytes, nb, want_s) : 0;
            if (bytes && ns == nws && memcmp(streamed, want_s, ns) == 0) n_stream_ok++;
            else fprintf(stderr, "\n  %s: streamed text differs\n", de->d_name);
            free(bytes);
        }
        tokenizer_destroy(&t);
        cJSON_Delete(root);
    }
    closedir(d);
    CU_ASSERT_EQUAL(n_files, 42);
    CU_ASSERT_EQUAL(n_prompt_ok, n_files);
    CU_ASSERT_EQUAL(n_text_ok, n_files);
    CU_ASSERT_EQUAL(n_stream_ok, n_files);
}

static void test_stream_split_chars(void) {
    tokenizer_t *t = load_tok("models/vocab/ggml-vocab-llama-spm.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    const char *s = "h\xC3\xA9llo \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9D\x94\x98!";  // "héllo 日本 𝔘!"
    size_t n = strlen(s);
    int32_t toks[64];  // ids, no BOS
    int nt = tokenizer_encode(t, s, n, false, false, toks, 64);
    CU_ASSERT_FATAL(nt > 0 && nt <= 64);
    int n_bytes = 0;  // byte-fallback tokens that hold part of a character
    for (int i = 0; i < nt; i++) n_bytes += tokenizer_token_type(t, toks[i]) == TOK_TYPE_BYTE;
    CU_ASSERT(n_bytes >= 4);  // 𝔘 is not in the vocab: four <0xNN> tokens
    char out[256];  // streamed text
    size_t no = stream_all(t, toks, nt, out, sizeof out);
    CU_ASSERT_EQUAL(no, n + 1);
    CU_ASSERT(no == n + 1 && out[0] == ' ' && memcmp(out + 1, s, n) == 0);
    char dec[256];  // decoded text
    int nd = tokenizer_decode(t, toks, nt, dec, sizeof dec);
    CU_ASSERT(nd == (int)n + 1 && memcmp(dec + 1, s, n) == 0);

    // byte tokens pushed one at a time: nothing comes out until the character is complete
    tok_stream_t st = {0};
    char chunk[16];  // one push's output
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 3 + 0xE6, chunk, sizeof chunk), 0);
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 3 + 0x97, chunk, sizeof chunk), 0);
    CU_ASSERT_EQUAL(st.npend, 2);
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 3 + 0xA5, chunk, sizeof chunk), 3);
    CU_ASSERT_EQUAL(memcmp(chunk, "\xE6\x97\xA5", 3), 0);
    // an interrupted sequence becomes U+FFFD followed by the next token's text
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 3 + 0xE6, chunk, sizeof chunk), 0);
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 15043, chunk, sizeof chunk), 9);
    CU_ASSERT_EQUAL(memcmp(chunk, "\xEF\xBF\xBD Hello", 9), 0);
    // an invalid byte on its own
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 3 + 0xFF, chunk, sizeof chunk), 3);
    CU_ASSERT_EQUAL(memcmp(chunk, "\xEF\xBF\xBD", 3), 0);
    // a buffer that is too small leaves the state alone
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 3 + 0xF0, chunk, sizeof chunk), 0);
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, 15043, chunk, 2), MLM_ERANGE);
    CU_ASSERT_EQUAL(st.npend, 1);
    // flush writes the held bytes as one U+FFFD
    CU_ASSERT_EQUAL(tokenizer_stream_flush(t, &st, chunk, sizeof chunk), 3);
    CU_ASSERT_EQUAL(st.npend, 0);
    CU_ASSERT_EQUAL(tokenizer_stream_flush(t, &st, chunk, sizeof chunk), 0);
    CU_ASSERT_EQUAL(tokenizer_stream_push(t, &st, -1, chunk, sizeof chunk), MLM_EINVAL);
    tokenizer_destroy(&t);
}

// Appends a GGUF string (u64 length + bytes) to b.
static size_t put_str(unsigned char *b, size_t o, const char *s) {
    uint64_t n = strlen(s);
    memcpy(b + o, &n, 8);
    memcpy(b + o + 8, s, n);
    return o + 8 + n;
}

// A tokenizer-only GGUF in memory with a string KV model, optional pre and a 3-token vocab.
static size_t tiny_gguf(unsigned char *b, const char *model, const char *pre) {
    size_t o = 0;
    uint32_t u32;
    uint64_t u64;
    memcpy(b, "GGUF", 4), o = 4;
    u32 = 3, memcpy(b + o, &u32, 4), o += 4;
    u64 = 0, memcpy(b + o, &u64, 8), o += 8;               // tensors
    u64 = pre ? 4 : 3, memcpy(b + o, &u64, 8), o += 8;     // kv pairs
    o = put_str(b, o, "tokenizer.ggml.model");
    u32 = GGUF_VT_STRING, memcpy(b + o, &u32, 4), o += 4;
    o = put_str(b, o, model);
    if (pre) {
        o = put_str(b, o, "tokenizer.ggml.pre");
        u32 = GGUF_VT_STRING, memcpy(b + o, &u32, 4), o += 4;
        o = put_str(b, o, pre);
    }
    o = put_str(b, o, "tokenizer.ggml.tokens");
    u32 = GGUF_VT_ARRAY, memcpy(b + o, &u32, 4), o += 4;
    u32 = GGUF_VT_STRING, memcpy(b + o, &u32, 4), o += 4;
    u64 = 3, memcpy(b + o, &u64, 8), o += 8;
    o = put_str(b, o, "a");
    o = put_str(b, o, "b");
    o = put_str(b, o, "a b");
    o = put_str(b, o, "tokenizer.ggml.merges");
    u32 = GGUF_VT_ARRAY, memcpy(b + o, &u32, 4), o += 4;
    u32 = GGUF_VT_STRING, memcpy(b + o, &u32, 4), o += 4;
    u64 = 1, memcpy(b + o, &u64, 8), o += 8;
    o = put_str(b, o, "a b");
    while (o % 32) b[o++] = 0;
    return o;
}

static void test_load_errors(void) {
    unsigned char buf[1024];  // in-memory GGUF
    char err[256];            // error text
    struct {
        const char *model, *pre;
        int want;
    } cases[] = {
        {"bert", NULL, MLM_EUNSUPPORTED},
        {"gpt2", "llama-bpe", MLM_EUNSUPPORTED},
        {"gpt2", "gpt-2", 0},
        {"gpt2", NULL, 0},
        {"llama", NULL, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t n = tiny_gguf(buf, cases[i].model, cases[i].pre);
        gguf_t *g = NULL;
        int rc = gguf_open_mem(&g, buf, n, "tiny", err, sizeof err);
        CU_ASSERT_EQUAL_FATAL(rc, 0);
        tokenizer_t *t = (tokenizer_t *)&rc;  // must be reset to NULL on failure
        err[0] = 0;
        rc = tokenizer_from_gguf(&t, g, err, sizeof err);
        CU_ASSERT_EQUAL(rc, cases[i].want);
        if (rc) {
            CU_ASSERT_PTR_NULL(t);
            CU_ASSERT(strstr(err, "not supported") != NULL);
        } else {
            CU_ASSERT_EQUAL(tokenizer_n_vocab(t), 3);
            int32_t ids[8];  // tiny vocab ids
            int nt = tokenizer_encode(t, "ab", 2, false, false, ids, 8);
            if (tokenizer_kind(t) == TOK_KIND_BPE) {
                // the merge "a b" makes the symbol "ab", which is not a token: it falls back to the
                // single-byte tokens "a" and "b"
                CU_ASSERT(nt == 2 && ids[0] == 0 && ids[1] == 1);
            } else {
                // "▁ab": no pair is a token; "▁" has no byte tokens, so its 3 bytes become unk (id 0)
                CU_ASSERT(nt == 5 && ids[0] == 0 && ids[1] == 0 && ids[2] == 0 && ids[3] == 0 && ids[4] == 1);
            }
            // ids out of range default to none
            CU_ASSERT_EQUAL(tokenizer_bos(t), tokenizer_kind(t) == TOK_KIND_SPM ? 1 : -1);
        }
        tokenizer_destroy(&t);
        gguf_close(&g);
    }
    CU_ASSERT_EQUAL(tokenizer_from_gguf(NULL, NULL, err, sizeof err), MLM_EINVAL);
}

static void test_encode_speed(void) {
    tokenizer_t *t = load_tok("models/vocab/ggml-vocab-llama-spm.gguf");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    static const char para[] = "Once upon a time, in a small village by the sea, there lived a girl named "
                               "Lily who loved to collect shells. Every morning she walked along the beach "
                               "and sang songs to the waves; 1234 gulls answered her! ";
    char text[2100];  // about 2 KB of prose
    size_t n = 0;
    while (n + sizeof para - 1 < sizeof text) memcpy(text + n, para, sizeof para - 1), n += sizeof para - 1;
    int32_t ids[2048];  // output
    double best = 1e9;
    int nt = 0;
    for (int r = 0; r < 5; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        nt = tokenizer_encode(t, text, n, true, false, ids, 2048);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
        if (ms < best) best = ms;
    }
    CU_ASSERT(nt > 300 && nt < 2048);
#if defined(__SANITIZE_ADDRESS__) || !defined(NDEBUG)
    CU_ASSERT(best < 100.0);
#else
    CU_ASSERT(best < 10.0);
#endif
    fprintf(stderr, " [%zu bytes -> %d tokens in %.3f ms] ", n, nt, best);
    tokenizer_destroy(&t);
}

// --- suite

int test_tokenizer_suite(void) {
    CU_pSuite s = CU_add_suite("tokenizer", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "unicode flags", test_unicode_flags) ||
        !CU_add_test(s, "unicode utf8", test_unicode_utf8) ||
        !CU_add_test(s, "byte-level map", test_byte_level_map) ||
        !CU_add_test(s, "vocab metadata and pieces", test_vocab_metadata) ||
        !CU_add_test(s, "llama-spm vectors", test_vocab_llama_spm) ||
        !CU_add_test(s, "gpt-2 vectors", test_vocab_gpt2) ||
        !CU_add_test(s, "parse special", test_parse_special) ||
        !CU_add_test(s, "reference prompts and greedy text", test_reference_prompts) ||
        !CU_add_test(s, "stream split characters", test_stream_split_chars) ||
        !CU_add_test(s, "load errors", test_load_errors) ||
        !CU_add_test(s, "encode speed", test_encode_speed))
        return -1;
    return 0;
}
