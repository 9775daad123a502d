// CUnit suite "reuse": a share built from an earlier share (a recovery's survivor) takes the repacked rows they have in common and is the same bytes, and the same logits, as one loaded afresh.
#include <CUnit/CUnit.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "core/err.h"
#include "offload/weights.h"
#include "parallel/plan.h"
#include "parallel/shard.h"
#include "worker/kernels/matmul.h"
#include "worker/kernels/quant.h"
#include "worker/kernels/x86/x86_mm.h"
#include "worker/model/model.h"

// --- helpers

#define ROWS 200
#define COLS 96 // 3 Q4_0 blocks: an odd count, so the last block pair is half padding
#define COLS_K 768 // 3 Q4_K super-blocks

// Bytes of the packed copy of a Q4_0 or Q4_K matrix (16-row groups, x86_mm.h).
static size_t packed_bytes(const mm_weight_t *w) {
    const int64_t ng = (w->rows + 15) / 16;
    return (size_t)ng * mmp_group_bytes(w->pack, w->cols / qtype_traits(w->type)->blck);
}

// A Q4_0 (Q8_0), Q4_K, Q3_K, Q5_K or Q2_K matrix (rows, cols) of random bytes with finite scales (and mins).
static uint8_t *random_rows(qtype_t t, int64_t rows, int64_t cols, uint64_t seed) {
    const size_t rb = qtype_row_size(t, cols);
    uint8_t *d = malloc((size_t)rows * rb); // (rows, rb)
    for (size_t i = 0; d && i < (size_t)rows * rb; i++) d[i] = (uint8_t)test_rng_next(&seed);
    // every block's scale a small positive f16 (Q3_K and Q2_K keep it last), and the K-quants' min scales too
    const int64_t nb = cols / qtype_traits(t)->blck;
    const size_t bs = rb / (size_t)nb;
    const size_t d_off = t == QT_Q3_K ? offsetof(block_q3_K, d) : t == QT_Q2_K ? offsetof(block_q2_K, d) : 0;
    const size_t m_off = t == QT_Q2_K ? offsetof(block_q2_K, dmin) : 2;
    for (int64_t r = 0; d && r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = d + (size_t)r * rb + (size_t)b * bs;
            const uint16_t sd = (uint16_t)(0x3000 + (test_rng_next(&seed) & 0x3ff));
            const uint16_t sm = (uint16_t)(0x2c00 + (test_rng_next(&seed) & 0x3ff));
            memcpy(blk + d_off, &sd, 2);
            if (t == QT_Q4_K || t == QT_Q5_K || t == QT_Q2_K) memcpy(blk + m_off, &sm, 2);
        }
    return d;
}

// One case: prev holds rows [a0, a1), the new matrix rows [b0, b1) of the same tensor.
typedef struct {
    int a0, a1, b0, b1;
} span_t;

static void check_span(qtype_t t, int64_t cols, const uint8_t *data, const span_t *s) {
    const size_t rb = qtype_row_size(t, cols);
    const kernels_t *k = kernels_best();
    mm_weight_t prev, ref, got;
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&prev, k, t, s->a1 - s->a0, cols, data + (size_t)s->a0 * rb, true), 0);
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&ref, k, t, s->b1 - s->b0, cols, data + (size_t)s->b0 * rb, true), 0);
    // the rows prev holds are spoilt in what the new matrix is given to read: they must come from prev
    uint8_t *spoilt = malloc((size_t)ROWS * rb); // (ROWS, rb)
    CU_ASSERT_PTR_NOT_NULL_FATAL(spoilt);
    memcpy(spoilt, data, (size_t)ROWS * rb);
    memset(spoilt + (size_t)s->a0 * rb, 0x5a, (size_t)(s->a1 - s->a0) * rb);
    int64_t reused = -1;
    CU_ASSERT_EQUAL_FATAL(mm_weight_init_from(&got, k, t, s->b1 - s->b0, cols, spoilt + (size_t)s->b0 * rb, &prev,
                                              s->a0 - s->b0, &reused),
                          0);
    const int lo = s->a0 > s->b0 ? s->a0 : s->b0, hi = s->a1 < s->b1 ? s->a1 : s->b1;
    CU_ASSERT_EQUAL(reused, hi > lo ? hi - lo : 0);
    CU_ASSERT_EQUAL(got.rows, ref.rows);
    CU_ASSERT_EQUAL(got.pack, ref.pack);
    CU_ASSERT_EQUAL(got.row_align, ref.row_align);
    if (hi <= lo) { // nothing in common: every row is read from what it was given
        CU_ASSERT_PTR_EQUAL(got.data, spoilt + (size_t)s->b0 * rb);
    } else if (memcmp(got.packed, ref.packed, packed_bytes(&ref)) != 0) {
        fprintf(stderr, "  %s prev rows %d-%d, new rows %d-%d: packed bytes differ\n", qtype_name(t), s->a0, s->a1,
                s->b0, s->b1);
        CU_FAIL("packed bytes differ from a fresh repack");
    }
    // and prev is untouched
    uint8_t *row = malloc(rb); // (rb)
    CU_ASSERT_PTR_NOT_NULL_FATAL(row);
    for (int r = 0; r < s->a1 - s->a0; r += 7) {
        mm_weight_get_row(&prev, r, row);
        CU_ASSERT_EQUAL(memcmp(row, data + (size_t)(s->a0 + r) * rb, rb), 0);
    }
    free(row);
    mm_weight_release(&prev);
    mm_weight_release(&ref);
    mm_weight_release(&got);
    free(spoilt);
}

// --- tests

static void test_init_from(void) {
    const span_t spans[] = {
        {32, 112, 0, 160},   // prev inside, its groups lined up with the new ones
        {5, 77, 0, 100},     // not lined up: rows unpacked from prev and packed again
        {0, 200, 48, 90},    // prev holds more than the new matrix, whose last group is partial
        {64, 120, 64, 120},  // the very same rows
        {0, 40, 0, 64},      // prev's last group partial, the new one's full
        {0, 16, 100, 140},   // nothing in common
        {100, 200, 0, 120},  // prev after, overlapping the end
    };
    // Q4_K is repacked on x86, Q3_K, Q5_K, Q2_K and Q8_0 by the AVX-512 table (plain rows elsewhere: then
    // there is nothing to take)
    static const qtype_t packed_types[] = {QT_Q4_K, QT_Q3_K, QT_Q5_K, QT_Q2_K, QT_Q8_0};
    for (size_t p = 0; p < sizeof packed_types / sizeof packed_types[0]; p++) {
        const qtype_t t = packed_types[p];
        const int64_t cols = qtype_traits(t)->blck == 256 ? COLS_K : COLS;
        uint8_t *d = random_rows(t, ROWS, cols, 9 + p);
        CU_ASSERT_PTR_NOT_NULL_FATAL(d);
        mm_weight_t probe;
        CU_ASSERT_EQUAL_FATAL(mm_weight_init(&probe, kernels_best(), t, 20, cols, d, true), 0);
        if (probe.packed)
            for (size_t i = 0; i < sizeof spans / sizeof spans[0]; i++) check_span(t, cols, d, &spans[i]);
        mm_weight_release(&probe);
        free(d);
    }
    uint8_t *data = random_rows(QT_Q4_0, ROWS, COLS, 7);
    CU_ASSERT_PTR_NOT_NULL_FATAL(data);
    for (size_t i = 0; i < sizeof spans / sizeof spans[0]; i++) check_span(QT_Q4_0, COLS, data, &spans[i]);
    // a prev that cannot give anything: plain rows (not repacked), or another width
    mm_weight_t plain, narrow, got, ref;
    const kernels_t *k = kernels_best();
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&plain, k, QT_Q4_0, 64, COLS, data, false), 0);
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&narrow, k, QT_Q4_0, 64, 64, data, true), 0);
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&ref, k, QT_Q4_0, 64, COLS, data, true), 0);
    int64_t reused = -1;
    CU_ASSERT_EQUAL(mm_weight_init_from(&got, k, QT_Q4_0, 64, COLS, data, &plain, 0, &reused), 0);
    CU_ASSERT_EQUAL(reused, 0);
    CU_ASSERT_EQUAL(memcmp(got.packed, ref.packed, packed_bytes(&ref)), 0);
    mm_weight_release(&got);
    CU_ASSERT_EQUAL(mm_weight_init_from(&got, k, QT_Q4_0, 64, COLS, data, &narrow, 0, &reused), 0);
    CU_ASSERT_EQUAL(reused, 0);
    CU_ASSERT_EQUAL(memcmp(got.packed, ref.packed, packed_bytes(&ref)), 0);
    mm_weight_release(&got);
    // a type that is not repacked is described as mm_weight_init does, whatever prev is
    CU_ASSERT_EQUAL(mm_weight_init_from(&got, k, QT_Q6_K, 8, 256, data, &ref, 0, &reused), 0);
    CU_ASSERT_EQUAL(reused, 0);
    CU_ASSERT_PTR_NULL(got.packed);
    CU_ASSERT_PTR_EQUAL(got.data, data);
    mm_weight_release(&plain);
    mm_weight_release(&narrow);
    mm_weight_release(&ref);
    mm_weight_release(&got);
    free(data);
}

// mm_weight_init_take over a copy large enough to be its own mapping (2 MB and more): the same bytes
// as a fresh repack, prev's copy taken over (prev computing from its plain rows), or, where it cannot
// be (rows not lined up), copied from.
#define BIG_ROWS 6000
#define BIG_COLS 2048

static void check_take(qtype_t t, const uint8_t *data, const span_t *s, bool taken) {
    const size_t rb = qtype_row_size(t, BIG_COLS);
    const kernels_t *k = kernels_best();
    mm_weight_t prev, ref, got;
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&prev, k, t, s->a1 - s->a0, BIG_COLS, data + (size_t)s->a0 * rb, true), 0);
    CU_ASSERT_FATAL(prev.packed_map > 0);
    CU_ASSERT_EQUAL_FATAL(mm_weight_init(&ref, k, t, s->b1 - s->b0, BIG_COLS, data + (size_t)s->b0 * rb, true), 0);
    uint8_t *spoilt = malloc((size_t)BIG_ROWS * rb); // (BIG_ROWS, rb) prev's rows spoilt
    CU_ASSERT_PTR_NOT_NULL_FATAL(spoilt);
    memcpy(spoilt, data, (size_t)BIG_ROWS * rb);
    memset(spoilt + (size_t)s->a0 * rb, 0x5a, (size_t)(s->a1 - s->a0) * rb);
    int64_t reused = -1;
    CU_ASSERT_EQUAL_FATAL(mm_weight_init_take(&got, k, t, s->b1 - s->b0, BIG_COLS, spoilt + (size_t)s->b0 * rb,
                                              &prev, s->a0 - s->b0, &reused),
                          0);
    const int lo = s->a0 > s->b0 ? s->a0 : s->b0, hi = s->a1 < s->b1 ? s->a1 : s->b1;
    CU_ASSERT_EQUAL(reused, hi > lo ? hi - lo : 0);
    CU_ASSERT_EQUAL(got.rows, ref.rows);
    CU_ASSERT_EQUAL(got.row_align, ref.row_align);
    CU_ASSERT_PTR_NOT_NULL_FATAL(got.packed);
    if (memcmp(got.packed, ref.packed, packed_bytes(&ref)) != 0) {
        fprintf(stderr, "  take %s: prev rows %d-%d, new rows %d-%d: packed bytes differ\n", qtype_name(t), s->a0, s->a1,
                s->b0, s->b1);
        CU_FAIL("packed bytes differ from a fresh repack");
    }
    CU_ASSERT_EQUAL(prev.packed == NULL, taken);
    uint8_t *row = malloc(rb);
    for (int r = 0; row && r < s->a1 - s->a0; r += 97) { // prev's rows, from its copy or its plain rows
        mm_weight_get_row(&prev, r, row);
        CU_ASSERT_EQUAL(memcmp(row, data + (size_t)(s->a0 + r) * rb, rb), 0);
    }
    for (int r = 0; row && r < s->b1 - s->b0; r += 89) {
        mm_weight_get_row(&got, r, row);
        CU_ASSERT_EQUAL(memcmp(row, data + (size_t)(s->b0 + r) * rb, rb), 0);
    }
    free(row);
    mm_weight_release(&prev);
    mm_weight_release(&ref);
    mm_weight_release(&got);
    free(spoilt);
}

static void test_init_take(void) {
    const struct {
        span_t s;
        bool taken;
    } cases[] = {
        {{2000, 4000, 0, 6000}, true},   // grows around prev: its rows move up in the larger mapping
        {{0, 4000, 2000, 3008}, true},   // shrinks: rows move down, the mapping gets smaller
        {{0, 2000, 0, 2008}, true},      // grows by a partial group
        {{16, 2040, 16, 3000}, true},    // prev's last group partial, the new one's full: unpacked rows
        {{3008, 6000, 0, 3504}, true},   // prev after, overlapping the end
        {{0, 3000, 0, 3000}, true},      // the same rows
        {{5, 2500, 0, 3000}, false},     // not lined up: copied from
        {{0, 2000, 4000, 6000}, false},  // nothing in common
    };
    static const qtype_t types[] = {QT_Q4_0, QT_Q4_K};
    for (size_t j = 0; j < sizeof types / sizeof types[0]; j++) {
        uint8_t *data = random_rows(types[j], BIG_ROWS, BIG_COLS, 11 + j); // (BIG_ROWS, row bytes)
        CU_ASSERT_PTR_NOT_NULL_FATAL(data);
        mm_weight_t probe;
        CU_ASSERT_EQUAL_FATAL(mm_weight_init(&probe, kernels_best(), types[j], 20, BIG_COLS, data, true), 0);
        const bool packs = probe.packed != NULL; // Q4_K is repacked on x86 only
        mm_weight_release(&probe);
        for (size_t i = 0; packs && i < sizeof cases / sizeof cases[0]; i++)
            check_take(types[j], data, &cases[i].s, cases[i].taken);
        free(data);
    }
}

// Node `node` of the tensor-parallel split `nodes` (plan_tp) of the model in g.
static int tp_slice(const gguf_t *g, const char *nodes, int node, shard_slice_t *out) {
    char err[256];
    plan_node_t pn[8];
    int n = plan_parse_nodes(nodes, pn, 8, err, sizeof err);
    plan_t *plan = malloc(sizeof *plan);
    int rc = !plan ? MLM_ENOMEM : n > 0 ? plan_tp(g, pn, n, 64, plan, err, sizeof err) : n;
    if (rc == 0) *out = plan->shard[node].s;
    else fprintf(stderr, "  plan %s: %s\n", nodes, err);
    free(plan);
    return rc;
}

// Every matrix of b equals a's byte for byte (both repacked alike, or both plain).
static int same_matrices(model_t *a, model_t *b) {
    const model_hparams_t *hp = model_hparams(a);
    const char *names[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    int differ = 0, seen = 0;
    for (int l = -1; l < hp->n_layer; l++)
        for (size_t i = 0; i < (l < 0 ? 1 : sizeof names / sizeof names[0]); i++) {
            char name[96];
            if (l < 0) snprintf(name, sizeof name, "%s", hp->tied_output ? "token_embd.weight" : "output.weight");
            else snprintf(name, sizeof name, "blk.%d.%s.weight", l, names[i]);
            int64_t ra, rb, c0, c1;
            mm_weight_t *wa = weights_matrix(model_weights(a), name, 0, &ra, &c0, &c1);
            mm_weight_t *wb = weights_matrix(model_weights(b), name, 0, &rb, &c0, &c1);
            if (!wa || !wb) {
                differ += !wa != !wb;
                continue;
            }
            seen++;
            if (ra != rb || wa->rows != wb->rows || wa->pack != wb->pack || !wa->packed != !wb->packed) {
                differ++;
                continue;
            }
            if (wa->packed) differ += memcmp(wa->packed, wb->packed, packed_bytes(wa)) != 0;
            else differ += memcmp(wa->data, wb->data, (size_t)wa->rows * wa->row_bytes) != 0;
        }
    return seen > 0 ? differ : -1;
}

// How many of a model's matrices have a repacked copy.
static int count_packed(model_t *m) {
    const model_hparams_t *hp = model_hparams(m);
    const char *names[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    int n = 0;
    for (int l = 0; l < hp->n_layer; l++)
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, names[i]);
            int64_t r0, c0, c1;
            const mm_weight_t *w = weights_matrix(model_weights(m), name, 0, &r0, &c0, &c1);
            n += w && w->packed;
        }
    return n;
}


static uint64_t reused_bytes(const model_t *m) {
    weights_stats_t st;
    weights_stats(model_weights(m), &st);
    return st.bytes_reused;
}

// A tensor-parallel survivor's next share: 3 nodes become 2 (then 1); each share built from the
// one before holds exactly the bytes of a fresh load and takes the rows they have in common.
static void model_reuse(const char *file) {
    char path[1024], err[512] = "";
    test_shared_path(path, sizeof path, file);
    model_t *full = NULL;
    model_load_opts_t fo = {.repack = false};
    CU_ASSERT_EQUAL_FATAL(model_load(&full, path, &fo, err, sizeof err), 0);
    const gguf_t *g = model_gguf(full);
    struct {
        const char *from;
        int from_node;
        const char *to;
        int to_node;
    } steps[] = {{"1,1,1", 0, "1,1", 0}, {"1,1,1", 1, "1,1", 1}, {"1,1,1", 2, "1,1", 1}, {"1,1", 1, "1,1", 1}};
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        shard_slice_t a, b;
        CU_ASSERT_EQUAL_FATAL(tp_slice(g, steps[i].from, steps[i].from_node, &a), 0);
        CU_ASSERT_EQUAL_FATAL(tp_slice(g, steps[i].to, steps[i].to_node, &b), 0);
        model_t *old = NULL, *fresh = NULL, *built = NULL;
        model_load_opts_t la = {.repack = true, .slice = &a}, lb = {.repack = true, .slice = &b};
        CU_ASSERT_EQUAL_FATAL(model_load(&old, path, &la, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(model_load(&fresh, path, &lb, err, sizeof err), 0);
        const int packed_before = count_packed(old);
        lb.reuse = old;
        CU_ASSERT_EQUAL_FATAL(model_load(&built, path, &lb, err, sizeof err), 0);
        CU_ASSERT_EQUAL(same_matrices(fresh, built), 0);
        CU_ASSERT(reused_bytes(built) > 0);
        CU_ASSERT_EQUAL(reused_bytes(fresh), 0);
        CU_ASSERT(count_packed(built) > 0);
        if (i == 3) { // the very same share: every repacked copy is moved, nothing repacked again
            CU_ASSERT_EQUAL(count_packed(old), 0);
        } else { // a matrix with the same rows is moved, one with other rows taken over or copied from
            CU_ASSERT(count_packed(old) <= packed_before);
        }
        model_destroy(&old);
        model_destroy(&fresh);
        model_destroy(&built);
    }
    // the last survivor holds everything: built from its half, its logits are a fresh load's bits
    shard_slice_t half;
    CU_ASSERT_EQUAL_FATAL(tp_slice(g, "1,1", 1, &half), 0);
    model_t *old = NULL, *fresh = NULL, *built = NULL;
    model_load_opts_t la = {.repack = true, .slice = &half}, lf = {.repack = true};
    CU_ASSERT_EQUAL_FATAL(model_load(&old, path, &la, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(model_load(&fresh, path, &lf, err, sizeof err), 0);
    lf.reuse = old;
    CU_ASSERT_EQUAL_FATAL(model_load(&built, path, &lf, err, sizeof err), 0);
    model_destroy(&old); // what the new share needs of it was copied or moved
    CU_ASSERT(reused_bytes(built) > 0);
    float *ref = test_logits12(fresh, 32, 16), *got = test_logits12(built, 32, 16);
    CU_ASSERT_PTR_NOT_NULL(ref);
    CU_ASSERT_PTR_NOT_NULL(got);
    const int nv = model_hparams(fresh)->n_vocab;
    if (ref && got) CU_ASSERT_EQUAL(memcmp(ref, got, (size_t)12 * nv * sizeof(float)), 0);
    free(ref);
    free(got);
    model_destroy(&fresh);
    model_destroy(&built);
    model_destroy(&full);
}

static void test_model_reuse(void) {
    model_reuse("models/synth/synth-dense-Q4_0.gguf");
#ifdef MESHLM_HAVE_X86
    model_reuse("models/synth/synth-dense-Q4_K_M.gguf"); // Q4_K is repacked on x86 only (Q6_K never)
#endif
}

// A provider whose repacked copy was moved out still computes, from its plain rows: Q4_0 close to
// its packed groups' logits, Q4_K (whose packed kernels keep vec_dot's order) with the same bits.
static void moved_from_still_computes(const char *file, bool same_bits) {
    char path[1024], err[512] = "";
    test_shared_path(path, sizeof path, file);
    model_t *a = NULL, *b = NULL;
    model_load_opts_t lo = {.repack = true};
    CU_ASSERT_EQUAL_FATAL(model_load(&a, path, &lo, err, sizeof err), 0);
#ifdef MESHLM_HAVE_X86
    CU_ASSERT(count_packed(a) > 0); // (Q4_K is repacked on x86 only)
#endif
    float *before = test_logits12(a, 32, 16);
    lo.reuse = a;
    CU_ASSERT_EQUAL_FATAL(model_load(&b, path, &lo, err, sizeof err), 0);
    int64_t r0, c0, c1;
    const mm_weight_t *w = weights_matrix(model_weights(a), "blk.0.attn_q.weight", 0, &r0, &c0, &c1);
    CU_ASSERT_PTR_NOT_NULL_FATAL(w);
    CU_ASSERT_PTR_NULL(w->packed); // moved
    float *after = test_logits12(a, 32, 16), *moved = test_logits12(b, 32, 16);
    CU_ASSERT_PTR_NOT_NULL(before);
    CU_ASSERT_PTR_NOT_NULL(after);
    CU_ASSERT_PTR_NOT_NULL(moved);
    const int nv = model_hparams(a)->n_vocab;
    if (before && moved) CU_ASSERT_EQUAL(memcmp(before, moved, (size_t)12 * nv * sizeof(float)), 0);
    if (same_bits) {
        if (before && after) CU_ASSERT_EQUAL(memcmp(before, after, (size_t)12 * nv * sizeof(float)), 0);
    } else { // (plain Q4_0 rows sum in another order than the packed groups: close, not the same bits)
        for (size_t i = 0; before && after && i < (size_t)12 * nv; i++) CU_ASSERT_DOUBLE_EQUAL(before[i], after[i], 1e-2);
    }
    free(before);
    free(after);
    free(moved);
    model_destroy(&a);
    model_destroy(&b);
}

static void test_moved_from_still_computes(void) {
    moved_from_still_computes("models/synth/synth-dense-Q4_0.gguf", false);
    moved_from_still_computes("models/synth/synth-dense-Q4_K_M.gguf", true);
}

int test_reuse_suite(void) {
    CU_pSuite s = CU_add_suite("reuse", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "mm_weight_init_from takes prev's rows and gives a fresh repack's bytes", test_init_from) ||
        !CU_add_test(s, "mm_weight_init_take reshapes prev's copy in place into a fresh repack's bytes", test_init_take) ||
        !CU_add_test(s, "a share built from an earlier share: same bytes, same logits", test_model_reuse) ||
        !CU_add_test(s, "a model whose repacked copies were moved still computes", test_moved_from_still_computes))
        return -1;
    return 0;
}
