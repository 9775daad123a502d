// Routing statistics of a MoE model file: runs a seeded token sequence through it one token at a time
// and measures how its routers choose (expert popularity per block, how often consecutive tokens and
// adjacent blocks pick the same experts), beside what uniform routing would give.
#ifndef MESHLM_ROUTING_STATS_H
#define MESHLM_ROUTING_STATS_H

#include <stddef.h>
#include <stdio.h>

// The share of expert uses a cache of n slots per block would have hit on the measured tokens
// (offload/expert_sim.h: LRU and LFU as the experts provider evicts, and the optimal policy's bound).
typedef struct {
    int n;
    double lru, lfu, opt;
} routing_cache_t;

typedef struct {
    int n_layer, n_expert, k;  // the model's shape
    int n_tokens;              // tokens measured
    double max_share;          // mean over blocks of the most chosen expert's share of the top-k picks
    double min_share;          // mean over blocks of the least chosen expert's share
    double top2_share;         // mean over blocks of the two most chosen experts' share
    double cons_top1;          // consecutive tokens, same top-1 expert (mean over blocks; chance 1/E)
    double cons_overlap;       // consecutive tokens whose top-k sets share an expert (chance 1 - C(E-k,k)/C(E,k))
    double cons_top1_at[3];    // cons_top1 at the first, middle and last block
    double cons_overlap_at[3]; // cons_overlap at the first, middle and last block
    double adj_top1;           // the same token's top-1 at block l and l+1 (mean over block pairs)
    double adj_overlap;        // its top-k sets at l and l+1 share an expert
    double chance_top1;        // 1/E
    double chance_overlap;     // 1 - C(E-k,k)/C(E,k)
    long *count;               // (n_layer, n_expert) the router's picks of each expert per block (owned:
                               // routing_stats_free)
    int n_cache;               // rows of cache
    routing_cache_t *cache;    // (n_cache) this routing replayed through caches of 1, 2, ... slots per
                               // block (owned: routing_stats_free)
} routing_stats_t;

// Measures path over n_tokens tokens (seeded, uniform over the vocabulary) into *out, with the hit
// rates of expert caches of 1 up to n_expert - 1 slots per block (at most 4 * top-k of them). 0, or a negative
// MLM_ code with a message in err (MLM_EINVAL: not a MoE model).
int routing_stats_measure(const char *path, int n_tokens, int n_threads, routing_stats_t *out, char *err,
                          size_t errlen);

// Prints s as a few lines (with the chance values and the Mixtral reference figures) to f.
void routing_stats_print(const routing_stats_t *s, FILE *f);

// Writes s's counts to path in the routing counts format (parallel/plan.h plan_popularity_parse): what
// --ep-hot reads. 0 or MLM_EIO with a message naming path in err.
int routing_stats_write(const routing_stats_t *s, const char *path, char *err, size_t errlen);

// Frees s->count.
void routing_stats_free(routing_stats_t *s);

#endif
