"""LoRA adapters (peft) injected in place into a TransformerBridge's HF modules.

The bridge wraps each HF ``nn.Linear`` in a ``LinearBridge`` whose
``_original_component`` is the real layer; peft targets those inner layers, so the
bridge's hooks (``hook_k``, ``hook_v``, ...) see the adapted outputs and losses on
them send gradients to the LoRA weights only.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> peft_model = apply_lora(model, rank=4, target_modules=("q_proj", "v_proj"))
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from piggyback_interp.core.hf import BRIDGE_WRAPPER, hf_model

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(target_modules: Sequence[str]) -> str:
    """The peft ``target_modules`` regex that reaches the HF layers inside bridge wrappers."""
    names = "|".join(sorted(set(target_modules)))
    return rf".*\.({names})\.{BRIDGE_WRAPPER}$"


def apply_lora(
    model: Any,
    *,
    rank: int = 8,
    alpha: int | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    init_lora_weights: bool = True,
) -> Any:
    """Add LoRA adapters to ``model`` in place; returns the peft model (base frozen)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=lora_target_regex(target_modules),
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(hf_model(model), config)


__all__ = ["DEFAULT_TARGETS", "apply_lora", "lora_target_regex"]
