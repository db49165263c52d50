// row_scan.cuh -- how one thread streams its share of a row into a rho::RowAcc (CUDA backend).
//
// Torch-free and callable from host code too (RHO_CUDA_HD), so that the partition of a row into
// scalar head / 16-byte vectors / scalar tail, the target-column bookkeeping, the logit transform
// and the z' sums can be checked on a CPU by running every "thread" of a group serially and
// merging with rho::acc_merge.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "rho_math.h"

#if defined(__CUDACC__)
#define RHO_CUDA_HD __host__ __device__ __forceinline__
#else
#define RHO_CUDA_HD inline
#endif
// Unroll hints only for the device pass: the host compiler (-Wall) does not know the pragma.
#if defined(__CUDA_ARCH__)
#define RHO_UNROLL _Pragma("unroll")
#else
#define RHO_UNROLL
#endif

namespace rho_cuda {

// Streaming (evict-first) 16-byte load on the device: every logit is read exactly once.
RHO_CUDA_HD uint4 stream_load(const uint4* p) {
#if defined(__CUDA_ARCH__)
  return __ldcs(p);
#else
  return *p;
#endif
}

// The device's exp (fast-math: __expf, as acc_add's) for the soft cap's tanh (rho::tanh_acc).
struct ExpFn {
  template <typename T>
  RHO_CUDA_HD T operator()(T v) const { return std::exp(v); }
};

// The logit transform a row kernel reads (rho::transform_logit), and with kSum this thread's
// running sum of its z' (the zsum output; merged by addition wherever the RowAccs merge).
// kNoTransform: apply() is the identity and the sum is never touched, so the plain kernels are the
// code they were.  kSum = false: kernels that never write zsum (select only) save its register.
template <typename acc_t, int kTransform, bool kSum = kTransform != rho::kNoTransform>
struct Zprime {
  rho::TransformArgs<acc_t> args;
  acc_t sum;
  RHO_CUDA_HD acc_t one(acc_t z) const { return rho::transform_logit<kTransform>(z, args, ExpFn{}); }
  // z <- z' in place (before the chunk max), and sum += their sum (pairwise: no serial chain).
  template <int E>
  RHO_CUDA_HD void apply(acc_t (&z)[E]) {
    if constexpr (kTransform != rho::kNoTransform) {
      acc_t s[E];
RHO_UNROLL
      for (int i = 0; i < E; ++i) s[i] = z[i] = one(z[i]);
      if constexpr (kSum) {
RHO_UNROLL
        for (int w = 1; w < E; w *= 2) {
RHO_UNROLL
          for (int i = 0; i + w < E; i += 2 * w) s[i] += s[i + w];
        }
        sum += s[0];
      }
    }
  }
};

template <typename acc_t>
RHO_CUDA_HD Zprime<acc_t, rho::kNoTransform> plain_logits() {
  return Zprime<acc_t, rho::kNoTransform>{rho::TransformArgs<acc_t>{acc_t(1), acc_t(1), acc_t(1)}, acc_t(0)};
}

// The target logit as one thread of a row group streamed it (CE reads it from the row's own
// loads instead of a second, dependent load after the row).
template <typename acc_t>
struct TargetPick {
  acc_t z;
  bool found;
};

// Fold E values (widened to acc_t, transformed here to z') into the accumulator: one
// max/rescale per chunk.  tpos = index of the target column inside the chunk, or -1 (gradnorm
// sums exclude it).  pick (may be nullptr) receives the target column's z' when it lies in this
// chunk: the score's z_y is the very value the row accumulated.
template <typename acc_t, int kM, int E, int kT, bool kS>
RHO_CUDA_HD void acc_chunk(rho::RowAcc<acc_t>& a, acc_t (&z)[E], int tpos, TargetPick<acc_t>* pick,
                           Zprime<acc_t, kT, kS>& zp) {
  zp.apply(z);
  if (pick != nullptr) {
    // Unrolled compare, not z[tpos]: a dynamic index would put z in local memory.
RHO_UNROLL
    for (int i = 0; i < E; ++i) {
      if (i == tpos) {
        pick->z = z[i];
        pick->found = true;
      }
    }
  }
  acc_t cm = z[0];
RHO_UNROLL
  for (int i = 1; i < E; ++i) cm = rho::nan_max(cm, z[i]);
  const acc_t m = rho::nan_max(a.m, cm);
  // Nothing but -inf so far: every term is exactly 0.  Skipping also avoids acc_add's
  // entropy_term(0, -inf - -inf = NaN) = NaN, which acc_rescale would carry on.
  if (m == -rho::pos_inf<acc_t>()) return;
  if (!(m == a.m)) a = rho::acc_rescale(a, m);
RHO_UNROLL
  for (int i = 0; i < E; ++i) rho::acc_add<acc_t, kM>(a, z[i], i == tpos);
}

template <typename scalar_t, typename acc_t, int kM, int kT, bool kS>
RHO_CUDA_HD void acc_one(rho::RowAcc<acc_t>& a, const scalar_t* p, bool is_target, TargetPick<acc_t>* pick,
                         Zprime<acc_t, kT, kS>& zp) {
  acc_t z[1] = {static_cast<acc_t>(*p)};
  acc_chunk<acc_t, kM, 1>(a, z, is_target ? 0 : -1, pick, zp);
}

// Fold columns j0 + tid, j0 + tid + nt, ... (< j1) of a row with column stride sv into a,
// U strided loads in flight per step.
template <typename scalar_t, typename acc_t, int kM, int U, int kT, bool kS>
RHO_CUDA_HD void scan_cols(rho::RowAcc<acc_t>& a, const scalar_t* __restrict__ row, int64_t j0, int64_t j1, int64_t sv,
                           int64_t y, int tid, int nt, TargetPick<acc_t>* pick, Zprime<acc_t, kT, kS>& zp) {
  int64_t j = j0 + tid;
  for (; j + static_cast<int64_t>(U - 1) * nt < j1; j += static_cast<int64_t>(U) * nt) {
    acc_t z[U];
    int tpos = -1;
RHO_UNROLL
    for (int u = 0; u < U; ++u) {
      const int64_t c = j + static_cast<int64_t>(u) * nt;
      z[u] = static_cast<acc_t>(row[c * sv]);
      if (c == y) tpos = u;
    }
    acc_chunk<acc_t, kM, U>(a, z, tpos, pick, zp);
  }
  for (; j < j1; j += nt) acc_one<scalar_t, acc_t, kM>(a, row + j * sv, j == y, pick, zp);
}

// This thread's partial accumulator over columns tid, tid+nt, ... (in vector units when the
// row is contiguous).  y = target column, or any value outside [0, V) when no column is the
// target.  pick (may be nullptr) receives the target column's z' if this thread reads it; zp
// transforms every value read and sums them.
template <typename scalar_t, typename acc_t, int kM, int kT, bool kS>
RHO_CUDA_HD rho::RowAcc<acc_t> scan_row(const scalar_t* __restrict__ row, int64_t V, int64_t sv, int64_t y,
                                        int tid, int nt, TargetPick<acc_t>* pick, Zprime<acc_t, kT, kS>& zp) {
  rho::RowAcc<acc_t> a = rho::acc_empty<acc_t>();
  if (sv == 1) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
    constexpr int U = 2;  // vectors in flight per thread and iteration
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
    int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(scalar_t));
    if (addr % sizeof(scalar_t) != 0) head = V;  // not element-aligned: all scalar (never for torch)
    if (head > V) head = V;
    for (int64_t j = tid; j < head; j += nt) acc_one<scalar_t, acc_t, kM>(a, row + j, j == y, pick, zp);
    const int64_t nvec = (V - head) / VEC;
    const uint4* __restrict__ vp = reinterpret_cast<const uint4*>(row + head);
    int64_t i = tid;
    for (; i + static_cast<int64_t>(U - 1) * nt < nvec; i += static_cast<int64_t>(U) * nt) {
      uint4 raw[U];
RHO_UNROLL
      for (int u = 0; u < U; ++u) raw[u] = stream_load(vp + i + static_cast<int64_t>(u) * nt);
      acc_t z[U * VEC];
      int tpos = -1;
RHO_UNROLL
      for (int u = 0; u < U; ++u) {
        const scalar_t* s = reinterpret_cast<const scalar_t*>(&raw[u]);
RHO_UNROLL
        for (int e = 0; e < VEC; ++e) z[u * VEC + e] = static_cast<acc_t>(s[e]);
        const int64_t c0 = head + (i + static_cast<int64_t>(u) * nt) * VEC;
        if (y >= c0 && y < c0 + VEC) tpos = u * VEC + static_cast<int>(y - c0);
      }
      acc_chunk<acc_t, kM, U * VEC>(a, z, tpos, pick, zp);
    }
    for (; i < nvec; i += nt) {
      const uint4 raw = stream_load(vp + i);
      const scalar_t* s = reinterpret_cast<const scalar_t*>(&raw);
      acc_t z[VEC];
RHO_UNROLL
      for (int e = 0; e < VEC; ++e) z[e] = static_cast<acc_t>(s[e]);
      const int64_t c0 = head + i * VEC;
      const int tpos = (y >= c0 && y < c0 + VEC) ? static_cast<int>(y - c0) : -1;
      acc_chunk<acc_t, kM, VEC>(a, z, tpos, pick, zp);
    }
    for (int64_t j = head + nvec * VEC + tid; j < V; j += nt) acc_one<scalar_t, acc_t, kM>(a, row + j, j == y, pick, zp);
  } else {
    scan_cols<scalar_t, acc_t, kM, 4>(a, row, 0, V, sv, y, tid, nt, pick, zp);
  }
  return a;
}

// Plain logits (no transform, no sum).
template <typename scalar_t, typename acc_t, int kM>
RHO_CUDA_HD rho::RowAcc<acc_t> scan_row(const scalar_t* __restrict__ row, int64_t V, int64_t sv, int64_t y,
                                        int tid, int nt, TargetPick<acc_t>* pick = nullptr) {
  Zprime<acc_t, rho::kNoTransform> zp = plain_logits<acc_t>();
  return scan_row<scalar_t, acc_t, kM>(row, V, sv, y, tid, nt, pick, zp);
}

// Column-major logits (rows are the contiguous axis, V-stride != 1), select_cuda.cu's
// rho_cols_* kernels: a block takes kTileRows consecutive rows (one per lane, so that a warp
// load is kTileRows adjacent logits of one column) x one split of kTileChunk columns; warp
// `slice` of kTileSlices streams the split's columns slice, slice + kTileSlices, ...  The row's
// accumulator is then merged over slices 0..kTileSlices-1 and over splits 0..n-1, in order.
constexpr int kTileRows = 32;
constexpr int kTileSlices = 8;
constexpr int64_t kTileChunk = 2048;  // columns per split: the split of V depends on V only
constexpr int kTileLoads = 8;         // strided loads in flight per thread

RHO_CUDA_HD int64_t tile_splits(int64_t V) { return (V + kTileChunk - 1) / kTileChunk; }

// One thread's part of a tile: row (column 0 of the row) over split `split`, slice `slice`.
template <typename scalar_t, typename acc_t, int kM, int kT, bool kS>
RHO_CUDA_HD rho::RowAcc<acc_t> tile_slice_acc(const scalar_t* __restrict__ row, int64_t V, int64_t sv, int64_t y,
                                              int64_t split, int slice, Zprime<acc_t, kT, kS>& zp) {
  rho::RowAcc<acc_t> a = rho::acc_empty<acc_t>();
  const int64_t j0 = split * kTileChunk;
  const int64_t j1 = j0 + kTileChunk < V ? j0 + kTileChunk : V;
  scan_cols<scalar_t, acc_t, kM, kTileLoads>(a, row, j0, j1, sv, y, slice, kTileSlices, nullptr, zp);
  return a;
}

template <typename scalar_t, typename acc_t, int kM>
RHO_CUDA_HD rho::RowAcc<acc_t> tile_slice_acc(const scalar_t* __restrict__ row, int64_t V, int64_t sv, int64_t y,
                                              int64_t split, int slice) {
  Zprime<acc_t, rho::kNoTransform> zp = plain_logits<acc_t>();
  return tile_slice_acc<scalar_t, acc_t, kM>(row, V, sv, y, split, slice, zp);
}


}  // namespace rho_cuda
