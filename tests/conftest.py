"""Shared fixtures: the device under test and the backends to run the conformance suite on.

RHO_KERNELS_TEST_DEVICE selects the device (default "cpu"; the GPU check sets "cuda").
A backend that cannot run here is skipped with the reason it gave; tests/test_build.py and
test_expected_backends_present make sure the ones that must run here are not skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

import rho_kernels as rk
from rho_kernels import backends

DEVICE = torch.device(os.environ.get("RHO_KERNELS_TEST_DEVICE", "cpu"))
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_params():
    return [pytest.param(name, id=name) for name in rk.BACKENDS]


def cpu_isas() -> list[str]:
    """Instruction sets of the CPU kernel this machine can run, the default (best) first."""
    try:
        best = torch.ops.rho_kernels.cpu_isa()
    except (AttributeError, RuntimeError):  # extension not built
        return []
    order = ["avx512", "avx2", "scalar"]
    return order[order.index(best):] if best in order else [best]


# The CPU backend runs once per instruction set: "cpu" with the default one, then "cpu-<isa>"
# for each lower one this machine supports (switched in-process by rho_kernels::_set_cpu_isa).
# RHO_KERNELS_TEST_LOWER_ISAS=0 keeps the default one only (the second CI environment, which
# repeats the suite under other torch/triton versions, not other instruction sets).
_LOWER_CPU_ISAS = (cpu_isas()[1:] if DEVICE.type == "cpu" and os.environ.get("RHO_KERNELS_TEST_LOWER_ISAS", "1") != "0"
                   else [])
BACKEND_CASES = list(rk.BACKENDS) + [f"cpu-{isa}" for isa in _LOWER_CPU_ISAS]


@pytest.fixture(params=BACKEND_CASES)
def backend(request):
    name, _, isa = request.param.partition("-")
    reason = backends.unavailable_reason(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot run on {DEVICE}: {reason}")
    if not isa:
        yield name
        return
    assert torch.ops.rho_kernels._set_cpu_isa(isa) == isa
    try:
        yield name
    finally:
        torch.ops.rho_kernels._set_cpu_isa("")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def is_slow_backend(name: str) -> bool:
    """Triton under the CPU interpreter runs every program in numpy: keep its shapes small."""
    return name == "triton" and INTERPRETED


# Minutes-long tests first, so that pytest-xdist's other worker runs the many short ones beside
# them instead of one worker finishing alone at the end (the order of the rest is unchanged).
_LONG_FIRST = ("tests/test_triton_aot.py", "tests/test_gpu_check.py", "tests/test_integration_demos.py",
               "tests/test_demo.py", "tests/test_integration_transformers.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)
