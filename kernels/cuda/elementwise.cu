/*
 * Row-wise element ops: SiLU gate, residual add, the gather of the rows
 * that need logits, and the small conversions matmul uses (f32 rows to
 * F16/BF16, bias rows).  One block per row (grid.x), columns split over
 * grid.y blocks of threads for wide rows.
 */
#include "cuda_internal.cuh"
#include "device.cuh"
#include "elementwise.cuh"

static dim3
ew_grid(int rows, int cols)
{
    return dim3((unsigned) rows, (unsigned) ((cols + EW_COLS - 1) / EW_COLS),
                1);
}


cudaError_t
launch_elementwise(int op, float *out, size_t out_nb, const float *a,
                   size_t a_nb, const float *b, size_t b_nb, int rows,
                   int cols, cudaStream_t stream)
{
    CUDA_CHECK_ARG(op == 0 || op == 1);
    CUDA_CHECK_ARG(rows >= 0 && cols >= 0);
    if (rows == 0 || cols == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(out != NULL && a != NULL && b != NULL);
    ew_kernel<<<ew_grid(rows, cols), EW_THREADS, 0, stream>>>(
        op, out, out_nb, a, a_nb, b, b_nb, cols);
    return cudaGetLastError();
}


cudaError_t
launch_gather_rows(float *out, size_t out_nb, const float *x, size_t x_nb,
                   const int32_t *rows, int n, int cols, cudaStream_t stream)
{
    CUDA_CHECK_ARG(n >= 0 && cols >= 0);
    if (n == 0 || cols == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(out != NULL && x != NULL && rows != NULL);
    gather_kernel<<<ew_grid(n, cols), EW_THREADS, 0, stream>>>(
        out, out_nb, x, x_nb, rows, cols);
    return cudaGetLastError();
}


cudaError_t
launch_convert_rows(void *out, int to_type, const float *x, size_t x_nb,
                    int rows, int cols, cudaStream_t stream)
{
    CUDA_CHECK_ARG(rows >= 0 && cols >= 0);
    if (rows == 0 || cols == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(out != NULL && x != NULL);
    switch (to_type) {
    case LLM_F16:
        convert_kernel<__half><<<ew_grid(rows, cols), EW_THREADS, 0,
                                 stream>>>((__half *) out, x, x_nb, cols);
        break;
    case LLM_BF16:
        convert_kernel<__nv_bfloat16><<<ew_grid(rows, cols), EW_THREADS, 0,
                                        stream>>>((__nv_bfloat16 *) out, x,
                                                  x_nb, cols);
        break;
    default:
        return cudaErrorNotSupported;
    }
    return cudaGetLastError();
}


cudaError_t
launch_fill_rows(float *out, size_t out_nb, const float *bias, int rows,
                 int cols, cudaStream_t stream)
{
    CUDA_CHECK_ARG(rows >= 0 && cols >= 0);
    if (rows == 0 || cols == 0) {
        return cudaSuccess;
    }
    CUDA_CHECK_ARG(out != NULL);
    fill_kernel<<<ew_grid(rows, cols), EW_THREADS, 0, stream>>>(
        out, out_nb, bias, cols);
    return cudaGetLastError();
}


/* ------------------------------------------------------------ the ops */

static int
elementwise(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *a,
            const llm_tensor *b, int op, const char *name)
{
    int rc;

    if ((rc = llm_cuda_check_f32(c, a, name, op ? "a" : "gate", -1, -1)) != 0
        || (rc = llm_cuda_check_f32(c, b, name, op ? "b" : "up", a->ne[0],
                                    a->ne[1])) != 0
        || (rc = llm_cuda_check_f32(c, out, name, "out", a->ne[0],
                                    a->ne[1])) != 0)
    {
        return rc;
    }
    return llm_cuda_check(c, launch_elementwise(op, (float *) out->data,
                                                out->nb,
                                                (const float *) a->data,
                                                a->nb,
                                                (const float *) b->data,
                                                b->nb, (int) a->ne[1],
                                                (int) a->ne[0], c->stream),
                          name, "launch");
}


int
llm_cuda_silu_mul(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *gate,
                  const llm_tensor *up)
{
    return elementwise(c, out, gate, up, 0, "silu_mul");
}


int
llm_cuda_add(llm_cuda_ctx *c, llm_tensor *out, const llm_tensor *a,
             const llm_tensor *b)
{
    return elementwise(c, out, a, b, 1, "add");
}


int
llm_cuda_gather_out_rows(llm_cuda_ctx *c, llm_tensor *out,
                         const llm_tensor *x)
{
    const llm_batch *b = &c->batch;
    const uint8_t   *x0, *x1, *o0, *o1;
    size_t           row = 0;
    float           *tmp;
    int              i, rc;

    if ((rc = llm_cuda_need_batch(c, "gather_out_rows")) != 0
        || (rc = llm_cuda_check_f32(c, x, "gather_out_rows", "x", -1, -1))
           != 0
        || (rc = llm_cuda_check_f32(c, out, "gather_out_rows", "out",
                                    x->ne[0], b->n_out)) != 0)
    {
        return rc;
    }
    if (b->n_out > 0 && (b->out_rows == NULL || c->d_out_rows == NULL)) {
        return llm_cuda_fail(c, LLM_EINVAL, "cuda: gather_out_rows: no rows");
    }
    for (i = 0; i < b->n_out; i++) {
        if (b->out_rows[i] < 0 || b->out_rows[i] >= x->ne[1]) {
            return llm_cuda_fail(c, LLM_EINVAL, "cuda: gather_out_rows: row"
                                 " %d of %lld", (int) b->out_rows[i],
                                 (long long) x->ne[1]);
        }
    }
    if (b->n_out == 0 || x->ne[0] == 0) {
        return 0;
    }

    /* out overlapping x: gather into scratch first, then copy */
    row = (size_t) x->ne[0] * 4;
    x0 = (const uint8_t *) x->data;
    x1 = x0 + (size_t) (x->ne[1] - 1) * x->nb + row;
    o0 = (const uint8_t *) out->data;
    o1 = o0 + (size_t) (b->n_out - 1) * out->nb + row;
    if (o0 < x1 && x0 < o1) {
        tmp = (float *) llm_cuda_buf_get(c, &c->misc_scratch,
                                         row * (size_t) b->n_out,
                                         "gather_out_rows");
        if (tmp == NULL) {
            return LLM_ENOMEM;
        }
        if ((rc = llm_cuda_check(c, launch_gather_rows(tmp, row,
                                                       (const float *)
                                                       x->data, x->nb,
                                                       c->d_out_rows,
                                                       b->n_out,
                                                       (int) x->ne[0],
                                                       c->stream),
                                 "gather_out_rows", "launch")) != 0)
        {
            return rc;
        }
        return llm_cuda_check(c, cudaMemcpy2DAsync(out->data,
                                                   out->nb > row ? out->nb
                                                                 : row, tmp,
                                                   row, row,
                                                   (size_t) b->n_out,
                                                   cudaMemcpyDeviceToDevice,
                                                   c->stream),
                              "gather_out_rows", "copy");
    }
    return llm_cuda_check(c, launch_gather_rows((float *) out->data, out->nb,
                                                (const float *) x->data,
                                                x->nb, c->d_out_rows,
                                                b->n_out, (int) x->ne[0],
                                                c->stream),
                          "gather_out_rows", "launch");
}
