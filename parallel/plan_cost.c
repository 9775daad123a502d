// Planner cost model: predicted compute, memory, disk and exchange time per token, in either tensor-parallel mode.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_impl.h"

// --- helpers

static double max2(double a, double b) { return a > b ? a : b; }
static double min2(double a, double b) { return a < b ? a : b; }

// What the matmuls get of a measured bandwidth when they stream weights (the default is already
// such a figure).
static double stream_bw(const plan_node_t *nd) {
    return nd->mem_bw > 0 ? nd->mem_bw * PLAN_MEM_EFFICIENCY : PLAN_DEFAULT_MEM_BW;
}

// Sums over blocks [l0, l1) of the per-row bytes of each matrix and of the whole vectors.
typedef struct {
    double r[PLAN_W_MATS];  // bytes of one row of each matrix, summed over the blocks
    double vec;             // norms and routers of the blocks
} range_sums_t;

static void range_sums(const plan_model_t *pm, int l0, int l1, range_sums_t *rs) {
    memset(rs, 0, sizeof *rs);
    for (int il = l0; il < l1; il++) {
        for (int k = 0; k < PLAN_W_MATS; k++) rs->r[k] += (double)pm->row_bytes[il][k];
        rs->vec += (double)pm->vec_bytes[il];
    }
}

// Work of one shard per token (or per micro-batch of u tokens): matrix elements multiplied and
// weight bytes read.
static void shard_work(const plan_model_t *pm, const range_sums_t *rs, const plan_shard_t *s, int mode, int u,
                       double *elems, double *bytes) {
    const shard_slice_t *sl = &s->s;
    const double hd = pm->head_dim, ne = pm->n_embd, L = sl->l1 - sl->l0;
    const double h = sl->h1 - sl->h0, kv = sl->kv1 - sl->kv0, e = sl->e1 - sl->e0, f = sl->f1 - sl->f0,
                 v = sl->v1 - sl->v0;
    const bool moe = pm->n_expert > 0;
    const double k_used = moe ? (pm->n_expert_used > 0 ? pm->n_expert_used : 1) : 1;
    // Experts a micro-batch touches (each token picks k of E at random).
    double k_read = k_used;
    if (moe && u > 1) k_read = pm->n_expert * (1 - pow(1 - k_used / pm->n_expert, u));
    // attn_output and ffn_down: rows e of every column (exact), or every row of its columns (all-reduce).
    double o_el = e * pm->n_head * hd, d_el = e * pm->n_ff, o_by = rs->r[PLAN_W_O] * e, d_by = rs->r[PLAN_W_DOWN] * e;
    if (mode == PLAN_TP_ALLREDUCE) {
        o_el = ne * h * hd;
        d_el = ne * f;
        o_by = pm->n_head > 0 ? rs->r[PLAN_W_O] * ne * h / pm->n_head : 0;
        d_by = pm->n_ff > 0 ? rs->r[PLAN_W_DOWN] * ne * f / pm->n_ff : 0;
    }
    double el = L * (h * hd * ne + 2 * kv * hd * ne + o_el + 2 * f * ne * k_used + d_el * k_used +
                     (moe ? ne * pm->n_expert : 0));
    double by = rs->r[PLAN_W_Q] * h * hd + (rs->r[PLAN_W_K] + rs->r[PLAN_W_V]) * kv * hd + o_by + rs->vec +
                (rs->r[PLAN_W_GATE] + rs->r[PLAN_W_UP]) * f * k_read + d_by * k_read;
    if (sl->l1 == pm->n_layer) {
        el += v * ne;
        by += (double)pm->out_row_bytes * v + (double)pm->out_norm_bytes;
    }
    *elems = el * u;
    *bytes = by;
}


// Whether the members of p->shard[a..b) share one host's memory (plan_node_t.shm_id) and the largest
// block of an exchange fits a shared slot, so the exchange goes through shared memory.
static bool group_shm(const plan_t *p, int a, int b, double largest) {
    const int id = p->node[p->shard[a].node].shm_id;
    if (id <= 0 || largest > PLAN_SHM_SLOT_BYTES) return false;
    for (int i = a + 1; i < b; i++)
        if (p->node[p->shard[i].node].shm_id != id) return false;
    return true;
}

// ms for a shared-memory collective that copies bytes in all.
static double shm_ms(double bytes) { return PLAN_SHM_LAT_US / 1e3 + bytes / PLAN_SHM_BW * 1e3; }

// ms for an all-gather of bytes[i] from each member of p->shard[a..b).
static double allgather_ms(const plan_t *p, int a, int b, const double *bytes) {
    const int g = b - a;
    if (g < 2) return 0;
    double total = 0, lat = 0, worst = 0, largest = 0;
    for (int i = 0; i < g; i++) total += bytes[i], largest = max2(largest, bytes[i]);
    if (group_shm(p, a, b, largest)) return shm_ms(total);
    for (int i = 0; i < g; i++) {
        const plan_node_t *nd = &p->node[p->shard[a + i].node];
        lat = max2(lat, plan_node_lat_us(nd));
        worst = max2(worst, max2(bytes[i] * (g - 1), total - bytes[i]) / plan_node_link_bw(nd));
    }
    return lat / 1e3 + worst * 1e3;
}

// One stage's exchanges for u tokens: its per-block all-gathers (exact) or all-reduces (all-reduce
// mode) and, on the first stage, the embedding rows.
static double stage_comm_ms(const plan_model_t *pm, const plan_t *p, int a, int b, int u) {
    const int g = b - a;
    if (g < 2) return 0;
    const shard_slice_t *s0 = &p->shard[a].s;
    double t;
    if (p->tp_mode == PLAN_TP_ALLREDUCE) {
        t = (s0->l1 - s0->l0) * 2 * plan_allreduce_ms(p, a, b, 4.0 * u * pm->n_embd, NULL);
    } else {
        // (g) bytes each member sends in each all-gather
        double attn[PLAN_MAX_NODES], orow[PLAN_MAX_NODES], ffn[PLAN_MAX_NODES], down[PLAN_MAX_NODES];
        const double k_used = pm->n_expert > 0 ? (pm->n_expert_used > 0 ? pm->n_expert_used : 1) : 1;
        for (int i = 0; i < g; i++) {
            const shard_slice_t *sl = &p->shard[a + i].s;
            attn[i] = 4.0 * u * (sl->h1 - sl->h0) * pm->head_dim;
            orow[i] = 4.0 * u * (sl->e1 - sl->e0);
            ffn[i] = 4.0 * u * (sl->f1 - sl->f0) * k_used;
            down[i] = orow[i];
        }
        t = (s0->l1 - s0->l0) * (allgather_ms(p, a, b, attn) + allgather_ms(p, a, b, orow) +
                                 allgather_ms(p, a, b, ffn) + allgather_ms(p, a, b, down));
    }
    if (s0->l0 == 0 && group_shm(p, a, b, 4.0 * u * pm->n_embd)) {
        t += shm_ms(4.0 * u * pm->n_embd);
    } else if (s0->l0 == 0) { // the token's embedding row, from whichever member holds it (worst case)
        double lat = 0, worst = 0;
        for (int i = 0; i < g; i++) {
            const plan_node_t *nd = &p->node[p->shard[a + i].node];
            lat = max2(lat, plan_node_lat_us(nd));
            worst = max2(worst, 4.0 * u * pm->n_embd * (g - 1) / plan_node_link_bw(nd));
        }
        t += lat / 1e3 + worst * 1e3;
    }
    return t;
}

// Stage k hands u rows of the residual stream from its first member to every member of stage k+1.
static double handoff_ms(const plan_model_t *pm, const plan_t *p, int k, int u) {
    const int a = p->stage_first[k + 1], b = p->stage_first[k + 2];
    const plan_node_t *lead = &p->node[p->shard[p->stage_first[k]].node];
    const double row = 4.0 * u * pm->n_embd;
    double lat = plan_node_lat_us(lead), t = row * (b - a) / plan_node_link_bw(lead);
    for (int i = a; i < b; i++) {
        const plan_node_t *nd = &p->node[p->shard[i].node];
        lat = max2(lat, plan_node_lat_us(nd));
        t = max2(t, row / plan_node_link_bw(nd));
    }
    return lat / 1e3 + t * 1e3;
}

// The coordinator (offered node 0) sends the step to the first stage and receives the last stage's
// logit rows; what it computes itself does not travel.
static double coordinator_ms(const plan_model_t *pm, const plan_t *p) {
    const plan_node_t *coord = p->n_nodes > 0 ? &p->node[0] : NULL;
    double c_lat = coord ? plan_node_lat_us(coord) : PLAN_DEFAULT_LAT_US;
    double c_bw = coord ? plan_node_link_bw(coord) : PLAN_DEFAULT_LINK_BW;
    const int local = p->coord_apart ? -1 : 0; // the offered node whose share needs no message
    for (int i = 0; p->coord_apart && i < p->n_nodes; i++) { // a coordinator apart: the best link offered
        c_lat = i == 0 ? plan_node_lat_us(&p->node[i]) : min2(c_lat, plan_node_lat_us(&p->node[i]));
        c_bw = i == 0 ? plan_node_link_bw(&p->node[i]) : max2(c_bw, plan_node_link_bw(&p->node[i]));
    }
    double t = 0, lat = 0;
    bool any = false;
    for (int i = p->stage_first[0]; i < p->stage_first[1]; i++)
        if (p->shard[i].node != local) any = true, lat = max2(lat, plan_node_lat_us(&p->node[p->shard[i].node]));
    if (any) t += max2(lat, c_lat) / 1e3;
    double sum = 0, worst = 0;
    lat = 0;
    any = false;
    for (int i = p->stage_first[p->n_stages - 1]; i < p->n; i++) {
        const plan_shard_t *s = &p->shard[i];
        if (s->node == local || s->s.v1 <= s->s.v0) continue;
        const plan_node_t *nd = &p->node[s->node];
        const double b = 4.0 * (s->s.v1 - s->s.v0);
        any = true;
        sum += b;
        lat = max2(lat, plan_node_lat_us(nd));
        worst = max2(worst, b / plan_node_link_bw(nd));
    }
    (void)pm;
    if (any) t += max2(lat, c_lat) / 1e3 + max2(worst, sum / c_bw) * 1e3;
    return t;
}

// ms member i of stage [a, b) takes to read its streamed bytes: its disk's bandwidth (derated),
// shared with the other streaming members of [a, b) on the same disk (disk_id > 0), which read at
// the same time and together get up to PLAN_DISK_PARALLEL times one reader's bandwidth.
static double disk_ms(const plan_t *p, int a, int b, int i) {
    const plan_shard_t *s = &p->shard[i];
    if (!s->st.streams || !s->st.stream_bytes) return 0;
    const plan_node_t *nd = &p->node[s->node];
    double bytes = (double)s->st.stream_bytes, readers = 1;
    for (int j = a; nd->disk_id > 0 && j < b; j++)
        if (j != i && p->shard[j].st.streams && p->node[p->shard[j].node].disk_id == nd->disk_id) {
            bytes += (double)p->shard[j].st.stream_bytes;
            readers += 1;
        }
    const double gain = readers < PLAN_DISK_PARALLEL ? readers : PLAN_DISK_PARALLEL;
    return bytes / (plan_node_disk_bw(nd) * PLAN_DISK_EFFICIENCY * gain) * 1e3;
}

// Member time from its compute-or-memory time c, its stage's exchanges x and its disk time d (all
// per token), when `idle` ms of the token pass elsewhere. The units compute in order, each taking
// cu = (c + x) / n_units; the pinned ones first. The reader reads the S streamed units one after
// another, r = d / S each, at most `window` ahead of the computation: before the token arrives it
// reads ahead while idle (pre), and with 2+ buffers it then only waits once, for the first
// streamed unit's buffer to be freed; with one buffer reads and computation alternate. Without
// buffers (only embedding rows on demand) the read precedes the first block.
static double member_time(const plan_stream_t *st, double c, double x, double d, double idle) {
    if (!st->streams || d <= 0) return c + x;
    const int S = st->n_units - st->pinned, w = st->window;
    if (w <= 0 || S <= 0) return c + x + d;
    const double cu = (c + x) / st->n_units, pc = cu * st->pinned, r = d / S;
    const double pre = min2(idle, (w < S ? w : S) * r);
    if (w == 1) return max2(pc, r - pre) + cu + (S - 1) * (r + cu);
    double end = S * r - pre; // when the last streamed unit has been read
    if (S > w) end = max2(end, max2(pc, r - pre) + cu + (S - w) * r);
    return max2(c + x + max2(0, r - pre - pc), end + cu);
}

// Decode time of stage k with `idle` ms of the token spent elsewhere and exchanges x; *mc, *mm,
// *md get the slowest member's compute, memory and disk times. With fill, the members' figures
// are stored.
static double stage_decode_ms(const plan_model_t *pm, plan_t *p, int k, double x, double idle, bool fill, double *mc,
                              double *mm, double *md) {
    const int a = p->stage_first[k], b = p->stage_first[k + 1];
    range_sums_t rs;
    range_sums(pm, p->shard[a].s.l0, p->shard[a].s.l1, &rs);
    double worst = 0;
    *mc = *mm = *md = 0;
    for (int i = a; i < b; i++) {
        plan_shard_t *s = &p->shard[i];
        const plan_node_t *nd = &p->node[s->node];
        double el, by;
        shard_work(pm, &rs, s, p->tp_mode, 1, &el, &by);
        const double share = plan_cpu_share(p, a, b, NULL, nd); // the stage's members compute at once
        const double tc = 2 * el / (plan_node_gflops(nd) * 1e9) * 1e3 * share, tm = by / stream_bw(nd) * 1e3 * share;
        const double td = disk_ms(p, a, b, i), t = member_time(&s->st, max2(tc, tm), x, td, idle);
        *mc = max2(*mc, tc);
        *mm = max2(*mm, tm);
        *md = max2(*md, td);
        worst = max2(worst, t);
        if (fill) s->compute_ms = tc, s->memory_ms = tm, s->disk_ms = td, s->comm_ms = x, s->busy_ms = t;
    }
    return worst;
}

// Slowest member's time of stage k for a micro-batch of u tokens with exchanges x. In a pipeline
// every stage streams at once then, so a shared disk is split over the whole plan.
static double stage_prefill_ms(const plan_model_t *pm, const plan_t *p, int k, int u, double x) {
    const int a = p->stage_first[k], b = p->stage_first[k + 1];
    range_sums_t rs;
    range_sums(pm, p->shard[a].s.l0, p->shard[a].s.l1, &rs);
    double worst = 0;
    for (int i = a; i < b; i++) {
        const plan_shard_t *s = &p->shard[i];
        const plan_node_t *nd = &p->node[s->node];
        double el, by;
        shard_work(pm, &rs, s, p->tp_mode, 1, &el, &by);
        // micro-batches keep every stage busy at once
        const double share = p->n_stages > 1 ? plan_cpu_share(p, 0, p->n, NULL, nd) : plan_cpu_share(p, a, b, NULL, nd);
        const double c = max2(2 * el / (plan_node_gflops(nd) * 1e9) * 1e3, by / stream_bw(nd) * 1e3) * share;
        // A batched micro-batch costs u tokens' decode time divided by the speed-up, but never
        // less than reading the weights once.
        shard_work(pm, &rs, s, p->tp_mode, u, &el, &by);
        const double pc = max2(u * c / PLAN_PREFILL_SPEEDUP, by / stream_bw(nd) * 1e3 * share);
        const double d = p->n_stages > 1 ? disk_ms(p, 0, p->n, i) : disk_ms(p, a, b, i);
        worst = max2(worst, member_time(&s->st, pc, x, d, 0));
    }
    return worst;
}

// --- internal API (plan_impl.h)

double plan_node_gflops(const plan_node_t *nd) {
    if (nd->gflops > 0) return nd->gflops;
    return PLAN_GFLOPS_PER_SPEED * (nd->speed > 0 ? nd->speed : 1.0);
}

double plan_node_mem_bw(const plan_node_t *nd) { return nd->mem_bw > 0 ? nd->mem_bw : PLAN_DEFAULT_MEM_BW; }

double plan_node_lat_us(const plan_node_t *nd) { return nd->lat_us > 0 ? nd->lat_us : PLAN_DEFAULT_LAT_US; }
double plan_node_link_bw(const plan_node_t *nd) { return nd->link_bw > 0 ? nd->link_bw : PLAN_DEFAULT_LINK_BW; }
double plan_node_disk_bw(const plan_node_t *nd) { return nd->disk_bw > 0 ? nd->disk_bw : PLAN_DEFAULT_DISK_BW; }

double plan_cpu_share(const plan_t *p, int a, int b, const bool *busy, const plan_node_t *nd) {
    if (nd->cpu_id <= 0 || nd->cores <= 0) return 1.0;
    double threads = 0;
    for (int j = a; j < b; j++) {
        const plan_node_t *o = &p->node[p->shard[j].node];
        if ((!busy || busy[j - a]) && o->cpu_id == nd->cpu_id) threads += o->threads > 0 ? o->threads : 1;
    }
    const double r = threads / nd->cores;
    return r <= 1 ? 1.0 : r * (1 + PLAN_OVERSUB_LOSS * min2(1.0, r - 1));
}

double plan_node_rate(const plan_model_t *pm, const plan_node_t *nd) {
    const double bpw = pm && pm->bytes_per_weight > 0 ? pm->bytes_per_weight : 0.5625;
    const double t = max2(2.0 / (plan_node_gflops(nd) * 1e9), bpw / stream_bw(nd));
    return 1.0 / t;
}

double plan_allreduce_ms(const plan_t *p, int a, int b, double bytes, bool *star) {
    const int g = b - a;
    if (star) *star = true;
    if (g < 2) return 0;
    double lat = 0, bw = INFINITY;
    for (int i = a; i < b; i++) {
        const plan_node_t *nd = &p->node[p->shard[i].node];
        lat = max2(lat, plan_node_lat_us(nd) * 1e-6);
        bw = min2(bw, plan_node_link_bw(nd));
    }
    const double t_star = 2 * lat + 2 * (g - 1) * bytes / bw;
    const double t_ring = 2 * (g - 1) * (lat + bytes / (g * bw));
    if (star) *star = t_star <= t_ring; // the links choose the summation order, wherever the bytes go
    if (group_shm(p, a, b, bytes)) return shm_ms(g * bytes);
    return min2(t_star, t_ring) * 1e3;
}

double plan_member_ms(const plan_model_t *pm, const plan_t *p, int a, int b, int i) {
    const plan_shard_t *s = &p->shard[i];
    const plan_node_t *nd = &p->node[s->node];
    range_sums_t rs;
    range_sums(pm, s->s.l0, s->s.l1, &rs);
    double el, by;
    shard_work(pm, &rs, s, p->tp_mode, 1, &el, &by);
    const double c = max2(2 * el / (plan_node_gflops(nd) * 1e9) * 1e3, by / stream_bw(nd) * 1e3);
    return member_time(&s->st, c, 0, disk_ms(p, a, b, i), 0);
}

// Compute-or-memory ms per token of shard s on its node.
static double compute_ms(const plan_model_t *pm, const plan_t *p, const plan_shard_t *s) {
    const plan_node_t *nd = &p->node[s->node];
    range_sums_t rs;
    range_sums(pm, s->s.l0, s->s.l1, &rs);
    double el, by;
    shard_work(pm, &rs, s, p->tp_mode, 1, &el, &by);
    return max2(2 * el / (plan_node_gflops(nd) * 1e9) * 1e3, by / stream_bw(nd) * 1e3);
}

void plan_scale_of(const plan_model_t *pm, const plan_t *p, int a, int i, bool by_blocks, plan_scale_t *m) {
    plan_shard_t ref = p->shard[i];
    const plan_node_t *nd = &p->node[ref.node];
    double x = ref.s.l1 - ref.s.l0;
    if (!by_blocks) { // the whole stage's rows on this node
        const shard_slice_t *s0 = &p->shard[a].s;
        ref.s = shard_full(pm->n_layer, pm->n_head, pm->n_head_kv, pm->n_embd, pm->n_ff, pm->n_vocab);
        ref.s.l0 = s0->l0;
        ref.s.l1 = s0->l1;
        if (!(s0->l0 == 0 || s0->l1 == pm->n_layer)) ref.s.v1 = 0;
        x = 1;
    }
    plan_stream_t st;
    uint64_t weights = 0, kv = 0;
    plan_size_share(pm, &ref.s, p->tp_mode, p->n_ctx, nd, 0, &st, &weights, NULL, &kv); // kv: its part in RAM
    const double out_norm = ref.s.l1 == pm->n_layer ? (double)pm->out_norm_bytes : 0;
    const double xs = x > 0 ? x : 1;
    m->c = compute_ms(pm, p, &ref) / xs;
    m->units = (double)st.pinned_bytes / xs;
    m->kv = (double)kv / xs;
    m->embd = ((double)weights - (double)st.pinned_bytes - out_norm) / xs;
    m->unit0 = by_blocks ? (double)st.unit_bytes : 0;
    m->unit1 = by_blocks ? 0 : (double)st.unit_bytes;
    m->fixed = (double)st.fixed_bytes - (double)kv;
    m->budget = (double)nd->mem_budget;
    m->disk = plan_node_disk_bw(nd) * PLAN_DISK_EFFICIENCY / 1e3;
}

// The time at x as a line or the larger of two lines: t = max(a[0] x + b[0], a[1] x + b[1]).
// False where it does not fit even streaming.
static bool scale_lines(const plan_scale_t *m, double x, double *a, double *b) {
    const double f = m->fixed + m->kv * x, u = m->unit0 + m->unit1 * x, units = m->units * x;
    a[0] = a[1] = m->c, b[0] = b[1] = 0;
    if (m->budget <= 0 || f + units + m->embd * x <= m->budget) return true; // resident: c x
    if (f + u > m->budget) return false;
    const int w = f + PLAN_STREAM_WINDOW * u <= m->budget ? PLAN_STREAM_WINDOW : 1;
    const double room = m->budget - f - w * u; // bytes left for pinned units
    if (room >= units) return true;           // every unit kept: c x
    // d = (units - room) / disk = (k x - (budget - fixed - w unit0)) / disk
    const double k = (m->units + m->kv + w * m->unit1) / m->disk, k0 = (m->budget - m->fixed - w * m->unit0) / m->disk;
    if (room <= 0) { // nothing kept: d = units x / disk
        a[1] = m->units / m->disk, b[1] = 0;
    } else {
        a[1] = k, b[1] = -k0;
    }
    if (w == 1) a[0] = a[1] = m->c + a[1], b[0] = b[1]; // reads and units alternate: c x + d
    return true;
}

// Predicted ms at x (INFINITY when it does not fit even streaming).
static double scale_ms(const plan_scale_t *m, double x) {
    double a[2], b[2]; // (2) the two lines' slopes and intercepts
    if (!scale_lines(m, x, a, b)) return INFINITY;
    return max2(a[0] * x + b[0], a[1] * x + b[1]);
}

double plan_scale_max(const plan_scale_t *m, double t, double hi) {
    if (!(scale_ms(m, 0) <= t)) return 0;
    // Where the regime can change: resident, every unit kept, buffers of 2 or 1, nothing fits.
    double bp[8];      // (n) breakpoints in (0, hi], sorted
    int n = 0;
    const double A = m->budget - m->fixed;
    const double at[5][2] = { // (5, 2) x = at[i][0] / at[i][1] where a regime ends{A, m->kv + m->units + m->embd},
                             {A - PLAN_STREAM_WINDOW * m->unit0, m->kv + PLAN_STREAM_WINDOW * m->unit1 + m->units},
                             {A - PLAN_STREAM_WINDOW * m->unit0, m->kv + PLAN_STREAM_WINDOW * m->unit1},
                             {A - m->unit0, m->kv + m->unit1 + m->units},
                             {A - m->unit0, m->kv + m->unit1}};
    bp[n++] = hi;
    for (int i = 0; m->budget > 0 && i < 5; i++)
        if (at[i][1] > 0 && at[i][0] / at[i][1] > 0 && at[i][0] / at[i][1] < hi) bp[n++] = at[i][0] / at[i][1];
    for (int i = 1; i < n; i++) // sort (n <= 6)
        for (int j = i; j > 0 && bp[j] < bp[j - 1]; j--) {
            const double x = bp[j];
            bp[j] = bp[j - 1];
            bp[j - 1] = x;
        }
    double lo = 0;
    for (int i = 0; i < n; lo = bp[i++]) {
        const double up = bp[i];
        if (up <= lo) continue;
        double a[2], b[2]; // (2) the segment's lines
        if (!scale_lines(m, 0.5 * (lo + up), a, b)) return lo; // no more fits past lo
        double x = up;
        for (int j = 0; j < 2; j++)
            if (a[j] * up + b[j] > t) x = fmin(x, a[j] > 0 ? (t - b[j]) / a[j] : lo);
        if (x < up) return x > lo ? x : lo;
    }
    return hi;
}

void plan_predict_modes(const plan_model_t *pm, plan_t *p) {
    bool group = false;
    for (int k = 0; k < p->n_stages; k++) group |= p->stage_first[k + 1] - p->stage_first[k] > 1;
    double other = p->cost.token_ms;
    if (group) {
        plan_t *q = malloc(sizeof *q); // p's layout in the other mode
        other = 0;
        if (q) {
            *q = *p;
            q->tp_mode = p->tp_mode == PLAN_TP_ALLREDUCE ? PLAN_TP_EXACT : PLAN_TP_ALLREDUCE;
            bool ok = true;
            for (int k = 0; ok && k < q->n_stages; k++) {
                const int a = q->stage_first[k], b = q->stage_first[k + 1];
                double w[PLAN_MAX_NODES]; // (b - a) the stage's weights
                for (int i = a; i < b; i++) w[i - a] = q->shard[i].weight > 0 ? q->shard[i].weight : 1e-9;
                const unsigned fl = PLAN_FIT_ADJUST | (q->resident_only ? 0 : PLAN_FIT_STREAM | PLAN_FIT_BALANCE);
                ok = plan_fit_stage(pm, q, a, b, q->shard[a].s.l0, q->shard[a].s.l1, w, fl, NULL) == 0;
            }
            if (ok) {
                plan_predict(pm, q);
                other = q->cost.token_ms;
            }
            free(q);
        }
    }
    if (p->tp_mode == PLAN_TP_ALLREDUCE) p->cost.allreduce_ms = p->cost.token_ms, p->cost.exact_ms = other;
    else p->cost.exact_ms = p->cost.token_ms, p->cost.allreduce_ms = other;
}

// --- public API

void plan_predict(const plan_model_t *pm, plan_t *p) {
    const int u = p->ubatch > 0 ? p->ubatch : PLAN_DEFAULT_UBATCH;
    const int n_prompt = p->n_prompt > 0 ? p->n_prompt : PLAN_DEFAULT_N_PROMPT;
    plan_cost_t c = {0};
    c.exact_ms = p->cost.exact_ms;
    c.allreduce_ms = p->cost.allreduce_ms;
    double x[PLAN_MAX_NODES] = {0};   // (n_stages) each stage's exchanges per token
    double t0[PLAN_MAX_NODES] = {0};  // (n_stages) its time without reading ahead while idle
    const double coord = coordinator_ms(pm, p);
    double total0 = coord, mc, mm, md;
    for (int k = 0; k < p->n_stages; k++) {
        if (p->stage_first[k + 1] <= p->stage_first[k]) continue;
        x[k] = stage_comm_ms(pm, p, p->stage_first[k], p->stage_first[k + 1], 1);
        if (k + 1 < p->n_stages) x[k] += handoff_ms(pm, p, k, 1);
        t0[k] = stage_decode_ms(pm, p, k, x[k], 0, false, &mc, &mm, &md);
        total0 += t0[k];
    }
    // A stage's reader fills its window while the token is elsewhere (one refinement: its idle
    // time as predicted without that).
    double worst_stage = 0; // prefill: the slowest stage's time for one micro-batch
    for (int k = 0; k < p->n_stages; k++) {
        const int a = p->stage_first[k], b = p->stage_first[k + 1];
        if (b <= a) continue;
        const double t = stage_decode_ms(pm, p, k, x[k], total0 - t0[k], true, &mc, &mm, &md);
        c.compute_ms += mc;
        c.memory_ms += mm;
        c.disk_ms += md;
        c.comm_ms += x[k];
        c.token_ms += t;
        double px = stage_comm_ms(pm, p, a, b, u);
        if (k + 1 < p->n_stages) px += handoff_ms(pm, p, k, u);
        worst_stage = max2(worst_stage, stage_prefill_ms(pm, p, k, u, px));
    }
    c.comm_ms += coord;
    c.token_ms += coord;
    const int micro = (n_prompt + u - 1) / u;
    const double prefill_ms = (micro + p->n_stages - 1) * worst_stage + coord;
    c.prefill_tok_s = prefill_ms > 0 ? n_prompt / (prefill_ms / 1e3) : 0;
    if (p->tp_mode == PLAN_TP_ALLREDUCE) c.allreduce_ms = c.token_ms;
    else c.exact_ms = c.token_ms;
    p->cost = c;
}
