"""Weight sources read one tensor at a time: HF directories (streamed), loaded
models, peft LoRA adapters (``(B @ A) * scaling``, never merged).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from piggyback_interp.analysis.task_vectors.names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FLOAT_DTYPES,
    LEAVES,
    UNSUPPORTED_ADAPTER,
)
from piggyback_interp.core.embedded import EMBEDDED_NAME, read_manifest
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hf import PEFT_PREFIX, plain_parameter_name, unwrap

# ================================================================ weight sources


@dataclass
class Weights:
    """Named float tensors, read one at a time (float32, CPU)."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], Tensor]
    info: dict[str, Any]
    is_delta: bool = False  # the tensors are deltas already (a LoRA adapter)


def _weight_files(directory: Path) -> dict[str, Path]:
    """name -> safetensors file for an HF directory (single file or sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)
    if not files:
        hint = (
            "it holds only .bin files: re-save it with save_pretrained(safe_serialization=True)"
            if any(directory.glob("*.bin"))
            else "it holds no *.safetensors weights"
        )
        raise UserError(f"cannot read model weights from {directory}: {hint}")
    return {name: file for file in files for name in _safe_keys(file)}


def _safe_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return list(handle.keys())


def _directory_weights(directory: Path, stack: contextlib.ExitStack) -> Weights:
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Any] = {}
    for name, file in _weight_files(directory).items():
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(str(file), "pt"))
        piece = handles[file].get_slice(name)
        if piece.get_dtype() in FLOAT_DTYPES:
            shapes[name] = tuple(piece.get_shape())
            where[name] = handles[file]

    def read(name: str) -> Tensor:
        return where[name].get_tensor(name).to(torch.float32)

    manifest = read_manifest(directory) or {}
    info: dict[str, Any] = {"kind": "directory", "path": str(directory.resolve())}
    info["files"] = sorted(p.name for p in handles)
    if manifest.get("weights_sha256"):
        info["sha256"] = manifest["weights_sha256"]
        info["display_name"] = manifest.get("display_name")
    return Weights(shapes, read, info)


def _clean(name: str, prefix: str) -> str:
    name = plain_parameter_name(name)
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """HF name -> parameter (LoRA weights left out; aliases and tied names kept)."""
    module, prefix = unwrap(model)
    params: dict[str, torch.nn.Parameter] = {}
    for raw, param in module.named_parameters(remove_duplicate=False):
        if ".lora_" in raw:
            continue
        if ".modules_to_save." in raw or ".original_module." in raw:
            raise UserError(
                f"{raw!r}: peft modules_to_save wrappers are not supported; "
                "merge the adapter first (peft_model.merge_and_unload())"
            )
        params.setdefault(_clean(raw, prefix), param)
    return params


def lora_deltas(model: torch.nn.Module, names: Mapping[int, str]) -> dict[str, list[Any]]:
    """HF name -> [(delta_fn, merged)] for every active LoRA adapter in ``model``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    module, _ = unwrap(model)
    found: dict[str, list[Any]] = {}
    for layer in module.modules():
        if not isinstance(layer, LoraLayer) or layer.disable_adapters:
            continue
        base = layer.get_base_layer()
        for adapter in layer.active_adapters:
            if adapter not in layer.scaling:
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise UserError(
                    f"adapter {adapter!r} is a LoRA variant (e.g. DoRA), not B @ A; merge it "
                    "(merge_and_unload()) and pass the merged model"
                )
            merged = adapter in layer.merged_adapters
            weight = names[id(base.weight)]
            found.setdefault(weight, []).append((_weight_delta(layer, adapter), merged))
            if layer.lora_bias.get(adapter, False):
                bias = names[id(base.bias)]
                found.setdefault(bias, []).append((_bias_delta(layer, adapter), merged))
    return found


def _weight_delta(layer: Any, adapter: str) -> Callable[[], Tensor]:
    return lambda: layer.get_delta_weight(adapter).detach().to("cpu", torch.float32)


def _bias_delta(layer: Any, adapter: str) -> Callable[[], Tensor]:
    def delta() -> Tensor:
        bias = layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]
        return bias.to("cpu", torch.float32)

    return delta


def _module_info(model: torch.nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": "model", "class": type(model).__name__}
    record = getattr(model, "piggyback_info", None)
    if record is not None:
        info.update(name=record.name, display_name=record.display_name, path=record.path)
        info.update(adapter_path=record.adapter_path, adapter_merged=record.adapter_merged)
        known = record.known_sha256  # never hash here
        if known:
            info["sha256"] = known
    else:
        config = getattr(unwrap(model)[0], "config", None)
        info["name"] = getattr(config, "_name_or_path", None) or None
    return info


def _module_weights(model: torch.nn.Module, *, lora_only: bool) -> Weights:
    """Weights of a loaded model as its forward uses them (active unmerged LoRA added);
    with ``lora_only``, only the LoRA deltas."""
    params = {n: p for n, p in named_parameters(model).items() if p.is_floating_point()}
    first: dict[int, str] = {}
    for name, param in params.items():
        first.setdefault(id(param), name)
    params = {name: p for name, p in params.items() if first[id(p)] == name}  # no tied aliases
    lora = lora_deltas(model, first)
    info = _module_info(model)
    if lora_only:
        if not lora:
            raise UserError(
                f"base=None needs a LoRA adapter as `finetuned`, but this {type(model).__name__} "
                "has no active LoRA layers; pass the base model too"
            )

        def read_delta(name: str) -> Tensor:
            return sum(fn() for fn, _ in lora[name])  # type: ignore[return-value]

        shapes = {name: tuple(params[name].shape) for name in lora}
        return Weights(shapes, read_delta, {**info, "kind": "lora-model"}, is_delta=True)

    def read(name: str) -> Tensor:
        value = params[name].detach().to("cpu", torch.float32)
        for fn, merged in lora.get(name, []):
            if not merged:  # merged adapters are in the weight already
                value = value + fn()
        return value

    return Weights({name: tuple(p.shape) for name, p in params.items()}, read, info)


# ---------------------------------------------------------------- LoRA adapter directories


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (``get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _adapter_config(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{directory} is a {config.get('peft_type')} adapter; task vectors read LoRA "
            "adapters only: merge it (load_model(dir)) and pass the merged model"
        )
    for key, what in UNSUPPORTED_ADAPTER.items():
        if config.get(key):
            raise UserError(
                f"{directory}: {what} are not B @ A; merge the adapter "
                "(load_model(adapter_dir) merges it) and pass the merged model instead"
            )
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise UserError(
            f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; re-save the adapter "
            "with save_pretrained(safe_serialization=True)"
        )
    return config


def _split_lora_key(key: str) -> tuple[str, str, str | None]:
    """peft key -> (module, kind, leaf): ``base_model.model.M.lora_A.weight`` -> (M, lora_A, weight)."""
    name = key.removeprefix(PEFT_PREFIX)
    module, sep, rest = name.partition(".lora_")
    parts = rest.split(".")
    kind, leaf = f"lora_{parts[0]}", parts[-1] if parts[-1] in LEAVES else None
    if not sep or kind not in {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}:
        raise UserError(
            f"unsupported tensor {key!r} in the adapter: only LoRA A/B weights can be read "
            "without merging; merge the adapter and pass the merged model"
        )
    return module, kind, leaf


def _lora_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _adapter_weights(directory: Path, stack: contextlib.ExitStack) -> Weights:
    """The deltas of a peft LoRA adapter directory, computed per module without merging."""
    from safetensors import safe_open

    config = _adapter_config(directory)
    handle = stack.enter_context(safe_open(str(directory / ADAPTER_WEIGHTS), "pt"))
    parts: dict[str, dict[str, str]] = {}
    for key in list(handle.keys()):
        if ".base_layer." in key:  # peft's copy of a targeted embedding's base weights
            continue
        module, kind, leaf = _split_lora_key(key)
        parts.setdefault(module, {})[kind if leaf != "bias" else "bias"] = key
    shapes: dict[str, tuple[int, ...]] = {}
    plan: dict[str, tuple[str, str]] = {}  # HF name -> (module, "weight" | "bias")
    for module, keys in parts.items():
        a_shape = handle.get_slice(keys.get("lora_A") or keys["lora_embedding_A"]).get_shape()
        b_shape = handle.get_slice(keys.get("lora_B") or keys["lora_embedding_B"]).get_shape()
        r, _ = _lora_scaling(config, module)
        if len(a_shape) != 2 or a_shape[0] != r or b_shape[-1] != r:
            raise UserError(
                f"adapter {directory}: {module} has lora_A {a_shape} / lora_B {b_shape}, not "
                f"rank-{r} matrices as {ADAPTER_CONFIG} says; only linear/embedding LoRA is read"
            )
        transpose = "lora_embedding_A" in keys or bool(config.get("fan_in_fan_out"))
        shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        shapes[f"{module}.weight"], plan[f"{module}.weight"] = shape, (module, "weight")
        if "bias" in keys:
            shapes[f"{module}.bias"], plan[f"{module}.bias"] = (b_shape[0],), (module, "bias")

    def read(name: str) -> Tensor:
        module, leaf = plan[name]
        keys, (_, scaling) = parts[module], _lora_scaling(config, module)
        if leaf == "bias":
            return handle.get_tensor(keys["bias"]).to(torch.float32) * scaling
        a = handle.get_tensor(keys.get("lora_A") or keys["lora_embedding_A"]).to(torch.float32)
        b = handle.get_tensor(keys.get("lora_B") or keys["lora_embedding_B"]).to(torch.float32)
        delta = b @ a
        transpose = "lora_embedding_A" in keys or bool(config.get("fan_in_fan_out"))
        return (delta.T if transpose else delta) * scaling

    info = {
        "kind": "adapter",
        "path": str(directory.resolve()),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        **{k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out")},
        "target_modules": config.get("target_modules"),
    }
    return Weights(shapes, read, info, is_delta=True)


def open_weights(
    source: Any, stack: contextlib.ExitStack, *, role: str, lora_only: bool
) -> Weights:
    """Any accepted input (directory, adapter directory, loaded model) as :class:`Weights`."""
    if isinstance(source, torch.nn.Module):
        return _module_weights(source, lora_only=lora_only)
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(
            f"{role} must be a model directory, a peft adapter directory or a loaded model "
            f"(TransformerBridge / nn.Module), not {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if os.fspath(source) == EMBEDDED_NAME and not path.exists():
        from piggyback_interp.core.embedded import embedded_model_dir

        path = embedded_model_dir()
    if not path.is_dir():
        raise UserError(
            f"{role} {os.fspath(source)!r} is not a directory: pass an HF model directory "
            f"(config.json + *.safetensors), a peft adapter directory ({ADAPTER_CONFIG}), "
            f"{EMBEDDED_NAME!r}, or a loaded model (hub ids: download them first)"
        )
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter_weights(path, stack)
    if lora_only:
        raise UserError(
            f"base=None needs a LoRA adapter directory as `finetuned`, but {path} is a full "
            f"model (no {ADAPTER_CONFIG}); pass the base model too"
        )
    return _directory_weights(path, stack)
