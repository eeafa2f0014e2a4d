/* The multi-LoRA op of one decode step on any backend (lora_step.h). */
#include "lora_step.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/common.h"
#include "kernels/dtype.h"

enum { GROUPS = 4 };


static int
dbl_cmp(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;

    return x < y ? -1 : x > y;
}


/* A tensor of f32 values v (or zeros) on be; -1 if it cannot be made. */
static int
put_f32(llm_backend *be, llm_tensor *t, int64_t cols, int64_t rows,
        float v)
{
    size_t  n = (size_t) cols * (size_t) rows, i;
    float  *h;
    int     rc;

    if (llm_tensor_alloc(be, t, LLM_F32, cols, rows) != 0) {
        return -1;
    }
    h = malloc(n * sizeof(float));
    if (h == NULL) {
        return -1;
    }
    for (i = 0; i < n; i++) {
        h[i] = v * (float) ((i * 2654435761u) % 1000) / 1000.0f;
    }
    rc = be->ops->upload(be, t->data, h, n * sizeof(float));
    free(h);
    return rc;
}


int
llm_bench_lora_step(llm_backend *be, int type, const llm_lora_step_shape *sh,
                    int passes, llm_lora_step_result *res)
{
    const int      in[GROUPS] = { sh->dim, sh->q_dim, sh->dim, sh->ffn };
    const int      n_out[GROUPS] = { 3, 1, 2, 1 };
    const int      od[GROUPS][3] = { { sh->q_dim, sh->kv_dim, sh->kv_dim },
                                     { sh->dim }, { sh->ffn, sh->ffn },
                                     { sh->dim } };
    int            S = sh->n_adapters, L = sh->n_layers, wide, l, g, j, s, p;
    int            R = sh->rows > 0 ? sh->rows : 1;
    size_t         esz = type == LLM_F32 ? 4 : type == LLM_F16 ? 2 : 1;
    llm_lora_seg **segs;
    llm_tensor     x, o[3];
    double        *t;
    int            rc = -1;

    memset(&x, 0, sizeof(x));
    memset(o, 0, sizeof(o));
    wide = sh->ffn > sh->dim ? sh->ffn : sh->dim;
    wide = sh->q_dim > wide ? sh->q_dim : wide;
    memset(res, 0, sizeof(*res));
    segs = calloc((size_t) L * GROUPS, sizeof(*segs));
    t = calloc((size_t) (passes > 0 ? passes : 1), sizeof(double));
    if (segs == NULL || t == NULL
        || put_f32(be, &x, wide, S * R, 0.1f) != 0)
    {
        goto done;
    }
    for (j = 0; j < 3; j++) {
        if (put_f32(be, &o[j], wide, S * R, 0.0f) != 0) {
            goto done;
        }
    }
    for (l = 0; l < L; l++) {
        for (g = 0; g < GROUPS; g++) {
            llm_lora_seg *gs = calloc((size_t) S * 3, sizeof(*gs));

            segs[l * GROUPS + g] = gs;
            if (gs == NULL) {
                goto done;
            }
            for (j = 0; j < n_out[g]; j++) {
                for (s = 0; s < S; s++) {
                    llm_lora_seg *sg = &gs[j * S + s];
                    int           r = s % 2 ? 16 : 8;
                    size_t        na = (size_t) r * in[g] * esz;
                    size_t        nb = (size_t) r * od[g][j] * esz;
                    size_t        bo = (na + 63) / 64 * 64;
                    size_t        so = (bo + nb + 63) / 64 * 64;
                    size_t        bytes = so + 8 * (size_t) r, i;
                    uint8_t      *h = malloc(bytes);
                    void         *d = be->ops->alloc(be, bytes);

                    sg->a = d;              /* released at the end */
                    if (h == NULL || d == NULL) {
                        free(h);
                        goto done;
                    }
                    for (i = 0; i < bytes; i++) {
                        /* small f32/f16 values, or int8 ones */
                        h[i] = esz == 1 ? (uint8_t) (i % 61) - 30
                                        : i % 2 ? 0x20 : (uint8_t) i;
                    }
                    for (i = 0; i < 2 * (size_t) r; i++) {
                        float sc = 1.0f / 512;

                        memcpy(h + so + i * 4, &sc, 4);
                    }
                    if (be->ops->upload(be, d, h, bytes) != 0) {
                        free(h);
                        goto done;
                    }
                    free(h);
                    sg->first = s * R;
                    sg->n = R;
                    sg->rank = r;
                    sg->scale = 0.5f;
                    sg->b = (uint8_t *) d + bo;
                    if (type == LLM_LORA_I8) {
                        sg->a_scale = (const float *) ((uint8_t *) d + so);
                        sg->b_scale = sg->a_scale + r;
                    }
                    sg->type = type;
                    sg->out = j;
                    res->bytes += (double) (na + nb);
                    res->flops += 2.0 * R * r * (in[g] + od[g][j]);
                }
            }
        }
    }

    for (p = -1; p < passes; p++) {
        double t0 = (double) llm_now_ns() * 1e-9;

        for (l = 0; l < L; l++) {
            for (g = 0; g < GROUPS; g++) {
                llm_tensor  xv = llm_tensor_rows(&x, 0, S * R), ov[3];
                llm_tensor *outs[3];

                xv.ne[0] = in[g];
                for (j = 0; j < n_out[g]; j++) {
                    ov[j] = llm_tensor_rows(&o[j], 0, S * R);
                    ov[j].ne[0] = od[g][j];
                    outs[j] = &ov[j];
                }
                if (be->ops->lora(be, outs, n_out[g], &xv,
                                  segs[l * GROUPS + g], S * n_out[g]) != 0)
                {
                    goto done;
                }
            }
        }
        if (be->ops->synchronize != NULL && be->ops->synchronize(be) != 0) {
            goto done;
        }
        if (p >= 0) {
            t[p] = (double) llm_now_ns() * 1e-9 - t0;
        }
    }
    qsort(t, (size_t) passes, sizeof(double), dbl_cmp);
    res->best_s = passes > 0 ? t[0] : 0;
    res->median_s = passes > 0 ? t[passes / 2] : 0;
    rc = 0;

done:
    if (rc != 0) {
        printf("  lora step: %s\n", llm_backend_error(be));
    }
    for (l = 0; segs != NULL && l < L * GROUPS; l++) {
        if (segs[l] == NULL) {
            continue;
        }
        for (j = 0; j < S * 3; j++) {
            if (segs[l][j].a != NULL) {
                be->ops->release(be, (void *) segs[l][j].a);
            }
        }
        free(segs[l]);
    }
    free(segs);
    free(t);
    llm_tensor_release(be, &x);
    for (j = 0; j < 3; j++) {
        llm_tensor_release(be, &o[j]);
    }
    return rc;
}
