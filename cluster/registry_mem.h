// The embedded registry backend: an in-process store of member records behind the registry table.
#ifndef MESHLM_REGISTRY_MEM_H
#define MESHLM_REGISTRY_MEM_H

#include <stddef.h>

#include "cluster/registry.h"

// registry_open("mem://NAME"): a fresh store named name (only a label: each open is a store of its
// own, and registry_dup gives another handle on it). Heartbeats expire on the monotonic clock; the
// store is thread-safe and lives until its last handle is destroyed. 0 or MLM_ENOMEM.
int registry_mem_open(registry_t **out, const char *name, char *err, size_t errlen);

#endif
