"""Packaging-level behaviour: the package without its extension, and the bench command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
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


BAD_BENCH_ARGS = [
    (["--backends", "bogus"], "unknown backend 'bogus'"),
    (["--backends", "reference,"], "unknown backend ''"),
    (["--backends", "cuda"], "'cuda' cannot run on cpu"),
    (["--k-ratio", "2"], "--k-ratio 2.0: need 0 < ratio <= 1"),
    (["--k-ratio", "0"], "--k-ratio 0.0: need 0 < ratio <= 1"),
    (["--shapes", "3x0"], "bad shape '3x0'"),
    (["--shapes=-1x5"], "bad shape '-1x5'"),
    (["--shapes", "8192by32000"], "bad shape '8192by32000'"),
    (["--dtypes", "float8"], "unknown dtype 'float8'"),
    (["--repeats", "0"], "--repeats 0"),
    (["--device", "gpu"], "--device 'gpu': expected cpu or cuda"),
    (["--device", "meta"], "--device 'meta': expected cpu or cuda"),
    (["--softcap", "0"], "--softcap 0.0: need a finite cap > 0"),
    (["--softcap", "inf"], "--softcap inf: need a finite cap > 0"),
    (["--softcap", "30", "--backends", "liger"], "'liger' cannot run with --softcap"),
]


@pytest.mark.parametrize("args,message", BAD_BENCH_ARGS, ids=[" ".join(a) for a, _ in BAD_BENCH_ARGS])
def test_bench_rejects_bad_arguments_up_front(args, message, capsys):
    """A bad argument is a usage error (exit 2) naming it, before any timing (not ERROR rows, exit 0)."""
    from rho_kernels import benchmark

    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--device", "cpu", "--shapes", "3x7", "--dtypes", "float32", "--repeats", "1"] + args)
    out = capsys.readouterr()
    assert exc.value.code == 2 and message in out.err, (exc.value.code, out)
    assert "rho_kernels bench on" not in out.out  # nothing ran


def test_bench_rejects_cuda_without_a_gpu(monkeypatch, capsys):
    from rho_kernels import benchmark

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--device", "cuda", "--shapes", "3x7", "--repeats", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--device 'cuda': no CUDA device is available" in err, err


def test_bench_exits_nonzero_when_a_row_fails(monkeypatch, capsys):
    """One backend raising is reported as its ERROR row, the others still run, and the exit status says so."""
    from rho_kernels import benchmark

    select = rk.select

    def broken_cpu(*args, backend="auto", **kwargs):
        if backend == "cpu":
            raise RuntimeError("broken for the test")
        return select(*args, backend=backend, **kwargs)

    monkeypatch.setattr(rk, "select", broken_cpu)
    backends = ",".join(["reference"] + [b for b in rk.available_backends("cpu") if b == "cpu"])
    code = benchmark.main(["--device", "cpu", "--shapes", "3x7", "--dtypes", "float32", "--backends", backends,
                           "--repeats", "1"])
    out = capsys.readouterr()
    assert "reference" in out.out
    if "cpu" in backends:
        assert code == 1 and "ERROR RuntimeError: broken for the test" in out.out, out
        assert "1 of 3 rows failed" in out.err, out.err
    else:
        assert code == 0, out


def test_bench_runs_zero_rows(tmp_path, capsys):
    """N = 0 is a valid shape: k = 0 rows of 0 (not kept_count's at-least-one), every backend times it."""
    from rho_kernels import benchmark

    out = tmp_path / "bench.json"
    backends = ",".join(["reference"] + [b for b in rk.available_backends("cpu") if b == "cpu"])
    code = benchmark.main(["--device", "cpu", "--shapes", "0x50,2x50", "--dtypes", "float32", "--backends", backends,
                           "--repeats", "1", "--json", str(out)])
    assert code == 0, capsys.readouterr()
    rows = json.loads(out.read_text())["results"]
    assert {r["N"] for r in rows} == {0, 2} and not [r for r in rows if "error" in r], rows
    assert {r["k"] for r in rows if r["N"] == 0} == {0}


def test_cli_output_into_a_closed_pipe_is_quiet():
    """`python -m rho_kernels info --json | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "rho_kernels", "info", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes anything (it imports torch first)
    err = proc.stderr.read()
    code = proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 141, (code, err)  # 128 + SIGPIPE, as a program killed by it reports


def test_bench_table_columns_line_up(capsys):
    """Every cell, "-" for an unknown value included, ends where its header ends."""
    from rho_kernels import benchmark

    base = {"N": 8192, "V": 32000, "dtype": "bfloat16"}
    benchmark.print_table([
        dict(base, backend="read floor (logits.sum)", ms=57.7, gbps=17.8, peak_extra_bytes=0),
        dict(base, backend="cpu", ms=65.7, gbps=16.0, pct_of_read_bw=88.0, speedup_vs_eager=15.8,
             speedup_vs_compiled=2.62, peak_extra_bytes=None),
    ])
    head, rule, *lines = capsys.readouterr().out.splitlines()
    ends, at = [], 0
    for name in ("shape", "dtype", "backend", "ms", "GB/s", "%read", "x eager", "x compiled", "peak extra"):
        at = head.index(name, at) + len(name)
        ends.append(at)
    assert len(rule) == len(head), head
    for line in lines:
        assert len(line) == len(head), (line, head)
        for end in ends:
            assert line[end - 1] != " " and (end == len(line) or line[end] == " "), (line, head)
