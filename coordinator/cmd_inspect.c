// meshlm inspect (placeholder until implemented).
#include <stdio.h>
#include "coordinator/cli.h"

int cmd_inspect(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "meshlm: 'inspect' is not implemented yet\n");
    return 2;
}
