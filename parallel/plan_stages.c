// Even pipeline layouts built from tensor-parallel groups: a simple, fixed rule for tests and for
// layouts asked for by hand (--pp S --tp T) when no planner search is wanted.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan_stages.h"
#include "worker/err.h"

// --- public API

int plan_even_stages(const model_t *m, const plan_node_t *nodes, int n, int pp, int n_ctx, plan_t *out, char *err,
                     size_t errlen) {
    const model_hparams_t *hp = model_hparams(m);
    if (pp < 1 || pp > n || pp > hp->n_layer || n > PLAN_MAX_NODES) {
        snprintf(err, errlen, "%d stages over %d nodes and %d blocks", pp, n, hp->n_layer);
        return MLM_EINVAL;
    }
    plan_t *grp = malloc(sizeof *grp);
    if (!grp) return MLM_ENOMEM;
    memset(out, 0, sizeof *out);
    out->n = n;
    out->n_nodes = n;
    out->n_stages = pp;
    out->n_ctx = n_ctx;
    int rc = 0;
    for (int k = 0; k < pp && rc == 0; k++) {
        const int a = n * k / pp, b = n * (k + 1) / pp; // nodes [a, b)
        const int l0 = hp->n_layer * k / pp, l1 = hp->n_layer * (k + 1) / pp;
        out->stage_first[k] = a;
        rc = plan_tp(m, nodes + a, b - a, n_ctx, grp, err, errlen);
        for (int i = a; rc == 0 && i < b; i++) {
            plan_shard_t *s = &out->shard[i];
            *s = grp->shard[i - a];
            s->node = i;
            s->stage = k;
            s->s.l0 = l0;
            s->s.l1 = l1;
            if (l0 > 0 && l1 < hp->n_layer) s->s.v0 = s->s.v1 = 0; // a middle stage: no embedding, no output
            // Memory: the group's figures were for every block; keep this stage's share.
            s->weight_bytes = s->weight_bytes * (uint64_t)(l1 - l0) / (uint64_t)hp->n_layer;
            s->kv_bytes = s->kv_bytes * (uint64_t)(l1 - l0) / (uint64_t)hp->n_layer;
            s->peak_bytes = s->weight_bytes + s->kv_bytes;
            out->node[i] = nodes[i];
        }
    }
    out->stage_first[pp] = n;
    if (pp == 1) snprintf(out->layout, sizeof out->layout, "tp%d", n);
    else if (pp == n) snprintf(out->layout, sizeof out->layout, "pp%d", pp);
    else snprintf(out->layout, sizeof out->layout, "pp%dxtp%d", pp, n / pp);
    free(grp);
    return rc;
}
