// select_cpu.cpp -- the fused CPU kernels of rho_kernels::score_rows and rho_kernels::select_rows.
//
// Per row (all per-row math from rho_math.h): the row is cut into blocks of kBlock logits;
// each block is read twice while it sits in L1 (a vectorised NaN-propagating max, then the
// exp sums relative to that block max) and folded into the row's accumulator with
// rho::acc_merge.  So the logits stream from memory once, there is no N x V temporary, and
// the block sums form a two-level (lane, then block) summation that keeps fp32 round-off
// near that of PyTorch's cascade sum.  Sums are in fp32 (fp64 for fp64 logits); the per-row
// finalisation (lse, CE - IL, gradnorm, entropy) runs in double and is rounded once.
// bf16/fp16 logits are widened in registers; fp32 exp is an inline ~1-ulp routine
// (exp_nonpos below); fp64 uses Sleef's exp through at::vec.
//
// Parallelism: rows are handed out to the at::parallel_for threads in chunks from an atomic
// counter (the cores are often shared, so a static split would wait on the slowest thread).
// With few rows and a long vocabulary the rows are also split along V and the partial
// accumulators merged with rho::acc_merge.  Rows whose columns are strided (transposed
// logits) are gathered kGroup rows at a time.  Extra memory: O(N) (scores, select keys) plus
// O(threads * kGroup * kBlock) gather buffers.
//
// Top-k: one uint64 key per row (rho::select_key: score, eligibility, row), std::nth_element
// for the k largest, then a sort of those k only.
//
// ISA: ATen's at::vec::Vectorized<T> only vectorises when the translation unit defines the
// matching CPU_CAPABILITY_* macro, and setup.py compiles this file with -march=$RHO_KERNELS_CPU_ARCH
// (default "native").  We derive the capability from the compiler's target macros below
// (AVX-512 if __AVX512F/BW/VL/DQ__, else AVX2 if __AVX2__, __FMA__ and __F16C__, else the
// scalar DEFAULT): the kernel targets the *build host's* instruction set, with no runtime
// dispatch, so a binary built with -march=native may not run on an older CPU.  Build with
// RHO_KERNELS_CPU_ARCH=x86-64-v3 (AVX2) or x86-64 (scalar, ~15x slower) for portable wheels.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include "select_cpu_aten.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "rho_math.h"

// GCC 12 reports its own AVX-512 intrinsics (the deliberately undefined "__Y" operand of
// _mm512_undefined_*) as (maybe-)uninitialized once they are inlined here; a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace rho_cpu {
namespace {

using rho::RowAcc;

// Logits per block: large enough that the per-block merge (one scalar exp) is noise, small
// enough that the block is still in L1 for its second read.
constexpr int64_t kBlock = 2048;
// Rows handed to a thread at a time aim at about this many logits.
constexpr int64_t kChunkElems = 1 << 16;
// Split a row along V only into pieces of at least this many logits.
constexpr int64_t kMinSplit = 4096;

template <typename scalar_t>
using acc_t = typename rho::AccOf<scalar_t>::type;

template <typename A>
using Vec = at::vec::Vectorized<A>;

// W consecutive logits converted to the accumulation type (bf16/fp16 widen to fp32 in-register).
template <typename scalar_t>
inline Vec<acc_t<scalar_t>> load_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return Vec<scalar_t>::loadu(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    Vec<float> v;
    at::vec::load_fp32_from_bf16(p, v);
    return v;
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "unsupported logits dtype");
    Vec<float> v;
    at::vec::load_fp32_from_fp16(p, v);
    return v;
  }
}

// 2W consecutive logits as two vectors in an unspecified lane order -- for the block max and
// the plain sums, which do not care which lane holds which column.  bf16 then widens with one
// unpack per vector (bf16 is the top half of an fp32) instead of a zero-extend and a shift.
template <typename scalar_t>
inline void load_pair(const scalar_t* p, Vec<acc_t<scalar_t>>& a, Vec<acc_t<scalar_t>>& b) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i v = _mm512_loadu_si512(p);
    a = Vec<float>(_mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v)));
    b = Vec<float>(_mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v)));
    return;
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = Vec<float>(_mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v)));
    b = Vec<float>(_mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v)));
    return;
#endif
  }
  a = load_acc(p);
  b = load_acc(p + Vec<acc_t<scalar_t>>::size());
}

// One logit in the accumulation type.  fp16 goes through the bit-level conversion: the
// intrinsic one in c10::Half trips GCC's -Wmaybe-uninitialized.
template <typename scalar_t>
inline acc_t<scalar_t> to_acc(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::detail::fp16_ieee_to_fp32_value(x.x);
  } else {
    return static_cast<acc_t<scalar_t>>(x);
  }
}

// exp(x) for x <= 0 (a logit minus its block max), fp32, inline.  Sleef's vector expf (what
// Vectorized::exp calls) is an out-of-line call that spills the accumulators around every
// use; with it the fp32 kernel was ~1.5x slower.  Here: n = round(x / ln2) by the 1.5 * 2^23 shifter,
// r = x - n ln2 in one FMA (|r| <= ln2/2; the error of the rounded ln2 is ~1e-9 |n|, which
// only touches terms ~2^n that are negligible in the sum), e^r by the degree-5 minimax
// polynomial with p(0) = 1 (max relative error 9.2e-8, coefficients fitted for this file;
// they coincide with those in ATen's exp_u20), and the product with 2^n.  Inputs below
// ln(FLT_MIN) -- -inf included -- give exactly 0 (masked; no clamp needed because masked lanes
// may hold garbage).  The value for x > 0 or NaN is unspecified and never used: such blocks
// have a NaN or +inf max, which alone decides the row's lse.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kShifter = 12582912.0f;         // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLnFltMin = -87.33654475f;      // ln(FLT_MIN): 2^n stays a normal number
constexpr float kP1 = 0.9999997019767761f, kP2 = 0.4999914765357971f, kP3 = 0.1666763871908188f,
                kP4 = 0.04189816117286682f, kP5 = 0.008290272206068039f;

#if defined(CPU_CAPABILITY_AVX512)
inline __m512 exp_nonpos_ps(__m512 x) {
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kShifter));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(kShifter));
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), x);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(kP5), r, _mm512_set1_ps(kP4));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kP3));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kP2));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(kP1));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  // q * 2^n in one instruction, zero where x < ln(FLT_MIN).
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(kLnFltMin), _CMP_GE_OQ), q, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 exp_nonpos_ps(__m256 x) {
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kShifter));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kShifter));
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), x);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(kP5), r, _mm256_set1_ps(kP4));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(kP3));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(kP2));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(kP1));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  // 2^n from the exponent bits: the low mantissa bits of t hold n (two's complement);
  // shifting n + 127 into the exponent field pushes the shifter's own bits out.
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(kLnFltMin), _CMP_GE_OQ));
}
#endif

template <typename A>
inline Vec<A> exp_nonpos(const Vec<A>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return Vec<float>(exp_nonpos_ps(x));
#endif
  return x.exp();
}

template <typename A>
inline A hsum(const Vec<A>& v) {
  __at_align__ A lanes[Vec<A>::size()];
  v.store(lanes);
  // Pairwise, so the lane order does not bias the last bits.
  for (int64_t w = Vec<A>::size() / 2; w > 0; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  }
  return lanes[0];
}

template <typename A>
inline A hmax(const Vec<A>& v) {
  __at_align__ A lanes[Vec<A>::size()];
  v.store(lanes);
  A m = lanes[0];
  for (int64_t i = 1; i < Vec<A>::size(); ++i) m = rho::nan_max(m, lanes[i]);
  return m;
}

// The accumulator of n (<= kBlock) contiguous logits, relative to their own max.  `tgt` is
// the target's column relative to p (outside [0, n) when the target is not in this block).
// Returns m = NaN for a block holding a NaN (sums unset) and acc_empty for an all -inf block.
template <typename scalar_t, int M>
RowAcc<acc_t<scalar_t>> block_acc(const scalar_t* p, int64_t n, int64_t tgt) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t nfull = n - n % W;
  const int64_t rem = n - nfull;

  // The ragged tail, padded with -inf (which contributes exactly nothing to any sum).
  __at_align__ A tail[W];
  if (rem) {
    for (int64_t i = 0; i < W; ++i) tail[i] = i < rem ? to_acc(p[nfull + i]) : kNegInf;
  }

  // Pass 1: block max; at::vec::maximum propagates NaN.
  V mx0(kNegInf), mx1(kNegInf);
  int64_t j = 0;
  for (; j + 2 * W <= nfull; j += 2 * W) {
    V x0, x1;
    load_pair(p + j, x0, x1);
    mx0 = at::vec::maximum(mx0, x0);
    mx1 = at::vec::maximum(mx1, x1);
  }
  if (j < nfull) mx0 = at::vec::maximum(mx0, load_acc(p + j));
  if (rem) mx1 = at::vec::maximum(mx1, V::loadu(tail));
  const A bm = hmax(at::vec::maximum(mx0, mx1));
  if (bm != bm) {
    RowAcc<A> r = rho::acc_empty<A>();
    r.m = bm;
    return r;
  }
  if (bm == kNegInf) return rho::acc_empty<A>();

  // Pass 2: sums of exp(z - bm) (and the method's extra sums), two interleaved accumulator
  // sets for instruction-level parallelism.  For gradnorm, `d` accumulates dx (every column
  // but the target's, so 1 - p_y has no cancellation when p_y ~ 1); the target's chunk is
  // done apart with its lane masked, and d = dx + e_y at the end.
  constexpr bool kGrad = rho::needs_gradnorm_sums(M);
  const V vm(bm);
  const V vlowest(std::numeric_limits<A>::lowest());
  V d[2] = {V(A(0)), V(A(0))};
  V t[2] = {V(A(0)), V(A(0))};
  V s2[2] = {V(A(0)), V(A(0))};
  auto step = [&](const V& x, int s) {
    const V shifted = x - vm;
    const V e = exp_nonpos<A>(shifted);
    d[s] = d[s] + e;
    if constexpr (rho::needs_entropy_sum(M)) {
      // entropy_term: a -inf logit has e = 0 and contributes 0 * lowest = 0, not 0 * -inf.
      t[s] = at::vec::fmadd(e, at::vec::clamp_min(shifted, vlowest), t[s]);
    }
    if constexpr (kGrad) s2[s] = at::vec::fmadd(e, e, s2[s]);
  };
  auto run = [&](int64_t from, int64_t to) {  // the full chunks in [from, to)
    int64_t c = from;
    for (; c + 2 * W <= to; c += 2 * W) {
      V x0, x1;
      load_pair(p + c, x0, x1);
      step(x0, 0);
      step(x1, 1);
    }
    if (c < to) step(load_acc(p + c), 0);
  };
  // Start column of the chunk holding the target (nfull = the tail), or -1.
  const int64_t tchunk = (kGrad && tgt >= 0 && tgt < n) ? tgt / W * W : int64_t(-1);
  A e_y = A(0);
  if (tchunk >= 0 && tchunk < nfull) {
    run(0, tchunk);
    run(tchunk + W, nfull);
  } else {
    run(0, nfull);
  }
  if (tchunk >= 0) {
    __at_align__ A lanes[W];
    exp_nonpos<A>((tchunk < nfull ? load_acc(p + tchunk) : V::loadu(tail)) - vm).store(lanes);
    e_y = lanes[tgt - tchunk];
    lanes[tgt - tchunk] = A(0);
    const V ex = V::loadu(lanes);
    d[1] = d[1] + ex;
    s2[1] = at::vec::fmadd(ex, ex, s2[1]);
  }
  if (rem && tchunk != nfull) step(V::loadu(tail), 1);

  RowAcc<A> r;
  r.m = bm;
  const A dsum = hsum(d[0] + d[1]);
  r.d = kGrad ? dsum + e_y : dsum;
  r.t = rho::needs_entropy_sum(M) ? hsum(t[0] + t[1]) : A(0);
  r.dx = kGrad ? dsum : A(0);
  r.s2x = kGrad ? hsum(s2[0] + s2[1]) : A(0);
  return r;
}

// Folds one block's accumulator into a row's.  A NaN block makes the row NaN for good (its
// lse is NaN whatever follows); an all -inf block contributes nothing.
template <typename A>
inline void fold_block(RowAcc<A>& acc, const RowAcc<A>& blk) {
  if (acc.m != acc.m) return;
  if (blk.m != blk.m) {
    acc = blk;
  } else if (blk.m != -std::numeric_limits<A>::infinity()) {
    acc = rho::acc_merge(acc, blk);
  }
}

// The accumulator of logits [j0, j1) of one row (`row` points at column 0, `stride` is the
// column stride).  `tgt` is the target column, or -1 when the target is not a valid column.
// Non-unit strides are gathered block by block into a stack buffer.
template <typename scalar_t, int M>
RowAcc<acc_t<scalar_t>> range_acc(const scalar_t* row, int64_t stride, int64_t j0, int64_t j1, int64_t tgt) {
  using A = acc_t<scalar_t>;
  RowAcc<A> acc = rho::acc_empty<A>();
  scalar_t gathered[kBlock];
  for (int64_t b = j0; b < j1 && acc.m == acc.m; b += kBlock) {
    const int64_t n = std::min(kBlock, j1 - b);
    const scalar_t* p = row + b * stride;
    if (stride != 1) {
      for (int64_t i = 0; i < n; ++i) gathered[i] = p[i * stride];
      p = gathered;
    }
    fold_block(acc, block_acc<scalar_t, M>(p, n, tgt < 0 ? int64_t(-1) : tgt - b));
  }
  return acc;
}

// Rows whose columns are not contiguous (e.g. transposed logits, where consecutive rows are
// adjacent in memory) are gathered kGroup rows at a time, column by column, so that each
// cache line is fetched once for the whole group instead of once per row.
constexpr int64_t kGroup = 16;

template <typename scalar_t, int M>
void grouped_strided_acc(const scalar_t* const* rows, int64_t g, int64_t stride, int64_t V, const int64_t* tgt,
                         scalar_t* buf, RowAcc<acc_t<scalar_t>>* acc) {
  for (int64_t i = 0; i < g; ++i) acc[i] = rho::acc_empty<acc_t<scalar_t>>();
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t off = (b + j) * stride;
      for (int64_t i = 0; i < g; ++i) buf[i * kBlock + j] = rows[i][off];
    }
    for (int64_t i = 0; i < g; ++i) {
      if (acc[i].m == acc[i].m) {
        fold_block(acc[i], block_acc<scalar_t, M>(buf + i * kBlock, n, tgt[i] < 0 ? int64_t(-1) : tgt[i] - b));
      }
    }
  }
}

// The (already checked) arguments of one call, as raw pointers and int64 strides.
struct Problem {
  const void* logits;
  int64_t rank;
  int64_t inner_rows;  // size(1) for [B, T, V]
  int64_t stride0, stride1, stride_v;
  int64_t num_rows, num_classes;
  const int64_t* targets;
  const float* il;  // null where the method does not read it
  int64_t ignore_index;
};

inline int64_t row_offset(const Problem& p, int64_t r) {
  if (p.rank == 2) return r * p.stride0;
  return (r / p.inner_rows) * p.stride0 + (r % p.inner_rows) * p.stride1;
}

// Runs f(begin, end) over [0, n) in chunks of `grain`, taken dynamically by the threads.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t nchunks = (n + grain - 1) / grain;
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (nthreads <= 1) {
    f(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) break;
      f(c * grain, std::min(n, (c + 1) * grain));
    }
  });
}

// Score (and optionally lse, select keys) of every row.  `read_ineligible` = false skips the
// logits of rows whose target is ignored/out of range (their score does not depend on them;
// select does not report lse).
template <typename scalar_t, int M>
void score_kernel(const Problem& p, float* score, acc_t<scalar_t>* lse, uint64_t* keys, bool read_ineligible) {
  using A = acc_t<scalar_t>;
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t N = p.num_rows, V = p.num_classes;

  // Per-row epilogue: finalise in double (one rounding to the fp32 score), write outputs.
  auto finish = [&](int64_t r, const RowAcc<A>& acc, int ts) {
    const RowAcc<double> a{static_cast<double>(acc.m), static_cast<double>(acc.d), static_cast<double>(acc.t),
                           static_cast<double>(acc.dx), static_cast<double>(acc.s2x)};
    const double l = rho::needs_logits(M) ? rho::finalize_lse(a) : rho::quiet_nan<double>();
    double zy = 0.0;
    if (rho::needs_logits(M) && ts == rho::kTargetOk) {
      zy = static_cast<double>(to_acc(logits[row_offset(p, r) + p.targets[r] * p.stride_v]));
    }
    const double il = p.il != nullptr ? static_cast<double>(p.il[r]) : 0.0;
    const float s = static_cast<float>(rho::finalize_score<double>(M, a, l, zy, il, ts));
    score[r] = s;
    if (lse != nullptr) lse[r] = static_cast<A>(l);
    if (keys != nullptr) keys[r] = rho::select_key(s, rho::is_eligible(s, ts), static_cast<uint32_t>(r));
  };
  auto state = [&](int64_t r) { return rho::target_state(p.targets[r], V, p.ignore_index); };
  auto reads = [&](int ts) { return rho::needs_logits(M) && (read_ineligible || ts == rho::kTargetOk); };

  const int64_t nthreads = at::get_num_threads();
  const int64_t nsplit = std::min<int64_t>(V / kMinSplit, (4 * nthreads + N - 1) / std::max<int64_t>(N, 1));
  if (!rho::needs_logits(M) || nthreads <= 1 || N >= 4 * nthreads || nsplit < 2) {
    if (rho::needs_logits(M) && p.stride_v != 1) {
      const int64_t grain = std::max<int64_t>(1, kChunkElems / (kGroup * V)) * kGroup;
      parallel_chunks(N, grain, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buf(static_cast<size_t>(kGroup * kBlock));
        const scalar_t* rows[kGroup];
        int64_t tgt[kGroup];
        RowAcc<A> acc[kGroup];
        for (int64_t r0 = begin; r0 < end; r0 += kGroup) {
          const int64_t g = std::min(kGroup, end - r0);
          for (int64_t i = 0; i < g; ++i) {
            rows[i] = logits + row_offset(p, r0 + i);
            tgt[i] = state(r0 + i) == rho::kTargetOk ? p.targets[r0 + i] : -1;
          }
          grouped_strided_acc<scalar_t, M>(rows, g, p.stride_v, V, tgt, buf.data(), acc);
          for (int64_t i = 0; i < g; ++i) finish(r0 + i, acc[i], state(r0 + i));
        }
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, kChunkElems / (rho::needs_logits(M) ? V : 1));
    parallel_chunks(N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int ts = state(r);
        RowAcc<A> acc = rho::acc_empty<A>();
        if (reads(ts)) {
          const int64_t tgt = ts == rho::kTargetOk ? p.targets[r] : -1;
          acc = range_acc<scalar_t, M>(logits + row_offset(p, r), p.stride_v, 0, V, tgt);
        }
        finish(r, acc, ts);
      }
    });
    return;
  }

  // Few rows, long vocabulary: split every row into nsplit pieces (block-aligned), then merge.
  int64_t piece = (V + nsplit - 1) / nsplit;
  piece = (piece + kBlock - 1) / kBlock * kBlock;
  std::vector<RowAcc<A>> part(static_cast<size_t>(N * nsplit), rho::acc_empty<A>());
  parallel_chunks(N * nsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / nsplit, j0 = (task % nsplit) * piece, j1 = std::min(V, j0 + piece);
      const int ts = state(r);
      if (j0 >= j1 || !reads(ts)) continue;
      const int64_t tgt = ts == rho::kTargetOk ? p.targets[r] : -1;
      part[task] = range_acc<scalar_t, M>(logits + row_offset(p, r), p.stride_v, j0, j1, tgt);
    }
  });
  for (int64_t r = 0; r < N; ++r) {
    RowAcc<A> acc = rho::acc_empty<A>();
    for (int64_t s = 0; s < nsplit; ++s) acc = rho::acc_merge(acc, part[r * nsplit + s]);
    finish(r, acc, state(r));
  }
}

template <typename scalar_t>
void score_dispatch(int method, const Problem& p, float* score, acc_t<scalar_t>* lse, uint64_t* keys,
                    bool read_ineligible) {
  switch (method) {
    case rho::kReducible:
      return score_kernel<scalar_t, rho::kReducible>(p, score, lse, keys, read_ineligible);
    case rho::kLoss:
      return score_kernel<scalar_t, rho::kLoss>(p, score, lse, keys, read_ineligible);
    case rho::kIrreducible:
      return score_kernel<scalar_t, rho::kIrreducible>(p, score, lse, keys, read_ineligible);
    case rho::kGradNorm:
      return score_kernel<scalar_t, rho::kGradNorm>(p, score, lse, keys, read_ineligible);
    case rho::kEntropy:
      return score_kernel<scalar_t, rho::kEntropy>(p, score, lse, keys, read_ineligible);
    default:
      TORCH_CHECK(false, "rho_kernels: unknown method id ", method);
  }
}

// Light defence: the Python layer (rho_kernels/_contract.py) has already validated all this.
Problem make_problem(const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& il,
                     int64_t method, int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), "rho_kernels (cpu): tensors must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "rho_kernels: logits must be [N, V] or [B, T, V], got ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "rho_kernels: logits must be float32/bfloat16/float16/float64, got ", dt);
  TORCH_CHECK(method >= 0 && method < rho::kNumMethods, "rho_kernels: unknown method id ", method);
  const int64_t V = logits.size(-1);
  const int64_t rows = logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1);
  TORCH_CHECK(V >= 1, "rho_kernels: logits need at least one class, got V = ", V);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.is_contiguous() &&
                  targets.size(0) == rows,
              "rho_kernels: targets must be a contiguous int64 [N] tensor with N = ", rows, ", got ",
              targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(rows <= static_cast<int64_t>(UINT32_MAX), "rho_kernels: at most 2^32 - 1 rows, got ", rows);
  const float* il_ptr = nullptr;
  if (rho::needs_il(static_cast<int>(method))) {
    TORCH_CHECK(il.has_value() && il->defined(), "rho_kernels: method ", method, " needs irreducible_loss");
    TORCH_CHECK(il->device().is_cpu() && il->scalar_type() == at::kFloat && il->dim() == 1 && il->is_contiguous() &&
                    il->size(0) == rows,
                "rho_kernels: irreducible_loss must be a contiguous float32 [N] CPU tensor with N = ", rows,
                ", got ", il->scalar_type(), " ", il->sizes());
    il_ptr = il->data_ptr<float>();
  }
  Problem p;
  p.logits = logits.data_ptr();
  p.rank = logits.dim();
  p.inner_rows = logits.dim() == 3 ? logits.size(1) : 1;
  p.stride0 = logits.stride(0);
  p.stride1 = logits.dim() == 3 ? logits.stride(1) : 0;
  p.stride_v = logits.stride(-1);
  p.num_rows = rows;
  p.num_classes = V;
  p.targets = targets.data_ptr<int64_t>();
  p.il = il_ptr;
  p.ignore_index = ignore_index;
  return p;
}

std::tuple<at::Tensor, at::Tensor> score_rows_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                  const std::optional<at::Tensor>& il, int64_t method,
                                                  int64_t ignore_index) {
  const Problem p = make_problem(logits, targets, il, method, ignore_index);
  const auto lse_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor score = at::empty({p.num_rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.num_rows}, logits.options().dtype(lse_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rho_kernels::score_rows", [&] {
    score_dispatch<scalar_t>(static_cast<int>(method), p, score.data_ptr<float>(),
                             static_cast<acc_t<scalar_t>*>(lse.data_ptr()), nullptr, true);
  });
  return {score, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_rows_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                               const std::optional<at::Tensor>& il, int64_t k,
                                                               int64_t method, int64_t ignore_index) {
  const Problem p = make_problem(logits, targets, il, method, ignore_index);
  const int64_t N = p.num_rows;
  TORCH_CHECK(k >= 0 && k <= N, "rho_kernels: k = ", k, " is out of range: need 0 <= k <= N = ", N);
  at::Tensor indices = at::empty({k}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({k}, logits.options().dtype(at::kFloat));
  at::Tensor valid = at::empty({k}, logits.options().dtype(at::kBool));
  if (k == 0) return {indices, scores, valid};

  std::vector<float> score(static_cast<size_t>(N));
  std::vector<uint64_t> keys(static_cast<size_t>(N));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rho_kernels::select_rows", [&] {
    score_dispatch<scalar_t>(static_cast<int>(method), p, score.data(), nullptr, keys.data(), false);
  });
  // Top k of the keys (larger = first; keys are unique), without sorting all N.
  if (k < N) std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
  std::sort(keys.begin(), keys.begin() + k, std::greater<uint64_t>());
  int64_t* idx = indices.data_ptr<int64_t>();
  float* sc = scores.data_ptr<float>();
  bool* ok = valid.data_ptr<bool>();
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t r = rho::key_row(keys[i]);
    idx[i] = r;
    sc[i] = score[r];
    ok[i] = rho::key_valid(keys[i]);
  }
  return {indices, scores, valid};
}

}  // namespace
}  // namespace rho_cpu

TORCH_LIBRARY_IMPL(rho_kernels, CPU, m) {
  m.impl("score_rows", &rho_cpu::score_rows_cpu);
  m.impl("select_rows", &rho_cpu::select_rows_cpu);
}
