"""Per-layer (or per-module) cosine similarity between task vectors (paper Fig. 8)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from piggyback_interp.analysis.task_vectors.names import layer_or_non, module_name
from piggyback_interp.analysis.task_vectors.vector import TaskVector

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
        key = (layer_or_non(name), module_name(name)) if by == "module" else (layer_or_non(name),)
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
