/*
 * The CPU backend's ROWS16 weight layout (kernels/cpu/rows16.c): weights
 * adopted through adopt_tensor on the AVX-512 kernels are rearranged by
 * groups of 16 rows; every product and embedding read from them must
 * have the same bits as from the plain rows, at any number of activation
 * rows, for row counts that do and do not fill the last group.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/common.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "test.h"


static uint64_t r16_rng = 0x9e3779b97f4a7c15ull;


static float
r16_uni(void)
{
    r16_rng = r16_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float) ((r16_rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}


/* Random quantized rows [m, k] of type (quantized from floats). */
static uint8_t *
r16_weights(int type, int64_t m, int64_t k)
{
    size_t   rb = llm_row_bytes(type, k);
    uint8_t *w = malloc(rb * (size_t) m);
    float   *row = malloc(sizeof(float) * (size_t) k);
    int64_t  j, i;

    for (j = 0; j < m; j++) {
        uint8_t *wr = w + (size_t) j * rb;

        if (type == LLM_Q4_K || type == LLM_Q5_K || type == LLM_Q6_K) {
            /* no quantizer for these: random bytes, sane f16 scales */
            size_t   bs = llm_dtype_get(type)->type_size, off;
            uint16_t d = llm_f32_to_f16(0.002f + 0.01f * (float) (j % 7));

            for (off = 0; off < rb; off++) {
                r16_uni();
                wr[off] = (uint8_t) (r16_rng >> 32);
            }
            for (off = 0; off < rb; off += bs) {
                memcpy(wr + off + (type == LLM_Q6_K ? 208 : 0), &d, 2);
                if (type != LLM_Q6_K) {
                    memcpy(wr + off + 2, &d, 2);
                }
            }
            continue;
        }
        for (i = 0; i < k; i++) {
            row[i] = r16_uni() * (1.0f + (float) (j % 5));
        }
        llm_quantize_row(type, row, wr, k);
    }
    free(row);
    return w;
}



/* A CPU backend on isa ("avx512", "amx", "avx2"); NULL where the CPU
 * lacks it. */
static llm_backend *
r16_open(const char *isa)
{
    llm_backend *be;
    llm_err      err;
    int          want = strcmp(isa, "amx") == 0 ? LLM_ISA_AMX
                        : strcmp(isa, "avx512") == 0 ? LLM_ISA_AVX512
                        : LLM_ISA_AVX2;

    setenv("LLM_CPU_ISA", isa, 1);
    be = llm_cpu_isa_detect() == want ? llm_backend_cpu_new(2, &err) : NULL;
    unsetenv("LLM_CPU_ISA");
    return be;
}


static const int r16_types[] = { LLM_Q4_0, LLM_Q4_1, LLM_Q8_0, LLM_Q4_K,
                                  LLM_Q5_K, LLM_Q6_K };
#define R16_TYPES  6


/* Row lengths for a type: blocks of 32 or super-blocks of 256, past one
 * segment of the kernels (64 blocks of 32) in the last. */
static void
r16_ks(int type, int64_t ks[3])
{
    int big = type == LLM_Q4_K || type == LLM_Q5_K || type == LLM_Q6_K;

    ks[0] = big ? 256 : 32;
    ks[1] = big ? 768 : 576;
    ks[2] = big ? 2304 : 2080;
}


/* Test names with their own storage (the runner prints them later). */
static const char *
r16_name(const char *what, const char *isa)
{
    static char ring[8][160];
    static int  next;
    char       *p = ring[next++ % 8];

    snprintf(p, sizeof(ring[0]), "%s (%s)", what, isa);
    return p;
}


TEST_SUITE(rows16_layout)
{
    static const int64_t rows[] = { 16, 35, 48 };
    int64_t              ks[3];
    int                  ti, ri, ki, ok = 1;

    test("ROWS16: every row comes back byte for byte (whole groups and"
         " the rows after the last), every type");
    for (ti = 0; ti < R16_TYPES; ti++) {
        r16_ks(r16_types[ti], ks);
        for (ri = 0; ri < 3; ri++) {
            for (ki = 0; ki < 2; ki++) {
                int      type = r16_types[ti];
                int64_t  m = rows[ri], k = ks[ki], r;
                size_t   rb = llm_row_bytes(type, k);
                uint8_t *w = r16_weights(type, m, k);
                uint8_t *p = malloc(rb * (size_t) m);
                uint8_t *row = malloc(rb);

                llm_cpu_rows16_pack(type, w, m, k, p);
                for (r = 0; r < m; r++) {
                    llm_cpu_rows16_row(type, p, m, r, k, row);
                    ok &= memcmp(row, w + (size_t) r * rb, rb) == 0;
                }
                /* a whole group is rearranged, not copied */
                ok &= memcmp(p, w, rb * 16) != 0;
                free(w);
                free(p);
                free(row);
            }
        }
    }
    test_cond(ok);
}


/* out (n x m) of x W^T + bias with W as given; 0 on success. */
static int
r16_product(llm_backend *be, const llm_tensor *w, const float *x, int64_t n,
            const float *bias, float *out)
{
    llm_tensor tx = llm_tensor_of((void *) x, LLM_F32, w->ne[0], n);
    llm_tensor to = llm_tensor_of(out, LLM_F32, w->ne[1], n);
    llm_tensor tb = llm_tensor_of((void *) bias, LLM_F32, w->ne[1], 1);

    return be->ops->matmul(be, &to, &tx, w, bias != NULL ? &tb : NULL);
}


static void
r16_matmul_on(const char *isa)
{
    static const int64_t ns[] = { 1, 2, 3, 5, 16, 17, 32, 33 };
    static const int64_t ms[] = { 16, 48, 67 };
    int64_t              ks[3];
    llm_backend         *be = r16_open(isa);
    int                  ti, mi, ki, ni, ok = 1, adopted = 1;

    test(r16_name("ROWS16 weights: products bit-identical to the plain"
                  " rows, every type, 1 to 33 activation rows, bias or none",
                  isa));
    if (be == NULL) {
        test_skip("this CPU lacks the instruction set");
        return;
    }
    for (ti = 0; ti < R16_TYPES; ti++) {
        r16_ks(r16_types[ti], ks);
        for (mi = 0; mi < 3; mi++) {
            for (ki = 0; ki < 3; ki++) {
                int         type = r16_types[ti];
                int64_t     m = ms[mi], k = ks[ki];
                size_t      rb = llm_row_bytes(type, k);
                uint8_t    *w = r16_weights(type, m, k);
                llm_tensor  plain = llm_tensor_of(w, type, k, m);
                llm_tensor  packed = plain;
                float      *x = malloc(sizeof(float) * 33 * (size_t) k);
                float      *bias = malloc(sizeof(float) * (size_t) m);
                float      *o1 = malloc(sizeof(float) * 33 * (size_t) m);
                float      *o2 = malloc(sizeof(float) * 33 * (size_t) m);
                int64_t     i;

                for (i = 0; i < 33 * k; i++) {
                    x[i] = r16_uni();
                }
                for (i = 0; i < m; i++) {
                    bias[i] = r16_uni();
                }
                ok &= llm_backend_adopt_tensor(be, &packed, w,
                                               rb * (size_t) m) == 0;
                adopted &= packed.layout == LLM_LAYOUT_ROWS16
                           && packed.data != (void *) w;
                for (ni = 0; ni < 8; ni++) {
                    int64_t n = ns[ni];

                    memset(o1, 0, sizeof(float) * (size_t) (n * m));
                    memset(o2, 0xff, sizeof(float) * (size_t) (n * m));
                    ok &= r16_product(be, &plain, x, n, ni % 2 ? bias : NULL,
                                      o1) == 0
                          && r16_product(be, &packed, x, n,
                                         ni % 2 ? bias : NULL, o2) == 0;
                    if (memcmp(o1, o2, sizeof(float) * (size_t) (n * m))
                        != 0)
                    {
                        printf("       %s [%lld, %lld], %lld rows: ROWS16"
                               " differs from plain rows\n",
                               llm_dtype_get(type)->name, (long long) m,
                               (long long) k, (long long) n);
                        ok = 0;
                    }
                }
                free(w);
                free(x);
                free(bias);
                free(o1);
                free(o2);
            }
        }
    }
    test_cond(ok && adopted);
    be->ops->free(be);
}


/* matmul_n over ROWS16 q, k, v (and a plain one among them) gives each
 * product as matmul alone; embed reads a ROWS16 table's rows. */
static void
r16_others_on(const char *isa)
{
    enum { K = 576, N = 5, V = 67, T = 6 };
    static const int64_t ms[3] = { 576, 192, 192 };
    llm_backend       *be = r16_open(isa);
    uint8_t           *w[3];
    llm_tensor         tw[3], to[3], tx, *outs[3];
    const llm_tensor  *ws[3];
    float             *x, *one[3], *grp[3];
    int                i, ok = 1;

    test(r16_name("ROWS16 weights: matmul_n as matmul alone; embed from a"
                  " ROWS16 table", isa));
    if (be == NULL) {
        test_skip("this CPU lacks the instruction set");
        return;
    }
    x = malloc(sizeof(float) * N * K);
    for (i = 0; i < N * K; i++) {
        x[i] = r16_uni();
    }
    tx = llm_tensor_of(x, LLM_F32, K, N);
    for (i = 0; i < 3; i++) {
        int type = r16_types[i];

        w[i] = r16_weights(type, ms[i], K);
        tw[i] = llm_tensor_of(w[i], type, K, ms[i]);
        if (i < 2) {
            ok &= llm_backend_adopt_tensor(be, &tw[i], w[i],
                                           tw[i].nb * (size_t) ms[i]) == 0
                  && tw[i].layout == LLM_LAYOUT_ROWS16;
        }
        one[i] = malloc(sizeof(float) * N * (size_t) ms[i]);
        grp[i] = malloc(sizeof(float) * N * (size_t) ms[i]);
        to[i] = llm_tensor_of(one[i], LLM_F32, ms[i], N);
        ok &= be->ops->matmul(be, &to[i], &tx, &tw[i], NULL) == 0;
        to[i] = llm_tensor_of(grp[i], LLM_F32, ms[i], N);
        outs[i] = &to[i];
        ws[i] = &tw[i];
    }
    ok &= be->ops->matmul_n(be, outs, &tx, ws, NULL, 3) == 0;
    for (i = 0; i < 3; i++) {
        ok &= memcmp(one[i], grp[i], sizeof(float) * N * (size_t) ms[i])
              == 0;
    }

    for (i = 0; i < 2; i++) {
        /* token ids in whole groups and after the last (V = 67); a Q8_0
         * table and a Q6_K one (llama.cpp's Q4_K_M files embed in Q6_K) */
        int         type = i == 0 ? LLM_Q8_0 : LLM_Q6_K;
        int64_t     dim = i == 0 ? K : 256;
        int32_t     tokens[T] = { 0, 17, 31, 47, 64, 66 };
        int32_t     pos[T] = { 0, 1, 2, 3, 4, 5 }, seq[T] = { 0 };
        llm_batch   b;
        static float e1[T * K], e2[T * K];
        uint8_t    *tab = r16_weights(type, V, dim);
        llm_tensor  plain = llm_tensor_of(tab, type, dim, V), packed = plain;
        llm_tensor  te1 = llm_tensor_of(e1, LLM_F32, dim, T);
        llm_tensor  te2 = llm_tensor_of(e2, LLM_F32, dim, T);

        memset(&b, 0, sizeof(b));
        b.n_tokens = T;
        b.tokens = tokens;
        b.pos = pos;
        b.tok_seq = seq;
        b.n_seqs = 1;
        ok &= llm_backend_adopt_tensor(be, &packed, tab,
                                       plain.nb * (size_t) V) == 0
              && packed.layout == LLM_LAYOUT_ROWS16
              && be->ops->set_batch(be, &b) == 0
              && be->ops->embed(be, &te1, &plain) == 0
              && be->ops->embed(be, &te2, &packed) == 0
              && memcmp(e1, e2, sizeof(float) * T * (size_t) dim) == 0;
        free(tab);
    }
    for (i = 0; i < 3; i++) {
        free(w[i]);
        free(one[i]);
        free(grp[i]);
    }
    free(x);
    test_cond(ok);
    be->ops->free(be);
}


TEST_SUITE(rows16_matmul)
{
    llm_backend *be;

    r16_matmul_on("avx512");
    r16_matmul_on("amx");
    r16_others_on("avx512");
    r16_others_on("amx");

    test("ROWS16: the AVX2 kernels keep weights in place, and a backend"
         " whose kernels cannot read ROWS16 refuses it");
    be = r16_open("avx2");
    if (be == NULL) {
        test_skip("this CPU lacks AVX2");
        return;
    }
    {
        uint8_t    *w = r16_weights(LLM_Q4_1, 32, 64);
        llm_tensor  t = llm_tensor_of(w, LLM_Q4_1, 64, 32), bad = t;
        float       x[64], o[32];
        int         ok;

        memset(x, 0, sizeof(x));
        ok = llm_backend_adopt_tensor(be, &t, w, t.nb * 32) == 0
             && t.layout == LLM_LAYOUT_ROWS && t.data == (void *) w;
        bad.layout = LLM_LAYOUT_ROWS16;
        ok &= r16_product(be, &bad, x, 1, NULL, o) == LLM_EINVAL;
        bad.layout = 7;
        ok &= r16_product(be, &bad, x, 1, NULL, o) == LLM_EINVAL;
        free(w);
        test_cond(ok);
    }
    be->ops->free(be);
}
