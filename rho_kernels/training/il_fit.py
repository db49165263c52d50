"""The recipe that makes RHO-LOSS work on small noisy data: IL models trained to early stopping,
no holdout.

Measured on scikit-learn's digits with 20% flipped labels (``benchmarks/bench_time_to_accuracy.py``):
an IL model trained for a fixed number of epochs on a 20% holdout leaves RHO-LOSS below uniform's
accuracy at every selection ratio; the paper's no-holdout variant (two IL models, one per half of
the training set, each scoring the other half) with each model stopped at its best validation
loss reaches uniform's best and ends above uniform's final accuracy (uniform memorises the flipped
labels).  The halves use all the data (no holdout is taken from the training set), and early
stopping keeps the IL model from fitting its own noisy labels, so a flipped label keeps a high
IL -- which is what makes RHO-LOSS skip it.

    store, fits = build_no_holdout_store(lambda: make_il_model(), IndexedDataset(train_set))
    selector = OnlineBatchSelector(model, store, ratio=0.5)
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .il_store import IrreducibleLossStore, split_halves

__all__ = ["ILFit", "fit_il_model", "build_no_holdout_store"]


class ILFit(NamedTuple):
    """What :func:`fit_il_model` did: the model (at its best epoch), that epoch, the epochs run
    and the best validation loss."""

    model: nn.Module
    best_epoch: int
    epochs_run: int
    best_val_loss: float


def _default_forward(model: nn.Module, x: Any) -> Tensor:
    return model(x)


def _collate_all(dataset: Dataset, device: Optional[torch.device]) -> tuple[Tensor, Tensor]:
    """The whole dataset as two tensors, read once (per-item reads every epoch cost more than the
    small IL model's arithmetic)."""
    xs, ys = [], []
    for _, x, y, *_ in DataLoader(dataset, batch_size=1024):
        if not isinstance(x, Tensor):
            raise TypeError(f"fit_il_model needs tensor inputs x, got {type(x).__name__}")
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    return (x.to(device), y.to(device)) if device is not None else (x, y)


@torch.no_grad()
def _mean_loss(model: nn.Module, x: Tensor, y: Tensor, forward: Callable) -> float:
    model.eval()
    loss = float(F.cross_entropy(forward(model, x).float(), y))
    model.train()
    return loss


def fit_il_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    max_epochs: int = 200,
    patience: int = 10,
    val_fraction: float = 0.15,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 64,
    forward: Callable[[nn.Module, Any], Tensor] = _default_forward,
    device: Optional[torch.device | str] = None,
    seed: int = 0,
) -> ILFit:
    """Train an IL model with AdamW until its loss on a held-back ``val_fraction`` of ``dataset``
    has not improved for ``patience`` epochs; return it at its best epoch.

    ``dataset`` yields ``(index, x, y, *extra)`` (an :class:`IndexedDataset`); the validation
    split is random (``seed``) and, like the rest, carries the data's own (noisy) labels: the
    point is to stop before the model fits them.  The dataset is read into memory once
    (tensor inputs; the IL models of this recipe are small and see the training set).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    for name, v in (("max_epochs", max_epochs), ("patience", patience), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    n = len(dataset)  # type: ignore[arg-type]
    n_val = max(1, int(round(val_fraction * n)))
    if n - n_val < 1:
        raise ValueError(f"dataset of {n} examples is too small to hold back a validation split")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    device = torch.device(device) if device is not None else None
    x_all, y_all = _collate_all(dataset, device)
    perm = perm.to(x_all.device)
    x_val, y_val = x_all[perm[:n_val]], y_all[perm[:n_val]]
    x_tr, y_tr = x_all[perm[n_val:]], y_all[perm[n_val:]]
    if device is not None:
        model.to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, epoch = math.inf, 0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(y_tr), generator=g).to(x_tr.device)
        for i in range(0, len(order), batch_size):
            b = order[i:i + batch_size]
            loss = F.cross_entropy(forward(model, x_tr[b]).float(), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        v = _mean_loss(model, x_val, y_val, forward)
        if v < best:
            best, best_epoch, best_state = v, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return ILFit(model, best_epoch, epoch, best)


def build_no_holdout_store(
    make_model: Callable[[], nn.Module],
    dataset: Dataset,
    *,
    seed: int = 0,
    fit_kwargs: Optional[dict] = None,
    **build_kwargs: Any,
) -> tuple[IrreducibleLossStore, tuple[ILFit, ILFit]]:
    """The no-holdout IL store: split ``dataset`` in halves (:func:`split_halves`), fit one IL
    model per half to early stopping (:func:`fit_il_model`), and let each score the other half
    (:meth:`IrreducibleLossStore.build_no_holdout`).

    ``make_model()`` returns a fresh IL model (called twice); ``fit_kwargs`` go to
    :func:`fit_il_model`, ``build_kwargs`` to the store's build (``batch_size``, ``device``,
    ``progress``, ...).  Returns the store and the two fits (epochs, validation losses).
    """
    fit_kwargs = dict(fit_kwargs or {})
    fit_kwargs.setdefault("seed", seed)
    halves = split_halves(len(dataset), seed=seed)  # type: ignore[arg-type]
    fits = tuple(fit_il_model(make_model(), Subset(dataset, h.tolist()), **fit_kwargs) for h in halves)
    if "forward" in fit_kwargs:
        build_kwargs.setdefault("forward", fit_kwargs["forward"])
    store = IrreducibleLossStore.build_no_holdout((fits[0].model, fits[1].model), dataset, halves, **build_kwargs)
    return store, fits  # type: ignore[return-value]
