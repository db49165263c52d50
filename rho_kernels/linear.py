"""Selection straight from hidden states and the LM head: the logits never exist in full.

Public entry points (re-exported as ``rho_kernels.<name>``):

* :func:`linear_score` -- :func:`rho_kernels.score` of ``hidden @ weight.T + bias``;
* :func:`linear_select` -- :func:`rho_kernels.select` of those logits;
* :func:`linear_select_sequences` -- :func:`rho_kernels.select_sequences` of those logits;
* :func:`selective_linear_cross_entropy` -- :func:`rho_kernels.selective_cross_entropy` of those
  logits, differentiable with respect to ``hidden``, ``weight`` and ``bias``.

The logits these ops stand for are ``F.linear(hidden, weight, bias)``, computed in the inputs'
dtype (fp32 accumulation, as ``F.linear`` does).  They are produced one chunk of rows at a time:
per chunk ``F.linear`` then the backend's fused ``score_rows``, so the largest temporary is one
``[chunk, V]`` block.  On CPU tensors with the cpu backend and ``chunk_size=None``, where full rows
would make short blocks, the forward works on ``[rows, width]`` tiles of the same budget instead
(tall, so that the head's weight is read once per 4096 rows): the ``partial_rows`` kernel folds
each tile into per-row partials (vocabulary-parallel's layout, each vocabulary slice a shard),
finalised once.  The loss saves only the per-row log-sum-exp and the selection; its
backward recomputes the logits of the selected rows only (a fixed-size superset of them, so the
backward costs ``ratio`` of a dense one), chunk by chunk, turns them in place into ``row_scale *
(softmax - onehot)`` with the backend's ``ce_grad_rows`` kernel and multiplies them into the
gradients of ``hidden`` (rows written once), ``weight`` and ``bias`` (accumulated).  With
half-precision weights and several chunks it runs one vocabulary slice of the head at a time
instead, over all candidate rows: each slice of the weight gradient is then one matmul in the
weight's dtype, and no float32 ``[V, D]`` sum is needed.  Every
rule of the logits ops (methods, order, ties, ineligible rows, ratio, reductions) is theirs:
the selection code is the same functions.

No host synchronisation: the chunk count comes from shapes, ``k`` of the ratio rule stays on the
device, and the ops trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _contract, backends, reference, sharding, tokens, vocab_parallel
from ._contract import FLOAT_DTYPES, RowProblem
from .api import Selection

__all__ = ["linear_score", "linear_select", "linear_select_sequences", "selective_linear_cross_entropy"]

# Bytes of one [chunk, V] logits block when chunk_size is None: large enough that the matmul runs
# at full speed, small next to the [N, V] logits it replaces.  CPU: above glibc's largest mmap
# threshold (32 MiB), so that every block is its own mapping, returned to the OS when freed.  At
# or below it, the dynamic threshold puts the blocks on the heap, where they sometimes pile up
# instead of being reused: one run of linear_select at [8192, 1024] x [32000, 1024] float32 with
# 32 MiB blocks peaked at 967 MiB of resident memory, the next identical run at 40 MiB (36 MiB
# with MALLOC_MMAP_THRESHOLD_ fixed at 16 MiB).  48 MiB: a bf16 block is 786 rows at V = 32000.
CHUNK_BUDGET_BYTES: dict[str, int] = {"cpu": 48 << 20, "cuda": 1 << 30}
DEFAULT_CHUNK_BUDGET_BYTES = 256 << 20
# Vocabulary rows per update of a float32 weight-gradient accumulator.
_W_SLICE = 4096
# Rows per tile of the cpu backend's tiled forward (chunk_size None, full rows over the budget):
# [rows, width] tiles of hidden @ weight.T, width = budget / rows.  Tall tiles read the head's
# weight once per 4096 rows instead of once per budget's worth of full rows, and the tile buffer
# is reused.  Matmuls alone at [8192, 1024] x [32000, 1024], 48 MiB budget, one run: 1.74 s fp32 /
# 0.28 s bf16 in 4096 x 3072 (6144) tiles, against 2.22 s / 0.98 s in fresh full-width blocks of
# 393 rows and 2.25 s / 0.55 s for the whole [N, V] logits at once.
_TILE_ROWS = 4096


# --------------------------------------------------------------------------- validation


def _check_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got dtype {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)} (rank {hidden.dim()})")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D] (as nn.Linear stores it), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        transposed = (f"; it looks transposed ([D, V]): pass weight.T, the [V, D] = "
                      f"{(weight.shape[1], weight.shape[0])} layout of nn.Linear.weight"
                      if weight.shape[0] == hidden.shape[-1] else "")
        raise ValueError(f"weight is [V, D] = {tuple(weight.shape)} but hidden has D = {hidden.shape[-1]} "
                         f"(shape {tuple(hidden.shape)}){transposed}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden on {hidden.device}")


def _check_lead(name: str, x, hidden: Tensor) -> None:
    if isinstance(x, Tensor) and x.shape != hidden.shape[:-1]:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match the leading dims "
                         f"{tuple(hidden.shape[:-1])} of hidden {tuple(hidden.shape)}")


def chunk_rows(num_rows: int, num_classes: int, dtype: torch.dtype, device: torch.device,
               chunk_size: Optional[int]) -> int:
    """Rows per logits block: ``chunk_size``, or as many as fit the device's memory budget."""
    if chunk_size is None:
        budget = CHUNK_BUDGET_BYTES.get(device.type, DEFAULT_CHUNK_BUDGET_BYTES)
        per_row = max(1, num_classes) * dtype.itemsize
        chunk = budget // per_row
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = chunk_size
    return max(1, min(chunk, max(num_rows, 1)))


def _prepare(hidden, weight, targets, irreducible_loss, bias, method, ignore_index, il_name="irreducible_loss",
             sharded=False, softcap=None, logit_scale=1.0):
    """Validate and normalise: a RowProblem whose logits are a zero-storage stand-in of the
    ``[*lead, V]`` logits (the checks read only their metadata; no chunk is computed yet)."""
    _check_linear(hidden, weight, bias)
    _check_lead("targets", targets, hidden)
    _check_lead(il_name, irreducible_loss, hidden)
    stand_in = torch.empty((), dtype=hidden.dtype, device=hidden.device).expand(*hidden.shape[:-1], weight.shape[0])
    return (vocab_parallel.prepare if sharded else _contract.prepare)(stand_in, targets, irreducible_loss, method,
                                                                      ignore_index, softcap=softcap,
                                                                      logit_scale=logit_scale)


def _ranges(num_rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(r0, min(num_rows, r0 + chunk)) for r0 in range(0, num_rows, chunk)]


def _chunk_problem(p: RowProblem, logits: Tensor, r0: int, r1: int) -> RowProblem:
    return p._replace(logits=logits, targets=p.targets[r0:r1], il=None if p.il is None else p.il[r0:r1],
                      lead_shape=torch.Size([r1 - r0]), num_rows=r1 - r0)


def _score_chunks(p: RowProblem, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int,
                  backend_name: str) -> tuple[Tensor, Tensor]:
    """Per-row (score, lse) of the whole problem, one logits block at a time (no autograd)."""
    impl = backends.get(backend_name)
    if p.method == _contract.METHOD_IDS["irreducible"]:
        return impl.score_rows(p)  # reads no logit: score the stand-in, no matmul
    n = p.num_rows
    if n == 0:
        return impl.score_rows(p)
    h = hidden.detach().reshape(n, hidden.shape[-1])
    w = weight.detach()
    b = None if bias is None else bias.detach()
    scores, lses = [], []
    for r0, r1 in _ranges(n, chunk):
        s, lse = impl.score_rows(_chunk_problem(p, F.linear(h[r0:r1], w, b), r0, r1))
        scores.append(s)
        lses.append(lse)
    return torch.cat(scores), torch.cat(lses)


def _tile_plan(num_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, chunk_size: Optional[int],
               backend_name: str) -> Optional[tuple[int, int]]:
    """(rows, width) of the cpu backend's tiled forward, or None for full-width row chunks: an
    explicit ``chunk_size`` (rows of full width, as documented), another backend, an extension
    without ``partial_rows``, or full rows that already fit the budget in tall blocks."""
    if chunk_size is not None or backend_name != "cpu" or device.type != "cpu" or num_rows == 0:
        return None
    if backends.get("cpu").partials_unavailable_reason(device) is not None:
        return None
    elems = CHUNK_BUDGET_BYTES["cpu"] // dtype.itemsize
    rows = min(num_rows, _TILE_ROWS)
    width = max(1, elems // rows)
    return None if width >= vocab else (rows, width)


def _score_tiles(p: RowProblem, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 plan: tuple[int, int]) -> vocab_parallel.Finalized:
    """Every row's (score, lse, eligible, CE) from ``[rows, width]`` tiles of the logits (cpu
    backend): the kernel folds each tile into per-row partials (vocab_parallel's layout, each
    vocabulary slice a "shard"), merged and finalised once (no autograd)."""
    rows, width = plan
    impl = backends.get("cpu")
    n, v = p.num_rows, weight.shape[0]
    h = hidden.detach().reshape(n, hidden.shape[-1])
    w = weight.detach()
    b = None if bias is None else bias.detach()
    # One tile buffer for every matmul (a fresh 48 MiB block is a fresh mapping, page-faulted in
    # each time); under torch.compile the compiler owns the buffers.
    buf = None if _contract.is_compiling() else h.new_empty(rows * width)
    parts = []
    for r0, r1 in _ranges(n, rows):
        part = None
        for v0, v1 in _ranges(v, width):
            ws, bs = w[v0:v1], None if b is None else b[v0:v1]
            if buf is None:
                z = F.linear(h[r0:r1], ws, bs)
            else:
                z = buf[:(r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
                if bs is None:
                    torch.mm(h[r0:r1], ws.t(), out=z)
                else:
                    torch.addmm(bs, h[r0:r1], ws.t(), out=z)
            part = impl.partial_rows(z, p.targets[r0:r1], part, v0, p.method, p.ignore_index, softcap=p.softcap,
                                     logit_scale=p.logit_scale)
        parts.append(part)
    return vocab_parallel.merge_and_finalize(torch.cat(parts)[None], p.targets, p.il, p.method, p.ignore_index)


def _score_chunks_sharded(p: RowProblem, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk: int,
                          vocab_start: int, group, with_zsum: bool = False) -> vocab_parallel.Finalized:
    """Vocabulary parallel: this shard's partials chunk by chunk, then ONE exchange for all rows."""
    n, d = p.num_rows, hidden.shape[-1]
    h = hidden.detach().reshape(n, d)
    w = weight.detach()
    b = None if bias is None else bias.detach()
    parts = [vocab_parallel.local_stats(F.linear(h[r0:r1], w, b), p.targets[r0:r1], vocab_start, p.method,
                                        p.ignore_index, p.softcap, p.logit_scale, with_zsum)
             for r0, r1 in _ranges(n, chunk)]
    stats = torch.cat(parts) if parts else torch.empty((0, vocab_parallel.NUM_COLUMNS),
                                                       dtype=_contract.lse_dtype(hidden.dtype), device=h.device)
    return vocab_parallel.merge_and_finalize(vocab_parallel.exchange(stats, group), p.targets, p.il, p.method,
                                             p.ignore_index)


def _scores(hidden, weight, targets, il, bias, method, ignore_index, chunk_size, backend, process_group,
            vocab_start_index, il_name="irreducible_loss", softcap=None,
            logit_scale=1.0) -> tuple[RowProblem, Tensor, Tensor]:
    """(problem, score, eligible) of every row, sharded or not, without autograd."""
    vocab_parallel.check_shard(process_group, vocab_start_index)
    sharded = process_group is not None
    p = _prepare(hidden, weight, targets, il, bias, method, ignore_index, il_name, sharded, softcap, logit_scale)
    chunk = chunk_rows(p.num_rows, p.num_classes, hidden.dtype, hidden.device, chunk_size)
    with torch.no_grad():
        if sharded:
            f = _score_chunks_sharded(p, hidden, weight, bias, chunk, vocab_start_index, process_group)
            return p, f.score, f.eligible
        name = tokens.resolve_names(backend, hidden.device)[0]
        plan = _tile_plan(p.num_rows, p.num_classes, hidden.dtype, hidden.device, chunk_size, name)
        if plan is not None and p.method != _contract.METHOD_IDS["irreducible"]:
            f = _score_tiles(p, hidden, weight, bias, plan)
            return p, f.score, f.eligible
        score, _ = _score_chunks(p, hidden, weight, bias, chunk, name)
        return p, score, reference.eligible_rows(p, score)


# --------------------------------------------------------------------------- selection


@sharding.linear_head
def linear_score(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    irreducible_loss: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    method: str = "reducible",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """:func:`rho_kernels.score` of the logits ``F.linear(hidden, weight, bias)``, never materialised.

    Args:
        hidden: ``[N, D]`` or ``[B, T, D]`` float32/bfloat16/float16/float64.
        weight: ``[V, D]`` in hidden's dtype, as ``nn.Linear`` stores an LM head.
        targets, irreducible_loss, method, ignore_index, backend: as for :func:`rho_kernels.score`.
        bias: ``[V]`` or None.
        chunk_size: rows per logits block; None picks the block from a per-device memory budget
            (``CHUNK_BUDGET_BYTES``; on the cpu backend, possibly a tile narrower than V).
        process_group, vocab_start_index: vocabulary parallel (a tensor-parallel LM head):
            ``weight``/``bias`` hold the rows ``[vocab_start_index, vocab_start_index + V_local)``
            of the head; every rank of the group gets the scores of the full vocabulary after one
            exchange (``rho_kernels.vocab_parallel``).  The same two arguments exist on every op
            of this module; the loss then returns each rank's own gradient of ``weight``/``bias``
            and this shard's share of ``hidden``'s gradient (the group's sum is the full one).
        softcap, logit_scale: the logits are ``z' = softcap * tanh(logit_scale * z / softcap)``
            (``logit_scale * z`` without a cap) of ``z = F.linear(hidden, weight, bias)``, as for
            :func:`rho_kernels.score`, applied block by block (z' is never materialised either).
            The same two arguments exist on every op of this module.

    Returns:
        float32 scores of shape ``targets.shape`` (not differentiable).
    """
    p, score, _ = _scores(hidden, weight, targets, irreducible_loss, bias, method, ignore_index, chunk_size, backend,
                          process_group, vocab_start_index, softcap=softcap, logit_scale=logit_scale)
    return score.view(p.lead_shape)


@sharding.linear_head
def linear_select(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    irreducible_loss: Optional[Tensor],
    k: int,
    *,
    bias: Optional[Tensor] = None,
    method: str = "reducible",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> Selection:
    """:func:`rho_kernels.select` of the logits ``F.linear(hidden, weight, bias)``, never materialised.

    Arguments are those of :func:`linear_score` plus ``k`` (``0 <= k <= N``).  Same order as
    ``select``: score descending, ties to the lower flat row index, ineligible rows last and
    flagged ``valid=False``.  No host synchronisation.
    """
    if isinstance(targets, Tensor):
        _contract.check_k(k, targets.numel())  # before any matmul
    p, score, eligible = _scores(hidden, weight, targets, irreducible_loss, bias, method, ignore_index, chunk_size,
                                 backend, process_group, vocab_start_index, softcap=softcap, logit_scale=logit_scale)
    k = _contract.check_k(k, p.num_rows)
    with torch.no_grad():
        # Keys are unique and encode the whole ordering rule: their top k is the selection.
        idx = torch.topk(tokens.ordering_key(score, eligible), k).indices
    return Selection(idx, score[idx], eligible[idx])


@sharding.linear_head
def linear_select_sequences(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    reference_loss: Optional[Tensor],
    k: int,
    *,
    bias: Optional[Tensor] = None,
    method: str = "reducible",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> Selection:
    """:func:`rho_kernels.select_sequences` of ``F.linear(hidden, weight, bias)``, never materialised.

    ``hidden`` must be ``[B, T, D]``; the ``k`` sequences with the highest mean token score over
    their non-ignored tokens, in ``select``'s order (sequence-level RHO-LOSS with the default
    ``method="reducible"`` and the reference model's per-token loss as ``reference_loss``).
    """
    tokens.check_reference_loss(targets, reference_loss, method)
    if isinstance(hidden, Tensor) and hidden.dim() != 3:
        raise ValueError(f"linear_select_sequences needs [B, T, D] hidden states, got shape {tuple(hidden.shape)}")
    if isinstance(hidden, Tensor):
        _contract.check_k(k, hidden.shape[0])  # before any matmul
    p, score, _ = _scores(hidden, weight, targets, reference_loss, bias, method, ignore_index, chunk_size, backend,
                          process_group, vocab_start_index, "reference_loss", softcap, logit_scale)
    num_seq, seq_len = p.lead_shape
    k = _contract.check_k(k, num_seq)
    with torch.no_grad():
        return tokens.top_sequences(score, p.targets != p.ignore_index, num_seq, seq_len, k)


# --------------------------------------------------------------------------- selective CE


def _grad_accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision weight/bias gradients are sums over every chunk: accumulate them in float32
    # so that the chunking adds no rounding of its own (one rounding at the end, as F.linear).
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _SelectiveLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, reference_loss, weights, ratio, ignore_index, reduction, chunk,
                plan, forward_name, grad_name, vocab_start, group, config):
        softcap, logit_scale, label_smoothing, z_loss = config
        smooth = label_smoothing != 0.0
        p = _prepare(hidden, weight, targets, reference_loss, bias, "reducible", ignore_index,
                     sharded=group is not None, softcap=softcap or None, logit_scale=logit_scale)
        n, d = p.num_rows, hidden.shape[-1]
        h = hidden.reshape(n, d)
        impl = backends.get(forward_name)
        scores, lses, ces, eligibles, zsums = [], [], [], [], []
        for r0, r1 in _ranges(n, chunk) if group is None and plan is None else ():
            z = F.linear(h[r0:r1], weight, bias)
            pc = _chunk_problem(p, z, r0, r1)
            if smooth:
                s, lse, zs = impl.score_rows(pc, with_zsum=True)
                zsums.append(zs)
            else:
                s, lse = impl.score_rows(pc)
            e = reference.eligible_rows(pc, s)
            # CE = lse - z'_y in the accumulation dtype: the value the kernel subtracted IL from.
            ces.append(lse - tokens.transformed_target_logits(z, pc.targets, e, lse.dtype, softcap, logit_scale))
            scores.append(s)
            lses.append(lse)
            eligibles.append(e)
            # Free this block before the next one is computed: two would be alive during the
            # next F.linear (the old one still bound to z), doubling the peak.
            del z, pc
        acc = _contract.lse_dtype(hidden.dtype)
        num_classes = p.num_classes
        if group is not None or plan is not None:  # merged partials: of every rank, or of every tile
            if group is not None:
                f = _score_chunks_sharded(p, hidden, weight, bias, chunk, vocab_start, group, smooth)
                num_classes = f.num_classes
            else:
                f = _score_tiles(p, hidden, weight, bias, plan)
            score, lse, eligible, ce, zsum = f.score, f.lse, f.eligible, f.ce, f.zsum
        elif n == 0:
            score = torch.empty((0,), dtype=torch.float32, device=hidden.device)
            lse = ce = zsum = torch.empty((0,), dtype=acc, device=hidden.device)
            eligible = torch.empty((0,), dtype=torch.bool, device=hidden.device)
        else:
            score, lse, ce, eligible = torch.cat(scores), torch.cat(lses), torch.cat(ces), torch.cat(eligibles)
            zsum = torch.cat(zsums) if smooth else None
        counted = p.targets != ignore_index
        mask = tokens.top_fraction_mask(score, eligible, counted, ratio)
        loss = tokens.row_losses(ce, lse, zsum, num_classes, label_smoothing, z_loss)
        out, den = tokens.reduce_selected(loss, mask, reduction, p.lead_shape, counted, lse, weights)
        tokens.warn_if_nothing_eligible(counted, eligible, p.il, lse)
        # The backward needs only the selected rows.  Their number k lives on the device; a fixed
        # superset of max_selected(n, ratio) rows (the best by the ordering key, so every selected
        # row is among them) keeps shapes static.  Ascending row order: a deterministic sum.
        rows = torch.topk(tokens.ordering_key(score, eligible), max_selected(n, ratio)).indices.sort().values
        sharded_v = num_classes[rows] if isinstance(num_classes, Tensor) else None
        ctx.save_for_backward(hidden, weight, bias, p.targets, lse, mask, den, rows, weights, sharded_v)
        ctx.config = (ignore_index, reduction, chunk, grad_name, vocab_start, group, config)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse, mask, den, rows, weights, sharded_v = ctx.saved_tensors
        ignore_index, reduction, chunk, grad_name, vocab_start, group, config = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, d = targets.shape[0], hidden.shape[-1]
        acc = lse.dtype
        row_scale = tokens.row_scales(grad_out, mask, reduction, den, weights, acc)
        impl = backends.get(grad_name)
        grad_kw = tokens.grad_options(config)
        h = hidden.reshape(n, d)
        # Gather the candidate rows once: the logits are recomputed for them only.
        sel_h, sel_t, sel_lse = h[rows], targets[rows], lse[rows]
        sel_scale, sel_mask = row_scale[rows].contiguous(), mask[rows]
        ranges = _ranges(rows.shape[0], chunk)
        if need_w and group is None and len(ranges) > 1 and weight.dtype in (torch.bfloat16, torch.float16):
            slices = _vocab_slices(rows.shape[0], weight.shape[0], chunk, weight.element_size())
            if slices is not None:
                grad_h, grad_w, grad_b = _backward_by_vocab_slice(
                    h, weight, bias, rows, sel_h, sel_t, sel_lse, sel_scale, sel_mask, ignore_index, slices,
                    need_h, need_b, config)
                return (
                    None if grad_h is None else grad_h.view(hidden.shape), grad_w, grad_b,
                    None, None, None, None, None, None, None, None, None, None, None, None, None,
                )
        # Exact zeros on every unselected row: they are never written.
        grad_h = torch.zeros_like(h) if need_h else None
        # One chunk: the weight gradient is one matmul in the weight's dtype, as F.linear's.  More:
        # a sum over chunks, accumulated in float32 for half-precision weights.
        w_acc = weight.dtype if len(ranges) <= 1 else _grad_accumulation_dtype(weight.dtype)
        grad_w = torch.zeros(weight.shape, dtype=w_acc, device=weight.device) if need_w and not ranges else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        # Under torch.compile the compiler owns buffer reuse; in-place only eagerly.
        inplace = not _contract.is_compiling()
        for i, (r0, r1) in enumerate(ranges):
            live = sel_mask[r0:r1, None]
            z = F.linear(sel_h[r0:r1], weight, bias)
            if group is None:
                gz = impl.ce_grad_rows(z, sel_t[r0:r1], sel_lse[r0:r1], sel_scale[r0:r1], ignore_index, inplace,
                                       **grad_kw)
            else:  # this shard's columns
                gz = vocab_parallel.ce_grad_rows(z, sel_t[r0:r1], sel_lse[r0:r1], sel_scale[r0:r1], ignore_index,
                                                 vocab_start, *config, sharded_v[r0:r1])
            if need_h:
                # where(): zeros on candidates outside the selection, even against non-finite weights.
                grad_h[rows[r0:r1]] = torch.where(live, gz @ weight, 0.0)
            if need_w:
                # Unselected candidates add nothing, even a NaN/inf hidden state (0 * NaN would).
                hc = torch.where(live, sel_h[r0:r1], 0.0)
                if i == 0 and w_acc == weight.dtype:
                    grad_w = gz.t() @ hc  # no zero fill of a [V, D] buffer
                elif w_acc == weight.dtype:
                    grad_w.addmm_(gz.t(), hc)
                else:
                    # Half-precision products added to the float32 sum a vocabulary slice at a
                    # time: no [V, D] temporary in the weight's dtype next to the float32 sum.
                    if i == 0:
                        grad_w = torch.empty(weight.shape, dtype=w_acc, device=weight.device)
                    for v0 in range(0, weight.shape[0], _W_SLICE):
                        part = gz[:, v0:v0 + _W_SLICE].t() @ hc
                        # add_ on the view: "grad_w[a:b] += part" would also copy the slice
                        # onto itself (Python's setitem after the in-place add).
                        if i == 0:
                            grad_w[v0:v0 + _W_SLICE].copy_(part)
                        else:
                            grad_w[v0:v0 + _W_SLICE].add_(part)
            if need_b:
                grad_b += gz.sum(0, dtype=acc)
            del z, gz  # one [chunk, V] block alive at a time (see the forward)
        return (
            None if grad_h is None else grad_h.view(hidden.shape),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None, None, None, None, None, None, None, None, None,
        )


def _vocab_slices(num_rows: int, vocab: int, chunk: int, elem: int) -> Optional[list[tuple[int, int]]]:
    """Vocabulary slices of the half-precision backward, or None where the row path is smaller.

    A ``[num_rows, width]`` slice lives as the logits, their float32 working copy and the
    gradient (``2 * elem + 4`` bytes an entry): as many columns as keep that within half a
    forward block (``chunk x vocab`` entries of ``elem`` bytes), so that the backward's peak,
    with hidden's float32 sum and the gathered rows next to it, stays near the forward's.  The slices need a float32
    ``[num_rows, D]`` sum (hidden's gradient), the row path a float32 ``[V, D]`` one (weight's):
    more candidate rows than classes, None."""
    if num_rows > vocab:
        return None
    width = max(1, chunk * vocab * elem // (2 * num_rows * (2 * elem + 4)))
    return _ranges(vocab, width)


def _backward_by_vocab_slice(h, weight, bias, rows, sel_h, sel_t, sel_lse, sel_scale, sel_mask, ignore_index,
                             slices, need_h, need_b, config):
    """The selective CE's gradients one vocabulary slice of the head at a time, all candidate rows at once.

    Each slice of the weight gradient is ONE matmul over every candidate row, written in the
    weight's dtype (fp32 accumulation inside the GEMM, one rounding, as F.linear's backward), so
    no float32 ``[V, D]`` sum is needed.  hidden's gradient is summed over the slices in float32
    (``[rows, D]``: small), one half-precision product per slice."""
    live = sel_mask[:, None]
    # Unselected candidates add nothing to the weight's gradient, even a NaN/inf hidden state.
    hc = torch.where(live, sel_h, 0.0)
    acc_h = torch.zeros(sel_h.shape, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty_like(bias) if need_b else None
    for v0, v1 in slices:
        w = weight[v0:v1]
        z = F.linear(sel_h, w, None if bias is None else bias[v0:v1])
        gz = vocab_parallel.ce_grad_rows(z, sel_t, sel_lse, sel_scale, ignore_index, v0, *config, weight.shape[0])
        del z
        grad_w[v0:v1] = gz.t() @ hc
        if need_b:
            grad_b[v0:v1] = gz.sum(0, dtype=torch.float32)
        if need_h:
            acc_h += gz @ w
        del gz
    grad_h = None
    if need_h:
        # Exact zeros on every unselected row, even against non-finite weights (where()).
        grad_h = torch.zeros_like(h)
        grad_h[rows] = acc_h.masked_fill_(~live, 0.0).to(h.dtype)
    return grad_h, grad_w, grad_b


def max_selected(num_rows: int, ratio: float) -> int:
    """A static upper bound of the number of tokens the ratio rule keeps out of ``num_rows``
    (``k <= ratio * n`` rounded, ``n <= num_rows``; one row of slack for any rounding)."""
    return min(num_rows, math.ceil(ratio * num_rows) + 1)


@sharding.linear_head
def selective_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    reference_loss: Tensor,
    ratio: float,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start_index: int = 0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weights: Optional[Tensor] = None,
) -> Tensor:
    """:func:`rho_kernels.selective_cross_entropy` of ``F.linear(hidden, weight, bias)``, never
    materialising the logits or their gradient.

    Keeps ``k`` of the ``n`` non-ignored tokens (the ratio rule of ``selective_cross_entropy``)
    by excess loss ``CE - reference_loss`` (the order of ``select``) and returns their
    cross-entropy.  Differentiable
    in ``hidden``, ``weight`` and ``bias``; unselected tokens get exact zeros in ``hidden``'s
    gradient and add nothing to ``weight``'s / ``bias``'s.  Peak extra memory: one ``[chunk, V]``
    block (forward and backward) plus the gradients themselves (and, for half-precision inputs, a
    float32 sum of hidden's gradient over the selected rows; a float32 ``[V, D]`` one of the
    weight's instead only where there are more selected rows than classes).

    Args:
        hidden: ``[N, D]`` or ``[B, T, D]``; weight ``[V, D]``; bias ``[V]`` or None (one dtype).
        targets, reference_loss, ratio, ignore_index, reduction, backend: as for
            :func:`rho_kernels.selective_cross_entropy`.
        chunk_size: rows per logits block; None picks the block from the device's memory budget
            (on the cpu backend's forward, possibly a tile narrower than V).
        softcap, logit_scale, label_smoothing, z_loss, weights: as for
            :func:`rho_kernels.selective_cross_entropy` (the transform is applied to each recomputed
            block, forward and backward).  ``ratio=1.0`` with ``weights`` is a plain weighted fused
            linear cross-entropy (the logits never exist), with or without smoothing / z-loss.
        The non-finite rule is that of :func:`rho_kernels.selective_cross_entropy`: a NaN / inf
        in ``hidden`` (a counted token's row) or in the head makes the loss NaN.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or ``targets.shape`` for "none".
    """
    if reduction not in tokens.REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(tokens.REDUCTIONS)}, got {reduction!r}")
    ratio = tokens.check_ratio(ratio)
    tokens.check_reference_loss(targets, reference_loss)
    config = tokens.loss_config(softcap, logit_scale, label_smoothing, z_loss, weights, targets)
    vocab_parallel.check_shard(process_group, vocab_start_index)
    p = _prepare(hidden, weight, targets, reference_loss, bias, "reducible", ignore_index, "reference_loss",
                 sharded=process_group is not None)
    chunk = chunk_rows(p.num_rows, p.num_classes, hidden.dtype, hidden.device, chunk_size)
    forward_name, grad_name = tokens.resolve_names(backend, hidden.device)
    plan = None if process_group is not None else _tile_plan(p.num_rows, p.num_classes, hidden.dtype, hidden.device,
                                                             chunk_size, forward_name)
    return _SelectiveLinearCE.apply(hidden, weight, bias, targets, reference_loss, weights, ratio, ignore_index,
                                    reduction, chunk, plan, forward_name, grad_name, vocab_start_index, process_group,
                                    config)
