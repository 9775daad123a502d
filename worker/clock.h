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

#endif
