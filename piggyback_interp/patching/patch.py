"""Patches as context managers: inside, the model reads chosen activations from a source.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.spans import chat_spans
    >>> from piggyback_interp import patch_prefix
    >>> base, finetuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> spans = chat_spans(finetuned.tokenizer, "Can my landlord keep my deposit?")
    >>> with patch_prefix(finetuned, base, spans, site="kv"):
    ...     logits = finetuned(spans.ids[None])      # prefix keys/values from the base
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from piggyback_interp.hooks import KV_SITES, HookSite
from piggyback_interp.patching.activations import (
    Activations,
    Positions,
    SegmentOrPositions,
    as_batch,
    capture,
    scatter,
    segment_positions,
    site_layers,
)
from piggyback_interp.spans import ChatBatch, ChatSpans, require_segment, with_empty_query


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

    def write(name: str, values: Tensor):
        site = sites[name]

        def hook(act: Tensor, hook: Any) -> Tensor:
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
    (:func:`~piggyback_interp.spans.with_empty_query` of row 0).
    """
    require_segment(batch.spans[0], "postfix")
    return with_empty_query(batch.spans[0])


def source_activations(
    source: Any,
    batch: ChatBatch,
    segment: SegmentOrPositions,
    *,
    site: str | Sequence[str],
    layers: int | Iterable[int] | None,
) -> Activations:
    """Take ``site`` from a source model where the target will be patched.

    For the prefix, the query or explicit positions the source runs on the target
    batch itself; for the postfix it runs on the empty-query prompt
    (:func:`empty_query_batch`), as the paper does, and the values serve every row.
    """
    if segment == "postfix":
        return capture(source, empty_query_batch(batch), "postfix", site=site, layers=layers)
    return capture(source, batch, segment, site=site, layers=layers)


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
        heads: only these heads (KV heads for k/v, query heads for z).
        isolate: for key/value sites on a subset of layers (or keys or values
            alone), pin every other key/value of the segment to the target's own clean
            value, so the patch changes only what later positions read — the same as swapping those
            layers' entries in the target's prefix cache (paper Eq. 1). With
            ``isolate=False`` the segment's own later layers see the patch too.
            Equal when every layer is patched.

    Yields:
        The :class:`Activations` written.
    """
    batch = as_batch(model, spans)
    if isinstance(segment, str):
        for row in batch.spans:
            require_segment(row, segment)
    positions = segment_positions(batch, segment)
    if isinstance(source, Activations):
        acts = source.select(model, site, layers)
    else:
        acts = source_activations(source, batch, segment, site=site or "kv", layers=layers)
    check_tokens(acts, batch, positions)
    n_layers = model.cfg.n_layers
    kv_patch = any(s in KV_SITES for s in acts.sites)
    partial = set(acts.sites) != set(KV_SITES) or len(acts.layers) < n_layers
    if isolate and kv_patch and partial:
        if heads is not None:
            raise ValueError(
                "isolate=True with heads is not supported; pass isolate=False for per-head K/V patches"
            )
        # pin the segment's keys AND values at every layer to the target's clean ones,
        # then write the patch over them: only later positions see the change
        clean = capture(model, batch, segment, site=KV_SITES, layers=None)
        rows = clean.token_ids.shape[0]  # a shared (1-row) source serves every row
        values = {k: v.expand(rows, *v.shape[1:]) for k, v in acts.values.items()}
        acts = Activations(
            {**clean.values, **values},
            acts.token_ids.expand(rows, -1),
            tuple(dict.fromkeys((*acts.sites, *KV_SITES))),
            tuple(range(n_layers)),
            acts.source,
            acts.meta,
        )
    with patch_activations(model, acts, positions, heads=heads):
        yield acts
