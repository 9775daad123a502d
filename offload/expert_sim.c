// A model of the expert cache replayed over a routing trace: LRU and LFU as offload/experts.c evicts
// (a miss takes an empty slot, else the policy's choice among the experts the token does not use),
// and Belady's optimal replacement as the bound on any policy.
#include "offload/expert_sim.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/err.h"

// --- helpers

// Whether expert e is among the k picks p.
static bool picked(const int *p, int k, int e) {
    for (int r = 0; r < k; r++)
        if (p[r] == e) return true;
    return false;
}

// --- public API

int exsim_replay(const int *sel, int n_tok, int n_layer, int k, int n_expert, int n_slots, exsim_policy_t policy,
                 exsim_result_t *out) {
    if (!sel || !out || n_tok < 0 || n_layer <= 0 || k <= 0 || n_expert <= 0 || n_slots <= 0 ||
        policy < EXSIM_LRU || policy > EXSIM_OPT)
        return MLM_EINVAL;
    for (size_t i = 0; i < (size_t)n_tok * n_layer * k; i++)
        if (sel[i] >= n_expert) return MLM_EINVAL;
    int *slot = malloc((size_t)n_slots * sizeof *slot);           // (n_slots) the expert held, -1 empty
    uint64_t *last = malloc((size_t)n_slots * sizeof *last);      // (n_slots) when it was last used
    uint64_t *freq = malloc((size_t)n_expert * sizeof *freq);     // (n_expert) uses since the start
    int *nx = policy == EXSIM_OPT ? malloc(((size_t)n_tok + 1) * n_expert * sizeof *nx) : NULL; // (n_tok, n_expert)
                                                                  // OPT: the next token after t picking e
    if (!slot || !last || !freq || (policy == EXSIM_OPT && !nx)) {
        free(slot);
        free(last);
        free(freq);
        free(nx);
        return MLM_ENOMEM;
    }
    exsim_result_t r = {0};
    for (int l = 0; l < n_layer; l++) {
        uint64_t tick = 0;
        for (int i = 0; i < n_slots; i++) slot[i] = -1, last[i] = 0;
        for (int e = 0; e < n_expert; e++) freq[e] = 0;
        for (int t = n_tok - 1; nx && t >= 0; t--) {
            int *row = nx + (size_t)t * n_expert;
            for (int e = 0; e < n_expert; e++) row[e] = t + 1 < n_tok ? row[n_expert + e] : n_tok;
            for (int j = 0; t + 1 < n_tok && j < k; j++) {
                const int e = sel[((size_t)(t + 1) * n_layer + l) * k + j];
                if (e >= 0) row[e] = t + 1;
            }
        }
        for (int t = 0; t < n_tok; t++) {
            const int *p = sel + ((size_t)t * n_layer + l) * k;
            for (int j = 0; j < k; j++) {
                const int e = p[j];
                if (e < 0) continue;
                r.uses++;
                int at = -1;
                for (int i = 0; i < n_slots && at < 0; i++)
                    if (slot[i] == e) at = i;
                if (at >= 0) {
                    r.hits++;
                } else {
                    for (int i = 0; i < n_slots && at < 0; i++)
                        if (slot[i] < 0) at = i;
                    int far = -1; // OPT: the next use of the victim so far
                    if (at < 0) {
                        // the token's picks still to come are spared while any other slot can go (the
                        // provider's hint: taken only when every slot is wanted)
                        const int *rest = p + j + 1, nr = k - j - 1;
                        bool spare = false;
                        for (int i = 0; i < n_slots && !spare; i++) spare = !picked(rest, nr, slot[i]);
                        for (int i = 0; i < n_slots; i++) {
                            if (spare && picked(rest, nr, slot[i])) continue;
                            const int nu = nx ? nx[(size_t)t * n_expert + slot[i]] : 0;
                            bool better;
                            if (at < 0) {
                                better = true;
                            } else if (policy == EXSIM_OPT) {
                                better = nu > far;
                            } else if (policy == EXSIM_LFU && freq[slot[i]] != freq[slot[at]]) {
                                better = freq[slot[i]] < freq[slot[at]];
                            } else {
                                better = last[i] < last[at];
                            }
                            if (better) at = i, far = nu;
                        }
                    }
                    slot[at] = e;
                }
                last[at] = ++tick;
                freq[e]++;
            }
        }
    }
    free(slot);
    free(last);
    free(freq);
    free(nx);
    *out = r;
    return 0;
}

const char *exsim_policy_name(exsim_policy_t p) {
    return p == EXSIM_LFU ? "lfu" : p == EXSIM_OPT ? "optimal" : "lru";
}
