// Even pipeline layouts: S stages of consecutive nodes, blocks split evenly, each stage a
// tensor-parallel group split by speed (plan_tp). A fixed rule, no search.
#ifndef MESHLM_PLAN_STAGES_H
#define MESHLM_PLAN_STAGES_H

#include "parallel/plan.h"

// Stage k gets nodes [n*k/pp, n*(k+1)/pp) and blocks [n_layer*k/pp, n_layer*(k+1)/pp); the first
// and last stages split the vocabulary rows (embedding, output), middle stages hold none.
// 0, MLM_EINVAL (pp outside 1..min(n, n_layer)), MLM_EFULL (a group does not fit), MLM_ENOMEM.
int plan_even_stages(const model_t *m, const plan_node_t *nodes, int n, int pp, int n_ctx, plan_t *out, char *err,
                     size_t errlen);

#endif
