/*
 * Rotary position embedding, in place, at each token's position.
 *
 * The angles follow the CPU backend (and llama.cpp) operation for
 * operation: theta_0 = pos, theta_{i+1} = theta_i * base^(-2/n_rot) in
 * float (theta_scale comes from the host's powf), divided by
 * freq_factors[i] when given, times freq_scale.  Pairs are (x[i],
 * x[i + n_rot/2]) with neox, else (x[2i], x[2i+1]); dims past n_rot are
 * left alone.  One block per token: the cos/sin of its n_rot/2 angles go
 * to shared memory once and serve every head.
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "rope.cuh"

#include <math.h>

cudaError_t
launch_rope(float *x, size_t x_nb, const int32_t *pos, int n_tokens,
            int n_heads, int head_dim, int n_rot, int neox, float theta_scale,
            float freq_scale, const float *freq_factors, cudaStream_t stream)
{
    rope_factors ff;
    int          i, threads;

    CUDA_CHECK_ARG(n_tokens >= 0 && n_heads > 0 && head_dim > 0);
    CUDA_CHECK_ARG(n_rot > 0 && n_rot % 2 == 0 && n_rot <= head_dim);
    if (n_rot > LLM_CUDA_ROPE_MAX) {
        return cudaErrorNotSupported;
    }
    if (n_tokens == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(x != NULL && pos != NULL);
    for (i = 0; i < n_rot / 2; i++) {
        ff.f[i] = freq_factors != NULL ? freq_factors[i] : 1.0f;
    }
    threads = n_heads * (n_rot / 2) >= 256 ? 256 : 128;
    rope_kernel<<<n_tokens, threads, 0, stream>>>(x, x_nb, pos, n_heads,
                                                  head_dim, n_rot, neox,
                                                  theta_scale, freq_scale,
                                                  freq_factors != NULL, ff);
    return cudaGetLastError();
}


int
llm_cuda_rope(llm_cuda_ctx *c, llm_tensor *x, int n_heads, int head_dim,
              const llm_rope_params *rp)
{
    float theta_scale;
    int   rc;

    if ((rc = llm_cuda_need_batch(c, "rope")) != 0) {
        return rc;
    }
    if (rp == NULL || n_heads <= 0 || head_dim <= 0 || rp->n_rot <= 0
        || rp->n_rot > head_dim || rp->n_rot % 2 != 0
        || !(rp->freq_base > 0.0f))
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: rope: bad parameters"
                             " (heads %d, head_dim %d, n_rot %d)", n_heads,
                             head_dim, rp ? rp->n_rot : 0);
    }
    if (rp->n_rot > LLM_CUDA_ROPE_MAX) {
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: rope: n_rot %d > %d",
                             rp->n_rot, LLM_CUDA_ROPE_MAX);
    }
    if ((rc = llm_cuda_check_f32(c, x, "rope", "x",
                                 (int64_t) n_heads * head_dim,
                                 c->batch.n_tokens)) != 0)
    {
        return rc;
    }
    if (c->batch.n_tokens == 0) {
        return 0;
    }
    /* computed here, as the CPU backend does, so both use one value */
    theta_scale = powf(rp->freq_base, -2.0f / (float) rp->n_rot);
    return llm_cuda_check(c, launch_rope((float *) x->data, x->nb, c->d_pos,
                                         c->batch.n_tokens, n_heads,
                                         head_dim, rp->n_rot, rp->neox,
                                         theta_scale, rp->freq_scale,
                                         rp->freq_factors, c->stream),
                          "rope", "launch");
}
