// CUnit suite "fs": core/fs.h: `mkdir -p` and whole-file reads, whose errors name the path and the system's reason.
#include <CUnit/CUnit.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"
#include "core/err.h"
#include "core/fs.h"

// --- helpers

static bool is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs(text, f);
    fclose(f);
}

// --- tests

static void test_mkdir_p(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1200], err[1300] = "";
    // parents that do not exist are made, a trailing slash is fine, an existing directory is success
    snprintf(p, sizeof p, "%s/a/b//c/", dir);
    CU_ASSERT_EQUAL(mlm_mkdir_p(p, err, sizeof err), 0);
    snprintf(p, sizeof p, "%s/a/b/c", dir);
    CU_ASSERT(is_dir(p));
    CU_ASSERT_EQUAL(mlm_mkdir_p(p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(mlm_mkdir_p(dir, err, sizeof err), 0);
    CU_ASSERT_EQUAL(mlm_mkdir_p("/", err, sizeof err), 0);

    // a parent that is a file: the message names that component and the reason
    char file[1024];
    snprintf(file, sizeof file, "%s/a/plain", dir);
    write_text(file, "x");
    snprintf(p, sizeof p, "%s/x/y", file);
    CU_ASSERT_EQUAL(mlm_mkdir_p(p, err, sizeof err), MLM_EIO);
    char want[1100];
    snprintf(want, sizeof want, "%s: cannot create directory: %s", file, strerror(ENOTDIR));
    CU_ASSERT_STRING_EQUAL(err, want);
    // the path itself is a file
    CU_ASSERT_EQUAL(mlm_mkdir_p(file, err, sizeof err), MLM_EIO);
    CU_ASSERT_STRING_EQUAL(err, want);
    CU_ASSERT_EQUAL(mlm_mkdir_p("", err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(mlm_mkdir_p(p, NULL, 0), MLM_EIO); // no message buffer
    if (geteuid() != 0) { // root may write anywhere
        CU_ASSERT_EQUAL(mlm_mkdir_p("/proc/meshlm-test/x", err, sizeof err), MLM_EIO);
        CU_ASSERT_PTR_NOT_NULL(strstr(err, "/proc/meshlm-test"));
    }

    unlink(file);
    snprintf(p, sizeof p, "%s/a/b/c", dir);
    rmdir(p);
    snprintf(p, sizeof p, "%s/a/b", dir);
    rmdir(p);
    snprintf(p, sizeof p, "%s/a", dir);
    rmdir(p);
    test_rm_dir(dir);
}

static void test_read_whole(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char p[1024], err[512] = "";
    char *text = NULL;
    size_t len = 7;

    // a file larger than the first read buffer comes back whole and NUL-terminated
    snprintf(p, sizeof p, "%s/big.txt", dir);
    FILE *f = fopen(p, "wb");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    for (int i = 0; i < 3000; i++) fprintf(f, "%04d\n", i);
    fclose(f);
    CU_ASSERT_EQUAL(mlm_read_file(p, 1 << 20, &text, &len, err, sizeof err), 0);
    CU_ASSERT_EQUAL(len, 15000);
    CU_ASSERT_PTR_NOT_NULL_FATAL(text);
    CU_ASSERT_EQUAL(strlen(text), 15000);
    CU_ASSERT_EQUAL(strncmp(text + 5 * 2999, "2999\n", 5), 0);
    free(text);

    // over the limit
    CU_ASSERT_EQUAL(mlm_read_file(p, 14999, &text, &len, err, sizeof err), MLM_ERANGE);
    CU_ASSERT_PTR_NULL(text);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, p));
    CU_ASSERT_EQUAL(mlm_read_file(p, 15000, &text, NULL, err, sizeof err), 0); // exactly the limit
    free(text);

    // an empty file
    snprintf(p, sizeof p, "%s/empty.txt", dir);
    write_text(p, "");
    CU_ASSERT_EQUAL(mlm_read_file(p, 16, &text, &len, err, sizeof err), 0);
    CU_ASSERT_EQUAL(len, 0);
    CU_ASSERT_STRING_EQUAL(text, "");
    free(text);

    // a missing file and a directory: the path and the system's reason
    char want[1100];
    snprintf(p, sizeof p, "%s/missing.txt", dir);
    CU_ASSERT_EQUAL(mlm_read_file(p, 16, &text, &len, err, sizeof err), MLM_EIO);
    CU_ASSERT_PTR_NULL(text);
    snprintf(want, sizeof want, "%s: cannot open: %s", p, strerror(ENOENT));
    CU_ASSERT_STRING_EQUAL(err, want);
    CU_ASSERT_EQUAL(mlm_read_file(dir, 16, &text, &len, err, sizeof err), MLM_EIO);
    snprintf(want, sizeof want, "%s: read failed: %s", dir, strerror(EISDIR));
    CU_ASSERT_STRING_EQUAL(err, want);

    unlink(p);
    snprintf(p, sizeof p, "%s/big.txt", dir);
    unlink(p);
    test_rm_dir(dir);
}

// --- suite

int test_fs_suite(void) {
    CU_pSuite s = CU_add_suite("fs", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "mkdir -p: parents made, errors name the path and reason", test_mkdir_p) ||
        !CU_add_test(s, "whole-file reads: limits, errors name the path and reason", test_read_whole))
        return -1;
    return 0;
}
