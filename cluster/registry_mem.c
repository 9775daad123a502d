// The embedded registry backend: member records, heartbeat deadlines, epoch and plan in process memory.
#include "cluster/registry_mem.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/err.h"

// --- types

typedef struct {
    registry_member_t m;         // the record as last put (age_ms 0)
    int64_t beat_us;             // monotonic time of the last put
    int64_t expire_us;           // heartbeat deadline: beat_us + ttl
} mem_entry_t;

typedef struct {
    pthread_mutex_t mu;          // guards everything below
    int refs;                    // handles on the store
    mem_entry_t *e;              // (n) records, in join order
    int n, cap;
    uint64_t epoch;
    char *plan;                  // published plan (NUL-terminated), or NULL
    char name[128];              // the label it was opened with
} mem_store_t;

typedef struct {
    mem_store_t *s;              // shared (refcounted)
} mem_ctx_t;

// --- helpers

static int find(const mem_store_t *s, const char *id) {
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->e[i].m.id, id)) return i;
    return -1;
}

// The entry as a reader sees it: LOST once its heartbeat deadline passed, age from the last put.
static void report(const mem_entry_t *e, int64_t now, registry_member_t *out) {
    *out = e->m;
    out->age_ms = (now - e->beat_us) / 1000;
    if (now >= e->expire_us) out->state = REGISTRY_STATE_LOST;
}

static const char *mem_name(void *ctx) { return "mem"; }

static int mem_put(void *ctx, const registry_member_t *m, bool bump, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    pthread_mutex_lock(&s->mu);
    int i = find(s, m->id), rc = 0;
    if (i < 0) {
        if (s->n == REGISTRY_MAX_MEMBERS) {
            rc = mlm_fail(err, errlen, MLM_EFULL, "registry mem://%s: %d members already", s->name, s->n);
        } else if (s->n == s->cap) {
            const int cap = s->cap ? 2 * s->cap : 8;
            mem_entry_t *p = realloc(s->e, (size_t)cap * sizeof *p);
            if (!p) rc = mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
            else {
                s->e = p;
                s->cap = cap;
            }
        }
        if (rc == 0) i = s->n++;
    }
    if (rc == 0) {
        mem_entry_t *e = &s->e[i];
        e->m = *m;
        e->m.age_ms = 0;
        e->beat_us = mlm_now_us();
        e->expire_us = e->beat_us + (int64_t)m->ttl_ms * 1000;
        if (bump) s->epoch++;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int mem_get(void *ctx, const char *id, registry_member_t *out, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    pthread_mutex_lock(&s->mu);
    const int i = find(s, id);
    if (i >= 0) report(&s->e[i], mlm_now_us(), out);
    pthread_mutex_unlock(&s->mu);
    return i >= 0 ? 0 : mlm_fail(err, errlen, MLM_ENOTFOUND, "registry mem://%s: no member %s", s->name, id);
}

static int mem_del(void *ctx, const char *id, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    pthread_mutex_lock(&s->mu);
    const int i = find(s, id);
    if (i >= 0) {
        memmove(&s->e[i], &s->e[i + 1], (size_t)(s->n - i - 1) * sizeof *s->e);
        s->n--;
        s->epoch++;
    }
    pthread_mutex_unlock(&s->mu);
    return i >= 0 ? 0 : mlm_fail(err, errlen, MLM_ENOTFOUND, "registry mem://%s: no member %s", s->name, id);
}

static int mem_list(void *ctx, registry_member_t **out, int *n, int *skipped, char *warn, size_t cap, char *err,
                    size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    *out = NULL;
    *n = 0;
    *skipped = 0;
    pthread_mutex_lock(&s->mu);
    registry_member_t *ms = s->n ? malloc((size_t)s->n * sizeof *ms) : NULL;
    int rc = s->n && !ms ? mlm_fail(err, errlen, MLM_ENOMEM, "out of memory") : 0;
    if (rc == 0) {
        const int64_t now = mlm_now_us();
        for (int i = 0; i < s->n; i++) report(&s->e[i], now, &ms[i]);
        *out = ms;
        *n = s->n;
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int mem_epoch(void *ctx, uint64_t *out, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    pthread_mutex_lock(&s->mu);
    *out = s->epoch;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static int mem_set_plan(void *ctx, const char *text, size_t len, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    char *copy = malloc(len + 1);
    if (!copy) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    memcpy(copy, text, len);
    copy[len] = 0;
    pthread_mutex_lock(&s->mu);
    free(s->plan);
    s->plan = copy;
    s->epoch++;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static int mem_get_plan(void *ctx, char **text, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    *text = NULL;
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (!s->plan) rc = mlm_fail(err, errlen, MLM_ENOTFOUND, "registry mem://%s: no plan published", s->name);
    else if (!(*text = strdup(s->plan))) rc = mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int mem_dup(void *ctx, void **out, char *err, size_t errlen) {
    mem_store_t *s = ((mem_ctx_t *)ctx)->s;
    mem_ctx_t *c = calloc(1, sizeof *c);
    if (!c) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    pthread_mutex_lock(&s->mu);
    s->refs++;
    pthread_mutex_unlock(&s->mu);
    c->s = s;
    *out = c;
    return 0;
}

static void mem_destroy(void *ctx) {
    mem_ctx_t *c = ctx;
    mem_store_t *s = c->s;
    pthread_mutex_lock(&s->mu);
    const int left = --s->refs;
    pthread_mutex_unlock(&s->mu);
    if (left == 0) {
        pthread_mutex_destroy(&s->mu);
        free(s->e);
        free(s->plan);
        free(s);
    }
    free(c);
}

static const struct registry_i mem_iface = {
    .name = mem_name,
    .put = mem_put,
    .get = mem_get,
    .del = mem_del,
    .list = mem_list,
    .epoch = mem_epoch,
    .set_plan = mem_set_plan,
    .get_plan = mem_get_plan,
    .dup = mem_dup,
    .destroy = mem_destroy,
    .local_addr = NULL,
};

// --- public API

int registry_mem_open(registry_t **out, const char *name, char *err, size_t errlen) {
    *out = NULL;
    mem_store_t *s = calloc(1, sizeof *s);
    mem_ctx_t *c = calloc(1, sizeof *c);
    if (!s || !c) {
        free(s);
        free(c);
        return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&s->mu, NULL);
    s->refs = 1;
    snprintf(s->name, sizeof s->name, "%s", name ? name : "");
    c->s = s;
    char url[160];
    snprintf(url, sizeof url, "mem://%s", s->name);
    *out = registry_new(&mem_iface, c, url);
    return *out ? 0 : mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
}
