// Memory cgroups (v1 memory controller or v2 memory.max) for local worker processes.
#include "cluster/memcg.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/err.h"

// --- types

#define MEMCG_PATH_MAX 512
#define MEMCG_NO_LIMIT (1ull << 62) // v1 shows "no limit" as a huge number (PAGE_COUNTER_MAX pages)

struct memcg {
    char path[MEMCG_PATH_MAX]; // the group's directory
    int version;               // 1: v1 memory controller, 2: unified hierarchy
};

// --- helpers

// Reads the first line of dir/file into buf (newline removed). 0 or -1 (errno set).
static int read_line(const char *dir, const char *file, char *buf, size_t cap) {
    char p[MEMCG_PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    FILE *f = fopen(p, "r");
    if (!f) return -1;
    const bool ok = fgets(buf, (int)cap, f) != NULL;
    fclose(f);
    if (!ok) {
        errno = EIO;
        return -1;
    }
    buf[strcspn(buf, "\n")] = 0;
    return 0;
}

// A byte count from dir/file: "max" and v1's "unlimited" number are 0. 0 when unreadable.
static uint64_t read_bytes(const char *dir, const char *file) {
    char line[64];
    if (read_line(dir, file, line, sizeof line) != 0 || !strcmp(line, "max")) return 0;
    const unsigned long long v = strtoull(line, NULL, 10);
    return v >= MEMCG_NO_LIMIT ? 0 : (uint64_t)v;
}

// The value of "key N" in a flat keyed file (memory.oom_control, memory.events); -1 when absent.
static long long read_key(const char *dir, const char *file, const char *key) {
    char p[MEMCG_PATH_MAX + 64], line[128];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    FILE *f = fopen(p, "r");
    if (!f) return -1;
    long long v = -1;
    const size_t kl = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ' ') {
            v = strtoll(line + kl + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

// Writes s to dir/file. 0 or -1 (errno set).
static int write_str(const char *dir, const char *file, const char *s) {
    char p[MEMCG_PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    const int fd = open(p, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    const ssize_t n = write(fd, s, strlen(s));
    const int e = errno;
    close(fd);
    if (n != (ssize_t)strlen(s)) {
        errno = n < 0 ? e : EIO;
        return -1;
    }
    return 0;
}

static bool exists(const char *dir, const char *file) {
    char p[MEMCG_PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    return access(p, F_OK) == 0;
}

// Whether the space- or comma-separated list s holds word.
static bool has_word(const char *s, const char *word) {
    const size_t n = strlen(word);
    for (const char *p = s; (p = strstr(p, word)) != NULL; p += n) {
        const bool start = p == s || p[-1] == ' ' || p[-1] == ',';
        const bool end = p[n] == 0 || p[n] == ' ' || p[n] == ',' || p[n] == '\n';
        if (start && end) return true;
    }
    return false;
}

// This process's group in a hierarchy: the path field of /proc/self/cgroup's line for the v1 memory
// controller (v2: the "0::" line). 0 or -1.
static int own_group(int version, char *path, size_t cap) {
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return -1;
    char line[1024];
    int rc = -1;
    while (rc != 0 && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2) continue;
        *c2 = 0;
        const bool mine = version == 2 ? !strncmp(line, "0:", 2) && c1[1] == 0 : has_word(c1 + 1, "memory");
        if (mine && strlen(c2 + 1) < cap) {
            snprintf(path, cap, "%s", c2 + 1);
            rc = 0;
        }
    }
    fclose(f);
    return rc;
}

// The mount of the v1 memory hierarchy (version 1) or of the v2 hierarchy (version 2) from
// /proc/self/mountinfo: its mount point and the group it shows as its root. 0 or -1.
static int find_mount(int version, char *point, size_t pcap, char *root, size_t rcap) {
    FILE *f = fopen("/proc/self/mountinfo", "r");
    if (!f) return -1;
    char line[2048];
    int rc = -1;
    while (rc != 0 && fgets(line, sizeof line, f)) {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        char *sep = strstr(line, " - ");
        if (!sep) continue;
        *sep = 0;
        char fstype[32] = "", source[256] = "", super[512] = "", r[512] = "", mp[512] = "";
        if (sscanf(sep + 3, "%31s %255s %511s", fstype, source, super) < 2) continue;
        if (sscanf(line, "%*s %*s %*s %511s %511s", r, mp) != 2) continue;
        const bool want = version == 1 ? !strcmp(fstype, "cgroup") && has_word(super, "memory")
                                       : !strcmp(fstype, "cgroup2");
        if (want && strlen(mp) < pcap && strlen(r) < rcap) {
            snprintf(point, pcap, "%s", mp);
            snprintf(root, rcap, "%s", r);
            rc = 0;
        }
    }
    fclose(f);
    return rc;
}

// The directory of this process's own group under a mount: mount point + (own path - mount root).
// A group outside what the mount shows falls back to the mount point.
static void join_group(char *dir, size_t cap, const char *point, const char *root, const char *own) {
    const size_t rl = strlen(root);
    const char *rel = own;
    if (strcmp(root, "/") != 0) {
        if (!strncmp(own, root, rl) && (own[rl] == 0 || own[rl] == '/')) rel = own + rl;
        else rel = "";
    }
    if (!strcmp(rel, "/")) rel = "";
    if (snprintf(dir, cap, "%s%s", point, rel) >= (int)cap) snprintf(dir, cap, "%s", point);
}

// --- public API

int memcg_probe(char *base, size_t cap, char *err, size_t errlen) {
    char point[512], root[512], own[512], dir[MEMCG_PATH_MAX];
    int version = 0;
    if (find_mount(1, point, sizeof point, root, sizeof root) == 0) {
        version = 1;
    } else if (find_mount(2, point, sizeof point, root, sizeof root) == 0) {
        char ctl[512];
        if (read_line(point, "cgroup.controllers", ctl, sizeof ctl) != 0 || !has_word(ctl, "memory"))
            return mlm_fail(err, errlen, MLM_EUNSUPPORTED,
                            "no memory cgroup controller (v1 not mounted, v2 at %s has no memory controller)", point);
        version = 2;
    } else {
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "no memory cgroup controller is mounted");
    }
    if (own_group(version, own, sizeof own) != 0) snprintf(own, sizeof own, "/");
    join_group(dir, sizeof dir, point, root, own);
    if (access(dir, W_OK) != 0)
        return mlm_fail(err, errlen, MLM_EIO, "memory cgroup %s is not writable: %s", dir, strerror(errno));
    if (version == 2) { // child groups only get memory.max when the parent hands the controller down
        char sub[512] = "";
        if (read_line(dir, "cgroup.subtree_control", sub, sizeof sub) != 0 || !has_word(sub, "memory")) {
            if (write_str(dir, "cgroup.subtree_control", "+memory") != 0)
                return mlm_fail(err, errlen, MLM_EIO, "%s: cannot enable the memory controller for child groups: %s",
                                dir, strerror(errno));
        }
    }
    if (base) {
        if (strlen(dir) >= cap) return mlm_fail(err, errlen, MLM_EINVAL, "cgroup path too long: %s", dir);
        snprintf(base, cap, "%s", dir);
    }
    return version;
}

int memcg_new(memcg_t **out, const char *name, uint64_t limit, char *err, size_t errlen) {
    *out = NULL;
    if (!name || !*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
        return mlm_fail(err, errlen, MLM_EINVAL, "bad cgroup name '%s'", name ? name : "");
    char base[MEMCG_PATH_MAX];
    const int version = memcg_probe(base, sizeof base, err, errlen);
    if (version < 0) return version;
    memcg_t *g = calloc(1, sizeof *g);
    if (!g) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    g->version = version;
    if (snprintf(g->path, sizeof g->path, "%s/%s", base, name) >= (int)sizeof g->path) {
        free(g);
        return mlm_fail(err, errlen, MLM_EINVAL, "cgroup path too long: %s/%s", base, name);
    }
    if (mkdir(g->path, 0755) != 0 && !(errno == EEXIST && rmdir(g->path) == 0 && mkdir(g->path, 0755) == 0)) {
        const int e = errno;
        free(g);
        return mlm_fail(err, errlen, MLM_EIO, "cannot create memory cgroup %s/%s: %s", base, name, strerror(e));
    }
    if (limit > 0) {
        char v[32];
        snprintf(v, sizeof v, "%llu", (unsigned long long)limit);
        // v1: memory first (memsw may never be below it), then memory+swap; v2: memory, then no swap
        const char *mem = version == 1 ? "memory.limit_in_bytes" : "memory.max";
        const char *swap = version == 1 ? "memory.memsw.limit_in_bytes" : "memory.swap.max";
        int rc = write_str(g->path, mem, v);
        const char *bad = mem;
        if (rc == 0 && exists(g->path, swap)) {
            rc = write_str(g->path, swap, version == 1 ? v : "0");
            bad = swap;
        }
        if (rc != 0) {
            const int e = errno;
            rmdir(g->path);
            mlm_fail(err, errlen, MLM_EIO, "%s/%s: cannot set the limit to %s bytes: %s", g->path, bad, v, strerror(e));
            free(g);
            return MLM_EIO;
        }
    }
    *out = g;
    return 0;
}

int memcg_add(memcg_t *g, pid_t pid, char *err, size_t errlen) {
    char v[32];
    snprintf(v, sizeof v, "%d", (int)pid);
    if (write_str(g->path, "cgroup.procs", v) != 0)
        return mlm_fail(err, errlen, MLM_EIO, "cannot move process %d into %s: %s", (int)pid, g->path, strerror(errno));
    return 0;
}

uint64_t memcg_peak(const memcg_t *g) {
    return read_bytes(g->path, g->version == 1 ? "memory.max_usage_in_bytes" : "memory.peak");
}

uint64_t memcg_usage(const memcg_t *g) {
    return read_bytes(g->path, g->version == 1 ? "memory.usage_in_bytes" : "memory.current");
}

uint64_t memcg_limit(const memcg_t *g) {
    return read_bytes(g->path, g->version == 1 ? "memory.limit_in_bytes" : "memory.max");
}

int memcg_oom_kills(const memcg_t *g) {
    const long long v = read_key(g->path, g->version == 1 ? "memory.oom_control" : "memory.events", "oom_kill");
    return v < 0 ? -1 : (int)v;
}

const char *memcg_path(const memcg_t *g) { return g->path; }

int memcg_version(const memcg_t *g) { return g->version; }

void memcg_destroy(memcg_t **self_p) {
    if (!self_p || !*self_p) return;
    memcg_t *g = *self_p;
    const int64_t dl = mlm_deadline(2000);
    while (rmdir(g->path) != 0 && errno == EBUSY && !mlm_passed(dl)) usleep(10000);
    free(g);
    *self_p = NULL;
}

int memcg_sweep(void) {
    char base[MEMCG_PATH_MAX], err[256];
    if (memcg_probe(base, sizeof base, err, sizeof err) < 0) return 0;
    DIR *d = opendir(base);
    if (!d) return 0;
    int removed = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int pid = 0, idx = 0, end = 0;
        if (sscanf(e->d_name, "meshlm-%d-%d%n", &pid, &idx, &end) != 2 || e->d_name[end] != 0 || pid <= 0) continue;
        if (pid == (int)getpid() || kill(pid, 0) == 0 || errno != ESRCH) continue;
        char p[MEMCG_PATH_MAX + 300];
        snprintf(p, sizeof p, "%s/%s", base, e->d_name);
        if (rmdir(p) == 0) removed++; // a group that still holds processes stays (EBUSY)
    }
    closedir(d);
    return removed;
}
