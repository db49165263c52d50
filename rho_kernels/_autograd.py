"""Gradients of the row scores: what makes ``score`` and ``Selection.scores`` differentiable.

The fused kernels compute the scores without autograd (custom ops), so the backward is written
out here, once for every backend, from the per-row log-sum-exp the forward already produced
(``lse``, saved instead of any ``N x V`` activation):

=============  ===============================================  ===========================
method         d score / d z  (row r, class j; p = softmax(z))  d score / d IL
=============  ===============================================  ===========================
reducible      p_j - [j == y]                                   -1
loss           p_j - [j == y]                                   --
irreducible    0                                                -1
gradnorm       p_j (r_j - sum_i r_i p_i) / ||r||,  r = p - e_y  --
entropy        -p_j (log p_j + H),  H = -sum_i p_i log p_i      --
=============  ===============================================  ===========================

The cross-entropy rows use the backend's own ``ce_grad_rows`` kernel (``backends.grad_backend_for``
pairs it with the forward backend); ``gradnorm`` and ``entropy`` use the torch code below on every
backend.  Rows whose score does not depend on the inputs (ignored target, target outside
``[0, V)``) get exact zeros, as autograd through the reference gives.  First-order only:
``create_graph=True`` (double backward) raises instead of silently dropping terms.

With a logit transform (``softcap``/``logit_scale``, ``z' = softcap * tanh(logit_scale * z /
softcap)``) the table holds for z' (p = softmax(z'), lse of z'), and the chain rule multiplies
each class's gradient by ``dz'/dz = logit_scale * (1 - (z'/softcap)^2)`` (``logit_scale``
without a cap): ``ce_grad_rows`` does it in the kernel, the torch code below in torch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends
from . import reference
from ._contract import METHOD_IDS, RowProblem, has_transform, is_compiling

_REDUCIBLE, _LOSS, _IRREDUCIBLE = METHOD_IDS["reducible"], METHOD_IDS["loss"], METHOD_IDS["irreducible"]
_ENTROPY = METHOD_IDS["entropy"]


def needs_grad(p: RowProblem) -> bool:
    """Whether autograd must see this call (metadata only: no host synchronisation)."""
    if not torch.is_grad_enabled():
        return False
    return p.logits.requires_grad or (p.il is not None and p.il.requires_grad)


def detached(p: RowProblem) -> RowProblem:
    """The same problem with no autograd history (views, no copies)."""
    return p._replace(logits=p.logits.detach(), il=None if p.il is None else p.il.detach())


def scores_with_grad(p: RowProblem, forward_name: str, device_backend: str) -> Tensor:
    """float32 ``[N]`` scores of ``p`` by backend ``forward_name``, differentiable with respect to
    the logits and the irreducible loss (``device_backend``: the user's ``backend`` argument)."""
    grad_name = backends.grad_backend_for(device_backend, forward_name, p.logits.device)
    return _ScoreRows.apply(p.logits, p.il, p.targets, p.method, p.ignore_index, forward_name, grad_name,
                            p.softcap, p.logit_scale)


class _ScoreRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, il: Optional[Tensor], targets: Tensor, method: int, ignore_index: int,
                forward_name: str, grad_name: str, softcap: float, logit_scale: float) -> Tensor:
        p = RowProblem(logits, targets, il, method, ignore_index, logits.shape[:-1], targets.shape[0],
                       logits.shape[-1], softcap, logit_scale)
        score, lse = backends.get(forward_name).score_rows(p)
        ctx.save_for_backward(logits, targets, lse)
        ctx.config = (method, ignore_index, grad_name, softcap, logit_scale)
        # ``score`` must not be the very tensor object of another op's result in this forward
        # (a no-op .to()/.contiguous(), an in-place op): torch 2.11's torch.compile then gives
        # zero gradients (pytorch/pytorch#180642).  Every backend's score_rows returns a fresh one.
        return score

    @staticmethod
    def backward(ctx, grad_score: Tensor):
        if torch.is_grad_enabled():
            # create_graph=True: a gradient of this gradient would be silently missing terms.
            raise RuntimeError(
                "rho_kernels score gradients are first-order only: backward(create_graph=True) / "
                "double backward through rk.score or rk.select is not supported"
            )
        logits, targets, lse = ctx.saved_tensors
        method, ignore_index, grad_name, softcap, logit_scale = ctx.config
        g = grad_score.reshape(-1)
        grad_logits = grad_il = None
        if ctx.needs_input_grad[1]:
            v = logits.shape[-1]
            live = (targets != ignore_index) & (targets >= 0) & (targets < v)
            grad_il = torch.where(live, -g, torch.zeros_like(g))
        if ctx.needs_input_grad[0] and method != _IRREDUCIBLE:
            if method in (_REDUCIBLE, _LOSS):
                row_scale = g.to(lse.dtype).contiguous()
                impl = backends.get(grad_name)
                if has_transform(softcap, logit_scale):
                    grad_logits = impl.ce_grad_rows(logits, targets, lse, row_scale, ignore_index,
                                                    softcap=softcap, logit_scale=logit_scale)
                else:  # the plain call: every backend's original signature
                    grad_logits = impl.ce_grad_rows(logits, targets, lse, row_scale, ignore_index)
            else:
                grad_logits = probability_score_grad(logits, targets, lse, g, method, ignore_index, softcap,
                                                     logit_scale)
        return grad_logits, grad_il, None, None, None, None, None, None, None


def probability_score_grad(logits: Tensor, targets: Tensor, lse: Tensor, g: Tensor, method: int,
                           ignore_index: int, softcap: float = 0.0, logit_scale: float = 1.0) -> Tensor:
    """``g[r] * d score_r / d z_r`` for ``gradnorm`` and ``entropy``, in the accumulation dtype of
    ``lse``, from the saved log-sum-exp (of the transformed logits z'); exact zeros where ``g`` is
    0 or the target masks the row.

    Row chunks keep eager temporaries at a few MiB; under torch.compile one expression.
    """
    n, v = targets.shape[0], logits.shape[-1]
    acc = lse.dtype
    z_rows = logits.reshape(n, v)
    out = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    live = (targets != ignore_index) & (targets >= 0) & (targets < v) & (g != 0)
    safe_t = torch.where(live, targets, torch.zeros_like(targets))
    scale = g.to(acc)
    chunk = n if is_compiling() else max(1, (1 << 20) // max(v, 1))
    for r0 in range(0, n, chunk):
        sl = slice(r0, min(n, r0 + chunk))
        z = reference.transform(z_rows[sl].to(acc), softcap, logit_scale)
        logp = z - lse[sl, None]
        p = torch.exp(logp)
        if method == _ENTROPY:
            # Re-centre log p on the row's own sum: the saved lse is rounded to an ulp of lse, which
            # for large (e.g. scaled) logits is large next to log p + H.
            s = p.sum(1, keepdim=True)
            logp = logp - torch.where(torch.isfinite(s) & (s > 0), torch.log(s), torch.zeros_like(s))
            p = torch.exp(logp)
            # A -inf logit is an impossible class: p log p = 0 and so is its gradient.
            plogp = torch.where(z == -math.inf, torch.zeros_like(p), p * logp)
            h = -plogp.sum(1, keepdim=True)
            d = -(plogp + p * h)
        else:  # gradnorm: r = p - onehot(y), d||r||/dz_j = p_j (r_j - <r, p>) / ||r||
            r = p - torch.zeros_like(p).scatter_(1, safe_t[sl, None], 1.0)
            norm = torch.linalg.vector_norm(r, dim=1, keepdim=True)
            c = (r * p).sum(1, keepdim=True)
            # ||r|| = 0 (p exactly one-hot): the norm's subgradient 0, as torch's norm backward.
            d = torch.where(norm > 0, p * (r - c) / torch.where(norm > 0, norm, torch.ones_like(norm)),
                            torch.zeros_like(p))
        d = d * scale[sl, None]
        if has_transform(softcap, logit_scale):
            d = d * reference.transform_grad(z, softcap, logit_scale)
        out[sl] = torch.where(live[sl, None], d, torch.zeros_like(d)).to(logits.dtype)
    return out.view(logits.shape)
