"""rho_kernels: fused score + top-k for online batch selection (RHO-LOSS, Rho-1).

The op layer (``api``, ``reference`` and the backends) is importable on its own; the training
layer (``training``: irreducible-loss store, batch selector, distributed selection) builds on
the public op API only.
"""

from .api import (
    BACKENDS,
    METHODS,
    Selection,
    available_backends,
    score,
    select,
    select_mask,
    select_sequences,
    selective_cross_entropy,
)

# After the op API: the training modules read rk.METHODS at import.
from .training import (  # noqa: E402
    IndexedDataset,
    IrreducibleLossStore,
    OnlineBatchSelector,
    SelectorStats,
    TokenLossStore,
    constant_temperature,
    cosine_temperature,
    dataset_fingerprint,
    exponential_temperature,
    linear_temperature,
    split_halves,
    token_fingerprint,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "METHODS", "Selection", "available_backends", "score", "select",
    "select_mask", "select_sequences", "selective_cross_entropy",
    "IndexedDataset", "IrreducibleLossStore", "OnlineBatchSelector", "SelectorStats",
    "TokenLossStore", "token_fingerprint",
    "constant_temperature", "cosine_temperature", "dataset_fingerprint", "exponential_temperature",
    "linear_temperature", "split_halves", "__version__",
]
