// Replays a routing trace through a model of the expert cache (offload/experts.c): how many expert
// uses a cache of N slots per block would hit under LRU or LFU, as the provider decides, and under
// Belady's optimal replacement (it knows every future pick: no policy can hit more), so that a
// routing's best case can be stated before anything is read.
#ifndef MESHLM_EXPERT_SIM_H
#define MESHLM_EXPERT_SIM_H

typedef enum {
    EXSIM_LRU = 0, // least recently used, the token's own picks spared (the provider's hint)
    EXSIM_LFU = 1, // least often used since the start (ties: least recent), the picks spared
    EXSIM_OPT = 2, // Belady: the resident expert picked again latest (or never), the picks spared
} exsim_policy_t;

typedef struct {
    long uses; // expert uses replayed (picks >= 0)
    long hits; // of them, found resident
} exsim_result_t;

// Replays sel (n_tok, n_layer, k) expert ids, each token's picks per block in the order they are
// used (negative: no expert), through n_slots slots per block under policy, every block its own
// cache starting empty. Ids must be below n_expert. 0 with *out filled, or MLM_EINVAL (a bad shape,
// an id out of range) / MLM_ENOMEM.
int exsim_replay(const int *sel, int n_tok, int n_layer, int k, int n_expert, int n_slots, exsim_policy_t policy,
                 exsim_result_t *out);

// "lru", "lfu" or "optimal".
const char *exsim_policy_name(exsim_policy_t p);

#endif
