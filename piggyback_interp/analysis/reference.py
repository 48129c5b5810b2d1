"""The slow reference loops every sweep engine must match: one patched full forward per cell.

:func:`reference_sweep` is the oracle (and the baseline) of
:func:`~piggyback_interp.analysis.sweep.sweep`; :func:`loop_sweep` runs it layer by
layer with a checkpoint (``engine="loop"``, and mixed sites no engine batches).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.analysis.sweep_result import SweepResult, sweep_meta, sweep_result
from piggyback_interp.core import distributed
from piggyback_interp.core.hooks import KV_SITES, expand_sites, resolve_layers
from piggyback_interp.core.io import resume_checkpoint, save_checkpoint
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import (
    Activations,
    SegmentOrPositions,
    as_batch,
    capture,
    segment_positions,
)
from piggyback_interp.interventions.patch import isolated, patch_activations
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import LogitMetric, metric_on_model


def reference_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str | Sequence[str] = "resid_pre",
    layers: int | Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    isolate: bool = True,
) -> Float[Tensor, "prompts layers cells"]:
    """The obvious loop: one patched full forward per (layer, position) cell.

    Slow on purpose: the oracle that :func:`sweep` must match, and its baseline. Any
    site works; for key/value sites with ``isolate=True`` every other key/value of
    the cell's position is pinned to the target's clean value (as in
    :func:`patch_prefix`), so only later positions see the patch.
    """
    batch = as_batch(model, spans)
    chosen = resolve_layers(model, layers)
    sites = expand_sites(site)
    positions = segment_positions(batch, segment)
    acts = as_source(source).activations(model, batch, segment, site=sites, layers=chosen)
    cells = [(layer, i) for layer in chosen for i in range(positions.shape[1])]
    values = exact_cells(model, batch, segment, metric, acts, cells, isolate=isolate)
    return values.reshape(positions.shape[0], len(chosen), positions.shape[1])


def exact_cells(
    model: Any,
    batch: ChatBatch,
    segment: SegmentOrPositions,
    metric: LogitMetric,
    acts: Activations,
    cells: Sequence[tuple[int, int]],
    *,
    isolate: bool = True,
) -> Float[Tensor, "prompts cells"]:
    """The metric with each ``(layer, i)`` cell of ``acts`` (every site it holds, at
    that layer and at its ``i``-th position of ``segment``) patched: one full forward
    per cell and continuation. ``isolate``: key/value cells as :func:`isolated`."""
    positions = segment_positions(batch, segment)
    clean = functools.cache(functools.partial(capture, model, batch, segment, site=KV_SITES))
    out = torch.empty(positions.shape[0], len(cells))
    for n, (layer, i) in enumerate(cells):
        write = acts.select(model, None, [layer])
        if isolate:
            write = isolated(model, write, batch, segment, clean=clean)
        with patch_activations(model, write.take([i]), positions[:, i : i + 1]):
            out[:, n] = metric_on_model(model, batch, metric).cpu()
    return out


def loop_sweep(
    model, source, spans, metric, *, site, layers, segment, checkpoint=None
) -> SweepResult:
    """``engine="loop"``, and mixed sites no engine batches: the reference loop, layer by
    layer (each finished layer recorded in ``checkpoint``)."""
    batch = as_batch(model, spans)
    if batch.align != "left":
        raise ValueError(
            f"a {site!r} sweep runs the reference loop, which needs batch_spans(..., align='left')"
        )
    chosen = resolve_layers(model, layers)
    positions = segment_positions(batch, segment)
    meta = {
        **sweep_meta(model, source, batch, metric, site, chosen, positions),
        "engine": "reference loop",
    }
    values = torch.full((len(chosen), positions.shape[1], positions.shape[0]), float("nan"))
    done = resume_checkpoint(checkpoint, meta, values)  # the engine's layout: [layer, cell, prompt]
    for li, layer in enumerate(chosen):
        if li not in done:
            one = reference_sweep(
                model, source, batch, metric, site=site, layers=[layer], segment=segment
            )
            values[li] = one[:, 0].T
            done.add(li)
            if distributed.is_main():
                save_checkpoint(checkpoint, meta, values, done)
    clean, src = loop_baselines(model, source, batch, metric)
    return sweep_result(model, batch, positions, chosen, values, clean, src, meta)


def loop_baselines(
    model: Any, source: Any, batch: ChatBatch, metric: LogitMetric
) -> tuple[Tensor, Tensor]:
    """The unpatched target's and the source model's metric (NaN for an Activations source)."""
    clean = metric_on_model(model, batch, metric).cpu()
    src = torch.full_like(clean, float("nan"))
    if (source_model := as_source(source).model) is not None:
        src = metric_on_model(source_model, batch, metric).cpu()
    return clean, src


__all__ = ["exact_cells", "loop_baselines", "loop_sweep", "reference_sweep"]
