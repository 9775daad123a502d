// Fault injection: the spec parser, the seeded per-message decisions, the event board, the receive-side link model and the comm wrapper.
#include "transport/fault.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/bytes.h"
#include "core/err.h"
#include "core/rng.h"
#include "transport/comm_link.h"
#include "transport/comm_rel.h"

// --- types

#define MAX_TEXT 65536              // longest spec text accepted
#define MAX_RANK 65535              // largest rank or worker number in a rule
#define MAX_MS 3600000.0            // longest delay, jitter, rto, freeze, window or at_ms (an hour)
#define MIN_MBIT 0.001              // slowest link (1 kbit/s)
#define MAX_MBIT 1e9                // fastest link
#define MAX_FACTOR 100.0            // largest slow-down factor (slow, disk slow)
#define DEFAULT_RTO_MS 200.0        // loss without rto_ms
#define MAX_SER_NS 86400e9          // serialization delay cap (a day), keeps the arithmetic finite
#define PUMP_MAX 4096               // messages taken from the inner comm per non-blocking pass
#define MAX_PATH_LEN 255            // longest board path
#define CUT_POLL_MS 20              // a wrapper that may lose a peer to a cut waits on its inner comm this long at most
#define ANNOUNCE_TIMEOUT_MS 1000    // sending a node announcement

// The two stamp forms: its own frame, or appended to the last of COMM_MAX_FRAMES frames.
static const uint8_t STAMP_FRAME_MAGIC[8] = {'M', 'L', 'M', 'F', 'S', 'T', 'M', 'P'};
static const uint8_t STAMP_MERGED_MAGIC[8] = {'M', 'L', 'M', 'F', 'S', 'T', 'M', 'Q'};
// A node announcement: this magic, then u32 node, u32 zero (one frame of ANNOUNCE_BYTES, no stamp).
static const uint8_t ANNOUNCE_MAGIC[8] = {'M', 'L', 'M', 'F', 'N', 'O', 'D', 'E'};
#define ANNOUNCE_BYTES 16
// The board file.
static const uint8_t BOARD_MAGIC[8] = {'M', 'L', 'M', 'B', 'O', 'A', 'R', 'D'};
#define BOARD_VERSION 1u

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
    K_AT = 1 << 8,
    K_FACTOR = 1 << 9,
    K_SLOW = 1 << 10,
    K_FULL = 1 << 11,          // a flag: written without a value
    K_FOR = 1 << 12,
};

static const struct {
    const char *name;           // as written
    int bit;                    // K_*
} KEYS[] = {
    {"link", K_LINK},     {"ms", K_MS},         {"jitter", K_JITTER}, {"mbit", K_MBIT},
    {"p", K_P},           {"rto_ms", K_RTO},    {"worker", K_WORKER}, {"after_tokens", K_AFTER},
    {"at_ms", K_AT},      {"factor", K_FACTOR}, {"slow", K_SLOW},     {"full", K_FULL},
    {"for_ms", K_FOR},
};

enum { TRIG_NONE = 0, TRIG_REQUIRED = 1, TRIG_OPTIONAL = 2 }; // after_tokens / at_ms

static const struct {
    fault_kind_t kind;
    const char *name;           // as written
    int required;               // K_* bits that must appear
    int optional;               // K_* bits that may appear (triggers excluded)
    int trigger;                // TRIG_*
} KINDS[] = {
    {FAULT_DELAY, "delay", K_LINK | K_MS, K_JITTER | K_FOR, TRIG_OPTIONAL},
    {FAULT_BW, "bw", K_LINK | K_MBIT, K_FOR, TRIG_OPTIONAL},
    {FAULT_LOSS, "loss", K_LINK | K_P, K_RTO | K_FOR, TRIG_OPTIONAL},
    {FAULT_DROP, "drop", K_LINK | K_P, K_FOR, TRIG_OPTIONAL},
    {FAULT_KILL, "kill", K_WORKER, 0, TRIG_REQUIRED},
    {FAULT_FREEZE, "freeze", K_WORKER | K_MS, 0, TRIG_REQUIRED},
    {FAULT_PARTITION, "partition", K_LINK, K_MS, TRIG_REQUIRED},
    {FAULT_SLOW, "slow", K_WORKER | K_FACTOR, K_MS, TRIG_OPTIONAL},
    {FAULT_DISK, "disk", K_WORKER, K_SLOW | K_FULL, TRIG_NONE},
};

// One rule as parsed (fields its kind does not use stay at their defaults).
typedef struct {
    fault_kind_t kind;
    int a, b;                   // link ends, a < b; b == FAULT_ANY for `A-*`, both for `*`; -1 without link
    int worker;                 // kill, freeze, slow, disk (FAULT_ANY for `*`); -1 otherwise
    int64_t after_tokens;       // events: trigger, -1 unset
    double at_ms;               // events: trigger, -1 unset
    double ms;                  // delay; freeze, partition, slow: how long
    double jitter;              // delay
    double mbit;                // bw
    double p;                   // loss, drop
    double rto_ms;              // loss
    double factor;              // slow
    double slow;                // disk (1 = normal)
    bool full;                  // disk
    double for_ms;              // delay, bw, loss, drop with a trigger: how long (0 = to the end)
    int slot;                   // its event index (board slot); -1 for a rule in force all along
} rule_t;

// What every copy of one parsed spec shares (a wrapper keeps a copy): the node this process is and
// the per-channel message counters. Mutable behind a const spec; guarded by mu.
typedef struct {
    int chan;                   // 0 control link, 1 any other comm (the data planes)
    int src, dst;               // nodes
    uint64_t n;                 // messages counted so far
} counter_t;

typedef struct {
    pthread_mutex_t mu;
    int refs;                   // specs sharing it
    int identity;               // this process's node, -1 unknown
    counter_t *ctr;             // (n_ctr)
    int n_ctr, cap_ctr;
} shared_t;

struct fault_spec {
    rule_t *rules;              // (n_rules) in text order
    int n_rules;                // rules (seed and board not counted)
    fault_event_t *events;      // (n_events) kill, freeze, partition and slow rules in text order
    int n_events;               // events
    uint64_t seed;              // seed=N, 0 when unset
    bool has_seed;              // seed=N was given
    char *board;                // board=PATH (owned), NULL when unset
    char *text;                 // canonical text (owned)
    shared_t *sh;               // shared by copies (owned by all of them)
};

struct fault_board {
    void *map;                  // (FAULT_BOARD_BYTES) the mapping
    int64_t *start, *end;       // (FAULT_MAX_EVENTS) each inside the mapping
    bool writable;              // created here (it removes the file)
    char path[MAX_PATH_LEN + 1];
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

static void sb_worker(sbuf_t *b, int w) {
    if (w == FAULT_ANY) sb_add(b, ":worker=*");
    else sb_add(b, ":worker=%d", w);
}

static void sb_trigger(sbuf_t *b, const rule_t *r) {
    if (r->after_tokens >= 0) sb_add(b, ":after_tokens=%lld", (long long)r->after_tokens);
    else if (r->at_ms >= 0) sb_num(b, "at_ms", r->at_ms);
}

// A link rule's window: its trigger and length, when it has one.
static void sb_window(sbuf_t *b, const rule_t *r) {
    if (r->slot < 0) return;
    sb_trigger(b, r);
    if (r->for_ms > 0) sb_num(b, "for_ms", r->for_ms);
}

// Canonical text of the parsed rules into s->text (replacing it). 0 or MLM_ENOMEM (s->text kept).
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
            sb_window(&b, r);
            break;
        case FAULT_BW:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "mbit", r->mbit);
            sb_window(&b, r);
            break;
        case FAULT_LOSS:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "p", r->p);
            sb_num(&b, "rto_ms", r->rto_ms);
            sb_window(&b, r);
            break;
        case FAULT_DROP:
            sb_link(&b, r->a, r->b);
            sb_num(&b, "p", r->p);
            sb_window(&b, r);
            break;
        case FAULT_KILL:
            sb_worker(&b, r->worker);
            sb_trigger(&b, r);
            break;
        case FAULT_FREEZE:
            sb_worker(&b, r->worker);
            sb_trigger(&b, r);
            sb_num(&b, "ms", r->ms);
            break;
        case FAULT_PARTITION:
            sb_link(&b, r->a, r->b);
            sb_trigger(&b, r);
            if (r->ms > 0) sb_num(&b, "ms", r->ms);
            break;
        case FAULT_SLOW:
            sb_worker(&b, r->worker);
            sb_num(&b, "factor", r->factor);
            if (r->after_tokens >= 0 || r->at_ms > 0) sb_trigger(&b, r);
            if (r->ms > 0) sb_num(&b, "ms", r->ms);
            break;
        case FAULT_DISK:
            sb_worker(&b, r->worker);
            if (r->slow != 1 || !r->full) sb_num(&b, "slow", r->slow); // (a disk rule says something)
            if (r->full) sb_add(&b, ":full");
            break;
        }
    }
    const char *sep = s->n_rules ? "," : "";
    if (s->board) {
        sb_add(&b, "%sboard=%s", sep, s->board);
        sep = ",";
    }
    if (s->has_seed) sb_add(&b, "%sseed=%llu", sep, (unsigned long long)s->seed);
    if (!b.ok) {
        free(b.s);
        return MLM_ENOMEM;
    }
    free(s->text);
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
        if (strcmp(v, "*") == 0) {
            r->worker = FAULT_ANY;
            return 0;
        }
        if (parse_int(v, 0, MAX_RANK, &x) != 0) break;
        if (x == 0) {
            snprintf(why, whylen, "worker 0 is the coordinator (workers are 1..%d, or *)", MAX_RANK);
            return -1;
        }
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
    case K_FACTOR:
    case K_SLOW:
        if (parse_real(v, &d) != 0 || d < 1 || d > MAX_FACTOR) {
            snprintf(why, whylen, "%s '%s' is not a factor in [1, %g]", key, v, MAX_FACTOR);
            return -1;
        }
        if (bit == K_FACTOR) r->factor = d;
        else r->slow = d;
        return 0;
    default: // milliseconds
        if (parse_real(v, &d) != 0 || d < 0 || d > MAX_MS) {
            snprintf(why, whylen, "%s '%s' is not a number of milliseconds in [0, %.0f]", key, v, MAX_MS);
            return -1;
        }
        if (bit == K_MS) r->ms = d;
        else if (bit == K_JITTER) r->jitter = d;
        else if (bit == K_AT) r->at_ms = d;
        else if (bit == K_FOR) r->for_ms = d;
        else r->rto_ms = d;
        return 0;
    }
    snprintf(why, whylen, "%s '%s' is not an integer in [%d, %lld]%s", key, v, bit == K_WORKER ? 1 : 0,
             bit == K_AFTER ? LLONG_MAX : (long long)MAX_RANK, bit == K_WORKER ? " or *" : "");
    return -1;
}

// Parses one rule (already trimmed, NUL-terminated, modified in place) into r. 0, or -1 with why.
static int parse_rule(char *text, rule_t *r, char *why, size_t whylen) {
    *r = (rule_t){.a = -1, .b = -1, .worker = -1, .after_tokens = -1, .at_ms = -1, .rto_ms = DEFAULT_RTO_MS,
                  .slow = 1, .slot = -1};
    char *pairs = strchr(text, ':'); // the key=value pairs after the kind
    if (pairs) *pairs++ = 0;
    char *kind = text;
    int k = -1;
    for (int i = 0; i < (int)(sizeof KINDS / sizeof KINDS[0]); i++)
        if (strcmp(kind, KINDS[i].name) == 0) k = i;
    if (k < 0) {
        snprintf(why, whylen,
                 "unknown kind '%s' (delay, bw, loss, drop, partition, kill, freeze, slow, disk, seed=N, board=PATH)",
                 kind);
        return -1;
    }
    r->kind = KINDS[k].kind;
    const int trig = KINDS[k].trigger != TRIG_NONE ? K_AFTER | K_AT : 0;
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
        if (!bit || !((KINDS[k].required | KINDS[k].optional | trig) & bit)) {
            snprintf(why, whylen, "unknown key '%s' for %s", kv, KINDS[k].name);
            return -1;
        }
        if (bit == K_FULL ? eq != NULL : !eq) {
            if (eq) snprintf(why, whylen, "key '%s' takes no value (write it alone)", kv);
            else snprintf(why, whylen, "key '%s' has no value (%s=...)", kv, kv);
            return -1;
        }
        if (seen & bit) {
            snprintf(why, whylen, "key '%s' given twice", kv);
            return -1;
        }
        seen |= bit;
        if (bit == K_FULL) r->full = true;
        else if (parse_kv(r, bit, kv, eq + 1, why, whylen) != 0) return -1;
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
    if ((seen & trig) == trig && trig) {
        snprintf(why, whylen, "%s takes after_tokens=K or at_ms=T, not both", KINDS[k].name);
        return -1;
    }
    if (KINDS[k].trigger == TRIG_REQUIRED && !(seen & trig)) {
        snprintf(why, whylen, "%s needs a trigger: after_tokens=K or at_ms=T", KINDS[k].name);
        return -1;
    }
    if (r->kind == FAULT_SLOW && !(seen & trig)) r->at_ms = 0; // from the start
    if ((seen & K_FOR) && !(seen & trig)) {
        snprintf(why, whylen, "for_ms is the length of a window: give its start too (after_tokens=K or at_ms=T)");
        return -1;
    }
    if (r->kind == FAULT_DISK && !(seen & (K_SLOW | K_FULL))) {
        snprintf(why, whylen, "disk needs slow=F or full");
        return -1;
    }
    return 0;
}

static bool is_link_kind(fault_kind_t k) { return k == FAULT_DELAY || k == FAULT_BW || k == FAULT_LOSS || k == FAULT_DROP; }
static bool is_event_kind(fault_kind_t k) {
    return k == FAULT_KILL || k == FAULT_FREEZE || k == FAULT_PARTITION || k == FAULT_SLOW;
}

// An event: a kill, freeze, partition or slow, or a link rule with a window.
static bool is_event(const rule_t *r) { return is_event_kind(r->kind) || r->after_tokens >= 0 || r->at_ms >= 0; }

// Whether a wrapper of s can discard messages: a drop rule or a partition.
static bool loses_messages(const fault_spec_t *s) {
    for (int i = 0; i < s->n_rules; i++)
        if ((s->rules[i].kind == FAULT_DROP && s->rules[i].p > 0) || s->rules[i].kind == FAULT_PARTITION) return true;
    return false;
}

// A board path: absolute, printable, no spaces or commas, at most MAX_PATH_LEN bytes. 0 or -1.
static int check_path(const char *p) {
    size_t n = strlen(p);
    if (n == 0 || n > MAX_PATH_LEN || p[0] != '/') return -1;
    for (const char *c = p; *c; c++)
        if ((unsigned char)*c <= ' ' || *c == ',' || (unsigned char)*c >= 0x7f) return -1;
    return 0;
}

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
    if (strncmp(text, "board=", 6) == 0) {
        if (s->board) snprintf(why, whylen, "board given twice");
        else if (check_path(text + 6) != 0)
            snprintf(why, whylen, "board '%.80s' is not an absolute path without spaces or commas (at most %d bytes)",
                     text + 6, MAX_PATH_LEN);
        else if (!(s->board = strdup(text + 6))) snprintf(why, whylen, "out of memory");
        return;
    }
    rule_t *r = &s->rules[s->n_rules];
    if (parse_rule(text, r, why, whylen) != 0) return;
    if (is_event(r) && s->n_events == FAULT_MAX_EVENTS) {
        snprintf(why, whylen, "more than %d events", FAULT_MAX_EVENTS);
        return;
    }
    s->n_rules++;
    if (!is_event(r)) return;
    r->slot = s->n_events;
    fault_event_t *e = &s->events[s->n_events];
    *e = (fault_event_t){.kind = r->kind, .worker = r->worker, .a = r->a, .b = r->b, .after_tokens = r->after_tokens,
                         .ms = r->kind == FAULT_KILL ? 0 : is_link_kind(r->kind) ? r->for_ms : r->ms, .at_ms = r->at_ms,
                         .factor = r->kind == FAULT_SLOW ? r->factor : 0, .slot = s->n_events};
    s->n_events++;
}

// How specifically link a-b (a rule's or an event's) names the link x-y: -1 not at all, 0 `*`, 1 `A-*`, 2 `A-B`.
static int match_link(int a, int b, int x, int y) {
    if (a == FAULT_ANY) return 0;
    if (b == FAULT_ANY) return a == x || a == y ? 1 : -1;
    return (a == x && b == y) || (a == y && b == x) ? 2 : -1;
}

static int match(const rule_t *r, int x, int y) { return match_link(r->a, r->b, x, y); }

// The shared part of a new spec. NULL when out of memory.
static shared_t *shared_new(void) {
    shared_t *sh = calloc(1, sizeof *sh);
    if (!sh) return NULL;
    if (pthread_mutex_init(&sh->mu, NULL) != 0) {
        free(sh);
        return NULL;
    }
    sh->refs = 1;
    sh->identity = -1;
    return sh;
}

static void shared_unref(shared_t *sh) {
    if (!sh) return;
    pthread_mutex_lock(&sh->mu);
    const int left = --sh->refs;
    pthread_mutex_unlock(&sh->mu);
    if (left > 0) return;
    pthread_mutex_destroy(&sh->mu);
    free(sh->ctr);
    free(sh);
}

// The next number of channel chan's messages from node src to node dst (0, 1, ...). Under memory
// pressure the count restarts rather than failing.
static uint64_t shared_next(shared_t *sh, int chan, int src, int dst) {
    pthread_mutex_lock(&sh->mu);
    uint64_t n = 0;
    int i = 0;
    while (i < sh->n_ctr && !(sh->ctr[i].chan == chan && sh->ctr[i].src == src && sh->ctr[i].dst == dst)) i++;
    if (i == sh->n_ctr) {
        if (sh->n_ctr == sh->cap_ctr) {
            int cap = sh->cap_ctr ? 2 * sh->cap_ctr : 16;
            counter_t *c = realloc(sh->ctr, (size_t)cap * sizeof *c);
            if (c) sh->ctr = c, sh->cap_ctr = cap;
        }
        if (sh->n_ctr < sh->cap_ctr) sh->ctr[sh->n_ctr++] = (counter_t){chan, src, dst, 0};
        else i = -1;
    }
    if (i >= 0) n = sh->ctr[i].n++;
    pthread_mutex_unlock(&sh->mu);
    return n;
}

// A copy of s sharing its identity and counters. NULL when out of memory.
static fault_spec_t *spec_copy(const fault_spec_t *s) {
    fault_spec_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    *c = *s;
    c->rules = malloc(((size_t)s->n_rules + 1) * sizeof *c->rules);
    c->events = malloc(((size_t)s->n_events + 1) * sizeof *c->events);
    c->text = strdup(s->text ? s->text : "");
    c->board = s->board ? strdup(s->board) : NULL;
    c->sh = NULL;
    if (!c->rules || !c->events || !c->text || (s->board && !c->board)) {
        fault_free(&c);
        return NULL;
    }
    memcpy(c->rules, s->rules, (size_t)s->n_rules * sizeof *c->rules);
    memcpy(c->events, s->events, (size_t)s->n_events * sizeof *c->events);
    pthread_mutex_lock(&s->sh->mu);
    s->sh->refs++;
    pthread_mutex_unlock(&s->sh->mu);
    c->sh = s->sh;
    return c;
}

// --- helpers: decisions

static uint64_t mix64(uint64_t z) { return mlm_mix64(z + 0x9e3779b97f4a7c15ull); }

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
    if (s) s->events = calloc(cap < FAULT_MAX_EVENTS ? cap : FAULT_MAX_EVENTS, sizeof *s->events);
    if (s) s->sh = shared_new();
    if (!s || !buf || !s->rules || !s->events || !s->sh) {
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
        char why[200] = "";
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
    free(s->board);
    shared_unref(s->sh);
    free(s);
    *self_p = NULL;
}

const char *fault_spec_text(const fault_spec_t *s) { return s && s->text ? s->text : ""; }
uint64_t fault_seed(const fault_spec_t *s) { return s ? s->seed : 0; }
const char *fault_board_path(const fault_spec_t *s) { return s ? s->board : NULL; }

bool fault_has_link_rules(const fault_spec_t *s) {
    for (int i = 0; s && i < s->n_rules; i++)
        if (is_link_kind(s->rules[i].kind) || s->rules[i].kind == FAULT_PARTITION) return true;
    return false;
}

int fault_set_seed(fault_spec_t *s, uint64_t seed) {
    if (!s) return MLM_EINVAL;
    const uint64_t old = s->seed;
    const bool had = s->has_seed;
    s->seed = seed;
    s->has_seed = true;
    if (make_text(s) != 0) {
        s->seed = old;
        s->has_seed = had;
        return MLM_ENOMEM;
    }
    return 0;
}

int fault_set_board(fault_spec_t *s, const char *path) {
    if (!s || (path && check_path(path) != 0)) return MLM_EINVAL;
    char *old = s->board;
    s->board = path ? strdup(path) : NULL;
    if ((path && !s->board) || make_text(s) != 0) {
        free(s->board);
        s->board = old;
        return MLM_ENOMEM;
    }
    free(old);
    return 0;
}

int fault_restrict(const fault_spec_t *s, int n_workers, fault_spec_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (!s) return mlm_fail(err, errlen, MLM_EINVAL, "fault_restrict: no spec");
    fault_spec_t tmp = *s; // the kept rules, for their canonical text
    tmp.rules = malloc(((size_t)s->n_rules + 1) * sizeof *tmp.rules);
    tmp.text = NULL;
    if (!tmp.rules) return mlm_fail(err, errlen, MLM_ENOMEM, "fault_restrict: out of memory");
    tmp.n_rules = 0;
    for (int i = 0; i < s->n_rules; i++) {
        const rule_t *r = &s->rules[i];
        if (r->worker > n_workers || r->a > n_workers || r->b > n_workers) continue;
        tmp.rules[tmp.n_rules++] = *r;
    }
    int rc = make_text(&tmp);
    if (rc == 0) rc = fault_parse(tmp.text, out, err, errlen);
    else mlm_fail(err, errlen, rc, "fault_restrict: out of memory");
    free(tmp.rules);
    free(tmp.text);
    return rc;
}

// The link parameters of a-b from the rules in force at t_ns: those without a window, and those
// whose window on board contains t_ns (none when board is NULL).
static void link_params_at(const fault_spec_t *s, const fault_board_t *board, int a, int b, int64_t t_ns,
                           fault_link_t *out) {
    *out = (fault_link_t){.rto_ms = DEFAULT_RTO_MS};
    int best[FAULT_DISK + 1];
    for (int k = 0; k <= FAULT_DISK; k++) best[k] = -1;
    for (int i = 0; s && i < s->n_rules; i++) {
        const rule_t *r = &s->rules[i];
        if (!is_link_kind(r->kind)) continue;
        if (r->slot >= 0 && !fault_board_active(board, r->slot, t_ns, NULL)) continue;
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

void fault_link_params(const fault_spec_t *s, int a, int b, fault_link_t *out) { link_params_at(s, NULL, a, b, 0, out); }

void fault_disk(const fault_spec_t *s, int worker, fault_disk_t *out) {
    *out = (fault_disk_t){.slow = 1, .full = false};
    int best = -1;
    for (int i = 0; s && i < s->n_rules; i++) {
        const rule_t *r = &s->rules[i];
        if (r->kind != FAULT_DISK || (r->worker != FAULT_ANY && r->worker != worker)) continue;
        const int m = r->worker == FAULT_ANY ? 0 : 1;
        if (m < best) continue;
        best = m;
        out->slow = r->slow;
        out->full = r->full;
    }
}

int fault_n_events(const fault_spec_t *s) { return s ? s->n_events : 0; }

const fault_event_t *fault_event(const fault_spec_t *s, int i) {
    return s && i >= 0 && i < s->n_events ? &s->events[i] : NULL;
}

int fault_pick_worker(const fault_spec_t *s, int event, int n_workers) {
    const fault_event_t *e = fault_event(s, event);
    if (!e || n_workers < 1) return -1;
    if (e->worker != FAULT_ANY) return e->worker;
    return 1 + (int)(unit(fault_seed(s), -2, event, 0, 4) * n_workers);
}

bool fault_event_cuts(const fault_event_t *e, int x, int y) {
    return e && e->kind == FAULT_PARTITION && x != y && match_link(e->a, e->b, x, y) >= 0;
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

void fault_set_identity(fault_spec_t *s, int identity) {
    if (!s) return;
    pthread_mutex_lock(&s->sh->mu);
    s->sh->identity = identity < 0 ? -1 : identity;
    pthread_mutex_unlock(&s->sh->mu);
}

int fault_identity(const fault_spec_t *s) {
    if (!s) return -1;
    pthread_mutex_lock(&s->sh->mu);
    const int id = s->sh->identity;
    pthread_mutex_unlock(&s->sh->mu);
    return id;
}

// --- public API: the board

int fault_board_create(fault_board_t **out, const char *path_template, char *err, size_t errlen) {
    *out = NULL;
    size_t n = path_template ? strlen(path_template) : 0;
    if (n < 6 || n > MAX_PATH_LEN || strcmp(path_template + n - 6, "XXXXXX") != 0)
        return mlm_fail(err, errlen, MLM_EINVAL, "board: '%s' is not a template ending in XXXXXX (at most %d bytes)",
                        path_template ? path_template : "", MAX_PATH_LEN);
    fault_board_t *b = calloc(1, sizeof *b);
    if (!b) return mlm_fail(err, errlen, MLM_ENOMEM, "board: out of memory");
    snprintf(b->path, sizeof b->path, "%s", path_template);
    int fd = mkstemp(b->path);
    if (fd < 0) {
        const int e = errno;
        free(b);
        return mlm_fail(err, errlen, MLM_EIO, "board %s: cannot create: %s", path_template, strerror(e));
    }
    fchmod(fd, 0644);
    uint8_t head[16];
    memcpy(head, BOARD_MAGIC, 8);
    mlm_put32(head + 8, BOARD_VERSION);
    mlm_put32(head + 12, FAULT_MAX_EVENTS);
    int rc = ftruncate(fd, FAULT_BOARD_BYTES) == 0 && pwrite(fd, head, sizeof head, 0) == (ssize_t)sizeof head ? 0 : -1;
    void *map = rc == 0 ? mmap(NULL, FAULT_BOARD_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
    const int e = errno;
    close(fd);
    if (map == MAP_FAILED) {
        unlink(b->path);
        free(b);
        return mlm_fail(err, errlen, MLM_EIO, "board %s: cannot size or map: %s", path_template, strerror(e));
    }
    b->map = map;
    b->start = (int64_t *)((uint8_t *)map + 16);
    b->end = b->start + FAULT_MAX_EVENTS;
    b->writable = true;
    *out = b;
    return 0;
}

int fault_board_open(fault_board_t **out, const char *path, char *err, size_t errlen) {
    *out = NULL;
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return mlm_fail(err, errlen, MLM_EIO, "board %s: %s", path ? path : "(none)", strerror(errno));
    struct stat st;
    uint8_t head[16];
    int rc = 0;
    if (fstat(fd, &st) != 0 || st.st_size < (off_t)FAULT_BOARD_BYTES ||
        pread(fd, head, sizeof head, 0) != (ssize_t)sizeof head || memcmp(head, BOARD_MAGIC, 8) != 0 ||
        mlm_get32(head + 8) != BOARD_VERSION || mlm_get32(head + 12) != FAULT_MAX_EVENTS)
        rc = mlm_fail(err, errlen, MLM_EFORMAT, "board %s: not a version %u board of %d slots", path, BOARD_VERSION,
                      FAULT_MAX_EVENTS);
    void *map = rc == 0 ? mmap(NULL, FAULT_BOARD_BYTES, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (rc == 0 && map == MAP_FAILED) rc = mlm_fail(err, errlen, MLM_EIO, "board %s: cannot map: %s", path, strerror(errno));
    close(fd);
    fault_board_t *b = rc == 0 ? calloc(1, sizeof *b) : NULL;
    if (rc == 0 && !b) rc = mlm_fail(err, errlen, MLM_ENOMEM, "board: out of memory");
    if (rc != 0) {
        if (map != MAP_FAILED) munmap(map, FAULT_BOARD_BYTES);
        return rc;
    }
    b->map = map;
    b->start = (int64_t *)((uint8_t *)map + 16);
    b->end = b->start + FAULT_MAX_EVENTS;
    snprintf(b->path, sizeof b->path, "%s", path);
    *out = b;
    return 0;
}

void fault_board_destroy(fault_board_t **self_p) {
    if (!self_p || !*self_p) return;
    fault_board_t *b = *self_p;
    munmap(b->map, FAULT_BOARD_BYTES);
    if (b->writable) unlink(b->path);
    free(b);
    *self_p = NULL;
}

const char *fault_board_file(const fault_board_t *b) { return b ? b->path : NULL; }

int fault_board_set(fault_board_t *b, int slot, int64_t start_ns, int64_t end_ns) {
    if (!b || !b->writable || slot < 0 || slot >= FAULT_MAX_EVENTS) return MLM_EINVAL;
    // readers take start first: a window is never seen open with a stale end
    __atomic_store_n(&b->start[slot], 0, __ATOMIC_RELEASE);
    __atomic_store_n(&b->end[slot], end_ns, __ATOMIC_RELEASE);
    __atomic_store_n(&b->start[slot], start_ns, __ATOMIC_RELEASE);
    return 0;
}

bool fault_board_active(const fault_board_t *b, int slot, int64_t t_ns, int64_t *start_ns) {
    if (!b || slot < 0 || slot >= FAULT_MAX_EVENTS) return false;
    const int64_t s = __atomic_load_n(&b->start[slot], __ATOMIC_ACQUIRE);
    const int64_t e = __atomic_load_n(&b->end[slot], __ATOMIC_ACQUIRE);
    if (start_ns) *start_ns = s;
    return s > 0 && t_ns >= s && t_ns < e;
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
    fault_spec_t *spec;         // own copy (its identity and counters are shared with the caller's spec)
    fault_board_t *board;       // the spec's board, mapped read-only (NULL: none, or not reachable here)
    bool cuts;                  // partitions can happen: the spec has some and the board is mapped
    bool windows;               // link rules with windows can be in force: the spec has some and the board is mapped
    int chan;                   // counter channel: 0 over a control link, 1 otherwise
    int me;                     // this end's node
    int *node;                  // (size) the node of each rank: the rank itself, or (aware) -1 until announced
    bool aware;                 // this end knows its node and so do its peers: they all announce theirs
    bool *lost;                 // (size) peers lost to a cut that outlasted the heartbeat (for good on a data
                                // plane; on a control link while the cut lasts, as the link comes back)
    int n_lost;
    int hb_ms;                  // fault_wrap_opts_t.heartbeat_ms
    bool fail_any;              // fault_wrap_opts_t.fail_on_any_loss
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

// Whether the link between nodes x and y is cut at t_ns; *since (may be NULL) gets when the
// earliest cut in force began.
static bool cut_at(const fc_ctx_t *f, int x, int y, int64_t t_ns, int64_t *since) {
    bool cut = false;
    for (int i = 0; f->cuts && i < f->spec->n_events; i++) {
        const fault_event_t *e = &f->spec->events[i];
        int64_t st = 0;
        if (!fault_event_cuts(e, x, y) || !fault_board_active(f->board, e->slot, t_ns, &st)) continue;
        if (since && (!cut || st < *since)) *since = st;
        cut = true;
    }
    return cut;
}

static int pump(fc_ctx_t *f, int peer);

// Marks the peers (peer, or every one for COMM_ANY) whose link has been cut for a heartbeat as lost
// (and, on a control link, those whose cut is over as back).
static void check_lost(fc_ctx_t *f, int peer) {
    if (!f->cuts || f->hb_ms <= 0) return;
    bool unknown = false; // a peer whose announcement may be waiting behind others' messages
    for (int r = 0; r < f->size && !unknown; r++) unknown = f->node[r] < 0;
    if (unknown) pump(f, COMM_ANY); // files what is there (each message in its sender's queue)
    const int64_t now = fault_now_ns();
    for (int r = 0; r < f->size; r++) {
        if (r == f->rank || f->node[r] < 0 || (f->lost[r] && f->chan == 1) || (peer != COMM_ANY && r != peer)) continue;
        int64_t since = 0;
        const bool gone = cut_at(f, f->node[r], f->me, now, &since) && now - since >= (int64_t)f->hb_ms * 1000000;
        if (gone != f->lost[r]) f->n_lost += gone ? 1 : -1;
        f->lost[r] = gone;
    }
}

// MLM_EPEER when a call on peer must fail because of lost peers (*from, may be NULL, names one), else 0.
static int lost_rc(const fc_ctx_t *f, int peer, int *from) {
    if (f->n_lost == 0) return 0;
    int first = -1;
    for (int r = 0; r < f->size && first < 0; r++)
        if (f->lost[r] && (peer == COMM_ANY || r == peer)) first = r;
    const bool all = f->n_lost >= f->size - 1;
    if ((peer != COMM_ANY && f->lost[peer]) || f->fail_any || (peer == COMM_ANY && all)) {
        if (from) *from = first >= 0 ? first : peer;
        return MLM_EPEER;
    }
    return 0;
}

// A node announcement: true with *node set.
static bool is_announce(const comm_msg_t *m, uint32_t *node) {
    if (m->n != 1 || m->len[0] != ANNOUNCE_BYTES || !m->data[0] || memcmp(m->data[0], ANNOUNCE_MAGIC, 8) != 0) return false;
    *node = mlm_get32((const uint8_t *)m->data[0] + 8);
    return true;
}

// Files a message taken from the inner comm: records an announcement; strips the stamp, drops what
// a cut or a decision drops, holds the rest until it is due.
static void intake(fc_ctx_t *f, int src, comm_msg_t *m) {
    const int64_t now = fault_now_ns();
    int64_t stamp = -1;
    uint32_t node = 0;
    if (!valid_src(f, src)) { // the inner comm broke its contract; nothing sensible to model
        comm_msg_free(m);
        return;
    }
    if (is_announce(m, &node)) {
        if (f->chan == 1 && node <= MAX_RANK && (int)node != f->node[src]) {
            f->node[src] = (int)node;
            fault_path_init(&f->path[src], f->spec, (int)node, f->me);
        }
        comm_msg_free(m);
        return;
    }
    if (f->node[src] < 0) { // a peer that does not announce (it knows no node): its rank stands for it
        f->node[src] = src;
        fault_path_init(&f->path[src], f->spec, src, f->me);
    }
    if (!fault_stamp_strip(m, &stamp)) stamp = -1;
    const int64_t sent = stamp < 0 || stamp > now ? now : stamp;
    if (cut_at(f, f->node[src], f->me, sent, NULL)) {
        f->path[src].dropped++;
        comm_msg_free(m);
        return;
    }
    size_t bytes = 0;
    for (int i = 0; i < m->n; i++) bytes += m->len[i];
    if (f->windows) link_params_at(f->spec, f->board, f->node[src], f->me, sent, &f->path[src].p);
    f->path[src].count = shared_next(f->spec->sh, f->chan, f->node[src], f->me);
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

// Tells every peer this end's node (when it is not the rank they know it by).
static void announce(fc_ctx_t *f) {
    uint8_t frame[ANNOUNCE_BYTES] = {0};
    memcpy(frame, ANNOUNCE_MAGIC, 8);
    mlm_put32(frame + 8, (uint32_t)f->me);
    const comm_iov_t iov = {frame, sizeof frame};
    for (int r = 0; r < f->size; r++)
        if (r != f->rank) comm_send(f->inner, r, &iov, 1, ANNOUNCE_TIMEOUT_MS); // a peer already gone is not ours to report
}

// --- the comm wrapper: backend

static const char *fc_name(void *ctx) { return ((fc_ctx_t *)ctx)->name; }
static int fc_rank(void *ctx) { return ((fc_ctx_t *)ctx)->rank; }
static int fc_size(void *ctx) { return ((fc_ctx_t *)ctx)->size; }

static int fc_send(void *ctx, int peer, const comm_iov_t *frames, int n, int timeout_ms) {
    fc_ctx_t *f = ctx;
    check_lost(f, f->fail_any ? COMM_ANY : peer);
    int rc = lost_rc(f, peer, NULL);
    return rc != 0 ? rc : fault_send_stamped(f->inner, peer, frames, n, timeout_ms);
}

static int fc_recv(void *ctx, int peer, comm_msg_t *out, int *from, int timeout_ms) {
    fc_ctx_t *f = ctx;
    const int64_t dl = timeout_ms < 0 ? -1 : fault_now_ns() + (int64_t)timeout_ms * 1000000;
    // a worker's end of a control link cannot tell a lost coordinator from a quiet one: it only waits
    const bool may_lose = f->cuts && f->hb_ms > 0 && !(f->chan == 0 && f->rank != 0);
    *from = -1;
    for (;;) {
        const int gone = pump(f, peer); // the inner comm has nothing more for peer (lost, failed)
        fq_queue_t *q = pick(f, peer);
        const int64_t t = fault_now_ns();
        if (q && q->head->due <= t) return deliver(q, out, from);
        if (may_lose) {
            check_lost(f, f->fail_any ? COMM_ANY : peer);
            const int lrc = lost_rc(f, peer, from);
            if (lrc != 0) return lrc;
        }
        if (!q && gone) return gone;
        if (dl >= 0 && t >= dl) return MLM_ETIMEOUT; // the held messages stay for a later call
        int64_t until = q ? q->head->due : -1;
        if (dl >= 0 && (until < 0 || dl < until)) until = dl;
        int64_t wait = until < 0 ? -1 : until - t; // ns; -1 = no limit
        if (may_lose && (wait < 0 || wait > (int64_t)CUT_POLL_MS * 1000000)) wait = (int64_t)CUT_POLL_MS * 1000000;
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
    free(f->node);
    free(f->lost);
    fault_board_destroy(&f->board);
    fault_free(&f->spec);
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
    return comm_fault_wrap_opts(c, spec, NULL, err, errlen);
}

int comm_fault_wrap_opts(comm_t **c, const fault_spec_t *spec, const fault_wrap_opts_t *o, char *err, size_t errlen) {
    if (!c || !*c) {
        return mlm_fail(err, errlen, MLM_EINVAL, "comm_fault_wrap: no comm");
    }
    if (!spec) return 0;
    const int rank = comm_rank(*c), size = comm_size(*c);
    if (size < 1 || rank < 0 || rank >= size) {
        return mlm_fail(err, errlen, MLM_EINVAL, "comm_fault_wrap: inner comm has rank %d of %d", rank, size);
    }
    fc_ctx_t *f = calloc(1, sizeof *f);
    if (!f) goto oom;
    f->rank = rank;
    f->size = size;
    f->spec = spec_copy(spec);
    f->q = calloc((size_t)size, sizeof *f->q);
    f->path = calloc((size_t)size, sizeof *f->path);
    f->node = calloc((size_t)size, sizeof *f->node);
    f->lost = calloc((size_t)size, sizeof *f->lost);
    if (!f->spec || !f->q || !f->path || !f->node || !f->lost) goto oom;
    f->fail_any = o && o->fail_on_any_loss;
    // Over a control link ranks are nodes; this end records which one it is for the data planes.
    f->chan = strcmp(comm_name(*c), "link") == 0 ? 0 : 1;
    f->hb_ms = o && o->heartbeat_ms > 0 ? o->heartbeat_ms : f->chan == 0 ? comm_link_heartbeat_ms(*c) : 0;
    if (f->chan == 0) fault_set_identity(f->spec, rank);
    const int id = fault_identity(f->spec);
    f->aware = f->chan == 1 && id >= 0;
    f->me = f->aware ? id : rank;
    for (int r = 0; r < size; r++) {
        f->node[r] = r == rank ? f->me : f->aware ? -1 : r;
        fault_path_init(&f->path[r], f->spec, f->node[r] >= 0 ? f->node[r] : r, f->me);
    }
    bool partitions = false, windows = false;
    for (int i = 0; i < f->spec->n_events; i++) {
        partitions |= f->spec->events[i].kind == FAULT_PARTITION;
        windows |= is_link_kind(f->spec->events[i].kind);
    }
    if ((partitions || windows) && f->spec->board) {
        char e2[128];
        fault_board_open(&f->board, f->spec->board, e2, sizeof e2); // not mapped here: no windows at this end
    }
    f->cuts = f->board && partitions;
    f->windows = f->board && windows;
    snprintf(f->name, sizeof f->name, "%s+fault", comm_name(*c));
    comm_t *outer = comm_new(&fault_iface, f);
    if (!outer) goto oom;
    f->inner = *c;
    *c = outer;
    if (f->aware) announce(f);
    // Messages this wrapper discards (drops, cuts) are sent again by a reliable layer above it, as
    // TCP would send a lost segment again.
    if (o && o->reliable && loses_messages(f->spec)) {
        int rc = comm_rel_wrap(c, NULL, err, errlen);
        if (rc != 0) {
            comm_fault_unwrap(c);
            return rc;
        }
    }
    return 0;
oom:
    if (f) {
        free(f->q);
        free(f->path);
        free(f->node);
        free(f->lost);
        fault_board_destroy(&f->board);
        fault_free(&f->spec);
        free(f);
    }
    return mlm_fail(err, errlen, MLM_ENOMEM, "comm_fault_wrap: out of memory");
}

const comm_t *comm_fault_inner(const comm_t *c, int peer, bool *peer_lost) {
    const comm_t *rel = comm_rel_inner(c); // through the reliable layer a wrap may have put on top
    if (rel) c = rel;
    const fc_ctx_t *f = c ? comm_backend_ctx(c, &fault_iface) : NULL;
    if (peer_lost) *peer_lost = f && peer >= 0 && peer < f->size && f->lost[peer];
    return f ? f->inner : c;
}

int comm_fault_unwrap(comm_t **c) {
    if (c && *c && comm_rel_inner(*c)) {
        comm_t *rel = *c;
        fc_ctx_t *under = comm_backend_ctx(comm_rel_inner(rel), &fault_iface);
        if (!under) return MLM_EINVAL;
        comm_rel_unwrap(c);
    }
    fc_ctx_t *f = c && *c ? comm_backend_ctx(*c, &fault_iface) : NULL;
    if (!f) return MLM_EINVAL;
    comm_t *inner = f->inner;
    f->inner = NULL; // fc_destroy leaves it alone
    comm_destroy(c);
    *c = inner;
    return 0;
}
