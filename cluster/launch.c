// Local launcher: fork/exec `meshlm worker` N times on ipc or loopback TCP endpoints, each in its own memory cgroup.
#include "cluster/launch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
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

// "12.3 MiB" / "1.50 GiB".
static void fmt_bytes(char *buf, size_t cap, uint64_t b) {
    if (b >= (1ull << 30)) snprintf(buf, cap, "%.2f GiB", (double)b / (1ull << 30));
    else snprintf(buf, cap, "%.1f MiB", (double)b / (1ull << 20));
}

// Reads worker i's group: its peak (the highest seen) and its OOM kills.
static void sample_group(launch_t *l, int i) {
    if (!l->cg[i]) return;
    const uint64_t peak = memcg_peak(l->cg[i]);
    if (peak > l->cg_peak[i]) l->cg_peak[i] = peak;
    l->oom_kills[i] = memcg_oom_kills(l->cg[i]);
}

// Appends what happened to exited worker i to msg (len used of cap).
static void describe_exit(const launch_t *l, int i, char *msg, size_t cap) {
    size_t len = strlen(msg);
    if (len + 1 >= cap) return;
    char *p = msg + len;
    const size_t left = cap - len;
    const char *sep = len ? "; " : "";
    const int st = l->status[i];
    if (l->oom_kills[i] > 0) {
        char lim[32], peak[32];
        fmt_bytes(lim, sizeof lim, l->mem_limit);
        fmt_bytes(peak, sizeof peak, l->cg_peak[i]);
        if (l->mem_limit)
            snprintf(p, left, "%sworker %s (pid %d) was killed by the OOM killer of its memory cgroup: it needs more "
                     "than its limit of %s (--local-mem; peak %s)", sep, l->name[i], (int)l->pid[i], lim, peak);
        else
            snprintf(p, left, "%sworker %s (pid %d) was killed by the OOM killer (its memory cgroup's peak %s)", sep,
                     l->name[i], (int)l->pid[i], peak);
    } else if (WIFSIGNALED(st)) {
        snprintf(p, left, "%sworker %s (pid %d) was killed by signal %d (%s)", sep, l->name[i], (int)l->pid[i],
                 WTERMSIG(st), strsignal(WTERMSIG(st)));
    } else {
        snprintf(p, left, "%sworker %s (pid %d) exited with code %d", sep, l->name[i], (int)l->pid[i],
                 WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    }
}

// --- public API

int launch_local(launch_t *l, int n, const launch_opts_t *o, char *err, size_t errlen) {
    memset(l, 0, sizeof *l);
    for (int i = 0; i < LAUNCH_MAX; i++) l->oom_kills[i] = -1;
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
    l->mem_limit = o->mem_limit;
    bool use_cg = true;
    memcg_sweep(); // groups a killed run left behind
    char budget[32];
    snprintf(budget, sizeof budget, "%llu", (unsigned long long)o->mem_budget);
    for (int i = 0; i < n; i++) {
        if (o->tcp) {
            snprintf(l->endpoint[i], sizeof l->endpoint[i], "tcp://127.0.0.1:%d", ports[i]);
        } else {
            snprintf(l->endpoint[i], sizeof l->endpoint[i], "ipc://%s/w%d", l->dir, i);
        }
        char threads[16];
        snprintf(threads, sizeof threads, "%d", o->n_threads);
        snprintf(l->name[i], sizeof l->name[i], "local-%d", i);
        const char *argv[40];
        int a = 0;
        argv[a++] = "meshlm";
        argv[a++] = "worker";
        argv[a++] = "--listen";
        argv[a++] = l->endpoint[i];
        argv[a++] = "--name";
        argv[a++] = l->name[i];
        argv[a++] = "-t";
        argv[a++] = threads;
        argv[a++] = "--no-profile"; // workers sharing one machine would measure each other
        if (o->model_path) {
            argv[a++] = "--model";
            argv[a++] = o->model_path;
            if (o->model_sha256) {
                argv[a++] = "--model-sha256";
                argv[a++] = o->model_sha256;
            }
        }
        if (o->cache_dir) {
            argv[a++] = "--cache-dir";
            argv[a++] = o->cache_dir;
        }
        if (o->mem_budget) {
            argv[a++] = "--mem-budget";
            argv[a++] = budget;
        }
        char timeout[16];
        snprintf(timeout, sizeof timeout, "%d", o->timeout_ms);
        if (o->timeout_ms > 0) {
            argv[a++] = "--timeout";
            argv[a++] = timeout;
        }
        if (o->verbose) argv[a++] = "--verbose";
        for (int x = 0; x < o->n_extra && x < 8; x++) argv[a++] = o->extra_argv[x];
        argv[a] = NULL;
        memcg_t *g = NULL;
        char e2[300];
        if (use_cg) {
            char cg_name[64];
            snprintf(cg_name, sizeof cg_name, "meshlm-%d-%d", (int)getpid(), i);
            if (memcg_new(&g, cg_name, o->mem_limit, e2, sizeof e2) != 0) {
                use_cg = false;
                snprintf(l->cg_note, sizeof l->cg_note, "no memory cgroups for the local workers (%s): they run %s", e2,
                         o->mem_limit ? "without their memory limit" : "unmeasured by a cgroup");
            }
        }
        int gate[2]; // the child waits on it until it is in its group, then execs
        if (pipe2(gate, O_CLOEXEC) != 0) {
            const int e = errno;
            memcg_destroy(&g);
            launch_reap(l, 0);
            return mlm_fail(err, errlen, MLM_EIO, "cannot start worker %d: pipe: %s", i, strerror(e));
        }
        const pid_t parent = getpid();
        pid_t pid = fork();
        if (pid < 0) {
            const int e = errno;
            close(gate[0]);
            close(gate[1]);
            memcg_destroy(&g);
            launch_reap(l, 0);
            return mlm_fail(err, errlen, MLM_EIO, "cannot start worker %d (%s): %s", i, exe, strerror(e));
        }
        if (pid == 0) { // only async-signal-safe calls until execv
            close(gate[1]);
            // A local worker belongs to this run: it ends with its coordinator, even one killed -9.
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent) _exit(127);
            char c;
            while (read(gate[0], &c, 1) < 0 && errno == EINTR) {
            }
            execv(exe, (char *const *)argv);
            _exit(127);
        }
        close(gate[0]);
        if (g && memcg_add(g, pid, e2, sizeof e2) != 0) {
            use_cg = false;
            snprintf(l->cg_note, sizeof l->cg_note, "no memory cgroups for the local workers (%s): they run %s", e2,
                     o->mem_limit ? "without their memory limit" : "unmeasured by a cgroup");
            memcg_destroy(&g);
        }
        l->cg[l->n] = g;
        l->pid[l->n++] = pid;
        close(gate[1]); // end of file: the child execs
    }
    return 0;
}

int launch_drop_cache(const char *path) {
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return MLM_EIO;
    const int rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return rc == 0 ? 0 : MLM_EIO;
}

uint64_t launch_vmhwm(pid_t pid) {
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/status", (int)pid);
    FILE *f = fopen(p, "r");
    if (!f) return 0;
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

void launch_sample(launch_t *l) {
    for (int i = 0; i < l->n; i++) {
        if (!l->exited[i] && l->pid[i] > 0) {
            const uint64_t v = launch_vmhwm(l->pid[i]);
            if (v > l->vmhwm[i]) l->vmhwm[i] = v;
        }
        sample_group(l, i);
    }
}

int launch_check(launch_t *l, int wait_ms, char *msg, size_t cap) {
    if (cap) msg[0] = 0;
    const int64_t dl = mlm_deadline(wait_ms > 0 ? wait_ms : 0);
    int dead = 0;
    for (;;) {
        dead = 0;
        for (int i = 0; i < l->n; i++) {
            if (!l->exited[i] && l->pid[i] > 0) {
                int st = 0;
                if (waitpid(l->pid[i], &st, WNOHANG) == l->pid[i]) {
                    l->exited[i] = true;
                    l->status[i] = st;
                }
            }
            dead += l->exited[i];
        }
        if (dead > 0 || mlm_passed(dl)) break;
        usleep(10000);
    }
    for (int i = 0; i < l->n; i++) {
        if (!l->exited[i]) continue;
        sample_group(l, i);
        if (cap) describe_exit(l, i, msg, cap);
    }
    return dead;
}

void launch_reap(launch_t *l, int timeout_ms) {
    const int64_t dl = mlm_deadline(timeout_ms > 0 ? timeout_ms : 0);
    for (int i = 0; i < l->n; i++) {
        if (l->pid[i] <= 0 || l->exited[i]) continue;
        int st = 0;
        for (;;) {
            pid_t r = waitpid(l->pid[i], &st, WNOHANG);
            if (r == l->pid[i] || r < 0) break;
            if (mlm_passed(dl)) {
                kill(l->pid[i], SIGKILL);
                waitpid(l->pid[i], &st, 0);
                break;
            }
            usleep(10000);
        }
        l->exited[i] = true;
        l->status[i] = st;
    }
    for (int i = 0; i < l->n; i++) { // every process has left its group: the peaks are final
        sample_group(l, i);
        memcg_destroy(&l->cg[i]);
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
        l->dir[0] = 0;
    }
}
