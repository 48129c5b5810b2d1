"""Sharded training (FSDP2): each process keeps 1/N of the weights, gradients and optimizer state.

:func:`shard_model` applies PyTorch's ``fully_shard`` to every decoder block of a
bridge's HF model and then to the model itself (embeddings, final norm and head, tied
or not), and makes the gradient reduction a sum, as in the data-parallel loop, so
:func:`~piggyback_interp.training.finetune` with ``fsdp=True`` computes the update of
one process over the same global batch. The parameters become ``DTensor`` shards;
every forward and backward then gathers a block's weights from all processes, so the
processes must run the same number of them (the loop pads with zero-weighted
micro-batches).

Files hold whole tensors, never shards: :func:`full` gathers a shard,
:func:`shard_like` cuts a whole tensor back into this process's shard, and
:func:`gathered` puts whole weights into the model on rank 0 for the duration of a
block (checkpoints, exports), so a checkpoint written under FSDP resumes with any
number of processes, sharded or not, and the exported model is a plain HF directory.

With one process nothing is sharded and every function here returns its input.

Example:
    >>> import torch
    >>> full(torch.ones(2))             # a plain tensor is already whole
    tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from piggyback_interp.core import distributed
from piggyback_interp.core.hf import hf_model


def shard_model(model: Any) -> list[Any]:
    """Shard ``model`` (a TransformerBridge) in place over the process group; returns the
    sharded modules (empty with one process). Call it after adding LoRA adapters and
    before building the optimizer: the parameters are replaced by shards."""
    if not distributed.active():
        warnings.warn(
            "FSDP with one process: nothing to shard, the model stays whole; launch several "
            "processes, e.g. torchrun --nproc_per_node 4 -m piggyback_interp.cli finetune --fsdp",
            stacklevel=3,
        )
        return []
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(model.cfg.device)
    mesh = init_device_mesh(device.type, (distributed.world()[1],))
    units = [*model.blocks, hf_model(model)]  # blocks first: the root takes the rest
    for unit in units:
        fully_shard(unit, mesh=mesh)
        # a sum over processes, like sum_gradients; a plain SUM op (gloo lacks PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return units


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it); plain tensors as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the whole tensor ``value``, placed like ``like``; ``value``
    itself when ``like`` is not sharded. Every process must pass the same ``value``."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(
        value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements
    )


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors (a collective under FSDP)."""
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a :func:`whole_optimizer_state` (or a plain one) into ``optimizer``, whose
    parameters may be shards: each per-parameter tensor is cut into the local shard."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                slots = optimizer.state.get(p, {})
                for k, v in slots.items():
                    if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                        slots[k] = shard_like(v, p)


def whole_trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights of a bridge's HF model, whole (a collective under FSDP)."""
    return {
        n: full(p.detach()).clone()
        for n, p in hf_model(model).named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`whole_trainable_state` into ``model``, cut into its shards if sharded."""
    params = dict(hf_model(model).named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ValueError(f"the checkpoint has weights this model lacks, e.g. {sorted(missing)[:2]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(shard_like(value, params[name]))


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """On rank 0, ``module``'s sharded parameters are whole CPU copies inside the block
    (tied weights stay tied); the other processes take part in gathering them. Use the
    module inside only for reading and writing weights (no forward), and only on rank 0.
    Outside FSDP the block runs on the module as it is."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()  # the shards are what is registered: swap those
    main = distributed.is_main()
    copies: dict[int, torch.nn.Parameter] = {}
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if not isinstance(p, DTensor):
                continue
            if id(p) not in copies:
                whole = p.full_tensor()
                copies[id(p)] = (
                    torch.nn.Parameter(whole.cpu(), requires_grad=p.requires_grad) if main else p
                )
            if main:
                swapped.append((m, name, p))
                m._parameters[name] = copies[id(p)]
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


__all__ = [
    "full",
    "gathered",
    "load_optimizer_state",
    "load_trainable_state",
    "shard_like",
    "shard_model",
    "whole_optimizer_state",
    "whole_trainable_state",
]
