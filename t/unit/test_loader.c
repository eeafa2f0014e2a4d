/*
 * Loader tests: SHA-256 vectors, the safetensors reader, tiny random
 * models written by tools/make_tiny_model.py in both layouts (GGUF and a
 * Hugging Face folder, same weights), the default SmolLM2 model, and
 * damaged files (truncated, byte-flipped, bad config, wrong shapes,
 * unsupported types, failing allocations), which must all give NULL and
 * an error naming the file, never a crash.
 *
 * The backend is a stub defined here (host memory, weights adopted in
 * place) so that these tests depend on no kernel.
 */
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "test.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/sha256.h"


/* ---------------------------------------------------------------------- */
/* A stub backend: host memory, counts its buffers                         */
/* ---------------------------------------------------------------------- */

typedef struct {
    int n_alloc;
    int n_release;
    int n_adopt;
} stub_ctx;


static void
stub_free(llm_backend *be)
{
}


static const char *
stub_error(llm_backend *be)
{
    return "stub backend error";
}


static void *
stub_alloc(llm_backend *be, size_t n)
{
    stub_ctx *c = be->ctx;

    c->n_alloc++;
    return malloc(n ? n : 1);
}


static void
stub_release(llm_backend *be, void *p)
{
    stub_ctx *c = be->ctx;

    c->n_release++;
    free(p);
}


static int
stub_upload(llm_backend *be, void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
    return 0;
}


static int
stub_adopt(llm_backend *be, const void *host, size_t n, void **out)
{
    stub_ctx *c = be->ctx;

    c->n_adopt++;
    *out = (void *) host;
    return 0;
}


static const llm_backend_ops stub_ops = {
    .name = "stub",
    .free = stub_free,
    .error = stub_error,
    .alloc = stub_alloc,
    .release = stub_release,
    .upload = stub_upload,
    .download = stub_upload,
    .adopt_weights = stub_adopt,
};

static stub_ctx     stub_state;
static llm_backend  stub_be = { &stub_ops, &stub_state };


/* ---------------------------------------------------------------------- */
/* Helpers                                                                  */
/* ---------------------------------------------------------------------- */

/* Test names must outlive the next test() call (the runner prints a
 * test's line when the next one begins): a small ring of buffers. */
static const char *
tname(const char *fmt, ...)
{
    static char names[4][200];
    static int  next;
    char       *b = names[next++ % 4];
    va_list     ap;

    va_start(ap, fmt);
    vsnprintf(b, sizeof(names[0]), fmt, ap);
    va_end(ap);
    return b;
}


static const char *
python(void)
{
    const char *p = getenv("PYTHON");

    return p != NULL ? p : "python3";
}


static int
have_python_gguf(void)
{
    static int state = -1;
    char       cmd[256];

    if (state < 0) {
        snprintf(cmd, sizeof(cmd),
                 "%s -c 'import gguf, numpy' >/dev/null 2>&1", python());
        state = system(cmd) == 0;
    }
    return state;
}


static int
copy_file(const char *src, const char *dst)
{
    char    buf[1 << 16];
    int     in, out, ok = 1;
    ssize_t n;

    in = open(src, O_RDONLY);
    out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in < 0 || out < 0) {
        ok = 0;
    }
    while (ok && (n = read(in, buf, sizeof(buf))) > 0) {
        ok = write(out, buf, (size_t) n) == n;
    }
    if (in >= 0) {
        close(in);
    }
    if (out >= 0) {
        close(out);
    }
    return ok;
}


static int
write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    int   ok;

    if (f == NULL) {
        return 0;
    }
    ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}


static off_t
file_size(const char *path)
{
    struct stat sb;

    return stat(path, &sb) == 0 ? sb.st_size : -1;
}


static int
flip_byte(const char *path, off_t off)
{
    int           fd = open(path, O_RDWR);
    unsigned char b;
    int           ok;

    if (fd < 0) {
        return 0;
    }
    ok = pread(fd, &b, 1, off) == 1;
    b ^= 0xff;
    ok = ok && pwrite(fd, &b, 1, off) == 1;
    close(fd);
    return ok;
}


/* Replaces the first occurrence of from (same length as to) in path. */
static int
patch_file(const char *path, const char *from, const char *to)
{
    FILE   *f = fopen(path, "r+b");
    char   *buf, *hit;
    size_t  n = strlen(from), size;
    int     ok = 0;

    if (f == NULL || strlen(to) != n) {
        if (f) {
            fclose(f);
        }
        return 0;
    }
    /* the header is at the start: 4 MiB covers it */
    buf = malloc(4 << 20);
    size = fread(buf, 1, 4 << 20, f);
    hit = memmem(buf, size, from, n);
    if (hit != NULL) {
        fseek(f, hit - buf, SEEK_SET);
        ok = fwrite(to, 1, n, f) == n;
    }
    free(buf);
    fclose(f);
    return ok;
}


static char *
path_join(char *buf, size_t size, const char *a, const char *b)
{
    snprintf(buf, size, "%s/%s", a, b);
    return buf;
}


/* Loads path with the stub backend expecting failure; 1 if it failed with
 * a message containing must1 (and must2 if not NULL). */
static int
load_fails(const char *path, const char *must1, const char *must2)
{
    llm_err    err;
    llm_model *m;

    memset(&err, 0, sizeof(err));
    m = llm_model_load(path, &stub_be, NULL, NULL, &err);
    if (m != NULL) {
        printf("       unexpected success loading %s\n", path);
        llm_model_free(m);
        return 0;
    }
    if (getenv("LLM_TEST_VERBOSE") != NULL) {
        printf("       -> %s\n", err.msg);
    }
    if (strstr(err.msg, must1) == NULL
        || (must2 != NULL && strstr(err.msg, must2) == NULL))
    {
        printf("       message \"%s\" lacks \"%s\"%s%s\n", err.msg, must1,
               must2 ? " / " : "", must2 ? must2 : "");
        return 0;
    }
    return 1;
}


/* ---------------------------------------------------------------------- */
/* Tiny models                                                              */
/* ---------------------------------------------------------------------- */

enum { ROPE_NONE, ROPE_LINEAR, ROPE_LLAMA3 };

typedef struct {
    const char *tag;
    const char *args;
    int         layers, dim, heads, kv_heads, head_dim, ffn;
    int         tied, bias, hf_type, gguf_type, shards, rope;
    float       rope_base;
} tiny_spec;

static const tiny_spec tiny[] = {
    { "gqa", "--layers 2 --dim 64 --heads 4 --kv-heads 2 --ffn 128 "
             "--untied --seed 5",
      2, 64, 4, 2, 16, 128, 0, 0, LLM_F32, LLM_F32, 1, ROPE_NONE, 10000 },
    { "bias", "--layers 2 --dim 64 --heads 4 --kv-heads 1 --ffn 96 --tied "
              "--qkv-bias --dtype bf16 --gguf-type q8_0 --shards 3 --seed 1",
      2, 64, 4, 1, 16, 96, 1, 1, LLM_BF16, LLM_Q8_0, 3, ROPE_NONE, 10000 },
    { "llama3", "--layers 1 --dim 64 --heads 2 --kv-heads 2 --ffn 64 "
                "--tied --dtype f16 --gguf-type q4_1 --rope-scaling llama3 "
                "--rope-factor 8 --rope-orig-ctx 64 --rope-base 500000 "
                "--seed 2",
      1, 64, 2, 2, 32, 64, 1, 0, LLM_F16, LLM_Q4_1, 1, ROPE_LLAMA3,
      500000 },
    { "headdim", "--layers 1 --dim 64 --heads 4 --kv-heads 4 --head-dim 32 "
                 "--ffn 64 --untied --gguf-type q4_0 --rope-scaling linear "
                 "--rope-factor 4 --seed 3",
      1, 64, 4, 4, 32, 64, 0, 0, LLM_F32, LLM_Q4_0, 1, ROPE_LINEAR, 10000 },
};

#define N_TINY  (int) (sizeof(tiny) / sizeof(tiny[0]))

static char tiny_dir[N_TINY][512];
static int  tiny_state[N_TINY];     /* 0 not tried, 1 ok, -1 failed */


/* Generates tiny model i once; NULL (with a skip reason) if it cannot. */
static const char *
tiny_model(int i, const char **why)
{
    char cmd[1024];

    *why = NULL;
    if (!have_python_gguf()) {
        *why = "python3 with gguf and numpy not available";
        return NULL;
    }
    if (llm_test_default_model() == NULL) {
        *why = "default model (vocabulary source) not installed";
        return NULL;
    }
    if (tiny_state[i] == 0) {
        snprintf(tiny_dir[i], sizeof(tiny_dir[i]), "%s/tiny-%s",
                 llm_test_tmp_dir(), tiny[i].tag);
        snprintf(cmd, sizeof(cmd),
                 "%s tools/make_tiny_model.py %s --vocab-from '%s' "
                 "--out '%s'", python(), tiny[i].args,
                 llm_test_default_model(), tiny_dir[i]);
        tiny_state[i] = system(cmd) == 0 ? 1 : -1;
    }
    if (tiny_state[i] < 0) {
        *why = "tools/make_tiny_model.py failed";
        return NULL;
    }
    return tiny_dir[i];
}


typedef struct {
    size_t last_done, total;
    int    calls, monotonic;
} progress_rec;


static void
on_progress(void *ud, size_t done, size_t total)
{
    progress_rec *p = ud;

    if (p->calls > 0 && (done < p->last_done || total != p->total)) {
        p->monotonic = 0;
    }
    p->calls++;
    p->last_done = done;
    p->total = total;
}


static int
cfg_matches(const llm_model_config *c, const tiny_spec *s, int gguf)
{
    int ok = c->n_layers == s->layers && c->dim == s->dim
             && c->n_heads == s->heads && c->n_kv_heads == s->kv_heads
             && c->head_dim == s->head_dim && c->ffn_dim == s->ffn
             && c->n_vocab == 49152 && c->n_ctx == 2048
             && fabsf(c->norm_eps - 1e-5f) < 1e-9f
             && c->rope.freq_base == s->rope_base
             && c->rope.n_rot == s->head_dim
             && c->tied_embeddings == s->tied && c->qkv_bias == s->bias;

    /* GGUF llama is permuted for adjacent pairs; qwen2 and HF are neox */
    ok = ok && c->rope.neox == (gguf ? s->bias : 1);
    ok = ok && c->rope.freq_scale == (s->rope == ROPE_LINEAR ? 0.25f : 1.0f);
    return ok;
}


static int
tensor_is(const llm_tensor *t, int type, int64_t ne0, int64_t ne1)
{
    return t->data != NULL && t->type == type && t->ne[0] == ne0
           && t->ne[1] == ne1 && t->nb == llm_row_bytes(type, ne0);
}


static int
shapes_ok(const llm_model *m, const tiny_spec *s, int mtype)
{
    const llm_model_config *c = &m->cfg;
    int64_t                 qd = s->heads * s->head_dim;
    int64_t                 kvd = s->kv_heads * s->head_dim;
    int                     l, ok;

    ok = tensor_is(&m->tok_embd, mtype, c->dim, c->n_vocab)
         && tensor_is(&m->out_norm, LLM_F32, c->dim, 1)
         && tensor_is(&m->output, mtype, c->dim, c->n_vocab);
    ok = ok && (s->tied ? m->output.data == m->tok_embd.data
                        : m->output.data != m->tok_embd.data);
    for (l = 0; ok && l < c->n_layers; l++) {
        const llm_layer_weights *w = &m->layers[l];

        ok = tensor_is(&w->attn_norm, LLM_F32, c->dim, 1)
             && tensor_is(&w->wq, mtype, c->dim, qd)
             && tensor_is(&w->wk, mtype, c->dim, kvd)
             && tensor_is(&w->wv, mtype, c->dim, kvd)
             && tensor_is(&w->wo, mtype, qd, c->dim)
             && tensor_is(&w->ffn_norm, LLM_F32, c->dim, 1)
             && tensor_is(&w->w_gate, mtype, c->dim, c->ffn_dim)
             && tensor_is(&w->w_up, mtype, c->dim, c->ffn_dim)
             && tensor_is(&w->w_down, mtype, c->ffn_dim, c->dim);
        if (s->bias) {
            ok = ok && tensor_is(&w->bq, LLM_F32, qd, 1)
                 && tensor_is(&w->bk, LLM_F32, kvd, 1)
                 && tensor_is(&w->bv, LLM_F32, kvd, 1);
        } else {
            ok = ok && w->bq.data == NULL && w->bk.data == NULL
                 && w->bv.data == NULL;
        }
    }
    return ok;
}


static int
same_f32(const llm_tensor *a, const llm_tensor *b)
{
    return a->type == LLM_F32 && b->type == LLM_F32 && a->ne[0] == b->ne[0]
           && a->ne[1] == b->ne[1]
           && memcmp(a->data, b->data, a->nb * (size_t) a->ne[1]) == 0;
}


/* GGUF llama wq/wk rows are the HF rows interleaved per head: GGUF row
 * 2i + j of a head is HF row j * head_dim / 2 + i. */
static int
permuted_rows_ok(const llm_tensor *g, const llm_tensor *h, int n_head,
                 int head_dim)
{
    int hh, i, j;

    for (hh = 0; hh < n_head; hh++) {
        for (i = 0; i < head_dim / 2; i++) {
            for (j = 0; j < 2; j++) {
                int64_t gr = (int64_t) hh * head_dim + 2 * i + j;
                int64_t hr = (int64_t) hh * head_dim + j * head_dim / 2 + i;

                if (memcmp((const char *) g->data + gr * g->nb,
                           (const char *) h->data + hr * h->nb, g->nb) != 0)
                {
                    return 0;
                }
            }
        }
    }
    return 1;
}


static int
total_tensors(const llm_model *m)
{
    int t, n = 0;

    for (t = 0; t < LLM_DTYPE_COUNT; t++) {
        n += m->type_counts[t];
    }
    return n;
}


/* ---------------------------------------------------------------------- */
/* SHA-256                                                                  */
/* ---------------------------------------------------------------------- */

static int
sha_is(const void *data, size_t n, const char *hex)
{
    uint8_t d[32];
    char    h[65];

    llm_sha256(data, n, d);
    return strcmp(llm_sha256_hex(d, h), hex) == 0;
}


TEST_SUITE(loader_sha256)
{
    static const char *m448 =
        "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    char             *big;
    uint8_t           d1[32], d2[32];
    llm_sha256_ctx    s;
    size_t            i, step;
    int               ok = 1;

    test("sha256 of FIPS 180 test vectors");
    test_cond(sha_is("", 0, "e3b0c44298fc1c149afbf4c8996fb924"
                            "27ae41e4649b934ca495991b7852b855"));
    test_cond(sha_is("abc", 3, "ba7816bf8f01cfea414140de5dae2223"
                               "b00361a396177a9cb410ff61f20015ad"));
    test_cond(sha_is(m448, strlen(m448),
                     "248d6a61d20638b8e5c026930c3e6039"
                     "a33ce45964ff2167f6ecedd419db06c1"));

    test("sha256 of a million 'a', streamed in uneven pieces");
    big = malloc(1000000);
    test_cond(big != NULL);
    if (big == NULL) {
        return;
    }
    memset(big, 'a', 1000000);
    test_cond(sha_is(big, 1000000, "cdc76e5c9914fb9281a1c7e284d73e67"
                                   "f1809a48a497200e046d39ccc7112cd0"));
    llm_sha256(big, 1000000, d1);
    for (step = 1; step < 200; step += 37) {
        llm_sha256_init(&s);
        for (i = 0; i < 1000000; i += step) {
            llm_sha256_update(&s, big + i, i + step > 1000000
                                           ? 1000000 - i : step);
        }
        llm_sha256_final(&s, d2);
        ok = ok && memcmp(d1, d2, 32) == 0;
    }
    test_cond(ok);
    free(big);

    test("sha256 padding boundaries (55, 56, 63, 64 bytes) differ");
    {
        char    buf[130];
        uint8_t prev[32], cur[32];

        memset(buf, 'x', sizeof(buf));
        ok = 1;
        llm_sha256(buf, 54, prev);
        for (i = 55; i <= 129; i++) {
            llm_sha256_init(&s);
            llm_sha256_update(&s, buf, i / 2);
            llm_sha256_update(&s, buf + i / 2, i - i / 2);
            llm_sha256_final(&s, cur);
            llm_sha256(buf, i, d1);
            ok = ok && memcmp(cur, d1, 32) == 0 && memcmp(cur, prev, 32);
            memcpy(prev, cur, 32);
        }
        test_cond(ok);
    }

    test("sha256 with the x86 SHA extensions == the portable code "
         "(random data, 0 to 4 KB)");
    if (!llm_sha256_use_extensions(1)) {
        test_skip("this CPU has no SHA extensions");
    } else {
        static uint8_t data[4096];
        uint32_t       x = 12345;
        size_t         n;

        for (i = 0; i < sizeof(data); i++) {
            x = x * 1103515245u + 12345u;
            data[i] = (uint8_t) (x >> 24);
        }
        ok = 1;
        for (n = 0; n <= sizeof(data); n += n < 200 ? 1 : 61) {
            llm_sha256_use_extensions(1);
            llm_sha256(data, n, d1);
            llm_sha256_use_extensions(0);
            llm_sha256(data, n, d2);
            ok = ok && memcmp(d1, d2, 32) == 0;
        }
        llm_sha256_use_extensions(1);
        test_cond(ok);
    }
}


/* ---------------------------------------------------------------------- */
/* safetensors reader                                                       */
/* ---------------------------------------------------------------------- */

/* Writes a safetensors file with the given header and n_data bytes. */
static int
write_st(const char *path, const char *header, size_t n_data)
{
    size_t   hl = strlen(header), i;
    uint8_t *buf = malloc(8 + hl + n_data + 1);
    uint64_t h64 = hl;
    int      ok;

    if (buf == NULL) {
        return 0;
    }
    memcpy(buf, &h64, 8);
    memcpy(buf + 8, header, hl);
    for (i = 0; i < n_data; i++) {
        buf[8 + hl + i] = (uint8_t) i;
    }
    ok = write_file(path, buf, 8 + hl + n_data);
    free(buf);
    return ok;
}


static int
st_fails(const char *path, const char *header, size_t n_data,
         const char *must)
{
    llm_err          err;
    llm_safetensors *st;

    memset(&err, 0, sizeof(err));
    if (!write_st(path, header, n_data)) {
        return 0;
    }
    st = llm_safetensors_open(path, &err);
    if (st != NULL) {
        printf("       unexpected success: %s\n", header);
        llm_safetensors_close(st);
        return 0;
    }
    if (strstr(err.msg, path) == NULL
        || (must != NULL && strstr(err.msg, must) == NULL))
    {
        printf("       message \"%s\" lacks the path or \"%s\"\n", err.msg,
               must ? must : "");
        return 0;
    }
    return 1;
}


TEST_SUITE(loader_safetensors)
{
    char                 path[512];
    llm_err              err;
    llm_safetensors     *st;
    const llm_st_tensor *t;

    path_join(path, sizeof(path), llm_test_tmp_dir(), "t.safetensors");

    test("safetensors: a valid file opens; shapes, dtypes, data pointers");
    write_st(path, "{\"__metadata__\":{\"format\":\"pt\"},"
                   "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],"
                   "\"data_offsets\":[24,32]},"
                   "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                   "\"data_offsets\":[0,24]},"
                   "\"c\":{\"dtype\":\"I64\",\"shape\":[],"
                   "\"data_offsets\":[32,40]}}", 40);
    st = llm_safetensors_open(path, &err);
    test_cond(st != NULL);
    if (st != NULL) {
        test_cond(st->n_tensors == 3);
        t = llm_safetensors_find(st, "a");
        test_cond(t != NULL && t->type == LLM_F32 && t->n_dims == 2
                  && t->shape[0] == 2 && t->shape[1] == 3
                  && t->nbytes == 24
                  && t->data == st->map + st->data_offset);
        t = llm_safetensors_find(st, "b");
        test_cond(t != NULL && t->type == LLM_BF16 && t->nbytes == 8
                  && ((const uint8_t *) t->data)[0] == 24);
        t = llm_safetensors_find(st, "c");
        test_cond(t != NULL && t->type == -1 && t->n_dims == 0
                  && strcmp(t->dtype, "I64") == 0);
        test_cond(llm_safetensors_find(st, "__metadata__") == NULL);
        test_cond(llm_safetensors_find(st, "d") == NULL);
        llm_safetensors_close(st);
    }

    test("safetensors: offsets past the data section");
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                             "\"data_offsets\":[0,24]}}", 20,
                       "data_offsets"));
    test("safetensors: shape and offsets disagree");
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                             "\"data_offsets\":[0,20]}}", 24,
                       "data_offsets give"));
    test("safetensors: begin after end, negative offsets");
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                             "\"data_offsets\":[8,4]}}", 24, NULL));
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                             "\"data_offsets\":[-4,0]}}", 24, NULL));
    test("safetensors: missing fields, bad shapes, duplicates, not JSON");
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4,
                       "data_offsets"));
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],"
                             "\"data_offsets\":[0,4]}}", 4, "shape"));
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":"
                             "[1099511627776,1099511627776],"
                             "\"data_offsets\":[0,4]}}", 4, "shape"));
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],"
                             "\"data_offsets\":[0,4]},\"a\":{\"dtype\":"
                             "\"F32\",\"shape\":[1],\"data_offsets\":"
                             "[0,4]}}", 4, NULL));
    test_cond(st_fails(path, "[1,2,3]", 4, "object"));
    test_cond(st_fails(path, "{\"a\":{\"dtype\":\"F32\",", 4, "JSON"));
    test_cond(st_fails(path, "{\"a\":7}", 4, NULL));

    test("safetensors: header length beyond the file, tiny files");
    {
        uint8_t b[16];
        uint64_t big = 1ull << 40;

        memset(b, ' ', sizeof(b));
        memcpy(b, &big, 8);
        write_file(path, b, sizeof(b));
        memset(&err, 0, sizeof(err));
        st = llm_safetensors_open(path, &err);
        test_cond(st == NULL && strstr(err.msg, path) != NULL);
        write_file(path, b, 5);
        st = llm_safetensors_open(path, &err);
        test_cond(st == NULL && strstr(err.msg, path) != NULL);
        write_file(path, b, 0);
        st = llm_safetensors_open(path, &err);
        test_cond(st == NULL && strstr(err.msg, path) != NULL);
    }
}


/* ---------------------------------------------------------------------- */
/* Tiny models in both layouts                                              */
/* ---------------------------------------------------------------------- */

static void
check_tiny(int i)
{
    const tiny_spec *s = &tiny[i];
    const char      *dir, *why;
    char             gpath[600], hpath[600], desc[1024], name[160];
    llm_err          err;
    llm_model       *g, *h, *g2;
    llm_model_config rc;
    progress_rec     pr = { 0, 0, 0, 1 };
    int              l, ok, n_tensors;

    test(tname("tiny %s: generate (%s)", s->tag, s->args));
    dir = tiny_model(i, &why);
    if (dir == NULL && tiny_state[i] < 0) {
        test_cond(!"tools/make_tiny_model.py failed");
        return;
    }
    if (dir == NULL) {
        test_skip(why);
        return;
    }
    test_cond(1);
    path_join(gpath, sizeof(gpath), dir, "model.gguf");
    path_join(hpath, sizeof(hpath), dir, "hf");

    test(tname("tiny %s: both layouts load, configs match", s->tag));
    memset(&stub_state, 0, sizeof(stub_state));
    memset(&err, 0, sizeof(err));
    g = llm_model_load(gpath, &stub_be, on_progress, &pr, &err);
    if (g == NULL) {
        printf("       %s\n", err.msg);
    }
    h = llm_model_load(hpath, &stub_be, NULL, NULL, &err);
    if (h == NULL) {
        printf("       %s\n", err.msg);
    }
    test_cond(g != NULL && h != NULL);
    if (g == NULL || h == NULL) {
        llm_model_free(g);
        llm_model_free(h);
        return;
    }
    test_cond(g->format == LLM_FORMAT_GGUF && h->format == LLM_FORMAT_HF);
    test_cond(cfg_matches(&g->cfg, s, 1));
    test_cond(cfg_matches(&h->cfg, s, 0));
    test_cond(strcmp(g->cfg.arch, s->bias ? "qwen2" : "llama") == 0);
    test_cond(strcmp(h->cfg.arch, s->bias ? "qwen2" : "llama") == 0);

    test(tname("tiny %s: tensor shapes and types", s->tag));
    test_cond(shapes_ok(g, s, s->gguf_type));
    test_cond(shapes_ok(h, s, s->hf_type));
    n_tensors = 2 + !s->tied + s->layers * (9 + 3 * s->bias);
    test_cond(total_tensors(g) == n_tensors && total_tensors(h) == n_tensors);
    test_cond(g->type_counts[LLM_F32] == (s->gguf_type == LLM_F32
                                          ? n_tensors
                                          : 1 + s->layers * (2 + 3 * s->bias)));
    test_cond(g->weight_bytes > 0 && h->weight_bytes > 0);

    test(tname("tiny %s: same weights in both layouts", s->tag));
    ok = same_f32(&g->out_norm, &h->out_norm);
    for (l = 0; l < s->layers; l++) {
        ok = ok && same_f32(&g->layers[l].attn_norm, &h->layers[l].attn_norm)
             && same_f32(&g->layers[l].ffn_norm, &h->layers[l].ffn_norm);
        if (s->bias) {
            ok = ok && same_f32(&g->layers[l].bq, &h->layers[l].bq)
                 && same_f32(&g->layers[l].bk, &h->layers[l].bk)
                 && same_f32(&g->layers[l].bv, &h->layers[l].bv);
        }
        if (s->gguf_type == LLM_F32 && s->hf_type == LLM_F32) {
            ok = ok && same_f32(&g->layers[l].wv, &h->layers[l].wv)
                 && same_f32(&g->layers[l].wo, &h->layers[l].wo)
                 && same_f32(&g->layers[l].w_down, &h->layers[l].w_down)
                 && permuted_rows_ok(&g->layers[l].wq, &h->layers[l].wq,
                                     s->heads, s->head_dim)
                 && permuted_rows_ok(&g->layers[l].wk, &h->layers[l].wk,
                                     s->kv_heads, s->head_dim);
        }
    }
    if (s->gguf_type == LLM_F32 && s->hf_type == LLM_F32) {
        ok = ok && same_f32(&g->tok_embd, &h->tok_embd)
             && same_f32(&g->output, &h->output);
    }
    test_cond(ok);

    if (s->rope == ROPE_LLAMA3) {
        test("tiny llama3: freq factors from GGUF rope_freqs and from "
             "config.json agree");
        ok = g->cfg.rope.freq_factors != NULL
             && h->cfg.rope.freq_factors != NULL;
        for (l = 0; ok && l < s->head_dim / 2; l++) {
            float a = g->cfg.rope.freq_factors[l];
            float b = h->cfg.rope.freq_factors[l];

            ok = fabsf(a - b) <= 1e-5f * fabsf(a) && a >= 1.0f && a <= 8.0f;
        }
        test_cond(ok);
        /* smallest frequency index unscaled, largest fully scaled */
        test_cond(ok && h->cfg.rope.freq_factors[0] == 1.0f
                  && h->cfg.rope.freq_factors[s->head_dim / 2 - 1] == 8.0f);
    } else {
        test_cond(g->cfg.rope.freq_factors == NULL
                  && h->cfg.rope.freq_factors == NULL);
    }

    test(tname("tiny %s: progress, fingerprint, describe, read_config",
               s->tag));
    test_cond(pr.calls >= 2 && pr.monotonic && pr.last_done == pr.total
              && pr.total > 0);
    test_cond(memcmp(g->fingerprint, h->fingerprint, 32) != 0);
    g2 = llm_model_load(gpath, &stub_be, NULL, NULL, &err);
    test_cond(g2 != NULL
              && memcmp(g->fingerprint, g2->fingerprint, 32) == 0);
    llm_model_free(g2);
    llm_model_describe(g, desc, sizeof(desc));
    snprintf(name, sizeof(name), "layers %d, dim %d, heads %d, kv heads %d",
             s->layers, s->dim, s->heads, s->kv_heads);
    test_cond(strstr(desc, name) != NULL && strstr(desc, "vocab 49152"));
    test_cond(strstr(desc, "fingerprint") != NULL);
    llm_model_describe(h, desc, 40);        /* truncation is safe */
    test_cond(strlen(desc) == 39);

    test_cond(llm_model_read_config(gpath, &rc, &err) == 0
              && cfg_matches(&rc, s, 1) && rc.rope.freq_factors == NULL);
    test_cond(llm_model_read_config(hpath, &rc, &err) == 0
              && cfg_matches(&rc, s, 0) && rc.rope.freq_factors == NULL);

    llm_model_free(g);
    llm_model_free(h);
    test(tname("tiny %s: every backend buffer released", s->tag));
    test_cond(stub_state.n_alloc == stub_state.n_release);
    /* HF f32 data is aligned and adopted; bf16/f16 norms are converted */
    if (s->hf_type == LLM_F32) {
        test_cond(stub_state.n_alloc == 0);
    } else {
        test_cond(stub_state.n_alloc
                  == 1 + s->layers * (2 + 3 * s->bias));
    }
}


TEST_SUITE(loader_tiny_models)
{
    int i;

    for (i = 0; i < N_TINY; i++) {
        check_tiny(i);
    }
}


TEST_SUITE(loader_fingerprint_seed)
{
    const char *dir, *why;
    char        cmd[1024], other[512], p1[600], p2[600];
    llm_err     err;
    llm_model  *a, *b;

    test("a different seed gives a different fingerprint, same config");
    dir = tiny_model(0, &why);
    if (dir == NULL) {
        test_skip(why);
        return;
    }
    snprintf(other, sizeof(other), "%s/tiny-gqa-seed9", llm_test_tmp_dir());
    snprintf(cmd, sizeof(cmd),
             "%s tools/make_tiny_model.py %s --seed 9 --no-hf --vocab-from "
             "'%s' --out '%s'", python(), tiny[0].args,
             llm_test_default_model(), other);
    test_cond(system(cmd) == 0);
    a = llm_model_load(path_join(p1, sizeof(p1), dir, "model.gguf"),
                       &stub_be, NULL, NULL, &err);
    b = llm_model_load(path_join(p2, sizeof(p2), other, "model.gguf"),
                       &stub_be, NULL, NULL, &err);
    test_cond(a != NULL && b != NULL);
    if (a != NULL && b != NULL) {
        test_cond(memcmp(a->fingerprint, b->fingerprint, 32) != 0);
        test_cond(memcmp(&a->cfg, &b->cfg, sizeof(a->cfg)) == 0);
    }
    llm_model_free(a);
    llm_model_free(b);
}


/* ---------------------------------------------------------------------- */
/* The default model                                                        */
/* ---------------------------------------------------------------------- */

TEST_SUITE(loader_default_model)
{
    const char      *path = llm_test_default_model();
    llm_err          err;
    llm_model       *m;
    llm_model_config c;
    char             desc[1024];
    int              l, ok;

    test("default model: SmolLM2-135M config and tensor types");
    if (path == NULL) {
        test_skip("default model not installed");
        return;
    }
    memset(&stub_state, 0, sizeof(stub_state));
    m = llm_model_load(path, &stub_be, NULL, NULL, &err);
    if (m == NULL) {
        printf("       %s\n", err.msg);
    }
    test_cond(m != NULL);
    if (m == NULL) {
        return;
    }
    c = m->cfg;
    test_cond(strcmp(c.arch, "llama") == 0);
    test_cond(c.n_layers == 30 && c.dim == 576 && c.n_heads == 9
              && c.n_kv_heads == 3 && c.head_dim == 64 && c.ffn_dim == 1536
              && c.n_vocab == 49152 && c.n_ctx == 8192);
    test_cond(c.rope.freq_base == 100000.0f && c.rope.n_rot == 64
              && c.rope.neox == 0 && c.rope.freq_scale == 1.0f
              && c.rope.freq_factors == NULL);
    test_cond(fabsf(c.norm_eps - 1e-5f) < 1e-9f);
    test_cond(c.tied_embeddings == 1 && c.qkv_bias == 0);
    test_cond(m->type_counts[LLM_Q4_1] == 210 && m->type_counts[LLM_Q8_0] == 1
              && m->type_counts[LLM_F32] == 61 && total_tensors(m) == 272);
    test_cond(m->tok_embd.type == LLM_Q8_0
              && m->output.data == m->tok_embd.data);
    ok = 1;
    for (l = 0; l < 30; l++) {
        ok = ok && m->layers[l].wq.type == LLM_Q4_1
             && m->layers[l].wk.ne[1] == 192 && m->layers[l].wk.ne[0] == 576
             && m->layers[l].w_down.ne[0] == 1536
             && m->layers[l].attn_norm.type == LLM_F32;
    }
    test_cond(ok);
    test_cond(stub_state.n_alloc == 0 && stub_state.n_adopt == 272);
    /* all of the file's tensor bytes */
    test_cond(m->weight_bytes > 90u << 20 && m->weight_bytes < 110u << 20);

    test("default model: describe");
    llm_model_describe(m, desc, sizeof(desc));
    test_cond(strstr(desc, "layers 30, dim 576, heads 9, kv heads 3, "
                           "head_dim 64, ffn 1536, vocab 49152, ctx 8192")
              != NULL);
    test_cond(strstr(desc, "Q4_1 x210") && strstr(desc, "Q8_0 x1")
              && strstr(desc, "F32 x61") && strstr(desc, "tied"));
    llm_model_free(m);

    test("default model: read_config alone");
    test_cond(llm_model_read_config(path, &c, &err) == 0 && c.dim == 576
              && c.n_layers == 30 && c.tied_embeddings == 1);
}


/* ---------------------------------------------------------------------- */
/* Damaged files                                                            */
/* ---------------------------------------------------------------------- */

TEST_SUITE(loader_gguf_damage)
{
    const char            *dir, *why;
    char                   src[600], path[600];
    llm_err                err;
    llm_gguf              *gg;
    off_t                  size, cuts[64], off;
    size_t                 data_off = 0, info0 = 0, infoN = 0;
    size_t                 kv_mid = 0, tok_first = 0;
    int                    n_cuts = 0, i, fd, ok;

    test("GGUF truncated at many points: NULL, message names the file");
    dir = tiny_model(3, &why);
    if (dir == NULL) {
        test_skip(why);
        return;
    }
    path_join(src, sizeof(src), dir, "model.gguf");
    path_join(path, sizeof(path), llm_test_tmp_dir(), "damaged.gguf");
    test_cond(copy_file(src, path));
    size = file_size(path);

    /* where the sections are, from the intact file */
    gg = llm_gguf_open(src, &err);
    test_cond(gg != NULL);
    if (gg == NULL) {
        return;
    }
    data_off = gg->data_offset;
    info0 = (size_t) ((const uint8_t *) gg->tensors[0].name.p - gg->map) - 8;
    infoN = (size_t) ((const uint8_t *) gg->tensors[gg->n_tensors - 1].name.p
                      - gg->map) - 8;
    {
        const llm_gguf_kv *kv = llm_gguf_find(gg, "tokenizer.ggml.tokens");
        kv_mid = kv != NULL ? kv->str_off[kv->arr_n / 2] + 3 : info0 / 2;
        tok_first = kv != NULL ? kv->str_off[0] : 100;
    }
    llm_gguf_close(gg);

    /* descending, so one copy can be cut shorter and shorter */
    cuts[n_cuts++] = size - 1;
    cuts[n_cuts++] = size - 4096;
    cuts[n_cuts++] = (off_t) data_off + (size - (off_t) data_off) / 2;
    cuts[n_cuts++] = (off_t) data_off + 100;
    cuts[n_cuts++] = (off_t) data_off + 1;
    cuts[n_cuts++] = (off_t) data_off;
    cuts[n_cuts++] = (off_t) data_off - 1;
    cuts[n_cuts++] = (off_t) infoN + 20;
    cuts[n_cuts++] = (off_t) infoN + 3;
    cuts[n_cuts++] = (off_t) (info0 + infoN) / 2;
    cuts[n_cuts++] = (off_t) info0 + 9;
    cuts[n_cuts++] = (off_t) info0;
    cuts[n_cuts++] = (off_t) info0 - 1;
    cuts[n_cuts++] = (off_t) kv_mid;
    cuts[n_cuts++] = (off_t) tok_first + 5;
    cuts[n_cuts++] = 1000;
    cuts[n_cuts++] = 100;
    cuts[n_cuts++] = 40;
    cuts[n_cuts++] = 30;
    cuts[n_cuts++] = 24;
    cuts[n_cuts++] = 23;
    cuts[n_cuts++] = 16;
    cuts[n_cuts++] = 8;
    cuts[n_cuts++] = 4;
    cuts[n_cuts++] = 0;
    ok = 1;
    for (i = 0; i < n_cuts; i++) {
        if (i > 0 && cuts[i] > cuts[i - 1]) {
            continue;
        }
        if (truncate(path, cuts[i]) != 0) {
            ok = 0;
            break;
        }
        if (!load_fails(path, path, NULL)) {
            printf("       (cut at %lld of %lld)\n", (long long) cuts[i],
                   (long long) size);
            ok = 0;
        }
    }
    test_cond(ok);

    test("GGUF with flipped header bytes: NULL, message names the file");
    test_cond(copy_file(src, path));
    {
        /* magic, version, the counts' high bytes, the first key's length
         * and type, the architecture string, the first and last tensor
         * infos (name, n_dims, ne[0] low and high, type, offset) */
        off_t flips[] = {
            0, 3, 4, 15, 23, 31, 24 + 8 + 20, 24 + 8 + 20 + 4 + 8 + 1,
            (off_t) info0 + 8 + 2,
        };
        size_t infos[2] = { info0, infoN };
        int    k;

        ok = 1;
        for (i = 0; i < (int) (sizeof(flips) / sizeof(flips[0])); i++) {
            flip_byte(path, flips[i]);
            if (!load_fails(path, path, NULL)) {
                printf("       (flip at %lld)\n", (long long) flips[i]);
                ok = 0;
            }
            flip_byte(path, flips[i]);
        }
        for (k = 0; k < 2; k++) {
            uint64_t nlen;
            uint32_t nd;
            off_t    p;
            off_t    f[6];

            fd = open(path, O_RDONLY);
            if (pread(fd, &nlen, 8, (off_t) infos[k]) != 8
                || pread(fd, &nd, 4, (off_t) (infos[k] + 8 + nlen)) != 4)
            {
                ok = 0;
            }
            close(fd);
            p = (off_t) (infos[k] + 8 + nlen);
            f[0] = p;                           /* n_dims */
            f[1] = p + 4;                       /* ne[0] low byte */
            f[2] = p + 4 + 7;                   /* ne[0] high byte */
            f[3] = p + 4 + 8 * nd;              /* type */
            f[4] = p + 4 + 8 * nd + 4;          /* offset low byte */
            f[5] = p + 4 + 8 * nd + 4 + 7;      /* offset high byte */
            for (i = 0; i < 6; i++) {
                flip_byte(path, f[i]);
                if (!load_fails(path, path, NULL)) {
                    printf("       (flip at %lld, tensor info %d)\n",
                           (long long) f[i], k);
                    ok = 0;
                }
                flip_byte(path, f[i]);
            }
        }
        test_cond(ok);
    }

    test("GGUF with bytes flipped all over the header: never crashes");
    {
        int n_fail = 0, n_ok = 0, bad = 0;
        llm_model *m;

        for (off = 0; off < (off_t) data_off + 64; ) {
            flip_byte(path, off);
            memset(&err, 0, sizeof(err));
            m = llm_model_load(path, &stub_be, NULL, NULL, &err);
            if (m == NULL) {
                n_fail++;
                if (strstr(err.msg, path) == NULL) {
                    printf("       flip at %lld: \"%s\"\n", (long long) off,
                           err.msg);
                    bad++;
                }
            } else {
                n_ok++;
                llm_model_free(m);
            }
            flip_byte(path, off);
            /* dense over the fixed header and the tensor infos, sparse
             * over the token strings */
            if (off < 2048 || off >= (off_t) info0 - 64) {
                off += off < 2048 ? 7 : 5;
            } else {
                off += 9973;
            }
        }
        if (getenv("LLM_TEST_VERBOSE") != NULL) {
            printf("       %d flips refused, %d loaded\n", n_fail, n_ok);
        }
        test_cond(bad == 0 && n_fail > 50);
    }

    test("GGUF: missing tensor, renamed in the file");
    test_cond(copy_file(src, path));
    test_cond(patch_file(path, "blk.0.ffn_up.weight", "blk.0.ffn_UP.weight"));
    test_cond(load_fails(path, path, "missing tensor \"blk.0.ffn_up.weight\""));

    test("GGUF: unsupported architecture");
    test_cond(copy_file(src, path));
    test_cond(patch_file(path, "llama", "gpt2x"));
    test_cond(load_fails(path, path, "\"gpt2x\" is not supported"));

    test("GGUF: missing file, a folder without config.json");
    test_cond(load_fails("/nonexistent/model.gguf", "/nonexistent/model.gguf",
                         NULL));
    test_cond(load_fails(llm_test_tmp_dir(), llm_test_tmp_dir(),
                         "config.json"));
    unlink(path);
}


/* A minimal GGUF: no metadata, one F32 tensor "t" of n_dims dims ne,
 * followed by n_data bytes of data. */
static int
write_gguf1(const char *path, int n_dims, const uint64_t *ne,
            size_t n_data)
{
    uint8_t  buf[4096];
    size_t   n = 0;
    uint32_t u32;
    uint64_t u64;
    int      d;

#define PUT(p, len) (memcpy(buf + n, (p), (len)), n += (len))
    PUT("GGUF", 4);
    u32 = 3;
    PUT(&u32, 4);
    u64 = 1;                            /* tensors */
    PUT(&u64, 8);
    u64 = 0;                            /* metadata */
    PUT(&u64, 8);
    u64 = 1;
    PUT(&u64, 8);
    PUT("t", 1);
    u32 = (uint32_t) n_dims;
    PUT(&u32, 4);
    for (d = 0; d < n_dims; d++) {
        PUT(&ne[d], 8);
    }
    u32 = LLM_F32;
    PUT(&u32, 4);
    u64 = 0;                            /* offset */
    PUT(&u64, 8);
#undef PUT
    n = (n + 31) / 32 * 32;
    memset(buf + n, 0x3f, n_data);
    return n + n_data <= sizeof(buf) && write_file(path, buf, n + n_data);
}


TEST_SUITE(loader_gguf_reader)
{
    char             path[600];
    llm_err          err;
    llm_gguf        *g;
    uint64_t         ok_ne[2] = { 4, 2 };
    uint64_t         wrap_ne[3] = { 32, 1ull << 32, 1ull << 32 };
    uint64_t         big_ne[4] = { 1ull << 40, 1ull << 40, 1ull << 40,
                                   1ull << 40 };

    path_join(path, sizeof(path), llm_test_tmp_dir(), "mini.gguf");

    test("GGUF reader: a minimal file opens");
    test_cond(write_gguf1(path, 2, ok_ne, 32));
    g = llm_gguf_open(path, &err);
    test_cond(g != NULL && g->n_tensors == 1 && g->tensors[0].nbytes == 32
              && g->tensors[0].ne[1] == 2);
    llm_gguf_close(g);
    test_cond(write_gguf1(path, 2, ok_ne, 31));
    g = llm_gguf_open(path, &err);
    test_cond(g == NULL && strstr(err.msg, path) && strstr(err.msg, "\"t\""));

    test("GGUF reader: element counts that overflow 64 bits are refused");
    test_cond(write_gguf1(path, 3, wrap_ne, 128));
    g = llm_gguf_open(path, &err);
    test_cond(g == NULL && strstr(err.msg, path) != NULL);
    llm_gguf_close(g);
    test_cond(write_gguf1(path, 4, big_ne, 128));
    g = llm_gguf_open(path, &err);
    test_cond(g == NULL && strstr(err.msg, path) != NULL);
    llm_gguf_close(g);
}


/* A copy of the HF folder of tiny model i in dst, config.json parsed for
 * editing (the caller frees it). */
static json_t *
hf_copy(int i, const char *dst)
{
    const char  *dir, *why;
    char         a[700], b[700], hf[600];
    json_error_t je;

    if ((dir = tiny_model(i, &why)) == NULL) {
        return NULL;
    }
    path_join(hf, sizeof(hf), dir, "hf");
    mkdir(dst, 0700);
    path_join(a, sizeof(a), hf, "model.safetensors");
    if (file_size(a) > 0) {
        copy_file(a, path_join(b, sizeof(b), dst, "model.safetensors"));
    }
    return json_load_file(path_join(a, sizeof(a), hf, "config.json"), 0,
                          &je);
}


static int
config_fails(const char *dir, json_t *cfg, const char *must)
{
    char cfile[700];

    path_join(cfile, sizeof(cfile), dir, "config.json");
    if (json_dump_file(cfg, cfile, JSON_INDENT(1)) != 0) {
        return 0;
    }
    return load_fails(dir, dir, must);
}


TEST_SUITE(loader_hf_damage)
{
    char          dir[600], st[700], shard[700], idx[700], cfile[700];
    json_t       *cfg, *c;
    llm_err       err;
    llm_model    *m;
    off_t         size, cuts[16];
    int           i, ok;

    test("HF: a good copy loads");
    path_join(dir, sizeof(dir), llm_test_tmp_dir(), "hf-damaged");
    cfg = hf_copy(0, dir);
    if (cfg == NULL) {
        test_skip("tiny model not available");
        return;
    }
    path_join(st, sizeof(st), dir, "model.safetensors");
    path_join(cfile, sizeof(cfile), dir, "config.json");
    json_dump_file(cfg, cfile, 0);
    m = llm_model_load(dir, &stub_be, NULL, NULL, &err);
    test_cond(m != NULL);
    llm_model_free(m);

    test("HF: config.json missing fields or inconsistent");
    c = json_deep_copy(cfg);
    json_object_del(c, "hidden_size");
    test_cond(config_fails(dir, c, "\"hidden_size\" is missing"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_del(c, "num_hidden_layers");
    test_cond(config_fails(dir, c, "config.json"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "num_attention_heads", json_integer(5));
    json_object_del(c, "head_dim");
    test_cond(config_fails(dir, c, "not a multiple of the 5 attention"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "num_key_value_heads", json_integer(3));
    test_cond(config_fails(dir, c, "key/value heads"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "hidden_size", json_string("64"));
    test_cond(config_fails(dir, c, "\"hidden_size\" must be"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "model_type", json_string("gpt_neox"));
    test_cond(config_fails(dir, c, "\"gpt_neox\" is not supported"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "rope_scaling",
                        json_pack("{s:s, s:f}", "rope_type", "yarn",
                                  "factor", 4.0));
    test_cond(config_fails(dir, c, "\"yarn\" is not supported"));
    json_decref(c);

    test("HF: a tensor shape that disagrees with config.json");
    c = json_deep_copy(cfg);
    json_object_set_new(c, "intermediate_size", json_integer(96));
    test_cond(config_fails(dir, c, "model.layers.0.mlp.gate_proj.weight"));
    test_cond(config_fails(dir, c, "has shape [128, 64], expected [96, 64]"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "vocab_size", json_integer(49153));
    test_cond(config_fails(dir, c, "model.embed_tokens.weight"));
    json_decref(c);
    c = json_deep_copy(cfg);
    json_object_set_new(c, "head_dim", json_integer(8));
    test_cond(config_fails(dir, c, "self_attn.q_proj.weight"));
    json_decref(c);

    test("HF: not JSON");
    write_file(cfile, "{\"model_type\": ", 15);
    test_cond(load_fails(dir, cfile, NULL));
    json_dump_file(cfg, cfile, 0);

    test("HF: unsupported dtype, missing tensor");
    test_cond(patch_file(st, "\"model.norm.weight\":{\"dtype\":\"F32\"",
                         "\"model.norm.weight\":{\"dtype\":\"I32\""));
    test_cond(load_fails(dir, st, "unsupported type I32"));
    test_cond(patch_file(st, "\"model.norm.weight\":{\"dtype\":\"I32\"",
                         "\"model.norX.weight\":{\"dtype\":\"F32\""));
    test_cond(load_fails(dir, dir, "missing tensor \"model.norm.weight\""));
    test_cond(patch_file(st, "\"model.norX.weight\"", "\"model.norm.weight\""));
    m = llm_model_load(dir, &stub_be, NULL, NULL, &err);
    test_cond(m != NULL);
    llm_model_free(m);

    test("HF: truncated or corrupted safetensors");
    size = file_size(st);
    cuts[0] = size - 1;
    cuts[1] = size / 2;
    cuts[2] = 2000;
    cuts[3] = 100;
    cuts[4] = 9;
    cuts[5] = 8;
    cuts[6] = 5;
    cuts[7] = 0;
    ok = 1;
    for (i = 0; i < 8; i++) {
        if (truncate(st, cuts[i]) != 0 || !load_fails(dir, st, NULL)) {
            printf("       (cut at %lld)\n", (long long) cuts[i]);
            ok = 0;
        }
    }
    test_cond(ok);
    json_decref(cfg);
    cfg = hf_copy(0, dir);
    for (i = 0; i < 8 && cfg != NULL; i++) {
        /* length bytes, the opening brace, a quote, a digit */
        static const off_t fl[] = { 0, 3, 7, 8, 9, 40, 200, 1000 };

        flip_byte(st, fl[i]);
        if (!load_fails(dir, st, NULL)) {
            printf("       (flip at %lld)\n", (long long) fl[i]);
            ok = 0;
        }
        flip_byte(st, fl[i]);
    }
    test_cond(ok);
    m = llm_model_load(dir, &stub_be, NULL, NULL, &err);
    test_cond(m != NULL);
    llm_model_free(m);
    json_decref(cfg);

    test("HF sharded: a missing shard, a tensor in the wrong shard");
    {
        const char *sdir, *why;
        char        sh[600], tmp[700];
        FILE       *f;
        char       *text;
        long        n;

        sdir = tiny_model(1, &why);
        if (sdir == NULL) {
            test_skip(why);
            return;
        }
        path_join(sh, sizeof(sh), sdir, "hf");
        path_join(idx, sizeof(idx), sh, "model.safetensors.index.json");
        path_join(shard, sizeof(shard), sh,
                  "model-00003-of-00003.safetensors");
        path_join(tmp, sizeof(tmp), sh, "moved.safetensors");
        test_cond(rename(shard, tmp) == 0);
        test_cond(load_fails(sh, "model-00003-of-00003.safetensors", NULL));
        test_cond(rename(tmp, shard) == 0);

        /* point the last tensor at the first shard */
        f = fopen(idx, "rb");
        text = malloc(1 << 20);
        n = f ? (long) fread(text, 1, (1 << 20) - 1, f) : 0;
        if (f) {
            fclose(f);
        }
        text[n] = '\0';
        copy_file(idx, path_join(tmp, sizeof(tmp), sh, "index.bak"));
        {
            char *p = strstr(text, "model-00003-of-00003");

            if (p != NULL) {
                memcpy(p, "model-00001-of-00003", 20);
            }
            test_cond(p != NULL);
        }
        write_file(idx, text, (size_t) n);
        test_cond(load_fails(sh, "model-00001-of-00003.safetensors",
                             "listed in model.safetensors.index.json"));
        /* a shard name leaving the folder */
        {
            char *p = strstr(text, "model-00001-of-00003");

            if (p != NULL) {
                memcpy(p, "../../../../etc/pass", 20);
            }
        }
        write_file(idx, text, (size_t) n);
        test_cond(load_fails(sh, idx, "bad file name"));
        copy_file(tmp, idx);
        unlink(tmp);
        free(text);
        m = llm_model_load(sh, &stub_be, NULL, NULL, &err);
        test_cond(m != NULL);
        llm_model_free(m);
    }
}


/* ---------------------------------------------------------------------- */
/* Failing allocations                                                      */
/* ---------------------------------------------------------------------- */

static int fail_after;

static void *
fail_malloc(size_t n)
{
    return fail_after-- > 0 ? malloc(n) : NULL;
}


static void *
fail_calloc(size_t n, size_t s)
{
    return fail_after-- > 0 ? calloc(n, s) : NULL;
}


static void *
fail_realloc(void *p, size_t n)
{
    return fail_after-- > 0 ? realloc(p, n) : NULL;
}


TEST_SUITE(loader_nomem)
{
    static const llm_allocators fa = { fail_malloc, fail_calloc,
                                       fail_realloc, free };
    const char *dir, *why;
    char        path[600];
    int         k, n, ok, nomem;
    llm_err     err;
    llm_model  *m = NULL;

    for (k = 0; k < 2; k++) {
        test(tname("every allocation failure is reported (%s)",
                   k == 0 ? "GGUF" : "HF"));
        dir = tiny_model(1, &why);
        if (dir == NULL) {
            test_skip(why);
            return;
        }
        path_join(path, sizeof(path), dir, k == 0 ? "model.gguf" : "hf");
        memset(&stub_state, 0, sizeof(stub_state));
        ok = 1;
        nomem = 0;
        for (n = 0; n < 10000; n++) {
            fail_after = n;
            llm_set_allocators(&fa);
            memset(&err, 0, sizeof(err));
            m = llm_model_load(path, &stub_be, NULL, NULL, &err);
            llm_reset_allocators();
            if (m != NULL) {
                break;
            }
            if (err.code != LLM_ENOMEM || strstr(err.msg, "out of memory")
                == NULL)
            {
                printf("       after %d allocations: %s\n", n, err.msg);
                ok = 0;
                break;
            }
            nomem++;
        }
        test_cond(ok && m != NULL && nomem >= 5);
        llm_model_free(m);
        test_cond(stub_state.n_alloc == stub_state.n_release);
    }
}
