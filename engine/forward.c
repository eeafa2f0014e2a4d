/*
 * Forward pass (see forward.h).  Per layer, for the T tokens of a step:
 *
 *   h = rmsnorm(x) ; q,k,v = h Wq,Wk,Wv (+bias) ; rope(q, k)
 *   store k, v in the pages ; att = paged attention(q) ; x += att Wo
 *   h = rmsnorm(x) ; x += (silu(h Wgate) * h Wup) Wdown
 *
 * then only the rows that need logits go through the final norm and the
 * output matrix.
 */
#include "forward.h"

#include <math.h>
#include <string.h>

#include "../adapters/device_pool.h"
#include "../adapters/lora.h"


#define FW_TRY(call, what)                                                  \
    do {                                                                    \
        int rc_ = (call);                                                   \
        if (rc_ != 0) {                                                     \
            return llm_err_set(err, rc_, "%s: %s", what,                    \
                               llm_backend_error(fw->be));                  \
        }                                                                   \
    } while (0)


size_t
llm_forward_kv_block_bytes(const llm_model_config *c, int block_size,
                           int kv_type)
{
    return 2 * (size_t) c->n_layers * (size_t) block_size
           * llm_kv_bytes(kv_type, (size_t) c->n_kv_heads
                                   * (size_t) c->head_dim);
}


int
llm_forward_init(llm_forward *fw, llm_backend *be, const llm_model *m,
                 int cap_tokens, int cap_out, int n_blocks, int block_size,
                 int kv_type, llm_err *err)
{
    const llm_model_config *c = &m->cfg;
    int                     qd = c->n_heads * c->head_dim;
    int                     kvd = c->n_kv_heads * c->head_dim;
    size_t                  layer_bytes;
    struct { llm_tensor *t; int64_t cols, rows; } acts[] = {
        { &fw->x, c->dim, cap_tokens },
        { &fw->h, c->dim, cap_tokens },
        { &fw->q, qd, cap_tokens },
        { &fw->k, kvd, cap_tokens },
        { &fw->v, kvd, cap_tokens },
        { &fw->att, qd, cap_tokens },
        { &fw->o, c->dim, cap_tokens },
        { &fw->gate, c->ffn_dim, cap_tokens },
        { &fw->up, c->ffn_dim, cap_tokens },
        { &fw->out_h, c->dim, cap_out },
        { &fw->logits, c->n_vocab, cap_out },
    };
    size_t                  i;

    memset(fw, 0, sizeof(*fw));
    fw->be = be;
    fw->m = m;
    fw->cap_tokens = cap_tokens;
    fw->cap_out = cap_out;

    for (i = 0; i < sizeof(acts) / sizeof(acts[0]); i++) {
        if (llm_tensor_alloc(be, acts[i].t, LLM_F32, acts[i].cols,
                             acts[i].rows) != 0)
        {
            llm_forward_free(fw);
            return llm_err_set(err, LLM_ENOMEM,
                               "cannot allocate activations for %d tokens",
                               cap_tokens);
        }
    }

    layer_bytes = llm_forward_kv_block_bytes(c, block_size, kv_type)
                  / 2 / (size_t) c->n_layers * (size_t) n_blocks;
    fw->kv.type = kv_type;
    fw->kv.n_layers = c->n_layers;
    fw->kv.n_blocks = n_blocks;
    fw->kv.block_size = block_size;
    fw->kv.n_kv_heads = c->n_kv_heads;
    fw->kv.head_dim = c->head_dim;
    fw->kv.layer_bytes = layer_bytes;
    /* a span per token at most, for each of up to 3 projections (q k v) */
    fw->segs = llm_calloc((size_t) cap_tokens * 3, sizeof(llm_lora_seg));
    if (fw->segs == NULL) {
        llm_forward_free(fw);
        return llm_err_set(err, LLM_ENOMEM, "out of memory");
    }
    fw->kv.k = be->ops->alloc(be, layer_bytes * (size_t) c->n_layers);
    fw->kv.v = be->ops->alloc(be, layer_bytes * (size_t) c->n_layers);
    if (fw->kv.k == NULL || fw->kv.v == NULL) {
        llm_forward_free(fw);
        return llm_err_set(err, LLM_ENOMEM,
                           "cannot allocate %zu MiB of KV pages",
                           2 * layer_bytes * (size_t) c->n_layers >> 20);
    }
    return 0;
}


void
llm_forward_free(llm_forward *fw)
{
    llm_tensor *all[] = { &fw->x, &fw->h, &fw->q, &fw->k, &fw->v, &fw->att,
                          &fw->o, &fw->gate, &fw->up, &fw->out_h,
                          &fw->logits };
    size_t      i;

    if (fw->be == NULL) {
        return;
    }
    for (i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        llm_tensor_release(fw->be, all[i]);
    }
    if (fw->kv.k != NULL) {
        fw->be->ops->release(fw->be, fw->kv.k);
    }
    if (fw->kv.v != NULL) {
        fw->be->ops->release(fw->be, fw->kv.v);
    }
    llm_free(fw->segs);
    memset(fw, 0, sizeof(*fw));
}


static const llm_tensor *
opt_bias(const llm_tensor *b)
{
    return b->data != NULL ? b : NULL;
}


/* outs[i] = x ws[i]^T (+ biases[i]): the products of one x, in one call
 * where the backend has one (x prepared once). */
static int
forward_matmuls(llm_backend *be, llm_tensor *const *outs, const llm_tensor *x,
                const llm_tensor *const *ws, const llm_tensor *const *biases,
                int n)
{
    int i, rc;

    if (be->ops->matmul_n != NULL) {
        return be->ops->matmul_n(be, outs, x, ws, biases, n);
    }
    for (i = 0; i < n; i++) {
        if ((rc = be->ops->matmul(be, outs[i], x, ws[i],
                                  biases ? biases[i] : NULL)) != 0)
        {
            return rc;
        }
    }
    return 0;
}


/* Adds the LoRA terms of the projections outs[i] (targets[i]) that read
 * the same x, for the spans whose adapter has that target: one backend
 * call for the group. */
static int
forward_lora(llm_forward *fw, llm_tensor *const *outs, const int *targets,
             int n_outs, const llm_tensor *x, int layer,
             const llm_lora_span *spans, int n_spans, llm_err *err)
{
    int    i, j, n = 0, rc;

    for (j = 0; j < n_outs; j++) {
        for (i = 0; i < n_spans; i++) {
            const llm_lora_weight *w = llm_lora_at(spans[i].lora, layer,
                                                   targets[j]);

            if (w == NULL || w->rank == 0) {
                continue;
            }
            /* the pool's copy: f32, f16 or int8 (device_pool.h) */
            llm_lora_pool_seg(spans[i].type, spans[i].dev, w, &fw->segs[n]);
            fw->segs[n].first = spans[i].first;
            fw->segs[n].n = spans[i].n;
            fw->segs[n].out = j;
            n++;
        }
    }
    if (n == 0) {
        return 0;
    }
    if (fw->be->ops->lora == NULL) {
        return llm_err_set(err, LLM_EUNSUP, "backend %s has no LoRA op",
                           fw->be->ops->name);
    }
    rc = fw->be->ops->lora(fw->be, outs, n_outs, x, fw->segs, n);
    if (rc != 0) {
        return llm_err_set(err, rc, "lora %s layer %d: %s",
                           llm_lora_target_name(targets[0]), layer,
                           llm_backend_error(fw->be));
    }
    return 0;
}


/* The adapters' low-rank terms of a group of projections of x: outputs
 * in the order of the targets array. */
static const int lora_qkv[] = { LLM_LORA_Q, LLM_LORA_K, LLM_LORA_V };
static const int lora_o[] = { LLM_LORA_O };
static const int lora_gate_up[] = { LLM_LORA_GATE, LLM_LORA_UP };
static const int lora_down[] = { LLM_LORA_DOWN };

#define FW_LORA(x, targets, ...)                                            \
    do {                                                                    \
        if (n_spans > 0) {                                                  \
            llm_tensor *outs_[] = { __VA_ARGS__ };                          \
            int         rc_;                                                \
                                                                            \
            rc_ = forward_lora(fw, outs_, targets,                          \
                               (int) (sizeof(outs_) / sizeof(outs_[0])),    \
                               x, l, spans, n_spans, err);                  \
            if (rc_ != 0) {                                                 \
                return rc_;                                                 \
            }                                                               \
        }                                                                   \
    } while (0)


int
llm_forward_run(llm_forward *fw, const llm_batch *b,
                const llm_lora_span *spans, int n_spans, float *host_logits,
                llm_err *err)
{
    llm_backend            *be = fw->be;
    const llm_backend_ops  *ops = be->ops;
    const llm_model        *m = fw->m;
    const llm_model_config *c = &m->cfg;
    int64_t                 T = b->n_tokens;
    llm_tensor              x, h, q, k, v, att, o, gate, up, oh, lg;
    float                   scale = 1.0f / sqrtf((float) c->head_dim);
    int                     l;

    if (T <= 0 || T > fw->cap_tokens || b->n_out > fw->cap_out) {
        return llm_err_set(err, LLM_EINVAL,
                           "batch of %lld tokens / %d outputs exceeds the "
                           "buffers (%d / %d)", (long long) T, b->n_out,
                           fw->cap_tokens, fw->cap_out);
    }

    x = llm_tensor_rows(&fw->x, 0, T);
    h = llm_tensor_rows(&fw->h, 0, T);
    q = llm_tensor_rows(&fw->q, 0, T);
    k = llm_tensor_rows(&fw->k, 0, T);
    v = llm_tensor_rows(&fw->v, 0, T);
    att = llm_tensor_rows(&fw->att, 0, T);
    o = llm_tensor_rows(&fw->o, 0, T);
    gate = llm_tensor_rows(&fw->gate, 0, T);
    up = llm_tensor_rows(&fw->up, 0, T);

    FW_TRY(ops->set_batch(be, b), "set_batch");
    FW_TRY(ops->embed(be, &x, &m->tok_embd), "embed");

    for (l = 0; l < c->n_layers; l++) {
        const llm_layer_weights *w = &m->layers[l];

        FW_TRY(ops->rmsnorm(be, &h, &x, &w->attn_norm, c->norm_eps),
               "attn_norm");
        {
            llm_tensor       *outs[] = { &q, &k, &v };
            const llm_tensor *ws[] = { &w->wq, &w->wk, &w->wv };
            const llm_tensor *bs[] = { opt_bias(&w->bq), opt_bias(&w->bk),
                                       opt_bias(&w->bv) };

            FW_TRY(forward_matmuls(be, outs, &h, ws, bs, 3), "wq, wk, wv");
        }
        FW_LORA(&h, lora_qkv, &q, &k, &v);
        FW_TRY(ops->rope(be, &q, c->n_heads, c->head_dim, &c->rope),
               "rope q");
        FW_TRY(ops->rope(be, &k, c->n_kv_heads, c->head_dim, &c->rope),
               "rope k");
        FW_TRY(ops->kv_store(be, &fw->kv, l, &k, &v), "kv_store");
        FW_TRY(ops->attention(be, &att, &q, &fw->kv, l, c->n_heads, scale),
               "attention");
        FW_TRY(ops->matmul(be, &o, &att, &w->wo, NULL), "wo");
        FW_LORA(&att, lora_o, &o);
        FW_TRY(ops->add(be, &x, &x, &o), "residual");

        FW_TRY(ops->rmsnorm(be, &h, &x, &w->ffn_norm, c->norm_eps),
               "ffn_norm");
        {
            llm_tensor       *outs[] = { &gate, &up };
            const llm_tensor *ws[] = { &w->w_gate, &w->w_up };
            const llm_tensor *bs[] = { NULL, NULL };

            FW_TRY(forward_matmuls(be, outs, &h, ws, bs, 2),
                   "w_gate, w_up");
        }
        FW_LORA(&h, lora_gate_up, &gate, &up);
        FW_TRY(ops->silu_mul(be, &gate, &gate, &up), "silu_mul");
        FW_TRY(ops->matmul(be, &o, &gate, &w->w_down, NULL), "w_down");
        FW_LORA(&gate, lora_down, &o);
        FW_TRY(ops->add(be, &x, &x, &o), "residual");
    }

    if (b->n_out == 0) {
        return 0;
    }
    oh = llm_tensor_rows(&fw->out_h, 0, b->n_out);
    lg = llm_tensor_rows(&fw->logits, 0, b->n_out);
    FW_TRY(ops->gather_out_rows(be, &oh, &x), "gather");
    FW_TRY(ops->rmsnorm(be, &oh, &oh, &m->out_norm, c->norm_eps),
           "output_norm");
    FW_TRY(ops->matmul(be, &lg, &oh, &m->output, NULL), "output");
    if (host_logits != NULL) {
        FW_TRY(ops->download(be, host_logits, lg.data,
                             (size_t) b->n_out * (size_t) c->n_vocab
                             * sizeof(float)), "download logits");
    } else if (llm_forward_logits(fw) == NULL) {
        return llm_err_set(err, LLM_EINVAL, "forward: no host buffer for"
                           " the logits of backend %s", be->ops->name);
    }
    return 0;
}


float *
llm_forward_logits(llm_forward *fw)
{
    return fw->be->ops->host_memory ? (float *) fw->logits.data : NULL;
}
