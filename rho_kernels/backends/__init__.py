"""The backends and how a call picks one.

Every backend is a module with the same small interface:

* ``NAME``;
* ``unavailable_reason(device) -> str | None`` (None where it runs on ``device``);
* ``score_rows(p: RowProblem, with_lse=True, with_zsum=False) -> (score float32 [N], lse [N])``;
  with ``with_lse=False`` the lse is an empty ``[0]`` tensor (the extension's kernels then skip
  writing it: at small V it is as many bytes as the logits); with ``with_zsum=True`` a third
  output, ``zsum [N]`` (lse dtype) = ``sum_j z'_j`` (label smoothing:
  ``CE_smooth = lse - (1 - eps) z'_y - eps zsum / V``);
* ``select_rows(p: RowProblem, k) -> (indices, scores, valid)``;
* ``ce_grad_unavailable_reason(device)`` and
  ``ce_grad_rows(logits, targets, lse, row_scale, ignore_index, inplace=False, *, softcap=0.0,
  logit_scale=1.0, label_smoothing=0.0, z_loss=0.0)``, the cross-entropy gradient (plain:
  ``row_scale * (softmax - onehot)``; in general ``reference.ce_grad_rows``'s formula) computed
  from a saved log-sum-exp.

Every one of them honours the RowProblem's logit transform (``p.softcap``, ``p.logit_scale``:
everything is that of ``z' = softcap * tanh(logit_scale * z / softcap)``).

========  =======================================  =========================================
name      module                                   runs on
========  =======================================  =========================================
reference ``rho_kernels.reference``                everywhere; the definition
cpu       ``backends.cpu`` (extension, csrc/cpu/)   CPU tensors
triton    ``backends.triton_select`` (+ ``triton_ce_grad``)  CUDA tensors (CPU under TRITON_INTERPRET=1)
cuda      ``backends.cuda`` (extension, csrc/cuda/) CUDA tensors
========  =======================================  =========================================

``"auto"`` on a CUDA device resolves to the Triton backend behind a fallback guard
(``_Fallback``, named ``"auto:triton"``): a Triton compile or launch failure for one launch
configuration (out of shared memory or registers on a smaller GPU, a compiler error on a new
architecture) runs that call, and every later one of the same configuration, on the next backend,
with one warning per process.  ``RHO_KERNELS_BACKEND`` (read at import) makes ``"auto"`` mean
one named backend instead.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

import torch

from .. import reference
from . import _extension, cpu, cuda

NAMES: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
# Backends with a ce_grad_rows kernel of their own.
GRAD_NAMES: tuple[str, ...] = ("reference", "cpu", "triton")
# What "auto" means when set (read once, at import, like TRITON_INTERPRET).
ENV_BACKEND = "RHO_KERNELS_BACKEND"
_ENV_CHOICE = os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
FALLBACK_PREFIX = "auto:"


def _triton():
    # Imported lazily: importing triton costs a second and it may be absent.  An import
    # statement, not importlib: dynamo cannot trace importlib.import_module.
    from . import triton_select

    return triton_select


def get(name: str):
    """The backend module called ``name`` (ValueError for an unknown name)."""
    if name == "reference":
        return reference
    if name == "cpu":
        return cpu
    if name == "cuda":
        return cuda
    if name == "triton":
        return _triton()
    if name == FALLBACK_PREFIX + "triton":
        return _FALLBACK
    raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(NAMES)}")


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` (None where it can)."""
    try:
        return get(name).unavailable_reason(device)
    except ImportError as exc:
        return f"it could not be imported ({exc})"


def auto_name(device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device``: the fused kernel, else the reference
    (or the backend ``RHO_KERNELS_BACKEND`` names)."""
    if _ENV_CHOICE != "auto":
        if _ENV_CHOICE not in NAMES:
            raise ValueError(f"{ENV_BACKEND}={_ENV_CHOICE!r} is not a backend; expected 'auto' or one of {list(NAMES)}")
        return _ENV_CHOICE
    if device.type == "cuda":
        # The CUDA kernel stays out of "auto" until it has passed the suite on a GPU.
        order: tuple[str, ...] = ("cuda", "triton") if _extension.CUDA_VERIFIED else ("triton",)
    elif device.type == "cpu":
        order = ("cpu",)
    else:
        order = ()
    for name in order:
        if unavailable_reason(name, device) is None:
            return name
    return "reference"


def resolve(backend: str, device: torch.device):
    """The backend module that will run on ``device`` (ValueError if it cannot)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
    name = auto_name(device) if backend == "auto" else backend
    reason = unavailable_reason(name, device)  # ValueError for unknown names
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run here: {reason}")
    if backend == "auto" and name == "triton" and _ENV_CHOICE == "auto":
        return _FALLBACK
    return get(name)


def grad_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why the ``ce_grad_rows`` kernel of backend ``name`` cannot run on ``device``."""
    if name.startswith(FALLBACK_PREFIX):
        name = name[len(FALLBACK_PREFIX):]
    if name not in NAMES:
        raise ValueError(f"unknown backward implementation {name!r}; expected one of {list(GRAD_NAMES)}")
    try:
        return get(name).ce_grad_unavailable_reason(device)
    except ImportError as exc:
        return f"it could not be imported ({exc})"


def grad_backend_for(backend: str, forward_name: str, device: torch.device) -> str:
    """The backend whose ``ce_grad_rows`` pairs with a forward backend.

    An explicit backend gets its own kernel ("reference" the torch implementation; "cuda" has no
    ce_grad_rows kernel and uses Triton's); "auto" takes the fastest one available on the
    device, independently of which forward kernel "auto" found.
    """
    if backend == "auto" or forward_name == "cuda":
        order: tuple[str, ...] = ("cpu",) if device.type == "cpu" else ("triton",)
    else:
        order = (forward_name,) if forward_name in GRAD_NAMES else ()
    for name in order:
        if grad_unavailable_reason(name, device) is None:
            return FALLBACK_PREFIX + name if backend == "auto" and name == "triton" and _ENV_CHOICE == "auto" else name
    if backend != "auto" and forward_name != "cuda" and order:
        raise ValueError(f"backend {forward_name!r} cannot run the backward here: "
                         f"{grad_unavailable_reason(forward_name, device)}")
    return "reference"


# ----------------------------------------------------------------------------------------------
# "auto" on CUDA: Triton, falling back per launch configuration when Triton cannot compile or
# launch it.  Only host-side Python around the calls (no sync); under torch.compile the Triton
# ops are called directly (Inductor compiles them; nothing to catch at trace time).
# ----------------------------------------------------------------------------------------------

def _launch_failure(exc: BaseException) -> bool:
    """A Triton compile/launch failure (a fallback is safe): triton's own errors, or an error
    raised from inside the triton package (MLIR passes, the driver's launcher).  Not an out of
    memory error from torch (another backend would need more memory), not anything else."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    try:
        from triton.errors import TritonError
    except ImportError:  # older layouts
        from triton.compiler.errors import TritonError  # type: ignore[no-redef]
    if isinstance(exc, TritonError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    mod = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return mod == "triton" or mod.startswith("triton.")


def _config_key(fn: str, args: tuple, kwargs: dict) -> tuple:
    """The launch configuration of a call: every tensor's dtype, shape, strides, device; every
    other argument's value (the plan depends on nothing else)."""
    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("T", x.dtype, tuple(x.shape), tuple(x.stride()), str(x.device))
        if isinstance(x, tuple):  # RowProblem and other tuples
            return tuple(one(y) for y in x)
        return x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)
    return (fn, one(args), tuple(sorted((k, one(v)) for k, v in kwargs.items())))


def _device_of(args: tuple) -> torch.device:
    for x in args:
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, tuple):
            for y in x:
                if isinstance(y, torch.Tensor):
                    return y.device
    return torch.device("cpu")


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"{torch.cuda.get_device_name(idx)} (sm_{major}{minor}, {device})"
    return str(device)


class _Fallback:
    """The Triton backend as ``"auto"`` uses it: a call that fails to compile or launch runs on
    the next backend (``fallback``), and so does every later call of the same launch
    configuration in this process; one warning per process names the error, the device and the
    fix.  ``backend="triton"`` gets the module itself, whose errors propagate."""

    NAME = FALLBACK_PREFIX + "triton"

    def __init__(self, primary: Callable[[], Any], fallback: str = "reference") -> None:
        self._primary = primary
        self.fallback = fallback
        self.failed: dict[tuple, str] = {}  # launch configuration -> the error it raised
        self.warned = False

    def __getattr__(self, attr: str) -> Any:  # the rest of the interface: the Triton module's
        return getattr(self._primary(), attr)

    def _call(self, fn: str, args: tuple, kwargs: dict) -> Any:
        if torch.compiler.is_compiling():
            return getattr(self._primary(), fn)(*args, **kwargs)
        key = _config_key(fn, args, kwargs)
        if key not in self.failed:
            try:
                return getattr(self._primary(), fn)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - narrowed by _launch_failure
                if not _launch_failure(exc):
                    raise
                self.failed[key] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
                self._warn(fn, args, self.failed[key])
        return getattr(get(self.fallback), fn)(*args, **kwargs)

    def _warn(self, fn: str, args: tuple, error: str) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"rho_kernels: the Triton backend could not compile or launch {fn} on "
            f"{_device_label(_device_of(args))}: {error}. backend='auto' runs this launch configuration "
            f"(and any other that fails) on the {self.fallback!r} backend for the rest of the process "
            f"(slower). To choose explicitly: backend='{self.fallback}' or {ENV_BACKEND}={self.fallback} "
            f"(set before import); backend='triton' raises the error instead. Please report it with the "
            f"output of `python -m rho_kernels selftest --device cuda`.",
            RuntimeWarning, stacklevel=4)

    def score_rows(self, *args, **kwargs):
        return self._call("score_rows", args, kwargs)

    def select_rows(self, *args, **kwargs):
        return self._call("select_rows", args, kwargs)

    def ce_grad_rows(self, *args, **kwargs):
        return self._call("ce_grad_rows", args, kwargs)


_FALLBACK = _Fallback(_triton)
