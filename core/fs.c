// File-system helpers: mkdir -p with a clear error.
#include "core/fs.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "core/err.h"

// --- public API

int mlm_mkdir_p(const char *path, char *err, size_t errlen) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return mlm_fail(err, errlen, MLM_EINVAL, "cannot create directory '%s': bad path", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        const char saved = buf[i];
        buf[i] = 0;
        struct stat st;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return mlm_fail(err, errlen, MLM_EIO, "cannot create directory %s: %s", buf, strerror(errno));
        if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
            return mlm_fail(err, errlen, MLM_EIO, "cannot create directory %s: %s", buf,
                            stat(buf, &st) != 0 ? strerror(errno) : "a file of that name is in the way");
        buf[i] = saved;
    }
    return 0;
}
