// Fault scheduler: fires a spec's events at token counts and times, signals local workers through pidfds, opens link windows (partitions, timed link rules) on the board.
#include "cluster/faultsched.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core/err.h"

// --- types

#define SLICE_MS 10                 // a slowed worker runs this long between its stops
#define NS_PER_MS 1000000ll

enum { ITEM_PENDING = 0, ITEM_ACTIVE = 1, ITEM_DONE = 2 };

typedef struct {
    fault_event_t e;                // the event (a copy)
    int worker;                     // kill, freeze, slow: the worker it hits (worker=* resolved); else -1
    int state;                      // ITEM_*
    int64_t end_ns;                 // ITEM_ACTIVE: when it ends (INT64_MAX: at the stop)
} item_t;

typedef struct {
    pid_t pid;                      // the process
    int pidfd;                      // a pidfd of it (-1: none; kill(pid) then)
    char name[24];                  // its name in plans
    bool killed;                    // SIGKILL sent
    int frozen;                     // freezes in force
    double slow;                    // the factor of the slow in force (0 = none)
    bool duty_stop;                 // the duty cycle wants it stopped now
    int64_t toggle_ns;              // when the duty cycle switches next
    bool stopped;                   // SIGSTOP sent and not continued
} wstate_t;

struct faultsched {
    fault_spec_t *spec;             // own copy, with the board's path when there is a board
    fault_board_t *board;           // created here when the spec has partitions (NULL otherwise)
    item_t *items;                  // (n_items) one per event, in text order
    int n_items;
    wstate_t w[LAUNCH_MAX];         // (n_local) the local workers, worker N at [N - 1]
    int n_local;
    bool verbose;
    pthread_mutex_t mu;             // guards everything below and the workers' states
    pthread_cond_t cv;              // wakes the timer thread (a new deadline, the stop)
    pthread_t thread;
    bool thread_on;                 // the timer thread runs
    bool stopping;                  // faultsched_stop was called
    int64_t t0_ns;                  // faultsched_start (0 = not started)
    int64_t tokens;                 // the last running total reported
    int ended;                      // events that ended
    faultsched_entry_t *log;        // (cap_log) entries, n_log of them final
    int n_log, cap_log;
};

// --- helpers

static int64_t now_ns(void) { return fault_now_ns(); }

// A board event: a partition or a link rule with a window.
static bool on_board(fault_kind_t k) {
    return k == FAULT_PARTITION || k == FAULT_DELAY || k == FAULT_BW || k == FAULT_LOSS || k == FAULT_DROP;
}

static int pidfd_of(pid_t pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    (void)pid;
    return -1;
#endif
}

// Sends sig to worker w. 0, or MLM_EPEER when the process is gone.
static int signal_worker(wstate_t *w, int sig) {
    int r;
#ifdef SYS_pidfd_send_signal
    if (w->pidfd >= 0) r = (int)syscall(SYS_pidfd_send_signal, w->pidfd, sig, NULL, 0);
    else
#endif
        r = kill(w->pid, sig);
    return r == 0 ? 0 : MLM_EPEER;
}

// Stops or continues worker w as its freezes and duty cycle want. 0 or MLM_EPEER.
static int apply(wstate_t *w) {
    if (w->killed) return 0;
    const bool want = w->frozen > 0 || (w->slow > 0 && w->duty_stop);
    if (want == w->stopped) return 0;
    w->stopped = want;
    return signal_worker(w, want ? SIGSTOP : SIGCONT);
}

static double since_ms(const faultsched_t *s, int64_t t) { return s->t0_ns ? (double)(t - s->t0_ns) / 1e6 : 0; }

// Appends an entry (the log has room for every event's start and end) and prints it when verbose.
static void note(faultsched_t *s, const item_t *it, bool end, int rc, int64_t t, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static void note(faultsched_t *s, const item_t *it, bool end, int rc, int64_t t, const char *fmt, ...) {
    if (s->n_log >= s->cap_log) return;
    faultsched_entry_t *en = &s->log[s->n_log];
    *en = (faultsched_entry_t){.t_ms = since_ms(s, t), .tokens = s->tokens, .event = it->e.slot, .kind = it->e.kind,
                               .worker = it->worker, .a = on_board(it->e.kind) ? it->e.a : -1,
                               .b = on_board(it->e.kind) ? it->e.b : -1, .dur_ms = it->e.ms, .end = end, .rc = rc};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(en->what, sizeof en->what, fmt, ap);
    va_end(ap);
    s->n_log++;
    if (s->verbose) fprintf(stderr, "meshlm: fault: %s (%.0f ms, %lld tokens)\n", en->what, en->t_ms, (long long)s->tokens);
}

// "worker 2 (local-1, pid 123)" into buf.
static const char *who(const faultsched_t *s, int worker, char *buf, size_t cap) {
    const wstate_t *w = &s->w[worker - 1];
    snprintf(buf, cap, "worker %d (%s, pid %d)", worker, w->name, (int)w->pid);
    return buf;
}

// "after 5 tokens" / "at 1500 ms".
static const char *when(const fault_event_t *e, char *buf, size_t cap) {
    if (e->after_tokens >= 0) snprintf(buf, cap, "after %lld tokens", (long long)e->after_tokens);
    else snprintf(buf, cap, "at %.0f ms", e->at_ms);
    return buf;
}

static void link_text(const fault_event_t *e, char *buf, size_t cap) {
    if (e->a == FAULT_ANY) snprintf(buf, cap, "*");
    else if (e->b == FAULT_ANY) snprintf(buf, cap, "%d-*", e->a);
    else snprintf(buf, cap, "%d-%d", e->a, e->b);
}

// Carries out item it's start at time t.
static void fire(faultsched_t *s, item_t *it, int64_t t) {
    const fault_event_t *e = &it->e;
    char wb[96], tb[48], lb[32];
    const int64_t end = e->ms > 0 ? t + (int64_t)(e->ms * NS_PER_MS) : INT64_MAX;
    it->state = ITEM_DONE;
    int rc = 0;
    switch (e->kind) {
    case FAULT_KILL: {
        wstate_t *w = &s->w[it->worker - 1];
        rc = w->killed ? MLM_EPEER : signal_worker(w, SIGKILL);
        w->killed = true;
        note(s, it, false, rc, t, "kill %s %s%s", who(s, it->worker, wb, sizeof wb), when(e, tb, sizeof tb),
             rc ? ": it is gone already" : "");
        break;
    }
    case FAULT_FREEZE: {
        wstate_t *w = &s->w[it->worker - 1];
        w->frozen++;
        rc = w->killed ? MLM_EPEER : apply(w);
        note(s, it, false, rc, t, "freeze %s for %.0f ms %s%s", who(s, it->worker, wb, sizeof wb), e->ms,
             when(e, tb, sizeof tb), rc ? ": it is gone" : "");
        it->state = ITEM_ACTIVE;
        it->end_ns = t + (int64_t)(e->ms * NS_PER_MS);
        break;
    }
    case FAULT_SLOW: {
        wstate_t *w = &s->w[it->worker - 1];
        w->slow = e->factor;
        w->duty_stop = false;
        w->toggle_ns = t + SLICE_MS * NS_PER_MS;
        rc = w->killed ? MLM_EPEER : apply(w);
        char dur[48] = "";
        if (e->ms > 0) snprintf(dur, sizeof dur, " for %.0f ms", e->ms);
        note(s, it, false, rc, t, "slow %s %g times%s %s%s", who(s, it->worker, wb, sizeof wb), e->factor, dur,
             when(e, tb, sizeof tb), rc ? ": it is gone" : "");
        it->state = ITEM_ACTIVE;
        it->end_ns = end;
        break;
    }
    default: { // a partition, or a link rule's window
        link_text(e, lb, sizeof lb);
        rc = fault_board_set(s->board, e->slot, t, end);
        char dur[48] = " until the end";
        if (e->ms > 0) snprintf(dur, sizeof dur, " for %.0f ms", e->ms);
        if (e->kind == FAULT_PARTITION) note(s, it, false, rc, t, "partition link %s%s %s", lb, dur, when(e, tb, sizeof tb));
        else note(s, it, false, rc, t, "%s on link %s%s %s", fault_kind_name(e->kind), lb, dur, when(e, tb, sizeof tb));
        it->state = ITEM_ACTIVE;
        it->end_ns = end;
        break;
    }
    }
}

// Ends active item it at time t (its time came, or the stop).
static void finish(faultsched_t *s, item_t *it, int64_t t) {
    const fault_event_t *e = &it->e;
    char wb[96], lb[32];
    int rc = 0;
    it->state = ITEM_DONE;
    s->ended++;
    if (e->kind == FAULT_FREEZE) {
        wstate_t *w = &s->w[it->worker - 1];
        w->frozen--;
        rc = apply(w);
        note(s, it, true, rc, t, "%s continues (freeze over)", who(s, it->worker, wb, sizeof wb));
    } else if (e->kind == FAULT_SLOW) {
        wstate_t *w = &s->w[it->worker - 1];
        w->slow = 0;
        w->duty_stop = false;
        rc = apply(w);
        note(s, it, true, rc, t, "%s at full speed again", who(s, it->worker, wb, sizeof wb));
    } else if (on_board(e->kind)) {
        int64_t start = 0;
        fault_board_active(s->board, e->slot, t - 1, &start);
        rc = fault_board_set(s->board, e->slot, start > 0 ? start : t, t); // closed from now on
        link_text(e, lb, sizeof lb);
        if (e->kind == FAULT_PARTITION) note(s, it, true, rc, t, "link %s carries messages again", lb);
        else note(s, it, true, rc, t, "%s on link %s over", fault_kind_name(e->kind), lb);
    }
}

// Does what is due at time t; *next gets the earliest time something else is due (INT64_MAX: nothing).
static void run_due(faultsched_t *s, int64_t t, int64_t *next) {
    *next = INT64_MAX;
    for (int i = 0; i < s->n_items; i++) {
        item_t *it = &s->items[i];
        if (it->state == ITEM_PENDING && it->e.at_ms >= 0 && s->t0_ns) {
            const int64_t at = s->t0_ns + (int64_t)(it->e.at_ms * NS_PER_MS);
            if (at <= t) fire(s, it, t);
            else if (at < *next) *next = at;
        }
        if (it->state == ITEM_ACTIVE) {
            if (it->end_ns <= t) finish(s, it, t);
            else if (it->end_ns < *next) *next = it->end_ns;
        }
    }
    for (int i = 0; i < s->n_local; i++) { // duty cycles
        wstate_t *w = &s->w[i];
        if (w->slow <= 0 || w->killed) continue;
        while (w->toggle_ns <= t) {
            w->duty_stop = !w->duty_stop;
            w->toggle_ns += (int64_t)(w->duty_stop ? SLICE_MS * (w->slow - 1) : SLICE_MS) * NS_PER_MS;
            if (w->toggle_ns <= t - 1000 * NS_PER_MS) w->toggle_ns = t; // a long stall: do not catch up
        }
        apply(w);
        if (w->toggle_ns < *next) *next = w->toggle_ns;
    }
}

static void *timer_main(void *arg) {
    faultsched_t *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stopping) {
        int64_t next;
        run_due(s, now_ns(), &next);
        if (next == INT64_MAX) {
            pthread_cond_wait(&s->cv, &s->mu);
        } else {
            struct timespec ts = {(time_t)(next / 1000000000), (long)(next % 1000000000)};
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

// Checks that every event can be carried out here. 0 or MLM_EINVAL with err.
static int check_events(const fault_spec_t *spec, const faultsched_opts_t *o, int n_workers, char *err, size_t errlen) {
    const int n_local = o->launch ? o->launch->n : 0;
    for (int i = 0; i < fault_n_events(spec); i++) {
        const fault_event_t *e = fault_event(spec, i);
        if (on_board(e->kind)) continue;
        const char *k = fault_kind_name(e->kind);
        if (n_local == 0)
            return mlm_fail(err, errlen, MLM_EINVAL,
                            "fault event %d (%s) signals a worker's process: it needs local workers (--local N)", i + 1, k);
        if (e->worker != FAULT_ANY && e->worker > n_local)
            return mlm_fail(err, errlen, MLM_EINVAL, "fault event %d (%s) names worker %d, but there are %d local workers",
                            i + 1, k, e->worker, n_local);
        if (e->worker == FAULT_ANY && n_workers > n_local)
            return mlm_fail(err, errlen, MLM_EINVAL, "fault event %d (%s:worker=*) may pick any of %d workers, %d are local",
                            i + 1, k, n_workers, n_local);
    }
    return 0;
}

// --- public API

int faultsched_new(faultsched_t **out, const fault_spec_t *spec, const faultsched_opts_t *o, char *err, size_t errlen) {
    *out = NULL;
    const faultsched_opts_t none = {0};
    if (!o) o = &none;
    if (!spec) return mlm_fail(err, errlen, MLM_EINVAL, "fault schedule: no spec");
    const int n_workers = o->n_workers > 0 ? o->n_workers : o->launch ? o->launch->n : 0;
    int rc = check_events(spec, o, n_workers, err, errlen);
    if (rc != 0) return rc;
    faultsched_t *s = calloc(1, sizeof *s);
    if (!s) return mlm_fail(err, errlen, MLM_ENOMEM, "fault schedule: out of memory");
    s->verbose = o->verbose;
    s->n_items = fault_n_events(spec);
    s->items = calloc((size_t)s->n_items + 1, sizeof *s->items);
    s->cap_log = 2 * s->n_items + 1;
    s->log = calloc((size_t)s->cap_log, sizeof *s->log);
    char text_err[256];
    rc = fault_parse(fault_spec_text(spec), &s->spec, text_err, sizeof text_err); // a copy of its own
    if (rc == 0 && (!s->items || !s->log)) rc = MLM_ENOMEM;
    if (rc != 0) {
        faultsched_destroy(&s);
        return mlm_fail(err, errlen, rc, "fault schedule: %s", rc == MLM_ENOMEM ? "out of memory" : text_err);
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    s->n_local = o->launch ? o->launch->n : 0;
    for (int i = 0; i < s->n_local; i++) {
        wstate_t *w = &s->w[i];
        w->pid = o->launch->pid[i];
        w->pidfd = o->launch->exited[i] ? -1 : pidfd_of(w->pid);
        w->killed = o->launch->exited[i];
        snprintf(w->name, sizeof w->name, "%s", o->launch->name[i]);
    }
    bool board = false;
    for (int i = 0; i < s->n_items; i++) {
        item_t *it = &s->items[i];
        it->e = *fault_event(s->spec, i);
        it->worker = on_board(it->e.kind) ? -1 : fault_pick_worker(s->spec, i, n_workers);
        board |= on_board(it->e.kind);
    }
    if (board) {
        const char *dir = o->board_dir ? o->board_dir : getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        char tmpl[300];
        snprintf(tmpl, sizeof tmpl, "%s/meshlm-board-XXXXXX", dir);
        rc = fault_board_create(&s->board, tmpl, err, errlen);
        if (rc == 0 && fault_set_board(s->spec, fault_board_file(s->board)) != 0)
            rc = mlm_fail(err, errlen, MLM_EINVAL, "fault schedule: the board's path %s cannot go into a spec",
                          fault_board_file(s->board));
        if (rc != 0) {
            faultsched_destroy(&s);
            return rc;
        }
    }
    *out = s;
    return 0;
}

const fault_spec_t *faultsched_spec(const faultsched_t *s) { return s ? s->spec : NULL; }

int faultsched_start(faultsched_t *s, char *err, size_t errlen) {
    pthread_mutex_lock(&s->mu);
    if (s->t0_ns || s->stopping) {
        pthread_mutex_unlock(&s->mu);
        return mlm_fail(err, errlen, MLM_ESTATE, "fault schedule: already started");
    }
    s->t0_ns = now_ns();
    for (int i = 0; i < s->n_items; i++) { // what starts at once starts before anything else happens
        item_t *it = &s->items[i];
        if (it->state == ITEM_PENDING && (it->e.after_tokens == 0 || it->e.at_ms == 0)) fire(s, it, s->t0_ns);
    }
    int rc = pthread_create(&s->thread, NULL, timer_main, s);
    s->thread_on = rc == 0;
    pthread_mutex_unlock(&s->mu);
    return rc == 0 ? 0 : mlm_fail(err, errlen, MLM_EIO, "fault schedule: cannot start its thread: %s", strerror(rc));
}

int faultsched_tokens(faultsched_t *s, int64_t tokens) {
    if (!s) return 0;
    pthread_mutex_lock(&s->mu);
    int fired = 0;
    if (tokens > s->tokens) s->tokens = tokens;
    const int64_t t = now_ns();
    for (int i = 0; !s->stopping && i < s->n_items; i++) {
        item_t *it = &s->items[i];
        if (it->state != ITEM_PENDING || it->e.after_tokens < 0 || it->e.after_tokens > s->tokens) continue;
        fire(s, it, t);
        fired++;
    }
    if (fired) pthread_cond_signal(&s->cv); // new deadlines (a freeze's end, a duty cycle)
    pthread_mutex_unlock(&s->mu);
    return fired;
}

int faultsched_ended(const faultsched_t *s) {
    if (!s) return 0;
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    const int n = s->ended;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
    return n;
}

void faultsched_stop(faultsched_t *s) {
    if (!s || !s->items) return;
    pthread_mutex_lock(&s->mu);
    const bool was = s->stopping;
    s->stopping = true;
    const int64_t t = now_ns();
    for (int i = 0; !was && i < s->n_items; i++)
        if (s->items[i].state == ITEM_ACTIVE) finish(s, &s->items[i], t);
    for (int i = 0; i < s->n_local; i++) { // whatever happened, nothing stays stopped
        wstate_t *w = &s->w[i];
        w->frozen = 0;
        w->slow = 0;
        apply(w);
    }
    pthread_cond_signal(&s->cv);
    const bool join = s->thread_on;
    s->thread_on = false;
    pthread_mutex_unlock(&s->mu);
    if (join) pthread_join(s->thread, NULL);
}

const faultsched_entry_t *faultsched_log(const faultsched_t *s, int *n) {
    if (!s) {
        *n = 0;
        return NULL;
    }
    pthread_mutex_lock((pthread_mutex_t *)&s->mu);
    *n = s->n_log;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mu);
    return s->log;
}

cJSON *faultsched_log_json(const faultsched_t *s) {
    cJSON *a = cJSON_CreateArray();
    int n = 0;
    const faultsched_entry_t *en = faultsched_log(s, &n);
    for (int i = 0; a && i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o) break;
        cJSON_AddNumberToObject(o, "t_ms", en[i].t_ms);
        cJSON_AddNumberToObject(o, "tokens", (double)en[i].tokens);
        cJSON_AddStringToObject(o, "kind", fault_kind_name(en[i].kind));
        if (en[i].worker > 0) cJSON_AddNumberToObject(o, "worker", en[i].worker);
        if (on_board(en[i].kind)) {
            char lb[32];
            link_text(&(fault_event_t){.a = en[i].a, .b = en[i].b}, lb, sizeof lb);
            cJSON_AddStringToObject(o, "link", lb);
        }
        if (en[i].kind != FAULT_KILL) cJSON_AddNumberToObject(o, "ms", en[i].dur_ms);
        cJSON_AddBoolToObject(o, "end", en[i].end);
        cJSON_AddBoolToObject(o, "ok", en[i].rc == 0);
        cJSON_AddStringToObject(o, "what", en[i].what);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

void faultsched_destroy(faultsched_t **self_p) {
    if (!self_p || !*self_p) return;
    faultsched_t *s = *self_p;
    if (s->spec && s->items && s->log) { // fully made: the lock and the condition exist
        faultsched_stop(s);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
    }
    for (int i = 0; i < s->n_local; i++)
        if (s->w[i].pidfd >= 0) close(s->w[i].pidfd);
    fault_board_destroy(&s->board);
    fault_free(&s->spec);
    free(s->items);
    free(s->log);
    free(s);
    *self_p = NULL;
}
