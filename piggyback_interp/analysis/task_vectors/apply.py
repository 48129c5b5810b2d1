"""Run a loaded model at ``base + alpha * delta`` (and restore it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from piggyback_interp.analysis.task_vectors.sources import named_parameters
from piggyback_interp.analysis.task_vectors.vector import TaskVector
from piggyback_interp.core.hf import unwrap

# ================================================================ applying a vector


def _target_parameters(model: torch.nn.Module, vector: TaskVector) -> dict[str, torch.nn.Parameter]:
    """The model's parameter for each name in ``vector``, checked (names, shapes, ties)."""
    params = named_parameters(model)
    missing = [name for name in vector.deltas if name not in params]
    if missing:
        raise ValueError(
            f"{len(missing)} parameters of the task vector are not in this "
            f"{type(model).__name__} (e.g. {missing[:3]}; it has e.g. {list(params)[:2]}); "
            "apply a vector to a model of the architecture it was computed on"
        )
    found: dict[str, torch.nn.Parameter] = {}
    owner: dict[int, str] = {}
    for name, delta in vector.deltas.items():
        param = params[name]
        if tuple(param.shape) != tuple(delta.shape):
            raise ValueError(
                f"parameter {name!r} has shape {list(param.shape)} in the model and "
                f"{list(delta.shape)} in the task vector; use the model it was computed on"
            )
        if id(param) in owner:
            raise ValueError(
                f"{name!r} and {owner[id(param)]!r} are the same (tied) tensor in this model; "
                "drop one of them from the task vector"
            )
        owner[id(param)] = name
        found[name] = param
    return found


@torch.no_grad()
def _add(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    vector: TaskVector,
    alpha: float,
) -> None:
    """Add ``alpha * delta`` to each parameter.

    A parameter the two models of a shared-base pair both hold is not edited in place
    (that would change the other model too): this model gets a new parameter instead.
    """
    from piggyback_interp.core.pairs import shares_weights

    for name, param in params.items():
        delta = vector.deltas[name].to(param.device)
        if shares_weights(param):
            new = torch.nn.Parameter(param.add(delta, alpha=alpha), param.requires_grad)
            _swap(model, param, new)
        else:
            param.add_(delta, alpha=alpha)


def _swap(model: torch.nn.Module, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Make every module of ``model`` that holds ``old`` hold ``new`` (ties kept)."""
    for module in unwrap(model)[0].modules():
        for key, value in module._parameters.items():
            if value is old:
                module._parameters[key] = new


def apply_task_vector(
    model: torch.nn.Module, vector: TaskVector, alpha: float | int = 1.0
) -> torch.nn.Module:
    """Add ``alpha * delta`` to ``model``'s weights in place, for good; returns ``model``.

    Example:
        >>> import torch
        >>> from piggyback_interp.testing import tiny_hf_model
        >>> model = tiny_hf_model("llama")
        >>> w = "model.norm.weight"
        >>> _ = apply_task_vector(model, TaskVector({w: torch.ones(64)}), alpha=2)
        >>> model.model.norm.weight[0].item()
        3.0
    """
    _add(model, _target_parameters(model, vector), vector, float(alpha))
    return model


@contextlib.contextmanager
def scaled_task_vector(
    model: torch.nn.Module, vector: TaskVector, alpha: float | int = 1.0
) -> Iterator[torch.nn.Module]:
    """Run ``model`` at ``weights + alpha * delta`` inside the block, then restore it.

    Works on a ``TransformerBridge`` (its HF parameters are the ones the bridge's
    forward and hooks use), an HF module or a peft model. Only the touched parameters
    are copied, and copied back bit for bit on exit, also after an exception. KV
    caches computed outside the block do not match the weights inside it.

    Example:
        >>> import torch
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> w = "model.layers.0.mlp.down_proj.weight"
        >>> vector = TaskVector({w: torch.randn(64, 128)})
        >>> ids = torch.tensor([[1, 40, 41]])
        >>> before = model(ids)
        >>> with scaled_task_vector(model, vector, alpha=0.5):
        ...     changed = model(ids)
        >>> bool((changed != before).any()), torch.equal(model(ids), before)
        (True, True)
    """
    from piggyback_interp.core.pairs import shares_weights

    params = _target_parameters(model, vector)
    originals = {
        name: param.detach().clone() for name, param in params.items() if not shares_weights(param)
    }
    try:
        _add(model, params, vector, float(alpha))
        yield model
    finally:
        current = named_parameters(model)
        with torch.no_grad():
            for name, param in params.items():
                if name in originals:
                    param.copy_(originals[name])
                elif current[name] is not param:  # a shared-base pair's weight, swapped
                    _swap(model, current[name], param)
