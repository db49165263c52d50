"""Rho-1 and RHO-LOSS as drop-in ``transformers.Trainer`` subclasses.

Selective language modelling (Rho-1): replace ``Trainer`` by :class:`Rho1Trainer` and give it a
reference model (or a ``reference_loss`` column)::

    trainer = Rho1Trainer(model=model, args=args, train_dataset=ds,
                          reference_model=ref_model, keep_ratio=0.6)

RHO-LOSS for classification: :class:`RhoLossTrainer` with an irreducible-loss store built by
:func:`build_irreducible_loss_store`; ``per_device_train_batch_size`` is the candidate batch
``n_B``, of which ``ratio * n_B`` rows are trained on::

    store = build_irreducible_loss_store(il_model, train_ds)
    trainer = RhoLossTrainer(model=model, args=args, train_dataset=train_ds,
                             irreducible_loss=store, ratio=0.1)

Both log their selection statistics through ``Trainer.log`` (so to every reporter the
Trainer has) at each ``logging_steps``.  Needs ``pip install rho_kernels[transformers]``.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import transformers
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "rho_kernels.integrations.transformers needs Hugging Face transformers: "
        "pip install rho_kernels[transformers]"
    ) from e

from .. import api, linear, tokens
from ..training import IrreducibleLossStore, OnlineBatchSelector

__all__ = [
    "Rho1Trainer",
    "RhoLossTrainer",
    "build_irreducible_loss_store",
    "shifted_reference_loss",
    "INDEX_COLUMN",
    "REFERENCE_COLUMN",
]

REFERENCE_COLUMN = "reference_loss"
INDEX_COLUMN = "dataset_index"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DeepSpeed / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in ("DataParallel",
                                                                                                "DeepSpeedEngine"):
            model = model.module
        else:
            return model


def _world() -> tuple[bool, int]:
    on = torch.distributed.is_available() and torch.distributed.is_initialized()
    return on, (torch.distributed.get_world_size() if on else 1)


def _shift(labels: Tensor, ignore_index: int) -> Tensor:
    """``labels[:, 1:]``: position t of the logits predicts token t+1."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}")
    return labels[:, 1:]


def shifted_reference_loss(reference: Tensor, labels: Tensor) -> Tensor:
    """Align a ``reference_loss`` column with the shifted targets ``labels[:, 1:]``.

    Accepts ``[B, T]`` (aligned with ``labels``: entry t is the reference loss of predicting
    ``labels[:, t]``; entry 0 is unused) or ``[B, T-1]`` (already aligned with ``labels[:, 1:]``).
    """
    b, t = labels.shape
    if reference.shape == (b, t):
        return reference[:, 1:]
    if reference.shape == (b, t - 1):
        return reference
    raise ValueError(
        f"{REFERENCE_COLUMN} must have shape [batch, seq_len] = {(b, t)} (aligned with labels) or "
        f"[batch, seq_len - 1] = {(b, t - 1)} (aligned with the shifted targets), got {tuple(reference.shape)}"
    )


class _NonFiniteLosses:
    """Counts the training micro-batches whose loss was NaN / inf, on the device (no sync).

    The Trainer's ``logging_nan_inf_filter`` (on by default) logs the running average instead
    of such a loss, so a diverged model (a NaN loss: see selective_cross_entropy) would look
    healthy.  At each training log the count is read (the log syncs anyway); if any, the logged
    ``loss`` is NaN, ``<prefix>/nonfinite_losses`` says how many, and a warning is raised.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count: Optional[Tensor] = None

    def record(self, loss: Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).sum()
        self.count = bad if self.count is None else self.count + bad

    def surface(self, logs: dict) -> None:
        if self.count is None:
            return
        n, self.count = int(self.count), None
        if n:
            logs["loss"] = math.nan
            logs[f"{self.prefix}/nonfinite_losses"] = n
            warnings.warn(f"{n} training micro-batch loss(es) since the last log were NaN / inf (a diverged model, "
                          "or a batch with nothing to select); the logged loss is NaN", RuntimeWarning, stacklevel=3)


def head_transform(config: Any) -> Optional[dict]:
    """The ops' ``softcap`` / ``logit_scale`` for a causal LM's config, as its model applies them
    after the LM head: Gemma 2/3 soft-cap (``final_logit_softcapping``), Cohere multiplies by
    ``logit_scale``, Granite divides by ``logits_scaling``.  None where a value is unusable."""
    if config is None:
        return None
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    scale = 1.0 if scale is None else scale
    divide = getattr(config, "logits_scaling", None)
    try:
        scale = float(scale) / (1.0 if divide is None else float(divide))
        cap = None if cap is None else float(cap)
        tokens.loss_config(cap, scale, 0.0, 0.0, None, None)  # the ops' own checks
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return {"softcap": cap, "logit_scale": scale}


# ============================================================================== Rho-1
class Rho1Trainer(Trainer):
    """``transformers.Trainer`` whose training loss is Rho-1's selective cross-entropy.

    Each training micro-batch: the per-token reference loss comes from ``reference_model``
    (a frozen causal LM with the same tokenizer, run under ``no_grad`` in eval mode on the same
    inputs) or from a batch column ``reference_loss``; the loss is
    :func:`rho_kernels.tokens.selective_cross_entropy` over the shifted labels (``-100``
    ignored): the cross-entropy of the ``keep_ratio`` fraction of the micro-batch's tokens with
    the highest excess loss (model CE - reference CE).  Selection is per micro-batch and per rank
    (no communication); with gradient accumulation the Trainer averages the micro-batch losses.

    When the model's logits are a linear map of its last hidden state, optionally scaled and/or
    soft-capped as Hugging Face's models do it (``config.final_logit_softcapping``: Gemma 2/3;
    ``config.logit_scale``: Cohere; ``config.logits_scaling``, which Granite divides by), the
    loss is computed from the hidden state and the LM head with that transform, without
    materialising the logits (``use_hidden_states="auto"``); otherwise from the logits.  The
    first training step checks the transform against the model's own last-position logits
    (one host sync, once) and falls back to the logits path, with a warning, if they differ.

    Evaluation (``model.eval()``) uses the plain mean cross-entropy over all tokens.

    Logged at each ``logging_steps`` (means over the micro-batches since the last log, summed
    over ranks): ``rho1/kept_fraction`` (kept / non-ignored tokens), ``rho1/excess_kept`` and
    ``rho1/excess_dropped`` (mean excess loss of the kept and of the dropped tokens).

    Args:
        reference_model: a causal LM (``model(**inputs).logits``); moved to the training device,
            put in eval mode, and never updated.  None: the batch must carry ``reference_loss``
            (see :func:`shifted_reference_loss` for its alignment).
        keep_ratio: fraction of tokens trained on, in ``(0, 1]`` (default 0.6, the paper's).
        use_hidden_states: ``"auto"``, True (require the hidden-state path) or False (logits).
        log_selection_stats: compute the statistics above (one extra scoring pass per
            micro-batch: over the logits, or over the hidden state and the head).
        backend: the op backend (``"auto"``).
        (everything else as ``transformers.Trainer``.)
    """

    def __init__(
        self,
        *args: Any,
        reference_model: Optional[nn.Module] = None,
        keep_ratio: float = 0.6,
        use_hidden_states: Union[str, bool] = "auto",
        log_selection_stats: bool = True,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.keep_ratio = tokens.check_ratio(keep_ratio)
        if reference_model is not None and not isinstance(reference_model, nn.Module):
            raise TypeError(f"reference_model must be an nn.Module or None, got {type(reference_model).__name__}")
        if use_hidden_states not in ("auto", True, False):
            raise ValueError(f"use_hidden_states must be 'auto', True or False, got {use_hidden_states!r}")
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.to(self.args.device).eval().requires_grad_(False)
        self.use_hidden_states = use_hidden_states
        self.log_selection_stats = bool(log_selection_stats)
        self.backend = backend
        # The loss is a mean over the micro-batch's kept tokens; the Trainer then divides by
        # the number of accumulation steps (it does so only when this flag is False).
        self.model_accepts_loss_kwargs = False
        self._rho_acc: Optional[Tensor] = None  # kept, counted, kept excess sum, dropped excess sum
        self._nonfinite = _NonFiniteLosses("rho1")
        self._transform_checked = False  # the hidden path's head transform, checked on the first step

    # -------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if REFERENCE_COLUMN not in self._signature_columns:
            self._signature_columns.append(REFERENCE_COLUMN)

    # -------------------------------------------------------------- pieces
    def _hidden_path(self, model: nn.Module) -> bool:
        if self.use_hidden_states is False:
            return False
        m = _unwrap(model)
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        # Only where logits == transform(hidden @ W.T (+ b)), the transform one the ops know.
        ok = (
            isinstance(head, nn.Linear)
            and head_transform(getattr(m, "config", None)) is not None
            and "logits_to_keep" in inspect.signature(m.forward).parameters
        )
        if self.use_hidden_states is True and not ok:
            raise ValueError(f"use_hidden_states=True: {type(m).__name__} does not expose a linear LM head "
                             "(plain, scaled or soft-capped)")
        return ok

    def _check_transform(self, hidden: Tensor, head: nn.Linear, transform: dict, logits: Tensor) -> bool:
        """Whether ``transform(head(hidden))`` at the last position is the model's own logits there
        (``logits_to_keep=1``); decided once, on the first training step."""
        self._transform_checked = True
        with torch.no_grad():
            cap, scale = transform["softcap"], transform["logit_scale"]
            z = head(hidden[:, -1:]).float() * scale
            z = cap * torch.tanh(z / cap) if cap is not None else z
            own = logits[:, -1:].float()
            # The model may have computed in half precision (bf16 / fp16 autocast, with its output
            # cast back to float32): the tolerance is that precision's, relative to the largest logit.
            half = [torch.bfloat16] if self.args.bf16 else [torch.float16] if self.args.fp16 else []
            eps = max(torch.finfo(dt).eps for dt in [logits.dtype, head.weight.dtype, *half])
            finite = torch.isfinite(own)
            tol = 16 * eps * (1.0 + torch.where(finite, own.abs(), 0.0).amax())
            # A diverged head (NaN / inf) agrees with itself: the loss then says so (NaN).
            agree = ((z - own).abs() <= tol) | (z == own) | (torch.isnan(z) & torch.isnan(own))
            same = bool(agree.all())
        if not same:
            what = (f"{type(_unwrap(self.model)).__name__}'s logits are not the LM head's output with {transform} "
                    "(read from its config)")
            if self.use_hidden_states is True:
                raise ValueError(f"use_hidden_states=True: {what}")
            warnings.warn(f"Rho1Trainer: {what}; using the logits path", RuntimeWarning)
            self.use_hidden_states = False
        return same

    @torch.no_grad()
    def reference_token_loss(self, inputs: dict, targets: Tensor) -> Tensor:
        """Per-token reference CE of the shifted targets ``[B, T-1]`` (from the batch column or
        the reference model)."""
        ref = inputs.get(REFERENCE_COLUMN)
        if ref is not None:
            return shifted_reference_loss(torch.as_tensor(ref, device=targets.device), inputs["labels"]).float()
        if self.reference_model is None:
            raise ValueError(
                f"Rho1Trainer needs a reference_model or a {REFERENCE_COLUMN!r} column in the batch; got neither"
            )
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", REFERENCE_COLUMN)}
        logits = self.reference_model(**model_inputs).logits[:, :-1]
        return api.score(logits, targets, method="loss", ignore_index=-100, backend=self.backend).float()

    def _record(self, excess: Tensor, targets: Tensor) -> None:
        """Accumulate the statistics from the per-token excess loss (``CE - ref``, -inf where
        ignored), ranking the tokens as the loss does."""
        with torch.no_grad():
            excess = excess.detach().reshape(-1)
            counted = targets.reshape(-1) != -100
            eligible = counted & ~torch.isnan(excess)
            mask = tokens.top_fraction_mask(excess, eligible, counted, self.keep_ratio)
            dropped = counted & ~mask
            ex = excess.to(torch.float64)
            vals = torch.stack([
                mask.sum().to(torch.float64), counted.sum().to(torch.float64),
                torch.where(mask, ex, 0.0).sum(), torch.where(dropped, ex, 0.0).sum(),
            ])
            self._rho_acc = vals if self._rho_acc is None else self._rho_acc + vals

    # -------------------------------------------------------------- loss
    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError("Rho1Trainer needs a 'labels' column (token ids, -100 where ignored)")
        labels = inputs["labels"]
        targets = _shift(labels, -100)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", REFERENCE_COLUMN)}

        if not model.training:  # evaluation: plain causal-LM cross-entropy over every token
            outputs = model(**model_inputs)
            logits = outputs.logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            return (loss, outputs) if return_outputs else loss

        ref = self.reference_token_loss(inputs, targets)
        hidden_path = self._hidden_path(model)
        if hidden_path:
            outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=1)
            head = _unwrap(model).get_output_embeddings()
            transform = head_transform(_unwrap(model).config)
            hidden_path = self._transform_checked or self._check_transform(outputs.hidden_states[-1], head,
                                                                           transform, outputs.logits)
        if hidden_path:
            hidden = outputs.hidden_states[-1][:, :-1]
            # The head module, not its weight: under FSDP2 / DeepSpeed ZeRO-3 the op then runs inside
            # its forward, where the weight is gathered and its gradient reduced.
            loss = linear.selective_linear_cross_entropy(hidden, head, targets, ref, self.keep_ratio,
                                                         ignore_index=-100, backend=self.backend, **transform)
            if self.log_selection_stats:  # one more pass over the head, no logits either
                with torch.no_grad():
                    excess = linear.linear_score(hidden.detach(), head, targets, ref, method="reducible",
                                                 ignore_index=-100, backend=self.backend, **transform)
                self._record(excess, targets)
        else:
            outputs = model(**model_inputs)
            logits = outputs.logits[:, :-1]
            loss = tokens.selective_cross_entropy(logits, targets, ref, self.keep_ratio, ignore_index=-100,
                                                  backend=self.backend)
            if self.log_selection_stats:
                self._record(api.score(logits.detach(), targets, ref, method="reducible", ignore_index=-100,
                                       backend=self.backend), targets)
        self._nonfinite.record(loss)
        return (loss, outputs) if return_outputs else loss

    # -------------------------------------------------------------- logging
    def selection_stats(self, reset: bool = True) -> dict[str, float]:
        """The statistics since the last call (summed over ranks; one host sync)."""
        if self._rho_acc is None:
            return {}
        acc = self._rho_acc.clone()
        on, world = _world()
        if on and world > 1:
            torch.distributed.all_reduce(acc)
        if reset:
            self._rho_acc = None
        kept, counted, kept_sum, dropped_sum = acc.tolist()
        ratio = lambda a, b: a / b if b > 0 else math.nan  # noqa: E731
        return {
            "rho1/kept_fraction": ratio(kept, counted),
            "rho1/excess_kept": ratio(kept_sum, kept),
            "rho1/excess_dropped": ratio(dropped_sum, counted - kept),
        }

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log (not eval metrics or the end-of-training summary)
            logs.update(self.selection_stats())
            self._nonfinite.surface(logs)
        super().log(logs, *args, **kwargs)


# ============================================================================== RHO-LOSS
class _WithIndex(torch.utils.data.Dataset):
    """Adds the item's position as ``dataset_index`` to every (dict) item of a dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, dict):
            raise TypeError(f"RhoLossTrainer needs dataset items that are dicts, got {type(item).__name__}")
        return {**item, INDEX_COLUMN: i}


def _logits_forward(model: nn.Module, x: dict) -> Tensor:
    return model(**x).logits


class RhoLossTrainer(Trainer):
    """``transformers.Trainer`` with RHO-LOSS online batch selection (classification).

    The train dataloader yields candidate batches of ``per_device_train_batch_size`` (= ``n_B``)
    rows, each with its dataset index (added by the trainer as a ``dataset_index`` column).  In
    each training micro-batch an :class:`~rho_kernels.training.OnlineBatchSelector` scores the
    candidates without gradients and the model is trained (mean cross-entropy) on the
    ``n_b = ratio * n_B`` (or ``n_b``) selected rows only.  Works with any model whose forward
    takes the batch's columns and returns ``.logits`` ``[n, num_labels]`` (e.g.
    ``AutoModelForSequenceClassification``).  Evaluation is unchanged.

    Logged at each ``logging_steps`` (since the last log): ``rho_loss/mean_score_picked``,
    ``rho_loss/mean_score_not_picked``, ``rho_loss/picks``, ``rho_loss/invalid_picks``, and what
    selection costs: ``rho_loss/scoring_time_fraction`` (scoring + selection over the micro-step)
    and ``rho_loss/step_overhead`` (scoring + selection over the forward/backward on the picks:
    a selective micro-step costs ``1 + step_overhead`` uniform ones; the optimizer step is not
    timed).  Cheaper scoring goes through ``selector_kwargs``: ``inference_mode=True``,
    ``autocast_dtype=torch.bfloat16``, ``compile_forward=True``.  With ``invalid="raise"`` off the
    CPU, a bad batch raises a step late (at the next micro-step or log; see the selector).

    Args:
        irreducible_loss: an :class:`~rho_kernels.training.IrreducibleLossStore` over the train
            dataset (see :func:`build_irreducible_loss_store`), an IL model, or None for methods
            that do not need it.  What worked on noisy data (README, "Does selection pay
            off?"): no holdout -- one IL model per half of the train set (``split_halves``),
            each trained to early stopping and scoring the other half
            (``IrreducibleLossStore.build_no_holdout``; for tensor datasets
            ``rho_kernels.training.build_no_holdout_store`` does all of it) -- and ``ratio=0.5``.
        method: the selector's method (``"reducible"`` = RHO-LOSS, ``"loss"``, ``"uniform"``, ...).
        ratio: ``n_b / n_B`` (default 0.1); ``n_b`` overrides it with a fixed count.
        selector_kwargs: further :class:`~rho_kernels.training.OnlineBatchSelector` options
            (``temperature``, ``score_mode``, ``distributed``, ``generator``, ...).
        (everything else as ``transformers.Trainer``.)
    """

    def __init__(
        self,
        *args: Any,
        irreducible_loss: Union[IrreducibleLossStore, nn.Module, None] = None,
        method: str = "reducible",
        ratio: float = 0.1,
        n_b: Optional[int] = None,
        selector_kwargs: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        opts = dict(selector_kwargs or {})
        opts.setdefault("forward", _logits_forward)
        self.selector = OnlineBatchSelector(self.model, irreducible_loss, method, ratio, k=n_b, **opts)
        if isinstance(irreducible_loss, IrreducibleLossStore) and hasattr(self.train_dataset, "__len__"):
            n = len(self.train_dataset)
            if len(irreducible_loss) != n:
                raise ValueError(f"the irreducible-loss store has {len(irreducible_loss)} entries but the train "
                                 f"dataset has {n} examples")
        self.model_accepts_loss_kwargs = False  # mean over the picks; the Trainer averages micro-batches
        self._rho_train_token = None
        self._nonfinite = _NonFiniteLosses("rho_loss")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)

    def get_train_dataloader(self) -> Any:
        ds = self.train_dataset
        if ds is None:
            raise ValueError("RhoLossTrainer needs a train_dataset")
        self.train_dataset = _WithIndex(ds)  # indices travel with the rows through the collator
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = ds

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        index = inputs.pop(INDEX_COLUMN, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if index is None:
            raise ValueError(f"the training batch has no {INDEX_COLUMN!r} column (use RhoLossTrainer's dataloader)")
        if "labels" not in inputs:
            raise ValueError("RhoLossTrainer needs a 'labels' (or 'label') column")
        labels = inputs.pop("labels")
        self.selector.model = model  # score with the model as wrapped for this step (DDP, compiled)
        index, x, y = self.selector.select((index, inputs, labels))
        if self.selector.timing:  # stopped after the backward, in training_step
            self._rho_train_token = self.selector.stats.start("train", y.device)
        outputs = model(**x)
        loss = F.cross_entropy(outputs.logits.float(), y, ignore_index=self.selector.ignore_index)
        self._nonfinite.record(loss)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict, *args: Any, **kwargs: Any) -> Tensor:
        self._rho_train_token = None
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self._rho_train_token is not None:
            self.selector.stats.stop(self._rho_train_token)
            self._rho_train_token = None
        return loss

    def selection_stats(self, reset: bool = True) -> dict[str, float]:
        """The selector's statistics since the last call (this rank's; one host sync)."""
        self.selector.check_invalid()  # a late invalid="raise" check: the last step's flag
        if self.selector.stats.steps == 0:
            return {}
        s = self.selector.stats.summary()
        if reset:
            self.selector.stats.reset()
        keys = ("mean_score_picked", "mean_score_not_picked", "picks", "invalid_picks", "scoring_time_fraction",
                "step_overhead")
        return {f"rho_loss/{k}": s[k] for k in keys}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self.selection_stats())
            self._nonfinite.surface(logs)
        super().log(logs, *args, **kwargs)

    # The selector's step counter (temperature schedules) and RNG travel with checkpoints.
    def _save_checkpoint(self, model: nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        super()._save_checkpoint(model, trial, *args, **kwargs)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        state = {"step": self.selector.step}
        if self.selector.generator is not None:
            state["generator"] = self.selector.generator.get_state()
        torch.save(state, os.path.join(folder, f"rho_selector_{self.args.process_index}.pt"))

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, f"rho_selector_{self.args.process_index}.pt")
        if os.path.exists(path):
            state = torch.load(path, weights_only=True)
            self.selector.step = int(state["step"])
            if "generator" in state and self.selector.generator is not None:
                self.selector.generator.set_state(state["generator"])


def build_irreducible_loss_store(
    il_model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 256,
    data_collator: Optional[Callable[[list], dict]] = None,
    label_column: str = "labels",
    device: Optional[Union[torch.device, str]] = None,
    **build_kwargs: Any,
) -> IrreducibleLossStore:
    """Score every example of a ``datasets.Dataset`` / torch dataset of dicts with an IL model.

    Items are dicts of model inputs plus the label (``labels`` or ``label``); the columns the IL
    model's forward does not accept are dropped (as the Trainer does).  Row ``i`` of the store is
    item ``i`` of ``dataset`` -- the same indices :class:`RhoLossTrainer` attaches.  Further
    keyword arguments go to :meth:`IrreducibleLossStore.build` (``checkpoint=``,
    ``distributed=``, ``autocast_dtype=``, ...).
    """
    collate = data_collator or transformers.default_data_collator
    accepted = set(inspect.signature(_unwrap(il_model).forward).parameters)

    def batches():
        n = len(dataset)
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            b = dict(collate(items))
            y = b.pop(label_column, None)
            if y is None:
                y = b.pop("label", None)
            if y is None:
                raise ValueError(f"the dataset's items have no {label_column!r} or 'label' column")
            x = {k: v for k, v in b.items() if k in accepted}
            yield torch.arange(start, start + len(items)), x, torch.as_tensor(y)

    build_kwargs.setdefault("progress", False)
    return IrreducibleLossStore.build(il_model, batches(), num_examples=len(dataset), device=device,
                                      forward=_logits_forward, **build_kwargs)
