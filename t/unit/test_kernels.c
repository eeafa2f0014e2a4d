/*
 * The CPU backend's kernels against straightforward f32/double references
 * written here (dequantize, then naive loops), on random data over several
 * shapes, for every instruction-set path this CPU has (LLM_CPU_ISA forces
 * the lower ones); and the reference (de)quantization against fixtures
 * made by the gguf Python package (tools/gen_quant_fixtures.py).
 */
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "engine/common.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"


/* ------------------------------------------------------------ helpers */

static uint64_t kt_rng = 0x9e3779b97f4a7c15ull;


static uint32_t
kt_u32(void)
{
    kt_rng ^= kt_rng << 13;
    kt_rng ^= kt_rng >> 7;
    kt_rng ^= kt_rng << 17;
    return (uint32_t) (kt_rng >> 16);
}


/* uniform in [-1, 1) */
static float
kt_uni(void)
{
    return (float) (kt_u32() & 0xffffff) / 8388608.0f - 1.0f;
}


/* roughly N(0, 1) */
static float
kt_gauss(void)
{
    return (kt_uni() + kt_uni() + kt_uni()) * 1.0f;
}


static void
kt_fill(float *x, int64_t n, float scale)
{
    int64_t i;

    for (i = 0; i < n; i++) {
        x[i] = kt_gauss() * scale;
    }
}


static const char *kt_isa_name[] = { "scalar", "avx2", "avx512", "amx" };


/* Test names built at run time: the runner prints a name when the next
 * test begins, so each needs its own storage. */
static const char *
kt_name(const char *fmt, ...)
{
    static char ring[16][160];
    static int  next;
    char       *p = ring[next++ % 16];
    va_list     ap;

    va_start(ap, fmt);
    vsnprintf(p, sizeof(ring[0]), fmt, ap);
    va_end(ap);
    return p;
}


/* A backend on the given instruction set; NULL if the CPU lacks it. */
static llm_backend *
kt_open(int isa, int threads)
{
    llm_backend *be;
    llm_err      err;

    setenv("LLM_CPU_ISA", kt_isa_name[isa], 1);
    if (llm_cpu_isa_detect() != isa) {
        unsetenv("LLM_CPU_ISA");
        return NULL;
    }
    be = llm_backend_cpu_new(threads, &err);
    unsetenv("LLM_CPU_ISA");
    if (be == NULL) {
        printf("       cpu backend: %s\n", err.msg);
    }
    return be;
}



/* -------------------------------------------- quantization fixtures */

static int
kt_fixture(const char *path, int *checked)
{
    FILE     *f = fopen(path, "rb");
    char      magic[4];
    uint32_t  hdr[3];
    size_t    rb, i, n;
    uint8_t  *raw = NULL, *got = NULL;
    float    *val = NULL, *out = NULL;
    int       ok = 0, r;

    if (f == NULL) {
        return 0;
    }
    if (fread(magic, 1, 4, f) != 4 || fread(hdr, 4, 3, f) != 3) {
        goto done;
    }
    rb = llm_row_bytes((int) hdr[0], hdr[2]);
    n = (size_t) hdr[1] * hdr[2];
    raw = malloc(rb * hdr[1] + 1);
    got = malloc(rb * hdr[1] + 1);
    val = malloc(n * 4 + 4);
    out = malloc(n * 4 + 4);
    if (rb == 0 || raw == NULL || got == NULL || val == NULL || out == NULL) {
        goto done;
    }
    if (memcmp(magic, "LLMQ", 4) == 0) {
        if (fread(raw, rb, hdr[1], f) != hdr[1]
            || fread(val, 4, n, f) != n)
        {
            goto done;
        }
        for (r = 0; r < (int) hdr[1]; r++) {
            if (llm_dequantize_row((int) hdr[0], raw + r * rb,
                                   out + (size_t) r * hdr[2], hdr[2]) != 0)
            {
                goto done;
            }
        }
        /* bit exact: same float operations in the same order */
        for (i = 0; i < n; i++) {
            if (memcmp(&out[i], &val[i], 4) != 0
                && !(isnan(out[i]) && isnan(val[i])))
            {
                printf("       %s: element %zu: %.9g, expected %.9g\n",
                       path, i, out[i], val[i]);
                goto done;
            }
        }
    } else if (memcmp(magic, "LLMZ", 4) == 0) {
        if (fread(val, 4, n, f) != n || fread(raw, rb, hdr[1], f) != hdr[1]) {
            goto done;
        }
        for (r = 0; r < (int) hdr[1]; r++) {
            if (llm_quantize_row((int) hdr[0], val + (size_t) r * hdr[2],
                                 got + r * rb, hdr[2]) != 0)
            {
                goto done;
            }
        }
        for (i = 0; i < rb * hdr[1]; i++) {
            if (got[i] != raw[i]) {
                printf("       %s: byte %zu: %02x, expected %02x\n", path, i,
                       got[i], raw[i]);
                goto done;
            }
        }
    } else {
        goto done;
    }
    ok = 1;
    (*checked)++;
done:
    free(raw);
    free(got);
    free(val);
    free(out);
    fclose(f);
    return ok;
}


static int
kt_fixtures(const char *prefix, int *checked)
{
    char           dir[512], path[1024];
    DIR           *d;
    struct dirent *e;
    int            ok = 1;

    snprintf(dir, sizeof(dir), "%s/quant", llm_test_fixture_dir());
    d = opendir(dir);
    if (d == NULL) {
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0) {
            continue;
        }
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (!kt_fixture(path, checked)) {
            printf("       fixture %s failed\n", path);
            ok = 0;
        }
    }
    closedir(d);
    return ok;
}


TEST_SUITE(kernels_quant)
{
    int   checked, ok, i, rc;
    float x[512], y[512];
    uint8_t b[600];

    test("dequantize random blocks as the gguf package does (all types)");
    checked = 0;
    ok = kt_fixtures("rand_", &checked);
    if (ok < 0) {
        test_skip("t/fixtures/quant missing");
    } else {
        test_cond(ok == 1 && checked == 8);
    }

    test("quantize Q8_0/Q4_0/Q4_1/F16/BF16 bit-exactly as the gguf package");
    checked = 0;
    ok = kt_fixtures("quant_", &checked);
    if (ok < 0) {
        test_skip("t/fixtures/quant missing");
    } else {
        test_cond(ok == 1 && checked == 5);
    }

    test("dequantize rows of the real model (Q8_0 embeddings, Q4_1)");
    checked = 0;
    ok = kt_fixtures("model_", &checked);
    if (ok < 0 || checked == 0) {
        test_skip("model fixtures missing (tools/gen_quant_fixtures.py)");
    } else {
        test_cond(ok == 1 && checked == 3);
    }

    test("Q8_1 and Q8_K round trip; Q8_1 sum field");
    kt_fill(x, 512, 1.0f);
    x[3] = 0.0f;
    ok = 1;
    rc = llm_quantize_row(LLM_Q8_1, x, b, 512);
    ok &= rc == 0 && llm_dequantize_row(LLM_Q8_1, b, y, 512) == 0;
    for (i = 0; i < 512 && ok; i++) {
        float d = llm_f16_to_f32((uint16_t) (b[36 * (i / 32)]
                                             | b[36 * (i / 32) + 1] << 8));
        /* half a step, plus the f16 rounding of d times 127 */
        ok &= fabsf(x[i] - y[i]) <= d * 0.57f + 1e-6f;
    }
    {
        int sum = 0;
        for (i = 0; i < 32; i++) {
            sum += (int8_t) b[4 + i];
        }
        ok &= (uint16_t) (b[2] | b[3] << 8)
              == llm_f32_to_f16(llm_f16_to_f32((uint16_t) (b[0] | b[1] << 8))
                                * (float) sum);
    }
    rc = llm_quantize_row(LLM_Q8_K, x, b, 512);
    ok &= rc == 0 && llm_dequantize_row(LLM_Q8_K, b, y, 512) == 0;
    for (i = 0; i < 512 && ok; i++) {
        ok &= fabsf(x[i] - y[i]) <= 0.02f;
    }
    test_cond(ok);

    test("rows that are not whole blocks are refused");
    test_cond(llm_dequantize_row(LLM_Q4_K, b, y, 100) == LLM_EUNSUP
              && llm_quantize_row(LLM_Q8_0, x, b, 33) == LLM_EUNSUP
              && llm_dequantize_row(77, b, y, 32) == LLM_EUNSUP
              && llm_quantize_row(LLM_Q6_K, x, b, 256) == LLM_EUNSUP);
}


/* ------------------------------------------------------------- matmul */

/* Random weights [m, k] of type into w; their dequantized floats into wf. */
static void
kt_weights(int type, int64_t m, int64_t k, uint8_t *w, float *wf)
{
    const llm_dtype_info *ti = llm_dtype_get(type);
    size_t                rb = llm_row_bytes(type, k);
    int64_t               j, i;
    float                *row = malloc((size_t) k * 4);

    for (j = 0; j < m; j++) {
        uint8_t *wr = w + (size_t) j * rb;

        if (type == LLM_Q4_K || type == LLM_Q5_K || type == LLM_Q6_K) {
            /* no quantizer: random blocks with sane f16 scales */
            int64_t nb = k / 256;
            for (i = 0; i < (int64_t) rb; i++) {
                wr[i] = (uint8_t) kt_u32();
            }
            for (i = 0; i < nb; i++) {
                uint8_t *blk = wr + i * ti->type_size;
                uint16_t d = llm_f32_to_f16(0.002f + 0.01f * fabsf(kt_uni()));
                uint16_t dm = llm_f32_to_f16(0.01f * fabsf(kt_uni()));
                if (type == LLM_Q6_K) {
                    memcpy(blk + 208, &d, 2);
                } else {
                    memcpy(blk, &d, 2);
                    memcpy(blk + 2, &dm, 2);
                }
            }
        } else {
            kt_fill(row, k, 1.0f);
            llm_quantize_row(type, row, wr, k);
        }
        llm_dequantize_row(type, wr, wf + (size_t) j * k, k);
    }
    free(row);
}


/*
 * The activation as the kernels quantize it, as llama.cpp does: blocks of
 * 32 like Q8_0/Q8_1 (q = round-to-even(x * 127 / max|x|), scale
 * max|x| / 127 rounded to f16; s1 gets Q8_1's f16 sum d * sum(q)), blocks
 * of 256 like Q8_K (the element of largest magnitude maps to -127, f32
 * scale).
 */
static void
kt_quant_act(const float *x, float *xh, float *s1, int64_t k, int blk)
{
    int64_t b, i;

    for (b = 0; b < k; b += blk) {
        float amax = 0.0f, max = 0.0f, id, d;
        int   sum = 0;

        for (i = b; i < b + blk; i++) {
            if (fabsf(x[i]) > amax) {
                amax = fabsf(x[i]);
                max = x[i];
            }
        }
        if (blk == 256) {
            id = amax != 0.0f ? -127.0f / max : 0.0f;
            d = amax != 0.0f ? 1.0f / id : 0.0f;
        } else {
            id = amax != 0.0f ? 127.0f / amax : 0.0f;
            d = llm_f16_to_f32(llm_f32_to_f16(amax / 127.0f));
        }
        for (i = b; i < b + blk; i++) {
            float q = nearbyintf(x[i] * id);
            q = q > 127.0f ? 127.0f : q;
            xh[i] = d * q;
            sum += (int) q;
        }
        if (s1 != NULL && blk == 32) {
            s1[b / 32] = llm_f16_to_f32(llm_f32_to_f16(amax / 127.0f
                                                       * (float) sum));
        }
    }
}


/* Q4_1's min term uses Q8_1's rounded sum: the difference it makes to
 * output (r, j), given the dequantized activation xh. */
static double
kt_q41_min_correction(const uint8_t *wrow, const float *xh, const float *s1,
                      int64_t k)
{
    double  c = 0.0;
    int64_t b, i;

    for (b = 0; b < k / 32; b++) {
        double   sx = 0.0;
        uint16_t m;
        memcpy(&m, wrow + 20 * b + 2, 2);
        for (i = 0; i < 32; i++) {
            sx += xh[32 * b + i];
        }
        c += (double) llm_f16_to_f32(m) * ((double) s1[b] - sx);
    }
    return c;
}


/* One matmul on be vs the reference; returns 1 if every element is
 * within tolerance. */
static int
kt_matmul_case(llm_backend *be, int type, int64_t n, int64_t k, int64_t m,
               int with_bias)
{
    const llm_dtype_info *ti = llm_dtype_get(type);
    size_t    rb = llm_row_bytes(type, k);
    uint8_t  *w = malloc(rb * m);
    float    *wf = malloc((size_t) m * k * 4);
    float    *x = malloc((size_t) n * k * 4);
    float    *xh = malloc((size_t) n * k * 4);
    float    *s1 = malloc((size_t) n * (k / 32 + 1) * 4);
    float    *out = malloc((size_t) n * m * 4);
    float    *bias = malloc((size_t) m * 4);
    llm_tensor tx, tw, to, tb;
    int64_t   r, j, i;
    int       ok = 1, rc;
    double    tol = ti->is_quant ? 2e-5 : 1e-5;

    kt_weights(type, m, k, w, wf);
    kt_fill(x, n * k, 1.0f);
    kt_fill(bias, m, 1.0f);
    for (r = 0; r < n; r++) {
        if (ti->is_quant) {
            kt_quant_act(x + r * k, xh + r * k, s1 + r * (k / 32 + 1), k,
                         ti->block == 256 ? 256 : 32);
        } else {
            memcpy(xh + r * k, x + r * k, (size_t) k * 4);
        }
    }
    tx = llm_tensor_of(x, LLM_F32, k, n);
    tw = llm_tensor_of(w, type, k, m);
    to = llm_tensor_of(out, LLM_F32, m, n);
    tb = llm_tensor_of(bias, LLM_F32, m, 1);
    rc = be->ops->matmul(be, &to, &tx, &tw, with_bias ? &tb : NULL);
    if (rc != 0) {
        printf("       matmul %s: %s\n", ti->name, llm_backend_error(be));
        ok = 0;
    }
    for (r = 0; r < n && ok; r++) {
        for (j = 0; j < m && ok; j++) {
            double ref = with_bias ? bias[j] : 0.0, mag = 0.0, exact = 0.0;
            double nx = 0.0, nw = 0.0;
            if (type == LLM_Q4_1) {
                ref += kt_q41_min_correction(w + j * rb, xh + r * k,
                                             s1 + r * (k / 32 + 1), k);
            }
            for (i = 0; i < k; i++) {
                double p = (double) xh[r * k + i] * wf[j * k + i];
                ref += p;
                mag += fabs(p);
                exact += (double) x[r * k + i] * wf[j * k + i];
                nx += (double) x[r * k + i] * x[r * k + i];
                nw += (double) wf[j * k + i] * wf[j * k + i];
            }
            /* tight: against the same quantized activations; loose:
             * against the f32 activations (quantization error) */
            if (fabs(out[r * m + j] - ref) > tol * mag + 1e-5
                || fabs(out[r * m + j] - (with_bias ? bias[j] : 0.0) - exact)
                   > 2e-2 * sqrt(nx * nw) + 1e-5)
            {
                printf("       %s n=%lld k=%lld m=%lld: out[%lld][%lld] = %.7g,"
                       " expected %.7g (f32 %.7g)\n", ti->name, (long long) n,
                       (long long) k, (long long) m, (long long) r,
                       (long long) j, out[r * m + j], ref,
                       exact + (with_bias ? bias[j] : 0.0));
                ok = 0;
            }
        }
    }
    free(w);
    free(wf);
    free(x);
    free(xh);
    free(s1);
    free(out);
    free(bias);
    return ok;
}


/*
 * Batch invariance: each output row must be bit-identical whatever the
 * other rows of the batch (n = 1, 2, 3, 9), so that a sequence gives the
 * same tokens alone or in a batch.
 */
static int
kt_invariance(llm_backend *be, int type, int64_t k, int64_t m)
{
    enum { N = 9 };
    size_t     rb = llm_row_bytes(type, k);
    uint8_t   *w = malloc(rb * m);
    float     *wf = malloc((size_t) m * k * 4);
    float     *x = malloc((size_t) N * k * 4);
    float     *full = malloc((size_t) N * m * 4);
    float     *part = malloc((size_t) N * m * 4);
    float     *bias = malloc((size_t) m * 4);
    llm_tensor tx, tw, to, tb;
    int        ok = 1, r, n, ns[3] = { 1, 2, 3 }, i;

    kt_weights(type, m, k, w, wf);
    kt_fill(x, N * k, 1.0f);
    kt_fill(bias, m, 1.0f);
    tw = llm_tensor_of(w, type, k, m);
    tb = llm_tensor_of(bias, LLM_F32, m, 1);
    tx = llm_tensor_of(x, LLM_F32, k, N);
    to = llm_tensor_of(full, LLM_F32, m, N);
    ok &= be->ops->matmul(be, &to, &tx, &tw, &tb) == 0;
    for (i = 0; i < 3; i++) {
        n = ns[i];
        for (r = 0; r + n <= N; r += n) {
            tx = llm_tensor_of(x + (size_t) r * k, LLM_F32, k, n);
            to = llm_tensor_of(part, LLM_F32, m, n);
            ok &= be->ops->matmul(be, &to, &tx, &tw, &tb) == 0;
            if (memcmp(part, full + (size_t) r * m, (size_t) n * m * 4) != 0) {
                printf("       %s k=%lld m=%lld: rows %d..%d differ when"
                       " multiplied %d at a time\n",
                       llm_dtype_get(type)->name, (long long) k, (long long) m,
                       r, r + n - 1, n);
                ok = 0;
            }
        }
    }
    free(w);
    free(wf);
    free(x);
    free(full);
    free(part);
    free(bias);
    return ok;
}


/* The scalar and the AVX-512 kernels compute quantized products in the
 * same canonical way (cpu.h): bit-identical results. */
static int
kt_cross_isa(llm_backend *a, llm_backend *b, int type, int64_t n, int64_t k,
             int64_t m)
{
    size_t     rb = llm_row_bytes(type, k);
    uint8_t   *w = malloc(rb * m);
    float     *wf = malloc((size_t) m * k * 4);
    float     *x = malloc((size_t) n * k * 4);
    float     *oa = malloc((size_t) n * m * 4);
    float     *ob = malloc((size_t) n * m * 4);
    float     *bias = malloc((size_t) m * 4);
    llm_tensor tx, tw, to, tb;
    int        ok;

    kt_weights(type, m, k, w, wf);
    kt_fill(x, n * k, 1.0f);
    kt_fill(bias, m, 1.0f);
    tx = llm_tensor_of(x, LLM_F32, k, n);
    tw = llm_tensor_of(w, type, k, m);
    tb = llm_tensor_of(bias, LLM_F32, m, 1);
    to = llm_tensor_of(oa, LLM_F32, m, n);
    ok = a->ops->matmul(a, &to, &tx, &tw, &tb) == 0;
    to = llm_tensor_of(ob, LLM_F32, m, n);
    ok &= b->ops->matmul(b, &to, &tx, &tw, &tb) == 0;
    if (ok && memcmp(oa, ob, (size_t) n * m * 4) != 0) {
        printf("       %s n=%lld: the two paths differ\n",
               llm_dtype_get(type)->name, (long long) n);
        ok = 0;
    }
    free(w);
    free(wf);
    free(x);
    free(oa);
    free(ob);
    free(bias);
    return ok;
}


/* Each of the n types, on backends of instruction sets isa_a and isa_b:
 * the same bits for n0 and n1 activation rows, k = k32 (blocks of 32)
 * or 768 (of 256), m weight rows.  Skipped where the CPU lacks isa_b. */
static void
kt_cross_isas(int isa_a, int isa_b, const int *types, int n, int64_t k32,
              int64_t n0, int64_t n1, int64_t m)
{
    llm_backend *a = kt_open(isa_a, 2);
    llm_backend *b = kt_open(isa_b, 2);
    int          i, ok = a != NULL;

    if (b == NULL) {
        test_skip("this CPU (or OS) lacks the instructions");
    } else {
        for (i = 0; i < n; i++) {
            int64_t k = llm_dtype_get(types[i])->block == 256 ? 768 : k32;

            ok &= kt_cross_isa(a, b, types[i], n0, k, m)
                  && kt_cross_isa(a, b, types[i], n1, k, m);
        }
        test_cond(ok);
    }
    if (a != NULL) {
        a->ops->free(a);
    }
    if (b != NULL) {
        b->ops->free(b);
    }
}


/* matmul_n (the products of one x) gives each output bit for bit as
 * matmul alone: weights of types[i], [ms[i], k], a bias on the first. */
static int
kt_matmul_n_case(llm_backend *be, const int *types, const int64_t *ms,
                 int np, int64_t n, int64_t k)
{
    uint8_t          *w[4];
    float            *x = malloc((size_t) n * k * 4), *bias, *one[4], *grp[4];
    llm_tensor        tx, tw[4], to[4], tb, *outs[4];
    const llm_tensor *ws[4], *bs[4];
    int               ok = 1, i;

    kt_fill(x, n * k, 1.0f);
    bias = malloc((size_t) ms[0] * 4);
    kt_fill(bias, ms[0], 1.0f);
    tb = llm_tensor_of(bias, LLM_F32, ms[0], 1);
    tx = llm_tensor_of(x, LLM_F32, k, n);
    for (i = 0; i < np; i++) {
        float *wf = malloc((size_t) ms[i] * k * 4);

        w[i] = malloc(llm_row_bytes(types[i], k) * ms[i]);
        kt_weights(types[i], ms[i], k, w[i], wf);
        free(wf);
        tw[i] = llm_tensor_of(w[i], types[i], k, ms[i]);
        one[i] = malloc((size_t) n * ms[i] * 4);
        grp[i] = malloc((size_t) n * ms[i] * 4);
        to[i] = llm_tensor_of(one[i], LLM_F32, ms[i], n);
        ok &= be->ops->matmul(be, &to[i], &tx, &tw[i], i == 0 ? &tb : NULL)
              == 0;
        to[i] = llm_tensor_of(grp[i], LLM_F32, ms[i], n);
        outs[i] = &to[i];
        ws[i] = &tw[i];
        bs[i] = i == 0 ? &tb : NULL;
    }
    ok &= be->ops->matmul_n(be, outs, &tx, ws, bs, np) == 0;
    for (i = 0; i < np; i++) {
        if (memcmp(one[i], grp[i], (size_t) n * ms[i] * 4) != 0) {
            printf("       %s [%lld, %lld], %lld rows: product %d of %d "
                   "differs from matmul alone\n",
                   llm_dtype_get(types[i])->name, (long long) ms[i],
                   (long long) k, (long long) n, i, np);
            ok = 0;
        }
        free(w[i]);
        free(one[i]);
        free(grp[i]);
    }
    free(x);
    free(bias);
    return ok;
}


TEST_SUITE(kernels_matmul)
{
    static const int types[] = { LLM_F32, LLM_F16, LLM_BF16, LLM_Q4_0,
                                 LLM_Q4_1, LLM_Q8_0, LLM_Q4_K, LLM_Q5_K,
                                 LLM_Q6_K };
    static const int64_t ns[] = { 1, 3, 7, 32, 33 };
    static const int64_t ms[] = { 1, 7, 67 };
    static const int64_t k_plain[] = { 1, 17, 100, 576 };
    static const int64_t k_32[] = { 32, 96, 576 };
    static const int64_t k_256[] = { 256, 768 };
    int          isa, ti, ni, mi, ki, ok, threads;

    test("quantized matmul: scalar and AVX-512 paths bit-identical");
    kt_cross_isas(LLM_ISA_SCALAR, LLM_ISA_AVX512, types + 3,
                  (int) (sizeof(types) / sizeof(types[0])) - 3, 160, 1, 5,
                  37);

    test("quantized matmul: AMX tiles and AVX-512 (VNNI) bit-identical");
    kt_cross_isas(LLM_ISA_AVX512, LLM_ISA_AMX, types + 3,
                  (int) (sizeof(types) / sizeof(types[0])) - 3, 2080, 16,
                  53, 37);

    for (isa = LLM_ISA_SCALAR; isa <= LLM_ISA_AMX; isa++) {
        threads = isa == LLM_ISA_AVX2 ? 3 : 2;      /* odd splits too */
        llm_backend *be = kt_open(isa, threads);

        for (ti = 0; ti < (int) (sizeof(types) / sizeof(types[0])); ti++) {
            const llm_dtype_info *inf = llm_dtype_get(types[ti]);
            const int64_t *ks = inf->block == 1 ? k_plain
                                : inf->block == 32 ? k_32 : k_256;
            int nk = inf->block == 1 ? 4 : inf->block == 32 ? 3 : 2;

            test(kt_name("matmul %s weights, %s path",
                     inf->name, kt_isa_name[isa]));
            if (be == NULL) {
                test_skip("this CPU lacks the instruction set");
                continue;
            }
            ok = 1;
            for (ni = 0; ni < 5; ni++) {
                for (ki = 0; ki < nk; ki++) {
                    for (mi = 0; mi < 3; mi++) {
                        ok &= kt_matmul_case(be, types[ti], ns[ni], ks[ki],
                                             ms[mi], (ni + mi) & 1);
                    }
                }
            }
            test_cond(ok);
        }
        if (be != NULL) {
            test(kt_name("matmul larger shapes (SmolLM2's), %s path",
                         kt_isa_name[isa]));
            test_cond(kt_matmul_case(be, LLM_Q4_1, 5, 576, 1536, 0)
                      && kt_matmul_case(be, LLM_Q8_0, 2, 576, 4099, 0)
                      && kt_matmul_case(be, LLM_Q4_1, 1, 1536, 576, 1)
                      && kt_matmul_case(be, LLM_Q4_1, 19, 1536, 100, 1)
                      && kt_matmul_case(be, LLM_Q6_K, 3, 1536, 70, 1)
                      && kt_matmul_case(be, LLM_F32, 20, 1100, 37, 1));

            test(kt_name("matmul F32 through OpenBLAS (LLM_CPU_BLAS=1),"
                         " %s path", kt_isa_name[isa]));
            {
                llm_backend *bb;
                setenv("LLM_CPU_BLAS", "1", 1);
                bb = kt_open(isa, threads);
                unsetenv("LLM_CPU_BLAS");
                test_cond(bb != NULL
                          && kt_matmul_case(bb, LLM_F32, 20, 1100, 37, 1)
                          && kt_matmul_case(bb, LLM_F32, 33, 2048, 64, 0));
                if (bb != NULL) {
                    bb->ops->free(bb);
                }
            }

            test(kt_name("matmul rows are bit-identical in any batch (every"
                         " type), %s path", kt_isa_name[isa]));
            {
                int ok2 = 1;
                for (ti = 0; ti < (int) (sizeof(types) / sizeof(types[0]));
                     ti++)
                {
                    const llm_dtype_info *inf = llm_dtype_get(types[ti]);
                    ok2 &= kt_invariance(be, types[ti],
                                         inf->block == 256 ? 512 : 96, 37);
                    ok2 &= kt_invariance(be, types[ti],
                                         inf->block == 256 ? 1536 : 1088, 21);
                }
                test_cond(ok2);
            }

            test(kt_name("matmul_n: each product of one x as matmul alone"
                         " (q/k/v and gate/up shapes, mixed types), %s path",
                         kt_isa_name[isa]));
            {
                static const int64_t qkv[] = { 67, 21, 21 }, gu[] = { 96, 96 };
                static const int64_t rows[] = { 1, 5, 32, 33 };
                int                  ok2 = 1, ri;

                for (ti = 0; ti < (int) (sizeof(types) / sizeof(types[0]));
                     ti++)
                {
                    const llm_dtype_info *inf = llm_dtype_get(types[ti]);
                    int t3[3] = { types[ti], types[ti], types[ti] };

                    for (ri = 0; ri < 4; ri++) {
                        ok2 &= kt_matmul_n_case(be, t3, qkv, 3, rows[ri],
                                                inf->block == 256 ? 512 : 576);
                        ok2 &= kt_matmul_n_case(be, t3, gu, 2, rows[ri],
                                                inf->block == 256 ? 256 : 96);
                    }
                }
                {
                    /* same activations (Q4_1, Q8_0, Q4_0), and not */
                    int t_same[3] = { LLM_Q4_1, LLM_Q8_0, LLM_Q4_0 };
                    int t_diff[3] = { LLM_Q4_1, LLM_Q4_K, LLM_F16 };

                    for (ri = 0; ri < 4; ri++) {
                        ok2 &= kt_matmul_n_case(be, t_same, qkv, 3, rows[ri],
                                                576);
                        ok2 &= kt_matmul_n_case(be, t_diff, qkv, 3, rows[ri],
                                                512);
                    }
                }
                test_cond(ok2);
            }

            test("matmul refuses mismatched shapes and unsupported types");
            {
                float      xs[64], os[64];
                uint8_t    ws[256];
                llm_tensor tx = llm_tensor_of(xs, LLM_F32, 32, 2);
                llm_tensor tw = llm_tensor_of(ws, LLM_Q8_0, 32, 4);
                llm_tensor to = llm_tensor_of(os, LLM_F32, 3, 2);
                int        r1, r2, r3;

                memset(ws, 0, sizeof(ws));
                r1 = be->ops->matmul(be, &to, &tx, &tw, NULL);
                to.ne[0] = 4;
                to.nb = 16;
                tw.type = LLM_Q8_K;
                r2 = be->ops->matmul(be, &to, &tx, &tw, NULL);
                tw.type = LLM_Q8_0;
                tw.nb = 10;
                r3 = be->ops->matmul(be, &to, &tx, &tw, NULL);
                test_cond(r1 == LLM_EINVAL && r2 == LLM_EUNSUP
                          && r3 == LLM_EINVAL
                          && strlen(llm_backend_error(be)) > 0);
            }
            be->ops->free(be);
        }
    }
}


/* ------------------------------------------------------- row-wise ops */

static int
kt_close(const float *a, const float *b, int64_t n, double rel, double abs_)
{
    int64_t i;

    for (i = 0; i < n; i++) {
        if (!(fabs(a[i] - b[i]) <= abs_ + rel * fabs(b[i]))) {
            printf("       element %lld: %.8g, expected %.8g\n",
                   (long long) i, a[i], b[i]);
            return 0;
        }
    }
    return 1;
}


/* rope of one token row as llama.cpp computes it (float recurrence). */
static void
kt_rope_ref(float *x, int n_heads, int hd, int pos, const llm_rope_params *rp,
            int exact)
{
    int    half = rp->n_rot / 2, h, i;
    float  ts = powf(rp->freq_base, -2.0f / (float) rp->n_rot);
    float  theta = (float) pos;

    for (i = 0; i < half; i++) {
        double th;
        if (exact) {
            float t = theta;
            if (rp->freq_factors) {
                t /= rp->freq_factors[i];
            }
            th = t * rp->freq_scale;
        } else {
            th = pos * pow(rp->freq_base, -2.0 * i / rp->n_rot)
                 / (rp->freq_factors ? rp->freq_factors[i] : 1.0)
                 * rp->freq_scale;
        }
        for (h = 0; h < n_heads; h++) {
            float *v = x + h * hd;
            int    a = rp->neox ? i : 2 * i, b = rp->neox ? i + half : 2 * i + 1;
            double c = exact ? cosf((float) th) : cos(th);
            double s = exact ? sinf((float) th) : sin(th);
            float  x0 = v[a], x1 = v[b];
            v[a] = (float) (x0 * c - x1 * s);
            v[b] = (float) (x0 * s + x1 * c);
        }
        theta *= ts;
    }
}


static void
kt_ops(llm_backend *be, const char *isa)
{
    enum { T = 37, D = 200 };
    static int32_t tokens[T], pos[T], seq[T], out_rows[3] = { 36, 0, 17 };
    static float   a[T * D], bb[T * D], o[T * D], ref[T * D], w[D];
    llm_batch      batch;
    llm_tensor     ta, tb, to, tw;
    int64_t        t, i;
    int            ok, rc, mode;

    memset(&batch, 0, sizeof(batch));
    for (t = 0; t < T; t++) {
        tokens[t] = (int32_t) (kt_u32() % 1000);
        pos[t] = (int32_t) (t < 20 ? t : 8000 + t);
        seq[t] = 0;
    }
    batch.n_tokens = T;
    batch.tokens = tokens;
    batch.pos = pos;
    batch.tok_seq = seq;
    batch.n_seqs = 1;
    batch.n_out = 3;
    batch.out_rows = out_rows;
    be->ops->set_batch(be, &batch);

    kt_fill(a, T * D, 2.0f);
    kt_fill(bb, T * D, 1.0f);
    kt_fill(w, D, 1.0f);
    ta = llm_tensor_of(a, LLM_F32, D, T);
    tb = llm_tensor_of(bb, LLM_F32, D, T);
    to = llm_tensor_of(o, LLM_F32, D, T);
    tw = llm_tensor_of(w, LLM_F32, D, 1);

    test(kt_name("rmsnorm (%s)", isa));
    for (t = 0; t < T; t++) {
        double ss = 0.0;
        for (i = 0; i < D; i++) {
            ss += (double) a[t * D + i] * a[t * D + i];
        }
        for (i = 0; i < D; i++) {
            ref[t * D + i] = (float) (a[t * D + i] / sqrt(ss / D + 1e-5)
                                      * w[i]);
        }
    }
    rc = be->ops->rmsnorm(be, &to, &ta, &tw, 1e-5f);
    test_cond(rc == 0 && kt_close(o, ref, T * D, 1e-5, 1e-6));

    test(kt_name("silu_mul and add, in place (%s)", isa));
    memcpy(o, a, sizeof(a));
    for (i = 0; i < T * D; i++) {
        ref[i] = (float) (a[i] / (1.0 + exp(-(double) a[i])) * bb[i]);
    }
    to = llm_tensor_of(o, LLM_F32, D, T);
    rc = be->ops->silu_mul(be, &to, &to, &tb);
    ok = rc == 0 && kt_close(o, ref, T * D, 2e-6, 1e-7);
    for (i = 0; i < T * D; i++) {
        ref[i] = o[i] + bb[i];
    }
    rc = be->ops->add(be, &to, &to, &tb);
    test_cond(ok && rc == 0 && kt_close(o, ref, T * D, 0, 0));

    test(kt_name("silu of large and tiny gates (%s)", isa));
    {
        float g[19] = { -100, -87.5f, -50, -20, -5, -1e-3f, 0, 1e-3f, 0.5f, 1,
                        5, 20, 50, 87.5f, 100, 3e4f, -3e4f, 1e-30f, -1e-30f };
        float u[19], out19[19], r19[19];
        llm_tensor tg = llm_tensor_of(g, LLM_F32, 19, 1);
        llm_tensor tu = llm_tensor_of(u, LLM_F32, 19, 1);
        llm_tensor tt = llm_tensor_of(out19, LLM_F32, 19, 1);
        for (i = 0; i < 19; i++) {
            u[i] = 1.5f;
            r19[i] = (float) (g[i] / (1.0 + exp(-(double) g[i])) * 1.5);
        }
        rc = be->ops->silu_mul(be, &tt, &tg, &tu);
        test_cond(rc == 0 && kt_close(out19, r19, 19, 2e-6, 1e-30));
    }

    for (mode = 0; mode < 4; mode++) {
        /* neox 0/1; a partial rotation with factors and scaling */
        float           ff[16];
        llm_rope_params rp;
        int             nh = 5, hd = 40;

        rp.neox = mode & 1;
        rp.n_rot = mode < 2 ? hd : 32;
        rp.freq_base = mode < 2 ? 100000.0f : 500000.0f;
        rp.freq_scale = mode < 2 ? 1.0f : 0.25f;
        for (i = 0; i < 16; i++) {
            ff[i] = 1.0f + (float) i * 0.5f;
        }
        rp.freq_factors = mode < 2 ? NULL : ff;
        test(kt_name("rope %s%s (%s)",
                 rp.neox ? "neox (HF halves)" : "adjacent pairs (GGUF)",
                 mode < 2 ? "" : ", n_rot < head_dim, factors, scale", isa));
        ta = llm_tensor_of(a, LLM_F32, nh * hd, T);
        kt_fill(a, T * nh * hd, 1.0f);
        memcpy(ref, a, sizeof(float) * T * nh * hd);
        memcpy(bb, a, sizeof(float) * T * nh * hd);
        for (t = 0; t < T; t++) {
            kt_rope_ref(ref + t * nh * hd, nh, hd, pos[t], &rp, 1);
            kt_rope_ref(bb + t * nh * hd, nh, hd, pos[t], &rp, 0);
        }
        /* modes 2-3 change the parameters within the same step: the
         * cached cos/sin table must not go stale */
        rc = be->ops->rope(be, &ta, nh, hd, &rp);
        ok = rc == 0 && kt_close(a, ref, T * nh * hd, 1e-5, 1e-5)
             && kt_close(a, bb, T * nh * hd, 0, 2e-3);
        test_cond(ok);
    }
    tb = llm_tensor_of(bb, LLM_F32, D, T);

    test(kt_name("gather_out_rows (%s)", isa));
    ta = llm_tensor_of(a, LLM_F32, D, T);
    to = llm_tensor_of(o, LLM_F32, D, 3);
    rc = be->ops->gather_out_rows(be, &to, &ta);
    test_cond(rc == 0 && memcmp(o, a + 36 * D, D * 4) == 0
              && memcmp(o + D, a, D * 4) == 0
              && memcmp(o + 2 * D, a + 17 * D, D * 4) == 0);

    test(kt_name("embed from F32/F16/BF16/Q8_0/Q4_1/Q6_K"
             " tables (%s)", isa));
    {
        static const int types[] = { LLM_F32, LLM_F16, LLM_BF16, LLM_Q8_0,
                                     LLM_Q4_1, LLM_Q6_K };
        enum { DIM = 256 };
        static float eo[T * DIM];   /* wider rows than o's D */
        int64_t dim = DIM, vocab = 1000;
        int     ti;
        ok = 1;
        for (ti = 0; ti < 6; ti++) {
            float   *tf = malloc(vocab * dim * 4);
            uint8_t *tq = malloc(llm_row_bytes(types[ti], dim) * vocab);
            llm_tensor tt = llm_tensor_of(tq, types[ti], dim, vocab);
            llm_tensor te = llm_tensor_of(eo, LLM_F32, dim, T);

            kt_weights(types[ti], vocab, dim, tq, tf);
            rc = be->ops->embed(be, &te, &tt);
            ok &= rc == 0;
            for (t = 0; t < T && ok; t++) {
                ok &= memcmp(eo + t * dim, tf + tokens[t] * dim, dim * 4)
                      == 0;
            }
            if (ti == 0) {
                /* an id outside the table is refused */
                tokens[5] = 1000;
                ok &= be->ops->embed(be, &te, &tt) == LLM_EINVAL;
                tokens[5] = -1;
                ok &= be->ops->embed(be, &te, &tt) == LLM_EINVAL;
                tokens[5] = 5;
            }
            free(tf);
            free(tq);
        }
        test_cond(ok);
    }
}


TEST_SUITE(kernels_ops)
{
    int isa;

    for (isa = LLM_ISA_SCALAR; isa <= LLM_ISA_AMX; isa++) {
        llm_backend *be = kt_open(isa, 2);

        if (be == NULL) {
            test(kt_name("row-wise ops, %s path",
                     kt_isa_name[isa]));
            test_skip("this CPU lacks the instruction set");
            continue;
        }
        kt_ops(be, kt_isa_name[isa]);
        be->ops->free(be);
    }
}


/* ---------------------------------------------------------- attention */

typedef struct kt_seq {
    int      len;               /* tokens cached so far */
    float   *k, *v;             /* [cap, n_kv * hd] f32 (as stored) */
} kt_seq;


typedef struct kt_attn {
    llm_backend *be;
    llm_kv_pool  kv;
    int          n_heads, n_seqs, max_blocks, cap, layer;
    int32_t     *table;         /* [n_seqs, max_blocks] */
    kt_seq      *seqs;
} kt_attn;


/* One step: new[s] tokens appended to each sequence s, stored, attended
 * (check: and compared with the reference; else only stored).  Returns 1
 * if attention and the stored pages match the reference. */
/* x[n] as KV pages of type hold it. */
static void
kt_kv_round(int type, const float *x, float *out, int n)
{
    uint8_t buf[4096];

    if (type == LLM_F32 || (size_t) n * 4 > sizeof(buf)) {
        memcpy(out, x, sizeof(float) * (size_t) n);
        return;
    }
    llm_quantize_row(type, x, buf, n);
    llm_dequantize_row(type, buf, out, n);
}


static int
kt_attn_step(kt_attn *A, const int *add, int check)
{
    int       nkv = A->kv.n_kv_heads, hd = A->kv.head_dim, g, h, s, e, i;
    int       T = 0, t, row = nkv * hd, qw = A->n_heads * hd, ok = 1, rc;
    int32_t  *tokens, *pos, *tseq, *start;
    float    *q, *k, *v, *out, *ref;
    llm_batch b;
    llm_tensor tq, tk, tv, to;
    float     scale = 1.0f / sqrtf((float) hd);

    for (s = 0; s < A->n_seqs; s++) {
        T += add[s];
    }
    tokens = calloc(T + 1, 4);
    pos = calloc(T + 1, 4);
    tseq = calloc(T + 1, 4);
    start = calloc(A->n_seqs + 1, 4);
    q = malloc((size_t) (T + 1) * qw * 4);
    out = malloc((size_t) (T + 1) * qw * 4);
    ref = malloc((size_t) (T + 1) * qw * 4);
    k = malloc((size_t) (T + 1) * row * 4);
    v = malloc((size_t) (T + 1) * row * 4);

    t = 0;
    for (s = 0; s < A->n_seqs; s++) {
        start[s] = t;
        for (i = 0; i < add[s]; i++, t++) {
            tseq[t] = s;
            pos[t] = A->seqs[s].len + i;
        }
    }
    start[A->n_seqs] = T;
    kt_fill(q, (int64_t) T * qw, 1.0f);
    kt_fill(k, (int64_t) T * row, 1.0f);
    kt_fill(v, (int64_t) T * row, 1.0f);

    memset(&b, 0, sizeof(b));
    b.n_tokens = T;
    b.tokens = tokens;
    b.pos = pos;
    b.tok_seq = tseq;
    b.n_seqs = A->n_seqs;
    b.seq_start = start;
    b.block_table = A->table;
    b.max_blocks = A->max_blocks;
    rc = A->be->ops->set_batch(A->be, &b);

    tq = llm_tensor_of(q, LLM_F32, qw, T);
    tk = llm_tensor_of(k, LLM_F32, row, T);
    tv = llm_tensor_of(v, LLM_F32, row, T);
    to = llm_tensor_of(out, LLM_F32, qw, T);
    rc |= A->be->ops->kv_store(A->be, &A->kv, A->layer, &tk, &tv);
    if (check) {
        rc |= A->be->ops->attention(A->be, &to, &tq, &A->kv, A->layer,
                                    A->n_heads, scale);
    }
    if (rc != 0) {
        printf("       attention: %s\n", llm_backend_error(A->be));
        ok = 0;
    }

    /* the reference copy of the cache, rounded as the pool stores it
     * (Q8_0: the reference quantizer's values) */
    for (t = 0; t < T; t++) {
        kt_seq *sq = &A->seqs[tseq[t]];
        float  *kr = sq->k + (size_t) pos[t] * row;
        float  *vr = sq->v + (size_t) pos[t] * row;

        kt_kv_round(A->kv.type, k + (size_t) t * row, kr, row);
        kt_kv_round(A->kv.type, v + (size_t) t * row, vr, row);
        /* the stored page row is exactly this */
        {
            int32_t blk = A->table[tseq[t] * A->max_blocks
                                   + pos[t] / A->kv.block_size];
            size_t  off = (size_t) A->layer * A->kv.layer_bytes
                          + ((size_t) blk * A->kv.block_size
                             + pos[t] % A->kv.block_size)
                            * llm_kv_bytes(A->kv.type, (size_t) row);
            float   got[1024];

            if (row > 1024 || llm_dequantize_row(A->kv.type,
                                  (const uint8_t *) A->kv.k + off, got,
                                  row) != 0
                || memcmp(got, kr, sizeof(float) * (size_t) row) != 0)
            {
                printf("       kv_store: token %d differs\n", t);
                ok = 0;
            }
        }
    }
    g = A->n_heads / nkv;
    for (t = 0; t < T && ok && check; t++) {
        kt_seq *sq = &A->seqs[tseq[t]];
        int     L = pos[t] + 1;
        double *p = malloc(sizeof(double) * L);

        for (h = 0; h < A->n_heads; h++) {
            int    kvh = h / g;
            double mx = -1e300, sum = 0.0;
            for (i = 0; i < L; i++) {
                double d = 0.0;
                for (e = 0; e < hd; e++) {
                    d += (double) q[t * qw + h * hd + e]
                         * sq->k[(size_t) i * row + kvh * hd + e];
                }
                p[i] = d * scale;
                mx = p[i] > mx ? p[i] : mx;
            }
            for (i = 0; i < L; i++) {
                p[i] = exp(p[i] - mx);
                sum += p[i];
            }
            for (e = 0; e < hd; e++) {
                double acc = 0.0;
                for (i = 0; i < L; i++) {
                    acc += p[i] * sq->v[(size_t) i * row + kvh * hd + e];
                }
                ref[t * qw + h * hd + e] = (float) (acc / sum);
            }
        }
        free(p);
    }
    if (ok && check) {
        ok = kt_close(out, ref, (int64_t) T * qw, 1e-4, 2e-5);
    }
    for (s = 0; s < A->n_seqs; s++) {
        A->seqs[s].len += add[s];
    }
    free(tokens);
    free(pos);
    free(tseq);
    free(start);
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    return ok;
}


static int
kt_attn_run(llm_backend *be, int kv_type, int n_heads, int n_kv, int hd,
            int block_size)
{
    /* ragged sequences: one ending exactly on a block boundary, short
     * ones, and a long one (stored without a reference: attention over
     * more than 1024 positions is split in ranges; 48 such tokens need
     * more than one wave of partials) */
    static const int step1[4] = { 37, 5, 16, 0 };
    static const int fill[4] = { 0, 0, 0, 2100 };
    static const int step2[4] = { 10, 1, 1, 1 };  /* chunk on top + decode */
    static const int step3[4] = { 0, 0, 0, 48 };  /* long-context chunk */
    static const int step4[4] = { 1, 1, 1, 1 };
    kt_attn A;
    int     s, i, ok = 1, n_blocks;
    size_t  row;

    memset(&A, 0, sizeof(A));
    A.be = be;
    A.n_heads = n_heads;
    A.n_seqs = 4;
    A.cap = 2304;
    A.max_blocks = A.cap / block_size;
    A.layer = 1;
    n_blocks = A.n_seqs * A.max_blocks + 3;
    row = (size_t) n_kv * hd;
    A.kv.type = kv_type;
    A.kv.n_layers = 2;
    A.kv.n_blocks = n_blocks;
    A.kv.block_size = block_size;
    A.kv.n_kv_heads = n_kv;
    A.kv.head_dim = hd;
    A.kv.layer_bytes = (size_t) n_blocks * block_size
                       * llm_kv_bytes(kv_type, row);
    A.kv.k = calloc(2, A.kv.layer_bytes);
    A.kv.v = calloc(2, A.kv.layer_bytes);
    A.table = malloc(sizeof(int32_t) * A.n_seqs * A.max_blocks);
    A.seqs = calloc(A.n_seqs, sizeof(kt_seq));
    /* physical blocks handed out in a scrambled order */
    {
        int32_t *perm = malloc(sizeof(int32_t) * n_blocks);
        for (i = 0; i < n_blocks; i++) {
            perm[i] = i;
        }
        for (i = n_blocks - 1; i > 0; i--) {
            int     r = (int) (kt_u32() % (uint32_t) (i + 1));
            int32_t tmp = perm[i];
            perm[i] = perm[r];
            perm[r] = tmp;
        }
        memcpy(A.table, perm, sizeof(int32_t) * A.n_seqs * A.max_blocks);
        free(perm);
    }
    for (s = 0; s < A.n_seqs; s++) {
        A.seqs[s].k = calloc((size_t) A.cap * row, 4);
        A.seqs[s].v = calloc((size_t) A.cap * row, 4);
    }
    ok &= kt_attn_step(&A, step1, 1);
    ok &= kt_attn_step(&A, fill, 0);
    ok &= kt_attn_step(&A, step2, 1);
    ok &= kt_attn_step(&A, step3, 1);
    ok &= kt_attn_step(&A, step4, 1);

    for (s = 0; s < A.n_seqs; s++) {
        free(A.seqs[s].k);
        free(A.seqs[s].v);
    }
    free(A.seqs);
    free(A.table);
    free(A.kv.k);
    free(A.kv.v);
    return ok;
}


/* Attention of a token alone, in batches with others, and on another
 * thread count: bit-identical rows. */
static int
kt_attn_invariance(llm_backend *be, llm_backend *be1, int kv_type, int NH,
                   int NKV, int HD, int BS)
{
    enum { NS = 3, MB = 1600 / 5 };
    static const int32_t lens[NS] = { 1500, 300, 40 };
    /* queries: (seq, pos) */
    static const int32_t qs[4] = { 0, 1, 2, 0 }, qp[4] = { 1499, 299, 39, 700 };
    static const int     order[4] = { 1, 0, 2, 3 };
    llm_kv_pool kv;
    llm_batch   b;
    int32_t     table[NS * MB], *tok, *pos, *seq, st[NS + 1];
    int         i, s, n = 0, ok = 1;
    float      *k, *q, *alone, *batch;
    llm_tensor  tk, tq, to;

    memset(&kv, 0, sizeof(kv));
    kv.type = kv_type;
    kv.n_layers = 1;
    kv.n_blocks = NS * MB;
    kv.block_size = BS;
    kv.n_kv_heads = NKV;
    kv.head_dim = HD;
    kv.layer_bytes = (size_t) NS * MB * BS
                     * llm_kv_bytes(kv_type, (size_t) NKV * HD);
    kv.k = malloc(kv.layer_bytes);
    kv.v = malloc(kv.layer_bytes);
    for (i = 0; i < NS * MB; i++) {
        table[i] = (i * 37 + 11) % (NS * MB);   /* 37 is coprime to 960 */
    }
    /* store every position of every sequence */
    for (s = 0; s < NS; s++) {
        n += lens[s];
    }
    tok = calloc(n, 4);
    pos = malloc(n * 4);
    seq = malloc(n * 4);
    k = malloc((size_t) n * NKV * HD * 4);
    q = malloc(4 * NH * HD * 4);
    alone = malloc(4 * NH * HD * 4);
    batch = malloc(4 * NH * HD * 4);
    n = 0;
    for (s = 0; s < NS; s++) {
        st[s] = n;
        for (i = 0; i < lens[s]; i++, n++) {
            pos[n] = i;
            seq[n] = s;
        }
    }
    st[NS] = n;
    kt_fill(k, (int64_t) n * NKV * HD, 1.0f);
    kt_fill(q, 4 * NH * HD, 1.0f);
    memset(&b, 0, sizeof(b));
    b.n_tokens = n;
    b.tokens = tok;
    b.pos = pos;
    b.tok_seq = seq;
    b.n_seqs = NS;
    b.seq_start = st;
    b.block_table = table;
    b.max_blocks = MB;
    tk = llm_tensor_of(k, LLM_F32, NKV * HD, n);
    ok &= be->ops->set_batch(be, &b) == 0
          && be->ops->kv_store(be, &kv, 0, &tk, &tk) == 0;

    /* each query alone (2 threads), then all four in a batch (2 threads
     * and 1 thread) */
    for (i = 0; i < 4; i++) {
        int32_t p1 = qp[i], s1 = qs[i], t0 = 0;
        b.n_tokens = 1;
        b.pos = &p1;
        b.tok_seq = &s1;
        b.tokens = &t0;
        tq = llm_tensor_of(q + i * NH * HD, LLM_F32, NH * HD, 1);
        to = llm_tensor_of(alone + i * NH * HD, LLM_F32, NH * HD, 1);
        ok &= be->ops->set_batch(be, &b) == 0
              && be->ops->attention(be, &to, &tq, &kv, 0, NH, 0.125f) == 0;
    }
    {
        int32_t bp[4], bsq[4], bt[4] = { 0, 0, 0, 0 };
        float  *bq = malloc(4 * NH * HD * 4);
        int     pass;

        for (i = 0; i < 4; i++) {
            bp[i] = qp[order[i]];
            bsq[i] = qs[order[i]];
            memcpy(bq + i * NH * HD, q + order[i] * NH * HD, NH * HD * 4);
        }
        b.n_tokens = 4;
        b.pos = bp;
        b.tok_seq = bsq;
        b.tokens = bt;
        tq = llm_tensor_of(bq, LLM_F32, NH * HD, 4);
        to = llm_tensor_of(batch, LLM_F32, NH * HD, 4);
        for (pass = 0; pass < 2; pass++) {
            llm_backend *e = pass == 0 ? be : be1;
            ok &= e->ops->set_batch(e, &b) == 0
                  && e->ops->attention(e, &to, &tq, &kv, 0, NH, 0.125f) == 0;
            for (i = 0; i < 4; i++) {
                if (memcmp(batch + i * NH * HD, alone + order[i] * NH * HD,
                           NH * HD * 4) != 0)
                {
                    printf("       query %d differs in a batch (%d threads)\n",
                           order[i], pass == 0 ? 2 : 1);
                    ok = 0;
                }
            }
        }
        free(bq);
    }
    /* prefill chunks (tokens of one sequence at consecutive positions
     * share the work in tiles): seq 0 across the 1024-position range
     * boundary, seq 2 within its first blocks; each row as the token
     * alone gives it */
    {
        enum { NC = 24 };
        int32_t cp[NC], cs[NC], ct[NC] = { 0 }, p1, s1, t0 = 0;
        float  *cq = malloc((size_t) NC * NH * HD * 4);
        float  *co = malloc((size_t) NC * NH * HD * 4);
        float  *one = malloc((size_t) NH * HD * 4);

        for (i = 0; i < NC; i++) {
            cs[i] = i < 14 ? 0 : 2;
            cp[i] = i < 14 ? 1018 + i : i - 14;
        }
        kt_fill(cq, (int64_t) NC * NH * HD, 1.0f);
        b.n_tokens = NC;
        b.pos = cp;
        b.tok_seq = cs;
        b.tokens = ct;
        tq = llm_tensor_of(cq, LLM_F32, NH * HD, NC);
        to = llm_tensor_of(co, LLM_F32, NH * HD, NC);
        ok &= be->ops->set_batch(be, &b) == 0
              && be->ops->attention(be, &to, &tq, &kv, 0, NH, 0.125f) == 0;
        for (i = 0; i < NC; i++) {
            p1 = cp[i];
            s1 = cs[i];
            b.n_tokens = 1;
            b.pos = &p1;
            b.tok_seq = &s1;
            b.tokens = &t0;
            tq = llm_tensor_of(cq + (size_t) i * NH * HD, LLM_F32, NH * HD, 1);
            to = llm_tensor_of(one, LLM_F32, NH * HD, 1);
            ok &= be->ops->set_batch(be, &b) == 0
                  && be->ops->attention(be, &to, &tq, &kv, 0, NH, 0.125f)
                     == 0;
            if (memcmp(one, co + (size_t) i * NH * HD, NH * HD * 4) != 0) {
                printf("       chunk token %d (seq %d pos %d) differs from "
                       "the token alone\n", i, cs[i], cp[i]);
                ok = 0;
            }
        }
        free(cq);
        free(co);
        free(one);
    }
    free(kv.k);
    free(kv.v);
    free(tok);
    free(pos);
    free(seq);
    free(k);
    free(q);
    free(alone);
    free(batch);
    return ok;
}


/* kv_store into Q8_0 pages: the bytes of the reference quantizer, ties
 * (x.5 at scale 1), tiny, zero and large rows included. */
static int
kt_q8_0_store(llm_backend *be)
{
    enum { HD = 64, T = 4 };
    llm_kv_pool kv;
    llm_batch   b;
    int32_t     table[1] = { 0 }, tok[T] = { 0 }, pos[T], seq[T] = { 0 };
    int32_t     st[2] = { 0, T };
    float       k[T * HD];
    uint8_t     want[HD / 32 * 34];
    llm_tensor  tk;
    int         t, e, ok = 1;

    for (e = 0; e < HD; e++) {
        k[e] = e == 0 ? 127.0f : (float) (e % 2 ? 1 : -1) * ((e % 127) + 0.5f);
        k[HD + e] = 1e-30f * (float) (e - 31);
        k[2 * HD + e] = 0.0f;
        k[3 * HD + e] = 3e4f * sinf((float) e);
    }
    for (t = 0; t < T; t++) {
        pos[t] = t;
    }
    memset(&kv, 0, sizeof(kv));
    kv.type = LLM_Q8_0;
    kv.n_layers = 1;
    kv.n_blocks = 1;
    kv.block_size = T;
    kv.n_kv_heads = 1;
    kv.head_dim = HD;
    kv.layer_bytes = T * sizeof(want);
    kv.k = calloc(1, kv.layer_bytes);
    kv.v = calloc(1, kv.layer_bytes);
    memset(&b, 0, sizeof(b));
    b.n_tokens = T;
    b.tokens = tok;
    b.pos = pos;
    b.tok_seq = seq;
    b.n_seqs = 1;
    b.seq_start = st;
    b.block_table = table;
    b.max_blocks = 1;
    tk = llm_tensor_of(k, LLM_F32, HD, T);
    if (be->ops->set_batch(be, &b) != 0
        || be->ops->kv_store(be, &kv, 0, &tk, &tk) != 0)
    {
        printf("       kv_store: %s\n", llm_backend_error(be));
        ok = 0;
    }
    for (t = 0; t < T && ok; t++) {
        llm_quantize_row(LLM_Q8_0, k + t * HD, want, HD);
        if (memcmp((uint8_t *) kv.k + t * sizeof(want), want, sizeof(want))
            || memcmp((uint8_t *) kv.v + t * sizeof(want), want,
                      sizeof(want)))
        {
            printf("       Q8_0 row %d differs from the reference\n", t);
            ok = 0;
        }
    }
    free(kv.k);
    free(kv.v);
    return ok;
}


TEST_SUITE(kernels_attention)
{
    /* after the first (SmolLM2's shape): MHA with an odd head_dim and
     * block size, 10 query heads per KV head, Q8_0 pages */
    static const struct {
        int type, nh, nkv, hd, bs;
    } cases[] = {
        { LLM_F32, 4, 4, 36, 5 },
        { LLM_F16, 20, 2, 24, 32 },
        { LLM_Q8_0, 9, 3, 64, 16 },
        { LLM_Q8_0, 4, 4, 96, 5 },
    };
    int  isa, c;

    for (isa = LLM_ISA_SCALAR; isa <= LLM_ISA_AMX; isa++) {
        llm_backend *be = kt_open(isa, 2);

        test(kt_name("attention, F16 pages, GQA 9/3,"
                 " head_dim 64, blocks of 16 (%s)", kt_isa_name[isa]));
        if (be == NULL) {
            test_skip("this CPU lacks the instruction set");
            continue;
        }
        test_cond(kt_attn_run(be, LLM_F16, 9, 3, 64, 16));
        for (c = 0; c < (int) (sizeof(cases) / sizeof(cases[0])); c++) {
            test(kt_name("attention, %s pages, %d/%d heads, head_dim %d,"
                         " blocks of %d (%s)", cases[c].type == LLM_F16
                         ? "F16" : cases[c].type == LLM_F32 ? "F32"
                         : "Q8_0", cases[c].nh, cases[c].nkv, cases[c].hd,
                         cases[c].bs, kt_isa_name[isa]));
            test_cond(kt_attn_run(be, cases[c].type, cases[c].nh,
                                  cases[c].nkv, cases[c].hd, cases[c].bs));
        }

        test(kt_name("Q8_0 pages hold the reference quantizer's bytes,"
                     " ties included (%s)", kt_isa_name[isa]));
        test_cond(kt_q8_0_store(be));

        test(kt_name("attention rows are bit-identical alone, in a batch,"
                     " in a prefill chunk and on 1 thread, F16, F32 and"
                     " Q8_0 pages, head_dim 64 / 36 / 128, blocks of 16 /"
                     " 5 / 32 (%s)", kt_isa_name[isa]));
        {
            llm_backend *be1 = kt_open(isa, 1);
            test_cond(be1 != NULL
                      && kt_attn_invariance(be, be1, LLM_F16, 9, 3, 64, 16)
                      && kt_attn_invariance(be, be1, LLM_F32, 9, 3, 64, 16)
                      && kt_attn_invariance(be, be1, LLM_Q8_0, 9, 3, 64, 16)
                      && kt_attn_invariance(be, be1, LLM_F16, 4, 2, 36, 5)
                      && kt_attn_invariance(be, be1, LLM_F32, 8, 2, 128, 16)
                      && kt_attn_invariance(be, be1, LLM_Q8_0, 4, 1, 96, 32));
            if (be1 != NULL) {
                be1->ops->free(be1);
            }
        }
        be->ops->free(be);
    }
}


/* ------------------------------------------ backend, pool, KV checks */

static void
kt_count_task(void *arg, int ith, int nth)
{
    int *hits = arg;

    __atomic_add_fetch(&hits[ith], 1, __ATOMIC_RELAXED);
}


TEST_SUITE(kernels_backend)
{
    llm_err      err;
    llm_backend *be;
    llm_tensor   t, v;
    int          rc, i, ok;

    test("llm_backend_open: cpu, cuda without CUDA, unknown names");
    be = llm_backend_open("cpu", 2, &err);
    ok = be != NULL && strcmp(be->ops->name, "cpu") == 0;
#ifndef LLM_HAVE_CUDA
    {
        llm_backend *cu = llm_backend_open("cuda:0", 0, &err);
        ok &= cu == NULL && err.code == LLM_EUNSUP
              && strstr(err.msg, "without CUDA") != NULL;
    }
#endif
    ok &= llm_backend_open("tpu", 0, &err) == NULL && err.code == LLM_EINVAL;
    ok &= llm_backend_open("cuda:x", 0, &err) == NULL;
    test_cond(ok);

    test("tensor alloc is 64-byte aligned; row views");
    rc = llm_tensor_alloc(be, &t, LLM_Q4_1, 64, 10);
    v = llm_tensor_rows(&t, 3, 4);
    test_cond(rc == 0 && ((uintptr_t) t.data & 63) == 0 && t.nb == 40
              && v.ne[1] == 4 && (uint8_t *) v.data == (uint8_t *) t.data + 120
              && llm_tensor_rows(&t, 8, 5).ne[1] == 2);
    llm_tensor_release(be, &t);
    test_cond(t.data == NULL);

    test("tensor alloc refuses partial blocks");
    test_cond(llm_tensor_alloc(be, &t, LLM_Q4_0, 33, 1) == LLM_EINVAL);

    test("adopt_weights is zero copy; upload/download copy");
    {
        char  host[16] = "weights", back[16];
        void *dev = NULL;
        void *buf = be->ops->alloc(be, 16);
        ok = be->ops->adopt_weights(be, host, 16, &dev) == 0 && dev == host;
        ok &= be->ops->upload(be, buf, host, 16) == 0
              && be->ops->download(be, back, buf, 16) == 0
              && memcmp(back, host, 16) == 0
              && be->ops->synchronize(be) == 0;
        be->ops->release(be, buf);
        test_cond(ok);
    }

    test("thread pool: every chunk of every task runs once, 1000 times");
    {
        llm_cpu_pool *p = llm_cpu_pool_new(3, &err);
        int           hits[3] = { 0, 0, 0 };
        for (i = 0; i < 1000 && p != NULL; i++) {
            llm_cpu_pool_run(p, kt_count_task, hits, 3);
        }
        test_cond(p != NULL && hits[0] == 1000 && hits[1] == 1000
                  && hits[2] == 1000);
        llm_cpu_pool_free(p);
    }

    test("kv ops refuse bad block ids, positions and layers");
    {
        int32_t     tok[2] = { 0, 0 }, pos[2] = { 0, 20 }, sq[2] = { 0, 0 };
        int32_t     table[2] = { 0, 9 }, src[1] = { 0 }, dst[1] = { 4 };
        float       kv16[2 * 8];
        llm_kv_pool kv;
        llm_batch   b;
        llm_tensor  tk = llm_tensor_of(kv16, LLM_F32, 8, 2);

        memset(&kv, 0, sizeof(kv));
        kv.type = LLM_F32;
        kv.n_layers = 1;
        kv.n_blocks = 4;
        kv.block_size = 16;
        kv.n_kv_heads = 2;
        kv.head_dim = 4;
        kv.layer_bytes = 4 * 16 * 8 * 4;
        kv.k = calloc(1, kv.layer_bytes);
        kv.v = calloc(1, kv.layer_bytes);
        memset(kv16, 0, sizeof(kv16));
        memset(&b, 0, sizeof(b));
        b.n_tokens = 2;
        b.tokens = tok;
        b.pos = pos;
        b.tok_seq = sq;
        b.n_seqs = 1;
        b.block_table = table;
        b.max_blocks = 2;
        be->ops->set_batch(be, &b);
        ok = be->ops->kv_store(be, &kv, 0, &tk, &tk) == LLM_EINVAL;  /* 9 */
        table[1] = 1;
        ok &= be->ops->kv_store(be, &kv, 0, &tk, &tk) == 0;
        ok &= be->ops->kv_store(be, &kv, 1, &tk, &tk) == LLM_EINVAL;
        pos[1] = 40;                                    /* beyond 2 blocks */
        ok &= be->ops->kv_store(be, &kv, 0, &tk, &tk) == LLM_EINVAL;
        sq[1] = 1;                                      /* no such seq */
        pos[1] = 1;
        ok &= be->ops->kv_store(be, &kv, 0, &tk, &tk) == LLM_EINVAL;
        ok &= be->ops->kv_copy_blocks(be, &kv, src, dst, 1) == LLM_EINVAL;
        test_cond(ok);

        test("kv_copy_blocks copies K and V of every layer");
        {
            int32_t s2[2] = { 2, 0 }, d2[2] = { 1, 3 };
            size_t  bb = 16 * 8 * 4;
            uint8_t *k0 = kv.k, *v0 = kv.v;
            for (i = 0; i < (int) kv.layer_bytes; i++) {
                k0[i] = (uint8_t) i;
                v0[i] = (uint8_t) (i * 3);
            }
            ok = be->ops->kv_copy_blocks(be, &kv, s2, d2, 2) == 0
                 && memcmp(k0 + bb, k0 + 2 * bb, bb) == 0
                 && memcmp(v0 + bb, v0 + 2 * bb, bb) == 0
                 && memcmp(k0 + 3 * bb, k0, bb) == 0
                 && memcmp(v0 + 3 * bb, v0, bb) == 0;
            test_cond(ok);
        }
        free(kv.k);
        free(kv.v);
    }

    test("ops before set_batch / with a NULL batch fail cleanly");
    {
        llm_backend *b2 = llm_backend_cpu_new(1, &err);
        float        x[4];
        llm_tensor   tx = llm_tensor_of(x, LLM_F32, 4, 1);
        llm_tensor   tt = llm_tensor_of(x, LLM_F32, 4, 1);
        test_cond(b2 != NULL
                  && b2->ops->embed(b2, &tx, &tt) == LLM_ESTATE
                  && b2->ops->set_batch(b2, NULL) == LLM_EINVAL
                  && strlen(llm_backend_error(b2)) > 0);
        if (b2 != NULL) {
            b2->ops->free(b2);
        }
    }
    be->ops->free(be);
}
