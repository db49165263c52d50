"""CI-side checks of the compiled extension: the build log and the registered kernels.

Environment (set by ``make test``):
  RHO_KERNELS_BUILD_LOG          path of the build output (``pip install -v`` or
                                 ``setup.py build_ext``); without it the log checks are skipped.
  RHO_KERNELS_EXPECT_CUDA_BUILD  "1": the CUDA kernels must have been compiled and registered.
  RHO_KERNELS_REQUIRE_EXT        "1": the extension must load and have CPU kernels.

The log checks fail (never pass) when the log is missing, empty, or shows no build of
``rho_kernels._C``, so a build that did not happen cannot look clean.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
OPS = ("rho_kernels::score_rows", "rho_kernels::select_rows")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# A diagnostic located in one of our sources: gcc/clang "path:line[:col]: warning:" and the nvcc
# front end's "path(line): warning #NNN-D:".  The path may be absolute or relative.
_SRC_WARNING = re.compile(
    r"(?P<path>(?:[^\s:'\"()]*/)?csrc/[^\s:'\"()]+?)"
    r"(?::\d+(?::\d+)?:|\(\d+\):)\s*(?:\w+\s+)?warning\b",
    re.IGNORECASE,
)
# ptxas: "-warn-spills" warnings and "-v" resource lines.
_PTXAS_WARNING = re.compile(r"ptxas\s+warning\s*:(?P<msg>.*)", re.IGNORECASE)
_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for)\s+'?(?P<fn>[\w$.]+)'?")
_PTXAS_SPILL = re.compile(r"(?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
# Our device code lives in namespace rho_cuda (mangled _ZN8rho_cuda...) with kernels named rho_*.
_OUR_KERNEL = re.compile(r"rho_cuda|rho_\w*kernel")
# A compile of one of our sources (gcc/c++ or nvcc command line echoed by ninja/setuptools).
_COMPILE_OF = re.compile(r"\s-c\s+(?:-c\s+)?(?P<src>\S*csrc/\S+\.(?:cpp|cu))\b")


@pytest.fixture(scope="module")
def build_log() -> str:
    path = os.environ.get("RHO_KERNELS_BUILD_LOG")
    if not path:
        pytest.skip("RHO_KERNELS_BUILD_LOG is not set: no build log to check (make test sets it)")
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = ROOT / p
    assert p.is_file(), f"RHO_KERNELS_BUILD_LOG={path!r} does not exist: the build did not run or wrote elsewhere"
    text = p.read_text(errors="replace")
    assert text.strip(), f"build log {p} is empty: the build did not run"
    return text


def _compiled_sources(log: str) -> set[str]:
    return {m.group("src").split("csrc/", 1)[1] for m in _COMPILE_OF.finditer(log)}


def _no_op_build(log: str) -> bool:
    return "ninja: no work to do" in log


def test_log_shows_extension_build(build_log: str) -> None:
    assert "rho_kernels._C" in build_log or "rho_kernels/_C" in build_log, (
        "the build log never mentions the extension rho_kernels._C: it was not built "
        "(RHO_KERNELS_NO_EXT set, or setup.py found nothing to build)"
    )


def test_no_compiler_warnings_in_our_sources(build_log: str) -> None:
    if not _compiled_sources(build_log):
        assert _no_op_build(build_log), (
            "the build log shows no compile of any csrc/ source and no ninja no-op: "
            "the extension sources were not built"
        )
        pytest.skip("incremental no-op build (ninja: no work to do): the log holds no compiler output; rebuild clean to check warnings")
    hits = [m.group(0).strip() for line in build_log.splitlines() for m in [_SRC_WARNING.search(line)] if m]
    assert not hits, "compiler warnings in csrc/:\n" + "\n".join(sorted(set(hits))[:50])


def test_no_ptxas_spills_in_our_kernels(build_log: str) -> None:
    if not _flag("RHO_KERNELS_EXPECT_CUDA_BUILD") and "nvcc" not in build_log:
        pytest.skip("no CUDA build expected (RHO_KERNELS_EXPECT_CUDA_BUILD unset) and no nvcc in the log")
    bad: list[str] = []
    for m in _PTXAS_WARNING.finditer(build_log):
        msg = m.group("msg")
        if "spill" in msg.lower() and _OUR_KERNEL.search(msg):
            bad.append(msg.strip())
    # With -Xptxas -v, "Function properties for F" is followed by "N bytes spill stores ...".
    current = None
    for line in build_log.splitlines():
        e = _PTXAS_ENTRY.search(line)
        if e:
            current = e.group("fn")
            continue
        s = _PTXAS_SPILL.search(line)
        if s and current and _OUR_KERNEL.search(current) and (int(s.group("st")) or int(s.group("ld"))):
            bad.append(f"{current}: {s.group(0)}")
    assert not bad, "ptxas reports register spills in our kernels:\n" + "\n".join(sorted(set(bad)))


def test_cuda_sources_compiled(build_log: str) -> None:
    if not _flag("RHO_KERNELS_EXPECT_CUDA_BUILD"):
        pytest.skip("RHO_KERNELS_EXPECT_CUDA_BUILD is not 1: a CPU-only build is acceptable here")
    assert "building CPU kernels only" not in build_log, "setup.py fell back to a CPU-only build (no CUDA toolkit found)"
    if _no_op_build(build_log) and not _compiled_sources(build_log):
        pytest.skip("incremental no-op build: the log cannot show the nvcc compile; the registration test still checks it")
    cu = {s for s in _compiled_sources(build_log) if s.endswith(".cu")}
    assert "cuda/select_cuda.cu" in cu, (
        f"RHO_KERNELS_EXPECT_CUDA_BUILD=1 but the build log shows no nvcc compile of csrc/cuda/select_cuda.cu "
        f"(compiled: {sorted(_compiled_sources(build_log))})"
    )


def _ext():
    from rho_kernels.backends import _extension as _ext

    return _ext


def test_cuda_kernels_registered() -> None:
    if not _flag("RHO_KERNELS_EXPECT_CUDA_BUILD"):
        pytest.skip("RHO_KERNELS_EXPECT_CUDA_BUILD is not 1")
    ext = _ext()
    assert ext.LOAD_ERROR is None, f"rho_kernels._C failed to load: {ext.LOAD_ERROR}"
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"the extension was built without CUDA kernels for {missing} (csrc/cuda/*.cu not compiled in)"


def test_extension_loads_with_cpu_kernels() -> None:
    if not _flag("RHO_KERNELS_REQUIRE_EXT"):
        pytest.skip("RHO_KERNELS_REQUIRE_EXT is not 1: running without the extension is allowed here")
    ext = _ext()
    assert ext.LOAD_ERROR is None, f"rho_kernels._C failed to load: {ext.LOAD_ERROR}"
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")]
    assert not missing, (
        f"the extension loaded but has no CPU kernel for {missing}: csrc/cpu/*.cpp is missing or "
        "does not register TORCH_LIBRARY_IMPL(rho_kernels, CPU, ...)"
    )


# Helpers of the CPU kernels' inner loops that must never get an out-of-line copy (RHO_HOT in
# csrc/cpu/score_cpu_kernel.h): GCC once stopped inlining transpose16 after the file grew, and
# fp32 [131072, 100] on AVX-512 ran 1.7x slower with every result still right.
_HOT_HELPERS = re.compile(r"rho_cpu::\(anonymous namespace\)::(?:transpose16|TileSums<[^>]*>::TileSums|finish_row<|"
                          r"load_pair<)")


def test_cpu_kernel_hot_helpers_are_inlined() -> None:
    import importlib.util

    spec = importlib.util.find_spec("rho_kernels._C")
    if spec is None or not spec.origin:
        pytest.skip("rho_kernels._C is not built")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    syms = subprocess.run([nm, "-C", spec.origin], capture_output=True, text=True).stdout
    if "score_kernel<" not in syms:
        pytest.skip(f"{spec.origin} has no local symbols (stripped): nothing to check")
    out_of_line = sorted({line.split(" ", 2)[-1][:160] for line in syms.splitlines() if _HOT_HELPERS.search(line)})
    assert not out_of_line, f"hot helpers compiled out of line (the compiler's inlining gave up): {out_of_line}"


# The log parsers must catch what they are meant to catch; these run everywhere.
@pytest.mark.parametrize(
    "line",
    [
        "/work/x/csrc/cpu/select_cpu.cpp:12:5: warning: unused variable 'x' [-Wunused-variable]",
        "csrc/rho_math.h:40: warning: something",
        "/w/csrc/cuda/select_cuda.cu(123): warning #177-D: variable \"x\" was declared but never referenced",
        "  csrc/cuda/select_cuda.cu(7): Warning: cannot tell what pointer points to",
    ],
)
def test_warning_regex_catches(line: str) -> None:
    assert _SRC_WARNING.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "<command-line>: warning: \"Py_LIMITED_API\" redefined",
        "/usr/include/c++/13/bits/stl_vector.h:10:3: warning: foo",
        "/site-packages/torch/include/c10/util/Half.h(5): warning #1-D: bar",
    ],
)
def test_warning_regex_ignores_other_files(line: str) -> None:
    assert not _SRC_WARNING.search(line)


def test_spill_parser_catches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RHO_KERNELS_EXPECT_CUDA_BUILD", "1")
    log = (
        "ptxas info    : Compiling entry function '_ZN8rho_cuda20rho_rows_warp_kernelIfLi1EEEvNS_9RowParamsENS_6RowOutE' for 'sm_90'\n"
        "ptxas info    : Function properties for _ZN8rho_cuda20rho_rows_warp_kernelIfLi1EEEvNS_9RowParamsENS_6RowOutE\n"
        "    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
    )
    with pytest.raises(AssertionError, match="spill"):
        test_no_ptxas_spills_in_our_kernels(log)
    warn = "ptxas warning : Registers are spilled to local memory in function '_ZN8rho_cuda3fooEv', 4 bytes spill stores, 4 bytes spill loads\n"
    with pytest.raises(AssertionError, match="spill"):
        test_no_ptxas_spills_in_our_kernels(warn)
    test_no_ptxas_spills_in_our_kernels(log.replace("8 bytes spill stores, 8 bytes spill loads", "0 bytes spill stores, 0 bytes spill loads"))



# --------------------------------------------------------------------------- row streaming on the host
# csrc/cuda/row_scan.cuh (the per-thread part of the CUDA row kernels) is host-callable: compile
# it with nvcc for the host and run every "thread" of a 1..32-lane row group (warp-row kernels) or a
# 256-thread block serially, merging with rho::acc_merge in the kernels' butterfly order.  This
# checks the scalar-head / 16-byte-vector / scalar-tail partition, strided rows, the target column
# (gradnorm's exclusion and CE's target pick), the special values, rows of finite logits that
# span more than FLT_MAX (hand-worked values), and the logit transform (soft cap / scale) with the
# z' sums of the zsum output, without a GPU.
_ROW_SCAN_HARNESS = r"""
// Host-only check of rho_cuda::scan_row (no GPU needed): random rows (V up to 6000, element
// offsets 0..8 so every 16-byte misalignment occurs, strides 1 and 3, -inf / NaN / all -inf rows),
// every thread of the group run serially and merged in the device's butterfly order; lse,
// gradnorm and entropy against double; the CE target pick against the target logit.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <random>
#include <algorithm>
#include "cuda/row_scan.cuh"
using namespace rho_cuda;
std::mt19937 rng(1);
// The merge order of the kernels: a butterfly (xor offsets G/2..1) inside each group of
// G = min(nt, 32) lanes; for a 256-thread block, then a butterfly over the 8 warps' results
// padded with empty accumulators to 32 lanes.
template <typename A>
rho::RowAcc<A> device_merge(std::vector<rho::RowAcc<A>> acc) {
  auto butterfly = [](std::vector<rho::RowAcc<A>>& v, int G) {
    for (int off = G / 2; off > 0; off >>= 1) {
      std::vector<rho::RowAcc<A>> prev = v;
      for (size_t l = 0; l < v.size(); ++l) v[l] = rho::acc_merge(prev[l], prev[l ^ (size_t)off]);
    }
  };
  const int nt = (int)acc.size();
  butterfly(acc, nt < 32 ? nt : 32);
  if (nt <= 32) return acc[0];
  std::vector<rho::RowAcc<A>> w(32, rho::acc_empty<A>());
  for (int i = 0; i < nt / 32; ++i) w[i] = acc[32 * i];
  butterfly(w, 32);
  return w[0];
}
// Streams one row with nt threads; checks the CE target pick (exactly one thread reads column y
// when 0 <= y < V, with the row's value there; none otherwise).  Returns false on a bad pick.
template <typename S, typename A, int kM>
bool stream(const S* base, int V, int sv, int64_t y, int nt, rho::RowAcc<A>& out) {
  std::vector<rho::RowAcc<A>> acc;
  int found = 0; bool same = true;
  for (int t = 0; t < nt; ++t) {
    TargetPick<A> pick{A(0), false};
    acc.push_back(scan_row<S, A, kM>(base, V, sv, y, t, nt, &pick));
    if (pick.found) { ++found; A want = static_cast<A>(base[y * sv]); same = same && (pick.z == want || (pick.z != pick.z && want != want)); }
  }
  out = device_merge(acc);
  const bool ok = (y >= 0 && y < V) ? (found == 1 && same) : found == 0;
  if (!ok) printf("target pick: V=%d nt=%d sv=%d y=%ld found=%d same=%d\n", V, nt, sv, (long)y, found, (int)same);
  return ok;
}
const int kGroups[] = {1, 2, 4, 8, 16, 32, 256};
template <typename S, typename A, int kM>
int run(int iters) {
  int bad = 0;
  for (int it = 0; it < iters; ++it) {
    int V = (rng() % 4 == 0) ? 1000 + rng() % 5000 : 1 + rng() % 300; int nt = kGroups[rng() % 7]; int off = rng() % 9; int sv = (rng() % 4 == 0) ? 3 : 1;
    int64_t y = (rng() % 8 == 0) ? V + (int64_t)(rng() % 3) : (int64_t)(rng() % (V + 1)) - 1;
    std::vector<S> buf((size_t)V * sv + 64);
    S* base = (S*)(((uintptr_t)buf.data() + 15) & ~(uintptr_t)15) + off;
    std::vector<double> z(V);
    int special = rng() % 6;
    for (int j = 0; j < V; ++j) {
      float v = std::uniform_real_distribution<float>(-8, 8)(rng);
      if (special == 1 && rng() % 5 == 0) v = -INFINITY;
      base[(int64_t)j * sv] = S(v); z[j] = (double)(float)base[(int64_t)j * sv];
    }
    if (special == 2) { int j = rng() % V; base[(int64_t)j*sv] = S(NAN); z[j] = NAN; }
    if (special == 3) { for (int j=0;j<V;++j){ base[(int64_t)j*sv] = S(-INFINITY); z[j] = -INFINITY;} }
    rho::RowAcc<A> acc;
    if (!stream<S, A, kM>(base, V, sv, y, nt, acc)) { ++bad; continue; }
    A lse = rho::finalize_lse(acc);
    // reference in double
    double m = -INFINITY; bool nan = false;
    for (double v : z) { if (v != v) nan = true; else if (v > m) m = v; }
    double rl;
    if (nan) rl = NAN; else if (std::isinf(m)) rl = m; else { double d = 0; for (double v : z) d += std::exp(v - m); rl = m + std::log(d); }
    bool ok = (std::isnan(rl) && std::isnan((double)lse)) || (rl == (double)lse) || std::fabs(rl - (double)lse) < 1e-5 * (1 + std::fabs(rl));
    if (ok && kM != rho::kLoss && std::isfinite(rl) && y >= 0 && y < V) {
      double g2 = 0, h = 0; 
      for (int j = 0; j < V; ++j) { double p = std::exp(z[j] - rl); double q = p - (j == y ? 1 : 0); g2 += q * q; if (p > 0) h -= p * (z[j] - rl); }
      A s = rho::finalize_score<A>(kM, acc, lse, A(0), A(0), rho::kTargetOk);
      double want = kM == rho::kGradNorm ? std::sqrt(g2) : h;
      ok = std::fabs((double)s - want) < 2e-5 * (1 + std::fabs(want));
      if (!ok) printf("score mismatch kM=%d V=%d nt=%d off=%d sv=%d y=%ld special=%d: %g vs %g  m=%g d=%g t=%g dx=%g s2x=%g\n", kM, V, nt, off, sv, (long)y, special, (double)s, want, (double)acc.m, (double)acc.d, (double)acc.t, (double)acc.dx, (double)acc.s2x);
    } else if (!ok) printf("lse mismatch V=%d nt=%d off=%d sv=%d: %g vs %g\n", V, nt, off, sv, (double)lse, rl);
    bad += !ok;
  }
  return bad;
}
// Column-major tiles (rho_cols_* kernels): rows are the contiguous axis of a [V, N] buffer
// (column stride sv = N + pad), each row merged over kTileSlices slices and then over the splits
// of V in the kernels' order; lse / gradnorm / entropy against double.  V spans 1..3 splits.
template <typename S, typename A, int kM>
int run_tiles(int iters) {
  int bad = 0;
  for (int it = 0; it < iters; ++it) {
    const int V = (rng() % 3 == 0) ? 1 + rng() % 40 : 1 + rng() % (int)(2 * kTileChunk + 300);
    const int N = 1 + rng() % 5; const int sv = N + (int)(rng() % 3);
    std::vector<S> buf((size_t)V * sv + 8);
    const int special = rng() % 6;
    std::vector<double> z((size_t)V * N);
    for (int j = 0; j < V; ++j) for (int r = 0; r < N; ++r) {
      float v = std::uniform_real_distribution<float>(-8, 8)(rng);
      if (special == 1 && rng() % 5 == 0) v = -INFINITY;
      if (special == 3) v = -INFINITY;
      buf[(size_t)j * sv + r] = S(v); z[(size_t)r * V + j] = (double)(A)buf[(size_t)j * sv + r];
    }
    if (special == 2) { int j = rng() % V; buf[(size_t)j * sv] = S(NAN); z[j] = NAN; }
    for (int r = 0; r < N; ++r) {
      const int64_t y = (int64_t)(rng() % (V + 1)) - 1;
      rho::RowAcc<A> acc = rho::acc_empty<A>();
      for (int64_t sp = 0; sp < tile_splits(V); ++sp) {
        rho::RowAcc<A> a = tile_slice_acc<S, A, kM>(buf.data() + r, V, sv, y, sp, 0);
        for (int q = 1; q < kTileSlices; ++q) a = rho::acc_merge(a, tile_slice_acc<S, A, kM>(buf.data() + r, V, sv, y, sp, q));
        acc = sp == 0 ? a : rho::acc_merge(acc, a);
      }
      const A lse = rho::finalize_lse(acc);
      const double* zr = &z[(size_t)r * V];
      double m = -INFINITY; bool nan = false;
      for (int j = 0; j < V; ++j) { if (zr[j] != zr[j]) nan = true; else if (zr[j] > m) m = zr[j]; }
      double rl;
      if (nan) rl = NAN; else if (std::isinf(m)) rl = m; else { double d = 0; for (int j = 0; j < V; ++j) d += std::exp(zr[j] - m); rl = m + std::log(d); }
      bool ok = (std::isnan(rl) && std::isnan((double)lse)) || rl == (double)lse || std::fabs(rl - (double)lse) < 1e-5 * (1 + std::fabs(rl));
      if (ok && kM != rho::kLoss && std::isfinite(rl) && y >= 0) {
        double g2 = 0, h = 0;
        for (int j = 0; j < V; ++j) { double p = std::exp(zr[j] - rl); double q = p - (j == y ? 1 : 0); g2 += q * q; if (p > 0) h -= p * (zr[j] - rl); }
        const A sc = rho::finalize_score<A>(kM, acc, lse, A(0), A(0), rho::kTargetOk);
        const double want = kM == rho::kGradNorm ? std::sqrt(g2) : h;
        ok = std::fabs((double)sc - want) < 2e-5 * (1 + std::fabs(want));
      }
      if (!ok) printf("tile mismatch kM=%d V=%d N=%d sv=%d r=%d y=%ld special=%d: lse %g vs %g\n", kM, V, N, sv, r, (long)y, special, (double)lse, rl);
      bad += !ok;
    }
  }
  return bad;
}
// Finite logits spanning more than FLT_MAX, worked by hand relative to the row max (-inf
// elsewhere in the row changes nothing): every placement of the four values in a row of
// V = 4..40 columns, every group size, offset and stride 1 / 3.
struct Extreme { float z[4]; int y; double lse_rel; double entropy; double gradnorm; };
template <typename S, typename A>
int run_extreme(const Extreme& e) {
  int bad = 0;
  for (int it = 0; it < 200; ++it) {
    const int V = 4 + rng() % 37; const int nt = kGroups[rng() % 7]; const int off = rng() % 9; const int sv = (rng() % 3 == 0) ? 3 : 1;
    std::vector<S> buf((size_t)V * sv + 64);
    S* base = (S*)(((uintptr_t)buf.data() + 15) & ~(uintptr_t)15) + off;
    for (int j = 0; j < V; ++j) base[(int64_t)j * sv] = S(-INFINITY);
    std::vector<int> cols(V); for (int j = 0; j < V; ++j) cols[j] = j;
    std::shuffle(cols.begin(), cols.end(), rng);
    for (int c = 0; c < 4; ++c) base[(int64_t)cols[c] * sv] = S(e.z[c]);
    const int64_t y = cols[e.y];
    double mx = -INFINITY; for (int c = 0; c < 4; ++c) mx = std::fmax(mx, (double)(A)base[(int64_t)cols[c] * sv]);
    rho::RowAcc<A> ag, ae, al;
    bool ok = stream<S, A, rho::kGradNorm>(base, V, sv, y, nt, ag) && stream<S, A, rho::kEntropy>(base, V, sv, y, nt, ae) &&
              stream<S, A, rho::kLoss>(base, V, sv, y, nt, al);
    const A lse = rho::finalize_lse(ae);
    const A g = rho::finalize_score<A>(rho::kGradNorm, ag, rho::finalize_lse(ag), A(0), A(0), rho::kTargetOk);
    const A h = rho::finalize_score<A>(rho::kEntropy, ae, lse, A(0), A(0), rho::kTargetOk);
    ok = ok && std::isfinite((double)lse) && std::fabs((double)lse - (mx + e.lse_rel)) <= 1e-6 * std::fabs(mx) + 1e-6 &&
         (double)rho::finalize_lse(al) == (double)lse &&
         std::fabs((double)g - e.gradnorm) < 1e-6 && std::fabs((double)h - e.entropy) < 1e-6;
    if (!ok) printf("extreme row [%g %g %g %g] y=%d V=%d nt=%d off=%d sv=%d: lse=%g gradnorm=%.9g (want %.9g) entropy=%.9g (want %.9g)\n",
                    e.z[0], e.z[1], e.z[2], e.z[3], e.y, V, nt, off, sv, (double)lse, (double)g, e.gradnorm, (double)h, e.entropy);
    bad += !ok;
  }
  return bad;
}
// The logit transform and the z' sums (Zprime): rows with -inf / +-inf / NaN under a soft cap
// (30, or 2 so that tanh saturates; logit_scale 1 or 0.5) or a scale alone (0.25, -1.5: a negative
// scale swaps +-inf); every thread (or tile slice x split) with its own Zprime, RowAccs merged in
// the kernels' order and the sums added; lse, the score (CE with the picked z'_y) and zsum against
// double on z' = cap * tanh(scale * z / cap) (or scale * z); the target pick against Zprime::one.
template <typename A>
bool check_transformed(const std::vector<double>& zr, int64_t y, int kM, const rho::RowAcc<A>& acc, A zy, A zsum,
                       const char* what) {
  const int V = (int)zr.size();
  const A lse = rho::finalize_lse(acc);
  double m = -INFINITY, want_zs = 0, abs_zs = 0; bool nan = false;
  for (double v : zr) { if (v != v) nan = true; else if (v > m) m = v; want_zs += v; abs_zs += std::fabs(v); }
  double rl;
  if (nan) rl = NAN; else if (std::isinf(m)) rl = m; else { double d = 0; for (double v : zr) d += std::exp(v - m); rl = m + std::log(d); }
  bool ok = (std::isnan(rl) && std::isnan((double)lse)) || rl == (double)lse || std::fabs(rl - (double)lse) < 1e-5 * (1 + std::fabs(rl));
  const bool zs_ok = (std::isnan(want_zs) && std::isnan((double)zsum)) || want_zs == (double)zsum ||
                     std::fabs(want_zs - (double)zsum) < 5e-5 * abs_zs + 1e-6;
  double got = 0, want = 0;
  if (ok && std::isfinite(rl) && y >= 0 && y < V) {
    got = (double)rho::finalize_score<A>(kM, acc, lse, zy, A(0), rho::kTargetOk);
    if (kM == rho::kLoss) {
      want = rl - zr[y];
    } else {
      double g2 = 0, h = 0;
      for (int j = 0; j < V; ++j) { double p = std::exp(zr[j] - rl); double q = p - (j == y ? 1 : 0); g2 += q * q; if (p > 0) h -= p * (zr[j] - rl); }
      want = kM == rho::kGradNorm ? std::sqrt(g2) : h;
    }
    ok = got == want || std::fabs(got - want) < 2e-5 * (1 + std::fabs(want));  // == : z'_y = -inf, CE = +inf
  }
  if (!ok || !zs_ok) printf("%s kM=%d V=%d y=%ld: lse %g vs %g, score %g vs %g, zsum %g vs %g\n", what, kM, V, (long)y, (double)lse, rl, got, want, (double)zsum, want_zs);
  return ok && zs_ok;
}
template <typename S, typename A, int kM, int kT>
int run_transform(int iters) {
  int bad = 0;
  for (int it = 0; it < iters; ++it) {
    const int V = (rng() % 4 == 0) ? 1000 + rng() % 5000 : 1 + rng() % 300; const int nt = kGroups[rng() % 7]; const int off = rng() % 9; const int sv = (rng() % 4 == 0) ? 3 : 1;
    const int64_t y = (rng() % 8 == 0) ? -1 : (int64_t)(rng() % V);
    const double cap = kT == rho::kSoftcap ? (rng() % 2 ? 30.0 : 2.0) : 0.0;
    const double scale = kT == rho::kSoftcap ? (rng() % 2 ? 1.0 : 0.5) : (rng() % 2 ? 0.25 : -1.5);
    const rho::TransformArgs<A> ta = rho::transform_args<A>(cap, scale);
    std::vector<S> buf((size_t)V * sv + 64);
    S* base = (S*)(((uintptr_t)buf.data() + 15) & ~(uintptr_t)15) + off;
    const int special = rng() % 6;
    for (int j = 0; j < V; ++j) {
      float v = std::uniform_real_distribution<float>(-40, 40)(rng);
      if (special == 1 && rng() % 5 == 0) v = -INFINITY;
      if (special == 4 && rng() % 7 == 0) v = rng() % 2 ? INFINITY : -INFINITY;
      base[(int64_t)j * sv] = S(v);
    }
    if (special == 2) base[(int64_t)(rng() % V) * sv] = S(NAN);
    std::vector<double> zr(V);
    for (int j = 0; j < V; ++j) {
      const double v = (double)(A)base[(int64_t)j * sv];
      zr[j] = cap != 0.0 ? cap * std::tanh(v * (scale / cap)) : v * scale;
    }
    std::vector<rho::RowAcc<A>> acc; A zsum = A(0), zy = A(0); int found = 0; bool same = true;
    for (int t = 0; t < nt; ++t) {
      Zprime<A, kT> zp{ta, A(0)}; TargetPick<A> pick{A(0), false};
      acc.push_back(scan_row<S, A, kM>(base, V, sv, y, t, nt, &pick, zp));
      zsum += zp.sum;
      if (pick.found) { ++found; zy = pick.z; const A want = zp.one((A)base[y * sv]); same = same && (pick.z == want || (pick.z != pick.z && want != want)); }
    }
    const bool pick_ok = (y >= 0) ? (found == 1 && same) : found == 0;
    if (!pick_ok) printf("transform target pick: V=%d nt=%d sv=%d y=%ld found=%d same=%d\n", V, nt, sv, (long)y, found, (int)same);
    bad += !(pick_ok && check_transformed<A>(zr, y, kM, device_merge(acc), zy, zsum, "transform"));
  }
  return bad;
}
template <typename S, typename A, int kM, int kT>
int run_tiles_transform(int iters) {
  int bad = 0;
  for (int it = 0; it < iters; ++it) {
    const int V = (rng() % 3 == 0) ? 1 + rng() % 40 : 1 + rng() % (int)(2 * kTileChunk + 300);
    const int sv = 1 + (int)(rng() % 3);  // one row (rows interleave with sv - 1 others)
    const double cap = kT == rho::kSoftcap ? 30.0 : 0.0, scale = kT == rho::kSoftcap ? 0.5 : -1.5;
    const rho::TransformArgs<A> ta = rho::transform_args<A>(cap, scale);
    std::vector<S> buf((size_t)V * sv + 8);
    const int special = rng() % 6;
    std::vector<double> zr(V);
    for (int j = 0; j < V; ++j) {
      float v = std::uniform_real_distribution<float>(-40, 40)(rng);
      if (special == 1 && rng() % 5 == 0) v = -INFINITY;
      if (special == 4 && rng() % 7 == 0) v = rng() % 2 ? INFINITY : -INFINITY;
      if (special == 2 && j == V / 2) v = NAN;
      buf[(size_t)j * sv] = S(v);
      const double w = (double)(A)buf[(size_t)j * sv];
      zr[j] = cap != 0.0 ? cap * std::tanh(w * (scale / cap)) : w * scale;
    }
    const int64_t y = (int64_t)(rng() % V);
    rho::RowAcc<A> acc = rho::acc_empty<A>(); A zsum = A(0);
    for (int64_t sp = 0; sp < tile_splits(V); ++sp) {
      Zprime<A, kT> zp{ta, A(0)};
      rho::RowAcc<A> a = tile_slice_acc<S, A, kM>(buf.data(), V, sv, y, sp, 0, zp);
      A zs = zp.sum;
      for (int q = 1; q < kTileSlices; ++q) {
        Zprime<A, kT> zq{ta, A(0)};
        a = rho::acc_merge(a, tile_slice_acc<S, A, kM>(buf.data(), V, sv, y, sp, q, zq));
        zs += zq.sum;
      }
      acc = sp == 0 ? a : rho::acc_merge(acc, a);
      zsum += zs;
    }
    // The tile kernels read z_y on its own (finish_row): the same transform of the same value.
    const A zy = Zprime<A, kT>{ta, A(0)}.one((A)buf[(size_t)y * sv]);
    bad += !check_transformed<A>(zr, y, kM, acc, zy, zsum, "tile transform");
  }
  return bad;
}
int main() {
  int bad = 0;
  bad += run_transform<float, float, rho::kLoss, rho::kSoftcap>(300); bad += run_transform<float, float, rho::kGradNorm, rho::kSoftcap>(200);
  bad += run_transform<float, float, rho::kEntropy, rho::kScaleOnly>(200); bad += run_transform<float, float, rho::kLoss, rho::kScaleOnly>(200);
  bad += run_transform<double, double, rho::kEntropy, rho::kSoftcap>(200); bad += run_transform<double, double, rho::kLoss, rho::kScaleOnly>(200);
  bad += run_transform<__nv_bfloat16, float, rho::kLoss, rho::kSoftcap>(200); bad += run_transform<__half, float, rho::kGradNorm, rho::kScaleOnly>(200);
  bad += run_tiles_transform<float, float, rho::kLoss, rho::kSoftcap>(40); bad += run_tiles_transform<float, float, rho::kEntropy, rho::kScaleOnly>(40);
  bad += run_tiles_transform<__nv_bfloat16, float, rho::kGradNorm, rho::kSoftcap>(30);
  const double ln2 = std::log(2.0), ln4 = std::log(4.0);
  // p = (1, 0, 0, 0); (0.5, 0.5, 0, 0); (1/4, 1/4, 1/4, 1/4).
  const Extreme ext[] = {
      {{3e38f, -3e38f, 0.f, 1.f}, 0, 0.0, 0.0, 0.0},          {{3e38f, -3e38f, 0.f, 1.f}, 3, 0.0, 0.0, std::sqrt(2.0)},
      {{3.4e38f, 3.4e38f, -3.4e38f, 0.f}, 3, ln2, ln2, std::sqrt(1.5)}, {{3.4e38f, 3.4e38f, -3.4e38f, 0.f}, 0, ln2, ln2, std::sqrt(0.5)},
      {{-3e38f, -3e38f, -3e38f, -3e38f}, 1, ln4, ln4, std::sqrt(0.75)},
  };
  for (const Extreme& e : ext) { bad += run_extreme<float, float>(e); bad += run_extreme<double, double>(e); }
  // bf16 tops out at ~3.39e38: the same shapes with values it holds.
  const Extreme ext_bf16[] = {
      {{3e38f, -3e38f, 0.f, 1.f}, 3, 0.0, 0.0, std::sqrt(2.0)}, {{3.38e38f, 3.38e38f, -3.38e38f, 0.f}, 3, ln2, ln2, std::sqrt(1.5)},
  };
  for (const Extreme& e : ext_bf16) bad += run_extreme<__nv_bfloat16, float>(e);
  bad += run_tiles<float, float, rho::kLoss>(60); bad += run_tiles<float, float, rho::kGradNorm>(60); bad += run_tiles<float, float, rho::kEntropy>(60);
  bad += run_tiles<double, double, rho::kEntropy>(40); bad += run_tiles<__nv_bfloat16, float, rho::kGradNorm>(40);
  bad += run<float, float, rho::kLoss>(300); bad += run<float, float, rho::kGradNorm>(300); bad += run<float, float, rho::kEntropy>(300);
  bad += run<double, double, rho::kGradNorm>(300); bad += run<double, double, rho::kEntropy>(300);
  bad += run<__half, float, rho::kGradNorm>(300); bad += run<__nv_bfloat16, float, rho::kEntropy>(300); bad += run<__nv_bfloat16, float, rho::kLoss>(300);
  printf("bad=%d\n", bad); return bad != 0;
}
"""


def _nvcc() -> str | None:
    for cand in (
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
        shutil.which("nvcc") or "",
    ):
        if cand and os.path.isfile(cand):
            return cand
    return None


def test_row_scan_partition_on_host(tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        if _flag("RHO_KERNELS_EXPECT_CUDA_BUILD"):
            pytest.fail("RHO_KERNELS_EXPECT_CUDA_BUILD=1 but no nvcc was found (CUDA_HOME or PATH)")
        pytest.skip("no nvcc here: the host check of csrc/cuda/row_scan.cuh needs the CUDA toolkit")
    src = tmp_path / "row_scan_harness.cu"
    src.write_text(_ROW_SCAN_HARNESS)
    exe = tmp_path / "row_scan_harness"
    cc = subprocess.run(
        [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", "-o", str(exe), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert cc.returncode == 0, f"nvcc failed on the row_scan.cuh host harness:\n{cc.stdout}\n{cc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "bad=0" in run.stdout, f"row_scan.cuh host check failed:\n{run.stdout[-4000:]}"
