/*
 * Adapter weights on the backend: a pool of device copies of loaded
 * adapters (llm_lora's one block), keyed by the registry's load serial,
 * with a byte budget and LRU eviction of copies no running sequence
 * uses.  The host cache (registry.h) is the tier below.
 *
 * The copy is f32 as on the host, or f16 (converted at upload, half the
 * bytes) on backends whose lora op takes it (ops->lora_f16): the offsets
 * of llm_lora_weight then count f16 elements, and each B is stored
 * transposed ([rank, out], backend.h) in its place.  Or, where the
 * engine asks for it (engine.h, LLM_ADAPTER_*) and the backend takes it
 * (ops->lora_i8), int8
 * with a scale per row (lora.h, llm_lora_q_layout): a quarter of the
 * bytes of f32, lossy.  llm_lora_pool_seg finds a matrix in a copy.
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

/* 1 if the load of registry serial has a copy on the backend. */
int  llm_lora_pool_has(const llm_lora_pool *p, uint64_t serial);

/* The element type of the copies (LLM_F32, LLM_F16 or LLM_LORA_I8), and
 * the bytes a copy of lora takes. */
int    llm_lora_pool_type(const llm_lora_pool *p);
size_t llm_lora_pool_need(const llm_lora_pool *p, const llm_lora *lora);
/* LLM_F32 always works; LLM_F16 and LLM_LORA_I8 where the backend takes
 * them (LLM_EUNSUP).  Only before the first copy is made (LLM_ESTATE
 * after). */
int    llm_lora_pool_set_type(llm_lora_pool *p, int type);

/* The weights of matrix w in a copy at dev of type: seg's a, b, a_scale,
 * b_scale, type, rank and scale. */
void   llm_lora_pool_seg(int type, const uint8_t *dev,
                         const llm_lora_weight *w, llm_lora_seg *seg);

#endif /* LLM_LORA_DEVICE_POOL_H */
