"""Sharded LM heads: DTensor tensor parallel, FSDP2 and DeepSpeed ZeRO-3, and the trainers on them.

2 gloo processes on CPU (a 2x2 mesh of 4 for the recipe).  Every case is checked against a
one-process run of the same model and data: the unsharded op on the full head (tensor
parallel), the data-parallel average of the ranks' gradients (FSDP2, ZeRO-3: the head's
weights after one SGD step), one process with gradient accumulation over the same
micro-batches (the trainers).  Process start-up and imports dominate, so each launch runs
several cases.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rho_kernels as rk
from _spawn import free_port, launch  # tests/ is on the path
from test_vocab_parallel import _same_on_every_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
V, D, RATIO = 23, 8, 0.5
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "DeepSpeed is not installed (pip install rho_kernels[deepspeed])"


def _close(got, want, what, tol=1e-5):
    assert torch.allclose(got.double(), want.double(), rtol=tol, atol=tol), \
        f"{what}: max diff {(got.double() - want.double()).abs().max().item():.3g}"


def _data(seed: int, rows: int = 24):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows // 8, 8, D, generator=g)
    targets = torch.randint(0, V, (rows // 8, 8), generator=g)
    targets[0, 1] = -100
    targets.view(-1)[2:4] = torch.tensor([11, 12])  # both sides of the 2-rank shard boundary (12 | 11)
    ref = torch.rand(rows // 8, 8, generator=g) * 2
    return hidden, targets, ref


# ------------------------------------------------------------------------------ op level
def _tensor_parallel_cases(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    hidden, targets, ref = _data(0)
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    w_dt = distribute_tensor(weight, mesh, [Shard(0)])
    b_dt = distribute_tensor(bias, mesh, [Shard(0)])
    lo, hi = (0, 12) if rank == 0 else (12, V)  # torch.chunk's rule: 12 | 11
    assert torch.equal(w_dt.to_local(), weight[lo:hi])

    for method in rk.METHODS:  # selection: the unsharded op's, identical on every rank
        got = rk.linear_score(hidden, w_dt, targets, ref, bias=b_dt, method=method)
        _close(got, rk.linear_score(hidden, weight, targets, ref, bias=bias, method=method), f"score {method}")
        _same_on_every_rank(got, f"linear_score {method}")
        sel = rk.linear_select(hidden, w_dt, targets, ref, 7, bias=b_dt, method=method)
        want = rk.linear_select(hidden, weight, targets, ref, 7, bias=bias, method=method)
        assert torch.equal(sel.indices, want.indices), method
        seq = rk.linear_select_sequences(hidden, w_dt, targets, ref, 2, bias=b_dt, method=method)
        assert torch.equal(seq.indices, rk.linear_select_sequences(hidden, weight, targets, ref, 2, bias=bias,
                                                                   method=method).indices), method

    # The loss and its gradients: hidden plain or a replicated DTensor.
    h0, w0, b0 = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    want = rk.selective_linear_cross_entropy(h0, w0, targets, ref, RATIO, bias=b0)
    want.backward()
    for as_dtensor in (False, True):
        w1 = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
        b1 = nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
        h1 = hidden.clone().requires_grad_()
        h_in = DTensor.from_local(h1, mesh, [Replicate()]) if as_dtensor else h1
        loss = rk.selective_linear_cross_entropy(h_in, w1, targets, ref, RATIO, bias=b1, chunk_size=5)
        assert type(loss) is torch.Tensor
        _close(loss, want, "TP loss")
        _same_on_every_rank(loss.detach(), "TP loss")
        loss.backward()
        assert isinstance(w1.grad, DTensor) and w1.grad.placements == (Shard(0),)
        _close(w1.grad.to_local(), w0.grad[lo:hi], "TP weight gradient (this rank's shard)")
        _close(b1.grad.to_local(), b0.grad[lo:hi], "TP bias gradient")
        # the full hidden gradient on every rank (summed over the mesh), as DTensor layers give it
        _close(h1.grad, h0.grad, f"TP hidden gradient (hidden {'DTensor' if as_dtensor else 'plain'})")

    # The head module parallelised by ColwiseParallel: its hooks (made for F.linear) are bypassed.
    head = nn.Linear(D, V)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    parallelize_module(head, mesh, ColwiseParallel())
    h2 = hidden.clone().requires_grad_()
    loss = rk.selective_linear_cross_entropy(h2, head, targets, ref, RATIO)
    _close(loss, want, "TP head module loss")
    loss.backward()
    _close(head.weight.grad.to_local(), w0.grad[lo:hi], "TP head module weight gradient")
    _close(h2.grad, h0.grad, "TP head module hidden gradient")
    assert len(head._forward_hooks) == 1 and len(head._forward_pre_hooks) == 1  # restored after the call

    # DTensor logits, sharded over the vocabulary (ColwiseParallel(use_local_output=False)'s output).
    logits = torch.randn(3, 8, V, generator=g) * 2
    z_dt = distribute_tensor(logits, mesh, [Shard(-1)])
    for method in rk.METHODS:
        _close(rk.score(z_dt, targets, ref, method=method), rk.score(logits, targets, ref, method=method), method)
        assert torch.equal(rk.select(z_dt, targets, ref, 6, method=method).indices,
                           rk.select(logits, targets, ref, 6, method=method).indices)
        assert torch.equal(rk.select_mask(z_dt, targets, ref, 0.4, method=method),
                           rk.select_mask(logits, targets, ref, 0.4, method=method))
        assert torch.equal(rk.select_sequences(z_dt, targets, ref, 2, method=method).indices,
                           rk.select_sequences(logits, targets, ref, 2, method=method).indices)
    z0 = logits.clone().requires_grad_()
    z1 = distribute_tensor(logits, mesh, [Shard(-1)]).requires_grad_()
    want_z = rk.selective_cross_entropy(z0, targets, ref, RATIO)
    got_z = rk.selective_cross_entropy(z1, targets, ref, RATIO)
    _close(got_z, want_z, "DTensor logits loss")
    want_z.backward()
    got_z.backward()
    _close(z1.grad.to_local(), z0.grad[..., lo:hi], "DTensor logits gradient")

    # Any other layout: an error naming it and the supported ones.
    w_rep = distribute_tensor(weight, mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"weight is a DTensor with placements \(Replicate\(\),\).*Shard\(0\)"):
        rk.selective_linear_cross_entropy(hidden, w_rep, targets, ref, RATIO)
    with pytest.raises(ValueError, match=r"logits is a DTensor with placements \(Shard\(dim=0\),\).*Shard\(-1\)"):
        rk.score(distribute_tensor(logits, mesh, [Shard(0)]), targets, ref)
    with pytest.raises(ValueError, match="do not pass process_group= too"):
        rk.linear_score(hidden, w_dt, targets, ref, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="bias is a plain tensor"):
        rk.linear_score(hidden, w_dt, targets, ref, bias=bias)
    with pytest.raises(ValueError, match="hidden is a DTensor"):
        rk.linear_score(DTensor.from_local(hidden, mesh, [Replicate()]), weight, targets, ref)
    with pytest.raises(ValueError, match=r"hidden is a DTensor with placements \(Shard\(dim=0\),\)"):
        rk.linear_score(distribute_tensor(hidden, mesh, [Shard(0)]), w_dt, targets, ref)


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(self.inner(x))


class TinyLM(nn.Module):
    """A body and a head; the loss straight from the hidden state (``head`` = the module form)."""

    def __init__(self, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = Body(), nn.Linear(D, V)
        self.weight_of = None  # how the head is passed: None = the module, else head -> (weight, bias)

    def forward(self, x, targets, ref):
        w, bias = (self.head, None) if self.weight_of is None else self.weight_of(self.head)
        return rk.selective_linear_cross_entropy(self.body(x), w, targets, ref, RATIO, bias=bias)


def _dp_average_step(lr=0.5):
    """One process: SGD on the average of the ranks' losses (each rank's own micro-batch)."""
    model = TinyLM()
    losses = [model(*_data(10 + r)) for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return model, [x.item() for x in losses]


def _fsdp2_cases(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    want, want_losses = _dp_average_step()
    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded(weight_of=None):
        m = TinyLM()
        fully_shard(m.head, mesh=mesh)  # its own unit: resharded after its forward
        fully_shard(m, mesh=mesh)
        m.weight_of = weight_of
        return m, torch.optim.SGD(m.parameters(), lr=0.5)

    def step(m, opt):
        loss = m(*_data(10 + rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    m, opt = sharded()
    assert step(m, opt) == pytest.approx(want_losses[rank], rel=1e-6)
    diffs = {n: (p.full_tensor() - dict(want.named_parameters())[n]).abs().max().item()
             for n, p in m.named_parameters()}
    assert max(diffs.values()) < 1e-6, diffs  # the data-parallel average, every parameter

    # The obvious "fix", gathering the weight by hand, trains silently wrong: its gradient never
    # goes through FSDP's reduce-scatter (each rank keeps its own data's shard gradient).
    m, opt = sharded(lambda head: (head.weight.full_tensor(), head.bias.full_tensor()))
    step(m, opt)
    wrong = (m.head.weight.full_tensor() - want.head.weight).abs().max().item()
    assert wrong > 1e-3, wrong
    # The bare sharded weight: a data-parallel shard, refused (never a wrong gradient).
    m, _ = sharded(lambda head: (head.weight, head.bias))
    with pytest.raises(ValueError, match="data-parallel shard.*pass the head module"):
        m(*_data(10 + rank))
    return wrong


def _zero3_cases(rank):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    want, want_losses = _dp_average_step()
    model = TinyLM()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,  # DeepSpeed's default: 1.0
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                      config=config)
    head = engine.module.head
    assert head.weight.shape == (0,)  # partitioned outside the forward
    loss = engine(*_data(10 + rank))
    assert loss.item() == pytest.approx(want_losses[rank], rel=1e-6)
    engine.backward(loss)
    engine.step()
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            _close(p.detach(), dict(want.named_parameters())[name].detach(), f"ZeRO-3 {name} after one step", 1e-6)
    engine.module.weight_of = lambda head: (head.weight, head.bias)
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3 parameter .*shape \(0,\).*pass the head module"):
        engine(*_data(10 + rank))


def _op_worker(rank, with_deepspeed):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    _tensor_parallel_cases(rank)
    wrong = _fsdp2_cases(rank)
    if rank == 0:
        print(f"FSDP2 head weight with full_tensor(): max |diff| {wrong:.3g} from the data-parallel average")
    if with_deepspeed:
        _zero3_cases(rank)


def test_sharded_heads_gloo():
    """TP (DTensor weight, logits, head module), FSDP2 step, full_tensor() wrong, ZeRO-3 step."""
    launch(_op_worker, WORLD, HAS_DEEPSPEED)
    if not HAS_DEEPSPEED:
        pytest.skip(f"the ZeRO-3 cases did not run: {NO_DEEPSPEED} (TP and FSDP2 passed)")


def test_head_module_arguments():
    hidden, targets, ref = _data(0)
    head = nn.Linear(D, V)
    want = rk.selective_linear_cross_entropy(hidden, head.weight, targets, ref, RATIO, bias=head.bias)
    _close(rk.selective_linear_cross_entropy(hidden, head, targets, ref, RATIO), want, "module form")
    assert "forward" not in head.__dict__
    with pytest.raises(ValueError, match="bias= was given with the head module Linear"):
        rk.selective_linear_cross_entropy(hidden, head, targets, ref, RATIO, bias=head.bias)
    with pytest.raises(TypeError, match="without a .weight tensor"):
        rk.linear_score(hidden, nn.ReLU(), targets, ref)
    sel = rk.linear_select(hidden, head, targets, ref, 5)
    assert torch.equal(sel.indices, rk.linear_select(hidden, head.weight, targets, ref, 5, bias=head.bias).indices)


# ------------------------------------------------------------------------------ the trainers
STEPS, MICRO = 2, 2  # optimizer steps; micro-batch rows (per rank, or per accumulation step)


def _zero3_config():
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "zero_allow_untested_optimizer": True,
            "gradient_clipping": "auto",  # max_grad_norm (DeepSpeed's own default clips at 1.0)
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _trainer(kind, tmpdir, tag, **kw):
    import pathlib

    import test_integration_transformers as ti
    from rho_kernels.integrations import transformers as rkt

    args = ti.args(pathlib.Path(tmpdir) / f"{kind}-{tag}", max_steps=STEPS, per_device_train_batch_size=MICRO,
                   **kw)  # before the model (ZeRO-3 init)
    if kind == "rho1":
        return rkt.Rho1Trainer(model=ti.tiny_llama(0), args=args, train_dataset=ti.lm_dataset(16),
                               reference_model=ti.tiny_llama(1), keep_ratio=ti.RATIO, use_hidden_states=True)
    data = ti.cls_dataset(16)
    store = rkt.build_irreducible_loss_store(ti.tiny_bert(7), data, batch_size=8)
    return rkt.RhoLossTrainer(model=ti.tiny_bert(0), args=args, train_dataset=data, irreducible_loss=store,
                              ratio=0.5)


def _train(kind, tmpdir, engine=None, grad_accum=1):
    """Logged training losses of Rho1Trainer ("rho1") / RhoLossTrainer ("rholoss") on tiny models."""
    kw = dict(gradient_accumulation_steps=grad_accum, ddp_backend="gloo" if dist.is_initialized() else None)
    if engine == "zero3":
        kw.update(deepspeed=_zero3_config())
    tr = _trainer(kind, tmpdir, engine, **kw)
    tr.train()
    if engine == "zero3":  # partitioned for real: the head is (0,) outside the forward
        head = tr.model.get_output_embeddings() if kind == "rho1" else tr.model.classifier
        assert head.weight.shape == (0,) and hasattr(head.weight, "ds_id")
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def _micro_batch_loss(tr, kind, i):
    """The trainer's compute_loss on micro-batch ``i`` of its train dataset (in order)."""
    from transformers import default_data_collator

    lo = i * MICRO
    batch = default_data_collator(tr.train_dataset[lo:lo + MICRO])
    if kind == "rholoss":
        batch["dataset_index"] = torch.arange(lo, lo + MICRO)
    tr.model.train()
    return tr.compute_loss(tr.model, batch)


def _fsdp2_compute_loss(rank, kind, tmpdir):
    """The trainer's own compute_loss on an FSDP2 model, stepped by hand: accelerate 1.15 enables
    FSDP only on GPU distributed types, so on CPU Trainer(fsdp="full_shard") silently runs DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    tr = _trainer(kind, tmpdir, "fsdp2")
    model, mesh = tr.model, init_device_mesh("cpu", (WORLD,))
    if kind == "rho1":
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        # accelerate's arrangement: the tail unit kept unsharded after the forward
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
        head = model.lm_head
    else:
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        head = model.classifier
    fully_shard(model, mesh=mesh)
    assert isinstance(head.weight, DTensor) and head.weight.to_local().shape[0] < head.weight.shape[0]
    opt = torch.optim.SGD(model.parameters(), lr=tr.args.learning_rate)
    losses = []
    for step in range(STEPS):  # micro-batch 2 * step + rank: the one-process run's order
        loss = _micro_batch_loss(tr, kind, WORLD * step + rank)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    return losses


def _one_process_by_hand(kind, tmpdir):
    """The same micro-batches, one process, accumulated by hand."""
    tr = _trainer(kind, tmpdir, "one-hand")
    model = tr.model
    opt = torch.optim.SGD(model.parameters(), lr=tr.args.learning_rate)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for r in range(WORLD):
            loss = _micro_batch_loss(tr, kind, WORLD * step + r)
            (loss / WORLD).backward()
            total += loss.item() / WORLD
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _trainer_worker(rank, engine, tmpdir, want):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD) if engine == "fsdp2" else None
    for kind in ("rho1", "rholoss"):
        got = _fsdp2_compute_loss(rank, kind, tmpdir) if engine == "fsdp2" else _train(kind, tmpdir, engine)
        assert got == pytest.approx(want[kind], rel=1e-5, abs=1e-6), (kind, engine, got, want[kind])
        if rank == 0:
            print(f"{kind} under {engine}: losses {got} (one process with accumulation: {want[kind]})")


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    """One process, gradient accumulation over the micro-batches the 2 ranks see in one step."""
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("one")
    return {"zero3": {kind: _train(kind, tmp, grad_accum=WORLD) for kind in ("rho1", "rholoss")},
            "fsdp2": {kind: _one_process_by_hand(kind, tmp) for kind in ("rho1", "rholoss")}}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_trainers_match_one_process(engine, one_process_losses, tmp_path):
    """ZeRO-3: Trainer(deepspeed=...) for real.  FSDP2: the trainers' compute_loss on a
    fully_shard model (see _fsdp2_compute_loss for why not Trainer(fsdp=...) on CPU)."""
    if engine == "zero3" and not HAS_DEEPSPEED:
        pytest.skip(NO_DEEPSPEED)
    launch(_trainer_worker, WORLD, engine, str(tmp_path), one_process_losses[engine])


# ------------------------------------------------------------------------------ the recipe
def _recipe(*argv, nproc=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                         "--master_port", str(free_port())]
    out = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "python", "rho1_fsdp_tp.py"), *argv],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [float(line.split("loss")[1]) for line in out.stdout.splitlines() if line.startswith("step ")]


def test_recipe_fsdp_tp_matches_one_process():
    """python/rho1_fsdp_tp.py on a 2x2 (dp x tp) mesh: the losses of one process accumulating
    the same micro-batches."""
    small = ["--steps", "2", "--vocab", "101", "--dim", "32", "--seq", "16"]
    sharded = _recipe(*small, nproc=4)
    one = _recipe(*small, "--tp", "1", "--accum", "2")
    assert len(sharded) == 2 and sharded == pytest.approx(one, rel=1e-5), (sharded, one)
