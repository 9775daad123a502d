// A cluster's workers from a node registry, and its plan published there.
#include "coordinator/cli/reg_workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

// --- public API

int reg_workers_find(const char *url, const char *cmd, char **list, int *n_standby, registry_t **out) {
    char err[512];
    int rc = registry_open(out, url, err, sizeof err);
    registry_member_t *m = NULL;
    int n = 0;
    if (rc == 0) rc = registry_list(*out, &m, &n);
    if (rc != 0) {
        fprintf(stderr, "meshlm %s: registry %s: %s\n", cmd, url, *out ? registry_error(*out) : err);
        return rc;
    }
    size_t cap = 1, used = 0;
    for (int i = 0; i < n; i++) cap += strlen(m[i].endpoint) + 1;
    *list = calloc(1, cap);
    int workers = 0;
    *n_standby = 0;
    for (int pass = 0; *list && pass < 2; pass++) // workers first, then standbys
        for (int i = 0; i < n; i++) {
            const registry_member_t *x = &m[i];
            const bool want = pass == 0 ? x->role == REGISTRY_ROLE_WORKER : x->role == REGISTRY_ROLE_STANDBY;
            if (!want || x->state == REGISTRY_STATE_LOST || !x->endpoint[0]) continue;
            used += (size_t)snprintf(*list + used, cap - used, "%s%s", used ? "," : "", x->endpoint);
            if (pass == 0) workers++;
            else (*n_standby)++;
        }
    free(m);
    if (!*list) return MLM_ENOMEM;
    if (workers == 0) {
        fprintf(stderr, "meshlm %s: registry %s lists no live worker (meshlm nodes --registry %s)\n", cmd, url, url);
        return MLM_ENOTFOUND;
    }
    fprintf(stderr, "meshlm: registry %s: %d worker(s) and %d standby(s)\n", url, workers, *n_standby);
    return 0;
}

// Publishes the plan in the registry (best effort: a failure is a warning); a cluster_opts_t.on_plan.
void reg_workers_publish_plan(void *arg, const plan_t *p) {
    registry_t *r = arg;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return;
    plan_file_write(p, f);
    fclose(f);
    if (registry_publish_plan(r, text) != 0) fprintf(stderr, "meshlm: registry: cannot publish the plan: %s\n", registry_error(r));
    free(text);
}

