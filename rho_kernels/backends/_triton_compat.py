"""torch.library's Triton entry points, with one fix for the CPU interpreter on older torch.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` yields an ``InterpretedFunction``.  torch >= 2.12
wraps it (eager calls go straight to the kernel); torch 2.11 refuses it ("wrap_triton only works
on functions annotated with triton.jit").  Our interpreted kernels run inside opaque custom ops,
never traced, so launching the kernel directly is the same call.
"""

from __future__ import annotations

from torch.library import triton_op  # noqa: F401  (re-exported)
from torch.library import wrap_triton as _torch_wrap_triton


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``; an interpreted kernel it refuses is returned as is."""
    try:
        return _torch_wrap_triton(kernel)
    except RuntimeError:
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(kernel, InterpretedFunction):
            return kernel
        raise
