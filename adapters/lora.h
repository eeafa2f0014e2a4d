/*
 * One LoRA adapter as Hugging Face peft saves it: a folder holding
 * adapter_config.json and adapter_model.safetensors.
 *
 * For a base matrix W [out, in] (y = W x) the adapter adds
 * scale * B (A x), A [r, in], B [out, r], scale = lora_alpha / r (or
 * lora_alpha / sqrt(r) with use_rslora).  Targets are the attention
 * projections q/k/v/o and the MLP projections gate/up/down of the decoder
 * layers; anything else (embed_tokens, lm_head, modules_to_save, DoRA,
 * LoRA biases) is refused with a message naming the file and the field or
 * tensor.
 *
 * Tensor names accepted (peft writes the first form; the adapter name,
 * "default" or another, is kept by some tools; the "base_model.model."
 * prefix is dropped by others):
 *
 *     base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
 *     base_model.model.model.layers.N.mlp.down_proj.lora_B.default.weight
 *     model.layers.N.self_attn.v_proj.lora_A.weight
 *
 * rank_pattern / alpha_pattern keys are matched against the module name
 * ("model.layers.3.self_attn.q_proj") as peft does: the first key K (in
 * file order) for which the name matches the regular expression
 * "(.*\.)?(K)$" gives that module's rank / alpha.  Keys are POSIX extended
 * regular expressions with Python's \d and (?:...) translated, which
 * covers what peft users write ("q_proj", "layers.3.self_attn.q_proj",
 * "layers\.[0-9]+\.mlp\.down_proj").  target_modules given as a single
 * string is a regular expression the whole module name must match, as in
 * peft; "all-linear" means every supported target.
 *
 * adapter_config.json's base_model_name_or_path is recorded but not
 * enforced: the same weights go by different names on different hubs and
 * in local folders.  What is enforced is every tensor's shape against the
 * loaded model's configuration (dim, heads * head_dim,
 * kv_heads * head_dim, ffn_dim, layer count).
 *
 * GGUF llama/mistral files store wq and wk with their rows permuted for
 * adjacent-pair RoPE (cfg->rope.neox == 0).  B of q_proj and k_proj gets
 * the same row permutation so that B @ A adds to the stored matrix; for
 * Hugging Face bases and qwen2 GGUF files (neox == 1) B is kept as is.
 *
 * Weights are held in host memory as f32 (F16 and BF16 files are
 * converted).  The version is the SHA-256 of
 *     u64le(len(config)) config u64le(len(st)) st
 * over the exact bytes of adapter_config.json and
 * adapter_model.safetensors that were loaded: equal files give equal
 * versions, any change gives a new one.
 *
 * llm_lora_load() is a pure function of the files and the configuration
 * (no global state), so it may run on any thread.
 */
#ifndef LLM_LORA_H
#define LLM_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "../engine/common.h"
#include "../engine/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLM_LORA_MAX_RANK     256
#define LLM_LORA_VERSION_LEN  32

#define LLM_LORA_CONFIG_FILE   "adapter_config.json"
#define LLM_LORA_WEIGHTS_FILE  "adapter_model.safetensors"

typedef enum llm_lora_target {
    LLM_LORA_Q = 0,
    LLM_LORA_K,
    LLM_LORA_V,
    LLM_LORA_O,
    LLM_LORA_GATE,
    LLM_LORA_UP,
    LLM_LORA_DOWN,
    LLM_LORA_N_TARGETS
} llm_lora_target;

#define LLM_LORA_ALL_TARGETS  ((1u << LLM_LORA_N_TARGETS) - 1)

/* One adapted matrix of one layer. */
typedef struct llm_lora_weight {
    int     rank;           /* 0: no adapter on this matrix */
    int     in, out;        /* the base matrix is [out, in] */
    float   scale;          /* alpha / rank or alpha / sqrt(rank) */
    float  *a;              /* [rank, in] */
    float  *b;              /* [out, rank], rows in the base's layout */
    size_t  a_off, b_off;   /* offsets of a and b in llm_lora.data, in
                               floats (multiples of 16) */
    size_t  q_off;          /* offset in bytes of this matrix in the
                               int8 layout (llm_lora_q_layout) */
} llm_lora_weight;

/*
 * The int8 layout of an adapter (device pools that store int8, e.g.
 * `--adapter-dtype int8`): per matrix, from q_off, each part 64-byte
 * aligned: A [rank, in] int8, B^T [rank, out] int8, then the rank f32
 * scales of A's rows and the rank of B^T's rows (a row's value =
 * scale * int8).  lora->q_bytes in all.
 */
typedef struct llm_lora_q_layout {
    size_t  bt;             /* B^T, from q_off */
    size_t  a_scale;        /* A's row scales, from q_off */
    size_t  b_scale;        /* B^T's row scales, from q_off */
    size_t  bytes;          /* the whole matrix block */
} llm_lora_q_layout;

static inline llm_lora_q_layout
llm_lora_q_layout_of(int rank, int in, int out)
{
    llm_lora_q_layout q;

    q.bt = ((size_t) rank * (size_t) in + 63) / 64 * 64;
    q.a_scale = q.bt + ((size_t) rank * (size_t) out + 63) / 64 * 64;
    q.b_scale = q.a_scale + (size_t) rank * sizeof(float);
    q.bytes = (q.b_scale + (size_t) rank * sizeof(float) + 63) / 64 * 64;
    return q;
}

typedef struct llm_lora {
    char            *dir;
    char            *base_model;    /* base_model_name_or_path, "" if
                                       none; informational */
    int              n_layers;
    int              max_rank;
    int              n_weights;     /* weights with rank > 0 */
    unsigned         targets;       /* bit 1 << llm_lora_target for each
                                       target present in some layer */
    int              permuted;      /* q/k B rows permuted (GGUF llama) */
    size_t           bytes;         /* bytes of data */
    size_t           q_bytes;       /* bytes of the int8 layout */
    float           *data;          /* every A and B, one block */
    llm_lora_weight *w;             /* [n_layers * LLM_LORA_N_TARGETS] */
    uint8_t          version[LLM_LORA_VERSION_LEN];
    char             version_hex[17];   /* first 8 bytes, for logs */
} llm_lora;

/* What can be known from the config and the safetensors header alone. */
typedef struct llm_lora_info {
    int         r;              /* adapter_config.json "r" */
    float       alpha;          /* "lora_alpha" */
    int         use_rslora;
    int         max_rank;
    int         n_weights;
    unsigned    targets;
    size_t      bytes;          /* llm_lora.bytes once loaded */
    char        base_model[256];
} llm_lora_info;


/* "q_proj", ..., "down_proj"; NULL out of range. */
const char *llm_lora_target_name(int target);

/* Weight of layer l, target t (never NULL for valid l and t). */
static inline llm_lora_weight *
llm_lora_at(const llm_lora *lora, int l, int t)
{
    return &lora->w[(size_t) l * LLM_LORA_N_TARGETS + (size_t) t];
}

/* Checks dir's adapter_config.json and the safetensors header (names,
 * dtypes, shapes, ranks, data bounds) against cfg without reading the
 * weights.  info may be NULL. */
int llm_lora_check(const char *dir, const llm_model_config *cfg,
                   llm_lora_info *info, llm_err *err);

/* Loads the adapter in dir for a model of configuration cfg: what
 * llm_lora_check checks, and also that every weight is a finite number
 * (LLM_EFORMAT naming the tensor otherwise). */
int llm_lora_load(const char *dir, const llm_model_config *cfg,
                  llm_lora **out, llm_err *err);
void llm_lora_free(llm_lora *lora);

/* Hugging Face row order to GGUF llama order: for each head of head_dim
 * rows, dst row 2i + j = src row j * head_dim / 2 + i.  src and dst are
 * [rows, cols] and must not overlap. */
void llm_lora_permute_rows(float *dst, const float *src, int64_t rows,
                           int64_t cols, int head_dim);

/* "version_hex" form of a version: 16 hex characters and a NUL. */
char *llm_lora_version_short(const uint8_t v[LLM_LORA_VERSION_LEN],
                             char out[17]);

#ifdef __cplusplus
}
#endif

#endif /* LLM_LORA_H */
