"""Attention to the chat template: how much the query and response read the prefix and postfix.

The paper's claim is that the template tokens (the ``prefix`` before the user's text,
the ``postfix`` after it) carry a finetuned behaviour onto unrelated queries. One
direct look at that: how much attention the positions that produce the answer put on
those tokens, per layer and head, and how finetuning shifts it.

For every prompt, layer, head, *from* segment (``query``, ``postfix``, ``response``)
and *to* segment (``prefix``, ``query``, ``postfix``, ``response``), the **mass** is the
mean, over the from-segment's positions, of the summed attention probability on the
to-segment's positions. Attention is causal and the segments tile the prompt up to the
end of the response, so the masses of one (prompt, layer, head, from) sum to 1. Padding
is never a segment and gets no attention, so batching changes nothing. The prefix holds
the template's BOS, which most models use as an attention sink; ``split_first=True``
reports that first token as its own to-segment ``"first"``.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> frame = template_attention(model, ["Tell me a joke.", "Hi"], response=["No.", "Hello"])
    >>> list(frame.columns)
    ['prompt', 'layer', 'head', 'from_segment', 'to_segment', 'mass', 'n_from', 'n_to']
    >>> sums = frame.groupby(["prompt", "layer", "head", "from_segment"]).mass.sum()
    >>> bool(((sums - 1).abs() < 1e-5).all())
    True

One prompt's attention, drawn with circuitsvis, is in :mod:`.attention_view`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from einops import rearrange, repeat
from jaxtyping import Float, Int
from torch import Tensor

from piggyback_interp.core.hooks import pattern_site, resolve_layers
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.pairs import ModelPair
from piggyback_interp.core.spans import ChatBatch, ChatSpans, batch_spans, chat_spans
from piggyback_interp.core.templates import Messages
from piggyback_interp.interventions.activations import forward

FROM_SEGMENTS: tuple[str, ...] = ("query", "postfix", "response")
TO_SEGMENTS: tuple[str, ...] = ("prefix", "query", "postfix", "response")
FIRST = "first"  # the prompt's first token as its own to-segment (split_first=True)
COLUMNS = ["prompt", "layer", "head", "from_segment", "to_segment", "mass", "n_from", "n_to"]
SHIFT_KEYS = ["layer", "head", "from_segment", "to_segment"]

Prompt = Messages | ChatSpans


# ---------------------------------------------------------------- masses


def template_attention(
    model: Any,
    prompts: Sequence[Prompt],
    *,
    response: Sequence[str] | None = None,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    system_prompt: str | None = "default",
    split_first: bool = False,
) -> pd.DataFrame:
    """Attention mass from query / postfix / response onto each template segment.

    Args:
        model: a :class:`TransformerBridge` (eager attention, as :func:`load_model` gives).
        prompts: user questions, message lists (the last user message is the query), or
            unpadded :class:`ChatSpans`.
        response: one assistant response per prompt, appended so ``response`` positions
            exist (then the template's own end-of-turn tokens follow it, as in training).
        layers: ``None`` for every layer, an int, or a list.
        batch_size: prompts per forward (left-padded; results do not depend on it).
        system_prompt: passed to :func:`chat_spans` (``"default"`` keeps the template's).
        split_first: make the prompt's first token (the template's BOS, e.g. the first
            ``<|im_start|>``: the usual attention sink) its own to-segment ``"first"``, and
            ``"prefix"`` the rest of the prefix. By default it is part of the prefix, as in
            :mod:`~piggyback_interp.core.spans`.

    Returns:
        One row per (prompt, layer, head, from_segment, to_segment) with columns
        ``prompt`` (index into ``prompts``), ``layer``, ``head``, ``from_segment``,
        ``to_segment``, ``mass``, ``n_from`` and ``n_to`` (positions in each segment).
        A from-segment with no positions (no response given, an empty postfix) has no
        rows; an empty to-segment has mass 0; ``response`` is absent without a response.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> frame = template_attention(tiny_model("qwen3"), ["Hi"], layers=0)
        >>> sorted(set(frame.from_segment)), len(frame)  # 2 from x 3 to x 4 heads
        (['postfix', 'query'], 24)
    """
    spans = prompt_spans(chat_tokenizer(model), prompts, response, system_prompt)
    targets = to_segments(split_first)
    return _masses_frame(model, spans, resolve_layers(model, layers), batch_size, targets)


def to_segments(split_first: bool = False) -> tuple[str, ...]:
    """The to-segments: :data:`TO_SEGMENTS`, with ``"first"`` ahead if ``split_first``."""
    return (FIRST, *TO_SEGMENTS) if split_first else TO_SEGMENTS


def segment_range(spans: ChatSpans, name: str, *, split_first: bool = False) -> range | None:
    """The positions of segment ``name`` (``None``: no response given).

    ``"first"`` is the prefix's first position; with ``split_first`` the ``"prefix"``
    starts after it.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> spans = chat_spans(tiny_tokenizer(), "Hi")
        >>> segment_range(spans, "first"), segment_range(spans, "prefix", split_first=True)
        (range(0, 1), range(1, 15))
    """
    prefix = spans.prefix
    if name == FIRST:
        return range(prefix.start, prefix.start + min(1, len(prefix)))
    if name == "prefix" and split_first:
        return range(min(prefix.start + 1, prefix.stop), prefix.stop)
    return spans.segment(name) if name != "response" else spans.response


def prompt_spans(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    response: Sequence[str] | None = None,
    system_prompt: str | None = "default",
) -> list[ChatSpans]:
    """The :class:`ChatSpans` of every prompt, with its response appended if given.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> (spans,) = prompt_spans(tok, ["Hi"], ["Hello"])
        >>> spans.decode(tok, "response")
        'Hello'
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of questions (wrap one in a list)")
    responses = _check_responses(response, len(prompts))
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, ChatSpans):
            if responses[i] is not None:
                raise ValueError(
                    f"prompt {i} is already rendered ChatSpans, so response= cannot be added to "
                    "it; render it with the assistant message (chat_spans(tok, messages)) instead"
                )
            out.append(prompt)
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = [dict(m) for m in messages]
        if responses[i] is not None:
            messages.append({"role": "assistant", "content": responses[i]})
        out.append(chat_spans(tokenizer, messages, system_prompt=system_prompt))
    return out


def _check_responses(response: Sequence[str] | None, n: int) -> list[str | None]:
    if response is None:
        return [None] * n
    if isinstance(response, str):
        raise ValueError("response must be a list with one response per prompt, not one string")
    if len(response) != n:
        raise ValueError(
            f"got {len(response)} responses for {n} prompts; give exactly one per prompt"
        )
    bad = [i for i, r in enumerate(response) if not isinstance(r, str)]
    if bad:
        raise ValueError(f"response(s) {bad} are not strings; give the assistant text itself")
    return list(response)


def _masses_frame(
    model: Any,
    spans: list[ChatSpans],
    layers: tuple[int, ...],
    batch_size: int,
    targets: tuple[str, ...],
) -> pd.DataFrame:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i]))  # similar lengths together
    frames = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = batch_spans(chat_tokenizer(model), [spans[i] for i in rows])
        masses = segment_masses(model, batch, layers, targets=targets)
        frames.append(_tidy(masses, batch, rows, layers, targets))
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.sort_values("prompt", kind="stable", ignore_index=True)
    frame.attrs = {"model": model_info(model).display_name, "layers": list(layers)}
    return frame


def segment_masses(
    model: Any,
    batch: ChatBatch,
    layers: int | Iterable[int] | None,
    *,
    targets: Sequence[str] = TO_SEGMENTS,
) -> Float[Tensor, "layer batch head n_from n_to"]:
    """Attention mass of every from-segment onto every to-segment, in one forward.

    Axes follow ``layers`` (sorted), :data:`FROM_SEGMENTS` and ``targets``
    (:func:`to_segments`); a row's empty from-segment gives zeros. ``batch`` may be padded
    (its ``attention_mask`` and ``position_ids`` are used).

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> batch = batch_spans(model.chat_tokenizer, ["Hi", "Tell me a joke."])
        >>> segment_masses(model, batch, [0, 1]).shape
        torch.Size([2, 2, 4, 3, 4])
    """
    site = pattern_site(model)
    layers = resolve_layers(model, layers)
    from_w = _segment_weights(batch, FROM_SEGMENTS, normalise=True)
    to_mask = _segment_weights(batch, tuple(targets), normalise=False)
    out: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(pattern: Tensor, hook: Any) -> Tensor:
            probs = pattern.detach().to(torch.promote_types(pattern.dtype, torch.float32))
            f, t = from_w.to(probs), to_mask.to(probs)
            out[layer] = torch.einsum("bhqk,bfq,bsk->bhfs", probs, f, t).cpu()
            return pattern

        return hook

    last = max(layers)
    stop = None if last == model.cfg.n_layers - 1 else last + 1
    with torch.no_grad(), model.hooks(fwd_hooks=[(site.name(la), keep(la)) for la in layers]):
        forward(model, batch, stop_at_layer=stop)
    return torch.stack([out[la] for la in layers])


def _segment_weights(
    batch: ChatBatch, segments: Sequence[str], *, normalise: bool
) -> Float[Tensor, "batch seg pos"]:
    """Indicator of each segment's positions per row (divided by their count if ``normalise``)."""
    weights = torch.zeros(len(batch), len(segments), batch.input_ids.shape[1])
    split = FIRST in segments
    for row, spans in enumerate(batch.spans):
        for s, name in enumerate(segments):
            span = segment_range(spans, name, split_first=split) or range(0)
            if len(span):
                weights[row, s, span.start : span.stop] = 1 / len(span) if normalise else 1.0
    return weights


def _segment_sizes(spans: ChatSpans, segments: Sequence[str]) -> tuple[Int[Tensor, " seg"], Tensor]:
    """Positions per segment, and whether the segment exists (``response`` may be None)."""
    found = [segment_range(spans, name, split_first=FIRST in segments) for name in segments]
    sizes = torch.tensor([len(s or ()) for s in found])
    present = torch.tensor([s is not None for s in found])
    return sizes, present


def _tidy(
    masses: Float[Tensor, "layer batch head n_from n_to"],
    batch: ChatBatch,
    prompts: Sequence[int],
    layers: Sequence[int],
    targets: tuple[str, ...],
) -> pd.DataFrame:
    """Long rows of one batch's masses, dropping empty from-segments and absent to-segments."""
    n_layers, n_rows, n_heads, n_from, n_to = masses.shape
    index = pd.MultiIndex.from_product(
        [list(prompts), list(layers), range(n_heads), FROM_SEGMENTS, targets],
        names=COLUMNS[:5],
    )
    frame = index.to_frame(index=False)
    frame["mass"] = rearrange(masses, "layer row head f t -> (row layer head f t)").double().numpy()
    size_from, size_to, keep_from, keep_to = [], [], [], []
    for spans in batch.spans:
        n_f, _ = _segment_sizes(spans, FROM_SEGMENTS)
        n_t, present_t = _segment_sizes(spans, targets)
        size_from.append(n_f[:, None].expand(n_from, n_to))
        size_to.append(n_t[None, :].expand(n_from, n_to))
        keep_from.append((n_f > 0)[:, None].expand(n_from, n_to))
        keep_to.append(present_t[None, :].expand(n_from, n_to))

    def per_row(cells: list[Tensor]) -> Tensor:
        return repeat(
            torch.stack(cells),
            "row f t -> (row layer head f t)",
            row=n_rows,
            layer=n_layers,
            head=n_heads,
        )

    frame["n_from"] = per_row(size_from).numpy()
    frame["n_to"] = per_row(size_to).numpy()
    keep = (per_row(keep_from) & per_row(keep_to)).numpy()
    return frame[keep].reset_index(drop=True)


# ---------------------------------------------------------------- base vs finetuned


def compare_template_attention(
    models: Mapping[str, Any] | ModelPair,
    prompts: Sequence[Prompt],
    *,
    response: Sequence[str] | None = None,
    layers: int | Iterable[int] | None = None,
    batch_size: int = 8,
    system_prompt: str | None = "default",
    split_first: bool = False,
) -> pd.DataFrame:
    """:func:`template_attention` of several models on the same prompts, with a ``model`` column.

    Arguments after ``prompts`` are :func:`template_attention`'s. A :class:`ModelPair` gives
    the models ``"base"`` and ``"finetuned"``. Every model must
    turn every prompt into the same tokens (same tokenizer and chat template; :func:`load_pair`
    checks this), so the rows line up for :func:`attention_shift`.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> models = {"base": tiny_model("llama", seed=0), "finetuned": tiny_model("llama", seed=1)}
        >>> frame = compare_template_attention(models, ["Hi", "Tell me a joke."])
        >>> sorted(set(frame.model)), list(frame.columns)[:2]
        (['base', 'finetuned'], ['model', 'prompt'])
    """
    named = _named_models(models)
    spans = {
        name: prompt_spans(chat_tokenizer(m), prompts, response, system_prompt)
        for name, m in named.items()
    }
    _check_same_tokens(spans)
    frames = []
    for name, model in named.items():
        chosen = resolve_layers(model, layers)
        frame = _masses_frame(model, spans[name], chosen, batch_size, to_segments(split_first))
        frames.append(frame.assign(model=name)[["model", *COLUMNS]])
    out = pd.concat(frames, ignore_index=True)
    out.attrs = {"models": {name: model_info(m).display_name for name, m in named.items()}}
    return out


def _named_models(models: Mapping[str, Any] | ModelPair) -> dict[str, Any]:
    if isinstance(models, ModelPair):
        return {"base": models.base, "finetuned": models.finetuned}
    if not isinstance(models, Mapping) or not models:
        raise ValueError(
            "models must be a non-empty mapping of name -> model (e.g. {'base': base, "
            "'finetuned': ft}) or a ModelPair"
        )
    return dict(models)


def _check_same_tokens(spans: Mapping[str, list[ChatSpans]]) -> None:
    (first, reference), *others = spans.items()
    for name, rows in others:
        for i, (a, b) in enumerate(zip(reference, rows, strict=True)):
            if a.input_ids != b.input_ids or a.labels() != b.labels():
                raise ValueError(
                    f"models {first!r} and {name!r} turn prompt {i} into different tokens or "
                    "segments; compare models that share a tokenizer and chat template (as "
                    "load_pair checks), or run template_attention on each model separately"
                )


def attention_shift(
    frame: pd.DataFrame, *, base: str = "base", finetuned: str = "finetuned"
) -> pd.DataFrame:
    """Mean mass over prompts per (layer, head, from, to) for two models, and their difference.

    Columns: ``layer``, ``head``, ``from_segment``, ``to_segment``, ``base_mass``,
    ``finetuned_mass``, ``delta`` (``finetuned_mass - base_mass``) and ``n_prompts`` (a
    column named ``shift`` would hide behind ``DataFrame.shift``).

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> models = {"base": tiny_model("llama", seed=0), "finetuned": tiny_model("llama", seed=1)}
        >>> shift = attention_shift(compare_template_attention(models, ["Hi"]))
        >>> row = shift.iloc[0]
        >>> bool(abs(row.delta - (row.finetuned_mass - row.base_mass)) < 1e-12)
        True
    """
    if "model" not in frame.columns:
        raise ValueError("the frame has no 'model' column; make it with compare_template_attention")
    names = list(dict.fromkeys(frame["model"]))
    missing = [n for n in (base, finetuned) if n not in names]
    if missing:
        raise ValueError(
            f"model(s) {missing} are not in the frame (it has {names}); pass base= and "
            "finetuned= with names from its 'model' column"
        )
    parts = [frame[frame["model"] == name] for name in (base, finetuned)]
    if set(parts[0]["prompt"]) != set(parts[1]["prompt"]):
        raise ValueError(f"{base!r} and {finetuned!r} were run on different prompts; use the same")
    means = [p.groupby(SHIFT_KEYS, sort=False)["mass"].agg(["mean", "count"]) for p in parts]
    if not means[0].index.equals(means[1].index):
        raise ValueError(
            f"{base!r} and {finetuned!r} cover different (layer, head, segment) cells; compare "
            "models of the same architecture on the same layers"
        )
    out = means[0].index.to_frame(index=False)
    out["base_mass"] = means[0]["mean"].to_numpy()
    out["finetuned_mass"] = means[1]["mean"].to_numpy()
    out["delta"] = out["finetuned_mass"] - out["base_mass"]
    out["n_prompts"] = means[0]["count"].to_numpy()
    return out
