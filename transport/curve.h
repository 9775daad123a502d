// CurveZMQ for the control link and the data plane: key pairs and key files, and the ZAP handler that admits
// only the client keys a node was given (every refusal logged with the peer's address and key).
#ifndef MESHLM_CURVE_H
#define MESHLM_CURVE_H

#include <stddef.h>

#define CURVE_KEY_LEN 40       // a key in Z85 text
#define CURVE_MAX_PEERS 128    // keys of a peers file, or of a plan's data plane (<= 64 workers + coordinator)

typedef struct {
    char pub[CURVE_KEY_LEN + 1];   // Z85, NUL-terminated
    char sec[CURVE_KEY_LEN + 1];
} curve_keypair_t;

// The keys a node trusts: lines "KEY [ENDPOINT]" (# starts a comment). A worker admits coordinators
// holding any of the keys; a coordinator dials each worker endpoint with the key listed for it.
typedef struct {
    int n;
    char key[CURVE_MAX_PEERS][CURVE_KEY_LEN + 1];
    char endpoint[CURVE_MAX_PEERS][256];   // "" when the line names none
} curve_peers_t;

// What the control link needs to be encrypted and authenticated (comm_open_opts_t.curve).
typedef struct {
    curve_keypair_t self;          // this node's keys
    curve_peers_t peers;           // whom it accepts (worker) or dials (coordinator)
} curve_conf_t;

// A new key pair. 0, or MLM_EUNSUPPORTED (libzmq built without CURVE).
int curve_keygen(curve_keypair_t *k, char *err, size_t errlen);

// Writes base.key ("public KEY\nsecret KEY\n", mode 0600) and base.pub ("KEY\n"). 0 or MLM_EIO (path named).
int curve_write_keypair(const char *base, const curve_keypair_t *k, char *err, size_t errlen);

// Reads a .key file written by curve_write_keypair. 0, MLM_EIO or MLM_EFORMAT (path and line named).
int curve_read_keypair(const char *path, curve_keypair_t *k, char *err, size_t errlen);

// Reads a peers file (see curve_peers_t); a line may also be a path to a .pub file. 0, MLM_EIO or
// MLM_EFORMAT (path and line named), MLM_EFULL over CURVE_MAX_PEERS keys.
int curve_read_peers(const char *path, curve_peers_t *p, char *err, size_t errlen);

// The key listed for endpoint, else NULL.
const char *curve_peer_key(const curve_peers_t *p, const char *endpoint);

// Whether text is a well-formed Z85 key of 40 characters.
int curve_key_valid(const char *text);

typedef struct curve_zap curve_zap_t;

// Starts the ZAP handler of ZeroMQ context zctx in a thread: a CURVE client whose public key is among
// peers is admitted, any other refused and logged on stderr as "meshlm: WHO: refused ...". peers is
// copied. 0, or MLM_EIO (the handler's endpoint is taken) / MLM_ENOMEM.
int curve_zap_start(curve_zap_t **out, void *zctx, const curve_peers_t *peers, const char *who, char *err,
                    size_t errlen);

// How many connections the handler refused so far.
int curve_zap_refused(const curve_zap_t *z);

// The address and key (Z85, or the mechanism's name when the peer did not use CURVE) of the last
// connection the handler refused, into addr (cap bytes) and key (CURVE_KEY_LEN + 1 bytes); "" when
// none was refused. Thread-safe.
void curve_zap_last_refused(curve_zap_t *z, char *addr, size_t cap, char *key);

// Stops and joins the handler (before the context is terminated); accepts NULL, NULLs the pointer.
void curve_zap_stop(curve_zap_t **self_p);

#endif
