/*
 * Token sampling (see sampler.h).
 *
 * One llm_sampler per sequence.  A step:
 *
 *   1. log-probabilities of the raw logits, if asked for;
 *   2. penalties (repetition over prompt + output, frequency and presence
 *      over output), from a small open-addressing map of token counts;
 *   3. temperature 0: argmax, lowest id on ties;
 *   4. otherwise top-k, temperature, softmax, min-p, top-p, then one draw
 *      from the sequence's own xoshiro256** generator.
 *
 * Candidates are ordered by (logit or weight descending, id ascending): a
 * strict total order, so every selection below is deterministic and top-k
 * with k = 1 is exactly the greedy choice.  Nothing here sorts the
 * vocabulary: top-k is a heap (small k) or a quickselect, top-p a "mass
 * quickselect" that finds the smallest prefix of the sorted order reaching
 * the wanted mass without sorting it, after an exact threshold has thrown
 * out the long tail.
 *
 * The passes over the whole vocabulary (max, exp and sum) use GCC vector
 * extensions, four floats wide: SSE2 on any x86-64, NEON on arm64, no
 * instruction-set dispatch needed.
 */
#include "sampler.h"

#include <float.h>
#include <math.h>
#include <string.h>


/* exp of anything below this is 0 here (expf's own limit is near -103.9;
 * the difference is below 1e-38 of the largest weight) */
#define LLM_EXP_MIN         (-87.3f)
/* ranges at most this long are insertion sorted */
#define LLM_SMALL_RANGE     16
/* top-k up to this uses a heap over the logits, larger k a quickselect */
#define LLM_HEAP_MAX_K      256
/* tokens per partial sum kept for the draw over the whole vocabulary */
#define LLM_DRAW_BLOCK      64
/* top-p over the whole vocabulary narrows to at most this many tokens
 * before an exact selection */
#define LLM_BAND_MAX        512


/* ---- types ------------------------------------------------------------ */

typedef float   llm_v4f __attribute__((vector_size(16)));
typedef int32_t llm_v4i __attribute__((vector_size(16)));

typedef struct {
    float       v;              /* logit, later the unnormalised weight */
    int32_t     id;
} llm_cand;

typedef struct {
    int32_t     id;             /* -1: empty slot */
    int32_t     n_out;          /* times generated */
    int32_t     in_prompt;
    float       raw;            /* logit before this step's penalties */
} llm_tok_count;

struct llm_sampler {
    llm_sampling    p;
    int             n_vocab;
    int             penalties;      /* some penalty is on */
    uint64_t        rng[4];         /* xoshiro256** state */

    llm_tok_count  *counts;         /* [counts_cap], power of two */
    uint32_t        counts_cap;
    uint32_t        counts_used;

    /*
     * Scratch, only when temperature > 0.  cand holds candidates
     * [n_vocab]; a pass over the whole vocabulary writes its weights into
     * the upper half of the same memory viewed as floats (w, [n_vocab]),
     * which the compaction into cand can overwrite safely: candidate k
     * (floats 2k, 2k+1) is written after weight i >= k (float n + i) is
     * read, and 2k + 1 < n + i + 1 while i < n.
     */
    llm_cand       *cand;           /* [n_vocab] */
    double         *bsum;           /* [ceil(n_vocab / LLM_DRAW_BLOCK)] */
};


/* ---- parameters --------------------------------------------------------- */

void
llm_sampling_default(llm_sampling *s)
{
    memset(s, 0, sizeof(*s));
    s->temperature = 0.0f;
    s->top_k = 0;
    s->top_p = 1.0f;
    s->min_p = 0.0f;
    s->repetition_penalty = 1.0f;
    s->frequency_penalty = 0.0f;
    s->presence_penalty = 0.0f;
    s->seed = 0;
    s->has_seed = 0;
    s->logprobs = 0;
    s->top_logprobs = 0;
}


int
llm_sampling_check(const llm_sampling *s, llm_err *err)
{
    /* written as !(in range) so that NaN is rejected too */
    if (s == NULL) {
        return llm_err_set(err, LLM_EINVAL, "sampling parameters missing");
    }
    if (!(s->temperature >= 0.0f && s->temperature <= 2.0f)) {
        return llm_err_set(err, LLM_EINVAL,
                           "temperature must be between 0 and 2");
    }
    if (s->top_k < 0) {
        return llm_err_set(err, LLM_EINVAL, "top_k must be 0 or more");
    }
    if (!(s->top_p > 0.0f && s->top_p <= 1.0f)) {
        return llm_err_set(err, LLM_EINVAL,
                           "top_p must be greater than 0 and at most 1");
    }
    if (!(s->min_p >= 0.0f && s->min_p <= 1.0f)) {
        return llm_err_set(err, LLM_EINVAL, "min_p must be between 0 and 1");
    }
    if (!(s->repetition_penalty > 0.0f && s->repetition_penalty <= 10.0f)) {
        return llm_err_set(err, LLM_EINVAL,
                           "repetition_penalty must be greater than 0 and "
                           "at most 10");
    }
    if (!(s->frequency_penalty >= -2.0f && s->frequency_penalty <= 2.0f)) {
        return llm_err_set(err, LLM_EINVAL,
                           "frequency_penalty must be between -2 and 2");
    }
    if (!(s->presence_penalty >= -2.0f && s->presence_penalty <= 2.0f)) {
        return llm_err_set(err, LLM_EINVAL,
                           "presence_penalty must be between -2 and 2");
    }
    if (s->logprobs != 0 && s->logprobs != 1) {
        return llm_err_set(err, LLM_EINVAL, "logprobs must be 0 or 1");
    }
    if (s->top_logprobs < 0 || s->top_logprobs > LLM_MAX_TOP_LOGPROBS) {
        return llm_err_set(err, LLM_EINVAL,
                           "top_logprobs must be between 0 and %d",
                           LLM_MAX_TOP_LOGPROBS);
    }
    return LLM_OK;
}


/* ---- random numbers: xoshiro256**, seeded through splitmix64 ---------- */

static uint64_t
splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}


static inline uint64_t
rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}


static uint64_t
rng_next(uint64_t *st)
{
    uint64_t r = rotl64(st[1] * 5, 7) * 9;
    uint64_t t = st[1] << 17;

    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl64(st[3], 45);
    return r;
}


/* Uniform in [0, 1) with 53 random bits. */
static double
rng_double(uint64_t *st)
{
    return (double) (rng_next(st) >> 11) * 0x1.0p-53;
}


static void
rng_seed(uint64_t *st, uint64_t seed)
{
    uint64_t x = seed;
    int      i;

    /* splitmix64 never yields four zero words, the one bad xoshiro state */
    for (i = 0; i < 4; i++) {
        st[i] = splitmix64(&x);
    }
}


/* ---- token counts: open addressing, linear probing --------------------- */

static inline uint32_t
count_hash(int32_t id)
{
    uint32_t h = (uint32_t) id;

    /* murmur3 finaliser: consecutive ids spread over the table */
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}


static llm_tok_count *
count_find(const llm_sampler *s, int32_t id)
{
    uint32_t mask, i;

    if (s->counts_cap == 0) {
        return NULL;
    }
    mask = s->counts_cap - 1;
    for (i = count_hash(id) & mask; s->counts[i].id >= 0; i = (i + 1) & mask)
    {
        if (s->counts[i].id == id) {
            return &s->counts[i];
        }
    }
    return NULL;
}


/* Slot for id, inserted if new; the caller reserved room (count_reserve). */
static llm_tok_count *
count_get(llm_sampler *s, int32_t id)
{
    uint32_t mask = s->counts_cap - 1, i;

    for (i = count_hash(id) & mask; s->counts[i].id >= 0; i = (i + 1) & mask)
    {
        if (s->counts[i].id == id) {
            return &s->counts[i];
        }
    }
    s->counts[i].id = id;
    s->counts[i].n_out = 0;
    s->counts[i].in_prompt = 0;
    s->counts[i].raw = 0.0f;
    s->counts_used++;
    return &s->counts[i];
}


/* Makes room for `extra` new ids at a load of at most 1/2; on failure the
 * map is unchanged. */
static int
count_reserve(llm_sampler *s, uint32_t extra)
{
    uint32_t        want = s->counts_used + extra, cap, i, j, mask;
    llm_tok_count  *t;

    if ((uint64_t) want * 2 <= s->counts_cap) {
        return LLM_OK;
    }
    cap = s->counts_cap ? s->counts_cap : 64;
    while ((uint64_t) cap < (uint64_t) want * 2) {
        cap *= 2;
    }
    t = llm_malloc((size_t) cap * sizeof(*t));
    if (t == NULL) {
        return LLM_ENOMEM;
    }
    for (i = 0; i < cap; i++) {
        t[i].id = -1;
    }
    mask = cap - 1;
    for (i = 0; i < s->counts_cap; i++) {
        if (s->counts[i].id < 0) {
            continue;
        }
        for (j = count_hash(s->counts[i].id) & mask; t[j].id >= 0;
             j = (j + 1) & mask)
        {
            /* probe */
        }
        t[j] = s->counts[i];
    }
    llm_free(s->counts);
    s->counts = t;
    s->counts_cap = cap;
    return LLM_OK;
}


/* ---- sampler life cycle ----------------------------------------------- */

llm_sampler *
llm_sampler_new(const llm_sampling *p, int n_vocab, llm_err *err)
{
    static uint64_t  n_made;
    llm_sampler     *s;
    llm_sampling     def;
    uint64_t         seed;

    if (p == NULL) {
        llm_sampling_default(&def);
        p = &def;
    }
    if (n_vocab <= 0) {
        llm_err_set(err, LLM_EINVAL, "sampler: n_vocab %d must be positive",
                    n_vocab);
        return NULL;
    }
    if (llm_sampling_check(p, err) != LLM_OK) {
        return NULL;
    }

    s = llm_calloc(1, sizeof(*s));
    if (s == NULL) {
        goto nomem;
    }
    s->p = *p;
    s->n_vocab = n_vocab;
    s->penalties = p->repetition_penalty != 1.0f
                   || p->frequency_penalty != 0.0f
                   || p->presence_penalty != 0.0f;

    if (p->temperature > 0.0f) {
        s->cand = llm_malloc((size_t) n_vocab * sizeof(llm_cand));
        s->bsum = llm_malloc(((size_t) n_vocab / LLM_DRAW_BLOCK + 1)
                             * sizeof(double));
        if (s->cand == NULL || s->bsum == NULL) {
            llm_sampler_free(s);
            goto nomem;
        }
    }

    if (p->has_seed) {
        seed = p->seed;
    } else {
        /* the clock, and a counter for samplers made in the same tick */
        seed = llm_now_ns() ^ (uint64_t) (uintptr_t) s
               ^ (__atomic_fetch_add(&n_made, 1, __ATOMIC_RELAXED)
                  * 0x9e3779b97f4a7c15ull);
    }
    rng_seed(s->rng, seed);
    return s;

nomem:
    llm_err_set(err, LLM_ENOMEM, "sampler: no memory for %d tokens",
                n_vocab);
    return NULL;
}


void
llm_sampler_free(llm_sampler *s)
{
    if (s == NULL) {
        return;
    }
    llm_free(s->counts);
    llm_free(s->cand);
    llm_free(s->bsum);
    llm_free(s);
}


int
llm_sampler_add_prompt(llm_sampler *s, const int32_t *ids, int n)
{
    int i;

    if (s == NULL || n < 0 || (n > 0 && ids == NULL)) {
        return LLM_EINVAL;
    }
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->n_vocab) {
            return LLM_EINVAL;
        }
    }
    if (s->p.repetition_penalty == 1.0f) {
        return LLM_OK;          /* the prompt counts for nothing else */
    }
    for (i = 0; i < n; i++) {
        if (count_reserve(s, 1) != LLM_OK) {
            return LLM_ENOMEM;  /* the ids so far stay recorded */
        }
        count_get(s, ids[i])->in_prompt = 1;
    }
    return LLM_OK;
}


/* ---- whole-vocabulary passes (vector) ---------------------------------- */

static inline llm_v4f
v4_load(const float *p)
{
    llm_v4f v;

    memcpy(&v, p, sizeof(v));
    return v;
}


/* Lane-wise max; a NaN in x loses. */
static inline llm_v4f
v4_max(llm_v4f x, llm_v4f m)
{
    llm_v4i gt = x > m;

    return (llm_v4f) (((llm_v4i) x & gt) | ((llm_v4i) m & ~gt));
}


static inline float
v4_hmax(llm_v4f v)
{
    float m = v[0];
    int   i;

    for (i = 1; i < 4; i++) {
        m = v[i] > m ? v[i] : m;
    }
    return m;
}


/*
 * exp(x) for x <= 0 (Cephes' expf: x = n ln2 + g, a degree-5 polynomial
 * for e^g, 2^n built in the exponent bits); relative error below 1e-7,
 * exactly 1 at 0 and exactly 0 below LLM_EXP_MIN (and at -inf).
 */
static inline llm_v4f
v4_exp(llm_v4f x)
{
    const llm_v4f lo = { LLM_EXP_MIN, LLM_EXP_MIN, LLM_EXP_MIN,
                         LLM_EXP_MIN };
    llm_v4i       under = x < lo;
    llm_v4f       n, g, y;
    llm_v4i       e;

    /* clamped so that 2^n stays a normal float; zeroed at the end */
    x = (llm_v4f) (((llm_v4i) x & ~under) | ((llm_v4i) lo & under));
    /* round to nearest through the 1.5 * 2^23 trick */
    n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    g = x - n * 0.693359375f;
    g = g - n * -2.12194440e-4f;
    y = 1.9875691500e-4f * g + 1.3981999507e-3f;
    y = y * g + 8.3334519073e-3f;
    y = y * g + 4.1665795894e-2f;
    y = y * g + 1.6666665459e-1f;
    y = y * g + 5.0000001201e-1f;
    y = y * g * g + g + 1.0f;
    e = (__builtin_convertvector(n, llm_v4i) + 127) << 23;
    y = y * (llm_v4f) e;
    return (llm_v4f) ((llm_v4i) y & ~under);
}


/* Maximum of l[n]; *bad is set if some value is NaN or +inf. */
static float
logits_max(const float *l, int n, int *bad)
{
    llm_v4f m0, m1, x, y;
    llm_v4i nonfinite = { 0, 0, 0, 0 };
    float   m;
    int     i;

    m0 = m1 = (llm_v4f) { -INFINITY, -INFINITY, -INFINITY, -INFINITY };
    for (i = 0; i + 8 <= n; i += 8) {
        x = v4_load(l + i);
        y = v4_load(l + i + 4);
        nonfinite |= (x != x) | (x > FLT_MAX) | (y != y) | (y > FLT_MAX);
        m0 = v4_max(x, m0);
        m1 = v4_max(y, m1);
    }
    m = v4_hmax(v4_max(m1, m0));
    for (; i < n; i++) {
        nonfinite[0] |= !(l[i] <= FLT_MAX);
        m = l[i] > m ? l[i] : m;
    }
    if (bad != NULL) {
        *bad = (nonfinite[0] | nonfinite[1] | nonfinite[2] | nonfinite[3])
               != 0;
    }
    return m;
}


/* NaN becomes -inf (never chosen), +inf the largest float; returns the
 * maximum.  Only the rare bad row pays for the scalar pass. */
static float
logits_sanitise(float *l, int n)
{
    float m;
    int   bad, i;

    m = logits_max(l, n, &bad);
    if (!bad) {
        return m;
    }
    for (i = 0; i < n; i++) {
        if (l[i] != l[i]) {
            l[i] = -INFINITY;
        } else if (l[i] > FLT_MAX) {
            l[i] = FLT_MAX;
        }
    }
    return logits_max(l, n, NULL);
}


/* The lowest id holding the value m (the maximum: greedy's choice). */
static int32_t
logits_find(const float *l, int n, float m)
{
    int i;

    for (i = 0; i < n; i++) {
        if (l[i] == m) {
            return i;
        }
    }
    return 0;
}


/* Loads k < 4 floats, the other lanes set to fill. */
static inline llm_v4f
v4_load_tail(const float *p, int k, float fill)
{
    float t[4];
    int   j;

    for (j = 0; j < 4; j++) {
        t[j] = j < k ? p[j] : fill;
    }
    return v4_load(t);
}


static inline double
v4_hsum(llm_v4f v)
{
    return (double) v[0] + v[1] + v[2] + v[3];
}


/*
 * Sum over l[n] of exp((l - m) * inv_t), in double across blocks of
 * LLM_DRAW_BLOCK.  If w is not NULL the weights are stored there, those
 * below min_w set to 0 (min-p), and bsum receives each block's sum.
 */
static double
exp_sum(const float *l, int n, float m, float inv_t, float min_w, float *w,
        double *bsum)
{
    llm_v4f x0, x1, acc;
    double  total = 0.0;
    int     b, i, end;

    for (b = 0; b * LLM_DRAW_BLOCK < n; b++) {
        i = b * LLM_DRAW_BLOCK;
        end = i + LLM_DRAW_BLOCK < n ? i + LLM_DRAW_BLOCK : n;
        acc = (llm_v4f) { 0.0f, 0.0f, 0.0f, 0.0f };
        for (; i + 8 <= end; i += 8) {
            x0 = v4_exp((v4_load(l + i) - m) * inv_t);
            x1 = v4_exp((v4_load(l + i + 4) - m) * inv_t);
            if (w != NULL) {
                x0 = (llm_v4f) ((llm_v4i) x0 & (x0 >= min_w));
                x1 = (llm_v4f) ((llm_v4i) x1 & (x1 >= min_w));
                memcpy(w + i, &x0, sizeof(x0));
                memcpy(w + i + 4, &x1, sizeof(x1));
            }
            acc += x0 + x1;
        }
        for (; i < end; i += 4) {       /* the last, short block */
            x0 = v4_exp((v4_load_tail(l + i, end - i, -INFINITY) - m)
                        * inv_t);
            if (w != NULL) {
                x0 = (llm_v4f) ((llm_v4i) x0 & (x0 >= min_w));
                memcpy(w + i, &x0,
                       (size_t) (end - i < 4 ? end - i : 4) * sizeof(float));
            }
            acc += x0;
        }
        if (bsum != NULL) {
            bsum[b] = v4_hsum(acc);
        }
        total += v4_hsum(acc);
    }
    return total;
}


/* Mass and number of the weights w[n] at or above tau. */
static double
mass_above(const float *w, int n, float tau, int *count)
{
    llm_v4f x0, x1, acc;
    llm_v4i m0, m1, cnt = { 0, 0, 0, 0 };
    double  total = 0.0;
    int     i, end, c = 0;

    for (i = 0; i + 8 <= n; ) {
        end = i + LLM_DRAW_BLOCK < n ? i + LLM_DRAW_BLOCK : n;
        acc = (llm_v4f) { 0.0f, 0.0f, 0.0f, 0.0f };
        for (; i + 8 <= end; i += 8) {
            x0 = v4_load(w + i);
            x1 = v4_load(w + i + 4);
            m0 = x0 >= tau;
            m1 = x1 >= tau;
            acc += (llm_v4f) ((llm_v4i) x0 & m0)
                   + (llm_v4f) ((llm_v4i) x1 & m1);
            cnt -= m0 + m1;             /* a true lane is -1 */
        }
        total += v4_hsum(acc);
    }
    for (; i < n; i++) {
        if (w[i] >= tau) {
            total += w[i];
            c++;
        }
    }
    *count = c + cnt[0] + cnt[1] + cnt[2] + cnt[3];
    return total;
}


/*
 * Zeroes every weight that goes after (wb, idb) in candidate order (value
 * descending, id ascending), refills bsum and returns the total.
 */
static double
keep_upto(float *w, int n, float wb, int32_t idb, double *bsum)
{
    llm_v4f x, acc;
    llm_v4i id, keep;
    int     b, i, end;
    double  total = 0.0;

    for (b = 0; b * LLM_DRAW_BLOCK < n; b++) {
        i = b * LLM_DRAW_BLOCK;
        end = i + LLM_DRAW_BLOCK < n ? i + LLM_DRAW_BLOCK : n;
        acc = (llm_v4f) { 0.0f, 0.0f, 0.0f, 0.0f };
        for (; i < end; i += 4) {
            x = end - i >= 4 ? v4_load(w + i)
                             : v4_load_tail(w + i, end - i, 0.0f);
            id = (llm_v4i) { i, i + 1, i + 2, i + 3 };
            keep = (x > wb) | ((x == wb) & (id <= idb));
            x = (llm_v4f) ((llm_v4i) x & keep);
            memcpy(w + i, &x,
                   (size_t) (end - i < 4 ? end - i : 4) * sizeof(float));
            acc += x;
        }
        bsum[b] = v4_hsum(acc);
        total += bsum[b];
    }
    return total;
}


/* ---- candidate ordering and selection ---------------------------------- */

/* a goes before b: larger value, then lower id (branch-free) */
static inline int
cand_before(const llm_cand *a, const llm_cand *b)
{
    return (a->v > b->v) | ((a->v == b->v) & (a->id < b->id));
}


static inline void
cand_swap(llm_cand *a, llm_cand *b)
{
    llm_cand t = *a;

    *a = *b;
    *b = t;
}


static void
cand_insertion_sort(llm_cand *a, int lo, int hi)
{
    int      i, j;
    llm_cand x;

    for (i = lo + 1; i < hi; i++) {
        x = a[i];
        for (j = i; j > lo && cand_before(&x, &a[j - 1]); j--) {
            a[j] = a[j - 1];
        }
        a[j] = x;
    }
}


/* Heap of n with the element that goes last at the root. */
static void
cand_sift_down(llm_cand *a, int root, int n)
{
    int child;

    while ((child = 2 * root + 1) < n) {
        if (child + 1 < n && cand_before(&a[child], &a[child + 1])) {
            child++;
        }
        if (!cand_before(&a[root], &a[child])) {
            return;
        }
        cand_swap(&a[root], &a[child]);
        root = child;
    }
}


static void
cand_sift_up(llm_cand *a, int i)
{
    int parent;

    while (i > 0) {
        parent = (i - 1) / 2;
        if (!cand_before(&a[parent], &a[i])) {
            return;
        }
        cand_swap(&a[parent], &a[i]);
        i = parent;
    }
}


/* Fallback when partitioning degenerates: O(n log n) whatever the input;
 * leaves a[0, n) in cand_before order. */
static void
cand_heap_sort(llm_cand *a, int n)
{
    int i;

    for (i = n / 2 - 1; i >= 0; i--) {
        cand_sift_down(a, i, n);
    }
    for (i = n - 1; i > 0; i--) {
        cand_swap(&a[0], &a[i]);
        cand_sift_down(a, 0, i);
    }
}


static int
cand_median3(const llm_cand *a, int i, int j, int k)
{
    if (cand_before(&a[i], &a[j])) {
        if (cand_before(&a[j], &a[k])) {
            return j;
        }
        return cand_before(&a[i], &a[k]) ? k : i;
    }
    if (cand_before(&a[i], &a[k])) {
        return i;
    }
    return cand_before(&a[j], &a[k]) ? k : j;
}


/*
 * Partitions [lo, hi) (at least 3 long) around a median-of-three pivot and
 * returns its final index p: [lo, p) goes before it, (p, hi) after.  The
 * loop is branch-free (always swap, advance p by the comparison), since
 * the comparison is a coin toss early on.  *sum, if not NULL, gets the
 * total value of [lo, p).
 */
static int
cand_partition(llm_cand *a, int lo, int hi, double *sum)
{
    int      i, p, lt;
    llm_cand pivot, x;
    uint64_t xi, xp;
    double   s = 0.0;

    i = cand_median3(a, lo, lo + (hi - lo) / 2, hi - 1);
    cand_swap(&a[i], &a[hi - 1]);
    pivot = a[hi - 1];
    p = lo;
    for (i = lo; i < hi - 1; i++) {
        /* moved as whole 8-byte words: a store of the two fields apart
         * followed by an 8-byte load of a[p] would stall forwarding */
        memcpy(&xi, &a[i], sizeof(xi));
        memcpy(&xp, &a[p], sizeof(xp));
        memcpy(&x, &xi, sizeof(x));
        lt = cand_before(&x, &pivot);
        memcpy(&a[i], &xp, sizeof(xp));
        memcpy(&a[p], &xi, sizeof(xi));
        p += lt;
        if (sum != NULL) {
            s += lt ? x.v : 0.0f;
        }
    }
    cand_swap(&a[p], &a[hi - 1]);
    if (sum != NULL) {
        *sum = s;
    }
    return p;
}


static int
depth_limit(int n)
{
    int d = 8;

    while (n > 1) {
        n >>= 1;
        d += 2;
    }
    return d;
}


/* Moves the k first candidates (in cand_before order) to a[0, k), in no
 * particular order.  0 < k < n. */
static void
cand_select_k(llm_cand *a, int n, int k)
{
    int lo = 0, hi = n, p, depth = depth_limit(n);

    /* invariant: [0, lo) goes before [lo, n), [hi, n) after [0, hi) */
    while (hi - lo > LLM_SMALL_RANGE) {
        if (depth-- == 0) {
            cand_heap_sort(a + lo, hi - lo);
            return;
        }
        p = cand_partition(a, lo, hi, NULL);
        if (p == k || p == k - 1) {
            return;
        }
        if (p > k) {
            hi = p;
        } else {
            lo = p + 1;
        }
    }
    cand_insertion_sort(a, lo, hi);
}


/*
 * Finds the smallest m such that the first m of the n >= 1 candidates (in
 * cand_before order, by weight) hold at least `need`, moves them to
 * a[0, m) in no particular order and returns m.  This is top-p's
 * "smallest set of the sorted probabilities reaching top_p", found like a
 * quickselect.
 */
static int
cand_select_mass(llm_cand *a, int n, double need)
{
    int    lo = 0, hi = n, p, i, depth = depth_limit(n);
    double top;

    /* invariant: [0, lo) is taken and goes before the rest, `need` is
     * the mass still wanted from [lo, n), and the answer lies in
     * (lo, hi] */
    while (hi - lo > LLM_SMALL_RANGE && depth-- > 0) {
        p = cand_partition(a, lo, hi, &top);
        if (top >= need) {
            hi = p;
            continue;
        }
        top += a[p].v;
        if (top >= need) {
            return p + 1;
        }
        need -= top;
        lo = p + 1;
    }

    if (hi - lo > LLM_SMALL_RANGE) {
        cand_heap_sort(a + lo, hi - lo);
    } else {
        cand_insertion_sort(a, lo, hi);
    }
    top = 0.0;
    for (i = lo; i < hi; i++) {
        top += a[i].v;
        if (top >= need) {
            return i + 1;
        }
    }
    return hi > 0 ? hi : 1;     /* rounding: everything that is left */
}


/* The k first logits (k < n) not below thr, into c; returns how many. */
static int
top_k_logits(llm_cand *c, const float *l, int n, int k, float thr)
{
    int   cnt = 0, i;
    float x;

    if (k <= LLM_HEAP_MAX_K) {
        /* one pass; after the first few hundred tokens nearly every
         * logit fails the first comparison */
        for (i = 0; i < n; i++) {
            x = l[i];
            if (cnt == k) {
                if (x > c[0].v) {       /* ties keep the lower id */
                    c[0].v = x;
                    c[0].id = i;
                    cand_sift_down(c, 0, k);
                }
            } else if (x >= thr) {
                c[cnt].v = x;
                c[cnt].id = i;
                cand_sift_up(c, cnt++);
            }
        }
        return cnt;
    }

    for (i = 0; i < n; i++) {
        if (l[i] >= thr) {
            c[cnt].v = l[i];
            c[cnt].id = i;
            cnt++;
        }
    }
    if (k < cnt) {
        cand_select_k(c, cnt, k);
        cnt = k;
    }
    return cnt;
}


/* ---- the steps of one sample -------------------------------------------- */

/* log of the softmax denominator of the raw logits, max m. */
static double
logits_log_norm(const float *l, int n, float m)
{
    if (m == -INFINITY) {
        return INFINITY;        /* every logprob is -inf */
    }
    return (double) m + log(exp_sum(l, n, m, 1.0f, 0.0f, NULL, NULL));
}


/* The n largest raw logits, descending, lower id first on ties. */
static void
logits_top_n(const float *l, int n_vocab, int n, double log_z,
             llm_sample_result *out)
{
    float   v[LLM_MAX_TOP_LOGPROBS];
    int32_t id[LLM_MAX_TOP_LOGPROBS];
    int     cnt = 0, i, j;
    float   x;

    if (n > n_vocab) {
        n = n_vocab;
    }
    for (i = 0; i < n_vocab && n > 0; i++) {
        x = l[i];
        if (cnt == n && !(x > v[cnt - 1])) {
            continue;           /* an equal value keeps the lower id */
        }
        j = cnt < n ? cnt++ : n - 1;
        for (; j > 0 && x > v[j - 1]; j--) {
            v[j] = v[j - 1];
            id[j] = id[j - 1];
        }
        v[j] = x;
        id[j] = i;
    }
    out->n_top = cnt;
    for (i = 0; i < cnt; i++) {
        out->top_ids[i] = id[i];
        out->top_logprobs[i] = (float) ((double) v[i] - log_z);
    }
}


static void
apply_penalties(llm_sampler *s, float *l)
{
    float          rep = s->p.repetition_penalty;
    float          freq = s->p.frequency_penalty;
    float          pres = s->p.presence_penalty;
    llm_tok_count *c;
    uint32_t       i;
    float          x;

    for (i = 0; i < s->counts_cap; i++) {
        c = &s->counts[i];
        if (c->id < 0) {
            continue;
        }
        x = l[c->id];
        c->raw = x;
        if (rep != 1.0f) {
            /* shrinks the logit towards "less likely" whatever its sign */
            x = x > 0.0f ? x / rep : x * rep;
        }
        if (c->n_out > 0) {
            x -= (float) c->n_out * freq + pres;
        }
        l[c->id] = x;
    }
}


/* One draw among c[n] weighted by v, total sum. */
static int32_t
draw_cand(llm_sampler *s, const llm_cand *c, int n, double sum)
{
    double u = rng_double(s->rng) * sum, acc = 0.0;
    int    i;

    for (i = 0; i < n; i++) {
        acc += c[i].v;
        if (u < acc) {
            return c[i].id;
        }
    }
    /* rounding left u at the very top: the last token with weight */
    for (i = n - 1; i > 0 && c[i].v == 0.0f; i--) {
        /* back up */
    }
    return c[i].id;
}


/* One draw over the whole vocabulary's weights w[n]: the block sums find
 * the block, a short scan the token. */
static int32_t
draw_vocab(llm_sampler *s, const float *w, int n, double sum)
{
    double u = rng_double(s->rng) * sum, acc = 0.0;
    int    nb = (n + LLM_DRAW_BLOCK - 1) / LLM_DRAW_BLOCK, b, i, end;

    for (b = 0; b < nb - 1 && u >= acc + s->bsum[b]; b++) {
        acc += s->bsum[b];
    }
    end = (b + 1) * LLM_DRAW_BLOCK < n ? (b + 1) * LLM_DRAW_BLOCK : n;
    for (i = b * LLM_DRAW_BLOCK; i < end; i++) {
        acc += w[i];
        if (u < acc) {
            return i;
        }
    }
    for (i = end - 1; i > 0 && w[i] == 0.0f; i--) {
        /* rounding: the last token with weight */
    }
    return i;
}


/* top-p over candidates c[n] weighing sum, then the draw. */
static int32_t
top_p_cand(llm_sampler *s, llm_cand *c, int n, double sum)
{
    int i;

    n = cand_select_mass(c, n, (double) s->p.top_p * sum);
    sum = 0.0;
    for (i = 0; i < n; i++) {
        sum += c[i].v;
    }
    return draw_cand(s, c, n, sum);
}


/*
 * Gathers the weights w[i] in [lo, hi) with their ids into c, in id
 * order; returns how many.  c may overlap w from above (see
 * llm_sampler): c[k] is written after w[i >= k] was read.  Groups of four
 * with no member are skipped by one vector test; inside a group the
 * writes are branch-free, membership being a coin toss on a flat row.
 */
static int
gather_band(llm_cand *c, const float *w, int n, float lo, float hi)
{
    llm_v4f x;
    llm_v4i in;
    int     i, j, nb = 0;

    for (i = 0; i + 4 <= n; i += 4) {
        x = v4_load(w + i);
        in = (x >= lo) & (x < hi);
        if ((in[0] | in[1] | in[2] | in[3]) == 0) {
            continue;
        }
        for (j = 0; j < 4; j++) {
            c[nb].v = x[j];
            c[nb].id = i + j;
            nb -= in[j];                /* a true lane is -1 */
        }
    }
    for (; i < n; i++) {
        if (w[i] >= lo && w[i] < hi) {
            c[nb].v = w[i];
            c[nb].id = i;
            nb++;
        }
    }
    return nb;
}


/*
 * top-p over the whole vocabulary's weights w[n] (min-p already applied),
 * then the draw.
 *
 * The nucleus is every token up to a boundary token in candidate order.
 * Tokens below (1 - top_p) * sum / n together hold less than 1 - top_p,
 * so the boundary is at or above that: a band [lo, hi) with
 * mass(>= lo) >= top_p * sum > mass(>= hi) holds it.  Vector passes
 * halve the band until it has few tokens (this is what keeps a flat,
 * high-temperature row fast); those are gathered and the boundary found
 * exactly among them.
 */
static int32_t
top_p_vocab(llm_sampler *s, float *w, int n, double sum)
{
    llm_cand *c = s->cand;
    double    need = (double) s->p.top_p * sum, m_lo, m_hi = 0.0, mass;
    float     lo, hi = 1.0000001f, mid;         /* weights are <= 1 */
    int       c_lo, c_hi = 0, cnt, nb = 0, i;
    llm_cand  last;

    lo = (float) ((1.0 - s->p.top_p) * sum / n);
    lo = lo > s->p.min_p ? lo : s->p.min_p;
    lo = lo > FLT_MIN ? lo : FLT_MIN;           /* never a 0 weight */
    m_lo = mass_above(w, n, lo, &c_lo);

    while (c_lo - c_hi > LLM_BAND_MAX) {
        mid = 0.5f * (lo + hi);
        if (!(mid > lo && mid < hi)) {
            break;                              /* ties: cannot split */
        }
        mass = mass_above(w, n, mid, &cnt);
        if (mass >= need) {
            lo = mid;
            m_lo = mass;
            c_lo = cnt;
        } else {
            hi = mid;
            m_hi = mass;
            c_hi = cnt;
        }
    }
    (void) m_lo;

    if (c_hi == 0 || 2 * (c_lo - c_hi) + 2 > n) {
        /*
         * Nothing sure above the band, or a band so large (ties) that
         * gathering it would overwrite w: gather everything at or above
         * lo and select among it.
         */
        nb = gather_band(c, w, n, lo, INFINITY);
        return top_p_cand(s, c, nb, sum);
    }

    nb = gather_band(c, w, n, lo, hi);
    if (nb == 0) {
        return draw_vocab(s, w, n, sum);        /* cannot happen */
    }
    nb = cand_select_mass(c, nb, need - m_hi);
    last = c[0];
    for (i = 1; i < nb; i++) {
        if (cand_before(&last, &c[i])) {
            last = c[i];
        }
    }
    sum = keep_upto(w, n, last.v, last.id, s->bsum);
    return draw_vocab(s, w, n, sum);
}


/* Top-k, temperature, softmax, min-p, top-p, draw; m is max(l). */
static int32_t
sample_dist(llm_sampler *s, const float *l, float m)
{
    const llm_sampling *p = &s->p;
    llm_cand           *c = s->cand;
    float              *w = (float *) (void *) s->cand + s->n_vocab;
    int                 n = s->n_vocab, n_c, kept, i;
    float               inv_t = 1.0f / p->temperature;
    double              sum;

    if (m == -INFINITY || !(inv_t <= FLT_MAX)) {
        /* everything masked, or a temperature so small (denormal) that
         * only the argmax is left */
        return logits_find(l, n, m);
    }

    if (p->top_k == 0 || p->top_k >= n) {
        /* the whole vocabulary, min-p applied as the weights are made */
        sum = exp_sum(l, n, m, inv_t, p->min_p, w, s->bsum);
        if (p->top_p >= 1.0f) {
            return draw_vocab(s, w, n, sum);
        }
        return top_p_vocab(s, w, n, sum);
    }

    /* top-k; logits whose weight would be 0 cannot be drawn: skipped */
    n_c = top_k_logits(c, l, n, p->top_k, m + LLM_EXP_MIN * p->temperature);

    /* min-p keeps p >= min_p * p_max, and the largest weight is 1 */
    sum = 0.0;
    kept = 0;
    for (i = 0; i < n_c; i++) {
        c[kept].v = expf((c[i].v - m) * inv_t);
        c[kept].id = c[i].id;
        if (c[kept].v >= p->min_p) {
            sum += c[kept].v;
            kept++;
        }
    }
    if (p->top_p >= 1.0f) {
        return draw_cand(s, c, kept, sum);
    }
    return top_p_cand(s, c, kept, sum);
}


int
llm_sampler_sample(llm_sampler *s, float *logits, llm_sample_result *out)
{
    float           m;
    double          log_z = 0.0;
    int             want_lp;
    int32_t         tok;
    llm_tok_count  *c;

    if (s == NULL || logits == NULL || out == NULL) {
        return LLM_EINVAL;
    }
    /* the one allocation, before anything changes */
    if (s->penalties && count_reserve(s, 1) != LLM_OK) {
        return LLM_ENOMEM;
    }

    out->logprob = 0.0f;
    out->n_top = 0;

    m = logits_sanitise(logits, s->n_vocab);

    want_lp = s->p.logprobs || s->p.top_logprobs > 0;
    if (want_lp) {
        log_z = logits_log_norm(logits, s->n_vocab, m);
        logits_top_n(logits, s->n_vocab, s->p.top_logprobs, log_z, out);
    }

    if (s->penalties) {
        apply_penalties(s, logits);
        m = logits_max(logits, s->n_vocab, NULL);
    }

    if (s->p.temperature == 0.0f || s->cand == NULL) {
        tok = logits_find(logits, s->n_vocab, m);
    } else {
        tok = sample_dist(s, logits, m);
    }
    out->token = tok;

    c = s->penalties ? count_find(s, tok) : NULL;
    if (want_lp) {
        /* the raw logit: penalties may have changed the one in logits */
        out->logprob = (float) ((double) (c != NULL ? c->raw : logits[tok])
                                - log_z);
    }

    if (s->penalties) {
        if (c == NULL) {
            c = count_get(s, tok);      /* room was reserved above */
        }
        if (c->n_out < INT32_MAX) {
            c->n_out++;
        }
    }
    return LLM_OK;
}
