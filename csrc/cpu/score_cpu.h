// score_cpu.h -- the interface between the CPU op layer (select_cpu.cpp: argument checks, top-k,
// registration; compiled for the baseline instruction set) and the scoring kernel, which is
// compiled once per instruction set (csrc/cpu/isa/score_cpu_<isa>.cpp, each including
// score_cpu_kernel.h with its own -march) and chosen at run time (select_cpu.cpp).
//
// Torch-free on purpose: every torch template the kernel TUs instantiate may be compiled with
// AVX-512 in one of them, so the types crossing this boundary are plain.
#pragma once

#include <stdint.h>

namespace rho_cpu {

enum class LogitsType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The (already checked) arguments of one call, as raw pointers and int64 strides.
struct Problem {
  const void* logits;
  LogitsType dtype;
  int64_t rank;
  int64_t inner_rows;  // size(1) for [B, T, V]
  int64_t stride0, stride1, stride_v;
  int64_t num_rows, num_classes;
  const int64_t* targets;
  const float* il;  // null where the method does not read it
  int64_t ignore_index;
  int method;
};

// Outputs: score[N] always; lse[N] (float, or double for float64 logits) and keys[N]
// (rho::select_key) where not null.  `read_ineligible` = false lets the kernel skip the logits of
// rows whose target is ignored or out of range (their score does not depend on them).
struct Outputs {
  float* score;
  void* lse;
  uint64_t* keys;
  bool read_ineligible;
};

using ScoreFn = void (*)(const Problem&, const Outputs&);

// One per compiled instruction set (select_cpu.cpp only references those setup.py built).
void score_rows_scalar(const Problem& p, const Outputs& out);
void score_rows_avx2(const Problem& p, const Outputs& out);
void score_rows_avx512(const Problem& p, const Outputs& out);

}  // namespace rho_cpu
