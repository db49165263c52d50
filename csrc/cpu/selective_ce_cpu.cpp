// selective_ce_cpu.cpp -- backward of the selective cross-entropy (Rho-1): per-row CE gradient
// from a saved log-sum-exp, scaled per row.  Schemas live here (a TORCH_LIBRARY_FRAGMENT), so the
// op exists wherever the extension is built; fake implementations: rho_kernels/backends/_extension.py.
//
//   ce_grad_rows(logits, targets, lse, row_scale, ignore_index) -> grad
//       grad[r, j] = row_scale[r] * (exp(z[r, j] - lse[r]) - [j == targets[r]])
//       rows with row_scale == 0, an ignored target or a target outside [0, V) are exact zeros
//       and their logits are not read.  grad has the logits' shape and dtype and is contiguous.
//   ce_grad_rows_(logits, ...) -> ()
//       the same gradient written over the logits themselves (opt-in: no second N x V buffer).
//
// logits [N, V] or [B, T, V], float32/bfloat16/float16/float64, any strides (int64 offsets);
// targets int64 [N] contiguous; lse and row_scale [N] contiguous, float64 for float64 logits and
// float32 otherwise (the accumulation type of rho_math.h).  One pass over each selected row: the
// saved lse makes the softmax a pointwise map, so nothing but the gradient is allocated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "rho_math.h"

namespace {

using at::Tensor;

// Rows are processed in tiles: strided / reduced-precision logits are gathered into a float
// buffer, the exponentials run over the buffer (a loop the compiler vectorises), and the result
// is scattered to the output.  1024 floats = 4 KiB, L1-resident.
constexpr int64_t kTile = 1024;

// exp(x) in float32 without a libm call, so that the tile loop vectorises.  Cody-Waite range
// reduction x = n ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial (truncation < 1e-8
// relative, about 1 ulp overall).  Results below 2^-126 (x < -87) flush to 0: a probability that
// small is 0 in the gradient of every dtype we write.  x = -inf gives exactly 0 (an impossible
// class); NaN propagates through r.  Callers pass x = z - lse <= ~0; the clamp keeps 2^n finite.
// Written so that GCC vectorises it under plain -O3 (no -ffast-math): rounding by the 1.5 * 2^23
// trick instead of floor() (which needs -fno-trapping-math to vectorise), selects instead of
// branches.
inline float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (t + kRound) - kRound = nearest integer
  float t = x * kLog2e;
  // NaN and -inf compare false and land on the clamp, so the int conversion below is defined.
  t = (t > -126.0f) ? t : -126.0f;
  t = (t < 126.0f) ? t : 126.0f;
  const float n = (t + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  const float e = p * __builtin_bit_cast(float, bits);
  return (x < -87.0f) ? 0.0f : e;
}

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

// Element conversions, written as bit operations so that the gather/scatter loops vectorise
// (c10's Half conversion does not).
inline float load_acc(float v) { return v; }
inline double load_acc(double v) { return v; }
inline float load_acc(c10::BFloat16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16); }
inline float load_acc(c10::Half v) {
  // Shift the exponent/mantissa into place and rescale the bias by 2^112 (exact, and right for
  // subnormal halves too); Inf/NaN get the float all-ones exponent back.
  const uint32_t em = static_cast<uint32_t>(v.x & 0x7FFFu) << 13;
  const float mag = __builtin_bit_cast(float, em) * 0x1p112f;
  const uint32_t bits = (v.x & 0x7C00u) == 0x7C00u ? (em | 0x7F800000u) : __builtin_bit_cast(uint32_t, mag);
  return __builtin_bit_cast(float, bits | (static_cast<uint32_t>(v.x & 0x8000u) << 16));
}

template <typename scalar_t, typename acc_t>
inline scalar_t store_as(acc_t v) { return static_cast<scalar_t>(v); }
template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float v) {
  // Round to nearest even; NaN stays a (quiet) NaN.
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (v != v) ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// Element offset of row r: rows are the flattened leading dims (b, t) of [B, T, V] (T = N for
// [N, V] with stride_b unused).
struct RowLayout {
  int64_t T, sb, st, sv;
  int64_t row(int64_t r) const { return (r / T) * sb + (r % T) * st; }
};

RowLayout layout_of(const Tensor& x, int64_t num_rows) {
  if (x.dim() == 3) return {std::max<int64_t>(x.size(1), 1), x.stride(0), x.stride(1), x.stride(2)};
  return {std::max<int64_t>(num_rows, 1), 0, x.stride(0), x.stride(1)};
}

template <typename scalar_t, typename acc_t>
void grad_rows(const scalar_t* in, RowLayout lin, scalar_t* out, RowLayout lout, const int64_t* targets,
               const acc_t* lse, const acc_t* row_scale, int64_t num_rows, int64_t num_classes,
               int64_t ignore_index) {
  const int64_t V = num_classes;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    acc_t buf[kTile];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = targets[r];
      const acc_t s = row_scale[r];
      scalar_t* o = out + lout.row(r);
      const int64_t osv = lout.sv;
      if (rho::target_state(y, V, ignore_index) != rho::kTargetOk || s == acc_t(0)) {
        if (osv == 1) {
          std::memset(static_cast<void*>(o), 0, sizeof(scalar_t) * static_cast<size_t>(V));
        } else {
          for (int64_t j = 0; j < V; ++j) o[j * osv] = scalar_t(0);
        }
        continue;
      }
      const scalar_t* z = in + lin.row(r);
      const int64_t sv = lin.sv;
      const acc_t l = lse[r];
      for (int64_t j0 = 0; j0 < V; j0 += kTile) {
        const int64_t n = std::min(kTile, V - j0);
        if (sv == 1) {
          for (int64_t i = 0; i < n; ++i) buf[i] = load_acc(z[j0 + i]);
        } else {
          for (int64_t i = 0; i < n; ++i) buf[i] = load_acc(z[(j0 + i) * sv]);
        }
        for (int64_t i = 0; i < n; ++i) buf[i] = s * exp_acc(buf[i] - l);
        if (y >= j0 && y < j0 + n) {
          // s * (p_y - 1) rather than s * p_y - s: no cancellation when p_y is close to 1.
          const acc_t zy = load_acc(z[y * sv]);
          buf[y - j0] = s * (std::exp(zy - l) - acc_t(1));
        }
        if (osv == 1) {
          for (int64_t i = 0; i < n; ++i) o[j0 + i] = store_as<scalar_t, acc_t>(buf[i]);
        } else {
          for (int64_t i = 0; i < n; ++i) o[(j0 + i) * osv] = store_as<scalar_t, acc_t>(buf[i]);
        }
      }
    }
  });
}

void check_args(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& row_scale) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "ce_grad_rows: logits must be [N, V] or [B, T, V], got rank ",
              logits.dim());
  const int64_t n = logits.dim() == 3 ? logits.size(0) * logits.size(1) : logits.size(0);
  TORCH_CHECK(targets.dim() == 1 && targets.numel() == n, "ce_grad_rows: targets must be [N] with N = ", n,
              " rows, got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "ce_grad_rows: targets must be contiguous int64");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const Tensor* t : {&lse, &row_scale}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == n && t->is_contiguous() && t->scalar_type() == acc,
                "ce_grad_rows: lse and row_scale must be contiguous [N] tensors of dtype ", acc, ", got shape ",
                t->sizes(), " dtype ", t->scalar_type());
  }
  for (const Tensor* t : {&targets, &lse, &row_scale}) {
    TORCH_CHECK(t->device() == logits.device(), "ce_grad_rows: all tensors must be on ", logits.device());
  }
}

void dispatch(const Tensor& logits, Tensor& out, const Tensor& targets, const Tensor& lse, const Tensor& row_scale,
              int64_t ignore_index) {
  const int64_t N = targets.numel();
  const int64_t V = logits.size(-1);
  if (N == 0 || V == 0) return;
  const RowLayout lin = layout_of(logits, N);
  const RowLayout lout = layout_of(out, N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_grad_rows_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    grad_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), lin, out.mutable_data_ptr<scalar_t>(), lout,
                               targets.const_data_ptr<int64_t>(), lse.const_data_ptr<acc_t>(),
                               row_scale.const_data_ptr<acc_t>(), N, V, ignore_index);
  });
}

Tensor ce_grad_rows_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& row_scale,
                        int64_t ignore_index) {
  check_args(logits, targets, lse, row_scale);
  Tensor out = at::empty(logits.sizes(), logits.options());  // contiguous
  dispatch(logits, out, targets, lse, row_scale, ignore_index);
  return out;
}

void ce_grad_rows_inplace_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& row_scale,
                              int64_t ignore_index) {
  check_args(logits, targets, lse, row_scale);
  // Each element is read once and then overwritten by its own gradient, so aliasing is safe.
  Tensor out = logits;
  dispatch(logits, out, targets, lse, row_scale, ignore_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rho_kernels, m) {
  // Selective cross-entropy backward: row_scale[r] * (softmax(z_r) - onehot(y_r)) from the
  // saved lse; zero rows where row_scale == 0 or the target is ignored / out of range.
  m.def("ce_grad_rows(Tensor logits, Tensor targets, Tensor lse, Tensor row_scale, int ignore_index) -> Tensor");
  // The same, written over the logits (opt-in in-place backward).
  m.def(
      "ce_grad_rows_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor row_scale, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(rho_kernels, CPU, m) {
  m.impl("ce_grad_rows", &ce_grad_rows_cpu);
  m.impl("ce_grad_rows_", &ce_grad_rows_inplace_cpu);
}
