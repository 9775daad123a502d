// meshlm gen-model: writes a llama-architecture GGUF with seeded random weights in a real model's shape.
#include <ctype.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "coordinator/cli/cli.h"
#include "coordinator/cli/routing_stats.h"
#include "core/err.h"
#include "core/rng.h"
#include "worker/format/gguf.h"
#include "worker/format/gguf_write.h"
#include "worker/format/model_presets.h"
#include "worker/kernels/quant.h"
#include "worker/kernels/threadpool.h"

// --- types

#define GEN_CHUNK_BYTES (8u << 20)   // quantized bytes produced per parallel step
#define GEN_MAX_THREADS 256
#define GEN_DEFAULT_SEED 1
#define GEN_SPM_VOCAB "models/vocab/ggml-vocab-llama-spm.gguf"
#define GEN_MIN_BUILTIN_VOCAB 320    // 3 specials + 256 bytes + room for pieces

// llama.cpp token types (tokenizer.ggml.token_type)
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_BYTE = 6 };

typedef struct {
    const char *out;            // output path
    const char *preset;         // preset name
    const char *quant;          // quant name as given ("Q4_K_M")
    int layers;                 // 0: preset's
    int experts, top_k;         // 0: preset's
    uint64_t seed;              // weight seed
    const char *tok_from;       // GGUF to copy tokenizer.* from, or NULL
    int ctx;                    // 0: preset's
    int vocab;                  // 0: preset's / tokenizer's; > 0 forces the built-in vocab
    bool builtin_vocab;         // never look for the shared vocab file
    int threads;                // 0: all cores
    bool router_realistic;      // --router realistic (else uniform: i.i.d. router weights)
    int routing_stats;          // --routing-stats N: measure the routing of the written file over N tokens (0: no)
} gen_opts_t;

typedef struct {
    qtype_t base;               // type of most 2-D weights
    qtype_t hi;                 // type of output / some attn_v and ffn_down (== base unless a _M mix)
    bool mix;                   // a llama.cpp-style _M mix
    bool quantized;             // base is a block type (writes general.quantization_version)
    uint32_t ftype;             // general.file_type (llama_ftype)
} quant_plan_t;

typedef struct {
    char name[64];              // tensor name
    qtype_t type;               // element type in the file
    int n_dims;                 // 1..3
    int64_t ne[3];              // ggml order: ne[0] is the row length
    float mean, std;            // init: mean + std * N(0,1)
    int router_layer;           // a realistic router (ffn_gate_inp of this block; -1: an ordinary tensor)
    uint64_t model_seed;        // the file's seed (a realistic router's rows share directions across blocks)
} gen_tensor_t;

typedef struct {
    gen_tensor_t *t;            // (n) tensors in file order
    int n, cap;                 // used / allocated
} tensor_list_t;

typedef struct {                // one parallel step: rows [row0, row0 + nrows) of one tensor
    const gen_tensor_t *t;      // the tensor
    uint64_t tseed;             // its seed
    int64_t row0, nrows;        // row range
    size_t row_bytes;           // bytes per quantized row
    uint8_t *out;               // (nrows * row_bytes) destination
    float *scratch;             // (nth, max_row) one float row per thread
    int64_t max_row;            // scratch row stride
    int rc[GEN_MAX_THREADS];    // per-thread result
} gen_job_t;

typedef struct {                // built-in SentencePiece-style vocabulary
    char **tok;                 // (n) token texts, pointers into arena
    float *score;               // (n)
    int32_t *type;              // (n) TOK_*
    char *arena;                // text storage
    int n;                      // tokens
} vocab_t;

// Realistic routing (--router realistic). A trained MoE's router does not choose uniformly: some experts
// of a block are picked more often than others, and the hidden state changes little from one block to
// the next, so adjacent blocks agree more often than chance. Row e of block l's router is
//   g(l, e) * (sqrt(RR_SHARE) * B_e + sqrt(1 - RR_SHARE) * N(l, e)) * std
// where B_e is a direction shared by expert e of every block (adjacent blocks see nearly the same
// residual stream, so a shared direction makes them choose alike), N(l, e) the block's own, and
// g(l, e) = exp(RR_SKEW * z), z ~ N(0,1) per block and expert: a longer row wins the top-k more often,
// which skews popularity per block. Consecutive tokens agree through the residual stream itself (the
// attention output mixes the context into it) more than through the router. The constants were set by
// measuring `gen-model --routing-stats` on Mixtral-8x7B-shaped files against the figures in the README.
#define RR_SHARE 0.35f              // variance share of the direction common to every block
#define RR_SKEW 0.30f               // log-normal spread of the rows' lengths (expert popularity)
#define RR_SCALE 4.0f               // sharper than uniform's std: top-1 gate weights of 0.5-0.8
#define RR_EMB 1.7f                 // token_embd std in units of w_std^2 * n_embd (what a block adds per element)

// --- helpers: random numbers


// Approximately N(0,1): the sum of four 16-bit uniforms, centred and scaled (Irwin-Hall, |z| < 3.47).
static inline float approx_normal(uint64_t *s) {
    uint64_t r = mlm_rng_next(s);
    uint32_t sum = (uint32_t)(r & 0xffff) + (uint32_t)((r >> 16) & 0xffff) + (uint32_t)((r >> 32) & 0xffff) +
                   (uint32_t)(r >> 48);
    return ((float)sum - 131070.0f) * (1.7320508f / 65536.0f);
}

static uint64_t tensor_seed(uint64_t seed, int idx) {
    return mlm_mix64(seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL * (uint64_t)(idx + 1));
}

// --- helpers: quantization plan

static int plan_quant(const char *name, quant_plan_t *q) {
    static const struct {
        const char *name;  // --quant value
        qtype_t base, hi;  // types
        uint32_t ftype;    // llama_ftype
    } table[] = {
        {"F32", QT_F32, QT_F32, 0},       {"F16", QT_F16, QT_F16, 1},       {"BF16", QT_BF16, QT_BF16, 32},
        {"Q4_0", QT_Q4_0, QT_Q4_0, 2},    {"Q4_1", QT_Q4_1, QT_Q4_1, 3},    {"Q8_0", QT_Q8_0, QT_Q8_0, 7},
        {"Q5_0", QT_Q5_0, QT_Q5_0, 8},    {"Q5_1", QT_Q5_1, QT_Q5_1, 9},    {"Q2_K", QT_Q2_K, QT_Q2_K, 10},
        {"Q3_K", QT_Q3_K, QT_Q3_K, 11},   {"Q4_K", QT_Q4_K, QT_Q4_K, 14},   {"Q4_K_S", QT_Q4_K, QT_Q4_K, 14},
        {"Q4_K_M", QT_Q4_K, QT_Q6_K, 15}, {"Q5_K", QT_Q5_K, QT_Q5_K, 16},   {"Q5_K_S", QT_Q5_K, QT_Q5_K, 16},
        {"Q5_K_M", QT_Q5_K, QT_Q6_K, 17}, {"Q6_K", QT_Q6_K, QT_Q6_K, 18},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcasecmp(table[i].name, name)) continue;
        q->base = table[i].base;
        q->hi = table[i].hi;
        q->mix = table[i].hi != table[i].base;
        q->quantized = qtype_traits(table[i].base)->blck > 1;
        q->ftype = table[i].ftype;
        return 0;
    }
    return MLM_EINVAL;
}

// The layers that get more bits in a _M mix (first and last eighth, and every third in between).
static bool more_bits(int il, int n_layer) {
    return il < n_layer / 8 || il >= 7 * n_layer / 8 || (il - n_layer / 8) % 3 == 2;
}

// Type for a 2-D weight: the plan's type, or F16 when the row length is not a block multiple.
static qtype_t weight_type(qtype_t want, int64_t row_len) {
    const qtype_traits_t *tr = qtype_traits(want);
    return (tr && row_len % tr->blck == 0) ? want : QT_F16;
}

// --- helpers: tensor list

static int tl_add(tensor_list_t *l, const char *name, qtype_t type, int n_dims, int64_t ne0, int64_t ne1,
                  int64_t ne2, float mean, float std) {
    if (l->n == l->cap) {
        int c = l->cap ? l->cap * 2 : 64;
        gen_tensor_t *p = realloc(l->t, (size_t)c * sizeof *p);
        if (!p) return MLM_ENOMEM;
        l->t = p;
        l->cap = c;
    }
    gen_tensor_t *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    t->router_layer = -1;
    snprintf(t->name, sizeof t->name, "%s", name);
    t->type = type;
    t->n_dims = n_dims;
    t->ne[0] = ne0;
    t->ne[1] = ne1;
    t->ne[2] = ne2;
    t->mean = mean;
    t->std = std;
    return 0;
}

// Builds the tensor list of a llama (or Mixtral-style MoE) model in file order; realistic: the routers'
// rows are drawn by fill_router_row (model_seed: the file's seed).
static int build_tensors(tensor_list_t *l, const model_preset_t *m, const quant_plan_t *q, bool realistic,
                         uint64_t model_seed) {
    const int64_t dim = m->n_embd, ff = m->n_ff, E = m->n_expert, V = m->n_vocab;
    const int64_t hd = dim / m->n_head, kv_dim = hd * m->n_head_kv;
    const float w_std = 0.02f, norm_std = 0.02f, router_std = 1.0f / sqrtf((float)dim);
    char nm[64];
    // realistic routing: the token's own embedding must not drown in what the blocks add (see fill_router_row)
    const float emb_std = realistic && E > 0 ? RR_EMB * w_std * w_std * (float)dim : w_std;
    int rc = tl_add(l, "token_embd.weight", weight_type(q->base, dim), 2, dim, V, 1, 0.0f, emb_std);
    for (int il = 0; !rc && il < m->n_layer; il++) {
        qtype_t hi = (q->mix && more_bits(il, m->n_layer)) ? q->hi : q->base;
#define ADD(suffix, type, nd, a, b, c, mean, sd)                                       \
    do {                                                                               \
        snprintf(nm, sizeof nm, "blk.%d.%s.weight", il, suffix);                       \
        if (!rc) rc = tl_add(l, nm, type, nd, a, b, c, mean, sd);                     \
    } while (0)
        ADD("attn_norm", QT_F32, 1, dim, 1, 1, 1.0f, norm_std);
        ADD("attn_q", weight_type(q->base, dim), 2, dim, dim, 1, 0.0f, w_std);
        ADD("attn_k", weight_type(q->base, dim), 2, dim, kv_dim, 1, 0.0f, w_std);
        ADD("attn_v", weight_type(hi, dim), 2, dim, kv_dim, 1, 0.0f, w_std);
        ADD("attn_output", weight_type(q->base, dim), 2, dim, dim, 1, 0.0f, w_std);
        ADD("ffn_norm", QT_F32, 1, dim, 1, 1, 1.0f, norm_std);
        if (E > 0) {
            ADD("ffn_gate_inp", QT_F32, 2, dim, E, 1, 0.0f, router_std);
            if (!rc && realistic) {
                l->t[l->n - 1].router_layer = il;
                l->t[l->n - 1].model_seed = model_seed;
            }
            ADD("ffn_gate_exps", weight_type(q->base, dim), 3, dim, ff, E, 0.0f, w_std);
            ADD("ffn_down_exps", weight_type(hi, ff), 3, ff, dim, E, 0.0f, w_std);
            ADD("ffn_up_exps", weight_type(q->base, dim), 3, dim, ff, E, 0.0f, w_std);
        } else {
            ADD("ffn_gate", weight_type(q->base, dim), 2, dim, ff, 1, 0.0f, w_std);
            ADD("ffn_down", weight_type(hi, ff), 2, ff, dim, 1, 0.0f, w_std);
            ADD("ffn_up", weight_type(q->base, dim), 2, dim, ff, 1, 0.0f, w_std);
        }
#undef ADD
    }
    if (!rc) rc = tl_add(l, "output_norm.weight", QT_F32, 1, dim, 1, 1, 1.0f, norm_std);
    if (!rc) rc = tl_add(l, "output.weight", weight_type(q->hi, dim), 2, dim, V, 1, 0.0f, w_std);
    return rc;
}

// --- helpers: built-in vocabulary

static const char *const common_words[] = {
    "the", "and", "of", "to", "in", "is", "it", "that", "was", "for", "on", "with", "he", "she", "as",
    "you", "at", "be", "this", "have", "from", "or", "one", "had", "by", "but", "not", "what", "all",
    "were", "we", "when", "your", "can", "said", "there", "an", "each", "which", "do", "how", "their",
    "if", "will", "up", "other", "about", "out", "many", "then", "them", "so", "some", "her", "would",
    "make", "like", "him", "into", "time", "has", "look", "two", "more", "go", "see", "no", "way",
    "could", "people", "my", "than", "first", "been", "who", "its", "now", "day", "did", "get", "come",
    "made", "may", "once", "upon", "little", "girl", "boy", "big", "happy", "dog", "cat", "sun", "tree",
    "house", "friend", "play", "saw", "very", "they", "Once", "The", "She", "He", "They", "Tim", "Lily",
};

static void vocab_free(vocab_t *v) {
    free(v->tok);
    free(v->score);
    free(v->type);
    free(v->arena);
    memset(v, 0, sizeof *v);
}

// Appends a token; the arena is sized by the caller for n tokens of at most 16 bytes.
static void vocab_push(vocab_t *v, size_t *apos, const char *text, float score, int32_t type) {
    char *dst = v->arena + *apos;
    size_t len = strlen(text);
    memcpy(dst, text, len + 1);
    *apos += len + 1;
    v->tok[v->n] = dst;
    v->score[v->n] = score;
    v->type[v->n] = type;
    v->n++;
}

static bool is_common_word(const char *s) {
    for (size_t i = 0; i < sizeof common_words / sizeof common_words[0]; i++)
        if (!strcmp(common_words[i], s)) return true;
    return false;
}

// <unk> <s> </s>, <0x00>..<0xFF>, "▁", printable ASCII, "▁"+letters/digits, "▁"+common words, then
// letter strings of growing length with and without "▁" until n tokens. All texts are unique.
static int vocab_build(vocab_t *v, int n) {
    memset(v, 0, sizeof *v);
    v->tok = calloc((size_t)n, sizeof *v->tok);
    v->score = calloc((size_t)n, sizeof *v->score);
    v->type = calloc((size_t)n, sizeof *v->type);
    v->arena = malloc((size_t)n * 16);
    if (!v->tok || !v->score || !v->type || !v->arena) {
        vocab_free(v);
        return MLM_ENOMEM;
    }
    static const char sp[] = "\xe2\x96\x81"; // U+2581, SentencePiece's space
    size_t apos = 0;
    char buf[16];
    vocab_push(v, &apos, "<unk>", 0.0f, TOK_UNKNOWN);
    vocab_push(v, &apos, "<s>", 0.0f, TOK_CONTROL);
    vocab_push(v, &apos, "</s>", 0.0f, TOK_CONTROL);
    for (int b = 0; b < 256; b++) {
        snprintf(buf, sizeof buf, "<0x%02X>", b);
        vocab_push(v, &apos, buf, 0.0f, TOK_BYTE);
    }
    float score = 0.0f;
    vocab_push(v, &apos, sp, score -= 1.0f, TOK_NORMAL);
    for (int c = 0x21; c < 0x7f && v->n < n; c++) {
        buf[0] = (char)c;
        buf[1] = 0;
        vocab_push(v, &apos, buf, score -= 1.0f, TOK_NORMAL);
    }
    static const char alnum[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    for (int i = 0; alnum[i] && v->n < n; i++) {
        snprintf(buf, sizeof buf, "%s%c", sp, alnum[i]);
        vocab_push(v, &apos, buf, score -= 1.0f, TOK_NORMAL);
    }
    for (size_t i = 0; i < sizeof common_words / sizeof common_words[0] && v->n < n; i++) {
        snprintf(buf, sizeof buf, "%s%s", sp, common_words[i]);
        vocab_push(v, &apos, buf, score -= 1.0f, TOK_NORMAL);
    }
    // lowercase strings of length 2..5; "▁"-prefixed ones skip the common words already present
    for (int len = 2; len <= 5 && v->n < n; len++) {
        int64_t count = 1;
        for (int i = 0; i < len; i++) count *= 26;
        for (int pass = 0; pass < 2 && v->n < n; pass++) {
            for (int64_t k = 0; k < count && v->n < n; k++) {
                char w[8];
                int64_t x = k;
                for (int i = len - 1; i >= 0; i--) {
                    w[i] = (char)('a' + x % 26);
                    x /= 26;
                }
                w[len] = 0;
                if (pass == 1 && is_common_word(w)) continue;
                snprintf(buf, sizeof buf, "%s%s", pass ? sp : "", w);
                vocab_push(v, &apos, buf, score -= 1.0f, TOK_NORMAL);
            }
        }
    }
    return v->n == n ? 0 : MLM_ERANGE;
}

static int set_builtin_vocab(gguf_writer_t *w, int n, char *err, size_t errlen) {
    vocab_t v;
    int rc = vocab_build(&v, n);
    if (rc) return mlm_fail(err, errlen, rc, "cannot build a %d-token vocabulary: %s", n, mlm_strerror(rc));
    rc = gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    if (!rc) rc = gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v.tok, (uint64_t)n);
    if (!rc) rc = gguf_writer_set_arr(w, "tokenizer.ggml.scores", GGUF_VT_FLOAT32, v.score, (uint64_t)n);
    if (!rc) rc = gguf_writer_set_arr(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, v.type, (uint64_t)n);
    if (!rc) rc = gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1);
    if (!rc) rc = gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2);
    if (!rc) rc = gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    if (!rc) rc = gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true);
    if (!rc) rc = gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", false);
    vocab_free(&v);
    if (rc) return mlm_fail(err, errlen, rc, "cannot store the vocabulary: %s", mlm_strerror(rc));
    return 0;
}

// Copies tokenizer.* from path; *n_vocab becomes its token count.
static int copy_tokenizer(gguf_writer_t *w, const char *path, int *n_vocab, char *err, size_t errlen) {
    gguf_t *g = NULL;
    int rc = gguf_open(&g, path, err, errlen);
    if (rc) return rc;
    const gguf_value_t *toks = gguf_find(g, "tokenizer.ggml.tokens");
    if (!toks || toks->type != GGUF_VT_ARRAY || toks->v.arr.type != GGUF_VT_STRING || toks->v.arr.n == 0 ||
        toks->v.arr.n > INT32_MAX) {
        gguf_close(&g);
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: no tokenizer.ggml.tokens string array", path);
    }
    *n_vocab = (int)toks->v.arr.n;
    rc = gguf_writer_copy_kv(w, g, "tokenizer.");
    gguf_close(&g);
    if (rc < 0) return mlm_fail(err, errlen, rc, "%s: cannot copy tokenizer keys: %s", path, mlm_strerror(rc));
    return 0;
}

// --- helpers: weights

static void fill_router_row(const gen_tensor_t *t, uint64_t tseed, int64_t row, float *dst) {
    uint64_t sb = mlm_mix64(t->model_seed ^ (0x8cb92ba72f3d8dd7ULL * (uint64_t)(row + 1)));  // B_e
    uint64_t sn = mlm_mix64(tseed ^ (0xd1b54a32d192ed03ULL * (uint64_t)(row + 1)));           // N(l, e)
    uint64_t sg = mlm_mix64(t->model_seed ^ 0x2545f4914f6cdd1dULL ^ ((uint64_t)t->router_layer << 20) ^ (uint64_t)row);
    const float g = expf(RR_SKEW * approx_normal(&sg));
    const float a = sqrtf(RR_SHARE), b = sqrtf(1.0f - RR_SHARE);
    for (int64_t j = 0; j < t->ne[0]; j++)
        dst[j] = g * RR_SCALE * t->std * (a * approx_normal(&sb) + b * approx_normal(&sn));
}

static void fill_row(const gen_tensor_t *t, uint64_t tseed, int64_t row, float *dst) {
    if (t->router_layer >= 0) {
        fill_router_row(t, tseed, row, dst);
        return;
    }
    uint64_t s = mlm_mix64(tseed ^ (0xd1b54a32d192ed03ULL * (uint64_t)(row + 1)));
    for (int64_t j = 0; j < t->ne[0]; j++) dst[j] = t->mean + t->std * approx_normal(&s);
}

static void gen_rows(void *arg, int ith, int nth) {
    gen_job_t *j = arg;
    int64_t per = (j->nrows + nth - 1) / nth, r0 = per * ith, r1 = r0 + per;
    if (r1 > j->nrows) r1 = j->nrows;
    float *row = j->scratch + (size_t)ith * (size_t)j->max_row;
    j->rc[ith] = 0;
    for (int64_t r = r0; r < r1; r++) {
        fill_row(j->t, j->tseed, j->row0 + r, row);
        int rc = quant_quantize_ref(j->t->type, row, j->out + (size_t)r * j->row_bytes, j->t->ne[0]);
        if (rc) j->rc[ith] = rc;
    }
}

// Streams every tensor: generate + quantize a chunk of rows on all threads, write it, repeat.
static int write_weights(gguf_writer_t *w, const tensor_list_t *l, uint64_t seed, int n_threads,
                         char *err, size_t errlen) {
    int64_t max_row = 0;
    size_t max_row_bytes = 0;
    for (int i = 0; i < l->n; i++) {
        if (l->t[i].ne[0] > max_row) max_row = l->t[i].ne[0];
        size_t rb = qtype_row_size(l->t[i].type, l->t[i].ne[0]);
        if (rb > max_row_bytes) max_row_bytes = rb;
    }
    size_t chunk_cap = max_row_bytes > GEN_CHUNK_BYTES ? max_row_bytes : GEN_CHUNK_BYTES;
    tpool_t *pool = tpool_new(n_threads);
    gen_job_t *job = calloc(1, sizeof *job);
    uint8_t *chunk = malloc(chunk_cap);
    float *scratch = malloc((size_t)n_threads * (size_t)max_row * sizeof(float));
    int rc = 0;
    if (!pool || !job || !chunk || !scratch) {
        rc = mlm_fail(err, errlen, MLM_ENOMEM, "out of memory for %d generator threads", n_threads);
    }
    const bool tty = isatty(STDERR_FILENO);
    const double t0 = (mlm_now_ms() / 1e3);
    double last = t0;
    const double total = (double)(gguf_writer_bytes_written(w) + gguf_writer_data_size(w));
    for (int i = 0; !rc && i < l->n; i++) {
        const gen_tensor_t *t = &l->t[i];
        size_t row_bytes = qtype_row_size(t->type, t->ne[0]);
        int64_t rows = t->ne[1] * t->ne[2];
        int64_t per_chunk = (int64_t)(chunk_cap / row_bytes);
        for (int64_t r = 0; !rc && r < rows; r += per_chunk) {
            int64_t nr = rows - r < per_chunk ? rows - r : per_chunk;
            job->t = t;
            job->tseed = tensor_seed(seed, i);
            job->row0 = r;
            job->nrows = nr;
            job->row_bytes = row_bytes;
            job->out = chunk;
            job->scratch = scratch;
            job->max_row = max_row;
            if (nr * t->ne[0] < 4096) gen_rows(job, 0, 1); // tiny: not worth waking the pool
            else tpool_run(pool, gen_rows, job);
            for (int k = 0; k < tpool_size(pool) && !rc; k++) rc = job->rc[k];
            if (rc) {
                mlm_fail(err, errlen, rc, "cannot quantize %s to %s: %s", t->name, qtype_name(t->type),
                         mlm_strerror(rc));
                break;
            }
            rc = gguf_writer_write_data(w, chunk, (size_t)nr * row_bytes, err, errlen);
            double now = (mlm_now_ms() / 1e3);
            if (tty && !rc && now - last > 0.25) {
                last = now;
                double mb = (double)gguf_writer_bytes_written(w) / 1e6;
                fprintf(stderr, "\r  %8.1f / %.1f MB  %7.1f MB/s  %-32s", mb, total / 1e6, mb / (now - t0), t->name);
            }
        }
    }
    if (tty) fprintf(stderr, "\r%90s\r", "");
    free(scratch);
    free(chunk);
    free(job);
    tpool_destroy(&pool);
    return rc;
}

// --- helpers: command line

static void usage(FILE *f) {
    fprintf(f,
            "usage: meshlm gen-model OUT --preset NAME [--quant TYPE] [--layers N] [--experts E --top-k K]\n"
            "                        [--seed S] [--tokenizer-from GGUF] [--ctx N] [--vocab N] [--builtin-vocab]\n"
            "                        [--threads N] [--router uniform|realistic] [--routing-stats N]\n\n"
            "Writes a llama-architecture GGUF with seeded random weights in the shape of a known model.\n"
            "  --quant TYPE   F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q4_K_M Q5_K_M\n"
            "                 (default F16; rows that are not a block multiple fall back to F16)\n"
            "  --experts E    make it a Mixtral-style MoE with E experts (--top-k K used per token, default 2)\n"
            "  --router R     MoE router weights: uniform (default: i.i.d., every expert equally likely) or\n"
            "                 realistic (skewed expert popularity per block, adjacent blocks and consecutive\n"
            "                 tokens choosing alike more often than chance, as trained MoEs do; see README)\n"
            "  --routing-stats N  after writing, run N tokens through the file and print its routing statistics\n"
            "  --tokenizer-from GGUF  copy tokenizer.* from that file (the vocab size follows it)\n"
            "  --vocab N      built-in synthetic vocabulary of N tokens (implies --builtin-vocab)\n"
            "  --builtin-vocab  do not use the shared Llama-2 vocab even when the preset has 32000 tokens\n"
            "presets:\n");
    for (int i = 0; model_preset_at(i); i++) {
        const model_preset_t *m = model_preset_at(i);
        fprintf(f, "  %-16s dim %5d, %2d layers, %2d/%2d heads, ffn %5d, vocab %6d%s\n", m->name, m->n_embd,
                m->n_layer, m->n_head, m->n_head_kv, m->n_ff, m->n_vocab, m->n_expert ? ", MoE" : "");
    }
}

static int parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return MLM_EINVAL;
    *out = v;
    return 0;
}

// Fills o from argv; returns 0, 1 for --help, or MLM_EINVAL (message printed).
static int parse_args(int argc, char **argv, gen_opts_t *o) {
    enum { O_PRESET = 256, O_QUANT, O_LAYERS, O_EXPERTS, O_TOPK, O_SEED, O_TOK, O_CTX, O_VOCAB, O_BUILTIN, O_THREADS,
           O_ROUTER, O_RSTATS };
    static const struct option longs[] = {
        {"preset", required_argument, NULL, O_PRESET},   {"quant", required_argument, NULL, O_QUANT},
        {"layers", required_argument, NULL, O_LAYERS},   {"experts", required_argument, NULL, O_EXPERTS},
        {"top-k", required_argument, NULL, O_TOPK},      {"seed", required_argument, NULL, O_SEED},
        {"tokenizer-from", required_argument, NULL, O_TOK}, {"ctx", required_argument, NULL, O_CTX},
        {"vocab", required_argument, NULL, O_VOCAB},     {"builtin-vocab", no_argument, NULL, O_BUILTIN},
        {"threads", required_argument, NULL, O_THREADS}, {"router", required_argument, NULL, O_ROUTER},
        {"routing-stats", required_argument, NULL, O_RSTATS}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    memset(o, 0, sizeof *o);
    o->quant = "F16";
    o->seed = GEN_DEFAULT_SEED;
    optind = 0; // full reset: cmd_gen_model may be called more than once in one process (tests)
    opterr = 1;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
        int bad = 0;
        switch (c) {
        case O_PRESET: o->preset = optarg; break;
        case O_QUANT: o->quant = optarg; break;
        case O_LAYERS: bad = parse_int(optarg, 1, 100000, &v); o->layers = (int)v; break;
        case O_EXPERTS: bad = parse_int(optarg, 1, 4096, &v); o->experts = (int)v; break;
        case O_TOPK: bad = parse_int(optarg, 1, 4096, &v); o->top_k = (int)v; break;
        case O_CTX: bad = parse_int(optarg, 1, 1L << 30, &v); o->ctx = (int)v; break;
        case O_VOCAB: bad = parse_int(optarg, GEN_MIN_BUILTIN_VOCAB, 1000000, &v); o->vocab = (int)v; break;
        case O_THREADS: bad = parse_int(optarg, 1, GEN_MAX_THREADS, &v); o->threads = (int)v; break;
        case O_TOK: o->tok_from = optarg; break;
        case O_ROUTER:
            if (!strcmp(optarg, "realistic")) o->router_realistic = true;
            else if (!strcmp(optarg, "uniform")) o->router_realistic = false;
            else bad = 1;
            break;
        case O_RSTATS: bad = parse_int(optarg, 2, 100000, &v); o->routing_stats = (int)v; break;
        case O_BUILTIN: o->builtin_vocab = true; break;
        case O_SEED: {
            char *end;
            unsigned long long s = strtoull(optarg, &end, 0);
            if (!*optarg || *end) bad = 1;
            o->seed = s;
            break;
        }
        case 'h': return 1;
        default: return MLM_EINVAL;
        }
        if (bad) {
            fprintf(stderr, "gen-model: bad value '%s' for --%s\n", optarg, longs[c - O_PRESET].name);
            return MLM_EINVAL;
        }
    }
    if (optind + 1 != argc) {
        fprintf(stderr, "gen-model: expected exactly one output path\n");
        return MLM_EINVAL;
    }
    o->out = argv[optind];
    if (!o->preset) {
        fprintf(stderr, "gen-model: --preset is required\n");
        return MLM_EINVAL;
    }
    if (o->top_k && !o->experts) {
        fprintf(stderr, "gen-model: --top-k needs --experts\n");
        return MLM_EINVAL;
    }
    if (o->vocab && o->tok_from) {
        fprintf(stderr, "gen-model: --vocab and --tokenizer-from exclude each other\n");
        return MLM_EINVAL;
    }
    return 0;
}

static bool file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

// Writes every KV except the tokenizer's.
static int set_model_kv(gguf_writer_t *w, const model_preset_t *m, const quant_plan_t *q, const gen_opts_t *o) {
    char qn[16], name[160];
    size_t k = 0;
    for (; o->quant[k] && k + 1 < sizeof qn; k++) qn[k] = (char)toupper((unsigned char)o->quant[k]);
    qn[k] = 0;
    snprintf(name, sizeof name, "%s (random %s, %d layers%s)", m->display, qn, m->n_layer,
             m->n_expert ? ", MoE" : "");
    int rc = gguf_writer_set_str(w, "general.architecture", "llama");
    if (!rc) rc = gguf_writer_set_str(w, "general.name", name);
    if (!rc) rc = gguf_writer_set_u32(w, "general.file_type", q->ftype);
    if (!rc && q->quantized) rc = gguf_writer_set_u32(w, "general.quantization_version", 2);
    if (!rc) rc = gguf_writer_set_str(w, "meshlm.gen.preset", o->preset);
    if (!rc) rc = gguf_writer_set_u64(w, "meshlm.gen.seed", o->seed);
    if (!rc && m->n_expert) rc = gguf_writer_set_str(w, "meshlm.gen.router", o->router_realistic ? "realistic" : "uniform");
    if (!rc) rc = gguf_writer_set_u32(w, "llama.context_length", (uint32_t)m->n_ctx);
    if (!rc) rc = gguf_writer_set_u32(w, "llama.embedding_length", (uint32_t)m->n_embd);
    if (!rc) rc = gguf_writer_set_u32(w, "llama.block_count", (uint32_t)m->n_layer);
    if (!rc) rc = gguf_writer_set_u32(w, "llama.feed_forward_length", (uint32_t)m->n_ff);
    if (!rc) rc = gguf_writer_set_u32(w, "llama.rope.dimension_count", (uint32_t)(m->n_embd / m->n_head));
    if (!rc) rc = gguf_writer_set_u32(w, "llama.attention.head_count", (uint32_t)m->n_head);
    if (!rc) rc = gguf_writer_set_u32(w, "llama.attention.head_count_kv", (uint32_t)m->n_head_kv);
    if (!rc) rc = gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", m->rms_eps);
    if (!rc) rc = gguf_writer_set_f32(w, "llama.rope.freq_base", m->rope_base);
    if (!rc) rc = gguf_writer_set_u32(w, "llama.vocab_size", (uint32_t)m->n_vocab);
    if (!rc && m->n_expert) rc = gguf_writer_set_u32(w, "llama.expert_count", (uint32_t)m->n_expert);
    if (!rc && m->n_expert) rc = gguf_writer_set_u32(w, "llama.expert_used_count", (uint32_t)m->n_expert_used);
    return rc;
}

// --- public API

int cmd_gen_model(int argc, char **argv) {
    gen_opts_t o;
    int prc = parse_args(argc, argv, &o);
    if (prc == 1) {
        usage(stdout);
        return 0;
    }
    if (prc) {
        fprintf(stderr, "(see 'meshlm gen-model --help')\n");
        return 2;
    }
    const model_preset_t *pre = model_preset_find(o.preset);
    if (!pre) {
        fprintf(stderr, "gen-model: unknown preset '%s'; presets:", o.preset);
        for (int i = 0; model_preset_at(i); i++) fprintf(stderr, " %s", model_preset_at(i)->name);
        fprintf(stderr, "\n");
        return 2;
    }
    quant_plan_t q;
    if (plan_quant(o.quant, &q)) {
        fprintf(stderr, "gen-model: unknown or unsupported --quant '%s'\n", o.quant);
        return 2;
    }
    model_preset_t m = *pre;
    if (o.layers) m.n_layer = o.layers;
    if (o.ctx) m.n_ctx = o.ctx;
    if (o.experts) {
        m.n_expert = o.experts;
        m.n_expert_used = o.top_k ? o.top_k : (o.experts < 2 ? o.experts : 2);
    }
    if (m.n_expert_used > m.n_expert) {
        fprintf(stderr, "gen-model: --top-k %d exceeds --experts %d\n", m.n_expert_used, m.n_expert);
        return 2;
    }
    if (m.n_embd % m.n_head || m.n_head % m.n_head_kv) {
        fprintf(stderr, "gen-model: preset '%s' has inconsistent heads\n", m.name);
        return 2;
    }

    char err[2048] = "";
    gguf_writer_t *w = gguf_writer_new();
    tensor_list_t tl = {0};
    int rc = w ? 0 : MLM_ENOMEM;
    if (rc) mlm_fail(err, sizeof err, rc, "out of memory");

    // tokenizer first: it decides the vocabulary size
    char spm[1024];
    const char *shared = getenv("MESHLM_SHARED");
    snprintf(spm, sizeof spm, "%s/%s", (shared && *shared) ? shared : MESHLM_SHARED_DEFAULT, GEN_SPM_VOCAB);
    const char *tok_path = o.tok_from;
    if (!tok_path && !o.builtin_vocab && !o.vocab && m.n_vocab == 32000 && file_exists(spm)) tok_path = spm;
    if (!rc && tok_path) {
        int nv = 0;
        rc = copy_tokenizer(w, tok_path, &nv, err, sizeof err);
        if (!rc && nv != m.n_vocab)
            fprintf(stderr, "gen-model: note: %s has %d tokens; using that instead of the preset's %d\n",
                    tok_path, nv, m.n_vocab);
        if (!rc) m.n_vocab = nv;
    } else if (!rc) {
        if (o.vocab) m.n_vocab = o.vocab;
        if (m.n_vocab < GEN_MIN_BUILTIN_VOCAB) m.n_vocab = GEN_MIN_BUILTIN_VOCAB;
        rc = set_builtin_vocab(w, m.n_vocab, err, sizeof err);
    }

    if (!rc) {
        rc = set_model_kv(w, &m, &q, &o);
        if (rc) mlm_fail(err, sizeof err, rc, "cannot set metadata: %s", mlm_strerror(rc));
    }
    if (!rc) {
        rc = build_tensors(&tl, &m, &q, o.router_realistic, o.seed);
        if (rc) mlm_fail(err, sizeof err, rc, "cannot plan tensors: %s", mlm_strerror(rc));
    }
    uint64_t n_params = 0;
    for (int i = 0; !rc && i < tl.n; i++) {
        const gen_tensor_t *t = &tl.t[i];
        int64_t r = gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne);
        if (r < 0) {
            rc = (int)r;
            mlm_fail(err, sizeof err, rc, "cannot add tensor %s: %s", t->name, mlm_strerror(rc));
        }
        n_params += (uint64_t)(t->ne[0] * t->ne[1] * t->ne[2]);
    }
    double t0 = (mlm_now_ms() / 1e3);
    if (!rc) rc = gguf_writer_open(w, o.out, err, sizeof err);
    if (!rc) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        int nth = o.threads ? o.threads : (nc > 0 ? (int)nc : 1);
        if (nth > GEN_MAX_THREADS) nth = GEN_MAX_THREADS;
        rc = write_weights(w, &tl, o.seed, nth, err, sizeof err);
    }
    if (!rc) rc = gguf_writer_finish(w, err, sizeof err);
    if (!rc) {
        double dt = (mlm_now_ms() / 1e3) - t0, mb = (double)gguf_writer_bytes_written(w) / 1e6;
        fprintf(stderr, "gen-model: wrote %s: %s %s, %d tensors, %.3f B params, %.1f MB in %.2f s (%.0f MB/s)\n",
                o.out, m.name, o.quant, tl.n, (double)n_params / 1e9, mb, dt, dt > 0 ? mb / dt : 0.0);
    } else {
        fprintf(stderr, "gen-model: %s\n", err[0] ? err : mlm_strerror(rc));
    }
    if (!rc && o.routing_stats && m.n_expert > 0) {
        routing_stats_t rs;
        if (routing_stats_measure(o.out, o.routing_stats, o.threads, &rs, err, sizeof err) == 0) {
            routing_stats_print(&rs, stdout);
            routing_stats_free(&rs);
        } else
            fprintf(stderr, "gen-model: routing statistics: %s\n", err);
    }
    free(tl.t);
    gguf_writer_destroy(&w);
    return rc ? 1 : 0;
}
