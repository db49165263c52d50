"""Selection across data-parallel ranks (``torch.distributed``, e.g. under DDP).

Two modes, chosen by :class:`~rho_kernels.training.OnlineBatchSelector`'s ``distributed=``:

``"local"``
    Every rank selects the top ``k`` of its own ``n_B`` candidates.  No communication.  This is
    what existing RHO-LOSS code does; it is *not* the global top ``W*k`` of the ``W*n_B``
    candidates when the winners are unevenly spread over the ranks.

``"global"`` (:func:`global_select`)
    The exact global top ``K = W*k`` of all ``W*n_B`` candidates, with every rank stepping on
    exactly ``k`` rows (DDP needs equal per-rank batches for a correctly averaged gradient).

How the balance is achieved.  Note first that with no exchange of examples, *any* rule that
gives every rank exactly ``k`` of its *own* rows and prefers higher scores reduces to the local
top ``k``: a rank's rows appear in the global order in its local order, so it can only ever
take its local top ``k``.  An exact global top-k therefore has to move a few examples
between ranks.  Each rank contributes its local top ``m = min(n_B, K)`` rows (the only rows that
can be global winners): their keys, global row numbers and the example tensors are
all-gathered (``W*m`` rows; for ``ratio = 0.1`` and ``W <= 10``, ``m = W*k <= n_B``).  Every
rank then computes, from identical data, the same decision:

1. the global top ``K`` of the gathered rows (score descending, ties to the lower global row
   ``rank * n_B + row``, ineligible rows last -- the order of :func:`rho_kernels.select` on the
   concatenated batch);
2. each rank keeps its own winners, up to ``k`` of them ("its own share");
3. the surplus winners of over-subscribed ranks (in global-row order) fill, in rank order,
   the ``k - kept`` free slots of under-subscribed ranks.

So the *set* trained on in one step is exactly the global top ``K`` (identical to a
single-process selection over the concatenated batch), every rank steps on ``k`` rows, and
only surplus winners change rank.  Costs: one all-gather of ``m`` rows per rank (scores plus
the candidate tensors of those rows), no host synchronisation (all shapes are fixed; the
decision is tensor arithmetic), and the gathered example tensors must have the same shape on
every rank (same ``n_B``, same per-example shapes).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import api as rk  # the public op API only (the package imports this layer)

__all__ = ["GlobalPick", "global_select", "topk_by_key", "world_info"]


def world_info(group: Optional[object] = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def topk_by_key(keys: Tensor, k: int, eligible: Optional[Tensor] = None, *, backend: str = "auto") -> rk.Selection:
    """Top ``k`` rows of a precomputed float key vector, in the order of :func:`rho_kernels.select`.

    Key descending, ties to the lower row, NaN keys and rows with ``eligible == False`` after
    every eligible row (``valid=False``).  Implemented with the public op itself: method
    ``irreducible`` scores a row ``-IL`` without reading the logits, so passing ``IL = -keys``
    and a zero-sized-cost dummy logits view ranks the keys exactly as the op ranks scores.
    """
    n = keys.shape[0]
    dummy = keys.new_zeros((1, 1), dtype=torch.float32).expand(n, 1)
    if eligible is None:
        targets = torch.zeros(n, dtype=torch.int64, device=keys.device)
    else:
        # ignore_index=-1 marks ineligible rows; V = 1 makes target 0 valid.
        targets = (~eligible).to(torch.int64).neg()
    return rk.select(dummy, targets, -keys.to(torch.float32), k, method="irreducible", ignore_index=-1,
                     backend=backend)


class GlobalPick(NamedTuple):
    """This rank's share of a global selection.

    Attributes:
        rows: list of tensors, the picked rows of each gathered leaf (``k`` rows each).
        keys: float32 ``[k]``, selection key of each picked row.
        valid: bool ``[k]``, False where the global top ``K`` reached ineligible rows.
        global_rows: int64 ``[k]``, ``source_rank * n_B + row`` of each picked row.
        local_won: bool ``[n_B]``, which of this rank's candidates are global winners (wherever
            they are trained).
        all_valid: bool scalar, True when all ``W*k`` global winners are valid -- identical on
            every rank, so that every rank takes the same decision about invalid picks.
    """

    rows: list
    keys: Tensor
    valid: Tensor
    global_rows: Tensor
    local_won: Tensor
    all_valid: Tensor


def _all_gather_rows(t: Tensor, world: int, group: Optional[object]) -> Tensor:
    """All-gather ``t`` ([m, ...]) into ``[world * m, ...]`` (rank-major)."""
    was_bool = t.dtype == torch.bool
    src = t.to(torch.uint8) if was_bool else t  # gloo has no bool all-gather
    src = src.contiguous()
    out = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(out, src, group=group)
    res = torch.cat(out, 0)
    return res.to(torch.bool) if was_bool else res


def global_select(
    keys: Tensor,
    k: int,
    leaves: Sequence[Tensor],
    *,
    eligible: Optional[Tensor] = None,
    group: Optional[object] = None,
    backend: str = "auto",
) -> GlobalPick:
    """Exact, balanced global top-k across ranks (see the module docstring).

    Args:
        keys: float ``[n_B]`` selection keys of this rank's candidates (NaN = ineligible);
            the same ``n_B`` on every rank.
        k: rows per rank to train on (``0 <= k <= n_B``); the global selection has ``W*k`` rows.
        leaves: tensors with ``n_B`` rows each (inputs, targets, indices, masks...) to be
            exchanged; the returned ``rows`` hold this rank's picked rows of each.
        eligible: optional bool ``[n_B]``; False rows rank last like NaN keys.
        group: process group (default: the world).
        backend: the op backend used for the orderings.

    Every rank must call this collectively with the same ``k`` and leaf shapes.
    """
    rank, world = world_info(group)
    n = keys.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k = {k!r} is out of range: need 0 <= k <= n_B = {n}")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor) or leaf.shape[:1] != (n,):
            raise ValueError(f"leaf {i} must be a tensor with {n} rows, got {getattr(leaf, 'shape', type(leaf))}")
    dev = keys.device
    K = world * k
    m = min(n, K)

    # 1. local candidates that can win: this rank's top m, in the op's order.
    local = topk_by_key(keys, m, eligible, backend=backend)
    lrow = local.indices
    # key, eligibility and global row packed into one float64 message (rows < 2^53 are exact).
    grow = lrow + rank * n
    msg = torch.stack([local.scores.to(torch.float64), local.valid.to(torch.float64), grow.to(torch.float64)], 1)
    if world > 1:
        msg_all = _all_gather_rows(msg, world, group)
        rows_all = [_all_gather_rows(leaf.index_select(0, lrow), world, group) for leaf in leaves]
    else:
        msg_all = msg
        rows_all = [leaf.index_select(0, lrow) for leaf in leaves]
    key_all = msg_all[:, 0].to(torch.float32)
    valid_all = msg_all[:, 1] > 0.5
    grow_all = msg_all[:, 2].to(torch.int64)

    # 2. global top K.  Within each rank the gathered rows are in local order and ranks are
    # concatenated in rank order, so among equal keys the lower buffer position is the lower
    # global row: the op's tie rule on the buffer is the tie rule on the concatenated batch.
    win = topk_by_key(key_all, K, valid_all, backend=backend)
    P = world * m
    is_win = torch.zeros(P, dtype=torch.bool, device=dev)
    is_win[win.indices] = True
    gpos = torch.full((P,), P, dtype=torch.int64, device=dev)  # position in the global order
    gpos[win.indices] = torch.arange(K, device=dev)

    # 3. balance: keep own winners up to k, hand the surplus (buffer order) to the ranks with
    # free slots (rank order).  All fixed-shape tensor arithmetic: no host sync.
    win2 = is_win.view(world, m)
    own_rank_of_win = torch.cumsum(win2.to(torch.int64), 1)  # 1-based among own winners
    keep = win2 & (own_rank_of_win <= k)
    surplus = (win2 & ~keep).reshape(-1)
    kept = keep.sum(1)
    deficit = k - kept
    cum_def = torch.cumsum(deficit, 0)
    q = torch.cumsum(surplus.to(torch.int64), 0) - 1  # 0-based surplus number
    receiver = torch.searchsorted(cum_def, q, right=True)
    owner = torch.arange(world, device=dev).repeat_interleave(m)
    assigned = torch.where(keep.reshape(-1), owner, torch.where(surplus, receiver, torch.full_like(owner, -1)))

    # 4. this rank's k rows, best (global order) first.
    order_key = torch.where(assigned == rank, gpos, torch.full_like(gpos, P + 1))
    pos = torch.sort(order_key, stable=True).indices[:k]
    local_won = torch.zeros(n, dtype=torch.bool, device=dev)
    local_won[lrow] = is_win.view(world, m)[rank]
    return GlobalPick(
        rows=[r.index_select(0, pos) for r in rows_all],
        keys=key_all.index_select(0, pos),
        valid=valid_all.index_select(0, pos),
        global_rows=grow_all.index_select(0, pos),
        local_won=local_won,
        all_valid=win.valid.all(),
    )

