/*
 * Matrix products out = x W^T (+ bias), f32 accumulation throughout.
 *
 *   - Weights are F32, F16 or BF16 on the device; a block-quantized W is
 *     read through its dense F16/BF16 copy (llm_cuda_weight_view).
 *   - A few activation rows (decode): a GEMV kernel, one warp per output
 *     feature, streaming W once with 16-byte loads; x stays f32.
 *   - More rows: cuBLAS.  F32 weights: cublasGemmEx all-f32 with
 *     CUBLAS_COMPUTE_32F (no TF32).  F16/BF16 weights: x is rounded to
 *     the weight's type in a scratch buffer (tensor cores take equal
 *     input types), f32 output and CUBLAS_COMPUTE_32F.  A bias is written
 *     into out first and added through beta = 1.
 *
 * cuBLAS is column-major: out [n, m] row-major is C [m, n] column-major,
 * W [m, k] row-major is A [k, m] with op T, x [n, k] is B [k, n] with
 * op N, so C = A^T B.
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "matmul.cuh"


template <typename W>
static cudaError_t
gemv_dispatch(const llm_cuda_gemv_parts *parts, const float *x, size_t x_nb,
              int n, int k, cudaStream_t stream)
{
    unsigned blocks = (unsigned) ((parts->rows + GEMV_THREADS / 32 - 1)
                                  / (GEMV_THREADS / 32));

    switch (n) {
    case 1:
        gemv_kernel<W, 1><<<blocks, GEMV_THREADS, 0, stream>>>(
            *parts, x, x_nb, n, k);
        break;
    case 2:
        gemv_kernel<W, 2><<<blocks, GEMV_THREADS, 0, stream>>>(
            *parts, x, x_nb, n, k);
        break;
    case 3:
    case 4:
        gemv_kernel<W, 4><<<blocks, GEMV_THREADS, 0, stream>>>(
            *parts, x, x_nb, n, k);
        break;
    default:
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}


/* The GEMV of parts (all of w_type) with one x. */
static cudaError_t
launch_gemv_parts(const llm_cuda_gemv_parts *parts, int w_type,
                  const float *x, size_t x_nb, int n, int k,
                  cudaStream_t stream)
{
    int i;

    CUDA_CHECK_ARG(n >= 0 && n <= LLM_CUDA_GEMV_MAX_ROWS && k >= 0
                   && parts->n_parts >= 1
                   && parts->n_parts <= GEMV_MAX_PARTS);
    if (n == 0 || parts->rows == 0) {
        return cudaSuccess;
    }
    /* 16-byte loads of 8 elements */
    CUDA_CHECK_ARG(x != NULL && k % 8 == 0 && (uintptr_t) x % 16 == 0
                   && (n == 1 || x_nb % 16 == 0));
    for (i = 0; i < parts->n_parts; i++) {
        const llm_cuda_gemv_part *p = &parts->p[i];

        CUDA_CHECK_ARG(p->m >= 0 && (p->m == 0 || (p->out != NULL
                                                   && p->w != NULL))
                       && (uintptr_t) p->w % 16 == 0 && p->w_nb % 16 == 0
                       && p->row0 == (i == 0 ? 0 : parts->p[i - 1].row0
                                                   + parts->p[i - 1].m));
    }
    switch (w_type) {
    case LLM_F32:
        return gemv_dispatch<float>(parts, x, x_nb, n, k, stream);
    case LLM_F16:
        return gemv_dispatch<__half>(parts, x, x_nb, n, k, stream);
    case LLM_BF16:
        return gemv_dispatch<__nv_bfloat16>(parts, x, x_nb, n, k, stream);
    default:
        return cudaErrorNotSupported;
    }
}


cudaError_t
launch_gemv(float *out, size_t out_nb, const float *x, size_t x_nb,
            const void *w, int w_type, size_t w_nb, const float *bias, int n,
            int k, int m, cudaStream_t stream)
{
    llm_cuda_gemv_parts parts;

    CUDA_CHECK_ARG(m >= 0);
    memset(&parts, 0, sizeof(parts));
    parts.n_parts = 1;
    parts.rows = m;
    parts.p[0].out = out;
    parts.p[0].out_nb = out_nb;
    parts.p[0].w = w;
    parts.p[0].w_nb = w_nb;
    parts.p[0].bias = bias;
    parts.p[0].m = m;
    return launch_gemv_parts(&parts, w_type, x, x_nb, n, k, stream);
}


/* ------------------------------------------------------------ the op */

static int
blas_check(llm_cuda_ctx *c, cublasStatus_t s, const char *what)
{
    if (s == CUBLAS_STATUS_SUCCESS) {
        return 0;
    }
    return llm_cuda_fail(c, s == CUBLAS_STATUS_NOT_SUPPORTED ? LLM_EUNSUP
                                                           : LLM_EBACKEND,
                         "cuda: matmul: %s: %s", what,
                         cublasGetStatusString(s));
}


/* x as cuBLAS reads it for weights of w_type: x itself for F32, else x
 * rounded to the weights' 16-bit type in the scratch buffer (tensor cores
 * take equal input types).  Made once for all the products of one x. */
typedef struct gemm_x {
    const void     *b;
    int             ldb;
    cudaDataType    type;
} gemm_x;


static int
gemm_x_prepare(llm_cuda_ctx *c, const llm_tensor *x, int w_type, int n,
               int k, gemm_x *gx)
{
    void *xs;
    int   rc;

    if (w_type == LLM_F32) {
        gx->b = x->data;
        gx->ldb = (int) (x->nb / 4);
        gx->ldb = n == 1 && gx->ldb < k ? k : gx->ldb;
        gx->type = CUDA_R_32F;
        return 0;
    }
    xs = llm_cuda_buf_get(c, &c->mm_scratch, (size_t) n * (size_t) k * 2,
                          "matmul");
    if (xs == NULL) {
        return LLM_ENOMEM;
    }
    if ((rc = llm_cuda_check(c, launch_convert_rows(xs, w_type,
                                                    (const float *) x->data,
                                                    x->nb, n, k, c->stream),
                             "matmul", "convert activations")) != 0)
    {
        return rc;
    }
    gx->b = xs;
    gx->ldb = k;
    gx->type = w_type == LLM_F16 ? CUDA_R_16F : CUDA_R_16BF;
    return 0;
}


static int
gemm_cublas(llm_cuda_ctx *c, llm_tensor *out, const gemm_x *gx,
            const llm_tensor *w, const float *bias, int n, int k, int m)
{
    const float  one = 1.0f;
    float        beta = 0.0f;
    size_t       es = w->type == LLM_F32 ? 4 : 2;
    int          lda, ldc, rc;

    if (w->nb % es != 0 || w->nb / es < (size_t) k
        || w->nb / es > (size_t) INT32_MAX)
    {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: matmul: weight rows of"
                             " %zu bytes", w->nb);
    }
    lda = (int) (w->nb / es);
    ldc = (int) (out->nb / 4);
    ldc = n == 1 && ldc < m ? m : ldc;

    if (bias != NULL) {
        if ((rc = llm_cuda_check(c, launch_fill_rows((float *) out->data,
                                                     out->nb, bias, n, m,
                                                     c->stream),
                                 "matmul", "bias")) != 0)
        {
            return rc;
        }
        beta = 1.0f;
    }
    return blas_check(c, cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N,
                                      m, n, k, &one, w->data, gx->type, lda,
                                      gx->b, gx->type, gx->ldb, &beta,
                                      out->data, CUDA_R_32F, ldc,
                                      CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx");
}


/* The checks of out = x w^T (+ bias), as the CPU backend makes them;
 * *bp: the bias or NULL. */
static int
mm_check(llm_cuda_ctx *c, const llm_tensor *out, const llm_tensor *x,
         const llm_tensor *w, const llm_tensor *bias, const float **bp)
{
    const llm_dtype_info *ti;
    int64_t               k, m, n;
    int                   rc;

    *bp = NULL;
    if ((rc = llm_cuda_check_f32(c, x, "matmul", "x", -1, -1)) != 0
        || (rc = llm_cuda_check_f32(c, out, "matmul", "out", -1, -1)) != 0)
    {
        return rc;
    }
    if (w == NULL || w->data == NULL) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: matmul: w is NULL");
    }
    k = x->ne[0];
    n = x->ne[1];
    m = w->ne[1];
    if (w->ne[0] != k || out->ne[0] != m || out->ne[1] != n
        || m > INT32_MAX)
    {
        return llm_cuda_fail(c, LLM_EINVAL,
                             "cuda: matmul: shapes x [%lld, %lld] w [%lld,"
                             " %lld] out [%lld, %lld] do not match",
                             (long long) n, (long long) k,
                             (long long) w->ne[1], (long long) w->ne[0],
                             (long long) out->ne[1], (long long) out->ne[0]);
    }
    ti = llm_dtype_get(w->type);
    if (ti == NULL || (!ti->is_quant && w->type != LLM_F32
                       && w->type != LLM_F16 && w->type != LLM_BF16))
    {
        return llm_cuda_fail(c, LLM_EUNSUP, "cuda: matmul: weight type %d"
                             " not supported", w->type);
    }
    if (llm_row_bytes(w->type, k) == 0 || w->nb < llm_row_bytes(w->type, k)) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: matmul: weight rows of"
                             " %lld elements do not fit type %s",
                             (long long) k, ti->name);
    }
    if (bias != NULL && bias->data != NULL) {
        if (bias->type != LLM_F32 || bias->ne[0] != m) {
            return llm_cuda_fail(c, LLM_EINVAL, "cuda: matmul: bias must be"
                                 " [%lld] F32", (long long) m);
        }
        *bp = (const float *) bias->data;
    }
    return 0;
}


/* Whether the GEMV kernel takes x and the weight view wv. */
static int
gemv_fits(const llm_tensor *x, const llm_tensor *wv)
{
    return x->ne[1] <= LLM_CUDA_GEMV_MAX_ROWS && x->ne[0] % 8 == 0
           && (uintptr_t) x->data % 16 == 0
           && (x->ne[1] == 1 || x->nb % 16 == 0)
           && (uintptr_t) wv->data % 16 == 0 && wv->nb % 16 == 0;
}


int
llm_cuda_matmul(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *x,
                const llm_tensor *w, const llm_tensor *bias)
{
    const float *bp;
    llm_tensor   wv;
    int64_t      k, m, n;
    int          rc;

    if ((rc = mm_check(c, out, x, w, bias, &bp)) != 0) {
        return rc;
    }
    k = x->ne[0];
    n = x->ne[1];
    m = w->ne[1];
    if (n == 0 || m == 0) {
        return 0;
    }
    if (k == 0) {
        return llm_cuda_check(c, launch_fill_rows((float *) out->data,
                                                  out->nb, bp, (int) n,
                                                  (int) m, c->stream),
                              "matmul", "launch");
    }
    if ((rc = llm_cuda_weight_view(c, w, &wv, "matmul")) != 0) {
        return rc;
    }
    if (gemv_fits(x, &wv)) {
        return llm_cuda_check(c, launch_gemv((float *) out->data, out->nb,
                                             (const float *) x->data,
                                             x->nb, wv.data,
                                             wv.type, wv.nb, bp, (int) n,
                                             (int) k, (int) m, c->stream),
                              "matmul", "gemv");
    }
    {
        gemm_x gx;

        if ((rc = gemm_x_prepare(c, x, wv.type, (int) n, (int) k, &gx))
            != 0)
        {
            return rc;
        }
        return gemm_cublas(c, out, &gx, &wv, bp, (int) n, (int) k, (int) m);
    }
}


/* The products of one x with weights of one type: for a few rows one
 * GEMV launch for them all, else x converted once for cuBLAS; with mixed
 * types, a matmul each. */
int
llm_cuda_matmul_n(llm_cuda_ctx *c, llm_tensor *const *outs,
                  const llm_tensor *x, const llm_tensor *const *ws,
                  const llm_tensor *const *biases, int n)
{
    llm_cuda_gemv_parts parts;
    const float        *bp[GEMV_MAX_PARTS];
    llm_tensor          wv[GEMV_MAX_PARTS];
    int                 i, rc, type = -1, same = 1, gemv = 1;

    if (n < 1 || n > GEMV_MAX_PARTS || outs == NULL || ws == NULL) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: matmul_n: %d products "
                             "(1 to %d)", n, GEMV_MAX_PARTS);
    }
    memset(&parts, 0, sizeof(parts));
    for (i = 0; i < n; i++) {
        if ((rc = mm_check(c, outs[i], x, ws[i], biases ? biases[i] : NULL,
                           &bp[i])) != 0)
        {
            return rc;
        }
        if (x->ne[0] == 0 || x->ne[1] == 0 || ws[i]->ne[1] == 0) {
            same = 0;                   /* the corner cases: matmul's */
            continue;
        }
        if ((rc = llm_cuda_weight_view(c, ws[i], &wv[i], "matmul")) != 0) {
            return rc;
        }
        same = same && (i == 0 || wv[i].type == type);
        gemv = gemv && gemv_fits(x, &wv[i]);
        type = wv[i].type;
        parts.p[i].out = (float *) outs[i]->data;
        parts.p[i].out_nb = outs[i]->nb;
        parts.p[i].w = wv[i].data;
        parts.p[i].w_nb = wv[i].nb;
        parts.p[i].bias = bp[i];
        parts.p[i].m = (int) ws[i]->ne[1];
        parts.p[i].row0 = parts.rows;
        parts.rows += parts.p[i].m;
    }
    if (!same) {
        for (i = 0; i < n; i++) {
            rc = llm_cuda_matmul(c, outs[i], x, ws[i],
                                 biases ? biases[i] : NULL);
            if (rc != 0) {
                return rc;
            }
        }
        return 0;
    }
    if (gemv) {
        parts.n_parts = n;
        return llm_cuda_check(c, launch_gemv_parts(&parts, type,
                                                   (const float *) x->data,
                                                   x->nb, (int) x->ne[1],
                                                   (int) x->ne[0], c->stream),
                              "matmul", "gemv");
    }
    {
        gemm_x gx;

        if ((rc = gemm_x_prepare(c, x, type, (int) x->ne[1], (int) x->ne[0],
                                 &gx)) != 0)
        {
            return rc;
        }
        for (i = 0; i < n; i++) {
            rc = gemm_cublas(c, outs[i], &gx, &wv[i], bp[i], (int) x->ne[1],
                             (int) x->ne[0], (int) ws[i]->ne[1]);
            if (rc != 0) {
                return rc;
            }
        }
    }
    return 0;
}
