// The --faults option of run, coordinator, bench and chaos: the spec (or $MESHLM_FAULTS), its scheduler, and the per-token hook.
#ifndef MESHLM_FAULT_ARGS_H
#define MESHLM_FAULT_ARGS_H

#include <stdbool.h>
#include <stdint.h>

#include "cluster/faultsched.h"
#include "cluster/launch.h"
#include "coordinator/runtime/generate.h"
#include "transport/fault.h"

// Option id, above every command's own and the layout options'.
enum { FA_FAULTS = 1300 };

#define FAULT_ARGS_LONGOPTS {"faults", required_argument, 0, FA_FAULTS}

#define FAULT_ARGS_USAGE                                                                                         \
    "      --faults SPEC       a fault schedule, e.g. kill:worker=2:after_tokens=8,drop:link=1-2:p=0.05 (see\n"  \
    "                          README, \"Fault schedules\"; default $MESHLM_FAULTS): kill, freeze and slow signal\n" \
    "                          --local workers, delay, bw, loss, drop and partition are the transport's\n"

typedef struct {
    fault_spec_t *spec;          // the run's spec (owned), NULL = no faults
    faultsched_t *sched;         // its scheduler (owned), NULL = no events
    gen_engine_t inner;          // the engine fault_args_engine wraps
    bool first_is_prompt;        // the wrapped engine's first eval after a reset is a prompt
    bool fresh;                  // no eval since the last reset
    int64_t tokens;              // generated tokens reported so far
    char *env;                   // $MESHLM_FAULTS as it was before setup (owned; NULL = unset)
    bool env_set;                // setup changed $MESHLM_FAULTS
} fault_args_t;

// Reads the spec from text (--faults; NULL: $MESHLM_FAULTS), makes a scheduler for its events over
// the local workers lw (NULL: none; n_workers is the run's worker count) and sets $MESHLM_FAULTS to
// the spec every process of the run uses (with the scheduler's board), so that the cluster made
// next hands it to the workers. No spec at all: nothing happens. 0, or -1 with a message naming
// cmd on stderr. fault_args_free undoes it.
int fault_args_setup(fault_args_t *f, const char *text, const launch_t *lw, int n_workers, bool verbose, const char *cmd);

// An engine over eng that reports each generated token to the scheduler before its step: every
// one-token eval, except the first after a reset when first_is_prompt. eng is copied; f is borrowed.
gen_engine_t fault_args_engine(fault_args_t *f, const gen_engine_t *eng, bool first_is_prompt);

// Reports n more generated tokens (for callers that drive the cluster themselves).
void fault_args_tokens(fault_args_t *f, int64_t n);

// Starts the schedule's clock. 0, or -1 with a message.
int fault_args_start(fault_args_t *f, const char *cmd);

// Stops the scheduler (every frozen or slowed worker continues), frees everything and puts
// $MESHLM_FAULTS back as it was. Accepts a zeroed struct; idempotent.
void fault_args_free(fault_args_t *f);

#endif
