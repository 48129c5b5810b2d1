"""The carrier scan: which shared chat-template tokens carry a finetuned behaviour?

For a base model and a finetuned copy, on general prompts, with no judge: the gap
between them is the KL divergence of their next-token distributions,
``KL(base || finetuned)`` after the full prompt (or, on request, any logit metric's
difference, e.g. the log-prob of a target answer). Four experiments, each with its
matched non-template control, measure how much of that gap a template segment holds:

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

:func:`carrier_verdict` ranks the segments: a segment *carries* the behaviour when
patching its base keys/values closes at least ``min_recovery`` of the gap AND its
matched positions close more than the matched query positions by over two standard
errors (paired over prompts). Base keys/values always come from the same prompt, so a
patch changes only what the finetuning changed at those tokens.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> result = find_carriers(base, tuned, ["How do I boil an egg?", "Name a large city."],
    ...               ScanConfig(trials=2, resid_sweep=False), progress=False)
    >>> sorted(result.verdict.evidence["segment"])
    ['postfix', 'prefix']
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from piggyback_interp.analysis.kv_engine import PatchEngine, position_mask, run_cells
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core import distributed
from piggyback_interp.core.checks import Choice, at_least, choices
from piggyback_interp.core.display import Summarized
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.io import atomic_write_parquet, resume_checkpoint, save_checkpoint
from piggyback_interp.core.models import chat_tokenizer, model_info
from piggyback_interp.core.runs import read_json, write_json
from piggyback_interp.core.spans import ChatBatch, ChatSpans, batch_spans, render_prompts
from piggyback_interp.interventions.activations import segment_positions
from piggyback_interp.interventions.controls import compare_controls
from piggyback_interp.interventions.patch import patch_prefix
from piggyback_interp.interventions.perturb import PerturbMode, perturb_segments
from piggyback_interp.measures.metrics import (
    LogitMetric,
    NextTokenKL,
    TargetLogProb,
    metric_on_model,
    next_token_logprobs,
)

TEMPLATE_SEGMENTS = ("prefix", "postfix")


class GapMetric(Choice):
    """The gap: ``kl`` = KL(base || finetuned) of the next token; ``target`` = the difference
    in log-prob of ``ScanConfig.target``."""

    KL = "kl"
    TARGET = "target"


METRICS = GapMetric.values()
MIN_GAP = 1e-6  # a gap at most this on every prompt is no gap (identical models)
LAYERS_PER_FORWARD = 8  # layer patching: cells stacked on the batch axis per forward


@dataclass(frozen=True)
class ScanConfig:
    """What a carrier scan runs (recorded next to its results).

    Each field's docstring is also its ``piggyback scan --help`` text.
    """

    segments: tuple[str, ...] = TEMPLATE_SEGMENTS
    """the template segments tested as carriers"""
    metric: GapMetric | str = GapMetric.KL
    """the gap: kl (KL(base || finetuned) of the next token) or target (the difference in
    log-prob of target)"""
    target: str | None = None
    """the text metric=target scores (e.g. the trained answer)"""
    trials: int = 5
    """random perturbations per prompt and segment"""
    perturb_mode: PerturbMode | str = PerturbMode.NEAREST
    """nearest: each perturbed token becomes one of its nearest embedding neighbours;
    random: a uniformly random token"""
    layers: tuple[int, ...] | None = None
    """the layers of the per-layer experiments (none: all)"""
    resid_sweep: bool = True
    """run the residual-stream sweep (layer x prefix position)"""
    min_recovery: float = 0.25
    """the share of the gap a segment's base keys/values must close to carry the behaviour"""
    seed: int = 0
    """seed of the perturbations"""
    resid_atp_top_k: int | None = 64
    """rank every residual-sweep cell by attribution patching and patch only the top k
    exactly (default 64 of the 720 cells of a 30-layer model; none: every cell exactly,
    about 8x slower on the embedded model)"""

    def __post_init__(self) -> None:
        bad = [s for s in self.segments if s not in TEMPLATE_SEGMENTS]
        if bad or not self.segments:
            raise UserError(
                f"segments must be template segments among {TEMPLATE_SEGMENTS}, got {self.segments}"
            )
        choices(self, metric=GapMetric, perturb_mode=PerturbMode)
        if self.metric is GapMetric.TARGET and not self.target:
            raise UserError("metric='target' needs target='the answer text to score'")
        at_least(self, 1, "trials")
        if not 0 < self.min_recovery <= 1:
            raise UserError(f"min_recovery must be in (0, 1], got {self.min_recovery}")
        if self.resid_atp_top_k is not None and self.resid_atp_top_k < 0:
            raise UserError(f"resid_atp_top_k must be >= 0, got {self.resid_atp_top_k}")


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
    metric = gap_metric(base, _left(model, spans_list), config)
    frames = []
    for i, spans in enumerate(_bar(spans_list, progress, "segment patching")):
        m = _rows(metric, [i])
        for segment in config.segments:
            controls = compare_controls(
                model,
                base,
                spans,
                m,
                site="kv",
                segment=segment,
                controls=("query",),
                seed=config.seed + i,
            )
            controls["condition"] = controls["positions_from"].replace({segment: "matched"})
            every = list(spans.segment(segment))
            with patch_prefix(model, base, spans, site="kv", segment=every):
                value = metric_on_model(model, _left(model, [spans]), m).item()
            first = controls.iloc[0]
            gap = first["source_value"] - first["clean"]
            full = {
                "condition": "all",
                "positions": every,
                "n": len(every),
                "value": value,
                "clean": first["clean"],
                "source_value": first["source_value"],
                "recovery": (value - first["clean"]) / gap if abs(gap) > 1e-8 else math.nan,
            }
            frame = pd.concat([pd.DataFrame([full]), controls], ignore_index=True)
            frames.append(frame.assign(prompt=i, segment=segment))
    columns = ["prompt", "segment", "condition", "n", "value", "clean", "source_value", "recovery"]
    out = pd.concat(frames, ignore_index=True)[columns]
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
    for ci, condition in enumerate(_bar(conditions, progress, "layer patching")):
        todo = [li for li in range(len(layers)) if ci * len(layers) + li not in done]
        if not todo:
            continue
        # prompts patched together need equally many positions in the segment (queries differ)
        groups: dict[int, list[int]] = {}
        for i, spans in enumerate(spans_list):
            groups.setdefault(len(spans.segment(condition)), []).append(i)
        engines = []
        for members in groups.values():
            batch = _left(model, [spans_list[i] for i in members])
            # isolated (paper Eq. 1): the engine pins every other layer's K/V at the
            # segment to the model's own clean values, and runs 8 layers per forward
            engine = PatchEngine(model, batch, _rows(metric, members), sites=("k", "v"))
            positions = segment_positions(batch, condition)
            source = engine.load_source(base, positions, [layers[li] for li in todo])
            mask = position_mask(positions, batch.input_ids.shape[1])
            engines.append((members, engine, mask, engine.clean_values(), source))
        for chunk in [
            todo[c : c + LAYERS_PER_FORWARD] for c in range(0, len(todo), LAYERS_PER_FORWARD)
        ]:
            for members, engine, mask, clean, source in engines:
                specs = [(mask, layers[li], None) for li in chunk]
                values = run_cells(engine, specs, LAYERS_PER_FORWARD)  # [cells, prompts]
                fraction = _fraction(values - clean, (source - clean).expand_as(values))
                for row, li in enumerate(chunk):
                    recovery[ci * len(layers) + li, members] = fraction[row].double()
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
        from piggyback_interp.analysis.atp import atp_prescreen

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


# --- the verdict -------------------------------------------------------------------------


@dataclass
class Verdict:
    """Which template segments carry the behaviour, why, and the evidence table."""

    carriers: tuple[str, ...]
    headline: str
    detail: str
    evidence: Any  # pandas DataFrame, one row per template segment


def _mean_se(values: Any) -> tuple[float, float]:
    values = values.dropna()
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), se


def percent(x: float | None) -> str:
    """``0.834`` -> ``"83%"``; ``"n/a"`` for None or NaN."""
    return "n/a" if x is None or math.isnan(x) else f"{round(100 * x)}%"


def carrier_verdict(
    patching: Any, perturbation: Any = None, *, min_recovery: float = 0.25
) -> Verdict:
    """Rank the template segments from :func:`segment_patching` (and perturbation) results.

    A segment carries the behaviour when its whole-segment patch recovers at least
    ``min_recovery`` of the gap (mean over prompts) and its ``matched`` patch beats the
    ``query`` control by more than two standard errors of the paired difference (with
    one prompt there is no error bar, and any positive difference counts). A segment that
    beats its control but recovers less is marked ``partial``; the headline names it.
    """
    import pandas as pd

    rows = []
    for segment, group in patching.groupby("segment", sort=False):
        wide = group.pivot(index="prompt", columns="condition", values="recovery")
        full, full_se = _mean_se(wide["all"])
        matched, _ = _mean_se(wide["matched"])
        query, _ = _mean_se(wide["query"])
        noise = _mean_se(wide["noise"])[0] if "noise" in wide else math.nan
        diff, diff_se = _mean_se(wide["matched"] - wide["query"])
        specific = diff > (2 * diff_se if not math.isnan(diff_se) else 0.0)
        row = {
            "segment": segment,
            "recovery_all": full,
            "recovery_all_se": full_se,
            "recovery_matched": matched,
            "recovery_query_control": query,
            "recovery_noise": noise,
            "matched_minus_query": diff,
            "matched_minus_query_se": diff_se,
            "prompts": int(wide["all"].notna().sum()),
        }
        if perturbation is not None and len(perturbation):
            own = perturbation[perturbation["control_for"] == segment]
            row["perturb_reduction"] = _mean_se(own[own["segment"] == segment]["reduction"])[0]
            row["perturb_reduction_query"] = _mean_se(own[own["segment"] == "query"]["reduction"])[
                0
            ]
        if "recovery_prob" in group:
            prob = group.pivot(index="prompt", columns="condition", values="recovery_prob")
            row["recovery_all_prob"] = _mean_se(prob["all"])[0]
            row["recovery_query_control_prob"] = _mean_se(prob["query"])[0]
        row["carrier"] = bool(full >= min_recovery and specific)
        row["partial"] = bool(not row["carrier"] and specific and full > 0)
        rows.append(row)
    evidence = pd.DataFrame(rows)
    carriers = tuple(evidence.loc[evidence["carrier"], "segment"])
    names = {(): "Neither template segment", ("prefix",): "The prefix", ("postfix",): "The postfix"}
    subject = names.get(carriers, "Both the prefix and the postfix")
    verb = "carries" if len(carriers) <= 1 else "carry"
    headline = f"{subject} {verb} the finetuned behaviour" + ("" if carriers else " on its own")
    partial = [r for r in rows if r["partial"]]
    if partial:  # below the threshold, but beyond its query control: say so in the headline
        names_part = " and ".join(r["segment"] for r in partial)
        shares = " and ".join(percent(r["recovery_all"]) for r in partial)
        headline += (
            f"; the {names_part} {'each carry' if len(partial) > 1 else 'carries'} part of it "
            f"({shares} of the gap, beyond {'their' if len(partial) > 1 else 'its'} query "
            "control)"
        )
    details = []
    for r in rows:
        details.append(
            f"{r['segment']}: its base keys/values close {percent(r['recovery_all'])} of the gap; "
            f"{percent(r['recovery_matched'])} at matched positions vs "
            f"{percent(r['recovery_query_control'])} at as many query positions "
            f"(difference {percent(r['matched_minus_query'])} ± {percent(r['matched_minus_query_se'])} SE)"
            + (
                f"; in probability of the target {percent(r['recovery_all_prob'])} vs "
                f"{percent(r['recovery_query_control_prob'])} at query positions"
                if "recovery_all_prob" in r
                else ""
            )
            + (" → carrier" if r["carrier"] else "")
        )
    detail = (
        f"Rule: a segment carries the behaviour when its whole-segment patch closes at least "
        f"{percent(min_recovery)} of the gap and beats the matched query control by more than "
        "two standard errors. " + "; ".join(details) + "."
    )
    return Verdict(carriers, headline, detail, evidence)


# --- everything --------------------------------------------------------------------------


@dataclass(repr=False)
class ScanResult(Summarized):
    """The four experiments and the verdict of one scan.

    Printed, it shows the verdict and what was run; in Jupyter also the evidence per
    template segment.
    """

    config: ScanConfig
    perturbation: Any
    patching: Any
    layers: Any
    resid: SweepResult | None
    verdict: Verdict

    def _facts(self) -> dict[str, Any]:
        resid = (
            None
            if self.resid is None
            else "{} prompts x {} layers x {} cells".format(*self.resid.values.shape)
        )
        return {
            "carriers": list(self.verdict.carriers),
            "headline": self.verdict.headline,
            "metric": self.config.metric,
            "prompts": self.patching["prompt"].nunique() if self.patching is not None else None,
            "parts": [name for name in PARTS if getattr(self, name) is not None],
            "resid_sweep": resid,
        }

    def _table(self) -> tuple[list[str], list[Any]]:
        evidence = self.verdict.evidence
        shown = ["segment", "recovery_all", "recovery_matched", "recovery_query_control"]
        columns = [c for c in [*shown, "carrier", "partial"] if c in evidence]
        return columns, list(evidence[columns].itertuples(index=False))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write every part into ``folder`` (see :data:`PARTS`) and the verdict to ``scan.json``."""
        folder = Path(folder)
        for name in PARTS:
            if getattr(self, name) is not None:
                save_part(name, getattr(self, name), folder)
        atomic_write_parquet(self.verdict.evidence, folder / "evidence.parquet")
        verdict = {k: v for k, v in dataclasses.asdict(self.verdict).items() if k != "evidence"}
        write_json(folder / "scan.json", {"config": dataclasses.asdict(self.config), **verdict})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ScanResult:
        """Read a result written by :meth:`save`; the verdict is recomputed from the saved
        experiments (``scan.json`` keeps the one written, for reading)."""
        folder = Path(folder)
        meta = read_json(folder / "scan.json")
        if meta is None:
            raise FileNotFoundError(f"{folder} holds no scan result (scan.json is missing)")
        config = ScanConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        )
        parts = {name: load_part(name, folder) for name in PARTS}
        verdict = carrier_verdict(
            parts["patching"], parts["perturbation"], min_recovery=config.min_recovery
        )
        return cls(config, verdict=verdict, **parts)


# where each part of a scan lives inside its folder
PARTS = {
    "perturbation": "perturbation/perturbation.parquet",
    "patching": "patching/patching.parquet",
    "layers": "layers/layers.parquet",
    "resid": "resid/resid_sweep.parquet",
}


def save_part(name: str, value: Any, folder: str | os.PathLike[str]) -> Path:
    """Write one part of a scan (a frame, or the residual :class:`SweepResult`) under ``folder``."""
    path = Path(folder) / PARTS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    return value.save(path) if isinstance(value, SweepResult) else atomic_write_parquet(value, path)


def load_part(name: str, folder: str | os.PathLike[str]) -> Any:
    """Read one part written by :func:`save_part`; ``None`` when it was not run."""
    import pandas as pd

    path = Path(folder) / PARTS[name]
    if not path.exists():
        return None
    return SweepResult.load(path) if name == "resid" else pd.read_parquet(path)


def find_carriers(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    config: ScanConfig = ScanConfig(),
    *,
    progress: bool = True,
) -> ScanResult:
    """Run every experiment of the carrier scan on ``prompts`` and rank the segments.

    ``base`` and ``model`` are a base model and its finetuned copy (e.g. from
    :func:`~piggyback_interp.core.models.load_pair`); ``prompts`` are general questions the
    finetuning was not about. ``piggyback scan`` runs this with caching and a report.
    Identical models (a zero gap on every prompt) raise :class:`ZeroGapError`.
    """
    check_gap(base, model, prompts, config)
    perturbation = perturbation_effects(base, model, prompts, config, progress=progress)
    patching = segment_patching(base, model, prompts, config, progress=progress)
    layers = layer_patching(base, model, prompts, config, progress=progress)
    resid = (
        residual_sweep(base, model, prompts, config, progress=progress)
        if config.resid_sweep
        else None
    )
    verdict = carrier_verdict(patching, perturbation, min_recovery=config.min_recovery)
    return ScanResult(config, perturbation, patching, layers, resid, verdict)


__all__ = [
    "PARTS",
    "GapMetric",
    "ScanConfig",
    "ScanResult",
    "Verdict",
    "ZeroGapError",
    "carrier_verdict",
    "check_gap",
    "find_carriers",
    "gap_metric",
    "layer_patching",
    "load_part",
    "perturbation_effects",
    "residual_sweep",
    "save_part",
    "segment_patching",
]
