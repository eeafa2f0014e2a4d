/*
 * Device-side helpers shared by the kernels: element conversions, warp
 * and block reductions, row addressing, and the constants and argument
 * structs the kernels (<op>.cuh) and their launchers (<op>.cu) share.
 *
 * Kernels live in .cuh files, launchers in .cu files.  The .cuh files
 * compile as plain C++ too, against t/cuda_emu/emu.h (LLM_CUDA_EMU),
 * which runs them on the CPU thread by thread: that is how their index
 * math is checked on machines without a GPU.
 */
#ifndef LLM_CUDA_DEVICE_CUH
#define LLM_CUDA_DEVICE_CUH

#include <stddef.h>
#include <stdint.h>

#ifndef LLM_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
/* dynamic shared memory of a kernel */
#define LLM_EXTERN_SHARED(type, name)  extern __shared__ type name[]
/* the emulator checks what the GPU requires of vector loads */
#define LLM_CHECK_ALIGN(p, n)
#else
#define LLM_CHECK_ALIGN(p, n)   emu_check_align((const void *) (p), (n))
#endif


/* Limits and tile sizes the launchers and kernels agree on. */
#define LLM_CUDA_ROPE_MAX       512     /* n_rot at most */
#define LLM_CUDA_TILE_ROWS      32      /* query rows of a tiled block */
#define LLM_CUDA_GEMV_MAX_ROWS  4       /* activation rows for the GEMV */


/* Paged attention arguments shared by both attention kernels. */
typedef struct llm_cuda_attn_args {
    const float    *q;          /* [n_tokens, n_heads * head_dim] f32 */
    size_t          q_nb;
    float          *out;        /* [n_tokens, n_heads * head_dim] f32 */
    size_t          out_nb;
    const void     *k_pages;    /* this layer: [n_blocks, block_size,
                                   n_kv_heads, head_dim] of kv_type */
    const void     *v_pages;
    int             kv_type;    /* LLM_F16 or LLM_F32 */
    const int32_t  *pos;        /* [n_tokens] */
    const int32_t  *tok_seq;    /* [n_tokens] */
    const int32_t  *block_table;/* [n_seqs, max_blocks] */
    int             max_blocks;
    int             block_size;
    int             n_heads;
    int             n_kv_heads;
    int             head_dim;
    float           scale;
} llm_cuda_attn_args;


/* Element types as kernels see them. */
__device__ __forceinline__ float
to_f32(float x)
{
    return x;
}


__device__ __forceinline__ float
to_f32(__half x)
{
    return __half2float(x);
}


__device__ __forceinline__ float
to_f32(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}


/* Eight consecutive elements (16-byte aligned for 16-bit types, 32 for
 * f32) as f32. */
__device__ __forceinline__ void
load8(const float *p, float *o)
{
    float4 a, b;

    LLM_CHECK_ALIGN(p, 16);
    a = *(const float4 *) p;
    b = *(const float4 *) (p + 4);

    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}


__device__ __forceinline__ void
load8(const __half *p, float *o)
{
    uint4          u;
    const __half2 *h = (const __half2 *) &u;
    int            i;

    LLM_CHECK_ALIGN(p, 16);
    u = *(const uint4 *) p;
#pragma unroll
    for (i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}


__device__ __forceinline__ void
load8(const __nv_bfloat16 *p, float *o)
{
    uint4                  u;
    const __nv_bfloat162  *h = (const __nv_bfloat162 *) &u;
    int                    i;

    LLM_CHECK_ALIGN(p, 16);
    u = *(const uint4 *) p;
#pragma unroll
    for (i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}


/* Eight int8 weights (8-byte aligned: adapter copies) as f32. */
__device__ __forceinline__ void
load8(const int8_t *p, float *o)
{
    uint2         u;
    const int8_t *b = (const int8_t *) &u;
    int           i;

    LLM_CHECK_ALIGN(p, 8);
    u = *(const uint2 *) p;
#pragma unroll
    for (i = 0; i < 8; i++) {
        o[i] = (float) b[i];
    }
}


__device__ __forceinline__ float
to_f32(int8_t x)
{
    return (float) x;
}


__device__ __forceinline__ float
warp_sum(float v)
{
    int o;

#pragma unroll
    for (o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}


__device__ __forceinline__ float
warp_max(float v)
{
    int o;

#pragma unroll
    for (o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}


/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every
 * thread gets the result.  red: __shared__ float[32]. */
__device__ __forceinline__ float
block_sum(float v, float *red)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nw = blockDim.x >> 5;

    v = warp_sum(v);
    __syncthreads();                /* red may be in use by a prior call */
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_sum(v);
}


/* Row r of a [rows, cols] tensor with nb bytes per row. */
template <typename T>
__device__ __forceinline__ T *
row_ptr(T *base, size_t nb, int64_t r)
{
    return (T *) ((char *) base + (size_t) r * nb);
}


template <typename T>
__device__ __forceinline__ const T *
row_ptr(const T *base, size_t nb, int64_t r)
{
    return (const T *) ((const char *) base + (size_t) r * nb);
}

/* The inner step of the GEMV and LoRA-shrink dot products: acc[i] +=
 * w[0..8) . x_i[0..8) for the first n of NR rows of x, row i at byte
 * offset i * x_nb (w and x aligned for load8). */
template <int NR, typename W>
__device__ __forceinline__ void
dot8_rows(float *acc, const W *w, const float *x, size_t x_nb, int n)
{
    float wv[8];
    int   i, u;

    load8(w, wv);
#pragma unroll
    for (i = 0; i < NR; i++) {
        if (i < n) {
            float xv[8];

            load8(row_ptr(x, x_nb, i), xv);
#pragma unroll
            for (u = 0; u < 8; u++) {
                acc[i] += wv[u] * xv[u];
            }
        }
    }
}

#endif /* LLM_CUDA_DEVICE_CUH */
