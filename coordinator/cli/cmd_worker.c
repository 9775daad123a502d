// meshlm worker: serve shards of a model to a coordinator until told to exit.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "coordinator/cli/cli.h"
#include "parallel/plan.h"
#include "worker/node/node.h"

// --- helpers

static void worker_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm worker --listen ENDPOINT [options]\n"
            "  --listen ENDPOINT    control endpoint: tcp://HOST:PORT (data plane on PORT+1) or ipc:///PATH\n"
            "  -m, --model FILE     a local copy of the model (without it, slices come from the coordinator\n"
            "                       once and are kept in the cache)\n"
            "  --cache-dir DIR      where received shards are kept (default $MESHLM_CACHE or ~/.cache/meshlm)\n"
            "  --name ID            this worker's name in plans (default worker-PID)\n"
            "  -t, --threads N      compute threads (default: all cores)\n"
            "  --mem-budget SIZE    memory for weights + KV cache, e.g. 2G (reported to the planner)\n"
            "  --timeout MS         deadline of each exchange with the coordinator and peers (default 30000)\n"
            "  --no-profile         do not measure this machine at start (planned as an average node)\n"
            "  --verbose            log every message\n");
}

// --- public API

int cmd_worker(int argc, char **argv) {
    static const struct option opts[] = {
        {"listen", required_argument, 0, 'l'}, {"model", required_argument, 0, 'm'},
        {"cache-dir", required_argument, 0, 'C'}, {"name", required_argument, 0, 'N'},
        {"threads", required_argument, 0, 't'}, {"mem-budget", required_argument, 0, 'B'},
        {"timeout", required_argument, 0, 'T'}, {"verbose", no_argument, 0, 'v'},
        {"no-profile", no_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    node_opts_t o = {0};
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "l:m:t:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'l': o.listen = optarg; break;
        case 'm': o.model_path = optarg; break;
        case 'C': o.cache_dir = optarg; break;
        case 'N': o.node_id = optarg; break;
        case 't': o.n_threads = atoi(optarg); break;
        case 'B':
            if (plan_parse_size(optarg, &o.mem_budget) != 0) {
                fprintf(stderr, "meshlm worker: bad --mem-budget '%s'\n", optarg);
                return 2;
            }
            break;
        case 'T': o.timeout_ms = atoi(optarg); break;
        case 'v': o.verbose = true; break;
        case 'P': o.no_profile = true; break;
        case 'h': worker_usage(stdout); return 0;
        default: worker_usage(stderr); return 2;
        }
    }
    if (!o.listen || optind < argc) {
        worker_usage(stderr);
        return 2;
    }
    char err[1024] = "";
    int rc = node_serve(&o, err, sizeof err);
    if (rc != 0) fprintf(stderr, "meshlm worker: %s\n", err);
    return rc == 0 ? 0 : 1;
}
