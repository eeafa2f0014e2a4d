/*
 * The adapter registry: name -> adapter, with a host-memory cache.
 *
 * Registering costs a config and safetensors-header check (llm_lora_check);
 * weights are loaded at the first acquire and kept in a host cache with a
 * byte budget and LRU eviction, so the number of registered adapters is
 * bounded by disk, not memory.  A sequence acquires its adapter once
 * (pin) and releases it when it ends; a pinned adapter is never evicted.
 *
 * Versions: each registration or reload of a name is a new record; a
 * loaded record's version is the content hash of its files (lora.h).
 * Reloading a name makes the next acquire use the new files, while
 * sequences that pinned the old record keep it, unchanged, until they
 * release it: no sequence ever sees a mix of old and new weights.  An
 * unregistered adapter likewise lives on until its last user releases it.
 *
 * The budget is a hard limit for loads: an acquire that would need more
 * than budget - (bytes pinned by others) fails with LLM_EFULL and leaves
 * everything as it was (the caller may retry when sequences end).
 * Budget 0 means no limit.
 *
 * Single-threaded: every call comes from the engine thread.  Loading
 * itself is llm_lora_load(), a pure function, so a later background loader
 * can call it on another thread and hand the result over.
 */
#ifndef LLM_LORA_REGISTRY_H
#define LLM_LORA_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#include "lora.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LLM_LORA_NAME_MAX  128

typedef struct llm_lora_registry llm_lora_registry;

/* What a sequence holds while it runs with an adapter. */
typedef struct llm_lora_handle {
    llm_lora       *lora;       /* valid until release */
    const uint8_t  *version;    /* lora->version, LLM_LORA_VERSION_LEN */
    uint64_t        serial;     /* differs for every load, registry-wide:
                                   a cheap key for device copies */
    void           *priv;       /* the registry's record */
} llm_lora_handle;

typedef struct llm_lora_registry_stats {
    int         registered;     /* names */
    int         loaded;         /* adapters in host memory (including old
                                   versions still pinned) */
    int         pinned;         /* loaded adapters with users */
    size_t      bytes;          /* host bytes of loaded adapters */
    size_t      pinned_bytes;
    size_t      budget;         /* 0: unlimited */
    uint64_t    hits;           /* acquires that found the weights loaded */
    uint64_t    loads;          /* acquires that loaded them */
    uint64_t    evictions;
} llm_lora_registry_stats;

/* Called by register_dir for each folder it refuses. */
typedef void (*llm_lora_refused_fn)(void *ud, const char *name,
                                    const llm_err *err);

/* cfg is copied; host_budget in bytes (0: unlimited). */
llm_lora_registry *llm_lora_registry_new(const llm_model_config *cfg,
                                         size_t host_budget, llm_err *err);
/* Frees everything, pinned adapters included: release handles first. */
void llm_lora_registry_free(llm_lora_registry *reg);

/* Names: 1 to LLM_LORA_NAME_MAX - 1 characters of [A-Za-z0-9._:@+-], not
 * starting with '.'.  LLM_ESTATE if the name is taken. */
int llm_lora_registry_register(llm_lora_registry *reg, const char *name,
                               const char *dir, llm_err *err);

/* Registers every subfolder of root holding adapter_config.json under
 * the folder's name (in name order).  A refused folder is reported to
 * on_refused (may be NULL) and does not stop the others.  Returns the
 * number registered, or a negative code if root cannot be read. */
int llm_lora_registry_register_dir(llm_lora_registry *reg, const char *root,
                                   llm_lora_refused_fn on_refused, void *ud,
                                   llm_err *err);

/* Removes the name; its weights stay alive for sequences pinning them. */
int llm_lora_registry_unregister(llm_lora_registry *reg, const char *name,
                                 llm_err *err);

/* A new version of name from dir (NULL: the same folder), checked first:
 * if the new files are refused, the current version stays. */
int llm_lora_registry_reload(llm_lora_registry *reg, const char *name,
                             const char *dir, llm_err *err);

/* Pins the current version of name, loading it if needed. */
int llm_lora_registry_acquire(llm_lora_registry *reg, const char *name,
                              llm_lora_handle *h, llm_err *err);
/* Unpins; h is cleared.  A cleared handle is ignored. */
void llm_lora_registry_release(llm_lora_registry *reg, llm_lora_handle *h);

/* Loads name into the host cache without pinning it. */
int llm_lora_registry_preload(llm_lora_registry *reg, const char *name,
                              llm_err *err);

/* Changes the budget, evicting unpinned adapters to meet it. */
void llm_lora_registry_set_budget(llm_lora_registry *reg, size_t bytes);

void llm_lora_registry_get_stats(const llm_lora_registry *reg,
                                 llm_lora_registry_stats *st);

/* Registered names in sorted order: index 0 .. registered - 1; NULL past
 * the end.  The pointer is valid until the name is unregistered. */
const char *llm_lora_registry_name(const llm_lora_registry *reg, int i);

/* 1 if name is registered; its folder and check info if wanted. */
int llm_lora_registry_find(const llm_lora_registry *reg, const char *name,
                           const char **dir, llm_lora_info *info);

/* 1 if name's current version is in host memory. */
int llm_lora_registry_is_loaded(const llm_lora_registry *reg,
                                const char *name);

/* register or reload (as those do) with weights already loaded by
 * llm_lora_load(dir, ...), which then stay in the host cache if the
 * budget has room (else they are freed and load again at first use).
 * Takes lora in every case. */
int llm_lora_registry_adopt(llm_lora_registry *reg, const char *name,
                            const char *dir, llm_lora *lora, llm_err *err);

/* name's current version without pinning it: 1 with *lora (its weights,
 * valid until the next registry call) and *serial if it is in host
 * memory, 0 if it is not loaded, -1 if name is not registered.  lora and
 * serial may be NULL. */
int llm_lora_registry_peek(const llm_lora_registry *reg, const char *name,
                           const llm_lora **lora, uint64_t *serial);

#ifdef __cplusplus
}
#endif

#endif /* LLM_LORA_REGISTRY_H */
