// The CPU scoring kernel compiled for AVX2 + FMA + F16C.
// setup.py builds this file with -march=x86-64-v3; select_cpu.cpp calls it only where the CPU supports it.
#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "score_cpu_avx2.cpp needs AVX2, FMA and F16C enabled (setup.py compiles it with -march=x86-64-v3)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2 1
#define RHO_ISA_NAMESPACE isa_avx2
#define RHO_SCORE_ROWS_FN score_rows_avx2
#define RHO_PARTIAL_ROWS_FN partial_rows_avx2
#include "../score_cpu_kernel.h"
