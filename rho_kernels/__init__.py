"""rho_kernels: fused score + top-k for online batch selection (RHO-LOSS, Rho-1).

The op layer (``api``, ``reference`` and the backends) is importable on its own; the training
layer (irreducible-loss store, batch selector, distributed selection) builds on ``api`` only.
"""

from .api import BACKENDS, METHODS, Selection, available_backends, score, select

__version__ = "0.1.0"

__all__ = ["BACKENDS", "METHODS", "Selection", "available_backends", "score", "select", "__version__"]
