// meshlm kvstore: a node's KV cache in files, with decode attention computed next to it, until SIGINT/SIGTERM.
#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "core/err.h"
#include "transport/comm.h"
#include "transport/comm_link.h"
#include "worker/node/kvserver.h"

// --- helpers

static void kvstore_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm kvstore --listen ENDPOINT --dir DIR [options]\n"
            "Keeps the KV cache of the nodes whose --kv-device is storage:ENDPOINT in files under DIR, appends\n"
            "their new k/v rows and computes decode attention over them for each q: only q, the new k/v rows\n"
            "and the attention outputs cross the link.\n"
            "  --listen ENDPOINT    tcp://HOST:PORT or ipc:///PATH\n"
            "  --dir DIR            where the KV files go (created if missing; each session's files are\n"
            "                       removed when it closes and when the kvstore stops)\n"
            "  --internal-bw MB/s   the drive's internal flash read bandwidth: each session's summary adds the\n"
            "                       time its attention reads would take at that rate (modelled, not measured)\n"
            "  -t, --threads N      attention threads (default 1)\n"
            "  --max-sessions N     devices served at once (default 64)\n"
            "  -q, --quiet          no session lines on stderr\n");
}

// True once SIGINT or SIGTERM (blocked by the caller) is pending; consumes it.
static bool signalled(void *arg) {
    const sigset_t *set = arg;
    struct timespec zero = {0, 0};
    return sigtimedwait(set, NULL, &zero) > 0;
}

// --- public API

int cmd_kvstore(int argc, char **argv) {
    static const struct option opts[] = {
        {"listen", required_argument, NULL, 'l'}, {"dir", required_argument, NULL, 'd'},
        {"internal-bw", required_argument, NULL, 'b'}, {"threads", required_argument, NULL, 't'},
        {"max-sessions", required_argument, NULL, 's'}, {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0},
    };
    const char *listen = NULL, *dir = NULL;
    double bw_mb = 0;
    int threads = 1, max_sessions = 64, c;
    bool quiet = false;
    optind = 1;
    while ((c = getopt_long(argc, argv, "t:qh", opts, NULL)) != -1) {
        char *end = NULL;
        switch (c) {
        case 'l': listen = optarg; break;
        case 'd': dir = optarg; break;
        case 'b':
            bw_mb = strtod(optarg, &end);
            if (!end || *end || !(bw_mb > 0 && bw_mb < 1e9)) {
                fprintf(stderr, "meshlm kvstore: --internal-bw takes MB/s above 0, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 't':
            threads = (int)strtol(optarg, &end, 10);
            if (!end || *end || threads < 1 || threads > 1024) {
                fprintf(stderr, "meshlm kvstore: --threads takes 1..1024, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 's':
            max_sessions = (int)strtol(optarg, &end, 10);
            if (!end || *end || max_sessions < 1 || max_sessions > 4096) {
                fprintf(stderr, "meshlm kvstore: --max-sessions takes 1..4096, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'q': quiet = true; break;
        case 'h': kvstore_usage(stdout); return 0;
        default: kvstore_usage(stderr); return 2;
        }
    }
    if (!listen || !dir || optind < argc) {
        fprintf(stderr, "meshlm kvstore: %s\n", optind < argc ? "unexpected arguments" : "--listen and --dir are required");
        kvstore_usage(stderr);
        return 2;
    }
    // SIGINT and SIGTERM are taken between requests, so every session's files are removed
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigprocmask(SIG_BLOCK, &set, NULL);
    char err[512];
    kvserver_t *srv = NULL;
    comm_t *link = NULL;
    kvserver_opts_t ko = {.dir = dir, .internal_bw = bw_mb * 1e6, .n_threads = threads, .max_sessions = max_sessions,
                          .log = quiet ? NULL : stderr};
    int rc = kvserver_new(&srv, &ko, err, sizeof err);
    if (rc == 0) rc = comm_link_listen(&link, listen, NULL, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "meshlm kvstore: %s\n", err);
        kvserver_destroy(&srv);
        return 1;
    }
    if (!quiet) {
        fprintf(stderr, "kvstore: listening on %s, KV files in %s", listen, dir);
        if (bw_mb > 0) fprintf(stderr, ", flash modelled at %.0f MB/s internal", bw_mb);
        fprintf(stderr, "\n");
    }
    rc = kvserver_serve(srv, link, signalled, &set, err, sizeof err);
    if (rc != 0) fprintf(stderr, "meshlm kvstore: %s\n", err);
    kvserver_destroy(&srv);
    comm_destroy(&link);
    return rc == 0 ? 0 : 1;
}
