/*
 * RMS norm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, as llama.cpp
 * (eps inside the root, the scale applied before the weight).  One block
 * per row; f32 sums, reduced over the block.
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "rmsnorm.cuh"


cudaError_t
launch_rmsnorm(float *out, size_t out_nb, const float *x, size_t x_nb,
               const float *w, int rows, int dim, float eps,
               cudaStream_t stream)
{
    int threads = dim >= 2048 ? 512 : dim >= 512 ? 256 : 128;

    CUDA_CHECK_ARG(rows >= 0 && dim >= 0);
    if (rows == 0 || dim == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(out != NULL && x != NULL && w != NULL);
    rmsnorm_kernel<<<rows, threads, 0, stream>>>(out, out_nb, x, x_nb, w,
                                                 dim, eps);
    return cudaGetLastError();
}


int
llm_cuda_rmsnorm(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *x,
                 const llm_tensor *w, float eps)
{
    int rc;

    if ((rc = llm_cuda_check_f32(c, x, "rmsnorm", "x", -1, -1)) != 0
        || (rc = llm_cuda_check_f32(c, out, "rmsnorm", "out", x->ne[0],
                                    x->ne[1])) != 0
        || (rc = llm_cuda_check_f32(c, w, "rmsnorm", "w", x->ne[0], -1)) != 0)
    {
        return rc;
    }
    if (x->ne[0] == 0 || x->ne[1] == 0) {
        return 0;
    }
    return llm_cuda_check(c, launch_rmsnorm((float *) out->data, out->nb,
                                            (const float *) x->data, x->nb,
                                            (const float *) w->data,
                                            (int) x->ne[1], (int) x->ne[0],
                                            eps, c->stream),
                          "rmsnorm", "launch");
}
