"""Prompts that share a prefix, for :func:`~piggyback_interp.interventions.generation.generate`.

The prefix's KV cache is computed once per group, under the prefix patches (baked into
the cache); each batch then runs only the rest of its prompts over that cache, under the
patches at later positions (query, postfix, explicit positions).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from piggyback_interp.core.hf import forward_with_cache, repeat_cache
from piggyback_interp.core.hooks import KV_SITES
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import (
    ChatBatch,
    ChatSpans,
    batch_spans,
    prefix_only,
    require_segment,
)
from piggyback_interp.interventions.activations import (
    Activations,
    Positions,
    keep_hooks,
    segment_positions,
    site_layers,
)
from piggyback_interp.interventions.patch import (
    check_tokens,
    isolated,
    patch_activations,
    patch_prefix,
)
from piggyback_interp.interventions.sources import as_source

if TYPE_CHECKING:
    from piggyback_interp.interventions.generation import PatchSpec


def prefix_groups(rows: list[ChatSpans]) -> list[list[int]]:
    """Prompt indices grouped by identical prefix token ids (first appearance order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, spans in enumerate(rows):
        groups.setdefault(spans.input_ids[: spans.prefix.stop], []).append(i)
    return list(groups.values())


def _select_rows(acts: Activations, rows: Sequence[int], n_prompts: int) -> Activations:
    """Activations with one row per prompt (``n_prompts`` rows) cut to ``rows``; shared ones as is."""
    n = acts.token_ids.shape[0]
    if n == 1:
        return acts
    if n != n_prompts:
        raise ValueError(
            f"the source Activations have {n} rows; generate needs 1 (shared by every prompt) "
            f"or one per prompt ({n_prompts}), in the order of the prompts"
        )
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    values = {name: v[idx.to(v.device)] for name, v in acts.values.items()}
    return Activations(values, acts.token_ids[idx], acts.sites, acts.layers, acts.source, acts.meta)


def _check_width(acts: Activations, positions: Positions, segment: str | Sequence[int]) -> None:
    if acts.n_positions != positions.shape[-1]:
        what = segment if isinstance(segment, str) else "explicit positions"
        raise ValueError(
            f"the source Activations hold {acts.n_positions} positions but the prompts' "
            f"{what} has {positions.shape[-1]}; take them from prompts with the same template "
            "tokens there (e.g. the same system prompt)"
        )


def _in_prefix(spec: PatchSpec, n_prefix: int) -> bool:
    """Whether ``spec`` patches only prefix positions (True) or only later ones (False)."""
    if isinstance(spec.segment, str):
        return spec.segment == "prefix"
    inside = [p < n_prefix for p in spec.segment]
    if all(inside) or not any(inside):
        return all(inside)
    raise ValueError(
        f"explicit positions {list(spec.segment)} lie both in the prefix (positions "
        f"0..{n_prefix - 1}) and after it; split them into two PatchSpecs"
    )


@dataclass
class _Prepared:
    """A later-position patch ready for one batch: values and suffix-relative positions."""

    acts: Activations
    positions: Int[Tensor, "rows n"]
    heads: Sequence[int] | None


class PrefixGroup:
    """Prompts sharing one prefix: the (patched) prefix cache, built once, and their batches."""

    def __init__(
        self, model: Any, rows: list[ChatSpans], members: list[int], specs: list[PatchSpec]
    ) -> None:
        self.model, self.rows, self.members = model, rows, members
        self.n_prefix = len(rows[members[0]].prefix)
        self.n_prompts = len(rows)
        in_prefix = [_in_prefix(s, self.n_prefix) for s in specs]
        self.prefix_specs = [s for s, inside in zip(specs, in_prefix, strict=True) if inside]
        self.later_specs = [s for s, inside in zip(specs, in_prefix, strict=True) if not inside]
        if self.prefix_specs and self.n_prefix == 0:
            require_segment(rows[members[0]], "prefix")  # raises: this template has no prefix
        self._postfix_memo: dict[tuple[int, tuple[int, ...]], Activations] = {}
        self.cache = self._prefix_cache()

    # ---- the prefix, once

    def _prefix_cache(self) -> Any:
        """The prefix's KV cache (one row), computed once, under the prefix patches."""
        if self.n_prefix == 0:
            return None
        spans = prefix_only(self.rows[self.members[0]])
        batch = batch_spans(chat_tokenizer(self.model), [spans])
        # every model source runs unpatched, before any patch is installed
        sources = [self._prefix_source(spec, batch) for spec in self.prefix_specs]
        with contextlib.ExitStack() as stack:
            for spec, acts in zip(self.prefix_specs, sources, strict=True):
                stack.enter_context(
                    patch_prefix(
                        self.model,
                        acts,
                        batch,
                        segment=spec.segment,
                        heads=spec.heads,
                        isolate=spec.isolate,
                    )
                )
            _, cache = forward_with_cache(
                self.model, batch.input_ids, batch.attention_mask, batch.position_ids, None
            )
        return cache

    def _prefix_source(self, spec: PatchSpec, batch: ChatBatch) -> Activations:
        source = as_source(spec)
        if source.model is None:  # fixed values: their own sites and layers, row by row
            acts = source.activations(self.model, batch, spec.segment)
            _check_width(acts, segment_positions(batch, spec.segment), spec.segment)
            return _select_rows(acts, self.members[:1], self.n_prompts)
        return _model_values(self.model, spec, batch)

    # ---- batches

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Chunks of at most ``batch_size`` prompts, longest first; rows of a chunk have
        equally many positions under every later-position patch."""
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i in self.members:
            key = tuple(self._n_positions(spec, self.rows[i]) for spec in self.later_specs)
            shapes.setdefault(key, []).append(i)
        for members in shapes.values():
            ordered = sorted(members, key=lambda i: -len(self.rows[i]))
            for start in range(0, len(ordered), batch_size):
                yield ordered[start : start + batch_size]

    @staticmethod
    def _n_positions(spec: PatchSpec, spans: ChatSpans) -> int:
        if isinstance(spec.segment, str):
            return len(require_segment(spans, spec.segment))
        return len(spec.segment)

    # ---- the rest of the prompt, per batch

    def prompt_forward(
        self, batch: ChatBatch, rows: list[int]
    ) -> tuple[Float[Tensor, "batch vocab"], Any]:
        """Last-position logits and the full prompt cache, later-position patches applied."""
        prepared: list[_Prepared] = []
        for spec in self.later_specs:
            prepared.append(self._prepare(spec, batch, rows, prepared))
        with _patched(self.model, prepared):
            return self._suffix_forward(batch)

    def _suffix_forward(self, batch: ChatBatch) -> tuple[Float[Tensor, "batch vocab"], Any]:
        p = self.n_prefix
        return forward_with_cache(
            self.model,
            batch.input_ids[:, p:],
            batch.attention_mask,
            batch.position_ids[:, p:],
            repeat_cache(self.cache, len(batch)),
        )

    def _prepare(
        self, spec: PatchSpec, batch: ChatBatch, rows: list[int], earlier: list[_Prepared]
    ) -> _Prepared:
        positions = segment_positions(batch, spec.segment)
        acts = self._later_source(spec, batch, rows)
        _check_width(acts, positions, spec.segment)
        check_tokens(acts, batch, positions)
        heads = spec.heads
        if spec.isolate and any(s in KV_SITES for s in acts.sites):
            # the target's own keys/values there, under the earlier patches, read
            # over the prefix cache (as nested patch_prefix blocks would take them)
            def clean() -> Activations:
                with _patched(self.model, earlier):
                    return self._capture_suffix(batch, positions)

            acts = isolated(self.model, acts, batch, spec.segment, heads=heads, clean=clean)
            heads = None
        return _Prepared(acts, positions - self.n_prefix, heads)

    def _later_source(self, spec: PatchSpec, batch: ChatBatch, rows: list[int]) -> Activations:
        source = as_source(spec)
        if source.model is None:  # fixed values, row by row
            acts = source.activations(self.model, batch, spec.segment)
            return _select_rows(acts, rows, self.n_prompts)
        take = functools.partial(_model_values, self.model, spec, batch)
        if spec.segment != "postfix":
            return take()
        # the postfix reference (empty-query prompt) is the same for every batch
        reference = batch.input_ids[0, list(batch.spans[0].postfix)].tolist()
        key = (id(spec), tuple(reference))
        if key not in self._postfix_memo:
            self._postfix_memo[key] = take()
        return self._postfix_memo[key]

    def _capture_suffix(self, batch: ChatBatch, positions: Tensor) -> Activations:
        """The model's own keys and values at ``positions`` (after the prefix) in every
        layer, read over the prefix cache."""
        values: dict[str, Tensor] = {}
        pairs = site_layers(self.model, KV_SITES, None)
        with self.model.hooks(fwd_hooks=keep_hooks(pairs, positions - self.n_prefix, values)):
            self._suffix_forward(batch)
        rows = torch.arange(len(batch))[:, None]
        layers = tuple(range(self.model.cfg.n_layers))
        return Activations(values, batch.input_ids[rows, positions], KV_SITES, layers)


def _model_values(model: Any, spec: PatchSpec, batch: ChatBatch) -> Activations:
    """A model source's values for ``spec`` on ``batch`` (the postfix: the reference)."""
    return as_source(spec).activations(
        model, batch, spec.segment, site=spec.site, layers=spec.layers, postfix_reference=True
    )


@contextlib.contextmanager
def _patched(model: Any, prepared: list[_Prepared]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for p in prepared:
            stack.enter_context(patch_activations(model, p.acts, p.positions, heads=p.heads))
        yield
