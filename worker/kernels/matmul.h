// Matrix products of a weight matrix (any type) with a batch of activation rows.
#ifndef MESHLM_MATMUL_H
#define MESHLM_MATMUL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/kernels/kernels.h"
#include "worker/kernels/quant.h"

// One weight matrix: rows output features, each a row of cols input features (ggml ne[1] x ne[0]).
typedef struct mm_weight {
    qtype_t type;          // element type of data
    int64_t rows;          // output features
    int64_t cols;          // input features
    size_t row_bytes;      // bytes of one row in data
    const uint8_t *data;   // (rows, row_bytes), borrowed (usually the GGUF mapping), or copy
    void *packed;          // kernel-specific repacked copy, owned; NULL when not repacked
    size_t packed_map;     // bytes mapped for packed (a large copy is its own mapping), 0 = heap memory
    int pack;              // 0 = plain rows; otherwise the layout id of packed
    int64_t row_align;     // split rows between threads at multiples of this (>= 1)
    void *copy;            // (rows, row_bytes) plain rows copied into huge pages (mm_weight_copy_huge),
                           // owned; data points at it; NULL = data is borrowed
    size_t copy_map;       // bytes mapped for copy, 0 = heap memory
} mm_weight_t;

// Copies a matrix that computes from its file's rows (not repacked) into 2 MB-aligned memory with a
// transparent-huge-page hint, and computes from the copy from then on (the same bytes, so the same
// bits): decode then streams it without a TLB miss and a hardware-prefetcher restart at every 4 KB
// page of the file mapping. Matrices under 2 MB, repacked ones and copies are left as they are.
// 0, or MLM_ENOMEM (w unchanged). mm_weight_release frees the copy.
int mm_weight_copy_huge(mm_weight_t *w);

// Describes data as a weight; with repack, a kernel may copy it into a faster layout (then the
// matrix no longer reads data). Returns 0, MLM_EUNSUPPORTED for a type without kernels, MLM_ENOMEM.
int mm_weight_init(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols,
                   const void *data, bool repack);

// mm_weight_init with repack, taking the rows this matrix shares with prev from prev's repacked copy
// instead of data: row r of this matrix is row r - shift of prev (shift may be negative). Whole
// 16-row groups that line up are copied; other shared rows are unpacked from prev and packed again;
// the rest are read from data, which must describe every row all the same. The result is the same
// bytes mm_weight_init would make (prev must hold the same rows of the same tensor). Without a
// usable prev (NULL, not repacked, another type, cols or layout, no row in common) it is
// mm_weight_init. *reused (may be NULL) receives the rows taken from prev. Same returns.
int mm_weight_init_from(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols,
                        const void *data, const mm_weight_t *prev, int64_t shift, int64_t *reused);

// mm_weight_init_from that takes prev's repacked copy over instead of copying from it (prev then
// computes from its plain rows, prev->data): the copy's memory grows or shrinks in place and the rows
// in common move within it, so no memory is cleared or copied for them. The same bytes as
// mm_weight_init_from; it is used instead when prev's copy is not its own mapping, prev has no plain
// rows, or shift is not a multiple of 16 rows. Same returns.
int mm_weight_init_take(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols,
                        const void *data, mm_weight_t *prev, int64_t shift, int64_t *reused);

// Frees the repacked copy, if any. Accepts a zeroed struct.
void mm_weight_release(mm_weight_t *w);

// Copies row r (0 <= r < rows) of w in its file encoding (row_bytes bytes of type's blocks) to out,
// from the plain rows or back out of the repacked copy: the row the products multiply with. For
// checks and tools (a row at a time, not fast).
void mm_weight_get_row(const mm_weight_t *w, int64_t r, void *out);

// Activation type used with weights of type wtype, and the bytes of one activation row.
qtype_t mm_act_type(qtype_t wtype);
size_t mm_act_row_bytes(qtype_t wtype, int64_t cols);

// Converts one float row x (cols) into the activation type for wtype, at xq.
void mm_quantize_act(const kernels_t *k, qtype_t wtype, const float *x, void *xq, int64_t cols);

// y[t * y_stride + r] = dot(row r of w, activation row t) for r in [r0, r1) and t in [0, nt).
// xq holds nt activation rows, xq_stride bytes apart. Pure: no allocation, no I/O.
void mm_rows(const kernels_t *k, const mm_weight_t *w, const void *xq, size_t xq_stride, int nt,
             float *y, size_t y_stride, int64_t r0, int64_t r1);

// mm_rows giving every token the bits of a product of its row alone (nt = 1): the batched products of
// F32/F16/BF16 and (AVX-512) Q8_0 sum in another order than a single token's, so those are computed a
// token at a time; every other product already gives each (row, token) the same bits at any nt and
// runs batched. Used to replay decode steps as one chunk (the KV cache then holds the same bits).
void mm_rows_one_order(const kernels_t *k, const mm_weight_t *w, const void *xq, size_t xq_stride, int nt, float *y,
                       size_t y_stride, int64_t r0, int64_t r1);

#endif
