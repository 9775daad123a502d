// MoE expert options shared by run, bench and worker.
#include "coordinator/cli/expert_args.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// --- public API

void expert_args_init(expert_args_t *a) {
    memset(a, 0, sizeof *a);
    a->o = experts_opts_default();
}

int expert_args_option(expert_args_t *a, int ch, const char *arg, const char *cmd) {
    char kv[64], err[160];
    const char *flag = NULL;
    switch (ch) {
    case EA_CACHE: flag = "--expert-cache"; snprintf(kv, sizeof kv, "n=%.50s", arg); break;
    case EA_POLICY: flag = "--expert-policy"; snprintf(kv, sizeof kv, "policy=%.50s", arg); break;
    case EA_PREFETCH: flag = "--expert-prefetch"; snprintf(kv, sizeof kv, "prefetch=%.50s", arg); break;
    case EA_SKIP: {
        char *end;
        const double t = strtod(arg, &end);
        if (end == arg || *end || !(t >= 0 && t < 1)) {
            fprintf(stderr, "meshlm %s: --expert-skip wants a weight in [0, 1), not '%s'\n", cmd, arg);
            return -1;
        }
        a->skip = (float)t;
        flag = "--expert-skip";
        break;
    }
    default: return 0;
    }
    if (ch != EA_SKIP) {
        if (experts_parse(kv, &a->o, err, sizeof err) != 0) {
            fprintf(stderr, "meshlm %s: %s: %s\n", cmd, flag, err);
            return -1;
        }
        a->set = true;
    }
    if (a->n_argv + 2 <= (int)(sizeof a->argv / sizeof a->argv[0])) {
        a->argv[a->n_argv++] = flag;
        a->argv[a->n_argv++] = arg;
    }
    return 1;
}

int expert_args_summary(const weights_stats_t *s, int n_tokens, char *buf, size_t cap) {
    const uint64_t uses = s->expert_hits + s->expert_misses;
    const double per = n_tokens > 0 ? 1.0 / n_tokens : 0;
    int n = snprintf(buf, cap,
                     "experts: hit rate %.1f%% (%llu of %llu), prefetch accuracy %.0f%% (%llu of %llu guessed reads "
                     "used), stall %.1f ms/token, %.1f MB read/token",
                     uses ? 100.0 * (double)s->expert_hits / (double)uses : 0.0, (unsigned long long)s->expert_hits,
                     (unsigned long long)uses,
                     s->prefetch_reads ? 100.0 * (double)s->prefetch_used / (double)s->prefetch_reads : 0.0,
                     (unsigned long long)s->prefetch_used, (unsigned long long)s->prefetch_reads, s->stall_ms * per,
                     (double)s->bytes_read / 1e6 * per);
    if (n >= 0 && (size_t)n < cap && s->guesses_paused)
        n += snprintf(buf + n, cap - (size_t)n, ", guessing paused for %llu blocks (reading was the bottleneck)",
                      (unsigned long long)s->guesses_paused);
    return n < 0 ? 0 : (size_t)n < cap ? n : (int)cap - 1;
}

const char *expert_args_provider(const expert_args_t *a, char *buf, size_t cap) {
    if (!a->set) return NULL;
    experts_name(&a->o, buf, cap);
    return buf;
}

int expert_args_plan(const expert_args_t *a) {
    if (!a->set) return -1; // the workers' default over a budget: as many as it holds (weights_choose)
    if (a->o.naive) return 1;
    return a->o.per_layer > 0 ? a->o.per_layer : -1;
}
