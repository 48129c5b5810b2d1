"""Patches as context managers: inside, the model reads chosen activations from a source.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import chat_spans
    >>> from piggyback_interp import patch_prefix
    >>> base, finetuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> spans = chat_spans(finetuned.tokenizer, "Can my landlord keep my deposit?")
    >>> with patch_prefix(finetuned, base, spans, site="kv"):
    ...     logits = finetuned(spans.ids[None])      # prefix keys/values from the base
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.core.hooks import KV_SITES, HookSite
from piggyback_interp.core.spans import ChatBatch, ChatSpans, require_segment, with_empty_query
from piggyback_interp.interventions.activations import (
    Activations,
    Positions,
    SegmentOrPositions,
    SiteValues,
    as_batch,
    capture,
    scatter,
    segment_positions,
    site_layers,
)
from piggyback_interp.interventions.sources import as_source


def _sites_by_name(model: Any, acts: Activations) -> dict[str, HookSite]:
    return {hs.name(layer): hs for hs, layer in site_layers(model, acts.sites, acts.layers)}


@contextlib.contextmanager
def patch_activations(
    model: Any, acts: Activations, positions: Positions, *, heads: Sequence[int] | None = None
) -> Iterator[Activations]:
    """Inside the block, every forward of ``model`` has ``acts`` written at ``positions``.

    ``positions`` is ``[rows, n]`` (or ``[1, n]`` shared by every row) in the padded
    coordinates of the batch that will be run. Hooks are removed on exit, also on error.
    Generation works inside the block: the prompt forward is patched and cached
    one-token decoding steps pass through (they read the patched prompt from the cache).
    """
    if positions.shape[-1] != acts.n_positions:
        raise ValueError(
            f"the source holds {acts.n_positions} positions but {positions.shape[-1]} are patched; "
            "take the source at a segment of the same length"
        )
    sites = _sites_by_name(model, acts)
    needed = int(positions.max()) + 1

    def write(name: str, values: SiteValues):
        site = sites[name]

        def hook(act: Float[Tensor, "batch ..."], hook: Any) -> Float[Tensor, "batch ..."]:
            length = act.shape[site.pos_dim]
            if length >= needed:  # the prompt itself (or a longer full recompute)
                return scatter(act, site, positions, values, heads)
            if length == 1:  # a cached decoding step: the patched prompt is in the cache
                return act
            raise ValueError(
                f"this patch writes positions up to {needed - 1} but the forward has only "
                f"{length}; run the prompts the patch was made for inside the block"
            )

        return hook

    fwd_hooks = [(name, write(name, values)) for name, values in acts.values.items()]
    with model.hooks(fwd_hooks=fwd_hooks):
        yield acts


def check_tokens(acts: Activations, batch: ChatBatch, positions: Positions) -> None:
    """Refuse a patch whose source had other tokens at the patched positions."""
    rows = torch.arange(batch.input_ids.shape[0])[:, None]
    target = batch.input_ids[rows, positions]
    source = acts.token_ids
    if source.shape[0] == 1 and source.shape[1] == target.shape[1]:
        source = source.expand_as(target)
    if source.shape != target.shape:
        raise ValueError(
            f"the source activations have {tuple(source.shape)} (rows, positions) but the target "
            f"batch needs {tuple(target.shape)}; take them from a batch of the same prompts"
        )
    differ = (source != target).nonzero()
    if len(differ):
        row, col = differ[0].tolist()
        raise ValueError(
            f"source and target have different tokens at patched positions ({len(differ)} of "
            f"{target.numel()}; first: row {row}, position {positions[min(row, positions.shape[0] - 1), col].item()}: "
            f"source token {source[row, col].item()} vs target {target[row, col].item()}); patch positions "
            "that hold the same tokens in both prompts, e.g. the shared prefix"
        )


def empty_query_batch(batch: ChatBatch) -> ChatSpans:
    """The paper's postfix reference prompt: row 0's prefix followed by its postfix.

    This is what the chat template renders for an EMPTY user message, token for
    token the same template tokens the target holds, with no query information
    (:func:`~piggyback_interp.core.spans.with_empty_query` of row 0).
    """
    require_segment(batch.spans[0], "postfix")
    return with_empty_query(batch.spans[0])


def isolated(
    model: Any,
    acts: Activations,
    batch: ChatBatch,
    segment: SegmentOrPositions,
    *,
    heads: Sequence[int] | None = None,
    clean: Activations | Callable[[], Activations] | None = None,
) -> Activations:
    """What an isolated key/value patch writes (paper Eq. 1): ``acts`` over the target's own.

    At the patched positions every key and value of every layer is pinned to the
    target's clean value, and ``acts`` is written over them, so the patch changes
    only what LATER positions read: the same as swapping those layers' entries in the
    target's cache. This is the one definition of isolation; the batched engine
    (:class:`~piggyback_interp.analysis.kv_engine.PatchEngine`) computes the same
    meaning cell by cell, vectorised.

    Args:
        model: the target.
        acts: the source's values at ``segment`` (one row shared by every prompt, or
            one per row of ``batch``).
        batch, segment: where they are written.
        heads: only these heads of ``acts`` go over the clean values; the result then
            holds every head, so write it without ``heads``.
        clean: the target's keys and values at the segment, every layer, if taken
            already (once for many patches, or from a cached forward), or a function
            that takes them (called only when there is something to pin); by default
            :func:`~piggyback_interp.interventions.activations.capture` runs the target
            on ``batch``.

    Returns ``acts`` itself when there is nothing to pin: it holds no key/value site,
    or every key and value of every layer (and head).
    """
    kv = [s for s in acts.sites if s in KV_SITES]
    n_layers = model.cfg.n_layers
    whole = set(kv) == set(KV_SITES) and len(acts.layers) == n_layers and heads is None
    if not kv or whole:
        return acts
    if heads is not None and len(kv) < len(acts.sites):
        raise ValueError(
            f"heads with key/value and other sites ({acts.sites}) cannot be isolated "
            "together; patch the keys/values and the other sites separately"
        )
    if clean is None:
        clean = capture(model, batch, segment, site=KV_SITES, layers=None)
    elif callable(clean):
        clean = clean()
    rows = clean.token_ids.shape[0]  # a shared (1-row) source serves every row
    values = dict(clean.values)
    for name, value in acts.values.items():
        value = value.expand(rows, *value.shape[1:])
        if heads is not None:  # the chosen heads over the clean ones
            h = torch.as_tensor(list(heads), device=value.device)
            merged = values[name].to(value.device, value.dtype).clone()
            merged[:, :, h] = value[:, :, h]
            value = merged
        values[name] = value
    return Activations(
        values,
        acts.token_ids.expand(rows, -1),
        tuple(dict.fromkeys((*acts.sites, *KV_SITES))),
        tuple(range(n_layers)),
        acts.source,
        acts.meta,
    )


@contextlib.contextmanager
def patch_prefix(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    *,
    site: str | Sequence[str] | None = None,
    layers: int | Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    heads: Sequence[int] | None = None,
    isolate: bool = True,
) -> Iterator[Activations]:
    """Patch ``model`` at a segment's positions with activations from ``source``.

    Args:
        model: the model to patch (the finetuned one).
        source: a model (the base; run here on the same prompts, or on the
            empty-query prompt for the postfix) or :class:`Activations` taken before
            (e.g. by ``load_pair(..., reference=...)``).
        spans: the prompt (:class:`ChatSpans`) or prompts (:class:`ChatBatch`) that
            will be run inside the block.
        site: ``"kv"`` (the paper's Eq. 1; the default for a model source),
            ``"k"``, ``"v"``, ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``,
            ``"attn_out"``, ``"mlp_out"``, ``"z"`` (per-head attention output) or a
            list of them. For an :class:`Activations` source, ``None`` uses all of
            its sites and a value selects among them.
        layers: ``None`` (all; for an :class:`Activations` source, all of its
            layers), an int, or an iterable (a list, a ``range`` window).
        segment: ``"prefix"``, ``"postfix"``, ``"query"``, or explicit positions
            of the unpadded prompt.
        heads: only these heads (KV heads for k/v, query heads for z); isolated, the
            other heads of the segment's keys/values keep the target's clean values.
        isolate: for key/value sites on a subset of layers (or heads, or keys or
            values alone), pin every other key/value of the segment to the target's
            own clean value (:func:`isolated`), so the patch changes only what later
            positions read — the same as swapping those entries in the target's prefix
            cache (paper Eq. 1). With ``isolate=False`` the segment's own later layers
            see the patch too. Equal when every layer is patched.

    Yields:
        The :class:`Activations` written.
    """
    batch = as_batch(model, spans)
    if isinstance(segment, str):
        for row in batch.spans:
            require_segment(row, segment)
    positions = segment_positions(batch, segment)
    acts = as_source(source).activations(
        model, batch, segment, site=site, layers=layers, postfix_reference=True
    )
    check_tokens(acts, batch, positions)
    if isolate and any(s in KV_SITES for s in acts.sites):
        acts, heads = isolated(model, acts, batch, segment, heads=heads), None
    with patch_activations(model, acts, positions, heads=heads):
        yield acts
