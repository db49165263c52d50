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


@pytest.fixture(params=rk.BACKENDS)
def backend(request) -> str:
    name = request.param
    reason = backends.unavailable_reason(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {name!r} cannot run on {DEVICE}: {reason}")
    return name


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def is_slow_backend(name: str) -> bool:
    """Triton under the CPU interpreter runs every program in numpy: keep its shapes small."""
    return name == "triton" and INTERPRETED
