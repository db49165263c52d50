"""RHO-LOSS in a PyTorch Lightning ``LightningModule``: a mixin.

Add :class:`RhoLossMixin` before ``LightningModule`` and configure the selector once; the
training step then receives the selected sub-batch instead of the candidate batch::

    class Model(RhoLossMixin, L.LightningModule):
        def __init__(self, store):
            super().__init__()
            self.net = ...
            self.configure_rho_loss(store, method="reducible", ratio=0.1)

        def training_step(self, batch, batch_idx):   # batch = (index, x, y), n_b rows
            index, x, y = batch
            return F.cross_entropy(self.net(x), y)

The train dataloader yields candidate batches of ``n_B`` rows as ``(index, x, y)`` (or
``(x, y)`` for methods that need no store).  Selection happens in ``on_after_batch_transfer``
(on the training device, before ``training_step``), only while training; validation and test
batches pass through.  Statistics are logged through ``self.log``.  Under DDP pass
``distributed="local"`` (each rank picks from its own candidates) or ``"global"`` (exact global
top-k, balanced across ranks).  Needs ``pip install rho_kernels[lightning]``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl  # noqa: F401  (the extra; also checks the install)
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    try:
        import pytorch_lightning as pl  # noqa: F401
    except ImportError:
        raise ImportError(
            "rho_kernels.integrations.lightning needs PyTorch Lightning: pip install rho_kernels[lightning]"
        ) from e

from ..training import IrreducibleLossStore, OnlineBatchSelector

__all__ = ["RhoLossMixin"]


def _module_forward(model: nn.Module, x: Any) -> Tensor:
    return model(x)


class RhoLossMixin:
    """Online batch selection for a ``LightningModule`` (mix in before ``LightningModule``).

    Call :meth:`configure_rho_loss` in ``__init__``.  The selector scores with ``self`` (its
    ``forward``, or ``forward=`` given), so the module's ``forward`` must return logits
    ``[n, C]`` for the batch's ``x``.
    """

    rho_selector: Optional[OnlineBatchSelector] = None

    def configure_rho_loss(
        self,
        irreducible: Union[IrreducibleLossStore, nn.Module, None] = None,
        method: str = "reducible",
        ratio: float = 0.1,
        *,
        k: Optional[int] = None,
        forward: Callable[[nn.Module, Any], Tensor] = _module_forward,
        log_stats: bool = True,
        noisy: Optional[Callable[[Any], Tensor]] = None,
        **selector_kwargs: Any,
    ) -> OnlineBatchSelector:
        """Create the :class:`~rho_kernels.training.OnlineBatchSelector` (same options).

        Args:
            irreducible, method, ratio, k, forward, **selector_kwargs: as the selector's.
            log_stats: log ``rho_loss/mean_score_picked`` (each step, a device value: no sync)
                and the selector's running summary at each epoch end.
            noisy: optional ``batch -> bool [n_B]`` marking known-noisy candidates (feeds the
                ``noisy_pick_fraction`` statistic; for experiments with injected noise).
        """
        if not isinstance(self, nn.Module):
            raise TypeError("RhoLossMixin must be mixed into an nn.Module (a LightningModule)")
        # the selector holds the model; keep it out of the module tree (no recursion, no state_dict)
        object.__setattr__(self, "rho_selector", OnlineBatchSelector(self, irreducible, method, ratio, k=k,
                                                                     forward=forward, **selector_kwargs))
        self._rho_log_stats = bool(log_stats)
        self._rho_noisy = noisy
        return self.rho_selector

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        trainer = getattr(self, "_trainer", None)
        if self.rho_selector is None or trainer is None or not trainer.training:
            return batch
        noisy = self._rho_noisy(batch) if self._rho_noisy is not None else None
        return self.rho_selector.select(batch, noisy=noisy)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        sel = self.rho_selector
        if sel is not None and self._rho_log_stats and sel.last is not None and sel.last.scores is not None:
            s = sel.last.scores
            picked = torch.where(torch.isfinite(s), s, torch.zeros_like(s)).mean()
            self.log("rho_loss/mean_score_picked", picked, on_step=True, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sel = self.rho_selector
        if sel is not None and self._rho_log_stats and sel.stats.steps > 0:
            s = sel.stats.summary()  # one sync per epoch
            for key in ("mean_score_picked", "mean_score_not_picked", "noisy_pick_fraction", "invalid_picks"):
                if key in s and s[key] == s[key]:  # skip absent or NaN (nothing recorded)
                    self.log(f"rho_loss/epoch_{key}", float(s[key]), on_epoch=True, sync_dist=False)
            sel.stats.reset()

    def rho_state_dict(self) -> dict:
        """The selector's step counter and RNG (for checkpoints; see ``on_save_checkpoint``)."""
        sel = self.rho_selector
        out: dict = {"step": sel.step}
        if sel.generator is not None:
            out["generator"] = sel.generator.get_state()
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.rho_selector is not None:
            checkpoint["rho_selector"] = self.rho_state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        st = checkpoint.get("rho_selector")
        if st is not None and self.rho_selector is not None:
            self.rho_selector.step = int(st["step"])
            if "generator" in st and self.rho_selector.generator is not None:
                self.rho_selector.generator.set_state(st["generator"])
