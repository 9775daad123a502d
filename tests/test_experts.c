// CUnit suite "experts": the expert-caching weight provider (offload/experts.h). On the MoE reference
// models every cache size, policy and prefetch setting gives the mapped model's logits bit for bit; a
// budget smaller than the experts derives a smaller cache and still does; the counters follow known
// acquire traces (all resident: every acquire hits; one expert repeated: one miss then hits; a trace on
// which LRU and LFU evict differently); adaptive gating changes outputs only when on; `meshlm run
// --expert-cache` gives the tokens of a plain run.
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "coordinator/cli/routing_stats.h"
#include "offload/expert_sim.h"
#include "offload/experts.h"
#include "offload/weights.h"
#include "worker/model/model.h"

// --- helpers

#define N_CTX 64

static const char *const moe_models[] = {
    "models/synth/synth-moe-Q4_0.gguf",
    "models/synth/synth-moe-Q8_0.gguf",
    "models/synth/synth-moe-F16.gguf",
    "models/synth/synth-moe-Q4_K_M.gguf",
    "models/derived/stories260K-moe8x-top2-permuted.gguf",
    "models/derived/stories260K-moe4x-top4-split.gguf",
};
#define N_MODELS (sizeof moe_models / sizeof moe_models[0])

// Loads path with the provider (repack allowed: "experts" computes on the file's layout anyway).
static model_t *load(const char *path, const char *provider, uint64_t budget, float skip) {
    model_t *m = NULL;
    char err[512];
    model_load_opts_t lo = {.repack = !provider || strcmp(provider, "mmap") != 0, .weights = provider, .mem_budget = budget, .n_ctx = N_CTX,
                            .expert_skip = skip};
    if (model_load(&m, path, &lo, err, sizeof err) != 0)
        fprintf(stderr, "\n  load %s (%s): %s\n", path, provider ? provider : "by the budget", err);
    return m;
}


// Whether provider's logits on model equal the mapped model's (not repacked, the layout the cache
// computes on, as `--no-repack` and the streaming window do) bit for bit; fills *st.
static bool same_as_mapped(const char *rel, const char *provider, uint64_t budget, weights_stats_t *st) {
    char path[1024];
    test_shared_path(path, sizeof path, rel);
    model_t *a = load(path, "mmap", 0, 0), *b = load(path, provider, budget, 0);
    bool same = false;
    memset(st, 0, sizeof *st);
    if (a && b) {
        float *la = test_logits12(a, N_CTX, 8), *lb = test_logits12(b, N_CTX, 8);
        same = la && lb && memcmp(la, lb, (size_t)12 * model_hparams(a)->n_vocab * sizeof(float)) == 0;
        if (!same) fprintf(stderr, "\n  %s with %s: logits differ from the mapped model's\n", rel, provider);
        weights_stats(model_weights(b), st);
        if (strcmp(weights_name(model_weights(b)), "experts") != 0) same = false;
        free(la);
        free(lb);
    }
    model_destroy(&a);
    model_destroy(&b);
    return same;
}

// --- tests

static void test_options(void) {
    experts_opts_t o = experts_opts_default();
    char err[256], name[128];
    CU_ASSERT_EQUAL(experts_parse("n=3,policy=lfu,prefetch=off", &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(o.per_layer, 3);
    CU_ASSERT_EQUAL(o.policy, EXPERTS_LFU);
    CU_ASSERT_FALSE(o.prefetch);
    experts_name(&o, name, sizeof name);
    CU_ASSERT_STRING_EQUAL(name, "experts:n=3,policy=lfu,prefetch=off");
    CU_ASSERT_EQUAL(experts_opts_default().prefetch, EXPERTS_PREFETCH_AUTO);
    CU_ASSERT_EQUAL(experts_parse("prefetch=auto", &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(o.prefetch, EXPERTS_PREFETCH_AUTO);
    experts_name(&o, name, sizeof name);
    CU_ASSERT_STRING_EQUAL(name, "experts:n=3,policy=lfu,prefetch=auto");
    CU_ASSERT_EQUAL(experts_parse("prefetch=sometimes", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "on, off or auto"));
    CU_ASSERT_EQUAL(experts_parse("prefetch=off", &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(experts_parse("n=off", &o, err, sizeof err), 0);
    CU_ASSERT_TRUE(o.naive);
    experts_name(&o, name, sizeof name);
    CU_ASSERT_STRING_EQUAL(name, "experts:n=off,policy=lfu,prefetch=off");
    CU_ASSERT_EQUAL(experts_parse("policy=mru", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "lru or lfu"));
    CU_ASSERT_EQUAL(experts_parse("n=-1", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_TRUE(experts_opts_default().direct || getenv("MESHLM_EXPERTS_IO")); // direct reads unless told
    CU_ASSERT_EQUAL(experts_parse("io=pread", &o, err, sizeof err), 0);
    CU_ASSERT_FALSE(o.direct);
    experts_name(&o, name, sizeof name);
    CU_ASSERT_STRING_EQUAL(name, "experts:n=off,policy=lfu,prefetch=off,io=pread");
    CU_ASSERT_EQUAL(experts_parse("io=direct", &o, err, sizeof err), 0);
    CU_ASSERT_TRUE(o.direct);
    CU_ASSERT_EQUAL(experts_parse("io=mmap", &o, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "direct or pread"));
    CU_ASSERT_EQUAL(experts_parse("size=2", &o, err, sizeof err), MLM_EINVAL);
}

// Every model, a cache of one expert per block with and without prefetch, two with LFU, none at all, and
// one read buffered instead of direct (the F16 and Q8_0 models' expert matrices are large enough to be
// read with O_DIRECT): the mapped model's logits bit for bit.
static void test_logits_identical(void) {
    static const char *const providers[] = {"experts:n=1,prefetch=off", "experts:n=1,prefetch=on",
                                            "experts:n=2,policy=lfu", "experts:n=off", "experts",
                                            "experts:n=1,prefetch=off,io=pread"};
    for (size_t i = 0; i < N_MODELS; i++)
        for (size_t j = 0; j < sizeof providers / sizeof providers[0]; j++) {
            weights_stats_t st;
            CU_ASSERT_TRUE(same_as_mapped(moe_models[i], providers[j], 0, &st));
            CU_ASSERT(st.expert_hits + st.expert_misses > 0);
            CU_ASSERT_EQUAL(st.hits + st.misses, st.acquires);
            if (j == 4) CU_ASSERT_EQUAL(st.misses, 0); // all resident, read at creation
            if (j == 3) CU_ASSERT_EQUAL(st.expert_hits, 0);   // no cache: every use reads
            if (j == 3) CU_ASSERT_EQUAL(st.units_read, st.misses);
        }
}

// Prefetch on a 4-of-8 cache (top-2: room for 2 guesses per block): reads ahead happen (router hints,
// guesses), some are used, tokens the same. On a 2-of-8 cache nothing is guessed (no slot the next
// token's own experts do not need), and the hinted reads change no counter of acquires.
static void test_prefetch_counts(void) {
    weights_stats_t on, off, tight;
    CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", "experts:n=4,prefetch=on", 0, &on));
    CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", "experts:n=4,prefetch=off", 0, &off));
    CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", "experts:n=2,prefetch=on", 0, &tight));
    fprintf(stderr, "\n  4 slots, prefetch on: %llu hits %llu misses, %llu guessed reads (%llu used); off: %llu hits %llu "
            "misses; 2 slots, on: %llu guessed reads ",
            (unsigned long long)on.expert_hits, (unsigned long long)on.expert_misses,
            (unsigned long long)on.prefetch_reads, (unsigned long long)on.prefetch_used,
            (unsigned long long)off.expert_hits, (unsigned long long)off.expert_misses,
            (unsigned long long)tight.prefetch_reads);
    CU_ASSERT(on.prefetch_reads > 0);
    CU_ASSERT(on.prefetch_used <= on.prefetch_reads);
    CU_ASSERT_EQUAL(off.prefetch_reads, 0);
    CU_ASSERT_EQUAL(tight.prefetch_reads, 0);
    CU_ASSERT_EQUAL(on.hits + on.misses, off.hits + off.misses); // the same expert acquires
    CU_ASSERT_EQUAL(on.guesses_paused, 0); // on: always guesses
    // auto: the same logits; each block's observation is guessed from or paused (reads were waited for)
    weights_stats_t au;
    CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", "experts:n=4,prefetch=auto", 0, &au));
    CU_ASSERT(au.prefetch_reads > 0 || au.guesses_paused > 0);
    CU_ASSERT_EQUAL(au.hits + au.misses, off.hits + off.misses);
}

// A budget below the model's experts: the cache holds what fits (fewer than all), the logits stay.
static void test_budget(void) {
    char path[1024], err[512];
    test_shared_path(path, sizeof path, "models/synth/synth-moe-Q8_0.gguf");
    gguf_t *g = NULL;
    model_hparams_t hp;
    CU_ASSERT_EQUAL_FATAL(gguf_open(&g, path, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(hparams_read(g, &hp, err, sizeof err), 0);
    shard_slice_t sl = shard_full(hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_embd, hp.n_ff, hp.n_vocab);
    weights_params_t p = {.g = g, .hp = &hp, .slice = &sl, .n_ctx = N_CTX};
    int all = 0, n = 0;
    CU_ASSERT_EQUAL(experts_fit(&p, &all, err, sizeof err), 0);
    CU_ASSERT_EQUAL(all, hp.n_expert);
    // the resident share with every expert, then a budget three experts per block short of it
    p.budget_bytes = 1ull << 40;
    plan_stream_t st;
    CU_ASSERT_EQUAL_FATAL(weights_plan(&p, &st, err, sizeof err), 0);
    uint64_t eb = 0; // one expert of every block
    for (int il = 0; il < hp.n_layer; il++) {
        const char *names[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
        for (int m = 0; m < 3; m++) {
            char tn[96];
            snprintf(tn, sizeof tn, "blk.%d.%s.weight", il, names[m]);
            const gguf_tensor_t *t = gguf_find_tensor(g, tn);
            CU_ASSERT_PTR_NOT_NULL_FATAL(t);
            eb += t->nbytes / (uint64_t)hp.n_expert;
        }
    }
    p.budget_bytes = st.resident_bytes - 5 * eb - eb / 2; // room for 2 of 8 per block
    CU_ASSERT_EQUAL(experts_fit(&p, &n, err, sizeof err), 0);
    CU_ASSERT_EQUAL(n, hp.n_expert - 6);
    p.budget_bytes = st.resident_bytes - (uint64_t)hp.n_expert * eb + eb / 2; // not even one
    CU_ASSERT_EQUAL(experts_fit(&p, &n, err, sizeof err), MLM_ERANGE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "below the"));
    const uint64_t budget = st.resident_bytes - 5 * eb - eb / 2;
    // no provider named: a MoE share over its budget caches its experts by default (not the window),
    // mapped when everything fits; below one expert per block, a pool of slots the blocks share
    const char *name = NULL;
    p.budget_bytes = budget;
    CU_ASSERT_EQUAL(weights_choose(&p, &name, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(name, "experts");
    p.budget_bytes = st.resident_bytes;
    CU_ASSERT_EQUAL(weights_choose(&p, &name, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(name, "mmap");
    const uint64_t below_one = st.resident_bytes - (uint64_t)hp.n_expert * eb + eb / 2;
    p.budget_bytes = below_one;
    int pool = 0;
    CU_ASSERT_EQUAL(experts_pool_fit(&p, &pool, NULL, err, sizeof err), 0);
    CU_ASSERT(pool >= 1 && pool < hp.n_layer); // room for half of one expert per block
    CU_ASSERT_EQUAL(weights_choose(&p, &name, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(name, "experts");
    // below the rest and a single expert: neither fits
    p.budget_bytes = st.resident_bytes - (uint64_t)hp.n_expert * eb + eb / (2 * (uint64_t)hp.n_layer);
    CU_ASSERT_EQUAL(experts_pool_fit(&p, &pool, NULL, err, sizeof err), MLM_ERANGE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "read one at a time"));
    const int rc_none = weights_choose(&p, &name, err, sizeof err);
    CU_ASSERT(rc_none != 0 || strcmp(name, "experts") != 0);
    // the window does not fit either (a whole block): the refusal names the pool's smaller minimum
    CU_ASSERT_EQUAL(rc_none, MLM_ERANGE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "the experts need read one at a time"));
    gguf_close(&g);
    {
        weights_stats_t ps;
        CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", NULL, below_one, &ps));
        CU_ASSERT(ps.misses > 0 && ps.units_read > 0);
        CU_ASSERT(ps.bytes_peak <= below_one);
        fprintf(stderr, "\n  below one expert per block (%.2f MiB): a pool of %d slots, peak %.2f MiB, %llu hits "
                "%llu misses", (double)below_one / 1048576.0, pool, (double)ps.bytes_peak / 1048576.0,
                (unsigned long long)ps.expert_hits, (unsigned long long)ps.expert_misses);
    }
    weights_stats_t ws;
    CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", NULL, budget, &ws));
    CU_ASSERT(ws.misses > 0);
    CU_ASSERT(ws.bytes_peak <= budget);
    CU_ASSERT_TRUE(same_as_mapped("models/synth/synth-moe-Q8_0.gguf", "experts", budget, &ws));
    CU_ASSERT(ws.misses > 0);
    CU_ASSERT(ws.bytes_peak <= budget);
    fprintf(stderr, "\n  budget %.2f MiB (all resident %.2f MiB): peak %.2f MiB of weights, %llu hits %llu misses ",
            (double)budget / 1048576.0, (double)st.resident_bytes / 1048576.0, (double)ws.bytes_peak / 1048576.0,
            (unsigned long long)ws.hits, (unsigned long long)ws.misses);
}

// Tokens of k experts each on block 0, acquired and released in order; with hint, each token's experts
// are hinted first as the forward pass does (weights_prefetch), and settle_ms later acquired (time for
// the background thread to read them ahead). Returns the provider's counters.
static weights_stats_t trace_tokens(const char *provider, const int *experts, int n_tok, int k, bool hint,
                                    int settle_ms) {
    char path[1024];
    test_shared_path(path, sizeof path, "models/synth/synth-moe-Q8_0.gguf");
    model_t *m = load(path, provider, 0, 0);
    weights_stats_t st;
    memset(&st, 0, sizeof st);
    CU_ASSERT_PTR_NOT_NULL_FATAL(m);
    weights_t *w = model_weights(m);
    for (int t = 0; t < n_tok; t++) {
        if (hint) weights_prefetch(w, 0, experts + (size_t)t * k, k);
        if (settle_ms > 0) nanosleep(&(struct timespec){0, settle_ms * 1000000L}, NULL);
        for (int r = 0; r < k; r++) {
            const layer_weights_t *X;
            CU_ASSERT_EQUAL(weights_acquire(w, 0, experts[t * k + r], &X), 0);
            if (X) CU_ASSERT(X->w_gate.rows > 0 && X->w_down.rows > 0);
            weights_release(w, 0, experts[t * k + r]);
        }
    }
    weights_stats(w, &st);
    model_destroy(&m);
    return st;
}

// One expert at a time, no hints.
static weights_stats_t trace(const char *provider, const int *experts, int n) {
    return trace_tokens(provider, experts, n, 1, false, 0);
}

static void test_trace_counters(void) {
    const int all[] = {0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0};
    weights_stats_t st = trace("experts:n=8,prefetch=off", all, 16);
    CU_ASSERT_EQUAL(st.hits, 16); // all resident: hit rate 1
    CU_ASSERT_EQUAL(st.misses, 0);

    const int one[] = {3, 3, 3, 3, 3, 3, 3, 3, 3, 3};
    st = trace("experts:n=1,prefetch=off", one, 10);
    CU_ASSERT_EQUAL(st.misses, 1); // the first use reads it, the rest hit
    CU_ASSERT_EQUAL(st.hits, 9);
    CU_ASSERT_EQUAL(st.units_read, 1);

    // 2 slots: 0 is used three times, then 1 and 2 come; LRU evicts 0 (least recent) for 2 and misses
    // it again, LFU evicts 1 (used once) and hits 0
    const int lx[] = {0, 0, 0, 1, 2, 0};
    weights_stats_t lru = trace("experts:n=2,policy=lru,prefetch=off", lx, 6);
    weights_stats_t lfu = trace("experts:n=2,policy=lfu,prefetch=off", lx, 6);
    CU_ASSERT_EQUAL(lru.hits, 2);
    CU_ASSERT_EQUAL(lru.misses, 4);
    CU_ASSERT_EQUAL(lfu.hits, 3);
    CU_ASSERT_EQUAL(lfu.misses, 3);
    CU_ASSERT_EQUAL(lru.evictions, 2);
    CU_ASSERT_EQUAL(lfu.evictions, 1);

    // 2 slots, top-2 tokens {0,1}, {2,0}, {3,2}, {4,3}: each token's second expert was the previous
    // token's first. Hinted, the new first expert evicts the one not wanted (the previous second) and
    // the second hits: 2 + 3 misses, 3 hits. Without the hint LRU evicted the wanted one (the least
    // recent) for the new first and missed it next: every use a miss.
    const int chain[] = {0, 1, 2, 0, 3, 2, 4, 3};
    st = trace_tokens("experts:n=2,policy=lru,prefetch=off", chain, 4, 2, true, 0);
    CU_ASSERT_EQUAL(st.expert_misses, 5);
    CU_ASSERT_EQUAL(st.expert_hits, 3);
    CU_ASSERT_EQUAL(st.evictions, 3);
    // the same with the hinted experts read ahead by the background thread before they are acquired:
    // a read for the use that acquires it is that use's miss, not a hit (it read the same bytes)
    st = trace_tokens("experts:n=2,policy=lru,prefetch=on", chain, 4, 2, true, 30);
    CU_ASSERT_EQUAL(st.expert_misses, 5);
    CU_ASSERT_EQUAL(st.expert_hits, 3);
    CU_ASSERT_EQUAL(st.units_read, 5);

    // no cache: every use reads, even a repeat
    st = trace("experts:n=off", one, 10);
    CU_ASSERT_EQUAL(st.hits, 0);
    CU_ASSERT_EQUAL(st.misses, 10);
    CU_ASSERT_EQUAL(st.expert_misses, 10);
    CU_ASSERT_EQUAL(st.units_read, 10);
}

// The cache model (offload/expert_sim.h) against the provider: on the traces above and on 300
// seeded top-2 tokens, LRU and LFU with 1-3 slots hit exactly what the provider counted; Belady's
// optimal policy hits a known count on a cyclic trace where LRU and LFU hit nothing, and never less
// than either policy.
static void test_sim(void) {
    exsim_result_t r;
    const int lx[] = {0, 0, 0, 1, 2, 0}, chain[] = {0, 1, 2, 0, 3, 2, 4, 3};
    CU_ASSERT_EQUAL_FATAL(exsim_replay(lx, 6, 1, 1, 8, 2, EXSIM_LRU, &r), 0);
    CU_ASSERT_EQUAL(r.uses, 6);
    CU_ASSERT_EQUAL(r.hits, 2);
    CU_ASSERT_EQUAL(exsim_replay(lx, 6, 1, 1, 8, 2, EXSIM_LFU, &r), 0);
    CU_ASSERT_EQUAL(r.hits, 3);
    CU_ASSERT_EQUAL(exsim_replay(chain, 4, 1, 2, 8, 2, EXSIM_LRU, &r), 0);
    CU_ASSERT_EQUAL(r.hits, 3);
    // 0 1 2 0 1 2 0 1 2 through 2 slots: LRU and LFU always evict the next one needed; the optimal
    // policy keeps it and hits at tokens 3, 5 and 7
    const int cyc[] = {0, 1, 2, 0, 1, 2, 0, 1, 2};
    CU_ASSERT_EQUAL(exsim_replay(cyc, 9, 1, 1, 3, 2, EXSIM_LRU, &r), 0);
    CU_ASSERT_EQUAL(r.hits, 0);
    CU_ASSERT_EQUAL(exsim_replay(cyc, 9, 1, 1, 3, 2, EXSIM_LFU, &r), 0);
    CU_ASSERT_EQUAL(r.hits, 0);
    CU_ASSERT_EQUAL(exsim_replay(cyc, 9, 1, 1, 3, 2, EXSIM_OPT, &r), 0);
    CU_ASSERT_EQUAL(r.hits, 3);
    // bad shapes and ids are refused
    CU_ASSERT_EQUAL(exsim_replay(cyc, 9, 1, 1, 2, 2, EXSIM_LRU, &r), MLM_EINVAL); // id 2 of 2 experts
    CU_ASSERT_EQUAL(exsim_replay(cyc, 9, 1, 1, 3, 0, EXSIM_LRU, &r), MLM_EINVAL);

    enum { T = 300 };
    int tr[T * 2];
    uint64_t seed = 42;
    for (int t = 0; t < T; t++) { // skewed: expert e drawn with weight 8 - e, two distinct per token
        for (int j = 0; j < 2; j++) {
            int e;
            do {
                seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                int u = (int)((seed >> 33) % 36); // 8 + 7 + ... + 1
                for (e = 0; u >= 8 - e; e++) u -= 8 - e;
            } while (j == 1 && e == tr[2 * t]);
            tr[2 * t + j] = e;
        }
    }
    for (int n = 1; n <= 3; n++)
        for (int p = EXSIM_LRU; p <= EXSIM_LFU; p++) {
            char prov[96];
            snprintf(prov, sizeof prov, "experts:n=%d,policy=%s,prefetch=off", n, exsim_policy_name(p));
            const weights_stats_t st = trace_tokens(prov, tr, T, 2, true, 0);
            exsim_result_t opt;
            CU_ASSERT_EQUAL(exsim_replay(tr, T, 1, 2, 8, n, p, &r), 0);
            CU_ASSERT_EQUAL(exsim_replay(tr, T, 1, 2, 8, n, EXSIM_OPT, &opt), 0);
            CU_ASSERT_EQUAL(r.uses, 2 * T);
            CU_ASSERT_EQUAL((long)st.expert_hits, r.hits);
            CU_ASSERT_EQUAL((long)st.expert_misses, r.uses - r.hits);
            CU_ASSERT(opt.hits >= r.hits);
            if ((long)st.expert_hits != r.hits)
                fprintf(stderr, "\n  %s: the provider hit %ld, the model %ld\n", prov, (long)st.expert_hits, r.hits);
        }
}

// `meshlm inspect --routing`'s cache table on a reference model: a row per cache size up to
// n_expert - 1, the hit rates in order (LRU, LFU <= optimal, the optimal growing with the slots), and
// the counts one pick per token and rank per block.
static void test_routing_table(void) {
    char path[1024], err[512] = "";
    test_shared_path(path, sizeof path, "models/synth/synth-moe-Q8_0.gguf");
    routing_stats_t rs;
    CU_ASSERT_EQUAL_FATAL(routing_stats_measure(path, 40, 1, &rs, err, sizeof err), 0);
    CU_ASSERT_EQUAL(rs.n_expert, 8);
    CU_ASSERT_EQUAL(rs.k, 2);
    CU_ASSERT_EQUAL_FATAL(rs.n_cache, 7);
    for (int l = 0; l < rs.n_layer; l++) {
        long sum = 0;
        for (int e = 0; e < rs.n_expert; e++) sum += rs.count[(size_t)l * rs.n_expert + e];
        CU_ASSERT_EQUAL(sum, 40 * 2);
    }
    for (int i = 0; i < rs.n_cache; i++) {
        const routing_cache_t *c = &rs.cache[i];
        CU_ASSERT_EQUAL(c->n, i + 1);
        CU_ASSERT(c->lru >= 0 && c->lru <= c->opt && c->lfu <= c->opt && c->opt < 1);
        if (i > 0) CU_ASSERT(c->opt >= rs.cache[i - 1].opt);
    }
    CU_ASSERT(rs.cache[6].opt > rs.cache[0].opt); // 7 of 8 resident hits more than 1
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    routing_stats_print(&rs, f);
    fclose(f);
    CU_ASSERT_PTR_NOT_NULL(strstr(buf, "optimal"));
    CU_ASSERT_PTR_NOT_NULL(strstr(buf, "\n          7 "));
    free(buf);
    routing_stats_free(&rs);
    CU_ASSERT_PTR_NULL(rs.cache);
    CU_ASSERT_EQUAL(routing_stats_measure(path, 40, 1, &rs, err, sizeof err), 0); // freed twice is fine
    routing_stats_free(&rs);
    routing_stats_free(&rs);
}

// Adaptive gating: off gives the reference; a threshold above every second weight changes the logits
// (the second expert is dropped), and then reads fewer experts.
static void test_skip(void) {
    char path[1024];
    test_shared_path(path, sizeof path, "models/synth/synth-moe-Q8_0.gguf");
    model_t *a = load(path, "experts:n=1,prefetch=off", 0, 0), *b = load(path, "experts:n=1,prefetch=off", 0, 0.51f);
    CU_ASSERT_PTR_NOT_NULL_FATAL(a);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b);
    float *la = test_logits12(a, N_CTX, 8), *lb = test_logits12(b, N_CTX, 8);
    CU_ASSERT(la && lb);
    if (la && lb) CU_ASSERT(memcmp(la, lb, (size_t)12 * model_hparams(a)->n_vocab * sizeof(float)) != 0);
    weights_stats_t sa, sb;
    weights_stats(model_weights(a), &sa);
    weights_stats(model_weights(b), &sb);
    CU_ASSERT(sb.expert_hits + sb.expert_misses < sa.expert_hits + sa.expert_misses); // top-1 only: fewer uses
    free(la);
    free(lb);
    model_destroy(&a);
    model_destroy(&b);
}

// --- tests: the command line

// Runs `meshlm run` on the Q8_0 synthetic MoE with extra options (a space-separated list, no quoting);
// its stdout (the text) into out, its stderr into errout (cap bytes each). 0 when it ran and exited 0.
static int run_cli(const char *extra, char *out, char *errout, size_t cap) {
    char path[1024], cmd[4096], ef[64];
    test_shared_path(path, sizeof path, "models/synth/synth-moe-Q8_0.gguf");
    snprintf(ef, sizeof ef, "/tmp/test_experts_%d.err", (int)getpid());
    snprintf(cmd, sizeof cmd, "%s run -m %s -p 'Once upon a time' -n 12 --greedy -c 64 -t 2 %s 2>%s",
             test_meshlm_bin(), path, extra, ef);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = 0;
    const int st = pclose(f);
    FILE *e = fopen(ef, "r");
    n = e ? fread(errout, 1, cap - 1, e) : 0;
    errout[n] = 0;
    if (e) fclose(e);
    unlink(ef);
    if (st != 0) fprintf(stderr, "\n  meshlm run %s: exit %d: %s\n", extra, st, errout);
    return st == 0 ? 0 : -1;
}

// `run --expert-cache`: one node (a cache of one expert, LFU, prefetch off, and the budget's own size
// below the experts, with the option and by default), and local workers that cache their shares: the
// text of a plain run.
static void test_cli_tokens(void) {
    if (!test_meshlm_bin()) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return;
    }
    enum { CAP = 16384 };
    char *ref = malloc(CAP), *out = malloc(CAP), *err = malloc(CAP);
    CU_ASSERT_FATAL(ref && out && err);
    CU_ASSERT_EQUAL_FATAL(run_cli("", ref, err, CAP), 0);
    CU_ASSERT(strlen(ref) > strlen("Once upon a time"));
    const char *const cases[] = {
        "--expert-cache 1",
        "--expert-cache 1 --expert-policy lfu --expert-prefetch off",
        "--expert-cache auto --mem-budget 5M",  // the experts alone weigh 6.4 MiB
        "--mem-budget 5M",                      // the same by default: the cache, not the window
        // below one expert per block (0.8 MiB beside the rest): a pool of slots the blocks share
        "--mem-budget 2400K",                   // 2 slots
        "--expert-cache auto --mem-budget 2M",  // 1 slot: every expert read, one at a time
        "--expert-cache off",
        "--local 2 --keep-all --expert-cache 1",
        "--local 3 --ep 3 --verbose --expert-cache 1", // each caching one of the experts placed on it
        "--local 2 --ep 2 --local-no-model --verbose --expert-cache 1 --expert-prefetch on", // from its cut shard
        // budgets below the placed experts: the planner keeps what fits (the leader 1, the other member,
        // without attention, 2 of its 4 per block) and the workers' caches agree with it
        "--local 2 --ep 2 --local-mem 0 --mem-budget 3M --verbose --expert-cache auto",
        "--local 2 --ep 2 --local-mem 0 --mem-budget 3M --verbose", // the same without the option
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (run_cli(cases[i], out, err, CAP) != 0) {
            CU_FAIL("meshlm run failed");
            continue;
        }
        if (strcmp(out, ref) != 0) {
            fprintf(stderr, "\n  %s: text differs:\n  %s\n  vs\n  %s\n", cases[i], out, ref);
            CU_FAIL("tokens differ");
        }
        if (!strstr(cases[i], "--local") && strstr(cases[i], "--expert-cache")) {
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "meshlm: weights: experts: "));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "meshlm: experts: hit rate "));
        }
        if (strstr(cases[i], "3M")) {
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "| cache 1 of 4 "));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "| cache 2 of 4 "));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "experts: 2 of 4 placed here per block"));
        }
        if (strstr(cases[i], "--ep")) // the workers' providers hold their placed experts alone
            CU_ASSERT_PTR_NOT_NULL(strstr(err, strstr(cases[i], "--ep 3") ? "experts: 1 of 3 placed here per block"
                                                                          : "experts: 1 of 4 placed here per block"));
        if (strstr(cases[i], "2400K") || strstr(cases[i], "2M")) {
            CU_ASSERT_PTR_NOT_NULL(strstr(err, strstr(cases[i], "2M") ? "experts: 1 slot x " : "experts: 2 slots x "));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "shared by the 4 blocks"));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "meshlm: experts: hit rate "));
        }
        if (strstr(cases[i], "5M")) { // fewer than all 8 fit
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "meshlm: weights: experts: "));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, "meshlm: experts: hit rate "));
            CU_ASSERT_PTR_NOT_NULL(strstr(err, " of 8 per block resident"));
            CU_ASSERT_PTR_NULL(strstr(err, "experts: 8 of 8"));
        }
    }
    // adaptive gating changes the text (documented), and a bad option is refused naming it
    CU_ASSERT_EQUAL(run_cli("--expert-cache 1 --expert-skip 0.49", out, err, CAP), 0);
    CU_ASSERT(strcmp(out, ref) != 0);
    CU_ASSERT_NOT_EQUAL(run_cli("--expert-policy mru", out, err, CAP), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "--expert-policy"));
    free(ref);
    free(out);
    free(err);
}

int test_experts_suite(void) {
    CU_pSuite s = CU_add_suite("experts", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "options parse and name the provider", test_options) ||
        !CU_add_test(s, "every cache size, policy and prefetch setting: the mapped logits bit for bit",
                     test_logits_identical) ||
        !CU_add_test(s, "prefetch reads ahead and changes no token", test_prefetch_counts) ||
        !CU_add_test(s, "a budget below the experts sizes the cache; logits unchanged", test_budget) ||
        !CU_add_test(s, "counters on known traces: all resident, one repeated, LRU vs LFU, no cache",
                     test_trace_counters) ||
        !CU_add_test(s, "the cache model hits what the provider hits; the optimal bound", test_sim) ||
        !CU_add_test(s, "inspect --routing: cache hit rates per size, the optimal bound", test_routing_table) ||
        !CU_add_test(s, "adaptive gating changes outputs only when on", test_skip) ||
        !CU_add_test(s, "run --expert-cache: one node, under a budget, local workers: the same text", test_cli_tokens))
        return -1;
    return 0;
}
