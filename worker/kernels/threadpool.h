// A fixed pool of threads that run one parallel job at a time, with the caller as thread 0.
#ifndef MESHLM_THREADPOOL_H
#define MESHLM_THREADPOOL_H

typedef struct tpool tpool_t;

// Work item: called once on every thread with ith in [0, nth).
typedef void (*tpool_fn)(void *arg, int ith, int nth);

// A pool of n_threads in all (n_threads - 1 are started; the caller of tpool_run is the last one).
// Returns NULL when threads cannot be started or n_threads < 1.
tpool_t *tpool_new(int n_threads);

// Stops and joins the threads; accepts NULL and NULLs the pointer.
void tpool_destroy(tpool_t **self_p);

// Threads in the pool, the caller included.
int tpool_size(const tpool_t *p);

// Runs fn(arg, ith, nth) on every thread and returns when all calls have returned. Workers spin
// briefly between jobs (so back-to-back jobs start in well under a microsecond), then sleep.
void tpool_run(tpool_t *p, tpool_fn fn, void *arg);

// Same, on the first n_use threads only (nth = n_use; clamped to [1, size]). With n_use == 1 the
// caller runs fn alone and no worker is woken: the cheap path for jobs too small to split.
void tpool_run_n(tpool_t *p, tpool_fn fn, void *arg, int n_use);

#endif
