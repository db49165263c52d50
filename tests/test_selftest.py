"""``python -m rho_kernels selftest``: the user's own check passes here (reference, cpu, Triton
interpreted), and it fails, with a non-zero exit, when a backend is wrong."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from rho_kernels import backends, selftest


def test_selftest_passes_on_cpu(tmp_path) -> None:
    # As a user runs it: without TRITON_INTERPRET, so the Triton rows come from the interpreted
    # child process the command starts itself.
    out = tmp_path / "selftest.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rho_kernels", "selftest", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"]
    rows = {(r["backend"], r["path"]): r for r in report["rows"]}
    for name in ("reference", "cpu"):
        for path in ("plan", "ce_grad", "linear"):
            assert rows[(name, path)]["status"] == "pass" and rows[(name, path)]["checks"] > 0, (name, path)
    triton_paths = list(selftest.TRITON_PATHS) + ["ce_grad", "linear"]
    if importlib.util.find_spec("triton") is not None:  # interpreted on CPU
        for path in triton_paths:
            assert rows[("triton", path)]["status"] == "pass", rows.get(("triton", path))
    assert rows[("cuda", "plan")]["status"] == "not run" and rows[("cuda", "plan")]["not_run"]
    for line in ("backend", "triton     split_v", "all passed"):
        assert line in proc.stdout


def test_selftest_fails_on_a_wrong_backend(monkeypatch, tmp_path, capsys) -> None:
    cpu = backends.get("cpu")
    real = cpu.score_rows

    def off(p, with_lse=True):  # a slightly wrong kernel: scores 0.1% too high
        score, lse = real(p, with_lse)
        return score * 1.001, lse

    monkeypatch.setattr(cpu, "score_rows", off)
    out = tmp_path / "st.json"
    assert selftest.main(["--device", "cpu", "--backends", "cpu", "--json", str(out)]) == 1
    rows = {r["path"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["plan"]["status"] == "FAIL" and "tolerance" in rows["plan"]["failures"][0]
    assert rows["ce_grad"]["status"] == "pass"  # its own kernel, untouched
    text = capsys.readouterr().out
    assert "FAIL" in text and "FAILED" in text and "failures:" in text
