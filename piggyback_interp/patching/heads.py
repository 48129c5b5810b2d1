"""Layer x head sweeps: one attention head's output at a segment, patched at a time.

Each cell patches the source's per-head attention output (``z``, before the output
projection) of one head in one layer at every position of the segment, and reads
a metric. This is the plain loop (one patched forward per cell, through
:func:`patch_prefix`): correct and simple, not yet batched like :func:`sweep`.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.spans import batch_spans
    >>> from piggyback_interp.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"])
    >>> head_sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False).values.shape
    torch.Size([2, 2, 4])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from piggyback_interp.hooks import resolve_layers
from piggyback_interp.metrics import LogitMetric, metric_on_model
from piggyback_interp.models import model_info
from piggyback_interp.patching.activations import Activations, SegmentOrPositions, as_batch, capture
from piggyback_interp.patching.patch import patch_prefix
from piggyback_interp.spans import ChatBatch, ChatSpans


def head_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    layers: int | Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    progress: bool = True,
) -> Any:
    """Patch each (layer, head)'s attention output at ``segment`` from ``source``.

    Returns a :class:`~piggyback_interp.patching.sweep.SweepResult` whose cells are
    heads (``positions`` holds the head indices, ``tokens`` labels like ``"L3H5"``).
    The batch must be left-padded (``batch_spans(..., align="left")``).
    """
    from piggyback_interp.patching.sweep import SweepResult, loop_baselines

    batch = as_batch(model, spans)
    chosen = resolve_layers(model, layers)
    all_heads = list(range(model.cfg.n_heads))
    heads = all_heads if heads is None else list(heads)
    bad = [h for h in heads if h not in all_heads]
    if bad:
        raise ValueError(
            f"head(s) {bad} out of range: this model has heads 0..{model.cfg.n_heads - 1}"
        )
    acts = (
        source
        if isinstance(source, Activations)
        else capture(source, batch, segment, site="z", layers=chosen)
    )
    values = torch.empty(len(batch), len(chosen), len(heads))
    bar = tqdm(total=len(chosen) * len(heads), disable=not progress, desc="head sweep")
    for li, layer in enumerate(chosen):
        for hi, head in enumerate(heads):
            with patch_prefix(
                model,
                acts,
                batch,
                site="z",
                layers=[layer],
                heads=[head],
                segment=segment,
                isolate=False,
            ):
                values[:, li, hi] = metric_on_model(model, batch, metric).cpu()
            bar.update()
    bar.close()
    clean, src = loop_baselines(model, source, batch, metric)
    return SweepResult(
        values=values,
        clean=clean,
        source=src,
        layers=list(chosen),
        positions=heads,
        tokens=[f"H{h}" for h in heads],
        segments=[segment if isinstance(segment, str) else "positions"] * len(heads),
        meta={
            "kind": "head_sweep",
            "target": model_info(model).name,
            "source": "activations" if isinstance(source, Activations) else model_info(source).name,
            "site": "z",
            "layers": list(chosen),
            "heads": heads,
            "metric": metric.name,
        },
    )


__all__ = ["head_sweep"]
