"""The fused Triton backend ("triton"): one pass over the logits, online log-sum-exp, top-k.

Math and special values are those of csrc/rho_math.h (RowAcc sums m, d, t, dx, s2x and the
select_key ordering); rho_kernels/reference.py is the definition this backend is tested against.

Launch paths, chosen from shapes only (no host sync, so the choice traces under torch.compile):

* score kernel: a ``[BLOCK_R, BLOCK_V]`` tile per program, looping over V in BLOCK_V chunks with
  an online accumulator.  Small V: several rows per program, the whole row in one chunk;
  medium V: one row per program, whole row in one load; large V: one row, chunked.
  Column-major logits (V-stride != 1, consecutive rows adjacent, e.g. ``[V, N].t()``): tiles
  of up to 64 rows x a V chunk, the rows being the coalesced axis.
* split-V: few row blocks with a large V.  Programs ``(row block, split)`` write partial
  accumulators ``(m, d, t, dx, s2x)`` to a workspace, a merge kernel combines them and finalises.
* select, small problems (N <= 1024, no split): ONE launch.  Every program scores its rows,
  writes score and 64-bit key to a small scratch buffer, and the last program to finish (an
  atomic ticket) sorts all keys on chip and writes the top k.  The ticket counter needs a
  4-byte zero fill before the kernel; when the problem is tiny (N <= 256 and N*V <= 65536)
  one program does everything and there is no counter: exactly one launch.
* select, large problems: the score kernel writes scores and keys; for small k a block kernel
  keeps the top min(k, CB) keys of every block of CB rows (candidates); the merge is
  ``torch.topk`` on the int64 keys, i.e. a radix select (no k-sized sorting network), so a
  large k (10% of a million rows) stays fast.

Bit-exactness: every path that scores rows (score kernel, split-V, fused select) uses the same
plan -- BLOCK_R, BLOCK_V, num_warps, split -- so ``Selection.scores`` is bit-identical to
``score()[indices]``.  The plan depends on the shape, dtype and strides and on a notional SM
count (``PLAN_SMS``), never on the GPU: the same inputs give the same bits on every GPU model.
It does depend on the batch: rows of a small batch with a large V are split over V (a
different summation order), so a row's last bits can differ between a batch of 4 and one of
4096 (and between a contiguous and a column-major copy of the same logits).

Keys: the signed-int64 image of rho::select_key (same order): high word = order-preserving
int32 image of the fp32 score (-0 read as +0), or INT32_MIN for an ineligible row; low word =
0xFFFFFFFF - row.  Keys are unique, so the order is total and deterministic.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from ._triton_compat import triton_op, wrap_triton

from .._contract import RowProblem, lse_dtype
from . import triton_ce_grad
from .triton_ce_grad import _device_guard, _tanh

NAME = "triton"

_M_IRREDUCIBLE = 2  # rho::kIrreducible: the logits are not read (no split-V pass)
# The fused select (score + on-chip sort in one kernel) takes the CE methods and irreducible only.
# Gradnorm (dx, s2x) and entropy (t) keep more running sums live across the sort, and their fused
# variants spilled 4-8 bytes on some targets in the six-target AOT run (gradnorm: sm_100, sm_120,
# soft-capped sm_86 / sm_89; entropy, bf16: sm_90, sm_100, sm_120; one-program and ticket forms):
# they take two stages (the score kernel, then torch.topk).  So do float64 logits (their fused
# tiles spilled on sm_86 / sm_89 / sm_120 under triton 3.6).
_FUSED_METHODS = (0, 1, 2)
_INT32_MIN = -(2**31)  # high word of an ineligible row's key


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device.type == "cpu":
        if _interpreter_requested():
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    return f"Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _exp(x, IS_F64: tl.constexpr):
    # fp32: exp2 with the log2(e) scale folded in (one MUFU op); fp64: exact exp.
    if IS_F64:
        r = tl.exp(x)
    else:
        r = tl.exp2(x * 1.4426950408889634)
    return r


@triton.jit
def _log(x, IS_F64: tl.constexpr):
    if IS_F64:
        r = tl.log(x)
    else:
        r = tl.log2(x) * 0.6931471805599453
    return r


@triton.jit
def _transform(x, cap, cap_scale, scale, TRANSFORM: tl.constexpr):
    """z' of rho::transform: TRANSFORM 0 none, 1 scale * z, 2 cap * tanh(z * (scale / cap))
    (cap_scale = scale / cap)."""
    if TRANSFORM == 1:
        x = x * scale
    elif TRANSFORM == 2:
        x = cap * _tanh(x * cap_scale)
    return x


@triton.jit
def _row_offsets(rows, T, stride_b, stride_t):
    # Flat row r of a [B, T, V] view -> element offset of its first logit (int64).
    b = rows // T
    t = rows - b * T
    return b * stride_b + t * stride_t


@triton.jit
def _targets(tgt_ptr, rows, rmask, V, ignore_index):
    y = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    ignored = y == ignore_index
    oor = (~ignored) & ((y < 0) | (y >= V))
    ok = (~ignored) & (~oor)
    return y, ignored, oor, ok


@triton.jit
def _stats(logits_ptr, row_off, rmask, y, v_lo, v_hi, stride_v, cap, cap_scale, scale,
           METHOD: tl.constexpr, IS_F64: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, TRANSFORM: tl.constexpr, ZSUM: tl.constexpr):
    """Online accumulator over columns [v_lo, v_hi) of BLOCK_R rows (rho::RowAcc + NaN flag) of
    the transformed logits, and with ZSUM their plain sum (label smoothing's sum_j z'_j)."""
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_R], tl.float32)
    if IS_F64:
        m = m.to(tl.float64)
        d = d.to(tl.float64)
    t = d
    dx = d
    s2x = d
    zs = d
    bad = tl.zeros([BLOCK_R], tl.int32)  # a NaN logit was seen
    cols0 = tl.arange(0, BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + cols0
        mask = rmask[:, None] & (cols < v_hi)[None, :]
        ptrs = logits_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_v
        x = tl.load(ptrs, mask=mask, other=float("-inf"))
        if IS_F64:
            x = x.to(tl.float64)
        else:
            x = x.to(tl.float32)
        if TRANSFORM != 0:  # masked lanes stay -inf (a cap would map them to -cap)
            x = tl.where(mask, _transform(x, cap, cap_scale, scale, TRANSFORM), float("-inf"))
        if ZSUM:
            zs = zs + tl.sum(tl.where(mask, x, 0.0), axis=1)
        isnan = x != x
        bad = bad | tl.max(isnan.to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(tl.where(isnan, float("-inf"), x), axis=1))
        # Guard: while every logit so far is -inf (or m did not move), exp(m - m_new) would be
        # exp(-inf - -inf) = NaN; no rescale is needed then.
        same = m_new == m
        shift = m - m_new
        alpha = tl.where(same, 1.0, _exp(shift, IS_F64))
        z = x - m_new[:, None]  # -inf where the row spans more than FLT_MAX: e = 0 then
        e = tl.where(x == float("-inf"), 0.0, _exp(z, IS_F64))  # a -inf logit contributes 0
        if METHOD == 4:
            # rho::entropy_term and acc_rescale: a term whose e (or alpha) is 0 contributes 0,
            # not 0 * -inf = NaN.  (e != 0 implies z > -104, so no clamp of z is needed.)
            t_old = tl.where(same | (d == 0), t,
                             tl.where(alpha == 0, 0.0, alpha * (t + shift * d)))
            t = t_old + tl.sum(tl.where(e == 0, 0.0, e * z), axis=1)
        if METHOD == 3:
            ex = tl.where(cols[None, :] == y[:, None], 0.0, e)  # the target is excluded
            dx = dx * alpha + tl.sum(ex, axis=1)
            s2x = s2x * (alpha * alpha) + tl.sum(ex * ex, axis=1)
        d = d * alpha + tl.sum(e, axis=1)
        m = m_new
    return m, d, t, dx, s2x, bad, zs


@triton.jit
def _finalize(m, d, t, dx, s2x, bad, zy, il, ignored, oor,
              METHOD: tl.constexpr, IS_F64: tl.constexpr):
    """(score fp32, lse) of rho::finalize_lse / finalize_score."""
    inf = float("inf")
    m_finite = (m != inf) & (m != -inf)
    safe_d = tl.where(m_finite, d, 1.0)
    log_d = _log(safe_d, IS_F64)
    lse = tl.where(bad != 0, float("nan"), tl.where(m_finite, m + log_d, m))
    lse_finite = (lse == lse) & (lse != inf) & (lse != -inf)
    # CE = (m - z_y) + log d where lse is finite: lse's rounding at |m| ~ 3e38 would swallow log d.
    ce = tl.where(lse_finite, (m - zy) + log_d, lse - zy)
    if METHOD == 0:
        s = ce - il
    elif METHOD == 1:
        s = ce
    elif METHOD == 2:
        s = -il
        lse = tl.full(m.shape, float("nan"), m.dtype)
    elif METHOD == 3:
        q = dx / safe_d
        g = tl.sqrt(s2x / (safe_d * safe_d) + q * q)
        s = tl.where(lse_finite, g, float("nan"))
    else:
        h = log_d - t / safe_d
        s = tl.where(lse_finite, h, float("nan"))
    s = s.to(tl.float32)
    s = tl.where(oor, float("nan"), s)
    s = tl.where(ignored, float("-inf"), s)
    return s, lse


@triton.jit
def _key(score, ok, rows):
    """Signed int64 image of rho::select_key (same order, larger = selected first)."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0 ties +0
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    eligible = ok & (score == score)
    hi = tl.where(eligible, ordered, -2147483648).to(tl.int64)
    return hi * 4294967296 + (4294967295 - rows)


@triton.jit
def _score_block(logits_ptr, tgt_ptr, il_ptr, rows, N, V, T, stride_b, stride_t, stride_v,
                 ignore_index, cap, cap_scale, scale, METHOD: tl.constexpr, IS_F64: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, TRANSFORM: tl.constexpr, ZSUM: tl.constexpr):
    """Scores, lse, keys (and with ZSUM sum_j z'_j) of the rows ``rows`` (int64 [BLOCK_R]), whole rows."""
    rmask = rows < N
    y, ignored, oor, ok = _targets(tgt_ptr, rows, rmask, V, ignore_index)
    row_off = _row_offsets(rows, T, stride_b, stride_t)
    if METHOD == 2:
        m = tl.zeros([BLOCK_R], tl.float32)
        if IS_F64:
            m = m.to(tl.float64)
        d = m
        t = m
        dx = m
        s2x = m
        bad = tl.zeros([BLOCK_R], tl.int32)
        zy = m
        zs = tl.full([BLOCK_R], float("nan"), m.dtype)  # irreducible reads no logit
    else:
        m, d, t, dx, s2x, bad, zs = _stats(logits_ptr, row_off, rmask, y, 0, V, stride_v, cap, cap_scale, scale,
                                           METHOD, IS_F64, BLOCK_R, BLOCK_V, TRANSFORM, ZSUM)
        zy = _target_logit(logits_ptr, row_off, y, stride_v, rmask & ok, cap, cap_scale, scale, IS_F64, TRANSFORM)
    if METHOD == 0 or METHOD == 2:
        il = tl.load(il_ptr + rows, mask=rmask, other=0.0).to(m.dtype)
    else:
        il = m
    score, lse = _finalize(m, d, t, dx, s2x, bad, zy, il, ignored, oor, METHOD, IS_F64)
    key = _key(score, ok, rows)
    return score, lse, key, rmask, zs


@triton.jit
def _target_logit(logits_ptr, row_off, y, stride_v, mask, cap, cap_scale, scale,
                  IS_F64: tl.constexpr, TRANSFORM: tl.constexpr):
    zy = tl.load(logits_ptr + row_off + y * stride_v, mask=mask, other=0.0)
    if IS_F64:
        zy = zy.to(tl.float64)
    else:
        zy = zy.to(tl.float32)
    return _transform(zy, cap, cap_scale, scale, TRANSFORM)


@triton.jit
def _score_kernel(logits_ptr, tgt_ptr, il_ptr, score_ptr, lse_ptr, key_ptr, ws_ptr, zsum_ptr,
                  N, V, T, stride_b, stride_t, stride_v, ignore_index, v_per_split, cap, cap_scale, scale,
                  METHOD: tl.constexpr, IS_F64: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT: tl.constexpr,
                  TRANSFORM: tl.constexpr, ZSUM: tl.constexpr):
    """grid (cdiv(N, BLOCK_R), SPLIT).  SPLIT == 1: final scores, lse and keys (always all three:
    N-sized writes cost nothing next to N x V reads, and one variant compiles once); else
    partial accumulators (with ZSUM a sixth, the plain sum).  TRANSFORM: see _transform."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    if SPLIT == 1:
        score, lse, key, rmask, zs = _score_block(
            logits_ptr, tgt_ptr, il_ptr, rows, N, V, T, stride_b, stride_t, stride_v,
            ignore_index, cap, cap_scale, scale, METHOD, IS_F64, BLOCK_R, BLOCK_V, TRANSFORM, ZSUM)
        tl.store(score_ptr + rows, score, mask=rmask)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        tl.store(key_ptr + rows, key, mask=rmask)
        if ZSUM:
            tl.store(zsum_ptr + rows, zs, mask=rmask)
    else:
        sid = tl.program_id(1)
        rmask = rows < N
        y, ignored, oor, ok = _targets(tgt_ptr, rows, rmask, V, ignore_index)
        row_off = _row_offsets(rows, T, stride_b, stride_t)
        v_lo = sid * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        m, d, t, dx, s2x, bad, zs = _stats(logits_ptr, row_off, rmask, y, v_lo, v_hi, stride_v,
                                           cap, cap_scale, scale, METHOD, IS_F64, BLOCK_R, BLOCK_V,
                                           TRANSFORM, ZSUM)
        m = tl.where(bad != 0, float("nan"), m)  # the NaN flag travels as m = NaN
        base = ws_ptr + (rows * SPLIT + sid) * (6 if ZSUM else 5)
        tl.store(base + 0, m, mask=rmask)
        tl.store(base + 1, d, mask=rmask)
        tl.store(base + 2, t, mask=rmask)
        tl.store(base + 3, dx, mask=rmask)
        tl.store(base + 4, s2x, mask=rmask)
        if ZSUM:
            tl.store(base + 5, zs, mask=rmask)


@triton.jit
def _split_merge_kernel(logits_ptr, tgt_ptr, il_ptr, score_ptr, lse_ptr, key_ptr, ws_ptr, zsum_ptr,
                        N, V, T, stride_b, stride_t, stride_v, ignore_index, cap, cap_scale, scale,
                        METHOD: tl.constexpr, IS_F64: tl.constexpr, BLOCK_R: tl.constexpr,
                        SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                        TRANSFORM: tl.constexpr, ZSUM: tl.constexpr):
    """rho::acc_merge of SPLIT partial accumulators per row, then finalise."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sids = tl.arange(0, SPLIT_P2)
    mask = rmask[:, None] & (sids < SPLIT)[None, :]
    base = ws_ptr + (rows[:, None] * SPLIT + sids[None, :]) * (6 if ZSUM else 5)
    ms = tl.load(base + 0, mask=mask, other=float("-inf"))
    ds = tl.load(base + 1, mask=mask, other=0.0)
    ts = tl.load(base + 2, mask=mask, other=0.0)
    dxs = tl.load(base + 3, mask=mask, other=0.0)
    s2xs = tl.load(base + 4, mask=mask, other=0.0)
    isnan = ms != ms
    bad = tl.max(isnan.to(tl.int32), axis=1)
    m = tl.max(tl.where(isnan, float("-inf"), ms), axis=1)
    shift = ms - m[:, None]
    # Same guard as in _stats: an empty or all -inf partial (d == 0) is not rescaled.
    keep = (ms == m[:, None]) | (ds == 0)
    alpha = tl.where(keep, 1.0, _exp(shift, IS_F64))
    d = tl.sum(alpha * ds, axis=1)
    # alpha == 0 (a partial more than FLT_MAX below the max): contributes 0 (rho::acc_rescale)
    t = tl.sum(tl.where((ds == 0) | (alpha == 0), 0.0,
                        alpha * (ts + tl.where(keep, 0.0, shift) * ds)), axis=1)
    dx = tl.sum(alpha * dxs, axis=1)
    s2x = tl.sum(alpha * alpha * s2xs, axis=1)
    y, ignored, oor, ok = _targets(tgt_ptr, rows, rmask, V, ignore_index)
    row_off = _row_offsets(rows, T, stride_b, stride_t)
    zy = _target_logit(logits_ptr, row_off, y, stride_v, rmask & ok, cap, cap_scale, scale, IS_F64, TRANSFORM)
    if ZSUM:
        tl.store(zsum_ptr + rows, tl.sum(tl.load(base + 5, mask=mask, other=0.0), axis=1), mask=rmask)
    if METHOD == 0:
        il = tl.load(il_ptr + rows, mask=rmask, other=0.0).to(m.dtype)
    else:
        il = m
    score, lse = _finalize(m, d, t, dx, s2x, bad, zy, il, ignored, oor, METHOD, IS_F64)
    tl.store(score_ptr + rows, score, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(key_ptr + rows, _key(score, ok, rows), mask=rmask)


@triton.jit
def _sort_desc(keys):
    return tl.sort(keys, descending=True)


if _interpreter_requested():
    # Under TRITON_INTERPRET=1 the kernels run op by op in numpy, and tl.sort's bitonic network
    # (Triton's library code, tens of thousands of interpreted ops) took ~4 s per 1024 keys: most
    # of the CPU test suite's time.  There the same descending sort of the int64 keys is done by
    # numpy in one call.  Compiled kernels (GPU, the AOT test) run tl.sort.
    def _sort_desc(keys):  # noqa: F811 - the interpreter's stand-in, called from interpreted kernels
        import numpy as np

        h = keys.handle
        return tl.tensor(type(h)(np.ascontiguousarray(np.sort(h.data)[::-1]), h.dtype), keys.type)


@triton.jit
def _emit_topk(score_ptr, key_ptr, out_idx_ptr, out_score_ptr, out_valid_ptr, N, k,
               N_P2: tl.constexpr, FROM_OTHER_SMS: tl.constexpr):
    """Sort all N keys on chip (N <= N_P2) and write the first k as indices/scores/valid."""
    offs = tl.arange(0, N_P2)
    if FROM_OTHER_SMS:
        # written by other programs: bypass the (incoherent) L1
        keys = tl.load(key_ptr + offs, mask=offs < N, other=-9223372036854775808,
                       cache_modifier=".cg")
    else:
        keys = tl.load(key_ptr + offs, mask=offs < N, other=-9223372036854775808)
    keys = _sort_desc(keys)
    rows = 4294967295 - (keys & 4294967295)
    valid = (keys >> 32) != -2147483648
    omask = (offs < k) & (offs < N)  # k <= N by contract; never gather a padding key
    if FROM_OTHER_SMS:
        sc = tl.load(score_ptr + rows, mask=omask, other=0.0, cache_modifier=".cg")
    else:
        sc = tl.load(score_ptr + rows, mask=omask, other=0.0)
    tl.store(out_idx_ptr + offs, rows, mask=omask)
    tl.store(out_score_ptr + offs, sc, mask=omask)
    tl.store(out_valid_ptr + offs, valid.to(tl.int8), mask=omask)


@triton.jit
def _fused_select_kernel(logits_ptr, tgt_ptr, il_ptr, score_ptr, key_ptr, counter_ptr,
                         out_idx_ptr, out_score_ptr, out_valid_ptr,
                         N, V, T, stride_b, stride_t, stride_v, ignore_index, k, cap, cap_scale, scale,
                         METHOD: tl.constexpr, IS_F64: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, N_P2: tl.constexpr,
                         ONE_PROGRAM: tl.constexpr, TRANSFORM: tl.constexpr):
    """The whole select in one launch (N <= N_P2 <= FUSED_MAX_ROWS rows).  Launched with the
    score kernel's BLOCK_R, BLOCK_V and num_warps, so every row is reduced in the same order
    and its score is bit-identical to ``score()``'s."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for rb in range(pid, tl.cdiv(N, BLOCK_R), nprog):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # N <= FUSED_MAX_ROWS
        score, lse, key, rmask, _ = _score_block(
            logits_ptr, tgt_ptr, il_ptr, rows, N, V, T, stride_b, stride_t, stride_v,
            ignore_index, cap, cap_scale, scale, METHOD, IS_F64, BLOCK_R, BLOCK_V, TRANSFORM, False)
        tl.store(score_ptr + rows, score, mask=rmask)
        tl.store(key_ptr + rows, key, mask=rmask)
    # every thread's stores are done before the block publishes (or reads) them
    tl.debug_barrier()
    if ONE_PROGRAM:
        _emit_topk(score_ptr, key_ptr, out_idx_ptr, out_score_ptr, out_valid_ptr, N, k,
                   N_P2, False)
    else:
        # Last program to finish merges (release/acquire through the ticket counter).
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == nprog - 1:
            _emit_topk(score_ptr, key_ptr, out_idx_ptr, out_score_ptr, out_valid_ptr, N, k,
                       N_P2, True)


@triton.jit
def _block_topk_kernel(key_ptr, cand_ptr, N, kc, CB: tl.constexpr):
    """Top-kc keys of each block of CB keys (kc <= CB), sorted, to cand[pid * kc ...]."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * CB + tl.arange(0, CB)
    keys = tl.load(key_ptr + offs, mask=offs < N, other=-9223372036854775808)
    keys = _sort_desc(keys)
    j = tl.arange(0, CB)
    tl.store(cand_ptr + pid * kc + j, keys, mask=j < kc)


# ----------------------------------------------------------------------------------------------
# Launch planning (shapes only)
# ----------------------------------------------------------------------------------------------

# Private knobs for tests: force a path or small blocks (see _override).
_OVERRIDES: dict = {}

# The single-launch select sorts all keys of one problem on chip (tl.sort) in its last program.
# At 4096 int64 keys that sort dominated the kernel (registers of the whole streaming kernel,
# serial tail on one SM); at 1024 keys its ticket variants still spilled 4-8 bytes on sm_86 /
# sm_89 / sm_120 under triton 3.6 (the six-target AOT run).  Larger problems take two stages.
FUSED_MAX_ROWS = 256
ONE_PROGRAM_MAX_ELEMS = 1 << 16  # below this a single program is cheaper than a ticket
# One program that streams every row block and then sorts: at N_P2 = 1024 its gradnorm variant
# spilled on sm_80, so larger problems take the ticket path.
ONE_PROGRAM_MAX_ROWS = 256
CAND_MAX_K = 256  # per-block candidates pay off only for small k
CAND_BLOCK = 2048
MAX_SPLIT = 64
# The plan uses this notional SM count, never the device's: a row's reduction order (and so
# its score's last bits) must not depend on which GPU model runs it.
PLAN_SMS = 132
COLUMN_MIN_ROWS = 16  # column tiles need at least a sector's worth of rows per column


@contextlib.contextmanager
def _override(**kw) -> Iterator[None]:
    """Private: force plan fields (block_r, block_v, split, fused, one_program, cand,
    cand_block, sms) for tests.  Not thread-safe; not part of the API."""
    old = dict(_OVERRIDES)
    _OVERRIDES.update(kw)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


class _Plan(NamedTuple):
    block_r: int
    block_v: int
    split: int
    v_per_split: int
    num_warps: int


def _sms() -> int:
    return _OVERRIDES.get("sms", PLAN_SMS)


def _rows_contiguous(logits: Tensor) -> bool:
    """Flat row r starts at element r: the rows are the fast axis (e.g. ``[V, N].t()``)."""
    if logits.dim() == 2:
        return logits.stride(0) == 1
    b, t = logits.shape[0], logits.shape[1]
    return (t == 1 or logits.stride(1) == 1) and (b == 1 or logits.stride(0) == t)


def _column_major(logits: Tensor) -> bool:
    """Read in tiles of rows x columns with the rows as the fast (coalesced) axis: the V stride
    is not 1 but consecutive rows are adjacent.  From strides only (no host sync)."""
    n = logits.numel() // max(logits.shape[-1], 1)
    return (logits.shape[-1] > 1 and logits.stride(-1) != 1 and n >= COLUMN_MIN_ROWS
            and _rows_contiguous(logits))


def _plan(logits: Tensor, n: int, v: int) -> _Plan:
    """Block sizes by V and layout (no autotuning: one heuristic table, no slow first calls).
    Every launch that scores rows (score, split-V, fused select) uses this plan, so a row's
    reduction order is the same on every path."""
    esize = logits.element_size()
    v_p2 = _p2(v)
    whole_max = {8: 4096, 4: 8192, 2: 16384}.get(esize, 8192)
    chunk = {8: 2048, 4: 4096, 2: 8192}.get(esize, 4096)
    column = _column_major(logits)
    if column:  # V-stride != 1, rows adjacent: [rows, V chunk] tiles, rows the fast axis
        block_r = min(64, _p2(n))
        block_v = 4096 // block_r
        warps = 4
    elif v_p2 <= 1024:  # small V: 2-D tile of rows
        # Each thread keeps the accumulators of every row it touches: tiles of up to 512
        # logits keep that <= 8 rows per thread, <= 96 registers at sm_90 (4096-logit tiles
        # took 164-255 registers and spilled at [64, 64]).
        block_v = v_p2
        block_r = min(128, max(4, 512 // v_p2))
        if esize == 8:  # float64 tiles of 4096 took ~240 registers (gradnorm, sm_80/90): <= 1024
            block_r = max(1, min(block_r, 1024 // v_p2))
        warps = 4
    elif v_p2 <= whole_max:  # medium V: the whole row in one load
        block_v, block_r = v_p2, 1
        warps = 8 if v_p2 * esize <= 16384 else 16
    else:  # large V: chunked online LSE
        block_v, block_r = chunk, 1
        warps = 8
    block_r = _OVERRIDES.get("block_r", block_r)
    block_v = _OVERRIDES.get("block_v", block_v)
    nchunks = triton.cdiv(v, block_v)
    row_blocks = triton.cdiv(n, block_r)
    split = 1
    sms = _sms()
    long_rows = nchunks >= 4 and (not column or v > 8192)
    if long_rows and row_blocks < 2 * sms:  # few row blocks, long rows: split V too
        if not column and "block_v" not in _OVERRIDES:  # smaller chunks: more programs per row
            block_v = max(1024, block_v // 4)
            nchunks = triton.cdiv(v, block_v)
            warps = 4
        split = min(MAX_SPLIT, nchunks, triton.cdiv(4 * sms, max(row_blocks, 1)))
    split = min(_OVERRIDES.get("split", split), nchunks)
    split = max(split, 1)
    v_per_split = triton.cdiv(nchunks, split) * block_v
    split = triton.cdiv(v, v_per_split)  # no empty splits
    return _Plan(block_r, block_v, split, v_per_split, warps)


def _p2(x) -> int:
    """Next power of two >= x (x >= 1).  int() specialises a symbolic size under torch.compile,
    which constexpr block sizes need anyway."""
    return 1 << (int(x) - 1).bit_length()


def _geometry(logits: Tensor) -> tuple[int, int, int, int]:
    """(T, stride_b, stride_t, stride_v) so that row r = (r // T, r % T) of [B, T, V].  Rows
    that are adjacent in memory are passed as (1, 1, 0, stride_v): Triton specialises the 1s,
    so the kernel sees row offset = r and coalesces the loads along the rows."""
    if _column_major(logits):
        return 1, 1, 0, logits.stride(-1)
    if logits.dim() == 3:
        return logits.shape[1], logits.stride(0), logits.stride(1), logits.stride(2)
    return 1, logits.stride(0), 0, logits.stride(1)


def _launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """The one place this backend launches a kernel: on ``device``, through wrap_triton."""
    with _device_guard(device):
        wrap_triton(kernel)[grid](*args, **kwargs)


def _transform_args(softcap: float, logit_scale: float) -> tuple[int, float, float, float]:
    """(TRANSFORM, cap, cap_scale, scale) of _transform: 0 = none (the plain kernels)."""
    if softcap != 0.0:
        return 2, softcap, logit_scale / softcap, logit_scale
    return (1 if logit_scale != 1.0 else 0), 1.0, 1.0, logit_scale


def _launch_scores(logits: Tensor, targets: Tensor, il: Optional[Tensor], method: int,
                   ignore_index: int, score: Tensor, lse: Tensor, key: Tensor,
                   softcap: float = 0.0, logit_scale: float = 1.0, zsum: Optional[Tensor] = None) -> None:
    n = targets.shape[0]
    v = logits.shape[-1]
    dev = logits.device
    plan = _plan(logits, n, v)
    T, sb, st, sv = _geometry(logits)
    is_f64 = logits.dtype == torch.float64
    il_arg = il if il is not None else score  # never read by methods without IL
    tf, cap, cap_scale, scale = _transform_args(softcap, logit_scale)
    with_zsum = zsum is not None and method != _M_IRREDUCIBLE
    zsum_arg = zsum if with_zsum else lse  # never written without ZSUM
    if method == _M_IRREDUCIBLE and zsum is not None:
        zsum.fill_(float("nan"))  # no logit is read
    if plan.split == 1 or method == _M_IRREDUCIBLE:
        grid = (triton.cdiv(n, plan.block_r), 1)
        _launch(_score_kernel, grid, dev,
                logits, targets, il_arg, score, lse, key, score, zsum_arg,
                n, v, T, sb, st, sv, ignore_index, 0, cap, cap_scale, scale,
                METHOD=method, IS_F64=is_f64, BLOCK_R=plan.block_r, BLOCK_V=plan.block_v,
                SPLIT=1, TRANSFORM=tf, ZSUM=with_zsum, num_warps=plan.num_warps)
        return
    ws = torch.empty((n * plan.split * (6 if with_zsum else 5),), dtype=lse_dtype(logits.dtype), device=dev)
    grid = (triton.cdiv(n, plan.block_r), plan.split)
    _launch(_score_kernel, grid, dev,
            logits, targets, il_arg, score, lse, key, ws, zsum_arg,
            n, v, T, sb, st, sv, ignore_index, plan.v_per_split, cap, cap_scale, scale,
            METHOD=method, IS_F64=is_f64, BLOCK_R=plan.block_r, BLOCK_V=plan.block_v,
            SPLIT=plan.split, TRANSFORM=tf, ZSUM=with_zsum, num_warps=plan.num_warps)
    merge_r = 16
    _launch(_split_merge_kernel, (triton.cdiv(n, merge_r),), dev,
            logits, targets, il_arg, score, lse, key, ws, zsum_arg,
            n, v, T, sb, st, sv, ignore_index, cap, cap_scale, scale,
            METHOD=method, IS_F64=is_f64, BLOCK_R=merge_r,
            SPLIT=plan.split, SPLIT_P2=_p2(plan.split), TRANSFORM=tf, ZSUM=with_zsum, num_warps=4)


def _score_rows_impl(logits: Tensor, targets: Tensor, il: Optional[Tensor], method: int,
                     ignore_index: int, softcap: float = 0.0, logit_scale: float = 1.0,
                     with_zsum: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    n = targets.shape[0]
    score = torch.empty((n,), dtype=torch.float32, device=logits.device)
    lse = torch.empty((n,), dtype=lse_dtype(logits.dtype), device=logits.device)
    zsum = torch.empty((n if with_zsum else 0,), dtype=lse.dtype, device=logits.device)
    if n == 0:
        return score, lse, zsum
    key = torch.empty((n,), dtype=torch.int64, device=logits.device)
    _launch_scores(logits, targets, il, method, ignore_index, score, lse, key, softcap, logit_scale,
                   zsum if with_zsum else None)
    return score, lse, zsum


def _use_fused(logits: Tensor, n: int, method: int) -> bool:
    if "fused" in _OVERRIDES:
        return bool(_OVERRIDES["fused"])
    return (n <= FUSED_MAX_ROWS and method in _FUSED_METHODS and logits.dtype != torch.float64
            and _plan(logits, n, logits.shape[-1]).split == 1)


def _select_rows_impl(logits: Tensor, targets: Tensor, il: Optional[Tensor], k: int,
                      method: int, ignore_index: int, softcap: float = 0.0,
                      logit_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    dev = logits.device
    n = targets.shape[0]
    v = logits.shape[-1]
    out_idx = torch.empty((k,), dtype=torch.int64, device=dev)
    out_score = torch.empty((k,), dtype=torch.float32, device=dev)
    if n == 0 or k == 0:
        return out_idx, out_score, torch.empty((k,), dtype=torch.bool, device=dev)
    score = torch.empty((n,), dtype=torch.float32, device=dev)
    key = torch.empty((n,), dtype=torch.int64, device=dev)
    il_arg = il if il is not None else score
    tf, cap, cap_scale, scale = _transform_args(softcap, logit_scale)
    if _use_fused(logits, n, method):
        # Same plan (blocks and warps) as score(): the fused scores are bit-identical to it.
        plan = _plan(logits, n, v)
        nblocks = triton.cdiv(n, plan.block_r)
        one = _OVERRIDES.get("one_program", n <= ONE_PROGRAM_MAX_ROWS
                             and (nblocks == 1 or n * v <= ONE_PROGRAM_MAX_ELEMS))
        nprog = 1 if one else min(nblocks, 8 * _sms())
        # the ticket counter must start at 0 (a 4-byte memset; not needed with one program)
        counter = torch.zeros((1,), dtype=torch.int32, device=dev) if not one else key
        out_valid8 = torch.empty((k,), dtype=torch.int8, device=dev)
        T, sb, st, sv = _geometry(logits)
        _launch(_fused_select_kernel, (nprog,), dev,
                logits, targets, il_arg, score, key, counter, out_idx, out_score, out_valid8,
                n, v, T, sb, st, sv, ignore_index, k, cap, cap_scale, scale,
                METHOD=method, IS_F64=logits.dtype == torch.float64,
                BLOCK_R=plan.block_r, BLOCK_V=plan.block_v,
                N_P2=max(16, _p2(n)), ONE_PROGRAM=one, TRANSFORM=tf, num_warps=plan.num_warps)
        return out_idx, out_score, out_valid8.view(torch.bool)
    lse = torch.empty((n,), dtype=lse_dtype(logits.dtype), device=dev)
    _launch_scores(logits, targets, il, method, ignore_index, score, lse, key, softcap, logit_scale)
    cb = _OVERRIDES.get("cand_block", CAND_BLOCK)
    use_cand = _OVERRIDES.get("cand", k <= CAND_MAX_K and n >= 4 * cb)
    if use_cand and k <= cb:
        nb = triton.cdiv(n, cb)
        cand = torch.empty((nb * k,), dtype=torch.int64, device=dev)
        _launch(_block_topk_kernel, (nb,), dev, key, cand, n, k, CB=cb, num_warps=8)
        key = cand
    # Keys are unique, so torch.topk (a radix select on int64) gives one deterministic order.
    top = torch.topk(key, k, sorted=True).values
    rows = 4294967295 - (top & 4294967295)
    valid = (top >> 32) != _INT32_MIN
    return rows, score[rows], valid


# ----------------------------------------------------------------------------------------------
# Ops.  On GPU: torch.library.triton_op, so torch.compile sees the kernels themselves (through
# wrap_triton) and Inductor schedules them; kernels launch on the current stream of the
# logits' device.  Under the interpreter wrap_triton cannot trace interpreted kernels, so the
# same bodies are registered as opaque custom ops with shape-only fake implementations instead.
# ----------------------------------------------------------------------------------------------

_INTERPRETED = _interpreter_requested()


def _op(name: str):
    if _INTERPRETED:
        return torch.library.custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


@_op("rho_kernels::triton_score_rows")
def triton_score_rows(logits: Tensor, targets: Tensor, il: Optional[Tensor], method: int,
                      ignore_index: int, softcap: float = 0.0, logit_scale: float = 1.0,
                      with_zsum: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row score (float32 [N]), lse ([N], float64 for float64 logits) and sum_j z'_j ([N],
    the lse dtype; an empty [0] tensor unless with_zsum) of the transformed logits z'."""
    return _score_rows_impl(logits, targets, il, method, ignore_index, softcap, logit_scale, with_zsum)


@_op("rho_kernels::triton_select_rows")
def triton_select_rows(logits: Tensor, targets: Tensor, il: Optional[Tensor], k: int,
                       method: int, ignore_index: int, softcap: float = 0.0,
                       logit_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k rows: (indices int64 [k], scores float32 [k], valid bool [k])."""
    return _select_rows_impl(logits, targets, il, k, method, ignore_index, softcap, logit_scale)


if _INTERPRETED:

    @triton_score_rows.register_fake
    def _score_rows_fake(logits, targets, il, method, ignore_index, softcap=0.0, logit_scale=1.0, with_zsum=False):
        n = targets.shape[0]
        return (logits.new_empty((n,), dtype=torch.float32),
                logits.new_empty((n,), dtype=lse_dtype(logits.dtype)),
                logits.new_empty((n if with_zsum else 0,), dtype=lse_dtype(logits.dtype)))

    @triton_select_rows.register_fake
    def _select_rows_fake(logits, targets, il, k, method, ignore_index, softcap=0.0, logit_scale=1.0):
        return (logits.new_empty((k,), dtype=torch.int64),
                logits.new_empty((k,), dtype=torch.float32),
                logits.new_empty((k,), dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Backend interface (rho_kernels.backends)
# ----------------------------------------------------------------------------------------------


def score_rows(p: RowProblem, with_lse: bool = True, with_zsum: bool = False):
    """Per-row score (float32 ``[N]``) and log-sum-exp (``[N]``, NaN for ``irreducible``; an
    empty ``[0]`` tensor when ``with_lse`` is False); with ``with_zsum`` also ``sum_j z'_j``."""
    score, lse, zsum = torch.ops.rho_kernels.triton_score_rows(p.logits, p.targets, p.il, p.method,
                                                               p.ignore_index, p.softcap, p.logit_scale,
                                                               with_zsum)
    # The kernels always write the lse (one compiled variant; an N-sized write is noise on a
    # GPU next to the N x V read), so it is only dropped here.
    lse = lse if with_lse else lse.new_empty((0,))
    return (score, lse, zsum) if with_zsum else (score, lse)


def select_rows(p: RowProblem, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` rows in the contract's order: (indices int64, scores float32, valid bool)."""
    return torch.ops.rho_kernels.triton_select_rows(p.logits, p.targets, p.il, k, p.method,
                                                    p.ignore_index, p.softcap, p.logit_scale)


def ce_grad_unavailable_reason(device: torch.device) -> Optional[str]:
    """None where the Triton ``ce_grad_rows`` kernel can run on ``device``, else why not."""
    return triton_ce_grad.unavailable_reason(device)


def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 inplace: bool = False, *, softcap: float = 0.0, logit_scale: float = 1.0,
                 label_smoothing: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """``row_scale * (softmax - onehot)`` per row, in general ``reference.ce_grad_rows``'s gradient
    (see ``triton_ce_grad``); in place over the logits when ``inplace``."""
    general = (softcap, logit_scale, label_smoothing, z_loss)
    if inplace:
        triton_ce_grad.ce_grad_rows_(logits, targets, lse, row_scale, ignore_index, *general)
        return logits
    return triton_ce_grad.ce_grad_rows(logits, targets, lse, row_scale, ignore_index, *general)
