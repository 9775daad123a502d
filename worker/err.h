// Shared error codes for every meshlm module, and the one function that names them.
#ifndef MESHLM_ERR_H
#define MESHLM_ERR_H

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

#endif
