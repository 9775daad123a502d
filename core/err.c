// Text for the shared error codes.
#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>

const char *mlm_strerror(int code) {
    switch (code) {
    case MLM_OK: return "ok";
    case MLM_EINVAL: return "invalid argument";
    case MLM_ENOMEM: return "out of memory";
    case MLM_EIO: return "i/o error";
    case MLM_EFORMAT: return "malformed data";
    case MLM_EUNSUPPORTED: return "unsupported";
    case MLM_ERANGE: return "value out of range";
    case MLM_ETIMEOUT: return "deadline passed";
    case MLM_EPEER: return "peer lost";
    case MLM_EPROTO: return "protocol error";
    case MLM_ENOTFOUND: return "not found";
    case MLM_ESTATE: return "invalid state";
    case MLM_EFULL: return "no space left";
    default: return "unknown error";
    }
}

int mlm_fail(char *err, size_t errlen, int code, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}
