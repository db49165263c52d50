"""The CPU kernel's run-time instruction-set choice (csrc/cpu/select_cpu.cpp).

The conformance suite runs the CPU backend once per instruction set this machine supports
(tests/conftest.py); these tests check the choice itself: the default, the environment override
and bad names.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rho_kernels as rk
from conftest import cpu_isas

ISAS = ("scalar", "avx2", "avx512")

pytestmark = pytest.mark.skipif(not cpu_isas(), reason="the extension's CPU kernel is not built")


def test_default_is_a_known_isa():
    assert torch.ops.rho_kernels.cpu_isa() in ISAS


def test_environment_forces_a_lower_isa():
    code = "import rho_kernels, torch; print(torch.ops.rho_kernels.cpu_isa())"
    env = {**os.environ, "RHO_KERNELS_CPU_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "scalar"


def test_set_isa_switches_and_resets():
    best = torch.ops.rho_kernels.cpu_isa()
    try:
        assert torch.ops.rho_kernels._set_cpu_isa("scalar") == "scalar"
        x, y, il = torch.randn(100, 10), torch.randint(0, 10, (100,)), torch.rand(100)
        got = rk.score(x, y, il, backend="cpu")
        want = rk.score(x, y, il, backend="reference")
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        assert torch.ops.rho_kernels._set_cpu_isa("") == best


def test_unknown_isa_is_a_clear_error():
    with pytest.raises((ValueError, RuntimeError), match="bogus"):
        torch.ops.rho_kernels._set_cpu_isa("bogus")
    assert torch.ops.rho_kernels.cpu_isa() in ISAS
