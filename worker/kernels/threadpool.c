// Thread pool: workers spin on a job counter for a short while, then sleep on a condition variable.
#include "worker/kernels/threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sched.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

// --- types

#define SPIN_ITERS 200000  // polls before a worker goes to sleep (~ a few ms)
#define YIELD_EVERY 4096   // polls between sched_yield calls, so a descheduled peer gets the core

typedef struct {
    tpool_t *pool;                // owner
    int ith;                      // thread index (1..n-1)
} worker_arg_t;

struct tpool {
    int n;                        // threads in all, caller included
    pthread_t *threads;           // (n - 1) started workers
    worker_arg_t *args;           // (n - 1) their arguments
    tpool_fn fn;                  // current job, valid while pending > 0
    void *arg;                    // current job's argument
    int n_use;                    // threads that run the current job (workers with ith >= n_use skip it)
    atomic_uint_fast64_t gen;     // job counter: bumped once per tpool_run
    atomic_int pending;           // workers that have not finished the current job
    atomic_int sleepers;          // workers blocked (or about to block) on cv
    atomic_int stop;              // set once by tpool_destroy
    pthread_mutex_t mu;           // guards the sleep/wake handshake
    pthread_cond_t cv;            // signalled when gen changes or stop is set
};

// --- workers

static void *worker_main(void *p) {
    worker_arg_t *wa = p;
    tpool_t *tp = wa->pool;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&tp->gen, memory_order_acquire)) == seen &&
               !atomic_load(&tp->stop) && spins < SPIN_ITERS) {
            cpu_relax();
            if (++spins % YIELD_EVERY == 0) sched_yield();
        }
        if (g == seen && !atomic_load(&tp->stop)) {
            pthread_mutex_lock(&tp->mu);
            atomic_fetch_add(&tp->sleepers, 1);
            while ((g = atomic_load(&tp->gen)) == seen && !atomic_load(&tp->stop))
                pthread_cond_wait(&tp->cv, &tp->mu);
            atomic_fetch_sub(&tp->sleepers, 1);
            pthread_mutex_unlock(&tp->mu);
        }
        if (atomic_load(&tp->stop)) break;
        seen = g;
        if (wa->ith < tp->n_use) tp->fn(tp->arg, wa->ith, tp->n_use);
        atomic_fetch_sub_explicit(&tp->pending, 1, memory_order_release);
    }
    return NULL;
}

// --- public API

tpool_t *tpool_new(int n_threads) {
    if (n_threads < 1) return NULL;
    tpool_t *tp = calloc(1, sizeof *tp);
    if (!tp) return NULL;
    tp->n = n_threads;
    atomic_init(&tp->gen, 0);
    atomic_init(&tp->pending, 0);
    atomic_init(&tp->sleepers, 0);
    atomic_init(&tp->stop, 0);
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->cv, NULL);
    if (n_threads > 1) {
        tp->threads = calloc((size_t)n_threads - 1, sizeof *tp->threads);
        tp->args = calloc((size_t)n_threads - 1, sizeof *tp->args);
        if (!tp->threads || !tp->args) {
            free(tp->threads);
            free(tp->args);
            free(tp);
            return NULL;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            tp->args[i] = (worker_arg_t){tp, i + 1};
            if (pthread_create(&tp->threads[i], NULL, worker_main, &tp->args[i]) != 0) {
                tp->n = i + 1; // join the ones that started
                tpool_destroy(&tp);
                return NULL;
            }
        }
    }
    return tp;
}

void tpool_destroy(tpool_t **self_p) {
    if (!self_p || !*self_p) return;
    tpool_t *tp = *self_p;
    pthread_mutex_lock(&tp->mu);
    atomic_store(&tp->stop, 1);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 0; i < tp->n - 1; i++) pthread_join(tp->threads[i], NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->cv);
    free(tp->threads);
    free(tp->args);
    free(tp);
    *self_p = NULL;
}

int tpool_size(const tpool_t *p) { return p ? p->n : 1; }

void tpool_run(tpool_t *p, tpool_fn fn, void *arg) { tpool_run_n(p, fn, arg, p ? p->n : 1); }

void tpool_run_n(tpool_t *p, tpool_fn fn, void *arg, int n_use) {
    if (!p || p->n == 1 || n_use <= 1) {
        fn(arg, 0, 1);
        return;
    }
    if (n_use > p->n) n_use = p->n;
    p->fn = fn;
    p->arg = arg;
    p->n_use = n_use;
    atomic_store(&p->pending, p->n - 1);
    atomic_fetch_add(&p->gen, 1); // seq_cst: pairs with the sleepers check below
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0, n_use);
    int spins = 0;
    while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0) {
        cpu_relax();
        if (++spins % YIELD_EVERY == 0) sched_yield();
    }
}
