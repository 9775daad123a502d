// The Redis registry backend: records, heartbeat keys (SET PX), member index, epoch and plan; hiredis with deadlines.
#include "cluster/registry_redis.h"

#include <arpa/inet.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>

#include "core/err.h"

// --- types

typedef struct {
    char host[256];              // server name or address (IPv6 without brackets)
    int port;
    int db;                      // SELECTed when not 0
    char user[256];              // AUTH user ("" = none)
    char pass[256];              // AUTH password ("" = no AUTH)
    char prefix[128];            // key prefix
    int timeout_ms;              // deadline of the connect and of each reply
    char url[512];               // the URL with the password hidden, for messages
    redisContext *c;             // the connection, or NULL (connected again by the next call)
} rctx_t;

#define CMD_MAX_ARGS 8

// One command of a pipeline: argv[i] (len[i] bytes each), borrowed for the call.
typedef struct {
    int argc;
    const char *argv[CMD_MAX_ARGS];
    size_t len[CMD_MAX_ARGS];
} cmd_t;

// Removes the id from the index only when its record is gone (atomic: a member that joins again
// meanwhile keeps its index entry).
static const char SREM_IF_GONE[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end return 0";

// --- helpers: commands

static void cmd_add(cmd_t *c, const char *s, size_t len) {
    c->argv[c->argc] = s;
    c->len[c->argc++] = len;
}

// A command from NUL-terminated words (NULL ends the list).
static cmd_t cmd_words(const char *w0, ...) {
    cmd_t c = {0};
    va_list ap;
    va_start(ap, w0);
    for (const char *w = w0; w && c.argc < CMD_MAX_ARGS; w = va_arg(ap, const char *)) cmd_add(&c, w, strlen(w));
    va_end(ap);
    return c;
}

static void key_of(const rctx_t *x, char *out, size_t cap, const char *kind, const char *id) {
    if (id) snprintf(out, cap, "%s:%s:%s", x->prefix, kind, id);
    else snprintf(out, cap, "%s:%s", x->prefix, kind);
}

// The code for a broken connection, and its text (timeouts say so plainly).
static int io_fail(const rctx_t *x, const redisContext *c, const char *what, char *err, size_t errlen) {
    if (c->err == REDIS_ERR_IO &&
        (!strcmp(c->errstr, strerror(EAGAIN)) || !strcmp(c->errstr, strerror(EWOULDBLOCK)) ||
         !strcmp(c->errstr, strerror(ETIMEDOUT)) || !strcmp(c->errstr, strerror(EINPROGRESS))))
        return mlm_fail(err, errlen, MLM_ETIMEOUT, "registry %s: %s: no answer within %d ms", x->url, what,
                        x->timeout_ms);
    const int code = c->err == REDIS_ERR_IO || c->err == REDIS_ERR_EOF ? MLM_EPEER
                     : c->err == REDIS_ERR_PROTOCOL                    ? MLM_EPROTO
                     : c->err == REDIS_ERR_OOM                         ? MLM_ENOMEM
                                                                       : MLM_EIO;
    return mlm_fail(err, errlen, code, "registry %s: %s: %s", x->url, what,
                    c->errstr[0] ? c->errstr : "connection lost");
}

static void drop(rctx_t *x) {
    if (x->c) redisFree(x->c);
    x->c = NULL;
}

// Runs n commands as one pipeline; replies[i] (caller frees with freeReplyObject) for each. Only
// the connection can fail here (a Redis error reply is a reply): 0, or MLM_EPEER / MLM_ETIMEOUT /
// MLM_EPROTO with the connection dropped (the next call connects again) and no replies.
static int run_once(rctx_t *x, int n, const cmd_t *cmds, redisReply **replies, const char *what, char *err,
                    size_t errlen);
static int rconnect(rctx_t *x, char *err, size_t errlen);

static int run(rctx_t *x, int n, const cmd_t *cmds, redisReply **replies, const char *what, char *err, size_t errlen) {
    const bool reused = x->c != NULL;
    if (!x->c) {
        int rc = rconnect(x, err, errlen);
        if (rc != 0) return rc;
    }
    int rc = run_once(x, n, cmds, replies, what, err, errlen);
    // A connection that was fine before may have been closed meanwhile (a server restart): one more
    // try on a fresh connection. A timeout is not tried again (that would double the deadline).
    if (rc == MLM_EPEER && reused) {
        if ((rc = rconnect(x, err, errlen)) != 0) return rc;
        rc = run_once(x, n, cmds, replies, what, err, errlen);
    }
    return rc;
}

static int run_once(rctx_t *x, int n, const cmd_t *cmds, redisReply **replies, const char *what, char *err,
                    size_t errlen) {
    for (int i = 0; i < n; i++) replies[i] = NULL;
    // A write to a connection the server closed raises SIGPIPE: blocked here, and taken back if we raised it.
    sigset_t pipe_set, old, pend;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    sigpending(&pend);
    const bool was_pending = sigismember(&pend, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++)
        if (redisAppendCommandArgv(x->c, cmds[i].argc, (const char **)cmds[i].argv, cmds[i].len) != REDIS_OK)
            rc = io_fail(x, x->c, what, err, errlen);
    for (int i = 0; i < n && rc == 0; i++) {
        void *rep = NULL;
        if (redisGetReply(x->c, &rep) != REDIS_OK || !rep) rc = io_fail(x, x->c, what, err, errlen);
        else replies[i] = rep;
    }
    sigpending(&pend);
    if (!was_pending && sigismember(&pend, SIGPIPE)) {
        const struct timespec zero = {0, 0};
        sigtimedwait(&pipe_set, NULL, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        for (int i = 0; i < n; i++) {
            if (replies[i]) freeReplyObject(replies[i]);
            replies[i] = NULL;
        }
        drop(x);
    }
    return rc;
}

static void free_replies(redisReply **r, int n) {
    for (int i = 0; i < n; i++)
        if (r[i]) freeReplyObject(r[i]);
}

// 0 when r is not an error reply (nor, for EXEC, holds one); else the error naming what.
static int reply_ok(const rctx_t *x, const redisReply *r, const char *what, char *err, size_t errlen) {
    if (!r) return mlm_fail(err, errlen, MLM_EPROTO, "registry %s: %s: no reply", x->url, what);
    if (r->type == REDIS_REPLY_ERROR)
        return mlm_fail(err, errlen, strncmp(r->str, "WRONGTYPE", 9) == 0 ? MLM_EFORMAT : MLM_EIO,
                        "registry %s: %s: %s", x->url, what, r->str);
    if (r->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i < r->elements; i++) {
            int rc = reply_ok(x, r->element[i], what, err, errlen);
            if (rc != 0) return rc;
        }
    return 0;
}

// Connects (again), with the deadline for the connect and for every reply after it; logs in and
// selects the database.
static int rconnect(rctx_t *x, char *err, size_t errlen) {
    drop(x);
    const struct timeval tv = {x->timeout_ms / 1000, (x->timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(x->host, x->port, tv);
    if (!c) return mlm_fail(err, errlen, MLM_ENOMEM, "registry %s: out of memory", x->url);
    if (c->err) {
        int rc = io_fail(x, c, "cannot connect", err, errlen);
        redisFree(c);
        return rc;
    }
    if (redisSetTimeout(c, tv) != REDIS_OK) {
        int rc = io_fail(x, c, "cannot set the deadline", err, errlen);
        redisFree(c);
        return rc;
    }
    x->c = c;
    char dbs[16];
    snprintf(dbs, sizeof dbs, "%d", x->db);
    cmd_t cmds[2];
    int n = 0;
    if (x->pass[0])
        cmds[n++] = x->user[0] ? cmd_words("AUTH", x->user, x->pass, NULL) : cmd_words("AUTH", x->pass, NULL);
    if (x->db) cmds[n++] = cmd_words("SELECT", dbs, NULL);
    if (n == 0) return 0;
    redisReply *rep[2];
    int rc = run_once(x, n, cmds, rep, "logging in", err, errlen);
    for (int i = 0; i < n && rc == 0; i++) {
        rc = reply_ok(x, rep[i], i == 0 && x->pass[0] ? "AUTH" : "SELECT", err, errlen);
        if (rc != 0) rc = MLM_EIO;
    }
    if (rc == 0) free_replies(rep, n);
    else if (x->c) { // refused: the replies are there, the connection is of no use
        free_replies(rep, n);
        drop(x);
    }
    return rc;
}

// Parses the URL into x (see cluster/registry.h). 0 or MLM_EINVAL.
static int parse_url(rctx_t *x, const char *url, char *err, size_t errlen) {
    memset(x, 0, sizeof *x);
    x->port = 6379;
    x->timeout_ms = REGISTRY_DEFAULT_TIMEOUT_MS;
    snprintf(x->prefix, sizeof x->prefix, "meshlm");
    const char *p = url + 8; // after "redis://"
    const size_t alen = strcspn(p, "/?");
    char auth[256];
    if (alen >= sizeof auth) return mlm_fail(err, errlen, MLM_EINVAL, "registry URL too long");
    memcpy(auth, p, alen);
    auth[alen] = 0;
    // The URL for messages: the password hidden.
    char *at = strrchr(auth, '@');
    char *hostport = auth;
    if (at) {
        *at = 0;
        hostport = at + 1;
        char *colon = strchr(auth, ':');
        if (colon) {
            *colon = 0;
            snprintf(x->user, sizeof x->user, "%s", auth);
            snprintf(x->pass, sizeof x->pass, "%s", colon + 1);
        } else {
            snprintf(x->pass, sizeof x->pass, "%s", auth);
        }
        snprintf(x->url, sizeof x->url, "redis://%s:***@%s", x->user, p + (at - auth) + 1);
    } else {
        snprintf(x->url, sizeof x->url, "%s", url);
    }
    // host[:port] or [v6][:port]
    const char *portp = NULL;
    if (hostport[0] == '[') {
        char *close = strchr(hostport, ']');
        if (!close) return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: unclosed '[' in the host", x->url);
        *close = 0;
        snprintf(x->host, sizeof x->host, "%s", hostport + 1);
        if (close[1] == ':') portp = close + 2;
        else if (close[1]) return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: bad host", x->url);
    } else {
        char *colon = strchr(hostport, ':');
        if (colon) {
            *colon = 0;
            portp = colon + 1;
        }
        snprintf(x->host, sizeof x->host, "%s", hostport);
    }
    if (!x->host[0]) return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: no host", x->url);
    if (portp) {
        char *end;
        const long port = strtol(portp, &end, 10);
        if (!*portp || *end || port < 1 || port > 65535)
            return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: bad port '%s'", x->url, portp);
        x->port = (int)port;
    }
    p += alen;
    if (*p == '/') {
        p++;
        const size_t dlen = strcspn(p, "?");
        if (dlen) {
            char *end;
            const long db = strtol(p, &end, 10);
            if (end != p + dlen || db < 0 || db > 1000000)
                return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: bad database number", x->url);
            x->db = (int)db;
        }
        p += dlen;
    }
    if (*p == '?') p++;
    while (*p) {
        const size_t plen = strcspn(p, "&");
        char kv[300];
        if (plen >= sizeof kv) return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: option too long", x->url);
        memcpy(kv, p, plen);
        kv[plen] = 0;
        p += plen + (p[plen] == '&');
        if (!kv[0]) continue;
        char *eq = strchr(kv, '=');
        if (!eq) return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: option '%s' without a value", x->url, kv);
        *eq = 0;
        const char *val = eq + 1;
        if (!strcmp(kv, "prefix")) {
            bool ok = val[0] && strlen(val) < sizeof x->prefix;
            for (const char *s = val; ok && *s; s++) ok = (unsigned char)*s > 0x20 && (unsigned char)*s < 0x7f;
            if (!ok) return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: bad prefix '%s'", x->url, val);
            snprintf(x->prefix, sizeof x->prefix, "%s", val);
        } else if (!strcmp(kv, "timeout")) {
            char *end;
            const long t = strtol(val, &end, 10);
            if (!*val || *end || t < 1 || t > 600000)
                return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: bad timeout '%s' (ms, 1..600000)", x->url, val);
            x->timeout_ms = (int)t;
        } else {
            return mlm_fail(err, errlen, MLM_EINVAL, "registry %s: unknown option '%s' (prefix, timeout)", x->url, kv);
        }
    }
    return 0;
}

static int64_t wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// A member from its GETRANGE and PTTL replies: 0, MLM_ENOTFOUND (no record) or MLM_EFORMAT (malformed).
static int member_from(const rctx_t *x, const char *id, const redisReply *rec, const redisReply *pttl,
                       registry_member_t *out, char *err, size_t errlen) {
    if (!rec || rec->type == REDIS_REPLY_NIL || (rec->type == REDIS_REPLY_STRING && rec->len == 0))
        return mlm_fail(err, errlen, MLM_ENOTFOUND, "registry %s: no member %s", x->url, id);
    if (rec->type == REDIS_REPLY_ERROR)
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: %s", id, rec->str);
    if (rec->type != REDIS_REPLY_STRING) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: record is not a string", id);
    char e2[256];
    if ((size_t)rec->len > REGISTRY_RECORD_MAX)
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: record longer than %d bytes", id, REGISTRY_RECORD_MAX);
    if (registry_record_parse(rec->str, (size_t)rec->len, out, e2, sizeof e2) != 0)
        return mlm_fail(err, errlen, MLM_EFORMAT, "%s: %s", id, e2);
    if (strcmp(out->id, id) != 0) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: the record names %s", id, out->id);
    const long long left = pttl && pttl->type == REDIS_REPLY_INTEGER ? pttl->integer : -2;
    if (left >= 0) { // alive: the age from the TTL left, on the server's clock
        const long long age = (long long)out->ttl_ms - left;
        out->age_ms = age < 0 ? 0 : age;
    } else { // expired (-2), or a heartbeat without a TTL (-1) that proves nothing: lost
        const int64_t age = wall_ms() - out->beat_unix_ms;
        out->age_ms = age > out->ttl_ms ? age : out->ttl_ms;
        out->state = REGISTRY_STATE_LOST;
    }
    return 0;
}

// --- the backend

static const char *r_name(void *ctx) { return "redis"; }

static int r_put(void *ctx, const registry_member_t *m, bool bump, char *err, size_t errlen) {
    rctx_t *x = ctx;
    char *json = NULL;
    int rc = registry_record_format(m, false, &json);
    if (rc != 0) return mlm_fail(err, errlen, rc, "registry %s: %s: cannot format the record", x->url, m->id);
    char knode[256], khb[256], kmem[200], kep[200], seq[32], ttl[32];
    key_of(x, knode, sizeof knode, "node", m->id);
    key_of(x, khb, sizeof khb, "hb", m->id);
    key_of(x, kmem, sizeof kmem, "members", NULL);
    key_of(x, kep, sizeof kep, "epoch", NULL);
    snprintf(seq, sizeof seq, "%llu", (unsigned long long)m->seq);
    snprintf(ttl, sizeof ttl, "%d", m->ttl_ms);
    cmd_t cmds[6];
    int n = 0;
    cmds[n++] = cmd_words("MULTI", NULL);
    cmds[n] = cmd_words("SET", knode, NULL);
    cmd_add(&cmds[n++], json, strlen(json));
    cmds[n++] = cmd_words("SET", khb, seq, "PX", ttl, NULL);
    cmds[n++] = cmd_words("SADD", kmem, m->id, NULL);
    if (bump) cmds[n++] = cmd_words("INCR", kep, NULL);
    cmds[n++] = cmd_words("EXEC", NULL);
    redisReply *rep[6];
    char what[128];
    snprintf(what, sizeof what, "publishing %s", m->id);
    rc = run(x, n, cmds, rep, what, err, errlen);
    free(json);
    if (rc != 0) return rc;
    for (int i = 0; i < n && rc == 0; i++) rc = reply_ok(x, rep[i], what, err, errlen);
    if (rc == 0 && rep[n - 1]->type != REDIS_REPLY_ARRAY)
        rc = mlm_fail(err, errlen, MLM_EIO, "registry %s: %s: the transaction was not run", x->url, what);
    free_replies(rep, n);
    return rc;
}

static int r_get(void *ctx, const char *id, registry_member_t *out, char *err, size_t errlen) {
    rctx_t *x = ctx;
    char knode[256], khb[256], maxs[32];
    key_of(x, knode, sizeof knode, "node", id);
    key_of(x, khb, sizeof khb, "hb", id);
    snprintf(maxs, sizeof maxs, "%d", REGISTRY_RECORD_MAX); // one byte more than allowed tells a long record
    const cmd_t cmds[2] = {cmd_words("GETRANGE", knode, "0", maxs, NULL), cmd_words("PTTL", khb, NULL)};
    redisReply *rep[2];
    int rc = run(x, 2, cmds, rep, "reading a member", err, errlen);
    if (rc != 0) return rc;
    rc = member_from(x, id, rep[0], rep[1], out, err, errlen);
    free_replies(rep, 2);
    return rc;
}

static int r_del(void *ctx, const char *id, char *err, size_t errlen) {
    rctx_t *x = ctx;
    char knode[256], khb[256], kmem[200], kep[200];
    key_of(x, knode, sizeof knode, "node", id);
    key_of(x, khb, sizeof khb, "hb", id);
    key_of(x, kmem, sizeof kmem, "members", NULL);
    key_of(x, kep, sizeof kep, "epoch", NULL);
    const cmd_t cmds[6] = {cmd_words("MULTI", NULL),           cmd_words("DEL", knode, NULL),
                           cmd_words("DEL", khb, NULL),        cmd_words("SREM", kmem, id, NULL),
                           cmd_words("INCR", kep, NULL),       cmd_words("EXEC", NULL)};
    redisReply *rep[6];
    int rc = run(x, 6, cmds, rep, "removing a member", err, errlen);
    if (rc != 0) return rc;
    for (int i = 0; i < 6 && rc == 0; i++) rc = reply_ok(x, rep[i], "removing a member", err, errlen);
    const redisReply *ex = rep[5];
    if (rc == 0 && (ex->type != REDIS_REPLY_ARRAY || ex->elements < 1 || ex->element[0]->type != REDIS_REPLY_INTEGER))
        rc = mlm_fail(err, errlen, MLM_EIO, "registry %s: removing %s: the transaction was not run", x->url, id);
    if (rc == 0 && ex->element[0]->integer == 0)
        rc = mlm_fail(err, errlen, MLM_ENOTFOUND, "registry %s: no member %s", x->url, id);
    free_replies(rep, 6);
    return rc;
}

// Appends "text; " to warn (cap bytes) while there is room.
static void warn_add(char *warn, size_t cap, const char *text) {
    const size_t used = strlen(warn);
    if (used + 8 >= cap) return;
    snprintf(warn + used, cap - used, "%s%s", used ? "; " : "", text);
}

static int r_list(void *ctx, registry_member_t **out, int *n, int *skipped, char *warn, size_t cap, char *err,
                  size_t errlen) {
    rctx_t *x = ctx;
    *out = NULL;
    *n = 0;
    *skipped = 0;
    char kmem[200], count[16];
    key_of(x, kmem, sizeof kmem, "members", NULL);
    snprintf(count, sizeof count, "%d", REGISTRY_MAX_MEMBERS + 1);
    const cmd_t sm = cmd_words("SRANDMEMBER", kmem, count, NULL);
    redisReply *ids = NULL;
    int rc = run(x, 1, &sm, &ids, "listing members", err, errlen);
    if (rc != 0) return rc;
    if ((rc = reply_ok(x, ids, "listing members", err, errlen)) != 0 || ids->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(ids);
        return rc ? rc : mlm_fail(err, errlen, MLM_EFORMAT, "registry %s: %s is not a set", x->url, kmem);
    }
    size_t k = ids->elements;
    if (k > REGISTRY_MAX_MEMBERS) {
        char w[128];
        snprintf(w, sizeof w, "the index holds more than %d ids: %d listed", REGISTRY_MAX_MEMBERS,
                 REGISTRY_MAX_MEMBERS);
        warn_add(warn, cap, w);
        k = REGISTRY_MAX_MEMBERS;
    }
    // The valid ids, and two commands (record, heartbeat TTL) for each.
    const char **vid = calloc(k ? k : 1, sizeof *vid);                   // (nv) borrowed from ids
    cmd_t *cmds = calloc(2 * (k ? k : 1), sizeof *cmds);                   // (2 * nv)
    char (*keys)[2][256] = calloc(k ? k : 1, sizeof *keys);                // (nv, 2) record and heartbeat keys
    redisReply **rep = calloc(2 * (k ? k : 1), sizeof *rep);              // (2 * nv)
    registry_member_t *ms = calloc(k ? k : 1, sizeof *ms);                 // (nv)
    if (!vid || !cmds || !keys || !rep || !ms) rc = mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    int nv = 0;
    char maxs[32];
    snprintf(maxs, sizeof maxs, "%d", REGISTRY_RECORD_MAX);
    for (size_t i = 0; i < k && rc == 0; i++) {
        const redisReply *e = ids->element[i];
        if (e->type != REDIS_REPLY_STRING || strlen(e->str) != (size_t)e->len || !registry_id_valid(e->str)) {
            (*skipped)++;
            warn_add(warn, cap, "an id in the index that is not printable ASCII without spaces");
            continue;
        }
        vid[nv] = e->str;
        key_of(x, keys[nv][0], sizeof keys[nv][0], "node", e->str);
        key_of(x, keys[nv][1], sizeof keys[nv][1], "hb", e->str);
        cmds[2 * nv] = cmd_words("GETRANGE", keys[nv][0], "0", maxs, NULL);
        cmds[2 * nv + 1] = cmd_words("PTTL", keys[nv][1], NULL);
        nv++;
    }
    if (rc == 0 && nv > 0) rc = run(x, 2 * nv, cmds, rep, "reading members", err, errlen);
    int nm = 0, n_stale = 0;
    for (int i = 0; i < nv && rc == 0; i++) {
        char e2[320];
        const int mr = member_from(x, vid[i], rep[2 * i], rep[2 * i + 1], &ms[nm], e2, sizeof e2);
        if (mr == 0) nm++;
        else if (mr == MLM_ENOTFOUND) { // an index entry without a record: removed below
            cmds[n_stale] = cmd_words("EVAL", SREM_IF_GONE, "2", keys[i][0], kmem, vid[i], NULL);
            n_stale++;
        } else {
            (*skipped)++;
            warn_add(warn, cap, e2);
        }
    }
    if (rc == 0) free_replies(rep, 2 * nv);
    if (rc == 0 && n_stale > 0) { // housekeeping: a failure here does not fail the list
        char e3[256];
        if (run(x, n_stale, cmds, rep, "cleaning the index", e3, sizeof e3) == 0) free_replies(rep, n_stale);
    }
    freeReplyObject(ids);
    free(vid);
    free(cmds);
    free(keys);
    free(rep);
    if (rc != 0) {
        free(ms);
        return rc;
    }
    *out = ms;
    *n = nm;
    return 0;
}

static int r_epoch(void *ctx, uint64_t *out, char *err, size_t errlen) {
    rctx_t *x = ctx;
    *out = 0;
    char kep[200];
    key_of(x, kep, sizeof kep, "epoch", NULL);
    const cmd_t c = cmd_words("GET", kep, NULL);
    redisReply *rep = NULL;
    int rc = run(x, 1, &c, &rep, "reading the epoch", err, errlen);
    if (rc != 0) return rc;
    if ((rc = reply_ok(x, rep, "reading the epoch", err, errlen)) == 0 && rep->type == REDIS_REPLY_STRING) {
        char *end = NULL;
        errno = 0;
        const unsigned long long v = rep->len > 0 && rep->len < 21 ? strtoull(rep->str, &end, 10) : 0;
        if (!end || *end || errno || rep->str[0] == '-')
            rc = mlm_fail(err, errlen, MLM_EFORMAT, "registry %s: %s is not a counter", x->url, kep);
        else *out = v;
    } else if (rc == 0 && rep->type != REDIS_REPLY_NIL) {
        rc = mlm_fail(err, errlen, MLM_EFORMAT, "registry %s: %s is not a counter", x->url, kep);
    }
    freeReplyObject(rep);
    return rc;
}

static int r_set_plan(void *ctx, const char *text, size_t len, char *err, size_t errlen) {
    rctx_t *x = ctx;
    char kplan[200], kep[200];
    key_of(x, kplan, sizeof kplan, "plan", NULL);
    key_of(x, kep, sizeof kep, "epoch", NULL);
    cmd_t cmds[4] = {cmd_words("MULTI", NULL), cmd_words("SET", kplan, NULL), cmd_words("INCR", kep, NULL),
                     cmd_words("EXEC", NULL)};
    cmd_add(&cmds[1], text, len);
    redisReply *rep[4];
    int rc = run(x, 4, cmds, rep, "publishing the plan", err, errlen);
    if (rc != 0) return rc;
    for (int i = 0; i < 4 && rc == 0; i++) rc = reply_ok(x, rep[i], "publishing the plan", err, errlen);
    free_replies(rep, 4);
    return rc;
}

static int r_get_plan(void *ctx, char **text, char *err, size_t errlen) {
    rctx_t *x = ctx;
    *text = NULL;
    char kplan[200], maxs[32];
    key_of(x, kplan, sizeof kplan, "plan", NULL);
    snprintf(maxs, sizeof maxs, "%zu", REGISTRY_PLAN_MAX);
    const cmd_t cmds[2] = {cmd_words("EXISTS", kplan, NULL), cmd_words("GETRANGE", kplan, "0", maxs, NULL)};
    redisReply *rep[2];
    int rc = run(x, 2, cmds, rep, "reading the plan", err, errlen);
    if (rc != 0) return rc;
    for (int i = 0; i < 2 && rc == 0; i++) rc = reply_ok(x, rep[i], "reading the plan", err, errlen);
    if (rc == 0 && (rep[0]->type != REDIS_REPLY_INTEGER || rep[0]->integer == 0))
        rc = mlm_fail(err, errlen, MLM_ENOTFOUND, "registry %s: no plan published", x->url);
    else if (rc == 0 && rep[1]->type != REDIS_REPLY_STRING)
        rc = mlm_fail(err, errlen, MLM_EFORMAT, "registry %s: %s is not a string", x->url, kplan);
    else if (rc == 0 && (size_t)rep[1]->len > REGISTRY_PLAN_MAX)
        rc = mlm_fail(err, errlen, MLM_ERANGE, "registry %s: the plan is longer than %zu bytes", x->url,
                      REGISTRY_PLAN_MAX);
    else if (rc == 0 && memchr(rep[1]->str, 0, (size_t)rep[1]->len))
        rc = mlm_fail(err, errlen, MLM_EFORMAT, "registry %s: the plan holds a NUL byte", x->url);
    else if (rc == 0 && !(*text = strdup(rep[1]->str)))
        rc = mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    free_replies(rep, 2);
    return rc;
}

static int r_dup(void *ctx, void **out, char *err, size_t errlen) {
    const rctx_t *x = ctx;
    rctx_t *y = malloc(sizeof *y);
    if (!y) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    *y = *x;
    y->c = NULL;
    int rc = rconnect(y, err, errlen);
    if (rc != 0) {
        free(y);
        return rc;
    }
    *out = y;
    return 0;
}

static void r_destroy(void *ctx) {
    rctx_t *x = ctx;
    drop(x);
    free(x);
}

static int r_local_addr(void *ctx, char *buf, size_t cap, char *err, size_t errlen) {
    rctx_t *x = ctx;
    if (!x->c) {
        int rc = rconnect(x, err, errlen);
        if (rc != 0) return rc;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(x->c->fd, (struct sockaddr *)&ss, &sl) != 0)
        return mlm_fail(err, errlen, MLM_EIO, "registry %s: getsockname: %s", x->url, strerror(errno));
    const void *a = ss.ss_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)&ss)->sin6_addr
                                             : (const void *)&((struct sockaddr_in *)&ss)->sin_addr;
    if ((ss.ss_family != AF_INET && ss.ss_family != AF_INET6) || !inet_ntop(ss.ss_family, a, buf, (socklen_t)cap))
        return mlm_fail(err, errlen, MLM_EIO, "registry %s: no IP address for this end", x->url);
    return 0;
}

static const struct registry_i redis_iface = {
    .name = r_name,
    .put = r_put,
    .get = r_get,
    .del = r_del,
    .list = r_list,
    .epoch = r_epoch,
    .set_plan = r_set_plan,
    .get_plan = r_get_plan,
    .dup = r_dup,
    .destroy = r_destroy,
    .local_addr = r_local_addr,
};

// --- public API

int registry_redis_open(registry_t **out, const char *url, char *err, size_t errlen) {
    *out = NULL;
    rctx_t *x = calloc(1, sizeof *x);
    if (!x) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    int rc = parse_url(x, url, err, errlen);
    if (rc == 0) rc = rconnect(x, err, errlen);
    if (rc != 0) {
        r_destroy(x);
        return rc;
    }
    char shown[sizeof x->url];
    snprintf(shown, sizeof shown, "%s", x->url);
    *out = registry_new(&redis_iface, x, shown);
    return *out ? 0 : mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
}
