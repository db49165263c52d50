#!/usr/bin/env python
"""Rho-1 through ``Rho1Trainer`` (transformers.Trainer) on real text that ships with Python.

The text: the docstrings of the standard library's top-level modules (read from the ``.py``
sources with ``ast``, nothing imported or downloaded), tokenised as UTF-8 bytes (vocab 256).
Documents are split at random into a clean *reference* part, a *training* part in which a
fraction ``corrupt`` (default 30%) of the bytes is replaced by random printable characters, and a
clean *evaluation* part.  A tiny Llama (2 layers, hidden 64, built from a config) is trained:

* ``reference``: on the clean reference part (plain ``transformers.Trainer``);
* ``all``:       on the corrupted part, every token (``Rho1Trainer`` with ``keep_ratio=1``);
* ``random``:    a random 60% of the tokens (control: a ``reference_loss`` column of random
                 numbers so large that they alone decide the selection);
* ``rho1``:      the 60% with the highest excess loss over the reference model.

Reported: the clean evaluation loss (nats/byte) of each, and the fraction of corrupted bytes
among the tokens each run trained on.  JSON in ``benchmarks/results/rho1_trainer_demo[_quick].json``.

    python python/rho1_trainer_demo.py            # full run (a few minutes on 2 CPU cores)
    python python/rho1_trainer_demo.py --quick    # < 1 minute (tests)
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from rho_kernels import tokens  # noqa: E402
from rho_kernels.integrations.transformers import Rho1Trainer  # noqa: E402

RUNS = ("all", "random", "rho1")


@dataclass
class Config:
    seeds: int = 2
    steps: int = 600
    ref_steps: int = 600
    seq_len: int = 64
    batch: int = 16
    keep_ratio: float = 0.6
    corrupt: float = 0.3
    lr: float = 3e-3
    hidden: int = 64
    layers: int = 2
    eval_sequences: int = 256


QUICK = dict(seeds=1, steps=40, ref_steps=40, eval_sequences=32)


def stdlib_docstrings() -> list[str]:
    """Every docstring of the standard library's top-level modules, in a fixed order."""
    lib = os.path.dirname(os.__file__)
    docs = []
    for name in sorted(os.listdir(lib)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(lib, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    return docs


def chunks(docs: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (as bytes, separated by a blank line) into [n, seq_len] chunks."""
    data = np.frombuffer("\n\n".join(docs).encode("utf-8"), dtype=np.uint8).astype(np.int64)
    n = len(data) // seq_len
    return torch.from_numpy(data[: n * seq_len].reshape(n, seq_len).copy())


def split(cfg: Config, seed: int) -> dict:
    docs = stdlib_docstrings()
    rng = np.random.default_rng(seed)
    part = rng.choice(3, size=len(docs), p=[0.3, 0.6, 0.1])  # reference, training, evaluation
    ref = chunks([d for d, p in zip(docs, part) if p == 0], cfg.seq_len)
    train = chunks([d for d, p in zip(docs, part) if p == 1], cfg.seq_len)
    evaluation = chunks([d for d, p in zip(docs, part) if p == 2], cfg.seq_len)[: cfg.eval_sequences]
    g = torch.Generator().manual_seed(seed)
    corrupted = torch.rand(train.shape, generator=g) < cfg.corrupt
    noise = torch.randint(32, 127, train.shape, generator=g)
    return {"ref": ref, "train": torch.where(corrupted, noise, train), "corrupted": corrupted, "eval": evaluation}


def model(cfg: Config, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=cfg.seq_len))


def items(ids: torch.Tensor, **cols: torch.Tensor) -> list[dict]:
    return [{"input_ids": ids[i], "labels": ids[i], **{k: v[i] for k, v in cols.items()}} for i in range(len(ids))]


def targs(cfg: Config, out: str, steps: int, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=cfg.batch, max_steps=steps, learning_rate=cfg.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, logging_steps=max(1, steps // 5),
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True,
        dataloader_num_workers=0)


class CountingRho1Trainer(Rho1Trainer):
    """Also counts the corrupted bytes among the kept tokens (a ``corrupted`` column)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.kept = torch.zeros(2, dtype=torch.float64)  # kept corrupted, kept

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "corrupted" not in self._signature_columns:
            self._signature_columns.append("corrupted")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        self._corrupted = inputs.pop("corrupted")[:, 1:]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _record(self, excess, targets):
        super()._record(excess, targets)
        # the kept tokens, ranked as the loss ranks them
        flat, counted = excess.detach().reshape(-1), targets.reshape(-1) != -100
        mask = tokens.top_fraction_mask(flat, counted & ~torch.isnan(flat), counted, self.keep_ratio)
        mask = mask.view(targets.shape)
        self.kept += torch.stack([(mask & self._corrupted).sum(), mask.sum()]).double()


@torch.no_grad()
def eval_loss(m: LlamaForCausalLM, ids: torch.Tensor) -> float:
    m.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), 64):
        b = ids[i:i + 64]
        logits = m(input_ids=b).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, 256).float(), b[:, 1:].reshape(-1), reduction="sum").item()
        count += b[:, 1:].numel()
    m.train()
    return total / count


def main(argv: Optional[list] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    cfg = Config(**QUICK) if args.quick else Config()
    name = "rho1_trainer_demo_quick" if args.quick else "rho1_trainer_demo"
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(cfg.seeds):
            d = split(cfg, seed)
            ref = model(cfg, 100 + seed)
            Trainer(model=ref, args=targs(cfg, tmp, cfg.ref_steps, seed), train_dataset=items(d["ref"])).train()
            res = {"reference": {"clean_eval_loss": eval_loss(ref, d["eval"])}}
            for run in RUNS:
                cols = {"corrupted": d["corrupted"]}
                kw = {}
                if run == "all":
                    kw["keep_ratio"] = 1.0
                    cols["reference_loss"] = torch.zeros(d["train"].shape)
                elif run == "random":
                    kw["keep_ratio"] = cfg.keep_ratio
                    g = torch.Generator().manual_seed(1000 + seed)
                    # excess = CE - ref: a reference of -1e6 * U(0, 1) makes the choice random
                    cols["reference_loss"] = -1e6 * torch.rand(d["train"].shape, generator=g)
                else:
                    kw.update(keep_ratio=cfg.keep_ratio, reference_model=ref)
                m = model(cfg, seed)  # the same initialisation for every run of a seed
                tr = CountingRho1Trainer(model=m, args=targs(cfg, tmp, cfg.steps, seed),
                                         train_dataset=items(d["train"], **cols), **kw)
                tr.train()
                logs = [h for h in tr.state.log_history if "rho1/kept_fraction" in h]
                res[run] = {
                    "clean_eval_loss": eval_loss(m, d["eval"]),
                    "corrupted_fraction_of_kept": float(tr.kept[0] / tr.kept[1]),
                    "last_logged": {k: logs[-1][k] for k in ("loss", "rho1/kept_fraction", "rho1/excess_kept",
                                                             "rho1/excess_dropped")} if logs else {},
                }
            res["tokens"] = {"reference": int(d["ref"].numel()), "train": int(d["train"].numel()),
                             "eval": int(d["eval"].numel())}
            per_seed.append(res)
            print(f"seed {seed}: " + ", ".join(f"{k} {v['clean_eval_loss']:.3f}" for k, v in res.items()
                                               if "clean_eval_loss" in v), flush=True)

    summary = {}
    for run in ("reference",) + RUNS:
        losses = [r[run]["clean_eval_loss"] for r in per_seed]
        summary[run] = {"clean_eval_loss": float(np.mean(losses)), "per_seed": losses,
                        "std": float(np.std(losses))}
        if run != "reference":
            summary[run]["corrupted_fraction_of_kept"] = float(np.mean([r[run]["corrupted_fraction_of_kept"]
                                                                        for r in per_seed]))
    elapsed = time.time() - t0
    result = {"text": "docstrings of the Python standard library's top-level modules (UTF-8 bytes), "
                      f"Python {sys.version.split()[0]}",
              "config": asdict(cfg), "quick": args.quick, "summary": summary, "per_seed": per_seed,
              "seconds": elapsed, "torch": torch.__version__, "transformers": transformers.__version__}
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nRho1Trainer demo ({'quick' if args.quick else 'full'}): {cfg.seeds} seed(s), {cfg.steps} steps, "
          f"{cfg.corrupt:.0%} corrupted bytes, keep ratio {cfg.keep_ratio}")
    print(f"{'run':<10} {'clean loss (nats/byte)':>23} {'corrupted among trained':>24}")
    for run in ("reference",) + RUNS:
        s = summary[run]
        cf = s.get("corrupted_fraction_of_kept")
        print(f"{run:<10} {s['clean_eval_loss']:>16.3f} ± {s['std']:.3f} {'' if cf is None else f'{cf:.3f}':>24}")
    print(f"(uniform byte model: {math.log(256):.3f}; {elapsed:.0f} s) -> {path}")
    return result


if __name__ == "__main__":
    main()
