/*
 * The CUDA backend as seen from a machine that may have no GPU: opening
 * "cuda:0" fails with a message (never a crash or an exit), the optional
 * backend hooks fall back on the CPU, and llm-selftest says "skipped: no
 * GPU" and exits 0.  Where a GPU is present, llm-selftest runs for real
 * and must pass: that makes the CUDA self-test part of the unit suite.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test.h"
#include "../../engine/common.h"
#include "../../kernels/backend.h"


/* build/llm-selftest beside build/unit-tests, or NULL. */
static const char *
selftest_path(void)
{
    static char path[4096];
    ssize_t     n;
    char       *slash;

    n = readlink("/proc/self/exe", path, sizeof(path) - 32);
    if (n <= 0) {
        return NULL;
    }
    path[n] = '\0';
    slash = strrchr(path, '/');
    if (slash == NULL) {
        return NULL;
    }
    strcpy(slash + 1, "llm-selftest");
    return access(path, X_OK) == 0 ? path : NULL;
}


/* Runs cmd, keeps the tail of its output in out; returns the exit status
 * or -1. */
static int
run_capture(const char *cmd, char *out, size_t size)
{
    FILE   *p = popen(cmd, "r");
    char    buf[4096];
    size_t  used = 0, n;
    int     st;

    out[0] = '\0';
    if (p == NULL) {
        return -1;
    }
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) {
        if (used + n >= size) {             /* keep the end */
            size_t drop = used + n - size + 1;

            drop = drop > used ? used : drop;
            memmove(out, out + drop, used - drop);
            used -= drop;
            n = n > size - 1 - used ? size - 1 - used : n;
        }
        memcpy(out + used, buf, n);
        used += n;
        out[used] = '\0';
    }
    st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}


TEST_SUITE(cuda_build)
{
    llm_err      err;
    llm_backend *be, *cpu;
    llm_tensor   t;
    const char  *st = selftest_path();
    char         out[8192], cmd[8400];
    size_t       fr = 0, tot = 0;
    float        w[64];
    int          gpu = 0, rc, i;

    test("llm_backend_open(\"cuda:0\") without a GPU fails with a message");
    memset(&err, 0, sizeof(err));
    be = llm_backend_open("cuda:0", 0, &err);
    if (be != NULL) {
        gpu = 1;
        test_skip("a GPU is present");
        test("the GPU reports its memory (mem_info)");
        test_cond(be->ops->mem_info != NULL
                  && llm_backend_mem_info(be, &fr, &tot) == 0 && tot > 0
                  && fr <= tot);
        be->ops->free(be);
    } else {
        test_cond(err.code < 0 && err.msg[0] != '\0'
                  && (strstr(err.msg, "CUDA") != NULL
                      || strstr(err.msg, "cuda") != NULL));
        printf("       (%s)\n", err.msg);
    }

    test("llm_backend_open(\"cuda:99\") fails cleanly");
    be = llm_backend_open("cuda:99", 0, &err);
    test_cond(be == NULL && err.code < 0 && err.msg[0] != '\0');
    if (be != NULL) {
        be->ops->free(be);
    }

    test("optional hooks on the CPU: mem_info EUNSUP, adopt_tensor falls"
         " back to adopt_weights");
    cpu = llm_backend_open("cpu", 1, &err);
    if (cpu == NULL) {
        test_cond(0);
    } else {
        for (i = 0; i < 64; i++) {
            w[i] = (float) i;
        }
        memset(&t, 0, sizeof(t));
        t.type = LLM_F32;
        t.ne[0] = 16;
        t.ne[1] = 4;
        t.nb = 64;
        rc = llm_backend_adopt_tensor(cpu, &t, w, sizeof(w));
        test_cond(llm_backend_mem_info(cpu, &fr, &tot) == LLM_EUNSUP
                  && rc == 0 && t.data == (void *) w && t.type == LLM_F32
                  && t.nb == 64);
        cpu->ops->free(cpu);
    }

    if (gpu) {
        test("llm-selftest passes on the GPU (every op and model vs CPU)");
    } else {
        test("llm-selftest without a GPU prints \"skipped: no GPU\", exit 0");
    }
    if (st == NULL) {
        test_skip("llm-selftest not built");
        return;
    }
    if (gpu) {
        const char *model = llm_test_default_model();

        if (model != NULL) {
            snprintf(cmd, sizeof(cmd), "'%s' --model '%s' 2>&1", st, model);
        } else {
            snprintf(cmd, sizeof(cmd), "'%s' --no-model 2>&1", st);
        }
    } else {
        snprintf(cmd, sizeof(cmd), "'%s' 2>&1", st);
    }
    rc = run_capture(cmd, out, sizeof(out));
    if (gpu) {
        if (rc != 0) {
            printf("%s\n", out);
        }
        test_cond(rc == 0 && strstr(out, ", 0 failed") != NULL);
    } else {
        test_cond(rc == 0 && strstr(out, "skipped: no GPU") != NULL);
    }
}
