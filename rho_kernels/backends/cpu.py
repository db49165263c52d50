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


def ce_grad_unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend's ``ce_grad_rows`` kernel can run on ``device``, else why not."""
    return _extension.unavailable_reason("CPU", "cpu", device, op="ce_grad_rows")
