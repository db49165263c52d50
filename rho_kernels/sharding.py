"""Sharded LM heads in the public ops: DTensor weights / logits, and the head module as the weight.

The ops take these through two decorators (``linear_head`` on the four linear ops,
``sharded_logits`` on the logits ops); a plain tensor goes straight through.

* **DTensor, sharded over the vocabulary** (tensor parallel: ``ColwiseParallel`` on the head,
  ``distribute_tensor(w, mesh, [Shard(0)])``; logits ``Shard(-1)``) on a 1-D mesh: the op runs
  the vocabulary-parallel path (``vocab_parallel``) on the local shard, with the mesh's process
  group and the shard's first class as ``vocab_start_index``.  Results are plain tensors, the
  same on every rank; the weight's gradient is each rank's shard (a DTensor, as the parameter);
  the hidden state's is the full one, summed over the mesh as DTensor's own layers do (a
  replicated DTensor hidden gets a ``Partial`` gradient, a plain one an all-reduce).  A plain
  hidden must be the same on every rank of the mesh: checked once per weight tensor, eagerly,
  so that a data-parallel shard (an FSDP2 weight passed bare: different data on every rank)
  is an error and never a wrong gradient.
* **The head module** (``nn.Linear``, wrapped by ``fully_shard`` / DeepSpeed ZeRO-3 or not): where
  its weight is not a gathered plain tensor (a DTensor shard, a ZeRO-3 parameter) the op runs
  as the module's forward (``module.forward`` replaced for one call), so the sharding engine's
  hooks fire as for any layer: the weight gathered before, again for the backward, its
  gradient reduced after.  The bias is the module's.  A tensor-parallel style's own
  input/output hooks (``distribute_module``'s, made for ``F.linear``'s activations) are skipped
  for that call: the op consumes the DTensor weight itself.
* **A ZeRO-3 partitioned weight** passed bare (``(0,)`` outside the forward): a ValueError naming
  the module form.

Only here does the package touch DTensor; ``torch.distributed.tensor`` is imported only once a
DTensor exists (nothing is imported for plain tensors).
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["linear_head", "sharded_logits"]

_MODULE_FORM = ("pass the head module instead of its weight: rk.selective_linear_cross_entropy(hidden, "
                "model.lm_head, targets, reference_loss, ratio) (likewise linear_score / linear_select / "
                "linear_select_sequences); the op then runs inside the module's forward, where the sharding "
                "engine gathers the weight and reduces its gradient")
_SUPPORTED = ("supported: a DTensor sharded over the vocabulary on a 1-D mesh (weight/bias Shard(0), logits "
              "Shard(-1), as ColwiseParallel makes them; hidden Replicate() or a plain tensor), or the head "
              "module itself for FSDP2 / DeepSpeed ZeRO-3")
# Weights whose plain hidden state was found the same on every rank of their mesh (checked once):
# id -> weak reference (a WeakSet would compare tensors with ==, elementwise).
_REPLICATION_CHECKED: dict[int, weakref.ref] = {}


class _NoDTensor:  # stands in for the DTensor class while torch.distributed.tensor is not imported
    pass


def _dtensor_type() -> type:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", _NoDTensor) if mod is not None else _NoDTensor


def _plain(x) -> bool:
    return isinstance(x, Tensor) and not isinstance(x, _dtensor_type())


def _is_zero3(x) -> bool:
    return isinstance(x, Tensor) and hasattr(x, "ds_id") and hasattr(x, "ds_status")


# --------------------------------------------------------------------------- decorators

_LINEAR_DOC = """
    Sharded heads (``rho_kernels.sharding``): ``weight`` may also be a DTensor sharded over the
    vocabulary (``Shard(0)`` on a 1-D mesh: tensor parallel; ``bias`` likewise, ``hidden`` plain or
    ``Replicate()``), or the head module itself (``model.lm_head``; its bias is used, ``bias=`` must
    then be None): the way to call the op under FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3.
"""
_LOGITS_DOC = """
    Sharded logits (``rho_kernels.sharding``): ``logits`` may also be a DTensor sharded over the
    vocabulary (``Shard(-1)`` on a 1-D mesh), run as ``process_group=`` / ``vocab_start_index=``.
"""


def linear_head(fn: Callable) -> Callable:
    """For ``fn(hidden, weight, *args, bias=..., process_group=..., vocab_start_index=..., **kw)``."""

    @functools.wraps(fn)
    def op(hidden, weight, *args, **kwargs):
        if _plain(hidden) and _plain(weight) and weight.dim() == 2 and not _is_zero3(weight):
            return fn(hidden, weight, *args, **kwargs)
        return _resolve_linear(fn, hidden, weight, args, kwargs)

    op.__doc__ = (fn.__doc__ or "") + _LINEAR_DOC
    return op


def sharded_logits(fn: Callable) -> Callable:
    """For ``fn(logits, *args, process_group=..., vocab_start_index=..., **kw)``."""

    @functools.wraps(fn)
    def op(logits, *args, **kwargs):
        if not isinstance(logits, _dtensor_type()):
            return fn(logits, *args, **kwargs)
        local, group, start = _vocab_shard(logits, logits.dim() - 1, "logits", "Shard(-1)", kwargs)
        return fn(local, *_locals(args), **_locals(kwargs), process_group=group, vocab_start_index=start)

    op.__doc__ = (fn.__doc__ or "") + _LOGITS_DOC
    return op


# --------------------------------------------------------------------------- DTensor


def _placement_text(t) -> str:
    return f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh {t.device_mesh.mesh.tolist()}"


def _vocab_shard(t, dim: int, name: str, want: str, kwargs: dict):
    """(local shard, the mesh's group, the shard's first class) of a DTensor sharded over ``dim``."""
    from torch.distributed.tensor import Shard

    for key in ("process_group", "vocab_start_index"):
        if kwargs.get(key) not in (None, 0):
            raise ValueError(f"{name} is a DTensor: its mesh gives the process group and its shard the vocabulary "
                             f"offset; do not pass {key}= too (got {kwargs[key]!r})")
    kwargs.pop("process_group", None)
    kwargs.pop("vocab_start_index", None)
    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or \
            placements[0].dim % t.dim() != dim:
        hint = ""
        if name in ("weight", "bias") and mesh.ndim > 1:
            hint = "; a head sharded by FSDP2 (fully_shard) on top of tensor parallelism: " + _MODULE_FORM
        raise ValueError(f"{name} is a DTensor with {_placement_text(t)}: not a shard of the vocabulary "
                         f"({want} on a 1-D mesh); {_SUPPORTED}{hint}")
    size, world, rank = t.shape[dim], mesh.size(), mesh.get_local_rank()
    # DTensor's Shard rule (torch.chunk): ceil(V / world) classes a rank, the last ones fewer.
    full = -(-size // world)
    start = min(rank * full, size)
    local = t.to_local()
    if local.shape[dim] != min(full, size - start):
        raise ValueError(f"{name}'s local shard has {local.shape[dim]} classes on mesh rank {rank}, but Shard({dim}) "
                         f"of {size} over {world} ranks holds {min(full, size - start)} there (torch.chunk's rule)")
    return local, mesh.get_group(), start


def _locals(x):
    """Replicated DTensors among the other arguments (targets, losses) -> their local tensors."""
    dtensor = _dtensor_type()
    if isinstance(x, dict):
        return {k: _locals(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_locals(v) for v in x)
    if isinstance(x, dtensor):
        if not all(p.is_replicate() for p in x.placements):
            raise ValueError(f"a DTensor argument (shape {tuple(x.shape)}) has {_placement_text(x)}; next to a "
                             "vocabulary-sharded head/logits the targets and losses must be replicated (Replicate()) "
                             "or plain tensors")
        return x.to_local()
    return x


class _SumGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (the plain hidden state of a
    vocabulary-sharded head: each rank's op gives its shard's share)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _check_replicated(hidden: Tensor, weight, group) -> None:
    """A plain hidden next to a DTensor weight must be the same on every rank (tensor parallel).
    Data parallel (an FSDP2 shard passed bare) differs: an error, once, eagerly."""
    seen = _REPLICATION_CHECKED.get(id(weight))
    if (seen is not None and seen() is weight) or torch.compiler.is_compiling():
        return
    h = hidden.detach().to(torch.float64)
    mine = torch.stack([h.sum(), (h * h).sum(), torch.tensor(float(h.numel()), dtype=torch.float64,
                                                             device=h.device)])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every)
    if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-6, atol=1e-6):
        raise ValueError(
            "weight is a DTensor sharded over dim 0, but the plain hidden state differs between the ranks of its mesh "
            f"(sums {every[:, 0].tolist()}): a vocabulary shard (tensor parallel) needs the same hidden state on every "
            "rank, so this is a data-parallel shard, e.g. a weight sharded by FSDP2 (fully_shard) and passed bare; "
            + _MODULE_FORM)
    _REPLICATION_CHECKED[id(weight)] = weakref.ref(weight, lambda _, key=id(weight): _REPLICATION_CHECKED.pop(key, None))


def _resolve_linear(fn, hidden, weight, args, kwargs, in_module=False):
    if isinstance(weight, nn.Module):
        return _in_module_forward(fn, weight, hidden, args, kwargs)
    # Bare, even where prefetched in full: its gradient would bypass ZeRO-3's gather for the backward.
    if _is_zero3(weight) and not in_module:
        raise ValueError(f"weight is a DeepSpeed ZeRO-3 parameter (ds_id {weight.ds_id}, shape {tuple(weight.shape)}; "
                         "partitioned to shape (0,) outside its module's forward); " + _MODULE_FORM)
    dtensor = _dtensor_type()
    if not isinstance(weight, dtensor):
        if isinstance(hidden, dtensor):
            raise ValueError(f"hidden is a DTensor ({_placement_text(hidden)}) but weight is a plain tensor; "
                             + _SUPPORTED)
        return fn(hidden, weight, *args, **kwargs)  # its own checks and errors
    kwargs = dict(kwargs)
    w, group, start = _vocab_shard(weight, 0, "weight", "Shard(0)", kwargs)
    bias = kwargs.get("bias")
    if bias is not None:
        if not isinstance(bias, dtensor):
            raise ValueError("weight is a vocabulary-sharded DTensor but bias is a plain tensor; shard the bias "
                             "the same way (Shard(0) on the weight's mesh), as ColwiseParallel does")
        if bias.device_mesh != weight.device_mesh:
            raise ValueError("bias and weight are DTensors on different meshes")
        kwargs["bias"] = _vocab_shard(bias, 0, "bias", "Shard(0)", {})[0]
    if isinstance(hidden, dtensor):
        from torch.distributed.tensor import Partial

        if hidden.device_mesh != weight.device_mesh or not all(p.is_replicate() for p in hidden.placements):
            raise ValueError(f"hidden is a DTensor with {_placement_text(hidden)}; next to a vocabulary-sharded "
                             "weight it must be Replicate() on the weight's mesh (or a plain tensor); " + _SUPPORTED)
        # Each rank's op gives its shard's share of hidden's gradient: a Partial one, summed
        # wherever it is redistributed (as ColwiseParallel's F.linear).
        h = hidden.to_local(grad_placements=[Partial()])
    else:
        if not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        _check_replicated(hidden, weight, group)
        h = _SumGrad.apply(hidden, group) if hidden.requires_grad and torch.is_grad_enabled() else hidden
    return fn(h, w, *_locals(tuple(args)), **_locals(kwargs), process_group=group, vocab_start_index=start)


# --------------------------------------------------------------------------- the head module


def _is_tp_style_hook(hook) -> bool:
    # distribute_module (ColwiseParallel & co.) registers lambdas defined in this module.
    return getattr(hook, "__module__", None) == "torch.distributed.tensor._api"


def _in_module_forward(fn, module: nn.Module, hidden, args, kwargs):
    if kwargs.get("bias") is not None:
        raise ValueError(f"bias= was given with the head module {type(module).__name__} as the weight; the bias "
                         "is the module's own (module.bias): pass one or the other")
    if not isinstance(getattr(module, "weight", None), Tensor):
        raise TypeError(f"the weight argument is a {type(module).__name__} without a .weight tensor; pass an "
                        "nn.Linear head (wrapped by fully_shard / DeepSpeed or not) or its [V, D] weight")
    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    w = module.weight
    if _plain(w) and not _is_zero3(w):
        # Gathered already (a plain head; an FSDP2 unit between its unshard and reshard, as
        # accelerate's [norm, lm_head] unit after the model's forward): its gradient reaches the
        # unit's reduce-scatter as any use of it does, and a second pass through the hooks of a
        # multi-module FSDP2 unit that already ran would corrupt its state (segfault in backward).
        return _resolve_linear(fn, hidden, w, args, {**kwargs, "bias": getattr(module, "bias", None)}, in_module=True)

    def forward(h):  # the weight as the sharding engine presents it inside the forward
        w = module.weight
        if isinstance(w, nn.Module) or w is None:
            raise TypeError(f"{type(module).__name__}.weight is not a tensor")
        return _resolve_linear(fn, h, w, args, {**kwargs, "bias": getattr(module, "bias", None)}, in_module=True)

    saved_forward = module.__dict__.get("forward")
    hooks = (module._forward_pre_hooks, module._forward_hooks)
    saved_hooks = [dict(d) for d in hooks]
    for d in hooks:
        for key in [k for k, hook in d.items() if _is_tp_style_hook(hook)]:
            del d[key]
    module.forward = forward
    try:
        return module(hidden)
    finally:
        if saved_forward is None:
            del module.forward
        else:
            module.forward = saved_forward
        for d, saved in zip(hooks, saved_hooks):
            d.clear()
            d.update(saved)
