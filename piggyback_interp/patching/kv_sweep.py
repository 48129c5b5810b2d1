"""Key/value layer sweeps over the prefix cache (paper Eq. 1, one layer window at a time).

For every window of layers, the finetuned model's prefix cache gets the base
model's prefix keys/values at those layers (the ``isolate=True`` meaning of a
per-layer K/V patch: only what later positions read changes), and the rest of
the prompt runs over it. The prefix is computed ONCE per model, many windows are
stacked on the batch axis, and no prefix position is recomputed.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.spans import batch_spans
    >>> from piggyback_interp.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"], align="prefix")
    >>> result = kv_layer_sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
    >>> result.values.shape, result.layers
    (torch.Size([2, 2, 1]), [0, 1])
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache

from piggyback_interp.hooks import expand_sites, resolve_layers
from piggyback_interp.metrics import LogitMetric, continuation_inputs
from piggyback_interp.models import chat_tokenizer, model_info
from piggyback_interp.patching.activations import as_batch
from piggyback_interp.patching.sweep import (
    SweepResult,
    _metric_values,
    _resume,
    _save_checkpoint,
    _tokens_sha256,
)
from piggyback_interp.spans import ChatBatch, ChatSpans, batch_spans


def _prefix_cache(model: Any, batch: ChatBatch) -> Any:
    ids = batch.input_ids[:1, : batch.prefix_len].to(model.cfg.device)
    with torch.no_grad():
        _, cache = model(ids, return_type="logits_and_cache")
    return cache


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
) -> SweepResult:
    """Patch the source's PREFIX keys/values one layer window at a time.

    Args:
        model, source: the finetuned and the base model.
        spans: prompts sharing one prefix, ``batch_spans(..., align="prefix")``
            (or one :class:`ChatSpans`).
        metric: a :class:`~piggyback_interp.metrics.LogitMetric`.
        site: ``"kv"``, ``"k"`` or ``"v"``.
        layers: the first layers of the windows (default: every layer where a
            window fits).
        window: how many consecutive layers each cell patches.
        windows_per_batch: cells stacked on the batch axis per forward.
        checkpoint: a file to record finished windows in; a rerun with the same
            arguments resumes from it.

    Returns a :class:`SweepResult` whose layer axis is each window's first layer and
    whose single cell is the whole prefix (``values``: ``[prompts, windows, 1]``).
    """
    sites = expand_sites(site)
    if not set(sites) <= {"k", "v"}:
        raise ValueError(
            f"kv_layer_sweep patches keys and/or values ('kv', 'k', 'v'), not {site!r}"
        )
    batch = as_batch(model, spans)
    if len(batch) > 1 and batch.align != "prefix":
        raise ValueError(
            "kv_layer_sweep shares one prefix cache: build the batch with batch_spans(..., align='prefix')"
        )
    if batch.prefix_len is None:
        batch = batch_spans(chat_tokenizer(model), batch.spans, align="prefix")
    n_layers = model.cfg.n_layers
    if window < 1 or window > n_layers:
        raise ValueError(f"window must be between 1 and {n_layers}, got {window}")
    starts = resolve_layers(model, layers if layers is not None else range(n_layers - window + 1))
    if starts[-1] + window > n_layers:
        raise ValueError(
            f"a window of {window} layers starting at {starts[-1]} runs past layer {n_layers - 1}"
        )
    target_cache, source_cache = _prefix_cache(model, batch), _prefix_cache(source, batch)
    tok = chat_tokenizer(model)
    B = len(batch)
    meta = {
        "kind": "kv_layer_sweep",
        "target": model_info(model).name,
        "source": model_info(source).name,
        "site": site,
        "window": window,
        "starts": list(starts),
        "metric": metric.name,
    }
    fingerprinted = {**meta, "tokens_sha256": _tokens_sha256(batch)}
    values = torch.full((len(starts), B), float("nan"))
    done = _resume(checkpoint, fingerprinted, values)
    bar = tqdm(total=len(starts), disable=not progress, desc=f"kv layer sweep ({site})")
    bar.update(len(done))
    for c0 in range(0, len(starts), windows_per_batch):
        chunk = starts[c0 : c0 + windows_per_batch]
        if all(c0 + j in done for j in range(len(chunk))):
            continue
        cache = _swapped_cache(target_cache, source_cache, chunk, window, sites, B)
        vals = _metric_over_prefix(model, batch, metric, tok, cache, len(chunk))
        values[c0 : c0 + len(chunk)] = vals.reshape(len(chunk), B).cpu()
        done.update(range(c0, c0 + len(chunk)))
        _save_checkpoint(checkpoint, fingerprinted, values, done)
        bar.update(len(chunk))
    bar.close()
    no_swap = ()  # a cache of the model's own prefix keys/values, one copy per row
    clean = _metric_over_prefix(
        model, batch, metric, tok, _swapped_cache(target_cache, target_cache, [0], 1, no_swap, B), 1
    ).cpu()
    src = _metric_over_prefix(
        source,
        batch,
        metric,
        tok,
        _swapped_cache(source_cache, source_cache, [0], 1, no_swap, B),
        1,
    ).cpu()
    return SweepResult(
        values=values.T[:, :, None].contiguous(),
        clean=clean,
        source=src,
        layers=list(starts),
        positions=[-1],  # one cell: the whole prefix
        tokens=["<whole prefix>"],
        segments=["prefix"],
        meta=meta,
    )


def _swapped_cache(
    target: Any, source: Any, starts: Iterable[int], window: int, sites: tuple[str, ...], B: int
) -> Any:
    """A prefix cache of ``len(starts) * B`` rows; cell c's rows carry the source's
    keys/values at layers ``starts[c] .. starts[c] + window - 1``."""
    starts = list(starts)
    cache = DynamicCache()
    for layer in range(len(target.layers)):
        k_rows, v_rows = [], []
        for s in starts:
            swap = s <= layer < s + window
            k = source.layers[layer].keys if swap and "k" in sites else target.layers[layer].keys
            v = (
                source.layers[layer].values
                if swap and "v" in sites
                else target.layers[layer].values
            )
            k_rows.append(k.expand(B, -1, -1, -1))
            v_rows.append(v.expand(B, -1, -1, -1))
        cache.update(torch.cat(k_rows), torch.cat(v_rows), layer)
    return cache


def _metric_over_prefix(
    model: Any, batch: ChatBatch, metric: LogitMetric, tok: Any, prefix_cache: Any, reps: int
) -> Tensor:
    """The metric of ``model`` running the rest of every prompt (repeated ``reps`` times,
    cell-major) over ``prefix_cache``; the cache is copied per continuation, never changed."""
    P = batch.prefix_len
    logits = []
    with torch.no_grad():
        for cont, n_read in zip(metric.continuations(tok), metric.n_read(tok), strict=True):
            ids, mask, pos = continuation_inputs(batch, cont, model.cfg.device)
            out = model(
                ids[:, P:].repeat(reps, 1),
                attention_mask=mask.repeat(reps, 1),
                position_ids=pos[:, P:].repeat(reps, 1),
                past_key_values=copy.deepcopy(prefix_cache),
            )
            read_start = ids.shape[1] - len(cont) - 1 - P
            logits.append(out[:, read_start : read_start + n_read])
    return _metric_values(metric, logits, torch.arange(len(batch)).repeat(reps))


__all__ = ["kv_layer_sweep"]
