// The MoE expert options of run, bench and worker: --expert-cache, --expert-policy, --expert-prefetch,
// --expert-skip (the "experts" weight provider, offload/experts.h, and the model's adaptive gating).
#ifndef MESHLM_EXPERT_ARGS_H
#define MESHLM_EXPERT_ARGS_H

#include <stdbool.h>
#include <stddef.h>

#include "offload/experts.h"

typedef struct {
    bool set;                  // an expert cache option was given: the share uses the "experts" provider
    experts_opts_t o;          // its options
    float skip;                // --expert-skip T (0 = off)
    const char *argv[8];       // (n_argv) the options as given, for the local workers' command lines
    int n_argv;
} expert_args_t;

// Option ids, above the layout (1200...) and fault (1300...) options.
enum { EA_CACHE = 1400, EA_POLICY, EA_PREFETCH, EA_SKIP };

#define EXPERT_ARGS_LONGOPTS                                                                                     \
    {"expert-cache", required_argument, 0, EA_CACHE}, {"expert-policy", required_argument, 0, EA_POLICY},       \
        {"expert-prefetch", required_argument, 0, EA_PREFETCH}, {"expert-skip", required_argument, 0, EA_SKIP}

#define EXPERT_ARGS_USAGE                                                                                        \
    "mixture of experts (a share of a MoE model; given to local workers too):\n"                               \
    "      --expert-cache N    keep N experts per block in memory and read the others from the model file\n"   \
    "                          when used (auto: as many as --mem-budget holds, all without one, and below\n" \
    "                          one per block a pool of slots the blocks share; off: naive on-demand\n"      \
    "                          loading, nothing kept). Default: auto when the experts do not fit\n"        \
    "                          --mem-budget, none without a budget. Same tokens as without it\n"           \
    "      --expert-policy P   which expert leaves a full block's cache: lru (default) or lfu\n"              \
    "      --expert-prefetch on|off|auto  read the router's choices ahead and guess the next block's\n"       \
    "                          experts by applying its router to the current hidden state (on); auto\n"       \
    "                          (default): guess only while reads are not what the tokens wait for\n"          \
    "      --expert-skip T     adaptive gating (AdapMoE): a token drops its second expert when that\n"         \
    "                          expert's normalised weight is below T (e.g. 0.2). CHANGES OUTPUTS; off by\n"   \
    "                          default\n"

// Defaults (nothing set).
void expert_args_init(expert_args_t *a);

// Handles ch if it is an expert option: 1 handled, 0 not ours, -1 bad value (message printed).
int expert_args_option(expert_args_t *a, int ch, const char *arg, const char *cmd);

// One line into buf on an "experts" provider's counters over n_tokens tokens: "experts: hit rate 62.5%
// (40 of 64), prefetch accuracy 80% (8 of 10 guessed reads used), stall 12.3 ms/token, 99.1 MB
// read/token". Returns the length written.
int expert_args_summary(const weights_stats_t *s, int n_tokens, char *buf, size_t cap);

// What the planner sizes placed experts with (plan_opts_t.expert_cache): N per block, -1 for auto (as
// many as the budget holds; also without a cache option, as a share over its budget then caches by
// default: weights_choose), 1 for off (one slot per block).
int expert_args_plan(const expert_args_t *a);

// The weight provider name for the options into buf ("experts:n=2,policy=lru,prefetch=on"), or NULL
// when no cache option was given (the provider is then chosen by the budget).
const char *expert_args_provider(const expert_args_t *a, char *buf, size_t cap);

#endif
