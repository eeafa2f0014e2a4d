/*
 * Chat templates: the prompt text a model's Jinja chat template produces
 * for a conversation, without a Jinja engine.  llm_chat_detect() picks the
 * family from the template text (as llama.cpp's llm_chat_detect_template
 * does); llm_chat_render() writes what Hugging Face's apply_chat_template
 * renders for that family's template, including details the template
 * text carries (a ChatML default system prompt, Llama 3.1's date header).
 *
 * Used by the NGINX workers and the engine tools; no state, thread safe.
 */
#ifndef LLM_CHAT_TEMPLATE_H
#define LLM_CHAT_TEMPLATE_H

#include <stddef.h>

#include "common.h"

enum {
    LLM_CHAT_UNKNOWN = -1,
    LLM_CHAT_CHATML = 0,        /* <|im_start|>role\n...<|im_end|>\n */
    LLM_CHAT_LLAMA3,            /* <|start_header_id|>role<|end_header_id|> */
    LLM_CHAT_LLAMA31,           /* Llama 3.1/3.2: + knowledge/date header */
    LLM_CHAT_LLAMA2,            /* <s>[INST] <<SYS>>\n..\n<</SYS>>\n\n.. */
    LLM_CHAT_MISTRAL_V1,        /* <s> [INST] .. [/INST] ..</s> */
    LLM_CHAT_MISTRAL_V3,        /* <s>[INST] ..[/INST] ..</s> */
    LLM_CHAT_MISTRAL_V3_TEKKEN, /* <s>[INST]..[/INST]..</s> */
    LLM_CHAT_MISTRAL_V7,        /* <s>[SYSTEM_PROMPT] ..[/SYSTEM_PROMPT] */
    LLM_CHAT_MISTRAL_V7_TEKKEN, /* the same without the spaces */
    LLM_CHAT_MISTRAL_LEGACY,    /* Mistral 7B v0.1/v0.2: [INST] .. [/INST].. */
    LLM_CHAT_GEMMA,             /* <start_of_turn>user\n..<end_of_turn>\n */
    LLM_CHAT_PHI3,              /* <|user|>\n..<|end|>\n */
    LLM_CHAT_ZEPHYR,            /* <|user|>\n..</s>\n */
    LLM_CHAT_N
};

typedef struct llm_chat_msg {
    const char *role;           /* system, user, assistant (developer is
                                   taken as system) */
    size_t      role_len;
    const char *content;        /* need not be NUL-terminated */
    size_t      content_len;
} llm_chat_msg;

/* The family of a Jinja chat template, or LLM_CHAT_UNKNOWN.  Also accepts
 * the family names ("chatml", "llama3", "llama2", "mistral-v7", ...). */
int         llm_chat_detect(const char *tmpl);
const char *llm_chat_name(int kind);

/*
 * Renders msgs[n] in the template family kind.  tmpl (may be NULL) is the
 * template text, read for what it adds to the family (default system
 * prompt, dates).  add_generation_prompt: end with the assistant header.
 * bos_text: what the template's bos_token expands to (NULL: ""): BOS's
 * text, then llm_chat_strip_bos() if the tokenizer adds BOS itself (a
 * template may write BOS before every turn, as Llama 2's does; only the
 * first one is the tokenizer's).  *out is allocated with
 * llm_malloc and NUL-terminated; *out_len excludes the NUL.
 *
 * Errors (LLM_EINVAL, message in err): an unknown role, a kind out of
 * range, roles that do not alternate user/assistant where the template
 * requires it.
 */
/* For a prompt tokenized with the model's own BOS added (add_bos): drops
 * a bos_text the rendering begins with, so the prompt holds one BOS and
 * the template's later ones stay (llama.cpp's rule).  Returns the new
 * length; text stays NUL-terminated. */
size_t llm_chat_strip_bos(char *text, size_t len, const char *bos_text,
                          int add_bos);

int llm_chat_render(int kind, const char *tmpl, const llm_chat_msg *msgs,
                    int n, int add_generation_prompt, const char *bos_text,
                    char **out, size_t *out_len, llm_err *err);

/* The same with the eos_token text given (NULL: the family's usual one,
 * "</s>" for Llama 2 / Mistral / Zephyr, "<|endoftext|>" for Phi-3). */
int llm_chat_render_ex(int kind, const char *tmpl, const llm_chat_msg *msgs,
                       int n, int add_generation_prompt,
                       const char *bos_text, const char *eos_text,
                       char **out, size_t *out_len, llm_err *err);

#endif /* LLM_CHAT_TEMPLATE_H */
