/* Helpers of the libFuzzer targets: see fuzz.h. */
#include "fuzz.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/common.h"
#include "kernels/backend.h"

static char scratch[256];


int
fuzz_split(const uint8_t *d, size_t n, fuzz_part *parts, int max)
{
    size_t      sep = sizeof(FUZZ_SEP) - 1;
    int         k = 0;

    while (k < max - 1) {
        const uint8_t *at = memmem(d, n, FUZZ_SEP, sep);

        if (at == NULL) {
            break;
        }
        parts[k].data = d;
        parts[k].len = (size_t) (at - d);
        k++;
        n -= (size_t) (at - d) + sep;
        d = at + sep;
    }
    parts[k].data = d;
    parts[k].len = n;
    return k + 1;
}


static void
remove_scratch(void)
{
    char cmd[300];

    if (scratch[0] != '\0') {
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", scratch);
        if (system(cmd) != 0) {
            fprintf(stderr, "fuzz: could not remove %s\n", scratch);
        }
    }
}


const char *
fuzz_dir(void)
{
    const char *tmp;

    if (scratch[0] == '\0') {
        tmp = getenv("TMPDIR");
        snprintf(scratch, sizeof(scratch), "%s/llm-fuzz-XXXXXX",
                 tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
        if (mkdtemp(scratch) == NULL) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(remove_scratch);
    }
    return scratch;
}


const char *
fuzz_write(const char *name, const uint8_t *d, size_t n, char *out,
           size_t size)
{
    int     fd;
    size_t  done = 0;

    snprintf(out, size, "%s/%s", fuzz_dir(), name);
    fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(out);
        abort();
    }
    while (done < n) {
        ssize_t w = write(fd, d + done, n - done);

        if (w <= 0) {
            perror(out);
            abort();
        }
        done += (size_t) w;
    }
    close(fd);
    return out;
}


void
fuzz_fail(const char *what, const char *detail)
{
    fprintf(stderr, "fuzz: %s%s%s\n", what, detail ? ": " : "",
            detail ? detail : "");
    abort();
}


llm_backend *
fuzz_cpu(void)
{
    static llm_backend *cpu;
    llm_err             err;

    if (cpu == NULL && (cpu = llm_backend_cpu_new(1, &err)) == NULL) {
        fuzz_fail("no CPU backend", err.msg);
    }
    return cpu;
}
