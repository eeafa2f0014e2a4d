/*
 * The CPU backend's thread pool.
 *
 * The engine calls ops from one thread; each op hands one task to the pool
 * and waits for it.  A task is split into chunks that threads claim from
 * one atomic word, the caller included: a worker that the OS has not
 * scheduled (other processes share the cores) delays nothing, the others
 * take its chunks.  The caller waits only for chunks already running.
 *
 * Claim word: generation (24 bits) | chunk count (20) | next chunk (20).
 * A thread claims chunk c with a compare-and-swap of that word, so a
 * thread that read an old task's word cannot claim in a newer one; and a
 * task's fn/arg are read only after a successful claim, while the caller
 * cannot publish the next task (it waits for every claimed chunk).
 *
 * Ops follow each other within microseconds during a step, so idle workers
 * spin a short while (waking a sleeping thread costs more than a small
 * op), then sleep on a futex, so that an idle daemon uses no CPU.
 */
#include "cpu.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax()  _mm_pause()
#else
#define cpu_relax()  ((void) 0)
#endif

/* How long an idle worker spins before it sleeps, and how long the caller
 * spins for running chunks before it sleeps. */
#define WORKER_SPIN_NS  100000
#define CALLER_SPIN_NS  50000

#define CHUNK_BITS      20
#define CHUNK_MASK      ((1u << CHUNK_BITS) - 1)
#define GEN_MASK        0xffffffu


typedef struct worker {
    llm_cpu_pool  *pool;
    pthread_t      tid;
    int            started;
} worker;

struct llm_cpu_pool {
    int              n_threads;     /* including the caller */
    worker          *workers;       /* [n_threads - 1] */

    llm_cpu_task     fn;            /* the current task: read only after */
    void            *arg;           /* claiming one of its chunks */

    _Atomic uint64_t claim;         /* gen | n_chunks | next */
    _Atomic uint32_t done;          /* chunks finished (futex word) */
    _Atomic uint32_t gen;           /* task count (futex word) */
    _Atomic uint32_t sleepers;      /* workers asleep on gen */
    _Atomic uint32_t waiter;        /* 1 while the caller sleeps on done */
    _Atomic int      stop;
};


static void
futex_wait(_Atomic uint32_t *addr, uint32_t val)
{
    syscall(SYS_futex, (uint32_t *) addr, FUTEX_WAIT_PRIVATE, val,
            NULL, NULL, 0);
}


static void
futex_wake(_Atomic uint32_t *addr, int n)
{
    syscall(SYS_futex, (uint32_t *) addr, FUTEX_WAKE_PRIVATE, n,
            NULL, NULL, 0);
}


/* Spins while *addr == val, for at most ns; returns the last value. */
static uint32_t
spin_while_eq(_Atomic uint32_t *addr, uint32_t val, uint64_t ns)
{
    uint64_t start = 0;
    uint32_t cur;
    int      i;

    for (;;) {
        for (i = 0; i < 64; i++) {
            cur = atomic_load_explicit(addr, memory_order_acquire);
            if (cur != val) {
                return cur;
            }
            cpu_relax();
        }
        if (start == 0) {
            start = llm_now_ns();
        } else if (llm_now_ns() - start > ns) {
            return val;
        }
    }
}


/* Claims and runs chunks of the current task until none is left. */
static void
work(llm_cpu_pool *p)
{
    uint64_t w;
    uint32_t n, c;

    w = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        n = (uint32_t) (w >> CHUNK_BITS) & CHUNK_MASK;
        c = (uint32_t) w & CHUNK_MASK;
        if (c >= n) {
            return;
        }
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &w, w + 1,
                                                   memory_order_acq_rel,
                                                   memory_order_acquire))
        {
            continue;                   /* w was reloaded */
        }
        p->fn(p->arg, (int) c, (int) n);
        if (atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel) + 1
            == n && atomic_load(&p->waiter))
        {
            futex_wake(&p->done, 1);
        }
        w = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}


static void *
worker_main(void *arg)
{
    worker       *wk = arg;
    llm_cpu_pool *p = wk->pool;
    /* 0, the generation at creation: a thread that first runs after
     * tasks (or the stop) were published still sees them */
    uint32_t      seen = 0;

    for (;;) {
        uint32_t g = spin_while_eq(&p->gen, seen, WORKER_SPIN_NS);

        while (g == seen && !atomic_load(&p->stop)) {
            /* announce, re-check, sleep: the caller either sees sleepers
             * or we see the new gen (all seq_cst) */
            atomic_fetch_add(&p->sleepers, 1);
            g = atomic_load(&p->gen);
            if (g == seen) {
                futex_wait(&p->gen, seen);
                g = atomic_load(&p->gen);
            }
            atomic_fetch_sub(&p->sleepers, 1);
        }
        seen = g;
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) {
            break;
        }
        work(p);
    }
    return NULL;
}


llm_cpu_pool *
llm_cpu_pool_new(int n_threads, llm_err *err)
{
    llm_cpu_pool *p;
    int           i, rc;

    if (n_threads < 1) {
        n_threads = 1;
    }
    p = llm_calloc(1, sizeof(*p));
    if (p == NULL) {
        llm_err_set(err, LLM_ENOMEM, "cpu backend: thread pool: out of memory");
        return NULL;
    }
    p->n_threads = n_threads;
    if (n_threads > 1) {
        p->workers = llm_calloc((size_t) n_threads - 1, sizeof(worker));
        if (p->workers == NULL) {
            llm_free(p);
            llm_err_set(err, LLM_ENOMEM,
                        "cpu backend: thread pool: out of memory");
            return NULL;
        }
    }
    for (i = 0; i < n_threads - 1; i++) {
        p->workers[i].pool = p;
        rc = pthread_create(&p->workers[i].tid, NULL, worker_main,
                            &p->workers[i]);
        if (rc != 0) {
            llm_err_set(err, LLM_EBACKEND,
                        "cpu backend: pthread_create: %s", strerror(rc));
            llm_cpu_pool_free(p);
            return NULL;
        }
        p->workers[i].started = 1;
    }
    return p;
}


void
llm_cpu_pool_free(llm_cpu_pool *p)
{
    int i;

    if (p == NULL) {
        return;
    }
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    futex_wake(&p->gen, INT_MAX);
    for (i = 0; i < p->n_threads - 1; i++) {
        if (p->workers[i].started) {
            pthread_join(p->workers[i].tid, NULL);
        }
    }
    llm_free(p->workers);
    llm_free(p);
}


int
llm_cpu_pool_size(const llm_cpu_pool *p)
{
    return p->n_threads;
}


void
llm_cpu_pool_run(llm_cpu_pool *p, llm_cpu_task fn, void *arg, int n_chunks)
{
    uint32_t g, d;
    int      c;

    if (n_chunks <= 0) {
        return;
    }
    if (p->n_threads == 1 || n_chunks == 1) {
        for (c = 0; c < n_chunks; c++) {
            fn(arg, c, n_chunks);
        }
        return;
    }
    if (n_chunks > (int) CHUNK_MASK) {
        n_chunks = (int) CHUNK_MASK;
    }

    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->done, 0);
    g = atomic_load(&p->gen) + 1;
    atomic_store(&p->claim, ((uint64_t) (g & GEN_MASK) << (2 * CHUNK_BITS))
                            | ((uint64_t) n_chunks << CHUNK_BITS));
    atomic_store(&p->gen, g);
    if (atomic_load(&p->sleepers) != 0) {
        futex_wake(&p->gen, INT_MAX);
    }

    work(p);

    /* every chunk is claimed: wait for those still running elsewhere */
    d = atomic_load(&p->done);
    while (d != (uint32_t) n_chunks) {
        d = spin_while_eq(&p->done, d, CALLER_SPIN_NS);
        if (d == (uint32_t) n_chunks) {
            break;
        }
        atomic_store(&p->waiter, 1);
        d = atomic_load(&p->done);
        if (d != (uint32_t) n_chunks) {
            futex_wait(&p->done, d);
            d = atomic_load(&p->done);
        }
        atomic_store(&p->waiter, 0);
    }
}


void
llm_cpu_split(int64_t n, int ith, int nth, int64_t align,
              int64_t *begin, int64_t *end)
{
    int64_t units, per, rem, b, e;

    if (align < 1) {
        align = 1;
    }
    units = (n + align - 1) / align;
    per = units / nth;
    rem = units % nth;
    b = ith * per + (ith < rem ? ith : rem);
    e = b + per + (ith < rem ? 1 : 0);
    b *= align;
    e *= align;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}
