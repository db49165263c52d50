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
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import api as rk  # the public op API only (the package imports this layer)

from .distributed import global_select, topk_by_key, world_info
from .il_store import IrreducibleLossStore

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
        if self._acc is None or self._acc.device != device:
            self._acc = torch.zeros(len(self._FIELDS), dtype=torch.float64, device=device)
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

    def summary(self) -> dict[str, float]:
        """``steps``, ``mean_score_picked``, ``mean_score_not_picked``, ``noisy_pick_fraction``
        (picked rows that were marked noisy), ``noisy_candidate_fraction`` (the base rate among
        candidates), ``invalid_picks`` (total), ``picks``.  NaN where nothing was recorded."""
        out: dict[str, float] = {"steps": float(self.steps)}
        a = dict.fromkeys(self._FIELDS, 0.0) if self._acc is None else dict(zip(self._FIELDS, self._acc.tolist()))
        a.update(self._host)

        def ratio(x: float, y: float) -> float:
            return x / y if y > 0 else math.nan

        out["mean_score_picked"] = ratio(a["picked_sum"], a["picked_n"])
        out["mean_score_not_picked"] = ratio(a["unpicked_sum"], a["unpicked_n"])
        out["noisy_pick_fraction"] = ratio(a["noisy_picks"], a["noisy_known_picks"])
        out["noisy_candidate_fraction"] = ratio(a["noisy_candidates"], a["noisy_known_candidates"])
        out["invalid_picks"] = a["invalid_picks"]
        out["picks"] = a["picks"]
        return out


# ---------------------------------------------------------------------------- batch helpers
def _take(obj: Any, pos: Tensor) -> Any:
    """Rows ``pos`` of every tensor in a (nested tuple/list/dict of) batch element(s)."""
    if isinstance(obj, Tensor):
        return obj.index_select(0, pos.to(obj.device))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_take(o, pos) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(o, pos) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, pos) for k, v in obj.items()}
    raise TypeError(f"batch elements must be tensors (or tuples/lists/dicts of tensors), got {type(obj).__name__}")


def _flatten(obj: Any, out: list) -> Callable[[Iterator[Tensor]], Any]:
    """Collect the tensors of ``obj`` into ``out``; return a rebuilder taking new tensors."""
    if isinstance(obj, Tensor):
        out.append(obj)
        return lambda it: next(it)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        subs = [_flatten(o, out) for o in obj]
        return lambda it: type(obj)(*(s(it) for s in subs))
    if isinstance(obj, (tuple, list)):
        subs = [_flatten(o, out) for o in obj]
        return lambda it: type(obj)(s(it) for s in subs)
    if isinstance(obj, dict):
        keys = list(obj)
        subs = [_flatten(obj[k], out) for k in keys]
        return lambda it: {k: s(it) for k, s in zip(keys, subs)}
    raise TypeError(f"batch elements must be tensors (or tuples/lists/dicts of tensors), got {type(obj).__name__}")


def _first_tensor(obj: Any) -> Tensor:
    leaves: list = []
    _flatten(obj, leaves)
    if not leaves:
        raise ValueError("the batch's inputs contain no tensor")
    return leaves[0]


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
    """Pick the ``n_b = ratio * n_B`` most useful examples of each candidate batch.

    Args:
        model: the model being trained; it scores the candidates (``forward(model, x)`` gives
            logits ``[n_B, V]``).
        irreducible: where the irreducible loss comes from: an :class:`IrreducibleLossStore`
            (looked up by the batch's dataset indices -- the usual, cheap way), an ``nn.Module``
            IL model (run on every candidate batch under ``no_grad`` in eval mode), or None for
            methods that do not read it.
        method: one of :data:`SELECTOR_METHODS` (``reducible`` = RHO-LOSS).
        ratio: ``n_b / n_B`` (default 0.1: 32 of 320, the paper's setting); ``k`` overrides it
            with a fixed count.
        temperature: None for deterministic top-k; a float ``T`` or a schedule ``step -> T``
            for Boltzmann sampling without replacement (Gumbel-top-k on ``score / T``).
        score_mode: the model's mode while scoring.  ``"train"`` (default, as in the paper):
            dropout is active and BatchNorm normalises with the candidate batch's statistics
            and *updates its running statistics* with the large batch.  ``"eval"``: running
            statistics are used and left untouched, dropout is off (deterministic scores; the
            scores then differ from the training-mode loss the step will see).  ``"current"``:
            leave the mode as the caller set it.  The mode is restored after scoring.
        forward: ``forward(model, x) -> logits``, for models that need more than ``model(x)``.
        il_forward: the same for an IL model (default: ``forward``).
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
    ``(x, y)``; ``x`` may be a tensor or a tuple/list/dict of tensors with ``n_B`` rows.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if method not in SELECTOR_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {list(SELECTOR_METHODS)}")
        if irreducible is not None and not isinstance(irreducible, (IrreducibleLossStore, nn.Module)):
            raise TypeError(
                f"irreducible must be an IrreducibleLossStore, an nn.Module or None, got {type(irreducible).__name__}"
            )
        needs_il = method in IL_METHODS or (method == "uniform" and score_uniform and score_method in IL_METHODS)
        if needs_il and irreducible is None:
            raise ValueError(f"method {method!r} needs an irreducible-loss store or IL model, got None")
        if k is None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        elif isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        if temperature is not None and not callable(temperature):
            temperature = constant_temperature(temperature)
        if temperature is not None and method == "uniform":
            raise ValueError("temperature (Boltzmann sampling) needs a scoring method, not 'uniform'")
        if score_mode not in ("train", "eval", "current"):
            raise ValueError(f"score_mode must be 'train', 'eval' or 'current', got {score_mode!r}")
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
        return min(n, max(1, int(round(self.ratio * n))))

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
        """IL of the candidates: gathered from the store or computed by the IL model."""
        src = self.irreducible
        if isinstance(src, IrreducibleLossStore):
            if index is None:
                raise ValueError("an IL store needs batches (index, x, y) with dataset indices")
            return src.gather(torch.as_tensor(index), device=y.device)
        assert isinstance(src, nn.Module)
        dev = _first_tensor(x).device
        with _mode(src, False), self._autocast(dev):
            il_logits = self.il_forward(src, x)
        return rk.score(il_logits, y, method="loss", ignore_index=self.ignore_index, backend=self.backend)

    @torch.no_grad()
    def score(self, batch: Any, method: Optional[str] = None) -> Tensor:
        """Score every candidate of ``batch`` with ``method`` (default: the selector's), float32 [n_B]."""
        index, x, y = self._unpack(batch)
        return self._score(x, y, index, method or self.method)

    def _score(self, x: Any, y: Tensor, index: Optional[Tensor], method: str) -> Tensor:
        il = self.irreducible_loss(x, y, index) if method in IL_METHODS else None
        if method == "irreducible":
            # -IL needs no forward pass of the model; the op masks ignored targets.
            logits = il.new_zeros((1, 1)).expand(y.shape[0], 1)
            return rk.score(logits, torch.where(y == self.ignore_index, y, torch.zeros_like(y)), il,
                            method="irreducible", ignore_index=self.ignore_index, backend=self.backend)
        train = {"train": True, "eval": False, "current": None}[self.score_mode]
        dev = _first_tensor(x).device
        with torch.no_grad(), _mode(self.model, train), self._autocast(dev):
            logits = self.forward(self.model, x)
        return rk.score(logits, y, il, method=method, ignore_index=self.ignore_index, backend=self.backend)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Optional[Tensor], Any, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("a batch must be a tuple (index, x, y) or (x, y)")
        if len(batch) == 3:
            index, x, y = batch
        else:
            index, (x, y) = None, batch
        if not isinstance(y, Tensor) or y.dim() != 1:
            raise ValueError(f"targets y must be a 1-D tensor [n_B], got {getattr(y, 'shape', type(y).__name__)}")
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
        k = self.num_picks(n)
        dev = y.device
        eligible = y != self.ignore_index
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
                bad = int((~info.valid).sum())
                if self.invalid == "raise":
                    raise ValueError(
                        f"picks are not eligible ({bad} of this rank's {k}; NaN score -- e.g. never-scored "
                        f"irreducible loss -- or ignored target): the candidates have fewer eligible rows "
                        f"than picks. "
                        f"Fix the IL store, or pass invalid='drop'/'keep'"
                    )
                keep = info.valid.nonzero().reshape(-1)
                info = PickInfo(
                    info.positions.index_select(0, keep) if info.positions is not None else None,
                    info.scores.index_select(0, keep) if info.scores is not None else None,
                    info.keys.index_select(0, keep), info.valid.index_select(0, keep),
                    info.global_rows.index_select(0, keep) if info.global_rows is not None else None,
                )
                self.last = info
                if sub is not None:
                    return _take(sub, keep)
        if sub is not None:
            return sub
        return _take(batch, info.positions)

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
        rebuild = _flatten(batch, leaves)
        extra = [scores if scores is not None else torch.full_like(keys, math.nan)]
        extra.append(noisy if noisy is not None else torch.zeros(n, dtype=torch.bool, device=keys.device))
        for leaf in leaves:
            if leaf.shape[:1] != (n,):
                raise ValueError(f"every batch tensor needs {n} rows for global selection, got shape {tuple(leaf.shape)}")
        pick = global_select(keys, k, leaves + extra, eligible=eligible, group=self.process_group,
                             backend=self.backend)
        rows = pick.rows[: len(leaves)]
        picked_scores, picked_noisy = pick.rows[len(leaves):]
        sub = rebuild(iter(rows))
        info = PickInfo(None, picked_scores if scores is not None else None, pick.keys, pick.valid, pick.global_rows)
        self._record(info, scores, pick.local_won, n, noisy, picked_noisy if noisy is not None else None)
        return sub, info, pick.all_valid
