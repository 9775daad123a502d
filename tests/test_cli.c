// CUnit suite "cli": the meshlm program as a user meets it: refusals end with a newline, file errors name
// the path and the system's reason, a plan that leaves a worker out says so, and tests/demo.sh runs a cluster.
#include <CUnit/CUnit.h>
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

// --- suite

int test_cli_suite(void) {
    CU_pSuite s = CU_add_suite("cli", NULL, NULL);
    if (!s) return -1;
    if (!CU_add_test(s, "plan refusals: one line with a newline", test_plan_refusals) ||
        !CU_add_test(s, "file errors name the path and the reason", test_file_errors_name_path) ||
        !CU_add_test(s, "run --local 2 names the worker the plan left out", test_left_out_worker_is_named) ||
        !CU_add_test(s, "tests/demo.sh runs a two-worker pipeline", test_demo))
        return -1;
    return 0;
}
