// Helpers shared by the CUnit suites (not a suite itself).
#include "test_util.h"

#include "core/rng.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <dirent.h>
#include <math.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

const char *test_shared_dir(void) {
    const char *e = getenv("MESHLM_SHARED");
    return (e && *e) ? e : MESHLM_SHARED_DEFAULT;
}

char *test_shared_path(char *buf, size_t cap, const char *rel) {
    snprintf(buf, cap, "%s/%s", test_shared_dir(), rel);
    return buf;
}

void *test_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return NULL; }
    long n = ftell(f);
    if (n < 0) { fclose(f); return NULL; }
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf) { fclose(f); return NULL; }
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); fclose(f); return NULL; }
    buf[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return buf;
}

const char *test_meshlm_bin(void) {
    const char *e = getenv("MESHLM_BIN");
    return (e && *e) ? e : NULL;
}

int test_capture(const char *cmd, char *buf, size_t cap) {
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = 0;
    return pclose(f);
}

char *test_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    size_t n = strlen(base) + 32;
    char *p = malloc(n);
    if (!p) return NULL;
    snprintf(p, n, "%s/meshlm-test-XXXXXX", base);
    if (!mkdtemp(p)) { free(p); return NULL; }
    return p;
}

uint64_t test_rng_next(uint64_t *st) { return mlm_rng_next(st); }

float test_rng_float(uint64_t *st) {
    return (float)((double)(test_rng_next(st) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

void test_fill_floats(float *x, int64_t n, uint64_t seed, float spread) {
    uint64_t st = seed;
    float scale = 1.0f;
    for (int64_t i = 0; i < n; i++) {
        if (i % 32 == 0) scale = 0.01f + spread * fabsf(test_rng_float(&st));
        x[i] = scale * test_rng_float(&st);
    }
}

void test_rm_dir(char *dir) {
    if (!dir) return;
    DIR *d = opendir(dir);
    if (d) {
        char p[1024];
        for (struct dirent *e; (e = readdir(d));) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

typedef struct {
    struct comm *c;
    int rank;
    test_rank_fn fn;
    void *arg;
} rank_thread_t;

static void *rank_main(void *p) {
    rank_thread_t *t = p;
    t->fn(t->c, t->rank, t->arg);
    return NULL;
}

void test_run_ranks(struct comm **cs, int n, test_rank_fn fn, void *arg) {
    pthread_t th[64];
    rank_thread_t ta[64];
    if (n > 64) n = 64;
    for (int r = 0; r < n; r++) {
        ta[r] = (rank_thread_t){cs[r], r, fn, arg};
        pthread_create(&th[r], NULL, rank_main, &ta[r]);
    }
    for (int r = 0; r < n; r++) pthread_join(th[r], NULL);
}

pid_t test_spawn(const char *const *args, const char *log) {
    pid_t pid = fork();
    if (pid == 0) {
        if (log) {
            int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(126);
        }
        execv(args[0], (char *const *)args);
        _exit(127);
    }
    return pid;
}
