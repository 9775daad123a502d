// meshlm keygen: a CurveZMQ key pair for a coordinator or a worker.
#include <stdio.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "transport/curve.h"

// --- public API

int cmd_keygen(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(argc == 2 ? stdout : stderr,
                "usage: meshlm keygen NAME\n"
                "writes NAME.key (this node's public and secret key, mode 0600: give it with --curve-key) and\n"
                "NAME.pub (the public key, for the other side's --curve-peers file)\n");
        return argc == 2 ? 0 : 2;
    }
    curve_keypair_t k;
    char err[512];
    if (curve_keygen(&k, err, sizeof err) != 0 || curve_write_keypair(argv[1], &k, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm keygen: %s\n", err);
        return 1;
    }
    printf("%s\n", k.pub);
    fprintf(stderr, "meshlm keygen: wrote %s.key (secret, mode 0600) and %s.pub\n", argv[1], argv[1]);
    return 0;
}
