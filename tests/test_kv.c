// CUnit suite "kv": the paged KV store (tiers, cache, counters, refusals), the PIM timing model
// (hand-computed cycles for a row hit, a row miss, dual row buffers, all banks in parallel; linear
// growth with context; HBM2-PIM's published peak), and every KV device reproducing the host
// device's logits and the reference greedy tokens, alone and as a cluster's plan-wide --kv-device.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"
#include "ref_cases.h"
#include "cluster/launch.h"
#include "coordinator/runtime/cluster.h"
#include "core/err.h"
#include "offload/attn.h"
#include "offload/kv_store.h"
#include "offload/pim_sim.h"
#include "worker/model/model.h"

// --- the paged store

// Rows of row_bytes with values that name their position and layer.
static void fill_rows(uint8_t *k, uint8_t *v, int layer, int pos, int n, size_t rb) {
    for (int i = 0; i < n; i++)
        for (size_t b = 0; b < rb; b++) {
            k[(size_t)i * rb + b] = (uint8_t)(layer * 31 + (pos + i) * 7 + (int)b);
            v[(size_t)i * rb + b] = (uint8_t)(layer * 17 + (pos + i) * 5 + (int)b * 3 + 1);
        }
}

static void test_store_tiers(void) {
    char err[256];
    char *dir = test_tmpdir();
    const size_t rb = 24;
    // block = 4 positions: 2 * 4 * 24 = 192 bytes; RAM for 3 blocks
    kv_store_params_t p = {.n_layer = 2, .row_bytes = rb, .block_pos = 4, .ram_bytes = 3 * 192, .dir = dir,
                           .cache_blocks = 2};
    kv_store_t *s = NULL;
    CU_ASSERT_EQUAL_FATAL(kv_store_new(&s, &p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(kv_store_block_bytes(s), 192u);
    {
        // the file is unlinked at once: the directory stays empty
        char cmd[600];
        snprintf(cmd, sizeof cmd, "%s/.", dir);
        CU_ASSERT_EQUAL(rmdir(dir), 0); // only an empty directory can be removed
        CU_ASSERT_EQUAL(mkdir(dir, 0700), 0);
    }
    CU_ASSERT_EQUAL(kv_store_seq_new(s, 0, 20), 0);
    CU_ASSERT_EQUAL(kv_store_seq_new(s, 0, 20), MLM_ESTATE);
    uint8_t k[20 * 24], v[20 * 24], rk[20 * 24], rv[20 * 24];
    // layer 0: 10 positions (blocks 0..2, all RAM), layer 1: 10 positions (3 blocks: 0 RAM left -> file)
    for (int l = 0; l < 2; l++) {
        fill_rows(k, v, l, 0, 7, rb);
        CU_ASSERT_EQUAL(kv_store_write(s, 0, l, 0, k, v, 7), 0); // a write across blocks
        fill_rows(k, v, l, 7, 3, rb);
        CU_ASSERT_EQUAL(kv_store_write(s, 0, l, 7, k, v, 3), 0);
    }
    kv_store_stats_t st;
    kv_store_stats(s, &st);
    CU_ASSERT_EQUAL(st.blocks_ram, 3);
    CU_ASSERT_EQUAL(st.blocks_file, 3);
    CU_ASSERT_EQUAL(st.bytes_ram, 3 * 192u);
    CU_ASSERT_EQUAL(st.bytes_file, 3 * 192u);
    CU_ASSERT_EQUAL(st.bytes_written, 2 * 10 * rb); // layer 1's k and v rows, written where they live
    CU_ASSERT_EQUAL(st.cache_bytes, 2 * 192u);
    for (int l = 0; l < 2; l++) {
        fill_rows(k, v, l, 0, 10, rb);
        memset(rk, 0, sizeof rk);
        memset(rv, 0, sizeof rv);
        CU_ASSERT_EQUAL(kv_store_read(s, 0, l, 0, 10, rk, rv), 0);
        CU_ASSERT_EQUAL(memcmp(k, rk, 10 * rb), 0);
        CU_ASSERT_EQUAL(memcmp(v, rv, 10 * rb), 0);
        CU_ASSERT_EQUAL(kv_store_read(s, 0, l, 3, 4, rk, rv), 0); // a range inside
        CU_ASSERT_EQUAL(memcmp(k + 3 * rb, rk, 4 * rb), 0);
    }
    kv_store_stats(s, &st);
    // layer 1: 3 spilled blocks through a 2-block LRU cache: reading 0,1,2 misses thrice, then 0..1 of
    // the inner range (blocks 0, 1) miss again (block 2 pushed 0 out, then 0 pushed 1 out)
    CU_ASSERT_EQUAL(st.cache_misses, 5);
    CU_ASSERT_EQUAL(st.bytes_read, 5 * 192u);
    CU_ASSERT_EQUAL(kv_store_read(s, 0, 1, 4, 4, rk, rv), 0); // block 1: now cached
    kv_store_stats(s, &st);
    CU_ASSERT_EQUAL(st.cache_misses, 5);
    CU_ASSERT_EQUAL(st.cache_hits, 1);
    // a write to a spilled, cached block keeps the cache current
    fill_rows(k, v, 9, 5, 1, rb);
    CU_ASSERT_EQUAL(kv_store_write(s, 0, 1, 5, k, v, 1), 0);
    CU_ASSERT_EQUAL(kv_store_read(s, 0, 1, 5, 1, rk, rv), 0);
    CU_ASSERT_EQUAL(memcmp(k, rk, rb), 0);
    CU_ASSERT_EQUAL(memcmp(v, rv, rb), 0);
    // refusals
    CU_ASSERT_EQUAL(kv_store_read(s, 0, 0, 12, 1, rk, rv), MLM_ERANGE); // block 3 never written
    CU_ASSERT_EQUAL(kv_store_read(s, 0, 2, 0, 1, rk, rv), MLM_EINVAL);
    CU_ASSERT_EQUAL(kv_store_write(s, 0, 0, 18, k, v, 3), MLM_EINVAL); // past n_ctx
    CU_ASSERT_EQUAL(kv_store_write(s, 1, 0, 0, k, v, 1), MLM_EINVAL);
    // the drop frees both tiers; a new sequence reuses the file's slots
    kv_store_seq_drop(s, 0);
    kv_store_stats(s, &st);
    CU_ASSERT(st.blocks_ram == 0 && st.blocks_file == 0 && st.bytes_ram == 0 && st.bytes_file == 0);
    CU_ASSERT_EQUAL(kv_store_write(s, 0, 0, 0, k, v, 1), MLM_ESTATE);
    kv_store_destroy(&s);
    CU_ASSERT_PTR_NULL(s);
    kv_store_destroy(NULL);

    // without a directory, past the cap is full; a directory that is not there is named
    p.dir = NULL;
    CU_ASSERT_EQUAL_FATAL(kv_store_new(&s, &p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(kv_store_seq_new(s, 0, 20), 0);
    fill_rows(k, v, 0, 0, 16, rb);
    CU_ASSERT_EQUAL(kv_store_write(s, 0, 0, 0, k, v, 12), 0);
    CU_ASSERT_EQUAL(kv_store_write(s, 0, 0, 12, k, v, 1), MLM_EFULL);
    kv_store_destroy(&s);
    p.dir = "/nonexistent-meshlm-dir";
    CU_ASSERT_EQUAL(kv_store_new(&s, &p, err, sizeof err), MLM_EIO);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "/nonexistent-meshlm-dir"));
    CU_ASSERT_PTR_NULL(s);
    test_rm_dir(dir);
}

// --- the PIM timing model

static void test_pim_bank_cycles(void) {
    pim_config_t c;
    CU_ASSERT_EQUAL_FATAL(pim_preset("hbm2-pim", &c), 0);
    CU_ASSERT_EQUAL(pim_preset("no-such-part", &c), -1);
    CU_ASSERT_EQUAL_FATAL(pim_preset("hbm2-pim", &c), 0);
    // tRCD 14, tRP 14, tRAS 33, tCCD_L 4; 8 units activate in 2 groups of 4: + 1 * tFAW (16)
    pim_bank_t b;
    pim_counts_t n = {0};
    pim_bank_init(&b);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 5, 1, 0, &n), 14 + 16 + 4);        // closed bank: ACT, tRCD, a step
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 5, 2, 0, &n), 34 + 2 * 4);         // row hit: tCCD_L per step
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 9, 1, 0, &n), 42 + 14 + 14 + 16 + 4); // row miss: PRE, ACT, step
    CU_ASSERT(n.hits == 1 && n.misses == 2 && n.acts == 2 && n.steps == 4);
    // tRAS holds the precharge back when the row was open for less than it
    c.tFAW = 0;
    pim_bank_init(&b);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 1, 1, 0, &n), 14 + 4);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 2, 1, 0, &n), 33 + 14 + 14 + 4); // PRE at tRAS, not at 18
    // a request issued later starts later
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 2, 1, 1000, &n), 1004);
    // dual row buffers (NeuPIMs): the next row opens while the current one computes
    pim_bank_init(&b);
    c.row_buffers = 2;
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 1, 8, 0, &n), 14 + 32);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 2, 8, 0, &n), 46 + 32);  // buffer 2 was ready at 14
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 3, 8, 0, &n), 78 + 32);  // buffer 1: PRE 46, ACT 60, ready 74 < 78
    c.row_buffers = 1;
    pim_bank_init(&b);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 1, 8, 0, &n), 46);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 2, 8, 0, &n), 46 + 14 + 14 + 32);
    CU_ASSERT_EQUAL(pim_bank_steps(&c, &b, 3, 8, 0, &n), 106 + 14 + 14 + 32);
}

static uint64_t one_pass(const pim_config_t *c, int kind, int n_tok, bool exact, pim_counts_t *cnt) {
    pim_sim_t *s = pim_sim_new(c, 64, 2);
    if (!s) return 0;
    pim_sim_set_exact(s, exact);
    const uint64_t cy = pim_sim_pass(s, kind, n_tok, 0);
    if (cnt) {
        pim_sim_stats_t st;
        pim_sim_stats(s, &st);
        *cnt = st.n;
    }
    pim_sim_free(&s);
    return cy;
}

static void test_pim_passes(void) {
    pim_config_t c;
    CU_ASSERT_EQUAL_FATAL(pim_preset("hbm2-pim", &c), 0);
    const int P = c.channels * c.pus; // 128 units
    // head_dim 64 F16: 128 bytes a token, 4 steps; 8 tokens a 1 KB row. q.K^T of one token: q in (4
    // writes of 4), ACT + tRCD + stagger (14 + 16), 4 steps, one score out (1 column at tCCD_S 2)
    CU_ASSERT_EQUAL(one_pass(&c, 0, 1, true, NULL), 16 + 30 + 16 + 2);
    // all banks in parallel: a token on every unit of every channel takes as long as one
    CU_ASSERT_EQUAL(one_pass(&c, 0, P, true, NULL), one_pass(&c, 0, 1, true, NULL));
    // one more token puts a second token on unit 0: 4 more steps in the open row
    CU_ASSERT_EQUAL(one_pass(&c, 0, P + 1, true, NULL), 16 + 30 + 2 * 16 + 2);
    // p.V of one token: 8 units' p (16 bytes: 1 write), the same 4 steps, 8 partial sums of 64 F32 out
    CU_ASSERT_EQUAL(one_pass(&c, 1, 1, true, NULL), 4 + 30 + 16 + 8 * 64 * 4 / 32 * 2);
    // skipping steady rows in pairs gives the simulated cycles and counts exactly
    pim_counts_t a = {0}, b = {0};
    for (int n = 1; n <= 5; n++) {
        const int tok = P * 8 * (7 * n + 3) + 5 * n;
        CU_ASSERT_EQUAL(one_pass(&c, 0, tok, true, &a), one_pass(&c, 0, tok, false, &b));
        CU_ASSERT(a.acts == b.acts && a.steps == b.steps && a.hits == b.hits && a.unit_steps == b.unit_steps);
    }
    c.row_buffers = 2;
    CU_ASSERT_EQUAL(one_pass(&c, 1, P * 8 * 40, true, NULL), one_pass(&c, 1, P * 8 * 40, false, NULL));
    // linear growth with context: full rows cost the same each (after the first)
    CU_ASSERT_EQUAL_FATAL(pim_preset("hbm2-pim", &c), 0);
    const uint64_t t16 = one_pass(&c, 0, P * 8 * 16, false, NULL), t32 = one_pass(&c, 0, P * 8 * 32, false, NULL),
                   t64 = one_pass(&c, 0, P * 8 * 64, false, NULL);
    CU_ASSERT(t32 > t16);
    CU_ASSERT_EQUAL(t64 - t32, 2 * (t32 - t16));
    // refresh: tRFC every tREFI of busy time
    CU_ASSERT_EQUAL(pim_refresh_cycles(&c, 3899), 3899);
    CU_ASSERT_EQUAL(pim_refresh_cycles(&c, 3900 * 3 + 5), 3900 * 3 + 5 + 3 * 350);
}

// Samsung's HBM2-PIM paper (Kwon et al., ISSCC 2021) gives 1.2 TFLOPS for a cube: 128 units (16
// pseudo-channels x 8) of 16 FP16 lanes at 300 MHz. With the parameters (tCK 1 ns, a step
// every tCCD_L = 4) the model's peak is 128 * 16 * 2 / 4 ns = 1.024 TFLOPS, 14.7% below: the chip's
// 300 MHz step clock is tCCD_L at tCK 0.83 ns (2.4 Gb/s pins), not 1 ns. At tCK 0.833 ns the model
// gives 1.229 TFLOPS (+2.4%). A long q.K^T pass then reaches most of the peak (row switches cost the rest).
static void test_pim_published_figure(void) {
    pim_config_t c;
    CU_ASSERT_EQUAL_FATAL(pim_preset("hbm2-pim", &c), 0);
    const double peak = pim_peak_flops(&c);
    CU_ASSERT_DOUBLE_EQUAL(peak, 1.024e12, 1e3);
    CU_ASSERT(peak < 1.2e12 && (1.2e12 - peak) / 1.2e12 < 0.15);
    c.tck_ns = 1.0 / 1.2;
    CU_ASSERT(fabs(pim_peak_flops(&c) - 1.2e12) / 1.2e12 < 0.025);
    CU_ASSERT_EQUAL_FATAL(pim_preset("hbm2-pim", &c), 0);
    const int n_tok = 128 * 8 * 512; // 512 rows on every unit
    const uint64_t cy = one_pass(&c, 0, n_tok, false, NULL);
    const double achieved = 2.0 * n_tok * 64 / (cy * c.tck_ns * 1e-9);
    // a 1 KB row of 32 steps (128 cycles) pays PRE + ACT + stagger (44): 128 / 172 of the peak
    CU_ASSERT(achieved > 0.70 * peak && achieved < 0.76 * peak);
    // AiM: 16 banks x 16 lanes at 1 GHz = 0.512 TFLOPS a channel, 1.024 a chip of 2 channels (published: 1 TFLOPS)
    CU_ASSERT_EQUAL_FATAL(pim_preset("aim-gddr6", &c), 0);
    CU_ASSERT_DOUBLE_EQUAL(pim_peak_flops(&c) / 8, 1.024e12, 1e3);
}

// The device's decode time grows linearly with the context and its energy with it.
static void test_pim_device_linear(void) {
    attn_params_t p = {.n_layer = 1, .head_dim = 64, .n_head = 8, .n_head_kv = 2, .h0 = 0, .h1 = 8, .kv0 = 0, .kv1 = 2,
                       .kv_type = QT_F16, .n_seq_max = 1};
    char err[256];
    double t[3], e[3];
    const int ctx[3] = {1024 * 16, 1024 * 32, 1024 * 64};
    float *kv = calloc(64 * 2, sizeof(float)), q[512] = {0}, out[512];
    for (int i = 0; i < 3; i++) {
        attn_dev_t *d = NULL;
        CU_ASSERT_EQUAL_FATAL(attn_dev_new(&d, "pim:hbm2-pim", &p, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(attn_dev_seq_new(d, 0, ctx[i] + 1), 0);
        for (int pos = 0; pos <= ctx[i]; pos++) CU_ASSERT_EQUAL_FATAL(attn_dev_append(d, 0, 0, pos, kv, kv, 1), 0);
        attn_stats_t a, b;
        attn_dev_stats(d, &a);
        CU_ASSERT_EQUAL(attn_dev_attend(d, 0, 0, q, 1, ctx[i], out), 0); // one decode step over ctx + 1 positions
        attn_dev_stats(d, &b);
        t[i] = b.sim_time_ms - a.sim_time_ms;
        e[i] = b.sim_energy_mj - a.sim_energy_mj;
        attn_dev_free(&d);
    }
    free(kv);
    CU_ASSERT(t[0] > 0 && e[0] > 0);
    CU_ASSERT(fabs((t[2] - t[1]) / (t[1] - t[0]) - 2.0) < 0.01);
    CU_ASSERT(fabs((e[2] - e[1]) / (e[1] - e[0]) - 2.0) < 0.01);
    fprintf(stderr, "(pim hbm2-pim decode, 8 heads x 64: %.4f / %.4f / %.4f ms at 16k / 32k / 64k) ", t[0], t[1], t[2]);
}

// --- every device against the host on the reference cases

// Prompt, then greedy tokens: the logits rows (n_prompt + n_greedy - 1, n_vocab) and the tokens.
static int run_case(const ref_case_t *rc, const model_t *m, const char *dev, float *lg, int32_t *toks, attn_stats_t *st) {
    char err[512];
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = rc->n_prompt + rc->n_greedy + 4, .n_threads = 2, .n_batch = 16, .attn_dev = dev};
    if (model_ctx_new(&c, m, &co, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", dev, err);
        return -1;
    }
    const int nv = rc->n_vocab;
    int rcode = model_eval(c, rc->prompt_tokens, rc->n_prompt, lg, true);
    int32_t next = 0;
    for (int i = 0; i < rc->n_greedy && rcode == 0; i++) {
        const float *row = lg + (size_t)(rc->n_prompt - 1 + i) * nv;
        int best = 0;
        for (int j = 1; j < nv; j++) best = row[j] > row[best] ? j : best;
        toks[i] = next = best;
        if (i + 1 < rc->n_greedy) rcode = model_eval(c, &next, 1, lg + (size_t)(rc->n_prompt + i) * nv, true);
    }
    if (st) attn_dev_stats(model_ctx_attn(c), st);
    model_ctx_destroy(&c);
    return rcode;
}

static void test_devices_reference_cases(void) {
    char **names = NULL;
    const int n = ref_list(&names);
    CU_ASSERT_FATAL(n > 0);
    char *dir = test_tmpdir();
    char spill[1100];
    snprintf(spill, sizeof spill, "file:%s,ram=1,block=16,cache=2", dir); // KV far past its RAM share: all spilled
    const char *devs[] = {spill, "pim:hbm2-pim", "pim:upmem"};
    int cases = 0;
    for (int i = 0; i < n; i++) {
        if (!strstr(names[i], ".p0") && !strstr(names[i], ".p1")) continue;
        ref_case_t rc;
        if (ref_load(names[i], &rc) != 0) continue;
        model_t *m = NULL;
        char err[512];
        if (model_load(&m, rc.model_path, NULL, err, sizeof err) != 0 || rc.n_greedy < 1) {
            ref_free(&rc);
            model_destroy(&m);
            continue;
        }
        const size_t rows = (size_t)(rc.n_prompt + rc.n_greedy);
        float *ref = calloc(rows * rc.n_vocab, sizeof(float)), *got = calloc(rows * rc.n_vocab, sizeof(float));
        int32_t *rt = calloc((size_t)rc.n_greedy, sizeof *rt), *gt = calloc((size_t)rc.n_greedy, sizeof *gt);
        CU_ASSERT_EQUAL_FATAL(run_case(&rc, m, "host", ref, rt, NULL), 0);
        const size_t cmp = (rows - 1) * rc.n_vocab * sizeof(float);
        for (size_t d = 0; d < sizeof devs / sizeof devs[0]; d++) {
            attn_stats_t st;
            memset(got, 0, rows * rc.n_vocab * sizeof(float));
            CU_ASSERT_EQUAL(run_case(&rc, m, devs[d], got, gt, &st), 0);
            const bool same = memcmp(ref, got, cmp) == 0 && memcmp(rt, gt, (size_t)rc.n_greedy * sizeof *gt) == 0;
            if (!same) fprintf(stderr, "\n  %s on %s: logits or tokens differ from the host device's", names[i], devs[d]);
            CU_ASSERT(same);
            if (d == 0) {
                CU_ASSERT(st.kv_bytes_ram == 0 && st.bytes_written > 0 && st.bytes_read > 0);
            } else {
                CU_ASSERT(st.sim_time_ms > 0);
            }
        }
        // the host device's greedy tokens are the reference's (llama.cpp's)
        CU_ASSERT_EQUAL(memcmp(rt, rc.greedy, (size_t)rc.n_greedy * sizeof *rt), 0);
        cases++;
        free(ref);
        free(got);
        free(rt);
        free(gt);
        model_destroy(&m);
        ref_free(&rc);
    }
    CU_ASSERT(cases >= 10);
    ref_names_free(names, n);
    test_rm_dir(dir);
}

// A cluster's --kv-device reaches its workers in the PLAN: a directory that is not there fails their
// device (the error names it); a real one gives a single node's logits; a worker's own flag is not
// tested here (cmd_worker: it wins over the plan's).
static void test_cluster_kv_device(void) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return;
    }
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load("stories260K.p0", &rc), 0);
    model_t *m = NULL;
    char err[1024];
    CU_ASSERT_EQUAL_FATAL(model_load(&m, rc.model_path, NULL, err, sizeof err), 0);
    const size_t rows = (size_t)(rc.n_prompt + rc.n_greedy);
    float *ref = calloc(rows * rc.n_vocab, sizeof(float)), *got = calloc(rows * rc.n_vocab, sizeof(float));
    int32_t *rt = calloc((size_t)rc.n_greedy, sizeof *rt);
    CU_ASSERT_EQUAL_FATAL(run_case(&rc, m, "host", ref, rt, NULL), 0);
    char *dir = test_tmpdir();
    char good[1100];
    snprintf(good, sizeof good, "file:%s,ram=1,block=8", dir);
    const char *devs[] = {"file:/nonexistent-meshlm-kv", good, "pim:neupims"};
    for (int d = 0; d < 3; d++) {
        launch_t l;
        launch_opts_t lo = {.exe = bin, .model_path = rc.model_path, .n_threads = 1};
        CU_ASSERT_EQUAL_FATAL(launch_local(&l, 2, &lo, err, sizeof err), 0);
        const char *eps[LAUNCH_MAX];
        for (int i = 0; i < l.n; i++) eps[i] = l.endpoint[i];
        cluster_opts_t co = {.model_path = rc.model_path, .workers = eps, .n_workers = l.n, .n_ctx = (int)rows + 8,
                             .n_threads = 1, .timeout_ms = 10000, .tp = 2, .pp = 1, .keep_all = true,
                             .kv_device = devs[d]};
        cluster_t *cl = NULL;
        const int orc = cluster_open(&cl, &co, err, sizeof err);
        if (d == 0) {
            CU_ASSERT_NOT_EQUAL(orc, 0);
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "/nonexistent-meshlm-kv"));
        } else if (orc != 0) {
            fprintf(stderr, "\n  cluster with %s: %s", devs[d], err);
            CU_FAIL("cluster_open");
        } else {
            const int nv = rc.n_vocab;
            int e = cluster_eval(cl, rc.prompt_tokens, rc.n_prompt, got, true);
            for (int i = 0; i + 1 < rc.n_greedy && e == 0; i++)
                e = cluster_eval(cl, &rt[i], 1, got + (size_t)(rc.n_prompt + i) * nv, true);
            CU_ASSERT_EQUAL(e, 0);
            CU_ASSERT_EQUAL(memcmp(ref, got, (rows - 1) * nv * sizeof(float)), 0);
        }
        cluster_close(&cl, true);
        launch_reap(&l, 5000);
    }
    test_rm_dir(dir);
    free(ref);
    free(got);
    free(rt);
    model_destroy(&m);
    ref_free(&rc);
}

// `meshlm plan --kv-device` shows where each node's KV lives; an unknown device is refused naming the list.
static void test_cli_kv_device(void) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return;
    }
    char cmd[3072], out[16384];
    snprintf(cmd, sizeof cmd, "%s plan --preset tinyllama-1.1b --nodes 2 -c 16384 --kv-device pim:upmem 2>&1", bin);
    CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "KV cache at n_ctx 16384 on pim:upmem"));
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "the simulated upmem part (capacity 160.00 GiB)"));
    // TinyLlama at 16k positions: 22 layers x 16384 x 4 KV heads x 64 x 2 bytes x (k, v) = 352 MiB over 2 nodes
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "176.0 MiB"));
    snprintf(cmd, sizeof cmd, "%s plan --preset tinyllama-1.1b --nodes 1:300M -c 32768 --tp 1 --kv-device file:/var/kv 2>&1", bin);
    test_capture(cmd, out, sizeof out);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "704.0 MiB")); // the KV, of which a part spills past the budget
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "then files in /var/kv"));
    char model[1024];
    test_shared_path(model, sizeof model, "models/stories260K.gguf");
    snprintf(cmd, sizeof cmd, "%s run -m %s -p hi -n 1 --kv-device bogus:x 2>&1", bin, model);
    CU_ASSERT_NOT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "--kv-device: no attention device 'bogus' (have: host file pim"));
    snprintf(cmd, sizeof cmd, "%s worker --listen ipc:///tmp/x --kv-device nope 2>&1", bin);
    CU_ASSERT_NOT_EQUAL(test_capture(cmd, out, sizeof out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(out, "no attention device 'nope'"));
    // a run on each device gives the same tokens, and says what the device did
    char toks[3][4096];
    const char *devs[] = {"host", "file:/tmp,ram=1,block=8", "pim:aim-gddr6"};
    for (int d = 0; d < 3; d++) {
        snprintf(cmd, sizeof cmd, "%s run -m %s -p 'Once upon a time' -n 24 --greedy --kv-device %s 2>&1", bin, model, devs[d]);
        CU_ASSERT_EQUAL(test_capture(cmd, out, sizeof out), 0);
        snprintf(toks[d], sizeof toks[d], "%.*s", (int)(strstr(out, "meshlm:") ? strstr(out, "meshlm:") - out : 0), out);
        CU_ASSERT(strlen(toks[d]) > 20);
        if (d == 1) CU_ASSERT_PTR_NOT_NULL(strstr(out, "KV device file: KV"));
        if (d == 2) CU_ASSERT_PTR_NOT_NULL(strstr(out, "SIMULATED attention (timing model, not measured)"));
        if (d > 0) CU_ASSERT_STRING_EQUAL(toks[d], toks[0]);
    }
}

// --- the Q8_0 KV cache (changes outputs: bounded against the F16 cache)

// Teacher-forced logits (n, n_vocab) of the first n tokens of prompt ++ greedy on device dev with a Q8_0
// or F16 cache; the device's stats after. 0 or an error.
static int forced(const ref_case_t *rc, const model_t *m, const char *dev, bool q8, int n, float *lg, attn_stats_t *st) {
    char err[512];
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = n, .n_threads = 2, .n_batch = 16, .attn_dev = dev, .kv_q8 = q8};
    if (model_ctx_new(&c, m, &co, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", dev, err);
        return -1;
    }
    int32_t *toks = malloc(sizeof *toks * (size_t)n); // (n) the case's tokens
    for (int i = 0; i < n; i++) toks[i] = i < rc->n_prompt ? rc->prompt_tokens[i] : rc->greedy[i - rc->n_prompt];
    int rcode = model_eval(c, toks, n, lg, true);
    if (st) attn_dev_stats(model_ctx_attn(c), st);
    free(toks);
    model_ctx_destroy(&c);
    return rcode;
}

static void test_q8_kv(void) {
    const char *cases[] = {"synth-dense-F16.p0", "synth-dense-F16.p1", "synth-dense-Q4_0.p0", "synth-dense-Q8_0.p1"};
    char *dir = test_tmpdir();
    char spill[1100];
    snprintf(spill, sizeof spill, "file:%s,ram=1,block=16,cache=2", dir);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        ref_case_t rc;
        CU_ASSERT_EQUAL_FATAL(ref_load(cases[k], &rc), 0);
        model_t *m = NULL;
        char err[512];
        CU_ASSERT_EQUAL_FATAL(model_load(&m, rc.model_path, NULL, err, sizeof err), 0);
        const model_hparams_t *hp = model_hparams(m);
        CU_ASSERT_EQUAL(hp->head_dim, 32); // whole Q8_0 blocks per head
        const int n = rc.n_prompt + rc.n_greedy - 1, nv = rc.n_vocab;
        float *f16 = calloc((size_t)n * nv, sizeof(float)), *q8 = calloc((size_t)n * nv, sizeof(float)),
              *q8f = calloc((size_t)n * nv, sizeof(float));
        attn_stats_t s16, s8, s8f;
        CU_ASSERT_EQUAL_FATAL(forced(&rc, m, "host", false, n, f16, &s16), 0);
        CU_ASSERT_EQUAL_FATAL(forced(&rc, m, "host", true, n, q8, &s8), 0);
        CU_ASSERT_EQUAL_FATAL(forced(&rc, m, spill, true, n, q8f, &s8f), 0);
        // memory per position: per layer a k and a v row of n_head_kv * head_dim elements, F16 2 bytes each,
        // Q8_0 34 bytes per 32 (an F16 scale and 32 int8)
        const uint64_t kvd = (uint64_t)hp->n_head_kv * hp->head_dim;
        CU_ASSERT_EQUAL(s16.kv_bytes, (uint64_t)n * hp->n_layer * 2 * kvd * 2);
        CU_ASSERT_EQUAL(s8.kv_bytes, (uint64_t)n * hp->n_layer * 2 * (kvd / 32) * 34);
        CU_ASSERT_EQUAL(s8.kv_bytes * 64, s16.kv_bytes * 34); // 0.53125 of the F16 cache
        // the file device stores the same Q8_0 rows (blocks of 16 positions, all spilled) and gives the host's bits
        CU_ASSERT_EQUAL(s8f.kv_bytes, (uint64_t)((n + 15) / 16 * 16) * hp->n_layer * 2 * (kvd / 32) * 34);
        CU_ASSERT_EQUAL(s8f.kv_bytes_ram, 0);
        CU_ASSERT_EQUAL(memcmp(q8, q8f, (size_t)n * nv * sizeof(float)), 0);
        // the Q8_0 cache changes the logits, within a bound: per row the largest difference against the F16
        // cache's row, as a fraction of that row's range; and the top token mostly agrees
        double worst = 0, worst_ref = 0;
        int differ = 0, top_same = 0;
        for (int r = 0; r < n; r++) {
            double md, range, mr, rr;
            ref_row_diff(q8 + (size_t)r * nv, f16 + (size_t)r * nv, nv, &md, &range);
            ref_row_diff(q8 + (size_t)r * nv, rc.logits + (size_t)r * nv, nv, &mr, &rr);
            worst = fmax(worst, md / range);
            worst_ref = fmax(worst_ref, mr / rr);
            differ += md > 0;
            int a = 0, b = 0;
            for (int j = 1; j < nv; j++) {
                a = q8[(size_t)r * nv + j] > q8[(size_t)r * nv + a] ? j : a;
                b = f16[(size_t)r * nv + j] > f16[(size_t)r * nv + b] ? j : b;
            }
            top_same += a == b;
        }
        fprintf(stderr, "(%s: %d rows, Q8_0 KV vs F16 KV max %.4f%% of the row's range, vs llama.cpp %.4f%%, "
                        "%d rows differ, top-1 same on %d) ", cases[k], n, 100 * worst, 100 * worst_ref, differ, top_same);
        CU_ASSERT(differ > 0);        // the Q8_0 path is taken: outputs do change
        CU_ASSERT(worst < 0.03);      // ... by under 3% of a row's range (measured: 0.79% to 2.13%)
        CU_ASSERT(worst_ref < 0.03);  // and stay as near llama.cpp's (F16 KV) logits
        CU_ASSERT(top_same >= n * 9 / 10);
        free(f16);
        free(q8);
        free(q8f);
        model_destroy(&m);
        ref_free(&rc);
    }
    // devices that cannot hold Q8_0 rows, and heads that are not whole blocks, are refused
    attn_dev_t *d = NULL;
    char err[256];
    attn_params_t p = {.n_layer = 1, .head_dim = 32, .n_head = 2, .n_head_kv = 1, .h0 = 0, .h1 = 2, .kv0 = 0, .kv1 = 1,
                       .kv_type = QT_Q8_0};
    CU_ASSERT_EQUAL(attn_dev_new(&d, "pim:hbm2-pim", &p, err, sizeof err), MLM_EUNSUPPORTED);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "not Q8_0"));
    CU_ASSERT_EQUAL(attn_dev_new(&d, "host", &p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(attn_dev_seq_new(d, 0, 100), 0);
    attn_stats_t st;
    attn_dev_stats(d, &st);
    CU_ASSERT_EQUAL(st.kv_bytes, 100ull * 2 * 34);
    attn_dev_free(&d);
    p.head_dim = 16;
    CU_ASSERT_EQUAL(attn_dev_new(&d, "host", &p, err, sizeof err), MLM_EUNSUPPORTED);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "head_dim a multiple of 32"));
    test_rm_dir(dir);
}

int test_kv_suite(void) {
    CU_pSuite s = CU_add_suite("kv", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "paged store: RAM and file tiers, read cache, counters, refusals", test_store_tiers) ||
        !CU_add_test(s, "PIM bank: row hit, row miss, tRAS, dual row buffers (hand-computed)", test_pim_bank_cycles) ||
        !CU_add_test(s, "PIM passes: all banks in parallel, skipped rows exact, linear, refresh", test_pim_passes) ||
        !CU_add_test(s, "PIM: HBM2-PIM's published 1.2 TFLOPS with the preset's parameters", test_pim_published_figure) ||
        !CU_add_test(s, "PIM device: decode time and energy linear in the context", test_pim_device_linear) ||
        !CU_add_test(s, "file (all spilled) and pim devices: the host's logits and tokens on the reference cases",
                     test_devices_reference_cases) ||
        !CU_add_test(s, "a cluster's --kv-device reaches the workers in the PLAN", test_cluster_kv_device) ||
        !CU_add_test(s, "--kv-device on plan, run and worker", test_cli_kv_device) ||
        !CU_add_test(s, "Q8_0 KV: memory per position, logits bounded against F16 KV, refusals", test_q8_kv))
        return -1;
    return 0;
}
