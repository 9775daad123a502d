// The expert-caching weight provider: per-block expert slots filled by pread (O_DIRECT, in aligned
// extents, where the file system has it), LRU/LFU eviction, and a background thread that reads hinted
// and speculatively predicted experts ahead (see experts.h).
#include "offload/experts.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "offload/weights_impl.h"
#include "worker/kernels/ops.h"

// --- types

#define EX_QMAX 64                 // queued background reads
#define EX_ALIGN 4096u             // slot buffer alignment, and O_DIRECT's for file offsets and lengths

typedef enum { ES_EMPTY, ES_LOADING, ES_READY } es_state_t;

// One cache slot of a block.
typedef struct {
    es_state_t state;
    int li;                    // the block of that expert (a pool's slots serve every block)
    int expert;                // the expert in it (-1: none)
    int refs;                  // acquires not yet released
    uint64_t last_use;         // tick of its last acquire or read (LRU)
    bool spec;                 // read on a speculative guess
    bool used;                 // acquired since it was read
    bool hint;                 // read ahead for the router's choice of the token that acquires it
    uint8_t *buf;              // (slot_bytes): gate rows, up rows, down rows; allocated at its first read
    layer_weights_t lw;        // the expert bound into buf
} eslot_t;

// Where one expert's three matrices are in the file.
typedef struct {
    uint64_t off[3];           // file offsets of its w_gate, w_up, w_down rows
    size_t len[3];             // their bytes
    layer_weights_t tmpl;      // the binding to the mapping (data pointers replaced when read)
} eloc_t;

// A matrix of at least EX_DIRECT_MIN bytes is read directly (O_DIRECT) when the file allows, as the
// EX_ALIGN-aligned extent around [off, off + len); smaller ones buffered, where an extent's slack would
// weigh. The slot leaves room for the extent either way.
#define EX_DIRECT_MIN ((size_t)64 << 10)
static uint64_t ext_lo(uint64_t off) { return off / EX_ALIGN * EX_ALIGN; }
static size_t ext_len(uint64_t off, size_t len) {
    if (len < EX_DIRECT_MIN) return len;
    return (size_t)((off + len + EX_ALIGN - 1) / EX_ALIGN * EX_ALIGN - ext_lo(off));
}

// A queued background read.
typedef struct {
    int li;                    // block index in the slice
    int expert;
    bool spec;                 // a speculative guess (else the router's hinted choice)
} ereq_t;

typedef struct {
    weights_t *inner;          // "mmap" of the file's layout: dense parts, globals, expert locations
    model_hparams_t hp;
    shard_slice_t slice;
    experts_opts_t o;
    const kernels_t *kern;
    int fd;                    // the model file, for pread
    int dfd;                   // the same opened O_DIRECT (reads of aligned extents: twice the buffered
                               // rate on this machine's disk, README), -1 = buffered reads (io=pread, or a
                               // file system without direct I/O)
    int nl, ne, k;             // blocks held, experts per block, experts used per token
    int N;                     // slots per block (0 with a pool)
    int pool;                  // slots shared by every block, where not one expert per block fits the
                               // budget (0: N per block)
    int nh_max;                // the most experts a block holds (n_expert unless placed)
    eloc_t *loc;               // (nl, ne)
    size_t slot_bytes;         // one expert's bytes (the largest)
    uint64_t dense_bytes;      // weight bytes behind the inner provider's units besides the experts
    eslot_t *slots;            // (nl, N), or (pool)
    uint64_t *freq;            // (nl, ne) acquires of each expert since creation (LFU)
    uint8_t *wanted;           // (nl, ne) hinted by the router and not yet acquired: not evicted by reads ahead
    uint8_t *held;             // (nl, ne) the experts this share computes (placed experts: only its own;
                               // acquiring another is MLM_ENOTFOUND, as from "mmap")
    int *nheld;                // (nl) experts held per block
    uint64_t tick;             // use clock for LRU
    pthread_mutex_t mu;        // guards everything below and the slots
    pthread_cond_t cv;         // a slot changed state or was released
    pthread_cond_t work;       // the background thread has something to do
    pthread_t thr;
    bool thr_on, stop;
    ereq_t q[EX_QMAX];         // (q_n) queued reads, in order
    int q_n;
    float *obs;                // (obs_cap, n_embd) the last observed residual stream
    int obs_n, obs_cap, obs_layer; // its rows, capacity, block (-1: nothing to guess from)
    double obs_t, obs_stall;   // when the last observation came (ms, 0: none yet) and st.stall_ms then
    double stall_avg;          // moving average of the share of time spent waiting for reads (prefetch auto)
    // background scratch (thread only)
    float *xn;                 // (obs_cap, n_embd)
    uint8_t *xq;               // (obs_cap, act row bytes of the router)
    float *logits;             // (obs_cap, n_expert)
    int *sel;                  // (k)
    float *selw;               // (k)
    weights_stats_t st;        // the provider's counters
} ex_t;

// --- helpers

static const char *prefetch_name(experts_prefetch_t p) {
    return p == EXPERTS_PREFETCH_ON ? "on" : p == EXPERTS_PREFETCH_AUTO ? "auto" : "off";
}

// The slots block li may use: its own N, or the whole pool.
static int n_slots(const ex_t *x) { return x->pool ? x->pool : x->N; }
static size_t all_slots(const ex_t *x) { return x->pool ? (size_t)x->pool : (size_t)x->nl * (size_t)x->N; }
static eslot_t *slot_at(ex_t *x, int li, int i) { return x->pool ? &x->slots[i] : &x->slots[(size_t)li * x->N + i]; }

static eslot_t *find(ex_t *x, int li, int e) {
    for (int i = 0; i < n_slots(x); i++) {
        eslot_t *s = slot_at(x, li, i);
        if (s->state != ES_EMPTY && s->li == li && s->expert == e) return s;
    }
    return NULL;
}

// The slot a read of block li may take: an empty one, else by the policy among those not in use nor
// loading; slots holding an expert the router asked for are spared (bg) or taken last (an acquire).
static eslot_t *victim(ex_t *x, int li, bool bg) {
    eslot_t *best = NULL;
    int best_w = 0;
    for (int i = 0; i < n_slots(x); i++) {
        eslot_t *s = slot_at(x, li, i);
        if (s->state == ES_EMPTY) return s;
        if (s->state != ES_READY || s->refs > 0) continue;
        const int w = x->wanted[(size_t)s->li * x->ne + s->expert];
        if (bg && w) continue;
        if (best) {
            if (w != best_w) {
                if (w > best_w) continue;
            } else if (x->o.policy == EXPERTS_LFU) {
                const uint64_t fs = x->freq[(size_t)s->li * x->ne + s->expert];
                const uint64_t fb = x->freq[(size_t)best->li * x->ne + best->expert];
                if (fs > fb || (fs == fb && s->last_use >= best->last_use)) continue;
            } else if (s->last_use >= best->last_use) {
                continue;
            }
        }
        best = s;
        best_w = w;
    }
    return best;
}

// Empties s for expert e of block li (under mu), counting an eviction of what it held.
static void claim(ex_t *x, eslot_t *s, int li, int e, bool spec) {
    if (s->state == ES_READY) {
        x->st.evictions++;
        if (s->spec && !s->used) x->st.prefetch_wasted++;
    }
    s->state = ES_LOADING;
    s->li = li;
    s->expert = e;
    s->spec = spec;
    s->used = false;
    s->hint = false;
    s->refs = 0;
}

// Reads expert e of block li into s (mu not held; s is LOADING and only this thread touches it).
static int read_expert(ex_t *x, eslot_t *s, int li, int e) {
    const eloc_t *L = &x->loc[(size_t)li * x->ne + e];
    if (!s->buf) {
        void *p = NULL;
        if (posix_memalign(&p, EX_ALIGN, x->slot_bytes ? x->slot_bytes : EX_ALIGN) != 0) return MLM_ENOMEM;
        s->buf = p;
        pthread_mutex_lock(&x->mu);
        x->st.bytes_held += x->slot_bytes;
        if (x->st.bytes_held > x->st.bytes_peak) x->st.bytes_peak = x->st.bytes_held;
        pthread_mutex_unlock(&x->mu);
    }
    size_t at = 0, data[3]; // where each matrix's rows start in the slot
    for (int m = 0; m < 3; m++) {
        const bool direct = x->dfd >= 0 && L->len[m] >= EX_DIRECT_MIN;
        const uint64_t from = direct ? ext_lo(L->off[m]) : L->off[m];
        const size_t want = direct ? ext_len(L->off[m], L->len[m]) : L->len[m];
        const size_t need = (size_t)(L->off[m] + L->len[m] - from); // a direct read may stop short at the end
        size_t done = 0;
        while (done < need) {
            ssize_t r = pread(direct ? x->dfd : x->fd, s->buf + at + done, want - done, (off_t)(from + done));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return MLM_EIO;
            done += (size_t)r;
        }
        // the page cache must not be what makes the next use fast: the slot is (direct reads pass it by)
        if (!direct) (void)posix_fadvise(x->fd, (off_t)L->off[m], (off_t)L->len[m], POSIX_FADV_DONTNEED);
        data[m] = at + (size_t)(L->off[m] - from);
        at += want;
    }
    s->lw = L->tmpl;
    mm_weight_t *mats[3] = {&s->lw.w_gate, &s->lw.w_up, &s->lw.w_down};
    for (int m = 0; m < 3; m++)
        if (mats[m]->rows > 0) mats[m]->data = s->buf + data[m];
    return 0;
}

// Whether a direct read of the first expert's first aligned extent succeeds.
static bool direct_works(const ex_t *x) {
    const eloc_t *L = &x->loc[0];
    void *p = NULL;
    if (L->len[0] == 0 || posix_memalign(&p, EX_ALIGN, EX_ALIGN) != 0) return false;
    ssize_t r;
    do r = pread(x->dfd, p, EX_ALIGN, (off_t)ext_lo(L->off[0]));
    while (r < 0 && errno == EINTR);
    free(p);
    return r > 0;
}

// A read by the background thread: expert e of block li unless it is there or no slot can take it.
static void bg_load(ex_t *x, ereq_t r) {
    pthread_mutex_lock(&x->mu);
    eslot_t *s = find(x, r.li, r.expert);
    if (!s) s = victim(x, r.li, true);
    else s = NULL;
    if (!s) {
        pthread_mutex_unlock(&x->mu);
        return;
    }
    claim(x, s, r.li, r.expert, r.spec);
    s->hint = !r.spec;
    pthread_mutex_unlock(&x->mu);
    const double t0 = (double)mlm_now_us();
    int rc = read_expert(x, s, r.li, r.expert);
    const double ms = ((double)mlm_now_us() - t0) / 1000.0;
    pthread_mutex_lock(&x->mu);
    if (rc == 0) {
        s->state = ES_READY;
        s->last_use = ++x->tick;
        x->st.units_read++;
        x->st.bytes_read += x->slot_bytes;
        x->st.read_ms += ms;
        if (r.spec) x->st.prefetch_reads++;
    } else {
        s->state = ES_EMPTY;
        s->expert = -1;
    }
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

// The next block's likely experts from the observed residual stream (block li): its ffn_norm and
// router over every row, the experts by votes (top-1 counts k, top-k counts 1), at most N - k of them,
// queued as speculative reads. Runs on the background thread with obs taken (mu not held).
static void guess(ex_t *x, int li, const float *obs, int n) {
    const int layer = x->slice.l0 + li + 1, E = x->hp.n_embd;
    const layer_weights_t *D;
    if (weights_acquire(x->inner, layer, WEIGHTS_DENSE, &D) != 0) return;
    const mm_weight_t *g = &D->gate_inp;
    if (g->rows != x->ne || !D->ffn_norm) {
        weights_release(x->inner, layer, WEIGHTS_DENSE);
        return;
    }
    const size_t arb = mm_act_row_bytes(g->type, E);
    for (int i = 0; i < n; i++) {
        ops_rmsnorm(x->xn + (size_t)i * E, obs + (size_t)i * E, D->ffn_norm, E, x->hp.rms_eps);
        mm_quantize_act(x->kern, g->type, x->xn + (size_t)i * E, x->xq + (size_t)i * arb, E);
    }
    mm_rows(x->kern, g, x->xq, arb, n, x->logits, (size_t)x->ne, 0, g->rows);
    weights_release(x->inner, layer, WEIGHTS_DENSE);
    int votes[256] = {0}; // (n_expert <= 256) weighted top-k picks of the chunk's tokens
    for (int i = 0; i < n; i++) {
        ops_topk_route(x->logits + (size_t)i * x->ne, x->ne, x->k, x->sel, x->selw);
        for (int r = 0; r < x->k; r++) votes[x->sel[r]] += r == 0 ? x->k : 1;
    }
    pthread_mutex_lock(&x->mu);
    // at most N - k guesses that are not resident: the block keeps room for the k experts its token
    // will use (a guess may only take a slot the next token's own experts do not need: with N <= k a
    // wrong guess would evict an expert that was about to hit, and when reading is the bottleneck
    // that costs more than a right guess saves; measured in the README)
    for (int j = 0; j < x->N - x->k && x->q_n < EX_QMAX;) {
        int best = -1;
        for (int e = 0; e < x->ne; e++)
            if (votes[e] > 0 && (best < 0 || votes[e] > votes[best])) best = e;
        if (best < 0) break;
        votes[best] = 0;
        if (!x->held[(size_t)(li + 1) * x->ne + best] || find(x, li + 1, best)) continue; // another node's, or here
        x->q[x->q_n++] = (ereq_t){.li = li + 1, .expert = best, .spec = true};
        j++;
    }
    pthread_mutex_unlock(&x->mu);
}

static void *bg_main(void *arg) {
    ex_t *x = arg;
    float *mine = NULL; // (cap, n_embd) the observation being worked on (taken out of obs under mu)
    int cap = 0;
    pthread_mutex_lock(&x->mu);
    while (!x->stop) {
        if (x->q_n > 0) {
            ereq_t r = x->q[0];
            memmove(x->q, x->q + 1, (size_t)(--x->q_n) * sizeof *x->q);
            pthread_mutex_unlock(&x->mu);
            bg_load(x, r);
            pthread_mutex_lock(&x->mu);
        } else if (x->obs_layer >= 0) {
            const int li = x->obs_layer - x->slice.l0, n = x->obs_n;
            x->obs_layer = -1;
            if (n > cap) {
                float *p = realloc(mine, (size_t)n * x->hp.n_embd * sizeof *p);
                if (!p) continue;
                mine = p;
                cap = n;
            }
            memcpy(mine, x->obs, (size_t)n * x->hp.n_embd * sizeof *mine);
            pthread_mutex_unlock(&x->mu);
            guess(x, li, mine, n);
            pthread_mutex_lock(&x->mu);
        } else {
            pthread_cond_wait(&x->work, &x->mu);
        }
    }
    pthread_mutex_unlock(&x->mu);
    free(mine);
    return NULL;
}

// --- provider calls

static int ex_acquire(void *ctx, int layer, int expert, const layer_weights_t **out) {
    ex_t *x = ctx;
    if (layer < 0 || expert < 0) { // the dense parts and globals stay mapped: a hit
        int rc = weights_acquire(x->inner, layer, expert, out);
        if (rc == 0) {
            pthread_mutex_lock(&x->mu);
            x->st.hits++;
            pthread_mutex_unlock(&x->mu);
        }
        return rc;
    }
    const int li = layer - x->slice.l0, e = expert;
    if (li < 0 || li >= x->nl || e >= x->ne || !x->held[(size_t)li * x->ne + e]) return MLM_ENOTFOUND; // placed elsewhere
    const double t0 = (double)mlm_now_us();
    bool waited = false;
    pthread_mutex_lock(&x->mu);
    for (;;) {
        eslot_t *s = find(x, li, e);
        if (s && s->state == ES_READY) {
            // read for this very use (waited for, or read ahead on the router's hint): a miss
            if (waited || (s->hint && !s->used)) x->st.misses++, x->st.expert_misses++;
            else x->st.hits++, x->st.expert_hits++;
            if (s->spec && !s->used) x->st.prefetch_used++;
            s->used = true;
            break;
        }
        if (!s && (s = victim(x, li, false)) != NULL) { // a miss: this thread reads it
            claim(x, s, li, e, false);
            pthread_mutex_unlock(&x->mu);
            const double r0 = (double)mlm_now_us();
            int rc = read_expert(x, s, li, e);
            const double ms = ((double)mlm_now_us() - r0) / 1000.0;
            pthread_mutex_lock(&x->mu);
            if (rc != 0) {
                s->state = ES_EMPTY;
                s->expert = -1;
                pthread_cond_broadcast(&x->cv);
                pthread_mutex_unlock(&x->mu);
                return rc;
            }
            s->state = ES_READY;
            s->used = true;
            x->st.units_read++;
            x->st.bytes_read += x->slot_bytes;
            x->st.read_ms += ms;
            x->st.misses++;
            x->st.expert_misses++;
            pthread_cond_broadcast(&x->cv);
            waited = false;
            break;
        }
        waited = true; // loading elsewhere, or every slot busy: wait for a change
        pthread_cond_wait(&x->cv, &x->mu);
    }
    eslot_t *s = find(x, li, e);
    s->refs++;
    s->last_use = ++x->tick;
    x->freq[(size_t)li * x->ne + e]++;
    x->wanted[(size_t)li * x->ne + e] = 0;
    const double ms = ((double)mlm_now_us() - t0) / 1000.0;
    if (ms > 0.05 || waited) x->st.stall_ms += ms;
    *out = &s->lw;
    pthread_mutex_unlock(&x->mu);
    return 0;
}

static void ex_release(void *ctx, int layer, int expert) {
    ex_t *x = ctx;
    if (layer < 0 || expert < 0) {
        weights_release(x->inner, layer, expert);
        return;
    }
    const int li = layer - x->slice.l0;
    pthread_mutex_lock(&x->mu);
    for (int i = 0; i < n_slots(x); i++) {
        eslot_t *s = slot_at(x, li, i);
        if (s->state != ES_READY || s->li != li || s->expert != expert || s->refs == 0) continue;
        if (--s->refs == 0 && x->o.naive) { // no cache: the bytes are not kept
            s->state = ES_EMPTY;
            s->expert = -1;
        }
        break;
    }
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

// The router's choices for block layer, in the order they will be acquired: the first N not resident
// are read ahead (a hint for the dense part is dropped: the dense parts stay mapped).
static void ex_prefetch(void *ctx, int layer, const int *experts, int n) {
    ex_t *x = ctx;
    if (layer < x->slice.l0 || layer >= x->slice.l1 || n == 0) return;
    const int li = layer - x->slice.l0;
    pthread_mutex_lock(&x->mu);
    // the hinted experts are spared by every miss until acquired, with or without reads ahead: a
    // token's second expert must not evict its first when both were resident (LRU would, when the
    // previous token used them in the other order)
    for (int i = 0; i < n; i++)
        if (experts[i] >= 0 && experts[i] < x->ne && x->held[(size_t)li * x->ne + experts[i]])
            x->wanted[(size_t)li * x->ne + experts[i]] = 1;
    if (!x->thr_on) {
        pthread_mutex_unlock(&x->mu);
        return;
    }
    int keep = 0; // guesses for this block or one before it are late now
    for (int i = 0; i < x->q_n; i++)
        if (!(x->q[i].spec && x->q[i].li <= li)) x->q[keep++] = x->q[i];
    x->q_n = keep;
    if (x->obs_layer >= 0 && x->obs_layer - x->slice.l0 + 1 <= li) x->obs_layer = -1;
    // a pool keeps a slot for the compute thread's own read (and a pool of one reads nothing ahead)
    const int ahead = x->pool ? (x->pool - 1 < x->k ? x->pool - 1 : x->k) : x->N;
    for (int i = 0, queued = 0; i < n && queued < ahead && x->q_n < EX_QMAX; i++) {
        if (experts[i] < 0 || experts[i] >= x->ne || !x->held[(size_t)li * x->ne + experts[i]]) continue; // another node's
        queued++;
        if (!find(x, li, experts[i])) x->q[x->q_n++] = (ereq_t){.li = li, .expert = experts[i], .spec = false};
    }
    pthread_cond_signal(&x->work);
    pthread_mutex_unlock(&x->mu);
}

static void ex_observe(void *ctx, int layer, const float *obs, int n) {
    ex_t *x = ctx;
    if (!x->thr_on || x->pool || x->N <= x->k || layer + 1 >= x->slice.l1 || layer < x->slice.l0) return; // no room to guess
    pthread_mutex_lock(&x->mu);
    // the share of the time since the last block's observation spent waiting for reads, averaged
    const double now = (double)mlm_now_us() / 1000.0;
    if (x->obs_t > 0 && now > x->obs_t) {
        const double share = (x->st.stall_ms - x->obs_stall) / (now - x->obs_t);
        x->stall_avg = 0.75 * x->stall_avg + 0.25 * (share < 1 ? share : 1);
    }
    x->obs_t = now;
    x->obs_stall = x->st.stall_ms;
    if (x->o.prefetch == EXPERTS_PREFETCH_AUTO && x->stall_avg >= EXPERTS_GUESS_STALL_MAX) { // reading is the bottleneck
        x->st.guesses_paused++;
        pthread_mutex_unlock(&x->mu);
        return;
    }
    if (n > x->obs_cap) n = x->obs_cap; // the first rows say enough
    memcpy(x->obs, obs, (size_t)n * x->hp.n_embd * sizeof *obs);
    x->obs_n = n;
    x->obs_layer = layer;
    pthread_cond_signal(&x->work);
    pthread_mutex_unlock(&x->mu);
}

static void ex_stats(void *ctx, weights_stats_t *out) {
    ex_t *x = ctx;
    pthread_mutex_lock(&x->mu);
    *out = x->st;
    pthread_mutex_unlock(&x->mu);
}

static void ex_describe(void *ctx, char *buf, size_t cap) {
    ex_t *x = ctx;
    int slots = 0; // a block holding fewer experts than N uses that many slots
    for (int li = 0; li < x->nl; li++) slots += x->nheld[li] < x->N ? x->nheld[li] : x->N;
    if (x->ne == 0)
        snprintf(buf, cap, "experts: a dense model, every unit mapped");
    else if (x->o.naive)
        snprintf(buf, cap, "experts: no cache (every use reads the expert, %.1f MiB)", (double)x->slot_bytes / 1048576.0);
    else if (x->pool)
        snprintf(buf, cap, "experts: %d slot%s x %.1f MiB shared by the %d blocks (not one expert per block fits "
                 "the budget; %s, reads ahead %s)", x->pool, x->pool == 1 ? "" : "s", (double)x->slot_bytes / 1048576.0, x->nl,
                 x->o.policy == EXPERTS_LFU ? "lfu" : "lru", x->thr_on && x->pool > 1 ? "on" : "off");
    else
        snprintf(buf, cap, "experts: %d of %d%s per block resident (%s, prefetch %s), %d slots x %.1f MiB",
                 x->N < x->nh_max ? x->N : x->nh_max, x->nh_max, x->nh_max < x->ne ? " placed here" : "",
                 x->o.policy == EXPERTS_LFU ? "lfu" : "lru", x->thr_on ? prefetch_name(x->o.prefetch) : "off", slots,
                 (double)x->slot_bytes / 1048576.0);
}

static void ex_free(void *ctx) {
    ex_t *x = ctx;
    if (!x) return;
    if (x->thr_on) {
        pthread_mutex_lock(&x->mu);
        x->stop = true;
        pthread_cond_signal(&x->work);
        pthread_mutex_unlock(&x->mu);
        pthread_join(x->thr, NULL);
    }
    for (size_t i = 0; x->slots && i < all_slots(x); i++) free(x->slots[i].buf);
    free(x->slots);
    free(x->loc);
    free(x->freq);
    free(x->wanted);
    free(x->held);
    free(x->nheld);
    free(x->obs);
    free(x->xn);
    free(x->xq);
    free(x->logits);
    free(x->sel);
    free(x->selw);
    if (x->fd >= 0) close(x->fd);
    if (x->dfd >= 0) close(x->dfd);
    weights_free(&x->inner);
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->cv);
    pthread_cond_destroy(&x->work);
    free(x);
}

static const struct weights_i experts_iface = {
    .acquire = ex_acquire,
    .release = ex_release,
    .prefetch = ex_prefetch,
    .stats = ex_stats,
    .describe = ex_describe,
    .free = ex_free,
    .observe = ex_observe,
};

// --- setup

// Bytes of the slice's rows of one expert of block il (the three matrices), from the file's tensors.
static int expert_bytes(const weights_params_t *p, int il, uint64_t *out, uint64_t *raw, char *err, size_t errlen) {
    const model_hparams_t *hp = p->hp;
    const struct {
        const char *suffix;
        int64_t cols, rows;
    } m[3] = {{"ffn_gate_exps", hp->n_embd, hp->n_ff}, {"ffn_up_exps", hp->n_embd, hp->n_ff},
              {"ffn_down_exps", hp->n_ff, hp->n_embd}};
    *out = *raw = 0;
    for (int i = 0; i < 3; i++) {
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s.weight", il, m[i].suffix);
        weights_loc_t loc;
        int rc = weights_locate(p, name, m[i].cols, m[i].rows, hp->n_expert, &loc, err, errlen);
        if (rc != 0) return rc;
        if (loc.t && loc.r1 > loc.r0) {
            const size_t len = (size_t)(loc.r1 - loc.r0) * qtype_row_size(loc.t->type, loc.t->ne[0]);
            *out += len >= EX_DIRECT_MIN ? len + 2 * EX_ALIGN : len; // a slot: a direct read's extent, at the most
            *raw += len;
        }
    }
    return 0;
}

// --- public API

experts_opts_t experts_opts_default(void) {
    const char *io = getenv("MESHLM_EXPERTS_IO"); // the process's default (benchmarks compare the two)
    return (experts_opts_t){.per_layer = 0, .naive = false, .policy = EXPERTS_LRU, .prefetch = EXPERTS_PREFETCH_AUTO,
                            .direct = !(io && !strcmp(io, "pread"))};
}

int experts_parse(const char *arg, experts_opts_t *o, char *err, size_t errlen) {
    if (!arg || !*arg) return 0;
    char buf[128];
    if (strlen(arg) >= sizeof buf) return mlm_fail(err, errlen, MLM_EINVAL, "experts: argument too long");
    snprintf(buf, sizeof buf, "%s", arg);
    char *save = NULL;
    for (char *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *v = strchr(kv, '=');
        if (!v) return mlm_fail(err, errlen, MLM_EINVAL, "experts: '%s' is not key=value", kv);
        *v++ = 0;
        if (!strcmp(kv, "n")) {
            char *end;
            long n = strtol(v, &end, 10);
            if (!strcmp(v, "off")) {
                o->naive = true;
            } else if (!strcmp(v, "auto")) {
                o->per_layer = 0;
                o->naive = false;
            } else if (end == v || *end || n < 0 || n > 4096) {
                return mlm_fail(err, errlen, MLM_EINVAL, "experts: n wants a count, auto or off, not '%s'", v);
            } else {
                o->per_layer = (int)n;
                o->naive = false;
            }
        } else if (!strcmp(kv, "policy")) {
            if (!strcmp(v, "lru")) o->policy = EXPERTS_LRU;
            else if (!strcmp(v, "lfu")) o->policy = EXPERTS_LFU;
            else return mlm_fail(err, errlen, MLM_EINVAL, "experts: policy wants lru or lfu, not '%s'", v);
        } else if (!strcmp(kv, "prefetch")) {
            if (!strcmp(v, "on")) o->prefetch = EXPERTS_PREFETCH_ON;
            else if (!strcmp(v, "off")) o->prefetch = EXPERTS_PREFETCH_OFF;
            else if (!strcmp(v, "auto")) o->prefetch = EXPERTS_PREFETCH_AUTO;
            else return mlm_fail(err, errlen, MLM_EINVAL, "experts: prefetch wants on, off or auto, not '%s'", v);
        } else if (!strcmp(kv, "io")) {
            if (!strcmp(v, "direct")) o->direct = true;
            else if (!strcmp(v, "pread")) o->direct = false;
            else return mlm_fail(err, errlen, MLM_EINVAL, "experts: io wants direct or pread, not '%s'", v);
        } else {
            return mlm_fail(err, errlen, MLM_EINVAL, "experts: unknown key '%s' (n, policy, prefetch, io)", kv);
        }
    }
    return 0;
}

int experts_name(const experts_opts_t *o, char *buf, size_t cap) {
    char n[16];
    if (o->naive) snprintf(n, sizeof n, "off");
    else snprintf(n, sizeof n, "%d", o->per_layer);
    int len = snprintf(buf, cap, "experts:n=%s,policy=%s,prefetch=%s%s", n, o->policy == EXPERTS_LFU ? "lfu" : "lru",
                       prefetch_name(o->prefetch), o->direct ? "" : ",io=pread");
    if (len < 0) return 0;
    return (size_t)len < cap ? len : (int)cap - 1;
}

// What the share of p needs besides its experts' slots (*rest: KV cache, activations, dense parts),
// one expert of every block (*one, in slot bytes) and the largest slot (*slot).
static int fit_parts(const weights_params_t *p, uint64_t *rest, uint64_t *one, uint64_t *slot, char *err,
                     size_t errlen) {
    const model_hparams_t *hp = p->hp;
    const int nl = p->slice->l1 - p->slice->l0;
    uint64_t all = 0; // every expert of every block, as the file holds them
    *one = *slot = *rest = 0;
    for (int il = p->slice->l0; il < p->slice->l1; il++) {
        uint64_t b, raw;
        int rc = expert_bytes(p, il, &b, &raw, err, errlen);
        if (rc != 0) return rc;
        *one += b;
        if (b > *slot) *slot = b;
        all += raw * (uint64_t)hp->n_expert;
    }
    weights_params_t q = *p;
    q.budget_bytes = 1ull << 62; // everything resident: what the share weighs
    plan_stream_t st;
    int rc = weights_plan(&q, &st, err, errlen);
    if (rc != 0) return rc;
    *rest = st.resident_bytes > all ? st.resident_bytes - all : 0; // KV, activations, dense parts
    if (p->experts_only) { // a member computing its experts alone: no dense parts, no KV, the activations
        const shard_slice_t *s = p->slice;
        const uint64_t kv = (uint64_t)nl * (uint64_t)(p->n_ctx > 0 ? p->n_ctx : 0) * (uint64_t)(s->kv1 - s->kv0) *
                            (uint64_t)p->hp->head_dim * 4u; // k and v, F16 (as weights_plan counts them)
        *rest = st.fixed_bytes > kv ? st.fixed_bytes - kv : 0;
    }
    return 0;
}

static int fit_check(const weights_params_t *p, char *err, size_t errlen) {
    if (!p || !p->hp || !p->slice || !p->g) return mlm_fail(err, errlen, MLM_EINVAL, "experts: missing parameters");
    if (p->hp->n_expert <= 0) return mlm_fail(err, errlen, MLM_EINVAL, "experts: the model has no experts");
    return 0;
}

int experts_fit(const weights_params_t *p, int *per_layer, char *err, size_t errlen) {
    int rc = fit_check(p, err, errlen);
    if (rc != 0) return rc;
    const model_hparams_t *hp = p->hp;
    *per_layer = hp->n_expert;
    if (!p->budget_bytes) return 0;
    const int nl = p->slice->l1 - p->slice->l0;
    uint64_t rest, one, slot;
    if ((rc = fit_parts(p, &rest, &one, &slot, err, errlen)) != 0) return rc;
    if (nl <= 0 || one == 0) return 0;
    if (p->budget_bytes < rest + one)
        return mlm_fail(err, errlen, MLM_ERANGE,
                        "--mem-budget %.1f MiB is below the %.1f MiB the expert cache needs: dense parts, KV cache "
                        "and activations %.1f MiB, one expert per block %.1f MiB",
                        (double)p->budget_bytes / 1048576.0, (double)(rest + one) / 1048576.0,
                        (double)rest / 1048576.0, (double)one / 1048576.0);
    uint64_t n = (p->budget_bytes - rest) / one;
    *per_layer = n > (uint64_t)hp->n_expert ? hp->n_expert : (int)n;
    return 0;
}

int experts_pool_fit(const weights_params_t *p, int *slots, uint64_t *need, char *err, size_t errlen) {
    int rc = fit_check(p, err, errlen);
    if (rc != 0) return rc;
    *slots = 0;
    uint64_t rest, one, slot;
    if ((rc = fit_parts(p, &rest, &one, &slot, err, errlen)) != 0) return rc;
    if (need) *need = rest + slot;
    if (slot == 0) return mlm_fail(err, errlen, MLM_EINVAL, "experts: the share holds no experts");
    if (p->budget_bytes && p->budget_bytes < rest + slot)
        return mlm_fail(err, errlen, MLM_ERANGE,
                        "--mem-budget %.2f MiB is below the %.2f MiB the experts need read one at a time: dense "
                        "parts, KV cache and activations %.2f MiB, one expert %.2f MiB",
                        (double)p->budget_bytes / 1048576.0, (double)(rest + slot) / 1048576.0,
                        (double)rest / 1048576.0, (double)slot / 1048576.0);
    const int nl = p->slice->l1 - p->slice->l0;
    const uint64_t n = p->budget_bytes ? (p->budget_bytes - rest) / slot : (uint64_t)nl * (uint64_t)p->hp->n_expert;
    const uint64_t most = (uint64_t)(nl > 0 ? nl : 1) * (uint64_t)p->hp->n_expert;
    *slots = (int)(n < most ? n : most);
    return 0;
}

int weights_experts_new(weights_t **out, const weights_params_t *p, const char *arg, char *err, size_t errlen) {
    experts_opts_t o = experts_opts_default();
    int rc = experts_parse(arg, &o, err, errlen);
    if (rc != 0) return rc;
    if (p->slice->cols && p->hp->n_expert > 0)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED,
                        "experts: the expert cache reads row slices; all-reduce mode (--tp-mode allreduce) cuts "
                        "experts by columns");
    if (p->hp->n_expert > 256) return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "experts: more than 256 experts");
    int N = o.per_layer, pool = 0; // a dense model: no slots, every unit comes from the mapping
    if (p->hp->n_expert <= 0) N = 0;
    else if (o.naive) N = 1;
    else if (N == 0 && (rc = experts_fit(p, &N, err, errlen)) != 0) {
        // not one expert per block fits: a pool of slots that every block reads into, as many as fit
        char why[256];
        if (rc != MLM_ERANGE || experts_pool_fit(p, &pool, NULL, why, sizeof why) != 0) return rc;
        N = rc = 0;
        if (err && errlen) err[0] = 0;
    }
    if (N > p->hp->n_expert) N = p->hp->n_expert;
    if (N < 1 && p->hp->n_expert > 0 && !pool) N = 1;
    ex_t *x = calloc(1, sizeof *x);
    if (!x) return MLM_ENOMEM;
    x->fd = x->dfd = -1;
    x->obs_layer = -1;
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    pthread_cond_init(&x->work, NULL);
    x->hp = *p->hp;
    x->slice = *p->slice;
    x->o = o;
    x->kern = p->kern ? p->kern : kernels_best();
    x->nl = p->slice->l1 - p->slice->l0;
    x->ne = p->hp->n_expert;
    x->k = p->hp->n_expert_used;
    x->N = N;
    x->pool = pool;
    weights_params_t ip = *p;
    ip.repack = false;      // the experts are computed on the file's layout, so is everything else
    ip.budget_bytes = 0;
    rc = weights_mmap_new(&x->inner, &ip, "", err, errlen);
    if (rc == 0 && (x->fd = open(gguf_path(p->g), O_RDONLY | O_CLOEXEC)) < 0)
        rc = mlm_fail(err, errlen, MLM_EIO, "experts: cannot open %s: %s", gguf_path(p->g), strerror(errno));
    if (rc == 0 && o.direct) x->dfd = open(gguf_path(p->g), O_RDONLY | O_CLOEXEC | O_DIRECT); // -1: buffered
    const size_t nle = (size_t)(x->nl > 0 ? x->nl : 1) * (size_t)(x->ne > 0 ? x->ne : 1);
    if (rc == 0) {
        x->loc = calloc(nle, sizeof *x->loc);
        x->slots = calloc(pool ? (size_t)pool : (size_t)(x->nl > 0 ? x->nl : 1) * (N > 0 ? N : 1), sizeof *x->slots);
        x->freq = calloc(nle, sizeof *x->freq);
        x->wanted = calloc(nle, 1);
        x->held = calloc(nle, 1);
        x->nheld = calloc((size_t)(x->nl > 0 ? x->nl : 1), sizeof *x->nheld);
        if (!x->loc || !x->slots || !x->freq || !x->wanted || !x->held || !x->nheld) rc = MLM_ENOMEM;
    }
    const uint8_t *base = gguf_base(p->g);
    const size_t fsize = gguf_file_size(p->g);
    uint64_t all_experts = 0;
    for (size_t i = 0; rc == 0 && i < all_slots(x); i++) x->slots[i].expert = x->slots[i].li = -1;
    for (int li = 0; rc == 0 && li < x->nl; li++) {
        for (int e = 0; rc == 0 && e < x->ne; e++) {
            const layer_weights_t *X;
            if ((rc = weights_acquire(x->inner, x->slice.l0 + li, e, &X)) == MLM_ENOTFOUND) { // placed on another node
                rc = 0;
                continue;
            }
            if (rc != 0) {
                mlm_fail(err, errlen, rc, "experts: block %d expert %d: %s", x->slice.l0 + li, e, mlm_strerror(rc));
                break;
            }
            eloc_t *L = &x->loc[(size_t)li * x->ne + e];
            L->tmpl = *X;
            const mm_weight_t *mats[3] = {&X->w_gate, &X->w_up, &X->w_down};
            size_t sum = 0, raw = 0;
            for (int m = 0; m < 3; m++) {
                if (mats[m]->rows <= 0) continue;
                const uint8_t *d = mats[m]->data;
                L->len[m] = (size_t)mats[m]->rows * mats[m]->row_bytes;
                if (mats[m]->packed || d < base || d + L->len[m] > base + fsize) {
                    rc = mlm_fail(err, errlen, MLM_EUNSUPPORTED, "experts: block %d expert %d is not in the file's layout",
                                  x->slice.l0 + li, e);
                    break;
                }
                L->off[m] = (uint64_t)(d - base);
                sum += ext_len(L->off[m], L->len[m]); // room for a direct read's aligned extent
                raw += L->len[m];
            }
            weights_release(x->inner, x->slice.l0 + li, e);
            x->held[(size_t)li * x->ne + e] = 1;
            if (++x->nheld[li] > x->nh_max) x->nh_max = x->nheld[li];
            if (sum > x->slot_bytes) x->slot_bytes = sum;
            all_experts += raw;
        }
    }
    if (rc == 0 && x->dfd >= 0 && x->nl > 0 && x->ne > 0 && !direct_works(x))
        close(x->dfd), x->dfd = -1; // opened, but the file system refuses direct reads: buffered
    if (rc == 0) {
        weights_stats_t is;
        weights_stats(x->inner, &is);
        x->dense_bytes = is.bytes_held > all_experts ? is.bytes_held - all_experts : 0;
        x->st.bytes_held = x->st.bytes_peak = x->dense_bytes;
    }
    bool spill = false; // a block holds more experts than it has slots
    for (int li = 0; rc == 0 && li < x->nl; li++) spill |= x->nheld[li] > N;
    for (int li = 0; rc == 0 && !o.naive && li < x->nl; li++) // a block whose experts all fit: read them now
        for (int e = 0, i = 0; rc == 0 && x->nheld[li] <= N && e < x->ne; e++) {
            if (!x->held[(size_t)li * x->ne + e]) continue;
            eslot_t *s = slot_at(x, li, i++);
            claim(x, s, li, e, false);
            if ((rc = read_expert(x, s, li, e)) != 0) {
                s->state = ES_EMPTY;
                s->expert = -1;
                mlm_fail(err, errlen, rc, "experts: reading block %d expert %d of %s failed", x->slice.l0 + li, e,
                         gguf_path(p->g));
                break;
            }
            s->state = ES_READY; // (a one-time load, not counted as reading: "window" does not count its pinned units)
            s->last_use = ++x->tick;
        }
    if (rc == 0 && !o.naive && o.prefetch && spill && x->ne > 0) { // the background reader (hinted choices, guesses)
        const int B = 64; // rows of an observation kept (a chunk's first 64 tokens)
        const size_t arb = (size_t)x->hp.n_embd * sizeof(float) + 256; // F32 is the widest activation row
        x->obs_cap = B;
        x->obs = malloc((size_t)B * x->hp.n_embd * sizeof(float));
        x->xn = malloc((size_t)B * x->hp.n_embd * sizeof(float));
        x->xq = malloc((size_t)B * arb);
        x->logits = malloc((size_t)B * x->ne * sizeof(float));
        x->sel = malloc((size_t)x->k * sizeof(int));
        x->selw = malloc((size_t)x->k * sizeof(float));
        if (!x->obs || !x->xn || !x->xq || !x->logits || !x->sel || !x->selw) rc = MLM_ENOMEM;
        else if (pthread_create(&x->thr, NULL, bg_main, x) != 0) rc = mlm_fail(err, errlen, MLM_ENOMEM, "experts: no thread");
        else x->thr_on = true;
    }
    if (rc != 0) {
        ex_free(x);
        return rc;
    }
    const weights_info_t info = weights_info_for(p->hp, p->slice);
    *out = weights_wrap(&experts_iface, x, "experts", &info); // frees x when it fails
    return *out ? 0 : MLM_ENOMEM;
}
