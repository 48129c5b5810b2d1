"""The one place that reaches into Hugging Face internals.

A ``TransformerBridge`` wraps an HF causal LM (``bridge.original_model``); the
toolkit sometimes needs what the bridge hides: the HF model itself (LoRA, FSDP,
export, saving), its config, its input embedding, a decoder layer's attention, the
KV cache (``DynamicCache``, ``past_key_values``) and a forward over the HF decoder
layers from a cached residual stream. Every such access is a small function here,
so a change in transformers or TransformerLens is fixed in one file
(``tests/test_architecture.py`` keeps it so).

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.hf import hf_config, hf_model
    >>> model = tiny_model("llama")
    >>> type(hf_model(model)).__name__, hf_config(model).num_hidden_layers == model.cfg.n_layers
    ('LlamaForCausalLM', True)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

BRIDGE_WRAPPER = "_original_component"
"""The attribute under which a bridge component keeps the HF layer it wraps."""

PEFT_PREFIX = "base_model.model."
"""The prefix peft puts before the HF parameter names of the model it wraps."""

WRAPPER_SEGMENTS = re.compile(rf"\.{BRIDGE_WRAPPER}|\.base_layer")
"""Name segments of wrappers around an HF layer (the bridge's, peft's ``base_layer``)."""


# ---------------------------------------------------------------- the HF model


def hf_model(model: Any) -> torch.nn.Module:
    """The HF causal LM inside a ``TransformerBridge`` (the same modules and tensors)."""
    return model.original_model


def hf_config(model: Any) -> Any:
    """The HF config of a bridge or an HF model; anything else is returned as it is."""
    inner = getattr(model, "original_model", model)
    return getattr(inner, "config", inner)


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The HF module of a bridge / peft model / HF model, and the name prefix to strip."""
    inner = getattr(model, "original_model", None)
    if isinstance(inner, torch.nn.Module):
        return inner, ""
    with contextlib.suppress(ImportError):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model, PEFT_PREFIX
    return model, ""


def plain_parameter_name(name: str) -> str:
    """An HF parameter name without the bridge's and peft's wrapper segments."""
    return WRAPPER_SEGMENTS.sub("", name)


def input_embedding(model: Any) -> Tensor | None:
    """The HF input embedding matrix ``[vocab, d_model]`` of a bridge (None if not one)."""
    original = getattr(model, "original_model", None)
    return None if original is None else original.get_input_embeddings().weight


def self_attention(model: Any, layer: int) -> torch.nn.Module:
    """The attention module (``q_proj``, ``k_proj``, ...) of decoder layer ``layer`` of an
    HF causal LM, or of a bridge (there the bridge's wrapper of it, with the same projections)."""
    inner = getattr(model, "original_model", model)
    return inner.model.layers[layer].self_attn


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence id and the HF generation config's (sorted)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(
        getattr(model.original_model, "generation_config", None), "eos_token_id", None
    )
    ids |= set(config_eos) if isinstance(config_eos, list) else {config_eos}
    return tuple(sorted(int(i) for i in ids if i is not None))


# ---------------------------------------------------------------- the KV cache


@functools.lru_cache(maxsize=32)
def _keeps_logits(forward_cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_cls.forward).parameters


def _hf_forward(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    *,
    last: int | None = None,
    **kwargs: Any,
) -> Any:
    """The HF model's forward on the bridge's device; ``last``: unembed only the last
    ``last`` positions where the HF class takes ``logits_to_keep``."""
    hf = model.original_model
    device = torch.device(model.cfg.device)
    if last is not None and _keeps_logits(type(hf)):
        kwargs["logits_to_keep"] = last
    return hf(
        input_ids=input_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        position_ids=None if position_ids is None else position_ids.to(device),
        **kwargs,
    )


def last_logits(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    position_ids: Int[Tensor, "batch pos"] | None = None,
    last: int = 1,
) -> Float[Tensor, "batch last vocab"]:
    """The logits of the ``last`` positions only (HF's ``logits_to_keep``: the
    unembedding skips the others); the HF model's forward, bridge hooks fire inside it.

    Example:
        >>> import torch
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> ids = torch.tensor([[1, 2, 3, 4]])
        >>> torch.allclose(last_logits(model, ids, last=2), model(ids)[:, -2:], atol=1e-5)
        True
    """
    out = _hf_forward(model, input_ids, attention_mask, position_ids, last=last, use_cache=False)
    return out.logits[:, -last:]


def forward_with_cache(
    model: Any,
    input_ids: Int[Tensor, "batch new"],
    attention_mask: Int[Tensor, "batch total"],
    position_ids: Int[Tensor, "batch new"],
    cache: Any,
) -> tuple[Float[Tensor, "batch vocab"], Any]:
    """The HF model's forward (bridge hooks fire inside it): last logits and the cache."""
    out = _hf_forward(
        model, input_ids, attention_mask, position_ids, last=1, past_key_values=cache,
        use_cache=True,
    )  # fmt: skip
    return out.logits[:, -1], out.past_key_values


def logits_at(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    rows: Int[Tensor, " n"],
    positions: Int[Tensor, " n"],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    position_ids: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "n vocab"]:
    """The logits at ``(rows[i], positions[i])`` only: the decoder runs on the whole
    batch, the unembedding on just these ``n`` hidden states.

    The HF model's own forward runs (bridge hooks fire inside it, the unembedding's
    included); a pre-hook on its output embedding gathers the asked-for hidden states,
    so whatever the HF head does after the unembedding (soft-capping, scaling) applies
    as usual. Equal to the full forward's ``logits[rows, positions]`` up to float
    rounding; on a 49k vocabulary the unembedding of every position is a fifth of a
    135M model's multiply-adds.

    Example:
        >>> import torch
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> rows, pos = torch.tensor([0, 1]), torch.tensor([3, 1])
        >>> torch.allclose(logits_at(model, ids, rows, pos), model(ids)[rows, pos], atol=1e-5)
        True
    """
    device = torch.device(model.cfg.device)
    rows, positions = rows.to(device), positions.to(device)

    def gather(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][rows, positions][None], *args[1:])

    handle = model.original_model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        out = _hf_forward(model, input_ids, attention_mask, position_ids, use_cache=False)
    finally:
        handle.remove()
    return out.logits[0]


def repeat_cache(cache: Any, rows: int) -> Any:
    """A fresh copy of a one-row cache, repeated to ``rows`` rows (None stays None)."""
    if cache is None:
        return None
    copied = copy.deepcopy(cache)
    if rows > 1:
        copied.batch_repeat_interleave(rows)
    return copied


def cache_layers(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) of every layer of an HF cache, ``[batch, kv_head, pos, d_head]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def new_cache(layers: Sequence[tuple[Tensor, Tensor]], rows: int) -> Any:
    """An HF cache holding ``layers[j]`` = (keys, values) for every layer, ``rows`` rows
    (1-row entries are broadcast without copying)."""
    from transformers import DynamicCache

    past = DynamicCache()
    for j, (k, v) in enumerate(layers):
        past.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), j)
    return past


class DecoderRunner:
    """Runs a bridge's HF decoder layers from layer ``l`` over a window of positions."""

    def __init__(self, model: Any):
        self.model = model
        hf = model.original_model
        self.layers = hf.model.layers
        self.norm = hf.model.norm
        self.rotary = hf.model.rotary_emb
        self.lm_head = hf.lm_head
        self.n_layers = model.cfg.n_layers

    def past(self, layers: Sequence[tuple[Tensor, Tensor]], rows: int) -> Any:
        """:func:`new_cache` of ``layers`` for ``rows`` rows."""
        return new_cache(layers, rows)

    def forward(
        self,
        hidden: Tensor,
        start_layer: int,
        start: int,
        mask: Tensor,
        pos: Tensor,
        past: Any,
    ) -> Tensor:
        """resid_pre of ``start_layer`` at positions ``start..start+n-1`` -> final hidden.

        ``mask`` is ``[rows, start + n]`` (padding of every key position); ``past`` holds
        keys/values of positions ``0..start-1`` and is extended in place."""
        end = start + hidden.shape[1]
        position_embeddings = self.rotary(hidden, pos)
        attn_mask = _attention_mask(mask[:, :end], start, end, hidden.dtype)
        cache_position = torch.arange(start, end, device=hidden.device)
        for j in range(start_layer, self.n_layers):
            out = self.layers[j](
                hidden,
                attention_mask=attn_mask,
                position_ids=pos,
                past_key_values=past,
                position_embeddings=position_embeddings,
                cache_position=cache_position,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """The final norm and the unembedding of a final hidden state."""
        return self.lm_head(self.norm(hidden))


def _attention_mask(mask: Tensor, start: int, T: int, dtype: torch.dtype) -> Tensor:
    """Additive causal + padding mask for queries ``start..T-1`` over keys ``0..T-1``."""
    q = torch.arange(start, T, device=mask.device)[:, None]
    k = torch.arange(T, device=mask.device)[None, :]
    allowed = (k <= q)[None, None] & mask.bool()[:, None, None, :]
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


__all__ = [
    "BRIDGE_WRAPPER",
    "PEFT_PREFIX",
    "WRAPPER_SEGMENTS",
    "DecoderRunner",
    "cache_layers",
    "eos_token_ids",
    "forward_with_cache",
    "hf_config",
    "hf_model",
    "input_embedding",
    "last_logits",
    "logits_at",
    "new_cache",
    "plain_parameter_name",
    "repeat_cache",
    "self_attention",
    "unwrap",
]
