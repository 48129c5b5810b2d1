"""The residual engine behind :func:`~piggyback_interp.analysis.sweep.sweep`.

For every cell (layer ``l``, segment position ``i``) it patches the source's
activation at that one site into the target and reads a metric:

* stacks many cells on the batch axis (``cells_per_batch`` rows of cells x prompts);
* starts each patched run AT layer ``l`` from the target's cached residual stream,
  running the HF decoder layers itself (the bridge's ``start_at_layer`` still runs
  the lower blocks);
* reuses every position before the earliest patched one through the target's
  cached keys/values (causal attention: they cannot change);
* computes logits only at the positions the metric reads, and keeps metric values
  on the device until the end.

Tests check it against :func:`~piggyback_interp.analysis.reference.reference_sweep`
and ``transformer_lens.patching``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from piggyback_interp.analysis.sweep_result import SweepResult, sweep_meta, sweep_result
from piggyback_interp.core import distributed
from piggyback_interp.core.hf import DecoderRunner, cache_layers
from piggyback_interp.core.hooks import HookSite, resolve_layers, resolve_site
from piggyback_interp.core.io import resume_checkpoint, save_checkpoint
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import (
    Activations,
    SegmentOrPositions,
    as_batch,
    scatter,
    segment_positions,
)
from piggyback_interp.interventions.patch import check_tokens
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import LogitMetric, continuation_inputs

SWEEP_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

# ---------------------------------------------------------------- inputs


@dataclass
class Variant:
    """One continuation appended to every row, with the target's clean state on it."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    read_start: int  # first position whose logits the metric reads
    n_read: int
    resid: dict[int, Tensor]  # layer -> resid_pre [rows, T, d]
    cache: Any  # DynamicCache of the clean target run
    read_logits: Tensor  # the clean run's logits at the read positions


def clean_variant(
    model: Any, batch: ChatBatch, continuation: Sequence[int], n_read: int, layers: Sequence[int]
) -> Variant:
    """The target's clean run on ``batch`` + ``continuation``: resid_pre, cache, read logits."""
    device = model.cfg.device
    ids, mask, pos = continuation_inputs(batch, continuation, device)
    resid: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(act: Tensor, hook: Any) -> Tensor:
            resid[layer] = act.detach()
            return act

        return hook

    resid_pre = resolve_site(model, "resid_pre")
    hooks = [(resid_pre.name(layer), keep(layer)) for layer in layers]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits, cache = model(
            ids, attention_mask=mask, position_ids=pos, return_type="logits_and_cache"
        )
    read_start = ids.shape[1] - len(continuation) - 1
    read_logits = logits[:, read_start : read_start + n_read]
    return Variant(ids, mask, pos, read_start, n_read, resid, cache, read_logits)


def metric_values(metric: LogitMetric, logits: list[Tensor], rows: Tensor) -> Tensor:
    """``metric`` on logits whose rows are the prompts ``rows`` (per-prompt references kept)."""
    if hasattr(metric, "select_rows"):  # metrics with per-prompt references (e.g. KL)
        metric = metric.select_rows(rows)
    return metric(logits)


def resid_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str = "resid_pre",
    layers: int | Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    cells_per_batch: int = 8,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> SweepResult:
    """:func:`~piggyback_interp.analysis.sweep.sweep` of one residual ``site`` (one of
    :data:`SWEEP_SITES`) on the engine; same arguments."""
    batch = as_batch(model, spans)
    chosen = resolve_layers(model, layers)
    positions = segment_positions(batch, segment)  # [B, n]
    acts = as_source(source).activations(model, batch, segment, site=site, layers=chosen)
    check_tokens(acts, batch, positions)
    tok = chat_tokenizer(model)
    variants = [
        clean_variant(model, batch, c, n, chosen)
        for c, n in zip(metric.continuations(tok), metric.n_read(tok), strict=True)
    ]
    meta = sweep_meta(model, source, batch, metric, site, chosen, positions)
    values = torch.full((len(chosen), positions.shape[1], positions.shape[0]), float("nan"))
    done = resume_checkpoint(checkpoint, meta, values)
    cells = _Cells(
        DecoderRunner(model), variants, metric, resolve_site(model, site), positions,
        _shared_prefix(batch, positions), cells_per_batch,
    )  # fmt: skip
    with torch.no_grad():
        _sweep_layers(cells, acts, chosen, values, done, checkpoint, meta, progress)
    clean, src_value = _baselines(metric, source, variants, positions.shape[0])
    return sweep_result(model, batch, positions, chosen, values, clean, src_value, meta)


def resid_cells(
    model: Any,
    batch: ChatBatch,
    metric: LogitMetric,
    acts: Activations,
    cells: Sequence[tuple[int, int]],
    *,
    site: str = "resid_pre",
    segment: SegmentOrPositions = "prefix",
    cells_per_batch: int = 8,
) -> Float[Tensor, "prompts cells"]:
    """The metric with each ``(layer, i)`` cell (``acts`` at ``site``, at the ``i``-th
    position of ``segment``) patched, on the engine: the cells of one layer run
    ``cells_per_batch`` to a forward, each from that layer up. The same values as
    :func:`~piggyback_interp.analysis.reference.exact_cells`, which runs one full forward
    per cell."""
    positions = segment_positions(batch, segment)
    layers = sorted({layer for layer, _ in cells})
    tok = chat_tokenizer(model)
    variants = [
        clean_variant(model, batch, c, n, layers)
        for c, n in zip(metric.continuations(tok), metric.n_read(tok), strict=True)
    ]
    hook_site = resolve_site(model, site)
    engine = _Cells(
        DecoderRunner(model), variants, metric, hook_site, positions,
        _shared_prefix(batch, positions), cells_per_batch,
    )  # fmt: skip
    out = torch.empty(positions.shape[0], len(cells))
    for layer in layers:
        mine = [n for n, (at, _) in enumerate(cells) if at == layer]
        src = acts.values[hook_site.name(layer)]
        for c0 in range(0, len(mine), cells_per_batch):
            chunk = mine[c0 : c0 + cells_per_batch]
            with torch.no_grad():
                out[:, chunk] = engine.some(layer, src, [cells[n][1] for n in chunk]).T
    return out


def _shared_prefix(batch: ChatBatch, positions: Tensor) -> int | None:
    """The prefix length when prompts share their prefix at the same columns and every
    swept position lies in it (the prefix is then patched once per cell), else None."""
    if batch.align == "prefix" and int(positions.max()) < (batch.prefix_len or 0):
        return batch.prefix_len
    return None


@dataclass
class _Cells:
    """What every chunk of cells of a residual sweep runs with."""

    runner: DecoderRunner
    variants: list[Variant]
    metric: LogitMetric
    hook_site: HookSite
    positions: Tensor  # [B, n]
    shared_prefix: int | None
    per_batch: int

    def layer(self, layer: int, src: Tensor, bar: Any) -> Tensor:
        """``[cells, prompts]`` metric values with each cell of ``layer`` patched."""
        B, n_cells = self.positions.shape
        out = torch.empty(n_cells, B)
        for c0 in range(0, n_cells, self.per_batch):
            cells = range(c0, min(n_cells, c0 + self.per_batch))
            out[cells.start : cells.stop] = self.some(layer, src, cells)
            bar.update(len(cells))
        return out

    def some(self, layer: int, src: Tensor, cells: Sequence[int]) -> Tensor:
        """``[cells, prompts]`` metric values with each of ``cells`` (segment position
        indices) of ``layer`` patched, all in one batch."""
        B = self.positions.shape[0]
        vals = _run_cells(
            self.runner, self.variants, self.metric, self.hook_site, layer, self.positions,
            src, cells, torch.arange(B), self.shared_prefix,
        )  # fmt: skip
        return vals.reshape(len(cells), B).cpu()


def _sweep_layers(
    cells: _Cells, acts: Any, chosen: Sequence[int], values: Tensor, done: set[int],
    checkpoint: Any, meta: dict[str, Any], progress: bool,
) -> None:  # fmt: skip
    """Fill ``values[layer_index]`` for every layer not ``done``, recording each round in
    ``checkpoint``. Under a launcher each process sweeps a share of the layers."""
    n_cells = cells.positions.shape[1]
    rank, size = distributed.world()
    site = cells.hook_site
    bar = tqdm(
        total=len(chosen) * n_cells, disable=not progress or rank != 0, desc=f"sweep {site.site}"
    )
    bar.update(n_cells * len(done & set(range(len(chosen)))))
    todo = [li for li in range(len(chosen)) if li not in done]
    for r0 in range(0, len(todo), size):
        round_ = todo[r0 : r0 + size]  # layer li of this round runs on rank round_.index(li)
        if rank < len(round_):
            li = round_[rank]
            values[li] = cells.layer(chosen[li], acts.values[site.name(chosen[li])], bar)
        if size > 1:  # every rank gets every layer of the round
            part = torch.zeros(len(round_), *values.shape[1:])
            if rank < len(round_):
                part[rank] = values[round_[rank]]
            distributed.sum_tensor(part)
            values[round_] = part
            bar.update(n_cells * (len(round_) - 1))
        done.update(round_)
        if distributed.is_main():
            save_checkpoint(checkpoint, meta, values, done)
    bar.close()


def _baselines(
    metric: LogitMetric, source: Any, variants: list[Variant], n_prompts: int
) -> tuple[Tensor, Tensor]:
    """The clean target's and the source model's metric (NaN for an Activations source)."""
    rows = torch.arange(n_prompts)
    clean = metric_values(metric, [v.read_logits for v in variants], rows).cpu()
    src_value = torch.full_like(clean, float("nan"))
    if (source_model := as_source(source).model) is not None:
        src_logits = [_full_logits(source_model, v) for v in variants]
        src_value = metric_values(metric, src_logits, rows).cpu()
    return clean, src_value


def _full_logits(model: Any, v: Variant) -> Tensor:
    with torch.no_grad():
        logits = model(v.input_ids, attention_mask=v.attention_mask, position_ids=v.position_ids)
    return logits[:, v.read_start : v.read_start + v.n_read]


def _run_cells(
    runner: DecoderRunner,
    variants: list[Variant],
    metric: LogitMetric,
    hook_site: HookSite,
    layer: int,
    positions: Tensor,
    src: Tensor,
    cells: Sequence[int],
    prompt_rows: Tensor,
    shared_prefix: int | None,
) -> Tensor:
    """Metric for every (cell, prompt) row of a chunk of cells at one layer (cell-major);
    ``cells`` index the segment positions."""
    B = positions.shape[0]
    n = len(cells)
    name = hook_site.name(layer)
    cells = list(cells)
    src = src.expand(B, *src.shape[1:])[:, cells]  # [B, n, ...]
    logits = []
    for v in variants:
        if shared_prefix is None:
            hidden = _patched_window(runner, v, hook_site, name, layer, positions[:, cells], src)
        else:
            hidden = _patched_prefix_then_rest(
                runner,
                v,
                hook_site,
                name,
                layer,
                positions[0, cells],
                src[0],
                shared_prefix,
                B,
            )
        logits.append(runner.logits(hidden))
    return metric_values(metric, logits, prompt_rows.repeat(n))


def _patched_window(runner, v, hook_site, name, layer, cell_pos, src) -> Tensor:
    """Every (cell, prompt) row runs positions from the chunk's first patched one."""
    B, n = cell_pos.shape
    rows_pos = rearrange(cell_pos, "b n -> (n b)")  # cell-major
    rows_src = rearrange(src, "b n ... -> (n b) ...")
    start = min(int(rows_pos.min()), v.read_start)
    T = v.input_ids.shape[1]
    past = runner.past(
        [
            (
                repeat(k[:, :, :start], "b h p d -> (n b) h p d", n=n),
                repeat(val[:, :, :start], "b h p d -> (n b) h p d", n=n),
            )
            for k, val in cache_layers(v.cache)
        ],
        n * B,
    )
    hidden = repeat(v.resid[layer][:, start:], "b p d -> (n b) p d", n=n)

    def write(act: Tensor, hook: Any) -> Tensor:
        return scatter(act, hook_site, (rows_pos - start)[:, None], rows_src[:, None])

    with runner.model.hooks(fwd_hooks=[(name, write)]):
        out = runner.forward(
            hidden,
            layer,
            start,
            v.attention_mask.repeat(n, 1),
            v.position_ids[:, start:T].repeat(n, 1),
            past,
        )
    return out[:, v.read_start - start : v.read_start - start + v.n_read]


def _patched_prefix_then_rest(
    runner, v, hook_site, name, layer, cell_pos, src, P: int, B: int
) -> Tensor:
    """Prompts share the prefix: patch and run it ONCE per cell (1 row), then run the
    rest of every prompt over that cell's patched prefix cache."""
    n = cell_pos.shape[0]
    start = int(cell_pos.min())
    past = runner.past(
        [(k[:1, :, :start], val[:1, :, :start]) for k, val in cache_layers(v.cache)], n
    )

    def write(act: Tensor, hook: Any) -> Tensor:
        return scatter(act, hook_site, (cell_pos - start)[:, None], src[:, None])

    out = prefix_once_then_rest(runner, v, layer, start, P, n, B, past, [(name, write)])
    return out[:, v.read_start - P : v.read_start - P + v.n_read]


def prefix_once_then_rest(
    runner: DecoderRunner,
    v: Variant,
    layer: int,
    start: int,
    P: int,
    n: int,
    B: int,
    past: Any,
    hooks: list,
) -> Tensor:
    """Run the shared prefix positions ``start..P-1`` from ``layer`` once per cell (one row
    each, under ``hooks``), then each of the ``B`` prompts' rest ``P..T-1`` over each
    cell's patched prefix cache: the final hidden states, cell-major rows
    ``[n * B, T - P, d]``. ``past`` holds the ``n`` cells' keys/values of ``0..start-1``.
    """
    if start < P:
        with runner.model.hooks(fwd_hooks=hooks):
            runner.forward(
                v.resid[layer][:1, start:P].expand(n, -1, -1),
                layer,
                start,
                v.attention_mask[:1].expand(n, -1),
                v.position_ids[:1, start:P].expand(n, -1),
                past,
            )
    prefix_kv = [  # each cell's patched prefix K/V once per prompt (cell-major rows)
        (repeat(k, "n h p d -> (n b) h p d", b=B), repeat(val, "n h p d -> (n b) h p d", b=B))
        if j >= layer
        else (k[:1], val[:1])
        for j, (k, val) in enumerate(cache_layers(past))
    ]
    T = v.input_ids.shape[1]
    return runner.forward(
        repeat(v.resid[layer][:, P:], "b p d -> (n b) p d", n=n),
        layer,
        P,
        v.attention_mask.repeat(n, 1),
        v.position_ids[:, P:T].repeat(n, 1),
        runner.past(prefix_kv, n * B),
    )


__all__ = [
    "SWEEP_SITES",
    "Variant",
    "clean_variant",
    "metric_values",
    "prefix_once_then_rest",
    "resid_cells",
    "resid_sweep",
]
