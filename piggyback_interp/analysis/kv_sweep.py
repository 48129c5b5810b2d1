"""Key/value layer sweeps over the prefix cache (paper Eq. 1, one layer window at a time).

For every window of layers, the finetuned model's prefix keys/values at those
layers become the base model's (the ``isolate=True`` meaning of a per-layer K/V
patch: only what later positions read changes, as if the entries were swapped in
the finetuned model's prefix cache), and the rest of the prompt runs over it. The
batched engine (:mod:`~piggyback_interp.analysis.kv_engine`) stacks many windows on
the batch axis, runs the prefix once per window and starts at the window's first
layer.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import batch_spans
    >>> from piggyback_interp.measures.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"], align="prefix")
    >>> result = kv_layer_sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
    >>> result.values.shape, result.layers
    (torch.Size([2, 2, 1]), [0, 1])
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from piggyback_interp.analysis.kv_engine import PatchEngine, position_mask, run_cells
from piggyback_interp.analysis.sweep import Engine
from piggyback_interp.analysis.sweep_result import SweepResult, tokens_sha256
from piggyback_interp.core.hooks import expand_sites, resolve_layers
from piggyback_interp.core.io import resume_checkpoint, save_checkpoint
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.spans import ChatBatch, ChatSpans, batch_spans
from piggyback_interp.interventions.activations import as_batch, segment_positions
from piggyback_interp.interventions.patch import patch_prefix
from piggyback_interp.measures.metrics import LogitMetric, metric_on_model


def kv_layer_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str = "kv",
    layers: int | Iterable[int] | None = None,
    window: int = 1,
    windows_per_batch: int = 8,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    engine: Engine | str = Engine.BATCHED,
) -> SweepResult:
    """Patch the source's PREFIX keys/values one layer window at a time.

    Args:
        model, source: the finetuned and the base model.
        spans: prompts sharing one prefix, ``batch_spans(..., align="prefix")``
            (or one :class:`ChatSpans`).
        metric: a :class:`~piggyback_interp.measures.metrics.LogitMetric`.
        site: ``"kv"``, ``"k"`` or ``"v"``.
        layers: the first layers of the windows (default: every layer where a
            window fits).
        window: how many consecutive layers each cell patches.
        windows_per_batch: cells stacked on the batch axis per forward.
        checkpoint: a file to record finished windows in; a rerun with the same
            arguments resumes from it (batched engine; the loop is the slow reference).
        engine: ``"batched"`` (:mod:`~piggyback_interp.analysis.kv_engine`: the prefix is
            patched and run once per window, the rest of every prompt over it, from the
            window's first layer) or ``"loop"`` (one :func:`patch_prefix` forward per
            window and prompt: the reference, slow).

    Returns a :class:`SweepResult` whose layer axis is each window's first layer and
    whose single cell is the whole prefix (``values``: ``[prompts, windows, 1]``).
    """
    engine = Engine.parse(engine, "engine")
    sites = expand_sites(site)
    if not set(sites) <= {"k", "v"}:
        raise ValueError(
            f"kv_layer_sweep patches keys and/or values ('kv', 'k', 'v'), not {site!r}"
        )
    batch = _prefix_batch(model, spans)
    starts = _window_starts(model, layers, window)
    meta = {
        "kind": "kv_layer_sweep",
        "target": model_info(model).name,
        "source": model_info(source).name,
        "site": site,
        "window": window,
        "starts": list(starts),
        "metric": metric.name,
    }
    bar = tqdm(total=len(starts), disable=not progress, desc=f"kv layer sweep ({site})")
    if engine is Engine.LOOP:
        values, clean, src = _loop_windows(model, source, batch, metric, sites, starts, window, bar)
    else:
        values, clean, src = _engine_windows(
            model, source, batch, metric, sites, starts, window, windows_per_batch,
            checkpoint, {**meta, "tokens_sha256": tokens_sha256(batch)}, bar,
        )  # fmt: skip
    bar.close()
    return SweepResult(
        values=values[:, :, None].contiguous(),
        clean=clean,
        source=src,
        layers=list(starts),
        positions=[-1],  # one cell: the whole prefix
        tokens=["<whole prefix>"],
        segments=["prefix"],
        meta={**meta, "engine": engine.value},
    )


def _prefix_batch(model: Any, spans: ChatSpans | ChatBatch) -> ChatBatch:
    """The prompts as one batch sharing its prefix (``align="prefix"``)."""
    batch = as_batch(model, spans)
    if len(batch) > 1 and batch.align != "prefix":
        raise ValueError(
            "kv_layer_sweep shares one prefix cache: build the batch with batch_spans(..., align='prefix')"
        )
    if batch.prefix_len is None:
        batch = batch_spans(chat_tokenizer(model), batch.spans, align="prefix")
    return batch


def _window_starts(model: Any, layers: int | Iterable[int] | None, window: int) -> tuple[int, ...]:
    """The windows' first layers (default: every layer where a window fits), checked."""
    n_layers = model.cfg.n_layers
    if window < 1 or window > n_layers:
        raise ValueError(f"window must be between 1 and {n_layers}, got {window}")
    starts = resolve_layers(model, layers if layers is not None else range(n_layers - window + 1))
    if starts[-1] + window > n_layers:
        raise ValueError(
            f"a window of {window} layers starting at {starts[-1]} runs past layer {n_layers - 1}"
        )
    return starts


def _engine_windows(model, source, batch, metric, sites, starts, window, windows_per_batch,
                    checkpoint, fingerprinted, bar):  # fmt: skip
    """The batched engine: ``windows_per_batch`` windows per forward, each finished chunk
    recorded in ``checkpoint``; ``(values [prompts, windows], clean, source)``."""
    positions = segment_positions(batch, "prefix")
    patcher = PatchEngine(model, batch, metric, sites=sites)
    src = patcher.load_source(source, positions, range(starts[0], model.cfg.n_layers))
    whole = position_mask(positions, batch.input_ids.shape[1])
    windows = torch.full((len(starts), len(batch)), float("nan"))
    done = resume_checkpoint(checkpoint, fingerprinted, windows)
    bar.update(len(done))
    todo = [j for j in range(len(starts)) if j not in done]
    for c0 in range(0, len(todo), windows_per_batch):
        chunk = todo[c0 : c0 + windows_per_batch]
        specs = [(whole, range(starts[j], starts[j] + window), None) for j in chunk]
        # windows of several first layers share a forward (it starts at the lowest)
        windows[chunk] = run_cells(patcher, specs, windows_per_batch, bar, by_layer=False)
        done.update(chunk)
        save_checkpoint(checkpoint, fingerprinted, windows, done)
    return windows.T, patcher.clean_values(), src


def _loop_windows(model, source, batch, metric, sites, starts, window, bar):
    """The reference: one isolated :func:`patch_prefix` forward per window, per prompt."""
    values = torch.empty(len(batch), len(starts))
    rows = [as_batch(model, spans.without_padding()) for spans in batch.spans]
    for j, s in enumerate(starts):
        for i, one in enumerate(rows):
            with patch_prefix(model, source, one, site=sites, layers=range(s, s + window)):
                values[i, j] = _row_metric(model, one, metric, i)
        bar.update()
    clean = torch.tensor([_row_metric(model, one, metric, i) for i, one in enumerate(rows)])
    src = torch.tensor([_row_metric(source, one, metric, i) for i, one in enumerate(rows)])
    return values, clean, src


def _row_metric(model: Any, one: ChatBatch, metric: LogitMetric, row: int) -> float:
    if hasattr(metric, "select_rows"):  # per-prompt references (e.g. KL)
        metric = metric.select_rows(torch.tensor([row]))
    return metric_on_model(model, one, metric).item()


__all__ = ["kv_layer_sweep"]
