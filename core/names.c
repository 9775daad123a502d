// Named constructors: the table behind attention devices and weight providers.
#include "core/names.h"

#include <string.h>

#include "core/err.h"

// --- internals

static void list_rebuild(mlm_names_t *t) { // under t->lock
    t->list[0] = 0;
    for (int i = 0; i < t->n; i++) {
        if (i) strcat(t->list, " ");
        strcat(t->list, t->e[i].name);
    }
}

// --- public API

int mlm_names_add(mlm_names_t *t, const char *name, mlm_name_fn make) {
    if (!name || !*name || strchr(name, ':') || strlen(name) >= MLM_NAME_LEN || !make) return MLM_EINVAL;
    pthread_mutex_lock(&t->lock);
    int rc = 0;
    for (int i = 0; i < t->n && rc == 0; i++)
        if (!strcmp(t->e[i].name, name)) rc = MLM_ESTATE;
    if (rc == 0 && t->n == MLM_NAMES_MAX) rc = MLM_EFULL;
    if (rc == 0) {
        memcpy(t->e[t->n].name, name, strlen(name) + 1);
        t->e[t->n++].make = make;
        list_rebuild(t);
    }
    pthread_mutex_unlock(&t->lock);
    return rc;
}

mlm_name_fn mlm_names_find(mlm_names_t *t, const char *name, size_t len) {
    mlm_name_fn make = NULL;
    pthread_mutex_lock(&t->lock);
    for (int i = 0; i < t->n && !make; i++)
        if (strlen(t->e[i].name) == len && memcmp(t->e[i].name, name, len) == 0) make = t->e[i].make;
    pthread_mutex_unlock(&t->lock);
    return make;
}

const char *mlm_names_list(mlm_names_t *t) {
    pthread_mutex_lock(&t->lock);
    if (!t->list[0]) list_rebuild(t);
    pthread_mutex_unlock(&t->lock);
    return t->list;
}
