/*
 * AVX2 (+FMA, F16C) matrix product kernels, for CPUs without AVX-512.
 * Register tiles of RB activation rows x RW weight rows, one block of 32
 * per register; vpmaddubsw + vpmaddwd for the integer dot products, f32
 * lanes accumulated over the blocks and summed at the end (the same order
 * for any RB, RW, so results do not depend on the batch; they are not
 * bit-identical to the scalar and AVX-512 kernels' canonical order).
 * Signed weights (Q8_0, Q4_0 as q - 8) multiply as |w| times x with w's
 * sign, which keeps vpmaddubsw from saturating (|w|, |x| <= 127).
 * K-quants: integer sub-block scales through vpmaddwd, float scales once
 * per super-block.
 */
#include "cpu.h"

#include <immintrin.h>
#include <string.h>

#define INLINE  static inline __attribute__((always_inline))

#define SEG32   512
#define SEGK    64
#define CHUNK_BYTES  32768

/* Software prefetch distance in weight rows, for single-row products. */
#define PF_ROWS      8


INLINE float
f16_at(const uint8_t *p)
{
    uint16_t h;

    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}


INLINE float
hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v),
                          _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


INLINE int
hsum_i32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v),
                              _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}


INLINE float
hmax256(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v),
                          _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}


INLINE float *
out_row(const llm_cpu_gemm *g, int64_t r)
{
    return (float *) ((uint8_t *) g->out + (size_t) r * g->out_nb);
}


INLINE const uint8_t *
x_row(const llm_cpu_gemm *g, int64_t r)
{
    return (const uint8_t *) g->x + (size_t) r * g->x_nb;
}


/* ------------------------------------------- activation quantization */

/* 32 floats times id, rounded, to 32 int8 at dst (in order), at most 127;
 * the sums of each half in sum16. */
INLINE void
quant32(const float *x, float id, int8_t *dst, int *sum16)
{
    const __m256  idv = _mm256_set1_ps(id);
    const __m256i top = _mm256_set1_epi32(127);
    __m256i       q0, q1, q2, q3, p;

    q0 = _mm256_min_epi32(_mm256_cvtps_epi32(
        _mm256_mul_ps(_mm256_loadu_ps(x), idv)), top);
    q1 = _mm256_min_epi32(_mm256_cvtps_epi32(
        _mm256_mul_ps(_mm256_loadu_ps(x + 8), idv)), top);
    q2 = _mm256_min_epi32(_mm256_cvtps_epi32(
        _mm256_mul_ps(_mm256_loadu_ps(x + 16), idv)), top);
    q3 = _mm256_min_epi32(_mm256_cvtps_epi32(
        _mm256_mul_ps(_mm256_loadu_ps(x + 24), idv)), top);
    p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1),
                           _mm256_packs_epi32(q2, q3));
    /* the packs interleave 128-bit lanes: restore element order */
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5,
                                                         2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *) dst, p);
    sum16[0] = hsum_i32(_mm256_add_epi32(q0, q1));
    sum16[1] = hsum_i32(_mm256_add_epi32(q2, q3));
}


INLINE float
absmax(const float *x, int n)
{
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256       m = _mm256_setzero_ps();
    int          i;

    for (i = 0; i < n; i += 8) {
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), absm));
    }
    return hmax256(m);
}


INLINE float
f16_round(float f)
{
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}


static void
quant_x_avx2(const float *x, void *xq, int64_t k, int kind)
{
    int8_t  *qs = LLM_XQ_QS(xq);
    float   *d = LLM_XQ_D(xq, k);
    int64_t  b, nb;
    int      i, sum16[16];

    if (kind == LLM_XQK || kind == LLM_XQ32K) {
        /* Q8_K: the element of largest magnitude (first one) maps to
         * -127 */
        nb = k / 256;
        for (b = 0; b < nb; b++) {
            const float *xb = x + 256 * b;
            float        amax = absmax(xb, 256), max = 0.0f;

            d[b] = 0.0f;
            if (amax != 0.0f) {
                for (i = 0; i < 256; i++) {
                    if (xb[i] == amax || xb[i] == -amax) {
                        max = xb[i];
                        break;
                    }
                }
                for (i = 0; i < 8; i++) {
                    quant32(xb + 32 * i, -127.0f / max, qs + 256 * b + 32 * i,
                            sum16 + 2 * i);
                }
                d[b] = 1.0f / (-127.0f / max);
            } else {
                memset(qs + 256 * b, 0, 256);
                memset(sum16, 0, sizeof(sum16));
            }
            for (i = 0; i < 16; i++) {
                if (kind == LLM_XQ32K) {
                    LLM_XQ_BSUM16(xq, k)[16 * b + i] = sum16[i];
                } else {
                    LLM_XQ_DS16(xq, k)[16 * b + i] = d[b] * (float) sum16[i];
                }
            }
            for (i = 0; i < 8 && kind == LLM_XQK; i++) {
                LLM_XQ_DS32(xq, k)[8 * b + i] =
                    d[b] * (float) (sum16[2 * i] + sum16[2 * i + 1]);
            }
        }
        return;
    }

    nb = k / 32;
    for (b = 0; b < nb; b++) {
        float amax = absmax(x + 32 * b, 32);
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int   sum;

        quant32(x + 32 * b, id, qs + 32 * b, sum16);
        sum = sum16[0] + sum16[1];
        d[b] = f16_round(amax / 127.0f);
        LLM_XQ_S1(xq, k)[b] = f16_round(amax / 127.0f * (float) sum);
        LLM_XQ_ISUM(xq, k)[b] = sum;
    }
    if (kind == LLM_XQ32P) {
        /* not used by this table's kernels; kept complete: swap the
         * middle quarters of each pair */
        for (b = 0; b + 2 <= nb; b += 2) {
            __m128i t = _mm_loadu_si128((__m128i *) (qs + 32 * b + 16));
            _mm_storeu_si128((__m128i *) (qs + 32 * b + 16),
                             _mm_loadu_si128((__m128i *) (qs + 32 * b + 32)));
            _mm_storeu_si128((__m128i *) (qs + 32 * b + 32), t);
        }
    }
}


INLINE __m256
fma_rows(const float *a, const float *b, int64_t n, __m256 acc)
{
    int64_t i = 0;
    float   t = 0.0f;

    for (; i + 8 <= n; i += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i),
                              acc);
    }
    for (; i < n; i++) {
        t += a[i] * b[i];
    }
    return _mm256_add_ps(acc, _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0));
}


/* ------------------------------------------ blocks of 32: Q4_0/1, Q8_0 */

INLINE int
b32_size(int type)
{
    return type == LLM_Q4_0 ? 18 : type == LLM_Q4_1 ? 20 : 34;
}


/* A block's 32 weight quants: Q8_0 and Q4_0 (q - 8) signed, Q4_1
 * unsigned. */
INLINE __m256i
b32_quants(int type, const uint8_t *blk)
{
    if (type == LLM_Q8_0) {
        return _mm256_loadu_si256((const __m256i *) (blk + 2));
    } else {
        __m128i v = _mm_loadu_si128((const __m128i *)
                                    (blk + (type == LLM_Q4_0 ? 2 : 4)));
        __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v),
                                     _mm256_set1_epi8(0x0f));
        return type == LLM_Q4_0 ? _mm256_sub_epi8(q, _mm256_set1_epi8(8)) : q;
    }
}


/* Per block: acc += (dot of the quants) * d_w * d_x, and Q4_1's min times
 * Q8_1's sum; signed weights (Q4_0, Q8_0) through |w| and x with w's sign,
 * so that vpmaddubsw cannot saturate. */
INLINE void
tile_b32(const llm_cpu_gemm *g, int type, int RB, int RW, int64_t r0,
         int64_t j0)
{
    const int64_t  k = g->k, nb = k / 32;
    const int      bs = b32_size(type);
    const int      sgn = type != LLM_Q4_1;
    const __m256i  ones = _mm256_set1_epi16(1);
    __m256         acc[4][2];
    float          mw[2][SEG32];
    const uint8_t *wr[2];
    const int8_t  *xqs[4];
    const float   *xd[4], *xs[4];
    int64_t        s0, s1, b;
    int            r, w;

#pragma GCC unroll 16
    for (w = 0; w < RW; w++) {
        wr[w] = g->w + (size_t) (j0 + w) * g->w_nb;
    }
#pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        const uint8_t *xr = x_row(g, r0 + r);
        xqs[r] = LLM_XQ_QS(xr);
        xd[r] = LLM_XQ_D(xr, k);
        xs[r] = LLM_XQ_S1(xr, k);
#pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            acc[r][w] = _mm256_setzero_ps();
        }
    }

    for (s0 = 0; s0 < nb; s0 = s1) {
        s1 = s0 + SEG32 < nb ? s0 + SEG32 : nb;

        for (b = s0; b < s1; b++) {
            __m256i wq[2], wa[2];
            __m256  dw[2];

#pragma GCC unroll 16
            for (w = 0; w < RW; w++) {
                const uint8_t *blk = wr[w] + b * bs;

                if (RB == 1) {
                    _mm_prefetch((const char *) blk + PF_ROWS * g->w_nb,
                                 _MM_HINT_T0);
                }
                wq[w] = b32_quants(type, blk);
                wa[w] = sgn ? _mm256_sign_epi8(wq[w], wq[w]) : wq[w];
                dw[w] = _mm256_set1_ps(f16_at(blk));
                mw[w][b - s0] = type == LLM_Q4_1 ? f16_at(blk + 2) : 0.0f;
            }
#pragma GCC unroll 16
            for (r = 0; r < RB; r++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)
                                                (xqs[r] + 32 * b));
                __m256  dx = _mm256_broadcast_ss(xd[r] + b);
#pragma GCC unroll 16
                for (w = 0; w < RW; w++) {
                    __m256i xs8 = sgn ? _mm256_sign_epi8(xv, wq[w]) : xv;
                    __m256i p = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(wa[w], xs8), ones);
                    acc[r][w] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                                _mm256_mul_ps(dw[w], dx),
                                                acc[r][w]);
                }
            }
        }
        if (type == LLM_Q4_1) {
#pragma GCC unroll 16
            for (r = 0; r < RB; r++) {
#pragma GCC unroll 16
                for (w = 0; w < RW; w++) {
                    acc[r][w] = fma_rows(mw[w], xs[r] + s0, s1 - s0,
                                         acc[r][w]);
                }
            }
        }
    }

#pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        float *o = out_row(g, r0 + r);
#pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            o[j0 + w] = hsum256(acc[r][w])
                        + (g->bias ? g->bias[j0 + w] : 0.0f);
        }
    }
}


/* ------------------------------------------------ K-quants: Q4/5/6_K */

INLINE int
k_size(int type)
{
    return type == LLM_Q4_K ? 144 : type == LLM_Q5_K ? 176 : 210;
}


/* Quants (unsigned) of the t-th group of 32 elements of a super-block. */
INLINE __m256i
k_quants32(int type, const uint8_t *blk, int t)
{
    const __m256i lo4 = _mm256_set1_epi8(0x0f);

    if (type == LLM_Q6_K) {
        int     h = t / 4, u = t % 4;
        __m256i ql = _mm256_loadu_si256((const __m256i *)
                                        (blk + 64 * h + 32 * (u & 1)));
        __m256i qh = _mm256_loadu_si256((const __m256i *)
                                        (blk + 128 + 32 * h));
        __m256i lo = u < 2 ? _mm256_and_si256(ql, lo4)
                           : _mm256_and_si256(_mm256_srli_epi16(ql, 4), lo4);
        __m256i hi = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * u)),
            _mm256_set1_epi8(3));
        return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    } else {
        const uint8_t *qs = blk + (type == LLM_Q4_K ? 16 : 48) + 32 * (t / 2);
        __m256i        v = _mm256_loadu_si256((const __m256i *) qs);
        __m256i        q = (t & 1) ? _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4)
                                   : _mm256_and_si256(v, lo4);
        if (type == LLM_Q5_K) {
            __m256i qh = _mm256_loadu_si256((const __m256i *) (blk + 16));
            __m256i hb = _mm256_and_si256(
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(t)),
                _mm256_set1_epi8(1));
            q = _mm256_or_si256(q, _mm256_slli_epi16(hb, 4));
        }
        return q;
    }
}


/* Decodes a super-block's scales into sc (int16 lane values of each group
 * of 32: Q4/5_K one scale, Q6_K two), its d, and the multipliers of its
 * min / offset term into mt (as in matmul_avx512.c). */
INLINE float
k_scales(int type, const uint8_t *blk, __m256i sc[8], float *mt)
{
    int i;

    if (type == LLM_Q6_K) {
        const int8_t *s = (const int8_t *) (blk + 192);
        float         d = f16_at(blk + 208);

        for (i = 0; i < 8; i++) {
            sc[i] = _mm256_set_m128i(_mm_set1_epi16(s[2 * i + 1]),
                                     _mm_set1_epi16(s[2 * i]));
        }
        for (i = 0; i < 16; i++) {
            mt[i] = -32.0f * d * (float) s[i];
        }
        return d;
    } else {
        uint32_t a, b, c;
        uint64_t scl, mn;
        float    dmin = f16_at(blk + 2);

        memcpy(&a, blk + 4, 4);
        memcpy(&b, blk + 8, 4);
        memcpy(&c, blk + 12, 4);
        scl = (a & 0x3f3f3f3fu)
              | (uint64_t) ((c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u)) << 32;
        mn = (b & 0x3f3f3f3fu)
             | (uint64_t) (((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u))
               << 32;
        for (i = 0; i < 8; i++) {
            sc[i] = _mm256_set1_epi16((short) ((scl >> (8 * i)) & 0xff));
            mt[i] = -dmin * (float) ((mn >> (8 * i)) & 0xff);
        }
        return f16_at(blk);
    }
}


INLINE void
tile_k(const llm_cpu_gemm *g, int type, int RB, int RW, int64_t r0,
       int64_t j0)
{
    const int64_t  k = g->k, nb = k / 256;
    const int      bs = k_size(type);
    const int      nm = type == LLM_Q6_K ? 16 : 8;
    __m256         acc[4][2];
    float          mt[2][SEGK * 16];
    const uint8_t *wr[2];
    const int8_t  *xqs[4];
    const float   *xd[4], *xds[4];
    int64_t        s0, s1, b;
    int            r, w, t;

    #pragma GCC unroll 16
    for (w = 0; w < RW; w++) {
        wr[w] = g->w + (size_t) (j0 + w) * g->w_nb;
    }
    #pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        const uint8_t *xr = x_row(g, r0 + r);
        xqs[r] = LLM_XQ_QS(xr);
        xd[r] = LLM_XQ_D(xr, k);
        xds[r] = type == LLM_Q6_K ? LLM_XQ_DS16(xr, k) : LLM_XQ_DS32(xr, k);
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            acc[r][w] = _mm256_setzero_ps();
        }
    }

    for (s0 = 0; s0 < nb; s0 = s1) {
        s1 = s0 + SEGK < nb ? s0 + SEGK : nb;

        for (b = s0; b < s1; b++) {
            __m256i sc[2][8], isum[4][2];
            float   dw[2];

            #pragma GCC unroll 16
            for (w = 0; w < RW; w++) {
                dw[w] = k_scales(type, wr[w] + b * bs, sc[w],
                                 &mt[w][nm * (b - s0)]);
                #pragma GCC unroll 16
                for (r = 0; r < RB; r++) {
                    isum[r][w] = _mm256_setzero_si256();
                }
            }
            for (t = 0; t < 8; t++) {
                __m256i wq[2];
                #pragma GCC unroll 16
                for (w = 0; w < RW; w++) {
                    if (RB == 1 && (t & 1) == 0) {
                        _mm_prefetch((const char *) wr[w] + b * bs + 32 * t
                                     + PF_ROWS * g->w_nb, _MM_HINT_T0);
                    }
                    wq[w] = k_quants32(type, wr[w] + b * bs, t);
                }
                #pragma GCC unroll 16
                for (r = 0; r < RB; r++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)
                                                    (xqs[r] + 256 * b + 32 * t));
                    #pragma GCC unroll 16
                    for (w = 0; w < RW; w++) {
                        isum[r][w] = _mm256_add_epi32(isum[r][w],
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wq[w], xv),
                                              sc[w][t]));
                    }
                }
            }
            #pragma GCC unroll 16
            for (r = 0; r < RB; r++) {
                #pragma GCC unroll 16
                for (w = 0; w < RW; w++) {
                    acc[r][w] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum[r][w]),
                        _mm256_set1_ps(dw[w] * xd[r][b]), acc[r][w]);
                }
            }
        }
        #pragma GCC unroll 16
        for (r = 0; r < RB; r++) {
            #pragma GCC unroll 16
            for (w = 0; w < RW; w++) {
                acc[r][w] = fma_rows(mt[w], xds[r] + nm * s0, nm * (s1 - s0),
                                     acc[r][w]);
            }
        }
    }

    #pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        float *o = out_row(g, r0 + r);
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            o[j0 + w] = hsum256(acc[r][w])
                        + (g->bias ? g->bias[j0 + w] : 0.0f);
        }
    }
}


/* ----------------------------------------------- plain: F32/F16/BF16 */

INLINE __m256
plain_load(int type, const uint8_t *w, int64_t i)
{
    if (type == LLM_F32) {
        return _mm256_loadu_ps((const float *) w + i);
    }
    {
        __m128i h = _mm_loadu_si128((const __m128i *) (w + 2 * i));
        if (type == LLM_F16) {
            return _mm256_cvtph_ps(h);
        }
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(h), 16));
    }
}


INLINE float
plain_elem(int type, const uint8_t *w, int64_t i)
{
    uint16_t h;

    if (type == LLM_F32) {
        return ((const float *) w)[i];
    }
    memcpy(&h, w + 2 * i, 2);
    return type == LLM_F16 ? _cvtsh_ss(h) : llm_bf16_to_f32(h);
}


INLINE void
tile_plain(const llm_cpu_gemm *g, int type, int RB, int RW, int64_t r0,
           int64_t j0)
{
    const int64_t  k = g->k;
    __m256         acc[4][2];
    const uint8_t *wr[2];
    const float   *xr[4];
    int64_t        i, kv = k & ~(int64_t) 7;
    int            r, w;

    #pragma GCC unroll 16
    for (w = 0; w < RW; w++) {
        wr[w] = g->w + (size_t) (j0 + w) * g->w_nb;
    }
    #pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        xr[r] = (const float *) x_row(g, r0 + r);
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            acc[r][w] = _mm256_setzero_ps();
        }
    }
    for (i = 0; i < kv; i += 8) {
        __m256 wv[2];
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            if (RB == 1 && (i * (type == LLM_F32 ? 4 : 2)) % 64 == 0) {
                _mm_prefetch((const char *) wr[w]
                             + i * (type == LLM_F32 ? 4 : 2)
                             + PF_ROWS * g->w_nb, _MM_HINT_T0);
            }
            wv[w] = plain_load(type, wr[w], i);
        }
        #pragma GCC unroll 16
        for (r = 0; r < RB; r++) {
            __m256 xv = _mm256_loadu_ps(xr[r] + i);
            #pragma GCC unroll 16
            for (w = 0; w < RW; w++) {
                acc[r][w] = _mm256_fmadd_ps(wv[w], xv, acc[r][w]);
            }
        }
    }
    #pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        float *o = out_row(g, r0 + r);
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            float s = hsum256(acc[r][w]);
            for (i = kv; i < k; i++) {
                s += plain_elem(type, wr[w], i) * xr[r][i];
            }
            o[j0 + w] = s + (g->bias ? g->bias[j0 + w] : 0.0f);
        }
    }
}


/* ------------------------------------------------------------ drivers */

enum { FAM_B32, FAM_K, FAM_PLAIN };


INLINE void
tile(const llm_cpu_gemm *g, int fam, int type, int RB, int RW, int64_t r0,
     int64_t j0)
{
    if (fam == FAM_B32) {
        tile_b32(g, type, RB, RW, r0, j0);
    } else if (fam == FAM_K) {
        tile_k(g, type, RB, RW, r0, j0);
    } else {
        tile_plain(g, type, RB, RW, r0, j0);
    }
}


INLINE void
rows(const llm_cpu_gemm *g, int fam, int type, int RB, int64_t r0,
     int64_t jc, int64_t je)
{
    int64_t j = jc;

    for (; j + 2 <= je; j += 2) {
        tile(g, fam, type, RB, 2, r0, j);
    }
    if (j < je) {
        tile(g, fam, type, RB, 1, r0, j);
    }
}


INLINE void
gemm(const llm_cpu_gemm *g, int64_t m0, int64_t m1, int fam, int type)
{
    int64_t jc, je, r, mc;

    mc = (int64_t) (CHUNK_BYTES / (g->w_nb ? g->w_nb : 1));
    mc = mc < 4 ? 4 : mc & ~(int64_t) 3;
    for (jc = m0; jc < m1; jc = je) {
        je = jc + mc < m1 ? jc + mc : m1;
        for (r = 0; r + 4 <= g->n; r += 4) {
            rows(g, fam, type, 4, r, jc, je);
        }
        switch (g->n - r) {
        case 3: rows(g, fam, type, 3, r, jc, je); break;
        case 2: rows(g, fam, type, 2, r, jc, je); break;
        case 1: rows(g, fam, type, 1, r, jc, je); break;
        }
    }
}


#define GEMM(name, fam, type)                                               \
static void                                                                 \
name(const llm_cpu_gemm *g, int64_t m0, int64_t m1)                         \
{                                                                           \
    gemm(g, m0, m1, fam, type);                                             \
}

GEMM(gemm_q4_0_avx2, FAM_B32, LLM_Q4_0)
GEMM(gemm_q4_1_avx2, FAM_B32, LLM_Q4_1)
GEMM(gemm_q8_0_avx2, FAM_B32, LLM_Q8_0)
GEMM(gemm_q4_k_avx2, FAM_K, LLM_Q4_K)
GEMM(gemm_q5_k_avx2, FAM_K, LLM_Q5_K)
GEMM(gemm_q6_k_avx2, FAM_K, LLM_Q6_K)
GEMM(gemm_f32_avx2, FAM_PLAIN, LLM_F32)
GEMM(gemm_f16_avx2, FAM_PLAIN, LLM_F16)
GEMM(gemm_bf16_avx2, FAM_PLAIN, LLM_BF16)


void
llm_cpu_kernels_avx2(llm_cpu_kernels *k)
{
    k->quant_x = quant_x_avx2;

    k->gemm[LLM_Q4_0] = gemm_q4_0_avx2;
    k->gemm[LLM_Q4_1] = gemm_q4_1_avx2;
    k->gemm[LLM_Q8_0] = gemm_q8_0_avx2;
    k->gemm[LLM_Q4_K] = gemm_q4_k_avx2;
    k->gemm[LLM_Q5_K] = gemm_q5_k_avx2;
    k->gemm[LLM_Q6_K] = gemm_q6_k_avx2;
    k->gemm[LLM_F32] = gemm_f32_avx2;
    k->gemm[LLM_F16] = gemm_f16_avx2;
    k->gemm[LLM_BF16] = gemm_bf16_avx2;

    k->xq_kind[LLM_Q4_0] = LLM_XQ32;
    k->xq_kind[LLM_Q4_1] = LLM_XQ32;
    k->xq_kind[LLM_Q8_0] = LLM_XQ32;
    k->xq_kind[LLM_Q4_K] = LLM_XQK;
    k->xq_kind[LLM_Q5_K] = LLM_XQK;
    k->xq_kind[LLM_Q6_K] = LLM_XQK;

    llm_cpu_vec_avx2(k);
}
