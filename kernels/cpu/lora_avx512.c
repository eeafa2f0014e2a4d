/*
 * The row kernels of the multi-LoRA op (lora.c) with AVX-512: f32, f16
 * or int8 weights (converted to f32 as they are loaded; int8 unscaled,
 * lora.c applies the row scales), f32 sums.
 *
 *   shrink: t[r * ts] = dot(x[r], a)              r < n <= 4 rows
 *   expand: out[r][o] += scale * dot(t[r], B row o), o in [o0, o1), for
 *           the n rows of a segment
 *
 * Expand: f16 and int8 weights come with B transposed ([rank, out], packed so at
 * upload), and each B^T row is read in memory order into a tile of
 * deltas kept in registers / L1.  f32 weights keep B's [out, rank]
 * layout: each 16 x 16 block of B is transposed in registers, then each
 * row of the segment costs one FMA per rank.
 *
 * A row's sums never depend on how many rows its segment has or where
 * the threads split the work, so a sequence gets the same numbers in any
 * batch.
 */
#include <immintrin.h>

#include "cpu.h"


/* 16 weights from element i of w (type LLM_F32, LLM_F16 or LLM_LORA_I8:
 * the int8 values, unscaled), or the first of them that mask m selects
 * (the others 0).  type is a constant where these are inlined. */
static inline __attribute__((always_inline)) __m512
ld16(const void *w, int type, int64_t i)
{
    switch (type) {
    case LLM_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256(
                   (const __m256i *) ((const uint16_t *) w + i)));
    case LLM_LORA_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                   (const __m128i *) ((const int8_t *) w + i))));
    default:
        return _mm512_loadu_ps((const float *) w + i);
    }
}


static inline __attribute__((always_inline)) __m512
ld16_mask(const void *w, int type, int64_t i, __mmask16 m)
{
    switch (type) {
    case LLM_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                   m, (const uint16_t *) w + i));
    case LLM_LORA_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                   _mm_maskz_loadu_epi8(m, (const int8_t *) w + i)));
    default:
        return _mm512_maskz_loadu_ps(m, (const float *) w + i);
    }
}


static inline __mmask16
tail_mask(int64_t n)
{
    return (__mmask16) ((1u << n) - 1);
}


/* n rows against one weight row; n and type constants after inlining. */
static inline __attribute__((always_inline)) void
shrink_n(const void *a, const int type, int64_t in, const float *const *x,
         const int n, float *t, int64_t ts)
{
    __m512  acc0[4], acc1[4], w0, w1;
    int64_t i = 0;
    int     r;

    for (r = 0; r < n; r++) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    for (; i + 32 <= in; i += 32) {
        w0 = ld16(a, type, i);
        w1 = ld16(a, type, i + 16);
        for (r = 0; r < n; r++) {
            acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + i),
                                      acc0[r]);
            acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + i + 16),
                                      acc1[r]);
        }
    }
    for (; i < in; i += 16) {
        __mmask16 m = in - i >= 16 ? (__mmask16) 0xffff : tail_mask(in - i);

        w0 = ld16_mask(a, type, i, m);
        for (r = 0; r < n; r++) {
            acc0[r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x[r] + i),
                                      acc0[r]);
        }
    }
    for (r = 0; r < n; r++) {
        t[r * ts] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
    }
}


#define SHRINK_ROWS(type)                                                   \
    switch (n) {                                                            \
    case 1: shrink_n(a, type, in, x, 1, t, ts); break;                      \
    case 2: shrink_n(a, type, in, x, 2, t, ts); break;                      \
    case 3: shrink_n(a, type, in, x, 3, t, ts); break;                      \
    default: shrink_n(a, type, in, x, 4, t, ts); break;                     \
    }

void
llm_cpu_lora_shrink_avx512(const void *a, int type, int64_t in,
                           const float *const *x, int n, float *t,
                           int64_t ts)
{
    switch (type) {
    case LLM_F16:
        SHRINK_ROWS(LLM_F16);
        break;
    case LLM_LORA_I8:
        SHRINK_ROWS(LLM_LORA_I8);
        break;
    default:
        SHRINK_ROWS(LLM_F32);
        break;
    }
}


/* In place: r[i] lane j <- r[j] lane i. */
static inline void
transpose16(__m512 *r)
{
    __m512 t[16], u0, u1, u2, u3;
    int    i, m;

    for (i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    /* r[4q + m], 128-bit lane L: element 4L + m of rows 4q .. 4q + 3 */
    for (i = 0; i < 16; i += 4) {
        __m512d a = _mm512_castps_pd(t[i]), c = _mm512_castps_pd(t[i + 2]);
        __m512d b = _mm512_castps_pd(t[i + 1]);
        __m512d d = _mm512_castps_pd(t[i + 3]);

        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* then a 4 x 4 transpose of 128-bit lanes for each m */
    for (m = 0; m < 4; m++) {
        t[m] = r[m];
        t[4 + m] = r[4 + m];
        t[8 + m] = r[8 + m];
        t[12 + m] = r[12 + m];
    }
    for (m = 0; m < 4; m++) {
        u0 = _mm512_shuffle_f32x4(t[m], t[4 + m], 0x44);
        u1 = _mm512_shuffle_f32x4(t[m], t[4 + m], 0xee);
        u2 = _mm512_shuffle_f32x4(t[8 + m], t[12 + m], 0x44);
        u3 = _mm512_shuffle_f32x4(t[8 + m], t[12 + m], 0xee);
        r[m] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        r[4 + m] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
        r[8 + m] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        r[12 + m] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
    }
}


/* f32, B [out, rank]: per block of 16 outputs and 16 ranks, the block
 * transposed in registers (col[j] = B[ob .. ob + 15][c + j]); then
 * out[r] += scale * sum_j t[r][c + j] * col[j]. */
static void
expand_f32(const void *b, int rank, const float *t, int n, float scale,
           float *out, int64_t os, int64_t o0, int64_t o1)
{
    __m512     col[16], sc = _mm512_set1_ps(scale), acc, o;
    __mmask16  om, cm;
    int64_t    ob;
    int        c, cw, k, j, r, rows;

    for (ob = o0; ob < o1; ob += 16) {
        rows = o1 - ob < 16 ? (int) (o1 - ob) : 16;
        om = rows == 16 ? (__mmask16) 0xffff : tail_mask(rows);
        for (c = 0; c < rank; c += 16) {
            cw = rank - c < 16 ? rank - c : 16;
            cm = cw == 16 ? (__mmask16) 0xffff : tail_mask(cw);
            for (k = 0; k < 16; k++) {
                col[k] = k < rows ? ld16_mask(b, LLM_F32, (ob + k) * rank + c,
                                              cm)
                                  : _mm512_setzero_ps();
            }
            transpose16(col);
            for (j = cw; j < 16; j++) {
                col[j] = _mm512_setzero_ps();
            }
            for (r = 0; r < n; r++) {
                const float *tr = t + (int64_t) r * rank + c;
                __m512       a[4];

                /* four chains (j mod 4), summed in one fixed order */
                for (j = 0; j < 4; j++) {
                    a[j] = _mm512_mul_ps(_mm512_set1_ps(j < cw ? tr[j] : 0),
                                         col[j]);
                }
                for (j = 4; j < cw; j++) {
                    a[j & 3] = _mm512_fmadd_ps(_mm512_set1_ps(tr[j]), col[j],
                                               a[j & 3]);
                }
                acc = _mm512_add_ps(_mm512_add_ps(a[0], a[1]),
                                    _mm512_add_ps(a[2], a[3]));
                o = _mm512_maskz_loadu_ps(om, out + r * os + ob);
                _mm512_mask_storeu_ps(out + r * os + ob, om,
                                      _mm512_fmadd_ps(sc, acc, o));
            }
        }
    }
}


/*
 * f16 or int8, B^T [rank, od]: for a tile of outputs and up to EXP_ROWS rows,
 * d[r] = sum_j t[r][j] * B^T row j, walking each B^T row's tile in
 * memory order (one stream at a time, a tile's delta in L1), then
 * out[r] += scale * d[r].  Sums run over j in order, whatever the rows.
 */
#define EXP_TILE  2048
#define EXP_ROWS  4

static inline __attribute__((always_inline)) void
expand_t(const void *bt, const int type, int rank, int64_t od,
         const float *t, int n, float scale, float *out, int64_t os,
         int64_t o0, int64_t o1)
{
    __m512     d[EXP_ROWS][EXP_TILE / 16], sc = _mm512_set1_ps(scale), w;
    __m512     tj[EXP_ROWS], tj1[EXP_ROWS], tj2[EXP_ROWS], tj3[EXP_ROWS];
    __mmask16  m;
    int64_t    tb, o, len, nv, v;
    int        r0, nr, r, j;

    for (tb = o0; tb < o1; tb += EXP_TILE) {
        len = o1 - tb < EXP_TILE ? o1 - tb : EXP_TILE;
        nv = (len + 15) / 16;
        for (r0 = 0; r0 < n; r0 += EXP_ROWS) {
            nr = n - r0 < EXP_ROWS ? n - r0 : EXP_ROWS;
            for (r = 0; r < nr; r++) {
                for (v = 0; v < nv; v++) {
                    d[r][v] = _mm512_setzero_ps();
                }
            }
            /* four B^T rows per pass over the tile: four streams in
             * flight and one load / store of a delta per four FMAs; each
             * delta still sums over j in order */
            for (j = 0; j + 4 <= rank; j += 4) {
                int64_t         row = (int64_t) j * od + tb;
                __m512          w1, w2, w3;

                for (r = 0; r < nr; r++) {
                    const float *tr = t + (int64_t) (r0 + r) * rank + j;

                    tj[r] = _mm512_set1_ps(tr[0]);
                    tj1[r] = _mm512_set1_ps(tr[1]);
                    tj2[r] = _mm512_set1_ps(tr[2]);
                    tj3[r] = _mm512_set1_ps(tr[3]);
                }
                for (v = 0; v < nv; v++) {
                    o = 16 * v;
                    m = len - o >= 16 ? (__mmask16) 0xffff
                                      : tail_mask(len - o);
                    w = ld16_mask(bt, type, row + o, m);
                    w1 = ld16_mask(bt, type, row + od + o, m);
                    w2 = ld16_mask(bt, type, row + 2 * od + o, m);
                    w3 = ld16_mask(bt, type, row + 3 * od + o, m);
                    for (r = 0; r < nr; r++) {
                        __m512 acc = _mm512_fmadd_ps(tj[r], w, d[r][v]);

                        acc = _mm512_fmadd_ps(tj1[r], w1, acc);
                        acc = _mm512_fmadd_ps(tj2[r], w2, acc);
                        d[r][v] = _mm512_fmadd_ps(tj3[r], w3, acc);
                    }
                }
            }
            for (; j < rank; j++) {
                int64_t row = (int64_t) j * od + tb;

                for (r = 0; r < nr; r++) {
                    tj[r] = _mm512_set1_ps(t[(int64_t) (r0 + r) * rank + j]);
                }
                for (v = 0; v < nv; v++) {
                    o = 16 * v;
                    m = len - o >= 16 ? (__mmask16) 0xffff
                                      : tail_mask(len - o);
                    w = ld16_mask(bt, type, row + o, m);
                    for (r = 0; r < nr; r++) {
                        d[r][v] = _mm512_fmadd_ps(tj[r], w, d[r][v]);
                    }
                }
            }
            for (r = 0; r < nr; r++) {
                float *orow = out + (int64_t) (r0 + r) * os + tb;

                for (v = 0; v < nv; v++) {
                    o = 16 * v;
                    m = len - o >= 16 ? (__mmask16) 0xffff
                                      : tail_mask(len - o);
                    _mm512_mask_storeu_ps(orow + o, m,
                        _mm512_fmadd_ps(sc, d[r][v],
                                        _mm512_maskz_loadu_ps(m, orow + o)));
                }
            }
        }
    }
}


void
llm_cpu_lora_expand_avx512(const void *b, int type, int rank, int64_t od,
                           const float *t, int n, float scale, float *out,
                           int64_t os, int64_t o0, int64_t o1)
{
    switch (type) {
    case LLM_F16:
        expand_t(b, LLM_F16, rank, od, t, n, scale, out, os, o0, o1);
        break;
    case LLM_LORA_I8:
        /* t comes scaled by the rows' scales (lora.c) */
        expand_t(b, LLM_LORA_I8, rank, od, t, n, scale, out, os, o0, o1);
        break;
    default:
        expand_f32(b, rank, t, n, scale, out, os, o0, o1);
        break;
    }
}
