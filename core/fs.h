// Small file-system helpers every layer uses: directories with their parents.
#ifndef MESHLM_FS_H
#define MESHLM_FS_H

#include <stddef.h>

// Creates directory path and its missing parents (mode 0755), like `mkdir -p`. 0 when it exists
// (or was made), else MLM_EIO with the directory that could not be made and the system's reason in
// err ("cannot create directory /x/y: Permission denied").
int mlm_mkdir_p(const char *path, char *err, size_t errlen);

#endif
