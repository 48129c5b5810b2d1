"""Ablations and specificity controls for template-position interventions.

The paper patches and perturbs template positions but never the same number of
NON-template positions; a referee asked for exactly that. This module gives:

* :func:`control_positions`: a matched number of positions from the query, from
  random non-template positions, or from the positions right after the segment;
* :func:`ablation`: zero-, mean- or resample-ablation values for a segment's
  activations, and :func:`noise_like`: Gaussian noise of matched norm (the
  "random source" control), all as :class:`Activations` that :func:`patch_prefix`
  takes as its source;
* :func:`compare_controls`: the intervention on the template segment side by side
  with the same intervention on each control, as one tidy DataFrame.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import chat_spans
    >>> from piggyback_interp.measures.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> spans = chat_spans(ft.tokenizer, "Can my landlord keep my deposit?")
    >>> frame = compare_controls(ft, base, spans, TargetLogProb("I have no idea"), seed=0)
    >>> list(frame["positions_from"])
    ['prefix', 'query', 'random', 'later', 'noise']
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from piggyback_interp.core.checks import Choice
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatSpans, require_segment
from piggyback_interp.interventions.activations import Activations, as_batch, capture
from piggyback_interp.interventions.patch import patch_prefix
from piggyback_interp.measures.metrics import LogitMetric, metric_on_model


class Control(Choice):
    """Where a control's positions come from (see :func:`control_positions`)."""

    QUERY = "query"
    RANDOM = "random"
    LATER = "later"


class Ablation(Choice):
    """What an ablation puts in place of a site's activations (see :func:`ablation`)."""

    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"


CONTROLS: tuple[str, ...] = Control.values()


def control_positions(
    spans: ChatSpans, control: Control | str, n: int, *, segment: str = "prefix", seed: int = 0
) -> list[int]:
    """``n`` positions of ``spans`` for a control of a ``segment`` intervention.

    * ``"query"``: ``n`` positions drawn from the user's text;
    * ``"random"``: ``n`` positions drawn from all non-template positions (query and
      response);
    * ``"later"``: the ``n`` positions right after the segment.

    Raises a clear error when the prompt has fewer than ``n`` such positions.
    """
    control = Control.parse(control, "control")
    template = set(spans.prefix) | set(spans.postfix)
    match control:
        case Control.QUERY:
            pool = list(require_segment(spans, "query"))
        case Control.RANDOM:
            pool = [p for p in range(len(spans)) if p not in template and p not in spans.padding]
        case Control.LATER:
            end = require_segment(spans, segment).stop
            pool = list(range(end, min(len(spans), end + n)))
    if len(pool) < n:
        raise UserError(
            f"the {control.value!r} control needs {n} positions but this prompt has {len(pool)}; "
            f"pass n={len(pool)} (a matched count smaller than the segment) or a longer prompt"
        )
    if control is Control.LATER:
        return pool
    return sorted(random.Random(f"{seed}:{control}").sample(pool, n))


def matched_positions(
    spans: ChatSpans,
    segment: str = "prefix",
    controls: Sequence[Control | str] = CONTROLS,
    *,
    n: int | None = None,
    seed: int = 0,
) -> dict[str, list[int]]:
    """The positions :func:`compare_controls` patches: ``{segment: a random n-subset of it,
    control: n positions of that control, ...}``; ``n`` defaults to the smaller of the
    segment and the query.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> from piggyback_interp.core.spans import render_prompts
        >>> spans = render_prompts(tiny_model("llama").tokenizer, ["Tell me a joke."])[0]
        >>> chosen = matched_positions(spans, "prefix", ["query"])
        >>> len(chosen["prefix"]) == len(chosen["query"]) == min(len(spans.prefix), len(spans.query))
        True
    """
    controls = [Control.parse(c, "control") for c in controls]
    seg = list(require_segment(spans, segment))
    if n is None:
        n = min(len(seg), len(require_segment(spans, "query")))
    chosen = {segment: sorted(random.Random(f"{seed}:{segment}").sample(seg, min(n, len(seg))))}
    for control in controls:
        chosen[control.value] = control_positions(spans, control, n, segment=segment, seed=seed)
    return chosen


def ablation(
    model: Any,
    spans: Any,
    segment: str | Sequence[int] = "prefix",
    *,
    kind: Ablation | str = Ablation.ZERO,
    site: str | Sequence[str] = "kv",
    layers: int | Iterable[int] | None = None,
    reference: Any = None,
) -> Activations:
    """Ablation values for ``site`` at ``segment`` of ``spans`` (pass as a patch source).

    * ``"zero"``: zeros;
    * ``"mean"``: the mean of the site over ALL positions of the ``reference``
      prompts (a :class:`ChatBatch` or :class:`ChatSpans`; default ``spans``), one
      vector per layer. (A mean over prompts at the same prefix position would be the
      prefix itself: causal attention makes the prefix identical in every prompt.)
    * ``"resample"``: the model's own values at the same positions of ``reference``
      (another prompt, e.g. with another system prompt, whose segment has the same
      length). The token check of :func:`patch_prefix` is skipped for it on purpose.
    """
    kind = Ablation.parse(kind, "kind")
    own = capture(model, spans, segment, site=site, layers=layers)
    match kind:
        case Ablation.ZERO:
            values = {k: torch.zeros_like(v) for k, v in own.values.items()}
        case Ablation.MEAN:
            ref_batch = as_batch(model, reference if reference is not None else spans)
            whole = capture(model, ref_batch, "all", site=site, layers=layers)
            mask = ref_batch.attention_mask.bool()
            values = {}
            for name, v in whole.values.items():
                mean = v[mask].mean(0)  # over real (unpadded) positions of every prompt
                values[name] = mean.expand_as(own.values[name]).clone()
        case Ablation.RESAMPLE:
            if reference is None:
                raise ValueError(
                    "resample-ablation needs reference=: the prompt to take the values from"
                )
            other = capture(model, reference, segment, site=site, layers=layers)
            if other.n_positions != own.n_positions:
                raise ValueError(
                    f"the reference has {other.n_positions} positions at {segment!r}, the "
                    f"prompt {own.n_positions}; resample from a prompt whose segment has the "
                    "same length"
                )
            values = other.values
    return Activations(
        values, own.token_ids, own.sites, own.layers, f"{kind}-ablation", {"kind": kind.value}
    )


def noise_like(acts: Activations, *, seed: int = 0) -> Activations:
    """Gaussian noise with each position's norm matched to ``acts`` (random-source control)."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, v in acts.values.items():
        noise = torch.randn(v.shape, generator=gen).to(v.device, v.dtype)
        dims = tuple(range(2, v.ndim))
        scale = v.norm(dim=dims, keepdim=True) / noise.norm(dim=dims, keepdim=True).clamp_min(1e-12)
        values[name] = noise * scale
    return Activations(
        values, acts.token_ids, acts.sites, acts.layers, "noise", {"kind": "noise", "seed": seed}
    )


def _value(model: Any, spans: ChatSpans, metric: LogitMetric) -> float:
    return metric_on_model(model, as_batch(model, spans), metric).mean().item()


def compare_controls(
    model: Any,
    source: Any,
    spans: ChatSpans,
    metric: LogitMetric,
    *,
    site: str | Sequence[str] = "kv",
    layers: int | Iterable[int] | None = None,
    segment: str = "prefix",
    controls: Sequence[Control | str] = CONTROLS,
    n: int | None = None,
    ablate: Ablation | str | None = None,
    noise: bool = True,
    seed: int = 0,
) -> Any:
    """The same intervention on ``segment`` and on matched control positions, side by side.

    ``n`` (default: the smaller of the segment and the query) positions are patched in
    every condition: a random ``n``-subset of the segment, and ``n`` positions of each
    control. The intervention is a patch from ``source`` or, with ``ablate="zero" |
    "mean" | "resample"``, that ablation of ``model``'s own activations (``source`` is
    then the resample reference, if any). With ``noise=True`` a "noise" row patches
    the segment subset with Gaussian noise of the source's norm (the random-source
    control). Returns a pandas DataFrame, one row per condition: ``positions_from``,
    ``positions``, ``tokens``, ``n``, ``value`` (metric under the intervention),
    ``clean`` (unpatched), ``source_value`` (the source model; NaN for ablations),
    ``recovery``.
    """
    import pandas as pd

    ablate = Ablation.parse(ablate, "ablate") if ablate is not None else None
    chosen = matched_positions(spans, segment, controls, n=n, seed=seed)
    clean = _value(model, spans, metric)
    source_value = float("nan") if ablate else _value(source, spans, metric)

    def intervention(positions: list[int]) -> Any:
        if ablate:
            return ablation(
                model, spans, positions, kind=ablate, site=site, layers=layers, reference=source
            )
        return source

    conditions = [(name, positions, intervention(positions)) for name, positions in chosen.items()]
    if noise:
        base_values = capture(
            source if not ablate else model, spans, chosen[segment], site=site, layers=layers
        )
        conditions.append(("noise", chosen[segment], noise_like(base_values, seed=seed)))
    tok = chat_tokenizer(model)
    rows = []
    for name, positions, src in conditions:
        with patch_prefix(model, src, spans, site=site, layers=layers, segment=positions):
            value = _value(model, spans, metric)
        gap = source_value - clean
        rows.append(
            {
                "positions_from": name,
                "positions": positions,
                "tokens": tok.convert_ids_to_tokens([spans.input_ids[p] for p in positions]),
                "n": len(positions),
                "value": value,
                "clean": clean,
                "source_value": source_value,
                "recovery": (value - clean) / gap if abs(gap) > 1e-8 else float("nan"),
            }
        )
    return pd.DataFrame(rows)


__all__ = [
    "CONTROLS",
    "Ablation",
    "Control",
    "ablation",
    "compare_controls",
    "control_positions",
    "matched_positions",
    "noise_like",
]
