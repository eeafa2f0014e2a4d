/*
 * LoRA adapters (adapters/lora.c, adapters/registry.c) and the adapter
 * tools (tools/make_lora.py, tools/merge_lora.py).
 *
 * Adapters come from tools/make_lora.py for a fake base (a folder with
 * only config.json: make_lora reads nothing else), for the tiny models of
 * tools/make_tiny_model.py and for the default model; broken ones are
 * written here (config text, safetensors files built byte by byte).
 * Every refusal must name the file and the field or tensor.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"
#include "../../adapters/lora.h"
#include "../../adapters/registry.h"
#include "../../engine/gguf.h"
#include "../../engine/safetensors.h"
#include "../../kernels/dtype.h"


/* ---------------------------------------------------------------------- */
/* Helpers                                                                  */
/* ---------------------------------------------------------------------- */

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


/* 1 if python3 with numpy (and gguf when need_gguf) runs. */
static int
have_python(int need_gguf)
{
    static int state[2] = { -1, -1 };
    char       cmd[256];

    if (state[need_gguf] < 0) {
        snprintf(cmd, sizeof(cmd), "%s -c 'import numpy%s' >/dev/null 2>&1",
                 python(), need_gguf ? ", gguf" : "");
        state[need_gguf] = system(cmd) == 0;
    }
    return state[need_gguf];
}


static char *
path_join(char *buf, size_t size, const char *a, const char *b)
{
    snprintf(buf, size, "%s/%s", a, b);
    return buf;
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


/* A fresh folder under the scratch folder. */
static const char *
scratch(const char *name)
{
    static char dirs[8][512];
    static int  next;
    char       *d = dirs[next++ % 8], cmd[600];

    path_join(d, sizeof(dirs[0]), llm_test_tmp_dir(), name);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s' && mkdir -p '%s'", d, d);
    if (system(cmd) != 0) {
        return NULL;
    }
    return d;
}


/* The base of the fake model: make_lora.py only reads config.json. */
#define F_LAYERS   2
#define F_DIM      64
#define F_HEADS    4
#define F_KV       2
#define F_HD       16
#define F_FFN      128

static llm_model_config
fake_cfg(int neox)
{
    llm_model_config c;

    memset(&c, 0, sizeof(c));
    snprintf(c.arch, sizeof(c.arch), "llama");
    c.n_vocab = 1000;
    c.dim = F_DIM;
    c.n_layers = F_LAYERS;
    c.n_heads = F_HEADS;
    c.n_kv_heads = F_KV;
    c.head_dim = F_HD;
    c.ffn_dim = F_FFN;
    c.n_ctx = 2048;
    c.norm_eps = 1e-5f;
    c.rope.n_rot = F_HD;
    c.rope.neox = neox;
    c.rope.freq_base = 10000.0f;
    c.rope.freq_scale = 1.0f;
    return c;
}


static const char *
fake_base(void)
{
    static char dir[512];
    static int  state;
    char        path[600];
    const char *cfg =
        "{\"model_type\": \"llama\", \"hidden_size\": 64, "
        "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
        "\"num_key_value_heads\": 2, \"head_dim\": 16, "
        "\"intermediate_size\": 128, \"_name_or_path\": \"fake/base\"}\n";

    if (state == 0) {
        path_join(dir, sizeof(dir), llm_test_tmp_dir(), "fake-base");
        mkdir(dir, 0700);
        path_join(path, sizeof(path), dir, "config.json");
        state = write_file(path, cfg, strlen(cfg)) ? 1 : -1;
    }
    return state > 0 ? dir : NULL;
}


/* tools/make_lora.py --base base --out out args; 1 on success. */
static int
make_lora(const char *base, const char *out, const char *args)
{
    char cmd[2048];

    snprintf(cmd, sizeof(cmd), "%s tools/make_lora.py --base '%s' --out "
             "'%s' %s", python(), base, out, args);
    return system(cmd) == 0;
}


/* An adapter of the fake base, made once per tag. */
static const char *
fake_lora(const char *tag, const char *args, const char **why)
{
    static struct { char tag[32]; char dir[512]; int ok; } made[32];
    static int n_made;
    char       dir[512];
    int        i;

    *why = NULL;
    if (!have_python(0)) {
        *why = "python3 with numpy not available";
        return NULL;
    }
    if (fake_base() == NULL) {
        *why = "cannot write the fake base";
        return NULL;
    }
    for (i = 0; i < n_made; i++) {
        if (strcmp(made[i].tag, tag) == 0) {
            if (!made[i].ok) {
                *why = "tools/make_lora.py failed";
            }
            return made[i].ok ? made[i].dir : NULL;
        }
    }
    if (n_made == 32) {
        *why = "too many adapters";
        return NULL;
    }
    snprintf(dir, sizeof(dir), "%s/lora-%s", llm_test_tmp_dir(), tag);
    snprintf(made[n_made].tag, sizeof(made[0].tag), "%s", tag);
    snprintf(made[n_made].dir, sizeof(made[0].dir), "%s", dir);
    made[n_made].ok = make_lora(fake_base(), dir, args);
    n_made++;
    if (!made[n_made - 1].ok) {
        *why = "tools/make_lora.py failed";
        return NULL;
    }
    return made[n_made - 1].dir;
}


/* Adapters several suites share (made once, whichever suite runs
 * first). */
#define ALL4_ARGS  "--rank 4 --alpha 8 --seed 1 --targets q,k,v,o,gate,up,down"
#define PAT_ARGS   "--rank 8 --alpha 16 --targets q,v,down --rank-pattern " \
                   "'q_proj=4,layers.1.mlp.down_proj=2' --alpha-pattern "  \
                   "'v_proj=32' --seed 3"


static const char *const tnames[] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
};


static const char *
peft_key(char *buf, size_t size, int layer, int t, char ab)
{
    snprintf(buf, size, "base_model.model.model.layers.%d.%s.lora_%c.weight",
             layer, tnames[t], ab);
    return buf;
}


static float
st_val(const llm_st_tensor *t, size_t i)
{
    uint16_t h;
    float    f;

    if (t->type == LLM_F32) {
        memcpy(&f, (const uint8_t *) t->data + 4 * i, 4);
        return f;
    }
    memcpy(&h, (const uint8_t *) t->data + 2 * i, 2);
    return t->type == LLM_F16 ? llm_f16_to_f32(h) : llm_bf16_to_f32(h);
}


/* Compares every A and B of lo with dir's file; B of q/k through the
 * GGUF interleave when permuted.  1 if all equal. */
static int
same_as_file(const llm_lora *lo, const char *dir, int permuted)
{
    llm_safetensors *st;
    char             path[600], key[160];
    int              l, t, ok = 1;

    path_join(path, sizeof(path), dir, LLM_LORA_WEIGHTS_FILE);
    st = llm_safetensors_open(path, NULL);
    if (st == NULL) {
        return 0;
    }
    for (l = 0; l < lo->n_layers && ok; l++) {
        for (t = 0; t < LLM_LORA_N_TARGETS && ok; t++) {
            const llm_lora_weight *w = llm_lora_at(lo, l, t);
            const llm_st_tensor   *a, *b;
            int                    r, c, h, i, j, half;

            a = llm_safetensors_find(st, peft_key(key, sizeof(key), l, t,
                                                  'A'));
            b = llm_safetensors_find(st, peft_key(key, sizeof(key), l, t,
                                                  'B'));
            if (w->rank == 0) {
                ok = a == NULL && b == NULL;
                continue;
            }
            if (a == NULL || b == NULL || a->shape[0] != w->rank
                || a->shape[1] != w->in || b->shape[0] != w->out)
            {
                ok = 0;
                break;
            }
            for (i = 0; i < w->rank * w->in; i++) {
                ok = ok && w->a[i] == st_val(a, (size_t) i);
            }
            if (permuted && (t == LLM_LORA_Q || t == LLM_LORA_K)) {
                /* per head: row 2i + j of ours is row j * hd / 2 + i of
                 * the file */
                half = F_HD / 2;
                for (h = 0; h < w->out / F_HD; h++) {
                    for (i = 0; i < half; i++) {
                        for (j = 0; j < 2; j++) {
                            int dr = h * F_HD + 2 * i + j;
                            int sr = h * F_HD + j * half + i;

                            for (c = 0; c < w->rank; c++) {
                                ok = ok && w->b[dr * w->rank + c]
                                           == st_val(b, (size_t) (sr
                                                     * w->rank + c));
                            }
                        }
                    }
                }
            } else {
                for (r = 0; r < w->out * w->rank; r++) {
                    ok = ok && w->b[r] == st_val(b, (size_t) r);
                }
            }
        }
    }
    llm_safetensors_close(st);
    return ok;
}


static int
near(float a, float b)
{
    return fabsf(a - b) <= 1e-6f * (1.0f + fabsf(b));
}


/* ---------------------------------------------------------------------- */
/* Loading                                                                  */
/* ---------------------------------------------------------------------- */

TEST_SUITE(lora_load)
{
    llm_model_config hf = fake_cfg(1), gg = fake_cfg(0);
    llm_lora        *lo = NULL, *lo2 = NULL;
    llm_lora_info    info;
    llm_err          err;
    const char      *dir, *why;
    size_t           bytes;
    uint8_t          vw[32];
    int              l, t, ok, rc;

    memset(vw, 0, sizeof(vw));
    test("make_lora.py writes a peft adapter");
    dir = fake_lora("all4", ALL4_ARGS, &why);
    if (dir == NULL) {
        test_skip(why);
        return;
    }
    {
        char path[600];
        struct stat sb;

        test_cond(stat(path_join(path, sizeof(path), dir,
                                 LLM_LORA_CONFIG_FILE), &sb) == 0);
        test_cond(stat(path_join(path, sizeof(path), dir,
                                 LLM_LORA_WEIGHTS_FILE), &sb) == 0);
    }

    test("load: ranks, scales (alpha / r), dims, targets, bytes");
    memset(&err, 0, sizeof(err));
    rc = llm_lora_load(dir, &hf, &lo, &err);
    if (rc != 0) {
        printf("       %s\n", err.msg);
    }
    test_cond(rc == 0 && lo != NULL);
    if (lo == NULL) {
        return;
    }
    test_cond(lo->n_layers == F_LAYERS && lo->max_rank == 4);
    test_cond(lo->targets == LLM_LORA_ALL_TARGETS);
    test_cond(lo->n_weights == F_LAYERS * LLM_LORA_N_TARGETS);
    test_cond(lo->permuted == 0);
    test_cond(strcmp(lo->base_model, "fake/base") == 0);
    ok = 1;
    bytes = 0;
    for (l = 0; l < F_LAYERS; l++) {
        static const int ins[] = { 64, 64, 64, 64, 64, 64, 128 };
        static const int outs[] = { 64, 32, 32, 64, 128, 128, 64 };

        for (t = 0; t < LLM_LORA_N_TARGETS; t++) {
            llm_lora_weight *w = llm_lora_at(lo, l, t);

            ok = ok && w->rank == 4 && w->scale == 2.0f
                 && w->in == ins[t] && w->out == outs[t]
                 && w->a == lo->data + w->a_off
                 && w->b == lo->data + w->b_off
                 && w->a_off % 16 == 0 && w->b_off % 16 == 0;
            bytes += 4 * (size_t) 4 * (ins[t] + outs[t]);
        }
    }
    test_cond(ok);
    test_cond(lo->bytes == bytes);     /* every size a multiple of 16 */
    test_cond(strlen(lo->version_hex) == 16);

    test("check (header only) predicts what load gives");
    memset(&info, 0, sizeof(info));
    test_cond(llm_lora_check(dir, &hf, &info, &err) == 0);
    test_cond(info.bytes == lo->bytes && info.max_rank == 4
              && info.r == 4 && info.alpha == 8.0f && !info.use_rslora
              && info.targets == lo->targets
              && info.n_weights == lo->n_weights
              && strcmp(info.base_model, "fake/base") == 0);

    test("A and B equal the file (Hugging Face base: no permutation)");
    test_cond(same_as_file(lo, dir, 0));

    test("GGUF llama base: B of q and k permuted, the rest as is");
    rc = llm_lora_load(dir, &gg, &lo2, &err);
    test_cond(rc == 0 && lo2 != NULL && lo2->permuted == 1);
    if (lo2 != NULL) {
        test_cond(same_as_file(lo2, dir, 1));
        test_cond(!same_as_file(lo2, dir, 0));
        /* the public helper does the same */
        {
            llm_lora_weight *w = llm_lora_at(lo, 1, LLM_LORA_K);
            float            tmp[32 * 4];

            llm_lora_permute_rows(tmp, w->b, w->out, w->rank, F_HD);
            test_cond(memcmp(tmp, llm_lora_at(lo2, 1, LLM_LORA_K)->b,
                             sizeof(float) * (size_t) (w->out * w->rank))
                      == 0);
        }
        /* the content version does not depend on the base's layout */
        test_cond(memcmp(lo->version, lo2->version, 32) == 0);
    }
    llm_lora_free(lo2);
    lo2 = NULL;

    test("same files give the same version, in any folder");
    {
        const char *copy = scratch("copy-all4");
        char        s[600], d[600];

        test_cond(copy != NULL
                  && copy_file(path_join(s, sizeof(s), dir,
                                         LLM_LORA_CONFIG_FILE),
                               path_join(d, sizeof(d), copy,
                                         LLM_LORA_CONFIG_FILE))
                  && copy_file(path_join(s, sizeof(s), dir,
                                         LLM_LORA_WEIGHTS_FILE),
                               path_join(d, sizeof(d), copy,
                                         LLM_LORA_WEIGHTS_FILE)));
        test_cond(llm_lora_load(copy, &hf, &lo2, &err) == 0);
        test_cond(lo2 != NULL && memcmp(lo->version, lo2->version, 32) == 0);
        llm_lora_free(lo2);
        lo2 = NULL;

        test("one changed byte of weights or config: a new version");
        {
            FILE *f = fopen(d, "r+b");      /* the safetensors copy */
            long  sz;
            int   c;

            test_cond(f != NULL);
            if (f != NULL) {
                fseek(f, 0, SEEK_END);
                sz = ftell(f);
                fseek(f, sz - 3, SEEK_SET);
                c = fgetc(f);
                fseek(f, sz - 3, SEEK_SET);
                fputc(c ^ 1, f);
                fclose(f);
            }
            test_cond(llm_lora_load(copy, &hf, &lo2, &err) == 0);
            test_cond(lo2 != NULL
                      && memcmp(lo->version, lo2->version, 32) != 0);
            if (lo2 != NULL) {
                memcpy(vw, lo2->version, 32);
            }
            llm_lora_free(lo2);
            lo2 = NULL;
        }
        {
            llm_lora *lo3 = NULL;
            char      cfgtxt[4096];
            FILE     *f;
            size_t    n = 0;

            path_join(d, sizeof(d), copy, LLM_LORA_CONFIG_FILE);
            f = fopen(d, "rb");
            if (f != NULL) {
                n = fread(cfgtxt, 1, sizeof(cfgtxt) - 2, f);
                fclose(f);
            }
            /* same meaning and length, other bytes */
            cfgtxt[n] = '\0';
            if (strchr(cfgtxt, '\n') != NULL) {
                *strchr(cfgtxt, '\n') = ' ';
            }
            test_cond(write_file(d, cfgtxt, n));
            test_cond(llm_lora_load(copy, &hf, &lo2, &err) == 0);
            test_cond(llm_lora_load(copy, &hf, &lo3, &err) == 0);
            test_cond(lo2 != NULL && lo3 != NULL
                      && memcmp(vw, lo2->version, 32) != 0
                      && memcmp(lo2->version, lo3->version, 32) == 0);
            llm_lora_free(lo2);
            llm_lora_free(lo3);
            lo2 = NULL;
        }
    }

    test("key variants: adapter name in keys, no base_model.model. prefix");
    {
        const char *d1, *d2;

        d1 = fake_lora("all4-named", ALL4_ARGS " --key-adapter-name "
                       "default", &why);
        d2 = fake_lora("all4-bare", ALL4_ARGS " --no-prefix", &why);
        test_cond(d1 != NULL && d2 != NULL);
        for (l = 0; l < 2 && d1 != NULL && d2 != NULL; l++) {
            rc = llm_lora_load(l == 0 ? d1 : d2, &hf, &lo2, &err);
            if (rc != 0) {
                printf("       %s\n", err.msg);
            }
            test_cond(rc == 0 && lo2 != NULL
                      && lo2->bytes == lo->bytes
                      && memcmp(lo2->data, lo->data, lo->bytes) == 0);
            llm_lora_free(lo2);
            lo2 = NULL;
        }
    }
    llm_lora_free(lo);
    lo = NULL;

    test("use_rslora: scale = alpha / sqrt(r)");
    dir = fake_lora("rs", "--rank 16 --alpha 8 --rslora --targets q,v "
                    "--seed 2", &why);
    test_cond(dir != NULL && llm_lora_load(dir, &hf, &lo, &err) == 0);
    if (lo != NULL) {
        test_cond(near(llm_lora_at(lo, 0, LLM_LORA_Q)->scale, 2.0f));
        test_cond(llm_lora_at(lo, 1, LLM_LORA_V)->rank == 16);
        test_cond(llm_lora_at(lo, 1, LLM_LORA_K)->rank == 0);
        test_cond(lo->targets == ((1u << LLM_LORA_Q) | (1u << LLM_LORA_V)));
        test_cond(same_as_file(lo, dir, 0));
    }
    llm_lora_free(lo);
    lo = NULL;

    test("rank_pattern and alpha_pattern per module");
    dir = fake_lora("pat", PAT_ARGS, &why);
    test_cond(dir != NULL && llm_lora_load(dir, &hf, &lo, &err) == 0);
    if (lo != NULL) {
        for (l = 0; l < 2; l++) {
            llm_lora_weight *q = llm_lora_at(lo, l, LLM_LORA_Q);
            llm_lora_weight *v = llm_lora_at(lo, l, LLM_LORA_V);
            llm_lora_weight *dn = llm_lora_at(lo, l, LLM_LORA_DOWN);

            test_cond(q->rank == 4 && near(q->scale, 16.0f / 4));
            test_cond(v->rank == 8 && near(v->scale, 32.0f / 8));
            test_cond(dn->rank == (l == 1 ? 2 : 8)
                      && near(dn->scale, 16.0f / dn->rank));
        }
        test_cond(lo->max_rank == 8);
        test_cond(same_as_file(lo, dir, 0));
    }
    llm_lora_free(lo);
    lo = NULL;

    test("regular expressions: rank_pattern with \\d (first key wins), "
         "target_modules string");
    dir = fake_lora("pat", PAT_ARGS, &why);
    if (dir != NULL) {
        const char *d = scratch("regex");
        char        s[600], p[600];
        /* in rank_pattern the second q_proj key also matches layer 1:
         * the first key in file order wins, as in peft */
        const char *cfg =
            "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16,\n"
            " \"target_modules\": \".*\\\\.(q_proj|v_proj|down_proj)\",\n"
            " \"rank_pattern\": {\"layers\\\\.\\\\d+\\\\.self_attn\\\\."
            "q_proj\": 4, \"layers.1.self_attn.q_proj\": 2, "
            "\"model\\\\.layers\\\\.1\\\\.mlp\\\\.down_proj\": "
            "2},\n \"alpha_pattern\": {\"(?:v_proj)\": 32}}\n";

        test_cond(d != NULL
                  && copy_file(path_join(s, sizeof(s), dir,
                                         LLM_LORA_WEIGHTS_FILE),
                               path_join(p, sizeof(p), d,
                                         LLM_LORA_WEIGHTS_FILE))
                  && write_file(path_join(p, sizeof(p), d,
                                          LLM_LORA_CONFIG_FILE), cfg,
                                strlen(cfg)));
        rc = llm_lora_load(d, &hf, &lo, &err);
        if (rc != 0) {
            printf("       %s\n", err.msg);
        }
        test_cond(rc == 0 && lo != NULL);
        if (lo != NULL) {
            test_cond(llm_lora_at(lo, 1, LLM_LORA_Q)->rank == 4);
            test_cond(llm_lora_at(lo, 1, LLM_LORA_DOWN)->rank == 2);
            test_cond(near(llm_lora_at(lo, 0, LLM_LORA_V)->scale, 4.0f));
        }
        llm_lora_free(lo);
        lo = NULL;
    } else {
        test_skip(why);
    }

    for (l = 0; l < 2; l++) {
        const char *dt = l == 0 ? "f16" : "bf16";
        char        tag[16], args[200];
        llm_lora   *ref = NULL;

        test(tname("%s weights are converted to f32", dt));
        snprintf(tag, sizeof(tag), "all4-%s", dt);
        snprintf(args, sizeof(args), ALL4_ARGS " --dtype %s", dt);
        dir = fake_lora(tag, args, &why);
        if (dir == NULL) {
            test_skip(why);
            continue;
        }
        rc = llm_lora_load(dir, &gg, &lo, &err);
        test_cond(rc == 0 && lo != NULL);
        if (lo == NULL) {
            continue;
        }
        test_cond(same_as_file(lo, dir, 1));
        /* and close to the f32 adapter of the same seed */
        dir = fake_lora("all4", ALL4_ARGS, &why);
        if (dir != NULL && llm_lora_load(dir, &gg, &ref, &err) == 0) {
            size_t i;
            float  md = 0;

            for (i = 0; i < ref->bytes / 4; i++) {
                float d = fabsf(ref->data[i] - lo->data[i]);

                md = d > md ? d : md;
            }
            test_cond(md > 0.0f && md < (l == 0 ? 2e-3f : 2e-2f));
        }
        llm_lora_free(ref);
        llm_lora_free(lo);
        lo = NULL;
    }

    test("layers_to_transform: absent layers have rank 0");
    dir = fake_lora("layer1", "--rank 2 --targets gate,up --layers 1 "
                    "--seed 4", &why);
    test_cond(dir != NULL && llm_lora_load(dir, &hf, &lo, &err) == 0);
    if (lo != NULL) {
        test_cond(llm_lora_at(lo, 0, LLM_LORA_GATE)->rank == 0
                  && llm_lora_at(lo, 1, LLM_LORA_GATE)->rank == 2
                  && llm_lora_at(lo, 1, LLM_LORA_UP)->rank == 2
                  && lo->n_weights == 2);
    }
    llm_lora_free(lo);
    lo = NULL;
}


TEST_SUITE(lora_default_model)
{
    const char       *model = llm_test_default_model(), *out;
    llm_model_config  cfg;
    llm_lora         *lo = NULL;
    llm_err           err;
    int               rc;

    test("adapter for the default model (GGUF llama: q/k B permuted)");
    if (model == NULL) {
        test_skip("default model not installed");
        return;
    }
    if (!have_python(0)) {
        test_skip("python3 with numpy not available");
        return;
    }
    out = scratch("lora-default");
    test_cond(out != NULL && make_lora(model, out, "--rank 8 --targets "
                                       "q,k,v,o,gate,up,down --seed 7 "
                                       "--dtype bf16 --rank-pattern "
                                       "down_proj=16"));
    memset(&err, 0, sizeof(err));
    test_cond(llm_model_read_config(model, &cfg, &err) == 0);
    test_cond(cfg.rope.neox == 0 && cfg.n_layers == 30);
    rc = llm_lora_load(out, &cfg, &lo, &err);
    if (rc != 0) {
        printf("       %s\n", err.msg);
    }
    test_cond(rc == 0 && lo != NULL);
    if (lo == NULL) {
        return;
    }
    test_cond(lo->permuted && lo->max_rank == 16 && lo->n_layers == 30);
    test_cond(llm_lora_at(lo, 29, LLM_LORA_Q)->out == 576
              && llm_lora_at(lo, 29, LLM_LORA_K)->out == 192
              && llm_lora_at(lo, 29, LLM_LORA_DOWN)->in == 1536
              && llm_lora_at(lo, 29, LLM_LORA_DOWN)->rank == 16
              && near(llm_lora_at(lo, 0, LLM_LORA_DOWN)->scale, 1.0f)
              && near(llm_lora_at(lo, 0, LLM_LORA_UP)->scale, 2.0f));
    {
        /* q of layer 3 against the file, permuted with head_dim 64 */
        llm_safetensors *st;
        const llm_st_tensor *b;
        llm_lora_weight *w = llm_lora_at(lo, 3, LLM_LORA_Q);
        char             p[600], key[160];
        int              h, i, j, c, ok = 1;

        st = llm_safetensors_open(path_join(p, sizeof(p), out,
                                            LLM_LORA_WEIGHTS_FILE), &err);
        b = st != NULL ? llm_safetensors_find(st, peft_key(key, sizeof(key),
                                                           3, 0, 'B'))
                       : NULL;
        test_cond(b != NULL);
        for (h = 0; b != NULL && h < 9; h++) {
            for (i = 0; i < 32; i++) {
                for (j = 0; j < 2; j++) {
                    for (c = 0; c < 8; c++) {
                        ok = ok && w->b[(h * 64 + 2 * i + j) * 8 + c]
                                   == st_val(b, (size_t) ((h * 64 + j * 32
                                                           + i) * 8 + c));
                    }
                }
            }
        }
        test_cond(ok);
        llm_safetensors_close(st);
    }

    test("the default model's adapter is refused by a smaller model");
    {
        llm_model_config small = fake_cfg(0);
        llm_lora        *bad = NULL;

        memset(&err, 0, sizeof(err));
        rc = llm_lora_load(out, &small, &bad, &err);
        test_cond(rc != 0 && bad == NULL);
        test_cond(strstr(err.msg, "adapter_model.safetensors") != NULL
                  && strstr(err.msg, "lora_") != NULL);
    }
    llm_lora_free(lo);
}


/* ---------------------------------------------------------------------- */
/* Refusals                                                                 */
/* ---------------------------------------------------------------------- */

typedef struct {
    const char *name;
    const char *dtype;
    int64_t     r, c;       /* shape; c < 0: 1-D */
} st_spec;


/* Writes a safetensors file with the given tensors (small values). */
static int
st_write(const char *path, const st_spec *t, int n)
{
    char    hdr[16384];
    size_t  hl = 0, off = 0, esz, total;
    uint8_t *data;
    uint64_t len;
    FILE   *f;
    int     i, ok;

    hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl, "{");
    for (i = 0; i < n; i++) {
        esz = strcmp(t[i].dtype, "F64") == 0 ? 8
              : strcmp(t[i].dtype, "F32") == 0 ? 4
              : strcmp(t[i].dtype, "I8") == 0 ? 1 : 2;
        total = esz * (size_t) t[i].r * (size_t) (t[i].c < 0 ? 1 : t[i].c);
        if (t[i].c < 0) {
            hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl,
                                    "%s\"%s\":{\"dtype\":\"%s\",\"shape\":"
                                    "[%lld],\"data_offsets\":[%zu,%zu]}",
                                    i ? "," : "", t[i].name, t[i].dtype,
                                    (long long) t[i].r, off, off + total);
        } else {
            hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl,
                                    "%s\"%s\":{\"dtype\":\"%s\",\"shape\":"
                                    "[%lld,%lld],\"data_offsets\":"
                                    "[%zu,%zu]}", i ? "," : "", t[i].name,
                                    t[i].dtype, (long long) t[i].r,
                                    (long long) t[i].c, off, off + total);
        }
        off += total;
    }
    hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl, "}");
    while (hl % 8) {
        hdr[hl++] = ' ';
    }
    data = calloc(1, off + 1);
    if (data == NULL) {
        return 0;
    }
    for (i = 0; i < (int) (off / 4); i++) {
        float v = 0.01f * (float) (i % 7);

        memcpy(data + 4 * i, &v, 4);    /* any bytes will do */
    }
    f = fopen(path, "wb");
    if (f == NULL) {
        free(data);
        return 0;
    }
    len = hl;
    ok = fwrite(&len, 8, 1, f) == 1 && fwrite(hdr, 1, hl, f) == hl
         && fwrite(data, 1, off, f) == off;
    free(data);
    return fclose(f) == 0 && ok;
}


#define GOOD_CONFIG \
    "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, " \
    "\"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", " \
    "\"gate_proj\", \"up_proj\", \"down_proj\"], \"modules_to_save\": null, " \
    "\"base_model_name_or_path\": \"fake/base\"}"

#define KA(l, m)  "base_model.model.model.layers." #l "." m ".lora_A.weight"
#define KB(l, m)  "base_model.model.model.layers." #l "." m ".lora_B.weight"

static const st_spec good_tensors[] = {
    { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
    { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
    { KA(1, "mlp.down_proj"), "F32", 4, 128 },
    { KB(1, "mlp.down_proj"), "F32", 64, 4 },
};


/* Writes dir with config text cfg and good_tensors, loads it: the number
 * of weights loaded, or -1 if refused. */
static int
loaded_weights(const char *tag, const char *cfg)
{
    llm_model_config c = fake_cfg(0);
    llm_lora        *lo = NULL;
    const char      *d = scratch(tag);
    char             p[600];
    llm_err          err;
    int              n = -1;

    if (d != NULL
        && write_file(path_join(p, sizeof(p), d, LLM_LORA_CONFIG_FILE), cfg,
                      strlen(cfg))
        && st_write(path_join(p, sizeof(p), d, LLM_LORA_WEIGHTS_FILE),
                    good_tensors, 4)
        && llm_lora_load(d, &c, &lo, &err) == 0)
    {
        n = lo->n_weights;
    }
    llm_lora_free(lo);
    return n;
}


/* Writes dir with config text cfg (NULL: GOOD_CONFIG) and tensors (NULL:
 * good_tensors); then the load must fail with a message holding file
 * and must (if not NULL).  *msg gets the message. */
static int
refused(const char *tag, const char *cfg, const st_spec *t, int n,
        const char *file, const char *must, char *msg, size_t msize)
{
    llm_model_config c = fake_cfg(0);
    llm_lora        *lo = NULL;
    llm_err          err;
    const char      *d = scratch(tag);
    char             p[600];
    int              rc, ok;

    msg[0] = '\0';
    if (d == NULL) {
        return 0;
    }
    if (cfg == NULL) {
        cfg = GOOD_CONFIG;
    }
    if (t == NULL && n >= 0) {
        t = good_tensors;
        n = 4;
    }
    if ((cfg[0] != '\0' && !write_file(path_join(p, sizeof(p), d,
                                                 LLM_LORA_CONFIG_FILE),
                                       cfg, strlen(cfg)))
        || (n >= 0 && !st_write(path_join(p, sizeof(p), d,
                                          LLM_LORA_WEIGHTS_FILE), t, n)))
    {
        return 0;
    }
    memset(&err, 0, sizeof(err));
    rc = llm_lora_load(d, &c, &lo, &err);
    snprintf(msg, msize, "%s", err.msg);
    ok = rc != 0 && lo == NULL && err.code == rc
         && strstr(err.msg, d) != NULL && strstr(err.msg, file) != NULL
         && (must == NULL || strstr(err.msg, must) != NULL);
    if (!ok) {
        printf("       got: %s\n", rc == 0 ? "(loaded)" : err.msg);
    }
    llm_lora_free(lo);
    /* check refuses exactly what load refuses */
    return ok && llm_lora_check(d, &c, NULL, NULL) == rc;
}


TEST_SUITE(lora_errors)
{
    char        msg[LLM_ERR_MAX];
    const char *CF = LLM_LORA_CONFIG_FILE, *WF = LLM_LORA_WEIGHTS_FILE;

    test("the hand-written good adapter loads");
    test_cond(loaded_weights("good", GOOD_CONFIG) == 2);

    test("missing folder / adapter_config.json");
    test_cond(refused("e-nocfg", "", NULL, 0, CF, NULL, msg, sizeof(msg)));

    test("missing adapter_model.safetensors");
    test_cond(refused("e-nost", NULL, NULL, -1, WF, NULL, msg,
                      sizeof(msg)));

    test("adapter_model.bin only: says pickles are not supported");
    {
        const char *d = scratch("e-bin");
        char        p[600];
        llm_model_config c = fake_cfg(1);
        llm_lora   *lo = NULL;
        llm_err     err;

        test_cond(d != NULL
                  && write_file(path_join(p, sizeof(p), d, CF), GOOD_CONFIG,
                                strlen(GOOD_CONFIG))
                  && write_file(path_join(p, sizeof(p), d,
                                          "adapter_model.bin"), "x", 1));
        memset(&err, 0, sizeof(err));
        test_cond(llm_lora_load(d, &c, &lo, &err) == LLM_EUNSUP
                  && strstr(err.msg, "adapter_model.bin") != NULL
                  && strstr(err.msg, WF) != NULL);
    }

    test("bad JSON");
    test_cond(refused("e-json", "{\"r\": 4,", NULL, 0, CF, "JSON", msg,
                      sizeof(msg)));
    test("config not an object");
    test_cond(refused("e-arr", "[1, 2]", NULL, 0, CF, "object", msg,
                      sizeof(msg)));

    test("modules_to_save non-empty");
    test_cond(refused("e-mts",
                      "{\"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
                      "[\"q_proj\"], \"modules_to_save\": [\"lm_head\"]}",
                      NULL, 0, CF, "modules_to_save", msg, sizeof(msg)));
    test_cond(strstr(msg, "lm_head") != NULL);

    test("unknown target module in target_modules (embed_tokens)");
    test_cond(refused("e-tm-embed",
                      "{\"r\": 4, \"target_modules\": [\"q_proj\", "
                      "\"embed_tokens\"]}", NULL, 0, CF, "embed_tokens",
                      msg, sizeof(msg)));
    test("unknown target module in target_modules (lm_head)");
    test_cond(refused("e-tm-head",
                      "{\"r\": 4, \"target_modules\": [\"lm_head\"]}",
                      NULL, 0, CF, "lm_head", msg, sizeof(msg)));
    test("target_modules regular expression matching lm_head");
    test_cond(refused("e-tm-re", "{\"r\": 4, \"target_modules\": \".*\"}",
                      NULL, 0, CF, "lm_head", msg, sizeof(msg)));

    test("regular expressions that would take the engine's memory are "
         "refused (nested and bounded repetition, multiple repeat)");
    {
        /* each of these made glibc's regcomp allocate gigabytes */
        static const char *bad[] = {
            "q_pro+++++++++++++++++++++++j",
            "((((((((((((((((((((((((q+)+)+)+)+)+)+)+)+)+)+)+)+)+)+)+)+)+)+"
            ")+)+)+)+)+)+_proj",
            "(q{100}){100}{100}_proj",
            "q{99999}_proj",
        };
        char cfg[512];
        int  i, ok = 1;

        for (i = 0; i < (int) (sizeof(bad) / sizeof(bad[0])); i++) {
            snprintf(cfg, sizeof(cfg), "{\"r\": 4, \"target_modules\": "
                     "\"%s\"}", bad[i]);
            ok &= refused("e-re-big", cfg, NULL, 0, CF, "repeats too much",
                          msg, sizeof(msg));
            snprintf(cfg, sizeof(cfg), "{\"r\": 4, \"target_modules\": "
                     "[\"q_proj\"], \"alpha_pattern\": {\"%s\": 2}}",
                     bad[i]);
            ok &= refused("e-re-big", cfg, NULL, 0, CF, "repeats too much",
                          msg, sizeof(msg));
        }
        test_cond(ok);
    }
    test("ordinary repetition is still taken");
    test_cond(loaded_weights("re-ok",
        "{\"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
        "\"model\\\\.layers\\\\.[0-9]{1,3}\\\\.(self_attn|mlp)"
        "\\\\.(q|down)_proj\"}") == 2);

    test("r = 0 and r = 300");
    test_cond(refused("e-r0", "{\"r\": 0}", NULL, 0, CF, "\"r\"", msg,
                      sizeof(msg)));
    test_cond(refused("e-r300", "{\"r\": 300}", NULL, 0, CF, "\"r\"", msg,
                      sizeof(msg)));
    test("r not an integer, lora_alpha not a number");
    test_cond(refused("e-rstr", "{\"r\": \"8\"}", NULL, 0, CF, "\"r\"", msg,
                      sizeof(msg)));
    test_cond(refused("e-alpha", "{\"r\": 4, \"lora_alpha\": [1]}", NULL, 0,
                      CF, "lora_alpha", msg, sizeof(msg)));
    test("rank_pattern value out of range");
    test_cond(refused("e-rp", "{\"r\": 4, \"rank_pattern\": {\"q_proj\": "
                      "1000}}", NULL, 0, CF, "rank_pattern", msg,
                      sizeof(msg)));

    test("peft features that change the computation are refused");
    test_cond(refused("e-dora", "{\"r\": 4, \"use_dora\": true}", NULL, 0,
                      CF, "use_dora", msg, sizeof(msg)));
    test_cond(refused("e-fifo", "{\"r\": 4, \"fan_in_fan_out\": true}",
                      NULL, 0, CF, "fan_in_fan_out", msg, sizeof(msg)));
    test_cond(refused("e-bias", "{\"r\": 4, \"bias\": \"all\"}", NULL, 0,
                      CF, "bias", msg, sizeof(msg)));
    test_cond(refused("e-ia3", "{\"peft_type\": \"IA3\"}", NULL, 0, CF,
                      "IA3", msg, sizeof(msg)));
    test_cond(refused("e-repl", "{\"r\": 4, \"layer_replication\": "
                      "[[0, 1]]}", NULL, 0, CF, "layer_replication", msg,
                      sizeof(msg)));

    /* tensors */
    {
        static const st_spec head[] = {
            { "base_model.model.lm_head.lora_A.weight", "F32", 4, 64 },
            { "base_model.model.lm_head.lora_B.weight", "F32", 1000, 4 },
        };
        static const st_spec embed[] = {
            { "base_model.model.model.embed_tokens.lora_embedding_A",
              "F32", 4, 1000 },
        };
        static const st_spec full[] = {
            { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
            { "base_model.model.lm_head.weight", "F32", 1000, 64 },
        };
        static const st_spec rank0[] = {
            { KA(0, "self_attn.q_proj"), "F32", 0, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 0 },
        };
        static const st_spec rank300[] = {
            { KA(0, "self_attn.q_proj"), "F16", 300, 64 },
            { KB(0, "self_attn.q_proj"), "F16", 64, 300 },
        };
        static const st_spec shape_a[] = {
            { KA(0, "self_attn.k_proj"), "F32", 4, 63 },
            { KB(0, "self_attn.k_proj"), "F32", 32, 4 },
        };
        static const st_spec shape_b[] = {
            { KA(0, "self_attn.k_proj"), "F32", 4, 64 },
            { KB(0, "self_attn.k_proj"), "F32", 64, 4 },
        };
        static const st_spec rank_mix[] = {
            { KA(0, "mlp.up_proj"), "F32", 4, 64 },
            { KB(0, "mlp.up_proj"), "F32", 128, 5 },
        };
        static const st_spec no_b[] = {
            { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
            { KA(1, "self_attn.v_proj"), "F32", 4, 64 },
        };
        static const st_spec no_a[] = {
            { KB(1, "self_attn.o_proj"), "F32", 64, 4 },
        };
        static const st_spec i8[] = {
            { KA(0, "self_attn.q_proj"), "I8", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
        };
        static const st_spec f64[] = {
            { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F64", 64, 4 },
        };
        static const st_spec dims3[] = {
            { KA(0, "self_attn.q_proj"), "F32", 256, -1 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
        };
        static const st_spec layer9[] = {
            { KA(9, "self_attn.q_proj"), "F32", 4, 64 },
            { KB(9, "self_attn.q_proj"), "F32", 64, 4 },
        };
        static const st_spec rank8[] = {
            { KA(0, "self_attn.q_proj"), "F32", 8, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 8 },
        };
        static const st_spec dora[] = {
            { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
            { "base_model.model.model.layers.0.self_attn.q_proj."
              "lora_magnitude_vector", "F32", 64, -1 },
        };
        static const st_spec lbias[] = {
            { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
            { "base_model.model.model.layers.0.self_attn.q_proj.lora_B."
              "bias", "F32", 64, -1 },
        };
        static const st_spec twice[] = {
            { KA(0, "self_attn.q_proj"), "F32", 4, 64 },
            { "base_model.model.model.layers.0.self_attn.q_proj.lora_A."
              "default.weight", "F32", 4, 64 },
            { KB(0, "self_attn.q_proj"), "F32", 64, 4 },
        };
        static const st_spec other[] = {
            { "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A."
              "weight", "F32", 4, 64 },
        };

        test("lora on lm_head: names the tensor and the module");
        test_cond(refused("e-head", NULL, head, 2, WF,
                          "base_model.model.lm_head.lora_", msg,
                          sizeof(msg)));
        test_cond(strstr(msg, "\"lm_head\"") != NULL);
        test("lora on embed_tokens");
        test_cond(refused("e-embed", NULL, embed, 1, WF,
                          "embed_tokens.lora_embedding_A", msg,
                          sizeof(msg)));
        test("a full module weight (modules_to_save)");
        test_cond(refused("e-full", NULL, full, 3, WF,
                          "base_model.model.lm_head.weight", msg,
                          sizeof(msg)));
        test_cond(strstr(msg, "modules_to_save") != NULL);
        test("unsupported projection (qkv_proj)");
        test_cond(refused("e-qkv", NULL, other, 1, WF, "qkv_proj", msg,
                          sizeof(msg)));
        test("rank 0 in the file");
        test_cond(refused("e-rank0", NULL, rank0, 2, WF, KA(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "rank 0") != NULL);
        test("rank 300 in the file");
        test_cond(refused("e-rank300", NULL, rank300, 2, WF, KA(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "rank 300") != NULL);
        test("A shape does not match the model (in)");
        test_cond(refused("e-shape-a", NULL, shape_a, 2, WF, KA(0,
                          "self_attn.k_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "[4, 63]") != NULL);
        test("B shape does not match the model (out: kv heads)");
        test_cond(refused("e-shape-b", NULL, shape_b, 2, WF, KB(0,
                          "self_attn.k_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "[32, 4]") != NULL);
        test("A and B ranks differ");
        test_cond(refused("e-rankmix", NULL, rank_mix, 2, WF, KB(0,
                          "mlp.up_proj"), msg, sizeof(msg)));
        test("lora_B missing");
        test_cond(refused("e-nob", NULL, no_b, 3, WF, KB(1,
                          "self_attn.v_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "missing") != NULL);
        test("lora_A missing");
        test_cond(refused("e-noa", NULL, no_a, 1, WF, KA(1,
                          "self_attn.o_proj"), msg, sizeof(msg)));
        test("dtype I8 and F64");
        test_cond(refused("e-i8", NULL, i8, 2, WF, KA(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "I8") != NULL);
        test_cond(refused("e-f64", NULL, f64, 2, WF, KB(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "F64") != NULL);
        test("1-D lora_A");
        test_cond(refused("e-1d", NULL, dims3, 2, WF, KA(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test("layer beyond the model's");
        test_cond(refused("e-layer", NULL, layer9, 2, WF, KA(9,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "layer 9") != NULL);
        test("rank differs from the config's r");
        test_cond(refused("e-rank8", NULL, rank8, 2, WF, KA(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, CF) != NULL);
        test("module not in target_modules");
        test_cond(refused("e-nottm", "{\"r\": 4, \"target_modules\": "
                          "[\"v_proj\"]}", NULL, 0, WF, KA(0,
                          "self_attn.q_proj"), msg, sizeof(msg)));
        test_cond(strstr(msg, "target_modules") != NULL);
        test("DoRA magnitude vector");
        test_cond(refused("e-dora-t", NULL, dora, 3, WF,
                          "lora_magnitude_vector", msg, sizeof(msg)));
        test("LoRA bias");
        test_cond(refused("e-lbias", NULL, lbias, 3, WF, "lora_B.bias", msg,
                          sizeof(msg)));
        test("two tensors for the same lora_A");
        test_cond(refused("e-twice", NULL, twice, 3, WF, "lora_A", msg,
                          sizeof(msg)));
        test("no tensors");
        test_cond(refused("e-empty", NULL, good_tensors, 0, WF,
                          "no LoRA tensors", msg, sizeof(msg)));
    }

    test("a NaN or infinite weight: refused, naming the tensor");
    {
        const char *d = scratch("e-nan");
        char        p[600];
        uint64_t    hl;
        float       bad[2] = { NAN, INFINITY };
        llm_model_config c = fake_cfg(0);
        llm_lora   *lo = NULL;
        llm_lora_info info;
        llm_err     err;
        FILE       *f;
        int         k;

        for (k = 0; k < 2; k++) {
            /* element 5 of the first tensor written (q_proj's A) */
            f = NULL;
            test_cond(d != NULL
                      && write_file(path_join(p, sizeof(p), d, CF),
                                    GOOD_CONFIG, strlen(GOOD_CONFIG))
                      && st_write(path_join(p, sizeof(p), d, WF),
                                  good_tensors, 4)
                      && (f = fopen(p, "r+b")) != NULL);
            if (f == NULL) {
                break;
            }
            test_cond(fread(&hl, 8, 1, f) == 1
                      && fseek(f, (long) (8 + hl + 4 * 5), SEEK_SET) == 0
                      && fwrite(&bad[k], 4, 1, f) == 1);
            fclose(f);
            memset(&err, 0, sizeof(err));
            /* the header is fine: check takes it, load reads the values */
            test_cond(llm_lora_check(d, &c, &info, &err) == 0);
            test_cond(llm_lora_load(d, &c, &lo, &err) == LLM_EFORMAT
                      && lo == NULL && strstr(err.msg, WF) != NULL
                      && strstr(err.msg, "q_proj.lora_A") != NULL
                      && strstr(err.msg, "element 5 ") != NULL
                      && strstr(err.msg, "not a finite number") != NULL);
        }
    }

    test("truncated safetensors: names the file and the tensor");
    {
        const char *d = scratch("e-trunc");
        char        p[600];
        struct stat sb;
        llm_model_config c = fake_cfg(0);
        llm_lora   *lo = NULL;
        llm_err     err;

        test_cond(d != NULL
                  && write_file(path_join(p, sizeof(p), d, CF), GOOD_CONFIG,
                                strlen(GOOD_CONFIG))
                  && st_write(path_join(p, sizeof(p), d, WF), good_tensors,
                              4)
                  && stat(p, &sb) == 0 && truncate(p, sb.st_size - 100)
                     == 0);
        memset(&err, 0, sizeof(err));
        test_cond(llm_lora_load(d, &c, &lo, &err) == LLM_EFORMAT
                  && lo == NULL && strstr(err.msg, WF) != NULL
                  && strstr(err.msg, "truncated") != NULL
                  && strstr(err.msg, "lora_") != NULL);
        test("safetensors with a corrupted header length");
        test_cond(truncate(p, 20) == 0);
        test_cond(llm_lora_load(d, &c, &lo, &err) == LLM_EFORMAT
                  && strstr(err.msg, WF) != NULL);
    }

    test("bad arguments");
    {
        llm_model_config c = fake_cfg(0), z;
        llm_lora        *lo = (llm_lora *) 1;
        llm_err          err;

        memset(&z, 0, sizeof(z));
        test_cond(llm_lora_load(NULL, &c, &lo, &err) == LLM_EINVAL
                  && lo == NULL);
        test_cond(llm_lora_load("/nonexistent", &z, &lo, &err)
                  == LLM_EINVAL);
        test_cond(llm_lora_load("/nonexistent", &c, NULL, &err)
                  == LLM_EINVAL);
        test_cond(llm_lora_load("/nonexistent", &c, &lo, NULL)
                  == LLM_ENOTFOUND);
        llm_lora_free(NULL);
        test_cond(llm_lora_target_name(LLM_LORA_DOWN) != NULL
                  && strcmp(llm_lora_target_name(LLM_LORA_DOWN),
                            "down_proj") == 0
                  && llm_lora_target_name(7) == NULL);
    }
}


/* ---------------------------------------------------------------------- */
/* Registry                                                                 */
/* ---------------------------------------------------------------------- */

typedef struct {
    int  n;
    char names[8][64];
    char msgs[8][LLM_ERR_MAX];
} refusals;


static void
on_refused(void *ud, const char *name, const llm_err *err)
{
    refusals *r = ud;

    if (r->n < 8) {
        snprintf(r->names[r->n], sizeof(r->names[0]), "%s", name);
        snprintf(r->msgs[r->n], sizeof(r->msgs[0]), "%s", err->msg);
    }
    r->n++;
}


/* root/name <- make_lora.py args */
static int
reg_adapter(const char *root, const char *name, const char *args)
{
    char d[600];

    path_join(d, sizeof(d), root, name);
    return make_lora(fake_base(), d, args);
}


TEST_SUITE(lora_registry)
{
    llm_model_config         cfg = fake_cfg(0);
    llm_lora_registry       *reg;
    llm_lora_registry_stats  s;
    llm_lora_handle          ha, hb, hc, h2;
    llm_lora_info            ia, ib, ic;
    llm_err                  err;
    refusals                 ref;
    const char              *root, *why, *dir;
    char                     p[600];
    int                      n, rc;
    float                    a0;

    test("register_dir: adapters by folder name, bad ones reported");
    if (fake_lora("all4", ALL4_ARGS, &why) == NULL)
    {
        test_skip(why);
        return;
    }
    root = scratch("reg");
    test_cond(root != NULL
              && reg_adapter(root, "a", "--rank 4 --targets q,v --seed 11")
              && reg_adapter(root, "b", "--rank 8 --targets q,k,v,o "
                             "--seed 12")
              && reg_adapter(root, "c", "--rank 16 --targets gate,up,down "
                             "--seed 13"));
    {
        const char *bad = "{\"r\": 4, \"modules_to_save\": [\"lm_head\"]}";

        path_join(p, sizeof(p), root, "bad");
        mkdir(p, 0700);
        path_join(p, sizeof(p), root, "bad/" LLM_LORA_CONFIG_FILE);
        test_cond(write_file(p, bad, strlen(bad)));
        path_join(p, sizeof(p), root, "notes");     /* not an adapter */
        mkdir(p, 0700);
        path_join(p, sizeof(p), root, "README");
        test_cond(write_file(p, "x", 1));
    }
    reg = llm_lora_registry_new(&cfg, 0, &err);
    test_cond(reg != NULL);
    if (reg == NULL) {
        return;
    }
    memset(&ref, 0, sizeof(ref));
    n = llm_lora_registry_register_dir(reg, root, on_refused, &ref, &err);
    test_cond(n == 3);
    test_cond(ref.n == 1 && strcmp(ref.names[0], "bad") == 0
              && strstr(ref.msgs[0], "modules_to_save") != NULL
              && strstr(ref.msgs[0], "bad/adapter_config.json") != NULL);
    test_cond(strcmp(llm_lora_registry_name(reg, 0), "a") == 0
              && strcmp(llm_lora_registry_name(reg, 2), "c") == 0
              && llm_lora_registry_name(reg, 3) == NULL);
    test_cond(llm_lora_registry_find(reg, "b", &dir, &ib)
              && strstr(dir, "/reg/b") != NULL && ib.max_rank == 8
              && !llm_lora_registry_find(reg, "bad", NULL, NULL));
    llm_lora_registry_find(reg, "a", NULL, &ia);
    llm_lora_registry_find(reg, "c", NULL, &ic);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.registered == 3 && s.loaded == 0 && s.bytes == 0);
    test_cond(llm_lora_registry_register_dir(reg, "/nonexistent/x", NULL,
                                             NULL, &err) == LLM_ENOTFOUND);

    test("register: taken names and invalid names refused");
    path_join(p, sizeof(p), root, "a");
    test_cond(llm_lora_registry_register(reg, "a", p, &err) == LLM_ESTATE);
    test_cond(llm_lora_registry_register(reg, "../x", p, &err) == LLM_EINVAL);
    test_cond(llm_lora_registry_register(reg, "", p, &err) == LLM_EINVAL);
    test_cond(llm_lora_registry_register(reg, "a b", p, &err)
              == LLM_EINVAL);
    test_cond(llm_lora_registry_register(reg, "ok-name", "/nonexistent",
                                         &err) == LLM_ENOTFOUND
              && strstr(err.msg, "ok-name") != NULL);

    test("acquire loads lazily and pins; a second acquire is a hit");
    test_cond(!llm_lora_registry_is_loaded(reg, "a"));
    rc = llm_lora_registry_acquire(reg, "a", &ha, &err);
    test_cond(rc == 0 && ha.lora != NULL && ha.version == ha.lora->version
              && ha.serial != 0);
    test_cond(llm_lora_registry_is_loaded(reg, "a"));
    test_cond(llm_lora_registry_acquire(reg, "a", &h2, &err) == 0
              && h2.lora == ha.lora && h2.serial == ha.serial);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.loaded == 1 && s.pinned == 1 && s.hits == 1 && s.loads == 1
              && s.bytes == ia.bytes && s.pinned_bytes == ia.bytes);
    llm_lora_registry_release(reg, &h2);
    test_cond(h2.lora == NULL && h2.priv == NULL);
    llm_lora_registry_release(reg, &h2);        /* cleared: ignored */
    llm_lora_registry_release(reg, &ha);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.loaded == 1 && s.pinned == 0);
    test_cond(llm_lora_registry_acquire(reg, "nope", &h2, &err)
              == LLM_ENOTFOUND && strstr(err.msg, "nope") != NULL);

    test("LRU eviction under a budget never evicts a pinned adapter");
    llm_lora_registry_set_budget(reg, ia.bytes + ib.bytes);
    test_cond(llm_lora_registry_acquire(reg, "a", &ha, &err) == 0);
    test_cond(llm_lora_registry_acquire(reg, "b", &hb, &err) == 0);
    llm_lora_registry_release(reg, &hb);
    /* room for a and c, not for all three: b (unpinned) must go, a
     * (pinned, and older) must stay */
    test_cond(ic.bytes > ib.bytes);
    llm_lora_registry_set_budget(reg, ia.bytes + ic.bytes);
    test_cond(llm_lora_registry_acquire(reg, "c", &hc, &err) == 0);
    test_cond(llm_lora_registry_is_loaded(reg, "a")
              && !llm_lora_registry_is_loaded(reg, "b")
              && llm_lora_registry_is_loaded(reg, "c"));
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.bytes <= s.budget && s.evictions >= 1 && s.pinned == 2);

    test("no room next to pinned adapters: LLM_EFULL, nothing changes");
    rc = llm_lora_registry_acquire(reg, "b", &hb, &err);
    test_cond(rc == LLM_EFULL && hb.lora == NULL
              && strstr(err.msg, "\"b\"") != NULL);
    test_cond(llm_lora_registry_is_loaded(reg, "a")
              && llm_lora_registry_is_loaded(reg, "c"));

    test("least recently used goes first");
    llm_lora_registry_set_budget(reg, 0);
    llm_lora_registry_release(reg, &hc);        /* c used before a */
    llm_lora_registry_release(reg, &ha);
    test_cond(llm_lora_registry_preload(reg, "b", &err) == 0);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.loaded == 3 && s.pinned == 0);
    /* order now (most recent first): b, a, c: room for b + a only */
    llm_lora_registry_set_budget(reg, ib.bytes + ia.bytes);
    test_cond(llm_lora_registry_is_loaded(reg, "a")
              && llm_lora_registry_is_loaded(reg, "b")
              && !llm_lora_registry_is_loaded(reg, "c"));
    llm_lora_registry_set_budget(reg, 0);

    test("reload: new version for new acquires, old one kept while pinned");
    test_cond(llm_lora_registry_acquire(reg, "a", &ha, &err) == 0);
    a0 = ha.lora->data[0];
    test_cond(reg_adapter(root, "a", "--rank 4 --targets q,v --seed 99"));
    test_cond(llm_lora_registry_reload(reg, "a", NULL, &err) == 0);
    test_cond(!llm_lora_registry_is_loaded(reg, "a"));
    test_cond(llm_lora_registry_acquire(reg, "a", &h2, &err) == 0);
    test_cond(h2.lora != ha.lora && h2.serial != ha.serial
              && memcmp(h2.version, ha.version, LLM_LORA_VERSION_LEN) != 0);
    test_cond(ha.lora->data[0] == a0 && h2.lora->data[0] != a0);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.registered == 3 && s.loaded == 3 && s.pinned == 2);
    llm_lora_registry_release(reg, &ha);        /* the old one's last user */
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.loaded == 2 && s.pinned == 1);

    test("reload with refused files keeps the current version");
    {
        const char *bad = scratch("reg-bad");
        char        q[600];

        test_cond(bad != NULL
                  && write_file(path_join(q, sizeof(q), bad,
                                          LLM_LORA_CONFIG_FILE), "{", 1));
        rc = llm_lora_registry_reload(reg, "a", bad, &err);
        test_cond(rc == LLM_EFORMAT && strstr(err.msg, "\"a\"") != NULL
                  && strstr(err.msg, "reg-bad/adapter_config.json")
                     != NULL);
        test_cond(llm_lora_registry_acquire(reg, "a", &ha, &err) == 0
                  && ha.lora == h2.lora);
        llm_lora_registry_release(reg, &ha);
        test_cond(llm_lora_registry_reload(reg, "zz", NULL, &err)
                  == LLM_ENOTFOUND);
    }
    llm_lora_registry_release(reg, &h2);

    test("unregister while pinned: gone by name, alive for its user");
    test_cond(llm_lora_registry_acquire(reg, "c", &hc, &err) == 0);
    test_cond(llm_lora_registry_unregister(reg, "c", &err) == 0);
    test_cond(!llm_lora_registry_find(reg, "c", NULL, NULL)
              && llm_lora_registry_acquire(reg, "c", &h2, &err)
                 == LLM_ENOTFOUND);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.registered == 2 && s.pinned == 1);
    test_cond(llm_lora_at(hc.lora, 1, LLM_LORA_DOWN)->rank == 16);
    llm_lora_registry_release(reg, &hc);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.pinned == 0 && s.loaded == 2);
    test_cond(llm_lora_registry_unregister(reg, "c", &err)
              == LLM_ENOTFOUND);

    test("a name can come back after unregister");
    path_join(p, sizeof(p), root, "c");
    test_cond(llm_lora_registry_register(reg, "c", p, &err) == 0);
    test_cond(llm_lora_registry_unregister(reg, "b", &err) == 0);
    llm_lora_registry_get_stats(reg, &s);
    test_cond(s.registered == 2 && s.loaded == 1);

    test("free with adapters loaded");
    test_cond(llm_lora_registry_acquire(reg, "c", &hc, &err) == 0);
    llm_lora_registry_release(reg, &hc);
    llm_lora_registry_free(reg);
    llm_lora_registry_free(NULL);
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


TEST_SUITE(lora_nomem)
{
    static const llm_allocators fa = { fail_malloc, fail_calloc,
                                       fail_realloc, free };
    llm_model_config   cfg = fake_cfg(0);
    llm_lora          *lo = NULL;
    llm_lora_registry *reg = NULL;
    llm_lora_handle    h;
    llm_err            err;
    const char        *dir, *why;
    int                n, ok = 1, nomem = 0, rc;

    test("every allocation failure of the loader is reported");
    dir = fake_lora("pat", PAT_ARGS, &why);
    if (dir == NULL) {
        test_skip(why);
        return;
    }
    for (n = 0; n < 1000; n++) {
        fail_after = n;
        llm_set_allocators(&fa);
        memset(&err, 0, sizeof(err));
        rc = llm_lora_load(dir, &cfg, &lo, &err);
        llm_reset_allocators();
        if (rc == 0) {
            break;
        }
        if (rc != LLM_ENOMEM || lo != NULL
            || strstr(err.msg, "out of memory") == NULL)
        {
            printf("       after %d allocations: %s\n", n, err.msg);
            ok = 0;
            break;
        }
        nomem++;
    }
    test_cond(ok && lo != NULL && nomem >= 5);
    llm_lora_free(lo);

    test("every allocation failure of the registry is reported");
    ok = 1;
    nomem = 0;
    for (n = 0; n < 1000; n++) {
        fail_after = n;
        llm_set_allocators(&fa);
        memset(&err, 0, sizeof(err));
        rc = LLM_ENOMEM;
        reg = llm_lora_registry_new(&cfg, 1 << 20, &err);
        if (reg != NULL) {
            rc = llm_lora_registry_register(reg, "p", dir, &err);
        }
        if (rc == 0) {
            rc = llm_lora_registry_reload(reg, "p", NULL, &err);
        }
        if (rc == 0) {
            rc = llm_lora_registry_acquire(reg, "p", &h, &err);
        }
        llm_reset_allocators();
        if (rc == 0) {
            llm_lora_registry_release(reg, &h);
            break;
        }
        if (rc != LLM_ENOMEM || strstr(err.msg, "out of memory") == NULL) {
            printf("       after %d allocations: %s\n", n, err.msg);
            ok = 0;
            llm_lora_registry_free(reg);
            reg = NULL;
            break;
        }
        if (reg != NULL) {
            llm_lora_registry_stats s;

            llm_lora_registry_get_stats(reg, &s);
            ok = ok && s.loaded == 0 && s.bytes == 0;
        }
        llm_lora_registry_free(reg);
        reg = NULL;
        nomem++;
    }
    test_cond(ok && reg != NULL && nomem >= 8);
    llm_lora_registry_free(reg);
}


/* ---------------------------------------------------------------------- */
/* merge_lora.py                                                            */
/* ---------------------------------------------------------------------- */

/* Row r of tensor t of g, dequantized; 0 on success. */
static int
gguf_row(const llm_gguf *g, const char *name, int64_t r, float *out,
         int64_t *cols)
{
    const llm_gguf_tensor *t = llm_gguf_find_tensor(g, name);
    size_t                 rb;

    if (t == NULL || r >= t->ne[1]) {
        return -1;
    }
    *cols = t->ne[0];
    rb = llm_row_bytes(t->type, t->ne[0]);
    return llm_dequantize_row(t->type, (const uint8_t *) t->data + rb * r,
                              out, t->ne[0]);
}


TEST_SUITE(lora_merge)
{
    const char       *model = llm_test_default_model(), *tiny, *ad;
    char              cmd[2048], base[600], merged[600], merged_hf[600];
    llm_model_config  cfg, cfg_hf;
    llm_lora         *lo = NULL, *lo_hf = NULL;
    llm_gguf         *gb = NULL, *gm = NULL, *gh = NULL;
    llm_err           err;
    int               l, t, r, ok;

    test("merge_lora.py: merged - base == scale * B @ A (GGUF Q8_0 base)");
    if (model == NULL) {
        test_skip("default model (vocabulary source) not installed");
        return;
    }
    if (!have_python(1)) {
        test_skip("python3 with gguf and numpy not available");
        return;
    }
    tiny = scratch("merge-tiny");
    ad = scratch("merge-lora");
    if (tiny == NULL || ad == NULL) {
        test_cond(!"scratch folders");
        return;
    }
    snprintf(cmd, sizeof(cmd), "%s tools/make_tiny_model.py --layers 2 "
             "--dim 64 --heads 4 --kv-heads 2 --ffn 128 --untied "
             "--gguf-type q8_0 --seed 5 --vocab-from '%s' --out '%s'",
             python(), model, tiny);
    test_cond(system(cmd) == 0);
    path_join(base, sizeof(base), tiny, "model.gguf");
    path_join(merged, sizeof(merged), tiny, "merged.gguf");
    path_join(merged_hf, sizeof(merged_hf), tiny, "merged-hf.gguf");
    snprintf(cmd, sizeof(cmd), "%s/hf", tiny);
    test_cond(make_lora(cmd, ad, "--rank 8 --targets q,k,v,o,gate,up,down "
                        "--rank-pattern k_proj=2 --alpha-pattern "
                        "o_proj=4 --rslora --seed 21 --dtype bf16"));
    snprintf(cmd, sizeof(cmd), "%s tools/merge_lora.py --base '%s' "
             "--adapter '%s' --out '%s' && %s tools/merge_lora.py --base "
             "'%s/hf' --adapter '%s' --out '%s' --vocab-from '%s'",
             python(), base, ad, merged, python(), tiny, ad, merged_hf,
             model);
    test_cond(system(cmd) == 0);

    memset(&err, 0, sizeof(err));
    gb = llm_gguf_open(base, &err);
    gm = llm_gguf_open(merged, &err);
    gh = llm_gguf_open(merged_hf, &err);
    test_cond(gb != NULL && gm != NULL && gh != NULL);
    test_cond(llm_model_read_config(base, &cfg, &err) == 0
              && cfg.rope.neox == 0);
    test_cond(llm_lora_load(ad, &cfg, &lo, &err) == 0 && lo != NULL
              && lo->permuted);
    if (gb == NULL || gm == NULL || gh == NULL || lo == NULL) {
        goto done;
    }
    {
        static const char *const gn[] = {
            "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
            "ffn_up", "ffn_down"
        };
        float            wb[256], wm[256], wh[256];
        double           maxd = 0, maxdh = 0, maxdelta = 0;
        int64_t          cb, cm, ch, c;
        char             name[64], hfname[96], stpath[600];
        llm_safetensors *hst;

        /* the Hugging Face base's own weights (f32, HF row order) */
        snprintf(stpath, sizeof(stpath), "%s/hf/model.safetensors", tiny);
        hst = llm_safetensors_open(stpath, &err);
        ok = hst != NULL;
        for (l = 0; ok && l < 2; l++) {
            for (t = 0; ok && t < LLM_LORA_N_TARGETS; t++) {
                llm_lora_weight       *w = llm_lora_at(lo, l, t);
                const llm_gguf_tensor *tm;
                const llm_st_tensor   *hw;

                snprintf(name, sizeof(name), "blk.%d.%s.weight", l, gn[t]);
                snprintf(hfname, sizeof(hfname), "model.layers.%d.%s.weight",
                         l, tnames[t]);
                tm = llm_gguf_find_tensor(gm, name);
                hw = llm_safetensors_find(hst, hfname);
                ok = tm != NULL && tm->type == LLM_F32 && hw != NULL
                     && hw->type == LLM_F32
                     && w->rank == (t == LLM_LORA_K ? 2 : 8);
                for (r = 0; ok && r < w->out; r++) {
                    /* GGUF row r of q/k holds HF row sr */
                    int sr = r;

                    if (t == LLM_LORA_Q || t == LLM_LORA_K) {
                        sr = r / F_HD * F_HD + (r % 2) * (F_HD / 2)
                             + (r % F_HD) / 2;
                    }
                    ok = gguf_row(gb, name, r, wb, &cb) == 0
                         && gguf_row(gm, name, r, wm, &cm) == 0
                         && gguf_row(gh, name, r, wh, &ch) == 0
                         && cb == w->in && cm == w->in && ch == w->in;
                    for (c = 0; ok && c < w->in; c++) {
                        double d = 0;
                        int    k;

                        for (k = 0; k < w->rank; k++) {
                            d += (double) w->b[r * w->rank + k]
                                 * w->a[k * w->in + c];
                        }
                        d *= w->scale;
                        maxdelta = fmax(maxdelta, fabs(d));
                        maxd = fmax(maxd, fabs((double) wm[c] - wb[c] - d));
                        maxdh = fmax(maxdh, fabs((double) wh[c] - d
                                                 - st_val(hw, (size_t) (sr
                                                          * w->in + c))));
                    }
                }
            }
        }
        llm_safetensors_close(hst);
        test_cond(ok);
        test_cond(maxd < 1e-5 && maxdelta > 0.05);
        if (maxd >= 1e-5) {
            printf("       max difference %g\n", maxd);
        }

        test("merge_lora.py on a Hugging Face base: merged == W + scale*B@A");
        test_cond(ok && maxdh < 1e-5);
        if (maxdh >= 1e-5) {
            printf("       max difference %g\n", maxdh);
        }

        test("merge_lora.py leaves other tensors as they were");
        ok = gguf_row(gb, "output_norm.weight", 0, wb, &cb) == 0
             && gguf_row(gm, "output_norm.weight", 0, wm, &cm) == 0
             && cb == cm && memcmp(wb, wm, sizeof(float) * (size_t) cb) == 0
             && gguf_row(gb, "token_embd.weight", 7, wb, &cb) == 0
             && gguf_row(gm, "token_embd.weight", 7, wm, &cm) == 0
             && memcmp(wb, wm, sizeof(float) * (size_t) cb) == 0;
        test_cond(ok);
    }

    test("a Hugging Face base takes B unpermuted");
    snprintf(cmd, sizeof(cmd), "%s/hf", tiny);
    test_cond(llm_model_read_config(cmd, &cfg_hf, &err) == 0
              && cfg_hf.rope.neox == 1);
    test_cond(llm_lora_load(ad, &cfg_hf, &lo_hf, &err) == 0
              && !lo_hf->permuted);
    if (lo_hf != NULL) {
        llm_lora_weight *wh = llm_lora_at(lo_hf, 1, LLM_LORA_Q);
        llm_lora_weight *wg = llm_lora_at(lo, 1, LLM_LORA_Q);
        float            tmp[64 * 8];

        llm_lora_permute_rows(tmp, wh->b, wh->out, wh->rank, cfg.head_dim);
        test_cond(memcmp(tmp, wg->b, sizeof(float) * 64 * 8) == 0
                  && memcmp(wh->b, wg->b, sizeof(float) * 64 * 8) != 0
                  && memcmp(llm_lora_at(lo_hf, 1, LLM_LORA_V)->b,
                            llm_lora_at(lo, 1, LLM_LORA_V)->b,
                            sizeof(float) * 32 * 8) == 0);
    }

done:
    llm_lora_free(lo);
    llm_lora_free(lo_hf);
    llm_gguf_close(gb);
    llm_gguf_close(gm);
    llm_gguf_close(gh);
}
