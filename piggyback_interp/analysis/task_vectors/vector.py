"""The :class:`TaskVector` and :func:`task_vector` that computes it."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.analysis.task_vectors.names import (
    FORMAT_VERSION,
    VECTOR_RECORD,
    VECTOR_WEIGHTS,
    as_modules,
    layer_index,
    layer_or_non,
    module_name,
    natural_key,
    selected,
)
from piggyback_interp.analysis.task_vectors.sources import Weights, open_weights


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
                    "layer": layer_or_non(name),
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
        from piggyback_interp.core.io import atomic_save_safetensors, atomic_write_text
        from piggyback_interp.core.provenance import versions

        out = Path(path)
        atomic_save_safetensors(
            {k: v.contiguous() for k, v in self.deltas.items()}, out / VECTOR_WEIGHTS
        )
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


# ================================================================ task_vector


def _check_names(base: Weights, finetuned: Weights, names: list[str], *, strict: bool) -> None:
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
    selection = as_modules(modules)
    with contextlib.ExitStack() as stack:
        tuned = open_weights(finetuned, stack, role="finetuned", lora_only=base is None)
        ref = None if base is None else open_weights(base, stack, role="base", lora_only=False)
        if ref is not None and ref.is_delta:
            raise ValueError(
                "base is a LoRA adapter; pass the full base model as `base` and the adapter "
                "as `finetuned`"
            )
        names = sorted((n for n in tuned.shapes if selected(n, selection)), key=natural_key)
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
    ref: Weights | None, tuned: Weights, names: list[str]
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


def _one_delta(ref: Weights | None, tuned: Weights, name: str) -> tuple[Tensor, float | None]:
    """One parameter's delta and its base norm: one tensor of each side in memory."""
    value = tuned.read(name)
    if ref is None:
        return value, None
    base_value = ref.read(name)
    delta = value if tuned.is_delta else value - base_value
    return delta, float(torch.linalg.vector_norm(base_value))
