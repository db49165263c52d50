"""Loss-table files: checksums verified on load, damage detected, atomic save under SIGKILL.

The kill tests fork a child that SIGKILLs itself at the K-th file-system event of a save (each
chunk written, fsync, rename), for every K, and check that the target still loads -- as the old
table, or as the new one once the rename happened.
"""

import json
import math
import multiprocessing
import os
import signal
import struct

import numpy as np
import pytest
import torch

from rho_kernels.training import IrreducibleLossStore, TokenLossStore, il_format

torch.set_num_threads(1)

SUFFIXES = [".safetensors", ".pt", ".npy"]


def _table(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(n, generator=g) * 3
    losses[7] = math.nan
    return IrreducibleLossStore(losses, f"n={n};labels_sha256={seed}", num_ignored=1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("mmap", [False, True])
def test_roundtrip_keeps_bits_and_metadata(tmp_path, suffix, mmap):
    s = _table()
    path = tmp_path / f"il{suffix}"
    s.save(path)
    back = IrreducibleLossStore.load(path, mmap=mmap)
    assert _same(back.losses, s.losses)
    assert back.fingerprint == s.fingerprint and back.num_ignored == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left over


def test_safetensors_file_is_readable_by_the_safetensors_library(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    s = _table()
    s.save(tmp_path / "il.safetensors")
    assert _same(safetensors.load_file(tmp_path / "il.safetensors")["irreducible_loss"], s.losses)
    vals = torch.rand(4, 6).to(torch.bfloat16)
    TokenLossStore(vals).save(tmp_path / "tok.safetensors")
    assert torch.equal(safetensors.load_file(tmp_path / "tok.safetensors")["irreducible_loss"], vals)


def _data_start(path: str, suffix: str) -> int:
    if suffix == ".safetensors":
        with open(path, "rb") as f:
            return 8 + struct.unpack("<Q", f.read(8))[0]
    if suffix == ".npy":
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_2_0(f)
            return f.tell()
    return -1


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_flipped_byte_is_detected(tmp_path, suffix):
    path = str(tmp_path / f"il{suffix}")
    _table().save(path)
    if suffix == ".pt":
        # flip a byte of the tensor's storage inside the zip (stored uncompressed)
        raw = open(path, "rb").read()
        needle = _table().losses[:4].numpy().tobytes()
        offset = raw.index(needle) + 5
    else:
        offset = _data_start(path, suffix) + 4 * 100 + 1
    _flip(path, offset)
    for mmap in (False, True):
        with pytest.raises(ValueError, match="checksum") as e:
            IrreducibleLossStore.load(path, mmap=mmap)
        assert path in str(e.value)
    IrreducibleLossStore.load(path, verify=False)  # opted out: loads (the damage is the caller's)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_file_is_detected(tmp_path, suffix):
    path = str(tmp_path / f"il{suffix}")
    _table().save(path)
    size = os.path.getsize(path)
    os.truncate(path, size - 10)
    with pytest.raises(ValueError, match="corrupt|truncated|checksum") as e:
        IrreducibleLossStore.load(path)
    assert path in str(e.value)
    os.truncate(path, 5)
    with pytest.raises(ValueError) as e:
        IrreducibleLossStore.load(path, mmap=True)
    assert path in str(e.value)


def test_npy_sidecar_missing_or_mismatched(tmp_path):
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    _table(seed=1).save(a)
    _table(seed=2).save(b)
    os.replace(b + ".json", a + ".json")  # a's array with b's sidecar: same shape, other table
    with pytest.raises(ValueError, match="does not match its sidecar.*checksum") as e:
        IrreducibleLossStore.load(a)
    assert a in str(e.value)
    os.unlink(a + ".json")
    with pytest.raises(ValueError, match="sidecar") as e:
        IrreducibleLossStore.load(a)
    assert a in str(e.value)
    _table(n=299).save(b)  # other shape
    os.replace(b + ".json", a + ".json")
    with pytest.raises(ValueError, match="shape"):
        IrreducibleLossStore.load(a)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_wrong_dtype_or_shape_in_metadata_and_newer_version(tmp_path, suffix):
    path = str(tmp_path / f"il{suffix}")
    vals = torch.rand(12)

    def save_with(meta_patch):
        meta = {"kind": "example", "fingerprint": "", "num_examples": "12"}
        il_format.write_table(path, vals, meta)
        # rewrite the metadata in place of the one write_table made
        tab = il_format.read_table(path)
        meta = dict(tab.meta, **meta_patch)
        if suffix == ".npy":
            with open(path + ".json", "w") as f:
                json.dump(meta, f)
        elif suffix == ".pt":
            torch.save({"irreducible_loss": vals, **meta}, path)
        else:
            il_format.atomic_write(path, lambda f: il_format._write_safetensors(f, vals, None, meta))

    save_with({"dtype": "float16"})
    with pytest.raises(ValueError, match="dtype") as e:
        IrreducibleLossStore.load(path)
    assert path in str(e.value)
    save_with({"shape": "[13]"})
    with pytest.raises(ValueError, match="shape"):
        IrreducibleLossStore.load(path)
    save_with({"format_version": str(il_format.FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match="newer rho_kernels"):
        IrreducibleLossStore.load(path)


def test_version_1_files_load_with_a_warning(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"irreducible_loss": torch.ones(3), "format_version": "1", "fingerprint": "", "num_examples": "3"}, path)
    with pytest.warns(UserWarning, match="without a checksum"):
        s = IrreducibleLossStore.load(path)
    assert torch.equal(s.losses, torch.ones(3))


# ------------------------------------------------------------------------------ kills mid-save
_EVENTS = {"n": 0, "kill_at": 0}


def _tick():
    _EVENTS["n"] += 1
    if _EVENTS["n"] == _EVENTS["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _instrument(monkeypatch_like):
    """Make every chunk write, fsync and rename of il_format an event."""
    orig_write, orig_fsync, orig_replace = il_format._write_bytes, os.fsync, os.replace

    def write_bytes(f, t):
        for chunk in il_format._byte_chunks(t):
            _tick()
            f.write(memoryview(chunk))
            f.flush()

    def fsync(fd):
        _tick()
        orig_fsync(fd)

    def replace(a, b):
        _tick()
        orig_replace(a, b)
        _tick()

    orig_save = torch.save

    def torch_save(obj, f):  # torch.save writes in one go: replay its bytes in chunks
        import io

        buf = io.BytesIO()
        orig_save(obj, buf)
        raw = buf.getvalue()
        for i in range(0, len(raw), 256):
            _tick()
            f.write(raw[i:i + 256])
            f.flush()

    monkeypatch_like(il_format, "_write_bytes", write_bytes)
    monkeypatch_like(torch, "save", torch_save)
    monkeypatch_like(il_format, "_CHUNK", 256)  # many chunks: kills land inside the data
    monkeypatch_like(os, "fsync", fsync)
    monkeypatch_like(os, "replace", replace)
    del orig_write


def _save_child(path: str, seed: int, kill_at: int, conn) -> None:
    torch.set_num_threads(1)
    _instrument(setattr)
    _EVENTS["kill_at"] = kill_at
    _table(seed=seed).save(path)
    conn.send(_EVENTS["n"])


def _run_child(target, args, timeout=60):
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, send))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail("child process hung")
    out = recv.recv() if recv.poll() else None
    return p.exitcode, out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_killed_at_every_point_leaves_a_loadable_file(tmp_path, suffix):
    path = str(tmp_path / f"il{suffix}")
    old, new = _table(seed=1), _table(seed=2)
    old.save(path)
    code, events = _run_child(_save_child, (str(tmp_path / f"dry{suffix}"), 2, 0))
    assert code == 0 and events > 6
    outcomes = set()
    for k in range(1, events + 1):
        old.save(path)  # the previous good file
        code, _ = _run_child(_save_child, (path, 2, k))
        assert code == -signal.SIGKILL
        got = IrreducibleLossStore.load(path)  # never an error: the old file or the new one
        if _same(got.losses, old.losses):
            outcomes.add("old")
            assert got.fingerprint == old.fingerprint
        else:
            assert _same(got.losses, new.losses), f"killed at event {k}: neither the old nor the new table"
            assert got.fingerprint == new.fingerprint
            outcomes.add("new")
        for p in os.listdir(tmp_path):  # leftover temporaries of the killed save are harmless
            if p.endswith(".tmp"):
                os.unlink(tmp_path / p)
    assert outcomes == {"old", "new"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_save_into_a_missing_folder_names_the_target(tmp_path, suffix):
    """The error names the file asked for and its missing folder, not the temporary file beside it."""
    target = tmp_path / "no-such-folder" / ("il" + suffix)
    for store in (IrreducibleLossStore(torch.rand(6)), TokenLossStore(torch.rand(2, 3))):
        with pytest.raises(FileNotFoundError) as info:
            store.save(str(target))
        msg = str(info.value)
        assert repr(str(target)) in msg and "does not exist" in msg and str(tmp_path / "no-such-folder") in msg, msg
        assert ".tmp" not in msg, msg
    assert not (tmp_path / "no-such-folder").exists()
