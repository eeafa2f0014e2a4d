/*
 * The multi-LoRA op of one decode step, on any backend (bench-kernels -L
 * on the CPU, gpubench --lora on a GPU): n_adapters x rows rows, one
 * segment of `rows` rows per adapter (ranks 8 and 16 alternating), all seven
 * projections in the forward pass's four calls per layer (q k v; o; gate
 * up; down), every adapter's weights in their own device allocation, in
 * the adapter pool's format for the type (f32; f16 or int8 with B
 * transposed).  Memory bound: the figure is bytes of weights per second.
 */
#ifndef LLM_BENCH_LORA_STEP_H
#define LLM_BENCH_LORA_STEP_H

#include "kernels/backend.h"

typedef struct llm_lora_step_shape {
    int     n_layers;
    int     dim;            /* hidden size: q, o, gate and up read it */
    int     q_dim;          /* n_heads * head_dim */
    int     kv_dim;         /* n_kv_heads * head_dim */
    int     ffn;
    int     n_adapters;
    int     rows;           /* decode rows per adapter (0: 1) */
} llm_lora_step_shape;

typedef struct llm_lora_step_result {
    double  bytes;          /* adapter weights read by one step */
    double  flops;          /* 2 x its multiply-adds */
    double  best_s;         /* fastest pass */
    double  median_s;
} llm_lora_step_result;

/* Times `passes` steps (after one untimed); 0, or -1 with the backend's
 * error printed. */
int llm_bench_lora_step(llm_backend *be, int type,
                        const llm_lora_step_shape *sh, int passes,
                        llm_lora_step_result *res);

#endif /* LLM_BENCH_LORA_STEP_H */
