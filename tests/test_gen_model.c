// CUnit suite "gen_model": meshlm gen-model files read back: metadata, shapes, types, values, seeding.
#include <CUnit/CUnit.h>
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/cli/cli.h"
#include "test_util.h"
#include "core/err.h"
#include "worker/format/gguf.h"
#include "worker/kernels/quant.h"

// --- helpers

// Runs `meshlm gen-model` in-process with a NULL-terminated argument list (after "gen-model").
static int gen(const char *first, ...) {
    char *argv[32];
    int argc = 0;
    argv[argc++] = "gen-model";
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 31; a = va_arg(ap, const char *)) argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;
    return cmd_gen_model(argc, argv);
}

static char *tmp_path(char *buf, size_t cap, const char *dir, const char *name) {
    snprintf(buf, cap, "%s/%s", dir, name);
    return buf;
}

static uint64_t get_u(const gguf_t *g, const char *key) {
    uint64_t v = UINT64_MAX;
    CU_ASSERT_EQUAL(gguf_get_u64(g, key, &v), 0);
    return v;
}

// Asserts that tensor name exists with this type and shape (ne2 = 0 for 2-D, ne1 = ne2 = 0 for 1-D).
static void expect_tensor(const gguf_t *g, const char *name, qtype_t type, int64_t ne0, int64_t ne1, int64_t ne2) {
    const gguf_tensor_t *t = gguf_find_tensor(g, name);
    CU_ASSERT_PTR_NOT_NULL(t);
    if (!t) {
        fprintf(stderr, "missing tensor %s\n", name);
        return;
    }
    int nd = ne2 ? 3 : ne1 ? 2 : 1;
    CU_ASSERT_EQUAL(t->type, type);
    CU_ASSERT_EQUAL(t->n_dims, nd);
    CU_ASSERT_EQUAL(t->ne[0], ne0);
    CU_ASSERT_EQUAL(t->ne[1], ne1 ? ne1 : 1);
    CU_ASSERT_EQUAL(t->ne[2], ne2 ? ne2 : 1);
    if (t->type != type) fprintf(stderr, "%s: type %s, want %s\n", name, qtype_name(t->type), qtype_name(type));
}

// Mean and standard deviation of a tensor's dequantized values.
static void tensor_stats(const gguf_tensor_t *t, double *mean, double *sd) {
    int64_t n = gguf_tensor_nelements(t);
    float *x = malloc((size_t)n * sizeof *x);
    CU_ASSERT_PTR_NOT_NULL_FATAL(x);
    quant_dequantize_ref(t->type, t->data, x, n);
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) {
        s += x[i];
        ss += (double)x[i] * x[i];
    }
    *mean = s / (double)n;
    *sd = sqrt(ss / (double)n - *mean * *mean);
    free(x);
}

static int files_equal(const char *a, const char *b) {
    size_t la = 0, lb = 0;
    void *pa = test_read_file(a, &la), *pb = test_read_file(b, &lb);
    int eq = pa && pb && la == lb && !memcmp(pa, pb, la);
    free(pa);
    free(pb);
    return eq;
}

// --- tests

static void test_tiny_q8_0(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024], err[256];
    tmp_path(p, sizeof p, dir, "tiny-q8.gguf");
    CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny", "--quant", "Q8_0", "--seed", "7", "--vocab", "512",
                              "--ctx", "1024", NULL), 0);
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
    const char *s;
    size_t sl;
    CU_ASSERT(gguf_get_str(g, "general.architecture", &s, &sl) == 0 && sl == 5 && !memcmp(s, "llama", 5));
    CU_ASSERT_EQUAL(get_u(g, "general.file_type"), 7);
    CU_ASSERT_EQUAL(get_u(g, "general.quantization_version"), 2);
    CU_ASSERT_EQUAL(get_u(g, "llama.context_length"), 1024);
    CU_ASSERT_EQUAL(get_u(g, "llama.embedding_length"), 64);
    CU_ASSERT_EQUAL(get_u(g, "llama.block_count"), 2);
    CU_ASSERT_EQUAL(get_u(g, "llama.feed_forward_length"), 128);
    CU_ASSERT_EQUAL(get_u(g, "llama.rope.dimension_count"), 16);
    CU_ASSERT_EQUAL(get_u(g, "llama.attention.head_count"), 4);
    CU_ASSERT_EQUAL(get_u(g, "llama.attention.head_count_kv"), 2);
    CU_ASSERT_EQUAL(get_u(g, "llama.vocab_size"), 512);
    CU_ASSERT_EQUAL(get_u(g, "tokenizer.ggml.bos_token_id"), 1);
    CU_ASSERT_EQUAL(get_u(g, "tokenizer.ggml.eos_token_id"), 2);
    CU_ASSERT_EQUAL(get_u(g, "tokenizer.ggml.unknown_token_id"), 0);
    CU_ASSERT_PTR_NULL(gguf_find(g, "llama.expert_count"));
    float f;
    CU_ASSERT(gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f) == 0 && f == 1e-5f);
    CU_ASSERT(gguf_get_f32(g, "llama.rope.freq_base", &f) == 0 && f == 10000.0f);
    CU_ASSERT(gguf_get_str(g, "tokenizer.ggml.model", &s, &sl) == 0 && sl == 5 && !memcmp(s, "llama", 5));

    // built-in vocab: specials, byte tokens, unique texts
    const gguf_value_t *toks = gguf_find(g, "tokenizer.ggml.tokens");
    const gguf_value_t *types = gguf_find(g, "tokenizer.ggml.token_type");
    const gguf_value_t *scores = gguf_find(g, "tokenizer.ggml.scores");
    CU_ASSERT_PTR_NOT_NULL_FATAL(toks);
    CU_ASSERT_PTR_NOT_NULL_FATAL(types);
    CU_ASSERT_PTR_NOT_NULL_FATAL(scores);
    CU_ASSERT_EQUAL_FATAL(toks->v.arr.n, 512);
    CU_ASSERT_EQUAL(types->v.arr.n, 512);
    CU_ASSERT_EQUAL(scores->v.arr.n, 512);
    CU_ASSERT(toks->v.arr.items[1].v.str.len == 3 && !memcmp(toks->v.arr.items[1].v.str.ptr, "<s>", 3));
    CU_ASSERT(toks->v.arr.items[3 + 0x0A].v.str.len == 6 &&
              !memcmp(toks->v.arr.items[3 + 0x0A].v.str.ptr, "<0x0A>", 6));
    int64_t ty;
    CU_ASSERT(gguf_arr_i64(types, 0, &ty) == 0 && ty == 2);
    CU_ASSERT(gguf_arr_i64(types, 2, &ty) == 0 && ty == 3);
    CU_ASSERT(gguf_arr_i64(types, 258, &ty) == 0 && ty == 6);
    CU_ASSERT(gguf_arr_i64(types, 300, &ty) == 0 && ty == 1);
    int dup = 0;
    for (int i = 0; i < 512; i++)
        for (int j = i + 1; j < 512; j++) {
            const gguf_value_t *a = &toks->v.arr.items[i], *b = &toks->v.arr.items[j];
            dup += a->v.str.len == b->v.str.len && !memcmp(a->v.str.ptr, b->v.str.ptr, a->v.str.len);
        }
    CU_ASSERT_EQUAL(dup, 0);

    // tensors
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 3 + 2 * 9);
    expect_tensor(g, "token_embd.weight", QT_Q8_0, 64, 512, 0);
    expect_tensor(g, "output_norm.weight", QT_F32, 64, 0, 0);
    expect_tensor(g, "output.weight", QT_Q8_0, 64, 512, 0);
    for (int l = 0; l < 2; l++) {
        char n[64];
#define EXPECT(suffix, type, a, b)                                    \
        snprintf(n, sizeof n, "blk.%d.%s.weight", l, suffix);       \
        expect_tensor(g, n, type, a, b, 0)
        EXPECT("attn_norm", QT_F32, 64, 0);
        EXPECT("attn_q", QT_Q8_0, 64, 64);
        EXPECT("attn_k", QT_Q8_0, 64, 32);
        EXPECT("attn_v", QT_Q8_0, 64, 32);
        EXPECT("attn_output", QT_Q8_0, 64, 64);
        EXPECT("ffn_norm", QT_F32, 64, 0);
        EXPECT("ffn_gate", QT_Q8_0, 64, 128);
        EXPECT("ffn_up", QT_Q8_0, 64, 128);
        EXPECT("ffn_down", QT_Q8_0, 128, 64);
#undef EXPECT
    }
    // values: projections ~N(0, 0.02), norms ~1
    double mean, sd;
    tensor_stats(gguf_find_tensor(g, "blk.1.ffn_up.weight"), &mean, &sd);
    CU_ASSERT(fabs(mean) < 0.002);
    CU_ASSERT(sd > 0.018 && sd < 0.022);
    tensor_stats(gguf_find_tensor(g, "token_embd.weight"), &mean, &sd);
    CU_ASSERT(sd > 0.018 && sd < 0.022);
    tensor_stats(gguf_find_tensor(g, "blk.0.attn_norm.weight"), &mean, &sd);
    CU_ASSERT(fabs(mean - 1.0) < 0.01);
    CU_ASSERT(sd > 0.01 && sd < 0.03);
    gguf_close(&g);

    // same seed: the same bytes (also with a different thread count); another seed: different bytes
    char p2[1024], p3[1024];
    tmp_path(p2, sizeof p2, dir, "tiny-q8-again.gguf");
    tmp_path(p3, sizeof p3, dir, "tiny-q8-seed8.gguf");
    CU_ASSERT_EQUAL(gen(p2, "--preset", "tiny", "--quant", "Q8_0", "--seed", "7", "--vocab", "512", "--ctx",
                        "1024", "--threads", "3", NULL), 0);
    CU_ASSERT_EQUAL(gen(p3, "--preset", "tiny", "--quant", "Q8_0", "--seed", "8", "--vocab", "512", "--ctx",
                        "1024", NULL), 0);
    CU_ASSERT(files_equal(p, p2));
    CU_ASSERT(!files_equal(p, p3));
    gguf_t *g3 = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g3, p3, err, sizeof err), 0);
    CU_ASSERT_EQUAL(get_u(g3, "meshlm.gen.seed"), 8);
    gguf_close(&g3);
    test_rm_dir(dir);
}

static void test_quant_types(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024], err[256];
    const struct {
        const char *q;     // --quant
        qtype_t w;         // 2-D weight type on the tiny preset (rows of 64/128)
        uint32_t ftype;    // general.file_type
        int quantized;     // has general.quantization_version
    } cases[] = {
        {"F32", QT_F32, 0, 0},   {"F16", QT_F16, 1, 0},   {"BF16", QT_BF16, 32, 0}, {"Q4_0", QT_Q4_0, 2, 1},
        {"Q4_1", QT_Q4_1, 3, 1}, {"Q5_0", QT_Q5_0, 8, 1}, {"Q5_1", QT_Q5_1, 9, 1},
        {"Q4_K", QT_F16, 14, 1}, // 64 is not a multiple of 256: falls back to F16
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "tiny-%s.gguf", cases[i].q);
        tmp_path(p, sizeof p, dir, name);
        CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny", "--quant", cases[i].q, "--vocab", "320", NULL), 0);
        gguf_t *g = NULL;
        CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
        CU_ASSERT_EQUAL(get_u(g, "general.file_type"), cases[i].ftype);
        CU_ASSERT_EQUAL(gguf_find(g, "general.quantization_version") != NULL, cases[i].quantized);
        expect_tensor(g, "token_embd.weight", cases[i].w, 64, 320, 0);
        expect_tensor(g, "blk.1.ffn_down.weight", cases[i].w, 128, 64, 0);
        expect_tensor(g, "blk.0.ffn_norm.weight", QT_F32, 64, 0, 0);
        double mean, sd;
        tensor_stats(gguf_find_tensor(g, "blk.0.attn_q.weight"), &mean, &sd);
        CU_ASSERT(sd > 0.017 && sd < 0.023);
        gguf_close(&g);
    }
    test_rm_dir(dir);
}

static void test_q4_k_m_mix(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024], err[256];
    tmp_path(p, sizeof p, dir, "tk.gguf");
    CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny-k", "--quant", "Q4_K_M", "--layers", "4", "--vocab", "512",
                              NULL), 0);
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(get_u(g, "general.file_type"), 15);
    CU_ASSERT_EQUAL(get_u(g, "llama.block_count"), 4);
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 3 + 4 * 9);
    expect_tensor(g, "token_embd.weight", QT_Q4_K, 256, 512, 0);
    expect_tensor(g, "output.weight", QT_Q6_K, 256, 512, 0);
    // with 4 layers the "more bits" layers are 2 and 3
    const qtype_t v_type[4] = {QT_Q4_K, QT_Q4_K, QT_Q6_K, QT_Q6_K};
    for (int l = 0; l < 4; l++) {
        char n[64];
        snprintf(n, sizeof n, "blk.%d.attn_v.weight", l);
        expect_tensor(g, n, v_type[l], 256, 128, 0);
        snprintf(n, sizeof n, "blk.%d.ffn_down.weight", l);
        expect_tensor(g, n, v_type[l], 512, 256, 0);
        snprintf(n, sizeof n, "blk.%d.attn_q.weight", l);
        expect_tensor(g, n, QT_Q4_K, 256, 256, 0);
    }
    double mean, sd;
    tensor_stats(gguf_find_tensor(g, "blk.3.ffn_down.weight"), &mean, &sd);
    CU_ASSERT(sd > 0.017 && sd < 0.023);
    gguf_close(&g);
    test_rm_dir(dir);
}

static void test_moe(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024], err[256];
    tmp_path(p, sizeof p, dir, "moe.gguf");
    CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny", "--quant", "Q4_0", "--experts", "4", "--top-k", "2",
                              "--vocab", "400", NULL), 0);
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(get_u(g, "llama.expert_count"), 4);
    CU_ASSERT_EQUAL(get_u(g, "llama.expert_used_count"), 2);
    CU_ASSERT_EQUAL(get_u(g, "llama.feed_forward_length"), 128);
    CU_ASSERT_EQUAL(gguf_n_tensors(g), 3 + 2 * 10);
    for (int l = 0; l < 2; l++) {
        char n[64];
        snprintf(n, sizeof n, "blk.%d.ffn_gate_inp.weight", l);
        expect_tensor(g, n, QT_F32, 64, 4, 0);
        snprintf(n, sizeof n, "blk.%d.ffn_gate_exps.weight", l);
        expect_tensor(g, n, QT_Q4_0, 64, 128, 4);
        snprintf(n, sizeof n, "blk.%d.ffn_up_exps.weight", l);
        expect_tensor(g, n, QT_Q4_0, 64, 128, 4);
        snprintf(n, sizeof n, "blk.%d.ffn_down_exps.weight", l);
        expect_tensor(g, n, QT_Q4_0, 128, 64, 4);
        snprintf(n, sizeof n, "blk.%d.ffn_gate.weight", l);
        CU_ASSERT_PTR_NULL(gguf_find_tensor(g, n));
    }
    // the router is ~N(0, 1/sqrt(dim)) = 0.125
    double mean, sd;
    tensor_stats(gguf_find_tensor(g, "blk.0.ffn_gate_inp.weight"), &mean, &sd);
    CU_ASSERT(sd > 0.1 && sd < 0.15);
    gguf_close(&g);

    // the preset's own MoE, cut to one layer, with --experts overriding the expert count
    tmp_path(p, sizeof p, dir, "moe2.gguf");
    CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny-k", "--quant", "F16", "--experts", "3", "--vocab", "320", NULL), 0);
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(get_u(g, "llama.expert_count"), 3);
    CU_ASSERT_EQUAL(get_u(g, "llama.expert_used_count"), 2);
    expect_tensor(g, "blk.1.ffn_down_exps.weight", QT_F16, 512, 256, 3);
    gguf_close(&g);
    test_rm_dir(dir);
}

static void test_tokenizer_sources(void) {
    char spm[1024], err[256];
    test_shared_path(spm, sizeof spm, "models/vocab/ggml-vocab-llama-spm.gguf");
    if (access(spm, R_OK) != 0) {
        fprintf(stderr, "(skipped: %s missing) ", spm);
        return;
    }
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024];
    // the tiny preset has 32000 tokens: the shared Llama-2 vocab is used by default
    tmp_path(p, sizeof p, dir, "tiny-spm.gguf");
    CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny", "--quant", "Q4_0", "--layers", "1", NULL), 0);
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
    const gguf_value_t *toks = gguf_find(g, "tokenizer.ggml.tokens");
    CU_ASSERT_PTR_NOT_NULL_FATAL(toks);
    CU_ASSERT_EQUAL_FATAL(toks->v.arr.n, 32000);
    CU_ASSERT(toks->v.arr.items[15043].v.str.len == 8 && !memcmp(toks->v.arr.items[15043].v.str.ptr, "▁Hello", 8));
    CU_ASSERT_EQUAL(get_u(g, "llama.vocab_size"), 32000);
    expect_tensor(g, "token_embd.weight", QT_Q4_0, 64, 32000, 0);
    gguf_close(&g);

    // --tokenizer-from: the vocab size follows the file, not --vocab or the preset
    tmp_path(p, sizeof p, dir, "tok-from.gguf");
    CU_ASSERT_EQUAL_FATAL(gen(p, "--preset", "tiny", "--quant", "F16", "--layers", "1", "--builtin-vocab",
                              "--tokenizer-from", spm, NULL), 0);
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(get_u(g, "llama.vocab_size"), 32000);
    CU_ASSERT_PTR_NOT_NULL(gguf_find(g, "tokenizer.ggml.scores"));
    gguf_close(&g);
    test_rm_dir(dir);
}

static void test_bad_arguments(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024];
    tmp_path(p, sizeof p, dir, "x.gguf");
    CU_ASSERT_EQUAL(gen(p, "--preset", "nope", NULL), 2);
    CU_ASSERT_EQUAL(gen(p, "--preset", "tiny", "--quant", "Q9_9", NULL), 2);
    CU_ASSERT_EQUAL(gen(p, "--preset", "tiny", "--layers", "0", NULL), 2);
    CU_ASSERT_EQUAL(gen(p, "--preset", "tiny", "--top-k", "2", NULL), 2);
    CU_ASSERT_EQUAL(gen(p, "--preset", "tiny", "--experts", "2", "--top-k", "3", NULL), 2);
    CU_ASSERT_EQUAL(gen("--preset", "tiny", NULL), 2);
    CU_ASSERT_EQUAL(gen(p, "--preset", "tiny", "--tokenizer-from", "/nonexistent/x.gguf", NULL), 1);
    char bad[1100];
    snprintf(bad, sizeof bad, "%s/no/such/dir.gguf", dir);
    CU_ASSERT_EQUAL(gen(bad, "--preset", "tiny", "--vocab", "320", NULL), 1);
    CU_ASSERT_EQUAL(access(p, F_OK), -1);
    test_rm_dir(dir);
}

// --- suite

int test_gen_model_suite(void) {
    CU_pSuite s = CU_add_suite("gen_model", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "tiny Q8_0: metadata, vocab, shapes, values, seeding", test_tiny_q8_0) ||
        !CU_add_test(s, "quant types and F16 fallback", test_quant_types) ||
        !CU_add_test(s, "Q4_K_M mix", test_q4_k_m_mix) ||
        !CU_add_test(s, "MoE tensors", test_moe) ||
        !CU_add_test(s, "tokenizer from the shared vocab", test_tokenizer_sources) ||
        !CU_add_test(s, "bad arguments", test_bad_arguments))
        return -1;
    return 0;
}
