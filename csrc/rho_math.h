// rho_math.h -- the math of the fused score/select op, in one torch-free header.
//
// Shared by the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda); the Triton kernel
// (rho_kernels/backends/triton_select.py) and the PyTorch reference (rho_kernels/reference.py)
// implement exactly these rules.  Nothing here includes torch.
//
// One row = the logits z[0..V) of one candidate, its target y and its irreducible loss il.
// A kernel streams the row once and keeps an online accumulator relative to a running max m:
//
//   d   = sum_j exp(z_j - m)                    -> lse = m + log d
//   t   = sum_j exp(z_j - m) * (z_j - m)        -> entropy H = log d - t / d
//   dx  = sum_{j != y} exp(z_j - m)             -> 1 - p_y            = dx / d
//   s2x = sum_{j != y} exp(z_j - m)^2           -> sum_{j != y} p_j^2 = s2x / d^2
//
// gradnorm = ||softmax(z) - onehot(y)||_2 = sqrt(s2x/d^2 + (dx/d)^2).  Excluding the target
// from dx/s2x (instead of subtracting its term afterwards) avoids the cancellation that
// would otherwise cost ~sqrt(eps) absolute error on confidently-correct rows.
//
// Scores (method ids are part of the op schema; keep in sync with rho_kernels/_contract.py):
//   0 reducible   = CE - IL             (RHO-LOSS)
//   1 loss        = CE                  (high-loss first / selective backprop)
//   2 irreducible = -IL                 (lowest IL first; the logits are not read)
//   3 gradnorm    = ||softmax(z) - onehot(y)||_2
//   4 entropy     = -sum_j p_j log p_j  (label-free)
//
// Special values (the reference follows the same rules):
//   * a NaN logit makes lse NaN; an all -inf row has lse = -inf; a +inf logit gives lse = +inf;
//     CE = lse - z_y then follows IEEE (e.g. all -inf -> NaN, z_y = -inf -> +inf);
//   * with a finite max m, CE = (m - z_y) + log d, not lse - z_y: at |m| ~ 3e38 the rounding of
//     lse = m + log d would swallow log d, and CE = lse - z_y would lose it (e.g. 0 for log 2);
//   * gradnorm and entropy are NaN whenever lse is not finite;
//   * a -inf logit is an impossible class: it contributes exactly 0 to every sum;
//   * target == ignore_index -> score -inf; target outside [0, V) -> score NaN (never read).
// A row is *eligible* for selection iff its target is in range and its score is not NaN.
//
// Ordering (identical on every backend): score descending, ties to the lower row index,
// ineligible rows after all eligible ones (among themselves by row index).  select_key()
// packs this order into one uint64 so that "largest key first" is the whole rule.
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RHO_HD __host__ __device__ __forceinline__
#else
#define RHO_HD inline
#endif

namespace rho {
// Sources compiled once per instruction set (csrc/cpu/isa/) define RHO_ISA_NAMESPACE, so that
// each copy of these inline functions gets its own symbol: otherwise the linker may keep the
// AVX-512 copy of, say, acc_merge for the baseline kernel too (ATen's CPU_CAPABILITY trick).
#if defined(RHO_ISA_NAMESPACE)
inline namespace RHO_ISA_NAMESPACE {
#endif

enum Method : int {
  kReducible = 0,
  kLoss = 1,
  kIrreducible = 2,
  kGradNorm = 3,
  kEntropy = 4,
};
constexpr int kNumMethods = 5;

// Which running sums a method needs; kernels template on these so that CE pays for nothing else.
RHO_HD constexpr bool needs_logits(int method) { return method != kIrreducible; }
RHO_HD constexpr bool needs_entropy_sum(int method) { return method == kEntropy; }
RHO_HD constexpr bool needs_gradnorm_sums(int method) { return method == kGradNorm; }
RHO_HD constexpr bool needs_il(int method) { return method == kReducible || method == kIrreducible; }

// Target classification, decided once per row before any logit is read.
enum TargetState : int { kTargetOk = 0, kTargetIgnored = 1, kTargetOutOfRange = 2 };

RHO_HD int target_state(int64_t y, int64_t num_classes, int64_t ignore_index) {
  if (y == ignore_index) return kTargetIgnored;
  if (y < 0 || y >= num_classes) return kTargetOutOfRange;
  return kTargetOk;
}

// Accumulation type of a logits dtype: fp32 for fp32/bf16/fp16, fp64 for fp64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
RHO_HD T pos_inf() { return std::numeric_limits<T>::infinity(); }
template <typename T>
RHO_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

// NaN-propagating max: a NaN anywhere in the row must make the row NaN.
template <typename T>
RHO_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

// e * (z - m) with 0 * (-inf) read as 0: a -inf logit is an impossible class, p log p -> 0.
template <typename T>
RHO_HD T entropy_term(T e, T shifted) {
  const T lowest = std::numeric_limits<T>::lowest();
  // e == 0 covers a -inf logit, also against a max that is still -inf (shifted = NaN there).
  return e == T(0) ? T(0) : e * (shifted < lowest ? lowest : shifted);
}

template <typename T>
struct RowAcc {
  T m;    // running max (NaN-propagating); -inf while nothing finite has been seen
  T d;    // sum exp(z - m)
  T t;    // sum exp(z - m) * (z - m)            (entropy only)
  T dx;   // sum over j != y of exp(z - m)       (gradnorm only)
  T s2x;  // sum over j != y of exp(z - m)^2     (gradnorm only)
};

template <typename T>
RHO_HD RowAcc<T> acc_empty() { return RowAcc<T>{-pos_inf<T>(), T(0), T(0), T(0), T(0)}; }

// Re-express `a` relative to a new (not smaller) max `m`.  Handles the empty accumulator
// (a.m = -inf) without evaluating exp(-inf - -inf) = NaN.
template <typename T>
RHO_HD RowAcc<T> acc_rescale(const RowAcc<T>& a, T m) {
  if (a.d == T(0) || a.m == m) {
    RowAcc<T> r = a;
    r.m = m;
    return r;
  }
  const T shift = a.m - m;  // <= 0
  const T alpha = std::exp(shift);
  RowAcc<T> r;
  r.m = m;
  r.d = alpha * a.d;
  // alpha == 0: a's terms vanish (x e^x -> 0).  Not alpha * (...): for finite logits spanning
  // more than FLT_MAX, shift * d overflows to -inf and 0 * -inf would make the entropy NaN.
  r.t = alpha == T(0) ? T(0) : alpha * (a.t + shift * a.d);
  r.dx = alpha * a.dx;
  r.s2x = alpha * alpha * a.s2x;
  return r;
}

// Combine two partial accumulators of the same row (split-V kernels, SIMD lanes, warps).
template <typename T>
RHO_HD RowAcc<T> acc_merge(const RowAcc<T>& a, const RowAcc<T>& b) {
  const T m = nan_max(a.m, b.m);
  if (m == -pos_inf<T>()) return acc_empty<T>();
  const RowAcc<T> x = acc_rescale(a, m);
  const RowAcc<T> y = acc_rescale(b, m);
  return RowAcc<T>{m, x.d + y.d, x.t + y.t, x.dx + y.dx, x.s2x + y.s2x};
}

// Add one logit z (column j) to an accumulator whose max m already covers z (m >= z or NaN).
template <typename T, int kMethod>
RHO_HD void acc_add(RowAcc<T>& a, T z, bool is_target) {
  const T shifted = z - a.m;
  const T e = (z == -pos_inf<T>()) ? T(0) : std::exp(shifted);
  a.d += e;
  if (needs_entropy_sum(kMethod)) a.t += entropy_term(e, shifted);
  if (needs_gradnorm_sums(kMethod) && !is_target) {
    a.dx += e;
    a.s2x += e * e;
  }
}

// lse from the accumulator and log_d = log(a.d) (read only when a.m is finite): kernels that
// take logarithms a vector at a time pass their own; finalize_lse takes it here.
template <typename T>
RHO_HD T finalize_lse_from_log(const RowAcc<T>& a, T log_d) {
  if (a.m != a.m) return quiet_nan<T>();
  if (a.m == pos_inf<T>() || a.m == -pos_inf<T>()) return a.m;
  return a.m + log_d;
}

template <typename T>
RHO_HD T finalize_lse(const RowAcc<T>& a) {
  const bool finite_max = a.m == a.m && a.m != pos_inf<T>() && a.m != -pos_inf<T>();
  return finalize_lse_from_log(a, finite_max ? std::log(a.d) : T(0));
}

RHO_HD bool is_finite_value(double x) { return x == x && x != pos_inf<double>() && x != -pos_inf<double>(); }

// CE = lse - z_y, taken as (m - z_y) + log d where the max is finite (see the header comment).
template <typename T>
RHO_HD T finalize_ce(const RowAcc<T>& a, T lse, T z_y, T log_d) {
  const bool finite_max = a.m == a.m && a.m != pos_inf<T>() && a.m != -pos_inf<T>();
  return finite_max ? (a.m - z_y) + log_d : lse - z_y;
}

// The score of one row.  `lse` comes from finalize_lse, `z_y` is the target logit (in the
// accumulation type), `il` the irreducible loss (ignored by methods that do not use it), log_d =
// log(a.d) (read where the max is finite, by CE and the entropy).
template <typename T>
RHO_HD T finalize_score_from_log(int method, const RowAcc<T>& a, T lse, T z_y, T il, int tstate, T log_d) {
  if (tstate == kTargetIgnored) return -pos_inf<T>();
  if (tstate == kTargetOutOfRange) return quiet_nan<T>();
  switch (method) {
    case kReducible:
      return finalize_ce(a, lse, z_y, log_d) - il;
    case kLoss:
      return finalize_ce(a, lse, z_y, log_d);
    case kIrreducible:
      return -il;
    case kGradNorm: {
      if (!is_finite_value(static_cast<double>(lse))) return quiet_nan<T>();
      const T q = a.dx / a.d;          // 1 - p_y
      const T s = a.s2x / (a.d * a.d);  // sum_{j != y} p_j^2
      return std::sqrt(s + q * q);
    }
    case kEntropy:
      if (!is_finite_value(static_cast<double>(lse))) return quiet_nan<T>();
      return log_d - a.t / a.d;
    default:
      return quiet_nan<T>();
  }
}

template <typename T>
RHO_HD T finalize_score(int method, const RowAcc<T>& a, T lse, T z_y, T il, int tstate) {
  const bool finite_max = a.m == a.m && a.m != pos_inf<T>() && a.m != -pos_inf<T>();
  const bool need_log = (method == kEntropy || method == kReducible || method == kLoss) && tstate == kTargetOk &&
                        finite_max;
  return finalize_score_from_log(method, a, lse, z_y, il, tstate, need_log ? std::log(a.d) : T(0));
}

// --------------------------------------------------------------------------- logit transform
//
// Every method reads z' = softcap * tanh(logit_scale * z / softcap), or logit_scale * z without a
// cap (rho_kernels/_contract.py, check_transform), as Hugging Face's models compute them.  Kernels
// template on the kind, so that the plain path (kNoTransform) compiles to the code it always was.
enum Transform : int { kNoTransform = 0, kScaleOnly = 1, kSoftcap = 2 };

template <typename T>
struct TransformArgs {
  T cap;        // softcap (kSoftcap)
  T cap_scale;  // logit_scale / softcap (kSoftcap)
  T scale;      // logit_scale
};

// The op layers' argument rule (rho_kernels/_contract.py, check_transform, says it in Python).
RHO_HD bool transform_valid(double softcap, double logit_scale) {
  const bool cap_ok = softcap == 0.0 || (softcap > 0.0 && softcap < pos_inf<double>());
  const bool scale_ok = logit_scale == logit_scale && logit_scale != 0.0 && logit_scale < pos_inf<double>() &&
                        logit_scale > -pos_inf<double>();
  return cap_ok && scale_ok;
}

RHO_HD int transform_kind(double softcap, double logit_scale) {
  return softcap != 0.0 ? kSoftcap : (logit_scale != 1.0 ? kScaleOnly : kNoTransform);
}

template <typename T>
RHO_HD TransformArgs<T> transform_args(double softcap, double logit_scale) {
  const double cap = softcap != 0.0 ? softcap : 1.0;
  return TransformArgs<T>{T(cap), T(logit_scale / cap), T(logit_scale)};
}

// tanh(x): an odd polynomial below |x| = 0.55 (a least-squares fit, relative error 3e-11), and
// (1 - e) / (1 + e) with e = exp(-2|x|) above (e <= 0.33: no cancellation); +-inf -> +-1,
// NaN -> NaN.  Selects, not branches, so that loops over it vectorise; `exp_nonpos` is the
// caller's exp of a non-positive argument (std::exp, or a vectorisable one).  The Triton kernels
// (triton_ce_grad._tanh) compute the same formula.
// tanh(x) = x + x * u * P(u), u = x^2, for |x| < kTanhSmall; P's coefficients, highest first.
constexpr int kTanhPolyTerms = 6;
constexpr double kTanhPoly[kTanhPolyTerms] = {0.0023953687722703012, -0.008413468354891797, 0.02178262500486329,
                                              -0.05395961158141095,  0.13333293354371045,   -0.3333333271103655};
constexpr double kTanhSmall = 0.55;

template <typename T, typename Exp>
RHO_HD T tanh_acc(T x, const Exp& exp_nonpos) {
  const T a = x < T(0) ? -x : x;
  const T u = a * a;
  // A local copy: CUDA device code cannot index a namespace-scope array (the copy folds away).
  static_assert(kTanhPolyTerms == 6, "the copy below lists every coefficient");
  constexpr double c[kTanhPolyTerms] = {kTanhPoly[0], kTanhPoly[1], kTanhPoly[2], kTanhPoly[3], kTanhPoly[4], kTanhPoly[5]};
  T p = T(c[0]);
  for (int i = 1; i < kTanhPolyTerms; ++i) p = p * u + T(c[i]);
  const T small = a + a * (u * p);
  const T e = exp_nonpos(T(-2) * a);
  const T big = (T(1) - e) / (T(1) + e);
  const T r = a < T(kTanhSmall) ? small : big;
  return x < T(0) ? -r : r;
}

// z' of one logit, and with `dz` the derivative dz'/dz = logit_scale * (1 - tanh^2) (or
// logit_scale): the chain rule of every gradient.
template <int kTransform, typename T, typename Exp>
RHO_HD T transform_logit(T z, const TransformArgs<T>& a, const Exp& exp_nonpos, T* dz = nullptr) {
  if (kTransform == kScaleOnly) {
    if (dz) *dz = a.scale;
    return z * a.scale;
  }
  if (kTransform == kSoftcap) {
    const T t = tanh_acc(z * a.cap_scale, exp_nonpos);
    if (dz) *dz = a.scale * (T(1) - t * t);
    return a.cap * t;
  }
  if (dz) *dz = T(1);
  return z;
}

RHO_HD bool is_eligible(float score, int tstate) { return tstate == kTargetOk && score == score; }

// Monotone map of a float onto uint32 (larger float -> larger integer); -0 is read as +0 so
// that the two zeros tie, as they do for every comparison-based sort.
RHO_HD uint32_t ordered_bits(float s) {
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(s);
#else
  uint32_t u;
  std::memcpy(&u, &s, sizeof(u));
#endif
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The whole ordering rule in one integer: larger key = selected first.  An eligible row's high
// word is ordered_bits(score) >= ordered_bits(-inf) = 0x007fffff > 0; an ineligible row's is 0.
// The low word is the complemented row index, so ties go to the lower index.  Rows < 2^32.
RHO_HD uint64_t select_key(float score, bool eligible, uint32_t row) {
  const uint64_t hi = eligible ? ordered_bits(score) : 0u;
  return (hi << 32) | static_cast<uint64_t>(0xFFFFFFFFu - row);
}

RHO_HD uint32_t key_row(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu); }
RHO_HD bool key_valid(uint64_t key) { return (key >> 32) != 0; }

#if defined(RHO_ISA_NAMESPACE)
}  // inline namespace RHO_ISA_NAMESPACE
#endif
}  // namespace rho
