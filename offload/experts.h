// The expert-caching weight provider ("experts"): a MoE share keeps its dense parts mapped and at most
// N experts per block in memory; a missing expert is read from the file into a cache slot, hot ones stay
// (LRU or LFU), and a background thread guesses the next block's experts by applying its router to the
// current hidden state and reads them ahead (Mixtral-offloading's speculative prefetch).
//
// Made through weights_new with the name "experts:n=N,policy=lru|lfu,prefetch=on|off|auto" (every key
// optional; n=0 or no n: as many as the budget holds, all of them without a budget; n=off: naive
// on-demand loading, every use of an expert reads it and nothing is kept). When every expert fits they
// are all read at creation. Counters: hits and misses count expert acquires only (a dense part is
// always resident); an acquire that waits for a read already under way counts as a miss. The bytes of a hit come
// from the slot, never from the file's pages: a read drops the pages it went through from the page
// cache. A dense model's units all come from the mapping (nothing to cache). Placed experts
// (weights_params_t.experts, or a slice of placed experts read from a cut shard file): the cache holds
// and reads only those, N per block of them; acquiring another is MLM_ENOTFOUND. Results are the same bits as "mmap" computing on the file's layout (`--no-repack`): caching
// and prefetching only change where the bytes come from.
#ifndef MESHLM_OFFLOAD_EXPERTS_H
#define MESHLM_OFFLOAD_EXPERTS_H

#include <stdbool.h>
#include <stddef.h>

#include "offload/weights.h"

typedef enum {
    EXPERTS_LRU = 0,   // evict the least recently used expert of the block
    EXPERTS_LFU = 1,   // evict the least often used (uses counted since creation; ties: least recent)
} experts_policy_t;

// Reading ahead (experts_opts_t.prefetch).
typedef enum {
    EXPERTS_PREFETCH_OFF = 0,  // experts are read only when acquired
    EXPERTS_PREFETCH_ON = 1,   // a background thread reads the router's choices of a block ahead, in the order
                               // they are used, and guesses the next block's experts (always)
    EXPERTS_PREFETCH_AUTO = 2, // as on, but guesses only while reading is not what the tokens wait for: the
                               // share of time spent waiting for reads (a moving average over the blocks) is
                               // below EXPERTS_GUESS_STALL_MAX. When reading is the bottleneck a guess cannot
                               // hide anything, and a wrong one, or the expert it evicts, costs a whole read
} experts_prefetch_t;

#define EXPERTS_GUESS_STALL_MAX 0.5

// The provider's options (its name's argument).
typedef struct {
    int per_layer;             // experts resident per block; 0 = from the budget (all without one)
    bool naive;                // n=off: no cache, no prefetch, every acquire reads
    experts_policy_t policy;   // eviction policy
    experts_prefetch_t prefetch; // reading ahead (default auto). Nothing to read ahead when every expert is resident
    bool direct;               // io=direct (default): reads with O_DIRECT in aligned extents where the file
                               // system has it, else buffered; io=pread: buffered reads (then dropped from
                               // the page cache). $MESHLM_EXPERTS_IO=pread|direct sets it for the process
} experts_opts_t;

// The defaults: per_layer 0, LRU, prefetch auto.
experts_opts_t experts_opts_default(void);

// Parses the argument "n=2,policy=lfu,prefetch=off" (keys in any order, each optional) over o's
// values. 0, or MLM_EINVAL with a message in err.
int experts_parse(const char *arg, experts_opts_t *o, char *err, size_t errlen);

// The provider name weights_new takes for o: "experts:n=2,policy=lfu,prefetch=off". Returns the
// length written (truncated to cap - 1).
int experts_name(const experts_opts_t *o, char *buf, size_t cap);

// Experts per block the share of p holds within p->budget_bytes: (budget - KV cache - activations -
// dense parts) / (blocks x one expert), at most n_expert; n_expert when there is no budget. 0; MLM_ERANGE
// with a message when not even one expert per block fits; MLM_EINVAL when the model has no experts.
int experts_fit(const weights_params_t *p, int *per_layer, char *err, size_t errlen);

// Where not one expert per block fits (experts_fit's MLM_ERANGE), the cache can still keep a pool of
// slots that every block reads its routed experts into (n=auto does so): *slots = how many fit
// beside the KV cache, activations and dense parts, at most every expert the share holds; *need (may
// be NULL) the budget a pool of one slot needs. 0; MLM_ERANGE with a message when not even one
// expert fits; MLM_EINVAL as experts_fit.
int experts_pool_fit(const weights_params_t *p, int *slots, uint64_t *need, char *err, size_t errlen);

#endif
