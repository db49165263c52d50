"""The public op API of rho_kernels: ``score``, ``select``, ``Selection``, ``available_backends``.

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

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _contract, _ext, reference
from ._contract import METHODS

__all__ = ["Selection", "score", "select", "available_backends", "METHODS", "BACKENDS"]

BACKENDS: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")


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


def _triton_backend():
    # Imported lazily: importing triton costs a second and it may be absent.  An import
    # statement, not importlib: dynamo cannot trace importlib.import_module.
    from . import triton_select

    return triton_select


def _backend_module(name: str):
    if name == "reference":
        return reference
    if name == "cpu":
        return _ext.cpu
    if name == "cuda":
        return _ext.cuda
    if name == "triton":
        return _triton_backend()
    raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}")


def _unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    try:
        return _backend_module(name).unavailable_reason(device)
    except ImportError as exc:
        return f"it could not be imported ({exc})"


def _auto_backend(device: torch.device) -> str:
    if device.type == "cuda":
        # The CUDA kernel stays out of "auto" until it has passed the suite on a GPU.
        order = ("cuda", "triton") if _ext.CUDA_VERIFIED else ("triton",)
    elif device.type == "cpu":
        order = ("cpu",)
    else:
        order = ()
    for name in order:
        if _unavailable_reason(name, device) is None:
            return name
    return "reference"


def resolve_backend(backend: str, device: torch.device):
    """The backend object that will run on ``device`` (ValueError if it cannot)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
    name = _auto_backend(device) if backend == "auto" else backend
    reason = _unavailable_reason(name, device)  # ValueError for unknown names
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run here: {reason}")
    return _backend_module(name)


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
    return [n for n in BACKENDS if any(_unavailable_reason(n, d) is None for d in devices)]


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
    s, _ = resolve_backend(backend, logits.device).score_rows(p)
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
    indices, scores, valid = resolve_backend(backend, logits.device).select_rows(p, k)
    return Selection(indices, scores, valid)


def interpreter_requested() -> bool:
    """True when the Triton interpreter was asked for (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# =========================================================================== token selection (Rho-1)
# Section owned by the Rho-1 work (issue 5): thin wrappers; the implementation is _selective.py.

from . import _selective  # noqa: E402  (imported last: _selective uses the names above)


def select_mask(
    logits: Tensor,
    targets: Tensor,
    reference_loss: Optional[Tensor],
    ratio: float,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """Keep the best ``ratio`` fraction of the non-ignored tokens of the whole batch.

    Scores every row like :func:`score` (``reference_loss`` plays the irreducible loss) and keeps
    ``k = max(1, int(ratio * n))`` rows, ``n`` = number of targets != ``ignore_index``, ranked
    across the batch exactly as :func:`select` ranks them (score descending, ties to the lower
    flat index).  Ineligible rows (ignored target, NaN score) are never kept, so fewer than ``k``
    are kept when fewer are eligible.  ``k`` stays on the device: no host synchronisation, and the
    function traces under ``torch.compile(fullgraph=True)``.

    Args:
        ratio: a Python float in ``(0, 1]``.
        (others as in :func:`score`.)

    Returns:
        bool tensor of shape ``targets.shape``, True on the kept tokens.
    """
    return _selective.select_mask(logits, targets, reference_loss, ratio, method=method,
                                  ignore_index=ignore_index, backend=backend)


def select_sequences(
    logits: Tensor,
    targets: Tensor,
    reference_loss: Optional[Tensor],
    k: int,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
) -> Selection:
    """Sequence-level selection: the ``k`` sequences with the highest mean token score.

    ``logits`` must be ``[B, T, V]``.  A sequence's score is the mean of the token scores (as
    :func:`score` computes them) over its non-ignored tokens; a sequence with no non-ignored
    token, or whose mean is NaN (a NaN token score, a target outside ``[0, V)``), is ineligible.
    Order as in :func:`select`: mean descending, ties to the lower sequence index, ineligible last.

    Returns:
        :class:`Selection` over sequences: ``indices`` int64 ``[k]`` (index the batch with them),
        ``scores`` float32 ``[k]`` (mean scores), ``valid`` bool ``[k]``.  Fixed size ``k``, no
        host synchronisation.
    """
    return _selective.select_sequences(logits, targets, reference_loss, k, method=method,
                                       ignore_index=ignore_index, backend=backend)


def selective_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    reference_loss: Tensor,
    ratio: float,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    """Rho-1 selective language-modelling loss: CE over the tokens with the highest excess loss.

    Keeps ``k = max(1, int(ratio * n))`` of the ``n`` non-ignored tokens of the batch, ranked by
    excess loss ``CE - reference_loss`` exactly as ``select_mask(..., method="reducible")`` does,
    and returns their cross-entropy.  Forward: one fused pass (the backend's ``score_rows``)
    gives CE and the per-row log-sum-exp, which is saved.  Backward: ``(softmax - onehot) *
    grad / n_selected`` on the kept rows and exact zeros elsewhere, computed from the saved
    log-sum-exp by the ``ce_grad_rows`` kernel; the only ``N x V`` buffer is the gradient itself.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float32/bfloat16/float16/float64, any strides.
        targets: integer tensor with the leading shape of ``logits``.
        reference_loss: float tensor with the leading shape: the reference model's per-token CE.
        ratio: Python float in ``(0, 1]``; ``ratio=1`` is plain cross-entropy (mean over tokens).
        ignore_index: targets equal to it are never selected and not counted in ``n``.
        reduction: ``"mean"`` (over the selected tokens; 0 when none is selected), ``"sum"``, or
            ``"none"`` (per-token CE of shape ``targets.shape``, 0 on unselected tokens).
        backend: forward backend, as for :func:`score`.  The backward uses the matching kernel
            ("reference": torch; "cpu": the extension's kernel; "triton"/"cuda": Triton); with
            ``"auto"`` the fastest backward kernel on the device.
        inplace_backward: write the gradient over the logits' storage instead of allocating it
            (saves one ``N x V`` buffer).  Opt-in: the logits must be a non-leaf tensor that
            nothing else reads after this loss's backward (e.g. straight out of the LM head).

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or ``targets.shape`` for "none".
    """
    return _selective.selective_cross_entropy(logits, targets, reference_loss, ratio,
                                              ignore_index=ignore_index, reduction=reduction,
                                              backend=backend, inplace_backward=inplace_backward)
