/*
 * Matrix products out = x W^T (+ bias): argument checks, activation
 * quantization, the split over threads, OpenBLAS for large f32 products
 * (on request), and the portable C kernels (the reference the SIMD
 * kernels in matmul_avx2.c / matmul_avx512.c are tested against).
 *
 * Quantized weights are multiplied as llama.cpp does: the activation rows
 * are quantized once per call to 8 bits (cpu.h: Q8_0/Q8_1/Q8_K's
 * quantization in the XQ* layouts), then each block's integer dot product
 * is scaled by both block scales, in the canonical order of cpu.h.
 * Threads split the output features (rows of W) in chunks of contiguous
 * rows, so each thread streams its part of W once.
 */
#include "cpu.h"

#include <math.h>
#include <string.h>

#include <cblas.h>

/* Below this many activation elements, the caller quantizes them alone:
 * a second round trip through the pool costs more. */
#define QUANT_SERIAL_MAX  (16 * 1024)

/* F32 weights with LLM_CPU_BLAS=1: OpenBLAS from this many activation
 * rows and this inner dimension on (below, our register tiles were as
 * fast or faster; bench/kernels/RESULTS.md). */
#define BLAS_MIN_ROWS     16
#define BLAS_MIN_K        1024


/* ------------------------------------------- activation quantization */

size_t
llm_xq_row_bytes(int kind, int64_t k)
{
    size_t n;

    switch (kind) {
    case LLM_XQK:
        n = (size_t) k + 4 * (size_t) (k / 256 + k / 16 + k / 32);
        break;
    case LLM_XQ32K:
        n = (size_t) k + 4 * (size_t) (k / 256 + k / 16);
        break;
    default:
        n = (size_t) k + 12 * (size_t) (k / 32);
        break;
    }
    return (n + 63) & ~(size_t) 63;
}


float
llm_cpu_f16_round(float f)
{
    return llm_f16_to_f32(llm_f32_to_f16(f));
}


static float
block_absmax(const float *x, int n)
{
    float amax = 0.0f;
    int   i;

    for (i = 0; i < n; i++) {
        amax = fmaxf(amax, fabsf(x[i]));
    }
    return amax;
}


/* Q8_K's quantization of 256 values (see cpu.h); returns d. */
static float
q8k_block(const float *x, int8_t *q)
{
    float amax = 0.0f, max = 0.0f, iscale;
    int   i, v;

    for (i = 0; i < 256; i++) {
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    }
    if (amax == 0.0f) {
        memset(q, 0, 256);
        return 0.0f;
    }
    iscale = -127.0f / max;
    for (i = 0; i < 256; i++) {
        v = (int) nearbyintf(iscale * x[i]);
        q[i] = (int8_t) (v > 127 ? 127 : v);
    }
    return 1.0f / iscale;
}


/* Scalar activation quantization, every layout (the reference the SIMD
 * versions reproduce exactly). */
static void
quant_x_scalar(const float *x, void *xq, int64_t k, int kind)
{
    int8_t  *qs = LLM_XQ_QS(xq);
    float   *d = LLM_XQ_D(xq, k);
    int64_t  b, nb;
    int      i;

    if (kind == LLM_XQK || kind == LLM_XQ32K) {
        nb = k / 256;
        for (b = 0; b < nb; b++) {
            int8_t *q = qs + 256 * b;
            int     sum16[16];

            d[b] = q8k_block(x + 256 * b, q);
            memset(sum16, 0, sizeof(sum16));
            for (i = 0; i < 256; i++) {
                sum16[i / 16] += q[i];
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
        const float *xb = x + 32 * b;
        float        amax = block_absmax(xb, 32);
        float        id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int          sum = 0, q;

        for (i = 0; i < 32; i++) {
            q = (int) nearbyintf(xb[i] * id);
            sum += q;
            if (kind == LLM_XQ32P && (b | 1) < nb) {
                /* pair layout: b0 lo16, b1 lo16, b0 hi16, b1 hi16 */
                int8_t *pair = qs + 32 * (b & ~(int64_t) 1);
                pair[(i < 16 ? 0 : 32) + (b & 1) * 16 + (i & 15)] = (int8_t) q;
            } else {
                qs[32 * b + i] = (int8_t) q;
            }
        }
        d[b] = llm_cpu_f16_round(amax / 127.0f);
        LLM_XQ_S1(xq, k)[b] = llm_cpu_f16_round(amax / 127.0f * (float) sum);
        LLM_XQ_ISUM(xq, k)[b] = sum;
    }
}


/* --------------------------------------------------- scalar kernels */

static uint16_t
rd16(const uint8_t *p)
{
    return (uint16_t) (p[0] | (p[1] << 8));
}


static float
hf(const uint8_t *p)
{
    return llm_f16_to_f32(rd16(p));
}


/* The canonical sums of cpu.h, one output at a time. */
static float
dot_xq32(int type, const uint8_t *w, const void *xq, int64_t k)
{
    const int8_t *qs = LLM_XQ_QS(xq);
    const float  *d = LLM_XQ_D(xq, k);
    const float  *s1 = LLM_XQ_S1(xq, k);
    int64_t       b, nb = k / 32;
    float         acc = 0.0f;
    int           i, isum;

    for (b = 0; b < nb; b++) {
        const int8_t *x = qs + 32 * b;

        isum = 0;
        switch (type) {
        case LLM_Q4_0: {
            const uint8_t *q = w + 18 * b + 2;
            for (i = 0; i < 16; i++) {
                isum += ((q[i] & 0x0f) - 8) * x[i] + ((q[i] >> 4) - 8) * x[i + 16];
            }
            acc = fmaf((float) isum, hf(w + 18 * b) * d[b], acc);
            break;
        }
        case LLM_Q4_1: {
            const uint8_t *q = w + 20 * b + 4;
            for (i = 0; i < 16; i++) {
                isum += (q[i] & 0x0f) * x[i] + (q[i] >> 4) * x[i + 16];
            }
            acc = fmaf((float) isum, hf(w + 20 * b) * d[b], acc);
            /* the min times Q8_1's sum */
            acc = fmaf(hf(w + 20 * b + 2), s1[b], acc);
            break;
        }
        case LLM_Q8_0: {
            const int8_t *q = (const int8_t *) (w + 34 * b + 2);
            for (i = 0; i < 32; i++) {
                isum += q[i] * x[i];
            }
            acc = fmaf((float) isum, hf(w + 34 * b) * d[b], acc);
            break;
        }
        }
    }
    return acc;
}


static void
k4_scale_min(const uint8_t *s, int j, int *sc, int *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}


static float
dot_xqk(int type, const uint8_t *w, const void *xq, int64_t k)
{
    const int8_t  *qs = LLM_XQ_QS(xq);
    const float   *dx = LLM_XQ_D(xq, k);
    const int32_t *b16 = LLM_XQ_BSUM16(xq, k);
    int64_t        b, nb = k / 256;
    float          acc = 0.0f;
    int            i, j, sc, m;

    for (b = 0; b < nb; b++) {
        const int8_t  *x = qs + 256 * b;
        const int32_t *bs = b16 + 16 * b;
        int            isum = 0, msum = 0;

        if (type == LLM_Q4_K || type == LLM_Q5_K) {
            const uint8_t *blk = w + (type == LLM_Q4_K ? 144 : 176) * b;
            const uint8_t *q = blk + (type == LLM_Q4_K ? 16 : 48);
            const uint8_t *qh = blk + 16;

            for (j = 0; j < 8; j++) {
                int sub = 0;
                k4_scale_min(blk + 4, j, &sc, &m);
                for (i = 0; i < 32; i++) {
                    int v = j & 1 ? q[32 * (j / 2) + i] >> 4
                                  : q[32 * (j / 2) + i] & 0x0f;
                    if (type == LLM_Q5_K) {
                        v |= ((qh[i] >> j) & 1) << 4;
                    }
                    sub += v * x[32 * j + i];
                }
                isum += sc * sub;
                msum += m * (bs[2 * j] + bs[2 * j + 1]);
            }
            acc = fmaf((float) isum, hf(blk) * dx[b], acc);
            acc = fmaf(-(float) msum, hf(blk + 2) * dx[b], acc);
        } else {                                        /* Q6_K */
            const uint8_t *blk = w + 210 * b;
            const int8_t  *scl = (const int8_t *) (blk + 192);
            int            e, sub[16];

            memset(sub, 0, sizeof(sub));
            for (e = 0; e < 256; e++) {
                int h = e / 128, r = e % 128, l = r % 32, g = r / 32;
                const uint8_t *ql = blk + 64 * h;
                const uint8_t *qh = blk + 128 + 32 * h;
                int lo = g & 1 ? ql[l + 32] : ql[l];
                int v = (g < 2 ? lo & 0x0f : lo >> 4)
                        | (((qh[l] >> (2 * g)) & 3) << 4);
                sub[e / 16] += v * x[e];
            }
            /* w = d sc (q - 32) */
            for (i = 0; i < 16; i++) {
                isum += scl[i] * (sub[i] - 32 * bs[i]);
            }
            acc = fmaf((float) isum, hf(blk + 208) * dx[b], acc);
        }
    }
    return acc;
}


static float
dot_plain(int type, const uint8_t *w, const float *x, int64_t k)
{
    float   sum = 0.0f;
    int64_t i;

    switch (type) {
    case LLM_F32: {
        const float *f = (const float *) w;
        for (i = 0; i < k; i++) {
            sum += f[i] * x[i];
        }
        break;
    }
    case LLM_F16:
        for (i = 0; i < k; i++) {
            sum += llm_f16_to_f32(rd16(w + 2 * i)) * x[i];
        }
        break;
    case LLM_BF16:
        for (i = 0; i < k; i++) {
            sum += llm_bf16_to_f32(rd16(w + 2 * i)) * x[i];
        }
        break;
    }
    return sum;
}


#define SCALAR_GEMM(name, expr)                                             \
static void                                                                 \
name(const llm_cpu_gemm *g, int64_t m0, int64_t m1)                         \
{                                                                           \
    int64_t j, r;                                                           \
                                                                            \
    for (j = m0; j < m1; j++) {                                             \
        const uint8_t *w = g->w + (size_t) j * g->w_nb;                     \
        float          b = g->bias ? g->bias[j] : 0.0f;                     \
        for (r = 0; r < g->n; r++) {                                        \
            const void *x = (const uint8_t *) g->x + (size_t) r * g->x_nb;  \
            float *o = (float *) ((uint8_t *) g->out                        \
                                  + (size_t) r * g->out_nb);                \
            o[j] = (expr) + b;                                              \
        }                                                                   \
    }                                                                       \
}

SCALAR_GEMM(gemm_f32_scalar, dot_plain(LLM_F32, w, x, g->k))
SCALAR_GEMM(gemm_f16_scalar, dot_plain(LLM_F16, w, x, g->k))
SCALAR_GEMM(gemm_bf16_scalar, dot_plain(LLM_BF16, w, x, g->k))
SCALAR_GEMM(gemm_q4_0_scalar, dot_xq32(LLM_Q4_0, w, x, g->k))
SCALAR_GEMM(gemm_q4_1_scalar, dot_xq32(LLM_Q4_1, w, x, g->k))
SCALAR_GEMM(gemm_q8_0_scalar, dot_xq32(LLM_Q8_0, w, x, g->k))
SCALAR_GEMM(gemm_q4_k_scalar, dot_xqk(LLM_Q4_K, w, x, g->k))
SCALAR_GEMM(gemm_q5_k_scalar, dot_xqk(LLM_Q5_K, w, x, g->k))
SCALAR_GEMM(gemm_q6_k_scalar, dot_xqk(LLM_Q6_K, w, x, g->k))


/* Scalar helpers of the other ops' tables (ops.c / attention.c use them
 * through the table). */

static void
f16_to_f32_scalar(const uint16_t *src, float *dst, int64_t n)
{
    int64_t i;

    for (i = 0; i < n; i++) {
        dst[i] = llm_f16_to_f32(src[i]);
    }
}


static void
f32_to_f16_scalar(const float *src, uint16_t *dst, int64_t n)
{
    int64_t i;

    for (i = 0; i < n; i++) {
        dst[i] = llm_f32_to_f16(src[i]);
    }
}


static float
vmax_scalar(const float *x, int64_t n)
{
    float   m = x[0];
    int64_t i;

    for (i = 1; i < n; i++) {
        m = x[i] > m ? x[i] : m;
    }
    return m;
}


static float
exp_sum_scalar(float *x, int64_t n, float max)
{
    float   sum = 0.0f;
    int64_t i;

    for (i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    return sum;
}


static void
silu_mul_scalar(float *out, const float *gate, const float *up, int64_t n)
{
    int64_t i;

    for (i = 0; i < n; i++) {
        float gv = gate[i];
        out[i] = gv / (1.0f + expf(-gv)) * up[i];
    }
}


static void
quant_q8_0_scalar(const float *x, void *dst, int64_t n)
{
    llm_quantize_row(LLM_Q8_0, x, dst, n);
}


static void
dequant_q8_0_scalar(const void *src, float *dst, int64_t n)
{
    llm_dequantize_row(LLM_Q8_0, src, dst, n);
}


/* Element i of KV rows of type (Q8_0 counted from a block start). */
static float
kv_elem(const void *p, int type, size_t i)
{
    if (type == LLM_Q8_0) {
        const uint8_t *b = (const uint8_t *) p + i / 32 * 34;
        uint16_t       d;

        memcpy(&d, b, 2);
        return llm_f16_to_f32(d) * (float) (int8_t) b[2 + i % 32];
    }
    return type == LLM_F16 ? llm_f16_to_f32(((const uint16_t *) p)[i])
                           : ((const float *) p)[i];
}


static void
attn_scores_scalar(const float *q, int g, int hd, const void *k,
                   int kv_type, size_t stride, int n, float scale,
                   float *s, int s_stride, const void *pf)
{
    int    i, h, e;

    for (i = 0; i < n; i++) {
        if (pf != NULL) {
            llm_cpu_prefetch((const uint8_t *) pf
                             + llm_kv_bytes(kv_type, i * stride),
                             llm_kv_bytes(kv_type, (size_t) hd));
        }
        for (h = 0; h < g; h++) {
            float dot = 0.0f;
            for (e = 0; e < hd; e++) {
                dot += q[h * hd + e] * kv_elem(k, kv_type, i * stride + e);
            }
            s[h * s_stride + i] = dot * scale;
        }
    }
}


static void
attn_accum_scalar(float *o, int g, int hd, const float *p, int p_stride,
                  const void *v, int kv_type, size_t stride, int n,
                  const void *pf)
{
    int    i, h, e;

    for (i = 0; i < n; i++) {
        if (pf != NULL) {
            llm_cpu_prefetch((const uint8_t *) pf
                             + llm_kv_bytes(kv_type, i * stride),
                             llm_kv_bytes(kv_type, (size_t) hd));
        }
        for (h = 0; h < g; h++) {
            float pv = p[h * p_stride + i];
            for (e = 0; e < hd; e++) {
                o[h * hd + e] += pv * kv_elem(v, kv_type, i * stride + e);
            }
        }
    }
}


void
llm_cpu_kernels_scalar(llm_cpu_kernels *k)
{
    memset(k, 0, sizeof(*k));
    k->isa = LLM_ISA_SCALAR;
    k->quant_x = quant_x_scalar;

    k->gemm[LLM_F32] = gemm_f32_scalar;
    k->gemm[LLM_F16] = gemm_f16_scalar;
    k->gemm[LLM_BF16] = gemm_bf16_scalar;
    k->gemm[LLM_Q4_0] = gemm_q4_0_scalar;
    k->gemm[LLM_Q4_1] = gemm_q4_1_scalar;
    k->gemm[LLM_Q8_0] = gemm_q8_0_scalar;
    k->gemm[LLM_Q4_K] = gemm_q4_k_scalar;
    k->gemm[LLM_Q5_K] = gemm_q5_k_scalar;
    k->gemm[LLM_Q6_K] = gemm_q6_k_scalar;
    k->xq_kind[LLM_Q4_0] = LLM_XQ32;
    k->xq_kind[LLM_Q4_1] = LLM_XQ32;
    k->xq_kind[LLM_Q8_0] = LLM_XQ32;
    k->xq_kind[LLM_Q4_K] = LLM_XQ32K;
    k->xq_kind[LLM_Q5_K] = LLM_XQ32K;
    k->xq_kind[LLM_Q6_K] = LLM_XQ32K;

    k->f16_to_f32 = f16_to_f32_scalar;
    k->f32_to_f16 = f32_to_f16_scalar;
    k->quant_q8_0 = quant_q8_0_scalar;
    k->dequant_q8_0 = dequant_q8_0_scalar;
    k->vmax = vmax_scalar;
    k->exp_sum = exp_sum_scalar;
    k->silu_mul = silu_mul_scalar;
    k->attn_scores = attn_scores_scalar;
    k->attn_accum = attn_accum_scalar;
}


/* ------------------------------------------------------------ driver */

/*
 * One job: the products of one x with up to MM_MAX_PARTS weights (q, k
 * and v; gate and up), x prepared once.  The threads split the parts'
 * output features as one range of units of `align` features; a unit never
 * straddles two parts, so each part is computed exactly as it would be
 * alone (same chunk boundaries within it, same sums).
 */
#define MM_MAX_PARTS  4

typedef struct mm_part {
    llm_cpu_gemm        g;
    llm_cpu_gemm_fn     fn;
    int64_t             m;
    int64_t             unit0;      /* first unit of this part */
    int                 use_blas;
} mm_part;

typedef struct mm_job {
    llm_cpu_ctx        *c;
    mm_part             part[MM_MAX_PARTS];
    int                 n_parts;
    int64_t             units;      /* of all parts */
    int64_t             align;

    /* activation quantization (when parallel) */
    const float        *x;
    size_t              x_nb;
    void               *xq;
    size_t              xq_nb;
    int64_t             n, k;
    int                 kind;
    void               *xg;         /* LLM_XG_* table, or NULL */
} mm_job;


/* Quantizes activation row r, and copies its scales into the table by
 * groups of 16 where there is one (rows past the last whole group have
 * no entry). */
static void
mm_quant_row(const mm_job *j, int64_t r)
{
    uint8_t *row = (uint8_t *) j->xq + (size_t) r * j->xq_nb;
    int64_t  nb = j->k / 32, g = r / 16, b;
    int      l = (int) (r % 16);

    j->c->kern.quant_x((const float *) ((const uint8_t *) j->x
                                        + (size_t) r * j->x_nb),
                       row, j->k, j->kind);
    if (j->xg == NULL || g >= j->n / 16) {
        return;
    }
    for (b = 0; b < nb; b++) {
        LLM_XG_D(j->xg, nb, g, b)[l] = LLM_XQ_D(row, j->k)[b];
        LLM_XG_S1(j->xg, nb, g, b)[l] = LLM_XQ_S1(row, j->k)[b];
        LLM_XG_ISUM(j->xg, nb, g, b)[l] = LLM_XQ_ISUM(row, j->k)[b];
    }
}


static void
mm_quant_task(void *arg, int ith, int nth)
{
    mm_job  *j = arg;
    int64_t  r0, r1, r;

    llm_cpu_split(j->n, ith, nth, 1, &r0, &r1);
    for (r = r0; r < r1; r++) {
        mm_quant_row(j, r);
    }
}


/* Chunks of output features: a few per thread for single rows (long
 * streams of W), many for batches (compute bound: a thread the OS has
 * preempted then holds back little work; threadpool.c). */
static int
mm_chunks(llm_cpu_ctx *c, const mm_job *j)
{
    int64_t n = (j->n >= 3 ? 16 : 3) * (int64_t) c->n_threads;

    return (int) (j->units < n ? j->units : n);
}


/* Features [m0, m1) of one part. */
static void
mm_part_run(const mm_part *p, int64_t m0, int64_t m1)
{
    if (p->use_blas) {
        const llm_cpu_gemm *g = &p->g;
        int64_t             r, col;

        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans,
                    (int) g->n, (int) (m1 - m0), (int) g->k, 1.0f,
                    g->x, (int) (g->x_nb / 4),
                    (const float *) (g->w + (size_t) m0 * g->w_nb),
                    (int) (g->w_nb / 4), 0.0f, g->out + m0,
                    (int) (g->out_nb / 4));
        if (g->bias != NULL) {
            for (r = 0; r < g->n; r++) {
                float *o = (float *) ((uint8_t *) g->out
                                      + (size_t) r * g->out_nb);
                for (col = m0; col < m1; col++) {
                    o[col] += g->bias[col];
                }
            }
        }
        return;
    }
    p->fn(&p->g, m0, m1);
}


static void
mm_task(void *arg, int ith, int nth)
{
    mm_job  *j = arg;
    int64_t  u0, u1;
    int      i;

    llm_cpu_split(j->units, ith, nth, 1, &u0, &u1);
    for (i = 0; i < j->n_parts && u0 < u1; i++) {
        const mm_part *p = &j->part[i];
        int64_t        pu = (p->m + j->align - 1) / j->align;
        int64_t        a = u0 > p->unit0 ? u0 : p->unit0;
        int64_t        b = u1 < p->unit0 + pu ? u1 : p->unit0 + pu;

        if (a < b) {
            int64_t m1 = (b - p->unit0) * j->align;

            mm_part_run(p, (a - p->unit0) * j->align, m1 < p->m ? m1 : p->m);
        }
    }
}


static int
check_f32(llm_cpu_ctx *c, const llm_tensor *t, const char *op,
          const char *what)
{
    if (t == NULL || t->data == NULL) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: %s: %s is NULL", op, what);
    }
    if (t->type != LLM_F32) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: %s: %s must be F32, not %d",
                            op, what, t->type);
    }
    if (t->ne[0] < 0 || t->ne[1] < 0
        || (t->ne[1] > 1 && t->nb < (size_t) t->ne[0] * 4))
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: %s: %s has a bad shape",
                            op, what);
    }
    return 0;
}


/* The checks of one product out = x w^T (+ bias). */
static int
mm_check(llm_cpu_ctx *c, const llm_tensor *out, const llm_tensor *x,
         const llm_tensor *w, const llm_tensor *bias)
{
    int64_t k, m, n;
    int     rc;

    if ((rc = check_f32(c, x, "matmul", "x")) != 0
        || (rc = check_f32(c, out, "matmul", "out")) != 0)
    {
        return rc;
    }
    if (w == NULL || w->data == NULL) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: matmul: w is NULL");
    }
    k = x->ne[0];
    n = x->ne[1];
    m = w->ne[1];
    if (w->ne[0] != k || out->ne[0] != m || out->ne[1] != n) {
        return llm_cpu_fail(c, LLM_EINVAL,
                            "cpu: matmul: shapes x [%lld, %lld] w [%lld, %lld]"
                            " out [%lld, %lld] do not match",
                            (long long) n, (long long) k,
                            (long long) w->ne[1], (long long) w->ne[0],
                            (long long) out->ne[1], (long long) out->ne[0]);
    }
    if (w->type < 0 || w->type >= LLM_DTYPE_COUNT
        || c->kern.gemm[w->type] == NULL)
    {
        return llm_cpu_fail(c, LLM_EUNSUP,
                            "cpu: matmul: weight type %d not supported",
                            w->type);
    }
    if (!llm_cpu_layout_ok(w)
        || (w->layout == LLM_LAYOUT_ROWS16 && !c->kern.rows16))
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: matmul: weight layout %d"
                            " not readable by these kernels", w->layout);
    }
    if (llm_row_bytes(w->type, k) == 0 || w->nb < llm_row_bytes(w->type, k)) {
        return llm_cpu_fail(c, LLM_EINVAL,
                            "cpu: matmul: weight rows of %lld elements do not"
                            " fit type %s", (long long) k,
                            llm_dtype_get(w->type)->name);
    }
    if (bias != NULL && bias->data != NULL
        && (bias->type != LLM_F32 || bias->ne[0] != m))
    {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: matmul: bias must be [%lld]"
                            " F32", (long long) m);
    }
    return 0;
}


/* How x is prepared for w at n rows: LLM_XQ* (LLM_XQ_NONE: as it is);
 * *batched: in the batch layout. */
static int
mm_kind(const llm_cpu_ctx *c, const llm_tensor *w, int64_t n, int *batched)
{
    *batched = 0;
    if (w->layout == LLM_LAYOUT_ROWS16) {
        /* only the batch kernels read it, at any number of rows */
        *batched = 1;
        return c->kern.xq_kind_batch[w->type];
    }
    if (c->kern.batch_rows > 0 && n >= c->kern.batch_rows
        && c->kern.xq_kind_batch[w->type] != LLM_XQ_NONE
        && w->nb <= (size_t) 1 << 26)
    {
        *batched = 1;
        return c->kern.xq_kind_batch[w->type];
    }
    return c->kern.xq_kind[w->type];
}


/* out[i] = x ws[i]^T (+ biases[i]); the parts share kind and batched. */
static int
mm_run(llm_cpu_ctx *c, llm_tensor *const *outs, const llm_tensor *x,
       const llm_tensor *const *ws, const llm_tensor *const *biases,
       int n_parts, int kind, int batched)
{
    mm_job   j;
    int64_t  r;
    int      i;

    memset(&j, 0, sizeof(j));
    j.c = c;
    j.n = x->ne[1];
    j.k = x->ne[0];
    j.align = 16;
    j.n_parts = n_parts;
    for (i = 0; i < n_parts; i++) {
        mm_part           *p = &j.part[i];
        const llm_tensor  *w = ws[i], *bias = biases ? biases[i] : NULL;

        p->m = w->ne[1];
        p->fn = c->kern.gemm[w->type];
        p->g.k = j.k;
        p->g.n = j.n;
        p->g.w = w->data;
        p->g.w_nb = w->nb;
        p->g.x = x->data;
        p->g.x_nb = x->nb;
        p->g.out = outs[i]->data;
        p->g.out_nb = outs[i]->nb;
        p->g.bias = bias != NULL ? bias->data : NULL;
        p->g.amx = c->isa >= LLM_ISA_AMX;
        p->g.w_rows16 = w->layout == LLM_LAYOUT_ROWS16;
        p->g.batched = batched;
        p->use_blas = kind == LLM_XQ_NONE && w->type == LLM_F32 && c->blas
                      && j.n >= BLAS_MIN_ROWS && j.k >= BLAS_MIN_K
                      && j.k < (1 << 30) && p->m < (1 << 30)
                      && j.n < (1 << 30);
        p->unit0 = j.units;
        j.units += (p->m + j.align - 1) / j.align;
    }
    if (j.units == 0 || j.n == 0) {
        return 0;
    }

    if (kind != LLM_XQ_NONE) {
        /* quantize the activations once into the scratch buffer (and
         * their scales by groups of 16 after them, where wanted) */
        size_t xg_bytes = 0;

        if (batched && kind == LLM_XQ32 && c->kern.xg_rows > 0
            && j.n >= c->kern.xg_rows && j.n >= 16)
        {
            xg_bytes = (size_t) (j.n / 16) * (size_t) (j.k / 32)
                       * LLM_XG_BLOCK;
        }
        j.xq_nb = llm_xq_row_bytes(kind, j.k);
        j.xq = llm_cpu_scratch(c, j.xq_nb * (size_t) j.n + xg_bytes);
        if (j.xq == NULL) {
            return LLM_ENOMEM;
        }
        j.xg = xg_bytes > 0 ? (uint8_t *) j.xq + j.xq_nb * (size_t) j.n
                            : NULL;
        j.x = x->data;
        j.x_nb = x->nb;
        j.kind = kind;
        if (j.n * j.k <= QUANT_SERIAL_MAX || c->n_threads == 1) {
            for (r = 0; r < j.n; r++) {
                mm_quant_row(&j, r);
            }
        } else {
            llm_cpu_pool_run(c->pool, mm_quant_task, &j, c->n_threads);
        }
        for (i = 0; i < n_parts; i++) {
            j.part[i].g.x = j.xq;
            j.part[i].g.x_nb = j.xq_nb;
            j.part[i].g.xg = j.xg;
        }
    }
    llm_cpu_pool_run(c->pool, mm_task, &j, mm_chunks(c, &j));
    return 0;
}


int
llm_cpu_matmul(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *x,
               const llm_tensor *w, const llm_tensor *bias)
{
    int rc, kind, batched;

    if ((rc = mm_check(c, out, x, w, bias)) != 0) {
        return rc;
    }
    kind = mm_kind(c, w, x->ne[1], &batched);
    return mm_run(c, &out, x, &w, &bias, 1, kind, batched);
}


int
llm_cpu_matmul_n(llm_cpu_ctx *c, llm_tensor *const *outs,
                 const llm_tensor *x, const llm_tensor *const *ws,
                 const llm_tensor *const *biases, int n)
{
    int i, rc, kind = 0, batched = 0, k, b;

    if (n < 1 || n > MM_MAX_PARTS || outs == NULL || ws == NULL) {
        return llm_cpu_fail(c, LLM_EINVAL, "cpu: matmul_n: %d products "
                            "(1 to %d)", n, MM_MAX_PARTS);
    }
    for (i = 0; i < n; i++) {
        if ((rc = mm_check(c, outs[i], x, ws[i], biases ? biases[i] : NULL))
            != 0)
        {
            return rc;
        }
        k = mm_kind(c, ws[i], x->ne[1], &b);
        if (i == 0) {
            kind = k;
            batched = b;
        } else if (k != kind || b != batched) {
            kind = -1;                  /* x prepared differently */
        }
    }
    if (kind < 0) {
        for (i = 0; i < n; i++) {
            rc = llm_cpu_matmul(c, outs[i], x, ws[i],
                                biases ? biases[i] : NULL);
            if (rc != 0) {
                return rc;
            }
        }
        return 0;
    }
    return mm_run(c, outs, x, ws, biases, n, kind, batched);
}
