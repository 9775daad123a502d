// CUnit suite "proto": wire codec round trips, exact prefix bytes, and refusal of malformed messages.
#include <CUnit/CUnit.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlm.pb-c.h"
#include "proto/msg.h"
#include "core/err.h"
#include "worker/kernels/quant.h"

// --- helpers

// Frames copied into fresh heap blocks, the way a transport delivers them.
static void copy_frames(const msg_buf_t *b, comm_msg_t *out) {
    memset(out, 0, sizeof *out);
    out->n = b->n;
    for (int i = 0; i < b->n; i++) {
        out->data[i] = malloc(b->iov[i].len ? b->iov[i].len : 1);
        memcpy(out->data[i], b->iov[i].ptr, b->iov[i].len);
        out->len[i] = b->iov[i].len;
    }
}

static void free_frames(comm_msg_t *m) {
    for (int i = 0; i < m->n && i < COMM_MAX_FRAMES; i++) free(m->data[i]);
    memset(m, 0, sizeof *m);
}

// Encodes in, copies the frames, decodes into out. frames must be freed by the caller (raw
// payload pointers in out point into them).
static int roundtrip(const msg_t *in, msg_t *out, comm_msg_t *frames) {
    msg_buf_t b;
    char err[256] = "";
    int rc = msg_encode(in, NULL, &b, err, sizeof err);
    if (rc) {
        fprintf(stderr, "encode: %s\n", err);
        msg_buf_free(&b);
        memset(frames, 0, sizeof *frames);
        return rc;
    }
    copy_frames(&b, frames);
    msg_buf_free(&b);
    rc = msg_decode(frames, NULL, out, err, sizeof err);
    if (rc) fprintf(stderr, "decode: %s\n", err);
    return rc;
}

// A message built from a hand-made header: prefix (magic, version, type, n_raw) + header + raw frames.
static void hand_msg(comm_msg_t *m, unsigned char *prefix, unsigned major, unsigned minor, unsigned type,
                     const void *hdr, size_t hlen, int n_raw, void *const *raw, const size_t *raw_len) {
    memcpy(prefix, "MLMP", 4);
    prefix[4] = (unsigned char)major;
    prefix[5] = (unsigned char)(major >> 8);
    prefix[6] = (unsigned char)minor;
    prefix[7] = (unsigned char)(minor >> 8);
    prefix[8] = (unsigned char)type;
    prefix[9] = (unsigned char)(type >> 8);
    prefix[10] = (unsigned char)n_raw;
    prefix[11] = 0;
    memset(m, 0, sizeof *m);
    m->n = 2 + n_raw;
    m->data[0] = prefix;
    m->len[0] = MSG_PREFIX_LEN;
    m->data[1] = (void *)hdr;
    m->len[1] = hlen;
    for (int i = 0; i < n_raw; i++) {
        m->data[2 + i] = raw[i];
        m->len[2 + i] = raw_len[i];
    }
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void fill_hello(msg_t *m) {
    msg_init(m, MSG_HELLO);
    msg_hello_t *h = &m->hello;
    strcpy(h->node_id, "worker-7");
    h->role = MSG_ROLE_WORKER;
    strcpy(h->endpoint, "tcp://10.0.0.7:5601");
    h->n_cores = 2;
    h->ram_budget_bytes = 24ull << 30;
    h->n_speeds = 3;
    h->speeds[0] = (msg_speed_t){QT_Q4_0, 61.5f};
    h->speeds[1] = (msg_speed_t){QT_Q8_0, 48.25f};
    h->speeds[2] = (msg_speed_t){QT_Q6_K, 33.0f};
    h->mem_bw_bytes_s = 71000000000ull;
    h->disk_read_bw_bytes_s = 2100000000ull;
    h->has_model = true;
    for (int i = 0; i < MSG_SHA256_LEN; i++) h->model_sha256[i] = (uint8_t)(0xa0 + i);
    h->model_size = 637000000ull;
}

// A 3-node plan over a TinyLlama-like model with 8 experts (nodes[] must outlive m).
static void fill_plan(msg_t *m, msg_plan_node_t *nodes) {
    msg_init(m, MSG_PLAN);
    msg_plan_t *p = &m->plan;
    p->plan_id = 0x1122334455667788ull;
    for (int i = 0; i < MSG_SHA256_LEN; i++) p->model_sha256[i] = (uint8_t)(255 - i);
    p->n_layer = 22;
    p->n_head = 32;
    p->n_head_kv = 4;
    p->n_ff = 5632;
    p->n_expert = 8;
    p->n_ctx = 2048;
    p->kv_type = QT_F16;
    p->n_threads = 2;
    p->n_nodes = 3;
    memset(nodes, 0, 3 * sizeof *nodes);
    int hb[4] = {0, 12, 22, 32}, fb[4] = {0, 2048, 3840, 5632};
    for (int i = 0; i < 3; i++) {
        msg_plan_node_t *n = &nodes[i];
        n->index = (uint32_t)i;
        snprintf(n->node_id, sizeof n->node_id, "w%d", i);
        snprintf(n->endpoint, sizeof n->endpoint, "tcp://10.0.0.%d:5601", i + 1);
        n->layers = (msg_range_t){0, 22};
        n->heads = (msg_range_t){hb[i], hb[i + 1]};
        n->kv_heads = (msg_range_t){hb[i] / 8, (hb[i + 1] + 7) / 8};
        n->n_ffn = 2;
        n->ffn[0] = (msg_range_t){fb[i], fb[i + 1] - 64};
        n->ffn[1] = (msg_range_t){fb[i + 1] - 64, fb[i + 1]};
        n->n_experts = 3 - i;
        for (int j = 0; j < n->n_experts; j++) n->experts[j] = (uint16_t)(7 - j - 2 * i);
        n->n_block_experts = i; // 1.9: second copies of single blocks
        for (int j = 0; j < i; j++) n->block_experts[j] = (uint32_t)(21 - j) << 8 | (uint32_t)j;
    }
    p->nodes = nodes;
}

static void fill_tensor(msg_tensor_t *t, int32_t type, int n_dims, const int64_t *ne, void *data) {
    memset(t, 0, sizeof *t);
    t->type = type;
    t->n_dims = n_dims;
    for (int i = 0; i < MSG_MAX_DIMS; i++) t->ne[i] = i < n_dims ? ne[i] : 1;
    t->nbytes = qtype_row_size((qtype_t)type, ne[0]);
    for (int i = 1; i < n_dims; i++) t->nbytes *= (uint64_t)ne[i];
    t->data = data;
}

static void check_tensor_eq(const msg_tensor_t *a, const msg_tensor_t *b) {
    CU_ASSERT_EQUAL(a->type, b->type);
    CU_ASSERT_EQUAL(a->n_dims, b->n_dims);
    for (int i = 0; i < a->n_dims; i++) CU_ASSERT_EQUAL(a->ne[i], b->ne[i]);
    CU_ASSERT_EQUAL(a->nbytes, b->nbytes);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b->data);
    CU_ASSERT_PTR_NOT_EQUAL(a->data, b->data); // a copy arrived, not the sender's buffer
    CU_ASSERT(memcmp(a->data, b->data, a->nbytes) == 0);
}

// --- round trips

static void test_roundtrip_hello(void) {
    msg_t a, b;
    comm_msg_t f;
    fill_hello(&a);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_HELLO);
    CU_ASSERT_EQUAL(b.peer_major, MSG_PROTO_MAJOR);
    CU_ASSERT_EQUAL(b.peer_minor, MSG_PROTO_MINOR);
    CU_ASSERT_EQUAL(b.hello.proto_major, MSG_PROTO_MAJOR);
    CU_ASSERT_EQUAL(b.hello.proto_minor, MSG_PROTO_MINOR);
    CU_ASSERT_STRING_EQUAL(b.hello.node_id, "worker-7");
    CU_ASSERT_EQUAL(b.hello.role, MSG_ROLE_WORKER);
    CU_ASSERT_STRING_EQUAL(b.hello.endpoint, "tcp://10.0.0.7:5601");
    CU_ASSERT_EQUAL(b.hello.n_cores, 2);
    CU_ASSERT_EQUAL(b.hello.ram_budget_bytes, 24ull << 30);
    CU_ASSERT_EQUAL_FATAL(b.hello.n_speeds, 3);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(b.hello.speeds[i].type, a.hello.speeds[i].type);
        CU_ASSERT_EQUAL(b.hello.speeds[i].gflops, a.hello.speeds[i].gflops);
    }
    CU_ASSERT_EQUAL(b.hello.mem_bw_bytes_s, 71000000000ull);
    CU_ASSERT_EQUAL(b.hello.disk_read_bw_bytes_s, 2100000000ull);
    CU_ASSERT(b.hello.has_model);
    CU_ASSERT(memcmp(b.hello.model_sha256, a.hello.model_sha256, MSG_SHA256_LEN) == 0);
    CU_ASSERT_EQUAL(b.hello.model_size, 637000000ull);
    msg_clear(&b);
    free_frames(&f);

    // without the model file: no hash, no size
    fill_hello(&a);
    a.hello.has_model = false;
    a.hello.model_size = 0;
    a.hello.n_speeds = 0;
    a.hello.endpoint[0] = 0;
    a.hello.role = MSG_ROLE_STANDBY;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT(!b.hello.has_model);
    CU_ASSERT_EQUAL(b.hello.n_speeds, 0);
    CU_ASSERT_STRING_EQUAL(b.hello.endpoint, "");
    CU_ASSERT_EQUAL(b.hello.role, MSG_ROLE_STANDBY);
    msg_clear(&b);
    free_frames(&f);
}

static void test_roundtrip_hello_ack(void) {
    msg_t a, b;
    comm_msg_t f;
    msg_init(&a, MSG_HELLO_ACK);
    CU_ASSERT_EQUAL(a.hello_ack.node_index, -1);
    a.hello_ack.accepted = false;
    strcpy(a.hello_ack.reason, "protocol version mismatch: peer speaks 2.0, this node speaks 1.0");
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_HELLO_ACK);
    CU_ASSERT(!b.hello_ack.accepted);
    CU_ASSERT_STRING_EQUAL(b.hello_ack.reason, a.hello_ack.reason);
    CU_ASSERT_EQUAL(b.hello_ack.proto_major, MSG_PROTO_MAJOR);
    CU_ASSERT_EQUAL(b.hello_ack.proto_minor, MSG_PROTO_MINOR);
    CU_ASSERT_EQUAL(b.hello_ack.node_index, -1);
    msg_clear(&b);
    free_frames(&f);

    a.hello_ack.accepted = true;
    a.hello_ack.reason[0] = 0;
    a.hello_ack.node_index = 3;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT(b.hello_ack.accepted);
    CU_ASSERT_EQUAL(b.hello_ack.node_index, 3);
    msg_clear(&b);
    free_frames(&f);
}

static void test_roundtrip_plan(void) {
    msg_t a, b;
    comm_msg_t f;
    msg_plan_node_t nodes[3];
    fill_plan(&a, nodes);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(f.n, 2);
    const msg_plan_t *p = &b.plan, *q = &a.plan;
    CU_ASSERT_EQUAL(p->plan_id, q->plan_id);
    CU_ASSERT(memcmp(p->model_sha256, q->model_sha256, MSG_SHA256_LEN) == 0);
    CU_ASSERT_EQUAL(p->n_layer, 22);
    CU_ASSERT_EQUAL(p->n_head, 32);
    CU_ASSERT_EQUAL(p->n_head_kv, 4);
    CU_ASSERT_EQUAL(p->n_ff, 5632);
    CU_ASSERT_EQUAL(p->n_expert, 8);
    CU_ASSERT_EQUAL(p->n_ctx, 2048);
    CU_ASSERT_EQUAL(p->kv_type, QT_F16);
    CU_ASSERT_EQUAL(p->n_threads, 2);
    CU_ASSERT_EQUAL_FATAL(p->n_nodes, 3);
    CU_ASSERT_PTR_NOT_EQUAL(p->nodes, q->nodes);
    for (int i = 0; i < 3; i++) {
        const msg_plan_node_t *x = &p->nodes[i], *y = &q->nodes[i];
        CU_ASSERT_EQUAL(x->index, (uint32_t)i);
        CU_ASSERT_STRING_EQUAL(x->node_id, y->node_id);
        CU_ASSERT_STRING_EQUAL(x->endpoint, y->endpoint);
        CU_ASSERT(x->layers.begin == y->layers.begin && x->layers.end == y->layers.end);
        CU_ASSERT(x->heads.begin == y->heads.begin && x->heads.end == y->heads.end);
        CU_ASSERT(x->kv_heads.begin == y->kv_heads.begin && x->kv_heads.end == y->kv_heads.end);
        CU_ASSERT_EQUAL_FATAL(x->n_ffn, 2);
        for (int j = 0; j < 2; j++) CU_ASSERT(x->ffn[j].begin == y->ffn[j].begin && x->ffn[j].end == y->ffn[j].end);
        CU_ASSERT_EQUAL_FATAL(x->n_experts, y->n_experts);
        for (int j = 0; j < x->n_experts; j++) CU_ASSERT_EQUAL(x->experts[j], y->experts[j]);
        CU_ASSERT_EQUAL_FATAL(x->n_block_experts, i);
        for (int j = 0; j < i; j++) CU_ASSERT_EQUAL(x->block_experts[j], y->block_experts[j]);
    }
    CU_ASSERT_EQUAL(p->nodes[2].block_experts[1], (uint32_t)20 << 8 | 1);
    CU_ASSERT_EQUAL(p->nodes[1].heads.begin, 12);
    CU_ASSERT_EQUAL(p->nodes[2].ffn[1].end, 5632);
    msg_clear(&b);
    CU_ASSERT_PTR_NULL(b.alloc_);
    free_frames(&f);

    // a dense model, one node holding everything, no experts
    fill_plan(&a, nodes);
    a.plan.n_expert = 0;
    a.plan.n_nodes = 1;
    nodes[0].n_experts = 0;
    nodes[0].heads = (msg_range_t){0, 32};
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.plan.n_nodes, 1);
    CU_ASSERT_EQUAL(b.plan.nodes[0].n_experts, 0);
    CU_ASSERT_EQUAL(b.plan.nodes[0].heads.end, 32);
    msg_clear(&b);
    free_frames(&f);
}

// 1.6: each node's CurveZMQ key travels in the plan; a plan without keys (what 1.5 sends, and what a
// coordinator without keys sends) decodes with every key empty; a key that is not 40 Z85 characters
// is refused on both ends.
static void test_plan_curve_key(void) {
    static const char *keys[3] = {">v}rjwP%<C*Yn:ZM1F2taxy[bo=}LDk+?aXnn?%N", "Q(vGDOo=Vab.YZ+.pH1mzWHK[u9Z3H.hrM0>wJ4)",
                                  "/<A2:k6y{=t{V##fwA$n1jqmNc%3x]ih<^$eSUAD"}; // from meshlm keygen
    msg_t a, b;
    comm_msg_t f;
    msg_plan_node_t nodes[3];
    fill_plan(&a, nodes);
    for (int i = 0; i < 3; i++) snprintf(nodes[i].curve_key, sizeof nodes[i].curve_key, "%s", keys[i]);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.peer_minor, MSG_PROTO_MINOR);
    for (int i = 0; i < 3; i++) CU_ASSERT_STRING_EQUAL(b.plan.nodes[i].curve_key, keys[i]);
    Meshlm__Plan *pb = meshlm__plan__unpack(NULL, f.len[1], f.data[1]);
    CU_ASSERT_PTR_NOT_NULL_FATAL(pb);
    CU_ASSERT_STRING_EQUAL(pb->nodes[2]->curve_key, keys[2]);
    meshlm__plan__free_unpacked(pb, NULL);
    msg_clear(&b);
    free_frames(&f);

    // no keys: the field is not on the wire (a plan as 1.5 sent it), and it reads back empty
    fill_plan(&a, nodes);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    for (int i = 0; i < 3; i++) CU_ASSERT_STRING_EQUAL(b.plan.nodes[i].curve_key, "");
    pb = meshlm__plan__unpack(NULL, f.len[1], f.data[1]);
    CU_ASSERT_PTR_NOT_NULL_FATAL(pb);
    char *own0 = pb->nodes[0]->curve_key, *own1 = pb->nodes[1]->curve_key; // freed by free_unpacked
    const size_t plain = meshlm__plan__get_packed_size(pb);
    CU_ASSERT_EQUAL(plain, f.len[1]);
    pb->nodes[0]->curve_key = (char *)keys[0]; // field 13 of a node: a key byte, a length byte and 40 bytes
    CU_ASSERT_EQUAL(meshlm__plan__get_packed_size(pb), plain + 42);
    // a 1.5 peer's plan (its prefix says minor 5) decodes with the same empty keys
    unsigned char hdr[4096], prefix[MSG_PREFIX_LEN];
    pb->nodes[0]->curve_key = (char *)"";
    size_t hl = meshlm__plan__pack(pb, hdr);
    comm_msg_t h;
    msg_t m;
    char err[256];
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 5, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.peer_minor, 5);
    CU_ASSERT_EQUAL(m.plan.n_nodes, 3);
    for (int i = 0; i < m.plan.n_nodes; i++) CU_ASSERT_STRING_EQUAL(m.plan.nodes[i].curve_key, "");
    msg_clear(&m);
    // a key that is not Z85 text of 40 characters is refused when received ...
    pb->nodes[1]->curve_key = (char *)">v}rjwP%<C*Yn:ZM1F2taxy[bo=}LDk+?aXnn?%"; // 39 characters
    hl = meshlm__plan__pack(pb, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "nodes[1].curve_key"));
    pb->nodes[1]->curve_key = (char *)">v}rjwP%<C*Yn:ZM1F2taxy[bo=}LDk+?aXnn?%Nx"; // 41: longer than the field
    hl = meshlm__plan__pack(pb, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_NOT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    pb->nodes[0]->curve_key = own0;
    pb->nodes[1]->curve_key = own1;
    meshlm__plan__free_unpacked(pb, NULL);
    msg_clear(&b);
    free_frames(&f);
    // ... and when sent (a space is not Z85)
    fill_plan(&a, nodes);
    snprintf(nodes[2].curve_key, sizeof nodes[2].curve_key, "%s", ">v}rjwP%<C*Yn:ZM1F2taxy[bo=}LDk+?aXnn? N");
    msg_buf_t mb;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &mb, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&mb);
}

// Protocol 1.5: the plan's attention/KV device travels; a plan without one leaves the field off the
// wire (what a 1.4 peer sends, and a 1.4 peer ignores the field), and a spaced name is refused.
static void test_plan_kv_device(void) {
    msg_t a, b;
    comm_msg_t f;
    msg_plan_node_t nodes[3];
    fill_plan(&a, nodes);
    snprintf(a.plan.kv_device, sizeof a.plan.kv_device, "%s", "file:/tmp/kv");
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_STRING_EQUAL(b.plan.kv_device, "file:/tmp/kv");
    const size_t with = f.len[1];
    msg_clear(&b);
    free_frames(&f);
    fill_plan(&a, nodes);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_STRING_EQUAL(b.plan.kv_device, "");
    CU_ASSERT_EQUAL(with, f.len[1] + 3 + strlen("file:/tmp/kv")); // 2-byte key (field 17), length, bytes
    msg_clear(&b);
    free_frames(&f);
    fill_plan(&a, nodes);
    snprintf(a.plan.kv_device, sizeof a.plan.kv_device, "%s", "file:/a dir");
    char err[256];
    msg_buf_t bb;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &bb, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "kv_device"));
    msg_buf_free(&bb);
}

// Protocol 1.4: the plan's tensor-parallel mode and every node's link figures travel; an exact plan
// with unknown links is what 1.3 sent (proto3 leaves default fields out), and a 1.3 plan (no such
// fields) reads as exact with unknown links.
static void test_plan_tp_mode(void) {
    msg_t a, b;
    comm_msg_t f;
    msg_plan_node_t nodes[3];
    fill_plan(&a, nodes);
    a.plan.tp_mode = MSG_TP_ALLREDUCE;
    a.plan.n_embd = 2048;
    for (int i = 0; i < 3; i++) {
        nodes[i].hidden = (msg_range_t){0, 2048};
        nodes[i].link_lat_us = 250.5f + (float)i;
        nodes[i].link_bw = 125000000ull * (uint64_t)(i + 1);
    }
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.plan.tp_mode, MSG_TP_ALLREDUCE);
    for (int i = 0; i < 3; i++) {
        CU_ASSERT_EQUAL(b.plan.nodes[i].link_lat_us, 250.5f + (float)i);
        CU_ASSERT_EQUAL(b.plan.nodes[i].link_bw, 125000000ull * (uint64_t)(i + 1));
        CU_ASSERT(b.plan.nodes[i].hidden.begin == 0 && b.plan.nodes[i].hidden.end == 2048);
    }
    msg_clear(&b);
    free_frames(&f);

    // exact, no links: the header carries neither field (what a 1.3 peer sends and reads)
    fill_plan(&a, nodes);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.plan.tp_mode, MSG_TP_EXACT);
    Meshlm__Plan *pb = meshlm__plan__unpack(NULL, f.len[1], f.data[1]);
    CU_ASSERT_PTR_NOT_NULL_FATAL(pb);
    CU_ASSERT_EQUAL(pb->tp_mode, MESHLM__TP_MODE__TP_MODE_EXACT);
    CU_ASSERT_EQUAL(pb->nodes[0]->link_bw, 0u);
    // neither 1.4 field is on the wire: setting them lengthens the header (field 16: a 2-byte key and
    // the value; field 12 of a node: a key and the value, and its node's length byte is unchanged)
    CU_ASSERT_EQUAL(meshlm__plan__get_packed_size(pb), f.len[1]);
    pb->tp_mode = MESHLM__TP_MODE__TP_MODE_ALLREDUCE;
    CU_ASSERT_EQUAL(meshlm__plan__get_packed_size(pb), f.len[1] + 3);
    pb->tp_mode = MESHLM__TP_MODE__TP_MODE_EXACT;
    pb->nodes[0]->link_bw = 1;
    CU_ASSERT_EQUAL(meshlm__plan__get_packed_size(pb), f.len[1] + 2);
    meshlm__plan__free_unpacked(pb, NULL);
    msg_clear(&b);
    free_frames(&f);

    // a 1.3 peer's plan (its prefix says minor 3, its header has no tp_mode): exact, links unknown
    Meshlm__Range lr = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 22};
    Meshlm__Range hr = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 32};
    Meshlm__Range kr = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 4};
    Meshlm__PlanNode pn, *pnp = &pn;
    meshlm__plan_node__init(&pn);
    pn.layers = &lr;
    pn.heads = &hr;
    pn.kv_heads = &kr;
    uint8_t sha[32] = {7};
    Meshlm__Plan pl = MESHLM__PLAN__INIT;
    pl.model_sha256.len = 32;
    pl.model_sha256.data = sha;
    pl.node_count = 1;
    pl.n_nodes = 1;
    pl.nodes = &pnp;
    pl.n_ctx = 512;
    pl.kv_type = QT_F16;
    pl.n_layer = 22;
    pl.n_head = 32;
    pl.n_head_kv = 4;
    pl.n_ff = 5632;
    unsigned char hdr[1024], prefix[MSG_PREFIX_LEN];
    comm_msg_t h;
    msg_t m;
    char err[256];
    size_t hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 3, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.peer_minor, 3);
    CU_ASSERT_EQUAL(m.plan.tp_mode, MSG_TP_EXACT);
    CU_ASSERT_EQUAL(m.plan.nodes[0].link_lat_us, 0.0f);
    CU_ASSERT_EQUAL(m.plan.nodes[0].link_bw, 0u);
    msg_clear(&m);
    // a mode this version does not know (a newer peer's) is refused, not run as another
    pl.tp_mode = (Meshlm__TpMode)4;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR + 1, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "tp_mode"));
    // 1.5: placed experts, only for a model with experts
    pl.tp_mode = MESHLM__TP_MODE__TP_MODE_EXPERT;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    pl.n_expert = 8;
    uint32_t ex[3] = {5, 0, 7};
    pn.n_experts = 3;
    pn.experts = ex;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.plan.tp_mode, MSG_TP_EXPERT);
    CU_ASSERT(m.plan.nodes[0].n_experts == 3 && m.plan.nodes[0].experts[0] == 5 && m.plan.nodes[0].experts[2] == 7);
    msg_clear(&m);
    // 1.8: placed experts with attention on the leader
    CU_ASSERT_EQUAL(MSG_MINOR_EP_LEAD, 8);
    pl.tp_mode = MESHLM__TP_MODE__TP_MODE_EXPERT_LEAD;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.plan.tp_mode, MSG_TP_EXPERT_LEAD);
    msg_clear(&m);
    pl.n_expert = 0;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT); // a model without experts
    pl.n_expert = 0;
    pn.n_experts = 0;
    pn.experts = NULL;
    // an all-reduce plan's computing nodes hold every hidden row
    pl.tp_mode = MESHLM__TP_MODE__TP_MODE_ALLREDUCE;
    pl.n_embd = 2048;
    Meshlm__Range er = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 1024};
    pn.hidden = &er;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    er.end = 2048;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, MSG_PROTO_MINOR, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.plan.tp_mode, MSG_TP_ALLREDUCE);
    msg_clear(&m);
    // what we refuse to send: an unknown mode, a bad latency, a split hidden range in all-reduce mode
    msg_buf_t bb;
    fill_plan(&a, nodes);
    a.plan.tp_mode = (msg_tp_mode_t)5;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &bb, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&bb);
    fill_plan(&a, nodes);
    nodes[1].link_lat_us = -1.0f;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &bb, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&bb);
    fill_plan(&a, nodes);
    nodes[1].link_lat_us = NAN;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &bb, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&bb);
    fill_plan(&a, nodes);
    a.plan.tp_mode = MSG_TP_ALLREDUCE;
    a.plan.n_embd = 2048;
    for (int i = 0; i < 3; i++) nodes[i].hidden = (msg_range_t){0, 2048};
    nodes[2].hidden = (msg_range_t){1024, 2048};
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &bb, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&bb);
}

static void test_roundtrip_load_shard(void) {
    msg_t a, b;
    comm_msg_t f;
    msg_init(&a, MSG_LOAD_SHARD);
    a.load_shard = (msg_load_shard_t){.plan_id = 99, .node_index = 2, .via_coordinator = true,
                                      .expected_bytes = 123456789012ull};
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_LOAD_SHARD);
    CU_ASSERT_EQUAL(b.load_shard.plan_id, 99);
    CU_ASSERT_EQUAL(b.load_shard.node_index, 2);
    CU_ASSERT(b.load_shard.via_coordinator);
    CU_ASSERT_EQUAL(b.load_shard.expected_bytes, 123456789012ull);
    msg_clear(&b);
    free_frames(&f);

    msg_init(&a, MSG_LOAD_SHARD_ACK);
    a.load_shard_ack = (msg_load_shard_ack_t){.plan_id = 99, .node_index = 1, .status = MLM_EIO,
                                              .bytes = 300000000ull, .ms = 4210, .from_cache = true};
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_LOAD_SHARD_ACK);
    CU_ASSERT_EQUAL(b.load_shard_ack.plan_id, 99);
    CU_ASSERT_EQUAL(b.load_shard_ack.node_index, 1);
    CU_ASSERT_EQUAL(b.load_shard_ack.status, MLM_EIO);
    CU_ASSERT_EQUAL(b.load_shard_ack.bytes, 300000000ull);
    CU_ASSERT_EQUAL(b.load_shard_ack.ms, 4210);
    CU_ASSERT(b.load_shard_ack.from_cache);
    msg_clear(&b);
    free_frames(&f);
}

// Protocol 1.5: LOAD_SHARD, STEP and shard chunks carry their plan's id (the coordinator fills it,
// a worker ignores one of another plan); the prefix says this version (1.9, which keeps them); a 1.4 peer's LOAD_SHARD and STEP, whose
// headers have no plan_id, still decode (plan_id 0, which a worker takes as before). 1.7: a STEP says
// whether its tokens go in one-token order (a replay); an older peer's STEP decodes as a plain batch.
static void test_plan_ids(void) {
    CU_ASSERT_EQUAL(MSG_PROTO_MINOR, 9);
    CU_ASSERT_EQUAL(MSG_MINOR_EP_BLOCK, 9);
    CU_ASSERT_EQUAL(MSG_MINOR_PLAN_IDS, 5);
    CU_ASSERT_EQUAL(MSG_MINOR_CURVE, 6);
    CU_ASSERT_EQUAL(MSG_MINOR_ONE_ORDER, 7);
    msg_t a, b;
    comm_msg_t f;
    const uint64_t id = 0x1234567890abcdefull;
    msg_init(&a, MSG_LOAD_SHARD);
    a.load_shard = (msg_load_shard_t){.plan_id = id, .node_index = 1};
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.load_shard.plan_id, id);
    CU_ASSERT_EQUAL(b.peer_minor, 9);
    const unsigned char *pre = f.data[0];
    CU_ASSERT(pre[6] == 9 && pre[7] == 0); // the prefix's minor
    msg_clear(&b);
    free_frames(&f);
    int32_t tok = 3;
    msg_init(&a, MSG_STEP);
    a.step.plan_id = id;
    a.step.step_id = 9;
    a.step.n_tokens = 1;
    a.step.tokens = &tok;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.step.plan_id, id);
    CU_ASSERT(!b.step.one_order);
    msg_clear(&b);
    free_frames(&f);
    a.step.one_order = true;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT(b.step.one_order);
    msg_clear(&b);
    free_frames(&f);
    uint8_t chunk[4] = {1, 2, 3, 4};
    msg_init(&a, MSG_SLICE_DATA);
    msg_slice_data_t *sd = &a.slice_data;
    sd->plan_id = id;
    snprintf(sd->tensor, sizeof sd->tensor, "shard.gguf");
    sd->type = QT_I8;
    sd->n_dims = 1;
    sd->ne[0] = 4;
    sd->end = 4;
    sd->total = 4;
    sd->data = chunk;
    sd->len = 4;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.slice_data.plan_id, id);
    msg_clear(&b);
    free_frames(&f);

    // a 1.4 peer's LOAD_SHARD and STEP: no plan_id on the wire
    unsigned char hdr[256], prefix[MSG_PREFIX_LEN];
    comm_msg_t h;
    msg_t m;
    char err[256];
    Meshlm__LoadShard ls = MESHLM__LOAD_SHARD__INIT;
    ls.node_index = 2;
    size_t hl = meshlm__load_shard__pack(&ls, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 4, MSG_LOAD_SHARD, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.peer_minor, 4);
    CU_ASSERT_EQUAL(m.load_shard.plan_id, 0u);
    CU_ASSERT_EQUAL(m.load_shard.node_index, 2u);
    msg_clear(&m);
    Meshlm__Step st = MESHLM__STEP__INIT;
    st.step_id = 5;
    st.token_count = 1;
    st.n_tokens = 1;
    st.tokens = &tok;
    hl = meshlm__step__pack(&st, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 4, MSG_STEP, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.step.plan_id, 0u);
    CU_ASSERT_EQUAL(m.step.step_id, 5u);
    CU_ASSERT(m.step.n_tokens == 1 && m.step.tokens && m.step.tokens[0] == 3);
    CU_ASSERT(!m.step.one_order);
    msg_clear(&m);
}

static void test_roundtrip_slice_data(void) {
    // rows [64, 128) of a Q4_0 (2048, 256) tensor: 64 rows * 64 blocks * 18 bytes; this chunk is
    // the second 10000 bytes of it
    unsigned char chunk[10000];
    for (size_t i = 0; i < sizeof chunk; i++) chunk[i] = (unsigned char)(i * 31 + 7);
    msg_t a, b;
    comm_msg_t f;
    msg_init(&a, MSG_SLICE_DATA);
    msg_slice_data_t *s = &a.slice_data;
    s->plan_id = 5;
    strcpy(s->tensor, "blk.3.ffn_up.weight");
    s->type = QT_Q4_0;
    s->n_dims = 2;
    s->ne[0] = 2048;
    s->ne[1] = 256;
    s->dim = 1;
    s->begin = 64;
    s->end = 128;
    s->total = 64 * 64 * 18;
    s->offset = 10000;
    s->len = sizeof chunk;
    s->data = chunk;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(f.n, 3);
    const msg_slice_data_t *t = &b.slice_data;
    CU_ASSERT_EQUAL(b.type, MSG_SLICE_DATA);
    CU_ASSERT_EQUAL(t->plan_id, 5);
    CU_ASSERT_STRING_EQUAL(t->tensor, "blk.3.ffn_up.weight");
    CU_ASSERT_EQUAL(t->type, QT_Q4_0);
    CU_ASSERT_EQUAL(t->n_dims, 2);
    CU_ASSERT(t->ne[0] == 2048 && t->ne[1] == 256);
    CU_ASSERT_EQUAL(t->dim, 1);
    CU_ASSERT(t->begin == 64 && t->end == 128);
    CU_ASSERT_EQUAL(t->total, 64 * 64 * 18);
    CU_ASSERT_EQUAL(t->offset, 10000);
    CU_ASSERT_EQUAL_FATAL(t->len, sizeof chunk);
    CU_ASSERT_PTR_NOT_EQUAL(t->data, chunk);
    CU_ASSERT(memcmp(t->data, chunk, sizeof chunk) == 0);
    msg_clear(&b);
    free_frames(&f);

    // the chunk may not run past the slice
    s->offset = s->total - 100;
    msg_buf_t buf;
    char err[256];
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &buf, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&buf);
    // a column slice of a quantized tensor must start on a block
    s->offset = 0;
    s->dim = 0;
    s->begin = 16;
    s->end = 48;
    s->total = 256 * 18;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &buf, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&buf);
    s->begin = 32;
    s->end = 64;
    s->len = 256 * 18;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &buf, err, sizeof err), 0);
    msg_buf_free(&buf);
}

static void test_roundtrip_step(void) {
    int32_t toks[5] = {1, 15043, 3186, 29991, 0};
    msg_t a, b;
    comm_msg_t f;
    msg_init(&a, MSG_STEP);
    msg_step_t *s = &a.step;
    s->plan_id = 7;
    s->step_id = 1234567;
    s->seq_id = 42;
    s->pos = 17;
    s->n_tokens = 5;
    s->tokens = toks;
    s->logits = MSG_LOGITS_ALL;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(f.n, 2);
    CU_ASSERT_EQUAL(b.type, MSG_STEP);
    CU_ASSERT_EQUAL(b.step.plan_id, 7);
    CU_ASSERT_EQUAL(b.step.step_id, 1234567);
    CU_ASSERT_EQUAL(b.step.seq_id, 42);
    CU_ASSERT_EQUAL(b.step.pos, 17);
    CU_ASSERT_EQUAL_FATAL(b.step.n_tokens, 5);
    CU_ASSERT(!b.step.has_hidden);
    CU_ASSERT_PTR_NOT_NULL_FATAL(b.step.tokens);
    CU_ASSERT(memcmp(b.step.tokens, toks, sizeof toks) == 0);
    CU_ASSERT_EQUAL(b.step.logits, MSG_LOGITS_ALL);
    msg_clear(&b);
    free_frames(&f);

    // hidden state (n_embd 64, 3 tokens) instead of token ids
    float hid[64 * 3];
    for (int i = 0; i < 64 * 3; i++) hid[i] = (float)i * 0.25f - 7.0f;
    msg_init(&a, MSG_STEP);
    s->step_id = 8;
    s->pos = 0;
    s->n_tokens = 3;
    s->has_hidden = true;
    fill_tensor(&s->hidden, QT_F32, 2, (int64_t[]){64, 3}, hid);
    s->logits = MSG_LOGITS_NONE;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(f.n, 3);
    CU_ASSERT(b.step.has_hidden);
    CU_ASSERT_PTR_NULL(b.step.tokens);
    CU_ASSERT_EQUAL(b.step.n_tokens, 3);
    CU_ASSERT_EQUAL(b.step.logits, MSG_LOGITS_NONE);
    check_tensor_eq(&a.step.hidden, &b.step.hidden);
    msg_clear(&b);
    free_frames(&f);

    // rows of the hidden state must match n_tokens
    s->n_tokens = 2;
    msg_buf_t buf;
    char err[256];
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &buf, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&buf);
}

static void test_roundtrip_result(void) {
    // F16 logits for 2 rows of a 1000-token vocab, and a Q8_0 partial
    uint16_t lg[1000 * 2];
    for (int i = 0; i < 2000; i++) lg[i] = (uint16_t)(i * 977u);
    msg_t a, b;
    comm_msg_t f;
    msg_init(&a, MSG_RESULT);
    msg_result_t *r = &a.result;
    r->plan_id = 3;
    r->step_id = 1 << 20;
    r->seq_id = 9;
    r->node_index = 1;
    r->kind = MSG_RESULT_LOGITS;
    fill_tensor(&r->tensor, QT_F16, 2, (int64_t[]){1000, 2}, lg);
    r->compute_ns = 1234567890123ull;
    r->comm_ns = 987654321ull;
    r->bytes_sent = 4000;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_RESULT);
    CU_ASSERT_EQUAL(b.result.plan_id, 3);
    CU_ASSERT_EQUAL(b.result.step_id, 1 << 20);
    CU_ASSERT_EQUAL(b.result.seq_id, 9);
    CU_ASSERT_EQUAL(b.result.node_index, 1);
    CU_ASSERT_EQUAL(b.result.kind, MSG_RESULT_LOGITS);
    CU_ASSERT_EQUAL(b.result.compute_ns, 1234567890123ull);
    CU_ASSERT_EQUAL(b.result.comm_ns, 987654321ull);
    CU_ASSERT_EQUAL(b.result.bytes_sent, 4000);
    check_tensor_eq(&a.result.tensor, &b.result.tensor);
    msg_clear(&b);
    free_frames(&f);

    unsigned char q8[34 * 4 * 2 * 3]; // (128, 2, 3) Q8_0
    for (size_t i = 0; i < sizeof q8; i++) q8[i] = (unsigned char)(i ^ 0x5a);
    r->kind = MSG_RESULT_PARTIAL;
    fill_tensor(&r->tensor, QT_Q8_0, 3, (int64_t[]){128, 2, 3}, q8);
    CU_ASSERT_EQUAL(r->tensor.nbytes, sizeof q8);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.result.kind, MSG_RESULT_PARTIAL);
    check_tensor_eq(&a.result.tensor, &b.result.tensor);
    msg_clear(&b);
    free_frames(&f);
}

static void test_roundtrip_small(void) {
    msg_t a, b;
    comm_msg_t f;
    msg_init(&a, MSG_HEARTBEAT);
    strcpy(a.heartbeat.node_id, "w3");
    a.heartbeat.seq = 77;
    a.heartbeat.unix_ms = 1700000000123ull;
    a.heartbeat.load = 0.75f;
    a.heartbeat.rss_bytes = 1ull << 33;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_HEARTBEAT);
    CU_ASSERT_STRING_EQUAL(b.heartbeat.node_id, "w3");
    CU_ASSERT_EQUAL(b.heartbeat.seq, 77);
    CU_ASSERT_EQUAL(b.heartbeat.unix_ms, 1700000000123ull);
    CU_ASSERT_EQUAL(b.heartbeat.load, 0.75f);
    CU_ASSERT_EQUAL(b.heartbeat.rss_bytes, 1ull << 33);
    msg_clear(&b);
    free_frames(&f);

    msg_init(&a, MSG_SHUTDOWN);
    a.shutdown.drain = true;
    strcpy(a.shutdown.reason, "re-plan after worker 2 was lost");
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_SHUTDOWN);
    CU_ASSERT(b.shutdown.drain);
    CU_ASSERT_STRING_EQUAL(b.shutdown.reason, "re-plan after worker 2 was lost");
    msg_clear(&b);
    free_frames(&f);

    // an empty Shutdown is a zero-byte header
    msg_init(&a, MSG_SHUTDOWN);
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(f.len[1], 0);
    CU_ASSERT(!b.shutdown.drain);
    CU_ASSERT_STRING_EQUAL(b.shutdown.reason, "");
    msg_clear(&b);
    free_frames(&f);

    msg_init(&a, MSG_ERROR);
    a.error.code = MLM_ETIMEOUT;
    strcpy(a.error.text, "all-reduce with node 2: deadline of 5000 ms passed");
    a.error.step_id = 31;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL(b.type, MSG_ERROR);
    CU_ASSERT_EQUAL(b.error.code, MLM_ETIMEOUT);
    CU_ASSERT_STRING_EQUAL(b.error.text, a.error.text);
    CU_ASSERT_EQUAL(b.error.step_id, 31);
    msg_clear(&b);
    free_frames(&f);
}

// The largest messages the bounds allow: 256 nodes with every expert, 65536 tokens.
static void test_roundtrip_limits(void) {
    msg_plan_node_t *nodes = calloc(MSG_MAX_NODES, sizeof *nodes);
    CU_ASSERT_PTR_NOT_NULL_FATAL(nodes);
    msg_t a, b;
    comm_msg_t f;
    fill_plan(&a, nodes);
    a.plan.n_expert = MSG_MAX_EXPERTS;
    a.plan.n_nodes = MSG_MAX_NODES;
    for (int i = 0; i < MSG_MAX_NODES; i++) {
        msg_plan_node_t *n = &nodes[i];
        n->index = (uint32_t)i;
        snprintf(n->node_id, sizeof n->node_id, "node-%03d", i);
        n->layers = (msg_range_t){i % 22, 22};
        n->heads = (msg_range_t){0, 32};
        n->kv_heads = (msg_range_t){0, 4};
        n->n_ffn = MSG_MAX_FFN_RANGES;
        for (int j = 0; j < MSG_MAX_FFN_RANGES; j++) n->ffn[j] = (msg_range_t){j * 700, j * 700 + 1 + i};
        n->n_experts = MSG_MAX_EXPERTS;
        for (int j = 0; j < MSG_MAX_EXPERTS; j++) n->experts[j] = (uint16_t)((j + i) % MSG_MAX_EXPERTS);
    }
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL_FATAL(b.plan.n_nodes, MSG_MAX_NODES);
    int same = 1;
    for (int i = 0; i < MSG_MAX_NODES; i++) {
        const msg_plan_node_t *x = &b.plan.nodes[i];
        same &= strcmp(x->node_id, nodes[i].node_id) == 0 && x->n_experts == MSG_MAX_EXPERTS &&
                memcmp(x->experts, nodes[i].experts, sizeof x->experts) == 0 && x->n_ffn == MSG_MAX_FFN_RANGES &&
                x->ffn[7].end == nodes[i].ffn[7].end && x->layers.begin == nodes[i].layers.begin;
    }
    CU_ASSERT(same);
    msg_clear(&b);
    free_frames(&f);
    a.plan.n_nodes = MSG_MAX_NODES + 1;
    msg_buf_t buf;
    char err[256];
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &buf, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&buf);
    free(nodes);

    int32_t *toks = malloc((MSG_MAX_TOKENS + 1) * sizeof *toks);
    CU_ASSERT_PTR_NOT_NULL_FATAL(toks);
    for (int i = 0; i <= MSG_MAX_TOKENS; i++) toks[i] = (int32_t)((i * 2654435761u) % 152064u);
    msg_init(&a, MSG_STEP);
    a.step.n_tokens = MSG_MAX_TOKENS;
    a.step.tokens = toks;
    CU_ASSERT_EQUAL_FATAL(roundtrip(&a, &b, &f), 0);
    CU_ASSERT_EQUAL_FATAL(b.step.n_tokens, MSG_MAX_TOKENS);
    CU_ASSERT(memcmp(b.step.tokens, toks, MSG_MAX_TOKENS * sizeof *toks) == 0);
    msg_clear(&b);
    free_frames(&f);
    a.step.n_tokens = MSG_MAX_TOKENS + 1;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &buf, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&buf);
    free(toks);
}

// --- exact bytes

static void test_wire_bytes(void) {
    msg_t a;
    msg_init(&a, MSG_HEARTBEAT);
    strcpy(a.heartbeat.node_id, "w0");
    a.heartbeat.seq = 7;
    a.heartbeat.unix_ms = 1000;
    a.heartbeat.load = 0.5f;
    msg_buf_t b;
    char err[256];
    CU_ASSERT_EQUAL_FATAL(msg_encode(&a, NULL, &b, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(b.n, 2);
    static const unsigned char prefix[MSG_PREFIX_LEN] = {'M', 'L', 'M', 'P', MSG_PROTO_MAJOR, 0, MSG_PROTO_MINOR, 0,
                                                          9, 0, 0, 0};
    CU_ASSERT_EQUAL_FATAL(b.iov[0].len, MSG_PREFIX_LEN);
    CU_ASSERT(memcmp(b.iov[0].ptr, prefix, MSG_PREFIX_LEN) == 0);
    // node_id "w0" (field 1), seq 7 (2), unix_ms 1000 (3, varint e8 07), load 0.5f (4, fixed32), rss 0 omitted
    static const unsigned char header[] = {0x0a, 0x02, 'w', '0', 0x10, 0x07, 0x18, 0xe8, 0x07,
                                           0x25, 0x00, 0x00, 0x00, 0x3f};
    CU_ASSERT_EQUAL_FATAL(b.iov[1].len, sizeof header);
    CU_ASSERT(memcmp(b.iov[1].ptr, header, sizeof header) == 0);
    msg_buf_free(&b);
    msg_buf_free(&b); // idempotent

    // a Result announces its raw frame in the prefix
    float x[4] = {1, 2, 3, 4};
    msg_init(&a, MSG_RESULT);
    a.result.kind = MSG_RESULT_HIDDEN;
    fill_tensor(&a.result.tensor, QT_F32, 1, (int64_t[]){4}, x);
    CU_ASSERT_EQUAL_FATAL(msg_encode(&a, NULL, &b, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(b.n, 3);
    const unsigned char *p = b.iov[0].ptr;
    CU_ASSERT(p[8] == 8 && p[9] == 0 && p[10] == 1 && p[11] == 0);
    CU_ASSERT_PTR_EQUAL(b.iov[2].ptr, x); // payloads are not copied
    CU_ASSERT_EQUAL(b.iov[2].len, 16);
    int type = 0, major = -1, minor = -1;
    comm_msg_t v;
    msg_buf_view(&b, &v);
    CU_ASSERT_EQUAL(msg_peek(&v, &type, &major, &minor), 0);
    CU_ASSERT(type == MSG_RESULT && major == MSG_PROTO_MAJOR && minor == MSG_PROTO_MINOR);
    msg_buf_free(&b);
}

static void test_type_names(void) {
    CU_ASSERT_STRING_EQUAL(msg_type_name(MSG_HELLO), "HELLO");
    CU_ASSERT_STRING_EQUAL(msg_type_name(MSG_SLICE_DATA), "SLICE_DATA");
    CU_ASSERT_STRING_EQUAL(msg_type_name(MSG_ERROR), "ERROR");
    CU_ASSERT_STRING_EQUAL(msg_type_name(0), "unknown");
    CU_ASSERT_STRING_EQUAL(msg_type_name(MSG_TYPE_COUNT), "unknown");
    CU_ASSERT_STRING_EQUAL(msg_type_name(-3), "unknown");
    for (int t = 1; t < MSG_TYPE_COUNT; t++) CU_ASSERT_STRING_NOT_EQUAL(msg_type_name(t), "unknown");
}

// --- refusals

// Encodes a heartbeat into frames the test may then damage.
static void heartbeat_frames(msg_buf_t *b, comm_msg_t *f) {
    msg_t a;
    msg_init(&a, MSG_HEARTBEAT);
    strcpy(a.heartbeat.node_id, "w1");
    a.heartbeat.seq = 1;
    char err[256];
    CU_ASSERT_EQUAL_FATAL(msg_encode(&a, NULL, b, err, sizeof err), 0);
    copy_frames(b, f);
}

static void test_reject_prefix(void) {
    msg_buf_t b;
    comm_msg_t f;
    msg_t m;
    char err[256];
    heartbeat_frames(&b, &f);
    unsigned char *p = f.data[0];

    p[0] = 'X';
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    CU_ASSERT(strstr(err, "magic") != NULL);
    CU_ASSERT_EQUAL(m.type, MSG_NONE);
    CU_ASSERT_EQUAL(msg_peek(&f, NULL, NULL, NULL), MLM_EPROTO);
    p[0] = 'M';

    // another major version: refused, naming both
    p[4] = MSG_PROTO_MAJOR + 1;
    p[6] = 3;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    char want[64];
    snprintf(want, sizeof want, "%d.3", MSG_PROTO_MAJOR + 1);
    CU_ASSERT(strstr(err, want) != NULL);
    snprintf(want, sizeof want, "%d.%d", MSG_PROTO_MAJOR, MSG_PROTO_MINOR);
    CU_ASSERT(strstr(err, want) != NULL);
    p[4] = 0;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    p[4] = MSG_PROTO_MAJOR;

    // a newer minor is accepted, also with a longer prefix
    p[6] = MSG_PROTO_MINOR + 1;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.peer_minor, MSG_PROTO_MINOR + 1);
    CU_ASSERT_STRING_EQUAL(m.heartbeat.node_id, "w1");
    msg_clear(&m);
    unsigned char longer[MSG_PREFIX_LEN + 4];
    memcpy(longer, p, MSG_PREFIX_LEN);
    memset(longer + MSG_PREFIX_LEN, 0xee, 4);
    f.data[0] = longer;
    f.len[0] = sizeof longer;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), 0);
    msg_clear(&m);
    longer[6] = MSG_PROTO_MINOR; // same minor: the prefix must be exact
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    f.data[0] = p;
    f.len[0] = MSG_PREFIX_LEN - 1; // short prefix
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    f.len[0] = MSG_PREFIX_LEN;
    p[6] = MSG_PROTO_MINOR;

    // unknown types
    p[8] = 99;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    CU_ASSERT(strstr(err, "99") != NULL);
    p[8] = 0;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    p[8] = MSG_TYPE_COUNT;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    p[8] = MSG_HEARTBEAT;

    // announced raw frames must be there
    p[10] = 1;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EPROTO);
    p[10] = 0;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), 0);
    msg_clear(&m);
    free_frames(&f);
    msg_buf_free(&b);
}

static void test_reject_frame_counts(void) {
    msg_buf_t b;
    comm_msg_t f;
    msg_t m;
    char err[256];
    heartbeat_frames(&b, &f);

    comm_msg_t z;
    memset(&z, 0, sizeof z);
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, err, sizeof err), MLM_EPROTO); // zero frames
    CU_ASSERT(strstr(err, "0 frames") != NULL);
    z.n = -1;
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, err, sizeof err), MLM_EPROTO);
    z = f;
    z.n = 1; // prefix only
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, err, sizeof err), MLM_EPROTO);
    z.n = COMM_MAX_FRAMES + 1; // too many frames
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, err, sizeof err), MLM_EPROTO);

    // frames the header does not describe (prefix claims them too)
    unsigned char extra[8] = {0};
    z = f;
    z.n = 4;
    z.data[2] = z.data[3] = extra;
    z.len[2] = z.len[3] = sizeof extra;
    ((unsigned char *)z.data[0])[10] = 2;
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, err, sizeof err), MLM_EPROTO);
    // ... which a newer minor may add
    ((unsigned char *)z.data[0])[6] = MSG_PROTO_MINOR + 1;
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, err, sizeof err), 0);
    msg_clear(&m);

    CU_ASSERT_EQUAL(msg_decode(NULL, NULL, &m, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, NULL, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(msg_decode(&z, NULL, &m, NULL, 0), 0); // no error buffer needed
    msg_clear(&m);
    free_frames(&f);
    msg_buf_free(&b);
}

static void test_reject_truncated(void) {
    msg_t a, m;
    msg_plan_node_t nodes[3];
    fill_plan(&a, nodes);
    msg_buf_t b;
    comm_msg_t f;
    char err[256];
    CU_ASSERT_EQUAL_FATAL(msg_encode(&a, NULL, &b, err, sizeof err), 0);
    copy_frames(&b, &f);
    size_t full = f.len[1];
    f.len[1] = full - 1;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT(strstr(err, "PLAN") != NULL);
    // every shorter length is refused (either undecodable or missing required content)
    int ok = 0;
    for (size_t n = 0; n < full; n++) {
        f.len[1] = n;
        int rc = msg_decode(&f, NULL, &m, err, sizeof err);
        CU_ASSERT(rc < 0);
        ok += rc == 0;
        msg_clear(&m);
    }
    CU_ASSERT_EQUAL(ok, 0);
    free_frames(&f);
    msg_buf_free(&b);
}

static void test_reject_sizes(void) {
    unsigned char *big = calloc(1, 4096);
    CU_ASSERT_PTR_NOT_NULL_FATAL(big);
    msg_t a, m;
    msg_init(&a, MSG_RESULT);
    a.result.kind = MSG_RESULT_LOGITS;
    fill_tensor(&a.result.tensor, QT_F32, 2, (int64_t[]){512, 2}, big);
    msg_buf_t b;
    comm_msg_t f;
    char err[256];
    CU_ASSERT_EQUAL_FATAL(msg_encode(&a, NULL, &b, err, sizeof err), 0);
    copy_frames(&b, &f);

    msg_limits_t lim = msg_limits_default();
    CU_ASSERT_EQUAL(lim.max_header, MSG_DEFAULT_MAX_HEADER);
    CU_ASSERT_EQUAL(lim.max_payload, MSG_DEFAULT_MAX_PAYLOAD);
    lim.max_payload = 4095; // raw frame over the limit
    CU_ASSERT_EQUAL(msg_decode(&f, &lim, &m, err, sizeof err), MLM_ERANGE);
    CU_ASSERT(strstr(err, "4096") != NULL);
    msg_buf_t b2;
    CU_ASSERT_EQUAL(msg_encode(&a, &lim, &b2, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b2);
    lim.max_payload = 4096;
    CU_ASSERT_EQUAL(msg_decode(&f, &lim, &m, err, sizeof err), 0);
    msg_clear(&m);
    lim.max_header = f.len[1] - 1; // header over the limit
    CU_ASSERT_EQUAL(msg_decode(&f, &lim, &m, err, sizeof err), MLM_ERANGE);
    CU_ASSERT_EQUAL(msg_encode(&a, &lim, &b2, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b2);

    // the raw frame's length must match the shape the header describes
    f.len[2] = 4092;
    CU_ASSERT_EQUAL(msg_decode(&f, NULL, &m, err, sizeof err), MLM_EFORMAT);
    CU_ASSERT(strstr(err, "4092") != NULL);
    f.len[2] = 4096;
    // ... and the shape must match the byte count the header gives
    a.result.tensor.nbytes = 4000;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b2, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b2);
    a.result.tensor.nbytes = 4096;
    a.result.tensor.ne[0] = 500; // not a multiple of the Q8_0 block
    a.result.tensor.type = QT_Q8_0;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b2, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b2);
    a.result.tensor.type = 77; // unknown type
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b2, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b2);

    // a hostile header: shape whose byte count overflows 64 bits, and one that lies about nbytes
    Meshlm__TensorDesc td = MESHLM__TENSOR_DESC__INIT;
    int64_t ne[4] = {(int64_t)1 << 40, (int64_t)1 << 40, (int64_t)1 << 40, 2};
    td.dtype = QT_F32;
    td.n_ne = 4;
    td.ne = ne;
    td.nbytes = 4096;
    Meshlm__Result rs = MESHLM__RESULT__INIT;
    rs.kind = MESHLM__RESULT_KIND__RESULT_LOGITS;
    rs.tensor = &td;
    unsigned char hdr[256], prefix[MSG_PREFIX_LEN];
    size_t hl = meshlm__result__pack(&rs, hdr);
    comm_msg_t h;
    void *raw[1] = {big};
    size_t rl[1] = {4096};
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_RESULT, hdr, hl, 1, raw, rl);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);
    ne[0] = 1024;
    ne[1] = ne[2] = ne[3] = 1;
    hl = meshlm__result__pack(&rs, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_RESULT, hdr, hl, 1, raw, rl);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), 0); // 1024 floats = 4096 bytes
    msg_clear(&m);
    td.n_ne = 5; // too many dims
    int64_t ne5[5] = {1024, 1, 1, 1, 1};
    td.ne = ne5;
    hl = meshlm__result__pack(&rs, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_RESULT, hdr, hl, 1, raw, rl);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    td.n_ne = 1;
    td.ne = ne;
    rs.kind = 9; // enum out of range
    hl = meshlm__result__pack(&rs, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_RESULT, hdr, hl, 1, raw, rl);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);

    free_frames(&f);
    msg_buf_free(&b);
    free(big);
}

static void test_reject_plan_ranges(void) {
    msg_t a, m;
    msg_plan_node_t nodes[3];
    msg_buf_t b;
    char err[256];

    // what we refuse to send
    fill_plan(&a, nodes);
    nodes[1].index = 3;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    CU_ASSERT(strstr(err, "index") != NULL);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    nodes[2].heads.end = 33;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    nodes[0].experts[1] = 8;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    nodes[0].experts[1] = nodes[0].experts[0];
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    nodes[1].block_experts[0] = 22u << 8; // a block outside its layers 0-21
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    CU_ASSERT(strstr(err, "block_experts") != NULL);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    nodes[2].block_experts[1] = 3u << 8 | 8; // expert 8 of 8
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    nodes[2].n_block_experts = MSG_MAX_BLOCK_EXPERTS + 1;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    fill_plan(&a, nodes);
    a.plan.kv_type = 5; // not a type id
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b);

    // what we refuse to receive: headers built by hand
    Meshlm__Range lr = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 22};
    Meshlm__Range hr = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 32};
    Meshlm__Range kr = {PROTOBUF_C_MESSAGE_INIT(&meshlm__range__descriptor), 0, 4};
    Meshlm__PlanNode pn[2], *pnp[2];
    for (int i = 0; i < 2; i++) {
        meshlm__plan_node__init(&pn[i]);
        pn[i].index = (uint32_t)i;
        pn[i].layers = &lr;
        pn[i].heads = &hr;
        pn[i].kv_heads = &kr;
        pnp[i] = &pn[i];
    }
    uint8_t sha[32] = {1};
    Meshlm__Plan pl = MESHLM__PLAN__INIT;
    pl.model_sha256.len = 32;
    pl.model_sha256.data = sha;
    pl.node_count = 2;
    pl.n_nodes = 2;
    pl.nodes = pnp;
    pl.n_ctx = 512;
    pl.kv_type = QT_F16;
    pl.n_layer = 22;
    pl.n_head = 32;
    pl.n_head_kv = 4;
    pl.n_ff = 5632;
    unsigned char hdr[1024], prefix[MSG_PREFIX_LEN];
    comm_msg_t h;
    size_t hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.plan.n_nodes, 2);
    msg_clear(&m);

    pn[1].index = 2; // node index out of range
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);
    CU_ASSERT(strstr(err, "PLAN") != NULL && strstr(err, "index 2") != NULL);
    CU_ASSERT_PTR_NULL(m.alloc_); // cleared on failure
    pn[1].index = 0; // duplicate / out of order
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    pn[1].index = 1;
    pl.node_count = 3; // count and entries disagree
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    pl.node_count = 2;
    kr.end = 5; // KV heads past n_head_kv
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);
    kr.end = 4;
    lr.begin = 30; // begin past end
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);
    lr.begin = 0;
    pl.model_sha256.len = 31; // short hash
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    pl.model_sha256.len = 32;
    hl = meshlm__plan__pack(&pl, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_PLAN, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    msg_clear(&m);
}

static void test_reject_fields(void) {
    msg_t a, m;
    msg_buf_t b;
    char err[256];

    fill_hello(&a);
    strcpy(a.hello.node_id, "has space");
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b);
    fill_hello(&a);
    memset(a.hello.node_id, 'x', sizeof a.hello.node_id); // no NUL
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    fill_hello(&a);
    a.hello.role = 9;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b);
    fill_hello(&a);
    a.hello.proto_major = MSG_PROTO_MAJOR + 1;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EPROTO);
    msg_buf_free(&b);
    fill_hello(&a);
    a.hello.speeds[1].type = a.hello.speeds[0].type;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b);

    int32_t toks[2] = {5, -1};
    msg_init(&a, MSG_STEP);
    a.step.n_tokens = 2;
    a.step.tokens = toks;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    a.step.n_tokens = 0;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);

    msg_init(&a, MSG_ERROR);
    a.error.code = 3;
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    msg_init(&a, MSG_NONE);
    CU_ASSERT_EQUAL(msg_encode(&a, NULL, &b, err, sizeof err), MLM_EPROTO);
    msg_buf_free(&b);
    CU_ASSERT_EQUAL(msg_encode(NULL, NULL, &b, err, sizeof err), MLM_EINVAL);

    // a Step whose token list disagrees with its count; a string over its bound
    int32_t tk[3] = {1, 2, 3};
    Meshlm__Step st = MESHLM__STEP__INIT;
    st.token_count = 2;
    st.n_tokens = 3;
    st.tokens = tk;
    unsigned char hdr[1024], prefix[MSG_PREFIX_LEN];
    comm_msg_t h;
    size_t hl = meshlm__step__pack(&st, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_STEP, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
    st.token_count = 3;
    hl = meshlm__step__pack(&st, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_STEP, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.step.tokens[2], 3);
    msg_clear(&m);
    st.logits = 7;
    hl = meshlm__step__pack(&st, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_STEP, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);

    char longid[MSG_ID_MAX + 1];
    memset(longid, 'a', MSG_ID_MAX);
    longid[MSG_ID_MAX] = 0;
    Meshlm__Heartbeat hb = MESHLM__HEARTBEAT__INIT;
    hb.node_id = longid;
    hl = meshlm__heartbeat__pack(&hb, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_HEARTBEAT, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);
    longid[MSG_ID_MAX - 1] = 0; // exactly at the bound
    hl = meshlm__heartbeat__pack(&hb, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_HEARTBEAT, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    msg_clear(&m);
    hb.load = -1.0f;
    hl = meshlm__heartbeat__pack(&hb, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_HEARTBEAT, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_ERANGE);

    // a Hello from the same major whose body claims another major
    Meshlm__Capabilities caps = MESHLM__CAPABILITIES__INIT;
    caps.n_cores = 4;
    Meshlm__Hello he = MESHLM__HELLO__INIT;
    he.proto_major = MSG_PROTO_MAJOR + 1;
    he.node_id = "w9";
    he.role = MESHLM__ROLE__ROLE_WORKER;
    he.caps = &caps;
    hl = meshlm__hello__pack(&he, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_HELLO, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EPROTO);
    he.proto_major = MSG_PROTO_MAJOR;
    hl = meshlm__hello__pack(&he, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_HELLO, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), 0);
    CU_ASSERT_EQUAL(m.hello.n_cores, 4);
    msg_clear(&m);
    caps.has_model = 1; // no hash
    hl = meshlm__hello__pack(&he, hdr);
    hand_msg(&h, prefix, MSG_PROTO_MAJOR, 0, MSG_HELLO, hdr, hl, 0, NULL, NULL);
    CU_ASSERT_EQUAL(msg_decode(&h, NULL, &m, err, sizeof err), MLM_EFORMAT);
}

// A few thousand random and mutated messages: decoding may fail but never crash, and whatever is
// accepted re-encodes.
static void test_garbage(void) {
    uint64_t s = 0x9e3779b97f4a7c15ull;
    unsigned char buf[6][512];
    char err[256];
    int accepted = 0;

    // valid messages to mutate
    msg_t seeds[4];
    msg_plan_node_t nodes[3];
    fill_hello(&seeds[0]);
    fill_plan(&seeds[1], nodes);
    int32_t toks[3] = {1, 2, 3};
    msg_init(&seeds[2], MSG_STEP);
    seeds[2].step.n_tokens = 3;
    seeds[2].step.tokens = toks;
    float x[32] = {0};
    msg_init(&seeds[3], MSG_RESULT);
    seeds[3].result.kind = MSG_RESULT_LOGITS;
    fill_tensor(&seeds[3].result.tensor, QT_F32, 2, (int64_t[]){16, 2}, x);

    for (int it = 0; it < 6000; it++) {
        comm_msg_t f;
        memset(&f, 0, sizeof f);
        msg_buf_t b;
        memset(&b, 0, sizeof b);
        if (it % 2 == 0) {
            // pure garbage, half of it behind a valid prefix
            f.n = (int)(rng_next(&s) % 6);
            for (int i = 0; i < f.n; i++) {
                size_t len = rng_next(&s) % sizeof buf[i];
                for (size_t j = 0; j < len; j++) buf[i][j] = (unsigned char)rng_next(&s);
                f.data[i] = buf[i];
                f.len[i] = len;
            }
            if (f.n >= 2 && it % 4 == 0) {
                memcpy(buf[0], "MLMP", 4);
                buf[0][4] = MSG_PROTO_MAJOR;
                buf[0][5] = 0;
                buf[0][6] = buf[0][7] = 0;
                buf[0][8] = (unsigned char)(1 + rng_next(&s) % (MSG_TYPE_COUNT - 1));
                buf[0][9] = 0;
                buf[0][10] = (unsigned char)(f.n - 2);
                buf[0][11] = 0;
                f.len[0] = MSG_PREFIX_LEN;
            }
        } else {
            // a valid message with a few bytes of its header flipped or the header cut
            const msg_t *src = &seeds[rng_next(&s) % 4];
            CU_ASSERT_EQUAL_FATAL(msg_encode(src, NULL, &b, err, sizeof err), 0);
            f.n = b.n;
            for (int i = 0; i < b.n; i++) {
                CU_ASSERT_FATAL(b.iov[i].len <= sizeof buf[i]);
                memcpy(buf[i], b.iov[i].ptr, b.iov[i].len);
                f.data[i] = buf[i];
                f.len[i] = b.iov[i].len;
            }
            int flips = 1 + (int)(rng_next(&s) % 4);
            for (int k = 0; k < flips && f.len[1] > 0; k++)
                buf[1][rng_next(&s) % f.len[1]] ^= (unsigned char)(1u << (rng_next(&s) % 8));
            if (rng_next(&s) % 4 == 0 && f.len[1] > 0) f.len[1] = rng_next(&s) % f.len[1];
        }
        msg_t m;
        int rc = msg_decode(&f, NULL, &m, err, sizeof err);
        CU_ASSERT(rc == 0 || rc == MLM_EPROTO || rc == MLM_EFORMAT || rc == MLM_ERANGE);
        if (rc == 0) {
            accepted++;
            msg_buf_t b2;
            CU_ASSERT_EQUAL(msg_encode(&m, NULL, &b2, err, sizeof err), 0);
            msg_buf_free(&b2);
        } else {
            CU_ASSERT(err[0] != 0);
        }
        msg_clear(&m);
        msg_buf_free(&b);
    }
    CU_ASSERT(accepted > 0); // some mutations only change values
}

// --- suite

int test_proto_suite(void) {
    CU_pSuite s = CU_add_suite("proto", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "round trip HELLO", test_roundtrip_hello) ||
        !CU_add_test(s, "round trip HELLO_ACK", test_roundtrip_hello_ack) ||
        !CU_add_test(s, "round trip PLAN", test_roundtrip_plan) ||
        !CU_add_test(s, "PLAN tp_mode and links (1.4), older peers", test_plan_tp_mode) ||
        !CU_add_test(s, "PLAN kv_device (1.5)", test_plan_kv_device) ||
        !CU_add_test(s, "PLAN curve_key (1.6), older peers", test_plan_curve_key) ||
        !CU_add_test(s, "plan ids in LOAD_SHARD, STEP, SLICE_DATA (1.5), older peers", test_plan_ids) ||
        !CU_add_test(s, "round trip LOAD_SHARD(_ACK)", test_roundtrip_load_shard) ||
        !CU_add_test(s, "round trip SLICE_DATA", test_roundtrip_slice_data) ||
        !CU_add_test(s, "round trip STEP", test_roundtrip_step) ||
        !CU_add_test(s, "round trip RESULT", test_roundtrip_result) ||
        !CU_add_test(s, "round trip HEARTBEAT, SHUTDOWN, ERROR", test_roundtrip_small) ||
        !CU_add_test(s, "round trip at the bounds", test_roundtrip_limits) ||
        !CU_add_test(s, "exact wire bytes", test_wire_bytes) ||
        !CU_add_test(s, "type names", test_type_names) ||
        !CU_add_test(s, "refuse bad prefix, version, type", test_reject_prefix) ||
        !CU_add_test(s, "refuse bad frame counts", test_reject_frame_counts) ||
        !CU_add_test(s, "refuse truncated header", test_reject_truncated) ||
        !CU_add_test(s, "refuse oversized and mis-sized frames", test_reject_sizes) ||
        !CU_add_test(s, "refuse plan ranges", test_reject_plan_ranges) ||
        !CU_add_test(s, "refuse bad fields", test_reject_fields) ||
        !CU_add_test(s, "random garbage", test_garbage))
        return -1;
    return 0;
}
