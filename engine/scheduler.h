/*
 * Continuous batching: which sequences run in the next step and how many
 * of their tokens, under a per-step token budget and the KV blocks free.
 *
 * Each sequence has tokens [0, n_tokens) (prompt, then generated) of which
 * [0, n_computed) are in its KV pages.  A step computes the next chunk of
 * every scheduled sequence: one token for a decoding sequence, up to the
 * remaining budget of a prefilling one (chunked prefill).  Running
 * sequences go first (oldest first), then waiting ones are admitted in
 * arrival order.  When blocks run out, the most recently admitted running
 * sequence is preempted: its blocks are freed and it goes back to the
 * front of the queue to be recomputed later (its tokens are kept, so its
 * output does not change).
 */
#ifndef LLM_SCHEDULER_H
#define LLM_SCHEDULER_H

#include <stdint.h>

#include "kv_cache.h"
#include "sampler.h"

enum { LLM_SEQ_WAITING = 0, LLM_SEQ_RUNNING = 1 };

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
    uint64_t            first_token_ns;

    /* set by the scheduler for the current step */
    int                 chunk;          /* tokens computed this step */

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
} llm_scheduler;

/* Chooses the sequences of the next step and sets their chunk; fills
 * out[] (capacity max_seqs) in batch order and returns their count. */
int llm_scheduler_plan(llm_scheduler *s, llm_seq **out);

/* Frees a sequence's blocks and unlinks it from its list. */
void llm_scheduler_drop(llm_scheduler *s, llm_seq *seq);

#endif /* LLM_SCHEDULER_H */
