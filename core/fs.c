// Files and directories: whole-file reads and `mkdir -p`, with errors naming the path and strerror(errno).
#include "core/fs.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/err.h"

// --- helpers

// Creates one directory; an existing directory is success. 0 or the errno of the failure.
static int mkdir_one(const char *path) {
    if (mkdir(path, 0755) == 0) return 0;
    const int e = errno;
    struct stat st;
    if (e == EEXIST && stat(path, &st) == 0) return S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
    return e;
}

// --- public API

int mlm_mkdir_p(const char *path, char *err, size_t errlen) {
    if (!path || !*path) return mlm_fail(err, errlen, MLM_EINVAL, "mkdir: no path given");
    char *p = strdup(path);
    if (!p) return mlm_fail(err, errlen, MLM_ENOMEM, "%s: out of memory", path);
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/') p[--n] = 0; // "a/b/" is "a/b"
    int e = 0;
    for (char *s = p + 1; !e && *s; s++) { // every parent, shortest first; "/" itself is never made
        if (*s != '/' || s[-1] == '/') continue;
        *s = 0;
        e = mkdir_one(p);
        if (!e) *s = '/';
    }
    if (!e) e = mkdir_one(p);
    int rc = 0;
    if (e) rc = mlm_fail(err, errlen, MLM_EIO, "%s: cannot create directory: %s", p, strerror(e));
    free(p);
    return rc;
}

int mlm_read_file(const char *path, size_t max_bytes, char **out, size_t *len, char *err, size_t errlen) {
    *out = NULL;
    if (len) *len = 0;
    if (!path || !*path) return mlm_fail(err, errlen, MLM_EINVAL, "read: no path given");
    FILE *f = fopen(path, "rb");
    if (!f) return mlm_fail(err, errlen, MLM_EIO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1); // (cap + 1) bytes: the text and its NUL
    int rc = buf ? 0 : MLM_ENOMEM;
    while (rc == 0) {
        n += fread(buf + n, 1, cap - n, f);
        if (ferror(f)) {
            rc = mlm_fail(err, errlen, MLM_EIO, "%s: read failed: %s", path, strerror(errno));
        } else if (n > max_bytes) {
            rc = mlm_fail(err, errlen, MLM_ERANGE, "%s: larger than %zu bytes", path, max_bytes);
        } else if (n < cap) {
            break; // end of file
        } else {
            char *nb = realloc(buf, cap * 2 + 1);
            if (!nb) rc = MLM_ENOMEM;
            else buf = nb, cap *= 2;
        }
    }
    fclose(f);
    if (rc == MLM_ENOMEM) mlm_fail(err, errlen, rc, "%s: out of memory", path);
    if (rc != 0) {
        free(buf);
        return rc;
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return 0;
}
