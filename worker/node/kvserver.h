// The `meshlm kvstore` server: sessions of KV-store devices (offload/kvstore.h), one per storage
// attention device that connects, served over a comm with KvRequest / KvReply messages.
#ifndef MESHLM_NODE_KVSERVER_H
#define MESHLM_NODE_KVSERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "proto/msg.h"
#include "transport/comm.h"

typedef struct {
    const char *dir;       // the store's directory (created if missing); copied
    double internal_bw;    // the drive's internal read bandwidth in bytes/s for the modelled flash time (0 = none)
    int n_threads;         // attention threads (0 = 1)
    int max_sessions;      // open sessions at once (0 = 64); an OPEN beyond is refused with MLM_EFULL
    FILE *log;             // where sessions' summaries and failures are written (NULL = none); borrowed
} kvserver_opts_t;

// A session's link and work counters. Decode counts only ATTEND requests of one query row (and the
// append they carry): per decoded token, divide by decode_rows / n_layer.
typedef struct {
    uint64_t requests;
    uint64_t link_in, link_out;           // bytes received and sent (every frame of every message)
    uint64_t decode_rows;                 // query rows attended one at a time, summed over layers
    uint64_t decode_in, decode_out;       // link bytes of those requests and their replies
    uint64_t decode_read;                 // KV bytes their attention read (what shipping the KV would move)
    double decode_ms;                     // measured kvstore time of those requests
    double decode_flash_ms;               // modelled flash time of their reads (--internal-bw)
    int n_layer;
} kvserver_session_stats_t;

typedef struct kvserver kvserver_t;

// 0, or MLM_EIO (the directory cannot be made) / MLM_ENOMEM with err.
int kvserver_new(kvserver_t **out, const kvserver_opts_t *o, char *err, size_t errlen);

// Closes every session (their files are removed) and frees the server; accepts NULL, NULLs the pointer.
void kvserver_destroy(kvserver_t **self_p);

// Answers one request: fills reply (a KV_REPLY; its out tensor, when set, is borrowed from the server
// until the next call). bytes_in: the request's size on the link, for the session's counters.
// Never fails: an error is the reply's status and text.
void kvserver_handle(kvserver_t *s, const msg_kv_request_t *req, uint64_t bytes_in, msg_t *reply);

// Counts a reply's bytes on the link against its session (kvserver_serve does it).
void kvserver_count_reply(kvserver_t *s, const msg_kv_request_t *req, uint64_t bytes_out);

// Serves requests arriving on c (the listening end of a "link" comm) until stop(stop_arg) returns
// true (it is asked at least every 200 ms). A malformed or oversized request is answered with an
// error reply (req_id 0) and the server goes on. 0 when stopped, or a comm error (MLM_EIO) with err.
int kvserver_serve(kvserver_t *s, comm_t *c, bool (*stop)(void *arg), void *stop_arg, char *err, size_t errlen);

// Sessions open now.
int kvserver_sessions(const kvserver_t *s);

// Writes one line about a session's decode traffic to f: link bytes per token beside what shipping
// its KV would cost, kvstore time per token, and the modelled flash time.
void kvserver_print_session(FILE *f, uint64_t id, const kvserver_session_stats_t *st, double internal_bw);

#endif
