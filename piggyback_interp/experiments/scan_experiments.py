"""The four experiments of the carrier scan, and the gap they explain.

The gap between a base model and its finetuned copy is the KL divergence of their
next-token distributions, ``KL(base || finetuned)`` after the full prompt (or, on
request, any logit metric's difference, e.g. the log-prob of a target answer). Each
experiment, with its matched non-template control, measures how much of that gap a
template segment holds:

* **perturbation** (:func:`perturbation_effects`): replace ``n`` tokens of a template
  segment, or ``n`` tokens of the query (the control), in the input of both models;
  ``reduction`` = the fraction of the gap that disappears.
* **segment patching** (:func:`segment_patching`): patch the base model's keys and
  values at the whole segment (``all``), at ``n`` of its positions (``matched``), at
  ``n`` query positions (``query``, the control) and Gaussian noise of the base's norm
  at the segment (``noise``), every layer; ``recovery`` = the fraction of the gap closed.
* **layer patching** (:func:`layer_patching`): the same K/V patch one layer at a time,
  per segment and for the query.
* **residual sweep** (:func:`residual_sweep`): the base residual stream patched at one
  (layer, prefix position) at a time (:func:`~piggyback_interp.analysis.sweep.sweep`).

Base keys/values always come from the same prompt, so a patch changes only what the
finetuning changed at those tokens. :mod:`~piggyback_interp.experiments.registry` lists
them; :func:`~piggyback_interp.experiments.scan.find_carriers` runs them all.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from piggyback_interp.analysis.atp import atp_prescreen
from piggyback_interp.analysis.kv_engine import PatchEngine, run_cells
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core import distributed
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.io import resume_checkpoint, save_checkpoint
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.spans import ChatBatch, ChatSpans, batch_spans, render_prompts
from piggyback_interp.experiments.scan_config import GapMetric, ScanConfig
from piggyback_interp.interventions.activations import capture, columns_mask, segment_positions
from piggyback_interp.interventions.controls import matched_positions, noise_like
from piggyback_interp.interventions.patch import patch_prefix
from piggyback_interp.interventions.perturb import perturb_segments
from piggyback_interp.measures.metrics import (
    LogitMetric,
    NextTokenKL,
    TargetLogProb,
    metric_on_model,
    next_token_logprobs,
)

MIN_GAP = 1e-6  # a gap at most this on every prompt is no gap (identical models)
LAYERS_PER_SAVE = 8  # layer patching: layers between checkpoint saves

# --- the gap metric ---------------------------------------------------------------------


def gap_metric(base: Any, batch: ChatBatch, config: ScanConfig) -> LogitMetric:
    """The metric whose base-vs-finetuned difference is the gap, for the rows of ``batch``."""
    if config.metric is GapMetric.KL:
        return NextTokenKL(next_token_logprobs(base, batch), name="kl_to_base")
    return TargetLogProb(config.target)


def _rows(metric: LogitMetric, rows: Sequence[int]) -> LogitMetric:
    return metric.select_rows(list(rows)) if isinstance(metric, NextTokenKL) else metric


def _left(model: Any, spans: Sequence[ChatSpans]) -> ChatBatch:
    return batch_spans(chat_tokenizer(model), list(spans), align="left")


def _gap(base: Any, model: Any, batch: ChatBatch, config: ScanConfig) -> torch.Tensor:
    metric = gap_metric(base, batch, config)
    tuned = metric_on_model(model, batch, metric)
    if config.metric is GapMetric.KL:  # KL(base || base) = 0
        return tuned
    return tuned - metric_on_model(base, batch, metric)


class ZeroGapError(UserError):
    """The finetuned model behaves as the base on every prompt: there is nothing to locate."""


def check_gap(
    base: Any, model: Any, prompts: Sequence[str | ChatSpans], config: ScanConfig = ScanConfig()
) -> torch.Tensor:
    """The gap per prompt; raises :class:`ZeroGapError` when it is zero on every prompt
    (every experiment divides by it: its fractions would all be undefined)."""
    spans_list = as_spans(model, prompts)
    gap = _gap(base, model, _left(model, spans_list), config)
    largest = float(gap.abs().max())
    if largest <= MIN_GAP:
        what = (
            "KL(base || finetuned) of the next token"
            if config.metric is GapMetric.KL
            else f"the log-prob difference of {config.target!r}"
        )
        raise ZeroGapError(
            f"zero gap: the finetuned model equals the base on these prompts ({what} is "
            f"{largest:.2g} at most on all {len(spans_list)}), so there is no finetuned behaviour "
            "to locate; check that the finetuned model (--finetuned) is the finetuned one and not "
            "a copy of the base (its adapter loaded, or its merged weights), or use prompts on "
            "which the two models differ"
        )
    return gap


def _fraction(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part / whole``, NaN where the whole gap is ~0 (nothing to explain)."""
    return torch.where(whole.abs() > 1e-8, part / whole, torch.full_like(part, math.nan))


def _bar(items: Sequence[Any], progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


def as_spans(model: Any, prompts: Sequence[str | ChatSpans]) -> list[ChatSpans]:
    """Chat spans of ``prompts`` (strings are rendered with the model's chat template);
    a prompt longer than the model's context raises, naming its index."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of questions")
    return render_prompts(chat_tokenizer(model), prompts)


# --- the experiments ---------------------------------------------------------------------


def perturbation_effects(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    config: ScanConfig = ScanConfig(),
    *,
    progress: bool = False,
) -> Any:
    """Perturb each template segment and, matched in count, the query; how much gap is left?

    One row per (prompt, segment, trial): ``control_for`` (the template segment this row
    belongs to), ``segment`` (the perturbed one: the template segment or ``query``),
    ``n_tokens``, ``gap``, ``clean_gap`` and ``reduction`` = 1 - gap / clean_gap.
    """
    import pandas as pd

    spans_list = as_spans(model, prompts)
    clean = _gap(base, model, _left(model, spans_list), config)
    rows = []
    for i, spans in enumerate(_bar(spans_list, progress, "perturbation")):
        for segment in config.segments:
            trials = perturb_segments(
                model,
                spans,
                (segment, "query"),
                trials=config.trials,
                mode=config.perturb_mode,
                seed=config.seed + i,
            )
            flat = [p for name in (segment, "query") for p in trials[name]]
            perturbed = [dataclasses.replace(spans, input_ids=p.input_ids) for p in flat]
            gaps = _gap(base, model, _left(model, perturbed), config)
            reduction = 1 - _fraction(gaps, clean[i].expand_as(gaps))
            for p, gap, red in zip(flat, gaps.tolist(), reduction.tolist(), strict=True):
                rows.append(
                    {
                        "prompt": i,
                        "control_for": segment,
                        "segment": p.segment,
                        "trial": p.trial,
                        "n_tokens": p.n_tokens,
                        "gap": gap,
                        "clean_gap": clean[i].item(),
                        "reduction": red,
                    }
                )
    return pd.DataFrame(rows)


def segment_patching(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    config: ScanConfig = ScanConfig(),
    *,
    progress: bool = False,
) -> Any:
    """The base keys/values at each template segment (all layers), with matched controls.

    One row per (prompt, segment, condition): ``all`` (every position of the segment),
    ``matched`` (``n`` of its positions, ``n`` = the smaller of segment and query),
    ``query`` (``n`` query positions), ``noise`` (noise of the base's norm at the
    matched positions); ``n``, ``value``, ``clean``, ``source_value``, ``recovery``; for
    ``metric="target"`` also ``recovery_prob``, the fraction of the gap in P(target).
    """
    import pandas as pd

    spans_list = as_spans(model, prompts)
    batch = _left(model, spans_list)
    metric = gap_metric(base, batch, config)
    # each condition is one cell over all prompts (its columns differ per row), every layer
    every_layer = list(range(model.cfg.n_layers))
    engine, clean, source = _kv_engine(base, model, batch, metric, every_layer)
    rows = []
    for segment in _bar(config.segments, progress, "segment patching"):
        chosen = [
            matched_positions(spans, segment, ("query",), seed=config.seed + i)
            for i, spans in enumerate(spans_list)
        ]
        conditions = {
            "all": [list(spans.segment(segment)) for spans in spans_list],
            "matched": [c[segment] for c in chosen],
            "query": [c["query"] for c in chosen],
        }
        specs = [(columns_mask(batch, at), every_layer, None) for at in conditions.values()]
        values = run_cells(engine, specs, len(specs), by_layer=False)  # [conditions, prompts]
        for i, spans in enumerate(spans_list):
            at_i = {
                name: (values[k, i].item(), at[i])
                for k, (name, at) in enumerate(conditions.items())
            }
            noise = _noise_value(
                base, model, spans, _rows(metric, [i]), chosen[i][segment], config.seed + i
            )
            at_i["noise"] = (noise, chosen[i][segment])
            c, b = clean[i].item(), source[i].item()
            for name, (value, at) in at_i.items():
                rows.append(
                    {
                        "prompt": i,
                        "segment": segment,
                        "condition": name,
                        "n": len(at),
                        "value": value,
                        "clean": c,
                        "source_value": b,
                        "recovery": (value - c) / (b - c) if abs(b - c) > 1e-8 else math.nan,
                    }
                )
    out = pd.DataFrame(rows).sort_values("prompt", kind="stable", ignore_index=True)
    if config.metric is GapMetric.TARGET:  # the same gap in probability space: P = exp(log P)
        p, c, b = (out[k].map(math.exp) for k in ("value", "clean", "source_value"))
        gap = b - c  # NaN where there is no gap (relative to the probabilities themselves)
        out["recovery_prob"] = ((p - c) / gap).where(gap.abs() > 1e-9 * (b.abs() + c.abs()))
    return out


def layer_patching(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    config: ScanConfig = ScanConfig(),
    *,
    progress: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Any:
    """The base keys/values of one layer at a time, at each template segment and at the query.

    Other layers' keys/values of the segment stay the finetuned model's own (isolated,
    as in the paper's Eq. 1). One row per (prompt, condition, layer): ``condition``
    (``prefix``, ``postfix`` or ``query``), ``layer``, ``recovery``. ``checkpoint``: a
    file recording each finished (condition, layer); a rerun resumes from it.
    """
    import pandas as pd

    spans_list = as_spans(model, prompts)
    metric = gap_metric(base, _left(model, spans_list), config)
    layers = list(config.layers) if config.layers is not None else list(range(model.cfg.n_layers))
    conditions = (*config.segments, "query")
    # recovery[condition * len(layers) + layer index, prompt]; a cell is done for every prompt
    recovery = torch.full(
        (len(conditions) * len(layers), len(spans_list)), math.nan, dtype=torch.float64
    )
    meta = {
        "kind": "layer_patching",
        "target": model_info(model).name,
        "source": model_info(base).name,
        "prompts": [list(s.input_ids) for s in spans_list],
        "conditions": conditions,
        "layers": layers,
        "metric": metric.name,
        "config": {k: getattr(config, k) for k in ("metric", "target")},
    }
    done = resume_checkpoint(checkpoint, meta, recovery)
    if len(done) < recovery.shape[0]:
        # ONE engine for every condition and prompt (a cell's columns may differ per row)
        batch = _left(model, spans_list)
        engine, clean, source = _kv_engine(base, model, batch, metric, layers)
        whole = (source - clean)[None]
    for ci, condition in enumerate(_bar(conditions, progress, "layer patching")):
        todo = [li for li in range(len(layers)) if ci * len(layers) + li not in done]
        if not todo:
            continue
        mask = batch.segment_mask(condition)
        for chunk in [todo[c : c + LAYERS_PER_SAVE] for c in range(0, len(todo), LAYERS_PER_SAVE)]:
            # a forward per layer, every prompt on the batch axis, from that layer up
            # (stacking several layers per forward measured slower: 30.6 s vs 28.3 s)
            specs = [(mask, layers[li], None) for li in chunk]
            values = run_cells(engine, specs, 1)
            fraction = _fraction(values - clean, whole.expand_as(values))
            for row, li in enumerate(chunk):
                recovery[ci * len(layers) + li] = fraction[row].double()
            done.update(ci * len(layers) + li for li in chunk)
            if distributed.is_main():  # under a launcher, rank 0 keeps the books
                save_checkpoint(checkpoint, meta, recovery, done)
    rows = [
        {
            "prompt": i,
            "condition": condition,
            "layer": layer,
            "recovery": recovery[ci * len(layers) + li, i].item(),
        }
        for ci, condition in enumerate(conditions)
        for li, layer in enumerate(layers)
        for i in range(len(spans_list))
    ]
    return pd.DataFrame(rows)


def _kv_engine(
    base: Any, model: Any, batch: ChatBatch, metric: LogitMetric, layers: Sequence[int]
) -> tuple[PatchEngine, torch.Tensor, torch.Tensor]:
    """The K/V engine on ``batch`` with the base's keys/values of ``layers`` at every column
    loaded: one clean run and one base run for all cells. Isolated (paper Eq. 1): the
    engine pins every other layer's K/V at a cell's columns to the model's own clean values.
    Returns (engine, clean metric, base metric), each per prompt."""
    engine = PatchEngine(model, batch, metric, sites=("k", "v"))
    source = engine.load_source(base, segment_positions(batch, "all"), layers)
    return engine, engine.clean_values(), source


def _noise_value(
    base: Any, model: Any, spans: ChatSpans, metric: LogitMetric, positions: list[int], seed: int
) -> float:
    """The metric with every layer's K/V at ``positions`` replaced by noise of the base's
    norm (the random-source control, as :func:`compare_controls`' ``noise`` row)."""
    noise = noise_like(capture(base, spans, positions, site="kv"), seed=seed)
    with patch_prefix(model, noise, spans, site="kv", segment=positions):
        return metric_on_model(model, _left(model, [spans]), metric).item()


def residual_sweep(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    config: ScanConfig = ScanConfig(),
    *,
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
) -> SweepResult:
    """The base residual stream (``resid_pre``) patched at one (layer, prefix position) at a time.

    ``checkpoint``: a file recording finished layers; a rerun resumes from it (see
    :func:`~piggyback_interp.analysis.sweep.sweep`)."""
    spans_list = as_spans(model, prompts)
    metric = gap_metric(base, _left(model, spans_list), config)
    if config.resid_atp_top_k is not None:
        return atp_prescreen(
            model,
            base,
            _left(model, spans_list),
            metric,
            site="resid_pre",
            layers=config.layers,
            top_k=config.resid_atp_top_k,
        )
    aligned = batch_spans(chat_tokenizer(model), spans_list, align="prefix")
    return sweep(
        model,
        base,
        aligned,
        metric,
        site="resid_pre",
        layers=config.layers,
        segment="prefix",
        checkpoint=checkpoint,
        progress=progress,
    )


__all__ = [
    "ZeroGapError",
    "as_spans",
    "check_gap",
    "gap_metric",
    "layer_patching",
    "perturbation_effects",
    "residual_sweep",
    "segment_patching",
]
