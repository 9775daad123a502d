// Attention/KV devices: a device owns the KV cache of its sequences and computes attention next to
// it, so the forward pass hands it k and v rows as they are made and q rows to attend for, and gets
// the heads' outputs back. "host" (the reference) keeps the cache in this process's memory and
// computes exactly what llama.cpp does; later devices keep it in paged tiers, in a storage process
// or in a simulated PIM, behind the same calls, and must give the host device's bits.
#ifndef MESHLM_OFFLOAD_ATTN_H
#define MESHLM_OFFLOAD_ATTN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/kernels/quant.h"
#include "worker/kernels/threadpool.h"

// The shape a device serves: one model slice's attention.
typedef struct {
    int n_layer;       // layers whose KV it keeps: ids [0, n_layer) (a stage counts from its first block)
    int head_dim;      // elements per head
    int n_head;        // the model's query heads ...
    int n_head_kv;     // ... and KV heads: query head h reads KV head h / (n_head / n_head_kv)
    int h0, h1;        // query heads attended here: q and out rows hold (h1 - h0) * head_dim floats
    int kv0, kv1;      // KV heads stored here: k and v rows hold (kv1 - kv0) * head_dim floats;
                       // they must include every KV head that heads h0..h1 read
    qtype_t kv_type;   // cache element type: QT_F16 (llama.cpp's default: k and v are rounded to
                       // half when stored), QT_F32, or QT_Q8_0 (blocks of 32 with an F16 scale, 34 bytes,
                       // dequantized to F32 for the attention: CHANGES OUTPUTS; head_dim a multiple of 32;
                       // host and file devices only)
    int n_seq_max;     // sequence ids [0, n_seq_max) (0 = 1)
    tpool_t *pool;     // threads attend may use (borrowed; NULL = the calling thread alone)
    uint64_t ram_bytes; // this process's memory the device may use for KV (0 = no limit): the RAM share
                        // of --mem-budget; a paging device ("file") spills past it, host ignores it
} attn_params_t;

// Counters since creation. The wrapper keeps the first three for every device; the others are a
// device's own, zero where they do not apply (host: nothing crosses a link, nothing waits,
// nothing is simulated; its time is the forward pass's, which callers measure).
typedef struct {
    uint64_t appended;       // token rows appended, summed over layers
    uint64_t attended;       // query rows attended, summed over layers
    uint64_t seqs;           // sequences allocated now
    double time_ms;          // time the device spent on appends and attends that it measured
                             // (waiting on a link or a tier); 0 for host
    uint64_t kv_bytes;       // bytes of KV cache held now, all tiers
    uint64_t kv_bytes_ram;   // of which in this process's memory
    uint64_t bytes_to_dev;   // bytes sent to the device (k, v, q rows) over a link
    uint64_t bytes_from_dev; // bytes received from it (attention outputs)
    uint64_t bytes_read;     // bytes read back from a slower tier (file, storage)
    uint64_t bytes_written;  // bytes written to a slower tier
    double sim_time_ms;      // device time from a model rather than a clock (PIM), 0 otherwise
    double sim_energy_mj;    // energy from that model
} attn_stats_t;

typedef struct attn_dev attn_dev_t;

// --- registry

// Makes the device called name ("host"; NULL or "" = "host"). Text after a ':' is the device's
// argument ("file:/var/kv"). 0, or a negative MLM_ code with a message in err (MLM_ENOTFOUND: no
// device of that name, MLM_EINVAL: a shape that does not add up, MLM_EUNSUPPORTED: a kv_type the
// device cannot store).
int attn_dev_new(attn_dev_t **out, const char *name, const attn_params_t *p, char *err, size_t errlen);

// Drops every sequence and frees the device; accepts NULL and NULLs the pointer.
void attn_dev_free(attn_dev_t **self_p);

// Checks that name (as attn_dev_new takes it: "host", "file:DIR", ...; NULL or "" = "host") names
// a registered device, without making one: 0, or MLM_ENOTFOUND with a message in err naming the
// device list (for options, checked before anything is loaded).
int attn_dev_known(const char *name, char *err, size_t errlen);

// Names of the registered devices, space-separated (for --help).
const char *attn_dev_names(void);

// The device's name as registered ("host").
const char *attn_dev_name(const attn_dev_t *d);

// --- sequences (calls on one device are made one at a time; attend may use the pool's threads)

// Allocates sequence seq with room for n_ctx positions in every layer. 0, MLM_EINVAL (seq outside
// [0, n_seq_max), n_ctx < 1), MLM_ESTATE (seq exists), MLM_ENOMEM / MLM_EFULL.
int attn_dev_seq_new(attn_dev_t *d, int seq, int n_ctx);

// Stores the k and v rows (n of (kv1 - kv0) * head_dim floats each) of positions [pos, pos + n) of
// one layer. pos may not skip a position of that layer: it is at most the layer's length, and a
// smaller pos rewinds (positions from pos + n on are forgotten), so a sequence is reused from 0
// without a drop. 0, MLM_EINVAL (bad id, n < 1, pos < 0 or past the layer's length, NULL rows),
// MLM_ESTATE (no such sequence), MLM_ERANGE (pos + n > n_ctx), or the device's error.
int attn_dev_append(attn_dev_t *d, int seq, int layer, int pos, const float *k, const float *v, int n);

// Attention of n query rows (q: n of (h1 - h0) * head_dim floats) at positions [pos0, pos0 + n),
// causal: the row at pos0 + i sees cached positions 0 ..= pos0 + i of the layer. out: n rows like
// q. The n rows are one batch: llama.cpp sums a batch of 2+ in another order than a single token,
// and this reproduces both. 0, MLM_EINVAL, MLM_ESTATE, MLM_ERANGE (a position not appended yet), or
// the device's error.
int attn_dev_attend(attn_dev_t *d, int seq, int layer, const float *q, int n, int pos0, float *out);

// Positions of layer in the sequence (0 for an unknown one).
int attn_dev_seq_len(const attn_dev_t *d, int seq, int layer);

// Frees sequence seq (nothing for an unknown one); its id can be allocated again.
void attn_dev_seq_drop(attn_dev_t *d, int seq);

// Counters (see attn_stats_t).
void attn_dev_stats(const attn_dev_t *d, attn_stats_t *out);

// One line on the device's counters for people: where the KV is (RAM, files), the bytes read and
// written, and a simulated time and energy marked as simulated. Returns snprintf's count.
int attn_dev_describe(const attn_dev_t *d, char *buf, size_t cap);

// Whether the device called name keeps KV past a RAM share in a slower tier ("file") or elsewhere
// altogether ("storage": in a kvstore process), so a node's budget need not hold all of it.
bool attn_dev_pages(const char *name);

#endif
