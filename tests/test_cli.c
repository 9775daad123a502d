// CUnit suite "cli": the meshlm program as a user meets it: refusals end with a newline, file errors name
// the path and the system's reason, a plan that leaves a worker out says so, tests/demo.sh runs a cluster,
// and run/bench report every process's peak memory (local workers in memory cgroups).
#include <CUnit/CUnit.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test_util.h"
#include "cluster/launch.h"
#include "cluster/memcg.h"
#include "core/clock.h"

// --- helpers

#define RUN_TIMEOUT_MS 120000

typedef struct {
    int status;              // exit code, or 128 + signal
    char *out;               // stdout, NUL-terminated (owned)
    char *err;               // stderr, NUL-terminated (owned)
    double ms;               // wall time
} run_t;

static void run_free(run_t *r) {
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}

// Runs exe with args (NULL-terminated, args[0] is the program name) and faults as $MESHLM_FAULTS
// (NULL: unset), capturing stdout and stderr. 0, or -1 when it could not be run or did not end in time.
static int run_prog(run_t *r, const char *exe, const char *const *args, const char *faults) {
    memset(r, 0, sizeof *r);
    char *dir = test_tmpdir();
    if (!dir) return -1;
    char out_path[512], err_path[512];
    snprintf(out_path, sizeof out_path, "%s/out", dir);
    snprintf(err_path, sizeof err_path, "%s/err", dir);
    const double t0 = mlm_now_ms();
    pid_t pid = fork();
    if (pid == 0) {
        int fo = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        if (faults) setenv("MESHLM_FAULTS", faults, 1);
        else unsetenv("MESHLM_FAULTS");
        execv(exe, (char *const *)args);
        _exit(127);
    }
    int rc = pid > 0 ? 0 : -1, st = 0;
    const int64_t dl = mlm_deadline(RUN_TIMEOUT_MS);
    while (pid > 0) {
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) break;
        if (w < 0 || mlm_passed(dl)) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            rc = -1;
            break;
        }
        usleep(5000);
    }
    r->ms = mlm_now_ms() - t0;
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    size_t len = 0;
    r->out = test_read_file(out_path, &len);
    r->err = test_read_file(err_path, &len);
    if (!r->out || !r->err) rc = -1;
    test_rm_dir(dir);
    return rc;
}

// Runs the meshlm under test; false (test skipped with a note) when $MESHLM_BIN is not set.
static bool run_meshlm(run_t *r, const char *const *args, const char *faults) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        fprintf(stderr, "(skipped: MESHLM_BIN not set) ");
        return false;
    }
    int rc = run_prog(r, bin, args, faults);
    CU_ASSERT_EQUAL(rc, 0);
    return rc == 0;
}

static int count_char(const char *s, char c) {
    int n = 0;
    for (; *s; s++) n += *s == c;
    return n;
}

static bool have_model(char *path, size_t cap) {
    test_shared_path(path, cap, "models/stories260K.gguf");
    if (access(path, R_OK) == 0) return true;
    fprintf(stderr, "(skipped: %s missing) ", path);
    return false;
}

// --- tests

// Every refusal of `meshlm plan` is one line on stderr that ends with a newline; file errors name
// the file and the system's reason.
static void test_plan_refusals(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char missing[600], out_missing[600];
    snprintf(missing, sizeof missing, "%s/missing.txt", dir);
    snprintf(out_missing, sizeof out_missing, "%s/no/dir/out.plan", dir);
    const char *const cases[][12] = {
        {"meshlm", "plan", "--preset", "llama-2-70b", "--nodes", "1:1G", NULL},          // does not fit
        {"meshlm", "plan", "--preset", "llama-2-70b", "--nodes", "1:512M,1:512M", "--explain", NULL}, // even streaming
        {"meshlm", "plan", "--preset", "tiny", "--nodes", "3", "--tp", "2", "--keep-all", NULL},
        {"meshlm", "plan", "--preset", "tiny", "--nodes", "2", "--pp", "3", NULL},
        {"meshlm", "plan", "--preset", "no-such-model", "--nodes", "2", NULL},
        {"meshlm", "plan", "--preset", "tiny", "--quant", "Q9_9", "--nodes", "2", NULL},
        {"meshlm", "plan", "--preset", "tiny", "--nodes", "2,x", NULL},
        {"meshlm", "plan", "--preset", "tiny", "--nodes", "0", "--json", NULL},
        {"meshlm", "plan", "--preset", "tiny", "--nodes-file", missing, NULL},
        {"meshlm", "plan", "--preset", "tiny", "--nodes", "2", "--plan", missing, NULL},
        {"meshlm", "plan", "--preset", "tiny", "--nodes", "2", "--out", out_missing, NULL},
        {"meshlm", "plan", "-m", missing, "--nodes", "2", NULL},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        run_t r;
        if (!run_meshlm(&r, cases[k], NULL)) break;
        const size_t n = strlen(r.err);
        const bool ok = r.status != 0 && r.out[0] == 0 && !strncmp(r.err, "meshlm plan: ", 13) && n > 14 &&
                        r.err[n - 1] == '\n' && count_char(r.err, '\n') == 1;
        if (!ok) fprintf(stderr, "\ncase %zu: exit %d, stdout '%s', stderr '%s'\n", k, r.status, r.out, r.err);
        CU_ASSERT(ok);
        const char *path = k >= 8 && k <= 9 ? missing : k == 10 ? out_missing : k == 11 ? missing : NULL;
        if (path) {
            CU_ASSERT_PTR_NOT_NULL(strstr(r.err, path));
            CU_ASSERT_PTR_NOT_NULL(strstr(r.err, strerror(ENOENT)));
        }
        run_free(&r);
    }
    test_rm_dir(dir);
}

// The example: llama-2-70b Q4_0 on four 2 GiB nodes, which does not fit, gets a plan and a
// prediction from `meshlm plan` (each node streams its quarter from disk), and --explain gives each
// node's window, streamed MB per token and disk time; the prediction is at least that disk time.
static void test_plan_70b_on_2g_nodes(void) {
    const char *const args[] = {"meshlm", "plan", "--preset", "llama-2-70b", "--quant", "Q4_0", "--nodes",
                                "1:2G,1:2G,1:2G,1:2G", NULL, NULL};
    run_t r;
    if (!run_meshlm(&r, args, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "plan tp4: 4 node(s) in 1 stage(s); 80 layers"));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "4 of 4 node(s) stream weights from disk"));
    const char *pr = strstr(r.out, "\npredicted ");
    double ms = 0;
    CU_ASSERT(pr && sscanf(pr, "\npredicted %lf ms/token", &ms) == 1);
    if (!pr) fprintf(stderr, "\nplan output:\n%s\n", r.out);
    run_free(&r);
    const char *const explain[] = {"meshlm", "plan", "--preset", "llama-2-70b", "--quant", "Q4_0", "--nodes",
                                   "1:2G,1:2G,1:2G,1:2G", "--explain", NULL};
    if (!run_meshlm(&r, explain, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    // per node: "| 0    | node-0       |   1.69 GiB | 2 (12/81 units)  |      8223.4 |       950 |   9617.97 |"
    const char *row = strstr(r.out, "| 0    | node-0       |");
    double res = 0, mb = 0, mbs = 0, disk = 0;
    int win = 0, kept = 0, units = 0;
    CU_ASSERT(row && sscanf(row, "| 0 | node-0 | %lf GiB | %d (%d/%d units) | %lf | %lf | %lf |", &res, &win, &kept,
                            &units, &mb, &mbs, &disk) == 7);
    CU_ASSERT(res > 1.0 && res < 2.0);               // pinned units and KV cache within the 2 GiB
    CU_ASSERT(win == 2 && kept > 0 && kept < units); // streams the rest through 2 buffers
    CU_ASSERT(units == 81);                          // 80 blocks and the output rows
    CU_ASSERT(mb > 7000 && mb < 9500);               // most of a quarter of 36 GiB, every token
    CU_ASSERT(disk > 0 && ms >= disk && ms < 2 * disk);
    if (!(ms >= disk && disk > 0)) fprintf(stderr, "\nplan output:\n%s\n", r.out);
    run_free(&r);
}

// run, gen-model: a file that cannot be read or written is named, with the system's reason.
static void test_file_errors_name_path(void) {
    char model[1024];
    if (!have_model(model, sizeof model)) return;
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    char missing[600], logits[600], gen_out[600];
    snprintf(missing, sizeof missing, "%s/missing.gguf", dir);
    snprintf(logits, sizeof logits, "%s/no/dir/logits.bin", dir);
    snprintf(gen_out, sizeof gen_out, "%s/no/dir/model.gguf", dir);
    const struct {
        const char *args[12];
        const char *path;    // what the message names
    } cases[] = {
        {{"meshlm", "run", "-m", missing, "-p", "hi", "-n", "1", NULL}, missing},
        {{"meshlm", "run", "-m", model, "-f", missing, "-n", "1", NULL}, missing},
        {{"meshlm", "run", "-m", model, "-p", "hi", "-n", "1", "--logits", logits, NULL}, logits},
        {{"meshlm", "gen-model", gen_out, "--preset", "tiny", "--quant", "Q8_0", NULL}, gen_out},
        {{"meshlm", "inspect", missing, NULL}, missing},
        {{"meshlm", "bench", "-m", missing, "-p", "1", "-n", "1", "-r", "1", NULL}, missing},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        run_t r;
        if (!run_meshlm(&r, cases[k].args, NULL)) break;
        const bool ok = r.status != 0 && strstr(r.err, cases[k].path) && strstr(r.err, strerror(ENOENT)) &&
                        r.err[0] && r.err[strlen(r.err) - 1] == '\n';
        if (!ok) fprintf(stderr, "\ncase %zu: exit %d, stderr '%s'\n", k, r.status, r.err);
        CU_ASSERT(ok);
        run_free(&r);
    }
    test_rm_dir(dir);
}

// `meshlm run --local 2` where the planner keeps one worker says which one it left out and why, in
// one line. An emulated 40 ms link to the second worker makes the choice certain; without it, the
// line appears exactly when the plan uses one worker.
static void test_left_out_worker_is_named(void) {
    char model[1024];
    if (!have_model(model, sizeof model)) return;
    const char *const args[] = {"meshlm", "run", "-m", model, "-p", "Once upon a time", "-n", "8", "--seed", "1",
                                "--local", "2", "-t", "1", NULL};
    run_t r;
    if (!run_meshlm(&r, args, "delay:link=0-2:ms=40")) return;
    CU_ASSERT_EQUAL(r.status, 0);
    const char *line = strstr(r.err, "meshlm: the plan uses 1 of 2 workers: local-1 left out: ");
    if (!line) fprintf(stderr, "\nstderr: %s\n", r.err);
    CU_ASSERT_PTR_NOT_NULL(line);
    if (line) {
        CU_ASSERT_PTR_NULL(strstr(line + 1, "meshlm: the plan uses")); // once
        CU_ASSERT_PTR_NOT_NULL(strstr(line, "link costs more than its compute saves"));
    }
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "cluster of 1 worker(s)"));
    CU_ASSERT(r.out[0] != 0);
    run_free(&r);

    if (!run_meshlm(&r, args, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    const bool one = strstr(r.err, "cluster of 1 worker(s)") != NULL;
    const bool said = strstr(r.err, "meshlm: the plan uses 1 of 2 workers: local-") != NULL;
    if (one != said) fprintf(stderr, "\nstderr: %s\n", r.err);
    CU_ASSERT_EQUAL(one, said);
    run_free(&r);
}

// `run --local 2 -t 1 --verbose` prints each node's figures as the planner gets them, local workers as
// one thread each on this machine's cores (they slow each other when computing at once).
static void test_node_figures_verbose(void) {
    char model[1024];
    if (!have_model(model, sizeof model)) return;
    const char *const args[] = {"meshlm", "run", "-m", model, "-p", "Once", "-n", "2", "--seed", "1",
                                "--local", "2", "-t", "1", "--verbose", NULL};
    run_t r;
    if (!run_meshlm(&r, args, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    char want[128];
    snprintf(want, sizeof want, ", 1 thread(s) on this machine's %ld cores\n", sysconf(_SC_NPROCESSORS_ONLN));
    for (int i = 0; i < 2; i++) {
        char who[64];
        snprintf(who, sizeof who, "meshlm: node local-%d: ", i);
        const char *line = strstr(r.err, who);
        CU_ASSERT_PTR_NOT_NULL(line);
        const char *eol = line ? strchr(line, '\n') : NULL;
        const char *at = line ? strstr(line, want) : NULL;
        CU_ASSERT(at && eol && at + strlen(want) - 1 == eol); // on that node's line
        if (!at) fprintf(stderr, "\nstderr: %s\n", r.err);
    }
    run_free(&r);
}

// tests/demo.sh: two local workers as a two-stage pipeline, the plan, the text and the speed, in
// well under 10 s; the text is the single node's (pipelines keep the logits bit for bit).
static void test_demo(void) {
    char model[1024];
    if (!have_model(model, sizeof model)) return;
    char demo[1024];
    snprintf(demo, sizeof demo, "%s", __FILE__);
    char *slash = strrchr(demo, '/');
    if (!slash || demo[0] != '/') {
        fprintf(stderr, "(skipped: source folder unknown) ");
        return;
    }
    snprintf(slash + 1, sizeof demo - (size_t)(slash + 1 - demo), "demo.sh");
    if (!test_meshlm_bin()) return;
    const char *const args[] = {"bash", demo, NULL};
    run_t d;
    CU_ASSERT_EQUAL_FATAL(run_prog(&d, "/bin/bash", args, NULL), 0);
    if (d.status != 0) fprintf(stderr, "\ndemo: exit %d, stderr: %s\n", d.status, d.err);
    CU_ASSERT_EQUAL(d.status, 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(d.err, "plan pp2: 2 stage(s) on 2 node(s)"));
    CU_ASSERT_PTR_NOT_NULL(strstr(d.err, "\n  stage 0: layers 0-2 on local-0 ("));
    CU_ASSERT_PTR_NOT_NULL(strstr(d.err, "\n  stage 1: layers 3-4 on local-1 ("));
    CU_ASSERT_PTR_NOT_NULL(strstr(d.err, "tokens/s"));
    CU_ASSERT_PTR_NOT_NULL(strstr(d.err, "cluster of 2 worker(s)"));
    CU_ASSERT(d.ms < 10000);
    fprintf(stderr, "(demo %.0f ms) ", d.ms);

    const char *const one[] = {"meshlm", "run", "-m", model, "-p", "Once upon a time", "-n", "64", "--seed", "1", NULL};
    run_t r;
    if (run_meshlm(&r, one, NULL)) {
        CU_ASSERT(strlen(d.out) > 40);
        CU_ASSERT_STRING_EQUAL(d.out, r.out);
        run_free(&r);
    }
    run_free(&d);
}

// Groups "meshlm-PID-N" left in this process's memory cgroup by runs whose PID is gone.
static int leftover_groups(void) {
    char base[600], err[256];
    if (memcg_probe(base, sizeof base, err, sizeof err) < 0) return 0;
    DIR *d = opendir(base);
    if (!d) return 0;
    int n = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int pid, idx, end = 0;
        if (sscanf(e->d_name, "meshlm-%d-%d%n", &pid, &idx, &end) == 2 && !e->d_name[end] && kill(pid, 0) != 0) {
            fprintf(stderr, "\nleft over: %s/%s\n", base, e->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

// Checks a "memory" array: this process first, then one row per worker named names[i]; local rows
// have VmHWM > 0 and, with cgroups, a peak within limit (which must be the given one) in a group
// that is gone now. Remote rows (local false) are all null.
static void check_memory(const cJSON *mem, const char *const *names, int n, bool local, double limit, bool cg) {
    CU_ASSERT_FATAL(cJSON_IsArray(mem));
    CU_ASSERT_EQUAL_FATAL(cJSON_GetArraySize(mem), n + 1);
    const cJSON *me = cJSON_GetArrayItem(mem, 0);
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(cJSON_GetObjectItem(me, "process")), "coordinator");
    CU_ASSERT(cJSON_GetNumberValue(cJSON_GetObjectItem(me, "vmhwm_bytes")) > 1e6);
    CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItem(me, "cgroup_peak_bytes")));
    const int coord = (int)cJSON_GetNumberValue(cJSON_GetObjectItem(me, "pid"));
    CU_ASSERT(coord > 0);
    for (int i = 0; i < n; i++) {
        const cJSON *w = cJSON_GetArrayItem(mem, i + 1);
        CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(cJSON_GetObjectItem(w, "process")), names[i]);
        const cJSON *hwm = cJSON_GetObjectItem(w, "vmhwm_bytes"), *peak = cJSON_GetObjectItem(w, "cgroup_peak_bytes");
        const cJSON *lim = cJSON_GetObjectItem(w, "limit_bytes"), *path = cJSON_GetObjectItem(w, "cgroup");
        if (!local) {
            CU_ASSERT(cJSON_IsNull(hwm) && cJSON_IsNull(peak) && cJSON_IsNull(lim) && cJSON_IsNull(path));
            CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItem(w, "pid")));
            continue;
        }
        CU_ASSERT(cJSON_GetNumberValue(hwm) > 1e6);
        CU_ASSERT(cJSON_GetNumberValue(cJSON_GetObjectItem(w, "pid")) > 0);
        if (!cg) {
            CU_ASSERT(cJSON_IsNull(peak) && cJSON_IsNull(lim) && cJSON_IsNull(path));
            continue;
        }
        CU_ASSERT(cJSON_GetNumberValue(peak) > 0);
        CU_ASSERT(cJSON_GetNumberValue(peak) <= cJSON_GetNumberValue(lim));
        CU_ASSERT_EQUAL(cJSON_GetNumberValue(lim), limit);
        const char *p = cJSON_GetStringValue(path);
        CU_ASSERT_PTR_NOT_NULL_FATAL(p);
        char tail[64];
        snprintf(tail, sizeof tail, "/meshlm-%d-%d", coord, i);
        CU_ASSERT(strlen(p) > strlen(tail) && !strcmp(p + strlen(p) - strlen(tail), tail));
        CU_ASSERT(access(p, F_OK) != 0 && errno == ENOENT); // removed after the run
    }
}

// run --local 2 --local-mem 256M: --json's "memory" has the coordinator and both workers, each with
// its VmHWM, the workers' cgroup peaks within 256 MiB; stderr says the same in one line; the groups
// are gone afterwards. bench --json carries the same in each result, and its table follows the speeds.
// coordinator --workers (remote workers): their rows are null.
static void test_memory_report(void) {
    char model[1024], err[256];
    if (!have_model(model, sizeof model)) return;
    const bool cg = memcg_probe(NULL, 0, err, sizeof err) > 0;
    if (!cg) fprintf(stderr, "(no memory cgroups: %s) ", err);
    const char *const names[] = {"local-0", "local-1"};
    const char *const run[] = {"meshlm", "run", "-m", model, "-p", "Once upon a time", "-n", "8", "--seed", "1",
                               "--local", "2", "-t", "1", "--local-mem", "256M", "--json", NULL};
    run_t r;
    if (!run_meshlm(&r, run, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    cJSON *o = cJSON_Parse(r.out);
    CU_ASSERT_PTR_NOT_NULL(o);
    if (o) check_memory(cJSON_GetObjectItem(o, "memory"), names, 2, true, 256.0 * 1024 * 1024, cg);
    cJSON_Delete(o);
    const char *line =
        strstr(r.err, "meshlm: peak memory (VmHWM; memory cgroup peak with page cache / limit): coordinator ");
    CU_ASSERT_PTR_NOT_NULL(line);
    if (line && cg) CU_ASSERT_PTR_NOT_NULL(strstr(line, "; local-1 "));
    if (line && cg) CU_ASSERT_PTR_NOT_NULL(strstr(line, " / 256.0 MiB\n"));
    if (!cg) CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "meshlm: no memory cgroups for the local workers ("));
    if (r.status != 0 || !line) fprintf(stderr, "\nstderr: %s\n", r.err);
    run_free(&r);

    const char *const bench[] = {"meshlm", "bench", "-m", model, "-p", "8", "-n", "4", "-r", "1", "-t", "1",
                                 "--local", "2", "--local-mem", "256M", "--json", NULL};
    if (!run_meshlm(&r, bench, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    o = cJSON_Parse(r.out);
    CU_ASSERT(cJSON_IsArray(o) && cJSON_GetArraySize(o) == 2);
    for (int i = 0; o && i < cJSON_GetArraySize(o); i++) {
        const cJSON *it = cJSON_GetArrayItem(o, i);
        check_memory(cJSON_GetObjectItem(it, "memory"), names, 2, true, 256.0 * 1024 * 1024, cg);
        // where each computing node's time per token went: one entry per node of the plan
        const cJSON *nt = cJSON_GetObjectItem(it, "node_times");
        const bool tg = cJSON_GetNumberValue(cJSON_GetObjectItem(it, "n_gen")) > 0;
        CU_ASSERT(cJSON_IsArray(nt) && cJSON_GetArraySize(nt) == (int)cJSON_GetNumberValue(cJSON_GetObjectItem(it, "nodes")));
        for (int k = 0; cJSON_IsArray(nt) && k < cJSON_GetArraySize(nt); k++) {
            const cJSON *t = cJSON_GetArrayItem(nt, k);
            CU_ASSERT(cJSON_GetNumberValue(cJSON_GetObjectItem(t, "compute_ms_per_token")) > 0);
            CU_ASSERT(cJSON_GetNumberValue(cJSON_GetObjectItem(t, "exchange_ms_per_token")) >= 0);
            CU_ASSERT(cJSON_IsString(cJSON_GetObjectItem(t, "node")));
            CU_ASSERT_EQUAL(cJSON_IsNumber(cJSON_GetObjectItem(t, "transfer_ms_per_token")), tg);
        }
    }
    cJSON_Delete(o);
    run_free(&r);

    // a tensor-parallel pair on one host: every exchange of a decode step goes through shared
    // memory, the same count on both nodes (an all-gather per embedding and 4 per block); with
    // MESHLM_SHM=off none does (nor without a writable /dev/shm, where shm_open cannot create one)
    const bool shm = access("/dev/shm", W_OK) == 0;
    if (!shm) fprintf(stderr, "(no writable /dev/shm: shared memory not checked) ");
    for (int off = 0; off < 2; off++) {
        const char *const pair[] = {"meshlm", "bench", "-m", model, "-p", "0", "-n", "4", "-r", "1", "-t", "1",
                                    "--local", "2", "--tp", "2", "--json", NULL};
        if (off) setenv("MESHLM_SHM", "off", 1);
        bool ran = run_meshlm(&r, pair, NULL);
        unsetenv("MESHLM_SHM");
        if (!ran) return;
        CU_ASSERT_EQUAL(r.status, 0);
        o = cJSON_Parse(r.out);
        const cJSON *nt = cJSON_GetObjectItem(cJSON_GetArrayItem(o, 0), "node_times");
        CU_ASSERT(cJSON_IsArray(nt) && cJSON_GetArraySize(nt) == 2);
        for (int k = 0; cJSON_IsArray(nt) && k < cJSON_GetArraySize(nt); k++) {
            const double per = cJSON_GetNumberValue(cJSON_GetObjectItem(cJSON_GetArrayItem(nt, k), "shm_collectives_per_token"));
            CU_ASSERT_DOUBLE_EQUAL(per, off || !shm ? 0.0 : 1.0 + 4.0 * 5, 1e-9); // stories260K: 5 blocks
        }
        cJSON_Delete(o);
        run_free(&r);
    }

    const char *const table[] = {"meshlm", "bench", "-m", model, "-p", "8", "-n", "0", "-r", "1", "-t", "1",
                                 "--local", "2", "--mem-budget", "256M", NULL};
    if (!run_meshlm(&r, table, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 0);
    const char *speeds = strstr(r.out, " pp8 |"), *mem = strstr(r.out, "| cgroup peak | cgroup limit |");
    CU_ASSERT(speeds && mem && speeds < mem);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.err, " pp8, ms per token: "));
    if (mem) {
        CU_ASSERT_PTR_NOT_NULL(strstr(mem, "| coordinator "));
        CU_ASSERT_PTR_NOT_NULL(strstr(mem, "| local-1 "));
        if (cg) CU_ASSERT_PTR_NOT_NULL(strstr(mem, " 256.0 MiB |")); // --local-mem defaults to the budget
    }
    run_free(&r);
    CU_ASSERT_EQUAL(leftover_groups(), 0);

    const char *bin = test_meshlm_bin();
    launch_t *lw = calloc(1, sizeof *lw);
    launch_opts_t lo = {.exe = bin, .model_path = model, .n_threads = 1};
    char e2[512];
    CU_ASSERT_FATAL(lw && launch_local(lw, 2, &lo, e2, sizeof e2) == 0);
    char list[700];
    snprintf(list, sizeof list, "%s,%s", lw->endpoint[0], lw->endpoint[1]);
    const char *const coord[] = {"meshlm", "coordinator", "-m", model, "-p", "Once upon a time", "-n", "4",
                                 "--workers", list, "--json", NULL};
    if (run_meshlm(&r, coord, NULL)) {
        CU_ASSERT_EQUAL(r.status, 0);
        o = cJSON_Parse(r.out);
        const char *const eps[] = {lw->endpoint[0], lw->endpoint[1]};
        if (o) check_memory(cJSON_GetObjectItem(o, "memory"), eps, 2, false, 0, false);
        CU_ASSERT_PTR_NOT_NULL(o);
        cJSON_Delete(o);
        CU_ASSERT_PTR_NOT_NULL(strstr(r.err, "; ipc://"));
        run_free(&r);
    }
    for (int i = 0; i < lw->n; i++) kill(lw->pid[i], SIGTERM);
    launch_reap(lw, 3000);
    free(lw);
}

// A worker whose cgroup limit is far too small is killed by the OOM killer; the run fails within its
// --timeout and names the worker, the cause and the limit; no group is left behind.
static void test_oom_worker_is_named(void) {
    char model[1024], err[256];
    if (!have_model(model, sizeof model)) return;
    if (memcg_probe(NULL, 0, err, sizeof err) < 0) {
        fprintf(stderr, "(skipped: %s) ", err);
        return;
    }
    const char *const args[] = {"meshlm", "run", "-m", model, "-p", "Once upon a time", "-n", "8", "--local", "2",
                                "-t", "1", "--local-mem", "2M", "--timeout", "3000", NULL};
    run_t r;
    if (!run_meshlm(&r, args, NULL)) return;
    CU_ASSERT_EQUAL(r.status, 1);
    CU_ASSERT(r.ms < 20000);
    const char *why = strstr(r.err, "\nmeshlm run: worker local-");
    if (!why) fprintf(stderr, "\nstderr: %s\n", r.err);
    CU_ASSERT_PTR_NOT_NULL(why);
    if (why) {
        CU_ASSERT_PTR_NOT_NULL(strstr(why, "was killed by the OOM killer of its memory cgroup"));
        CU_ASSERT_PTR_NOT_NULL(strstr(why, "its limit of 2.0 MiB (--local-mem"));
    }
    CU_ASSERT(r.err[0] && r.err[strlen(r.err) - 1] == '\n');
    run_free(&r);
    CU_ASSERT_EQUAL(leftover_groups(), 0);
}

// Bad sizes and --local-mem without local workers are refused in one line naming the option; --help
// of run, coordinator and bench lists both options.
static void test_memory_options(void) {
    char model[1024];
    if (!have_model(model, sizeof model)) return;
    const struct {
        const char *args[14];
        const char *says;    // the start of the one line on stderr
    } cases[] = {
        {{"meshlm", "run", "-m", model, "-p", "hi", "--mem-budget", "abc", NULL},
         "meshlm run: --mem-budget wants a size such as 512M or 2G (K, M, G, T: powers of 1024), not 'abc'\n"},
        {{"meshlm", "run", "-m", model, "-p", "hi", "--local", "2", "--local-mem", "12Q", NULL},
         "meshlm run: --local-mem wants a size such as 512M or 2G"},
        {{"meshlm", "coordinator", "-m", model, "-p", "hi", "--workers", "tcp://127.0.0.1:9", "--mem-budget", "-1G",
          NULL}, "meshlm coordinator: --mem-budget wants a size"},
        {{"meshlm", "bench", "-m", model, "--local", "2", "--local-mem", "nan", NULL},
         "meshlm bench: --local-mem wants a size"},
        {{"meshlm", "bench", "-m", model, "--mem-budget", "1e30", NULL}, "meshlm bench: --mem-budget wants a size"},
        {{"meshlm", "run", "-m", model, "-p", "hi", "--local-mem", "1G", NULL},
         "meshlm run: --local-mem limits the workers started with --local N, and there are none\n"},
        {{"meshlm", "bench", "-m", model, "--local-mem", "1G", NULL},
         "meshlm bench: --local-mem limits the workers started with --local N, and there are none\n"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        run_t r;
        if (!run_meshlm(&r, cases[k].args, NULL)) break;
        const bool ok = r.status == 2 && !strncmp(r.err, cases[k].says, strlen(cases[k].says)) &&
                        count_char(r.err, '\n') == 1 && r.err[strlen(r.err) - 1] == '\n' && r.out[0] == 0;
        if (!ok) fprintf(stderr, "\ncase %zu: exit %d, stderr '%s'\n", k, r.status, r.err);
        CU_ASSERT(ok);
        run_free(&r);
    }
    const char *const cmds[] = {"run", "coordinator", "bench"};
    for (int k = 0; k < 3; k++) {
        const char *const args[] = {"meshlm", cmds[k], "--help", NULL};
        run_t r;
        if (!run_meshlm(&r, args, NULL)) break;
        CU_ASSERT_EQUAL(r.status, 0);
        CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "\n      --mem-budget SIZE   "));
        CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "\n      --local-mem SIZE    "));
        CU_ASSERT_PTR_NOT_NULL(strstr(r.out, "VmHWM"));
        run_free(&r);
    }
}

// --- suite

int test_cli_suite(void) {
    CU_pSuite s = CU_add_suite("cli", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "plan refusals: one line with a newline", test_plan_refusals) ||
        !CU_add_test(s, "plan: llama-2-70b on four 2 GiB nodes streams, with a prediction", test_plan_70b_on_2g_nodes) ||
        !CU_add_test(s, "file errors name the path and the reason", test_file_errors_name_path) ||
        !CU_add_test(s, "run --local 2 names the worker the plan left out", test_left_out_worker_is_named) ||
        !CU_add_test(s, "run --local 2 --verbose prints each node's figures and shared cores", test_node_figures_verbose) ||
        !CU_add_test(s, "tests/demo.sh runs a two-worker pipeline", test_demo) ||
        !CU_add_test(s, "run/bench report every process's peak memory", test_memory_report) ||
        !CU_add_test(s, "a worker over its cgroup limit is named", test_oom_worker_is_named) ||
        !CU_add_test(s, "memory options: bad sizes refused, --help", test_memory_options))
        return -1;
    return 0;
}
