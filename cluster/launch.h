// Local launcher: starts N worker processes on this machine and stops them again.
#ifndef MESHLM_LAUNCH_H
#define MESHLM_LAUNCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cluster/memcg.h"

#define LAUNCH_MAX 64

typedef struct {
    int n;                             // workers started
    pid_t pid[LAUNCH_MAX];             // their process ids
    char name[LAUNCH_MAX][24];         // their names in plans: local-0, local-1, ...
    char endpoint[LAUNCH_MAX][300];    // their control endpoints
    char dir[256];                     // run directory holding the ipc sockets
    // Memory: each worker runs in its own memory cgroup "meshlm-<our pid>-<i>" when cgroups are writable.
    memcg_t *cg[LAUNCH_MAX];           // the workers' groups (NULL: none; owned, launch_reap removes them)
    uint64_t mem_limit;                // each group's limit in bytes (0 = none: the groups only measure)
    char cg_note[400];                 // why the workers have no memory cgroups ("" when they have)
    uint64_t vmhwm[LAUNCH_MAX];        // highest VmHWM seen by launch_sample, bytes (0 = never read)
    uint64_t cg_peak[LAUNCH_MAX];      // each group's peak usage (launch_sample, launch_reap), bytes
    int oom_kills[LAUNCH_MAX];         // processes the OOM killer killed in each group (-1 = unknown)
    bool exited[LAUNCH_MAX];           // the worker has exited and was reaped (launch_check, launch_reap)
    int status[LAUNCH_MAX];            // its wait status then
} launch_t;

typedef struct {
    const char *exe;         // meshlm executable (NULL = /proc/self/exe)
    const char *model_path;  // given to workers with --model (NULL: they receive slices)
    const char *cache_dir;   // --cache-dir for the workers (NULL = their default)
    int n_threads;           // -t per worker (0 = let them choose)
    bool tcp;                // loopback TCP instead of ipc sockets
    bool verbose;
    uint64_t mem_budget;     // --mem-budget of every worker, bytes (0 = none given)
    uint64_t mem_limit;      // memory cgroup limit of every worker, page cache included (0 = no limit)
    int timeout_ms;          // --timeout of every worker (0 = their default)
    const char *const *extra_argv; // (n_extra) more options for every worker's command line (borrowed)
    int n_extra;             // at most 8
    const char *model_sha256; // model_path's SHA-256 in hex (64 digits), given to the workers so that they
                              // do not hash the file again (NULL: each hashes it)
} launch_opts_t;

// Starts n workers listening on fresh endpoints, each moved into its own memory cgroup (limited to
// o->mem_limit) before it execs. Where cgroups cannot be made the workers run without them and
// l->cg_note says why (for the caller to print). 0, or a negative MLM_ code (message in err; any
// started worker is stopped).
int launch_local(launch_t *l, int n, const launch_opts_t *o, char *err, size_t errlen);

// Drops the cached pages of the file at path that no process maps (posix_fadvise DONTNEED). A cached
// page is charged to the memory cgroup that read it first: called after the coordinator and the
// workers have hashed the model and before the workers load their shards, it makes each worker's
// group pay for the pages of its shard, so the page cache cannot hide the disk. 0 or MLM_EIO.
int launch_drop_cache(const char *path);

// Peak resident set of a process (VmHWM of /proc/PID/status) in bytes; 0 when it cannot be read
// (gone, a zombie, or not ours to read).
uint64_t launch_vmhwm(pid_t pid);

// Reads every running worker's VmHWM and every group's peak into l (keeping the highest values
// seen). Call it before the workers are told to exit.
void launch_sample(launch_t *l);

// Reaps the workers that have exited (waiting up to wait_ms for a first one when none has) and
// describes each (name, pid, exit code or signal, and that the OOM killer of its memory cgroup
// killed it, with the limit) in msg, "; "-separated. Returns how many workers have exited so far;
// 0 leaves msg empty.
int launch_check(launch_t *l, int wait_ms, char *msg, size_t cap);

// A random port below the kernel's ephemeral range (ip_local_port_range), so that no outgoing
// connection of this machine takes it as its source port between choosing it and binding it; 0 when
// that range leaves no room (then let the kernel pick). seed is the caller's rand_r state.
int launch_candidate_port(unsigned *seed);

// Waits up to timeout_ms for the workers to exit, kills the rest, reads the groups' final peaks,
// removes the groups and the run directory.
void launch_reap(launch_t *l, int timeout_ms);

#endif
