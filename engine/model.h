/*
 * A Llama-family decoder: its hyper-parameters and its weights as backend
 * tensors.  Loaded from GGUF (one file) or from a Hugging Face folder
 * (config.json + model.safetensors or sharded with
 * model.safetensors.index.json + tokenizer.json).
 *
 * GGUF llama files store wq/wk permuted for adjacent-pair RoPE
 * (rope.neox = 0); Hugging Face files keep the original layout, which
 * rotates halves (rope.neox = 1).  Qwen2-style GGUF files are neox too.
 */
#ifndef LLM_MODEL_H
#define LLM_MODEL_H

#include "common.h"
#include "../kernels/backend.h"

typedef struct llm_model_config {
    char            arch[32];       /* "llama", "qwen2", "mistral" */
    char            name[128];
    int             n_vocab;
    int             dim;            /* hidden size */
    int             n_layers;
    int             n_heads;
    int             n_kv_heads;
    int             head_dim;
    int             ffn_dim;
    int             n_ctx;          /* trained context length */
    float           norm_eps;
    llm_rope_params rope;
    int             tied_embeddings;
    int             qkv_bias;
} llm_model_config;

typedef struct llm_layer_weights {
    llm_tensor  attn_norm;              /* [dim] f32 */
    llm_tensor  wq;                     /* [n_heads * head_dim, dim] */
    llm_tensor  wk;                     /* [n_kv_heads * head_dim, dim] */
    llm_tensor  wv;                     /* [n_kv_heads * head_dim, dim] */
    llm_tensor  wo;                     /* [dim, n_heads * head_dim] */
    llm_tensor  bq, bk, bv;             /* [out] f32; data NULL if absent */
    llm_tensor  ffn_norm;               /* [dim] f32 */
    llm_tensor  w_gate;                 /* [ffn_dim, dim] */
    llm_tensor  w_up;                   /* [ffn_dim, dim] */
    llm_tensor  w_down;                 /* [dim, ffn_dim] */
} llm_layer_weights;

typedef struct llm_model_source llm_model_source;  /* open file(s) */

typedef struct llm_model {
    llm_model_config    cfg;
    char               *path;
    int                 format;         /* LLM_FORMAT_GGUF / _HF */
    llm_tensor          tok_embd;       /* [n_vocab, dim] */
    llm_tensor          out_norm;       /* [dim] f32 */
    llm_tensor          output;         /* [n_vocab, dim]; == tok_embd when
                                           tied */
    llm_layer_weights  *layers;         /* [n_layers] */
    size_t              weight_bytes;
    size_t              copied_bytes;   /* of them, held in the backend's
                                           own memory, not the mapping */
    int                 type_counts[LLM_DTYPE_COUNT];  /* tensors per type */
    uint8_t             fingerprint[32];/* identifies the weights (for
                                           cache keys) */
    llm_backend        *be;
    llm_model_source   *src;            /* keeps the mapping alive */
    void              **owned;          /* backend buffers the model owns */
    int                 n_owned;
} llm_model;

enum { LLM_FORMAT_GGUF = 1, LLM_FORMAT_HF = 2 };

/* Progress callback for large files: done/total bytes. May be NULL. */
typedef void (*llm_progress_fn)(void *ud, size_t done, size_t total);

/* Loads a GGUF file or a Hugging Face folder onto backend be.
 * Returns NULL with err naming the file, the tensor or field and the
 * reason. */
llm_model *llm_model_load(const char *path, llm_backend *be,
                          llm_progress_fn progress, void *progress_ud,
                          llm_err *err);
void       llm_model_free(llm_model *m);

/* One line per fact, for start-up logs: architecture, sizes, types,
 * memory. Writes at most size bytes. */
void llm_model_describe(const llm_model *m, char *buf, size_t size);

/* Only the configuration (no weights), e.g. for a checker. */
int llm_model_read_config(const char *path, llm_model_config *cfg,
                          llm_err *err);

#endif /* LLM_MODEL_H */
