// The layout options every cluster command shares (run, coordinator, bench, mpi): --pp, --tp,
// --tp-mode, --plan, --ubatch, --keep-all; and the memory options of run, coordinator and bench: --mem-budget,
// --local-mem.
#ifndef MESHLM_LAYOUT_ARGS_H
#define MESHLM_LAYOUT_ARGS_H

#include <stdbool.h>
#include <stdint.h>

#include "parallel/plan.h"

typedef struct {
    int pp;                   // --pp S: pipeline stages (0 = the planner chooses)
    int tp;                   // --tp T: nodes per stage (0 = the planner chooses)
    int ubatch;               // --ubatch N: micro-batch tokens in flight (0 = default)
    bool keep_all;            // --keep-all: never leave a node out
    const char *plan_file;    // --plan FILE: a hand-written plan
    plan_tp_mode_t tp_mode;   // --tp-mode exact|allreduce|auto (default exact)
    bool tp_mode_set;         // --tp-mode was given (it then overrides a plan file's mode)
    int ep;                   // --ep N|off: MoE experts placed whole on stages of N nodes (N >= 2), -1 (off):
                              // sliced only, 0 (default): the faster predicted
    bool ep_replicated;       // --ep-attn all: placed experts with attention on every member (default lead:
                              // on each stage's first member alone)
    int ep_replicas;          // --ep-replicas N: holders of each placed expert (0 = the planner's choice)
    const char *ep_hot_file;  // --ep-hot FILE[:N]: routing counts (meshlm inspect --routing-out), or NULL
    int ep_hot;               // its N: popular experts per stage with a second holder (0 = the model's top-k)
    // --mem-budget SIZE, bytes (0 = none): the budget of every local worker (passed on as `meshlm
    // worker --mem-budget`) and of this process's own model: its share (--coordinator-shard) or the
    // single node, which streams its weights through the weight window when it does not fit.
    uint64_t mem_budget;
    uint64_t local_mem;       // --local-mem SIZE: memory cgroup limit of each local worker (see
                              // layout_args_local_mem; 0 with local_mem_set = no limit)
    bool local_mem_set;       // --local-mem was given
    // faults: --heartbeat-ms MS (0 = 1000), --no-recover, --standby N (the last N workers)
    int heartbeat_ms;
    bool no_recover;
    int n_standby;
} layout_args_t;

// Option ids, above every command's own (GA_NEXT + 100 leaves room).
enum { LA_PP = 1200, LA_TP, LA_UBATCH, LA_KEEP_ALL, LA_PLAN, LA_MEM_BUDGET, LA_LOCAL_MEM, LA_HEARTBEAT, LA_NO_RECOVER,
       LA_STANDBY, LA_TP_MODE, LA_EP, LA_EP_ATTN, LA_EP_REPLICAS, LA_EP_HOT };

#define LAYOUT_ARGS_LONGOPTS                                                                                     \
    {"pp", required_argument, 0, LA_PP}, {"tp", required_argument, 0, LA_TP},                                   \
        {"ubatch", required_argument, 0, LA_UBATCH}, {"keep-all", no_argument, 0, LA_KEEP_ALL},                 \
        {"plan", required_argument, 0, LA_PLAN}, {"tp-mode", required_argument, 0, LA_TP_MODE},                \
        {"ep", required_argument, 0, LA_EP}, {"ep-attn", required_argument, 0, LA_EP_ATTN},              \
        {"ep-replicas", required_argument, 0, LA_EP_REPLICAS}, {"ep-hot", required_argument, 0, LA_EP_HOT}

#define LAYOUT_ARGS_USAGE                                                                                        \
    "layout (default: the planner picks tensor, pipeline or hybrid from measured speed, memory and links):\n"   \
    "      --pp S              pipeline stages of consecutive layers\n"                                         \
    "      --tp T              nodes per stage (a tensor-parallel group); --pp 2 --tp 2 on 4 nodes\n"            \
    "      --tp-mode M         how a group cuts a block: exact (default: 4 all-gathers per block, logits\n"    \
    "                          bit-identical to one node), allreduce (Megatron style: 2 all-reduces per\n"    \
    "                          block, star or ring from the measured links; last bits differ), auto (the\n"  \
    "                          faster predicted); overrides a --plan file's tp mode\n"                        \
    "      --ep N|off          MoE: experts placed whole on stages of N nodes (expert parallelism: the\n"     \
    "                          router runs where the hidden state is, token rows go to their experts'\n"   \
    "                          owners; logits bit-identical to one node), off: experts sliced like every\n"\
    "                          matrix (default: the faster predicted)\n"                                   \
    "      --ep-attn lead|all  with placed experts, attention (and router, KV cache, output) on each\n"      \
    "                          stage's first node alone, the others computing experts only (lead, the\n"   \
    "                          default), or replicated on every member (all)\n"                            \
    "      --ep-replicas N     with lead, every expert on N members of its stage: the first member gives\n"   \
    "                          each token's experts to the least busy holders (default 1; with budgets on\n" \
    "                          every node the planner tries up to top-k replicas that fit)\n"               \
    "      --ep-hot FILE[:N]   with lead, a second copy of each block's N most popular experts (default\n"  \
    "                          N: top-k, at most 16), popularity from FILE's routing counts (meshlm\n"    \
    "                          inspect MODEL --routing T --routing-out FILE); needs 1.9 workers\n"       \
    "      --plan FILE         a hand-written plan (see meshlm plan --out)\n"                                   \
    "      --ubatch N          prompt micro-batch tokens in flight through the stages (default 16)\n"           \
    "      --keep-all          never leave a slow node out\n"

// The memory options, for the commands that start or are local workers (run, coordinator, bench).
#define LAYOUT_MEM_LONGOPTS                                                                                      \
    {"mem-budget", required_argument, 0, LA_MEM_BUDGET}, {"local-mem", required_argument, 0, LA_LOCAL_MEM}

#define LAYOUT_MEM_USAGE                                                                                         \
    "memory (SIZE: bytes with an optional K, M, G or T suffix, powers of 1024):\n"                             \
    "      --mem-budget SIZE   memory for weights + KV cache + activations of every local worker (given\n"  \
    "                          to them as worker --mem-budget, so the planner fits their shares) and of\n"   \
    "                          this process's own share; a share that does not fit streams its weights\n"   \
    "                          from disk through a sliding window (default: no budget)\n"                     \
    "      --local-mem SIZE    limit of the memory cgroup each --local worker runs in; the page cache of\n"  \
    "                          the model file counts (default: the --mem-budget; without one, no limit;\n"    \
    "                          0 = no limit). The cgroup's peak is reported at the end\n"

// The fault options, for the commands that coordinate workers (run, coordinator, bench).
#define LAYOUT_FAULT_LONGOPTS                                                                                    \
    {"heartbeat-ms", required_argument, 0, LA_HEARTBEAT}, {"no-recover", no_argument, 0, LA_NO_RECOVER},       \
        {"standby", required_argument, 0, LA_STANDBY}

#define LAYOUT_FAULT_USAGE                                                                                       \
    "faults (a worker lost in a step: re-plan over the survivors, reload, replay, go on):\n"                    \
    "      --heartbeat-ms MS   a killed, frozen or cut-off worker is detected within this (default 1000)\n"    \
    "      --no-recover        fail the request instead of recovering\n"                                       \
    "      --standby N         the last N workers wait outside the plan and replace lost ones\n"

// The memory cgroup limit of each local worker: --local-mem when given, else --mem-budget (0 = none).
uint64_t layout_args_local_mem(const layout_args_t *a);

// Parses a tensor-parallel mode name: "exact", "allreduce" or "auto". 0, or -1 for another name.
int layout_args_tp_mode(const char *name, plan_tp_mode_t *out);

// Parses --ep's value: N >= 2, or "off" (-1). 0, or -1 for anything else.
int layout_args_ep(const char *arg, int *out);

// Handles ch if it is a layout option: 1 handled, 0 not ours, -1 bad value (message printed).
int layout_args_option(layout_args_t *a, int ch, const char *arg, const char *cmd);

#endif
