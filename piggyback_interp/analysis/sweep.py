"""Fast layer x position patching sweeps, and the slow reference they must match.

For every cell (layer ``l``, segment position ``i``) the sweep patches the source's
activation at that one site into the target and reads a metric. The engine:

* stacks many cells on the batch axis (``cells_per_batch`` rows of cells x prompts);
* starts each patched run AT layer ``l`` from the target's cached residual stream,
  running the HF decoder layers itself (the bridge's ``start_at_layer`` still runs
  the lower blocks);
* reuses every position before the earliest patched one through the target's
  cached keys/values (causal attention: they cannot change);
* computes logits only at the positions the metric reads, and keeps metric values
  on the device until the end.

:func:`reference_sweep` is the obvious loop (one patched full forward per cell,
through :func:`patch_activations` and :func:`metric_on_model`); tests check the
engine against it and against ``transformer_lens.patching``.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import batch_spans
    >>> from piggyback_interp.measures.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"])
    >>> result = sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
    >>> result.values.shape == (2, ft.cfg.n_layers, len(batch.spans[0].prefix))
    True
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from piggyback_interp.core import distributed
from piggyback_interp.core.checks import Choice
from piggyback_interp.core.display import Summarized
from piggyback_interp.core.hf import DecoderRunner, cache_layers
from piggyback_interp.core.hooks import (
    KV_SITES,
    HookSite,
    expand_sites,
    resolve_layers,
    resolve_site,
)
from piggyback_interp.core.io import (
    atomic_write_parquet,
    atomic_write_text,
    resume_checkpoint,
    save_checkpoint,
)
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import (
    Activations,
    SegmentOrPositions,
    as_batch,
    capture,
    scatter,
    segment_positions,
)
from piggyback_interp.interventions.patch import check_tokens, isolated, patch_activations
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import (
    LogitMetric,
    continuation_inputs,
    metric_on_model,
    recovery_fraction,
)

SWEEP_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


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


# ---------------------------------------------------------------- engine


class Engine(Choice):
    """How a sweep runs its cells: ``batched`` (many cells per forward) or ``loop`` (one
    patched full forward per cell: the reference, slow)."""

    BATCHED = "batched"
    LOOP = "loop"


class SweepMethod(Choice):
    """``exact``: patch every cell; ``atp``: estimate every cell by attribution patching."""

    EXACT = "exact"
    ATP = "atp"


def sweep(
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
    method: SweepMethod | str = SweepMethod.EXACT,
    engine: Engine | str = Engine.BATCHED,
) -> SweepResult:
    """Patch ``site`` of ``source`` into ``model`` one (layer, position) cell at a time.

    Args:
        model: the target (finetuned) model.
        source: the source (base) model, or :class:`Activations` of ``site`` at
            ``segment`` for ``layers`` (e.g. from ``load_pair(..., reference=...)``).
        spans: the prompts (``batch_spans``). With ``align="prefix"`` and a prefix
            segment, the prefix is patched and run once per cell and only the rest
            of each prompt runs per prompt (faster; same values).
        metric: a :class:`~piggyback_interp.measures.metrics.LogitMetric`.
        site: ``resid_pre`` | ``resid_mid`` | ``resid_post`` | ``attn_out`` | ``mlp_out``
            run on the residual engine; ``kv`` | ``k`` | ``v`` | ``z`` (every head) on
            the batched K/V and head engine (:mod:`~piggyback_interp.analysis.kv_engine`;
            K/V cells isolated as in :func:`patch_prefix`). For whole-prefix K/V layer
            windows use :func:`kv_layer_sweep`, for single heads :func:`head_sweep` and
            :func:`kv_head_sweep`.
        layers: the layers to sweep (default all).
        segment: the positions to sweep: a segment name or explicit positions.
        cells_per_batch: how many positions share one forward (rows = this x prompts).
        checkpoint: a file to record finished layers in; a rerun with the same
            arguments resumes from it.
        progress: show a progress bar.
        method: ``"exact"`` patches every cell; ``"atp"`` estimates every cell from one
            forward and one backward (:func:`~piggyback_interp.analysis.atp.atp_sweep`;
            ``cells_per_batch``, ``checkpoint``, ``engine`` and ``progress`` do not apply).
        engine: ``"batched"`` (the engines) or ``"loop"`` (:func:`reference_sweep`, one
            full forward per cell: the oracle, slow). The K/V and head engine keeps no
            checkpoint.
    """
    engine = Engine.parse(engine, "engine")
    if SweepMethod.parse(method, "method") is SweepMethod.ATP:
        from piggyback_interp.analysis.atp import atp_sweep

        return atp_sweep(model, source, spans, metric, site=site, layers=layers, segment=segment)
    sites = expand_sites(site)
    engine_sites = set(sites) <= set(KV_SITES) or sites == ("z",)
    if engine is Engine.BATCHED and engine_sites:
        from piggyback_interp.analysis.kv_engine import engine_sweep

        if checkpoint is not None:
            warnings.warn(
                "the batched K/V and head engine keeps no checkpoint; pass engine='loop' "
                "(slower) to record finished layers",
                stacklevel=2,
            )
        return engine_sweep(
            model, source, spans, metric, site=site, layers=layers, segment=segment,
            cells_per_batch=cells_per_batch, progress=progress,
        )  # fmt: skip
    if engine is Engine.LOOP or len(sites) != 1 or sites[0] not in SWEEP_SITES:
        return _loop_sweep(
            model, source, spans, metric, site=site, layers=layers, segment=segment,
            checkpoint=checkpoint,
        )  # fmt: skip
    site_name = sites[0]
    batch = as_batch(model, spans)
    chosen = resolve_layers(model, layers)
    hook_site = resolve_site(model, site_name)
    positions = segment_positions(batch, segment)  # [B, n]
    acts = as_source(source).activations(model, batch, segment, site=site_name, layers=chosen)
    check_tokens(acts, batch, positions)
    tok = chat_tokenizer(model)
    continuations = metric.continuations(tok)
    n_reads = metric.n_read(tok)
    variants = [
        clean_variant(model, batch, c, n, chosen)
        for c, n in zip(continuations, n_reads, strict=True)
    ]
    B, n_cells = positions.shape
    # prompts that share their prefix at the same columns: patch it once per cell
    shared_prefix = (
        batch.prefix_len
        if batch.align == "prefix" and int(positions.max()) < (batch.prefix_len or 0)
        else None
    )
    meta = sweep_meta(model, source, batch, metric, site_name, chosen, positions)
    values = torch.full((len(chosen), n_cells, B), float("nan"))
    done = resume_checkpoint(checkpoint, meta, values)
    runner = DecoderRunner(model)
    prompt_rows = torch.arange(B)
    rank, size = distributed.world()  # under a launcher: each process sweeps a share of the layers
    bar = tqdm(
        total=len(chosen) * n_cells, disable=not progress or rank != 0, desc=f"sweep {site_name}"
    )
    bar.update(sum(n_cells for i in range(len(chosen)) if i in done))
    todo = [li for li in range(len(chosen)) if li not in done]
    with torch.no_grad():
        for r0 in range(0, len(todo), size):
            round_ = todo[r0 : r0 + size]  # layer li of this round runs on rank round_.index(li)
            if rank < len(round_):
                li = round_[rank]
                src = acts.values[hook_site.name(chosen[li])]  # [B or 1, n, ...]
                for c0 in range(0, n_cells, cells_per_batch):
                    cells = range(c0, min(n_cells, c0 + cells_per_batch))
                    vals = _run_cells(
                        runner,
                        variants,
                        metric,
                        hook_site,
                        chosen[li],
                        positions,
                        src,
                        cells,
                        prompt_rows,
                        shared_prefix,
                    )
                    values[li, cells.start : cells.stop] = vals.reshape(len(cells), B).cpu()
                    bar.update(len(cells))
            if size > 1:  # every rank gets every layer of the round
                part = torch.zeros(len(round_), n_cells, B)
                if rank < len(round_):
                    part[rank] = values[round_[rank]]
                distributed.sum_tensor(part)
                values[round_] = part
                bar.update(n_cells * (len(round_) - 1))
            done.update(round_)
            if distributed.is_main():
                save_checkpoint(checkpoint, meta, values, done)
    bar.close()
    clean = metric_values(metric, [v.read_logits for v in variants], prompt_rows).cpu()
    src_value = torch.full_like(clean, float("nan"))
    if (source_model := as_source(source).model) is not None:
        src_logits = [_full_logits(source_model, v) for v in variants]
        src_value = metric_values(metric, src_logits, prompt_rows).cpu()
    return sweep_result(model, batch, positions, chosen, values, clean, src_value, meta)


def _loop_sweep(
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


def loop_baselines(
    model: Any, source: Any, batch: ChatBatch, metric: LogitMetric
) -> tuple[Tensor, Tensor]:
    """The unpatched target's and the source model's metric (NaN for an Activations source)."""
    clean = metric_on_model(model, batch, metric).cpu()
    src = torch.full_like(clean, float("nan"))
    if (source_model := as_source(source).model) is not None:
        src = metric_on_model(source_model, batch, metric).cpu()
    return clean, src


def _unpadded(spans: ChatSpans, p: int) -> int:
    """A padded column of ``spans`` as a position of the unpadded prompt."""
    return p - len(spans.padding) if p >= spans.padding.stop else p


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
    cells: range,
    prompt_rows: Tensor,
    shared_prefix: int | None,
) -> Tensor:
    """Metric for every (cell, prompt) row of a chunk of cells at one layer (cell-major)."""
    B = positions.shape[0]
    n = len(cells)
    name = hook_site.name(layer)
    src = src.expand(B, *src.shape[1:])[:, cells.start : cells.stop]  # [B, n, ...]
    logits = []
    for v in variants:
        if shared_prefix is None:
            hidden = _patched_window(
                runner, v, hook_site, name, layer, positions[:, cells.start : cells.stop], src
            )
        else:
            hidden = _patched_prefix_then_rest(
                runner,
                v,
                hook_site,
                name,
                layer,
                positions[0, cells.start : cells.stop],
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
                repeat(c.keys[:, :, :start], "b h p d -> (n b) h p d", n=n),
                repeat(c.values[:, :, :start], "b h p d -> (n b) h p d", n=n),
            )
            for c in v.cache.layers
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
    # phase 1: the prefix positions start..P-1, one row per cell, patched
    past = runner.past(
        [(c.keys[:1, :, :start], c.values[:1, :, :start]) for c in v.cache.layers], n
    )
    hidden = v.resid[layer][:1, start:P].expand(n, -1, -1)

    def write(act: Tensor, hook: Any) -> Tensor:
        return scatter(act, hook_site, (cell_pos - start)[:, None], src[:, None])

    with runner.model.hooks(fwd_hooks=[(name, write)]):
        runner.forward(
            hidden,
            layer,
            start,
            v.attention_mask[:1].expand(n, -1),
            v.position_ids[:1, start:P].expand(n, -1),
            past,
        )
    # phase 2: every prompt's rest (P..T-1), each cell's rows over its patched prefix
    prefix_kv = [
        (repeat(k, "n h p d -> (n b) h p d", b=B), repeat(val, "n h p d -> (n b) h p d", b=B))
        if j >= layer
        else (k[:1], val[:1])
        for j, (k, val) in enumerate(cache_layers(past))
    ]
    past2 = runner.past(prefix_kv, n * B)
    T = v.input_ids.shape[1]
    out = runner.forward(
        repeat(v.resid[layer][:, P:], "b p d -> (n b) p d", n=n),
        layer,
        P,
        v.attention_mask.repeat(n, 1),
        v.position_ids[:, P:T].repeat(n, 1),
        past2,
    )
    return out[:, v.read_start - P : v.read_start - P + v.n_read]


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


# ---------------------------------------------------------------- reference


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


__all__ = [
    "Engine",
    "SweepMethod",
    "SweepResult",
    "Variant",
    "cell_labels",
    "clean_variant",
    "exact_cells",
    "metric_values",
    "reference_sweep",
    "sweep",
    "sweep_meta",
    "sweep_result",
    "tokens_sha256",
]
