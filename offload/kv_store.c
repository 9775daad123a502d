// Paged KV storage: RAM blocks under a cap, the rest in an unlinked file, an LRU read cache.
#include "offload/kv_store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/err.h"

// --- types

typedef struct {
    uint8_t *ram;       // (2, block_pos, row_bytes) k rows then v rows, or NULL when spilled / free
    int64_t slot;       // file slot when spilled (-1 otherwise)
} block_t;

typedef struct {
    int n_ctx;          // 0 = not allocated
    int n_blocks;       // blocks per layer: ceil(n_ctx / block_pos)
    int32_t *table;     // (n_layer, n_blocks) block ids, -1 = not written yet
} seq_t;

typedef struct {
    int32_t block;      // block id held, -1 = empty
    uint64_t stamp;     // last use (LRU)
    uint8_t *buf;       // (block_bytes)
} cache_ent_t;

struct kv_store {
    kv_store_params_t p;    // copy (dir not kept)
    size_t block_bytes;     // 2 * block_pos * row_bytes
    seq_t *seqs;            // (n_seq_max)
    block_t *blocks;        // (n_blocks_cap) every block id ever made
    int n_blocks, n_blocks_cap;
    int32_t *free_ids;      // (n_blocks_cap) block ids free for reuse
    int n_free_ids;
    int fd;                 // the file tier (-1 without a dir)
    int64_t *free_slots;    // (slots_cap) file slots free for reuse
    int n_free_slots, slots_cap;
    int64_t n_slots;        // slots the file has grown to
    cache_ent_t *cache;     // (cache_blocks) allocated on first spill
    uint64_t tick;          // LRU clock
    kv_store_stats_t st;
};

// --- helpers

static int pread_all(int fd, void *buf, size_t len, off_t off) {
    uint8_t *b = buf;
    while (len > 0) {
        ssize_t r = pread(fd, b, len, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return MLM_EIO;
        b += r, len -= (size_t)r, off += r;
    }
    return 0;
}

static int pwrite_all(int fd, const void *buf, size_t len, off_t off) {
    const uint8_t *b = buf;
    while (len > 0) {
        ssize_t r = pwrite(fd, b, len, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return MLM_EIO;
        b += r, len -= (size_t)r, off += r;
    }
    return 0;
}

// A new block in RAM (under the cap) or in the file: its id, or a negative MLM_ code.
static int32_t block_alloc(kv_store_t *s) {
    int32_t id;
    if (s->n_free_ids > 0) id = s->free_ids[--s->n_free_ids];
    else {
        if (s->n_blocks == s->n_blocks_cap) {
            const int cap = s->n_blocks_cap ? 2 * s->n_blocks_cap : 64;
            block_t *nb = realloc(s->blocks, (size_t)cap * sizeof *nb);
            if (!nb) return MLM_ENOMEM;
            s->blocks = nb;
            int32_t *nf = realloc(s->free_ids, (size_t)cap * sizeof *nf);
            if (!nf) return MLM_ENOMEM;
            s->free_ids = nf;
            s->n_blocks_cap = cap;
        }
        id = s->n_blocks++;
    }
    block_t *b = &s->blocks[id];
    b->ram = NULL;
    b->slot = -1;
    if (!s->p.ram_bytes || s->st.bytes_ram + s->block_bytes <= s->p.ram_bytes) {
        b->ram = calloc(1, s->block_bytes);
        if (!b->ram) goto fail;
        s->st.bytes_ram += s->block_bytes;
        s->st.blocks_ram++;
        return id;
    }
    if (s->fd < 0) {
        s->free_ids[s->n_free_ids++] = id;
        return MLM_EFULL;
    }
    if (!s->cache) {
        const int nc = s->p.cache_blocks;
        s->cache = calloc((size_t)nc, sizeof *s->cache);
        if (!s->cache) goto fail;
        for (int i = 0; i < nc; i++) {
            s->cache[i].block = -1;
            if (!(s->cache[i].buf = malloc(s->block_bytes))) goto fail;
        }
        s->st.cache_bytes = (uint64_t)nc * s->block_bytes;
    }
    if (s->n_free_slots > 0) b->slot = s->free_slots[--s->n_free_slots];
    else { // the file grows by a whole block, so a block read before its last row is written is not short
        if (ftruncate(s->fd, (off_t)((s->n_slots + 1) * (int64_t)s->block_bytes)) != 0) {
            s->free_ids[s->n_free_ids++] = id;
            return MLM_EIO;
        }
        b->slot = s->n_slots++;
    }
    s->st.bytes_file += s->block_bytes;
    s->st.blocks_file++;
    return id;
fail:
    s->free_ids[s->n_free_ids++] = id;
    return MLM_ENOMEM;
}

static void cache_forget(kv_store_t *s, int32_t id) {
    for (int i = 0; s->cache && i < s->p.cache_blocks; i++)
        if (s->cache[i].block == id) s->cache[i].block = -1;
}

static void block_free(kv_store_t *s, int32_t id) {
    block_t *b = &s->blocks[id];
    if (b->ram) {
        free(b->ram);
        s->st.bytes_ram -= s->block_bytes;
        s->st.blocks_ram--;
    } else if (b->slot >= 0) {
        cache_forget(s, id);
        if (s->n_free_slots == s->slots_cap) {
            const int cap = s->slots_cap ? 2 * s->slots_cap : 64;
            int64_t *nf = realloc(s->free_slots, (size_t)cap * sizeof *nf);
            if (nf) s->free_slots = nf, s->slots_cap = cap;
        }
        if (s->n_free_slots < s->slots_cap) s->free_slots[s->n_free_slots++] = b->slot; // else the slot leaks
        s->st.bytes_file -= s->block_bytes;
        s->st.blocks_file--;
    }
    b->ram = NULL;
    b->slot = -1;
    s->free_ids[s->n_free_ids++] = id;
}

// The bytes of spilled block id, through the cache: a pointer into a cache entry, or NULL (*rc set).
static const uint8_t *cached(kv_store_t *s, int32_t id, int *rc) {
    cache_ent_t *victim = NULL; // an empty entry, else the least recently used
    for (int i = 0; i < s->p.cache_blocks; i++) {
        cache_ent_t *e = &s->cache[i];
        if (e->block == id) {
            e->stamp = ++s->tick;
            s->st.cache_hits++;
            return e->buf;
        }
        if (!victim || (victim->block >= 0 && (e->block < 0 || e->stamp < victim->stamp))) victim = e;
    }
    victim->block = -1;
    *rc = pread_all(s->fd, victim->buf, s->block_bytes, (off_t)(s->blocks[id].slot * (int64_t)s->block_bytes));
    if (*rc != 0) return NULL;
    s->st.bytes_read += s->block_bytes;
    s->st.cache_misses++;
    victim->block = id;
    victim->stamp = ++s->tick;
    return victim->buf;
}

// Sequence seq with a valid layer, or NULL (*rc set).
static seq_t *seq_get(kv_store_t *s, int seq, int layer, int *rc) {
    if (!s || seq < 0 || seq >= s->p.n_seq_max || layer < 0 || layer >= s->p.n_layer) {
        *rc = MLM_EINVAL;
        return NULL;
    }
    if (!s->seqs[seq].n_ctx) {
        *rc = MLM_ESTATE;
        return NULL;
    }
    return &s->seqs[seq];
}

// --- public API

int kv_store_new(kv_store_t **out, const kv_store_params_t *p, char *err, size_t errlen) {
    *out = NULL;
    if (!p || p->n_layer < 1 || p->row_bytes < 1 || p->block_pos < 0 || p->cache_blocks < 0 || p->n_seq_max < 0)
        return mlm_fail(err, errlen, MLM_EINVAL, "kv store: bad shape");
    kv_store_t *s = calloc(1, sizeof *s);
    if (!s) return MLM_ENOMEM;
    s->p = *p;
    s->p.dir = NULL;
    if (!s->p.block_pos) s->p.block_pos = KV_STORE_BLOCK_POS;
    if (!s->p.cache_blocks) s->p.cache_blocks = KV_STORE_CACHE_BLOCKS;
    if (!s->p.n_seq_max) s->p.n_seq_max = 1;
    s->block_bytes = 2 * (size_t)s->p.block_pos * p->row_bytes;
    s->fd = -1;
    s->seqs = calloc((size_t)s->p.n_seq_max, sizeof *s->seqs);
    if (!s->seqs) {
        kv_store_destroy(&s);
        return MLM_ENOMEM;
    }
    if (p->dir) {
        char path[4096];
        if (snprintf(path, sizeof path, "%s/meshlm-kv-XXXXXX", p->dir) >= (int)sizeof path) {
            kv_store_destroy(&s);
            return mlm_fail(err, errlen, MLM_EINVAL, "kv store: directory name too long");
        }
        s->fd = mkstemp(path);
        if (s->fd < 0) {
            const int e = errno;
            kv_store_destroy(&s);
            return mlm_fail(err, errlen, MLM_EIO, "kv store: cannot create a file in %s: %s", p->dir, strerror(e));
        }
        unlink(path); // the file lives as long as the descriptor: nothing is left after a crash
    }
    *out = s;
    return 0;
}

void kv_store_destroy(kv_store_t **self_p) {
    if (!self_p || !*self_p) return;
    kv_store_t *s = *self_p;
    for (int q = 0; s->seqs && q < s->p.n_seq_max; q++) kv_store_seq_drop(s, q);
    for (int i = 0; s->cache && i < s->p.cache_blocks; i++) free(s->cache[i].buf);
    free(s->cache);
    free(s->seqs);
    free(s->blocks);
    free(s->free_ids);
    free(s->free_slots);
    if (s->fd >= 0) close(s->fd);
    free(s);
    *self_p = NULL;
}

int kv_store_seq_new(kv_store_t *s, int seq, int n_ctx) {
    if (!s || seq < 0 || seq >= s->p.n_seq_max || n_ctx < 1) return MLM_EINVAL;
    seq_t *q = &s->seqs[seq];
    if (q->n_ctx) return MLM_ESTATE;
    q->n_blocks = (n_ctx + s->p.block_pos - 1) / s->p.block_pos;
    q->table = malloc((size_t)s->p.n_layer * (size_t)q->n_blocks * sizeof *q->table);
    if (!q->table) return MLM_ENOMEM;
    for (size_t i = 0; i < (size_t)s->p.n_layer * (size_t)q->n_blocks; i++) q->table[i] = -1;
    q->n_ctx = n_ctx;
    return 0;
}

void kv_store_seq_drop(kv_store_t *s, int seq) {
    if (!s || seq < 0 || seq >= s->p.n_seq_max || !s->seqs[seq].n_ctx) return;
    seq_t *q = &s->seqs[seq];
    for (size_t i = 0; i < (size_t)s->p.n_layer * (size_t)q->n_blocks; i++)
        if (q->table[i] >= 0) block_free(s, q->table[i]);
    free(q->table);
    memset(q, 0, sizeof *q);
}

int kv_store_write(kv_store_t *s, int seq, int layer, int pos, const void *k, const void *v, int n) {
    int rc = 0;
    seq_t *q = seq_get(s, seq, layer, &rc);
    if (!q) return rc;
    if (n < 1 || pos < 0 || pos + n > q->n_ctx || !k || !v) return MLM_EINVAL;
    const size_t rb = s->p.row_bytes, bp = (size_t)s->p.block_pos;
    const uint8_t *kb = k, *vb = v;
    for (int done = 0; done < n;) {
        const int at = pos + done, bi = at / s->p.block_pos, r0 = at % s->p.block_pos;
        const int cnt = (int)bp - r0 < n - done ? (int)bp - r0 : n - done;
        int32_t *slot = &q->table[(size_t)layer * (size_t)q->n_blocks + (size_t)bi];
        if (*slot < 0) {
            const int32_t id = block_alloc(s);
            if (id < 0) return id;
            *slot = id;
        }
        block_t *b = &s->blocks[*slot];
        const size_t ko = (size_t)r0 * rb, vo = (bp + (size_t)r0) * rb, len = (size_t)cnt * rb;
        if (b->ram) {
            memcpy(b->ram + ko, kb + (size_t)done * rb, len);
            memcpy(b->ram + vo, vb + (size_t)done * rb, len);
        } else {
            const off_t base = (off_t)(b->slot * (int64_t)s->block_bytes);
            if ((rc = pwrite_all(s->fd, kb + (size_t)done * rb, len, base + (off_t)ko)) != 0 ||
                (rc = pwrite_all(s->fd, vb + (size_t)done * rb, len, base + (off_t)vo)) != 0)
                return rc;
            s->st.bytes_written += 2 * len;
            for (int i = 0; s->cache && i < s->p.cache_blocks; i++) // a cached copy stays current
                if (s->cache[i].block == *slot) {
                    memcpy(s->cache[i].buf + ko, kb + (size_t)done * rb, len);
                    memcpy(s->cache[i].buf + vo, vb + (size_t)done * rb, len);
                }
        }
        done += cnt;
    }
    return 0;
}

int kv_store_read(kv_store_t *s, int seq, int layer, int pos0, int n, void *k, void *v) {
    int rc = 0;
    seq_t *q = seq_get(s, seq, layer, &rc);
    if (!q) return rc;
    if (n < 1 || pos0 < 0 || pos0 + n > q->n_ctx || !k || !v) return MLM_EINVAL;
    const size_t rb = s->p.row_bytes, bp = (size_t)s->p.block_pos;
    uint8_t *kb = k, *vb = v;
    for (int done = 0; done < n;) {
        const int at = pos0 + done, bi = at / s->p.block_pos, r0 = at % s->p.block_pos;
        const int cnt = (int)bp - r0 < n - done ? (int)bp - r0 : n - done;
        const int32_t id = q->table[(size_t)layer * (size_t)q->n_blocks + (size_t)bi];
        if (id < 0) return MLM_ERANGE;
        const uint8_t *src = s->blocks[id].ram;
        if (!src && !(src = cached(s, id, &rc))) return rc;
        memcpy(kb + (size_t)done * rb, src + (size_t)r0 * rb, (size_t)cnt * rb);
        memcpy(vb + (size_t)done * rb, src + (bp + (size_t)r0) * rb, (size_t)cnt * rb);
        done += cnt;
    }
    return 0;
}

void kv_store_stats(const kv_store_t *s, kv_store_stats_t *out) {
    memset(out, 0, sizeof *out);
    if (s) *out = s->st;
}

size_t kv_store_block_bytes(const kv_store_t *s) { return s->block_bytes; }
