"""Online batch selection in a training loop (RHO-LOSS and its baselines).

Each step the loop draws a large candidate batch (``n_B`` examples) and hands it to
:meth:`OnlineBatchSelector.select`, which scores it under ``no_grad`` and returns the ``n_b``
best examples, in the batch's own structure, ready for the forward/backward step::

    selector = OnlineBatchSelector(model, store, method="reducible", ratio=0.1)
    for index, x, y in loader:                       # n_B = 320 candidates
        index, x, y = selector.select((index, x, y)) # n_b = 32 picked
        loss = F.cross_entropy(model(x), y)
        ...

Selection keys per method (higher = picked first):

* any of :data:`rho_kernels.METHODS` (``reducible``, ``loss``, ``irreducible``, ``gradnorm``,
  ``entropy``): the op's score; deterministic top-k through :func:`rho_kernels.select`'s order
  (ties to the lower row, ineligible rows last);
* ``uniform``: a uniform sample without replacement (no scoring forward pass unless
  ``score_uniform=True``, which only feeds the statistics);
* with ``temperature=T`` (a float or a schedule ``step -> T``): Boltzmann sampling *without
  replacement*, ``P(i first) ∝ exp(score_i / T)``, by the Gumbel-top-k trick
  (``key = score / T + Gumbel(0, 1)``; the top k keys are an exact sample without replacement
  of the Plackett-Luce distribution -- no duplicates, unlike the paper's code).

Language models (sequence-level RHO-LOSS): with targets ``y`` of shape ``[n_B, T]`` a
candidate is a sequence and its score is the mean of its token scores over the non-ignored
tokens (the rule of :func:`rho_kernels.select_sequences`).  At vocabulary scale the scoring
pass should not build ``[n_B, T, V]`` logits: pass ``head=`` (e.g. ``lambda m: m.lm_head``) and a
``forward`` that returns the hidden states ``[n_B, T, D]`` before that head; the token scores
then come from :func:`rho_kernels.linear_score`, which computes the logits one ``[chunk, V]``
block at a time::

    selector = OnlineBatchSelector(model, token_store, ratio=0.1, head=lambda m: m.lm_head,
                                   forward=lambda m, x: m.backbone(x))   # hidden [n_B, T, D]
    index, x, y = selector.select((index, x, y))                        # y: [n_B, T]

Batches: ``(index, x, y)`` or ``(x, y)``; ``x`` (and ``index``) may be a tensor or a nested
tuple/list/dict.  Every tensor in the batch must have the candidate count ``n_B`` (``len(y)``)
as its first dimension (ValueError naming the field otherwise); a list or tuple of plain
per-example values (file names, raw text: no tensors or containers inside) of length ``n_B`` is
picked from like a tensor; any other value (a string, a number, a list of another length) is
passed through unchanged.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import api as rk  # the public op API only (the package imports this layer)
from ..linear import linear_score
from ..tokens import kept_count, sequence_means

from .distributed import global_select, topk_by_key, world_info
from .il_store import IrreducibleLossStore
from .token_store import TokenLossStore

__all__ = [
    "OnlineBatchSelector",
    "PickInfo",
    "SelectorStats",
    "TemperatureSchedule",
    "constant_temperature",
    "linear_temperature",
    "exponential_temperature",
    "cosine_temperature",
    "SELECTOR_METHODS",
]

SELECTOR_METHODS: tuple[str, ...] = tuple(rk.METHODS) + ("uniform",)
IL_METHODS = ("reducible", "irreducible")
Temperature = Union[None, float, Callable[[int], float]]
# head(model) -> the model's output layer: an nn.Linear, or a [V, D] weight (no bias).
Head = Callable[[nn.Module], Union[nn.Linear, Tensor]]


# ---------------------------------------------------------------------------- schedules
class TemperatureSchedule:
    """A temperature as a function of the selection step (``schedule(step) -> T > 0``)."""

    def __init__(self, fn: Callable[[int], float], description: str) -> None:
        self._fn = fn
        self.description = description

    def __call__(self, step: int) -> float:
        return float(self._fn(step))

    def __repr__(self) -> str:
        return f"TemperatureSchedule({self.description})"


def _check_positive(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


def constant_temperature(t: float) -> TemperatureSchedule:
    """``T`` at every step."""
    t = _check_positive("t", t)
    return TemperatureSchedule(lambda s: t, f"constant {t}")


def linear_temperature(start: float, end: float, steps: int) -> TemperatureSchedule:
    """Linear from ``start`` (step 0) to ``end`` (step ``steps``), then constant ``end``."""
    a, b, n = _check_positive("start", start), _check_positive("end", end), _check_steps(steps)
    return TemperatureSchedule(lambda s: a + (b - a) * min(s, n) / n, f"linear {a} -> {b} over {n} steps")


def exponential_temperature(start: float, end: float, steps: int) -> TemperatureSchedule:
    """Geometric decay (annealing) from ``start`` to ``end`` over ``steps``, then ``end``."""
    a, b, n = _check_positive("start", start), _check_positive("end", end), _check_steps(steps)
    return TemperatureSchedule(lambda s: a * (b / a) ** (min(s, n) / n), f"exponential {a} -> {b} over {n} steps")


def cosine_temperature(start: float, end: float, steps: int) -> TemperatureSchedule:
    """Cosine from ``start`` to ``end`` over ``steps``, then ``end``."""
    a, b, n = _check_positive("start", start), _check_positive("end", end), _check_steps(steps)
    return TemperatureSchedule(
        lambda s: b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(s, n) / n)), f"cosine {a} -> {b} over {n} steps"
    )


# ---------------------------------------------------------------------------- statistics
class SelectorStats:
    """Running statistics of a selector, accumulated on device (no host sync per step).

    Scores are the method's scores (for Boltzmann sampling: the scores, not the noisy keys);
    rows with a non-finite score are left out of the means.  :meth:`summary` reads them (one
    sync).
    """

    # data-dependent sums live on the device; counts known on the host stay Python numbers
    # (creating a device tensor from a host number would be a copy, and on CUDA a sync).
    _FIELDS = ("picked_sum", "picked_n", "unpicked_sum", "unpicked_n", "noisy_picks", "noisy_candidates",
               "invalid_picks")
    _HOST = ("picks", "candidates", "noisy_known_picks", "noisy_known_candidates")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.steps = 0
        self._acc: Optional[Tensor] = None
        self._host = dict.fromkeys(self._HOST, 0.0)

    def _add(self, device: torch.device, vals: dict) -> None:
        if self._acc is None:
            self._acc = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)
        elif self._acc.device != device:  # e.g. loaded from a checkpoint with map_location="cpu"
            self._acc = self._acc.to(device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._acc += torch.stack([vals[f].to(torch.float64) if f in vals else zero for f in self._FIELDS])

    def update(
        self,
        *,
        picked_scores: Optional[Tensor],
        candidate_scores: Optional[Tensor],
        candidate_won: Optional[Tensor],
        num_candidates: int,
        picked_valid: Tensor,
        picked_noisy: Optional[Tensor] = None,
        candidate_noisy: Optional[Tensor] = None,
    ) -> None:
        """Add one step.  ``candidate_won`` marks candidates that were picked (anywhere)."""
        vals = {"invalid_picks": (~picked_valid).sum()}
        self._host["picks"] += picked_valid.shape[0]
        self._host["candidates"] += num_candidates
        if picked_scores is not None and candidate_scores is not None and candidate_won is not None:
            pf = torch.isfinite(picked_scores)
            vals["picked_sum"] = torch.where(pf, picked_scores, 0).sum(dtype=torch.float64)
            vals["picked_n"] = pf.sum()
            cf = torch.isfinite(candidate_scores) & ~candidate_won
            vals["unpicked_sum"] = torch.where(cf, candidate_scores, 0).sum(dtype=torch.float64)
            vals["unpicked_n"] = cf.sum()
        if picked_noisy is not None and candidate_noisy is not None:
            vals["noisy_picks"] = picked_noisy.to(torch.bool).sum()
            vals["noisy_candidates"] = candidate_noisy.to(torch.bool).sum()
            self._host["noisy_known_picks"] += picked_noisy.numel()
            self._host["noisy_known_candidates"] += candidate_noisy.numel()
        self._add(picked_valid.device, vals)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far (the device sums stay tensors: no host sync)."""
        return {"steps": self.steps, "acc": None if self._acc is None else self._acc.clone(),
                "host": dict(self._host)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"steps", "acc", "host"} - set(state)
        if missing:
            raise ValueError(f"not a SelectorStats state dict: missing {sorted(missing)}")
        acc = state["acc"]
        if acc is not None and (not isinstance(acc, Tensor) or acc.shape != (len(self._FIELDS),)):
            raise ValueError(f"SelectorStats state 'acc' must be a tensor of shape ({len(self._FIELDS)},), got {acc!r}")
        self.steps = int(state["steps"])
        self._acc = None if acc is None else acc.to(torch.float64).clone()
        self._host = dict.fromkeys(self._HOST, 0.0)
        self._host.update({k: float(v) for k, v in state["host"].items() if k in self._HOST})

    def summary(self) -> dict[str, float]:
        """``steps``, ``mean_score_picked``, ``mean_score_not_picked``, ``noisy_pick_fraction``
        (picked rows that were marked noisy), ``noisy_candidate_fraction`` (the base rate among
        candidates), ``invalid_picks`` (total), ``picks``.  NaN where nothing was recorded; the
        two noisy fractions only where a ``noisy=`` mask was passed to ``select``."""
        out: dict[str, float] = {"steps": float(self.steps)}
        a = dict.fromkeys(self._FIELDS, 0.0) if self._acc is None else dict(zip(self._FIELDS, self._acc.tolist()))
        a.update(self._host)

        def ratio(x: float, y: float) -> float:
            return x / y if y > 0 else math.nan

        out["mean_score_picked"] = ratio(a["picked_sum"], a["picked_n"])
        out["mean_score_not_picked"] = ratio(a["unpicked_sum"], a["unpicked_n"])
        if a["noisy_known_candidates"] > 0:  # else there is no fraction to report, not an unknown one
            out["noisy_pick_fraction"] = ratio(a["noisy_picks"], a["noisy_known_picks"])
            out["noisy_candidate_fraction"] = ratio(a["noisy_candidates"], a["noisy_known_candidates"])
        out["invalid_picks"] = a["invalid_picks"]
        out["picks"] = a["picks"]
        return out


# ---------------------------------------------------------------------------- batch helpers
def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _is_per_example(obj: Any, n: int) -> bool:
    """A list/tuple of ``n`` plain values (strings, numbers, objects): one per candidate."""
    return (isinstance(obj, (list, tuple)) and not _is_namedtuple(obj) and len(obj) == n
            and not any(isinstance(o, (Tensor, list, tuple, dict)) for o in obj))


def _map_batch(obj: Any, n: int, on_tensor: Callable[[Tensor, str], Any],
               on_values: Callable[[Any, str], Any], path: str) -> Any:
    """Rebuild ``obj`` with ``on_tensor`` applied to its tensors and ``on_values`` to its lists of
    per-example values; anything else is kept as it is.  ``path`` names the field in errors."""
    if isinstance(obj, Tensor):
        return on_tensor(obj, path)
    if _is_namedtuple(obj):
        return type(obj)(*(_map_batch(o, n, on_tensor, on_values, f"{path}.{f}") for f, o in zip(obj._fields, obj)))
    if isinstance(obj, (tuple, list)):
        if _is_per_example(obj, n):
            return on_values(obj, path)
        return type(obj)(_map_batch(o, n, on_tensor, on_values, f"{path}[{i}]") for i, o in enumerate(obj))
    if isinstance(obj, dict):
        return {k: _map_batch(v, n, on_tensor, on_values, f"{path}[{k!r}]") for k, v in obj.items()}
    return obj


def _field_names(batch: Any) -> tuple[str, ...]:
    return ("index", "x", "y") if len(batch) == 3 else ("x", "y")


def _map_fields(batch: Any, n: int, on_tensor, on_values) -> Any:
    """:func:`_map_batch` over the batch's top-level fields, named ``index``/``x``/``y``."""
    out = [_map_batch(f, n, on_tensor, on_values, name) for name, f in zip(_field_names(batch), batch)]
    return type(batch)(*out) if _is_namedtuple(batch) else type(batch)(out)


def _check_rows(batch: Any, n: int) -> None:
    """Every tensor of the batch must have the candidate count as its first dimension."""

    def check(t: Tensor, path: str) -> Tensor:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"batch field {path} has shape {tuple(t.shape)}, but every tensor of the batch needs the "
                f"candidate count {n} (len(y)) as its first dimension: the picked rows of {path} would "
                f"not belong to the picked examples"
            )
        return t

    _map_fields(batch, n, check, lambda v, p: v)


def _take(batch: Any, pos: Tensor, n: int) -> Any:
    """Rows ``pos`` of every tensor and per-example list of the batch (other values unchanged)."""
    host: list = []

    def values(v: Any, path: str) -> Any:
        if not host:  # indexing a Python list needs the positions on the host: one copy
            host.append(pos.tolist())
        return type(v)(v[i] for i in host[0])

    return _map_fields(batch, n, lambda t, p: t.index_select(0, pos.to(t.device)), values)


def _tensors(obj: Any) -> list[Tensor]:
    out: list[Tensor] = []
    _map_batch(obj, -1, lambda t, p: out.append(t), lambda v, p: v, "x")
    return out


def _first_tensor(obj: Any) -> Tensor:
    leaves = _tensors(obj)
    if not leaves:
        raise ValueError("the batch's inputs contain no tensor")
    return leaves[0]


_NORM_TYPES = (nn.modules.batchnorm._NormBase,)  # BatchNorm*, SyncBatchNorm, InstanceNorm*


@contextmanager
def _restore_norm_buffers(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Put back the running statistics (and ``num_batches_tracked``) that a train-mode forward
    updates, so that scoring leaves no trace on the model.  Device copies only: no host sync."""
    norms = [m for m in model.modules() if isinstance(m, _NORM_TYPES)] if enabled else []
    # A lazy layer's buffers do not exist before its first forward: put it back to its fresh state.
    lazy = [m for m in norms if any(nn.parameter.is_lazy(b) for b in m.buffers(recurse=False))]
    bufs = [b for m in norms if m not in lazy for b in m.buffers(recurse=False)]
    saved = [b.clone() for b in bufs]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(bufs, saved):
                b.copy_(v)
            for m in lazy:
                m.reset_running_stats()


@contextmanager
def _mode(model: nn.Module, train: Optional[bool]) -> Iterator[None]:
    if train is None:
        yield
        return
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


def _default_forward(model: nn.Module, x: Any) -> Tensor:
    return model(x)


class PickInfo(NamedTuple):
    """What the last :meth:`OnlineBatchSelector.select` picked.

    Attributes:
        positions: int64 ``[n_b]`` rows of the candidate batch, best first (``None`` in global
            distributed mode, where picks may come from other ranks; see ``global_rows``).
        scores: float32 ``[n_b]`` scores of the picks (``None`` for unscored uniform).
        keys: float32 ``[n_b]`` the selection keys (scores, ``score/T + Gumbel``, or uniform).
        valid: bool ``[n_b]``, False for picks that were not eligible (see ``invalid=``).
        global_rows: int64 ``[n_b]`` ``rank * n_B + row`` (global mode only, else None).
    """

    positions: Optional[Tensor]
    scores: Optional[Tensor]
    keys: Tensor
    valid: Tensor
    global_rows: Optional[Tensor]


# ---------------------------------------------------------------------------- selector
class OnlineBatchSelector:
    """Pick the ``n_b`` most useful examples of each candidate batch of ``n_B``.

    Args:
        model: the model being trained; it scores the candidates (``forward(model, x)`` gives
            logits ``[n_B, V]``, or ``[n_B, T, V]`` for sequences; with ``head`` the hidden
            states before the head instead).
        irreducible: where the irreducible loss comes from: an :class:`IrreducibleLossStore`
            (looked up by the batch's dataset indices -- the usual, cheap way; for sequences it
            holds one value per sequence, e.g. the IL model's mean token loss, used for every
            token), a :class:`TokenLossStore` (sequences: the reference model's per-token loss,
            ``[n_B, T]`` gathered by index), an ``nn.Module`` IL model (run on every candidate
            batch under ``no_grad`` in eval mode; per-token loss for sequences), or None for
            methods that do not read it.
        method: one of :data:`SELECTOR_METHODS` (``reducible`` = RHO-LOSS).
        ratio: ``n_b / n_B`` (default 0.1: 32 of 320, the paper's setting).  ``n_b`` is
            ``ratio * n_B`` to the nearest integer, halves up, at least 1 (0.1 of 35 -> 4): the
            rule of ``rho_kernels.tokens.kept_count``, shared with ``select_mask`` and
            ``selective_cross_entropy``.  ``k`` overrides it with a fixed count.
        temperature: None for deterministic top-k; a float ``T`` or a schedule ``step -> T``
            for Boltzmann sampling without replacement (Gumbel-top-k on ``score / T``).
        score_mode: the model's mode while scoring.  ``"train"`` (default, as in the paper):
            dropout is active and BatchNorm normalises with the candidate batch's statistics.
            ``"eval"``: running statistics are used, dropout is off (deterministic scores; the
            scores then differ from the training-mode loss the step will see).  ``"current"``:
            leave the mode as the caller set it.  The mode is restored after scoring.
        restore_buffers: scoring leaves no trace on the model (default True): the running
            statistics and ``num_batches_tracked`` of every BatchNorm/InstanceNorm layer are put
            back after a train-mode scoring pass (a device copy of those buffers, no sync), so a
            model in ``eval()`` is not changed by ``select``.  ``False`` keeps the paper code's
            side effect: the scoring pass also updates the running statistics with the large
            candidate batch.  Other buffers a custom module changes in ``forward`` are not
            restored.
        forward: ``forward(model, x) -> logits``, for models that need more than ``model(x)``
            (with ``head``: ``-> hidden states``).
        il_forward: the same for an IL model (default: ``forward``).
        head: score from hidden states and the output layer without materialising the logits:
            ``head(model)`` returns the layer, an ``nn.Linear`` ``V x D`` (weight and bias) or a
            ``[V, D]`` weight tensor (e.g. tied embeddings: ``lambda m: m.embed.weight``); it is
            applied to the IL model too when that is an ``nn.Module``.  ``forward`` then returns
            hidden states ``[n_B, D]`` (targets ``[n_B]``) or ``[n_B, T, D]`` (targets
            ``[n_B, T]``), and the scores come from :func:`rho_kernels.linear_score`: the logits
            exist one ``[chunk, V]`` block at a time.  The head is cast to the hidden states'
            dtype when they differ (bf16 hidden states under autocast), as autocast casts it.
        chunk_size: rows (tokens) per logits block with ``head`` (None: from the op's memory
            budget, ``rho_kernels.linear.CHUNK_BUDGET_BYTES``).
        autocast_dtype: run the scoring forward passes under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16``); None uses whatever autocast the caller is in.  The
            op accepts bf16/fp16 logits and accumulates in float32.
        ignore_index: targets equal to it are never picked while other rows remain.
        invalid: what to do when a pick is not valid -- fewer than ``n_b`` eligible rows
            (NaN scores, e.g. never-scored IL; ignored targets).  ``"raise"`` (default):
            ValueError (costs one device->host sync per step to read the flag); ``"drop"``:
            return only the valid picks (a sync, and a smaller batch); ``"keep"``: return the
            full ``n_b`` rows anyway (no sync; ``last.valid`` and the ``invalid_picks``
            statistic tell).  Invalid rows always rank after every valid one, so they are
            picked only when the batch has fewer than ``n_b`` eligible rows.
        distributed: None or ``"local"`` (select per rank) or ``"global"`` (exact global top-k
            over all ranks, balanced so each rank steps on ``n_b`` rows; see
            :mod:`rho_kernels.training.distributed`).
        process_group: the group for ``"global"`` (default: the world).
        generator: RNG for ``uniform`` and Boltzmann sampling (on the scores' device).
        score_uniform: for ``uniform``, still run the scoring pass so that the score
            statistics are recorded (off by default: uniform needs no forward pass).
        score_method: for ``uniform``, the method whose scores are recorded (default
            ``"loss"``; ``"reducible"`` needs an IL source).
        backend: the op backend (``"auto"``).

    Batches are tuples ``(index, x, y)`` (``index`` = dataset indices, needed with a store) or
    ``(x, y)``; ``x`` may be a tensor or a nested tuple/list/dict.  Every tensor must have ``n_B``
    rows (ValueError naming the field otherwise); lists/tuples of ``n_B`` plain per-example values
    (e.g. file names) are picked from like tensors (costs one copy of the picked positions to the
    host); other values pass through unchanged.

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` carry the step (temperature
    schedule), the statistics and the ``generator``'s state.  With ``generator=None`` the
    global RNG is used, which your checkpoint must save itself (``torch.get_rng_state()``).
    """

    def __init__(
        self,
        model: nn.Module,
        irreducible: Union[IrreducibleLossStore, nn.Module, None] = None,
        method: str = "reducible",
        ratio: float = 0.1,
        *,
        k: Optional[int] = None,
        temperature: Temperature = None,
        score_mode: str = "train",
        restore_buffers: bool = True,
        forward: Callable[[nn.Module, Any], Tensor] = _default_forward,
        il_forward: Optional[Callable[[nn.Module, Any], Tensor]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
        ignore_index: int = -100,
        invalid: str = "raise",
        distributed: Optional[str] = None,
        process_group: Optional[object] = None,
        generator: Optional[torch.Generator] = None,
        score_uniform: bool = False,
        score_method: str = "loss",
        backend: str = "auto",
        head: Optional[Head] = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        k_arg = k
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if method not in SELECTOR_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {list(SELECTOR_METHODS)}")
        if irreducible is not None and not isinstance(irreducible, (IrreducibleLossStore, TokenLossStore, nn.Module)):
            raise TypeError(
                f"irreducible must be an IrreducibleLossStore, a TokenLossStore, an nn.Module or None, "
                f"got {type(irreducible).__name__}"
            )
        if head is not None and not callable(head):
            raise TypeError(f"head must be a function model -> nn.Linear or [V, D] weight (e.g. lambda m: m.lm_head), "
                            f"got {type(head).__name__}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        needs_il = method in IL_METHODS or (method == "uniform" and score_uniform and score_method in IL_METHODS)
        if needs_il and irreducible is None:
            raise ValueError(f"method {method!r} needs an irreducible-loss store or IL model, got None")
        if k is None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        else:
            try:
                k = None if isinstance(k, bool) else operator.index(k)
            except TypeError:
                k = None
            if k is None or k < 0:
                raise ValueError(f"k must be an int >= 0, got {k_arg!r}")
        if temperature is not None and not callable(temperature):
            temperature = constant_temperature(temperature)
        if temperature is not None and method == "uniform":
            raise ValueError("temperature (Boltzmann sampling) needs a scoring method, not 'uniform'")
        if score_mode not in ("train", "eval", "current"):
            raise ValueError(f"score_mode must be 'train', 'eval' or 'current', got {score_mode!r}")
        if not isinstance(restore_buffers, bool):
            raise TypeError(f"restore_buffers must be a bool, got {restore_buffers!r}")
        if invalid not in ("raise", "drop", "keep"):
            raise ValueError(f"invalid must be 'raise', 'drop' or 'keep', got {invalid!r}")
        if distributed not in (None, "local", "global"):
            raise ValueError(f"distributed must be None, 'local' or 'global', got {distributed!r}")
        if distributed == "global" and invalid == "drop":
            raise ValueError("invalid='drop' would give ranks unequal batch sizes; use 'raise' or 'keep' with 'global'")
        if score_method not in rk.METHODS:
            raise ValueError(f"unknown score_method {score_method!r}; expected one of {list(rk.METHODS)}")
        self.model = model
        self.irreducible = irreducible
        self.method = method
        self.ratio = float(ratio)
        self.k = k
        self.temperature = temperature
        self.score_mode = score_mode
        self.restore_buffers = restore_buffers
        self.forward = forward
        self.il_forward = il_forward or forward
        self.autocast_dtype = autocast_dtype
        self.ignore_index = ignore_index
        self.invalid = invalid
        self.distributed = distributed
        self.process_group = process_group
        self.generator = generator
        self.score_uniform = score_uniform
        self.score_method = score_method
        self.backend = backend
        self.head = head
        self.chunk_size = chunk_size
        self.step = 0
        self.stats = SelectorStats()
        self.last: Optional[PickInfo] = None

    # ------------------------------------------------------------------ pieces
    def num_picks(self, n: int) -> int:
        """``n_b`` for a candidate batch of ``n`` rows."""
        if self.k is not None:
            if self.k > n:
                raise ValueError(f"k = {self.k} is larger than the candidate batch ({n} rows)")
            return self.k
        return min(n, kept_count(n, self.ratio))

    def current_temperature(self) -> Optional[float]:
        """The temperature used at the current step (None for deterministic top-k)."""
        if self.temperature is None:
            return None
        return _check_positive("temperature", self.temperature(self.step))

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def irreducible_loss(self, x: Any, y: Tensor, index: Optional[Tensor]) -> Tensor:
        """IL of the candidates, ``y``'s shape: gathered from the store or computed by the IL model."""
        src = self.irreducible
        if isinstance(src, (IrreducibleLossStore, TokenLossStore)) and index is None:
            raise ValueError("an IL store needs batches (index, x, y) with dataset indices, got (x, y)")
        if isinstance(src, IrreducibleLossStore):
            il = src.gather(torch.as_tensor(index), device=y.device)
            # Sequences: one IL per sequence, the same for each of its tokens (the mean token
            # score is then mean CE - IL).
            return il if y.dim() == 1 else il[:, None].expand(y.shape)
        if isinstance(src, TokenLossStore):
            if y.dim() != 2:
                raise ValueError(f"a TokenLossStore holds per-token losses: it needs sequence targets y [n_B, T], "
                                 f"got shape {tuple(y.shape)}")
            return src.gather(torch.as_tensor(index), length=y.shape[1], device=y.device)
        assert isinstance(src, nn.Module)
        dev = _first_tensor(x).device
        with _mode(src, False), self._autocast(dev):
            out = self.il_forward(src, x)
        return self._op_score(src, out, y, None, "loss")

    def _head(self, model: nn.Module, hidden: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(weight, bias) of ``head(model)``, in the hidden states' dtype."""
        layer = self.head(model)
        if isinstance(layer, nn.Linear):
            weight, bias = layer.weight, layer.bias
        elif isinstance(layer, Tensor):
            weight, bias = layer, None
        else:
            raise TypeError(f"head(model) must return an nn.Linear or a [V, D] weight tensor, "
                            f"got {type(layer).__name__}")
        if weight.dtype != hidden.dtype and hidden.dtype.is_floating_point:
            # What autocast does to F.linear's weight: a copy of the head in the compute dtype.
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        return weight, bias

    def _op_score(self, model: nn.Module, out: Tensor, y: Tensor, il: Optional[Tensor], method: str) -> Tensor:
        """Per-row (per-token for sequences) scores, ``y``'s shape, of the model output ``out``:
        logits, or hidden states and the model's head (never the full logits)."""
        if self.head is None:
            return rk.score(out, y, il, method=method, ignore_index=self.ignore_index, backend=self.backend)
        weight, bias = self._head(model, out)
        return linear_score(out, weight, y, il, bias=bias, method=method, ignore_index=self.ignore_index,
                            chunk_size=self.chunk_size, backend=self.backend)

    @torch.no_grad()
    def score(self, batch: Any, method: Optional[str] = None) -> Tensor:
        """Score every candidate of ``batch`` with ``method`` (default: the selector's), float32 [n_B]."""
        index, x, y = self._unpack(batch)
        return self._score(x, y, index, method or self.method)

    def _score(self, x: Any, y: Tensor, index: Optional[Tensor], method: str) -> Tensor:
        il = self.irreducible_loss(x, y, index) if method in IL_METHODS else None
        if method == "irreducible":
            # -IL needs no forward pass of the model; the op masks ignored targets.
            logits = il.new_zeros((1,) * (y.dim() + 1)).expand(*y.shape, 1)
            tok = rk.score(logits, torch.where(y == self.ignore_index, y, torch.zeros_like(y)), il,
                           method="irreducible", ignore_index=self.ignore_index, backend=self.backend)
            return self._per_candidate(tok, y)
        train = {"train": True, "eval": False, "current": None}[self.score_mode]
        dev = _first_tensor(x).device
        restore = self.restore_buffers and self.score_mode != "eval"
        with torch.no_grad(), _restore_norm_buffers(self.model, restore), _mode(self.model, train), \
                self._autocast(dev):
            out = self.forward(self.model, x)
        return self._per_candidate(self._op_score(self.model, out, y, il, method), y)

    def _per_candidate(self, tok: Tensor, y: Tensor) -> Tensor:
        """Rows: the scores as they are.  Sequences: the mean token score over the non-ignored
        tokens, as ``select_sequences`` computes it (float64 sum; NaN without such tokens)."""
        if y.dim() == 1:
            return tok
        return sequence_means(tok, y != self.ignore_index)[0]

    @staticmethod
    def _unpack(batch: Any) -> tuple[Optional[Tensor], Any, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("a batch must be a tuple (index, x, y) or (x, y)")
        if len(batch) == 3:
            index, x, y = batch
        else:
            index, (x, y) = None, batch
        if not isinstance(y, Tensor) or y.dim() not in (1, 2):
            raise ValueError(f"targets y must be [n_B] (examples) or [n_B, T] (sequences), "
                             f"got {getattr(y, 'shape', type(y).__name__)}")
        return index, x, y

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def select(self, batch: Any, *, noisy: Optional[Tensor] = None) -> Any:
        """Score ``batch`` (``n_B`` candidates) and return the picked ``n_b`` rows.

        Args:
            batch: ``(index, x, y)`` or ``(x, y)``.
            noisy: optional bool ``[n_B]`` marking examples known to be mislabelled; feeds the
                ``noisy_pick_fraction`` statistic only.

        Returns:
            the batch restricted to the picks (same structure, best first).  Details of the
            picks are in :attr:`last`; running statistics in :attr:`stats`.
        """
        index, x, y = self._unpack(batch)
        n = y.shape[0]
        _check_rows(batch, n)
        k = self.num_picks(n)
        dev = y.device
        eligible = y != self.ignore_index
        if y.dim() == 2:  # a sequence counts when it has a non-ignored token
            eligible = eligible.any(1)
        if noisy is not None:
            noisy = torch.as_tensor(noisy, device=dev).to(torch.bool)
            if noisy.shape != (n,):
                raise ValueError(f"noisy must be a bool mask of shape ({n},), got {tuple(noisy.shape)}")

        scores: Optional[Tensor] = None
        if self.method == "uniform":
            if self.score_uniform:
                scores = self._score(x, y, index, self.score_method)
            keys = torch.rand(n, generator=self.generator, device=dev)
        else:
            scores = self._score(x, y, index, self.method)
            temp = self.current_temperature()
            if temp is None:
                keys = scores
            else:
                u = torch.rand(n, generator=self.generator, device=dev)
                gumbel = -torch.log(-torch.log(u))
                keys = scores / temp + gumbel  # NaN scores stay NaN: ineligible

        if self.distributed == "global" and world_info(self.process_group)[1] > 1:
            sub, info, all_valid_t = self._select_global(batch, keys, scores, eligible, noisy, k)
        else:
            sel = topk_by_key(keys, k, eligible, backend=self.backend)
            pos = sel.indices
            picked_scores = scores.index_select(0, pos) if scores is not None else None
            info = PickInfo(pos, picked_scores, sel.scores, sel.valid, None)
            won = torch.zeros(n, dtype=torch.bool, device=dev)
            won[pos] = True
            sub = None
            all_valid_t = sel.valid.all()
            picked_noisy = noisy.index_select(0, pos) if noisy is not None else None
            self._record(info, scores, won, n, noisy, picked_noisy)

        self.last = info
        self.step += 1
        if self.invalid != "keep":  # ("drop" is refused in global mode: unequal batches)
            # the documented per-step sync; in global mode the flag covers all ranks' winners so
            # that every rank raises (or not) together instead of leaving the others hanging
            if not bool(all_valid_t):
                if self.invalid == "raise":
                    raise ValueError(self._invalid_message(info, y, k))
                keep = info.valid.nonzero().reshape(-1)
                info = PickInfo(
                    info.positions.index_select(0, keep) if info.positions is not None else None,
                    info.scores.index_select(0, keep) if info.scores is not None else None,
                    info.keys.index_select(0, keep), info.valid.index_select(0, keep),
                    info.global_rows.index_select(0, keep) if info.global_rows is not None else None,
                )
                self.last = info
                if sub is not None:
                    return _take(sub, keep, k)
        if sub is not None:
            return sub
        return _take(batch, info.positions, n)

    def _invalid_message(self, info: PickInfo, y: Tensor, k: int) -> str:
        """Why picks were ineligible, with the fix that matches the cause (reads the flags: the
        documented sync of invalid="raise")."""
        bad = ~info.valid
        head = f"{int(bad.sum())} of this rank's {k} picks are not eligible: the candidates have fewer eligible rows than picks"
        tail = "; or pass invalid='drop' (smaller batch) / invalid='keep' (pick them anyway)"
        if info.positions is None:  # global mode: the picks may be other ranks' rows
            return (f"{head} (ignored targets, y == ignore_index={self.ignore_index}, or NaN scores). "
                    f"Check the targets and the irreducible loss{tail}")
        bad_pos = info.positions[bad]
        ign = y.index_select(0, bad_pos) == self.ignore_index
        ignored = int((ign if y.dim() == 1 else ign.all(1)).sum())
        nan = int(bad_pos.numel()) - ignored
        causes, fixes = [], []
        if ignored:
            causes.append(f"{ignored} with an ignored target (y == ignore_index={self.ignore_index})")
            fixes.append("pick fewer rows (ratio/k) or leave examples without a label out of the candidates")
        if nan:
            causes.append(f"{nan} with a NaN score")
            scored = self.score_method if self.method == "uniform" else self.method
            if scored in IL_METHODS:
                fixes.append("a NaN irreducible loss marks an example the IL store never scored (or stored as "
                             "never-selectable): fix the IL store, or check the model's logits for NaN")
            else:
                fixes.append("the model's logits are NaN for those examples")
        return f"{head} ({', '.join(causes)}). Fix: {'; '.join(fixes)}{tail}"

    # ------------------------------------------------------------------ checkpointing, repr
    def state_dict(self) -> dict[str, Any]:
        """The selector's progress, for a checkpoint: step (temperature schedule), statistics and
        the generator's state.  Save it with ``torch.save`` next to the model's."""
        return {
            "version": 1,
            "method": self.method,
            "step": self.step,
            "stats": self.stats.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next ``select`` picks what the uninterrupted run
        would have picked (same model, data and arguments)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not an OnlineBatchSelector state dict (expected the dict state_dict() returns)")
        if state["method"] != self.method:
            raise ValueError(f"the state was saved by a selector with method={state['method']!r}, "
                             f"this one has method={self.method!r}")
        gen = state["generator"]
        if (gen is None) != (self.generator is None):
            raise ValueError(
                "the saved selector " + ("had a generator; pass generator=torch.Generator(...) to this one"
                                         if gen is not None else
                                         "used the global RNG (generator=None); create this one without a generator "
                                         "and restore torch's RNG state with your checkpoint")
            )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state 'step' must be an int >= 0, got {step!r}")
        self.stats.load_state_dict(state["stats"])
        if gen is not None:
            self.generator.set_state(gen)
        self.step = step

    def __repr__(self) -> str:
        src = self.irreducible
        if src is None:
            il = "None"
        elif isinstance(src, IrreducibleLossStore):
            il = f"IrreducibleLossStore({len(src)} examples)"
        elif isinstance(src, TokenLossStore):
            il = f"TokenLossStore({len(src)} sequences)"
        else:
            il = f"{type(src).__name__} (IL model)"
        size = f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"
        parts = [f"model={type(self.model).__name__}", f"irreducible={il}", f"method={self.method!r}", size]
        if self.temperature is not None:
            parts.append(f"temperature={self.temperature!r}")
        parts += [f"score_mode={self.score_mode!r}", f"restore_buffers={self.restore_buffers}",
                  f"invalid={self.invalid!r}"]
        if self.distributed is not None:
            parts.append(f"distributed={self.distributed!r}")
        if self.method == "uniform" and self.score_uniform:
            parts.append(f"score_method={self.score_method!r}")
        if self.head is not None:
            parts.append("head=<hidden states + LM head>" + ("" if self.chunk_size is None
                                                            else f", chunk_size={self.chunk_size}"))
        parts += [f"backend={self.backend!r}", f"step={self.step}"]
        return f"OnlineBatchSelector({', '.join(parts)})"

    def _record(self, info: PickInfo, scores: Optional[Tensor], won: Tensor, n: int,
                noisy: Optional[Tensor], picked_noisy: Optional[Tensor]) -> None:
        self.stats.update(
            picked_scores=info.scores, candidate_scores=scores, candidate_won=won,
            num_candidates=n, picked_valid=info.valid,
            picked_noisy=picked_noisy, candidate_noisy=noisy,
        )

    def _select_global(self, batch: Any, keys: Tensor, scores: Optional[Tensor], eligible: Tensor,
                       noisy: Optional[Tensor], k: int):
        n = keys.shape[0]
        leaves: list = []

        def collect(t: Tensor, path: str) -> Tensor:
            leaves.append(t)
            return t

        def refuse(v: Any, path: str) -> Any:
            raise ValueError(
                f"batch field {path} is a list of {n} per-example values: global selection moves picked "
                f"examples between ranks and can move tensors only (encode it as a tensor, or use "
                f"distributed='local')"
            )

        _map_fields(batch, n, collect, refuse)
        extra = [scores if scores is not None else torch.full_like(keys, math.nan)]
        extra.append(noisy if noisy is not None else torch.zeros(n, dtype=torch.bool, device=keys.device))
        pick = global_select(keys, k, leaves + extra, eligible=eligible, group=self.process_group,
                             backend=self.backend)
        rows = pick.rows[: len(leaves)]
        picked_scores, picked_noisy = pick.rows[len(leaves):]
        it = iter(rows)
        sub = _map_fields(batch, n, lambda t, p: next(it), lambda v, p: v)
        info = PickInfo(None, picked_scores if scores is not None else None, pick.keys, pick.valid, pick.global_rows)
        self._record(info, scores, pick.local_won, n, noisy, picked_noisy if noisy is not None else None)
        return sub, info, pick.all_valid
