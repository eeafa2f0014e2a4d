/*
 * AVX2 (+FMA, F16C) vector helpers of the CPU backend: f16 rows, exp,
 * SiLU and the inner loops of attention (see cpu.h: llm_cpu_kernels).
 * Tails shorter than 8 elements are done in scalar code.
 */
#include "cpu.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define INLINE  static inline __attribute__((always_inline))


INLINE float
hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v),
                          _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


/*
 * exp(x) as in vec_avx512.c, with 2^n built in the exponent bits; inputs
 * are clamped to [-87.3, 88.7] so that 2^n stays a normal float (results
 * below 1e-38 are not flushed to 0, which no caller minds).
 */
INLINE __m256
exp256(__m256 x)
{
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2hi = _mm256_set1_ps(0.693359375f);
    const __m256 ln2lo = _mm256_set1_ps(-2.12194440e-4f);
    __m256       n, r, p;
    __m256i      e;

    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.7f)),
                      _mm256_set1_ps(-87.3f));
    n = _mm256_round_ps(_mm256_mul_ps(x, log2e),
                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_fnmadd_ps(n, ln2hi, x);
    r = _mm256_fnmadd_ps(n, ln2lo, r);

    p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));

    /* n is in [-126, 128]: 2^n = (n + 127) << 23, split in two factors
     * so that n = 128 does not overflow the exponent field */
    e = _mm256_cvtps_epi32(n);
    {
        __m256i h = _mm256_srai_epi32(e, 1);
        __m256  s1 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
        __m256  s2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_sub_epi32(e, h), _mm256_set1_epi32(127)),
            23));
        return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    }
}


static void
f16_to_f32_avx2(const uint16_t *src, float *dst, int64_t n)
{
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(
            _mm_loadu_si128((const __m128i *) (src + i))));
    }
    for (; i < n; i++) {
        dst[i] = _cvtsh_ss(src[i]);
    }
}


static void
f32_to_f16_avx2(const float *src, uint16_t *dst, int64_t n)
{
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *) (dst + i), _mm256_cvtps_ph(
            _mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) {
        dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
    }
}


/* Q8_0 as the reference quantizer (see vec_avx512.c's q8_round): ties
 * away from zero through the exact truncation and fraction. */
INLINE __m256i
q8_round(__m256 v)
{
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
    __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f),
                              _mm256_and_ps(v, _mm256_set1_ps(-0.0f)));
    __m256 up = _mm256_cmp_ps(f, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    __m256i q = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, one)));

    return _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)),
                            _mm256_set1_epi32(-127));
}


static void
quant_q8_0_avx2(const float *x, void *dst, int64_t n)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    uint8_t     *b = dst;
    int64_t      i;
    int          k;

    for (i = 0; i + 32 <= n; i += 32, b += 34) {
        __m256  a[4], m;
        __m128  m4;
        __m256i q[4], p01, p23, p;
        float   amax, d, id;
        uint16_t h;

        for (k = 0; k < 4; k++) {
            a[k] = _mm256_loadu_ps(x + i + 8 * k);
        }
        m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]),
                                        _mm256_andnot_ps(sign, a[1])),
                          _mm256_max_ps(_mm256_andnot_ps(sign, a[2]),
                                        _mm256_andnot_ps(sign, a[3])));
        m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        amax = _mm_cvtss_f32(m4);
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        for (k = 0; k < 4; k++) {
            q[k] = q8_round(_mm256_mul_ps(a[k], _mm256_set1_ps(id)));
        }
        /* 32 int32 -> 32 int8 in order (the packs work per 128-bit lane) */
        p01 = _mm256_packs_epi32(q[0], q[1]);
        p23 = _mm256_packs_epi32(q[2], q[3]);
        p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5,
                                                            2, 6, 3, 7));
        h = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(b, &h, 2);
        _mm256_storeu_si256((__m256i *) (b + 2), p);
    }
}


static float
vmax_avx2(const float *x, int64_t n)
{
    __m256  m = _mm256_set1_ps(x[0]);
    __m128  r;
    float   t;
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    }
    r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    t = _mm_cvtss_f32(r);
    for (; i < n; i++) {
        t = x[i] > t ? x[i] : t;
    }
    return t;
}


static float
exp_sum_avx2(float *x, int64_t n, float max)
{
    const __m256 mv = _mm256_set1_ps(max);
    __m256       sum = _mm256_setzero_ps();
    float        tail = 0.0f;
    int64_t      i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    for (; i < n; i++) {
        x[i] = expf(x[i] - max);
        tail += x[i];
    }
    return hsum256(sum) + tail;
}


static void
silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n)
{
    int64_t i = 0;

    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(
            _mm256_div_ps(g, _mm256_add_ps(e, _mm256_set1_ps(1.0f))),
            _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) {
        out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}


/* ------------------------------------------------------------ attention */

INLINE __m256
kv_load(const void *p, int type, size_t i)
{
    if (type == LLM_Q8_0) {
        /* 8 lanes never straddle a block: i % 8 == 0 */
        const uint8_t *b = (const uint8_t *) p + i / 32 * 34;

        return _mm256_mul_ps(
            _mm256_set1_ps(_cvtsh_ss(*(const uint16_t *) b)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                (const __m128i *) (b + 2 + i % 32)))));
    }
    if (type == LLM_F16) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)
                                               ((const uint16_t *) p + i)));
    }
    return _mm256_loadu_ps((const float *) p + i);
}


static void
dequant_q8_0_avx2(const void *src, float *dst, int64_t n)
{
    int64_t i;

    for (i = 0; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, kv_load(src, LLM_Q8_0, (size_t) i));
    }
}


INLINE float
kv_elem(const void *p, int type, size_t i)
{
    if (type == LLM_Q8_0) {
        const uint8_t *b = (const uint8_t *) p + i / 32 * 34;

        return _cvtsh_ss(*(const uint16_t *) b)
               * (float) (int8_t) b[2 + i % 32];
    }
    return type == LLM_F16 ? _cvtsh_ss(((const uint16_t *) p)[i])
                           : ((const float *) p)[i];
}


/* Scores of G (<= 4) heads, one position at a time; the K row's chunks
 * are converted once for all G heads. */
INLINE void
scores_g(const float *q, int G, int hd, const void *k, int type,
         size_t stride, int n, float scale, float *s, int s_stride,
         const void *pf)
{
    int    hv = hd & ~7;
    int    i, h, c;

    for (i = 0; i < n; i++) {
        size_t base = (size_t) i * stride;
        __m256 acc[4];

        if (pf != NULL) {
            llm_cpu_prefetch((const uint8_t *) pf + llm_kv_bytes(type, base),
                             llm_kv_bytes(type, (size_t) hd));
        }

#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            acc[h] = _mm256_setzero_ps();
        }
        for (c = 0; c < hv; c += 8) {
            __m256 kv = kv_load(k, type, base + c);
#pragma GCC unroll 4
            for (h = 0; h < G; h++) {
                acc[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + h * hd + c),
                                         acc[h]);
            }
        }
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            float dot = hsum256(acc[h]);
            for (c = hv; c < hd; c++) {
                dot += q[h * hd + c] * kv_elem(k, type, base + c);
            }
            s[h * s_stride + i] = dot * scale;
        }
    }
}


static void
attn_scores_avx2(const float *q, int g, int hd, const void *k, int kv_type,
                 size_t stride, int n, float scale, float *s, int s_stride,
                 const void *pf)
{
    int h0;

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


/* o[h][c0 .. c0+15] += sum_i p[h][i] v_i for G (<= 4) heads. */
INLINE void
accum_g(float *o, int G, int hd, int c0, const float *p, int p_stride,
        const void *v, int type, size_t stride, int n, const void *pf)
{
    __m256 acc[4][2];
    int    i, h, c;

#pragma GCC unroll 4
    for (h = 0; h < G; h++) {
        acc[h][0] = _mm256_loadu_ps(o + h * hd + c0);
        acc[h][1] = _mm256_loadu_ps(o + h * hd + c0 + 8);
    }
    for (i = 0; i < n; i++) {
        __m256 v0, v1;

        if (pf != NULL) {
            llm_cpu_prefetch((const uint8_t *) pf
                             + llm_kv_bytes(type, (size_t) i * stride),
                             llm_kv_bytes(type, (size_t) hd));
        }
        v0 = kv_load(v, type, (size_t) i * stride + c0);
        v1 = kv_load(v, type, (size_t) i * stride + c0 + 8);
#pragma GCC unroll 4
        for (h = 0; h < G; h++) {
            __m256 pb = _mm256_set1_ps(p[h * p_stride + i]);
            acc[h][0] = _mm256_fmadd_ps(pb, v0, acc[h][0]);
            acc[h][1] = _mm256_fmadd_ps(pb, v1, acc[h][1]);
        }
    }
#pragma GCC unroll 4
    for (h = 0; h < G; h++) {
        _mm256_storeu_ps(o + h * hd + c0, acc[h][0]);
        _mm256_storeu_ps(o + h * hd + c0 + 8, acc[h][1]);
    }
    (void) c;
}


static void
attn_accum_avx2(float *o, int g, int hd, const float *p, int p_stride,
                const void *v, int kv_type, size_t stride, int n,
                const void *pf)
{
    int hv = hd & ~15;
    int h0, c0, i, h, c;

    for (h0 = 0; h0 < g; h0 += 4) {
        float       *oh = o + (size_t) h0 * hd;
        const float *ph = p + (size_t) h0 * p_stride;

        for (c0 = 0; c0 < hv; c0 += 16) {
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
    /* the last head_dim % 16 columns */
    for (c = hv; c < hd; c++) {
        for (i = 0; i < n; i++) {
            float vv = kv_elem(v, kv_type, (size_t) i * stride + c);
            for (h = 0; h < g; h++) {
                o[h * hd + c] += p[h * p_stride + i] * vv;
            }
        }
    }
}


void
llm_cpu_vec_avx2(llm_cpu_kernels *k)
{
    k->f16_to_f32 = f16_to_f32_avx2;
    k->f32_to_f16 = f32_to_f16_avx2;
    k->vmax = vmax_avx2;
    k->exp_sum = exp_sum_avx2;
    k->silu_mul = silu_mul_avx2;
    k->quant_q8_0 = quant_q8_0_avx2;
    k->dequant_q8_0 = dequant_q8_0_avx2;
    k->attn_scores = attn_scores_avx2;
    k->attn_accum = attn_accum_avx2;
}
