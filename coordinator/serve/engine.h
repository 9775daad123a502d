// What the server steps: several sequences in flight over one model, on this node or over a cluster.
#ifndef MESHLM_SERVE_ENGINE_H
#define MESHLM_SERVE_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/runtime/cluster.h"
#include "worker/model/model.h"

#define SERVE_MAX_SEQS CLUSTER_MAX_SEQS

typedef struct serve_engine {
    void *ctx;                // the backend's state (owned; freed by serve_engine_destroy)
    int n_vocab;              // logits per row
    int n_ctx;                // positions each sequence holds
    int max_seqs;             // sequence ids [0, max_seqs)
    int n_batch;              // prompt tokens per sequence per step: the chunks `run` evaluates a prompt in,
                              // so a sequence's rows are the ones `run` computes
    // One step: sequence seqs[k] takes n[k] tokens (tokens[k]) after the ones it holds (a sequence
    // that holds none starts at position 0); logits[k] gets its last token's row. 0 or MLM_E*.
    int (*step)(void *ctx, int n_seqs, const int *seqs, const int32_t *const *tokens, const int *n,
                float *const *logits, char *err, size_t errlen);
    void (*drop)(void *ctx, int seq); // forget sequence seq (its id can start again)
    void (*free)(void *ctx);
    void (*idle)(void *ctx);          // called about every second while no sequence is in flight, from the
                                      // thread that steps: a cluster pings its workers (cluster_ping), so a
                                      // lost one is found and re-planned around between requests; or NULL
    char *(*snapshot)(void *ctx);     // the engine's state as a JSON object text (caller frees), called by
                                      // the thread that steps (cluster_status_json), or NULL
    const cluster_t *cluster; // the cluster stepped, or NULL on a single node (borrowed)
} serve_engine_t;

// Sequences on this node: a model context of opts->n_ctx positions per sequence, made on first use.
// m is borrowed. 0, or MLM_EINVAL (max_seqs outside 1..SERVE_MAX_SEQS).
int serve_engine_local(serve_engine_t *e, const model_t *m, const model_ctx_opts_t *opts, int max_seqs, char *err,
                       size_t errlen);

// Sequences over a cluster (cluster_eval_batch); cl is borrowed. n_batch: the prompt chunk (0 = 64).
int serve_engine_cluster(serve_engine_t *e, cluster_t *cl, int n_ctx, int n_batch, char *err, size_t errlen);

void serve_engine_destroy(serve_engine_t *e);

#endif
