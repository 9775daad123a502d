// The Redis registry backend (hiredis): member records, heartbeat keys with a TTL, epoch and plan on a Redis server.
#ifndef MESHLM_REGISTRY_REDIS_H
#define MESHLM_REGISTRY_REDIS_H

#include <stddef.h>

#include "cluster/registry.h"

// registry_open("redis://..."): parses the URL (cluster/registry.h), connects within its timeout,
// logs in (AUTH) and selects the database. 0 with *out set, or MLM_EINVAL (bad URL), MLM_EPEER /
// MLM_ETIMEOUT (no server answering), MLM_EIO (refused login or database), MLM_ENOMEM, with the
// reason in err naming the URL.
int registry_redis_open(registry_t **out, const char *url, char *err, size_t errlen);

#endif
