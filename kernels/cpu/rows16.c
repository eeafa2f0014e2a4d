/*
 * The ROWS16 weight layout (LLM_LAYOUT_ROWS16, kernels/backend.h): the
 * blocks of 32 of Q4_0, Q4_1 and Q8_0 rearranged at load so that the
 * batched AVX-512 / AMX kernels read 16 rows' block as whole vectors
 * instead of transposing it on every product (matmul_avx512.c t_repack:
 * a fifth of a 32-row product's time on SmolLM2's shapes).
 *
 * A group of 16 rows keeps its own bytes (16 x nb, nb the plain row
 * size); block b of the group, 16 x bs bytes at 16 * bs * b, holds
 *
 *   the f16 scales, field by field:  16 x d  (then 16 x m for Q4_1)
 *   the quants, 4 bytes at a time:   for u < qb / 4, 16 x bytes
 *                                    4u .. 4u+3 of each row's quants
 *
 * lane j of every field being row j of the group (qb: 16 quant bytes for
 * Q4_0 and Q4_1, 32 for Q8_0).  Rows past the last whole group of 16 are
 * left as they are.  The weights stay quantized and take the same bytes.
 */
#include "cpu.h"

#include <string.h>


/* Block bytes, f16 scale fields and quant bytes of a ROWS16 type. */
static int
block_shape(int type, int *bs, int *ns, int *qb)
{
    switch (type) {
    case LLM_Q4_0: *bs = 18; *ns = 1; break;
    case LLM_Q4_1: *bs = 20; *ns = 2; break;
    case LLM_Q8_0: *bs = 34; *ns = 1; break;
    default:       return 0;
    }
    *qb = *bs - 2 * *ns;
    return 1;
}


int
llm_cpu_rows16_type(int type)
{
    int bs, ns, qb;

    return block_shape(type, &bs, &ns, &qb);
}


/* Moves row j's block between its plain bytes and its group's block:
 * to_group 1 from plain to group, 0 back.  The scale fields are 2
 * bytes and the quants 4 at a time. */
static void
block_move(int ns, int qb, int j, uint8_t *plain, uint8_t *group,
           int to_group)
{
    int f, u;

    for (f = 0; f < ns; f++) {
        uint8_t *g = group + 32 * f + 2 * j, *p = plain + 2 * f;

        memcpy(to_group ? g : p, to_group ? p : g, 2);
    }
    for (u = 0; u < qb / 4; u++) {
        uint8_t *g = group + 32 * ns + 64 * u + 4 * j;
        uint8_t *p = plain + 2 * ns + 4 * u;

        memcpy(to_group ? g : p, to_group ? p : g, 4);
    }
}


void
llm_cpu_rows16_pack(int type, const uint8_t *src, int64_t rows, int64_t k,
                    uint8_t *dst)
{
    int      bs, ns, qb, j;
    int64_t  nb, g, b;
    size_t   row_bytes;

    if (!block_shape(type, &bs, &ns, &qb)) {
        return;
    }
    nb = k / 32;
    row_bytes = (size_t) nb * (size_t) bs;
    for (g = 0; g + 16 <= rows; g += 16) {
        const uint8_t *s = src + (size_t) g * row_bytes;
        uint8_t       *d = dst + (size_t) g * row_bytes;

        for (b = 0; b < nb; b++) {
            uint8_t *db = d + (size_t) b * 16 * (size_t) bs;

            for (j = 0; j < 16; j++) {
                block_move(ns, qb, j, (uint8_t *) s + (size_t) j * row_bytes
                                      + (size_t) b * (size_t) bs, db, 1);
            }
        }
    }
    if (g < rows) {
        memcpy(dst + (size_t) g * row_bytes, src + (size_t) g * row_bytes,
               (size_t) (rows - g) * row_bytes);
    }
}


void
llm_cpu_rows16_row(int type, const uint8_t *w, int64_t rows, int64_t r,
                   int64_t k, uint8_t *row)
{
    int      bs, ns, qb;
    int64_t  nb, b, g = r - r % 16;
    size_t   row_bytes;

    if (!block_shape(type, &bs, &ns, &qb)) {
        return;
    }
    nb = k / 32;
    row_bytes = (size_t) nb * (size_t) bs;
    if (g + 16 > rows) {
        memcpy(row, w + (size_t) r * row_bytes, row_bytes);
        return;
    }
    for (b = 0; b < nb; b++) {
        block_move(ns, qb, (int) (r % 16), row + (size_t) b * (size_t) bs,
                   (uint8_t *) w + (size_t) g * row_bytes
                   + (size_t) b * 16 * (size_t) bs, 0);
    }
}
