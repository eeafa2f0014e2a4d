/* GEMV kernel for a few activation rows (launchers and op: matmul.cu). */
#ifndef LLM_CUDA_MATMUL_CUH
#define LLM_CUDA_MATMUL_CUH

#include "device.cuh"


#define GEMV_THREADS  256               /* 8 warps: 8 output features */


template <typename W, int NR>
__global__ void
gemv_kernel(float *out,                 /* [n, m] f32 */
            size_t out_nb,
            const float *x,             /* [n, k] f32 */
            size_t x_nb,
            const W *w,                 /* [m, k] */
            size_t w_nb,
            const float *bias,          /* [m] f32 or NULL */
            int n, int k, int m)
{
    int      warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int64_t  row = (int64_t) blockIdx.x * (GEMV_THREADS / 32) + warp;
    const W *wr;
    float    acc[NR];
    int      kk, i, u;

    /* the whole warp leaves together: the shuffles below stay full */
    if (row >= m) {
        return;
    }
    wr = row_ptr(w, w_nb, row);
#pragma unroll
    for (i = 0; i < NR; i++) {
        acc[i] = 0.0f;
    }

#pragma unroll 4
    for (kk = lane * 8; kk < k; kk += 32 * 8) {
        float wv[8];

        load8(wr + kk, wv);
#pragma unroll
        for (i = 0; i < NR; i++) {
            if (i < n) {
                float xv[8];

                load8(row_ptr(x, x_nb, i) + kk, xv);
#pragma unroll
                for (u = 0; u < 8; u++) {
                    acc[i] += wv[u] * xv[u];
                }
            }
        }
    }

#pragma unroll
    for (i = 0; i < NR; i++) {
        acc[i] = warp_sum(acc[i]);
    }
    if (lane == 0) {
        float b = bias != NULL ? bias[row] : 0.0f;

#pragma unroll
        for (i = 0; i < NR; i++) {
            if (i < n) {
                row_ptr(out, out_nb, i)[row] = acc[i] + b;
            }
        }
    }
}

#endif /* LLM_CUDA_MATMUL_CUH */
