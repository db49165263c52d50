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
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from . import _extension, cpu, cuda

NAMES: tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
# Backends with a ce_grad_rows kernel of their own.
GRAD_NAMES: tuple[str, ...] = ("reference", "cpu", "triton")


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
    raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(NAMES)}")


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` (None where it can)."""
    try:
        return get(name).unavailable_reason(device)
    except ImportError as exc:
        return f"it could not be imported ({exc})"


def auto_name(device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device``: the fused kernel, else the reference."""
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
    return get(name)


def grad_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why the ``ce_grad_rows`` kernel of backend ``name`` cannot run on ``device``."""
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
            return name
    if backend != "auto" and forward_name != "cuda" and order:
        raise ValueError(f"backend {forward_name!r} cannot run the backward here: "
                         f"{grad_unavailable_reason(forward_name, device)}")
    return "reference"
