// Tokenizer: llama.cpp-compatible SPM and GPT-2 BPE encoding, piece rendering, streaming decode.
#include "worker/text/tokenizer.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "worker/text/unicode.h"

// --- types

#define TOK_MAX_EOG 32

// Open-addressing hash of ids keyed by byte strings that the owner stores elsewhere.
typedef struct {
    int32_t *slot;   // (mask + 1) id, or -1 for an empty slot; linear probing
    uint32_t mask;   // capacity - 1 (capacity is a power of two)
} id_hash_t;

struct tokenizer {
    tok_kind_t kind;            // SPM or byte-level BPE
    int n_vocab;                // number of tokens
    char *text;                 // token texts back to back, each NUL-terminated
    uint32_t *text_off;         // (n_vocab) offset of each token's text in text
    uint32_t *text_len;         // (n_vocab) byte length of each token's text
    float *score;               // (n_vocab) SPM merge score (0 if absent)
    uint8_t *type;              // (n_vocab) TOK_TYPE_*
    char *piece;                // rendered pieces (token_to_piece) back to back
    uint32_t *piece_off;        // (n_vocab) offset of each piece in piece
    uint32_t *piece_len;        // (n_vocab) byte length of each piece
    id_hash_t tok_ix;           // token text -> id (the last id wins for duplicates, as in llama.cpp)

    int n_merges;               // BPE merges (0 for SPM)
    char *merge_text;           // "left right" strings back to back
    uint32_t *merge_off;        // (n_merges) offset of each merge string in merge_text
    uint32_t *merge_len;        // (n_merges) total bytes of "left right"
    uint32_t *merge_left;       // (n_merges) bytes of the left part
    id_hash_t merge_ix;         // (left, right) -> rank = merge index (the first one wins)

    int32_t *special;           // (n_special) ids matched literally in text, longest text first
    int n_special;
    int32_t eog[TOK_MAX_EOG];   // (n_eog) end-of-generation ids, sorted
    int n_eog;
    int32_t byte_tok[256];      // SPM byte fallback: id for each byte value, -1 if none
    unsigned char bl_utf8[256][3]; // BPE byte-level alphabet: [0] = UTF-8 length, [1..2] = bytes

    int32_t bos, eos, unk, pad, sep, eot, eom; // special ids, -1 if none
    bool add_bos, add_eos;      // what the model asks for
    bool add_space_prefix;      // SPM: prefix raw text with a space
};

// A candidate merge of two adjacent symbols.
typedef struct {
    double key;      // higher merges first: SPM score, or -rank for BPE
    int left;        // index of the left symbol
    int right;       // index of the right symbol
    uint32_t size;   // bytes of the merged text when the candidate was made
} bigram_t;

// A run of bytes in the working string, in a doubly linked list of symbols.
typedef struct {
    int prev, next;  // neighbour symbols, -1 at the ends
    uint32_t off;    // start in the working string
    uint32_t n;      // bytes; 0 once merged into its left neighbour
} symbol_t;

// Token output with the "count everything, write what fits" contract.
typedef struct {
    int32_t *out;    // (cap) caller's buffer
    int cap;
    int n;           // tokens produced so far
} emit_t;

// A piece of the input after special-token partitioning.
typedef struct {
    size_t off, len; // raw text bytes text[off..off+len) when tok < 0
    int32_t tok;     // a matched special token, or -1 for raw text
} frag_t;

// --- helpers: hashing

static uint32_t fnv_add(uint32_t h, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

#define FNV_INIT 2166136261u

static int hash_init(id_hash_t *h, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    if (cap > (size_t)UINT32_MAX) return MLM_ERANGE;
    h->slot = malloc(cap * sizeof *h->slot);
    if (!h->slot) return MLM_ENOMEM;
    memset(h->slot, 0xff, cap * sizeof *h->slot);
    h->mask = (uint32_t)(cap - 1);
    return 0;
}

static const char *tok_text(const tokenizer_t *t, int32_t id) { return t->text + t->text_off[id]; }

// Id of the token whose text is s[0..n), or -1.
static int32_t lookup(const tokenizer_t *t, const char *s, size_t n) {
    uint32_t i = fnv_add(FNV_INIT, s, n) & t->tok_ix.mask;
    for (;; i = (i + 1) & t->tok_ix.mask) {
        int32_t id = t->tok_ix.slot[i];
        if (id < 0) return -1;
        if (t->text_len[id] == n && memcmp(tok_text(t, id), s, n) == 0) return id;
    }
}

// Inserts id under its text; a later id with the same text replaces the earlier one.
static void tok_index_put(tokenizer_t *t, int32_t id) {
    const char *s = tok_text(t, id);
    size_t n = t->text_len[id];
    uint32_t i = fnv_add(FNV_INIT, s, n) & t->tok_ix.mask;
    for (;; i = (i + 1) & t->tok_ix.mask) {
        int32_t o = t->tok_ix.slot[i];
        if (o < 0 || (t->text_len[o] == n && memcmp(tok_text(t, o), s, n) == 0)) {
            t->tok_ix.slot[i] = id;
            return;
        }
    }
}

static uint32_t merge_hash(const char *l, size_t ln, const char *r, size_t rn) {
    return fnv_add(fnv_add(fnv_add(FNV_INIT, l, ln), " ", 1), r, rn);
}

// Rank of the merge (l, r), or -1.
static int merge_rank(const tokenizer_t *t, const char *l, size_t ln, const char *r, size_t rn) {
    if (!t->n_merges) return -1;
    uint32_t i = merge_hash(l, ln, r, rn) & t->merge_ix.mask;
    for (;; i = (i + 1) & t->merge_ix.mask) {
        int32_t m = t->merge_ix.slot[i];
        if (m < 0) return -1;
        const char *s = t->merge_text + t->merge_off[m];
        if (t->merge_left[m] == ln && t->merge_len[m] == ln + 1 + rn && memcmp(s, l, ln) == 0 &&
            memcmp(s + ln + 1, r, rn) == 0)
            return m;
    }
}

// Inserts merge m unless an equal (left, right) pair is already there.
static void merge_index_put(tokenizer_t *t, int32_t m) {
    const char *s = t->merge_text + t->merge_off[m];
    uint32_t ln = t->merge_left[m], rn = t->merge_len[m] - ln - 1;
    if (merge_rank(t, s, ln, s + ln + 1, rn) >= 0) return;
    uint32_t i = merge_hash(s, ln, s + ln + 1, rn) & t->merge_ix.mask;
    while (t->merge_ix.slot[i] >= 0) i = (i + 1) & t->merge_ix.mask;
    t->merge_ix.slot[i] = m;
}

// --- helpers: bigram heap (max-heap on key, ties to the leftmost pair)

static bool bigram_before(const bigram_t *a, const bigram_t *b) {
    return a->key > b->key || (a->key == b->key && a->left < b->left);
}

static void heap_push(bigram_t *h, int *n, bigram_t b) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!bigram_before(&b, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = b;
}

static bigram_t heap_pop(bigram_t *h, int *n) {
    bigram_t top = h[0];
    bigram_t last = h[--(*n)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && bigram_before(&h[c + 1], &h[c])) c++;
        if (!bigram_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) h[i] = last;
    return top;
}

// --- helpers: merging

static void emit(emit_t *e, int32_t id) {
    if (e->n < e->cap) e->out[e->n] = id;
    e->n++;
}

// Splits s[0..n) into symbols of one UTF-8 "character" each (by lead byte, as llama.cpp does).
static int split_chars(const char *s, size_t n, symbol_t *sym) {
    int k = 0;
    for (size_t off = 0; off < n;) {
        size_t l = (size_t)uni_len_utf8((unsigned char)s[off]);
        if (l > n - off) l = n - off;
        sym[k].off = (uint32_t)off;
        sym[k].n = (uint32_t)l;
        sym[k].prev = k - 1;
        off += l;
        sym[k].next = off == n ? -1 : k + 1;
        k++;
    }
    return k;
}

// Queues the merge of symbols l and r if the tokenizer allows it.
static void try_bigram(const tokenizer_t *t, const char *s, symbol_t *sym, int l, int r, bigram_t *h, int *nh) {
    if (l < 0 || r < 0) return;
    bigram_t b = {.left = l, .right = r, .size = sym[l].n + sym[r].n};
    if (t->kind == TOK_KIND_SPM) {
        int32_t id = lookup(t, s + sym[l].off, b.size);
        if (id < 0) return;
        b.key = t->score[id];
    } else {
        int rank = merge_rank(t, s + sym[l].off, sym[l].n, s + sym[r].off, sym[r].n);
        if (rank < 0) return;
        b.key = -(double)rank;
    }
    heap_push(h, nh, b);
}

// Merges the best adjacent pairs until none is left. h has room for 3 * nsym entries.
static void merge_symbols(const tokenizer_t *t, const char *s, symbol_t *sym, int nsym, bigram_t *h) {
    int nh = 0;
    for (int i = 1; i < nsym; i++) try_bigram(t, s, sym, i - 1, i, h, &nh);
    while (nh > 0) {
        bigram_t b = heap_pop(h, &nh);
        symbol_t *l = &sym[b.left], *r = &sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;  // stale
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = b.left;
        try_bigram(t, s, sym, l->prev, b.left, h, &nh);
        try_bigram(t, s, sym, b.left, l->next, h, &nh);
    }
}

// Splits s (len bytes) into characters, merges them by the vocabulary's ranks and emits the
// resulting tokens. A piece that is no token falls back to one token per byte: SentencePiece's
// <0xNN> byte tokens (else unk) when spm_bytes, else (GPT-2, as llama.cpp) single-byte tokens.
static void merge_and_emit(const tokenizer_t *t, const char *s, size_t len, symbol_t *sym, bigram_t *h,
                           bool spm_bytes, emit_t *e) { // sym: (len); h: (3 * len)
    int nsym = split_chars(s, len, sym);
    merge_symbols(t, s, sym, nsym, h);
    for (int i = nsym ? 0 : -1; i != -1; i = sym[i].next) {
        int32_t id = lookup(t, s + sym[i].off, sym[i].n);
        if (id >= 0) {
            emit(e, id);
            continue;
        }
        for (uint32_t j = 0; j < sym[i].n; j++) {
            int32_t b = spm_bytes ? t->byte_tok[(unsigned char)s[sym[i].off + j]] : lookup(t, s + sym[i].off + j, 1);
            if (b < 0 && spm_bytes) b = t->unk;
            if (b >= 0) emit(e, b);
        }
    }
}

// --- helpers: SPM

// Tokenizes one raw fragment: optional leading space, ' ' -> U+2581, scored merges, byte fallback.
static int spm_encode(const tokenizer_t *t, const char *text, size_t len, bool prefix, emit_t *e) {
    size_t n_space = prefix;
    for (size_t i = 0; i < len; i++) n_space += text[i] == ' ';
    size_t n = len + prefix + 2 * n_space;
    char *s = malloc(n);              // (n) escaped text
    symbol_t *sym = malloc(n * sizeof *sym);     // (n) one per character at most
    bigram_t *h = malloc(3 * n * sizeof *h);     // (3n) candidate merges
    if (!s || !sym || !h) {
        free(s), free(sym), free(h);
        return MLM_ENOMEM;
    }
    size_t k = 0;
    if (prefix) memcpy(s + k, "\xE2\x96\x81", 3), k += 3;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') memcpy(s + k, "\xE2\x96\x81", 3), k += 3;
        else s[k++] = text[i];
    }
    merge_and_emit(t, s, k, sym, h, true, e);
    free(s), free(sym), free(h);
    return 0;
}

// --- helpers: GPT-2 BPE

static unsigned cp_flags(const uint32_t *cp, int n, int pos) { return pos < n ? uni_flags(cp[pos]) : 0; }

// GPT-2 pre-tokenizer over codepoints cp[0..n), by hand:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Unassigned codepoints match no class and become words of their own, as in llama.cpp.
// Writes the end (exclusive) of each word to ends; returns the word count.
static int gpt2_split(const uint32_t *cp, int n, int *ends) {
    int nw = 0, pos = 0;
    while (pos < n) {
        uint32_t c = cp[pos];
        if (c == '\'' && pos + 1 < n) {
            uint32_t c1 = cp[pos + 1];
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                pos += 2;
                ends[nw++] = pos;
                continue;
            }
            if (pos + 2 < n) {
                uint32_t c2 = cp[pos + 2];
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
                    pos += 3;
                    ends[nw++] = pos;
                    continue;
                }
            }
        }
        int p = pos + (c == ' ');  // where the class run would start after an optional space
        unsigned f = cp_flags(cp, n, p);
        if (f & UNI_LETTER) {
            while (cp_flags(cp, n, p) & UNI_LETTER) p++;
            ends[nw++] = pos = p;
            continue;
        }
        if (f & UNI_NUMBER) {
            while (cp_flags(cp, n, p) & UNI_NUMBER) p++;
            ends[nw++] = pos = p;
            continue;
        }
        if (f && !(f & (UNI_WHITESPACE | UNI_LETTER | UNI_NUMBER))) {
            for (;;) {
                unsigned g = cp_flags(cp, n, p);
                if (!g || (g & (UNI_WHITESPACE | UNI_LETTER | UNI_NUMBER))) break;
                p++;
            }
            ends[nw++] = pos = p;
            continue;
        }
        int nws = 0;
        while (cp_flags(cp, n, pos + nws) & UNI_WHITESPACE) nws++;
        if (nws > 1 && pos + nws < n) pos += nws - 1;  // \s+(?!\S): leave the last one to the next word
        else if (nws > 0) pos += nws;                  // \s+
        else pos++;                                    // no match: one codepoint alone
        ends[nw++] = pos;
    }
    return nw;
}

// Byte-level BPE of one raw fragment.
static int bpe_encode(const tokenizer_t *t, const char *text, size_t len, emit_t *e) {
    uint32_t *cp = malloc((len ? len : 1) * sizeof *cp);  // (len) codepoints, at most one per byte
    int *ends = malloc((len ? len : 1) * sizeof *ends);    // (len) word ends in codepoints
    if (!cp || !ends) {
        free(cp), free(ends);
        return MLM_ENOMEM;
    }
    int n = 0;
    for (size_t i = 0; i < len;) {
        size_t adv;
        cp[n++] = uni_decode((const unsigned char *)text + i, len - i, &adv);
        i += adv;
    }
    int nw = gpt2_split(cp, n, ends);
    int longest = 0;
    for (int w = 0, a = 0; w < nw; a = ends[w++])
        if (ends[w] - a > longest) longest = ends[w] - a;
    size_t wcap = (size_t)longest * 8;  // 4 UTF-8 bytes per codepoint, 2 bytes per byte-level char
    char *s = malloc(wcap ? wcap : 1);                     // (wcap) byte-level text of one word
    symbol_t *sym = malloc((wcap ? wcap : 1) * sizeof *sym);   // (wcap)
    bigram_t *h = malloc((wcap ? 3 * wcap : 1) * sizeof *h);   // (3 * wcap)
    int rc = 0;
    if (!s || !sym || !h) rc = MLM_ENOMEM;
    for (int w = 0, a = 0; rc == 0 && w < nw; a = ends[w++]) {
        size_t k = 0;
        for (int i = a; i < ends[w]; i++) {
            char u[4];  // UTF-8 of the codepoint
            int ul = uni_encode(cp[i], u);
            for (int j = 0; j < ul; j++) {
                const unsigned char *m = t->bl_utf8[(unsigned char)u[j]];
                memcpy(s + k, m + 1, m[0]);
                k += m[0];
            }
        }
        merge_and_emit(t, s, k, sym, h, false, e);
    }
    free(cp), free(ends), free(s), free(sym), free(h);
    return rc;
}

// --- helpers: special-token partition

// Splits raw fragments around literal occurrences of special tokens, longest token first.
// *frags (with *nf entries, *capf allocated) is replaced by the result.
static int partition(const tokenizer_t *t, const char *text, bool parse_special, frag_t **frags, int *nf,
                     int *capf) {
    for (int si = 0; si < t->n_special; si++) {
        int32_t id = t->special[si];
        if (!parse_special && (t->type[id] == TOK_TYPE_CONTROL || t->type[id] == TOK_TYPE_UNKNOWN)) continue;
        const char *st = tok_text(t, id);
        size_t sl = t->text_len[id];
        for (int fi = 0; fi < *nf; fi++) {
            frag_t f = (*frags)[fi];
            if (f.tok >= 0) continue;
            const char *m = memmem(text + f.off, f.len, st, sl);
            if (!m) continue;
            size_t at = (size_t)(m - text);
            // replace f by up to three fragments: left text, the token, right text (searched next)
            frag_t rep[3];  // replacement fragments for f
            int nr = 0;
            if (at > f.off) rep[nr++] = (frag_t){f.off, at - f.off, -1};
            rep[nr++] = (frag_t){0, 0, id};
            if (at + sl < f.off + f.len) rep[nr++] = (frag_t){at + sl, f.off + f.len - at - sl, -1};
            if (*nf + nr - 1 > *capf) {
                int nc = *capf * 2 + 4;
                frag_t *nfr = realloc(*frags, (size_t)nc * sizeof *nfr);
                if (!nfr) return MLM_ENOMEM;
                *frags = nfr;
                *capf = nc;
            }
            memmove(*frags + fi + nr, *frags + fi + 1, (size_t)(*nf - fi - 1) * sizeof **frags);
            memcpy(*frags + fi, rep, (size_t)nr * sizeof *rep);
            *nf += nr - 1;
            fi += nr - 2;  // continue with the right remainder (or the next fragment)
        }
    }
    return 0;
}

// --- helpers: loading

static int read_id(const gguf_t *g, const char *key, int n_vocab, int32_t *id, char *err, size_t errlen) {
    int64_t v;
    int rc = gguf_get_i64(g, key, &v);
    if (rc == MLM_ENOTFOUND) return 0;
    if (rc) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: not an integer", key);
    if (v >= 0 && v < n_vocab) *id = (int32_t)v;  // out of range: keep the default, as llama.cpp does
    return 0;
}

static int read_bool(const gguf_t *g, const char *key, bool *out, char *err, size_t errlen) {
    int rc = gguf_get_bool(g, key, out);
    if (rc == MLM_ENOTFOUND) return 0;
    if (rc) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: not a bool", key);
    return 0;
}

static bool str_is(const char *p, size_t n, const char *lit) { return strlen(lit) == n && memcmp(p, lit, n) == 0; }

// Pre-tokenizer names for which llama.cpp uses the GPT-2 regex (plus "default" and none).
static bool pre_is_gpt2(const char *p, size_t n) {
    static const char *const names[] = {"default", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat",
                                        "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code",
                                        "roberta-bpe"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (str_is(p, n, names[i])) return true;
    return false;
}

static int load_tokens(tokenizer_t *t, const gguf_t *g, char *err, size_t errlen) {
    const char *key = "tokenizer.ggml.tokens";
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return mlm_fail(err, errlen, MLM_ENOTFOUND, "%s: missing", key);
    if (v->type != GGUF_VT_ARRAY || v->v.arr.type != GGUF_VT_STRING || !v->v.arr.items)
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: not an array of strings", key);
    uint64_t n = v->v.arr.n;
    if (n == 0 || n > (uint64_t)INT32_MAX / 2)
        return mlm_fail(err, errlen, MLM_ERANGE, "%s: %llu tokens", key, (unsigned long long)n);
    t->n_vocab = (int)n;
    size_t total = 0;
    char name[32];  // "[EMPTY_<i>]" for empty token texts
    for (uint64_t i = 0; i < n; i++) {
        uint64_t l = v->v.arr.items[i].v.str.len;
        total += (l ? l : (size_t)snprintf(name, sizeof name, "[EMPTY_%llu]", (unsigned long long)i)) + 1;
        if (total > UINT32_MAX) return mlm_fail(err, errlen, MLM_ERANGE, "%s: texts too long", key);
    }
    t->text = malloc(total);
    t->text_off = malloc(n * sizeof *t->text_off);
    t->text_len = malloc(n * sizeof *t->text_len);
    t->score = calloc(n, sizeof *t->score);
    t->type = malloc(n);
    if (!t->text || !t->text_off || !t->text_len || !t->score || !t->type)
        return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory for %llu tokens", (unsigned long long)n);
    size_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        const gguf_value_t *it = &v->v.arr.items[i];
        size_t l = it->v.str.len;
        t->text_off[i] = (uint32_t)off;
        if (l) memcpy(t->text + off, it->v.str.ptr, l);
        else l = (size_t)snprintf(t->text + off, total - off, "[EMPTY_%llu]", (unsigned long long)i);
        t->text_len[i] = (uint32_t)l;
        t->text[off + l] = 0;
        off += l + 1;
        t->type[i] = TOK_TYPE_NORMAL;
    }
    const gguf_value_t *sc = gguf_find(g, "tokenizer.ggml.scores");
    if (sc) {
        if (sc->type != GGUF_VT_ARRAY || sc->v.arr.n != n)
            return mlm_fail(err, errlen, MLM_EFORMAT, "tokenizer.ggml.scores: not an array of %llu numbers",
                            (unsigned long long)n);
        for (uint64_t i = 0; i < n; i++)
            if (gguf_arr_f32(sc, i, &t->score[i]))
                return mlm_fail(err, errlen, MLM_EFORMAT, "tokenizer.ggml.scores[%llu]: not a number",
                                (unsigned long long)i);
    }
    const gguf_value_t *ty = gguf_find(g, "tokenizer.ggml.token_type");
    if (ty) {
        if (ty->type != GGUF_VT_ARRAY || ty->v.arr.n != n)
            return mlm_fail(err, errlen, MLM_EFORMAT, "tokenizer.ggml.token_type: not an array of %llu integers",
                            (unsigned long long)n);
        for (uint64_t i = 0; i < n; i++) {
            int64_t x;
            if (gguf_arr_i64(ty, i, &x))
                return mlm_fail(err, errlen, MLM_EFORMAT, "tokenizer.ggml.token_type[%llu]: not an integer",
                                (unsigned long long)i);
            t->type[i] = (x >= 0 && x <= TOK_TYPE_BYTE) ? (uint8_t)x : TOK_TYPE_UNDEFINED;
        }
    }
    if (hash_init(&t->tok_ix, n)) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory for the token index");
    for (uint64_t i = 0; i < n; i++) tok_index_put(t, (int32_t)i);
    return 0;
}

static int load_merges(tokenizer_t *t, const gguf_t *g, char *err, size_t errlen) {
    const char *key = "tokenizer.ggml.merges";
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return mlm_fail(err, errlen, MLM_ENOTFOUND, "%s: missing (needed by a gpt2 tokenizer)", key);
    if (v->type != GGUF_VT_ARRAY || v->v.arr.type != GGUF_VT_STRING || (v->v.arr.n && !v->v.arr.items))
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: not an array of strings", key);
    uint64_t n = v->v.arr.n;
    if (n > (uint64_t)INT32_MAX / 2)
        return mlm_fail(err, errlen, MLM_ERANGE, "%s: %llu merges", key, (unsigned long long)n);
    size_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        total += v->v.arr.items[i].v.str.len + 1;
        if (total > UINT32_MAX) return mlm_fail(err, errlen, MLM_ERANGE, "%s: texts too long", key);
    }
    t->merge_text = malloc(total ? total : 1);
    t->merge_off = malloc((n ? n : 1) * sizeof *t->merge_off);
    t->merge_len = malloc((n ? n : 1) * sizeof *t->merge_len);
    t->merge_left = malloc((n ? n : 1) * sizeof *t->merge_left);
    if (!t->merge_text || !t->merge_off || !t->merge_len || !t->merge_left || hash_init(&t->merge_ix, n))
        return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory for %llu merges", (unsigned long long)n);
    size_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        const gguf_value_t *it = &v->v.arr.items[i];
        size_t l = it->v.str.len;
        if (l) memcpy(t->merge_text + off, it->v.str.ptr, l);
        t->merge_text[off + l] = 0;
        // split at the first space after the first byte; merges without one can never apply
        const char *sp = l > 1 ? memchr(t->merge_text + off + 1, ' ', l - 1) : NULL;
        t->merge_off[t->n_merges] = (uint32_t)off;
        t->merge_len[t->n_merges] = (uint32_t)l;
        t->merge_left[t->n_merges] = sp ? (uint32_t)(sp - (t->merge_text + off)) : 0;
        off += l + 1;
        if (sp) {
            merge_index_put(t, t->n_merges);
            t->n_merges++;
        } else {
            // keep ranks aligned with indices: store an entry that never matches
            t->merge_left[t->n_merges] = UINT32_MAX;
            t->n_merges++;
        }
    }
    return 0;
}

static int cmp_special(const void *a, const void *b, void *ctx) {
    const tokenizer_t *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (t->text_len[x] != t->text_len[y]) return t->text_len[x] > t->text_len[y] ? -1 : 1;
    return (x > y) - (x < y);
}

static void add_eog(tokenizer_t *t, int32_t id) {
    if (id < 0) return;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id) return;
    if (t->n_eog < TOK_MAX_EOG) t->eog[t->n_eog++] = id;
}

// End-of-turn detection by text, the special-token list and the EOG set, as llama.cpp derives them.
static int derive_specials(tokenizer_t *t) {
    static const char *const eot_names[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                            "<|endoftext|>", "<EOT>", "\xEF\xBD\x9C" "end\xE2\x96\x81" "of"
                                            "\xE2\x96\x81" "sentence\xEF\xBD\x9C"};
    static const char *const eog_names[] = {"<|eom_id|>", "_<EOT>"};
    for (size_t i = 0; i < sizeof eot_names / sizeof *eot_names; i++) {
        int32_t id = lookup(t, eot_names[i], strlen(eot_names[i]));
        if (id < 0) continue;
        if (t->eot < 0) t->eot = id;
        t->type[id] = TOK_TYPE_CONTROL;
        add_eog(t, id);
    }
    for (size_t i = 0; i < sizeof eog_names / sizeof *eog_names; i++) {
        int32_t id = lookup(t, eog_names[i], strlen(eog_names[i]));
        if (id < 0) continue;
        t->type[id] = TOK_TYPE_CONTROL;
        add_eog(t, id);
    }
    add_eog(t, t->eos);
    add_eog(t, t->eot);
    add_eog(t, t->eom);

    int n = 0;
    for (int i = 0; i < t->n_vocab; i++) {
        int ty = t->type[i];
        n += ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_USER_DEFINED || ty == TOK_TYPE_UNKNOWN;
    }
    t->special = malloc((n ? n : 1) * sizeof *t->special);
    if (!t->special) return MLM_ENOMEM;
    for (int i = 0; i < t->n_vocab; i++) {
        int ty = t->type[i];
        if (ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_USER_DEFINED || ty == TOK_TYPE_UNKNOWN)
            t->special[t->n_special++] = i;
    }
    qsort_r(t->special, (size_t)t->n_special, sizeof *t->special, cmp_special, t);
    return 0;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Byte value of a "<0xNN>" token: up to two hex digits from offset 3, like strtol would read them.
static unsigned char token_byte(const char *s, size_t n) {
    unsigned v = 0;
    for (size_t i = 3; i < 5 && i < n && hex_digit(s[i]) >= 0; i++) v = v * 16 + (unsigned)hex_digit(s[i]);
    return (unsigned char)v;
}

// Appends the piece of token id to buf (growing it); returns 0 or MLM_ENOMEM.
static int render_piece(const tokenizer_t *t, int32_t id, char **buf, size_t *len, size_t *cap) {
    const char *s = tok_text(t, id);
    size_t n = t->text_len[id];
    size_t need = *len + 32 + (n + 1) * 16;  // worst case: "[UNK_BYTE_0x..<text>]" per codepoint
    if (need > *cap) {
        size_t nc = *cap * 2 > need ? *cap * 2 : need;
        char *nb = realloc(*buf, nc);
        if (!nb) return MLM_ENOMEM;
        *buf = nb;
        *cap = nc;
    }
    char *o = *buf + *len;
    int ty = t->type[id];
    if (ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNKNOWN) return 0;
    if (ty == TOK_TYPE_USER_DEFINED) {
        memcpy(o, s, n);
        *len += n;
        return 0;
    }
    if (ty == TOK_TYPE_BYTE && (t->kind == TOK_KIND_SPM || n >= 5)) {
        *o = (char)token_byte(s, n);
        *len += 1;
        return 0;
    }
    if (ty != TOK_TYPE_NORMAL) return 0;
    size_t k = 0;
    if (t->kind == TOK_KIND_SPM) {
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(s + i, "\xE2\x96\x81", 3) == 0) o[k++] = ' ', i += 3;
            else o[k++] = s[i++];
        }
    } else {
        for (size_t i = 0; i < n;) {
            size_t adv;
            uint32_t c = uni_decode((const unsigned char *)s + i, n - i, &adv);
            i += adv;
            int b = uni_cp_to_byte(c);
            if (b >= 0) {
                o[k++] = (char)b;
                continue;
            }
            // llama.cpp writes "[UNK_BYTE_0x<utf8 hex><token text>]" for characters outside the alphabet
            size_t need2 = *len + k + 32 + n;
            if (need2 > *cap) {
                char *nb = realloc(*buf, need2 * 2);
                if (!nb) return MLM_ENOMEM;
                *buf = nb;
                *cap = need2 * 2;
                o = *buf + *len;
            }
            char u[4];  // UTF-8 of c
            int ul = uni_encode(c, u);
            k += (size_t)sprintf(o + k, "[UNK_BYTE_0x");
            for (int j = 0; j < ul; j++) k += (size_t)sprintf(o + k, "%02x", (unsigned char)u[j]);
            memcpy(o + k, s, n);
            k += n;
            o[k++] = ']';
        }
    }
    *len += k;
    return 0;
}

static int build_pieces(tokenizer_t *t) {
    size_t cap = (size_t)t->n_vocab * 8 + 64, len = 0;
    t->piece = malloc(cap);
    t->piece_off = malloc((size_t)t->n_vocab * sizeof *t->piece_off);
    t->piece_len = malloc((size_t)t->n_vocab * sizeof *t->piece_len);
    if (!t->piece || !t->piece_off || !t->piece_len) return MLM_ENOMEM;
    for (int i = 0; i < t->n_vocab; i++) {
        size_t before = len;
        int rc = render_piece(t, i, &t->piece, &len, &cap);
        if (rc) return rc;
        if (len > UINT32_MAX) return MLM_ERANGE;
        t->piece_off[i] = (uint32_t)before;
        t->piece_len[i] = (uint32_t)(len - before);
    }
    return 0;
}

// Sanitises a[0..na) ++ b[0..nb) into well-formed UTF-8. Writes to out when out is not NULL
// (the caller checked the size), returns the output length; *hold = trailing incomplete bytes.
static size_t utf8_sanitize(const unsigned char *a, size_t na, const unsigned char *b, size_t nb, char *out,
                            size_t *hold) {
    size_t n = na + nb, i = 0, o = 0;
    *hold = 0;
    while (i < n) {
        unsigned char w[4];  // up to 4 bytes starting at logical position i
        size_t wn = n - i < 4 ? n - i : 4;
        for (size_t k = 0; k < wn; k++) w[k] = i + k < na ? a[i + k] : b[i + k - na];
        size_t l;
        int r = uni_utf8_check(w, wn, &l);
        if (r == 0) {
            *hold = n - i;
            break;
        }
        if (r > 0) {
            if (out) memcpy(out + o, w, l);
            o += l;
        } else {
            if (out) memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
        }
        i += l;
    }
    return o;
}

// --- public API

int tokenizer_from_gguf(tokenizer_t **out, const gguf_t *g, char *err, size_t errlen) {
    if (!out) return mlm_fail(err, errlen, MLM_EINVAL, "tokenizer_from_gguf: out is NULL");
    *out = NULL;
    if (!g) return mlm_fail(err, errlen, MLM_EINVAL, "tokenizer_from_gguf: no gguf");
    const char *model, *pre = NULL;
    size_t model_len, pre_len = 0;
    int rc = gguf_get_str(g, "tokenizer.ggml.model", &model, &model_len);
    if (rc == MLM_ENOTFOUND) return mlm_fail(err, errlen, rc, "tokenizer.ggml.model: missing");
    if (rc) return mlm_fail(err, errlen, MLM_EFORMAT, "tokenizer.ggml.model: not a string");
    rc = gguf_get_str(g, "tokenizer.ggml.pre", &pre, &pre_len);
    if (rc && rc != MLM_ENOTFOUND) return mlm_fail(err, errlen, MLM_EFORMAT, "tokenizer.ggml.pre: not a string");

    tokenizer_t *t = calloc(1, sizeof *t);
    if (!t) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    if (str_is(model, model_len, "llama")) {
        t->kind = TOK_KIND_SPM;
        t->bos = 1, t->eos = 2, t->unk = 0;
        t->add_bos = true;
        t->add_space_prefix = true;
    } else if (str_is(model, model_len, "gpt2")) {
        t->kind = TOK_KIND_BPE;
        t->bos = 11, t->eos = 11, t->unk = -1;
        if (rc == 0 && !pre_is_gpt2(pre, pre_len)) {
            free(t);
            return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "tokenizer.ggml.pre = \"%.*s\" is not supported",
                            (int)(pre_len > 64 ? 64 : pre_len), pre);
        }
    } else {
        free(t);
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "tokenizer.ggml.model = \"%.*s\" is not supported",
                        (int)(model_len > 64 ? 64 : model_len), model);
    }
    t->pad = t->sep = t->eot = t->eom = -1;

    rc = load_tokens(t, g, err, errlen);
    if (!rc && t->kind == TOK_KIND_BPE) rc = load_merges(t, g, err, errlen);
    if (rc) {
        tokenizer_destroy(&t);
        return rc;
    }
    int32_t *def[] = {&t->bos, &t->eos, &t->unk};  // (3) ids with kind defaults
    for (int i = 0; i < 3; i++)
        if (*def[i] >= t->n_vocab) *def[i] = -1;
    if (!rc) rc = read_id(g, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos, err, errlen);
    if (!rc) rc = read_id(g, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos, err, errlen);
    if (!rc) rc = read_id(g, "tokenizer.ggml.unknown_token_id", t->n_vocab, &t->unk, err, errlen);
    if (!rc) rc = read_id(g, "tokenizer.ggml.seperator_token_id", t->n_vocab, &t->sep, err, errlen);
    if (!rc) rc = read_id(g, "tokenizer.ggml.padding_token_id", t->n_vocab, &t->pad, err, errlen);
    if (!rc) rc = read_id(g, "tokenizer.ggml.eot_token_id", t->n_vocab, &t->eot, err, errlen);
    if (!rc) rc = read_id(g, "tokenizer.ggml.eom_token_id", t->n_vocab, &t->eom, err, errlen);
    if (!rc) rc = read_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos, err, errlen);
    if (!rc) rc = read_bool(g, "tokenizer.ggml.add_eos_token", &t->add_eos, err, errlen);
    if (!rc) rc = read_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err, errlen);
    if (t->kind == TOK_KIND_BPE) t->add_space_prefix = false;
    if (!rc) {
        rc = derive_specials(t);
        if (rc) mlm_fail(err, errlen, rc, "out of memory");
    }
    for (int b = 0; b < 256; b++) {
        char hex[8];  // "<0xNN>"
        snprintf(hex, sizeof hex, "<0x%02X>", (unsigned)b);
        char one = (char)b;
        t->byte_tok[b] = lookup(t, hex, 6);
        if (t->byte_tok[b] < 0) t->byte_tok[b] = lookup(t, &one, 1);
        char u[4];  // UTF-8 of the byte-level character
        int ul = uni_encode(uni_byte_to_cp((uint8_t)b), u);
        t->bl_utf8[b][0] = (unsigned char)ul;
        memcpy(&t->bl_utf8[b][1], u, (size_t)ul);
    }
    if (!rc) {
        rc = build_pieces(t);
        if (rc) mlm_fail(err, errlen, rc, "cannot render token pieces");
    }
    if (rc) {
        tokenizer_destroy(&t);
        return rc;
    }
    *out = t;
    return 0;
}

void tokenizer_destroy(tokenizer_t **self_p) {
    if (!self_p || !*self_p) return;
    tokenizer_t *t = *self_p;
    free(t->text), free(t->text_off), free(t->text_len), free(t->score), free(t->type);
    free(t->piece), free(t->piece_off), free(t->piece_len), free(t->tok_ix.slot);
    free(t->merge_text), free(t->merge_off), free(t->merge_len), free(t->merge_left), free(t->merge_ix.slot);
    free(t->special);
    free(t);
    *self_p = NULL;
}

int tokenizer_encode(const tokenizer_t *t, const char *text, size_t len, bool add_bos, bool parse_special,
                     int32_t *out, int cap) {
    if (!t || (!text && len) || cap < 0 || (!out && cap > 0)) return MLM_EINVAL;
    if (len > (size_t)INT_MAX / 4) return MLM_ERANGE;
    emit_t e = {out, cap, 0};
    if (add_bos && t->bos >= 0) emit(&e, t->bos);
    if (len == 0) return e.n;

    int capf = 8, nf = 1;
    frag_t *frags = malloc((size_t)capf * sizeof *frags);  // (capf) partition of the text
    if (!frags) return MLM_ENOMEM;
    frags[0] = (frag_t){0, len, -1};
    int rc = partition(t, text, parse_special, &frags, &nf, &capf);
    bool prev_special = true;  // SPM: a space prefix goes before text at the start or after a special token
    for (int i = 0; rc == 0 && i < nf; i++) {
        if (frags[i].tok >= 0) {
            emit(&e, frags[i].tok);
            prev_special = true;
            continue;
        }
        if (t->kind == TOK_KIND_SPM)
            rc = spm_encode(t, text + frags[i].off, frags[i].len, t->add_space_prefix && prev_special, &e);
        else
            rc = bpe_encode(t, text + frags[i].off, frags[i].len, &e);
        prev_special = false;
    }
    free(frags);
    return rc ? rc : e.n;
}

int tokenizer_n_vocab(const tokenizer_t *t) { return t ? t->n_vocab : 0; }
tok_kind_t tokenizer_kind(const tokenizer_t *t) { return t ? t->kind : TOK_KIND_SPM; }
int32_t tokenizer_bos(const tokenizer_t *t) { return t ? t->bos : -1; }
int32_t tokenizer_eos(const tokenizer_t *t) { return t ? t->eos : -1; }
int32_t tokenizer_unk(const tokenizer_t *t) { return t ? t->unk : -1; }
bool tokenizer_add_bos(const tokenizer_t *t) { return t && t->add_bos; }
bool tokenizer_add_eos(const tokenizer_t *t) { return t && t->add_eos; }

bool tokenizer_is_eog(const tokenizer_t *t, int32_t tok) {
    if (!t || tok < 0 || tok >= t->n_vocab) return false;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == tok) return true;
    return false;
}

const char *tokenizer_token_text(const tokenizer_t *t, int32_t tok) {
    if (!t || tok < 0 || tok >= t->n_vocab) return NULL;
    return tok_text(t, tok);
}

int tokenizer_token_type(const tokenizer_t *t, int32_t tok) {
    if (!t || tok < 0 || tok >= t->n_vocab) return MLM_EINVAL;
    return t->type[tok];
}

float tokenizer_token_score(const tokenizer_t *t, int32_t tok) {
    if (!t || tok < 0 || tok >= t->n_vocab) return 0.0f;
    return t->score[tok];
}

int32_t tokenizer_find(const tokenizer_t *t, const char *text, size_t len) {
    if (!t || (!text && len)) return -1;
    return lookup(t, text, len);
}

int tokenizer_token_piece(const tokenizer_t *t, int32_t tok, char *buf, size_t cap) {
    if (!t || tok < 0 || tok >= t->n_vocab || (!buf && cap)) return MLM_EINVAL;
    size_t n = t->piece_len[tok];
    memcpy(buf, t->piece + t->piece_off[tok], n < cap ? n : cap);
    return (int)n;
}

int tokenizer_decode(const tokenizer_t *t, const int32_t *toks, int n, char *buf, size_t cap) {
    if (!t || n < 0 || (!toks && n) || (!buf && cap)) return MLM_EINVAL;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (toks[i] < 0 || toks[i] >= t->n_vocab) return MLM_EINVAL;
        size_t l = t->piece_len[toks[i]];
        if (total < cap) memcpy(buf + total, t->piece + t->piece_off[toks[i]], cap - total < l ? cap - total : l);
        total += l;
        if (total > INT_MAX) return MLM_ERANGE;
    }
    return (int)total;
}

int tokenizer_stream_push(const tokenizer_t *t, tok_stream_t *s, int32_t tok, char *out, size_t cap) {
    if (!t || !s || tok < 0 || tok >= t->n_vocab || (!out && cap) || s->npend < 0 || s->npend > 3)
        return MLM_EINVAL;
    const unsigned char *p = (const unsigned char *)t->piece + t->piece_off[tok];
    size_t pn = t->piece_len[tok], hold;
    size_t need = utf8_sanitize(s->pend, (size_t)s->npend, p, pn, NULL, &hold);
    if (need > cap) return MLM_ERANGE;
    if (need > INT_MAX) return MLM_ERANGE;
    utf8_sanitize(s->pend, (size_t)s->npend, p, pn, out, &hold);
    // keep the held tail (<= 3 bytes; it may straddle the old pending bytes and the piece)
    unsigned char tail[4];  // new pending bytes
    size_t n = (size_t)s->npend + pn;
    for (size_t k = 0; k < hold; k++) {
        size_t i = n - hold + k;
        tail[k] = i < (size_t)s->npend ? s->pend[i] : p[i - (size_t)s->npend];
    }
    memcpy(s->pend, tail, hold);
    s->npend = (int)hold;
    return (int)need;
}

int tokenizer_stream_flush(const tokenizer_t *t, tok_stream_t *s, char *out, size_t cap) {
    if (!s || (!out && cap) || s->npend < 0 || s->npend > 3) return MLM_EINVAL;
    if (s->npend == 0) return 0;
    if (cap < 3) return MLM_ERANGE;
    memcpy(out, "\xEF\xBF\xBD", 3);  // a held incomplete sequence is one maximal ill-formed subpart
    s->npend = 0;
    return 3;
}
