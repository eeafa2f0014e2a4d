/*
 * Private header of the CUDA backend (C++; included by the .cu files
 * only): the backend context, the error macro, the host-side helpers of
 * cuda_backend.cu, and every kernel launcher with the shapes it expects.
 *
 * Layering, as in the CPU backend:
 *   cuda_backend.cu   the ops table, memory, stream, cuBLAS handle, batch
 *                     upload, weight conversion, error strings
 *   <op>.cu           llm_cuda_<op>(): checks the arguments on the host
 *                     (shapes, types, token ids, block ids), then calls
 *                     launch_<op>(), which checks what the kernel needs
 *                     (head sizes, alignment), launches on the stream and
 *                     returns cudaGetLastError().
 *
 * No CUDA error ends the process: launchers return cudaError_t
 * (CUDA_TRY passes a failure up), ops turn it into LLM_EBACKEND with the
 * CUDA error string in the backend's message.
 */
#ifndef LLM_CUDA_INTERNAL_CUH
#define LLM_CUDA_INTERNAL_CUH

#include <stddef.h>
#include <stdint.h>

#ifndef LLM_CUDA_EMU                    /* t/cuda_emu/emu.h stands in */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "../backend.h"
#include "../../engine/common.h"
#include "cuda.h"
#include "device.cuh"


/* Returns a failed CUDA call's error to the caller. */
#define CUDA_TRY(call)                                                      \
    do {                                                                    \
        cudaError_t e_ = (call);                                            \
        if (e_ != cudaSuccess) {                                            \
            return e_;                                                      \
        }                                                                   \
    } while (0)

/* Checks a condition of a launcher's arguments. */
#define CUDA_CHECK_ARG(cond)                                                \
    do {                                                                    \
        if (!(cond)) {                                                      \
            return cudaErrorInvalidValue;                                   \
        }                                                                   \
    } while (0)

#define LLM_CUDA_WARP  32


/* ------------------------------------------------------------ context */

/* A device buffer that grows on demand (scratch, batch arrays). */
typedef struct llm_cuda_buf {
    void       *p;
    size_t      size;
} llm_cuda_buf;

/* Pinned host memory for the small uploads of each step; the event says
 * when the last copy out of it has run, so it is not overwritten early. */
typedef struct llm_cuda_stage {
    void       *host;
    size_t      size;
    cudaEvent_t done;
    int         pending;
} llm_cuda_stage;

/*
 * A weight buffer the backend knows of: adopted (the backend owns it) or
 * a quantized tensor seen by matmul/embed, with its dense copy.  Device
 * kernels read only F32/F16/BF16: a block-quantized weight is expanded
 * once on the host (llm_dequantize_row, the reference code) to F16 (BF16
 * if a value does not fit F16) and kept here, keyed by the address the
 * engine holds.
 */
typedef struct llm_cuda_weight {
    void       *key;        /* device address of the original bytes */
    size_t      bytes;      /* size of that buffer (0: unknown) */
    int         owned;      /* adopted: freed with the backend */
    int         src_type;   /* the converted tensor's type, -1 if none */
    int64_t     cols, rows;
    size_t      src_nb;
    void       *conv;       /* [rows, cols] of conv_type, or NULL */
    int         conv_type;
} llm_cuda_weight;

/* The attention work of one step for one GQA group size: which tokens go
 * to the split-K kernel and which query tiles to the tiled kernel. */
typedef struct llm_cuda_attn_plan {
    uint64_t    step;           /* valid for (step, g, mode, nkv) */
    int         g, mode, nkv;
    int         n_dec;          /* tokens for the split-K kernel */
    int         n_split;        /* ranges per token (1: no merge) */
    int         split_len;      /* positions per range */
    int         n_tiles;        /* query tiles for the tiled kernel */
    int32_t    *d_dec;          /* [n_dec] token indices (device) */
    int4       *d_tiles;        /* [n_tiles] (device) */
    llm_cuda_buf dev;           /* holds d_dec and d_tiles */
    llm_cuda_stage stage;
    int32_t    *host;           /* host copy being built */
    size_t      host_cap;       /* in int32 */
} llm_cuda_attn_plan;

typedef struct llm_cuda_ctx {
    int             device;
    int             n_sm;
    int             cc_major, cc_minor;
    size_t          smem_optin;         /* max dynamic shared per block */
    char            name[256];
    cudaStream_t    stream;
    cublasHandle_t  blas;

    char            errmsg[LLM_ERR_MAX];

    /* the current batch: host arrays owned by the engine, and their
     * device copies in one buffer */
    llm_batch       batch;
    int             have_batch;
    uint64_t        step;
    llm_cuda_buf    d_batch;
    llm_cuda_stage  batch_stage;
    const int32_t  *d_tokens;           /* [n_tokens] */
    const int32_t  *d_pos;              /* [n_tokens] */
    const int32_t  *d_tok_seq;          /* [n_tokens] */
    const int32_t  *d_block_table;      /* [n_seqs, max_blocks] or NULL */
    const int32_t  *d_out_rows;         /* [n_out] or NULL */

    /* KV checks already done for this step (llm_cuda_check_kv) */
    uint64_t        kv_ok_step;
    int             kv_ok_block_size;
    int             kv_ok_n_blocks;

    llm_cuda_attn_plan plan;
    int             attn_mode;          /* LLM_CUDA_ATTN_* */

    llm_cuda_buf    mm_scratch;         /* 16-bit activations (matmul) */
    llm_cuda_buf    lora_scratch;       /* LoRA shrink results */
    llm_cuda_buf    attn_scratch;       /* split-K partials */
    llm_cuda_buf    misc_scratch;       /* gather with overlap */
    llm_cuda_buf    copy_ids;           /* kv_copy_blocks block ids */
    llm_cuda_stage  misc_stage;         /* their upload */

    llm_cuda_weight *weights;
    int             n_weights;
    int             cap_weights;
    int             weight_hint;        /* index of the last lookup */
} llm_cuda_ctx;


/* ------------------------------------------ helpers (cuda_backend.cu) */

/* Sets the message and returns code. */
int llm_cuda_fail(llm_cuda_ctx *c, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* 0 if e is cudaSuccess, else LLM_EBACKEND (LLM_EUNSUP for
 * cudaErrorNotSupported) with "cuda: op: what: <CUDA's message>". */
int llm_cuda_check(llm_cuda_ctx *c, cudaError_t e, const char *op,
                   const char *what);

/* Grows b to at least n bytes (the old contents are lost); NULL with
 * the error set on failure.  Synchronizes the stream before freeing. */
void *llm_cuda_buf_get(llm_cuda_ctx *c, llm_cuda_buf *b, size_t n,
                       const char *op);
void  llm_cuda_buf_free(llm_cuda_buf *b);

/* Copies n host bytes to the device buffer *dst (grown as needed) through
 * the pinned stage, asynchronously on the stream. */
int llm_cuda_stage_upload(llm_cuda_ctx *c, llm_cuda_stage *s,
                          llm_cuda_buf *dst, const void *src, size_t n,
                          const char *op);
void llm_cuda_stage_free(llm_cuda_stage *s);

/* Argument checks shared by the ops (same rules as the CPU backend). */
int llm_cuda_check_f32(llm_cuda_ctx *c, const llm_tensor *t, const char *op,
                       const char *what, int64_t cols, int64_t rows);
int llm_cuda_need_batch(llm_cuda_ctx *c, const char *op);
int llm_cuda_check_kv(llm_cuda_ctx *c, const llm_kv_pool *kv, int layer,
                      const char *op);

/* The tensor a kernel reads for weight w: w itself for F32/F16/BF16, the
 * dense copy (made on first use) for a block-quantized w. */
int llm_cuda_weight_view(llm_cuda_ctx *c, const llm_tensor *w,
                         llm_tensor *view, const char *op);

/* Dequantizes host rows of a quantized tensor into a new device buffer
 * of F16 (BF16 where F16 overflows).  *out, *out_type set on success. */
int llm_cuda_dequant_upload(llm_cuda_ctx *c, const void *host, int type,
                            int64_t cols, int64_t rows, size_t nb,
                            void **out, int *out_type, const char *op);


/* ---------------------------------------------------------------- ops */

int llm_cuda_embed(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *table);
int llm_cuda_rmsnorm(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *x,
                     const llm_tensor *w, float eps);
int llm_cuda_matmul(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *x,
                    const llm_tensor *w, const llm_tensor *bias);
int llm_cuda_rope(llm_cuda_ctx *c, llm_tensor *x, int n_heads, int head_dim,
                  const llm_rope_params *rp);
int llm_cuda_kv_store(llm_cuda_ctx *c, const llm_kv_pool *kv, int layer,
                      const llm_tensor *k, const llm_tensor *v);
int llm_cuda_kv_copy_blocks(llm_cuda_ctx *c, const llm_kv_pool *kv,
                            const int32_t *src, const int32_t *dst, int n);
int llm_cuda_kv_block_host(llm_cuda_ctx *c, const llm_kv_pool *kv,
                           int32_t block, void *host, int to_host);
int llm_cuda_attention(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *q,
                       const llm_kv_pool *kv, int layer, int n_heads,
                       float scale);
int llm_cuda_silu_mul(llm_cuda_ctx *c, llm_tensor *out,
                      const llm_tensor *gate, const llm_tensor *up);
int llm_cuda_add(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *a,
                 const llm_tensor *b);
int llm_cuda_gather_out_rows(llm_cuda_ctx *c, llm_tensor *out,
                             const llm_tensor *x);
int llm_cuda_matmul_n(llm_cuda_ctx *c, llm_tensor *const *outs,
                      const llm_tensor *x, const llm_tensor *const *ws,
                      const llm_tensor *const *biases, int n);
int llm_cuda_lora(llm_cuda_ctx *c, llm_tensor *const *outs, int n_outs,
                  const llm_tensor *x, const llm_lora_seg *segs, int n_segs);


/* ---------------------------------------------------------- launchers */

/* Row strides are in bytes (llm_tensor.nb); element types are llm_dtype
 * values.  Every launcher returns cudaErrorInvalidValue for arguments it
 * cannot run and cudaErrorNotSupported for a type or head size it has no
 * kernel for. */

/* out[t] = table[tokens[t]] as f32.  table: [n_vocab, dim] F32/F16/BF16;
 * out: [n_tokens, dim] f32. */
cudaError_t launch_embed(float *out, size_t out_nb,
                         const void *table, int table_type, size_t table_nb,
                         const int32_t *tokens, int n_tokens, int dim,
                         cudaStream_t stream);

/* out[r] = x[r] / rms(x[r]) * w.  x, out: [rows, dim] f32 (may alias);
 * w: [dim] f32. */
cudaError_t launch_rmsnorm(float *out, size_t out_nb, const float *x,
                           size_t x_nb, const float *w, int rows, int dim,
                           float eps, cudaStream_t stream);

/* Rotary embedding in place.  x: [n_tokens, n_heads * head_dim] f32;
 * pos: [n_tokens]; freq_factors: [n_rot / 2] host floats or NULL
 * (passed by value, n_rot <= LLM_CUDA_ROPE_MAX). */
cudaError_t launch_rope(float *x, size_t x_nb, const int32_t *pos,
                        int n_tokens, int n_heads, int head_dim, int n_rot,
                        int neox, float theta_scale, float freq_scale,
                        const float *freq_factors, cudaStream_t stream);

/* Writes k, v: [n_tokens, n_kv_heads * head_dim] f32 into the pages of
 * one layer: k_pages, v_pages: [n_blocks, block_size, n_kv_heads,
 * head_dim] of kv_type (F16/F32); block_table: [n_seqs, max_blocks]. */
cudaError_t launch_kv_store(void *k_pages, void *v_pages, int kv_type,
                            const float *k, size_t k_nb, const float *v,
                            size_t v_nb, const int32_t *pos,
                            const int32_t *tok_seq,
                            const int32_t *block_table, int max_blocks,
                            int block_size, int row_elems, int n_tokens,
                            cudaStream_t stream);

/* Copies whole blocks of blk_bytes, src_blocks[i] -> dst_blocks[i], in
 * every layer of K and V.  src_blocks, dst_blocks: [n] device. */
cudaError_t launch_kv_copy_blocks(void *k, void *v, size_t layer_bytes,
                                  int n_layers, size_t blk_bytes,
                                  const int32_t *src_blocks,
                                  const int32_t *dst_blocks, int n,
                                  cudaStream_t stream);


/* Split-K (flash-decoding) attention of the tokens dec[0 .. n_dec): each
 * (token, KV head, range of split_len positions) is one block; with
 * n_split > 1 the ranges leave partials [n_dec, n_heads, n_split,
 * head_dim + 2] f32 in part and a second kernel merges them. */
cudaError_t launch_attn_split(const llm_cuda_attn_args *a,
                              const int32_t *dec, int n_dec, int n_split,
                              int split_len, float *part,
                              cudaStream_t stream);

/* Tiled attention of query tiles: tile i = (first token of the run, tokens
 * in the run, first row of the tile within the run's (token, head in
 * group) rows, positions to read).  One block per (tile, KV head). */
cudaError_t launch_attn_tiled(const llm_cuda_attn_args *a,
                              const int4 *tiles, int n_tiles,
                              size_t smem_optin, cudaStream_t stream);

/* out = silu(gate) * up (op 0) or a + b (op 1), [rows, cols] f32; out
 * may alias the first input. */
cudaError_t launch_elementwise(int op, float *out, size_t out_nb,
                               const float *a, size_t a_nb, const float *b,
                               size_t b_nb, int rows, int cols,
                               cudaStream_t stream);

/* out[i] = x[rows[i]], [n, cols] f32; rows: [n] device. */
cudaError_t launch_gather_rows(float *out, size_t out_nb, const float *x,
                               size_t x_nb, const int32_t *rows, int n,
                               int cols, cudaStream_t stream);

/* out[r] = x[r] as F16 or BF16 (to_type), [rows, cols]; out contiguous. */
cudaError_t launch_convert_rows(void *out, int to_type, const float *x,
                                size_t x_nb, int rows, int cols,
                                cudaStream_t stream);

/* out[r] = bias, [rows, cols] f32 (or 0 where bias is NULL). */
cudaError_t launch_fill_rows(float *out, size_t out_nb, const float *bias,
                             int rows, int cols, cudaStream_t stream);

/* out = x W^T (+ bias) for n <= LLM_CUDA_GEMV_MAX_ROWS activation rows:
 * one warp per output feature, f32 activations, f32 accumulation.
 * x: [n, k] f32, 16-byte aligned rows; w: [m, k] F32/F16/BF16, 16-byte
 * aligned rows; k % 8 == 0; bias: [m] or NULL; out: [n, m] f32. */
cudaError_t launch_gemv(float *out, size_t out_nb, const float *x,
                        size_t x_nb, const void *w, int w_type, size_t w_nb,
                        const float *bias, int n, int k, int m,
                        cudaStream_t stream);

#endif /* LLM_CUDA_INTERNAL_CUH */
