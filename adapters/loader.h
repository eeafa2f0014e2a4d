/*
 * Background loading of adapter weights: one thread runs llm_lora_load()
 * (a pure function of the files and the model configuration) so that the
 * engine thread never reads and converts adapter files itself; a
 * sequence whose adapter is not in the host cache waits while the rest
 * of the batch keeps running.  The engine thread hands the loaded weights
 * to the registry (llm_lora_registry_adopt).
 */
#ifndef LLM_LORA_LOADER_H
#define LLM_LORA_LOADER_H

#include "lora.h"

typedef struct llm_lora_loader llm_lora_loader;

typedef struct llm_lora_loaded {
    char       *name;       /* the job's name and folder (owned) */
    char       *dir;
    llm_lora   *lora;       /* the weights (owned), NULL on failure */
    int         rc;         /* 0 or the llm_lora_load error */
    llm_err     err;
} llm_lora_loaded;

/* cfg is copied.  wake (may be NULL) is called from the loader thread
 * after each finished job. */
llm_lora_loader *llm_lora_loader_new(const llm_model_config *cfg,
                                     void (*wake)(void *ud), void *ud,
                                     llm_err *err);
/* Stops the thread (after the load under way) and frees every job and
 * unpolled result. */
void llm_lora_loader_free(llm_lora_loader *l);

/* Queues a load of dir for name (both copied); 0 or LLM_ENOMEM. */
int  llm_lora_loader_submit(llm_lora_loader *l, const char *name,
                            const char *dir);
/* 1 if a load for name is queued, running or not yet polled. */
int  llm_lora_loader_busy(llm_lora_loader *l, const char *name);

/* A finished load: 1 (out filled; release with loaded_free), 0 if none. */
int  llm_lora_loader_poll(llm_lora_loader *l, llm_lora_loaded *out);
void llm_lora_loaded_free(llm_lora_loaded *r);

#endif /* LLM_LORA_LOADER_H */
