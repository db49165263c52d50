"""Rho-1 on a toy language: selective language modelling vs all-token training, equal steps.

The "text" is generated locally by a random second-order Markov chain over a small vocabulary
(each two-token context allows a few next tokens).  The training stream is corrupted: a fraction
``--noise`` of its tokens is replaced by uniformly random tokens.  A reference model of the same
tiny architecture is trained on a small clean sample; its per-token loss is the Rho-1 reference
loss.  Then, from the same initialisation and for the same number of steps on the same noisy
batches:

* ``all_tokens``    -- cross-entropy on every token (the baseline);
* ``rho1``          -- ``rk.selective_linear_cross_entropy``: only the ``--ratio`` fraction of tokens
                       with the highest excess loss (CE - reference CE) of each batch is trained
                       on, computed from the hidden states and the LM head (the op's logits exist
                       one chunk of tokens at a time, as they must at a real vocabulary; the
                       reference loss comes from ``rk.linear_score`` the same way);
* ``random_subset`` -- the same number of tokens chosen uniformly at random (control: is it the
                       choice of tokens, or just fewer tokens?).

Reported: loss on clean held-out text (the quantity we care about), the generator's own
(oracle) loss as the floor, and for Rho-1 the share of corrupted tokens among the selected ones.
Writes JSON with ``--json PATH``.  ``--quick``: one seed, few steps (well under a minute).

    python python/rho1_demo.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rho_kernels as rk  # noqa: E402  (the checkout's package)


# --------------------------------------------------------------------------- data


class MarkovText:
    """A random order-2 Markov chain: each context (a, b) allows ``branching`` next tokens."""

    def __init__(self, vocab: int, branching: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        probs = torch.zeros(vocab, vocab, vocab)
        for a in range(vocab):
            for b in range(vocab):
                nxt = torch.randperm(vocab, generator=g)[:branching]
                w = torch.rand(branching, generator=g) + 0.2
                probs[a, b, nxt] = w / w.sum()
        self.probs = probs

    def sample(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(n, length, dtype=torch.int64)
        x[:, :2] = torch.randint(0, self.vocab, (n, 2), generator=g)
        for t in range(2, length):
            p = self.probs[x[:, t - 2], x[:, t - 1]]
            x[:, t] = torch.multinomial(p, 1, generator=g).squeeze(1)
        return x

    def oracle_loss(self, x: torch.Tensor) -> float:
        """Mean -log p(x_t | x_{t-2}, x_{t-1}) of the generator itself over t >= 2 (the floor)."""
        p = self.probs[x[:, :-2], x[:, 1:-1]].gather(-1, x[:, 2:, None]).squeeze(-1)
        return float(-p.log().mean())


def corrupt(x: torch.Tensor, noise: float, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a ``noise`` fraction of tokens by uniform random ones; returns (x', replaced)."""
    replaced = torch.rand(x.shape, generator=g) < noise
    random_tokens = torch.randint(0, vocab, x.shape, generator=g)
    return torch.where(replaced, random_tokens, x), replaced


# --------------------------------------------------------------------------- model


class TinyLM(nn.Module):
    """Causal LM that reads the previous ``context`` tokens (left-padded with a BOS id)."""

    def __init__(self, vocab: int, dim: int = 16, hidden: int = 48, context: int = 2) -> None:
        super().__init__()
        self.vocab, self.context = vocab, context
        self.emb = nn.Embedding(vocab + 1, dim)  # id `vocab` = BOS padding
        self.mlp = nn.Sequential(nn.Linear(context * dim, hidden), nn.GELU(), nn.Linear(hidden, vocab))

    @property
    def lm_head(self) -> nn.Linear:
        """The output layer: hidden [.., hidden] -> logits [.., V]."""
        return self.mlp[2]

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T] -> the hidden states [B, T, hidden] that the LM head maps to logits."""
        pad = torch.full((x.shape[0], self.context - 1), self.vocab, dtype=x.dtype)
        windows = torch.cat([pad, x], 1).unfold(1, self.context, 1)  # [B, T, context]
        return self.mlp[1](self.mlp[0](self.emb(windows).flatten(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T] -> logits [B, T, V]; position t predicts token t + 1."""
        return self.lm_head(self.hidden_states(x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def clean_loss(model: nn.Module, x: torch.Tensor) -> float:
    """Mean CE on clean text, over the positions with a full two-token context (as the oracle)."""
    logits = model(x[:, :-1])
    return float(F.cross_entropy(logits[:, 1:].reshape(-1, model.vocab), x[:, 2:].reshape(-1)))


# --------------------------------------------------------------------------- training


def train_reference(cfg, text: MarkovText, seed: int) -> TinyLM:
    g = torch.Generator().manual_seed(seed + 1)
    clean = text.sample(cfg.reference_sequences, cfg.seq_len + 1, g)
    torch.manual_seed(seed + 2)
    model = TinyLM(text.vocab)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.reference_steps):
        rows = torch.randint(0, clean.shape[0], (cfg.batch,), generator=g)
        x = clean[rows]
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, text.vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def train(cfg, mode: str, text: MarkovText, reference: TinyLM, batches, eval_x, seed: int) -> dict:
    torch.manual_seed(seed + 3)  # same initialisation for every mode
    model = TinyLM(text.vocab)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed + 4)
    curve, picked_noisy, picked_total = [], 0, 0
    t0 = time.perf_counter()
    for step, (x, replaced) in enumerate(batches):
        inputs, targets, noisy = x[:, :-1], x[:, 1:], replaced[:, 1:]
        if mode == "all_tokens":
            loss = F.cross_entropy(model(inputs).reshape(-1, text.vocab), targets.reshape(-1))
        elif mode == "rho1":
            # Hidden states and the head only: no [B, T, V] logits, for either model.
            head = model.lm_head
            hidden = model.hidden_states(inputs)
            with torch.no_grad():
                ref_head = reference.lm_head
                ref_loss = rk.linear_score(reference.hidden_states(inputs), ref_head.weight, targets,
                                           bias=ref_head.bias, method="loss")
            loss = rk.selective_linear_cross_entropy(hidden, head.weight, targets, ref_loss, cfg.ratio,
                                                     bias=head.bias)
            with torch.no_grad():
                # Which tokens the loss kept: its ratio rule on the same excess-loss scores.
                excess = rk.linear_score(hidden, head.weight, targets, ref_loss, bias=head.bias).reshape(-1)
                every = torch.ones_like(excess, dtype=torch.bool)
                mask = rk.tokens.top_fraction_mask(excess, every, every, cfg.ratio).view_as(targets)
                picked_noisy += int((mask & noisy).sum())
                picked_total += int(mask.sum())
        elif mode == "random_subset":
            k = rk.tokens.kept_count(targets.numel(), cfg.ratio)  # the rounding rule of select_mask
            keep = torch.zeros(targets.numel(), dtype=torch.bool)
            keep[torch.randperm(targets.numel(), generator=g)[:k]] = True
            ce = F.cross_entropy(model(inputs).reshape(-1, text.vocab), targets.reshape(-1), reduction="none")
            loss = ce[keep].mean()
        else:
            raise ValueError(mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append([step + 1, round(clean_loss(model, eval_x), 5)])
    out = {"clean_eval_loss": curve[-1][1], "curve": curve, "train_seconds": round(time.perf_counter() - t0, 2)}
    if mode == "rho1":
        out["selection"] = {"noisy_fraction_of_selected": picked_noisy / max(1, picked_total),
                            "selected_tokens": picked_total}
    return out


def run_seed(cfg, seed: int) -> dict:
    text = MarkovText(cfg.vocab, cfg.branching, seed)
    g = torch.Generator().manual_seed(seed + 5)
    eval_x = text.sample(cfg.eval_sequences, cfg.seq_len + 1, g)
    reference = train_reference(cfg, text, seed)
    batches = []
    for _ in range(cfg.steps):
        x = text.sample(cfg.batch, cfg.seq_len + 1, g)
        batches.append(corrupt(x, cfg.noise, cfg.vocab, g))
    noisy_share = float(torch.stack([r[:, 1:].float().mean() for _, r in batches]).mean())
    result = {
        "seed": seed,
        "oracle_clean_loss": round(text.oracle_loss(eval_x), 5),
        "reference_clean_loss": round(clean_loss(reference, eval_x), 5),
        "noisy_share_of_training_tokens": round(noisy_share, 4),
        "runs": {m: train(cfg, m, text, reference, batches, eval_x, seed) for m in cfg.modes},
    }
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, few steps (< 1 min)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--noise", type=float, default=0.3, help="fraction of corrupted tokens")
    ap.add_argument("--ratio", type=float, default=0.6, help="Rho-1 keep fraction")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead

    class Cfg:
        vocab, branching, seq_len, batch, lr = 16, 3, 64, 32, 1e-2
        noise, ratio = args.noise, args.ratio
        steps = args.steps or (600 if args.quick else 3000)
        seeds = args.seeds or (1 if args.quick else 3)
        reference_sequences = 256
        reference_steps = 600 if args.quick else 2000
        eval_sequences = 256
        eval_every = max(1, steps // 10)
        modes = ("all_tokens", "rho1", "random_subset")

    cfg = Cfg()
    t0 = time.perf_counter()
    per_seed = [run_seed(cfg, 1000 * s) for s in range(cfg.seeds)]
    summary = {}
    for m in cfg.modes:
        vals = [r["runs"][m]["clean_eval_loss"] for r in per_seed]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1))
        summary[m] = {"clean_eval_loss_mean": round(mean, 5), "clean_eval_loss_std": round(std, 5)}
    noisy_sel = [r["runs"]["rho1"]["selection"]["noisy_fraction_of_selected"] for r in per_seed]
    runs = {m: dict(per_seed[0]["runs"][m]) for m in cfg.modes}
    runs["rho1"]["selection"] = {"noisy_fraction_of_selected": round(sum(noisy_sel) / len(noisy_sel), 4)}
    data = {
        "config": {k: getattr(cfg, k) for k in ("vocab", "branching", "seq_len", "batch", "lr", "noise", "ratio",
                                                "steps", "seeds", "reference_sequences", "reference_steps")},
        "model_params": n_params(TinyLM(cfg.vocab)),
        "oracle_clean_loss": per_seed[0]["oracle_clean_loss"],
        "reference_clean_loss": per_seed[0]["reference_clean_loss"],
        "summary": summary,
        "runs": runs,  # first seed's curves; selection stats averaged over seeds
        "per_seed": per_seed,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "backend": rk.available_backends("cpu")},
    }
    print(f"Rho-1 demo: {data['model_params']} params, {cfg.steps} steps x {cfg.seeds} seed(s), "
          f"noise {cfg.noise:.0%}, keep ratio {cfg.ratio:.0%}")
    print(f"  oracle clean loss {data['oracle_clean_loss']:.4f}   reference model {data['reference_clean_loss']:.4f}")
    for m in cfg.modes:
        s = summary[m]
        print(f"  {m:14s} clean loss {s['clean_eval_loss_mean']:.4f} +- {s['clean_eval_loss_std']:.4f}")
    print(f"  corrupted share: {per_seed[0]['noisy_share_of_training_tokens']:.1%} of training tokens, "
          f"{runs['rho1']['selection']['noisy_fraction_of_selected']:.1%} of Rho-1's selected tokens")
    print(f"  wall {data['wall_seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return data


if __name__ == "__main__":
    main()
