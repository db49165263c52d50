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
//   Both take softcap=0, logit_scale=1, label_smoothing=0, z_loss=0: in general the gradient
//   w.r.t. the raw logits of s_r [(1-eps)(lse - z'_y) + eps(lse - mean z') + z_loss lse^2], z' the
//   transformed logits (rho_math.h), lse saved of z':
//       s_r [(1 + 2 z_loss lse) p_j - (1-eps)[j == y] - eps/V] * dz'/dz,  p = exp(z' - lse).
//   Each combination of (transform kind, general) is its own instantiation: the plain one is the
//   loop it always was.
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

struct ExpAcc {
  template <typename T>
  T operator()(T x) const { return exp_acc(x); }
};

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

// The loss's extra terms: label smoothing eps and the z-loss coefficient (kGeneral).
struct LossTerms {
  double label_smoothing, z_loss;
};

template <typename scalar_t, typename acc_t, int kTransform, bool kGeneral>
void grad_rows(const scalar_t* in, RowLayout lin, scalar_t* out, RowLayout lout, const int64_t* targets,
               const acc_t* lse, const acc_t* row_scale, int64_t num_rows, int64_t num_classes,
               int64_t ignore_index, rho::TransformArgs<acc_t> ta, LossTerms lt) {
  const int64_t V = num_classes;
  const acc_t eps = acc_t(lt.label_smoothing);
  const acc_t off = acc_t(lt.label_smoothing / static_cast<double>(V));  // eps / V
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    acc_t buf[kTile];
    acc_t dbuf[kTransform == rho::kSoftcap ? kTile : 1];  // dz'/dz per column
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
      // kGeneral: p_j scaled by c = 1 + 2 z_loss lse, every column less eps/V.
      const acc_t c = kGeneral ? acc_t(1) + acc_t(2 * lt.z_loss) * l : acc_t(1);
      // dz'/dz: the constant logit_scale without a cap (folded into the row's scale).
      const acc_t sd = kTransform == rho::kScaleOnly ? s * ta.scale : s;
      for (int64_t j0 = 0; j0 < V; j0 += kTile) {
        const int64_t n = std::min(kTile, V - j0);
        if (sv == 1) {
          for (int64_t i = 0; i < n; ++i) buf[i] = load_acc(z[j0 + i]);
        } else {
          for (int64_t i = 0; i < n; ++i) buf[i] = load_acc(z[(j0 + i) * sv]);
        }
        if constexpr (kTransform == rho::kNoTransform && !kGeneral) {
          for (int64_t i = 0; i < n; ++i) buf[i] = s * exp_acc(buf[i] - l);
        } else if constexpr (kTransform == rho::kSoftcap) {
          for (int64_t i = 0; i < n; ++i) {
            const acc_t zt = rho::transform_logit<kTransform>(buf[i], ta, ExpAcc{}, &dbuf[i]);
            buf[i] = sd * ((kGeneral ? c * exp_acc(zt - l) - off : exp_acc(zt - l)) * dbuf[i]);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const acc_t zt = rho::transform_logit<kTransform>(buf[i], ta, ExpAcc{});
            buf[i] = sd * (kGeneral ? c * exp_acc(zt - l) - off : exp_acc(zt - l));
          }
        }
        if (y >= j0 && y < j0 + n) {
          // s * (p_y - 1) rather than s * p_y - s: no cancellation when p_y is close to 1.
          acc_t dz = acc_t(1);
          struct StdExp {
            acc_t operator()(acc_t x) const { return std::exp(x); }
          };
          const acc_t zy = rho::transform_logit<kTransform>(load_acc(z[y * sv]), ta, StdExp{}, &dz);
          const acc_t py = std::exp(zy - l);
          const acc_t gy = kGeneral ? (c * py - (acc_t(1) - eps)) - off : py - acc_t(1);
          buf[y - j0] = kTransform == rho::kSoftcap ? sd * (gy * dz) : sd * gy;
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

struct GradOptions {
  double softcap, logit_scale;
  LossTerms terms;
};

void check_options(const GradOptions& o) {
  TORCH_CHECK_VALUE(rho::transform_valid(o.softcap, o.logit_scale), "ce_grad_rows: softcap must be 0 (none) or ",
                    "finite and > 0 and logit_scale finite and non-zero, got softcap = ", o.softcap,
                    ", logit_scale = ", o.logit_scale);
  TORCH_CHECK_VALUE(std::isfinite(o.terms.label_smoothing) && std::isfinite(o.terms.z_loss),
                    "ce_grad_rows: label_smoothing and z_loss must be finite, got ", o.terms.label_smoothing, " and ",
                    o.terms.z_loss);
}

template <typename scalar_t, typename acc_t, int kTransform>
void grad_rows_general(const scalar_t* in, RowLayout lin, scalar_t* out, RowLayout lout, const int64_t* targets,
                       const acc_t* lse, const acc_t* row_scale, int64_t N, int64_t V, int64_t ignore_index,
                       const GradOptions& o) {
  const auto ta = rho::transform_args<acc_t>(o.softcap, o.logit_scale);
  if (o.terms.label_smoothing != 0.0 || o.terms.z_loss != 0.0) {
    grad_rows<scalar_t, acc_t, kTransform, true>(in, lin, out, lout, targets, lse, row_scale, N, V, ignore_index, ta,
                                                 o.terms);
  } else {
    grad_rows<scalar_t, acc_t, kTransform, false>(in, lin, out, lout, targets, lse, row_scale, N, V, ignore_index, ta,
                                                  o.terms);
  }
}

void dispatch(const Tensor& logits, Tensor& out, const Tensor& targets, const Tensor& lse, const Tensor& row_scale,
              int64_t ignore_index, const GradOptions& o) {
  const int64_t N = targets.numel();
  const int64_t V = logits.size(-1);
  if (N == 0 || V == 0) return;
  const RowLayout lin = layout_of(logits, N);
  const RowLayout lout = layout_of(out, N);
  const int kind = rho::transform_kind(o.softcap, o.logit_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_grad_rows_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = logits.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const acc_t* l = lse.const_data_ptr<acc_t>();
    const acc_t* s = row_scale.const_data_ptr<acc_t>();
    if (kind == rho::kSoftcap) {
      grad_rows_general<scalar_t, acc_t, rho::kSoftcap>(in, lin, o_ptr, lout, t, l, s, N, V, ignore_index, o);
    } else if (kind == rho::kScaleOnly) {
      grad_rows_general<scalar_t, acc_t, rho::kScaleOnly>(in, lin, o_ptr, lout, t, l, s, N, V, ignore_index, o);
    } else {
      grad_rows_general<scalar_t, acc_t, rho::kNoTransform>(in, lin, o_ptr, lout, t, l, s, N, V, ignore_index, o);
    }
  });
}

Tensor ce_grad_rows_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& row_scale,
                        int64_t ignore_index, double softcap, double logit_scale, double label_smoothing,
                        double z_loss) {
  check_args(logits, targets, lse, row_scale);
  const GradOptions o{softcap, logit_scale, {label_smoothing, z_loss}};
  check_options(o);
  Tensor out = at::empty(logits.sizes(), logits.options());  // contiguous
  dispatch(logits, out, targets, lse, row_scale, ignore_index, o);
  return out;
}

void ce_grad_rows_inplace_cpu(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& row_scale,
                              int64_t ignore_index, double softcap, double logit_scale, double label_smoothing,
                              double z_loss) {
  check_args(logits, targets, lse, row_scale);
  const GradOptions o{softcap, logit_scale, {label_smoothing, z_loss}};
  check_options(o);
  // Each element is read once and then overwritten by its own gradient, so aliasing is safe.
  Tensor out = logits;
  dispatch(logits, out, targets, lse, row_scale, ignore_index, o);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rho_kernels, m) {
  // Selective cross-entropy backward: row_scale[r] * (softmax(z_r) - onehot(y_r)) from the
  // saved lse; zero rows where row_scale == 0 or the target is ignored / out of range.
  // softcap/logit_scale/label_smoothing/z_loss: the general gradient (see the top of this file).
  m.def(
      "ce_grad_rows(Tensor logits, Tensor targets, Tensor lse, Tensor row_scale, int ignore_index, "
      "float softcap=0.0, float logit_scale=1.0, float label_smoothing=0.0, float z_loss=0.0) -> Tensor");
  // The same, written over the logits (opt-in in-place backward).
  m.def(
      "ce_grad_rows_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor row_scale, int ignore_index, "
      "float softcap=0.0, float logit_scale=1.0, float label_smoothing=0.0, float z_loss=0.0) -> ()");
}

TORCH_LIBRARY_IMPL(rho_kernels, CPU, m) {
  m.impl("ce_grad_rows", &ce_grad_rows_cpu);
  m.impl("ce_grad_rows_", &ce_grad_rows_inplace_cpu);
}
