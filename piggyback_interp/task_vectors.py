"""Task vectors: the weight change a finetune made, per layer and module (paper Fig. 8).

A task vector is ``finetuned - base`` for every parameter, keyed by its Hugging Face
name (``model.layers.3.self_attn.q_proj.weight``). :func:`task_vector` computes it
from HF directories, loaded models (a ``TransformerBridge`` or a plain / peft HF
module) or a peft LoRA adapter (``(B @ A) * scaling``, never merged, base optional);
:meth:`TaskVector.norms` and :func:`cosine_similarity` summarise it per layer;
:func:`scaled_task_vector` runs a model at ``base + alpha * delta`` and restores it.

Memory: directories are streamed tensor by tensor with ``safetensors.safe_open``, so
besides the task vector itself (one float32 copy of the changed parameters) at most
one tensor of each model is in memory at a time; loaded models are read in place.
:func:`scaled_task_vector` holds the loaded model, the vector and a copy of only the
parameters it touches. Never three full models.

Example:
    >>> import tempfile, torch
    >>> from piggyback_interp.testing import save_tiny_model, tiny_hf_model
    >>> base = save_tiny_model(tempfile.mkdtemp(), "llama")
    >>> tuned = tiny_hf_model("llama")
    >>> with torch.no_grad():
    ...     _ = tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    >>> vector = task_vector(base, tuned)
    >>> list(vector.deltas), vector.layer("model.layers.1.mlp.down_proj.weight")
    (['model.layers.1.mlp.down_proj.weight'], 1)
    >>> round(float(vector.layer_norms().norm.iloc[0]), 4)   # 0.01 * sqrt(64 * 128)
    0.9051
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.embedded import EMBEDDED_NAME, read_manifest

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


# ================================================================ the vector


@dataclass
class TaskVector:
    """Weight deltas ``finetuned - base`` by HF parameter name (float32, CPU), with provenance.

    Only parameters that changed are kept (for an adapter: the adapted modules).
    ``base_norms`` holds the base weight's norm per parameter where the base was read.

    Example:
        >>> import torch
        >>> v = TaskVector({"model.layers.0.mlp.up_proj.weight": torch.full((2, 2), 0.5)})
        >>> len(v), v.module("model.layers.0.mlp.up_proj.weight")
        (1, 'mlp.up_proj')
        >>> v.norms()[["layer", "module", "norm"]].to_dict("records")
        [{'layer': 0, 'module': 'mlp.up_proj', 'norm': 1.0}]
    """

    deltas: dict[str, Float[Tensor, "..."]]
    source: dict[str, Any] = field(default_factory=dict)
    base_norms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deltas = {
            name: delta.detach().to("cpu", torch.float32) for name, delta in self.deltas.items()
        }

    def __len__(self) -> int:
        return len(self.deltas)

    def __contains__(self, name: object) -> bool:
        return name in self.deltas

    @staticmethod
    def layer(name: str) -> int | None:
        """The block index of a parameter name, or None outside the blocks."""
        return layer_index(name)

    @staticmethod
    def module(name: str) -> str:
        """The module of a parameter name relative to its block (``self_attn.q_proj``)."""
        return module_name(name)

    @property
    def numel(self) -> int:
        """Number of weight entries the vector holds."""
        return sum(d.numel() for d in self.deltas.values())

    def norms(self) -> pd.DataFrame:
        """One row per parameter: layer (-1 outside blocks), module, param, norm,
        base_norm (NaN when the base was not read), relative (norm / base_norm)."""
        rows = []
        for name, delta in self.deltas.items():
            norm = float(torch.linalg.vector_norm(delta))
            base = self.base_norms.get(name, math.nan)
            rows.append(
                {
                    "layer": _layer_or_non(name),
                    "module": module_name(name),
                    "param": name,
                    "norm": norm,
                    "base_norm": base,
                    "relative": norm / base if base > 0 else math.nan,
                }
            )
        columns = ["layer", "module", "param", "norm", "base_norm", "relative"]
        return pd.DataFrame(rows, columns=columns)

    def layer_norms(self) -> pd.DataFrame:
        """One row per layer (-1: outside the blocks): norm and base_norm as the square root
        of the sum of squares over its parameters, relative, and n_params."""
        frame = self.norms()
        rows = []
        for layer, group in frame.groupby("layer", sort=True):
            norm = math.sqrt(float((group["norm"] ** 2).sum()))
            base = math.sqrt(float((group["base_norm"] ** 2).sum(skipna=False)))  # NaN if any NaN
            rows.append(
                {
                    "layer": int(layer),
                    "norm": norm,
                    "base_norm": base,
                    "relative": norm / base if base > 0 else math.nan,
                    "n_params": len(group),
                }
            )
        return pd.DataFrame(rows, columns=["layer", "norm", "base_norm", "relative", "n_params"])

    def scale(self, alpha: float | int) -> TaskVector:
        """A new vector ``alpha * self`` (provenance records the factor)."""
        source = {**self.source, "scale": float(alpha) * float(self.source.get("scale", 1.0))}
        deltas = {name: delta * alpha for name, delta in self.deltas.items()}
        return TaskVector(deltas, source, dict(self.base_norms))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the vector to the directory ``path`` (safetensors + a JSON record)."""
        from safetensors.torch import save_file

        from piggyback_interp.provenance import atomic_write_text, versions

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{VECTOR_WEIGHTS}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in self.deltas.items()}, str(tmp))
        os.replace(tmp, out / VECTOR_WEIGHTS)
        record = {
            "format_version": FORMAT_VERSION,
            "names": list(self.deltas),
            "source": self.source,
            "base_norms": self.base_norms,
            "versions": versions(),
        }
        atomic_write_text(out / VECTOR_RECORD, json.dumps(record, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskVector:
        """Read a vector written by :meth:`save`."""
        from safetensors.torch import load_file

        where = Path(path)
        if not (where / VECTOR_WEIGHTS).is_file() or not (where / VECTOR_RECORD).is_file():
            raise ValueError(
                f"{where} holds no saved task vector ({VECTOR_WEIGHTS} + {VECTOR_RECORD}); "
                "pass the directory that TaskVector.save wrote"
            )
        record = json.loads((where / VECTOR_RECORD).read_text())
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{where / VECTOR_RECORD} has format_version {record.get('format_version')!r}; "
                f"this version reads {FORMAT_VERSION}: recompute the vector with task_vector()"
            )
        tensors = load_file(str(where / VECTOR_WEIGHTS))
        deltas = {name: tensors[name] for name in record["names"]}
        base_norms = {k: float(v) for k, v in record.get("base_norms", {}).items()}
        return cls(deltas, record.get("source", {}), base_norms)


def _layer_or_non(name: str) -> int:
    layer = layer_index(name)
    return NON_LAYER if layer is None else layer


# ================================================================ weight sources


@dataclass
class _Weights:
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
        raise ValueError(f"cannot read model weights from {directory}: {hint}")
    return {name: file for file in files for name in _safe_keys(file)}


def _safe_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return list(handle.keys())


def _directory_weights(directory: Path, stack: contextlib.ExitStack) -> _Weights:
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Any] = {}
    for name, file in _weight_files(directory).items():
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(str(file), "pt"))
        piece = handles[file].get_slice(name)
        if piece.get_dtype() in _FLOAT_DTYPES:
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
    return _Weights(shapes, read, info)


def _hf_module(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The HF module of a bridge / peft model / HF model, and the name prefix to strip."""
    inner = getattr(model, "original_model", None)
    if isinstance(inner, torch.nn.Module):
        return inner, ""
    with contextlib.suppress(ImportError):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model, _PEFT_PREFIX
    return model, ""


def _clean(name: str, prefix: str) -> str:
    name = _WRAPPERS.sub("", name)
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """HF name -> parameter (LoRA weights left out; aliases and tied names kept)."""
    module, prefix = _hf_module(model)
    params: dict[str, torch.nn.Parameter] = {}
    for raw, param in module.named_parameters(remove_duplicate=False):
        if ".lora_" in raw:
            continue
        if ".modules_to_save." in raw or ".original_module." in raw:
            raise ValueError(
                f"{raw!r}: peft modules_to_save wrappers are not supported; "
                "merge the adapter first (peft_model.merge_and_unload())"
            )
        params.setdefault(_clean(raw, prefix), param)
    return params


def _lora_deltas(model: torch.nn.Module, names: Mapping[int, str]) -> dict[str, list[Any]]:
    """HF name -> [(delta_fn, merged)] for every active LoRA adapter in ``model``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    module, _ = _hf_module(model)
    found: dict[str, list[Any]] = {}
    for layer in module.modules():
        if not isinstance(layer, LoraLayer) or layer.disable_adapters:
            continue
        base = layer.get_base_layer()
        for adapter in layer.active_adapters:
            if adapter not in layer.scaling:
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(
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
        known = record._sha256 or record.__dict__.get("sha256")  # never hash here
        if known:
            info["sha256"] = known
    else:
        config = getattr(_hf_module(model)[0], "config", None)
        info["name"] = getattr(config, "_name_or_path", None) or None
    return info


def _module_weights(model: torch.nn.Module, *, lora_only: bool) -> _Weights:
    """Weights of a loaded model as its forward uses them (active unmerged LoRA added);
    with ``lora_only``, only the LoRA deltas."""
    params = {n: p for n, p in _named_parameters(model).items() if p.is_floating_point()}
    first: dict[int, str] = {}
    for name, param in params.items():
        first.setdefault(id(param), name)
    params = {name: p for name, p in params.items() if first[id(p)] == name}  # no tied aliases
    lora = _lora_deltas(model, first)
    info = _module_info(model)
    if lora_only:
        if not lora:
            raise ValueError(
                f"base=None needs a LoRA adapter as `finetuned`, but this {type(model).__name__} "
                "has no active LoRA layers; pass the base model too"
            )

        def read_delta(name: str) -> Tensor:
            return sum(fn() for fn, _ in lora[name])  # type: ignore[return-value]

        shapes = {name: tuple(params[name].shape) for name in lora}
        return _Weights(shapes, read_delta, {**info, "kind": "lora-model"}, is_delta=True)

    def read(name: str) -> Tensor:
        value = params[name].detach().to("cpu", torch.float32)
        for fn, merged in lora.get(name, []):
            if not merged:  # merged adapters are in the weight already
                value = value + fn()
        return value

    return _Weights({name: tuple(p.shape) for name, p in params.items()}, read, info)


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
        raise ValueError(
            f"{directory} is a {config.get('peft_type')} adapter; task vectors read LoRA "
            "adapters only: merge it (load_model(dir)) and pass the merged model"
        )
    for key, what in _UNSUPPORTED_ADAPTER.items():
        if config.get(key):
            raise ValueError(
                f"{directory}: {what} are not B @ A; merge the adapter "
                "(load_model(adapter_dir) merges it) and pass the merged model instead"
            )
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; re-save the adapter "
            "with save_pretrained(safe_serialization=True)"
        )
    return config


def _split_lora_key(key: str) -> tuple[str, str, str | None]:
    """peft key -> (module, kind, leaf): ``base_model.model.M.lora_A.weight`` -> (M, lora_A, weight)."""
    name = key.removeprefix(_PEFT_PREFIX)
    module, sep, rest = name.partition(".lora_")
    parts = rest.split(".")
    kind, leaf = f"lora_{parts[0]}", parts[-1] if parts[-1] in _LEAVES else None
    if not sep or kind not in {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}:
        raise ValueError(
            f"unsupported tensor {key!r} in the adapter: only LoRA A/B weights can be read "
            "without merging; merge the adapter and pass the merged model"
        )
    return module, kind, leaf


def _lora_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _adapter_weights(directory: Path, stack: contextlib.ExitStack) -> _Weights:
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
            raise ValueError(
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
    return _Weights(shapes, read, info, is_delta=True)


def _open(source: Any, stack: contextlib.ExitStack, *, role: str, lora_only: bool) -> _Weights:
    """Any accepted input as a :class:`_Weights`."""
    if isinstance(source, torch.nn.Module):
        return _module_weights(source, lora_only=lora_only)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"{role} must be a model directory, a peft adapter directory or a loaded model "
            f"(TransformerBridge / nn.Module), not {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if os.fspath(source) == EMBEDDED_NAME and not path.exists():
        from piggyback_interp.embedded import embedded_model_dir

        path = embedded_model_dir()
    if not path.is_dir():
        raise ValueError(
            f"{role} {os.fspath(source)!r} is not a directory: pass an HF model directory "
            f"(config.json + *.safetensors), a peft adapter directory ({ADAPTER_CONFIG}), "
            f"{EMBEDDED_NAME!r}, or a loaded model (hub ids: download them first)"
        )
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter_weights(path, stack)
    if lora_only:
        raise ValueError(
            f"base=None needs a LoRA adapter directory as `finetuned`, but {path} is a full "
            f"model (no {ADAPTER_CONFIG}); pass the base model too"
        )
    return _directory_weights(path, stack)


# ================================================================ task_vector


def _check_names(base: _Weights, finetuned: _Weights, names: list[str], *, strict: bool) -> None:
    missing = [n for n in names if n not in base.shapes]
    extra = [] if finetuned.is_delta else [n for n in base.shapes if n not in finetuned.shapes]
    if strict and (missing or extra):
        where = []
        if missing:
            where.append(f"{len(missing)} in the finetuned model only (e.g. {missing[:3]})")
        if extra:
            where.append(f"{len(extra)} in the base only (e.g. {extra[:3]})")
        raise ValueError(
            f"the base and finetuned models have different parameters: {'; '.join(where)}. "
            "Compare models of the same architecture, restrict with modules=[...], or pass "
            "strict=False to skip parameters missing on one side"
        )
    for name in names:
        if name in base.shapes and base.shapes[name] != finetuned.shapes[name]:
            raise ValueError(
                f"parameter {name!r} has shape {list(base.shapes[name])} in the base and "
                f"{list(finetuned.shapes[name])} in the finetuned model; a task vector needs "
                "both models of the same architecture (same config)"
            )


def task_vector(
    base: str | os.PathLike[str] | torch.nn.Module | None,
    finetuned: str | os.PathLike[str] | torch.nn.Module,
    *,
    modules: str | Sequence[str] | None = None,
    strict: bool = True,
) -> TaskVector:
    """The weight change ``finetuned - base``, parameter by parameter (float32, CPU).

    Args:
        base: an HF model directory (streamed from safetensors), ``"smollm2-135m-instruct"``,
            a loaded model (``TransformerBridge``, HF or peft module), or None when
            ``finetuned`` is a LoRA adapter (then ``base_norms`` stay unknown).
        finetuned: the same kinds, or a peft LoRA adapter directory, or a loaded model
            with active LoRA layers: delta = ``(B @ A) * lora_alpha / r`` per adapted
            module (``/ sqrt(r)`` with rslora, transposed with ``fan_in_fan_out``),
            computed without merging and without reading the base's weights.
        modules: keep only parameters whose dotted name contains one of these
            components (``"q_proj"``, ``"mlp"``, ``"self_attn.v_proj"``).
        strict: raise when a parameter is on one side only (default), else skip it.

    Only parameters whose delta is not exactly zero are kept. Memory: directories are
    read one tensor at a time (``safe_open``), never as a whole state dict.

    Example:
        >>> import tempfile
        >>> from piggyback_interp.testing import save_tiny_model
        >>> a = save_tiny_model(tempfile.mkdtemp(), "llama", seed=0)
        >>> b = save_tiny_model(tempfile.mkdtemp(), "llama", seed=1)
        >>> vector = task_vector(a, b, modules=["q_proj"])
        >>> sorted(vector.deltas)
        ['model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.q_proj.weight']
    """
    selection = _as_modules(modules)
    with contextlib.ExitStack() as stack:
        tuned = _open(finetuned, stack, role="finetuned", lora_only=base is None)
        ref = None if base is None else _open(base, stack, role="base", lora_only=False)
        if ref is not None and ref.is_delta:
            raise ValueError(
                "base is a LoRA adapter; pass the full base model as `base` and the adapter "
                "as `finetuned`"
            )
        names = sorted((n for n in tuned.shapes if _selected(n, selection)), key=_natural_key)
        if not names:
            raise ValueError(
                f"modules={list(selection or [])} matches none of the {len(tuned.shapes)} "
                f"parameters (e.g. {sorted(tuned.shapes)[:3]}); name module components "
                "such as 'q_proj' or 'mlp'"
            )
        skipped: list[str] = []
        if ref is not None:
            _check_names(ref, tuned, names, strict=strict)
            skipped = [n for n in names if n not in ref.shapes]
            names = [n for n in names if n in ref.shapes]
        deltas, base_norms = _deltas(ref, tuned, names)
        source = {
            "base": None if ref is None else ref.info,
            "finetuned": tuned.info,
            "modules": None if selection is None else list(selection),
        }
        if skipped:
            source["skipped"] = skipped
    return TaskVector(deltas, source, base_norms)


def _deltas(
    ref: _Weights | None, tuned: _Weights, names: list[str]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    deltas: dict[str, Tensor] = {}
    base_norms: dict[str, float] = {}
    for name in names:
        delta, base_norm = _one_delta(ref, tuned, name)  # its inputs are freed on return
        if delta.any():
            deltas[name] = delta
            if base_norm is not None:
                base_norms[name] = base_norm
    return deltas, base_norms


def _one_delta(ref: _Weights | None, tuned: _Weights, name: str) -> tuple[Tensor, float | None]:
    """One parameter's delta and its base norm: one tensor of each side in memory."""
    value = tuned.read(name)
    if ref is None:
        return value, None
    base_value = ref.read(name)
    delta = value if tuned.is_delta else value - base_value
    return delta, float(torch.linalg.vector_norm(base_value))


# ================================================================ cosine similarity


def cosine_similarity(vectors: Mapping[str, TaskVector], *, by: str = "layer") -> pd.DataFrame:
    """Cosine similarity between task vectors, per layer (or per layer and module).

    For every unordered pair ``(a, b)`` (``a`` before ``b`` in ``vectors``; no diagonal),
    the deltas of the parameters present in BOTH vectors are flattened and concatenated
    per group; a group where either side is all zero gives NaN. Parameters outside the
    blocks (embeddings, final norm, head) form layer -1. Columns: ``layer``, (``module``
    with ``by="module"``), ``a``, ``b``, ``cosine``, ``numel`` (entries compared).

    Example:
        >>> import torch
        >>> w = "model.layers.0.mlp.up_proj.weight"
        >>> v = {"sft": TaskVector({w: torch.ones(2, 2)}), "treft": TaskVector({w: -torch.ones(2, 2)})}
        >>> cosine_similarity(v)[["layer", "a", "b", "cosine"]].to_dict("records")
        [{'layer': 0, 'a': 'sft', 'b': 'treft', 'cosine': -1.0}]
    """
    if by not in ("layer", "module"):
        raise ValueError(f"by={by!r}: choose 'layer' or 'module'")
    if len(vectors) < 2:
        raise ValueError(f"cosine_similarity needs two or more task vectors, got {len(vectors)}")
    labels = list(vectors)
    rows: list[dict[str, Any]] = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            rows += _pair_rows(a, vectors[a], b, vectors[b], by)
    keys = ["layer", "module"] if by == "module" else ["layer"]
    frame = pd.DataFrame(rows, columns=[*keys, "a", "b", "cosine", "numel"])
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _pair_rows(a: str, va: TaskVector, b: str, vb: TaskVector, by: str) -> list[dict[str, Any]]:
    common = [name for name in va.deltas if name in vb.deltas]
    if not common:
        raise ValueError(
            f"task vectors {a!r} and {b!r} share no parameters; compute them over the same "
            "modules (e.g. the same LoRA target_modules)"
        )
    sums: dict[tuple[Any, ...], list[float]] = {}
    for name in common:
        x, y = va.deltas[name], vb.deltas[name]
        if x.shape != y.shape:
            raise ValueError(
                f"parameter {name!r} has shape {list(x.shape)} in {a!r} and {list(y.shape)} "
                f"in {b!r}; compare task vectors of the same architecture"
            )
        key = (_layer_or_non(name), module_name(name)) if by == "module" else (_layer_or_non(name),)
        acc = sums.setdefault(key, [0.0, 0.0, 0.0, 0])
        x, y = x.flatten(), y.flatten()
        acc[0] += float(torch.dot(x, y))
        acc[1] += float(torch.dot(x, x))
        acc[2] += float(torch.dot(y, y))
        acc[3] += x.numel()
    rows = []
    for key, (dot, xx, yy, numel) in sums.items():
        cosine = dot / math.sqrt(xx * yy) if xx > 0 and yy > 0 else math.nan
        if not math.isnan(cosine):
            cosine = max(-1.0, min(1.0, cosine))
        names = ("layer", "module")[: len(key)]
        rows.append(
            {**dict(zip(names, key, strict=True)), "a": a, "b": b, "cosine": cosine, "numel": numel}
        )
    return rows


# ================================================================ applying a vector


def _target_parameters(model: torch.nn.Module, vector: TaskVector) -> dict[str, torch.nn.Parameter]:
    """The model's parameter for each name in ``vector``, checked (names, shapes, ties)."""
    params = _named_parameters(model)
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
def _add(params: Mapping[str, torch.nn.Parameter], vector: TaskVector, alpha: float) -> None:
    for name, param in params.items():
        param.add_(vector.deltas[name].to(param.device), alpha=alpha)


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
    _add(_target_parameters(model, vector), vector, float(alpha))
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
    params = _target_parameters(model, vector)
    originals = {name: param.detach().clone() for name, param in params.items()}
    try:
        _add(params, vector, float(alpha))
        yield model
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(originals[name])


__all__ = [
    "NON_LAYER",
    "TaskVector",
    "apply_task_vector",
    "cosine_similarity",
    "layer_index",
    "module_name",
    "scaled_task_vector",
    "task_vector",
]
