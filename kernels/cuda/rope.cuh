/* Rotary embedding kernel (launcher and op: rope.cu). */
#ifndef LLM_CUDA_ROPE_CUH
#define LLM_CUDA_ROPE_CUH

#include "device.cuh"


/* Per-frequency divisors travel by value with the launch (at most 1 KiB):
 * nothing to copy to the device or to keep in sync. */
typedef struct rope_factors {
    float   f[LLM_CUDA_ROPE_MAX / 2];
} rope_factors;


__global__ void
rope_kernel(float *x,                   /* [n_tokens, n_heads * head_dim] */
            size_t x_nb,
            const int32_t *pos,         /* [n_tokens] */
            int n_heads, int head_dim, int n_rot, int neox,
            float theta_scale, float freq_scale, int has_factors,
            const rope_factors ff)
{
    __shared__ float cs[LLM_CUDA_ROPE_MAX];     /* [half] (cos, sin) */
    float           *row = row_ptr(x, x_nb, blockIdx.x);
    int              half = n_rot / 2, i, k, idx;

    for (i = threadIdx.x; i < half; i += blockDim.x) {
        /* the same sequence of float products as the CPU's loop */
        float theta = (float) pos[blockIdx.x], th;

        for (k = 0; k < i; k++) {
            theta *= theta_scale;
        }
        th = theta;
        if (has_factors) {
            th /= ff.f[i];
        }
        th *= freq_scale;
        cs[2 * i] = cosf(th);
        cs[2 * i + 1] = sinf(th);
    }
    __syncthreads();

    for (idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        int    h = idx / half;
        float *xh = row + (size_t) h * head_dim;
        float  c, s, x0, x1;
        int    a, b;

        i = idx - h * half;
        a = neox ? i : 2 * i;
        b = neox ? i + half : 2 * i + 1;
        c = cs[2 * i];
        s = cs[2 * i + 1];
        x0 = xh[a];
        x1 = xh[b];
        xh[a] = x0 * c - x1 * s;
        xh[b] = x0 * s + x1 * c;
    }
}

#endif /* LLM_CUDA_ROPE_CUH */
