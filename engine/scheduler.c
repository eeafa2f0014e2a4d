/*
 * Continuous batching policy (see scheduler.h).
 */
#include "scheduler.h"


void
llm_seq_list_push_back(llm_seq_list *l, llm_seq *s)
{
    s->next = NULL;
    s->prev = l->tail;
    if (l->tail != NULL) {
        l->tail->next = s;
    } else {
        l->head = s;
    }
    l->tail = s;
    l->n++;
}


void
llm_seq_list_push_front(llm_seq_list *l, llm_seq *s)
{
    s->prev = NULL;
    s->next = l->head;
    if (l->head != NULL) {
        l->head->prev = s;
    } else {
        l->tail = s;
    }
    l->head = s;
    l->n++;
}


void
llm_seq_list_remove(llm_seq_list *l, llm_seq *s)
{
    if (s->prev != NULL) {
        s->prev->next = s->next;
    } else {
        l->head = s->next;
    }
    if (s->next != NULL) {
        s->next->prev = s->prev;
    } else {
        l->tail = s->prev;
    }
    s->prev = s->next = NULL;
    l->n--;
}


void
llm_scheduler_drop(llm_scheduler *s, llm_seq *seq)
{
    llm_block_table_clear(s->kv, &seq->bt);
    llm_seq_list_remove(seq->state == LLM_SEQ_RUNNING ? &s->running
                                                      : &s->waiting, seq);
}


/* Sends the newest running sequence back to the queue, to be recomputed. */
static void
sched_preempt(llm_scheduler *s, llm_seq *victim)
{
    llm_seq_list_remove(&s->running, victim);
    llm_block_table_clear(s->kv, &victim->bt);
    victim->n_computed = 0;
    victim->chunk = 0;
    victim->state = LLM_SEQ_WAITING;
    llm_seq_list_push_front(&s->waiting, victim);
    s->preemptions++;
}


int
llm_scheduler_plan(llm_scheduler *s, llm_seq **out)
{
    int      budget = s->max_step_tokens;
    int      n = 0, i;
    llm_seq *seq, *next;

    /* Running sequences, oldest first: each needs its next chunk. */
    for (seq = s->running.head; seq != NULL && budget > 0; seq = next) {
        int need = seq->n_tokens - seq->n_computed;
        int take = need < budget ? need : budget;

        next = seq->next;
        seq->chunk = 0;
        while (llm_block_table_ensure(s->kv, &seq->bt,
                                      seq->n_computed + take) != 0)
        {
            llm_seq *victim = s->running.tail;

            /* never preempt a sequence already in this step's batch */
            for (i = 0; i < n && victim != NULL; i++) {
                if (out[i] == victim) {
                    victim = NULL;
                }
            }
            if (victim == NULL) {
                break;
            }
            if (victim == next) {
                next = NULL;
            }
            sched_preempt(s, victim);
            if (victim == seq) {
                break;
            }
        }
        if (seq->state != LLM_SEQ_RUNNING
            || seq->bt.n < llm_kv_blocks_for(s->kv, seq->n_computed + take))
        {
            continue;       /* preempted itself, or no blocks to be had */
        }
        seq->chunk = take;
        budget -= take;
        out[n++] = seq;
    }

    /* Admit waiting sequences in order while budget and blocks last. */
    while (budget > 0 && s->running.n < s->max_seqs
           && (seq = s->waiting.head) != NULL)
    {
        int need = seq->n_tokens - seq->n_computed;
        int take = need < budget ? need : budget;

        if (llm_block_table_ensure(s->kv, &seq->bt,
                                   seq->n_computed + take) != 0)
        {
            break;
        }
        llm_seq_list_remove(&s->waiting, seq);
        seq->state = LLM_SEQ_RUNNING;
        llm_seq_list_push_back(&s->running, seq);
        seq->chunk = take;
        budget -= take;
        out[n++] = seq;
    }
    return n;
}
