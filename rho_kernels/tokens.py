"""Rho-1 token ops: token and sequence selection, and the selective cross-entropy with a fused
backward.

Public entry points (re-exported as ``rho_kernels.<name>``):

* :func:`select_mask` -- bool mask of the top ``ratio`` fraction of the non-ignored tokens of the
  batch, ranked across the whole batch by the order of ``rk.select``;
* :func:`select_sequences` -- top-k sequences by the mean score of their non-ignored tokens;
* :func:`selective_cross_entropy` -- mean CE over the tokens with the highest excess loss
  (CE - reference loss), differentiable, with the backward computed from the saved per-row
  log-sum-exp by the backend's ``ce_grad_rows`` kernel (CPU, Triton, or the reference's torch code).

Everything runs on the tensors' device without host synchronisation: the number of kept tokens
``k = kept_count(n, ratio)`` (:func:`kept_count`: ``ratio * n`` rounded to the nearest integer,
halves up, at least 1 -- the rounding rule of the whole package) is a device tensor, and the top-k becomes a comparison of 64-bit
ordering keys (``rho::select_key`` of csrc/rho_math.h, computed with torch integer ops) against
the k-th largest key.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _contract, backends, reference, sharding, vocab_parallel
from ._contract import lse_dtype
from .api import Selection, label_free_targets, missing_count

__all__ = ["select_mask", "select_sequences", "selective_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- selection


def ordering_key(score: Tensor, eligible: Tensor) -> Tensor:
    """``rho::select_key`` as a signed int64 (same order): larger key = selected first.

    High word: the monotone uint32 image of the float32 score (``-0.0`` read as ``+0.0``), 0 for
    ineligible rows; low word: the complemented row index, so ties go to the lower index.
    Subtracting 2^31 from the high word maps the unsigned order onto int64 without overflow.
    """
    u = score.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    u = torch.where(u == 0x80000000, torch.zeros_like(u), u)
    ordered = torch.where(u >= 0x80000000, 0xFFFFFFFF - u, u | 0x80000000)
    hi = torch.where(eligible, ordered, torch.zeros_like(ordered))
    low = 0xFFFFFFFF - torch.arange(score.numel(), device=score.device, dtype=torch.int64)
    return (hi - 2**31) * 2**32 + low


def check_reference_loss(targets: Tensor, reference_loss: Optional[Tensor], method: str = "reducible") -> None:
    """Checks under the public name (prepare() would call it irreducible_loss)."""
    if reference_loss is None and method in _contract.IL_METHODS:
        raise ValueError(f"method {method!r} needs reference_loss (the reference model's per-token loss), got None")
    if isinstance(reference_loss, Tensor) and isinstance(targets, Tensor) and reference_loss.shape != targets.shape:
        raise ValueError(f"reference_loss shape {tuple(reference_loss.shape)} does not match the targets' shape "
                         f"{tuple(targets.shape)}")


def _resolved_names(backend: str, device: str) -> str:
    """``"<forward backend>|<backward kernel>"`` for a backend argument on a device."""
    dev = torch.device(device)
    forward_name = backends.resolve(backend, dev).NAME
    return forward_name + "|" + backends.grad_backend_for(backend, forward_name, dev)


def resolve_names(backend: str, device: torch.device) -> tuple[str, str]:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
    forward_name, grad_name = _resolved_names(backend, str(device)).split("|")
    return forward_name, grad_name


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in (0, 1], got {ratio!r}")
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def kept_count(n: int, ratio: float) -> int:
    """How many of ``n`` items a ``ratio`` keeps: the package's one rounding rule.

    ``max(1, floor(ratio * n + 0.5))``: ``ratio * n`` to the nearest integer, halves up, at least
    one (0.1 of 35 -> 4, 0.5 of 5 -> 3, 0.29 of 100 -> 29 although ``0.29 * 100`` is
    28.999999999999996 in binary floating point).  Used by :func:`select_mask`,
    :func:`selective_cross_entropy` (on the device, :func:`keep_count`) and
    ``OnlineBatchSelector`` (capped at ``n``).
    """
    return max(1, math.floor(float(ratio) * n + 0.5))


def keep_count(num_tokens: Tensor, ratio: float) -> Tensor:
    """:func:`kept_count` on the device (float64, as the Python arithmetic): no host sync."""
    return torch.floor(num_tokens.to(torch.float64) * ratio + 0.5).to(torch.int64).clamp_min(1)


def top_fraction_mask(score: Tensor, eligible: Tensor, counted: Tensor, ratio: float) -> Tensor:
    """Flat bool mask of the ``kept_count(counted.sum(), ratio)`` best eligible rows.

    Selected = eligible and key >= the k-th largest key; keys are unique, so exactly the top k
    rows in rk.select order pass (fewer if fewer than k are eligible).  One sort of N int64.
    """
    n_rows = score.numel()
    if n_rows == 0:
        return torch.zeros_like(eligible)
    key = ordering_key(score, eligible)
    k = keep_count(counted.sum(), ratio)
    kth = torch.sort(key, descending=True).values.gather(0, (k - 1).clamp(0, n_rows - 1).reshape(1))
    return eligible & (key >= kth)


def _prepare_detached(logits, targets, reference_loss, method: str, ignore_index: int, softcap=None,
                      logit_scale=1.0) -> _contract.RowProblem:
    # Selection is not differentiable: score a detached view (no copy) so that no autograd
    # bookkeeping reaches the ops.
    p = _contract.prepare(logits, targets, reference_loss, method, ignore_index, softcap=softcap,
                          logit_scale=logit_scale)
    return p._replace(logits=p.logits.detach())


def _row_scores(p: _contract.RowProblem, backend: str) -> Tensor:
    """Per-row scores on the backend ``backend`` resolves to first (no lse: nothing here needs it)."""
    score, _ = backends.get(resolve_names(backend, p.logits.device)[0]).score_rows(p, with_lse=False)
    return score


def _nonignored(p: _contract.RowProblem) -> Tensor:
    return p.targets != p.ignore_index


@sharding.sharded_logits
def select_mask(
    logits: Tensor,
    targets: Optional[Tensor] = None,
    reference_loss: Optional[Tensor] = None,
    ratio: Optional[float] = None,
    *,
    method: str = "reducible",
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """Keep the best ``ratio`` fraction of the non-ignored tokens of the whole batch.

    Scores every row like :func:`score` (``reference_loss`` plays the irreducible loss) and keeps
    ``k = kept_count(n, ratio)`` rows (``ratio * n`` to the nearest integer, halves up, at least
    1), ``n`` = number of targets != ``ignore_index``, ranked
    across the batch exactly as :func:`select` ranks them (score descending, ties to the lower
    flat index).  Ineligible rows (ignored target, NaN score) are never kept, so fewer than ``k``
    are kept when fewer are eligible.  ``k`` stays on the device: no host synchronisation, and the
    function traces under ``torch.compile(fullgraph=True)``.

    Args:
        ratio: a Python float in ``(0, 1]``; pass it by keyword when the method reads no
            ``reference_loss`` (``select_mask(logits, targets, ratio=0.6, method="loss")``).
        targets: may be None for ``entropy`` (every token counts).
        softcap, logit_scale: the logit transform (Gemma 2's soft-cap, Cohere's / Granite's
            scale): tokens are scored and ranked on ``z'``, as for :func:`score`.
        (others as in :func:`score`.)

    Returns:
        bool tensor of shape ``targets.shape``, True on the kept tokens.
    """
    if ratio is None:
        raise missing_count("select_mask", reference_loss, "reference_loss", "ratio")
    ratio = check_ratio(ratio)
    targets, ignore_index = label_free_targets(logits, targets, method, ignore_index)
    check_reference_loss(targets, reference_loss, method)
    vocab_parallel.check_shard(process_group, vocab_start_index)
    transform = dict(softcap=softcap, logit_scale=logit_scale)
    if process_group is not None:  # vocabulary-parallel logits (see rk.score)
        p = vocab_parallel.prepare(logits, targets, reference_loss, method, ignore_index, **transform)
        f = vocab_parallel.score_rows(p, vocab_start_index, process_group)
        return top_fraction_mask(f.score, f.eligible, _nonignored(p), ratio).view(p.lead_shape)
    p = _prepare_detached(logits, targets, reference_loss, method, ignore_index, **transform)
    score = _row_scores(p, backend)
    mask = top_fraction_mask(score, reference.eligible_rows(p, score), _nonignored(p), ratio)
    return mask.view(p.lead_shape)


@sharding.sharded_logits
def select_sequences(
    logits: Tensor,
    targets: Optional[Tensor] = None,
    reference_loss: Optional[Tensor] = None,
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
    """Sequence-level selection: the ``k`` sequences with the highest mean token score.

    ``logits`` must be ``[B, T, V]``.  A sequence's score is the mean of the token scores (as
    :func:`score` computes them) over its non-ignored tokens; a sequence with no non-ignored
    token, or whose mean is NaN (a NaN token score, a target outside ``[0, V)``), is ineligible.
    Order as in :func:`select`: mean descending, ties to the lower sequence index, ineligible last.
    Pass ``k`` by keyword when the method reads no ``reference_loss``; ``targets`` may be None for
    ``entropy``; ``softcap``/``logit_scale``: the logit transform of :func:`score`.  Not
    differentiable (selection only).

    Returns:
        :class:`Selection` over sequences: ``indices`` int64 ``[k]`` (index the batch with them),
        ``scores`` float32 ``[k]`` (mean scores), ``valid`` bool ``[k]``.  Fixed size ``k``, no
        host synchronisation.
    """
    if k is None:
        raise missing_count("select_sequences", reference_loss, "reference_loss", "k")
    targets, ignore_index = label_free_targets(logits, targets, method, ignore_index)
    check_reference_loss(targets, reference_loss, method)
    vocab_parallel.check_shard(process_group, vocab_start_index)
    sharded = process_group is not None  # vocabulary-parallel logits (see rk.score)
    p = (vocab_parallel.prepare if sharded else _prepare_detached)(logits, targets, reference_loss, method,
                                                                  ignore_index, softcap=softcap,
                                                                  logit_scale=logit_scale)
    if p.logits.dim() != 3:
        raise ValueError(f"select_sequences needs [B, T, V] logits, got shape {tuple(p.logits.shape)}")
    num_seq, seq_len = p.lead_shape
    k = _contract.check_k(k, num_seq)
    if sharded:
        return top_sequences(vocab_parallel.score_rows(p, vocab_start_index, process_group).score,
                             _nonignored(p), num_seq, seq_len, k)
    score = _row_scores(p, backend)
    return top_sequences(score, _nonignored(p), num_seq, seq_len, k)


def sequence_means(score: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence of ``[B, T]`` token scores: the float32 mean of its ``counted`` tokens (NaN
    where it has none) and how many it has."""
    # float64 sum: the mean is exact to float32 rounding.  A NaN token score (NaN logits /
    # reference loss, target out of range) makes the mean NaN.
    total = torch.where(counted, score.to(torch.float64), 0.0).sum(-1)
    count = counted.sum(-1)
    return (total / count).to(torch.float32), count


def top_sequences(score: Tensor, counted: Tensor, num_seq: int, seq_len: int, k: int) -> Selection:
    """The ``k`` best sequences by the mean of their ``counted`` token scores (flat ``[B*T]``)."""
    mean, count = sequence_means(score.reshape(num_seq, seq_len), counted.reshape(num_seq, seq_len))
    eligible = (count > 0) & ~torch.isnan(mean)
    order = torch.topk(ordering_key(mean, eligible), k).indices
    return Selection(order, mean[order], eligible[order])


# --------------------------------------------------------------------------- selective CE


def target_logits(logits: Tensor, targets: Tensor, live: Tensor) -> Tensor:
    """z[r, y_r] for every row (0 where not ``live``), gathered in place: no copy of the logits."""
    safe_t = torch.where(live, targets, torch.zeros_like(targets))
    return logits.gather(-1, safe_t.view(*logits.shape[:-1], 1)).reshape(-1)


def check_loss_options(label_smoothing, z_loss, weights, targets) -> tuple[float, float]:
    """``(label_smoothing, z_loss)`` as floats, and the metadata of ``weights`` (a CPU tensor's
    values too, eagerly: free of syncs there), with errors that show the offending value."""
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {value!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] (as F.cross_entropy's), got {label_smoothing!r}")
    if not (math.isfinite(float(z_loss)) and float(z_loss) >= 0.0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"weights must be a float tensor, got dtype {weights.dtype}")
        if isinstance(targets, Tensor):
            if weights.shape != targets.shape:
                raise ValueError(f"weights shape {tuple(weights.shape)} does not match the targets' shape "
                                 f"{tuple(targets.shape)}")
            if weights.device != targets.device:
                raise ValueError(f"weights are on {weights.device} but targets on {targets.device}")
        if weights.device.type == "cpu" and not _contract.is_compiling() and weights.numel():
            bad = ~(torch.isfinite(weights) & (weights >= 0))
            if bool(bad.any()):
                where = int(bad.reshape(-1).nonzero()[0, 0])
                raise ValueError(f"weights must be finite and >= 0, got {weights.reshape(-1)[where].item()} at flat "
                                 f"index {where}")
    return float(label_smoothing), float(z_loss)


def row_losses(ce: Tensor, lse: Tensor, zsum: Optional[Tensor], num_classes, label_smoothing: float,
               z_loss: float) -> Tensor:
    """Per-row ``(1 - eps) CE + eps (lse - mean_j z'_j) + z_loss lse^2`` (F.cross_entropy's label
    smoothing, PaLM's z-loss) from the row's CE, log-sum-exp and logit sum (all of z')."""
    loss = ce
    if label_smoothing != 0.0:
        loss = (1.0 - label_smoothing) * ce + label_smoothing * (lse - zsum / num_classes)
    if z_loss != 0.0:
        loss = loss + z_loss * lse * lse
    return loss


def reduce_selected(loss: Tensor, mask: Tensor, reduction: str, lead_shape: torch.Size, counted: Tensor,
                    lse: Tensor, weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(the selective loss under ``reduction``, its denominator) from per-row losses: unselected
    rows count as 0, selected ones by their weight (1 without ``weights``); "mean" divides by the
    selected rows' total weight (0 when it is 0, e.g. when nothing is counted).

    The divergence rule: a counted row (target not ignored) whose own log-sum-exp is not finite
    (NaN / inf in the model's logits, hidden state or head) makes the loss NaN, selected or not,
    as F.cross_entropy's would be; so does a batch that counted tokens but could select none
    (every reference loss NaN, say).  "none": NaN on those rows.  A NaN reference loss alone only
    keeps its row out of the selection.  Decided on the device: no host sync.
    """
    w = mask.to(loss.dtype) if weights is None else torch.where(mask, weights.reshape(-1).to(loss.dtype), 0.0)
    kept = torch.where(mask, loss, torch.zeros_like(loss)) * w
    den = w.sum()
    poison = counted & (~torch.isfinite(lse) | ~mask.any())
    if reduction == "none":
        return torch.where(poison, math.nan, kept).view(lead_shape), den
    nan = torch.where(poison.any(), math.nan, 0.0).to(loss.dtype)
    if reduction == "mean":
        return kept.sum() / torch.where(den > 0, den, 1.0) + nan, den
    return kept.sum() + nan, den


def row_scales(grad_out: Tensor, mask: Tensor, reduction: str, den: Tensor, weights: Optional[Tensor],
               dtype: torch.dtype) -> Tensor:
    """The backward's per-row scale of :func:`reduce_selected`: ``d loss / d row loss``."""
    g = grad_out.to(dtype)
    if reduction == "mean":
        g = g / torch.where(den > 0, den, 1.0).to(dtype)
    elif reduction == "none":
        g = g.reshape(-1)
    if weights is not None:
        g = g * weights.reshape(-1).to(dtype)
    return torch.where(mask, g, torch.zeros((), dtype=dtype, device=mask.device)).contiguous()


# Once per process: the first batch that counted tokens but could select none.
_STARVED_WARNED = False
# CUDA: (event, pinned host copy) of recent batches' counts, read once their copy has landed
# (a call behind) so that the check never waits for the device.
_PENDING: list = []
_MAX_PENDING = 8


def warn_if_nothing_eligible(counted: Tensor, eligible: Tensor, il: Optional[Tensor], lse: Tensor) -> None:
    """Warn (once per process) when a batch counted tokens but none was eligible for selection.

    The loss is then NaN (:func:`reduce_selected`); this says why.  Costs no host sync: CPU
    tensors are read at once; CUDA counts travel by a non-blocking copy and are read at a later
    call once their event has completed; nothing under torch.compile or CUDA-graph capture.
    """
    global _STARVED_WARNED
    if _STARVED_WARNED or _contract.is_compiling():
        return
    dev = counted.device
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    with torch.no_grad():
        ref_nan = counted & torch.isnan(il) if il is not None else torch.zeros_like(counted)
        counts = torch.stack([counted.sum(), (counted & eligible).sum(), ref_nan.sum(),
                              (counted & ~torch.isfinite(lse)).sum()])
    if dev.type == "cpu":
        _report_counts(counts.tolist())
        return
    if dev.type != "cuda":
        return
    _poll_pending()
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING.append((event, host))
    del _PENDING[:-_MAX_PENDING]


def _poll_pending() -> None:
    while _PENDING and _PENDING[0][0].query():
        _report_counts(_PENDING.pop(0)[1].tolist())


def _report_counts(counts: list) -> None:
    global _STARVED_WARNED
    n_counted, n_eligible, n_ref_nan, n_bad = counts
    if _STARVED_WARNED or n_counted == 0 or n_eligible > 0:
        return
    _STARVED_WARNED = True
    _PENDING.clear()
    why = []
    if n_ref_nan:
        why.append(f"{n_ref_nan} have a NaN reference loss")
    if n_bad:
        why.append(f"{n_bad} have non-finite logits (NaN / inf: a diverged model?)")
    if not why:
        why.append("their scores are NaN (targets outside [0, V), unchecked on the GPU)")
    warnings.warn(f"selective cross-entropy: none of the {n_counted} counted tokens of a batch could be selected "
                  f"({'; '.join(why)}); the loss is NaN.  (Warned once per process.)", RuntimeWarning,
                  stacklevel=3)


# What vocab_parallel.SelectiveCE takes from this module (it imports nothing above the op layer).
_LOSS_RULES = (top_fraction_mask, row_losses, reduce_selected, row_scales, warn_if_nothing_eligible)


def transformed_target_logits(logits: Tensor, targets: Tensor, live: Tensor, acc: torch.dtype, softcap: float,
                              logit_scale: float) -> Tensor:
    """z'[r, y_r] in the accumulation dtype (0 where not ``live``): the target logit, transformed."""
    return reference.transform(target_logits(logits, targets, live).to(acc), softcap, logit_scale)


class _SelectiveCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, reference_loss, weights, ratio, ignore_index, reduction, forward_name,
                grad_name, inplace, config):
        softcap, logit_scale, label_smoothing, z_loss = config
        p = _contract.prepare(logits, targets, reference_loss, "reducible", ignore_index, softcap=softcap or None,
                              logit_scale=logit_scale)  # (checked: 0.0 is "no cap")
        impl = backends.get(forward_name)
        if label_smoothing != 0.0:
            score, lse, zsum = impl.score_rows(p, with_zsum=True)
        else:
            (score, lse), zsum = impl.score_rows(p), None
        eligible = reference.eligible_rows(p, score)
        counted = _nonignored(p)
        mask = top_fraction_mask(score, eligible, counted, ratio)
        # CE = lse - z'_y in the accumulation dtype: the value the kernel subtracted IL from.
        ce = lse - transformed_target_logits(logits, p.targets, eligible, lse.dtype, softcap, logit_scale)
        loss = row_losses(ce, lse, zsum, p.num_classes, label_smoothing, z_loss)
        out, den = reduce_selected(loss, mask, reduction, p.lead_shape, counted, lse, weights)
        warn_if_nothing_eligible(counted, eligible, p.il, lse)
        ctx.save_for_backward(logits, p.targets, lse, mask, den, weights)
        ctx.config = (ignore_index, reduction, grad_name, inplace, config)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, mask, den, weights = ctx.saved_tensors
        ignore_index, reduction, grad_name, inplace, config = ctx.config
        row_scale = row_scales(grad_out, mask, reduction, den, weights, lse.dtype)
        grad = backends.get(grad_name).ce_grad_rows(logits, targets, lse, row_scale, ignore_index, inplace,
                                                    **grad_options(config))
        return grad, None, None, None, None, None, None, None, None, None, None


def grad_options(loss_config: tuple) -> dict:
    """``ce_grad_rows``'s keyword arguments for ``(softcap, logit_scale, label_smoothing, z_loss)``:
    none for the plain loss (every backend's original call)."""
    softcap, logit_scale, label_smoothing, z_loss = loss_config
    if not _contract.has_transform(softcap, logit_scale) and label_smoothing == 0.0 and z_loss == 0.0:
        return {}
    return dict(softcap=softcap, logit_scale=logit_scale, label_smoothing=label_smoothing, z_loss=z_loss)


def loss_config(softcap, logit_scale, label_smoothing, z_loss, weights, targets) -> tuple:
    """The checked ``(softcap, logit_scale, label_smoothing, z_loss)`` of a selective loss."""
    cap, scale = _contract.check_transform(softcap, logit_scale)
    eps, zl = check_loss_options(label_smoothing, z_loss, weights, targets)
    return cap, scale, eps, zl


@sharding.sharded_logits
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
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weights: Optional[Tensor] = None,
) -> Tensor:
    """Rho-1 selective language-modelling loss: CE over the tokens with the highest excess loss.

    Keeps ``k = kept_count(n, ratio)`` (``ratio * n`` to the nearest integer, halves up, at least
    1) of the ``n`` non-ignored tokens of the batch, ranked by
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
        process_group, vocab_start_index: vocabulary-parallel logits (as for :func:`score`).
        softcap, logit_scale: the logit transform of :func:`score` (Gemma 2's
            ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``):
            selection, loss and gradient are those of ``z'``; the gradient is w.r.t. the raw logits.
        label_smoothing: in ``[0, 1]``, as ``F.cross_entropy``'s: each kept token's loss is
            ``(1 - eps) CE + eps (lse - mean_j z'_j)``.
        z_loss: ``>= 0``: adds ``z_loss * lse(z')^2`` per kept token (PaLM / OLMo).
        weights: per-token float weights ``>= 0`` of the targets' shape, or None: the loss is
            ``sum_kept w_i l_i / sum_kept w_i`` ("mean"; 0 when the kept weights sum to 0),
            ``sum_kept w_i l_i`` ("sum") or ``w_i l_i`` ("none").  With ``ratio=1.0`` this is a
            plain weighted (smoothed, z-lossed) cross-entropy with a fused backward.

        Selection always ranks by the plain excess ``CE(z') - reference_loss``; smoothing, z-loss and
        weights shape only the loss of the kept tokens and its (exact) gradient.

    Non-finite values: a NaN / inf logit on a counted token (target not ignored) makes the loss
    NaN, as ``F.cross_entropy``'s ("none": that token's entry), whether or not it is selected; a
    NaN ``reference_loss`` only keeps its token out of the selection; a batch that counts tokens
    but has none selectable (every reference loss NaN) gives NaN and a warning, once per process.

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or ``targets.shape`` for "none".
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    ratio = check_ratio(ratio)
    check_reference_loss(targets, reference_loss)
    config = loss_config(softcap, logit_scale, label_smoothing, z_loss, weights, targets)
    vocab_parallel.check_shard(process_group, vocab_start_index)
    if process_group is not None:  # vocabulary-parallel logits: the gradient of this shard
        vocab_parallel.prepare(logits, targets, reference_loss, "reducible", ignore_index)
        return vocab_parallel.SelectiveCE.apply(logits, targets, reference_loss, weights, ratio, ignore_index,
                                                reduction, vocab_start_index, process_group, _LOSS_RULES, config)
    # Validate now (clear errors before autograd); forward() normalises again, cheaply.
    _contract.prepare(logits, targets, reference_loss, "reducible", ignore_index)
    forward_name, grad_name = resolve_names(backend, logits.device)
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_backward=True overwrites the logits with their gradient; it needs non-leaf "
                         "logits (e.g. the LM head's output), got a leaf tensor")
    return _SelectiveCE.apply(logits, targets, reference_loss, weights, ratio, ignore_index, reduction,
                              forward_name, grad_name, inplace_backward, config)


def selective_cross_entropy_autograd(
    logits: Tensor,
    targets: Tensor,
    reference_loss: Tensor,
    ratio: float,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The definition, for tests and benchmarks: autograd through the reference CE + selection.

    Materialises ``N x V`` float temporaries (log-softmax and its gradient) like any unfused loss.
    """
    with torch.no_grad():
        mask = select_mask(logits, targets, reference_loss, ratio, ignore_index=ignore_index,
                           backend="reference").reshape(-1)
    v = logits.shape[-1]
    acc = lse_dtype(logits.dtype)
    flat_t = targets.reshape(-1).to(torch.int64)
    safe_t = torch.where(mask, flat_t, torch.full_like(flat_t, -100))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, v).to(acc), safe_t, reduction="none",
                                           ignore_index=-100)
    ce = torch.where(mask, ce, torch.zeros_like(ce))
    if reduction == "mean":
        return ce.sum() / mask.sum().clamp_min(1).to(acc)
    if reduction == "sum":
        return ce.sum()
    return ce.view(targets.shape)

