/* GEMV kernel for a few activation rows (launchers and op: matmul.cu). */
#ifndef LLM_CUDA_MATMUL_CUH
#define LLM_CUDA_MATMUL_CUH

#include "device.cuh"


#define GEMV_THREADS  256               /* 8 warps: 8 output features */


/* One warp: out[i][row] = x[i] . w[row] (+ bias) for the n rows of x. */
template <typename W, int NR>
__device__ __forceinline__ void
gemv_row(float *out, size_t out_nb, const float *x, size_t x_nb,
         const W *wr, float b, int n, int k, int64_t row)
{
    int   lane = threadIdx.x & 31;
    float acc[NR];
    int   kk, i;

#pragma unroll
    for (i = 0; i < NR; i++) {
        acc[i] = 0.0f;
    }

#pragma unroll 4
    for (kk = lane * 8; kk < k; kk += 32 * 8) {
        dot8_rows<NR>(acc, wr + kk, x + kk, x_nb, n);
    }

#pragma unroll
    for (i = 0; i < NR; i++) {
        acc[i] = warp_sum(acc[i]);
    }
    if (lane == 0) {
#pragma unroll
        for (i = 0; i < NR; i++) {
            if (i < n) {
                row_ptr(out, out_nb, i)[row] = acc[i] + b;
            }
        }
    }
}


/* The products of one x with one or several weights of one type in one
 * launch (matmul, matmul_n): the warps count the parts' output features
 * in turn, one feature each. */
#define GEMV_MAX_PARTS  4

typedef struct llm_cuda_gemv_part {
    float          *out;        /* [n, m] f32 */
    size_t          out_nb;
    const void     *w;          /* [m, k] */
    size_t          w_nb;
    const float    *bias;       /* [m] or NULL */
    int             m;
    int             row0;       /* features of the parts before */
} llm_cuda_gemv_part;

typedef struct llm_cuda_gemv_parts {
    int                 n_parts;
    int                 rows;   /* of all parts */
    llm_cuda_gemv_part  p[GEMV_MAX_PARTS];
} llm_cuda_gemv_parts;


template <typename W, int NR>
__global__ void
gemv_kernel(const __grid_constant__ llm_cuda_gemv_parts parts,
            const float *x, size_t x_nb, int n, int k)
{
    int64_t row = (int64_t) blockIdx.x * (GEMV_THREADS / 32)
                  + (threadIdx.x >> 5);
    int     i = 0;

    /* the whole warp leaves together: the shuffles stay full */
    if (row >= parts.rows) {
        return;
    }
    while (i + 1 < parts.n_parts && row >= parts.p[i + 1].row0) {
        i++;
    }
    row -= parts.p[i].row0;
    gemv_row<W, NR>(parts.p[i].out, parts.p[i].out_nb, x, x_nb,
                    row_ptr((const W *) parts.p[i].w, parts.p[i].w_nb, row),
                    parts.p[i].bias != NULL ? parts.p[i].bias[row] : 0.0f,
                    n, k, row);
}

#endif /* LLM_CUDA_MATMUL_CUH */
