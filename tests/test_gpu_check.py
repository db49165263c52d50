"""benchmarks/gpu_check.py's dry run (CPU, tiny shapes): the budgeted order, the skip reasons, the
budget itself and the file limit, so that the script for a short GPU window cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["selftest", "build", "smoke", "bench", "bench_softcap", "bench_small", "memcheck", "selective_ce", "linear",
         "suite"]


def _run(out: Path, budget: float, *extra: str) -> tuple[dict, float]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--out", str(out), "--budget-s", str(budget), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget + 120)
    wall = time.time() - t0
    summary = out / "gpu_check.json"
    assert summary.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(summary.read_text()), wall


def test_no_budget_skips_every_step_with_a_reason(tmp_path: Path) -> None:
    s, _ = _run(tmp_path, 0, "--wheels", str(tmp_path / "nowheels"))
    assert s["order"] == ["wheels"] + ORDER
    for name, step in s["steps"].items():
        assert step["status"] == "skipped", (name, step)
        assert step["reason"], name
    assert "budget" in s["steps"]["smoke"]["reason"]
    assert "GPU" in s["steps"]["memcheck"]["reason"]
    assert "no *.whl" in s["steps"]["wheels"]["reason"]
    assert s["ok"] is False  # nothing ran: never a pass


def test_dry_run_spends_its_budget_in_order(tmp_path: Path) -> None:
    budget = 90
    s, wall = _run(tmp_path, budget)
    assert s["order"] == ORDER
    statuses = [s["steps"][n]["status"] for n in ORDER]
    assert set(statuses) <= {"ok", "failed", "timeout", "skipped"}
    # on a loaded machine the budget may run out early; a step that ran must not fail
    assert s["steps"]["build"]["status"] in ("ok", "timeout"), s["steps"]["build"]
    for name in ORDER:
        step = s["steps"][name]
        if step["status"] == "skipped":
            assert step["reason"]
        else:
            assert step["seconds"] <= step["limit_s"] + 5, (name, step)
        if step["status"] == "failed":
            pytest.fail(f"dry-run step {name} failed:\n{step['tail']}")
    # a step starts only while the budget holds its minimum, and is cut at what is left
    assert s["elapsed_s"] <= budget + 10, s["elapsed_s"]
    assert wall <= budget + 30
    if s["steps"]["selftest"]["status"] == "ok":  # the first step's verdict is in the summary
        rows = s["results"]["selftest"]["rows"]
        assert s["results"]["selftest"]["passed"] and {r["backend"] for r in rows} == {"reference", "cpu"}
    if s["steps"]["bench_softcap"]["status"] == "ok":  # soft-capped rows, kept inside gpu_check.json
        rows = s["results"]["bench_softcap"]["results"]
        assert rows and all(r["softcap"] == 30.0 and r["dtype"] == "bfloat16" for r in rows), rows
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == tmp_path for p in files), files
