// libFuzzer target: registry member records (JSON that anyone with access to the Redis keys may write).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cluster/registry.h"

// --- helpers

// Whether the stored fields of a and b agree (field by field: padding is not compared).
static int same(const registry_member_t *a, const registry_member_t *b) {
    if (strcmp(a->id, b->id) || a->role != b->role || strcmp(a->endpoint, b->endpoint) || a->state != b->state ||
        a->seq != b->seq || a->beat_unix_ms != b->beat_unix_ms || a->joined_unix_ms != b->joined_unix_ms ||
        a->ttl_ms != b->ttl_ms || a->pid != b->pid || strcmp(a->host, b->host))
        return 0;
    const registry_profile_t *p = &a->prof, *q = &b->prof;
    if (p->n_cores != q->n_cores || p->mem_budget != q->mem_budget || p->mem_bw != q->mem_bw ||
        p->disk_bw != q->disk_bw || p->has_model != q->has_model || p->n_speeds != q->n_speeds)
        return 0;
    for (int i = 0; i < p->n_speeds; i++)
        if (p->speed[i].type != q->speed[i].type || p->speed[i].gflops != q->speed[i].gflops) return 0;
    return !p->has_model || (!memcmp(p->model_sha256, q->model_sha256, 32) && p->model_size == q->model_size);
}

// --- public API

// The bytes are a record as read from Redis (no NUL). A refusal must say why; an accepted record must
// be in range (the formatter takes it), and format + parse must give it back unchanged.
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > REGISTRY_RECORD_MAX + 16) return 0;
    registry_member_t m, back;
    char err[256] = "";
    if (registry_record_parse((const char *)data, size, &m, err, sizeof err) != 0) {
        if (!err[0]) abort();
        return 0;
    }
    char *text = NULL;
    if (registry_record_format(&m, (size & 1) != 0, &text) != 0) abort();
    if (registry_record_parse(text, strlen(text), &back, err, sizeof err) != 0) abort();
    if (!same(&m, &back)) abort();
    // The names are what the tables print.
    if (!strcmp(registry_role_name(m.role), "?") || !strcmp(registry_state_name(m.state), "?")) abort();
    free(text);
    return 0;
}
