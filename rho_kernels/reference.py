"""Reference backend: plain PyTorch, no cleverness.

This is the definition every other backend is tested against and what the benchmark compares
with.  It materialises ``N x V`` temporaries on purpose (clarity over speed) and computes in
float32 (float64 for float64 logits).  The special-value rules are those of csrc/rho_math.h.
Every method reads the transformed logits ``z' = softcap * tanh(logit_scale * z / softcap)``
(``logit_scale * z`` without a cap; :func:`transform`), and the special-value rules apply to z'.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._contract import IL_METHODS, METHODS, RowProblem, has_transform, is_compiling, lse_dtype

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    return None  # runs wherever PyTorch runs


def ce_grad_unavailable_reason(device: torch.device) -> str | None:
    return None


def transform(z: Tensor, softcap: float, logit_scale: float) -> Tensor:
    """``z' = softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` for softcap 0), in
    ``z``'s dtype, in Hugging Face's order of operations (scale, divide, tanh, multiply)."""
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap != 0.0:
        z = torch.tanh(z / softcap) * softcap
    return z


def transform_grad(zt: Tensor, softcap: float, logit_scale: float):
    """``dz'/dz`` from the transformed logits ``zt``: ``logit_scale * (1 - (z'/softcap)^2)``, or the
    constant ``logit_scale`` without a cap (a float then)."""
    if softcap == 0.0:
        return logit_scale
    r = zt / softcap
    return logit_scale * (1.0 - r * r)


def row_logits(p: RowProblem) -> Tensor:
    """The transformed logits z' as an ``[N, V]`` matrix in the accumulation dtype (a copy)."""
    z = p.logits.reshape(p.num_rows, p.num_classes).to(lse_dtype(p.logits.dtype))
    return transform(z, p.softcap, p.logit_scale)


def row_zsum(p: RowProblem) -> Tensor:
    """``sum_j z'_j`` per row (``[N]``, the lse dtype; NaN for ``irreducible``, which reads no logit)."""
    if METHODS[p.method] == "irreducible":
        return torch.full((p.num_rows,), math.nan, dtype=lse_dtype(p.logits.dtype), device=p.targets.device)
    return row_logits(p).sum(-1)


def score_rows(p: RowProblem, with_lse: bool = True, with_zsum: bool = False):
    """Per-row score (float32 ``[N]``) and log-sum-exp (``[N]``, NaN for ``irreducible``; an
    empty ``[0]`` tensor when ``with_lse`` is False), and with ``with_zsum`` a third output,
    ``sum_j z'_j`` (``[N]``, the lse dtype; NaN for ``irreducible``): label smoothing's sum."""
    method = METHODS[p.method]
    acc = lse_dtype(p.logits.dtype)
    t = p.targets
    ignored = t == p.ignore_index
    out_of_range = ~ignored & ((t < 0) | (t >= p.num_classes))
    nan = torch.tensor(math.nan, dtype=acc, device=t.device)

    if method == "irreducible":
        assert p.il is not None
        score = -p.il.to(acc)
        lse = torch.full((p.num_rows,), math.nan, dtype=acc, device=t.device)
        zsum = lse.clone() if with_zsum else None
    else:
        z = row_logits(p)
        zsum = z.sum(-1) if with_zsum else None
        # Everything relative to the row max m, as csrc/rho_math.h does: z - lse would lose
        # what lse's rounding absorbs (the log 2 of [3.4e38, 3.4e38, -3.4e38, 0]).  Special
        # values of the header: NaN anywhere -> NaN (amax propagates NaN), +inf -> +inf,
        # all -inf -> -inf.
        m = z.amax(dim=-1)
        m_finite = torch.isfinite(m)
        shift = torch.where(m_finite, m, torch.zeros_like(m))
        zs = z - shift[:, None]  # <= 0; -inf where a finite row spans more than the dtype's max
        e = torch.exp(zs)
        d = e.sum(-1)
        lse = torch.where(m_finite, shift + d.log(), m)
        safe_t = torch.where(ignored | out_of_range, torch.zeros_like(t), t)
        z_y = z.gather(1, safe_t[:, None]).squeeze(1)
        # CE = (m - z_y) + log d where the max is finite: lse = m + log d rounds log d away at
        # |m| ~ 3e38, so lse - z_y would lose it (csrc/rho_math.h, finalize_ce).
        ce = torch.where(m_finite, (shift - z_y) + d.log(), lse - z_y)
        if method in ("reducible", "loss"):
            score = ce
            if method in IL_METHODS:
                assert p.il is not None
                score = ce - p.il.to(acc)
        else:
            prob = e / d[:, None]
            if method == "gradnorm":
                onehot = torch.zeros_like(prob)
                onehot.scatter_(1, safe_t[:, None], 1.0)
                score = torch.linalg.vector_norm(prob - onehot, dim=-1)
            else:  # entropy: a class with p = 0 (a -inf logit, or e = 0) contributes 0, not 0 * -inf
                log_prob = zs - d.log()[:, None]
                plogp = torch.where(e == 0, torch.zeros_like(z), prob * log_prob)
                score = -plogp.sum(-1)
            score = torch.where(torch.isfinite(lse), score, nan)
    score = torch.where(out_of_range, nan, score)
    score = torch.where(ignored, torch.full_like(score, -math.inf), score)
    # Convert only when the dtype differs: a same-dtype .to() returns its input, and torch 2.11's
    # torch.compile then routes the gradient of _autograd._ScoreRows (whose forward returns this)
    # to a dead output slot: all-zero gradients (pytorch/pytorch#180642, fixed in torch 2.12).
    if score.dtype != torch.float32:
        score = score.to(torch.float32)
    lse = lse if with_lse else lse.new_empty((0,))
    return (score, lse, zsum) if with_zsum else (score, lse)


def eligible_rows(p: RowProblem, score: Tensor) -> Tensor:
    t = p.targets
    return (t != p.ignore_index) & (t >= 0) & (t < p.num_classes) & ~torch.isnan(score)


def order_rows(score: Tensor, eligible: Tensor) -> Tensor:
    """All row indices in selection order: score descending, lower index first on ties,
    ineligible rows last (by index).  Two stable sorts: secondary key first."""
    key = torch.where(eligible, score, torch.full_like(score, -math.inf))
    order = torch.sort(key, descending=True, stable=True).indices
    by_eligibility = torch.sort(eligible[order].to(torch.int8), descending=True, stable=True).indices
    return order[by_eligibility]


def select_rows(p: RowProblem, k: int) -> tuple[Tensor, Tensor, Tensor]:
    score, _ = score_rows(p)
    eligible = eligible_rows(p, score)
    idx = order_rows(score, eligible)[:k]
    return idx, score[idx], eligible[idx]


def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 inplace: bool = False, *, softcap: float = 0.0, logit_scale: float = 1.0,
                 label_smoothing: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """The gradient w.r.t. the raw logits ``z`` of ``sum_r row_scale[r] * L_r`` with
    ``L_r = (1 - eps)(lse_r - z'_y) + eps(lse_r - mean_j z'_j) + z_loss * lse_r^2`` (``eps`` =
    ``label_smoothing``, ``lse`` the saved log-sum-exp of z' = the transformed logits):

        dL/dz'_j = s_r [(1 + 2 z_loss lse_r) p_j - (1 - eps)[j == y] - eps / V],  p = exp(z' - lse)

    times ``dz'/dz`` (:func:`transform_grad`).  The plain case is ``s_r (p - onehot(y))``.  Exact
    zeros on rows whose scale is 0 or whose target is ignored / outside ``[0, V)``.

    Processes row chunks so that eager temporaries stay at a few MiB; under torch.compile one
    expression (Inductor fuses it into a single pass).  ``inplace`` writes over ``logits``.
    """
    n, v = targets.shape[0], logits.shape[-1]
    acc = lse_dtype(logits.dtype)
    z = logits.reshape(n, v)
    out = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    live = (targets != ignore_index) & (targets >= 0) & (targets < v) & (row_scale != 0)
    safe_t = torch.where(live, targets, torch.zeros_like(targets))
    chunk = n if is_compiling() else max(1, (1 << 20) // max(v, 1))
    for r0 in range(0, n, chunk):
        sl = slice(r0, min(n, r0 + chunk))
        zt = transform(z[sl].to(acc), softcap, logit_scale)
        p = torch.exp(zt - lse[sl, None])
        if z_loss != 0.0:
            p = p * (1.0 + 2.0 * z_loss * lse[sl, None])
        onehot = torch.zeros_like(p).scatter_(1, safe_t[sl, None], 1.0 - label_smoothing)
        g = p - onehot
        if label_smoothing != 0.0:
            g = g - label_smoothing / v
        g = g * row_scale[sl, None]
        if has_transform(softcap, logit_scale):
            g = g * transform_grad(zt, softcap, logit_scale)
        out[sl] = torch.where(live[sl, None], g, torch.zeros_like(g)).to(logits.dtype)
    grad = out.view(logits.shape)
    if inplace:
        logits.copy_(grad)
        return logits
    return grad
