/*
 * GGUF model files on arbitrary bytes: the reader (engine/gguf.c), the
 * tokenizer from its metadata and the whole model load on the CPU
 * backend, as llm-engine and the NGINX workers open an operator's file.
 * A truncated, corrupted or unsupported file must give an error naming
 * the file and the field, never a bad read (issue 2).
 *
 * Property beyond "no crash": a refused file always says why (a
 * non-empty message).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "t/fuzz/fuzz.h"


static void
refused(const char *what, const llm_err *err)
{
    if (err->msg[0] == '\0') {
        fuzz_fail(what, "refused without a message");
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char            path[512], buf[64];
    llm_gguf       *g;
    llm_tokenizer  *tok;
    llm_model      *m;
    llm_err         err;
    int32_t         ids[64];

    fuzz_write("model.gguf", data, size, path, sizeof(path));

    err.msg[0] = '\0';
    g = llm_gguf_open(path, &err);
    if (g == NULL) {
        refused("gguf open", &err);
        return 0;
    }
    err.msg[0] = '\0';
    tok = llm_tokenizer_from_gguf(g, &err);
    if (tok == NULL) {
        refused("tokenizer", &err);
    } else {
        int n = llm_tokenize(tok, "Hello, world! 123 <|im_end|>", 28, 1, 1,
                             ids, 64);

        for (int i = 0; i < n && i < 64; i++) {
            (void) llm_token_to_piece(tok, ids[i], 1, buf, sizeof(buf));
        }
        (void) llm_tokenizer_chat_template(tok);
        llm_tokenizer_free(tok);
    }
    llm_gguf_close(g);

    err.msg[0] = '\0';
    m = llm_model_load(path, fuzz_cpu(), NULL, NULL, &err);
    if (m == NULL) {
        refused("model load", &err);
        return 0;
    }
    llm_model_free(m);
    return 0;
}
