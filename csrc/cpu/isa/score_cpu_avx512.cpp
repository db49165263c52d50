// The CPU scoring kernel compiled for AVX-512 (F, BW, VL, DQ) + FMA + F16C.
// setup.py builds this file with -march=x86-64-v4; select_cpu.cpp calls it only where the CPU supports it.
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
      defined(__FMA__) && defined(__F16C__))
#error "score_cpu_avx512.cpp needs AVX-512 F/BW/VL/DQ enabled (setup.py compiles it with -march=x86-64-v4)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512 1
#define RHO_ISA_NAMESPACE isa_avx512
#define RHO_SCORE_ROWS_FN score_rows_avx512
#define RHO_PARTIAL_ROWS_FN partial_rows_avx512
#include "../score_cpu_kernel.h"
