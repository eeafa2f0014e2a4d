/*
 * Chat templates (see chat_template.h).
 *
 * Each family is rendered by a small function that writes what the
 * family's Hugging Face template writes, including its whitespace rules:
 * Jinja's "trim" filter and Python's str.strip() remove what Python calls
 * whitespace (str.isspace), so the tables' LLM_U_PYSPACE is used for them.
 */
#include "chat_template.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "unicode.h"


enum {
    ROLE_SYSTEM = 0,
    ROLE_USER,
    ROLE_ASSISTANT
};

static const char *const role_names[] = { "system", "user", "assistant" };

static const struct {
    const char *name;
    int         kind;
} chat_names[] = {
    { "chatml",            LLM_CHAT_CHATML },
    { "llama3",            LLM_CHAT_LLAMA3 },
    { "llama3.1",          LLM_CHAT_LLAMA31 },
    { "llama31",           LLM_CHAT_LLAMA31 },
    { "llama2",            LLM_CHAT_LLAMA2 },
    { "mistral-v1",        LLM_CHAT_MISTRAL_V1 },
    { "mistral-v3",        LLM_CHAT_MISTRAL_V3 },
    { "mistral-v3-tekken", LLM_CHAT_MISTRAL_V3_TEKKEN },
    { "mistral-v7",        LLM_CHAT_MISTRAL_V7 },
    { "mistral-v7-tekken", LLM_CHAT_MISTRAL_V7_TEKKEN },
    { "mistral",           LLM_CHAT_MISTRAL_LEGACY },
    { "gemma",             LLM_CHAT_GEMMA },
    { "phi3",              LLM_CHAT_PHI3 },
    { "zephyr",            LLM_CHAT_ZEPHYR },
};


/* ---------------------------------------------------------------------
 * Detection
 * --------------------------------------------------------------------- */

static int
has(const char *t, const char *s)
{
    return strstr(t, s) != NULL;
}


int
llm_chat_detect(const char *t)
{
    size_t i;

    if (t == NULL) {
        return LLM_CHAT_UNKNOWN;
    }
    for (i = 0; i < sizeof(chat_names) / sizeof(chat_names[0]); i++) {
        if (strcmp(t, chat_names[i].name) == 0) {
            return chat_names[i].kind;
        }
    }
    if (has(t, "<|im_start|>")) {
        return LLM_CHAT_CHATML;
    }
    if (has(t, "<|start_header_id|>")) {
        return has(t, "Cutting Knowledge Date") ? LLM_CHAT_LLAMA31
                                                : LLM_CHAT_LLAMA3;
    }
    if (has(t, "<start_of_turn>")) {
        return LLM_CHAT_GEMMA;
    }
    if (has(t, "[INST]")) {
        if (has(t, "<<SYS>>")) {
            return LLM_CHAT_LLAMA2;
        }
        if (has(t, "[SYSTEM_PROMPT]")) {
            return has(t, "[SYSTEM_PROMPT] ") ? LLM_CHAT_MISTRAL_V7
                                              : LLM_CHAT_MISTRAL_V7_TEKKEN;
        }
        if (has(t, " [INST] ")) {
            return LLM_CHAT_MISTRAL_V1;
        }
        if (has(t, "[INST] ")) {
            /* Mistral 7B v0.1/v0.2 put a space before [/INST], v3 not */
            return has(t, " [/INST]") ? LLM_CHAT_MISTRAL_LEGACY
                                      : LLM_CHAT_MISTRAL_V3;
        }
        return LLM_CHAT_MISTRAL_V3_TEKKEN;
    }
    if (has(t, "<|user|>")) {
        return has(t, "<|end|>") ? LLM_CHAT_PHI3 : LLM_CHAT_ZEPHYR;
    }
    return LLM_CHAT_UNKNOWN;
}


const char *
llm_chat_name(int kind)
{
    size_t i;

    for (i = 0; i < sizeof(chat_names) / sizeof(chat_names[0]); i++) {
        if (chat_names[i].kind == kind) {
            return chat_names[i].name;
        }
    }
    return "unknown";
}


/* ---------------------------------------------------------------------
 * Output buffer and text helpers
 * --------------------------------------------------------------------- */

typedef struct {
    char   *p;
    size_t  n;
    size_t  cap;
    int     oom;
} sbuf;


static void
sb_add(sbuf *b, const char *s, size_t n)
{
    size_t cap;
    char  *q;

    if (b->oom || n == 0) {
        return;
    }
    if (b->n + n + 1 > b->cap) {
        cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) {
            cap *= 2;
        }
        q = llm_realloc(b->p, cap);
        if (q == NULL) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}


static void
sb_str(sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}


typedef struct {
    const char *p;
    size_t      n;
} span;


/* Python's str.strip(): whitespace as str.isspace() sees it. */
static span
py_strip(const char *s, size_t n)
{
    span     r;
    size_t   i = 0, j, k;
    uint32_t cp;
    int      len;

    while (i < n) {
        len = llm_utf8_decode_strict(s + i, n - i, &cp);
        if (len <= 0 || !(llm_unicode_flags(cp) & LLM_U_PYSPACE)) {
            break;
        }
        i += (size_t) len;
    }
    j = n;
    while (j > i) {
        /* start of the last code point */
        k = j - 1;
        while (k > i && j - k < 4 && ((unsigned char) s[k] & 0xc0) == 0x80) {
            k--;
        }
        len = llm_utf8_decode_strict(s + k, j - k, &cp);
        if (len != (int) (j - k) || !(llm_unicode_flags(cp) & LLM_U_PYSPACE))
        {
            break;
        }
        j = k;
    }
    r.p = s + i;
    r.n = j - i;
    return r;
}


static void
sb_span(sbuf *b, span s)
{
    sb_add(b, s.p, s.n);
}


static void
sb_content(sbuf *b, const llm_chat_msg *m)
{
    sb_add(b, m->content, m->content_len);
}


static void
sb_trimmed(sbuf *b, const llm_chat_msg *m)
{
    sb_span(b, py_strip(m->content, m->content_len));
}


/* Reads the text of a Jinja string literal quoted with quote (0: either
 * quote) from p up to stop, undoing \n, \t, \r, \\, \' and \"
 * escapes; -1 if the literal ends first. */
static int
literal_until(const char *p, const char *stop, char quote, char *out,
              size_t cap)
{
    size_t o = 0;

    while (*p && strncmp(p, stop, strlen(stop)) != 0) {
        char c = *p++;

        if (quote ? c == quote : (c == '\'' || c == '"')) {
            return -1;              /* the literal ended */
        }
        if (c == '\\') {
            c = *p++;
            switch (c) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case '\\': case '\'': case '"': break;
            default: return -1;
            }
        }
        if (o + 1 >= cap) {
            return -1;
        }
        out[o++] = c;
    }
    if (*p == '\0') {
        return -1;
    }
    out[o] = '\0';
    return (int) o;
}


/* The default system prompt a ChatML template inserts when the
 * conversation does not start with a system message (SmolLM2, Qwen2):
 * a literal '<|im_start|>system\n...<|im_end|>' in the template. */
static int
chatml_default_system(const char *tmpl, char *out, size_t cap)
{
    const char *p = tmpl;
    const char *q;
    char        quote;

    while (tmpl != NULL && (p = strstr(p, "<|im_start|>system")) != NULL) {
        q = p + 18;
        p = q;
        /* only inside a string literal: a quote just before */
        if (q - 19 < tmpl || (q[-19] != '\'' && q[-19] != '"')) {
            continue;
        }
        quote = q[-19];
        if (*q == '\n') {
            q += 1;
        } else if (q[0] == '\\' && q[1] == 'n') {
            q += 2;
        } else {
            continue;
        }
        if (literal_until(q, "<|im_end|>", quote, out, cap) > 0) {
            return 1;
        }
    }
    return 0;
}


/* ---------------------------------------------------------------------
 * Families
 * --------------------------------------------------------------------- */

typedef struct {
    const llm_chat_msg *m;
    const int          *role;       /* ROLE_* per message */
    int                 n;
    int                 gen;
    const char         *bos;
    const char         *eos;
    const char         *tmpl;
    sbuf               *b;
    llm_err            *err;
} render_ctx;


static int
alternation_error(render_ctx *c)
{
    return llm_err_set(c->err, LLM_EINVAL, "conversation roles must "
                       "alternate user/assistant/user/assistant/... "
                       "(after an optional first system message) for this "
                       "chat template");
}


static int
render_chatml(render_ctx *c)
{
    char dflt[1024];
    int  i;

    if (c->n > 0 && c->role[0] != ROLE_SYSTEM
        && chatml_default_system(c->tmpl, dflt, sizeof(dflt)))
    {
        sb_str(c->b, "<|im_start|>system\n");
        sb_str(c->b, dflt);
        sb_str(c->b, "<|im_end|>\n");
    }
    for (i = 0; i < c->n; i++) {
        sb_str(c->b, "<|im_start|>");
        sb_str(c->b, role_names[c->role[i]]);
        sb_str(c->b, "\n");
        sb_content(c->b, &c->m[i]);
        sb_str(c->b, "<|im_end|>\n");
    }
    if (c->gen) {
        sb_str(c->b, "<|im_start|>assistant\n");
    }
    return 0;
}


static void
llama3_turn(render_ctx *c, int role, span content)
{
    sb_str(c->b, "<|start_header_id|>");
    sb_str(c->b, role_names[role]);
    sb_str(c->b, "<|end_header_id|>\n\n");
    sb_span(c->b, content);
    sb_str(c->b, "<|eot_id|>");
}


static int
render_llama3(render_ctx *c)
{
    int i;

    for (i = 0; i < c->n; i++) {
        if (i == 0) {
            sb_str(c->b, c->bos);
        }
        llama3_turn(c, c->role[i],
                    py_strip(c->m[i].content, c->m[i].content_len));
    }
    if (c->gen) {
        sb_str(c->b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    return 0;
}


/* Llama 3.1/3.2: a system turn always, with the knowledge cutoff and
 * today's date the template names. */
static int
render_llama31(render_ctx *c)
{
    char        know[128], date[64];
    const char *p;
    int         i = 0;
    span        sys = { "", 0 };

    snprintf(know, sizeof(know), "December 2023");
    p = c->tmpl ? strstr(c->tmpl, "Cutting Knowledge Date: ") : NULL;
    if (p != NULL && literal_until(p + 24, "\\n", 0, know, sizeof(know)) < 0
        && literal_until(p + 24, "\n", 0, know, sizeof(know)) < 0)
    {
        snprintf(know, sizeof(know), "December 2023");
    }
    snprintf(date, sizeof(date), "26 Jul 2024");
    if (c->tmpl != NULL && strstr(c->tmpl, "strftime_now") != NULL) {
        /* transformers and llama.cpp both pass strftime_now: today */
        time_t    now = time(NULL);
        struct tm tm;

        if (localtime_r(&now, &tm) != NULL) {
            static const char *const mon[] = {
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                "Sep", "Oct", "Nov", "Dec"
            };

            snprintf(date, sizeof(date), "%02d %s %04d", tm.tm_mday,
                     mon[tm.tm_mon % 12], tm.tm_year + 1900);
        }
    } else if (c->tmpl != NULL
               && (p = strstr(c->tmpl, "date_string = \"")) != NULL)
    {
        if (literal_until(p + 15, "\"", 0, date, sizeof(date)) < 0) {
            snprintf(date, sizeof(date), "26 Jul 2024");
        }
    }

    sb_str(c->b, c->bos);
    if (c->n > 0 && c->role[0] == ROLE_SYSTEM) {
        sys = py_strip(c->m[0].content, c->m[0].content_len);
        i = 1;
    }
    sb_str(c->b, "<|start_header_id|>system<|end_header_id|>\n\n");
    sb_str(c->b, "Cutting Knowledge Date: ");
    sb_str(c->b, know);
    sb_str(c->b, "\nToday Date: ");
    sb_str(c->b, date);
    sb_str(c->b, "\n\n");
    sb_span(c->b, sys);
    sb_str(c->b, "<|eot_id|>");
    for (; i < c->n; i++) {
        llama3_turn(c, c->role[i],
                    py_strip(c->m[i].content, c->m[i].content_len));
    }
    if (c->gen) {
        sb_str(c->b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    return 0;
}


/* The system message, if first, and where the user/assistant turns
 * start; checks that they alternate starting with user. */
static int
split_system(render_ctx *c, int *first)
{
    int i;

    *first = c->n > 0 && c->role[0] == ROLE_SYSTEM;
    for (i = *first; i < c->n; i++) {
        if ((c->role[i] == ROLE_USER) != ((i - *first) % 2 == 0)) {
            return alternation_error(c);
        }
    }
    return 0;
}


static int
render_llama2(render_ctx *c)
{
    int  first, i, rc;
    sbuf tmp = { 0 };

    if ((rc = split_system(c, &first)) != 0) {
        return rc;
    }
    for (i = first; i < c->n; i++) {
        /* the system block joins the first turn before strip() */
        tmp.n = 0;
        if (i == first && first) {
            sb_str(&tmp, "<<SYS>>\n");
            sb_content(&tmp, &c->m[0]);
            sb_str(&tmp, "\n<</SYS>>\n\n");
        }
        sb_content(&tmp, &c->m[i]);
        if (tmp.oom) {
            break;
        }
        if (c->role[i] == ROLE_USER) {
            sb_str(c->b, c->bos);
            sb_str(c->b, "[INST] ");
            sb_span(c->b, py_strip(tmp.p ? tmp.p : "", tmp.n));
            sb_str(c->b, " [/INST]");
        } else {
            sb_str(c->b, " ");
            sb_span(c->b, py_strip(tmp.p ? tmp.p : "", tmp.n));
            sb_str(c->b, " ");
            sb_str(c->b, c->eos);
        }
    }
    if (tmp.oom) {
        c->b->oom = 1;
    }
    llm_free(tmp.p);
    return 0;
}


/* Mistral v1, v3, v3-tekken and the v0.1/v0.2 template: the same turns
 * with different spaces.  The v0.1/v0.2 template refuses a system
 * message; it is folded into the first turn as v1 does. */
static int
render_mistral(render_ctx *c, int kind)
{
    const char *open, *close, *asst;
    int         first, i, rc;

    switch (kind) {
    case LLM_CHAT_MISTRAL_V1:
        open = " [INST] ";
        close = " [/INST]";
        asst = " ";
        break;
    case LLM_CHAT_MISTRAL_V3:
        open = "[INST] ";
        close = "[/INST]";
        asst = " ";
        break;
    case LLM_CHAT_MISTRAL_V3_TEKKEN:
        open = "[INST]";
        close = "[/INST]";
        asst = "";
        break;
    default:                            /* legacy */
        open = "[INST] ";
        close = " [/INST]";
        asst = "";
        break;
    }
    if ((rc = split_system(c, &first)) != 0) {
        return rc;
    }
    sb_str(c->b, c->bos);
    for (i = first; i < c->n; i++) {
        if (c->role[i] == ROLE_USER) {
            sb_str(c->b, open);
            if (i == first && first) {
                sb_content(c->b, &c->m[0]);
                sb_str(c->b, "\n\n");
            }
            sb_content(c->b, &c->m[i]);
            sb_str(c->b, close);
        } else {
            sb_str(c->b, asst);
            sb_content(c->b, &c->m[i]);
            sb_str(c->b, c->eos);
        }
    }
    return 0;
}


static int
render_mistral_v7(render_ctx *c, int tekken)
{
    const char *sp = tekken ? "" : " ";
    int         i;

    sb_str(c->b, c->bos);
    for (i = 0; i < c->n; i++) {
        switch (c->role[i]) {
        case ROLE_SYSTEM:
            sb_str(c->b, "[SYSTEM_PROMPT]");
            sb_str(c->b, sp);
            sb_content(c->b, &c->m[i]);
            sb_str(c->b, "[/SYSTEM_PROMPT]");
            break;
        case ROLE_USER:
            sb_str(c->b, "[INST]");
            sb_str(c->b, sp);
            sb_content(c->b, &c->m[i]);
            sb_str(c->b, "[/INST]");
            break;
        default:
            sb_str(c->b, sp);
            sb_content(c->b, &c->m[i]);
            sb_str(c->b, c->eos);
            break;
        }
    }
    return 0;
}


/* Gemma 3's template: a system message becomes a prefix of the first
 * user turn (Gemma 1/2 templates refuse it). */
static int
render_gemma(render_ctx *c)
{
    int first, i, rc;

    if ((rc = split_system(c, &first)) != 0) {
        return rc;
    }
    sb_str(c->b, c->bos);
    for (i = first; i < c->n; i++) {
        sb_str(c->b, "<start_of_turn>");
        sb_str(c->b, c->role[i] == ROLE_USER ? "user" : "model");
        sb_str(c->b, "\n");
        if (i == first && first) {
            sb_content(c->b, &c->m[0]);
            sb_str(c->b, "\n\n");
        }
        sb_trimmed(c->b, &c->m[i]);
        sb_str(c->b, "<end_of_turn>\n");
    }
    if (c->gen) {
        sb_str(c->b, "<start_of_turn>model\n");
    }
    return 0;
}


static int
render_phi3(render_ctx *c)
{
    int i;

    for (i = 0; i < c->n; i++) {
        sb_str(c->b, "<|");
        sb_str(c->b, role_names[c->role[i]]);
        sb_str(c->b, "|>\n");
        sb_content(c->b, &c->m[i]);
        sb_str(c->b, "<|end|>\n");
    }
    sb_str(c->b, c->gen ? "<|assistant|>\n" : c->eos);
    return 0;
}


static int
render_zephyr(render_ctx *c)
{
    int i;

    for (i = 0; i < c->n; i++) {
        sb_str(c->b, "<|");
        sb_str(c->b, role_names[c->role[i]]);
        sb_str(c->b, "|>\n");
        sb_content(c->b, &c->m[i]);
        sb_str(c->b, c->eos);
        sb_str(c->b, "\n");
        if (i == c->n - 1 && c->gen) {
            sb_str(c->b, "<|assistant|>\n");
        }
    }
    return 0;
}


/* ---------------------------------------------------------------------
 * Entry points
 * --------------------------------------------------------------------- */

static int
role_of(const llm_chat_msg *m)
{
    static const struct { const char *s; int role; } map[] = {
        { "system", ROLE_SYSTEM }, { "developer", ROLE_SYSTEM },
        { "user", ROLE_USER }, { "assistant", ROLE_ASSISTANT },
    };
    size_t i;

    for (i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
        if (m->role != NULL && m->role_len == strlen(map[i].s)
            && memcmp(m->role, map[i].s, m->role_len) == 0)
        {
            return map[i].role;
        }
    }
    return -1;
}


int
llm_chat_render_ex(int kind, const char *tmpl, const llm_chat_msg *msgs,
                   int n, int add_generation_prompt, const char *bos_text,
                   const char *eos_text, char **out, size_t *out_len,
                   llm_err *err)
{
    render_ctx c;
    sbuf       b = { 0 };
    int        stack_roles[64], *roles = stack_roles;
    int        i, rc;

    if (out == NULL || out_len == NULL || n < 0 || (msgs == NULL && n > 0))
    {
        return llm_err_set(err, LLM_EINVAL, "chat template: bad arguments");
    }
    *out = NULL;
    *out_len = 0;
    if (kind < 0 || kind >= LLM_CHAT_N) {
        return llm_err_set(err, LLM_EINVAL, "chat template: unknown "
                           "template kind %d", kind);
    }
    if (n > 64) {
        roles = llm_malloc(sizeof(int) * (size_t) n);
        if (roles == NULL) {
            return llm_err_set(err, LLM_ENOMEM, "chat template: out of "
                               "memory");
        }
    }
    for (i = 0; i < n; i++) {
        roles[i] = role_of(&msgs[i]);
        if (roles[i] < 0) {
            rc = llm_err_set(err, LLM_EINVAL, "message %d has role \"%.*s\": "
                             "expected system, developer, user or assistant",
                             i, (int) (msgs[i].role_len > 32
                                       ? 32 : msgs[i].role_len),
                             msgs[i].role ? msgs[i].role : "");
            goto done;
        }
        if (msgs[i].content == NULL && msgs[i].content_len > 0) {
            rc = llm_err_set(err, LLM_EINVAL, "message %d has no content", i);
            goto done;
        }
    }
    if (eos_text == NULL) {
        eos_text = kind == LLM_CHAT_PHI3 ? "<|endoftext|>" : "</s>";
    }

    c.m = msgs;
    c.role = roles;
    c.n = n;
    c.gen = add_generation_prompt;
    c.bos = bos_text ? bos_text : "";
    c.eos = eos_text;
    c.tmpl = tmpl;
    c.b = &b;
    c.err = err;

    switch (kind) {
    case LLM_CHAT_CHATML:
        rc = render_chatml(&c);
        break;
    case LLM_CHAT_LLAMA3:
        rc = render_llama3(&c);
        break;
    case LLM_CHAT_LLAMA31:
        rc = render_llama31(&c);
        break;
    case LLM_CHAT_LLAMA2:
        rc = render_llama2(&c);
        break;
    case LLM_CHAT_MISTRAL_V7:
    case LLM_CHAT_MISTRAL_V7_TEKKEN:
        rc = render_mistral_v7(&c, kind == LLM_CHAT_MISTRAL_V7_TEKKEN);
        break;
    case LLM_CHAT_GEMMA:
        rc = render_gemma(&c);
        break;
    case LLM_CHAT_PHI3:
        rc = render_phi3(&c);
        break;
    case LLM_CHAT_ZEPHYR:
        rc = render_zephyr(&c);
        break;
    default:
        rc = render_mistral(&c, kind);
        break;
    }
    if (rc == 0 && b.oom) {
        rc = llm_err_set(err, LLM_ENOMEM, "chat template: out of memory");
    }
    if (rc == 0 && b.p == NULL) {
        b.p = llm_malloc(1);
        if (b.p == NULL) {
            rc = llm_err_set(err, LLM_ENOMEM, "chat template: out of "
                             "memory");
        } else {
            b.p[0] = '\0';
        }
    }
    if (rc == 0) {
        *out = b.p;
        *out_len = b.n;
        b.p = NULL;
    }

done:
    llm_free(b.p);
    if (roles != stack_roles) {
        llm_free(roles);
    }
    return rc;
}


int
llm_chat_render(int kind, const char *tmpl, const llm_chat_msg *msgs, int n,
                int add_generation_prompt, const char *bos_text, char **out,
                size_t *out_len, llm_err *err)
{
    return llm_chat_render_ex(kind, tmpl, msgs, n, add_generation_prompt,
                              bos_text, NULL, out, out_len, err);
}


size_t
llm_chat_strip_bos(char *text, size_t len, const char *bos_text, int add_bos)
{
    size_t n = bos_text != NULL ? strlen(bos_text) : 0;

    if (!add_bos || n == 0 || len < n || memcmp(text, bos_text, n) != 0) {
        return len;
    }
    memmove(text, text + n, len - n + 1);
    return len - n;
}
