"""Vocabulary-parallel scoring: the logits' columns (an LM head's rows) sharded over a process group.

Rank ``r`` holds columns ``[vocab_start_index, vocab_start_index + V_local)`` of every row.  Each
rank reduces its columns to the row accumulator of csrc/rho_math.h (``RowAcc``: running max ``m``,
``d``, ``t``, ``dx``, ``s2x``) plus the target logit where it owns the target, the sum of its
logits (label smoothing's) and its width; ONE exchange (an all-gather of those ``[N, 9]`` partials) gives every rank every partial, and every rank merges
them with ``acc_merge``'s rule (the split-V Triton path's) and finalises the scores.  Same data,
same merge order: identical scores and selection on every rank.  The gradient of the selective
CE is each rank's own columns (for the linear ops: its rows of the head's weight, and its
shard's share of ``hidden``'s gradient, which the group sums as for any vocabulary-parallel head).

The logit transform (``softcap`` / ``logit_scale``) is per logit: each rank applies it to its
columns before its partial sums, so every partial is of z'.

A target that no rank owns is out of range: NaN score (ValueError on CPU tensors, eagerly, as
unsharded).  Per-rank partials are computed with PyTorch ops in the accumulation dtype (float32;
float64 for float64 logits), materialising ``[rows, V_local]`` temporaries: the linear ops call
them one row chunk at a time.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _contract, reference
from ._contract import METHOD_IDS, has_transform, lse_dtype

_ENTROPY, _GRADNORM, _IRREDUCIBLE = METHOD_IDS["entropy"], METHOD_IDS["gradnorm"], METHOD_IDS["irreducible"]
# Stands in for the global vocabulary, unknown before the exchange: the contract's range check
# then catches only negative targets; targets no rank owns are caught after the exchange.
_UNBOUNDED_V = 2**31 - 1  # rows x V must fit int64 (rows < 2^32)
NUM_STATS = 7  # m, d, t, dx, s2x, z_y, owned: the RowAcc partials (csrc's partial_rows adds ZSUM)
ZSUM, WIDTH = 7, 8  # sum_j z'_j (label smoothing) and the shard's V_local: both merge by addition
NUM_COLUMNS = 9


class Finalized(NamedTuple):
    score: Tensor  # float32 [N]
    lse: Tensor  # accumulation dtype [N]
    eligible: Tensor  # bool [N]
    ce: Tensor  # accumulation dtype [N]: lse - z_y by rho::finalize_ce's rule (meaningless where no rank owns y)
    zsum: Optional[Tensor] = None  # accumulation dtype [N]: sum_j z'_j over every shard, where the parts had it
    num_classes: Optional[Tensor] = None  # the global V (sum of the shards' widths), where the parts had it


def check_shard(process_group, vocab_start_index) -> None:
    if isinstance(vocab_start_index, bool) or not isinstance(vocab_start_index, int):
        raise TypeError(f"vocab_start_index must be an int, got {vocab_start_index!r}")
    if vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be >= 0, got {vocab_start_index}")
    if process_group is None and vocab_start_index != 0:
        raise ValueError(f"vocab_start_index = {vocab_start_index} needs a process_group (the logits are a "
                         "shard of the vocabulary only within a group)")
    if process_group is not None and not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized")


def prepare(logits: Tensor, targets: Tensor, irreducible_loss, method: str, ignore_index: int, *, softcap=None,
            logit_scale=1.0) -> _contract.RowProblem:
    """The contract's checks of a shard: everything but the targets' upper bound (global V)."""
    kw = dict(softcap=softcap, logit_scale=logit_scale)
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        return _contract.prepare(logits, targets, irreducible_loss, method, ignore_index, **kw)  # its error
    stand_in = logits.new_empty(()).expand(*logits.shape[:-1], _UNBOUNDED_V)
    p = _contract.prepare(stand_in, targets, irreducible_loss, method, ignore_index, **kw)
    return p._replace(logits=logits, num_classes=logits.shape[-1])


def local_stats(z: Tensor, targets: Tensor, vocab_start: int, method: int, ignore_index: int, softcap: float = 0.0,
                logit_scale: float = 1.0, with_zsum: bool = False) -> Tensor:
    """This shard's ``[n, 9]`` partials of the rows ``z`` (``[n, V_local]``, global ``targets``),
    of the transformed logits z' (``softcap``/``logit_scale`` as the contract checked them).
    ``zsum`` (column ZSUM) is 0 unless ``with_zsum``."""
    acc = lse_dtype(z.dtype)
    x = reference.transform(z.reshape(targets.shape[0], z.shape[-1]).to(acc), softcap, logit_scale)
    n, vl = x.shape
    y = targets - vocab_start
    owned = (targets != ignore_index) & (y >= 0) & (y < vl)
    safe_y = torch.where(owned, y, torch.zeros_like(y))
    m = x.amax(-1)  # NaN-propagating, as rho::nan_max
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    neg_inf = x == -math.inf  # an impossible class contributes exactly 0
    shifted = x - shift[:, None]
    e = torch.where(neg_inf, 0.0, torch.exp(shifted))
    zero = torch.zeros_like(m)
    d = e.sum(-1)
    t = torch.where(neg_inf, 0.0, e * shifted).sum(-1) if method == _ENTROPY else zero
    if method == _GRADNORM:
        is_y = owned[:, None] & (torch.arange(vl, device=x.device) == safe_y[:, None])
        ex = torch.where(is_y, 0.0, e)
        dx, s2x = ex.sum(-1), (ex * ex).sum(-1)
    else:
        dx = s2x = zero
    z_y = torch.where(owned, x.gather(1, safe_y[:, None]).squeeze(1), zero)
    zsum = x.sum(-1) if with_zsum else zero
    return torch.stack([m, d, t, dx, s2x, z_y, owned.to(acc), zsum, torch.full_like(m, vl)], 1)


def exchange(stats: Tensor, process_group) -> Tensor:
    """The one collective: every rank's ``[n, 9]`` partials, stacked ``[world, n, 9]``."""
    world = dist.get_world_size(process_group)
    out = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(out, stats.contiguous(), group=process_group)
    return torch.stack(out)


def merge_and_finalize(parts: Tensor, targets: Tensor, il: Optional[Tensor], method: int,
                       ignore_index: int) -> Finalized:
    """rho::acc_merge over the ranks' partials, then finalize_lse / finalize_score.

    ``parts``: ``[world, n, C]``, C = 7 (RowAcc, z_y, owned), 8 (+ zsum: csrc's partial_rows) or
    9 (+ the width: :func:`local_stats`)."""
    m_w, d_w, t_w, dx_w, s2x_w, zy_w, own_w = parts[..., :NUM_STATS].unbind(-1)
    m = m_w.amax(0)  # NaN anywhere -> NaN
    same = (d_w == 0) | (m_w == m)  # acc_rescale's guard: no exp(-inf - -inf)
    shift = m_w - m
    alpha = torch.where(same, 1.0, torch.exp(shift))
    d = (alpha * d_w).sum(0)
    t = torch.where(same, t_w, alpha * (t_w + shift * d_w)).sum(0)
    dx = (alpha * dx_w).sum(0)
    s2x = (alpha * alpha * s2x_w).sum(0)
    z_y = zy_w.sum(0)  # one owner at most
    owned = own_w.sum(0) > 0
    nan = torch.full_like(m, math.nan)
    log_d = torch.log(d)
    lse = torch.where(torch.isnan(m), nan, torch.where(torch.isinf(m), m, m + log_d))
    # rho::finalize_ce: (m - z_y) + log d where the max is finite (at |m| ~ 3e38, lse = m + log d
    # rounds log d away and lse - z_y would lose it).
    ce = torch.where(torch.isfinite(m), (m - z_y) + log_d, lse - z_y)
    finite = torch.isfinite(lse)
    if method == METHOD_IDS["reducible"]:
        score = ce - il.to(lse.dtype)
    elif method == METHOD_IDS["loss"]:
        score = ce
    elif method == _IRREDUCIBLE:
        score = -il.to(lse.dtype)
        lse = nan
    elif method == _GRADNORM:
        score = torch.where(finite, torch.sqrt(s2x / (d * d) + (dx / d) ** 2), nan)
    else:
        score = torch.where(finite, torch.log(d) - t / d, nan)
    ignored = targets == ignore_index
    out_of_range = ~ignored & ~owned
    score = torch.where(out_of_range, nan, score)
    score = torch.where(ignored, torch.full_like(score, -math.inf), score).to(torch.float32)
    if targets.device.type == "cpu" and not _contract.is_compiling() and bool(out_of_range.any()):
        where = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"target {int(targets[where])} at flat row {where} is in no rank's vocabulary shard "
                         f"and is not ignore_index={ignore_index}")
    eligible = ~ignored & ~out_of_range & ~torch.isnan(score)
    zsum = parts[..., ZSUM].sum(0) if parts.shape[-1] > ZSUM else None
    width = parts[..., WIDTH].sum(0) if parts.shape[-1] > WIDTH else None
    return Finalized(score, lse, eligible, ce, zsum, width)


def score_rows(p: _contract.RowProblem, vocab_start: int, process_group, with_zsum: bool = False) -> Finalized:
    """Sharded ``score_rows`` of a (shard) RowProblem: local partials, one exchange, merge."""
    with torch.no_grad():
        stats = local_stats(p.logits.detach(), p.targets, vocab_start, p.method, p.ignore_index, p.softcap,
                            p.logit_scale, with_zsum)
        return merge_and_finalize(exchange(stats, process_group), p.targets, p.il, p.method, p.ignore_index)


def ce_grad_rows(z: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 vocab_start: int, softcap: float = 0.0, logit_scale: float = 1.0, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, num_classes=None) -> Tensor:
    """This shard's columns of the backends' ``ce_grad_rows`` (``row_scale * (softmax - onehot)``
    in the plain case; exact zeros where scale is 0), with the raw logits ``z`` of this shard.

    Also one vocabulary slice of an unsharded head (``vocab_start`` = the slice's first class):
    a target outside ``[vocab_start, vocab_start + V_local)`` has no one-hot column here.
    ``num_classes`` (the global V: an int or a per-row tensor) is needed with ``label_smoothing``.
    One working copy in the accumulation dtype, updated in place: ``z`` is never written."""
    acc = lse.dtype
    n, vl = targets.shape[0], z.shape[-1]
    x = z.reshape(n, vl).to(acc, copy=True)
    transformed = has_transform(softcap, logit_scale)
    if transformed:
        x = reference.transform(x, softcap, logit_scale)
        dz = reference.transform_grad(x, softcap, logit_scale)
    y = targets - vocab_start
    live = (targets != ignore_index) & (row_scale != 0)
    owned = live & (y >= 0) & (y < vl)
    x.sub_(lse[:, None]).exp_()
    if z_loss != 0.0:
        x.mul_(1.0 + 2.0 * z_loss * lse[:, None])
    # p - (1 - eps) at the owned target (adding -0.0 elsewhere leaves x as it is), - eps / V, then the scale.
    x.scatter_add_(1, torch.where(owned, y, torch.zeros_like(y))[:, None],
                   torch.where(owned, label_smoothing - 1.0, -0.0).to(acc)[:, None])
    if label_smoothing != 0.0:
        v = num_classes if isinstance(num_classes, Tensor) else torch.tensor(float(num_classes), device=x.device)
        x.sub_((label_smoothing / v.to(acc)).reshape(-1, 1) if v.dim() else label_smoothing / v.to(acc))
    x.mul_(row_scale[:, None])
    if transformed:
        x.mul_(dz)
    x.masked_fill_(~live[:, None], 0.0)
    return x.to(z.dtype).view(z.shape)


class SelectiveCE(torch.autograd.Function):
    """The selective CE on a logits shard; ``rules`` are rho_kernels.tokens' ratio rule, per-row
    loss, reduction (with its divergence rule), backward scales and nothing-eligible warning
    (passed in, so that this module needs nothing above the op layer); ``config`` = ``(softcap,
    logit_scale, label_smoothing, z_loss)``, checked."""

    @staticmethod
    def forward(ctx, logits, targets, reference_loss, weights, ratio, ignore_index, reduction, vocab_start, group,
                rules, config):
        mask_fn, loss_fn, reduce_fn, scale_fn, warn_fn = rules
        softcap, logit_scale, label_smoothing, z_loss = config
        p = prepare(logits, targets, reference_loss, "reducible", ignore_index, softcap=softcap or None,
                    logit_scale=logit_scale)  # (checked: 0.0 is "no cap")
        f = score_rows(p, vocab_start, group, with_zsum=label_smoothing != 0.0)
        counted = p.targets != ignore_index
        mask = mask_fn(f.score, f.eligible, counted, ratio)
        loss = loss_fn(f.ce, f.lse, f.zsum, f.num_classes, label_smoothing, z_loss)
        out, den = reduce_fn(loss, mask, reduction, p.lead_shape, counted, f.lse, weights)
        warn_fn(counted, f.eligible, p.il, f.lse)
        ctx.save_for_backward(logits, p.targets, f.lse, mask, den, weights, f.num_classes)
        ctx.config = (ignore_index, reduction, vocab_start, scale_fn, config)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, mask, den, weights, num_classes = ctx.saved_tensors
        ignore_index, reduction, vocab_start, scale_fn, config = ctx.config
        row_scale = scale_fn(grad_out, mask, reduction, den, weights, lse.dtype)
        grad = ce_grad_rows(logits, targets, lse, row_scale, ignore_index, vocab_start, *config, num_classes)
        return grad, None, None, None, None, None, None, None, None, None, None
