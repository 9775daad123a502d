// CUnit test runner: `meshlm_tests [SUITE ...]` runs the named suites, or all of them.
#include <CUnit/Basic.h>
#include <stdio.h>
#include <string.h>

#include "test_util.h"

int main(int argc, char **argv) {
    if (CU_initialize_registry() != CUE_SUCCESS) {
        fprintf(stderr, "meshlm_tests: cannot initialise CUnit: %s\n", CU_get_error_msg());
        return 2;
    }
    int added = 0;
    for (const test_suite_entry_t *e = test_registry; e->name; e++) {
        int want = argc < 2;
        for (int i = 1; i < argc; i++) want |= strcmp(argv[i], e->name) == 0;
        if (!want) continue;
        if (e->add() != 0) {
            fprintf(stderr, "meshlm_tests: suite %s failed to register: %s\n", e->name, CU_get_error_msg());
            CU_cleanup_registry();
            return 2;
        }
        added++;
    }
    if (added == 0) {
        fprintf(stderr, "meshlm_tests: no suite matched\n");
        CU_cleanup_registry();
        return 2;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failed = CU_get_number_of_failures() + CU_get_number_of_tests_failed();
    unsigned ran = CU_get_number_of_tests_run();
    CU_cleanup_registry();
    if (ran == 0) {
        fprintf(stderr, "meshlm_tests: no test ran\n");
        return 2;
    }
    return failed ? 1 : 0;
}
