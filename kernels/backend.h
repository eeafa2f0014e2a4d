/*
 * The compute backend interface: one table of function pointers that the
 * CPU backend (kernels/cpu) and the CUDA backend (kernels/cuda) implement,
 * in the manner of ggml-backend.  The engine only ever calls through this
 * table: it never dereferences llm_tensor.data, which is a host address on
 * the CPU backend and a device address on CUDA.
 *
 * Shapes are 2-D and row-major: ne[0] is the number of elements of a row
 * (contiguous), ne[1] the number of rows, nb the bytes from one row to the
 * next.  Weights are [out_features rows, in_features cols], as in GGUF and
 * in PyTorch's nn.Linear, so y = x W^T.
 *
 * Every op returns 0 or a negative LLM_E* code with a message in
 * llm_backend_error(be).  Ops may run asynchronously (CUDA stream);
 * download() and synchronize() are the points where results are visible
 * on the host.
 *
 * A step of the engine works on one batch (llm_batch): the tokens of
 * several sequences, each sequence's tokens contiguous and in position
 * order.  set_batch() hands the batch's index arrays to the backend once
 * per step (the CUDA backend uploads them); the ops that need positions,
 * sequences or block tables read them from there.
 */
#ifndef LLM_BACKEND_H
#define LLM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct llm_backend llm_backend;

typedef struct llm_tensor {
    void     *data;     /* backend address; opaque to the engine */
    int       type;     /* llm_dtype */
    int64_t   ne[2];    /* ne[0] = row length (cols), ne[1] = rows */
    size_t    nb;       /* bytes per row */
    int       layout;   /* LLM_LAYOUT_*: how the backend arranged the
                           bytes of an adopted weight; 0 elsewhere */
} llm_tensor;

/* Layouts of weight tensors (set by adopt_tensor, read by the backend
 * that set it; the engine only copies the field).  ROWS16: each whole
 * group of 16 rows holds the same bytes as its 16 rows would, block by
 * block across the rows (kernels/cpu/rows16.c); rows past the last
 * whole group stay as they were. */
enum { LLM_LAYOUT_ROWS = 0, LLM_LAYOUT_ROWS16 = 1 };

/* The paged KV cache of every layer.  For layer l, K and V are each
 * [n_blocks, block_size, n_kv_heads, head_dim] of kv_type, contiguous. */
typedef struct llm_kv_pool {
    void     *k;        /* backend address of layer 0's K; layer l at
                           k + l * layer_bytes */
    void     *v;
    int       type;     /* LLM_F16, LLM_F32, or LLM_Q8_0 where the backend
                           sets kv_q8_0 (head_dim a multiple of 32) */
    int       n_layers;
    int       n_blocks;
    int       block_size;
    int       n_kv_heads;
    int       head_dim;
    size_t    layer_bytes;
} llm_kv_pool;

/* 1 if KV pages can be of type for heads of head_dim elements: F16, F32,
 * or Q8_0 with head_dim a multiple of 32 (a block never straddles two
 * heads).  Whether a backend implements Q8_0 is its ops.kv_q8_0. */
static inline int
llm_kv_type_ok(int type, int head_dim)
{
    return type == LLM_F16 || type == LLM_F32
           || (type == LLM_Q8_0 && head_dim % 32 == 0);
}

/* Bytes of n consecutive KV elements of type (F16, F32, or Q8_0 from a
 * block start: 34 bytes per 32). */
static inline size_t
llm_kv_bytes(int type, size_t n)
{
    return type == LLM_F16 ? 2 * n : type == LLM_Q8_0 ? n / 32 * 34 : 4 * n;
}

/* Host-side description of one step.  Arrays are host memory owned by the
 * engine; valid until the next set_batch(). */
typedef struct llm_batch {
    int             n_tokens;
    const int32_t  *tokens;       /* [n_tokens] token ids */
    const int32_t  *pos;          /* [n_tokens] absolute positions */
    const int32_t  *tok_seq;      /* [n_tokens] index of the token's seq */

    int             n_seqs;
    const int32_t  *seq_start;    /* [n_seqs + 1] first token of each seq */
    const int32_t  *seq_kv_len;   /* [n_seqs] KV length after this step
                                     (tokens already cached + new ones) */
    const int32_t  *block_table;  /* [n_seqs, max_blocks] physical block ids */
    int             max_blocks;

    int             n_out;        /* rows that need logits */
    const int32_t  *out_rows;     /* [n_out] token indices into the batch */

    /* Multi-LoRA (optional; n_adapters == 0 means base model only). */
    int             n_adapters;
    const int32_t  *tok_adapter;  /* [n_tokens] adapter slot or -1 */
} llm_batch;

typedef struct llm_rope_params {
    int     n_rot;          /* rotated dims per head (<= head_dim) */
    int     neox;           /* 1: rotate halves (HF layout);
                               0: rotate adjacent pairs (GGUF llama) */
    float   freq_base;
    float   freq_scale;     /* linear position scaling: 1.0 = none */
    /* Per-frequency divisors of theta, [n_rot / 2] host floats, or NULL
     * (Llama 3 scaling: from GGUF rope_freqs.weight or computed from a
     * Hugging Face rope_scaling of type llama3).  Constant for the
     * model's life; a device backend copies it once. */
    const float *freq_factors;
} llm_rope_params;

/* Adapter weights in int8, for the lora op: a scale per row of A and of
 * B^T (a row's values = scale * int8), B transposed.  Not a GGUF type. */
#define LLM_LORA_I8  64

/* One adapter's share of a batch, for the lora op (host array). */
typedef struct llm_lora_seg {
    int32_t     first;      /* first token row */
    int32_t     n;          /* rows */
    int32_t     rank;
    float       scale;
    const void *a;          /* backend address, [rank, in] */
    const void *b;          /* backend address, [out, rank]; with
                               LLM_F16 or LLM_LORA_I8, B^T: [rank, out] */
    const float *a_scale;   /* LLM_LORA_I8: [rank] per row of A, and */
    const float *b_scale;   /* [rank] per row of B^T; else NULL */
    int32_t     type;       /* of a and b: LLM_F32 (0), or LLM_F16 /
                               LLM_LORA_I8 where the backend sets
                               lora_f16 / lora_i8 */
    int32_t     out;        /* index of the output in the call's outs */
} llm_lora_seg;

typedef struct llm_backend_ops {
    const char *name;

    void        (*free)(llm_backend *be);
    const char *(*error)(llm_backend *be);

    /* Memory. */
    void *(*alloc)(llm_backend *be, size_t bytes);          /* NULL on fail */
    void  (*release)(llm_backend *be, void *data);
    int   (*upload)(llm_backend *be, void *dst, const void *host, size_t n);
    int   (*download)(llm_backend *be, void *host, const void *src,
                      size_t n);
    /* Weights from host memory that stays valid while the backend lives
     * (an mmap'd model file).  The CPU backend returns host itself; a
     * device backend copies.  *out receives the backend address. */
    int   (*adopt_weights)(llm_backend *be, const void *host, size_t n,
                           void **out);
    int   (*synchronize)(llm_backend *be);

    /* Per-step batch description. */
    int (*set_batch)(llm_backend *be, const llm_batch *b);

    /* out[t] = row batch.tokens[t] of table, as f32.  out: [n_tokens, dim]
     * f32; table: [n_vocab, dim] any type. */
    int (*embed)(llm_backend *be, llm_tensor *out, const llm_tensor *table);

    /* out[i] = x[i] / rms(x[i]) * w.  x, out: [n, dim] f32 (may alias);
     * w: [dim] f32. */
    int (*rmsnorm)(llm_backend *be, llm_tensor *out, const llm_tensor *x,
                   const llm_tensor *w, float eps);

    /* out = x W^T (+ bias).  x: [n, k] f32; w: [m, k] any type;
     * bias: [m] f32 or NULL; out: [n, m] f32. */
    int (*matmul)(llm_backend *be, llm_tensor *out, const llm_tensor *x,
                  const llm_tensor *w, const llm_tensor *bias);

    /* outs[i] = x ws[i]^T (+ biases[i]) for i < n (1 to 4): the
     * products of one x (q, k and v; gate and up) in one call, so that x
     * is prepared once (the CPU quantizes it) and the threads share one
     * job.  Each output as matmul would give it.  biases may be NULL, as
     * may its entries.  Optional: NULL makes callers use matmul. */
    int (*matmul_n)(llm_backend *be, llm_tensor *const *outs,
                    const llm_tensor *x, const llm_tensor *const *ws,
                    const llm_tensor *const *biases, int n);

    /* In place rotary embedding of x: [n_tokens, n_heads * head_dim] f32,
     * at positions batch.pos. */
    int (*rope)(llm_backend *be, llm_tensor *x, int n_heads, int head_dim,
                const llm_rope_params *rp);

    /* Writes k, v: [n_tokens, n_kv_heads * head_dim] f32 into layer's
     * pages at each token's position (block table of its seq). */
    int (*kv_store)(llm_backend *be, const llm_kv_pool *kv, int layer,
                    const llm_tensor *k, const llm_tensor *v);

    /* Causal attention of q: [n_tokens, n_heads * head_dim] f32 over the
     * layer's pages, positions 0 .. pos(t) of the token's sequence.
     * out: [n_tokens, n_heads * head_dim] f32.  GQA: query head h reads
     * KV head h / (n_heads / n_kv_heads). */
    int (*attention)(llm_backend *be, llm_tensor *out, const llm_tensor *q,
                     const llm_kv_pool *kv, int layer, int n_heads,
                     float scale);

    /* out = silu(gate) * up, all [n, d] f32 (out may alias gate). */
    int (*silu_mul)(llm_backend *be, llm_tensor *out, const llm_tensor *gate,
                    const llm_tensor *up);

    /* out = a + b, [n, d] f32 (out may alias a). */
    int (*add)(llm_backend *be, llm_tensor *out, const llm_tensor *a,
               const llm_tensor *b);

    /* out[i] = x[batch.out_rows[i]]: [n_out, d] f32. */
    int (*gather_out_rows)(llm_backend *be, llm_tensor *out,
                           const llm_tensor *x);

    /* Multi-LoRA deltas of the projections that read the same x (q, k
     * and v; gate and up), segmented by adapter: for each segment, rows
     * [first, first + n) of x and of its output out = outs[seg.out],
     *     out[t] += scale * (x[t] A^T) B^T
     * (shrink to the segment's rank, then expand).  x: [n_tokens, in]
     * f32; outs[i]: [n_tokens, out_i] f32; segment weights are backend
     * addresses (f32, or f16: seg type), A [rank, in] and B [out, rank].
     * Ranks differ between segments; segments of one output do not
     * overlap.  One call for the group lets a backend spread all its
     * segments over its threads at once.  Optional (NULL: no LoRA). */
    int (*lora)(llm_backend *be, llm_tensor *const *outs, int n_outs,
                const llm_tensor *x, const struct llm_lora_seg *segs,
                int n_segs);
    /* 1: lora also takes f16 weights (seg type LLM_F16: A [rank, in],
     * B transposed, [rank, out]), and adapters are then stored so on
     * this backend: half the bytes of f32, and B^T rows stream. */
    int   lora_f16;
    /* 1: lora also takes LLM_LORA_I8 weights (half the bytes of f16,
     * lossy: --adapter-dtype int8, and auto's choice on a base quantized
     * below 8 bits). */
    int   lora_i8;
    /* 1: this backend's addresses are host memory, readable once an op
     * has returned (the CPU): the engine may read results in place, the
     * logits, instead of downloading a copy.  0 for a device. */
    int   host_memory;
    /* 1: the KV ops read and write Q8_0 pages (--kv-type q8_0: a scale
     * per 32 values of a head's row, 34 bytes where F16 takes 64). */
    int   kv_q8_0;

    /* Copies whole KV blocks between pools' block ids (same layout),
     * src_blocks[i] -> dst_blocks[i], every layer.  Optional (NULL). */
    int (*kv_copy_blocks)(llm_backend *be, const llm_kv_pool *kv,
                          const int32_t *src_blocks,
                          const int32_t *dst_blocks, int n);

    /* One KV block of every layer to host memory and back, for the
     * Redis tier of the prefix cache.  host: [n_layers, 2 (K then V),
     * block_size, n_kv_heads, head_dim] of kv->type.  Complete when they
     * return (host may be reused at once).  Optional (NULL: no tier). */
    int (*kv_block_to_host)(llm_backend *be, const llm_kv_pool *kv,
                            int32_t block, void *host);
    int (*kv_block_from_host)(llm_backend *be, const llm_kv_pool *kv,
                              int32_t block, const void *host);

    /* Optional hooks below: NULL where a backend has none; call them
     * through the llm_backend_* helpers, which fall back. */

    /* Adopts one whole weight tensor from host memory valid while the
     * backend lives.  t->type, ne and nb describe host (n bytes); sets
     * t->data and may store the tensor in another type, updating t->type
     * and t->nb (the CUDA backend expands block-quantized types to
     * F16/BF16 once, at load).  Adopted memory belongs to the backend. */
    int (*adopt_tensor)(llm_backend *be, llm_tensor *t, const void *host,
                        size_t n);

    /* Free and total memory of the device, in bytes. */
    int (*mem_info)(llm_backend *be, size_t *free_bytes,
                    size_t *total_bytes);
} llm_backend_ops;

struct llm_backend {
    const llm_backend_ops *ops;
    void                  *ctx;     /* the backend's private state */
};

static inline const char *
llm_backend_error(llm_backend *be)
{
    return be->ops->error(be);
}

/* adopt_tensor where the backend has it, else adopt_weights (t keeps its
 * type and nb).  0 or a negative LLM_E* code. */
static inline int
llm_backend_adopt_tensor(llm_backend *be, llm_tensor *t, const void *host,
                         size_t n)
{
    void *p = NULL;
    int   rc;

    if (be->ops->adopt_tensor != NULL) {
        return be->ops->adopt_tensor(be, t, host, n);
    }
    rc = be->ops->adopt_weights(be, host, n, &p);
    if (rc == 0) {
        t->data = p;
        t->layout = LLM_LAYOUT_ROWS;
    }
    return rc;
}

/* Device memory, free and total; LLM_EUNSUP (-5) where the backend has
 * no such figure (the CPU backend). */
static inline int
llm_backend_mem_info(llm_backend *be, size_t *free_bytes, size_t *total_bytes)
{
    if (be->ops->mem_info == NULL) {
        return -5;                          /* LLM_EUNSUP */
    }
    return be->ops->mem_info(be, free_bytes, total_bytes);
}

/* Allocates a [rows, cols] tensor of type on the backend; 0 or LLM_ENOMEM. */
int  llm_tensor_alloc(llm_backend *be, llm_tensor *t, int type, int64_t cols,
                      int64_t rows);
void llm_tensor_release(llm_backend *be, llm_tensor *t);

/* A view of rows [first, first + n) of t. */
llm_tensor llm_tensor_rows(const llm_tensor *t, int64_t first, int64_t n);

/* A tensor over existing memory the backend addresses (on the CPU
 * backend, host memory): rows of llm_row_bytes(type, cols), plain
 * layout.  For tests and tools. */
llm_tensor llm_tensor_of(void *data, int type, int64_t cols, int64_t rows);

/* Constructors of the built-in backends. NULL with err set on failure. */
struct llm_err;
llm_backend *llm_backend_cpu_new(int n_threads, struct llm_err *err);
llm_backend *llm_backend_cuda_new(int device, struct llm_err *err);

/* Shared argument checks of the KV ops (every backend runs the same ones):
 * the pool's geometry and the layer; then that every token's sequence,
 * position and the block-table entries of positions 0 .. pos lie inside
 * the batch and the pool.  0, or LLM_EINVAL with msg filled. */
int llm_kv_check_pool(const llm_kv_pool *kv, int layer, char *msg,
                      size_t size);
int llm_kv_check_batch(const llm_kv_pool *kv, const llm_batch *b, char *msg,
                       size_t size);

/* "cpu" or "cuda:N". */
llm_backend *llm_backend_open(const char *spec, int n_threads,
                              struct llm_err *err);

#ifdef __cplusplus
}
#endif

#endif /* LLM_BACKEND_H */
