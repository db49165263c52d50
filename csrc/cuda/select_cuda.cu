// select_cuda.cu -- the "cuda" backend: fused per-row score (+ top-k) on the CUDA dispatch key.
//
// All per-row math comes from rho_math.h (RowAcc, acc_merge, finalize_lse, finalize_score,
// target_state, select_key), so this file only decides *how* rows are streamed and merged.
//
// Row geometry (chosen by V on the host, data-independent, so CUDA-graph safe):
//   * V <= kWarpRowMaxV : a group of G lanes per row, G = lanes_per_row(V, dtype) in 1..32 (about
//                         two 16-byte vectors per lane: short rows pack 32/G rows into a warp),
//                         segmented butterfly merges; rows are read whatever their target;
//   * larger V          : one 256-thread block per row (grid-stride), warp shuffles + smem merge;
//   * column-major logits (rows the contiguous axis, V-stride != 1), any V: tiles of 32 rows x
//     2048 columns with a lane per row, so that loads coalesce (rho_cols_*; row_scan.cuh).
// Each thread streams its share of the row with 16-byte vector loads when the row is contiguous
// (scalar head up to the first 16-byte boundary, vector body, scalar tail), otherwise strided
// scalar loads; it keeps one online RowAcc in fp32 (fp64 for fp64 logits) and rescales it once
// per chunk of loaded values, not once per element.
//
// Logit transform (softcap / logit_scale, rho::Transform): every row kernel is a template on the
// kind (none / scale / cap; irreducible reads no logits and has none); each value is transformed
// to z' in the accumulation type right after widening, so the target's z_y is z' too.  The
// transformed kernels also sum z' (score_rows' zsum output), merged by addition wherever the
// RowAccs merge; plain logits with zsum run the scale kernel with logit_scale = 1.  kNoTransform
// is the plain code, untouched.  fp64 with a transform skips the one-block select below (it would
// spill at 1024 threads) for the ticket path.
//
// Top-k (select_rows), never a full sort of N scores:
//   * tiny problems (N <= kFusedMaxRows, <= kFusedMaxBytes of logits): ONE launch -- one
//     1024-thread block scores every row into shared memory, radix-selects the k-th largest
//     uint64 key on chip (8 passes of 8 bits; keys are unique because they embed the row),
//     compacts the k winners and bitonic-sorts only those;
//   * N <= kFusedMaxRows with long rows: ONE kernel (after a 4-byte memset) -- the row kernel
//     runs on every SM, writes keys + scores to a workspace, and the last block to finish (an
//     atomic ticket after a threadfence) radix-selects over the n keys in L2 and sorts the
//     winners in shared memory (the only dynamic shared memory every block reserves);
//   * larger N, and column-major logits: the row kernel writes keys + scores to a workspace,
//     8 multi-block histogram passes find the k-th largest key (each block re-derives the
//     prefix from the previous histograms, so no host round trip), a gather kernel compacts the
//     k winners, and they are sorted on chip (k <= kSortOnChipMax) or by cub radix sort (only
//     k keys).
// No host synchronisation anywhere: sizes depend on N, V, k only (known on the host).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <stdint.h>

#include <atomic>
#include <climits>
#include <tuple>

#include "row_scan.cuh"
#include "rho_math.h"

namespace rho_cuda {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kRowThreads = 256;      // threads per block of the row kernels
constexpr int64_t kWarpRowMaxV = 4096;  // up to here a warp per row keeps every lane busy
constexpr int kFusedThreads = 1024;
constexpr int64_t kFusedMaxRows = 4096;           // keys + scores + winners fit in shared memory
constexpr int64_t kFusedMaxBytes = 256 * 1024;    // one SM streams this in a few microseconds
constexpr int64_t kSortOnChipMax = 4096;          // winners sorted in one block's shared memory
constexpr int kRadixPasses = 8;                   // 64-bit keys, 8-bit digits

// What a row kernel accumulates.  CE covers reducible and loss (same sums, different finalize).
enum Kind : int { kKindNone = 0, kKindCE = 1, kKindGrad = 2, kKindEnt = 3 };

__host__ __device__ constexpr int kind_method(int kind) {
  return kind == kKindGrad ? rho::kGradNorm : (kind == kKindEnt ? rho::kEntropy : rho::kLoss);
}


struct RowParams {
  const void* logits;
  int64_t n_rows;
  int64_t V;
  int64_t T;   // rows per leading index (rank 3: size(1); rank 2: 1)
  int64_t sb;  // stride of the leading index
  int64_t st;  // stride of the second index (rank 3 only)
  int64_t sv;  // stride along V
  const int64_t* targets;
  const float* il;  // nullptr when the method does not read it
  int method;
  int64_t ignore_index;
  int transform;  // rho::Transform: the row kernels' template argument (host dispatch only)
  rho::TransformArgs<float> targs_f;  // for fp32 accumulation
  rho::TransformArgs<double> targs_d;  // for fp64 (fp64 logits)
};

// The transform arguments in the accumulation type, computed once on the host.
template <typename acc_t>
__device__ __forceinline__ rho::TransformArgs<acc_t> transform_args_of(const RowParams& p) {
  if constexpr (sizeof(acc_t) == sizeof(double))
    return p.targs_d;
  else
    return p.targs_f;
}

struct SelOut {
  int64_t* idx;
  float* score;
  bool* valid;
};

struct RowOut {
  float* score;    // [N] or nullptr
  void* lse;       // [N] acc_t or nullptr
  uint64_t* key;   // [N] or nullptr
  bool skip_ineligible;  // select: rows with a bad/ignored target are not read (block-per-row only)
  // Top-k in the same launch (N <= kFusedMaxRows): the last block to finish selects.
  uint32_t* ticket;  // zeroed before the launch; nullptr = no selection tail
  uint32_t k;
  SelOut sel;
  void* zsum;  // [N] acc_t or nullptr: sum_j z'_j (transformed kernels only; score_rows)
};

template <typename acc_t>
struct RowResult {
  float score;
  acc_t lse;
  int tstate;
  acc_t zsum;  // sum of the row's z' (transformed kernels only)
};

template <typename acc_t, int kM>
__device__ __forceinline__ rho::RowAcc<acc_t> shfl_acc(const rho::RowAcc<acc_t>& a, int off) {
  rho::RowAcc<acc_t> b;
  b.m = __shfl_xor_sync(kFull, a.m, off);
  b.d = __shfl_xor_sync(kFull, a.d, off);
  b.t = rho::needs_entropy_sum(kM) ? __shfl_xor_sync(kFull, a.t, off) : acc_t(0);
  b.dx = rho::needs_gradnorm_sums(kM) ? __shfl_xor_sync(kFull, a.dx, off) : acc_t(0);
  b.s2x = rho::needs_gradnorm_sums(kM) ? __shfl_xor_sync(kFull, a.s2x, off) : acc_t(0);
  return b;
}

// Butterfly merge: every lane ends with the same (merge is symmetric) accumulator.
template <typename acc_t, int kM>
__device__ __forceinline__ rho::RowAcc<acc_t> warp_merge(rho::RowAcc<acc_t> a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) a = rho::acc_merge(a, shfl_acc<acc_t, kM>(a, off));
  return a;
}

// Butterfly over aligned groups of G lanes (G a power of two <= 32): xor offsets below G never
// leave the group, so each group ends with its own row's accumulator in every lane.  For G = 32
// this is warp_merge's exact sequence of merges.
template <typename acc_t, int kM>
__device__ __forceinline__ rho::RowAcc<acc_t> group_merge(rho::RowAcc<acc_t> a, int G) {
  for (int off = G / 2; off > 0; off >>= 1) a = rho::acc_merge(a, shfl_acc<acc_t, kM>(a, off));
  return a;
}

// The z' sums of a group (kSum), the same butterfly (a + b == b + a: every lane ends with the same
// bits).  Kernels without a sum shuffle nothing.
template <bool kSum, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t s, int G) {
  if constexpr (kSum) {
    for (int off = G / 2; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  }
  return s;
}

// Lanes that stream one row in the warp-row kernels: a power of two 1..32, from V and the
// element size only (never the data or the GPU), so that score_rows and every select path
// reduce a row in the same order.  About two 16-byte vectors per lane: short rows are packed
// several to a warp, so a warp has many independent loads in flight instead of a serial chain
// of one row's load, shuffles and exps.  Irreducible reads no logits: one lane per row.
template <typename scalar_t, int kKind>
__host__ __device__ __forceinline__ int lanes_per_row(int64_t V) {
  if (kKind == kKindNone) return 1;
  constexpr int64_t kPerLane = 2 * (16 / static_cast<int64_t>(sizeof(scalar_t)));
  int g = 1;
  while (g < kWarp && static_cast<int64_t>(g) * kPerLane < V) g <<= 1;
  return g;
}

// Score one row with a group of nt threads (the whole block: kBlock; see group_row_result).  Must be
// reached by every thread of the group; the result is valid in tid 0.  red_zs: the warps' z' sums
// (transformed kernels only).
template <typename scalar_t, int kKind, int kT, bool kBlock>
__device__ __forceinline__ RowResult<typename rho::AccOf<scalar_t>::type> row_result(
    const RowParams& p, int64_t row, bool skip_ineligible, int tid, int nt,
    rho::RowAcc<typename rho::AccOf<scalar_t>::type>* red, typename rho::AccOf<scalar_t>::type* red_zs) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  constexpr int kM = kind_method(kKind);
  constexpr bool kSum = kT != rho::kNoTransform;
  const int64_t y = p.targets[row];
  const int ts = rho::target_state(y, p.V, p.ignore_index);
  const acc_t il = p.il != nullptr ? static_cast<acc_t>(p.il[row]) : acc_t(0);
  rho::RowAcc<acc_t> a = rho::acc_empty<acc_t>();
  acc_t lse = rho::quiet_nan<acc_t>();
  acc_t zy = acc_t(0);
  acc_t zs = rho::quiet_nan<acc_t>();
  // The condition is uniform over the group (one row), so the barriers inside are safe.
  if (kKind != kKindNone && !(skip_ineligible && ts != rho::kTargetOk)) {
    const int64_t b = row / p.T;
    const int64_t t = row - b * p.T;
    const scalar_t* rp = static_cast<const scalar_t*>(p.logits) + b * p.sb + t * p.st;
    Zprime<acc_t, kT> zp{transform_args_of<acc_t>(p), acc_t(0)};
    a = scan_row<scalar_t, acc_t, kM>(rp, p.V, p.sv, ts == rho::kTargetOk ? y : int64_t(-1), tid, nt, nullptr, zp);
    a = warp_merge<acc_t, kM>(a);
    zs = group_sum<kSum>(zp.sum, kWarp);
    if (kBlock) {
      const int warp = tid / kWarp;
      const int lane = tid % kWarp;
      if (lane == 0) {
        red[warp] = a;
        if (kSum) red_zs[warp] = zs;
      }
      __syncthreads();
      if (warp == 0) {
        a = lane < nt / kWarp ? red[lane] : rho::acc_empty<acc_t>();
        a = warp_merge<acc_t, kM>(a);
        if (kSum) zs = group_sum<kSum>(lane < nt / kWarp ? red_zs[lane] : acc_t(0), kWarp);
      }
      __syncthreads();  // red[] is reused by the next row
    }
    lse = rho::finalize_lse(a);
    // Only an in-range target is ever read.
    if (kKind == kKindCE && ts == rho::kTargetOk && tid == 0) zy = zp.one(static_cast<acc_t>(rp[y * p.sv]));
  }
  const acc_t s = rho::finalize_score<acc_t>(p.method, a, lse, zy, il, ts);
  return RowResult<acc_t>{static_cast<float>(s), lse, ts, zs};
}

// Score row `row` with the G-lane group holding lane `lane` of the warp (warp-row kernels).
// Every lane of the warp must call it (the shuffles span the warp); a group past the last row
// passes active = false and reads nothing.  The row is read whatever its target: nothing
// waits on the target load, which is in flight together with the row's loads, and CE takes
// the target logit from the row's own loads (no dependent load after the row).  The result is
// valid in the group's first lane.  kSum: also the row's z' sum (kernels that may write zsum).
template <typename scalar_t, int kKind, int kT, bool kSum = kT != rho::kNoTransform>
__device__ __forceinline__ RowResult<typename rho::AccOf<scalar_t>::type> group_row_result(const RowParams& p,
                                                                                          int64_t row, bool active,
                                                                                          int lane, int G) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  constexpr int kM = kind_method(kKind);
  int64_t y = -1;
  acc_t il = acc_t(0);
  if (active) {
    y = p.targets[row];
    if (p.il != nullptr) il = static_cast<acc_t>(p.il[row]);
  }
  rho::RowAcc<acc_t> a = rho::acc_empty<acc_t>();
  acc_t lse = rho::quiet_nan<acc_t>();
  acc_t zy = acc_t(0);
  acc_t zs = rho::quiet_nan<acc_t>();
  if (kKind != kKindNone) {
    TargetPick<acc_t> pick{acc_t(0), false};
    Zprime<acc_t, kT, kSum> zp{transform_args_of<acc_t>(p), acc_t(0)};
    if (active) {
      const int64_t b = row / p.T;
      const int64_t t = row - b * p.T;
      const scalar_t* rp = static_cast<const scalar_t*>(p.logits) + b * p.sb + t * p.st;
      // The raw target, not "y if in range else -1": deciding that first would make the row's
      // loads wait for y.  An ignored target column inside [0, V) then counts as the target for
      // the gradnorm sums, which do not matter: an ignored row scores -inf whatever they are.
      a = scan_row<scalar_t, acc_t, kM>(rp, p.V, p.sv, y, lane & (G - 1), G,
                                        kKind == kKindCE ? &pick : nullptr, zp);
    }
    a = group_merge<acc_t, kM>(a, G);
    if (kSum) zs = group_sum<kSum>(zp.sum, G);
    if (kKind == kKindCE) {
      // Exactly one lane of the group read column y when 0 <= y < V; zy is not used otherwise.
      const unsigned found = __ballot_sync(kFull, pick.found);
      const int first = lane & ~(G - 1);
      const unsigned group_mask = G == kWarp ? kFull : (((1u << G) - 1u) << first);
      const unsigned mine = found & group_mask;
      zy = __shfl_sync(kFull, pick.z, mine != 0 ? __ffs(mine) - 1 : lane);
    }
    if (active) lse = rho::finalize_lse(a);
  }
  const int ts = active ? rho::target_state(y, p.V, p.ignore_index) : rho::kTargetOutOfRange;
  const acc_t s = rho::finalize_score<acc_t>(p.method, a, lse, zy, il, ts);
  return RowResult<acc_t>{static_cast<float>(s), lse, ts, zs};
}

template <typename acc_t>
__device__ __forceinline__ uint64_t result_key(const RowResult<acc_t>& r, int64_t row) {
  return rho::select_key(r.score, rho::is_eligible(r.score, r.tstate), static_cast<uint32_t>(row));
}

template <int kT, typename acc_t>
__device__ __forceinline__ void write_row(const RowOut& o, int64_t row, const RowResult<acc_t>& r) {
  if (o.score != nullptr) o.score[row] = r.score;
  if (o.lse != nullptr) static_cast<acc_t*>(o.lse)[row] = r.lse;
  if (o.key != nullptr) o.key[row] = result_key(r, row);
  if (kT != rho::kNoTransform && o.zsum != nullptr) static_cast<acc_t*>(o.zsum)[row] = r.zsum;
}

__host__ __device__ __forceinline__ int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Keys written by other blocks of the same launch are read from L2 (never a stale L1 line).
template <bool kGlobal>
__device__ __forceinline__ uint64_t load_key(const uint64_t* keys, int i) {
  if (kGlobal) return static_cast<uint64_t>(__ldcg(reinterpret_cast<const unsigned long long*>(keys) + i));
  return keys[i];
}

template <bool kGlobal>
__device__ uint64_t block_kth_largest(const uint64_t* keys, int n, uint32_t k, uint32_t* hist, uint32_t* bcast);
template <bool kGlobal>
__device__ void block_gather(const uint64_t* keys, int n, uint64_t kth, uint64_t* win, uint32_t* count);
__device__ void block_bitonic_desc(uint64_t* s, int P);
__device__ void write_pick(const SelOut& o, int64_t i, uint64_t key, const float* scores, bool scores_global);

// After a row kernel: the last block to finish (ticket) selects the top k of all n keys and
// writes the outputs, so small problems need one launch however long their rows are.
// Dynamic shared memory: winners[next_pow2(k)] only (<= 32 KiB), because every block of the
// launch reserves it; the last block reads the keys from L2 in each radix pass.
__device__ void select_tail(const RowOut& o, int64_t n) {
  extern __shared__ uint64_t tail_smem[];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t bcast[2];
  __shared__ uint32_t count;
  __shared__ bool last;
  __threadfence();  // this thread's key/score stores are visible device-wide before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    count = 0;
    last = atomicAdd(o.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int ni = static_cast<int>(n);
  const int P = static_cast<int>(next_pow2(o.k));
  uint64_t* win = tail_smem;
  const uint64_t kth = block_kth_largest<true>(o.key, ni, o.k, hist, bcast);
  block_gather<true>(o.key, ni, kth, win, &count);
  for (int i = static_cast<int>(o.k) + threadIdx.x; i < P; i += blockDim.x) win[i] = 0;
  __syncthreads();
  block_bitonic_desc(win, P);
  for (int i = threadIdx.x; i < static_cast<int>(o.k); i += blockDim.x) write_pick(o.sel, i, win[i], o.score, true);
}

// Blocks per SM the warp-row kernel is compiled for: 4 (64 registers), but fp64 with a transform
// needs more registers than that (ptxas spilled 40-80 bytes at 4 on sm_90).
template <typename scalar_t, int kT>
__host__ __device__ constexpr int warp_kernel_min_blocks() {
  return kT != rho::kNoTransform && sizeof(typename rho::AccOf<scalar_t>::type) == sizeof(double) ? 2 : 4;
}

// Rows of lanes_per_row lanes: each warp takes kWarp / G consecutive rows per step.
template <typename scalar_t, int kKind, int kT>
__global__ void __launch_bounds__(kRowThreads, warp_kernel_min_blocks<scalar_t, kT>())
    rho_rows_warp_kernel(RowParams p, RowOut o) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  const int G = lanes_per_row<scalar_t, kKind>(p.V);
  const int rows_per_warp = kWarp / G;
  const int64_t rows_per_block = static_cast<int64_t>(kRowThreads / kWarp) * rows_per_warp;
  const int lane = threadIdx.x % kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  // The loop bound is uniform over the warp (base), so every lane reaches the shuffles.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block +
                      static_cast<int64_t>(threadIdx.x / kWarp) * rows_per_warp;
       base < p.n_rows; base += step) {
    const int64_t row = base + lane / G;
    const bool active = row < p.n_rows;
    const RowResult<acc_t> r = group_row_result<scalar_t, kKind, kT>(p, row, active, lane, G);
    if (active && (lane & (G - 1)) == 0) write_row<kT>(o, row, r);
  }
  if (o.ticket != nullptr) select_tail(o, p.n_rows);
}

template <typename scalar_t, int kKind, int kT>
__global__ void __launch_bounds__(kRowThreads, 4) rho_rows_block_kernel(RowParams p, RowOut o) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  __shared__ rho::RowAcc<acc_t> red[kRowThreads / kWarp];
  __shared__ acc_t red_zs[kT == rho::kNoTransform ? 1 : kRowThreads / kWarp];  // unused when plain
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const RowResult<acc_t> r =
        row_result<scalar_t, kKind, kT, true>(p, row, o.skip_ineligible, threadIdx.x, kRowThreads, red, red_zs);
    if (threadIdx.x == 0) write_row<kT>(o, row, r);
  }
  if (o.ticket != nullptr) select_tail(o, p.n_rows);
}

// ---------------------------------------------------------------------------------------------
// Column-major logits: tiles of kTileRows rows x kTileChunk columns (see row_scan.cuh), rows as
// the fast axis so that loads coalesce.  Several splits of V: partial accumulators part[split][row]
// merged by rho_cols_final_kernel; one split: the tile kernel finishes its rows itself.  No
// selection tail here: select_rows takes its multi-kernel path for column-major logits.

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_ptr(const RowParams& p, int64_t row) {
  const int64_t b = row / p.T;
  const int64_t t = row - b * p.T;
  return static_cast<const scalar_t*>(p.logits) + b * p.sb + t * p.st;
}

template <typename scalar_t, int kKind, int kT>
__device__ __forceinline__ void finish_row(const RowParams& p, const RowOut& o, int64_t row,
                                           const rho::RowAcc<typename rho::AccOf<scalar_t>::type>& a,
                                           typename rho::AccOf<scalar_t>::type zs) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  const int64_t y = p.targets[row];
  const int ts = rho::target_state(y, p.V, p.ignore_index);
  const acc_t il = p.il != nullptr ? static_cast<acc_t>(p.il[row]) : acc_t(0);
  const acc_t lse = rho::finalize_lse(a);
  acc_t zy = acc_t(0);
  if (kKind == kKindCE && ts == rho::kTargetOk) {
    zy = rho::transform_logit<kT>(static_cast<acc_t>(row_ptr<scalar_t>(p, row)[y * p.sv]),
                                  transform_args_of<acc_t>(p), ExpFn{});
  }
  const acc_t s = rho::finalize_score<acc_t>(p.method, a, lse, zy, il, ts);
  write_row<kT>(o, row, RowResult<acc_t>{static_cast<float>(s), lse, ts, zs});
}

// One block's tiles (rho_cols_tile_kernel*).  part_zs[split][row]: the z' sums beside part
// (transformed kernels with several splits only).
template <typename scalar_t, int kKind, int kT>
__device__ __forceinline__ void cols_tiles(const RowParams& p, const RowOut& o,
                                           rho::RowAcc<typename rho::AccOf<scalar_t>::type>* part,
                                           typename rho::AccOf<scalar_t>::type* part_zs, int64_t n_splits) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  constexpr int kM = kind_method(kKind);
  constexpr bool kSum = kT != rho::kNoTransform;
  static_assert(kTileRows == kWarp && kTileRows * kTileSlices == kRowThreads, "one warp per slice of a tile");
  __shared__ rho::RowAcc<acc_t> red[kTileSlices][kTileRows];
  __shared__ acc_t red_zs[kSum ? kTileSlices : 1][kTileRows];  // unused when plain
  const int r = threadIdx.x % kTileRows;
  const int slice = threadIdx.x / kTileRows;
  const int64_t n_tiles = (p.n_rows + kTileRows - 1) / kTileRows;
  for (int64_t w = blockIdx.x; w < n_tiles * n_splits; w += gridDim.x) {  // uniform over the block
    const int64_t tile = w % n_tiles;
    const int64_t split = w / n_tiles;
    const int64_t row = tile * kTileRows + r;
    rho::RowAcc<acc_t> a = rho::acc_empty<acc_t>();
    Zprime<acc_t, kT> zp{transform_args_of<acc_t>(p), acc_t(0)};
    // The raw target (see group_row_result): an ignored row's gradnorm sums do not matter.
    if (row < p.n_rows)
      a = tile_slice_acc<scalar_t, acc_t, kM>(row_ptr<scalar_t>(p, row), p.V, p.sv, p.targets[row], split, slice,
                                              zp);
    red[slice][r] = a;
    if (kSum) red_zs[slice][r] = zp.sum;
    __syncthreads();
    if (slice == 0 && row < p.n_rows) {
      acc_t zs = zp.sum;
#pragma unroll
      for (int q = 1; q < kTileSlices; ++q) {
        a = rho::acc_merge(a, red[q][r]);
        if (kSum) zs += red_zs[q][r];
      }
      if (n_splits == 1) {
        finish_row<scalar_t, kKind, kT>(p, o, row, a, zs);
      } else {
        part[split * p.n_rows + row] = a;
        if (kSum) part_zs[split * p.n_rows + row] = zs;
      }
    }
    __syncthreads();  // red[] is reused by the next tile
  }
}

// fp64 with a transform asks for 2 blocks per SM (a 128-register cap): with the plain kernels'
// bounds alone ptxas for sm_120 chose 64 registers and spilled 8 bytes.  A second kernel, not a
// template argument of the bounds, so that the plain kernels keep their exact attributes.
template <typename scalar_t, int kT>
constexpr bool tiles_need_two_blocks() {
  return kT != rho::kNoTransform && sizeof(typename rho::AccOf<scalar_t>::type) == sizeof(double);
}

template <typename scalar_t, int kKind, int kT>
__global__ void __launch_bounds__(kRowThreads) rho_cols_tile_kernel(
    RowParams p, RowOut o, rho::RowAcc<typename rho::AccOf<scalar_t>::type>* part,
    typename rho::AccOf<scalar_t>::type* part_zs, int64_t n_splits) {
  cols_tiles<scalar_t, kKind, kT>(p, o, part, part_zs, n_splits);
}

template <typename scalar_t, int kKind, int kT>
__global__ void __launch_bounds__(kRowThreads, 2) rho_cols_tile_kernel_2b(
    RowParams p, RowOut o, rho::RowAcc<typename rho::AccOf<scalar_t>::type>* part,
    typename rho::AccOf<scalar_t>::type* part_zs, int64_t n_splits) {
  cols_tiles<scalar_t, kKind, kT>(p, o, part, part_zs, n_splits);
}

template <typename scalar_t, int kKind, int kT>
__global__ void __launch_bounds__(kRowThreads) rho_cols_final_kernel(
    RowParams p, RowOut o, const rho::RowAcc<typename rho::AccOf<scalar_t>::type>* __restrict__ part,
    const typename rho::AccOf<scalar_t>::type* __restrict__ part_zs, int64_t n_splits) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  constexpr bool kSum = kT != rho::kNoTransform;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.n_rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    rho::RowAcc<acc_t> a = part[row];
    acc_t zs = kSum ? part_zs[row] : acc_t(0);
    for (int64_t s = 1; s < n_splits; ++s) {
      a = rho::acc_merge(a, part[s * p.n_rows + row]);
      if (kSum) zs += part_zs[s * p.n_rows + row];
    }
    finish_row<scalar_t, kKind, kT>(p, o, row, a, zs);
  }
}

// ---------------------------------------------------------------------------------------------
// Selection helpers.

// One warp: in the 256-bin histogram h (of the keys that match the current prefix), find the
// digit holding the krem-th largest key and how many of that bin's keys still lie above it.
// Lane l owns bins 255-8l .. 248-8l (descending), so an inclusive scan runs from the top bin.
__device__ __forceinline__ void warp_find_digit(const uint32_t* h, uint32_t krem, uint32_t& digit,
                                                uint32_t& krem_out) {
  const int lane = threadIdx.x % kWarp;
  uint32_t c[8];
  uint32_t s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = h[255 - 8 * lane - j];
    s += c[j];
  }
  uint32_t incl = s;
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const uint32_t v = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += v;
  }
  const uint32_t excl = incl - s;
  const bool mine = excl < krem && krem <= incl;
  uint32_t d = 0;
  uint32_t kr = 0;
  if (mine) {
    uint32_t cum = excl;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (d == 0 && kr == 0 && cum + c[j] >= krem) {
        d = 255u - 8u * lane - j;
        kr = krem - cum;  // >= 1, so it also marks "found"
      }
      cum += c[j];
    }
  }
  const unsigned owner = __ballot_sync(kFull, mine);
  const int src = owner != 0 ? __ffs(owner) - 1 : 0;
  digit = __shfl_sync(kFull, d, src);
  krem_out = __shfl_sync(kFull, kr, src);
}

__device__ __forceinline__ int radix_shift(int pass) { return 56 - 8 * pass; }

// hist[digit] += 1 for each lane with take, one shared atomic per distinct digit per warp: the
// eligible keys share their top bytes, so in the first passes most of a warp's keys hit one to
// three bins and plain atomics would serialise on them.  All 32 lanes must call it.
__device__ __forceinline__ void warp_count_digit(uint32_t* hist, bool take, uint32_t digit) {
  const unsigned peers = __match_any_sync(kFull, take ? digit : 0xffffffffu);
  if (take && static_cast<int>(threadIdx.x % kWarp) == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
}

// Append every key >= kth to win[] (exactly k of them: keys are unique), one atomic per warp.
template <bool kGlobal>
__device__ void block_gather(const uint64_t* keys, int n, uint64_t kth, uint64_t* win, uint32_t* count) {
  const int lane = threadIdx.x % kWarp;
  for (int base = threadIdx.x - lane; base < n; base += blockDim.x) {  // uniform over the warp
    const int i = base + lane;
    const uint64_t key = i < n ? load_key<kGlobal>(keys, i) : 0;
    const bool take = i < n && key >= kth;
    const unsigned ballot = __ballot_sync(kFull, take);
    if (ballot == 0) continue;
    uint32_t pos = 0;
    if (lane == 0) pos = atomicAdd(count, static_cast<uint32_t>(__popc(ballot)));
    pos = __shfl_sync(kFull, pos, 0) + __popc(ballot & ((1u << lane) - 1u));
    if (take) win[pos] = key;
  }
}

// k-th largest of n unique keys (shared memory, or global when kGlobal), by one block (1 <= k <= n).
template <bool kGlobal>
__device__ uint64_t block_kth_largest(const uint64_t* keys, int n, uint32_t k, uint32_t* hist,
                                      uint32_t* bcast) {
  uint64_t prefix = 0;
  uint64_t mask = 0;
  uint32_t krem = k;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    const int shift = radix_shift(pass);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int base = threadIdx.x - threadIdx.x % kWarp; base < n; base += blockDim.x) {
      const int i = base + threadIdx.x % kWarp;
      const uint64_t key = i < n ? load_key<kGlobal>(keys, i) : 0;
      warp_count_digit(hist, i < n && (key & mask) == prefix, static_cast<uint32_t>(key >> shift) & 255u);
    }
    __syncthreads();
    if (threadIdx.x < kWarp) {
      uint32_t d, kr;
      warp_find_digit(hist, krem, d, kr);
      if (threadIdx.x == 0) {
        bcast[0] = d;
        bcast[1] = kr;
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(bcast[0]) << shift;
    mask |= static_cast<uint64_t>(0xffu) << shift;
    krem = bcast[1];
    // hist is next written after this point only by threads that passed the barrier above,
    // and warp 0 finished reading it before that barrier; bcast is rewritten two barriers on.
  }
  return prefix;
}

// Bitonic sort, descending, of s[0..P) (P a power of two) by the whole block.
__device__ void block_bitonic_desc(uint64_t* s, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < P / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t a = s[lo];
        const uint64_t b = s[hi];
        if ((a < b) == desc) {
          s[lo] = b;
          s[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

__device__ void write_pick(const SelOut& o, int64_t i, uint64_t key, const float* scores, bool scores_global) {
  const uint32_t row = rho::key_row(key);
  o.idx[i] = static_cast<int64_t>(row);
  o.score[i] = scores_global ? __ldcg(scores + row) : scores[row];
  o.valid[i] = rho::key_valid(key);
}

// The one-block select kernel (1024 threads: at most 64 registers) holds fp64 with a transform
// only by spilling: those problems take the ticket path instead (score_rows' row kernel, so the
// same bits), and this kernel is not compiled for them.
template <typename scalar_t, int kT>
constexpr bool fused_select_fits() {
  return kT == rho::kNoTransform || sizeof(typename rho::AccOf<scalar_t>::type) == sizeof(float);
}

// Small problems: score all rows, select and sort the winners, all in one block.
// Dynamic shared memory: keys[n] | winners[P] | scores[n] (float).
template <typename scalar_t, int kKind, int kT>
__global__ void __launch_bounds__(kFusedThreads) rho_fused_select_kernel(RowParams p, uint32_t k, SelOut o) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  extern __shared__ uint64_t smem[];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t bcast[2];
  __shared__ uint32_t count;
  const int n = static_cast<int>(p.n_rows);
  const int P = static_cast<int>(next_pow2(k));
  uint64_t* keys = smem;
  uint64_t* win = keys + n;
  float* scores = reinterpret_cast<float*>(win + P);
  const int lane = threadIdx.x % kWarp;
  constexpr int kWarps = kFusedThreads / kWarp;
  // Same row groups as rho_rows_warp_kernel, so the scores are bit-identical to score_rows'.
  const int G = lanes_per_row<scalar_t, kKind>(p.V);
  const int rows_per_warp = kWarp / G;
  if (threadIdx.x == 0) count = 0;
  for (int base = static_cast<int>(threadIdx.x / kWarp) * rows_per_warp; base < n; base += kWarps * rows_per_warp) {
    const int row = base + lane / G;
    const bool active = row < n;
    const RowResult<acc_t> r = group_row_result<scalar_t, kKind, kT, false>(p, row, active, lane, G);
    if (active && (lane & (G - 1)) == 0) {
      keys[row] = result_key(r, row);
      scores[row] = r.score;
    }
  }
  __syncthreads();
  const uint64_t kth = block_kth_largest<false>(keys, n, k, hist, bcast);
  block_gather<false>(keys, n, kth, win, &count);
  // Padding with 0 (below every real key: the row part of a key is never 0) sorts last.
  for (int i = static_cast<int>(k) + threadIdx.x; i < P; i += blockDim.x) win[i] = 0;
  __syncthreads();
  block_bitonic_desc(win, P);
  for (int i = threadIdx.x; i < static_cast<int>(k); i += blockDim.x) write_pick(o, i, win[i], scores, false);
}

// Large problems, pass `pass` of the radix select over keys[N] in global memory.
// hist: [8][256] counts (zeroed before pass 0) followed by one gather counter.
__device__ __forceinline__ void decode_prefix(const uint32_t* hist, int passes, uint32_t k, uint64_t& prefix,
                                              uint64_t& mask) {
  // Called by one full warp.
  prefix = 0;
  mask = 0;
  uint32_t krem = k;
  for (int q = 0; q < passes; ++q) {
    uint32_t d, kr;
    warp_find_digit(hist + 256 * q, krem, d, kr);
    prefix |= static_cast<uint64_t>(d) << radix_shift(q);
    mask |= static_cast<uint64_t>(0xffu) << radix_shift(q);
    krem = kr;
  }
}

__global__ void __launch_bounds__(kRowThreads) rho_radix_hist_kernel(const uint64_t* __restrict__ keys, int64_t n,
                                                                   uint32_t k, uint32_t* hist, int pass) {
  __shared__ uint32_t sh[256];
  __shared__ uint64_t s_prefix, s_mask;
  if (threadIdx.x < kWarp) {
    uint64_t prefix, mask;
    decode_prefix(hist, pass, k, prefix, mask);
    if (threadIdx.x == 0) {
      s_prefix = prefix;
      s_mask = mask;
    }
  }
  for (int i = threadIdx.x; i < 256; i += blockDim.x) sh[i] = 0;
  __syncthreads();
  const uint64_t prefix = s_prefix;
  const uint64_t mask = s_mask;
  const int shift = radix_shift(pass);
  // The loop bound is uniform over the warp (base), as warp_count_digit needs.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x - threadIdx.x % kWarp); base < n;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x % kWarp;
    const uint64_t key = i < n ? keys[i] : 0;
    warp_count_digit(sh, i < n && (key & mask) == prefix, static_cast<uint32_t>(key >> shift) & 255u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    if (sh[i] != 0) atomicAdd(&hist[256 * pass + i], sh[i]);
  }
}

// Compact the k keys >= the k-th largest into win[0..k) (any order; sorted afterwards).
__global__ void __launch_bounds__(kRowThreads) rho_gather_kernel(const uint64_t* __restrict__ keys, int64_t n,
                                                               uint32_t k, uint32_t* hist, uint64_t* win) {
  __shared__ uint64_t s_kth;
  if (threadIdx.x < kWarp) {
    uint64_t prefix, mask;
    decode_prefix(hist, kRadixPasses, k, prefix, mask);
    if (threadIdx.x == 0) s_kth = prefix;
  }
  __syncthreads();
  const uint64_t kth = s_kth;
  uint32_t* counter = hist + 256 * kRadixPasses;
  const int lane = threadIdx.x % kWarp;
  // Loop bound uniform per warp so that the ballot sees all lanes.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool take = i < n && keys[i] >= kth;
    const unsigned ballot = __ballot_sync(kFull, take);
    if (ballot == 0) continue;
    uint32_t pos = 0;
    if (lane == 0) pos = atomicAdd(counter, static_cast<uint32_t>(__popc(ballot)));
    pos = __shfl_sync(kFull, pos, 0) + __popc(ballot & ((1u << lane) - 1u));
    if (take && pos < k) win[pos] = keys[i];
  }
}

__global__ void __launch_bounds__(kFusedThreads) rho_sort_winners_kernel(const uint64_t* __restrict__ win, uint32_t k,
                                                                       const float* __restrict__ scores, SelOut o) {
  __shared__ uint64_t s[kSortOnChipMax];
  const int P = static_cast<int>(next_pow2(k));
  for (int i = threadIdx.x; i < P; i += blockDim.x) s[i] = i < static_cast<int>(k) ? win[i] : 0;
  __syncthreads();
  block_bitonic_desc(s, P);
  for (int i = threadIdx.x; i < static_cast<int>(k); i += blockDim.x) write_pick(o, i, s[i], scores, true);
}

__global__ void __launch_bounds__(kRowThreads) rho_write_sorted_kernel(const uint64_t* __restrict__ sorted, int64_t k,
                                                                     const float* __restrict__ scores, SelOut o) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    write_pick(o, i, sorted[i], scores, true);
}

// ---------------------------------------------------------------------------------------------
// Host side.

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

unsigned grid_for(int64_t work_items, int64_t per_block, int64_t cap) {
  int64_t g = (work_items + per_block - 1) / per_block;
  if (g > cap) g = cap;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g);
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& il,
                  int64_t method) {
  TORCH_CHECK_VALUE(method >= 0 && method < rho::kNumMethods, "rho_kernels: unknown method id ", method);
  TORCH_CHECK_VALUE(logits.is_cuda(), "rho_kernels(cuda): logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, "rho_kernels: logits must be [N, V] or [B, T, V], got ",
                    logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "rho_kernels: logits must be float32/bfloat16/float16/float64, got ", st);
  TORCH_CHECK_VALUE(logits.size(-1) >= 1, "rho_kernels: logits need at least one class, got ", logits.sizes());
  const int64_t n = logits.numel() / logits.size(-1);
  TORCH_CHECK_VALUE(n <= static_cast<int64_t>(UINT32_MAX), "rho_kernels: at most 2^32-1 rows, got ", n);
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "rho_kernels: targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.numel() == n && targets.is_contiguous(),
                    "rho_kernels: targets must be contiguous [N] with N = ", n, ", got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), "rho_kernels: targets on ", targets.device(),
                    " but logits on ", logits.device());
  if (rho::needs_il(static_cast<int>(method))) {
    TORCH_CHECK_VALUE(il.has_value() && il->defined(), "rho_kernels: method ", method,
                      " needs irreducible_loss, got None");
    TORCH_CHECK_TYPE(il->scalar_type() == at::kFloat, "rho_kernels: irreducible_loss must be float32, got ",
                     il->scalar_type());
    TORCH_CHECK_VALUE(il->dim() == 1 && il->numel() == n && il->is_contiguous(),
                      "rho_kernels: irreducible_loss must be contiguous [N] with N = ", n, ", got ", il->sizes());
    TORCH_CHECK_VALUE(il->device() == logits.device(), "rho_kernels: irreducible_loss on ", il->device(),
                      " but logits on ", logits.device());
  }
}

// transform: the rho::Transform the kernels run (score_rows with zsum runs plain logits as
// kScaleOnly with logit_scale = 1); softcap / logit_scale give its arguments.
RowParams make_params(const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& il,
                      int64_t method, int64_t ignore_index, int transform, double softcap, double logit_scale) {
  RowParams p;
  p.logits = logits.data_ptr();
  p.V = logits.size(-1);
  p.n_rows = targets.numel();
  if (logits.dim() == 3) {
    p.T = logits.size(1);
    p.sb = logits.stride(0);
    p.st = logits.stride(1);
  } else {
    p.T = 1;
    p.sb = logits.stride(0);
    p.st = 0;
  }
  p.sv = logits.stride(-1);
  p.targets = targets.data_ptr<int64_t>();
  p.il = rho::needs_il(static_cast<int>(method)) ? il->data_ptr<float>() : nullptr;
  p.method = static_cast<int>(method);
  p.ignore_index = ignore_index;
  p.transform = transform;
  p.targs_f = rho::transform_args<float>(softcap, logit_scale);
  p.targs_d = rho::transform_args<double>(softcap, logit_scale);
  return p;
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>{}, std::integral_constant<int, kind>{}, std::integral_constant<int, transform>{})
// for the logits dtype, method and p.transform.  Irreducible reads no logits: no transform.
template <typename F>
void dispatch(at::ScalarType st, int method, int transform, F&& f) {
  using None = std::integral_constant<int, rho::kNoTransform>;
  auto with_transform = [&](auto tag, auto kind) {
    switch (transform) {
      case rho::kSoftcap:
        f(tag, kind, std::integral_constant<int, rho::kSoftcap>{});
        break;
      case rho::kScaleOnly:
        f(tag, kind, std::integral_constant<int, rho::kScaleOnly>{});
        break;
      default:
        f(tag, kind, None{});
    }
  };
  auto with_kind = [&](auto tag) {
    switch (method) {
      case rho::kReducible:
      case rho::kLoss:
        with_transform(tag, std::integral_constant<int, kKindCE>{});
        break;
      case rho::kGradNorm:
        with_transform(tag, std::integral_constant<int, kKindGrad>{});
        break;
      case rho::kEntropy:
        with_transform(tag, std::integral_constant<int, kKindEnt>{});
        break;
      default:
        TORCH_CHECK_VALUE(false, "rho_kernels: unknown method id ", method);
    }
  };
  if (method == rho::kIrreducible) {
    // The logits are not read: only the accumulation type (lse dtype) depends on the dtype.
    if (st == at::kDouble)
      f(Tag<double>{}, std::integral_constant<int, kKindNone>{}, None{});
    else
      f(Tag<float>{}, std::integral_constant<int, kKindNone>{}, None{});
    return;
  }
  switch (st) {
    case at::kFloat:
      with_kind(Tag<float>{});
      break;
    case at::kDouble:
      with_kind(Tag<double>{});
      break;
    case at::kHalf:
      with_kind(Tag<c10::Half>{});
      break;
    case at::kBFloat16:
      with_kind(Tag<c10::BFloat16>{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "rho_kernels: unsupported logits dtype ", st);
  }
}

// Opt a kernel into more than 48 KiB of dynamic shared memory, once per device (a host-side
// attribute, not a stream operation, so it does not disturb graph capture after the first call).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done_mask) {
  if (bytes <= 48 * 1024) return;
  const int dev = c10::cuda::current_device();
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit != 0 && (done_mask.load() & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done_mask.fetch_or(bit);
}

// Column-major logits (rows the contiguous axis, V-stride != 1) take the tile kernels.
bool use_col_tiles(const RowParams& p) {
  if (p.method == rho::kIrreducible || p.sv == 1) return false;
  const int64_t row_stride = p.T > 1 ? p.st : p.sb;
  return row_stride == 1;
}

// Column-major tiles (never with a selection tail).
template <typename scalar_t, int kKind, int kT>
void launch_tiles(const RowParams& p, const RowOut& o, cudaStream_t stream, const at::Tensor& like, int64_t cap) {
  using acc_t = typename rho::AccOf<scalar_t>::type;
  const int64_t n_tiles = (p.n_rows + kTileRows - 1) / kTileRows;
  const int64_t n_splits = tile_splits(p.V);
  at::Tensor ws;  // freed stream-ordered by the caching allocator, after the kernels
  rho::RowAcc<acc_t>* part = nullptr;
  acc_t* part_zs = nullptr;  // after part (an offset of 5 acc_t per entry: aligned)
  if (n_splits > 1) {
    const int64_t parts = p.n_rows * n_splits;
    const int64_t zs_bytes = kT != rho::kNoTransform ? parts * static_cast<int64_t>(sizeof(acc_t)) : 0;
    ws = at::empty({parts * static_cast<int64_t>(sizeof(rho::RowAcc<acc_t>)) + zs_bytes},
                   like.options().dtype(at::kByte));
    part = reinterpret_cast<rho::RowAcc<acc_t>*>(ws.data_ptr());
    if (zs_bytes != 0) part_zs = reinterpret_cast<acc_t*>(part + parts);
  }
  auto tiles = [&](auto kernel) {
    kernel<<<grid_for(n_tiles * n_splits, 1, cap), kRowThreads, 0, stream>>>(p, o, part, part_zs, n_splits);
  };
  if constexpr (tiles_need_two_blocks<scalar_t, kT>())
    tiles(rho_cols_tile_kernel_2b<scalar_t, kKind, kT>);
  else
    tiles(rho_cols_tile_kernel<scalar_t, kKind, kT>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (n_splits > 1) {
    rho_cols_final_kernel<scalar_t, kKind, kT>
        <<<grid_for(p.n_rows, kRowThreads, cap), kRowThreads, 0, stream>>>(p, o, part, part_zs, n_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// smem: dynamic shared memory for the selection tail (0 without one); `like` gives the device
// for the tile path's workspace.
template <typename scalar_t, int kKind, int kT>
void launch_rows(const RowParams& p, const RowOut& o, size_t smem, cudaStream_t stream, const at::Tensor& like) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 64;
  // The selection tail's winners: at most 32 KiB, under the 48 KiB needing no opt-in.
  static_assert(kFusedMaxRows * sizeof(uint64_t) <= 48 * 1024, "select_tail smem needs an opt-in");
  TORCH_CHECK(smem <= kFusedMaxRows * sizeof(uint64_t), "rho_kernels(cuda): selection tail smem ", smem);
  if constexpr (kKind != kKindNone) {  // irreducible reads no logits: never tiles
    if (use_col_tiles(p)) {
      TORCH_CHECK(o.ticket == nullptr, "rho_kernels(cuda): column-major tiles take no selection tail");
      return launch_tiles<scalar_t, kKind, kT>(p, o, stream, like, cap);
    }
  }
  if (kKind == kKindNone || p.V <= kWarpRowMaxV) {
    const int64_t rows_per_block = static_cast<int64_t>(kRowThreads / kWarp) * (kWarp / lanes_per_row<scalar_t, kKind>(p.V));
    const unsigned grid = grid_for(p.n_rows, rows_per_block, cap);
    rho_rows_warp_kernel<scalar_t, kKind, kT><<<grid, kRowThreads, smem, stream>>>(p, o);
  } else {
    const unsigned grid = grid_for(p.n_rows, 1, cap);
    rho_rows_block_kernel<scalar_t, kKind, kT><<<grid, kRowThreads, smem, stream>>>(p, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


void check_transform(double softcap, double logit_scale) {
  TORCH_CHECK_VALUE(rho::transform_valid(softcap, logit_scale), "rho_kernels: softcap must be 0 (none) or finite and ",
                    "> 0 and logit_scale finite and non-zero, got softcap = ", softcap, ", logit_scale = ", logit_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_rows_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                               const std::optional<at::Tensor>& il, int64_t method,
                                                               int64_t ignore_index, bool with_lse, double softcap,
                                                               double logit_scale, bool with_zsum) {
  check_inputs(logits, targets, il, method);
  check_transform(softcap, logit_scale);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t n = targets.numel();
  const auto lse_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor score = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({with_lse ? n : 0}, logits.options().dtype(lse_dtype));
  at::Tensor zsum = at::empty({with_zsum ? n : 0}, logits.options().dtype(lse_dtype));
  if (n == 0) return {score, lse, zsum};
  const bool reads = rho::needs_logits(static_cast<int>(method));
  if (with_zsum && !reads) zsum.fill_(rho::quiet_nan<double>());  // irreducible reads no logits
  // Only the transformed kernels sum z': plain logits with zsum run as kScaleOnly with
  // logit_scale = 1 (z * 1 == z exactly, so the scores keep their bits).
  int transform = rho::transform_kind(softcap, logit_scale);
  if (with_zsum && reads && transform == rho::kNoTransform) transform = rho::kScaleOnly;
  const RowParams p = make_params(logits, targets, il, method, ignore_index, transform, softcap, logit_scale);
  const RowOut o{score.data_ptr<float>(), with_lse ? lse.data_ptr() : nullptr, nullptr, false, nullptr, 0, SelOut{},
                 with_zsum && reads ? zsum.data_ptr() : nullptr};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(logits.scalar_type(), static_cast<int>(method), p.transform, [&](auto tag, auto kind, auto tf) {
    launch_rows<typename decltype(tag)::type, decltype(kind)::value, decltype(tf)::value>(p, o, 0, stream, logits);
  });
  return {score, lse, zsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_rows_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                const std::optional<at::Tensor>& il, int64_t k,
                                                                int64_t method, int64_t ignore_index, double softcap,
                                                                double logit_scale) {
  check_inputs(logits, targets, il, method);
  check_transform(softcap, logit_scale);
  const int64_t n = targets.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "rho_kernels: k = ", k, " is out of range: need 0 <= k <= N = ", n);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  at::Tensor idx = at::empty({k}, logits.options().dtype(at::kLong));
  at::Tensor out_score = at::empty({k}, logits.options().dtype(at::kFloat));
  at::Tensor valid = at::empty({k}, logits.options().dtype(at::kBool));
  if (k == 0) return {idx, out_score, valid};  // also covers N == 0: nothing is launched
  const RowParams p = make_params(logits, targets, il, method, ignore_index,
                                 rho::transform_kind(softcap, logit_scale), softcap, logit_scale);
  const SelOut so{idx.data_ptr<int64_t>(), out_score.data_ptr<float>(), valid.data_ptr<bool>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint32_t k32 = static_cast<uint32_t>(k);
  const int64_t logit_bytes =
      method == rho::kIrreducible ? 0 : n * logits.size(-1) * static_cast<int64_t>(logits.element_size());

  // The one-block kernel streams rows a warp each, exactly like rho_rows_warp_kernel, so its
  // scores are bit-identical to score_rows'; rows long enough for the block-per-row kernel go
  // through the ticket path below instead (same kernel as score_rows).
  // Column-major logits take launch_rows' tile kernels, on the multi-kernel path below.
  const bool warp_rows = (method == rho::kIrreducible || logits.size(-1) <= kWarpRowMaxV) && !use_col_tiles(p);
  const bool fused_fits = logits.scalar_type() != at::kDouble || p.transform == rho::kNoTransform;  // fused_select_fits
  if (n <= kFusedMaxRows && logit_bytes <= kFusedMaxBytes && warp_rows && fused_fits) {
    // Tiny problem: one block does everything, no workspace.
    const size_t smem = static_cast<size_t>(n) * (sizeof(uint64_t) + sizeof(float)) +
                        static_cast<size_t>(next_pow2(k)) * sizeof(uint64_t);
    constexpr size_t kMaxSmem = kFusedMaxRows * (sizeof(uint64_t) + sizeof(float)) + kFusedMaxRows * sizeof(uint64_t);
    dispatch(logits.scalar_type(), static_cast<int>(method), p.transform, [&](auto tag, auto kind, auto tf) {
      using scalar_t = typename decltype(tag)::type;
      if constexpr (fused_select_fits<scalar_t, decltype(tf)::value>()) {
        auto kernel = rho_fused_select_kernel<scalar_t, decltype(kind)::value, decltype(tf)::value>;
        static std::atomic<uint64_t> done{0};
        if (smem > 48 * 1024) allow_smem(kernel, kMaxSmem, done);
        kernel<<<1, kFusedThreads, smem, stream>>>(p, k32, so);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    return {idx, out_score, valid};
  }
  if (n <= kFusedMaxRows && !use_col_tiles(p)) {
    // Few rows, long rows: every SM streams rows; the last block to finish selects on chip.
    // Workspace: keys[n] | scores[n] | ticket (zeroed by a memset node, not a kernel).
    at::Tensor ws = at::empty({n * 12 + 16}, logits.options().dtype(at::kByte));
    uint8_t* base = ws.data_ptr<uint8_t>();
    uint64_t* keys_p = reinterpret_cast<uint64_t*>(base);
    float* scores_p = reinterpret_cast<float*>(base + n * 8);
    uint32_t* ticket = reinterpret_cast<uint32_t*>(base + n * 12);
    C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(uint32_t), stream));
    const RowOut o{scores_p, nullptr, keys_p, true, ticket, k32, so, nullptr};
    const size_t smem = static_cast<size_t>(next_pow2(k)) * sizeof(uint64_t);  // winners only, <= 32 KiB
    dispatch(logits.scalar_type(), static_cast<int>(method), p.transform, [&](auto tag, auto kind, auto tf) {
      launch_rows<typename decltype(tag)::type, decltype(kind)::value, decltype(tf)::value>(p, o, smem, stream,
                                                                                           logits);
    });
    return {idx, out_score, valid};
  }

  // Workspace: keys and scores of every row, radix histograms + gather counter, the winners.
  at::Tensor keys = at::empty({n}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor hist = at::zeros({256 * kRadixPasses + 1}, logits.options().dtype(at::kInt));
  at::Tensor win = at::empty({k}, logits.options().dtype(at::kLong));
  uint64_t* keys_p = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  float* scores_p = scores.data_ptr<float>();
  uint32_t* hist_p = reinterpret_cast<uint32_t*>(hist.data_ptr<int32_t>());
  uint64_t* win_p = reinterpret_cast<uint64_t*>(win.data_ptr<int64_t>());

  const RowOut o{scores_p, nullptr, keys_p, true, nullptr, 0, SelOut{}, nullptr};
  dispatch(logits.scalar_type(), static_cast<int>(method), p.transform, [&](auto tag, auto kind, auto tf) {
    launch_rows<typename decltype(tag)::type, decltype(kind)::value, decltype(tf)::value>(p, o, 0, stream, logits);
  });
  const unsigned sel_grid = grid_for(n, kRowThreads * 8, static_cast<int64_t>(sm_count()) * 4);
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    rho_radix_hist_kernel<<<sel_grid, kRowThreads, 0, stream>>>(keys_p, n, k32, hist_p, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  rho_gather_kernel<<<sel_grid, kRowThreads, 0, stream>>>(keys_p, n, k32, hist_p, win_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (k <= kSortOnChipMax) {
    rho_sort_winners_kernel<<<1, kFusedThreads, 0, stream>>>(win_p, k32, scores_p, so);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {idx, out_score, valid};
  }
  // Many winners: cub radix sort of the k winners only (never of all N keys).
  TORCH_CHECK_VALUE(k <= INT_MAX, "rho_kernels(cuda): k = ", k, " winners exceed the sort limit ", INT_MAX);
  at::Tensor sorted = at::empty({k}, logits.options().dtype(at::kLong));
  uint64_t* sorted_p = reinterpret_cast<uint64_t*>(sorted.data_ptr<int64_t>());
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeysDescending(nullptr, temp_bytes, win_p, sorted_p, static_cast<int>(k),
                                                          0, 64, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, logits.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeysDescending(temp.data_ptr(), temp_bytes, win_p, sorted_p,
                                                          static_cast<int>(k), 0, 64, stream));
  rho_write_sorted_kernel<<<grid_for(k, kRowThreads, static_cast<int64_t>(sm_count()) * 8), kRowThreads, 0,
                            stream>>>(sorted_p, k, scores_p, so);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {idx, out_score, valid};
}

}  // namespace rho_cuda

TORCH_LIBRARY_IMPL(rho_kernels, CUDA, m) {
  m.impl("score_rows", &rho_cuda::score_rows_cuda);
  m.impl("select_rows", &rho_cuda::select_rows_cuda);
}
