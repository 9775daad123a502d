// CUnit suite "registry": the node registry. One table of checks runs on both implementations (the
// embedded store and a real redis-server: the one on 127.0.0.1:6379 CI starts, else one started here
// on a free port); then Redis alone: a killed beater process, a server that stops or freezes mid-way,
// malformed records written by someone else, and `meshlm worker --registry --standby` / `meshlm nodes`.
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"
#include "cluster/launch.h"
#include "cluster/registry.h"
#include "core/clock.h"
#include "core/err.h"
#include "worker/kernels/quant.h"

// --- helpers: a Redis server for the suite

typedef struct {
    bool have;               // a server answers on port
    int port;
    pid_t pid;               // the server this suite started (0: CI's)
    char prefix[64];         // this run's key prefix: parallel runs never collide
    char why[256];           // why the Redis checks are skipped
} suite_redis_t;

static suite_redis_t srv; // the suite's server, set up by suite_init

// Whether a Redis answers PING on 127.0.0.1:port within timeout_ms.
static bool redis_pings(int port, int timeout_ms) {
    const struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    bool ok = false;
    if (c && !c->err && redisSetTimeout(c, tv) == REDIS_OK) {
        redisReply *r = redisCommand(c, "PING");
        ok = r && r->type == REDIS_REPLY_STATUS && !strcmp(r->str, "PONG");
        if (r) freeReplyObject(r);
    }
    if (c) redisFree(c);
    return ok;
}

// Starts redis-server on port (no persistence), waits until it answers. The pid, 0 when the port is
// taken or it did not come up, -1 when there is no redis-server binary.
static pid_t redis_start(int port) {
    const pid_t pid = fork();
    if (pid == 0) {
        const int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
        }
        char ps[16];
        snprintf(ps, sizeof ps, "%d", port);
        execlp("redis-server", "redis-server", "--port", ps, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               (char *)NULL);
        _exit(127);
    }
    if (pid < 0) return 0;
    const int64_t dl = mlm_deadline(5000);
    while (!mlm_passed(dl)) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) && WEXITSTATUS(st) == 127 ? -1 : 0;
        if (redis_pings(port, 200)) return pid;
        usleep(20000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return 0;
}

static void redis_stop(pid_t pid) {
    if (pid <= 0) return;
    kill(pid, SIGCONT);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

// A fresh server on a free port: its pid and port, or pid <= 0 (as redis_start).
static pid_t redis_start_free(int *port) {
    unsigned seed = (unsigned)getpid() ^ (unsigned)mlm_now_us();
    for (int i = 0; i < 20; i++) {
        const int p = launch_candidate_port(&seed);
        if (p <= 0 || redis_pings(p, 100)) continue;
        const pid_t pid = redis_start(p);
        if (pid != 0) {
            *port = p;
            return pid;
        }
    }
    return 0;
}

// Deletes every key under pattern on the server at port (SCAN + DEL).
static void redis_clear(int port, const char *pattern) {
    const struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (!c || c->err) {
        if (c) redisFree(c);
        return;
    }
    redisSetTimeout(c, tv);
    char cursor[32] = "0";
    do {
        redisReply *r = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            if (r) freeReplyObject(r);
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            redisReply *d = redisCommand(c, "DEL %s", r->element[1]->element[i]->str);
            if (d) freeReplyObject(d);
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    redisFree(c);
}

static int suite_init(void) {
    memset(&srv, 0, sizeof srv);
    snprintf(srv.prefix, sizeof srv.prefix, "meshlm-test-%ld-%llx", (long)getpid(),
             (unsigned long long)(mlm_now_us() & 0xffffff));
    if (redis_pings(6379, 500)) {
        srv.have = true;
        srv.port = 6379;
        return 0;
    }
    const pid_t pid = redis_start_free(&srv.port);
    if (pid > 0) {
        srv.have = true;
        srv.pid = pid;
    } else {
        snprintf(srv.why, sizeof srv.why, "%s",
                 pid < 0 ? "no redis-server binary (apt-get install redis-server)"
                         : "no Redis on 127.0.0.1:6379 and none could be started");
    }
    return 0;
}

static int suite_clean(void) {
    if (srv.have) {
        char pat[96];
        snprintf(pat, sizeof pat, "%s*", srv.prefix);
        redis_clear(srv.port, pat);
    }
    redis_stop(srv.pid);
    return 0;
}

// True when the Redis checks can run; otherwise says why they are skipped.
static bool have_redis(void) {
    if (srv.have) return true;
    fprintf(stderr, "(skipped: %s) ", srv.why);
    return false;
}

// The URL of this run's Redis with a prefix of its own for one check.
static void redis_url(char *out, size_t cap, const char *check, int timeout_ms) {
    snprintf(out, cap, "redis://127.0.0.1:%d/0?prefix=%s-%s&timeout=%d", srv.port, srv.prefix, check, timeout_ms);
}

// --- helpers: records

static registry_member_t sample(const char *id, registry_role_t role, const char *endpoint) {
    registry_member_t m;
    memset(&m, 0, sizeof m);
    snprintf(m.id, sizeof m.id, "%s", id);
    m.role = role;
    snprintf(m.endpoint, sizeof m.endpoint, "%s", endpoint);
    m.state = REGISTRY_STATE_IDLE;
    m.prof.n_cores = 4;
    m.prof.mem_budget = 2ull << 30;
    m.prof.n_speeds = 2;
    m.prof.speed[0].type = QT_Q4_0;
    m.prof.speed[0].gflops = 12.5;
    m.prof.speed[1].type = QT_Q8_0;
    m.prof.speed[1].gflops = 9.123456789012345;
    m.prof.mem_bw = 10000000000ull;
    m.prof.disk_bw = 500000000ull;
    m.prof.has_model = true;
    for (int i = 0; i < 32; i++) m.prof.model_sha256[i] = (uint8_t)(i * 7 + 1);
    m.prof.model_size = 1185376;
    m.pid = 4242;
    snprintf(m.host, sizeof m.host, "host-a");
    return m;
}

// Whether the stored fields of a (written) and b (read back) agree.
static bool same_member(const registry_member_t *a, const registry_member_t *b) {
    bool ok = !strcmp(a->id, b->id) && a->role == b->role && !strcmp(a->endpoint, b->endpoint) &&
              a->pid == b->pid && !strcmp(a->host, b->host) && a->prof.n_cores == b->prof.n_cores &&
              a->prof.mem_budget == b->prof.mem_budget && a->prof.mem_bw == b->prof.mem_bw &&
              a->prof.disk_bw == b->prof.disk_bw && a->prof.has_model == b->prof.has_model &&
              a->prof.n_speeds == b->prof.n_speeds;
    for (int i = 0; ok && i < a->prof.n_speeds; i++)
        ok = a->prof.speed[i].type == b->prof.speed[i].type && a->prof.speed[i].gflops == b->prof.speed[i].gflops;
    if (ok && a->prof.has_model)
        ok = !memcmp(a->prof.model_sha256, b->prof.model_sha256, 32) && a->prof.model_size == b->prof.model_size;
    return ok;
}

static int count_role(const registry_member_t *ms, int n, registry_role_t role) {
    int k = 0;
    for (int i = 0; i < n; i++) k += ms[i].role == role;
    return k;
}

// Polls id until its state is LOST (or deadline_ms passes); the ms waited, or -1.
static double wait_lost(registry_t *r, const char *id, int deadline_ms) {
    const double t0 = mlm_now_ms();
    while (mlm_now_ms() - t0 < deadline_ms) {
        registry_member_t m;
        if (registry_get(r, id, &m) == 0 && m.state == REGISTRY_STATE_LOST) return mlm_now_ms() - t0;
        usleep(10000);
    }
    return -1;
}

// --- the table of checks: each runs on the embedded store and on Redis

typedef void (*check_fn)(const char *url);

// Runs check on mem://NAME and on this run's Redis (name is its key prefix there).
static void both(check_fn check, const char *name) {
    char url[256];
    snprintf(url, sizeof url, "mem://%s", name);
    check(url);
    if (!have_redis()) return;
    redis_url(url, sizeof url, name, 2000);
    check(url);
}

static registry_t *open_ok(const char *url) {
    registry_t *r = NULL;
    char err[512] = "";
    const int rc = registry_open(&r, url, err, sizeof err);
    if (rc != 0) fprintf(stderr, "\n%s: %s\n", url, err);
    CU_ASSERT_EQUAL(rc, 0);
    return r;
}

// Join, list (sorted, every field back), get, leave; standbys are listed as standbys.
static void check_join_list_leave(const char *url) {
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    const registry_member_t w1 = sample("w1", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7001");
    registry_member_t w2 = sample("w2", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7003");
    registry_member_t s1 = sample("s1", REGISTRY_ROLE_STANDBY, "ipc:///tmp/s1");
    w2.prof.has_model = false;
    w2.prof.n_speeds = 0;
    s1.state = REGISTRY_STATE_STARTING;
    CU_ASSERT_EQUAL(registry_join(r, &w1, 5000), 0);
    CU_ASSERT_EQUAL(registry_join(r, &w2, 5000), 0);
    CU_ASSERT_EQUAL(registry_join(r, &s1, 5000), 0);
    registry_member_t *ms = NULL;
    int n = -1;
    CU_ASSERT_EQUAL_FATAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL_FATAL(n, 3);
    CU_ASSERT_STRING_EQUAL(ms[0].id, "s1");
    CU_ASSERT_STRING_EQUAL(ms[1].id, "w1");
    CU_ASSERT_STRING_EQUAL(ms[2].id, "w2");
    CU_ASSERT(same_member(&s1, &ms[0]));
    CU_ASSERT(same_member(&w1, &ms[1]));
    CU_ASSERT(same_member(&w2, &ms[2]));
    CU_ASSERT_EQUAL(ms[0].state, REGISTRY_STATE_STARTING);
    CU_ASSERT_EQUAL(ms[1].state, REGISTRY_STATE_IDLE);
    CU_ASSERT_EQUAL(ms[1].seq, 1);
    CU_ASSERT_EQUAL(ms[1].ttl_ms, 5000);
    CU_ASSERT(ms[1].age_ms >= 0 && ms[1].age_ms < 1000);
    CU_ASSERT(ms[1].joined_unix_ms > 1600000000000LL); // a wall-clock time
    CU_ASSERT_EQUAL(count_role(ms, n, REGISTRY_ROLE_STANDBY), 1);
    CU_ASSERT_EQUAL(count_role(ms, n, REGISTRY_ROLE_WORKER), 2);
    CU_ASSERT_EQUAL(registry_skipped(r), 0);
    free(ms);
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "w1", &g), 0);
    CU_ASSERT(same_member(&w1, &g));
    CU_ASSERT_EQUAL(registry_get(r, "nope", &g), MLM_ENOTFOUND);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), "nope"));
    // leave: gone from the list; leaving again is MLM_ENOTFOUND
    CU_ASSERT_EQUAL(registry_leave(r, "w2"), 0);
    CU_ASSERT_EQUAL(registry_leave(r, "w2"), MLM_ENOTFOUND);
    CU_ASSERT_EQUAL_FATAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 2);
    free(ms);
    CU_ASSERT_EQUAL(registry_leave(r, "w1"), 0);
    CU_ASSERT_EQUAL(registry_leave(r, "s1"), 0);
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 0);
    CU_ASSERT_PTR_NULL(ms);
    registry_destroy(&r);
    CU_ASSERT_PTR_NULL(r);
    registry_destroy(&r); // idempotent
}

// A member that stops beating is lost within its TTL (plus a margin, and not before), and reap
// removes it only once it has been lost for longer than the grace period.
static void check_ttl_expiry_and_reap(const char *url) {
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    const registry_member_t m = sample("mortal", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7005");
    const int ttl = 300;
    const double t0 = mlm_now_ms();
    CU_ASSERT_EQUAL_FATAL(registry_join(r, &m, ttl), 0);
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "mortal", &g), 0);
    if (mlm_now_ms() - t0 < ttl - 50) CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_IDLE);
    const double waited = wait_lost(r, "mortal", 3000);
    const double lost_at = waited < 0 ? -1 : mlm_now_ms() - t0;
    CU_ASSERT(lost_at >= ttl - 5 && lost_at <= ttl + 400);
    if (lost_at < ttl - 5 || lost_at > ttl + 400)
        fprintf(stderr, "\n%s: lost after %.0f ms (ttl %d)\n", url, lost_at, ttl);
    CU_ASSERT_EQUAL(registry_get(r, "mortal", &g), 0);
    CU_ASSERT(g.age_ms >= ttl);
    int removed = -1;
    CU_ASSERT_EQUAL(registry_reap(r, 10000, &removed), 0); // not lost for long enough
    CU_ASSERT_EQUAL(removed, 0);
    registry_member_t *ms = NULL;
    int n = 0;
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 1);
    if (n == 1) CU_ASSERT_EQUAL(ms[0].state, REGISTRY_STATE_LOST);
    free(ms);
    usleep(250 * 1000);
    CU_ASSERT_EQUAL(registry_reap(r, 150, &removed), 0);
    CU_ASSERT_EQUAL(removed, 1);
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 0);
    free(ms);
    CU_ASSERT_EQUAL(registry_get(r, "mortal", &g), MLM_ENOTFOUND);
    registry_destroy(&r);
}

// Beats keep a member alive past its TTL; the state they carry is published and a change bumps
// the epoch (a plain beat does not); a member removed meanwhile comes back with its next beat.
static void check_beats(const char *url) {
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    const registry_member_t m = sample("beating", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7007");
    const int ttl = 400;
    CU_ASSERT_EQUAL_FATAL(registry_join(r, &m, ttl), 0);
    uint64_t e0 = 0, e1 = 0;
    CU_ASSERT_EQUAL(registry_epoch(r, &e0), 0);
    uint64_t last_seq = 1;
    bool alive = true, rising = true;
    for (int i = 0; i < 10; i++) { // 1 s, 2.5 TTLs
        usleep(100 * 1000);
        CU_ASSERT_EQUAL(registry_beat(r, "beating", REGISTRY_STATE_IDLE), 0);
        registry_member_t g;
        CU_ASSERT_EQUAL(registry_get(r, "beating", &g), 0);
        alive &= g.state == REGISTRY_STATE_IDLE && g.age_ms < ttl;
        rising &= g.seq == last_seq + 1;
        last_seq = g.seq;
    }
    CU_ASSERT(alive);
    CU_ASSERT(rising);
    CU_ASSERT_EQUAL(registry_epoch(r, &e1), 0);
    CU_ASSERT_EQUAL(e1, e0); // same-state beats do not wake watchers
    CU_ASSERT_EQUAL(registry_beat(r, "beating", REGISTRY_STATE_LOADING), 0);
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "beating", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_LOADING);
    CU_ASSERT_EQUAL(registry_epoch(r, &e1), 0);
    CU_ASSERT(e1 > e0);
    CU_ASSERT_EQUAL(registry_beat(r, "beating", REGISTRY_STATE_LOST), MLM_EINVAL);
    CU_ASSERT_EQUAL(registry_beat(r, "never-joined", REGISTRY_STATE_IDLE), MLM_ENOTFOUND);
    // Removed through another handle (as a reap of a frozen member would): the next beat restores it.
    registry_t *other = NULL;
    char err[256];
    CU_ASSERT_EQUAL_FATAL(registry_dup(r, &other, err, sizeof err), 0);
    CU_ASSERT_EQUAL(registry_leave(other, "beating"), 0);
    CU_ASSERT_EQUAL(registry_get(other, "beating", &g), MLM_ENOTFOUND);
    CU_ASSERT_EQUAL(registry_beat(r, "beating", REGISTRY_STATE_SERVING), 0);
    CU_ASSERT_EQUAL(registry_get(other, "beating", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_SERVING);
    CU_ASSERT(same_member(&m, &g));
    // A handle that did not join beats from the stored record.
    CU_ASSERT_EQUAL(registry_beat(other, "beating", REGISTRY_STATE_DRAINING), 0);
    CU_ASSERT_EQUAL(registry_get(r, "beating", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_DRAINING);
    CU_ASSERT(same_member(&m, &g));
    CU_ASSERT_EQUAL(registry_leave(r, "beating"), 0);
    registry_destroy(&other);
    registry_destroy(&r);
}

// Polls id until pred holds for it (or 3 s pass); the ms waited, or -1.
static double wait_for(registry_t *r, const char *id, bool (*pred)(const registry_member_t *)) {
    const double t0 = mlm_now_ms();
    while (mlm_now_ms() - t0 < 3000) {
        registry_member_t m;
        if (registry_get(r, id, &m) == 0 && pred(&m)) return mlm_now_ms() - t0;
        usleep(5000);
    }
    return -1;
}

static bool is_serving(const registry_member_t *m) { return m->state == REGISTRY_STATE_SERVING; }
static bool has_3g(const registry_member_t *m) { return m->prof.mem_budget == 3ull << 30; }

// The beater thread keeps a member alive, publishes state changes and record updates at once (well
// before its next period), and once stopped the member is lost after its TTL.
static void check_beater(const char *url) {
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    registry_member_t m = sample("beater", REGISTRY_ROLE_STANDBY, "tcp://127.0.0.1:7009");
    m.state = REGISTRY_STATE_STARTING;
    const int ttl = 900;
    CU_ASSERT_EQUAL_FATAL(registry_join(r, &m, ttl), 0);
    registry_beater_t *b = NULL;
    CU_ASSERT_EQUAL(registry_beater_start(&b, r, "nobody", 0), MLM_ENOTFOUND);
    CU_ASSERT_PTR_NULL(b);
    CU_ASSERT_EQUAL_FATAL(registry_beater_start(&b, r, "beater", 0), 0); // every ttl/3 = 300 ms
    usleep(2000 * 1000);
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "beater", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_STARTING);
    CU_ASSERT(g.age_ms < ttl);
    CU_ASSERT(g.seq >= 4); // about 6 beats in 2 s
    usleep(20 * 1000);
    registry_beater_set_state(b, REGISTRY_STATE_SERVING);
    const double state_ms = wait_for(r, "beater", is_serving);
    CU_ASSERT(state_ms >= 0 && state_ms < 250);
    m.prof.mem_budget = 3ull << 30;
    m.state = REGISTRY_STATE_IDLE;
    m.ttl_ms = 0;
    CU_ASSERT_EQUAL(registry_beater_update(b, &m), 0);
    registry_member_t other = sample("someone-else", REGISTRY_ROLE_WORKER, "");
    CU_ASSERT_EQUAL(registry_beater_update(b, &other), MLM_EINVAL);
    const double update_ms = wait_for(r, "beater", has_3g);
    CU_ASSERT(update_ms >= 0 && update_ms < 250);
    CU_ASSERT_EQUAL(registry_get(r, "beater", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_IDLE);
    CU_ASSERT_EQUAL(g.ttl_ms, ttl);
    CU_ASSERT_EQUAL(g.role, REGISTRY_ROLE_STANDBY);
    uint64_t beats = 0, failures = 1;
    char last[256] = "x";
    registry_beater_stats(b, &beats, &failures, last, sizeof last);
    CU_ASSERT(beats >= 5);
    CU_ASSERT_EQUAL(failures, 0);
    CU_ASSERT_STRING_EQUAL(last, "");
    registry_beater_stop(&b);
    CU_ASSERT_PTR_NULL(b);
    registry_beater_stop(&b); // idempotent
    const double waited = wait_lost(r, "beater", 3000);
    CU_ASSERT(waited >= 0 && waited <= ttl + 400);
    CU_ASSERT_EQUAL(registry_leave(r, "beater"), 0);
    registry_destroy(&r);
}

// An id held by a live member at another endpoint cannot be taken; the same endpoint may rejoin
// (a restart), and once the holder is lost anyone may take the id.
static void check_join_conflict(const char *url) {
    registry_t *r1 = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r1);
    registry_t *r2 = NULL;
    char err[256];
    CU_ASSERT_EQUAL_FATAL(registry_dup(r1, &r2, err, sizeof err), 0);
    const registry_member_t a = sample("twin", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7011");
    const registry_member_t b = sample("twin", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7013");
    CU_ASSERT_EQUAL_FATAL(registry_join(r1, &a, 300), 0);
    CU_ASSERT_EQUAL(registry_join(r2, &b, 300), MLM_ESTATE);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r2), "tcp://127.0.0.1:7011"));
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r2, "twin", &g), 0);
    CU_ASSERT_STRING_EQUAL(g.endpoint, "tcp://127.0.0.1:7011");
    CU_ASSERT_EQUAL(registry_join(r2, &a, 300), 0); // the same endpoint: a restart
    CU_ASSERT_EQUAL(registry_get(r2, "twin", &g), 0);
    CU_ASSERT_EQUAL(g.seq, 2); // the count carries on
    CU_ASSERT(wait_lost(r2, "twin", 3000) >= 0);
    CU_ASSERT_EQUAL(registry_join(r2, &b, 300), 0);
    CU_ASSERT_EQUAL(registry_get(r1, "twin", &g), 0);
    CU_ASSERT_STRING_EQUAL(g.endpoint, "tcp://127.0.0.1:7013");
    CU_ASSERT_EQUAL(registry_leave(r1, "twin"), 0);
    registry_destroy(&r2);
    registry_destroy(&r1);
}

typedef struct {
    registry_t *r;      // a second handle (owned by the caller)
    int delay_ms;
    int rc;
} late_join_t;

static void *late_join(void *arg) {
    late_join_t *j = arg;
    usleep((useconds_t)j->delay_ms * 1000);
    const registry_member_t m = sample("latecomer", REGISTRY_ROLE_STANDBY, "tcp://127.0.0.1:7015");
    j->rc = registry_join(j->r, &m, 5000);
    return NULL;
}

// The plan round-trips; the epoch moves with plans and joins; a watch returns when another handle
// joins and times out (by its deadline) when nothing happens.
static void check_plan_epoch_watch(const char *url) {
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    char *text = NULL;
    CU_ASSERT_EQUAL(registry_get_plan(r, &text), MLM_ENOTFOUND);
    CU_ASSERT_PTR_NULL(text);
    uint64_t e0 = 99, e1 = 0;
    CU_ASSERT_EQUAL(registry_epoch(r, &e0), 0);
    const char *plan = "# meshlm plan v1\nnode w1 layers 0-4 heads 0-8\nnode w2 layers 4-8 heads 0-8\n";
    CU_ASSERT_EQUAL(registry_publish_plan(r, plan), 0);
    CU_ASSERT_EQUAL_FATAL(registry_get_plan(r, &text), 0);
    CU_ASSERT_STRING_EQUAL(text, plan);
    free(text);
    CU_ASSERT_EQUAL(registry_epoch(r, &e1), 0);
    CU_ASSERT(e1 > e0);
    // Nothing changes: the watch ends at its deadline.
    uint64_t seen = e1;
    double t0 = mlm_now_ms();
    CU_ASSERT_EQUAL(registry_watch(r, &seen, 200), MLM_ETIMEOUT);
    const double idle_ms = mlm_now_ms() - t0;
    CU_ASSERT(idle_ms >= 195 && idle_ms < 700);
    CU_ASSERT_EQUAL(seen, e1);
    // Another handle joins after 100 ms: the watch returns then, with the new epoch.
    late_join_t j = {NULL, 100, -1};
    char err[256];
    CU_ASSERT_EQUAL_FATAL(registry_dup(r, &j.r, err, sizeof err), 0);
    pthread_t th;
    CU_ASSERT_EQUAL_FATAL(pthread_create(&th, NULL, late_join, &j), 0);
    t0 = mlm_now_ms();
    CU_ASSERT_EQUAL(registry_watch(r, &seen, 3000), 0);
    const double woke_ms = mlm_now_ms() - t0;
    pthread_join(th, NULL);
    CU_ASSERT_EQUAL(j.rc, 0);
    CU_ASSERT(woke_ms >= 90 && woke_ms < 1500);
    CU_ASSERT(seen > e1);
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "latecomer", &g), 0);
    CU_ASSERT_EQUAL(g.role, REGISTRY_ROLE_STANDBY);
    CU_ASSERT_EQUAL(registry_leave(r, "latecomer"), 0);
    CU_ASSERT_EQUAL(registry_publish_plan(r, ""), 0); // an empty plan is a plan
    CU_ASSERT_EQUAL(registry_get_plan(r, &text), 0);
    CU_ASSERT_STRING_EQUAL(text ? text : "x", "");
    free(text);
    registry_destroy(&j.r);
    registry_destroy(&r);
}

// Arguments a backend never sees: bad ids, a member joining as lost, an id too long.
static void check_invalid(const char *url) {
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    registry_member_t m = sample("", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7017");
    CU_ASSERT_EQUAL(registry_join(r, &m, 1000), MLM_EINVAL);
    snprintf(m.id, sizeof m.id, "two words");
    CU_ASSERT_EQUAL(registry_join(r, &m, 1000), MLM_EINVAL);
    snprintf(m.id, sizeof m.id, "ok");
    m.state = REGISTRY_STATE_LOST;
    CU_ASSERT_EQUAL(registry_join(r, &m, 1000), MLM_EINVAL);
    m.state = REGISTRY_STATE_IDLE;
    m.role = REGISTRY_ROLE_COUNT;
    CU_ASSERT_EQUAL(registry_join(r, &m, 1000), MLM_EINVAL);
    m.role = REGISTRY_ROLE_WORKER;
    snprintf(m.endpoint, sizeof m.endpoint, "tcp://host with space:1");
    CU_ASSERT_EQUAL(registry_join(r, &m, 1000), MLM_EINVAL);
    snprintf(m.endpoint, sizeof m.endpoint, "tcp://127.0.0.1:7017");
    m.prof.speed[1].type = QT_Q4_0; // the same type twice
    CU_ASSERT_EQUAL(registry_join(r, &m, 1000), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), "twice"));
    CU_ASSERT_EQUAL(registry_get(r, "ok", &m), MLM_ENOTFOUND); // nothing was written
    CU_ASSERT_EQUAL(registry_publish_plan(r, NULL), MLM_EINVAL);
    registry_destroy(&r);
}

static void test_join_list_leave(void) { both(check_join_list_leave, "join"); }
static void test_ttl_expiry_and_reap(void) { both(check_ttl_expiry_and_reap, "ttl"); }
static void test_beats(void) { both(check_beats, "beats"); }
static void test_beater(void) { both(check_beater, "beater"); }
static void test_join_conflict(void) { both(check_join_conflict, "conflict"); }
static void test_plan_epoch_watch(void) { both(check_plan_epoch_watch, "plan"); }
static void test_invalid(void) { both(check_invalid, "invalid"); }

// --- records

// Records round-trip through their JSON; every malformed text is refused with a reason.
static void test_record_format(void) {
    registry_member_t m = sample("node-1", REGISTRY_ROLE_COORDINATOR, "tcp://[::1]:5000");
    m.seq = 123456789;
    m.beat_unix_ms = 1700000000123LL;
    m.joined_unix_ms = 1700000000000LL;
    m.ttl_ms = 3000;
    m.state = REGISTRY_STATE_SERVING;
    char *text = NULL;
    CU_ASSERT_EQUAL_FATAL(registry_record_format(&m, false, &text), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"v\":1"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"Q4_0\":12.5"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"sha256\":\"01080f16"));
    CU_ASSERT_PTR_NULL(strstr(text, "age_ms"));
    registry_member_t back;
    char err[256] = "";
    CU_ASSERT_EQUAL_FATAL(registry_record_parse(text, strlen(text), &back, err, sizeof err), 0);
    CU_ASSERT(same_member(&m, &back));
    CU_ASSERT_EQUAL(back.seq, 123456789);
    CU_ASSERT_EQUAL(back.beat_unix_ms, 1700000000123LL);
    CU_ASSERT_EQUAL(back.joined_unix_ms, 1700000000000LL);
    CU_ASSERT_EQUAL(back.ttl_ms, 3000);
    CU_ASSERT_EQUAL(back.state, REGISTRY_STATE_SERVING);
    CU_ASSERT_EQUAL(back.role, REGISTRY_ROLE_COORDINATOR);
    free(text);
    m.age_ms = 77;
    CU_ASSERT_EQUAL_FATAL(registry_record_format(&m, true, &text), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\"age_ms\":77"));
    CU_ASSERT_EQUAL(registry_record_parse(text, strlen(text), &back, err, sizeof err), 0); // ignored
    free(text);
    // A later version with fields and a weight type this one does not know still reads.
    const char *later =
        "{\"v\":2,\"id\":\"n\",\"role\":\"worker\",\"endpoint\":\"\",\"state\":\"idle\",\"seq\":1,\"beat_ms\":5,"
        "\"joined_ms\":5,\"ttl_ms\":10,\"new_field\":[1,2],\"profile\":{\"cores\":1,\"mem_budget\":0,\"mem_bw\":0,"
        "\"disk_bw\":0,\"gflops\":{\"Q9_9\":1,\"q8_0\":2.5},\"model\":null,\"npu\":true}}";
    CU_ASSERT_EQUAL(registry_record_parse(later, strlen(later), &back, err, sizeof err), 0);
    CU_ASSERT_EQUAL(back.prof.n_speeds, 1);
    CU_ASSERT_EQUAL(back.prof.speed[0].type, QT_Q8_0);
    CU_ASSERT_EQUAL(back.pid, 0);
    CU_ASSERT_STRING_EQUAL(back.host, "");
    // Refusals: a valid record with one edit each, and some that are not records at all.
    static const char base[] =
        "{\"v\":1,\"id\":\"n\",\"role\":\"worker\",\"endpoint\":\"\",\"state\":\"idle\",\"seq\":1,\"beat_ms\":5,"
        "\"joined_ms\":5,\"ttl_ms\":10,\"profile\":{\"cores\":1,\"mem_budget\":0,\"mem_bw\":0,\"disk_bw\":0,"
        "\"gflops\":{}}}";
    CU_ASSERT_EQUAL(registry_record_parse(base, strlen(base), &back, err, sizeof err), 0); // the edits' base is valid
    static const char *const edits[][2] = {
        {"\"v\":1", "\"v\":0"},
        {"\"v\":1,", ""},
        {"\"id\":\"n\"", "\"id\":\"a b\""},
        {"\"id\":\"n\"", "\"id\":\"\""},
        {"\"id\":\"n\"", "\"id\":7"},
        {"\"role\":\"worker\"", "\"role\":\"boss\""},
        {"\"state\":\"idle\"", "\"state\":\"asleep\""},
        {"\"endpoint\":\"\"", "\"endpoint\":\"tab\\there\""},
        {"\"seq\":1", "\"seq\":-1"},
        {"\"seq\":1", "\"seq\":1.5"},
        {"\"seq\":1", "\"seq\":\"1\""},
        {"\"seq\":1", "\"seq\":9007199254740994"},
        {"\"ttl_ms\":10", "\"ttl_ms\":0"},
        {"\"ttl_ms\":10", "\"ttl_ms\":86400001"},
        {"\"mem_budget\":0", "\"mem_budget\":1e300"},
        {"\"gflops\":{}", "\"gflops\":{\"Q4_0\":\"fast\"}"},
        {"\"gflops\":{}", "\"gflops\":{\"Q4_0\":-1}"},
        {"\"gflops\":{}", "\"gflops\":{\"Q4_0\":1,\"q4_0\":2}"},
        {"\"gflops\":{}", "\"gflops\":[]"},
        {"\"gflops\":{}", "\"gflops\":{},\"model\":{\"sha256\":\"xyz\",\"size\":1}"},
        {"\"gflops\":{}", "\"gflops\":{},\"model\":{\"sha256\":\"0g"
                         "00000000000000000000000000000000000000000000000000000000000000\",\"size\":1}"},
        {"\"gflops\":{}", "\"gflops\":{},\"model\":7"},
        {",\"profile\":{\"cores\":1,", ",\"x\":{\"cores\":1,"},
        {"{\"v\":1", "[{\"v\":1"},
    };
    char edited[1024];
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        const char *at = strstr(base, edits[i][0]);
        CU_ASSERT_PTR_NOT_NULL_FATAL(at);
        snprintf(edited, sizeof edited, "%.*s%s%s", (int)(at - base), base, edits[i][1], at + strlen(edits[i][0]));
        err[0] = 0;
        const int rc = registry_record_parse(edited, strlen(edited), &back, err, sizeof err);
        CU_ASSERT_EQUAL(rc, MLM_EFORMAT);
        CU_ASSERT(err[0] != 0);
        if (rc != MLM_EFORMAT) fprintf(stderr, "\naccepted a bad record: %s\n", edited);
    }
    static const char *const junk[] = {"", "{", "[1,2]", "{\"v\":1}", "null", "\"record\""};
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++) {
        err[0] = 0;
        CU_ASSERT_EQUAL(registry_record_parse(junk[i], strlen(junk[i]), &back, err, sizeof err), MLM_EFORMAT);
        CU_ASSERT(err[0] != 0);
    }
    // Too long, and not NUL-terminated: the parser reads len bytes only.
    char *big = malloc(REGISTRY_RECORD_MAX + 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(big);
    memset(big, ' ', REGISTRY_RECORD_MAX + 2);
    CU_ASSERT_EQUAL(registry_record_parse(big, REGISTRY_RECORD_MAX + 1, &back, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bytes"));
    free(big);
    // Names both ways.
    for (int s = 0; s < REGISTRY_STATE_COUNT; s++)
        CU_ASSERT_EQUAL(registry_state_from_name(registry_state_name((registry_state_t)s)), s);
    for (int r = 0; r < REGISTRY_ROLE_COUNT; r++)
        CU_ASSERT_EQUAL(registry_role_from_name(registry_role_name((registry_role_t)r)), r);
    CU_ASSERT_STRING_EQUAL(registry_state_name(REGISTRY_STATE_LOST), "lost");
    CU_ASSERT_STRING_EQUAL(registry_role_name(REGISTRY_ROLE_STANDBY), "standby");
    CU_ASSERT_EQUAL(registry_role_from_name("boss"), -1);
    // HELLO figures both ways.
    msg_hello_t h;
    memset(&h, 0, sizeof h);
    registry_profile_to_hello(&m.prof, &h);
    CU_ASSERT_EQUAL(h.n_cores, 4);
    CU_ASSERT_EQUAL(h.n_speeds, 2);
    CU_ASSERT_EQUAL(h.speeds[0].type, QT_Q4_0);
    CU_ASSERT_EQUAL(h.ram_budget_bytes, 2ull << 30);
    CU_ASSERT(h.has_model && h.model_size == 1185376 && h.model_sha256[1] == 8);
    registry_profile_t p2;
    registry_profile_from_hello(&p2, &h);
    CU_ASSERT_EQUAL(p2.mem_bw, m.prof.mem_bw);
    CU_ASSERT_EQUAL(p2.speed[0].gflops, 12.5); // exact in float
    CU_ASSERT(!memcmp(p2.model_sha256, m.prof.model_sha256, 32));
}

// Opening: URLs that are refused, and the password hidden in what is shown.
static void test_open_urls(void) {
    registry_t *r = NULL;
    char err[512];
    const char *bad[] = {"http://127.0.0.1:6379", "redis://", "redis://127.0.0.1:0", "redis://127.0.0.1:99999",
                         "redis://127.0.0.1:6379/x", "redis://127.0.0.1:6379?prefix=",
                         "redis://127.0.0.1:6379?timeout=0",
                         "redis://127.0.0.1:6379?color=red", "redis://[::1:6379"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        CU_ASSERT_EQUAL(registry_open(&r, bad[i], err, sizeof err), MLM_EINVAL);
        CU_ASSERT_PTR_NULL(r);
        CU_ASSERT(err[0] != 0);
    }
    CU_ASSERT_EQUAL(registry_open(&r, NULL, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(registry_name(r), "mem");
    char addr[64];
    CU_ASSERT_EQUAL(registry_local_addr(r, addr, sizeof addr), 0);
    CU_ASSERT_STRING_EQUAL(addr, "127.0.0.1");
    registry_destroy(&r);
    if (!have_redis()) return;
    // A refused login names the URL without the password.
    char url[256];
    snprintf(url, sizeof url, "redis://user:s3cret@127.0.0.1:%d/0?prefix=%s-auth&timeout=1000", srv.port, srv.prefix);
    err[0] = 0;
    const int rc = registry_open(&r, url, err, sizeof err);
    CU_ASSERT_EQUAL(rc, MLM_EIO);
    CU_ASSERT_PTR_NULL(strstr(err, "s3cret"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "***@127.0.0.1"));
    registry_destroy(&r);
    redis_url(url, sizeof url, "open", 1000);
    CU_ASSERT_EQUAL_FATAL(registry_open(&r, url, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(registry_name(r), "redis");
    CU_ASSERT_STRING_EQUAL(registry_url(r), url);
    CU_ASSERT_EQUAL(registry_local_addr(r, addr, sizeof addr), 0);
    CU_ASSERT_STRING_EQUAL(addr, "127.0.0.1");
    registry_destroy(&r);
}

// --- Redis alone

// A process that joined and beats is killed with SIGKILL: it is seen as lost after its TTL, and reaped.
static void test_killed_beater_process(void) {
    if (!have_redis()) return;
    char url[256];
    redis_url(url, sizeof url, "killed", 1000);
    const int ttl = 500;
    int ready[2];
    CU_ASSERT_EQUAL_FATAL(pipe(ready), 0);
    const pid_t pid = fork();
    if (pid == 0) {
        close(ready[0]);
        registry_t *r = NULL;
        char err[256];
        registry_beater_t *b = NULL;
        const registry_member_t m = sample("victim", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7021");
        if (registry_open(&r, url, err, sizeof err) != 0 || registry_join(r, &m, ttl) != 0 ||
            registry_beater_start(&b, r, "victim", 0) != 0)
            _exit(3);
        const char c = 1;
        if (write(ready[1], &c, 1) != 1) _exit(4);
        for (;;) pause();
    }
    CU_ASSERT_FATAL(pid > 0);
    close(ready[1]);
    char c = 0;
    CU_ASSERT_EQUAL(read(ready[0], &c, 1), 1);
    close(ready[0]);
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    usleep(3 * ttl * 1000); // beats from the other process keep it alive past 3 TTLs
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "victim", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_IDLE);
    CU_ASSERT(g.seq >= 6);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    const double waited = wait_lost(r, "victim", 3000);
    CU_ASSERT(waited >= 0 && waited <= ttl + 400);
    if (waited < 0 || waited > ttl + 400) fprintf(stderr, "\nlost after %.0f ms (ttl %d)\n", waited, ttl);
    usleep(150 * 1000);
    int removed = 0;
    CU_ASSERT_EQUAL(registry_reap(r, 100, &removed), 0);
    CU_ASSERT_EQUAL(removed, 1);
    CU_ASSERT_EQUAL(registry_get(r, "victim", &g), MLM_ENOTFOUND);
    registry_destroy(&r);
}

static bool raw_cmd(redisContext *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    const bool ok = rep && rep->type != REDIS_REPLY_ERROR;
    if (rep) freeReplyObject(rep);
    return ok;
}

// Someone else writes the keys: malformed records are skipped (with one warning), never a crash;
// an index entry without a record is cleaned; an index or epoch of the wrong type is an error.
static void test_malformed_records(void) {
    if (!have_redis()) return;
    char url[256], pre[128];
    redis_url(url, sizeof url, "malformed", 1000);
    snprintf(pre, sizeof pre, "%s-malformed", srv.prefix);
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    const registry_member_t good = sample("good", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7023");
    CU_ASSERT_EQUAL_FATAL(registry_join(r, &good, 5000), 0);
    const struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", srv.port, tv);
    CU_ASSERT_FATAL(c && !c->err);
    char *valid = NULL;
    registry_member_t other = sample("other", REGISTRY_ROLE_WORKER, "");
    other.ttl_ms = 1000;
    CU_ASSERT_EQUAL_FATAL(registry_record_format(&other, false, &valid), 0);
    char *big = malloc(REGISTRY_RECORD_MAX + 100);
    CU_ASSERT_PTR_NOT_NULL_FATAL(big);
    memset(big, '{', REGISTRY_RECORD_MAX + 99);
    big[REGISTRY_RECORD_MAX + 99] = 0;
    CU_ASSERT(raw_cmd(c, "SET %s:node:bad1 %s", pre, "{not json"));
    CU_ASSERT(raw_cmd(c, "SET %s:node:bad2 %s", pre, valid)); // names "other"
    CU_ASSERT(raw_cmd(c, "SET %s:node:bad3 %s", pre, big));
    CU_ASSERT(raw_cmd(c, "HSET %s:node:bad4 id bad4", pre));
    CU_ASSERT(raw_cmd(c, "SET %s:node:bad5 %b", pre, "{\"v\":1,\0}", (size_t)9));
    CU_ASSERT(raw_cmd(c, "SADD %s:members bad1 bad2 bad3 bad4 bad5 ghost", pre));
    CU_ASSERT(raw_cmd(c, "SADD %s:members %s", pre, "two words"));
    free(big);
    free(valid);
    registry_member_t *ms = NULL;
    int n = 0;
    CU_ASSERT_EQUAL_FATAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 1);
    if (n == 1) CU_ASSERT_STRING_EQUAL(ms[0].id, "good");
    CU_ASSERT_EQUAL(registry_skipped(r), 6);
    free(ms);
    redisReply *rep = redisCommand(c, "SISMEMBER %s:members ghost", pre); // the stale entry is gone
    CU_ASSERT(rep && rep->type == REDIS_REPLY_INTEGER && rep->integer == 0);
    if (rep) freeReplyObject(rep);
    registry_member_t g;
    CU_ASSERT_EQUAL(registry_get(r, "bad1", &g), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), "bad1"));
    CU_ASSERT_EQUAL(registry_get(r, "bad2", &g), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), "other"));
    // A member may take over an id whose record is malformed.
    const registry_member_t fix = sample("bad1", REGISTRY_ROLE_STANDBY, "tcp://127.0.0.1:7025");
    CU_ASSERT_EQUAL(registry_join(r, &fix, 5000), 0);
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 2);
    CU_ASSERT_EQUAL(registry_skipped(r), 5);
    free(ms);
    // Keys of the wrong type: a clear error, no crash.
    CU_ASSERT(raw_cmd(c, "SET %s:epoch notanumber", pre));
    uint64_t e = 0;
    CU_ASSERT_EQUAL(registry_epoch(r, &e), MLM_EFORMAT);
    CU_ASSERT(raw_cmd(c, "DEL %s:members", pre));
    CU_ASSERT(raw_cmd(c, "SET %s:members x", pre));
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), "WRONGTYPE"));
    CU_ASSERT_PTR_NULL(ms);
    CU_ASSERT(raw_cmd(c, "SET %s:plan %b", pre, "a\0b", (size_t)3));
    char *plan = NULL;
    CU_ASSERT_EQUAL(registry_get_plan(r, &plan), MLM_EFORMAT);
    CU_ASSERT_PTR_NULL(plan);
    redisFree(c);
    registry_destroy(&r);
}

// A server socket that accepts and never answers.
static int mute_listener(int *port) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    socklen_t al = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 8) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &al) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

// The server freezes, dies, comes back: every call ends by its deadline with an error naming the
// URL, and the handle works again once a server answers.
static void test_redis_goes_away(void) {
    if (!have_redis()) return;
    int port = 0;
    pid_t pid = redis_start_free(&port);
    CU_ASSERT_FATAL(pid > 0);
    char url[256];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d?prefix=%s-away&timeout=300", port, srv.prefix);
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    const registry_member_t m = sample("w", REGISTRY_ROLE_WORKER, "tcp://127.0.0.1:7027");
    CU_ASSERT_EQUAL(registry_join(r, &m, 5000), 0);
    registry_member_t *ms = NULL;
    int n = 0;
    // Frozen: the call times out by the deadline.
    kill(pid, SIGSTOP);
    double t0 = mlm_now_ms();
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), MLM_ETIMEOUT);
    double ms_taken = mlm_now_ms() - t0;
    CU_ASSERT(ms_taken >= 250 && ms_taken < 1000);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), url));
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), "300 ms"));
    t0 = mlm_now_ms();
    // A new connection: the frozen server's kernel accepts it, the reply never comes.
    CU_ASSERT_EQUAL(registry_beat(r, "w", REGISTRY_STATE_IDLE), MLM_ETIMEOUT);
    CU_ASSERT(mlm_now_ms() - t0 < 1000);
    kill(pid, SIGCONT);
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0); // connects again
    CU_ASSERT_EQUAL(n, 1);
    free(ms);
    // Dead: refused at once, naming the URL.
    redis_stop(pid);
    t0 = mlm_now_ms();
    const int rc = registry_list(r, &ms, &n);
    CU_ASSERT(rc == MLM_EPEER);
    CU_ASSERT(mlm_now_ms() - t0 < 1000);
    CU_ASSERT_PTR_NOT_NULL(strstr(registry_error(r), url));
    CU_ASSERT_EQUAL(registry_beat(r, "w", REGISTRY_STATE_IDLE), MLM_EPEER);
    registry_t *r2 = NULL;
    char err[512] = "";
    CU_ASSERT_EQUAL(registry_open(&r2, url, err, sizeof err), MLM_EPEER);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, url));
    CU_ASSERT_PTR_NULL(r2);
    // Back (empty: no persistence): the handle connects again, and the next beat publishes the member again.
    pid = redis_start(port);
    CU_ASSERT_FATAL(pid > 0);
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 0);
    free(ms);
    CU_ASSERT_EQUAL(registry_beat(r, "w", REGISTRY_STATE_SERVING), 0);
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), 0);
    CU_ASSERT_EQUAL(n, 1);
    if (n == 1) CU_ASSERT_EQUAL(ms[0].state, REGISTRY_STATE_SERVING);
    free(ms);
    registry_destroy(&r);
    redis_stop(pid);
    // Something that accepts connections and never answers: the first call ends by the deadline.
    int mport = 0;
    const int mfd = mute_listener(&mport);
    CU_ASSERT_FATAL(mfd >= 0);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d?timeout=200", mport);
    CU_ASSERT_EQUAL_FATAL(registry_open(&r, url, err, sizeof err), 0); // nothing to say at connect
    t0 = mlm_now_ms();
    CU_ASSERT_EQUAL(registry_list(r, &ms, &n), MLM_ETIMEOUT);
    ms_taken = mlm_now_ms() - t0;
    CU_ASSERT(ms_taken >= 150 && ms_taken < 1000);
    registry_destroy(&r);
    snprintf(url, sizeof url, "redis://:pw@127.0.0.1:%d?timeout=200", mport);
    t0 = mlm_now_ms();
    CU_ASSERT_EQUAL(registry_open(&r, url, err, sizeof err), MLM_ETIMEOUT); // AUTH is never answered
    CU_ASSERT(mlm_now_ms() - t0 < 1000);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "redis://:***@127.0.0.1"));
    close(mfd);
}

// --- the command line

typedef struct {
    int status;     // exit code, or 128 + signal
    char *out;      // stdout (owned)
    char *err;      // stderr (owned)
} prog_t;

// Runs meshlm with args (NULL-terminated, args[0] = "meshlm"), capturing its output. 0 or -1.
static int run_meshlm(prog_t *p, const char *const *args) {
    memset(p, 0, sizeof *p);
    const char *bin = test_meshlm_bin();
    char *dir = test_tmpdir();
    if (!bin || !dir) {
        free(dir);
        return -1;
    }
    char out_path[512], err_path[512];
    snprintf(out_path, sizeof out_path, "%s/out", dir);
    snprintf(err_path, sizeof err_path, "%s/err", dir);
    const pid_t pid = fork();
    if (pid == 0) {
        const int fo = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        const int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        execv(bin, (char *const *)args);
        _exit(127);
    }
    int st = 0;
    const int64_t dl = mlm_deadline(30000);
    int rc = pid > 0 ? 0 : -1;
    while (pid > 0) {
        const pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) break;
        if (w < 0 || mlm_passed(dl)) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            rc = -1;
            break;
        }
        usleep(5000);
    }
    p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    size_t len;
    p->out = test_read_file(out_path, &len);
    p->err = test_read_file(err_path, &len);
    if (!p->out || !p->err) rc = -1;
    test_rm_dir(dir);
    return rc;
}

static void prog_free(prog_t *p) {
    free(p->out);
    free(p->err);
}

// `meshlm worker --registry URL --standby` joins as a standby with its endpoint, beats, and is lost
// once killed; `meshlm nodes` lists it (table and JSON) and reaps it; bad registries are refused.
static void test_cli_worker_and_nodes(void) {
    if (!have_redis()) return;
    const char *bin = test_meshlm_bin();
    if (!bin) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return;
    }
    char url[256], ep[600];
    redis_url(url, sizeof url, "cli", 2000);
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    snprintf(ep, sizeof ep, "ipc://%s/w", dir);
    const pid_t pid = fork();
    if (pid == 0) {
        const int null = open("/dev/null", O_RDWR);
        if (null >= 0) dup2(null, 1);
        execl(bin, "meshlm", "worker", "--listen", ep, "--registry", url, "--standby", "--no-profile", "--name",
              "spare-1", "--registry-ttl", "600", "--mem-budget", "1G", (char *)NULL);
        _exit(127);
    }
    CU_ASSERT_FATAL(pid > 0);
    registry_t *r = open_ok(url);
    CU_ASSERT_PTR_NOT_NULL_FATAL(r);
    registry_member_t g;
    memset(&g, 0, sizeof g);
    const int64_t dl = mlm_deadline(10000);
    while (!mlm_passed(dl) && !(registry_get(r, "spare-1", &g) == 0 && g.state == REGISTRY_STATE_IDLE)) usleep(20000);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_IDLE);
    CU_ASSERT_EQUAL(g.role, REGISTRY_ROLE_STANDBY);
    CU_ASSERT_STRING_EQUAL(g.endpoint, ep);
    CU_ASSERT_EQUAL(g.pid, pid);
    CU_ASSERT_EQUAL(g.ttl_ms, 600);
    CU_ASSERT_EQUAL(g.prof.mem_budget, 1ull << 30);
    CU_ASSERT(g.prof.n_cores >= 1);
    CU_ASSERT(!g.prof.has_model);
    usleep(800 * 1000); // beats keep it alive past its TTL
    CU_ASSERT_EQUAL(registry_get(r, "spare-1", &g), 0);
    CU_ASSERT_EQUAL(g.state, REGISTRY_STATE_IDLE);
    // meshlm nodes: the table and the JSON
    prog_t p;
    const char *const table_args[] = {"meshlm", "nodes", "--registry", url, NULL};
    CU_ASSERT_EQUAL(run_meshlm(&p, table_args), 0);
    CU_ASSERT_EQUAL(p.status, 0);
    CU_ASSERT_PTR_NOT_NULL(p.out && strstr(p.out, "spare-1") ? p.out : NULL);
    CU_ASSERT_PTR_NOT_NULL(p.out ? strstr(p.out, "standby") : NULL);
    CU_ASSERT_PTR_NOT_NULL(p.out ? strstr(p.out, "budget 1.0G") : NULL);
    prog_free(&p);
    const char *const json_args[] = {"meshlm", "nodes", "--registry", url, "--json", NULL};
    CU_ASSERT_EQUAL(run_meshlm(&p, json_args), 0);
    CU_ASSERT_EQUAL(p.status, 0);
    cJSON *doc = p.out ? cJSON_Parse(p.out) : NULL;
    CU_ASSERT_PTR_NOT_NULL(doc);
    const cJSON *mem = cJSON_GetObjectItemCaseSensitive(doc, "members");
    CU_ASSERT_EQUAL(cJSON_GetArraySize(mem), 1);
    const cJSON *m0 = cJSON_GetArrayItem(mem, 0);
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m0, "role")), "standby");
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m0, "state")), "idle");
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m0, "endpoint")), ep);
    CU_ASSERT(cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(m0, "age_ms")) < 600);
    CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(doc, "plan")));
    cJSON_Delete(doc);
    prog_free(&p);
    // Killed: lost after its TTL, then reaped by `meshlm nodes --reap`.
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    const double waited = wait_lost(r, "spare-1", 3000);
    CU_ASSERT(waited >= 0 && waited <= 600 + 400);
    usleep(100 * 1000);
    const char *const reap_args[] = {"meshlm", "nodes", "--registry", url, "--reap", "50", NULL};
    CU_ASSERT_EQUAL(run_meshlm(&p, reap_args), 0);
    CU_ASSERT_EQUAL(p.status, 0);
    CU_ASSERT_PTR_NOT_NULL(p.out ? strstr(p.out, "reaped 1 member") : NULL);
    CU_ASSERT_PTR_NOT_NULL(p.out ? strstr(p.out, "no members") : NULL);
    prog_free(&p);
    CU_ASSERT_EQUAL(registry_get(r, "spare-1", &g), MLM_ENOTFOUND);
    registry_destroy(&r);
    // Refusals: a registry nobody answers at (named), --standby without --registry, no URL at all.
    int dead_port = 0;
    const int fd = mute_listener(&dead_port); // a port that was just free: closed at once, nobody listens
    if (fd >= 0) close(fd);
    char dead[128];
    snprintf(dead, sizeof dead, "redis://127.0.0.1:%d?timeout=500", dead_port);
    const char *const dead_args[] = {"meshlm", "worker", "--listen", ep, "--registry", dead, "--no-profile", NULL};
    CU_ASSERT_EQUAL(run_meshlm(&p, dead_args), 0);
    CU_ASSERT_EQUAL(p.status, 1);
    CU_ASSERT_PTR_NOT_NULL(p.err ? strstr(p.err, dead) : NULL);
    prog_free(&p);
    const char *const nodes_dead[] = {"meshlm", "nodes", "--registry", dead, NULL};
    CU_ASSERT_EQUAL(run_meshlm(&p, nodes_dead), 0);
    CU_ASSERT_EQUAL(p.status, 1);
    CU_ASSERT_PTR_NOT_NULL(p.err ? strstr(p.err, dead) : NULL);
    prog_free(&p);
    const char *const no_reg[] = {"meshlm", "worker", "--listen", ep, "--standby", NULL};
    CU_ASSERT_EQUAL(run_meshlm(&p, no_reg), 0);
    CU_ASSERT_EQUAL(p.status, 2);
    prog_free(&p);
    test_rm_dir(dir);
}

int test_registry_suite(void) {
    CU_pSuite s = CU_add_suite("registry", suite_init, suite_clean);
    if (!s) return -1;
    if (!CU_add_test(s, "records: JSON round trip, refusals, names, HELLO figures", test_record_format) ||
        !CU_add_test(s, "open: bad URLs, hidden password, local address", test_open_urls) ||
        !CU_add_test(s, "join, list, get, leave (mem, redis)", test_join_list_leave) ||
        !CU_add_test(s, "heartbeat TTL expiry makes a member lost; reap (mem, redis)", test_ttl_expiry_and_reap) ||
        !CU_add_test(s, "beats keep a member alive and carry its state (mem, redis)", test_beats) ||
        !CU_add_test(s, "the beater thread (mem, redis)", test_beater) ||
        !CU_add_test(s, "a live member's id cannot be taken (mem, redis)", test_join_conflict) ||
        !CU_add_test(s, "plan, epoch and watch (mem, redis)", test_plan_epoch_watch) ||
        !CU_add_test(s, "invalid members are refused (mem, redis)", test_invalid) ||
        !CU_add_test(s, "a killed beater process is lost after its TTL (redis)", test_killed_beater_process) ||
        !CU_add_test(s, "malformed records are skipped (redis)", test_malformed_records) ||
        !CU_add_test(s, "a Redis that freezes or dies: errors by the deadline (redis)", test_redis_goes_away) ||
        !CU_add_test(s, "meshlm worker --registry --standby and meshlm nodes (redis)", test_cli_worker_and_nodes))
        return -1;
    return 0;
}
