// The CPU scoring kernel compiled for the baseline x86-64 instruction set (SSE2; at::vec's portable DEFAULT code).
// setup.py builds this file with no -march; select_cpu.cpp calls it only where the CPU supports it.
#define CPU_CAPABILITY DEFAULT
#define RHO_ISA_NAMESPACE isa_scalar
#define RHO_SCORE_ROWS_FN score_rows_scalar
#include "../score_cpu_kernel.h"
