"""Graded measures and carrier shares of a trained target answer.

Greedy rates saturate: a model that puts 0.6 or 0.999 on the trained answer abstains
either way. These measures do not:

* :func:`graded_measures`: per prompt, the teacher-forced ``log P(target | prompt)``,
  ``P(target)``, its log-odds ``log P - log(1 - P)``, and the next-token
  ``KL(base || finetuned)`` at the first response position.
* :func:`carrier_values` / :func:`carrier_shares`: the share of the base-finetuned gap
  in ``log P(target)`` and in ``P(target)`` closed by the base model's keys/values
  (every layer) at the prefix, the postfix, or both ("template"), each beside a
  matched-count control: as many query positions patched from the base run on the
  same prompt, and as many positions of the segment itself. Template K/V come from the
  base model run on the EMPTY-query prompt (paper, Table 11), so no query information
  enters; by causality its prefix K/V equal those of the prompt itself.
* :func:`generating_position` / :func:`generating_shares`: the base residual stream
  (``resid_pre``) patched, one layer at a time, at the last postfix position (where the
  first answer token is decided), beside one query position as the control.

A share is ``(mean patched - mean finetuned) / (mean base - mean finetuned)`` over
prompts: 1 = the patch brings the base model's value back, 0 = nothing changes.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> frame = carrier_values(base, tuned, ["Hi there, how are you?"], "I have no idea")
    >>> sorted(frame["segment"].unique())
    ['-', 'postfix', 'prefix', 'template']
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatSpans, batch_spans, chat_spans, empty_query_spans
from piggyback_interp.interventions import Activations, capture
from piggyback_interp.measures.metrics import TargetLogProb, metric_on_model

CARRIER_SEGMENTS = ("prefix", "postfix", "template")
CONDITIONS = ("all", "matched", "query")


def as_spans(model: Any, prompts: Sequence[str | ChatSpans]) -> list[ChatSpans]:
    """Prompts as chat spans with the default system prompt (spans pass through)."""
    tok = chat_tokenizer(model)
    return [p if isinstance(p, ChatSpans) else chat_spans(tok, p) for p in prompts]


def log_odds(logp: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """``log p - log(1 - p)`` from ``log p`` (stable for p near 0 and near 1)."""
    logp = logp.double().clamp(max=-1e-12)
    return logp - torch.log(-torch.expm1(logp))


def _one(model: Any, spans: ChatSpans) -> Any:
    return batch_spans(chat_tokenizer(model), [spans], align="left")


def _logp(model: Any, spans: ChatSpans, metric: TargetLogProb) -> float:
    return float(metric_on_model(model, _one(model, spans), metric).item())


class _TargetAndNext(TargetLogProb):
    """``TargetLogProb`` that also keeps the next-token log-probs after the prompt (the first
    position it reads), so one forward gives both."""

    next: Tensor | None = None

    def __call__(self, logits: Sequence[Tensor]) -> Tensor:
        self.next = logits[0][:, 0].double().log_softmax(-1)
        return super().__call__(logits)


def _logp_and_next(
    model: Any, spans: Sequence[ChatSpans], target: str, batch_size: int
) -> tuple[Float[Tensor, " n"], Float[Tensor, "n vocab"]]:
    tok = chat_tokenizer(model)
    metric = _TargetAndNext(target)
    logps, nexts = [], []
    for i in range(0, len(spans), batch_size):
        batch = batch_spans(tok, list(spans[i : i + batch_size]), align="left")
        logps.append(metric_on_model(model, batch, metric).double())
        nexts.append(metric.next)
    return torch.cat(logps), torch.cat(nexts)


def graded_measures(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    target: str,
    *,
    batch_size: int = 32,
    reference: BaseRuns | None = None,
) -> Any:
    """Per prompt: ``logp``, ``p``, ``log_odds`` of ``target`` under ``model``, and the
    next-token ``kl`` = KL(base || model) at the first response position. ``reference``:
    the base model's runs on the same prompts (:func:`base_runs`), reused across models."""
    import pandas as pd

    spans = as_spans(model, prompts)
    logp, cur = _logp_and_next(model, spans, target, batch_size)
    ref = reference.next_logprobs if reference is not None else None
    if ref is None or ref.shape[0] != len(spans):
        ref = _logp_and_next(base, spans, target, batch_size)[1]
    kl = (ref.exp() * (ref - cur)).sum(-1)
    return pd.DataFrame(
        {
            "prompt": range(len(spans)),
            "logp": logp.tolist(),
            "p": logp.exp().tolist(),
            "log_odds": log_odds(logp).tolist(),
            "kl": kl.tolist(),
        }
    )


@dataclass
class BaseRuns:
    """The base model's side of every measure on a prompt set, computed once
    (:func:`base_runs`) and reused for every finetuned model of a grid."""

    target: str
    logp: list[float]  # log P(target) per prompt
    next_logprobs: Float[Tensor, "n vocab"]
    template: Activations  # K/V of the empty-query prompt, every position and layer
    query_kv: list[Activations] = field(default_factory=list)  # per carrier prompt
    resid: list[Activations] = field(default_factory=list)  # per generating prompt


def _control_position(spans: ChatSpans, seed: int, i: int) -> int:
    return random.Random(f"{seed}:{i}").choice(list(spans.query))


def base_runs(
    base: Any,
    prompts: Sequence[str | ChatSpans],
    target: str,
    *,
    n_carrier: int | None = None,
    n_generating: int = 0,
    seed: int = 0,
    batch_size: int = 32,
) -> BaseRuns:
    """Run the base model once over ``prompts``: log P(target) and next-token log-probs for
    all, query K/V for the first ``n_carrier`` (default all), residual streams at the
    generating and control positions for the first ``n_generating``."""
    spans = as_spans(base, prompts)
    logp, nexts = _logp_and_next(base, spans, target, batch_size)
    empty = empty_query_spans(chat_tokenizer(base))
    template = capture(base, empty, list(range(len(empty))), site="kv", layers=None)
    carrier = spans if n_carrier is None else spans[:n_carrier]
    query_kv = [capture(base, s, list(s.query), site="kv", layers=None) for s in carrier]
    resid = [
        capture(base, s, [s.postfix[-1], _control_position(s, seed, i)], site="resid_pre")
        for i, s in enumerate(spans[:n_generating])
    ]
    return BaseRuns(target, logp.tolist(), nexts, template, query_kv, resid)


def _check_tokens(acts: Activations, spans: ChatSpans, positions: Sequence[int], i: int) -> None:
    if acts.token_ids[0].tolist() != [spans.input_ids[p] for p in positions]:
        raise ValueError(
            f"prompt {i}: the base activations were taken on other tokens; build the reference "
            "with base_runs(...) on the same prompts, in the same order, with the same seed"
        )


def _template_positions(spans: ChatSpans, segment: str) -> list[int]:
    if segment == "template":
        return [*spans.prefix, *spans.postfix]
    return list(spans.segment(segment))


def _row_patches(patches: Sequence[tuple[int, Activations, Sequence[int]]]) -> list[Any]:
    """Forward hooks writing, for each ``(row, acts, positions)``, the 1-row ``acts`` at
    ``positions`` of that row only: many different patches in one batched forward."""
    by_name: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    for row, acts, positions in patches:
        where = torch.as_tensor(list(positions), dtype=torch.long)
        for name, value in acts.values.items():
            by_name.setdefault(name, []).append((row, where, value[0]))

    def writer(writes: list[tuple[int, Tensor, Tensor]]) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            for row, where, value in writes:
                act[row, where.to(act.device)] = value.to(act.device, act.dtype)
            return act

        return hook

    return [(name, writer(writes)) for name, writes in by_name.items()]


def _patched_logps(
    model: Any,
    spans: ChatSpans,
    metric: TargetLogProb,
    patches: list[tuple[Activations, list[int]]],
) -> list[float]:
    """``log P(target)`` of the prompt under each patch (row 0: unpatched), one forward."""
    batch = batch_spans(chat_tokenizer(model), [spans] * (len(patches) + 1), align="left")
    hooks = _row_patches([(i + 1, acts, pos) for i, (acts, pos) in enumerate(patches)])
    return metric_on_model(model, batch, metric, fwd_hooks=hooks).tolist()


def carrier_values(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    target: str,
    *,
    segments: Sequence[str] = CARRIER_SEGMENTS,
    seed: int = 0,
    reference: BaseRuns | None = None,
) -> Any:
    """``log P(target)`` per prompt under each template K/V patch and its controls.

    Rows: ``segment="-"`` with ``condition`` ``"finetuned"`` and ``"base"`` (the two ends
    of the gap), then per segment ``"all"`` (every position of the segment), ``"matched"``
    (``n`` random positions of it) and ``"query"`` (``n`` random query positions from the
    base run on the same prompt), ``n = min(len(segment), len(query))``. Every patch
    writes keys and values at every layer; a prompt's patches run as rows of one batch.
    ``reference`` (:func:`base_runs` on the same prompts) saves the base model's runs.
    """
    import pandas as pd

    spans_list = as_spans(model, prompts)
    metric = TargetLogProb(target)
    tok = chat_tokenizer(model)
    empty = empty_query_spans(tok)
    if reference is not None and len(reference.query_kv) < len(spans_list):
        raise ValueError(
            f"reference holds base runs of {len(reference.query_kv)} carrier prompts, "
            f"fewer than the {len(spans_list)} given: base_runs(..., n_carrier={len(spans_list)})"
        )
    # the base model's template K/V: one run on the empty-query prompt serves every prompt
    template = (
        reference.template
        if reference is not None
        else capture(base, empty, list(range(len(empty))), site="kv", layers=None)
    )
    n_prefix = len(empty.prefix)
    index = {  # each segment's places in the empty-query prompt
        "prefix": list(range(n_prefix)),
        "postfix": list(range(n_prefix, len(empty))),
        "template": list(range(len(empty))),
    }
    rows: list[dict[str, Any]] = []
    for i, spans in enumerate(spans_list):
        _check_template(spans, empty, i)
        query = list(spans.query)
        own = (  # the base's K/V at the query positions, for the query controls
            reference.query_kv[i]
            if reference is not None
            else capture(base, spans, query, site="kv", layers=None)
        )
        _check_tokens(own, spans, query, i)
        rng = random.Random(f"{seed}:{i}")
        labels, patches = _patches(spans, segments, template, index, own, rng)
        clean, *patched = _patched_logps(model, spans, metric, patches)
        base_logp = reference.logp[i] if reference is not None else _logp(base, spans, metric)
        rows.append(dict(prompt=i, segment="-", condition="finetuned", n=0, logp=clean))
        rows.append(dict(prompt=i, segment="-", condition="base", n=0, logp=base_logp))
        for (segment, condition, n), value in zip(labels, patched, strict=True):
            rows.append(dict(prompt=i, segment=segment, condition=condition, n=n, logp=value))
    return pd.DataFrame(rows)


def _check_template(spans: ChatSpans, empty: ChatSpans, i: int) -> None:
    """Prompt ``i``'s template tokens must be the empty-query prompt's."""
    if tuple(spans.input_ids[p] for p in _template_positions(spans, "template")) != tuple(
        empty.input_ids
    ):
        raise ValueError(
            f"prompt {i}: its template tokens differ from the empty-query prompt's "
            "(another system prompt?); carrier shares need the default template"
        )


def _patches(
    spans: ChatSpans, segments: Sequence[str], template: Any, index: dict[str, list[int]],
    own: Any, rng: random.Random,
) -> tuple[list[tuple[str, str, int]], list[tuple[Any, list[int]]]]:  # fmt: skip
    """One prompt's ``(segment, condition, n)`` labels and ``(activations, positions)``
    patches: per segment ``all``, ``matched`` and ``query``."""
    query = list(spans.query)
    labels, patches = [], []
    for segment in segments:
        where = _template_positions(spans, segment)
        n = min(len(where), len(query))
        picks = sorted(rng.sample(range(len(where)), n))
        controls = sorted(rng.sample(range(len(query)), n))
        for condition, acts, positions in (
            ("all", template.take(index[segment]), where),
            ("matched", template.take([index[segment][j] for j in picks]),
             [where[j] for j in picks]),
            ("query", own.take(controls), [query[j] for j in controls]),
        ):  # fmt: skip
            if positions:
                labels.append((segment, condition, len(positions)))
                patches.append((acts, positions))
    return labels, patches


def _share(patched: np.ndarray, tuned: np.ndarray, base: np.ndarray) -> float:
    gap = base.mean() - tuned.mean()
    return float((patched.mean() - tuned.mean()) / gap) if abs(gap) > 1e-12 else math.nan


def _shares(frame: Any, keys: Sequence[str], n_boot: int, seed: int) -> Any:
    """Shares in log-prob and probability space per ``keys`` group, with a bootstrap
    95% interval over prompts (the same resampled prompts for every group)."""
    import pandas as pd

    ends = frame[frame["segment"] == "-"].pivot(index="prompt", columns="condition", values="logp")
    prompts = ends.index.to_numpy()
    rng = np.random.default_rng(seed)
    boots = rng.integers(0, len(prompts), size=(n_boot, len(prompts)))
    out = []
    for key, group in frame[frame["segment"] != "-"].groupby(list(keys), sort=False):
        g = group.set_index("prompt").loc[prompts]
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row["n"] = float(g["n"].mean())
        for space, f in (("logprob", lambda x: x), ("prob", np.exp)):
            patched, tuned, base = (
                f(g["logp"].to_numpy()),
                f(ends["finetuned"].to_numpy()),
                f(ends["base"].to_numpy()),
            )
            row[f"share_{space}"] = _share(patched, tuned, base)
            samples = np.array([_share(patched[b], tuned[b], base[b]) for b in boots])
            finite = samples[np.isfinite(samples)]
            row[f"share_{space}_low"], row[f"share_{space}_high"] = (
                (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
                if finite.size
                else (math.nan, math.nan)
            )
        out.append(row)
    return pd.DataFrame(out)


def carrier_shares(frame: Any, *, n_boot: int = 1000, seed: int = 0) -> Any:
    """One row per (segment, condition) of :func:`carrier_values`: the gap share closed
    in log-prob and probability space, each with a bootstrap 95% interval over prompts."""
    return _shares(frame, ("segment", "condition"), n_boot, seed)


def generating_position(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    target: str,
    *,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    reference: BaseRuns | None = None,
) -> Any:
    """``log P(target)`` with the base ``resid_pre`` patched at ONE position and layer.

    ``condition="last_postfix"``: the last postfix position, where the first answer token
    is predicted; ``"query"``: one random query position (the control). Rows as in
    :func:`carrier_values` (``segment`` holds the layer; ``"-"`` rows are the gap's ends).
    A prompt's (layer, position) cells run as rows of one batch.
    """
    import pandas as pd

    spans_list = as_spans(model, prompts)
    metric = TargetLogProb(target)
    chosen = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    rows: list[dict[str, Any]] = []
    if reference is not None and len(reference.resid) < len(spans_list):
        raise ValueError(
            f"reference holds base residuals of {len(reference.resid)} prompts, fewer than "
            f"the {len(spans_list)} given: base_runs(..., n_generating={len(spans_list)})"
        )
    for i, spans in enumerate(spans_list):
        last, control = spans.postfix[-1], _control_position(spans, seed, i)
        acts = (
            reference.resid[i].select(model, "resid_pre", chosen)
            if reference is not None
            else capture(base, spans, [last, control], site="resid_pre", layers=chosen)
        )
        _check_tokens(acts, spans, [last, control], i)
        labels, patches = [], []
        for j, condition in enumerate(("last_postfix", "query")):
            one = acts.take([j])
            for layer in chosen:
                labels.append((layer, condition))
                patches.append((one.select(model, "resid_pre", layer), [(last, control)[j]]))
        clean, *patched = _patched_logps(model, spans, metric, patches)
        base_logp = reference.logp[i] if reference is not None else _logp(base, spans, metric)
        rows.append(dict(prompt=i, segment="-", condition="finetuned", n=0, logp=clean))
        rows.append(dict(prompt=i, segment="-", condition="base", n=0, logp=base_logp))
        for (layer, condition), value in zip(labels, patched, strict=True):
            rows.append(dict(prompt=i, segment=layer, condition=condition, n=1, logp=value))
    return pd.DataFrame(rows)


def generating_shares(frame: Any, *, n_boot: int = 1000, seed: int = 0) -> Any:
    """One row per (layer, condition) of :func:`generating_position`, as :func:`carrier_shares`."""
    shares = _shares(frame, ("segment", "condition"), n_boot, seed)
    return shares.rename(columns={"segment": "layer"})


__all__ = [
    "CARRIER_SEGMENTS",
    "CONDITIONS",
    "BaseRuns",
    "base_runs",
    "carrier_shares",
    "carrier_values",
    "generating_position",
    "generating_shares",
    "graded_measures",
    "log_odds",
]
