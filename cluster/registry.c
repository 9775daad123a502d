// The node registry: member records (JSON), the wrappers over the backends (join, beat, list, reap, plan), the beater.
#include "cluster/registry.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cluster/registry_mem.h"
#include "cluster/registry_redis.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/sha256.h"
#include "worker/kernels/quant.h"

// --- types

struct registry {
    const struct registry_i *iface;  // the backend's table
    void *ctx;                       // the backend's context (owned)
    char url[512];                   // as opened, password hidden
    char err[1024];                  // the last call's error ("" after a success)
    registry_member_t *joined;       // (n_joined) records this handle joined, as last published
    int n_joined, cap_joined;
    int skipped;                     // malformed records the last list skipped
    uint64_t warn_hash;              // hash of the last warning printed about them (0 = none)
};

struct registry_beater {
    registry_t *r;                   // the thread's own handle (a dup of the caller's)
    pthread_t thread;
    pthread_mutex_t mu;              // guards everything below
    pthread_cond_t cv;               // signalled on stop, on a state change and on an update
    bool stop;                       // the thread should end
    bool kick;                       // beat at once
    bool rec_new;                    // rec was replaced: publish it whole (registry_join semantics)
    registry_member_t rec;           // the record to publish (id fixed)
    int period_ms;
    uint64_t beats, failures;        // published and failed beats
    bool failing;                    // the last beat failed (one stderr line per change)
    char last_err[1024];             // the last failure's text
};

// 2^53: the largest integer every JSON reader keeps exactly.
#define JSON_INT_MAX 9007199254740992.0
#define TTL_MAX_MS (24 * 3600 * 1000)

static const char *const role_names[REGISTRY_ROLE_COUNT] = {"worker", "standby", "coordinator"};
static const char *const state_names[REGISTRY_STATE_COUNT] = {"starting", "idle",     "loading",
                                                               "serving",  "draining", "lost"};

// --- helpers: time, text

static int64_t wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// Printable ASCII without spaces (empty allowed).
static bool text_ok(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || (unsigned char)*s >= 0x7f) return false;
    return true;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h ? h : 1;
}

// --- helpers: record checks and JSON

// Whether the stored fields of m are in range (what registry_record_format accepts). Reason in err.
static int record_check(const registry_member_t *m, char *err, size_t errlen) {
    if (!registry_id_valid(m->id)) return mlm_fail(err, errlen, MLM_EINVAL, "bad member id '%.80s'", m->id);
    if ((int)m->role < 0 || m->role >= REGISTRY_ROLE_COUNT)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: bad role %d", m->id, (int)m->role);
    if ((int)m->state < 0 || m->state >= REGISTRY_STATE_COUNT)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: bad state %d", m->id, (int)m->state);
    if (!memchr(m->endpoint, 0, sizeof m->endpoint) || !text_ok(m->endpoint))
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: bad endpoint", m->id);
    if (!memchr(m->host, 0, sizeof m->host) || !text_ok(m->host))
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: bad host name", m->id);
    if (m->ttl_ms <= 0 || m->ttl_ms > TTL_MAX_MS)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: ttl %d ms out of range", m->id, m->ttl_ms);
    if (m->pid < 0) return mlm_fail(err, errlen, MLM_EINVAL, "%s: bad pid", m->id);
    if ((double)m->seq > JSON_INT_MAX || m->beat_unix_ms < 0 || (double)m->beat_unix_ms > JSON_INT_MAX ||
        m->joined_unix_ms < 0 || (double)m->joined_unix_ms > JSON_INT_MAX)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: seq or times out of range", m->id);
    const registry_profile_t *p = &m->prof;
    if (p->n_cores > (1u << 20) || (double)p->mem_budget > JSON_INT_MAX || (double)p->mem_bw > JSON_INT_MAX ||
        (double)p->disk_bw > JSON_INT_MAX || (double)p->model_size > JSON_INT_MAX)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: profile figure out of range", m->id);
    if (p->n_speeds < 0 || p->n_speeds > REGISTRY_MAX_SPEEDS)
        return mlm_fail(err, errlen, MLM_EINVAL, "%s: %d speeds", m->id, p->n_speeds);
    for (int i = 0; i < p->n_speeds; i++) {
        const int t = p->speed[i].type;
        if (t < 0 || t >= QT_COUNT || qtype_from_name(qtype_name(t)) != t)
            return mlm_fail(err, errlen, MLM_EINVAL, "%s: speed of unknown type %d", m->id, t);
        if (!isfinite(p->speed[i].gflops) || p->speed[i].gflops < 0 || p->speed[i].gflops > 1e9)
            return mlm_fail(err, errlen, MLM_EINVAL, "%s: bad GFLOP/s for %s", m->id, qtype_name(t));
        for (int j = 0; j < i; j++)
            if (p->speed[j].type == t) return mlm_fail(err, errlen, MLM_EINVAL, "%s: %s twice", m->id, qtype_name(t));
    }
    return 0;
}

// A whole number in [0, max] from a JSON number (required unless def is not NULL: absent = *def).
static int json_uint(const cJSON *obj, const char *key, double max, const double *def, double *out, char *err,
                     size_t errlen) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it && def) {
        *out = *def;
        return 0;
    }
    if (!it) return mlm_fail(err, errlen, MLM_EFORMAT, "no \"%s\"", key);
    if (!cJSON_IsNumber(it)) return mlm_fail(err, errlen, MLM_EFORMAT, "\"%s\" is not a number", key);
    const double v = it->valuedouble;
    if (!isfinite(v) || v < 0 || v > max || floor(v) != v)
        return mlm_fail(err, errlen, MLM_EFORMAT, "\"%s\" is not a whole number in [0, %.0f]", key, max);
    *out = v;
    return 0;
}

// A string of printable ASCII without spaces into out (cap bytes with the NUL); optional when
// opt (absent = ""), non-empty when nonempty.
static int json_text(const cJSON *obj, const char *key, char *out, size_t cap, bool opt, bool nonempty, char *err,
                     size_t errlen) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it && opt) {
        out[0] = 0;
        return 0;
    }
    if (!it) return mlm_fail(err, errlen, MLM_EFORMAT, "no \"%s\"", key);
    if (!cJSON_IsString(it) || !it->valuestring)
        return mlm_fail(err, errlen, MLM_EFORMAT, "\"%s\" is not a string", key);
    const size_t n = strlen(it->valuestring);
    if (n >= cap) return mlm_fail(err, errlen, MLM_EFORMAT, "\"%s\" is longer than %zu bytes", key, cap - 1);
    if (!text_ok(it->valuestring) || (nonempty && n == 0))
        return mlm_fail(err, errlen, MLM_EFORMAT, "\"%s\" is empty or not printable ASCII without spaces", key);
    memcpy(out, it->valuestring, n + 1);
    return 0;
}

static int parse_profile(const cJSON *po, registry_profile_t *p, char *err, size_t errlen) {
    if (!cJSON_IsObject(po)) return mlm_fail(err, errlen, MLM_EFORMAT, "\"profile\" is not an object");
    double v;
    int rc;
    if ((rc = json_uint(po, "cores", 1u << 20, NULL, &v, err, errlen)) != 0) return rc;
    p->n_cores = (uint32_t)v;
    if ((rc = json_uint(po, "mem_budget", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    p->mem_budget = (uint64_t)v;
    if ((rc = json_uint(po, "mem_bw", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    p->mem_bw = (uint64_t)v;
    if ((rc = json_uint(po, "disk_bw", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    p->disk_bw = (uint64_t)v;
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(po, "gflops");
    if (!cJSON_IsObject(g)) return mlm_fail(err, errlen, MLM_EFORMAT, "\"profile.gflops\" is not an object");
    const cJSON *it;
    cJSON_ArrayForEach(it, g) {
        const int t = it->string ? qtype_from_name(it->string) : -1;
        if (t < 0) continue; // a type this version does not know: ignored (fields are only added)
        if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble) || it->valuedouble < 0 || it->valuedouble > 1e9)
            return mlm_fail(err, errlen, MLM_EFORMAT, "\"profile.gflops.%s\" is not a number in [0, 1e9]", it->string);
        for (int j = 0; j < p->n_speeds; j++)
            if (p->speed[j].type == t) return mlm_fail(err, errlen, MLM_EFORMAT, "type %s twice in gflops", it->string);
        if (p->n_speeds == REGISTRY_MAX_SPEEDS)
            return mlm_fail(err, errlen, MLM_EFORMAT, "more than %d types in gflops", REGISTRY_MAX_SPEEDS);
        p->speed[p->n_speeds++] = (registry_speed_t){t, it->valuedouble + 0.0}; // + 0.0: no negative zero
    }
    const cJSON *mo = cJSON_GetObjectItemCaseSensitive(po, "model");
    if (!mo || cJSON_IsNull(mo)) return 0;
    if (!cJSON_IsObject(mo)) return mlm_fail(err, errlen, MLM_EFORMAT, "\"profile.model\" is not an object or null");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(mo, "sha256");
    if (!cJSON_IsString(sh) || !sh->valuestring || strlen(sh->valuestring) != 64)
        return mlm_fail(err, errlen, MLM_EFORMAT, "\"profile.model.sha256\" is not 64 hex digits");
    for (int i = 0; i < 32; i++) {
        const int hi = hex_digit(sh->valuestring[2 * i]), lo = hex_digit(sh->valuestring[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return mlm_fail(err, errlen, MLM_EFORMAT, "\"profile.model.sha256\" is not 64 hex digits");
        p->model_sha256[i] = (uint8_t)(hi << 4 | lo);
    }
    if ((rc = json_uint(mo, "size", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    p->model_size = (uint64_t)v;
    p->has_model = true;
    return 0;
}

static int parse_record(const cJSON *o, registry_member_t *m, char *err, size_t errlen) {
    if (!cJSON_IsObject(o)) return mlm_fail(err, errlen, MLM_EFORMAT, "not a JSON object");
    double v;
    int rc;
    if ((rc = json_uint(o, "v", 1e9, NULL, &v, err, errlen)) != 0) return rc;
    if (v < 1) return mlm_fail(err, errlen, MLM_EFORMAT, "record version %.0f", v);
    if ((rc = json_text(o, "id", m->id, sizeof m->id, false, true, err, errlen)) != 0) return rc;
    char word[32];
    if ((rc = json_text(o, "role", word, sizeof word, false, true, err, errlen)) != 0) return rc;
    const int role = registry_role_from_name(word);
    if (role < 0) return mlm_fail(err, errlen, MLM_EFORMAT, "unknown role \"%s\"", word);
    m->role = (registry_role_t)role;
    if ((rc = json_text(o, "state", word, sizeof word, false, true, err, errlen)) != 0) return rc;
    const int state = registry_state_from_name(word);
    if (state < 0) return mlm_fail(err, errlen, MLM_EFORMAT, "unknown state \"%s\"", word);
    m->state = (registry_state_t)state;
    if ((rc = json_text(o, "endpoint", m->endpoint, sizeof m->endpoint, false, false, err, errlen)) != 0) return rc;
    if ((rc = json_text(o, "host", m->host, sizeof m->host, true, false, err, errlen)) != 0) return rc;
    if ((rc = json_uint(o, "seq", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    m->seq = (uint64_t)v;
    if ((rc = json_uint(o, "beat_ms", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    m->beat_unix_ms = (int64_t)v;
    if ((rc = json_uint(o, "joined_ms", JSON_INT_MAX, NULL, &v, err, errlen)) != 0) return rc;
    m->joined_unix_ms = (int64_t)v;
    if ((rc = json_uint(o, "ttl_ms", TTL_MAX_MS, NULL, &v, err, errlen)) != 0) return rc;
    if (v < 1) return mlm_fail(err, errlen, MLM_EFORMAT, "\"ttl_ms\" is 0");
    m->ttl_ms = (int)v;
    const double zero = 0;
    if ((rc = json_uint(o, "pid", 2147483647.0, &zero, &v, err, errlen)) != 0) return rc;
    m->pid = (int32_t)v;
    return parse_profile(cJSON_GetObjectItemCaseSensitive(o, "profile"), &m->prof, err, errlen);
}

// --- helpers: the handle

static int fail(registry_t *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(registry_t *r, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof r->err, fmt, ap);
    va_end(ap);
    return code;
}

static registry_member_t *joined_find(registry_t *r, const char *id) {
    for (int i = 0; i < r->n_joined; i++)
        if (!strcmp(r->joined[i].id, id)) return &r->joined[i];
    return NULL;
}

// Keeps a copy of m as the record this handle publishes for m->id. 0 or MLM_ENOMEM.
static int joined_set(registry_t *r, const registry_member_t *m) {
    registry_member_t *j = joined_find(r, m->id);
    if (!j) {
        if (r->n_joined == r->cap_joined) {
            const int cap = r->cap_joined ? 2 * r->cap_joined : 4;
            registry_member_t *p = realloc(r->joined, (size_t)cap * sizeof *p);
            if (!p) return MLM_ENOMEM;
            r->joined = p;
            r->cap_joined = cap;
        }
        j = &r->joined[r->n_joined++];
    }
    *j = *m;
    return 0;
}

static void joined_drop(registry_t *r, const char *id) {
    registry_member_t *j = joined_find(r, id);
    if (j) *j = r->joined[--r->n_joined];
}

// Publishes j (a joined record) as its next beat: seq + 1, beat time now.
static int publish(registry_t *r, registry_member_t *j, bool bump) {
    registry_member_t m = *j;
    m.seq++;
    m.beat_unix_ms = wall_ms();
    m.age_ms = 0;
    int rc = r->iface->put(r->ctx, &m, bump, r->err, sizeof r->err);
    if (rc == 0) *j = m;
    return rc;
}

static int by_id(const void *a, const void *b) {
    return strcmp(((const registry_member_t *)a)->id, ((const registry_member_t *)b)->id);
}

// --- public API: names and records

const char *registry_role_name(registry_role_t r) {
    return (int)r >= 0 && r < REGISTRY_ROLE_COUNT ? role_names[r] : "?";
}

int registry_role_from_name(const char *name) {
    for (int i = 0; name && i < REGISTRY_ROLE_COUNT; i++)
        if (!strcmp(name, role_names[i])) return i;
    return -1;
}

const char *registry_state_name(registry_state_t s) {
    return (int)s >= 0 && s < REGISTRY_STATE_COUNT ? state_names[s] : "?";
}

int registry_state_from_name(const char *name) {
    for (int i = 0; name && i < REGISTRY_STATE_COUNT; i++)
        if (!strcmp(name, state_names[i])) return i;
    return -1;
}

bool registry_id_valid(const char *id) {
    if (!id || !*id) return false;
    const size_t n = strnlen(id, REGISTRY_ID_MAX);
    return n < REGISTRY_ID_MAX && text_ok(id);
}

// Numbers are printed here, not by cJSON (whose shortest form may round a large integer or a double).
static bool add_uint(cJSON *o, const char *key, uint64_t v) {
    char b[32];
    snprintf(b, sizeof b, "%llu", (unsigned long long)v);
    return cJSON_AddRawToObject(o, key, b) != NULL;
}

static bool add_double(cJSON *o, const char *key, double v) {
    char b[40];
    snprintf(b, sizeof b, "%.17g", v); // exact: strtod gives the same double back
    return cJSON_AddRawToObject(o, key, b) != NULL;
}

int registry_record_format(const registry_member_t *m, bool with_age, char **out) {
    *out = NULL;
    char err[256];
    int rc = record_check(m, err, sizeof err);
    if (rc != 0) return rc;
    cJSON *o = cJSON_CreateObject();
    if (!o) return MLM_ENOMEM;
    bool ok = add_uint(o, "v", REGISTRY_RECORD_VERSION) && cJSON_AddStringToObject(o, "id", m->id) &&
              cJSON_AddStringToObject(o, "role", registry_role_name(m->role)) &&
              cJSON_AddStringToObject(o, "endpoint", m->endpoint) &&
              cJSON_AddStringToObject(o, "state", registry_state_name(m->state)) && add_uint(o, "seq", m->seq) &&
              add_uint(o, "beat_ms", (uint64_t)m->beat_unix_ms) &&
              add_uint(o, "joined_ms", (uint64_t)m->joined_unix_ms) &&
              add_uint(o, "ttl_ms", (uint64_t)m->ttl_ms) && add_uint(o, "pid", (uint64_t)m->pid) &&
              cJSON_AddStringToObject(o, "host", m->host);
    if (ok && with_age) ok = add_uint(o, "age_ms", (uint64_t)(m->age_ms > 0 ? m->age_ms : 0));
    cJSON *po = ok ? cJSON_AddObjectToObject(o, "profile") : NULL;
    const registry_profile_t *p = &m->prof;
    ok = po && add_uint(po, "cores", p->n_cores) && add_uint(po, "mem_budget", p->mem_budget) &&
         add_uint(po, "mem_bw", p->mem_bw) && add_uint(po, "disk_bw", p->disk_bw);
    cJSON *g = ok ? cJSON_AddObjectToObject(po, "gflops") : NULL;
    ok = g != NULL;
    for (int i = 0; ok && i < p->n_speeds; i++) ok = add_double(g, qtype_name(p->speed[i].type), p->speed[i].gflops);
    if (ok && p->has_model) {
        char hex[65];
        sha256_hex(p->model_sha256, hex);
        cJSON *mo = cJSON_AddObjectToObject(po, "model");
        ok = mo && cJSON_AddStringToObject(mo, "sha256", hex) && add_uint(mo, "size", p->model_size);
    } else if (ok) {
        ok = cJSON_AddNullToObject(po, "model") != NULL;
    }
    char *text = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text) return MLM_ENOMEM;
    *out = text;
    return 0;
}

int registry_record_parse(const char *text, size_t len, registry_member_t *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (!text || len == 0) return mlm_fail(err, errlen, MLM_EFORMAT, "empty record");
    if (len > REGISTRY_RECORD_MAX)
        return mlm_fail(err, errlen, MLM_EFORMAT, "record of %zu bytes (at most %d)", len, REGISTRY_RECORD_MAX);
    cJSON *o = cJSON_ParseWithLength(text, len);
    if (!o) return mlm_fail(err, errlen, MLM_EFORMAT, "not JSON");
    int rc = parse_record(o, out, err, errlen);
    cJSON_Delete(o);
    if (rc != 0) memset(out, 0, sizeof *out);
    return rc;
}

void registry_profile_from(registry_profile_t *out, const profile_t *p, uint32_t n_cores, uint64_t mem_budget) {
    memset(out, 0, sizeof *out);
    out->n_cores = n_cores;
    out->mem_budget = mem_budget;
    if (!p) return;
    for (int i = 0; i < p->n_types && out->n_speeds < REGISTRY_MAX_SPEEDS; i++)
        out->speed[out->n_speeds++] = (registry_speed_t){(int32_t)p->type[i], p->gflops[i]};
    out->mem_bw = p->mem_bw > 0 ? (uint64_t)p->mem_bw : 0;
    out->disk_bw = p->disk_bw > 0 ? (uint64_t)p->disk_bw : 0;
}

void registry_profile_from_hello(registry_profile_t *out, const msg_hello_t *h) {
    memset(out, 0, sizeof *out);
    out->n_cores = h->n_cores;
    out->mem_budget = h->ram_budget_bytes;
    for (int i = 0; i < h->n_speeds && out->n_speeds < REGISTRY_MAX_SPEEDS; i++)
        out->speed[out->n_speeds++] = (registry_speed_t){h->speeds[i].type, h->speeds[i].gflops};
    out->mem_bw = h->mem_bw_bytes_s;
    out->disk_bw = h->disk_read_bw_bytes_s;
    out->has_model = h->has_model;
    if (h->has_model) {
        memcpy(out->model_sha256, h->model_sha256, 32);
        out->model_size = h->model_size;
    }
}

void registry_profile_to_hello(const registry_profile_t *p, msg_hello_t *h) {
    h->n_cores = p->n_cores;
    h->ram_budget_bytes = p->mem_budget;
    h->n_speeds = p->n_speeds < MSG_MAX_SPEEDS ? p->n_speeds : MSG_MAX_SPEEDS;
    for (int i = 0; i < h->n_speeds; i++) h->speeds[i] = (msg_speed_t){p->speed[i].type, (float)p->speed[i].gflops};
    h->mem_bw_bytes_s = p->mem_bw;
    h->disk_read_bw_bytes_s = p->disk_bw;
    h->has_model = p->has_model;
    memset(h->model_sha256, 0, sizeof h->model_sha256);
    h->model_size = 0;
    if (p->has_model) {
        memcpy(h->model_sha256, p->model_sha256, 32);
        h->model_size = p->model_size;
    }
}

// --- public API: the handle

registry_t *registry_new(const struct registry_i *iface, void *ctx, const char *url) {
    registry_t *r = calloc(1, sizeof *r);
    if (!r) {
        if (iface && ctx) iface->destroy(ctx);
        return NULL;
    }
    r->iface = iface;
    r->ctx = ctx;
    snprintf(r->url, sizeof r->url, "%s", url ? url : "");
    return r;
}

int registry_open(registry_t **out, const char *url, char *err, size_t errlen) {
    *out = NULL;
    if (!url || !*url || !strcmp(url, "mem") || !strncmp(url, "mem://", 6))
        return registry_mem_open(out, url && !strncmp(url, "mem://", 6) ? url + 6 : "", err, errlen);
    if (!strncmp(url, "redis://", 8)) return registry_redis_open(out, url, err, errlen);
    return mlm_fail(err, errlen, MLM_EINVAL, "registry '%s': expected redis://HOST:PORT or mem://NAME", url);
}

int registry_dup(registry_t *r, registry_t **out, char *err, size_t errlen) {
    *out = NULL;
    void *ctx = NULL;
    int rc = r->iface->dup(r->ctx, &ctx, err, errlen);
    if (rc != 0) return rc;
    *out = registry_new(r->iface, ctx, r->url);
    return *out ? 0 : mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
}

void registry_destroy(registry_t **self_p) {
    if (!self_p || !*self_p) return;
    registry_t *r = *self_p;
    if (r->iface && r->ctx) r->iface->destroy(r->ctx);
    free(r->joined);
    free(r);
    *self_p = NULL;
}

const char *registry_name(const registry_t *r) { return r->iface->name(r->ctx); }
const char *registry_url(const registry_t *r) { return r->url; }
const char *registry_error(const registry_t *r) { return r->err; }
int registry_skipped(const registry_t *r) { return r->skipped; }

int registry_join(registry_t *r, const registry_member_t *rec, int ttl_ms) {
    r->err[0] = 0;
    if (!rec) return fail(r, MLM_EINVAL, "no record");
    registry_member_t m = *rec;
    m.ttl_ms = ttl_ms > 0 ? ttl_ms : REGISTRY_DEFAULT_TTL_MS;
    m.joined_unix_ms = wall_ms();
    m.beat_unix_ms = m.joined_unix_ms;
    m.seq = 0;
    m.age_ms = 0;
    int rc = record_check(&m, r->err, sizeof r->err);
    if (rc != 0) return rc;
    if (m.state == REGISTRY_STATE_LOST) return fail(r, MLM_EINVAL, "%s: a member cannot join as lost", m.id);
    registry_member_t old;
    char e2[512];
    rc = r->iface->get(r->ctx, m.id, &old, e2, sizeof e2);
    if (rc == 0) {
        if (old.state != REGISTRY_STATE_LOST && strcmp(old.endpoint, m.endpoint) != 0)
            return fail(r, MLM_ESTATE, "%s: the id is taken by a live member at %s (last beat %lld ms ago)", m.id,
                        old.endpoint[0] ? old.endpoint : "(no endpoint)", (long long)old.age_ms);
        m.seq = old.seq; // a rejoin carries on counting
    } else if (rc != MLM_ENOTFOUND && rc != MLM_EFORMAT) { // a malformed record is overwritten
        snprintf(r->err, sizeof r->err, "%s", e2);
        return rc;
    }
    m.seq++;
    if ((rc = r->iface->put(r->ctx, &m, true, r->err, sizeof r->err)) != 0) return rc;
    if (joined_set(r, &m) != 0) return fail(r, MLM_ENOMEM, "out of memory");
    return 0;
}

int registry_beat(registry_t *r, const char *id, registry_state_t state) {
    r->err[0] = 0;
    if (!registry_id_valid(id)) return fail(r, MLM_EINVAL, "bad member id");
    if ((int)state < 0 || state >= REGISTRY_STATE_LOST) return fail(r, MLM_EINVAL, "%s: bad state %d", id, (int)state);
    registry_member_t *j = joined_find(r, id);
    if (!j) { // joined through another handle: carry on from the stored record
        registry_member_t m;
        int rc = r->iface->get(r->ctx, id, &m, r->err, sizeof r->err);
        if (rc != 0) return rc;
        if (joined_set(r, &m) != 0) return fail(r, MLM_ENOMEM, "out of memory");
        j = joined_find(r, id);
    }
    const bool changed = j->state != state;
    j->state = state;
    return publish(r, j, changed);
}

int registry_leave(registry_t *r, const char *id) {
    r->err[0] = 0;
    if (!registry_id_valid(id)) return fail(r, MLM_EINVAL, "bad member id");
    joined_drop(r, id);
    return r->iface->del(r->ctx, id, r->err, sizeof r->err);
}

int registry_get(registry_t *r, const char *id, registry_member_t *out) {
    r->err[0] = 0;
    if (!registry_id_valid(id)) return fail(r, MLM_EINVAL, "bad member id");
    return r->iface->get(r->ctx, id, out, r->err, sizeof r->err);
}

int registry_list(registry_t *r, registry_member_t **members, int *n) {
    r->err[0] = 0;
    *members = NULL;
    *n = 0;
    char warn[1024] = "";
    int skipped = 0;
    registry_member_t *ms = NULL;
    int nm = 0;
    int rc = r->iface->list(r->ctx, &ms, &nm, &skipped, warn, sizeof warn, r->err, sizeof r->err);
    if (rc != 0) {
        free(ms);
        return rc;
    }
    r->skipped = skipped;
    const uint64_t h = skipped > 0 ? fnv1a(warn) : 0;
    if (h != r->warn_hash && skipped > 0)
        fprintf(stderr, "registry %s: skipped %d malformed record%s: %s\n", r->url, skipped, skipped == 1 ? "" : "s",
                warn);
    r->warn_hash = h;
    if (nm > 1) qsort(ms, (size_t)nm, sizeof *ms, by_id);
    *members = nm ? ms : NULL;
    if (!nm) free(ms);
    *n = nm;
    return 0;
}

int registry_reap(registry_t *r, int grace_ms, int *removed) {
    if (removed) *removed = 0;
    registry_member_t *ms = NULL;
    int n = 0;
    int rc = registry_list(r, &ms, &n);
    if (rc != 0) return rc;
    int k = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        if (ms[i].state != REGISTRY_STATE_LOST || ms[i].age_ms <= (int64_t)ms[i].ttl_ms + (grace_ms > 0 ? grace_ms : 0))
            continue;
        rc = r->iface->del(r->ctx, ms[i].id, r->err, sizeof r->err);
        if (rc == MLM_ENOTFOUND) rc = 0; // gone meanwhile
        else if (rc == 0) k++;
    }
    free(ms);
    if (removed) *removed = k;
    return rc;
}

int registry_epoch(registry_t *r, uint64_t *epoch) {
    r->err[0] = 0;
    return r->iface->epoch(r->ctx, epoch, r->err, sizeof r->err);
}

int registry_watch(registry_t *r, uint64_t *epoch, int timeout_ms) {
    const int64_t dl = mlm_deadline(timeout_ms < 0 ? 0 : timeout_ms);
    for (;;) {
        uint64_t now = 0;
        int rc = registry_epoch(r, &now);
        if (rc != 0) return rc;
        if (now != *epoch) {
            *epoch = now;
            return 0;
        }
        const int left = mlm_left_ms(dl);
        if (left <= 0) return fail(r, MLM_ETIMEOUT, "registry %s: no change within %d ms", r->url, timeout_ms);
        usleep((useconds_t)(left < 50 ? left : 50) * 1000);
    }
}

int registry_publish_plan(registry_t *r, const char *text) {
    r->err[0] = 0;
    if (!text) return fail(r, MLM_EINVAL, "no plan");
    const size_t len = strlen(text);
    if (len > REGISTRY_PLAN_MAX)
        return fail(r, MLM_ERANGE, "a plan of %zu bytes (at most %zu)", len, REGISTRY_PLAN_MAX);
    return r->iface->set_plan(r->ctx, text, len, r->err, sizeof r->err);
}

int registry_get_plan(registry_t *r, char **text) {
    r->err[0] = 0;
    *text = NULL;
    return r->iface->get_plan(r->ctx, text, r->err, sizeof r->err);
}

int registry_local_addr(registry_t *r, char *buf, size_t cap) {
    r->err[0] = 0;
    if (r->iface->local_addr) return r->iface->local_addr(r->ctx, buf, cap, r->err, sizeof r->err);
    snprintf(buf, cap, "127.0.0.1");
    return 0;
}

// --- public API: the beater

static void *beater_main(void *arg) {
    registry_beater_t *b = arg;
    pthread_mutex_lock(&b->mu);
    while (!b->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += b->period_ms / 1000;
        until.tv_nsec += (long)(b->period_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!b->stop && !b->kick)
            if (pthread_cond_timedwait(&b->cv, &b->mu, &until) == ETIMEDOUT) break;
        if (b->stop) break;
        b->kick = false;
        const registry_member_t rec = b->rec;
        const bool whole = b->rec_new;
        b->rec_new = false;
        pthread_mutex_unlock(&b->mu);

        registry_member_t *j = joined_find(b->r, rec.id);
        int rc;
        if (whole || !j) { // a new record: published whole, as a join would (the seq carries on)
            registry_member_t m = rec;
            m.seq = j ? j->seq : rec.seq;
            m.joined_unix_ms = j ? j->joined_unix_ms : rec.joined_unix_ms;
            rc = joined_set(b->r, &m);
            j = joined_find(b->r, rec.id);
            rc = rc == 0 ? publish(b->r, j, true) : MLM_ENOMEM;
        } else {
            rc = registry_beat(b->r, rec.id, rec.state);
        }

        pthread_mutex_lock(&b->mu);
        if (rc == 0) {
            b->beats++;
            if (b->failing) fprintf(stderr, "registry %s: %s beats again\n", registry_url(b->r), rec.id);
            b->failing = false;
        } else {
            b->failures++;
            snprintf(b->last_err, sizeof b->last_err, "%s", registry_error(b->r));
            if (!b->failing)
                fprintf(stderr, "registry %s: %s cannot beat (retrying every %d ms): %s\n", registry_url(b->r), rec.id,
                        b->period_ms, b->last_err);
            b->failing = true;
        }
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

int registry_beater_start(registry_beater_t **out, registry_t *r, const char *id, int period_ms) {
    *out = NULL;
    r->err[0] = 0;
    const registry_member_t *j = id ? joined_find(r, id) : NULL;
    if (!j) return fail(r, MLM_ENOTFOUND, "%s: did not join through this handle", id ? id : "(null)");
    registry_beater_t *b = calloc(1, sizeof *b);
    if (!b) return fail(r, MLM_ENOMEM, "out of memory");
    b->rec = *j;
    b->period_ms = period_ms > 0 ? period_ms : (j->ttl_ms / 3 > 0 ? j->ttl_ms / 3 : 1);
    int rc = registry_dup(r, &b->r, r->err, sizeof r->err);
    if (rc == 0 && joined_set(b->r, j) != 0) rc = fail(r, MLM_ENOMEM, "out of memory");
    pthread_condattr_t ca;
    bool made = false;
    if (rc == 0) {
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_mutex_init(&b->mu, NULL);
        pthread_cond_init(&b->cv, &ca);
        pthread_condattr_destroy(&ca);
        made = true;
        if (pthread_create(&b->thread, NULL, beater_main, b) != 0) rc = fail(r, MLM_ENOMEM, "cannot start a thread");
    }
    if (rc != 0) {
        if (made) {
            pthread_cond_destroy(&b->cv);
            pthread_mutex_destroy(&b->mu);
        }
        registry_destroy(&b->r);
        free(b);
        return rc;
    }
    *out = b;
    return 0;
}

void registry_beater_set_state(registry_beater_t *b, registry_state_t state) {
    if (!b || (int)state < 0 || state >= REGISTRY_STATE_LOST) return;
    pthread_mutex_lock(&b->mu);
    if (b->rec.state != state) {
        b->rec.state = state;
        b->kick = true;
        pthread_cond_signal(&b->cv);
    }
    pthread_mutex_unlock(&b->mu);
}

int registry_beater_update(registry_beater_t *b, const registry_member_t *rec) {
    if (!b || !rec) return MLM_EINVAL;
    registry_member_t m = *rec;
    char err[256];
    pthread_mutex_lock(&b->mu);
    m.ttl_ms = m.ttl_ms > 0 ? m.ttl_ms : b->rec.ttl_ms;
    m.seq = b->rec.seq;
    m.joined_unix_ms = b->rec.joined_unix_ms;
    m.beat_unix_ms = b->rec.beat_unix_ms;
    int rc = strcmp(m.id, b->rec.id) != 0 || m.state == REGISTRY_STATE_LOST ? MLM_EINVAL
                                                                             : record_check(&m, err, sizeof err);
    if (rc == 0) {
        b->rec = m;
        b->rec_new = true;
        b->kick = true;
        pthread_cond_signal(&b->cv);
    }
    pthread_mutex_unlock(&b->mu);
    return rc;
}

void registry_beater_stats(registry_beater_t *b, uint64_t *beats, uint64_t *failures, char *last_err, size_t cap) {
    pthread_mutex_lock(&b->mu);
    if (beats) *beats = b->beats;
    if (failures) *failures = b->failures;
    if (last_err && cap) snprintf(last_err, cap, "%s", b->last_err);
    pthread_mutex_unlock(&b->mu);
}

void registry_beater_stop(registry_beater_t **self_p) {
    if (!self_p || !*self_p) return;
    registry_beater_t *b = *self_p;
    pthread_mutex_lock(&b->mu);
    b->stop = true;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    pthread_join(b->thread, NULL);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    registry_destroy(&b->r);
    free(b);
    *self_p = NULL;
}
