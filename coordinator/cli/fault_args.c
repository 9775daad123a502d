// --faults for the commands that coordinate workers: parse, schedule, hand the spec on, count tokens.
#include "coordinator/cli/fault_args.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// --- helpers

static int counted_eval(void *ctx, const int32_t *t, int n, float *logits, bool all) {
    fault_args_t *f = ctx;
    const bool prompt = f->fresh && f->first_is_prompt;
    f->fresh = false;
    if (n == 1 && !prompt) fault_args_tokens(f, 1);
    return f->inner.eval(f->inner.ctx, t, n, logits, all);
}

static void counted_reset(void *ctx) {
    fault_args_t *f = ctx;
    f->fresh = true;
    f->inner.reset(f->inner.ctx);
}

// --- public API

int fault_args_setup(fault_args_t *f, const char *text, const launch_t *lw, int n_workers, bool verbose, const char *cmd) {
    memset(f, 0, sizeof *f);
    char err[512];
    int rc = text ? fault_parse(text, &f->spec, err, sizeof err) : fault_from_env(&f->spec, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "meshlm %s: %s%s\n", cmd, text ? "--faults: " : "", err);
        return -1;
    }
    if (!f->spec) return 0;
    if (fault_n_events(f->spec) > 0) {
        faultsched_opts_t so = {.launch = lw, .n_workers = n_workers, .verbose = verbose};
        if (faultsched_new(&f->sched, f->spec, &so, err, sizeof err) != 0) {
            fprintf(stderr, "meshlm %s: %s\n", cmd, err);
            fault_args_free(f);
            return -1;
        }
    }
    const fault_spec_t *use = f->sched ? faultsched_spec(f->sched) : f->spec;
    const char *was = getenv("MESHLM_FAULTS");
    f->env = was ? strdup(was) : NULL;
    f->env_set = true;
    setenv("MESHLM_FAULTS", fault_spec_text(use), 1);
    return 0;
}

gen_engine_t fault_args_engine(fault_args_t *f, const gen_engine_t *eng, bool first_is_prompt) {
    f->inner = *eng;
    f->first_is_prompt = first_is_prompt;
    f->fresh = true;
    return (gen_engine_t){f, eng->n_vocab, counted_eval, counted_reset};
}

void fault_args_tokens(fault_args_t *f, int64_t n) {
    f->tokens += n;
    if (f->sched) faultsched_tokens(f->sched, f->tokens);
}

int fault_args_start(fault_args_t *f, const char *cmd) {
    char err[256];
    if (!f->sched || faultsched_start(f->sched, err, sizeof err) == 0) return 0;
    fprintf(stderr, "meshlm %s: %s\n", cmd, err);
    return -1;
}

void fault_args_free(fault_args_t *f) {
    faultsched_destroy(&f->sched);
    if (f->env_set && f->env) setenv("MESHLM_FAULTS", f->env, 1);
    else if (f->env_set) unsetenv("MESHLM_FAULTS");
    f->env_set = false;
    free(f->env);
    f->env = NULL;
    fault_free(&f->spec);
}
