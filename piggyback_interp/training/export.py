"""Write a finetuned bridge as a plain Hugging Face directory (merged weights or adapter).

The bridge's HF model carries TransformerLens wrappers (``_original_component``) and,
after LoRA, peft wrappers (``base_layer``, ``lora_A``/``lora_B``). :func:`save_finetuned`
writes what a user expects instead: a standard HF directory with the LoRA merged into
the weights (default), or a standard peft adapter directory naming its base, either
of which :func:`~piggyback_interp.core.models.load_model` and plain ``transformers`` /
``peft`` load.

Example:
    >>> import tempfile
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.training.lora import apply_lora
    >>> model = tiny_model("llama")
    >>> _ = apply_lora(model, rank=4)
    >>> out = save_finetuned(model, tempfile.mkdtemp())
    >>> sorted(p.name for p in out.iterdir())[:2]
    ['chat_template.jinja', 'config.json']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from piggyback_interp.core.hf import PEFT_PREFIX, hf_model, plain_parameter_name
from piggyback_interp.core.io import atomic_files
from piggyback_interp.core.models import chat_tokenizer


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in hf_model(model).modules() if isinstance(m, LoraLayer)]


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The HF state dict of ``model`` with any LoRA adapters merged (model unchanged).

    The LoRA deltas are added to copies; the weights themselves are never merged and
    unmerged in place (that would round them, and would change the base model of a
    shared-base pair, which holds the same tensors).
    """
    from transformers import AutoModelForCausalLM

    from piggyback_interp.analysis.task_vectors.sources import lora_deltas

    hf = hf_model(model)
    expected = AutoModelForCausalLM.from_config(hf.config).state_dict().keys()
    params = dict(hf.named_parameters(remove_duplicate=False))
    names = {id(p): n for n, p in reversed(params.items())}  # the first name of each tensor
    deltas = {id(params[n]): fns for n, fns in lora_deltas(model, names).items()}
    found: dict[str, torch.Tensor] = {}
    for name, value in hf.state_dict().items():
        if "lora_" in name:
            continue
        key = plain_parameter_name(name)
        if key in expected and key not in found:
            value = value.detach().clone()
            for delta, merged in deltas.get(id(params.get(name)), []):
                if not merged:
                    value += delta().to(value.device, value.dtype)
            found[key] = value
    missing = [k for k in expected if k not in found]
    if missing:
        raise RuntimeError(f"could not map these HF weights from the bridge: {missing[:3]}")
    return found


def save_finetuned(
    model: Any, out_dir: str | os.PathLike[str], *, merged: bool = True, base: str | None = None
) -> Path:
    """Write ``model`` to ``out_dir`` as an HF model (``merged=True``) or a peft adapter.

    ``base`` is the adapter's base model name/path recorded in ``adapter_config.json``
    (default: the model's own source path).
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = chat_tokenizer(model)
    with atomic_files(out) as staging:  # every file whole, or none; errno kept (disk full)
        if merged:
            state = merged_state_dict(model)
            fresh = AutoModelForCausalLM.from_config(hf_model(model).config)
            fresh.load_state_dict(state, strict=True)
            fresh.save_pretrained(staging, safe_serialization=True)
        else:
            _save_adapter(model, staging, base)
        tokenizer.save_pretrained(staging)
    return out


def _save_adapter(model: Any, out: Path, base: str | None) -> None:
    from safetensors.torch import save_file

    lora = _lora_layers(model)
    if not lora:
        raise ValueError("this model has no LoRA adapters; save it with merged=True")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        modules = {
            name
            for name, _ in AutoModelForCausalLM.from_config(hf_model(model).config).named_modules()
        }
    weights = {}
    for name, value in hf_model(model).state_dict().items():
        if "lora_" not in name:
            continue
        key = plain_parameter_name(name).replace(".default", "")
        if key.split(".lora_")[0] in modules:  # aliases of a module appear under other paths too
            weights[f"{PEFT_PREFIX}{key}"] = value.detach().clone().contiguous()
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights}
    layer = lora[0]
    info = getattr(model, "piggyback_info", None)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or (info.path if info is not None else None),
        "r": layer.r["default"],
        "lora_alpha": layer.lora_alpha["default"],
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(weights, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


__all__ = ["merged_state_dict", "save_finetuned"]
