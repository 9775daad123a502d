// Paged KV storage: fixed-size blocks of k and v rows, a block table per (sequence, layer), blocks in
// RAM up to a byte cap and past it in one file of a directory, read back through a small RAM cache.
#ifndef MESHLM_OFFLOAD_KV_STORE_H
#define MESHLM_OFFLOAD_KV_STORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int n_layer;          // layers of every sequence
    size_t row_bytes;     // bytes of one k row (a v row is as long), in the cache's element type
    int block_pos;        // positions per block (0 = KV_STORE_BLOCK_POS)
    uint64_t ram_bytes;   // bytes of blocks kept in RAM (0 = no cap: nothing spills); a block that
                          // would pass it goes to the file tier
    const char *dir;      // the file tier's directory (NULL = none: a block past the cap is MLM_EFULL)
    int cache_blocks;     // spilled blocks the read cache holds (0 = KV_STORE_CACHE_BLOCKS)
    int n_seq_max;        // sequence ids [0, n_seq_max) (0 = 1)
} kv_store_params_t;

#define KV_STORE_BLOCK_POS 64
#define KV_STORE_CACHE_BLOCKS 8

typedef struct {
    uint64_t blocks_ram, blocks_file; // blocks in each tier now
    uint64_t bytes_ram;               // bytes of RAM blocks now (the cache not counted)
    uint64_t bytes_file;              // bytes of spilled blocks now
    uint64_t cache_bytes;             // bytes of the read cache (allocated on first spill)
    uint64_t bytes_read;              // bytes read from the file since creation
    uint64_t bytes_written;           // bytes written to it
    uint64_t cache_hits, cache_misses; // block reads of spilled blocks served by the cache, or not
} kv_store_stats_t;

typedef struct kv_store kv_store_t;

// A store; with a dir, its file is created (and unlinked at once, so nothing is left behind) now.
// 0, MLM_EINVAL (bad shape), MLM_EIO (dir not writable; err names it), MLM_ENOMEM.
int kv_store_new(kv_store_t **out, const kv_store_params_t *p, char *err, size_t errlen);

// Frees every block and closes the file; accepts NULL and NULLs the pointer.
void kv_store_destroy(kv_store_t **self_p);

// Makes sequence seq's block tables for n_ctx positions (blocks come with the first write to them).
// 0, MLM_EINVAL (seq out of range, n_ctx < 1), MLM_ESTATE (it exists), MLM_ENOMEM.
int kv_store_seq_new(kv_store_t *s, int seq, int n_ctx);

// Frees sequence seq's blocks (nothing for an unknown one).
void kv_store_seq_drop(kv_store_t *s, int seq);

// Writes n k rows and n v rows (n * row_bytes bytes each) at positions [pos, pos + n) of a layer,
// allocating blocks as needed (RAM while under the cap, else the file). 0, MLM_EINVAL, MLM_ESTATE
// (no such sequence), MLM_EFULL (past the cap without a dir), MLM_ENOMEM, MLM_EIO.
int kv_store_write(kv_store_t *s, int seq, int layer, int pos, const void *k, const void *v, int n);

// Copies the k and v rows of positions [pos0, pos0 + n) of a layer into k and v (n * row_bytes
// bytes each, contiguous), spilled blocks through the read cache. 0, MLM_EINVAL, MLM_ESTATE,
// MLM_ERANGE (a block never written), MLM_EIO.
int kv_store_read(kv_store_t *s, int seq, int layer, int pos0, int n, void *k, void *v);

// Counters (see kv_store_stats_t).
void kv_store_stats(const kv_store_t *s, kv_store_stats_t *out);

// Bytes of one block (k and v rows of block_pos positions).
size_t kv_store_block_bytes(const kv_store_t *s);

#endif
