/*
 * AVX-512 vector helpers of the CPU backend: f16 rows, exp, SiLU and the
 * inner loops of attention (see cpu.h: llm_cpu_kernels).
 */
#include "cpu.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define INLINE  static inline __attribute__((always_inline))


/*
 * exp(x) to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in
 * two parts so r is exact), exp(r) by its Taylor polynomial to r^7
 * (remainder < 4e-9 relative), then scaled by 2^n with vscalefps, which
 * also gives 0 / inf on under- and overflow.
 */
INLINE __m512
exp512(__m512 x)
{
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    __m512       n, r, p;

    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)),
                      _mm512_set1_ps(-104.0f));
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fnmadd_ps(n, ln2hi, x);
    r = _mm512_fnmadd_ps(n, ln2lo, r);

    p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}


static void
f16_to_f32_avx512(const uint16_t *src, float *dst, int64_t n)
{
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(
            _mm256_loadu_si256((const __m256i *) (src + i))));
    }
    if (i < n) {
        __mmask16 m = (__mmask16) ((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(
            _mm256_maskz_loadu_epi16(m, src + i)));
    }
}


static void
f32_to_f16_avx512(const float *src, uint16_t *dst, int64_t n)
{
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_si256((__m256i *) (dst + i), _mm512_cvtps_ph(
            _mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
    if (i < n) {
        __mmask16 m = (__mmask16) ((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtps_ph(
            _mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT));
    }
}


/* Q8_0 as the reference quantizer: d = amax / 127, q = round(x / d) with
 * ties away from zero (roundf), |q| <= 127.  Rounding: the truncation t
 * and the fraction v - t are exact, so |v - t| >= 0.5 decides. */
INLINE __m512i
q8_round(__m512 v)
{
    __m512    t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO
                                          | _MM_FROUND_NO_EXC);
    __m512    f = _mm512_abs_ps(_mm512_sub_ps(v, t));
    __mmask16 up = _mm512_cmp_ps_mask(f, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    __m512    one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(
                        v, _mm512_set1_ps(-0.0f)));
    __m512i   q = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, one));

    return _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)),
                            _mm512_set1_epi32(-127));
}


static void
quant_q8_0_avx512(const float *x, void *dst, int64_t n)
{
    uint8_t *b = dst;
    int64_t  i;

    for (i = 0; i + 32 <= n; i += 32, b += 34) {
        __m512 a0 = _mm512_loadu_ps(x + i), a1 = _mm512_loadu_ps(x + i + 16);
        float  amax = _mm512_reduce_max_ps(_mm512_max_ps(
                          _mm512_abs_ps(a0), _mm512_abs_ps(a1)));
        float  d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m512 s = _mm512_set1_ps(id);
        uint16_t h = (uint16_t) _mm_extract_epi16(
                         _mm_cvtps_ph(_mm_set_ss(d), _MM_FROUND_TO_NEAREST_INT),
                         0);

        memcpy(b, &h, 2);
        _mm_storeu_si128((__m128i *) (b + 2),
                         _mm512_cvtepi32_epi8(q8_round(_mm512_mul_ps(a0, s))));
        _mm_storeu_si128((__m128i *) (b + 18),
                         _mm512_cvtepi32_epi8(q8_round(_mm512_mul_ps(a1, s))));
    }
}


static float
vmax_avx512(const float *x, int64_t n)
{
    __m512  m = _mm512_set1_ps(x[0]);
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    }
    if (i < n) {
        __mmask16 k = (__mmask16) ((1u << (n - i)) - 1);
        m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, x + i));
    }
    return _mm512_reduce_max_ps(m);
}


static float
exp_sum_avx512(float *x, int64_t n, float max)
{
    const __m512 mv = _mm512_set1_ps(max);
    __m512       sum = _mm512_setzero_ps();
    int64_t      i = 0;

    for (; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
        __mmask16 m = (__mmask16) ((1u << (n - i)) - 1);
        __m512    e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i),
                                           mv));
        _mm512_mask_storeu_ps(x + i, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    return _mm512_reduce_add_ps(sum);
}


INLINE __m512
silu_mul16(__m512 g, __m512 u)
{
    __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(e,
                                                        _mm512_set1_ps(1.0f))),
                         u);
}


static void
silu_mul_avx512(float *out, const float *gate, const float *up, int64_t n)
{
    int64_t i = 0;

    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(out + i, silu_mul16(_mm512_loadu_ps(gate + i),
                                             _mm512_loadu_ps(up + i)));
    }
    if (i < n) {
        __mmask16 m = (__mmask16) ((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m,
                              silu_mul16(_mm512_maskz_loadu_ps(m, gate + i),
                                         _mm512_maskz_loadu_ps(m, up + i)));
    }
}


/* ------------------------------------------------------------ attention */

INLINE __m512
kv_load(const void *p, int type, size_t i, __mmask16 m)
{
    if (type == LLM_Q8_0) {
        /* 16 lanes never straddle a block: i % 16 == 0; a chunk wholly
         * past the row (accum_g's groups of four chunks) has no block,
         * so no scale to read */
        const uint8_t *b = (const uint8_t *) p + i / 32 * 34;
        __m512         d;

        if (m == 0) {
            return _mm512_setzero_ps();
        }
        d = _mm512_cvtph_ps(_mm256_set1_epi16(*(const short *) b));

        return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_maskz_loadu_epi8(m, b + 2 + i % 32))));
    }
    if (type == LLM_F16) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            m, (const uint16_t *) p + i));
    }
    return _mm512_maskz_loadu_ps(m, (const float *) p + i);
}


static void
dequant_q8_0_avx512(const void *src, float *dst, int64_t n)
{
    int64_t i;

    for (i = 0; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(dst + i, kv_load(src, LLM_Q8_0, (size_t) i,
                                          0xffff));
    }
}


/* Masks of the 16-lane chunks c .. c+3 of a head_dim of hd. */
INLINE __mmask16
chunk_mask(int hd, int c)
{
    int left = hd - 16 * c;

    return left >= 16 ? 0xffff : left <= 0 ? 0
                                           : (__mmask16) ((1u << left) - 1);
}


/* The sums of 4 vectors, as the low 4 lanes of the result. */
INLINE __m128
sum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3)
{
    __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1),
                               _mm512_unpackhi_ps(v0, v1));
    __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3),
                               _mm512_unpackhi_ps(v2, v3));
    /* each 128-bit lane: partial sums of v0, v1, v2, v3 */
    __m512 u = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01),
                                            _mm512_castps_pd(t23))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01),
                                            _mm512_castps_pd(t23))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                             _mm512_extractf32x8_ps(u, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}


/*
 * Scores of G (<= 4) query heads against positions i0 .. i0+3 (NP = 4) or
 * i0 alone (NP = 1): the K rows are converted once per chunk and used by
 * every head; four positions' sums are reduced together.
 */
INLINE void
scores_tile(const float *q, int G, int NP, int hd, const void *k, int type,
            size_t stride, int i0, float scale, float *s, int s_stride)
{
    __m512 acc[4][4];
    int    c, h, p;

#pragma GCC unroll 4
    for (p = 0; p < NP; p++) {
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            acc[p][h] = _mm512_setzero_ps();
        }
    }
    for (c = 0; 16 * c < hd; c++) {
        __mmask16 m = chunk_mask(hd, c);
        __m512    kv[4];
#pragma GCC unroll 4
        for (p = 0; p < NP; p++) {
            kv[p] = kv_load(k, type, (size_t) (i0 + p) * stride + 16 * c, m);
        }
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            __m512 qv = _mm512_maskz_loadu_ps(m, q + h * hd + 16 * c);
#pragma GCC unroll 4
            for (p = 0; p < NP; p++) {
                acc[p][h] = _mm512_fmadd_ps(kv[p], qv, acc[p][h]);
            }
        }
    }
#pragma GCC unroll 4
    for (h = 0; h < G; h++) {
        if (NP == 4) {
            _mm_storeu_ps(s + h * s_stride + i0, _mm_mul_ps(
                sum4(acc[0][h], acc[1][h], acc[2][h], acc[3][h]),
                _mm_set1_ps(scale)));
        } else {
            s[h * s_stride + i0] = _mm512_reduce_add_ps(acc[0][h]) * scale;
        }
    }
}


/* Prefetches rows i0 .. i0+np-1 of pf (hd elements of type each): a
 * few lines per tile, so that they overlap the tile's arithmetic. */
INLINE void
prefetch_tile(const void *pf, int np, int hd, int type, size_t stride,
              int i0)
{
    int p;

    if (pf == NULL) {
        return;
    }
    for (p = 0; p < np; p++) {
        llm_cpu_prefetch((const uint8_t *) pf
                         + llm_kv_bytes(type, (size_t) (i0 + p) * stride),
                         llm_kv_bytes(type, (size_t) hd));
    }
}


INLINE void
scores_g(const float *q, int G, int hd, const void *k, int type,
         size_t stride, int n, float scale, float *s, int s_stride,
         const void *pf)
{
    int    i = 0;

    for (; i + 4 <= n; i += 4) {
        prefetch_tile(pf, 4, hd, type, stride, i);
        scores_tile(q, G, 4, hd, k, type, stride, i, scale, s, s_stride);
    }
    for (; i < n; i++) {
        prefetch_tile(pf, 1, hd, type, stride, i);
        scores_tile(q, G, 1, hd, k, type, stride, i, scale, s, s_stride);
    }
}


static void
attn_scores_avx512(const float *q, int g, int hd, const void *k,
                   int kv_type, size_t stride, int n, float scale,
                   float *s, int s_stride, const void *pf)
{
    int h0;

    /* heads in groups of up to 4, each with its own accumulators */
    for (h0 = 0; h0 < g; h0 += 4) {
        const float *qh = q + (size_t) h0 * hd;
        float       *sh = s + (size_t) h0 * s_stride;
        const void  *p = h0 == 0 ? pf : NULL;   /* once per row */

        switch (g - h0 >= 4 ? 4 : g - h0) {
        case 4: scores_g(qh, 4, hd, k, kv_type, stride, n, scale, sh,
                         s_stride, p); break;
        case 3: scores_g(qh, 3, hd, k, kv_type, stride, n, scale, sh,
                         s_stride, p); break;
        case 2: scores_g(qh, 2, hd, k, kv_type, stride, n, scale, sh,
                         s_stride, p); break;
        default: scores_g(qh, 1, hd, k, kv_type, stride, n, scale, sh,
                          s_stride, p); break;
        }
    }
}


/*
 * Prefill tiles: the scores of many query rows against one block held
 * transposed, kt[d][p] = k_p[d] (16 positions per vector), so that each
 * position's sum is built from broadcast products without reducing
 * across lanes.  The arithmetic is that of scores_tile with NP = 4, lane
 * by lane: lane l of chunk c holds the chain over c of k[16c + l] *
 * q[16c + l], and sum4 adds the 16 lanes as (C0 + C2) + (C1 + C3) with
 * C_j = (x[4j] + x[4j+2]) + (x[4j+1] + x[4j+3]).  So a token's scores
 * are the same bits in a tile as alone, for positions in whole groups
 * of four (the caller does the rest with attn_scores).
 */

/* 16 x 16 f32 transpose in registers. */
INLINE void
transpose16(__m512 r[16])
{
    __m512 t[16], u[16];
    int    i;

#pragma GCC unroll 8
    for (i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (i = 0; i < 4; i++) {
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    /* u[4i + j]: rows 4i .. 4i+3, column j of each 128-bit lane */
#pragma GCC unroll 4
    for (i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xdd);
    }
#pragma GCC unroll 4
    for (i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}


static void
kt_build_avx512(const float *rows, size_t stride, int n, int hd, float *kt)
{
    int c, p;

    for (c = 0; 16 * c < hd; c++) {
        __mmask16 m = chunk_mask(hd, c);
        __m512    r[16];

#pragma GCC unroll 16
        for (p = 0; p < 16; p++) {
            r[p] = p < n ? _mm512_maskz_loadu_ps(m, rows + (size_t) p * stride
                                                    + 16 * c)
                         : _mm512_setzero_ps();
        }
        transpose16(r);
#pragma GCC unroll 16
        for (p = 0; p < 16; p++) {
            _mm512_store_ps(kt + (size_t) (16 * c + p) * 16, r[p]);
        }
    }
}


/* Lane l's chain for R rows: the sum over chunks of kt[16c + l] q[16c + l]
 * (a chunk past hd adds the +0 that a masked lane's product is). */
INLINE void
kt_chain(const float *kt, int hd, const float *const *qr, int R, int l,
         __m512 *acc)
{
    int c, r;

#pragma GCC unroll 4
    for (r = 0; r < R; r++) {
        acc[r] = _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (c = 0; 16 * c < hd; c++) {
        int d = 16 * c + l;

        if (d < hd) {
            __m512 k = _mm512_load_ps(kt + (size_t) d * 16);
#pragma GCC unroll 4
            for (r = 0; r < R; r++) {
                acc[r] = _mm512_fmadd_ps(k, _mm512_set1_ps(qr[r][d]), acc[r]);
            }
        } else {
#pragma GCC unroll 4
            for (r = 0; r < R; r++) {
                acc[r] = _mm512_add_ps(acc[r], _mm512_setzero_ps());
            }
        }
    }
}


/* C_j of sum4 for R rows: (x[4j] + x[4j+2]) + (x[4j+1] + x[4j+3]). */
INLINE void
kt_quad(const float *kt, int hd, const float *const *qr, int R, int j,
        __m512 *cj)
{
    __m512 a[4], b[4], e[4];
    int    r;

    kt_chain(kt, hd, qr, R, 4 * j, a);
    kt_chain(kt, hd, qr, R, 4 * j + 2, b);
#pragma GCC unroll 4
    for (r = 0; r < R; r++) {
        e[r] = _mm512_add_ps(a[r], b[r]);
    }
    kt_chain(kt, hd, qr, R, 4 * j + 1, a);
    kt_chain(kt, hd, qr, R, 4 * j + 3, b);
#pragma GCC unroll 4
    for (r = 0; r < R; r++) {
        cj[r] = _mm512_add_ps(e[r], _mm512_add_ps(a[r], b[r]));
    }
}


INLINE void
kt_rows(const float *kt, int hd, const float *const *qr, int R, float scale,
        float *const *sr, __mmask16 m)
{
    __m512 c0[4], c1[4], c2[4];
    int    r;

    kt_quad(kt, hd, qr, R, 0, c0);
    kt_quad(kt, hd, qr, R, 2, c2);
#pragma GCC unroll 4
    for (r = 0; r < R; r++) {
        c0[r] = _mm512_add_ps(c0[r], c2[r]);
    }
    kt_quad(kt, hd, qr, R, 1, c1);
    kt_quad(kt, hd, qr, R, 3, c2);
#pragma GCC unroll 4
    for (r = 0; r < R; r++) {
        __m512 v = _mm512_add_ps(c0[r], _mm512_add_ps(c1[r], c2[r]));
        _mm512_mask_storeu_ps(sr[r], m, _mm512_mul_ps(v,
                                                      _mm512_set1_ps(scale)));
    }
}


static void
attn_scores_kt_avx512(const float *kt, int hd, const float *q, int g,
                      size_t q_tok, int nt, float scale, float *s,
                      int s_stride, size_t s_tok, int n)
{
    __mmask16    m = n >= 16 ? 0xffff : (__mmask16) ((1u << n) - 1);
    int          rows = nt * g, r0, r;
    const float *qr[4];
    float       *sr[4];

    for (r0 = 0; r0 < rows; r0 += 4) {
        int R = rows - r0 < 4 ? rows - r0 : 4;

        for (r = 0; r < R; r++) {
            int k = (r0 + r) / g, h = (r0 + r) % g;

            qr[r] = q + (size_t) k * q_tok + (size_t) h * hd;
            sr[r] = s + (size_t) k * s_tok + (size_t) h * s_stride;
        }
        /* the common head sizes with their loops unrolled */
        if (R == 4 && hd == 64) {
            kt_rows(kt, 64, qr, 4, scale, sr, m);
        } else if (R == 4 && hd == 128) {
            kt_rows(kt, 128, qr, 4, scale, sr, m);
        } else {
            switch (R) {
            case 4: kt_rows(kt, hd, qr, 4, scale, sr, m); break;
            case 3: kt_rows(kt, hd, qr, 3, scale, sr, m); break;
            case 2: kt_rows(kt, hd, qr, 2, scale, sr, m); break;
            default: kt_rows(kt, hd, qr, 1, scale, sr, m); break;
            }
        }
    }
}


/* o[h][c0 .. c0+63] += sum_i p[h][i] v_i for G (<= 4) heads: 4 chunks of
 * 16 per head in registers, each V chunk converted once. */
INLINE void
accum_g(float *o, int G, int hd, int c0, const float *p, int p_stride,
        const void *v, int type, size_t stride, int n, const void *pf)
{
    __m512    acc[4][4];
    __mmask16 m[4];
    int       i, h, c;

#pragma GCC unroll 4
    for (c = 0; c < 4; c++) {
        m[c] = chunk_mask(hd, c0 / 16 + c);
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            acc[h][c] = _mm512_maskz_loadu_ps(m[c], o + h * hd + c0 + 16 * c);
        }
    }
    for (i = 0; i < n; i++) {
        __m512 vv[4];

        prefetch_tile(pf, 1, hd, type, stride, i);
#pragma GCC unroll 4
        for (c = 0; c < 4; c++) {
            vv[c] = kv_load(v, type, (size_t) i * stride + c0 + 16 * c, m[c]);
        }
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            __m512 pb = _mm512_set1_ps(p[h * p_stride + i]);
#pragma GCC unroll 4
            for (c = 0; c < 4; c++) {
                acc[h][c] = _mm512_fmadd_ps(pb, vv[c], acc[h][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (c = 0; c < 4; c++) {
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            _mm512_mask_storeu_ps(o + h * hd + c0 + 16 * c, m[c], acc[h][c]);
        }
    }
}


static void
attn_accum_avx512(float *o, int g, int hd, const float *p, int p_stride,
                  const void *v, int kv_type, size_t stride, int n,
                  const void *pf)
{
    int h0, c0;

    for (h0 = 0; h0 < g; h0 += 4) {
        float       *oh = o + (size_t) h0 * hd;
        const float *ph = p + (size_t) h0 * p_stride;

        for (c0 = 0; c0 < hd; c0 += 64) {
            /* the next rows, once */
            const void *f = h0 == 0 && c0 == 0 ? pf : NULL;

            switch (g - h0 >= 4 ? 4 : g - h0) {
            case 4: accum_g(oh, 4, hd, c0, ph, p_stride, v, kv_type, stride,
                            n, f); break;
            case 3: accum_g(oh, 3, hd, c0, ph, p_stride, v, kv_type, stride,
                            n, f); break;
            case 2: accum_g(oh, 2, hd, c0, ph, p_stride, v, kv_type, stride,
                            n, f); break;
            default: accum_g(oh, 1, hd, c0, ph, p_stride, v, kv_type, stride,
                             n, f); break;
            }
        }
    }
}


void
llm_cpu_vec_avx512(llm_cpu_kernels *k)
{
    k->f16_to_f32 = f16_to_f32_avx512;
    k->f32_to_f16 = f32_to_f16_avx512;
    k->quant_q8_0 = quant_q8_0_avx512;
    k->dequant_q8_0 = dequant_q8_0_avx512;
    k->vmax = vmax_avx512;
    k->exp_sum = exp_sum_avx512;
    k->silu_mul = silu_mul_avx512;
    k->attn_scores = attn_scores_avx512;
    k->attn_accum = attn_accum_avx512;
    k->kt_build = kt_build_avx512;
    k->attn_scores_kt = attn_scores_kt_avx512;
}
