// Monotonic time for deadlines and measurements.
#ifndef MESHLM_CLOCK_H
#define MESHLM_CLOCK_H

#include <stdint.h>
#include <time.h>

// Microseconds on the monotonic clock.
static inline int64_t mlm_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

// Milliseconds on the monotonic clock, with fractions.
static inline double mlm_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

// --- deadlines: an absolute time in microseconds on the monotonic clock, or -1 for none

// The deadline timeout_ms from now; a negative timeout means none (-1).
static inline int64_t mlm_deadline(int timeout_ms) {
    return timeout_ms < 0 ? -1 : mlm_now_us() + (int64_t)timeout_ms * 1000;
}

// Milliseconds left until deadline dl, rounded up: -1 for none, 0 once it has passed.
static inline int mlm_left_ms(int64_t dl) {
    if (dl < 0) return -1;
    int64_t r = dl - mlm_now_us();
    if (r <= 0) return 0;
    r = (r + 999) / 1000;
    return r > 0x7fffffff ? 0x7fffffff : (int)r;
}

// Whether deadline dl has passed (never for -1).
static inline int mlm_passed(int64_t dl) { return dl >= 0 && mlm_now_us() >= dl; }

#endif
