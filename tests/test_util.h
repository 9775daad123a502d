// Helpers shared by the CUnit suites: the suite registry, paths to shared/, file loading.
#ifndef MESHLM_TEST_UTIL_H
#define MESHLM_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

// 1 in an AddressSanitizer build (gcc's macro, clang's feature): suites may take a smaller sample of
// their most expensive cases there, the release stage running them all.
#if defined(__SANITIZE_ADDRESS__)
#define TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_SANITIZED 1
#endif
#endif
#ifndef TEST_SANITIZED
#define TEST_SANITIZED 0
#endif

typedef struct {
    const char *name;        // suite name: tests/test_<name>.c
    int (*add)(void);        // registers the suite with CUnit; 0 on success
} test_suite_entry_t;

extern const test_suite_entry_t test_registry[]; // ends with {NULL, NULL}

// Directory of shared/ (models, reference): $MESHLM_SHARED or the build's default. Never NULL.
const char *test_shared_dir(void);

// Joins shared dir and a relative path into buf; returns buf.
char *test_shared_path(char *buf, size_t cap, const char *rel);

// Reads a whole file; caller frees. NULL on failure (and *len untouched).
void *test_read_file(const char *path, size_t *len);

// Path of the meshlm executable ($MESHLM_BIN, set by ctest), or NULL.
const char *test_meshlm_bin(void);

// Runs a shell command and reads what it writes to stdout (with 2>&1 in cmd, its stderr too) into buf
// (NUL-terminated, at most cap - 1 bytes): its exit status (pclose), or -1 when it cannot start.
int test_capture(const char *cmd, char *buf, size_t cap);

// A fresh temporary directory (mkdtemp under $TMPDIR or /tmp); caller frees the string.
char *test_tmpdir(void);

// splitmix64 step; the state lives in the caller.
uint64_t test_rng_next(uint64_t *state);
// Uniform float in [-1, 1).
float test_rng_float(uint64_t *state);
// n floats in [-scale, scale), with scale redrawn every 32 elements from [0.01, 0.01 + spread)
// (activations vary block to block); seeded, repeatable.
void test_fill_floats(float *x, int64_t n, uint64_t seed, float spread);
// Removes a directory and the files in it (one level), then frees dir.
void test_rm_dir(char *dir);

// Starts a program: args is NULL-terminated with args[0] the executable's path; its stdout and stderr
// go to log (appended; NULL = this process's). Returns its pid, or -1. The caller kills and reaps it.
#include <sys/types.h>
pid_t test_spawn(const char *const *args, const char *log);

// Runs fn(comm, rank, arg) for ranks 0..n-1 (cs[rank]), each on its own thread, and joins them.
struct comm;
typedef void (*test_rank_fn)(struct comm *c, int rank, void *arg);
void test_run_ranks(struct comm **cs, int n, test_rank_fn fn, void *arg);

// Logits of 12 tokens of model m (a chunk of 10, then two single tokens, every row), with a context
// of n_ctx positions evaluated in batches of n_batch on 2 threads: (12, n_vocab), to free; NULL on
// failure (said on stderr). Defined in ref_cases.c: full builds only (not MESHLM_KERNELS_ONLY).
struct model;
float *test_logits12(struct model *m, int n_ctx, int n_batch);

// A worker of an older protocol on the control link ctl (rank 1 of a group whose rank 0 is the
// coordinator): says 1.minor in its HELLO (node "old-1"), answers the link probes and slice data with a
// heartbeat, takes everything else without a word, stops at SHUTDOWN or after 20 s. A pthread start
// routine (arg: test_old_worker_t). Defined in ref_cases.c: full builds only.
typedef struct {
    struct comm *ctl;
    int minor;
} test_old_worker_t;
void *test_old_worker_main(void *arg);

#endif
