"""The suite's warning filters (pyproject.toml, [tool.pytest.ini_options] filterwarnings): a new
warning from rho_kernels fails the test that triggers it; the known, understood ones are ignored
precisely (by message, category and issuing module), so that nothing real is buried under them."""

from __future__ import annotations

import warnings

import pytest


def _warn(message: str, category: type[Warning], module: str) -> None:
    warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module, registry={})


@pytest.mark.parametrize("module", ["rho_kernels", "rho_kernels.training.il_format", "rho_kernels.backends.cpu"])
@pytest.mark.parametrize("category", [UserWarning, RuntimeWarning, DeprecationWarning, FutureWarning])
def test_a_warning_from_rho_kernels_fails_the_test(module, category):
    with pytest.raises(category, match="something new"):
        _warn("something new", category, module)


def test_expected_warnings_are_caught_with_pytest_warns():
    with pytest.warns(UserWarning, match="without a checksum"):
        _warn("'f.safetensors' was written without a checksum", UserWarning, "rho_kernels.training.il_format")


@pytest.mark.parametrize("message,category,module", [
    ("divide by zero encountered in divide", RuntimeWarning, "triton.runtime.interpreter"),
    ("invalid value encountered in subtract", RuntimeWarning, "triton.runtime.interpreter"),
    ("overflow encountered in exp", RuntimeWarning, "triton.runtime.interpreter"),
    ("Conversion of an array with ndim > 0 to a scalar is deprecated, and will error in future. Ensure you extract "
     "a single element from your array before performing this operation. (Deprecated NumPy 1.25.)",
     DeprecationWarning, "triton.runtime.interpreter"),
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
     "instead.", FutureWarning, "lightning.pytorch.utilities._pytree"),
])
def test_known_warnings_are_ignored_precisely(message, category, module):
    with warnings.catch_warnings(record=True) as caught:
        _warn(message, category, module)
    assert not caught, [str(w.message) for w in caught]
    # the same message from elsewhere is not ignored: it may be real
    with warnings.catch_warnings(record=True) as caught:
        _warn(message, category, "somewhere.else")
    assert [str(w.message) for w in caught] == [message]
