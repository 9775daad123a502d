// The layout options every cluster command shares (run, coordinator, bench, mpi): --pp, --tp,
// --plan, --ubatch, --keep-all.
#ifndef MESHLM_LAYOUT_ARGS_H
#define MESHLM_LAYOUT_ARGS_H

#include <stdbool.h>

typedef struct {
    int pp;                   // --pp S: pipeline stages (0 = the planner chooses)
    int tp;                   // --tp T: nodes per stage (0 = the planner chooses)
    int ubatch;               // --ubatch N: micro-batch tokens in flight (0 = default)
    bool keep_all;            // --keep-all: never leave a node out
    const char *plan_file;    // --plan FILE: a hand-written plan
} layout_args_t;

// Option ids, above every command's own (GA_NEXT + 100 leaves room).
enum { LA_PP = 1200, LA_TP, LA_UBATCH, LA_KEEP_ALL, LA_PLAN };

#define LAYOUT_ARGS_LONGOPTS                                                                                     \
    {"pp", required_argument, 0, LA_PP}, {"tp", required_argument, 0, LA_TP},                                   \
        {"ubatch", required_argument, 0, LA_UBATCH}, {"keep-all", no_argument, 0, LA_KEEP_ALL},                 \
        {"plan", required_argument, 0, LA_PLAN}

#define LAYOUT_ARGS_USAGE                                                                                        \
    "layout (default: the planner picks tensor, pipeline or hybrid from measured speed, memory and links):\n"   \
    "      --pp S              pipeline stages of consecutive layers\n"                                         \
    "      --tp T              nodes per stage (a tensor-parallel group); --pp 2 --tp 2 on 4 nodes\n"            \
    "      --plan FILE         a hand-written plan (see meshlm plan --out)\n"                                   \
    "      --ubatch N          prompt micro-batch tokens in flight through the stages (default 16)\n"           \
    "      --keep-all          never leave a slow node out\n"

// Handles ch if it is a layout option: 1 handled, 0 not ours, -1 bad value (message printed).
int layout_args_option(layout_args_t *a, int ch, const char *arg, const char *cmd);

#endif
