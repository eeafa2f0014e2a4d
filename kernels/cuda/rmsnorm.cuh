/* RMS norm kernel (launcher and op: rmsnorm.cu). */
#ifndef LLM_CUDA_RMSNORM_CUH
#define LLM_CUDA_RMSNORM_CUH

#include "device.cuh"


__global__ void
rmsnorm_kernel(float *out,              /* [rows, dim] f32, may alias x */
               size_t out_nb,
               const float *x,          /* [rows, dim] f32 */
               size_t x_nb,
               const float *w,          /* [dim] f32 */
               int dim, float eps)
{
    __shared__ float red[32];
    const float     *xr = row_ptr(x, x_nb, blockIdx.x);
    float           *yr = row_ptr(out, out_nb, blockIdx.x);
    float            ss = 0.0f, scale;
    int              i;

    for (i = threadIdx.x; i < dim; i += blockDim.x) {
        ss += xr[i] * xr[i];
    }
    ss = block_sum(ss, red);
    scale = 1.0f / sqrtf(ss / (float) dim + eps);
    /* each thread rewrites only the elements it read: safe in place */
    for (i = threadIdx.x; i < dim; i += blockDim.x) {
        yr[i] = (xr[i] * scale) * w[i];
    }
}

#endif /* LLM_CUDA_RMSNORM_CUH */
