"""The "cpu" backend: the extension's fused C++ kernels (csrc/cpu/), ``auto`` on CPU tensors.

Long rows in cache-sized blocks, short or strided rows in tiles of one row per SIMD lane,
compiled per instruction set and chosen at run time; parallel over rows; radix top-k on the
64-bit ordering keys.  See csrc/cpu/select_cpu.cpp and csrc/cpu/score_cpu_kernel.h.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import _extension
from ._extension import ce_grad_rows, score_rows, select_rows  # noqa: F401  (the backend interface)
from ._extension import partial_rows  # noqa: F401  (this backend only: the linear ops' tiled forward)

NAME = "cpu"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend can run on ``device``, else why not."""
    return _extension.unavailable_reason("CPU", "cpu", device)


def instruction_set() -> Optional[str]:
    """The instruction set the CPU kernel runs with, and how it was chosen (None without it).

    The scoring kernel is compiled once per instruction set (csrc/cpu/isa/) and the best one this
    CPU supports is chosen at run time; ``RHO_KERNELS_CPU_ISA=scalar|avx2|avx512`` forces a lower one.
    """
    if not _extension.has_kernel("CPU"):
        return None
    try:
        isa = torch.ops.rho_kernels.cpu_isa()
    except (AttributeError, RuntimeError):  # an extension from before run-time dispatch
        record = _extension.BUILD_RECORD or {}
        return f"{record.get('cpu_isa', 'unknown')} (fixed at compile time)"
    forced = os.environ.get("RHO_KERNELS_CPU_ISA")
    how = f"RHO_KERNELS_CPU_ISA={forced}" if forced else "the best this CPU supports"
    return f"{isa} (chosen at run time: {how})"


def ce_grad_unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend's ``ce_grad_rows`` kernel can run on ``device``, else why not."""
    return _extension.unavailable_reason("CPU", "cpu", device, op="ce_grad_rows")


def partials_unavailable_reason(device: torch.device) -> Optional[str]:
    """None where ``partial_rows`` (per-row partials of a vocabulary slice) runs on ``device``."""
    return _extension.unavailable_reason("CPU", "cpu", device, op="partial_rows")
