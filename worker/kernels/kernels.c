// Kernel dispatch: builds the per-ISA tables once and picks the best one for this CPU.
#include "worker/kernels/kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef MESHLM_HAVE_X86
#include <cpuid.h>

#include "worker/kernels/x86/x86.h"
#endif
#ifdef MESHLM_HAVE_NEON
#include <sys/auxv.h>

#include "worker/kernels/arm/arm.h"
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

// --- tables (written once under pthread_once, read-only afterwards)

static kernels_t tab_scalar = {.isa = "scalar"};
#ifdef MESHLM_HAVE_X86
static kernels_t tab_avx2 = {.isa = "avx2"};
static kernels_t tab_avx512 = {.isa = "avx512"};
#endif
#ifdef MESHLM_HAVE_NEON
static kernels_t tab_neon = {.isa = "neon"};
static kernels_t tab_neon_dotprod = {.isa = "neon-dotprod"};
#endif
static pthread_once_t tab_once = PTHREAD_ONCE_INIT;

#ifdef MESHLM_HAVE_X86
// Whether CPUID's vendor is AMD ("AuthenticAMD").
static int cpu_is_amd(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u; // "Auth" "enti" "cAMD"
}
#endif

static void tables_init(void) {
    tab_scalar.tune = kern_tune_intel();
#ifdef MESHLM_HAVE_X86
    tab_avx2.tune = kern_tune_intel(); // AVX2 on Zen 5 measured: 4 Q4_0 groups beat 1 (README)
    const char *t = getenv("MESHLM_TUNE");
    const bool amd = t && !strcmp(t, "amd") ? true : t && !strcmp(t, "intel") ? false : cpu_is_amd();
    tab_avx512.tune = amd ? kern_tune_amd() : kern_tune_intel();
    kern_x86_q_avx2_fill(&tab_avx2);
    kern_x86_k_avx2_fill(&tab_avx2);
    // AVX-512 starts from the AVX2 entries and overrides what it does better.
    memcpy(tab_avx512.vec_dot, tab_avx2.vec_dot, sizeof tab_avx2.vec_dot);
    memcpy(tab_avx512.from_float, tab_avx2.from_float, sizeof tab_avx2.from_float);
    kern_x86_q_avx512_fill(&tab_avx512);
    kern_x86_k_avx512_fill(&tab_avx512);
#endif
#ifdef MESHLM_HAVE_NEON
    tab_neon.tune = tab_neon_dotprod.tune = kern_tune_intel();
    kern_arm_neon_fill(&tab_neon);
    kern_arm_dotprod_fill(&tab_neon_dotprod);
#endif
}

#ifdef MESHLM_HAVE_X86
// F16C is CPUID leaf 1, ECX bit 29 (clang 14's __builtin_cpu_supports does not know "f16c").
static int cpu_has_f16c(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 29) & 1u;
}
static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
}
static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
}
#endif

#ifdef MESHLM_HAVE_NEON
// Advanced SIMD and the Armv8.2 dot product, as the kernel reports them (works in qemu-user too).
static int cpu_has_neon(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0; }
static int cpu_has_dotprod(void) { return cpu_has_neon() && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#endif

// --- public API

#ifndef K_PF
#define K_PF 4736 // Q3_K and Q4_K decode: 2 Q4_K super-blocks of a group ahead (2.5 of Q3_K)
#endif

kern_tune_t kern_tune_intel(void) {
    return (kern_tune_t){.name = "intel", .q4_groups = 4, .q4_pf = 2048, .q8_groups = 2, .q8_pf = 2048,
                         .q6_rows = 4, .q6_pf = 16, .f16_rows = 4, .k_pf = K_PF};
}

kern_tune_t kern_tune_amd(void) {
    return (kern_tune_t){.name = "amd", .q4_groups = 1, .q4_pf = 8192, .q8_groups = 1, .q8_pf = 2048,
                         .q6_rows = 1, .q6_pf = 40, .f16_rows = 1, .k_pf = K_PF};
}

const kernels_t *kernels_for_isa(const char *isa) {
    pthread_once(&tab_once, tables_init);
    if (!isa || strcmp(isa, "scalar") == 0) return &tab_scalar;
#ifdef MESHLM_HAVE_X86
    if (strcmp(isa, "avx2") == 0) return cpu_has_avx2() ? &tab_avx2 : NULL;
    if (strcmp(isa, "avx512") == 0) return cpu_has_avx512() ? &tab_avx512 : NULL;
#endif
#ifdef MESHLM_HAVE_NEON
    if (strcmp(isa, "neon") == 0) return cpu_has_neon() ? &tab_neon : NULL;
    if (strcmp(isa, "neon-dotprod") == 0) return cpu_has_dotprod() ? &tab_neon_dotprod : NULL;
#endif
    return NULL;
}

const kernels_t *kernels_best(void) {
    const char *want = getenv("MESHLM_ISA");
    if (want && *want) {
        const kernels_t *k = kernels_for_isa(want);
        if (k) return k;
    }
    const kernels_t *k = kernels_for_isa("avx512");
    if (!k) k = kernels_for_isa("avx2");
    if (!k) k = kernels_for_isa("neon-dotprod");
    if (!k) k = kernels_for_isa("neon");
    if (!k) k = kernels_for_isa("scalar");
    return k;
}

void kern_vec_dot(const kernels_t *k, qtype_t t, int64_t n, float *s, const void *w, const void *x) {
    if (k && (unsigned)t < QT_COUNT && k->vec_dot[t]) {
        k->vec_dot[t](n, s, w, x);
        return;
    }
    quant_vec_dot_ref(t, n, s, w, x);
}

void kern_from_float(const kernels_t *k, qtype_t act_type, const float *x, void *y, int64_t n) {
    if (k && (unsigned)act_type < QT_COUNT && k->from_float[act_type]) {
        k->from_float[act_type](x, y, n);
        return;
    }
    quant_quantize_ref(act_type, x, y, n);
}

uint64_t kern_read_sum(const kernels_t *k, const void *p, size_t n) {
    if (k && k->read_sum) return k->read_sum(p, n);
    const uint64_t *q = p; // (n / 8)
    uint64_t s = 0;
    for (size_t i = 0; i < n / 8; i++) s += q[i];
    return s;
}
