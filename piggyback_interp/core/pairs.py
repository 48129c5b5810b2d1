"""A base model and its finetuned version, checked comparable position by position.

:func:`load_pair` checks architecture, vocabulary, special tokens and chat template from
configs and tokenizers before any weights are read, and loads a LoRA adapter on its own
base as ONE copy of the base weights (a shared-base pair, :func:`shares_weights`).
"""

from __future__ import annotations

import copy
import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from piggyback_interp.core.display import Summarized
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hf import hf_config
from piggyback_interp.core.models import (
    ADAPTER_CONFIG,
    bridge_from_hf,
    chat_tokenizer,
    load_config,
    load_hf,
    load_model,
    load_tokenizer,
    model_info,
    resolve_source,
    source_info,
)
from piggyback_interp.core.placement import Placement


class IncompatiblePairError(UserError):
    """A base and a finetuned model that cannot be compared position by position."""


_ARCH_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_SPECIAL_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _first_difference(a: str, b: str) -> str:
    for i, (la, lb) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if la != lb:
            return f"line {i + 1}: {la!r} vs {lb!r}"
    return f"one template is longer ({len(a)} vs {len(b)} characters)"


def pair_differences(base_config: Any, base_tok: Any, ft_config: Any, ft_tok: Any) -> list[str]:
    """Every reason two models cannot be compared position by position (empty: compatible)."""
    problems = []
    for name in _ARCH_FIELDS:
        a, b = getattr(base_config, name, None), getattr(ft_config, name, None)
        if a != b:
            problems.append(
                f"architecture: {name} is {a!r} in the base and {b!r} in the finetuned model"
            )
    va, vb = base_tok.get_vocab(), ft_tok.get_vocab()
    if va != vb:
        differ = sorted(set(va.items()) ^ set(vb.items()))
        problems.append(
            f"vocabulary: {len(differ)} (token, id) entries differ, e.g. {differ[0]!r}; "
            "use the same tokenizer for both models"
        )
    for name in _SPECIAL_FIELDS:
        a, b = getattr(base_tok, name, None), getattr(ft_tok, name, None)
        if a != b:
            problems.append(
                f"special tokens: {name} is {a!r} in the base and {b!r} in the finetuned model"
            )
    if sorted(base_tok.all_special_tokens) != sorted(ft_tok.all_special_tokens):
        problems.append(
            "special tokens: the sets differ: "
            f"{sorted(set(base_tok.all_special_tokens) ^ set(ft_tok.all_special_tokens))}"
        )
    ta, tb = base_tok.chat_template or "", ft_tok.chat_template or ""
    if ta != tb:
        problems.append(
            f"chat template differs ({_first_difference(ta, tb)}); the template positions "
            "must be the same tokens in both models: pass the base's template to the finetuned tokenizer"
        )
    return problems


def _check_pair(base_config: Any, base_tok: Any, ft_config: Any, ft_tok: Any) -> None:
    problems = pair_differences(base_config, base_tok, ft_config, ft_tok)
    if problems:
        raise IncompatiblePairError(
            "the base and finetuned models cannot be compared position by position:\n  - "
            + "\n  - ".join(problems)
        )


class BaseReleasedError(RuntimeError):
    """The pair's base model was released to save memory."""


@dataclass(repr=False)
class ModelPair(Summarized):
    """A base (initial) model and a finetuned one with the same tokens and template.

    ``reference`` holds whatever was computed from the base before it was released
    (the memory-lean path of :func:`load_pair`); ``base`` is then unavailable.
    ``shared``: the two models hold ONE copy of the base weights (see :func:`load_pair`).
    Printed, it names the two models and their shape, never their module trees.
    """

    finetuned: TransformerBridge
    tokenizer: Any
    _base: TransformerBridge | None = None
    reference: Any = None
    shared: bool = False  # one copy of the base weights: finetuned = base + unmerged LoRA

    @property
    def base(self) -> TransformerBridge:
        if self._base is None:
            raise BaseReleasedError(
                "the base model was released (memory-lean pair); use pair.reference, or "
                "load the pair without reference= to keep both models"
            )
        return self._base

    @property
    def has_base(self) -> bool:
        return self._base is not None

    def _facts(self) -> dict[str, Any]:
        cfg = self.finetuned.cfg
        return {
            "base": model_info(self._base).display_name if self.has_base else "released",
            "finetuned": model_info(self.finetuned).display_name,
            "layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "device": str(next(self.finetuned.parameters()).device),
            "shared": self.shared,
            "reference": None if self.reference is None else type(self.reference).__name__,
        }

    def release_base(self) -> None:
        """Drop the base model and free its memory (and CUDA cache)."""
        self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _config_and_tokenizer(model: TransformerBridge | str | os.PathLike[str]) -> tuple[Any, Any]:
    """(config, tokenizer) of a loaded bridge or of a model name, without loading weights."""
    if isinstance(model, TransformerBridge):
        return hf_config(model), chat_tokenizer(model)
    source = resolve_source(model)
    return load_config(source), load_tokenizer(source)


SHARED_ATTR = "_piggyback_shared"  # set on parameters that two models of a pair hold


def shares_weights(param: torch.Tensor) -> bool:
    """Whether ``param`` is held by both models of a shared-base pair (editing it in
    place would change both: swap it in one model instead, as task vectors do)."""
    return bool(getattr(param, SHARED_ATTR, False))


def _shared_base_problem(
    base: TransformerBridge | str | os.PathLike[str],
    finetuned: TransformerBridge | str | os.PathLike[str],
    merge_adapter: bool | None,
    placement: Placement | None,
) -> str | None:
    """Why the pair cannot share one copy of the base weights (None: it can, exactly)."""
    if isinstance(base, TransformerBridge) or isinstance(finetuned, TransformerBridge):
        return "the models are already loaded (pass names or directories instead)"
    ft_source, base_source = resolve_source(finetuned), resolve_source(base)
    if ft_source.kind != "adapter" or ft_source.adapter_path is None:
        return f"the finetuned model {ft_source.name!r} is not a LoRA adapter directory"
    peft_type = json.loads((Path(ft_source.adapter_path) / ADAPTER_CONFIG).read_text()).get(
        "peft_type"
    )
    if peft_type != "LORA":
        return f"the adapter is a {peft_type} adapter, not LoRA"
    if base_source.kind == "adapter" or ft_source.path != base_source.path:
        return (
            f"the adapter applies to {ft_source.path!r}, not to the pair's base "
            f"{base_source.path!r}"
        )
    if merge_adapter:
        return "merge_adapter=True merges the adapter into a copy of its own"
    if placement is not None:
        return "placement= (a model spread over devices) is loaded as two copies"
    return None


def _load_shared(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    *,
    device: str,
    dtype: torch.dtype,
) -> tuple[TransformerBridge, TransformerBridge]:
    """(base, finetuned) bridges over ONE copy of the base weights.

    The finetuned HF model is a copy of the base's module tree whose parameters are the
    base's own tensors (``deepcopy`` with every parameter memoised to itself), with the
    LoRA adapter injected unmerged. Each model has its own modules and so its own bridge
    and hooks; nothing is toggled, so no state can be left behind.
    """
    from peft import PeftModel

    base_source, ft_source = resolve_source(base), resolve_source(finetuned)
    assert ft_source.adapter_path is not None
    base_hf = load_hf(base_source, device=device, dtype=dtype, merge_adapter=False)
    memo: dict[int, Any] = {id(p): p for p in base_hf.parameters()}
    ft_hf = copy.deepcopy(base_hf, memo)
    peft_model = PeftModel.from_pretrained(
        ft_hf, str(Path(ft_source.adapter_path).resolve()), is_trainable=False
    )
    ft_hf = peft_model.base_model.model.eval()
    for param in base_hf.parameters():  # peft froze them: the same tensors in both models
        setattr(param, SHARED_ATTR, True)
    return (
        bridge_from_hf(
            base_hf,
            load_tokenizer(base_source),
            name=base_source.path,
            info=source_info(base_source, dtype, False),
        ),
        bridge_from_hf(
            ft_hf,
            load_tokenizer(ft_source),
            name=ft_source.path,
            info=source_info(ft_source, dtype, False),
        ),
    )


def load_pair(
    base: TransformerBridge | str | os.PathLike[str],
    finetuned: TransformerBridge | str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    merge_adapter: bool | None = None,
    reference: Callable[[TransformerBridge], Any] | None = None,
    placement: Placement | None = None,
    shared: bool | None = None,
) -> ModelPair:
    """Load (or pair already-loaded) base and finetuned models, checked compatible.

    Compatibility (architecture, vocabulary, special tokens, chat template) is
    checked from configs and tokenizers BEFORE any weights are read; a mismatch
    raises :class:`IncompatiblePairError` naming each difference.

    Shared base (the default where it is exact): when ``finetuned`` is a LoRA adapter
    directory on ``base`` itself, the pair holds ONE copy of the base weights;
    ``pair.finetuned`` runs them with the adapter unmerged, ``pair.base`` without it
    (``pair.shared`` is True). Both are ordinary, independent bridges: hooks, caches,
    generation and weight reading work on each unchanged. ``shared=False`` loads two
    copies (the adapter merged unless ``merge_adapter=False``); ``shared=True`` raises
    :class:`~piggyback_interp.core.errors.UserError` where sharing is impossible.
    ``merge_adapter`` (default: merged for two copies, unmerged for a shared pair)
    applies to adapters loaded as a copy of their own; ``merge_adapter=True`` implies two
    copies.

    Memory-lean path: with ``reference=fn``, the base is loaded first,
    ``pair.reference = fn(base)`` is computed (under ``torch.no_grad``), the base
    is released, and only then is the finetuned model loaded, so peak memory is
    about one model.

    Example:
        >>> pair = load_pair("smollm2-135m-instruct", "runs/sft/model")  # doctest: +SKIP
        >>> pair.base.cfg.n_layers == pair.finetuned.cfg.n_layers        # doctest: +SKIP
        True
    """
    base_cfg, base_tok = _config_and_tokenizer(base)
    ft_cfg, ft_tok = _config_and_tokenizer(finetuned)
    _check_pair(base_cfg, base_tok, ft_cfg, ft_tok)
    if shared is not False:
        pair = _shared_pair(
            base, finetuned, base_tok, device, dtype, merge_adapter, reference, placement, shared
        )
        if pair is not None:
            return pair

    def materialise(model: TransformerBridge | str | os.PathLike[str]) -> TransformerBridge:
        if isinstance(model, TransformerBridge):
            return model
        return load_model(
            model,
            device=device,
            dtype=dtype,
            merge_adapter=merge_adapter is not False,
            placement=placement,
        )

    if reference is None:
        return ModelPair(materialise(finetuned), base_tok, materialise(base))
    base_model = materialise(base)
    with torch.no_grad():
        ref = reference(base_model)
    del base_model
    gc.collect()
    return ModelPair(materialise(finetuned), base_tok, None, ref)


def _shared_pair(
    base: TransformerBridge | str | os.PathLike[str],
    finetuned: TransformerBridge | str | os.PathLike[str],
    tokenizer: Any,
    device: str,
    dtype: torch.dtype,
    merge_adapter: bool | None,
    reference: Callable[[TransformerBridge], Any] | None,
    placement: Placement | None,
    shared: bool | None,
) -> ModelPair | None:
    """The shared-base pair where sharing is exact; ``None`` where it is not (two copies
    then), or :class:`UserError` if ``shared=True`` asked for it."""
    problem = _shared_base_problem(base, finetuned, merge_adapter, placement)
    if problem is not None:
        if shared:
            raise UserError(
                f"cannot share one copy of the base weights: {problem}. Sharing needs a "
                "LoRA adapter directory on the pair's own base, unmerged, without "
                "placement=; pass shared=False to load two copies"
            )
        return None
    assert not isinstance(base, TransformerBridge)
    assert not isinstance(finetuned, TransformerBridge)
    base_model, ft_model = _load_shared(base, finetuned, device=device, dtype=dtype)
    if reference is None:
        return ModelPair(ft_model, tokenizer, base_model, shared=True)
    with torch.no_grad():
        ref = reference(base_model)
    return ModelPair(ft_model, tokenizer, None, ref, shared=True)
