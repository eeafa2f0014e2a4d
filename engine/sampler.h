/*
 * Token sampling for one sequence: penalties, temperature, top-k, top-p,
 * min-p, a per-sequence seeded generator (the same seed gives the same
 * tokens whatever else is in the batch), and log-probabilities.
 *
 * Log-probabilities are those of the model's distribution (log-softmax of
 * the raw logits, before penalties and temperature), as vLLM reports them.
 */
#ifndef LLM_SAMPLER_H
#define LLM_SAMPLER_H

#include <stdint.h>

#include "common.h"

#define LLM_MAX_TOP_LOGPROBS 20

typedef struct llm_sampling {
    float       temperature;        /* 0: greedy */
    int         top_k;              /* 0: off */
    float       top_p;              /* 1: off */
    float       min_p;              /* 0: off */
    float       repetition_penalty; /* 1: off; over prompt + output */
    float       frequency_penalty;  /* 0: off; over output (OpenAI) */
    float       presence_penalty;   /* 0: off; over output (OpenAI) */
    uint64_t    seed;
    int         has_seed;           /* 0: seed drawn from the clock */
    int         logprobs;           /* 1: report the chosen token's */
    int         top_logprobs;       /* 0 .. LLM_MAX_TOP_LOGPROBS */
} llm_sampling;

typedef struct llm_sample_result {
    int32_t     token;
    float       logprob;
    int         n_top;
    int32_t     top_ids[LLM_MAX_TOP_LOGPROBS];
    float       top_logprobs[LLM_MAX_TOP_LOGPROBS];
} llm_sample_result;

typedef struct llm_sampler llm_sampler;

/* Defaults: greedy, no penalties, no logprobs. */
void llm_sampling_default(llm_sampling *s);

/* Validates ranges; LLM_EINVAL with a message naming the parameter. */
int llm_sampling_check(const llm_sampling *s, llm_err *err);

llm_sampler *llm_sampler_new(const llm_sampling *s, int n_vocab,
                             llm_err *err);
void         llm_sampler_free(llm_sampler *s);

/* Tokens that count for repetition_penalty before generation starts. */
int  llm_sampler_add_prompt(llm_sampler *s, const int32_t *ids, int n);

/* Picks a token from logits[n_vocab] (modified in place) and records it
 * for the penalties.  0 or LLM_ENOMEM. */
int  llm_sampler_sample(llm_sampler *s, float *logits,
                        llm_sample_result *out);

#endif /* LLM_SAMPLER_H */
