"""The public API as a user meets it: import cost, what help() shows."""

from __future__ import annotations

import os
import pydoc
import subprocess
import sys

import pytest

import rho_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_loads_neither_dynamo_nor_triton():
    """``import rho_kernels`` must not pay for torch._dynamo (~1 s) or triton: only compile paths
    and the Triton backend need them, and those import them when they run."""
    code = (
        "import sys, torch\n"
        "before = {m for m in ('torch._dynamo', 'triton') if m in sys.modules}\n"
        "import rho_kernels\n"
        "after = {m for m in ('torch._dynamo', 'triton') if m in sys.modules}\n"
        "print(sorted(before), sorted(after - before))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, added = proc.stdout.strip().rsplit("] [", 1)
    if "torch._dynamo" in before:
        pytest.skip("this torch imports torch._dynamo by itself")
    assert added == "]", f"import rho_kernels imported {added!r}"


def test_help_of_score_shows_the_methods_and_formulas():
    text = pydoc.plain(pydoc.render_doc(rk.score))
    for method, formula in (("reducible", "CE - IL"), ("loss", "CE"), ("irreducible", "-IL"),
                            ("gradnorm", "||p - onehot(y)||_2"), ("entropy", "-sum_j p_j log p_j")):
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(method + " ")), None)
        assert line is not None and formula in line, (method, line)
    assert "module docstring" not in text
    assert "help(rho_kernels.score)" in pydoc.plain(pydoc.render_doc(rk.api))
