// Shard suite: row-cut rules and shard files (each tensor holds exactly the source's rows).
#include <CUnit/CUnit.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "parallel/shard.h"

// --- tests

static void test_rows(void) {
    shard_slice_t s = {2, 4, 1, 2, 16, 32, 48, 96, 100, 200, 0, 4, 0, 0, {0}};
    int64_t r0, r1;
    shard_tensor_rows(&s, "blk.3.attn_q.weight", 64, 8, &r0, &r1);
    CU_ASSERT(r0 == 16 && r1 == 32);
    shard_tensor_rows(&s, "blk.3.attn_v.weight", 32, 8, &r0, &r1);
    CU_ASSERT(r0 == 8 && r1 == 16);
    shard_tensor_rows(&s, "blk.0.ffn_down_exps.weight", 64, 8, &r0, &r1);
    CU_ASSERT(r0 == 16 && r1 == 32);
    shard_tensor_rows(&s, "blk.0.ffn_up.weight", 172, 8, &r0, &r1);
    CU_ASSERT(r0 == 48 && r1 == 96);
    shard_tensor_rows(&s, "output.weight", 150, 8, &r0, &r1); // clamped to the tensor
    CU_ASSERT(r0 == 100 && r1 == 150);
    shard_tensor_rows(&s, "blk.0.attn_norm.weight", 1, 8, &r0, &r1);
    CU_ASSERT(r0 == 0 && r1 == 1);
    shard_tensor_rows(&s, "blk.0.ffn_gate_inp.weight", 8, 8, &r0, &r1);
    CU_ASSERT(r0 == 0 && r1 == 8);
}

static void check_shard_file(const char *rel, const shard_slice_t *slice) {
    char path[1024], err[512];
    gguf_t *src = NULL, *dst = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&src, test_shared_path(path, sizeof path, rel), err, sizeof err), 0);
    int64_t hd = 0, nh = 0, ne = 0;
    gguf_get_i64(src, "llama.embedding_length", &ne);
    gguf_get_i64(src, "llama.attention.head_count", &nh);
    hd = ne / nh;
    char *dir = test_tmpdir();
    char out[1024];
    snprintf(out, sizeof out, "%s/shard.gguf", dir);
    uint8_t sha[32];
    for (int i = 0; i < 32; i++) sha[i] = (uint8_t)(i * 7);
    int rc = shard_file_write(src, slice, (int)hd, sha, out, err, sizeof err);
    if (rc) fprintf(stderr, "shard_file_write: %s\n", err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL_FATAL(gguf_open(&dst, out, err, sizeof err), 0);
    shard_slice_t back;
    bool is_shard = false;
    CU_ASSERT_EQUAL(shard_file_slice(dst, &back, &is_shard), 0);
    CU_ASSERT(is_shard);
    CU_ASSERT_EQUAL(memcmp(&back, slice, sizeof back), 0);
    int64_t src_kv = gguf_n_kv(src), n_layer = 0, held = 0;
    gguf_get_i64(src, "llama.block_count", &n_layer);
    const bool tied = gguf_find_tensor(src, "output.weight") == NULL;
    // 12 range keys, the source hash, the vocabulary size (and the experts held by a placed slice)
    CU_ASSERT_EQUAL(gguf_n_kv(dst), src_kv + 14 + slice->placed);
    for (int64_t i = 0; i < gguf_n_tensors(src); i++) {
        const gguf_tensor_t *a = gguf_tensor(src, i), *b = gguf_find_tensor(dst, a->name);
        const bool exps = slice->placed && shard_expert_tensor(a->name);
        if (!shard_holds_tensor(slice, a->name, (int)n_layer, tied) ||
            (exps && shard_expert_count(slice, (int)a->ne[2]) == 0)) { // another stage's tensor, or no expert
            CU_ASSERT_PTR_NULL(b);
            continue;
        }
        held++;
        CU_ASSERT_PTR_NOT_NULL_FATAL(b);
        int64_t r0, r1;
        shard_tensor_rows(slice, a->name, a->ne[1], (int)hd, &r0, &r1);
        CU_ASSERT_EQUAL(b->ne[1], r1 - r0);
        CU_ASSERT_EQUAL(b->type, a->type);
        const size_t rb = qtype_row_size(a->type, a->ne[0]);
        CU_ASSERT_EQUAL(b->ne[2], exps ? shard_expert_count(slice, (int)a->ne[2]) : a->ne[2]);
        for (int64_t p = 0, q = 0; p < a->ne[2]; p++) { // q: the plane in the shard file
            if (exps && !shard_holds_expert(slice, (int)p)) continue;
            if (exps) CU_ASSERT_EQUAL(shard_expert_plane(slice, (int)p), q);
            const uint8_t *sa = (const uint8_t *)a->data + ((size_t)p * a->ne[1] + (size_t)r0) * rb;
            const uint8_t *sb = (const uint8_t *)b->data + (size_t)q++ * (size_t)(r1 - r0) * rb;
            CU_ASSERT_EQUAL(memcmp(sa, sb, (size_t)(r1 - r0) * rb), 0);
        }
    }
    CU_ASSERT_EQUAL(gguf_n_tensors(dst), held);
    gguf_close(&dst);
    gguf_close(&src);
    test_rm_dir(dir);
}

static void test_shard_files(void) {
    shard_slice_t a = {2, 5, 1, 3, 16, 48, 32, 96, 64, 256, 0, 5, 0, 0, {0}}; // stories260K: 8 heads, 4 KV, dim 64, FFN 172
    check_shard_file("models/stories260K.gguf", &a);
    shard_slice_t mid = {0, 8, 0, 4, 0, 64, 0, 172, 0, 0, 1, 3, 0, 0, {0}}; // a middle pipeline stage: blocks 1-2 only
    check_shard_file("models/stories260K.gguf", &mid);
    shard_slice_t tail = {0, 4, 0, 2, 0, 32, 0, 96, 0, 256, 3, 5, 0, 0, {0}}; // the last stage with a TP half
    check_shard_file("models/stories260K.gguf", &tail);
    shard_slice_t b = {4, 8, 1, 2, 128, 256, 0, 128, 256, 512, 0, 4, 0, 0, {0}}; // synth MoE: experts cut per expert
    check_shard_file("models/synth/synth-moe-Q4_K_M.gguf", &b);
    // placed experts: whole experts 1, 3 and 6 of blocks 1-3 (their planes alone), then none of them
    shard_slice_t placed = shard_full(4, 8, 2, 256, 256, 512);
    placed.l0 = 1;
    const uint16_t ids[] = {6, 1, 3};
    shard_set_experts(&placed, ids, 3);
    CU_ASSERT(shard_holds_expert(&placed, 3) && !shard_holds_expert(&placed, 2) && !shard_holds_expert(&placed, 300));
    CU_ASSERT(shard_expert_plane(&placed, 6) == 2 && shard_expert_plane(&placed, 0) == -1);
    CU_ASSERT_EQUAL(shard_expert_count(&placed, 8), 3);
    check_shard_file("models/synth/synth-moe-Q4_K_M.gguf", &placed);
    shard_set_experts(&placed, ids, 0);
    check_shard_file("models/synth/synth-moe-Q8_0.gguf", &placed);
    shard_slice_t c = shard_full(4, 8, 2, 256, 768, 512);
    check_shard_file("models/synth/synth-dense-Q8_0.gguf", &c);
}

static void test_plain_file_is_not_shard(void) {
    char path[1024], err[256];
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, test_shared_path(path, sizeof path, "models/stories260K.gguf"), err, sizeof err), 0);
    shard_slice_t s;
    bool is_shard = true;
    CU_ASSERT_EQUAL(shard_file_slice(g, &s, &is_shard), 0);
    CU_ASSERT_FALSE(is_shard);
    gguf_close(&g);
}

// Writing a shard file into a directory that does not exist: the error names the file and the reason.
static void test_write_error_names_path(void) {
    char path[1024], err[512] = "";
    gguf_t *g = NULL;
    test_shared_path(path, sizeof path, "models/stories260K.gguf");
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, path, err, sizeof err), 0);
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char out[1100];
    snprintf(out, sizeof out, "%s/no/such/dir/shard.gguf", dir);
    const shard_slice_t full = shard_full(5, 8, 4, 64, 172, 512);
    CU_ASSERT_EQUAL(shard_file_write(g, &full, 8, NULL, out, err, sizeof err), MLM_EIO);
    CU_ASSERT_EQUAL(strncmp(err, out, strlen(out)), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, strerror(ENOENT)));
    CU_ASSERT_EQUAL(rmdir(dir), 0); // nothing was left behind
    free(dir);
    gguf_close(&g);
}

int test_shard_suite(void) {
    CU_pSuite s = CU_add_suite("shard", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "row-cut rules", test_rows) || !CU_add_test(s, "shard files hold the source rows", test_shard_files) ||
        !CU_add_test(s, "a model file is not a shard", test_plain_file_is_not_shard) ||
        !CU_add_test(s, "a write error names the file and the reason", test_write_error_names_path))
        return -1;
    return 0;
}
