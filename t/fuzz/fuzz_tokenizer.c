/*
 * The default model's tokenizer on arbitrary text and arbitrary token
 * ids: what the NGINX workers do with every client's prompt and every
 * token the engine returns.
 *
 * The tokenizer is LLM_FUZZ_TOKENIZER (t/fuzz/run.sh passes SmolLM2's
 * GGUF).  The first input byte picks the mode, the rest is the text.
 * Properties beyond "no crash":
 *   - every id encoded lies inside the vocabulary;
 *   - plain encoding (no special-token parsing) of valid UTF-8 decodes,
 *     through the incremental detokenizer, back to the same bytes, when
 *     every byte of it has a token (SmolLM2's vocabulary lacks a few,
 *     e.g. 0x04 and 0x14: those are dropped, as llama.cpp drops them);
 *   - the incremental detokenizer only ever emits valid UTF-8, whatever
 *     the ids (out-of-range ids are refused, not read).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "engine/unicode.h"
#include "t/fuzz/fuzz.h"

#define MAX_IDS  8192

static llm_tokenizer *tok;
static int            has_token[256];   /* the byte has a token */
static int32_t        ids[MAX_IDS];
static char           text[MAX_IDS * 64 + 64];


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *path = getenv("LLM_FUZZ_TOKENIZER");
    llm_err     err;

    if (path == NULL || path[0] == '\0') {
        fuzz_fail("LLM_FUZZ_TOKENIZER is not set", "the GGUF or "
                  "tokenizer.json to load (t/fuzz/run.sh sets it)");
    }
    tok = llm_tokenizer_load(path, &err);
    if (tok == NULL) {
        fuzz_fail("cannot load the tokenizer", err.msg);
    }
    for (int b = 0; b < 256; b++) {
        char    c = (char) b, piece[8];
        int32_t id;

        has_token[b] = llm_tokenize(tok, &c, 1, 0, 0, &id, 1) == 1
                       && llm_token_to_piece(tok, id, 0, piece, 8) == 1
                       && piece[0] == c;
    }
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
detokenize(const int32_t *v, int n, int special)
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


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *) data + 1;
    size_t      len, out;
    int         mode, n, i, n_vocab = llm_tokenizer_n_vocab(tok);

    if (size < 1 || size > MAX_IDS) {
        return 0;
    }
    mode = data[0] % 4;
    len = size - 1;

    if (mode == 3) {
        /* The rest as little-endian ids, any value. */
        n = (int) (len / 4);
        for (i = 0; i < n; i++) {
            memcpy(&ids[i], s + 4 * i, 4);
        }
        (void) detokenize(ids, n, data[0] & 4);
        return 0;
    }

    n = llm_tokenize(tok, s, len, mode == 1, mode == 2, ids, MAX_IDS);
    if (n < 0) {
        return 0;
    }
    if (n > MAX_IDS) {
        fuzz_fail("more ids than input bytes + BOS/EOS", NULL);
    }
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            fuzz_fail("an encoded id lies outside the vocabulary", NULL);
        }
    }
    out = detokenize(ids, n, mode == 2);
    for (i = 0; i < (int) len && has_token[(uint8_t) s[i]]; i++) {
    }
    if (mode == 0 && i == (int) len && valid_utf8(s, len)
        && (out != len || memcmp(text, s, len) != 0))
    {
        fuzz_fail("decode(encode(text)) differs from the text", NULL);
    }
    return 0;
}
