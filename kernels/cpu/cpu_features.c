/*
 * Run-time choice of the instruction set.  The library is compiled for the
 * baseline x86-64; only the *_avx2.c and *_avx512.c files use wider
 * instructions, and their code runs only when the CPU (and the OS, which
 * must save the wider registers: __builtin_cpu_supports checks XCR0) has
 * them.
 */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>


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
        && __builtin_cpu_supports("f16c"))
    {
        return LLM_ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2")
        && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c"))
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
    default:             return "scalar";
    }
}
