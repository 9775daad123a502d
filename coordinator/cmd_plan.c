// meshlm plan: print the tensor-parallel shard table for a model over a node list, without running.
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "coordinator/cli.h"
#include "parallel/plan.h"
#include "worker/err.h"

// --- helpers

static void plan_usage(FILE *f) {
    fprintf(f,
            "usage: meshlm plan -m FILE --nodes SPEC [-c N_CTX]\n"
            "  -m, --model FILE   GGUF model\n"
            "  --nodes SPEC       N equal nodes, or speed[:budget] per node, e.g. 2,1,1:512M\n"
            "                     (speed is relative; budget is the node's memory for weights + KV cache)\n"
            "  -c, --ctx-size N   context positions the KV cache is sized for (default 4096)\n");
}

// --- public API

int cmd_plan(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'}, {"nodes", required_argument, 0, 'N'},
                                         {"ctx-size", required_argument, 0, 'c'}, {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = NULL, *spec = NULL;
    int n_ctx = 4096, ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "m:c:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'm': model = optarg; break;
        case 'N': spec = optarg; break;
        case 'c': n_ctx = atoi(optarg); break;
        case 'h': plan_usage(stdout); return 0;
        default: plan_usage(stderr); return 2;
        }
    }
    if (!model || !spec || n_ctx <= 0 || optind < argc) {
        plan_usage(stderr);
        return 2;
    }
    char err[1024];
    plan_node_t nodes[PLAN_MAX_NODES];
    int n = plan_parse_nodes(spec, nodes, PLAN_MAX_NODES, err, sizeof err);
    if (n < 0) {
        fprintf(stderr, "meshlm plan: %s\n", err);
        return 2;
    }
    model_t *m = NULL;
    model_load_opts_t lo = {.repack = false};
    if (model_load(&m, model, &lo, err, sizeof err) != 0) {
        fprintf(stderr, "meshlm plan: %s\n", err);
        return 1;
    }
    plan_t *p = malloc(sizeof *p);
    int rc = p ? plan_tp(m, nodes, n, n_ctx, p, err, sizeof err) : MLM_ENOMEM;
    if (rc == 0) plan_print(p, m, stdout);
    else fprintf(stderr, "meshlm plan: %s\n", rc == MLM_ENOMEM ? "out of memory" : err);
    free(p);
    model_destroy(&m);
    return rc == 0 ? 0 : 1;
}
