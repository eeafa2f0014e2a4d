/*
 * Adapter weights on the backend: a pool of device copies of loaded
 * adapters (llm_lora's one f32 block), keyed by the registry's load
 * serial, with a byte budget and LRU eviction of copies no running
 * sequence uses.  The host cache (registry.h) is the tier below.
 */
#ifndef LLM_LORA_DEVICE_POOL_H
#define LLM_LORA_DEVICE_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "../engine/common.h"
#include "../kernels/backend.h"
#include "registry.h"

typedef struct llm_lora_pool llm_lora_pool;

typedef struct llm_lora_pool_stats {
    int         resident;       /* adapter copies on the backend */
    int         pinned;
    size_t      bytes;
    size_t      budget;         /* 0: unlimited */
    uint64_t    uploads;
    uint64_t    evictions;
} llm_lora_pool_stats;

llm_lora_pool *llm_lora_pool_new(llm_backend *be, size_t budget,
                                 llm_err *err);
void           llm_lora_pool_free(llm_lora_pool *p);

/* Makes h's adapter resident (uploading it, evicting unpinned copies in
 * LRU order if the budget needs it) and pins it; *dev receives the
 * backend address of the copy of h->lora->data.  LLM_EFULL (nothing
 * changed) when pinned copies leave no room: the caller retries later. */
int  llm_lora_pool_acquire(llm_lora_pool *p, const llm_lora_handle *h,
                           const uint8_t **dev, llm_err *err);
void llm_lora_pool_release(llm_lora_pool *p, const llm_lora_handle *h);

void llm_lora_pool_get_stats(const llm_lora_pool *p,
                             llm_lora_pool_stats *st);

#endif /* LLM_LORA_DEVICE_POOL_H */
