#!/usr/bin/env python
"""RHO-LOSS on real data that ships with scikit-learn: the handwritten digits (no download).

``sklearn.datasets.load_digits``: 1,797 8x8 images of the digits 0-9 (64 features).  Per seed,
a random 30% is the clean test set and the rest the training set; a fraction ``noise`` (default
20%) of its labels is flipped to another class.  The irreducible losses come from the recipe
that works here (``--set il=no_holdout``, the default; see
:func:`rho_kernels.training.build_no_holdout_store`): one IL model per half of the training set,
each trained to early stopping and scoring the other half.  ``--set il=holdout`` is the old
way: an IL model trained a fixed ``il_epochs`` on a ``holdout_fraction`` of the data, the rest
being the training set (RHO-LOSS then ends below uniform).  The same MLP is trained from the
same initialisation with ``uniform``, ``loss`` and ``reducible`` (RHO-LOSS) selection,
``n_B = 100`` candidates -> ``n_b = 10`` picks per step, for the same number of steps.

Reports per method (mean over seeds): steps to the target (the uniform run's final accuracy),
final clean test accuracy, and the fraction of picks whose label was flipped; JSON + PNG in
``benchmarks/results/`` (``rho_loss_digits_demo[_quick].{json,png}``).

    python python/rho_loss_digits_demo.py            # full run: 3 seeds x 3000 steps
    python python/rho_loss_digits_demo.py --quick    # 1 seed x 600 steps (< 1 minute; tests)
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

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for p in (_ROOT, _HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from rho_kernels.training import IndexedDataset, IrreducibleLossStore, build_no_holdout_store  # noqa: E402
from rho_loss_demo import accuracy, final_acc, mlp, run_method, steps_to, train_il_model  # noqa: E402

METHODS = ("uniform", "loss", "reducible")


@dataclass
class Config:
    seeds: int = 3
    steps: int = 3000
    eval_every: int = 25
    n_big: int = 100
    n_small: int = 10
    num_classes: int = 10
    dim: int = 64
    test_fraction: float = 0.3
    holdout_fraction: float = 0.2
    noise: float = 0.2
    hidden: int = 128
    lr: float = 1e-3
    il_epochs: int = 60  # il=holdout only
    il_hidden: int = 128
    il: str = "no_holdout"  # or "holdout"
    il_max_epochs: int = 200  # il=no_holdout: early stopping ends it sooner


QUICK = dict(seeds=1, steps=600)


def load(cfg: Config, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Split the digits and flip labels; returns (data for run_method, x_holdout, y_holdout)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(len(y)))
    n_test = int(round(cfg.test_fraction * len(y)))
    test, rest = perm[:n_test], perm[n_test:]
    n_hold = int(round(cfg.holdout_fraction * len(rest))) if cfg.il == "holdout" else 0
    hold, train = rest[:n_hold], rest[n_hold:]
    flip = torch.from_numpy(rng.random(len(y)) < cfg.noise)
    offset = torch.from_numpy(rng.integers(1, cfg.num_classes, size=len(y)))
    y_noisy = torch.where(flip, (y + offset) % cfg.num_classes, y)  # always a wrong class
    data = {"x_train": x[train], "y_train": y_noisy[train], "noisy": flip[train],
            "x_test": x[test], "y_test": y[test]}
    return data, x[hold], y_noisy[hold]


class _Bar:
    def __init__(self, total: int, show: bool) -> None:
        self.n, self.total, self.show = 0, total, show

    def update(self, k: int) -> None:
        self.n += k
        if self.show and self.n % 1000 == 0:
            print(f"  {self.n}/{self.total} steps", flush=True)


def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 minute) for the tests")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=None, help="output file stem")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Config field, e.g. --set holdout_fraction=0.5 (repeatable)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(**QUICK) if args.quick else Config()
    cfg.seeds = args.seeds or cfg.seeds
    cfg.steps = args.steps or cfg.steps
    for item in args.set:
        key, _, val = item.partition("=")
        if key not in Config.__dataclass_fields__:
            raise SystemExit(f"--set: unknown field {key!r}; fields: {list(Config.__dataclass_fields__)}")
        setattr(cfg, key, type(getattr(cfg, key))(val))
    name = args.name or ("rho_loss_digits_demo_quick" if args.quick else "rho_loss_digits_demo")
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    runs = {m: [] for m in METHODS}
    il_acc = []
    bar = _Bar(cfg.seeds * len(METHODS) * cfg.steps, not args.no_progress)
    if cfg.il not in ("no_holdout", "holdout"):
        raise SystemExit(f"--set il= must be no_holdout or holdout, got {cfg.il!r}")
    for seed in range(cfg.seeds):
        data, x_hold, y_hold = load(cfg, seed)
        ds = IndexedDataset(torch.utils.data.TensorDataset(data["x_train"], data["y_train"]))
        if cfg.il == "holdout":
            il_model = train_il_model(cfg, x_hold, y_hold, seed)
            il_acc.append(accuracy(il_model, data["x_test"], data["y_test"]))
            store = IrreducibleLossStore.build(il_model, ds, batch_size=2048, progress=False)
        else:
            torch.manual_seed(seed + 1000)
            store, fits = build_no_holdout_store(lambda: mlp(cfg.dim, cfg.il_hidden, cfg.num_classes), ds, seed=seed,
                                                 progress=False, batch_size=2048,
                                                 fit_kwargs={"max_epochs": cfg.il_max_epochs, "lr": cfg.lr})
            il_acc.append(float(np.mean([accuracy(f.model, data["x_test"], data["y_test"]) for f in fits])))
        for method in METHODS:
            runs[method].append(run_method(method, cfg, data, store, seed, bar))

    summary = {}
    for method in METHODS:
        steps_list = [steps_to(runs[method][s]["curve"], final_acc(runs["uniform"][s]["curve"]))
                      for s in range(cfg.seeds)]
        reached = [s for s in steps_list if s is not None]
        summary[method] = {
            "steps_to_target": steps_list,
            "mean_steps_to_target": float(np.mean(reached)) if len(reached) == len(steps_list) else None,
            "seeds_reaching_target": len(reached),
            "final_test_accuracy": float(np.mean([final_acc(r["curve"]) for r in runs[method]])),
            "final_test_accuracy_per_seed": [final_acc(r["curve"]) for r in runs[method]],
            "noisy_pick_fraction": float(np.mean([r["noisy_pick_fraction"] for r in runs[method]])),
            "noisy_candidate_fraction": float(np.mean([r["noisy_candidate_fraction"] for r in runs[method]])),
        }
    elapsed = time.time() - t0
    result = {
        "dataset": "sklearn.datasets.load_digits (1797 x 64, 10 classes), bundled with scikit-learn",
        "config": asdict(cfg), "quick": args.quick,
        "target": "per seed: the uniform run's final test accuracy (mean of its last 4 evaluations)",
        "il_model_test_accuracy": float(np.mean(il_acc)),
        "summary": summary, "curves": {m: [r["curve"] for r in runs[m]] for m in METHODS},
        "seconds": elapsed, "torch": torch.__version__,
    }
    json_path = os.path.join(args.out, name + ".json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nRHO-LOSS on sklearn digits ({'quick' if args.quick else 'full'}): {cfg.seeds} seed(s), {cfg.steps} "
          f"steps, n_B={cfg.n_big} -> n_b={cfg.n_small}, {cfg.noise:.0%} flipped labels, IL: {cfg.il}, "
          f"IL model test accuracy {result['il_model_test_accuracy']:.3f}")
    print(f"{'method':<10} {'steps to target':>16} {'final test acc':>15} {'flipped picked':>15}")
    for m in METHODS:
        s = summary[m]
        st = (f"{s['mean_steps_to_target']:.0f}" if s["mean_steps_to_target"] is not None
              else f"{s['seeds_reaching_target']}/{cfg.seeds} seeds")
        print(f"{m:<10} {st:>16} {s['final_test_accuracy']:>15.4f} {s['noisy_pick_fraction']:>15.3f}")
    print(f"(flipped among candidates: {summary['uniform']['noisy_candidate_fraction']:.3f}; {elapsed:.0f} s) "
          f"-> {json_path}")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, color in zip(METHODS, ("tab:gray", "tab:red", "tab:blue")):
            c = np.array(result["curves"][m], dtype=float)
            ax.plot(c[0, :, 0], c[:, :, 1].mean(0), color=color,
                    label=f"{m} (flipped picked {summary[m]['noisy_pick_fraction']:.0%})")
            if c.shape[0] > 1:
                ax.fill_between(c[0, :, 0], c[:, :, 1].min(0), c[:, :, 1].max(0), color=color, alpha=0.15)
        tgt = float(np.mean([final_acc(r["curve"]) for r in runs["uniform"]]))
        ax.axhline(tgt, color="k", lw=0.8, ls="--", label="target (uniform final)")
        ax.set_xlabel(f"gradient steps (n_b = {cfg.n_small} each)")
        ax.set_ylabel("test accuracy (clean labels)")
        ax.set_ylim(max(0.0, tgt - 0.4), min(1.0, tgt + 0.08))
        ax.set_title(f"sklearn digits, {cfg.noise:.0%} flipped labels, n_B={cfg.n_big}")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name + ".png"), dpi=110)
    return result


if __name__ == "__main__":
    main()
