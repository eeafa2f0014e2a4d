/*
 * Hugging Face model folders on arbitrary bytes: config.json,
 * tokenizer.json, tokenizer_config.json and model.safetensors (the parts
 * of the input, in that order; fuzz.h) loaded as llm-engine loads a
 * folder: the weights on the CPU backend, then the tokenizer.  Also the
 * safetensors reader alone on the last part.
 *
 * Property beyond "no crash": a refused folder always says why.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "t/fuzz/fuzz.h"

static const char *files[] = {
    "config.json", "tokenizer.json", "tokenizer_config.json",
    "model.safetensors"
};


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_part        part[FUZZ_MAX_PARTS];
    char             path[512];
    llm_safetensors *st;
    llm_tokenizer   *tok;
    llm_model       *m;
    llm_err          err;
    int              n, i;

    n = fuzz_split(data, size, part, 4);
    for (i = 0; i < 4; i++) {
        fuzz_write(files[i], i < n ? part[i].data : NULL,
                   i < n ? part[i].len : 0, path, sizeof(path));
    }

    err.msg[0] = '\0';
    st = llm_safetensors_open(path, &err);
    if (st != NULL) {
        (void) llm_safetensors_find(st, "model.embed_tokens.weight");
        llm_safetensors_close(st);
    } else if (err.msg[0] == '\0') {
        fuzz_fail("safetensors", "refused without a message");
    }

    err.msg[0] = '\0';
    m = llm_model_load(fuzz_dir(), fuzz_cpu(), NULL, NULL, &err);
    if (m != NULL) {
        llm_model_free(m);
    } else if (err.msg[0] == '\0') {
        fuzz_fail("model load", "refused without a message");
    }

    err.msg[0] = '\0';
    tok = llm_tokenizer_load(fuzz_dir(), &err);
    if (tok != NULL) {
        int32_t ids[64];

        (void) llm_tokenize(tok, "Hi there <|im_start|>user\n", 26, 1, 1,
                            ids, 64);
        llm_tokenizer_free(tok);
    } else if (err.msg[0] == '\0') {
        fuzz_fail("tokenizer", "refused without a message");
    }
    return 0;
}
