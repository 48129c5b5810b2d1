"""What a layer x position sweep returns: :class:`SweepResult`, its cell labels and metadata.

Every sweep (:func:`~piggyback_interp.analysis.sweep.sweep`, the K/V layer and head
sweeps, AtP) returns a :class:`SweepResult`; :func:`sweep_result` builds one from
values in the engines' ``[layer, cell, prompt]`` layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.core.display import Summarized
from piggyback_interp.core.io import atomic_write_parquet, atomic_write_text
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import recovery_fraction


@dataclass(repr=False)
class SweepResult(Summarized):
    """Metric values of a layer x position sweep, with axis labels and provenance.

    ``values[prompt, layer_index, cell]``; ``clean`` is the unpatched target's metric
    and ``source`` the source model's, per prompt. Printed, it shows the grid's shape,
    site and metric and the cell of highest mean recovery; in Jupyter also the top cells.
    """

    values: Float[Tensor, "prompts layers cells"]
    clean: Float[Tensor, " prompts"]
    source: Float[Tensor, " prompts"]
    layers: list[int]
    positions: list[int]  # unpadded positions of the cells (row 0)
    tokens: list[str]
    segments: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> Float[Tensor, "layers cells"]:
        """Mean over prompts."""
        return self.values.mean(0)

    def _top_cells(self, k: int) -> list[list[Any]]:
        """``[layer, position, token, segment, mean recovery]`` of the ``k`` best cells."""
        recovery = self.recovery().nanmean(0).nan_to_num(nan=-math.inf).flatten()
        n_cells = len(self.positions)
        rows = []
        for flat in recovery.argsort(descending=True)[:k].tolist():
            if recovery[flat] == -math.inf:  # undefined: the source is the clean target
                break
            layer, cell = divmod(flat, n_cells)
            rows.append(
                [self.layers[layer], self.positions[cell], repr(self.tokens[cell]),
                 self.segments[cell], recovery[flat].item()]
            )  # fmt: skip
        return rows

    def _facts(self) -> dict[str, Any]:
        prompts, _, cells = self.values.shape
        best = self._top_cells(1)
        return {
            "prompts": prompts,
            "layers": self.layers,
            "cells": cells,
            "site": self.meta.get("site"),
            "metric": self.meta.get("metric"),
            "best": "layer {}, position {} {} ({})".format(*best[0][:4]) if best else None,
            "best_recovery": best[0][4] if best else None,
        }

    def _table(self) -> tuple[list[str], list[list[Any]]]:
        return ["layer", "position", "token", "segment", "mean recovery"], self._top_cells(5)

    def recovery(self) -> Float[Tensor, "prompts layers cells"]:
        """(patched - clean) / (source - clean) per prompt: 1 = the source's behaviour."""
        return recovery_fraction(self.values, self.clean[:, None, None], self.source[:, None, None])

    def to_frame(self) -> Any:
        """A tidy pandas DataFrame: one row per (prompt, layer, cell)."""
        import pandas as pd

        p, n_layers, n_cells = self.values.shape
        grid = torch.cartesian_prod(torch.arange(p), torch.arange(n_layers), torch.arange(n_cells))
        prompt, layer, cell = grid.T.tolist()
        rec = self.recovery()
        return pd.DataFrame(
            {
                "prompt": prompt,
                "layer": [self.layers[i] for i in layer],
                "position": [self.positions[i] for i in cell],
                "token": [self.tokens[i] for i in cell],
                "segment": [self.segments[i] for i in cell],
                "value": self.values.reshape(-1).tolist(),
                "clean": [self.clean[i].item() for i in prompt],
                "source": [self.source[i].item() for i in prompt],
                "recovery": rec.reshape(-1).tolist(),
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (parquet, the tidy frame) and ``path.json`` (metadata), atomically."""
        path = atomic_write_parquet(self.to_frame(), path)
        atomic_write_text(
            path.with_suffix(path.suffix + ".json"), json.dumps(self.meta, indent=2, default=str)
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SweepResult:
        """Read what :meth:`save` wrote."""
        import pandas as pd

        path = Path(path)
        frame = pd.read_parquet(path)
        meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        layers = sorted(frame["layer"].unique().tolist())
        cells = frame.drop_duplicates("position")[["position", "token", "segment"]]
        cells = cells.sort_values("position")
        n_p, n_l, n_c = frame["prompt"].nunique(), len(layers), len(cells)
        frame = frame.sort_values(["prompt", "layer", "position"])
        per_prompt = frame.drop_duplicates("prompt").sort_values("prompt")
        return cls(
            values=torch.tensor(frame["value"].to_numpy()).reshape(n_p, n_l, n_c).float(),
            clean=torch.tensor(per_prompt["clean"].to_numpy()).float(),
            source=torch.tensor(per_prompt["source"].to_numpy()).float(),
            layers=layers,
            positions=cells["position"].tolist(),
            tokens=cells["token"].tolist(),
            segments=cells["segment"].tolist(),
            meta=meta,
        )


def sweep_result(
    model: Any,
    batch: ChatBatch,
    positions: Tensor,
    layers: Sequence[int],
    values: Float[Tensor, "layers cells prompts"],
    clean: Tensor,
    source: Tensor,
    meta: dict[str, Any],
) -> SweepResult:
    """A layer x position sweep's result from values in the engines' layout."""
    return SweepResult(
        values=rearrange(values, "layer cell prompt -> prompt layer cell").contiguous(),
        clean=clean,
        source=source,
        layers=list(layers),
        **cell_labels(batch, positions, chat_tokenizer(model)),
        meta=meta,
    )


def cell_labels(batch: ChatBatch, positions: Tensor, tok: Any) -> dict[str, list]:
    """Row 0's unpadded position, token string and segment of every cell."""
    cols = positions[0].tolist()
    return {
        "positions": [_unpadded(batch.spans[0], p) for p in cols],
        "tokens": tok.convert_ids_to_tokens(batch.input_ids[0, cols].tolist()),
        "segments": [batch.spans[0].labels()[p] for p in cols],
    }


def _unpadded(spans: ChatSpans, p: int) -> int:
    """A padded column of ``spans`` as a position of the unpadded prompt."""
    return p - len(spans.padding) if p >= spans.padding.stop else p


def sweep_meta(model, source, batch, metric, site, layers, positions) -> dict[str, Any]:
    """What a sweep's result and checkpoint record: models, site, layers, metric, tokens."""
    return {
        "kind": "sweep",
        "target": model_info(model).name,
        "source": as_source(source).label,
        "site": site,
        "layers": list(layers),
        "metric": metric.name,
        "positions": positions.tolist(),
        "tokens_sha256": tokens_sha256(batch),
    }


def tokens_sha256(batch: ChatBatch) -> str:
    """The SHA-256 of a batch's token ids (a checkpoint's tie to its prompts)."""
    return hashlib.sha256(batch.input_ids.numpy().tobytes()).hexdigest()


__all__ = ["SweepResult", "cell_labels", "sweep_meta", "sweep_result", "tokens_sha256"]
