/*
 * The engine: one model on one backend, serving many sequences with
 * continuous (iteration-level) batching over a paged KV cache.
 *
 * Single-threaded API: the owner (llm-run, llm-bench, the llm-engine
 * daemon's loop) calls submit/cancel between steps and step() to advance
 * every running sequence by one iteration.  The backend uses its own
 * threads inside a step.  Results come back as events through a callback
 * during step().
 */
#ifndef LLM_ENGINE_H
#define LLM_ENGINE_H

#include "common.h"
#include "model.h"
#include "sampler.h"

typedef struct llm_engine llm_engine;

/* Adapter weights on the device (llm_engine_params.adapter_dtype). */
enum {
    LLM_ADAPTER_DEFAULT = 0,    /* "auto": int8 on a base whose projections
                                   hold fewer than 8 bits per weight (its
                                   own rounding hides the copy's: bench/
                                   RESULTS.md, "int8 adapters on the
                                   quantized base"), else f16, where the
                                   backend's LoRA op takes them; else f32 */
    LLM_ADAPTER_F32,            /* as loaded */
    LLM_ADAPTER_F16,            /* half the bytes of f32 to read per step */
    LLM_ADAPTER_INT8            /* a scale per row, a quarter of the bytes
                                   of f32; lossy */
};

/* "auto", "f16", "f32" or "int8" as LLM_ADAPTER_*, or -1. */
int llm_adapter_dtype_parse(const char *s);
/* The name of an LLM_ADAPTER_* ("auto" for LLM_ADAPTER_DEFAULT). */
const char *llm_adapter_dtype_name(int d);

/* KV page types by name ("f16", "f32", "q8_0"): the type, or -1. */
int         llm_kv_type_parse(const char *name);
const char *llm_kv_type_name(int type);


typedef struct llm_engine_params {
    const char *model_path;
    const char *device;         /* "cpu" (default) or "cuda:N" */
    int         n_threads;      /* 0: all cores */
    size_t      kv_memory;      /* bytes for KV pages; 0: 256 MiB */
    int         kv_type;        /* LLM_F16, LLM_F32 or LLM_Q8_0 (the
                                   zero value: llm-engine and llm-run
                                   ask for F16) */
    int         max_seqs;       /* running sequences at once; 0: 64 */
    int         max_step_tokens;/* token budget per step; 0: 512 */
    int         n_ctx;          /* max sequence length; 0: model's */
    llm_progress_fn progress;   /* load progress, may be NULL */
    void       *progress_ud;

    /* LoRA adapters: every subfolder of adapter_dir holding a PEFT
     * adapter is registered under its folder name (NULL: none at start;
     * llm_engine_adapter_register adds more at run time). */
    const char *adapter_dir;
    size_t      adapter_host_memory;    /* host cache budget; 0: 1 GiB */
    size_t      adapter_device_memory;  /* device pool budget; 0: 512 MiB */
    int         adapter_dtype;  /* LLM_ADAPTER_*: adapter weights on
                                   the device */
    /* told about each adapter_dir folder refused (may be NULL) */
    void      (*adapter_refused)(void *ud, const char *name,
                                 const llm_err *err);
    void       *adapter_refused_ud;

    /* Prefix cache (on unless prefix_cache_off): full KV blocks are
     * named by a hash chain (prefix_cache.h) and reused by later
     * sequences with the same prefix, adapter and cache namespace. */
    int         prefix_cache_off;
    /* Its Redis tier (kv_tier.h), when kv_tier_addr is set
     * ("host:port" or "unix:/path"); zero values: the tier's defaults. */
    const char *kv_tier_addr;
    const char *kv_tier_prefix;
    uint32_t    kv_tier_ttl_s;
    uint64_t    kv_tier_budget;
    uint32_t    kv_tier_timeout_ms;
    /* Called from another thread when the engine has new work that does
     * not come through the owner (a Redis lookup finished); may be NULL:
     * the owner then polls while llm_engine_stalled(). */
    void      (*wake)(void *ud);
    void       *wake_ud;
} llm_engine_params;

enum {
    LLM_FINISH_NONE = 0,
    LLM_FINISH_STOP,        /* EOS / stop token */
    LLM_FINISH_LENGTH,      /* max_tokens or context end */
    LLM_FINISH_CANCELLED,
    LLM_FINISH_ERROR,
    LLM_FINISH_TIMEOUT      /* waited in the queue past its deadline */
};

/* Priority classes: strict priority between classes at admission and
 * preemption; fair share by weighted served tokens within a class. */
enum {
    LLM_CLASS_INTERACTIVE = 0,
    LLM_CLASS_STANDARD    = 1,
    LLM_CLASS_BATCH       = 2,
    LLM_N_CLASSES         = 3
};

typedef struct llm_request {
    const int32_t  *prompt;         /* copied at submit */
    int             n_prompt;
    int             max_tokens;     /* > 0 */
    llm_sampling    sampling;
    const int32_t  *stop_ids;       /* extra stop tokens (copied) */
    int             n_stop_ids;
    int             ignore_eos;
    int             prompt_logits;  /* 1: emit LLM_EV_LOGITS for every
                                       prompt position (teacher forcing) */
    uint64_t        user_tag;       /* returned in every event */
    const char     *adapter;        /* registered adapter name, or NULL /
                                       "" for the base model */

    /* Multi-tenant scheduling (zero values: standard class, weight 1,
     * the anonymous tenant, no deadline). */
    int             priority;       /* LLM_CLASS_* */
    const char     *tenant;         /* fair-share account (copied) */
    int             weight;         /* fair-share weight, >= 1 */
    uint32_t        queue_timeout_ms;   /* 0: wait as long as it takes */

    /* Prefix cache namespaces (copied; NULL = ""): the first
     * cache_shared_tokens prompt tokens are cached under
     * cache_shared_namespace, the rest under cache_namespace.  Set by
     * the server (per tenant), never by a client. */
    const char     *cache_namespace;
    const char     *cache_shared_namespace;
    int             cache_shared_tokens;
    int             no_cache;       /* 1: neither reuse nor register */
} llm_request;

enum { LLM_EV_TOKEN = 1, LLM_EV_DONE = 2, LLM_EV_LOGITS = 3 };

typedef struct llm_event {
    int             type;
    uint64_t        seq_id;
    uint64_t        user_tag;
    /* LLM_EV_TOKEN */
    llm_sample_result sample;
    /* LLM_EV_LOGITS: logits of prompt position pos, n_vocab floats,
     * valid during the callback */
    int             pos;
    const float    *logits;
    int             n_vocab;
    /* LLM_EV_DONE */
    int             finish;         /* LLM_FINISH_* */
    int             n_prompt;
    int             n_generated;
    int             n_cached;       /* prompt tokens served from cache */
    const char     *error;          /* LLM_FINISH_ERROR */
} llm_event;

typedef void (*llm_event_fn)(void *ud, const llm_event *ev);

typedef struct llm_engine_stats {
    int         n_waiting;
    int         n_running;
    int         kv_blocks_total;
    int         kv_blocks_used;
    int         block_size;
    uint64_t    steps;
    uint64_t    tokens_prefilled;
    uint64_t    tokens_generated;
    uint64_t    preemptions;
    uint64_t    queue_timeouts;
    int         adapters_registered;
    int         adapters_loaded;        /* in the host cache */
    int         adapters_resident;      /* on the device */
    int         adapter_dtype;          /* LLM_ADAPTER_* of the device
                                           copies (never _DEFAULT) */
    size_t      adapter_host_bytes;
    size_t      adapter_device_bytes;
    uint64_t    adapter_loads;          /* host loads from disk */
    uint64_t    adapter_uploads;        /* copies made on the device */
    uint64_t    adapter_host_evictions;
    uint64_t    adapter_device_evictions;
    int         last_batch_tokens;
    int         last_batch_seqs;

    /* prefix cache */
    int         prefix_blocks_cached;   /* blocks holding a hash */
    int         prefix_blocks_reusable; /* ... of which unused */
    uint64_t    prefix_lookups;         /* first admissions with cache */
    uint64_t    prefix_hit_tokens;      /* prompt tokens reused */
    uint64_t    prefix_tier_hit_tokens; /* tokens loaded from Redis */
    uint64_t    prefix_evictions;
    int         tier_enabled;
    int         tier_connected;
    uint64_t    tier_puts;
    uint64_t    tier_put_bytes;
    uint64_t    tier_puts_dropped;
    uint64_t    tier_lookups;
    uint64_t    tier_blocks_hit;
    uint64_t    tier_blocks_missed;
    uint64_t    tier_corrupt;
    uint64_t    tier_errors;
    uint64_t    prefix_bytes_cached;    /* device bytes of those blocks */
    uint64_t    tier_stored_bytes;      /* bytes in Redis, last seen */
} llm_engine_stats;

llm_engine *llm_engine_new(const llm_engine_params *p, llm_err *err);
void        llm_engine_free(llm_engine *e);

struct llm_tokenizer;

const llm_model            *llm_engine_model(const llm_engine *e);
const struct llm_tokenizer *llm_engine_tokenizer(const llm_engine *e);
int                         llm_engine_n_ctx(const llm_engine *e);

/* Queues a sequence.  Fails (LLM_EINVAL) if the prompt is empty, has ids
 * outside the vocabulary, or prompt + max_tokens exceeds the context. */
int llm_engine_submit(llm_engine *e, const llm_request *req,
                      uint64_t *seq_id, llm_err *err);

/* Cancels a queued or running sequence: its KV blocks are freed at once
 * and an LLM_EV_DONE with LLM_FINISH_CANCELLED comes from the next
 * step().  LLM_ENOTFOUND if unknown or already finished. */
int llm_engine_cancel(llm_engine *e, uint64_t seq_id);

/* Runs one iteration; returns 0 (also when idle) or an error, which ends
 * the sequences of the failed step with LLM_FINISH_ERROR. */
int llm_engine_step(llm_engine *e, llm_event_fn cb, void *ud,
                    llm_err *err);

/* Adapters.  register: a new name, or a new version of an existing one
 * (sequences already running keep the version they started with).
 * unregister: new requests can no longer name it.  LLM_ENOTFOUND /
 * LLM_EINVAL / LLM_EFORMAT with a message naming the file. */
int llm_engine_adapter_register(llm_engine *e, const char *name,
                                const char *dir, llm_err *err);
int llm_engine_adapter_unregister(llm_engine *e, const char *name,
                                  llm_err *err);
/* Registered names in sorted order; NULL past the end. */
const char *llm_engine_adapter_name(const llm_engine *e, int i);

/* What is known of a registered adapter. */
typedef struct llm_engine_adapter_info {
    const char *dir;            /* valid until the next adapter call */
    int         max_rank;
    size_t      bytes;          /* host bytes once loaded; before, the
                                   size its file headers predict */
    int         loaded;         /* current version in the host cache */
    int         resident;       /* ... and copied to the device */
    char        version[17];    /* content hash, 16 hex; "" until loaded */
} llm_engine_adapter_info;

/* 0, or LLM_ENOTFOUND if name is not registered. */
int llm_engine_adapter_info_get(const llm_engine *e, const char *name,
                                llm_engine_adapter_info *info);

/* Registers name from dir, or replaces its version, only once the whole
 * adapter has loaded and checked (weights included), then keeps it in
 * the host cache: refused files (LLM_EFORMAT, LLM_EINVAL, LLM_EIO with a
 * message naming the file and the reason) change nothing.  dir NULL or
 * "": the folder name was registered from (a reload).  info may be
 * NULL. */
int llm_engine_adapter_load(llm_engine *e, const char *name,
                            const char *dir, llm_engine_adapter_info *info,
                            llm_err *err);

/* 1 when nothing is queued or running (step() would do nothing). */
int  llm_engine_idle(const llm_engine *e);
/* 1 when the last step ran nothing although sequences wait: all are
 * blocked on something outside the loop (a Redis lookup, room for an
 * adapter).  The owner may sleep until the wake callback or a short
 * timeout instead of spinning. */
int  llm_engine_stalled(const llm_engine *e);
/* Replaces the wake callback (NULL: none); once it returns, the old one
 * is not running and will not be called again. */
void llm_engine_set_wake(llm_engine *e, void (*wake)(void *ud), void *ud);
void llm_engine_get_stats(const llm_engine *e, llm_engine_stats *s);

#endif /* LLM_ENGINE_H */
