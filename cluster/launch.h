// Local launcher: starts N worker processes on this machine and stops them again.
#ifndef MESHLM_LAUNCH_H
#define MESHLM_LAUNCH_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define LAUNCH_MAX 64

typedef struct {
    int n;                             // workers started
    pid_t pid[LAUNCH_MAX];             // their process ids
    char endpoint[LAUNCH_MAX][300];    // their control endpoints
    char dir[256];                     // run directory holding the ipc sockets
} launch_t;

typedef struct {
    const char *exe;         // meshlm executable (NULL = /proc/self/exe)
    const char *model_path;  // given to workers with --model (NULL: they receive slices)
    const char *cache_dir;   // --cache-dir for the workers (NULL = their default)
    int n_threads;           // -t per worker (0 = let them choose)
    bool tcp;                // loopback TCP instead of ipc sockets
    bool verbose;
} launch_opts_t;

// Starts n workers listening on fresh endpoints. 0, or a negative MLM_ code (message in err; any
// started worker is stopped).
int launch_local(launch_t *l, int n, const launch_opts_t *o, char *err, size_t errlen);

// A random port below the kernel's ephemeral range (ip_local_port_range), so that no outgoing
// connection of this machine takes it as its source port between choosing it and binding it; 0 when
// that range leaves no room (then let the kernel pick). seed is the caller's rand_r state.
int launch_candidate_port(unsigned *seed);

// Waits up to timeout_ms for the workers to exit, kills the rest, removes the run directory.
void launch_reap(launch_t *l, int timeout_ms);

#endif
