// CUnit suite "memcg": memory cgroups of local workers: limits that count the page cache, peaks, OOM
// kills, removal, and the launcher that puts each worker in its own group. Needs a writable memory
// cgroup controller (root); elsewhere every test says why it is skipped.
#include <CUnit/CUnit.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_util.h"
#include "cluster/launch.h"
#include "cluster/memcg.h"
#include "cluster/profile.h"
#include "core/clock.h"
#include "core/err.h"

// --- helpers

#define MIB (1ull << 20)

// Under AddressSanitizer a process's own pages grow by its shadow and quarantine: bounds on a
// process's growth get this much more room there.
#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif
#define SELF_ROOM (SANITIZED ? 24 * MIB : 8 * MIB) // stacks, allocator and (sanitized) shadow pages

// True when this process can make memory cgroups; otherwise prints why the test is skipped.
static bool have_memcg(void) {
    char err[512];
    if (memcg_probe(NULL, 0, err, sizeof err) > 0) return true;
    fprintf(stderr, "(skipped: %s) ", err);
    return false;
}

typedef void (*child_fn)(int report_fd, void *arg);

// Forks a child that waits until the parent has moved it into g, then runs fn and exits 0 (fn may
// write two uint64_t to report_fd). Returns the wait status; report (2, or NULL) gets what the child
// wrote (zeros when nothing).
static int run_in_group(memcg_t *g, child_fn fn, void *arg, uint64_t *report) {
    int gate[2], back[2];
    if (pipe(gate) != 0 || pipe(back) != 0) return -1;
    const pid_t pid = fork();
    if (pid == 0) {
        close(gate[1]);
        close(back[0]);
        char c;
        if (read(gate[0], &c, 1) != 0) _exit(3);
        fn(back[1], arg);
        _exit(0);
    }
    close(gate[0]);
    close(back[1]);
    char err[512];
    const int added = memcg_add(g, pid, err, sizeof err);
    if (added != 0) fprintf(stderr, "\n%s\n", err);
    CU_ASSERT_EQUAL(added, 0);
    close(gate[1]);
    uint64_t v[2] = {0, 0}; // what the child reported
    if (read(back[0], v, sizeof v) != (ssize_t)sizeof v) v[0] = v[1] = 0;
    close(back[0]);
    if (report) memcpy(report, v, sizeof v);
    int st = 0;
    waitpid(pid, &st, 0);
    return st;
}

// Touches *(uint64_t *)arg bytes of fresh anonymous memory.
static void touch_anon(int fd, void *arg) {
    const size_t n = (size_t)*(uint64_t *)arg;
    volatile char *p = malloc(n);
    if (!p) _exit(4);
    for (size_t i = 0; i < n; i += 4096) p[i] = (char)i;
}

// Reads the file named by arg through a 64 KiB buffer; reports its own VmHWM before and after.
static void read_file(int fd, void *arg) {
    char *buf = malloc(65536); // (64 KiB) the reader's only buffer
    uint64_t hwm[2];           // VmHWM before and after reading
    hwm[0] = launch_vmhwm(getpid());
    const int in = open((const char *)arg, O_RDONLY);
    if (in < 0 || !buf) _exit(5);
    while (read(in, buf, 65536) > 0) {
    }
    close(in);
    hwm[1] = launch_vmhwm(getpid());
    if (write(fd, hwm, sizeof hwm) != (ssize_t)sizeof hwm) _exit(6);
}

// What profile_file profiles: a file, and the budget its buffer must stay within.
typedef struct {
    const char *path;
    uint64_t budget;
} prof_arg_t;

// Profiles this machine (1 thread) with the file as its model; reports the disk figure (bytes/s)
// and how much its own VmHWM grew.
static void profile_file(int fd, void *arg) {
    const prof_arg_t *a = arg;
    uint64_t r[2]; // disk bytes/s, VmHWM growth
    const uint64_t h0 = launch_vmhwm(getpid());
    profile_t p;
    if (profile_node(&p, 1, a->path, 70, a->budget) != 0) _exit(5);
    r[0] = (uint64_t)p.disk_bw;
    r[1] = launch_vmhwm(getpid()) - h0;
    if (write(fd, r, sizeof r) != (ssize_t)sizeof r) _exit(6);
}

// A name no other run uses.
static void group_name(char *buf, size_t cap, const char *what) {
    snprintf(buf, cap, "meshlm-test-%d-%s", (int)getpid(), what);
}

static bool path_exists(const char *p) { return access(p, F_OK) == 0; }

// Writes a file of n bytes under dir, flushed to disk and dropped from the page cache. 0 or -1.
static int cold_file(const char *path, uint64_t n) {
    const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return -1;
    char *buf = calloc(1, MIB); // (1 MiB) one chunk of the file
    int rc = buf ? 0 : -1;
    for (uint64_t off = 0; rc == 0 && off < n; off += MIB) {
        memset(buf, (int)(off / MIB) + 1, MIB);
        if (write(fd, buf, MIB) != (ssize_t)MIB) rc = -1;
    }
    free(buf);
    if (rc == 0 && fsync(fd) != 0) rc = -1;
    if (rc == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) rc = -1;
    close(fd);
    return rc;
}

// --- tests

// A group made with a limit holds it, measures what its process touches, and disappears on destroy.
static void test_limit_peak_destroy(void) {
    if (!have_memcg()) return;
    char base[600], name[64], err[512];
    const int version = memcg_probe(base, sizeof base, err, sizeof err);
    group_name(name, sizeof name, "limit");
    memcg_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(memcg_new(&g, name, 64 * MIB, err, sizeof err), 0);
    CU_ASSERT_EQUAL(memcg_version(g), version);
    char want[700];
    snprintf(want, sizeof want, "%s/%s", base, name);
    CU_ASSERT_STRING_EQUAL(memcg_path(g), want);
    CU_ASSERT(path_exists(want));
    CU_ASSERT_EQUAL(memcg_limit(g), 64 * MIB);
    uint64_t n = 16 * MIB;
    const int st = run_in_group(g, touch_anon, &n, NULL);
    CU_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    const uint64_t peak = memcg_peak(g);
    if (peak < 16 * MIB || peak > 64 * MIB) fprintf(stderr, "\npeak %llu\n", (unsigned long long)peak);
    CU_ASSERT(peak >= 16 * MIB);
    CU_ASSERT(peak <= 64 * MIB);
    CU_ASSERT(memcg_usage(g) < 16 * MIB); // the process is gone, its memory with it
    CU_ASSERT_EQUAL(memcg_oom_kills(g), 0);
    memcg_destroy(&g);
    CU_ASSERT_PTR_NULL(g);
    CU_ASSERT(!path_exists(want));
    memcg_destroy(&g); // idempotent
    memcg_destroy(NULL);
}

// A process that needs more than its group's limit is killed by the OOM killer, and the group says so.
static void test_oom_kill(void) {
    if (!have_memcg()) return;
    char name[64], err[512];
    group_name(name, sizeof name, "oom");
    memcg_t *g = NULL;
    CU_ASSERT_EQUAL_FATAL(memcg_new(&g, name, 8 * MIB, err, sizeof err), 0);
    uint64_t n = 64 * MIB;
    const int st = run_in_group(g, touch_anon, &n, NULL);
    CU_ASSERT(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    CU_ASSERT(memcg_oom_kills(g) >= 1);
    CU_ASSERT(memcg_peak(g) <= 8 * MIB);
    CU_ASSERT(memcg_peak(g) >= 4 * MIB);
    memcg_destroy(&g);
}

// The page cache counts: a file read through a small buffer makes an unlimited group's peak grow by
// the file's size while the reader's resident set stays small; a group limited below the file's
// size reads it all the same (its clean cache is reclaimed), and its peak stays under the limit.
static void test_page_cache_counts(void) {
    if (!have_memcg()) return;
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    struct statfs fs;
    if (statfs(dir, &fs) == 0 && fs.f_type == TMPFS_MAGIC) {
        fprintf(stderr, "(skipped: %s is tmpfs, its pages cannot be dropped) ", dir);
        test_rm_dir(dir);
        return;
    }
    char path[600], name[64], err[512];
    snprintf(path, sizeof path, "%s/cold.bin", dir);
    const uint64_t size = 32 * MIB;
    for (int limited = 0; limited < 2; limited++) {
        CU_ASSERT_EQUAL_FATAL(cold_file(path, size), 0);
        group_name(name, sizeof name, limited ? "cache-limited" : "cache");
        memcg_t *g = NULL;
        const uint64_t limit = limited ? 12 * MIB : 0;
        CU_ASSERT_EQUAL_FATAL(memcg_new(&g, name, limit, err, sizeof err), 0);
        CU_ASSERT_EQUAL(memcg_limit(g), limit);
        uint64_t hwm[2]; // the reader's VmHWM before and after
        const int st = run_in_group(g, read_file, path, hwm);
        CU_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        const uint64_t peak = memcg_peak(g);
        if (limited) {
            CU_ASSERT(peak <= limit);
            CU_ASSERT(peak >= limit / 2); // the cache filled the group up to its limit
        } else {
            CU_ASSERT(peak >= size);
        }
        CU_ASSERT(hwm[0] > 0 && hwm[1] < hwm[0] + 4 * MIB); // the reader itself did not grow
        CU_ASSERT_EQUAL(memcg_oom_kills(g), 0);
        if (!limited && peak < size)
            fprintf(stderr, "\npeak %llu hwm %llu -> %llu\n", (unsigned long long)peak, (unsigned long long)hwm[0],
                    (unsigned long long)hwm[1]);
        memcg_destroy(&g);
    }
    unlink(path);
    test_rm_dir(dir);
}

// Bad names are refused before the hierarchy is looked at (so this runs everywhere).
static void test_bad_names(void) {
    char err[512];
    memcg_t *g = NULL;
    CU_ASSERT_EQUAL(memcg_new(&g, "a/b", 0, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "bad cgroup name 'a/b'"));
    CU_ASSERT_EQUAL(memcg_new(&g, "..", 0, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(memcg_new(&g, ".", 0, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(memcg_new(&g, "", 0, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(memcg_new(&g, NULL, 0, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_PTR_NULL(g);
}

// Groups of runs that are gone are swept, those of living processes are not.
static void test_sweep(void) {
    if (!have_memcg()) return;
    char err[512];

    const pid_t dead = fork(); // a pid that is gone once reaped
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    char stale[64], alive[64];
    snprintf(stale, sizeof stale, "meshlm-%d-0", (int)dead);
    snprintf(alive, sizeof alive, "meshlm-%d-9", (int)getpid());
    memcg_t *gs = NULL, *ga = NULL;
    CU_ASSERT_EQUAL_FATAL(memcg_new(&gs, stale, MIB, err, sizeof err), 0);
    CU_ASSERT_EQUAL_FATAL(memcg_new(&ga, alive, MIB, err, sizeof err), 0);
    char ps[700], pa[700];
    snprintf(ps, sizeof ps, "%s", memcg_path(gs));
    snprintf(pa, sizeof pa, "%s", memcg_path(ga));
    CU_ASSERT(memcg_sweep() >= 1);
    CU_ASSERT(!path_exists(ps));
    CU_ASSERT(path_exists(pa));
    memcg_destroy(&gs); // already gone: harmless
    memcg_destroy(&ga);
    CU_ASSERT(!path_exists(pa));
}

// launch_local puts each worker in its own group before it runs: /proc/PID/cgroup names it, the
// limit is set, VmHWM is read while they run; a worker that dies is named with its signal;
// launch_reap removes the groups.
static void test_launch_groups(void) {
    if (!have_memcg()) return;
    const char *bin = test_meshlm_bin();
    if (!bin) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return;
    }
    char model[1024];
    test_shared_path(model, sizeof model, "models/stories260K.gguf");
    launch_t *l = calloc(1, sizeof *l);
    CU_ASSERT_PTR_NOT_NULL_FATAL(l);
    launch_opts_t lo = {.exe = bin, .model_path = model, .n_threads = 1, .mem_limit = 256 * MIB,
                        .mem_budget = 128 * MIB};
    char err[1024];
    CU_ASSERT_EQUAL_FATAL(launch_local(l, 2, &lo, err, sizeof err), 0);
    CU_ASSERT_STRING_EQUAL(l->cg_note, "");
    char paths[2][700];
    for (int i = 0; i < 2; i++) {
        CU_ASSERT_PTR_NOT_NULL_FATAL(l->cg[i]);
        snprintf(paths[i], sizeof paths[i], "%s", memcg_path(l->cg[i]));
        CU_ASSERT_EQUAL(memcg_limit(l->cg[i]), 256 * MIB);
        char want[64], p[64];
        snprintf(want, sizeof want, "/meshlm-%d-%d\n", (int)getpid(), i);
        snprintf(p, sizeof p, "/proc/%d/cgroup", (int)l->pid[i]);
        char cg[4096] = ""; // /proc/PID/cgroup: one line per hierarchy
        FILE *f = fopen(p, "r");
        CU_ASSERT_PTR_NOT_NULL(f);
        if (f) {
            const size_t got = fread(cg, 1, sizeof cg - 1, f);
            cg[got] = 0;
            fclose(f);
        }
        CU_ASSERT_PTR_NOT_NULL(strstr(cg, want));
    }
    const int64_t dl = mlm_deadline(5000); // the workers exec and start up
    do {
        usleep(20000);
        launch_sample(l);
    } while ((l->vmhwm[0] == 0 || l->vmhwm[1] == 0 || l->cg_peak[1] == 0) && !mlm_passed(dl));
    for (int i = 0; i < 2; i++) {
        CU_ASSERT(l->vmhwm[i] > MIB);
        CU_ASSERT(l->cg_peak[i] > 0 && l->cg_peak[i] <= 256 * MIB);
    }
    char why[1024];
    CU_ASSERT_EQUAL(launch_check(l, 0, why, sizeof why), 0);
    CU_ASSERT_STRING_EQUAL(why, "");
    kill(l->pid[1], SIGKILL);
    CU_ASSERT_EQUAL(launch_check(l, 2000, why, sizeof why), 1);
    char want[128];
    snprintf(want, sizeof want, "worker local-1 (pid %d) was killed by signal %d", (int)l->pid[1], SIGKILL);
    if (!strstr(why, want)) fprintf(stderr, "\n%s\n", why);
    CU_ASSERT_PTR_NOT_NULL(strstr(why, want));
    kill(l->pid[0], SIGTERM);
    launch_reap(l, 3000);
    for (int i = 0; i < 2; i++) {
        CU_ASSERT_PTR_NULL(l->cg[i]);
        CU_ASSERT(!path_exists(paths[i]));
    }
    free(l);
}

// Where cgroups cannot be made (here: as an unprivileged user), launch_local says why in cg_note,
// with the limit it cannot apply, and starts the workers all the same. The check runs in a child
// that drops root (exit code: 0 ok, 10+ which check failed; the note comes back through a pipe).
static int launch_without_cgroups(int note_fd, const char *bin, const char *model) {
    char err[1024];
    if (memcg_probe(NULL, 0, err, sizeof err) > 0) return 10; // cgroups still writable
    launch_t *l = calloc(1, sizeof *l);
    launch_opts_t lo = {.exe = bin, .model_path = model, .n_threads = 1, .mem_limit = 64 * MIB};
    if (!l || launch_local(l, 2, &lo, err, sizeof err) != 0) return 11;
    int rc = 0;
    if (write(note_fd, l->cg_note, strlen(l->cg_note)) != (ssize_t)strlen(l->cg_note)) rc = 12;
    if (l->cg[0] || l->cg[1]) rc = 13;
    const int64_t dl = mlm_deadline(5000);
    do {
        usleep(20000);
        launch_sample(l);
    } while ((l->vmhwm[0] == 0 || l->vmhwm[1] == 0) && !mlm_passed(dl));
    if (rc == 0 && (l->vmhwm[0] == 0 || l->vmhwm[1] == 0)) rc = 14; // the workers run
    char why[512];
    if (rc == 0 && launch_check(l, 0, why, sizeof why) != 0) rc = 15;
    kill(l->pid[0], SIGKILL);
    kill(l->pid[1], SIGKILL);
    launch_reap(l, 2000);
    free(l);
    return rc;
}

static void test_launch_without_cgroups(void) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return;
    }
    char model[1024], err[512];
    test_shared_path(model, sizeof model, "models/stories260K.gguf");
    const bool root = geteuid() == 0;
    if (!root && memcg_probe(NULL, 0, err, sizeof err) > 0) {
        fprintf(stderr, "(skipped: memory cgroups are writable without root here) ");
        return;
    }
    int note[2];
    CU_ASSERT_EQUAL_FATAL(pipe(note), 0);
    const pid_t pid = fork();
    if (pid == 0) {
        close(note[0]);
        if (root && (setgroups(0, NULL) != 0 || setresgid(65534, 65534, 65534) != 0 ||
                     setresuid(65534, 65534, 65534) != 0))
            _exit(20);
        setenv("TMPDIR", "/tmp", 1); // the run directory, where nobody may write
        _exit(launch_without_cgroups(note[1], bin, model));
    }
    close(note[1]);
    char text[512] = "";
    size_t got = 0;
    ssize_t r;
    while (got < sizeof text - 1 && (r = read(note[0], text + got, sizeof text - 1 - got)) > 0) got += (size_t)r;
    text[got] = 0;
    close(note[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fprintf(stderr, "\nchild status %d, note '%s'\n", st, text);
    CU_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CU_ASSERT(!strncmp(text, "no memory cgroups for the local workers (", 41));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "not writable"));
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "): they run without their memory limit"));
}

// The machine profile measures the disk, not the page cache: reading 64 MiB of a cold file charges
// its group no page cache (O_DIRECT; a buffered read would charge all of it), and under a budget its
// buffer is at most half of it (the process grows by that and the kernels' 8 MiB test matrix);
// without one the buffer is profile_stream_bytes() (twice the last-level cache, 64-256 MiB).
static void test_profile_reads_disk(void) {
    if (!have_memcg()) return;
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    struct statfs fs;
    if (statfs(dir, &fs) == 0 && fs.f_type == TMPFS_MAGIC) {
        fprintf(stderr, "(skipped: %s is tmpfs, it has no disk) ", dir);
        test_rm_dir(dir);
        return;
    }
    char path[600], name[64], err[512];
    snprintf(path, sizeof path, "%s/model.bin", dir);
    const uint64_t size = 96 * MIB;
    const uint64_t budgets[] = {16 * MIB, 0};
    for (int i = 0; i < 2; i++) {
        CU_ASSERT_EQUAL_FATAL(cold_file(path, size), 0);
        group_name(name, sizeof name, budgets[i] ? "profile-budget" : "profile");
        memcg_t *g = NULL;
        CU_ASSERT_EQUAL_FATAL(memcg_new(&g, name, 0, err, sizeof err), 0);
        prof_arg_t a = {path, budgets[i]};
        uint64_t r[2]; // disk bytes/s, VmHWM growth
        const int st = run_in_group(g, profile_file, &a, r);
        CU_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        const uint64_t peak = memcg_peak(g);
        CU_ASSERT(r[0] > 0);
        if (budgets[i]) {
            CU_ASSERT(r[1] <= budgets[i] / 2 + 8 * MIB + SELF_ROOM); // its buffer, the test matrix, the rest
            CU_ASSERT(peak < 48 * MIB); // no 64 MiB of page cache (nor anything near it)
        } else {
            const uint64_t full = profile_stream_bytes(); // twice the last-level cache, 64-256 MiB
            CU_ASSERT(full >= 64 * MIB && full <= 256 * MIB);
            CU_ASSERT(r[1] >= full); // the full buffer: the bound above means something
            CU_ASSERT(peak < full + 8 * MIB + 2 * SELF_ROOM); // its buffer, no 64 MiB of page cache besides
        }
        fprintf(stderr, "\n  budget %llu MiB: disk %.0f MB/s, VmHWM +%.1f MiB, group peak %.1f MiB ",
                (unsigned long long)(budgets[i] / MIB), (double)r[0] / 1e6, (double)r[1] / MIB, (double)peak / MIB);
        memcg_destroy(&g);
    }
    // A file that cannot be read gives no disk figure (and no error: the rest is measured).
    snprintf(path, sizeof path, "%s/missing.bin", dir);
    profile_t p;
    CU_ASSERT_EQUAL(profile_node(&p, 1, path, 20, 0), 0);
    CU_ASSERT_EQUAL(p.disk_bw, 0);
    CU_ASSERT(p.n_types > 0 && p.mem_bw > 0);
    snprintf(path, sizeof path, "%s/model.bin", dir);
    unlink(path);
    test_rm_dir(dir);
}

// --- suite

int test_memcg_suite(void) {
    CU_pSuite s = CU_add_suite("memcg", NULL, NULL);
    if (!s) return -1;
    const struct {
        const char *name;
        CU_TestFunc fn;
        bool needs_cgroups;  // inactive (not passed) where this process cannot make memory cgroups
    } tests[] = {
        {"a group holds its limit, measures its peak and is removed", test_limit_peak_destroy, true},
        {"over the limit: the OOM killer, counted", test_oom_kill, true},
        {"the page cache counts against the limit", test_page_cache_counts, true},
        {"bad names are refused", test_bad_names, false},
        {"groups of gone runs are swept", test_sweep, true},
        {"launch_local: one group per worker, removed at reap", test_launch_groups, true},
        {"launch_local without cgroups: says so, runs", test_launch_without_cgroups, false},
        {"the machine profile reads the disk, its buffer within the budget", test_profile_reads_disk, true},
    };
    char why[512];
    const bool have = memcg_probe(NULL, 0, why, sizeof why) > 0;
    int inactive = 0;
    for (size_t i = 0; i < sizeof tests / sizeof *tests; i++) {
        CU_pTest t = CU_add_test(s, tests[i].name, tests[i].fn);
        if (!t) return -1;
        if (tests[i].needs_cgroups && !have) {
            if (CU_set_test_active(t, CU_FALSE) != CUE_SUCCESS) return -1;
            inactive++;
        }
    }
    if (inactive) { // shown as Inactive in the run summary, neither passed nor failed
        fprintf(stderr, "memcg: %d test(s) inactive: %s\n", inactive, why);
        CU_set_fail_on_inactive(CU_FALSE);
    }
    return 0;
}
