"""The README's statements that a test can hold to the code."""

from __future__ import annotations

import os
import re

import pytest
import torch

import rho_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_section(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


@pytest.mark.parametrize("method", ["reducible", "loss", "irreducible"])
def test_gradient_paragraph_matches_the_op(method):
    """"For `a` and `b`, d/dlogits = (softmax - onehot)·g": exactly those methods' logits get a gradient."""
    text = readme_section("The op")
    found = re.search(r"For ([^.;]*?),\s+d/dlogits = \(softmax − onehot\)·g", text)
    assert found, "the gradient paragraph's d/dlogits sentence"
    with_logit_grad = set(re.findall(r"`(\w+)`", found.group(1)))
    assert with_logit_grad <= set(rk.METHODS), with_logit_grad
    logits = torch.randn(3, 4, requires_grad=True)
    il = torch.rand(3, requires_grad=True)
    rk.score(logits, torch.tensor([0, 1, 2]), il, method=method).sum().backward()
    has_grad = logits.grad is not None and bool(logits.grad.abs().sum() > 0)
    assert has_grad == (method in with_logit_grad), (method, logits.grad, found.group(0))


def test_install_says_how_to_build_the_tarball_it_names():
    text = readme_section("Install")
    assert f"rho_kernels-{rk.__version__}.tar.gz" in text  # the version the sdist gets
    assert "python -m build --sdist --no-isolation" in text
