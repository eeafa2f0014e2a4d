/*
 * Chat templates on arbitrary conversations: the template text (from a
 * model file) and the messages' roles and contents (from clients), as
 * the NGINX workers render every chat request.  Input parts (fuzz.h):
 * the template text, then role and content pairs.
 *
 * Each conversation is rendered in the family the template is detected
 * as and in one other family picked by the input, with and without the
 * generation prompt.  Property beyond "no crash": a rendered prompt
 * holds every user and assistant message's content (system messages are
 * left out: Llama 2 and Mistral templates fold them into a user turn and
 * drop them when there is none, as their Jinja does; templates never
 * drop or cut the others;
 * some strip the whitespace around it as Python's str.strip() does,
 * Unicode spaces included, so the check is on the content without any
 * whitespace or non-ASCII byte at its ends); a refused conversation says
 * why.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/chat_template.h"
#include "t/fuzz/fuzz.h"


/* What str.strip() might remove at an end: ASCII whitespace (0x09-0x0d,
 * 0x1c-0x1f, space) and, conservatively, any byte of a non-ASCII
 * character (U+0085, U+00A0, U+2000.. are whitespace to Python). */
static int
maybe_stripped(char c)
{
    unsigned char u = (unsigned char) c;

    return (u >= 0x09 && u <= 0x0d) || (u >= 0x1c && u <= 0x20) || u >= 0x80;
}


static int
role_is(const llm_chat_msg *m, const char *role)
{
    return m->role_len == strlen(role)
           && memcmp(m->role, role, m->role_len) == 0;
}


static void
render(int kind, const char *tmpl, const llm_chat_msg *msgs, int n, int gen)
{
    char    *out = NULL;
    size_t   out_len = 0;
    llm_err  err;
    int      i;

    err.msg[0] = '\0';
    if (llm_chat_render(kind, tmpl, msgs, n, gen, "<s>", &out, &out_len,
                        &err) != 0)
    {
        if (err.msg[0] == '\0') {
            fuzz_fail("llm_chat_render", "refused without a message");
        }
        return;
    }
    if (strlen(out) != out_len) {
        /* contents may hold NUL bytes; then only the length is known */
        for (i = 0; i < n; i++) {
            if (memchr(msgs[i].content, '\0', msgs[i].content_len)) {
                break;
            }
        }
        if (i == n) {
            fuzz_fail("out_len disagrees with the rendered text", NULL);
        }
    }
    for (i = 0; i < n; i++) {
        const char *c = msgs[i].content;
        size_t      len = msgs[i].content_len;

        if (!role_is(&msgs[i], "user") && !role_is(&msgs[i], "assistant")) {
            continue;
        }

        while (len > 0 && maybe_stripped(c[0])) {
            c++;
            len--;
        }
        while (len > 0 && maybe_stripped(c[len - 1])) {
            len--;
        }
        if (len > 0 && memmem(out, out_len, c, len) == NULL) {
            fuzz_fail("a message's content is missing from the prompt",
                      llm_chat_name(kind));
        }
    }
    free(out);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_part    part[FUZZ_MAX_PARTS];
    llm_chat_msg msgs[FUZZ_MAX_PARTS / 2];
    char        *tmpl;
    int          n, k, kind, other;

    n = fuzz_split(data, size, part, FUZZ_MAX_PARTS);
    tmpl = malloc(part[0].len + 1);
    if (tmpl == NULL) {
        abort();
    }
    memcpy(tmpl, part[0].data, part[0].len);
    tmpl[part[0].len] = '\0';

    for (k = 0; 2 * k + 1 < n; k++) {
        msgs[k].role = (const char *) part[2 * k + 1].data;
        msgs[k].role_len = part[2 * k + 1].len;
        msgs[k].content = 2 * k + 2 < n ? (const char *) part[2 * k + 2].data
                                        : "";
        msgs[k].content_len = 2 * k + 2 < n ? part[2 * k + 2].len : 0;
    }

    kind = llm_chat_detect(tmpl);
    other = (int) (size % LLM_CHAT_N);
    if (kind != LLM_CHAT_UNKNOWN) {
        render(kind, tmpl, msgs, k, 1);
        render(kind, tmpl, msgs, k, 0);
    }
    render(other, tmpl, msgs, k, (int) (size & 1));
    free(tmpl);
    return 0;
}
