/*
 * Continuous batching policy: priority classes, fair share between
 * tenants, preemption (see scheduler.h).
 */
#include "scheduler.h"

#include <stdio.h>
#include <string.h>

#include "engine.h"


/* ---- lists -------------------------------------------------------- */

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


/* ---- tenant accounts ---------------------------------------------- */

llm_tenant_acct *
llm_scheduler_tenant(llm_scheduler *s, const char *name)
{
    llm_tenant_acct  *t;
    int               i;

    if (name == NULL) {
        name = "";
    }
    /* A linear scan: the accounts of one engine number in the
     * hundreds at most, and this runs once per submit. */
    for (i = 0; i < s->n_tenants; i++) {
        if (strncmp(s->tenants[i]->name, name, LLM_TENANT_NAME_MAX) == 0) {
            return s->tenants[i];
        }
    }
    if (s->n_tenants == s->cap_tenants) {
        int               cap = s->cap_tenants ? 2 * s->cap_tenants : 16;
        llm_tenant_acct **n = llm_realloc(s->tenants,
                                          (size_t) cap * sizeof(*n));
        if (n == NULL) {
            return NULL;
        }
        s->tenants = n;
        s->cap_tenants = cap;
    }
    t = llm_calloc(1, sizeof(*t));
    if (t == NULL) {
        return NULL;
    }
    snprintf(t->name, sizeof(t->name), "%s", name);
    s->tenants[s->n_tenants++] = t;
    return t;
}


void
llm_scheduler_enqueue(llm_scheduler *s, llm_seq *seq)
{
    llm_tenant_acct *t = seq->tenant;
    int              i, any = 0;
    double           vmin = 0;

    if (t != NULL && t->n_active == 0) {
        /* back from idle: start level with the least served active
         * tenant, so idle time is not banked */
        for (i = 0; i < s->n_tenants; i++) {
            llm_tenant_acct *o = s->tenants[i];
            if (o != t && o->n_active > 0 && (!any || o->vtc < vmin)) {
                vmin = o->vtc;
                any = 1;
            }
        }
        if (any && t->vtc < vmin) {
            t->vtc = vmin;
        }
    }
    if (t != NULL) {
        t->n_active++;
    }
    seq->state = LLM_SEQ_WAITING;
    llm_seq_list_push_back(&s->waiting, seq);
}


void
llm_scheduler_charge(llm_scheduler *s, llm_seq *seq, int n)
{
    if (seq->tenant != NULL && n > 0) {
        seq->tenant->served += (uint64_t) n;
        seq->tenant->vtc += (double) n / (seq->weight > 0 ? seq->weight : 1);
    }
}


void
llm_scheduler_drop(llm_scheduler *s, llm_seq *seq)
{
    llm_block_table_clear(s->kv, &seq->bt);
    llm_seq_list_remove(seq->state == LLM_SEQ_RUNNING ? &s->running
                                                      : &s->waiting, seq);
    if (seq->tenant != NULL && seq->tenant->n_active > 0) {
        seq->tenant->n_active--;
    }
}


void
llm_scheduler_free(llm_scheduler *s)
{
    int i;

    for (i = 0; i < s->n_tenants; i++) {
        llm_free(s->tenants[i]);
    }
    llm_free(s->tenants);
    s->tenants = NULL;
    s->n_tenants = s->cap_tenants = 0;
}


int
llm_scheduler_expire(llm_scheduler *s, uint64_t now_ns, llm_seq **out,
                     int cap)
{
    llm_seq *seq, *next;
    int      n = 0;

    for (seq = s->waiting.head; seq != NULL && n < cap; seq = next) {
        next = seq->next;
        if (seq->deadline_ns != 0 && now_ns > seq->deadline_ns
            && seq->first_token_ns == 0)
        {
            llm_scheduler_drop(s, seq);
            out[n++] = seq;
        }
    }
    return n;
}


/* ---- planning ----------------------------------------------------- */

/* Sends a running sequence back to the queue, to be recomputed. */
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


/* The newest running sequence of the lowest class >= min_cls that is not
 * in this step's batch, or NULL. */
static llm_seq *
sched_victim(llm_scheduler *s, int min_cls)
{
    llm_seq *seq, *best = NULL;

    for (seq = s->running.tail; seq != NULL; seq = seq->prev) {
        if (!seq->planned && seq->cls >= min_cls
            && (best == NULL || seq->cls > best->cls))
        {
            best = seq;
        }
    }
    return best;
}


/* The waiting sequence of class cls to admit next: its tenant least
 * served (weighted), then the earliest arrival. */
static llm_seq *
sched_next_waiting(llm_scheduler *s, int cls)
{
    llm_seq *seq, *best = NULL;

    for (seq = s->waiting.head; seq != NULL; seq = seq->next) {
        double v, bv;

        if (seq->cls != cls || seq->blocked || seq->tier_pending) {
            continue;
        }
        if (best == NULL) {
            best = seq;
            continue;
        }
        v = seq->tenant != NULL ? seq->tenant->vtc : 0;
        bv = best->tenant != NULL ? best->tenant->vtc : 0;
        if (v < bv || (v == bv && seq->arrival_ns < best->arrival_ns)) {
            best = seq;
        }
    }
    return best;
}


static int
chunk_of(const llm_seq *seq, int budget)
{
    int need = seq->n_tokens - seq->n_computed;

    return need < budget ? need : budget;
}


int
llm_scheduler_plan(llm_scheduler *s, llm_seq **out)
{
    int      budget = s->max_step_tokens;
    int      n = 0, cls;
    llm_seq *seq, *next, *victim;

    for (seq = s->running.head; seq != NULL; seq = seq->next) {
        seq->planned = 0;
        seq->chunk = 0;
    }

    for (cls = 0; cls < LLM_N_CLASSES && budget > 0; cls++) {
        int prefill = 0;

        /* Running sequences of this class, oldest first. */
        for (seq = s->running.head; seq != NULL && budget > 0; seq = next) {
            int take;

            next = seq->next;
            if (seq->cls != cls || seq->planned) {
                continue;
            }
            take = chunk_of(seq, budget);
            while (llm_block_table_ensure(s->kv, &seq->bt,
                                          seq->n_computed + take) != 0)
            {
                victim = sched_victim(s, cls);
                if (victim == NULL) {
                    break;
                }
                if (victim == next) {
                    next = victim->next;
                }
                sched_preempt(s, victim);
                if (victim == seq) {
                    break;
                }
            }
            if (seq->state != LLM_SEQ_RUNNING
                || seq->bt.n < llm_kv_blocks_for(s->kv,
                                                 seq->n_computed + take))
            {
                continue;   /* preempted itself, or no blocks to be had */
            }
            seq->chunk = take;
            seq->planned = 1;
            budget -= take;
            out[n++] = seq;
            prefill |= take > 1;
        }

        /* Then admissions of this class, least served tenant first. */
        while (budget > 0 && (seq = sched_next_waiting(s, cls)) != NULL) {
            int take, ok = 1;

            if (seq->n_computed == 0 && seq->bt.n == 0 && s->attach != NULL)
            {
                s->attach(s->attach_ud, seq);
            }
            take = chunk_of(seq, budget);

            while (s->running.n >= s->max_seqs
                   || llm_block_table_ensure(s->kv, &seq->bt,
                                             seq->n_computed + take) != 0)
            {
                /* room only at the expense of a lower class */
                victim = sched_victim(s, cls + 1);
                if (victim == NULL) {
                    ok = 0;
                    break;
                }
                sched_preempt(s, victim);
            }
            if (!ok) {
                /* cached blocks go back (reusable) while it waits */
                llm_block_table_clear(s->kv, &seq->bt);
                seq->n_computed = 0;
                break;
            }
            llm_seq_list_remove(&s->waiting, seq);
            seq->state = LLM_SEQ_RUNNING;
            llm_seq_list_push_back(&s->running, seq);
            seq->chunk = take;
            seq->planned = 1;
            budget -= take;
            out[n++] = seq;
            prefill |= take > 1;
        }

        /* A prompt of this class being prefilled gets its step alone:
         * lower classes wait one step rather than lengthen it (the
         * step's time grows with its tokens), which keeps the time to
         * first token of a higher class close to its idle value. */
        if (prefill) {
            break;
        }
    }
    return n;
}
