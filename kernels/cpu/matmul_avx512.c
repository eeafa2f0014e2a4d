/*
 * AVX-512 matrix product kernels (F, BW, VL, DQ, VNNI): built with the
 * -mavx512* flags (Makefile), called only when the CPU has them.
 *
 * Quantized weights (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K).  Every output
 * is computed in the canonical way of cpu.h (llama.cpp's arithmetic),
 * whatever the number of activation rows, so that a sequence gets
 * bit-identical logits alone or in a batch: exact integer block sums,
 * then one or two fused multiply-adds per block (per 256 for K-quants),
 * in order.  Lanes are 16 weight rows; two kernels produce the integer
 * sums:
 *
 *   - tiles (3 or more activation rows): 16 rows are repacked once per
 *     call so that register kk holds quants 4kk..4kk+3 of each row; an
 *     activation row then costs 8 vpdpbusd per block of 32 (broadcast
 *     activations), and the block sums of the 16 rows land in one
 *     register;
 *   - rows (1 or 2 activation rows): each weight row's blocks are
 *     multiplied in place (vpdpbusd on 64 bytes, as stored), and a
 *     reduction tree turns the 16 rows' partial sums into the same
 *     vectors of block sums, without repacking.
 *
 * Weights the backend adopted in LLM_LAYOUT_ROWS16 (rows16.c) already
 * hold each block of 16 rows as those registers: the tiles kernel loads
 * them instead of repacking (t_unpack16, t_repack_k's loads) and runs at
 * any number of activation rows, one or two taking their quants straight
 * from the load (rows16_direct), and the next segment's bytes, which
 * follow, are prefetched while a segment is multiplied.
 *
 * Plain weights (F32, F16, BF16): register tiles of RB activation rows x
 * RW weight rows, f32 fused multiply-adds, lane sums at the end (the same
 * order for any RB, RW).
 */
#include "cpu.h"

#include <immintrin.h>
#include <string.h>

#define INLINE  static inline __attribute__((always_inline))

/* Plain weights: rows per chunk, so W's chunk stays in L1/L2 while every
 * group of activation rows passes over it. */
#define CHUNK_BYTES  32768

/* Software prefetch distance in weight rows, for single-row products. */
#ifndef PF_ROWS
#define PF_ROWS      8
#endif


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

/* f32 -> f16 -> f32, round to nearest even (as llm_f32_to_f16). */
INLINE float
f16_round(float f)
{
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}


/* Q8_K's quantization of 256 values into q, the sums of each 16 into
 * sum16; returns d (see cpu.h). */
INLINE float
q8k_block(const float *x, int8_t *q, int *sum16)
{
    const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512       mx = _mm512_setzero_ps();
    float        amax, max = 0.0f, iscale;
    __m512       isv;
    int          i;

    for (i = 0; i < 16; i++) {
        mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(x + 16 * i),
                                             absm));
    }
    amax = _mm512_reduce_max_ps(mx);
    if (amax == 0.0f) {
        memset(q, 0, 256);
        memset(sum16, 0, 16 * sizeof(int));
        return 0.0f;
    }
    /* the first element of that magnitude, sign kept */
    for (i = 0; i < 16; i++) {
        __mmask16 hit = _mm512_cmp_ps_mask(
            _mm512_and_ps(_mm512_loadu_ps(x + 16 * i), absm),
            _mm512_set1_ps(amax), _CMP_EQ_OQ);
        if (hit) {
            max = x[16 * i + __builtin_ctz(hit)];
            break;
        }
    }
    iscale = -127.0f / max;
    isv = _mm512_set1_ps(iscale);
    for (i = 0; i < 16; i++) {
        __m512i v = _mm512_min_epi32(
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), isv)),
            _mm512_set1_epi32(127));
        _mm_storeu_si128((__m128i *) (q + 16 * i), _mm512_cvtsepi32_epi8(v));
        sum16[i] = _mm512_reduce_add_epi32(v);
    }
    return 1.0f / iscale;
}


static void
quant_x_avx512(const float *x, void *xq, int64_t k, int kind)
{
    const __m512  absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    int8_t       *qs = LLM_XQ_QS(xq);
    float        *d = LLM_XQ_D(xq, k);
    int64_t       b, nb;
    int           i;

    if (kind == LLM_XQK || kind == LLM_XQ32K) {
        int sum16[16];

        nb = k / 256;
        for (b = 0; b < nb; b++) {
            d[b] = q8k_block(x + 256 * b, qs + 256 * b, sum16);
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
        const float *xb = x + 32 * b;
        __m512       x0 = _mm512_loadu_ps(xb);
        __m512       x1 = _mm512_loadu_ps(xb + 16);
        float        amax = _mm512_reduce_max_ps(
            _mm512_max_ps(_mm512_and_ps(x0, absm), _mm512_and_ps(x1, absm)));
        float        id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m512       idv = _mm512_set1_ps(id);
        __m512i      q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, idv));
        __m512i      q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, idv));
        int          sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        int8_t      *plo, *phi;

        if (kind == LLM_XQ32P && (b | 1) < nb) {
            int8_t *pair = qs + 32 * (b & ~(int64_t) 1);
            plo = pair + (b & 1) * 16;
            phi = pair + 32 + (b & 1) * 16;
        } else {
            plo = qs + 32 * b;
            phi = plo + 16;
        }
        _mm_storeu_si128((__m128i *) plo, _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *) phi, _mm512_cvtsepi32_epi8(q1));
        d[b] = f16_round(amax / 127.0f);
        LLM_XQ_S1(xq, k)[b] = f16_round(amax / 127.0f * (float) sum);
        LLM_XQ_ISUM(xq, k)[b] = sum;
    }
}


INLINE int
b32_size(int type)
{
    return type == LLM_Q4_0 ? 18 : type == LLM_Q4_1 ? 20 : 34;
}


/* Weights of a pair of blocks as 64 unsigned bytes, in the order of the
 * activation layout (XQ32P for 4-bit, XQ32 for Q8_0). */
INLINE __m512i
b32_pair_quants(int type, const uint8_t *b0, const uint8_t *b1)
{
    if (type == LLM_Q8_0) {
        __m512i z = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) (b0 + 2))),
            _mm256_loadu_si256((const __m256i *) (b1 + 2)), 1);
        return _mm512_xor_si512(z, _mm512_set1_epi8((char) 0x80));
    } else {
        int     off = type == LLM_Q4_0 ? 2 : 4;
        __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) (b0 + off))),
            _mm_loadu_si128((const __m128i *) (b1 + off)), 1);
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(v),
                                       _mm256_srli_epi16(v, 4), 1);
        return _mm512_and_si512(z, _mm512_set1_epi8(0x0f));
    }
}


/* A last odd block, 32 bytes in natural order. */
INLINE __m256i
b32_one_quants(int type, const uint8_t *b0)
{
    if (type == LLM_Q8_0) {
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) (b0 + 2)),
                                _mm256_set1_epi8((char) 0x80));
    } else {
        int     off = type == LLM_Q4_0 ? 2 : 4;
        __m128i v = _mm_loadu_si128((const __m128i *) (b0 + off));
        __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(v),
                                            _mm_srli_epi16(v, 4), 1);
        return _mm256_and_si256(z, _mm256_set1_epi8(0x0f));
    }
}


INLINE int
k_size(int type)
{
    return type == LLM_Q4_K ? 144 : type == LLM_Q5_K ? 176 : 210;
}


/* Q5_K: for chunk c of 64 elements, the qh bit of each byte lane. */
typedef struct k_idx {
    __m512i  q5bit[4];
} k_idx;


INLINE void
k_idx_init(int type, k_idx *ix)
{
    int c;

    for (c = 0; c < 4; c++) {
        ix->q5bit[c] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set1_epi8((char) (1 << (2 * c)))),
            _mm256_set1_epi8((char) (2 << (2 * c))), 1);
    }
}


/* The 64 quants (unsigned) of chunk c of a super-block, natural order. */
INLINE __m512i
k_chunk_quants(int type, const uint8_t *blk, int c, const k_idx *ix)
{
    const __m512i lo4 = _mm512_set1_epi8(0x0f);

    if (type == LLM_Q6_K) {
        int     h = c / 2;
        __m512i ql = _mm512_loadu_si512(blk + 64 * h);
        __m256i qh = _mm256_loadu_si256((const __m256i *) (blk + 128 + 32 * h));
        /* bytes 0..31: qh; 32..63: qh >> 2 (bits 2-3, 6-7 moved down) */
        __m512i qhz = _mm512_inserti64x4(_mm512_castsi256_si512(qh),
                                         _mm256_srli_epi16(qh, 2), 1);
        const __m512i b45 = _mm512_set1_epi8(0x30);

        if ((c & 1) == 0) {
            return _mm512_or_si512(_mm512_and_si512(ql, lo4),
                                   _mm512_and_si512(_mm512_slli_epi16(qhz, 4),
                                                    b45));
        }
        return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), lo4),
                               _mm512_and_si512(qhz, b45));
    } else {
        const uint8_t *qs = blk + (type == LLM_Q4_K ? 16 : 48) + 32 * c;
        __m256i        v = _mm256_loadu_si256((const __m256i *) qs);
        __m512i        z = _mm512_and_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(v),
                               _mm256_srli_epi16(v, 4), 1), lo4);

        if (type == LLM_Q5_K) {
            __m512i   qh = _mm512_broadcast_i64x4(
                _mm256_loadu_si256((const __m256i *) (blk + 16)));
            __mmask64 hb = _mm512_test_epi8_mask(qh, ix->q5bit[c]);
            z = _mm512_mask_add_epi8(z, hb, z, _mm512_set1_epi8(16));
        }
        return z;
    }
}


/* ----------------------------------------------- plain: F32/F16/BF16 */

INLINE __m512
plain_load(int type, const uint8_t *w, int64_t i)
{
    if (type == LLM_F32) {
        return _mm512_loadu_ps((const float *) w + i);
    }
    {
        __m256i h = _mm256_loadu_si256((const __m256i *) (w + 2 * i));
        if (type == LLM_F16) {
            return _mm512_cvtph_ps(h);
        }
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(h), 16));
    }
}


INLINE __m512
plain_load_mask(int type, const uint8_t *w, int64_t i, __mmask16 m)
{
    if (type == LLM_F32) {
        return _mm512_maskz_loadu_ps(m, (const float *) w + i);
    }
    {
        __m256i h = _mm256_maskz_loadu_epi16(m, w + 2 * i);
        if (type == LLM_F16) {
            return _mm512_cvtph_ps(h);
        }
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(h), 16));
    }
}


INLINE void
tile_plain(const llm_cpu_gemm *g, int type, int RB, int RW, int64_t r0,
           int64_t j0)
{
    const int64_t  k = g->k;
    __m512         acc[16][4];
    const uint8_t *wr[4];
    const float   *xr[16];
    int64_t        i;
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
            acc[r][w] = _mm512_setzero_ps();
        }
    }
    for (i = 0; i + 16 <= k; i += 16) {
        __m512 wv[4];
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            if (RB == 1 && PF_ROWS > 0) {
                _mm_prefetch((const char *) wr[w]
                             + i * (type == LLM_F32 ? 4 : 2)
                             + PF_ROWS * g->w_nb, _MM_HINT_T0);
            }
            wv[w] = plain_load(type, wr[w], i);
        }
        #pragma GCC unroll 16
        for (r = 0; r < RB; r++) {
            __m512 xv = _mm512_loadu_ps(xr[r] + i);
            #pragma GCC unroll 16
            for (w = 0; w < RW; w++) {
                acc[r][w] = _mm512_fmadd_ps(wv[w], xv, acc[r][w]);
            }
        }
    }
    if (i < k) {
        __mmask16 m = (__mmask16) ((1u << (k - i)) - 1);
        __m512    wv[4];
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            wv[w] = plain_load_mask(type, wr[w], i, m);
        }
        #pragma GCC unroll 16
        for (r = 0; r < RB; r++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, xr[r] + i);
            #pragma GCC unroll 16
            for (w = 0; w < RW; w++) {
                acc[r][w] = _mm512_fmadd_ps(wv[w], xv, acc[r][w]);
            }
        }
    }
    #pragma GCC unroll 16
    for (r = 0; r < RB; r++) {
        float *o = out_row(g, r0 + r);
        #pragma GCC unroll 16
        for (w = 0; w < RW; w++) {
            o[j0 + w] = _mm512_reduce_add_ps(acc[r][w])
                        + (g->bias ? g->bias[j0 + w] : 0.0f);
        }
    }
}


/* ---------------------------------------- quantized: canonical steps */

INLINE int
is_kq(int type)
{
    return type == LLM_Q4_K || type == LLM_Q5_K || type == LLM_Q6_K;
}


/* One block of 32 (Q4_0, Q4_1, Q8_0) for one activation row: isum the
 * block sums of the 16 rows with unsigned weight quants, xsum the block's
 * activation quant sum (for the offsets of Q4_0 and Q8_0). */
INLINE __m512
step_b32(int type, __m512 acc, __m512i isum, int32_t xsum, __m512 dw,
         __m512 mw, float dx, float s1)
{
    if (type == LLM_Q4_0) {
        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * xsum));
    } else if (type == LLM_Q8_0) {
        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * xsum));
    }
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum),
                          _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    if (type == LLM_Q4_1) {
        acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(s1), acc);
    }
    return acc;
}


/* One super-block of a K-quant: isb = sum of scale x block sums, msb =
 * sum of min x activation sums (Q4_K, Q5_K). */
INLINE __m512
step_k(int type, __m512 acc, __m512i isb, __m512i msb, __m512 dw,
       __m512 dminw, float dx)
{
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isb),
                          _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc);
    if (type != LLM_Q6_K) {
        acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msb),
                               _mm512_mul_ps(dminw, _mm512_set1_ps(dx)), acc);
    }
    return acc;
}


/* ------------------------------------------- quantized: repacked rows */

#define TSEG  64                /* blocks of 32 per repacked segment
                                   (a multiple of 8: whole super-blocks) */

/* 16 weight rows (lanes) of a segment: scales always, quants for the
 * tiles kernel. */
typedef struct t_tile {
    __m512i  q[TSEG][8];        /* [block][k / 4]: quants 4kk .. 4kk+3 */
    __m512   d[TSEG];           /* blocks of 32: d_w; K-quants: the
                                   super-block's d_w at its first block */
    __m512   m[TSEG];           /* Q4_1: min; Q4_K, Q5_K: dmin (likewise) */
    __m512i  sc[TSEG][2];       /* K-quants: integer scale of the block
                                   (Q6_K: of each of its two 16s) */
    __m512i  mn[TSEG];          /* Q4_K, Q5_K: integer min of the block */
} t_tile;


/* Dwords u = 0 .. 3 of 16 bytes at p[j] for the 16 rows j, as 4
 * vectors whose lane j is row j's dword u: four 128-bit loads per
 * register (rows k, k+4, k+8, k+12 in register k), then a 4x4 dword
 * transpose within each 128-bit lane.  Four gathers do the same, a few
 * per cent slower at 32 activation rows on the Sapphire Rapids VM of
 * bench/kernels/RESULTS.md. */
INLINE void
t_transpose16x4(const uint8_t *const *p, size_t off, __m512i *v)
{
    __m512i a[4], t0, t1, t2, t3;
    int     k;

#pragma GCC unroll 4
    for (k = 0; k < 4; k++) {
        a[k] = _mm512_castsi128_si512(
            _mm_loadu_si128((const __m128i *) (p[k] + off)));
        a[k] = _mm512_inserti32x4(a[k], _mm_loadu_si128(
            (const __m128i *) (p[k + 4] + off)), 1);
        a[k] = _mm512_inserti32x4(a[k], _mm_loadu_si128(
            (const __m128i *) (p[k + 8] + off)), 2);
        a[k] = _mm512_inserti32x4(a[k], _mm_loadu_si128(
            (const __m128i *) (p[k + 12] + off)), 3);
    }
    /* lane L of a[k] holds row k + 4L; element i of lane L of v[u] comes
     * from a[i], i.e. row i + 4L: lane 4L + i */
    t0 = _mm512_unpacklo_epi32(a[0], a[1]);
    t1 = _mm512_unpackhi_epi32(a[0], a[1]);
    t2 = _mm512_unpacklo_epi32(a[2], a[3]);
    t3 = _mm512_unpackhi_epi32(a[2], a[3]);
    v[0] = _mm512_unpacklo_epi64(t0, t2);
    v[1] = _mm512_unpackhi_epi64(t0, t2);
    v[2] = _mm512_unpacklo_epi64(t1, t3);
    v[3] = _mm512_unpackhi_epi64(t1, t3);
}


/* Four weight bytes per lane (a dword of 16 rows) as the unsigned quants
 * vpdpbusd takes: Q8_0's signed bytes offset by 128 into *lo; for Q4_0
 * and Q4_1 the low nibbles (elements 4u..) into *lo and the high ones
 * (16 + 4u..) into *hi. */
INLINE void
weight_dword(int type, __m512i v, __m512i *lo, __m512i *hi)
{
    const __m512i lo4 = _mm512_set1_epi32(0x0f0f0f0f);

    if (type == LLM_Q8_0) {
        *lo = _mm512_xor_si512(v, _mm512_set1_epi32((int) 0x80808080u));
    } else {
        *lo = _mm512_and_si512(v, lo4);
        *hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), lo4);
    }
}


/* Blocks of 32: nb blocks of 16 rows from base, rows stride bytes
 * apart; rows past the mask rm read row 0 again (their lanes are never
 * stored). */
INLINE void
t_repack(int type, const uint8_t *base, size_t stride, __mmask16 rm, int nb,
         int with_quants, t_tile *t)
{
    const int      bs = b32_size(type);
    const __m512i  idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                          15),
        _mm512_set1_epi32((int) stride));
    const uint8_t *p[16];
    int            b, u, j;

    for (j = 0; j < 16; j++) {
        p[j] = base + ((rm >> j) & 1 ? (size_t) j * stride : 0);
    }
    for (b = 0; b < nb; b++) {
        __m512i v[4];
        /* the first dword of each row's block: d (and Q4_1's m) */
        __m512i sc = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rm,
                                                 idx, base + (size_t) b * bs,
                                                 1);

        t->d[b] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(sc));
        if (type == LLM_Q4_1) {
            t->m[b] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                _mm512_srli_epi32(sc, 16)));
        }
        if (!with_quants) {
            continue;
        }
        if (type == LLM_Q8_0) {
            t_transpose16x4(p, (size_t) b * bs + 2, v);
            for (u = 0; u < 4; u++) {
                weight_dword(type, v[u], &t->q[b][u], NULL);
            }
            t_transpose16x4(p, (size_t) b * bs + 18, v);
            for (u = 0; u < 4; u++) {
                weight_dword(type, v[u], &t->q[b][u + 4], NULL);
            }
        } else {
            t_transpose16x4(p, (size_t) b * bs
                               + (type == LLM_Q4_0 ? 2 : 4), v);
            for (u = 0; u < 4; u++) {
                weight_dword(type, v[u], &t->q[b][u], &t->q[b][u + 4]);
            }
        }
    }
}


/* t_repack's work for a whole group of 16 rows in LLM_LAYOUT_ROWS16
 * (rows16.c), which holds each block already as 16 lanes: loads, the
 * nibbles split, the scales widened.  grp: the group's first byte. */
INLINE void
t_unpack16(int type, const uint8_t *grp, int64_t s0, int nb, t_tile *t)
{
    const int      bs = b32_size(type);
    int            b, u;

    for (b = 0; b < nb; b++) {
        const uint8_t *p = grp + (size_t) (s0 + b) * 16 * (size_t) bs;

        t->d[b] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p));
        if (type == LLM_Q4_1) {
            t->m[b] = _mm512_cvtph_ps(_mm256_loadu_si256(
                (const __m256i *) (p + 32)));
            p += 64;
        } else {
            p += 32;
        }
        for (u = 0; u < (type == LLM_Q8_0 ? 8 : 4); u++) {
            /* Q8_0: 8 dwords of bytes; 4-bit: 4 of two nibbles each */
            weight_dword(type, _mm512_loadu_si512(p + 64 * u), &t->q[b][u],
                         type == LLM_Q8_0 ? NULL : &t->q[b][u + 4]);
        }
    }
}


/* Byte i of each lane, as int32. */
INLINE __m512i
lane_byte(__m512i v, int i)
{
    return _mm512_and_si512(_mm512_srli_epi32(v, 8 * i),
                            _mm512_set1_epi32(0xff));
}


/* K-quants: nb / 8 super-blocks (nb a multiple of 8) of 16 rows, each
 * into 8 blocks of 32.  rows16: base is the first super-block of a whole
 * ROWS16 group (rows16.c), whose dwords are loads, not gathers. */
INLINE void
t_repack_k(int type, const uint8_t *base, size_t stride, __mmask16 rm,
           int nb, int with_quants, int rows16, t_tile *t)
{
    const int      bs = k_size(type);
    const __m512i  idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                          15),
        _mm512_set1_epi32((int) stride));
    const __m512i  zero = _mm512_setzero_si512();
    const __m512i  lo4 = _mm512_set1_epi32(0x0f0f0f0f);
    int            sb, s, u;

#define GATHER(off)                                                         \
    (rows16 ? _mm512_loadu_si512(base + 16 * (off))                         \
            : _mm512_mask_i32gather_epi32(zero, rm, idx, base + (off), 1))

    for (sb = 0; sb < nb / 8; sb++, base += rows16 ? 16 * bs : bs) {
        int b = 8 * sb;

        if (type == LLM_Q6_K) {
            __m512i scw[4];
            int     h;

            /* d from the dword that ends with it (bytes 206..209), or
             * ROWS16's 16 x d after the 52 dwords */
            t->d[b] = rows16
                ? _mm512_cvtph_ps(_mm256_loadu_si256(
                      (const __m256i *) (base + 16 * 208)))
                : _mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                      _mm512_srli_epi32(GATHER(206), 16)));
            for (u = 0; u < 4; u++) {
                scw[u] = GATHER(192 + 4 * u);
            }
            for (s = 0; s < 8; s++) {
                for (h = 0; h < 2; h++) {
                    int gi = 2 * s + h;             /* group of 16 */
                    /* sign-extend byte gi % 4 of scale dword gi / 4 */
                    t->sc[b + s][h] = _mm512_srai_epi32(_mm512_slli_epi32(
                        scw[gi / 4], 24 - 8 * (gi % 4)), 24);
                }
            }
            for (h = 0; h < 2 && with_quants; h++) {
                __m512i ql[16], qh[8];
                for (u = 0; u < 16; u++) {
                    ql[u] = GATHER(64 * h + 4 * u);
                }
                for (u = 0; u < 8; u++) {
                    qh[u] = GATHER(128 + 32 * h + 4 * u);
                }
                /* block 4h + v: ql[32 (v & 1) + ...] low nibbles for
                 * v < 2, high for v >= 2; qh bits 2v, 2v + 1 */
                for (s = 0; s < 4; s++) {
                    for (u = 0; u < 8; u++) {
                        __m512i l = ql[8 * (s & 1) + u];
                        __m512i q = _mm512_and_si512(
                            s < 2 ? l : _mm512_srli_epi32(l, 4), lo4);
                        __m512i hb = _mm512_and_si512(
                            _mm512_srli_epi32(qh[u], 2 * s),
                            _mm512_set1_epi32(0x03030303));
                        t->q[b + 4 * h + s][u] = _mm512_or_si512(
                            q, _mm512_slli_epi32(hb, 4));
                    }
                }
            }
        } else {
            __m512i dd = GATHER(0);
            __m512i a = GATHER(4), bb = GATHER(8), c = GATHER(12);
            __m512i qh[8];
            int     qoff = type == LLM_Q4_K ? 16 : 48;

            t->d[b] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
            t->m[b] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(
                _mm512_srli_epi32(dd, 16)));
            /* the 6-bit scales and mins (see quant_ref.c) */
            for (s = 0; s < 8; s++) {
                if (s < 4) {
                    t->sc[b + s][0] = _mm512_and_si512(lane_byte(a, s),
                                                       _mm512_set1_epi32(63));
                    t->mn[b + s] = _mm512_and_si512(lane_byte(bb, s),
                                                    _mm512_set1_epi32(63));
                } else {
                    __m512i cs = lane_byte(c, s - 4);
                    t->sc[b + s][0] = _mm512_or_si512(
                        _mm512_and_si512(cs, _mm512_set1_epi32(15)),
                        _mm512_slli_epi32(_mm512_srli_epi32(
                            lane_byte(a, s - 4), 6), 4));
                    t->mn[b + s] = _mm512_or_si512(
                        _mm512_srli_epi32(cs, 4),
                        _mm512_slli_epi32(_mm512_srli_epi32(
                            lane_byte(bb, s - 4), 6), 4));
                }
            }
            if (!with_quants) {
                continue;
            }
            if (type == LLM_Q5_K) {
                for (u = 0; u < 8; u++) {
                    qh[u] = GATHER(16 + 4 * u);
                }
            }
            for (s = 0; s < 8; s += 2) {
                for (u = 0; u < 8; u++) {
                    __m512i v = GATHER(qoff + 16 * s + 4 * u);
                    __m512i q0 = _mm512_and_si512(v, lo4);
                    __m512i q1 = _mm512_and_si512(_mm512_srli_epi32(v, 4), lo4);
                    if (type == LLM_Q5_K) {
                        const __m512i one = _mm512_set1_epi32(0x01010101);
                        q0 = _mm512_or_si512(q0, _mm512_slli_epi32(
                            _mm512_and_si512(_mm512_srli_epi32(qh[u], s), one),
                            4));
                        q1 = _mm512_or_si512(q1, _mm512_slli_epi32(
                            _mm512_and_si512(_mm512_srli_epi32(qh[u], s + 1),
                                             one), 4));
                    }
                    t->q[b + s][u] = q0;
                    t->q[b + s + 1][u] = q1;
                }
            }
        }
    }
#undef GATHER
}


/* The activation side of a segment for the rows of a kernel. */
typedef struct t_act {
    const int8_t   *q;          /* quants of block b0 */
    const float    *d;          /* d_x of block b0 (K: of super-block b0/8) */
    const float    *s1;         /* Q4_1: Q8_1's sums from block b0 */
    const int32_t  *sum;        /* blocks of 32: quant sums from block b0;
                                   K: sums of 16 from block b0 */
} t_act;


INLINE t_act
act_of(const llm_cpu_gemm *g, int type, int64_t r, int64_t b0)
{
    const uint8_t *row = x_row(g, r);
    t_act          a;

    a.q = LLM_XQ_QS(row) + 32 * b0;
    if (is_kq(type)) {
        a.d = LLM_XQ_D(row, g->k) + b0 / 8;
        a.s1 = NULL;
        a.sum = LLM_XQ_BSUM16(row, g->k) + 2 * b0;
    } else {
        a.d = LLM_XQ_D(row, g->k) + b0;
        a.s1 = LLM_XQ_S1(row, g->k) + b0;
        a.sum = LLM_XQ_ISUM(row, g->k) + b0;
    }
    return a;
}


/* ------------------------------------------------ quantized: tiles */

/* is[r] = sum of quants u0 .. u0+NU-1 (of 4) of block b. */
INLINE void
t_dots(const t_tile *t, const t_act *xa, int b, int u0, int NU, int RB,
       __m512i *is)
{
    int r, u;

#pragma GCC unroll 8
    for (r = 0; r < RB; r++) {
        is[r] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (u = u0; u < u0 + NU; u++) {
        __m512i wv = _mm512_load_si512(&t->q[b][u]);
#pragma GCC unroll 8
        for (r = 0; r < RB; r++) {
            int32_t xv;
            memcpy(&xv, xa[r].q + 32 * b + 4 * u, 4);
            is[r] = _mm512_dpbusd_epi32(is[r], wv, _mm512_set1_epi32(xv));
        }
    }
}


/* Prefetches the bytes of one unit (a block of 32, or a K-quant
 * super-block) of a ROWS16 group: n bytes at p. */
INLINE void
prefetch_unit(const uint8_t *p, int n)
{
    int o;

    for (o = 0; o < n; o += 64) {
        _mm_prefetch((const char *) p + o, _MM_HINT_T0);
    }
}


/* acc[r] (lanes: the 16 weight rows) += blocks 0 .. nb of the segment, for
 * RB activation rows.  pf: where the weights of the next segment start in
 * a ROWS16 tensor (its bytes follow this one's), fetched a unit per unit
 * computed, so that memory keeps streaming while the products run; or
 * NULL. */
INLINE void
t_rows(const t_tile *t, int type, int nb, const t_act *xa, int RB,
       __m512 *acc, const uint8_t *pf)
{
    __m512i is[8], isb[8];
    int     b, r, s, h;

    if (!is_kq(type)) {
        for (b = 0; b < nb; b++) {
            if (pf != NULL) {
                prefetch_unit(pf + (size_t) b * 16 * b32_size(type),
                              16 * b32_size(type));
            }
            t_dots(t, xa, b, 0, 8, RB, is);
#pragma GCC unroll 8
            for (r = 0; r < RB; r++) {
                acc[r] = step_b32(type, acc[r], is[r], xa[r].sum[b], t->d[b],
                                  t->m[b], xa[r].d[b], xa[r].s1[b]);
            }
        }
        return;
    }

    for (b = 0; b < nb; b += 8) {
        if (pf != NULL) {
            prefetch_unit(pf + (size_t) (b / 8) * 16 * k_size(type),
                          16 * k_size(type));
        }
#pragma GCC unroll 8
        for (r = 0; r < RB; r++) {
            isb[r] = _mm512_setzero_si512();
        }
        for (s = 0; s < 8; s++) {
            if (type == LLM_Q6_K) {
                for (h = 0; h < 2; h++) {
                    t_dots(t, xa, b + s, 4 * h, 4, RB, is);
#pragma GCC unroll 8
                    for (r = 0; r < RB; r++) {
                        __m512i v = _mm512_sub_epi32(is[r], _mm512_set1_epi32(
                            32 * xa[r].sum[2 * (b + s) + h]));
                        isb[r] = _mm512_add_epi32(isb[r], _mm512_mullo_epi32(
                            v, t->sc[b + s][h]));
                    }
                }
            } else {
                t_dots(t, xa, b + s, 0, 8, RB, is);
#pragma GCC unroll 8
                for (r = 0; r < RB; r++) {
                    isb[r] = _mm512_add_epi32(isb[r], _mm512_mullo_epi32(
                        is[r], t->sc[b + s][0]));
                }
            }
        }
#pragma GCC unroll 8
        for (r = 0; r < RB; r++) {
            __m512i msb = _mm512_setzero_si512();
            if (type != LLM_Q6_K) {
                for (s = 0; s < 8; s++) {
                    msb = _mm512_add_epi32(msb, _mm512_mullo_epi32(
                        t->mn[b + s], _mm512_set1_epi32(
                            xa[r].sum[2 * (b + s)]
                            + xa[r].sum[2 * (b + s) + 1])));
                }
            }
            acc[r] = step_k(type, acc[r], isb[r], msb, t->d[b], t->m[b],
                            xa[r].d[b / 8]);
        }
    }
}


INLINE void
t_rows_out(const t_tile *t, int type, int nb, int64_t b0, int last,
           const llm_cpu_gemm *g, int64_t r0, int RB, int64_t j0,
           __mmask16 rm, __m512 bias, const uint8_t *pf)
{
    __m512 acc[8];
    t_act  xa[8];
    int    r;

#pragma GCC unroll 8
    for (r = 0; r < RB; r++) {
        xa[r] = act_of(g, type, r0 + r, b0);
        acc[r] = b0 == 0 ? _mm512_setzero_ps()
                         : _mm512_maskz_loadu_ps(rm, out_row(g, r0 + r) + j0);
    }
    t_rows(t, type, nb, xa, RB, acc, pf);
#pragma GCC unroll 8
    for (r = 0; r < RB; r++) {
        if (last) {
            acc[r] = _mm512_add_ps(acc[r], bias);
        }
        _mm512_mask_storeu_ps(out_row(g, r0 + r) + j0, rm, acc[r]);
    }
}


/* ------------------------------------------ quantized: AMX tiles */

/*
 * With AMX (LLM_ISA_AMX), 16 activation rows of blocks of 32 (Q4_0, Q4_1,
 * Q8_0) take the integer dot products of a whole block from one tile
 * instruction instead of 8 x 16 VNNI ones:
 *
 *   A (tile 1): the 16 rows' int8 quants of block b, straight from the
 *               quantized activations (32 bytes per row, x_nb apart);
 *   B (tile 2): the 16 weight rows' unsigned quants of the block, which
 *               t_repack already lays out as AMX wants them (row u: each
 *               weight row's quants 4u .. 4u + 3, a dword per row);
 *   C (tile 0): C[r][j] = sum_k A[r][k] B[k][j] (TDPBSUD: signed A,
 *               unsigned B), row r = what t_dots gives for activation
 *               row r, lanes = the weight rows.
 *
 * The integer sums are exact either way and the float steps are
 * step_b32's, in the same order, so a row's output has the same bits as
 * on the VNNI path (and in any batch).  Two C tiles let one block's
 * product run while the previous block's sums are scaled.
 */
typedef struct amx_cfg {
    uint8_t     palette;
    uint8_t     start_row;
    uint8_t     reserved[14];
    uint16_t    colsb[16];
    uint8_t     rows[16];
} amx_cfg;

static __thread int amx_ready;      /* this thread's tiles configured */


static void
amx_configure(void)
{
    amx_cfg c;

    memset(&c, 0, sizeof(c));
    c.palette = 1;
    c.rows[0] = 16;                 /* C, two of them: 16 x 16 int32 */
    c.colsb[0] = 64;
    c.rows[3] = 16;
    c.colsb[3] = 64;
    c.rows[1] = 16;                 /* A: 16 rows x 32 int8 */
    c.colsb[1] = 32;
    c.rows[2] = 8;                  /* B: 8 x (16 rows x 4 quants) */
    c.colsb[2] = 64;
    /* Not _tile_loadconfig: GCC 12's version tells the compiler that
     * ldtilecfg reads 8 bytes, so where this function is not inlined the
     * stores of rows and colsb are dropped as dead and ldtilecfg faults
     * (seen with one more tile configured).  This operand is all 64. */
    __asm__ volatile ("ldtilecfg %0" : : "m" (c));
    amx_ready = 1;
}


/* GCC 12's _tile_loadd gives the compiler only the address, not that
 * memory is read: stores to the repacked tile or the activations could
 * be moved past it or dropped as dead.  The clobber says it reads. */
#define AMX_LOAD(tmm, base, stride)                                         \
    __asm__ volatile ("tileloadd (%0,%1,1), %%tmm" #tmm                     \
                      : : "r" ((const void *) (base)), "r" ((long) (stride))\
                      : "memory")

#define AMX_PRODUCT(ct, b)                                                  \
    do {                                                                    \
        AMX_LOAD(1, xq0 + 32 * (b), g->x_nb);                               \
        AMX_LOAD(2, &t->q[(b)][0], 64);                                     \
        _tile_zero(ct);                                                     \
        _tile_dpbsud(ct, 1, 2);                                             \
    } while (0)


INLINE void
t_rows_out_amx(const t_tile *t, int type, int nb, int64_t b0, int last,
               const llm_cpu_gemm *g, int64_t r0, int64_t j0, __mmask16 rm,
               __m512 bias, const uint8_t *pf)
{
    int32_t        c[2][16][16] __attribute__((aligned(64)));
    __m512         acc[16];
    /* rows r0 .. r0+15: quants x_nb apart; scales from the table */
    const int8_t  *xq0 = LLM_XQ_QS(x_row(g, r0)) + 32 * b0;
    const int64_t  nbk = g->k / 32, grp = r0 / 16;
    int            r, b;

    if (!amx_ready) {
        amx_configure();
    }
#pragma GCC unroll 16
    for (r = 0; r < 16; r++) {
        acc[r] = b0 == 0 ? _mm512_setzero_ps()
                         : _mm512_maskz_loadu_ps(rm, out_row(g, r0 + r) + j0);
    }
    /* block b + 1's product runs and block b's sums are stored while
     * block b - 1's, stored one block earlier, are scaled: the loads
     * never wait for the tile store just issued */
    AMX_PRODUCT(0, 0);
    for (b = 0; b <= nb; b++) {
        if (pf != NULL && b < nb) {
            prefetch_unit(pf + (size_t) b * 16 * b32_size(type),
                          16 * b32_size(type));
        }
        if (b < nb) {
            if (b + 1 < nb) {
                if (b % 2 == 0) {
                    AMX_PRODUCT(3, b + 1);
                } else {
                    AMX_PRODUCT(0, b + 1);
                }
            }
            if (b % 2 == 0) {
                _tile_stored(0, c[0], 64);
            } else {
                _tile_stored(3, c[1], 64);
            }
        }
        if (b == 0) {
            continue;
        }
#pragma GCC unroll 16
        for (r = 0; r < 16; r++) {
            acc[r] = step_b32(type, acc[r],
                              _mm512_load_si512(c[(b - 1) % 2][r]),
                              LLM_XG_ISUM(g->xg, nbk, grp, b0 + b - 1)[r],
                              t->d[b - 1], t->m[b - 1],
                              LLM_XG_D(g->xg, nbk, grp, b0 + b - 1)[r],
                              LLM_XG_S1(g->xg, nbk, grp, b0 + b - 1)[r]);
        }
    }
#pragma GCC unroll 16
    for (r = 0; r < 16; r++) {
        if (last) {
            acc[r] = _mm512_add_ps(acc[r], bias);
        }
        _mm512_mask_storeu_ps(out_row(g, r0 + r) + j0, rm, acc[r]);
    }
}


#define RPF_BLOCKS  16           /* rows16_direct's prefetch distance */

/* One or two activation rows on a whole ROWS16 group of 16 weight rows
 * (lanes): each block's quants go from their load to the dot products
 * without the t_tile round trip, which at so few rows costs more than
 * it saves.  The same integer sums and float steps as t_rows. */
INLINE void
rows16_direct(const llm_cpu_gemm *g, int type, int RB, const uint8_t *grp,
              int64_t j0, __m512 bias)
{
    const int      bs = b32_size(type);
    const int      sb = type == LLM_Q4_1 ? 64 : 32;   /* scale bytes */
    const int      nu = type == LLM_Q8_0 ? 8 : 4;     /* quant vectors */
    const int64_t  nb = g->k / 32;
    __m512         acc[2] = { _mm512_setzero_ps(), _mm512_setzero_ps() };
    t_act          xa[2];
    int64_t        b;
    int            r, u;

    for (r = 0; r < RB; r++) {
        xa[r] = act_of(g, type, r, 0);
    }
    for (b = 0; b < nb; b++) {
        const uint8_t *p = grp + (size_t) b * 16 * (size_t) bs;
        __m512         dw = _mm512_cvtph_ps(
            _mm256_loadu_si256((const __m256i *) p));
        __m512         mw = type == LLM_Q4_1
            ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (p + 32)))
            : _mm512_setzero_ps();
        __m512i        is[2] = { _mm512_setzero_si512(),
                                 _mm512_setzero_si512() };

        /* a few blocks ahead: the stream of one thread alone does not
         * keep enough lines in flight */
        prefetch_unit(p + RPF_BLOCKS * 16 * bs, 16 * bs);
        for (u = 0; u < nu; u++) {
            __m512i w0, w1;

            weight_dword(type, _mm512_loadu_si512(p + sb + 64 * u), &w0, &w1);
            for (r = 0; r < RB; r++) {
                int32_t x0, x1;

                memcpy(&x0, xa[r].q + 32 * b + 4 * u, 4);
                is[r] = _mm512_dpbusd_epi32(is[r], w0, _mm512_set1_epi32(x0));
                if (type != LLM_Q8_0) {
                    memcpy(&x1, xa[r].q + 32 * b + 16 + 4 * u, 4);
                    is[r] = _mm512_dpbusd_epi32(is[r], w1,
                                                _mm512_set1_epi32(x1));
                }
            }
        }
        for (r = 0; r < RB; r++) {
            acc[r] = step_b32(type, acc[r], is[r], xa[r].sum[b], dw, mw,
                              xa[r].d[b], xa[r].s1[b]);
        }
    }
    for (r = 0; r < RB; r++) {
        _mm512_storeu_ps(out_row(g, r) + j0, _mm512_add_ps(acc[r], bias));
    }
}


INLINE void
gemm_tiles(const llm_cpu_gemm *g, int64_t m0, int64_t m1, int type)
{
    const int kq = is_kq(type);
    /* bytes of one block of 32 (K-quants: of a super-block) */
    const int bs = kq ? k_size(type) : b32_size(type);
    t_tile         t __attribute__((aligned(64)));
    int64_t        nb = g->k / 32, j0, s0, r;
    const uint8_t *pf;

    for (j0 = m0; j0 < m1; j0 += 16) {
        int       rows = m1 - j0 < 16 ? (int) (m1 - j0) : 16;
        __mmask16 rm = (__mmask16) ((1u << rows) - 1);
        __m512    bias = g->bias ? _mm512_maskz_loadu_ps(rm, g->bias + j0)
                                 : _mm512_setzero_ps();

        if (g->w_rows16 && rows == 16 && g->n <= 2 && !kq) {
            if (g->n == 1) {
                rows16_direct(g, type, 1, g->w + (size_t) j0 * g->w_nb, j0,
                              bias);
            } else {
                rows16_direct(g, type, 2, g->w + (size_t) j0 * g->w_nb, j0,
                              bias);
            }
            continue;
        }
        for (s0 = 0; s0 < nb; s0 += TSEG) {
            int            ns = nb - s0 < TSEG ? (int) (nb - s0) : TSEG;
            int            last = s0 + ns == nb;
            const uint8_t *base = g->w + (size_t) j0 * g->w_nb
                                  + (kq ? (size_t) (s0 / 8) * bs
                                        : (size_t) s0 * bs);

            if (kq && g->w_rows16 && rows == 16) {
                t_repack_k(type, g->w + (size_t) j0 * g->w_nb
                                 + (size_t) (s0 / 8) * 16 * bs,
                           g->w_nb, rm, ns, 1, 1, &t);
            } else if (kq) {
                t_repack_k(type, base, g->w_nb, rm, ns, 1, 0, &t);
            } else if (g->w_rows16 && rows == 16) {
                t_unpack16(type, g->w + (size_t) j0 * g->w_nb, s0, ns, &t);
            } else {
                t_repack(type, base, g->w_nb, rm, ns, 1, &t);
            }
            /* a ROWS16 group's next segment (or the next group) follows
             * this one: the first pass over this one prefetches it */
            pf = g->w_rows16 && rows == 16
                 ? g->w + (size_t) j0 * g->w_nb
                   + (size_t) (kq ? (s0 + ns) / 8 : s0 + ns) * 16 * bs
                 : NULL;
            r = 0;
            if (g->amx && !kq && g->xg != NULL) {
                for (; r + 16 <= g->n; r += 16, pf = NULL) {
                    t_rows_out_amx(&t, type, ns, s0, last, g, r, j0, rm,
                                   bias, pf);
                }
            }
            for (; r + 8 <= g->n; r += 8, pf = NULL) {
                t_rows_out(&t, type, ns, s0, last, g, r, 8, j0, rm, bias, pf);
            }
            switch (g->n - r) {
            case 7: t_rows_out(&t, type, ns, s0, last, g, r, 7, j0, rm, bias,
                               pf);
                    break;
            case 6: t_rows_out(&t, type, ns, s0, last, g, r, 6, j0, rm, bias,
                               pf);
                    break;
            case 5: t_rows_out(&t, type, ns, s0, last, g, r, 5, j0, rm, bias,
                               pf);
                    break;
            case 4: t_rows_out(&t, type, ns, s0, last, g, r, 4, j0, rm, bias,
                               pf);
                    break;
            case 3: t_rows_out(&t, type, ns, s0, last, g, r, 3, j0, rm, bias,
                               pf);
                    break;
            case 2: t_rows_out(&t, type, ns, s0, last, g, r, 2, j0, rm, bias,
                               pf);
                    break;
            case 1: t_rows_out(&t, type, ns, s0, last, g, r, 1, j0, rm, bias,
                               pf);
                    break;
            }
        }
    }
}


/* ------------------------------- quantized: rows, without repacking */

/*
 * 16 vectors of 16 int32 partial sums, one per weight row (D[j]: the
 * vpdpbusd of row j's 64 quants, 128-bit lane L summing elements
 * 16L .. 16L+15), into vectors whose lane j belongs to row j: the sums of
 * the two blocks of 32 (paired: the 4-bit pair order of XQ32P, lanes 0+2
 * and 1+3; else lanes 0+1 and 2+3), or of the four groups of 16.
 */
INLINE void
s_tree(const __m512i *D, int paired, int quarters, __m512i *out)
{
    __m512i E[8], F[4];
    int     i;

#pragma GCC unroll 8
    for (i = 0; i < 8; i++) {
        /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        E[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(D[2 * i], D[2 * i + 1]),
                                _mm512_unpackhi_epi32(D[2 * i], D[2 * i + 1]));
    }
#pragma GCC unroll 4
    for (i = 0; i < 4; i++) {
        /* per 128-bit lane L: rows 4i .. 4i+3, group L */
        F[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(E[2 * i], E[2 * i + 1]),
                                _mm512_unpackhi_epi64(E[2 * i], E[2 * i + 1]));
    }
    if (quarters) {
        /* out[i] = [F0.Li, F1.Li, F2.Li, F3.Li]; written out because the
         * shuffle's selector must be a constant (clang does not fold the
         * loop's) */
#define S_QUARTER(i)                                                        \
        out[i] = _mm512_shuffle_i32x4(                                      \
            _mm512_shuffle_i32x4(F[0], F[1], 0x55 * (i)),                   \
            _mm512_shuffle_i32x4(F[2], F[3], 0x55 * (i)), 0x88)
        S_QUARTER(0);
        S_QUARTER(1);
        S_QUARTER(2);
        S_QUARTER(3);
#undef S_QUARTER
        return;
    }
    {
        /* per F: [block 0 sums, block 1 sums] of its 4 rows, twice */
        __m512i z01, z23;
        if (paired) {
            z01 = _mm512_add_epi32(_mm512_shuffle_i32x4(F[0], F[1], 0x44),
                                   _mm512_shuffle_i32x4(F[0], F[1], 0xee));
            z23 = _mm512_add_epi32(_mm512_shuffle_i32x4(F[2], F[3], 0x44),
                                   _mm512_shuffle_i32x4(F[2], F[3], 0xee));
        } else {
            z01 = _mm512_add_epi32(_mm512_shuffle_i32x4(F[0], F[1], 0x88),
                                   _mm512_shuffle_i32x4(F[0], F[1], 0xdd));
            z23 = _mm512_add_epi32(_mm512_shuffle_i32x4(F[2], F[3], 0x88),
                                   _mm512_shuffle_i32x4(F[2], F[3], 0xdd));
        }
        out[0] = _mm512_shuffle_i32x4(z01, z23, 0x88);
        out[1] = _mm512_shuffle_i32x4(z01, z23, 0xdd);
    }
}


/* D[j] = one chunk of 64 quants of each of the rows (zero beyond rows):
 * blocks b, b+1 for blocks of 32, chunk b / 2 % 4 of super-block b / 8
 * for K-quants. */
INLINE void
s_chunk(const llm_cpu_gemm *g, int type, const uint8_t *w0, int rows,
        int64_t b, __m512i xv, int pf, const k_idx *ix, __m512i *D)
{
    int j;

#pragma GCC unroll 16
    for (j = 0; j < 16; j++) {
        if (j < rows) {
            const uint8_t *row = w0 + (size_t) j * g->w_nb;
            __m512i        wq;

            if (is_kq(type)) {
                const uint8_t *blk = row + (b / 8) * k_size(type);
                if (pf && (b & 7) == 0) {
                    _mm_prefetch((const char *) blk + 16 * g->w_nb,
                                 _MM_HINT_T0);
                    _mm_prefetch((const char *) blk + 64 + 16 * g->w_nb,
                                 _MM_HINT_T0);
                    _mm_prefetch((const char *) blk + 128 + 16 * g->w_nb,
                                 _MM_HINT_T0);
                }
                wq = k_chunk_quants(type, blk, (int) (b / 2 % 4), ix);
            } else {
                const uint8_t *blk = row + b * b32_size(type);
                if (pf) {
                    _mm_prefetch((const char *) blk + 16 * g->w_nb,
                                 _MM_HINT_T0);
                }
                wq = b32_pair_quants(type, blk, blk + b32_size(type));
            }
            D[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv);
        } else {
            D[j] = _mm512_setzero_si512();
        }
    }
}


/*
 * Weight rows j0 .. j0+rows (<= 16) against one activation row, blocks
 * s0 .. s0+ns with the scales in t, into acc.  pf: prefetch the next 16
 * rows (the first activation row streams W).
 */
INLINE void
s_rows(const llm_cpu_gemm *g, int type, const t_tile *t, int64_t j0,
       int rows, int64_t s0, int ns, const t_act *xa, int pf,
       const k_idx *ix, __m512 *acc)
{
    const uint8_t *w0 = g->w + (size_t) j0 * g->w_nb;
    __m512i        D[16], S[4];
    int            c, j, i;

    if (!is_kq(type)) {
        for (c = 0; 2 * c < ns; c++) {
            int64_t b = s0 + 2 * c;

            if (2 * c + 1 == ns) {
                /* a last odd block: 32 bytes, natural order */
#pragma GCC unroll 16
                for (j = 0; j < 16; j++) {
                    D[j] = _mm512_setzero_si512();
                    if (j < rows) {
                        const uint8_t *blk = w0 + (size_t) j * g->w_nb
                                             + b * b32_size(type);
                        D[j] = _mm512_zextsi256_si512(_mm256_dpbusd_epi32(
                            _mm256_setzero_si256(), b32_one_quants(type, blk),
                            _mm256_loadu_si256((const __m256i *)
                                               (xa->q + 64 * c))));
                    }
                }
                s_tree(D, 0, 0, S);
                *acc = step_b32(type, *acc, S[0], xa->sum[2 * c],
                                t->d[2 * c], t->m[2 * c], xa->d[2 * c],
                                xa->s1[2 * c]);
                break;
            }
            s_chunk(g, type, w0, rows, b,
                    _mm512_loadu_si512(xa->q + 64 * c), pf, ix, D);
            s_tree(D, type != LLM_Q8_0, 0, S);
            for (i = 0; i < 2; i++) {
                *acc = step_b32(type, *acc, S[i], xa->sum[2 * c + i],
                                t->d[2 * c + i], t->m[2 * c + i],
                                xa->d[2 * c + i], xa->s1[2 * c + i]);
            }
        }
        return;
    }

    for (c = 0; 8 * c < ns; c++) {          /* super-blocks */
        __m512i isb = _mm512_setzero_si512(), msb = _mm512_setzero_si512();
        int     b = 8 * c, h;

        for (h = 0; h < 4; h++) {           /* its chunks of 64 */
            s_chunk(g, type, w0, rows, s0 + b + 2 * h,
                    _mm512_loadu_si512(xa->q + 32 * b + 64 * h), pf, ix, D);
            if (type == LLM_Q6_K) {
                s_tree(D, 0, 1, S);
                for (i = 0; i < 4; i++) {   /* groups of 16 */
                    int     bb = b + 2 * h + i / 2;
                    __m512i v = _mm512_sub_epi32(S[i], _mm512_set1_epi32(
                        32 * xa->sum[2 * bb + (i & 1)]));
                    isb = _mm512_add_epi32(isb, _mm512_mullo_epi32(
                        v, t->sc[bb][i & 1]));
                }
            } else {
                s_tree(D, 0, 0, S);
                for (i = 0; i < 2; i++) {
                    isb = _mm512_add_epi32(isb, _mm512_mullo_epi32(
                        S[i], t->sc[b + 2 * h + i][0]));
                }
            }
        }
        if (type != LLM_Q6_K) {
            for (i = 0; i < 8; i++) {
                msb = _mm512_add_epi32(msb, _mm512_mullo_epi32(
                    t->mn[b + i], _mm512_set1_epi32(xa->sum[2 * (b + i)]
                                                    + xa->sum[2 * (b + i) + 1])));
            }
        }
        *acc = step_k(type, *acc, isb, msb, t->d[b], t->m[b], xa->d[c]);
    }
}


INLINE void
gemm_rows(const llm_cpu_gemm *g, int64_t m0, int64_t m1, int type)
{
    const int kq = is_kq(type);
    const int bs = kq ? k_size(type) : b32_size(type);
    t_tile    t __attribute__((aligned(64)));
    k_idx     ix;
    int64_t   nb = g->k / 32, j0, s0, r;

    if (type == LLM_Q5_K) {
        k_idx_init(type, &ix);
    }
    for (j0 = m0; j0 < m1; j0 += 16) {
        int       rows = m1 - j0 < 16 ? (int) (m1 - j0) : 16;
        __mmask16 rm = (__mmask16) ((1u << rows) - 1);
        __m512    bias = g->bias ? _mm512_maskz_loadu_ps(rm, g->bias + j0)
                                 : _mm512_setzero_ps();

        for (s0 = 0; s0 < nb; s0 += TSEG) {
            int            ns = nb - s0 < TSEG ? (int) (nb - s0) : TSEG;
            const uint8_t *base = g->w + (size_t) j0 * g->w_nb
                                  + (kq ? (size_t) (s0 / 8) * bs
                                        : (size_t) s0 * bs);

            /* only the scales are repacked here */
            if (kq) {
                t_repack_k(type, base, g->w_nb, rm, ns, 0, 0, &t);
            } else {
                t_repack(type, base, g->w_nb, rm, ns, 0, &t);
            }
            for (r = 0; r < g->n; r++) {
                t_act  xa = act_of(g, type, r, s0);
                __m512 acc = s0 == 0 ? _mm512_setzero_ps()
                             : _mm512_maskz_loadu_ps(rm, out_row(g, r) + j0);
                s_rows(g, type, &t, j0, rows, s0, ns, &xa, r == 0, &ix,
                       &acc);
                if (s0 + ns == nb) {
                    acc = _mm512_add_ps(acc, bias);
                }
                _mm512_mask_storeu_ps(out_row(g, r) + j0, rm, acc);
            }
        }
    }
}


/* ------------------------------------------------------------ drivers */

/* RB activation rows against weight rows [jc, je) of plain weights. */
INLINE void
plain_rows(const llm_cpu_gemm *g, int type, int RB, int64_t r0, int64_t jc,
           int64_t je)
{
    /* the widest tile whose accumulators and operands fit 32 registers */
    const int RW = RB <= 2 ? 4 : RB <= 4 ? 3 : RB <= 8 ? 2 : 1;
    int64_t   j = jc;

    for (; j + RW <= je; j += RW) {
        tile_plain(g, type, RB, RW, r0, j);
    }
    for (; j < je; j++) {
        tile_plain(g, type, RB, 1, r0, j);
    }
}


INLINE void
gemm_plain(const llm_cpu_gemm *g, int64_t m0, int64_t m1, int type)
{
    int64_t jc, je, r, mc;

    mc = (int64_t) (CHUNK_BYTES / (g->w_nb ? g->w_nb : 1));
    mc = mc < 12 ? 12 : mc - mc % 12;
    for (jc = m0; jc < m1; jc = je) {
        je = jc + mc < m1 ? jc + mc : m1;
        for (r = 0; r + 16 <= g->n; r += 16) {
            plain_rows(g, type, 16, r, jc, je);
        }
        for (; r + 8 <= g->n; r += 8) {
            plain_rows(g, type, 8, r, jc, je);
        }
        for (; r + 4 <= g->n; r += 4) {
            plain_rows(g, type, 4, r, jc, je);
        }
        switch (g->n - r) {
        case 3: plain_rows(g, type, 3, r, jc, je); break;
        case 2: plain_rows(g, type, 2, r, jc, je); break;
        case 1: plain_rows(g, type, 1, r, jc, je); break;
        }
    }
}


#define GEMM_Q(name, type)                                                  \
static void                                                                 \
name(const llm_cpu_gemm *g, int64_t m0, int64_t m1)                         \
{                                                                           \
    if (g->batched) {                                                       \
        gemm_tiles(g, m0, m1, type);                                        \
    } else {                                                                \
        gemm_rows(g, m0, m1, type);                                         \
    }                                                                       \
}

#define GEMM_P(name, type)                                                  \
static void                                                                 \
name(const llm_cpu_gemm *g, int64_t m0, int64_t m1)                         \
{                                                                           \
    gemm_plain(g, m0, m1, type);                                            \
}

GEMM_Q(gemm_q4_0_avx512, LLM_Q4_0)
GEMM_Q(gemm_q4_1_avx512, LLM_Q4_1)
GEMM_Q(gemm_q8_0_avx512, LLM_Q8_0)
GEMM_Q(gemm_q4_k_avx512, LLM_Q4_K)
GEMM_Q(gemm_q5_k_avx512, LLM_Q5_K)
GEMM_Q(gemm_q6_k_avx512, LLM_Q6_K)
GEMM_P(gemm_f32_avx512, LLM_F32)
GEMM_P(gemm_f16_avx512, LLM_F16)
GEMM_P(gemm_bf16_avx512, LLM_BF16)


void
llm_cpu_kernels_avx512(llm_cpu_kernels *k)
{
    k->quant_x = quant_x_avx512;

    k->gemm[LLM_Q4_0] = gemm_q4_0_avx512;
    k->gemm[LLM_Q4_1] = gemm_q4_1_avx512;
    k->gemm[LLM_Q8_0] = gemm_q8_0_avx512;
    k->gemm[LLM_Q4_K] = gemm_q4_k_avx512;
    k->gemm[LLM_Q5_K] = gemm_q5_k_avx512;
    k->gemm[LLM_Q6_K] = gemm_q6_k_avx512;
    k->gemm[LLM_F32] = gemm_f32_avx512;
    k->gemm[LLM_F16] = gemm_f16_avx512;
    k->gemm[LLM_BF16] = gemm_bf16_avx512;

    /* 1-2 rows (rows kernel): the 4-bit pair order for Q4_0/Q4_1;
     * 3 rows and more (tiles): natural.  Both give the same numbers. */
    k->xq_kind[LLM_Q4_0] = LLM_XQ32P;
    k->xq_kind[LLM_Q4_1] = LLM_XQ32P;
    k->xq_kind[LLM_Q8_0] = LLM_XQ32;
    k->xq_kind[LLM_Q4_K] = LLM_XQ32K;
    k->xq_kind[LLM_Q5_K] = LLM_XQ32K;
    k->xq_kind[LLM_Q6_K] = LLM_XQ32K;
    k->batch_rows = 3;
    k->xg_rows = 16;
    k->rows16 = 1;
    k->xq_kind_batch[LLM_Q4_0] = LLM_XQ32;
    k->xq_kind_batch[LLM_Q4_1] = LLM_XQ32;
    k->xq_kind_batch[LLM_Q8_0] = LLM_XQ32;
    k->xq_kind_batch[LLM_Q4_K] = LLM_XQ32K;
    k->xq_kind_batch[LLM_Q5_K] = LLM_XQ32K;
    k->xq_kind_batch[LLM_Q6_K] = LLM_XQ32K;

    llm_cpu_vec_avx512(k);
}
