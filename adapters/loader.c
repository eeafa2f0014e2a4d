/*
 * Background adapter loads (see loader.h): a FIFO of jobs, one worker
 * thread, a FIFO of results, one mutex and one condition variable.
 */
#include "loader.h"

#include <pthread.h>
#include <string.h>


typedef struct loader_job {
    llm_lora_loaded     r;
    struct loader_job  *next;
} loader_job;

struct llm_lora_loader {
    llm_model_config    cfg;
    void              (*wake)(void *ud);
    void               *wake_ud;

    pthread_t           thread;
    int                 started;
    pthread_mutex_t     mu;
    pthread_cond_t      cv;
    int                 stop;
    loader_job         *todo, *todo_tail;   /* queued */
    loader_job         *running;            /* being loaded */
    loader_job         *done, *done_tail;   /* finished, not polled */
};


static void
job_free(loader_job *j)
{
    if (j != NULL) {
        llm_lora_loaded_free(&j->r);
        llm_free(j);
    }
}


static void *
loader_main(void *arg)
{
    llm_lora_loader *l = arg;
    loader_job      *j;

    pthread_mutex_lock(&l->mu);
    for ( ;; ) {
        while (!l->stop && l->todo == NULL) {
            pthread_cond_wait(&l->cv, &l->mu);
        }
        if (l->stop) {
            break;
        }
        j = l->todo;
        l->todo = j->next;
        if (l->todo == NULL) {
            l->todo_tail = NULL;
        }
        j->next = NULL;
        l->running = j;
        pthread_mutex_unlock(&l->mu);

        j->r.rc = llm_lora_load(j->r.dir, &l->cfg, &j->r.lora, &j->r.err);

        pthread_mutex_lock(&l->mu);
        l->running = NULL;
        if (l->done_tail != NULL) {
            l->done_tail->next = j;
        } else {
            l->done = j;
        }
        l->done_tail = j;
        if (l->wake != NULL) {
            l->wake(l->wake_ud);
        }
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}


llm_lora_loader *
llm_lora_loader_new(const llm_model_config *cfg, void (*wake)(void *ud),
                    void *ud, llm_err *err)
{
    llm_lora_loader *l = llm_calloc(1, sizeof(*l));

    if (l == NULL) {
        llm_err_set(err, LLM_ENOMEM, "out of memory");
        return NULL;
    }
    l->cfg = *cfg;
    l->wake = wake;
    l->wake_ud = ud;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    if (pthread_create(&l->thread, NULL, loader_main, l) != 0) {
        llm_err_set(err, LLM_ENOMEM, "cannot start the adapter loader "
                    "thread");
        llm_lora_loader_free(l);
        return NULL;
    }
    l->started = 1;
    return l;
}


void
llm_lora_loader_free(llm_lora_loader *l)
{
    loader_job *j;

    if (l == NULL) {
        return;
    }
    if (l->started) {
        pthread_mutex_lock(&l->mu);
        l->stop = 1;
        pthread_cond_signal(&l->cv);
        pthread_mutex_unlock(&l->mu);
        pthread_join(l->thread, NULL);
    }
    while ((j = l->todo) != NULL) {
        l->todo = j->next;
        job_free(j);
    }
    while ((j = l->done) != NULL) {
        l->done = j->next;
        job_free(j);
    }
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    llm_free(l);
}


int
llm_lora_loader_submit(llm_lora_loader *l, const char *name, const char *dir)
{
    loader_job *j = llm_calloc(1, sizeof(*j));

    if (j == NULL) {
        return LLM_ENOMEM;
    }
    j->r.name = llm_strdup(name);
    j->r.dir = llm_strdup(dir);
    if (j->r.name == NULL || j->r.dir == NULL) {
        job_free(j);
        return LLM_ENOMEM;
    }
    pthread_mutex_lock(&l->mu);
    if (l->todo_tail != NULL) {
        l->todo_tail->next = j;
    } else {
        l->todo = j;
    }
    l->todo_tail = j;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
    return 0;
}


int
llm_lora_loader_busy(llm_lora_loader *l, const char *name)
{
    loader_job *j;
    int         busy = 0;

    pthread_mutex_lock(&l->mu);
    if (l->running != NULL && strcmp(l->running->r.name, name) == 0) {
        busy = 1;
    }
    for (j = l->todo; j != NULL && !busy; j = j->next) {
        busy = strcmp(j->r.name, name) == 0;
    }
    for (j = l->done; j != NULL && !busy; j = j->next) {
        busy = strcmp(j->r.name, name) == 0;    /* finished, not polled */
    }
    pthread_mutex_unlock(&l->mu);
    return busy;
}


int
llm_lora_loader_poll(llm_lora_loader *l, llm_lora_loaded *out)
{
    loader_job *j;

    pthread_mutex_lock(&l->mu);
    j = l->done;
    if (j != NULL) {
        l->done = j->next;
        if (l->done == NULL) {
            l->done_tail = NULL;
        }
    }
    pthread_mutex_unlock(&l->mu);
    if (j == NULL) {
        return 0;
    }
    *out = j->r;
    llm_free(j);
    return 1;
}


void
llm_lora_loaded_free(llm_lora_loaded *r)
{
    if (r == NULL) {
        return;
    }
    llm_free(r->name);
    llm_free(r->dir);
    llm_lora_free(r->lora);
    r->name = r->dir = NULL;
    r->lora = NULL;
}
