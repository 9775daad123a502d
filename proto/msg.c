// Wire codec: meshlm message structs <-> frames (prefix, protobuf header, raw tensor payloads).
#include "proto/msg.h"

#include <assert.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshlm.pb-c.h"
#include "core/err.h"
#include "transport/curve.h"
#include "worker/kernels/quant.h"

// --- types

static_assert((int)MSG_ERROR == (int)MESHLM__MSG_TYPE__MSG_TYPE_ERROR, "msg_type_t follows MsgType");
static_assert((int)MSG_KV_REPLY == (int)MESHLM__MSG_TYPE__MSG_TYPE_KV_REPLY, "msg_type_t follows MsgType");
static_assert((int)MSG_KV_STATS == (int)MESHLM__KV_OP__KV_OP_STATS, "msg_kv_op_t follows KvOp");
static_assert((int)MSG_ROLE_STANDBY == (int)MESHLM__ROLE__ROLE_STANDBY, "msg_role_t follows Role");
static_assert((int)MSG_LOGITS_NONE == (int)MESHLM__LOGITS_MODE__LOGITS_NONE, "msg_logits_t follows LogitsMode");
static_assert((int)MSG_RESULT_PARTIAL == (int)MESHLM__RESULT_KIND__RESULT_PARTIAL, "kinds follow ResultKind");
static_assert(MSG_PREFIX_LEN == 12, "prefix layout");

#define WHY_MAX 256                 // detail text before the type name is prepended
#define MAX_ELEMS ((int64_t)1 << 40) // per tensor dimension
#define MAX_LAYERS 4096
#define MAX_HEADS 4096
#define MAX_FF (1 << 24)
#define MAX_CTX (1 << 24)
#define MAX_THREADS 4096
#define MAX_CORES 65536

// Header descriptor per type (index = msg_type_t), NULL for none.
static const ProtobufCMessageDescriptor *const type_desc[MSG_TYPE_COUNT] = {
    [MSG_HELLO] = &meshlm__hello__descriptor,
    [MSG_HELLO_ACK] = &meshlm__hello_ack__descriptor,
    [MSG_PLAN] = &meshlm__plan__descriptor,
    [MSG_LOAD_SHARD] = &meshlm__load_shard__descriptor,
    [MSG_LOAD_SHARD_ACK] = &meshlm__load_shard_ack__descriptor,
    [MSG_SLICE_DATA] = &meshlm__slice_data__descriptor,
    [MSG_STEP] = &meshlm__step__descriptor,
    [MSG_RESULT] = &meshlm__result__descriptor,
    [MSG_HEARTBEAT] = &meshlm__heartbeat__descriptor,
    [MSG_SHUTDOWN] = &meshlm__shutdown__descriptor,
    [MSG_ERROR] = &meshlm__error__descriptor,
    [MSG_KV_REQUEST] = &meshlm__kv_request__descriptor,
    [MSG_KV_REPLY] = &meshlm__kv_reply__descriptor,
};

static const char *const type_names[MSG_TYPE_COUNT] = {
    [MSG_NONE] = "NONE",
    [MSG_HELLO] = "HELLO",
    [MSG_HELLO_ACK] = "HELLO_ACK",
    [MSG_PLAN] = "PLAN",
    [MSG_LOAD_SHARD] = "LOAD_SHARD",
    [MSG_LOAD_SHARD_ACK] = "LOAD_SHARD_ACK",
    [MSG_SLICE_DATA] = "SLICE_DATA",
    [MSG_STEP] = "STEP",
    [MSG_RESULT] = "RESULT",
    [MSG_HEARTBEAT] = "HEARTBEAT",
    [MSG_SHUTDOWN] = "SHUTDOWN",
    [MSG_ERROR] = "ERROR",
    [MSG_KV_REQUEST] = "KV_REQUEST",
    [MSG_KV_REPLY] = "KV_REPLY",
};

// Allocation budget for one protobuf unpack: bounds the memory a small hostile header can claim.
typedef struct {
    size_t used;    // bytes handed out so far
    size_t budget;  // bytes allowed in total
    bool refused;   // an allocation was refused for going over the budget
} pb_budget_t;

// Bump allocator over one calloc'd block (the encoder's temporary protobuf structs).
typedef struct {
    unsigned char *base;  // (cap) bytes
    size_t used, cap;
} bump_t;

// --- helpers

__attribute__((format(printf, 4, 5)))
static int fail(char *err, size_t cap, int code, const char *fmt, ...) {
    if (err && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, cap, fmt, ap);
        va_end(ap);
    }
    return code;
}

static void put_u16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)(v & 0xff);
    p[1] = (unsigned char)((v >> 8) & 0xff);
}

static unsigned get_u16(const unsigned char *p) {
    return (unsigned)p[0] | (unsigned)p[1] << 8;
}

static void *pb_alloc(void *ud, size_t n) {
    pb_budget_t *b = ud;
    if (n > b->budget - b->used) {
        b->refused = true;
        return NULL;
    }
    b->used += n;
    return malloc(n ? n : 1);
}

static void pb_free(void *ud, void *p) {
    (void)ud;
    free(p);
}

static void *bump(bump_t *b, size_t n) {
    size_t at = (b->used + 15) & ~(size_t)15;
    if (at > b->cap || n > b->cap - at) return NULL;
    b->used = at + n;
    return b->base + at;
}

// A node id or tensor name: printable ASCII without spaces.
static bool is_ident(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || (unsigned char)*s >= 0x7f) return false;
    return true;
}

// True if s (a fixed array of cap bytes) holds a NUL.
static bool bounded(const char *s, size_t cap) {
    return memchr(s, 0, cap) != NULL;
}

// Copies a decoded protobuf string into a fixed array; MLM_ERANGE if it does not fit.
static int copy_str(char *dst, size_t cap, const char *src, const char *field, char *why) {
    if (!src) src = "";
    size_t n = strnlen(src, cap);
    if (n >= cap) return fail(why, WHY_MAX, MLM_ERANGE, "%s longer than %zu bytes", field, cap - 1);
    memcpy(dst, src, n);
    dst[n] = 0;
    return 0;
}

// Bytes of a tensor of the given type and shape, overflow-checked.
static int shape_bytes(int32_t type, int n_dims, const int64_t *ne, uint64_t *out, const char *field, char *why) {
    const qtype_traits_t *tr = qtype_traits(type);
    if (!tr || tr->blck <= 0 || tr->type_size == 0)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: unknown tensor type %d", field, (int)type);
    if (n_dims < 1 || n_dims > MSG_MAX_DIMS)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: %d dimensions (1..%d)", field, n_dims, MSG_MAX_DIMS);
    for (int i = 0; i < n_dims; i++)
        if (ne[i] < 1 || ne[i] > MAX_ELEMS)
            return fail(why, WHY_MAX, MLM_ERANGE, "%s: ne[%d] = %lld out of range", field, i, (long long)ne[i]);
    if (ne[0] % tr->blck != 0)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: ne[0] = %lld is not a multiple of the %s block (%lld)",
                    field, (long long)ne[0], tr->name, (long long)tr->blck);
    uint64_t bytes = (uint64_t)(ne[0] / tr->blck) * tr->type_size;
    for (int i = 1; i < n_dims; i++)
        if (__builtin_mul_overflow(bytes, (uint64_t)ne[i], &bytes))
            return fail(why, WHY_MAX, MLM_ERANGE, "%s: size overflows", field);
    *out = bytes;
    return 0;
}

static int check_tensor(const msg_tensor_t *t, const msg_limits_t *lim, const char *field, char *why) {
    uint64_t bytes = 0;
    int rc = shape_bytes(t->type, t->n_dims, t->ne, &bytes, field, why);
    if (rc) return rc;
    if (bytes != t->nbytes)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: %s shape needs %llu bytes, header says %llu", field,
                    qtype_name(t->type), (unsigned long long)bytes, (unsigned long long)t->nbytes);
    if (t->nbytes > lim->max_payload)
        return fail(why, WHY_MAX, MLM_ERANGE, "%s: %llu bytes over the %zu-byte limit", field,
                    (unsigned long long)t->nbytes, lim->max_payload);
    return 0;
}

static int check_range(msg_range_t r, uint32_t limit, const char *field, char *why) {
    if (r.begin < 0 || r.begin > r.end || (uint32_t)r.end > limit)
        return fail(why, WHY_MAX, MLM_ERANGE, "%s [%d, %d) outside [0, %u)", field, (int)r.begin, (int)r.end,
                    (unsigned)limit);
    return 0;
}

static int check_id(const char *s, size_t cap, bool may_be_empty, const char *field, char *why) {
    if (!bounded(s, cap)) return fail(why, WHY_MAX, MLM_ERANGE, "%s longer than %zu bytes", field, cap - 1);
    if (!may_be_empty && !*s) return fail(why, WHY_MAX, MLM_EFORMAT, "%s is empty", field);
    if (!is_ident(s)) return fail(why, WHY_MAX, MLM_EFORMAT, "%s has a space or non-printable byte", field);
    return 0;
}

static int check_text(const char *s, size_t cap, const char *field, char *why) {
    if (!bounded(s, cap)) return fail(why, WHY_MAX, MLM_ERANGE, "%s longer than %zu bytes", field, cap - 1);
    return 0;
}

// --- validation (the same rules for what we send and what we accept)

static int check_hello(const msg_hello_t *h, char *why) {
    int rc;
    if (h->proto_major != MSG_PROTO_MAJOR)
        return fail(why, WHY_MAX, MLM_EPROTO, "body version %u.%u, this node speaks %d.%d", (unsigned)h->proto_major,
                    (unsigned)h->proto_minor, MSG_PROTO_MAJOR, MSG_PROTO_MINOR);
    if ((rc = check_id(h->node_id, MSG_ID_MAX, false, "node_id", why))) return rc;
    if ((rc = check_id(h->endpoint, MSG_ENDPOINT_MAX, true, "endpoint", why))) return rc;
    if (h->role <= MSG_ROLE_NONE || h->role > MSG_ROLE_STANDBY)
        return fail(why, WHY_MAX, MLM_EFORMAT, "role %d unknown", (int)h->role);
    if (h->n_cores < 1 || h->n_cores > MAX_CORES)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_cores %u out of range", (unsigned)h->n_cores);
    if (h->n_speeds < 0 || h->n_speeds > MSG_MAX_SPEEDS)
        return fail(why, WHY_MAX, MLM_ERANGE, "%d speeds (max %d)", h->n_speeds, MSG_MAX_SPEEDS);
    for (int i = 0; i < h->n_speeds; i++) {
        const msg_speed_t *s = &h->speeds[i];
        if (!qtype_traits(s->type)) return fail(why, WHY_MAX, MLM_EFORMAT, "speeds[%d]: unknown type %d", i, (int)s->type);
        if (!isfinite(s->gflops) || s->gflops < 0)
            return fail(why, WHY_MAX, MLM_ERANGE, "speeds[%d]: gflops %g", i, (double)s->gflops);
        for (int j = 0; j < i; j++)
            if (h->speeds[j].type == s->type)
                return fail(why, WHY_MAX, MLM_EFORMAT, "speeds: type %s twice", qtype_name(s->type));
    }
    if (h->has_model && h->model_size == 0) return fail(why, WHY_MAX, MLM_EFORMAT, "has_model with model_size 0");
    if ((rc = check_text(h->faults, MSG_TEXT_MAX, "faults", why))) return rc;
    if (h->link_rank < 0 || h->link_rank >= MSG_MAX_NODES)
        return fail(why, WHY_MAX, MLM_ERANGE, "link_rank %d out of range", (int)h->link_rank);
    return 0;
}

static int check_plan(const msg_plan_t *p, char *why) {
    int rc;
    if (p->n_nodes < 1 || p->n_nodes > MSG_MAX_NODES)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_nodes %d out of range (1..%d)", p->n_nodes, MSG_MAX_NODES);
    if (!p->nodes) return fail(why, WHY_MAX, MLM_EINVAL, "nodes is NULL");
    if (p->n_layer < 1 || p->n_layer > MAX_LAYERS || p->n_head < 1 || p->n_head > MAX_HEADS || p->n_head_kv < 1 ||
        p->n_head_kv > p->n_head || p->n_ff < 1 || p->n_ff > MAX_FF || p->n_expert > MSG_MAX_EXPERTS)
        return fail(why, WHY_MAX, MLM_ERANGE, "model dims n_layer %u n_head %u n_head_kv %u n_ff %u n_expert %u",
                    (unsigned)p->n_layer, (unsigned)p->n_head, (unsigned)p->n_head_kv, (unsigned)p->n_ff,
                    (unsigned)p->n_expert);
    if (p->n_ctx < 1 || p->n_ctx > MAX_CTX) return fail(why, WHY_MAX, MLM_ERANGE, "n_ctx %u out of range", (unsigned)p->n_ctx);
    if (!qtype_traits(p->kv_type)) return fail(why, WHY_MAX, MLM_EFORMAT, "kv_type %d unknown", (int)p->kv_type);
    if (p->n_batch > MSG_MAX_TOKENS)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_batch %u out of range", (unsigned)p->n_batch);
    if (p->n_threads > MAX_THREADS)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_threads %u out of range", (unsigned)p->n_threads);
    if (p->tp_mode != MSG_TP_EXACT && p->tp_mode != MSG_TP_ALLREDUCE && p->tp_mode != MSG_TP_EXPERT &&
        p->tp_mode != MSG_TP_EXPERT_LEAD)
        return fail(why, WHY_MAX, MLM_ERANGE, "tp_mode %d unknown", (int)p->tp_mode);
    if ((rc = check_id(p->kv_device, MSG_DEVICE_MAX, true, "kv_device", why))) return rc;
    if ((p->tp_mode == MSG_TP_EXPERT || p->tp_mode == MSG_TP_EXPERT_LEAD) && p->n_expert == 0)
        return fail(why, WHY_MAX, MLM_EFORMAT, "an expert-parallel plan for a model without experts");
    for (int i = 0; i < p->n_nodes; i++) {
        const msg_plan_node_t *nd = &p->nodes[i];
        char f[64];
        if (nd->index >= (uint32_t)p->n_nodes)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%d]: index %u not below n_nodes %d", i, (unsigned)nd->index,
                        p->n_nodes);
        if (nd->index != (uint32_t)i)
            return fail(why, WHY_MAX, MLM_EFORMAT, "nodes[%d]: index %u (nodes must be in index order)", i,
                        (unsigned)nd->index);
        snprintf(f, sizeof f, "nodes[%d].node_id", i);
        if ((rc = check_id(nd->node_id, MSG_ID_MAX, true, f, why))) return rc;
        snprintf(f, sizeof f, "nodes[%d].endpoint", i);
        if ((rc = check_id(nd->endpoint, MSG_ENDPOINT_MAX, true, f, why))) return rc;
        snprintf(f, sizeof f, "nodes[%d].layers", i);
        if ((rc = check_range(nd->layers, p->n_layer, f, why))) return rc;
        snprintf(f, sizeof f, "nodes[%d].heads", i);
        if ((rc = check_range(nd->heads, p->n_head, f, why))) return rc;
        snprintf(f, sizeof f, "nodes[%d].kv_heads", i);
        if ((rc = check_range(nd->kv_heads, p->n_head_kv, f, why))) return rc;
        snprintf(f, sizeof f, "nodes[%d].hidden", i);
        if ((rc = check_range(nd->hidden, p->n_embd, f, why))) return rc;
        snprintf(f, sizeof f, "nodes[%d].vocab", i);
        if ((rc = check_range(nd->vocab, p->n_vocab, f, why))) return rc;
        if (p->tp_mode == MSG_TP_ALLREDUCE && nd->layers.end > nd->layers.begin &&
            (nd->hidden.begin != 0 || (p->n_embd && nd->hidden.end != (int32_t)p->n_embd)))
            return fail(why, WHY_MAX, MLM_EFORMAT, "nodes[%d]: an all-reduce plan's hidden range spans n_embd", i);
        if (!bounded(nd->curve_key, MSG_KEY_MAX) || (nd->curve_key[0] && !curve_key_valid(nd->curve_key)))
            return fail(why, WHY_MAX, MLM_EFORMAT, "nodes[%d].curve_key is not a CurveZMQ key (40 Z85 characters)", i);
        if (!(nd->link_lat_us >= 0 && nd->link_lat_us <= 1e9f)) // also NaN
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%d]: link latency out of range", i);
        if (nd->n_ffn < 0 || nd->n_ffn > MSG_MAX_FFN_RANGES)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%d]: %d ffn ranges (max %d)", i, nd->n_ffn, MSG_MAX_FFN_RANGES);
        for (int j = 0; j < nd->n_ffn; j++) {
            snprintf(f, sizeof f, "nodes[%d].ffn[%d]", i, j);
            if ((rc = check_range(nd->ffn[j], p->n_ff, f, why))) return rc;
        }
        if (nd->n_experts < 0 || (uint32_t)nd->n_experts > p->n_expert)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%d]: %d experts of %u", i, nd->n_experts, (unsigned)p->n_expert);
        uint64_t seen[MSG_MAX_EXPERTS / 64] = {0};
        for (int j = 0; j < nd->n_experts; j++) {
            unsigned e = nd->experts[j];
            if (e >= p->n_expert)
                return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%d].experts[%d] = %u not below n_expert %u", i, j, e,
                            (unsigned)p->n_expert);
            if (seen[e / 64] >> (e % 64) & 1)
                return fail(why, WHY_MAX, MLM_EFORMAT, "nodes[%d]: expert %u twice", i, e);
            seen[e / 64] |= (uint64_t)1 << (e % 64);
        }
        if (nd->n_block_experts < 0 || nd->n_block_experts > MSG_MAX_BLOCK_EXPERTS)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%d]: %d block experts (max %d)", i, nd->n_block_experts,
                        MSG_MAX_BLOCK_EXPERTS);
        for (int j = 0; j < nd->n_block_experts; j++) {
            const uint32_t v = nd->block_experts[j], l = v >> 8, e = v & 255u;
            if (e >= p->n_expert || (int64_t)l < nd->layers.begin || (int64_t)l >= nd->layers.end)
                return fail(why, WHY_MAX, MLM_ERANGE,
                            "nodes[%d].block_experts[%d]: expert %u of layer %u, outside its %u experts or its layers "
                            "%lld-%lld",
                            i, j, (unsigned)e, (unsigned)l, (unsigned)p->n_expert, (long long)nd->layers.begin,
                            (long long)nd->layers.end - 1);
        }
    }
    return 0;
}

static int check_slice(const msg_slice_data_t *s, const msg_limits_t *lim, char *why) {
    int rc;
    if ((rc = check_id(s->tensor, MSG_NAME_MAX, false, "tensor", why))) return rc;
    uint64_t whole = 0;
    if ((rc = shape_bytes(s->type, s->n_dims, s->ne, &whole, "slice", why))) return rc;
    if (s->dim < 0 || s->dim >= s->n_dims)
        return fail(why, WHY_MAX, MLM_ERANGE, "slice dim %d of %d dims", s->dim, s->n_dims);
    if (s->begin < 0 || s->begin >= s->end || s->end > s->ne[s->dim])
        return fail(why, WHY_MAX, MLM_ERANGE, "slice [%lld, %lld) outside dim %d of size %lld", (long long)s->begin,
                    (long long)s->end, s->dim, (long long)s->ne[s->dim]);
    int64_t ne[MSG_MAX_DIMS];
    memcpy(ne, s->ne, sizeof ne);
    ne[s->dim] = s->end - s->begin;
    const qtype_traits_t *tr = qtype_traits(s->type);
    if (s->dim == 0 && (s->begin % tr->blck != 0))
        return fail(why, WHY_MAX, MLM_EFORMAT, "slice begin %lld is not a multiple of the %s block", (long long)s->begin,
                    tr->name);
    uint64_t bytes = 0;
    if ((rc = shape_bytes(s->type, s->n_dims, ne, &bytes, "slice", why))) return rc;
    if (bytes != s->total)
        return fail(why, WHY_MAX, MLM_EFORMAT, "slice needs %llu bytes, total says %llu", (unsigned long long)bytes,
                    (unsigned long long)s->total);
    if (s->len < 1 || s->offset > s->total || s->len > s->total - s->offset)
        return fail(why, WHY_MAX, MLM_ERANGE, "chunk [%llu, +%llu) outside the slice's %llu bytes",
                    (unsigned long long)s->offset, (unsigned long long)s->len, (unsigned long long)s->total);
    if (s->len > lim->max_payload)
        return fail(why, WHY_MAX, MLM_ERANGE, "chunk of %llu bytes over the %zu-byte limit", (unsigned long long)s->len,
                    lim->max_payload);
    return 0;
}

static int check_step(const msg_step_t *s, const msg_limits_t *lim, char *why) {
    int rc;
    if (s->n_tokens < 1 || s->n_tokens > MSG_MAX_TOKENS)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_tokens %u out of range (1..%d)", (unsigned)s->n_tokens, MSG_MAX_TOKENS);
    if (s->pos < 0 || (int64_t)s->pos + s->n_tokens > INT32_MAX)
        return fail(why, WHY_MAX, MLM_ERANGE, "pos %d out of range", (int)s->pos);
    if ((unsigned)s->logits > MSG_LOGITS_NONE) return fail(why, WHY_MAX, MLM_EFORMAT, "logits mode %d unknown", (int)s->logits);
    if (s->has_hidden) {
        if ((rc = check_tensor(&s->hidden, lim, "hidden", why))) return rc;
        int64_t rows = 1;
        for (int i = 1; i < s->hidden.n_dims; i++) rows *= s->hidden.ne[i]; // <= bytes, no overflow
        if (rows != (int64_t)s->n_tokens)
            return fail(why, WHY_MAX, MLM_EFORMAT, "hidden has %lld rows for %u tokens", (long long)rows,
                        (unsigned)s->n_tokens);
        return 0;
    }
    if (!s->tokens) return fail(why, WHY_MAX, MLM_EINVAL, "tokens is NULL");
    for (uint32_t i = 0; i < s->n_tokens; i++)
        if (s->tokens[i] < 0) return fail(why, WHY_MAX, MLM_ERANGE, "tokens[%u] = %d", (unsigned)i, (int)s->tokens[i]);
    return 0;
}

// A KV tensor: F16 or F32, 2 dimensions (row, rows) with rows == want_rows.
static int check_kv_tensor(const msg_tensor_t *t, uint32_t want_rows, bool f32_only, const msg_limits_t *lim,
                           const char *field, char *why) {
    int rc = check_tensor(t, lim, field, why);
    if (rc) return rc;
    if (t->type != QT_F32 && (f32_only || t->type != QT_F16))
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: type %s (F32%s)", field, qtype_name(t->type), f32_only ? "" : " or F16");
    if (t->n_dims != 2 || t->ne[1] != (int64_t)want_rows)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: %d dimensions, %lld rows for %u", field, t->n_dims,
                    (long long)(t->n_dims > 1 ? t->ne[1] : 1), (unsigned)want_rows);
    return 0;
}

static int check_kv_shape(const msg_kv_shape_t *sh, char *why) {
    int rc;
    if (sh->n_layer < 1 || sh->n_layer > MAX_LAYERS || sh->head_dim < 1 || sh->head_dim > MSG_KV_MAX_HEAD_DIM ||
        sh->n_head < 1 || sh->n_head > MAX_HEADS || sh->n_head_kv < 1 || sh->n_head_kv > sh->n_head ||
        sh->n_head % sh->n_head_kv != 0)
        return fail(why, WHY_MAX, MLM_ERANGE, "shape: %u layers, %u heads / %u KV heads of %u", (unsigned)sh->n_layer,
                    (unsigned)sh->n_head, (unsigned)sh->n_head_kv, (unsigned)sh->head_dim);
    if ((rc = check_range(sh->heads, sh->n_head, "shape.heads", why))) return rc;
    if ((rc = check_range(sh->kv_heads, sh->n_head_kv, "shape.kv_heads", why))) return rc;
    if (sh->heads.begin == sh->heads.end || sh->kv_heads.begin == sh->kv_heads.end)
        return fail(why, WHY_MAX, MLM_ERANGE, "shape: no heads");
    if (sh->kv_type != QT_F16 && sh->kv_type != QT_F32)
        return fail(why, WHY_MAX, MLM_EFORMAT, "shape: KV type %d (F16 or F32)", (int)sh->kv_type);
    if (sh->n_seq_max < 1 || sh->n_seq_max > MSG_KV_MAX_SEQS)
        return fail(why, WHY_MAX, MLM_ERANGE, "shape: n_seq_max %u (1..%d)", (unsigned)sh->n_seq_max, MSG_KV_MAX_SEQS);
    return 0;
}

static int check_kv_request(const msg_kv_request_t *r, const msg_limits_t *lim, char *why) {
    int rc;
    if (r->op <= MSG_KV_NONE || r->op > MSG_KV_STATS) return fail(why, WHY_MAX, MLM_EFORMAT, "op %d unknown", (int)r->op);
    if ((r->op == MSG_KV_OPEN) != (r->session == 0))
        return fail(why, WHY_MAX, MLM_EFORMAT, "session %llu for op %d", (unsigned long long)r->session, (int)r->op);
    if (r->op == MSG_KV_OPEN) return check_kv_shape(&r->shape, why);
    if (r->seq < 0 || r->seq >= MSG_KV_MAX_SEQS)
        return fail(why, WHY_MAX, MLM_ERANGE, "seq %d out of range (0..%d)", (int)r->seq, MSG_KV_MAX_SEQS - 1);
    if (r->layer < 0 || r->layer >= MAX_LAYERS) return fail(why, WHY_MAX, MLM_ERANGE, "layer %d out of range", (int)r->layer);
    if (r->op == MSG_KV_SEQ_NEW && (r->n_ctx < 1 || r->n_ctx > MAX_CTX))
        return fail(why, WHY_MAX, MLM_ERANGE, "n_ctx %u out of range", (unsigned)r->n_ctx);
    const bool kv = r->op == MSG_KV_APPEND || (r->op == MSG_KV_ATTEND && r->has_kv);
    if (r->has_kv != kv || r->has_q != (r->op == MSG_KV_ATTEND))
        return fail(why, WHY_MAX, MLM_EFORMAT, "op %d with%s k/v and with%s q", (int)r->op, r->has_kv ? "" : "out",
                    r->has_q ? "" : "out");
    if (kv) {
        if (r->append_pos < 0 || r->append_pos > MAX_CTX || r->append_n < 1 || r->append_n > MSG_MAX_TOKENS)
            return fail(why, WHY_MAX, MLM_ERANGE, "append [%d, +%u) out of range", (int)r->append_pos, (unsigned)r->append_n);
        if ((rc = check_kv_tensor(&r->k, r->append_n, false, lim, "k", why))) return rc;
        if ((rc = check_kv_tensor(&r->v, r->append_n, false, lim, "v", why))) return rc;
        if (r->k.type != r->v.type || r->k.ne[0] != r->v.ne[0])
            return fail(why, WHY_MAX, MLM_EFORMAT, "k and v differ in type or row");
    }
    if (r->has_q) {
        if (r->pos < 0 || r->pos > MAX_CTX || r->n < 1 || r->n > MSG_MAX_TOKENS)
            return fail(why, WHY_MAX, MLM_ERANGE, "query rows [%d, +%u) out of range", (int)r->pos, (unsigned)r->n);
        if ((rc = check_kv_tensor(&r->q, r->n, false, lim, "q", why))) return rc;
    }
    return 0;
}

static int check_kv_reply(const msg_kv_reply_t *r, const msg_limits_t *lim, char *why) {
    int rc;
    if (r->status > 0) return fail(why, WHY_MAX, MLM_ERANGE, "status %d is not 0 or an error code", (int)r->status);
    if ((rc = check_text(r->text, MSG_TEXT_MAX, "text", why))) return rc;
    if (r->has_out) {
        if (r->out.n_dims != 2) return fail(why, WHY_MAX, MLM_EFORMAT, "out: %d dimensions (2)", r->out.n_dims);
        if ((rc = check_kv_tensor(&r->out, (uint32_t)r->out.ne[1], true, lim, "out", why))) return rc;
    }
    return 0;
}

// Checks every field of m against the protocol's rules and lim.
static int check_msg(const msg_t *m, const msg_limits_t *lim, char *why) {
    int rc;
    switch (m->type) {
    case MSG_HELLO:
        return check_hello(&m->hello, why);
    case MSG_HELLO_ACK:
        if (m->hello_ack.node_index < -1 || m->hello_ack.node_index >= MSG_MAX_NODES)
            return fail(why, WHY_MAX, MLM_ERANGE, "node_index %d out of range", (int)m->hello_ack.node_index);
        return check_text(m->hello_ack.reason, MSG_TEXT_MAX, "reason", why);
    case MSG_PLAN:
        return check_plan(&m->plan, why);
    case MSG_LOAD_SHARD:
        if (m->load_shard.node_index >= MSG_MAX_NODES)
            return fail(why, WHY_MAX, MLM_ERANGE, "node_index %u out of range", (unsigned)m->load_shard.node_index);
        return 0;
    case MSG_LOAD_SHARD_ACK:
        if (m->load_shard_ack.node_index >= MSG_MAX_NODES)
            return fail(why, WHY_MAX, MLM_ERANGE, "node_index %u out of range", (unsigned)m->load_shard_ack.node_index);
        if (m->load_shard_ack.status > 0)
            return fail(why, WHY_MAX, MLM_ERANGE, "status %d is not 0 or an error code", (int)m->load_shard_ack.status);
        return 0;
    case MSG_SLICE_DATA:
        return check_slice(&m->slice_data, lim, why);
    case MSG_STEP:
        return check_step(&m->step, lim, why);
    case MSG_RESULT:
        if (m->result.node_index >= MSG_MAX_NODES)
            return fail(why, WHY_MAX, MLM_ERANGE, "node_index %u out of range", (unsigned)m->result.node_index);
        if (m->result.kind < MSG_RESULT_NONE || m->result.kind > MSG_RESULT_PARTIAL)
            return fail(why, WHY_MAX, MLM_EFORMAT, "result kind %d unknown", (int)m->result.kind);
        if (m->result.kind == MSG_RESULT_NONE) return 0; // a report: no tensor
        return check_tensor(&m->result.tensor, lim, "tensor", why);
    case MSG_HEARTBEAT:
        if ((rc = check_id(m->heartbeat.node_id, MSG_ID_MAX, false, "node_id", why))) return rc;
        if (!isfinite(m->heartbeat.load) || m->heartbeat.load < 0 || m->heartbeat.load > 1e6f)
            return fail(why, WHY_MAX, MLM_ERANGE, "load %g out of range", (double)m->heartbeat.load);
        return 0;
    case MSG_SHUTDOWN:
        return check_text(m->shutdown.reason, MSG_TEXT_MAX, "reason", why);
    case MSG_ERROR:
        if (m->error.code >= 0) return fail(why, WHY_MAX, MLM_ERANGE, "code %d is not negative", (int)m->error.code);
        return check_text(m->error.text, MSG_TEXT_MAX, "text", why);
    case MSG_KV_REQUEST:
        return check_kv_request(&m->kv_request, lim, why);
    case MSG_KV_REPLY:
        return check_kv_reply(&m->kv_reply, lim, why);
    default:
        return fail(why, WHY_MAX, MLM_EPROTO, "unknown message type %d", (int)m->type);
    }
}

// Raw payload slots of m in frame order (pointers to its data fields and their lengths).
static int raw_slots(msg_t *m, const void **slot[MSG_MAX_RAW], uint64_t len[MSG_MAX_RAW]) {
    switch (m->type) {
    case MSG_SLICE_DATA:
        slot[0] = &m->slice_data.data;
        len[0] = m->slice_data.len;
        return 1;
    case MSG_STEP:
        if (!m->step.has_hidden) return 0;
        slot[0] = &m->step.hidden.data;
        len[0] = m->step.hidden.nbytes;
        return 1;
    case MSG_RESULT:
        if (m->result.kind == MSG_RESULT_NONE) return 0;
        slot[0] = &m->result.tensor.data;
        len[0] = m->result.tensor.nbytes;
        return 1;
    case MSG_KV_REQUEST: {
        msg_kv_request_t *r = &m->kv_request;
        int n = 0;
        if (r->has_kv) {
            slot[n] = &r->k.data;
            len[n++] = r->k.nbytes;
            slot[n] = &r->v.data;
            len[n++] = r->v.nbytes;
        }
        if (r->has_q) {
            slot[n] = &r->q.data;
            len[n++] = r->q.nbytes;
        }
        return n;
    }
    case MSG_KV_REPLY:
        if (!m->kv_reply.has_out) return 0;
        slot[0] = &m->kv_reply.out.data;
        len[0] = m->kv_reply.out.nbytes;
        return 1;
    default:
        return 0;
    }
}

// --- encode: msg_t -> protobuf structs

static void tensor_to_pb(const msg_tensor_t *t, Meshlm__TensorDesc *d) {
    meshlm__tensor_desc__init(d);
    d->dtype = (uint32_t)t->type;
    d->n_ne = (size_t)t->n_dims;
    d->ne = (int64_t *)t->ne; // pack only reads
    d->nbytes = t->nbytes;
}

static void range_to_pb(msg_range_t r, Meshlm__Range *d) {
    meshlm__range__init(d);
    d->begin = r.begin;
    d->end = r.end;
}

// Header structs of every type; the encoder fills the one for m->type.
typedef union {
    ProtobufCMessage base;
    Meshlm__Hello hello;
    Meshlm__HelloAck hello_ack;
    Meshlm__Plan plan;
    Meshlm__LoadShard load_shard;
    Meshlm__LoadShardAck load_shard_ack;
    Meshlm__SliceData slice_data;
    Meshlm__Step step;
    Meshlm__Result result;
    Meshlm__Heartbeat heartbeat;
    Meshlm__Shutdown shutdown;
    Meshlm__Error error;
    Meshlm__KvRequest kv_request;
    Meshlm__KvReply kv_reply;
} pb_any_t;

// Scratch an encoder needs beside pb_any_t (sub-messages that live on the stack).
typedef struct {
    Meshlm__Capabilities caps;
    Meshlm__TypeSpeed speed[MSG_MAX_SPEEDS];
    Meshlm__TypeSpeed *speed_p[MSG_MAX_SPEEDS];
    Meshlm__TensorDesc tensor;
    Meshlm__SliceDesc slice;
    Meshlm__TensorDesc kvt[3];  // a KV request's k, v, q
    Meshlm__KvShape kv_shape;
    Meshlm__Range kv_range[2];
    Meshlm__KvStats kv_stats;
    bump_t heap;  // plan nodes (freed by the caller)
} pb_scratch_t;

static int plan_to_pb(const msg_plan_t *p, Meshlm__Plan *d, bump_t *heap) {
    size_t n = (size_t)p->n_nodes;
    size_t per = sizeof(Meshlm__PlanNode) + sizeof(Meshlm__PlanNode *) +
                 (3 + MSG_MAX_FFN_RANGES) * sizeof(Meshlm__Range) + MSG_MAX_FFN_RANGES * sizeof(Meshlm__Range *) +
                 (MSG_MAX_EXPERTS + MSG_MAX_BLOCK_EXPERTS) * sizeof(uint32_t) + 9 * 16;
    heap->cap = n * per + 64;
    heap->base = calloc(1, heap->cap);
    if (!heap->base) return MLM_ENOMEM;
    meshlm__plan__init(d);
    d->plan_id = p->plan_id;
    d->model_sha256.len = MSG_SHA256_LEN;
    d->model_sha256.data = (uint8_t *)p->model_sha256;
    d->node_count = (uint32_t)p->n_nodes;
    d->n_ctx = p->n_ctx;
    d->kv_type = (uint32_t)p->kv_type;
    d->n_threads = p->n_threads;
    d->n_batch = p->n_batch;
    d->tp_mode = (Meshlm__TpMode)p->tp_mode;
    d->kv_device = (char *)p->kv_device;
    d->n_layer = p->n_layer;
    d->n_head = p->n_head;
    d->n_head_kv = p->n_head_kv;
    d->n_ff = p->n_ff;
    d->n_expert = p->n_expert;
    d->n_embd = p->n_embd;
    d->n_vocab = p->n_vocab;
    d->n_nodes = n;
    d->nodes = bump(heap, n * sizeof *d->nodes);
    if (!d->nodes) return MLM_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const msg_plan_node_t *s = &p->nodes[i];
        Meshlm__PlanNode *o = bump(heap, sizeof *o);
        Meshlm__Range *r = bump(heap, (5 + MSG_MAX_FFN_RANGES) * sizeof *r);
        Meshlm__Range **rp = bump(heap, MSG_MAX_FFN_RANGES * sizeof *rp);
        uint32_t *ex = bump(heap, MSG_MAX_EXPERTS * sizeof *ex);
        uint32_t *bx = s->n_block_experts > 0 ? bump(heap, (size_t)s->n_block_experts * sizeof *bx) : NULL;
        if (!o || !r || !rp || !ex || (s->n_block_experts > 0 && !bx)) return MLM_ENOMEM;
        meshlm__plan_node__init(o);
        o->index = s->index;
        o->node_id = (char *)s->node_id;
        o->endpoint = (char *)s->endpoint;
        range_to_pb(s->layers, &r[0]);
        range_to_pb(s->heads, &r[1]);
        range_to_pb(s->kv_heads, &r[2]);
        o->layers = &r[0];
        o->heads = &r[1];
        o->kv_heads = &r[2];
        range_to_pb(s->hidden, &r[3]);
        range_to_pb(s->vocab, &r[4]);
        o->hidden = &r[3];
        o->vocab = &r[4];
        o->link_lat_us = s->link_lat_us;
        o->link_bw = s->link_bw;
        o->curve_key = (char *)s->curve_key;
        for (int j = 0; j < s->n_ffn; j++) {
            range_to_pb(s->ffn[j], &r[5 + j]);
            rp[j] = &r[5 + j];
        }
        o->n_ffn = (size_t)s->n_ffn;
        o->ffn = rp;
        for (int j = 0; j < s->n_experts; j++) ex[j] = s->experts[j];
        o->n_experts = (size_t)s->n_experts;
        o->experts = ex;
        for (int j = 0; j < s->n_block_experts; j++) bx[j] = s->block_experts[j];
        o->n_block_experts = (size_t)(s->n_block_experts > 0 ? s->n_block_experts : 0);
        o->block_experts = bx;
        d->nodes[i] = o;
    }
    return 0;
}

// Fills pb (and sc) from a validated m; the result borrows m's strings and arrays.
static int msg_to_pb(const msg_t *m, pb_any_t *pb, pb_scratch_t *sc) {
    switch (m->type) {
    case MSG_HELLO: {
        const msg_hello_t *h = &m->hello;
        Meshlm__Hello *d = &pb->hello;
        meshlm__hello__init(d);
        meshlm__capabilities__init(&sc->caps);
        d->proto_major = h->proto_major;
        d->proto_minor = h->proto_minor;
        d->node_id = (char *)h->node_id;
        d->role = (Meshlm__Role)h->role;
        d->endpoint = (char *)h->endpoint;
        d->faults = (char *)h->faults;
        d->link_rank = h->link_rank;
        d->caps = &sc->caps;
        sc->caps.n_cores = h->n_cores;
        sc->caps.ram_budget_bytes = h->ram_budget_bytes;
        for (int i = 0; i < h->n_speeds; i++) {
            meshlm__type_speed__init(&sc->speed[i]);
            sc->speed[i].dtype = (uint32_t)h->speeds[i].type;
            sc->speed[i].gflops = h->speeds[i].gflops;
            sc->speed_p[i] = &sc->speed[i];
        }
        sc->caps.n_speed = (size_t)h->n_speeds;
        sc->caps.speed = sc->speed_p;
        sc->caps.mem_bw_bytes_s = h->mem_bw_bytes_s;
        sc->caps.disk_read_bw_bytes_s = h->disk_read_bw_bytes_s;
        sc->caps.has_model = h->has_model;
        if (h->has_model) {
            sc->caps.model_sha256.len = MSG_SHA256_LEN;
            sc->caps.model_sha256.data = (uint8_t *)h->model_sha256;
            sc->caps.model_size = h->model_size;
        }
        return 0;
    }
    case MSG_HELLO_ACK: {
        Meshlm__HelloAck *d = &pb->hello_ack;
        meshlm__hello_ack__init(d);
        d->accepted = m->hello_ack.accepted;
        d->reason = (char *)m->hello_ack.reason;
        d->proto_major = m->hello_ack.proto_major;
        d->proto_minor = m->hello_ack.proto_minor;
        d->node_index = m->hello_ack.node_index;
        return 0;
    }
    case MSG_PLAN:
        return plan_to_pb(&m->plan, &pb->plan, &sc->heap);
    case MSG_LOAD_SHARD: {
        Meshlm__LoadShard *d = &pb->load_shard;
        meshlm__load_shard__init(d);
        d->plan_id = m->load_shard.plan_id;
        d->node_index = m->load_shard.node_index;
        d->via_coordinator = m->load_shard.via_coordinator;
        d->expected_bytes = m->load_shard.expected_bytes;
        return 0;
    }
    case MSG_LOAD_SHARD_ACK: {
        const msg_load_shard_ack_t *s = &m->load_shard_ack;
        Meshlm__LoadShardAck *d = &pb->load_shard_ack;
        meshlm__load_shard_ack__init(d);
        d->plan_id = s->plan_id;
        d->node_index = s->node_index;
        d->status = s->status;
        d->bytes = s->bytes;
        d->ms = s->ms;
        d->from_cache = s->from_cache;
        return 0;
    }
    case MSG_SLICE_DATA: {
        const msg_slice_data_t *s = &m->slice_data;
        Meshlm__SliceData *d = &pb->slice_data;
        meshlm__slice_data__init(d);
        meshlm__slice_desc__init(&sc->slice);
        d->plan_id = s->plan_id;
        d->tensor = (char *)s->tensor;
        d->slice = &sc->slice;
        sc->slice.dtype = (uint32_t)s->type;
        sc->slice.n_ne = (size_t)s->n_dims;
        sc->slice.ne = (int64_t *)s->ne;
        sc->slice.dim = (uint32_t)s->dim;
        sc->slice.begin = s->begin;
        sc->slice.end = s->end;
        d->offset = s->offset;
        d->total = s->total;
        d->chunk_len = s->len;
        return 0;
    }
    case MSG_STEP: {
        const msg_step_t *s = &m->step;
        Meshlm__Step *d = &pb->step;
        meshlm__step__init(d);
        d->plan_id = s->plan_id;
        d->step_id = s->step_id;
        d->seq_id = s->seq_id;
        d->pos = s->pos;
        d->token_count = s->n_tokens;
        if (s->has_hidden) {
            tensor_to_pb(&s->hidden, &sc->tensor);
            d->hidden = &sc->tensor;
        } else {
            d->n_tokens = s->n_tokens;
            d->tokens = (int32_t *)s->tokens;
        }
        d->logits = (Meshlm__LogitsMode)s->logits;
        d->ubatch = s->ubatch;
        d->one_order = s->one_order;
        return 0;
    }
    case MSG_RESULT: {
        const msg_result_t *s = &m->result;
        Meshlm__Result *d = &pb->result;
        meshlm__result__init(d);
        d->plan_id = s->plan_id;
        d->step_id = s->step_id;
        d->seq_id = s->seq_id;
        d->node_index = s->node_index;
        d->kind = (Meshlm__ResultKind)s->kind;
        if (s->kind != MSG_RESULT_NONE) {
            tensor_to_pb(&s->tensor, &sc->tensor);
            d->tensor = &sc->tensor;
        }
        d->compute_ns = s->compute_ns;
        d->comm_ns = s->comm_ns;
        d->bytes_sent = s->bytes_sent;
        d->shm_collectives = s->shm_collectives;
        return 0;
    }
    case MSG_HEARTBEAT: {
        Meshlm__Heartbeat *d = &pb->heartbeat;
        meshlm__heartbeat__init(d);
        d->node_id = (char *)m->heartbeat.node_id;
        d->seq = m->heartbeat.seq;
        d->unix_ms = m->heartbeat.unix_ms;
        d->load = m->heartbeat.load;
        d->rss_bytes = m->heartbeat.rss_bytes;
        return 0;
    }
    case MSG_SHUTDOWN:
        meshlm__shutdown__init(&pb->shutdown);
        pb->shutdown.drain = m->shutdown.drain;
        pb->shutdown.reason = (char *)m->shutdown.reason;
        return 0;
    case MSG_ERROR:
        meshlm__error__init(&pb->error);
        pb->error.code = m->error.code;
        pb->error.text = (char *)m->error.text;
        pb->error.step_id = m->error.step_id;
        pb->error.lost_node = m->error.lost_node >= 0 && m->error.lost_node < MSG_MAX_NODES ? (uint32_t)m->error.lost_node + 1 : 0;
        return 0;
    case MSG_KV_REQUEST: {
        const msg_kv_request_t *r = &m->kv_request;
        Meshlm__KvRequest *d = &pb->kv_request;
        meshlm__kv_request__init(d);
        d->session = r->session;
        d->req_id = r->req_id;
        d->op = (Meshlm__KvOp)r->op;
        if (r->op == MSG_KV_OPEN) {
            meshlm__kv_shape__init(&sc->kv_shape);
            sc->kv_shape.n_layer = r->shape.n_layer;
            sc->kv_shape.head_dim = r->shape.head_dim;
            sc->kv_shape.n_head = r->shape.n_head;
            sc->kv_shape.n_head_kv = r->shape.n_head_kv;
            range_to_pb(r->shape.heads, &sc->kv_range[0]);
            range_to_pb(r->shape.kv_heads, &sc->kv_range[1]);
            sc->kv_shape.heads = &sc->kv_range[0];
            sc->kv_shape.kv_heads = &sc->kv_range[1];
            sc->kv_shape.kv_type = (uint32_t)r->shape.kv_type;
            sc->kv_shape.n_seq_max = r->shape.n_seq_max;
            d->shape = &sc->kv_shape;
        }
        d->seq = r->seq;
        d->layer = r->layer;
        d->pos = r->pos;
        d->n = r->n;
        d->n_ctx = r->n_ctx;
        d->append_pos = r->append_pos;
        d->append_n = r->append_n;
        if (r->has_kv) {
            tensor_to_pb(&r->k, &sc->kvt[0]);
            tensor_to_pb(&r->v, &sc->kvt[1]);
            d->k = &sc->kvt[0];
            d->v = &sc->kvt[1];
        }
        if (r->has_q) {
            tensor_to_pb(&r->q, &sc->kvt[2]);
            d->q = &sc->kvt[2];
        }
        return 0;
    }
    case MSG_KV_REPLY: {
        const msg_kv_reply_t *r = &m->kv_reply;
        Meshlm__KvReply *d = &pb->kv_reply;
        meshlm__kv_reply__init(d);
        meshlm__kv_stats__init(&sc->kv_stats);
        d->session = r->session;
        d->req_id = r->req_id;
        d->status = r->status;
        d->text = (char *)r->text;
        if (r->has_out) {
            tensor_to_pb(&r->out, &sc->kvt[0]);
            d->out = &sc->kvt[0];
        }
        sc->kv_stats.kv_bytes = r->stats.kv_bytes;
        sc->kv_stats.bytes_read = r->stats.bytes_read;
        sc->kv_stats.bytes_written = r->stats.bytes_written;
        sc->kv_stats.compute_ns = r->stats.compute_ns;
        sc->kv_stats.flash_ns = r->stats.flash_ns;
        d->stats = &sc->kv_stats;
        return 0;
    }
    default:
        return MLM_EPROTO;
    }
}

// --- decode: protobuf structs -> msg_t (sizes checked before anything is copied)

static int tensor_from_pb(const Meshlm__TensorDesc *d, msg_tensor_t *t, const char *field, char *why) {
    if (!d) return fail(why, WHY_MAX, MLM_EFORMAT, "%s missing", field);
    if (d->n_ne < 1 || d->n_ne > MSG_MAX_DIMS)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%s: %zu dimensions (1..%d)", field, d->n_ne, MSG_MAX_DIMS);
    if (d->dtype > INT32_MAX) return fail(why, WHY_MAX, MLM_EFORMAT, "%s: unknown tensor type %u", field, (unsigned)d->dtype);
    t->type = (int32_t)d->dtype;
    t->n_dims = (int)d->n_ne;
    for (int i = 0; i < MSG_MAX_DIMS; i++) t->ne[i] = i < t->n_dims ? d->ne[i] : 1;
    t->nbytes = d->nbytes;
    return 0;
}

static msg_range_t range_from_pb(const Meshlm__Range *r) {
    msg_range_t o = {0, 0};
    if (r) {
        o.begin = r->begin;
        o.end = r->end;
    }
    return o;
}

static int u32_to_i32(uint32_t v, int32_t *out, const char *field, char *why) {
    if (v > INT32_MAX) return fail(why, WHY_MAX, MLM_ERANGE, "%s %u out of range", field, (unsigned)v);
    *out = (int32_t)v;
    return 0;
}

static int hello_from_pb(const Meshlm__Hello *d, msg_hello_t *h, char *why) {
    int rc;
    if (d->proto_major > 0xffff || d->proto_minor > 0xffff)
        return fail(why, WHY_MAX, MLM_EPROTO, "body version %u.%u out of range", (unsigned)d->proto_major,
                    (unsigned)d->proto_minor);
    h->proto_major = (uint16_t)d->proto_major;
    h->proto_minor = (uint16_t)d->proto_minor;
    if ((rc = copy_str(h->node_id, MSG_ID_MAX, d->node_id, "node_id", why))) return rc;
    if ((rc = copy_str(h->endpoint, MSG_ENDPOINT_MAX, d->endpoint, "endpoint", why))) return rc;
    if ((rc = copy_str(h->faults, MSG_TEXT_MAX, d->faults, "faults", why))) return rc;
    if (d->link_rank < 0 || d->link_rank >= MSG_MAX_NODES)
        return fail(why, WHY_MAX, MLM_ERANGE, "link_rank %d out of range", (int)d->link_rank);
    h->link_rank = d->link_rank;
    h->role = (msg_role_t)d->role;
    const Meshlm__Capabilities *c = d->caps;
    if (!c) return fail(why, WHY_MAX, MLM_EFORMAT, "caps missing");
    h->n_cores = c->n_cores;
    h->ram_budget_bytes = c->ram_budget_bytes;
    if (c->n_speed > MSG_MAX_SPEEDS)
        return fail(why, WHY_MAX, MLM_ERANGE, "%zu speeds (max %d)", c->n_speed, MSG_MAX_SPEEDS);
    h->n_speeds = (int)c->n_speed;
    for (size_t i = 0; i < c->n_speed; i++) {
        if ((rc = u32_to_i32(c->speed[i]->dtype, &h->speeds[i].type, "speed type", why))) return rc;
        h->speeds[i].gflops = c->speed[i]->gflops;
    }
    h->mem_bw_bytes_s = c->mem_bw_bytes_s;
    h->disk_read_bw_bytes_s = c->disk_read_bw_bytes_s;
    h->has_model = c->has_model;
    if (c->model_sha256.len != (h->has_model ? MSG_SHA256_LEN : 0))
        return fail(why, WHY_MAX, MLM_EFORMAT, "model_sha256 has %zu bytes (has_model %d)", c->model_sha256.len,
                    (int)h->has_model);
    if (h->has_model) memcpy(h->model_sha256, c->model_sha256.data, MSG_SHA256_LEN);
    else if (c->model_size != 0) return fail(why, WHY_MAX, MLM_EFORMAT, "model_size without has_model");
    h->model_size = c->model_size;
    return 0;
}

static int plan_from_pb(const Meshlm__Plan *d, msg_t *m, char *why) {
    msg_plan_t *p = &m->plan;
    int rc;
    if (d->node_count < 1 || d->node_count > MSG_MAX_NODES)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_nodes %u out of range (1..%d)", (unsigned)d->node_count, MSG_MAX_NODES);
    if (d->n_nodes != d->node_count)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%zu node entries for n_nodes %u", d->n_nodes, (unsigned)d->node_count);
    if (d->model_sha256.len != MSG_SHA256_LEN)
        return fail(why, WHY_MAX, MLM_EFORMAT, "model_sha256 has %zu bytes", d->model_sha256.len);
    p->plan_id = d->plan_id;
    memcpy(p->model_sha256, d->model_sha256.data, MSG_SHA256_LEN);
    p->n_layer = d->n_layer;
    p->n_head = d->n_head;
    p->n_head_kv = d->n_head_kv;
    p->n_ff = d->n_ff;
    p->n_embd = d->n_embd;
    p->n_vocab = d->n_vocab;
    p->n_expert = d->n_expert;
    p->n_ctx = d->n_ctx;
    if ((rc = u32_to_i32(d->kv_type, &p->kv_type, "kv_type", why))) return rc;
    p->n_threads = d->n_threads;
    p->n_batch = d->n_batch;
    if (d->tp_mode != MESHLM__TP_MODE__TP_MODE_EXACT && d->tp_mode != MESHLM__TP_MODE__TP_MODE_ALLREDUCE &&
        d->tp_mode != MESHLM__TP_MODE__TP_MODE_EXPERT && d->tp_mode != MESHLM__TP_MODE__TP_MODE_EXPERT_LEAD)
        return fail(why, WHY_MAX, MLM_ERANGE,
                    "tp_mode %d unknown (expert parallelism needs protocol 1.%d, with attention on the leader 1.%d)",
                    (int)d->tp_mode, MSG_MINOR_EP, MSG_MINOR_EP_LEAD);
    p->tp_mode = (msg_tp_mode_t)d->tp_mode;
    if ((rc = copy_str(p->kv_device, MSG_DEVICE_MAX, d->kv_device, "kv_device", why))) return rc;
    p->n_nodes = (int)d->node_count;
    msg_plan_node_t *nodes = calloc(d->n_nodes, sizeof *nodes);
    if (!nodes) return fail(why, WHY_MAX, MLM_ENOMEM, "out of memory for %zu nodes", d->n_nodes);
    m->alloc_ = nodes;
    p->nodes = nodes;
    for (size_t i = 0; i < d->n_nodes; i++) {
        const Meshlm__PlanNode *s = d->nodes[i];
        msg_plan_node_t *o = &nodes[i];
        o->index = s->index;
        if ((rc = copy_str(o->node_id, MSG_ID_MAX, s->node_id, "node_id", why))) return rc;
        if ((rc = copy_str(o->endpoint, MSG_ENDPOINT_MAX, s->endpoint, "endpoint", why))) return rc;
        o->layers = range_from_pb(s->layers);
        o->heads = range_from_pb(s->heads);
        o->kv_heads = range_from_pb(s->kv_heads);
        o->hidden = range_from_pb(s->hidden);
        o->vocab = range_from_pb(s->vocab);
        o->link_lat_us = s->link_lat_us;
        o->link_bw = s->link_bw;
        if ((rc = copy_str(o->curve_key, MSG_KEY_MAX, s->curve_key, "curve_key", why))) return rc;
        if (s->n_ffn > MSG_MAX_FFN_RANGES)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%zu]: %zu ffn ranges (max %d)", i, s->n_ffn, MSG_MAX_FFN_RANGES);
        o->n_ffn = (int)s->n_ffn;
        for (size_t j = 0; j < s->n_ffn; j++) o->ffn[j] = range_from_pb(s->ffn[j]);
        if (s->n_experts > MSG_MAX_EXPERTS)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%zu]: %zu experts (max %d)", i, s->n_experts, MSG_MAX_EXPERTS);
        o->n_experts = (int)s->n_experts;
        for (size_t j = 0; j < s->n_experts; j++) {
            if (s->experts[j] >= MSG_MAX_EXPERTS)
                return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%zu].experts[%zu] = %u out of range", i, j,
                            (unsigned)s->experts[j]);
            o->experts[j] = (uint16_t)s->experts[j];
        }
        if (s->n_block_experts > MSG_MAX_BLOCK_EXPERTS)
            return fail(why, WHY_MAX, MLM_ERANGE, "nodes[%zu]: %zu block experts (max %d)", i, s->n_block_experts,
                        MSG_MAX_BLOCK_EXPERTS);
        o->n_block_experts = (int)s->n_block_experts;
        for (size_t j = 0; j < s->n_block_experts; j++) o->block_experts[j] = s->block_experts[j];
    }
    return 0;
}

static int slice_from_pb(const Meshlm__SliceData *d, msg_slice_data_t *s, char *why) {
    int rc;
    s->plan_id = d->plan_id;
    if ((rc = copy_str(s->tensor, MSG_NAME_MAX, d->tensor, "tensor", why))) return rc;
    const Meshlm__SliceDesc *sl = d->slice;
    if (!sl) return fail(why, WHY_MAX, MLM_EFORMAT, "slice missing");
    if (sl->n_ne < 1 || sl->n_ne > MSG_MAX_DIMS)
        return fail(why, WHY_MAX, MLM_EFORMAT, "slice: %zu dimensions (1..%d)", sl->n_ne, MSG_MAX_DIMS);
    if ((rc = u32_to_i32(sl->dtype, &s->type, "slice type", why))) return rc;
    s->n_dims = (int)sl->n_ne;
    for (int i = 0; i < MSG_MAX_DIMS; i++) s->ne[i] = i < s->n_dims ? sl->ne[i] : 1;
    if (sl->dim >= MSG_MAX_DIMS) return fail(why, WHY_MAX, MLM_ERANGE, "slice dim %u out of range", (unsigned)sl->dim);
    s->dim = (int)sl->dim;
    s->begin = sl->begin;
    s->end = sl->end;
    s->offset = d->offset;
    s->total = d->total;
    s->len = d->chunk_len;
    return 0;
}

static int step_from_pb(const Meshlm__Step *d, msg_t *m, char *why) {
    msg_step_t *s = &m->step;
    s->plan_id = d->plan_id;
    s->step_id = d->step_id;
    s->seq_id = d->seq_id;
    s->pos = d->pos;
    s->logits = (msg_logits_t)d->logits;
    s->ubatch = d->ubatch;
    s->one_order = d->one_order;
    if (d->token_count < 1 || d->token_count > MSG_MAX_TOKENS)
        return fail(why, WHY_MAX, MLM_ERANGE, "n_tokens %u out of range (1..%d)", (unsigned)d->token_count,
                    MSG_MAX_TOKENS);
    s->n_tokens = d->token_count;
    if (d->hidden) {
        if (d->n_tokens != 0) return fail(why, WHY_MAX, MLM_EFORMAT, "both tokens and hidden state");
        s->has_hidden = true;
        return tensor_from_pb(d->hidden, &s->hidden, "hidden", why);
    }
    if (d->n_tokens != d->token_count)
        return fail(why, WHY_MAX, MLM_EFORMAT, "%zu token ids for n_tokens %u", d->n_tokens, (unsigned)d->token_count);
    int32_t *tok = malloc(d->n_tokens * sizeof *tok);
    if (!tok) return fail(why, WHY_MAX, MLM_ENOMEM, "out of memory for %zu tokens", d->n_tokens);
    memcpy(tok, d->tokens, d->n_tokens * sizeof *tok);
    m->alloc_ = tok;
    s->tokens = tok;
    return 0;
}

static int kv_request_from_pb(const Meshlm__KvRequest *d, msg_kv_request_t *r, char *why) {
    int rc;
    r->session = d->session;
    r->req_id = d->req_id;
    if (d->op <= MESHLM__KV_OP__KV_OP_NONE || d->op > MESHLM__KV_OP__KV_OP_STATS)
        return fail(why, WHY_MAX, MLM_EFORMAT, "op %d unknown", (int)d->op);
    r->op = (msg_kv_op_t)d->op;
    if (r->op == MSG_KV_OPEN) {
        const Meshlm__KvShape *sh = d->shape;
        if (!sh) return fail(why, WHY_MAX, MLM_EFORMAT, "OPEN without a shape");
        r->shape.n_layer = sh->n_layer;
        r->shape.head_dim = sh->head_dim;
        r->shape.n_head = sh->n_head;
        r->shape.n_head_kv = sh->n_head_kv;
        r->shape.heads = range_from_pb(sh->heads);
        r->shape.kv_heads = range_from_pb(sh->kv_heads);
        if ((rc = u32_to_i32(sh->kv_type, &r->shape.kv_type, "shape.kv_type", why))) return rc;
        r->shape.n_seq_max = sh->n_seq_max;
    }
    r->seq = d->seq;
    r->layer = d->layer;
    r->pos = d->pos;
    r->n = d->n;
    r->n_ctx = d->n_ctx;
    r->append_pos = d->append_pos;
    r->append_n = d->append_n;
    if ((d->k != NULL) != (d->v != NULL)) return fail(why, WHY_MAX, MLM_EFORMAT, "k without v or v without k");
    r->has_kv = d->k != NULL;
    if (r->has_kv) {
        if ((rc = tensor_from_pb(d->k, &r->k, "k", why))) return rc;
        if ((rc = tensor_from_pb(d->v, &r->v, "v", why))) return rc;
    }
    r->has_q = d->q != NULL;
    if (r->has_q && (rc = tensor_from_pb(d->q, &r->q, "q", why))) return rc;
    return 0;
}

static int kv_reply_from_pb(const Meshlm__KvReply *d, msg_kv_reply_t *r, char *why) {
    int rc;
    r->session = d->session;
    r->req_id = d->req_id;
    r->status = d->status;
    if ((rc = copy_str(r->text, MSG_TEXT_MAX, d->text, "text", why))) return rc;
    r->has_out = d->out != NULL;
    if (r->has_out && (rc = tensor_from_pb(d->out, &r->out, "out", why))) return rc;
    if (d->stats) {
        r->stats.kv_bytes = d->stats->kv_bytes;
        r->stats.bytes_read = d->stats->bytes_read;
        r->stats.bytes_written = d->stats->bytes_written;
        r->stats.compute_ns = d->stats->compute_ns;
        r->stats.flash_ns = d->stats->flash_ns;
    }
    return 0;
}

// Fills m (type already set) from an unpacked header.
static int msg_from_pb(const ProtobufCMessage *pb, msg_t *m, char *why) {
    int rc;
    switch (m->type) {
    case MSG_HELLO:
        return hello_from_pb((const Meshlm__Hello *)pb, &m->hello, why);
    case MSG_HELLO_ACK: {
        const Meshlm__HelloAck *d = (const Meshlm__HelloAck *)pb;
        m->hello_ack.accepted = d->accepted;
        if (d->proto_major > 0xffff || d->proto_minor > 0xffff)
            return fail(why, WHY_MAX, MLM_EPROTO, "version %u.%u out of range", (unsigned)d->proto_major,
                        (unsigned)d->proto_minor);
        m->hello_ack.proto_major = (uint16_t)d->proto_major;
        m->hello_ack.proto_minor = (uint16_t)d->proto_minor;
        m->hello_ack.node_index = d->node_index;
        return copy_str(m->hello_ack.reason, MSG_TEXT_MAX, d->reason, "reason", why);
    }
    case MSG_PLAN:
        return plan_from_pb((const Meshlm__Plan *)pb, m, why);
    case MSG_LOAD_SHARD: {
        const Meshlm__LoadShard *d = (const Meshlm__LoadShard *)pb;
        m->load_shard.plan_id = d->plan_id;
        m->load_shard.node_index = d->node_index;
        m->load_shard.via_coordinator = d->via_coordinator;
        m->load_shard.expected_bytes = d->expected_bytes;
        return 0;
    }
    case MSG_LOAD_SHARD_ACK: {
        const Meshlm__LoadShardAck *d = (const Meshlm__LoadShardAck *)pb;
        msg_load_shard_ack_t *s = &m->load_shard_ack;
        s->plan_id = d->plan_id;
        s->node_index = d->node_index;
        s->status = d->status;
        s->bytes = d->bytes;
        s->ms = d->ms;
        s->from_cache = d->from_cache;
        return 0;
    }
    case MSG_SLICE_DATA:
        return slice_from_pb((const Meshlm__SliceData *)pb, &m->slice_data, why);
    case MSG_STEP:
        return step_from_pb((const Meshlm__Step *)pb, m, why);
    case MSG_RESULT: {
        const Meshlm__Result *d = (const Meshlm__Result *)pb;
        msg_result_t *s = &m->result;
        s->plan_id = d->plan_id;
        s->step_id = d->step_id;
        s->seq_id = d->seq_id;
        s->node_index = d->node_index;
        s->kind = (msg_result_kind_t)d->kind;
        s->compute_ns = d->compute_ns;
        s->comm_ns = d->comm_ns;
        s->bytes_sent = d->bytes_sent;
        s->shm_collectives = d->shm_collectives;
        if (s->kind == MSG_RESULT_NONE && !d->tensor) return 0;
        return tensor_from_pb(d->tensor, &s->tensor, "tensor", why);
    }
    case MSG_HEARTBEAT: {
        const Meshlm__Heartbeat *d = (const Meshlm__Heartbeat *)pb;
        m->heartbeat.seq = d->seq;
        m->heartbeat.unix_ms = d->unix_ms;
        m->heartbeat.load = d->load;
        m->heartbeat.rss_bytes = d->rss_bytes;
        return copy_str(m->heartbeat.node_id, MSG_ID_MAX, d->node_id, "node_id", why);
    }
    case MSG_SHUTDOWN: {
        const Meshlm__Shutdown *d = (const Meshlm__Shutdown *)pb;
        m->shutdown.drain = d->drain;
        return copy_str(m->shutdown.reason, MSG_TEXT_MAX, d->reason, "reason", why);
    }
    case MSG_ERROR: {
        const Meshlm__Error *d = (const Meshlm__Error *)pb;
        m->error.code = d->code;
        m->error.step_id = d->step_id;
        m->error.lost_node = d->lost_node >= 1 && d->lost_node <= MSG_MAX_NODES ? (int32_t)d->lost_node - 1 : -1;
        if ((rc = copy_str(m->error.text, MSG_TEXT_MAX, d->text, "text", why))) return rc;
        return 0;
    }
    case MSG_KV_REQUEST:
        return kv_request_from_pb((const Meshlm__KvRequest *)pb, &m->kv_request, why);
    case MSG_KV_REPLY:
        return kv_reply_from_pb((const Meshlm__KvReply *)pb, &m->kv_reply, why);
    default:
        return fail(why, WHY_MAX, MLM_EPROTO, "unknown message type %d", (int)m->type);
    }
}

// --- public API

msg_limits_t msg_limits_default(void) {
    return (msg_limits_t){.max_header = MSG_DEFAULT_MAX_HEADER, .max_payload = MSG_DEFAULT_MAX_PAYLOAD};
}

const char *msg_type_name(int type) {
    if (type <= MSG_NONE || type >= MSG_TYPE_COUNT) return "unknown";
    return type_names[type];
}

void msg_init(msg_t *m, msg_type_t type) {
    if (!m) return;
    memset(m, 0, sizeof *m);
    m->type = type;
    if (type == MSG_HELLO) {
        m->hello.proto_major = MSG_PROTO_MAJOR;
        m->hello.proto_minor = MSG_PROTO_MINOR;
    } else if (type == MSG_HELLO_ACK) {
        m->hello_ack.proto_major = MSG_PROTO_MAJOR;
        m->hello_ack.proto_minor = MSG_PROTO_MINOR;
        m->hello_ack.node_index = -1;
    } else if (type == MSG_ERROR) {
        m->error.lost_node = -1;
    }
}

int msg_encode(const msg_t *m, const msg_limits_t *lim, msg_buf_t *out, char *err, size_t errcap) {
    if (!out) return fail(err, errcap, MLM_EINVAL, "msg_encode: NULL output");
    memset(out, 0, sizeof *out);
    if (!m) return fail(err, errcap, MLM_EINVAL, "msg_encode: NULL message");
    msg_limits_t dl = msg_limits_default();
    if (!lim) lim = &dl;
    const char *tn = msg_type_name(m->type);
    char why[WHY_MAX];
    int rc = check_msg(m, lim, why);
    if (rc) return fail(err, errcap, rc, "encode %s: %s", tn, why);

    const void **slot[MSG_MAX_RAW];
    uint64_t len[MSG_MAX_RAW];
    int n_raw = raw_slots((msg_t *)m, slot, len); // only read
    for (int i = 0; i < n_raw; i++)
        if (!*slot[i]) return fail(err, errcap, MLM_EINVAL, "encode %s: raw payload %d is NULL", tn, i);

    pb_any_t pb;
    pb_scratch_t sc;
    memset(&sc, 0, sizeof sc);
    rc = msg_to_pb(m, &pb, &sc);
    if (rc) {
        free(sc.heap.base);
        return fail(err, errcap, rc, "encode %s: %s", tn, mlm_strerror(rc));
    }
    size_t hlen = protobuf_c_message_get_packed_size(&pb.base);
    if (hlen > lim->max_header) {
        free(sc.heap.base);
        return fail(err, errcap, MLM_ERANGE, "encode %s: header of %zu bytes over the %zu-byte limit", tn, hlen,
                    lim->max_header);
    }
    unsigned char *mem = malloc(MSG_PREFIX_LEN + hlen + 1);
    if (!mem) {
        free(sc.heap.base);
        return fail(err, errcap, MLM_ENOMEM, "encode %s: out of memory", tn);
    }
    memcpy(mem, MSG_MAGIC, 4);
    put_u16(mem + 4, MSG_PROTO_MAJOR);
    put_u16(mem + 6, MSG_PROTO_MINOR);
    put_u16(mem + 8, (unsigned)m->type);
    put_u16(mem + 10, (unsigned)n_raw);
    size_t packed = protobuf_c_message_pack(&pb.base, mem + MSG_PREFIX_LEN);
    free(sc.heap.base);
    if (packed != hlen) {
        free(mem);
        return fail(err, errcap, MLM_EFORMAT, "encode %s: packed %zu bytes, expected %zu", tn, packed, hlen);
    }
    out->mem_ = mem;
    out->iov[0] = (comm_iov_t){mem, MSG_PREFIX_LEN};
    out->iov[1] = (comm_iov_t){mem + MSG_PREFIX_LEN, hlen};
    for (int i = 0; i < n_raw; i++) out->iov[2 + i] = (comm_iov_t){*slot[i], (size_t)len[i]};
    out->n = 2 + n_raw;
    return 0;
}

void msg_buf_free(msg_buf_t *b) {
    if (!b) return;
    free(b->mem_);
    memset(b, 0, sizeof *b);
}

void msg_buf_view(const msg_buf_t *b, comm_msg_t *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!b) return;
    out->n = b->n;
    for (int i = 0; i < b->n && i < COMM_MAX_FRAMES; i++) {
        out->data[i] = (void *)b->iov[i].ptr;
        out->len[i] = b->iov[i].len;
    }
}

int msg_peek(const comm_msg_t *in, int *type, int *major, int *minor) {
    if (!in || in->n < 1 || in->n > COMM_MAX_FRAMES || in->len[0] < MSG_PREFIX_LEN || !in->data[0]) return MLM_EPROTO;
    const unsigned char *p = in->data[0];
    if (memcmp(p, MSG_MAGIC, 4) != 0) return MLM_EPROTO;
    if (major) *major = (int)get_u16(p + 4);
    if (minor) *minor = (int)get_u16(p + 6);
    if (type) *type = (int)get_u16(p + 8);
    return 0;
}

int msg_decode(const comm_msg_t *in, const msg_limits_t *lim, msg_t *out, char *err, size_t errcap) {
    if (!out) return fail(err, errcap, MLM_EINVAL, "msg_decode: NULL output");
    memset(out, 0, sizeof *out);
    if (!in) return fail(err, errcap, MLM_EINVAL, "msg_decode: NULL message");
    msg_limits_t dl = msg_limits_default();
    if (!lim) lim = &dl;

    // frame 0: the prefix
    if (in->n < 2 || in->n > COMM_MAX_FRAMES)
        return fail(err, errcap, MLM_EPROTO, "message has %d frames (2..%d)", in->n, COMM_MAX_FRAMES);
    for (int i = 0; i < in->n; i++)
        if (!in->data[i] && in->len[i] > 0) return fail(err, errcap, MLM_EINVAL, "frame %d is NULL", i);
    const unsigned char *p = in->data[0];
    if (in->len[0] < MSG_PREFIX_LEN)
        return fail(err, errcap, MLM_EPROTO, "prefix of %zu bytes (want %d)", in->len[0], MSG_PREFIX_LEN);
    if (memcmp(p, MSG_MAGIC, 4) != 0)
        return fail(err, errcap, MLM_EPROTO, "bad magic %02x %02x %02x %02x (want \"%s\")", p[0], p[1], p[2], p[3],
                    MSG_MAGIC);
    unsigned major = get_u16(p + 4), minor = get_u16(p + 6), type = get_u16(p + 8), n_raw = get_u16(p + 10);
    if (major != MSG_PROTO_MAJOR)
        return fail(err, errcap, MLM_EPROTO, "protocol version mismatch: peer speaks %u.%u, this node speaks %d.%d",
                    major, minor, MSG_PROTO_MAJOR, MSG_PROTO_MINOR);
    bool newer = minor > MSG_PROTO_MINOR;
    if (in->len[0] > MSG_PREFIX_LEN && !newer)
        return fail(err, errcap, MLM_EPROTO, "prefix of %zu bytes (want %d)", in->len[0], MSG_PREFIX_LEN);
    if (type <= MSG_NONE || type >= MSG_TYPE_COUNT)
        return fail(err, errcap, MLM_EPROTO, "unknown message type %u (protocol %u.%u)", type, major, minor);
    const char *tn = type_names[type];
    if ((int)n_raw != in->n - 2)
        return fail(err, errcap, MLM_EPROTO, "%s: prefix announces %u raw frames, message has %d", tn, n_raw, in->n - 2);

    // sizes before anything is unpacked
    if (in->len[1] > lim->max_header)
        return fail(err, errcap, MLM_ERANGE, "%s: header of %zu bytes over the %zu-byte limit", tn, in->len[1],
                    lim->max_header);
    for (int i = 2; i < in->n; i++)
        if (in->len[i] > lim->max_payload)
            return fail(err, errcap, MLM_ERANGE, "%s: frame %d of %zu bytes over the %zu-byte limit", tn, i, in->len[i],
                        lim->max_payload);

    // frame 1: the header, unpacked under an allocation budget
    pb_budget_t budget = {0, 32 * in->len[1] + 65536, false};
    ProtobufCAllocator alloc = {pb_alloc, pb_free, &budget};
    static const uint8_t empty[1] = {0};
    const uint8_t *hdr = in->len[1] ? in->data[1] : empty;
    ProtobufCMessage *pb = protobuf_c_message_unpack(type_desc[type], &alloc, in->len[1], hdr);
    if (!pb) {
        if (budget.refused)
            return fail(err, errcap, MLM_ERANGE, "%s: header of %zu bytes needs too much memory", tn, in->len[1]);
        return fail(err, errcap, MLM_EFORMAT, "%s: malformed header (%zu bytes)", tn, in->len[1]);
    }
    out->type = (msg_type_t)type;
    out->peer_major = (uint16_t)major;
    out->peer_minor = (uint16_t)minor;
    char why[WHY_MAX];
    int rc = msg_from_pb(pb, out, why);
    protobuf_c_message_free_unpacked(pb, &alloc);
    if (rc) goto bad;

    // frames 2..: raw payloads
    const void **slot[MSG_MAX_RAW];
    uint64_t len[MSG_MAX_RAW];
    int want = raw_slots(out, slot, len);
    if (in->n - 2 < want || (in->n - 2 > want && !newer)) {
        rc = fail(why, WHY_MAX, MLM_EPROTO, "%d raw frames, header describes %d", in->n - 2, want);
        goto bad;
    }
    for (int i = 0; i < want; i++) {
        if (in->len[2 + i] != len[i]) {
            rc = fail(why, WHY_MAX, MLM_EFORMAT, "raw frame %d has %zu bytes, header says %llu", 2 + i, in->len[2 + i],
                      (unsigned long long)len[i]);
            goto bad;
        }
        *slot[i] = in->data[2 + i];
    }
    if ((rc = check_msg(out, lim, why))) goto bad;
    return 0;
bad:
    msg_clear(out);
    return fail(err, errcap, rc, "%s: %s", tn, why);
}

void msg_clear(msg_t *m) {
    if (!m) return;
    free(m->alloc_);
    memset(m, 0, sizeof *m);
}
