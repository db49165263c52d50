"""The scoring pass at scale: resumable after SIGKILL, refusing foreign checkpoints, and sharded
over 2 and 3 gloo processes -- every table bit-identical to a clean one-process build.

Fault injection: a forked child builds with a checkpoint and SIGKILLs itself at the K-th event
(a batch scored, a pwrite into the table files, an fsync, a rename -- so also in the middle of a checkpoint
write), K drawn from a seeded generator; it is restarted until a run completes.
"""

import math
import multiprocessing
import os
import signal
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from _spawn import launch  # tests/ is on the path
from rho_kernels.training import IndexedDataset, IrreducibleLossStore, TokenLossStore, il_build

torch.set_num_threads(1)
N, D, C = 45, 4, 3


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)
    y[[4, 30]] = -100  # ignored examples: NaN in the table, not an error
    return IndexedDataset(TensorDataset(x, y))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))


class _LM(nn.Module):
    def __init__(self, vocab=13, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).cumsum(1))  # causal: position t sees tokens <= t


def _tokens(n=11, T=6, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp, tgt = torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, vocab, (n, T), generator=g)
    tgt[2, 4:] = -100
    return inp, tgt


class _Ragged(torch.utils.data.Dataset):
    def __init__(self, inp, tgt, lengths):
        self.inp, self.tgt, self.lengths = inp, tgt, lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        n = int(self.lengths[i])
        return i, self.inp[i, :n], self.tgt[i, :n]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


BUILD = dict(batch_size=4, progress=False)


def test_checkpointed_build_equals_plain_build_and_counts_ignored(tmp_path):
    ds, m = _data(), _model()
    clean = IrreducibleLossStore.build(m, ds, **BUILD)
    assert clean.validate() == {"num_examples": N, "num_ignored": 2, "num_unscored": 0}
    assert math.isnan(float(clean.losses[4])) and not math.isnan(float(clean.losses[5]))
    ck = IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "ck", checkpoint_every=3, **BUILD)
    assert _same(ck.losses, clean.losses) and ck.fingerprint == clean.fingerprint and ck.num_ignored == 2
    # a finished folder: a rerun scores nothing and gives the same table, here memory-mapped
    calls = []
    mm = IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "ck", checkpoint_every=3, mmap=True,
                                    forward=lambda mod, x: calls.append(1) or mod(x), **BUILD)
    assert not calls and _same(mm.losses, clean.losses)
    mm.losses[0] = 123.0  # copy-on-write mapping: the checkpoint files are not modified
    again = IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "ck", checkpoint_every=3, **BUILD)
    assert _same(again.losses, clean.losses)


def test_foreign_checkpoints_are_refused(tmp_path):
    ds, m = _data(), _model()
    IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "ck", **BUILD)
    with pytest.raises(ValueError, match="another model"):
        IrreducibleLossStore.build(_model(seed=1), ds, checkpoint=tmp_path / "ck", **BUILD)
    with pytest.raises(ValueError, match="another dataset"):
        IrreducibleLossStore.build(m, _data(seed=1), checkpoint=tmp_path / "ck", **BUILD)
    # an explicit dataset identity replaces the sampled-items probe (datasets with random items)
    IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "id", dataset_id="train-v1", **BUILD)
    IrreducibleLossStore.build(m, _data(seed=1), checkpoint=tmp_path / "id", dataset_id="train-v1", **BUILD)
    with pytest.raises(ValueError, match="another dataset"):
        IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "id", dataset_id="train-v2", **BUILD)
    with pytest.raises(ValueError, match="other build settings.*batch_size"):
        IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "ck", batch_size=5, progress=False)
    with pytest.raises(ValueError, match="map-style"):
        IrreducibleLossStore.build(m, torch.utils.data.DataLoader(ds, batch_size=4), checkpoint=tmp_path / "x",
                                   progress=False)
    with pytest.raises(ValueError, match="checkpoint=FOLDER"):
        IrreducibleLossStore.build(m, ds, mmap=True, **BUILD)
    with pytest.raises(ValueError, match="checkpoint_every"):
        IrreducibleLossStore.build(m, ds, checkpoint=tmp_path / "y", checkpoint_every=0, **BUILD)


# ------------------------------------------------------------------------------ kills mid-build
_EV = {"n": 0, "kill_at": 0}


def _tick():
    _EV["n"] += 1
    if _EV["n"] == _EV["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _build_child(kind: str, folder: str, kill_at: int, conn) -> None:
    torch.set_num_threads(1)
    _EV["kill_at"] = kill_at
    orig_fsync, orig_replace, orig_pwrite = os.fsync, os.replace, os.pwrite
    os.fsync = lambda fd: (_tick(), orig_fsync(fd))[1]
    os.replace = lambda a, b: (_tick(), orig_replace(a, b), _tick())[1]
    os.pwrite = lambda fd, data, at: (_tick(), orig_pwrite(fd, data, at))[1]
    _build(kind, folder, forward=lambda mod, x: (_tick(), mod(x))[1])
    conn.send(_EV["n"])


def _build(kind, folder, forward=None, **kw):
    if kind == "example":
        return IrreducibleLossStore.build(_model(), _data(), checkpoint=folder, checkpoint_every=2,
                                          forward=forward or (lambda mod, x: mod(x)), **BUILD, **kw).losses
    inp, tgt = _tokens()
    return TokenLossStore.build(_LM(), IndexedDataset(TensorDataset(inp, tgt)), dtype=torch.bfloat16,
                                checkpoint=folder, checkpoint_every=1, batch_size=2, progress=False,
                                forward=forward or (lambda mod, x: mod(x)), **kw).values


def _fork(target, args, timeout=120):
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, send))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail("child process hung")
    return p.exitcode, (recv.recv() if recv.poll() else None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("kind", ["example", "token"])
def test_build_killed_at_random_points_resumes_to_the_clean_table(tmp_path, kind):
    clean = _build(kind, str(tmp_path / "clean"))
    code, events = _fork(_build_child, (kind, str(tmp_path / "dry"), 0))
    assert code == 0 and events > 30
    resumed_with_progress = 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        folder = str(tmp_path / f"run{seed}")
        for attempt in range(200):
            # a kill within the next few events: every run makes at most a checkpoint or two of
            # progress, so kills land all along the build, many of them inside checkpoint writes
            code, _ = _fork(_build_child, (kind, folder, int(rng.integers(1, max(16, events // 4)))))
            if code == 0:
                break
            assert code == -signal.SIGKILL
            states = [f for f in os.listdir(folder) if f.startswith("state-")] if os.path.isdir(folder) else []
            resumed_with_progress += bool(states)
        else:
            pytest.fail("the build never finished")
        got = _build(kind, folder)  # the finished (or once more resumed) folder, in this process
        assert _same(got, clean), f"seed {seed}: resumed table differs from the clean build"
    assert resumed_with_progress > 0  # some restarts really continued from a checkpoint


# ------------------------------------------------------------------------------ distributed
def _dist_worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ds, m = _data(), _model()
    one = IrreducibleLossStore.build(m, ds, **BUILD)  # this process alone: the reference
    for kw in ({}, {"checkpoint": os.path.join(folder, f"ex{world}")},
               {"checkpoint": os.path.join(folder, f"ex{world}"), "mmap": True}):
        got = IrreducibleLossStore.build(m, ds, distributed=True, **BUILD, **kw)
        assert _same(got.losses, one.losses), (world, kw)
        assert got.fingerprint == one.fingerprint and got.num_ignored == one.num_ignored == 2
    inp, tgt = _tokens()
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6, 5, 3, 2])
    for dtype in (torch.float16, torch.float32):
        tds = IndexedDataset(TensorDataset(inp, tgt))
        ref = TokenLossStore.build(_LM(), tds, dtype=dtype, batch_size=3, progress=False)
        for kw in ({}, {"checkpoint": os.path.join(folder, f"tok{world}{dtype}"), "mmap": True}):
            got = TokenLossStore.build(_LM(), tds, dtype=dtype, batch_size=3, progress=False, distributed=True, **kw)
            assert _same(got.values, ref.values) and got.fingerprint == ref.fingerprint, (world, dtype, kw)
    rds = _Ragged(inp, tgt, lengths)
    ref = TokenLossStore.build(_LM(), rds, lengths=lengths, batch_size=3, progress=False)
    got = TokenLossStore.build(_LM(), rds, lengths=lengths, batch_size=3, progress=False, distributed=True)
    assert _same(got.values, ref.values) and torch.equal(got.offsets, ref.offsets)
    if world == 3:  # the 2-rank run's folder cannot be resumed with 3 ranks
        with pytest.raises(ValueError, match="2-rank build"):
            IrreducibleLossStore.build(m, ds, distributed=True, checkpoint=os.path.join(folder, "ex2"), **BUILD)
    with open(os.path.join(folder, f"ok{world}-{rank}"), "w") as f:
        f.write("ok")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or not hasattr(os, "fork"),
                    reason="needs torch.distributed with gloo, and fork")
def test_distributed_build_is_bit_identical_to_one_process_with_2_and_3_ranks():
    with tempfile.TemporaryDirectory() as folder:
        for world in (2, 3):
            # fork: the workers need no fresh interpreter (importing torch takes seconds)
            launch(_dist_worker, world, world, folder, start_method="fork")
        assert sorted(f for f in os.listdir(folder) if f.startswith("ok")) == ["ok2-0", "ok2-1", "ok3-0", "ok3-1", "ok3-2"]


def test_distributed_needs_a_process_group():
    with pytest.raises(ValueError, match="initialised"):
        IrreducibleLossStore.build(_model(), _data(), distributed=True, **BUILD)


def test_model_fingerprint_follows_weights():
    a, b = _model(), _model()
    assert il_build.model_fingerprint(a) == il_build.model_fingerprint(b)
    with torch.no_grad():
        b[0].bias[0] += 1e-6
    assert il_build.model_fingerprint(a) != il_build.model_fingerprint(b)
