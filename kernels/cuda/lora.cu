/*
 * Multi-LoRA deltas of the projections sharing x, segment by segment
 * (each segment is one adapter's contiguous rows of the batch, for one
 * of the outputs):
 *
 *     outs[out][t] += scale * (x[t] A^T) B^T,   t in [first, first + n)
 *
 * shrink then expand, each an f32 cuBLAS product (CUBLAS_COMPUTE_32F) on
 * the stream; the expand accumulates into out through beta = 1.  Ranks
 * differ between segments, so each has its own pair of products.
 *
 * Weights are F32 (the backend leaves lora_f16 at 0).
 *
 * Column-major view: shrink C [rank, n] = A^T (A stored [in, rank], op T)
 * x (B [in, n]); expand C [out, n] += scale * B^T (stored [rank, out],
 * op T) tmp ([rank, n]).
 */
#include "cuda_internal.cuh"


int
llm_cuda_lora(llm_cuda_ctx *c, llm_tensor *const *outs, int n_outs,
              const llm_tensor *x, const llm_lora_seg *segs, int n_segs)
{
    const float     one = 1.0f, zero = 0.0f;
    int64_t         T, in;
    size_t          need = 0;
    float          *tmp;
    cublasStatus_t  s;
    int             i, rc;

    if ((rc = llm_cuda_check_f32(c, x, "lora", "x", -1, -1)) != 0) {
        return rc;
    }
    for (i = 0; i < n_outs; i++) {
        if ((rc = llm_cuda_check_f32(c, outs[i], "lora", "out", -1,
                                     x->ne[1])) != 0)
        {
            return rc;
        }
    }
    if (n_segs < 0 || (n_segs > 0 && segs == NULL)) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: lora: bad segments");
    }
    T = x->ne[1];
    in = x->ne[0];
    for (i = 0; i < n_segs; i++) {
        const llm_lora_seg *g = &segs[i];

        if (g->type != LLM_F32) {
            /* lora_f16 is 0 here: the loader keeps adapters in f32 */
            return llm_cuda_fail(c, LLM_EUNSUP, "cuda: lora: segment %d:"
                                 " weights of type %d (F32 only)", i,
                                 (int) g->type);
        }
        if (g->first < 0 || g->n < 0 || (int64_t) g->first + g->n > T
            || g->rank <= 0 || g->out < 0 || g->out >= n_outs
            || (g->n > 0 && (g->a == NULL || g->b == NULL)))
        {
            return llm_cuda_fail(c, LLM_EINVAL, "cuda: lora: segment %d"
                                 " (rows %d + %d of %lld, rank %d) is bad",
                                 i, (int) g->first, (int) g->n,
                                 (long long) T, (int) g->rank);
        }
        if ((size_t) g->n * (size_t) g->rank > need) {
            need = (size_t) g->n * (size_t) g->rank;
        }
    }
    if (need == 0 || in == 0) {
        return 0;
    }
    tmp = (float *) llm_cuda_buf_get(c, &c->lora_scratch,
                                     need * sizeof(float), "lora");
    if (tmp == NULL) {
        return LLM_ENOMEM;
    }

    for (i = 0; i < n_segs; i++) {
        const llm_lora_seg *g = &segs[i];
        const llm_tensor   *out = outs[g->out];
        int64_t             od = out->ne[0];
        const float        *xs = (const float *) ((const uint8_t *) x->data
                                                  + (size_t) g->first * x->nb);
        float              *os = (float *) ((uint8_t *) out->data
                                            + (size_t) g->first * out->nb);
        int                 ldx = (int) (x->nb / 4), ldo = (int) (out->nb / 4);

        if (g->n == 0 || od == 0) {
            continue;
        }
        ldx = ldx < in ? (int) in : ldx;        /* one-row views */
        ldo = ldo < od ? (int) od : ldo;
        s = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, g->rank, g->n,
                         (int) in, &one, g->a, CUDA_R_32F, (int) in, xs,
                         CUDA_R_32F, ldx, &zero, tmp, CUDA_R_32F, g->rank,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (s == CUBLAS_STATUS_SUCCESS) {
            s = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int) od,
                             g->n, g->rank, &g->scale, g->b, CUDA_R_32F,
                             g->rank, tmp, CUDA_R_32F, g->rank, &one, os,
                             CUDA_R_32F, ldo, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
        }
        if (s != CUBLAS_STATUS_SUCCESS) {
            return llm_cuda_fail(c, LLM_EBACKEND, "cuda: lora: segment %d:"
                                 " cublasGemmEx: %s", i,
                                 cublasGetStatusString(s));
        }
    }
    return 0;
}
