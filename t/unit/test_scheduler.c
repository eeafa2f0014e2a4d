/*
 * The scheduling policy alone (no model): a simulated engine loop over
 * llm_scheduler_plan with synthetic sequences checks fair share between
 * tenants, weights, strict priority with preemption, queue deadlines and
 * the step token budget.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/scheduler.h"
#include "test.h"

#define SIM_MAX 512

typedef struct {
    llm_kv_blocks  *kv;
    llm_scheduler   s;
    llm_seq        *seqs[SIM_MAX];
    int             n;
    llm_seq        *plan[64];
    uint64_t        clock;
} sim;


static void
sim_init(sim *m, int n_blocks, int max_seqs, int budget)
{
    memset(m, 0, sizeof(*m));
    m->kv = llm_kv_blocks_new(n_blocks, 16, NULL);
    m->s.kv = m->kv;
    m->s.max_seqs = max_seqs;
    m->s.max_step_tokens = budget;
}


static llm_seq *
sim_submit(sim *m, const char *tenant, int weight, int cls, int prompt,
           int gen)
{
    llm_seq *q = calloc(1, sizeof(*q));

    q->cap = prompt + gen;
    q->tokens = calloc((size_t) q->cap, sizeof(int32_t));
    q->n_tokens = q->n_prompt = prompt;
    q->max_tokens = gen;
    q->cls = cls;
    q->weight = weight;
    q->tenant = llm_scheduler_tenant(&m->s, tenant);
    q->arrival_ns = ++m->clock;
    q->id = (uint64_t) m->n;
    llm_scheduler_enqueue(&m->s, q);
    m->seqs[m->n++] = q;
    return q;
}


/* One simulated step; returns the number of sequences that finished. */
static int
sim_step(sim *m, int *n_planned)
{
    int i, n = llm_scheduler_plan(&m->s, m->plan), done = 0;

    *n_planned = n;
    for (i = 0; i < n; i++) {
        llm_seq *q = m->plan[i];
        q->n_computed += q->chunk;
        llm_scheduler_charge(&m->s, q, q->chunk);
        if (q->n_computed == q->n_tokens) {
            if (q->first_token_ns == 0) {
                q->first_token_ns = m->clock;
            }
            q->tokens[q->n_tokens++] = 1;
            if (q->n_tokens - q->n_prompt >= q->max_tokens) {
                llm_scheduler_drop(&m->s, q);
                q->state = -1;      /* finished */
                done++;
            }
        }
    }
    m->clock++;
    return done;
}


static void
sim_free(sim *m)
{
    int i;

    for (i = 0; i < m->n; i++) {
        if (m->seqs[i]->state >= 0) {
            llm_scheduler_drop(&m->s, m->seqs[i]);
        }
        llm_block_table_destroy(&m->seqs[i]->bt);
        free(m->seqs[i]->tokens);
        free(m->seqs[i]);
    }
    llm_scheduler_free(&m->s);
    llm_kv_blocks_free(m->kv);
}


/* Keeps tenants backlogged: whenever a tenant has fewer than `depth`
 * unfinished sequences, submits more. */
static void
keep_backlogged(sim *m, const char *tenant, int weight, int cls, int depth,
                int prompt, int gen)
{
    int i, live = 0;

    for (i = 0; i < m->n; i++) {
        if (m->seqs[i]->state >= 0
            && strcmp(m->seqs[i]->tenant->name, tenant) == 0)
        {
            live++;
        }
    }
    while (live < depth && m->n < SIM_MAX) {
        sim_submit(m, tenant, weight, cls, prompt, gen);
        live++;
    }
}


static double
served(sim *m, const char *tenant)
{
    return (double) llm_scheduler_tenant(&m->s, tenant)->served;
}


TEST_SUITE(scheduler_fairness)
{
    sim    m;
    int    step, np;
    double a, b;

    test("equal weights: a tenant sending 10x the requests gets the same "
         "share");
    sim_init(&m, 1024, 4, 64);
    for (step = 0; step < 3000 && m.n < SIM_MAX - 20; step++) {
        keep_backlogged(&m, "heavy", 1, LLM_CLASS_STANDARD, 20, 24, 16);
        keep_backlogged(&m, "light", 1, LLM_CLASS_STANDARD, 2, 24, 16);
        sim_step(&m, &np);
    }
    a = served(&m, "heavy");
    b = served(&m, "light");
    printf("       served tokens: heavy %.0f, light %.0f (ratio %.2f)\n",
           a, b, a / b);
    test_cond(a > 0 && b > 0);
    test_cond(a / b > 0.8 && a / b < 1.25);
    sim_free(&m);

    test("weights 2:1 give served tokens 2:1 within 20%");
    sim_init(&m, 1024, 4, 64);
    for (step = 0; step < 3000 && m.n < SIM_MAX - 20; step++) {
        keep_backlogged(&m, "gold", 2, LLM_CLASS_STANDARD, 8, 24, 16);
        keep_backlogged(&m, "silver", 1, LLM_CLASS_STANDARD, 8, 24, 16);
        sim_step(&m, &np);
    }
    a = served(&m, "gold");
    b = served(&m, "silver");
    printf("       served tokens: gold %.0f, silver %.0f (ratio %.2f)\n",
           a, b, a / b);
    test_cond(a / b > 1.6 && a / b < 2.4);
    sim_free(&m);

    test("a tenant back from idle is lifted, not given a banked share");
    sim_init(&m, 1024, 2, 64);
    for (step = 0; step < 400; step++) {
        keep_backlogged(&m, "busy", 1, LLM_CLASS_STANDARD, 4, 8, 8);
        sim_step(&m, &np);
    }
    {
        double vb = llm_scheduler_tenant(&m.s, "busy")->vtc;
        sim_submit(&m, "sleeper", 1, LLM_CLASS_STANDARD, 8, 8);
        test_cond(llm_scheduler_tenant(&m.s, "sleeper")->vtc >= vb - 64);
    }
    sim_free(&m);
}


TEST_SUITE(scheduler_priority)
{
    sim      m;
    int      step, np, i;
    llm_seq *inter;

    test("an interactive request preempts batch work and starts at once");
    sim_init(&m, 1024, 4, 64);
    for (i = 0; i < 8; i++) {
        sim_submit(&m, "bulk", 1, LLM_CLASS_BATCH, 30, 200);
    }
    for (step = 0; step < 10; step++) {
        sim_step(&m, &np);
    }
    test_cond(m.s.running.n == 4);
    inter = sim_submit(&m, "chat", 1, LLM_CLASS_INTERACTIVE, 20, 4);
    sim_step(&m, &np);
    test_cond(inter->state == LLM_SEQ_RUNNING);
    test_cond(inter->first_token_ns != 0);      /* prefilled in one step */
    test_cond(m.s.preemptions >= 1);
    test_cond(m.s.running.n <= 4);
    sim_free(&m);

    test("a higher class's prefill has the step alone; lower classes run "
         "again in the next");
    sim_init(&m, 1024, 8, 256);
    for (i = 0; i < 6; i++) {
        sim_submit(&m, "bulk", 1, LLM_CLASS_BATCH, 30, 200);
    }
    for (step = 0; step < 5; step++) {
        sim_step(&m, &np);
    }
    test_cond(np == 6);
    inter = sim_submit(&m, "chat", 1, LLM_CLASS_INTERACTIVE, 40, 8);
    sim_step(&m, &np);
    test_cond(np == 1 && m.plan[0] == inter && inter->first_token_ns != 0);
    sim_step(&m, &np);
    test_cond(np == 7);         /* its decode and the batch together */
    sim_free(&m);

    test("interactive admission never preempts interactive work");
    sim_init(&m, 1024, 2, 64);
    sim_submit(&m, "a", 1, LLM_CLASS_INTERACTIVE, 8, 100);
    sim_submit(&m, "b", 1, LLM_CLASS_INTERACTIVE, 8, 100);
    sim_step(&m, &np);
    inter = sim_submit(&m, "c", 1, LLM_CLASS_INTERACTIVE, 8, 4);
    sim_step(&m, &np);
    test_cond(inter->state == LLM_SEQ_WAITING);
    test_cond(m.s.preemptions == 0);
    sim_free(&m);

    test("KV exhaustion preempts the lowest class first");
    sim_init(&m, 12, 8, 256);
    {
        llm_seq *bulk = sim_submit(&m, "bulk", 1, LLM_CLASS_BATCH, 60, 60);
        llm_seq *std = sim_submit(&m, "std", 1, LLM_CLASS_STANDARD, 60, 60);
        for (step = 0; step < 80; step++) {
            sim_step(&m, &np);
        }
        test_cond(m.s.preemptions >= 1);
        test_cond(std->state == -1 || std->state == LLM_SEQ_RUNNING);
        test_cond(bulk->n_tokens - bulk->n_prompt
                  < std->n_tokens - std->n_prompt);
    }
    sim_free(&m);

    test("the step budget is never exceeded and blocks are not leaked");
    sim_init(&m, 64, 16, 48);
    for (i = 0; i < 60; i++) {
        sim_submit(&m, i % 3 ? "x" : "y", 1 + i % 2, i % 3, 5 + i % 40,
                   1 + i % 9);
    }
    for (step = 0; step < 5000; step++) {
        int k, tokens = 0;
        sim_step(&m, &np);
        for (k = 0; k < np; k++) {
            tokens += m.plan[k]->chunk;
        }
        if (tokens > 48 || np > 16) {
            break;
        }
        if (m.s.running.n == 0 && m.s.waiting.n == 0) {
            break;
        }
    }
    test_cond(m.s.running.n == 0 && m.s.waiting.n == 0);
    test_cond(llm_kv_n_free(m.kv) == 64);
    sim_free(&m);
}


TEST_SUITE(scheduler_deadline)
{
    sim      m;
    llm_seq *out[8];
    int      np, n;

    test("waiting requests past their deadline expire; started ones don't");
    sim_init(&m, 1024, 1, 64);
    {
        llm_seq *a = sim_submit(&m, "t", 1, LLM_CLASS_STANDARD, 8, 50);
        llm_seq *b = sim_submit(&m, "t", 1, LLM_CLASS_STANDARD, 8, 50);
        a->deadline_ns = 5;
        b->deadline_ns = 5;
        sim_step(&m, &np);              /* a runs, b waits */
        n = llm_scheduler_expire(&m.s, 100, out, 8);
        test_cond(n == 1 && out[0] == b);
        test_cond(b->state == LLM_SEQ_WAITING && m.s.waiting.n == 0);
        b->state = -1;                  /* unlinked: sim_free skips it */
    }
    sim_free(&m);
}
