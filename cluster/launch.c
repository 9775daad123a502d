// Local launcher: fork/exec `meshlm worker` N times on ipc or loopback TCP endpoints.
#include "cluster/launch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"

// --- helpers

// Binds a loopback TCP socket to port (0 = any); returns the fd and the bound port, or -1.
static int bind_port(int port, int *bound) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        close(fd);
        return -1;
    }
    *bound = ntohs(a.sin_port);
    return fd;
}

int launch_candidate_port(unsigned *seed) {
    int lo = 32768, hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%d %d", &lo, &hi) != 2) lo = 32768;
        fclose(f);
    }
    const int first = 10000, last = lo - 2;
    if (last - first < 1000) return 0;
    return first + (int)(rand_r(seed) % (unsigned)(last - first));
}

// n pairs of consecutive free loopback ports (control, data), all distinct: the probe sockets stay
// bound until every pair is chosen, so no two pairs can share a port. 0 or -1.
static int free_port_pairs(int n, int *base) {
    int fds[2 * LAUNCH_MAX], nfd = 0, got = 0, rc = 0;
    unsigned seed = (unsigned)getpid() ^ (unsigned)time(NULL);
    for (int attempt = 0; got < n && attempt < 50 * n; attempt++) {
        int p0, p1;
        int f0 = bind_port(launch_candidate_port(&seed), &p0);
        if (f0 < 0) continue;
        int f1 = p0 < 65535 ? bind_port(p0 + 1, &p1) : -1;
        if (f1 < 0) {
            close(f0);
            continue;
        }
        fds[nfd++] = f0;
        fds[nfd++] = f1;
        base[got++] = p0;
    }
    if (got < n) rc = -1;
    for (int i = 0; i < nfd; i++) close(fds[i]);
    return rc;
}

// --- public API

int launch_local(launch_t *l, int n, const launch_opts_t *o, char *err, size_t errlen) {
    memset(l, 0, sizeof *l);
    if (n < 1 || n > LAUNCH_MAX) return mlm_fail(err, errlen, MLM_EINVAL, "--local takes 1..%d workers", LAUNCH_MAX);
    const char *tmp = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(l->dir, sizeof l->dir, "%s/meshlm-run-XXXXXX", tmp);
    if (!mkdtemp(l->dir)) {
        const int e = errno;
        l->dir[0] = 0; // nothing for launch_reap to remove
        return mlm_fail(err, errlen, MLM_EIO, "%s/meshlm-run-XXXXXX: cannot create the run directory: %s", tmp,
                        strerror(e));
    }
    const char *exe = o->exe ? o->exe : "/proc/self/exe";
    int ports[LAUNCH_MAX];
    if (o->tcp && free_port_pairs(n, ports) != 0) {
        launch_reap(l, 0);
        return mlm_fail(err, errlen, MLM_EIO, "no free pairs of loopback ports for %d workers", n);
    }
    for (int i = 0; i < n; i++) {
        if (o->tcp) {
            snprintf(l->endpoint[i], sizeof l->endpoint[i], "tcp://127.0.0.1:%d", ports[i]);
        } else {
            snprintf(l->endpoint[i], sizeof l->endpoint[i], "ipc://%s/w%d", l->dir, i);
        }
        char threads[16], name[32];
        snprintf(threads, sizeof threads, "%d", o->n_threads);
        snprintf(name, sizeof name, "local-%d", i);
        const char *argv[16];
        int a = 0;
        argv[a++] = "meshlm";
        argv[a++] = "worker";
        argv[a++] = "--listen";
        argv[a++] = l->endpoint[i];
        argv[a++] = "--name";
        argv[a++] = name;
        argv[a++] = "-t";
        argv[a++] = threads;
        argv[a++] = "--no-profile"; // workers sharing one machine would measure each other
        if (o->model_path) {
            argv[a++] = "--model";
            argv[a++] = o->model_path;
        }
        if (o->cache_dir) {
            argv[a++] = "--cache-dir";
            argv[a++] = o->cache_dir;
        }
        if (o->verbose) argv[a++] = "--verbose";
        argv[a] = NULL;
        pid_t pid = fork();
        if (pid < 0) {
            const int e = errno;
            launch_reap(l, 0);
            return mlm_fail(err, errlen, MLM_EIO, "cannot start worker %d (%s): %s", i, exe, strerror(e));
        }
        if (pid == 0) {
            execv(exe, (char *const *)argv);
            _exit(127);
        }
        l->pid[l->n++] = pid;
    }
    return 0;
}

void launch_reap(launch_t *l, int timeout_ms) {
    const int64_t dl = mlm_deadline(timeout_ms > 0 ? timeout_ms : 0);
    for (int i = 0; i < l->n; i++) {
        if (l->pid[i] <= 0) continue;
        for (;;) {
            pid_t r = waitpid(l->pid[i], NULL, WNOHANG);
            if (r == l->pid[i] || r < 0) break;
            if (mlm_passed(dl)) {
                kill(l->pid[i], SIGKILL);
                waitpid(l->pid[i], NULL, 0);
                break;
            }
            usleep(10000);
        }
        l->pid[i] = 0;
    }
    if (l->dir[0]) { // the ipc socket files, then the directory
        for (int i = 0; i < l->n; i++) {
            char p[400];
            snprintf(p, sizeof p, "%s/w%d", l->dir, i);
            unlink(p);
            snprintf(p, sizeof p, "%s/w%d.data", l->dir, i);
            unlink(p);
        }
        rmdir(l->dir);
    }
}
