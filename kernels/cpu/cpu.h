/*
 * Private header of the CPU backend: the backend context, the thread pool,
 * instruction-set dispatch and the table of kernels each instruction set
 * provides (scalar in matmul.c/ops.c/attention.c, AVX2 in *_avx2.c,
 * AVX-512 in *_avx512.c).
 */
#ifndef LLM_CPU_H
#define LLM_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "../backend.h"
#include "../../engine/common.h"


/* ---------------------------------------------------------------- pool */

typedef struct llm_cpu_pool llm_cpu_pool;

/* A task is split in n chunks; fn runs once for each chunk c in [0, n),
 * on whichever thread claims it (never two chunks of a task at once on
 * one thread, so per-chunk scratch indexed by c is private). */
typedef void (*llm_cpu_task)(void *arg, int c, int n);

llm_cpu_pool *llm_cpu_pool_new(int n_threads, llm_err *err);
void          llm_cpu_pool_free(llm_cpu_pool *p);
int           llm_cpu_pool_size(const llm_cpu_pool *p);

/* Runs the n_chunks chunks of fn over the pool (the caller takes part)
 * and returns when all are done. */
void llm_cpu_pool_run(llm_cpu_pool *p, llm_cpu_task fn, void *arg,
                      int n_chunks);

/* [*begin, *end) of n items for thread ith of nth, boundaries rounded to
 * multiples of align. */
void llm_cpu_split(int64_t n, int ith, int nth, int64_t align,
                   int64_t *begin, int64_t *end);


/* ---------------------------------------------------------- ISA dispatch */

enum {
    LLM_ISA_SCALAR = 0,
    LLM_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C */
    LLM_ISA_AVX512 = 2,     /* F, BW, VL, DQ, VNNI, BF16 */
    LLM_ISA_AMX = 3         /* AVX-512 and AMX-INT8 tiles (the OS lets
                               this process use them) */
};

/* The best instruction set of this CPU, lowered by the environment
 * variable LLM_CPU_ISA=scalar|avx2|avx512 (never raised above what the
 * CPU has). */
int         llm_cpu_isa_detect(void);
const char *llm_cpu_isa_name(int isa);


/* ------------------------------------------------ quantized activations */

/*
 * Activation rows quantized once per matmul, as llama.cpp does (the same
 * quants and scales as its Q8_0, Q8_1 and Q8_K blocks), in an internal
 * layout (not GGUF's) made for the integer dot products.  One row of k
 * elements:
 *
 *   XQ32 (for Q4_0, Q4_1, Q8_0 weights; blocks of 32, Q8_0/Q8_1's
 *   quantization: q = round(x * 127 / max|x|), scale max|x| / 127 stored
 *   as f16):
 *     int8   qs[k]           64-byte aligned
 *     float  d[nb]           block scales (f16 values), nb = k / 32
 *     float  s1[nb]          Q8_1's s: f16(max|x| / 127 * sum(qs))
 *     int32  isum[nb]        sum(qs) of each block
 *   XQ32P: as XQ32 but each pair of blocks (b0, b1) is stored in the
 *     order the 4-bit weights unpack to with 512-bit registers:
 *     b0[0..15] b1[0..15] b0[16..31] b1[16..31].  A last odd block stays
 *     as in XQ32.
 *   XQ32K (for K-quant weights; Q8_K's quantization of each 256: x_max
 *   the element of largest magnitude, q = min(127, round(-127 / x_max *
 *   x)), d = -x_max / 127 in f32):
 *     int8   qs[k]
 *     float  d[k / 256]
 *     int32  bsum16[k / 16]  sums of each 16 quants
 *   XQK (the same quants, for the AVX2 kernels):
 *     int8   qs[k]
 *     float  d[k / 256]
 *     float  ds16[k / 16]    d * sum of each 16 quants
 *     float  ds32[k / 32]    d * sum of each 32 quants
 *
 * Rounding is to nearest even, |q| <= 127.
 */
enum { LLM_XQ_NONE = 0, LLM_XQ32 = 1, LLM_XQ32P = 2, LLM_XQ32K = 3,
       LLM_XQK = 4 };

size_t llm_xq_row_bytes(int kind, int64_t k);   /* multiple of 64 */

#define LLM_XQ_QS(row)          ((int8_t *) (row))
#define LLM_XQ_D(row, k)        ((float *) ((uint8_t *) (row) + (k)))
#define LLM_XQ_S1(row, k)       (LLM_XQ_D(row, k) + (k) / 32)
#define LLM_XQ_ISUM(row, k)     ((int32_t *) (LLM_XQ_D(row, k) + 2 * ((k) / 32)))
#define LLM_XQ_BSUM16(row, k)   ((int32_t *) (LLM_XQ_D(row, k) + (k) / 256))
#define LLM_XQ_DS16(row, k)     (LLM_XQ_D(row, k) + (k) / 256)
#define LLM_XQ_DS32(row, k)     (LLM_XQ_DS16(row, k) + (k) / 16)

/*
 * The scales of XQ32 rows again, by groups of 16 rows (the AMX kernel's
 * tile of activation rows), so that a block's step for the 16 rows reads
 * one cache line of each instead of 16 rows' arrays.  For group G (rows
 * 16G .. 16G+15) and block b, at xg + (G * nb + b) * LLM_XG_BLOCK:
 *
 *     float  d[16]     LLM_XQ_D of each row
 *     float  s1[16]    LLM_XQ_S1
 *     int32  isum[16]  LLM_XQ_ISUM
 *
 * Only whole groups; matmul.c builds it with the quantization where
 * llm_cpu_kernels.xg_rows asks for it.
 */
#define LLM_XG_BLOCK            192
#define LLM_XG_D(xg, nb, g, b)  ((float *) ((uint8_t *) (xg) \
                                  + ((size_t) (g) * (nb) + (b)) * LLM_XG_BLOCK))
#define LLM_XG_S1(xg, nb, g, b) (LLM_XG_D(xg, nb, g, b) + 16)
#define LLM_XG_ISUM(xg, nb, g, b) \
                                ((int32_t *) (LLM_XG_D(xg, nb, g, b) + 32))

/*
 * The canonical result of quantized weights, which every kernel of a
 * given instruction set computes for any batch (so that a sequence's
 * logits do not depend on its batch), and which is llama.cpp's arithmetic
 * (AVX-512 VNNI kernels), starting from 0 and adding the bias last:
 *
 *   Q4_0, Q8_0:  per block  acc = fma(I, d_w * d_x, acc)
 *                with I the exact integer sum of (w_q - offset) * x_q
 *   Q4_1:        per block  acc = fma(I, d_w * d_x, acc);
 *                           acc = fma(m_w, s1_x, acc)
 *   Q4_K, Q5_K:  per 256    acc = fma(sum_s sc_s I_s, d_w * d_x, acc);
 *                           acc = fnmadd(sum_s m_s bsum32_s, dmin * d_x, acc)
 *   Q6_K:        per 256    acc = fma(sum_g sc_g (I_g - 32 bsum16_g),
 *                                     d_w * d_x, acc)
 */

/* f32 through f16 and back (round to nearest even), as the activation
 * scales of XQ32. */
float llm_cpu_f16_round(float f);


/* ------------------------------------------------------------- kernels */

/* One matrix product tile: out[0..n, m0..m1) = x W^T (+ bias).  x is f32
 * for F32/F16/BF16 weights and quantized (XQ32/XQK) rows otherwise. */
typedef struct llm_cpu_gemm {
    int64_t         k;          /* inner dimension */
    int64_t         n;          /* activation rows */
    const uint8_t  *w;          /* [m, k] weights, w_nb bytes per row */
    size_t          w_nb;
    const void     *x;          /* [n, k] activations, x_nb bytes per row */
    size_t          x_nb;
    float          *out;        /* [n, m], out_nb bytes per row */
    size_t          out_nb;
    const float    *bias;       /* [m] or NULL */
    int             batched;    /* x is in the table's batch layout */
    int             amx;        /* AMX tiles may compute the products */
    const void     *xg;         /* XQ32 scales by groups of 16 rows, or
                                   NULL (LLM_XG_*) */
    int             w_rows16;   /* w in LLM_LAYOUT_ROWS16 (rows16.c) */
} llm_cpu_gemm;

typedef void (*llm_cpu_gemm_fn)(const llm_cpu_gemm *g, int64_t m0,
                                int64_t m1);

/* Quantizes one activation row of k elements to layout kind (LLM_XQ*). */
typedef void (*llm_cpu_quant_fn)(const float *x, void *xq, int64_t k,
                                 int kind);

typedef struct llm_cpu_kernels {
    int                 isa;

    llm_cpu_quant_fn    quant_x;

    /* Matrix products by weight type (NULL where unsupported) and the
     * activation layout each one reads (LLM_XQ_NONE: f32 rows); from
     * batch_rows activation rows on (0: never), the layout
     * xq_kind_batch[type] where that is set, with gemm.batched = 1. */
    llm_cpu_gemm_fn     gemm[LLM_DTYPE_COUNT];
    int                 xq_kind[LLM_DTYPE_COUNT];
    int                 xq_kind_batch[LLM_DTYPE_COUNT];
    int                 batch_rows;

    /* From this many rows of the batch layout XQ32 on (0: never), the
     * products also get the scales by groups of 16 (llm_cpu_gemm.xg). */
    int                 xg_rows;

    /* The gemm of these kernels reads LLM_LAYOUT_ROWS16 weights (at any
     * number of rows, in the batch layout), so adopt_tensor makes them. */
    int                 rows16;

    /* Row conversions. */
    void  (*f16_to_f32)(const uint16_t *src, float *dst, int64_t n);
    void  (*f32_to_f16)(const float *src, uint16_t *dst, int64_t n);

    /* The largest of x[0..n) (n >= 1). */
    float (*vmax)(const float *x, int64_t n);

    /* x[i] = exp(x[i] - max); returns the sum. */
    float (*exp_sum)(float *x, int64_t n, float max);

    /* out = gate / (1 + exp(-gate)) * up. */
    void  (*silu_mul)(float *out, const float *gate, const float *up,
                      int64_t n);

    /* x[n] (n a multiple of 32) to Q8_0 blocks, the bytes of
     * llm_quantize_row(LLM_Q8_0) exactly: Q8_0 KV pages. */
    void  (*quant_q8_0)(const float *x, void *dst, int64_t n);
    /* and back: each value d * q, the floats the attention kernels read
     * from Q8_0 pages. */
    void  (*dequant_q8_0)(const void *src, float *dst, int64_t n);

    /*
     * Attention over n consecutive cached positions of one KV head for
     * the g query heads that share it.  kv points at the first position's
     * row (F16, F32, or Q8_0 at a block start: kv_type), stride elements
     * from one position to the next.
     *
     * scores: s[h * s_stride + i] = scale * dot(q[h], k[i]),
     *         q: [g, hd] f32.
     * accum:  o[h] += p[h * p_stride + i] * v[i] for every i,
     *         o: [g, hd] f32.
     *
     * pf: the first row (same head, same stride) of the rows the caller
     * reads next, or NULL; the kernel prefetches its first n rows along
     * the way (a hint: never dereferenced, it may point anywhere).
     */
    void  (*attn_scores)(const float *q, int g, int hd, const void *k,
                         int kv_type, size_t stride, int n, float scale,
                         float *s, int s_stride, const void *pf);
    void  (*attn_accum)(float *o, int g, int hd, const float *p,
                        int p_stride, const void *v, int kv_type,
                        size_t stride, int n, const void *pf);

    /*
     * Prefill tiles (NULL where the kernels have none): kt_build writes n
     * (<= 16) f32 rows of hd values, stride apart, transposed:
     * kt[d * 16 + p] = row p's value d, for d < hd rounded up to 16 and
     * p < 16 (zero past the rows and past hd; kt 64-byte aligned).
     * attn_scores_kt gives nt tokens' g query heads (q + k * q_tok + h *
     * hd) their scores against the first n (a multiple of 4) of those
     * positions, s[k * s_tok + h * s_stride + i], the same bits as
     * attn_scores gives each token alone over those positions.
     */
    void  (*kt_build)(const float *rows, size_t stride, int n, int hd,
                      float *kt);
    void  (*attn_scores_kt)(const float *kt, int hd, const float *q, int g,
                            size_t q_tok, int nt, float scale, float *s,
                            int s_stride, size_t s_tok, int n);
} llm_cpu_kernels;

/* Prefetches the cache lines of [p, p + bytes) (a hint; p may be any
 * address). */
static inline void
llm_cpu_prefetch(const void *p, size_t bytes)
{
    const char *a = (const char *) ((uintptr_t) p & ~(uintptr_t) 63);
    const char *end = (const char *) p + bytes;

    for (; a < end; a += 64) {
        __builtin_prefetch(a, 0, 3);
    }
}


/* Fill a table: every ISA starts from the scalar table and overrides what
 * it accelerates. */
void llm_cpu_kernels_scalar(llm_cpu_kernels *k);
void llm_cpu_kernels_avx2(llm_cpu_kernels *k);      /* matmul_avx2.c */
void llm_cpu_kernels_avx512(llm_cpu_kernels *k);    /* matmul_avx512.c */
void llm_cpu_vec_avx2(llm_cpu_kernels *k);          /* vec_avx2.c */
void llm_cpu_vec_avx512(llm_cpu_kernels *k);        /* vec_avx512.c */


/* ------------------------------------------------------------- context */

typedef struct llm_cpu_ctx {
    llm_cpu_pool           *pool;
    int                     n_threads;
    int                     isa;
    llm_cpu_kernels         kern;

    char                    errmsg[LLM_ERR_MAX];

    llm_batch               batch;          /* arrays owned by the engine */
    int                     have_batch;
    uint64_t                step;           /* set_batch() count */

    /* Scratch for quantized activations and attention partials; grown
     * on demand, freed with the backend. */
    void                   *scratch;
    size_t                  scratch_size;
    void                   *attn_scratch;
    size_t                  attn_scratch_size;

    /* RoPE cos/sin of the current batch: [n_tokens, n_rot / 2] pairs,
     * valid for (rope_step, the params below). */
    float                  *rope_cs;
    size_t                  rope_cs_cap;
    uint64_t                rope_step;
    int                     rope_n_rot;
    float                   rope_base;
    float                   rope_scale;
    const float            *rope_factors;

    int                     blas;           /* use OpenBLAS for F32 */

    /* Weights adopt_tensor rearranged (ROWS16), freed with the backend. */
    void                  **adopted;
    int                     n_adopted;
} llm_cpu_ctx;

/* Sets the backend's error message and returns code. */
int llm_cpu_fail(llm_cpu_ctx *c, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Grows c->scratch to at least n bytes (64-byte aligned); NULL on ENOMEM
 * (with the error set). */
void *llm_cpu_scratch(llm_cpu_ctx *c, size_t n);

/* The ROWS16 weight layout (rows16.c): whether a type has one; src's
 * rows (plain, contiguous) rearranged into dst; the plain bytes of row r
 * of a ROWS16 tensor of `rows` rows. */
int  llm_cpu_rows16_type(int type);
/* The plain bytes of row r of t (t->nb of them): in place, or for a
 * ROWS16 tensor put together in buf. */
const uint8_t *llm_cpu_tensor_row(const llm_tensor *t, int64_t r,
                                  uint8_t *buf);
/* Whether t's layout is plain rows, or a well-formed ROWS16 (rows16_row
 * reads it; the matmul kernels only where kern.rows16). */
int  llm_cpu_layout_ok(const llm_tensor *t);
void llm_cpu_rows16_pack(int type, const uint8_t *src, int64_t rows,
                         int64_t k, uint8_t *dst);
void llm_cpu_rows16_row(int type, const uint8_t *w, int64_t rows, int64_t r,
                        int64_t k, uint8_t *row);

/* 64-byte aligned host memory through llm_malloc. */
void *llm_cpu_aligned_alloc(size_t n);
void  llm_cpu_aligned_free(void *p);

/* Ops (matmul.c, ops.c, attention.c). */
int llm_cpu_matmul(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *x,
                   const llm_tensor *w, const llm_tensor *bias);
int llm_cpu_matmul_n(llm_cpu_ctx *c, llm_tensor *const *outs,
                     const llm_tensor *x, const llm_tensor *const *ws,
                     const llm_tensor *const *biases, int n);
int llm_cpu_embed(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *table);
int llm_cpu_rmsnorm(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *x,
                    const llm_tensor *w, float eps);
int llm_cpu_rope(llm_cpu_ctx *c, llm_tensor *x, int n_heads, int head_dim,
                 const llm_rope_params *rp);
int llm_cpu_kv_store(llm_cpu_ctx *c, const llm_kv_pool *kv, int layer,
                     const llm_tensor *k, const llm_tensor *v);
int llm_cpu_attention(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *q,
                      const llm_kv_pool *kv, int layer, int n_heads,
                      float scale);
int llm_cpu_silu_mul(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *gate,
                     const llm_tensor *up);
/* The segmented multi-LoRA op (lora.c). */
int llm_cpu_lora(llm_cpu_ctx *c, llm_tensor *const *outs, int n_outs,
                 const llm_tensor *x, const llm_lora_seg *segs, int n_segs);
int llm_cpu_add(llm_cpu_ctx *c, llm_tensor *out, const llm_tensor *a,
                const llm_tensor *b);
int llm_cpu_gather_out_rows(llm_cpu_ctx *c, llm_tensor *out,
                            const llm_tensor *x);
int llm_cpu_kv_copy_blocks(llm_cpu_ctx *c, const llm_kv_pool *kv,
                           const int32_t *src, const int32_t *dst, int n);
int llm_cpu_kv_block_host(llm_cpu_ctx *c, const llm_kv_pool *kv,
                          int32_t block, void *host, int to_host);

/* Checks the batch's tokens against the pool: sequence ids, positions and
 * the block table entries they reach.  0 or LLM_EINVAL with the error. */
int llm_cpu_check_kv(llm_cpu_ctx *c, const llm_kv_pool *kv, int layer,
                     const char *op);

#endif /* LLM_CPU_H */
