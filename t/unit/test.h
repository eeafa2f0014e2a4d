/*
 * A tiny test framework in the manner of hiredis' test.c.
 *
 * Each test file defines suites with TEST_SUITE(name) { ... }; suites
 * register themselves at start-up, so adding a file to t/unit/ is all it
 * takes.  Inside a suite:
 *
 *     test("tokenizer round-trips ASCII");
 *     test_cond(n == 5);
 *
 *     test("needs the default model");
 *     if (path == NULL) { test_skip("model not installed"); return; }
 *
 * The runner (main.c) prints one line per test and a final
 * "N passed, N failed, N skipped".  LLM_TEST_FILTER=substring runs only
 * the suites whose name contains it.
 */
#ifndef LLM_TEST_H
#define LLM_TEST_H

#include <stdio.h>

typedef void (*llm_test_fn)(void);

void llm_test_register(const char *name, llm_test_fn fn);
void llm_test_begin(const char *name);
void llm_test_result(int ok, const char *cond, const char *file, int line);
void llm_test_skip(const char *why);

/* Path to a data file or NULL: the default model (SmolLM2 GGUF), etc.
 * See main.c for how each is found. */
const char *llm_test_default_model(void);
const char *llm_test_fixture_dir(void);     /* t/fixtures */
const char *llm_test_tmp_dir(void);         /* a scratch folder */

#define TEST_SUITE(name)                                                    \
    static void name(void);                                                 \
    __attribute__((constructor)) static void name##_register(void)          \
    {                                                                       \
        llm_test_register(#name, name);                                     \
    }                                                                       \
    static void name(void)

#define test(desc)       llm_test_begin(desc)
#define test_cond(c)     llm_test_result(!!(c), #c, __FILE__, __LINE__)
#define test_skip(why)   llm_test_skip(why)

#endif /* LLM_TEST_H */
