/*
 * Tokenizer tests: llama.cpp's ids for a varied corpus on the default
 * model (t/fixtures/tokenizer/smollm2.txt, written by
 * tools/gen_tokenizer_fixtures.py), the same through a tokenizer.json
 * built from that vocabulary, pieces, round trips, the incremental
 * detokenizer, and the errors malformed GGUF files give.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test.h"
#include "../../engine/tokenizer.h"
#include "../../engine/unicode.h"


/* ---------------------------------------------------------------------
 * Fixture file
 * --------------------------------------------------------------------- */

typedef struct {
    char     pre[32];
    int      add_special;
    int      parse_special;
    char    *input;
    size_t   input_len;
    int32_t *ids;
    int      n_ids;
} enc_case;

typedef struct {
    int32_t  id;
    int      special;
    char    *bytes;
    size_t   len;
} piece_case;

typedef struct {
    enc_case   *enc;
    int         n_enc;
    piece_case *piece;
    int         n_piece;
} fixtures;


static int
hexval(int c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}


/* Decodes a hex word ("-" is empty) into a new buffer. */
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


static void
fixtures_free(fixtures *f)
{
    int i;

    for (i = 0; i < f->n_enc; i++) {
        free(f->enc[i].input);
        free(f->enc[i].ids);
    }
    for (i = 0; i < f->n_piece; i++) {
        free(f->piece[i].bytes);
    }
    free(f->enc);
    free(f->piece);
}


static int
fixtures_load(fixtures *f, const char *path)
{
    FILE   *fp = fopen(path, "r");
    char   *line = NULL, *tok, *save, *colon;
    size_t  cap = 0;
    int     ecap = 0, pcap = 0;

    memset(f, 0, sizeof(*f));
    if (fp == NULL) {
        return -1;
    }
    while (getline(&line, &cap, fp) > 0) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "enc ", 4) == 0) {
            enc_case *e;

            if (f->n_enc == ecap) {
                ecap = ecap ? ecap * 2 : 256;
                f->enc = realloc(f->enc, ecap * sizeof(*f->enc));
            }
            e = &f->enc[f->n_enc++];
            memset(e, 0, sizeof(*e));
            colon = strstr(line, " : ");
            if (colon == NULL) {
                colon = line + strlen(line);
                colon[1] = '\0';
            } else {
                *colon = '\0';
            }
            tok = strtok_r(line + 4, " ", &save);
            snprintf(e->pre, sizeof(e->pre), "%s", tok);
            e->add_special = atoi(strtok_r(NULL, " ", &save));
            e->parse_special = atoi(strtok_r(NULL, " ", &save));
            e->input = unhex(strtok_r(NULL, " ", &save), &e->input_len);
            e->ids = malloc(sizeof(int32_t) * (strlen(colon + 1) / 2 + 1));
            for (tok = strtok_r(colon + 2, " ", &save); tok != NULL;
                 tok = strtok_r(NULL, " ", &save))
            {
                e->ids[e->n_ids++] = (int32_t) atol(tok);
            }
        } else if (strncmp(line, "piece ", 6) == 0) {
            piece_case *p;

            if (f->n_piece == pcap) {
                pcap = pcap ? pcap * 2 : 256;
                f->piece = realloc(f->piece, pcap * sizeof(*f->piece));
            }
            p = &f->piece[f->n_piece++];
            p->id = (int32_t) atol(strtok_r(line + 6, " ", &save));
            p->special = atoi(strtok_r(NULL, " ", &save));
            p->bytes = unhex(strtok_r(NULL, " ", &save), &p->len);
        }
    }
    free(line);
    fclose(fp);
    return 0;
}


static const char *
fixture_path(void)
{
    static char path[512];

    snprintf(path, sizeof(path), "%s/tokenizer/smollm2.txt",
             llm_test_fixture_dir());
    return path;
}


static void
print_hex(const char *what, const char *s, size_t n)
{
    size_t i;

    printf("       %s: ", what);
    for (i = 0; i < n && i < 48; i++) {
        printf("%02x", (unsigned char) s[i]);
    }
    printf("%s\n", n > 48 ? "..." : "");
}


/* Encodes every case whose pre-tokenizer is pre (NULL: all, switching
 * t's pre-tokenizer as the cases ask) and counts agreement. */
static int
check_cases(llm_tokenizer *t, const fixtures *f, const char *pre,
            int *n_checked)
{
    int32_t buf[16384];
    int     i, n, bad = 0, shown = 0;

    *n_checked = 0;
    for (i = 0; i < f->n_enc; i++) {
        const enc_case *e = &f->enc[i];

        if (pre != NULL && strcmp(e->pre, pre) != 0) {
            continue;
        }
        if (pre == NULL && strcmp(llm_tokenizer_pre_name(t), e->pre) != 0) {
            llm_tokenizer_set_pre(t, e->pre);
        }
        (*n_checked)++;
        n = llm_tokenize(t, e->input, e->input_len, e->add_special,
                         e->parse_special, buf, 16384);
        if (n == e->n_ids
            && memcmp(buf, e->ids, sizeof(int32_t) * (size_t) n) == 0)
        {
            continue;
        }
        bad++;
        if (shown++ < 5) {
            int k;

            printf("       mismatch (%s add=%d parse=%d):\n", e->pre,
                   e->add_special, e->parse_special);
            print_hex("input", e->input, e->input_len);
            printf("       want:");
            for (k = 0; k < e->n_ids && k < 24; k++) {
                printf(" %d", e->ids[k]);
            }
            printf("\n       got: ");
            for (k = 0; k < n && k < 24; k++) {
                printf(" %d", buf[k]);
            }
            printf(" (n=%d want %d)\n", n, e->n_ids);
        }
    }
    return bad;
}


/* Decodes e's ids (without the BOS the encoding added) token by token
 * and through the incremental detokenizer: both must give prefix then
 * the input. */
static int
round_trip(const llm_tokenizer *t, const enc_case *e, const char *prefix)
{
    static char out[65536], out2[65536];
    llm_detok   d;
    size_t      o = 0, o2 = 0, np = strlen(prefix);
    int         r, j;

    llm_detok_init(&d, 1);
    for (j = 0; j < e->n_ids; j++) {
        int32_t id = e->ids[j];

        if (j == 0 && e->add_special && llm_tokenizer_add_bos(t)) {
            continue;
        }
        r = llm_token_to_piece(t, id, 1, out + o, (int) (sizeof(out) - o));
        o += r > 0 ? (size_t) r : 0;
        r = llm_detok_push(&d, t, id, out2 + o2, (int) (sizeof(out2) - o2));
        o2 += r > 0 ? (size_t) r : 0;
    }
    r = llm_detok_flush(&d, out2 + o2, (int) (sizeof(out2) - o2));
    o2 += r > 0 ? (size_t) r : 0;
    return o == np + e->input_len && memcmp(out, prefix, np) == 0
           && memcmp(out + np, e->input, e->input_len) == 0
           && o2 == o && memcmp(out2, out, o) == 0;
}


/* Compares llm_token_to_piece with every piece case; returns the
 * mismatches. */
static int
check_pieces(const llm_tokenizer *t, const fixtures *f)
{
    int i, bad = 0;

    for (i = 0; i < f->n_piece; i++) {
        char buf[512];
        int  m = llm_token_to_piece(t, f->piece[i].id, f->piece[i].special,
                                    buf, sizeof(buf));

        if (m != (int) f->piece[i].len
            || memcmp(buf, f->piece[i].bytes, f->piece[i].len) != 0)
        {
            if (bad++ < 5) {
                printf("       piece %d special=%d: got %d bytes, want "
                       "%zu\n", f->piece[i].id, f->piece[i].special, m,
                       f->piece[i].len);
            }
        }
    }
    return bad;
}


static llm_tokenizer *
load_default(void)
{
    const char *model = llm_test_default_model();
    llm_err     err;
    llm_tokenizer *t;

    if (model == NULL) {
        return NULL;
    }
    t = llm_tokenizer_load(model, &err);
    if (t == NULL) {
        printf("       load %s: %s\n", model, err.msg);
    }
    return t;
}


/* ---------------------------------------------------------------------
 * llama.cpp fixtures on the default model
 * --------------------------------------------------------------------- */

TEST_SUITE(tokenizer_llamacpp)
{
    llm_tokenizer *t;
    fixtures       f;
    int            bad, n, i, k;
    static const char *const pres[] = { "smollm", "gpt-2", "llama-bpe",
                                        "qwen2", "default", "deepseek-coder",
                                        NULL };

    test("tokenizer fixtures are present");
    if (fixtures_load(&f, fixture_path()) != 0) {
        test_skip("t/fixtures/tokenizer/smollm2.txt missing");
        return;
    }
    test_cond(f.n_enc >= 120 && f.n_piece > 0);

    test("loads the default model's tokenizer");
    if (llm_test_default_model() == NULL) {
        test_skip("default model not installed");
        fixtures_free(&f);
        return;
    }
    t = load_default();
    test_cond(t != NULL);
    if (t == NULL) {
        fixtures_free(&f);
        return;
    }
    test_cond(llm_tokenizer_n_vocab(t) == 49152);
    test_cond(strcmp(llm_tokenizer_pre_name(t), "smollm") == 0);
    test_cond(!llm_tokenizer_pre_fallback(t));
    test_cond(llm_tokenizer_bos(t) == 1 && llm_tokenizer_eos(t) == 2);
    test_cond(!llm_tokenizer_add_bos(t));
    test_cond(llm_tokenizer_find(t, "<|im_end|>") == 2);
    test_cond(llm_tokenizer_find(t, "no such token") == -1);
    /* llama.cpp's EOG set for this vocabulary is {0, 2, 4} */
    test_cond(llm_tokenizer_is_eog(t, 0) && llm_tokenizer_is_eog(t, 2)
              && llm_tokenizer_is_eog(t, 4));
    n = 0;
    for (i = 0; i < llm_tokenizer_n_vocab(t); i++) {
        n += llm_tokenizer_is_eog(t, i);
    }
    test_cond(n == 3);
    test_cond(llm_tokenizer_chat_template(t) != NULL
              && strstr(llm_tokenizer_chat_template(t), "<|im_start|>"));

    for (k = 0; pres[k] != NULL; k++) {
        static char name[96];
        int         checked;

        snprintf(name, sizeof(name), "llama.cpp ids, pre-tokenizer %s",
                 pres[k]);
        test(name);
        llm_tokenizer_set_pre(t, pres[k]);
        bad = check_cases(t, &f, pres[k], &checked);
        printf("       %s: %d/%d cases agree with llama.cpp\n", pres[k],
               checked - bad, checked);
        test_cond(checked > 0 && bad == 0);
    }
    llm_tokenizer_set_pre(t, "smollm");

    test("token pieces match llama_token_to_piece");
    test_cond(check_pieces(t, &f) == 0);

    test("decode(encode(x)) == x for every valid UTF-8 case");
    bad = 0;
    for (i = 0; i < f.n_enc; i++) {
        const enc_case *e = &f.enc[i];
        size_t          p;
        uint32_t        cp;
        int             r, ok = 1;

        if (strcmp(e->pre, "smollm") != 0) {
            continue;
        }
        for (p = 0; p < e->input_len; p += (size_t) r) {
            r = llm_utf8_decode_strict(e->input + p, e->input_len - p, &cp);
            if (r <= 0) {
                ok = 0;
                break;
            }
        }
        /* a byte without a byte token is dropped by llama.cpp (SmolLM2
         * has none for 0x1D): no round trip possible */
        for (p = 0; ok && p < e->input_len; p++) {
            int32_t one[4];

            if ((unsigned char) e->input[p] < 0x80
                && llm_tokenize(t, e->input + p, 1, 0, 0, one, 4) == 0)
            {
                ok = 0;
            }
        }
        if (!ok) {
            continue;
        }
        if (!round_trip(t, e, "") && bad++ < 3) {
            print_hex("round trip failed for", e->input, e->input_len);
        }
    }
    test_cond(bad == 0);

    test("all cases again with one tokenizer switching pre-tokenizers");
    {
        int checked;

        bad = check_cases(t, &f, NULL, &checked);
        test_cond(bad == 0 && checked == f.n_enc);
        printf("       total: %d/%d encodings agree with llama.cpp\n",
               checked - bad, checked);
    }
    llm_tokenizer_set_pre(t, "smollm");

    test("unknown pre-tokenizer falls back to GPT-2 with a flag");
    {
        char desc[256];

        llm_tokenizer_describe(t, desc, sizeof(desc));
        test_cond(strcmp(desc, "byte-level BPE, pre-tokenizer smollm, "
                         "49152 tokens") == 0);
        test_cond(llm_tokenizer_set_pre(t, "no-such-pre") == LLM_ENOTFOUND);
        llm_tokenizer_describe(t, desc, sizeof(desc));
        test_cond(strstr(desc, "\"no-such-pre\" is not one we implement")
                  != NULL);
    }
    test_cond(llm_tokenizer_pre_fallback(t));
    test_cond(llm_tokenizer_set_pre(t, "smollm") == 0
              && !llm_tokenizer_pre_fallback(t));

    llm_tokenizer_free(t);
    fixtures_free(&f);
}


/* ---------------------------------------------------------------------
 * SentencePiece: llama.cpp fixtures on tools/make_spm_vocab.py's
 * vocabulary (derived from the default model's)
 * --------------------------------------------------------------------- */

TEST_SUITE(tokenizer_spm_llamacpp)
{
    llm_tokenizer *t;
    fixtures       f;
    llm_err        err;
    char           path[512], cmd[1024];
    int            bad, checked, i, n;

    test("SentencePiece fixtures are present");
    snprintf(path, sizeof(path), "%s/tokenizer/spm.txt",
             llm_test_fixture_dir());
    if (fixtures_load(&f, path) != 0) {
        test_skip("t/fixtures/tokenizer/spm.txt missing");
        return;
    }
    test_cond(f.n_enc >= 400 && f.n_piece > 0);

    test("loads a SentencePiece vocabulary (tokenizer.ggml.model llama)");
    if (llm_test_default_model() == NULL) {
        test_skip("default model not installed (the vocabulary is made "
                  "from it)");
        fixtures_free(&f);
        return;
    }
    snprintf(path, sizeof(path), "%s/spm.gguf", llm_test_tmp_dir());
    snprintf(cmd, sizeof(cmd), "python3 tools/make_spm_vocab.py %s "
             ">/dev/null 2>&1", path);
    if (system(cmd) != 0) {
        test_skip("tools/make_spm_vocab.py failed (python3 with gguf?)");
        fixtures_free(&f);
        return;
    }
    t = llm_tokenizer_load(path, &err);
    test_cond(t != NULL);
    if (t == NULL) {
        printf("       %s\n", err.msg);
        fixtures_free(&f);
        return;
    }
    /* the fixtures' last piece is the last token */
    test_cond(llm_tokenizer_n_vocab(t) == f.piece[f.n_piece - 1].id + 1);
    test_cond(strcmp(llm_tokenizer_pre_name(t), "spm") == 0
              && !llm_tokenizer_pre_fallback(t));
    test_cond(llm_tokenizer_bos(t) == 1 && llm_tokenizer_eos(t) == 2
              && llm_tokenizer_add_bos(t));
    test_cond(llm_tokenizer_find(t, "[INST]") == 259
              && llm_tokenizer_is_control(t, 259));
    n = 0;
    for (i = 0; i < llm_tokenizer_n_vocab(t); i++) {
        n += llm_tokenizer_is_eog(t, i);
    }
    test_cond(n == 1 && llm_tokenizer_is_eog(t, 2));
    test_cond(llm_tokenizer_chat_template(t) != NULL
              && strstr(llm_tokenizer_chat_template(t), "[INST]"));

    test("llama.cpp ids, SentencePiece");
    bad = check_cases(t, &f, "spm", &checked);
    printf("       spm: %d/%d cases agree with llama.cpp\n", checked - bad,
           checked);
    test_cond(checked == f.n_enc && bad == 0);

    test("token pieces match llama_token_to_piece, SentencePiece");
    test_cond(check_pieces(t, &f) == 0);

    test("decode(encode(x)) is a space then x, SentencePiece");
    bad = 0;
    checked = 0;
    for (i = 0; i < f.n_enc; i++) {
        const enc_case *e = &f.enc[i];
        size_t          p;
        uint32_t        cp;
        int             r = 1, ok = e->input_len > 0 && !e->parse_special;

        /* U+2581 itself decodes to a space; "<|" starts the
         * user-defined tokens, which restart the space prefix */
        ok = ok && memmem(e->input, e->input_len, "\xe2\x96\x81", 3) == NULL
             && memmem(e->input, e->input_len, "<|", 2) == NULL;
        for (p = 0; ok && p < e->input_len; p += (size_t) r) {
            r = llm_utf8_decode_strict(e->input + p, e->input_len - p, &cp);
            ok = r > 0;
        }
        if (!ok) {
            continue;
        }
        checked++;
        if (!round_trip(t, e, " ") && bad++ < 3) {
            print_hex("round trip failed for", e->input, e->input_len);
        }
    }
    printf("       %d round trips\n", checked);
    test_cond(checked >= 100 && bad == 0);

    llm_tokenizer_free(t);
    fixtures_free(&f);
}


/* tokenizer.json files of that vocabulary in the layouts Llama 2 /
 * Mistral folders use, against Hugging Face tokenizers' ids. */
TEST_SUITE(tokenizer_spm_hf)
{
    static const char *const styles[] = {
        "prepend", "metaspace-first", "metaspace-always-split", NULL
    };
    llm_tokenizer *t;
    fixtures       f;
    llm_err        err;
    char           path[512], dir[512], cmd[1280], name[96], pre[64];
    int            bad, checked, k, total = 0;

    test("tokenizer.json SentencePiece fixtures are present");
    snprintf(path, sizeof(path), "%s/tokenizer/spm_hf.txt",
             llm_test_fixture_dir());
    if (fixtures_load(&f, path) != 0) {
        test_skip("t/fixtures/tokenizer/spm_hf.txt missing");
        return;
    }
    test_cond(f.n_enc >= 300);
    if (llm_test_default_model() == NULL) {
        test_skip("default model not installed (the vocabulary is made "
                  "from it)");
        fixtures_free(&f);
        return;
    }
    for (k = 0; styles[k] != NULL; k++) {
        snprintf(name, sizeof(name), "Hugging Face tokenizers' ids, %s",
                 styles[k]);
        test(name);
        snprintf(dir, sizeof(dir), "%s/spm-hf-%s", llm_test_tmp_dir(),
                 styles[k]);
        snprintf(cmd, sizeof(cmd), "python3 tools/make_spm_vocab.py "
                 "%s/spm.gguf --hf-json %s --hf-style %s >/dev/null 2>&1",
                 llm_test_tmp_dir(), dir, styles[k]);
        if (system(cmd) != 0) {
            test_skip("tools/make_spm_vocab.py failed (python3 with gguf?)");
            continue;
        }
        t = llm_tokenizer_load(dir, &err);
        test_cond(t != NULL);
        if (t == NULL) {
            printf("       %s\n", err.msg);
            continue;
        }
        test_cond(strcmp(llm_tokenizer_pre_name(t), "spm") == 0
                  && llm_tokenizer_add_bos(t) && llm_tokenizer_bos(t) == 1);
        snprintf(pre, sizeof(pre), "hf-%s", styles[k]);
        bad = check_cases(t, &f, pre, &checked);
        printf("       %s: %d/%d cases agree with tokenizers\n", styles[k],
               checked - bad, checked);
        test_cond(checked >= 100 && bad == 0);
        total += checked;
        llm_tokenizer_free(t);
    }
    test("every fixture case was checked");
    test_cond(total == f.n_enc);
    fixtures_free(&f);
}


/* ---------------------------------------------------------------------
 * llama.cpp's own vocabulary test files (LLM_TEST_VOCAB_DIR)
 *
 * llama.cpp ships vocabulary-only GGUF files of real models with inputs
 * (NAME.gguf.inp, cases separated by "\n__ggml_vocab_test__\n") and the
 * ids Hugging Face's tokenizer gives them (NAME.gguf.out, a line each;
 * no BOS, special texts not parsed): its models/ folder, e.g. in the
 * llama-cpp-python source package.  Not in CI (the files are not ours);
 * a vocabulary whose tokenizer or pre-tokenizer we do not implement is
 * listed, not failed.
 * --------------------------------------------------------------------- */

static char *
read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *b = NULL;
    long  n;

    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0
        && fseek(f, 0, SEEK_SET) == 0 && (b = malloc((size_t) n + 1)) != NULL)
    {
        *len = fread(b, 1, (size_t) n, f);
        b[*len] = '\0';
    }
    fclose(f);
    return b;
}


/* Checks one NAME.gguf against NAME.gguf.inp/.out; returns the cases
 * that differ, or -1 if the files are not there, -2 if unsupported. */
static int
check_vocab_file(const char *gguf, int *n_cases)
{
    static const char sep[] = "\n__ggml_vocab_test__\n";
    char           path[1024], *inp, *out, *p, *q, *line, *nl;
    size_t         ilen, olen;
    llm_tokenizer *t;
    llm_err        err;
    int32_t        got[4096], want[4096];
    int            n, nw, bad = 0;

    snprintf(path, sizeof(path), "%s.inp", gguf);
    inp = read_all(path, &ilen);
    snprintf(path, sizeof(path), "%s.out", gguf);
    out = read_all(path, &olen);
    if (inp == NULL || out == NULL) {
        free(inp);
        free(out);
        return -1;
    }
    t = llm_tokenizer_load(gguf, &err);
    if (t == NULL || llm_tokenizer_pre_fallback(t)) {
        printf("       %s: not supported (%s)\n", gguf,
               t ? "pre-tokenizer" : err.msg);
        llm_tokenizer_free(t);
        free(inp);
        free(out);
        return -2;
    }
    *n_cases = 0;
    line = out;
    for (p = inp; line < out + olen; p = q + sizeof(sep) - 1) {
        nl = strchr(line, '\n');
        if (nl != NULL) {
            *nl = '\0';
        }
        q = strstr(p, sep);
        if (q == NULL) {
            q = inp + ilen;
        }
        n = llm_tokenize(t, p, (size_t) (q - p), 0, 0, got, 4096);
        for (nw = 0; nw < 4096 && *line; ) {
            char *end;
            long  v = strtol(line, &end, 10);

            if (end == line) {
                break;
            }
            want[nw++] = (int32_t) v;
            line = end;
        }
        (*n_cases)++;
        if (n != nw || memcmp(got, want, sizeof(int32_t) * (size_t) nw)) {
            if (bad++ < 3) {
                print_hex("differs", p, (size_t) (q - p));
            }
        }
        line = nl != NULL ? nl + 1 : out + olen;
        if (q == inp + ilen) {
            break;
        }
    }
    llm_tokenizer_free(t);
    free(inp);
    free(out);
    return bad;
}


TEST_SUITE(tokenizer_vocab_files)
{
    const char *dir = getenv("LLM_TEST_VOCAB_DIR");
    char        cmd[1024], gguf[1024];
    FILE       *ls;
    int         bad, n, files = 0;

    test("llama.cpp's vocabulary test files agree");
    if (dir == NULL || dir[0] == '\0') {
        test_skip("LLM_TEST_VOCAB_DIR not set (llama.cpp's models/)");
        return;
    }
    snprintf(cmd, sizeof(cmd), "ls %s/*.gguf 2>/dev/null", dir);
    ls = popen(cmd, "r");
    while (ls != NULL && fgets(gguf, sizeof(gguf), ls) != NULL) {
        gguf[strcspn(gguf, "\n")] = '\0';
        n = 0;
        bad = check_vocab_file(gguf, &n);
        if (bad >= 0) {
            printf("       %s: %d/%d cases agree\n", strrchr(gguf, '/') + 1,
                   n - bad, n);
            test_cond(bad == 0 && n > 0);
            files++;
        }
    }
    if (ls != NULL) {
        pclose(ls);
    }
    test_cond(files > 0);
}


/* ---------------------------------------------------------------------
 * tokenizer.json built from the same vocabulary
 * --------------------------------------------------------------------- */

static int
write_hf(const char *dir, const char *pre)
{
    char cmd[1024];

    snprintf(cmd, sizeof(cmd), "mkdir -p %s && python3 "
             "tools/gen_tokenizer_fixtures.py --model '%s' --hf-json %s "
             "--hf-pre %s >/dev/null 2>&1", dir, llm_test_default_model(),
             dir, pre);
    return system(cmd);
}


TEST_SUITE(tokenizer_hf_json)
{
    static const struct { const char *hf; const char *pre; } v[] = {
        { "smollm", "smollm" },         /* Digits + ByteLevel, "a b" */
        { "llama-bpe", "llama-bpe" },   /* Split + ByteLevel, [a, b] */
    };
    llm_tokenizer *t, *g;
    fixtures       f;
    llm_err        err;
    char           dir[512], file[600];
    int            k, bad, checked;

    test("tokenizer.json from the GGUF vocabulary");
    if (llm_test_default_model() == NULL) {
        test_skip("default model not installed");
        return;
    }
    if (fixtures_load(&f, fixture_path()) != 0) {
        test_skip("t/fixtures/tokenizer/smollm2.txt missing");
        return;
    }
    snprintf(dir, sizeof(dir), "%s/hf-smollm", llm_test_tmp_dir());
    if (write_hf(dir, "smollm") != 0) {
        test_skip("python3 with gguf unavailable");
        fixtures_free(&f);
        return;
    }
    test_cond(1);

    for (k = 0; k < 2; k++) {
        static char name[96];

        snprintf(name, sizeof(name), "tokenizer.json (%s) encodes the "
                 "corpus as llama.cpp", v[k].hf);
        test(name);
        snprintf(dir, sizeof(dir), "%s/hf-%s", llm_test_tmp_dir(), v[k].hf);
        if (k > 0 && write_hf(dir, v[k].hf) != 0) {
            test_cond(0);
            continue;
        }
        /* a folder for one, the file itself for the other */
        snprintf(file, sizeof(file), "%s/tokenizer.json", dir);
        t = llm_tokenizer_load(k == 0 ? dir : file, &err);
        if (t == NULL) {
            printf("       %s\n", err.msg);
            test_cond(t != NULL);
            continue;
        }
        test_cond(strcmp(llm_tokenizer_pre_name(t), v[k].pre) == 0);
        test_cond(!llm_tokenizer_pre_fallback(t));
        bad = check_cases(t, &f, v[k].pre, &checked);
        printf("       %d/%d cases agree\n", checked - bad, checked);
        test_cond(checked > 0 && bad == 0);

        if (k == 0) {
            test("tokenizer.json: special ids, EOG and chat template");
            g = load_default();
            test_cond(g != NULL);
            test_cond(llm_tokenizer_n_vocab(t) == 49152);
            test_cond(llm_tokenizer_bos(t) == 1 && llm_tokenizer_eos(t) == 2);
            test_cond(!llm_tokenizer_add_bos(t));
            test_cond(llm_tokenizer_is_eog(t, 2) && llm_tokenizer_is_eog(t, 0)
                      && llm_tokenizer_is_eog(t, 4)
                      && !llm_tokenizer_is_eog(t, 1));
            test_cond(llm_tokenizer_chat_template(t) != NULL && g != NULL
                      && strcmp(llm_tokenizer_chat_template(t),
                                llm_tokenizer_chat_template(g)) == 0);
            if (g != NULL) {
                int  i, same = 1;
                char a[256], b[256];

                for (i = 0; i < llm_tokenizer_n_vocab(g); i += 7) {
                    int na = llm_token_to_piece(t, i, 1, a, sizeof(a));
                    int nb = llm_token_to_piece(g, i, 1, b, sizeof(b));

                    if (na != nb || memcmp(a, b, na > 0 ? na : 0) != 0) {
                        same = 0;
                    }
                }
                test_cond(same);
                llm_tokenizer_free(g);
            }
        }
        llm_tokenizer_free(t);
    }
    fixtures_free(&f);
}


/* ---------------------------------------------------------------------
 * Incremental detokenizer
 * --------------------------------------------------------------------- */

static int
valid_utf8(const char *s, size_t n)
{
    size_t   i = 0;
    uint32_t cp;
    int      r;

    while (i < n) {
        r = llm_utf8_decode_strict(s + i, n - i, &cp);
        if (r <= 0) {
            return 0;
        }
        i += (size_t) r;
    }
    return 1;
}


TEST_SUITE(tokenizer_detok)
{
    llm_tokenizer *t;
    llm_detok      d;
    int32_t        ids[256];
    char           out[4096], chunk[512];
    const char    *text = "\xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\xa6\x99 "
                          "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9 ok";
    size_t         o = 0;
    int            n, i, r, each_valid = 1, split = 0;
    int32_t        b_e4, b_bd, b_a;

    test("detokenizer emits only whole UTF-8 sequences");
    t = load_default();
    if (t == NULL) {
        test_skip("default model not installed");
        return;
    }
    n = llm_tokenize(t, text, strlen(text), 0, 0, ids, 256);
    test_cond(n > 0);
    llm_detok_init(&d, 0);
    for (i = 0; i < n; i++) {
        char piece[64];
        int  pl = llm_token_to_piece(t, ids[i], 0, piece, sizeof(piece));

        if (pl > 0 && !valid_utf8(piece, (size_t) pl)) {
            split = 1;              /* the corpus does split characters */
        }
        r = llm_detok_push(&d, t, ids[i], chunk, sizeof(chunk));
        test_cond(r >= 0);
        if (r > 0) {
            each_valid &= valid_utf8(chunk, (size_t) r);
            memcpy(out + o, chunk, (size_t) r);
            o += (size_t) r;
        }
    }
    r = llm_detok_flush(&d, out + o, (int) (sizeof(out) - o));
    test_cond(r == 0);
    test_cond(split && each_valid);
    test_cond(o == strlen(text) && memcmp(out, text, o) == 0);

    test("detokenizer replaces invalid and truncated sequences");
    /* byte tokens: the mapped characters of 0xE4, 0xBD and 'A' */
    b_e4 = llm_tokenizer_find(t, "\xc3\xa4");       /* U+00E4 */
    b_bd = llm_tokenizer_find(t, "\xc2\xbd");       /* U+00BD */
    b_a = llm_tokenizer_find(t, "A");
    test_cond(b_e4 >= 0 && b_bd >= 0 && b_a >= 0);
    llm_detok_init(&d, 0);
    o = 0;
    r = llm_detok_push(&d, t, b_e4, out, sizeof(out));
    test_cond(r == 0 && d.n_pending == 1);
    r = llm_detok_push(&d, t, b_bd, out, sizeof(out));
    test_cond(r == 0 && d.n_pending == 2);
    r = llm_detok_push(&d, t, b_a, out, sizeof(out));
    test_cond(r == 4 && memcmp(out, "\xef\xbf\xbd" "A", 4) == 0);
    test_cond(d.n_pending == 0);
    r = llm_detok_push(&d, t, b_e4, out, sizeof(out));
    test_cond(r == 0);
    r = llm_detok_flush(&d, out, sizeof(out));
    test_cond(r == 3 && memcmp(out, "\xef\xbf\xbd", 3) == 0);
    test_cond(llm_detok_flush(&d, out, sizeof(out)) == 0);
    /* a lone continuation byte (0xBD) is replaced at once */
    r = llm_detok_push(&d, t, b_bd, out, sizeof(out));
    test_cond(r == 3 && d.n_pending == 0);

    test("detokenizer: control tokens only when asked");
    llm_detok_init(&d, 0);
    test_cond(llm_detok_push(&d, t, 2, out, sizeof(out)) == 0);
    llm_detok_init(&d, 1);
    r = llm_detok_push(&d, t, 2, out, sizeof(out));
    test_cond(r == 10 && memcmp(out, "<|im_end|>", 10) == 0);
    test_cond(llm_token_to_piece(t, 2, 0, out, sizeof(out)) == 0);
    test_cond(llm_token_to_piece(t, 2, 1, out, 4) == 10);  /* too small */

    test("detokenizer and pieces reject bad ids");
    test_cond(llm_detok_push(&d, t, -1, out, sizeof(out)) == LLM_EINVAL);
    test_cond(llm_detok_push(&d, t, 49152, out, sizeof(out)) == LLM_EINVAL);
    test_cond(llm_token_to_piece(t, 49152, 1, out, sizeof(out))
              == LLM_EINVAL);

    llm_tokenizer_free(t);
}


/* ---------------------------------------------------------------------
 * Encoding details that need no fixture
 * --------------------------------------------------------------------- */

TEST_SUITE(tokenizer_encode)
{
    llm_tokenizer *t;
    int32_t        ids[64], *big;
    char          *text;
    size_t         n, i;
    int            r, r2;

    test("encoding reports the full count when the buffer is small");
    t = load_default();
    if (t == NULL) {
        test_skip("default model not installed");
        return;
    }
    r = llm_tokenize(t, "Hello world, again and again", 28, 0, 0, ids, 64);
    r2 = llm_tokenize(t, "Hello world, again and again", 28, 0, 0, ids, 2);
    test_cond(r > 2 && r2 == r);
    test_cond(llm_tokenize(t, "", 0, 0, 0, NULL, 0) == 0);
    test_cond(llm_tokenize(t, NULL, 3, 0, 0, ids, 64) == LLM_EINVAL);

    test("special tokens are parsed only when asked");
    r = llm_tokenize(t, "<|im_end|>", 10, 0, 1, ids, 64);
    test_cond(r == 1 && ids[0] == 2);
    r = llm_tokenize(t, "<|im_end|>", 10, 0, 0, ids, 64);
    test_cond(r > 1);

    test("100 KB of mixed text encodes and round-trips");
    n = 100 * 1024;
    text = malloc(n);
    big = malloc(sizeof(int32_t) * n);
    {
        static const char *const parts[] = {
            "The quick brown fox jumps over the lazy dog. ",
            "int main(void) { return 0; }\n",
            "\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96\xe7\x95\x8c ",
            "12345 67890 ", "    \n\t", "\xf0\x9f\xa6\x99 ",
        };
        size_t o = 0, k = 0;

        while (o < n) {
            size_t l = strlen(parts[k % 6]);

            if (o + l > n) {
                break;
            }
            memcpy(text + o, parts[k % 6], l);
            o += l;
            k++;
        }
        n = o;
    }
    r = llm_tokenize(t, text, n, 0, 0, big, (int) n);
    test_cond(r > 0 && r < (int) n);
    if (r > 0) {
        char  *back = malloc(n + 64);
        size_t o = 0;
        int    ok = 1;

        for (i = 0; i < (size_t) r && ok; i++) {
            int m = llm_token_to_piece(t, big[i], 0, back + o,
                                       (int) (n + 64 - o));

            ok = m >= 0 && o + (size_t) m <= n;
            o += (size_t) (m > 0 ? m : 0);
        }
        test_cond(ok && o == n && memcmp(back, text, n) == 0);
        free(back);
    }
    free(text);
    free(big);
    llm_tokenizer_free(t);
}


/* ---------------------------------------------------------------------
 * Malformed GGUF files
 * --------------------------------------------------------------------- */

typedef struct {
    char   buf[8192];
    size_t n;
    int    n_kv;
} gguf_w;


static void
w_raw(gguf_w *w, const void *p, size_t n)
{
    memcpy(w->buf + w->n, p, n);
    w->n += n;
}


static void
w_u32(gguf_w *w, uint32_t v)
{
    w_raw(w, &v, 4);
}


static void
w_u64(gguf_w *w, uint64_t v)
{
    w_raw(w, &v, 8);
}


static void
w_str(gguf_w *w, const char *s)
{
    w_u64(w, strlen(s));
    w_raw(w, s, strlen(s));
}


static void
w_kv_str(gguf_w *w, const char *key, const char *val)
{
    w_str(w, key);
    w_u32(w, 8);
    w_str(w, val);
    w->n_kv++;
}


static void
w_kv_u32(gguf_w *w, const char *key, uint32_t val)
{
    w_str(w, key);
    w_u32(w, 4);
    w_u32(w, val);
    w->n_kv++;
}


static void
w_kv_strs(gguf_w *w, const char *key, const char *const *v, int n)
{
    int i;

    w_str(w, key);
    w_u32(w, 9);
    w_u32(w, 8);
    w_u64(w, (uint64_t) n);
    for (i = 0; i < n; i++) {
        w_str(w, v[i]);
    }
    w->n_kv++;
}


/* An array of n 4-byte elements of GGUF type gtype (5 i32, 6 f32). */
static void
w_kv_arr4(gguf_w *w, const char *key, uint32_t gtype, const void *v, int n)
{
    w_str(w, key);
    w_u32(w, 9);
    w_u32(w, gtype);
    w_u64(w, (uint64_t) n);
    w_raw(w, v, 4 * (size_t) n);
    w->n_kv++;
}


static void
w_kv_i32s(gguf_w *w, const char *key, const int32_t *v, int n)
{
    w_kv_arr4(w, key, 5, v, n);
}


static void
w_kv_f32s(gguf_w *w, const char *key, const float *v, int n)
{
    w_kv_arr4(w, key, 6, v, n);
}


static void
w_kv_bool(gguf_w *w, const char *key, int val)
{
    uint8_t b = (uint8_t) (val != 0);

    w_str(w, key);
    w_u32(w, 7);
    w_raw(w, &b, 1);
    w->n_kv++;
}


/* Writes a GGUF with the key/values in body (kv count n_kv). */
static int
w_file(const char *path, const gguf_w *body)
{
    FILE    *f = fopen(path, "wb");
    uint32_t v = 3;
    uint64_t zero = 0, nkv = (uint64_t) body->n_kv;
    char     pad[32] = { 0 };
    size_t   total = 4 + 4 + 8 + 8 + body->n;

    if (f == NULL) {
        return -1;
    }
    fwrite("GGUF", 1, 4, f);
    fwrite(&v, 4, 1, f);
    fwrite(&zero, 8, 1, f);
    fwrite(&nkv, 8, 1, f);
    fwrite(body->buf, 1, body->n, f);
    fwrite(pad, 1, (32 - total % 32) % 32, f);
    fclose(f);
    return 0;
}


enum {
    BAD_NONE, BAD_MODEL, BAD_TYPES_LEN, BAD_MERGE, BAD_MERGE_RESULT,
    BAD_BOS, BAD_NO_MERGES, BAD_MERGE_FORM,
    /* SentencePiece (tiny_spm_gguf) */
    SPM_NONE, SPM_NO_PREFIX, BAD_SCORES_LEN, BAD_SCORES_TYPE, BAD_SCORE_NAN
};


/* A tiny byte-level vocabulary: "a", "b", "c", "ab", "abc", "bc", " ",
 * "Ġ" and "<|x|>" (control), "<u>" (user-defined). */
static void
tiny_gguf(gguf_w *w, int bad)
{
    static const char *const toks[] = {
        "a", "b", "c", "ab", "abc", "bc", "\xc4\xa0", "\xc4\xa0" "a",
        "<|x|>", "<u>", "d"
    };
    static const int32_t types[] = { 1, 1, 1, 1, 1, 1, 1, 1, 3, 4, 1 };
    const char *merges[3] = { "a b", "ab c", "\xc4\xa0 a" };

    memset(w, 0, sizeof(*w));
    w_kv_str(w, "general.architecture", "llama");
    w_kv_str(w, "tokenizer.ggml.model", bad == BAD_MODEL ? "bert" : "gpt2");
    w_kv_str(w, "tokenizer.ggml.pre", "smollm");
    w_kv_strs(w, "tokenizer.ggml.tokens", toks, 11);
    w_kv_i32s(w, "tokenizer.ggml.token_type", types,
              bad == BAD_TYPES_LEN ? 10 : 11);
    if (bad == BAD_MERGE) {
        merges[1] = "ab zz";
    } else if (bad == BAD_MERGE_RESULT) {
        merges[1] = "b a";
    } else if (bad == BAD_MERGE_FORM) {
        merges[1] = "abc";
    }
    if (bad != BAD_NO_MERGES) {
        w_kv_strs(w, "tokenizer.ggml.merges", merges, 3);
    }
    w_kv_u32(w, "tokenizer.ggml.bos_token_id", bad == BAD_BOS ? 11 : 8);
    w_kv_u32(w, "tokenizer.ggml.eos_token_id", 8);
}


/* A SentencePiece vocabulary small enough to work out by hand:
 * "\xe2\x96\x81" is U+2581, the escaped space. */
static void
tiny_spm_gguf(gguf_w *w, int bad)
{
    static const char *const toks[] = {
        "<unk>", "<s>", "</s>", "<0x7A>", "<0xC3>", "<0xA9>",
        "\xe2\x96\x81", "a", "b", "c", "ab", "bc", "abc",
        "\xe2\x96\x81" "a", "<u>", "x", "y", "xy", "yx"
    };
    static const int32_t types[] = { 2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1,
                                     1, 1, 4, 1, 1, 1, 1 };
    float scores[] = { 0, 0, 0, 0, 0, 0, -1, -2, -3, -4, -5, -1, -6, -2,
                       0, -7, -7, -8, -8 };

    memset(w, 0, sizeof(*w));
    if (bad == BAD_SCORE_NAN) {
        scores[7] = 0.0f / 0.0f;
    }
    w_kv_str(w, "general.architecture", "llama");
    w_kv_str(w, "tokenizer.ggml.model", "llama");
    w_kv_strs(w, "tokenizer.ggml.tokens", toks, 19);
    w_kv_i32s(w, "tokenizer.ggml.token_type", types, 19);
    if (bad == BAD_SCORES_TYPE) {
        w_kv_strs(w, "tokenizer.ggml.scores", toks, 19);
    } else {
        w_kv_f32s(w, "tokenizer.ggml.scores", scores,
                  bad == BAD_SCORES_LEN ? 18 : 19);
    }
    if (bad == SPM_NO_PREFIX) {
        w_kv_bool(w, "tokenizer.ggml.add_space_prefix", 0);
    }
}


/* The byte-level or (bad >= SPM_NONE) SentencePiece tiny file. */
static void
tiny_any_gguf(gguf_w *w, int bad)
{
    if (bad >= SPM_NONE) {
        tiny_spm_gguf(w, bad);
    } else {
        tiny_gguf(w, bad);
    }
}


/* Writes the tiny file (tiny_any_gguf) at path and loads it; NULL with
 * the reason printed. */
static llm_tokenizer *
load_tiny(const char *path, int bad)
{
    gguf_w         w;
    llm_err        err;
    llm_tokenizer *t;

    tiny_any_gguf(&w, bad);
    if (w_file(path, &w) != 0) {
        printf("       cannot write %s\n", path);
        return NULL;
    }
    t = llm_tokenizer_load(path, &err);
    if (t == NULL) {
        printf("       %s\n", err.msg);
    }
    return t;
}


/* Encodes text and compares with want[n] (-1 ends want). */
static int
enc_is(const llm_tokenizer *t, const char *text, int add, int parse,
       const int32_t *want)
{
    int32_t got[32];
    int     n, k;

    n = llm_tokenize(t, text, strlen(text), add, parse, got, 32);
    for (k = 0; k < n && want[k] >= 0; k++) {
        if (got[k] != want[k]) {
            break;
        }
    }
    if (k == n && want[k] < 0) {
        return 1;
    }
    printf("       \"%s\":", text);
    for (k = 0; k < n; k++) {
        printf(" %d", got[k]);
    }
    printf("\n");
    return 0;
}


TEST_SUITE(tokenizer_spm_rules)
{
    char           path[512], buf[16];
    llm_tokenizer *t;

    snprintf(path, sizeof(path), "%s/tiny-spm.gguf", llm_test_tmp_dir());
    test("a tiny SentencePiece vocabulary loads with llama.cpp's defaults");
    t = load_tiny(path, SPM_NONE);
    test_cond(t != NULL);
    if (t == NULL) {
        return;
    }
    test_cond(llm_tokenizer_bos(t) == 1 && llm_tokenizer_eos(t) == 2
              && llm_tokenizer_add_bos(t) && llm_tokenizer_is_eog(t, 2));
    {
        char desc[256];

        llm_tokenizer_describe(t, desc, sizeof(desc));
        test_cond(strcmp(desc, "SentencePiece (merges by score), 19 tokens, "
                         "BOS added") == 0);
    }

    test("the highest score merges first");
    /* "\xe2\x96\x81abc": bc (-1) before \xe2\x96\x81a (-2) before ab (-5) */
    test_cond(enc_is(t, "abc", 0, 0, (const int32_t[]) { 13, 11, -1 }));

    test("equal scores merge the leftmost pair first");
    test_cond(enc_is(t, "xyx", 0, 0, (const int32_t[]) { 6, 17, 15, -1 }));
    test_cond(enc_is(t, "yxy", 0, 0, (const int32_t[]) { 6, 18, 16, -1 }));

    test("characters without a token become byte tokens, else unknown");
    test_cond(enc_is(t, "z\xc3\xa9", 0, 0,
                     (const int32_t[]) { 6, 3, 4, 5, -1 }));
    test_cond(enc_is(t, "q", 0, 0, (const int32_t[]) { 6, 0, -1 }));

    test("BOS, and a space prefix after each special token");
    test_cond(enc_is(t, "a", 1, 0, (const int32_t[]) { 1, 13, -1 }));
    test_cond(enc_is(t, "", 1, 0, (const int32_t[]) { 1, -1 }));
    test_cond(enc_is(t, "", 0, 0, (const int32_t[]) { -1 }));
    test_cond(enc_is(t, "a<s>b", 0, 1,
                     (const int32_t[]) { 13, 1, 6, 8, -1 }));
    test_cond(enc_is(t, "a<s>b", 0, 0,
                     (const int32_t[]) { 13, 0, 0, 0, 8, -1 }));
    test_cond(enc_is(t, "a<u>b", 0, 0,
                     (const int32_t[]) { 13, 14, 6, 8, -1 }));

    test("pieces: U+2581 as a space, byte tokens as their byte");
    test_cond(llm_token_to_piece(t, 13, 0, buf, 16) == 2
              && memcmp(buf, " a", 2) == 0);
    test_cond(llm_token_to_piece(t, 3, 0, buf, 16) == 1 && buf[0] == 'z');
    test_cond(llm_token_to_piece(t, 4, 0, buf, 16) == 1
              && buf[0] == '\xc3');
    test_cond(llm_token_to_piece(t, 1, 0, buf, 16) == 0);
    test_cond(llm_token_to_piece(t, 1, 1, buf, 16) == 3
              && memcmp(buf, "<s>", 3) == 0);
    test_cond(llm_token_to_piece(t, 14, 0, buf, 16) == 3);
    llm_tokenizer_free(t);

    test("tokenizer.ggml.add_space_prefix false");
    t = load_tiny(path, SPM_NO_PREFIX);
    test_cond(t != NULL);
    if (t != NULL) {
        test_cond(enc_is(t, "ab", 0, 0, (const int32_t[]) { 10, -1 }));
        test_cond(enc_is(t, "a b", 0, 0, (const int32_t[]) { 7, 6, 8, -1 }));
        llm_tokenizer_free(t);
    }
}


TEST_SUITE(tokenizer_errors)
{
    static const struct {
        int         bad;
        int         code;
        const char *field;
    } cases[] = {
        { BAD_MODEL, LLM_EUNSUP, "tokenizer.ggml.model" },
        { BAD_TYPES_LEN, LLM_EFORMAT, "tokenizer.ggml.token_type" },
        { BAD_MERGE, LLM_EFORMAT, "tokenizer.ggml.merges[1]" },
        { BAD_MERGE_RESULT, LLM_EFORMAT, "tokenizer.ggml.merges[1]" },
        { BAD_MERGE_FORM, LLM_EFORMAT, "tokenizer.ggml.merges[1]" },
        { BAD_BOS, LLM_EFORMAT, "tokenizer.ggml.bos_token_id" },
        { BAD_NO_MERGES, LLM_EFORMAT, "tokenizer.ggml.merges" },
        { BAD_SCORES_LEN, LLM_EFORMAT, "tokenizer.ggml.scores" },
        { BAD_SCORES_TYPE, LLM_EFORMAT, "tokenizer.ggml.scores" },
        { BAD_SCORE_NAN, LLM_EFORMAT, "tokenizer.ggml.scores[7]" },
    };
    gguf_w         w;
    char           path[512], name[128];
    llm_tokenizer *t;
    llm_err        err;
    int32_t        ids[32];
    size_t         i;
    int            n;

    snprintf(path, sizeof(path), "%s/tiny.gguf", llm_test_tmp_dir());

    test("a tiny valid vocabulary loads and merges by rank");
    t = load_tiny(path, BAD_NONE);
    test_cond(t != NULL);
    if (t == NULL) {
        return;
    }
    n = llm_tokenize(t, "abc ab a", 8, 0, 0, ids, 32);
    /* "abc" -> abc(4); " ab" -> Ġ(6) ab(3) (a b outranks Ġ a);
     * " a" -> Ġa(7) */
    test_cond(n == 4 && ids[0] == 4 && ids[1] == 6 && ids[2] == 3
              && ids[3] == 7);
    n = llm_tokenize(t, "a<|x|>b<u>c", 11, 0, 0, ids, 32);
    /* control text not parsed (its characters have no tokens and are
     * dropped), user-defined always */
    test_cond(n == 4 && ids[0] == 0 && ids[1] == 1 && ids[2] == 9
              && ids[3] == 2);
    n = llm_tokenize(t, "a<|x|>b<u>c", 11, 0, 1, ids, 32);
    test_cond(n == 5 && ids[0] == 0 && ids[1] == 8 && ids[2] == 1
              && ids[3] == 9 && ids[4] == 2);
    /* a byte without a token ("z") is dropped, as llama.cpp does */
    n = llm_tokenize(t, "azb", 3, 0, 0, ids, 32);
    test_cond(n == 2 && ids[0] == 0 && ids[1] == 1);
    llm_tokenizer_free(t);

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(name, sizeof(name), "malformed GGUF names %s",
                 cases[i].field);
        test(name);
        tiny_any_gguf(&w, cases[i].bad);
        test_cond(w_file(path, &w) == 0);
        memset(&err, 0, sizeof(err));
        t = llm_tokenizer_load(path, &err);
        test_cond(t == NULL);
        llm_tokenizer_free(t);
        test_cond(err.code == cases[i].code);
        test_cond(strstr(err.msg, path) != NULL);
        test_cond(strstr(err.msg, cases[i].field) != NULL);
        if (strstr(err.msg, cases[i].field) == NULL) {
            printf("       message: %s\n", err.msg);
        }
    }

    test("missing files and bad JSON give errors");
    t = llm_tokenizer_load("/nonexistent/tokenizer.json", &err);
    test_cond(t == NULL && err.code == LLM_EIO);
    snprintf(path, sizeof(path), "%s/bad.json", llm_test_tmp_dir());
    {
        FILE *f = fopen(path, "w");

        fputs("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, "
              "\"merges\": [\"a b\"]}}", f);
        fclose(f);
    }
    t = llm_tokenizer_load(path, &err);
    test_cond(t == NULL && err.code == LLM_EFORMAT
              && strstr(err.msg, "model.merges[0]") != NULL);
    {
        FILE *f = fopen(path, "w");

        fputs("{\"model\": {\"type\": \"Unigram\"}", f);
        fclose(f);
    }
    t = llm_tokenizer_load(path, &err);
    test_cond(t == NULL && err.code == LLM_EFORMAT);
    {
        FILE *f = fopen(path, "w");

        fputs("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", f);
        fclose(f);
    }
    t = llm_tokenizer_load(path, &err);
    test_cond(t == NULL && err.code == LLM_EUNSUP);

    test("SentencePiece-style tokenizer.json steps we lack are refused");
    {
        static const char *const bad[] = {
            /* a normalizer other than Prepend / Replace */
            "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": "
            "[{\"type\": \"NFKC\"}, {\"type\": \"Prepend\", "
            "\"prepend\": \"\u2581\"}]}, ",
            /* Metaspace with another replacement */
            "{\"pre_tokenizer\": {\"type\": \"Metaspace\", "
            "\"replacement\": \"_\"}, ",
            /* byte fallback with a ByteLevel pre-tokenizer */
            "{\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, ",
            NULL
        };
        int k;

        for (k = 0; bad[k] != NULL; k++) {
            FILE *f = fopen(path, "w");

            fprintf(f, "%s\"model\": {\"type\": \"BPE\", "
                    "\"byte_fallback\": true, \"vocab\": {\"a\": 0}, "
                    "\"merges\": []}}", bad[k]);
            fclose(f);
            t = llm_tokenizer_load(path, &err);
            test_cond(t == NULL && err.code == LLM_EUNSUP
                      && strstr(err.msg, path) != NULL);
            if (t != NULL || err.code != LLM_EUNSUP) {
                printf("       case %d: %s\n", k, t ? "loaded" : err.msg);
            }
            llm_tokenizer_free(t);
        }
    }
}


/* ---------------------------------------------------------------------
 * Allocation failures
 * --------------------------------------------------------------------- */

static long fail_after = -1;

static void *
fail_malloc(size_t n)
{
    if (fail_after == 0) {
        return NULL;
    }
    fail_after--;
    return malloc(n);
}


static void *
fail_calloc(size_t n, size_t s)
{
    if (fail_after == 0) {
        return NULL;
    }
    fail_after--;
    return calloc(n, s);
}


static void *
fail_realloc(void *p, size_t n)
{
    if (fail_after == 0) {
        return NULL;
    }
    fail_after--;
    return realloc(p, n);
}


/* Fails each allocation in turn while loading the tiny byte-level BPE
 * (spm 0) or SentencePiece (spm 1) vocabulary and while encoding. */
static void
alloc_failures(int spm)
{
    static const llm_allocators fa = { fail_malloc, fail_calloc,
                                       fail_realloc, free };
    static const char text[] = "abc ab a<|x|>b<u>c \xe4\xbd\xa0";
    gguf_w         w;
    char           path[512];
    llm_tokenizer *t, *ok;
    llm_err        err;
    int32_t        want[64], got[64];
    int            n_want, k, r, load_ok = 1, enc_ok = 1, loaded = 0;

    snprintf(path, sizeof(path), "%s/tiny-alloc.gguf", llm_test_tmp_dir());
    if (spm) {
        tiny_spm_gguf(&w, BAD_NONE);
    } else {
        tiny_gguf(&w, BAD_NONE);
    }
    w_file(path, &w);
    ok = llm_tokenizer_load(path, &err);
    test(spm ? "every failed allocation while loading is reported (SPM)"
             : "every failed allocation while loading is reported");
    test_cond(ok != NULL);
    if (ok == NULL) {
        return;
    }
    n_want = llm_tokenize(ok, text, sizeof(text) - 1, 0, 1, want, 64);

    for (k = 0; k < 400 && !loaded; k++) {
        fail_after = k;
        llm_set_allocators(&fa);
        t = llm_tokenizer_load(path, &err);
        llm_reset_allocators();
        if (t == NULL) {
            if (err.code != LLM_ENOMEM) {
                printf("       allocation %d failed: %s\n", k, err.msg);
                load_ok = 0;
            }
            continue;
        }
        loaded = 1;
        llm_tokenizer_free(t);
    }
    test_cond(loaded && load_ok);

    test(spm ? "every failed allocation while encoding is reported (SPM)"
             : "every failed allocation while encoding is reported");
    for (k = 0; k < 200; k++) {
        fail_after = k;
        llm_set_allocators(&fa);
        r = llm_tokenize(ok, text, sizeof(text) - 1, 0, 1, got, 64);
        llm_reset_allocators();
        if (r < 0) {
            enc_ok &= r == LLM_ENOMEM;
        } else {
            enc_ok &= r == n_want
                      && memcmp(got, want, sizeof(int32_t) * r) == 0;
            if (fail_after > 0) {
                break;              /* succeeded with allocations to spare */
            }
        }
    }
    test_cond(enc_ok);
    llm_tokenizer_free(ok);
}


TEST_SUITE(tokenizer_alloc_failures)
{
    alloc_failures(0);
    alloc_failures(1);
}
