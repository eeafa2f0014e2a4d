/*
 * Continuous batching: which sequences run in the next step and how many
 * of their tokens, under a per-step token budget, a cap on running
 * sequences and the KV blocks free.
 *
 * Each sequence has tokens [0, n_tokens) (prompt, then generated) of which
 * [0, n_computed) are in its KV pages.  A step computes the next chunk of
 * every scheduled sequence: one token for a decoding sequence, up to the
 * remaining budget of a prefilling one (chunked prefill).
 *
 * Policy, class by class from interactive to batch:
 *  - the running sequences of the class get their chunk, oldest first;
 *  - then waiting sequences of the class are admitted, the one whose
 *    tenant has the smallest virtual token counter first (fair share:
 *    each tenant's counter grows by the tokens it is served divided by
 *    its weight; a tenant that becomes active again is lifted to the
 *    smallest active counter, so idle time is not banked), arrival order
 *    between equals;
 *  - a class that prefills a prompt in this step has the step to
 *    itself: lower classes are not planned (their TTFT-insensitive work
 *    waits one step instead of slowing the higher class's prefill);
 *  - when KV blocks or running slots run out, the newest running
 *    sequence of the lowest class (never a higher class than the one
 *    being served, and for admissions only a strictly lower class) is
 *    preempted: its blocks are freed and it waits to be recomputed (its
 *    tokens and sampler are kept, so its output does not change).
 * Waiting sequences that never started and passed their queue deadline
 * are taken out (llm_scheduler_expire).  Blocked sequences (adapter not
 * resident, prefix lookup in Redis under way) are not admitted.
 */
#ifndef LLM_SCHEDULER_H
#define LLM_SCHEDULER_H

#include <stdint.h>

#include "kv_cache.h"
#include "sampler.h"
#include "../adapters/registry.h"

enum { LLM_SEQ_WAITING = 0, LLM_SEQ_RUNNING = 1 };

#define LLM_TENANT_NAME_MAX 64

typedef struct llm_tenant_acct {
    char        name[LLM_TENANT_NAME_MAX + 1];
    double      vtc;            /* served tokens / weight */
    uint64_t    served;         /* tokens served (prompt + generated) */
    int         n_active;       /* its waiting + running sequences */
} llm_tenant_acct;

typedef struct llm_seq llm_seq;

struct llm_seq {
    uint64_t            id;
    uint64_t            user_tag;
    int                 state;
    int32_t            *tokens;         /* [cap] prompt then generated */
    int                 n_tokens;
    int                 cap;
    int                 n_prompt;
    int                 n_computed;     /* tokens whose KV is stored */
    int                 max_tokens;
    int                 ignore_eos;
    int                 prompt_logits;  /* teacher-forced logits wanted */
    int32_t            *stop_ids;
    int                 n_stop_ids;
    llm_sampler        *sampler;
    llm_block_table     bt;
    uint64_t            arrival_ns;
    uint64_t            deadline_ns;    /* 0: none */
    uint64_t            first_token_ns;

    int                 cls;            /* LLM_CLASS_* */
    int                 weight;         /* >= 1 */
    llm_tenant_acct    *tenant;

    /* adapter (engine.c): the pinned version and its device copy; a
     * sequence waits (blocked) while its adapter loads in the background
     * (lora_pending: not pinned yet, lora_name says which) and until it
     * is resident */
    llm_lora_handle     lora;
    const uint8_t      *lora_dev;
    int                 blocked;
    int                 lora_pending;
    char               *lora_name;
    char               *error;          /* why it failed while waiting */

    /* prefix cache (engine.c): the chain hashes of its full blocks
     * (prefix_cache.h), computed as needed; tokens only grow, so a hash
     * once computed stays valid */
    int                 cache;          /* 1: reuse and register blocks */
    char               *cache_ns;       /* private namespace */
    char               *cache_shared_ns;/* public prefix namespace */
    int                 cache_shared_tokens;
    uint8_t           (*hashes)[32];    /* [cap / block_size] */
    int                 n_hashes;
    int                 n_registered;   /* blocks [0, n) tagged or tried */
    int                 n_cached;       /* prompt tokens reused at the
                                           first admission (reported) */
    int                 admitted;       /* admitted at least once */
    int                 tier_pending;   /* waiting for a Redis lookup */
    int                 tier_asked;
    int                 tier_first;     /* first block asked for */
    uint64_t            tier_deadline_ns;

    /* set by the scheduler for the current step */
    int                 chunk;          /* tokens computed this step */
    int                 planned;

    llm_seq            *prev, *next;    /* waiting or running list */
};

typedef struct llm_seq_list {
    llm_seq            *head, *tail;
    int                 n;
} llm_seq_list;

void llm_seq_list_push_back(llm_seq_list *l, llm_seq *s);
void llm_seq_list_push_front(llm_seq_list *l, llm_seq *s);
void llm_seq_list_remove(llm_seq_list *l, llm_seq *s);

typedef struct llm_scheduler {
    llm_kv_blocks      *kv;
    llm_seq_list        waiting;
    llm_seq_list        running;
    int                 max_seqs;
    int                 max_step_tokens;
    uint64_t            preemptions;

    /* called when a sequence with nothing computed is about to be
     * admitted: may give it cached blocks (bt, n_computed); taken back
     * if the admission then fails */
    void              (*attach)(void *ud, llm_seq *seq);
    void               *attach_ud;

    llm_tenant_acct   **tenants;        /* accounts, grown on demand */
    int                 n_tenants;
    int                 cap_tenants;
} llm_scheduler;

/* The account of a tenant name ("" for anonymous), created on first use;
 * NULL on allocation failure. */
llm_tenant_acct *llm_scheduler_tenant(llm_scheduler *s, const char *name);

/* Queues a new sequence (state WAITING), lifting its tenant's counter if
 * the tenant was idle. */
void llm_scheduler_enqueue(llm_scheduler *s, llm_seq *seq);

/* Chooses the sequences of the next step and sets their chunk; fills
 * out[] (capacity max_seqs) and returns their count. */
int  llm_scheduler_plan(llm_scheduler *s, llm_seq **out);

/* Charges n served tokens to seq's tenant. */
void llm_scheduler_charge(llm_scheduler *s, llm_seq *seq, int n);

/* Moves waiting sequences that never ran and are past their deadline at
 * now_ns into out[] (capacity cap, unlinked); returns their count. */
int  llm_scheduler_expire(llm_scheduler *s, uint64_t now_ns, llm_seq **out,
                          int cap);

/* Frees a sequence's blocks and unlinks it from its list. */
void llm_scheduler_drop(llm_scheduler *s, llm_seq *seq);

void llm_scheduler_free(llm_scheduler *s);

#endif /* LLM_SCHEDULER_H */
