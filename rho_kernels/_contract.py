"""The op contract: method names, input validation and normalisation, shared by every backend.

Every public entry point turns its arguments into a :class:`RowProblem` here, so that all
backends see the same, already-checked inputs and every bad input gets the same clear error.
Checks look only at metadata (shape, dtype, device), never at tensor values, so they cost no
host synchronisation and trace under ``torch.compile(fullgraph=True)``.  The single value
check (targets outside ``[0, V)``) runs only eagerly on CPU tensors, where it is free of syncs.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# Method ids are part of the op schema; keep in sync with csrc/rho_math.h (rho::Method).
METHODS: tuple[str, ...] = ("reducible", "loss", "irreducible", "gradnorm", "entropy")
METHOD_IDS: dict[str, int] = {name: i for i, name in enumerate(METHODS)}
IL_METHODS = frozenset({"reducible", "irreducible"})

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Rows are packed into the low 32 bits of the ordering key (rho::select_key).
MAX_ROWS = 2**32 - 1


class RowProblem(NamedTuple):
    """Normalised inputs of one score/select call.

    ``logits`` keeps the caller's tensor (rank 2 or 3, any strides, never copied or written);
    ``targets`` is int64 ``[N]`` and ``il`` float32 ``[N]`` (both contiguous), or ``il`` is
    None when the method does not read it.
    """

    logits: Tensor
    targets: Tensor
    il: Optional[Tensor]
    method: int
    ignore_index: int
    lead_shape: torch.Size
    num_rows: int
    num_classes: int
    softcap: float = 0.0
    logit_scale: float = 1.0


def has_transform(softcap: float, logit_scale: float) -> bool:
    """Whether ``(softcap, logit_scale)`` (as :func:`check_transform` returns them) changes the logits."""
    return softcap != 0.0 or logit_scale != 1.0


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def check_transform(softcap, logit_scale) -> tuple[float, float]:
    """``(softcap, logit_scale)`` as floats, softcap None -> 0.0 (no cap).

    The logits every method sees are ``z' = softcap * tanh(logit_scale * z / softcap)``, or
    ``logit_scale * z`` without a cap, as Hugging Face's models compute them (Gemma 2/3's
    ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``).
    ``softcap`` must be > 0 and finite, ``logit_scale`` finite and non-zero.
    """
    cap = 0.0
    if softcap is not None:
        cap = _real("softcap", softcap)
        if not cap > 0.0:
            raise ValueError(f"softcap must be > 0 (or None for no cap), got {softcap!r}")
    scale = _real("logit_scale", logit_scale)
    if scale == 0.0:
        raise ValueError(f"logit_scale must be non-zero, got {logit_scale!r}")
    return cap, scale


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def method_id(method: str) -> int:
    if not isinstance(method, str) or method not in METHOD_IDS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    return METHOD_IDS[method]


def prepare(
    logits: Tensor,
    targets: Tensor,
    irreducible_loss: Optional[Tensor],
    method: str,
    ignore_index: int,
    *,
    softcap=None,
    logit_scale=1.0,
) -> RowProblem:
    """Validate the arguments of ``score``/``select`` and normalise them into a RowProblem."""
    mid = method_id(method)
    cap, scale = check_transform(softcap, logit_scale)
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16, float16 or float64, got dtype {logits.dtype}"
        )
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)} (rank {logits.dim()})"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    lead_shape = logits.shape[:-1]
    if targets.shape != lead_shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match the leading dims "
            f"{tuple(lead_shape)} of logits {tuple(logits.shape)}"
        )
    num_classes = logits.shape[-1]
    if num_classes < 1:
        raise ValueError(f"logits need at least one class, got V = {num_classes} (shape {tuple(logits.shape)})")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    num_rows = targets.numel()
    if num_rows > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows are supported, got N = {num_rows}")

    il: Optional[Tensor] = None
    if METHODS[mid] in IL_METHODS:
        if irreducible_loss is None:
            raise ValueError(f"method {method!r} needs irreducible_loss, got None")
        if not isinstance(irreducible_loss, Tensor):
            raise TypeError(
                f"irreducible_loss must be a torch.Tensor, got {type(irreducible_loss).__name__}"
            )
        if not irreducible_loss.dtype.is_floating_point:
            raise TypeError(f"irreducible_loss must be a float tensor, got dtype {irreducible_loss.dtype}")
        if irreducible_loss.shape != lead_shape:
            raise ValueError(
                f"irreducible_loss shape {tuple(irreducible_loss.shape)} does not match the "
                f"leading dims {tuple(lead_shape)} of logits {tuple(logits.shape)}"
            )
        if irreducible_loss.device != logits.device:
            raise ValueError(
                f"irreducible_loss is on {irreducible_loss.device} but logits on {logits.device}"
            )
        il = irreducible_loss.reshape(-1).to(torch.float32).contiguous()

    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if logits.device.type == "cpu" and not is_compiling():
        check_targets_in_range(flat_targets, num_classes, ignore_index)
    return RowProblem(logits, flat_targets, il, mid, ignore_index, lead_shape, num_rows, num_classes, cap, scale)


def check_targets_in_range(flat_targets: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside ``[0, V)`` (other than ignore_index).

    Reading the values needs the host, so this runs only where that is free (CPU tensors,
    eager).  Elsewhere an out-of-range target gives that row a NaN score (ineligible); no
    backend ever reads outside the row.
    """
    if flat_targets.numel() == 0:
        return
    lo, hi = torch.aminmax(flat_targets)  # one pass settles the common case (all targets in range)
    if int(lo) >= 0 and int(hi) < num_classes:
        return
    bad = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= num_classes))
    if bool(bad.any()):
        where = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(flat_targets[where])} at flat row {where} is outside [0, {num_classes}) "
            f"and is not ignore_index={ignore_index}"
        )


def check_k(k, num_rows: int) -> int:
    """``k`` as a Python int in ``[0, num_rows]``.

    Any integer-like value is accepted (``int``, NumPy integers, 0-dim integer tensors: whatever
    ``operator.index`` takes); booleans are refused, as a ``True`` meant as a count is a bug.  The
    output's size depends on ``k``, so it must be known on the host: a CUDA tensor ``k`` costs a
    host synchronisation (pass an int on the hot path).
    """
    dtype = getattr(k, "dtype", None)
    is_bool = isinstance(k, bool) or dtype == torch.bool or getattr(dtype, "kind", None) == "b"
    if isinstance(k, Tensor) and k.dim() != 0:
        raise TypeError(f"k must be an integer or a 0-dim integer tensor, got a tensor of shape {tuple(k.shape)}")
    if isinstance(k, Tensor) and k.device.type == "meta":  # else torch's raw "item() cannot be called"
        raise TypeError(f"k is a meta tensor, which has no value; the output's size needs one: pass an int (got {k!r})")
    try:
        value = None if is_bool else operator.index(k)
    except TypeError:
        value = None
    if value is None:
        kind = f"dtype {dtype}" if dtype is not None else f"type {type(k).__name__}"
        raise TypeError(f"k must be an int (or integer-like), got {k!r} of {kind}")
    if value < 0 or value > num_rows:
        raise ValueError(f"k = {value} is out of range: need 0 <= k <= N = {num_rows}")
    return value


def score_dtype() -> torch.dtype:
    return torch.float32


def lse_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32
