// Tensor element types (GGUF/ggml type ids), their block layouts, and the scalar reference kernels.
#ifndef MESHLM_QUANT_H
#define MESHLM_QUANT_H

#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/fp16.h"

// Type ids as stored in GGUF tensor infos. Values are fixed by the file format.
typedef enum {
    QT_F32 = 0,
    QT_F16 = 1,
    QT_Q4_0 = 2,
    QT_Q4_1 = 3,
    QT_Q5_0 = 6,
    QT_Q5_1 = 7,
    QT_Q8_0 = 8,
    QT_Q8_1 = 9,
    QT_Q2_K = 10,
    QT_Q3_K = 11,
    QT_Q4_K = 12,
    QT_Q5_K = 13,
    QT_Q6_K = 14,
    QT_Q8_K = 15,
    QT_I8 = 24,
    QT_I16 = 25,
    QT_I32 = 26,
    QT_I64 = 27,
    QT_F64 = 28,
    QT_BF16 = 30,
    QT_COUNT = 40, // one past the largest id any table here is indexed by
} qtype_t;

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK8_1 32
#define QK_K 256
#define K_SCALE_SIZE 12

// --- block layouts (byte-exact with the GGUF file format)

typedef struct {
    mlm_f16_t d;          // scale
    uint8_t qs[QK4_0 / 2];// nibbles: low = elements 0..15, high = 16..31
} block_q4_0;
static_assert(sizeof(block_q4_0) == 2 + 16, "block_q4_0 size");

typedef struct {
    mlm_f16_t d;          // scale
    mlm_f16_t m;          // min
    uint8_t qs[QK4_1 / 2];// nibbles as in q4_0
} block_q4_1;
static_assert(sizeof(block_q4_1) == 4 + 16, "block_q4_1 size");

typedef struct {
    mlm_f16_t d;          // scale
    uint8_t qh[4];        // 5th bit of each of the 32 elements
    uint8_t qs[QK5_0 / 2];// low 4 bits, as in q4_0
} block_q5_0;
static_assert(sizeof(block_q5_0) == 2 + 4 + 16, "block_q5_0 size");

typedef struct {
    mlm_f16_t d;          // scale
    mlm_f16_t m;          // min
    uint8_t qh[4];        // 5th bits
    uint8_t qs[QK5_1 / 2];// low 4 bits
} block_q5_1;
static_assert(sizeof(block_q5_1) == 4 + 4 + 16, "block_q5_1 size");

typedef struct {
    mlm_f16_t d;          // scale
    int8_t qs[QK8_0];     // values
} block_q8_0;
static_assert(sizeof(block_q8_0) == 2 + 32, "block_q8_0 size");

typedef struct {
    mlm_f16_t d;          // scale
    mlm_f16_t s;          // d * sum(qs)
    int8_t qs[QK8_1];     // values
} block_q8_1;
static_assert(sizeof(block_q8_1) == 4 + 32, "block_q8_1 size");

typedef struct {
    uint8_t scales[QK_K / 16]; // 4-bit scales (low) and mins (high)
    uint8_t qs[QK_K / 4];      // 2-bit quants
    mlm_f16_t d;               // super-block scale for scales
    mlm_f16_t dmin;            // super-block scale for mins
} block_q2_K;
static_assert(sizeof(block_q2_K) == 16 + 64 + 4, "block_q2_K size");

typedef struct {
    uint8_t hmask[QK_K / 8];   // high bit of each quant
    uint8_t qs[QK_K / 4];      // low 2 bits
    uint8_t scales[12];        // 6-bit scales, packed
    mlm_f16_t d;               // super-block scale
} block_q3_K;
static_assert(sizeof(block_q3_K) == 32 + 64 + 12 + 2, "block_q3_K size");

typedef struct {
    mlm_f16_t d;                   // super-block scale for scales
    mlm_f16_t dmin;                // super-block scale for mins
    uint8_t scales[K_SCALE_SIZE];  // 8 6-bit scales and 8 6-bit mins, packed
    uint8_t qs[QK_K / 2];          // 4-bit quants
} block_q4_K;
static_assert(sizeof(block_q4_K) == 4 + 12 + 128, "block_q4_K size");

typedef struct {
    mlm_f16_t d;                   // super-block scale for scales
    mlm_f16_t dmin;                // super-block scale for mins
    uint8_t scales[K_SCALE_SIZE];  // as in q4_K
    uint8_t qh[QK_K / 8];          // 5th bits
    uint8_t qs[QK_K / 2];          // low 4 bits
} block_q5_K;
static_assert(sizeof(block_q5_K) == 4 + 12 + 32 + 128, "block_q5_K size");

typedef struct {
    uint8_t ql[QK_K / 2];      // low 4 bits
    uint8_t qh[QK_K / 4];      // high 2 bits
    int8_t scales[QK_K / 16];  // 8-bit scales
    mlm_f16_t d;               // super-block scale
} block_q6_K;
static_assert(sizeof(block_q6_K) == 128 + 64 + 16 + 2, "block_q6_K size");

typedef struct {
    float d;                   // scale (float32, not half)
    int8_t qs[QK_K];           // values
    int16_t bsums[QK_K / 16];  // sum of each group of 16 values
} block_q8_K;
static_assert(sizeof(block_q8_K) == 4 + 256 + 32, "block_q8_K size");

// --- type traits

typedef struct {
    const char *name;       // "F32", "Q4_0", ...
    int64_t blck;           // elements per block (1 for plain types)
    size_t type_size;       // bytes per block
    qtype_t vec_dot_type;   // type activations are converted to for a dot product with this type
    bool has_kernels;       // dequantize + vec_dot exist (a weight of this type can be computed with)
    bool can_quantize;      // quant_quantize_ref accepts it as a target
} qtype_traits_t;

// Traits of a type id, or NULL for an id that is unknown or not a valid GGUF tensor type.
const qtype_traits_t *qtype_traits(int type);
// Name of a type id ("Q4_K"), or "unknown".
const char *qtype_name(int type);
// Type id for a name (case-insensitive, "q4_0"), or -1.
int qtype_from_name(const char *name);
// Bytes for n elements of type t; n must be a multiple of the block size (returns 0 otherwise).
size_t qtype_row_size(qtype_t t, int64_t n);

// --- scalar reference kernels: the test oracle for every SIMD path

// Expands n elements (a multiple of the block size) of type t at src into float32.
void quant_dequantize_ref(qtype_t t, const void *src, float *dst, int64_t n);

// Quantizes n floats into type t (a multiple of the block size). Activation types Q8_0, Q8_1
// and Q8_K round exactly as llama.cpp's reference does. Returns 0, or MLM_EUNSUPPORTED.
int quant_quantize_ref(qtype_t t, const float *src, void *dst, int64_t n);

// *s = dot(w, x) over n elements, where w has type t and x has type qtype_traits(t)->vec_dot_type.
void quant_vec_dot_ref(qtype_t t, int64_t n, float *s, const void *w, const void *x);

#endif
