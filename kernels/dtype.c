/*
 * Element type table and scalar f16/bf16 conversions (see dtype.h).
 * Block sizes and byte sizes are GGUF's.
 */
#include "dtype.h"

#include <string.h>


static const llm_dtype_info dtype_table[LLM_DTYPE_COUNT] = {
    [LLM_F32]  = { "F32",  1,   4,   0 },
    [LLM_F16]  = { "F16",  1,   2,   0 },
    [LLM_Q4_0] = { "Q4_0", 32,  18,  1 },   /* f16 d, 16 B nibbles */
    [LLM_Q4_1] = { "Q4_1", 32,  20,  1 },   /* f16 d, f16 m, 16 B */
    [LLM_Q8_0] = { "Q8_0", 32,  34,  1 },   /* f16 d, 32 int8 */
    [LLM_Q8_1] = { "Q8_1", 32,  36,  1 },   /* f16 d, f16 s, 32 int8 */
    [LLM_Q4_K] = { "Q4_K", 256, 144, 1 },
    [LLM_Q5_K] = { "Q5_K", 256, 176, 1 },
    [LLM_Q6_K] = { "Q6_K", 256, 210, 1 },
    [LLM_Q8_K] = { "Q8_K", 256, 292, 1 },   /* f32 d, 256 int8, 16 i16 */
    [LLM_BF16] = { "BF16", 1,   2,   0 },
};


const llm_dtype_info *
llm_dtype_get(int type)
{
    if (type < 0 || type >= LLM_DTYPE_COUNT
        || dtype_table[type].name == NULL)
    {
        return NULL;
    }
    return &dtype_table[type];
}


size_t
llm_row_bytes(int type, int64_t n)
{
    const llm_dtype_info *ti = llm_dtype_get(type);

    if (ti == NULL || n < 0 || n % ti->block != 0) {
        return 0;
    }
    return (size_t) (n / ti->block) * ti->type_size;
}


float
llm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    float    f;

    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {
            /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}


uint16_t
llm_f32_to_f16(float f)
{
    uint32_t x, sign, mant;
    int32_t  exp;

    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000;
    exp = (int32_t) ((x >> 23) & 0xff);
    mant = x & 0x7fffff;

    if (exp == 0xff) {                          /* inf or nan */
        return (uint16_t) (sign | 0x7c00 | (mant ? 0x200 : 0));
    }
    exp = exp - 127 + 15;
    if (exp >= 0x1f) {                          /* overflow */
        return (uint16_t) (sign | 0x7c00);
    }
    if (exp <= 0) {                             /* subnormal or zero */
        uint32_t m, shift, half, rest, r;
        if (exp < -10) {
            return (uint16_t) sign;
        }
        m = mant | 0x800000;
        shift = (uint32_t) (14 - exp);
        r = m >> shift;
        rest = m & ((1u << shift) - 1);
        half = 1u << (shift - 1);
        if (rest > half || (rest == half && (r & 1))) {
            r++;
        }
        return (uint16_t) (sign | r);
    }
    {
        uint32_t r = ((uint32_t) exp << 10) | (mant >> 13);
        uint32_t rest = mant & 0x1fff;
        if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) {
            r++;                                /* may carry into exp */
        }
        return (uint16_t) (sign | r);
    }
}


float
llm_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t) h << 16;
    float    f;

    memcpy(&f, &bits, 4);
    return f;
}


uint16_t
llm_f32_to_bf16(float f)
{
    uint32_t x;

    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) {        /* nan: keep it quiet */
        return (uint16_t) ((x >> 16) | 64);
    }
    return (uint16_t) ((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}
