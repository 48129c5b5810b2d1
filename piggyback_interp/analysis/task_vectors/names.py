"""Parameter names: which layer and module a Hugging Face parameter belongs to."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

NON_LAYER = -1  # the ``layer`` of parameters outside the blocks (embeddings, final norm, head)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VECTOR_WEIGHTS = "task_vector.safetensors"
VECTOR_RECORD = "task_vector.json"
FORMAT_VERSION = 1


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
LEAVES = ("weight", "bias")  # the last part of a parameter name
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # safetensors dtypes read
UNSUPPORTED_ADAPTER = {  # adapter_config.json key -> what a task vector cannot read
    "use_dora": "DoRA adapters",
    "modules_to_save": "adapters that save whole modules (modules_to_save)",
    "trainable_token_indices": "adapters with trainable tokens",
    "target_parameters": "adapters on raw parameters (target_parameters)",
    "layer_replication": "adapters with layer_replication",
}


# ================================================================ names


def layer_index(name: str) -> int | None:
    """The block index in a parameter name (``layers.N.``, ``h.N.``, ``blocks.N.``), or None.

    Example:
        >>> layer_index("model.layers.12.mlp.up_proj.weight"), layer_index("lm_head.weight")
        (12, None)
    """
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_name(name: str) -> str:
    """The module a parameter belongs to, relative to its block, without ``.weight``/``.bias``.

    Example:
        >>> module_name("model.layers.3.self_attn.q_proj.weight"), module_name("model.norm.weight")
        ('self_attn.q_proj', 'model.norm')
    """
    match = _LAYER.search(name)
    rest = name[match.end() :] if match else name
    head, _, leaf = rest.rpartition(".")
    return head if head and leaf in LEAVES else rest


def natural_key(name: str) -> tuple[Any, ...]:
    """A sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def selected(name: str, modules: Sequence[str] | None) -> bool:
    """Whether parameter ``name`` is in one of ``modules`` (all when None)."""
    return modules is None or any(f".{m}." in f".{name}." for m in modules)


def as_modules(modules: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """A ``modules`` argument as a tuple (None for all); an empty selection is an error."""
    if modules is None:
        return None
    modules = (modules,) if isinstance(modules, str) else tuple(modules)
    if not modules:
        raise ValueError("modules=[] selects nothing; pass None for all parameters")
    return modules


def layer_or_non(name: str) -> int:
    """:func:`layer_index`, or :data:`NON_LAYER` for parameters outside the blocks."""
    layer = layer_index(name)
    return NON_LAYER if layer is None else layer
