"""The compiled extension ``rho_kernels._C``: loading it, and the fake (meta) implementations
that let ``torch.compile`` trace its ops.

The "cpu" and "cuda" backends (``cpu.py``, ``cuda.py``) both call the extension's ops; the
dispatcher picks the kernel by the tensors' device.  Build with ``RHO_KERNELS_NO_EXT=1`` to get
no extension: the package then runs through the reference (and Triton where it runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .._contract import RowProblem, lse_dtype

# setup.py writes this JSON file next to the compiled _C: the torch it was compiled against, the
# CUDA architectures, the CPU instruction set.  It is read *before* _C is loaded, because an
# extension compiled against another torch may fail to load or crash in the loader.
BUILD_RECORD_NAME = "_C_build.json"
EXT_MODULE = __name__.rsplit(".", 2)[0] + "._C"


def read_build_record() -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The build record beside the ``_C`` that an import would load, and its path.

    ``(None, None)`` where there is no ``_C``; ``(None, path)`` where ``_C`` has no (readable)
    record, e.g. a build older than the record.  Finding the module's file does not load it.
    """
    try:
        spec = importlib.util.find_spec(EXT_MODULE)
    except (ImportError, ValueError):
        return None, None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None, None
    path = os.path.join(os.path.dirname(spec.origin), BUILD_RECORD_NAME)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, path
    return (record if isinstance(record, dict) else None), path


def torch_mismatch(record: Optional[dict[str, Any]], running: str = torch.__version__) -> Optional[str]:
    """Why the extension must not be loaded under torch ``running`` (None where it may be).

    The extension uses torch's C++ API, whose ABI holds for one torch build only, so the
    versions must be equal (the local part too: "+cpu" and "+cu130" are different builds).
    """
    built = (record or {}).get("torch")
    if not built or str(built) == str(running):
        return None
    return (f"rho_kernels._C was compiled against torch {built} but torch {running} is installed; "
            f"it is not loaded, and rho_kernels runs on the reference and Triton backends only. "
            f"Rebuild it against the installed torch: pip install --no-build-isolation --no-deps "
            f"--force-reinstall <the rho_kernels sdist or source checkout>")


BUILD_RECORD, BUILD_RECORD_PATH = read_build_record()
LOAD_ERROR: Optional[str] = torch_mismatch(BUILD_RECORD)
if LOAD_ERROR is not None:
    warnings.warn(LOAD_ERROR, RuntimeWarning)
else:
    try:
        from .. import _C  # noqa: F401  (loading it registers torch.ops.rho_kernels.*)
    except ImportError as exc:  # built without the extension, or a broken build
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

# The CUDA kernel has not yet passed the conformance suite on a real GPU (see README);
# until it has, backend="auto" never picks it.  Flip only with committed GPU results.
CUDA_VERIFIED = False

OPS = ("score_rows", "select_rows", "ce_grad_rows", "partial_rows")


def _query_kernel(dispatch_key: str, op: str) -> bool:
    if LOAD_ERROR is not None or not hasattr(torch.ops.rho_kernels, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rho_kernels::{op}", dispatch_key)


# Registrations happen when _C loads, so the answer is fixed at import time.  A dict lookup
# (not the dispatcher query) keeps backend resolution traceable by torch.compile.
_KERNELS: dict[tuple[str, str], bool] = {(key, op): _query_kernel(key, op) for key in ("CPU", "CUDA") for op in OPS}


def has_kernel(dispatch_key: str, op: str = "select_rows") -> bool:
    """Whether the extension registered ``rho_kernels::op`` for ``dispatch_key``."""
    return _KERNELS.get((dispatch_key, op), False)


def unavailable_reason(dispatch_key: str, device_type: str, device: torch.device,
                       op: str = "select_rows") -> Optional[str]:
    """Why the extension's ``op`` cannot run for ``device`` (None where it can)."""
    if LOAD_ERROR is not None:
        return f"the extension rho_kernels._C is not loaded ({LOAD_ERROR})"
    if not has_kernel(dispatch_key, op):
        return f"the extension was built without a {dispatch_key} kernel for {op}"
    if device.type != device_type:
        return f"it runs on {device_type} tensors, got tensors on {device}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


# Both kernels (CPU and CUDA) apply the logit transform and sum z' themselves.
def score_rows(p: RowProblem, with_lse: bool = True, with_zsum: bool = False):
    score, lse, zsum = torch.ops.rho_kernels.score_rows(p.logits, p.targets, p.il, p.method, p.ignore_index, with_lse,
                                                        p.softcap, p.logit_scale, with_zsum)
    return (score, lse, zsum) if with_zsum else (score, lse)


def select_rows(p: RowProblem, k: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.rho_kernels.select_rows(p.logits, p.targets, p.il, k, p.method, p.ignore_index,
                                             p.softcap, p.logit_scale)


def ce_grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, row_scale: Tensor, ignore_index: int,
                 inplace: bool = False, *, softcap: float = 0.0, logit_scale: float = 1.0,
                 label_smoothing: float = 0.0, z_loss: float = 0.0) -> Tensor:
    general = (softcap, logit_scale, label_smoothing, z_loss)
    if inplace:
        torch.ops.rho_kernels.ce_grad_rows_(logits, targets, lse, row_scale, ignore_index, *general)
        # The C++ op's (a!) annotation does not bump the version counter by itself; bumping it
        # makes autograd reject a graph that saved these logits elsewhere instead of using
        # gradient values as logits.
        torch.autograd.graph.increment_version(logits)
        return logits
    return torch.ops.rho_kernels.ce_grad_rows(logits, targets, lse, row_scale, ignore_index, *general)


NUM_PARTIALS = 8


def partial_rows(logits: Tensor, targets: Tensor, partials: Optional[Tensor], vocab_start: int, method: int,
                 ignore_index: int, *, softcap: float = 0.0, logit_scale: float = 1.0) -> Tensor:
    """Per-row partials ``[n, 8]`` of the vocabulary slice ``logits`` (``[n, V_slice]``, its first
    column is class ``vocab_start``) of the transformed logits z' (``softcap``/``logit_scale``,
    applied in the kernel), folded into ``partials`` (the slices before, or None).  Columns, in
    the accumulation dtype: ``m, d, t, dx, s2x`` (rho::RowAcc of z'; only the method's sums, the
    others 0), ``z'_y`` (0 where the target is not in the slices so far), ``owned`` (1.0 where it
    is), ``zsum`` (``sum_j z'_j`` over the slices so far: label smoothing's sum; merges by
    addition).  The first seven are vocab_parallel's layout."""
    return torch.ops.rho_kernels.partial_rows(logits, targets, partials, vocab_start, method, ignore_index,
                                              softcap, logit_scale)


if LOAD_ERROR is None:

    @torch.library.register_fake("rho_kernels::score_rows")
    def _score_rows_fake(logits, targets, irreducible_loss, method, ignore_index, with_lse=True, softcap=0.0,
                         logit_scale=1.0, with_zsum=False):
        n = targets.shape[0]
        return (
            logits.new_empty((n,), dtype=torch.float32),
            logits.new_empty((n if with_lse else 0,), dtype=lse_dtype(logits.dtype)),
            logits.new_empty((n if with_zsum else 0,), dtype=lse_dtype(logits.dtype)),
        )

    @torch.library.register_fake("rho_kernels::select_rows")
    def _select_rows_fake(logits, targets, irreducible_loss, k, method, ignore_index, softcap=0.0, logit_scale=1.0):
        return (
            logits.new_empty((k,), dtype=torch.int64),
            logits.new_empty((k,), dtype=torch.float32),
            logits.new_empty((k,), dtype=torch.bool),
        )

    if hasattr(torch.ops.rho_kernels, "ce_grad_rows"):

        @torch.library.register_fake("rho_kernels::ce_grad_rows")
        def _ce_grad_rows_fake(logits, targets, lse, row_scale, ignore_index, softcap=0.0, logit_scale=1.0,
                               label_smoothing=0.0, z_loss=0.0):
            return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

        @torch.library.register_fake("rho_kernels::ce_grad_rows_")
        def _ce_grad_rows_inplace_fake(logits, targets, lse, row_scale, ignore_index, softcap=0.0, logit_scale=1.0,
                                       label_smoothing=0.0, z_loss=0.0):
            return None

    if hasattr(torch.ops.rho_kernels, "partial_rows"):

        @torch.library.register_fake("rho_kernels::partial_rows")
        def _partial_rows_fake(logits, targets, partials, vocab_start, method, ignore_index, softcap=0.0,
                               logit_scale=1.0):
            return logits.new_empty((targets.shape[0], NUM_PARTIALS), dtype=lse_dtype(logits.dtype))
