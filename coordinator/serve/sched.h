// Continuous batching: requests queue for a sequence slot; every step carries one prompt chunk or one
// generated token of each sequence in flight; text streams to the request's reader as it is made.
#ifndef MESHLM_SERVE_SCHED_H
#define MESHLM_SERVE_SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/runtime/sampler.h"
#include "coordinator/serve/engine.h"
#include "worker/text/tokenizer.h"

#define SERVE_MAX_STOPS 4
#define SERVE_STOP_LEN 64

typedef struct serve serve_t;
typedef struct serve_req serve_req_t;

typedef struct {
    int parallel;   // sequences in flight (1 .. engine's max_seqs)
    int queue_max;  // requests waiting for a slot before serve_submit refuses (MLM_EFULL)
} serve_opts_t;

typedef struct {
    const int32_t *prompt;             // (n_prompt) token ids, copied
    int n_prompt;
    int n_predict;                     // tokens to generate at most (>= 1)
    bool ignore_eos;
    sampler_params_t sp;
    char stop[SERVE_MAX_STOPS][SERVE_STOP_LEN]; // stop strings ("" = unused): generation ends before one
} serve_req_params_t;

// Why a request ended.
typedef enum { SERVE_RUNNING = 0, SERVE_STOP, SERVE_LENGTH, SERVE_CANCELLED, SERVE_FAILED } serve_finish_t;

typedef struct {
    int n_prompt, n_gen;              // tokens in the prompt; generated
    serve_finish_t finish;
    double queued_ms, ttft_ms, total_ms; // waiting for a slot; submit to first token; submit to the end
    char err[256];                    // why it failed (SERVE_FAILED)
} serve_req_info_t;

typedef struct {
    uint64_t requests, rejected, failed, cancelled; // submitted (accepted), refused (queue full), failed, cancelled
    uint64_t prompt_tokens, gen_tokens;            // evaluated prompt tokens; generated tokens
    uint64_t steps;                                // engine steps
    double step_ms;                                // their summed time
    double tok_s;                                  // tokens generated per second over the last 5 s
    int queued, active, parallel, queue_max;       // now
    bool broken;                                   // a step failed: the engine may be unusable
    char last_error[256];
} serve_stats_t;

// A scheduler over eng (borrowed) with its own thread. 0 or MLM_E* with a message.
int serve_new(serve_t **out, serve_engine_t *eng, const tokenizer_t *tok, const serve_opts_t *o, char *err,
              size_t errlen);
// Stops the thread; requests still in flight end as SERVE_FAILED ("server shutting down").
void serve_destroy(serve_t **self_p);

// Queues a request; *out is the caller's reference (serve_req_release). MLM_EFULL (queue full),
// MLM_ERANGE (prompt + n_predict exceed a sequence's context: message in err), MLM_EINVAL.
int serve_submit(serve_t *s, const serve_req_params_t *p, serve_req_t **out, char *err, size_t errlen);

// Waits up to timeout_ms for text not read yet: copies up to cap bytes of it into buf and returns
// the count (0 on timeout). *done is true once the request ended and every byte was read.
size_t serve_req_read(serve_req_t *r, char *buf, size_t cap, int timeout_ms, bool *done);
void serve_req_info(serve_req_t *r, serve_req_info_t *out);
// The generated token ids so far (copied into ids, at most cap); returns the count.
int serve_req_tokens(serve_req_t *r, int32_t *ids, int cap);
// Ends the request (its sequence is freed at the next step).
void serve_req_cancel(serve_req_t *r);
// Drops the caller's reference (cancels a request still running); accepts NULL, NULLs the pointer.
void serve_req_release(serve_req_t **r);

void serve_stats(serve_t *s, serve_stats_t *out);

// The engine's latest snapshot (serve_engine_t.snapshot, taken after steps at most every 250 ms), as a
// JSON object text the caller frees; NULL when there is none.
char *serve_status(serve_t *s);

#endif
