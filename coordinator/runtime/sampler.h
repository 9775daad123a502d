// Token sampler: repetition penalty, top-k, top-p, min-p, temperature, then a seeded draw.
#ifndef MESHLM_SAMPLER_H
#define MESHLM_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    float temp;             // softmax temperature; <= 0 means greedy (argmax)
    int top_k;              // keep the k most likely tokens; <= 0 or >= n_vocab keeps all
    float top_p;            // keep the smallest prefix whose probability sum reaches top_p; >= 1 keeps all
    float min_p;            // keep tokens with p >= min_p * p_max; <= 0 keeps all
    float repeat_penalty;   // 1.0 is off; positive logits of recent tokens are divided, negative multiplied
    int repeat_last_n;      // how many accepted tokens the penalty looks back over; <= 0 is off
    uint64_t seed;          // PRNG seed: same seed and same logits give the same tokens
    bool greedy;            // always take the argmax (lowest id wins ties)
} sampler_params_t;

#define SAMPLER_DEFAULT_SEED 0x5eed1234abcdULL

typedef struct sampler sampler_t;

// temp 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.0 (off), repeat_last_n 64,
// seed SAMPLER_DEFAULT_SEED, greedy false.
sampler_params_t sampler_params_default(void);

// A sampler over a vocabulary of n_vocab tokens; all buffers are allocated here, none later.
// Returns NULL if n_vocab <= 0, p is NULL or has a NaN field, or allocation fails.
sampler_t *sampler_new(const sampler_params_t *p, int n_vocab);

// Frees; accepts NULL and NULLs the pointer.
void sampler_destroy(sampler_t **self_p);

// Picks the next token from logits (n_vocab floats, borrowed, not modified). NaN logits count
// as -inf. Returns a token id in [0, n_vocab), or MLM_EINVAL if s or logits is NULL.
// Does not record the token: call sampler_accept with the token actually used.
int32_t sampler_sample(sampler_t *s, const float *logits);

// Records tok in the history the repetition penalty looks at (ids outside the vocab are ignored).
void sampler_accept(sampler_t *s, int32_t tok);

// Forgets the history and restarts the PRNG from the seed, so the same logits replay the same tokens.
void sampler_reset(sampler_t *s);

#endif
