// libFuzzer target: the hand-written inputs of the planner (plan files, node lists, node files, routing
// counts).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/plan.h"

// --- public API

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0 || size > 16384) return 0;
    char *text = malloc(size);
    if (!text) return 0;
    memcpy(text, data + 1, size - 1); // the first byte picks the parser
    text[size - 1] = 0;
    char err[512];
    static plan_spec_t spec;
    static plan_node_t nodes[PLAN_MAX_NODES];
    switch (data[0] % 4) {
    case 3: { // routing counts for a model of 3 blocks of 4 experts: accepted ones are each block's shares
        static plan_model_t pm = {.name = "fuzz", .n_layer = 3, .n_expert = 4, .n_expert_used = 2};
        double pop[12];
        if (plan_popularity_parse(text, &pm, pop, err, sizeof err) == 0)
            for (int l = 0; l < 3; l++) {
                double sum = 0;
                for (int e = 0; e < 4; e++) {
                    if (!(pop[l * 4 + e] >= 0 && pop[l * 4 + e] <= 1)) abort();
                    sum += pop[l * 4 + e];
                }
                if (sum < 0.999999 || sum > 1.000001) abort();
            }
        break;
    }
    case 0:
        if (plan_file_parse(text, &spec, err, sizeof err) == 0) {
            // A parsed spec is consistent: stage entries tile [0, n) and ranges are ordered.
            if (spec.n_stages < 1 || spec.first[0] != 0 || spec.first[spec.n_stages] != spec.n) abort();
            if (spec.tp_mode != PLAN_TP_EXACT && spec.tp_mode != PLAN_TP_ALLREDUCE) abort();
            for (int k = 0; k < spec.n_stages; k++)
                if (spec.l1[k] <= spec.l0[k] || spec.first[k + 1] < spec.first[k]) abort();
        }
        break;
    case 1:
    default: {
        const int n = data[0] % 4 == 1 ? plan_parse_nodes(text, nodes, PLAN_MAX_NODES, err, sizeof err)
                                       : plan_parse_nodes_file(text, nodes, PLAN_MAX_NODES, err, sizeof err);
        // Accepted nodes have usable figures: a positive speed, disks with a bandwidth >= 0 and ids >= 0.
        for (int i = 0; i < n; i++)
            if (!(nodes[i].speed > 0) || nodes[i].disk_bw < 0 || nodes[i].disk_id < 0) abort();
        break;
    }
    }
    free(text);
    return 0;
}
