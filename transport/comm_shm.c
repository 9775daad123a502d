// Shared-memory all-gathers and all-reduces for a group of ranks on one host (see comm_shm.h).
#include "transport/comm_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "core/rng.h"
#include "transport/comm_zmq.h"

// --- types

#define SHM_MAGIC 0x4d53484du   // "MHSM"
#define SHM_VERSION 1
#define SHM_LINE 64
#define SHM_NAME_MAX 64
#define SHM_SPIN_US 50          // a waiter spins this long,
#define SHM_YIELD_US 2000       // then spins yielding the core until this long,
#define SHM_NAP_US 1000         // then sleeps at most this long at a time
#define SHM_CHECK_US 5000       // and asks the comm about lost peers this often

// The segment's first line.
typedef struct {
    uint32_t magic;             // SHM_MAGIC
    uint32_t n;                 // members
    uint64_t nonce;             // the offer's, so a member knows it mapped this group's segment
    uint64_t slot_bytes;        // bytes per slot (a multiple of SHM_LINE)
    _Atomic uint32_t abandoned; // set by a member that left a collective on an error: every member then
                                // leaves its own (MLM_EPEER) instead of waiting for a block never written
} shm_head_t;

// One member's line: how many collectives it has published, and whether anyone sleeps on that.
typedef struct {
    _Atomic uint32_t seq;       // collectives whose block this member has written (futex word)
    _Atomic uint32_t sleepers;  // members waiting on seq in the kernel
    uint8_t pad[SHM_LINE - 8];
} shm_ctl_t;

_Static_assert(sizeof(shm_ctl_t) == SHM_LINE, "one cache line per member");
_Static_assert(sizeof(shm_head_t) <= SHM_LINE, "the head fits its line");

// The offer the first member sends the others (little-endian, as every supported machine is).
typedef struct {
    uint32_t magic;             // SHM_MAGIC
    uint32_t version;           // SHM_VERSION
    uint32_t ok;                // 1: a segment is offered; 0: the group keeps to the comm
    uint32_t pad;
    uint64_t nonce;
    uint64_t slot_bytes;
    char name[SHM_NAME_MAX];    // shm_open name, NUL-terminated
} shm_offer_t;

struct comm_shm {
    comm_t *comm;               // the group's plan data plane (borrowed): lost peers are learned there
    int first, n, me;           // ranks [first, first + n), this member's index
    size_t slot_bytes;
    uint8_t *base;              // the mapping
    size_t map_bytes;
    shm_ctl_t *ctl;             // (n) the members' lines
    uint8_t *slots;             // (2, n, slot_bytes) even and odd collectives
    uint32_t gen;               // collectives made so far
    float *acc;                 // (slot_bytes / 4) all-reduce result before it lands in buf
};

// --- helpers

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void futex_wait(_Atomic uint32_t *word, uint32_t val, long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, val, &ts, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);
}

static bool reached(uint32_t seq, uint32_t want) { return (int32_t)(seq - want) >= 0; }

static uint8_t *slot(const comm_shm_t *s, uint32_t gen, int m) {
    return s->slots + ((size_t)(gen & 1u) * (size_t)s->n + (size_t)m) * s->slot_bytes;
}

// This member's block of collective gen is written: say so, and wake whoever sleeps on it.
static void publish(comm_shm_t *s, uint32_t gen) {
    shm_ctl_t *c = &s->ctl[s->me];
    atomic_store(&c->seq, gen); // sequentially consistent, against the sleepers count below
    if (atomic_load(&c->sleepers)) futex_wake_all(&c->seq);
}

static bool abandoned(const comm_shm_t *s) {
    return atomic_load_explicit(&((shm_head_t *)s->base)->abandoned, memory_order_acquire) != 0;
}

// A collective of this member failed (rc): the group's collectives are over for this segment. Says so
// and wakes every sleeper, so no member waits for a block that will never come. Returns rc.
static int abandon(comm_shm_t *s, int rc) {
    atomic_store(&((shm_head_t *)s->base)->abandoned, 1);
    for (int m = 0; m < s->n; m++) futex_wake_all(&s->ctl[m].seq);
    return rc;
}

// Waits until member m has published collective gen: spins, then spins yielding the core, then sleeps
// on its word, asking the comm now and then whether a peer was lost. 0, MLM_ETIMEOUT or MLM_EPEER (a
// peer lost, or another member left the collective: abandoned).
static int wait_for(comm_shm_t *s, int m, uint32_t gen, int64_t dl) {
    shm_ctl_t *c = &s->ctl[m];
    if (reached(atomic_load_explicit(&c->seq, memory_order_acquire), gen)) return 0;
    const int64_t t0 = mlm_now_us();
    for (int64_t t = t0; t - t0 < SHM_YIELD_US; t = mlm_now_us()) {
        for (int i = 0; i < 64; i++) {
            if (reached(atomic_load_explicit(&c->seq, memory_order_acquire), gen)) return 0;
            cpu_relax();
        }
        if (abandoned(s)) return MLM_EPEER;
        if (t - t0 >= SHM_SPIN_US) sched_yield(); // a thread that shares this core runs first
    }
    int64_t check = t0 + SHM_CHECK_US;
    for (;;) {
        atomic_fetch_add(&c->sleepers, 1);
        uint32_t v = atomic_load(&c->seq);
        if (!reached(v, gen) && !abandoned(s)) futex_wait(&c->seq, v, SHM_NAP_US);
        atomic_fetch_sub(&c->sleepers, 1);
        if (reached(atomic_load_explicit(&c->seq, memory_order_acquire), gen)) return 0;
        if (abandoned(s)) return MLM_EPEER;
        const int64_t now = mlm_now_us();
        if (dl >= 0 && now >= dl) return MLM_ETIMEOUT;
        if (now >= check) {
            check = now + SHM_CHECK_US;
            if (comm_zmq_poll_lost(s->comm, s->first + m)) return MLM_EPEER;
        }
    }
}

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static size_t segment_bytes(int n, size_t slot_bytes) {
    return round_up(SHM_LINE + (size_t)n * SHM_LINE, 4096) + 2u * (size_t)n * slot_bytes;
}

// Maps the segment open at fd. 0 or MLM_EIO.
static int map_segment(comm_shm_t *s, int fd) {
    s->map_bytes = segment_bytes(s->n, s->slot_bytes);
    void *p = mmap(NULL, s->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return MLM_EIO;
    s->base = p;
    s->ctl = (shm_ctl_t *)(s->base + SHM_LINE);
    s->slots = s->base + round_up(SHM_LINE + (size_t)s->n * SHM_LINE, 4096);
    return 0;
}

// The first member: a new segment under a fresh name (*fd open), its head written. 0 or MLM_EIO.
static int create_segment(comm_shm_t *s, shm_offer_t *o, char *err, size_t errlen) {
    uint64_t seed = (uint64_t)mlm_now_us() ^ ((uint64_t)getpid() << 32);
    o->nonce = mlm_rng_next(&seed) | 1u;
    snprintf(o->name, sizeof o->name, "/meshlm-%d-%016llx", (int)getpid(), (unsigned long long)o->nonce);
    int fd = shm_open(o->name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return mlm_fail(err, errlen, MLM_EIO, "shm_open %s: %s", o->name, strerror(errno));
    int rc = 0;
    if (ftruncate(fd, (off_t)segment_bytes(s->n, s->slot_bytes)) != 0 || map_segment(s, fd) != 0)
        rc = mlm_fail(err, errlen, MLM_EIO, "shared segment %s: %s", o->name, strerror(errno));
    close(fd);
    if (rc != 0) {
        shm_unlink(o->name);
        return rc;
    }
    shm_head_t *h = (shm_head_t *)s->base;
    *h = (shm_head_t){SHM_MAGIC, (uint32_t)s->n, o->nonce, s->slot_bytes, 0};
    return 0;
}

// Another member: maps the offered segment and checks it is this group's. true when attached.
static bool attach_segment(comm_shm_t *s, const shm_offer_t *o) {
    if (memchr(o->name, 0, sizeof o->name) == NULL || o->slot_bytes != s->slot_bytes) return false;
    int fd = shm_open(o->name, O_RDWR, 0600);
    if (fd < 0) return false;
    bool ok = map_segment(s, fd) == 0;
    close(fd);
    if (!ok) return false;
    const shm_head_t *h = (const shm_head_t *)s->base;
    if (h->magic == SHM_MAGIC && h->n == (uint32_t)s->n && h->nonce == o->nonce && h->slot_bytes == s->slot_bytes)
        return true;
    munmap(s->base, s->map_bytes);
    s->base = NULL;
    return false;
}

static int recv_exact(comm_t *c, int peer, void *dst, size_t len, int64_t dl) {
    comm_msg_t m;
    int rc = comm_recv(c, peer, &m, NULL, mlm_left_ms(dl));
    if (rc != 0) return rc;
    if (m.n != 1 || m.len[0] != len) rc = MLM_EPROTO;
    else memcpy(dst, m.data[0], len);
    comm_msg_free(&m);
    return rc;
}

// --- public API

int comm_shm_open(comm_shm_t **out, comm_t *c, int first, int n, size_t slot_bytes, bool want, int timeout_ms,
                  char *err, size_t errlen) {
    *out = NULL;
    const int me = comm_rank(c) - first;
    if (n < 2 || me < 0 || me >= n || first + n > comm_size(c) || slot_bytes == 0)
        return mlm_fail(err, errlen, MLM_EINVAL, "shared segment for ranks %d-%d: rank %d is not in it", first,
                        first + n - 1, comm_rank(c));
    comm_shm_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    *s = (comm_shm_t){.comm = c, .first = first, .n = n, .me = me, .slot_bytes = round_up(slot_bytes, SHM_LINE)};
    const int64_t dl = mlm_deadline(timeout_ms);
    int rc = 0;
    bool all = false;
    if (me == 0) {
        shm_offer_t o = {.magic = SHM_MAGIC, .version = SHM_VERSION, .slot_bytes = s->slot_bytes};
        char why[160] = "";
        o.ok = want && create_segment(s, &o, why, sizeof why) == 0;
        for (int r = 1; r < n && rc == 0; r++) rc = comm_send1(c, first + r, &o, sizeof o, mlm_left_ms(dl));
        all = o.ok;
        for (int r = 1; o.ok && r < n && rc == 0; r++) {
            uint32_t yes = 0;
            rc = recv_exact(c, first + r, &yes, sizeof yes, dl);
            all = all && yes == 1;
            if (rc != 0) snprintf(err, errlen, "shared segment: rank %d did not answer", first + r);
        }
        if (o.ok) shm_unlink(o.name); // every member that could map it has: it lives while mapped
        uint32_t go = all;
        for (int r = 1; o.ok && r < n && rc == 0; r++) rc = comm_send1(c, first + r, &go, sizeof go, mlm_left_ms(dl));
    } else {
        shm_offer_t o;
        rc = recv_exact(c, first, &o, sizeof o, dl);
        if (rc == 0 && (o.magic != SHM_MAGIC || o.version != SHM_VERSION)) rc = MLM_EPROTO;
        if (rc == 0 && o.ok) {
            uint32_t yes = want && attach_segment(s, &o);
            rc = comm_send1(c, first, &yes, sizeof yes, mlm_left_ms(dl));
            uint32_t go = 0;
            if (rc == 0) rc = recv_exact(c, first, &go, sizeof go, dl);
            all = rc == 0 && go == 1 && s->base;
        }
        if (rc != 0) snprintf(err, errlen, "shared segment: no offer or verdict from rank %d", first);
    }
    if (rc == 0 && all && !(s->acc = malloc(s->slot_bytes))) rc = MLM_ENOMEM;
    if (rc != 0 || !all) {
        comm_shm_destroy(&s);
        return rc;
    }
    *out = s;
    return 0;
}

void comm_shm_destroy(comm_shm_t **self_p) {
    comm_shm_t *s = self_p ? *self_p : NULL;
    if (!s) return;
    if (s->base) munmap(s->base, s->map_bytes);
    free(s->acc);
    free(s);
    *self_p = NULL;
}

bool comm_shm_fits(const comm_shm_t *s, size_t len) { return s && len <= s->slot_bytes; }

int comm_shm_allgatherv(comm_shm_t *s, const void *in, size_t len, void *out, const size_t *lens, int timeout_ms) {
    if (len != lens[s->me]) return MLM_EINVAL;
    for (int r = 0; r < s->n; r++)
        if (lens[r] > s->slot_bytes) return MLM_ERANGE;
    if (abandoned(s)) return MLM_EPEER;
    const int64_t dl = mlm_deadline(timeout_ms);
    const uint32_t gen = ++s->gen;
    if (len) memcpy(slot(s, gen, s->me), in, len);
    publish(s, gen);
    size_t off = 0;
    for (int r = 0; r < s->n; r++) {
        if (r == s->me) {
            if (len) memcpy((uint8_t *)out + off, in, len);
        } else {
            int rc = wait_for(s, r, gen, dl);
            if (rc != 0) return abandon(s, rc);
            if (lens[r]) memcpy((uint8_t *)out + off, slot(s, gen, r), lens[r]);
        }
        off += lens[r];
    }
    return 0;
}

int comm_shm_allreduce(comm_shm_t *s, float *buf, size_t n, comm_algo_t algo, int timeout_ms) {
    if (n * sizeof(float) > s->slot_bytes) return MLM_ERANGE;
    if (abandoned(s)) return MLM_EPEER;
    const int64_t dl = mlm_deadline(timeout_ms);
    const uint32_t gen = ++s->gen;
    const int N = s->n;
    memcpy(slot(s, gen, s->me), buf, n * sizeof(float));
    publish(s, gen);
    for (int r = 0; r < N; r++) {
        if (r == s->me) continue;
        int rc = wait_for(s, r, gen, dl);
        if (rc != 0) return abandon(s, rc);
    }
    // STAR folds every element from member 0; RING folds chunk k from member k (comm.c's orders;
    // for two members both are x0 + x1).
    const bool ring = algo == COMM_ALGO_RING && N > 2;
    for (int k = 0; k < (ring ? N : 1); k++) {
        const size_t lo = ring ? n * (size_t)k / (size_t)N : 0, hi = ring ? n * (size_t)(k + 1) / (size_t)N : n;
        memcpy(s->acc + lo, (const float *)slot(s, gen, k) + lo, (hi - lo) * sizeof(float));
        for (int j = 1; j < N; j++) {
            const float *x = (const float *)slot(s, gen, (k + j) % N);
            for (size_t i = lo; i < hi; i++) s->acc[i] += x[i];
        }
    }
    memcpy(buf, s->acc, n * sizeof(float));
    // A member may overwrite this collective's slot two collectives on, once it has seen everyone's
    // next one; the sums above are done before this member publishes that.
    return 0;
}
