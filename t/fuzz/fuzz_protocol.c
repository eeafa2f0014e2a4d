/*
 * The engine protocol (engine/protocol.c) on arbitrary bytes: the stream
 * parser, then the decoder of each frame's type, as the engine daemon and
 * the NGINX workers use them.  Both sides read bytes the other wrote, so
 * a bug in either, or a stray client on the engine's socket, must end in
 * an error, never a bad read.
 *
 * Property beyond "no crash": a SUBMIT or TOKENS frame that decodes
 * encodes back to a frame that decodes to the same message (encode of
 * decode is a fixed point), so the two sides agree on every field.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/protocol.h"
#include "t/fuzz/fuzz.h"


/* The one frame in buffer b (just encoded). */
static void
frame_of(const llm_proto_buf *b, llm_proto_parser *p, llm_proto_frame *f)
{
    llm_err err;

    llm_proto_parser_init(p, 0);
    if (llm_proto_parser_feed(p, b->data, b->len) != 0
        || llm_proto_parser_next(p, f, &err) != 1)
    {
        fuzz_fail("re-encoded frame does not parse", err.msg);
    }
}


static void
submit_fixed_point(const llm_proto_frame *f, const llm_proto_submit *m)
{
    llm_proto_submit  m1 = *m, m2;
    llm_proto_buf     b1, b2;
    llm_proto_parser  p;
    llm_proto_frame   f1;
    llm_err           err;
    int32_t          *stop, *prompt;

    stop = malloc(sizeof(int32_t) * (size_t) (m->n_stop + 1));
    prompt = malloc(sizeof(int32_t) * (size_t) (m->n_prompt + 1));
    if (stop == NULL || prompt == NULL) {
        abort();
    }
    llm_proto_copy_ids(m->stop_ids, m->n_stop, stop);
    llm_proto_copy_ids(m->prompt, m->n_prompt, prompt);
    m1.stop_ids = stop;
    m1.prompt = prompt;

    llm_proto_buf_init(&b1);
    llm_proto_buf_init(&b2);
    if (llm_proto_encode_submit(&b1, f->req_id, &m1) != 0) {
        fuzz_fail("a decoded SUBMIT does not encode", NULL);
    }
    frame_of(&b1, &p, &f1);
    if (llm_proto_decode_submit(&f1, &m2, &err) != 0) {
        fuzz_fail("a re-encoded SUBMIT does not decode", err.msg);
    }
    llm_proto_copy_ids(m2.stop_ids, m2.n_stop, stop);
    llm_proto_copy_ids(m2.prompt, m2.n_prompt, prompt);
    m2.stop_ids = stop;
    m2.prompt = prompt;
    if (llm_proto_encode_submit(&b2, f1.req_id, &m2) != 0
        || b1.len != b2.len || memcmp(b1.data, b2.data, b1.len) != 0)
    {
        fuzz_fail("SUBMIT: encode(decode(frame)) is not a fixed point",
                  NULL);
    }
    llm_proto_parser_free(&p);
    llm_proto_buf_free(&b1);
    llm_proto_buf_free(&b2);
    free(stop);
    free(prompt);
}


static void
tokens_fixed_point(const llm_proto_frame *f, llm_proto_tokens *m)
{
    llm_proto_token  *t;
    llm_proto_tokens  m2;
    llm_proto_buf     b1, b2;
    llm_proto_parser  p;
    llm_proto_frame   f1;
    llm_err           err;
    int               n = 0;

    t = malloc(sizeof(*t) * (size_t) m->n_tokens);
    if (t == NULL) {
        abort();
    }
    while (n < m->n_tokens && llm_proto_tokens_next(m, &t[n]) == 1) {
        n++;
    }
    if (n != m->n_tokens || llm_proto_tokens_next(m, &t[0]) != 0) {
        fuzz_fail("TOKENS: the iterator disagrees with n_tokens", NULL);
    }
    llm_proto_buf_init(&b1);
    llm_proto_buf_init(&b2);
    if (llm_proto_encode_tokens(&b1, f->req_id, m->flags, t, n) != 0) {
        fuzz_fail("a decoded TOKENS does not encode", NULL);
    }
    frame_of(&b1, &p, &f1);
    if (llm_proto_decode_tokens(&f1, &m2, &err) != 0) {
        fuzz_fail("a re-encoded TOKENS does not decode", err.msg);
    }
    for (n = 0; llm_proto_tokens_next(&m2, &t[n]) == 1; n++) {
    }
    if (llm_proto_encode_tokens(&b2, f1.req_id, m2.flags, t, n) != 0
        || b1.len != b2.len || memcmp(b1.data, b2.data, b1.len) != 0)
    {
        fuzz_fail("TOKENS: encode(decode(frame)) is not a fixed point",
                  NULL);
    }
    llm_proto_parser_free(&p);
    llm_proto_buf_free(&b1);
    llm_proto_buf_free(&b2);
    free(t);
}


static void
decode_frame(const llm_proto_frame *f)
{
    union {
        llm_proto_hello         hello;
        llm_proto_hello_ok      hello_ok;
        llm_proto_submit        submit;
        llm_proto_tokens        tokens;
        llm_proto_done          done;
        llm_proto_error         error;
        llm_proto_stats         stats;
        llm_proto_adapter_load  load;
        llm_proto_adapter_ok    ok;
        llm_proto_adapters      list;
    } m;
    char                    name[LLM_PROTO_MAX_ADAPTER + 1];
    llm_proto_adapter_info  e;
    llm_err                 err;

    switch (f->type) {
    case LLM_MSG_HELLO:
        if (llm_proto_decode_hello(f, &m.hello, &err) == 0) {
            (void) llm_proto_negotiate(&m.hello);
        }
        break;
    case LLM_MSG_HELLO_OK:
        (void) llm_proto_decode_hello_ok(f, &m.hello_ok, &err);
        break;
    case LLM_MSG_SUBMIT:
        if (llm_proto_decode_submit(f, &m.submit, &err) == 0) {
            submit_fixed_point(f, &m.submit);
        }
        break;
    case LLM_MSG_TOKENS:
        if (llm_proto_decode_tokens(f, &m.tokens, &err) == 0) {
            tokens_fixed_point(f, &m.tokens);
        }
        break;
    case LLM_MSG_DONE:
        (void) llm_proto_decode_done(f, &m.done, &err);
        break;
    case LLM_MSG_ERROR:
        if (llm_proto_decode_error(f, &m.error, &err) == 0) {
            (void) llm_proto_error_name(m.error.code);
        }
        break;
    case LLM_MSG_STATS:
        (void) llm_proto_decode_stats(f, &m.stats, &err);
        break;
    case LLM_MSG_ADAPTER_LOAD:
        (void) llm_proto_decode_adapter_load(f, &m.load, &err);
        break;
    case LLM_MSG_ADAPTER_UNLOAD:
        (void) llm_proto_decode_adapter_unload(f, name, &err);
        break;
    case LLM_MSG_ADAPTER_OK:
        (void) llm_proto_decode_adapter_ok(f, &m.ok, &err);
        break;
    case LLM_MSG_ADAPTERS:
        if (llm_proto_decode_adapters(f, &m.list, &err) == 0) {
            while (llm_proto_adapters_next(&m.list, &e) == 1) {
            }
        }
        break;
    default:
        (void) llm_proto_decode_empty(f, &err);
        break;
    }
    (void) llm_proto_type_name(f->type);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    llm_proto_parser  p;
    llm_proto_frame   f;
    llm_err           err;
    size_t            off = 0, step;
    int               rc = 0;

    /* The first byte sets the size of the pieces the stream arrives in
     * (1..256 bytes), as reads from a socket would split it. */
    step = size > 0 ? (size_t) data[0] + 1 : 1;
    llm_proto_parser_init(&p, 1 << 16);
    while (off < size && rc >= 0) {
        size_t n = size - off < step ? size - off : step;

        if (llm_proto_parser_feed(&p, data + off, n) != 0) {
            break;
        }
        off += n;
        while ((rc = llm_proto_parser_next(&p, &f, &err)) == 1) {
            decode_frame(&f);
        }
    }
    (void) llm_proto_parser_pending(&p);
    llm_proto_parser_free(&p);
    return 0;
}
