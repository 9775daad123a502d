// A cluster's workers from a node registry, and its plan published there (run, coordinator, serve).
#ifndef MESHLM_REG_WORKERS_H
#define MESHLM_REG_WORKERS_H

#include "cluster/registry.h"
#include "parallel/plan.h"

// --registry: the live workers' endpoints, then the live standbys' (they join plans only to replace
// lost workers), as a --workers list (*list, caller frees); *n_standby gets the standbys' count and *out
// the open registry (caller destroys). 0 or MLM_E* (message printed as "meshlm CMD: ...").
int reg_workers_find(const char *url, const char *cmd, char **list, int *n_standby, registry_t **out);

// Publishes the plan in registry arg (best effort: a failure is a warning); a cluster_opts_t.on_plan.
void reg_workers_publish_plan(void *arg, const plan_t *p);

#endif
