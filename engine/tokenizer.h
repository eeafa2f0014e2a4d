/*
 * Byte-level BPE tokenizer as GGUF metadata (tokenizer.ggml.*) and
 * Hugging Face tokenizer.json describe it: the model's pre-tokenizer
 * split, merge ranks, added and special tokens, BOS/EOS/EOT.  Encodes to
 * exactly the ids llama.cpp produces for the same GGUF file.
 *
 * Used by the engine tools and by the NGINX workers (which never load
 * weights), so it depends only on the file readers.
 */
#ifndef LLM_TOKENIZER_H
#define LLM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

struct llm_gguf;
typedef struct llm_tokenizer llm_tokenizer;

/* path: a .gguf file, a tokenizer.json, or a Hugging Face folder holding
 * tokenizer.json (and tokenizer_config.json for the chat template and
 * special tokens). */
llm_tokenizer *llm_tokenizer_load(const char *path, llm_err *err);
llm_tokenizer *llm_tokenizer_from_gguf(const struct llm_gguf *g,
                                       llm_err *err);
void           llm_tokenizer_free(llm_tokenizer *t);

int  llm_tokenizer_n_vocab(const llm_tokenizer *t);
int  llm_tokenizer_bos(const llm_tokenizer *t);     /* -1 if none */
int  llm_tokenizer_eos(const llm_tokenizer *t);
int  llm_tokenizer_eot(const llm_tokenizer *t);     /* -1 if none */
int  llm_tokenizer_add_bos(const llm_tokenizer *t); /* prepend BOS? */
/* End of generation: EOS, EOT or another token marked so (e.g.
 * <|im_end|>, <|eot_id|>). */
int  llm_tokenizer_is_eog(const llm_tokenizer *t, int32_t id);
/* The model's chat template (Jinja text) or NULL. */
const char *llm_tokenizer_chat_template(const llm_tokenizer *t);
/* Token id of an exact token text (e.g. "<|im_end|>"), or -1. */
int32_t llm_tokenizer_find(const llm_tokenizer *t, const char *text);

/* One line saying what kind of tokenizer this is ("byte-level BPE,
 * pre-tokenizer smollm, 49152 tokens", "SentencePiece, ...") and, when
 * the pre-tokenizer is one we do not implement, that GPT-2's split stands
 * in.  Returns what snprintf returns. */
int  llm_tokenizer_describe(const llm_tokenizer *t, char *buf, size_t cap);

/* Control (or unknown) token: rendered only when asked for special text. */
int  llm_tokenizer_is_control(const llm_tokenizer *t, int32_t id);

/* The pre-tokenizer, by llama.cpp's tokenizer.ggml.pre name ("smollm",
 * "llama-bpe", "qwen2", "gpt2", "default", ...).  A name it does not know
 * selects the GPT-2 split and sets the fallback flag; set_pre then
 * returns LLM_ENOTFOUND (the tokenizer stays usable). */
int         llm_tokenizer_set_pre(llm_tokenizer *t, const char *name);
const char *llm_tokenizer_pre_name(const llm_tokenizer *t);
int         llm_tokenizer_pre_fallback(const llm_tokenizer *t);

/* Encodes text[len].  add_special: add BOS/EOS as the model asks.
 * parse_special: recognise special/control token texts in the input
 * (as llama.cpp's parse_special).  Writes up to cap ids; returns the
 * number of ids of the full encoding (which may exceed cap: call again
 * with a larger buffer) or a negative LLM_E* code. */
int  llm_tokenize(const llm_tokenizer *t, const char *text, size_t len,
                  int add_special, int parse_special, int32_t *out,
                  int cap);

/* The raw bytes of one token (byte-level decoded).  special: render
 * control tokens' text (else they produce nothing).  Returns the length
 * (may exceed cap, nothing written then) or a negative code. */
int  llm_token_to_piece(const llm_tokenizer *t, int32_t id, int special,
                        char *buf, int cap);

/* Incremental detokenizer: feeds tokens one at a time and emits only
 * complete UTF-8 sequences; an incomplete tail is held back until the
 * next token completes it, an invalid sequence becomes U+FFFD. */
typedef struct llm_detok {
    char    pending[8];
    int     n_pending;
    int     special;        /* render control tokens */
} llm_detok;

void llm_detok_init(llm_detok *d, int special);
/* Appends the text that token id completes to out (up to cap bytes);
 * returns the byte count written (cap >= 64 + longest token is always
 * enough) or a negative code. */
int  llm_detok_push(llm_detok *d, const llm_tokenizer *t, int32_t id,
                    char *out, int cap);
/* Flushes a held-back incomplete tail as U+FFFD. */
int  llm_detok_flush(llm_detok *d, char *out, int cap);

#endif /* LLM_TOKENIZER_H */
