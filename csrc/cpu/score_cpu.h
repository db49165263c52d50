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
  // The logit transform every method reads z' through (rho::Transform kind; rho_math.h).
  int transform = 0;
  double softcap = 0.0, logit_scale = 1.0;
};

// Outputs: score[N] always; lse[N] and zsum[N] (sum_j z'_j; float, or double for float64 logits)
// and keys[N] (rho::select_key) where not null.  `read_ineligible` = false lets the kernel skip the
// logits of rows whose target is ignored or out of range (their score does not depend on them).
struct Outputs {
  float* score;
  void* lse;
  uint64_t* keys;
  bool read_ineligible;
  void* zsum = nullptr;
};

using ScoreFn = void (*)(const Problem&, const Outputs&);

// Partials of one vocabulary slice (the logits are columns [vocab_start, vocab_start + V) of the
// full rows; targets are full-vocabulary ids): per row, rho::RowAcc of these columns folded into
// the row's partials from the slices before (`in`, null for the first), then the target logit
// where the target is in this slice.  [N, kNumPartials] in the accumulation type (float; double
// for float64), fields m, d, t, dx, s2x, z_y, owned (rho_kernels/vocab_parallel.py's layout,
// merged and finalised there) and zsum = sum_j z'_j of the slices so far (label smoothing's sum,
// merged by addition).  Only the method's sums are kept (the others stay 0).  The logits are
// those of the transform (rho::Transform kind, softcap, logit_scale): z' throughout.
constexpr int kNumPartials = 8;
struct Partials {
  const void* in;
  void* out;
  int64_t vocab_start;
  int transform;  // rho::Transform
  double softcap, logit_scale;
};

using PartialsFn = void (*)(const Problem&, const Partials&);

// One per compiled instruction set (select_cpu.cpp only references those setup.py built).
void score_rows_scalar(const Problem& p, const Outputs& out);
void score_rows_avx2(const Problem& p, const Outputs& out);
void score_rows_avx512(const Problem& p, const Outputs& out);
void partial_rows_scalar(const Problem& p, const Partials& io);
void partial_rows_avx2(const Problem& p, const Partials& io);
void partial_rows_avx512(const Problem& p, const Partials& io);

}  // namespace rho_cpu
