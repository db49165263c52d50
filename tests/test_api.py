"""The public API as a user meets it: import cost, what help() shows, errors a first try meets."""

from __future__ import annotations

import os
import pydoc
import subprocess
import sys

import pytest
import torch

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


def test_meta_k_is_a_clear_error():
    """Meta tensors give shapes (tests/test_conformance.py), but a meta k has no value to size the output with."""
    x = torch.empty(4, 5, device="meta")
    y = torch.empty(4, dtype=torch.long, device="meta")
    il = torch.empty(4, device="meta")
    k = torch.tensor(2, device="meta")
    with pytest.raises(TypeError, match="k is a meta tensor, which has no value.*pass an int"):
        rk.select(x, y, il, k)
    with pytest.raises(TypeError, match="k is a meta tensor"):
        rk.select_sequences(x.reshape(2, 2, 5), y.reshape(2, 2), il.reshape(2, 2), k=k)
    assert rk.select(x, y, il, 2).indices.shape == (2,)  # an int k on meta inputs: shapes, as before
