// CUnit suite "gguf_write": every KV type and tensor bytes round-trip through the reader; errors.
#include <CUnit/CUnit.h>
#include <errno.h>
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "worker/format/gguf.h"
#include "worker/format/gguf_write.h"

// --- helpers

static size_t vt_bytes(int t) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    default: return 8;
    }
}

// 1 if a and b hold the same value (same types, same bytes), recursively.
static int value_eq(const gguf_value_t *a, const gguf_value_t *b) {
    if (a->type != b->type) return 0;
    switch (a->type) {
    case GGUF_VT_UINT8: case GGUF_VT_UINT16: case GGUF_VT_UINT32: case GGUF_VT_UINT64: return a->v.u == b->v.u;
    case GGUF_VT_INT8: case GGUF_VT_INT16: case GGUF_VT_INT32: case GGUF_VT_INT64: return a->v.i == b->v.i;
    case GGUF_VT_FLOAT32: case GGUF_VT_FLOAT64: return a->v.f == b->v.f;
    case GGUF_VT_BOOL: return a->v.b == b->v.b;
    case GGUF_VT_STRING:
        return a->v.str.len == b->v.str.len && !memcmp(a->v.str.ptr, b->v.str.ptr, a->v.str.len);
    case GGUF_VT_ARRAY:
        if (a->v.arr.type != b->v.arr.type || a->v.arr.n != b->v.arr.n) return 0;
        if (a->v.arr.type == GGUF_VT_STRING || a->v.arr.type == GGUF_VT_ARRAY) {
            for (uint64_t i = 0; i < a->v.arr.n; i++)
                if (!value_eq(&a->v.arr.items[i], &b->v.arr.items[i])) return 0;
            return 1;
        }
        return a->v.arr.n == 0 || !memcmp(a->v.arr.raw, b->v.arr.raw, a->v.arr.n * vt_bytes(a->v.arr.type));
    default: return 0;
    }
}

// Number of directory entries other than . and ..
static int dir_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

static uint8_t pattern_byte(int t, size_t i) { return (uint8_t)(i * 131u + (size_t)t * 17u + (i >> 8)); }

// --- tests

static void test_all_kv_types_and_tensors(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char path[1024];
    snprintf(path, sizeof path, "%s/all.gguf", dir);

    gguf_writer_t *w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    CU_ASSERT_EQUAL(gguf_writer_set_u8(w, "t.u8", 250), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_i8(w, "t.i8", -100), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_u16(w, "t.u16", 65000), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_i16(w, "t.i16", -32000), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_u32(w, "t.u32", 4000000000u), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_i32(w, "t.i32", -2000000000), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_u64(w, "t.u64", 0xfedcba9876543210ULL), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_i64(w, "t.i64", -0x123456789abcLL), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_f32(w, "t.f32", 1.5e-5f), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_f64(w, "t.f64", -3.14159265358979), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_bool(w, "t.bool", true), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_str(w, "t.str", "placeholder"), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_str(w, "t.str", "héllo ▁world"), 0); // replaced in place
    CU_ASSERT_EQUAL(gguf_writer_set_strn(w, "t.strn", "a\0b", 3), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_str(w, "t.empty", ""), 0);
    const uint8_t a_u8[3] = {1, 2, 255};
    const int16_t a_i16[4] = {-1, 2, -30000, 30000};
    const uint32_t a_u32[2] = {7, 0xffffffffu};
    const int32_t a_i32[3] = {-5, 6, 2147483647};
    const float a_f32[3] = {0.5f, -2.25f, 1e30f};
    const double a_f64[2] = {1e-300, -0.125};
    const bool a_bool[3] = {true, false, true};
    const uint64_t a_u64[2] = {1, UINT64_MAX};
    const int64_t a_i64[2] = {INT64_MIN, 42};
    const int8_t a_i8[2] = {-128, 127};
    const uint16_t a_u16[1] = {65535};
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.u8", GGUF_VT_UINT8, a_u8, 3), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.i8", GGUF_VT_INT8, a_i8, 2), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.u16", GGUF_VT_UINT16, a_u16, 1), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.i16", GGUF_VT_INT16, a_i16, 4), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.u32", GGUF_VT_UINT32, a_u32, 2), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.i32", GGUF_VT_INT32, a_i32, 3), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.f32", GGUF_VT_FLOAT32, a_f32, 3), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.f64", GGUF_VT_FLOAT64, a_f64, 2), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.bool", GGUF_VT_BOOL, a_bool, 3), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.u64", GGUF_VT_UINT64, a_u64, 2), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.i64", GGUF_VT_INT64, a_i64, 2), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "a.empty", GGUF_VT_INT32, NULL, 0), 0);
    const char *strs[4] = {"<unk>", "", "▁the", "<0x0A>"};
    CU_ASSERT_EQUAL(gguf_writer_set_arr_str(w, "a.str", strs, 4), 0);

    // nested: [[1, 2, 3], [], [-4]] and [["x", "yy"], ["zzz"]]
    const int32_t n0[3] = {1, 2, 3}, n2[1] = {-4};
    gguf_value_t inner[3] = {{.type = GGUF_VT_ARRAY}, {.type = GGUF_VT_ARRAY}, {.type = GGUF_VT_ARRAY}};
    inner[0].v.arr.type = GGUF_VT_INT32; inner[0].v.arr.n = 3; inner[0].v.arr.raw = (const uint8_t *)n0;
    inner[1].v.arr.type = GGUF_VT_INT32; inner[1].v.arr.n = 0;
    inner[2].v.arr.type = GGUF_VT_INT32; inner[2].v.arr.n = 1; inner[2].v.arr.raw = (const uint8_t *)n2;
    gguf_value_t nested = {.type = GGUF_VT_ARRAY};
    nested.v.arr.type = GGUF_VT_ARRAY; nested.v.arr.n = 3; nested.v.arr.items = inner;
    CU_ASSERT_EQUAL(gguf_writer_set_value(w, "a.nested", &nested), 0);
    gguf_value_t s3[3] = {{.type = GGUF_VT_STRING}, {.type = GGUF_VT_STRING}, {.type = GGUF_VT_STRING}};
    s3[0].v.str.ptr = "x"; s3[0].v.str.len = 1;
    s3[1].v.str.ptr = "yy"; s3[1].v.str.len = 2;
    s3[2].v.str.ptr = "zzz"; s3[2].v.str.len = 3;
    gguf_value_t sin[2] = {{.type = GGUF_VT_ARRAY}, {.type = GGUF_VT_ARRAY}};
    sin[0].v.arr.type = GGUF_VT_STRING; sin[0].v.arr.n = 2; sin[0].v.arr.items = s3;
    sin[1].v.arr.type = GGUF_VT_STRING; sin[1].v.arr.n = 1; sin[1].v.arr.items = s3 + 2;
    gguf_value_t nested_s = {.type = GGUF_VT_ARRAY};
    nested_s.v.arr.type = GGUF_VT_ARRAY; nested_s.v.arr.n = 2; nested_s.v.arr.items = sin;
    CU_ASSERT_EQUAL(gguf_writer_set_value(w, "a.nested_str", &nested_s), 0);
    CU_ASSERT_EQUAL(gguf_writer_n_kv(w), 29);

    // bad values
    CU_ASSERT_EQUAL(gguf_writer_set_u32(w, "", 1), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_set_str(w, "x", NULL), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_set_arr(w, "x", GGUF_VT_STRING, strs, 1), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_set_u64(w, "general.alignment", 64), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_set_u32(w, "general.alignment", 48), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_n_kv(w), 29);

    // tensors: sizes chosen so that padding is needed between them
    const int64_t ne_a[2] = {5, 3}, ne_b[2] = {64, 2}, ne_c[1] = {7}, ne_d[3] = {256, 2, 3}, ne_e[1] = {1};
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "a.f32", QT_F32, 2, ne_a), 0);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "b.q8_0", QT_Q8_0, 2, ne_b), 1);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "c.f16", QT_F16, 1, ne_c), 2);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "d.q4_k", QT_Q4_K, 3, ne_d), 3);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "e.i8", QT_I8, 1, ne_e), 4);
    const int64_t bad_ne[2] = {30, 2};
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "bad", QT_Q4_0, 2, bad_ne), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "a.f32", QT_F32, 2, ne_a), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "z", (qtype_t)4, 1, ne_c), MLM_EINVAL);
    CU_ASSERT_EQUAL(gguf_writer_n_tensors(w), 5);
    const size_t nb[5] = {60, 136, 14, 6 * 144, 1};
    for (int i = 0; i < 5; i++) CU_ASSERT_EQUAL(gguf_writer_tensor_nbytes(w, i), nb[i]);

    char err[256] = "";
    CU_ASSERT_EQUAL_FATAL(gguf_writer_open(w, path, err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_writer_set_u32(w, "late", 1), MLM_ESTATE);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "late", QT_F32, 1, ne_c), MLM_ESTATE);
    CU_ASSERT_STRING_EQUAL(gguf_writer_next_tensor(w), "a.f32");
    // all data as one stream cut into odd chunks that cross tensor boundaries
    size_t total = 0;
    for (int i = 0; i < 5; i++) total += nb[i];
    uint8_t *all = malloc(total);
    CU_ASSERT_PTR_NOT_NULL_FATAL(all);
    for (size_t off = 0, t = 0; t < 5; off += nb[t], t++)
        for (size_t i = 0; i < nb[t]; i++) all[off + i] = pattern_byte((int)t, i);
    size_t pos = 0, step = 1;
    while (pos < total) {
        size_t k = total - pos < step ? total - pos : step;
        CU_ASSERT_EQUAL_FATAL(gguf_writer_write_data(w, all + pos, k, err, sizeof err), 0);
        pos += k;
        step = step * 3 + 1;
    }
    CU_ASSERT_PTR_NULL(gguf_writer_next_tensor(w));
    CU_ASSERT_EQUAL(gguf_writer_write_data(w, all, 1, err, sizeof err), MLM_ERANGE);
    CU_ASSERT_EQUAL(gguf_writer_finish(w, err, sizeof err), 0);
    CU_ASSERT_EQUAL(dir_entries(dir), 1); // no temporary left behind
    gguf_writer_destroy(&w);
    CU_ASSERT_PTR_NULL(w);

    // read back
    gguf_t *g = NULL;
    int rc = gguf_open(&g, path, err, sizeof err);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT_EQUAL(gguf_version(g), 3);
    CU_ASSERT_EQUAL(gguf_alignment(g), 32);
    CU_ASSERT_EQUAL(gguf_n_kv(g), 29);
    CU_ASSERT_STRING_EQUAL(gguf_kv_key(g, 0), "t.u8");
    CU_ASSERT_STRING_EQUAL(gguf_kv_key(g, 11), "t.str");
    uint64_t u;
    int64_t i64;
    float f;
    bool b;
    const char *sp;
    size_t sl;
    CU_ASSERT(gguf_get_u64(g, "t.u8", &u) == 0 && u == 250);
    CU_ASSERT(gguf_get_i64(g, "t.i8", &i64) == 0 && i64 == -100);
    CU_ASSERT(gguf_get_u64(g, "t.u16", &u) == 0 && u == 65000);
    CU_ASSERT(gguf_get_i64(g, "t.i16", &i64) == 0 && i64 == -32000);
    CU_ASSERT(gguf_get_u64(g, "t.u32", &u) == 0 && u == 4000000000u);
    CU_ASSERT(gguf_get_i64(g, "t.i32", &i64) == 0 && i64 == -2000000000);
    CU_ASSERT(gguf_get_u64(g, "t.u64", &u) == 0 && u == 0xfedcba9876543210ULL);
    CU_ASSERT(gguf_get_i64(g, "t.i64", &i64) == 0 && i64 == -0x123456789abcLL);
    CU_ASSERT(gguf_get_f32(g, "t.f32", &f) == 0 && f == 1.5e-5f);
    CU_ASSERT_EQUAL(gguf_find(g, "t.f32")->type, GGUF_VT_FLOAT32);
    CU_ASSERT_EQUAL(gguf_find(g, "t.f64")->type, GGUF_VT_FLOAT64);
    CU_ASSERT(gguf_find(g, "t.f64")->v.f == -3.14159265358979);
    CU_ASSERT(gguf_get_bool(g, "t.bool", &b) == 0 && b);
    CU_ASSERT(gguf_get_str(g, "t.str", &sp, &sl) == 0 && sl == strlen("héllo ▁world") &&
              !memcmp(sp, "héllo ▁world", sl));
    CU_ASSERT(gguf_get_str(g, "t.strn", &sp, &sl) == 0 && sl == 3 && !memcmp(sp, "a\0b", 3));
    CU_ASSERT(gguf_get_str(g, "t.empty", &sp, &sl) == 0 && sl == 0);
    const struct {
        const char *key;
        int type;
        const void *data;
        uint64_t n;
    } arrs[] = {
        {"a.u8", GGUF_VT_UINT8, a_u8, 3},       {"a.i8", GGUF_VT_INT8, a_i8, 2},
        {"a.u16", GGUF_VT_UINT16, a_u16, 1},    {"a.i16", GGUF_VT_INT16, a_i16, 4},
        {"a.u32", GGUF_VT_UINT32, a_u32, 2},    {"a.i32", GGUF_VT_INT32, a_i32, 3},
        {"a.f32", GGUF_VT_FLOAT32, a_f32, 3},   {"a.f64", GGUF_VT_FLOAT64, a_f64, 2},
        {"a.bool", GGUF_VT_BOOL, a_bool, 3},    {"a.u64", GGUF_VT_UINT64, a_u64, 2},
        {"a.i64", GGUF_VT_INT64, a_i64, 2},     {"a.empty", GGUF_VT_INT32, NULL, 0},
    };
    for (size_t k = 0; k < sizeof arrs / sizeof arrs[0]; k++) {
        const gguf_value_t *v = gguf_find(g, arrs[k].key);
        CU_ASSERT_PTR_NOT_NULL_FATAL(v);
        CU_ASSERT_EQUAL(v->type, GGUF_VT_ARRAY);
        CU_ASSERT_EQUAL(v->v.arr.type, arrs[k].type);
        CU_ASSERT_EQUAL(v->v.arr.n, arrs[k].n);
        if (arrs[k].n) CU_ASSERT(!memcmp(v->v.arr.raw, arrs[k].data, arrs[k].n * vt_bytes(arrs[k].type)));
    }
    float fe;
    CU_ASSERT(gguf_arr_f32(gguf_find(g, "a.f32"), 1, &fe) == 0 && fe == -2.25f);
    const gguf_value_t *vs = gguf_find(g, "a.str");
    CU_ASSERT_PTR_NOT_NULL_FATAL(vs);
    CU_ASSERT_EQUAL(vs->v.arr.type, GGUF_VT_STRING);
    CU_ASSERT_EQUAL_FATAL(vs->v.arr.n, 4);
    for (int k = 0; k < 4; k++)
        CU_ASSERT(vs->v.arr.items[k].v.str.len == strlen(strs[k]) &&
                  !memcmp(vs->v.arr.items[k].v.str.ptr, strs[k], strlen(strs[k])));
    CU_ASSERT(value_eq(gguf_find(g, "a.nested"), &nested));
    CU_ASSERT(value_eq(gguf_find(g, "a.nested_str"), &nested_s));

    CU_ASSERT_EQUAL_FATAL(gguf_n_tensors(g), 5);
    const char *names[5] = {"a.f32", "b.q8_0", "c.f16", "d.q4_k", "e.i8"};
    const qtype_t types[5] = {QT_F32, QT_Q8_0, QT_F16, QT_Q4_K, QT_I8};
    const int dims[5] = {2, 2, 1, 3, 1};
    const int64_t *nes[5] = {ne_a, ne_b, ne_c, ne_d, ne_e};
    size_t off = 0;
    for (int t = 0; t < 5; t++) {
        const gguf_tensor_t *ti = gguf_tensor(g, t);
        CU_ASSERT_STRING_EQUAL(ti->name, names[t]);
        CU_ASSERT_EQUAL(ti->type, types[t]);
        CU_ASSERT_EQUAL(ti->n_dims, dims[t]);
        for (int d = 0; d < GGUF_MAX_DIMS; d++) CU_ASSERT_EQUAL(ti->ne[d], d < dims[t] ? nes[t][d] : 1);
        CU_ASSERT_EQUAL(ti->nbytes, nb[t]);
        CU_ASSERT_EQUAL(ti->offset % 32, 0);
        CU_ASSERT(!memcmp(ti->data, all + off, nb[t]));
        off += nb[t];
    }
    CU_ASSERT_EQUAL(gguf_data_offset(g) % 32, 0);
    CU_ASSERT_EQUAL(gguf_file_size(g), gguf_data_offset(g) + gguf_tensor(g, 4)->offset + 32);
    gguf_close(&g);
    free(all);
    test_rm_dir(dir);
}

typedef struct {
    int calls;  // fill() calls so far
} fill_ctx_t;

static int fill_pattern(void *ctx, int64_t i, void *buf, size_t nbytes, char *err, size_t errlen) {
    ((fill_ctx_t *)ctx)->calls++;
    for (size_t k = 0; k < nbytes; k++) ((uint8_t *)buf)[k] = pattern_byte((int)i + 10, k);
    return 0;
}

static int fill_fail(void *ctx, int64_t i, void *buf, size_t nbytes, char *err, size_t errlen) {
    snprintf(err, errlen, "refused");
    return i == 1 ? MLM_EINVAL : fill_pattern(ctx, i, buf, nbytes, err, errlen);
}

static void test_alignment_and_callback(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char path[1024], err[256];
    snprintf(path, sizeof path, "%s/al.gguf", dir);
    gguf_writer_t *w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    CU_ASSERT_EQUAL(gguf_writer_set_u32(w, "general.alignment", 64), 0);
    const int64_t n1[1] = {3}, n2[2] = {32, 3};
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "x", QT_F32, 1, n1), 0);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "y", QT_Q4_0, 2, n2), 1);
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "z", QT_F16, 1, n1), 2);
    fill_ctx_t ctx = {0};
    CU_ASSERT_EQUAL_FATAL(gguf_writer_write_file(w, path, fill_pattern, &ctx, err, sizeof err), 0);
    CU_ASSERT_EQUAL(ctx.calls, 3);
    CU_ASSERT_EQUAL(gguf_writer_data_size(w), 64 * 3);
    gguf_writer_destroy(&w);

    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, path, err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_alignment(g), 64);
    CU_ASSERT_EQUAL(gguf_data_offset(g) % 64, 0);
    for (int t = 0; t < 3; t++) {
        const gguf_tensor_t *ti = gguf_tensor(g, t);
        CU_ASSERT_EQUAL(ti->offset, (uint64_t)t * 64);
        const uint8_t *d = ti->data;
        int same = 1;
        for (size_t k = 0; k < ti->nbytes; k++) same &= d[k] == pattern_byte(t + 10, k);
        CU_ASSERT(same);
    }
    gguf_close(&g);

    // a failing fill and incomplete data leave no file behind
    unlink(path);
    w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    gguf_writer_add_tensor(w, "x", QT_F32, 1, n1);
    gguf_writer_add_tensor(w, "y", QT_Q4_0, 2, n2);
    CU_ASSERT_EQUAL(gguf_writer_write_file(w, path, fill_fail, &ctx, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_STRING_EQUAL(err, "refused");
    CU_ASSERT_EQUAL(dir_entries(dir), 0);
    gguf_writer_destroy(&w);

    w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    gguf_writer_add_tensor(w, "x", QT_F32, 1, n1);
    CU_ASSERT_EQUAL_FATAL(gguf_writer_open(w, path, err, sizeof err), 0);
    CU_ASSERT_EQUAL(dir_entries(dir), 1); // the temporary
    CU_ASSERT_EQUAL(gguf_writer_write_data(w, "abcd", 4, err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_writer_finish(w, err, sizeof err), MLM_ESTATE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "incomplete"));
    CU_ASSERT_EQUAL(dir_entries(dir), 0);
    CU_ASSERT_EQUAL(gguf_writer_write_data(w, "abcd", 4, err, sizeof err), MLM_ESTATE);
    gguf_writer_destroy(&w);

    // destroying an open writer removes the temporary
    w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    gguf_writer_add_tensor(w, "x", QT_F32, 1, n1);
    CU_ASSERT_EQUAL_FATAL(gguf_writer_open(w, path, err, sizeof err), 0);
    gguf_writer_destroy(&w);
    CU_ASSERT_EQUAL(dir_entries(dir), 0);
    gguf_writer_destroy(&w);
    gguf_writer_destroy(NULL);

    // a directory that does not exist
    char bad[1100];
    snprintf(bad, sizeof bad, "%s/missing/x.gguf", dir);
    w = gguf_writer_new();
    CU_ASSERT_EQUAL(gguf_writer_open(w, bad, err, sizeof err), MLM_EIO);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "cannot create"));
    CU_ASSERT_EQUAL(strncmp(err, bad, strlen(bad)), 0);     // names the file asked for
    CU_ASSERT_PTR_NOT_NULL(strstr(err, strerror(ENOENT))); // and the system's reason
    gguf_writer_destroy(&w);
    test_rm_dir(dir);
}

static void test_disk_full(void) {
    // RLIMIT_FSIZE makes write() fail with EFBIG once the file would pass 1 MB: a stand-in for ENOSPC.
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char path[1024], err[256] = "";
    snprintf(path, sizeof path, "%s/full.gguf", dir);
    gguf_writer_t *w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    const int64_t ne[2] = {1024, 1024}; // 4 MB of F32
    CU_ASSERT_EQUAL(gguf_writer_add_tensor(w, "big", QT_F32, 2, ne), 0);
    uint8_t *chunk = calloc(1, 1 << 20);
    CU_ASSERT_PTR_NOT_NULL_FATAL(chunk);

    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 1 << 20;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    CU_ASSERT_EQUAL_FATAL(setrlimit(RLIMIT_FSIZE, &lim), 0);
    int rc = gguf_writer_open(w, path, err, sizeof err);
    for (int i = 0; !rc && i < 4; i++) rc = gguf_writer_write_data(w, chunk, 1 << 20, err, sizeof err);
    if (!rc) rc = gguf_writer_finish(w, err, sizeof err);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, prev);

    CU_ASSERT_EQUAL(rc, MLM_EFULL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "write failed"));
    CU_ASSERT_EQUAL(dir_entries(dir), 0);
    CU_ASSERT_EQUAL(gguf_writer_finish(w, err, sizeof err), MLM_ESTATE);
    gguf_writer_destroy(&w);
    free(chunk);
    test_rm_dir(dir);
}

static void test_copy_prefix(void) {
    char src[1024], err[256];
    test_shared_path(src, sizeof src, "models/vocab/ggml-vocab-llama-spm.gguf");
    if (access(src, R_OK) != 0) {
        fprintf(stderr, "(skipped: %s missing) ", src);
        return;
    }
    gguf_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, src, err, sizeof err), 0);
    int want = 0;
    for (int64_t i = 0; i < gguf_n_kv(g); i++) want += !strncmp(gguf_kv_key(g, i), "tokenizer.", 10);
    CU_ASSERT(want >= 5);

    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char path[1024];
    snprintf(path, sizeof path, "%s/tok.gguf", dir);
    gguf_writer_t *w = gguf_writer_new();
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    CU_ASSERT_EQUAL(gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    CU_ASSERT_EQUAL(gguf_writer_copy_kv(w, g, "tokenizer."), want);
    CU_ASSERT_EQUAL(gguf_writer_n_kv(w), want + 1);
    CU_ASSERT_EQUAL_FATAL(gguf_writer_write_file(w, path, fill_pattern, NULL, err, sizeof err), 0);
    gguf_writer_destroy(&w);

    gguf_t *h = NULL;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&h, path, err, sizeof err), 0);
    CU_ASSERT_EQUAL(gguf_n_kv(h), want + 1);
    for (int64_t i = 0; i < gguf_n_kv(g); i++) {
        const char *k = gguf_kv_key(g, i);
        if (strncmp(k, "tokenizer.", 10)) continue;
        const gguf_value_t *v = gguf_find(h, k);
        CU_ASSERT_PTR_NOT_NULL_FATAL(v);
        CU_ASSERT(value_eq(v, gguf_kv_value(g, i)));
    }
    const gguf_value_t *toks = gguf_find(h, "tokenizer.ggml.tokens");
    CU_ASSERT_PTR_NOT_NULL_FATAL(toks);
    CU_ASSERT_EQUAL(toks->v.arr.n, 32000);
    CU_ASSERT(toks->v.arr.items[15043].v.str.len == 8 && !memcmp(toks->v.arr.items[15043].v.str.ptr, "▁Hello", 8));
    gguf_close(&h);
    gguf_close(&g);
    test_rm_dir(dir);
}

// --- suite

int test_gguf_write_suite(void) {
    CU_pSuite s = CU_add_suite("gguf_write", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "every KV type and tensor bytes round-trip", test_all_kv_types_and_tensors) ||
        !CU_add_test(s, "alignment, fill callback, abandoned files", test_alignment_and_callback) ||
        !CU_add_test(s, "disk full removes the partial file", test_disk_full) ||
        !CU_add_test(s, "copy tokenizer.* from a real vocab", test_copy_prefix))
        return -1;
    return 0;
}
