// meshlm gen_model (placeholder until implemented).
#include <stdio.h>
#include "coordinator/cli.h"

int cmd_gen_model(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "meshlm: 'gen_model' is not implemented yet\n");
    return 2;
}
