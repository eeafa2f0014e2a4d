/*
 * Run-time choice of the instruction set.  The library is compiled for the
 * baseline x86-64; only the *_avx2.c and *_avx512.c files use wider
 * instructions, and their code runs only when the CPU (and the OS, which
 * must save the wider registers: __builtin_cpu_supports checks XCR0) has
 * them.  AMX (matmul_avx512.c's tile products) also needs the process's
 * permission from Linux, asked for here.
 */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM  0x1023     /* asm/prctl.h */
#define XFEATURE_XTILEDATA   18
#endif


/* AMX-TILE and AMX-INT8 in the CPU, tile state enabled by the OS, and
 * Linux's permission for this process to use it (asked once: the tile
 * data is 8 KB of extra signal frame, off unless requested). */
/* F16C, read from CPUID (leaf 1, ECX bit 29): clang's
 * __builtin_cpu_supports has no "f16c" name.  The AVX checks beside it
 * already cover the OS's saving of the registers. */
static int
cpu_has_f16c(void)
{
#if defined(__x86_64__)
    unsigned a, b, c, d;

    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
#else
    return 0;
#endif
}


static int
cpu_has_amx(void)
{
#if defined(__x86_64__)
    unsigned a, b, c, d, lo, hi;

    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)
        || !(d & (1u << 24)) || !(d & (1u << 25)))
    {
        return 0;
    }
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) {
        return 0;                                   /* no OSXSAVE */
    }
    __asm__ volatile ("xgetbv" : "=a" (lo), "=d" (hi) : "c" (0));
    (void) hi;
    if ((lo & (3u << 17)) != (3u << 17)) {
        return 0;                                   /* XTILECFG, XTILEDATA */
    }
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
           == 0;
#else
    return 0;
#endif
}


static int
cpu_best_isa(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vnni")
        && __builtin_cpu_supports("avx512bf16")
        && __builtin_cpu_supports("fma")
        && cpu_has_f16c())
    {
        static int amx = -1;

        if (amx < 0) {
            amx = cpu_has_amx();
        }
        return amx ? LLM_ISA_AMX : LLM_ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2")
        && __builtin_cpu_supports("fma")
        && cpu_has_f16c())
    {
        return LLM_ISA_AVX2;
    }
#endif
    return LLM_ISA_SCALAR;
}


int
llm_cpu_isa_detect(void)
{
    int         isa = cpu_best_isa();
    const char *env = getenv("LLM_CPU_ISA");
    int         want = isa;

    if (env != NULL) {
        if (strcmp(env, "scalar") == 0) {
            want = LLM_ISA_SCALAR;
        } else if (strcmp(env, "avx2") == 0) {
            want = LLM_ISA_AVX2;
        } else if (strcmp(env, "avx512") == 0) {
            want = LLM_ISA_AVX512;
        } else if (strcmp(env, "amx") == 0) {
            want = LLM_ISA_AMX;
        }
    }
    return want < isa ? want : isa;
}


const char *
llm_cpu_isa_name(int isa)
{
    switch (isa) {
    case LLM_ISA_AVX2:   return "avx2";
    case LLM_ISA_AVX512: return "avx512";
    case LLM_ISA_AMX:    return "amx";
    default:             return "scalar";
    }
}
