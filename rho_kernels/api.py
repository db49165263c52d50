"""Row ops, the core of rho_kernels: ``score``, ``select``, ``Selection``, ``available_backends``.

Methods (per row: logits ``z``, target ``y``, irreducible loss ``IL``; CE = logsumexp(z) - z_y):

=============  ==========================================  ===========================
method         score (higher = selected first)             reads
=============  ==========================================  ===========================
reducible      CE - IL            (RHO-LOSS)               logits, targets, IL
loss           CE                 (high loss first)        logits, targets
irreducible    -IL                (lowest IL first)        IL (and targets for masking)
gradnorm       ||softmax(z) - onehot(y)||_2                logits, targets
entropy        -sum_j p_j log p_j (label-free)             logits (targets for masking)
=============  ==========================================  ===========================

Rules shared by every backend (the math lives in csrc/rho_math.h):

* one pass over each row (online log-sum-exp), accumulated in float32 (float64 for float64
  logits); scores are float32;
* ``targets == ignore_index`` -> score ``-inf`` and the row is ineligible; a NaN score (NaN
  logits or IL, all ``-inf`` logits, ...) stays NaN and is ineligible;
* order: score descending, ties to the lower flat row index, ineligible rows after every
  eligible one (by index); ``Selection.valid`` is False where k reached ineligible rows;
* a target outside ``[0, V)`` raises ValueError for CPU tensors; on GPU (where checking
  would need a host sync) and under ``torch.compile`` that row scores NaN instead.
  No backend ever reads outside the row.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _contract, backends
from ._contract import METHODS

__all__ = ["Selection", "score", "select", "available_backends", "METHODS", "BACKENDS"]

BACKENDS: tuple[str, ...] = backends.NAMES


class Selection(NamedTuple):
    """Result of :func:`select`.

    Attributes:
        indices: int64 ``[k]``, flat row indices into ``targets.reshape(-1)``, best first.
        scores: float32 ``[k]``, the score of each picked row.
        valid: bool ``[k]``, False where fewer than ``k`` rows were eligible.
    """

    indices: Tensor
    scores: Tensor
    valid: Tensor


def available_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Backends that can run on ``device`` (default: on any device of this machine).

    "triton" is listed where a CUDA GPU is present, or on CPU when ``TRITON_INTERPRET=1`` was
    set before triton was imported; "cuda" where the extension has CUDA kernels and a GPU runs.
    """
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    return [n for n in BACKENDS if any(backends.unavailable_reason(n, d) is None for d in devices)]


def score(
    logits: Tensor,
    targets: Tensor,
    irreducible_loss: Optional[Tensor] = None,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """Score every row of ``logits`` in one fused pass.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float32/bfloat16/float16/float64, any strides;
            never copied or written.
        targets: integer tensor with the leading shape of ``logits``.
        irreducible_loss: float tensor with the leading shape; required by ``reducible`` and
            ``irreducible``, ignored by the other methods.
        method: one of ``METHODS`` (see the module docstring for formulas).
        ignore_index: rows whose target equals it score ``-inf``.
        backend: ``"auto"`` or one of :func:`available_backends`.

    Returns:
        float32 tensor of shape ``targets.shape``.
    """
    p = _contract.prepare(logits, targets, irreducible_loss, method, ignore_index)
    s, _ = backends.resolve(backend, logits.device).score_rows(p)
    return s.view(p.lead_shape)


def select(
    logits: Tensor,
    targets: Tensor,
    irreducible_loss: Optional[Tensor],
    k: int,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
) -> Selection:
    """Score every row and return the top ``k`` (score descending, ties to the lower index).

    Arguments are those of :func:`score` plus ``k`` (``0 <= k <= N``, N = number of rows).
    No host synchronisation: usable under ``torch.compile(fullgraph=True)`` and CUDA graphs.
    Rows that are ineligible (ignored target, NaN score) come after every eligible row and
    are flagged ``valid=False``.
    """
    p = _contract.prepare(logits, targets, irreducible_loss, method, ignore_index)
    k = _contract.check_k(k, p.num_rows)
    indices, scores, valid = backends.resolve(backend, logits.device).select_rows(p, k)
    return Selection(indices, scores, valid)
