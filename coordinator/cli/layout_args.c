// Layout and memory options shared by the cluster commands.
#include "coordinator/cli/layout_args.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan.h"

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

// A byte size such as 512M, 1.5G or 1073741824 (plan_parse_size, after checking that it is a plain
// decimal number with an optional unit: no sign, exponent, inf or nan, at most 16 characters).
static int size_arg(const char *arg, const char *what, const char *cmd, uint64_t *out) {
    const size_t digits = strspn(arg, "0123456789.");
    const char *unit = arg + digits; // "", or K/M/G/T and an optional B or i
    const bool unit_ok = !*unit || (strchr("KMGTkmgt", *unit) && strlen(unit) <= 2);
    if (!isdigit((unsigned char)arg[0]) || digits > 16 || !unit_ok || plan_parse_size(arg, out) != 0) {
        fprintf(stderr, "meshlm %s: %s wants a size such as 512M or 2G (K, M, G, T: powers of 1024), not '%s'\n",
                cmd, what, arg);
        return -1;
    }
    return 1;
}

// --- public API

int layout_args_tp_mode(const char *name, plan_tp_mode_t *out) {
    if (!strcmp(name, "exact")) *out = PLAN_TP_EXACT;
    else if (!strcmp(name, "allreduce")) *out = PLAN_TP_ALLREDUCE;
    else if (!strcmp(name, "auto")) *out = PLAN_TP_AUTO;
    else return -1;
    return 0;
}

int layout_args_ep(const char *arg, int *out) {
    if (!strcmp(arg, "off")) {
        *out = -1;
        return 0;
    }
    char *end;
    long v = strtol(arg, &end, 10);
    if (end == arg || *end || v < 2 || v > 256) return -1;
    *out = (int)v;
    return 0;
}

uint64_t layout_args_local_mem(const layout_args_t *a) { return a->local_mem_set ? a->local_mem : a->mem_budget; }

int layout_args_option(layout_args_t *a, int ch, const char *arg, const char *cmd) {
    switch (ch) {
    case LA_PP: return positive(arg, "--pp", cmd, &a->pp);
    case LA_TP: return positive(arg, "--tp", cmd, &a->tp);
    case LA_UBATCH: return positive(arg, "--ubatch", cmd, &a->ubatch);
    case LA_KEEP_ALL: a->keep_all = true; return 1;
    case LA_PLAN: a->plan_file = arg; return 1;
    case LA_TP_MODE:
        if (layout_args_tp_mode(arg, &a->tp_mode) != 0) {
            fprintf(stderr, "meshlm %s: --tp-mode wants exact, allreduce or auto, not '%s'\n", cmd, arg);
            return -1;
        }
        a->tp_mode_set = true;
        return 1;
    case LA_EP:
        if (layout_args_ep(arg, &a->ep) != 0) {
            fprintf(stderr, "meshlm %s: --ep wants a member count of 2 or more, or off, not '%s'\n", cmd, arg);
            return -1;
        }
        return 1;
    case LA_EP_ATTN:
        if (strcmp(arg, "lead") != 0 && strcmp(arg, "all") != 0) {
            fprintf(stderr, "meshlm %s: --ep-attn wants lead or all, not '%s'\n", cmd, arg);
            return -1;
        }
        a->ep_replicated = strcmp(arg, "all") == 0;
        return 1;
    case LA_EP_REPLICAS: return positive(arg, "--ep-replicas", cmd, &a->ep_replicas);
    case LA_EP_HOT: {
        const char *colon = strrchr(arg, ':');
        a->ep_hot_file = arg;
        a->ep_hot = 0;
        if (colon && colon[1] && strspn(colon + 1, "0123456789") == strlen(colon + 1)) {
            static char path[4096]; // the option's FILE part (one --ep-hot per process)
            if ((size_t)(colon - arg) >= sizeof path || colon == arg) {
                fprintf(stderr, "meshlm %s: --ep-hot wants FILE or FILE:N, not '%s'\n", cmd, arg);
                return -1;
            }
            memcpy(path, arg, (size_t)(colon - arg));
            path[colon - arg] = 0;
            a->ep_hot_file = path;
            if (positive(colon + 1, "--ep-hot's N", cmd, &a->ep_hot) < 0) return -1;
        }
        return 1;
    }
    case LA_MEM_BUDGET: return size_arg(arg, "--mem-budget", cmd, &a->mem_budget);
    case LA_LOCAL_MEM: a->local_mem_set = true; return size_arg(arg, "--local-mem", cmd, &a->local_mem);
    case LA_HEARTBEAT: return positive(arg, "--heartbeat-ms", cmd, &a->heartbeat_ms);
    case LA_NO_RECOVER: a->no_recover = true; return 1;
    case LA_STANDBY: return positive(arg, "--standby", cmd, &a->n_standby);
    default: return 0;
    }
}
