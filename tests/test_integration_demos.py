"""The real-data demos in quick mode: they run offline, write their results, and show the
direction of the methods' claims (not numbers)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")  # CI installs the pinned extras (requirements.txt)
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, tmp_path, *extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "python", script), "--quick", "--out", str(tmp_path),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_rho_loss_digits_quick(tmp_path):
    proc = run("rho_loss_digits_demo.py", tmp_path, "--no-progress")
    result = json.loads((tmp_path / "rho_loss_digits_demo_quick.json").read_text())
    assert (tmp_path / "rho_loss_digits_demo_quick.png").stat().st_size > 0
    s = result["summary"]
    assert set(s) == {"uniform", "loss", "reducible"}
    # loss selection chases flipped labels far above their base rate; RHO-LOSS picks fewer
    assert s["loss"]["noisy_pick_fraction"] > 1.5 * s["loss"]["noisy_candidate_fraction"]
    assert s["reducible"]["noisy_pick_fraction"] < s["loss"]["noisy_pick_fraction"]
    for m in s.values():
        assert 0.0 <= m["final_test_accuracy"] <= 1.0
    assert "steps to target" in proc.stdout


def test_rho1_trainer_quick(tmp_path):
    run("rho1_trainer_demo.py", tmp_path)
    result = json.loads((tmp_path / "rho1_trainer_demo_quick.json").read_text())
    s = result["summary"]
    assert set(s) == {"reference", "all", "random", "rho1"}
    corrupt = result["config"]["corrupt"]
    # all-token and random-subset training see the corruption at its base rate; Rho-1 drops
    # corrupted targets (their reference loss is high) and trains on fewer of them
    assert s["all"]["corrupted_fraction_of_kept"] == pytest.approx(corrupt, abs=0.02)
    assert s["random"]["corrupted_fraction_of_kept"] == pytest.approx(corrupt, abs=0.03)
    assert s["rho1"]["corrupted_fraction_of_kept"] < corrupt - 0.05
    seed0 = result["per_seed"][0]
    assert seed0["rho1"]["last_logged"]["rho1/kept_fraction"] == pytest.approx(0.6, abs=0.01)
    assert seed0["all"]["last_logged"]["rho1/kept_fraction"] == 1.0
    for v in s.values():
        assert 0.0 < v["clean_eval_loss"] < 6.0
