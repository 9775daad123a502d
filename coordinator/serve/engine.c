// The server's engines: model contexts of this node, or a cluster's sequences.
#include "coordinator/serve/engine.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

// --- one node

typedef struct {
    const model_t *m;
    model_ctx_opts_t o;
    model_ctx_t *ctx[SERVE_MAX_SEQS]; // (max_seqs) made on first use
    int max_seqs;
} local_t;

static int local_step(void *p, int n_seqs, const int *seqs, const int32_t *const *tokens, const int *n,
                      float *const *logits, char *err, size_t errlen) {
    local_t *L = p;
    for (int k = 0; k < n_seqs; k++) {
        const int s = seqs[k];
        if (s < 0 || s >= L->max_seqs) return mlm_fail(err, errlen, MLM_EINVAL, "sequence %d out of range", s);
        if (!L->ctx[s]) {
            const int rc = model_ctx_new(&L->ctx[s], L->m, &L->o, err, errlen);
            if (rc != 0) return rc;
        }
        const int rc = model_eval(L->ctx[s], tokens[k], n[k], logits[k], false);
        if (rc != 0) return mlm_fail(err, errlen, rc, "sequence %d: evaluation failed: %s", s, mlm_strerror(rc));
    }
    return 0;
}

static void local_drop(void *p, int seq) {
    local_t *L = p;
    if (seq >= 0 && seq < L->max_seqs && L->ctx[seq]) model_ctx_reset(L->ctx[seq]);
}

static void local_free(void *p) {
    local_t *L = p;
    for (int i = 0; i < L->max_seqs; i++) model_ctx_destroy(&L->ctx[i]);
    free(L);
}

// --- a cluster

typedef struct {
    cluster_t *cl;
} remote_t;

static int remote_step(void *p, int n_seqs, const int *seqs, const int32_t *const *tokens, const int *n,
                       float *const *logits, char *err, size_t errlen) {
    remote_t *R = p;
    const int rc = cluster_eval_batch(R->cl, n_seqs, seqs, tokens, n, logits);
    if (rc != 0)
        return mlm_fail(err, errlen, rc, "cluster step failed: %s",
                        cluster_error(R->cl)[0] ? cluster_error(R->cl) : mlm_strerror(rc));
    return 0;
}

static void remote_drop(void *p, int seq) { cluster_reset_seq(((remote_t *)p)->cl, seq); }

static void remote_free(void *p) { free(p); }

static void remote_idle(void *p) { cluster_ping(((remote_t *)p)->cl, 1000); }

static char *remote_snapshot(void *p) {
    cJSON *j = cluster_status_json(((remote_t *)p)->cl);
    char *txt = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    return txt;
}

static char *local_snapshot(void *p) {
    const local_t *L = p;
    int live = 0;
    for (int i = 0; i < L->max_seqs; i++) live += L->ctx[i] != NULL;
    char *txt = malloc(256);
    if (txt)
        snprintf(txt, 256,
                 "{\"layout\":\"single node\",\"faults\":0,\"recovered\":0,\"contexts\":%d,\"nodes\":"
                 "[{\"id\":\"this node\",\"endpoint\":\"\",\"state\":\"computing\",\"heartbeat_age_ms\":0}],"
                 "\"shards\":[],\"recoveries\":[]}", live);
    return txt;
}

// --- public API

int serve_engine_local(serve_engine_t *e, const model_t *m, const model_ctx_opts_t *opts, int max_seqs, char *err,
                       size_t errlen) {
    memset(e, 0, sizeof *e);
    if (max_seqs < 1 || max_seqs > SERVE_MAX_SEQS)
        return mlm_fail(err, errlen, MLM_EINVAL, "sequences in flight: %d is outside 1..%d", max_seqs, SERVE_MAX_SEQS);
    local_t *L = calloc(1, sizeof *L);
    if (!L) return MLM_ENOMEM;
    L->m = m;
    L->o = *opts;
    L->max_seqs = max_seqs;
    const model_hparams_t *hp = model_hparams(m);
    *e = (serve_engine_t){.ctx = L, .n_vocab = hp->n_vocab, .max_seqs = max_seqs, .step = local_step,
                          .drop = local_drop, .free = local_free, .snapshot = local_snapshot};
    e->n_ctx = opts->n_ctx > 0 ? opts->n_ctx : (hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    L->o.n_ctx = e->n_ctx;
    e->n_batch = opts->n_batch > 0 ? opts->n_batch : 64;
    return 0;
}

int serve_engine_cluster(serve_engine_t *e, cluster_t *cl, int n_ctx, int n_batch, char *err, size_t errlen) {
    memset(e, 0, sizeof *e);
    remote_t *R = calloc(1, sizeof *R);
    if (!R) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    R->cl = cl;
    const model_hparams_t *hp = model_hparams(cluster_model(cl));
    *e = (serve_engine_t){.ctx = R, .n_vocab = hp->n_vocab, .n_ctx = n_ctx, .max_seqs = CLUSTER_MAX_SEQS,
                          .n_batch = n_batch > 0 ? n_batch : 64, .step = remote_step, .drop = remote_drop,
                          .free = remote_free, .idle = remote_idle, .snapshot = remote_snapshot, .cluster = cl};
    return 0;
}

void serve_engine_destroy(serve_engine_t *e) {
    if (e && e->free) e->free(e->ctx);
    if (e) memset(e, 0, sizeof *e);
}
