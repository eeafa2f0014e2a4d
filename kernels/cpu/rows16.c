/*
 * The ROWS16 weight layout (LLM_LAYOUT_ROWS16, kernels/backend.h): the
 * blocks of Q4_0, Q4_1, Q8_0 and of the K-quants rearranged at load so
 * that the batched AVX-512 / AMX kernels read 16 rows' block as whole
 * vectors instead of transposing or gathering it on every product
 * (matmul_avx512.c t_repack: a fifth of a 32-row product's time on
 * SmolLM2's shapes).
 *
 * A group of 16 rows keeps its own bytes (16 x nb, nb the plain row
 * size); block b of the group, 16 x bs bytes at 16 * bs * b, holds the
 * block's fields one after the other, each as 16 rows side by side
 * (lane j = row j of the group):
 *
 *   Q4_0, Q8_0:  16 x d (f16), then for each 4 quant bytes u, 16 x u
 *   Q4_1:        16 x d, 16 x m, then 16 x each 4 quant bytes
 *   Q4_K, Q5_K:  16 x each 4 bytes of the super-block
 *   Q6_K:        16 x each 4 of its first 208 bytes, then 16 x d
 *
 * Rows past the last whole group of 16 are left as they are.  The
 * weights stay quantized and take the same bytes.
 */
#include "cpu.h"

#include <string.h>


/* A block of a ROWS16 type: its elements, its bytes, and how they are
 * cut into fields across the 16 rows: nh leading 2-byte fields (the f16
 * scales of blocks of 32), then nd 4-byte ones, then nt trailing 2-byte
 * ones (Q6_K's d).  In the group's block, field by field, each field's 16
 * rows side by side. */
typedef struct {
    int elems, bs, nh, nd, nt;
} r16_shape;


static int
block_shape(int type, r16_shape *sh)
{
    static const struct { int type; r16_shape sh; } shapes[] = {
        { LLM_Q4_0, {  32,  18, 1,  4, 0 } },
        { LLM_Q4_1, {  32,  20, 2,  4, 0 } },
        { LLM_Q8_0, {  32,  34, 1,  8, 0 } },
        { LLM_Q4_K, { 256, 144, 0, 36, 0 } },
        { LLM_Q5_K, { 256, 176, 0, 44, 0 } },
        { LLM_Q6_K, { 256, 210, 0, 52, 1 } },
    };
    size_t i;

    for (i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        if (shapes[i].type == type) {
            *sh = shapes[i].sh;
            return 1;
        }
    }
    return 0;
}


int
llm_cpu_rows16_type(int type)
{
    r16_shape sh;

    return block_shape(type, &sh);
}


int
llm_cpu_layout_ok(const llm_tensor *t)
{
    return t->layout == LLM_LAYOUT_ROWS
           || (t->layout == LLM_LAYOUT_ROWS16 && llm_cpu_rows16_type(t->type)
               && t->nb == llm_row_bytes(t->type, t->ne[0]));
}


/* Moves row j's block between its plain bytes and its group's block:
 * to_group 1 from plain to group, 0 back. */
static void
block_move(const r16_shape *sh, int j, uint8_t *plain, uint8_t *group,
           int to_group)
{
    int f;

    for (f = 0; f < sh->nh + sh->nd + sh->nt; f++) {
        int      w = f < sh->nh || f >= sh->nh + sh->nd ? 2 : 4;
        int      po = f < sh->nh ? 2 * f
                      : f < sh->nh + sh->nd ? 2 * sh->nh + 4 * (f - sh->nh)
                      : 2 * sh->nh + 4 * sh->nd + 2 * (f - sh->nh - sh->nd);
        int      go = f < sh->nh ? 32 * f
                      : f < sh->nh + sh->nd ? 32 * sh->nh + 64 * (f - sh->nh)
                      : 32 * sh->nh + 64 * sh->nd
                        + 32 * (f - sh->nh - sh->nd);
        uint8_t *g = group + go + w * j, *p = plain + po;

        memcpy(to_group ? g : p, to_group ? p : g, (size_t) w);
    }
}


/* Moves row j of a whole group (group: its first byte) between its
 * plain bytes and the group's blocks, every block of the row. */
static void
row_move(const r16_shape *sh, int64_t nb, uint8_t *group, int j,
         uint8_t *plain, int to_group)
{
    int64_t b;

    for (b = 0; b < nb; b++) {
        block_move(sh, j, plain + (size_t) b * (size_t) sh->bs,
                   group + (size_t) b * 16 * (size_t) sh->bs, to_group);
    }
}


void
llm_cpu_rows16_pack(int type, const uint8_t *src, int64_t rows, int64_t k,
                    uint8_t *dst)
{
    r16_shape sh;
    int64_t   nb, g;
    size_t    rb;
    int       j;

    if (!block_shape(type, &sh)) {
        return;
    }
    nb = k / sh.elems;
    rb = (size_t) nb * (size_t) sh.bs;
    for (g = 0; g + 16 <= rows; g += 16) {
        for (j = 0; j < 16; j++) {
            row_move(&sh, nb, dst + (size_t) g * rb, j,
                     (uint8_t *) src + (size_t) (g + j) * rb, 1);
        }
    }
    if (g < rows) {
        memcpy(dst + (size_t) g * rb, src + (size_t) g * rb,
               (size_t) (rows - g) * rb);
    }
}


void
llm_cpu_rows16_row(int type, const uint8_t *w, int64_t rows, int64_t r,
                   int64_t k, uint8_t *row)
{
    r16_shape sh;
    int64_t   nb, g = r - r % 16;
    size_t    rb;

    if (!block_shape(type, &sh)) {
        return;
    }
    nb = k / sh.elems;
    rb = (size_t) nb * (size_t) sh.bs;
    if (g + 16 > rows) {
        memcpy(row, w + (size_t) r * rb, rb);
    } else {
        row_move(&sh, nb, (uint8_t *) w + (size_t) g * rb, (int) (r - g),
                 row, 0);
    }
}


const uint8_t *
llm_cpu_tensor_row(const llm_tensor *t, int64_t r, uint8_t *buf)
{
    if (t->layout != LLM_LAYOUT_ROWS16) {
        return (const uint8_t *) t->data + (size_t) r * t->nb;
    }
    llm_cpu_rows16_row(t->type, t->data, t->ne[1], r, t->ne[0], buf);
    return buf;
}
