"""rho_kernels: fused score + top-k for online batch selection (RHO-LOSS, Rho-1).

Public names only; where they live:

* ``api`` -- row ops: ``score``, ``select``, ``Selection``, ``available_backends``
  (``help(rho_kernels.score)`` lists the methods and their formulas);
* ``tokens`` -- Rho-1 token ops: ``select_mask``, ``select_sequences``, ``selective_cross_entropy``;
* ``training`` -- irreducible-loss store, batch selector, distributed selection (built on the
  public op API only).

Below them, the op layer: ``_contract`` (validation), ``reference`` (the definition) and
``backends`` (one module per backend).
"""

from ._version import __version__
from .api import BACKENDS, METHODS, Selection, available_backends, score, select
from .tokens import select_mask, select_sequences, selective_cross_entropy
from .training import (
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

__all__ = [
    "BACKENDS", "METHODS", "Selection", "available_backends", "score", "select",
    "select_mask", "select_sequences", "selective_cross_entropy",
    "IndexedDataset", "IrreducibleLossStore", "OnlineBatchSelector", "SelectorStats",
    "TokenLossStore", "token_fingerprint",
    "constant_temperature", "cosine_temperature", "dataset_fingerprint", "exponential_temperature",
    "linear_temperature", "split_halves", "__version__",
]
