// Shared error codes for every meshlm module, and the one function that names them.
#ifndef MESHLM_ERR_H
#define MESHLM_ERR_H

#include <stddef.h>

// Functions return 0 on success or one of these negative codes. Values are only appended.
enum {
    MLM_OK = 0,
    MLM_EINVAL = -1,      // bad argument from the caller
    MLM_ENOMEM = -2,      // allocation failed
    MLM_EIO = -3,         // read, write, open or mmap failed
    MLM_EFORMAT = -4,     // malformed file or message
    MLM_EUNSUPPORTED = -5,// valid but not supported (type, version, architecture)
    MLM_ERANGE = -6,      // a count, size or index over its limit
    MLM_ETIMEOUT = -7,    // a deadline passed
    MLM_EPEER = -8,       // a peer vanished or closed
    MLM_EPROTO = -9,      // protocol violation or version mismatch
    MLM_ENOTFOUND = -10,  // key, tensor or file not found
    MLM_ESTATE = -11,     // call not valid in the object's current state
    MLM_EFULL = -12,      // no space left (disk, cache, buffer)
};

// Text for a code; never NULL ("unknown error" for codes not in the table).
const char *mlm_strerror(int code);

// Formats a message into err (when err is not NULL and errlen > 0) and returns code, so a failure
// is reported in one line: `return mlm_fail(err, errlen, MLM_EIO, "%s: %s", path, strerror(errno));`
int mlm_fail(char *err, size_t errlen, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif
