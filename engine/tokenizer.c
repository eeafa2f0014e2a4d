/*
 * Byte-level BPE tokenizer (see tokenizer.h), built to give exactly the
 * ids llama.cpp gives for the same GGUF file.
 *
 * Encoding, as llama.cpp does it:
 *
 *   1. special-token partition: the texts of control (when parse_special),
 *      unknown (likewise) and user-defined (always) tokens are cut out of
 *      the raw text, longest token first;
 *   2. each remaining fragment is decoded into code points (invalid UTF-8
 *      becomes U+FFFD) and split into words by the model's pre-tokenizer,
 *      a chain of hand-written scanners standing in for the regexes;
 *   3. each word's UTF-8 bytes are mapped through GPT-2's bytes_to_unicode
 *      table and merged pairwise by merge rank (lowest first, leftmost on
 *      ties) into vocabulary tokens.
 *
 * SentencePiece vocabularies (GGUF tokenizer.ggml.model "llama": Llama 2,
 * Mistral, TinyLlama, Phi-3, ...) take another road, llama.cpp's SPM
 * tokenizer: each raw fragment gets a leading space when it starts the
 * text or follows a special token, spaces become U+2581 "\xe2\x96\x81",
 * and adjacent symbols (UTF-8 characters at first) merge into the
 * vocabulary token of highest score, leftmost on ties; a symbol left over
 * that is no token becomes its bytes' <0xXX> tokens.
 *
 * Sections: tables and hashing, loading (common part, GGUF, tokenizer.json),
 * pre-tokenizers, BPE, SentencePiece, encoding, decoding.
 */
#include "tokenizer.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "gguf.h"
#include "unicode.h"


/* Token attributes (llama.cpp's llama_token_attr, our own bit values). */
enum {
    TOK_NORMAL  = 0x001,
    TOK_UNKNOWN = 0x002,
    TOK_CONTROL = 0x004,
    TOK_USER    = 0x008,        /* user-defined: always matched, raw text */
    TOK_UNUSED  = 0x010,
    TOK_BYTE    = 0x020,
    TOK_LSTRIP  = 0x040,
    TOK_RSTRIP  = 0x080,
    TOK_EOG     = 0x100
};

/* SentencePiece's escaped space, U+2581 in UTF-8 (3 bytes). */
#define SPM_SPACE  "\xe2\x96\x81"

/* Where a SentencePiece vocabulary puts a space before a raw fragment
 * (the text between special tokens). */
enum {
    SPM_PREFIX_NONE = 0,
    SPM_PREFIX_EACH,            /* every fragment (llama.cpp; tokenizer.json
                                   normalizer Prepend) */
    SPM_PREFIX_UNLESS_SPACE,    /* every fragment not starting with a space
                                   (Metaspace prepend_scheme "always") */
    SPM_PREFIX_FIRST            /* only at the text's start, unless a space
                                   is there (Metaspace "first") */
};

/* Pre-tokenizers: families of llama.cpp's LLAMA_VOCAB_PRE_TYPE_*. */
enum {
    PRE_GPT2 = 0,
    PRE_DEFAULT,
    PRE_SMOLLM,
    PRE_LLAMA3,
    PRE_QWEN2,
    PRE_DEEPSEEK_CODER
};

/* Split stages; a pre-tokenizer is a chain of them, each splitting the
 * pieces the previous one produced (llama.cpp's regex_exprs list). */
enum {
    ST_END = 0,
    ST_GPT2,        /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
                       ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    ST_LLAMA3,      /* (?i:'s|..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
                       ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
    ST_QWEN2,       /* the same with \p{N} */
    ST_EACH_NUM,    /* \p{N} */
    ST_NUM_RUN,     /* \p{N}+ */
    ST_PUNCT_RUN,   /* [\p{P}\$\+<=>\^~\|]+ */
    ST_DIGIT3,      /* [0-9][0-9][0-9] */
    ST_CRLF,        /* [\r\n] */
    ST_WS_LETTERS,  /* \s?\p{L}+ */
    ST_WS_PUNCTS,   /* \s?\p{P}+ */
    ST_CJK_HANGUL   /* [\x{800}-\x{9fa5}\x{ac00}-\x{d7ff}]+ */
};

#define TOK_MAX_STAGES  5

static const uint8_t pre_stages[][TOK_MAX_STAGES] = {
    [PRE_GPT2]    = { ST_GPT2 },
    [PRE_DEFAULT] = { ST_PUNCT_RUN, ST_GPT2, ST_NUM_RUN, ST_DIGIT3 },
    [PRE_SMOLLM]  = { ST_EACH_NUM, ST_GPT2 },
    [PRE_LLAMA3]  = { ST_LLAMA3 },
    [PRE_QWEN2]   = { ST_QWEN2 },
    [PRE_DEEPSEEK_CODER] = { ST_CRLF, ST_WS_LETTERS, ST_WS_PUNCTS,
                             ST_CJK_HANGUL, ST_EACH_NUM },
};

/* tokenizer.ggml.pre names, as llama.cpp groups them. */
static const struct {
    const char *name;
    int         pre;
    int         ignore_merges;
    int         add_bos;
} pre_names[] = {
    { "default",          PRE_DEFAULT, 0, 0 },
    { "gpt2",             PRE_GPT2,    0, 0 },
    { "gpt-2",            PRE_GPT2,    0, 0 },
    { "phi-2",            PRE_GPT2,    0, 0 },
    { "jina-es",          PRE_GPT2,    0, 0 },
    { "jina-de",          PRE_GPT2,    0, 0 },
    { "jina-v2-es",       PRE_GPT2,    0, 0 },
    { "jina-v2-de",       PRE_GPT2,    0, 0 },
    { "gigachat",         PRE_GPT2,    0, 0 },
    { "a.x-4.0",          PRE_GPT2,    0, 0 },
    { "mellum",           PRE_GPT2,    0, 0 },
    { "mpt",              PRE_GPT2,    0, 0 },
    { "olmo",             PRE_GPT2,    0, 0 },
    { "jais",             PRE_GPT2,    0, 0 },
    { "trillion",         PRE_GPT2,    0, 0 },
    { "granite-docling",  PRE_GPT2,    0, 0 },
    { "smollm",           PRE_SMOLLM,  0, 0 },
    { "starcoder",        PRE_SMOLLM,  0, 0 },
    { "refact",           PRE_SMOLLM,  0, 0 },
    { "command-r",        PRE_SMOLLM,  0, 0 },
    { "codeshell",        PRE_SMOLLM,  0, 0 },
    { "exaone",           PRE_SMOLLM,  0, 0 },
    { "minerva-7b",       PRE_SMOLLM,  0, 0 },
    { "minerva",          PRE_SMOLLM,  0, 0 },
    { "llama3",           PRE_LLAMA3,  1, 1 },
    { "llama-v3",         PRE_LLAMA3,  1, 1 },
    { "llama-bpe",        PRE_LLAMA3,  1, 1 },
    { "falcon3",          PRE_LLAMA3,  1, 1 },
    { "falcon-h1",        PRE_LLAMA3,  1, 1 },
    { "pixtral",          PRE_LLAMA3,  1, 1 },
    { "midm-2.0",         PRE_LLAMA3,  1, 1 },
    { "lfm2",             PRE_LLAMA3,  1, 1 },
    { "smaug-bpe",        PRE_LLAMA3,  0, 0 },
    { "dbrx",             PRE_LLAMA3,  0, 0 },
    { "qwen2",            PRE_QWEN2,   0, 0 },
    { "deepseek-r1-qwen", PRE_QWEN2,   0, 0 },
    { "stablelm2",        PRE_QWEN2,   0, 0 },
    { "hunyuan",          PRE_QWEN2,   0, 0 },
    { "deepseek-coder",   PRE_DEEPSEEK_CODER, 0, 0 },
};

/* Texts llama.cpp recognises as end-of-turn / end-of-generation. */
static const char *const eot_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
    "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",
    "<end_of_utterance>", NULL
};

static const char *const eog_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
    "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",
    "[e~[", NULL
};

/* FIM pad/repo/separator tokens, which llama.cpp also counts as EOG. */
static const char *const fim_eog_texts[] = {
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>", "<file-sep>", NULL
};

typedef struct {
    uint64_t key;               /* (left << 32) | right; EMPTY when free */
    int32_t  rank;
    int32_t  result;
} tok_merge;

#define MERGE_EMPTY  UINT64_MAX

struct llm_tokenizer {
    int32_t     n_vocab;
    char       *text;           /* token texts, each NUL-terminated */
    uint32_t   *off;            /* [n_vocab + 1] offsets into text */
    uint16_t   *attr;           /* [n_vocab] TOK_* */
    char       *piece;          /* decoded bytes of each token */
    uint32_t   *poff;           /* [n_vocab + 1] offsets into piece */

    int32_t    *map;            /* text -> id, open addressing, -1 free */
    size_t      map_mask;

    tok_merge  *merges;         /* (left, right) -> rank, result */
    size_t      merge_mask;
    int32_t     n_merges;

    uint16_t    byte_cp[256];   /* bytes_to_unicode */
    int32_t     byte_tok[256];  /* token of each byte's mapped char or -1 */

    int         spm;            /* SentencePiece vocabulary (see above) */
    int         spm_prefix;     /* SPM_PREFIX_*: where a space goes first */
    int         spm_split;      /* tokenizer.json Metaspace split: each
                                   U+2581 starts a word of its own */
    int         spm_by_rank;    /* tokenizer.json: BPE merges by rank over
                                   characters; GGUF: merges by score */
    int         fuse_unk;       /* tokenizer.json: unknown runs are one */
    int32_t    *spm_rank;       /* [n_vocab] GGUF SPM merge order: 0 for
                                   the highest score, equal scores equal */
    int32_t     byte_fallback[256]; /* <0xXX> token of each byte, or -1 */

    int32_t    *special;        /* partitioned ids, longest text first */
    int32_t     n_special;

    int         pre;
    int         pre_fallback;   /* pre-tokenizer unknown: GPT-2 used */
    char        pre_name[64];
    int         ignore_merges;
    int         add_bos;
    int         add_eos;
    int32_t     bos, eos, eot, eom, unk, pad;

    char       *chat_template;
    char       *source;         /* file name for messages */
};


/* ---------------------------------------------------------------------
 * Tables and hashing
 * --------------------------------------------------------------------- */

static inline const char *
tok_text(const llm_tokenizer *t, int32_t id, size_t *len)
{
    *len = t->off[id + 1] - t->off[id] - 1;
    return t->text + t->off[id];
}


static uint64_t
hash_bytes(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t       h = 0xcbf29ce484222325ULL;
    size_t         i;

    for (i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h ^ (h >> 29);
}


static inline uint64_t
hash_u64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}


static int32_t
tok_lookup(const llm_tokenizer *t, const char *s, size_t n)
{
    size_t      i = hash_bytes(s, n) & t->map_mask;
    const char *p;
    size_t      len;
    int32_t     id;

    for (;;) {
        id = t->map[i];
        if (id < 0) {
            return -1;
        }
        p = tok_text(t, id, &len);
        if (len == n && memcmp(p, s, n) == 0) {
            return id;
        }
        i = (i + 1) & t->map_mask;
    }
}


/* Inserts id; a later token with the same text replaces the earlier one
 * (llama.cpp's token_to_id[text] = id). */
static void
tok_map_insert(llm_tokenizer *t, int32_t id)
{
    const char *s, *p;
    size_t      n, len, i;

    s = tok_text(t, id, &n);
    i = hash_bytes(s, n) & t->map_mask;
    while (t->map[i] >= 0) {
        p = tok_text(t, t->map[i], &len);
        if (len == n && memcmp(p, s, n) == 0) {
            t->map[i] = id;
            return;
        }
        i = (i + 1) & t->map_mask;
    }
    t->map[i] = id;
}


static const tok_merge *
tok_merge_find(const llm_tokenizer *t, int32_t left, int32_t right)
{
    uint64_t key = ((uint64_t) (uint32_t) left << 32) | (uint32_t) right;
    size_t   i = hash_u64(key) & t->merge_mask;

    while (t->merges[i].key != MERGE_EMPTY) {
        if (t->merges[i].key == key) {
            return &t->merges[i];
        }
        i = (i + 1) & t->merge_mask;
    }
    return NULL;
}


/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves,
 * the others to U+0100 upwards in byte order. */
static void
tok_byte_table(llm_tokenizer *t)
{
    int b, n = 0;

    for (b = 0; b < 256; b++) {
        if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac)
            || (b >= 0xae && b <= 0xff))
        {
            t->byte_cp[b] = (uint16_t) b;
        } else {
            t->byte_cp[b] = (uint16_t) (256 + n++);
        }
    }
}


/* Inverse of bytes_to_unicode: the byte for cp, or -1. */
static int
tok_cp_byte(uint32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7e) || (cp >= 0xa1 && cp <= 0xac)
        || (cp >= 0xae && cp <= 0xff))
    {
        return (int) cp;
    }
    if (cp >= 256 && cp < 256 + 68) {
        /* the n-th unprintable byte, in byte order */
        int b, n = (int) cp - 256;

        for (b = 0; b < 256; b++) {
            if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac)
                || (b >= 0xae && b <= 0xff))
            {
                continue;
            }
            if (n-- == 0) {
                return b;
            }
        }
    }
    return -1;
}


static size_t
pow2_at_least(size_t n)
{
    size_t p = 16;

    while (p < n) {
        p <<= 1;
    }
    return p;
}


/* ---------------------------------------------------------------------
 * Loading: the common part
 * --------------------------------------------------------------------- */

/* A vocabulary being built: texts point into the source (mapping or
 * JSON) until tok_build_vocab copies them. */
typedef struct {
    const char **text;
    uint32_t    *len;
    uint16_t    *attr;
    int32_t      n;
} tok_src;


static int
tok_src_alloc(tok_src *s, int32_t n)
{
    s->n = n;
    s->text = llm_calloc((size_t) n, sizeof(*s->text));
    s->len = llm_calloc((size_t) n, sizeof(*s->len));
    s->attr = llm_calloc((size_t) n, sizeof(*s->attr));
    if (s->text == NULL || s->len == NULL || s->attr == NULL) {
        return LLM_ENOMEM;
    }
    return 0;
}


static void
tok_src_free(tok_src *s)
{
    llm_free(s->text);
    llm_free(s->len);
    llm_free(s->attr);
}


static llm_tokenizer *
tok_new(const char *source)
{
    llm_tokenizer *t = llm_calloc(1, sizeof(*t));

    if (t == NULL) {
        return NULL;
    }
    t->source = llm_strdup(source ? source : "tokenizer");
    if (t->source == NULL) {
        llm_free(t);
        return NULL;
    }
    t->bos = t->eos = t->eot = t->eom = t->unk = t->pad = -1;
    tok_byte_table(t);
    return t;
}


static int
tok_build_vocab(llm_tokenizer *t, const tok_src *s, llm_err *err)
{
    size_t  total = 0, pos = 0, i;
    int32_t id;

    for (id = 0; id < s->n; id++) {
        total += (size_t) s->len[id] + 1;
        if (total > UINT32_MAX) {
            return llm_err_set(err, LLM_EFORMAT,
                               "%s: token texts exceed 4 GiB", t->source);
        }
    }
    t->n_vocab = s->n;
    t->text = llm_malloc(total ? total : 1);
    t->off = llm_malloc(((size_t) s->n + 1) * sizeof(*t->off));
    t->attr = llm_malloc((size_t) s->n * sizeof(*t->attr));
    t->map_mask = pow2_at_least((size_t) s->n * 2) - 1;
    t->map = llm_malloc((t->map_mask + 1) * sizeof(*t->map));
    if (t->text == NULL || t->off == NULL || t->attr == NULL
        || t->map == NULL)
    {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory for the "
                           "vocabulary", t->source);
    }
    for (id = 0; id < s->n; id++) {
        t->off[id] = (uint32_t) pos;
        if (s->len[id]) {
            memcpy(t->text + pos, s->text[id], s->len[id]);
        }
        pos += s->len[id];
        t->text[pos++] = '\0';
        t->attr[id] = s->attr[id];
    }
    t->off[s->n] = (uint32_t) pos;
    for (i = 0; i <= t->map_mask; i++) {
        t->map[i] = -1;
    }
    for (id = 0; id < s->n; id++) {
        if (t->off[id + 1] - t->off[id] > 1) {
            tok_map_insert(t, id);
        }
    }
    return 0;
}


static int
tok_merges_alloc(llm_tokenizer *t, size_t n, llm_err *err)
{
    size_t i;

    t->merge_mask = pow2_at_least(n * 2 + 1) - 1;
    t->merges = llm_malloc((t->merge_mask + 1) * sizeof(*t->merges));
    if (t->merges == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory for %zu "
                           "merges", t->source, n);
    }
    for (i = 0; i <= t->merge_mask; i++) {
        t->merges[i].key = MERGE_EMPTY;
    }
    return 0;
}


/* Adds merge number rank "a b"; where names the field for messages.  The
 * first of duplicate merges keeps its rank (llama.cpp's emplace). */
static int
tok_add_merge(llm_tokenizer *t, const char *a, size_t alen, const char *b,
              size_t blen, int32_t rank, const char *where, llm_err *err)
{
    char      stack[256], *cat = stack;
    int32_t   l, r, res;
    uint64_t  key;
    size_t    i;

    l = tok_lookup(t, a, alen);
    r = tok_lookup(t, b, blen);
    if (l < 0 || r < 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: %s[%d] \"%.*s %.*s\" names a token that is "
                           "not in the vocabulary", t->source, where,
                           (int) rank, (int) (alen > 64 ? 64 : alen), a,
                           (int) (blen > 64 ? 64 : blen), b);
    }
    if (alen + blen > sizeof(stack)) {
        cat = llm_malloc(alen + blen);
        if (cat == NULL) {
            return llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                               t->source);
        }
    }
    memcpy(cat, a, alen);
    memcpy(cat + alen, b, blen);
    res = tok_lookup(t, cat, alen + blen);
    if (cat != stack) {
        llm_free(cat);
    }
    if (res < 0) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: %s[%d] \"%.*s %.*s\": the merged token is "
                           "not in the vocabulary", t->source, where,
                           (int) rank, (int) (alen > 64 ? 64 : alen), a,
                           (int) (blen > 64 ? 64 : blen), b);
    }

    key = ((uint64_t) (uint32_t) l << 32) | (uint32_t) r;
    i = hash_u64(key) & t->merge_mask;
    while (t->merges[i].key != MERGE_EMPTY) {
        if (t->merges[i].key == key) {
            return 0;
        }
        i = (i + 1) & t->merge_mask;
    }
    t->merges[i].key = key;
    t->merges[i].rank = rank;
    t->merges[i].result = res;
    t->n_merges++;
    return 0;
}


static int
tok_find_name(const char *name, size_t n)
{
    size_t i;

    for (i = 0; i < sizeof(pre_names) / sizeof(pre_names[0]); i++) {
        if (strlen(pre_names[i].name) == n
            && memcmp(pre_names[i].name, name, n) == 0)
        {
            return (int) i;
        }
    }
    return -1;
}


/* Sets the pre-tokenizer from a llama.cpp name; returns the add_bos
 * default that name implies. */
static int
tok_set_pre(llm_tokenizer *t, const char *name, size_t n)
{
    int i = tok_find_name(name, n);

    snprintf(t->pre_name, sizeof(t->pre_name), "%.*s",
             (int) (n < 63 ? n : 63), name);
    if (i < 0) {
        t->pre = PRE_GPT2;
        t->pre_fallback = 1;
        t->ignore_merges = 0;
        return 0;
    }
    t->pre = pre_names[i].pre;
    t->pre_fallback = 0;
    t->ignore_merges = pre_names[i].ignore_merges;
    return pre_names[i].add_bos;
}


/* SentencePiece: no pre-tokenizer split; reported as "spm". */
static void
tok_set_pre_spm(llm_tokenizer *t)
{
    tok_set_pre(t, "default", 7);
    snprintf(t->pre_name, sizeof(t->pre_name), "spm");
}


static void
tok_mark_eog_text(llm_tokenizer *t, const char *const *list)
{
    int32_t id;

    for (; *list != NULL; list++) {
        id = tok_lookup(t, *list, strlen(*list));
        if (id >= 0) {
            t->attr[id] |= TOK_EOG;
            if (!(t->attr[id] & TOK_CONTROL)) {
                /* llama.cpp overrides such a token's type to control */
                t->attr[id] = (uint16_t) ((t->attr[id] & ~(TOK_NORMAL
                              | TOK_USER | TOK_UNUSED | TOK_BYTE
                              | TOK_UNKNOWN)) | TOK_CONTROL);
            }
        }
    }
}


static int
cmp_special(const void *a, const void *b, void *arg)
{
    const llm_tokenizer *t = arg;
    int32_t              x = *(const int32_t *) a, y = *(const int32_t *) b;
    uint32_t             lx = t->off[x + 1] - t->off[x];
    uint32_t             ly = t->off[y + 1] - t->off[y];

    if (lx != ly) {
        return lx > ly ? -1 : 1;
    }
    return x < y ? -1 : (x > y);
}


/* Decodes a byte-level token text into its bytes, as llama.cpp's
 * llama_decode_text (including its "[UNK_BYTE_0x..]" for characters
 * outside the byte table).  With out == NULL only measures. */
static size_t
tok_decode_text(const char *s, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    size_t   i = 0, o = 0;
    uint32_t cp;
    char     enc[4];
    int      b, el, k;

    while (i < n) {
        cp = llm_utf8_decode_lenient(s, n, &i);
        b = tok_cp_byte(cp);
        if (b >= 0) {
            if (out != NULL) {
                out[o] = (char) b;
            }
            o++;
            continue;
        }
        el = llm_utf8_encode(cp, enc);
        if (out != NULL) {
            memcpy(out + o, "[UNK_BYTE_0x", 12);
            for (k = 0; k < el; k++) {
                out[o + 12 + 2 * k] = hex[(uint8_t) enc[k] >> 4];
                out[o + 13 + 2 * k] = hex[(uint8_t) enc[k] & 15];
            }
            memcpy(out + o + 12 + 2 * el, s, n);
            out[o + 12 + 2 * el + n] = ']';
        }
        o += 12 + 2 * (size_t) el + n + 1;
    }
    return o;
}


/* The byte a <0xXX> token stands for, or -1 for another text. */
static int
tok_hex_byte(const char *s, size_t n)
{
    int k, v = 0, d;

    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') {
        return -1;
    }
    for (k = 3; k < 5; k++) {
        d = s[k] >= '0' && s[k] <= '9' ? s[k] - '0'
            : s[k] >= 'A' && s[k] <= 'F' ? s[k] - 'A' + 10
            : s[k] >= 'a' && s[k] <= 'f' ? s[k] - 'a' + 10 : -1;
        if (d < 0) {
            return -1;
        }
        v = v * 16 + d;
    }
    return v;
}


/* The bytes token id stands for, as llama.cpp's token_to_piece with
 * special set: special and user-defined tokens as written, normal ones
 * decoded (byte-level, or U+2581 back to a space for SentencePiece), a
 * byte token as its byte, anything else as nothing.  With out == NULL
 * only measures. */
static size_t
tok_piece(const llm_tokenizer *t, int32_t id, char *out)
{
    const char *s;
    size_t      n, i, o;
    int         b;

    s = tok_text(t, id, &n);
    if (t->attr[id] & (TOK_CONTROL | TOK_UNKNOWN | TOK_USER)) {
        if (out != NULL) {
            memcpy(out, s, n);
        }
        return n;
    }
    if (t->attr[id] & TOK_NORMAL) {
        if (!t->spm) {
            return tok_decode_text(s, n, out);
        }
        for (i = 0, o = 0; i < n; o++) {
            if (i + 3 <= n && memcmp(s + i, SPM_SPACE, 3) == 0) {
                if (out != NULL) {
                    out[o] = ' ';
                }
                i += 3;
            } else {
                if (out != NULL) {
                    out[o] = s[i];
                }
                i++;
            }
        }
        return o;
    }
    if (t->attr[id] & TOK_BYTE) {
        b = tok_hex_byte(s, n);
        if (b < 0) {
            return 0;
        }
        if (out != NULL) {
            out[0] = (char) b;
        }
        return 1;
    }
    return 0;
}


/* Everything after the vocabulary and merges are in: special ids, EOG
 * set, the partition list and the decoded pieces. */
static int
tok_finalize(llm_tokenizer *t, llm_err *err)
{
    size_t      n, total = 0, o;
    int32_t     id, k;
    int         b;
    char        mapped[4], hexname[8], *tmp;

    for (b = 0; b < 256; b++) {
        n = (size_t) llm_utf8_encode(t->byte_cp[b], mapped);
        t->byte_tok[b] = tok_lookup(t, mapped, n);

        snprintf(hexname, sizeof(hexname), "<0x%02X>", b);
        t->byte_fallback[b] = tok_lookup(t, hexname, 6);
    }

    /* end of turn: the GGUF key, else the first known text present
     * (llama.cpp takes whichever its hash map yields first; this order
     * prefers the chat-turn markers) */
    if (t->eot < 0) {
        for (k = 0; eot_texts[k] != NULL; k++) {
            id = tok_lookup(t, eot_texts[k], strlen(eot_texts[k]));
            if (id >= 0) {
                const char *one[2] = { eot_texts[k], NULL };

                t->eot = id;
                tok_mark_eog_text(t, one);
                break;
            }
        }
    }
    if (t->eom < 0) {
        t->eom = tok_lookup(t, "<|eom_id|>", 10);
    }
    tok_mark_eog_text(t, fim_eog_texts);
    tok_mark_eog_text(t, eog_texts);
    if (t->eos >= 0) {
        t->attr[t->eos] |= TOK_EOG;
    }
    if (t->eot >= 0) {
        t->attr[t->eot] |= TOK_EOG;
    }
    if (t->eom >= 0) {
        t->attr[t->eom] |= TOK_EOG;
    }

    /* the texts cut out of raw input before pre-tokenization */
    t->n_special = 0;
    for (id = 0; id < t->n_vocab; id++) {
        if ((t->attr[id] & (TOK_CONTROL | TOK_USER | TOK_UNKNOWN))
            && t->off[id + 1] - t->off[id] > 1)
        {
            t->n_special++;
        }
    }
    t->special = llm_malloc(((size_t) t->n_special + 1) * sizeof(int32_t));
    if (t->special == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", t->source);
    }
    k = 0;
    for (id = 0; id < t->n_vocab; id++) {
        if ((t->attr[id] & (TOK_CONTROL | TOK_USER | TOK_UNKNOWN))
            && t->off[id + 1] - t->off[id] > 1)
        {
            t->special[k++] = id;
        }
    }
    qsort_r(t->special, (size_t) t->n_special, sizeof(int32_t), cmp_special,
            t);

    /* pieces: what llm_token_to_piece returns with special = 1 */
    for (id = 0; id < t->n_vocab; id++) {
        total += tok_piece(t, id, NULL);
        if (total > UINT32_MAX) {
            return llm_err_set(err, LLM_EFORMAT, "%s: decoded token texts "
                               "exceed 4 GiB", t->source);
        }
    }
    tmp = llm_malloc(total + 1);
    t->poff = llm_malloc(((size_t) t->n_vocab + 1) * sizeof(*t->poff));
    if (tmp == NULL || t->poff == NULL) {
        llm_free(tmp);
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", t->source);
    }
    o = 0;
    for (id = 0; id < t->n_vocab; id++) {
        t->poff[id] = (uint32_t) o;
        o += tok_piece(t, id, tmp + o);
    }
    t->poff[t->n_vocab] = (uint32_t) o;
    t->piece = llm_realloc(tmp, o + 1);
    if (t->piece == NULL) {
        t->piece = tmp;
    }
    return 0;
}


void
llm_tokenizer_free(llm_tokenizer *t)
{
    if (t == NULL) {
        return;
    }
    llm_free(t->text);
    llm_free(t->off);
    llm_free(t->attr);
    llm_free(t->piece);
    llm_free(t->poff);
    llm_free(t->map);
    llm_free(t->merges);
    llm_free(t->spm_rank);
    llm_free(t->special);
    llm_free(t->chat_template);
    llm_free(t->source);
    llm_free(t);
}


/* ---------------------------------------------------------------------
 * Loading from GGUF
 * --------------------------------------------------------------------- */

static uint16_t
tok_attr_from_type(int64_t type)
{
    switch (type) {
    case 1: return TOK_NORMAL;
    case 2: return TOK_UNKNOWN;
    case 3: return TOK_CONTROL;
    case 4: return TOK_USER;
    case 5: return TOK_UNUSED;
    case 6: return TOK_BYTE;
    default: return 0;              /* undefined */
    }
}


static int
gguf_arr_int(const llm_gguf_kv *kv, uint64_t i, int64_t *out)
{
    const uint8_t *d = (const uint8_t *) kv->data
                       + i * llm_gguf_type_size(kv->arr_type);

    switch (kv->arr_type) {
    case LLM_GGUF_I8:  *out = (int8_t) d[0]; return 0;
    case LLM_GGUF_U8:  *out = d[0]; return 0;
    case LLM_GGUF_I16: { int16_t v; memcpy(&v, d, 2); *out = v; return 0; }
    case LLM_GGUF_U16: { uint16_t v; memcpy(&v, d, 2); *out = v; return 0; }
    case LLM_GGUF_I32: { int32_t v; memcpy(&v, d, 4); *out = v; return 0; }
    case LLM_GGUF_U32: { uint32_t v; memcpy(&v, d, 4); *out = v; return 0; }
    case LLM_GGUF_I64: { int64_t v; memcpy(&v, d, 8); *out = v; return 0; }
    default: return LLM_EFORMAT;
    }
}


static int
gguf_special_id(llm_tokenizer *t, const llm_gguf *g, const char *key,
                int32_t *id, llm_err *err)
{
    int64_t v;
    int     rc = llm_gguf_get_i64(g, key, &v, err);

    if (rc == LLM_ENOTFOUND) {
        return 0;
    }
    if (rc != 0) {
        return rc;
    }
    if (v < 0 || v >= t->n_vocab) {
        return llm_err_set(err, LLM_EFORMAT,
                           "%s: metadata \"%s\" = %lld is not a token id "
                           "(vocabulary has %d tokens)", t->source, key,
                           (long long) v, (int) t->n_vocab);
    }
    *id = (int32_t) v;
    return 0;
}


static int
gguf_bool(const llm_gguf *g, const char *key, int *out, llm_err *err)
{
    int rc = llm_gguf_get_bool(g, key, out, err);

    return rc == LLM_ENOTFOUND ? 0 : rc;
}


static int
cmp_score_desc(const void *a, const void *b, void *arg)
{
    const float *score = arg;
    float        x = score[*(const int32_t *) a];
    float        y = score[*(const int32_t *) b];

    return x > y ? -1 : x < y;
}


/* Turns scores into merge priorities: t->spm_rank[id] is the number of
 * distinct scores above id's, so that the BPE heap's order (lowest rank
 * first, leftmost on ties) is llama.cpp's (highest score first, leftmost
 * on ties). */
static int
spm_rank_scores(llm_tokenizer *t, const float *score, llm_err *err)
{
    int32_t *order, id, k, r = 0;

    order = llm_malloc((size_t) t->n_vocab * sizeof(int32_t));
    t->spm_rank = llm_malloc((size_t) t->n_vocab * sizeof(int32_t));
    if (order == NULL || t->spm_rank == NULL) {
        llm_free(order);
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", t->source);
    }
    for (id = 0; id < t->n_vocab; id++) {
        order[id] = id;
    }
    qsort_r(order, (size_t) t->n_vocab, sizeof(int32_t), cmp_score_desc,
            (void *) score);
    for (k = 0; k < t->n_vocab; k++) {
        if (k > 0 && score[order[k]] != score[order[k - 1]]) {
            r++;
        }
        t->spm_rank[order[k]] = r;
    }
    llm_free(order);
    return 0;
}


/* SentencePiece scores (tokenizer.ggml.scores, float or integer, one
 * per token; all 0 without the key, as llama.cpp) become t->spm_rank. */
static int
spm_load_scores(llm_tokenizer *t, const llm_gguf *g, llm_err *err)
{
    const llm_gguf_kv *ks = llm_gguf_find(g, "tokenizer.ggml.scores");
    float             *score;
    int64_t            v;
    uint64_t           i;
    int                rc;

    score = llm_calloc((size_t) t->n_vocab, sizeof(float));
    if (score == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", t->source);
    }
    if (ks != NULL) {
        if (ks->type != LLM_GGUF_ARRAY
            || (ks->arr_type != LLM_GGUF_F32 && ks->arr_type != LLM_GGUF_I32))
        {
            llm_free(score);
            return llm_err_set(err, LLM_EFORMAT, "%s: tokenizer.ggml.scores "
                               "is not an array of float32 or int32",
                               t->source);
        }
        if (ks->arr_n < (uint64_t) t->n_vocab) {
            llm_free(score);
            return llm_err_set(err, LLM_EFORMAT, "%s: tokenizer.ggml.scores "
                               "has %llu entries for %d tokens", t->source,
                               (unsigned long long) ks->arr_n,
                               (int) t->n_vocab);
        }
        for (i = 0; i < (uint64_t) t->n_vocab; i++) {
            if (ks->arr_type == LLM_GGUF_F32) {
                memcpy(&score[i], (const char *) ks->data + 4 * i, 4);
            } else {
                gguf_arr_int(ks, i, &v);
                score[i] = (float) v;
            }
            if (score[i] != score[i]) {
                llm_free(score);
                return llm_err_set(err, LLM_EFORMAT, "%s: "
                                   "tokenizer.ggml.scores[%llu] is NaN",
                                   t->source, (unsigned long long) i);
            }
        }
    }
    rc = spm_rank_scores(t, score, err);
    llm_free(score);
    return rc;
}


static int
tok_load_gguf(llm_tokenizer *t, const llm_gguf *g, llm_err *err)
{
    const llm_gguf_kv *ktok, *ktype, *kmerge;
    tok_src            src = { 0 };
    llm_str            s, name;
    int64_t            v;
    uint64_t           i;
    size_t             sp;
    int                rc, add_bos, space;

    rc = llm_gguf_get_str(g, "tokenizer.ggml.model", &s, err);
    if (rc == LLM_ENOTFOUND) {
        return llm_err_set(err, LLM_EFORMAT, "%s: no tokenizer "
                           "(tokenizer.ggml.model missing)", t->source);
    }
    if (rc != 0) {
        return rc;
    }
    if (llm_str_eq(s, "llama")) {
        t->spm = 1;
    } else if (!llm_str_eq(s, "gpt2")) {
        return llm_err_set(err, LLM_EUNSUP,
                           "%s: tokenizer.ggml.model \"%.*s\" is not "
                           "supported; only byte-level BPE (\"gpt2\") and "
                           "SentencePiece (\"llama\") are",
                           t->source, (int) (s.n > 32 ? 32 : s.n), s.p);
    }

    ktok = llm_gguf_find(g, "tokenizer.ggml.tokens");
    if (ktok == NULL || ktok->type != LLM_GGUF_ARRAY
        || ktok->arr_type != LLM_GGUF_STRING)
    {
        return llm_err_set(err, LLM_EFORMAT, "%s: tokenizer.ggml.tokens %s",
                           t->source, ktok ? "is not a string array"
                                           : "is missing");
    }
    if (ktok->arr_n == 0 || ktok->arr_n >= INT32_MAX) {
        return llm_err_set(err, LLM_EFORMAT, "%s: tokenizer.ggml.tokens "
                           "has %llu entries", t->source,
                           (unsigned long long) ktok->arr_n);
    }
    ktype = llm_gguf_find(g, "tokenizer.ggml.token_type");
    if (ktype != NULL) {
        if (ktype->type != LLM_GGUF_ARRAY
            || llm_gguf_type_size(ktype->arr_type) == 0
            || ktype->arr_type == LLM_GGUF_F32
            || ktype->arr_type == LLM_GGUF_F64
            || ktype->arr_type == LLM_GGUF_BOOL
            || ktype->arr_type == LLM_GGUF_U64)
        {
            return llm_err_set(err, LLM_EFORMAT, "%s: "
                               "tokenizer.ggml.token_type is not an integer "
                               "array", t->source);
        }
        if (ktype->arr_n != ktok->arr_n) {
            return llm_err_set(err, LLM_EFORMAT, "%s: "
                               "tokenizer.ggml.token_type has %llu entries, "
                               "tokenizer.ggml.tokens %llu", t->source,
                               (unsigned long long) ktype->arr_n,
                               (unsigned long long) ktok->arr_n);
        }
    }
    kmerge = llm_gguf_find(g, "tokenizer.ggml.merges");
    if (t->spm) {
        kmerge = NULL;          /* SentencePiece merges by score */
    } else if (kmerge == NULL || kmerge->type != LLM_GGUF_ARRAY
               || kmerge->arr_type != LLM_GGUF_STRING)
    {
        return llm_err_set(err, LLM_EFORMAT, "%s: tokenizer.ggml.merges %s",
                           t->source, kmerge ? "is not a string array"
                                             : "is missing");
    }
    if (kmerge != NULL && kmerge->arr_n >= INT32_MAX) {
        return llm_err_set(err, LLM_EFORMAT, "%s: tokenizer.ggml.merges "
                           "has too many entries", t->source);
    }

    if (tok_src_alloc(&src, (int32_t) ktok->arr_n) != 0) {
        tok_src_free(&src);
        return llm_err_set(err, LLM_ENOMEM, "%s: out of memory", t->source);
    }
    for (i = 0; i < ktok->arr_n; i++) {
        if (llm_gguf_arr_str(ktok, i, &s) != 0 || s.n >= UINT32_MAX) {
            tok_src_free(&src);
            return llm_err_set(err, LLM_EFORMAT, "%s: "
                               "tokenizer.ggml.tokens[%llu] is unreadable",
                               t->source, (unsigned long long) i);
        }
        src.text[i] = s.p;
        /* llama.cpp reads each text as a C string: it ends at a NUL */
        src.len[i] = (uint32_t) strnlen(s.p, (size_t) s.n);
        src.attr[i] = TOK_NORMAL;
        if (ktype != NULL) {
            if (gguf_arr_int(ktype, i, &v) != 0) {
                tok_src_free(&src);
                return llm_err_set(err, LLM_EFORMAT, "%s: "
                                   "tokenizer.ggml.token_type[%llu] is "
                                   "unreadable", t->source,
                                   (unsigned long long) i);
            }
            src.attr[i] = tok_attr_from_type(v);
        }
    }
    rc = tok_build_vocab(t, &src, err);
    tok_src_free(&src);
    if (rc != 0) {
        return rc;
    }

    if (t->spm) {
        if ((rc = spm_load_scores(t, g, err)) != 0) {
            return rc;
        }
    } else if ((rc = tok_merges_alloc(t, kmerge->arr_n, err)) != 0) {
        return rc;
    }
    for (i = 0; kmerge != NULL && i < kmerge->arr_n; i++) {
        if (llm_gguf_arr_str(kmerge, i, &s) != 0) {
            return llm_err_set(err, LLM_EFORMAT, "%s: "
                               "tokenizer.ggml.merges[%llu] is unreadable",
                               t->source, (unsigned long long) i);
        }
        /* llama.cpp splits at the first space after the first byte */
        for (sp = 1; sp < s.n && s.p[sp] != ' '; sp++) {
            /* find */
        }
        if (s.n < 3 || sp >= s.n) {
            return llm_err_set(err, LLM_EFORMAT, "%s: "
                               "tokenizer.ggml.merges[%llu] \"%.*s\" is not "
                               "\"left right\"", t->source,
                               (unsigned long long) i,
                               (int) (s.n > 64 ? 64 : s.n), s.p);
        }
        rc = tok_add_merge(t, s.p, sp, s.p + sp + 1, s.n - sp - 1,
                           (int32_t) i, "tokenizer.ggml.merges", err);
        if (rc != 0) {
            return rc;
        }
    }

    rc = llm_gguf_get_str(g, "tokenizer.ggml.pre", &s, err);
    if (t->spm) {
        /* llama.cpp's SPM defaults: no pre-tokenizer, BOS added, ids
         * 1 (BOS), 2 (EOS) and 0 (unknown) unless the file says */
        tok_set_pre_spm(t);
        add_bos = 1;
        space = 1;
        t->bos = t->n_vocab > 1 ? 1 : -1;
        t->eos = t->n_vocab > 2 ? 2 : -1;
        t->unk = 0;
        if ((rc = gguf_bool(g, "tokenizer.ggml.add_space_prefix", &space,
                            err)) != 0)
        {
            return rc;
        }
        t->spm_prefix = space ? SPM_PREFIX_EACH : SPM_PREFIX_NONE;
    } else if (rc == LLM_ENOTFOUND) {
        add_bos = tok_set_pre(t, "default", 7);
    } else if (rc != 0) {
        return rc;
    } else {
        add_bos = tok_set_pre(t, s.p, (size_t) s.n);
    }
    t->add_bos = add_bos;
    t->add_eos = 0;

    if ((rc = gguf_special_id(t, g, "tokenizer.ggml.bos_token_id", &t->bos,
                              err)) != 0
        || (rc = gguf_special_id(t, g, "tokenizer.ggml.eos_token_id",
                                 &t->eos, err)) != 0
        || (rc = gguf_special_id(t, g, "tokenizer.ggml.eot_token_id",
                                 &t->eot, err)) != 0
        || (rc = gguf_special_id(t, g, "tokenizer.ggml.eom_token_id",
                                 &t->eom, err)) != 0
        || (rc = gguf_special_id(t, g, "tokenizer.ggml.unknown_token_id",
                                 &t->unk, err)) != 0
        || (rc = gguf_special_id(t, g, "tokenizer.ggml.padding_token_id",
                                 &t->pad, err)) != 0
        || (rc = gguf_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos,
                           err)) != 0
        || (rc = gguf_bool(g, "tokenizer.ggml.add_eos_token", &t->add_eos,
                           err)) != 0)
    {
        return rc;
    }
    {
        /* explicit FIM ids count as end of generation too */
        static const char *const fim_keys[] = {
            "tokenizer.ggml.fim_pad_token_id",
            "tokenizer.ggml.fim_rep_token_id",
            "tokenizer.ggml.fim_sep_token_id", NULL
        };
        int32_t fid;
        int     k;

        for (k = 0; fim_keys[k] != NULL; k++) {
            fid = -1;
            if ((rc = gguf_special_id(t, g, fim_keys[k], &fid, err)) != 0) {
                return rc;
            }
            if (fid >= 0) {
                t->attr[fid] |= TOK_EOG;
            }
        }
    }
    if (t->add_bos && t->bos < 0) {
        return llm_err_set(err, LLM_EFORMAT, "%s: "
                           "tokenizer.ggml.add_bos_token is true but "
                           "tokenizer.ggml.bos_token_id is not set",
                           t->source);
    }
    if (t->add_eos && t->eos < 0) {
        return llm_err_set(err, LLM_EFORMAT, "%s: "
                           "tokenizer.ggml.add_eos_token is true but "
                           "tokenizer.ggml.eos_token_id is not set",
                           t->source);
    }

    rc = llm_gguf_get_str(g, "tokenizer.chat_template", &s, err);
    if (rc == 0) {
        t->chat_template = llm_malloc((size_t) s.n + 1);
        if (t->chat_template == NULL) {
            return llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                               t->source);
        }
        memcpy(t->chat_template, s.p, (size_t) s.n);
        t->chat_template[s.n] = '\0';
    } else if (rc != LLM_ENOTFOUND) {
        return rc;
    }

    if ((rc = tok_finalize(t, err)) != 0) {
        return rc;
    }

    /* llama.cpp's Phi-3 rule: its special tokens swallow the whitespace
     * that follows them */
    if (llm_gguf_get_str(g, "general.name", &name, NULL) == 0) {
        char low[128];
        size_t k;

        llm_str_cstr(name, low, sizeof(low));
        for (k = 0; low[k]; k++) {
            if (low[k] >= 'A' && low[k] <= 'Z') {
                low[k] = (char) (low[k] + 32);
            }
        }
        if (strstr(low, "phi-3") != NULL || strstr(low, "phi3") != NULL) {
            static const char *const keep[] = { "<unk>", "<s>",
                                                "<|endoftext|>", NULL };
            int32_t id;
            int     k2;

            for (k2 = 0; k2 < t->n_special; k2++) {
                t->attr[t->special[k2]] |= TOK_RSTRIP;
            }
            id = tok_lookup(t, "</s>", 4);
            if (id >= 0) {
                t->attr[id] |= TOK_RSTRIP;
            }
            for (k2 = 0; keep[k2] != NULL; k2++) {
                id = tok_lookup(t, keep[k2], strlen(keep[k2]));
                if (id >= 0) {
                    t->attr[id] &= (uint16_t) ~TOK_RSTRIP;
                }
            }
        }
    }
    return 0;
}


llm_tokenizer *
llm_tokenizer_from_gguf(const llm_gguf *g, llm_err *err)
{
    llm_tokenizer *t;

    if (g == NULL) {
        llm_err_set(err, LLM_EINVAL, "tokenizer: no GGUF file given");
        return NULL;
    }
    t = tok_new(g->path);
    if (t == NULL) {
        llm_err_set(err, LLM_ENOMEM, "%s: out of memory", g->path);
        return NULL;
    }
    if (tok_load_gguf(t, g, err) != 0) {
        llm_tokenizer_free(t);
        return NULL;
    }
    return t;
}


/* ---------------------------------------------------------------------
 * Loading from Hugging Face tokenizer.json (+ tokenizer_config.json)
 * --------------------------------------------------------------------- */

/* The Split patterns of the supported families, as tokenizer.json
 * writes them. */
static const char hf_llama3_re[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
static const char hf_qwen2_re[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
static const char hf_gpt2_re[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|"
    "\\s+(?!\\S)|\\s+";


static const char *
json_str(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);

    return json_is_string(v) ? json_string_value(v) : NULL;
}


static int
json_flag(json_t *o, const char *key, int dflt)
{
    json_t *v = json_object_get(o, key);

    return json_is_boolean(v) ? json_is_true(v) : dflt;
}


static int
hf_is_bytelevel(json_t *p, int *use_regex)
{
    const char *type = json_str(p, "type");

    if (type == NULL || strcmp(type, "ByteLevel") != 0) {
        return 0;
    }
    *use_regex = json_flag(p, "use_regex", 1);
    return json_flag(p, "add_prefix_space", 0) ? -1 : 1;
}


/* Recognises the pre_tokenizer; returns the llama.cpp name of the family
 * or NULL (the caller falls back to GPT-2 and flags it). */
static const char *
hf_pre_name(json_t *pre)
{
    const char *type;
    json_t     *seq, *a, *b, *pat;
    int         re_a = 0, re_b = 0;
    const char *rx;

    if (pre == NULL || json_is_null(pre)) {
        return NULL;
    }
    if (hf_is_bytelevel(pre, &re_a) == 1) {
        return re_a ? "gpt2" : NULL;
    }
    type = json_str(pre, "type");
    if (type == NULL || strcmp(type, "Sequence") != 0) {
        return NULL;
    }
    seq = json_object_get(pre, "pretokenizers");
    if (!json_is_array(seq) || json_array_size(seq) != 2) {
        return NULL;
    }
    a = json_array_get(seq, 0);
    b = json_array_get(seq, 1);
    if (hf_is_bytelevel(b, &re_b) != 1) {
        return NULL;
    }
    type = json_str(a, "type");
    if (type == NULL) {
        return NULL;
    }
    if (strcmp(type, "Digits") == 0) {
        return json_flag(a, "individual_digits", 0) && re_b ? "smollm"
                                                            : NULL;
    }
    if (strcmp(type, "Split") != 0 || re_b
        || json_flag(a, "invert", 0)
        || json_str(a, "behavior") == NULL
        || strcmp(json_str(a, "behavior"), "Isolated") != 0)
    {
        return NULL;
    }
    pat = json_object_get(a, "pattern");
    rx = json_str(pat, "Regex");
    if (rx == NULL) {
        return NULL;
    }
    if (strcmp(rx, hf_llama3_re) == 0) {
        return "llama-bpe";
    }
    if (strcmp(rx, hf_qwen2_re) == 0) {
        return "qwen2";
    }
    if (strcmp(rx, hf_gpt2_re) == 0) {
        return "gpt2";
    }
    return NULL;
}


/* tokenizer.json's view of "looks special" (llama.cpp's converter). */
static int
hf_looks_special(const char *s)
{
    size_t n = strlen(s);

    if (strcmp(s, "<pad>") == 0 || strcmp(s, "<mask>") == 0
        || strcmp(s, "<2mass>") == 0 || strcmp(s, "[@BOS@]") == 0)
    {
        return 1;
    }
    if (n >= 4 && memcmp(s, "<|", 2) == 0 && memcmp(s + n - 2, "|>", 2) == 0)
    {
        return 1;
    }
    if (n >= 8 && memcmp(s, "<\xef\xbd\x9c", 4) == 0
        && memcmp(s + n - 4, "\xef\xbd\x9c>", 4) == 0)
    {
        return 1;
    }
    return n >= 8 && memcmp(s, "<unused", 7) == 0 && s[n - 1] == '>';
}


/* bos_token / eos_token in tokenizer_config.json: a string or
 * {"content": ...}. */
static const char *
hf_token_text(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);

    if (json_is_string(v)) {
        return json_string_value(v);
    }
    if (json_is_object(v)) {
        return json_str(v, "content");
    }
    return NULL;
}


static char *
read_text_file(const char *path)
{
    FILE  *f = fopen(path, "rb");
    char  *buf;
    long   n;

    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0
        || fseek(f, 0, SEEK_SET) != 0)
    {
        fclose(f);
        return NULL;
    }
    buf = llm_malloc((size_t) n + 1);
    if (buf != NULL) {
        if (fread(buf, 1, (size_t) n, f) != (size_t) n) {
            llm_free(buf);
            buf = NULL;
        } else {
            buf[n] = '\0';
        }
    }
    fclose(f);
    return buf;
}


static int
hf_load_config(llm_tokenizer *t, const char *dir, json_t *root,
               llm_err *err)
{
    char        path[4096];
    json_t     *cfg, *ct, *post, *single, *first;
    json_error_t jerr;
    const char *s;
    int32_t     id;
    size_t      i;

    /* add_bos default from the post-processor ("single" starting with a
     * special token, as Llama 3's TemplateProcessing) */
    post = json_object_get(root, "post_processor");
    if (json_is_object(post) && json_str(post, "type") != NULL
        && strcmp(json_str(post, "type"), "TemplateProcessing") == 0)
    {
        single = json_object_get(post, "single");
        first = json_array_get(single, 0);
        s = json_str(json_object_get(first, "SpecialToken"), "id");
        if (s != NULL && (id = tok_lookup(t, s, strlen(s))) >= 0) {
            t->add_bos = 1;
            t->bos = id;
        }
    }

    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    cfg = json_load_file(path, 0, &jerr);
    if (cfg == NULL) {
        struct stat st;

        if (stat(path, &st) == 0) {
            return llm_err_set(err, LLM_EFORMAT, "%s: line %d: %s", path,
                               jerr.line, jerr.text);
        }
    } else {
        if ((s = hf_token_text(cfg, "bos_token")) != NULL) {
            id = tok_lookup(t, s, strlen(s));
            if (id >= 0) {
                t->bos = id;
            }
        }
        if ((s = hf_token_text(cfg, "eos_token")) != NULL) {
            id = tok_lookup(t, s, strlen(s));
            if (id >= 0) {
                t->eos = id;
            }
        }
        if ((s = hf_token_text(cfg, "unk_token")) != NULL) {
            t->unk = tok_lookup(t, s, strlen(s));
        }
        if ((s = hf_token_text(cfg, "pad_token")) != NULL) {
            t->pad = tok_lookup(t, s, strlen(s));
        }
        t->add_bos = json_flag(cfg, "add_bos_token", t->add_bos);
        t->add_eos = json_flag(cfg, "add_eos_token", t->add_eos);

        ct = json_object_get(cfg, "chat_template");
        s = NULL;
        if (json_is_string(ct)) {
            s = json_string_value(ct);
        } else if (json_is_array(ct)) {
            /* [{"name": "default", "template": ...}, ...] */
            for (i = 0; i < json_array_size(ct); i++) {
                json_t *e = json_array_get(ct, i);
                const char *nm = json_str(e, "name");

                if (nm != NULL && strcmp(nm, "default") == 0) {
                    s = json_str(e, "template");
                }
            }
        }
        if (s != NULL) {
            t->chat_template = llm_strdup(s);
            if (t->chat_template == NULL) {
                json_decref(cfg);
                return llm_err_set(err, LLM_ENOMEM, "%s: out of memory",
                                   path);
            }
        }
        json_decref(cfg);
    }
    if (t->chat_template == NULL) {
        snprintf(path, sizeof(path), "%s/chat_template.jinja", dir);
        t->chat_template = read_text_file(path);
    }
    if (t->add_bos && t->bos < 0) {
        t->add_bos = 0;
    }
    if (t->add_eos && t->eos < 0) {
        t->add_eos = 0;
    }
    return 0;
}


static int
hf_is_meta(const char *s)
{
    return s != NULL && strcmp(s, SPM_SPACE) == 0;
}


/* One normalizer of a SentencePiece-style tokenizer.json: Prepend U+2581
 * (the space prefix) or Replace " " by U+2581 (the escape); returns 0,
 * or -1 for anything else. */
static int
hf_spm_normalizer(llm_tokenizer *t, json_t *n, int *escape)
{
    const char *type = json_str(n, "type");

    if (type != NULL && strcmp(type, "Prepend") == 0
        && hf_is_meta(json_str(n, "prepend")))
    {
        t->spm_prefix = SPM_PREFIX_EACH;
        return 0;
    }
    if (type != NULL && strcmp(type, "Replace") == 0
        && json_str(json_object_get(n, "pattern"), "String") != NULL
        && strcmp(json_str(json_object_get(n, "pattern"), "String"), " ")
           == 0
        && hf_is_meta(json_str(n, "content")))
    {
        *escape = 1;
        return 0;
    }
    return -1;
}


/* Recognises SentencePiece-style BPE in a tokenizer.json (Llama 2,
 * Mistral, TinyLlama folders): byte_fallback, spaces as U+2581 through
 * the normalizer (Prepend + Replace) or a Metaspace pre-tokenizer.
 * Returns 1 and configures t, 0 for byte-level BPE, or an error for a
 * SentencePiece-style file with steps we do not implement. */
static int
hf_spm_config(llm_tokenizer *t, const char *path, json_t *root,
              json_t *model, llm_err *err)
{
    json_t     *norm = json_object_get(root, "normalizer");
    json_t     *pre = json_object_get(root, "pre_tokenizer");
    json_t     *e;
    const char *pt = json_str(pre, "type"), *nt = json_str(norm, "type");
    const char *scheme;
    int         escape = 0, bad = 0, meta;
    size_t      i;

    if (nt != NULL && strcmp(nt, "Sequence") == 0) {
        json_array_foreach(json_object_get(norm, "normalizers"), i, e) {
            bad |= hf_spm_normalizer(t, e, &escape);
        }
    } else if (nt != NULL) {
        bad |= hf_spm_normalizer(t, norm, &escape);
    }
    meta = pt != NULL && strcmp(pt, "Metaspace") == 0;
    if (!meta && !escape && t->spm_prefix == SPM_PREFIX_NONE
        && !json_flag(model, "byte_fallback", 0))
    {
        return 0;               /* byte-level (or not ours at all) */
    }
    t->spm = 1;
    t->spm_by_rank = 1;
    t->fuse_unk = json_flag(model, "fuse_unk", 0);
    if (bad) {
        return llm_err_set(err, LLM_EUNSUP, "%s: normalizer: only Prepend "
                           "and Replace of \" \" by U+2581 are supported "
                           "for SentencePiece-style BPE", path);
    }
    if (meta) {
        if (!hf_is_meta(json_str(pre, "replacement"))) {
            return llm_err_set(err, LLM_EUNSUP, "%s: pre_tokenizer "
                               "Metaspace: only the replacement U+2581 is "
                               "supported", path);
        }
        escape = 1;
        t->spm_split = json_flag(pre, "split", 1);
        scheme = json_str(pre, "prepend_scheme");
        if (scheme == NULL) {
            t->spm_prefix = json_flag(pre, "add_prefix_space", 1)
                            ? SPM_PREFIX_UNLESS_SPACE : SPM_PREFIX_NONE;
        } else if (strcmp(scheme, "always") == 0) {
            t->spm_prefix = SPM_PREFIX_UNLESS_SPACE;
        } else if (strcmp(scheme, "first") == 0) {
            t->spm_prefix = SPM_PREFIX_FIRST;
        } else if (strcmp(scheme, "never") == 0) {
            t->spm_prefix = SPM_PREFIX_NONE;
        } else {
            return llm_err_set(err, LLM_EFORMAT, "%s: pre_tokenizer "
                               "Metaspace: unknown prepend_scheme \"%.32s\"",
                               path, scheme);
        }
    } else if (pre != NULL && !json_is_null(pre)) {
        return llm_err_set(err, LLM_EUNSUP, "%s: pre_tokenizer \"%.32s\" "
                           "with SentencePiece-style BPE is not supported",
                           path, pt ? pt : "?");
    }
    if (!escape) {
        return llm_err_set(err, LLM_EUNSUP, "%s: SentencePiece-style BPE "
                           "that keeps spaces as they are is not supported",
                           path);
    }
    return 1;
}


static int
tok_load_hf(llm_tokenizer *t, const char *path, llm_err *err)
{
    json_t      *root, *model, *vocab, *merges, *added, *v, *e;
    json_error_t jerr;
    tok_src      src = { 0 };
    const char  *key, *type, *pre, *a, *b, *sp;
    char        *dir = NULL, *slash, pad[32];
    char        *pads = NULL;
    int64_t      maxid = -1, id;
    size_t       i, alen, blen, padlen = 0;
    int          rc = 0;

    root = json_load_file(path, 0, &jerr);
    if (root == NULL) {
        return llm_err_set(err, LLM_EFORMAT, "%s: line %d: %s", path,
                           jerr.line, jerr.text);
    }
    model = json_object_get(root, "model");
    vocab = json_object_get(model, "vocab");
    merges = json_object_get(model, "merges");
    added = json_object_get(root, "added_tokens");
    type = json_str(model, "type");
    if (!json_is_object(model)) {
        rc = llm_err_set(err, LLM_EFORMAT, "%s: no \"model\" object", path);
        goto done;
    }
    if (type != NULL && strcmp(type, "BPE") != 0) {
        rc = llm_err_set(err, LLM_EUNSUP, "%s: model.type \"%s\" is not "
                         "supported; only byte-level BPE is", path, type);
        goto done;
    }
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        rc = llm_err_set(err, LLM_EFORMAT, "%s: model.vocab or model.merges "
                         "missing or malformed", path);
        goto done;
    }
    if ((rc = hf_spm_config(t, path, root, model, err)) < 0) {
        goto done;
    }
    rc = 0;
    {
        json_t     *dec = json_object_get(root, "decoder");
        json_t     *prej = json_object_get(root, "pre_tokenizer");
        const char *dt = json_str(dec, "type");
        int         ur;

        if (!t->spm && dt != NULL && strcmp(dt, "ByteLevel") != 0
            && hf_is_bytelevel(prej, &ur) == 0)
        {
            rc = llm_err_set(err, LLM_EUNSUP, "%s: decoder \"%.32s\" "
                             "without a ByteLevel pre-tokenizer: neither "
                             "byte-level nor SentencePiece-style BPE", path,
                             dt);
            goto done;
        }
    }

    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0
            || json_integer_value(v) >= INT32_MAX - 1)
        {
            rc = llm_err_set(err, LLM_EFORMAT, "%s: model.vocab[\"%.64s\"] "
                             "is not a valid id", path, key);
            goto done;
        }
        if (json_integer_value(v) > maxid) {
            maxid = json_integer_value(v);
        }
    }
    json_array_foreach(added, i, e) {
        v = json_object_get(e, "id");
        if (!json_is_integer(v) || json_integer_value(v) < 0
            || json_integer_value(v) >= INT32_MAX - 1
            || json_str(e, "content") == NULL)
        {
            rc = llm_err_set(err, LLM_EFORMAT, "%s: added_tokens[%zu] has "
                             "no valid id/content", path, i);
            goto done;
        }
        if (json_integer_value(v) > maxid) {
            maxid = json_integer_value(v);
        }
    }
    if (maxid < 0) {
        rc = llm_err_set(err, LLM_EFORMAT, "%s: empty vocabulary", path);
        goto done;
    }
    if (tok_src_alloc(&src, (int32_t) (maxid + 1)) != 0) {
        rc = llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    json_object_foreach(vocab, key, v) {
        id = json_integer_value(v);
        src.text[id] = key;
        src.len[id] = (uint32_t) strlen(key);
        /* SentencePiece-style: <0xXX> are byte tokens (the ByteFallback
         * decoder turns them into their byte) */
        src.attr[id] = t->spm && tok_hex_byte(key, strlen(key)) >= 0
                       ? TOK_BYTE : TOK_NORMAL;
    }
    json_array_foreach(added, i, e) {
        const char *c = json_str(e, "content");

        id = json_integer_value(json_object_get(e, "id"));
        src.text[id] = c;
        src.len[id] = (uint32_t) strlen(c);
        src.attr[id] = (json_flag(e, "special", 0) || hf_looks_special(c))
                       ? TOK_CONTROL : TOK_USER;
        if (json_flag(e, "lstrip", 0)) {
            src.attr[id] |= TOK_LSTRIP;
        }
        if (json_flag(e, "rstrip", 0)) {
            src.attr[id] |= TOK_RSTRIP;
        }
    }
    /* ids nobody names become "[PAD<id>]" (llama.cpp's converter) */
    for (id = 0; id <= maxid; id++) {
        if (src.text[id] == NULL) {
            padlen += (size_t) snprintf(pad, sizeof(pad), "[PAD%lld]",
                                        (long long) id) + 1;
        }
    }
    if (padlen > 0) {
        char *p;

        pads = llm_malloc(padlen);
        if (pads == NULL) {
            rc = llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
            goto done;
        }
        p = pads;
        for (id = 0; id <= maxid; id++) {
            if (src.text[id] == NULL) {
                int n = sprintf(p, "[PAD%lld]", (long long) id);

                src.text[id] = p;
                src.len[id] = (uint32_t) n;
                src.attr[id] = TOK_UNUSED;
                p += n + 1;
            }
        }
    }
    if ((rc = tok_build_vocab(t, &src, err)) != 0) {
        goto done;
    }

    if ((rc = tok_merges_alloc(t, json_array_size(merges), err)) != 0) {
        goto done;
    }
    json_array_foreach(merges, i, e) {
        if (json_is_string(e)) {
            a = json_string_value(e);
            sp = strchr(a + (a[0] != '\0'), ' ');
            if (sp == NULL) {
                rc = llm_err_set(err, LLM_EFORMAT, "%s: model.merges[%zu] "
                                 "\"%.64s\" is not \"left right\"", path, i,
                                 a);
                goto done;
            }
            alen = (size_t) (sp - a);
            b = sp + 1;
            blen = strlen(b);
        } else if (json_is_array(e) && json_array_size(e) == 2
                   && json_is_string(json_array_get(e, 0))
                   && json_is_string(json_array_get(e, 1)))
        {
            a = json_string_value(json_array_get(e, 0));
            b = json_string_value(json_array_get(e, 1));
            alen = strlen(a);
            blen = strlen(b);
        } else {
            rc = llm_err_set(err, LLM_EFORMAT, "%s: model.merges[%zu] is "
                             "neither \"a b\" nor [a, b]", path, i);
            goto done;
        }
        rc = tok_add_merge(t, a, alen, b, blen, (int32_t) i, "model.merges",
                           err);
        if (rc != 0) {
            goto done;
        }
    }

    pre = hf_pre_name(json_object_get(root, "pre_tokenizer"));
    if (t->spm) {
        tok_set_pre_spm(t);
        key = json_str(model, "unk_token");
        t->unk = key != NULL ? tok_lookup(t, key, strlen(key)) : -1;
    } else if (pre == NULL) {
        tok_set_pre(t, "tokenizer.json", 14);
    } else {
        tok_set_pre(t, pre, strlen(pre));
    }
    t->ignore_merges = json_flag(model, "ignore_merges", 0);
    t->add_bos = 0;

    dir = llm_strdup(path);
    if (dir == NULL) {
        rc = llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    slash = strrchr(dir, '/');
    if (slash != NULL) {
        *slash = '\0';
    } else {
        strcpy(dir, ".");
    }
    if ((rc = hf_load_config(t, dir, root, err)) != 0) {
        goto done;
    }
    rc = tok_finalize(t, err);

done:
    llm_free(dir);
    llm_free(pads);
    tok_src_free(&src);
    json_decref(root);
    return rc;
}


llm_tokenizer *
llm_tokenizer_load(const char *path, llm_err *err)
{
    struct stat    st;
    llm_tokenizer *t;
    llm_gguf      *g;
    char          *json_path = NULL;
    char           magic[4] = { 0 };
    FILE          *f;
    int            rc;

    if (path == NULL) {
        llm_err_set(err, LLM_EINVAL, "tokenizer: no path given");
        return NULL;
    }
    if (stat(path, &st) != 0) {
        llm_err_set(err, LLM_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (S_ISDIR(st.st_mode)) {
        size_t n = strlen(path) + sizeof("/tokenizer.json");

        json_path = llm_malloc(n);
        if (json_path == NULL) {
            llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
            return NULL;
        }
        snprintf(json_path, n, "%s/tokenizer.json", path);
    } else {
        f = fopen(path, "rb");
        if (f == NULL) {
            llm_err_set(err, LLM_EIO, "%s: %s", path, strerror(errno));
            return NULL;
        }
        if (fread(magic, 1, 4, f) != 4) {
            memset(magic, 0, 4);
        }
        fclose(f);
        if (memcmp(magic, "GGUF", 4) == 0) {
            g = llm_gguf_open(path, err);
            if (g == NULL) {
                return NULL;
            }
            t = llm_tokenizer_from_gguf(g, err);
            llm_gguf_close(g);
            return t;
        }
        json_path = llm_strdup(path);
        if (json_path == NULL) {
            llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
            return NULL;
        }
    }

    t = tok_new(json_path);
    if (t == NULL) {
        llm_free(json_path);
        llm_err_set(err, LLM_ENOMEM, "%s: out of memory", path);
        return NULL;
    }
    rc = tok_load_hf(t, json_path, err);
    llm_free(json_path);
    if (rc != 0) {
        llm_tokenizer_free(t);
        return NULL;
    }
    return t;
}


/* ---------------------------------------------------------------------
 * Accessors
 * --------------------------------------------------------------------- */

int
llm_tokenizer_n_vocab(const llm_tokenizer *t)
{
    return t->n_vocab;
}


int
llm_tokenizer_bos(const llm_tokenizer *t)
{
    return t->bos;
}


int
llm_tokenizer_eos(const llm_tokenizer *t)
{
    return t->eos;
}


int
llm_tokenizer_eot(const llm_tokenizer *t)
{
    return t->eot;
}


int
llm_tokenizer_add_bos(const llm_tokenizer *t)
{
    return t->add_bos;
}


int
llm_tokenizer_is_eog(const llm_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && (t->attr[id] & TOK_EOG) != 0;
}


const char *
llm_tokenizer_chat_template(const llm_tokenizer *t)
{
    return t->chat_template;
}


int32_t
llm_tokenizer_find(const llm_tokenizer *t, const char *text)
{
    if (text == NULL) {
        return -1;
    }
    return tok_lookup(t, text, strlen(text));
}


int
llm_tokenizer_set_pre(llm_tokenizer *t, const char *name)
{
    tok_set_pre(t, name, strlen(name));
    return t->pre_fallback ? LLM_ENOTFOUND : 0;
}


const char *
llm_tokenizer_pre_name(const llm_tokenizer *t)
{
    return t->pre_name;
}


int
llm_tokenizer_pre_fallback(const llm_tokenizer *t)
{
    return t->pre_fallback;
}


int
llm_tokenizer_describe(const llm_tokenizer *t, char *buf, size_t cap)
{
    if (t->spm) {
        return snprintf(buf, cap, "SentencePiece (%s), %d tokens%s",
                        t->spm_by_rank ? "BPE by merge rank"
                                       : "merges by score",
                        (int) t->n_vocab, t->add_bos ? ", BOS added" : "");
    }
    if (t->pre_fallback) {
        return snprintf(buf, cap, "byte-level BPE, %d tokens; pre-tokenizer "
                        "\"%s\" is not one we implement: GPT-2's split "
                        "stands in, so ids may differ from the model's own",
                        (int) t->n_vocab, t->pre_name);
    }
    return snprintf(buf, cap, "byte-level BPE, pre-tokenizer %s, %d tokens%s",
                    t->pre_name, (int) t->n_vocab,
                    t->add_bos ? ", BOS added" : "");
}


int
llm_tokenizer_is_control(const llm_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab
           && (t->attr[id] & (TOK_CONTROL | TOK_UNKNOWN)) != 0;
}


/* ---------------------------------------------------------------------
 * Encoding workspace
 * --------------------------------------------------------------------- */

typedef struct {
    int32_t id;
    int32_t prev;
    int32_t next;
} tok_sym;

/* A candidate merge of adjacent symbols left and right.  BPE: lid and
 * rid are their token ids when queued; SentencePiece: their byte
 * lengths.  Either way a popped pair whose sides changed is stale. */
typedef struct {
    int32_t rank;
    int32_t left;
    int32_t right;
    int32_t lid;
    int32_t rid;
} tok_pair;

/* A SentencePiece symbol: bytes [off, off + n) of the escaped text;
 * n == 0 once merged into its left neighbour. */
typedef struct {
    int32_t off;
    int32_t n;
    int32_t prev;
    int32_t next;
} spm_sym;

typedef struct {
    const llm_tokenizer *t;
    int32_t    *out;
    int         cap;
    int64_t     n;

    uint32_t   *cpt;            /* [ncpt] code points of the fragment */
    uint16_t   *fl;             /* [ncpt] their flags */
    size_t      cpt_cap;
    size_t      fl_cap;

    uint8_t    *bytes;          /* a word's UTF-8 */
    size_t      bytes_cap;
    char       *mapped;         /* the word through bytes_to_unicode */
    size_t      mapped_cap;
    tok_sym    *sym;
    size_t      sym_cap;
    spm_sym    *ssym;
    size_t      ssym_cap;
    tok_pair   *heap;
    size_t      heap_n;
    size_t      heap_cap;

    const uint8_t *stages;
    int         rc;
} tok_ws;


static int
ws_grow(void **p, size_t *cap, size_t need, size_t elem)
{
    size_t n;
    void  *q;

    if (need <= *cap) {
        return 0;
    }
    n = *cap ? *cap : 64;
    while (n < need) {
        n *= 2;
    }
    q = llm_realloc(*p, n * elem);
    if (q == NULL) {
        return LLM_ENOMEM;
    }
    *p = q;
    *cap = n;
    return 0;
}


/* Room for n symbols in *arr (elem bytes each) and for the merge heap
 * they start with (every adjacent pair, 2n + 2 with slack). */
static int
ws_reserve(tok_ws *ws, void **arr, size_t *cap, size_t n, size_t elem)
{
    if (n > INT32_MAX / 2 || ws_grow(arr, cap, n, elem) != 0
        || ws_grow((void **) &ws->heap, &ws->heap_cap, 2 * n + 2,
                   sizeof(tok_pair)) != 0)
    {
        return LLM_ENOMEM;
    }
    return 0;
}


/* Room for the two pairs a merge may queue: the heap holds at most one
 * live entry per adjacent pair plus stale ones. */
static int
ws_heap_room(tok_ws *ws)
{
    if (ws->heap_n + 2 > ws->heap_cap
        && ws_grow((void **) &ws->heap, &ws->heap_cap, ws->heap_n + 2,
                   sizeof(tok_pair)) != 0)
    {
        return LLM_ENOMEM;
    }
    return 0;
}


static void
ws_free(tok_ws *ws)
{
    llm_free(ws->cpt);
    llm_free(ws->fl);
    llm_free(ws->bytes);
    llm_free(ws->mapped);
    llm_free(ws->sym);
    llm_free(ws->ssym);
    llm_free(ws->heap);
}


static inline void
ws_push(tok_ws *ws, int32_t id)
{
    if (ws->n < ws->cap) {
        ws->out[ws->n] = id;
    }
    ws->n++;
}


/* ---------------------------------------------------------------------
 * BPE
 * --------------------------------------------------------------------- */

static inline int
pair_less(const tok_pair *a, const tok_pair *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}


static void
heap_push(tok_ws *ws, const tok_pair *p)
{
    tok_pair *h = ws->heap;
    size_t    i = ws->heap_n++, parent;

    while (i > 0) {
        parent = (i - 1) / 2;
        if (!pair_less(p, &h[parent])) {
            break;
        }
        h[i] = h[parent];
        i = parent;
    }
    h[i] = *p;
}


static tok_pair
heap_pop(tok_ws *ws)
{
    tok_pair *h = ws->heap;
    tok_pair  top = h[0], last = h[--ws->heap_n];
    size_t    i = 0, c, n = ws->heap_n;

    for (;;) {
        c = 2 * i + 1;
        if (c >= n) {
            break;
        }
        if (c + 1 < n && pair_less(&h[c + 1], &h[c])) {
            c++;
        }
        if (!pair_less(&h[c], &last)) {
            break;
        }
        h[i] = h[c];
        i = c;
    }
    if (n > 0) {
        h[i] = last;
    }
    return top;
}


static void
bpe_try_pair(tok_ws *ws, int32_t left, int32_t right)
{
    const tok_merge *m;
    tok_pair         p;

    if (left < 0 || right < 0) {
        return;
    }
    if (ws->sym[left].id < 0 || ws->sym[right].id < 0) {
        return;
    }
    m = tok_merge_find(ws->t, ws->sym[left].id, ws->sym[right].id);
    if (m == NULL) {
        return;
    }
    p.rank = m->rank;
    p.left = left;
    p.right = right;
    p.lid = ws->sym[left].id;
    p.rid = ws->sym[right].id;
    heap_push(ws, &p);
}


/* A symbol whose character is not in the vocabulary: llama.cpp looks up
 * each byte of its text as a one-byte token and drops the misses. */
static void
bpe_push_unknown(tok_ws *ws, uint8_t byte)
{
    char    enc[4];
    int     n, k;
    int32_t id;

    n = llm_utf8_encode(ws->t->byte_cp[byte], enc);
    for (k = 0; k < n; k++) {
        id = tok_lookup(ws->t, enc + k, 1);
        if (id >= 0) {
            ws_push(ws, id);
        }
    }
}


static int bpe_merge(tok_ws *ws, int32_t n);


static int
bpe_word(tok_ws *ws, const uint8_t *w, size_t n)
{
    const llm_tokenizer *t = ws->t;
    size_t               i, o;
    int32_t              id, k;

    if (n == 0) {
        return 0;
    }
    if (t->ignore_merges) {
        /* a word that is a token as a whole is taken as is */
        if (ws_grow((void **) &ws->mapped, &ws->mapped_cap, 2 * n, 1) != 0) {
            return LLM_ENOMEM;
        }
        for (i = 0, o = 0; i < n; i++) {
            o += (size_t) llm_utf8_encode(t->byte_cp[w[i]], ws->mapped + o);
        }
        id = tok_lookup(t, ws->mapped, o);
        if (id >= 0) {
            ws_push(ws, id);
            return 0;
        }
    }
    if (n == 1) {
        if (t->byte_tok[w[0]] >= 0) {
            ws_push(ws, t->byte_tok[w[0]]);
        } else {
            bpe_push_unknown(ws, w[0]);
        }
        return 0;
    }
    if (ws_reserve(ws, (void **) &ws->sym, &ws->sym_cap, n,
                   sizeof(tok_sym)) != 0)
    {
        return LLM_ENOMEM;
    }
    for (i = 0; i < n; i++) {
        ws->sym[i].id = t->byte_tok[w[i]];
        ws->sym[i].prev = (int32_t) i - 1;
        ws->sym[i].next = i + 1 < n ? (int32_t) i + 1 : -1;
    }
    if (bpe_merge(ws, (int32_t) n) != 0) {
        return LLM_ENOMEM;
    }
    for (k = 0; k >= 0; k = ws->sym[k].next) {
        if (ws->sym[k].id >= 0) {
            ws_push(ws, ws->sym[k].id);
        } else {
            bpe_push_unknown(ws, w[k]);
        }
    }
    return 0;
}


/* Merges the linked symbols ws->sym[0, n) (token ids, -1 for none) by
 * merge rank, lowest first, leftmost on ties; the heap has room for
 * 2n + 2 entries. */
static int
bpe_merge(tok_ws *ws, int32_t n)
{
    const tok_merge *m;
    tok_pair         p;
    int32_t          i;

    ws->heap_n = 0;
    for (i = 1; i < n; i++) {
        bpe_try_pair(ws, i - 1, i);
    }

    while (ws->heap_n > 0) {
        p = heap_pop(ws);

        /* stale if either side was merged away or changed since */
        if (ws->sym[p.left].id != p.lid || ws->sym[p.right].id != p.rid
            || ws->sym[p.left].next != p.right)
        {
            continue;
        }
        m = tok_merge_find(ws->t, p.lid, p.rid);
        ws->sym[p.left].id = m->result;
        ws->sym[p.left].next = ws->sym[p.right].next;
        if (ws->sym[p.right].next >= 0) {
            ws->sym[ws->sym[p.right].next].prev = p.left;
        }
        ws->sym[p.right].id = -2;           /* dead */
        ws->sym[p.right].next = -1;

        if (ws_heap_room(ws) != 0) {
            return LLM_ENOMEM;
        }
        bpe_try_pair(ws, ws->sym[p.left].prev, p.left);
        bpe_try_pair(ws, p.left, ws->sym[p.left].next);
    }
    return 0;
}


/* Encodes code points [a, b) of the fragment as one word. */
static int
word_emit(tok_ws *ws, size_t a, size_t b)
{
    size_t i, o = 0;

    if (b <= a) {
        return 0;
    }
    if (ws_grow((void **) &ws->bytes, &ws->bytes_cap, 4 * (b - a), 1) != 0) {
        return LLM_ENOMEM;
    }
    for (i = a; i < b; i++) {
        o += (size_t) llm_utf8_encode(ws->cpt[i], (char *) ws->bytes + o);
    }
    return bpe_word(ws, ws->bytes, o);
}


/* ---------------------------------------------------------------------
 * Pre-tokenizers
 *
 * Each stage scans the code points [a, b) of one piece from the previous
 * stage and hands its own pieces to the next stage (or to BPE after the
 * last).  Positions outside [a, b) read as "no code point" (flags 0), as
 * in llama.cpp's scanners.
 * --------------------------------------------------------------------- */

#define OUT_OF_RANGE  0xFFFFFFFFu

static int split_piece(tok_ws *ws, int stage, size_t a, size_t b);


static inline uint32_t
cp_at(const tok_ws *ws, size_t pos, size_t a, size_t b)
{
    return pos >= a && pos < b ? ws->cpt[pos] : OUT_OF_RANGE;
}


static inline unsigned
fl_at(const tok_ws *ws, size_t pos, size_t a, size_t b)
{
    return pos >= a && pos < b ? ws->fl[pos] : 0;
}


#define IS_L(f)   ((f) & LLM_U_LETTER)
#define IS_N(f)   ((f) & LLM_U_NUMBER)
#define IS_WS(f)  ((f) & LLM_U_SPACE)

/* Emits [start, end) to the next stage; evaluates to nonzero on error. */
#define EMIT(start, end)                                                    \
    (((end) > (start)) ? split_piece(ws, stage + 1, (start), (end)) : 0)


/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static int
scan_gpt2(tok_ws *ws, int stage, size_t a, size_t b)
{
    size_t   pos = a, start, nws;
    uint32_t c, c1, c2;
    unsigned f, f2;
    int      rc;

    while (pos < b) {
        start = pos;
        c = ws->cpt[pos];
        f = ws->fl[pos];

        if (c == '\'' && pos + 1 < b) {
            c1 = ws->cpt[pos + 1];
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                pos += 2;
                if ((rc = EMIT(start, pos)) != 0) {
                    return rc;
                }
                continue;
            }
            if (pos + 2 < b) {
                c2 = ws->cpt[pos + 2];
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e')
                    || (c1 == 'l' && c2 == 'l'))
                {
                    pos += 3;
                    if ((rc = EMIT(start, pos)) != 0) {
                        return rc;
                    }
                    continue;
                }
            }
        }

        f2 = c == ' ' ? fl_at(ws, pos + 1, a, b) : f;
        if (IS_L(f2)) {
            pos += c == ' ';
            while (IS_L(f2)) {
                f2 = fl_at(ws, ++pos, a, b);
            }
        } else if (IS_N(f2)) {
            pos += c == ' ';
            while (IS_N(f2)) {
                f2 = fl_at(ws, ++pos, a, b);
            }
        } else if (!(f2 & (LLM_U_SPACE | LLM_U_LETTER | LLM_U_NUMBER))
                   && f2 != 0)
        {
            pos += c == ' ';
            while (!(f2 & (LLM_U_SPACE | LLM_U_LETTER | LLM_U_NUMBER))
                   && f2 != 0)
            {
                f2 = fl_at(ws, ++pos, a, b);
            }
        } else {
            nws = 0;
            while (IS_WS(fl_at(ws, pos + nws, a, b))) {
                nws++;
            }
            if (nws > 1 && pos + nws < b) {
                pos += nws - 1;                 /* \s+(?!\S) */
            } else if (nws > 0) {
                pos += nws;                     /* \s+ */
            } else {
                pos++;                          /* no match */
            }
        }
        if ((rc = EMIT(start, pos)) != 0) {
            return rc;
        }
    }
    return 0;
}


/* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,G}|
 *  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * with G = 3 (Llama 3) or 1 (Qwen2). */
static int
scan_llama3(tok_ws *ws, int stage, size_t a, size_t b, size_t group)
{
    size_t   pos = a, start, ini, nws, last_nl;
    uint32_t c, c1, c2;
    unsigned f, f2;
    int      rc;

    while (pos < b) {
        start = pos;
        c = ws->cpt[pos];
        f = ws->fl[pos];

        if (c == '\'' && pos + 1 < b) {
            c1 = llm_unicode_tolower(ws->cpt[pos + 1]);
            if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
                pos += 2;
                if ((rc = EMIT(start, pos)) != 0) {
                    return rc;
                }
                continue;
            }
            if (pos + 2 < b) {
                c2 = llm_unicode_tolower(ws->cpt[pos + 2]);
                if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e')
                    || (c1 == 'l' && c2 == 'l'))
                {
                    pos += 3;
                    if ((rc = EMIT(start, pos)) != 0) {
                        return rc;
                    }
                    continue;
                }
            }
        }

        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        if (!(c == '\r' || c == '\n' || IS_N(f))
            && (IS_L(f) || IS_L(fl_at(ws, pos + 1, a, b))))
        {
            pos++;
            while (IS_L(fl_at(ws, pos, a, b))) {
                pos++;
            }
            if ((rc = EMIT(start, pos)) != 0) {
                return rc;
            }
            continue;
        }

        /* \p{N}{1,G} */
        if (IS_N(f)) {
            ini = pos;
            while (IS_N(fl_at(ws, pos, a, b))) {
                pos++;
                if (pos - ini >= group) {
                    if ((rc = EMIT(ini, pos)) != 0) {
                        return rc;
                    }
                    ini = pos;
                }
            }
            if ((rc = EMIT(ini, pos)) != 0) {
                return rc;
            }
            continue;
        }

        /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
        f2 = c == ' ' ? fl_at(ws, pos + 1, a, b) : f;
        if (!(f2 & (LLM_U_SPACE | LLM_U_LETTER | LLM_U_NUMBER)) && f != 0) {
            pos += c == ' ';
            while (!(f2 & (LLM_U_SPACE | LLM_U_LETTER | LLM_U_NUMBER))
                   && f2 != 0)
            {
                f2 = fl_at(ws, ++pos, a, b);
            }
            c2 = cp_at(ws, pos, a, b);
            while (c2 == '\r' || c2 == '\n') {
                c2 = cp_at(ws, ++pos, a, b);
            }
            if ((rc = EMIT(start, pos)) != 0) {
                return rc;
            }
            continue;
        }

        nws = 0;
        last_nl = 0;
        while (IS_WS(fl_at(ws, pos + nws, a, b))) {
            c2 = ws->cpt[pos + nws];
            if (c2 == '\r' || c2 == '\n') {
                last_nl = pos + nws + 1;
            }
            nws++;
        }
        if (last_nl > 0) {
            pos = last_nl;                      /* \s*[\r\n]+ */
        } else if (nws > 1 && pos + nws < b) {
            pos += nws - 1;                     /* \s+(?!\S) */
        } else if (nws > 0) {
            pos += nws;                         /* \s+ */
        } else {
            pos++;                              /* no match */
        }
        if ((rc = EMIT(start, pos)) != 0) {
            return rc;
        }
    }
    return 0;
}


static inline int
is_punct_run(uint32_t c, unsigned f)
{
    /* no backtick: llama.cpp's default class leaves it out */
    return (f & LLM_U_PUNCT) || c == '$' || c == '+' || c == '<' || c == '='
           || c == '>' || c == '^' || c == '~' || c == '|';
}


/* DeepSeek Coder's [\x{800}-\x{9fa5}\x{ac00}-\x{d7ff}] (written there as
 * CJK and Hangul ranges); a space in that range (U+3000) does not match,
 * as llama.cpp matches it on a copy where such spaces are ASCII's \v. */
static inline int
is_cjk_hangul(uint32_t c, unsigned f)
{
    return ((c >= 0x800 && c <= 0x9fa5) || (c >= 0xac00 && c <= 0xd7ff))
           && !IS_WS(f);
}


/* A regex split with an isolated match class: runs (or single code
 * points) of the class are pieces, and so is the text between them. */
static int
scan_class(tok_ws *ws, int stage, size_t a, size_t b, int kind)
{
    size_t pos = a, start = a, m;
    int    in, rc;

    while (pos < b) {
        if (kind == ST_DIGIT3) {
            in = pos + 2 < b && ws->cpt[pos] >= '0' && ws->cpt[pos] <= '9'
                 && ws->cpt[pos + 1] >= '0' && ws->cpt[pos + 1] <= '9'
                 && ws->cpt[pos + 2] >= '0' && ws->cpt[pos + 2] <= '9';
        } else if (kind == ST_CRLF) {
            in = ws->cpt[pos] == '\r' || ws->cpt[pos] == '\n';
        } else if (kind == ST_CJK_HANGUL) {
            in = is_cjk_hangul(ws->cpt[pos], ws->fl[pos]);
        } else if (kind == ST_PUNCT_RUN) {
            in = is_punct_run(ws->cpt[pos], ws->fl[pos]);
        } else {
            in = IS_N(ws->fl[pos]) != 0;
        }
        if (!in) {
            pos++;
            continue;
        }
        if ((rc = EMIT(start, pos)) != 0) {
            return rc;
        }
        m = pos;
        if (kind == ST_DIGIT3) {
            pos += 3;
        } else if (kind == ST_EACH_NUM || kind == ST_CRLF) {
            pos++;
        } else if (kind == ST_CJK_HANGUL) {
            while (pos < b && is_cjk_hangul(ws->cpt[pos], ws->fl[pos])) {
                pos++;
            }
        } else if (kind == ST_NUM_RUN) {
            while (pos < b && IS_N(ws->fl[pos])) {
                pos++;
            }
        } else {
            while (pos < b && is_punct_run(ws->cpt[pos], ws->fl[pos])) {
                pos++;
            }
        }
        if ((rc = EMIT(m, pos)) != 0) {
            return rc;
        }
        start = pos;
    }
    return EMIT(start, b);
}


/*
 * The classes of llama.cpp's general regex path, which matches \p{..}
 * on a copy of the text where each code point above ASCII stands for
 * its category (whitespace first): ASCII keeps its own characters, so
 * \p{L} there is A-Za-z, \p{P} the ASCII punctuation outside $+<=>^`|~,
 * and \s the six ASCII spaces.
 */
static inline int
rx_space(uint32_t c, unsigned f)
{
    return c < 128 ? (c == ' ' || (c >= '\t' && c <= '\r')) : IS_WS(f) != 0;
}


static inline int
rx_letter(uint32_t c, unsigned f)
{
    return c < 128 ? ((c | 32) >= 'a' && (c | 32) <= 'z')
                   : !IS_WS(f) && (f & LLM_U_LETTER);
}


static inline int
rx_punct(uint32_t c, unsigned f)
{
    if (c < 128) {
        return (c >= '!' && c <= '/' && c != '$' && c != '+')
               || c == ':' || c == ';' || c == '?' || c == '@'
               || c == '[' || c == '\\' || c == ']' || c == '_'
               || c == '{' || c == '}';
    }
    return !IS_WS(f) && (f & LLM_U_PUNCT);
}


/* \s?X+ (X letters or punctuation), isolated: a match is an optional
 * space then a run of X; the text between matches is a piece too. */
static int
scan_ws_run(tok_ws *ws, int stage, size_t a, size_t b, int kind)
{
    int    (*in)(uint32_t, unsigned) = kind == ST_WS_LETTERS ? rx_letter
                                                             : rx_punct;
    size_t pos = a, start = a, m;
    int    rc;

    while (pos < b) {
        if (in(ws->cpt[pos], ws->fl[pos])) {
            m = pos;
        } else if (pos + 1 < b && rx_space(ws->cpt[pos], ws->fl[pos])
                   && in(ws->cpt[pos + 1], ws->fl[pos + 1]))
        {
            m = pos++;
        } else {
            pos++;
            continue;
        }
        while (pos < b && in(ws->cpt[pos], ws->fl[pos])) {
            pos++;
        }
        if ((rc = EMIT(start, m)) != 0 || (rc = EMIT(m, pos)) != 0) {
            return rc;
        }
        start = pos;
    }
    return EMIT(start, b);
}


static int
split_piece(tok_ws *ws, int stage, size_t a, size_t b)
{
    int kind = stage < TOK_MAX_STAGES ? ws->stages[stage] : ST_END;

    switch (kind) {
    case ST_END:
        return word_emit(ws, a, b);
    case ST_GPT2:
        return scan_gpt2(ws, stage, a, b);
    case ST_LLAMA3:
        return scan_llama3(ws, stage, a, b, 3);
    case ST_QWEN2:
        return scan_llama3(ws, stage, a, b, 1);
    case ST_WS_LETTERS:
    case ST_WS_PUNCTS:
        return scan_ws_run(ws, stage, a, b, kind);
    default:
        return scan_class(ws, stage, a, b, kind);
    }
}


/* Pre-tokenizes and encodes one raw fragment. */
static int
encode_fragment(tok_ws *ws, const char *s, size_t n)
{
    size_t i = 0, k = 0;

    if (n == 0) {
        return 0;
    }
    if (ws_grow((void **) &ws->cpt, &ws->cpt_cap, n, sizeof(uint32_t)) != 0
        || ws_grow((void **) &ws->fl, &ws->fl_cap, n, sizeof(uint16_t)) != 0)
    {
        return LLM_ENOMEM;
    }
    while (i < n) {
        ws->cpt[k] = llm_utf8_decode_lenient(s, n, &i);
        ws->fl[k] = (uint16_t) llm_unicode_flags(ws->cpt[k]);
        k++;
    }
    return split_piece(ws, 0, 0, k);
}


/* ---------------------------------------------------------------------
 * SentencePiece
 * --------------------------------------------------------------------- */

/* Queues the merge of SentencePiece symbols left and right if their
 * bytes together are a token (any token, as llama.cpp looks them up). */
static void
spm_try_pair(tok_ws *ws, int32_t left, int32_t right)
{
    const spm_sym *l, *r;
    tok_pair       p;
    int32_t        id;

    if (left < 0 || right < 0) {
        return;
    }
    l = &ws->ssym[left];
    r = &ws->ssym[right];
    id = tok_lookup(ws->t, (const char *) ws->bytes + l->off,
                    (size_t) l->n + (size_t) r->n);
    if (id < 0) {
        return;
    }
    p.rank = ws->t->spm_rank[id];
    p.left = left;
    p.right = right;
    p.lid = l->n;
    p.rid = r->n;
    heap_push(ws, &p);
}


/* A character's length from its UTF-8 lead byte, by the top four bits;
 * invalid sequences are cut the same way (llama.cpp's unicode_len_utf8). */
static inline size_t
utf8_lead_len(uint8_t c)
{
    static const uint8_t lead_len[16] = { 1, 1, 1, 1, 1, 1, 1, 1,
                                          1, 1, 1, 1, 2, 2, 3, 4 };

    return lead_len[c >> 4];
}


/* Encodes the escaped text ws->bytes[0, n) (llama.cpp's SPM session). */
static int
spm_encode(tok_ws *ws, size_t n)
{
    const llm_tokenizer *t = ws->t;
    const uint8_t       *s = ws->bytes;
    spm_sym             *sym;
    tok_pair             p;
    size_t               off, len, k;
    int32_t              ns = 0, i, id;

    if (n == 0) {
        return 0;
    }
    if (ws_reserve(ws, (void **) &ws->ssym, &ws->ssym_cap, n,
                   sizeof(spm_sym)) != 0)
    {
        return LLM_ENOMEM;
    }
    sym = ws->ssym;
    for (off = 0; off < n; off += len) {
        len = utf8_lead_len(s[off]);
        if (len > n - off) {
            len = n - off;
        }
        sym[ns].off = (int32_t) off;
        sym[ns].n = (int32_t) len;
        sym[ns].prev = ns - 1;
        sym[ns].next = off + len < n ? ns + 1 : -1;
        ns++;
    }

    ws->heap_n = 0;
    for (i = 1; i < ns; i++) {
        spm_try_pair(ws, i - 1, i);
    }
    while (ws->heap_n > 0) {
        p = heap_pop(ws);
        if (sym[p.left].n != p.lid || sym[p.right].n != p.rid) {
            continue;                   /* a side was merged since */
        }
        sym[p.left].n += sym[p.right].n;
        sym[p.right].n = 0;
        sym[p.left].next = sym[p.right].next;
        if (sym[p.right].next >= 0) {
            sym[sym[p.right].next].prev = p.left;
        }
        if (ws_heap_room(ws) != 0) {
            return LLM_ENOMEM;
        }
        spm_try_pair(ws, sym[p.left].prev, p.left);
        spm_try_pair(ws, p.left, sym[p.left].next);
    }

    for (i = 0; i >= 0; i = sym[i].next) {
        id = tok_lookup(t, (const char *) s + sym[i].off, (size_t) sym[i].n);
        if (id >= 0) {
            ws_push(ws, id);
            continue;
        }
        /* not a token (only a lone character can be): its bytes' <0xXX>
         * tokens, else the byte as a token; a vocabulary with neither
         * gives the unknown token (llama.cpp would throw) */
        for (k = 0; k < (size_t) sym[i].n; k++) {
            id = t->byte_fallback[s[sym[i].off + k]];
            if (id < 0) {
                id = tok_lookup(t, (const char *) s + sym[i].off + k, 1);
            }
            if (id < 0) {
                id = t->unk;
            }
            if (id >= 0) {
                ws_push(ws, id);
            }
        }
    }
    return 0;
}


/* tokenizer.json's SentencePiece-style BPE (Hugging Face's BPE model with
 * byte_fallback) on the escaped text ws->bytes[a, b): each character is
 * its token, else its bytes' <0xXX> tokens if all exist, else the
 * unknown token (one per run with fuse_unk); then merges by rank. */
static int
spm_rank_encode(tok_ws *ws, size_t a, size_t b)
{
    const llm_tokenizer *t = ws->t;
    const uint8_t       *s = ws->bytes;
    size_t               off, len, k;
    int32_t              n = 0, id, i;
    int                  all;

    if (b <= a) {
        return 0;
    }
    if (ws_reserve(ws, (void **) &ws->sym, &ws->sym_cap, b - a,
                   sizeof(tok_sym)) != 0)
    {
        return LLM_ENOMEM;
    }
    for (off = a; off < b; off += len) {
        len = utf8_lead_len(s[off]);
        if (len > b - off) {
            len = b - off;
        }
        id = tok_lookup(t, (const char *) s + off, len);
        if (id < 0) {
            for (k = 0, all = 1; k < len; k++) {
                all &= t->byte_fallback[s[off + k]] >= 0;
            }
            if (all) {
                for (k = 0; k < len; k++) {
                    ws->sym[n++].id = t->byte_fallback[s[off + k]];
                }
                continue;
            }
            if (t->unk < 0 || (t->fuse_unk && n > 0
                               && ws->sym[n - 1].id == t->unk))
            {
                continue;
            }
            id = t->unk;
        }
        ws->sym[n++].id = id;
    }
    for (i = 0; i < n; i++) {
        ws->sym[i].prev = i - 1;
        ws->sym[i].next = i + 1 < n ? i + 1 : -1;
    }
    if (bpe_merge(ws, n) != 0) {
        return LLM_ENOMEM;
    }
    for (i = 0; n > 0 && i >= 0; i = ws->sym[i].next) {
        ws_push(ws, ws->sym[i].id);
    }
    return 0;
}


/* Encodes one raw fragment: a leading space if asked, every space as
 * U+2581, then the merges (for tokenizer.json's Metaspace split, word by
 * word, each word starting at a U+2581). */
static int
spm_fragment(tok_ws *ws, const char *s, size_t n, int space_prefix)
{
    size_t i, o = 0, w;
    int    rc;

    if (n > SIZE_MAX / 3 - 3
        || ws_grow((void **) &ws->bytes, &ws->bytes_cap, 3 * n + 3, 1) != 0)
    {
        return LLM_ENOMEM;
    }
    if (space_prefix) {
        memcpy(ws->bytes, SPM_SPACE, 3);
        o = 3;
    }
    for (i = 0; i < n; i++) {
        if (s[i] == ' ') {
            memcpy(ws->bytes + o, SPM_SPACE, 3);
            o += 3;
        } else {
            ws->bytes[o++] = (uint8_t) s[i];
        }
    }
    if (!ws->t->spm_by_rank) {
        return spm_encode(ws, o);
    }
    if (!ws->t->spm_split) {
        return spm_rank_encode(ws, 0, o);
    }
    for (w = 0, i = 1; i <= o; i++) {
        if (i == o || (i + 3 <= o
                       && memcmp(ws->bytes + i, SPM_SPACE, 3) == 0))
        {
            if ((rc = spm_rank_encode(ws, w, i)) != 0) {
                return rc;
            }
            w = i;
        }
    }
    return 0;
}


/* ---------------------------------------------------------------------
 * Encoding
 * --------------------------------------------------------------------- */

typedef struct {
    size_t  off;
    size_t  len;
    int32_t id;                 /* -1: raw text */
} tok_frag;


static inline int
c_isspace(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f'
           || c == '\r';
}


/* Cuts special token texts out of the raw fragments, token by token in
 * t->special order, leftmost occurrence first (llama.cpp's
 * tokenizer_st_partition). */
static int
partition(const llm_tokenizer *t, const char *text, size_t len,
          int parse_special, tok_frag **frags_out, size_t *n_out)
{
    tok_frag   *cur, *nxt, *tmp;
    size_t      n = 0, cap = 16, nn, i, base, blen, lo, llen, ro, rlen;
    size_t      slen;
    const char *st, *m;
    int32_t     k, id;
    uint16_t    at;

    cur = llm_malloc(cap * sizeof(*cur));
    nxt = llm_malloc(cap * sizeof(*nxt));
    if (cur == NULL || nxt == NULL) {
        llm_free(cur);
        llm_free(nxt);
        return LLM_ENOMEM;
    }
    if (len > 0) {
        cur[0].off = 0;
        cur[0].len = len;
        cur[0].id = -1;
        n = 1;
    }

#define FRAG_PUSH(o, l, i_)                                                 \
    do {                                                                    \
        if (nn == cap) {                                                    \
            size_t nc = cap * 2;                                            \
            tok_frag *a1 = llm_realloc(cur, nc * sizeof(*cur));             \
            tok_frag *a2;                                                   \
            if (a1 == NULL) { llm_free(nxt); llm_free(cur);                 \
                              return LLM_ENOMEM; }                          \
            cur = a1;                                                       \
            a2 = llm_realloc(nxt, nc * sizeof(*nxt));                       \
            if (a2 == NULL) { llm_free(nxt); llm_free(cur);                 \
                              return LLM_ENOMEM; }                          \
            nxt = a2;                                                       \
            cap = nc;                                                       \
        }                                                                   \
        nxt[nn].off = (o);                                                  \
        nxt[nn].len = (l);                                                  \
        nxt[nn].id = (i_);                                                  \
        nn++;                                                               \
    } while (0)

    for (k = 0; k < t->n_special && n > 0; k++) {
        id = t->special[k];
        at = t->attr[id];
        if (!parse_special && (at & (TOK_CONTROL | TOK_UNKNOWN))) {
            continue;
        }
        st = tok_text(t, id, &slen);

        /* cheap check: any raw fragment containing it at all? */
        for (i = 0; i < n; i++) {
            if (cur[i].id < 0 && cur[i].len >= slen
                && memmem(text + cur[i].off, cur[i].len, st, slen) != NULL)
            {
                break;
            }
        }
        if (i == n) {
            continue;
        }

        nn = 0;
        for (i = 0; i < n; i++) {
            if (cur[i].id >= 0) {
                FRAG_PUSH(cur[i].off, cur[i].len, cur[i].id);
                continue;
            }
            base = cur[i].off;
            blen = cur[i].len;
            while (blen > 0) {
                m = memmem(text + base, blen, st, slen);
                if (m == NULL) {
                    FRAG_PUSH(base, blen, -1);
                    break;
                }
                lo = base;
                llen = (size_t) (m - text) - base;
                if (at & TOK_LSTRIP) {
                    while (llen > 0 && c_isspace(text[lo + llen - 1])) {
                        llen--;
                    }
                }
                if (llen > 0) {
                    FRAG_PUSH(lo, llen, -1);
                }
                FRAG_PUSH((size_t) (m - text), slen, id);
                ro = (size_t) (m - text) + slen;
                rlen = base + blen - ro;
                if (at & TOK_RSTRIP) {
                    while (rlen > 0 && c_isspace(text[ro])) {
                        ro++;
                        rlen--;
                    }
                }
                base = ro;
                blen = rlen;
            }
        }
        tmp = cur;
        cur = nxt;
        nxt = tmp;
        n = nn;
    }
#undef FRAG_PUSH

    llm_free(nxt);
    *frags_out = cur;
    *n_out = n;
    return 0;
}


/* Whether raw fragment f gets a space in front.  Every raw fragment
 * starts the text or follows a special token (llama.cpp's rule for
 * SPM_PREFIX_EACH); Metaspace adds none where a space or U+2581 is. */
static int
spm_prefix_here(const llm_tokenizer *t, const char *text, const tok_frag *f)
{
    int spaced = text[f->off] == ' '
                 || (f->len >= 3
                     && memcmp(text + f->off, SPM_SPACE, 3) == 0);

    switch (t->spm_prefix) {
    case SPM_PREFIX_EACH:
        return 1;
    case SPM_PREFIX_UNLESS_SPACE:
        return !spaced;
    case SPM_PREFIX_FIRST:
        return f->off == 0 && !spaced;
    default:
        return 0;
    }
}


int
llm_tokenize(const llm_tokenizer *t, const char *text, size_t len,
             int add_special, int parse_special, int32_t *out, int cap)
{
    tok_ws    ws;
    tok_frag *frags = NULL;
    size_t    nf = 0, i;
    int       rc;

    if (t == NULL || (text == NULL && len > 0) || cap < 0
        || (out == NULL && cap > 0))
    {
        return LLM_EINVAL;
    }
    memset(&ws, 0, sizeof(ws));
    ws.t = t;
    ws.out = out;
    ws.cap = cap;
    ws.stages = pre_stages[t->pre];

    if (add_special && t->add_bos) {
        ws_push(&ws, t->bos);
    }
    rc = partition(t, text, len, parse_special, &frags, &nf);
    for (i = 0; rc == 0 && i < nf; i++) {
        if (frags[i].id >= 0) {
            ws_push(&ws, frags[i].id);
        } else if (t->spm) {
            rc = spm_fragment(&ws, text + frags[i].off, frags[i].len,
                              spm_prefix_here(t, text, &frags[i]));
        } else {
            rc = encode_fragment(&ws, text + frags[i].off, frags[i].len);
        }
    }
    if (rc == 0 && add_special && t->add_eos) {
        ws_push(&ws, t->eos);
    }
    llm_free(frags);
    ws_free(&ws);
    if (rc != 0) {
        return rc;
    }
    if (ws.n > INT_MAX) {
        return LLM_EFULL;
    }
    return (int) ws.n;
}


/* ---------------------------------------------------------------------
 * Decoding
 * --------------------------------------------------------------------- */

int
llm_token_to_piece(const llm_tokenizer *t, int32_t id, int special,
                   char *buf, int cap)
{
    uint32_t n;

    if (t == NULL || id < 0 || id >= t->n_vocab || cap < 0) {
        return LLM_EINVAL;
    }
    if (!special && (t->attr[id] & (TOK_CONTROL | TOK_UNKNOWN))) {
        return 0;
    }
    n = t->poff[id + 1] - t->poff[id];
    if (n > INT_MAX) {
        return LLM_EFULL;
    }
    if ((int) n <= cap && n > 0) {
        memcpy(buf, t->piece + t->poff[id], n);
    }
    return (int) n;
}


void
llm_detok_init(llm_detok *d, int special)
{
    memset(d, 0, sizeof(*d));
    d->special = special;
}


/* Appends the complete UTF-8 of in[n] to out; invalid sequences become
 * U+FFFD (one per maximal invalid subpart, as Python's "replace"), an
 * incomplete tail is left: returns its length through *tail. */
static size_t
detok_scan(const char *in, size_t n, char *out, size_t *tail)
{
    size_t   i = 0, o = 0;
    uint32_t cp;
    int      r;

    while (i < n) {
        r = llm_utf8_decode_strict(in + i, n - i, &cp);
        if (r > 0) {
            if (out != NULL) {
                memcpy(out + o, in + i, (size_t) r);
            }
            o += (size_t) r;
            i += (size_t) r;
        } else if (r == 0) {
            break;
        } else {
            if (out != NULL) {
                memcpy(out + o, "\xef\xbf\xbd", 3);
            }
            o += 3;
            i += (size_t) -r;
        }
    }
    *tail = n - i;
    return o;
}


int
llm_detok_push(llm_detok *d, const llm_tokenizer *t, int32_t id, char *out,
               int cap)
{
    const char *p;
    char        stack[512], *buf = stack;
    size_t      plen, n, need, tail;

    if (d == NULL || t == NULL || id < 0 || id >= t->n_vocab || cap < 0
        || d->n_pending < 0 || d->n_pending > (int) sizeof(d->pending))
    {
        return LLM_EINVAL;
    }
    if (!d->special && (t->attr[id] & (TOK_CONTROL | TOK_UNKNOWN))) {
        return 0;
    }
    p = t->piece + t->poff[id];
    plen = t->poff[id + 1] - t->poff[id];
    if (plen == 0) {
        return 0;
    }
    n = (size_t) d->n_pending + plen;
    if (n > sizeof(stack)) {
        buf = llm_malloc(n);
        if (buf == NULL) {
            return LLM_ENOMEM;
        }
    }
    memcpy(buf, d->pending, (size_t) d->n_pending);
    memcpy(buf + d->n_pending, p, plen);

    need = detok_scan(buf, n, NULL, &tail);
    if (need > (size_t) cap || tail > sizeof(d->pending)) {
        if (buf != stack) {
            llm_free(buf);
        }
        return LLM_EFULL;
    }
    detok_scan(buf, n, out, &tail);
    memcpy(d->pending, buf + n - tail, tail);
    d->n_pending = (int) tail;
    if (buf != stack) {
        llm_free(buf);
    }
    return (int) need;
}


int
llm_detok_flush(llm_detok *d, char *out, int cap)
{
    if (d == NULL || cap < 0) {
        return LLM_EINVAL;
    }
    if (d->n_pending == 0) {
        return 0;
    }
    if (cap < 3) {
        return LLM_EFULL;
    }
    memcpy(out, "\xef\xbf\xbd", 3);
    d->n_pending = 0;
    return 3;
}
