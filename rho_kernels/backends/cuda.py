"""The "cuda" backend: the extension's fused CUDA kernels (csrc/cuda/).

Compiled and linked in CI, but ``auto`` picks it only once it has passed the conformance suite
on a GPU (``_extension.CUDA_VERIFIED``).  It has no ``ce_grad_rows`` kernel of its own: its
backward runs the Triton kernel (see ``backends.grad_backend_for``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _extension
from ._extension import score_rows, select_rows  # noqa: F401  (the backend interface)

NAME = "cuda"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where this backend can run on ``device``, else why not."""
    return _extension.unavailable_reason("CUDA", "cuda", device)


def ce_grad_unavailable_reason(device: torch.device) -> Optional[str]:
    return "the CUDA backend has no ce_grad_rows kernel (its backward runs the Triton kernel)"
