// The CPU scoring kernel compiled for the target's baseline instruction set (x86-64: SSE2) with
// at::vec's portable DEFAULT code.  setup.py adds no -march: this variant runs on every CPU.
#define CPU_CAPABILITY DEFAULT
#define RHO_ISA_NAMESPACE isa_scalar
#define RHO_SCORE_ROWS_FN score_rows_scalar
#define RHO_PARTIAL_ROWS_FN partial_rows_scalar
#include "../score_cpu_kernel.h"
