// libFuzzer target: arbitrary frames through the wire decoder; what it accepts must re-encode stably.
//
// Input layout: byte 0 & 7 = frame count - 1 (1..8); then a u16 little-endian length for every frame
// but the last (clamped to what is left); then the frames' bytes, the last frame taking the rest.
// With MESHLM_FUZZ_MSG_SEEDS=<dir> in the environment, LLVMFuzzerInitialize first writes a few valid
// messages in this layout into <dir> (tests/fuzz/seed_fuzz_msg.sh does that).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/msg.h"
#include "core/err.h"
#include "worker/kernels/quant.h"

// --- helpers

// Splits data into frames, each copied into its own heap block as a transport would deliver it.
static void split(const uint8_t *data, size_t size, comm_msg_t *m) {
    memset(m, 0, sizeof *m);
    if (size < 1) return;
    int nf = 1 + (data[0] & 7);
    size_t at = 1;
    size_t lens[8];
    for (int i = 0; i < nf - 1; i++) {
        size_t l = 0;
        if (at + 2 <= size) l = (size_t)data[at] | (size_t)data[at + 1] << 8;
        at = at + 2 <= size ? at + 2 : size;
        lens[i] = l;
    }
    for (int i = 0; i < nf; i++) {
        size_t left = size - at;
        size_t l = i == nf - 1 ? left : (lens[i] < left ? lens[i] : left);
        m->data[i] = malloc(l ? l : 1);
        if (l) memcpy(m->data[i], data + at, l);
        m->len[i] = l;
        at += l;
    }
    m->n = nf;
}

static void free_frames(comm_msg_t *m) {
    for (int i = 0; i < m->n; i++) free(m->data[i]);
    memset(m, 0, sizeof *m);
}

static int same_frames(const msg_buf_t *a, const msg_buf_t *b) {
    if (a->n != b->n) return 0;
    for (int i = 0; i < a->n; i++)
        if (a->iov[i].len != b->iov[i].len || (a->iov[i].len && memcmp(a->iov[i].ptr, b->iov[i].ptr, a->iov[i].len)))
            return 0;
    return 1;
}

// Writes m's frames in the input layout to dir/name.
static void write_seed(const char *dir, const char *name, const msg_t *m) {
    msg_buf_t b;
    char err[256];
    if (msg_encode(m, NULL, &b, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_msg: seed %s: %s\n", name, err);
        abort();
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fputc(b.n - 1, f);
        for (int i = 0; i < b.n - 1; i++) {
            fputc((int)(b.iov[i].len & 0xff), f);
            fputc((int)(b.iov[i].len >> 8 & 0xff), f);
        }
        for (int i = 0; i < b.n; i++) fwrite(b.iov[i].ptr, 1, b.iov[i].len, f);
        fclose(f);
    }
    msg_buf_free(&b);
}

static void write_seeds(const char *dir) {
    msg_t m;
    msg_init(&m, MSG_HELLO);
    strcpy(m.hello.node_id, "w1");
    strcpy(m.hello.endpoint, "tcp://10.0.0.2:5601");
    m.hello.role = MSG_ROLE_WORKER;
    m.hello.n_cores = 2;
    m.hello.ram_budget_bytes = 1 << 30;
    m.hello.n_speeds = 2;
    m.hello.speeds[0] = (msg_speed_t){QT_Q4_0, 60.0f};
    m.hello.speeds[1] = (msg_speed_t){QT_Q8_0, 45.5f};
    m.hello.has_model = true;
    memset(m.hello.model_sha256, 0xab, sizeof m.hello.model_sha256);
    m.hello.model_size = 1000000;
    write_seed(dir, "hello", &m);

    msg_init(&m, MSG_HELLO_ACK);
    m.hello_ack.accepted = true;
    m.hello_ack.node_index = 1;
    write_seed(dir, "hello_ack", &m);

    msg_plan_node_t nodes[2];
    memset(nodes, 0, sizeof nodes);
    msg_init(&m, MSG_PLAN);
    m.plan.plan_id = 1;
    m.plan.n_layer = 4;
    m.plan.n_head = 8;
    m.plan.n_head_kv = 2;
    m.plan.n_ff = 256;
    m.plan.n_expert = 4;
    m.plan.n_ctx = 512;
    m.plan.kv_type = QT_F16;
    m.plan.n_nodes = 2;
    for (int i = 0; i < 2; i++) {
        nodes[i].index = (uint32_t)i;
        snprintf(nodes[i].node_id, sizeof nodes[i].node_id, "w%d", i);
        nodes[i].layers = (msg_range_t){0, 4};
        nodes[i].heads = (msg_range_t){4 * i, 4 * i + 4};
        nodes[i].kv_heads = (msg_range_t){i, i + 1};
        nodes[i].n_ffn = 1;
        nodes[i].ffn[0] = (msg_range_t){128 * i, 128 * i + 128};
        nodes[i].n_experts = 2;
        nodes[i].experts[0] = (uint16_t)(2 * i);
        nodes[i].experts[1] = (uint16_t)(2 * i + 1);
    }
    m.plan.nodes = nodes;
    write_seed(dir, "plan", &m);

    msg_init(&m, MSG_LOAD_SHARD_ACK);
    m.load_shard_ack.bytes = 12345;
    m.load_shard_ack.ms = 7;
    write_seed(dir, "load_shard_ack", &m);

    uint8_t chunk[64];
    memset(chunk, 0x11, sizeof chunk);
    msg_init(&m, MSG_SLICE_DATA);
    strcpy(m.slice_data.tensor, "blk.0.attn_q.weight");
    m.slice_data.type = QT_Q8_0;
    m.slice_data.n_dims = 2;
    m.slice_data.ne[0] = 64;
    m.slice_data.ne[1] = 8;
    m.slice_data.dim = 1;
    m.slice_data.begin = 2;
    m.slice_data.end = 4;
    m.slice_data.total = 2 * 2 * 34;
    m.slice_data.offset = 4;
    m.slice_data.len = sizeof chunk;
    m.slice_data.data = chunk;
    write_seed(dir, "slice_data", &m);

    int32_t toks[4] = {1, 450, 4996, 29892};
    msg_init(&m, MSG_STEP);
    m.step.seq_id = 3;
    m.step.pos = 5;
    m.step.n_tokens = 4;
    m.step.tokens = toks;
    write_seed(dir, "step_tokens", &m);

    float hid[16 * 2];
    for (int i = 0; i < 32; i++) hid[i] = (float)i;
    msg_init(&m, MSG_STEP);
    m.step.n_tokens = 2;
    m.step.has_hidden = true;
    m.step.hidden = (msg_tensor_t){QT_F32, 2, {16, 2, 1, 1}, sizeof hid, hid};
    write_seed(dir, "step_hidden", &m);

    msg_init(&m, MSG_RESULT);
    m.result.kind = MSG_RESULT_LOGITS;
    m.result.tensor = (msg_tensor_t){QT_F32, 1, {32, 1, 1, 1}, sizeof hid, hid};
    m.result.compute_ns = 1000;
    write_seed(dir, "result", &m);

    msg_init(&m, MSG_HEARTBEAT);
    strcpy(m.heartbeat.node_id, "w0");
    m.heartbeat.seq = 9;
    m.heartbeat.load = 0.25f;
    write_seed(dir, "heartbeat", &m);

    msg_init(&m, MSG_ERROR);
    m.error.code = MLM_EIO;
    strcpy(m.error.text, "read failed");
    write_seed(dir, "error", &m);

    msg_init(&m, MSG_KV_REQUEST);
    m.kv_request.op = MSG_KV_OPEN;
    m.kv_request.req_id = 1;
    m.kv_request.shape = (msg_kv_shape_t){.n_layer = 2, .head_dim = 8, .n_head = 4, .n_head_kv = 2, .heads = {0, 4},
                                          .kv_heads = {0, 2}, .kv_type = QT_F16, .n_seq_max = 2};
    write_seed(dir, "kv_open", &m);
    msg_init(&m, MSG_KV_REQUEST);
    m.kv_request = (msg_kv_request_t){.session = 1, .req_id = 2, .op = MSG_KV_APPEND, .seq = 1, .layer = 1,
                                      .has_kv = true, .append_pos = 3, .append_n = 2};
    m.kv_request.k = (msg_tensor_t){QT_F32, 2, {16, 2, 1, 1}, sizeof hid, hid};
    m.kv_request.v = m.kv_request.k;
    write_seed(dir, "kv_append", &m);
    m.kv_request.op = MSG_KV_ATTEND;
    m.kv_request.pos = 4;
    m.kv_request.n = 1;
    m.kv_request.has_q = true;
    m.kv_request.q = (msg_tensor_t){QT_F32, 2, {32, 1, 1, 1}, sizeof hid, hid};
    write_seed(dir, "kv_attend_append", &m);
    m.kv_request.has_kv = false;
    write_seed(dir, "kv_attend", &m);
    msg_init(&m, MSG_KV_REPLY);
    m.kv_reply = (msg_kv_reply_t){.session = 1, .req_id = 2, .has_out = true, .stats = {.kv_bytes = 64, .bytes_read = 32}};
    m.kv_reply.out = (msg_tensor_t){QT_F32, 2, {16, 2, 1, 1}, sizeof hid, hid};
    write_seed(dir, "kv_reply", &m);
    msg_init(&m, MSG_KV_REPLY);
    m.kv_reply.status = MLM_EFULL;
    strcpy(m.kv_reply.text, "/var/kv/kv-1-1-s0.kv: No space left on device");
    write_seed(dir, "kv_reply_error", &m);
}

// --- entry points

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *dir = getenv("MESHLM_FUZZ_MSG_SEEDS");
    if (dir && *dir) write_seeds(dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    comm_msg_t in;
    split(data, size, &in);
    msg_limits_t lim = msg_limits_default();
    lim.max_header = 1 << 16;
    lim.max_payload = 1 << 16;
    msg_t m;
    char err[256] = "";
    int rc = msg_decode(&in, &lim, &m, err, sizeof err);
    if (rc != 0) {
        if (rc != MLM_EPROTO && rc != MLM_EFORMAT && rc != MLM_ERANGE) abort();
        if (!err[0]) abort(); // every refusal says why
        free_frames(&in);
        return 0;
    }
    // accepted: it must encode, decode to the same message, and encode to the same bytes
    msg_buf_t b1, b2;
    if (msg_encode(&m, &lim, &b1, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_msg: accepted %s does not re-encode: %s\n", msg_type_name(m.type), err);
        abort();
    }
    comm_msg_t v;
    msg_buf_view(&b1, &v);
    msg_t m2;
    if (msg_decode(&v, &lim, &m2, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_msg: re-encoded %s does not decode: %s\n", msg_type_name(m.type), err);
        abort();
    }
    if (m2.type != m.type || msg_encode(&m2, &lim, &b2, err, sizeof err) != 0 || !same_frames(&b1, &b2)) {
        fprintf(stderr, "fuzz_msg: %s does not round-trip stably\n", msg_type_name(m.type));
        abort();
    }
    msg_buf_free(&b2);
    msg_clear(&m2);
    msg_buf_free(&b1);
    msg_clear(&m);
    free_frames(&in);
    return 0;
}
