// CUnit suite "rel": the reliable layer over a lossy (fault-wrapped) inproc comm: order, no duplicates and delivery under drops, an idle sender, a new epoch, the cost without loss.
#include <CUnit/CUnit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"
#include "test_util.h"
#include "transport/comm_inproc.h"
#include "transport/comm_rel.h"
#include "transport/fault.h"

// --- helpers

#define N_MSGS 400

static fault_spec_t *spec_of(const char *text) {
    fault_spec_t *s = NULL;
    char err[256] = "";
    if (fault_parse(text, &s, err, sizeof err) != 0) fprintf(stderr, "fault_parse(%s): %s\n", text, err);
    return s;
}

// Two (or n) inproc ranks, each wrapped raw by the spec (drops lost for good), then by the reliable layer.
static int lossy_group(comm_t **cs, int n, const char *text, const comm_rel_opts_t *ro) {
    if (comm_inproc_new_group(cs, n) != 0) return -1;
    fault_spec_t *s = spec_of(text);
    int rc = s ? 0 : -1;
    char err[256];
    for (int r = 0; rc == 0 && r < n; r++) rc = comm_fault_wrap(&cs[r], s, err, sizeof err);
    for (int r = 0; rc == 0 && r < n; r++) rc = comm_rel_wrap(&cs[r], ro, err, sizeof err);
    fault_free(&s);
    return rc;
}

static void destroy_all(comm_t **cs, int n) {
    for (int r = 0; r < n; r++) comm_destroy(&cs[r]);
}

// Message i: frames = 1 + i % COMM_MAX_FRAMES (so some fill every frame), frame k holds u32 i and
// u32 k, then i % 7 bytes of (i + k).
static int send_msg(comm_t *c, int peer, uint32_t i) {
    uint8_t buf[COMM_MAX_FRAMES][16];
    comm_iov_t f[COMM_MAX_FRAMES];
    const int n = 1 + (int)(i % COMM_MAX_FRAMES);
    for (int k = 0; k < n; k++) {
        memcpy(buf[k], &i, 4);
        const uint32_t kk = (uint32_t)k;
        memcpy(buf[k] + 4, &kk, 4);
        memset(buf[k] + 8, (int)(i + kk) & 0xff, 8);
        f[k] = (comm_iov_t){buf[k], 8 + i % 7};
    }
    return comm_send(c, peer, f, n, 5000);
}

// Whether m is message i, frames and bytes intact.
static bool is_msg(const comm_msg_t *m, uint32_t i) {
    if (m->n != 1 + (int)(i % COMM_MAX_FRAMES)) return false;
    for (int k = 0; k < m->n; k++) {
        uint32_t got, kk;
        if (m->len[k] != 8 + i % 7) return false;
        memcpy(&got, m->data[k], 4);
        memcpy(&kk, (uint8_t *)m->data[k] + 4, 4);
        if (got != i || kk != (uint32_t)k) return false;
        for (size_t b = 8; b < m->len[k]; b++)
            if (((uint8_t *)m->data[k])[b] != (uint8_t)((i + kk) & 0xff)) return false;
    }
    return true;
}

typedef struct {
    int in_order;                   // messages received as expected, in order
    int wrong;                      // out of order, duplicated or damaged
    int after;                      // anything after the last one (a duplicate)
    int send_fail;
} stream_t;

// Rank 1 streams N_MSGS messages to rank 0 and then answers one "done"; rank 0 checks them.
static void stream_rank(comm_t *c, int rank, void *arg) {
    stream_t *s = arg;
    if (rank == 1) {
        for (uint32_t i = 0; i < N_MSGS; i++) s->send_fail += send_msg(c, 0, i) != 0;
        comm_msg_t m;
        if (comm_recv(c, 0, &m, NULL, 20000) == 0) comm_msg_free(&m); // the receiver's "done"
        return;
    }
    for (uint32_t i = 0; i < N_MSGS; i++) {
        comm_msg_t m;
        int from = -1;
        if (comm_recv(c, 1, &m, &from, 20000) != 0) break;
        if (is_msg(&m, i) && from == 1) s->in_order++;
        else s->wrong++;
        comm_msg_free(&m);
    }
    comm_msg_t m;
    while (comm_recv(c, 1, &m, NULL, 300) == 0) {
        s->after++;
        comm_msg_free(&m);
    }
    comm_send1(c, 1, "done", 4, 1000);
}

// --- tests

// 5% and 20% drops in both directions (acknowledgements too): every message arrives once, in order,
// frames intact, and some were sent again; the raw wrapper alone loses them.
static void test_order_under_drops(void) {
    const char *specs[] = {"drop:link=0-1:p=0.05,seed=3", "drop:link=0-1:p=0.2,seed=4"};
    for (int k = 0; k < 2; k++) {
        comm_t *cs[2];
        CU_ASSERT_FATAL(lossy_group(cs, 2, specs[k], NULL) == 0);
        CU_ASSERT_STRING_EQUAL(comm_name(cs[0]), "inproc+fault+rel");
        stream_t s = {0};
        const double t0 = mlm_now_ms();
        test_run_ranks(cs, 2, stream_rank, &s);
        comm_rel_stats_t a, b;
        comm_rel_stats(cs[1], &a);
        comm_rel_stats(cs[0], &b);
        fprintf(stderr, "\n  %s: %d in order, %d wrong, %d after, %.0f ms; sender: %llu sent, %llu again, srtt %.2f ms, "
                        "rto %.1f ms; receiver: %llu duplicates, %llu held, %llu acks ",
                specs[k], s.in_order, s.wrong, s.after, mlm_now_ms() - t0, (unsigned long long)a.sent,
                (unsigned long long)a.resent, a.srtt_ms, a.rto_ms, (unsigned long long)b.dups, (unsigned long long)b.held,
                (unsigned long long)b.acks);
        CU_ASSERT_EQUAL(s.in_order, N_MSGS);
        CU_ASSERT_EQUAL(s.wrong, 0);
        CU_ASSERT_EQUAL(s.after, 0);
        CU_ASSERT_EQUAL(s.send_fail, 0);
        CU_ASSERT_EQUAL(a.sent, N_MSGS);
        CU_ASSERT(a.resent > 0); // drops did happen and were made good
        CU_ASSERT_EQUAL(b.delivered, N_MSGS);
        destroy_all(cs, 2);
    }
    // the same stream over the raw wrapper loses messages (the test above means something)
    comm_t *cs[2];
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
    fault_spec_t *sp = spec_of("drop:link=0-1:p=0.2,seed=4");
    for (int r = 0; r < 2; r++) CU_ASSERT_FATAL(comm_fault_wrap(&cs[r], sp, NULL, 0) == 0);
    int got = 0;
    for (uint32_t i = 0; i < 100; i++) CU_ASSERT_EQUAL(send_msg(cs[1], 0, i), 0);
    comm_msg_t m;
    while (comm_recv(cs[0], 1, &m, NULL, 100) == 0) got++, comm_msg_free(&m);
    CU_ASSERT(got > 50 && got < 100);
    destroy_all(cs, 2);
    fault_free(&sp);
}

// A sender that goes quiet after its message was dropped (it waits on nothing, as a worker back on
// its control link): the background sender sends it again within the timeout, and with no thread
// the message stays lost until the sender makes a call.
static void test_idle_sender(void) {
    // seed whose first message 1 -> 0 is dropped
    const char *text = NULL;
    char buf[64];
    for (int seed = 0; seed < 200 && !text; seed++) {
        snprintf(buf, sizeof buf, "drop:link=0-1:p=0.5,seed=%d", seed);
        fault_spec_t *s = spec_of(buf);
        fault_decision_t d;
        fault_decide(s, 1, 0, 0, &d);
        if (d.drop) text = buf;
        fault_free(&s);
    }
    CU_ASSERT_FATAL(text != NULL);
    for (int thread = 1; thread >= 0; thread--) {
        comm_t *cs[2];
        const comm_rel_opts_t ro = {.no_thread = !thread, .rto_init_ms = 50};
        CU_ASSERT_FATAL(lossy_group(cs, 2, text, &ro) == 0);
        CU_ASSERT_EQUAL(send_msg(cs[1], 0, 7), 0);
        comm_msg_t m;
        const double t0 = mlm_now_ms();
        int rc = comm_recv(cs[0], 1, &m, NULL, 1500);
        const double took = mlm_now_ms() - t0;
        if (thread) {
            CU_ASSERT_EQUAL_FATAL(rc, 0);
            CU_ASSERT(is_msg(&m, 7));
            CU_ASSERT(took >= 40 && took < 1000); // one timeout (the first copy was dropped), not a deadline
            comm_msg_free(&m);
        } else {
            CU_ASSERT_EQUAL(rc, MLM_ETIMEOUT);
            // the sender's next call sends it again
            comm_msg_t none;
            CU_ASSERT_EQUAL(comm_recv(cs[1], 0, &none, NULL, 10), MLM_ETIMEOUT);
            CU_ASSERT_EQUAL(comm_recv(cs[0], 1, &m, NULL, 1000), 0);
            CU_ASSERT(is_msg(&m, 7));
            comm_msg_free(&m);
        }
        destroy_all(cs, 2);
    }
}

// A new wrapper at a rank (a worker greeted again) starts a new epoch: its peer takes it from its
// first message on; a plain message from a peer that spoke the layer resets it; both go on in order.
static void test_new_epoch(void) {
    comm_t *cs[2];
    CU_ASSERT_FATAL(lossy_group(cs, 2, "drop:link=0-1:p=0.1,seed=9", NULL) == 0);
    for (uint32_t i = 0; i < 20; i++) CU_ASSERT_EQUAL(send_msg(cs[1], 0, i), 0);
    comm_msg_t m;
    for (uint32_t i = 0; i < 20; i++) {
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 5000), 0);
        CU_ASSERT(is_msg(&m, i));
        comm_msg_free(&m);
    }
    // rank 1 drops its layer: a plain message, then a new layer
    CU_ASSERT_EQUAL(comm_rel_unwrap(&cs[1]), 0);
    CU_ASSERT_PTR_NULL(comm_rel_inner(cs[1]));
    CU_ASSERT_EQUAL(send_msg(cs[1], 0, 100), 0); // plain (may be dropped: the raw wrapper)
    CU_ASSERT_EQUAL(comm_rel_wrap(&cs[1], NULL, NULL, 0), 0);
    for (uint32_t i = 200; i < 230; i++) CU_ASSERT_EQUAL(send_msg(cs[1], 0, i), 0);
    uint32_t want = 200;
    int plain = 0, bad = 0;
    while (want < 230 && comm_recv(cs[0], 1, &m, NULL, 5000) == 0) {
        if (is_msg(&m, 100)) plain++;
        else if (is_msg(&m, want)) want++;
        else bad++;
        comm_msg_free(&m);
    }
    CU_ASSERT_EQUAL(want, 230);
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT(plain <= 1);
    // and the other way, to the new wrapper
    for (uint32_t i = 300; i < 320; i++) CU_ASSERT_EQUAL(send_msg(cs[0], 1, i), 0);
    for (uint32_t i = 300; i < 320; i++) {
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[1], 0, &m, NULL, 5000), 0);
        CU_ASSERT(is_msg(&m, i));
        comm_msg_free(&m);
    }
    destroy_all(cs, 2);
}

// Without loss: nothing is sent again and each message costs its header; the bytes on the inner
// comm are the caller's plus COMM_REL_HEADER_BYTES per message plus the acknowledgements. Collectives
// run over the layer and give the same bits.
static void ar_rank(comm_t *c, int rank, void *arg) {
    float *out = arg;
    float v[64];
    for (int i = 0; i < 64; i++) v[i] = (float)(rank + 1) * 0.1f + (float)i;
    if (comm_allreduce_f32(c, v, 64, COMM_ALGO_RING, 5000) == 0) memcpy(out + rank * 64, v, sizeof v);
}

static void test_cost_without_loss(void) {
    CU_ASSERT_EQUAL(COMM_REL_HEADER_BYTES, 28);
    comm_t *cs[3];
    // (timeouts far beyond the test: the receiver reads only after all 50 sends, and a copy sent
    // again to a receiver that is busy elsewhere is by design, not a cost of the fault-free path)
    const comm_rel_opts_t slow_rto = {.rto_init_ms = 60000, .rto_min_ms = 60000, .rto_max_ms = 60000};
    CU_ASSERT_FATAL(lossy_group(cs, 2, "delay:link=0-1:ms=0", &slow_rto) == 0);
    comm_counters_t before, after;
    comm_get_counters(comm_rel_inner(cs[1]), &before);
    for (uint32_t i = 0; i < 50; i++) CU_ASSERT_EQUAL(comm_send1(cs[1], 0, "0123456789", 10, 1000), 0);
    comm_msg_t m;
    for (uint32_t i = 0; i < 50; i++) {
        CU_ASSERT_EQUAL_FATAL(comm_recv(cs[0], 1, &m, NULL, 1000), 0);
        CU_ASSERT(m.n == 1 && m.len[0] == 10 && memcmp(m.data[0], "0123456789", 10) == 0);
        comm_msg_free(&m);
    }
    comm_get_counters(comm_rel_inner(cs[1]), &after);
    comm_rel_stats_t st;
    comm_rel_stats(cs[1], &st);
    CU_ASSERT_EQUAL(st.resent, 0);
    // what the layer hands the comm below: the caller's bytes and a header per message (the fault
    // wrapper then adds its stamp, as it does without the layer)
    CU_ASSERT_EQUAL(after.msgs_sent - before.msgs_sent, 50u);
    CU_ASSERT_EQUAL(after.bytes_sent - before.bytes_sent, 50u * (10 + COMM_REL_HEADER_BYTES));
    destroy_all(cs, 2);
    // an all-reduce over the layer: the same bits as over plain inproc
    float got[3 * 64] = {0}, want[3 * 64] = {0};
    CU_ASSERT_FATAL(lossy_group(cs, 3, "drop:link=*:p=0.1,seed=2", NULL) == 0);
    test_run_ranks(cs, 3, ar_rank, got);
    destroy_all(cs, 3);
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 3) == 0);
    test_run_ranks(cs, 3, ar_rank, want);
    destroy_all(cs, 3);
    CU_ASSERT(memcmp(got, want, sizeof got) == 0);
    CU_ASSERT(want[0] != 0);
}

// The cluster's wrap: fault_wrap_opts_t.reliable puts the layer on top only when the spec can lose
// messages, and comm_fault_inner / comm_fault_unwrap see through it.
static void test_wrap_opts(void) {
    comm_t *cs[2];
    const fault_wrap_opts_t wo = {.reliable = true};
    fault_spec_t *drop = spec_of("drop:link=0-1:p=0.3,seed=1"), *delay = spec_of("delay:link=0-1:ms=1");
    CU_ASSERT_FATAL(drop && delay && comm_inproc_new_group(cs, 2) == 0);
    for (int r = 0; r < 2; r++) CU_ASSERT_FATAL(comm_fault_wrap_opts(&cs[r], drop, &wo, NULL, 0) == 0);
    CU_ASSERT_STRING_EQUAL(comm_name(cs[0]), "inproc+fault+rel");
    bool lost = true;
    const comm_t *in = comm_fault_inner(cs[0], 1, &lost);
    CU_ASSERT(in != NULL && strcmp(comm_name(in), "inproc") == 0 && !lost);
    CU_ASSERT_EQUAL(comm_fault_unwrap(&cs[0]), 0);
    CU_ASSERT_STRING_EQUAL(comm_name(cs[0]), "inproc");
    destroy_all(cs, 2);
    CU_ASSERT_FATAL(comm_inproc_new_group(cs, 2) == 0);
    CU_ASSERT_FATAL(comm_fault_wrap_opts(&cs[0], delay, &wo, NULL, 0) == 0);
    CU_ASSERT_STRING_EQUAL(comm_name(cs[0]), "inproc+fault"); // nothing to lose: no layer, no header
    destroy_all(cs, 2);
    fault_free(&drop);
    fault_free(&delay);
}

// --- registration

int test_rel_suite(void) {
    CU_pSuite s = CU_add_suite("rel", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "order, no duplicates, delivery under 5% and 20% drops", test_order_under_drops) ||
        !CU_add_test(s, "an idle sender's dropped message is sent again", test_idle_sender) ||
        !CU_add_test(s, "a new epoch and a plain message reset a peer", test_new_epoch) ||
        !CU_add_test(s, "the cost without loss; collectives over the layer", test_cost_without_loss) ||
        !CU_add_test(s, "the cluster's wrap option", test_wrap_opts))
        return -1;
    return 0;
}
