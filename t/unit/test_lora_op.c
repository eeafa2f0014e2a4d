/*
 * The CPU backend's segmented multi-LoRA op (kernels/cpu/lora.c and
 * lora_avx512.c) against a naive double-precision reference:
 *
 *     out[t] += scale * (x[t] A^T) B^T      for the rows of each segment
 *
 * for f32 and f16 weights, ranks 1 to 256, dimensions that are and are
 * not multiples of the vector width, one row per segment (decoding with
 * many adapters) and many (prefill), padded row strides, rows outside
 * every segment left alone; on the portable kernels and on the AVX-512
 * ones where the CPU has them.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/common.h"
#include "kernels/backend.h"
#include "test.h"


typedef struct {
    int     first, n, rank;
    float   scale;
} op_seg;


static uint64_t op_rng = 0x243f6a8885a308d3ull;


/* Test names live until the runner prints them (at the next test()). */
static char *
op_name(const char *fmt, const char *isa, const char *type)
{
    static char names[32][160];
    static int  next;
    char       *n = names[next++ % 32];

    snprintf(n, sizeof(names[0]), fmt, isa, type);
    return n;
}


static float
op_rand(void)
{
    op_rng ^= op_rng << 13;
    op_rng ^= op_rng >> 7;
    op_rng ^= op_rng << 17;
    return (float) ((op_rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}


/* An f32 tensor of rows x cols, rows stride floats apart. */
static llm_tensor
op_tensor(float *data, int64_t cols, int64_t rows, size_t stride)
{
    llm_tensor t = llm_tensor_of(data, LLM_F32, cols, rows);

    t.nb = stride * sizeof(float);
    return t;
}


/* The op with one output (every segment's out = 0). */
static int
lora1(llm_backend *be, llm_tensor *out, const llm_tensor *x,
      llm_lora_seg *segs, int n_segs)
{
    llm_tensor *outs[] = { out };
    int         i;

    for (i = 0; i < n_segs; i++) {
        segs[i].out = 0;
    }
    return be->ops->lora(be, outs, 1, x, segs, n_segs);
}


/* Weights as the backend stores them, and as the reference reads them. */
static void *
make_weights(int type, size_t n, float *exact)
{
    size_t    i;
    void     *w = malloc(n * (type == LLM_F16 ? 2 : 4));
    uint16_t *h = w;
    float    *f = w;

    for (i = 0; i < n; i++) {
        float v = op_rand() * 0.25f;

        if (type == LLM_F16) {
            h[i] = llm_f32_to_f16(v);
            exact[i] = llm_f16_to_f32(h[i]);
        } else {
            f[i] = v;
            exact[i] = v;
        }
    }
    return w;
}


/* B [od, rank] for the reference; stored [rank, od] when f16 (B^T, as
 * the adapter pool packs it for this backend). */
static void *
make_weights_b(int type, int od, int rank, float *exact)
{
    void     *w = make_weights(type, (size_t) od * rank, exact);
    uint16_t *h = w, *t;
    int       o, j;

    if (type != LLM_F16) {
        return w;
    }
    t = malloc((size_t) od * rank * 2);
    for (o = 0; o < od; o++) {
        for (j = 0; j < rank; j++) {
            t[(size_t) j * od + o] = h[(size_t) o * rank + j];
        }
    }
    free(w);
    return t;
}


/* int8 rows [rows, cols] and their f32 scales after them (at a multiple
 * of 4 bytes), as LLM_LORA_I8 stores A and B^T; exact[r * cols + c] or,
 * with tr, exact[c * rows + r] (B's own layout) = scale[r] * int8. */
static void *
make_weights_i8(int rows, int cols, int tr, float *exact, float **scales)
{
    size_t  qb = ((size_t) rows * cols + 3) / 4 * 4;
    int8_t *q = malloc(qb + sizeof(float) * rows);
    float  *sc = (float *) ((uint8_t *) q + qb);
    int     r, c;

    for (r = 0; r < rows; r++) {
        sc[r] = (0.5f + 0.5f * (op_rand() + 1.0f)) / 256.0f;
        for (c = 0; c < cols; c++) {
            int8_t v = (int8_t) (op_rand() * 127.0f);

            q[(size_t) r * cols + c] = v;
            exact[tr ? (size_t) c * rows + r : (size_t) r * cols + c] =
                sc[r] * (float) v;
        }
    }
    *scales = sc;
    return q;
}


/*
 * One call of the op: rows T, dims in -> od, the segments given; x and
 * out rows padded by pad floats.  Returns the worst error relative to the
 * largest |delta| of the reference, or a negative number if the op
 * failed or touched a row outside the segments.
 */
static double
run_case(llm_backend *be, int type, int T, int in, int od, const op_seg *sg,
         int n_segs, int pad)
{
    llm_lora_seg *segs = calloc((size_t) n_segs, sizeof(llm_lora_seg));
    void        **wa = calloc((size_t) n_segs, sizeof(void *));
    void        **wb = calloc((size_t) n_segs, sizeof(void *));
    float       **ea = calloc((size_t) n_segs, sizeof(float *));
    float       **eb = calloc((size_t) n_segs, sizeof(float *));
    size_t        xs = (size_t) in + pad, os = (size_t) od + pad;
    float        *x = malloc(sizeof(float) * T * xs);
    float        *o = malloc(sizeof(float) * T * os);
    double       *ref = malloc(sizeof(double) * T * od);
    double       *mid = malloc(sizeof(double) * 256);
    float        *out0 = malloc(sizeof(float) * T * os);
    llm_tensor    xt, ot;
    double        dmax = 0, rmax = 0;
    int           s, t, i, j, inside, rc;

    for (i = 0; i < T * (int) xs; i++) {
        x[i] = op_rand();
    }
    for (i = 0; i < T * (int) os; i++) {
        o[i] = op_rand();
    }
    memcpy(out0, o, sizeof(float) * T * os);
    for (t = 0; t < T; t++) {
        for (j = 0; j < od; j++) {
            ref[t * od + j] = o[t * os + j];
        }
    }
    for (s = 0; s < n_segs; s++) {
        ea[s] = malloc(sizeof(float) * sg[s].rank * in);
        eb[s] = malloc(sizeof(float) * od * sg[s].rank);
        if (type == LLM_LORA_I8) {
            float *as, *bs;

            wa[s] = make_weights_i8(sg[s].rank, in, 0, ea[s], &as);
            wb[s] = make_weights_i8(sg[s].rank, od, 1, eb[s], &bs);
            segs[s].a_scale = as;
            segs[s].b_scale = bs;
        } else {
            wa[s] = make_weights(type, (size_t) sg[s].rank * in, ea[s]);
            wb[s] = make_weights_b(type, od, sg[s].rank, eb[s]);
        }
        segs[s].first = sg[s].first;
        segs[s].n = sg[s].n;
        segs[s].rank = sg[s].rank;
        segs[s].scale = sg[s].scale;
        segs[s].a = wa[s];      /* CPU backend addresses are host memory */
        segs[s].b = wb[s];
        segs[s].type = type;
        for (t = sg[s].first; t < sg[s].first + sg[s].n; t++) {
            for (i = 0; i < sg[s].rank; i++) {
                mid[i] = 0;
                for (j = 0; j < in; j++) {
                    mid[i] += (double) x[t * xs + j] * ea[s][i * in + j];
                }
            }
            for (j = 0; j < od; j++) {
                double acc = 0;

                for (i = 0; i < sg[s].rank; i++) {
                    acc += mid[i] * eb[s][j * sg[s].rank + i];
                }
                ref[t * od + j] += sg[s].scale * acc;
            }
        }
    }

    xt = op_tensor(x, in, T, xs);
    ot = xt;
    ot.data = o;
    ot.ne[0] = od;
    ot.nb = os * sizeof(float);
    rc = lora1(be, &ot, &xt, segs, n_segs);

    for (t = 0; rc == 0 && t < T; t++) {
        inside = 0;
        for (s = 0; s < n_segs; s++) {
            inside |= t >= sg[s].first && t < sg[s].first + sg[s].n;
        }
        for (j = 0; j < (int) os; j++) {
            if (!inside || j >= od) {
                /* rows outside the segments and row padding: untouched */
                if (o[t * os + j] != out0[t * os + j]) {
                    rc = -1;
                }
                continue;
            }
            dmax = fmax(dmax, fabs(o[t * os + j] - ref[t * od + j]));
            rmax = fmax(rmax, fabs(ref[t * od + j] - out0[t * os + j]));
        }
    }
    for (s = 0; s < n_segs; s++) {
        free(wa[s]);
        free(wb[s]);
        free(ea[s]);
        free(eb[s]);
    }
    free(segs); free(wa); free(wb); free(ea); free(eb);
    free(x); free(o); free(ref); free(mid); free(out0);
    if (rc != 0) {
        return -1;
    }
    return rmax > 0 ? dmax / rmax : dmax;
}


static void
op_cases(const char *isa)
{
    static const op_seg mixed[3] = {
        { 0, 13, 8, 0.5f }, { 13, 10, 16, 1.5f }, { 30, 7, 4, 2.0f } };
    static const op_seg odd[4] = {
        { 1, 1, 1, 1.0f }, { 3, 5, 3, -0.7f }, { 9, 2, 17, 0.3f },
        { 12, 4, 33, 2.5f } };
    static const op_seg big[1] = { { 0, 2, 256, 0.125f } };
    op_seg      dec[32];
    llm_backend *be;
    llm_err     err = { 0, "" };
    int         types[3] = { LLM_F32, LLM_F16, LLM_LORA_I8 }, k, i;
    double      e;

    setenv("LLM_CPU_ISA", isa, 1);
    be = llm_backend_cpu_new(2, &err);
    unsetenv("LLM_CPU_ISA");
    test(op_name("%s: backend with the lora op%s", isa, ""));
    test_cond(be != NULL && be->ops->lora != NULL && be->ops->lora_f16
              && be->ops->lora_i8);
    if (be == NULL) {
        return;
    }
    for (i = 0; i < 32; i++) {
        dec[i].first = i;
        dec[i].n = 1;
        dec[i].rank = i % 2 ? 16 : 8;
        dec[i].scale = 0.25f * (1 + i % 3);
    }

    for (k = 0; k < 3; k++) {
        const char *tn = types[k] == LLM_F16 ? "f16"
                         : types[k] == LLM_LORA_I8 ? "int8" : "f32";

        test(op_name("%s %s: 3 segments, ranks 8/16/4, 576 -> 192, a row "
                     "between segments", isa, tn));
        e = run_case(be, types[k], 40, 576, 192, mixed, 3, 0);
        test_cond(e >= 0 && e < 2e-5);

        test(op_name("%s %s: ranks 1/3/17/33, 100 -> 37 (vector tails), "
                     "padded rows", isa, tn));
        e = run_case(be, types[k], 17, 100, 37, odd, 4, 5);
        test_cond(e >= 0 && e < 2e-5);

        test(op_name("%s %s: rank 256, 64 -> 300", isa, tn));
        e = run_case(be, types[k], 2, 64, 300, big, 1, 0);
        test_cond(e >= 0 && e < 2e-5);

        test(op_name("%s %s: decoding, 32 adapters of one row each, ranks "
                     "8/16, 576 -> 1536 and 1536 -> 576", isa, tn));
        e = run_case(be, types[k], 32, 576, 1536, dec, 32, 0);
        test_cond(e >= 0 && e < 2e-5);
        e = run_case(be, types[k], 32, 1536, 576, dec, 32, 3);
        test_cond(e >= 0 && e < 2e-5);
    }

    test(op_name("%s: a row gets the same bits alone, in a longer "
                 "segment, or beside other segments%s", isa, ""));
    for (k = 0; k < 2; k++) {
        enum { R = 6, IN = 200, OD = 70, RK = 24 };
        static float  xa[R * IN], oa[R * OD], ob[R * OD], oc[R * OD];
        static float  ex[RK * IN];
        void         *wa2, *wb2;
        llm_tensor    xt, ot;
        llm_lora_seg  sg[R];
        int           r, ok = 1;

        for (i = 0; i < R * IN; i++) {
            xa[i] = op_rand();
        }
        wa2 = make_weights(types[k], RK * IN, ex);
        wb2 = make_weights_b(types[k], OD, RK, ex);
        for (i = 0; i < R * OD; i++) {
            oa[i] = ob[i] = oc[i] = op_rand();
        }
        xt = op_tensor(xa, IN, R, IN);
        ot = xt;
        ot.ne[0] = OD;
        ot.nb = OD * sizeof(float);
        memset(sg, 0, sizeof(sg));
        /* one segment of every row */
        sg[0].first = 0;
        sg[0].n = R;
        sg[0].rank = RK;
        sg[0].scale = 0.75f;
        sg[0].a = wa2;
        sg[0].b = wb2;
        sg[0].type = types[k];
        ot.data = oa;
        ok &= lora1(be, &ot, &xt, sg, 1) == 0;
        /* one segment per row, one call */
        for (r = 0; r < R; r++) {
            sg[r] = sg[0];
            sg[r].first = r;
            sg[r].n = 1;
        }
        ot.data = ob;
        ok &= lora1(be, &ot, &xt, sg, R) == 0;
        /* each row alone */
        ot.data = oc;
        for (r = 0; r < R; r++) {
            ok &= lora1(be, &ot, &xt, &sg[r], 1) == 0;
        }
        ok &= memcmp(oa, ob, sizeof(oa)) == 0
              && memcmp(oa, oc, sizeof(oa)) == 0;
        test_cond(ok);
        free(wa2);
        free(wb2);
    }

    test(op_name("%s: one call for q, k, v (576, 192, 192 wide) gives the "
                 "bits of a call per output%s", isa, ""));
    for (k = 0; k < 2; k++) {
        enum { R = 9, IN = 576, NS = 4 };
        static const int  od[3] = { 576, 192, 192 };
        static float      xa[R * IN], og[3][R * 576], os[3][R * 576];
        static float      ex[16 * 576];
        void             *wa[3][NS], *wb[3][NS];
        llm_tensor        xt, ot[3], *outs[3];
        llm_lora_seg      sg[3 * NS], one[NS];
        int               j, s, n = 0, ok = 1;

        for (i = 0; i < R * IN; i++) {
            xa[i] = op_rand();
        }
        xt = op_tensor(xa, IN, R, IN);
        memset(sg, 0, sizeof(sg));
        for (j = 0; j < 3; j++) {
            for (i = 0; i < R * od[j]; i++) {
                og[j][i] = os[j][i] = op_rand();
            }
            ot[j] = xt;
            ot[j].ne[0] = od[j];
            ot[j].nb = (size_t) od[j] * sizeof(float);
            outs[j] = &ot[j];
            /* rows 0-2 one adapter, 3-4, 5, 6-8 others (v skips 5) */
            for (s = 0; s < NS; s++) {
                static const int first[NS] = { 0, 3, 5, 6 };
                static const int rows[NS] = { 3, 2, 1, 3 };

                if (j == 2 && s == 2) {
                    wa[j][s] = wb[j][s] = NULL;
                    continue;
                }
                wa[j][s] = make_weights(types[k], 16 * IN, ex);
                wb[j][s] = make_weights_b(types[k], od[j], 4 + 4 * s, ex);
                sg[n].first = first[s];
                sg[n].n = rows[s];
                sg[n].rank = 4 + 4 * s;
                sg[n].scale = 0.5f + j;
                sg[n].a = wa[j][s];
                sg[n].b = wb[j][s];
                sg[n].type = types[k];
                sg[n].out = j;
                n++;
            }
        }
        for (j = 0; j < 3; j++) {
            ot[j].data = og[j];
        }
        ok &= be->ops->lora(be, outs, 3, &xt, sg, n) == 0;
        for (j = 0, s = 0; j < 3; j++) {
            int m = 0;

            ot[j].data = os[j];
            while (s < n && sg[s].out == j) {
                one[m++] = sg[s++];
            }
            ok &= lora1(be, &ot[j], &xt, one, m) == 0;
            ok &= memcmp(og[j], os[j], sizeof(float) * R * od[j]) == 0;
        }
        test_cond(ok);
        sg[0].out = 3;
        test_cond(be->ops->lora(be, outs, 3, &xt, sg, n) == LLM_EINVAL);
        for (j = 0; j < 3; j++) {
            for (s = 0; s < NS; s++) {
                free(wa[j][s]);
                free(wb[j][s]);
            }
        }
    }

    test(op_name("%s: bad segments are refused%s", isa, ""));
    {
        float        x[4 * 16], o[4 * 8], w[64];
        llm_tensor   xt, ot;
        llm_lora_seg sg;

        memset(x, 0, sizeof(x));
        memset(o, 0, sizeof(o));
        memset(w, 0, sizeof(w));
        xt = op_tensor(x, 16, 4, 16);
        ot = xt;
        ot.data = o;
        ot.ne[0] = 8;
        ot.nb = 8 * sizeof(float);
        memset(&sg, 0, sizeof(sg));
        sg.n = 1;
        sg.rank = 2;
        sg.scale = 1;
        sg.a = w;
        sg.b = w;
        test_cond(lora1(be, &ot, &xt, &sg, 1) == 0);
        sg.type = LLM_BF16;
        test_cond(lora1(be, &ot, &xt, &sg, 1) == LLM_EINVAL);
        sg.type = LLM_F32;
        sg.first = 3;
        sg.n = 2;
        test_cond(lora1(be, &ot, &xt, &sg, 1) == LLM_EINVAL);
        sg.first = 0;
        sg.rank = 0;
        test_cond(lora1(be, &ot, &xt, &sg, 1) == LLM_EINVAL);
        sg.rank = 2;
        sg.b = NULL;
        test_cond(lora1(be, &ot, &xt, &sg, 1) == LLM_EINVAL);
        test_cond(strstr(llm_backend_error(be), "segment") != NULL);
    }
    be->ops->free(be);
}


TEST_SUITE(lora_op)
{
    op_cases("scalar");
    op_cases("avx512");     /* capped at what the CPU has */
}
