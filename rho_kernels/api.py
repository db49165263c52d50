"""Row ops, the core of rho_kernels: ``score``, ``select``, ``Selection``, ``available_backends``.

The methods and their formulas are in :func:`score`'s docstring (``help(rho_kernels.score)``).
Rules shared by every backend (the math lives in csrc/rho_math.h):

* one pass over each row (online log-sum-exp), accumulated in float32 (float64 for float64
  logits); scores are float32;
* ``targets == ignore_index`` -> score ``-inf`` and the row is ineligible; a NaN score (NaN
  logits or IL, all ``-inf`` logits, ...) stays NaN and is ineligible;
* order: score descending, ties to the lower flat row index, ineligible rows after every
  eligible one (by index); ``Selection.valid`` is False where k reached ineligible rows;
* a target outside ``[0, V)`` raises ValueError for CPU tensors; on GPU (where checking
  would need a host sync) and under ``torch.compile`` that row scores NaN instead.
  No backend ever reads outside the row;
* scores are differentiable (``reducible``/``loss``/``irreducible`` through each backend's fused
  cross-entropy gradient kernel, ``gradnorm``/``entropy`` in torch; see ``_autograd.py``), and
  so is ``Selection.scores`` (a gather of them); indices and ``valid`` are not.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _autograd, _contract, backends, reference, sharding, vocab_parallel
from ._contract import METHODS

__all__ = ["Selection", "score", "select", "available_backends", "METHODS", "BACKENDS"]

BACKENDS: tuple[str, ...] = backends.NAMES


class Selection(NamedTuple):
    """Result of :func:`select`.

    Attributes:
        indices: int64 ``[k]``, flat row indices into ``targets.reshape(-1)``, best first.
        scores: float32 ``[k]``, the score of each picked row (differentiable like :func:`score`).
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


@sharding.sharded_logits
def score(
    logits: Tensor,
    targets: Optional[Tensor] = None,
    irreducible_loss: Optional[Tensor] = None,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """Score every row of ``logits`` in one fused pass.

    Methods (per row: logits ``z``, target ``y``, irreducible loss ``IL``; ``p = softmax(z)``,
    CE = logsumexp(z) - z_y; with ``softcap``/``logit_scale`` every ``z`` here is the transformed
    ``z' = softcap * tanh(logit_scale * z / softcap)``, or ``logit_scale * z`` without a cap):

    =============  ==========================================  ===========================
    method         score (higher = selected first)             reads
    =============  ==========================================  ===========================
    reducible      CE - IL            (RHO-LOSS)               logits, targets, IL
    loss           CE                 (high loss first)        logits, targets
    irreducible    -IL                (lowest IL first)        IL (and targets for masking)
    gradnorm       ||p - onehot(y)||_2                         logits, targets
    entropy        -sum_j p_j log p_j (label-free)             logits (targets for masking)
    =============  ==========================================  ===========================

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float32/bfloat16/float16/float64, any strides;
            never copied or written.
        targets: integer tensor with the leading shape of ``logits``.  May be None for
            ``entropy`` only (no row is then masked).
        irreducible_loss: float tensor with the leading shape; required by ``reducible`` and
            ``irreducible``, ignored (may be omitted) by the other methods.
        method: one of ``METHODS`` (table above).
        ignore_index: rows whose target equals it score ``-inf``.
        backend: ``"auto"`` or one of :func:`available_backends`.
        process_group, vocab_start_index: vocabulary parallel: ``logits`` holds the columns
            ``[vocab_start_index, vocab_start_index + V_local)`` and every rank of the group gets
            the scores of the full rows (see ``rho_kernels.vocab_parallel``; ``backend`` unused).
        softcap: None (no cap) or a finite float > 0: the logits are soft-capped as Gemma 2/3's
            ``final_logit_softcapping``, ``z' = softcap * tanh(logit_scale * z / softcap)``.
        logit_scale: a finite non-zero float multiplying the logits first (Cohere's
            ``logit_scale``; Granite's ``1 / logits_scaling``).  Scores, selections and gradients
            are those of z', computed in the kernel (z' is never materialised).

    Returns:
        float32 tensor of shape ``targets.shape`` (``logits.shape[:-1]``).  Differentiable with
        respect to ``logits`` and ``irreducible_loss`` on every backend: for the CE methods
        d/dz = (softmax(z) - onehot(y)) * g from the log-sum-exp saved by the forward (with a
        transform: softmax(z') times dz'/dz = logit_scale * (1 - (z'/softcap)^2)), and
        d/dIL = -g; ``gradnorm`` and ``entropy`` have their exact gradients; rows whose target is
        ignored (or outside ``[0, V)``) get zeros.  First-order only.  Under ``no_grad`` (or
        with inputs that need no gradient) nothing is saved.
    """
    targets, ignore_index = label_free_targets(logits, targets, method, ignore_index)
    vocab_parallel.check_shard(process_group, vocab_start_index)
    if process_group is not None:  # not differentiable: selection only
        p = _sharded_problem(logits, targets, irreducible_loss, method, ignore_index, softcap, logit_scale)
        return vocab_parallel.score_rows(p, vocab_start_index, process_group).score.view(p.lead_shape)
    p = _contract.prepare(logits, targets, irreducible_loss, method, ignore_index, softcap=softcap,
                          logit_scale=logit_scale)
    impl = backends.resolve(backend, logits.device)
    if _autograd.needs_grad(p):
        return _autograd.scores_with_grad(p, impl.NAME, backend).view(p.lead_shape)
    s, _ = impl.score_rows(p, with_lse=False)
    return s.view(p.lead_shape)


@sharding.sharded_logits
def select(
    logits: Tensor,
    targets: Optional[Tensor] = None,
    irreducible_loss: Optional[Tensor] = None,
    k: Optional[int] = None,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> Selection:
    """Score every row and return the top ``k`` (score descending, ties to the lower index).

    Arguments are those of :func:`score` (methods and formulas there) plus ``k``
    (``0 <= k <= N``, N = number of rows; an int or any integer-like value).  Where the method
    reads no irreducible loss, pass ``k`` by keyword: ``select(logits, targets, k=8,
    method="loss")``.  No host synchronisation: usable under ``torch.compile(fullgraph=True)``
    and CUDA graphs.  Rows that are ineligible (ignored target, NaN score) come after every
    eligible row and are flagged ``valid=False``.  ``process_group``/``vocab_start_index`` and
    ``softcap``/``logit_scale`` (the logit transform): as for :func:`score`.

    ``Selection.scores`` is differentiable like :func:`score` (a gather of the scores); when a
    gradient is needed the rows are scored once more to save the log-sum-exp.
    """
    if k is None:
        raise missing_count("select", irreducible_loss, "irreducible_loss", "k")
    targets, ignore_index = label_free_targets(logits, targets, method, ignore_index)
    vocab_parallel.check_shard(process_group, vocab_start_index)
    if process_group is not None:
        p = _sharded_problem(logits, targets, irreducible_loss, method, ignore_index, softcap, logit_scale)
        k = _contract.check_k(k, p.num_rows)
        f = vocab_parallel.score_rows(p, vocab_start_index, process_group)
        idx = reference.order_rows(f.score, f.eligible)[:k]
        return Selection(idx, f.score[idx], f.eligible[idx])
    p = _contract.prepare(logits, targets, irreducible_loss, method, ignore_index, softcap=softcap,
                          logit_scale=logit_scale)
    k = _contract.check_k(k, p.num_rows)
    impl = backends.resolve(backend, logits.device)
    if _autograd.needs_grad(p):
        indices, _, valid = impl.select_rows(_autograd.detached(p), k)
        scores = _autograd.scores_with_grad(p, impl.NAME, backend).index_select(0, indices)
        return Selection(indices, scores, valid)
    indices, scores, valid = impl.select_rows(p, k)
    return Selection(indices, scores, valid)


def _sharded_problem(logits, targets, irreducible_loss, method, ignore_index, softcap, logit_scale):
    """vocab_parallel's RowProblem of a shard, carrying the checked logit transform."""
    return vocab_parallel.prepare(logits, targets, irreducible_loss, method, ignore_index, softcap=softcap,
                                  logit_scale=logit_scale)


# --------------------------------------------------------------------------- argument habits


def label_free_targets(logits, targets, method: str, ignore_index):
    """``targets=None`` is allowed for the label-free method: every row counts (none ignored)."""
    if targets is not None:
        return targets, ignore_index
    if method != "entropy":
        raise TypeError(f"targets is None, but method {method!r} reads the targets; only 'entropy' is label-free")
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        return targets, ignore_index  # prepare() names the bad logits
    # Class 0 exists in every row (V >= 1 is checked later); keep it unequal to ignore_index.
    filler = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return filler, (-1 if ignore_index == 0 else ignore_index)


def _is_count_like(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, (int, float)) or type(value).__module__ == "numpy"


def missing_count(fn: str, loss_value, loss_name: str, count_name: str) -> TypeError:
    """The error for a missing ``k``/``ratio``, naming the fix when the count was passed in the
    loss's positional slot (the loss argument is optional for methods that read none)."""
    if _is_count_like(loss_value):
        return TypeError(
            f"{fn}() got {loss_value!r} as {loss_name} (the third positional argument) and no {count_name}. "
            f"{loss_name} is a per-row tensor; pass the count by keyword: "
            f"rk.{fn}(logits, targets, {count_name}={loss_value!r}, method=...) "
            f"(or rk.{fn}(logits, targets, {loss_name}, {count_name}) for a method that reads it)"
        )
    return TypeError(f"{fn}() missing the required argument {count_name!r}")

