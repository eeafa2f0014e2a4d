/*
 * The row kernels of the multi-LoRA op (lora.c) with AVX-512: f32 or f16
 * weights (converted with vcvtph2ps as they are loaded), f32 sums.
 *
 *   shrink: t[r * ts] = dot(x[r], a)              r < n <= 4 rows
 *   expand: out[o] += scale * dot(t, B row o)     o in [o0, o1)
 *
 * Expand works on 16 outputs at a time: sixteen products of a B row
 * with t, then one transposing reduction gives the sixteen sums in one
 * vector (B keeps its [out, rank] layout; no packing at upload).
 */
#include <immintrin.h>

#include "cpu.h"


/* 16 weights from element i of w (f16 or f32), or the first of them that
 * mask m selects (the others 0). */
static inline __m512
ld16(const void *w, int f16, int64_t i)
{
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256(
                     (const __m256i *) ((const uint16_t *) w + i)))
               : _mm512_loadu_ps((const float *) w + i);
}


static inline __m512
ld16_mask(const void *w, int f16, int64_t i, __mmask16 m)
{
    return f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                     m, (const uint16_t *) w + i))
               : _mm512_maskz_loadu_ps(m, (const float *) w + i);
}


static inline __mmask16
tail_mask(int64_t n)
{
    return (__mmask16) ((1u << n) - 1);
}


/* n rows against one weight row; n a constant after inlining. */
static inline __attribute__((always_inline)) void
shrink_n(const void *a, int f16, int64_t in, const float *const *x,
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
        w0 = ld16(a, f16, i);
        w1 = ld16(a, f16, i + 16);
        for (r = 0; r < n; r++) {
            acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + i),
                                      acc0[r]);
            acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + i + 16),
                                      acc1[r]);
        }
    }
    for (; i < in; i += 16) {
        __mmask16 m = in - i >= 16 ? (__mmask16) 0xffff : tail_mask(in - i);

        w0 = ld16_mask(a, f16, i, m);
        for (r = 0; r < n; r++) {
            acc0[r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x[r] + i),
                                      acc0[r]);
        }
    }
    for (r = 0; r < n; r++) {
        t[r * ts] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
    }
}


void
llm_cpu_lora_shrink_avx512(const void *a, int type, int64_t in,
                           const float *const *x, int n, float *t,
                           int64_t ts)
{
    int f16 = type == LLM_F16;

    switch (n) {
    case 1:
        shrink_n(a, f16, in, x, 1, t, ts);
        break;
    case 2:
        shrink_n(a, f16, in, x, 2, t, ts);
        break;
    case 3:
        shrink_n(a, f16, in, x, 3, t, ts);
        break;
    default:
        shrink_n(a, f16, in, x, 4, t, ts);
        break;
    }
}


/*
 * The sums of the 16 lanes of each of v[0..15], as one vector (lane k:
 * the sum of v[k]).  Pairs, then quads of 128-bit lanes, then across the
 * four 128-bit lanes.
 */
static inline __m512
hsum16(const __m512 *v)
{
    __m512 a[8], b[4], c0, c1, d01, d23;
    int    i;

    for (i = 0; i < 8; i++) {
        /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    }
    for (i = 0; i < 4; i++) {
        /* per 128-bit lane: the lane's sums of v[4i .. 4i + 3] */
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]),
                                        _mm512_castps_pd(a[2 * i + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]),
                                        _mm512_castps_pd(a[2 * i + 1]));

        b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    c0 = _mm512_shuffle_f32x4(b[0], b[1], 0x44);
    c1 = _mm512_shuffle_f32x4(b[0], b[1], 0xee);
    d01 = _mm512_add_ps(c0, c1);
    c0 = _mm512_shuffle_f32x4(b[2], b[3], 0x44);
    c1 = _mm512_shuffle_f32x4(b[2], b[3], 0xee);
    d23 = _mm512_add_ps(c0, c1);
    return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88),
                         _mm512_shuffle_f32x4(d01, d23, 0xdd));
}


void
llm_cpu_lora_expand_avx512(const void *b, int type, int rank,
                           const float *t, float scale, float *out,
                           int64_t o0, int64_t o1)
{
    __m512     tv[16], p[16], sc = _mm512_set1_ps(scale);
    __mmask16  last;
    int        f16 = type == LLM_F16, nc, c, k;
    int64_t    o;

    if (rank > 16 * 16) {
        return;                 /* LLM_LORA_MAX_RANK is 256 */
    }
    nc = (rank + 15) / 16;
    last = rank % 16 ? tail_mask(rank % 16) : (__mmask16) 0xffff;
    for (c = 0; c < nc; c++) {
        tv[c] = _mm512_maskz_loadu_ps(c == nc - 1 ? last : 0xffff,
                                      t + 16 * c);
    }

    for (o = o0; o + 16 <= o1; o += 16) {
        for (k = 0; k < 16; k++) {
            int64_t row = (o + k) * rank;

            p[k] = _mm512_mul_ps(ld16_mask(b, f16, row,
                                           nc == 1 ? last : 0xffff), tv[0]);
            for (c = 1; c < nc; c++) {
                p[k] = _mm512_fmadd_ps(ld16_mask(b, f16, row + 16 * c,
                                                 c == nc - 1 ? last
                                                             : 0xffff),
                                       tv[c], p[k]);
            }
        }
        _mm512_storeu_ps(out + o, _mm512_fmadd_ps(sc, hsum16(p),
                                                  _mm512_loadu_ps(out + o)));
    }
    for (; o < o1; o++) {
        __m512 q = _mm512_mul_ps(ld16_mask(b, f16, o * rank,
                                           nc == 1 ? last : 0xffff), tv[0]);

        for (c = 1; c < nc; c++) {
            q = _mm512_fmadd_ps(ld16_mask(b, f16, o * rank + 16 * c,
                                          c == nc - 1 ? last : 0xffff),
                                tv[c], q);
        }
        out[o] += scale * _mm512_reduce_add_ps(q);
    }
}
