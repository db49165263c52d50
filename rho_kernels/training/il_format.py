"""On-disk format of loss tables: atomic writes, a checksum in every format, format versions, mmap.

A *table* is a float tensor (float32, float16 or bfloat16): ``[num_examples]`` for per-example
irreducible losses, ``[num_sequences, seq_len]`` for per-token reference losses, or a flat
``[total_tokens]`` with int64 ``offsets`` ``[num_sequences + 1]`` for ragged token tables.  It is
stored with a small string metadata dict.

Three containers, chosen by suffix:

* ``.safetensors`` -- written and read here (the format is a u64 header length, a JSON header and
  the raw little-endian bytes), so that a table larger than RAM is streamed to disk and can be
  memory-mapped back; readable by the ``safetensors`` library.  Metadata in ``__metadata__``.
* ``.npy`` -- a plain NumPy array (``np.load(path, mmap_mode="r")`` works; bfloat16 is stored as
  ``<u2`` bit patterns) plus a JSON sidecar ``<path>.json`` holding the metadata.  Ragged tables
  need one of the other containers.
* ``.pt`` -- ``torch.save`` of a dict (memory-mappable by ``torch.load(mmap=True)``).

Safety.  Every write goes to a temporary file in the target's folder, is flushed and fsync'ed,
and is renamed over the target (then the folder is fsync'ed): a crash leaves the old file or the
new one, never a mix.  The ``.npy`` pair is two files, so the sidecar is first replaced by one
that also describes the *previous* table, then the array is renamed, then the sidecar is
rewritten for the new table alone: at every instant the sidecar describes the array on disk.
Every container stores ``checksum = sha256`` of the table's bytes (and of the offsets); ``read``
recomputes it (streaming the file, so memory stays small even for a memory-mapped table) and
raises ValueError naming the file on a mismatch, a truncated file, a dtype or shape that
disagrees with the metadata, or a missing sidecar.  A file of a newer format version is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap as mmap_module
import os
import struct
import sys
import tempfile
import warnings
from typing import Any, BinaryIO, Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "TableFile", "atomic_write", "container_of", "read_table", "tensor_sha256", "write_table"]

# 1: no checksum (read with a warning); 2: sha256 checksum, kind, dtype and shape in the metadata.
FORMAT_VERSION = 2

TABLE_KEY = "irreducible_loss"
OFFSETS_KEY = "offsets"
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_ST_DTYPE_INV = {v: k for k, v in _ST_DTYPE.items()}
_NPY_DESCR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<u2"}
_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64"}
_DTYPE_BY_NAME = {v: k for k, v in _DTYPE_NAME.items()}
_CHUNK = 1 << 24  # bytes per streamed read/write/hash step

if sys.byteorder != "little":  # the raw bytes on disk are little-endian
    raise ImportError("rho_kernels' table files need a little-endian machine")


class TableFile(NamedTuple):
    """What :func:`read_table` returns."""

    values: Tensor
    offsets: Optional[Tensor]
    meta: dict


def container_of(path: str, container: Optional[str] = None) -> str:
    """``"safetensors"``, ``"npy"`` or ``"torch"`` for ``path`` (by suffix unless given)."""
    if container is None:
        ext = os.path.splitext(path)[1].lower()
        container = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".npy": "npy"}.get(ext)
        if container is None:
            raise ValueError(f"cannot infer the format of {path!r}: use .safetensors, .pt or .npy, or pass format=")
    if container not in ("safetensors", "torch", "npy"):
        raise ValueError(f"unknown format {container!r}; expected 'safetensors', 'torch' or 'npy'")
    return container


# ---------------------------------------------------------------------------------------- bytes
def _byte_chunks(t: Tensor):
    """The raw bytes of ``t`` (any dtype, CPU or mmap) in chunks, without one big copy."""
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    step = max(1, _CHUNK // max(1, flat.element_size()))
    for i in range(0, flat.numel(), step):
        yield flat[i:i + step].contiguous().view(torch.uint8).numpy()


def tensor_sha256(values: Tensor, offsets: Optional[Tensor] = None) -> str:
    """``"sha256:<hex>"`` of the table's raw little-endian bytes (then the offsets' bytes)."""
    h = hashlib.sha256()
    for t in (values, offsets):
        if t is not None:
            for chunk in _byte_chunks(t):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _file_sha256(f: BinaryIO, regions: list[tuple[int, int]]) -> str:
    """sha256 of byte ``regions`` ``(start, length)`` of an open file, read in fixed-size chunks
    (not through a mapping, so a verified load does not pull the table into the process)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for start, length in regions:
        f.seek(start)
        left = length
        while left:
            n = f.readinto(view[:min(left, _CHUNK)])
            if not n:
                raise EOFError
            h.update(view[:n])
            left -= n
    return "sha256:" + h.hexdigest()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: str) -> tuple[str, int, str]:
    """(folder, fd, name) of a new temporary file in ``path``'s folder.  Its OSError names ``path``
    and a missing folder, not the temporary name the caller never chose."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        why = f"its folder {folder!r} does not exist" if not os.path.isdir(folder) else exc.strerror
        raise type(exc)(exc.errno, f"cannot write {path!r}: {why}") from None
    return folder, fd, tmp


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write(f)`` on a temporary file next to ``path``; flush, fsync, rename it over ``path``."""
    folder, fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _write_bytes(f: BinaryIO, t: Tensor) -> None:
    for chunk in _byte_chunks(t):
        f.write(memoryview(chunk))


# ---------------------------------------------------------------------------------------- write
def _check_table(values: Tensor, offsets: Optional[Tensor]) -> None:
    if values.dtype not in TABLE_DTYPES:
        raise TypeError(f"table dtype must be float32, float16 or bfloat16, got {values.dtype}")
    if offsets is not None and (offsets.dtype != torch.int64 or offsets.dim() != 1 or values.dim() != 1):
        raise ValueError("a ragged table is a 1-D values tensor with 1-D int64 offsets")


def write_table(path: str, values: Tensor, meta: dict, *, offsets: Optional[Tensor] = None,
                container: Optional[str] = None) -> str:
    """Atomically write ``values`` (+ ``offsets``) and ``meta`` (str -> str) to ``path``.

    Adds ``format_version``, ``checksum``, ``dtype`` and ``shape`` to the metadata; returns the
    checksum.  Streams the bytes, so a memory-mapped table is never loaded whole.
    """
    path = os.fspath(path)
    container = container_of(path, container)
    _check_table(values, offsets)
    meta = {k: str(v) for k, v in meta.items()}
    meta.update(format_version=str(FORMAT_VERSION), checksum=tensor_sha256(values, offsets),
                dtype=_DTYPE_NAME[values.dtype], shape=json.dumps(list(values.shape)))
    if offsets is not None:
        meta["num_sequences"] = str(offsets.numel() - 1)
    if container == "safetensors":
        atomic_write(path, lambda f: _write_safetensors(f, values, offsets, meta))
    elif container == "torch":
        obj: dict[str, Any] = {TABLE_KEY: values.detach().cpu().contiguous(), **meta}
        if offsets is not None:
            obj[OFFSETS_KEY] = offsets.detach().cpu().contiguous()
        atomic_write(path, lambda f: torch.save(obj, f))
    else:
        if offsets is not None:
            raise ValueError(f"a ragged table cannot be saved as .npy ({path!r}): use .safetensors or .pt")
        _write_npy_pair(path, values, meta)
    return meta["checksum"]


def _write_safetensors(f: BinaryIO, values: Tensor, offsets: Optional[Tensor], meta: dict) -> None:
    nbytes = values.numel() * values.element_size()
    header: dict[str, Any] = {TABLE_KEY: {"dtype": _ST_DTYPE[values.dtype], "shape": list(values.shape),
                                          "data_offsets": [0, nbytes]}}
    if offsets is not None:
        header[OFFSETS_KEY] = {"dtype": "I64", "shape": list(offsets.shape),
                               "data_offsets": [nbytes, nbytes + 8 * offsets.numel()]}
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8 bytes
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    _write_bytes(f, values)
    if offsets is not None:
        _write_bytes(f, offsets)


def _write_npy_header(f: BinaryIO, values: Tensor) -> None:
    np.lib.format.write_array_header_2_0(
        f, {"descr": _NPY_DESCR[values.dtype], "fortran_order": False, "shape": tuple(values.shape)})


def _write_npy_pair(path: str, values: Tensor, meta: dict) -> None:
    sidecar = path + ".json"
    old = None
    if os.path.exists(path) and os.path.exists(sidecar):
        try:
            with open(sidecar) as f:
                old = json.load(f)
            old.pop("previous", None)
        except (OSError, ValueError):
            old = None
    # 1. the new array, complete and synced, under a temporary name
    folder, fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npy_header(f, values)
            _write_bytes(f, values)
            f.flush()
            os.fsync(f.fileno())
        # 2. a sidecar valid for both the old and the new array
        transitional = dict(meta, previous=old) if old is not None else meta
        atomic_write(sidecar, lambda f: f.write(json.dumps(transitional).encode()))
        # 3. the array
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # 4. the sidecar for the new array alone
    if old is not None:
        atomic_write(sidecar, lambda f: f.write(json.dumps(meta).encode()))


# ---------------------------------------------------------------------------------------- read
def _corrupt(path: str, what: str) -> ValueError:
    return ValueError(f"{path!r} is corrupt or incomplete: {what}")


def _check_version(path: str, meta: dict) -> int:
    try:
        version = int(meta.get("format_version", "1"))
    except ValueError:
        raise _corrupt(path, f"format_version {meta.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format version {version}, written by a newer rho_kernels; this one reads "
            f"versions up to {FORMAT_VERSION}: upgrade rho_kernels to load it"
        )
    if version < 2:
        warnings.warn(f"{path!r} was written without a checksum (format version {version}); "
                      "re-save it to protect it", stacklevel=3)
    return version


def _check_meta_layout(path: str, meta: dict, dtype: torch.dtype, shape: tuple) -> None:
    if "dtype" in meta and meta["dtype"] != _DTYPE_NAME.get(dtype):
        raise _corrupt(path, f"the metadata says dtype {meta['dtype']}, the table is {_DTYPE_NAME.get(dtype, dtype)}")
    if "shape" in meta and tuple(json.loads(meta["shape"])) != tuple(shape):
        raise _corrupt(path, f"the metadata says shape {tuple(json.loads(meta['shape']))}, the table has {tuple(shape)}")


def advise_random(arr: np.ndarray) -> None:
    """Tell the kernel a mapped table is read at random (gathers): no read-ahead around each
    fault, so a gather maps only the pages it reads (less I/O and resident memory)."""
    m = getattr(arr, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap_module, "MADV_RANDOM"):
        try:
            m.madvise(mmap_module.MADV_RANDOM)
        except OSError:
            pass


def _map_or_read(path: str, start: int, nbytes: int, mmap: bool) -> Tensor:
    """Bytes ``[start, start + nbytes)`` of ``path`` as a uint8 tensor (copy-on-write mapping or read)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if mmap:
        # mode "c" (MAP_PRIVATE): a writable tensor for torch, and the file is never modified.
        arr = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(nbytes,))
        advise_random(arr)
        return torch.from_numpy(arr)
    arr = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=start)
    if arr.size != nbytes:
        raise _corrupt(path, f"expected {nbytes} bytes of table data, the file has {arr.size}")
    return torch.from_numpy(arr)


def read_table(path: str, *, mmap: bool = False, verify: bool = True, container: Optional[str] = None) -> TableFile:
    """Read a table written by :func:`write_table`; verify its checksum unless ``verify=False``."""
    path = os.fspath(path)
    container = container_of(path, container)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no table file at {path!r}")
    if container == "safetensors":
        return _read_safetensors(path, mmap, verify)
    if container == "torch":
        return _read_torch(path, mmap, verify)
    return _read_npy(path, mmap, verify)


def _verify(path: str, meta: dict, version: int, checksum: Callable[[], str]) -> None:
    if version < 2:
        return
    want = meta.get("checksum")
    if not want:
        raise _corrupt(path, "no checksum in the metadata")
    got = checksum()
    if got != want:
        raise ValueError(f"{path!r} failed its checksum (stored {want}, computed {got}): the file is damaged")


def _read_safetensors(path: str, mmap: bool, verify: bool) -> TableFile:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than a safetensors header")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > min(size - 8, 100 << 20):
            raise _corrupt(path, f"header length {hlen} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except ValueError:
            raise _corrupt(path, "unreadable header") from None
        base = 8 + hlen
        meta = dict(header.pop("__metadata__", None) or {})
        version = _check_version(path, meta)
        if TABLE_KEY not in header:
            raise _corrupt(path, f"no tensor {TABLE_KEY!r}")
        entries = {}
        for key in (TABLE_KEY, OFFSETS_KEY):
            if key not in header:
                continue
            e = header[key]
            dtype = _ST_DTYPE_INV.get(e.get("dtype"))
            if dtype is None or (key == TABLE_KEY and dtype not in TABLE_DTYPES) or (key == OFFSETS_KEY and dtype != torch.int64):
                raise _corrupt(path, f"tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(v) for v in e["data_offsets"])
            if end - begin != math.prod(shape) * torch.empty(0, dtype=dtype).element_size():
                raise _corrupt(path, f"tensor {key!r}: data size {end - begin} does not match shape {shape}")
            if base + end > size:
                raise _corrupt(path, f"truncated: tensor {key!r} ends at byte {base + end}, the file has {size}")
            entries[key] = (dtype, shape, base + begin, end - begin)
        if verify:
            regions = [entries[k][2:] for k in (TABLE_KEY, OFFSETS_KEY) if k in entries]
            _verify(path, meta, version, lambda: _file_sha256(f, regions))
    dtype, shape, start, nbytes = entries[TABLE_KEY]
    _check_meta_layout(path, meta, dtype, shape)
    values = _map_or_read(path, start, nbytes, mmap).view(dtype).reshape(shape)
    offsets = None
    if OFFSETS_KEY in entries:
        _, oshape, ostart, onbytes = entries[OFFSETS_KEY]
        offsets = _map_or_read(path, ostart, onbytes, False).view(torch.int64).reshape(oshape).clone()
    return TableFile(values, offsets, meta)


def _read_torch(path: str, mmap: bool, verify: bool) -> TableFile:
    try:
        obj = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise _corrupt(path, f"torch.load failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(TABLE_KEY), Tensor):
        raise _corrupt(path, f"not a dict with a tensor {TABLE_KEY!r}")
    values = obj.pop(TABLE_KEY)
    offsets = obj.pop(OFFSETS_KEY, None)
    meta = {k: v for k, v in obj.items() if isinstance(v, str)}
    version = _check_version(path, meta)
    _check_meta_layout(path, meta, values.dtype, tuple(values.shape))
    if verify:
        _verify(path, meta, version, lambda: tensor_sha256(values, offsets))
    return TableFile(values, offsets, meta)


def _read_npy(path: str, mmap: bool, verify: bool) -> TableFile:
    sidecar = path + ".json"
    if not os.path.exists(sidecar):
        raise ValueError(f"{path!r} has no metadata sidecar {sidecar!r} (checksum, fingerprint): "
                         "it is required to load a .npy table")
    try:
        with open(sidecar) as f:
            side = json.load(f)
    except ValueError:
        raise _corrupt(sidecar, "unreadable JSON") from None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, descr = read_header(f)
        except ValueError as exc:
            raise _corrupt(path, f"not a .npy array ({exc})") from None
        start = f.tell()
        descr = np.dtype(descr).str
        nbytes = math.prod(shape) * np.dtype(descr).itemsize
        if fortran or descr not in ("<f4", "<f2", "<u2"):
            raise _corrupt(path, f"unsupported array layout (dtype {descr}, fortran_order={fortran})")
        if start + nbytes > size:
            raise _corrupt(path, f"truncated: {start + nbytes} bytes expected, the file has {size}")
        # The sidecar describes this array, or -- after a save interrupted between its renames --
        # the array it replaced ("previous"); pick the description that fits.
        candidates = [side] + ([side["previous"]] if isinstance(side.get("previous"), dict) else [])
        problems = []
        checksum = None
        meta = None
        for cand in candidates:
            cand = {k: v for k, v in cand.items() if k != "previous"}
            dtype = _DTYPE_BY_NAME.get(cand.get("dtype", "float32"))
            if dtype not in _NPY_DESCR or _NPY_DESCR[dtype] != descr:
                problems.append(f"the sidecar says dtype {cand.get('dtype')}, the array is {descr}")
                continue
            if "shape" in cand and tuple(json.loads(cand["shape"])) != tuple(shape):
                problems.append(f"the sidecar says shape {tuple(json.loads(cand['shape']))}, the array has {tuple(shape)}")
                continue
            version = _check_version(path, cand)
            if verify and version >= 2:
                if checksum is None:
                    checksum = _file_sha256(f, [(start, nbytes)])
                if cand.get("checksum") != checksum:
                    problems.append(f"checksum mismatch (sidecar {cand.get('checksum')}, computed {checksum})")
                    continue
            meta = cand
            break
    if meta is None:
        raise ValueError(f"{path!r} does not match its sidecar {sidecar!r}: {'; '.join(problems)}")
    values = _map_or_read(path, start, nbytes, mmap).view(dtype).reshape(shape)
    return TableFile(values, None, meta)
