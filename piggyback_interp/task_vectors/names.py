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
_WRAPPERS = re.compile(r"\._original_component|\.base_layer")
_PEFT_PREFIX = "base_model.model."
_LEAVES = ("weight", "bias")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_UNSUPPORTED_ADAPTER = {
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
    return head if head and leaf in _LEAVES else rest


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _selected(name: str, modules: Sequence[str] | None) -> bool:
    return modules is None or any(f".{m}." in f".{name}." for m in modules)


def _as_modules(modules: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if modules is None:
        return None
    modules = (modules,) if isinstance(modules, str) else tuple(modules)
    if not modules:
        raise ValueError("modules=[] selects nothing; pass None for all parameters")
    return modules


def _layer_or_non(name: str) -> int:
    layer = layer_index(name)
    return NON_LAYER if layer is None else layer
