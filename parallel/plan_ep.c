// Expert parallelism in the planner: whole experts placed on the members of each stage, memory and cost.
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/fs.h"
#include "parallel/plan_impl.h"

// --- helpers

#define EP_MAX_EXPERTS 256

static double max2(double a, double b) { return a > b ? a : b; }

// Bytes of one expert of block il (its gate, up and down matrices).
static uint64_t expert_bytes(const plan_model_t *pm, int il) {
    const uint64_t *r = pm->row_bytes[il];
    return (r[PLAN_W_GATE] + r[PLAN_W_UP]) * (uint64_t)pm->n_ff + r[PLAN_W_DOWN] * (uint64_t)pm->n_embd;
}

int plan_shard_n_experts(const plan_shard_t *sh) {
    int n = 0;
    for (int w = 0; w < 4; w++) n += __builtin_popcountll(sh->experts[w]);
    return n;
}

static int n_owned(const plan_t *p, int i, int ne) {
    int k = 0;
    for (int e = 0; e < ne; e++) k += plan_has_expert(p, i, e);
    return k;
}

// Bytes of the hot second copies shard i holds (an expert of one block each).
static uint64_t hot_bytes(const plan_model_t *pm, const plan_t *p, int i) {
    uint64_t b = 0;
    for (int il = p->shard[i].s.l0; il < p->shard[i].s.l1 && il < PLAN_MAX_LAYERS; il++)
        for (int h = 0; h < p->ep_hot_n[il]; h++)
            if (p->ep_hot_of[il][h].shard == i) b += expert_bytes(pm, il);
    return b;
}

// Shard i's bytes when `owned` of its stage's experts are resident (and its hot copies): every row of
// its blocks less the experts it does not hold (with attention on the leader, a member other than the
// first holds its experts and activations only); resident (nothing streams).
static void size_resident(const plan_model_t *pm, plan_t *p, int i, int owned) {
    plan_shard_t *sh = &p->shard[i];
    uint64_t w = 0, kv = 0;
    memset(&sh->st, 0, sizeof sh->st);
    uint64_t kv_fixed = 0;
    plan_size_share(pm, &sh->s, PLAN_TP_EXACT, p->n_ctx, &p->node[sh->node], 0, &sh->st, &w, &kv, &kv_fixed);
    uint64_t drop = 0;
    uint64_t mine = 0;
    for (int il = sh->s.l0; il < sh->s.l1; il++) {
        drop += expert_bytes(pm, il) * (uint64_t)(pm->n_expert - owned);
        mine += expert_bytes(pm, il) * (uint64_t)owned;
    }
    const uint64_t hot = hot_bytes(pm, p, i);
    mine += hot;
    drop -= hot < drop ? hot : drop;
    if (p->ep_lead && i != p->stage_first[sh->stage]) { // experts only: no dense rows, no KV
        sh->weight_bytes = mine;
        sh->kv_bytes = 0;
        sh->st.pinned_bytes = mine;
        sh->st.resident_bytes = sh->st.peak_bytes = mine + (sh->st.fixed_bytes - kv_fixed);
        sh->peak_bytes = sh->st.peak_bytes;
        return;
    }
    sh->weight_bytes = w - drop;
    sh->kv_bytes = kv;
    sh->st.pinned_bytes -= drop;
    sh->st.resident_bytes -= drop;
    sh->st.peak_bytes -= drop;
    sh->peak_bytes = sh->st.peak_bytes;
    plan_kv_place(&p->node[sh->node], sh, kv_fixed); // a device's capacity is not checked here
}

// Shard i's bytes when it holds `owned` of its stage's experts: all resident, or with p->ep_cache the
// experts per block its cache keeps (N, or as many as its budget holds after the rest: at least one,
// at most owned), recorded in ep_cached when fewer than owned.
static void size_member(const plan_model_t *pm, plan_t *p, int i, int owned) {
    plan_shard_t *sh = &p->shard[i];
    sh->ep_cached = 0;
    int res = owned;
    if (p->ep_cache > 0) {
        res = p->ep_cache < owned ? p->ep_cache : owned;
    } else if (p->ep_cache < 0 && owned > 1 && p->node[sh->node].mem_budget) {
        const uint64_t bud = p->node[sh->node].mem_budget;
        size_resident(pm, p, i, 0);
        const uint64_t base = sh->peak_bytes;
        uint64_t one = 0; // one expert of every block, in a cache slot (room for aligned direct reads)
        for (int il = sh->s.l0; il < sh->s.l1; il++) one += expert_bytes(pm, il) + PLAN_EXPERT_SLOT_SLACK;
        const uint64_t fit = bud > base && one ? (bud - base) / one : 0;
        res = fit < 1 ? 1 : fit < (uint64_t)owned ? (int)fit : owned;
    }
    size_resident(pm, p, i, res);
    if (res < owned) sh->ep_cached = res, sh->ep_cache_of = owned;
}

static void set_expert(plan_shard_t *sh, int e) { sh->experts[e >> 6] |= (uint64_t)1 << (e & 63); }

// Gives the experts of stage [a, b) to its members in id order, counts in proportion to their
// decode rates (at least one each), then moves experts off members over their budgets onto members
// with room. 0 or MLM_EFULL (err names the member that cannot hold even one expert more than fits).
static int place_stage(const plan_model_t *pm, plan_t *p, int a, int b, char *err, size_t errlen) {
    const int g = b - a, ne = pm->n_expert;
    int cnt[PLAN_MAX_NODES] = {0};
    double w[PLAN_MAX_NODES], tot = 0;
    for (int i = 0; i < g; i++) tot += w[i] = plan_node_rate(pm, &p->node[p->shard[a + i].node]);
    int given = 0;
    for (int i = 0; i < g; i++) {
        cnt[i] = 1 + (int)floor((double)(ne - g) * w[i] / tot);
        given += cnt[i];
    }
    for (int i = 0; given < ne; i = (i + 1) % g, given++) cnt[i]++; // remainders, first members first
    // budgets: a member over its budget hands its last expert to the member with the most room
    for (int round = 0; round < ne * g; round++) {
        int over = -1;
        for (int i = 0; i < g && over < 0; i++) {
            size_member(pm, p, a + i, cnt[i]);
            const uint64_t bud = p->node[p->shard[a + i].node].mem_budget;
            if (bud && p->shard[a + i].peak_bytes > bud) over = i;
        }
        if (over < 0) break;
        int to = -1;
        uint64_t room = 0;
        for (int i = 0; i < g; i++) {
            if (i == over) continue;
            size_member(pm, p, a + i, cnt[i] + 1);
            const uint64_t bud = p->node[p->shard[a + i].node].mem_budget;
            const uint64_t pk = p->shard[a + i].peak_bytes;
            const uint64_t r = !bud ? UINT64_MAX : pk <= bud ? bud - pk + 1 : 0;
            if (r > room) room = r, to = i;
        }
        if (to < 0 || cnt[over] <= 1) {
            size_member(pm, p, a + over, cnt[over]);
            char need[32], have[32];
            plan_fmt_bytes(need, sizeof need, p->shard[a + over].peak_bytes);
            plan_fmt_bytes(have, sizeof have, p->node[p->shard[a + over].node].mem_budget);
            const int kept = p->shard[a + over].ep_cached; // with a cache: what it keeps of them
            return mlm_fail(err, errlen, MLM_EFULL,
                            "placed experts do not fit: node %s needs %s for its replicated blocks and %d expert(s)%s "
                            "and has %s, and no other member has room for them",
                            p->node[p->shard[a + over].node].name, need, cnt[over],
                            kept > 0 ? (kept == 1 ? " with one per block cached" : " with a cache") : "", have);
        }
        cnt[over]--;
        cnt[to]++;
    }
    for (int i = 0, e = 0; i < g; i++) {
        memset(p->shard[a + i].experts, 0, sizeof p->shard[a + i].experts);
        for (int j = 0; j < cnt[i]; j++) set_expert(&p->shard[a + i], e++);
        size_member(pm, p, a + i, cnt[i]);
    }
    return 0;
}

// Decode ms of a message of `bytes` between nodes x and y (the larger latency, the smaller bandwidth).
static double link_ms(const plan_node_t *x, const plan_node_t *y, double bytes) {
    const double lat = max2(plan_node_lat_us(x), plan_node_lat_us(y)) * 1e-3;
    const double bw = fmin(plan_node_link_bw(x), plan_node_link_bw(y));
    return lat + bytes / bw * 1e3;
}

// The model's popularity of each expert summed over blocks [l0, l1) into pop (n_expert). False (pop
// uniform) without pm->popularity or when the blocks' picks sum to nothing.
static bool stage_popularity(const plan_model_t *pm, int l0, int l1, double *pop) {
    const int ne = pm->n_expert;
    double tot = 0;
    for (int e = 0; e < ne; e++) {
        pop[e] = 0;
        for (int il = l0; pm->popularity && il < l1; il++) pop[e] += pm->popularity[(size_t)il * ne + e];
        tot += pop[e];
    }
    if (tot > 0) return true;
    for (int e = 0; e < ne; e++) pop[e] = 1.0 / ne;
    return false;
}

// Block il's popularity of each expert into pop (n_expert): the model's, or uniform without it.
static void block_popularity(const plan_model_t *pm, int il, double *pop) {
    stage_popularity(pm, il, il + 1, pop);
}

// The hot most popular experts of each block of stage [a, b) get a second holder in that block
// (plan_ep_hot).
static int add_hot(const plan_model_t *pm, plan_t *p, int a, int b, int hot, char *err, size_t errlen) {
    const int g = b - a, ne = pm->n_expert;
    for (int il = p->shard[a].s.l0; il < p->shard[a].s.l1; il++) {
        double pop[EP_MAX_EXPERTS];
        block_popularity(pm, il, pop);
        int order[EP_MAX_EXPERTS];
        for (int e = 0; e < ne; e++) order[e] = e;
        for (int i = 1; i < ne; i++) // insertion sort: most popular first, ties by id
            for (int j = i; j > 0 && pop[order[j]] > pop[order[j - 1]]; j--) {
                const int t = order[j];
                order[j] = order[j - 1];
                order[j - 1] = t;
            }
        p->ep_hot_n[il] = 0;
        for (int h = 0; h < hot && h < ne; h++) {
            const int e = order[h];
            double load[PLAN_MAX_NODES] = {0}; // the block's expected expert work of each member
            for (int q = 0; q < ne; q++) {
                int holders = 0;
                for (int i = 0; i < g; i++) holders += plan_holds_expert(p, a + i, il, q);
                for (int i = 0; holders && i < g; i++)
                    if (plan_holds_expert(p, a + i, il, q)) load[i] += pop[q] / holders;
            }
            int best = -1, full = -1;
            const int slot = p->ep_hot_n[il];
            for (int i = 0; i < g; i++) {
                if (plan_holds_expert(p, a + i, il, e)) continue;
                p->ep_hot_of[il][slot].expert = (uint8_t)e; // tried: sized with the copy
                p->ep_hot_of[il][slot].shard = (uint8_t)(a + i);
                p->ep_hot_n[il] = (uint8_t)(slot + 1);
                const int own = n_owned(p, a + i, ne);
                size_member(pm, p, a + i, own);
                const uint64_t bud = p->node[p->shard[a + i].node].mem_budget;
                const bool fits = !bud || p->shard[a + i].peak_bytes <= bud;
                p->ep_hot_n[il] = (uint8_t)slot;
                size_member(pm, p, a + i, own);
                if (!fits) {
                    if (full < 0) full = i;
                    continue;
                }
                if (best < 0 || load[i] < load[best] - 1e-12 ||
                    (load[i] <= load[best] + 1e-12 && own < n_owned(p, a + best, ne)))
                    best = i;
            }
            if (best < 0) {
                const plan_shard_t *sh = &p->shard[a + (full >= 0 ? full : 0)];
                char have[32];
                plan_fmt_bytes(have, sizeof have, p->node[sh->node].mem_budget);
                return mlm_fail(err, errlen, MLM_EFULL,
                                "a second copy of hot expert %d of layer %d fits on no member of the stage (node %s "
                                "has %s)",
                                e, il, p->node[sh->node].name, have);
            }
            p->ep_hot_of[il][slot].expert = (uint8_t)e;
            p->ep_hot_of[il][slot].shard = (uint8_t)(a + best);
            p->ep_hot_n[il] = (uint8_t)(slot + 1);
            size_member(pm, p, a + best, n_owned(p, a + best, ne));
        }
    }
    return 0;
}

// --- public API

int plan_ep_hot(const plan_model_t *pm, plan_t *p, int hot, char *err, size_t errlen) {
    if (!pm || !p || !p->ep || !p->ep_lead || p->ep_replicas > 1)
        return mlm_fail(err, errlen, MLM_EINVAL,
                        "hot experts need placed experts with attention on the leader and one holder each (not "
                        "--ep-attn all, not --ep-replicas)");
    if (hot < 1 || hot > pm->n_expert || hot > PLAN_EP_HOT_MAX || pm->n_layer > PLAN_MAX_LAYERS)
        return mlm_fail(err, errlen, MLM_EINVAL, "--ep-hot %d: 1 to the model's %d experts, at most %d", hot,
                        pm->n_expert, PLAN_EP_HOT_MAX);
    for (int st = 0; st < p->n_stages; st++) {
        const int a = p->stage_first[st], b = p->stage_first[st + 1];
        if (b - a < 2) continue; // one member holds every expert already
        int rc = add_hot(pm, p, a, b, hot, err, errlen);
        if (rc != 0) return rc;
    }
    p->ep_hot = hot;
    plan_predict_ep(pm, p);
    snprintf(p->why, sizeof p->why,
             "experts placed whole on %d node(s) per stage (attention on the first, the %d most popular of each block "
             "on 2)",
             p->n / p->n_stages, hot);
    return 0;
}

int plan_popularity_parse(const char *text, const plan_model_t *pm, double *pop, char *err, size_t errlen) {
    const int L = pm->n_layer, E = pm->n_expert;
    if (E <= 0) return mlm_fail(err, errlen, MLM_EINVAL, "routing counts need a MoE model; %s is dense", pm->name);
    int line = 0, next = -1; // next: the block expected (-1: the header)
    for (const char *p = text; *p;) {
        const char *end = strchr(p, '\n');
        const size_t n = end ? (size_t)(end - p) : strlen(p);
        char buf[8192];
        line++;
        if (n >= sizeof buf) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: longer than %zu bytes", line, sizeof buf - 1);
        memcpy(buf, p, n);
        buf[n] = 0;
        p += n + (end ? 1 : 0);
        char *q = buf;
        while (*q == ' ' || *q == '\t' || *q == '\r') q++;
        if (!*q || *q == '#') continue;
        if (next < 0) {
            int l, e, k, t, used = 0;
            if (sscanf(q, "layers %d experts %d top_k %d tokens %d %n", &l, &e, &k, &t, &used) != 4 || q[used])
                return mlm_fail(err, errlen, MLM_EFORMAT,
                                "line %d: expected \"layers L experts E top_k K tokens T\" before the counts", line);
            if (l != L || e != E)
                return mlm_fail(err, errlen, MLM_EFORMAT,
                                "line %d: counts for %d layers of %d experts, but %s has %d layers of %d", line, l, e,
                                pm->name, L, E);
            next = 0;
            continue;
        }
        if (next >= L) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: more than the %d blocks' lines", line, L);
        char *r;
        errno = 0;
        const long blk = strtol(q, &r, 10);
        if (r == q || *r != ':' || blk != next)
            return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: expected \"%d: \" and block %d's %d counts", line, next,
                            next, E);
        q = r + 1;
        double tot = 0;
        for (int e = 0; e < E; e++) {
            errno = 0;
            const double c = strtod(q, &r);
            if (r == q || errno || !(c >= 0) || c > 1e15 || c != floor(c))
                return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: count %d of block %d is not a whole number >= 0",
                                line, e, next);
            pop[(size_t)next * E + e] = c;
            tot += c;
            q = r;
        }
        while (*q == ' ' || *q == '\t' || *q == '\r') q++;
        if (*q) return mlm_fail(err, errlen, MLM_EFORMAT, "line %d: more than %d counts for block %d", line, E, next);
        for (int e = 0; e < E; e++) pop[(size_t)next * E + e] = tot > 0 ? pop[(size_t)next * E + e] / tot : 1.0 / E;
        next++;
    }
    if (next < 0) return mlm_fail(err, errlen, MLM_EFORMAT, "no \"layers L experts E top_k K tokens T\" line");
    if (next < L) return mlm_fail(err, errlen, MLM_EFORMAT, "counts for %d of the %d blocks", next, L);
    return 0;
}

int plan_popularity_load(const char *path, const plan_model_t *pm, double *pop, char *err, size_t errlen) {
    char *text = NULL;
    int rc = mlm_read_file(path, 16u << 20, &text, NULL, err, errlen);
    if (rc != 0) return rc;
    char inner[512];
    rc = plan_popularity_parse(text, pm, pop, inner, sizeof inner);
    if (rc != 0) mlm_fail(err, errlen, rc, "%s: %s", path, inner);
    free(text);
    return rc;
}

char *plan_experts_str(const plan_t *p, int i, int n_expert, char *buf, size_t cap) {
    size_t at = 0;
    buf[0] = 0;
    for (int e = 0; e < n_expert && e < EP_MAX_EXPERTS; e++) {
        if (!plan_has_expert(p, i, e) || (e > 0 && plan_has_expert(p, i, e - 1))) continue;
        int z = e;
        while (z + 1 < n_expert && plan_has_expert(p, i, z + 1)) z++;
        int k = z > e ? snprintf(buf + at, cap - at, "%s%d-%d", at ? "," : "", e, z)
                      : snprintf(buf + at, cap - at, "%s%d", at ? "," : "", e);
        if (k < 0 || (size_t)k >= cap - at) break;
        at += (size_t)k;
    }
    return buf;
}

void plan_print_experts(const plan_t *p, int n_expert, FILE *f) {
    if (!p->ep) return;
    fprintf(f, "experts placed whole (expert parallelism, attention %s",
            p->ep_lead ? "on each stage's first node" : "replicated");
    if (p->ep_replicas > 1) fprintf(f, ", each expert on %d nodes", p->ep_replicas);
    if (p->ep_hot > 0) fprintf(f, ", the %d most popular of each block on 2 nodes", p->ep_hot);
    if (p->ep_cache > 0) fprintf(f, ", each node caching up to %d per block", p->ep_cache);
    if (p->ep_cache < 0) fprintf(f, ", each node caching what its budget holds");
    fprintf(f, ")");
    if (p->sliced_ms > 0 && p->placed_ms > 0)
        fprintf(f, ": predicted %.2f ms/token placed vs %.2f sliced", p->placed_ms, p->sliced_ms);
    fprintf(f, "\n");
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        if (b <= a) continue;
        fprintf(f, "  layers %d-%d:", p->shard[a].s.l0, p->shard[a].s.l1 - 1);
        for (int i = a; i < b; i++) {
            char ex[256];
            fprintf(f, "%s %s experts %s", i > a ? ";" : "", p->node[p->shard[i].node].name,
                    plan_experts_str(p, i, n_expert, ex, sizeof ex));
            if (p->shard[i].ep_cached > 0) fprintf(f, " (%d per block resident)", p->shard[i].ep_cached);
        }
        fprintf(f, "\n");
        for (int il = p->shard[a].s.l0; il < p->shard[a].s.l1 && il < PLAN_MAX_LAYERS; il++) {
            if (!p->ep_hot_n[il]) continue;
            fprintf(f, "    layer %d, second copies:", il);
            for (int h = 0; h < p->ep_hot_n[il]; h++)
                fprintf(f, "%s expert %d on %s", h ? "," : "", p->ep_hot_of[il][h].expert,
                        p->node[p->shard[p->ep_hot_of[il][h].shard].node].name);
            fprintf(f, "\n");
        }
    }
}

// The expected time of stage [a, b) per token: the slowest member's rep[i] ms (its dense rows, every
// member at once: they wait for each other at the block's exchange), then the slowest member's x[i]
// ms per routed expert it computes, the token's k experts drawn uniformly without repeats (routing
// assumed uniform), each to its first holder or, with replicas, to the holder with the least work so
// far (as the leader assigns them); members sharing a machine's cores slow each other (plan_cpu_share)
// in each phase by who computes in it: in the dense phase those with rep[i] > 0, in the expert phase
// those given an expert. Averaged over EP_DRAWS draws of a fixed sequence (the same figure every time).
#define EP_DRAWS 512
// il >= 0: block il alone, its hot second copies counted (il < 0: what every block of the stage holds).
static double expected_max(const plan_t *p, int a, int b, int ne, int k, const double *rep, const double *x,
                           const double *pop, int il) {
    int owner[EP_MAX_EXPERTS];
    uint64_t hold[EP_MAX_EXPERTS];
    for (int e = 0; e < ne; e++) {
        owner[e] = -1;
        hold[e] = 0;
        for (int i = a; i < b; i++)
            if (il >= 0 ? plan_holds_expert(p, i, il, e) : plan_has_expert(p, i, e)) {
                if (owner[e] < 0) owner[e] = i - a;
                hold[e] |= 1ull << (i - a);
            }
        if (owner[e] < 0) owner[e] = 0;
    }
    bool computes[PLAN_MAX_NODES];
    for (int i = a; i < b; i++) computes[i - a] = rep[i - a] > 0;
    double dense = 0;
    for (int i = a; i < b; i++)
        if (computes[i - a]) dense = max2(dense, rep[i - a] * plan_cpu_share(p, a, b, computes, &p->node[p->shard[i].node]));
    uint64_t z = 0x9e3779b97f4a7c15ull;
    double sum = 0;
    for (int d = 0; d < EP_DRAWS; d++) {
        int pick[EP_MAX_EXPERTS];
        double load[PLAN_MAX_NODES] = {0};
        for (int e = 0; e < ne; e++) pick[e] = e;
        for (int j = 0; j < k && j < ne; j++) { // partial Fisher-Yates: k distinct experts
            z = z * 6364136223846793005ull + 1442695040888963407ull;
            int r = j + (int)((z >> 33) % (uint64_t)(ne - j));
            if (pop) { // by popularity: the expert where a uniform draw falls in the remaining ones' sums
                double left = 0;
                for (int q = j; q < ne; q++) left += pop[pick[q]];
                double u = (double)(z >> 11) * 0x1.0p-53 * left;
                for (r = j; r + 1 < ne && u >= pop[pick[r]]; r++) u -= pop[pick[r]];
            }
            const int t = pick[j];
            pick[j] = pick[r];
            pick[r] = t;
        }
        // as the leader assigns them: experts with fewer holders first, then in pick (rank) order
        int ord[EP_MAX_EXPERTS], n_ord = k < ne ? k : ne;
        for (int j = 0; j < n_ord; j++) {
            int at = j;
            for (; at > 0 && __builtin_popcountll(hold[pick[ord[at - 1]]]) > __builtin_popcountll(hold[pick[j]]); at--)
                ord[at] = ord[at - 1];
            ord[at] = j;
        }
        for (int j = 0; j < n_ord; j++) {
            const int e = pick[ord[j]];
            int to = owner[e];
            for (int i = 0; i < b - a; i++)
                if ((hold[e] >> i & 1) && load[i] < load[to]) to = i;
            load[to] += x[to];
        }
        bool busy[PLAN_MAX_NODES];
        double worst = 0;
        for (int i = a; i < b; i++) busy[i - a] = load[i - a] > 0;
        for (int i = a; i < b; i++)
            if (busy[i - a]) worst = max2(worst, load[i - a] * plan_cpu_share(p, a, b, busy, &p->node[p->shard[i].node]));
        sum += dense + worst;
    }
    return sum / EP_DRAWS;
}

void plan_predict_ep(const plan_model_t *pm, plan_t *p) {
    const double E4 = (double)pm->n_embd * 4.0, bpw = pm->bytes_per_weight > 0 ? pm->bytes_per_weight : 0.5625;
    const int ne = pm->n_expert, k = pm->n_expert_used;
    plan_cost_t c = {0};
    const plan_node_t *coord = &p->node[0];
    for (int st = 0; st < p->n_stages; st++) {
        const int a = p->stage_first[st], b = p->stage_first[st + 1], g = b - a;
        const shard_slice_t *s = &p->shard[a].s;
        double xb = 0; // bytes of one expert of each block, summed over the stage's blocks
        for (int il = s->l0; il < s->l1; il++) xb += (double)expert_bytes(pm, il);
        const plan_node_t *home = &p->node[p->shard[a].node];
        const int own0 = n_owned(p, a, ne);
        double a2a = 0, gat = 0;
        if (p->ep_lead) { // per block: each member's routed rows from the leader, their outputs back
            for (int i = a + 1; i < b; i++) {
                const plan_node_t *nd = &p->node[p->shard[i].node];
                const double rows = (double)k * (double)n_owned(p, i, ne) / (double)ne;
                a2a = max2(a2a, link_ms(home, nd, rows * E4 + (double)k * 4.0));
                gat = max2(gat, link_ms(nd, home, rows * E4));
            }
        } else { // per block: the routed rows from the other members to the home, then the home's sums to all
            const double rows_in = (double)k * (double)(ne - own0) / (double)ne;
            for (int i = a + 1; i < b; i++) {
                const plan_node_t *nd = &p->node[p->shard[i].node];
                a2a = max2(a2a, link_ms(nd, home, rows_in * E4 / (g - 1)));
            }
            if (g > 1) gat = link_ms(home, home, (double)(g - 1) * E4);
        }
        const double xch = (double)(s->l1 - s->l0) * (a2a + gat);
        double rep_ms[PLAN_MAX_NODES], x_ms[PLAN_MAX_NODES], wc = 0, wm = 0, wd = 0;
        for (int i = a; i < b; i++) {
            plan_shard_t *sh = &p->shard[i];
            const plan_node_t *nd = &p->node[sh->node];
            const int own = n_owned(p, i, ne);
            const double flop_ms = 2.0 / bpw / (plan_node_gflops(nd) * 1e9) * 1e3; // per byte of weights
            const double mem_ms = 1.0 / (nd->mem_bw > 0 ? nd->mem_bw * PLAN_MEM_EFFICIENCY : PLAN_DEFAULT_MEM_BW) * 1e3;
            // replicated bytes, plus on average the routed share of its experts; of the last stage only
            // the first member computes the output rows (it alone sends the logits)
            const bool no_out = st + 1 == p->n_stages && i > a && !p->ep_lead;
            // the embedding's rows are held, not read: one row per token
            const bool embd = s->l0 == 0 && !(s->l1 == pm->n_layer && pm->tied_output) && !(p->ep_lead && i > a);
            const int kept = sh->ep_cached > 0 ? sh->ep_cached : own; // resident experts per block
            const double rep = (double)sh->weight_bytes - xb * kept - (double)hot_bytes(pm, p, i) -
                               (no_out ? (double)pm->out_row_bytes * (double)(s->v1 - s->v0) : 0) -
                               (embd ? (double)pm->embd_row_bytes * (double)(s->v1 - s->v0) : 0);
            const double bytes = rep + xb * (double)k * (double)own / (double)ne;
            // a cache of kept of own experts per block: a routed expert misses with 1 - kept/own (uniform
            // routing) and is then read whole from disk before it computes
            // members caching on one disk (disk_id) read their misses at once: at most top-k of them in a
            // token, together up to PLAN_DISK_PARALLEL times one reader's bandwidth
            const double miss = own > 0 && kept < own ? 1.0 - (double)kept / own : 0;
            int readers = 1;
            for (int j = a; nd->disk_id > 0 && j < b; j++)
                readers += j != i && p->shard[j].ep_cached > 0 && p->node[p->shard[j].node].disk_id == nd->disk_id;
            const double at_once = readers < k ? readers : k > 0 ? k : 1;
            const double share = at_once / (at_once < PLAN_DISK_PARALLEL ? at_once : PLAN_DISK_PARALLEL);
            const double read_ms = miss * xb * share / (plan_node_disk_bw(nd) * PLAN_DISK_EFFICIENCY) * 1e3;
            rep_ms[i - a] = rep * max2(flop_ms, mem_ms);
            x_ms[i - a] = xb * max2(flop_ms, mem_ms) + read_ms;
            if (p->ep_lead && i > a) rep_ms[i - a] = 0; // experts only: it waits for the leader's attention
            sh->compute_ms = bytes * flop_ms;
            sh->memory_ms = bytes * mem_ms;
            sh->disk_ms = read_ms * (double)k * (double)own / (double)ne;
            sh->st.stream_bytes = (uint64_t)(miss * xb * (double)k * (double)own / (double)ne);
            sh->comm_ms = xch;
            sh->busy_ms = max2(sh->compute_ms, sh->memory_ms) + sh->disk_ms + xch;
            wc = max2(wc, sh->compute_ms);
            wm = max2(wm, sh->memory_ms);
            wd = max2(wd, sh->disk_ms);
        }
        // the stage waits for its slowest member on each token's experts
        double pop[EP_MAX_EXPERTS];
        const bool by_pop = stage_popularity(pm, s->l0, s->l1, pop);
        double worst = 0;
        if (p->ep_hot > 0 || pm->popularity) { // block by block: each with its own popularity and second copies
            const int nl = s->l1 - s->l0;
            for (int il = s->l0; il < s->l1 && nl > 0 && xb > 0; il++) {
                double rep_l[PLAN_MAX_NODES], x_l[PLAN_MAX_NODES];
                const double f = (double)expert_bytes(pm, il) / xb;
                for (int i = 0; i < g; i++) {
                    rep_l[i] = rep_ms[i] / nl;
                    x_l[i] = x_ms[i] * f;
                }
                block_popularity(pm, il, pop);
                worst += expected_max(p, a, b, ne, k, rep_l, x_l, pm->popularity ? pop : NULL, il);
            }
        } else {
            worst = expected_max(p, a, b, ne, k, rep_ms, x_ms, by_pop ? pop : NULL, -1);
        }
        double comm = xch;
        if (st + 1 < p->n_stages) { // the leader hands n_embd F32 to every member of the next stage
            const int na = p->stage_first[st + 1], nb = p->stage_first[st + 2];
            comm += link_ms(home, &p->node[p->shard[na].node], (double)(p->ep_lead ? 1 : nb - na) * E4);
        } else if (p->coord_apart || p->shard[a].node != 0) { // logits to the coordinator
            comm += link_ms(home, coord, (double)pm->n_vocab * 4.0);
        }
        if (st == 0 && (p->coord_apart || p->shard[0].node != 0)) comm += plan_node_lat_us(coord) * 1e-3;
        c.compute_ms += wc;
        c.memory_ms += wm;
        c.disk_ms += wd;
        c.comm_ms += comm;
        c.token_ms += worst + comm;
    }
    c.prefill_tok_s = c.token_ms > 0 ? 1e3 / c.token_ms * PLAN_PREFILL_SPEEDUP : 0;
    c.exact_ms = p->cost.exact_ms;
    c.allreduce_ms = p->cost.allreduce_ms;
    p->cost = c;
}

// Replicas: member i of stage [a, b) also holds the experts of the next r - 1 members (in member
// order, wrapping), so each expert has r holders. 0, or MLM_EFULL naming a member whose budget cannot
// hold them.
static int add_replicas(const plan_model_t *pm, plan_t *p, int a, int b, int r, char *err, size_t errlen) {
    const int g = b - a, ne = pm->n_expert;
    uint64_t prim[PLAN_MAX_NODES][4];
    for (int i = 0; i < g; i++) memcpy(prim[i], p->shard[a + i].experts, sizeof prim[i]);
    for (int i = 0; i < g; i++) {
        plan_shard_t *sh = &p->shard[a + i];
        for (int j = 1; j < r; j++)
            for (int w = 0; w < 4; w++) sh->experts[w] |= prim[(i + j) % g][w];
        size_member(pm, p, a + i, n_owned(p, a + i, ne));
        const uint64_t bud = p->node[sh->node].mem_budget;
        if (bud && sh->peak_bytes > bud) {
            char need[32], have[32];
            plan_fmt_bytes(need, sizeof need, sh->peak_bytes);
            plan_fmt_bytes(have, sizeof have, bud);
            return mlm_fail(err, errlen, MLM_EFULL, "%d replicas of each expert do not fit: node %s needs %s and has %s",
                            r, p->node[sh->node].name, need, have);
        }
    }
    return 0;
}

int plan_ep(const plan_model_t *pm, const plan_node_t *nodes, int n, int pp, int n_ctx, bool lead, int replicas,
            plan_t *out, char *err, size_t errlen) {
    return plan_ep_cached(pm, nodes, n, pp, n_ctx, lead, replicas, 0, out, err, errlen);
}

int plan_ep_cached(const plan_model_t *pm, const plan_node_t *nodes, int n, int pp, int n_ctx, bool lead, int replicas,
                   int cache, plan_t *out, char *err, size_t errlen) {
    if (!pm || !nodes || !out || n < 1 || n > PLAN_MAX_NODES)
        return mlm_fail(err, errlen, MLM_EINVAL, "placed experts: %d nodes (1..%d)", n, PLAN_MAX_NODES);
    if (pm->n_expert <= 0) return mlm_fail(err, errlen, MLM_EINVAL, "placed experts need a MoE model; %s is dense", pm->name);
    if (pm->n_expert > EP_MAX_EXPERTS)
        return mlm_fail(err, errlen, MLM_EINVAL, "placed experts: %d experts (at most %d)", pm->n_expert, EP_MAX_EXPERTS);
    if (pp < 1 || pp > n || pp > pm->n_layer)
        return mlm_fail(err, errlen, MLM_EINVAL, "placed experts: %d stages over %d nodes and %d blocks", pp, n,
                        pm->n_layer);
    if (n / pp > pm->n_expert)
        return mlm_fail(err, errlen, MLM_EINVAL, "placed experts: %d members per stage for %d experts", n / pp,
                        pm->n_expert);
    if (replicas < 1 || (replicas > 1 && !lead) || replicas > n / pp)
        return mlm_fail(err, errlen, MLM_EINVAL,
                        "placed experts: %d replicas of each expert (1 to the %d members of a stage; more than 1 needs "
                        "attention on the leader)",
                        replicas, n / pp);
    memset(out, 0, sizeof *out);
    out->ep = true;
    out->ep_lead = lead;
    out->ep_replicas = replicas;
    out->ep_cache = cache < 0 ? -1 : cache;
    out->n = n;
    out->n_nodes = n;
    out->n_stages = pp;
    out->n_ctx = n_ctx > 0 ? n_ctx : 4096;
    out->tp_mode = PLAN_TP_EXACT;
    out->grain_heads = 1;
    out->grain_ffn = PLAN_FFN_GRAIN;
    memcpy(out->node, nodes, (size_t)n * sizeof *nodes);
    for (int st = 0, at = 0, l = 0; st < pp; st++) {
        const int g = n / pp + (st < n % pp), nl = pm->n_layer / pp + (st < pm->n_layer % pp);
        out->stage_first[st] = at;
        for (int i = at; i < at + g; i++) {
            plan_shard_t *sh = &out->shard[i];
            sh->node = i;
            sh->stage = st;
            sh->weight = 1.0 / g;
            sh->s = shard_full(pm->n_layer, pm->n_head, pm->n_head_kv, pm->n_embd, pm->n_ff, pm->n_vocab);
            sh->s.l0 = l;
            sh->s.l1 = l + nl;
        }
        at += g;
        l += nl;
        out->stage_first[st + 1] = at;
    }
    for (int st = 0; st < pp; st++) {
        int rc = place_stage(pm, out, out->stage_first[st], out->stage_first[st + 1], err, errlen);
        if (rc == 0 && replicas > 1)
            rc = add_replicas(pm, out, out->stage_first[st], out->stage_first[st + 1], replicas, err, errlen);
        if (rc != 0) return rc;
    }
    if (pp == 1) snprintf(out->layout, sizeof out->layout, "ep%d", n);
    else if (n % pp == 0) snprintf(out->layout, sizeof out->layout, "pp%d x ep%d", pp, n / pp);
    else snprintf(out->layout, sizeof out->layout, "pp%d x ep (uneven)", pp);
    plan_predict_ep(pm, out);
    snprintf(out->why, sizeof out->why, "experts placed whole on %d node(s) per stage (attention %s, %d holder(s) per expert)",
             n / pp, lead ? "on the first" : "replicated", replicas);
    return 0;
}
