/*
 * Sampler: parameter checks, greedy, seeded reproducibility, the
 * distributions of temperature / top-k / top-p / min-p, penalties,
 * log-probabilities, allocation failures and the time of one step.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "engine/sampler.h"


#define ST_VOCAB 49152


/* ---- helpers ------------------------------------------------------------ */

static uint64_t st_rng_state;

static double
st_uniform(void)
{
    uint64_t z = (st_rng_state += 0x9e3779b97f4a7c15ull);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return ((double) (z >> 11) + 0.5) * 0x1.0p-53;
}


static double
st_normal(void)
{
    return sqrt(-2.0 * log(st_uniform())) * cos(6.283185307179586
                                                 * st_uniform());
}


/* Logits shaped like a language model's: a broad normal bulk and a few
 * strong candidates. */
static void
st_lm_logits(float *l, int n, uint64_t seed)
{
    int i;

    st_rng_state = seed;
    for (i = 0; i < n; i++) {
        l[i] = (float) (2.5 * st_normal());
    }
    for (i = 0; i < 8; i++) {
        l[(int) (st_uniform() * n)] = (float) (12.0 + 4.0 * st_uniform());
    }
}


static llm_sampler *
st_new(const llm_sampling *p, int n_vocab)
{
    llm_err err;

    memset(&err, 0, sizeof(err));
    return llm_sampler_new(p, n_vocab, &err);
}


/* Draws n tokens from a fixed small distribution, counting each. */
static int
st_histogram(llm_sampler *s, const float *logits, int n_vocab, int n,
             long *count)
{
    float             l[64];
    llm_sample_result r;
    int               i;

    memset(count, 0, (size_t) n_vocab * sizeof(long));
    for (i = 0; i < n; i++) {
        memcpy(l, logits, (size_t) n_vocab * sizeof(float));
        if (llm_sampler_sample(s, l, &r) != 0
            || r.token < 0 || r.token >= n_vocab)
        {
            return -1;
        }
        count[r.token]++;
    }
    return 0;
}


/* Pearson chi-square of counts against probabilities p (0 entries must
 * have no count: returns a huge value otherwise). */
static double
st_chi2(const long *count, const double *p, int n_vocab, long n)
{
    double chi = 0.0, e;
    int    i;

    for (i = 0; i < n_vocab; i++) {
        e = p[i] * (double) n;
        if (e == 0.0) {
            if (count[i] != 0) {
                return 1e30;
            }
            continue;
        }
        chi += ((double) count[i] - e) * ((double) count[i] - e) / e;
    }
    return chi;
}


/* ---- parameters --------------------------------------------------------- */

static int
st_rejects(const llm_sampling *p, const char *name)
{
    llm_err err;

    memset(&err, 0, sizeof(err));
    return llm_sampling_check(p, &err) == LLM_EINVAL
           && err.code == LLM_EINVAL
           && strncmp(err.msg, name, strlen(name)) == 0
           && err.msg[strlen(name)] == ' ';
}


TEST_SUITE(sampler_params)
{
    llm_sampling d, p;
    llm_err      err;

    test("sampler: defaults are greedy, no penalties, no logprobs");
    memset(&d, 0x5a, sizeof(d));
    llm_sampling_default(&d);
    test_cond(d.temperature == 0.0f);
    test_cond(d.top_k == 0);
    test_cond(d.top_p == 1.0f);
    test_cond(d.min_p == 0.0f);
    test_cond(d.repetition_penalty == 1.0f);
    test_cond(d.frequency_penalty == 0.0f);
    test_cond(d.presence_penalty == 0.0f);
    test_cond(d.has_seed == 0);
    test_cond(d.logprobs == 0 && d.top_logprobs == 0);
    test_cond(llm_sampling_check(&d, NULL) == 0);

    test("sampler: range edges are accepted");
    p = d;
    p.temperature = 2.0f;
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.top_k = 100000;
    p.repetition_penalty = 10.0f;
    p.frequency_penalty = -2.0f;
    p.presence_penalty = 2.0f;
    p.logprobs = 1;
    p.top_logprobs = LLM_MAX_TOP_LOGPROBS;
    test_cond(llm_sampling_check(&p, NULL) == 0);
    p.frequency_penalty = 2.0f;
    p.presence_penalty = -2.0f;
    p.top_p = 1e-6f;
    p.repetition_penalty = 0.01f;
    test_cond(llm_sampling_check(&p, NULL) == 0);

#define ST_REJECT(field, value, name)                                       \
    p = d;                                                                  \
    p.field = value;                                                        \
    test_cond(st_rejects(&p, name))

    test("sampler: every out-of-range field is rejected by name");
    ST_REJECT(temperature, -0.01f, "temperature");
    ST_REJECT(temperature, 2.01f, "temperature");
    ST_REJECT(temperature, NAN, "temperature");
    ST_REJECT(temperature, INFINITY, "temperature");
    ST_REJECT(top_k, -1, "top_k");
    ST_REJECT(top_p, 0.0f, "top_p");
    ST_REJECT(top_p, -0.5f, "top_p");
    ST_REJECT(top_p, 1.001f, "top_p");
    ST_REJECT(top_p, NAN, "top_p");
    ST_REJECT(min_p, -0.1f, "min_p");
    ST_REJECT(min_p, 1.5f, "min_p");
    ST_REJECT(min_p, NAN, "min_p");
    ST_REJECT(repetition_penalty, 0.0f, "repetition_penalty");
    ST_REJECT(repetition_penalty, -1.0f, "repetition_penalty");
    ST_REJECT(repetition_penalty, 10.5f, "repetition_penalty");
    ST_REJECT(repetition_penalty, NAN, "repetition_penalty");
    ST_REJECT(frequency_penalty, -2.5f, "frequency_penalty");
    ST_REJECT(frequency_penalty, 2.5f, "frequency_penalty");
    ST_REJECT(frequency_penalty, NAN, "frequency_penalty");
    ST_REJECT(presence_penalty, -2.5f, "presence_penalty");
    ST_REJECT(presence_penalty, 2.5f, "presence_penalty");
    ST_REJECT(presence_penalty, NAN, "presence_penalty");
    ST_REJECT(logprobs, 2, "logprobs");
    ST_REJECT(logprobs, -1, "logprobs");
    ST_REJECT(top_logprobs, -1, "top_logprobs");
    ST_REJECT(top_logprobs, LLM_MAX_TOP_LOGPROBS + 1, "top_logprobs");
#undef ST_REJECT

    test("sampler: the temperature message reads as documented");
    p = d;
    p.temperature = 3.0f;
    memset(&err, 0, sizeof(err));
    test_cond(llm_sampling_check(&p, &err) == LLM_EINVAL);
    test_cond(strcmp(err.msg, "temperature must be between 0 and 2") == 0);

    test("sampler: new refuses bad parameters and sizes");
    memset(&err, 0, sizeof(err));
    test_cond(llm_sampler_new(&p, 100, &err) == NULL);
    test_cond(err.code == LLM_EINVAL);
    memset(&err, 0, sizeof(err));
    test_cond(llm_sampler_new(&d, 0, &err) == NULL);
    test_cond(err.code == LLM_EINVAL && strstr(err.msg, "n_vocab") != NULL);
    llm_sampler_free(NULL);
}


/* ---- greedy and reproducibility ----------------------------------------- */

TEST_SUITE(sampler_greedy)
{
    static float      l[ST_VOCAB], copy[ST_VOCAB];
    llm_sampling      p;
    llm_sampler      *s, *k1;
    llm_sample_result r, r1;
    int               i, step, best, bad = 0, bad_k1 = 0;

    llm_sampling_default(&p);
    s = st_new(&p, ST_VOCAB);
    p.temperature = 1.5f;
    p.top_k = 1;
    p.has_seed = 1;
    p.seed = 99;
    k1 = st_new(&p, ST_VOCAB);

    test("sampler: greedy picks the argmax; top_k=1 picks the same");
    test_cond(s != NULL && k1 != NULL);
    if (s == NULL || k1 == NULL) {
        llm_sampler_free(s);
        llm_sampler_free(k1);
        return;
    }
    for (step = 0; step < 50; step++) {
        st_lm_logits(l, ST_VOCAB, 1000 + step);
        best = 0;
        for (i = 1; i < ST_VOCAB; i++) {
            best = l[i] > l[best] ? i : best;
        }
        memcpy(copy, l, sizeof(l));
        if (llm_sampler_sample(s, l, &r) != 0 || r.token != best) {
            bad++;
        }
        if (llm_sampler_sample(k1, copy, &r1) != 0 || r1.token != best) {
            bad_k1++;
        }
    }
    test_cond(bad == 0);
    test_cond(bad_k1 == 0);

    test("sampler: greedy ties go to the lowest id, for top_k=1 too");
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = 0.0f;
    }
    l[777] = 5.0f;
    l[31000] = 5.0f;
    l[40000] = 5.0f;
    memcpy(copy, l, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 777);
    test_cond(llm_sampler_sample(k1, copy, &r) == 0 && r.token == 777);

    test("sampler: NaN never chosen, +inf wins, -inf rows and tiny T safe");
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = NAN;
    }
    l[5] = -3.0f;
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 5);
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = NAN;
    }
    l[9] = 1.0f;
    test_cond(llm_sampler_sample(k1, l, &r) == 0 && r.token == 9);
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = 0.0f;
    }
    l[12] = INFINITY;
    test_cond(llm_sampler_sample(k1, l, &r) == 0 && r.token == 12);
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = -INFINITY;
    }
    test_cond(llm_sampler_sample(k1, l, &r) == 0
              && r.token >= 0 && r.token < ST_VOCAB);
    llm_sampler_free(k1);
    p.top_k = 0;
    p.temperature = 1e-45f;         /* a denormal: 1 / T overflows */
    k1 = st_new(&p, ST_VOCAB);
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = (float) (i % 1000);
    }
    l[4321] = 5000.0f;
    test_cond(k1 != NULL && llm_sampler_sample(k1, l, &r) == 0
              && r.token == 4321);
    test_cond(llm_sampler_sample(s, NULL, &r) == LLM_EINVAL);
    test_cond(llm_sampler_sample(NULL, l, &r) == LLM_EINVAL);

    llm_sampler_free(s);
    llm_sampler_free(k1);
}


#define ST_SEED_VOCAB 8192

/* Runs n steps of a sampler over a fixed stream of logits. */
static int
st_run(llm_sampler *s, int n, int32_t *tokens, llm_sampler *noise)
{
    static float      l[ST_SEED_VOCAB];
    llm_sample_result r;
    int               step;

    for (step = 0; step < n; step++) {
        if (noise != NULL) {
            /* an unrelated sequence in the same batch */
            st_lm_logits(l, ST_SEED_VOCAB, 777 + step);
            if (llm_sampler_sample(noise, l, &r) != 0) {
                return -1;
            }
        }
        st_lm_logits(l, ST_SEED_VOCAB, 5000 + step);
        /* flatten: many plausible tokens so that seeds matter */
        for (int i = 0; i < ST_SEED_VOCAB; i++) {
            l[i] *= 0.3f;
        }
        if (llm_sampler_sample(s, l, &r) != 0) {
            return -1;
        }
        tokens[step] = r.token;
    }
    return 0;
}


TEST_SUITE(sampler_seed)
{
    enum { N = 60 };
    llm_sampling  p, q;
    llm_sampler  *a, *b, *c, *noise, *u1, *u2;
    int32_t       ta[N], tb[N], tc[N], tn[N], tu1[N], tu2[N];
    int           ok;

    llm_sampling_default(&p);
    p.temperature = 1.0f;
    p.top_k = 200;
    p.top_p = 0.95f;
    p.min_p = 0.01f;
    p.has_seed = 1;
    p.seed = 424242;
    a = st_new(&p, ST_SEED_VOCAB);
    b = st_new(&p, ST_SEED_VOCAB);
    q = p;
    q.seed = 424243;
    c = st_new(&q, ST_SEED_VOCAB);
    q = p;
    q.seed = 1;
    q.temperature = 0.7f;
    q.top_k = 0;
    noise = st_new(&q, ST_SEED_VOCAB);
    q = p;
    q.has_seed = 0;
    u1 = st_new(&q, ST_SEED_VOCAB);
    u2 = st_new(&q, ST_SEED_VOCAB);

    test("sampler: same seed, same tokens, with others interleaved");
    ok = a && b && c && noise && u1 && u2;
    test_cond(ok);
    if (ok) {
        test_cond(st_run(a, N, ta, NULL) == 0);
        test_cond(st_run(b, N, tb, noise) == 0);
        test_cond(memcmp(ta, tb, sizeof(ta)) == 0);

        test("sampler: different seeds give different tokens");
        test_cond(st_run(c, N, tc, noise) == 0);
        test_cond(memcmp(ta, tc, sizeof(ta)) != 0);
        test_cond(st_run(noise, N, tn, NULL) == 0);

        test("sampler: unseeded samplers differ from each other");
        test_cond(st_run(u1, N, tu1, NULL) == 0);
        test_cond(st_run(u2, N, tu2, NULL) == 0);
        test_cond(memcmp(tu1, tu2, sizeof(tu1)) != 0);
    }
    llm_sampler_free(a);
    llm_sampler_free(b);
    llm_sampler_free(c);
    llm_sampler_free(noise);
    llm_sampler_free(u1);
    llm_sampler_free(u2);
}


/* ---- distributions ------------------------------------------------------ */

/* Softmax of l / t, with optional masking (keep[i] == 0). */
static void
st_softmax(const float *l, int n, double t, const int *keep, double *p)
{
    double m = -INFINITY, sum = 0.0;
    int    i;

    for (i = 0; i < n; i++) {
        if ((keep == NULL || keep[i]) && l[i] > m) {
            m = l[i];
        }
    }
    for (i = 0; i < n; i++) {
        p[i] = (keep == NULL || keep[i]) ? exp((l[i] - m) / t) : 0.0;
        sum += p[i];
    }
    for (i = 0; i < n; i++) {
        p[i] /= sum;
    }
}


static llm_sampler *
st_dist_sampler(float t, int k, float top_p, float min_p, uint64_t seed)
{
    llm_sampling p;

    llm_sampling_default(&p);
    p.temperature = t;
    p.top_k = k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.has_seed = 1;
    p.seed = seed;
    return st_new(&p, 8);
}


TEST_SUITE(sampler_distribution)
{
    /* 7 degrees of freedom: chi-square 40 is p < 1e-5; draws are seeded */
    enum { DRAWS = 20000 };
    static const float l8[8] = { 1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f,
                                 1.5f, -2.0f };
    /* probabilities 0.5, 0.3, 0.15, 0.05 (then three impossible) */
    float        q8[8];
    double       p[8];
    long         count[8];
    int          keep[8], i;
    llm_sampler *s;

    test("sampler: temperature 1 matches softmax (chi-square)");
    s = st_dist_sampler(1.0f, 0, 1.0f, 0.0f, 11);
    test_cond(s != NULL && st_histogram(s, l8, 8, DRAWS, count) == 0);
    st_softmax(l8, 8, 1.0, NULL, p);
    test_cond(st_chi2(count, p, 8, DRAWS) < 40.0);
    llm_sampler_free(s);

    test("sampler: temperature 0.5 sharpens as softmax(l / 0.5)");
    s = st_dist_sampler(0.5f, 0, 1.0f, 0.0f, 12);
    test_cond(s != NULL && st_histogram(s, l8, 8, DRAWS, count) == 0);
    st_softmax(l8, 8, 0.5, NULL, p);
    test_cond(st_chi2(count, p, 8, DRAWS) < 40.0);
    llm_sampler_free(s);

    test("sampler: top_k=3 keeps the three largest, renormalised");
    s = st_dist_sampler(1.0f, 3, 1.0f, 0.0f, 13);
    test_cond(s != NULL && st_histogram(s, l8, 8, DRAWS, count) == 0);
    for (i = 0; i < 8; i++) {
        keep[i] = i == 4 || i == 1 || i == 6;
    }
    st_softmax(l8, 8, 1.0, keep, p);
    test_cond(st_chi2(count, p, 8, DRAWS) < 40.0);
    llm_sampler_free(s);

    q8[0] = logf(0.5f);
    q8[1] = logf(0.3f);
    q8[2] = logf(0.15f);
    q8[3] = logf(0.05f);
    q8[4] = q8[5] = q8[6] = q8[7] = -INFINITY;

    test("sampler: top_p=0.85 keeps the smallest set reaching 0.85");
    s = st_dist_sampler(1.0f, 0, 0.85f, 0.0f, 14);
    test_cond(s != NULL && st_histogram(s, q8, 8, DRAWS, count) == 0);
    for (i = 0; i < 8; i++) {
        keep[i] = i < 3;
    }
    st_softmax(q8, 8, 1.0, keep, p);
    test_cond(count[3] == 0);
    test_cond(st_chi2(count, p, 8, DRAWS) < 40.0);
    llm_sampler_free(s);

    test("sampler: top_p=0.75 keeps two tokens");
    s = st_dist_sampler(1.0f, 0, 0.75f, 0.0f, 15);
    test_cond(s != NULL && st_histogram(s, q8, 8, DRAWS, count) == 0);
    test_cond(count[0] > 0 && count[1] > 0 && count[2] == 0);
    llm_sampler_free(s);

    test("sampler: min_p=0.2 drops p < 0.1; min_p=0.7 leaves the top");
    s = st_dist_sampler(1.0f, 0, 1.0f, 0.2f, 16);
    test_cond(s != NULL && st_histogram(s, q8, 8, DRAWS, count) == 0);
    for (i = 0; i < 8; i++) {
        keep[i] = i < 3;
    }
    st_softmax(q8, 8, 1.0, keep, p);
    test_cond(count[3] == 0);
    test_cond(st_chi2(count, p, 8, DRAWS) < 40.0);
    llm_sampler_free(s);
    s = st_dist_sampler(1.0f, 0, 1.0f, 0.7f, 17);
    test_cond(s != NULL && st_histogram(s, q8, 8, 2000, count) == 0);
    test_cond(count[0] == 2000);
    llm_sampler_free(s);

    test("sampler: min_p applies after temperature (T=2 flattens)");
    /* at T = 2 the weights are sqrt(p): 0.707, 0.548, 0.387, 0.224 of
     * the max 0.707; min_p 0.5 keeps tokens 0..2 */
    s = st_dist_sampler(2.0f, 0, 1.0f, 0.5f, 18);
    test_cond(s != NULL && st_histogram(s, q8, 8, DRAWS, count) == 0);
    for (i = 0; i < 8; i++) {
        keep[i] = i < 3;
    }
    st_softmax(q8, 8, 2.0, keep, p);
    test_cond(count[3] == 0);
    test_cond(st_chi2(count, p, 8, DRAWS) < 40.0);
    llm_sampler_free(s);
}


/* Reference nucleus by a full sort, in double. */
static int
st_cmp_desc(const void *a, const void *b)
{
    const double *x = a, *y = b;

    return x[0] < y[0] ? 1 : x[0] > y[0] ? -1 : (x[1] > y[1]) - (x[1] < y[1]);
}


TEST_SUITE(sampler_top_p_large)
{
    static float      l[ST_VOCAB], w[ST_VOCAB];
    static double     pairs[ST_VOCAB][2];
    static char       in_nucleus[ST_VOCAB];
    static long       count[ST_VOCAB];
    llm_sampling      p;
    llm_sampler      *s;
    llm_sample_result r;
    double            m, sum, acc, p_top;
    int               i, n_nuc = 0, outside = 0, distinct = 0, trial;
    const float       top_p = 0.6f, temp = 0.9f;

    /* a flat distribution: the nucleus has thousands of tokens, so the
     * mass selection runs through many partitions */
    st_rng_state = 31337;
    for (i = 0; i < ST_VOCAB; i++) {
        l[i] = (float) (0.8 * st_normal());
    }
    m = -INFINITY;
    for (i = 0; i < ST_VOCAB; i++) {
        m = l[i] > m ? l[i] : m;
    }
    sum = 0.0;
    for (i = 0; i < ST_VOCAB; i++) {
        pairs[i][0] = exp((l[i] - m) / temp);
        pairs[i][1] = i;
        sum += pairs[i][0];
    }
    qsort(pairs, ST_VOCAB, sizeof(pairs[0]), st_cmp_desc);
    acc = 0.0;
    for (i = 0; i < ST_VOCAB && acc < top_p * sum; i++) {
        acc += pairs[i][0];
        in_nucleus[(int) pairs[i][1]] = 1;
        n_nuc++;
    }
    p_top = pairs[0][0] / acc;

    llm_sampling_default(&p);
    p.temperature = temp;
    p.top_p = top_p;
    p.has_seed = 1;
    p.seed = 5;
    s = st_new(&p, ST_VOCAB);

    test("sampler: top_p over 49152 tokens draws only from the nucleus");
    test_cond(s != NULL);
    if (s == NULL) {
        return;
    }
    for (trial = 0; trial < 2000; trial++) {
        memcpy(w, l, sizeof(l));
        if (llm_sampler_sample(s, w, &r) != 0) {
            outside++;
            break;
        }
        if (!in_nucleus[r.token]) {
            /* a token at the very edge may differ by float rounding */
            outside++;
        }
        distinct += count[r.token]++ == 0;
    }
    test_cond(n_nuc > 5000);
    test_cond(outside <= 2);
    test_cond(distinct > 1000);     /* spread over the nucleus */
    /* the top token's share matches within 5 sigma */
    test_cond(fabs(count[(int) pairs[0][1]] / 2000.0 - p_top)
              < 5.0 * sqrt(p_top / 2000.0) + 1e-3);

    test("sampler: a tiny top_p always gives the argmax");
    llm_sampler_free(s);
    p.top_p = 1e-6f;
    p.temperature = 2.0f;
    s = st_new(&p, ST_VOCAB);
    outside = 0;
    for (trial = 0; s != NULL && trial < 50; trial++) {
        memcpy(w, l, sizeof(l));
        if (llm_sampler_sample(s, w, &r) != 0
            || r.token != (int) pairs[0][1])
        {
            outside++;
        }
    }
    test_cond(s != NULL && outside == 0);
    llm_sampler_free(s);
}


/* ---- against a reference implementation -------------------------------- */

static const float *st_ref_logits;

static int
st_ref_cmp(const void *a, const void *b)
{
    int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    float   lx = st_ref_logits[x], ly = st_ref_logits[y];

    if (lx != ly) {
        return lx > ly ? -1 : 1;
    }
    return (x > y) - (x < y);
}


/* The documented pipeline, in double, with a full sort: top-k, softmax at
 * temperature t, min-p, top-p, renormalise.  order gets the ranking. */
static void
st_reference(const float *l, int n, float t, int k, float top_p,
             float min_p, double *prob, int32_t *order)
{
    double m, sum = 0.0, acc = 0.0;
    int    r, cut;

    for (r = 0; r < n; r++) {
        order[r] = r;
        prob[r] = 0.0;
    }
    st_ref_logits = l;
    qsort(order, n, sizeof(int32_t), st_ref_cmp);
    m = l[order[0]];
    cut = k > 0 && k < n ? k : n;
    for (r = 0; r < cut; r++) {
        prob[order[r]] = exp((l[order[r]] - m) / t);
        if (prob[order[r]] < min_p) {
            prob[order[r]] = 0.0;
        }
        sum += prob[order[r]];
    }
    for (r = 0; r < n; r++) {
        if (acc >= top_p * sum) {
            prob[order[r]] = 0.0;
        }
        acc += prob[order[r]];
    }
    sum = 0.0;
    for (r = 0; r < n; r++) {
        sum += prob[r];
    }
    for (r = 0; r < n; r++) {
        prob[r] /= sum;
    }
}


/*
 * Draws `draws` tokens and compares them with prob: no token of
 * probability 0 may come out, every likely one must, and a chi-square
 * over bins of tokens (in rank order, each bin expecting at least
 * max(10, draws / 40)) must stay within 6 standard deviations of its
 * mean.
 */
static int
st_matches(llm_sampler *s, const float *logits, int n, const double *prob,
           const int32_t *order, int draws)
{
    float             *l = malloc((size_t) n * sizeof(float));
    long              *count = calloc((size_t) n, sizeof(long));
    llm_sample_result  r;
    double             e, o, chi = 0.0, min_e = draws / 40.0;
    int                i, bins = 0, bad = 0;

    if (l == NULL || count == NULL) {
        free(l);
        free(count);
        return 0;
    }
    min_e = min_e > 10.0 ? min_e : 10.0;
    for (i = 0; i < draws && !bad; i++) {
        memcpy(l, logits, (size_t) n * sizeof(float));
        if (llm_sampler_sample(s, l, &r) != 0 || r.token < 0
            || r.token >= n || prob[r.token] == 0.0)
        {
            bad = 1;
        } else {
            count[r.token]++;
        }
    }
    for (i = 0; i < n && !bad; i++) {
        /* a token expected 15 times shows up (misses once in 3e6) */
        bad = prob[i] * draws >= 15.0 && count[i] == 0;
    }
    e = o = 0.0;
    for (i = 0; i < n && !bad; i++) {
        e += prob[order[i]] * draws;
        o += (double) count[order[i]];
        if (e >= min_e || i == n - 1) {
            if (e > 0.0) {
                chi += (o - e) * (o - e) / e;
                bins++;
            }
            e = o = 0.0;
        }
    }
    free(l);
    free(count);
    return !bad && bins >= 2
           && chi < (bins - 1) + 6.0 * sqrt(2.0 * (bins - 1)) + 10.0;
}


typedef struct {
    int     n;
    float   spread;     /* std of the logits; < 0: geometric; 98, 99: ties */
    float   t;
    int     k;
    float   top_p;
    float   min_p;
    int     draws;
} st_case;


TEST_SUITE(sampler_reference)
{
    static const st_case cases[] = {
        /* small vocabularies: every token counts */
        {   64,    1.5f, 1.0f,    0,  1.0f,  0.0f, 20000 },
        {   64,    1.5f, 0.7f,   10,  1.0f,  0.0f, 20000 },
        {   64,    1.5f, 1.3f,    0,  0.8f,  0.0f, 20000 },
        {   64,    1.5f, 1.0f,    0,  1.0f,  0.1f, 20000 },
        {   64,    1.5f, 0.9f,   20,  0.9f, 0.05f, 20000 },
        {   64,    1.5f, 1.0f,    0,  0.7f,  0.2f, 20000 },
        {   64,    1.5f, 2.0f,   64, 0.95f,  0.0f, 20000 },
        {   64,    1.5f, 1.0f,   30,  1.0f,  0.2f, 20000 },
        /* large flat rows: the banded top-p and the quickselect top-k */
        { 4096,    0.5f, 1.0f,    0,  0.5f,  0.0f,  4000 },
        { 4096,    0.5f, 1.0f,    0,  0.9f,  0.3f,  4000 },
        { 4096,    0.5f, 1.0f, 1000,  0.8f,  0.0f,  4000 },
        { 4096,    0.5f, 1.0f, 3000,  1.0f,  0.0f,  4000 },
        { 4096,    4.0f, 1.0f,    0, 0.95f,  0.0f,  4000 },
        /* geometric rows, shuffled: the tokens at the top-p edge are
         * likely enough to show a nucleus one token too long or short */
        {  200,  -0.03f, 1.0f,    0,  0.6f,  0.0f, 20000 },
        {  200,  -0.03f, 1.0f,  150,  0.7f,  0.0f, 20000 },
        {  200,  -0.03f, 1.0f,   50,  1.0f,  0.3f, 20000 },
        { 4096, -0.002f, 1.0f,    0,  0.5f,  0.0f,  4000 },
        { 4096, -0.002f, 1.0f,    0,  0.8f, 0.05f,  4000 },
        /* ties: the top-p edge falls inside 1400 (or 3000: more than
         * half the row) equal logits, one higher and the rest lower,
         * where only ids can decide */
        { 4096,   99.0f, 1.0f,    0,  0.3f,  0.0f,  8000 },
        { 4096,   99.0f, 1.0f,    0,  0.7f,  0.0f,  4000 },
        { 4096,   98.0f, 1.0f,    0,  0.5f,  0.0f,  4000 },
        /* lengths that leave vector tails */
        {  203,    1.0f, 1.0f,    0,  1.0f,  0.0f, 20000 },
        {  203,  -0.03f, 1.0f,    0,  0.6f,  0.1f, 20000 },
        { 4099,    0.5f, 1.0f,    0,  0.5f,  0.0f,  4000 },
        {    5,    1.0f, 1.0f,    0,  0.9f,  0.0f, 20000 },
        {    3,    1.0f, 1.0f,    2,  1.0f,  0.0f, 20000 },
    };
    int          c, i, ok, n_ok = 0;
    int          n_cases = sizeof(cases) / sizeof(cases[0]);
    float       *l;
    double      *prob;
    int32_t     *order;
    llm_sampling p;
    llm_sampler *s;

    test("sampler: draws match a full-sort reference for many settings");
    l = malloc(4099 * sizeof(float));
    prob = malloc(4099 * sizeof(double));
    order = malloc(4099 * sizeof(int32_t));
    test_cond(l != NULL && prob != NULL && order != NULL);
    for (c = 0; l != NULL && prob != NULL && order != NULL && c < n_cases;
         c++)
    {
        st_rng_state = 100 + c;
        for (i = 0; i < cases[c].n; i++) {
            if (cases[c].spread >= 98.0f) {
                l[i] = i == 0 ? 0.5f
                       : i <= (cases[c].spread == 99.0f ? 1400 : 3000)
                       ? 0.0f : -3.0f;
            } else if (cases[c].spread < 0.0f) {
                l[i] = cases[c].spread * i;
            } else {
                l[i] = (float) (cases[c].spread * st_normal());
            }
        }
        for (i = cases[c].n - 1;
             (cases[c].spread < 0.0f || cases[c].spread >= 98.0f) && i > 0;
             i--)
        {
            int   j = (int) (st_uniform() * (i + 1));
            float x = l[i];

            l[i] = l[j];
            l[j] = x;
        }
        st_reference(l, cases[c].n, cases[c].t, cases[c].k, cases[c].top_p,
                     cases[c].min_p, prob, order);
        llm_sampling_default(&p);
        p.temperature = cases[c].t;
        p.top_k = cases[c].k;
        p.top_p = cases[c].top_p;
        p.min_p = cases[c].min_p;
        p.has_seed = 1;
        p.seed = 1000 + c;
        s = st_new(&p, cases[c].n);
        ok = s != NULL && st_matches(s, l, cases[c].n, prob, order,
                                     cases[c].draws);
        if (!ok) {
            printf("       case %d (n %d, t %.1f, k %d, top_p %.2f, "
                   "min_p %.2f) differs\n", c, cases[c].n, cases[c].t,
                   cases[c].k, cases[c].top_p, cases[c].min_p);
        }
        n_ok += ok;
        llm_sampler_free(s);
    }
    test_cond(n_ok == n_cases);
    free(l);
    free(prob);
    free(order);
}


TEST_SUITE(sampler_tiny)
{
    static const float  tk[] = { 0.0f, 1.0f, 0.5f, 1.0f };
    llm_sampling        p;
    llm_sampler        *s;
    llm_sample_result   r;
    float               l[4];
    int                 n, k, pi, bad = 0;
    static const float  tops[] = { 1.0f, 0.5f, 1e-6f };

    test("sampler: 1- to 4-token vocabularies under every filter");
    for (n = 1; n <= 4; n++) {
        for (k = 0; k <= n + 1; k++) {
            for (pi = 0; pi < 3; pi++) {
                llm_sampling_default(&p);
                p.temperature = 1.0f;
                p.top_k = k;
                p.top_p = tops[pi];
                p.min_p = pi == 1 ? 0.5f : 0.0f;
                p.logprobs = 1;
                p.top_logprobs = 20;
                p.has_seed = 1;
                s = st_new(&p, n);
                memcpy(l, tk, sizeof(l));
                if (s == NULL || llm_sampler_sample(s, l, &r) != 0
                    || r.token < 0 || r.token >= n || r.n_top != n)
                {
                    bad++;
                }
                llm_sampler_free(s);
            }
        }
    }
    test_cond(bad == 0);
}


/* ---- penalties ---------------------------------------------------------- */

/* Greedy step that forces token t (so it is recorded as generated). */
static int
st_force(llm_sampler *s, int n_vocab, int t)
{
    float             l[16];
    llm_sample_result r;
    int               i;

    for (i = 0; i < n_vocab; i++) {
        l[i] = 0.0f;
    }
    l[t] = 100.0f;
    return llm_sampler_sample(s, l, &r) == 0 && r.token == t ? 0 : -1;
}


TEST_SUITE(sampler_penalties)
{
    static const float base[10] = { 0.5f, 3.0f, -1.0f, 2.0f, -2.0f,
                                    1.0f, 4.0f, -0.5f, 0.0f, 7.0f };
    const int32_t      prompt[3] = { 1, 2, 1 };
    const int32_t      bad_prompt[2] = { 1, 10 };
    float              l[10], l16[16];
    llm_sampling       p;
    llm_sampler       *s;
    llm_sample_result  r;
    int                i, ok;

    llm_sampling_default(&p);
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    s = st_new(&p, 10);

    test("sampler: penalties change exactly the right logits");
    test_cond(s != NULL);
    if (s == NULL) {
        return;
    }
    test_cond(llm_sampler_add_prompt(s, prompt, 3) == 0);
    test_cond(llm_sampler_add_prompt(s, bad_prompt, 2) == LLM_EINVAL);
    test_cond(llm_sampler_add_prompt(s, NULL, 1) == LLM_EINVAL);
    test_cond(llm_sampler_add_prompt(s, NULL, 0) == 0);
    ok = st_force(s, 10, 3) == 0 && st_force(s, 10, 3) == 0
         && st_force(s, 10, 4) == 0;
    test_cond(ok);
    memcpy(l, base, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0);
    test_cond(fabsf(l[1] - 1.5f) < 1e-6f);      /* prompt: 3 / 2 */
    test_cond(fabsf(l[2] - -2.0f) < 1e-6f);     /* prompt: -1 * 2 */
    test_cond(fabsf(l[3] - -0.25f) < 1e-6f);    /* 2/2 - 2*0.5 - 0.25 */
    test_cond(fabsf(l[4] - -4.75f) < 1e-6f);    /* -2*2 - 0.5 - 0.25 */
    for (i = 0; i < 10; i++) {
        if (i < 1 || i > 4) {
            test_cond(l[i] == base[i]);
        }
    }
    test_cond(r.token == 9);
    llm_sampler_free(s);

    test("sampler: frequency/presence count output only, not the prompt");
    llm_sampling_default(&p);
    p.frequency_penalty = 1.0f;
    p.presence_penalty = -0.5f;
    s = st_new(&p, 10);
    test_cond(s != NULL);
    if (s == NULL) {
        return;
    }
    test_cond(llm_sampler_add_prompt(s, prompt, 3) == 0);
    ok = st_force(s, 10, 6) == 0 && st_force(s, 10, 6) == 0
         && st_force(s, 10, 6) == 0;
    test_cond(ok);
    memcpy(l, base, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0);
    test_cond(fabsf(l[6] - (4.0f - 3.0f + 0.5f)) < 1e-6f);
    test_cond(l[1] == base[1] && l[2] == base[2]);
    test_cond(r.token == 9);
    /* 9 is now generated once: 7 - 1 + 0.5 */
    memcpy(l, base, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0);
    test_cond(fabsf(l[9] - 6.5f) < 1e-6f);
    llm_sampler_free(s);

    test("sampler: penalties steer a sampled (not greedy) choice");
    llm_sampling_default(&p);
    p.temperature = 0.01f;
    p.frequency_penalty = 2.0f;
    p.has_seed = 1;
    s = st_new(&p, 10);
    test_cond(s != NULL);
    if (s == NULL) {
        return;
    }
    /* 9 (7.0) beats 6 (4.0), then 7 - 2 = 5 still does, then 7 - 4 not */
    memcpy(l, base, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 9);
    memcpy(l, base, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 9);
    memcpy(l, base, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 6);
    llm_sampler_free(s);

    test("sampler: long outputs grow the count map correctly");
    llm_sampling_default(&p);
    p.frequency_penalty = 0.001f;
    s = st_new(&p, 16);
    ok = s != NULL;
    for (i = 0; ok && i < 16 * 40; i++) {
        ok = st_force(s, 16, i % 16) == 0;
    }
    test_cond(ok);
    if (s != NULL) {
        for (i = 0; i < 16; i++) {
            l16[i] = 1.0f;
        }
        test_cond(llm_sampler_sample(s, l16, &r) == 0);
        ok = 1;
        for (i = 0; i < 16; i++) {
            ok &= fabsf(l16[i] - (1.0f - 40 * 0.001f)) < 1e-5f;
        }
        test_cond(ok);
        llm_sampler_free(s);
    }
}


/* ---- log-probabilities -------------------------------------------------- */

TEST_SUITE(sampler_logprobs)
{
    static float      l[ST_VOCAB], raw[ST_VOCAB];
    float             small[20];
    llm_sampling      p;
    llm_sampler      *s;
    llm_sample_result r;
    double            m, sum, log_z, total;
    int               i, ordered;

    test("sampler: logprobs over a 20-token vocabulary sum to 1");
    llm_sampling_default(&p);
    p.logprobs = 1;
    p.top_logprobs = 20;
    p.temperature = 0.8f;
    p.has_seed = 1;
    s = st_new(&p, 20);
    test_cond(s != NULL);
    if (s == NULL) {
        return;
    }
    st_rng_state = 77;
    for (i = 0; i < 20; i++) {
        small[i] = (float) (30.0 * st_normal());       /* wide range */
    }
    test_cond(llm_sampler_sample(s, small, &r) == 0);
    test_cond(r.n_top == 20);
    total = 0.0;
    for (i = 0; i < r.n_top; i++) {
        total += exp(r.top_logprobs[i]);
    }
    test_cond(fabs(total - 1.0) < 1e-5);
    /* a narrow range: every token matters, float rounding is all the
     * error there may be */
    for (i = 0; i < 20; i++) {
        small[i] = (float) (0.5 * st_normal());
    }
    test_cond(llm_sampler_sample(s, small, &r) == 0);
    total = 0.0;
    for (i = 0; i < r.n_top; i++) {
        total += exp(r.top_logprobs[i]);
    }
    test_cond(r.n_top == 20 && fabs(total - 1.0) < 2e-6);
    llm_sampler_free(s);

    test("sampler: chosen and top-N logprobs are the raw log-softmax");
    llm_sampling_default(&p);
    p.logprobs = 1;
    p.top_logprobs = 5;
    p.repetition_penalty = 5.0f;    /* must not show in the logprobs */
    s = st_new(&p, ST_VOCAB);
    test_cond(s != NULL);
    if (s == NULL) {
        return;
    }
    st_lm_logits(raw, ST_VOCAB, 4242);
    raw[100] = 50.0f;
    raw[200] = 49.0f;
    raw[300] = 49.0f;               /* tie: lower id first */
    raw[50] = 48.0f;
    raw[400] = 47.0f;
    m = 50.0;
    sum = 0.0;
    for (i = 0; i < ST_VOCAB; i++) {
        sum += exp(raw[i] - m);
    }
    log_z = m + log(sum);
    memcpy(l, raw, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 100);
    test_cond(fabs(r.logprob - (50.0 - log_z)) < 1e-5);
    test_cond(r.n_top == 5);
    test_cond(r.top_ids[0] == 100 && r.top_ids[1] == 200
              && r.top_ids[2] == 300 && r.top_ids[3] == 50
              && r.top_ids[4] == 400);
    ordered = 1;
    for (i = 0; i < r.n_top; i++) {
        ordered &= fabs(r.top_logprobs[i] - (raw[r.top_ids[i]] - log_z))
                   < 1e-5;
        if (i > 0) {
            ordered &= r.top_logprobs[i] <= r.top_logprobs[i - 1];
        }
    }
    test_cond(ordered);

    test("sampler: logprobs ignore penalties on a repeated token");
    /* token 100 is now penalised (50 / 5 = 10): greedy moves to 200, but
     * the reported logprobs stay those of the raw logits */
    memcpy(l, raw, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 200);
    test_cond(fabs(r.logprob - (49.0 - log_z)) < 1e-5);
    test_cond(r.top_ids[0] == 100
              && fabs(r.top_logprobs[0] - (50.0 - log_z)) < 1e-5);
    memcpy(l, raw, sizeof(l));
    test_cond(llm_sampler_sample(s, l, &r) == 0 && r.token == 300);
    test_cond(fabs(r.logprob - (49.0 - log_z)) < 1e-5);
    llm_sampler_free(s);

    test("sampler: no logprobs asked, none reported");
    llm_sampling_default(&p);
    s = st_new(&p, ST_VOCAB);
    memcpy(l, raw, sizeof(l));
    r.n_top = 7;
    test_cond(s != NULL && llm_sampler_sample(s, l, &r) == 0);
    test_cond(r.n_top == 0 && r.logprob == 0.0f);
    llm_sampler_free(s);
}


/* ---- allocation failures ------------------------------------------------ */

static long st_calls, st_fail_after, st_live;

static int
st_should_fail(void)
{
    return st_fail_after >= 0 && st_calls++ >= st_fail_after;
}


static void *
st_malloc(size_t n)
{
    void *q = st_should_fail() ? NULL : malloc(n);

    st_live += q != NULL;
    return q;
}


static void *
st_calloc(size_t n, size_t size)
{
    void *q = st_should_fail() ? NULL : calloc(n, size);

    st_live += q != NULL;
    return q;
}


static void *
st_realloc(void *old, size_t n)
{
    void *q = st_should_fail() ? NULL : realloc(old, n);

    st_live += old == NULL && q != NULL;
    return q;
}


static void
st_free(void *q)
{
    st_live -= q != NULL;
    free(q);
}


/* One sampler's life; returns 1 if it ran to the end. */
static int
st_nomem_scenario(int *bad)
{
    static int32_t    prompt[300];
    float             l[100];
    llm_sampling      p;
    llm_sampler      *s;
    llm_sample_result r;
    llm_err           err;
    int               i, rc, done = 0;

    llm_sampling_default(&p);
    p.temperature = 0.9f;
    p.top_p = 0.9f;
    p.repetition_penalty = 1.3f;
    p.frequency_penalty = 0.2f;
    p.has_seed = 1;
    memset(&err, 0, sizeof(err));
    s = llm_sampler_new(&p, 100, &err);
    if (s == NULL) {
        *bad += err.code != LLM_ENOMEM;
        return 0;
    }
    for (i = 0; i < 300; i++) {
        prompt[i] = (i * 7) % 60;
    }
    rc = llm_sampler_add_prompt(s, prompt, 300);
    if (rc != 0) {
        *bad += rc != LLM_ENOMEM;
        goto out;
    }
    for (i = 0; i < 200; i++) {
        for (int j = 0; j < 100; j++) {
            l[j] = (float) ((j * 37 + i * 11) % 100) * 0.05f;
        }
        rc = llm_sampler_sample(s, l, &r);
        if (rc != 0) {
            *bad += rc != LLM_ENOMEM;
            goto out;
        }
    }
    done = 1;
out:
    llm_sampler_free(s);
    return done;
}


TEST_SUITE(sampler_nomem)
{
    static const llm_allocators a = {
        st_malloc, st_calloc, st_realloc, st_free
    };
    long n;
    int  bad = 0, leaks = 0, completed = 0;

    test("sampler nomem: every allocation failure is clean, no leak");
    for (n = 0; n < 100 && !completed; n++) {
        st_calls = 0;
        st_fail_after = n;
        st_live = 0;
        llm_set_allocators(&a);
        completed = st_nomem_scenario(&bad);
        llm_reset_allocators();
        leaks += st_live != 0;
    }
    test_cond(completed);
    test_cond(n > 3);               /* new, scratch, map growth */
    test_cond(bad == 0);
    test_cond(leaks == 0);
}


/* ---- time of one step --------------------------------------------------- */

/* Microseconds per step: the best of five batches, so that a machine
 * busy with other work does not make the figure (or the test) noise. */
static double
st_time_us(const llm_sampling *p, const float *logits, int iters,
           const int32_t *prompt, int n_prompt)
{
    static float      l[ST_VOCAB];
    llm_sampler      *s = st_new(p, ST_VOCAB);
    llm_sample_result r;
    uint64_t          t0, t_step;
    double            best = 1e9, batch;
    int               i, b;

    if (s == NULL || llm_sampler_add_prompt(s, prompt, n_prompt) != 0) {
        llm_sampler_free(s);
        return 1e9;
    }
    for (b = 0; b < 5; b++) {
        t_step = 0;
        for (i = 0; i < iters / 5; i++) {
            memcpy(l, logits, sizeof(l));
            t0 = llm_now_ns();
            if (llm_sampler_sample(s, l, &r) != 0) {
                llm_sampler_free(s);
                return 1e9;
            }
            t_step += llm_now_ns() - t0;
        }
        batch = (double) t_step / (iters / 5) / 1000.0;
        best = batch < best ? batch : best;
    }
    llm_sampler_free(s);
    return best;
}


TEST_SUITE(sampler_speed)
{
    static float  lm[ST_VOCAB], flat[ST_VOCAB];
    static int32_t prompt[512];
    llm_sampling  p, d;
    double        t_greedy, t_temp, t_topp, t_topk, t_minp, t_full, t_flat;
    int           i;

    st_lm_logits(lm, ST_VOCAB, 9);
    st_rng_state = 10;
    for (i = 0; i < ST_VOCAB; i++) {
        flat[i] = (float) (0.3 * st_normal());
    }
    for (i = 0; i < 512; i++) {
        prompt[i] = (i * 97) % ST_VOCAB;
    }

    llm_sampling_default(&d);
    d.has_seed = 1;
    d.seed = 3;
    t_greedy = st_time_us(&d, lm, 200, NULL, 0);
    p = d;
    p.temperature = 1.0f;
    t_temp = st_time_us(&p, lm, 200, NULL, 0);
    p.temperature = 0.7f;
    p.top_p = 0.9f;
    t_topp = st_time_us(&p, lm, 200, NULL, 0);
    p.top_k = 40;
    t_topk = st_time_us(&p, lm, 200, NULL, 0);
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.05f;
    t_minp = st_time_us(&p, lm, 200, NULL, 0);
    p = d;
    p.temperature = 0.8f;
    p.top_k = 50;
    p.top_p = 0.95f;
    p.repetition_penalty = 1.1f;
    p.frequency_penalty = 0.3f;
    p.logprobs = 1;
    p.top_logprobs = 5;
    t_full = st_time_us(&p, lm, 200, prompt, 512);
    p = d;
    p.temperature = 1.0f;
    p.top_p = 0.9f;
    t_flat = st_time_us(&p, flat, 100, NULL, 0);

    printf("       one step, %d tokens: greedy %.1f us, temperature %.1f us,"
           " top_p 0.9 %.1f us,\n       top_k 40 + top_p %.1f us, min_p"
           " %.1f us, everything + logprobs %.1f us,\n       top_p 0.9 on a"
           " flat row %.1f us\n", ST_VOCAB, t_greedy, t_temp, t_topp,
           t_topk, t_minp, t_full, t_flat);

    test("sampler speed: one 49152-token step well under 1 ms");
    test_cond(t_greedy < 1000.0);
    test_cond(t_temp < 1000.0);
    test_cond(t_topp < 1000.0);
    test_cond(t_topk < 1000.0);
    test_cond(t_minp < 1000.0);
    test_cond(t_full < 1000.0);
    test_cond(t_flat < 2000.0);     /* worst case: nucleus of ~40k */
}
