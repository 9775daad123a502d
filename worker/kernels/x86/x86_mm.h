// Packed weight layouts and activation-row extras shared by worker/matmul.c and the x86 matmul kernels.
#ifndef MESHLM_KERNELS_X86_MM_H
#define MESHLM_KERNELS_X86_MM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/kernels/quant.h"

// --- packed weight layouts (mm_weight_t.pack)
//
// MMP_Q4_0X16 / MMP_Q8_0X16: rows are padded with zero rows to a multiple of 16 and stored in
// groups of 16 rows; group g starts at packed + g * mmp_group_bytes(pack, nb) (64-byte aligned).
// A group is a run of block pairs (blocks 2p and 2p+1, 64-byte aligned, mmp_pair_bytes apart):
//   quants of block 2p, then of block 2p+1, QB bytes each: dword j of row i sits at (j*16 + i)*4,
//          where dword j holds qs[4j..4j+3] of that row's block (J = 4 for Q4_0, 8 for Q8_0);
//          Q8_0 bytes are stored as unsigned q + 128 (q ^ 0x80) so VNNI's u8 x s8 product applies.
//   scales of block 2p, then of block 2p+1: 16 f16 each, the block scale d of each of the 16 rows.
// With odd nb the last pair's second block is zero and never read. A zmm of 64 bytes thus holds one
// dword per row, so one vpdpbusd against a broadcast dword of the activation block advances all 16
// row sums at once; and decode reads each group (and a thread's run of groups) as one linear
// stream, scales included, which a single software prefetch pointer can run ahead of.
// Q4_0 outputs are one fma chain per row (llama.cpp's Q4_0_8x8 order). Q8_0 outputs keep
// vec_dot_q8_0's 8 float lanes per row: zmm j of a block is exactly integer lane j of the 16 rows,
// so a group keeps 8 accumulators (one per lane, 16 rows each) and sums them as hsum_float_8 does.

//
// MMP_Q4_KX16: Q4_K rows, padded and grouped by 16 the same way; a group is nb super-blocks of
// MMP_Q4K_SB_BYTES (a multiple of 64) each, the scales and mins already out of their 6-bit packing:
//   quants [8 L][4 j][16 rows][4]  at 0:    bytes qs[32j + 4L .. 32j + 4L + 3] of that row's
//          super-block (low nibbles: elements 64j + 4L.., sub-block 2j; high: 64j + 32 + 4L.., 2j + 1)
//   scales [8 c][16 rows] u8       at 2048: the 6-bit scale of sub-block c
//   mins   [4 k][16 rows][2] u8    at 2176: the 6-bit mins of sub-blocks 2k and 2k + 1
//   d      [16 rows] f16           at 2304, dmin [16 rows] f16 at 2336: the file's values
// A zmm of quants thus holds, for the 16 rows, the 4 elements that llama.cpp's x86 Q4_K dot
// product sums into integer lane L of sub-blocks 2j and 2j + 1, so the kernels keep its lanes per
// row; the 4 zmm of lane L are adjacent, as a kernel finishing one lane at a time reads them.
// (A super-block is 148 bytes per row against the file's 144: the scales and mins take a byte each.)
//
// MMP_Q5_KX16: Q5_K rows (AVX-512 table only): the Q4_K layout above with the low 4 bits in its
// quants, then the 5th bits, MMP_Q5K_SB_BYTES per super-block:
//   qh     [8 L][16 rows][4]       at 2368: bytes qh[4L .. 4L + 3] of that row (bit 2j of byte l: the
//          5th bit of element 64j + l, bit 2j + 1: of element 64j + 32 + l)
// so the same zmm of quants and one zmm of 5th bits give lane L of sub-blocks 2j and 2j + 1; the
// kernels keep llama.cpp's x86 Q5_K lanes and float order (the mins summed into one float).
//
// MMP_Q3_KX16: Q3_K rows (AVX-512 table only), padded and grouped by 16 likewise; a group is nb
// super-blocks of MMP_Q3K_SB_BYTES each, the 16 scales out of their 6-bit packing:
//   hmask  [8 l4][16 rows][4]      at 0:    bytes hmask[4 l4 .. 4 l4 + 3] of that row (bit 4h + j of
//          byte l: the high bit of element 128h + 32j + l; set means no -4 offset)
//   qs     [2 h][8 l4][16 rows][4] at 512:  bytes qs[32h + 4 l4 .. + 3] (bits 2j..2j+1 of byte l: the
//          low 2 bits of element 128h + 32j + l)
//   scales [16 s][16 rows] i8      at 1536: the scale of sub-block s (16 elements) minus 32
//   d      [16 rows] f16           at 1792, then 32 bytes of padding
// so that a zmm holds, for the 16 rows, 4 consecutive elements (one sub-block's) of both bit planes,
// and one vpdpbusd per plane against a broadcast dword of the activation advances all 16 row sums.
// Every Q3_K dot product (the reference, vec_dot on every table, these groups) is one fma chain per
// row: per super-block the exact integer sum of scale * q * x, times d_w * d_x, added with one fma.
// (116 bytes per row and super-block against the file's 110.)
//
// MMP_Q2_KX16: Q2_K rows (AVX-512 table only), grouped by 16 likewise, MMP_Q2K_SB_BYTES per super-block,
// byte for byte the file's content (84 bytes per row and super-block):
//   qs     [2 h][8 l4][16 rows][4] at 0:    bytes qs[32h + 4 l4 .. + 3] (bits 2j..2j+1 of byte l: element
//          128h + 32j + l, of sub-block 8h + 2j + (l4 >= 4))
//   scales [16 s][16 rows] u8      at 1024: the file's byte of sub-block s (scale low nibble, min high)
//   d      [16 rows] f16           at 1280, dmin [16 rows] f16 at 1312
// as the Q3_K low-bit plane: a zmm holds 4 elements of one sub-block per row for vpdpbusd. Every Q2_K dot
// product is one fma chain per row: per super-block the exact integer sum of scale * q * x times
// d_w * d_x, then the exact sum of min * (the sub-block's activation sum) times -d_x * dmin_w.

//
// MMP_Q4_1X16 / MMP_Q5_0X16 / MMP_Q5_1X16: Q4_1, Q5_0 and Q5_1 rows (AVX-512 table only), grouped by 16 as
// Q4_0's in runs of block pairs, mmp_legacy_pair_bytes apart (the file's bytes, moved):
//   quants of block 2p, then of 2p + 1 [4 j][16 rows][4], 256 bytes each: bytes qs[4j .. 4j + 3]
//          (low nibbles: elements 4j.., high nibbles: 16 + 4j..)
//   Q5: qh of block 2p, then 2p + 1 [16 rows][4], 64 bytes each (bit e: the 5th bit of element e)
//   d of block 2p, then 2p + 1 [16 rows] f16; Q4_1 / Q5_1: then m of both [16 rows] f16
// so a zmm of quants gives integer lanes j and 4 + j of 16 rows (vec_dot's lanes: elements 4L..4L+3),
// and the kernels keep the AVX2 vec_dot's 8 float lanes per row (and its separate sum of the mins).
// Q4_1 640, Q5_0 704, Q5_1 768 bytes per pair of 16 rows (the file's 640, 704, 768).

#define MMP_ROWS 16

enum {
    MMP_NONE = 0,   // plain rows in w->data
    MMP_Q4_0X16 = 1,
    MMP_Q8_0X16 = 2,
    MMP_Q4_KX16 = 3,
    MMP_Q3_KX16 = 4,
    MMP_Q5_KX16 = 5,
    MMP_Q2_KX16 = 6,
    MMP_Q4_1X16 = 7,
    MMP_Q5_0X16 = 8,
    MMP_Q5_1X16 = 9,
};

static inline bool mmp_is_legacy(int pack) { return pack == MMP_Q4_1X16 || pack == MMP_Q5_0X16 || pack == MMP_Q5_1X16; }

// Offsets within a pair of one MMP_Q4_1X16 / Q5_0X16 / Q5_1X16 group (above), and its size.
static inline size_t mmp_legacy_qh_off(void) { return 512; }
static inline size_t mmp_legacy_d_off(int pack) { return pack == MMP_Q4_1X16 ? 512 : 640; }
static inline size_t mmp_legacy_m_off(int pack) { return mmp_legacy_d_off(pack) + 64; }
static inline size_t mmp_legacy_pair_bytes(int pack) {
    return pack == MMP_Q4_1X16 ? 640 : pack == MMP_Q5_0X16 ? 704 : 768;
}

#define MMP_Q4K_SB_BYTES 2368 // bytes of one super-block of one MMP_Q4_KX16 group
#define MMP_Q4K_SCALES 2048   // offsets within it (above)
#define MMP_Q4K_MINS 2176
#define MMP_Q4K_D 2304
#define MMP_Q4K_DMIN 2336

#define MMP_Q5K_SB_BYTES 2880 // bytes of one super-block of one MMP_Q5_KX16 group (the Q4_K offsets, and:)
#define MMP_Q5K_QH 2368

#define MMP_Q3K_SB_BYTES 1856 // bytes of one super-block of one MMP_Q3_KX16 group
#define MMP_Q3K_HMASK 0       // offsets within it (above)
#define MMP_Q3K_QS 512
#define MMP_Q3K_SCALES 1536
#define MMP_Q3K_D 1792

#define MMP_Q2K_SB_BYTES 1344 // bytes of one super-block of one MMP_Q2_KX16 group
#define MMP_Q2K_SCALES 1024   // offsets within it (above; the quants at 0)
#define MMP_Q2K_D 1280
#define MMP_Q2K_DMIN 1312

// Bytes of the quants of one block of one 16-row group.
static inline size_t mmp_quant_bytes(int pack) { return pack == MMP_Q4_0X16 ? 256 : 512; }

// Bytes of one block pair of one 16-row group (quants and scales; a multiple of 64).
static inline size_t mmp_pair_bytes(int pack) { return 2 * mmp_quant_bytes(pack) + 4 * MMP_ROWS; }

// Bytes of one 16-row group with nb blocks (Q4_K: super-blocks) per row (a multiple of 64).
static inline size_t mmp_group_bytes(int pack, int64_t nb) {
    if (pack == MMP_Q4_KX16) return (size_t)nb * MMP_Q4K_SB_BYTES;
    if (pack == MMP_Q3_KX16) return (size_t)nb * MMP_Q3K_SB_BYTES;
    if (pack == MMP_Q5_KX16) return (size_t)nb * MMP_Q5K_SB_BYTES;
    if (pack == MMP_Q2_KX16) return (size_t)nb * MMP_Q2K_SB_BYTES;
    if (mmp_is_legacy(pack)) return (size_t)((nb + 1) / 2) * mmp_legacy_pair_bytes(pack);
    return (size_t)((nb + 1) / 2) * mmp_pair_bytes(pack);
}

// Quants (QB bytes) and scales (16 f16) of block b of the group at grp.
static inline const uint8_t *mmp_block_quants(int pack, const uint8_t *grp, int64_t b) {
    return grp + (size_t)(b >> 1) * mmp_pair_bytes(pack) + (size_t)(b & 1) * mmp_quant_bytes(pack);
}
static inline const uint8_t *mmp_block_scales(int pack, const uint8_t *grp, int64_t b) {
    return grp + (size_t)(b >> 1) * mmp_pair_bytes(pack) + 2 * mmp_quant_bytes(pack) + (size_t)(b & 1) * 2 * MMP_ROWS;
}

// --- activation rows for Q4_0 / Q8_0 / Q5_0 weights
//
// A standard Q8_0 row (nb blocks of 34 bytes), then at mmp_act_tail_off(nb) (4-byte aligned):
//   corr (nb, lanes) int32: Q4_0 weights (1 lane): -8 * sum(qs) (undoes the +8 of unsigned nibbles);
//                    Q8_0 weights (8 lanes): lane L of block b at 8b + L, -128 * sum(qs[4L..4L+3])
//                    (undoes the +128 of the stored bytes in integer lane L); Q5_0 weights (8 lanes):
//                    the same with -16 (undoes the +16 of its unsigned 5-bit values);
//   d    (nb) float: the block scale as float32, at mmp_act_d_off(nb, lanes).
// Rows are mmp_act_row_bytes(nb, lanes) apart (a multiple of 4) so every tail stays aligned.

#define MMP_Q8_LANES 8

static inline size_t mmp_act_tail_off(int64_t nb) { return ((size_t)nb * sizeof(block_q8_0) + 3) & ~(size_t)3; }
static inline size_t mmp_act_d_off(int64_t nb, int lanes) { return mmp_act_tail_off(nb) + (size_t)nb * 4 * lanes; }
static inline size_t mmp_act_row_bytes(int64_t nb, int lanes) { return mmp_act_d_off(nb, lanes) + (size_t)nb * 4; }

// --- kernels over one packed 16-row group
//
// y[t * ys + i] = dot(row i of the group, activation row t) for t < nt and every row i whose bit
// is set in mask; grp is the group's start, nb blocks per row, activation rows xs bytes apart
// (the layout above). Pure: reads grp and xq, writes only the selected y.
typedef void (*mmp_group_fn)(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt,
                             float *y, size_t ys, uint32_t mask);

// The token loop of a group kernel (mmp_group_fn) whose tiles take 2 to 4 tokens, TILE(xt, yt, NT), and
// whose one-token case is its decode, ONE(xt, yt): tiles of 4 tokens, then the rest in one tile or alone;
// xt and yt are the tile's first activation row and output row.
#define MMP_TILES_2_4(nt, xq, xs, y, ys, TILE, ONE)                                                                    \
    for (int t_ = 0; t_ < (nt);) {                                                                                   \
        const int left_ = (nt) - t_;                                                                                 \
        const uint8_t *xt_ = (xq) + (size_t)t_ * (xs);                                                               \
        float *yt_ = (y) + (size_t)t_ * (ys);                                                                        \
        if (left_ >= 4) TILE(xt_, yt_, 4), t_ += 4;                                                                  \
        else if (left_ == 3) TILE(xt_, yt_, 3), t_ += 3;                                                             \
        else if (left_ == 2) TILE(xt_, yt_, 2), t_ += 2;                                                             \
        else ONE(xt_, yt_), t_ += 1;                                                                                 \
    }

#ifdef MESHLM_HAVE_X86
// ng (1..4) full groups at g0 + k * gstride, one activation row, nb even (decode): y gets their 16 ng rows.
void mmp_q4_0x16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xr, float *y,
                             size_t pf);
// ng (1..2) full Q8_0 groups the same way (any nb).
void mmp_q8_0x16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xr, float *y,
                             size_t pf);
void mmp_q4_0x16_decn_avx2(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xr, float *y);
void mmp_q4_0x16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, uint32_t mask);
void mmp_q8_0x16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, uint32_t mask);
void mmp_q4_0x16_avx2(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                      size_t ys, uint32_t mask);

// MMP_Q4_KX16 groups (nb super-blocks) times plain Q8_K activation rows, each output the bits of the
// Q4_K vec_dot (q4k_avx512.c, q4k_avx2.c).
void mmp_q4_kx16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, uint32_t mask);
// The same for MMP_Q5_KX16 groups: the bits of the Q5_K vec_dot (q4k_avx512.c).
void mmp_q5_kx16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, uint32_t mask);
void mmp_q5_kx16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                             size_t pf);
// Decode (one activation row) over ng full groups gstride bytes apart, y[16 g + n]: the same bits,
// the stream prefetched pf bytes ahead but never past the last group.
void mmp_q4_kx16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                             size_t pf);
void mmp_q4_kx16_avx2(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                      size_t ys, uint32_t mask);

// MMP_Q3_KX16 groups (nb super-blocks) times plain Q8_K activation rows: the bits of every Q3_K dot
// product (one fma chain per row, see the layout above; q3k_avx512.c).
void mmp_q3_kx16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, uint32_t mask);
// MMP_Q4_1X16 / MMP_Q5_0X16 / MMP_Q5_1X16 groups (pack) times plain Q8_1 / Q8_0 / Q8_1 activation rows,
// each output the bits of that type's AVX2 vec_dot (legacy_avx512.c); decode over ng full groups likewise.
void mmp_legacy_avx512(int pack, const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                       size_t ys, uint32_t mask);
void mmp_legacy_decn_avx512(int pack, const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq,
                            float *y, size_t pf);

// MMP_Q2_KX16 groups the same way: the bits of every Q2_K dot product (q2k_avx512.c).
void mmp_q2_kx16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, uint32_t mask);
void mmp_q2_kx16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                             size_t pf);
// Decode (one activation row) over ng full groups gstride bytes apart, y[16 g + n]: the same bits,
// each stream prefetched pf bytes ahead but never past the last group.
void mmp_q3_kx16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                             size_t pf);

// Plain F32 / F16 / BF16 rows (weights and activations of the same type t, n elements each):
// y[t * ys + r] = dot(w row r, x row t) for r < nr, t < nt. tiled: one 16-lane fma chain per output
// (llamafile tinyBLAS's order, register-tiled rows x tokens); otherwise ggml_vec_dot_f32/f16's order.
// F16 decode (one token, not tiled) walks dec_rows rows per pass (4, else 1; kern_tune_t.f16_rows).
void mmp_float_avx512(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs,
                      int nt, float *y, size_t ys, int64_t n, bool tiled, int dec_rows);

// The same for F32 / F16 with AVX2 (two ymm per 16 lanes; same bits as mmp_float_avx512).
void mmp_float_avx2(qtype_t type, const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt,
                    float *y, size_t ys, int64_t n, bool tiled);

// Plain Q8_0 rows times one Q8_0 activation row x (n elements): y[r] for r < nr, each the bits of
// vec_dot_q8_0 (decode: several rows per pass share each activation block).
void mmv_q8_0_avx512(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, float *y, int64_t n);

// Plain Q8_0 rows times Q8_0 activation rows (n elements): y[t * ys + r] for r < nr, t < nt, each
// output in llama.cpp's vec_dot_q8_0 order (8 lanes, one fma chain), register-tiled 2 rows x 4 tokens.
void mmq_q8_0_avx512(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt, float *y,
                     size_t ys, int64_t n);

// Plain Q6_K rows times Q8_K activation rows (n elements): y[t * ys + r] for r < nr, t < nt, each the
// bits of vec_dot_q6_K; batches in tiles of 4 rows x up to 32 tokens (each super-block unpacked once
// per tile), one token dec_rows rows per pass (4, 2 or 1; kern_tune_t.q6_rows).
void mmq_q6_K_avx512(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt, float *y,
                     size_t ys, int64_t n, int dec_rows, int pf);

// The same batches with AVX2 (tiles of 4 rows x up to 32 tokens, same bits); nt >= 2.
void mmq_q6_K_avx2(const uint8_t *w, size_t wrow, int64_t nr, const uint8_t *x, size_t xs, int nt, float *y, size_t ys,
                   int64_t n);
#endif

#endif
