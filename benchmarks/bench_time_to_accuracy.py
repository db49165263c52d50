#!/usr/bin/env python
"""Does selection pay off?  Time to accuracy on noisy digits, every scoring pass counted.

scikit-learn's handwritten digits (1,797 8x8 images, bundled, no download): per seed a random 30%
is the clean test set, the other 70% (the *pool*, 1,258 examples) has 20% of its labels flipped
to another class.  The target model is an MLP 64-512-512-10 (AdamW, lr 1e-3), trained on
``n_b = 32`` rows a step:

* ``uniform``: 32 random rows of the pool (and ``uniform_80``: of the 80% left by a holdout);
* ``rho<r>_holdout``: RHO-LOSS at ``n_b / n_B = r`` (``n_B = 32 / r`` candidates) with the IL
  model the README used to lead to: an MLP 64-128-128-10 trained 60 epochs on a 20% holdout of
  the pool (the target trains on the other 80%);
* ``rho<r>_recipe``: the recipe of :mod:`rho_kernels.training.il_fit`: no holdout, one IL model
  per half of the pool, each trained to early stopping and scoring the other half; the target
  trains on the whole pool;
* ``rho<r>_recipe_<option>``: the recipe with a cheap-scoring option of the selector
  (``inference_mode``, ``autocast_dtype=torch.bfloat16``, ``compile_forward``), with its pick
  agreement against fp32 eager scoring (top-k overlap on the same candidates, every 10 steps).

Clock: the wall time of a step (selection + forward/backward/optimizer step), measured apart
from the accuracy runs: every variant keeps its own model, and they take turns in bursts of 20
steps for 9 rounds (the order rotating), median of the bursts -- so that a shared machine's load
falls on all of them alike.  Time to target = median steps to target x that step time (each
run's own in-run step times are in the JSON too).  One process, one thread.  The
``compile_forward`` variant is in the step-cost measurement only (its first call, the compile,
is reported as a one-off).  Forward-equivalents count
example passes: a forward over a row is 1, a backward 2 (uniform step: 3 n_b; RHO-LOSS step:
n_B + 3 n_b).  The target per seed: 98% of uniform's best accuracy (3-evaluation moving
average).  The IL models' training and the IL table's build are timed as one-off costs.
A micro-benchmark times ``select`` alone for each ``invalid=`` mode.

    python benchmarks/bench_time_to_accuracy.py            # full: 3 seeds (~15 min on a shared 2-core machine)
    python benchmarks/bench_time_to_accuracy.py --quick    # seconds (tests/test_bench_time_to_accuracy.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from rho_kernels.training import (  # noqa: E402
    IndexedDataset, IrreducibleLossStore, OnlineBatchSelector, build_no_holdout_store,
)

N_SMALL = 32
HIDDEN, IL_HIDDEN = 512, 128
NOISE, TEST_FRACTION, HOLDOUT_FRACTION = 0.2, 0.3, 0.2
TARGET_SHARE = 0.98
OPTIONS = {"inference_mode": {"inference_mode": True},
           "bf16": {"autocast_dtype": torch.bfloat16},
           "compiled": {"compile_forward": True}}


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def load(seed: int) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(len(y)))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, pool = perm[:n_test], perm[n_test:]
    flip = torch.from_numpy(rng.random(len(y)) < NOISE)
    offset = torch.from_numpy(rng.integers(1, 10, size=len(y)))
    y_noisy = torch.where(flip, (y + offset) % 10, y)  # always a wrong class
    n_hold = int(round(HOLDOUT_FRACTION * len(pool)))
    return {"x": x[pool], "y": y_noisy[pool], "noisy": flip[pool], "x_test": x[test], "y_test": y[test],
            "hold": torch.arange(n_hold), "train80": torch.arange(n_hold, len(pool))}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def holdout_store(data: dict, seed: int, epochs: int) -> tuple[IrreducibleLossStore, float]:
    """The IL model the README led to: fixed epochs on a 20% holdout; the store covers the 80%."""
    t0 = time.perf_counter()
    torch.manual_seed(seed + 1000)
    il = mlp(IL_HIDDEN)
    opt = torch.optim.AdamW(il.parameters(), lr=1e-3, weight_decay=0.01)
    xh, yh = data["x"][data["hold"]], data["y"][data["hold"]]
    for _ in range(epochs):
        perm = torch.randperm(len(yh))
        for i in range(0, len(yh), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(il(xh[b]), yh[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    tr = data["train80"]
    ds = IndexedDataset(torch.utils.data.TensorDataset(data["x"][tr], data["y"][tr]))
    store = IrreducibleLossStore.build(il.eval(), ds, progress=False)
    return store, time.perf_counter() - t0


def recipe_store(data: dict, seed: int, max_epochs: int) -> tuple[IrreducibleLossStore, float, list]:
    t0 = time.perf_counter()
    ds = IndexedDataset(torch.utils.data.TensorDataset(data["x"], data["y"]))
    torch.manual_seed(seed + 2000)
    store, fits = build_no_holdout_store(lambda: mlp(IL_HIDDEN), ds, seed=seed, progress=False,
                                         fit_kwargs={"max_epochs": max_epochs})
    return store, time.perf_counter() - t0, [f.best_epoch for f in fits]


def candidate_batches(n: int, size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield perm[i:i + size]


def run(name: str, data: dict, rows: torch.Tensor, ratio: Optional[float], store, options: dict, seed: int,
        steps: int, eval_every: int) -> dict:
    x, y, noisy = data["x"][rows], data["y"][rows], data["noisy"][rows]
    torch.manual_seed(seed)  # same initial weights for every variant
    model = mlp(HIDDEN)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_big = N_SMALL if ratio is None else int(round(N_SMALL / ratio))
    sel = ref = None
    if ratio is not None:
        sel = OnlineBatchSelector(model, store, k=N_SMALL, **options)
        if options:  # fp32 eager scoring of the same candidates, for the pick agreement
            ref = OnlineBatchSelector(model, store, k=N_SMALL, timing=False)
    batches = candidate_batches(len(y), n_big, torch.Generator().manual_seed(seed + 11))
    curve = [(0, accuracy(model, data["x_test"], data["y_test"]))]
    step_times, agreement, noisy_picked = [], [], 0.0
    for step in range(1, steps + 1):
        idx = next(batches)
        batch = (idx, x[idx], y[idx])
        if ref is not None and step % eval_every == 0:
            want = set(ref.score(batch).topk(N_SMALL).indices.tolist())
        t0 = time.perf_counter()
        if sel is not None:
            pick, xb, yb = sel.select(batch)
            token = sel.stats.start("train", "cpu")
        else:
            pick, xb, yb = idx[:N_SMALL], x[idx[:N_SMALL]], y[idx[:N_SMALL]]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sel is not None:
            sel.stats.stop(token)
        step_times.append(time.perf_counter() - t0)
        noisy_picked += float(noisy[pick].float().mean())
        if ref is not None and step % eval_every == 0:
            agreement.append(len(want & set(sel.last.positions.tolist())) / N_SMALL)
        if step % eval_every == 0:
            curve.append((step, accuracy(model, data["x_test"], data["y_test"])))
    out = {"name": name, "ratio": ratio, "n_big": n_big, "curve": curve, "step_times": step_times,
           "noisy_pick_fraction": noisy_picked / steps,
           "forward_equivalents_per_step": (0 if ratio is None else n_big) + 3 * N_SMALL}
    if sel is not None:
        s = sel.stats.summary()
        out["selector"] = {k: s[k] for k in ("scoring_seconds", "selection_seconds", "train_seconds",
                                             "scoring_time_fraction", "step_overhead", "candidates", "picks")}
    if agreement:
        out["pick_agreement"] = float(np.mean(agreement))
    return out


def smooth(curve: list, w: int = 3) -> np.ndarray:
    a = np.array([v for _, v in curve])
    return np.convolve(a, np.ones(w) / w, mode="valid")


def steps_to(curve: list, target: float) -> Optional[int]:
    for s, a in curve:
        if a >= target:
            return s
    return None


def bench_step_costs(data: dict, store, variants: dict, rounds: int, burst: int) -> dict:
    """Seconds per training step of each variant, measured apart from the accuracy runs: each
    variant keeps its own model and optimizer, and they take turns in bursts of ``burst`` steps
    (the order rotating every round), so that the machine's load falls on all of them alike; the
    median over rounds of each burst's mean.  Also the pick agreement of each cheap-scoring option
    with fp32 eager scoring, and the compile time (the first call) of ``compile_forward``."""
    x, y = data["x"], data["y"]
    state = {}
    for v, (ratio, opts) in variants.items():
        torch.manual_seed(0)
        model = mlp(HIDDEN)
        n_big = N_SMALL if ratio is None else int(round(N_SMALL / ratio))
        sel = None if ratio is None else OnlineBatchSelector(model, store, k=N_SMALL, **opts)
        ref = OnlineBatchSelector(model, store, k=N_SMALL, timing=False) if opts else None
        state[v] = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3), "sel": sel, "ref": ref,
                    "batches": candidate_batches(len(y), n_big, torch.Generator().manual_seed(1)),
                    "times": [], "agree": [], "first": None}
    names = list(variants)
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            st = state[v]
            t0 = time.perf_counter()
            for i in range(burst):
                idx = next(st["batches"])
                batch = (idx, x[idx], y[idx])
                check = st["ref"] is not None and i == 0
                if check:  # the reference picks, on the same model state (not part of the step)
                    t2 = time.perf_counter()
                    want = set(st["ref"].score(batch).topk(N_SMALL).indices.tolist())
                    t0 += time.perf_counter() - t2
                t1 = time.perf_counter()
                if st["sel"] is not None:
                    _, xb, yb = st["sel"].select(batch)
                else:
                    xb, yb = x[idx[:N_SMALL]], y[idx[:N_SMALL]]
                if st["first"] is None:  # compile (and other first-call) costs: a one-off
                    st["first"] = time.perf_counter() - t1
                    t0 = time.perf_counter()
                loss = F.cross_entropy(st["model"](xb), yb)
                st["opt"].zero_grad(set_to_none=True)
                loss.backward()
                st["opt"].step()
                if check:
                    st["agree"].append(len(want & set(st["sel"].last.positions.tolist())) / N_SMALL)
            st["times"].append((time.perf_counter() - t0) / burst)
    out = {}
    for v, st in state.items():
        out[v] = {"median_step_ms": float(np.median(st["times"][1:] if rounds > 1 else st["times"])) * 1e3,
                  "first_call_seconds": st["first"]}
        if st["agree"]:
            out[v]["pick_agreement"] = float(np.mean(st["agree"]))
        if st["sel"] is not None:
            summ = st["sel"].stats.summary()
            out[v]["selection_ms_per_step"] = (summ["scoring_seconds"] + summ["selection_seconds"]) / summ["steps"] * 1e3
    return out


def bench_invalid_modes(data: dict, store, rounds: int, calls: int) -> dict:
    """``select`` alone, per ``invalid=`` mode, interleaved rounds; median seconds per call."""
    torch.manual_seed(0)
    model = mlp(HIDDEN)
    n_big = 4 * N_SMALL
    sels = {m: OnlineBatchSelector(model, store, k=N_SMALL, invalid=m, timing=False) for m in ("raise", "keep", "drop")}
    sels["raise_now"] = OnlineBatchSelector(model, store, k=N_SMALL, invalid_check="now", timing=False)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randperm(len(store), generator=gen)[:n_big] for _ in range(calls)]
    x, y = data["x"], data["y"]
    times: dict = {m: [] for m in sels}
    for r in range(rounds):
        for m in list(sels)[r % len(sels):] + list(sels)[:r % len(sels)]:
            t0 = time.perf_counter()
            for idx in batches:
                sels[m].select((idx, x[idx], y[idx]))
            times[m].append((time.perf_counter() - t0) / calls)
    return {m: float(np.median(t)) for m, t in times.items()}


def plot_digits(result: dict, path: str) -> None:
    """Accuracy against seconds and forward-equivalents, from a result JSON (``--replot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, curves = result["summary"], result["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    shown = ["uniform"] + [v for v in curves if v.startswith("rho") and v.count("_") == 1]
    t_max = fe_max = 0.0
    for v in shown:
        steps = np.array([s for s, _ in curves[v][0]], dtype=float)
        acc = np.median(np.array([[a for _, a in c] for c in curves[v]]), 0)
        ratio = summ[v].get("ratio") or (None if v.startswith("uniform") else float(v[3:].split("_")[0]))
        fe_step = 3 * N_SMALL + (0 if ratio is None else int(round(N_SMALL / ratio)))
        ls = "-" if ("recipe" in v or v == "uniform") else "--"
        axes[0].plot(steps * summ[v]["median_step_ms"] / 1e3, acc, ls, label=v)
        axes[1].plot(steps * fe_step / 1e3, acc, ls, label=v)
        if summ[v]["median_steps_to_target"] is not None:  # show the race to the target, not the tail
            t_max = max(t_max, 4 * summ[v]["seconds_to_target"])
            fe_max = max(fe_max, 4 * summ[v]["forward_equivalents_to_target"] / 1e3)
    tgt = float(np.median([0.98 * max(np.convolve([a for _, a in c], np.ones(3) / 3, mode="valid"))
                           for c in curves["uniform"]]))
    for ax, hi in zip(axes, (t_max, fe_max)):
        ax.axhline(tgt, color="k", lw=0.8, ls=":", label="target (98% of uniform's best)")
        ax.grid(alpha=0.3)
        ax.set_ylim(max(0.0, tgt - 0.25), min(1.0, tgt + 0.06))
        if hi > 0:
            ax.set_xlim(0, hi)
    axes[0].set_xlabel("seconds of training (median step time x steps; scoring counted)")
    axes[1].set_xlabel("forward-equivalents (thousands of example passes; backward = 2)")
    axes[0].set_ylabel("clean test accuracy (median over seeds)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"noisy digits (20% flipped), MLP 64-{HIDDEN}-{HIDDEN}-10, n_b={N_SMALL}, {result['seeds']} seed(s); "
                 "IL one-off cost not included")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- Rho-1 on the standard library's text
class ByteLM(nn.Module):
    """A tiny causal byte LM: each position sees the previous ``context`` bytes (causal conv)."""

    def __init__(self, context: int = 8, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, dim)
        self.conv = nn.Conv1d(dim, hidden, context)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 256))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> logits [B, T, 256]
        h = F.pad(self.embed(ids).transpose(1, 2), (self.context - 1, 0))
        return self.mlp(self.conv(h).transpose(1, 2))


def stdlib_text_chunks(seq_len: int, limit_bytes: int) -> torch.Tensor:
    """The standard library's top-level ``.py`` sources (sorted, as UTF-8 bytes), in ``[n, seq_len + 1]`` chunks."""
    lib = os.path.dirname(os.__file__)
    parts, total = [], 0
    for name in sorted(os.listdir(lib)):
        if name.endswith(".py") and total < limit_bytes:
            with open(os.path.join(lib, name), "rb") as f:
                parts.append(f.read())
            total += len(parts[-1])
    data = np.frombuffer(b"\n".join(parts)[:limit_bytes], dtype=np.uint8).astype(np.int64)
    n = len(data) // (seq_len + 1)
    return torch.from_numpy(data[: n * (seq_len + 1)].reshape(n, seq_len + 1).copy())


def corrupt(ids: torch.Tensor, share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.rand(ids.shape, generator=gen) < share
    noise = torch.randint(32, 127, ids.shape, generator=gen)  # random printable bytes
    return torch.where(mask, noise, ids), mask


@torch.no_grad()
def clean_loss(model: nn.Module, ids: torch.Tensor) -> float:
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()


def bench_rho1(quick: bool, seeds: int, out_dir: str, name: str, plot: bool) -> dict:
    """Rho-1 vs all-token training on the standard library's source text with 30% corrupted bytes:
    clean held-out loss against seconds and forward-equivalents.  The reference model trains on a
    clean part; its per-token losses over the corrupted training part are a TokenLossStore built
    once (a one-off, timed)."""
    from rho_kernels import selective_cross_entropy
    from rho_kernels.training import TokenLossStore

    seq_len, batch, keep = 64, 16, 0.6
    steps, ref_steps, eval_every = (30, 30, 10) if quick else (400, 400, 25)
    chunks = stdlib_text_chunks(seq_len, 200_000 if quick else 1_500_000)
    res: dict = {"runs": {}, "one_off_seconds": []}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(chunks), generator=g)
        n_ref, n_eval = len(chunks) // 5, len(chunks) // 10
        ref_ids, eval_ids, train_clean = chunks[perm[:n_ref]], chunks[perm[n_ref:n_ref + n_eval]], chunks[perm[n_ref + n_eval:]]
        train_ids, flipped = corrupt(train_clean, 0.3, g)
        t0 = time.perf_counter()
        torch.manual_seed(seed + 100)
        ref = ByteLM()
        opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
        for _ in range(ref_steps):
            b = ref_ids[torch.randint(0, len(ref_ids), (batch,), generator=g)]
            loss = F.cross_entropy(ref(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ds = IndexedDataset(torch.utils.data.TensorDataset(train_ids[:, :-1], train_ids[:, 1:]))
        table = TokenLossStore.build(ref.eval(), ds, batch_size=256, progress=False)
        res["one_off_seconds"].append(time.perf_counter() - t0)
        order = ("all_tokens", "rho1") if seed % 2 == 0 else ("rho1", "all_tokens")
        for variant in order:
            torch.manual_seed(seed)
            model = ByteLM()
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            bg = torch.Generator().manual_seed(seed + 7)
            curve, times, corrupt_share = [(0, clean_loss(model, eval_ids))], [], []
            for step in range(1, steps + 1):
                idx = torch.randint(0, len(train_ids), (batch,), generator=bg)
                x, y = train_ids[idx, :-1], train_ids[idx, 1:]
                t1 = time.perf_counter()
                logits = model(x)
                if variant == "rho1":
                    refl = table.gather(idx, length=seq_len)
                    loss = selective_cross_entropy(logits, y, refl, keep)
                else:
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t1)
                if step % eval_every == 0:
                    curve.append((step, clean_loss(model, eval_ids)))
                    if variant == "rho1":  # share of corrupted targets among the kept tokens (not timed)
                        from rho_kernels import select_mask
                        with torch.no_grad():
                            m = select_mask(logits.detach(), y, refl, keep)
                        corrupt_share.append(float(flipped[idx, 1:][m].float().mean()))
            res["runs"].setdefault(variant, []).append({"curve": curve, "step_times": times,
                                                         "corrupted_share_of_trained_tokens": corrupt_share})
            print(f"rho1 part seed {seed} {variant:<10} clean loss {curve[-1][1]:.3f} "
                  f"step {np.median(times) * 1e3:.2f} ms", flush=True)
    summary = {}
    med = {v: float(np.median([np.median(r["step_times"]) for r in rs])) for v, rs in res["runs"].items()}
    targets = [min(l for _, l in r["curve"]) for r in res["runs"]["all_tokens"]]  # all-token's best
    for v, rs in res["runs"].items():
        st = [next((s for s, l in r["curve"] if l <= targets[i]), None) for i, r in enumerate(rs)]
        ok = [s for s in st if s is not None]
        ms = float(np.median(ok)) if len(ok) == len(st) else None
        summary[v] = {"steps_to_all_tokens_best": st, "median_step_ms": med[v] * 1e3,
                      "step_cost_vs_all_tokens": med[v] / med["all_tokens"],
                      "seconds_to_target": None if ms is None else ms * med[v],
                      "final_clean_loss": float(np.median([r["curve"][-1][1] for r in rs])),
                      "best_clean_loss": float(np.median([min(l for _, l in r["curve"]) for r in rs]))}
        if rs[0]["corrupted_share_of_trained_tokens"]:
            summary[v]["corrupted_share_of_trained_tokens"] = float(np.median(
                [np.mean(r["corrupted_share_of_trained_tokens"]) for r in rs]))
    result = {"text": "Python standard library top-level .py sources as bytes; 30% of the training bytes replaced by "
                      "random printable ones; reference model on a clean 20%, clean eval 10%",
              "model": "byte LM: embedding 64, causal conv over 8 bytes to 128, MLP 128-128-256; AdamW 3e-3; "
                       f"batch {batch} x {seq_len} tokens; Rho-1 keeps {keep:.0%} of a batch's tokens",
              "target": "per seed, all-token training's best clean loss",
              "forward_equivalents": "Rho-1 trains on the same forward as all-token training (the reference "
                                     "losses come from the table): equal forward-equivalents per step",
              "quick": quick, "seeds": seeds, "steps": steps,
              "reference_model_and_table_one_off_seconds": float(np.median(res["one_off_seconds"])),
              "summary": summary, "curves": {v: [r["curve"] for r in rs] for v, rs in res["runs"].items()},
              "note": "one thread; the machine was shared with other sessions (2 cores); variants alternate order per seed"}
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    for v, row in summary.items():
        print(f"rho1 part {v:<10} {row}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, rs in res["runs"].items():
            c = np.array(rs[0]["curve"], dtype=float)
            loss = np.median(np.array([[l for _, l in r["curve"]] for r in rs]), 0)
            ax.plot(c[:, 0] * med[v], loss, label=f"{v} ({med[v] * 1e3:.1f} ms/step)")
        ax.set_xlabel("seconds of training (median step time x steps)")
        ax.set_ylabel("clean held-out loss (nats/byte, median over seeds)")
        ax.set_title("Rho-1 on the standard library's source, 30% corrupted bytes")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name + ".png"), dpi=110)
    return result


def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, few steps, few variants (seconds)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the digits PNG from a result JSON")
    ap.add_argument("--part", choices=("digits", "rho1"), default="digits",
                    help="digits: RHO-LOSS on noisy digits; rho1: Rho-1 on the standard library's text")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        plot_digits(result, os.path.splitext(args.replot)[0] + ".png")
        return result
    if args.part == "rho1":
        os.makedirs(args.out, exist_ok=True)
        return bench_rho1(args.quick, 1 if args.quick else 2, args.out,
                          args.name or ("time_to_accuracy_rho1_quick" if args.quick else "time_to_accuracy_rho1"),
                          not args.no_plot)
    seeds, steps, eval_every = (1, 40, 10) if args.quick else (args.seeds, args.steps, 10)
    ratios = (0.5,) if args.quick else (0.1, 0.25, 0.5)
    options = ("inference_mode",) if args.quick else ("inference_mode", "bf16")  # accuracy runs
    option_ratio = 0.5
    il_epochs, il_max_epochs = (5, 5) if args.quick else (60, 200)
    name = args.name or ("time_to_accuracy_quick" if args.quick else "time_to_accuracy")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    runs: dict = {}
    one_off: dict = {"holdout_il": [], "recipe_il": [], "recipe_best_epochs": []}
    invalid = None
    for seed in range(seeds):
        data = load(seed)
        hstore, t_h = holdout_store(data, seed, il_epochs)
        rstore, t_r, best = recipe_store(data, seed, il_max_epochs)
        one_off["holdout_il"].append(t_h)
        one_off["recipe_il"].append(t_r)
        one_off["recipe_best_epochs"].append(best)
        pool = torch.arange(len(data["y"]))
        variants = [("uniform", pool, None, None, {}), ("uniform_80", data["train80"], None, None, {})]
        for r in ratios:
            variants.append((f"rho{r}_holdout", data["train80"], r, hstore, {}))
            variants.append((f"rho{r}_recipe", pool, r, rstore, {}))
        for o in options:
            variants.append((f"rho{option_ratio}_recipe_{o}", pool, option_ratio, rstore, OPTIONS[o]))
        rot = seed % len(variants)
        for vname, rows, r, st, opts in variants[rot:] + variants[:rot]:
            res = run(vname, data, rows, r, st, opts, seed, steps, eval_every)
            runs.setdefault(vname, []).append(res)
            print(f"seed {seed} {vname:<28} best {smooth(res['curve']).max():.3f} final "
                  f"{np.mean([a for _, a in res['curve'][-5:]]):.3f} step {np.median(res['step_times']) * 1e3:.2f} ms",
                  flush=True)
        if seed == 0:
            invalid = bench_invalid_modes(data, rstore, rounds=3 if args.quick else 7, calls=5 if args.quick else 50)
            cost_variants = {"uniform": (None, {})}
            cost_variants.update({f"rho{r}": (r, {}) for r in ratios})
            cost_variants.update({f"rho{option_ratio}_{o}": (option_ratio, OPTIONS[o])
                                  for o in (("inference_mode",) if args.quick else tuple(OPTIONS))})
            costs = bench_step_costs(data, rstore, cost_variants, rounds=3 if args.quick else 9,
                                     burst=5 if args.quick else 20)
            print("step costs:", {v: round(c["median_step_ms"], 2) for v, c in costs.items()}, flush=True)

    # ------------------------------------------------------------------ summary
    summary = {}
    def cost_key(v: str) -> str:  # holdout and recipe variants share a step's cost (same n_B)
        if v.startswith("uniform"):
            return "uniform"
        ratio, _, rest = v[3:].partition("_")
        option = rest.partition("_")[2]
        return f"rho{ratio}" + (f"_{option}" if option else "")

    median_step = {v: costs[cost_key(v)]["median_step_ms"] / 1e3 for v in runs}
    targets = [TARGET_SHARE * smooth(r["curve"]).max() for r in runs["uniform"]]
    finals_uniform = [np.mean([a for _, a in r["curve"][-5:]]) for r in runs["uniform"]]
    for v, rs in runs.items():
        st = [steps_to(r["curve"], targets[i]) for i, r in enumerate(rs)]
        reached = [s for s in st if s is not None]
        finals = [float(np.mean([a for _, a in r["curve"][-5:]])) for r in rs]
        med_steps = float(np.median(reached)) if len(reached) == len(st) else None
        row = {
            "steps_to_target": st,
            "seeds_reaching_target": len(reached),
            "median_steps_to_target": med_steps,
            "median_step_ms": median_step[v] * 1e3,
            "in_run_median_step_ms": float(np.median([np.median(r["step_times"]) for r in rs])) * 1e3,
            "step_cost_vs_uniform": median_step[v] / median_step["uniform"],
            "seconds_to_target": None if med_steps is None else med_steps * median_step[v],
            "raw_cumulative_seconds_to_target": [None if s is None else float(np.sum(r["step_times"][:s]))
                                                 for s, r in zip(st, rs)],
            "forward_equivalents_to_target": None if med_steps is None else med_steps * rs[0]["forward_equivalents_per_step"],
            "best_accuracy": float(np.median([smooth(r["curve"]).max() for r in rs])),
            "final_accuracy": float(np.median(finals)),
            "final_minus_uniform_final": float(np.median([f - u for f, u in zip(finals, finals_uniform)])),
            "noisy_pick_fraction": float(np.median([r["noisy_pick_fraction"] for r in rs])),
        }
        if "selector" in rs[0]:
            for key in ("scoring_time_fraction", "step_overhead"):
                row[key] = float(np.median([r["selector"][key] for r in rs]))
        if "pick_agreement" in rs[0]:
            row["pick_agreement"] = float(np.median([r["pick_agreement"] for r in rs]))
        summary[v] = row
    u = summary["uniform"]
    for v, row in summary.items():
        # break-even: the step saving (uniform's steps / this variant's) needed to tie on the clock
        row["break_even_step_saving"] = row["step_cost_vs_uniform"]
        row["measured_step_saving"] = (None if row["median_steps_to_target"] is None or u["median_steps_to_target"] is None
                                       else u["median_steps_to_target"] / row["median_steps_to_target"])
        row["beats_uniform_on_clock"] = (row["seconds_to_target"] is not None and u["seconds_to_target"] is not None
                                         and row["seconds_to_target"] < u["seconds_to_target"])
    result = {
        "dataset": "sklearn.datasets.load_digits: 30% clean test, 70% pool with 20% flipped labels",
        "model": f"MLP 64-{HIDDEN}-{HIDDEN}-10, AdamW lr 1e-3, n_b = {N_SMALL}; IL models MLP 64-{IL_HIDDEN}-{IL_HIDDEN}-10",
        "target": f"per seed {TARGET_SHARE:.0%} of uniform's best test accuracy (3-eval moving average)",
        "clock": "per-step wall time (selection + training step), evaluation excluded; seconds_to_target = "
                 "median steps to target x median step time; one thread; the machine was shared with other "
                 "sessions (2 cores), variants interleaved",
        "quick": args.quick, "seeds": seeds, "steps": steps, "eval_every": eval_every,
        "one_off_seconds": {"holdout_il_train_and_table": float(np.median(one_off["holdout_il"])),
                            "recipe_il_train_and_table": float(np.median(one_off["recipe_il"])),
                            "recipe_il_best_epochs": one_off["recipe_best_epochs"]},
        "select_seconds_per_call_by_invalid_mode": invalid,
        "step_costs_interleaved": costs,
        "summary": summary,
        "curves": {v: [r["curve"] for r in rs] for v, rs in runs.items()},
        "raw_step_times_median_ms": {v: [float(np.median(r["step_times"]) * 1e3) for r in rs] for v, rs in runs.items()},
        "seconds": time.time() - t_start, "torch": torch.__version__,
    }
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n{'variant':<30}{'steps':>7}{'ms/step':>9}{'cost':>6}{'s to tgt':>9}{'fwd-eq':>9}"
          f"{'best':>7}{'final':>7}{'flipped':>8}{'agree':>7}")
    for v, row in summary.items():
        st = f"{row['median_steps_to_target']:.0f}" if row["median_steps_to_target"] is not None else \
            f"{row['seeds_reaching_target']}/{seeds}"
        sec = f"{row['seconds_to_target']:.2f}" if row["seconds_to_target"] is not None else "-"
        fe = f"{row['forward_equivalents_to_target'] / 1e3:.0f}k" if row["forward_equivalents_to_target"] else "-"
        ag = f"{row['pick_agreement']:.2f}" if "pick_agreement" in row else ""
        print(f"{v:<30}{st:>7}{row['median_step_ms']:>9.2f}{row['step_cost_vs_uniform']:>6.2f}{sec:>9}{fe:>9}"
              f"{row['best_accuracy']:>7.3f}{row['final_accuracy']:>7.3f}{row['noisy_pick_fraction']:>8.2f}{ag:>7}")
    for v, c in costs.items():
        if "pick_agreement" in c:
            print(f"{v:<30} {c['median_step_ms']:.2f} ms/step, pick agreement with fp32 eager {c['pick_agreement']:.3f}, "
                  f"first call {c['first_call_seconds']:.1f} s")
    print(f"one-off: {result['one_off_seconds']}; select() by invalid mode: {invalid}; {result['seconds']:.0f} s -> {path}")

    if not args.no_plot:
        plot_digits(result, os.path.join(args.out, name + ".png"))
    return result


if __name__ == "__main__":
    main()
