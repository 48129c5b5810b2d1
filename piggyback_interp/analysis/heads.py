"""Layer x head sweeps: one head's attention output, or one key/value head, at a time.

:func:`head_sweep` patches the source's per-head attention output (``z``, before the
output projection) of one query head in one layer at every position of a segment;
:func:`kv_head_sweep` patches the keys and/or values of one key/value head. Under
grouped-query attention (SmolLM2-135M: 9 query heads, 3 key/value heads) one K/V
head serves ``n_heads / n_kv_heads`` query heads, so a K/V-head cell changes what
all of them read. Both run on the batched engine
(:mod:`~piggyback_interp.analysis.kv_engine`: many heads per forward, from the
patched layer, over the cached positions before the segment) and keep the plain
loop (one patched full forward per cell) as ``engine="loop"``.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import batch_spans
    >>> from piggyback_interp.measures.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"])
    >>> head_sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False).values.shape
    torch.Size([2, 2, 4])
    >>> kv_head_sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False).values.shape
    torch.Size([2, 2, 2])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from einops import rearrange
from tqdm.auto import tqdm

from piggyback_interp.analysis.sweep import Engine
from piggyback_interp.core.hooks import (
    KV_SITES,
    expand_sites,
    n_heads_at,
    resolve_layers,
    resolve_site,
)
from piggyback_interp.core.models import model_info
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import (
    SegmentOrPositions,
    as_batch,
    capture,
    segment_positions,
)
from piggyback_interp.interventions.patch import check_tokens, isolated, patch_activations
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import LogitMetric, metric_on_model

ENGINES = Engine.values()


def head_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    layers: int | Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    cells_per_batch: int = 8,
    progress: bool = True,
    engine: Engine | str = Engine.BATCHED,
) -> Any:
    """Patch each (layer, query head)'s attention output at ``segment`` from ``source``.

    Returns a :class:`~piggyback_interp.analysis.sweep_result.SweepResult` whose cells are
    heads (``positions`` holds the head indices, ``tokens`` labels like ``"H5"``).
    ``engine="batched"`` stacks ``cells_per_batch`` heads per forward (any padding);
    ``engine="loop"`` is the reference (one :func:`patch_prefix` forward per cell) and
    needs a left-padded batch (``batch_spans(..., align="left")``).
    """
    engine = Engine.parse(engine, "engine")
    meta = {"kind": "head_sweep", "site": "z", "metric": metric.name, "engine": engine.value}
    return _sweep(
        model, source, spans, metric, ("z",), layers, heads, segment, cells_per_batch,
        progress, engine, isolate=False, meta=meta,
    )  # fmt: skip


def kv_head_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str = "kv",
    layers: int | Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    isolate: bool = True,
    cells_per_batch: int = 8,
    progress: bool = True,
    engine: Engine | str = Engine.BATCHED,
) -> Any:
    """Patch each (layer, key/value head)'s keys and/or values at ``segment`` from ``source``.

    A cell writes the source's keys/values of ONE key/value head at one layer at every
    position of the segment; under grouped-query attention every query head of that
    head's group reads them (query heads ``h * g .. h * g + g - 1``, ``g = n_heads /
    n_kv_heads``).

    Args:
        site: ``"kv"``, ``"k"`` or ``"v"``.
        heads: key/value head indices (default all, ``0..n_kv_heads - 1``).
        isolate: ``True`` (meaning (a), paper Eq. 1): every other key/value of the
            segment's positions, at every layer and head, stays the target's clean one,
            so only later positions see the patch, as if the head's entries were
            swapped in the target's cache. ``False`` (meaning (b)): a plain hook, the
            segment's own later layers see the patch too.
        engine: ``"batched"`` (``cells_per_batch`` heads per forward) or ``"loop"`` (one
            patched full forward per cell, left-padded batch only: the reference).

    Returns a :class:`~piggyback_interp.analysis.sweep_result.SweepResult` whose cells are K/V
    heads (``tokens`` like ``"KV1"``).
    """
    engine = Engine.parse(engine, "engine")
    sites = expand_sites(site)
    if not set(sites) <= set(KV_SITES):
        raise ValueError(f"kv_head_sweep patches keys and/or values ('kv', 'k', 'v'), not {site!r}")
    meta = {"kind": "kv_head_sweep", "site": site, "isolate": isolate, "metric": metric.name,
            "engine": engine.value}  # fmt: skip
    return _sweep(
        model, source, spans, metric, sites, layers, heads, segment, cells_per_batch,
        progress, engine, isolate=isolate, meta=meta,
    )  # fmt: skip


def _sweep(
    model: Any, source: Any, spans: ChatSpans | ChatBatch, metric: LogitMetric,
    sites: Sequence[str], layers: Any, heads: Iterable[int] | None, segment: SegmentOrPositions,
    cells_per_batch: int, progress: bool, engine: str, *, isolate: bool, meta: dict[str, Any],
) -> Any:  # fmt: skip
    """A head sweep of ``sites`` (``("z",)``: query heads; keys/values: K/V heads)."""
    kv = sites[0] in KV_SITES
    batch = as_batch(model, spans)
    chosen = resolve_layers(model, layers)
    what = "key/value head" if kv else "head"
    heads = _heads(heads, n_heads_at(model, resolve_site(model, sites[0])), what)
    bar = tqdm(total=len(chosen) * len(heads), disable=not progress, desc=f"{what} sweep")
    run = _run(
        engine, model, source, batch, metric, sites, chosen, heads, segment, cells_per_batch,
        bar, isolate=isolate,
    )  # fmt: skip
    bar.close()
    return _head_result(run, model, source, chosen, heads, segment, "KV" if kv else "H", meta)


def _head_result(
    run: tuple[Any, Any, Any], model: Any, source: Any, chosen: Sequence[int], heads: list[int],
    segment: SegmentOrPositions, label: str, meta: dict[str, Any],
) -> Any:  # fmt: skip
    """A head sweep's :class:`~piggyback_interp.analysis.sweep_result.SweepResult` (cells = heads)."""
    from piggyback_interp.analysis.sweep_result import SweepResult

    values, clean, src = run
    return SweepResult(
        values=values,
        clean=clean,
        source=src,
        layers=list(chosen),
        positions=heads,
        tokens=[f"{label}{h}" for h in heads],
        segments=[segment if isinstance(segment, str) else "positions"] * len(heads),
        meta={
            "kind": meta["kind"],
            "target": model_info(model).name,
            "source": as_source(source).label,
            **{k: v for k, v in meta.items() if k != "kind"},
            "layers": list(chosen),
            "heads": heads,
        },
    )


def _heads(heads: Iterable[int] | None, n: int, what: str) -> list[int]:
    chosen = list(range(n)) if heads is None else list(heads)
    bad = [h for h in chosen if not 0 <= h < n]
    if bad or not chosen:
        raise ValueError(
            f"{what}(s) {bad or chosen} out of range: this model has {what}s 0..{n - 1}"
        )
    return chosen


def _run(
    engine: Engine,
    model: Any,
    source: Any,
    batch: ChatBatch,
    metric: LogitMetric,
    sites: Sequence[str],
    layers: Sequence[int],
    heads: list[int],
    segment: SegmentOrPositions,
    cells_per_batch: int,
    bar: Any,
    *,
    isolate: bool,
):
    """(values ``[prompts, layers, heads]``, clean, source) of a head sweep."""
    positions = segment_positions(batch, segment)
    src = as_source(source)
    acts = None  # the source's values, where patch_prefix takes them (the postfix reference)
    if engine == "loop" or src.model is None or segment == "postfix":
        acts = src.activations(
            model, batch, segment, site=sites, layers=layers, postfix_reference=True
        )
        check_tokens(acts, batch, positions)
    if engine is Engine.LOOP:
        return _loop(
            model, source, batch, metric, acts, sites, layers, heads, segment, bar, isolate=isolate
        )
    from piggyback_interp.analysis.kv_engine import PatchEngine, one_hot, position_mask, run_cells

    patcher = PatchEngine(model, batch, metric, sites=sites, isolate=isolate)
    src = patcher.load_source(source, positions, layers, acts)
    mask = position_mask(positions, batch.input_ids.shape[1])
    n = n_heads_at(model, patcher.hook_sites[sites[0]])
    specs = [(mask, layer, one_hot(h, n)) for layer in layers for h in heads]
    values = run_cells(patcher, specs, cells_per_batch, bar)  # [layers * heads, B]
    values = rearrange(values, "(layer head) prompt -> prompt layer head", layer=len(layers))
    values = values.contiguous()
    return values, patcher.clean_values(), src


def _loop(model, source, batch, metric, acts, sites, layers, heads, segment, bar, *, isolate):
    """One patched full forward per (layer, head): the reference."""
    from piggyback_interp.analysis.reference import loop_baselines

    positions = segment_positions(batch, segment)
    pin = None
    if isolate and set(sites) <= set(KV_SITES):  # the target's own K/V at every layer
        pin = capture(model, batch, segment, site=KV_SITES)
    values = torch.empty(len(batch), len(layers), len(heads))
    for li, layer in enumerate(layers):
        one = acts.select(model, sites, [layer])
        for hi, head in enumerate(heads):
            write, only = one, [head]
            if pin is not None:  # the head written over the pinned keys/values
                write, only = isolated(model, one, batch, segment, heads=[head], clean=pin), None
            with patch_activations(model, write, positions, heads=only):
                values[:, li, hi] = metric_on_model(model, batch, metric).cpu()
            bar.update()
    clean, src = loop_baselines(model, source, batch, metric)
    return values, clean, src


__all__ = ["head_sweep", "kv_head_sweep"]
