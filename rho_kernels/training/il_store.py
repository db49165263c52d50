"""Irreducible-loss (IL) store: per-example holdout-model loss, computed once, looked up by index.

RHO-LOSS needs, for every training example, the loss of a small model trained on a holdout
set (the *irreducible loss*).  It is computed once before training (:meth:`build`) and then
gathered every step by the example indices of the candidate batch (:meth:`gather`), on the
training device, without a host round trip.

Never-scored examples hold NaN.  They are refused at build time (unless asked), reported by
:meth:`validate`, rejected by :meth:`gather` when checking is on, and in any case a NaN IL gives a
NaN score that :func:`rho_kernels.select` ranks after every eligible row with ``valid=False`` --
so an unscored example is never silently preferred (the paper's code sorted NaN first).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import api as rk  # the public op API only (the package imports this layer)

__all__ = [
    "IndexedDataset",
    "IrreducibleLossStore",
    "dataset_fingerprint",
    "split_halves",
]

FORMAT_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset yielding ``(x, y)`` so that it yields ``(index, x, y)``.

    The index is the position in the wrapped dataset; it is what the store is keyed by.
    A ``DataLoader`` over it (shuffled or not) gives batches ``(index[B], x[B], y[B])``, the
    batch format of :class:`~rho_kernels.training.OnlineBatchSelector`.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"IndexedDataset needs a map-style dataset, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"dataset item {index} must be a pair (x, y), got {type(item).__name__}")
        return index, item[0], item[1]


def dataset_fingerprint(labels: Tensor | np.ndarray | Sequence[int], num_examples: Optional[int] = None) -> str:
    """Fingerprint of a dataset: its size and a SHA-256 of its labels (as int64, in index order).

    Cheap to recompute from the labels alone, and changes when examples are added, removed,
    reordered (if the labels differ) or relabelled -- the cases where a saved IL table would be
    silently wrong.
    """
    if isinstance(labels, Tensor):
        arr = labels.detach().to("cpu", torch.int64).contiguous().numpy()
    else:
        arr = np.asarray(labels, dtype=np.int64)
    arr = np.ascontiguousarray(arr, dtype="<i8")
    n = arr.shape[0] if num_examples is None else int(num_examples)
    if arr.shape[0] != n:
        raise ValueError(f"labels have {arr.shape[0]} rows but num_examples = {n}")
    digest = hashlib.sha256(arr.tobytes()).hexdigest()
    return f"n={n};labels_sha256={digest}"


def split_halves(num_examples: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random split of ``range(num_examples)`` into two halves (for the no-holdout variant)."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 2:
        raise ValueError(f"num_examples must be an int >= 2, got {num_examples!r}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_examples, generator=g)
    half = num_examples // 2
    return perm[:half].sort().values, perm[half:].sort().values


def _default_forward(model: nn.Module, x: Any) -> Tensor:
    return model(x)


def _resolve_device(device: Optional[torch.device | str], model: Optional[nn.Module]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class IrreducibleLossStore:
    """Float32 irreducible loss per training example, indexed by dataset index.

    Args:
        losses: float ``[num_examples]`` tensor (NaN = never scored).  Kept as given (device,
            memory mapping); converted to float32 if needed.
        fingerprint: :func:`dataset_fingerprint` of the dataset the losses belong to.
        check: default for :meth:`gather`'s index/NaN check.  ``None`` (default) checks where
            it is free of a device sync (CPU tables and indices, eager mode) and skips it on GPU,
            where reading the values would stall the stream; ``True`` always checks (one host
            sync per gather on GPU); ``False`` never checks (out-of-range indices then fail in
            ``index_select`` -- an ``IndexError`` on CPU, a device-side assert on GPU -- and NaN
            entries only become ineligible rows in :func:`rho_kernels.select`).

    Build with :meth:`build` (or :meth:`build_no_holdout`), persist with :meth:`save` /
    :meth:`load`.
    """

    def __init__(self, losses: Tensor, fingerprint: Optional[str] = None, *, check: Optional[bool] = None) -> None:
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
        if losses.dim() != 1:
            raise ValueError(f"losses must be 1-D [num_examples], got shape {tuple(losses.shape)}")
        if not losses.dtype.is_floating_point:
            raise TypeError(f"losses must be a float tensor, got dtype {losses.dtype}")
        if check is not None and not isinstance(check, bool):
            raise TypeError(f"check must be None or a bool, got {check!r}")
        self.losses = losses if losses.dtype == torch.float32 else losses.to(torch.float32)
        self.fingerprint = fingerprint
        self.check = check

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.losses.shape[0]

    @property
    def num_examples(self) -> int:
        return self.losses.shape[0]

    @property
    def device(self) -> torch.device:
        return self.losses.device

    def to(self, device: torch.device | str) -> "IrreducibleLossStore":
        """The store on ``device`` (a copy; e.g. a memory-mapped table moved into GPU memory)."""
        return IrreducibleLossStore(self.losses.to(device), self.fingerprint, check=self.check)

    def __repr__(self) -> str:
        return (
            f"IrreducibleLossStore(num_examples={self.num_examples}, device={self.device}, "
            f"fingerprint={self.fingerprint!r})"
        )

    # ------------------------------------------------------------------ lookup
    def _should_check(self, check: Optional[bool], index: Tensor) -> bool:
        if check is None:
            check = self.check
        if check is None:
            compiling = torch.compiler.is_compiling()
            return (not compiling) and index.device.type == "cpu" and self.losses.device.type == "cpu"
        return check

    def gather(self, index: Tensor, *, check: Optional[bool] = None, device: Optional[torch.device | str] = None) -> Tensor:
        """IL of the examples ``index`` (int tensor of dataset indices, any shape).

        Returns float32 with ``index``'s shape on ``device`` (default: the index's device).
        With the table and ``device`` on the same device this is one ``index_select``: no host
        synchronisation.  ``check`` overrides the store's default (see the class docstring); a
        failed check raises ValueError naming the first bad index.
        """
        if not isinstance(index, Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
        out_device = torch.device(device) if device is not None else index.device
        flat = index.reshape(-1)
        if flat.device != self.losses.device:
            # A memory-mapped/host table with device indices (or vice versa): move the small
            # index tensor, never the table.
            flat = flat.to(self.losses.device, non_blocking=True)
        flat = flat.to(torch.int64)
        if self._should_check(check, flat):
            self.check_indices(flat)
        out = self.losses.index_select(0, flat).view(index.shape)
        return out.to(out_device, non_blocking=True)

    __getitem__ = gather

    def check_indices(self, index: Tensor) -> None:
        """Raise ValueError if an index is out of range or names a never-scored (NaN) example.

        Reads values on the host: on GPU this is a synchronisation, hence opt-in there.
        """
        flat = index.reshape(-1).to(self.losses.device, torch.int64)
        n = self.num_examples
        bad = (flat < 0) | (flat >= n)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"index {int(flat[i])} (position {i}) is out of range for an IL store of {n} examples")
        vals = self.losses.index_select(0, flat)
        nan = torch.isnan(vals)
        if bool(nan.any()):
            i = int(nan.nonzero()[0, 0])
            raise ValueError(
                f"example {int(flat[i])} (position {i}) has no irreducible loss (NaN: never scored); "
                f"{int(nan.sum())} of {flat.numel()} requested examples are unscored"
            )

    def missing(self) -> Tensor:
        """Dataset indices whose IL is NaN (never scored), int64 on the store's device."""
        return torch.isnan(self.losses).nonzero().reshape(-1)

    def validate(self, labels: Optional[Tensor | np.ndarray | Sequence[int]] = None, *, allow_missing: bool = False) -> None:
        """Check the whole table once (one host sync): no NaN entries unless ``allow_missing``,
        no ``+/-inf``, and the fingerprint matches ``labels`` when given.  Raises ValueError."""
        miss = self.missing()
        if miss.numel() and not allow_missing:
            first = miss[:5].tolist()
            raise ValueError(
                f"{miss.numel()} of {self.num_examples} examples were never scored (NaN IL), "
                f"e.g. indices {first}; score them or pass allow_missing=True"
            )
        inf = torch.isinf(self.losses)
        if bool(inf.any()):
            i = int(inf.nonzero()[0, 0])
            raise ValueError(f"example {i} has an infinite irreducible loss ({float(self.losses[i])})")
        if labels is not None:
            self.check_fingerprint(labels)

    def check_fingerprint(self, labels: Tensor | np.ndarray | Sequence[int]) -> None:
        """Raise ValueError unless ``labels`` (the dataset's labels in index order) match."""
        fp = dataset_fingerprint(labels)
        if self.fingerprint is None:
            raise ValueError("this IL store has no fingerprint to check against")
        if fp != self.fingerprint:
            raise ValueError(
                f"dataset fingerprint mismatch: the store was built for {self.fingerprint!r}, "
                f"the given labels give {fp!r} (different size, order or labels)"
            )

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        il_model: nn.Module,
        dataset: Union[Dataset, DataLoader, Iterable],
        *,
        num_examples: Optional[int] = None,
        batch_size: int = 1024,
        device: Optional[torch.device | str] = None,
        forward: Callable[[nn.Module, Any], Tensor] = _default_forward,
        ignore_index: int = -100,
        autocast_dtype: Optional[torch.dtype] = None,
        allow_missing: bool = False,
        progress: bool = True,
        num_workers: int = 0,
        desc: str = "irreducible loss",
    ) -> "IrreducibleLossStore":
        """Score every example once with ``il_model`` (eval mode, ``no_grad``) and store its CE.

        Args:
            il_model: the holdout-trained model; ``forward(il_model, x)`` gives logits ``[B, V]``.
            dataset: a map-style dataset yielding ``(index, x, y)`` (wrap an ``(x, y)`` dataset
                in :class:`IndexedDataset`), or a ready DataLoader / iterable of such batches.
            num_examples: size of the table (default ``len(dataset)``).
            batch_size: batch size of the scoring pass (ignored for a DataLoader).
            device: where to run the model and keep the table (default: the model's device).
            autocast_dtype: run the forward under ``torch.autocast`` with this dtype.
            allow_missing: keep NaN for examples the pass did not reach instead of raising.
            progress: show a tqdm progress bar (when tqdm is installed).

        The CE is computed by ``rho_kernels.score(method="loss")`` (float32 accumulation).  The
        fingerprint is taken from the labels seen in the pass.
        """
        losses, labels, seen = cls._scoring_pass(
            il_model, dataset, num_examples=num_examples, batch_size=batch_size, device=device, forward=forward,
            ignore_index=ignore_index, autocast_dtype=autocast_dtype, progress=progress, num_workers=num_workers,
            desc=desc)
        store = cls(losses, dataset_fingerprint(labels) if bool(seen.all()) else None)
        if not allow_missing:
            store.validate()
        return store

    @staticmethod
    @torch.no_grad()
    def _scoring_pass(il_model, dataset, *, num_examples, batch_size, device, forward, ignore_index,
                      autocast_dtype, progress, num_workers, desc):
        """One pass: (losses with NaN for unseen examples, labels, seen mask)."""
        if isinstance(dataset, DataLoader) or not hasattr(dataset, "__getitem__"):
            loader: Iterable = dataset
        else:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        if num_examples is None:
            try:
                num_examples = len(dataset) if not isinstance(dataset, DataLoader) else len(dataset.dataset)  # type: ignore[arg-type]
            except TypeError as exc:
                raise ValueError("num_examples is required for a dataset without len()") from exc
        dev = _resolve_device(device, il_model)
        losses = torch.full((num_examples,), float("nan"), dtype=torch.float32, device=dev)
        labels = torch.full((num_examples,), -1, dtype=torch.int64, device=dev)
        seen = torch.zeros((num_examples,), dtype=torch.bool, device=dev)
        total = None
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            pass
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no progress bar without it
            def tqdm(it, **_kw):  # type: ignore[no-redef]
                return it

        was_training = il_model.training
        il_model.eval()  # the IL model is fixed: no dropout, BatchNorm running statistics
        try:
            for batch in tqdm(loader, total=total, disable=not progress, desc=desc, leave=False):
                if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                    raise ValueError(
                        "IL store batches must be (index, x, y); wrap an (x, y) dataset in IndexedDataset"
                    )
                idx, x, y = batch
                idx = torch.as_tensor(idx).to(dev, torch.int64)
                x = _to_device(x, dev)
                y = torch.as_tensor(y).to(dev)
                with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = forward(il_model, x)
                ce = rk.score(logits, y, method="loss", ignore_index=ignore_index)
                if ce.dim() != 1:
                    raise ValueError(f"IL model must give one row per example, got scores of shape {tuple(ce.shape)}")
                bad = (idx < 0) | (idx >= num_examples)
                if bool(bad.any()):  # a one-off pass: a sync per batch is fine here
                    i = int(bad.nonzero()[0, 0])
                    raise ValueError(f"dataset index {int(idx[i])} is out of range for num_examples = {num_examples}")
                losses.index_copy_(0, idx, ce)
                labels.index_copy_(0, idx, y.to(torch.int64))
                seen.index_fill_(0, idx, True)
        finally:
            il_model.train(was_training)
        return losses, labels, seen

    @classmethod
    def build_no_holdout(
        cls,
        il_models: tuple[nn.Module, nn.Module],
        dataset: Dataset,
        halves: tuple[Tensor | Sequence[int], Tensor | Sequence[int]],
        **build_kwargs: Any,
    ) -> "IrreducibleLossStore":
        """The paper's no-holdout variant: ``il_models[0]`` was trained on ``halves[0]`` and
        scores ``halves[1]``; ``il_models[1]`` was trained on ``halves[1]`` and scores ``halves[0]``.

        ``dataset`` yields ``(index, x, y)`` with the full-dataset index (e.g. an
        :class:`IndexedDataset`); the halves must be disjoint and cover it (see
        :func:`split_halves`).  Other keyword arguments go to :meth:`build`.
        """
        a, b = (torch.as_tensor(h, dtype=torch.int64).reshape(-1) for h in halves)
        n = len(dataset)  # type: ignore[arg-type]
        both = torch.cat([a, b])
        if both.numel() and (int(both.min()) < 0 or int(both.max()) >= n):
            raise ValueError(f"halves contain indices outside [0, {n})")
        counts = torch.bincount(both, minlength=n)
        if bool((counts != 1).any()):
            i = int((counts != 1).nonzero()[0, 0])
            raise ValueError(
                f"halves must be disjoint and cover all {n} examples; index {i} appears {int(counts[i])} times"
            )
        build_kwargs = dict(build_kwargs)
        build_kwargs.pop("allow_missing", None)
        desc = build_kwargs.pop("desc", "irreducible loss")
        l1, y1, _ = cls._pass_with_defaults(il_models[0], Subset(dataset, b.tolist()), n, f"{desc} (half 2)", build_kwargs)
        l0, y0, seen0 = cls._pass_with_defaults(il_models[1], Subset(dataset, a.tolist()), n, f"{desc} (half 1)", build_kwargs)
        losses = torch.where(seen0, l0, l1.to(l0.device))
        labels = torch.where(seen0, y0, y1.to(y0.device))
        store = cls(losses, dataset_fingerprint(labels))
        store.validate()
        return store

    @classmethod
    def _pass_with_defaults(cls, model, dataset, n, desc, kwargs):
        opts = dict(batch_size=1024, device=None, forward=_default_forward, ignore_index=-100,
                    autocast_dtype=None, progress=True, num_workers=0)
        unknown = set(kwargs) - set(opts)
        if unknown:
            raise TypeError(f"unexpected build arguments {sorted(unknown)}")
        opts.update(kwargs)
        return cls._scoring_pass(model, dataset, num_examples=n, desc=desc, **opts)

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def _format(path: str, fmt: Optional[str]) -> str:
        if fmt is None:
            ext = os.path.splitext(path)[1].lower()
            fmt = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".npy": "npy"}.get(ext)
            if fmt is None:
                raise ValueError(f"cannot infer the format of {path!r}: use .safetensors, .pt or .npy, or pass format=")
        if fmt not in ("safetensors", "torch", "npy"):
            raise ValueError(f"unknown format {fmt!r}; expected 'safetensors', 'torch' or 'npy'")
        return fmt

    def save(self, path: PathLike, *, format: Optional[str] = None) -> None:
        """Write the table and its fingerprint.

        Formats (inferred from the suffix): ``.safetensors`` (metadata in the header), ``.pt``
        (``torch.save`` of a dict), ``.npy`` (a raw little-endian float32 array that
        :meth:`load` can memory-map, plus ``<path>.json`` holding the fingerprint).
        """
        path = os.fspath(path)
        fmt = self._format(path, format)
        losses = self.losses.detach().to("cpu").contiguous()
        meta = {"format_version": str(FORMAT_VERSION), "fingerprint": self.fingerprint or "",
                "num_examples": str(self.num_examples)}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({"irreducible_loss": losses}, path, metadata=meta)
        elif fmt == "torch":
            torch.save({"irreducible_loss": losses, **meta}, path)
        else:
            np.save(path, losses.numpy().astype("<f4"), allow_pickle=False)
            with open(path + ".json", "w") as f:
                json.dump(meta, f)

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        labels: Optional[Tensor | np.ndarray | Sequence[int]] = None,
        fingerprint: Optional[str] = None,
        device: torch.device | str = "cpu",
        mmap: bool = False,
        format: Optional[str] = None,
        check: Optional[bool] = None,
    ) -> "IrreducibleLossStore":
        """Read a saved store; verify it against the dataset when ``labels`` or ``fingerprint``
        is given (ValueError on mismatch -- an IL table of another dataset must not be used).

        ``mmap=True`` memory-maps the table instead of reading it (``.npy`` and ``.pt``; the
        store then stays on the host and :meth:`gather` moves only the gathered values to the
        index's device).  ``device`` is ignored with ``mmap=True``.
        """
        path = os.fspath(path)
        fmt = cls._format(path, format)
        if fmt == "safetensors":
            if mmap:
                raise ValueError("mmap=True needs the .npy or .pt format")
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                losses = f.get_tensor("irreducible_loss")
        elif fmt == "torch":
            obj = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
            losses = obj["irreducible_loss"]
            meta = {k: v for k, v in obj.items() if k != "irreducible_loss"}
        else:
            # mmap_mode "c" (copy-on-write) so torch.from_numpy gets a writable view and the
            # file itself is never modified.
            arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
            losses = torch.from_numpy(arr)
            meta_path = path + ".json"
            meta = {}
            if os.path.exists(meta_path):
                with open(meta_path) as f:
                    meta = json.load(f)
        if int(meta.get("num_examples", losses.shape[0])) != losses.shape[0]:
            raise ValueError(f"{path!r} is corrupt: header says {meta['num_examples']} examples, table has {losses.shape[0]}")
        store = cls(losses if mmap else losses.to(device), meta.get("fingerprint") or None, check=check)
        if fingerprint is not None and fingerprint != store.fingerprint:
            raise ValueError(
                f"dataset fingerprint mismatch: {path!r} was built for {store.fingerprint!r}, expected {fingerprint!r}"
            )
        if labels is not None:
            store.check_fingerprint(labels)
        return store
