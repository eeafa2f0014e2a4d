/*
 * The forward pass of a Llama-family decoder over one batch (llm_batch),
 * written only in terms of backend ops, plus the activation buffers and
 * the paged KV pool it uses.
 */
#ifndef LLM_FORWARD_H
#define LLM_FORWARD_H

#include "common.h"
#include "model.h"

typedef struct llm_forward {
    llm_backend        *be;
    const llm_model    *m;
    llm_kv_pool         kv;
    int                 cap_tokens;     /* rows of a step */
    int                 cap_out;        /* rows that may need logits */

    /* activations, f32, rows = cap_tokens unless noted */
    llm_tensor          x;              /* [T, dim] residual stream */
    llm_tensor          h;              /* [T, dim] normed */
    llm_tensor          q;              /* [T, n_heads * head_dim] */
    llm_tensor          k;              /* [T, n_kv_heads * head_dim] */
    llm_tensor          v;              /* [T, n_kv_heads * head_dim] */
    llm_tensor          att;            /* [T, n_heads * head_dim] */
    llm_tensor          o;              /* [T, dim] */
    llm_tensor          gate;           /* [T, ffn_dim] */
    llm_tensor          up;             /* [T, ffn_dim] */
    llm_tensor          out_h;          /* [cap_out, dim] */
    llm_tensor          logits;         /* [cap_out, n_vocab] */

    llm_lora_seg       *segs;           /* [3 cap_tokens] scratch, host */
} llm_forward;

struct llm_lora;

/* The tokens [first, first + n) of a batch that use one adapter, whose
 * weights are resident at backend address dev (device_pool.h), in
 * elements of type (LLM_F32 or LLM_F16). */
typedef struct llm_lora_span {
    int32_t                 first;
    int32_t                 n;
    const struct llm_lora  *lora;
    const uint8_t          *dev;
    int                     type;
} llm_lora_span;

/* Allocates activations for cap_tokens rows per step and a KV pool of
 * n_blocks blocks of block_size tokens of kv_type. */
int  llm_forward_init(llm_forward *fw, llm_backend *be, const llm_model *m,
                      int cap_tokens, int cap_out, int n_blocks,
                      int block_size, int kv_type, llm_err *err);
void llm_forward_free(llm_forward *fw);

/* Bytes of one KV block over all layers (K and V). */
size_t llm_forward_kv_block_bytes(const llm_model_config *c, int block_size,
                                  int kv_type);

/* Runs the model on batch b, with the adapters of spans[n_spans] (tokens
 * outside every span use the base model alone), and copies the logits of
 * b->out_rows into host_logits [b->n_out, n_vocab].  host_logits may be
 * NULL where llm_forward_logits() is not (a backend in host memory):
 * the logits are then read there, without the copy. */
int  llm_forward_run(llm_forward *fw, const llm_batch *b,
                     const llm_lora_span *spans, int n_spans,
                     float *host_logits, llm_err *err);

/* The last run's logits [n_out, n_vocab] in place, valid until the next
 * run, where the backend's memory is the host's; else NULL. */
float *llm_forward_logits(llm_forward *fw);

#endif /* LLM_FORWARD_H */
