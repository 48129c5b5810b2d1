"""Activations taken at chosen positions, and the batched forward every patch runs.

:class:`Activations` holds, per hook name, the values of a site at a set of token
positions (position first: ``[rows, n_pos, ...]``) together with the token ids
there, so a patch can check that source and target agree on what sits at the
patched positions. ``rows`` is 1 for values shared by every prompt (a prefix, or
the postfix of the empty-query prompt).

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import chat_spans
    >>> from piggyback_interp.interventions import capture
    >>> model = tiny_model("llama")
    >>> spans = chat_spans(model.tokenizer, "Hello there")
    >>> acts = capture(model, spans, "prefix", site="kv")
    >>> sorted(acts.values)[:2], acts.token_ids.shape[1] == len(spans.prefix)
    (['blocks.0.attn.hook_k', 'blocks.0.attn.hook_v'], True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from piggyback_interp.core.hooks import HookSite, expand_sites, resolve_layers, resolve_site
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatBatch, ChatSpans, batch_spans, require_segment

Positions = Int[Tensor, "rows n"]  # per row (or one row shared by all) of the batch
SiteValues = Float[Tensor, "rows n ..."]  # a site's values at ``n`` positions, position first
SegmentOrPositions = str | Sequence[int]


def as_batch(model: Any, spans: ChatSpans | ChatBatch) -> ChatBatch:
    """A :class:`ChatBatch` (one row for a single :class:`ChatSpans`)."""
    if isinstance(spans, ChatBatch):
        return spans
    return batch_spans(chat_tokenizer(model), [spans])


def forward(model: Any, batch: ChatBatch, **kwargs: Any) -> Any:
    """Run ``model`` on a padded batch with its attention mask and position ids."""
    device = model.cfg.device
    return model(
        batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        **kwargs,
    )


def segment_positions(batch: ChatBatch, segment: SegmentOrPositions) -> Positions:
    """Per-row positions of a segment (or of explicit positions) as a ``[rows, n]`` tensor.

    Explicit positions index the UNPADDED prompt and are shifted to each row's
    padded place. ``"all"`` is every column of the padded batch, padding included.
    Rows must have equally many positions in the segment.
    """
    if segment == "all":
        rows_n, width = batch.input_ids.shape
        return torch.arange(width).expand(rows_n, width).clone()
    if isinstance(segment, str):
        rows = batch.positions(segment)  # raises a clear error for an empty segment
    else:
        rows = [_explicit(spans, segment) for spans in batch.spans]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(
            f"the rows of this batch have different numbers of {segment!r} positions "
            f"({[len(r) for r in rows]}); patch prompts with equal-length segments together, "
            "or patch them one at a time"
        )
    return torch.tensor(rows, dtype=torch.long)


def columns_mask(batch: ChatBatch, per_row: Sequence[Sequence[int]]) -> Bool[Tensor, "batch pos"]:
    """True at each row's explicit positions (of the UNPADDED prompt, shifted to the row's
    padded place, as :func:`segment_positions`); rows may hold different counts."""
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for row, (spans, positions) in enumerate(zip(batch.spans, per_row, strict=True)):
        mask[row, _explicit(spans, list(positions))] = True
    return mask


def _explicit(spans: ChatSpans, positions: Sequence[int]) -> list[int]:
    pad = spans.padding
    n_real = len(spans) - len(pad)
    bad = [p for p in positions if not 0 <= p < n_real]
    if bad:
        raise ValueError(f"position(s) {bad} are outside the prompt (it has {n_real} tokens)")
    if not positions:
        raise ValueError("no positions given; pass a segment name or a non-empty list")
    # padding sits at the left (align="left") or after the prefix (align="prefix")
    return [p + len(pad) if p >= pad.start else p for p in positions]


def gather(
    act: Float[Tensor, "batch ..."], site: HookSite, positions: Positions
) -> Float[Tensor, "batch n ..."]:
    """``act[row, positions[row]]`` along the site's position axis -> ``[rows, n, ...]``."""
    moved = act.movedim(site.pos_dim, 1)
    rows = torch.arange(moved.shape[0], device=moved.device)[:, None]
    return moved[rows, positions.to(moved.device)]


def scatter(
    act: Float[Tensor, "batch ..."],
    site: HookSite,
    positions: Positions,
    values: Float[Tensor, "src_rows n ..."],
    heads: Sequence[int] | None = None,
) -> Float[Tensor, "batch ..."]:
    """A copy of ``act`` with ``values`` ([rows or 1, n, ...]) written at ``positions``.

    With ``heads``, only those heads are written (values still hold every head).
    """
    out = act.clone()
    moved = out.movedim(site.pos_dim, 1)  # a view: writing to it writes ``out``
    b = moved.shape[0]
    rows = torch.arange(b, device=out.device)[:, None]
    pos = positions.to(out.device).expand(b, -1)
    values = values.to(out.dtype).to(out.device).expand(b, *values.shape[1:])
    if heads is None:
        moved[rows, pos] = values
    else:
        h = torch.as_tensor(list(heads), device=out.device)
        moved[rows[..., None], pos[..., None], h] = values[:, :, h]
    return out


@dataclass
class Activations:
    """Site values at a set of positions, position-first, with the tokens found there."""

    values: dict[str, SiteValues]
    token_ids: Int[Tensor, "rows n"]
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_positions(self) -> int:
        return self.token_ids.shape[1]

    def select(
        self,
        model: Any,
        site: str | Sequence[str] | None = None,
        layers: int | Iterable[int] | None = None,
    ) -> Activations:
        """The subset at ``site`` and ``layers`` (``None``: all that are held)."""
        if site is None and layers is None:
            return self
        sites = self.sites if site is None else expand_sites(site)
        chosen = self.layers if layers is None else resolve_layers(model, layers)
        names = [hs.name(layer) for hs, layer in site_layers(model, sites, chosen)]
        missing = [name for name in names if name not in self.values]
        if missing:
            raise ValueError(
                f"these activations hold no {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                f"they hold sites {self.sites} at layers {list(self.layers)}: capture the ones to patch"
            )
        values = {name: self.values[name] for name in names}
        return Activations(values, self.token_ids, sites, chosen, self.source, self.meta)

    def take(self, index: Sequence[int]) -> Activations:
        """The values at some of its positions (``index`` into its own position axis)."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        values = {k: v[:, idx.to(v.device)] for k, v in self.values.items()}
        return Activations(
            values, self.token_ids[:, idx], self.sites, self.layers, self.source, self.meta
        )

    def to(self, device: str | torch.device) -> Activations:
        values = {k: v.to(device) for k, v in self.values.items()}
        return Activations(values, self.token_ids, self.sites, self.layers, self.source, self.meta)


def site_layers(
    model: Any, site: str | Sequence[str], layers: int | Iterable[int] | None
) -> list[tuple[HookSite, int]]:
    """Every (HookSite, layer) pair of a site spec and a layer spec."""
    chosen = resolve_layers(model, layers)
    return [(resolve_site(model, s), layer) for s in expand_sites(site) for layer in chosen]


def keep_hooks(
    pairs: Sequence[tuple[HookSite, int]], positions: Positions, into: dict[str, Tensor]
) -> list[tuple[str, Any]]:
    """Forward hooks that keep each (site, layer) of ``pairs`` at ``positions`` (of the
    forward's own columns) in ``into``, by hook name; the forward itself is unchanged."""

    def keep(hook_site: HookSite, name: str):
        def hook(act: Tensor, hook: Any) -> Tensor:
            into[name] = gather(act, hook_site, positions).detach()
            return act

        return hook

    return [(hs.name(layer), keep(hs, hs.name(layer))) for hs, layer in pairs]


def capture(
    model: Any,
    spans: ChatSpans | ChatBatch,
    segment: SegmentOrPositions = "prefix",
    *,
    site: str | Sequence[str] = "kv",
    layers: int | Iterable[int] | None = None,
) -> Activations:
    """Run ``model`` once and keep ``site`` at ``segment``'s positions in ``layers``.

    Only the blocks up to the last needed layer run (``stop_at_layer``).
    """
    batch = as_batch(model, spans)
    if isinstance(segment, str) and segment != "all":
        require_segment(batch.spans[0], segment)
    positions = segment_positions(batch, segment)
    pairs = site_layers(model, site, layers)
    values: dict[str, Tensor] = {}
    fwd_hooks = keep_hooks(pairs, positions, values)
    last = max(layer for _, layer in pairs)
    stop = None if last == model.cfg.n_layers - 1 else last + 1
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        forward(model, batch, stop_at_layer=stop)
    rows = torch.arange(batch.input_ids.shape[0])[:, None]
    token_ids = batch.input_ids[rows, positions]
    return Activations(
        values,
        token_ids,
        expand_sites(site),
        resolve_layers(model, layers),
        source=str(getattr(model.cfg, "model_name", "")),
        meta={"segment": segment if isinstance(segment, str) else list(segment)},
    )
