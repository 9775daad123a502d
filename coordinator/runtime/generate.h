// The generation loop shared by `run` and the benchmarks: prompt, sample, stream, time.
#ifndef MESHLM_GENERATE_H
#define MESHLM_GENERATE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "coordinator/runtime/sampler.h"

// Whatever computes logits: a local model context or a cluster (gen_engine_model, gen_engine_cluster).
typedef struct {
    void *ctx;                                                                  // borrowed
    int n_vocab;                                                                // logits per row
    int (*eval)(void *ctx, const int32_t *tokens, int n, float *logits, bool all_logits);
    void (*reset)(void *ctx);                                                   // empty the cache
} gen_engine_t;

typedef struct {
    int n_predict;            // tokens to generate (stops earlier at end of generation)
    bool ignore_eos;          // keep going past an end-of-generation token
    sampler_params_t sp;      // sampling
    FILE *stream;             // where text is streamed as it is generated (NULL = nowhere)
    FILE *logits_out;         // float32 rows for every prompt position and generated token, or NULL
    const char *logits_path;  // logits_out's file name, for messages (NULL = "logits")
} gen_opts_t;

typedef struct {
    int32_t *tokens;          // (n_tokens) generated ids, owned (free with gen_result_free)
    int n_tokens;
    char *text;               // generated text, valid UTF-8, NUL-terminated, owned
    size_t text_len;
    double prompt_ms;         // prompt evaluation
    double gen_ms;            // from the first sampled token to the last
    int n_gen_evals;          // single-token evaluations inside gen_ms
} gen_result_t;

struct tokenizer;
struct model_ctx;
struct cluster;

// An engine over a single node's model context (model_eval / model_ctx_reset); ctx is borrowed.
gen_engine_t gen_engine_model(struct model_ctx *ctx, int n_vocab);

// An engine over a cluster (cluster_eval / cluster_reset, sequence 0); cl is borrowed.
gen_engine_t gen_engine_cluster(struct cluster *cl, int n_vocab);

// Runs prompt_tokens through eng and generates. Returns 0 or a negative MLM_ code (message in err).
int gen_run(const gen_engine_t *eng, const struct tokenizer *tok, const int32_t *prompt_tokens, int n_prompt,
            const gen_opts_t *o, gen_result_t *res, char *err, size_t errlen);

void gen_result_free(gen_result_t *r);

#endif
