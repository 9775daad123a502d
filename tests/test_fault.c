// CUnit suite "fault": fault specs (parse, canonical text, errors, decisions, schedules, the board, partitions, nodes) and the fault-injecting comm wrapper and control link over inproc and ZeroMQ.
#include <CUnit/CUnit.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"
#include "transport/comm.h"
#include "transport/comm_inproc.h"
#include "transport/comm_zmq.h"
#include "transport/fault.h"
#include "core/err.h"

#define MAXN 4
#define EP_LEN 192
#define SLACK_MS 400.0  // upper bounds are generous: the machine is shared and has 2 cores

// --- helpers

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static fault_spec_t *spec_of(const char *text) {
    fault_spec_t *s = NULL;
    char err[256] = "";
    int rc = fault_parse(text, &s, err, sizeof err);
    if (rc != 0) fprintf(stderr, "fault_parse(%s): %s\n", text, err);
    return s;
}

static void destroy_all(comm_t **cs, int N) {
    for (int r = 0; r < N; r++) comm_destroy(&cs[r]);
}

// Wraps cs[0..N) with spec. 0 or the first error.
static int wrap_all(comm_t **cs, int N, const fault_spec_t *spec) {
    char err[256];
    for (int r = 0; r < N; r++) {
        int rc = comm_fault_wrap(&cs[r], spec, err, sizeof err);
        if (rc != 0) {
            fprintf(stderr, "comm_fault_wrap: %s\n", err);
            return rc;
        }
    }
    return 0;
}

// An inproc group of N ranks, all wrapped with spec text (NULL: unwrapped).
static int inproc_group(comm_t **cs, int N, const char *text) {
    if (comm_inproc_new_group(cs, N) != 0) return -1;
    if (!text) return 0;
    fault_spec_t *s = spec_of(text);
    int rc = s ? wrap_all(cs, N, s) : -1;
    fault_free(&s);
    if (rc != 0) destroy_all(cs, N);
    return rc;
}

typedef struct {
    int rank, size;
    const char *const *eps;
    comm_t *c;
    int rc;
    char err[256];
} zmq_new_arg_t;

static void *zmq_new_main(void *p) {
    zmq_new_arg_t *a = p;
    comm_zmq_opts_t o;
    comm_zmq_opts_default(&o);
    o.connect_timeout_ms = 5000;
    a->rc = comm_zmq_new(&a->c, a->rank, a->size, a->eps, &o, a->err, sizeof a->err);
    return NULL;
}

// An N-rank ZeroMQ world over ipc sockets under dir (one thread per rank for the handshake); the
// ranks in wrap_mask are wrapped with spec text.
static int zmq_group(comm_t **cs, int N, const char *dir, const char *tag, const char *text, unsigned wrap_mask) {
    char eps[MAXN][EP_LEN];
    const char *ptrs[MAXN] = {NULL};
    pthread_t th[MAXN];
    zmq_new_arg_t a[MAXN];
    for (int r = 0; r < N; r++) {
        snprintf(eps[r], EP_LEN, "ipc://%s/%s-%d", dir, tag, r);
        ptrs[r] = eps[r];
    }
    for (int r = 0; r < N; r++) {
        a[r] = (zmq_new_arg_t){.rank = r, .size = N, .eps = ptrs};
        pthread_create(&th[r], NULL, zmq_new_main, &a[r]);
    }
    int rc = 0;
    for (int r = 0; r < N; r++) {
        pthread_join(th[r], NULL);
        cs[r] = a[r].c;
        if (a[r].rc != 0) {
            fprintf(stderr, "zmq rank %d: %s\n", r, a[r].err);
            rc = a[r].rc;
        }
    }
    fault_spec_t *s = text ? spec_of(text) : NULL;
    if (rc == 0 && text && !s) rc = -1;
    char err[256];
    for (int r = 0; r < N && rc == 0; r++)
        if (wrap_mask & (1u << r)) rc = comm_fault_wrap(&cs[r], s, err, sizeof err);
    fault_free(&s);
    if (rc != 0) destroy_all(cs, N);
    return rc;
}


// Receives one message expected to be the u32 idx (one frame); true if so.
static bool recv_index(comm_t *c, int peer, uint32_t idx, int timeout_ms) {
    comm_msg_t m;
    int from = -1;
    if (comm_recv(c, peer, &m, &from, timeout_ms) != 0) return false;
    bool ok = from == peer && m.n == 1 && m.len[0] == 4 && memcmp(m.data[0], &idx, 4) == 0;
    if (!ok && m.n == 1 && m.len[0] == 4)
        fprintf(stderr, "expected message %u from %d, got %u from %d\n", idx, peer, *(uint32_t *)m.data[0], from);
    comm_msg_free(&m);
    return ok;
}

// --- specs

static void test_parse_roundtrip(void) {
    const char *text = " delay:link=0-1:ms=40:jitter=5, bw:link=*:mbit=100,loss:link=2-*:p=0.01,"
                       "drop:link=3-1:p=0.05,kill:worker=2:after_tokens=5,freeze:worker=1:after_tokens=3:ms=250,"
                       "partition:link=*-2:after_tokens=9,delay:link=0-2:ms=0.1,seed=7 ";
    const char *canon = "delay:link=0-1:ms=40:jitter=5,bw:link=*:mbit=100,loss:link=2-*:p=0.01:rto_ms=200,"
                        "drop:link=1-3:p=0.05,kill:worker=2:after_tokens=5,freeze:worker=1:after_tokens=3:ms=250,"
                        "partition:link=2-*:after_tokens=9,delay:link=0-2:ms=0.1,seed=7";
    fault_spec_t *s = spec_of(text);
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), canon);
    fault_spec_t *s2 = spec_of(fault_spec_text(s)); // the canonical text parses to itself
    CU_ASSERT_FATAL(s2 != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s2), canon);
    fault_free(&s2);
    CU_ASSERT_EQUAL(fault_seed(s), 7);
    CU_ASSERT(fault_has_link_rules(s));
    fault_link_t p;
    fault_link_params(s, 1, 0, &p); // undirected
    CU_ASSERT(p.delay_ms == 40 && p.jitter_ms == 5 && p.mbit == 100 && p.loss_p == 0 && p.drop_p == 0 && p.rto_ms == 200);
    fault_link_params(s, 5, 2, &p);
    CU_ASSERT(p.delay_ms == 0 && p.mbit == 100 && p.loss_p == 0.01 && p.rto_ms == 200 && p.drop_p == 0);
    fault_link_params(s, 3, 1, &p);
    CU_ASSERT(p.drop_p == 0.05 && p.loss_p == 0 && p.mbit == 100);
    fault_link_params(s, 0, 2, &p);
    CU_ASSERT(p.delay_ms == 0.1 && p.loss_p == 0.01);
    CU_ASSERT_EQUAL(fault_n_events(s), 3);
    const fault_event_t *e0 = fault_event(s, 0), *e1 = fault_event(s, 1), *e2 = fault_event(s, 2);
    CU_ASSERT_FATAL(e0 && e1 && e2 && !fault_event(s, 3) && !fault_event(s, -1));
    CU_ASSERT(e0->kind == FAULT_KILL && e0->worker == 2 && e0->after_tokens == 5);
    CU_ASSERT(e1->kind == FAULT_FREEZE && e1->worker == 1 && e1->after_tokens == 3 && e1->ms == 250);
    CU_ASSERT(e2->kind == FAULT_PARTITION && e2->a == 2 && e2->b == FAULT_ANY && e2->after_tokens == 9 && e2->worker == -1);
    CU_ASSERT_STRING_EQUAL(fault_kind_name(FAULT_PARTITION), "partition");
    fault_free(&s);
    fault_free(&s); // idempotent
    CU_ASSERT(s == NULL);

    // the example of DESIGN.md
    s = spec_of("kill:worker=2:after_tokens=5,delay:link=0-1:ms=40,drop:link=1-3:p=0.05");
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), "kill:worker=2:after_tokens=5,delay:link=0-1:ms=40,drop:link=1-3:p=0.05");
    fault_link_params(s, 3, 1, &p);
    CU_ASSERT(p.drop_p == 0.05 && p.delay_ms == 0);
    CU_ASSERT(fault_n_events(s) == 1 && fault_event(s, 0)->kind == FAULT_KILL);
    fault_free(&s);

    // the most specific rule wins, among equals the last
    s = spec_of("delay:link=0-1:ms=40,delay:link=*:ms=5,delay:link=*:ms=6,delay:link=3-*:ms=2,loss:link=*:p=1:rto_ms=7");
    CU_ASSERT_FATAL(s != NULL);
    fault_link_params(s, 0, 1, &p);
    CU_ASSERT(p.delay_ms == 40 && p.loss_p == 1 && p.rto_ms == 7);
    fault_link_params(s, 1, 2, &p);
    CU_ASSERT(p.delay_ms == 6);
    fault_link_params(s, 2, 3, &p);
    CU_ASSERT(p.delay_ms == 2);
    CU_ASSERT_EQUAL(fault_n_events(s), 0);
    CU_ASSERT_EQUAL(fault_seed(s), 0);
    fault_free(&s);

    // empty specs; only events; odd but exact numbers survive the round trip
    s = spec_of("   ");
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), "");
    CU_ASSERT(!fault_has_link_rules(s));
    fault_free(&s);
    s = spec_of("kill:worker=1:after_tokens=0,seed=18446744073709551615");
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT(!fault_has_link_rules(s));
    CU_ASSERT_EQUAL(fault_seed(s), UINT64_MAX);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), "kill:worker=1:after_tokens=0,seed=18446744073709551615");
    fault_free(&s);
    s = spec_of("drop:link=1-0:p=0.1234567890123,bw:link=4-*:mbit=2.5e3");
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), "drop:link=0-1:p=0.1234567890123,bw:link=4-*:mbit=2500");
    fault_link_params(s, 1, 0, &p);
    CU_ASSERT(p.drop_p == 0.1234567890123);
    fault_free(&s);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(NULL), "");
    fault_link_params(NULL, 0, 1, &p);
    CU_ASSERT(p.delay_ms == 0 && p.drop_p == 0 && p.rto_ms == 200);

    // $MESHLM_FAULTS
    char *saved = getenv("MESHLM_FAULTS") ? strdup(getenv("MESHLM_FAULTS")) : NULL;
    char err[256] = "";
    unsetenv("MESHLM_FAULTS");
    s = (fault_spec_t *)1;
    CU_ASSERT(fault_from_env(&s, err, sizeof err) == 0 && s == NULL);
    setenv("MESHLM_FAULTS", "drop:link=*:p=1,seed=3", 1);
    CU_ASSERT(fault_from_env(&s, err, sizeof err) == 0 && s != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), "drop:link=*:p=1,seed=3");
    fault_free(&s);
    setenv("MESHLM_FAULTS", "drop:link=*:p=2", 1);
    CU_ASSERT(fault_from_env(&s, err, sizeof err) == MLM_EINVAL && s == NULL);
    CU_ASSERT(strstr(err, "MESHLM_FAULTS") != NULL && strstr(err, "p '2'") != NULL);
    if (saved) setenv("MESHLM_FAULTS", saved, 1);
    else unsetenv("MESHLM_FAULTS");
    free(saved);
}

// A schedule text fault_parse must refuse, and two substrings its message must hold.
typedef struct {
    const char *text;
    const char *want1, *want2;
} refusal_t;

// Each of cases[0..n) is refused with MLM_EINVAL, no spec and a message holding both substrings.
static void expect_refused(const refusal_t *cases, size_t n) {
    for (size_t i = 0; i < n; i++) {
        fault_spec_t *s = (fault_spec_t *)1;
        char err[256] = "";
        int rc = fault_parse(cases[i].text, &s, err, sizeof err);
        bool ok = rc == MLM_EINVAL && s == NULL && strstr(err, cases[i].want1) && strstr(err, cases[i].want2);
        if (!ok) fprintf(stderr, "\n  '%s' -> %d '%s'\n", cases[i].text, rc, err);
        CU_ASSERT(ok);
        if (rc == 0) fault_free(&s);
    }
}

static void test_parse_errors(void) {
    static const refusal_t cases[] = {
        {"delay:link=0-1", "rule 1 'delay:link=0-1'", "needs ms"},
        {"delay:link=0-1:ms=5,jam:link=0-1", "rule 2 'jam:link=0-1'", "unknown kind 'jam'"},
        {"delay:link=0-1:ms=5:color=red", "rule 1", "unknown key 'color' for delay"},
        {"drop:link=0-1:p=0.5:ms=3", "rule 1", "unknown key 'ms' for drop"},
        {"delay:link=0-1:ms=abc", "rule 1", "ms 'abc' is not a number"},
        {"delay:link=0-1:ms=-1", "rule 1", "ms '-1'"},
        {"delay:link=0-1:ms=1e9", "rule 1", "ms '1e9'"},
        {"delay:link=0-1:ms=5:jitter=inf", "rule 1", "jitter 'inf'"},
        {"drop:link=0-1:p=1.5", "rule 1", "p '1.5' is not a probability"},
        {"drop:link=0-1:p=-0.1", "rule 1", "p '-0.1'"},
        {"loss:link=0-1:p=nan", "rule 1", "p 'nan'"},
        {"loss:link=0-1:p=0.1:rto_ms=x", "rule 1", "rto_ms 'x'"},
        {"delay:link=1-1:ms=5", "rule 1", "to itself"},
        {"delay:link=a-b:ms=5", "rule 1", "link 'a-b'"},
        {"delay:link=0-1-2:ms=5", "rule 1", "link '0-1-2'"},
        {"delay:link=0:ms=5", "rule 1", "link '0'"},
        {"delay:link=-1-2:ms=5", "rule 1", "link '-1-2'"},
        {"bw:link=*:mbit=0", "rule 1", "mbit '0'"},
        {"kill:worker=2", "rule 1", "kill needs a trigger: after_tokens=K or at_ms=T"},
        {"kill:worker=x:after_tokens=1", "rule 1", "worker 'x'"},
        {"kill:worker=1:after_tokens=-3", "rule 1", "after_tokens '-3'"},
        {"freeze:worker=1:after_tokens=2", "rule 1", "freeze needs ms"},
        {"partition:link=0-1", "rule 1", "partition needs a trigger"},
        {"delay:link=0-1:ms=5:ms=6", "rule 1", "'ms' given twice"},
        {"delay:link=0-1:ms", "rule 1", "'ms' has no value"},
        {"seed=abc", "rule 1", "seed 'abc'"},
        {"seed=-1", "rule 1", "seed '-1'"},
        {"seed=1,seed=2", "rule 2 'seed=2'", "seed given twice"},
        {"seed:n=1", "rule 1", "seed=N"},
        {"delay:link=0-1:ms=5,,drop:link=*:p=0", "rule 2", "empty rule"},
        {"delay:link=0-1:ms=5,", "rule 2", "empty rule"},
        {"jitter:link=0-1:ms=1", "rule 1", "unknown kind 'jitter'"},
        {"delay:link=0-1:ms=5:", "rule 1", "empty key=value"},
        {"drop::link=0-1:p=1", "rule 1", "empty key=value"},
        {"drop:link=0-1:p=1,delay", "rule 2 'delay'", "delay needs link"},
    };
    expect_refused(cases, sizeof cases / sizeof cases[0]);
    fault_spec_t *s = NULL;
    CU_ASSERT_EQUAL(fault_parse(NULL, &s, NULL, 0), MLM_EINVAL); // err may be NULL
    CU_ASSERT_EQUAL(fault_parse("drop", &s, NULL, 0), MLM_EINVAL);
    char *big = malloc(70000);
    memset(big, ' ', 69999);
    big[69999] = 0;
    CU_ASSERT_EQUAL(fault_parse(big, &s, NULL, 0), MLM_EINVAL);
    free(big);
}

// Decisions are a pure function of (seed, src, dst, counter) with the right frequencies.
static void test_decisions(void) {
    fault_spec_t *a = spec_of("drop:link=0-1:p=0.25,loss:link=*:p=0.5,delay:link=*:ms=1:jitter=3,seed=42");
    fault_spec_t *b = spec_of("drop:link=0-1:p=0.25,loss:link=*:p=0.5,delay:link=*:ms=1:jitter=3,seed=42");
    fault_spec_t *c = spec_of("drop:link=0-1:p=0.25,loss:link=*:p=0.5,delay:link=*:ms=1:jitter=3,seed=43");
    CU_ASSERT_FATAL(a && b && c);
    int drops = 0, lost = 0, same_b = 0, same_c = 0, same_rev = 0, bad_jitter = 0;
    const int n = 20000;
    for (int i = 0; i < n; i++) {
        fault_decision_t da, db, dc, dr;
        fault_decide(a, 1, 0, (uint64_t)i, &da);
        fault_decide(b, 1, 0, (uint64_t)i, &db);
        fault_decide(c, 1, 0, (uint64_t)i, &dc);
        fault_decide(a, 0, 1, (uint64_t)i, &dr);
        drops += da.drop;
        lost += da.lost;
        same_b += da.drop == db.drop && da.lost == db.lost && da.jitter_ms == db.jitter_ms;
        same_c += da.drop == dc.drop;
        same_rev += da.drop == dr.drop;
        bad_jitter += !(da.jitter_ms >= 0 && da.jitter_ms < 3);
    }
    CU_ASSERT_EQUAL(same_b, n);
    CU_ASSERT(drops > n * 0.23 && drops < n * 0.27);
    CU_ASSERT(lost > n * 0.48 && lost < n * 0.52);
    CU_ASSERT(same_c < n * 0.7); // another seed, other decisions (0.625 expected by chance)
    CU_ASSERT(same_rev < n * 0.7); // each direction has its own
    CU_ASSERT_EQUAL(bad_jitter, 0);
    fault_decision_t d;
    fault_decide(a, 1, 2, 0, &d); // no drop rule on 1-2
    CU_ASSERT(!d.drop);
    fault_free(&a);
    fault_free(&b);
    fault_free(&c);
}

// The schedule's kinds (kill, freeze, partition, slow at a token count or a time; disk), seeded
// worker choice, the board entry and the setters.
static void test_parse_events(void) {
    const char *text = "kill:worker=2:at_ms=1500, freeze:worker=*:after_tokens=3:ms=250,partition:link=2-0:at_ms=100:ms=900,"
                       "partition:link=*-3:after_tokens=4,slow:worker=1:factor=2.5,slow:worker=3:factor=4:after_tokens=2:ms=500,"
                       "disk:worker=2:slow=3,disk:worker=*:full,disk:worker=1:slow=2:full,slow:worker=2:factor=1:at_ms=0,"
                       "drop:link=1-0:p=0.5:after_tokens=6:for_ms=250,delay:link=*:ms=7:at_ms=0,board=/tmp/meshlm-b_1.x,seed=9";
    const char *canon = "kill:worker=2:at_ms=1500,freeze:worker=*:after_tokens=3:ms=250,partition:link=0-2:at_ms=100:ms=900,"
                        "partition:link=3-*:after_tokens=4,slow:worker=1:factor=2.5,slow:worker=3:factor=4:after_tokens=2:ms=500,"
                        "disk:worker=2:slow=3,disk:worker=*:full,disk:worker=1:slow=2:full,slow:worker=2:factor=1,"
                        "drop:link=0-1:p=0.5:after_tokens=6:for_ms=250,delay:link=*:ms=7:at_ms=0,board=/tmp/meshlm-b_1.x,seed=9";
    fault_spec_t *s = spec_of(text);
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s), canon);
    fault_spec_t *s2 = spec_of(canon);
    CU_ASSERT_FATAL(s2 != NULL);
    CU_ASSERT_STRING_EQUAL(fault_spec_text(s2), canon);
    fault_free(&s2);
    CU_ASSERT_STRING_EQUAL(fault_board_path(s), "/tmp/meshlm-b_1.x");
    CU_ASSERT(fault_has_link_rules(s)); // the partitions are the transport's
    CU_ASSERT_EQUAL_FATAL(fault_n_events(s), 9);
    const fault_event_t *e[9];
    for (int i = 0; i < 9; i++) {
        e[i] = fault_event(s, i);
        CU_ASSERT_FATAL(e[i] != NULL);
        CU_ASSERT_EQUAL(e[i]->slot, i);
    }
    CU_ASSERT(e[0]->kind == FAULT_KILL && e[0]->worker == 2 && e[0]->at_ms == 1500 && e[0]->after_tokens == -1);
    CU_ASSERT(e[1]->kind == FAULT_FREEZE && e[1]->worker == FAULT_ANY && e[1]->after_tokens == 3 && e[1]->at_ms == -1 &&
              e[1]->ms == 250);
    CU_ASSERT(e[2]->kind == FAULT_PARTITION && e[2]->a == 0 && e[2]->b == 2 && e[2]->at_ms == 100 && e[2]->ms == 900);
    CU_ASSERT(e[3]->kind == FAULT_PARTITION && e[3]->a == 3 && e[3]->b == FAULT_ANY && e[3]->after_tokens == 4 &&
              e[3]->ms == 0);
    CU_ASSERT(e[4]->kind == FAULT_SLOW && e[4]->worker == 1 && e[4]->factor == 2.5 && e[4]->at_ms == 0 &&
              e[4]->after_tokens == -1 && e[4]->ms == 0);
    CU_ASSERT(e[5]->kind == FAULT_SLOW && e[5]->factor == 4 && e[5]->after_tokens == 2 && e[5]->ms == 500);
    CU_ASSERT(e[6]->kind == FAULT_SLOW && e[6]->factor == 1 && e[6]->at_ms == 0);
    CU_ASSERT(e[7]->kind == FAULT_DROP && e[7]->a == 0 && e[7]->b == 1 && e[7]->after_tokens == 6 && e[7]->ms == 250);
    CU_ASSERT(e[8]->kind == FAULT_DELAY && e[8]->a == FAULT_ANY && e[8]->at_ms == 0 && e[8]->ms == 0);
    CU_ASSERT(fault_event_cuts(e[2], 2, 0) && fault_event_cuts(e[2], 0, 2) && !fault_event_cuts(e[2], 0, 1));
    CU_ASSERT(fault_event_cuts(e[3], 3, 0) && fault_event_cuts(e[3], 1, 3) && !fault_event_cuts(e[3], 1, 2));
    CU_ASSERT(!fault_event_cuts(e[0], 2, 0) && !fault_event_cuts(e[3], 3, 3));
    fault_link_t p;
    fault_link_params(s, 0, 1, &p); // partitions and rules with a trigger are windows, not standing parameters
    CU_ASSERT(p.drop_p == 0 && p.delay_ms == 0);
    fault_disk_t d;
    fault_disk(s, 2, &d);
    CU_ASSERT(d.slow == 3 && !d.full); // worker=2 is more specific than *
    fault_disk(s, 1, &d);
    CU_ASSERT(d.slow == 2 && d.full);
    fault_disk(s, 7, &d);
    CU_ASSERT(d.slow == 1 && d.full);
    fault_disk(NULL, 1, &d);
    CU_ASSERT(d.slow == 1 && !d.full);
    // setters: the text follows, seed last
    CU_ASSERT_EQUAL(fault_set_seed(s, 12), 0);
    CU_ASSERT_EQUAL(fault_seed(s), 12);
    CU_ASSERT(strstr(fault_spec_text(s), ",board=/tmp/meshlm-b_1.x,seed=12") != NULL);
    CU_ASSERT_EQUAL(fault_set_board(s, "relative/path"), MLM_EINVAL);
    CU_ASSERT_EQUAL(fault_set_board(s, "/x/with space"), MLM_EINVAL);
    CU_ASSERT_EQUAL(fault_set_board(s, NULL), 0);
    CU_ASSERT(fault_board_path(s) == NULL && strstr(fault_spec_text(s), "board=") == NULL);
    CU_ASSERT_EQUAL(fault_set_board(s, "/run/b"), 0);
    const char *t = fault_spec_text(s);
    CU_ASSERT(strlen(t) > 21 && strcmp(t + strlen(t) - 21, ",board=/run/b,seed=12") == 0);
    CU_ASSERT_EQUAL(fault_identity(s), -1);
    fault_set_identity(s, 3);
    CU_ASSERT_EQUAL(fault_identity(s), 3);
    fault_free(&s);

    // process events alone are not the transport's
    s = spec_of("kill:worker=1:after_tokens=2,slow:worker=2:factor=2,disk:worker=1:full");
    CU_ASSERT_FATAL(s != NULL);
    CU_ASSERT(!fault_has_link_rules(s));
    CU_ASSERT_EQUAL(fault_n_events(s), 2);
    fault_free(&s);

    // worker=*: a pure function of the seed and the event's index, spread over the workers
    char many[2048] = "";
    for (int i = 0; i < 24; i++) strcat(many, "kill:worker=*:after_tokens=1,");
    char with7[2100], with8[2100];
    snprintf(with7, sizeof with7, "%sseed=7", many);
    snprintf(with8, sizeof with8, "%sseed=8", many);
    fault_spec_t *a = spec_of(with7), *b = spec_of(with7), *c = spec_of(with8);
    CU_ASSERT_FATAL(a && b && c);
    int same_b = 0, same_c = 0, seen[5] = {0};
    for (int i = 0; i < 24; i++) {
        const int w = fault_pick_worker(a, i, 4);
        CU_ASSERT(w >= 1 && w <= 4);
        if (w >= 1 && w <= 4) seen[w]++;
        same_b += w == fault_pick_worker(b, i, 4);
        same_c += w == fault_pick_worker(c, i, 4);
    }
    CU_ASSERT_EQUAL(same_b, 24);
    CU_ASSERT(same_c < 20);
    CU_ASSERT(seen[1] && seen[2] && seen[3] && seen[4]);
    CU_ASSERT_EQUAL(fault_pick_worker(a, 0, 0), -1);
    CU_ASSERT_EQUAL(fault_pick_worker(a, 24, 4), -1);
    fault_free(&a);
    fault_free(&b);
    fault_free(&c);
    s = spec_of("freeze:worker=3:at_ms=0:ms=1");
    CU_ASSERT(s && fault_pick_worker(s, 0, 2) == 3); // a named worker is the one named
    fault_free(&s);
    s = spec_of("disk:worker=2:slow=1,disk:worker=3:slow=1:full"); // (the fuzzer's find: slow=1 alone stays)
    CU_ASSERT(s && strcmp(fault_spec_text(s), "disk:worker=2:slow=1,disk:worker=3:full") == 0);
    fault_free(&s);
}

static void test_parse_event_errors(void) {
    static const refusal_t cases[] = {
        {"kill:worker=2:after_tokens=1:at_ms=5", "rule 1", "after_tokens=K or at_ms=T, not both"},
        {"kill:worker=0:after_tokens=1", "rule 1", "worker 0 is the coordinator"},
        {"kill:worker=-2:after_tokens=1", "rule 1", "worker '-2'"},
        {"kill:worker=1:after_tokens=1:ms=5", "rule 1", "unknown key 'ms' for kill"},
        {"freeze:worker=1:at_ms=5", "rule 1", "freeze needs ms"},
        {"freeze:worker=1:ms=5", "rule 1", "freeze needs a trigger"},
        {"freeze:worker=1:at_ms=5:ms=4000000", "rule 1", "ms '4000000'"},
        {"partition:link=0-1:at_ms=x", "rule 1", "at_ms 'x'"},
        {"partition:link=1-1:at_ms=1", "rule 1", "to itself"},
        {"slow:worker=1", "rule 1", "slow needs factor"},
        {"slow:worker=1:factor=0.5", "rule 1", "factor '0.5' is not a factor in [1, 100]"},
        {"slow:worker=1:factor=101", "rule 1", "factor '101'"},
        {"slow:worker=1:factor=2:at_ms=-1", "rule 1", "at_ms '-1'"},
        {"slow:worker=1:factor=2:after_tokens=1:at_ms=1", "rule 1", "not both"},
        {"disk:worker=1", "rule 1", "disk needs slow=F or full"},
        {"disk:worker=1:full=1", "rule 1", "key 'full' takes no value"},
        {"disk:worker=1:slow", "rule 1", "key 'slow' has no value"},
        {"disk:worker=1:slow=0", "rule 1", "slow '0' is not a factor"},
        {"disk:worker=1:full:full", "rule 1", "'full' given twice"},
        {"disk:worker=1:full:at_ms=3", "rule 1", "unknown key 'at_ms' for disk"},
        {"delay:link=0-1:ms=5:for_ms=3", "rule 1", "for_ms is the length of a window"},
        {"drop:link=0-1:p=0.1:at_ms=3:after_tokens=2", "rule 1", "not both"},
        {"kill:worker=1:at_ms=3:for_ms=3", "rule 1", "unknown key 'for_ms' for kill"},
        {"drop:link=0-1:p=0.1:full", "rule 1", "unknown key 'full' for drop"},
        {"board=tmp/x", "rule 1", "not an absolute path"},
        {"board=", "rule 1", "not an absolute path"},
        {"board=/a,board=/b", "rule 2 'board=/b'", "board given twice"},
        {"crash:worker=1:at_ms=1", "rule 1", "unknown kind 'crash'"},
    };
    expect_refused(cases, sizeof cases / sizeof cases[0]);
    // at most FAULT_MAX_EVENTS events
    char *text = malloc(40 * (FAULT_MAX_EVENTS + 2));
    CU_ASSERT_FATAL(text != NULL);
    text[0] = 0;
    for (int i = 0; i <= FAULT_MAX_EVENTS; i++) strcat(text, i ? ",kill:worker=1:at_ms=1" : "kill:worker=1:at_ms=1");
    fault_spec_t *s = NULL;
    char err[256] = "";
    CU_ASSERT_EQUAL(fault_parse(text, &s, err, sizeof err), MLM_EINVAL);
    CU_ASSERT(strstr(err, "more than 256 events") != NULL && strstr(err, "rule 257") != NULL);
    *strrchr(text, ',') = 0; // exactly the maximum
    CU_ASSERT_EQUAL(fault_parse(text, &s, err, sizeof err), 0);
    CU_ASSERT_EQUAL(fault_n_events(s), FAULT_MAX_EVENTS);
    fault_free(&s);
    free(text);
}

// The board: windows written by its creator, seen through another mapping of the same file.
static void test_board(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    char tmpl[512], err[256];
    snprintf(tmpl, sizeof tmpl, "%s/board-XXXXXX", dir);
    fault_board_t *w = NULL, *r = NULL;
    CU_ASSERT_EQUAL_FATAL(fault_board_create(&w, tmpl, err, sizeof err), 0);
    const char *path = fault_board_file(w);
    CU_ASSERT(strncmp(path, dir, strlen(dir)) == 0 && strstr(path, "XXXXXX") == NULL);
    CU_ASSERT_EQUAL_FATAL(fault_board_open(&r, path, err, sizeof err), 0);
    int64_t st = -1;
    CU_ASSERT(!fault_board_active(r, 3, 1000, &st) && st == 0); // closed
    CU_ASSERT_EQUAL(fault_board_set(w, 3, 1000, 2000), 0);
    CU_ASSERT(fault_board_active(r, 3, 1000, &st) && st == 1000);
    CU_ASSERT(fault_board_active(r, 3, 1999, NULL));
    CU_ASSERT(!fault_board_active(r, 3, 999, NULL) && !fault_board_active(r, 3, 2000, NULL));
    CU_ASSERT(!fault_board_active(r, 2, 1500, NULL) && !fault_board_active(r, 4, 1500, NULL));
    CU_ASSERT_EQUAL(fault_board_set(w, FAULT_MAX_EVENTS - 1, 5, INT64_MAX), 0);
    CU_ASSERT(fault_board_active(r, FAULT_MAX_EVENTS - 1, INT64_MAX - 1, NULL));
    CU_ASSERT_EQUAL(fault_board_set(w, 3, 0, 0), 0); // closed again
    CU_ASSERT(!fault_board_active(r, 3, 1500, NULL));
    CU_ASSERT_EQUAL(fault_board_set(r, 3, 1, 2), MLM_EINVAL); // read-only
    CU_ASSERT_EQUAL(fault_board_set(w, FAULT_MAX_EVENTS, 1, 2), MLM_EINVAL);
    CU_ASSERT_EQUAL(fault_board_set(w, -1, 1, 2), MLM_EINVAL);
    CU_ASSERT(!fault_board_active(NULL, 0, 1, NULL) && !fault_board_active(r, -1, 1, NULL));
    fault_board_destroy(&r);
    char kept[512];
    snprintf(kept, sizeof kept, "%s", path);
    fault_board_destroy(&w);
    fault_board_destroy(&w); // idempotent
    CU_ASSERT(w == NULL && access(kept, F_OK) != 0); // the creator removed it
    // not a board: too short, wrong magic; missing; bad templates
    char bad[512];
    snprintf(bad, sizeof bad, "%s/notaboard", dir);
    FILE *f = fopen(bad, "wb");
    CU_ASSERT_FATAL(f != NULL);
    for (int i = 0; i < FAULT_BOARD_BYTES; i++) fputc('x', f);
    fclose(f);
    CU_ASSERT_EQUAL(fault_board_open(&r, bad, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT(r == NULL && strstr(err, "not a version 1 board") != NULL);
    CU_ASSERT_EQUAL(fault_board_open(&r, kept, err, sizeof err), MLM_EIO);
    CU_ASSERT_EQUAL(fault_board_create(&w, "/tmp/no-template", err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(fault_board_create(&w, "/nonexistent-dir/b-XXXXXX", err, sizeof err), MLM_EIO);
    test_rm_dir(dir);
}

// Sends u32 i from rank a to rank b and reports whether b receives it within ms.
static bool passes(comm_t **cs, int a, int b, uint32_t i, int ms) {
    if (comm_send1(cs[a], b, &i, 4, 1000) != 0) return false;
    return recv_index(cs[b], a, i, ms);
}

// A partition on the board: both directions of the link drop while its window is open; other
// links carry on; an end given a heartbeat loses the peer once the cut has lasted that long.
static void test_partition_window(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    char tmpl[512], err[256], text[700];
    snprintf(tmpl, sizeof tmpl, "%s/board-XXXXXX", dir);
    fault_board_t *board = NULL;
    CU_ASSERT_EQUAL_FATAL(fault_board_create(&board, tmpl, err, sizeof err), 0);
    snprintf(text, sizeof text,
             "kill:worker=1:at_ms=99,partition:link=0-2:after_tokens=3:ms=400,drop:link=1-2:p=1:after_tokens=9,board=%s",
             fault_board_file(board));
    fault_spec_t *spec = spec_of(text);
    CU_ASSERT_FATAL(spec != NULL);
    comm_t *cs[MAXN];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    const fault_wrap_opts_t wo = {.heartbeat_ms = 100, .fail_on_any_loss = true};
    for (int r = 0; r < 3; r++) CU_ASSERT_FATAL(comm_fault_wrap_opts(&cs[r], spec, r == 0 ? &wo : NULL, err, sizeof err) == 0);
    uint32_t k = 0;
    CU_ASSERT(passes(cs, 0, 2, k++, 2000) && passes(cs, 2, 0, k++, 2000)); // not open yet
    // a drop rule with a window: in force only while it is open
    CU_ASSERT(passes(cs, 1, 2, k++, 2000));
    CU_ASSERT_EQUAL(fault_board_set(board, 2, fault_now_ns(), INT64_MAX), 0);
    CU_ASSERT(!passes(cs, 1, 2, k++, 30) && !passes(cs, 2, 1, k++, 30));
    CU_ASSERT(passes(cs, 0, 1, k++, 2000));
    CU_ASSERT_EQUAL(fault_board_set(board, 2, 0, 0), 0);
    CU_ASSERT(passes(cs, 1, 2, k++, 2000));
    const int64_t t0 = fault_now_ns();
    CU_ASSERT_EQUAL(fault_board_set(board, 1, t0, t0 + 400 * 1000000ll), 0); // event 1 is the partition
    CU_ASSERT(!passes(cs, 0, 2, k++, 30));
    CU_ASSERT(!passes(cs, 2, 0, k++, 30));
    CU_ASSERT(passes(cs, 0, 1, k++, 2000) && passes(cs, 1, 2, k++, 2000) && passes(cs, 2, 1, k++, 2000));
    // rank 2 has no heartbeat: a cut only drops; rank 0 loses rank 2 once the cut is 100 ms old, and
    // (fail_on_any_loss) then every call fails
    bool lost = true;
    CU_ASSERT(comm_fault_inner(cs[0], 2, &lost) != cs[0] && !lost);
    comm_msg_t m;
    int from = -1;
    int rc = comm_recv(cs[0], 2, &m, &from, 1000);
    const double waited = (fault_now_ns() - t0) / 1e6;
    CU_ASSERT_EQUAL(rc, MLM_EPEER);
    CU_ASSERT(waited >= 100 && waited < 100 + SLACK_MS);
    CU_ASSERT(comm_fault_inner(cs[0], 2, &lost) != NULL && lost);
    CU_ASSERT(comm_fault_inner(cs[0], 1, &lost) != NULL && !lost);
    CU_ASSERT_EQUAL(comm_send1(cs[0], 2, "x", 1, 100), MLM_EPEER);
    CU_ASSERT_EQUAL(comm_send1(cs[0], 1, "x", 1, 100), MLM_EPEER); // fail_on_any_loss
    CU_ASSERT_EQUAL(comm_recv(cs[0], COMM_ANY, &m, &from, 100), MLM_EPEER);
    CU_ASSERT_EQUAL(from, 2);
    CU_ASSERT_EQUAL(comm_recv(cs[2], 0, &m, &from, 10), MLM_ETIMEOUT); // no heartbeat: still only silence
    // after the window: 2 hears 0 again; 0 lost 2 for good (a data plane is rebuilt after a loss)
    while (fault_now_ns() < t0 + 420 * 1000000ll) usleep(5000);
    CU_ASSERT(passes(cs, 1, 2, k++, 2000));
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &k, 4, 1000), 0);
    CU_ASSERT(recv_index(cs[0], 1, k, 1000)); // what arrived is delivered first, as a real comm does
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, &from, 100), MLM_EPEER);
    CU_ASSERT_EQUAL(comm_send1(cs[0], 2, "x", 1, 100), MLM_EPEER);
    destroy_all(cs, 3);
    // ends that know their nodes: rank 0 waits for rank 1 and never hears from rank 2 but its
    // announcement; the cut of 0-2 still loses rank 2 (and with fail_on_any_loss ends the wait)
    fault_spec_t *sp[3];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    for (int r = 0; r < 3; r++) {
        sp[r] = spec_of(text);
        CU_ASSERT_FATAL(sp[r] != NULL);
        fault_set_identity(sp[r], r);
        CU_ASSERT_FATAL(comm_fault_wrap_opts(&cs[r], sp[r], r == 0 ? &wo : NULL, err, sizeof err) == 0);
    }
    // (event 1 is the partition of 0-2: rank 0 waits on rank 1 and hears from rank 2 only its announcement)
    const int64_t t1 = fault_now_ns();
    CU_ASSERT_EQUAL(fault_board_set(board, 1, t1, INT64_MAX), 0);
    rc = comm_recv(cs[0], 1, &m, &from, 2000);
    const double waited1 = (fault_now_ns() - t1) / 1e6;
    CU_ASSERT_EQUAL(rc, MLM_EPEER);
    CU_ASSERT(waited1 >= 100 && waited1 < 100 + SLACK_MS);
    CU_ASSERT(comm_fault_inner(cs[0], 2, &lost) != NULL && lost);
    CU_ASSERT_EQUAL(fault_board_set(board, 1, 0, 0), 0);
    destroy_all(cs, 3);
    for (int r = 0; r < 3; r++) fault_free(&sp[r]);
    // a wrapper that cannot map the board enforces no cuts
    fault_board_set(board, 1, fault_now_ns(), INT64_MAX);
    fault_spec_t *gone = spec_of("partition:link=0-1:at_ms=0,board=/nonexistent/board");
    CU_ASSERT_FATAL(gone && comm_inproc_new_group(cs, 2) == 0);
    CU_ASSERT(wrap_all(cs, 2, gone) == 0);
    CU_ASSERT(passes(cs, 0, 1, 1, 2000) && passes(cs, 1, 0, 2, 2000));
    destroy_all(cs, 2);
    fault_free(&gone);
    fault_free(&spec);
    fault_board_destroy(&board);
    test_rm_dir(dir);
}

// Nodes, not ranks: a rank that is node 3 (after a re-plan, say) announces it, and rules about
// node 3 follow it. Counters go on across wrappers of one spec, so the decisions do not repeat.
static void test_nodes_and_counters(void) {
    comm_t *cs[MAXN];
    fault_spec_t *sp[3];
    char err[256];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    for (int r = 0; r < 3; r++) {
        sp[r] = spec_of("drop:link=0-3:p=1,delay:link=1-*:ms=30"); // one per process, as on real nodes
        CU_ASSERT_FATAL(sp[r] != NULL);
    }
    fault_set_identity(sp[1], 3); // rank 1 is node 3; rank 2 is node 2
    for (int r = 0; r < 3; r++) CU_ASSERT_FATAL(comm_fault_wrap(&cs[r], sp[r], err, sizeof err) == 0);
    CU_ASSERT(!passes(cs, 1, 0, 1, 60)); // node 3 -> 0: dropped
    CU_ASSERT(!passes(cs, 0, 1, 2, 60)); // 0 -> node 3: dropped
    CU_ASSERT(passes(cs, 2, 0, 3, 2000) && passes(cs, 0, 2, 4, 2000));
    double t0 = now_ms();
    CU_ASSERT(passes(cs, 1, 2, 5, 2000)); // node 3 - node 2: no delay (rank 1's rule does not apply)
    CU_ASSERT(now_ms() - t0 < 30);
    destroy_all(cs, 3);
    for (int r = 0; r < 3; r++) fault_free(&sp[r]);

    fault_spec_t *spec = spec_of("drop:link=0-1:p=0.5,seed=3");
    CU_ASSERT_FATAL(spec != NULL);
    uint64_t want[2] = {0, 0}, got[2] = {0, 0};
    for (uint32_t i = 0; i < 64; i++) {
        fault_decision_t d;
        fault_decide(spec, 1, 0, i, &d);
        want[i / 32] |= (uint64_t)!d.drop << (i % 32);
    }
    CU_ASSERT(want[0] != want[1]);
    for (int run = 0; run < 2; run++) { // a second world over the same spec: messages 32..63
        CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
        CU_ASSERT_FATAL(wrap_all(cs, 2, spec) == 0);
        for (uint32_t i = 0; i < 32; i++) {
            CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &i, 4, 1000), 0);
            comm_msg_t m;
            if (comm_recv(cs[0], 1, &m, NULL, 15) == 0) {
                got[run] |= 1ull << *(uint32_t *)m.data[0];
                comm_msg_free(&m);
            }
        }
        destroy_all(cs, 2);
    }
    CU_ASSERT(got[0] == want[0] && got[1] == want[1]);
    fault_free(&spec);
}

// --- wrapper checks shared by inproc and ZeroMQ

// delay_ms on 0-1 (wrapped): every ping-pong takes at least two delays, and not much more.
static void check_pingpong(comm_t **cs, double delay_ms) {
    double worst = 0, best = 1e9;
    for (uint32_t i = 0; i < 5; i++) {
        double t0 = now_ms();
        CU_ASSERT_EQUAL(comm_send1(cs[0], 1, &i, 4, 1000), 0);
        CU_ASSERT(recv_index(cs[1], 0, i, 2000));
        CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &i, 4, 1000), 0);
        CU_ASSERT(recv_index(cs[0], 1, i, 2000));
        double rtt = now_ms() - t0;
        worst = fmax(worst, rtt);
        best = fmin(best, rtt);
    }
    CU_ASSERT(best >= 2 * delay_ms);
    CU_ASSERT(worst < 2 * delay_ms + SLACK_MS);
    // a receive whose deadline comes before the message is due times out and keeps it
    uint32_t k = 99;
    double t0 = now_ms();
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &k, 4, 1000), 0);
    comm_msg_t m;
    int rc = comm_recv(cs[0], 1, &m, NULL, (int)(delay_ms / 2));
    double el = now_ms() - t0;
    if (el < delay_ms * 0.9) CU_ASSERT_EQUAL(rc, MLM_ETIMEOUT); // (a stalled machine may have passed the due time)
    if (rc == 0) comm_msg_free(&m);
    else CU_ASSERT(recv_index(cs[0], 1, k, 2000));
    CU_ASSERT(now_ms() - t0 >= delay_ms);
}

// Each message is late by the delay plus its own seeded jitter; jitter never reorders the messages
// of one peer; recv(ANY) takes from both senders.
static void check_jitter_order(comm_t **cs, const fault_spec_t *spec) {
    fault_link_t p;
    fault_link_params(spec, 1, 0, &p);
    double lo = 1e9, hi = 0;
    int early = 0;
    for (uint32_t i = 0; i < 20; i++) { // one at a time: messages 0..19 of 1 -> 0
        fault_decision_t d;
        fault_decide(spec, 1, 0, i, &d);
        double t0 = now_ms();
        CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &i, 4, 1000), 0);
        CU_ASSERT(recv_index(cs[0], 1, i, 2000));
        double el = now_ms() - t0;
        early += el < p.delay_ms + d.jitter_ms;
        lo = fmin(lo, el);
        hi = fmax(hi, el);
    }
    CU_ASSERT_EQUAL(early, 0);
    CU_ASSERT(hi - lo >= p.jitter_ms / 4); // the jitter is there
    const uint32_t n = 100;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t i1 = i + 20;
        CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &i1, 4, 1000), 0);
        CU_ASSERT_EQUAL(comm_send1(cs[2], 0, &i, 4, 1000), 0);
    }
    uint32_t next[3] = {0, 0, 0}, first[3] = {0, 20, 0};
    int bad = 0;
    for (uint32_t i = 0; i < 2 * n; i++) {
        comm_msg_t m;
        int from = -1;
        if (comm_recv(cs[0], COMM_ANY, &m, &from, 2000) != 0) {
            bad++;
            continue;
        }
        if (from < 1 || from > 2 || m.n != 1 || m.len[0] != 4 || *(uint32_t *)m.data[0] != first[from] + next[from]) bad++;
        else next[from]++;
        comm_msg_free(&m);
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT(next[1] == n && next[2] == n);
}

// 100 Mbit/s on 1-0: 1 MB takes 80 ms; two 500 kB messages queue behind each other.
static void check_bw(comm_t **cs) {
    const size_t big = 1000000;
    uint8_t *buf = calloc(1, big);
    CU_ASSERT_FATAL(buf != NULL);
    for (size_t i = 0; i < big; i++) buf[i] = (uint8_t)(i * 7);
    double t0 = now_ms();
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, buf, big, 2000), 0);
    comm_msg_t m;
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 5000), 0);
    double el = now_ms() - t0;
    CU_ASSERT(el >= 80.0 && el < 80.0 + SLACK_MS);
    CU_ASSERT(m.n == 1 && m.len[0] == big && memcmp(m.data[0], buf, big) == 0);
    comm_msg_free(&m);
    t0 = now_ms();
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, buf, big / 2, 2000), 0);
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, buf, big / 2, 2000), 0);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, NULL, 5000), 0);
    double first = now_ms() - t0;
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, NULL, 5000), 0);
    double second = now_ms() - t0;
    comm_msg_free(&m);
    CU_ASSERT(first >= 40.0 && second >= 80.0 && second < 80.0 + SLACK_MS);
    // the other direction is a link direction of its own and is not held up by this one
    free(buf);
}

// drop on 1-0 with a seed: exactly the predicted messages vanish (the receiver times out on them).
// Returns the dropped indices as a bit mask.
static uint64_t check_drop(comm_t **cs, const fault_spec_t *spec) {
    uint64_t mask = 0;
    for (uint32_t i = 0; i < 40; i++) {
        fault_decision_t d;
        fault_decide(spec, 1, 0, i, &d);
        CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &i, 4, 1000), 0);
        if (d.drop) {
            comm_msg_t m;
            int rc = comm_recv(cs[0], 1, &m, NULL, 15);
            CU_ASSERT_EQUAL(rc, MLM_ETIMEOUT);
            if (rc == 0) comm_msg_free(&m);
            mask |= 1ull << i;
        } else {
            CU_ASSERT(recv_index(cs[0], 1, i, 2000)); // a dropped one never shows up late
        }
    }
    comm_msg_t m;
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, NULL, 20), MLM_ETIMEOUT);
    return mask;
}

// loss on 1-0: everything arrives, in order; the predicted "lost" ones late by the rto.
static void check_loss(comm_t **cs, const fault_spec_t *spec, double rto_ms) {
    int fast = 0, n_ok = 0, late = 0;
    for (uint32_t i = 0; i < 24; i++) {
        fault_decision_t d;
        fault_decide(spec, 1, 0, i, &d);
        double t0 = now_ms();
        CU_ASSERT_EQUAL(comm_send1(cs[1], 0, &i, 4, 1000), 0);
        CU_ASSERT(recv_index(cs[0], 1, i, 3000));
        double el = now_ms() - t0;
        if (d.lost) {
            late++;
            CU_ASSERT(el >= rto_ms);
            CU_ASSERT(el < rto_ms + SLACK_MS);
        } else {
            n_ok++;
            fast += el < rto_ms / 2;
        }
    }
    CU_ASSERT(late > 0 && n_ok > 0);
    CU_ASSERT(fast >= n_ok / 2); // not everything is slow
}

// Messages with 0 and COMM_MAX_FRAMES frames (the stamp rides in the last frame) arrive intact.
static void check_frame_counts(comm_t **cs) {
    static uint8_t bytes[COMM_MAX_FRAMES][20];
    comm_iov_t f[COMM_MAX_FRAMES];
    for (int i = 0; i < COMM_MAX_FRAMES; i++) {
        memset(bytes[i], 'a' + i, sizeof bytes[i]);
        f[i] = (comm_iov_t){bytes[i], (size_t)i};
    }
    CU_ASSERT_EQUAL(comm_send(cs[1], 0, f, COMM_MAX_FRAMES, 1000), 0);
    CU_ASSERT_EQUAL(comm_send(cs[1], 0, f, 0, 1000), 0);
    comm_msg_t m;
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 2000), 0);
    int bad = m.n != COMM_MAX_FRAMES;
    for (int i = 0; i < m.n && !bad; i++) bad += m.len[i] != (size_t)i || (i && memcmp(m.data[i], bytes[i], (size_t)i) != 0);
    CU_ASSERT_EQUAL(bad, 0);
    comm_msg_free(&m);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 2000), 0);
    CU_ASSERT_EQUAL(m.n, 0);
    comm_msg_free(&m);
}

// cs[0] wrapped with a 5 ms delay on 0-1, cs[1] not: what an unwrapped or hostile peer sends is
// delivered (as it is when it carries no valid stamp) and never hangs the receiver.
static void check_hostile(comm_t **cs) {
    uint8_t stamp[16] = {'M', 'L', 'M', 'F', 'S', 'T', 'M', 'P'};
    comm_msg_t m;
    // no stamp at all: delivered as it is, timed from its arrival
    double t0 = now_ms();
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "plain", 5, 1000), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 2000), 0);
    CU_ASSERT(m.n == 1 && m.len[0] == 5 && memcmp(m.data[0], "plain", 5) == 0);
    CU_ASSERT(now_ms() - t0 >= 5.0);
    comm_msg_free(&m);
    // a 16-byte last frame with another magic, a short one with the right magic, the merged form
    // on fewer than COMM_MAX_FRAMES frames: all delivered untouched
    uint8_t wrong[16] = "XLMFSTMP1234567";
    uint8_t merged[20] = {'x', 'y', 'z', 'w', 'M', 'L', 'M', 'F', 'S', 'T', 'M', 'Q'};
    comm_iov_t cases[3][2] = {{{"a", 1}, {wrong, 16}}, {{"b", 1}, {stamp, 15}}, {{"c", 1}, {merged, 20}}};
    const size_t last_len[3] = {16, 15, 20};
    for (int k = 0; k < 3; k++) {
        CU_ASSERT_EQUAL(comm_send(cs[1], 0, cases[k], 2, 1000), 0);
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 2000), 0);
        CU_ASSERT(m.n == 2 && m.len[1] == last_len[k] && memcmp(m.data[1], cases[k][1].ptr, last_len[k]) == 0);
        comm_msg_free(&m);
    }
    // a stamp from the far future: held for the delay only, not for ever
    memset(stamp + 8, 0xff, 8);
    t0 = now_ms();
    comm_iov_t f[2] = {{"future", 6}, {stamp, 16}};
    CU_ASSERT_EQUAL(comm_send(cs[1], 0, f, 2, 1000), 0);
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 2000), 0);
    double el = now_ms() - t0;
    CU_ASSERT(m.n == 1 && m.len[0] == 6 && memcmp(m.data[0], "future", 6) == 0); // stamp stripped
    CU_ASSERT(el >= 5.0 && el < 5.0 + SLACK_MS);
    comm_msg_free(&m);
    // a stamp from long ago: due at once
    memset(stamp + 8, 0, 8);
    f[0] = (comm_iov_t){"past", 4};
    CU_ASSERT_EQUAL(comm_send(cs[1], 0, f, 2, 1000), 0);
    int rc = MLM_ETIMEOUT;
    t0 = now_ms();
    while (rc == MLM_ETIMEOUT && now_ms() - t0 < 2000) rc = comm_recv(cs[0], 1, &m, NULL, 0); // polls only
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT(m.n == 1 && m.len[0] == 4 && memcmp(m.data[0], "past", 4) == 0);
    comm_msg_free(&m);
}

// --- wrapper over inproc

static void test_inproc_delay(void) {
    comm_t *cs[MAXN];
    CU_ASSERT_FATAL(inproc_group(cs, 2, "delay:link=0-1:ms=5") == 0);
    CU_ASSERT_STRING_EQUAL(comm_name(cs[0]), "inproc+fault");
    CU_ASSERT(comm_rank(cs[1]) == 1 && comm_size(cs[1]) == 2);
    check_pingpong(cs, 5.0);
    check_frame_counts(cs);
    destroy_all(cs, 2);

    fault_spec_t *spec = spec_of("delay:link=*:ms=1:jitter=4,seed=1");
    CU_ASSERT_FATAL(spec && inproc_group(cs, 3, fault_spec_text(spec)) == 0);
    check_jitter_order(cs, spec);
    fault_free(&spec);
    destroy_all(cs, 3);

    CU_ASSERT_FATAL(inproc_group(cs, 2, "bw:link=0-1:mbit=100") == 0);
    check_bw(cs);
    destroy_all(cs, 2);

    // no spec: nothing wrapped
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
    comm_t *before = cs[0];
    CU_ASSERT(comm_fault_wrap(&cs[0], NULL, NULL, 0) == 0 && cs[0] == before);
    CU_ASSERT_EQUAL(comm_fault_wrap(NULL, NULL, NULL, 0), MLM_EINVAL);
    destroy_all(cs, 2);
}

// recv(ANY) returns the message due first, not the one that arrived first; deadlines hold.
static void test_inproc_any_and_deadline(void) {
    comm_t *cs[MAXN];
    CU_ASSERT_FATAL(inproc_group(cs, 3, "delay:link=0-1:ms=60") == 0);
    double t0 = now_ms();
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "slow", 4, 1000), 0);
    CU_ASSERT_EQUAL(comm_send1(cs[2], 0, "fast", 4, 1000), 0);
    comm_msg_t m;
    int from = -1;
    CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], COMM_ANY, &m, &from, 2000), 0);
    CU_ASSERT(from == 2 && m.len[0] == 4 && memcmp(m.data[0], "fast", 4) == 0);
    comm_msg_free(&m);
    double t1 = now_ms();
    int rc = comm_recv(cs[0], COMM_ANY, &m, &from, 10);
    double el = now_ms() - t1;
    if (now_ms() - t0 < 55) { // (unless the machine stalled past the due time)
        CU_ASSERT_EQUAL(rc, MLM_ETIMEOUT);
        CU_ASSERT(el >= 10.0); // waited for the whole deadline
    }
    if (rc == 0) comm_msg_free(&m);
    else {
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], COMM_ANY, &m, &from, 2000), 0); // kept for this call
        CU_ASSERT(from == 1 && m.len[0] == 4 && memcmp(m.data[0], "slow", 4) == 0);
        CU_ASSERT(now_ms() - t0 >= 60.0);
        comm_msg_free(&m);
    }
    // a lost peer is reported once its held messages are delivered
    CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "last", 4, 1000), 0);
    comm_destroy(&cs[1]);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, &from, 2000), 0);
    comm_msg_free(&m);
    CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, &from, 2000), MLM_EPEER);
    destroy_all(cs, 3);
}

static void test_inproc_drop_loss(void) {
    const char *text = "drop:link=0-1:p=0.3,seed=11";
    fault_spec_t *spec = spec_of(text);
    CU_ASSERT_FATAL(spec != NULL);
    uint64_t predicted = 0;
    for (uint32_t i = 0; i < 40; i++) {
        fault_decision_t d;
        fault_decide(spec, 1, 0, i, &d);
        predicted |= (uint64_t)d.drop << i;
    }
    CU_ASSERT(predicted != 0 && predicted != (1ull << 40) - 1); // the test means something
    uint64_t runs[2];
    for (int run = 0; run < 2; run++) {
        comm_t *cs[MAXN];
        CU_ASSERT_FATAL(inproc_group(cs, 2, text) == 0);
        runs[run] = check_drop(cs, spec);
        destroy_all(cs, 2);
    }
    CU_ASSERT(runs[0] == predicted && runs[1] == predicted);
    fault_free(&spec);

    text = "loss:link=0-1:p=0.3:rto_ms=40,seed=5";
    spec = spec_of(text);
    comm_t *cs[MAXN];
    CU_ASSERT_FATAL(spec && inproc_group(cs, 2, text) == 0);
    check_loss(cs, spec, 40.0);
    destroy_all(cs, 2);
    fault_free(&spec);
}

static void check_hostile_inproc(void) {
    comm_t *cs[MAXN];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
    fault_spec_t *s = spec_of("delay:link=0-1:ms=5");
    CU_ASSERT_FATAL(s && comm_fault_wrap(&cs[0], s, NULL, 0) == 0); // rank 1 stays raw
    fault_free(&s);
    check_hostile(cs);
    destroy_all(cs, 2);
}

// --- collectives through wrapped comms

typedef struct {
    int N;
    size_t n;
    const float *x;             // (N, n) inputs
    float *out;                 // (N, n) results per rank
    int rc[MAXN];               // per rank
    comm_algo_t algo;
    bool q8;                    // comm_set_compress
    double barrier_ms[MAXN];    // time of a barrier per rank
} ar_job_t;

static void ar_body(comm_t *c, int r, void *arg) {
    ar_job_t *j = arg;
    float *buf = j->out + (size_t)r * j->n;
    memcpy(buf, j->x + (size_t)r * j->n, j->n * sizeof(float));
    comm_set_compress(c, j->q8);
    j->rc[r] = comm_allreduce_f32(c, buf, j->n, j->algo, 10000);
    double t0 = now_ms();
    int rc = comm_barrier(c, 10000);
    j->barrier_ms[r] = now_ms() - t0;
    if (j->rc[r] == 0) j->rc[r] = rc;
}

// All-reduces of x over cs (star, ring, ring with Q8_0) into outs[3] (N, n) each.
static void run_allreduces(comm_t **cs, int N, size_t n, const float *x, float *outs[3], double *min_barrier) {
    *min_barrier = 1e9;
    for (int k = 0; k < 3; k++) {
        ar_job_t j = {.N = N, .n = n, .x = x, .out = outs[k], .algo = k ? COMM_ALGO_RING : COMM_ALGO_STAR, .q8 = k == 2};
        test_run_ranks(cs, N, ar_body, &j);
        for (int r = 0; r < N; r++) {
            CU_ASSERT_EQUAL(j.rc[r], 0);
            if (r) *min_barrier = fmin(*min_barrier, j.barrier_ms[r]);
        }
    }
}

static void test_allreduce_bits(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    const size_t n = 1001;
    const char *text = "delay:link=*:ms=2:jitter=2,bw:link=*:mbit=1000,loss:link=0-2:p=0.3:rto_ms=5,seed=9";
    for (int N = 3; N <= 4; N++) {
        float *x = malloc((size_t)N * n * sizeof(float)), *buf = malloc(6 * (size_t)N * n * sizeof(float));
        CU_ASSERT_FATAL(x && buf);
        uint64_t st = 77 + (uint64_t)N;
        for (size_t i = 0; i < (size_t)N * n; i++) { // order-sensitive sums (1e8 + 1 - 1e8 ...)
            static const float v[] = {1e8f, 1.0f, -1e8f, 3.0f, -7.5e7f, 0.25f, 2.5e7f, -1.0f};
            uint64_t h = test_rng_next(&st);
            x[i] = v[h % 8] * (1.0f + (float)((h >> 40) & 1023) / 1024.0f);
        }
        float *plain[3], *faulty[3];
        for (int k = 0; k < 3; k++) {
            plain[k] = buf + (size_t)k * N * n;
            faulty[k] = buf + (size_t)(3 + k) * N * n;
        }
        comm_t *cs[MAXN];
        double b_plain, b_fault;
        CU_ASSERT_FATAL(inproc_group(cs, N, NULL) == 0);
        run_allreduces(cs, N, n, x, plain, &b_plain);
        destroy_all(cs, N);
        // inproc, then (N = 3) ZeroMQ, both wrapped: the same bits as unwrapped inproc
        for (int t = 0; t < (N == 3 ? 2 : 1); t++) {
            if (t == 0) CU_ASSERT_FATAL(inproc_group(cs, N, text) == 0);
            if (t == 1) CU_ASSERT_FATAL(zmq_group(cs, N, dir, "ar", text, 0xf) == 0);
            run_allreduces(cs, N, n, x, faulty, &b_fault);
            destroy_all(cs, N);
            for (int k = 0; k < 3; k++) CU_ASSERT(memcmp(plain[k], faulty[k], (size_t)N * n * sizeof(float)) == 0);
            CU_ASSERT(b_fault >= 4.0); // a barrier is a round trip of two 2 ms delays
        }
        free(x);
        free(buf);
    }
    test_rm_dir(dir);
}

// comm_ping (what calibration and benchmarks use) measures the emulated link.
typedef struct {
    int rc[2];
    double lat_us[2], bw[2];
} ping_job_t;

static void ping_body(comm_t *c, int r, void *arg) {
    ping_job_t *j = arg;
    j->rc[r] = comm_ping(c, 1 - r, 4, &j->lat_us[r], &j->bw[r], 10000);
}

static void test_ping_measures_link(void) {
    comm_t *cs[MAXN];
    fault_spec_t *spec = spec_of("delay:link=0-1:ms=3,bw:link=0-1:mbit=200");
    CU_ASSERT_FATAL(spec && inproc_group(cs, 2, fault_spec_text(spec)) == 0);
    fault_link_t p;
    fault_link_params(spec, 0, 1, &p);
    ping_job_t j = {{-1, -1}, {0, 0}, {0, 0}};
    test_run_ranks(cs, 2, ping_body, &j);
    CU_ASSERT(j.rc[0] == 0 && j.rc[1] == 0);
    CU_ASSERT(j.lat_us[0] >= p.delay_ms * 1000 && j.lat_us[0] == j.lat_us[1]);
    CU_ASSERT(j.bw[0] > 0 && j.bw[0] <= p.mbit * 1e6 / 8 * 1.5); // 25 MB/s, measured a little above at most
    destroy_all(cs, 2);
    fault_free(&spec);
}

// --- wrapper over ZeroMQ (ipc)

static void test_zmq_wrapper(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_FATAL(dir != NULL);
    comm_t *cs[MAXN];
    CU_ASSERT_FATAL(zmq_group(cs, 2, dir, "d", "delay:link=0-1:ms=5", 0x3) == 0);
    CU_ASSERT_STRING_EQUAL(comm_name(cs[1]), "zmq+fault");
    check_pingpong(cs, 5.0);
    check_frame_counts(cs);
    destroy_all(cs, 2);

    fault_spec_t *spec = spec_of("delay:link=*:ms=1:jitter=4,seed=2");
    CU_ASSERT_FATAL(spec && zmq_group(cs, 3, dir, "j", fault_spec_text(spec), 0x7) == 0);
    check_jitter_order(cs, spec);
    fault_free(&spec);
    destroy_all(cs, 3);

    CU_ASSERT_FATAL(zmq_group(cs, 2, dir, "b", "bw:link=0-1:mbit=100", 0x3) == 0);
    check_bw(cs);
    destroy_all(cs, 2);

    const char *text = "drop:link=0-1:p=0.3,seed=11";
    spec = spec_of(text);
    CU_ASSERT_FATAL(spec != NULL);
    uint64_t runs[2];
    for (int run = 0; run < 2; run++) {
        CU_ASSERT_FATAL(zmq_group(cs, 2, dir, run ? "x1" : "x0", text, 0x3) == 0);
        runs[run] = check_drop(cs, spec);
        destroy_all(cs, 2);
    }
    CU_ASSERT(runs[0] == runs[1] && runs[0] != 0);
    fault_free(&spec);

    text = "loss:link=0-1:p=0.3:rto_ms=40,seed=5";
    spec = spec_of(text);
    CU_ASSERT_FATAL(spec && zmq_group(cs, 2, dir, "l", text, 0x3) == 0);
    check_loss(cs, spec, 40.0);
    destroy_all(cs, 2);
    fault_free(&spec);

    CU_ASSERT_FATAL(zmq_group(cs, 2, dir, "h", "delay:link=0-1:ms=5", 0x1) == 0); // rank 1 raw
    check_hostile(cs);
    destroy_all(cs, 2);
    test_rm_dir(dir);
}

// --- suite

int test_fault_suite(void) {
    CU_pSuite s = CU_add_suite("fault", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "spec parse and canonical text", test_parse_roundtrip) ||
        !CU_add_test(s, "spec errors name the rule", test_parse_errors) ||
        !CU_add_test(s, "seeded decisions", test_decisions) ||
        !CU_add_test(s, "schedule kinds, triggers, disk, board entry", test_parse_events) ||
        !CU_add_test(s, "schedule errors name the rule", test_parse_event_errors) ||
        !CU_add_test(s, "board windows", test_board) ||
        !CU_add_test(s, "partition window drops, then loses the peer", test_partition_window) ||
        !CU_add_test(s, "rules follow nodes; counters go on", test_nodes_and_counters) ||
        !CU_add_test(s, "inproc delay, jitter order, bandwidth", test_inproc_delay) ||
        !CU_add_test(s, "inproc ANY due first, deadlines", test_inproc_any_and_deadline) ||
        !CU_add_test(s, "inproc drop and loss", test_inproc_drop_loss) ||
        !CU_add_test(s, "inproc hostile stamps", check_hostile_inproc) ||
        !CU_add_test(s, "all-reduce bits through wrapped comms", test_allreduce_bits) ||
        !CU_add_test(s, "comm_ping measures the emulated link", test_ping_measures_link) ||
        !CU_add_test(s, "zmq ipc wrapper", test_zmq_wrapper))
        return -1;
    return 0;
}
