"""Irreducible-loss (IL) store: per-example holdout-model loss, computed once, looked up by index.

RHO-LOSS needs, for every training example, the loss of a small model trained on a holdout
set (the *irreducible loss*).  It is computed once before training (:meth:`build`) and then
gathered every step by the example indices of the candidate batch (:meth:`gather`), on the
training device, without a host round trip.

NaN entries are never selectable: a NaN IL gives a NaN score that :func:`rho_kernels.select`
ranks after every eligible row with ``valid=False`` (the paper's code sorted NaN first).  Two
kinds exist: examples whose label is ``ignore_index`` (stored as NaN on purpose and counted, not
an error) and examples the build never reached (refused at build time unless
``allow_missing=True``, reported by :meth:`validate`, rejected by :meth:`gather` when checking is on).

The build (:mod:`.il_build`) can be sharded over ``torch.distributed`` ranks and resumed from a
checkpoint folder; files (:mod:`.il_format`) are written atomically and checksummed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import api as rk  # the public op API only (the package imports this layer)

from .il_build import PassResult, dataset_probe, model_fingerprint, scoring_pass
from .il_format import read_table, write_table

__all__ = [
    "IndexedDataset",
    "IrreducibleLossStore",
    "dataset_fingerprint",
    "split_halves",
]

PathLike = Union[str, "os.PathLike[str]"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset yielding ``(x, y, *extra)`` so that it yields ``(index, x, y, *extra)``.

    The index is the position in the wrapped dataset; it is what the store is keyed by.
    A ``DataLoader`` over a pair dataset gives batches ``(index[B], x[B], y[B])``, the batch
    format of :class:`~rho_kernels.training.OnlineBatchSelector`; extra fields (weights, masks,
    file names) follow ``y`` and are ignored by :meth:`IrreducibleLossStore.build`.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"IndexedDataset needs a map-style dataset, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            got = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
            raise ValueError(f"dataset item {index} must be a tuple (x, y, *extra), got {got}")
        return (index, *item)


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


def as_device(device: torch.device | str | int, what: str = "device") -> torch.device:
    """``torch.device(device)``, or a ValueError that names the argument and the accepted forms
    (torch's own error for ``"gpu"`` lists twenty device types and not the argument)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}={device!r} is not a device: expected e.g. 'cpu', 'cuda', 'cuda:1' "
                         f"or a torch.device") from None


def check_index_has_values(index: Tensor, table: Tensor) -> None:
    """A meta index has no values to look up (torch's own error is a raw NotImplementedError
    about copying out of a meta tensor): say so, unless the table is on the meta device too."""
    if index.device.type == "meta" and table.device.type != "meta":
        raise ValueError(f"index is on the meta device (shape {tuple(index.shape)}, no values): a store looks up "
                         f"the examples' dataset indices, so pass them on {table.device} or a GPU")


def _resolve_device(device: Optional[torch.device | str], model: Optional[nn.Module]) -> torch.device:
    if device is not None:
        return as_device(device)
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


class _EvalNoGrad:
    """The IL model is fixed during a pass: eval mode (no dropout, BatchNorm running statistics),
    no autograd; its mode is restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _example_scorer(model: nn.Module, dev: torch.device, forward: Callable, ignore_index: int,
                    autocast_dtype: Optional[torch.dtype]) -> Callable:
    def score(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            raise ValueError("IL store batches must be (index, x, y, *extra); wrap an (x, y) dataset in IndexedDataset")
        idx, x, y = batch[0], batch[1], batch[2]
        idx = torch.as_tensor(idx).to(torch.int64)
        x = _to_device(x, dev)
        y = torch.as_tensor(y).to(dev)
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = forward(model, x)
        ce = rk.score(logits, y, method="loss", ignore_index=ignore_index)
        if ce.dim() != 1:
            raise ValueError(f"IL model must give one row per example, got scores of shape {tuple(ce.shape)}")
        # an ignored example has no loss: NaN keeps it out of every selection
        ce = torch.where(y == ignore_index, torch.full_like(ce, float("nan")), ce)
        return idx, ce[:, None], y.to(torch.int64)

    return score


class IrreducibleLossStore:
    """Float32 irreducible loss per training example, indexed by dataset index.

    Args:
        losses: float ``[num_examples]`` tensor (NaN = no IL: ignored or never scored).  Kept as
            given (device, memory mapping); converted to float32 if needed.
        fingerprint: :func:`dataset_fingerprint` of the dataset the losses belong to.
        check: default for :meth:`gather`'s index/NaN check.  ``None`` (default) checks where
            it is free of a device sync (CPU tables and indices, eager mode) and skips it on GPU,
            where reading the values would stall the stream; ``True`` always checks (one host
            sync per gather on GPU); ``False`` never checks (out-of-range indices then fail in
            ``index_select`` -- an ``IndexError`` on CPU, a device-side assert on GPU -- and NaN
            entries only become ineligible rows in :func:`rho_kernels.select`).
        num_ignored: how many NaN entries are examples whose label was ``ignore_index`` (set by
            :meth:`build`; these are expected, the other NaN entries are unscored examples).

    Build with :meth:`build` (or :meth:`build_no_holdout`), persist with :meth:`save` /
    :meth:`load`.
    """

    def __init__(self, losses: Tensor, fingerprint: Optional[str] = None, *, check: Optional[bool] = None,
                 num_ignored: int = 0) -> None:
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
        if losses.dim() != 1:
            raise ValueError(f"losses must be 1-D [num_examples], got shape {tuple(losses.shape)}")
        if not losses.dtype.is_floating_point:
            raise TypeError(f"losses must be a float tensor, got dtype {losses.dtype}")
        if check is not None and not isinstance(check, bool):
            raise TypeError(f"check must be None or a bool, got {check!r}")
        if isinstance(num_ignored, bool) or not isinstance(num_ignored, int) or num_ignored < 0:
            raise ValueError(f"num_ignored must be an int >= 0, got {num_ignored!r}")
        self.losses = losses if losses.dtype == torch.float32 else losses.to(torch.float32)
        self.fingerprint = fingerprint
        self.check = check
        self.num_ignored = num_ignored
        self._has_unscored: Optional[bool] = None  # computed on the first checked gather

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
        return IrreducibleLossStore(self.losses.to(as_device(device)), self.fingerprint, check=self.check,
                                    num_ignored=self.num_ignored)

    def __repr__(self) -> str:
        return (
            f"IrreducibleLossStore(num_examples={self.num_examples}, device={self.device}, "
            f"num_ignored={self.num_ignored}, fingerprint={self.fingerprint!r})"
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
        check_index_has_values(index, self.losses)
        out_device = as_device(device) if device is not None else index.device
        flat = index.reshape(-1)
        if flat.device != self.losses.device:
            # A memory-mapped/host table with device indices (or vice versa): move the small
            # index tensor, never the table.
            flat = flat.to(self.losses.device, non_blocking=True)
        flat = flat.to(torch.int64)
        if self._should_check(check, flat):
            self.check_indices(flat)
        out = self.losses.index_select(0, flat).view(index.shape)
        if out_device.type == "cuda" and out.device.type == "cpu":
            out = out.pin_memory()  # an asynchronous copy needs page-locked memory
        return out.to(out_device, non_blocking=True)

    __getitem__ = gather

    def check_indices(self, index: Tensor) -> None:
        """Raise ValueError if an index is out of range or names a never-scored (NaN) example.

        NaN entries pass when the store has no unscored examples (all of its NaN entries are
        ignored examples, which selection skips anyway).  Reads values on the host: on GPU this
        is a synchronisation, hence opt-in there.
        """
        flat = index.reshape(-1).to(self.losses.device, torch.int64)
        n = self.num_examples
        bad = (flat < 0) | (flat >= n)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"index {int(flat[i])} (position {i}) is out of range for an IL store of {n} examples")
        if self._has_unscored is None:
            self._has_unscored = int(torch.isnan(self.losses).sum()) > self.num_ignored
        if not self._has_unscored:
            return
        vals = self.losses.index_select(0, flat)
        nan = torch.isnan(vals)
        if bool(nan.any()):
            i = int(nan.nonzero()[0, 0])
            raise ValueError(
                f"example {int(flat[i])} (position {i}) has no irreducible loss (NaN: never scored); "
                f"{int(nan.sum())} of {flat.numel()} requested examples are unscored"
            )

    def missing(self) -> Tensor:
        """Dataset indices whose IL is NaN (never scored or ignored), int64 on the store's device."""
        return torch.isnan(self.losses).nonzero().reshape(-1)

    def validate(
        self,
        labels: Optional[Tensor | np.ndarray | Sequence[int]] = None,
        *,
        allow_missing: bool = False,
        ignore_index: int = -100,
    ) -> dict:
        """Check the whole table once (one host sync) and return its counts.

        NaN entries are either ignored examples (expected: :attr:`num_ignored` of them, or exactly
        the examples whose label is ``ignore_index`` when ``labels`` are given) or unscored ones
        (ValueError unless ``allow_missing``).  ``+/-inf`` is an error.  With ``labels`` the
        fingerprint is checked too.

        Returns ``{"num_examples", "num_ignored", "num_unscored"}``.
        """
        nan = torch.isnan(self.losses)
        if labels is not None:
            lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
            lab = lab.to(self.losses.device, torch.int64).reshape(-1)
            if lab.numel() != self.num_examples:
                raise ValueError(f"labels have {lab.numel()} entries, the store {self.num_examples}")
            ignored = lab == ignore_index
            unscored_mask = nan & ~ignored
            num_ignored = int((nan & ignored).sum())
        else:
            num_ignored = min(self.num_ignored, int(nan.sum()))
            unscored_mask = nan
        num_unscored = int(unscored_mask.sum()) - (0 if labels is not None else num_ignored)
        if num_unscored and not allow_missing:
            first = unscored_mask.nonzero().reshape(-1)[:5].tolist()
            which = f"e.g. indices {first}" if labels is not None else f"NaN indices include {first}"
            raise ValueError(
                f"{num_unscored} of {self.num_examples} examples were never scored (NaN IL) besides the "
                f"{num_ignored} ignored ones, {which}; score them or pass allow_missing=True"
            )
        inf = torch.isinf(self.losses)
        if bool(inf.any()):
            i = int(inf.nonzero()[0, 0])
            raise ValueError(f"example {i} has an infinite irreducible loss ({float(self.losses[i])})")
        if labels is not None:
            self.check_fingerprint(labels)
        return {"num_examples": self.num_examples, "num_ignored": num_ignored, "num_unscored": num_unscored}

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
        distributed: bool = False,
        group: Optional[object] = None,
        checkpoint: Optional[PathLike] = None,
        checkpoint_every: int = 100,
        mmap: bool = False,
        dataset_id: Optional[str] = None,
    ) -> "IrreducibleLossStore":
        """Score every example once with ``il_model`` (eval mode, ``no_grad``) and store its CE.

        Args:
            il_model: the holdout-trained model; ``forward(il_model, x)`` gives logits ``[B, V]``.
            dataset: a map-style dataset yielding ``(index, x, y, *extra)`` (wrap an ``(x, y)``
                dataset in :class:`IndexedDataset`), or a ready DataLoader / iterable of such
                batches (not with ``distributed`` or ``checkpoint``).
            num_examples: size of the table (default ``len(dataset)``).
            batch_size: batch size of the scoring pass (ignored for a DataLoader).
            device: where to run the model and keep the table (default: the model's device).
            ignore_index: examples with this label get NaN (never selectable) and are counted
                in :attr:`num_ignored`.
            autocast_dtype: run the forward under ``torch.autocast`` with this dtype.
            allow_missing: keep NaN for examples the pass did not reach instead of raising.
            progress: show a tqdm progress bar (when tqdm is installed).
            distributed: shard the pass over the ranks of ``group`` (``torch.distributed`` must
                be initialised; any backend).  Every rank ends with the complete table,
                bit-identical to a one-process build with the same ``batch_size``.
            checkpoint: a folder for progress (on a filesystem every rank sees).  A killed build
                started again with the same arguments resumes there; a folder of another model,
                dataset or settings is refused.  The folder is kept (delete it when done).
            checkpoint_every: batches between two checkpoints.
            mmap: leave the table memory-mapped on the checkpoint's files (needs ``checkpoint``)
                instead of reading it into memory.
            dataset_id: identity of the dataset recorded in the checkpoint (default: its length
                and a hash of 32 sampled items).  Pass your own string when items are random
                (e.g. augmented), or a resume would be refused as "another dataset".

        The CE is computed by ``rho_kernels.score(method="loss")`` (float32 accumulation).  The
        fingerprint is taken from the labels seen in the pass.
        """
        res = cls._pass(il_model, dataset, num_examples=num_examples, batch_size=batch_size, device=device,
                        forward=forward, ignore_index=ignore_index, autocast_dtype=autocast_dtype,
                        progress=progress, num_workers=num_workers, desc=desc, distributed=distributed,
                        group=group, checkpoint=checkpoint, checkpoint_every=checkpoint_every, mmap=mmap,
                        dataset_id=dataset_id)
        complete = bool(res.seen.all())
        num_ignored = int(((res.keys == ignore_index) & res.seen).sum())
        store = cls(res.values, dataset_fingerprint(res.keys) if complete else None, num_ignored=num_ignored)
        if not allow_missing:
            store.validate()
        return store

    @classmethod
    def _pass(cls, il_model: nn.Module, dataset: Any, *, num_examples: Optional[int] = None, batch_size: int = 1024,
              device: Optional[torch.device | str] = None, forward: Callable = _default_forward,
              ignore_index: int = -100, autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
              num_workers: int = 0, desc: str = "irreducible loss", distributed: bool = False,
              group: Optional[object] = None, checkpoint: Optional[PathLike] = None, checkpoint_every: int = 100,
              mmap: bool = False, dataset_id: Optional[str] = None) -> PassResult:
        dev = _resolve_device(device, il_model)
        n = cls._num_examples(dataset, num_examples)
        ckpt = os.fspath(checkpoint) if checkpoint is not None else None
        with _EvalNoGrad(il_model):
            return scoring_pass(
                dataset, _example_scorer(il_model, dev, forward, ignore_index, autocast_dtype),
                num_items=n, width=1, dtype=torch.float32, batch_size=batch_size, num_workers=num_workers,
                device=dev, checkpoint=ckpt, checkpoint_every=checkpoint_every, distributed=distributed,
                group=group, mmap=mmap, progress=progress, desc=desc,
                fingerprints=lambda: {"model": model_fingerprint(il_model),
                                      "dataset": dataset_id if dataset_id is not None else dataset_probe(dataset)},
                config={"kind": "example", "ignore_index": ignore_index, "autocast": str(autocast_dtype)},
            )

    @staticmethod
    def _num_examples(dataset: Any, num_examples: Optional[int]) -> int:
        if num_examples is not None:
            return int(num_examples)
        try:
            return len(dataset) if not isinstance(dataset, DataLoader) else len(dataset.dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError("num_examples is required for a dataset without len()") from exc

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
        :func:`split_halves`).  Other keyword arguments go to :meth:`build` (a ``checkpoint``
        folder gets one sub-folder per half).
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
        kw = dict(build_kwargs)
        for bad in ("allow_missing", "num_examples", "mmap"):
            if bad in kw:
                raise TypeError(f"build_no_holdout does not take {bad}=")
        desc = kw.pop("desc", "irreducible loss")
        ckpt = kw.pop("checkpoint", None)
        ignore_index = kw.get("ignore_index", -100)
        res = []
        for model, half, name in ((il_models[0], b, "half-2"), (il_models[1], a, "half-1")):
            sub_ckpt = None if ckpt is None else os.path.join(os.fspath(ckpt), name)
            res.append(cls._pass(model, Subset(dataset, half.tolist()), num_examples=n, desc=f"{desc} ({name})",
                                 checkpoint=sub_ckpt, **kw))
        seen_a = res[1].seen.to(res[0].values.device)
        losses = torch.where(seen_a, res[1].values.to(seen_a.device), res[0].values)
        keys = torch.where(seen_a, res[1].keys.to(seen_a.device), res[0].keys)
        num_ignored = int(((keys == ignore_index) & (seen_a | res[0].seen.to(seen_a.device))).sum())
        store = cls(losses, dataset_fingerprint(keys), num_ignored=num_ignored)
        store.validate()
        return store

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike, *, format: Optional[str] = None) -> None:
        """Write the table, its fingerprint and a sha256 checksum, atomically.

        Formats (inferred from the suffix): ``.safetensors`` (metadata in the header), ``.pt``
        (``torch.save`` of a dict), ``.npy`` (a raw little-endian float32 array plus the sidecar
        ``<path>.json`` with the metadata; both files are needed to load).  The file is written
        to a temporary file in the same folder, synced and renamed over ``path``: a crash leaves
        the previous file or the new one.  A memory-mapped table is streamed, never loaded whole.
        """
        meta = {"kind": "example", "fingerprint": self.fingerprint or "", "num_examples": self.num_examples,
                "num_ignored": self.num_ignored}
        write_table(os.fspath(path), self.losses.detach(), meta, container=format)

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
        verify: bool = True,
    ) -> "IrreducibleLossStore":
        """Read a saved store.

        The file's checksum is verified (``verify=False`` skips it: one streaming read of the
        file); a damaged, truncated or inconsistent file, or a ``.npy`` without its sidecar,
        raises ValueError naming the file.  The *dataset* is checked only when ``labels`` (the
        dataset's labels in index order) or ``fingerprint`` is passed -- ValueError on mismatch,
        since an IL table of another dataset must not be used; without them the stored
        fingerprint is only available as :attr:`fingerprint`.

        ``mmap=True`` memory-maps the table instead of reading it (every format); the store then
        stays on the host and :meth:`gather` moves only the gathered values to the index's device.
        ``device`` is ignored with ``mmap=True``.
        """
        path = os.fspath(path)
        tab = read_table(path, mmap=mmap, verify=verify, container=format)
        meta = tab.meta
        if meta.get("kind", "example") != "example":
            raise ValueError(f"{path!r} holds a {meta.get('kind')} table; load it with TokenLossStore.load")
        losses = tab.values
        if losses.dim() != 1 or tab.offsets is not None:
            raise ValueError(f"{path!r} is corrupt: an IL table is 1-D, got shape {tuple(losses.shape)}")
        if int(meta.get("num_examples", losses.shape[0])) != losses.shape[0]:
            raise ValueError(f"{path!r} is corrupt: header says {meta['num_examples']} examples, table has {losses.shape[0]}")
        store = cls(losses if mmap else losses.to(as_device(device)), meta.get("fingerprint") or None, check=check,
                    num_ignored=int(meta.get("num_ignored", 0)))
        if fingerprint is not None and fingerprint != store.fingerprint:
            raise ValueError(
                f"dataset fingerprint mismatch: {path!r} was built for {store.fingerprint!r}, expected {fingerprint!r}"
            )
        if labels is not None:
            store.check_fingerprint(labels)
        return store
