/*
 * The default model's tokenizer on arbitrary text and arbitrary token
 * ids: what the NGINX workers do with every client's prompt and every
 * token the engine returns.
 *
 * Two tokenizers take every input: LLM_FUZZ_TOKENIZER, byte-level BPE
 * (t/fuzz/run.sh passes SmolLM2's GGUF), and LLM_FUZZ_TOKENIZER_SPM, a
 * SentencePiece vocabulary (tools/make_spm_vocab.py's).  The first input
 * byte picks the mode, the rest is the text.  Properties beyond "no
 * crash":
 *   - every id encoded lies inside the vocabulary;
 *   - plain encoding (no special-token parsing) of valid UTF-8 decodes,
 *     through the incremental detokenizer, back to the same bytes, when
 *     every byte of it has a token (SmolLM2's vocabulary lacks a few,
 *     e.g. 0x04 and 0x14: those are dropped, as llama.cpp drops them);
 *     SentencePiece: back to a space then the same bytes, unless the
 *     text holds U+2581 (decoded as a space) or a user-defined token's
 *     text ("<|...", always cut out and followed by another space);
 *   - the incremental detokenizer only ever emits valid UTF-8, whatever
 *     the ids (out-of-range ids are refused, not read).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "engine/unicode.h"
#include "t/fuzz/fuzz.h"

#define MAX_IDS  8192

typedef struct {
    llm_tokenizer *tok;
    int            spm;             /* SentencePiece: a space comes first */
    int            has_token[256];  /* the byte decodes back from its ids */
} fuzz_tok;

static fuzz_tok       toks[2];
static int32_t        ids[MAX_IDS];
static char           text[MAX_IDS * 64 + 64];


static void
load(fuzz_tok *ft, const char *var, int spm)
{
    const char *path = getenv(var);
    const char *pre = spm ? " " : "";
    llm_err     err;

    if (path == NULL || path[0] == '\0') {
        fuzz_fail(var, "is not set: the GGUF or tokenizer.json to load "
                  "(t/fuzz/run.sh sets it)");
    }
    ft->tok = llm_tokenizer_load(path, &err);
    if (ft->tok == NULL) {
        fuzz_fail("cannot load the tokenizer", err.msg);
    }
    ft->spm = spm;
    for (int b = 0; b < 256; b++) {
        char    c = (char) b, piece[16];
        int32_t one[8];
        int     n, k, len = 0;

        n = llm_tokenize(ft->tok, &c, 1, 0, 0, one, 8);
        for (k = 0; k < n && n <= 8 && len < 8; k++) {
            len += llm_token_to_piece(ft->tok, one[k], 0, piece + len,
                                      (int) sizeof(piece) - len);
        }
        ft->has_token[b] = n > 0 && len == (int) strlen(pre) + 1
                           && memcmp(piece, pre, strlen(pre)) == 0
                           && piece[len - 1] == c;
    }
}


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    load(&toks[0], "LLM_FUZZ_TOKENIZER", 0);
    load(&toks[1], "LLM_FUZZ_TOKENIZER_SPM", 1);
    return 0;
}


static int
valid_utf8(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        uint32_t cp;
        int      len = llm_utf8_decode_strict(s + i, n - i, &cp);

        if (len <= 0) {
            return 0;
        }
        i += (size_t) len;
    }
    return 1;
}


/* The text of ids[0..n) through the incremental detokenizer. */
static size_t
detokenize(const llm_tokenizer *tok, const int32_t *v, int n, int special)
{
    llm_detok d;
    size_t    len = 0;
    int       i, w;

    llm_detok_init(&d, special);
    for (i = 0; i < n; i++) {
        w = llm_detok_push(&d, tok, v[i], text + len, sizeof(text) - len);
        if (w < 0) {
            continue;           /* refused id: nothing written */
        }
        if (!valid_utf8(text + len, (size_t) w)) {
            fuzz_fail("the detokenizer emitted invalid UTF-8", NULL);
        }
        len += (size_t) w;
    }
    w = llm_detok_flush(&d, text + len, sizeof(text) - len);
    if (w > 0) {
        if (!valid_utf8(text + len, (size_t) w)) {
            fuzz_fail("the detokenizer's flush emitted invalid UTF-8", NULL);
        }
        len += (size_t) w;
    }
    return len;
}


/* One input through one tokenizer; first: the mode byte. */
static void
fuzz_one(const fuzz_tok *ft, uint8_t first, const char *s, size_t len)
{
    size_t out, np = ft->spm ? 1 : 0;
    int    mode = first % 4, n, i, n_vocab = llm_tokenizer_n_vocab(ft->tok);

    if (mode == 3) {
        /* The rest as little-endian ids, any value. */
        n = (int) (len / 4);
        for (i = 0; i < n; i++) {
            memcpy(&ids[i], s + 4 * i, 4);
        }
        (void) detokenize(ft->tok, ids, n, first & 4);
        return;
    }

    n = llm_tokenize(ft->tok, s, len, mode == 1, mode == 2, ids, MAX_IDS);
    if (n < 0) {
        return;
    }
    if (n > MAX_IDS) {
        fuzz_fail("more ids than input bytes + BOS/EOS", NULL);
    }
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            fuzz_fail("an encoded id lies outside the vocabulary", NULL);
        }
    }
    out = detokenize(ft->tok, ids, n, mode == 2);
    for (i = 0; i < (int) len && ft->has_token[(uint8_t) s[i]]; i++) {
    }
    if (mode == 0 && len > 0 && i == (int) len && valid_utf8(s, len)
        && !(ft->spm && (memmem(s, len, "\xe2\x96\x81", 3) != NULL
                         || memmem(s, len, "<|", 2) != NULL))
        && (out != np + len || memcmp(text, " ", np) != 0
            || memcmp(text + np, s, len) != 0))
    {
        fuzz_fail(ft->spm ? "decode(encode(text)) is not a space then the "
                            "text (SentencePiece)"
                          : "decode(encode(text)) differs from the text",
                  NULL);
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > MAX_IDS) {
        return 0;
    }
    fuzz_one(&toks[0], data[0], (const char *) data + 1, size - 1);
    fuzz_one(&toks[1], data[0], (const char *) data + 1, size - 1);
    return 0;
}
