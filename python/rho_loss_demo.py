#!/usr/bin/env python
"""RHO-LOSS end to end on locally generated data (no download), on the CPU.

The task: a 10-class problem in 32 dimensions; every class is a mixture of 30 overlapping
Gaussian clusters of very unequal size (a few big, easy, redundant clusters and many small ones near other
classes), and 15% of the training labels are flipped uniformly to another class.  The test set
is clean.  A holdout split (25% of the labelled data) trains a small irreducible-loss (IL)
model; the IL store is built from it; then the same target MLP is trained from the same
initialisation with three selection rules for the same number of gradient steps, at the
paper's n_B = 320 candidates -> n_b = 32 picks per step:

* ``uniform``   -- 32 random examples (the baseline);
* ``loss``      -- the 32 with the highest current loss;
* ``reducible`` -- RHO-LOSS: the 32 with the highest current loss minus IL.

Printed per method (mean over seeds): steps to reach the target accuracy (the uniform
baseline's final test accuracy, the paper's speed-up measure), final test accuracy, and the
fraction of picked examples whose label is flipped.  Writes a JSON file and a PNG plot of test
accuracy vs steps.

    python python/rho_loss_demo.py                 # full run (a few minutes on 2 CPU cores)
    python python/rho_loss_demo.py --quick         # < 1 minute, used by tests/test_demo.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Run from a checkout without installing: the repository root goes first on sys.path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from rho_kernels.training import IrreducibleLossStore, OnlineBatchSelector  # noqa: E402

METHODS = ("uniform", "loss", "reducible")


@dataclass
class Config:
    seeds: int = 3
    steps: int = 3000
    eval_every: int = 25
    n_big: int = 320
    n_small: int = 32
    num_classes: int = 10
    dim: int = 32
    clusters_per_class: int = 30
    center_scale: float = 1.2
    zipf: float = 1.3
    n_train: int = 24000  # labelled data: a holdout fraction of it trains the IL model
    holdout_fraction: float = 0.25
    n_test: int = 6000
    noise: float = 0.15
    hidden: int = 256
    lr: float = 1e-3
    il_epochs: int = 30
    il_hidden: int = 128


QUICK = dict(seeds=1, steps=500, eval_every=25, n_train=12000, n_test=3000, il_epochs=15)


# ----------------------------------------------------------------------------- data
def make_data(cfg: Config, seed: int):
    """Clusters of unequal size per class; labels of the labelled split flipped at rate noise.

    Returns (x_lab, y_lab_noisy, y_lab_true, x_test, y_test) as torch tensors.
    """
    rng = np.random.default_rng(seed)
    C, D, M = cfg.num_classes, cfg.dim, cfg.clusters_per_class
    centers = rng.normal(0.0, 1.0, size=(C, M, D)) * cfg.center_scale
    # Zipf-like cluster sizes: the first clusters of a class dominate (redundant, easy),
    # the tail clusters are rare -- the points "worth learning, not yet learnt".
    w = 1.0 / np.arange(1, M + 1) ** cfg.zipf
    w = w / w.sum()
    scales = rng.uniform(0.6, 1.2, size=(C, M))

    def sample(n):
        cls = rng.integers(0, C, size=n)
        clu = rng.choice(M, size=n, p=w)
        x = centers[cls, clu] + rng.normal(size=(n, D)) * scales[cls, clu, None]
        return x.astype(np.float32), cls.astype(np.int64)

    x_lab, y_true = sample(cfg.n_train)
    x_test, y_test = sample(cfg.n_test)
    flip = rng.random(cfg.n_train) < cfg.noise
    # uniform flip to a *different* class, so that every flipped label is wrong
    offset = rng.integers(1, C, size=cfg.n_train)
    y_noisy = np.where(flip, (y_true + offset) % C, y_true)
    t = torch.from_numpy
    return t(x_lab), t(y_noisy), t(y_true), t(x_test), t(y_test)


def mlp(d: int, hidden: int, c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, c))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_il_model(cfg: Config, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """The small IL model: trained on the (noisy) holdout only, a few epochs of AdamW."""
    torch.manual_seed(seed + 1000)
    model = mlp(cfg.dim, cfg.il_hidden, cfg.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    n = x.shape[0]
    for _ in range(cfg.il_epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def candidate_batches(n: int, size: int, gen: torch.Generator):
    """Endless (index) batches: reshuffle every epoch (sampling without replacement)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield perm[i:i + size]


def run_method(method: str, cfg: Config, data: dict, store: IrreducibleLossStore, seed: int, bar) -> dict:
    x, y, noisy = data["x_train"], data["y_train"], data["noisy"]
    torch.manual_seed(seed)  # same initial weights for every method
    model = mlp(cfg.dim, cfg.hidden, cfg.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    selector = OnlineBatchSelector(model, store, method=method, k=cfg.n_small,
                                   generator=torch.Generator().manual_seed(seed + 7))
    gen = torch.Generator().manual_seed(seed + 11)  # same candidate stream for every method
    batches = candidate_batches(x.shape[0], cfg.n_big, gen)
    curve = [(0, accuracy(model, data["x_test"], data["y_test"]))]
    for step in range(1, cfg.steps + 1):
        idx = next(batches)
        index, xb, yb = selector.select((idx, x[idx], y[idx]), noisy=noisy[idx])
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0:
            curve.append((step, accuracy(model, data["x_test"], data["y_test"])))
        bar.update(1)
    s = selector.stats.summary()
    return {"curve": curve, "noisy_pick_fraction": s["noisy_pick_fraction"],
            "noisy_candidate_fraction": s["noisy_candidate_fraction"],
            "mean_score_picked": s["mean_score_picked"], "mean_score_not_picked": s["mean_score_not_picked"]}


def steps_to(curve: list, target: float) -> Optional[int]:
    for step, acc in curve:
        if acc >= target:
            return step
    return None


def final_acc(curve: list, last: int = 4) -> float:
    """Mean of the last few evaluations (one evaluation is noisy)."""
    return float(np.mean([a for _, a in curve[-last:]]))


def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 minute) for the tests")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"), help="output folder")
    ap.add_argument("--name", default=None, help="output file stem (default rho_loss_demo[_quick])")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Config field, e.g. --set noise=0.2 (repeatable)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(**QUICK) if args.quick else Config()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.steps is not None:
        cfg.steps = args.steps
    for item in args.set:
        key, _, val = item.partition("=")
        if key not in Config.__dataclass_fields__:
            raise SystemExit(f"--set: unknown field {key!r}; fields: {list(Config.__dataclass_fields__)}")
        setattr(cfg, key, type(getattr(cfg, key))(val))
    name = args.name or ("rho_loss_demo_quick" if args.quick else "rho_loss_demo")
    os.makedirs(args.out, exist_ok=True)
    from tqdm.auto import tqdm

    t0 = time.time()
    runs = {m: [] for m in METHODS}
    il_test_acc = []
    bar = tqdm(total=cfg.seeds * len(METHODS) * cfg.steps, desc="training", disable=args.no_progress)
    for seed in range(cfg.seeds):
        x_lab, y_lab, y_true, x_test, y_test = make_data(cfg, seed)
        n_hold = int(round(cfg.holdout_fraction * x_lab.shape[0]))
        # holdout = first n_hold (the generator's order is already random)
        x_hold, y_hold = x_lab[:n_hold], y_lab[:n_hold]
        data = {"x_train": x_lab[n_hold:], "y_train": y_lab[n_hold:], "noisy": (y_lab != y_true)[n_hold:],
                "x_test": x_test, "y_test": y_test}
        il_model = train_il_model(cfg, x_hold, y_hold, seed)
        il_test_acc.append(accuracy(il_model, x_test, y_test))
        ds = torch.utils.data.TensorDataset(torch.arange(data["x_train"].shape[0]), data["x_train"], data["y_train"])
        store = IrreducibleLossStore.build(il_model, ds, batch_size=2048, progress=not args.no_progress)
        for method in METHODS:
            runs[method].append(run_method(method, cfg, data, store, seed, bar))
    bar.close()

    # Target = the uniform baseline's final accuracy (per seed), as in the paper's speed-ups.
    summary = {}
    for method in METHODS:
        steps_list, finals = [], []
        for seed in range(cfg.seeds):
            target = final_acc(runs["uniform"][seed]["curve"])
            steps_list.append(steps_to(runs[method][seed]["curve"], target))
            finals.append(final_acc(runs[method][seed]["curve"]))
        reached = [s for s in steps_list if s is not None]
        summary[method] = {
            "steps_to_target": steps_list,
            "mean_steps_to_target": float(np.mean(reached)) if len(reached) == len(steps_list) else None,
            "seeds_reaching_target": len(reached),
            "final_test_accuracy": float(np.mean(finals)),
            "final_test_accuracy_per_seed": finals,
            "best_test_accuracy": float(np.mean([max(a for _, a in r["curve"]) for r in runs[method]])),
            "noisy_pick_fraction": float(np.mean([r["noisy_pick_fraction"] for r in runs[method]])),
            "noisy_candidate_fraction": float(np.mean([r["noisy_candidate_fraction"] for r in runs[method]])),
            "mean_score_picked": float(np.mean([r["mean_score_picked"] for r in runs[method]])),
        }
    elapsed = time.time() - t0
    result = {
        "config": asdict(cfg),
        "quick": args.quick,
        "target": "per seed: the uniform baseline's final test accuracy (mean of its last 4 evaluations)",
        "il_model_test_accuracy": float(np.mean(il_test_acc)),
        "summary": summary,
        "curves": {m: [r["curve"] for r in runs[m]] for m in METHODS},
        "seconds": elapsed,
        "torch": torch.__version__,
    }
    json_path = os.path.join(args.out, name + ".json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nRHO-LOSS demo ({'quick' if args.quick else 'full'}): {cfg.seeds} seed(s), {cfg.steps} steps, "
          f"n_B={cfg.n_big} -> n_b={cfg.n_small}, label noise {cfg.noise:.0%}, "
          f"IL model test accuracy {result['il_model_test_accuracy']:.3f}")
    print(f"{'method':<10} {'steps to target':>16} {'final test acc':>15} {'noisy picked':>13}")
    for m in METHODS:
        s = summary[m]
        st = "never" if s["mean_steps_to_target"] is None and s["seeds_reaching_target"] == 0 else (
            f"{s['mean_steps_to_target']:.0f}" if s["mean_steps_to_target"] is not None
            else f"{s['seeds_reaching_target']}/{cfg.seeds} seeds")
        print(f"{m:<10} {st:>16} {s['final_test_accuracy']:>15.4f} {s['noisy_pick_fraction']:>13.3f}")
    print(f"(noisy fraction among candidates: {summary['uniform']['noisy_candidate_fraction']:.3f}; "
          f"{elapsed:.0f} s)  -> {json_path}")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, color in zip(METHODS, ("tab:gray", "tab:red", "tab:blue")):
            curves = np.array(result["curves"][m], dtype=float)  # [seeds, evals, 2]
            steps = curves[0, :, 0]
            mean = curves[:, :, 1].mean(0)
            ax.plot(steps, mean, color=color,
                    label=f"{m} (noisy picked {summary[m]['noisy_pick_fraction']:.0%})")
            if curves.shape[0] > 1:
                ax.fill_between(steps, curves[:, :, 1].min(0), curves[:, :, 1].max(0), color=color, alpha=0.15)
        tgt = np.mean([final_acc(r["curve"]) for r in runs["uniform"]])
        ax.axhline(tgt, color="k", lw=0.8, ls="--", label="target (uniform final)")
        ax.set_xlabel("gradient steps (n_b = 32 each)")
        ax.set_ylabel("test accuracy (clean labels)")
        ax.set_ylim(max(0.0, tgt - 0.35), min(1.0, tgt + 0.1))
        ax.set_title(f"Online batch selection, {cfg.noise:.0%} flipped labels, n_B={cfg.n_big}")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = os.path.join(args.out, name + ".png")
        fig.savefig(png, dpi=110)
        print(f"plot -> {png}")
    return result


if __name__ == "__main__":
    main()
