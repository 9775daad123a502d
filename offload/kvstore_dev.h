// The KV store's engine: an attention/KV device whose cache lives in files (one per sequence) and
// whose attention reads them in place with the host device's arithmetic; `meshlm kvstore` serves one
// per client session, so a node's KV blocks stay on the store's drive.
#ifndef MESHLM_OFFLOAD_KVSTORE_DEV_H
#define MESHLM_OFFLOAD_KVSTORE_DEV_H

#include <stddef.h>

#include "offload/attn.h"

typedef struct {
    const char *dir;      // directory the sequence files go in (must exist; borrowed during the call)
    const char *prefix;   // file names are "<prefix>-s<seq>.kv" (NULL = "kv"); copied
    double internal_bw;   // the drive's internal read bandwidth, bytes/s: stats' sim_time_ms is the
                          // KV bytes the attention read at this rate (modelled, not measured; 0 = none)
    char *errbuf;         // where a failed call's detail goes (a full disk names the file); may be
                          // NULL; borrowed for the device's life
    size_t errcap;        // its bytes
} kvstore_opts_t;

// Makes the device (not registered by name: its owner makes it). Each sequence is one file under
// o->dir, created sparse at seq_new with room for n_ctx positions of every layer's k and v rows:
// layer l's k rows at [2l * n_ctx, (2l + 1) * n_ctx) rows, its v rows after them, so a layer's
// positions are contiguous and the file system allocates blocks as rows are appended (written with
// pwrite). attend maps the file read-only and runs attn_calc (ops_attention) over it exactly as the host device
// does (bits equal to host's). seq_new fails with MLM_EIO (the file cannot be made) and append with
// MLM_EFULL (no space left on the drive, or a quota) or MLM_EIO, the file's path in errbuf.
// Stats: kv_bytes = rows appended and held (k and v, all layers), kv_bytes_ram = 0, bytes_written,
// bytes_read = the KV rows each attend read, time_ms = measured time of appends and attends,
// sim_time_ms = bytes_read / internal_bw. 0, or MLM_EINVAL / MLM_EUNSUPPORTED / MLM_ENOMEM with err.
int kvstore_dev_new(attn_dev_t **out, const attn_params_t *p, const kvstore_opts_t *o, char *err, size_t errlen);

#endif
