// Fault injection: the spec parser, the seeded per-message decisions, the receive-side link model and the comm wrapper.
#include "transport/fault.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/bytes.h"
#include "core/err.h"

// --- types

#define MAX_TEXT 65536              // longest spec text accepted
#define MAX_RANK 65535              // largest rank or worker number in a rule
#define MAX_MS 3600000.0            // longest delay, jitter, rto or freeze (an hour)
#define MIN_MBIT 0.001              // slowest link (1 kbit/s)
#define MAX_MBIT 1e9                // fastest link
#define DEFAULT_RTO_MS 200.0        // loss without rto_ms
#define MAX_SER_NS 86400e9          // serialization delay cap (a day), keeps the arithmetic finite
#define PUMP_MAX 4096               // messages taken from the inner comm per non-blocking pass

// The two stamp forms: its own frame, or appended to the last of COMM_MAX_FRAMES frames.
static const uint8_t STAMP_FRAME_MAGIC[8] = {'M', 'L', 'M', 'F', 'S', 'T', 'M', 'P'};
static const uint8_t STAMP_MERGED_MAGIC[8] = {'M', 'L', 'M', 'F', 'S', 'T', 'M', 'Q'};

// Keys of rules (bit masks).
enum {
    K_LINK = 1 << 0,
    K_MS = 1 << 1,
    K_JITTER = 1 << 2,
    K_MBIT = 1 << 3,
    K_P = 1 << 4,
    K_RTO = 1 << 5,
    K_WORKER = 1 << 6,
    K_AFTER = 1 << 7,
};

static const struct {
    const char *name;           // as written
    int bit;                    // K_*
} KEYS[] = {
    {"link", K_LINK}, {"ms", K_MS},         {"jitter", K_JITTER}, {"mbit", K_MBIT},
    {"p", K_P},       {"rto_ms", K_RTO},    {"worker", K_WORKER}, {"after_tokens", K_AFTER},
};

static const struct {
    fault_kind_t kind;
    const char *name;           // as written
    int required;               // K_* bits that must appear
    int optional;               // K_* bits that may appear
} KINDS[] = {
    {FAULT_DELAY, "delay", K_LINK | K_MS, K_JITTER},
    {FAULT_BW, "bw", K_LINK | K_MBIT, 0},
    {FAULT_LOSS, "loss", K_LINK | K_P, K_RTO},
    {FAULT_DROP, "drop", K_LINK | K_P, 0},
    {FAULT_KILL, "kill", K_WORKER | K_AFTER, 0},
    {FAULT_FREEZE, "freeze", K_WORKER | K_AFTER | K_MS, 0},
    {FAULT_PARTITION, "partition", K_LINK | K_AFTER, 0},
};

// One rule as parsed (fields its kind does not use stay at their defaults).
typedef struct {
    fault_kind_t kind;
    int a, b;                   // link ends, a < b; b == FAULT_ANY for `A-*`, both for `*`; -1 without link
    int worker;                 // kill, freeze; -1 otherwise
    int64_t after_tokens;       // kill, freeze, partition
    double ms;                  // delay, freeze
    double jitter;              // delay
    double mbit;                // bw
    double p;                   // loss, drop
    double rto_ms;              // loss
} rule_t;

struct fault_spec {
    rule_t *rules;              // (n_rules) in text order
    int n_rules;                // rules (seed not counted)
    fault_event_t *events;      // (n_events) kill, freeze and partition rules in text order
    int n_events;               // events
    uint64_t seed;              // seed=N, 0 when unset
    bool has_seed;              // seed=N was given
    char *text;                 // canonical text (owned)
};

// --- helpers: text

// A growing string; on allocation failure ok turns false and appends are ignored.
typedef struct {
    char *s;                    // (cap) text, NUL-terminated
    size_t len, cap;            // used bytes (without NUL), allocated bytes
    bool ok;                    // no allocation failed
} sbuf_t;

static void sb_add(sbuf_t *b, const char *fmt, ...) {
    if (!b->ok) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (k < 0) {
            b->ok = false;
            return;
        }
        if (b->s && b->len + (size_t)k < b->cap) {
            b->len += (size_t)k;
            return;
        }
        size_t cap = (b->cap ? b->cap * 2 : 128) + (size_t)k;
        char *n = realloc(b->s, cap);
        if (!n) {
            b->ok = false;
            return;
        }
        b->s = n;
        b->cap = cap;
    }
}

// v as an integer when it is one, else the shortest %g form that reads back as exactly v.
static void fmt_num(char *out, size_t cap, double v) {
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(out, cap, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v) return;
    }
}

static void sb_num(sbuf_t *b, const char *key, double v) {
    char num[40];
    fmt_num(num, sizeof num, v);
    sb_add(b, ":%s=%s", key, num);
}

static void sb_link(sbuf_t *b, int a, int bb) {
    if (a == FAULT_ANY) sb_add(b, ":link=*");
    else if (bb == FAULT_ANY) sb_add(b, ":link=%d-*", a);
    else sb_add(b, ":link=%d-%d", a, bb);
}

// Canonical text of the parsed rules into s->text. 0 or MLM_ENOMEM.
static int make_text(fault_spec_t *s) {
    sbuf_t b = {NULL, 0, 0, true};
    sb_add(&b, "%s", "");
    for (int i = 0; i < s->n_rules; i++) {
        const rule_t *r = &s->rules[i];
        sb_add(&b, "%s%s", i ? "," : "", fault_kind_name(r->kind));
        switch (r->kind) {
        case FAULT_DELAY:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "ms", r->ms);
            if (r->jitter > 0) sb_num(&b, "jitter", r->jitter);
            break;
        case FAULT_BW:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "mbit", r->mbit);
            break;
        case FAULT_LOSS:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "p", r->p);
            sb_num(&b, "rto_ms", r->rto_ms);
            break;
        case FAULT_DROP:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "p", r->p);
            break;
        case FAULT_KILL: sb_add(&b, ":worker=%d:after_tokens=%lld", r->worker, (long long)r->after_tokens); break;
        case FAULT_FREEZE:
            sb_add(&b, ":worker=%d:after_tokens=%lld", r->worker, (long long)r->after_tokens);
            sb_num(&b, "ms", r->ms);
            break;
        case FAULT_PARTITION:
            sb_link(&b, r->a, r->b);
            sb_add(&b, ":after_tokens=%lld", (long long)r->after_tokens);
            break;
        }
    }
    if (s->has_seed) sb_add(&b, "%sseed=%llu", s->n_rules ? "," : "", (unsigned long long)s->seed);
    if (!b.ok) {
        free(b.s);
        return MLM_ENOMEM;
    }
    s->text = b.s;
    return 0;
}

// --- helpers: parsing

// A decimal real made of digits, '.', exponent and signs only (no inf, nan or hex). 0 or -1.
static int parse_real(const char *v, double *out) {
    if (!*v) return -1;
    for (const char *c = v; *c; c++)
        if (!isdigit((unsigned char)*c) && !strchr(".eE+-", *c)) return -1;
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (*end || errno || !isfinite(d)) return -1;
    *out = d;
    return 0;
}

// A decimal integer in [lo, hi]. 0 or -1.
static int parse_int(const char *v, long long lo, long long hi, long long *out) {
    if (!*v) return -1;
    for (const char *c = v; *c; c++)
        if (!isdigit((unsigned char)*c) && !(c == v && *c == '-')) return -1;
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (*end || errno || x < lo || x > hi) return -1;
    *out = x;
    return 0;
}

// A rank or `*`.
static int parse_end(const char *v, int *out) {
    if (strcmp(v, "*") == 0) {
        *out = FAULT_ANY;
        return 0;
    }
    long long x;
    if (parse_int(v, 0, MAX_RANK, &x) != 0) return -1;
    *out = (int)x;
    return 0;
}

// `A-B`, `A-*`, `*-A`, `*` or `*-*` into a < b, b = ANY for one star, both ANY for all links.
static int parse_link(const char *v, int *a, int *b, char *why, size_t whylen) {
    char tmp[64];
    if (strlen(v) >= sizeof tmp) {
        snprintf(why, whylen, "link '%s' is too long", v);
        return -1;
    }
    strcpy(tmp, v);
    char *dash = strchr(tmp, '-');
    int x, y;
    if (!dash) {
        if (strcmp(tmp, "*") != 0) {
            snprintf(why, whylen, "link '%s' is not A-B, A-* or *", v);
            return -1;
        }
        *a = *b = FAULT_ANY;
        return 0;
    }
    *dash = 0;
    if (parse_end(tmp, &x) != 0 || parse_end(dash + 1, &y) != 0) {
        snprintf(why, whylen, "link '%s' is not A-B, A-* or * (ranks 0..%d)", v, MAX_RANK);
        return -1;
    }
    if (x != FAULT_ANY && x == y) {
        snprintf(why, whylen, "link '%s' joins rank %d to itself", v, x);
        return -1;
    }
    if (x == FAULT_ANY) { // the star goes second
        x = y;
        y = FAULT_ANY;
    }
    if (x != FAULT_ANY && y != FAULT_ANY && y < x) {
        int t = x;
        x = y;
        y = t;
    }
    *a = x;
    *b = y;
    return 0;
}

// Parses one key=value into r. 0, or -1 with why filled.
static int parse_kv(rule_t *r, int bit, const char *key, const char *v, char *why, size_t whylen) {
    double d = 0;
    long long x = 0;
    switch (bit) {
    case K_LINK: return parse_link(v, &r->a, &r->b, why, whylen);
    case K_WORKER:
        if (parse_int(v, 0, MAX_RANK, &x) != 0) break;
        r->worker = (int)x;
        return 0;
    case K_AFTER:
        if (parse_int(v, 0, LLONG_MAX, &x) != 0) break;
        r->after_tokens = x;
        return 0;
    case K_MBIT:
        if (parse_real(v, &d) != 0 || d < MIN_MBIT || d > MAX_MBIT) {
            snprintf(why, whylen, "mbit '%s' is not a number in [%g, %g]", v, MIN_MBIT, MAX_MBIT);
            return -1;
        }
        r->mbit = d;
        return 0;
    case K_P:
        if (parse_real(v, &d) != 0 || d < 0 || d > 1) {
            snprintf(why, whylen, "p '%s' is not a probability in [0, 1]", v);
            return -1;
        }
        r->p = d;
        return 0;
    default: // milliseconds
        if (parse_real(v, &d) != 0 || d < 0 || d > MAX_MS) {
            snprintf(why, whylen, "%s '%s' is not a number of milliseconds in [0, %.0f]", key, v, MAX_MS);
            return -1;
        }
        if (bit == K_MS) r->ms = d;
        else if (bit == K_JITTER) r->jitter = d;
        else r->rto_ms = d;
        return 0;
    }
    snprintf(why, whylen, "%s '%s' is not an integer in [0, %lld]", key, v, bit == K_AFTER ? LLONG_MAX : (long long)MAX_RANK);
    return -1;
}

// Parses one rule (already trimmed, NUL-terminated, modified in place) into r. 0, or -1 with why.
static int parse_rule(char *text, rule_t *r, char *why, size_t whylen) {
    *r = (rule_t){.a = -1, .b = -1, .worker = -1, .rto_ms = DEFAULT_RTO_MS};
    char *pairs = strchr(text, ':'); // the key=value pairs after the kind
    if (pairs) *pairs++ = 0;
    char *kind = text;
    int k = -1;
    for (int i = 0; i < (int)(sizeof KINDS / sizeof KINDS[0]); i++)
        if (strcmp(kind, KINDS[i].name) == 0) k = i;
    if (k < 0) {
        snprintf(why, whylen, "unknown kind '%s' (delay, bw, loss, drop, kill, freeze, partition, seed=N)", kind);
        return -1;
    }
    r->kind = KINDS[k].kind;
    int seen = 0;
    for (char *kv = pairs; kv;) {
        char *colon = strchr(kv, ':');
        if (colon) *colon = 0;
        if (!*kv) {
            snprintf(why, whylen, "empty key=value (two ':' in a row or one at the end)");
            return -1;
        }
        char *eq = strchr(kv, '=');
        if (eq) *eq = 0;
        int bit = 0;
        for (int i = 0; i < (int)(sizeof KEYS / sizeof KEYS[0]); i++)
            if (strcmp(kv, KEYS[i].name) == 0) bit = KEYS[i].bit;
        if (!bit || !((KINDS[k].required | KINDS[k].optional) & bit)) {
            snprintf(why, whylen, "unknown key '%s' for %s", kv, KINDS[k].name);
            return -1;
        }
        if (!eq) {
            snprintf(why, whylen, "key '%s' has no value (%s=...)", kv, kv);
            return -1;
        }
        if (seen & bit) {
            snprintf(why, whylen, "key '%s' given twice", kv);
            return -1;
        }
        seen |= bit;
        if (parse_kv(r, bit, kv, eq + 1, why, whylen) != 0) return -1;
        kv = colon ? colon + 1 : NULL;
    }
    int missing = KINDS[k].required & ~seen;
    if (missing) {
        for (int i = 0; i < (int)(sizeof KEYS / sizeof KEYS[0]); i++)
            if (missing & KEYS[i].bit) {
                snprintf(why, whylen, "%s needs %s=...", KINDS[k].name, KEYS[i].name);
                break;
            }
        return -1;
    }
    return 0;
}

static bool is_link_kind(fault_kind_t k) { return k == FAULT_DELAY || k == FAULT_BW || k == FAULT_LOSS || k == FAULT_DROP; }

// Adds one rule (trimmed, NUL-terminated, modified in place) to s. On error why is filled.
static void add_rule(fault_spec_t *s, char *text, char *why, size_t whylen) {
    if (!*text) {
        snprintf(why, whylen, "empty rule");
        return;
    }
    if (strncmp(text, "seed", 4) == 0 && (text[4] == '=' || text[4] == ':')) {
        const char *v = text + 5;
        char *end = NULL;
        errno = 0;
        unsigned long long u = isdigit((unsigned char)*v) ? strtoull(v, &end, 10) : 0;
        if (text[4] == ':') snprintf(why, whylen, "write the seed as seed=N");
        else if (s->has_seed) snprintf(why, whylen, "seed given twice");
        else if (!end || *end || errno) snprintf(why, whylen, "seed '%s' is not an unsigned integer", v);
        else {
            s->seed = u;
            s->has_seed = true;
        }
        return;
    }
    rule_t *r = &s->rules[s->n_rules];
    if (parse_rule(text, r, why, whylen) != 0) return;
    s->n_rules++;
    if (!is_link_kind(r->kind))
        s->events[s->n_events++] =
            (fault_event_t){r->kind, r->worker, r->a, r->b, r->after_tokens, r->kind == FAULT_FREEZE ? r->ms : 0};
}

// How specifically rule r names the link x-y: -1 not at all, 0 `*`, 1 `A-*`, 2 `A-B`.
static int match(const rule_t *r, int x, int y) {
    if (r->a == FAULT_ANY) return 0;
    if (r->b == FAULT_ANY) return r->a == x || r->a == y ? 1 : -1;
    return (r->a == x && r->b == y) || (r->a == y && r->b == x) ? 2 : -1;
}

// --- helpers: decisions

static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// A uniform number in [0, 1) fixed by (seed, src, dst, counter, what).
static double unit(uint64_t seed, int src, int dst, uint64_t counter, uint64_t what) {
    uint64_t h = mix64(seed);
    h = mix64(h ^ (uint64_t)(uint32_t)src);
    h = mix64(h ^ (uint64_t)(uint32_t)dst);
    h = mix64(h ^ counter);
    h = mix64(h ^ what);
    return (double)(h >> 11) * 0x1.0p-53;
}

static void decide(uint64_t seed, const fault_link_t *p, int src, int dst, uint64_t counter, fault_decision_t *out) {
    out->drop = p->drop_p > 0 && unit(seed, src, dst, counter, 1) < p->drop_p;
    out->lost = p->loss_p > 0 && unit(seed, src, dst, counter, 2) < p->loss_p;
    out->jitter_ms = p->jitter_ms > 0 ? p->jitter_ms * unit(seed, src, dst, counter, 3) : 0;
}

static void stamp_write(uint8_t *out, const uint8_t magic[8]) {
    memcpy(out, magic, 8);
    mlm_put64(out + 8, (uint64_t)fault_now_ns());
}

static int64_t stamp_value(const uint8_t *p) {
    uint64_t v = mlm_get64(p + 8);
    return v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v;
}

// --- public API: specs

int fault_parse(const char *text, fault_spec_t **out, char *err, size_t errlen) {
    if (out) *out = NULL;
    if (!text || !out) {
        return mlm_fail(err, errlen, MLM_EINVAL, "fault spec: no text");
    }
    size_t n = strlen(text);
    if (n > MAX_TEXT) {
        return mlm_fail(err, errlen, MLM_EINVAL, "fault spec: %zu characters, at most %d", n, MAX_TEXT);
    }
    fault_spec_t *s = calloc(1, sizeof *s);
    char *buf = strdup(text); // rules are cut out of it in place
    size_t cap = 1;           // commas + 1 bounds the rules
    for (const char *c = text; *c; c++) cap += *c == ',';
    if (s) s->rules = calloc(cap, sizeof *s->rules);
    if (s) s->events = calloc(cap, sizeof *s->events);
    if (!s || !buf || !s->rules || !s->events) {
        free(buf);
        fault_free(&s);
        return mlm_fail(err, errlen, MLM_ENOMEM, "fault spec: out of memory");
    }
    bool blank = true;
    for (const char *c = text; *c && blank; c++) blank = isspace((unsigned char)*c);
    int idx = 0, rc = 0;
    for (char *start = buf; !blank && start && rc == 0;) {
        char *comma = strchr(start, ',');
        if (comma) *comma = 0;
        idx++;
        while (isspace((unsigned char)*start)) start++;
        char *end = start + strlen(start);
        while (end > start && isspace((unsigned char)end[-1])) *--end = 0;
        char shown[96]; // the rule as written, for the message
        snprintf(shown, sizeof shown, "%.80s%s", start, strlen(start) > 80 ? "..." : "");
        char why[160] = "";
        add_rule(s, start, why, sizeof why);
        if (why[0]) {
            rc = mlm_fail(err, errlen, MLM_EINVAL, "fault rule %d '%s': %s", idx, shown, why);
        }
        start = comma ? comma + 1 : NULL;
    }
    free(buf);
    if (rc == 0 && make_text(s) != 0) {
        rc = mlm_fail(err, errlen, MLM_ENOMEM, "fault spec: out of memory");
    }
    if (rc != 0) {
        fault_free(&s);
        return rc;
    }
    *out = s;
    return 0;
}

int fault_from_env(fault_spec_t **out, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    const char *v = getenv("MESHLM_FAULTS");
    bool blank = true;
    for (const char *c = v; c && *c && blank; c++) blank = isspace((unsigned char)*c);
    if (!v || blank) return 0;
    char why[256] = "";
    int rc = fault_parse(v, out, why, sizeof why);
    return rc != 0 ? mlm_fail(err, errlen, rc, "MESHLM_FAULTS: %s", why) : 0;
}

void fault_free(fault_spec_t **self_p) {
    if (!self_p || !*self_p) return;
    fault_spec_t *s = *self_p;
    free(s->rules);
    free(s->events);
    free(s->text);
    free(s);
    *self_p = NULL;
}

const char *fault_spec_text(const fault_spec_t *s) { return s && s->text ? s->text : ""; }
uint64_t fault_seed(const fault_spec_t *s) { return s ? s->seed : 0; }

bool fault_has_link_rules(const fault_spec_t *s) {
    for (int i = 0; s && i < s->n_rules; i++)
        if (is_link_kind(s->rules[i].kind)) return true;
    return false;
}

void fault_link_params(const fault_spec_t *s, int a, int b, fault_link_t *out) {
    *out = (fault_link_t){.rto_ms = DEFAULT_RTO_MS};
    int best[FAULT_PARTITION + 1];
    for (int k = 0; k <= FAULT_PARTITION; k++) best[k] = -1;
    for (int i = 0; s && i < s->n_rules; i++) {
        const rule_t *r = &s->rules[i];
        if (!is_link_kind(r->kind)) continue;
        int m = match(r, a, b);
        if (m < 0 || m < best[r->kind]) continue;
        best[r->kind] = m;
        switch (r->kind) {
        case FAULT_DELAY:
            out->delay_ms = r->ms;
            out->jitter_ms = r->jitter;
            break;
        case FAULT_BW: out->mbit = r->mbit; break;
        case FAULT_LOSS:
            out->loss_p = r->p;
            out->rto_ms = r->rto_ms;
            break;
        case FAULT_DROP: out->drop_p = r->p; break;
        default: break;
        }
    }
}

int fault_n_events(const fault_spec_t *s) { return s ? s->n_events : 0; }

const fault_event_t *fault_event(const fault_spec_t *s, int i) {
    return s && i >= 0 && i < s->n_events ? &s->events[i] : NULL;
}

void fault_decide(const fault_spec_t *s, int src, int dst, uint64_t counter, fault_decision_t *out) {
    fault_link_t p;
    fault_link_params(s, src, dst, &p);
    decide(fault_seed(s), &p, src, dst, counter, out);
}

const char *fault_kind_name(fault_kind_t k) {
    for (int i = 0; i < (int)(sizeof KINDS / sizeof KINDS[0]); i++)
        if (KINDS[i].kind == k) return KINDS[i].name;
    return "?";
}

// --- public API: stamps and the receive-side model

int64_t fault_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int fault_stamp_frames(const comm_iov_t *frames, int n, comm_iov_t out[COMM_MAX_FRAMES],
                       uint8_t stamp[FAULT_STAMP_BYTES], void **merged) {
    *merged = NULL;
    if (n < 0 || n > COMM_MAX_FRAMES || (n > 0 && !frames)) return MLM_EINVAL;
    for (int i = 0; i < n; i++) out[i] = frames[i];
    if (n < COMM_MAX_FRAMES) {
        stamp_write(stamp, STAMP_FRAME_MAGIC);
        out[n] = (comm_iov_t){stamp, FAULT_STAMP_BYTES};
        return n + 1;
    }
    const comm_iov_t *last = &frames[n - 1];
    uint8_t *m = malloc(last->len + FAULT_STAMP_BYTES);
    if (!m) return MLM_ENOMEM;
    if (last->len) memcpy(m, last->ptr, last->len);
    stamp_write(m + last->len, STAMP_MERGED_MAGIC);
    out[n - 1] = (comm_iov_t){m, last->len + FAULT_STAMP_BYTES};
    *merged = m;
    return n;
}

bool fault_stamp_strip(comm_msg_t *m, int64_t *stamp_ns) {
    if (!m || m->n < 1 || m->n > COMM_MAX_FRAMES) return false;
    const int i = m->n - 1;
    const uint8_t *d = m->data[i];
    if (!d) return false;
    if (m->len[i] == FAULT_STAMP_BYTES && memcmp(d, STAMP_FRAME_MAGIC, 8) == 0) {
        *stamp_ns = stamp_value(d);
        free(m->data[i]);
        m->data[i] = NULL;
        m->len[i] = 0;
        m->n--;
        return true;
    }
    if (m->n == COMM_MAX_FRAMES && m->len[i] >= FAULT_STAMP_BYTES &&
        memcmp(d + m->len[i] - FAULT_STAMP_BYTES, STAMP_MERGED_MAGIC, 8) == 0) {
        *stamp_ns = stamp_value(d + m->len[i] - FAULT_STAMP_BYTES);
        m->len[i] -= FAULT_STAMP_BYTES;
        return true;
    }
    return false;
}

int fault_send_stamped(comm_t *c, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    comm_iov_t wire[COMM_MAX_FRAMES];
    uint8_t stamp[FAULT_STAMP_BYTES];
    void *merged = NULL;
    int k = fault_stamp_frames(frames, n, wire, stamp, &merged);
    if (k < 0) return k;
    int rc = comm_send(c, peer, wire, k, timeout_ms);
    free(merged);
    return rc;
}

void fault_path_init(fault_path_t *pa, const fault_spec_t *s, int src, int dst) {
    memset(pa, 0, sizeof *pa);
    fault_link_params(s, src, dst, &pa->p);
    pa->seed = fault_seed(s);
    pa->src = src;
    pa->dst = dst;
}

int64_t fault_path_admit(fault_path_t *pa, int64_t stamp_ns, size_t bytes, int64_t now_ns) {
    fault_decision_t d;
    decide(pa->seed, &pa->p, pa->src, pa->dst, pa->count++, &d);
    if (d.drop) {
        pa->dropped++;
        return -1;
    }
    pa->late += d.lost;
    const int64_t sent = stamp_ns < 0 || stamp_ns > now_ns ? now_ns : stamp_ns;
    const double extra_ms = pa->p.delay_ms + d.jitter_ms + (d.lost ? pa->p.rto_ms : 0);
    int64_t due = sent + (int64_t)llround(extra_ms * 1e6);
    if (due < pa->last_due) due = pa->last_due;
    if (pa->p.mbit > 0) {
        double ser = (double)bytes * 8000.0 / pa->p.mbit; // ns
        due += (int64_t)llround(ser < MAX_SER_NS ? ser : MAX_SER_NS);
    }
    pa->last_due = due;
    return due;
}

// --- the comm wrapper: types

typedef struct fq_item {
    struct fq_item *next;       // next item of the same queue
    int64_t due;                // CLOCK_MONOTONIC ns when it may be delivered
    uint64_t seq;               // intake order over all queues (ties of due)
    int err;                    // 0 = message, else the MLM_E* the inner comm reported for this slot
    int src;                    // sender rank, -1 if unknown
    comm_msg_t msg;             // user frames (owned) when err == 0
} fq_item_t;

typedef struct {
    fq_item_t *head;            // oldest
    fq_item_t *tail;            // newest
} fq_queue_t;

typedef struct {
    comm_t *inner;              // wrapped comm (owned)
    int rank;                   // this rank
    int size;                   // ranks in the world
    fault_path_t *path;         // (size) model of the messages from each rank to this one
    fq_queue_t *q;              // (size) held messages per source rank
    fq_queue_t anon;            // inner errors that name no source
    uint64_t seq;               // items queued so far
    char name[48];              // "<inner>+fault"
} fc_ctx_t;

// --- the comm wrapper: helpers

static void fq_push(fc_ctx_t *f, fq_queue_t *q, fq_item_t *it) {
    it->seq = f->seq++;
    if (q->tail) q->tail->next = it;
    else q->head = it;
    q->tail = it;
}

static fq_item_t *fq_pop(fq_queue_t *q) {
    fq_item_t *it = q->head;
    if (!it) return NULL;
    q->head = it->next;
    if (!q->head) q->tail = NULL;
    it->next = NULL;
    return it;
}

static void fq_clear(fq_queue_t *q) {
    for (fq_item_t *it; (it = fq_pop(q));) {
        comm_msg_free(&it->msg);
        free(it);
    }
}

static bool valid_src(const fc_ctx_t *f, int src) { return src >= 0 && src < f->size && src != f->rank; }

// Files a message taken from the inner comm: strips the stamp, decides, holds or discards it.
static void intake(fc_ctx_t *f, int src, comm_msg_t *m) {
    const int64_t now = fault_now_ns();
    int64_t stamp = -1;
    if (!valid_src(f, src)) { // the inner comm broke its contract; nothing sensible to model
        comm_msg_free(m);
        return;
    }
    if (!fault_stamp_strip(m, &stamp)) stamp = -1;
    size_t bytes = 0;
    for (int i = 0; i < m->n; i++) bytes += m->len[i];
    int64_t due = fault_path_admit(&f->path[src], stamp, bytes, now);
    fq_item_t *it = due < 0 ? NULL : calloc(1, sizeof *it);
    if (!it) {
        comm_msg_free(m);
        if (due < 0) return;
        it = calloc(1, sizeof *it); // report the loss in order if even that is possible
        if (!it) return;
        it->err = MLM_ENOMEM;
    } else {
        it->msg = *m;
    }
    it->due = due;
    it->src = src;
    fq_push(f, &f->q[src], it);
}

// Keeps an error the inner comm reported for one message (bad frames, too big) in its place.
static void intake_err(fc_ctx_t *f, int src, int err) {
    fq_item_t *it = calloc(1, sizeof *it);
    if (!it) return;
    const int64_t now = fault_now_ns();
    bool known = valid_src(f, src);
    it->err = err;
    it->src = known ? src : -1;
    it->due = known && f->path[src].last_due > now ? f->path[src].last_due : now;
    fq_push(f, known ? &f->q[src] : &f->anon, it);
}

// Takes at most one message from the inner comm, waiting up to timeout_ms. 0 when something was
// filed, MLM_ETIMEOUT when nothing came, or the inner comm's error about the peer itself
// (MLM_EPEER, MLM_EIO, ...) which the caller reports once nothing is held.
static int take(fc_ctx_t *f, int peer, int timeout_ms) {
    comm_msg_t m;
    int src = -1;
    int rc = comm_recv(f->inner, peer, &m, &src, timeout_ms);
    if (rc == 0) {
        intake(f, src, &m);
        return 0;
    }
    if (rc == MLM_EPROTO || rc == MLM_ERANGE || rc == MLM_ENOMEM || rc == MLM_EFORMAT) {
        intake_err(f, src, rc);
        return 0;
    }
    return rc;
}

// Files everything the inner comm has for peer without waiting. 0, or the inner comm's error.
static int pump(fc_ctx_t *f, int peer) {
    for (int i = 0; i < PUMP_MAX; i++) {
        int rc = take(f, peer, 0);
        if (rc == MLM_ETIMEOUT) return 0;
        if (rc != 0) return rc;
    }
    return 0;
}

// The queue whose head a recv(peer) would deliver next: peer's own, or for COMM_ANY the one due first.
static fq_queue_t *pick(fc_ctx_t *f, int peer) {
    if (peer != COMM_ANY) return f->q[peer].head ? &f->q[peer] : NULL;
    fq_queue_t *best = f->anon.head ? &f->anon : NULL;
    for (int s = 0; s < f->size; s++) {
        const fq_item_t *h = f->q[s].head;
        if (h && (!best || h->due < best->head->due || (h->due == best->head->due && h->seq < best->head->seq)))
            best = &f->q[s];
    }
    return best;
}

static int deliver(fq_queue_t *q, comm_msg_t *out, int *from) {
    fq_item_t *it = fq_pop(q);
    int err = it->err;
    *from = it->src;
    if (!err) *out = it->msg;
    else comm_msg_free(&it->msg);
    free(it);
    return err;
}

static void sleep_ns(int64_t ns) {
    if (ns <= 0) return;
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    nanosleep(&ts, NULL);
}

// --- the comm wrapper: backend

static const char *fc_name(void *ctx) { return ((fc_ctx_t *)ctx)->name; }
static int fc_rank(void *ctx) { return ((fc_ctx_t *)ctx)->rank; }
static int fc_size(void *ctx) { return ((fc_ctx_t *)ctx)->size; }

static int fc_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    return fault_send_stamped(((fc_ctx_t *)ctx)->inner, peer, frames, n, timeout_ms);
}

static int fc_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    fc_ctx_t *f = ctx;
    const int64_t dl = timeout_ms < 0 ? -1 : fault_now_ns() + (int64_t)timeout_ms * 1000000;
    *from = -1;
    for (;;) {
        const int gone = pump(f, peer); // the inner comm has nothing more for peer (lost, failed)
        fq_queue_t *q = pick(f, peer);
        const int64_t t = fault_now_ns();
        if (q && q->head->due <= t) return deliver(q, out, from);
        if (!q && gone) return gone;
        if (dl >= 0 && t >= dl) return MLM_ETIMEOUT; // the held messages stay for a later call
        int64_t until = q ? q->head->due : -1;
        if (dl >= 0 && (until < 0 || dl < until)) until = dl;
        const int64_t wait = until < 0 ? -1 : until - t; // ns; -1 = no limit
        if (!gone && (wait < 0 || wait >= 1000000)) { // wait on the inner comm: an earlier-due message may come
            int64_t ms = wait < 0 ? -1 : wait / 1000000;
            take(f, peer, ms > INT_MAX ? INT_MAX : (int)ms);
        } else {
            sleep_ns(wait); // under a millisecond, or the peer is gone but messages are still held
        }
    }
}

static void fc_destroy(void *ctx) {
    fc_ctx_t *f = ctx;
    if (!f) return;
    comm_destroy(&f->inner);
    if (f->q)
        for (int s = 0; s < f->size; s++) fq_clear(&f->q[s]);
    fq_clear(&f->anon);
    free(f->q);
    free(f->path);
    free(f);
}

static const struct comm_backend_i fault_iface = {
    .name = fc_name,
    .rank = fc_rank,
    .size = fc_size,
    .send = fc_send,
    .recv = fc_recv,
    .destroy = fc_destroy,
    // barrier and allreduce_f32 stay NULL: the generic collectives run over fc_send/fc_recv
};

// --- public API: the comm wrapper

int comm_fault_wrap(comm_t **c, const fault_spec_t *spec, char *err, size_t errlen) {
    if (!c || !*c) {
        return mlm_fail(err, errlen, MLM_EINVAL, "comm_fault_wrap: no comm");
    }
    if (!spec) return 0;
    fc_ctx_t *f = calloc(1, sizeof *f);
    if (!f) goto oom;
    f->rank = comm_rank(*c);
    f->size = comm_size(*c);
    if (f->size < 1 || f->rank < 0 || f->rank >= f->size) {
        free(f);
        return mlm_fail(err, errlen, MLM_EINVAL, "comm_fault_wrap: inner comm has rank %d of %d", comm_rank(*c), comm_size(*c));
    }
    f->q = calloc((size_t)f->size, sizeof *f->q);
    f->path = calloc((size_t)f->size, sizeof *f->path);
    if (!f->q || !f->path) goto oom;
    for (int s = 0; s < f->size; s++) fault_path_init(&f->path[s], spec, s, f->rank);
    snprintf(f->name, sizeof f->name, "%s+fault", comm_name(*c));
    comm_t *outer = comm_new(&fault_iface, f);
    if (!outer) goto oom;
    f->inner = *c;
    *c = outer;
    return 0;
oom:
    if (f) {
        free(f->q);
        free(f->path);
        free(f);
    }
    return mlm_fail(err, errlen, MLM_ENOMEM, "comm_fault_wrap: out of memory");
}

int comm_fault_unwrap(comm_t **c) {
    fc_ctx_t *f = c && *c ? comm_backend_ctx(*c, &fault_iface) : NULL;
    if (!f) return MLM_EINVAL;
    comm_t *inner = f->inner;
    f->inner = NULL; // fc_destroy leaves it alone
    comm_destroy(c);
    *c = inner;
    return 0;
}
