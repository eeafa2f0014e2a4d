/*
 * Helpers shared by the libFuzzer targets in t/fuzz (one file each).
 *
 * The loaders under test read files (mmap), so a target writes the input
 * to a scratch folder of its own and opens it there.  Inputs that stand
 * for several files (a Hugging Face folder, a PEFT adapter) hold them in
 * order, separated by FUZZ_SEP; a missing part is an empty file, which
 * the loaders must also refuse cleanly.
 *
 * Every target checks the same promise: whatever the bytes, the code
 * returns a result or an error with a message; never a crash, an
 * out-of-bounds access, a leak or undefined behaviour (ASan, UBSan and
 * LeakSanitizer abort the run on any of them).
 */
#ifndef LLM_FUZZ_H
#define LLM_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#define FUZZ_SEP        "\n#@fuzz-part@#\n"
#define FUZZ_MAX_PARTS  32

typedef struct fuzz_part {
    const uint8_t  *data;
    size_t          len;
} fuzz_part;

/* Splits d[n] at each FUZZ_SEP into at most max parts (the last part
 * keeps any further separators); returns the number of parts. */
int fuzz_split(const uint8_t *d, size_t n, fuzz_part *parts, int max);

/* This process's scratch folder (made on first use, removed at exit). */
const char *fuzz_dir(void);

/* Writes d[n] to fuzz_dir()/name; returns the path (static buffer per
 * call site is not needed: the caller passes out[size]).  Aborts on an
 * I/O error of the scratch folder itself (not the code under test). */
const char *fuzz_write(const char *name, const uint8_t *d, size_t n,
                       char *out, size_t size);

/* One CPU backend (1 thread) for the process, made on first use. */
struct llm_backend *fuzz_cpu(void);

/* Aborts with a message when a property of the code under test fails:
 * libFuzzer then keeps the input as a crash. */
void fuzz_fail(const char *what, const char *detail);

#endif /* LLM_FUZZ_H */
