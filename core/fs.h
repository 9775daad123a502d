// Files and directories: whole-file reads and directory creation whose errors name the path and the system's reason.
#ifndef MESHLM_FS_H
#define MESHLM_FS_H

#include <stddef.h>

// Creates directory path and any missing parents (mode 0755, like `mkdir -p`); an existing directory
// is success. 0, or MLM_EINVAL (empty path), MLM_EIO with "PATH: cannot create directory: REASON"
// in err (PATH is the component that failed, e.g. a parent that is a file), or MLM_ENOMEM.
int mlm_mkdir_p(const char *path, char *err, size_t errlen);

// Reads the whole file at path into a NUL-terminated buffer (caller frees *out); *len (may be NULL)
// gets its size without the NUL. Refuses files over max_bytes. 0, or MLM_EIO ("PATH: cannot open:
// REASON" / "PATH: read failed: REASON"), MLM_ERANGE ("PATH: larger than N bytes"), MLM_ENOMEM;
// *out is NULL on failure.
int mlm_read_file(const char *path, size_t max_bytes, char **out, size_t *len, char *err, size_t errlen);

#endif
