// meshlm run (placeholder until implemented).
#include <stdio.h>
#include "coordinator/cli.h"

int cmd_run(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "meshlm: 'run' is not implemented yet\n");
    return 2;
}
