// score_cpu_kernel.h -- the fused CPU scoring kernel (per-row score, lse and select key), written
// once and compiled once per instruction set: csrc/cpu/isa/score_cpu_<isa>.cpp define
// CPU_CAPABILITY (at::vec's ISA switch), RHO_ISA_NAMESPACE, RHO_SCORE_ROWS_FN and RHO_PARTIAL_ROWS_FN, include this
// file, and setup.py gives each its own -march.  select_cpu.cpp picks one at run time.
//
// All per-row math comes from rho_math.h.  Two code paths, chosen from the shapes alone:
//
//  * Row path (contiguous rows with V >= kTileMaxV): the row is cut into blocks of kBlock
//    logits; each block is read twice while it sits in L1 (a vectorised NaN-propagating max,
//    then the exp sums relative to that block max) and folded into the row's accumulator with
//    rho::acc_merge.  So the logits stream from memory once and the block sums form a two-level
//    (lane, then block) summation that keeps fp32 round-off near PyTorch's cascade sum.  With
//    few rows and a long vocabulary the rows are also split along V and merged with acc_merge.
//
//  * Tile path (short rows, V < kTileMaxV, and every row whose columns are strided, e.g.
//    transposed logits): kTileVecs vectors' worth of rows side by side, one row per SIMD lane.
//    Blocks of kTileCols columns are gathered into a transposed L1 buffer (for column-major
//    logits a column of the tile is contiguous memory, and a page's worth of tiles take turns
//    block by block so that each column is read a page at a time), then per lane: block max, rescale of
//    the running sums (rho::acc_rescale's rule, vectorised), exp sums of the block.  A 10-class
//    row costs a few vector instructions instead of one under-filled vector plus set-up.  Evenly
//    spaced fp32/bf16 rows are loaded with hardware gathers; the tile is finalised a vector of
//    rows at a time (tile_finish: inline log, lane masks for the special values).
//
// Sums are in fp32 (fp64 for fp64 logits).  The row path's finalisation (lse, CE - IL, gradnorm,
// entropy) runs in double and is rounded once; the tile path's in the accumulation type.  bf16/fp16 logits are widened in registers;
// fp32 exp is an inline ~1-ulp routine (exp_nonpos below); fp64 uses Sleef's exp via at::vec.
//
// Parallelism: rows (or tiles) are handed to the at::parallel_for threads in chunks from an
// atomic counter (the cores are often shared, so a static split would wait on the slowest
// thread).  Extra memory: O(threads * L1) buffers, plus O(N) partial sums on the split path.
//
// Everything here has internal linkage or lives in ISA-specific namespaces (at::vec's
// CPU_CAPABILITY, rho_math.h's RHO_ISA_NAMESPACE): an inline function with external linkage
// compiled with AVX-512 here could otherwise replace the baseline copy program-wide.  For the
// same reason no std container or TORCH_CHECK is instantiated here (select_cpu.cpp checks).
#if !defined(CPU_CAPABILITY) || !defined(RHO_ISA_NAMESPACE) || !defined(RHO_SCORE_ROWS_FN) || \
    !defined(RHO_PARTIAL_ROWS_FN)
#error "score_cpu_kernel.h is included by csrc/cpu/isa/score_cpu_<isa>.cpp only"
#endif

#include "select_cpu_aten.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#include "rho_math.h"
#include "score_cpu.h"

// GCC 12 reports its own AVX-512 intrinsics (the deliberately undefined "__Y" operand of
// _mm512_undefined_*) as (maybe-)uninitialized once they are inlined here; a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Helpers called inside the kernels' inner loops.  GCC stops inlining them on its own once the
// file holds enough instantiations (the logit transform's kernels did that: transpose16 out of line,
// its 16 vectors through memory, made fp32 [131072, 100] on AVX-512 1.7x slower).
#if defined(__GNUC__)
#define RHO_HOT inline __attribute__((always_inline))
#else
#define RHO_HOT inline
#endif

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
// Contiguous rows shorter than this take the tile path.
constexpr int64_t kTileMaxV = 512;
// Tile path: rows per tile = kTileVecs vectors (independent chains for the FMA pipes), and
// columns per gathered block (the buffer, kTileVecs * W * kTileCols values, is 16 KiB for fp32
// under AVX-512).
constexpr int kTileVecs = 4;
constexpr int64_t kTileCols = 64;
// Column-major logits: tiles take turns over the column blocks so that each visit to a column
// reads this many consecutive bytes (a page; see score_kernel).
constexpr int64_t kColGroupBytes = 4096;
// AVX-512 tiles of rows contiguous along V: transposed in registers from this V on (hardware
// gathers below it, where a 16 x 16 transpose would move mostly padding).
constexpr int64_t kTransposeMinV = 8;

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
RHO_HOT void load_pair(const scalar_t* p, Vec<acc_t<scalar_t>>& a, Vec<acc_t<scalar_t>>& b) {
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
// may hold garbage).  NaN gives NaN (the unordered compare keeps it), as Sleef's exp does: the
// block passes find a NaN logit from their sums (see max_plain).  The value for x > 0 is
// unspecified and never used: such blocks have a +inf max, which alone decides the row's lse.
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
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(kLnFltMin), _CMP_NLT_UQ), q, n);
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
  return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(kLnFltMin), _CMP_NLT_UQ));
}
#endif

template <typename A>
inline Vec<A> exp_nonpos(const Vec<A>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return Vec<float>(exp_nonpos_ps(x));
#endif
  return x.exp();
}

// log(x) for finite x >= 1 (a row's d), fp32, inline (Sleef's logf is an out-of-line call, ~10x
// the instructions): x = mant * 2^e with mant in [sqrt(1/2), sqrt(2)), s = (mant - 1) / (mant + 1),
// log(mant) = 2 atanh(s) = 2s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9) (|s| < 0.172: the next term is
// ~1e-9 relative), plus e ln 2.  About 2 ulp; fp64 and the baseline build use Vectorized::log.
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 log_ge1_ps(__m512 x) {
  // getmant in [0.75, 1.5) (near enough to [sqrt(1/2), sqrt(2)) for the series); e = the exponents' difference.
  const __m512 mant = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const __m512 e = _mm512_sub_ps(_mm512_getexp_ps(x), _mm512_getexp_ps(mant));
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 log_ge1_ps(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  const __m256 m1 = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));  // [1, 2)
  const __m256 big = _mm256_cmp_ps(m1, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  const __m256 mant = _mm256_blendv_ps(m1, _mm256_mul_ps(m1, _mm256_set1_ps(0.5f)), big);
  const __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127))),
                                 _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Vec<float> one(1.0f), m(mant);
  const Vec<float> sv = (m - one) / (m + one);
  const Vec<float> z = sv * sv;
  Vec<float> q = at::vec::fmadd(z, Vec<float>(1.0f / 9), Vec<float>(1.0f / 7));
  q = at::vec::fmadd(q, z, Vec<float>(1.0f / 5));
  q = at::vec::fmadd(q, z, Vec<float>(1.0f / 3));
  const Vec<float> two_s = sv + sv;
  const Vec<float> logm = at::vec::fmadd(two_s * z, q, two_s);
  return at::vec::fmadd(Vec<float>(e), Vec<float>(0.693147180559945309f), logm);
}
#endif

template <typename A>
inline Vec<A> log_ge1(const Vec<A>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return Vec<float>(log_ge1_ps(x));
#endif
  return x.log();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The lanes of an fp32 vector folded pairwise in registers, lane i with lane i + w for
// w = W/2, ..., 1 (f256 / f128: the lane-wise operation on the halves).
template <typename F256, typename F128>
inline float fold_lanes(const Vec<float>& v, const F256& f256, const F128& f128) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const __m256 h = f256(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
#else
  const __m256 h = v;
  (void)f256;
#endif
  __m128 q = f128(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = f128(q, _mm_movehl_ps(q, q));
  q = f128(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#endif

template <typename A>
inline A hsum(const Vec<A>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {  // the same pairwise tree as below, in registers
    return fold_lanes(v, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); },
                      [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
  }
#endif
  __at_align__ A lanes[Vec<A>::size()];
  v.store(lanes);
  // Pairwise, so the lane order does not bias the last bits.
  for (int64_t w = Vec<A>::size() / 2; w > 0; w /= 2) {
    for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  }
  return lanes[0];
}

// Lane-wise max by the bare instruction (one uop; at::vec::maximum's NaN propagation costs three
// more, a quarter of a block's work per logit).  Where a lane sees a NaN the result may be
// either operand, so the block passes recover NaN from their exp sums instead: exp_nonpos(NaN)
// = NaN, and a NaN in d marks the row (rows with an infinite max are looked at exactly).
template <typename A>
inline Vec<A> max_plain(const Vec<A>& a, const Vec<A>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    return Vec<float>(_mm512_max_ps(a, b));
  } else {
    return Vec<double>(_mm512_max_pd(a, b));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    return Vec<float>(_mm256_max_ps(a, b));
  } else {
    return Vec<double>(_mm256_max_pd(a, b));
  }
#else
  return at::vec::maximum(a, b);
#endif
}

// Whether n logits p[0], p[stride], ... hold a NaN (the exact check behind max_plain, for the
// rare rows whose max is infinite).
template <typename scalar_t>
inline bool has_nan(const scalar_t* p, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    const auto x = to_acc(p[i * stride]);
    if (x != x) return true;
  }
  return false;
}

template <typename A>
inline A hmax(const Vec<A>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {  // NaN if any lane is, else the max (in registers)
    if (v.isnan().zero_mask() != (1 << Vec<float>::size()) - 1) return std::numeric_limits<float>::quiet_NaN();
    return fold_lanes(v, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); },
                      [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
  }
#endif
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

  // Pass 1: block max by the bare max instruction, which may pass over a NaN (max_plain): pass 2
  // finds it in d.  An infinite max (all -inf, or a +inf) gets the exact NaN check instead.
  V mx0(kNegInf), mx1(kNegInf);
  int64_t j = 0;
  for (; j + 2 * W <= nfull; j += 2 * W) {
    V x0, x1;
    load_pair(p + j, x0, x1);
    mx0 = max_plain(mx0, x0);
    mx1 = max_plain(mx1, x1);
  }
  if (j < nfull) mx0 = max_plain(mx0, load_acc(p + j));
  if (rem) mx1 = max_plain(mx1, V::loadu(tail));
  const A bm = hmax(at::vec::maximum(mx0, mx1));
  RowAcc<A> nan_acc = rho::acc_empty<A>();
  nan_acc.m = std::numeric_limits<A>::quiet_NaN();
  if (bm != bm) return nan_acc;
  if (bm == kNegInf || bm == -kNegInf) {
    if (has_nan(p, n, 1)) return nan_acc;
    RowAcc<A> r = rho::acc_empty<A>();  // a +inf max alone decides the lse; the sums are unused
    r.m = bm;
    return r;
  }

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
  // Pass 2 reads L1 only, so the memory would idle through it: it prefetches the logits that
  // follow this block (the next block of the row, or the next row of a contiguous [N, V]), the
  // same offset ahead as it reads, so that pass 1 of the next block finds them in cache.
  const char* ahead = reinterpret_cast<const char*>(p + n);
  constexpr int64_t kStepBytes = 2 * W * static_cast<int64_t>(sizeof(scalar_t));
  auto run = [&](int64_t from, int64_t to) {  // the full chunks in [from, to)
    int64_t c = from;
    for (; c + 2 * W <= to; c += 2 * W) {
      for (int64_t b = 0; b < kStepBytes; b += 64) __builtin_prefetch(ahead + c * sizeof(scalar_t) + b, 0, 3);
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
  if (r.d != r.d) return nan_acc;  // a NaN logit (the max is finite: nothing else makes d NaN)
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


// tanh of a vector: rho::tanh_acc's formula (the polynomial and the exp(-2|x|) branch, selected
// per lane).  A NaN lane takes the exp branch and stays NaN; +-inf gives +-1.
template <typename A>
inline Vec<A> tanh_vec(const Vec<A>& x) {
  using V = Vec<A>;
  const V a = x.abs();
  const V u = a * a;
  V p(A(rho::kTanhPoly[0]));
  for (int i = 1; i < rho::kTanhPolyTerms; ++i) p = at::vec::fmadd(p, u, V(A(rho::kTanhPoly[i])));
  const V small = at::vec::fmadd(a, u * p, a);
  const V e = exp_nonpos<A>(V(A(-2)) * a);
  const V big = (V(A(1)) - e) / (V(A(1)) + e);
  const V r = V::blendv(big, small, a < V(A(rho::kTanhSmall)));
  return V::blendv(r, V(A(0)) - r, x < V(A(0)));
}

// z' of n logits in place (rho::transform_logit, a vector at a time).
template <int kTransform, typename A>
inline void transform_block(A* buf, int64_t n, const rho::TransformArgs<A>& ta) {
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V x = V::loadu(buf + i);
    V y = x * V(ta.scale);
    if constexpr (kTransform == rho::kSoftcap) y = V(ta.cap) * tanh_vec<A>(x * V(ta.cap_scale));
    y.store(buf + i);
  }
  struct StdExp {
    A operator()(A v) const { return std::exp(v); }
  };
  for (; i < n; ++i) buf[i] = rho::transform_logit<kTransform>(buf[i], ta, StdExp{});
}

// The accumulator of the transformed logits z' of [j0, j1) of one row, and their plain sum
// (`zsum`, where not null): each block is read into an L1 buffer in the accumulation type,
// transformed there, and reduced by the fp32/fp64 block kernel.
template <typename scalar_t, int M, int kTransform>
RowAcc<acc_t<scalar_t>> range_acc_transformed(const scalar_t* row, int64_t stride, int64_t j0, int64_t j1,
                                              int64_t tgt, const rho::TransformArgs<acc_t<scalar_t>>& ta,
                                              acc_t<scalar_t>* zsum) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  RowAcc<A> acc = rho::acc_empty<A>();
  __at_align__ A buf[kBlock];
  A zs = A(0);
  for (int64_t b = j0; b < j1 && acc.m == acc.m; b += kBlock) {
    const int64_t n = std::min(kBlock, j1 - b);
    const scalar_t* p = row + b * stride;
    int64_t i = 0;
    if (stride == 1) {
      for (; i + W <= n; i += W) load_acc(p + i).store(buf + i);
    }
    for (; i < n; ++i) buf[i] = to_acc(p[i * stride]);
    if constexpr (kTransform != rho::kNoTransform) transform_block<kTransform>(buf, n, ta);
    if (zsum != nullptr) {
      V s(A(0));
      i = 0;
      for (; i + W <= n; i += W) s = s + V::loadu(buf + i);
      A tail = A(0);
      for (; i < n; ++i) tail += buf[i];
      zs += hsum(s) + tail;
    }
    fold_block(acc, block_acc<A, M>(buf, n, tgt < 0 ? int64_t(-1) : tgt - b));
  }
  if (zsum != nullptr) *zsum = acc.m == acc.m ? zs : std::numeric_limits<A>::quiet_NaN();  // NaN logit: z' NaN
  return acc;
}

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

// Tile path: kTileVecs * W rows side by side, one row per SIMD lane.

// Whether a tile column can be loaded with one hardware gather per vector (fp32 and bf16 under
// AVX2 / AVX-512).  bf16 is gathered as 32-bit words whose low half is the logit, so each
// gather reads 2 bytes past its last logit: callers use it only where that is still inside the
// tensor (another row follows, see score_kernel).
template <typename scalar_t>
constexpr bool kCanGather =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;
#else
    false;
#endif

#if defined(CPU_CAPABILITY_AVX512)
using GatherIdx = __m512i;
inline GatherIdx gather_lanes(int64_t first, int64_t stride) {  // first + lane * stride
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)),
                          _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(static_cast<int>(stride))));
}
template <typename scalar_t>
inline Vec<float> gather_acc(const scalar_t* base, GatherIdx idx) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec<float>(_mm512_i32gather_ps(idx, base, 4));
  } else {
    const __m512i w = _mm512_i32gather_epi32(idx, base, 2);
    return Vec<float>(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
using GatherIdx = __m256i;
inline GatherIdx gather_lanes(int64_t first, int64_t stride) {
  return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)),
                          _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm256_set1_epi32(static_cast<int>(stride))));
}
template <typename scalar_t>
inline Vec<float> gather_acc(const scalar_t* base, GatherIdx idx) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec<float>(_mm256_i32gather_ps(reinterpret_cast<const float*>(base), idx, 4));
  } else {
    const __m256i w = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 2);
    return Vec<float>(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Columns [0, 16) of one row widened to fp32, the lanes outside mask k zero (and never read).
template <typename scalar_t>
inline __m512 load16_acc(const scalar_t* p, __mmask16 k) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "unsupported logits dtype");
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
}

// In-register transpose of a 16 x 16 fp32 block (a[i] = row i in, column i out): pairs of rows
// interleaved, then 4 x 4 blocks within each 128-bit lane, then the lanes themselves.
RHO_HOT void transpose16(__m512 (&a)[16]) {
  __m512 b[16], c[16];
  for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    c[i] = _mm512_shuffle_ps(b[i], b[i + 2], 0x44);
    c[i + 1] = _mm512_shuffle_ps(b[i], b[i + 2], 0xEE);
    c[i + 2] = _mm512_shuffle_ps(b[i + 1], b[i + 3], 0x44);
    c[i + 3] = _mm512_shuffle_ps(b[i + 1], b[i + 3], 0xEE);
  }
  // c[4q + j], 128-bit lane l: column 4l + j of rows 4q .. 4q+3.
  for (int j = 0; j < 4; ++j) {
    const __m512 d0 = _mm512_shuffle_f32x4(c[j], c[4 + j], 0x88);
    const __m512 d1 = _mm512_shuffle_f32x4(c[j], c[4 + j], 0xDD);
    const __m512 d2 = _mm512_shuffle_f32x4(c[8 + j], c[12 + j], 0x88);
    const __m512 d3 = _mm512_shuffle_f32x4(c[8 + j], c[12 + j], 0xDD);
    a[j] = _mm512_shuffle_f32x4(d0, d2, 0x88);
    a[4 + j] = _mm512_shuffle_f32x4(d1, d3, 0x88);
    a[8 + j] = _mm512_shuffle_f32x4(d0, d2, 0xDD);
    a[12 + j] = _mm512_shuffle_f32x4(d1, d3, 0xDD);
  }
}
#endif

// How a tile's pass 2 prefetches what the next loads need (tile_acc).
enum PrefetchRule : int { kPrefetchNone, kPrefetchColumns, kPrefetchSpread, kPrefetchLines };

// What a tile knows of its rows before the logits are read (lanes >= g: an all -inf row with
// no target, never written out).
template <typename scalar_t, int64_t R>
struct TileRows {
  using A = acc_t<scalar_t>;
  const scalar_t* row[R];
  __at_align__ A tf[R];  // target column as a value (exact: V < 2^24); -1 ignored, -2 out of range
  __at_align__ A zy[R];  // the target's logit (column 0's where there is no target column)
};

// The running sums of a tile, one row per lane (rho::RowAcc's fields as vectors).
template <typename A>
struct TileSums {
  Vec<A> m[kTileVecs], d[kTileVecs], t[kTileVecs], dx[kTileVecs], s2[kTileVecs];
  RHO_HOT TileSums() {}  // (Vec's constructor is not trivial: the implicit one can be left out of line)
};

// The accumulators of the g (<= kTileVecs * W) rows r0 .. r0+g-1, one row per SIMD lane, over
// the columns [cb, ce) (cb a multiple of kTileCols; cb = 0 starts the sums, ce >= V ends them:
// column-major groups of tiles take turns block by block, see score_kernel; other tiles pass
// the whole row, which the spread prefetch rule assumes).
// buf holds kTileVecs * W * kTileCols values.  `gather`: the rows are evenly spaced
// (p.stride0 apart), contiguous along V, and the tile may be loaded with gather_acc.
// Per lane this is the row path's rule: block max m_b, new max m' = max(m, m_b), running sums
// rescaled by exp(m - m') (acc_rescale), block sums relative to m' added (two-level sum).
// A lane whose max is still -inf shifts against 0 instead, so its sums stay exactly 0 (all its
// logits are -inf); a lane with a NaN or +inf max carries unused sums (its lse is decided by m).
template <typename scalar_t, int M>
void tile_acc(const Problem& p, int64_t r0, int64_t g, bool gather, const TileRows<scalar_t, kTileVecs * Vec<acc_t<scalar_t>>::size()>& tr,
              acc_t<scalar_t>* buf, TileSums<acc_t<scalar_t>>& s, int64_t cb, int64_t ce) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr int U = kTileVecs;
  constexpr int64_t R = U * W;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  constexpr bool kEnt = rho::needs_entropy_sum(M);
  constexpr bool kGrad = rho::needs_gradnorm_sums(M);
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t nv = p.num_classes, sv = p.stride_v;
  // Column-major [N, V]: column j of the tile is the g consecutive values at r0 + j * sv.
  const bool col_contig = p.rank == 2 && p.stride0 == 1;

  V vt[U];
  V (&m)[U] = s.m;
  V (&d)[U] = s.d;
  V (&t)[U] = s.t;
  V (&dx)[U] = s.dx;
  V (&s2)[U] = s.s2;
  for (int u = 0; u < U; ++u) {
    vt[u] = V::loadu(tr.tf + u * W);
    if (cb == 0) {
      m[u] = V(kNegInf);
      d[u] = t[u] = dx[u] = s2[u] = V(A(0));
    }
  }
  const V vzero(A(0)), vninf(kNegInf), vlowest(std::numeric_limits<A>::lowest());
  // Pass 2 reads L1 only, so the memory would idle through it: for evenly spaced rows (one
  // contiguous span per tile) it prefetches the next tile's span, a few lines per step, so that
  // the next tile's loads find it in cache; for column-major logits, whose columns the hardware
  // prefetcher cannot follow, the next column block of these rows.  (Prefetches never fault.)
  const bool pf = p.rank == 2 && sv == 1 && p.stride0 >= nv;
  const uintptr_t next = reinterpret_cast<uintptr_t>(logits) + static_cast<uintptr_t>((r0 + R) * p.stride0) * sizeof(scalar_t);
  const int64_t pf_lines = pf ? (R * p.stride0 * static_cast<int64_t>(sizeof(scalar_t)) + 63) / 64 : 0;
  const int64_t pf_steps = nv * U;
  // Lines per step, rounded up (fp32 and bf16: at most one); 0 = no prefetch.
  const int64_t pf_step = (pf_lines + pf_steps - 1) / pf_steps;
  const int pf_rule = col_contig ? kPrefetchColumns
                      : pf_step == 1 ? kPrefetchSpread
                      : pf_step > 1  ? kPrefetchLines
                                     : kPrefetchNone;
  int64_t pf_line = 0, pf_rem = 0;  // the spread rule's position: line = floor(step * pf_lines / pf_steps)

  for (int64_t c0 = cb; c0 < std::min(ce, nv); c0 += kTileCols) {
    const int64_t n = std::min(kTileCols, nv - c0);
    // Gather (and widen) the block, transposed: buf[c * R + i] = row i, column c0 + c.
    bool filled = false;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<A, float>) {
      if (sv == 1 && nv >= kTransposeMinV) {
        // Rows contiguous along V: 16 x 16 blocks read row by row (masked at the block's ragged
        // end) and transposed in registers -- 4 shuffles per 16 logits, where a hardware gather
        // costs 16 loads.  Idle lanes (rows >= g) read -inf.
        for (int u = 0; u < U; ++u) {
          for (int64_t c = 0; c < n; c += 16) {
            const int64_t m = std::min<int64_t>(16, n - c);
            const __mmask16 k = static_cast<__mmask16>((1u << m) - 1u);
            __m512 a[16];
            for (int i = 0; i < 16; ++i) {
              const int64_t r = u * 16 + i;
              a[i] = r < g ? load16_acc(tr.row[r] + c0 + c, k) : _mm512_set1_ps(kNegInf);
            }
            transpose16(a);
            for (int64_t j = 0; j < m; ++j) _mm512_storeu_ps(buf + (c + j) * R + u * 16, a[j]);
          }
        }
        filled = true;
      }
    }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (kCanGather<scalar_t>) {
      if (gather && !filled) {
        GatherIdx idx[U];
        for (int u = 0; u < U; ++u) idx[u] = gather_lanes(u * W * p.stride0, p.stride0);
        const scalar_t* base = tr.row[0] + c0;
        for (int64_t c = 0; c < n; ++c) {
          for (int u = 0; u < U; ++u) gather_acc(base + c, idx[u]).store(buf + c * R + u * W);
        }
        filled = true;
      }
    }
#endif
    if (!filled) {
      if (col_contig) {
        for (int64_t c = 0; c < n; ++c) {
          const scalar_t* col = logits + r0 + (c0 + c) * sv;
          A* b = buf + c * R;
          for (int64_t i = 0; i < g; ++i) b[i] = to_acc(col[i]);
        }
      } else {
        for (int64_t i = 0; i < g; ++i) {
          const scalar_t* q = tr.row[i] + c0 * sv;
          for (int64_t c = 0; c < n; ++c) buf[c * R + i] = to_acc(q[c * sv]);
        }
      }
      if (g < R) {  // idle lanes read -inf: an all -inf row, whose result is never used
        for (int64_t c = 0; c < n; ++c) {
          for (int64_t i = g; i < R; ++i) buf[c * R + i] = kNegInf;
        }
      }
    }

    // Pass 1: block max per lane (max_plain: a NaN may be passed over; it shows in d, which is
    // NaN from then on), new running max, rescale of the sums.
    V mx[U];
    for (int u = 0; u < U; ++u) mx[u] = vninf;
    for (int64_t c = 0; c < n; ++c) {
      for (int u = 0; u < U; ++u) mx[u] = max_plain(mx[u], V::loadu(buf + c * R + u * W));
    }
    V ref[U];  // what the block's logits are shifted by
    for (int u = 0; u < U; ++u) {
      const V mnew = at::vec::maximum(m[u], mx[u]);
      ref[u] = V::blendv(mnew, vzero, mnew == vninf);
      if (c0 > 0) {
        const V shift = at::vec::clamp_min(m[u] - ref[u], vlowest);  // <= 0; -inf (empty) -> lowest
        const V alpha = exp_nonpos<A>(shift);
        // alpha == 0: the old terms vanish; not alpha * (...), where shift * d may be -inf.
        if constexpr (kEnt) t[u] = V::blendv(alpha * at::vec::fmadd(shift, d[u], t[u]), vzero, alpha == vzero);
        d[u] = alpha * d[u];
        if constexpr (kGrad) {
          dx[u] = alpha * dx[u];
          s2[u] = alpha * alpha * s2[u];
        }
      }
      m[u] = mnew;
    }

    // Pass 2: the block's sums relative to the new max, then added to the running sums.  The
    // prefetch rule is a template argument so that each loop is branch-free and the compiler
    // keeps the U chains in registers.
    V bd[U], bt[U], bdx[U], bs2[U];
    for (int u = 0; u < U; ++u) bd[u] = bt[u] = bdx[u] = bs2[u] = vzero;
    auto pass2 = [&](auto rule) {
      constexpr int kRule = decltype(rule)::value;
      for (int64_t c = 0; c < n; ++c) {
        const V col(static_cast<A>(c0 + c));
        for (int u = 0; u < U; ++u) {
          if constexpr (kRule == kPrefetchColumns) {  // column-major: these rows of the next column block
            const uintptr_t at = reinterpret_cast<uintptr_t>(logits) +
                                 static_cast<uintptr_t>(r0 + u * W + (c0 + kTileCols + c) * sv) * sizeof(scalar_t);
            __builtin_prefetch(reinterpret_cast<const char*>(at), 0, 3);
          } else if constexpr (kRule == kPrefetchSpread) {
            // Step i fetches line floor(i * pf_lines / pf_steps) (each line once or twice), kept
            // as a running quotient and remainder: a division per step cost ~15% of the tile.
            __builtin_prefetch(reinterpret_cast<const char*>(next + static_cast<uintptr_t>(pf_line) * 64), 0, 3);
            pf_rem += pf_lines;
            const bool carry = pf_rem >= pf_steps;
            pf_line += carry;
            pf_rem -= carry ? pf_steps : 0;
          } else if constexpr (kRule == kPrefetchLines) {  // several lines per step (fp64)
            for (int64_t l = 0; l < pf_step; ++l) {
              __builtin_prefetch(reinterpret_cast<const char*>(next + static_cast<uintptr_t>(pf_line + l) * 64), 0, 3);
            }
            pf_line += pf_step;
          }
          const V shifted = V::loadu(buf + c * R + u * W) - ref[u];
          const V e = exp_nonpos<A>(shifted);
          bd[u] = bd[u] + e;
          if constexpr (kEnt) bt[u] = at::vec::fmadd(e, at::vec::clamp_min(shifted, vlowest), bt[u]);
          if constexpr (kGrad) {
            const V ex = V::blendv(e, vzero, vt[u] == col);  // every column but the target's
            bdx[u] = bdx[u] + ex;
            bs2[u] = at::vec::fmadd(ex, ex, bs2[u]);
          }
        }
      }
    };
    switch (pf_rule) {
      case kPrefetchColumns:
        pass2(std::integral_constant<int, kPrefetchColumns>{});
        break;
      case kPrefetchSpread:
        pass2(std::integral_constant<int, kPrefetchSpread>{});
        break;
      case kPrefetchLines:
        pass2(std::integral_constant<int, kPrefetchLines>{});
        break;
      default:
        pass2(std::integral_constant<int, kPrefetchNone>{});
    }
    for (int u = 0; u < U; ++u) {
      d[u] = d[u] + bd[u];
      if constexpr (kEnt) t[u] = t[u] + bt[u];
      if constexpr (kGrad) {
        dx[u] = dx[u] + bdx[u];
        s2[u] = s2[u] + bs2[u];
      }
    }
  }

  if (ce < nv) return;
  // NaN rows from the sums (pass 1's max_plain may have passed over a NaN; exp_nonpos did not,
  // and a NaN in d stays).  A +inf max makes d NaN by itself (inf - inf): those rows, rare, are
  // looked at exactly.
  const V vpinf(-kNegInf), vnan(std::numeric_limits<A>::quiet_NaN());
  for (int u = 0; u < U; ++u) {
    const V m0 = m[u];
    const V is_inf = m0 == vpinf;
    m[u] = V::blendv(V::blendv(m0, vnan, d[u].isnan()), m0, is_inf);
    if (is_inf.zero_mask() != (1 << W) - 1) {
      __at_align__ A lanes[W];
      m[u].store(lanes);
      for (int64_t i = 0; i < W && u * W + i < g; ++i) {
        if (lanes[i] == -kNegInf && has_nan(tr.row[u * W + i], nv, sv)) lanes[i] = std::numeric_limits<A>::quiet_NaN();
      }
      m[u] = V::loadu(lanes);
    }
  }
}

// The scores (lse, keys) of a tile's rows r0 .. r0+g-1 from its sums, a vector of rows at a time:
// rho::finalize_lse / finalize_score's rules written with lane masks.  In the accumulation type:
// log d has ~1 ulp (on log d <= log V), CE = (m - z_y) + log d two more roundings -- the
// reference's own order of error.  A lane with a finite max has d >= 1 (its max term is 1).
template <typename scalar_t, int M>
void tile_finish(int64_t r0, int64_t g, const float* il, const TileRows<scalar_t, kTileVecs * Vec<acc_t<scalar_t>>::size()>& tr,
                 const TileSums<acc_t<scalar_t>>& s, const Outputs& out) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const V vzero(A(0)), vone(A(1)), vnan(std::numeric_limits<A>::quiet_NaN());
  __at_align__ A sc[kTileVecs * W];
  A* lse = static_cast<A*>(out.lse);
  for (int u = 0; u < kTileVecs && u * W < g; ++u) {
    const int64_t cnt = std::min<int64_t>(W, g - u * W);
    const V m = s.m[u], d = s.d[u];
    const V fin = m.abs() < V(kInf);                         // the max is finite (not NaN, not +-inf)
    const V logd = log_ge1(V::blendv(vone, d, fin)) & fin;    // log d; 0 where the max is not finite
    if (lse != nullptr) (m + logd).store(lse + r0 + u * W, cnt);  // NaN / +-inf max: lse = m
    V v;
    if constexpr (M == rho::kReducible || M == rho::kLoss) {
      // Finite max: (m - z_y) + log d.  Else m - z_y = lse - z_y (IEEE: +inf - +inf = NaN, ...).
      v = (m - V::loadu(tr.zy + u * W)) + logd;
      if constexpr (M == rho::kReducible) {
        if constexpr (std::is_same_v<A, float>) {
          v = v - V::loadu(il + r0 + u * W, cnt);
        } else {
          __at_align__ A w[W];
          for (int64_t i = 0; i < cnt; ++i) w[i] = static_cast<A>(il[r0 + u * W + i]);
          v = v - V::loadu(w);
        }
      }
    } else if constexpr (M == rho::kGradNorm) {
      const V q = s.dx[u] / d;
      v = V::blendv(vnan, (s.s2[u] / (d * d) + q * q).sqrt(), fin);
    } else if constexpr (M == rho::kEntropy) {
      v = V::blendv(vnan, logd - s.t[u] / d, fin);
    } else {
      v = vnan;  // kIrreducible never reaches the tile path (it reads no logits)
    }
    // No target column: -inf where ignored (tf = -1), NaN where out of range (tf = -2).
    const V tf = V::loadu(tr.tf + u * W);
    v = V::blendv(V::blendv(vnan, V(-kInf), tf == V(A(-1))), v, tf >= vzero);
    if constexpr (std::is_same_v<A, float>) {
      v.store(out.score + r0 + u * W, cnt);
    } else {
      v.store(sc + u * W);
      for (int64_t i = 0; i < cnt; ++i) out.score[r0 + u * W + i] = static_cast<float>(sc[u * W + i]);
    }
  }
  if (out.keys != nullptr) {
    for (int64_t i = 0; i < g; ++i) {
      const float sv = out.score[r0 + i];
      out.keys[r0 + i] = rho::select_key(sv, tr.tf[i] >= A(0) && sv == sv, static_cast<uint32_t>(r0 + i));
    }
  }
}

// Per-row epilogue of the row paths: finalise in double (one rounding to the fp32 score), write
// score, lse and key.  `zy` is the target's logit (z'; read only for an in-range target).
template <int M, typename A>
RHO_HOT void finish_row(const Problem& p, const Outputs& out, int64_t r, const RowAcc<A>& acc, int ts, double zy) {
  const bool finite_max = acc.m == acc.m && acc.m != std::numeric_limits<A>::infinity() &&
                          acc.m != -std::numeric_limits<A>::infinity();
  const double log_d = rho::needs_logits(M) && finite_max ? std::log(static_cast<double>(acc.d)) : 0.0;
  const RowAcc<double> a{static_cast<double>(acc.m), static_cast<double>(acc.d), static_cast<double>(acc.t),
                         static_cast<double>(acc.dx), static_cast<double>(acc.s2x)};
  const double l = rho::needs_logits(M) ? rho::finalize_lse_from_log(a, log_d) : rho::quiet_nan<double>();
  const double il = p.il != nullptr ? static_cast<double>(p.il[r]) : 0.0;
  const float s = static_cast<float>(rho::finalize_score_from_log<double>(M, a, l, zy, il, ts, log_d));
  out.score[r] = s;
  if (out.lse != nullptr) static_cast<A*>(out.lse)[r] = static_cast<A>(l);
  if (out.keys != nullptr) out.keys[r] = rho::select_key(s, rho::is_eligible(s, ts), static_cast<uint32_t>(r));
}

// Rows per thread task and the number of V pieces per row on the row paths: few rows with a long
// vocabulary are split along V (block-aligned pieces, merged afterwards); 1 = no split.
inline int64_t row_splits(const Problem& p) {
  const int64_t nthreads = at::get_num_threads(), N = p.num_rows;
  const int64_t nsplit = std::min<int64_t>(p.num_classes / kMinSplit, (4 * nthreads + N - 1) / std::max<int64_t>(N, 1));
  return (nthreads <= 1 || N >= 4 * nthreads || nsplit < 2) ? 1 : nsplit;
}

// Runs f(task, r, j0, j1) in parallel for the nsplit block-aligned pieces [j0, j1) of every row
// (task = r * nsplit + the piece's index; empty pieces are skipped).
template <typename F>
void for_row_pieces(const Problem& p, int64_t nsplit, const F& f) {
  const int64_t nv = p.num_classes;
  int64_t piece = (nv + nsplit - 1) / nsplit;
  piece = (piece + kBlock - 1) / kBlock * kBlock;
  parallel_chunks(p.num_rows * nsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / nsplit, j0 = (task % nsplit) * piece, j1 = std::min(nv, j0 + piece);
      if (j0 < j1) f(task, r, j0, j1);
    }
  });
}

// Score (and optionally lse, select keys) of every row.
template <typename scalar_t, int M>
void score_kernel(const Problem& p, const Outputs& out) {
  using A = acc_t<scalar_t>;
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t N = p.num_rows, nv = p.num_classes;

  auto finish = [&](int64_t r, const RowAcc<A>& acc, int ts) {
    double zy = 0.0;
    if (rho::needs_logits(M) && ts == rho::kTargetOk) {
      zy = static_cast<double>(to_acc(logits[row_offset(p, r) + p.targets[r] * p.stride_v]));
    }
    finish_row<M>(p, out, r, acc, ts, zy);
  };
  auto state = [&](int64_t r) { return rho::target_state(p.targets[r], nv, p.ignore_index); };
  auto reads = [&](int ts) { return rho::needs_logits(M) && (out.read_ineligible || ts == rho::kTargetOk); };

  if (!rho::needs_logits(M)) {
    parallel_chunks(N, kChunkElems, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) finish(r, rho::acc_empty<A>(), state(r));
    });
    return;
  }

  // Tile path: short contiguous rows, and strided columns (V < 2^24 keeps column ids exact).
  if ((p.stride_v != 1 || nv < kTileMaxV) && nv < (int64_t(1) << 24)) {
    constexpr int64_t R = kTileVecs * Vec<A>::size();
    const int64_t ntiles = (N + R - 1) / R;
    // Column-major logits with several column blocks: `group` tiles take turns block by block,
    // so that each visit to a column reads a page of consecutive logits (kColGroupBytes).  One
    // R-row tile alone reads 256 bytes (fp32) from each page, and the TLB misses then cost more
    // than the reads: [8192, 32000] fp32 took 1.7-1.95x the time of row-major logits, 1.15-1.5x now.
    constexpr int64_t kGroupTiles = std::max<int64_t>(1, kColGroupBytes / (R * static_cast<int64_t>(sizeof(scalar_t))));
    // Smaller groups where a page's worth would leave fewer than 4 groups per thread: the groups
    // are handed out whole, and with 2 threads on 4 groups one slow thread makes it 3 to 1.
    const int64_t group = p.rank == 2 && p.stride0 == 1 && nv > kTileCols
                              ? std::max<int64_t>(1, std::min<int64_t>(kGroupTiles, ntiles / (4 * at::get_num_threads())))
                              : 1;
    const int64_t grain = (std::max<int64_t>(1, kChunkElems / (R * nv)) + group - 1) / group * group;
    // Columns a tile takes per turn: one block in a group, else the whole row in one call (which
    // the spread prefetch rule needs).
    const int64_t span = group == 1 ? nv : kTileCols;
    // Hardware gathers for evenly spaced rows along contiguous V, with 32-bit lane offsets.  A
    // bf16 gather reads 2 bytes past its logit: only in tiles followed by another row that
    // starts after this row's end (stride0 >= V), so those bytes belong to the tensor.
    const bool gatherable = kCanGather<scalar_t> && p.rank == 2 && p.stride_v == 1 && p.stride0 >= nv &&
                            R * p.stride0 + nv < (int64_t(1) << 31);
    const bool tail_ok = sizeof(scalar_t) == 4;  // the last row may be gathered (no over-read)
    const int64_t* targets = p.targets;
    const int64_t ignore_index = p.ignore_index, stride0 = p.stride0, sv = p.stride_v;
    const bool rank2 = p.rank == 2;
    // What tile `tile` knows before its logits are read; returns whether it may be gathered.
    auto setup = [&](int64_t tile, TileRows<scalar_t, R>& tr) {
      const int64_t r0 = tile * R, g = std::min(R, N - r0);
      // Branch-free, with the loop invariants in locals (the stores into tr may alias p).
      for (int64_t i = 0; i < g; ++i) {
        const int64_t r = r0 + i, y = targets[r];
        const bool ign = y == ignore_index;
        const bool ok = !ign && static_cast<uint64_t>(y) < static_cast<uint64_t>(nv);
        const scalar_t* row = logits + (rank2 ? r * stride0 : row_offset(p, r));
        tr.row[i] = row;
        tr.tf[i] = ok ? static_cast<A>(y) : (ign ? A(-1) : A(-2));
        tr.zy[i] = to_acc(row[(ok ? y : 0) * sv]);
      }
      for (int64_t i = g; i < R; ++i) {
        tr.row[i] = nullptr;
        tr.tf[i] = A(-2);
        tr.zy[i] = A(0);
      }
      return gatherable && g == R && (tail_ok || r0 + R < N);
    };
    parallel_chunks(ntiles, grain, [&](int64_t begin, int64_t end) {
      __at_align__ A buf[R * kTileCols];
      // On the heap: a group's state is tens of KiB.
      std::unique_ptr<TileRows<scalar_t, R>[]> tr(new TileRows<scalar_t, R>[static_cast<size_t>(group)]);
      std::unique_ptr<TileSums<A>[]> sums(new TileSums<A>[static_cast<size_t>(group)]);
      bool gather[kGroupTiles];
      for (int64_t first = begin; first < end; first += group) {
        const int64_t count = std::min(group, end - first);
        for (int64_t j = 0; j < count; ++j) gather[j] = setup(first + j, tr[j]);
        for (int64_t c0 = 0; c0 < nv; c0 += span) {
          for (int64_t j = 0; j < count; ++j) {
            const int64_t r0 = (first + j) * R;
            tile_acc<scalar_t, M>(p, r0, std::min(R, N - r0), gather[j], tr[j], buf, sums[j], c0, c0 + span);
          }
        }
        for (int64_t j = 0; j < count; ++j) {
          const int64_t r0 = (first + j) * R;
          tile_finish<scalar_t, M>(r0, std::min(R, N - r0), p.il, tr[j], sums[j], out);
        }
      }
    });
    return;
  }

  const int64_t nsplit = row_splits(p);
  if (nsplit == 1) {
    const int64_t grain = std::max<int64_t>(1, kChunkElems / nv);
    parallel_chunks(N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int ts = state(r);
        RowAcc<A> acc = rho::acc_empty<A>();
        if (reads(ts)) {
          const int64_t tgt = ts == rho::kTargetOk ? p.targets[r] : -1;
          acc = range_acc<scalar_t, M>(logits + row_offset(p, r), p.stride_v, 0, nv, tgt);
        }
        finish(r, acc, ts);
      }
    });
    return;
  }

  // Few rows, long vocabulary: split every row into nsplit pieces, then merge.
  const int64_t nparts = N * nsplit;
  RowAcc<A>* part = new RowAcc<A>[static_cast<size_t>(nparts)];
  for (int64_t i = 0; i < nparts; ++i) part[i] = rho::acc_empty<A>();
  for_row_pieces(p, nsplit, [&](int64_t task, int64_t r, int64_t j0, int64_t j1) {
    const int ts = state(r);
    if (!reads(ts)) return;
    const int64_t tgt = ts == rho::kTargetOk ? p.targets[r] : -1;
    part[task] = range_acc<scalar_t, M>(logits + row_offset(p, r), p.stride_v, j0, j1, tgt);
  });
  for (int64_t r = 0; r < N; ++r) {
    RowAcc<A> acc = rho::acc_empty<A>();
    for (int64_t s = 0; s < nsplit; ++s) acc = rho::acc_merge(acc, part[r * nsplit + s]);
    finish(r, acc, state(r));
  }
  delete[] part;
}

// score_kernel for transformed logits (and their zsum output): the row path alone (every layout,
// every V), each block widened into an L1 buffer, transformed there and reduced by the block
// kernel (range_acc_transformed, as the partials kernel does).  Its own specialisation, so the
// plain kernel above is the code it was.
template <typename scalar_t, int M, int kTransform>
void score_kernel_general(const Problem& p, const Outputs& out) {
  using A = acc_t<scalar_t>;
  struct StdExp {
    A operator()(A v) const { return std::exp(v); }
  };
  const auto ta = rho::transform_args<A>(p.softcap, p.logit_scale);
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t N = p.num_rows, nv = p.num_classes;
  A* zsum = static_cast<A*>(out.zsum);
  constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();
  auto state = [&](int64_t r) { return rho::target_state(p.targets[r], nv, p.ignore_index); };
  auto finish = [&](int64_t r, const RowAcc<A>& acc, int ts, A zs) {
    double zy = 0.0;
    if (rho::needs_logits(M) && ts == rho::kTargetOk) {
      zy = static_cast<double>(rho::transform_logit<kTransform>(
          to_acc(logits[row_offset(p, r) + p.targets[r] * p.stride_v]), ta, StdExp{}));
    }
    finish_row<M>(p, out, r, acc, ts, zy);
    if (zsum != nullptr) zsum[r] = zs;
  };
  auto reads = [&](int ts) { return rho::needs_logits(M) && (out.read_ineligible || ts == rho::kTargetOk); };

  const int64_t nsplit = rho::needs_logits(M) ? row_splits(p) : 1;
  if (nsplit == 1) {
    parallel_chunks(N, std::max<int64_t>(1, kChunkElems / nv), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int ts = state(r);
        RowAcc<A> acc = rho::acc_empty<A>();
        A zs = kNaN;  // irreducible reads no logit; a skipped row's sum is never asked for
        if (reads(ts)) {
          const int64_t tgt = ts == rho::kTargetOk ? p.targets[r] : -1;
          acc = range_acc_transformed<scalar_t, M, kTransform>(logits + row_offset(p, r), p.stride_v, 0, nv, tgt,
                                                               ta, zsum != nullptr ? &zs : nullptr);
        }
        finish(r, acc, ts, zs);
      }
    });
    return;
  }
  // Few rows, long vocabulary: pieces of every row, merged (zsum by addition).
  const int64_t nparts = N * nsplit;
  std::unique_ptr<RowAcc<A>[]> part(new RowAcc<A>[static_cast<size_t>(nparts)]);
  std::unique_ptr<A[]> part_zs(new A[static_cast<size_t>(nparts)]);
  for (int64_t i = 0; i < nparts; ++i) {
    part[i] = rho::acc_empty<A>();
    part_zs[i] = A(0);
  }
  for_row_pieces(p, nsplit, [&](int64_t task, int64_t r, int64_t j0, int64_t j1) {
    const int ts = state(r);
    if (!reads(ts)) return;
    const int64_t tgt = ts == rho::kTargetOk ? p.targets[r] : -1;
    part[task] = range_acc_transformed<scalar_t, M, kTransform>(logits + row_offset(p, r), p.stride_v, j0, j1, tgt,
                                                                ta, zsum != nullptr ? &part_zs[task] : nullptr);
  });
  for (int64_t r = 0; r < N; ++r) {
    RowAcc<A> acc = rho::acc_empty<A>();
    A zs = A(0);
    for (int64_t s = 0; s < nsplit; ++s) {
      fold_block(acc, part[r * nsplit + s]);
      zs += part_zs[r * nsplit + s];
    }
    const int ts = state(r);
    finish(r, acc, ts, reads(ts) ? zs : kNaN);
  }
}

// sum_j z_j of every row of plain logits (NaN for irreducible), apart from the plain kernel so
// that asking for it leaves the scores' bits (and so the selection) as they are without it.
template <typename scalar_t>
void zsum_kernel(const Problem& p, acc_t<scalar_t>* zsum) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t nv = p.num_classes, sv = p.stride_v;
  if (!rho::needs_logits(p.method)) {
    for (int64_t r = 0; r < p.num_rows; ++r) zsum[r] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  parallel_chunks(p.num_rows, std::max<int64_t>(1, kChunkElems / nv), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = logits + row_offset(p, r);
      V s0(A(0)), s1(A(0));
      int64_t j = 0;
      if (sv == 1) {
        for (; j + 2 * W <= nv; j += 2 * W) {
          V x0, x1;
          load_pair(row + j, x0, x1);
          s0 = s0 + x0;
          s1 = s1 + x1;
        }
      }
      A tail = A(0);
      for (; j < nv; ++j) tail += to_acc(row[j * sv]);
      zsum[r] = hsum(s0 + s1) + tail;
    }
  });
}

// Calls f(std::integral_constant<int, method>{}) for p.method (select_cpu.cpp has rejected others).
template <typename F>
void with_method(int method, const F& f) {
  switch (method) {
    case rho::kReducible:
      return f(std::integral_constant<int, rho::kReducible>{});
    case rho::kLoss:
      return f(std::integral_constant<int, rho::kLoss>{});
    case rho::kIrreducible:
      return f(std::integral_constant<int, rho::kIrreducible>{});
    case rho::kGradNorm:
      return f(std::integral_constant<int, rho::kGradNorm>{});
    case rho::kEntropy:
      return f(std::integral_constant<int, rho::kEntropy>{});
    default:
      return;
  }
}

template <typename scalar_t>
void score_dispatch(const Problem& p, const Outputs& out) {
  with_method(p.method, [&](auto m) {
    constexpr int M = decltype(m)::value;
    switch (p.transform) {
      case rho::kSoftcap:
        return score_kernel_general<scalar_t, M, rho::kSoftcap>(p, out);
      case rho::kScaleOnly:
        return score_kernel_general<scalar_t, M, rho::kScaleOnly>(p, out);
      default:
        score_kernel<scalar_t, M>(p, out);
        if (out.zsum != nullptr) zsum_kernel<scalar_t>(p, static_cast<acc_t<scalar_t>*>(out.zsum));
    }
  });
}

// Partials of a vocabulary slice (score_cpu.h: Partials): the row path's range_acc per row, folded
// into the partials of the slices before with the block fold's rule.  The linear ops call it on
// [rows, width] tiles of hidden @ weight.T, so that the head's weight is read once per row block.
template <typename scalar_t, int M, int kTransform>
void partials_kernel(const Problem& p, const Partials& io) {
  using A = acc_t<scalar_t>;
  const auto ta = rho::transform_args<A>(io.softcap, io.logit_scale);
  struct StdExp {
    A operator()(A v) const { return std::exp(v); }
  };
  const scalar_t* logits = static_cast<const scalar_t*>(p.logits);
  const A* in = static_cast<const A*>(io.in);
  A* out = static_cast<A*>(io.out);
  const int64_t nv = p.num_classes, v0 = io.vocab_start;
  parallel_chunks(p.num_rows, std::max<int64_t>(1, kChunkElems / nv), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = p.targets[r];
      // The target's column in this slice, or -1 (ignored, or a class of another slice).
      const int64_t col = (y != p.ignore_index && y >= v0 && y - v0 < nv) ? y - v0 : int64_t(-1);
      RowAcc<A> acc = rho::acc_empty<A>();
      A zy = A(0), owned = A(0), zsum = A(0);
      if (in != nullptr) {
        const A* a = in + r * kNumPartials;
        acc = RowAcc<A>{a[0], a[1], a[2], a[3], a[4]};
        zy = a[5];
        owned = a[6];
        zsum = a[7];
      }
      const scalar_t* row = logits + row_offset(p, r);
      A zs = A(0);
      fold_block(acc, range_acc_transformed<scalar_t, M, kTransform>(row, p.stride_v, 0, nv, col, ta, &zs));
      zsum += zs;
      if (acc.m != acc.m) acc = RowAcc<A>{acc.m, A(0), A(0), A(0), A(0)};  // a NaN row's sums are never read
      if (col >= 0) {
        zy = rho::transform_logit<kTransform>(to_acc(row[col * p.stride_v]), ta, StdExp{});
        owned = A(1);
      }
      A* o = out + r * kNumPartials;
      o[0] = acc.m;
      o[1] = acc.d;
      o[2] = acc.t;
      o[3] = acc.dx;
      o[4] = acc.s2x;
      o[5] = zy;
      o[6] = owned;
      o[7] = zsum;
    }
  });
}

template <typename scalar_t, int kTransform>
void partials_dispatch_method(const Problem& p, const Partials& io) {
  switch (p.method) {
    case rho::kGradNorm:
      return partials_kernel<scalar_t, rho::kGradNorm, kTransform>(p, io);
    case rho::kEntropy:
      return partials_kernel<scalar_t, rho::kEntropy, kTransform>(p, io);
    default:
      return partials_kernel<scalar_t, rho::kLoss, kTransform>(p, io);  // the other methods' sums: d alone
  }
}

template <typename scalar_t>
void partials_dispatch(const Problem& p, const Partials& io) {
  switch (io.transform) {
    case rho::kSoftcap:
      return partials_dispatch_method<scalar_t, rho::kSoftcap>(p, io);
    case rho::kScaleOnly:
      return partials_dispatch_method<scalar_t, rho::kScaleOnly>(p, io);
    default:
      return partials_dispatch_method<scalar_t, rho::kNoTransform>(p, io);
  }
}

// f(scalar_t{}) for the logits' dtype: one switch for both entry points below.
template <typename F>
void with_logits_type(LogitsType dtype, const F& f) {
  switch (dtype) {
    case LogitsType::kFloat32:
      return f(float{});
    case LogitsType::kFloat64:
      return f(double{});
    case LogitsType::kBFloat16:
      return f(c10::BFloat16{});
    case LogitsType::kFloat16:
      return f(c10::Half{});
  }
}

}  // namespace

void RHO_PARTIAL_ROWS_FN(const Problem& p, const Partials& io) {
  with_logits_type(p.dtype, [&](auto tag) { partials_dispatch<decltype(tag)>(p, io); });
}

void RHO_SCORE_ROWS_FN(const Problem& p, const Outputs& out) {
  with_logits_type(p.dtype, [&](auto tag) { score_dispatch<decltype(tag)>(p, out); });
}

}  // namespace rho_cpu
