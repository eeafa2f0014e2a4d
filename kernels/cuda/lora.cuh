/*
 * Segmented multi-LoRA kernels (launchers and op: lora.cu).
 *
 * One launch of each kernel covers many segments (a segment: one
 * adapter's contiguous rows of the batch, for one output): the segments
 * travel in the launch's parameters (llm_cuda_lora_args, by value), so a
 * call needs no upload and stays asynchronous.  The parameter is
 * __grid_constant__: the kernels index it and take addresses in it, and
 * the qualifier keeps every compiler from copying it per thread (nvcc 13
 * does not, with or without it: ptxas reports no stack frame).  Tiles of LORA_TILE_ROWS
 * rows are blockIdx.y; a decode segment (one row) is one tile, a prefill
 * segment many: the same kernels are the BGMV of decode and the SGMV of
 * prefill.
 *
 *   shrink:  t[r, j] = x[first + r] . A[j]       one block per A row j
 *            (of every segment of the launch) and tile, reading A[j] once
 *            for the tile's rows, 16-byte loads, a block-wide sum
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
    int32_t             j0[LORA_LAUNCH_SEGS + 1];   /* first A row of each
                                   segment among the launch's; [n_segs]:
                                   all of them */
    llm_cuda_lora_seg   seg[LORA_LAUNCH_SEGS];
} llm_cuda_lora_args;


/* The segment of launch item q (an A row of some segment): the last
 * segment whose first A row is at most q. */
__device__ __forceinline__ int
lora_seg_of(const llm_cuda_lora_args *args, int q)
{
    int lo = 0, hi = args->n_segs - 1;

    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;

        if (args->j0[mid] <= q) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}


/* One block per (A row j of a segment, tile of its rows): blockIdx.x
 * counts the launch's A rows (args.j0), blockIdx.y the tiles.  Many small
 * blocks keep many reads of A in flight, which is what a decode step
 * needs: each A row is read once.  VEC: in is a multiple of 8 and the
 * rows are aligned for load8. */
template <typename W, bool VEC>
__global__ void
lora_shrink_kernel(const __grid_constant__ llm_cuda_lora_args args)
{
    __shared__ float red[LORA_SHRINK_THREADS / 32][LORA_TILE_ROWS];
    int      si = lora_seg_of(&args, (int) blockIdx.x);
    const llm_cuda_lora_seg *s = &args.seg[si];
    int      j = (int) blockIdx.x - args.j0[si];
    int      warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int      row0 = blockIdx.y * LORA_TILE_ROWS, rows, r, kk;
    int      in = args.in;
    const W *a = (const W *) s->a + (size_t) j * (size_t) in;
    float    acc[LORA_TILE_ROWS];

    /* the whole block leaves together, before the barrier */
    if (row0 >= s->n) {
        return;
    }
    rows = s->n - row0 < LORA_TILE_ROWS ? s->n - row0 : LORA_TILE_ROWS;
#pragma unroll
    for (r = 0; r < LORA_TILE_ROWS; r++) {
        acc[r] = 0.0f;
    }
    if (VEC) {
        const float *x = args.x + (size_t) (s->first + row0) * args.x_ld;

        for (kk = threadIdx.x * 8; kk < in; kk += LORA_SHRINK_THREADS * 8) {
            dot8_rows<LORA_TILE_ROWS>(acc, a + kk, x + kk,
                                      args.x_ld * sizeof(float), rows);
        }
    } else {
        for (kk = threadIdx.x; kk < in; kk += LORA_SHRINK_THREADS) {
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

    /* per row: the warps' sums, then the block's */
#pragma unroll
    for (r = 0; r < LORA_TILE_ROWS; r++) {
        float v = warp_sum(acc[r]);

        if (lane == 0) {
            red[warp][r] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < (unsigned) rows) {
        float sum = 0.0f, f;
        int   w;

        for (w = 0; w < LORA_SHRINK_THREADS / 32; w++) {
            sum += red[w][threadIdx.x];
        }
        f = s->a_scale != NULL ? s->a_scale[j] * s->b_scale[j] : 1.0f;
        args.t[s->t_off + (int64_t) (row0 + threadIdx.x) * s->rank + j] =
            sum * f;
    }
}


/* BT: B is stored transposed, [rank, od] (f16, int8). */
template <typename W, bool BT>
__global__ void
lora_expand_kernel(const __grid_constant__ llm_cuda_lora_args args)
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
