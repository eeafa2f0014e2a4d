/*
 * Paged attention kernels: split-K with its merge, and tiled (launchers,
 * plan and op: attention.cu, which describes both).
 */
#ifndef LLM_CUDA_ATTENTION_CUH
#define LLM_CUDA_ATTENTION_CUH

#include "device.cuh"


#define SPLIT_THREADS   128
#define SPLIT_CH        128             /* positions per chunk */
#define SPLIT_MAX       64              /* ranges per token at most */
#define TILE_Q          LLM_CUDA_TILE_ROWS
#define TILE_K          32
#define TILED_THREADS   128
#define TILED_MIN_TOKENS 8              /* AUTO: runs this long go tiled */
#define GRID_Y_MAX      65535


/* ------------------------------------------------------ split-K kernel */

template <typename KV, int HD, int GT>
__global__ void __launch_bounds__(SPLIT_THREADS)
attn_split_kernel(const llm_cuda_attn_args a,
                  const int32_t *dec,   /* [gridDim.y] token indices */
                  int n_split, int split_len,
                  float *part)          /* [gridDim.y, n_heads, n_split,
                                           HD + 2] or NULL (n_split 1) */
{
    /* columns: HDP threads cover a row of V, NSUB such sets share out the
     * positions of a chunk, COLS columns per thread when HD > 128 */
    constexpr int HDP = HD <= 32 ? 32 : HD <= 64 ? 64 : 128;
    constexpr int NSUB = SPLIT_THREADS / HDP;
    constexpr int COLS = (HD + 127) / 128;

    __shared__ float   q_sh[GT][HD];
    __shared__ float   p_sh[GT][SPLIT_CH];
    __shared__ int64_t row_sh[SPLIT_CH];    /* element offset of a K/V row */
    __shared__ float   m_sh[GT], l_sh[GT], alpha_sh[GT];
    __shared__ float   red_sh[NSUB > 1 ? NSUB - 1 : 1][NSUB > 1 ? GT : 1]
                             [NSUB > 1 ? HD : 1];

    const int      g = a.n_heads / a.n_kv_heads;
    const int      n_hgrp = (g + GT - 1) / GT;
    const int      kvh = blockIdx.x / n_hgrp;
    const int      h0 = kvh * g + (blockIdx.x % n_hgrp) * GT;
    const int      nh = min(GT, kvh * g + g - h0);
    const int      t = dec[blockIdx.y];
    const int      L = a.pos[t] + 1;
    const int      j0 = blockIdx.z * split_len;
    const int      j1 = min(L, j0 + split_len);
    const int      tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int      sub = tid / HDP, col0 = tid % HDP;
    const int64_t  row_elems = (int64_t) a.n_kv_heads * HD;
    const KV      *kp = (const KV *) a.k_pages;
    const KV      *vp = (const KV *) a.v_pages;
    const int32_t *bt = a.block_table + (size_t) a.tok_seq[t] * a.max_blocks;
    const float   *qrow = row_ptr(a.q, a.q_nb, t) + (size_t) h0 * HD;
    float          acc[GT][COLS];
    int            i, h, cc, c0;

    if (j0 >= L) {
        return;                         /* a range past this token */
    }

    for (i = tid; i < GT * HD; i += SPLIT_THREADS) {
        h = i / HD;
        q_sh[h][i - h * HD] = h < nh ? qrow[i] : 0.0f;
    }
    if (tid < GT) {
        m_sh[tid] = -INFINITY;
        l_sh[tid] = 0.0f;
        alpha_sh[tid] = 1.0f;
    }
#pragma unroll
    for (h = 0; h < GT; h++) {
#pragma unroll
        for (cc = 0; cc < COLS; cc++) {
            acc[h][cc] = 0.0f;
        }
    }
    __syncthreads();

    for (c0 = j0; c0 < j1; c0 += SPLIT_CH) {
        const int cnt = min(SPLIT_CH, j1 - c0);

        /* scores: thread tid takes position c0 + tid */
        if (tid < cnt) {
            const int     j = c0 + tid;
            const int64_t off = ((int64_t) bt[j / a.block_size]
                                 * a.block_size + j % a.block_size)
                                * row_elems + (int64_t) kvh * HD;
            const KV     *kr = kp + off;
            float         dot[GT];
            int           e, u;

            row_sh[tid] = off;
#pragma unroll
            for (h = 0; h < GT; h++) {
                dot[h] = 0.0f;
            }
#pragma unroll 2
            for (e = 0; e < HD; e += 8) {
                float kf[8];

                load8(kr + e, kf);
#pragma unroll
                for (h = 0; h < GT; h++) {
#pragma unroll
                    for (u = 0; u < 8; u++) {
                        dot[h] += q_sh[h][e + u] * kf[u];
                    }
                }
            }
#pragma unroll
            for (h = 0; h < GT; h++) {
                p_sh[h][tid] = dot[h] * a.scale;
            }
        } else {
#pragma unroll
            for (h = 0; h < GT; h++) {
                p_sh[h][tid] = -INFINITY;
            }
        }
        __syncthreads();

        /* softmax of the chunk, folded into the running (m, l) of each
         * head; a warp per head (position c0 is always valid, so the
         * chunk maximum is finite) */
        for (h = warp; h < nh; h += SPLIT_THREADS / 32) {
            float v[SPLIT_CH / 32], mx = -INFINITY, sum = 0.0f;
            float m_old, m_new, alpha;

#pragma unroll
            for (i = 0; i < SPLIT_CH / 32; i++) {
                v[i] = p_sh[h][lane + 32 * i];
                mx = fmaxf(mx, v[i]);
            }
            mx = warp_max(mx);
            m_old = m_sh[h];
            m_new = fmaxf(m_old, mx);
#pragma unroll
            for (i = 0; i < SPLIT_CH / 32; i++) {
                float p = expf(v[i] - m_new);   /* -inf: 0 */
                p_sh[h][lane + 32 * i] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            alpha = expf(m_old - m_new);        /* first chunk: 0 */
            __syncwarp();
            if (lane == 0) {
                m_sh[h] = m_new;
                l_sh[h] = l_sh[h] * alpha + sum;
                alpha_sh[h] = alpha;
            }
        }
        __syncthreads();

        /* o = o * alpha + P V over this thread's positions and columns */
#pragma unroll
        for (h = 0; h < GT; h++) {
            float al = alpha_sh[h];
#pragma unroll
            for (cc = 0; cc < COLS; cc++) {
                acc[h][cc] *= al;
            }
        }
        for (i = sub; i < cnt; i += NSUB) {
            const KV *vr = vp + row_sh[i];

#pragma unroll
            for (cc = 0; cc < COLS; cc++) {
                const int e = col0 + 128 * cc;

                if (e < HD) {
                    float vv = to_f32(vr[e]);
#pragma unroll
                    for (h = 0; h < GT; h++) {
                        acc[h][cc] += p_sh[h][i] * vv;
                    }
                }
            }
        }
        __syncthreads();                /* p_sh, row_sh are rewritten */
    }

    /* the NSUB position subsets hold partial sums of the same columns */
    if (NSUB > 1) {
        if (sub > 0) {
#pragma unroll
            for (h = 0; h < GT; h++) {
                red_sh[sub - 1][h][col0] = acc[h][0];
            }
        }
        __syncthreads();
        if (sub == 0) {
            for (i = 0; i < NSUB - 1; i++) {
#pragma unroll
                for (h = 0; h < GT; h++) {
                    acc[h][0] += red_sh[i][h][col0];
                }
            }
        }
    }
    if (sub != 0) {
        return;
    }

#pragma unroll
    for (h = 0; h < GT; h++) {
        if (h >= nh) {
            break;
        }
#pragma unroll
        for (cc = 0; cc < COLS; cc++) {
            const int e = col0 + 128 * cc;

            if (e >= HD) {
                continue;
            }
            if (part == NULL) {
                row_ptr(a.out, a.out_nb, t)[(size_t) (h0 + h) * HD + e] =
                    acc[h][cc] / l_sh[h];
            } else {
                float *slot = part + (((size_t) blockIdx.y * a.n_heads + h0
                                       + h) * n_split + blockIdx.z)
                                     * (HD + 2);
                slot[e] = acc[h][cc];
                if (e == 0) {
                    slot[HD] = m_sh[h];
                    slot[HD + 1] = l_sh[h];
                }
            }
        }
    }
}


/* Combines the ranges of each (token, head): one block per pair. */
__global__ void
attn_merge_kernel(const llm_cuda_attn_args a,
                  const int32_t *dec,   /* [gridDim.y] */
                  int n_split, int split_len,
                  const float *part)    /* [gridDim.y, n_heads, n_split,
                                           hd + 2] */
{
    const int    hd = a.head_dim, h = blockIdx.x;
    const int    t = dec[blockIdx.y];
    const int    ns = (a.pos[t] + split_len) / split_len;  /* ranges used */
    const float *base = part + ((size_t) blockIdx.y * a.n_heads + h)
                               * n_split * (hd + 2);
    float       *dst = row_ptr(a.out, a.out_nb, t) + (size_t) h * hd;
    float        mx = -INFINITY, den = 0.0f;
    int          z, e;

    for (z = 0; z < ns; z++) {
        mx = fmaxf(mx, base[(size_t) z * (hd + 2) + hd]);
    }
    for (z = 0; z < ns; z++) {
        den += base[(size_t) z * (hd + 2) + hd + 1]
               * expf(base[(size_t) z * (hd + 2) + hd] - mx);
    }
    for (e = threadIdx.x; e < hd; e += blockDim.x) {
        float num = 0.0f;

        for (z = 0; z < ns; z++) {
            num += base[(size_t) z * (hd + 2) + e]
                   * expf(base[(size_t) z * (hd + 2) + hd] - mx);
        }
        dst[e] = num / den;
    }
}


/* ------------------------------------------------------- tiled kernel */

template <int HD>
static size_t
tiled_smem(void)
{
    size_t f = (size_t) (TILE_Q + TILE_K) * (HD + 1)    /* Qs, KVs */
               + (size_t) TILE_Q * (TILE_K + 1)         /* S */
               + 3 * TILE_Q;                            /* m, l, alpha */
    size_t n = f * 4 + 3 * TILE_Q * 4;                  /* pos, tok, head */

    n = (n + 7) & ~(size_t) 7;
    return n + TILE_K * sizeof(int64_t);                /* K/V row offsets */
}


template <typename KV, int HD>
__global__ void __launch_bounds__(TILED_THREADS)
attn_tiled_kernel(const llm_cuda_attn_args a,
                  const int4 *tiles)    /* [gridDim.x] (first token, tokens
                                           in run, first row, positions) */
{
    constexpr int LDS = HD + 1;         /* padded rows: no bank conflicts */
    constexpr int LDP = TILE_K + 1;
    constexpr int NC = HD / 8;          /* output columns per thread */
    LLM_EXTERN_SHARED(float, smem);
    float        *Qs = smem;                        /* [TILE_Q][LDS] */
    float        *KVs = Qs + TILE_Q * LDS;          /* [TILE_K][LDS] */
    float        *S = KVs + TILE_K * LDS;           /* [TILE_Q][LDP] */
    float        *m_sh = S + TILE_Q * LDP;          /* [TILE_Q] */
    float        *l_sh = m_sh + TILE_Q;
    float        *alpha_sh = l_sh + TILE_Q;
    int          *pos_sh = (int *) (alpha_sh + TILE_Q);  /* -1: no row */
    int          *tok_sh = pos_sh + TILE_Q;
    int          *head_sh = tok_sh + TILE_Q;
    int64_t      *off_sh = (int64_t *) (((uintptr_t) (head_sh + TILE_Q)
                                         + 7) & ~(uintptr_t) 7);

    const int4     tile = tiles[blockIdx.x];
    const int      t0 = tile.x, rows = tile.y * (a.n_heads / a.n_kv_heads);
    const int      r0 = tile.z, kv_len = tile.w;
    const int      g = a.n_heads / a.n_kv_heads, kvh = blockIdx.y;
    const int      tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int      tr = tid >> 3, tc = tid & 7;     /* 16 x 8 threads */
    const int64_t  row_elems = (int64_t) a.n_kv_heads * HD;
    const KV      *kp = (const KV *) a.k_pages;
    const KV      *vp = (const KV *) a.v_pages;
    const int32_t *bt = a.block_table + (size_t) a.tok_seq[t0]
                                        * a.max_blocks;
    float          o[2][NC];
    int            i, k, r, e, idx, kv0;

    if (tid < TILE_Q) {
        int rr = r0 + tid;

        if (rr < rows) {
            int tok = t0 + rr / g;

            tok_sh[tid] = tok;
            head_sh[tid] = kvh * g + rr % g;
            pos_sh[tid] = a.pos[tok];
        } else {
            tok_sh[tid] = -1;
            head_sh[tid] = 0;
            pos_sh[tid] = -1;
        }
        m_sh[tid] = -INFINITY;
        l_sh[tid] = 0.0f;
        alpha_sh[tid] = 1.0f;
    }
    __syncthreads();
    for (idx = tid; idx < TILE_Q * HD; idx += TILED_THREADS) {
        int tok;

        r = idx / HD;
        e = idx - r * HD;
        tok = tok_sh[r];
        Qs[r * LDS + e] = tok >= 0
                          ? row_ptr(a.q, a.q_nb, tok)[(size_t) head_sh[r]
                                                      * HD + e]
                          : 0.0f;
    }
#pragma unroll
    for (i = 0; i < 2; i++) {
#pragma unroll
        for (k = 0; k < NC; k++) {
            o[i][k] = 0.0f;
        }
    }

    for (kv0 = 0; kv0 < kv_len; kv0 += TILE_K) {
        float sacc[2][4];

        if (tid < TILE_K) {
            int j = kv0 + tid;

            off_sh[tid] = j < kv_len
                          ? ((int64_t) bt[j / a.block_size] * a.block_size
                             + j % a.block_size) * row_elems
                            + (int64_t) kvh * HD
                          : -1;
        }
        __syncthreads();

        /* K tile, as f32 */
        for (idx = tid; idx < TILE_K * HD; idx += TILED_THREADS) {
            int64_t off;

            r = idx / HD;
            e = idx - r * HD;
            off = off_sh[r];
            KVs[r * LDS + e] = off >= 0 ? to_f32(kp[off + e]) : 0.0f;
        }
        __syncthreads();

        /* S = scale * Q K^T: rows tr, tr + 16; columns tc + 8 c */
#pragma unroll
        for (i = 0; i < 2; i++) {
#pragma unroll
            for (k = 0; k < 4; k++) {
                sacc[i][k] = 0.0f;
            }
        }
#pragma unroll 4
        for (e = 0; e < HD; e++) {
            float qa = Qs[tr * LDS + e], qb = Qs[(tr + 16) * LDS + e];

#pragma unroll
            for (k = 0; k < 4; k++) {
                float kk = KVs[(tc + 8 * k) * LDS + e];

                sacc[0][k] += qa * kk;
                sacc[1][k] += qb * kk;
            }
        }
#pragma unroll
        for (i = 0; i < 2; i++) {
#pragma unroll
            for (k = 0; k < 4; k++) {
                S[(tr + 16 * i) * LDP + tc + 8 * k] = sacc[i][k] * a.scale;
            }
        }
        __syncthreads();

        /* V tile over K's space, and the softmax of S: one warp per 8
         * rows, lane = column */
        for (idx = tid; idx < TILE_K * HD; idx += TILED_THREADS) {
            int64_t off;

            r = idx / HD;
            e = idx - r * HD;
            off = off_sh[r];
            KVs[r * LDS + e] = off >= 0 ? to_f32(vp[off + e]) : 0.0f;
        }
        for (r = warp * (TILE_Q / 4); r < (warp + 1) * (TILE_Q / 4); r++) {
            float v = S[r * LDP + lane], mx, m_old, m_new, p, alpha, sum;
            int   valid = kv0 + lane <= pos_sh[r];

            v = valid ? v : -INFINITY;
            mx = warp_max(v);
            m_old = m_sh[r];
            m_new = fmaxf(m_old, mx);
            if (m_new == -INFINITY) {
                p = 0.0f;               /* nothing seen yet (unused row) */
                alpha = 1.0f;
            } else {
                p = valid ? expf(v - m_new) : 0.0f;
                alpha = expf(m_old - m_new);
            }
            sum = warp_sum(p);
            S[r * LDP + lane] = p;
            __syncwarp();
            if (lane == 0) {
                m_sh[r] = m_new;
                l_sh[r] = l_sh[r] * alpha + sum;
                alpha_sh[r] = alpha;
            }
        }
        __syncthreads();

        /* O = O * alpha + P V: rows tr, tr + 16; columns tc + 8 k */
#pragma unroll
        for (i = 0; i < 2; i++) {
            float al = alpha_sh[tr + 16 * i];
#pragma unroll
            for (k = 0; k < NC; k++) {
                o[i][k] *= al;
            }
        }
#pragma unroll 4
        for (e = 0; e < TILE_K; e++) {
            float p0 = S[tr * LDP + e], p1 = S[(tr + 16) * LDP + e];

#pragma unroll
            for (k = 0; k < NC; k++) {
                float vv = KVs[e * LDS + tc + 8 * k];

                o[0][k] += p0 * vv;
                o[1][k] += p1 * vv;
            }
        }
        __syncthreads();                /* KVs, S, off_sh are rewritten */
    }

#pragma unroll
    for (i = 0; i < 2; i++) {
        r = tr + 16 * i;
        if (tok_sh[r] >= 0) {
            float  inv = 1.0f / l_sh[r];
            float *dst = row_ptr(a.out, a.out_nb, tok_sh[r])
                         + (size_t) head_sh[r] * HD;
#pragma unroll
            for (k = 0; k < NC; k++) {
                dst[tc + 8 * k] = o[i][k] * inv;
            }
        }
    }
}

#endif /* LLM_CUDA_ATTENTION_CUH */
