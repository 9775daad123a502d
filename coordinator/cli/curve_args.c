// --curve-key and --curve-peers, read into a curve_conf_t.
#include "coordinator/cli/curve_args.h"

#include <stdio.h>

// --- public API

int curve_args_option(curve_args_t *a, int ch, const char *arg) {
    if (ch == CA_KEY) a->key_file = arg;
    else if (ch == CA_PEERS) a->peers_file = arg;
    else return 0;
    return 1;
}

int curve_args_load(curve_args_t *a, const char *cmd, const curve_conf_t **out) {
    *out = NULL;
    if (!a->key_file && !a->peers_file) return 0;
    if (!a->key_file || !a->peers_file) {
        fprintf(stderr, "meshlm %s: --curve-key and --curve-peers go together\n", cmd);
        return 1;
    }
    char err[512];
    if (curve_read_keypair(a->key_file, &a->conf.self, err, sizeof err) != 0 ||
        curve_read_peers(a->peers_file, &a->conf.peers, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm %s: %s\n", cmd, err);
        return 1;
    }
    *out = &a->conf;
    return 0;
}
