"""Batched engine for key/value and attention-head patching cells.

A *cell* patches some heads of ``k``, ``v`` or ``z`` at some layers and some token
positions. The engine runs many cells per forward (cells x prompts on the batch
axis), like the residual engine of :mod:`~piggyback_interp.analysis.resid_engine`:

* a patched run starts AT the first patched layer from the target's cached
  residual stream (lower layers cannot change);
* every position before the first patched one is read from the target's cached
  keys/values (causal attention: they cannot change);
* prompts that share their prefix (``align="prefix"``) run a patched prefix once per
  cell, and only the rest of every prompt per (cell, prompt) row;
* logits are computed only at the positions the metric reads.

K/V cells have the isolated meaning (a) of ``docs/patching.md`` by default, the one
:func:`~piggyback_interp.interventions.patch.isolated` defines: at the patched positions
every key and value of every layer is pinned to the target's clean value, then the
chosen heads/layers get the source's, so only later positions see the change (the same
as swapping those entries in the target's cache, paper Eq. 1). The engine computes it
per cell, vectorised (the pins and swaps of :meth:`PatchEngine._hooks` and
:meth:`PatchEngine._past`); the tests check it against ``isolated`` through the
reference loops.
Values are written at the hooks (``hook_k``/``hook_k_normed``, ``hook_v``,
``hook_z``: before RoPE), as the reference loops do, so a source taken on another
prompt (the postfix's empty-query prompt) is rotated for its new place by the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

from piggyback_interp.analysis.resid_engine import (
    clean_variant,
    metric_values,
    prefix_once_then_rest,
)
from piggyback_interp.analysis.sweep_result import SweepResult, sweep_meta, sweep_result
from piggyback_interp.core.hf import DecoderRunner, cache_layers
from piggyback_interp.core.hooks import (
    KV_SITES,
    HookSite,
    expand_sites,
    n_heads_at,
    resolve_layers,
    resolve_site,
)
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import (
    Activations,
    SegmentOrPositions,
    as_batch,
    segment_positions,
)
from piggyback_interp.interventions.patch import check_tokens
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import LogitMetric


@dataclass
class Cells:
    """A chunk of ``n`` cells over a batch of ``B`` prompts of width ``T0``.

    Cell ``c`` writes the source's ``sites`` at the heads ``heads[c]``, the layers
    ``layers[c]`` and, in prompt row ``b``, the columns ``pos[c, b]``.
    """

    pos: Tensor  # [n, B, T0] bool
    layers: Tensor  # [n, n_layers] bool
    heads: Tensor  # [n, heads at the site] bool


def columns(acts: Activations, name: str, positions: Tensor, B: int, T0: int) -> Tensor:
    """``acts.values[name]`` ([rows or 1, n, ...]) placed at ``positions`` ([B, n]) of a
    zero ``[B, T0, ...]`` tensor."""
    values = acts.values[name]
    values = values.expand(B, *values.shape[1:])
    out = values.new_zeros(B, T0, *values.shape[2:])
    rows = torch.arange(B, device=values.device)[:, None]
    out[rows, positions.to(values.device)] = values
    return out


def position_mask(positions: Tensor, T0: int) -> Tensor:
    """``[B, n]`` columns -> a ``[B, T0]`` bool mask."""
    mask = torch.zeros(positions.shape[0], T0, dtype=torch.bool)
    mask[torch.arange(positions.shape[0])[:, None], positions] = True
    return mask


class PatchEngine:
    """Runs :class:`Cells` of one kind (K/V sites, or ``z``) for a fixed target and batch.

    Call :meth:`load_source` before :meth:`run`.

    Args:
        model: the target.
        batch: the prompts.
        metric: the metric (read at its continuations).
        sites: ``("k",)``, ``("v",)``, ``("k", "v")`` or ``("z",)``.
        isolate: for K/V sites, pin every other key/value of the patched positions to
            the target's clean value (meaning (a)); ``False`` lets the patched positions'
            own later layers change (meaning (b)).
    """

    def __init__(
        self,
        model: Any,
        batch: ChatBatch,
        metric: LogitMetric,
        *,
        sites: Sequence[str],
        isolate: bool = True,
    ):
        self.model = model
        self.batch = batch
        self.metric = metric
        self.sites = tuple(sites)
        self.kv = self.sites[0] in KV_SITES
        self.isolate = isolate and self.kv
        self.source: dict[tuple[str, int], Tensor] = {}
        self.source_cache: Any = None  # the source's cache on these prompts, if it ran on them
        self.runner = DecoderRunner(model)
        self.T0 = batch.input_ids.shape[1]
        self.hook_sites = {s: resolve_site(model, s) for s in (KV_SITES if self.kv else ("z",))}
        n_layers = model.cfg.n_layers
        tok = chat_tokenizer(model)
        # the clean run; with isolation it also keeps the target's own keys/values
        self.clean: dict[tuple[str, int], Tensor] = {}
        pairs = [(s, layer) for s in KV_SITES for layer in range(n_layers)] if self.isolate else []
        with model.hooks(fwd_hooks=self._keep(self.clean, pairs)):
            self.variants = [
                clean_variant(model, batch, c, n, range(n_layers))
                for c, n in zip(metric.continuations(tok), metric.n_read(tok), strict=True)
            ]
        self.shared_prefix = batch.prefix_len if batch.align == "prefix" else None

    def _keep(self, into: dict, pairs: Sequence[tuple[str, int]]) -> list:
        """Hooks that keep ``(site, layer)`` over the batch's columns into ``into``."""

        def keep(key: tuple[str, int], hs: HookSite):
            def hook(act: Tensor, hook: Any) -> Tensor:
                into[key] = act.detach().movedim(hs.pos_dim, 1)[:, : self.T0]
                return act

            return hook

        sites = {s: resolve_site(self.model, s) for s, _ in pairs}
        return [(sites[s].name(layer), keep((s, layer), sites[s])) for s, layer in pairs]

    def load_source(
        self,
        source: Any,
        positions: Tensor,
        layers: Sequence[int],
        acts: Activations | None = None,
    ) -> Tensor:
        """Take the source's values to patch; return its metric per prompt.

        ``acts``: values taken elsewhere (the postfix of the empty-query prompt), placed
        at ``positions``; an :class:`Activations` source is used the same way. Else the
        source runs on the same prompts, once, keeping its values while its metric is read.
        """
        src = as_source(source)
        if acts is None and src.model is None:  # fixed values: batch and segment do not apply
            acts = src.activations(self.model, self.batch, None, site=self.sites, layers=layers)
        if acts is not None:
            check_tokens(acts, self.batch, positions)
            B = len(self.batch)
            self.source = {
                (s, layer): columns(acts, self.hook_sites[s].name(layer), positions, B, self.T0)
                for s in self.sites
                for layer in layers
            }
            return self.source_values(source)
        pairs = [(s, layer) for s in self.sites for layer in layers]
        with src.model.hooks(fwd_hooks=self._keep(self.source, pairs)):
            return self.source_values(source, keep_cache=True)

    def clean_values(self) -> Tensor:
        """The unpatched target's metric per prompt."""
        rows = torch.arange(len(self.batch))
        return metric_values(self.metric, [v.read_logits for v in self.variants], rows).cpu()

    def source_values(self, source: Any, keep_cache: bool = False) -> Tensor:
        """The source model's metric per prompt (NaN for an :class:`Activations` source);
        ``keep_cache`` keeps its keys/values (post-RoPE) on these prompts."""
        source = as_source(source).model
        if source is None:
            return torch.full((len(self.batch),), float("nan"))
        logits = []
        with torch.no_grad():
            for v in self.variants:
                out, cache = source(
                    v.input_ids,
                    attention_mask=v.attention_mask,
                    position_ids=v.position_ids,
                    return_type="logits_and_cache",
                )
                logits.append(out[:, v.read_start : v.read_start + v.n_read])
                if keep_cache and self.source_cache is None:
                    self.source_cache = cache
        return metric_values(self.metric, logits, torch.arange(len(self.batch))).cpu()

    def run(self, cells: Cells) -> Tensor:
        """The metric of every (cell, prompt) row, cell-major: ``[n * B]``."""
        n, B, _ = cells.pos.shape
        device = self.model.cfg.device
        cells = Cells(cells.pos.to(device), cells.layers.to(device), cells.heads.to(device))
        patched = cells.pos.any(0).any(0).nonzero()
        if not len(patched):
            raise ValueError("a cell patches no position")
        first = int(patched[0])
        last = int(patched[-1])
        start_layer = int(cells.layers.any(0).nonzero()[0])
        same_rows = bool((cells.pos == cells.pos[:, :1]).all())
        shared = (
            self.shared_prefix
            if self.shared_prefix is not None and last < self.shared_prefix and same_rows
            else None
        )
        logits = []
        for v in self.variants:
            start = min(first, v.read_start)
            if self.isolate and self.source_cache is not None:
                # positions pinned in every row at every layer need no run: their
                # keys/values come from the caches (the target's, the source's swapped in)
                pinned = cells.pos.all(0).all(0)
                while start < v.read_start and pinned[start]:
                    start += 1
            if shared is None:
                hidden = self._window(v, cells, start_layer, start, v.input_ids.shape[1], B, n)
            else:
                hidden = self._prefix_then_rest(v, cells, start_layer, start, shared, B, n)
            read = v.read_start - (start if shared is None else shared)
            logits.append(self.runner.logits(hidden[:, read : read + v.n_read]))
        return metric_values(self.metric, logits, torch.arange(B).repeat(n))

    # ------------------------------------------------------------ internals

    def _past(self, v: Any, cells: Cells, b: int, start: int) -> list[tuple[Tensor, Tensor]]:
        """The cache of positions ``0..start-1`` for ``n * b`` rows: the target's, with the
        source's entries where a cell swaps them (only pinned positions lie before
        ``start`` when it passed the first patched one)."""
        n = cells.pos.shape[0]
        out = []
        source_kv = cache_layers(self.source_cache) if self.source_cache is not None else None
        for j, own_kv in enumerate(cache_layers(v.cache)):
            pair = []
            theirs_kv = source_kv[j] if source_kv is not None else (None, None)
            for s, own, theirs in zip(("k", "v"), own_kv, theirs_kv, strict=True):
                own = own[:b, :, :start]
                swap = None
                if s in self.sites and theirs is not None:
                    swap = (
                        cells.pos[:, :b, None, :start, None]
                        & cells.layers[:, j, None, None, None, None]
                        & cells.heads[:, None, :, None, None]
                    )
                if swap is not None and bool(swap.any()):
                    src = theirs[:b, :, :start]
                    swapped = torch.where(swap, src[None], own[None])
                    pair.append(rearrange(swapped, "n b h p d -> (n b) h p d"))
                else:
                    pair.append(repeat(own, "b h p d -> (n b) h p d", n=n))
            out.append(tuple(pair))
        return out

    def _window(self, v, cells: Cells, start_layer: int, start: int, end: int, b: int, n: int):
        """Rows ``n x b`` (cell-major) over positions ``start..end-1`` from ``start_layer``."""
        past = self.runner.past(self._past(v, cells, b, start), n * b)
        with self.model.hooks(fwd_hooks=self._hooks(cells, start_layer, start, end, b)):
            return self.runner.forward(
                repeat(v.resid[start_layer][:b, start:end], "b p d -> (n b) p d", n=n),
                start_layer,
                start,
                v.attention_mask[:b].repeat(n, 1),
                v.position_ids[:b, start:end].repeat(n, 1),
                past,
            )

    def _prefix_then_rest(
        self, v, cells: Cells, start_layer: int, start: int, P: int, B: int, n: int
    ):
        """The patched prefix once per cell (one row), then every prompt's rest over it."""
        past = self.runner.past(self._past(v, cells, 1, min(start, P)), n)
        hooks = self._hooks(cells, start_layer, start, P, 1)  # [] where start >= P
        return prefix_once_then_rest(self.runner, v, start_layer, start, P, n, B, past, hooks)

    def _hooks(self, cells: Cells, start_layer: int, lo: int, hi: int, b: int) -> list:
        """Hooks that write the cells' values over columns ``lo..hi-1`` of ``n x b`` rows."""
        hi = min(hi, self.T0)  # continuation tokens are never patched
        if hi <= lo:
            return []
        n_layers = self.model.cfg.n_layers
        pos = cells.pos[:, :b, lo:hi, None, None]  # [n, b, W, 1, 1]
        hooks = []
        for s, hs in self.hook_sites.items():
            for layer in range(start_layer, n_layers):
                swap_layer = cells.layers[:, layer] & (s in self.sites)
                if not self.isolate and not bool(swap_layer.any()):
                    continue
                swap = pos & (
                    swap_layer[:, None, None, None, None] & cells.heads[:, None, None, :, None]
                )
                pin = pos if self.isolate else swap
                src = self.source.get((s, layer))
                value = (
                    self.clean[s, layer][:b, lo:hi][None]
                    if src is None
                    else torch.where(
                        swap,
                        src[:b, lo:hi][None],
                        self.clean[s, layer][:b, lo:hi][None] if self.isolate else 0.0,
                    )
                )
                hooks.append((hs.name(layer), _writer(hs, pin, value, lo, hi)))
        return hooks


def _writer(hs: HookSite, pin: Tensor, value: Tensor, lo: int, hi: int):
    """A hook writing ``value`` where ``pin`` ([n, b, W, heads or 1, 1]) holds, at
    columns ``lo..hi-1`` of a window that starts at ``lo``."""
    n, b = pin.shape[:2]

    def hook(act: Tensor, hook: Any) -> Tensor:
        moved = act.movedim(hs.pos_dim, 1)  # [n * b, W_all, heads, d]
        head = rearrange(moved[:, : hi - lo], "(n b) w ... -> n b w ...", n=n, b=b)
        new = torch.where(pin.to(act.device), value.to(act.device, act.dtype), head)
        out = torch.cat([rearrange(new, "n b w ... -> (n b) w ..."), moved[:, hi - lo :]], 1)
        return out.movedim(1, hs.pos_dim)

    return hook


def run_cells(
    engine: PatchEngine,
    specs: Sequence[tuple[Tensor, int | Sequence[int], Tensor | None]],
    cells_per_batch: int,
    bar: Any = None,
    *,
    by_layer: bool = True,
) -> Tensor:
    """The metric of every cell of ``specs`` (``[cells, prompts]``), up to
    ``cells_per_batch`` cells per forward. A spec is (``[B, T0]`` bool columns, layer(s),
    ``[heads]`` bool mask or ``None`` for every head). With ``by_layer`` a forward
    holds cells of one first layer only (a run starts at its lowest first layer), in
    chunks of balanced size."""
    n_layers = engine.model.cfg.n_layers
    n_heads = n_heads_at(engine.model, engine.hook_sites[engine.sites[0]])
    out = []
    for chunk in _chunks(specs, cells_per_batch, by_layer):
        layers = torch.zeros(len(chunk), n_layers, dtype=torch.bool)
        heads = torch.ones(len(chunk), n_heads, dtype=torch.bool)
        for c, (_, layer, head) in enumerate(chunk):
            layers[c, list(layer) if not isinstance(layer, int) else layer] = True
            if head is not None:
                heads[c] = head
        pos = torch.stack([p for p, _, _ in chunk])
        with torch.no_grad():
            values = engine.run(Cells(pos, layers, heads))
        out.append(rearrange(values, "(cell prompt) -> cell prompt", cell=len(chunk)).cpu())
        if bar is not None:
            bar.update(len(chunk))
    return torch.cat(out)


def _chunks(specs: Sequence, size: int, by_layer: bool) -> list[Sequence]:
    """Consecutive chunks of at most ``size`` specs, equally full (within runs of one
    first layer if ``by_layer``)."""
    groups: list[list] = []
    last = None
    for spec in specs:
        first = spec[1] if isinstance(spec[1], int) else min(spec[1])
        if not groups or (by_layer and first != last):
            groups.append([])
        groups[-1].append(spec)
        last = first
    chunks = []
    for group in groups:
        n = -(-len(group) // size)  # as few forwards as the size allows
        bounds = [round(i * len(group) / n) for i in range(n + 1)]
        chunks += [group[a:b] for a, b in itertools.pairwise(bounds)]
    return chunks


def engine_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str | Sequence[str],
    layers: Any = None,
    segment: SegmentOrPositions = "prefix",
    cells_per_batch: int = 8,
    progress: bool = True,
) -> SweepResult:
    """:func:`~piggyback_interp.analysis.sweep.sweep` for ``kv``/``k``/``v`` (isolated, as
    :func:`~piggyback_interp.analysis.reference.reference_sweep`) and ``z`` (every head)."""
    sites = expand_sites(site)
    batch = as_batch(model, spans)
    chosen = resolve_layers(model, layers)
    positions = segment_positions(batch, segment)
    engine = PatchEngine(model, batch, metric, sites=sites)
    src_value = engine.load_source(source, positions, chosen)
    B, n_pos = positions.shape
    T0 = batch.input_ids.shape[1]
    rows = torch.arange(B)
    specs = []
    for layer in chosen:
        for i in range(n_pos):
            pos = torch.zeros(B, T0, dtype=torch.bool)
            pos[rows, positions[:, i]] = True
            specs.append((pos, layer, None))
    bar = tqdm(total=len(specs), disable=not progress, desc=f"sweep {site}")
    values = run_cells(engine, specs, cells_per_batch, bar)  # [layers * positions, B]
    bar.close()
    meta = {
        **sweep_meta(model, source, batch, metric, site, chosen, positions),
        "engine": "batched",
    }
    values = rearrange(values, "(layer pos) prompt -> layer pos prompt", layer=len(chosen))
    return sweep_result(
        model, batch, positions, chosen, values, engine.clean_values(), src_value, meta
    )


def one_hot(index: int, size: int) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[index] = True
    return mask


__all__ = [
    "Cells",
    "PatchEngine",
    "columns",
    "engine_sweep",
    "one_hot",
    "position_mask",
    "run_cells",
]
