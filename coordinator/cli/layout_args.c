// Layout options shared by the cluster commands.
#include "coordinator/cli/layout_args.h"

#include <stdio.h>
#include <stdlib.h>

// --- helpers

static int positive(const char *arg, const char *what, const char *cmd, int *out) {
    char *end;
    long v = strtol(arg, &end, 10);
    if (end == arg || *end || v < 1 || v > 4096) {
        fprintf(stderr, "meshlm %s: %s wants a positive number, not '%s'\n", cmd, what, arg);
        return -1;
    }
    *out = (int)v;
    return 1;
}

// --- public API

int layout_args_option(layout_args_t *a, int ch, const char *arg, const char *cmd) {
    switch (ch) {
    case LA_PP: return positive(arg, "--pp", cmd, &a->pp);
    case LA_TP: return positive(arg, "--tp", cmd, &a->tp);
    case LA_UBATCH: return positive(arg, "--ubatch", cmd, &a->ubatch);
    case LA_KEEP_ALL: a->keep_all = true; return 1;
    case LA_PLAN: a->plan_file = arg; return 1;
    default: return 0;
    }
}
