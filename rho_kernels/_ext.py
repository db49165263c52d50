"""The compiled extension ``rho_kernels._C``: loading, fake implementations, and the two
backends that dispatch through it ("cpu" and "cuda" share one op; the dispatcher picks the
kernel by device).

Set ``RHO_KERNELS_NO_EXT=1`` at build time to build no extension; the package then works
through the reference (and Triton where it runs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._contract import RowProblem, lse_dtype

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.rho_kernels.*)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # built without the extension, or a broken build
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

# The CUDA kernel has not yet passed the conformance suite on a real GPU (see README);
# until it has, backend="auto" never picks it.  Flip only with committed GPU results.
CUDA_VERIFIED = False


def _query_kernel(dispatch_key: str, op: str) -> bool:
    if LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rho_kernels::{op}", dispatch_key)


# Registrations happen when _C loads, so the answer is fixed at import time.  A dict lookup
# (not the dispatcher query) keeps backend resolution traceable by torch.compile.
_KERNELS: dict[tuple[str, str], bool] = {
    (key, op): _query_kernel(key, op) for key in ("CPU", "CUDA") for op in ("score_rows", "select_rows")
}


def has_kernel(dispatch_key: str, op: str = "select_rows") -> bool:
    if (dispatch_key, op) not in _KERNELS:
        return _query_kernel(dispatch_key, op)
    return _KERNELS[(dispatch_key, op)]


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


class ExtensionBackend:
    """A backend that calls the extension's op for one device type."""

    def __init__(self, name: str, device_type: str, dispatch_key: str) -> None:
        self.NAME = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key

    def unavailable_reason(self, device: torch.device) -> str | None:
        if LOAD_ERROR is not None:
            return f"the extension rho_kernels._C is not built or failed to load ({LOAD_ERROR})"
        if not has_kernel(self.dispatch_key):
            return f"the extension was built without {self.dispatch_key} kernels"
        if device.type != self.device_type:
            return f"it runs on {self.device_type} tensors, got tensors on {device}"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None

    def score_rows(self, p: RowProblem) -> tuple[Tensor, Tensor]:
        return torch.ops.rho_kernels.score_rows(p.logits, p.targets, p.il, p.method, p.ignore_index)

    def select_rows(self, p: RowProblem, k: int) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.rho_kernels.select_rows(p.logits, p.targets, p.il, k, p.method, p.ignore_index)


cpu = ExtensionBackend("cpu", "cpu", "CPU")
cuda = ExtensionBackend("cuda", "cuda", "CUDA")
