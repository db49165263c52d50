"""RhoLossMixin in a real (few-step, CPU) Lightning run: it selects exactly what an
OnlineBatchSelector with the same options selects, trains on the picks only, and logs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")  # CI installs it (requirements.txt)

from rho_kernels.integrations.lightning import RhoLossMixin  # noqa: E402
from rho_kernels.training import IndexedDataset, IrreducibleLossStore, OnlineBatchSelector  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, D, C, NB, NSMALL = 64, 8, 4, 16, 4


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return x, y


class Net(RhoLossMixin, L.LightningModule):
    def __init__(self, store, **opts):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
        self.configure_rho_loss(store, k=NSMALL, **opts)
        self.seen = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        index, x, y = batch
        self.seen.append(index.clone())
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    x, y = data()
    return torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(x, y)), batch_size=NB,
                                       shuffle=False)


def store():
    x, y = data()
    torch.manual_seed(1)
    il = nn.Linear(D, C)
    return IrreducibleLossStore.build(il, IndexedDataset(torch.utils.data.TensorDataset(x, y)), batch_size=32,
                                      progress=False)


def trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=L.loggers.CSVLogger(str(tmp_path)),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1)


def test_lightning_run_selects_what_the_selector_selects(tmp_path):
    s = store()
    model = Net(s, method="reducible")
    shadow = copy.deepcopy(model.net)  # replays the run by hand with a plain selector
    tr = trainer(tmp_path, 4)
    tr.fit(model, loader())
    assert len(model.seen) == 4

    sel = OnlineBatchSelector(shadow, s, "reducible", k=NSMALL)
    opt = torch.optim.SGD(shadow.parameters(), lr=0.1)
    for step, batch in zip(range(4), loader()):
        index, x, y = sel.select(batch)
        assert torch.equal(index, model.seen[step])
        opt.zero_grad()
        F.cross_entropy(shadow(x), y).backward()
        opt.step()
    for p, q in zip(shadow.parameters(), model.net.parameters()):
        torch.testing.assert_close(p, q)
    # logged through self.log: the per-step picked score and the epoch summary
    metrics = tr.callback_metrics
    assert "rho_loss/mean_score_picked_step" in metrics
    expected = sel.stats.summary()["mean_score_picked"]
    assert float(metrics["rho_loss/epoch_mean_score_picked"]) == pytest.approx(expected, rel=1e-5)
    assert model.rho_selector.step == 4
    # what selection cost: the training step is timed between the batch hooks
    assert 0 < float(metrics["rho_loss/epoch_scoring_time_fraction"]) < 1
    assert float(metrics["rho_loss/epoch_step_overhead"]) > 0
    assert "rho_loss/epoch_noisy_pick_fraction" not in metrics  # no noisy= given


def test_lightning_validation_batches_pass_through(tmp_path):
    model = Net(None, method="loss")
    seen_val = []

    def validation_step(batch, batch_idx):
        seen_val.append(batch[0].shape[0])

    model.validation_step = validation_step
    tr = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                   val_check_interval=2, num_sanity_val_steps=0)
    tr.fit(model, loader(), loader())
    assert [i.shape[0] for i in model.seen] == [NSMALL, NSMALL]
    assert seen_val == [NB]


def test_lightning_checkpoint_keeps_selector_step(tmp_path):
    model = Net(None, method="uniform", generator=torch.Generator().manual_seed(3))
    tr = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))
    tr.fit(model, loader())
    path = tmp_path / "m.ckpt"
    tr.save_checkpoint(str(path))
    again = Net(None, method="uniform", generator=torch.Generator().manual_seed(99))
    again.on_load_checkpoint(torch.load(str(path), weights_only=False))
    assert again.rho_selector.step == 3
    assert torch.equal(again.rho_selector.generator.get_state(), model.rho_selector.generator.get_state())


def test_import_without_lightning_names_the_extra():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "sys.modules['pytorch_lightning'] = None\n"
            "try:\n import rho_kernels.integrations.lightning\n"
            "except ImportError as e:\n print('MSG', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "pip install rho_kernels[lightning]" in out.stdout, out.stdout + out.stderr
