// x86 kernels (q3k_avx512): repacked Q3_K groups (MMP_Q3_KX16) times Q8_K activation rows, AVX-512 VNNI.
//
// The zmm lanes are the 16 rows of a group (x86_mm.h): a zmm of the low-bit plane and one of the
// high-bit plane hold, per row, 4 consecutive elements of one 16-element sub-block. Element value
// q + 4 (0..7) is split as the low 2 bits (shifted down and masked) plus 4 * the high bit (shifted to
// bit 2 and masked); each part goes through vpdpbusd against the broadcast activation dword, into one
// i32 accumulator per sub-block that starts at -4 * the sub-block's activation sum (Q8_K's bsums),
// which takes the +4 back out. The sub-block sums times their scales make the super-block's exact
// integer sum per row (|sum| < 2^23), and one fma by d_w * d_x adds it to the row's float chain: the
// order every Q3_K dot product keeps, so the bits of vec_dot and of the reference.
#include <immintrin.h>
#include <string.h>

#include "worker/kernels/x86/x86_mm.h"

// --- helpers

#define AI static inline __attribute__((always_inline))

#define Q3K_PF MMP_Q3K_SB_BYTES // bytes ahead one group's decode prefetches (a run of groups: the tuning's)

AI __m512i bcast_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// Bit b of every byte of v moved to bit 2, the rest cleared (m4: 0x04 in every byte). The 16-bit
// shifts carry bits across bytes only into positions the mask clears.
AI __m512i high_bit_at_2(__m512i v, const int b, __m512i m4) {
    if (b > 2) return _mm512_and_si512(_mm512_srli_epi16(v, (unsigned)(b - 2)), m4);
    if (b < 2) return _mm512_and_si512(_mm512_slli_epi16(v, (unsigned)(2 - b)), m4);
    return _mm512_and_si512(v, m4);
}

// One activation row against ng full groups of 16 Q3_K rows, gstride bytes apart (decode): y[16 g + n].
// The walk prefetches pf bytes ahead, never past the last group (another thread's rows, or nothing).
// Each pair of zmm (both bit planes of 4 elements) is loaded once and feeds the 4 sub-blocks it holds
// elements of. The bits of plane j are only masked, not shifted down: the low bits enter vpdpbusd as
// q << 2j and the high bit as 2^(4h + j), into a low and a high accumulator per sub-block (8
// independent chains), each divided back by its power of two once per sub-block (exact: every term
// is a multiple of it; the low one starts at -4 * sum x << 2j).
AI void q3k_decode(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const block_q8_K *x, float *y, __mmask16 m,
                   size_t pf) {
    const uint8_t *end = g0 + (size_t)ng * gstride;
    for (int g = 0; g < ng; g++) {
        const uint8_t *grp = g0 + (size_t)g * gstride;
        __m512 acc = _mm512_setzero_ps(); // the 16 rows' float chains
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *sb = grp + (size_t)b * MMP_Q3K_SB_BYTES;
            if (pf > 0 && sb + pf < end) // the super-block pf bytes on, in one burst (as q4k_tile)
                for (int ln = 0; ln < MMP_Q3K_SB_BYTES / 64; ln++) _mm_prefetch((const char *)sb + pf + 64 * ln, _MM_HINT_T0);
            __m512i isum = _mm512_setzero_si512();
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m512i al[8], ah[8]; // (2j + half) sub-block 8h + 2j + half: (q - 4) * x << 2j, h * x << (4h + j)
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) {
                    al[k] = _mm512_set1_epi32(-4 * (int32_t)x[b].bsums[8 * h + k] * (1 << (2 * (k >> 1))));
                    ah[k] = _mm512_setzero_si512();
                }
#pragma GCC unroll 8
                for (int l4 = 0; l4 < 8; l4++) {
                    const int half = l4 >> 2;
                    const __m512i qz = _mm512_load_si512(sb + MMP_Q3K_QS + 64 * (8 * h + l4));
                    const __m512i hz = _mm512_load_si512(sb + MMP_Q3K_HMASK + 64 * l4);
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        const __m512i xb = bcast_i32(x[b].qs + 128 * h + 32 * j + 4 * l4);
                        const __m512i lo = _mm512_and_si512(qz, _mm512_set1_epi8((char)(3 << (2 * j))));
                        const __m512i hi = _mm512_and_si512(hz, _mm512_set1_epi8((char)(1 << (4 * h + j))));
                        al[2 * j + half] = _mm512_dpbusd_epi32(al[2 * j + half], lo, xb);
                        ah[2 * j + half] = _mm512_dpbusd_epi32(ah[2 * j + half], hi, xb);
                    }
                }
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) {
                    const int j = k >> 1, hb = 4 * h + j; // the planes' bit positions: 2j and hb
                    const __m512i hs = hb >= 2 ? _mm512_srai_epi32(ah[k], (unsigned)(hb - 2)) : _mm512_slli_epi32(ah[k], (unsigned)(2 - hb));
                    const __m512i p = _mm512_add_epi32(j ? _mm512_srai_epi32(al[k], (unsigned)(2 * j)) : al[k], hs);
                    const __m512i sc =
                        _mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(sb + MMP_Q3K_SCALES + 16 * (8 * h + k))));
                    isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(p, sc));
                }
            }
            const __m512 wd = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + MMP_Q3K_D)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_set1_ps(x[b].d), wd), acc);
        }
        _mm512_mask_storeu_ps(y + (size_t)g * MMP_ROWS, m, acc);
    }
}

// NT activation rows (2..4) against one group of 16 Q3_K rows: y[t * ys + n] for the rows n in m.
AI void q3k_tile(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *y, size_t ys,
                 __mmask16 m) {
    const __m512i m3 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(4);
    __m512 acc[4];             // (token) the 16 rows' float chains
    const block_q8_K *xr[4];   // (token) activation rows, nb super-blocks each
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        xr[t] = (const block_q8_K *)(xq + (size_t)t * xs);
        acc[t] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *sb = grp + (size_t)b * MMP_Q3K_SB_BYTES;
        __m512i isum[4]; // (token) the super-block's integer sum of the 16 rows
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) isum[t] = _mm512_setzero_si512();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
#pragma GCC unroll 2
                for (int half = 0; half < 2; half++) {
                    const int s = 8 * h + 2 * j + half; // the sub-block: elements 16s..16s+15
                    __m512i a[4];                       // (token) its sum of (q + 4) * x, less 4 * sum x
#pragma GCC unroll 4
                    for (int t = 0; t < NT; t++) a[t] = _mm512_set1_epi32(-4 * (int32_t)xr[t][b].bsums[s]);
#pragma GCC unroll 4
                    for (int c = 0; c < 4; c++) {
                        const int l4 = 4 * half + c; // elements 128h + 32j + 4 l4 .. + 3
                        const __m512i qz = _mm512_load_si512(sb + MMP_Q3K_QS + 64 * (8 * h + l4));
                        const __m512i hz = _mm512_load_si512(sb + MMP_Q3K_HMASK + 64 * l4);
                        const __m512i lo = _mm512_and_si512(j ? _mm512_srli_epi16(qz, (unsigned)(2 * j)) : qz, m3);
                        const __m512i hi = high_bit_at_2(hz, 4 * h + j, m4);
#pragma GCC unroll 4
                        for (int t = 0; t < NT; t++) {
                            const __m512i xb = bcast_i32(xr[t][b].qs + 128 * h + 32 * j + 4 * l4);
                            a[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[t], lo, xb), hi, xb);
                        }
                    }
                    const __m512i sc = _mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(sb + MMP_Q3K_SCALES + 16 * s)));
#pragma GCC unroll 4
                    for (int t = 0; t < NT; t++) isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(a[t], sc));
                }
        const __m512 wd = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + MMP_Q3K_D)));
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(_mm512_set1_ps(xr[t][b].d), wd), acc[t]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(y + (size_t)t * ys, m, acc[t]);
}

// --- public API

void mmp_q3_kx16_decn_avx512(const uint8_t *g0, size_t gstride, int ng, int64_t nb, const uint8_t *xq, float *y,
                             size_t pf) {
    q3k_decode(g0, gstride, ng, nb, (const block_q8_K *)xq, y, (__mmask16)0xffff, pf);
}

void mmp_q3_kx16_avx512(const uint8_t *grp, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *y, size_t ys,
                        uint32_t mask) {
    const __mmask16 m = (__mmask16)mask;
#define Q3K_TILE(xt, yt, NT) q3k_tile(grp, nb, xt, xs, NT, yt, ys, m)
#define Q3K_ONE(xt, yt) q3k_decode(grp, 0, 1, nb, (const block_q8_K *)(xt), yt, m, Q3K_PF)
    MMP_TILES_2_4(nt, xq, xs, y, ys, Q3K_TILE, Q3K_ONE)
#undef Q3K_TILE
#undef Q3K_ONE
}
