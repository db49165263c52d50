"""Triton kernel of the selective cross-entropy backward (``ce_grad_rows``).

    grad[r, j] = row_scale[r] * (exp(z[r, j] - lse[r]) - [j == targets[r]])

in general (constexpr specialisations; the plain kernel is the one above) the gradient w.r.t. the
raw logits of ``row_scale * [(1-eps)(lse - z'_y) + eps(lse - mean z') + z_loss lse^2]`` with
``z'`` the soft-capped / scaled logits (``reference.ce_grad_rows``):

    dL/dz'_j = s [(1 + 2 z_loss lse) p_j - (1 - eps)[j == y] - eps / V],  times dz'/dz,

with exact zeros (and no logit read) on rows whose ``row_scale`` is 0 or whose target is
ignored / outside ``[0, V)``.  The saved log-sum-exp turns the softmax into a pointwise map, so
each program handles one ``BLOCK``-wide tile of one row in a single read + write: no ``N x V``
temporary beyond the gradient (or none at all with the in-place variant).

The kernels are wrapped with :func:`torch.library.triton_op`, so they trace under
``torch.compile(fullgraph=True)``.  On CPU they run only under ``TRITON_INTERPRET=1`` (set before
triton is imported).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from ._triton_compat import triton_op, wrap_triton

NAME = "triton"


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before triton is imported"
    return f"Triton kernels run on CUDA tensors, got tensors on {device}"


def _device_guard(device: torch.device):
    """Makes ``device`` the current CUDA device for a launch: Triton launches on the current
    device (and its current stream), which need not be the tensors' one.  No-op off CUDA."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def _tanh(x):
    """rho::tanh_acc (csrc/rho_math.h): an odd polynomial below |x| = 0.55 (relative error
    3e-11), (1 - e) / (1 + e) with e = exp(-2|x|) above (no cancellation there); +-inf -> +-1,
    NaN -> NaN."""
    a = tl.abs(x)
    u = a * a
    p = 0.0023953687722703012 * u - 0.008413468354891797
    p = p * u + 0.02178262500486329
    p = p * u - 0.05395961158141095
    p = p * u + 0.13333293354371045
    p = p * u - 0.3333333271103655
    small = a + a * (u * p)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    r = tl.where(a < 0.55, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _ce_grad_rows_kernel(
    z_ptr, out_ptr, t_ptr, lse_ptr, scale_ptr,
    V, T,
    z_sb, z_st, z_sv,
    o_sb, o_st, o_sv,
    ignore_index,
    cap, cap_scale, scale, smoothing, z_loss,
    BLOCK: tl.constexpr,
    TRANSFORM: tl.constexpr = 0,
    GENERAL: tl.constexpr = False,
):
    # TRANSFORM: triton_select._transform's (0 none, 1 scale, 2 cap); GENERAL: label smoothing
    # and/or z-loss.  Both off: the plain kernel.
    # int64 row index: row * stride can exceed 2^31 for large N * V.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < V
    y = tl.load(t_ptr + row)
    s = tl.load(scale_ptr + row)
    lse = tl.load(lse_ptr + row)
    live = (y != ignore_index) & (y >= 0) & (y < V) & (s != 0)
    # Rows are the flattened leading dims (b, t); [N, V] logits come with T = N, stride_b unused.
    b = row // T
    t = row - b * T
    # int64 column offsets too: cols * stride overflows int32 for column-major [N, V] at LLM sizes.
    cols64 = cols.to(tl.int64)
    z = tl.load(z_ptr + b * z_sb + t * z_st + cols64 * z_sv, mask=in_row & live, other=float("-inf"))
    z = z.to(lse.dtype)
    if TRANSFORM == 1:
        z = z * scale
    elif TRANSFORM == 2:
        tz = _tanh(z * cap_scale)
        z = cap * tz
    p = tl.exp(z - lse)  # a -inf logit gives exactly 0
    if GENERAL:
        p = p * (1.0 + 2.0 * z_loss * lse)
        g = s * (p - tl.where(cols == y, 1.0 - smoothing, 0.0).to(lse.dtype) - smoothing / V)
    else:
        # s * (p - onehot): no cancellation on the target column when p_y is close to 1.
        g = s * (p - tl.where(cols == y, 1.0, 0.0).to(lse.dtype))
    if TRANSFORM == 1:
        g = g * scale
    elif TRANSFORM == 2:
        g = g * (scale * (1.0 - tz * tz))  # dz'/dz
    g = tl.where(live, g, 0.0)
    tl.store(out_ptr + b * o_sb + t * o_st + cols64 * o_sv, g.to(out_ptr.dtype.element_ty), mask=in_row)


def _row_layout(x: Tensor, num_rows: int) -> tuple[int, int, int, int]:
    """(T, stride_b, stride_t, stride_v) of the flattened-rows view of ``x``."""
    if x.dim() == 3:
        return max(x.shape[1], 1), x.stride(0), x.stride(1), x.stride(2)
    return max(num_rows, 1), 0, x.stride(0), x.stride(1)


def _launch(logits: Tensor, out: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
            softcap: float = 0.0, logit_scale: float = 1.0, label_smoothing: float = 0.0,
            z_loss: float = 0.0) -> None:
    n = targets.shape[0]
    v = logits.shape[-1]
    if n == 0 or v == 0:
        return
    block = min(4096, triton.next_power_of_2(v))
    t_len, z_sb, z_st, z_sv = _row_layout(logits, n)
    _, o_sb, o_st, o_sv = _row_layout(out, n)
    grid = (n, triton.cdiv(v, block))
    with _device_guard(logits.device):  # Triton launches on the current device, not the tensor's
        wrap_triton(_ce_grad_rows_kernel)[grid](
            logits, out, targets, lse, row_scale,
            v, t_len,
            z_sb, z_st, z_sv,
            o_sb, o_st, o_sv,
            ignore_index,
            softcap if softcap != 0.0 else 1.0, logit_scale / softcap if softcap != 0.0 else 1.0, logit_scale,
            label_smoothing, z_loss,
            BLOCK=block,
            TRANSFORM=2 if softcap != 0.0 else (1 if logit_scale != 1.0 else 0),
            GENERAL=label_smoothing != 0.0 or z_loss != 0.0,
            num_warps=8 if block >= 2048 else 4,
        )


@triton_op("rho_kernels::ce_grad_rows_triton", mutates_args=())
def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 softcap: float = 0.0, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> Tensor:
    """Out-of-place gradient: contiguous, the logits' shape and dtype."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch(logits, out, targets, lse, row_scale, ignore_index, softcap, logit_scale, label_smoothing, z_loss)
    return out


@triton_op("rho_kernels::ce_grad_rows_triton_", mutates_args=("logits",))
def ce_grad_rows_(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                  softcap: float = 0.0, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> None:
    """In-place gradient: overwrites ``logits`` (each element is read before it is written)."""
    _launch(logits, logits, targets, lse, row_scale, ignore_index, softcap, logit_scale, label_smoothing, z_loss)
