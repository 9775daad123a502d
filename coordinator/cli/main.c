// meshlm: the one executable; dispatches to a subcommand.
#include <stdio.h>
#include <string.h>

#include "coordinator/cli/cli.h"
#include "worker/node/attn_storage.h"

typedef struct {
    const char *name;                   // subcommand word
    int (*fn)(int argc, char **argv);   // entry point
    const char *help;                   // one line
} subcommand_t;

static const subcommand_t subcommands[] = {
    {"run", cmd_run, "generate text from a prompt on this machine"},
    {"bench", cmd_bench, "measure prompt and generation speed (llama-bench style table)"},
    {"inspect", cmd_inspect, "print a GGUF file's metadata and tensor table"},
    {"worker", cmd_worker, "serve model shards to a coordinator (meshlm worker --listen tcp://0.0.0.0:5000)"},
    {"coordinator", cmd_coordinator, "generate with remote workers (run --workers tcp://a:p,tcp://b:p)"},
    {"mpi", cmd_mpi, "generate across the ranks of an MPI job (mpirun -np N meshlm mpi -m FILE -p TEXT)"},
    {"nodes", cmd_nodes, "list the workers and standbys in a registry (meshlm nodes --registry redis://HOST:PORT)"},
    {"serve", cmd_serve, "OpenAI-compatible HTTP API over this node or a cluster (meshlm serve -m FILE --port 8080)"},
    {"plan", cmd_plan, "print how a model would be split over nodes (no compute)"},
    {"kvstore", cmd_kvstore, "keep nodes' KV caches in files and attend next to them (storage:ENDPOINT devices)"},
    {"chaos", cmd_chaos, "R requests on N local workers under a fault schedule: speed, recovery, lost and changed outputs"},
    {"keygen", cmd_keygen, "write a CurveZMQ key pair for authenticated nodes (meshlm keygen NAME)"},
    {"gen-model", cmd_gen_model, "write a GGUF with seeded random weights in a real model's shape"},
    {NULL, NULL, NULL},
};

static void usage(FILE *f) {
    fprintf(f, "meshlm %s: distributed LLM inference\n\nusage: meshlm <command> [options]\n\ncommands:\n",
            MESHLM_VERSION);
    for (const subcommand_t *s = subcommands; s->name; s++) fprintf(f, "  %-12s %s\n", s->name, s->help);
    fprintf(f, "  %-12s %s\n", "help", "this list");
    fprintf(f, "\n'meshlm <command> --help' describes a command's options.\n");
}

int main(int argc, char **argv) {
    attn_storage_register(); // the storage:ENDPOINT attention device lives above offload/
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version")) {
        printf("meshlm %s\n", MESHLM_VERSION);
        return 0;
    }
    for (const subcommand_t *s = subcommands; s->name; s++)
        if (!strcmp(cmd, s->name)) return s->fn(argc - 1, argv + 1);
    fprintf(stderr, "meshlm: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
