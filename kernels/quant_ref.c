/*
 * Reference (portable C) dequantization and quantization of one row, for
 * the GGUF block layouts declared in dtype.h.  Slow and simple on purpose:
 * tools, tests and cold paths (embedding lookups) use it; the CPU backend
 * has its own SIMD kernels for the hot paths.
 *
 * Block layouts (bit for bit GGUF's; all multi-byte fields little-endian):
 *
 *   Q4_0  { f16 d; u8 qs[16]; }            x = d * (q - 8)
 *   Q4_1  { f16 d; f16 m; u8 qs[16]; }     x = d * q + m
 *         qs[i] low nibble = element i, high nibble = element i + 16
 *   Q8_0  { f16 d; i8 qs[32]; }            x = d * q
 *   Q8_1  { f16 d; f16 s; i8 qs[32]; }     x = d * q, s = d * sum(q)
 *   Q4_K  { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }
 *         8 sub-blocks of 32 with 6-bit scale and min (see scale_min_k4);
 *         64 elements per 32 bytes of qs: low nibbles the first 32,
 *         high nibbles the next 32.  x = d * sc * q - dmin * m
 *   Q5_K  { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
 *         as Q4_K plus a fifth bit: element l of sub-block j takes bit j
 *         of qh[l]
 *   Q6_K  { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }
 *         two halves of 128; x = d * scale[16-group] * (q - 32)
 *   Q8_K  { f32 d; i8 qs[256]; i16 bsums[16]; }  bsums: sums of 16
 */
#include "dtype.h"

#include <math.h>
#include <string.h>

#include "../engine/common.h"


static uint16_t
rd16(const uint8_t *p)
{
    return (uint16_t) (p[0] | (p[1] << 8));
}


static void
wr16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t) v;
    p[1] = (uint8_t) (v >> 8);
}


/*
 * The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block.
 * Bytes 0..3 hold scales 0..3 in their low 6 bits, bytes 4..7 mins 0..3;
 * scales/mins 4..7 keep their low 4 bits in bytes 8..11 (scale low nibble,
 * min high nibble) and their top 2 bits in the top bits of bytes 0..3
 * (scales) and 4..7 (mins).
 */
static void
scale_min_k4(const uint8_t *s, int j, int *sc, int *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}


static void
deq_q4_0(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     l;

    for (i = 0; i < nb; i++, b += 18, y += 32) {
        float d = llm_f16_to_f32(rd16(b));
        for (l = 0; l < 16; l++) {
            y[l] = d * (float) ((b[2 + l] & 0x0f) - 8);
            y[l + 16] = d * (float) ((b[2 + l] >> 4) - 8);
        }
    }
}


static void
deq_q4_1(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     l;

    for (i = 0; i < nb; i++, b += 20, y += 32) {
        float d = llm_f16_to_f32(rd16(b));
        float m = llm_f16_to_f32(rd16(b + 2));
        for (l = 0; l < 16; l++) {
            y[l] = d * (float) (b[4 + l] & 0x0f) + m;
            y[l + 16] = d * (float) (b[4 + l] >> 4) + m;
        }
    }
}


static void
deq_q8_0(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     l;

    for (i = 0; i < nb; i++, b += 34, y += 32) {
        float d = llm_f16_to_f32(rd16(b));
        for (l = 0; l < 32; l++) {
            y[l] = d * (float) (int8_t) b[2 + l];
        }
    }
}


static void
deq_q8_1(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     l;

    for (i = 0; i < nb; i++, b += 36, y += 32) {
        float d = llm_f16_to_f32(rd16(b));
        for (l = 0; l < 32; l++) {
            y[l] = d * (float) (int8_t) b[4 + l];
        }
    }
}


static void
deq_q4_k(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     j, l, sc, m;

    for (i = 0; i < nb; i++, b += 144) {
        float          d = llm_f16_to_f32(rd16(b));
        float          dmin = llm_f16_to_f32(rd16(b + 2));
        const uint8_t *scales = b + 4;
        const uint8_t *qs = b + 16;

        for (j = 0; j < 8; j += 2, qs += 32) {
            float d1, m1, d2, m2;
            scale_min_k4(scales, j, &sc, &m);
            d1 = d * (float) sc;
            m1 = dmin * (float) m;
            scale_min_k4(scales, j + 1, &sc, &m);
            d2 = d * (float) sc;
            m2 = dmin * (float) m;
            for (l = 0; l < 32; l++) {
                *y++ = d1 * (float) (qs[l] & 0x0f) - m1;
            }
            for (l = 0; l < 32; l++) {
                *y++ = d2 * (float) (qs[l] >> 4) - m2;
            }
        }
    }
}


static void
deq_q5_k(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     j, l, sc, m;

    for (i = 0; i < nb; i++, b += 176) {
        float          d = llm_f16_to_f32(rd16(b));
        float          dmin = llm_f16_to_f32(rd16(b + 2));
        const uint8_t *scales = b + 4;
        const uint8_t *qh = b + 16;
        const uint8_t *qs = b + 48;

        for (j = 0; j < 8; j += 2, qs += 32) {
            float d1, m1, d2, m2;
            scale_min_k4(scales, j, &sc, &m);
            d1 = d * (float) sc;
            m1 = dmin * (float) m;
            scale_min_k4(scales, j + 1, &sc, &m);
            d2 = d * (float) sc;
            m2 = dmin * (float) m;
            for (l = 0; l < 32; l++) {
                int q = (qs[l] & 0x0f) | (((qh[l] >> j) & 1) << 4);
                *y++ = d1 * (float) q - m1;
            }
            for (l = 0; l < 32; l++) {
                int q = (qs[l] >> 4) | (((qh[l] >> (j + 1)) & 1) << 4);
                *y++ = d2 * (float) q - m2;
            }
        }
    }
}


static void
deq_q6_k(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     h, l;

    for (i = 0; i < nb; i++, b += 210) {
        float          d = llm_f16_to_f32(rd16(b + 208));
        const uint8_t *ql = b;
        const uint8_t *qh = b + 128;
        const int8_t  *sc = (const int8_t *) (b + 192);

        /* two halves of 128 elements: 64 bytes of ql, 32 of qh, 8 scales */
        for (h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128) {
            for (l = 0; l < 32; l++) {
                int s = l / 16;
                int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4))
                         - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;

                y[l] = (d * (float) sc[s]) * (float) q1;
                y[l + 32] = (d * (float) sc[s + 2]) * (float) q2;
                y[l + 64] = (d * (float) sc[s + 4]) * (float) q3;
                y[l + 96] = (d * (float) sc[s + 6]) * (float) q4;
            }
        }
    }
}


static void
deq_q8_k(const uint8_t *b, float *y, int64_t nb)
{
    int64_t i;
    int     l;
    float   d;

    for (i = 0; i < nb; i++, b += 292, y += 256) {
        memcpy(&d, b, 4);
        for (l = 0; l < 256; l++) {
            y[l] = d * (float) (int8_t) b[4 + l];
        }
    }
}


int
llm_dequantize_row(int type, const void *src, float *dst, int64_t n)
{
    const llm_dtype_info *ti = llm_dtype_get(type);
    const uint8_t        *b = src;
    int64_t               i, nb;

    if (ti == NULL || n < 0 || n % ti->block != 0) {
        return LLM_EUNSUP;
    }
    nb = n / ti->block;

    switch (type) {
    case LLM_F32:
        memcpy(dst, src, (size_t) n * 4);
        return 0;
    case LLM_F16:
        for (i = 0; i < n; i++) {
            dst[i] = llm_f16_to_f32(rd16(b + 2 * i));
        }
        return 0;
    case LLM_BF16:
        for (i = 0; i < n; i++) {
            dst[i] = llm_bf16_to_f32(rd16(b + 2 * i));
        }
        return 0;
    case LLM_Q4_0: deq_q4_0(b, dst, nb); return 0;
    case LLM_Q4_1: deq_q4_1(b, dst, nb); return 0;
    case LLM_Q8_0: deq_q8_0(b, dst, nb); return 0;
    case LLM_Q8_1: deq_q8_1(b, dst, nb); return 0;
    case LLM_Q4_K: deq_q4_k(b, dst, nb); return 0;
    case LLM_Q5_K: deq_q5_k(b, dst, nb); return 0;
    case LLM_Q6_K: deq_q6_k(b, dst, nb); return 0;
    case LLM_Q8_K: deq_q8_k(b, dst, nb); return 0;
    default:
        return LLM_EUNSUP;
    }
}


/* roundf(): nearest, ties away from zero, as ggml's reference code. */
static int
nearest(float x)
{
    return (int) roundf(x);
}


static void
q_q8_0(const float *x, uint8_t *b, int64_t nb, int with_sum)
{
    int64_t i;
    int     l, q, sum;
    size_t  bs = with_sum ? 36 : 34;
    int     off = with_sum ? 4 : 2;

    for (i = 0; i < nb; i++, x += 32, b += bs) {
        float amax = 0.0f, d, id;

        for (l = 0; l < 32; l++) {
            amax = fmaxf(amax, fabsf(x[l]));
        }
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        sum = 0;
        for (l = 0; l < 32; l++) {
            q = nearest(x[l] * id);
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            b[off + l] = (uint8_t) (int8_t) q;
            sum += q;
        }
        wr16(b, llm_f32_to_f16(d));
        if (with_sum) {
            wr16(b + 2, llm_f32_to_f16(d * (float) sum));
        }
    }
}


static void
q_q4_0(const float *x, uint8_t *b, int64_t nb)
{
    int64_t i;
    int     l;

    for (i = 0; i < nb; i++, x += 32, b += 18) {
        float amax = 0.0f, max = 0.0f, d, id;

        /* the element of largest magnitude, sign kept, maps to -8 */
        for (l = 0; l < 32; l++) {
            if (fabsf(x[l]) > amax) {
                amax = fabsf(x[l]);
                max = x[l];
            }
        }
        d = max / -8.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        wr16(b, llm_f32_to_f16(d));
        for (l = 0; l < 16; l++) {
            int q0 = (int) (x[l] * id + 8.5f);
            int q1 = (int) (x[l + 16] * id + 8.5f);
            q0 = q0 > 15 ? 15 : q0 < 0 ? 0 : q0;
            q1 = q1 > 15 ? 15 : q1 < 0 ? 0 : q1;
            b[2 + l] = (uint8_t) (q0 | (q1 << 4));
        }
    }
}


static void
q_q4_1(const float *x, uint8_t *b, int64_t nb)
{
    int64_t i;
    int     l;

    for (i = 0; i < nb; i++, x += 32, b += 20) {
        float min = x[0], max = x[0], d, id;

        for (l = 1; l < 32; l++) {
            min = fminf(min, x[l]);
            max = fmaxf(max, x[l]);
        }
        d = (max - min) / 15.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        wr16(b, llm_f32_to_f16(d));
        wr16(b + 2, llm_f32_to_f16(min));
        for (l = 0; l < 16; l++) {
            int q0 = (int) ((x[l] - min) * id + 0.5f);
            int q1 = (int) ((x[l + 16] - min) * id + 0.5f);
            q0 = q0 > 15 ? 15 : q0 < 0 ? 0 : q0;
            q1 = q1 > 15 ? 15 : q1 < 0 ? 0 : q1;
            b[4 + l] = (uint8_t) (q0 | (q1 << 4));
        }
    }
}


static void
q_q8_k(const float *x, uint8_t *b, int64_t nb)
{
    int64_t i;
    int     l, q;
    int8_t  qs[256];
    int16_t bsums[16];

    for (i = 0; i < nb; i++, x += 256, b += 292) {
        float amax = 0.0f, d, id;

        for (l = 0; l < 256; l++) {
            amax = fmaxf(amax, fabsf(x[l]));
        }
        id = amax != 0.0f ? 127.0f / amax : 0.0f;
        d = amax != 0.0f ? 1.0f / id : 0.0f;
        memset(bsums, 0, sizeof(bsums));
        for (l = 0; l < 256; l++) {
            q = nearest(x[l] * id);
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            qs[l] = (int8_t) q;
            bsums[l / 16] = (int16_t) (bsums[l / 16] + q);
        }
        memcpy(b, &d, 4);
        memcpy(b + 4, qs, 256);
        for (l = 0; l < 16; l++) {
            wr16(b + 260 + 2 * l, (uint16_t) bsums[l]);
        }
    }
}


int
llm_quantize_row(int type, const float *src, void *dst, int64_t n)
{
    const llm_dtype_info *ti = llm_dtype_get(type);
    uint8_t              *b = dst;
    int64_t               i, nb;

    if (ti == NULL || n < 0 || n % ti->block != 0) {
        return LLM_EUNSUP;
    }
    nb = n / ti->block;

    switch (type) {
    case LLM_F32:
        memcpy(dst, src, (size_t) n * 4);
        return 0;
    case LLM_F16:
        for (i = 0; i < n; i++) {
            wr16(b + 2 * i, llm_f32_to_f16(src[i]));
        }
        return 0;
    case LLM_BF16:
        for (i = 0; i < n; i++) {
            wr16(b + 2 * i, llm_f32_to_bf16(src[i]));
        }
        return 0;
    case LLM_Q4_0: q_q4_0(src, b, nb); return 0;
    case LLM_Q4_1: q_q4_1(src, b, nb); return 0;
    case LLM_Q8_0: q_q8_0(src, b, nb, 0); return 0;
    case LLM_Q8_1: q_q8_0(src, b, nb, 1); return 0;
    case LLM_Q8_K: q_q8_k(src, b, nb); return 0;
    default:
        return LLM_EUNSUP;
    }
}
