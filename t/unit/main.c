/*
 * The C unit-test runner: runs every registered suite and prints
 * "N passed, N failed, N skipped" last.  Exit status 1 if any failed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"

#define MAX_SUITES 256

static struct { const char *name; llm_test_fn fn; } suites[MAX_SUITES];
static int  n_suites;
static int  passed, failed, skipped;
static const char *current;
static int  current_state;          /* 0 none, 1 open (no result yet) */
static int  current_failed;


void
llm_test_register(const char *name, llm_test_fn fn)
{
    if (n_suites < MAX_SUITES) {
        suites[n_suites].name = name;
        suites[n_suites].fn = fn;
        n_suites++;
    }
}


static void
test_close(void)
{
    if (current_state == 1) {
        if (current_failed) {
            failed++;
            printf("  FAIL %s\n", current);
        } else {
            passed++;
            printf("  ok   %s\n", current);
        }
    }
    current_state = 0;
    fflush(stdout);
}


void
llm_test_begin(const char *name)
{
    /* a copy: callers may build names in one buffer, reused for the
     * next test before this one's line is printed */
    static char name_buf[512];

    test_close();
    snprintf(name_buf, sizeof(name_buf), "%s", name);
    current = name_buf;
    current_state = 1;
    current_failed = 0;
}


void
llm_test_result(int ok, const char *cond, const char *file, int line)
{
    if (!ok) {
        printf("       %s:%d: failed: %s\n", file, line, cond);
        current_failed = 1;
    }
}


void
llm_test_skip(const char *why)
{
    if (current_state == 1) {
        skipped++;
        printf("  skip %s (skipped: %s)\n", current, why);
        current_state = 0;
    }
}


const char *
llm_test_default_model(void)
{
    static char path[4096];
    static int  done;
    const char *env;
    FILE       *p;

    if (done) {
        return path[0] ? path : NULL;
    }
    done = 1;
    env = getenv("LLM_TEST_MODEL");
    if (env != NULL && access(env, R_OK) == 0) {
        snprintf(path, sizeof(path), "%s", env);
        return path;
    }
    p = popen("tools/default-model.sh 2>/dev/null", "r");
    if (p != NULL) {
        if (fgets(path, sizeof(path), p) == NULL) {
            path[0] = '\0';
        }
        pclose(p);
        path[strcspn(path, "\n")] = '\0';
    }
    if (path[0] && access(path, R_OK) != 0) {
        path[0] = '\0';
    }
    return path[0] ? path : NULL;
}


const char *
llm_test_fixture_dir(void)
{
    return "t/fixtures";
}


const char *
llm_test_tmp_dir(void)
{
    static char dir[256];

    if (dir[0] == '\0') {
        snprintf(dir, sizeof(dir), "/tmp/llm-unit-%d", (int) getpid());
        mkdir(dir, 0700);
    }
    return dir;
}


int
main(int argc, char **argv)
{
    const char *filter = getenv("LLM_TEST_FILTER");
    char        cmd[300];
    int         i;

    if (argc > 1) {
        filter = argv[1];
    }
    for (i = 0; i < n_suites; i++) {
        if (filter != NULL && strstr(suites[i].name, filter) == NULL) {
            continue;
        }
        printf("%s\n", suites[i].name);
        suites[i].fn();
        test_close();
    }
    if (llm_test_tmp_dir()[0]) {
        snprintf(cmd, sizeof(cmd), "rm -rf %s", llm_test_tmp_dir());
        if (system(cmd) != 0) {
            /* leftovers in /tmp are harmless */
        }
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
