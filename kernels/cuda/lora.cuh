/*
 * Segmented multi-LoRA kernels (launchers and op: lora.cu).
 *
 * One launch of each kernel covers many segments (a segment: one
 * adapter's contiguous rows of the batch, for one output): the segments
 * travel in the launch's parameters (llm_cuda_lora_args, by value), so a
 * call needs no upload and stays asynchronous.  Blocks index segments by
 * blockIdx.x and tiles of LORA_TILE_ROWS rows by blockIdx.y; a decode
 * segment (one row) is one tile, a prefill segment many: the same kernel
 * is the BGMV of decode and the SGMV of prefill.
 *
 *   shrink:  t[r, j] = x[first + r] . A[j]       one warp per A row j,
 *            reading A[j] once for the tile's rows, 16-byte loads
 *   expand:  out[first + r, o] += scale * sum_j t[r, j] B(j, o)
 *            one thread per output column o (blockIdx.z tiles of
 *            LORA_EXPAND_THREADS), the tile's t rows in shared memory
 *
 * Weights: A [rank, in] f32, f16 or int8; B [out, rank] f32, or B^T
 * [rank, out] f16 or int8 (backend.h, llm_lora_seg), so expand's reads of
 * B^T are coalesced.  int8 rows have scales (a_scale, b_scale): shrink
 * folds both into t, as the CPU backend does.  Sums are f32.
 */
#ifndef LLM_CUDA_LORA_CUH
#define LLM_CUDA_LORA_CUH

#include "device.cuh"


#define LORA_TILE_ROWS       8      /* rows of a segment per block */
#define LORA_SHRINK_THREADS  256    /* 8 warps: 8 A rows at a time */
#define LORA_EXPAND_THREADS  256    /* output columns per block */
#define LORA_MAX_RANK        256    /* t rows in shared memory */
#define LORA_LAUNCH_SEGS     48     /* segments per launch (parameters of
                                       4 KiB at most) */

/* One segment as the kernels see it. */
typedef struct llm_cuda_lora_seg {
    const void     *a;          /* [rank, in] */
    const void     *b;          /* f32: [od, rank]; f16, int8: [rank, od] */
    const float    *a_scale;    /* int8: [rank] */
    const float    *b_scale;    /* int8: [rank] */
    float          *out;        /* row `first` of the output */
    int64_t         t_off;      /* floats from the start of t */
    uint32_t        out_ld;     /* floats per output row */
    int32_t         first;      /* first row of x */
    int32_t         n;          /* rows */
    int32_t         rank;
    int32_t         od;         /* output columns */
    float           scale;
} llm_cuda_lora_seg;

typedef struct llm_cuda_lora_args {
    const float        *x;      /* [T, in] f32 */
    float              *t;      /* shrink results, per segment [n, rank] */
    uint32_t            x_ld;   /* floats per x row */
    int32_t             in;
    int32_t             n_segs;
    llm_cuda_lora_seg   seg[LORA_LAUNCH_SEGS];
} llm_cuda_lora_args;


/* Eight int8 weights (8-byte aligned) as f32. */
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


/* VEC: in is a multiple of 8 and the rows are aligned for load8. */
template <typename W, bool VEC>
__global__ void
lora_shrink_kernel(llm_cuda_lora_args args)
{
    const llm_cuda_lora_seg *s = &args.seg[blockIdx.x];
    int      warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int      row0 = blockIdx.y * LORA_TILE_ROWS, rows, j, r, kk, u;
    int      in = args.in;

    if (row0 >= s->n) {
        return;
    }
    rows = s->n - row0 < LORA_TILE_ROWS ? s->n - row0 : LORA_TILE_ROWS;

    /* each warp whole through its loop: the shuffles stay full */
    for (j = warp; j < s->rank; j += LORA_SHRINK_THREADS / 32) {
        const W *a = (const W *) s->a + (size_t) j * (size_t) in;
        float    acc[LORA_TILE_ROWS];

#pragma unroll
        for (r = 0; r < LORA_TILE_ROWS; r++) {
            acc[r] = 0.0f;
        }
        if (VEC) {
            for (kk = lane * 8; kk < in; kk += 32 * 8) {
                float av[8];

                load8(a + kk, av);
#pragma unroll
                for (r = 0; r < LORA_TILE_ROWS; r++) {
                    if (r < rows) {
                        float xv[8];

                        load8(args.x + (size_t) (s->first + row0 + r)
                                       * args.x_ld + kk, xv);
#pragma unroll
                        for (u = 0; u < 8; u++) {
                            acc[r] += av[u] * xv[u];
                        }
                    }
                }
            }
        } else {
            for (kk = lane; kk < in; kk += 32) {
                float av = to_f32(a[kk]);

#pragma unroll
                for (r = 0; r < LORA_TILE_ROWS; r++) {
                    if (r < rows) {
                        acc[r] += av * args.x[(size_t) (s->first + row0 + r)
                                              * args.x_ld + kk];
                    }
                }
            }
        }
#pragma unroll
        for (r = 0; r < LORA_TILE_ROWS; r++) {
            acc[r] = warp_sum(acc[r]);
        }
        if (lane == 0) {
            float f = s->a_scale != NULL ? s->a_scale[j] * s->b_scale[j]
                                         : 1.0f;

            for (r = 0; r < rows; r++) {
                args.t[s->t_off + (int64_t) (row0 + r) * s->rank + j] =
                    acc[r] * f;
            }
        }
    }
}


/* BT: B is stored transposed, [rank, od] (f16, int8). */
template <typename W, bool BT>
__global__ void
lora_expand_kernel(llm_cuda_lora_args args)
{
    __shared__ float tt[LORA_TILE_ROWS * LORA_MAX_RANK];
    const llm_cuda_lora_seg *s = &args.seg[blockIdx.x];
    int      row0 = blockIdx.y * LORA_TILE_ROWS, rows, j, r, i;
    int      o = blockIdx.z * LORA_EXPAND_THREADS + threadIdx.x;
    const W *b = (const W *) s->b;
    float    acc[LORA_TILE_ROWS];

    /* the whole block leaves together, before the barrier */
    if (row0 >= s->n || blockIdx.z * LORA_EXPAND_THREADS >= (unsigned) s->od)
    {
        return;
    }
    rows = s->n - row0 < LORA_TILE_ROWS ? s->n - row0 : LORA_TILE_ROWS;
    for (i = threadIdx.x; i < rows * s->rank; i += LORA_EXPAND_THREADS) {
        tt[i] = args.t[s->t_off + (int64_t) row0 * s->rank + i];
    }
    __syncthreads();
    if (o >= s->od) {
        return;
    }

#pragma unroll
    for (r = 0; r < LORA_TILE_ROWS; r++) {
        acc[r] = 0.0f;
    }
    for (j = 0; j < s->rank; j++) {
        float bv = to_f32(BT ? b[(size_t) j * s->od + o]
                             : b[(size_t) o * s->rank + j]);

#pragma unroll
        for (r = 0; r < LORA_TILE_ROWS; r++) {
            if (r < rows) {
                acc[r] += tt[r * s->rank + j] * bv;
            }
        }
    }
    for (r = 0; r < rows; r++) {
        s->out[(size_t) (row0 + r) * s->out_ld + o] += s->scale * acc[r];
    }
}

#endif /* LLM_CUDA_LORA_CUH */
