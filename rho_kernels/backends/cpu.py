"""The "cpu" backend: the extension's fused C++ kernels (csrc/cpu/), ``auto`` on CPU tensors.

One pass over each row in cache-sized blocks, vectorised for the instruction set the build
targets, parallel over rows; top-k on the 64-bit ordering keys.  See csrc/cpu/select_cpu.cpp.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from ._extension import ce_grad_rows, score_rows, select_rows  # noqa: F401  (the backend interface)

NAME = "cpu"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend can run on ``device``, else why not."""
    return _extension.unavailable_reason("CPU", "cpu", device)


def instruction_set() -> Optional[str]:
    """The instruction set the CPU kernel runs with, and how it was chosen (None without it).

    Fixed at compile time: the build's ``-march`` (``RHO_KERNELS_CPU_ARCH``) decides which
    ``at::vec`` width select_cpu.cpp uses; setup.py records the result in the build record.
    """
    if not _extension.has_kernel("CPU"):
        return None
    record = _extension.BUILD_RECORD or {}
    isa = record.get("cpu_isa")
    if not isa:
        return "unknown (the extension has no build record; rebuild to record it)"
    return f"{isa} (fixed at compile time by -march={record.get('cpu_march', '?')})"


def ce_grad_unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend's ``ce_grad_rows`` kernel can run on ``device``, else why not."""
    return _extension.unavailable_reason("CPU", "cpu", device, op="ce_grad_rows")
