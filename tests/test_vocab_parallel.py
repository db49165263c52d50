"""Vocabulary parallel: logits / LM head sharded over the vocabulary across gloo processes.

2 and 3 CPU processes, uneven shards, a target in every shard, ignore_index, NaN / +inf / -inf
logits in one shard only; the logit transform, label smoothing, z-loss and weights; the
divergence (NaN) rule.  Every check runs inside the workers against the unsharded op on the
full logits (each rank builds the same full inputs from one seed and keeps its columns); results
must also be identical on every rank (compared after an all_gather_object).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import rho_kernels as rk
from _spawn import launch  # tests/ is on the path

V = 23
# Uneven shards: rank r holds columns [BOUNDS[w][r], BOUNDS[w][r + 1]).
BOUNDS = {2: [0, 9, 23], 3: [0, 5, 14, 23]}


def _same_on_every_rank(x: torch.Tensor, what: str) -> None:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x.reshape(-1).contiguous().view(torch.uint8).tolist())  # bitwise (NaN included)
    assert all(o == out[0] for o in out), f"{what}: ranks disagree"


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern {got} vs {want}"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: inf pattern"
    fin = torch.isfinite(want)
    assert torch.equal(got[~fin & ~torch.isnan(want)], want[~fin & ~torch.isnan(want)]), f"{what}: inf signs"
    assert torch.allclose(got[fin], want[fin], rtol=tol, atol=tol), f"{what}: {got} vs {want}"


def _inputs(world: int):
    g = torch.Generator().manual_seed(11)
    b, t = 3, 8
    logits = torch.randn(b, t, V, generator=g) * 3
    targets = torch.randint(0, V, (b, t), generator=g)
    il = torch.rand(b, t, generator=g) * 2
    flat_t, flat_z = targets.view(-1), logits.view(-1, V)
    bounds = BOUNDS[world]
    for r in range(world):  # a target in every shard, also at a shard's first and last column
        flat_t[r] = bounds[r]
        flat_t[world + r] = bounds[r + 1] - 1
    flat_t[[7, 12]] = -100
    flat_z[9, bounds[1] + 1] = math.nan  # NaN in rank 1's shard only
    flat_z[10, bounds[-1] - 1] = math.inf  # +inf in the last shard only
    flat_z[11, : bounds[1]] = -math.inf  # rank 0's shard all -inf (an impossible block)
    return logits, targets, il


def _worker(rank: int, world: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    group = dist.group.WORLD
    logits, targets, il = _inputs(world)
    shard = logits[..., lo:hi]
    kw = dict(process_group=group, vocab_start_index=lo)

    for method in rk.METHODS:
        got = rk.score(shard, targets, il, method=method, **kw)
        want = rk.score(logits, targets, il, method=method, backend="reference")
        _close(got, want, f"score/{method}")
        _same_on_every_rank(got, f"score/{method}")
        sel = rk.select(shard, targets, il, 10, method=method, **kw)
        ref = rk.select(logits, targets, il, 10, method=method, backend="reference")
        assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.valid, ref.valid), method
        _same_on_every_rank(sel.indices, f"select/{method}")
        mask = rk.select_mask(shard, targets, il, 0.4, method=method, **kw)
        assert torch.equal(mask, rk.select_mask(logits, targets, il, 0.4, method=method, backend="reference"))
        seq = rk.select_sequences(shard, targets, il, 3, method=method, **kw)
        ref_seq = rk.select_sequences(logits, targets, il, 3, method=method, backend="reference")
        assert torch.equal(seq.indices, ref_seq.indices), method
        _close(seq.scores, ref_seq.scores, f"sequences/{method}")

    # The selective CE: same loss everywhere, each rank the gradient of its own columns.  Rows
    # 9 (NaN) and 10 (+inf) are a diverged model's: counted, they make the loss NaN (below).
    finite_t = targets.clone()
    finite_t.view(-1)[[9, 10]] = -100
    for reduction, tgt in (("mean", finite_t), ("none", targets), ("sum", targets)):
        x = shard.clone().requires_grad_()
        full = logits.clone().requires_grad_()
        loss = rk.selective_cross_entropy(x, tgt, il, 0.5, reduction=reduction, **kw)
        want = rk.selective_cross_entropy(full, tgt, il, 0.5, reduction=reduction, backend="reference")
        assert torch.isnan(loss).any() == (tgt is targets), reduction
        _close(loss.detach(), want.detach(), f"selective CE/{reduction}")
        _same_on_every_rank(loss.detach(), "selective CE")
        up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
        (gx,) = torch.autograd.grad((loss * up).sum(), x)
        (gf,) = torch.autograd.grad((want * up).sum(), full)
        # (NaN where a +inf logit makes exp(inf - inf): the same on both sides)
        assert torch.allclose(gx, gf[..., lo:hi], rtol=1e-5, atol=1e-7, equal_nan=True), reduction

    # The linear ops with a vocabulary-parallel head (bias too).
    g = torch.Generator().manual_seed(5)
    d = 6
    hidden = torch.randn(3, 8, d, generator=g)
    weight = torch.randn(V, d, generator=g)
    bias = torch.randn(V, generator=g)
    bias[BOUNDS[world][1]] = -math.inf  # an impossible class in rank 1's shard
    tgt = torch.randint(0, V, (3, 8), generator=g)
    tgt[tgt == BOUNDS[world][1]] = 0
    tgt.view(-1)[: world] = torch.tensor(BOUNDS[world][1:]) - 1  # the last column of every shard
    tgt[1, 2] = -100
    w_s, b_s = weight[lo:hi], bias[lo:hi]
    lkw = dict(chunk_size=5, **kw)
    for method in rk.METHODS:
        got = rk.linear_score(hidden, w_s, tgt, il, bias=b_s, method=method, **lkw)
        want = rk.linear_score(hidden, weight, tgt, il, bias=bias, method=method, backend="reference")
        _close(got, want, f"linear_score/{method}")
        _same_on_every_rank(got, f"linear_score/{method}")
        sel = rk.linear_select(hidden, w_s, tgt, il, 7, bias=b_s, method=method, **lkw)
        ref = rk.linear_select(hidden, weight, tgt, il, 7, bias=bias, method=method, backend="reference")
        assert torch.equal(sel.indices, ref.indices), method
        seq = rk.linear_select_sequences(hidden, w_s, tgt, il, 2, bias=b_s, method=method, **lkw)
        ref_seq = rk.linear_select_sequences(hidden, weight, tgt, il, 2, bias=bias, method=method,
                                             backend="reference")
        assert torch.equal(seq.indices, ref_seq.indices), method
    h1, w1, b1 = (x.clone().requires_grad_() for x in (hidden, w_s, b_s))
    h2, w2, b2 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss = rk.selective_linear_cross_entropy(h1, w1, tgt, il, 0.5, bias=b1, **lkw)
    want = rk.selective_linear_cross_entropy(h2, w2, tgt, il, 0.5, bias=b2, chunk_size=5, backend="reference")
    _close(loss.detach(), want.detach(), "linear CE")
    _same_on_every_rank(loss.detach(), "linear CE")
    loss.backward()
    want.backward()
    assert torch.allclose(w1.grad, w2.grad[lo:hi], rtol=1e-5, atol=1e-6), "weight shard gradient"
    assert torch.allclose(b1.grad, b2.grad[lo:hi], rtol=1e-5, atol=1e-6), "bias shard gradient"
    gh = h1.grad.clone()
    dist.all_reduce(gh)  # each shard's share of hidden's gradient sums to the full one
    assert torch.allclose(gh, h2.grad, rtol=1e-5, atol=1e-6), "hidden gradient (group sum)"

    # The logit transform, label smoothing (its sum merges over the shards; eps / V with the
    # global V), z-loss and weights: the sharded loss and gradients are the one-process ones.
    opts = dict(softcap=2.0, logit_scale=1.3, label_smoothing=0.1, z_loss=1e-2,
                weights=torch.rand(targets.shape, generator=torch.Generator().manual_seed(4)))
    mask = rk.select_mask(shard, finite_t, il, 0.4, softcap=2.0, logit_scale=1.3, **kw)
    assert torch.equal(mask, rk.select_mask(logits, finite_t, il, 0.4, softcap=2.0, logit_scale=1.3,
                                            backend="reference"))
    for reduction in ("mean", "none"):
        x = shard.clone().requires_grad_()
        full = logits.clone().requires_grad_()
        loss = rk.selective_cross_entropy(x, finite_t, il, 0.5, reduction=reduction, **opts, **kw)
        want = rk.selective_cross_entropy(full, finite_t, il, 0.5, reduction=reduction, backend="reference",
                                          **opts)
        _close(loss.detach(), want.detach(), f"selective CE with options/{reduction}")
        _same_on_every_rank(loss.detach(), "selective CE with options")
        up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
        (gx,) = torch.autograd.grad((loss * up).sum(), x)
        (gf,) = torch.autograd.grad((want * up).sum(), full)
        assert torch.allclose(gx, gf[..., lo:hi], rtol=1e-5, atol=1e-7, equal_nan=True), reduction
    lopts = dict(opts, weights=opts["weights"])
    h1, w1, b1 = (x.clone().requires_grad_() for x in (hidden, w_s, b_s))
    h2, w2, b2 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    loss = rk.selective_linear_cross_entropy(h1, w1, tgt, il, 0.5, bias=b1, **lopts, **lkw)
    want = rk.selective_linear_cross_entropy(h2, w2, tgt, il, 0.5, bias=b2, chunk_size=5, backend="reference",
                                             **lopts)
    _close(loss.detach(), want.detach(), "linear CE with options")
    loss.backward()
    want.backward()
    assert torch.allclose(w1.grad, w2.grad[lo:hi], rtol=1e-5, atol=1e-6), "weight shard gradient (options)"
    gh = h1.grad.clone()
    dist.all_reduce(gh)
    assert torch.allclose(gh, h2.grad, rtol=1e-5, atol=1e-6), "hidden gradient (options)"

    # Every reference loss NaN: nothing to select although tokens count: NaN and a warning.
    import rho_kernels.tokens as tokens_module

    tokens_module._STARVED_WARNED = False
    with pytest.warns(RuntimeWarning, match="counted tokens of a batch could be selected"):
        loss = rk.selective_cross_entropy(shard, finite_t, torch.full_like(il, math.nan), 0.5, **kw)
    assert torch.isnan(loss)
    loss = rk.selective_linear_cross_entropy(hidden, w_s, tgt, torch.full_like(il, math.nan), 0.5, bias=b_s,
                                             **lkw)
    assert torch.isnan(loss)
    h_nan = hidden.clone()
    h_nan[0, 0, 0] = math.nan  # a diverged hidden state on a counted token
    assert torch.isnan(rk.selective_linear_cross_entropy(h_nan, w_s, tgt, il, 0.5, bias=b_s, **lkw))

    # A target no rank owns: the same clear error on every rank.
    bad = targets.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=f"target {V} at flat row 0 is in no rank's vocabulary shard"):
        rk.score(shard, bad, il, **kw)
    dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_gloo(world):
    launch(_worker, world, world)


def test_shard_arguments_are_checked():
    z, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="vocab_start_index = 3 needs a process_group"):
        rk.score(z, t, None, method="loss", vocab_start_index=3)
    with pytest.raises(ValueError, match="vocab_start_index must be >= 0"):
        rk.select_mask(z, t, None, 0.5, method="loss", vocab_start_index=-1)
    with pytest.raises(TypeError, match="vocab_start_index must be an int"):
        rk.linear_score(torch.randn(4, 3), torch.randn(5, 3), t, None, method="loss", vocab_start_index=1.0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            rk.select(z, t, None, 1, method="loss", process_group=object())
