// Seeded, repeatable random numbers (splitmix64): generated models, benchmark inputs, tests.
#ifndef MESHLM_RNG_H
#define MESHLM_RNG_H

#include <stdint.h>

// The splitmix64 finaliser: a bijective 64-bit mix.
static inline uint64_t mlm_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// The next number of the sequence whose state is *s.
static inline uint64_t mlm_rng_next(uint64_t *s) { return mlm_mix64(*s += 0x9e3779b97f4a7c15ULL); }

#endif
