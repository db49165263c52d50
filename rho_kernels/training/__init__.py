"""The training layer: RHO-LOSS in a user's own PyTorch loop.

Built on the public op API only (:func:`rho_kernels.score`, :func:`rho_kernels.select`).

* :class:`IrreducibleLossStore` -- per-example irreducible loss, computed once, gathered by
  dataset index on the training device; save/load with a dataset fingerprint; memory-mapped.
* :class:`TokenLossStore` -- per-token reference loss of an LM corpus (Rho-1), same machinery.
* :mod:`.il_build` (the scoring pass: sharded over ranks, resumable) and :mod:`.il_format`
  (atomic, checksummed files) behind both stores.
* :func:`build_no_holdout_store` / :func:`fit_il_model` (:mod:`.il_fit`) -- the IL recipe that
  works on small noisy data: one IL model per half of the training set, early-stopped.
* :class:`OnlineBatchSelector` -- ``select(batch) -> sub-batch`` each step (RHO-LOSS, the
  op's other methods, uniform, Boltzmann sampling without replacement), with statistics.
* :mod:`.distributed` -- ``"local"`` and exact, balanced ``"global"`` selection across ranks.
"""

from .distributed import GlobalPick, global_select, topk_by_key
from .il_store import IndexedDataset, IrreducibleLossStore, dataset_fingerprint, split_halves
from .token_store import TokenLossStore, token_fingerprint
from .il_fit import ILFit, build_no_holdout_store, fit_il_model
from .selector import (
    SELECTOR_METHODS,
    OnlineBatchSelector,
    PickInfo,
    SelectorStats,
    TemperatureSchedule,
    constant_temperature,
    cosine_temperature,
    exponential_temperature,
    linear_temperature,
)

__all__ = [
    "IndexedDataset",
    "IrreducibleLossStore",
    "dataset_fingerprint",
    "split_halves",
    "ILFit",
    "fit_il_model",
    "build_no_holdout_store",
    "TokenLossStore",
    "token_fingerprint",
    "OnlineBatchSelector",
    "PickInfo",
    "SelectorStats",
    "SELECTOR_METHODS",
    "TemperatureSchedule",
    "constant_temperature",
    "linear_temperature",
    "exponential_temperature",
    "cosine_temperature",
    "GlobalPick",
    "global_select",
    "topk_by_key",
]
