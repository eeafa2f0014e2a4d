/*
 * Chat template tests: every conversation in t/fixtures/chat/<name>.txt,
 * rendered by jinja2 from <name>.tmpl the way transformers does it
 * (tools/gen_tokenizer_fixtures.py --chat), must come out of
 * llm_chat_render byte for byte, and each template must be detected as
 * its family.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "../../engine/chat_template.h"
#include "../../engine/tokenizer.h"


static int
hexval(int c)
{
    return c <= '9' ? c - '0' : c - 'a' + 10;
}


static char *
unhex(const char *h, size_t *len)
{
    size_t n = strcmp(h, "-") == 0 ? 0 : strlen(h) / 2, i;
    char  *b = malloc(n + 1);

    for (i = 0; i < n; i++) {
        b[i] = (char) (hexval(h[2 * i]) * 16 + hexval(h[2 * i + 1]));
    }
    b[n] = '\0';
    *len = n;
    return b;
}


static char *
slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long  n;

    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t) n + 1);
    if (fread(buf, 1, (size_t) n, f) != (size_t) n) {
        n = 0;
    }
    buf[n] = '\0';
    fclose(f);
    return buf;
}


#define MAX_MSGS 16

typedef struct {
    int          gen;
    char        *bos, *eos;
    llm_chat_msg msg[MAX_MSGS];
    char        *role[MAX_MSGS];
    int          n;
} chat_case;


static void
case_free(chat_case *c)
{
    int i;

    free(c->bos);
    free(c->eos);
    for (i = 0; i < c->n; i++) {
        free(c->role[i]);
        free((char *) c->msg[i].content);
    }
    memset(c, 0, sizeof(*c));
}


/* Checks one fixture file; returns the number of failures, counts the
 * cases in *n_cases. */
static int
check_file(const char *dir, const char *name, int *n_cases, int *kind_ok)
{
    char       path[1024], *tmpl, *line = NULL, *sp;
    FILE      *f;
    size_t     cap = 0, len;
    chat_case  c;
    int        kind = LLM_CHAT_UNKNOWN, bad = 0;

    memset(&c, 0, sizeof(c));
    snprintf(path, sizeof(path), "%s/%.*s.tmpl", dir,
             (int) (strlen(name) - 4), name);
    tmpl = slurp(path);
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "r");
    if (tmpl == NULL || f == NULL) {
        free(tmpl);
        if (f != NULL) {
            fclose(f);
        }
        return 1;
    }
    *kind_ok = 0;
    while (getline(&line, &cap, f) > 0) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "kind ", 5) == 0) {
            kind = llm_chat_detect(tmpl);
            *kind_ok = strcmp(llm_chat_name(kind), line + 5) == 0;
            if (!*kind_ok) {
                printf("       %s: detected %s, want %s\n", name,
                       llm_chat_name(kind), line + 5);
            }
        } else if (strncmp(line, "case ", 5) == 0) {
            char bos[256], eos[256];

            case_free(&c);
            sscanf(line + 5, "%d %255s %255s", &c.gen, bos, eos);
            c.bos = unhex(bos, &len);
            c.eos = unhex(eos, &len);
        } else if (strncmp(line, "msg ", 4) == 0 && c.n < MAX_MSGS) {
            sp = strchr(line + 4, ' ');
            *sp = '\0';
            c.role[c.n] = strdup(line + 4);
            c.msg[c.n].role = c.role[c.n];
            c.msg[c.n].role_len = strlen(c.role[c.n]);
            c.msg[c.n].content = unhex(sp + 1, &c.msg[c.n].content_len);
            c.n++;
        } else if (strncmp(line, "expect ", 7) == 0) {
            char   *out = NULL, *want;
            size_t  out_len = 0, want_len;
            llm_err err;
            int     rc;

            (*n_cases)++;
            rc = llm_chat_render_ex(kind, tmpl, c.msg, c.n, c.gen, c.bos,
                                    c.eos, &out, &out_len, &err);
            if (strcmp(line + 7, "error") == 0) {
                if (rc == 0) {
                    bad++;
                    printf("       %s case %d: rendered, want an error\n",
                           name, *n_cases);
                }
            } else {
                want = unhex(line + 7, &want_len);
                if (rc != 0 || out_len != want_len
                    || memcmp(out, want, want_len) != 0)
                {
                    bad++;
                    printf("       %s case %d (gen=%d): rc=%d\n"
                           "         want: \"%s\"\n         got:  \"%s\"\n",
                           name, *n_cases, c.gen, rc, want,
                           rc == 0 ? out : err.msg);
                }
                free(want);
            }
            llm_free(out);
        }
    }
    case_free(&c);
    free(line);
    fclose(f);
    free(tmpl);
    return bad;
}


TEST_SUITE(chat_template_fixtures)
{
    char           dir[512];
    DIR           *d;
    struct dirent *e;
    int            n_files = 0;

    snprintf(dir, sizeof(dir), "%s/chat", llm_test_fixture_dir());
    d = opendir(dir);
    test("chat fixtures are present");
    if (d == NULL) {
        test_skip("t/fixtures/chat missing");
        return;
    }
    while ((e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        static char names[32][128];   /* the runner keeps the pointer */
        char       *name = names[n_files % 32];
        int         n_cases = 0, kind_ok = 0, bad;

        if (l < 5 || strcmp(e->d_name + l - 4, ".txt") != 0) {
            continue;
        }
        n_files++;
        snprintf(name, sizeof(names[0]), "jinja2 renderings of %s",
                 e->d_name);
        test(name);
        bad = check_file(dir, e->d_name, &n_cases, &kind_ok);
        test_cond(kind_ok);
        test_cond(n_cases > 0 && bad == 0);
    }
    closedir(d);
    test("all chat families have fixtures");
    test_cond(n_files >= 13);
}


static int
render1(int kind, const char *tmpl, const char *role, const char *content,
        char **out, llm_err *err)
{
    llm_chat_msg m;
    size_t       len;

    m.role = role;
    m.role_len = strlen(role);
    m.content = content;
    m.content_len = strlen(content);
    return llm_chat_render(kind, tmpl, &m, 1, 1, "<s>", out, &len, err);
}


TEST_SUITE(chat_template_api)
{
    char          *out = NULL;
    size_t         len;
    llm_err        err;
    llm_chat_msg   m[2];
    int            rc;
    const char    *model = llm_test_default_model();

    test("detects families and names");
    test_cond(llm_chat_detect(NULL) == LLM_CHAT_UNKNOWN);
    test_cond(llm_chat_detect("{{ messages }}") == LLM_CHAT_UNKNOWN);
    test_cond(llm_chat_detect("chatml") == LLM_CHAT_CHATML);
    test_cond(llm_chat_detect("llama3") == LLM_CHAT_LLAMA3);
    test_cond(llm_chat_detect("mistral-v7") == LLM_CHAT_MISTRAL_V7);
    test_cond(strcmp(llm_chat_name(LLM_CHAT_GEMMA), "gemma") == 0);
    test_cond(strcmp(llm_chat_name(-1), "unknown") == 0);

    test("developer is system; unknown and tool roles are refused");
    rc = render1(LLM_CHAT_CHATML, NULL, "developer", "x", &out, &err);
    test_cond(rc == 0 && strcmp(out, "<|im_start|>system\nx<|im_end|>\n"
                                "<|im_start|>assistant\n") == 0);
    llm_free(out);
    out = NULL;
    rc = render1(LLM_CHAT_CHATML, NULL, "tool", "x", &out, &err);
    test_cond(rc == LLM_EINVAL && out == NULL
              && strstr(err.msg, "\"tool\"") != NULL);
    rc = render1(LLM_CHAT_LLAMA3, NULL, "wizard", "x", &out, &err);
    test_cond(rc == LLM_EINVAL && strstr(err.msg, "wizard") != NULL);

    test("bad kinds and arguments are refused");
    rc = render1(LLM_CHAT_N, NULL, "user", "x", &out, &err);
    test_cond(rc == LLM_EINVAL);
    rc = render1(-1, NULL, "user", "x", &out, &err);
    test_cond(rc == LLM_EINVAL);
    test_cond(llm_chat_render(LLM_CHAT_CHATML, NULL, NULL, 1, 1, "", &out,
                              &len, &err) == LLM_EINVAL);

    test("an empty conversation renders the generation prompt");
    rc = llm_chat_render(LLM_CHAT_CHATML, NULL, NULL, 0, 1, NULL, &out, &len,
                         &err);
    test_cond(rc == 0 && strcmp(out, "<|im_start|>assistant\n") == 0
              && len == 22);
    llm_free(out);

    test("contents need not be NUL-terminated");
    m[0].role = "userXX";
    m[0].role_len = 4;
    m[0].content = "hello world";
    m[0].content_len = 5;
    rc = llm_chat_render(LLM_CHAT_LLAMA3, NULL, m, 1, 0, "", &out, &len,
                         &err);
    test_cond(rc == 0 && strcmp(out, "<|start_header_id|>user"
                                "<|end_header_id|>\n\nhello<|eot_id|>") == 0);
    llm_free(out);

    test("Jinja trim removes Python whitespace, not other characters");
    m[0].role = "user";
    m[0].content = "\xe3\x80\x80 x\xc2\xa0\x1c\n";     /* U+3000 .. U+00A0 */
    m[0].content_len = strlen(m[0].content);
    rc = llm_chat_render(LLM_CHAT_LLAMA3, NULL, m, 1, 0, "", &out, &len,
                         &err);
    test_cond(rc == 0 && strstr(out, "\n\nx<|eot_id|>") != NULL);
    llm_free(out);
    m[0].content = "\xe2\x80\x8bx\xe2\x80\x8b";           /* U+200B stays */
    m[0].content_len = strlen(m[0].content);
    rc = llm_chat_render(LLM_CHAT_LLAMA3, NULL, m, 1, 0, "", &out, &len,
                         &err);
    test_cond(rc == 0 && strstr(out, "\xe2\x80\x8bx\xe2\x80\x8b") != NULL);
    llm_free(out);

    test("Llama 2 and Mistral refuse roles that do not alternate");
    m[0].role = "user";
    m[0].role_len = 4;
    m[0].content = "a";
    m[0].content_len = 1;
    m[1] = m[0];
    rc = llm_chat_render(LLM_CHAT_LLAMA2, NULL, m, 2, 1, "<s>", &out, &len,
                         &err);
    test_cond(rc == LLM_EINVAL && strstr(err.msg, "alternate") != NULL);

    test("the legacy Mistral template takes a system message into the "
         "first turn");
    m[0].role = "system";
    m[0].role_len = 6;
    m[0].content = "S";
    m[0].content_len = 1;
    m[1].content = "U";
    rc = llm_chat_render(LLM_CHAT_MISTRAL_LEGACY, NULL, m, 2, 1, "<s>", &out,
                         &len, &err);
    test_cond(rc == 0 && strcmp(out, "<s>[INST] S\n\nU [/INST]") == 0);
    llm_free(out);

    test("SmolLM2's own template: ChatML with its default system prompt");
    if (model == NULL) {
        test_skip("default model not installed");
        return;
    } else {
        llm_tokenizer *t = llm_tokenizer_load(model, &err);
        const char    *tmpl = t ? llm_tokenizer_chat_template(t) : NULL;

        test_cond(tmpl != NULL);
        if (tmpl != NULL) {
            test_cond(llm_chat_detect(tmpl) == LLM_CHAT_CHATML);
            rc = render1(LLM_CHAT_CHATML, tmpl, "user", "Hi", &out, &err);
            test_cond(rc == 0 && strcmp(out,
                "<|im_start|>system\nYou are a helpful AI assistant named "
                "SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n") == 0);
            llm_free(out);
            /* a conversation with its own system message keeps it */
            rc = render1(LLM_CHAT_CHATML, tmpl, "system", "S", &out, &err);
            test_cond(rc == 0 && strncmp(out, "<|im_start|>system\nS<|im_end|>",
                                         29) == 0);
            llm_free(out);
        }
        llm_tokenizer_free(t);
    }
}


TEST_SUITE(chat_template_strip_bos)
{
    char a[] = "<s>[INST] q [/INST] a </s><s>[INST] r [/INST]";
    char b[] = "[INST] q [/INST]";
    char c[] = "<s>x";
    size_t n;

    test("the tokenizer's BOS replaces only the rendering's first one");
    n = llm_chat_strip_bos(a, strlen(a), "<s>", 1);
    test_cond(n == strlen(a)
              && strcmp(a, "[INST] q [/INST] a </s><s>[INST] r [/INST]")
                 == 0);
    n = llm_chat_strip_bos(b, strlen(b), "<s>", 1);
    test_cond(n == strlen(b) && strcmp(b, "[INST] q [/INST]") == 0);
    n = llm_chat_strip_bos(c, strlen(c), "<s>", 0);
    test_cond(n == 4 && strcmp(c, "<s>x") == 0);
    n = llm_chat_strip_bos(c, strlen(c), "", 1);
    test_cond(n == 4);
    n = llm_chat_strip_bos(c, strlen(c), NULL, 1);
    test_cond(n == 4);
}
