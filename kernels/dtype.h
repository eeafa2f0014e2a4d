/*
 * Element types of weights, activations and KV pages.
 *
 * The numeric values are GGUF's (ggml_type) so a GGUF tensor's type field
 * maps directly.  Block-quantized types store `block` elements in
 * `type_size` bytes; a row of n elements takes n / block * type_size bytes
 * (n must be a multiple of block).  Block layouts are GGUF's, bit for bit.
 */
#ifndef LLM_DTYPE_H
#define LLM_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum llm_dtype {
    LLM_F32  = 0,
    LLM_F16  = 1,
    LLM_Q4_0 = 2,
    LLM_Q4_1 = 3,
    LLM_Q8_0 = 8,
    LLM_Q8_1 = 9,
    LLM_Q4_K = 12,
    LLM_Q5_K = 13,
    LLM_Q6_K = 14,
    LLM_Q8_K = 15,
    LLM_BF16 = 30,
    LLM_DTYPE_COUNT = 31
} llm_dtype;

typedef struct llm_dtype_info {
    const char *name;       /* "Q4_1"; NULL for ids we do not support */
    int         block;      /* elements per block (1 for plain types) */
    size_t      type_size;  /* bytes per block */
    int         is_quant;
} llm_dtype_info;

/* NULL if the id is unknown or unsupported. */
const llm_dtype_info *llm_dtype_get(int type);

/* Bytes of a row of n elements; 0 if n is not a multiple of the block. */
size_t llm_row_bytes(int type, int64_t n);

/* Scalar reference conversions (portable C). */
float    llm_f16_to_f32(uint16_t h);
uint16_t llm_f32_to_f16(float f);           /* round to nearest even */
float    llm_bf16_to_f32(uint16_t h);
uint16_t llm_f32_to_bf16(float f);          /* round to nearest even */

/* Dequantize one row of n elements of any supported type to f32.
 * Portable reference code; returns 0 or LLM_EUNSUP. */
int llm_dequantize_row(int type, const void *src, float *dst, int64_t n);

/* Quantize one f32 row to Q8_0 / Q8_1 / Q8_K / F16 / BF16 / Q4_0 / Q4_1
 * (reference, used by tools and tests); returns 0 or LLM_EUNSUP. */
int llm_quantize_row(int type, const float *src, void *dst, int64_t n);

#ifdef __cplusplus
}
#endif

#endif /* LLM_DTYPE_H */
