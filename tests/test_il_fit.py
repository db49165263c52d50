"""The IL recipe helpers (early stopping, no-holdout store) and the time-to-accuracy benchmark's quick mode."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rho_kernels.training import IndexedDataset, build_no_holdout_store, fit_il_model, split_halves

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=200, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long()
    flip = torch.rand(n, generator=g) < noise
    return IndexedDataset(torch.utils.data.TensorDataset(x, torch.where(flip, 1 - y, y)))


def _net():
    return nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 2))


def test_fit_il_model_stops_early_and_returns_its_best_epoch():
    ds = _data()
    torch.manual_seed(0)
    fit = fit_il_model(_net(), ds, max_epochs=300, patience=3, lr=1e-2, seed=1)
    # 30% flipped labels: the validation loss turns up long before 300 epochs
    assert fit.epochs_run < 300 and fit.epochs_run == fit.best_epoch + 3
    # the model is the best epoch's: its validation loss is the one recorded
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
    val = perm[:int(round(0.15 * len(ds)))]
    x, y = ds.dataset.tensors[0][val], ds.dataset.tensors[1][val]
    with torch.no_grad():
        assert F.cross_entropy(fit.model(x), y).item() == pytest.approx(fit.best_val_loss, rel=1e-5)
    assert not fit.model.training
    with pytest.raises(ValueError, match="val_fraction"):
        fit_il_model(_net(), ds, val_fraction=1.0)
    with pytest.raises(ValueError, match="patience"):
        fit_il_model(_net(), ds, patience=0)


def test_no_holdout_store_scores_each_half_with_the_other_halfs_model():
    ds = _data(120)
    torch.manual_seed(0)
    store, fits = build_no_holdout_store(_net, ds, seed=4, progress=False, fit_kwargs={"max_epochs": 5})
    assert len(store) == 120 and len(fits) == 2
    a, b = split_halves(120, seed=4)
    x, y = ds.dataset.tensors
    with torch.no_grad():
        for half, model in ((b, fits[0].model), (a, fits[1].model)):  # model 0 trained on half a
            ce = F.cross_entropy(model(x[half]), y[half], reduction="none")
            torch.testing.assert_close(store.gather(half), ce, rtol=1e-5, atol=1e-6)


def test_time_to_accuracy_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_time_to_accuracy.py"), "--quick",
                           "--out", str(tmp_path), "--no-plot"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((tmp_path / "time_to_accuracy_quick.json").read_text())
    s = res["summary"]
    assert {"uniform", "rho0.5_holdout", "rho0.5_recipe", "rho0.5_recipe_inference_mode"} <= set(s)
    assert s["uniform"]["step_cost_vs_uniform"] == 1.0
    # inference_mode changes no number: the same picks as fp32 eager scoring
    assert res["step_costs_interleaved"]["rho0.5_inference_mode"]["pick_agreement"] == 1.0
    assert s["rho0.5_recipe"]["forward_equivalents_to_target"] is None or \
        s["rho0.5_recipe"]["forward_equivalents_to_target"] == s["rho0.5_recipe"]["median_steps_to_target"] * (64 + 96)
    assert set(res["select_seconds_per_call_by_invalid_mode"]) == {"raise", "keep", "drop", "raise_now"}


def test_time_to_accuracy_benchmark_rho1_quick(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_time_to_accuracy.py"), "--quick",
                           "--part", "rho1", "--out", str(tmp_path), "--no-plot"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((tmp_path / "time_to_accuracy_rho1_quick.json").read_text())["summary"]
    assert set(s) == {"all_tokens", "rho1"}
    # the reference losses drop corrupted targets: fewer than their 30% base rate are trained on
    assert s["rho1"]["corrupted_share_of_trained_tokens"] < 0.3
