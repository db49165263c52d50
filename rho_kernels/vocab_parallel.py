"""Vocabulary-parallel scoring: the logits' columns (an LM head's rows) sharded over a process group.

Rank ``r`` holds columns ``[vocab_start_index, vocab_start_index + V_local)`` of every row.  Each
rank reduces its columns to the row accumulator of csrc/rho_math.h (``RowAcc``: running max ``m``,
``d``, ``t``, ``dx``, ``s2x``) plus the target logit where it owns the target; ONE exchange (an
all-gather of those ``[N, 7]`` partials) gives every rank every partial, and every rank merges
them with ``acc_merge``'s rule (the split-V Triton path's) and finalises the scores.  Same data,
same merge order: identical scores and selection on every rank.  The gradient of the selective
CE is each rank's own columns (for the linear ops: its rows of the head's weight, and its
shard's share of ``hidden``'s gradient, which the group sums as for any vocabulary-parallel head).

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

from . import _contract
from ._contract import METHOD_IDS, lse_dtype

_ENTROPY, _GRADNORM, _IRREDUCIBLE = METHOD_IDS["entropy"], METHOD_IDS["gradnorm"], METHOD_IDS["irreducible"]
# Stands in for the global vocabulary, unknown before the exchange: the contract's range check
# then catches only negative targets; targets no rank owns are caught after the exchange.
_UNBOUNDED_V = 2**31 - 1  # rows x V must fit int64 (rows < 2^32)
NUM_STATS = 7  # m, d, t, dx, s2x, z_y, owned


class Finalized(NamedTuple):
    score: Tensor  # float32 [N]
    lse: Tensor  # accumulation dtype [N]
    eligible: Tensor  # bool [N]
    ce: Tensor  # accumulation dtype [N]: lse - z_y by rho::finalize_ce's rule (meaningless where no rank owns y)


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


def prepare(logits: Tensor, targets: Tensor, irreducible_loss, method: str, ignore_index: int) -> _contract.RowProblem:
    """The contract's checks of a shard: everything but the targets' upper bound (global V)."""
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        return _contract.prepare(logits, targets, irreducible_loss, method, ignore_index)  # its error
    stand_in = logits.new_empty(()).expand(*logits.shape[:-1], _UNBOUNDED_V)
    p = _contract.prepare(stand_in, targets, irreducible_loss, method, ignore_index)
    return p._replace(logits=logits, num_classes=logits.shape[-1])


def local_stats(z: Tensor, targets: Tensor, vocab_start: int, method: int, ignore_index: int) -> Tensor:
    """This shard's ``[n, 7]`` partials of the rows ``z`` (``[n, V_local]``, global ``targets``)."""
    acc = lse_dtype(z.dtype)
    x = z.reshape(targets.shape[0], z.shape[-1]).to(acc)
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
    return torch.stack([m, d, t, dx, s2x, z_y, owned.to(acc)], 1)


def exchange(stats: Tensor, process_group) -> Tensor:
    """The one collective: every rank's ``[n, 7]`` partials, stacked ``[world, n, 7]``."""
    world = dist.get_world_size(process_group)
    out = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(out, stats.contiguous(), group=process_group)
    return torch.stack(out)


def merge_and_finalize(parts: Tensor, targets: Tensor, il: Optional[Tensor], method: int,
                       ignore_index: int) -> Finalized:
    """rho::acc_merge over the ranks' partials, then finalize_lse / finalize_score."""
    m_w, d_w, t_w, dx_w, s2x_w, zy_w, own_w = parts[..., :NUM_STATS].unbind(-1)  # the tile path adds zsum
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
    return Finalized(score, lse, eligible, ce)


def score_rows(p: _contract.RowProblem, vocab_start: int, process_group) -> Finalized:
    """Sharded ``score_rows`` of a (shard) RowProblem: local partials, one exchange, merge."""
    with torch.no_grad():
        stats = local_stats(p.logits.detach(), p.targets, vocab_start, p.method, p.ignore_index)
        return merge_and_finalize(exchange(stats, process_group), p.targets, p.il, p.method, p.ignore_index)


def ce_grad_rows(z: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 vocab_start: int) -> Tensor:
    """This shard's columns of ``row_scale * (softmax - onehot)`` (exact zeros where scale is 0).

    Also one vocabulary slice of an unsharded head (``vocab_start`` = the slice's first class):
    a target outside ``[vocab_start, vocab_start + V_local)`` has no one-hot column here.  One
    working copy in the accumulation dtype, updated in place: ``z`` is never written."""
    acc = lse.dtype
    n, vl = targets.shape[0], z.shape[-1]
    x = z.reshape(n, vl).to(acc, copy=True)
    y = targets - vocab_start
    live = (targets != ignore_index) & (row_scale != 0)
    owned = live & (y >= 0) & (y < vl)
    x.sub_(lse[:, None]).exp_()
    # exp - 1 at the owned target (adding -0.0 elsewhere leaves x as it is), then the scale.
    x.scatter_add_(1, torch.where(owned, y, torch.zeros_like(y))[:, None],
                   torch.where(owned, -1.0, -0.0).to(acc)[:, None])
    x.mul_(row_scale[:, None]).masked_fill_(~live[:, None], 0.0)
    return x.to(z.dtype).view(z.shape)


class SelectiveCE(torch.autograd.Function):
    """The selective CE on a logits shard; ``rules = (mask_fn, reduce_fn, warn_fn)`` are the
    ratio rule, the reduction (with its divergence rule) and the nothing-eligible warning of
    rho_kernels.tokens (passed in, so that this module needs nothing above the op layer)."""

    @staticmethod
    def forward(ctx, logits, targets, reference_loss, ratio, ignore_index, reduction, vocab_start, group, rules):
        mask_fn, reduce_fn, warn_fn = rules
        p = prepare(logits, targets, reference_loss, "reducible", ignore_index)
        f = score_rows(p, vocab_start, group)
        counted = p.targets != ignore_index
        mask = mask_fn(f.score, f.eligible, counted, ratio)
        out, n_sel = reduce_fn(f.ce, mask, reduction, p.lead_shape, counted, f.lse)
        warn_fn(counted, f.eligible, p.il, f.lse)
        ctx.save_for_backward(logits, p.targets, f.lse, mask, n_sel)
        ctx.config = (ignore_index, reduction, vocab_start)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, mask, n_sel = ctx.saved_tensors
        ignore_index, reduction, vocab_start = ctx.config
        g = grad_out.to(lse.dtype)
        if reduction == "mean":
            g = g / n_sel.clamp_min(1).to(lse.dtype)
        elif reduction == "none":
            g = g.reshape(-1)
        row_scale = torch.where(mask, g, torch.zeros_like(lse))
        grad = ce_grad_rows(logits, targets, lse, row_scale, ignore_index, vocab_start)
        return grad, None, None, None, None, None, None, None, None
