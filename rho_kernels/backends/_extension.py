"""The compiled extension ``rho_kernels._C``: loading it, and the fake (meta) implementations
that let ``torch.compile`` trace its ops.

The "cpu" and "cuda" backends (``cpu.py``, ``cuda.py``) both call the extension's ops; the
dispatcher picks the kernel by the tensors' device.  Build with ``RHO_KERNELS_NO_EXT=1`` to get
no extension: the package then runs through the reference (and Triton where it runs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._contract import RowProblem, lse_dtype

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.rho_kernels.*)

    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # built without the extension, or a broken build
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

# The CUDA kernel has not yet passed the conformance suite on a real GPU (see README);
# until it has, backend="auto" never picks it.  Flip only with committed GPU results.
CUDA_VERIFIED = False

OPS = ("score_rows", "select_rows", "ce_grad_rows")


def _query_kernel(dispatch_key: str, op: str) -> bool:
    if LOAD_ERROR is not None or not hasattr(torch.ops.rho_kernels, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rho_kernels::{op}", dispatch_key)


# Registrations happen when _C loads, so the answer is fixed at import time.  A dict lookup
# (not the dispatcher query) keeps backend resolution traceable by torch.compile.
_KERNELS: dict[tuple[str, str], bool] = {(key, op): _query_kernel(key, op) for key in ("CPU", "CUDA") for op in OPS}


def has_kernel(dispatch_key: str, op: str = "select_rows") -> bool:
    """Whether the extension registered ``rho_kernels::op`` for ``dispatch_key``."""
    return _KERNELS.get((dispatch_key, op), False)


def unavailable_reason(dispatch_key: str, device_type: str, device: torch.device,
                       op: str = "select_rows") -> Optional[str]:
    """Why the extension's ``op`` cannot run for ``device`` (None where it can)."""
    if LOAD_ERROR is not None:
        return f"the extension rho_kernels._C is not built or failed to load ({LOAD_ERROR})"
    if not has_kernel(dispatch_key, op):
        return f"the extension was built without a {dispatch_key} kernel for {op}"
    if device.type != device_type:
        return f"it runs on {device_type} tensors, got tensors on {device}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def score_rows(p: RowProblem) -> tuple[Tensor, Tensor]:
    return torch.ops.rho_kernels.score_rows(p.logits, p.targets, p.il, p.method, p.ignore_index)


def select_rows(p: RowProblem, k: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.rho_kernels.select_rows(p.logits, p.targets, p.il, k, p.method, p.ignore_index)


def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 inplace: bool = False) -> Tensor:
    if inplace:
        torch.ops.rho_kernels.ce_grad_rows_(logits, targets, lse, row_scale, ignore_index)
        # The C++ op's (a!) annotation does not bump the version counter by itself; bumping it
        # makes autograd reject a graph that saved these logits elsewhere instead of using
        # gradient values as logits.
        torch.autograd.graph.increment_version(logits)
        return logits
    return torch.ops.rho_kernels.ce_grad_rows(logits, targets, lse, row_scale, ignore_index)


if LOAD_ERROR is None:

    @torch.library.register_fake("rho_kernels::score_rows")
    def _score_rows_fake(logits, targets, irreducible_loss, method, ignore_index):
        n = targets.shape[0]
        return (
            logits.new_empty((n,), dtype=torch.float32),
            logits.new_empty((n,), dtype=lse_dtype(logits.dtype)),
        )

    @torch.library.register_fake("rho_kernels::select_rows")
    def _select_rows_fake(logits, targets, irreducible_loss, k, method, ignore_index):
        return (
            logits.new_empty((k,), dtype=torch.int64),
            logits.new_empty((k,), dtype=torch.float32),
            logits.new_empty((k,), dtype=torch.bool),
        )

    if hasattr(torch.ops.rho_kernels, "ce_grad_rows"):

        @torch.library.register_fake("rho_kernels::ce_grad_rows")
        def _ce_grad_rows_fake(logits, targets, lse, row_scale, ignore_index):
            return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

        @torch.library.register_fake("rho_kernels::ce_grad_rows_")
        def _ce_grad_rows_inplace_fake(logits, targets, lse, row_scale, ignore_index):
            return None
