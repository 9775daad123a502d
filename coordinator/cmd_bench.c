// meshlm bench (placeholder until implemented).
#include <stdio.h>
#include "coordinator/cli.h"

int cmd_bench(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "meshlm: 'bench' is not implemented yet\n");
    return 2;
}
