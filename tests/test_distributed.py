"""Distributed selection: 2 gloo processes on CPU (localhost), spawned once for all checks.

Every check runs inside the workers (assertion errors propagate through ``_spawn.launch``); cross-rank
facts are compared after an ``all_gather_object``.
"""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import rho_kernels as rk
from _spawn import launch  # tests/ is on the path
from rho_kernels.training import IrreducibleLossStore, OnlineBatchSelector, global_select, topk_by_key

WORLD = 2


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_raw_global_select(rank, n, k, keys_all, eligible_all=None):
    """global_select on this rank's slice vs the single-process top-K of the concatenation."""
    keys = keys_all[rank * n:(rank + 1) * n]
    elig = None if eligible_all is None else eligible_all[rank * n:(rank + 1) * n]
    payload = torch.arange(rank * n, (rank + 1) * n)  # each row carries its global row number
    wide = torch.arange(rank * n, (rank + 1) * n).repeat(3, 1).T.float()  # a [n, 3] leaf
    pick = global_select(keys, k, [payload, wide], eligible=elig)
    assert pick.rows[0].shape == (k,) and pick.rows[1].shape == (k, 3)
    assert torch.equal(pick.rows[0], pick.global_rows)  # the exchanged data follows the rows
    assert torch.equal(pick.rows[1][:, 0].long(), pick.global_rows)
    want = topk_by_key(keys_all, WORLD * k, eligible_all)
    everyone = _gather((pick.global_rows.tolist(), pick.valid.tolist(), pick.local_won.tolist()))
    rows = [r for g, _, _ in everyone for r in g]
    assert sorted(rows) == sorted(want.indices.tolist()), (rows, want.indices.tolist())
    assert len(set(rows)) == len(rows)
    valid = {r: v for g, vs, _ in everyone for r, v in zip(g, vs)}
    assert all(valid[int(r)] == bool(v) for r, v in zip(want.indices, want.valid))
    # own share first: a rank keeps min(k, its winners) of its own rows
    won = [r for _, _, w in everyone for r in w]
    own_winners = sum(won[rank * n:(rank + 1) * n])
    own_kept = sum(rank * n <= r < (rank + 1) * n for r in pick.global_rows.tolist())
    assert own_kept == min(k, own_winners)
    return pick


def _worker(rank: int, tmpdir: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    n, k = 20, 4
    # 1. all winners on rank 0: rank 1 must receive rank 0's surplus
    g = torch.Generator().manual_seed(0)
    keys_all = torch.cat([10 + torch.rand(n, generator=g), torch.rand(n, generator=g)])
    pick = _check_raw_global_select(rank, n, k, keys_all)
    if rank == 1:
        assert (pick.global_rows < n).all()
    # 2. ties, NaN, ineligible rows, random splits; 3. fewer eligible rows than K
    for seed in range(6):
        g = torch.Generator().manual_seed(100 + seed)
        keys_all = torch.randint(0, 6, (WORLD * n,), generator=g).float()
        keys_all[torch.rand(WORLD * n, generator=g) < 0.2] = math.nan
        elig = torch.rand(WORLD * n, generator=g) > 0.1
        _check_raw_global_select(rank, n, k + seed % 3, keys_all, elig)
    keys_all = torch.full((WORLD * n,), math.nan)
    keys_all[[3, 25, 30]] = torch.tensor([1.0, 2.0, 3.0])
    pick = _check_raw_global_select(rank, n, k, keys_all)
    assert int(torch.tensor(_gather(int(pick.valid.sum()))).sum()) == 3

    # 4. the selector in global mode == single-process selection over the whole batch,
    #    and one DDP step == the single-process step on the union of the picks
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    ref_model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    ref_model.load_state_dict(model.state_dict())
    n_big = 40
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(WORLD * n_big, 5, generator=g)
    y_all = torch.randint(0, 3, (WORLD * n_big,), generator=g)
    il_all = torch.rand(WORLD * n_big, generator=g)
    store = IrreducibleLossStore(il_all)
    sl = slice(rank * n_big, (rank + 1) * n_big)
    idx, x, y = torch.arange(WORLD * n_big)[sl], x_all[sl], y_all[sl]
    noisy = torch.zeros(WORLD * n_big, dtype=torch.bool)
    noisy[::3] = True
    ddp = nn.parallel.DistributedDataParallel(model)
    sel = OnlineBatchSelector(ddp, store, "reducible", ratio=0.1, distributed="global", score_mode="eval")
    sub_idx, sub_x, sub_y = sel.select((idx, x, y), noisy=noisy[sl])
    assert sub_idx.shape == (4,) and sub_x.shape == (4, 5)
    assert torch.equal(sub_x, x_all[sub_idx]) and torch.equal(sub_y, y_all[sub_idx])
    assert torch.equal(sel.last.global_rows, sub_idx)  # here global row == dataset index
    with torch.no_grad():
        want = rk.select(ref_model(x_all), y_all, il_all, WORLD * 4, method="reducible").indices
    union = [i for part in _gather(sub_idx.tolist()) for i in part]
    assert sorted(union) == sorted(want.tolist())
    stats = sel.stats.summary()
    assert stats["noisy_pick_fraction"] == pytest.approx(float(noisy[sub_idx].float().mean()))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    F.cross_entropy(ddp(sub_x), sub_y).backward()
    opt.step()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    F.cross_entropy(ref_model(x_all[want]), y_all[want]).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    # 5. local mode: per-rank top-k, no exchange
    loc = OnlineBatchSelector(model, store, "reducible", k=4, distributed="local", score_mode="eval")
    got = loc.select((idx, x, y))[0]
    with torch.no_grad():
        want_local = rk.select(model(x), y, il_all[sl], 4, method="reducible").indices + rank * n_big
    assert torch.equal(got, want_local)

    # 6. Boltzmann sampling in global mode: K distinct rows, k per rank
    boltz = OnlineBatchSelector(model, store, "reducible", k=4, temperature=0.5, distributed="global",
                                generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        got = boltz.select((idx, x, y))[0]
        union = [i for part in _gather(got.tolist()) for i in part]
        assert len(union) == WORLD * 4 and len(set(union)) == WORLD * 4

    # 7. too few eligible rows overall (NaN IL, unchecked store): every rank raises, not
    #    only the rank that received the invalid picks (which would leave the others hanging)
    il_nan = torch.full((WORLD * n_big,), math.nan)
    il_nan[[1, 2, 3]] = 0.5  # 3 eligible rows, all on rank 0; K = 8
    bad = OnlineBatchSelector(model, IrreducibleLossStore(il_nan, check=False), "reducible", k=4,
                              distributed="global")
    with pytest.raises(ValueError, match="not eligible"):
        bad.select((idx, x, y))
    keep = OnlineBatchSelector(model, IrreducibleLossStore(il_nan, check=False), "reducible", k=4,
                               distributed="global", invalid="keep")
    got = keep.select((idx, x, y))[0]
    assert got.shape == (4,)
    assert sum(_gather(int(keep.last.valid.sum()))) == 3

    with open(os.path.join(tmpdir, f"ok{rank}"), "w") as f:
        f.write("ok")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_two_process_gloo_global_and_local_selection():
    with tempfile.TemporaryDirectory() as tmpdir:
        launch(_worker, WORLD, tmpdir)
        assert sorted(os.listdir(tmpdir)) == ["ok0", "ok1"]


def test_single_process_global_select_equals_topk():
    # without an initialised process group, global_select is the plain top-k (world of one)
    keys = torch.tensor([0.5, 2.0, math.nan, 2.0, -1.0])
    pick = global_select(keys, 3, [torch.arange(5)])
    assert pick.global_rows.tolist() == [1, 3, 0] and pick.valid.all()
    assert pick.local_won.tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="out of range"):
        global_select(keys, 6, [])
    with pytest.raises(ValueError, match="rows"):
        global_select(keys, 2, [torch.arange(4)])
