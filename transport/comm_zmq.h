// ZeroMQ comm backend: one process per rank over tcp:// or ipc://, with a hello handshake, deadlines and peer-loss detection.
#ifndef MESHLM_COMM_ZMQ_H
#define MESHLM_COMM_ZMQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/comm.h"
#include "transport/comm_open.h"
#include "transport/curve.h"

// Wire format, version 1.0. Every message is: [envelope (16 bytes)] [user frame 0] ... [user frame n-1]
//   u32 magic COMM_ZMQ_MAGIC, u8 major, u8 minor, u8 kind (COMM_ZMQ_*), u8 n (user frames),
//   u32 source rank, u32 world size (low 16 bits) | session (high 16 bits)   (all little-endian)
// A message without a valid envelope, from a rank outside the world, or with another major
// version is dropped and reported as MLM_EPROTO; the connection stays up. A message of another
// session (an earlier world that used the same endpoints, e.g. the previous plan's data plane of a
// node that has not closed it yet) is dropped silently.
#define COMM_ZMQ_MAGIC 0x5a4d4c4du  // "MLMZ"
#define COMM_ZMQ_MAJOR 1
#define COMM_ZMQ_MINOR 1  // 1.1: the session in the world word
#define COMM_ZMQ_ENVELOPE_BYTES 16
enum {
    COMM_ZMQ_DATA = 0,              // user frames follow
    COMM_ZMQ_HELLO = 1,             // handshake: rank and world size in the envelope; no frames; byte 7 (the
                                    // frame count) is 0 (the sender lacks the addressee's HELLO), 1 (has it)
                                    // or 2 (has it and knows the addressee has the sender's). A HELLO of 0 or 1
                                    // is answered at once; a rank repeats its own until it has a 1 or 2 (1.1)
    COMM_ZMQ_PROBE = 2,             // liveness probe, ignored by the receiver
    COMM_ZMQ_BYE = 3,               // the sender is shutting down cleanly
};

// Writes an envelope into out (COMM_ZMQ_ENVELOPE_BYTES); for tests and tools speaking the wire.
// world: the world size, with the session in the high 16 bits.
void comm_zmq_envelope(uint8_t *out, int kind, int src, uint32_t world, int nframes);

typedef struct {
    size_t max_msg_bytes;       // largest accepted message (sum of user frames); default 256 MiB
    int connect_timeout_ms;     // deadline of the hello phase in comm_zmq_new; default 10000
    int probe_ivl_ms;           // while a recv waits on a peer, probe it this often; default 50
    int heartbeat_ivl_ms;       // ZMTP heartbeats on the outbound connections (catch frozen peers and dead links); 0 = off; default 1000
    int heartbeat_timeout_ms;   // a connection silent this long is dropped; default 5000
    int linger_ms;              // comm_destroy waits at most this long to flush; default 1000
    int hwm;                    // queued messages per peer before send waits; default 10000
    uint16_t session;           // the world's id: every rank of one world gives the same (e.g. the plan id's
                                // low bits); messages of another session are dropped; default 0
    bool fail_on_any_loss;      // a plan's data plane: once any peer is lost every send and recv fails with
                                // MLM_EPEER (after the messages already queued from the peer asked for), so a
                                // wait on a live peer does not outlast the loss of another; default false
    const curve_keypair_t *curve; // CurveZMQ: this rank's key pair (read during comm_zmq_new), or NULL for a
                                  // plain world; default NULL
    const char *const *curve_keys; // (size) with curve: every rank's public key (Z85, read during the call).
                                   // The bound socket is a CURVE server whose ZAP handler admits only these
                                   // keys (a refusal is logged with the peer's address and key); the
                                   // connection to rank p expects p's key from the server it reaches
} comm_zmq_opts_t;

void comm_zmq_opts_default(comm_zmq_opts_t *o);

// Whether a ZeroMQ comm has found peer gone without a goodbye (its connection dropped, a heartbeat
// timed out): a peer that left cleanly (said BYE) is not. Through a fault wrapper (transport/fault.h)
// it answers for the ZeroMQ comm inside, and also when the wrapper has lost peer to a partition.
// False for another backend or a peer not known to be lost.
bool comm_zmq_peer_lost(const comm_t *c, int peer);

// For a waiter outside the comm (transport/comm_shm.h): files the inbound traffic that arrived
// (nothing is consumed), probes peer (with fail_on_any_loss, every live peer) if its probe is due,
// and says whether a recv from peer would now fail for a loss (with fail_on_any_loss: any peer's).
// False for another backend (a fault wrapper included).
bool comm_zmq_poll_lost(comm_t *c, int peer);

// Creates rank `rank` of a world of `size` ranks. endpoints holds size strings, one per rank:
// either one endpoint used for both binding and connecting ("tcp://10.0.0.2:5000",
// "ipc:///tmp/meshlm/r1") or "bind=tcp://0.0.0.0:5000;connect=tcp://10.0.0.2:5000" when the
// address a rank binds differs from the one its peers dial. The rank binds its own endpoint,
// connects to every other one and exchanges a HELLO (protocol version, rank, world size) with
// each peer within opts->connect_timeout_ms; a peer with another world size or protocol major
// version is refused. opts NULL = defaults. On success *out is a new comm (caller destroys).
// On failure returns MLM_EINVAL, MLM_EIO (bind/connect), MLM_ETIMEOUT (a peer never said hello)
// or MLM_EPROTO (mismatch) with the reason in err.
// With CurveZMQ (opts->curve) every connection is encrypted and authenticated: a peer that refuses this
// rank's key (twice, so not a socket of an earlier world going away) fails the call at once with
// MLM_EPROTO naming that rank and its endpoint; a handshake that never completes (e.g. a peer holds
// another key than the one listed for it) fails at the deadline with MLM_ETIMEOUT naming the ranks
// whose CURVE handshake failed and the last connection this rank refused (address and key).
//
// Peer loss: sends use ROUTER sockets with ZMQ_ROUTER_MANDATORY and ZMQ_IMMEDIATE, so a peer
// whose connection dropped (process killed, heartbeat timeout, BYE received) makes send fail at
// once with MLM_EPEER instead of queueing forever; a recv waiting on a peer probes it every
// probe_ivl_ms and returns MLM_EPEER once it is gone and its queued messages are consumed. A
// peer that is slow but connected yields MLM_ETIMEOUT at the deadline. A lost peer stays lost
// for the life of the comm. The comm is used from one thread at a time.
int comm_zmq_new(comm_t **out, int rank, int size, const char *const *endpoints, const comm_zmq_opts_t *opts,
                 char *err, size_t errlen);

// comm_open("zmq"): comm_zmq_new with o's rank, size, endpoints, timeout_ms (handshake),
// max_msg_bytes, heartbeats, fail_on_any_loss, session and CurveZMQ (curve->self, curve_keys); other
// options keep their defaults.
int comm_zmq_open(comm_t **out, const comm_open_opts_t *o, char *err, size_t errlen);

#endif
