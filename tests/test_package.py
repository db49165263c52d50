"""Packaging-level behaviour: the package without its extension, and the bench command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

import rho_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


def test_works_without_the_extension():
    """A build with RHO_KERNELS_NO_EXT=1 has no rho_kernels._C: the package must still import
    and select through the reference.  Simulated by hiding _C from the import system."""
    code = """
import sys, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rho_kernels._C":
            raise ImportError("hidden for the test")
sys.meta_path.insert(0, Hide())
import torch, rho_kernels as rk
from rho_kernels.backends import _extension
assert _extension.LOAD_ERROR is not None
backends = rk.available_backends("cpu")
assert "cpu" not in backends and "reference" in backends, backends
x = torch.randn(10, 4); t = torch.arange(10) % 4; il = torch.zeros(10)
sel = rk.select(x, t, il, 3)
want = rk.select(x, t, il, 3, backend="reference")
assert torch.equal(sel.indices, want.indices)
print("ok")
"""
    proc = run_python(code, TRITON_INTERPRET="0")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_bench_command_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    backends = ",".join(["reference"] + [b for b in rk.available_backends("cpu") if b in ("cpu",)])
    proc = subprocess.run(
        [sys.executable, "-m", "rho_kernels", "bench", "--device", "cpu", "--shapes", "64x50,3x7",
         "--dtypes", "float32,bfloat16", "--backends", backends, "--repeats", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read floor" in proc.stdout and "GB/s" in proc.stdout
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["info"]["rho_kernels"] == rk.__version__  # the `info` report
    rows = data["results"]
    names = {r["backend"] for r in rows}
    assert set(backends.split(",")) <= names
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["N"] in (64, 3)
    assert {(r["N"], r["dtype"]) for r in rows} == {(64, "float32"), (64, "bfloat16"), (3, "float32"), (3, "bfloat16")}


def test_bench_prints_no_tooling_warnings():
    """torch.compile of the reference must not leak build-tool log lines into the bench output."""
    proc = subprocess.run(
        [sys.executable, "-m", "rho_kernels", "bench", "--device", "cpu", "--shapes", "3x7", "--dtypes", "float32",
         "--backends", "compiled", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, CUDA_HOME="/usr/local"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
    noisy = [line for line in proc.stderr.splitlines() if "CUDA runtime" in line or "Warning" in line
             or re.match(r"^[WE]\d{4} ", line)]
    assert not noisy, noisy


def test_cli_rejects_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "rho_kernels", "frobnicate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "frobnicate" in proc.stderr
