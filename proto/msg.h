// meshlm's wire messages as plain C structs: encode to comm frames, decode and validate received ones.
#ifndef MESHLM_MSG_H
#define MESHLM_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"

// --- versions and the frame layout
//
// A message is 2 + n_raw frames:
//   frame 0   MSG_PREFIX_LEN bytes: 'M' 'L' 'M' 'P', u16 major, u16 minor, u16 type, u16 n_raw
//             (integers little-endian)
//   frame 1   the protobuf header for the type (proto/meshlm.proto)
//   frame 2.. raw payloads (tensor bytes), each described by a field of the header
// A peer with another major version is refused; a newer minor is accepted (unknown header fields
// and extra trailing raw frames are ignored).

#define MSG_PROTO_MAJOR 1
#define MSG_PROTO_MINOR 9
#define MSG_MAGIC "MLMP"            // first 4 bytes of frame 0
#define MSG_PREFIX_LEN 12

// Bounds every decoded message is checked against (the structs below are sized by them).
#define MSG_ID_MAX 64               // node ids, including the NUL
#define MSG_ENDPOINT_MAX 128        // "tcp://host:port", including the NUL
#define MSG_NAME_MAX 128            // tensor names, including the NUL
#define MSG_KEY_MAX 41              // a CurveZMQ public key: 40 Z85 characters and the NUL
#define MSG_DEVICE_MAX 192           // attention/KV device names ("storage:tcp://host:port"), with the NUL
#define MSG_TEXT_MAX 512            // reasons and error texts, including the NUL
#define MSG_MAX_SPEEDS 16           // measured weight types in a Hello
#define MSG_MAX_NODES 256           // nodes in a plan
#define MSG_MAX_FFN_RANGES 8        // FFN column ranges per plan node
#define MSG_MAX_EXPERTS 256         // experts in a model (and per node)
#define MSG_MAX_BLOCK_EXPERTS 1024  // a node's experts held in one block only (PlanNode.block_experts)
#define MSG_MAX_TOKENS 65536        // tokens in one Step
#define MSG_MAX_DIMS 4              // tensor dimensions
#define MSG_MAX_RAW 4               // raw frames this version ever sends in one message
#define MSG_SHA256_LEN 32

#define MSG_DEFAULT_MAX_HEADER ((size_t)1 << 20)    // frame 1 (protobuf) bytes
#define MSG_DEFAULT_MAX_PAYLOAD ((size_t)64 << 20)  // each raw frame's bytes

// --- types

// Message type numbers; equal to MsgType in meshlm.proto and only ever appended.
typedef enum {
    MSG_NONE = 0,
    MSG_HELLO = 1,
    MSG_HELLO_ACK = 2,
    MSG_PLAN = 3,
    MSG_LOAD_SHARD = 4,
    MSG_LOAD_SHARD_ACK = 5,
    MSG_SLICE_DATA = 6,
    MSG_STEP = 7,
    MSG_RESULT = 8,
    MSG_HEARTBEAT = 9,
    MSG_SHUTDOWN = 10,
    MSG_ERROR = 11,
    MSG_KV_REQUEST = 12,  // 1.5: storage attention device -> meshlm kvstore
    MSG_KV_REPLY = 13,    // 1.5: meshlm kvstore -> storage attention device
    MSG_TYPE_COUNT = 14, // one past the largest known type
} msg_type_t;

typedef enum {
    MSG_ROLE_NONE = 0,
    MSG_ROLE_WORKER = 1,
    MSG_ROLE_COORDINATOR = 2,
    MSG_ROLE_STANDBY = 3,
} msg_role_t;

typedef enum {
    MSG_LOGITS_LAST = 0,  // only the last token's row
    MSG_LOGITS_ALL = 1,   // one row per token
    MSG_LOGITS_NONE = 2,  // none (a prefill chunk that is not the last)
} msg_logits_t;

typedef enum {
    MSG_RESULT_NONE = 0,
    MSG_RESULT_LOGITS = 1,  // F32 (n_vocab, n_rows)
    MSG_RESULT_HIDDEN = 2,  // (n_embd, n_tokens) for the next pipeline stage
    MSG_RESULT_PARTIAL = 3, // a partial sum the receiver reduces
} msg_result_kind_t;

// A tensor that travels as one raw frame. Shape is ggml order: ne[0] is the fastest dimension.
typedef struct {
    int32_t type;               // qtype_t (worker/quant.h)
    int n_dims;                 // 1..MSG_MAX_DIMS
    int64_t ne[MSG_MAX_DIMS];   // elements per dimension (>= 1); entries past n_dims are ignored
    uint64_t nbytes;            // bytes of the whole tensor; must match type and shape
    const void *data;           // (nbytes) borrowed: from the caller on encode, from the received
                                // frame on decode (until comm_msg_free; alignment is the frame's)
} msg_tensor_t;

typedef struct {
    int32_t begin, end;         // [begin, end)
} msg_range_t;

typedef struct {
    int32_t type;               // weight qtype_t
    float gflops;               // measured matmul GFLOP/s with that weight type
} msg_speed_t;

typedef struct {
    uint16_t proto_major, proto_minor;  // msg_init sets ours; the major must be MSG_PROTO_MAJOR
    char node_id[MSG_ID_MAX];           // printable ASCII, no spaces, not empty
    msg_role_t role;
    char endpoint[MSG_ENDPOINT_MAX];    // where peers reach the node; may be empty
    uint32_t n_cores;                   // >= 1
    uint64_t ram_budget_bytes;
    int n_speeds;
    msg_speed_t speeds[MSG_MAX_SPEEDS]; // (n_speeds), distinct types
    uint64_t mem_bw_bytes_s;
    uint64_t disk_read_bw_bytes_s;
    bool has_model;                     // the node has the model file locally
    uint8_t model_sha256[MSG_SHA256_LEN]; // valid when has_model
    uint64_t model_size;                // valid when has_model
    char faults[MSG_TEXT_MAX];          // coordinator -> worker: link faults to emulate ("" = none)
    int32_t link_rank;                  // coordinator -> worker: the worker's control-link rank (0 = unset)
} msg_hello_t;

typedef struct {
    bool accepted;
    char reason[MSG_TEXT_MAX];          // why not, when refused
    uint16_t proto_major, proto_minor;  // the answering side's version (msg_init sets ours)
    int32_t node_index;                 // assigned index, or -1
} msg_hello_ack_t;

typedef struct {
    uint32_t index;                     // == its position in msg_plan_t.nodes
    char node_id[MSG_ID_MAX];           // may be empty
    char endpoint[MSG_ENDPOINT_MAX];    // may be empty
    msg_range_t layers;                 // of n_layer
    msg_range_t heads;                  // query heads, of n_head
    msg_range_t kv_heads;               // of n_head_kv
    int n_ffn;
    msg_range_t ffn[MSG_MAX_FFN_RANGES]; // (n_ffn) FFN column ranges, of n_ff
    int n_experts;
    uint16_t experts[MSG_MAX_EXPERTS];  // (n_experts) distinct expert ids, of n_expert
    msg_range_t hidden;                 // hidden rows (attn_output, ffn_down), of n_embd (1.1)
    msg_range_t vocab;                  // vocabulary rows (output, token_embd), of n_vocab (1.1)
    float link_lat_us;                  // 1.4: its link's one-way latency, microseconds (0 = unknown)
    uint64_t link_bw;                   // 1.4: its link's bandwidth, bytes/s (0 = unknown)
    char curve_key[MSG_KEY_MAX];        // 1.6: its CurveZMQ public key on the data plane, 40 Z85
                                        // characters, or "" (a plain data plane)
    int n_block_experts;                // 1.9: hot second copies, (layer << 8) | expert: expert of one
    uint32_t block_experts[MSG_MAX_BLOCK_EXPERTS]; // block of its layers, beyond experts[]
} msg_plan_node_t;

// How a plan's tensor-parallel groups cut a block (Plan.tp_mode; values only appended).
typedef enum {
    MSG_TP_EXACT = 0,                   // rows only, all-gathers: bit-identical to one node
    MSG_TP_ALLREDUCE = 1,               // attn_output / ffn_down by columns, 2 all-reduces per block
    MSG_TP_EXPERT = 2,                  // 1.5: experts placed whole (each node's experts list), the rest replicated
    MSG_TP_EXPERT_LEAD = 3,             // 1.8: experts placed whole, the rest on each stage's first node alone
} msg_tp_mode_t;

// The first protocol minor version that knows Plan.tp_mode: a coordinator sends an all-reduce plan
// only to workers whose Hello says at least this (an older one would run it as exact).
#define MSG_MINOR_TP_MODE 4
// The first minor version that runs expert-parallel plans (MSG_TP_EXPERT); an older peer refuses them.
#define MSG_MINOR_EP 5
// The first minor version that runs placed experts with attention on the leader (MSG_TP_EXPERT_LEAD).
#define MSG_MINOR_EP_LEAD 8
// The first minor version whose workers hold second copies of hot experts in single blocks
// (PlanNode.block_experts; --ep-hot needs it on every worker) and take a shard file of placed experts
// that holds only their own experts' planes (meshlm.shard.experts; an older one is streamed every
// expert of its blocks).
#define MSG_MINOR_EP_BLOCK 9

// The first protocol minor version whose coordinator fills plan_id in the control messages that
// belong to a plan (LOAD_SHARD, STEP, and the SLICE_DATA chunks of a streamed shard; PLAN always did,
// and a worker's LOAD_SHARD_ACK and RESULT answer with their plan's). A worker ignores, and logs, a
// LOAD_SHARD or STEP whose plan_id is not its current plan's (one of an earlier plan that arrives
// late, e.g. sent again after a drop, or queued before a re-plan), and a coordinator skips acks of
// another plan. plan_id 0 is what a 1.4 or older coordinator sends: it is taken as before.
#define MSG_MINOR_PLAN_IDS 5

// The first minor version whose workers read PlanNode.curve_key and run an authenticated (CurveZMQ)
// data plane; a coordinator with keys refuses an older worker, which would open a plain one.
#define MSG_MINOR_CURVE 6

// The first minor version whose workers honour Step.one_order; a coordinator replays decode steps in
// one chunk only when every worker of the plan says at least this (an older one would batch them and
// change the cache's bits), and one at a time otherwise.
#define MSG_MINOR_ONE_ORDER 7

typedef struct {
    uint64_t plan_id;
    uint8_t model_sha256[MSG_SHA256_LEN];
    uint32_t n_layer, n_head, n_head_kv, n_ff; // model dimensions (>= 1) the ranges are checked against
    uint32_t n_expert;                  // 0 for dense models
    uint32_t n_embd, n_vocab;           // 1.1: sizes the hidden / vocab ranges are checked against (0 = unused)
    uint32_t n_ctx;                     // >= 1
    int32_t kv_type;                    // qtype_t of the KV cache
    uint32_t n_threads;                 // 0 = each node decides
    uint32_t n_batch;                   // 1.3: tokens per forward chunk on every node (0 = node default)
    msg_tp_mode_t tp_mode;              // 1.4: EXACT (what an older coordinator's plan means) or ALLREDUCE;
                                        // with ALLREDUCE every computing node's hidden range is 0..n_embd
    char kv_device[MSG_DEVICE_MAX];     // 1.5: attention/KV device for every node without its own ("" = none
                                        // chosen: host); printable, no spaces
    int n_nodes;                        // 1..MSG_MAX_NODES
    const msg_plan_node_t *nodes;       // (n_nodes) borrowed from the caller on encode; owned by
                                        // the msg_t after decode (msg_clear frees)
} msg_plan_t;

typedef struct {
    uint64_t plan_id;
    uint32_t node_index;
    bool via_coordinator;               // weights arrive as SliceData
    uint64_t expected_bytes;
} msg_load_shard_t;

typedef struct {
    uint64_t plan_id;
    uint32_t node_index;
    int32_t status;                     // 0 or a negative MLM_E* code
    uint64_t bytes;
    uint64_t ms;
    bool from_cache;
} msg_load_shard_ack_t;

// One chunk of the bytes of a slice [begin, end) along dimension dim of a tensor.
typedef struct {
    uint64_t plan_id;
    char tensor[MSG_NAME_MAX];          // printable ASCII, not empty
    int32_t type;                       // qtype_t of the tensor
    int n_dims;                         // 1..MSG_MAX_DIMS
    int64_t ne[MSG_MAX_DIMS];           // the whole tensor's shape
    int dim;                            // < n_dims; for dim 0, begin and end are block multiples
    int64_t begin, end;                 // 0 <= begin < end <= ne[dim]
    uint64_t offset;                    // of this chunk within the slice's bytes
    uint64_t total;                     // the slice's bytes (== its shape's size)
    const void *data;                   // (len) chunk, borrowed as msg_tensor_t.data
    uint64_t len;                       // >= 1, offset + len <= total
} msg_slice_data_t;

typedef struct {
    uint64_t plan_id, step_id, seq_id;
    int32_t pos;                        // position of the first token, >= 0
    uint32_t n_tokens;                  // 1..MSG_MAX_TOKENS
    const int32_t *tokens;              // (n_tokens) ids >= 0, or NULL when has_hidden; borrowed
                                        // from the caller on encode, owned by the msg_t after decode
    bool has_hidden;
    msg_tensor_t hidden;                // (n_embd, n_tokens): ne[1] * ne[2] * ne[3] == n_tokens
    msg_logits_t logits;
    uint32_t ubatch;                    // micro-batch tokens through a pipeline (0 = the whole step)
    bool one_order;                     // 1.7: each token computed as it would be alone (model_ctx_set_one_order):
                                        // decode steps replayed in one chunk keep their bits
} msg_step_t;

typedef struct {
    uint64_t plan_id, step_id, seq_id;
    uint32_t node_index;
    msg_result_kind_t kind;             // MSG_RESULT_NONE: a step report, no tensor (protocol 1.2)
    msg_tensor_t tensor;                // logits, hidden state or partial sum
    uint64_t compute_ns, comm_ns, bytes_sent;
    uint64_t shm_collectives;           // the step's exchanges made through shared memory
} msg_result_t;

typedef struct {
    char node_id[MSG_ID_MAX];
    uint64_t seq;
    uint64_t unix_ms;
    float load;                         // finite, >= 0
    uint64_t rss_bytes;
} msg_heartbeat_t;

typedef struct {
    bool drain;                         // finish in-flight steps first
    char reason[MSG_TEXT_MAX];
} msg_shutdown_t;

typedef struct {
    int32_t code;                       // negative MLM_E* code
    char text[MSG_TEXT_MAX];
    uint64_t step_id;                   // the step it concerns, 0 if none
    int32_t lost_node;                  // 1.5: the plan node (index) a failed step lost on the data
                                        // plane, -1 = none or not known (what older peers send)
} msg_error_t;

// --- the KV store (protocol 1.5; proto/meshlm.proto KvRequest / KvReply)

#define MSG_KV_MAX_SEQS 1024        // sequence ids of a session
#define MSG_KV_MAX_HEAD_DIM 4096    // elements per head

// Operations of a KvRequest (KvOp; values only appended).
typedef enum {
    MSG_KV_NONE = 0,
    MSG_KV_OPEN = 1,       // a session of shape; the reply's session names it
    MSG_KV_CLOSE = 2,      // drops the session
    MSG_KV_SEQ_NEW = 3,    // seq, n_ctx
    MSG_KV_SEQ_DROP = 4,   // seq
    MSG_KV_APPEND = 5,     // seq, layer, append_pos, append_n, k, v
    MSG_KV_ATTEND = 6,     // seq, layer, pos, n, q (and with has_kv an append first); reply: out
    MSG_KV_STATS = 7,      // counters only
} msg_kv_op_t;

typedef struct {
    uint32_t n_layer, head_dim, n_head, n_head_kv; // >= 1; n_head a multiple of n_head_kv
    msg_range_t heads;                  // query heads attended, non-empty, of n_head
    msg_range_t kv_heads;               // KV heads stored, non-empty, of n_head_kv
    int32_t kv_type;                    // QT_F16 or QT_F32
    uint32_t n_seq_max;                 // 1..MSG_KV_MAX_SEQS
} msg_kv_shape_t;

typedef struct {
    uint64_t session;                   // 0 for OPEN, else the id OPEN's reply gave
    uint64_t req_id;                    // echoed by the reply
    msg_kv_op_t op;
    msg_kv_shape_t shape;               // OPEN
    int32_t seq;                        // 0..MSG_KV_MAX_SEQS - 1
    int32_t layer;                      // 0..n_layer - 1 (checked by the kvstore)
    int32_t pos;                        // ATTEND: first query position, >= 0
    uint32_t n;                         // ATTEND: query rows, 1..MSG_MAX_TOKENS
    uint32_t n_ctx;                     // SEQ_NEW: positions, >= 1
    bool has_kv;                        // APPEND always; ATTEND when an append comes first
    int32_t append_pos;                 // first appended position, >= 0
    uint32_t append_n;                  // appended rows, 1..MSG_MAX_TOKENS
    msg_tensor_t k, v;                  // (kv row, append_n) F16 or F32, the same type and shape
    bool has_q;                         // ATTEND
    msg_tensor_t q;                     // (q row, n) F16 or F32
} msg_kv_request_t;

typedef struct {
    uint64_t kv_bytes, bytes_read, bytes_written; // see KvStats
    uint64_t compute_ns;                // measured in the kvstore
    uint64_t flash_ns;                  // modelled from --internal-bw
} msg_kv_stats_t;

typedef struct {
    uint64_t session, req_id;
    int32_t status;                     // 0 or a negative MLM_E* code
    char text[MSG_TEXT_MAX];            // why, when status < 0
    bool has_out;                       // ATTEND's answer
    msg_tensor_t out;                   // (q row, n) F32
    msg_kv_stats_t stats;               // the session's counters after the request
} msg_kv_reply_t;

// One message. Build it with msg_init and fill the member for its type.
typedef struct {
    msg_type_t type;
    uint16_t peer_major, peer_minor;    // version in the received prefix (set by decode)
    union {
        msg_hello_t hello;
        msg_hello_ack_t hello_ack;
        msg_plan_t plan;
        msg_load_shard_t load_shard;
        msg_load_shard_ack_t load_shard_ack;
        msg_slice_data_t slice_data;
        msg_step_t step;
        msg_result_t result;
        msg_heartbeat_t heartbeat;
        msg_shutdown_t shutdown;
        msg_error_t error;
        msg_kv_request_t kv_request;
        msg_kv_reply_t kv_reply;
    };
    void *alloc_;                       // memory decode allocated (plan nodes, step tokens); msg_clear
} msg_t;

typedef struct {
    size_t max_header;                  // frame 1 bytes
    size_t max_payload;                 // each raw frame's bytes
} msg_limits_t;

// Frames of an encoded message, ready for comm_send(c, peer, b.iov, b.n, timeout_ms).
typedef struct {
    int n;                              // frames used (2 + raw frames)
    comm_iov_t iov[2 + MSG_MAX_RAW];    // 0: prefix, 1: header (both owned), 2..: raw payloads
                                        // (borrowed from the encoded msg_t's tensors)
    void *mem_;                         // owned block holding frames 0 and 1
} msg_buf_t;

// --- public API

// Defaults: MSG_DEFAULT_MAX_HEADER, MSG_DEFAULT_MAX_PAYLOAD.
msg_limits_t msg_limits_default(void);

// Name of a message type ("HELLO", "SLICE_DATA"), or "unknown".
const char *msg_type_name(int type);

// Zeroes *m and sets its type; Hello and HelloAck get this build's protocol version, HelloAck a
// node_index of -1.
void msg_init(msg_t *m, msg_type_t type);

// Encodes m into out (out is overwritten; caller frees with msg_buf_free, also after a failure).
// The message is validated as a decode would; raw frames point at m's tensor data, which must
// stay valid until the frames are sent. lim may be NULL (defaults). Returns 0, MLM_EINVAL,
// MLM_ERANGE, MLM_EPROTO or MLM_ENOMEM with the reason in err.
int msg_encode(const msg_t *m, const msg_limits_t *lim, msg_buf_t *out, char *err, size_t errcap);

// Frees what msg_encode allocated; accepts a zeroed or already freed buffer.
void msg_buf_free(msg_buf_t *b);

// A comm_msg_t that views b's frames (borrowed until msg_buf_free; never comm_msg_free it): for
// in-process delivery and tests.
void msg_buf_view(const msg_buf_t *b, comm_msg_t *out);

// Decodes and validates a received message into *out. Raw payload pointers in out are borrowed
// from in (valid until comm_msg_free(in)); other memory belongs to out (msg_clear frees it).
// lim may be NULL (defaults). On failure *out is cleared and err says why, naming the message
// type and the field. Returns 0, MLM_EINVAL (NULL arguments), MLM_EPROTO (frame count, magic,
// version, type), MLM_ERANGE (a size, count or index over its limit), MLM_EFORMAT (undecodable
// header, bad enum, shape that does not match its payload) or MLM_ENOMEM.
int msg_decode(const comm_msg_t *in, const msg_limits_t *lim, msg_t *out, char *err, size_t errcap);

// Reads only the prefix: type and the sender's version. 0, or MLM_EPROTO (no prefix, bad magic;
// the version is not checked). Any out pointer may be NULL.
int msg_peek(const comm_msg_t *in, int *type, int *major, int *minor);

// Frees what msg_decode allocated and zeroes *m; accepts a zeroed or caller-built message (it never
// frees caller memory).
void msg_clear(msg_t *m);

#endif
