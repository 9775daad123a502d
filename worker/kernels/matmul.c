// Matrix products: weight setup (with optional repacking into 16-row groups) and the per-ISA row loops.
#include "worker/kernels/matmul.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/err.h"
#include "worker/kernels/x86/x86_mm.h"
#ifdef MESHLM_HAVE_NEON
#include "worker/kernels/arm/arm.h"
#endif

// --- helpers

static inline bool is_float_type(qtype_t t) { return t == QT_F32 || t == QT_F16 || t == QT_BF16; }

static bool isa_is(const kernels_t *k, const char *name) { return k && k->isa && strcmp(k->isa, name) == 0; }

// Layout a weight of this type is repacked into for kernel table k, or MMP_NONE. Q4_0 is repacked as
// llama.cpp does (its Q4_0_8x8 kernels sum each output in one fma chain, which the 16-row groups
// reproduce). Q4_K is repacked (x86 builds only) into 16-row groups with the scales and mins unpacked,
// whose kernels keep the per-row integer lanes and float order of its vec_dot (x86_mm.h). Q8_0 is
// repacked for the AVX-512 table, whose group kernel keeps vec_dot_q8_0's 8 float lanes per row (8
// accumulators per group); other tables keep plain rows (the scalar group kernel would be slower).
// Q3_K is repacked for the AVX-512 table too (its row-by-row vec_dot decoded at a fifth of the read
// bandwidth); every Q3_K product is one fma chain per row, so repacked and plain rows agree bit for bit.
// Q5_K too (AVX-512): Q4_K's groups plus a plane of 5th bits, with the Q5_K vec_dot's bits. And Q2_K
// (AVX-512): the file's bytes regrouped, every Q2_K product one fma chain per row like Q3_K's. And the
// legacy Q4_1, Q5_0, Q5_1 (AVX-512), whose group kernels keep the AVX2 vec_dot's lanes and order.
static int pack_for_type(qtype_t t, const kernels_t *k) {
    if (t == QT_Q4_0) return MMP_Q4_0X16;
#ifdef MESHLM_HAVE_X86
    if (t == QT_Q4_K) return MMP_Q4_KX16;
    if (t == QT_Q8_0 && isa_is(k, "avx512")) return MMP_Q8_0X16;
    if (t == QT_Q3_K && isa_is(k, "avx512")) return MMP_Q3_KX16;
    if (t == QT_Q5_K && isa_is(k, "avx512")) return MMP_Q5_KX16;
    if (t == QT_Q2_K && isa_is(k, "avx512")) return MMP_Q2_KX16;
    if (t == QT_Q4_1 && isa_is(k, "avx512")) return MMP_Q4_1X16;
    if (t == QT_Q5_0 && isa_is(k, "avx512")) return MMP_Q5_0X16;
    if (t == QT_Q5_1 && isa_is(k, "avx512")) return MMP_Q5_1X16;
#endif
    (void)k;
    return MMP_NONE;
}

// Activation rows for these weight types carry the per-block tail of x86_mm.h (for Q8_0 whatever the
// table, so activation bytes stay the same on every ISA), with this many corrections per block.
static bool act_has_tail(qtype_t wtype) { return wtype == QT_Q4_0 || wtype == QT_Q8_0 || wtype == QT_Q5_0; }
static int act_lanes(qtype_t wtype) { return wtype == QT_Q8_0 || wtype == QT_Q5_0 ? MMP_Q8_LANES : 1; }

static float f16_at(const uint8_t *p) {
    mlm_f16_t h;
    memcpy(&h, p, 2);
    return mlm_f16_to_f32(h);
}

// --- helpers: the Q4_K layout (MMP_Q4_KX16)

// The 8 6-bit scales and mins of a Q4_K scales array (llama.cpp's get_scale_min_k4 for j = 0..7).
static void q4_k_scales_get(const uint8_t *s, uint8_t *sc, uint8_t *mn) { // s: (12); sc, mn: (8)
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

// Inverse of q4_k_scales_get (values 0..63): the file's 12 bytes.
static void q4_k_scales_put(const uint8_t *sc, const uint8_t *mn, uint8_t *s) { // sc, mn: (8); s: (12)
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
    }
}

// Writes row i of a Q4_K (or Q5_K: q5) group (grp, nb super-blocks) from the row's file encoding.
static void q4_k_pack_row(uint8_t *grp, int64_t nb, int i, const uint8_t *row, bool q5) {
    const size_t bb = q5 ? sizeof(block_q5_K) : sizeof(block_q4_K), sbb = q5 ? MMP_Q5K_SB_BYTES : MMP_Q4K_SB_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        const block_q4_K *blk = (const block_q4_K *)(row + (size_t)b * bb); // d, dmin, scales: the same in Q5_K
        const uint8_t *qs = q5 ? ((const block_q5_K *)blk)->qs : blk->qs;
        uint8_t *sb = grp + (size_t)b * sbb;
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 8; l++) memcpy(sb + (size_t)((l * 4 + j) * MMP_ROWS + i) * 4, qs + 32 * j + 4 * l, 4);
        if (q5)
            for (int l = 0; l < 8; l++) memcpy(sb + MMP_Q5K_QH + (size_t)(l * MMP_ROWS + i) * 4, ((const block_q5_K *)blk)->qh + 4 * l, 4);
        uint8_t sc[8], mn[8]; // (sub-block) 6-bit scales and mins
        q4_k_scales_get(blk->scales, sc, mn);
        for (int c = 0; c < 8; c++) sb[MMP_Q4K_SCALES + c * MMP_ROWS + i] = sc[c];
        for (int c = 0; c < 8; c++) sb[MMP_Q4K_MINS + ((c / 2) * MMP_ROWS + i) * 2 + c % 2] = mn[c];
        memcpy(sb + MMP_Q4K_D + 2 * i, &blk->d, 2);
        memcpy(sb + MMP_Q4K_DMIN + 2 * i, &blk->dmin, 2);
    }
}

// The file encoding of row i of a Q4_K (Q5_K) group (the inverse of q4_k_pack_row).
static void q4_k_unpack_row(const uint8_t *grp, int64_t nb, int i, uint8_t *row, bool q5) {
    const size_t bb = q5 ? sizeof(block_q5_K) : sizeof(block_q4_K), sbb = q5 ? MMP_Q5K_SB_BYTES : MMP_Q4K_SB_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        block_q4_K *blk = (block_q4_K *)(row + (size_t)b * bb);
        uint8_t *qs = q5 ? ((block_q5_K *)blk)->qs : blk->qs;
        const uint8_t *sb = grp + (size_t)b * sbb;
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 8; l++) memcpy(qs + 32 * j + 4 * l, sb + (size_t)((l * 4 + j) * MMP_ROWS + i) * 4, 4);
        if (q5)
            for (int l = 0; l < 8; l++) memcpy(((block_q5_K *)blk)->qh + 4 * l, sb + MMP_Q5K_QH + (size_t)(l * MMP_ROWS + i) * 4, 4);
        uint8_t sc[8], mn[8]; // (sub-block) 6-bit scales and mins
        for (int c = 0; c < 8; c++) sc[c] = sb[MMP_Q4K_SCALES + c * MMP_ROWS + i];
        for (int c = 0; c < 8; c++) mn[c] = sb[MMP_Q4K_MINS + ((c / 2) * MMP_ROWS + i) * 2 + c % 2];
        q4_k_scales_put(sc, mn, blk->scales);
        memcpy(&blk->d, sb + MMP_Q4K_D + 2 * i, 2);
        memcpy(&blk->dmin, sb + MMP_Q4K_DMIN + 2 * i, 2);
    }
}

// Portable kernel over one Q4_K group (the scalar table's path): per row and token the integer lanes
// and float order of the Q4_K vec_dot (8 lanes, lane L = elements 4L..4L+3 of every 32-element
// sub-block times its scale; the mins in 4 lanes of sub-block pairs; then their sums in its order).
// q5: a Q5_K group, its 5th bits added (16 each) and its mins summed into one float, as its vec_dot.
static void group_q4_k_scalar(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                              size_t ys, uint32_t mask, bool q5) {
    for (int t = 0; t < nt; t++) {
        const block_q8_K *x = (const block_q8_K *)(xq + (size_t)t * xs); // (nb)
        for (int i = 0; i < MMP_ROWS; i++) {
            if (!(mask >> i & 1u)) continue;
            float acc[8] = {0}, accm[4] = {0}, summs = 0.0f; // (lane) float lanes, (pair) min lanes, Q5_K's
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *sb = grp + (size_t)b * (q5 ? MMP_Q5K_SB_BYTES : MMP_Q4K_SB_BYTES);
                const float d = x[b].d * f16_at(sb + MMP_Q4K_D + 2 * i);
                const float dmin = -x[b].d * f16_at(sb + MMP_Q4K_DMIN + 2 * i);
                for (int l = 0; l < 8; l++) {
                    int32_t lane = 0;
                    for (int j = 0; j < 4; j++) {
                        const uint8_t *q = sb + (size_t)((l * 4 + j) * MMP_ROWS + i) * 4;
                        const int8_t *xl = x[b].qs + 64 * j + 4 * l, *xh = xl + 32;
                        const uint8_t *qh = sb + MMP_Q5K_QH + (size_t)(l * MMP_ROWS + i) * 4;
                        int32_t lo = 0, hi = 0;
                        for (int e = 0; e < 4; e++) {
                            lo += ((q[e] & 15) + (q5 && (qh[e] >> (2 * j) & 1) ? 16 : 0)) * xl[e];
                            hi += ((q[e] >> 4) + (q5 && (qh[e] >> (2 * j + 1) & 1) ? 16 : 0)) * xh[e];
                        }
                        lane += sb[MMP_Q4K_SCALES + (2 * j) * MMP_ROWS + i] * lo +
                                sb[MMP_Q4K_SCALES + (2 * j + 1) * MMP_ROWS + i] * hi;
                    }
                    acc[l] = fmaf(d, (float)lane, acc[l]);
                }
                int32_t mall = 0;
                for (int k = 0; k < 4; k++) {
                    const uint8_t *m = sb + MMP_Q4K_MINS + (size_t)(k * MMP_ROWS + i) * 2;
                    const int32_t s0 = x[b].bsums[4 * k] + x[b].bsums[4 * k + 1];
                    const int32_t s1 = x[b].bsums[4 * k + 2] + x[b].bsums[4 * k + 3];
                    accm[k] = fmaf(dmin, (float)(m[0] * s0 + m[1] * s1), accm[k]);
                    mall += m[0] * s0 + m[1] * s1;
                }
                summs = fmaf(dmin, (float)mall, summs);
            }
            const float r = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
            y[(size_t)t * ys + i] = q5 ? r + summs : r + ((accm[0] + accm[2]) + (accm[1] + accm[3]));
        }
    }
}

// --- helpers: the Q3_K layout (MMP_Q3_KX16)

// The 16 6-bit scales of a Q3_K scales array, biased by 32 (values 0..63).
static void q3_k_scales_get(const uint8_t *s, uint8_t *sc) { // s: (12); sc: (16)
    for (int i = 0; i < 16; i++) {
        const int lo = i < 8 ? (s[i] & 0xF) : (s[i - 8] >> 4);
        const int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        sc[i] = (uint8_t)(lo | (hi << 4));
    }
}

// Inverse of q3_k_scales_get.
static void q3_k_scales_put(const uint8_t *sc, uint8_t *s) { // sc: (16); s: (12)
    memset(s, 0, 12);
    for (int i = 0; i < 16; i++) {
        if (i < 8) s[i] |= (uint8_t)(sc[i] & 0xF);
        else s[i - 8] |= (uint8_t)((sc[i] & 0xF) << 4);
        s[8 + i % 4] |= (uint8_t)(((sc[i] >> 4) & 3) << (2 * (i / 4)));
    }
}

// Writes row i of a Q3_K group (grp, nb super-blocks) from the row's file encoding.
static void q3_k_pack_row(uint8_t *grp, int64_t nb, int i, const uint8_t *row) {
    for (int64_t b = 0; b < nb; b++) {
        const block_q3_K *blk = (const block_q3_K *)row + b;
        uint8_t *sb = grp + (size_t)b * MMP_Q3K_SB_BYTES, sc[16];
        for (int l4 = 0; l4 < 8; l4++) memcpy(sb + MMP_Q3K_HMASK + (size_t)(l4 * MMP_ROWS + i) * 4, blk->hmask + 4 * l4, 4);
        for (int h = 0; h < 2; h++)
            for (int l4 = 0; l4 < 8; l4++)
                memcpy(sb + MMP_Q3K_QS + (size_t)((h * 8 + l4) * MMP_ROWS + i) * 4, blk->qs + 32 * h + 4 * l4, 4);
        q3_k_scales_get(blk->scales, sc);
        for (int c = 0; c < 16; c++) sb[MMP_Q3K_SCALES + c * MMP_ROWS + i] = (uint8_t)(sc[c] - 32);
        memcpy(sb + MMP_Q3K_D + 2 * i, &blk->d, 2);
    }
}

// The file encoding of row i of a Q3_K group (the inverse of q3_k_pack_row).
static void q3_k_unpack_row(const uint8_t *grp, int64_t nb, int i, uint8_t *row) {
    for (int64_t b = 0; b < nb; b++) {
        block_q3_K *blk = (block_q3_K *)row + b;
        const uint8_t *sb = grp + (size_t)b * MMP_Q3K_SB_BYTES;
        uint8_t sc[16];
        for (int l4 = 0; l4 < 8; l4++) memcpy(blk->hmask + 4 * l4, sb + MMP_Q3K_HMASK + (size_t)(l4 * MMP_ROWS + i) * 4, 4);
        for (int h = 0; h < 2; h++)
            for (int l4 = 0; l4 < 8; l4++)
                memcpy(blk->qs + 32 * h + 4 * l4, sb + MMP_Q3K_QS + (size_t)((h * 8 + l4) * MMP_ROWS + i) * 4, 4);
        for (int c = 0; c < 16; c++) sc[c] = (uint8_t)(sb[MMP_Q3K_SCALES + c * MMP_ROWS + i] + 32);
        q3_k_scales_put(sc, blk->scales);
        memcpy(&blk->d, sb + MMP_Q3K_D + 2 * i, 2);
    }
}

// One super-block (sb) of row i of a Q2_K or Q3_K group against activation super-block x, added to acc.
typedef float (*k_sb_step_fn)(const uint8_t *sb, int i, const block_q8_K *x, float acc);

// Portable kernel over one Q2_K or Q3_K group (nb super-blocks of sbb bytes): every selected row and token
// through step, super-block by super-block.
static void group_k_scalar(const uint8_t *grp, int64_t nb, size_t sbb, k_sb_step_fn step, const uint8_t *xq, size_t xs,
                           int nt, float *y, size_t ys, uint32_t mask) {
    for (int t = 0; t < nt; t++) {
        const block_q8_K *x = (const block_q8_K *)(xq + (size_t)t * xs); // (nb)
        for (int i = 0; i < MMP_ROWS; i++) {
            if (!(mask >> i & 1u)) continue;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) acc = step(grp + (size_t)b * sbb, i, &x[b], acc);
            y[(size_t)t * ys + i] = acc;
        }
    }
}

// Q3_K: the super-block's exact integer sum of scale * q * x (q = low bits - 4 unless the high bit is
// set), times d_w * d_x, added with one fma.
static float q3_k_sb_step(const uint8_t *sb, int i, const block_q8_K *x, float acc) {
    int32_t isum = 0;
    for (int e = 0; e < QK_K; e++) {
        const int h = e / 128, j = (e % 128) / 32, l = e % 32;
        const uint8_t qb = sb[MMP_Q3K_QS + ((h * 8 + l / 4) * MMP_ROWS + i) * 4 + l % 4];
        const uint8_t hb = sb[MMP_Q3K_HMASK + ((l / 4) * MMP_ROWS + i) * 4 + l % 4];
        const int q = ((qb >> (2 * j)) & 3) - ((hb >> (4 * h + j)) & 1 ? 0 : 4);
        isum += (int8_t)sb[MMP_Q3K_SCALES + (e / 16) * MMP_ROWS + i] * q * x->qs[e];
    }
    return fmaf(x->d * f16_at(sb + MMP_Q3K_D + 2 * i), (float)isum, acc);
}

// --- helpers: the Q2_K layout (MMP_Q2_KX16)

// Writes row i of a Q2_K group (grp, nb super-blocks) from the row's file encoding (the same bytes, moved).
static void q2_k_pack_row(uint8_t *grp, int64_t nb, int i, const uint8_t *row) {
    for (int64_t b = 0; b < nb; b++) {
        const block_q2_K *blk = (const block_q2_K *)row + b;
        uint8_t *sb = grp + (size_t)b * MMP_Q2K_SB_BYTES;
        for (int hl = 0; hl < 16; hl++) memcpy(sb + (size_t)(hl * MMP_ROWS + i) * 4, blk->qs + 4 * hl, 4); // h * 8 + l4
        for (int c = 0; c < 16; c++) sb[MMP_Q2K_SCALES + c * MMP_ROWS + i] = blk->scales[c];
        memcpy(sb + MMP_Q2K_D + 2 * i, &blk->d, 2);
        memcpy(sb + MMP_Q2K_DMIN + 2 * i, &blk->dmin, 2);
    }
}

// The file encoding of row i of a Q2_K group (the inverse of q2_k_pack_row).
static void q2_k_unpack_row(const uint8_t *grp, int64_t nb, int i, uint8_t *row) {
    for (int64_t b = 0; b < nb; b++) {
        block_q2_K *blk = (block_q2_K *)row + b;
        const uint8_t *sb = grp + (size_t)b * MMP_Q2K_SB_BYTES;
        for (int hl = 0; hl < 16; hl++) memcpy(blk->qs + 4 * hl, sb + (size_t)(hl * MMP_ROWS + i) * 4, 4);
        for (int c = 0; c < 16; c++) blk->scales[c] = sb[MMP_Q2K_SCALES + c * MMP_ROWS + i];
        memcpy(&blk->d, sb + MMP_Q2K_D + 2 * i, 2);
        memcpy(&blk->dmin, sb + MMP_Q2K_DMIN + 2 * i, 2);
    }
}

// Q2_K: the super-block's exact integer sums of scale * q * x and of min * (the sub-block's activation
// sum), added with an fma each.
static float q2_k_sb_step(const uint8_t *sb, int i, const block_q8_K *x, float acc) {
    int32_t isum = 0, msum = 0;
    for (int e = 0; e < QK_K; e++) {
        const int h = e / 128, j = (e % 128) / 32, l = e % 32;
        const uint8_t qb = sb[((h * 8 + l / 4) * MMP_ROWS + i) * 4 + l % 4];
        isum += (sb[MMP_Q2K_SCALES + (e / 16) * MMP_ROWS + i] & 15) * ((qb >> (2 * j)) & 3) * x->qs[e];
    }
    for (int c = 0; c < 16; c++) msum += (sb[MMP_Q2K_SCALES + c * MMP_ROWS + i] >> 4) * x->bsums[c];
    acc = fmaf(x->d * f16_at(sb + MMP_Q2K_D + 2 * i), (float)isum, acc);
    return fmaf(-x->d * f16_at(sb + MMP_Q2K_DMIN + 2 * i), (float)msum, acc);
}

// --- helpers: the Q4_1 / Q5_0 / Q5_1 layout (MMP_Q4_1X16, MMP_Q5_0X16, MMP_Q5_1X16)

// Where block b of row i of a legacy group keeps its fields: quants (16 bytes as 4 dwords 64 apart),
// qh (Q5), d and m (Q4_1 / Q5_1), and the same fields in a file block of that type.
typedef struct {
    size_t qs, qh, d, m;
} legacy_at_t;

static legacy_at_t legacy_group_at(int pack, int64_t b, int i) {
    const size_t p = (size_t)(b >> 1) * mmp_legacy_pair_bytes(pack), h = (size_t)(b & 1);
    return (legacy_at_t){p + h * 256 + (size_t)i * 4, p + mmp_legacy_qh_off() + h * 64 + (size_t)i * 4,
                         p + mmp_legacy_d_off(pack) + h * 32 + (size_t)i * 2, p + mmp_legacy_m_off(pack) + h * 32 + (size_t)i * 2};
}

static legacy_at_t legacy_file_at(qtype_t t) {
    if (t == QT_Q4_1) return (legacy_at_t){offsetof(block_q4_1, qs), 0, offsetof(block_q4_1, d), offsetof(block_q4_1, m)};
    if (t == QT_Q5_0) return (legacy_at_t){offsetof(block_q5_0, qs), offsetof(block_q5_0, qh), offsetof(block_q5_0, d), 0};
    return (legacy_at_t){offsetof(block_q5_1, qs), offsetof(block_q5_1, qh), offsetof(block_q5_1, d), offsetof(block_q5_1, m)};
}

// Moves row i of a legacy group between the group and the row's file encoding: unpack = group (src) to
// row (dst), else row (src) to group (dst).
static void legacy_move_row(int pack, qtype_t t, int64_t nb, int i, uint8_t *dst, const uint8_t *src, bool unpack) {
    const size_t bs = qtype_traits(t)->type_size;
    const legacy_at_t f = legacy_file_at(t);
    const bool q5 = pack != MMP_Q4_1X16, min = pack != MMP_Q5_0X16;
    for (int64_t b = 0; b < nb; b++) {
        const legacy_at_t g = legacy_group_at(pack, b, i);
        const size_t o = (size_t)b * bs;
#define LEG_MOVE(go, fo, n) (unpack ? memcpy(dst + o + (fo), src + (go), (n)) : memcpy(dst + (go), src + o + (fo), (n)))
        for (int j = 0; j < 4; j++) LEG_MOVE(g.qs + (size_t)j * 64, f.qs + 4 * (size_t)j, 4);
        if (q5) LEG_MOVE(g.qh, f.qh, 4);
        LEG_MOVE(g.d, f.d, 2);
        if (min) LEG_MOVE(g.m, f.m, 2);
#undef LEG_MOVE
    }
}

// Portable kernel over one legacy group: each row back in its file encoding through the table's vec_dot
// (the groups are only made for the AVX-512 table, whose group kernels give the same bits).
static void group_legacy_scalar(const kernels_t *k, int pack, qtype_t t, const uint8_t *grp, int64_t nb,
                                const uint8_t *xq, size_t xs, int nt, float *y, size_t ys, uint32_t mask) {
    uint8_t *row = malloc((size_t)nb * qtype_traits(t)->type_size);
    for (int i = 0; i < MMP_ROWS; i++) {
        if (!(mask >> i & 1u)) continue;
        if (row) legacy_move_row(pack, t, nb, i, row, grp, true);
        for (int tk = 0; tk < nt; tk++) {
            float *o = y + (size_t)tk * ys + i;
            if (row) kern_vec_dot(k, t, nb * QK4_1, o, row, xq + (size_t)tk * xs);
            else *o = NAN; // out of memory: no value rather than a wrong one
        }
    }
    free(row);
}

// --- helpers: packing

// Packs group g of w (x86_mm.h) from row[i], the file encoding of row g * 16 + i (NULL past w->rows:
// those rows stay zero).
static void pack_group(mm_weight_t *w, int64_t nb, int64_t g, const uint8_t *const *row) {
    uint8_t *grp = (uint8_t *)w->packed + (size_t)g * mmp_group_bytes(w->pack, nb);
    if (w->pack == MMP_Q4_KX16 || w->pack == MMP_Q5_KX16) {
        for (int i = 0; i < MMP_ROWS && row[i]; i++) q4_k_pack_row(grp, nb, i, row[i], w->pack == MMP_Q5_KX16);
        return;
    }
    if (w->pack == MMP_Q3_KX16) {
        for (int i = 0; i < MMP_ROWS && row[i]; i++) q3_k_pack_row(grp, nb, i, row[i]);
        return;
    }
    if (w->pack == MMP_Q2_KX16) {
        for (int i = 0; i < MMP_ROWS && row[i]; i++) q2_k_pack_row(grp, nb, i, row[i]);
        return;
    }
    if (mmp_is_legacy(w->pack)) {
        for (int i = 0; i < MMP_ROWS && row[i]; i++) legacy_move_row(w->pack, w->type, nb, i, grp, row[i], false);
        return;
    }
    for (int i = 0; i < MMP_ROWS && row[i]; i++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *q = (uint8_t *)mmp_block_quants(w->pack, grp, b);
            uint8_t *sc = (uint8_t *)mmp_block_scales(w->pack, grp, b); // (16) f16
            if (w->pack == MMP_Q4_0X16) {
                const block_q4_0 *blk = (const block_q4_0 *)row[i] + b;
                memcpy(sc + (size_t)i * 2, &blk->d, 2);
                for (int j = 0; j < 4; j++) memcpy(q + (size_t)(j * MMP_ROWS + i) * 4, blk->qs + 4 * j, 4);
            } else {
                const block_q8_0 *blk = (const block_q8_0 *)row[i] + b;
                memcpy(sc + (size_t)i * 2, &blk->d, 2);
                for (int j = 0; j < 8; j++)
                    for (int c = 0; c < 4; c++)
                        q[(size_t)(j * MMP_ROWS + i) * 4 + c] = (uint8_t)((uint8_t)blk->qs[4 * j + c] ^ 0x80u);
            }
        }
    }
}

// Copies a plain Q4_0 / Q8_0 / Q4_K / Q3_K matrix into 16-row groups (x86_mm.h); rows past w->rows stay zero.
static void repack_rows(mm_weight_t *w, int64_t nb) {
    const int64_t ng = (w->rows + MMP_ROWS - 1) / MMP_ROWS;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *row[MMP_ROWS] = {NULL};
        for (int i = 0; i < MMP_ROWS && g * MMP_ROWS + i < w->rows; i++)
            row[i] = w->data + (size_t)(g * MMP_ROWS + i) * w->row_bytes;
        pack_group(w, nb, g, row);
    }
}

// Portable kernels over one packed group (the scalar table's path, and the oracle's twin in tests).
// Q4_0: one fma chain per row over the blocks in order.
static void group_scalar(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                         uint32_t mask) {
    const size_t toff = mmp_act_tail_off(nb);
    for (int t = 0; t < nt; t++) {
        const uint8_t *xr = xq + (size_t)t * xs;
        for (int i = 0; i < MMP_ROWS; i++) {
            if (!(mask >> i & 1u)) continue;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = mmp_block_quants(MMP_Q4_0X16, grp, b);
                const int8_t *xb = ((const block_q8_0 *)xr)[b].qs;
                int32_t isum;
                float dx;
                memcpy(&isum, xr + toff + (size_t)b * 4, 4);
                memcpy(&dx, xr + toff + (size_t)nb * 4 + (size_t)b * 4, 4);
                for (int j = 0; j < 4; j++)
                    for (int c = 0; c < 4; c++) {
                        uint8_t v = q[(size_t)(j * MMP_ROWS + i) * 4 + c];
                        isum += (v & 15) * xb[4 * j + c] + (v >> 4) * xb[16 + 4 * j + c];
                    }
                sum = fmaf((float)isum, f16_at(mmp_block_scales(MMP_Q4_0X16, grp, b) + (size_t)i * 2) * dx, sum);
            }
            y[(size_t)t * ys + i] = sum;
        }
    }
}

// Q8_0: vec_dot_q8_0's 8 lanes per row (lane L: the exact sum of products 4L..4L+3 of a block, then
// acc_L = fma(dw * dx, lane, acc_L)), summed at the end in hsum_float_8's tree.
static void group_q8_0_scalar(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                              size_t ys, uint32_t mask) {
    const size_t toff = mmp_act_tail_off(nb), doff = mmp_act_d_off(nb, MMP_Q8_LANES);
    for (int t = 0; t < nt; t++) {
        const uint8_t *xr = xq + (size_t)t * xs;
        for (int i = 0; i < MMP_ROWS; i++) {
            if (!(mask >> i & 1u)) continue;
            float acc[8] = {0};
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = mmp_block_quants(MMP_Q8_0X16, grp, b);
                const int8_t *xb = ((const block_q8_0 *)xr)[b].qs;
                float dx;
                memcpy(&dx, xr + doff + (size_t)b * 4, 4);
                const float d = f16_at(mmp_block_scales(MMP_Q8_0X16, grp, b) + (size_t)i * 2) * dx;
                for (int l = 0; l < 8; l++) {
                    int32_t lane;
                    memcpy(&lane, xr + toff + (size_t)(b * MMP_Q8_LANES + l) * 4, 4);
                    for (int c = 0; c < 4; c++) lane += q[(size_t)(l * MMP_ROWS + i) * 4 + c] * xb[4 * l + c];
                    acc[l] = fmaf(d, (float)lane, acc[l]);
                }
            }
            y[(size_t)t * ys + i] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        }
    }
}

// Sum of 16 floats in the order of _mm512_reduce_add_ps (halves, quarters, pairs).
static float reduce16(const float *v) { // v: (16)
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = v[i + 8] + v[i];
    for (int i = 0; i < 4; i++) s4[i] = s8[i + 4] + s8[i];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static float float_at(qtype_t t, const uint8_t *p, int64_t i) {
    if (t == QT_F32) return ((const float *)p)[i];
    if (t == QT_F16) return mlm_f16_to_f32(((const mlm_f16_t *)p)[i]);
    return mlm_bf16_to_f32(((const mlm_bf16_t *)p)[i]);
}

// Portable F32/F16 dot in the reference's order (the same bits as mmp_float_avx512): tiled = one
// 16-lane fma chain (tinyBLAS); otherwise ggml_vec_dot: 4 x 16 lanes per 64 elements, then the
// tail (F32: rounded products added in runs of 8, the last n % 8 fused; F16: exact products in double).
static float float_dot_exact(qtype_t t, const uint8_t *w, const uint8_t *x, int64_t n, bool tiled) {
    float lanes[4][16] = {{0}};
    if (tiled) {
        for (int64_t c = 0; c < n; c += 16)
            for (int l = 0; l < 16 && c + l < n; l++) lanes[0][l] = fmaf(float_at(t, w, c + l), float_at(t, x, c + l), lanes[0][l]);
        return reduce16(lanes[0]);
    }
    const int64_t np = n & ~(int64_t)63;
    for (int64_t i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) {
                const int64_t e = i + 16 * j + l;
                lanes[j][l] = fmaf(float_at(t, w, e), float_at(t, x, e), lanes[j][l]);
            }
    for (int l = 0; l < 16; l++) lanes[0][l] = (lanes[0][l] + lanes[2][l]) + (lanes[1][l] + lanes[3][l]);
    const float head = reduce16(lanes[0]);
    if (t == QT_F32) {
        const int64_t n8 = np + ((n - np) & ~(int64_t)7);
        float sf = head;
        for (int64_t i = np; i < n8; i++) sf += float_at(t, w, i) * float_at(t, x, i);
        for (int64_t i = n8; i < n; i++) sf = fmaf(float_at(t, w, i), float_at(t, x, i), sf);
        return sf;
    }
    double sd = head;
    for (int64_t i = np; i < n; i++) sd += (double)(float_at(t, w, i) * float_at(t, x, i));
    return (float)sd;
}

// Zeroed, 64-byte aligned memory for a packed matrix (bytes a multiple of 64). Large matrices are
// mapped at 2 MB alignment with a transparent-huge-page hint: decode streams them, and 4 KB pages
// would cost a TLB miss and a hardware-prefetcher restart every 4 KB; a mapping can also grow or
// shrink in place (mremap) when a later share takes it over (mm_weight_init_take). The mapping ends
// at the page after the last byte, not at the next 2 MB: the huge pages cover the whole 2 MB extents
// and the tail takes 4 KB pages, where rounding up would have cost up to 2 MB per matrix (a third
// more memory for a TinyLlama-sized model). *mapped receives the bytes mapped (free with munmap), or
// 0 for heap memory (free with free()).
static size_t page_round(size_t bytes) {
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (bytes + pg - 1) / pg * pg;
}

static void *alloc_packed(size_t bytes, size_t *mapped) {
    const size_t huge = (size_t)2 << 20;
    *mapped = 0;
    if (bytes >= huge) {
        const size_t rounded = page_round(bytes);
        uint8_t *p = mmap(NULL, rounded + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        uint8_t *a = (uint8_t *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
        if (a > p) munmap(p, (size_t)(a - p));
        if (p + rounded + huge > a + rounded) munmap(a + rounded, (size_t)(p + rounded + huge - (a + rounded)));
#if defined(MADV_HUGEPAGE) && !defined(MM_NO_HUGE)
        (void)madvise(a, rounded, MADV_HUGEPAGE); // a hint: failure only costs speed
#endif
        *mapped = rounded;
        return a; // anonymous pages are zero
    }
    void *p = aligned_alloc(64, bytes);
    if (!p) return NULL;
    memset(p, 0, bytes);
    return p;
}

static void free_packed(void *p, size_t mapped) {
    if (p && mapped) munmap(p, mapped);
    else free(p);
}

// Full Q4_0 groups decode walks side by side: k->tune.q4_groups (1..4; 4 streams per thread were 1.16x
// over one on TinyLlama shapes with 2 threads on Intel, 0.88x on AMD Zen 5; Q4_K, compute-bound on
// Intel, gained nothing), and k->tune.q8_groups for packed Q8_0 (1..2; each group keeps 8 accumulators).

static void rows_packed(const kernels_t *k, const mm_weight_t *w, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, int64_t r0, int64_t r1) {
    const int64_t nb = w->cols / qtype_traits(w->type)->blck;
    const size_t gb = mmp_group_bytes(w->pack, nb);
    mmp_group_fn fn = NULL;
#ifdef MESHLM_HAVE_X86
    if (isa_is(k, "avx512")) fn = w->pack == MMP_Q4_0X16 ? mmp_q4_0x16_avx512 : mmp_q8_0x16_avx512;
    else if (isa_is(k, "avx2") && w->pack == MMP_Q4_0X16) fn = mmp_q4_0x16_avx2;
    if (w->pack == MMP_Q4_KX16) fn = isa_is(k, "avx512") ? mmp_q4_kx16_avx512 : isa_is(k, "avx2") ? mmp_q4_kx16_avx2 : NULL;
    if (w->pack == MMP_Q3_KX16) fn = isa_is(k, "avx512") ? mmp_q3_kx16_avx512 : NULL;
    if (w->pack == MMP_Q5_KX16) fn = isa_is(k, "avx512") ? mmp_q5_kx16_avx512 : NULL;
    if (w->pack == MMP_Q2_KX16) fn = isa_is(k, "avx512") ? mmp_q2_kx16_avx512 : NULL;
#endif
#ifdef MESHLM_HAVE_NEON
    if (w->pack == MMP_Q4_0X16 && isa_is(k, "neon-dotprod")) fn = mmp_q4_0x16_dotprod;
    else if (w->pack == MMP_Q4_0X16 && isa_is(k, "neon")) fn = mmp_q4_0x16_neon;
#endif
    int64_t g = r0 / MMP_ROWS;
#if defined(MESHLM_HAVE_X86)
    // decode: full groups k->tune.q4_groups (q8_groups) at a time (that many streams in flight per thread)
    const bool dec512 = isa_is(k, "avx512"), dec256 = isa_is(k, "avx2");
    const int decn = k->tune.q4_groups < 4 ? k->tune.q4_groups : 4, decn8 = k->tune.q8_groups < 2 ? k->tune.q8_groups : 2;
    if ((decn > 1 || (decn == 1 && dec512)) && nt == 1 && w->pack == MMP_Q4_0X16 && nb % 2 == 0 && (dec512 || dec256) &&
        g * MMP_ROWS == r0)
        for (int64_t n; (n = r1 / MMP_ROWS - g) > 0; g += n) {
            if (n > decn) n = decn;
            const uint8_t *g0 = (const uint8_t *)w->packed + (size_t)g * gb;
            if (dec512) mmp_q4_0x16_decn_avx512(g0, gb, (int)n, nb, xq, y + g * MMP_ROWS, (size_t)(k->tune.q4_pf > 0 ? k->tune.q4_pf : 0));
            else mmp_q4_0x16_decn_avx2(g0, gb, (int)n, nb, xq, y + g * MMP_ROWS);
        }
    if (decn8 > 1 && nt == 1 && w->pack == MMP_Q8_0X16 && dec512 && g * MMP_ROWS == r0) // one: the group kernel
        for (int64_t n; (n = r1 / MMP_ROWS - g) > 0; g += n) {
            if (n > decn8) n = decn8;
            mmp_q8_0x16_decn_avx512((const uint8_t *)w->packed + (size_t)g * gb, gb, (int)n, nb, xq, y + g * MMP_ROWS,
                                    (size_t)(k->tune.q8_pf > 0 ? k->tune.q8_pf : 0));
        }
    const bool kpack = w->pack == MMP_Q3_KX16 || w->pack == MMP_Q4_KX16 || w->pack == MMP_Q5_KX16 || w->pack == MMP_Q2_KX16;
    if (nt == 1 && mmp_is_legacy(w->pack) && dec512 && g * MMP_ROWS == r0 && r1 / MMP_ROWS > g) { // likewise
        mmp_legacy_decn_avx512(w->pack, (const uint8_t *)w->packed + (size_t)g * gb, gb, (int)(r1 / MMP_ROWS - g), nb, xq,
                               y + g * MMP_ROWS, (size_t)(k->tune.k_pf > 0 ? k->tune.k_pf : 0));
        g = r1 / MMP_ROWS;
    }
    if (nt == 1 && kpack && dec512 && g * MMP_ROWS == r0 && r1 / MMP_ROWS > g) { // full groups, one stream
        const uint8_t *g0 = (const uint8_t *)w->packed + (size_t)g * gb;
        const size_t pf = (size_t)(k->tune.k_pf > 0 ? k->tune.k_pf : 0);
        const int ng = (int)(r1 / MMP_ROWS - g);
        if (w->pack == MMP_Q3_KX16) mmp_q3_kx16_decn_avx512(g0, gb, ng, nb, xq, y + g * MMP_ROWS, pf);
        else if (w->pack == MMP_Q5_KX16) mmp_q5_kx16_decn_avx512(g0, gb, ng, nb, xq, y + g * MMP_ROWS, pf);
        else if (w->pack == MMP_Q2_KX16) mmp_q2_kx16_decn_avx512(g0, gb, ng, nb, xq, y + g * MMP_ROWS, pf);
        else mmp_q4_kx16_decn_avx512(g0, gb, ng, nb, xq, y + g * MMP_ROWS, pf);
        g = r1 / MMP_ROWS;
    }
#endif
    for (; g * MMP_ROWS < r1; g++) {
        const int64_t base = g * MMP_ROWS;
        const int64_t lo = r0 > base ? r0 - base : 0;
        const int64_t hi = r1 - base < MMP_ROWS ? r1 - base : MMP_ROWS;
        const uint32_t mask = ((1u << hi) - 1u) & ~((1u << lo) - 1u);
        const uint8_t *grp = (const uint8_t *)w->packed + (size_t)g * gb;
#ifdef MESHLM_HAVE_X86
        if (mmp_is_legacy(w->pack) && dec512) {
            mmp_legacy_avx512(w->pack, grp, nb, xq, xs, nt, y + base, ys, mask);
            continue;
        }
#endif
        if (mmp_is_legacy(w->pack)) group_legacy_scalar(k, w->pack, w->type, grp, nb, xq, xs, nt, y + base, ys, mask);
        else if (fn) fn(grp, nb, xq, xs, nt, y + base, ys, mask);
        else if (w->pack == MMP_Q4_KX16 || w->pack == MMP_Q5_KX16)
            group_q4_k_scalar(grp, nb, xq, xs, nt, y + base, ys, mask, w->pack == MMP_Q5_KX16);
        else if (w->pack == MMP_Q3_KX16) group_k_scalar(grp, nb, MMP_Q3K_SB_BYTES, q3_k_sb_step, xq, xs, nt, y + base, ys, mask);
        else if (w->pack == MMP_Q2_KX16) group_k_scalar(grp, nb, MMP_Q2K_SB_BYTES, q2_k_sb_step, xq, xs, nt, y + base, ys, mask);
        else if (w->pack == MMP_Q8_0X16) group_q8_0_scalar(grp, nb, xq, xs, nt, y + base, ys, mask);
        else group_scalar(grp, nb, xq, xs, nt, y + base, ys, mask);
    }
}

// --- public API

int mm_weight_init(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols, const void *data,
                   bool repack) {
    if (!w || rows <= 0 || cols <= 0 || !data) return MLM_EINVAL;
    memset(w, 0, sizeof *w);
    const qtype_traits_t *tr = qtype_traits(type);
    if (!tr || !tr->has_kernels) return MLM_EUNSUPPORTED;
    if (cols % tr->blck != 0) return MLM_EINVAL;
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = qtype_row_size(type, cols);
    w->data = data;
    w->row_align = 1;
    const int pack = repack ? pack_for_type(type, k) : MMP_NONE;
    if (pack != MMP_NONE) {
        const int64_t nb = cols / tr->blck;
        const size_t bytes = (size_t)((rows + MMP_ROWS - 1) / MMP_ROWS) * mmp_group_bytes(pack, nb);
        w->packed = alloc_packed(bytes, &w->packed_map);
        if (!w->packed) return MLM_ENOMEM;
        w->pack = pack;
        w->row_align = MMP_ROWS;
        repack_rows(w, nb);
    }
    return MLM_OK;
}

int mm_weight_copy_huge(mm_weight_t *w) {
    const size_t huge = (size_t)2 << 20;
    if (!w || w->packed || w->copy || !w->data || w->rows <= 0) return 0;
    const size_t bytes = (size_t)w->rows * w->row_bytes;
    if (bytes < huge) return 0;
    size_t mapped = 0;
    void *p = alloc_packed((bytes + 63) / 64 * 64, &mapped);
    if (!p) return MLM_ENOMEM;
    memcpy(p, w->data, bytes);
    w->copy = p;
    w->copy_map = mapped;
    w->data = p;
    return 0;
}

void mm_weight_release(mm_weight_t *w) {
    if (!w) return;
    if (w->copy) {
        free_packed(w->copy, w->copy_map);
        w->data = NULL;
        w->copy = NULL;
        w->copy_map = 0;
    }
    free_packed(w->packed, w->packed_map);
    w->packed = NULL;
    w->packed_map = 0;
    w->pack = MMP_NONE;
    w->row_align = 1;
}

int mm_weight_init_from(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols, const void *data,
                        const mm_weight_t *prev, int64_t shift, int64_t *reused) {
    if (reused) *reused = 0;
    const bool usable = prev && prev->pack != MMP_NONE && prev->packed && prev->type == type && prev->cols == cols &&
                        pack_for_type(type, k) == prev->pack && shift < rows && shift + prev->rows > 0;
    if (!usable) return mm_weight_init(w, k, type, rows, cols, data, true);
    if (!w || rows <= 0 || cols <= 0 || !data) return MLM_EINVAL;
    memset(w, 0, sizeof *w);
    const qtype_traits_t *tr = qtype_traits(type);
    const int64_t nb = cols / tr->blck;
    const size_t gb = mmp_group_bytes(prev->pack, nb);
    const int64_t ng = (rows + MMP_ROWS - 1) / MMP_ROWS, ng_prev = (prev->rows + MMP_ROWS - 1) / MMP_ROWS;
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = qtype_row_size(type, cols);
    w->data = data;
    w->pack = prev->pack;
    w->row_align = MMP_ROWS;
    w->packed = alloc_packed((size_t)ng * gb, &w->packed_map);
    uint8_t *tmp = malloc((size_t)MMP_ROWS * w->row_bytes); // (16, row_bytes) rows unpacked from prev
    if (!w->packed || !tmp) {
        free(tmp);
        mm_weight_release(w);
        return MLM_ENOMEM;
    }
    int64_t taken = 0;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t valid = rows - g * MMP_ROWS < MMP_ROWS ? rows - g * MMP_ROWS : MMP_ROWS;
        if (shift % MMP_ROWS == 0) { // group g is prev's group h, if prev holds it with as many rows
            const int64_t h = g - shift / MMP_ROWS;
            const int64_t pvalid = h >= 0 && h < ng_prev ? (prev->rows - h * MMP_ROWS < MMP_ROWS ? prev->rows - h * MMP_ROWS : MMP_ROWS) : 0;
            if (pvalid == valid) {
                memcpy((uint8_t *)w->packed + (size_t)g * gb, (const uint8_t *)prev->packed + (size_t)h * gb, gb);
                taken += valid;
                continue;
            }
        }
        const uint8_t *row[MMP_ROWS] = {NULL}; // each row from prev when it holds it, else from data
        for (int i = 0; i < valid; i++) {
            const int64_t r = g * MMP_ROWS + i, pr = r - shift;
            if (pr >= 0 && pr < prev->rows) {
                mm_weight_get_row(prev, pr, tmp + (size_t)i * w->row_bytes);
                row[i] = tmp + (size_t)i * w->row_bytes;
                taken++;
            } else {
                row[i] = w->data + (size_t)r * w->row_bytes;
            }
        }
        pack_group(w, nb, g, row);
    }
    free(tmp);
    if (reused) *reused = taken;
    return MLM_OK;
}

int mm_weight_init_take(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols, const void *data,
                        mm_weight_t *prev, int64_t shift, int64_t *reused) {
    if (reused) *reused = 0;
    const bool usable = w && rows > 0 && prev && prev->pack != MMP_NONE && prev->packed && prev->packed_map && prev->data &&
                        prev->type == type && prev->cols == cols && pack_for_type(type, k) == prev->pack &&
                        shift % MMP_ROWS == 0 && shift < rows && shift + prev->rows > 0 && data;
    if (!usable) return mm_weight_init_from(w, k, type, rows, cols, data, prev, shift, reused);
    const int64_t nb = cols / qtype_traits(type)->blck;
    const size_t gb = mmp_group_bytes(prev->pack, nb), row_bytes = qtype_row_size(type, cols);
    const int64_t ng = (rows + MMP_ROWS - 1) / MMP_ROWS, ng_prev = (prev->rows + MMP_ROWS - 1) / MMP_ROWS;
    const int64_t dg = shift / MMP_ROWS; // new group g is prev's group g - dg
    // the run of new groups [g0, g1) that are prev's groups with as many rows
    // (every group but a matrix's last holds 16 rows: only the run's last group can differ)
    const int64_t g0 = dg > 0 ? dg : 0;
    int64_t g1 = ng < ng_prev + dg ? ng : ng_prev + dg;
    const int64_t last_valid = rows - (ng - 1) * MMP_ROWS;
    if (g1 > g0) {
        const int64_t g = g1 - 1, h = g - dg;
        const int64_t v = rows - g * MMP_ROWS < MMP_ROWS ? rows - g * MMP_ROWS : MMP_ROWS;
        const int64_t pv = prev->rows - h * MMP_ROWS < MMP_ROWS ? prev->rows - h * MMP_ROWS : MMP_ROWS;
        if (v != pv) g1--;
    }
    if (g1 <= g0) return mm_weight_init_from(w, k, type, rows, cols, data, prev, shift, reused);
    // rows prev holds outside the run (at most a group at each end) are saved before its copy moves
    int64_t lo = shift > 0 ? shift : 0, hi = shift + prev->rows < rows ? shift + prev->rows : rows; // rows in common
    int64_t n_edge = 0;
    for (int64_t r = lo; r < hi; r++) n_edge += r < g0 * MMP_ROWS || r >= g1 * MMP_ROWS;
    uint8_t *edge = n_edge ? malloc((size_t)n_edge * row_bytes) : NULL; // (n_edge, row_bytes) in row order
    if (n_edge && !edge) return MLM_ENOMEM;
    for (int64_t r = lo, e = 0; r < hi; r++)
        if (r < g0 * MMP_ROWS || r >= g1 * MMP_ROWS) mm_weight_get_row(prev, r - shift, edge + (size_t)e++ * row_bytes);
    const size_t need = page_round((size_t)ng * gb);
    uint8_t *buf = prev->packed;
    if (need > prev->packed_map) { // grow first: the run moves within the larger mapping
        void *nbuf = mremap(buf, prev->packed_map, need, MREMAP_MAYMOVE);
        if (nbuf == MAP_FAILED) {
            free(edge);
            return mm_weight_init_from(w, k, type, rows, cols, data, prev, shift, reused);
        }
        buf = nbuf;
        prev->packed = buf;
        prev->packed_map = need;
    }
    memmove(buf + (size_t)g0 * gb, buf + (size_t)(g0 - dg) * gb, (size_t)(g1 - g0) * gb);
    if (need < prev->packed_map) { // then shrink
        void *nbuf = mremap(buf, prev->packed_map, need, MREMAP_MAYMOVE);
        if (nbuf != MAP_FAILED) buf = nbuf, prev->packed_map = need; // else the mapping stays larger
    }
    memset(w, 0, sizeof *w);
    w->type = type;
    w->rows = rows;
    w->cols = cols;
    w->row_bytes = row_bytes;
    w->data = data;
    w->pack = prev->pack;
    w->row_align = MMP_ROWS;
    w->packed = buf;
    w->packed_map = prev->packed_map;
    // prev computes from its plain rows from now on
    prev->packed = NULL;
    prev->packed_map = 0;
    prev->pack = MMP_NONE;
    prev->row_align = 1;
    // the groups outside the run: packed afresh from the saved rows and data (stale bytes cleared;
    // a full group's packing writes every byte but an odd block pair's zero half, zero in every group)
    if (ng_prev > ng) { // prev's groups past the new end: cleared as a fresh copy's would be
        const size_t end = (size_t)ng_prev * gb < w->packed_map ? (size_t)ng_prev * gb : w->packed_map;
        memset(buf + (size_t)ng * gb, 0, end - (size_t)ng * gb);
    }
    int64_t taken = (g1 - g0) * MMP_ROWS - (g1 == ng ? MMP_ROWS - last_valid : 0);
    for (int64_t g = 0, e = 0; g < ng; g++) {
        if (g >= g0 && g < g1) continue;
        const int64_t valid = rows - g * MMP_ROWS < MMP_ROWS ? rows - g * MMP_ROWS : MMP_ROWS;
        if (valid < MMP_ROWS) memset(buf + (size_t)g * gb, 0, gb);
        const uint8_t *row[MMP_ROWS] = {NULL};
        for (int i = 0; i < valid; i++) {
            const int64_t r = g * MMP_ROWS + i;
            if (r >= lo && r < hi) {
                row[i] = edge + (size_t)e++ * row_bytes;
                taken++;
            } else {
                row[i] = w->data + (size_t)r * row_bytes;
            }
        }
        pack_group(w, nb, g, row);
    }
    free(edge);
    if (reused) *reused = taken;
    (void)k;
    return MLM_OK;
}

void mm_weight_get_row(const mm_weight_t *w, int64_t r, void *out) {
    if (w->pack == MMP_NONE) {
        memcpy(out, w->data + (size_t)r * w->row_bytes, w->row_bytes);
        return;
    }
    // the inverse of repack_rows for one row
    const int64_t nb = w->cols / qtype_traits(w->type)->blck;
    const int i = (int)(r % MMP_ROWS);
    const uint8_t *grp = (const uint8_t *)w->packed + (size_t)(r / MMP_ROWS) * mmp_group_bytes(w->pack, nb);
    if (w->pack == MMP_Q4_KX16 || w->pack == MMP_Q5_KX16) {
        q4_k_unpack_row(grp, nb, i, out, w->pack == MMP_Q5_KX16);
        return;
    }
    if (w->pack == MMP_Q3_KX16) {
        q3_k_unpack_row(grp, nb, i, out);
        return;
    }
    if (w->pack == MMP_Q2_KX16) {
        q2_k_unpack_row(grp, nb, i, out);
        return;
    }
    if (mmp_is_legacy(w->pack)) {
        legacy_move_row(w->pack, w->type, nb, i, out, grp, true);
        return;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = mmp_block_quants(w->pack, grp, b);
        const uint8_t *sc = mmp_block_scales(w->pack, grp, b);
        if (w->pack == MMP_Q4_0X16) {
            block_q4_0 *blk = (block_q4_0 *)out + b;
            memcpy(&blk->d, sc + (size_t)i * 2, 2);
            for (int j = 0; j < 4; j++) memcpy(blk->qs + 4 * j, q + (size_t)(j * MMP_ROWS + i) * 4, 4);
        } else {
            block_q8_0 *blk = (block_q8_0 *)out + b;
            memcpy(&blk->d, sc + (size_t)i * 2, 2);
            for (int j = 0; j < 8; j++)
                for (int c = 0; c < 4; c++)
                    blk->qs[4 * j + c] = (int8_t)(q[(size_t)(j * MMP_ROWS + i) * 4 + c] ^ 0x80u);
        }
    }
}

qtype_t mm_act_type(qtype_t wtype) {
    const qtype_traits_t *tr = qtype_traits(wtype);
    return tr ? tr->vec_dot_type : QT_F32;
}

size_t mm_act_row_bytes(qtype_t wtype, int64_t cols) {
    if (act_has_tail(wtype)) return mmp_act_row_bytes(cols / QK8_0, act_lanes(wtype));
    return qtype_row_size(mm_act_type(wtype), cols);
}

void mm_quantize_act(const kernels_t *k, qtype_t wtype, const float *x, void *xq, int64_t cols) {
    const qtype_t at = mm_act_type(wtype);
    if (at == QT_F32) {
        memcpy(xq, x, (size_t)cols * sizeof(float));
        return;
    }
    kern_from_float(k, at, x, xq, cols);
    if (!act_has_tail(wtype)) return;
    const int64_t nb = cols / QK8_0;
    const int lanes = act_lanes(wtype), per = QK8_0 / lanes;
    const block_q8_0 *blk = xq;          // (nb)
    uint8_t *tail = (uint8_t *)xq + mmp_act_tail_off(nb);
    const int32_t mul = wtype == QT_Q4_0 ? -8 : wtype == QT_Q5_0 ? -16 : -128;
    for (int64_t b = 0; b < nb; b++) {
        for (int l = 0; l < lanes; l++) {
            int32_t s = 0;
            for (int j = 0; j < per; j++) s += blk[b].qs[per * l + j];
            s *= mul;
            memcpy(tail + (size_t)(b * lanes + l) * 4, &s, 4);
        }
        float d = mlm_f16_to_f32(blk[b].d);
        memcpy((uint8_t *)xq + mmp_act_d_off(nb, lanes) + (size_t)b * 4, &d, 4);
    }
}

#ifndef MM_ROW_PF
#define MM_ROW_PF 2 // rows ahead the generic decode loop prefetches (0: none)
#endif

void mm_rows(const kernels_t *k, const mm_weight_t *w, const void *xq, size_t xq_stride, int nt, float *y,
             size_t y_stride, int64_t r0, int64_t r1) {
    if (!w || nt <= 0 || r0 < 0 || r1 > w->rows || r1 <= r0) return;
    const uint8_t *x = xq;
    if (w->pack != MMP_NONE) {
        rows_packed(k, w, x, xq_stride, nt, y, y_stride, r0, r1);
        return;
    }
    // F32/F16: the reference uses tinyBLAS (one 16-lane chain) for batches of 2+ tokens when the
    // shapes allow, and ggml_vec_dot otherwise; the two orders give different bits.
    const bool tiled = nt >= 2 && w->rows % 4 == 0 && w->cols % 16 == 0;
#ifdef MESHLM_HAVE_X86
    if (is_float_type(w->type) && isa_is(k, "avx512")) {
        mmp_float_avx512(w->type, w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, xq_stride, nt,
                         y + r0, y_stride, w->cols, tiled, k->tune.f16_rows);
        return;
    }
    if (w->type == QT_Q8_0 && nt == 1 && isa_is(k, "avx512")) {
        mmv_q8_0_avx512(w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, y + r0, w->cols);
        return;
    }
    if (w->type == QT_Q8_0 && nt >= 2 && isa_is(k, "avx512")) { // batches: rows x tokens tiles; decode: vec_dot
        mmq_q8_0_avx512(w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, xq_stride, nt, y + r0, y_stride,
                        w->cols);
        return;
    }
    if (w->type == QT_Q6_K && isa_is(k, "avx512")) { // tiles that unpack each super-block once for many tokens
        mmq_q6_K_avx512(w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, xq_stride, nt, y + r0, y_stride,
                        w->cols, k->tune.q6_rows, k->tune.q6_pf);
        return;
    }
    if (w->type == QT_Q6_K && nt >= 2 && isa_is(k, "avx2")) {
        mmq_q6_K_avx2(w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, xq_stride, nt, y + r0, y_stride,
                      w->cols);
        return;
    }
    if ((w->type == QT_F32 || w->type == QT_F16) && isa_is(k, "avx2")) {
        mmp_float_avx2(w->type, w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, xq_stride, nt, y + r0,
                       y_stride, w->cols, tiled);
        return;
    }
#endif
#ifdef MESHLM_HAVE_NEON
    if ((w->type == QT_F32 || w->type == QT_F16) && (isa_is(k, "neon") || isa_is(k, "neon-dotprod"))) {
        (isa_is(k, "neon") ? mmp_float_neon : mmp_float_dotprod)(w->type, w->data + (size_t)r0 * w->row_bytes, w->row_bytes,
                                                                  r1 - r0, x, xq_stride, nt, y + r0, y_stride, w->cols, tiled);
        return;
    }
#endif
    if ((w->type == QT_F32 || w->type == QT_F16) && isa_is(k, "scalar")) {
        for (int64_t r = r0; r < r1; r++)
            for (int t = 0; t < nt; t++)
                y[(size_t)t * y_stride + r] =
                    float_dot_exact(w->type, w->data + (size_t)r * w->row_bytes, x + (size_t)t * xq_stride, w->cols, tiled);
        return;
    }
    // generic: one dot product per (row, token); the row stays in L1 while the tokens stream by. Decode
    // reads each row once: the row MM_ROW_PF rows on is prefetched meanwhile (a second stream).
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        if (MM_ROW_PF && nt == 1 && r + MM_ROW_PF < r1)
            for (size_t o = 0; o < w->row_bytes; o += 64) __builtin_prefetch(row + (size_t)MM_ROW_PF * w->row_bytes + o, 0, 3);
        for (int t = 0; t < nt; t++)
            kern_vec_dot(k, w->type, w->cols, y + (size_t)t * y_stride + r, row, x + (size_t)t * xq_stride);
    }
}

void mm_rows_one_order(const kernels_t *k, const mm_weight_t *w, const void *xq, size_t xq_stride, int nt, float *y,
                       size_t y_stride, int64_t r0, int64_t r1) {
    const bool batch_order = w && w->pack == MMP_NONE && (is_float_type(w->type) || w->type == QT_Q8_0);
    if (!batch_order || nt <= 1) {
        mm_rows(k, w, xq, xq_stride, nt, y, y_stride, r0, r1);
        return;
    }
    for (int t = 0; t < nt; t++)
        mm_rows(k, w, (const uint8_t *)xq + (size_t)t * xq_stride, xq_stride, 1, y + (size_t)t * y_stride, y_stride, r0, r1);
}
