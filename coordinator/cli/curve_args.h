// The CurveZMQ options of worker, run / coordinator and serve: --curve-key FILE and --curve-peers FILE.
#ifndef MESHLM_CURVE_ARGS_H
#define MESHLM_CURVE_ARGS_H

#include "transport/curve.h"

typedef struct {
    const char *key_file;     // --curve-key FILE: this node's key pair (meshlm keygen)
    const char *peers_file;   // --curve-peers FILE: the keys it accepts (worker) or dials (coordinator)
    curve_conf_t conf;        // read by curve_args_load
} curve_args_t;

enum { CA_KEY = 1500, CA_PEERS }; // option ids: above GA_ (1000), LA_ (1200), FA_ (1300), EA_ (1400)

#define CURVE_ARGS_LONGOPTS {"curve-key", required_argument, 0, CA_KEY}, {"curve-peers", required_argument, 0, CA_PEERS}

#define CURVE_ARGS_USAGE                                                                                        \
    "authentication (CurveZMQ on the control link and the data plane; keys from meshlm keygen):\n"           \
    "      --curve-key FILE    this node's key pair (NAME.key)\n"                                             \
    "      --curve-peers FILE  lines 'KEY [ENDPOINT]' (or a .pub path): a worker admits coordinators with\n"  \
    "                          these keys (others are refused and logged); a coordinator dials each worker\n" \
    "                          endpoint with the key listed for it. The plan carries every node's key: the\n" \
    "                          data plane (activations, all-reduces) admits only the plan's nodes\n"

// Handles ch if it is a curve option: 1 handled, 0 not ours.
int curve_args_option(curve_args_t *a, int ch, const char *arg);

// Reads the files: 0 with *out = &a->conf (both given) or NULL (neither); 1 on an error (printed as
// "meshlm CMD: ...") or when only one of the two was given.
int curve_args_load(curve_args_t *a, const char *cmd, const curve_conf_t **out);

#endif
