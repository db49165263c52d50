"""Per-token reference loss of a language-model corpus (Rho-1), computed once, gathered per batch.

Rho-1 ranks tokens by excess loss ``CE - reference_loss``, where ``reference_loss`` is the
per-token loss of a reference model.  Computing it on the fly doubles the forward cost; this
store computes it once over the corpus (:meth:`TokenLossStore.build`, with the sharded and
resumable pass of :mod:`.il_build`), keeps it in float16/bfloat16/float32 -- memory-mapped when it
is larger than RAM -- and gathers ``[B, seq_len]`` rows by sequence index for
:func:`rho_kernels.select_mask` / :func:`rho_kernels.selective_cross_entropy`.

Layouts: fixed-length ``[num_sequences, seq_len]``, or ragged: a flat ``[total_tokens]`` table with
int64 ``offsets`` ``[num_sequences + 1]`` (sequence ``i`` owns ``[offsets[i], offsets[i+1])``).
Tokens whose target is ``ignore_index`` hold NaN (never selectable).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import api as rk  # the public op API only (the package imports this layer)

from .il_build import dataset_probe, model_fingerprint, scoring_pass
from .il_format import TABLE_DTYPES, read_table, write_table
from .il_store import _EvalNoGrad, _resolve_device, _to_device, as_device, check_index_has_values, dataset_fingerprint

__all__ = ["TokenLossStore", "sequence_key", "token_fingerprint"]

PathLike = Union[str, "os.PathLike[str]"]


def sequence_key(targets: Tensor) -> int:
    """A 64-bit hash of one sequence's target tokens (as int64): its entry in the fingerprint."""
    arr = np.ascontiguousarray(targets.detach().to("cpu", torch.int64).numpy(), dtype="<i8")
    return int.from_bytes(hashlib.blake2b(arr.tobytes(), digest_size=8).digest(), "little", signed=True)


def token_fingerprint(sequences: Union[Tensor, Sequence[Tensor]]) -> str:
    """Fingerprint of a token dataset from its target sequences in index order (``[N, T]`` or a
    list of 1-D tensors): the number of sequences and a hash of every sequence's tokens."""
    keys = [sequence_key(s) for s in sequences]
    return dataset_fingerprint(keys)


def _pad_collate(ignore_index: int) -> Callable:
    """Stack ``(index, inputs[T_i], targets[T_i], *extra)`` items, padding to the longest sequence
    (inputs with 0, targets with ``ignore_index``); extras are dropped."""

    def collate(items: list) -> tuple[Tensor, Tensor, Tensor]:
        for it in items:
            if not isinstance(it, (tuple, list)) or len(it) < 3:
                raise ValueError("token dataset items must be (index, inputs, targets, *extra); "
                                 "wrap an (inputs, targets) dataset in IndexedDataset")
        idx = torch.tensor([int(it[0]) for it in items], dtype=torch.int64)
        inp = [torch.as_tensor(it[1]) for it in items]
        tgt = [torch.as_tensor(it[2]) for it in items]
        for i, x, y in zip(idx.tolist(), inp, tgt):
            if y.dim() != 1 or x.shape[:1] != y.shape:
                raise ValueError(f"sequence {i}: targets must be 1-D and match the inputs' length, "
                                 f"got inputs {tuple(x.shape)} and targets {tuple(y.shape)}")
        T = max(y.shape[0] for y in tgt)
        inputs = torch.stack([F.pad(x, (0, 0) * (x.dim() - 1) + (0, T - x.shape[0])) for x in inp])
        targets = torch.stack([F.pad(y.to(torch.int64), (0, T - y.shape[0]), value=ignore_index) for y in tgt])
        return idx, inputs, targets

    return collate


def _token_scorer(model: nn.Module, dev: torch.device, forward: Callable, ignore_index: int,
                  autocast_dtype: Optional[torch.dtype], lengths: Optional[np.ndarray]) -> Callable:
    def score(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        idx, inputs, targets = batch
        B, T = targets.shape
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = forward(model, _to_device(inputs, dev))
        if logits.dim() != 3 or logits.shape[:2] != (B, T):
            raise ValueError(f"the reference model must give logits [B, T, V] = [{B}, {T}, V], "
                             f"got {tuple(logits.shape)}")
        tgt = targets.to(dev)
        ce = rk.score(logits.reshape(B * T, -1), tgt.reshape(-1), method="loss", ignore_index=ignore_index)
        ce = torch.where(tgt == ignore_index, torch.full_like(ce.view(B, T), float("nan")), ce.view(B, T))
        keys = torch.tensor([sequence_key(targets[j, :T if lengths is None else int(lengths[i])])
                             for j, i in enumerate(idx.tolist())], dtype=torch.int64)
        return idx, ce, keys

    return score


def _scan(values: Tensor, chunk: int = 1 << 22) -> tuple[int, Optional[int]]:
    """(NaN count, flat position of the first +/-inf or None), in chunks: a memory-mapped table
    is scanned without whole-table temporaries."""
    flat = values.reshape(-1)
    nan, inf_at = 0, None
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        nan += int(torch.isnan(part).sum())
        if inf_at is None:
            inf = torch.isinf(part)
            if bool(inf.any()):
                inf_at = i + int(inf.nonzero()[0, 0])
    return nan, inf_at


class TokenLossStore:
    """Per-token reference loss, indexed by sequence index.

    Args:
        values: float16/bfloat16/float32 ``[num_sequences, seq_len]``, or 1-D ``[total_tokens]``
            with ``offsets``.  Kept as given (device, memory mapping).
        offsets: int64 ``[num_sequences + 1]`` for a ragged table (kept on the host and on the
            table's device).
        fingerprint: :func:`token_fingerprint` of the corpus.
        num_ignored: how many NaN entries are ignored target tokens.
    """

    def __init__(self, values: Tensor, offsets: Optional[Tensor] = None, fingerprint: Optional[str] = None, *,
                 num_ignored: int = 0) -> None:
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype not in TABLE_DTYPES:
            raise TypeError(f"values must be float32, float16 or bfloat16, got {values.dtype}")
        if offsets is None:
            if values.dim() != 2:
                raise ValueError(f"a fixed-length token table is 2-D [num_sequences, seq_len], got {tuple(values.shape)}")
        else:
            if not isinstance(offsets, Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
                raise TypeError("offsets must be a 1-D int64 tensor [num_sequences + 1]")
            if values.dim() != 1:
                raise ValueError(f"a ragged token table is 1-D [total_tokens], got {tuple(values.shape)}")
            off = offsets.cpu()
            if int(off[0]) != 0 or int(off[-1]) != values.numel() or bool((off[1:] < off[:-1]).any()):
                raise ValueError(f"offsets must rise from 0 to the table size {values.numel()}")
        self.values = values
        self.offsets = None if offsets is None else offsets.to(values.device)
        self.fingerprint = fingerprint
        self.num_ignored = int(num_ignored)

    @property
    def num_sequences(self) -> int:
        return self.values.shape[0] if self.offsets is None else self.offsets.numel() - 1

    @property
    def seq_len(self) -> Optional[int]:
        """Tokens per sequence; None for a ragged table."""
        return self.values.shape[1] if self.offsets is None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        layout = f"seq_len={self.seq_len}" if self.offsets is None else f"ragged, total_tokens={self.values.numel()}"
        return (f"TokenLossStore(num_sequences={self.num_sequences}, {layout}, dtype={self.dtype}, "
                f"device={self.device}, fingerprint={self.fingerprint!r})")

    def to(self, device: torch.device | str) -> "TokenLossStore":
        """The store on ``device`` (a copy; e.g. a memory-mapped table moved into GPU memory)."""
        return TokenLossStore(self.values.to(as_device(device)), self.offsets, self.fingerprint, num_ignored=self.num_ignored)

    # ------------------------------------------------------------------ lookup
    def gather(self, index: Tensor, *, length: Optional[int] = None, device: Optional[torch.device | str] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Reference loss of the sequences ``index`` (int ``[B]``): ``[B, seq_len]`` in ``dtype``.

        For a ragged table pass ``length`` (the batch's padded length): rows are cut or padded
        with NaN to it, so that the shape never depends on data.  No host synchronisation: with
        the table on the index's device this is an ``index_select`` (+ a cast); a memory-mapped
        host table wants host indices (as a DataLoader yields them) and copies only the gathered
        rows, asynchronously from pinned memory, to ``device``.  Indices are not range-checked
        here (that would need a sync on GPU): out-of-range ones fail inside ``index_select``.
        """
        if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool or index.dim() != 1:
            raise TypeError(f"index must be a 1-D integer tensor, got {getattr(index, 'dtype', type(index).__name__)}")
        check_index_has_values(index, self.values)
        out_device = as_device(device) if device is not None else index.device
        idx = index.to(self.values.device, non_blocking=True).to(torch.int64)
        if self.offsets is None:
            if length is not None and length != self.seq_len:
                raise ValueError(f"length {length} does not match the table's seq_len {self.seq_len}")
            out = self.values.index_select(0, idx)
        else:
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"a ragged table needs length= (an int >= 0), got {length!r}")
            start = self.offsets.index_select(0, idx)
            n = self.offsets.index_select(0, idx + 1) - start
            pos = torch.arange(length, device=idx.device)
            inside = pos < n[:, None]
            flat = torch.where(inside, start[:, None] + pos, torch.zeros((), dtype=torch.int64, device=idx.device))
            vals = self.values.index_select(0, flat.reshape(-1)).view(idx.shape[0], length)
            out = torch.where(inside, vals, torch.full((), float("nan"), dtype=vals.dtype, device=vals.device))
        out = out.to(dtype)
        if out_device.type == "cuda" and out.device.type == "cpu":
            out = out.pin_memory()  # an asynchronous copy needs page-locked memory
        return out.to(out_device, non_blocking=True)

    __getitem__ = gather

    def validate(self, *, allow_missing: bool = False) -> dict:
        """Check the whole table (one host sync): NaN beyond the ignored tokens means unscored
        sequences (ValueError unless ``allow_missing``); ``+/-inf`` is an error.  Returns the
        counts ``{"num_tokens", "num_ignored", "num_unscored"}``."""
        nan, inf_at = _scan(self.values)
        unscored = nan - min(nan, self.num_ignored)
        if unscored and not allow_missing:
            raise ValueError(f"{unscored} of {self.values.numel()} token losses are NaN besides the "
                             f"{self.num_ignored} ignored tokens: some sequences were never scored")
        if inf_at is not None:
            raise ValueError(f"the token at flat position {inf_at} has an infinite reference loss")
        return {"num_tokens": self.values.numel(), "num_ignored": min(nan, self.num_ignored), "num_unscored": unscored}

    def check_fingerprint(self, sequences: Union[Tensor, Sequence[Tensor]]) -> None:
        """Raise ValueError unless ``sequences`` (target tokens in index order) match the store."""
        fp = token_fingerprint(sequences)
        if self.fingerprint is None or fp != self.fingerprint:
            raise ValueError(f"corpus fingerprint mismatch: the store was built for {self.fingerprint!r}, "
                             f"the given sequences give {fp!r}")

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        reference_model: nn.Module,
        dataset: Any,
        *,
        dtype: torch.dtype = torch.float16,
        lengths: Optional[Union[Tensor, Sequence[int]]] = None,
        batch_size: int = 8,
        device: Optional[torch.device | str] = None,
        forward: Callable[[nn.Module, Any], Tensor] = lambda m, x: m(x),
        ignore_index: int = -100,
        autocast_dtype: Optional[torch.dtype] = None,
        allow_missing: bool = False,
        progress: bool = True,
        num_workers: int = 0,
        desc: str = "reference loss",
        distributed: bool = False,
        group: Optional[object] = None,
        checkpoint: Optional[PathLike] = None,
        checkpoint_every: int = 100,
        mmap: bool = False,
        dataset_id: Optional[str] = None,
    ) -> "TokenLossStore":
        """Score every token of ``dataset`` once with ``reference_model`` (eval, ``no_grad``).

        Args:
            reference_model: ``forward(model, inputs[B, T])`` gives logits ``[B, T, V]``.
            dataset: map-style, yielding ``(index, inputs[T], targets[T], *extra)`` (wrap an
                ``(inputs, targets)`` dataset in :class:`IndexedDataset`).  Sequences of a
                batch are padded to the longest (inputs with 0, targets with ``ignore_index``).
            dtype: table dtype (float16, bfloat16 or float32); the CE is computed in float32.
            lengths: tokens of every sequence for a ragged table (default: fixed length, read
                from ``dataset[0]``).
            distributed, checkpoint, checkpoint_every, mmap, dataset_id: as in
                :meth:`IrreducibleLossStore.build` -- sharded over ranks (bit-identical to one
                process), resumable from a checkpoint folder, result memory-mapped on the
                checkpoint's files (for tables larger than RAM).
        """
        if dtype not in TABLE_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        n = len(dataset)
        offsets = None
        np_lengths = None
        if lengths is not None:
            lens = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
            if lens.numel() != n or bool((lens < 0).any()):
                raise ValueError(f"lengths must hold {n} non-negative ints, got {lens.numel()} values")
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
            np_lengths = lens.numpy()
            width = 0
        else:
            first = dataset[0] if n else None
            if first is None or not isinstance(first, (tuple, list)) or len(first) < 3:
                raise ValueError("token dataset items must be (index, inputs, targets, *extra); "
                                 "wrap an (inputs, targets) dataset in IndexedDataset")
            t0 = torch.as_tensor(first[2])
            if t0.dim() != 1:
                raise ValueError(f"token dataset targets must be 1-D [seq_len], item 0 has shape {tuple(t0.shape)}")
            width = int(t0.shape[0])
        dev = _resolve_device(device, reference_model)
        with _EvalNoGrad(reference_model):
            res = scoring_pass(
                dataset, _token_scorer(reference_model, dev, forward, ignore_index, autocast_dtype, np_lengths),
                num_items=n, width=width, offsets=offsets, dtype=dtype, batch_size=batch_size,
                collate_fn=_pad_collate(ignore_index), num_workers=num_workers, device=dev,
                checkpoint=None if checkpoint is None else os.fspath(checkpoint), checkpoint_every=checkpoint_every,
                distributed=distributed, group=group, mmap=mmap, progress=progress, desc=desc,
                fingerprints=lambda: {"model": model_fingerprint(reference_model),
                                      "dataset": dataset_id if dataset_id is not None else dataset_probe(dataset)},
                config={"kind": "token", "ignore_index": ignore_index, "autocast": str(autocast_dtype)},
            )
        values = res.values if offsets is not None else res.values.view(n, width)
        complete = bool(res.seen.all())
        # ignored tokens = NaN inside scored sequences (unscored sequences are NaN throughout)
        num_ignored = _scan(values)[0] if complete else cls._ignored_in_seen(torch.isnan(values), res.seen, offsets)
        store = cls(values, offsets, dataset_fingerprint(res.keys) if complete else None, num_ignored=num_ignored)
        if not allow_missing:
            store.validate()
        return store

    @staticmethod
    def _ignored_in_seen(nan: Tensor, seen: Tensor, offsets: Optional[Tensor]) -> int:
        if offsets is None:
            return int((nan & seen.to(nan.device)[:, None]).sum())
        lens = (offsets[1:] - offsets[:-1]).to(nan.device)
        return int((nan & torch.repeat_interleave(seen.to(nan.device), lens, output_size=nan.numel())).sum())

    # ------------------------------------------------------------------ persistence
    def save(self, path: PathLike, *, format: Optional[str] = None) -> None:
        """Write the table atomically with its fingerprint and a sha256 checksum (formats as in
        :meth:`IrreducibleLossStore.save`; a ragged table needs ``.safetensors`` or ``.pt``)."""
        meta = {"kind": "token", "fingerprint": self.fingerprint or "", "num_ignored": self.num_ignored}
        write_table(os.fspath(path), self.values.detach(), meta,
                    offsets=None if self.offsets is None else self.offsets.cpu(), container=format)

    @classmethod
    def load(cls, path: PathLike, *, sequences: Optional[Union[Tensor, Sequence[Tensor]]] = None,
             fingerprint: Optional[str] = None, device: torch.device | str = "cpu", mmap: bool = False,
             format: Optional[str] = None, verify: bool = True) -> "TokenLossStore":
        """Read a saved table (checksum verified unless ``verify=False``; ``mmap=True`` maps it).
        The corpus is checked only when ``sequences`` or ``fingerprint`` is passed."""
        path = os.fspath(path)
        tab = read_table(path, mmap=mmap, verify=verify, container=format)
        if tab.meta.get("kind") != "token":
            raise ValueError(f"{path!r} holds a {tab.meta.get('kind', 'example')} table; "
                             "load it with IrreducibleLossStore.load")
        values = tab.values if mmap else tab.values.to(as_device(device))
        store = cls(values, tab.offsets, tab.meta.get("fingerprint") or None,
                    num_ignored=int(tab.meta.get("num_ignored", 0)))
        if fingerprint is not None and fingerprint != store.fingerprint:
            raise ValueError(f"corpus fingerprint mismatch: {path!r} was built for {store.fingerprint!r}, "
                             f"expected {fingerprint!r}")
        if sequences is not None:
            store.check_fingerprint(sequences)
        return store
