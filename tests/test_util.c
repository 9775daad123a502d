// Helpers shared by the CUnit suites (not a suite itself).
#include "test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *test_shared_dir(void) {
    const char *e = getenv("MESHLM_SHARED");
    return (e && *e) ? e : MESHLM_SHARED_DEFAULT;
}

char *test_shared_path(char *buf, size_t cap, const char *rel) {
    snprintf(buf, cap, "%s/%s", test_shared_dir(), rel);
    return buf;
}

void *test_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return NULL; }
    long n = ftell(f);
    if (n < 0) { fclose(f); return NULL; }
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf) { fclose(f); return NULL; }
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); fclose(f); return NULL; }
    buf[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return buf;
}

const char *test_meshlm_bin(void) {
    const char *e = getenv("MESHLM_BIN");
    return (e && *e) ? e : NULL;
}

char *test_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    size_t n = strlen(base) + 32;
    char *p = malloc(n);
    if (!p) return NULL;
    snprintf(p, n, "%s/meshlm-test-XXXXXX", base);
    if (!mkdtemp(p)) { free(p); return NULL; }
    return p;
}
