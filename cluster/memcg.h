// Memory cgroups for local processes: one group per process, a limit that counts the page cache, the peak.
#ifndef MESHLM_MEMCG_H
#define MESHLM_MEMCG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct memcg memcg_t;

// Where this process can make memory cgroups: the directory of its own group in the cgroup v1 memory
// hierarchy (preferred where mounted) or in the cgroup v2 hierarchy when that has the memory
// controller. Writes the directory into base (cap bytes; base may be NULL) and returns the version,
// 1 or 2; or a negative MLM_ code with the reason in err (no memory controller mounted, not
// writable, the v2 controller not enabled for child groups).
int memcg_probe(char *base, size_t cap, char *err, size_t errlen);

// Creates the group `name` (one path component) in memcg_probe's directory, limited to limit bytes
// (0 = no limit, the group still measures). Page cache, anonymous and kernel memory of its processes
// all count against the limit, and swap cannot extend it (v1 memory.memsw.limit_in_bytes when the
// kernel has it, v2 memory.swap.max = 0). 0 with *out set (caller destroys), or a negative MLM_ code
// with the reason in err and nothing left behind.
int memcg_new(memcg_t **out, const char *name, uint64_t limit, char *err, size_t errlen);

// Moves process pid into the group (do it before the process execs, so that all it maps counts).
// 0, or MLM_EIO with the reason in err.
int memcg_add(memcg_t *g, pid_t pid, char *err, size_t errlen);

// Highest usage in bytes since the group was made (v1 memory.max_usage_in_bytes, v2 memory.peak);
// 0 when the kernel does not say. Still readable after the group's processes have exited.
uint64_t memcg_peak(const memcg_t *g);

// Usage in bytes now (v1 memory.usage_in_bytes, v2 memory.current); 0 when unknown.
uint64_t memcg_usage(const memcg_t *g);

// The limit set by memcg_new as the kernel holds it (0 = none).
uint64_t memcg_limit(const memcg_t *g);

// Processes the OOM killer has killed in the group (oom_kill of v1 memory.oom_control, of v2
// memory.events); -1 when the kernel does not say.
int memcg_oom_kills(const memcg_t *g);

// The group's directory (borrowed until memcg_destroy) and its cgroup version (1 or 2).
const char *memcg_path(const memcg_t *g);
int memcg_version(const memcg_t *g);

// Removes the group, waiting up to 2 s for exiting processes to leave it; a group that still holds
// processes then is left in place (they stay limited). Accepts NULL, idempotent, NULLs the pointer.
void memcg_destroy(memcg_t **self_p);

// Removes groups named "meshlm-PID-..." in memcg_probe's directory whose process PID is gone (left
// by a run that was killed) and that hold no process. Returns how many were removed.
int memcg_sweep(void);

#endif
