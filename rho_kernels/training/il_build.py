"""The scoring pass behind the loss tables: one pass of a fixed model over a dataset, sharded over
``torch.distributed`` ranks, resumable from a checkpoint folder.

Used by :meth:`IrreducibleLossStore.build` (one value per example) and :meth:`TokenLossStore.build`
(one value per token).  Each dataset item ``i`` owns the slots ``[offsets[i], offsets[i+1])`` of a
flat value table (``offsets[i] = i * width`` for fixed-width tables) and one int64 *key* (its label,
or a hash of its tokens) from which the dataset fingerprint is computed.

Determinism.  The dataset is cut into the batches ``[b * batch_size, (b + 1) * batch_size)`` of
positions, whatever the number of ranks: rank ``r`` of ``W`` scores the contiguous batch range
``[r * nb // W, (r + 1) * nb // W)``, and a resumed pass restarts at a batch boundary.  Every value
is therefore computed from the same batch as in an uninterrupted one-process pass, so the table is
bit-identical (for a model whose forward is deterministic for a given batch).

Checkpoint folder (``checkpoint=DIR``; under ``distributed`` it must be on a filesystem every rank
sees)::

    run.json                 what the files belong to: model and dataset fingerprints, layout
    values.bin, keys.bin,    the table, keys and a seen flag per item, raw, written in place
    seen.bin                 (``pwrite``) by every rank, its own slots only
    state-R-of-W.json        rank R's progress: batches [start, cursor) are done and synced

A rank fsyncs the data files before it atomically replaces its state file, so a state
file only ever claims finished work: a pass killed at any point (SIGKILL included, also during a
checkpoint write) restarts from the last state with at most ``checkpoint_every`` batches redone.
Slots past the cursor may hold values of the interrupted batch; they are recomputed identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .il_format import advise_random, atomic_write

__all__ = ["PassResult", "model_fingerprint", "dataset_probe", "scoring_pass", "world_of"]

CHECKPOINT_VERSION = 1
# score_batch(batch) -> (dataset indices [B], values [B, width] float, keys [B] int64)
ScoreBatch = Callable[[Any], tuple[Tensor, Tensor, Tensor]]


class PassResult(NamedTuple):
    values: Tensor  # flat [total] in the table dtype
    keys: Tensor  # int64 [num_items]
    seen: Tensor  # bool [num_items]


def world_of(distributed: bool, group: Optional[object]) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return dist.get_rank(group), dist.get_world_size(group)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): which model wrote a checkpoint."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _hash_obj(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        _hash_obj(h, torch.from_numpy(np.ascontiguousarray(obj)))
    elif isinstance(obj, (tuple, list)):
        h.update(b"(")
        for o in obj:
            _hash_obj(h, o)
        h.update(b")")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_obj(h, obj[k])
    else:
        h.update(repr(obj).encode())


def dataset_probe(dataset: Dataset, samples: int = 32) -> str:
    """Cheap identity of a map-style dataset for checkpoints: its length and a hash of up to
    ``samples`` evenly spaced items (inputs and labels), read before the pass starts."""
    n = len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"n={n}".encode())
    for p in sorted({int(i) for i in np.linspace(0, n - 1, num=min(samples, n))} if n else set()):
        h.update(f"@{p}".encode())
        _hash_obj(h, dataset[p])
    return f"n={n};items_sha256={h.hexdigest()}"


class _NoBar:
    def __init__(self, it: Optional[Iterable] = None, **_kw: Any) -> None:
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def update(self, _n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no progress bar without it
        return _NoBar
    return tqdm


class _Table:
    """values / keys / seen of a pass without checkpoint, in memory on the scoring device."""

    def __init__(self, values: Tensor, keys: Tensor, seen: Tensor, offsets: Optional[np.ndarray], width: int) -> None:
        self.values, self.keys, self.seen, self.offsets, self.width = values, keys, seen, offsets, width

    def write(self, idx: Tensor, vals: Tensor, keys: Tensor) -> None:
        dev = self.values.device
        idx = idx.to(dev, torch.int64)
        n = self.keys.shape[0]
        bad = (idx < 0) | (idx >= n)
        if bool(bad.any()):  # a one-off pass: a sync per batch is fine here
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"dataset index {int(idx[i])} is out of range for num_examples = {n}")
        vals = vals.to(dev).to(self.values.dtype)
        if self.offsets is None:
            if vals.dim() != 2 or vals.shape[1] != self.width:
                raise ValueError(f"expected {self.width} values per item, got a batch of shape {tuple(vals.shape)}")
            self.values.view(n, self.width).index_copy_(0, idx, vals)
        else:
            for j, i in enumerate(idx.tolist()):
                lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
                if hi - lo > vals.shape[1]:
                    raise ValueError(f"item {i} has {hi - lo} slots but the batch gives {vals.shape[1]} values")
                self.values[lo:hi] = vals[j, :hi - lo]
        self.keys.index_copy_(0, idx, keys.to(dev, torch.int64))
        self.seen.index_fill_(0, idx, True)

class _FileTable:
    """values / keys / seen of a checkpointed pass, written with ``pwrite`` into the checkpoint's
    files (not through a mapping: the written table then lives in the page cache, not in this
    process's resident memory, however large it is)."""

    def __init__(self, folder: str, dtype: torch.dtype, offsets: Optional[np.ndarray], width: int, num_items: int) -> None:
        self.dtype, self.offsets, self.width, self.num_items = dtype, offsets, width, num_items
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        self.fds = [os.open(os.path.join(folder, name), os.O_RDWR) for name in ("values.bin", "keys.bin", "seen.bin")]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def write(self, idx: Tensor, vals: Tensor, keys: Tensor) -> None:
        idx = idx.detach().to("cpu", torch.int64).reshape(-1)
        n = self.num_items
        bad = (idx < 0) | (idx >= n)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"dataset index {int(idx[i])} is out of range for num_examples = {n}")
        vals = vals.detach().to("cpu").to(self.dtype)
        if self.offsets is None and (vals.dim() != 2 or vals.shape[1] != self.width):
            raise ValueError(f"expected {self.width} values per item, got a batch of shape {tuple(vals.shape)}")
        bits = vals.view(torch.int32 if self.itemsize == 4 else torch.int16).numpy()
        keys = keys.detach().to("cpu", torch.int64).numpy()
        order = np.argsort(idx.numpy(), kind="stable")
        sidx = idx.numpy()[order]
        # one pwrite per run of consecutive indices (a whole batch for an IndexedDataset)
        cuts = np.flatnonzero(np.diff(sidx) != 1) + 1
        fv, fk, fs = self.fds
        for run in np.split(np.arange(len(sidx)), cuts):
            if not len(run):
                continue
            first, rows = int(sidx[run[0]]), order[run]
            if self.offsets is None:
                data = bits[rows].reshape(-1)
                at = first * self.width
            else:
                parts = []
                for r, i in zip(rows, sidx[run]):
                    lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
                    if hi - lo > bits.shape[1]:
                        raise ValueError(f"item {int(i)} has {hi - lo} slots but the batch gives {bits.shape[1]} values")
                    parts.append(bits[r, :hi - lo])
                data = np.concatenate(parts) if parts else bits[:0, 0]
                at = int(self.offsets[first])
            os.pwrite(fv, np.ascontiguousarray(data).tobytes(), at * self.itemsize)
            os.pwrite(fk, np.ascontiguousarray(keys[rows]).tobytes(), first * 8)
            os.pwrite(fs, b"\x01" * len(run), first)

    def fill_nan(self, slot_mask: np.ndarray) -> None:
        """Write NaN into the masked slots (never-scored items; the files hold zeros there)."""
        nan = torch.full((1,), float("nan"), dtype=self.dtype).view(torch.int32 if self.itemsize == 4 else torch.int16)
        pos = np.flatnonzero(slot_mask)
        for run in np.split(pos, np.flatnonzero(np.diff(pos) != 1) + 1):
            if len(run):
                os.pwrite(self.fds[0], np.repeat(nan.numpy(), len(run)).tobytes(), int(run[0]) * self.itemsize)

    def flush(self) -> None:
        for fd in self.fds:
            os.fsync(fd)


def _memmap(path: str, dtype: Any, count: int, mode: str = "r+") -> np.memmap:
    if count == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode=mode, shape=(count,))


def _torch_view(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(arr)
    return t.view(dtype) if t.dtype != dtype else t


_NP_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class _Checkpoint:
    """The checkpoint folder of one pass (see the module docstring)."""

    def __init__(self, folder: str, run: dict, rank: int, world: int) -> None:
        self.folder, self.run, self.rank, self.world = folder, run, rank, world
        self.state_path = os.path.join(folder, f"state-{rank}-of-{world}.json")

    def _p(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def prepare(self) -> Optional[str]:
        """(rank 0) Check ``run.json`` against this run, or start the folder afresh.  Returns an
        error message instead of raising, so that it can be sent to the other ranks."""
        os.makedirs(self.folder, exist_ok=True)
        run_path = self._p("run.json")
        if os.path.exists(run_path):
            try:
                with open(run_path) as f:
                    old = json.load(f)
            except ValueError:
                old = None  # a torn run.json cannot exist (atomic write); treat as foreign
            if old is None:
                return f"checkpoint folder {self.folder!r} has an unreadable run.json; remove the folder"
            return self.mismatch(old)
        # A fresh folder: (re)create zeroed data files, then claim it.  A kill in between leaves no
        # run.json, so the next start zeroes again.
        for name in os.listdir(self.folder):
            if name.startswith("state-"):
                os.unlink(self._p(name))
        for name, nbytes in self.sizes().items():
            with open(self._p(name), "wb") as f:
                f.truncate(nbytes)
                f.flush()
                os.fsync(f.fileno())
        atomic_write(run_path, lambda f: f.write(json.dumps(self.run, indent=1).encode()))
        return None

    def mismatch(self, old: dict) -> Optional[str]:
        if old.get("version") != CHECKPOINT_VERSION:
            return f"checkpoint folder {self.folder!r} has version {old.get('version')}, expected {CHECKPOINT_VERSION}"
        for key, what in (("model", "another model (its weights differ)"),
                          ("dataset", "another dataset (size or sampled items differ; if its items are "
                                      "random, e.g. augmented, pass dataset_id=)")):
            if old.get(key) != self.run[key]:
                return (f"checkpoint folder {self.folder!r} was written for {what}: "
                        f"{key} fingerprint {old.get(key)!r}, this build has {self.run[key]!r}; "
                        "use another folder or delete it")
        if old.get("config") != self.run["config"]:
            diff = {k: (old.get("config", {}).get(k), v) for k, v in self.run["config"].items()
                    if old.get("config", {}).get(k) != v}
            return (f"checkpoint folder {self.folder!r} was written with other build settings "
                    f"(checkpoint vs now: {diff}); use the same arguments, another folder, or delete it")
        return None

    def sizes(self) -> dict:
        c = self.run["config"]
        return {"values.bin": c["total"] * c["itemsize"], "keys.bin": c["num_items"] * 8, "seen.bin": c["num_items"]}

    def check_sizes(self) -> None:
        for name, nbytes in self.sizes().items():
            if os.path.getsize(self._p(name)) != nbytes:
                raise ValueError(f"checkpoint file {self._p(name)!r} has {os.path.getsize(self._p(name))} bytes, "
                                 f"expected {nbytes}: the folder is damaged; delete it")

    def open(self, dtype: torch.dtype, offsets: Optional[np.ndarray], width: int) -> _FileTable:
        self.check_sizes()
        return _FileTable(self.folder, dtype, offsets, width, self.run["config"]["num_items"])

    def seen(self) -> np.ndarray:
        return np.fromfile(self._p("seen.bin"), dtype=np.bool_)

    def result(self, dtype: torch.dtype, mmap: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The finished files as tensors: copy-on-write mappings (``mmap``) or read into memory."""
        c = self.run["config"]
        out = []
        for name, np_dtype, count in (("values.bin", _NP_BITS[dtype], c["total"]), ("keys.bin", np.int64, c["num_items"]),
                                      ("seen.bin", np.bool_, c["num_items"])):
            if mmap:
                arr = _memmap(self._p(name), np_dtype, count, "c")
                advise_random(arr)
            else:
                arr = np.fromfile(self._p(name), dtype=np_dtype, count=count)
            out.append(arr)
        return _torch_view(out[0], dtype), torch.from_numpy(out[1]), torch.from_numpy(out[2])

    def states(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("state-") and name.endswith(".json"):
                with open(self._p(name)) as f:
                    out.append(json.load(f))
        return out

    def cursor(self, start: int, stop: int) -> int:
        """Where this rank resumes; refuses states of another world size."""
        mine = None
        for st in self.states():
            if st.get("world") != self.world:
                raise ValueError(
                    f"checkpoint folder {self.folder!r} holds progress of a {st.get('world')}-rank build; "
                    f"resume it with {st.get('world')} ranks (this build has {self.world}) or delete it")
            if st.get("rank") == self.rank:
                mine = st
        if mine is None:
            return start
        if (mine["start"], mine["stop"]) != (start, stop):
            raise ValueError(f"checkpoint state {self.state_path!r} covers batches {mine['start']}..{mine['stop']}, "
                             f"this rank's shard is {start}..{stop}: delete the folder")
        return int(mine["cursor"])

    def save_state(self, table: _FileTable, start: int, stop: int, cursor: int) -> None:
        table.flush()  # data first, then the claim that it is there
        state = {"version": CHECKPOINT_VERSION, "rank": self.rank, "world": self.world,
                 "start": start, "stop": stop, "cursor": cursor}
        atomic_write(self.state_path, lambda f: f.write(json.dumps(state).encode()))


def _share(err: Optional[str], rank: int, world: int, group: Optional[object]) -> None:
    """Raise ``err`` (rank 0's) on every rank, so that no rank waits forever for one that failed."""
    if world > 1:
        box = [err]
        src = 0 if group is None else dist.get_global_rank(group, 0)  # src is a global rank
        dist.broadcast_object_list(box, src=src, group=group)
        err = box[0]
    if err:
        raise ValueError(err)


def _all_reduce_exclusive(t: Tensor, mask: Tensor, group: Optional[object]) -> Tensor:
    """Combine a tensor of which every item was written by exactly one rank (``mask``: this
    rank's items), bit-exactly: the bit patterns, zero elsewhere, are summed as int64."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.int64: torch.int64}[t.dtype]
    wide = torch.where(mask, t.view(bits).to(torch.int64), torch.zeros((), dtype=torch.int64, device=t.device))
    dist.all_reduce(wide, group=group)
    return wide.to(bits).view(t.dtype)


def scoring_pass(
    dataset: Any,
    score_batch: ScoreBatch,
    *,
    num_items: int,
    width: int = 1,
    offsets: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int,
    collate_fn: Optional[Callable] = None,
    num_workers: int = 0,
    device: torch.device,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 100,
    distributed: bool = False,
    group: Optional[object] = None,
    fingerprints: Optional[Callable[[], dict]] = None,
    config: Optional[dict] = None,
    mmap: bool = False,
    progress: bool = True,
    desc: str = "scoring",
) -> PassResult:
    """Run ``score_batch`` over ``dataset`` once and collect a table (see the module docstring).

    ``fingerprints()`` returns ``{"model": ..., "dataset": ...}`` (called only with a checkpoint).
    ``config`` holds the other settings a checkpoint must agree on.  With ``mmap=True`` (needs a
    checkpoint) the result stays mapped on the checkpoint's files instead of being read into
    memory on ``device``.
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int (batches), got {checkpoint_every!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if mmap and checkpoint is None:
        raise ValueError("mmap=True builds into the checkpoint's files: pass checkpoint=FOLDER too")
    rank, world = world_of(distributed, group)
    map_style = (not isinstance(dataset, DataLoader) and hasattr(dataset, "__getitem__")
                 and hasattr(dataset, "__len__"))
    if (checkpoint is not None or world > 1) and not map_style:
        raise ValueError("checkpoint= and distributed=True need a map-style dataset (len() and [i]): "
                         "they shard and resume by position; pass the dataset, not a DataLoader")
    np_offsets = None if offsets is None else offsets.detach().cpu().numpy()
    total = num_items * width if offsets is None else int(np_offsets[-1])
    itemsize = torch.empty(0, dtype=dtype).element_size()

    ckpt = None
    if checkpoint is not None:
        run = {"version": CHECKPOINT_VERSION,
               "config": dict(config or {}, num_items=num_items, total=total, itemsize=itemsize, width=width,
                              dtype=str(dtype), batch_size=batch_size,
                              offsets=None if offsets is None else hashlib.sha256(np_offsets.tobytes()).hexdigest()),
               **(fingerprints() if fingerprints else {"model": None, "dataset": None})}
        ckpt = _Checkpoint(os.fspath(checkpoint), run, rank, world)
        err = None
        if rank == 0:
            try:
                err = ckpt.prepare()
            except OSError as exc:
                err = f"cannot prepare checkpoint folder {checkpoint!r}: {exc}"
        _share(err, rank, world, group)
        if rank != 0:  # every rank checks what rank 0 accepted against its own model and data
            with open(os.path.join(ckpt.folder, "run.json")) as f:
                err = ckpt.mismatch(json.load(f))
            if err:
                raise ValueError(err)
        table: Any = ckpt.open(dtype, np_offsets, width)
    else:
        table = _Table(torch.full((total,), float("nan"), dtype=dtype, device=device),
                       torch.full((num_items,), -1, dtype=torch.int64, device=device),
                       torch.zeros((num_items,), dtype=torch.bool, device=device), np_offsets, width)

    tqdm = _tqdm()
    try:
        if map_style:
            positions = len(dataset)
            nb = -(-positions // batch_size)
            start, stop = rank * nb // world, (rank + 1) * nb // world
            cursor = ckpt.cursor(start, stop) if ckpt is not None else start
            bar = tqdm(total=stop - start, initial=cursor - start, disable=not progress, desc=desc, leave=False)
            b = cursor
            while b < stop:
                # one DataLoader per checkpoint interval: batch b covers positions [b*bs, (b+1)*bs)
                upto = min(stop, b + checkpoint_every) if ckpt is not None else stop
                sub = Subset(dataset, range(b * batch_size, min(positions, upto * batch_size)))
                loader = DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                    collate_fn=collate_fn)
                for batch in loader:
                    table.write(*score_batch(batch))
                    bar.update(1)
                b = upto
                if ckpt is not None:
                    ckpt.save_state(table, start, stop, b)
            bar.close()
        else:
            total_batches = None
            try:
                total_batches = len(dataset)
            except TypeError:
                pass
            for batch in tqdm(dataset, total=total_batches, disable=not progress, desc=desc, leave=False):
                table.write(*score_batch(batch))
    except BaseException:
        if ckpt is not None:
            table.close()
        raise

    if ckpt is not None:
        table.flush()
        if world > 1:
            dist.barrier(group=group)  # every rank's slots are on disk
        unseen = ~ckpt.seen()
        if unseen.any() and rank == 0:  # never-scored slots hold zeros in the files: make them NaN
            table.fill_nan(_slots(torch.from_numpy(unseen), np_offsets, width, total).numpy())
            table.flush()
        table.close()
        if world > 1:
            dist.barrier(group=group)
        vals, keys, seen = ckpt.result(dtype, mmap)
        if not mmap:
            vals, keys, seen = vals.to(device), keys.to(device), seen.to(device)
        return PassResult(vals, keys, seen)
    vals, keys, seen = table.values, table.keys, table.seen
    if world > 1:
        count = seen.to(torch.int64)
        dist.all_reduce(count, group=group)
        if bool((count > 1).any()):
            i = int((count > 1).nonzero()[0, 0])
            raise ValueError(f"dataset index {i} was scored on {int(count[i])} ranks: the dataset yields it twice")
        vals = _all_reduce_exclusive(vals, _slots(seen, np_offsets, width, total), group)
        vals[_slots(count == 0, np_offsets, width, total)] = float("nan")
        keys = _all_reduce_exclusive(keys, seen, group)
        seen = count > 0
    return PassResult(vals, keys, seen)


def _slots(item_mask: Tensor, offsets: Optional[np.ndarray], width: int, total: int) -> Tensor:
    """Per-slot mask from a per-item mask."""
    if offsets is None:
        return item_mask.repeat_interleave(width)
    lens = torch.from_numpy(np.diff(offsets)).to(item_mask.device)
    return torch.repeat_interleave(item_mask, lens, output_size=total)
