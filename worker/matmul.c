// Matrix products: weight setup (with optional repacking into 16-row groups) and the per-ISA row loops.
#include "matmul.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "err.h"
#include "kernels/x86/x86_mm.h"

// --- helpers

static bool is_float_type(qtype_t t) { return t == QT_F32 || t == QT_F16 || t == QT_BF16; }

// Layout a weight of this type is repacked into, or MMP_NONE.
static int pack_for_type(qtype_t t) {
    if (t == QT_Q4_0) return MMP_Q4_0X16;
    if (t == QT_Q8_0) return MMP_Q8_0X16;
    return MMP_NONE;
}

// Activation rows for these weight types carry the per-block tail of x86_mm.h.
static bool act_has_tail(qtype_t wtype) { return wtype == QT_Q4_0 || wtype == QT_Q8_0; }

static float f16_at(const uint8_t *p) {
    mlm_f16_t h;
    memcpy(&h, p, 2);
    return mlm_f16_to_f32(h);
}

// Copies a plain Q4_0 / Q8_0 matrix into 16-row groups (x86_mm.h); rows past w->rows stay zero.
static void repack_rows(mm_weight_t *w, int64_t nb) {
    const size_t qb = mmp_quant_bytes(w->pack), gb = mmp_group_bytes(w->pack, nb);
    const int64_t ng = (w->rows + MMP_ROWS - 1) / MMP_ROWS;
    uint8_t *dst = w->packed; // (ng, gb)
    for (int64_t g = 0; g < ng; g++) {
        uint8_t *grp = dst + (size_t)g * gb;
        uint8_t *sc = grp + (size_t)nb * qb; // (nb, 16) f16
        for (int i = 0; i < MMP_ROWS && g * MMP_ROWS + i < w->rows; i++) {
            const uint8_t *row = w->data + (size_t)(g * MMP_ROWS + i) * w->row_bytes;
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *q = grp + (size_t)b * qb;
                if (w->pack == MMP_Q4_0X16) {
                    const block_q4_0 *blk = (const block_q4_0 *)row + b;
                    memcpy(sc + (size_t)(b * MMP_ROWS + i) * 2, &blk->d, 2);
                    for (int j = 0; j < 4; j++) memcpy(q + (size_t)(j * MMP_ROWS + i) * 4, blk->qs + 4 * j, 4);
                } else {
                    const block_q8_0 *blk = (const block_q8_0 *)row + b;
                    memcpy(sc + (size_t)(b * MMP_ROWS + i) * 2, &blk->d, 2);
                    for (int j = 0; j < 8; j++)
                        for (int c = 0; c < 4; c++)
                            q[(size_t)(j * MMP_ROWS + i) * 4 + c] = (uint8_t)((uint8_t)blk->qs[4 * j + c] ^ 0x80u);
                }
            }
        }
    }
}

// Portable kernel over one packed group (the scalar table's path, and the oracle's twin in tests).
static void group_scalar(int pack, const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y,
                         size_t ys, uint32_t mask) {
    const size_t qb = mmp_quant_bytes(pack), toff = mmp_act_tail_off(nb);
    const uint8_t *sc = grp + (size_t)nb * qb;
    for (int t = 0; t < nt; t++) {
        const uint8_t *xr = xq + (size_t)t * xs;
        for (int i = 0; i < MMP_ROWS; i++) {
            if (!(mask >> i & 1u)) continue;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = grp + (size_t)b * qb;
                const int8_t *xb = ((const block_q8_0 *)xr)[b].qs;
                int32_t isum;
                float dx;
                memcpy(&isum, xr + toff + (size_t)b * 4, 4);
                memcpy(&dx, xr + toff + (size_t)nb * 4 + (size_t)b * 4, 4);
                if (pack == MMP_Q4_0X16) {
                    for (int j = 0; j < 4; j++)
                        for (int c = 0; c < 4; c++) {
                            uint8_t v = q[(size_t)(j * MMP_ROWS + i) * 4 + c];
                            isum += (v & 15) * xb[4 * j + c] + (v >> 4) * xb[16 + 4 * j + c];
                        }
                } else {
                    for (int j = 0; j < 8; j++)
                        for (int c = 0; c < 4; c++) isum += q[(size_t)(j * MMP_ROWS + i) * 4 + c] * xb[4 * j + c];
                }
                sum += (float)isum * (f16_at(sc + (size_t)(b * MMP_ROWS + i) * 2) * dx);
            }
            y[(size_t)t * ys + i] = sum;
        }
    }
}

// Zeroed, 64-byte aligned memory for a packed matrix (bytes a multiple of 64). Large matrices get
// 2 MB alignment and a transparent-huge-page hint: decode streams them, and 4 KB pages would cost a
// TLB miss and a hardware-prefetcher restart every 4 KB. Caller frees with free().
static void *alloc_packed(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    void *p = NULL;
    if (bytes >= huge) {
        const size_t rounded = (bytes + huge - 1) & ~(huge - 1);
        if (posix_memalign(&p, huge, rounded) != 0) return NULL;
#ifdef MADV_HUGEPAGE
        (void)madvise(p, rounded, MADV_HUGEPAGE); // a hint: failure only costs speed
#endif
    } else {
        p = aligned_alloc(64, bytes);
        if (!p) return NULL;
    }
    memset(p, 0, bytes);
    return p;
}

static bool isa_is(const kernels_t *k, const char *name) { return k && k->isa && strcmp(k->isa, name) == 0; }

static void rows_packed(const kernels_t *k, const mm_weight_t *w, const uint8_t *xq, size_t xs, int nt, float *y,
                        size_t ys, int64_t r0, int64_t r1) {
    const int64_t nb = w->cols / QK8_0;
    const size_t gb = mmp_group_bytes(w->pack, nb);
    mmp_group_fn fn = NULL;
#ifdef MESHLM_HAVE_X86
    if (isa_is(k, "avx512")) fn = w->pack == MMP_Q4_0X16 ? mmp_q4_0x16_avx512 : mmp_q8_0x16_avx512;
    else if (isa_is(k, "avx2")) fn = w->pack == MMP_Q4_0X16 ? mmp_q4_0x16_avx2 : mmp_q8_0x16_avx2;
#endif
    for (int64_t g = r0 / MMP_ROWS; g * MMP_ROWS < r1; g++) {
        const int64_t base = g * MMP_ROWS;
        const int64_t lo = r0 > base ? r0 - base : 0;
        const int64_t hi = r1 - base < MMP_ROWS ? r1 - base : MMP_ROWS;
        const uint32_t mask = ((1u << hi) - 1u) & ~((1u << lo) - 1u);
        const uint8_t *grp = (const uint8_t *)w->packed + (size_t)g * gb;
        if (fn) fn(grp, nb, xq, xs, nt, y + base, ys, mask);
        else group_scalar(w->pack, grp, nb, xq, xs, nt, y + base, ys, mask);
    }
}

// --- public API

int mm_weight_init(mm_weight_t *w, const kernels_t *k, qtype_t type, int64_t rows, int64_t cols, const void *data,
                   bool repack) {
    (void)k; // the packed layouts are the same for every ISA
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
    const int pack = repack ? pack_for_type(type) : MMP_NONE;
    if (pack != MMP_NONE) {
        const int64_t nb = cols / tr->blck;
        const size_t bytes = (size_t)((rows + MMP_ROWS - 1) / MMP_ROWS) * mmp_group_bytes(pack, nb);
        w->packed = alloc_packed(bytes);
        if (!w->packed) return MLM_ENOMEM;
        w->pack = pack;
        w->row_align = MMP_ROWS;
        repack_rows(w, nb);
    }
    return MLM_OK;
}

void mm_weight_release(mm_weight_t *w) {
    if (!w) return;
    free(w->packed);
    w->packed = NULL;
    w->pack = MMP_NONE;
    w->row_align = 1;
}

qtype_t mm_act_type(qtype_t wtype) {
    const qtype_traits_t *tr = qtype_traits(wtype);
    return tr ? tr->vec_dot_type : QT_F32;
}

size_t mm_act_row_bytes(qtype_t wtype, int64_t cols) {
    if (act_has_tail(wtype)) return mmp_act_row_bytes(cols / QK8_0);
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
    const block_q8_0 *blk = xq;          // (nb)
    uint8_t *tail = (uint8_t *)xq + mmp_act_tail_off(nb);
    const int32_t mul = wtype == QT_Q4_0 ? -8 : -128;
    for (int64_t b = 0; b < nb; b++) {
        int32_t s = 0;
        for (int j = 0; j < QK8_0; j++) s += blk[b].qs[j];
        s *= mul;
        float d = mlm_f16_to_f32(blk[b].d);
        memcpy(tail + (size_t)b * 4, &s, 4);
        memcpy(tail + (size_t)(nb + b) * 4, &d, 4);
    }
}

void mm_rows(const kernels_t *k, const mm_weight_t *w, const void *xq, size_t xq_stride, int nt, float *y,
             size_t y_stride, int64_t r0, int64_t r1) {
    if (!w || nt <= 0 || r0 < 0 || r1 > w->rows || r1 <= r0) return;
    const uint8_t *x = xq;
    if (w->pack != MMP_NONE) {
        rows_packed(k, w, x, xq_stride, nt, y, y_stride, r0, r1);
        return;
    }
#ifdef MESHLM_HAVE_X86
    if (is_float_type(w->type) && isa_is(k, "avx512")) {
        mmp_float_avx512(w->type, w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, x, xq_stride, nt,
                         y + r0, y_stride, w->cols);
        return;
    }
#endif
    // generic: one dot product per (row, token); the row stays in L1 while the tokens stream by
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        for (int t = 0; t < nt; t++)
            kern_vec_dot(k, w->type, w->cols, y + (size_t)t * y_stride + r, row, x + (size_t)t * xq_stride);
    }
}
