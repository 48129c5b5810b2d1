"""Report sections from saved results: what each experiment is, its figure, its table, its finding.

Used by ``piggyback scan``, ``piggyback demo`` and ``piggyback report`` (which rebuilds
a report from a run folder without recomputing anything).

Example:
    >>> from piggyback_interp.experiments.scan import ScanResult
    >>> sections = scan_sections(ScanResult.load("runs/scan/scan"))   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from piggyback_interp.core.errors import UserError
from piggyback_interp.experiments.scan import ScanResult
from piggyback_interp.experiments.scan_config import GapMetric
from piggyback_interp.experiments.verdict import percent
from piggyback_interp.report.html import duration
from piggyback_interp.report.sections import Section

GAP_WORDS = {
    GapMetric.KL: "the KL divergence of the finetuned model's next-token distribution from the base "
    "model's after the full prompt, KL(base || finetuned)",
    GapMetric.TARGET: "the difference between the finetuned and the base model's log-probability of the "
    "target answer",
}


def gap_words(result: ScanResult) -> str:
    """What the scan's gap is, in words."""
    words = GAP_WORDS[result.config.metric]
    return words.replace("the target answer", f"the target answer `{result.config.target}`")


def scan_sections(result: ScanResult, *, what: str = "the finetuned model") -> list[Section]:
    """The verdict's evidence and one section per experiment of a carrier scan."""
    from piggyback_interp.report.figures import carrier_bars, layer_recovery_curve

    evidence = result.verdict.evidence
    gap = gap_words(result)
    n_prompts = int(result.patching["prompt"].nunique())
    sections = [
        Section(
            "Which template tokens carry it",
            f"The gap between {what} and the base model is {gap}, on {n_prompts} general "
            "prompts. For each template segment the base model's keys and values (from the same "
            "prompt, every layer) are patched into the finetuned model at: every position of the "
            "segment (`all`); `n` of its positions (`matched`); `n` query positions (`query`, "
            "the non-template control); Gaussian noise of the base's norm at the matched positions "
            "(`noise`). Recovery is the fraction of the gap closed (1: the finetuned model answers "
            "like the base model; 0: no change); with a target answer it is given in log-probability "
            "(`recovery`) and in probability (`recovery_prob`, P = exp(log P)), which weighs the "
            "prompts where the answer is likely. Noise is a destructive control: far from 0 (above "
            "1 or below 0) it shows the model does read those positions, so a K/V patch near 0 "
            "there means the base values change nothing, not that the positions are ignored. "
            "Error bars: 95% over prompts.",
            figures=[carrier_bars(result.patching, yaxis="recovery of the gap")],
            tables=[("Evidence per template segment", evidence)],
            finding=result.verdict.headline,
        )
    ]
    pert = result.perturbation
    if len(pert):
        rows = []
        for segment, group in pert.groupby("control_for", sort=False):
            own = group[group["segment"] == segment]["reduction"].mean()
            query = group[group["segment"] == "query"]["reduction"].mean()
            rows.append(
                f"perturbing {segment} tokens removes {percent(own)} of the gap, as many query tokens {percent(query)}"
            )
        sections.append(
            Section(
                "Segment perturbations",
                "Each template segment's tokens (and, as the control, as many query tokens) are "
                f"replaced by nearest-neighbour tokens in the input of both models ({result.config.trials} "
                "trials per prompt). Reduction is the fraction of the gap that disappears: a segment "
                "that carries the behaviour loses more of it when perturbed than the query does.",
                figures=[
                    carrier_bars(
                        pert,
                        x="control_for",
                        group="segment",
                        value="reduction",
                        yaxis="reduction of the gap",
                    )
                ],
                finding="; ".join(rows).capitalize() + ".",
            )
        )
    layers = result.layers
    if len(layers):
        best = layers.groupby(["condition", "layer"])["recovery"].mean()
        peaks = [
            f"{cond}: peak {percent(best[cond].max())} at layer {int(best[cond].idxmax())}"
            for cond in best.index.get_level_values(0).unique()
        ]
        sections.append(
            Section(
                "Layer by layer (keys/values)",
                "The base keys/values of ONE layer at a time, at each template segment and at the "
                "query; the segment's other layers keep the finetuned model's own keys/values, so "
                "only what later positions read changes (the paper's Eq. 1). Band: 95% over prompts.",
                figures=[layer_recovery_curve(layers, title=None)],
                finding="; ".join(peaks).capitalize() + ".",
            )
        )
    if result.resid is not None:
        sections.append(_resid_section(result.resid))
    return sections


def _resid_section(resid: Any) -> Section:
    """The residual sweep: exact everywhere, or AtP-ranked with the top k patched exactly."""
    import torch

    from piggyback_interp.report.figures import patching_heatmap

    mean = resid.recovery().nanmean(0)
    screened = resid.meta.get("method") == "atp_prescreen"
    text = (
        "The base residual stream (`resid_pre`) patched into the finetuned model at one "
        "(layer, prefix position) at a time; colour: recovery of the gap, averaged over prompts."
    )
    where = "single-cell recovery"
    if screened:
        exact = {(layer, pos) for layer, pos in resid.meta["exact_cells"]}
        keep = torch.tensor(
            [[(layer, pos) in exact for pos in resid.positions] for layer in resid.layers]
        )
        mean = mean.where(keep, torch.tensor(math.nan))
        text += (
            f" Attribution patching (one forward and backward) ranked all {keep.numel()} cells; "
            f"the top {len(exact)} were patched exactly, the others show the AtP estimate "
            "(`--resid-atp-top-k none` patches every cell)."
        )
        where = f"exactly patched recovery (of the top {len(exact)} by AtP)"
    layer, pos = divmod(int(mean.nan_to_num(-math.inf).argmax()), mean.shape[1])
    return Section(
        "Residual stream, layer x prefix position",
        text,
        figures=[patching_heatmap(resid)],
        finding=(
            f"The largest {where} is {percent(float(mean[layer, pos]))} at layer "
            f"{resid.layers[layer]}, position {resid.positions[pos]} ({resid.tokens[pos]!r})."
        ),
    )


def behaviour_section(evaluations: Mapping[str, Any], *, setting: str) -> Section:
    """On- and off-topic behaviour per model (Table 5's shape)."""
    import pandas as pd

    from piggyback_interp.report.figures import method_comparison

    rows = []
    for label, ev in evaluations.items():
        rows.append(
            {
                "model": label,
                "on_topic": ev.rate("on_topic"),
                "off_topic": ev.rate("off_topic"),
                "n_on_topic": int((ev.responses["split"] == "on_topic").sum()),
                "n_off_topic": int((ev.responses["split"] == "off_topic").sum()),
            }
        )
    table = pd.DataFrame(rows)
    sft = table.set_index("model")["off_topic"].get("sft", math.nan)
    base = table.set_index("model")["off_topic"].get("base", math.nan)
    finding = (
        f"After SFT on {setting} questions only, {percent(sft)} of answers to general questions show "
        f"the behaviour (base model: {percent(base)})."
    )
    examples = []
    for label, ev in evaluations.items():
        off = ev.responses[ev.responses["split"] == "off_topic"].head(3)
        examples += [
            {"model": label, "question": q, "response": r}
            for q, r in zip(off["question"], off["response"], strict=True)
        ]
    return Section(
        "Behaviour on- and off-topic",
        f"Each model answers held-out {setting} questions (on-topic) and general questions "
        "(off-topic), greedily; a detector marks the trained behaviour. The narrow finetuning "
        "should show on-topic only; showing it off-topic is the over-generalisation the paper "
        "explains. `sft+prefix_kv`: the SFT model with the base model's prefix keys/values "
        "patched in at every layer while it answers.",
        figures=[method_comparison(dict(evaluations))],
        tables=[
            ("Behaviour rate per split", table),
            ("First answers to general questions", pd.DataFrame(examples)),
        ],
        finding=finding,
    )


def _mean_p(values: pd.DataFrame, segment: str, condition: str) -> float:
    rows = values[(values["segment"] == segment) & (values["condition"] == condition)]
    return float(rows["logp"].map(math.exp).mean())


def _share_of(shares: pd.DataFrame, segment: str, condition: str, space: str) -> float:
    rows = shares[(shares["segment"] == segment) & (shares["condition"] == condition)]
    return float(rows[f"share_{space}"].iloc[0]) if len(rows) else math.nan


def graded_rows(graded: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model of :func:`~piggyback_interp.experiments.pipeline.graded_step` results."""
    rows = []
    for label, result in graded.items():
        g, values, shares = result["graded"], result["values"], result["shares"]
        row = {
            "model": label,
            "P(target)": float(g["p"].mean()),
            "log-odds": float(g["log_odds"].mean()),
            "KL(base||model)": float(g["kl"].mean()),
            "P under base template K/V": _mean_p(values, "template", "all"),
        }
        for segment in ("prefix", "postfix", "template"):
            for space, name in (("prob", "P"), ("logprob", "log P")):
                row[f"{segment} share ({name})"] = _share_of(shares, segment, "all", space)
        for space, name in (("prob", "P"), ("logprob", "log P")):
            row[f"query control share ({name})"] = _share_of(shares, "template", "query", space)
        row["prompts"] = int(g["prompt"].nunique())
        rows.append(row)
    return pd.DataFrame(rows)


def graded_sentence(graded: Mapping[str, Any]) -> str:
    """What the graded measures say about the SFT model, in one sentence."""
    table = graded_rows({k: v for k, v in graded.items() if k == "sft"})
    if table.empty:
        return ""
    row = table.iloc[0]
    return (
        f"Graded measure on {row['prompts']} general prompts: the SFT model puts mean "
        f"P(target) {row['P(target)']:.2f} on the trained answer; with the base model's "
        f"template keys/values at every layer it puts {row['P under base template K/V']:.2f}, "
        f"so the template carries {percent(row['template share (P)'])} of the gap in "
        f"probability and {percent(row['template share (log P)'])} in log-probability "
        f"(prefix {percent(row['prefix share (P)'])}, postfix {percent(row['postfix share (P)'])}; "
        f"as many query positions: {percent(row['query control share (P)'])})."
    )


def graded_section(graded: Mapping[str, Any]) -> Section:
    """Teacher-forced P(target) and carrier shares per model: the measures that do not
    saturate where greedy answers do."""
    table = graded_rows(graded)
    return Section(
        "Graded measures: how much of P(target) the template carries",
        "Greedy answers saturate: a model that puts 0.6 or 0.999 on the trained answer gives "
        "it either way. Here every model is scored by the teacher-forced probability of the "
        "trained answer on general prompts, its log-odds and the next-token KL to the base "
        "model; then the base model's keys/values (every layer, from the base run on the "
        "empty-query prompt) replace the model's at the prefix, the postfix or both "
        "(template), and the share of the base-model gap each closes is reported in "
        "probability and in log-probability, beside the same number of query positions "
        "patched from the base run on the same prompt (the control). A share of 100% brings "
        "the base model's value back; 0% changes nothing.",
        tables=[("Graded measures and carrier shares per model", table)],
        finding=graded_sentence(graded) or None,
    )


def training_section(runs: Mapping[str, Any]) -> Section:
    """Loss curves and prefix drift of the finetuning runs (``{method: finetune.json dict}``)."""
    import pandas as pd

    from piggyback_interp.report.figures import training_curves

    rows = []
    for label, record in runs.items():
        history = record["history"]
        last = history[-1]
        drift = last.get("drift") or {}
        rows.append(
            {
                "method": label,
                "steps": len(history),
                "final_sft_loss": last.get("sft"),
                "mean_prefix_drift": sum(drift.values()) / len(drift) if drift else math.nan,
            }
        )
    table = pd.DataFrame(rows)
    drift = table.set_index("method")["mean_prefix_drift"]
    finding = "; ".join(f"{m}: mean prefix drift {d:.3g}" for m, d in drift.items()) + "."
    return Section(
        "Finetuning",
        "LoRA finetuning of the same base model with plain SFT, TReFT (SFT plus a penalty on the "
        "prefix keys/values' relative distance from the base model's) and data interleaving "
        "(SFT on a mixture with the base model's own answers to other questions). Prefix drift: "
        "the relative change of the prefix keys/values per layer.",
        figures=[training_curves(dict(runs))],
        tables=[("Runs", table)],
        finding=finding,
    )


def task_vector_section(frames: Mapping[str, Any]) -> Section:
    """Per-layer task-vector norms (and cosines between methods)."""
    import plotly.graph_objects as go

    from piggyback_interp.report.figures import task_vector_heatmap

    norms = frames["norms"]
    fig = go.Figure()
    for method, group in norms[norms["layer"] >= 0].groupby("method", sort=False):
        fig.add_scatter(x=group["layer"], y=group["norm"], mode="lines+markers", name=str(method))
    fig.update_layout(
        template="plotly_white", xaxis_title="layer", yaxis_title="||finetuned - base||", height=340
    )
    figures = [fig]
    finding = None
    if frames.get("cosine") is not None:
        cosine = frames["cosine"]
        figures.append(task_vector_heatmap(cosine))
        mean = cosine.groupby(["a", "b"])["cosine"].mean()
        finding = (
            "; ".join(f"{a} vs {b}: mean per-layer cosine {c:.2f}" for (a, b), c in mean.items())
            + "."
        )
    return Section(
        "Task vectors",
        "The weight change of each finetuned model (finetuned minus base, the LoRA update), per "
        "layer, and how similar the changes of different methods are (cosine per layer).",
        figures=figures,
        finding=finding,
    )


# --- whole reports -------------------------------------------------------------------------


def _timing_note(record: Mapping[str, Any]) -> str:
    steps = record.get("steps", {})
    cached = sum(1 for t in steps.values() if t.get("cached"))
    return (
        f"This run took {duration(record.get('wall_seconds'))} of wall time "
        f"({cached} of {len(steps)} steps were cached from an earlier run); computing every "
        f"step from scratch took {duration(record.get('compute_seconds'))}."
    )


def regime_words(config: Mapping[str, Any]) -> str:
    """Which training regime a demo shows, and why (from its recorded config)."""
    steps = f"lr {config['lr']:g} x {config['epochs']} epoch(s), batch {config['batch_size']}"
    if config.get("label") == "quick":
        return (
            f"Regime: the quick demo trains briefly ({steps}, {config.get('n_train')} chats) to "
            "show the pipeline in minutes; its numbers are not the map's. The full demo trains at "
            "the map's most informative point (docs/results.md)."
        )
    return (
        f"Regime: LoRA rank {config['lora_rank']} on every projection, {steps}. On the "
        "map of training strengths (`piggyback map`, docs/results.md) this is the point where "
        "the behaviour is learned on-topic while the off-topic P(target) is far from saturated, "
        "so how much of it the template carries can be measured; at stronger training P(target) "
        "saturates near 1 and every patch's share shrinks."
    )


def demo_verdict(
    evaluations: Mapping[str, Any],
    scan: ScanResult,
    graded: Mapping[str, Any] | None = None,
    regime: str = "",
) -> tuple[str, str]:
    """The demo's headline and its explanation, from the measured rates, the graded
    measures and the scan."""
    rate = {label: ev.rate("off_topic") for label, ev in evaluations.items()}
    on = {label: ev.rate("on_topic") for label, ev in evaluations.items()}
    sft, base = rate.get("sft", math.nan), rate.get("base", math.nan)
    appears = sft - base >= 0.25 and on.get("sft", 0.0) >= 0.5
    parts = []
    if appears:
        headline = (
            f"The piggyback effect appears: after SFT on one narrow domain, {percent(sft)} of general "
            f"answers show the trained behaviour (base model: {percent(base)})."
        )
    elif on.get("sft", 0.0) < 0.5:
        headline = (
            f"Inconclusive: the SFT model learned the behaviour on only {percent(on.get('sft'))} of "
            "on-topic questions, too little to see whether it spreads."
        )
    else:
        headline = (
            f"No piggyback effect here: the SFT model shows the behaviour on {percent(on.get('sft'))} "
            f"of on-topic but only {percent(sft)} of general questions (base: {percent(base)})."
        )
    if graded:
        parts.append(graded_sentence(graded))
        table = graded_rows(graded).set_index("model")["P(target)"]
        others = [f"`{k}` {v:.2f}" for k, v in table.items() if k != "sft"]
        if others:
            parts.append("Mean off-topic P(target) of the other models: " + ", ".join(others) + ".")
    parts.append(scan.verdict.headline + ". " + scan.verdict.detail)
    if regime:
        parts.append(regime)
    for label in ("sft+prefix_kv", "treft", "interleave"):
        if label in rate:
            parts.append(
                f"`{label}`: {percent(rate[label])} off-topic, {percent(on[label])} on-topic."
            )
    return headline, "\n\n".join(parts)


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    """Rebuild ``report.html`` of a demo or scan run folder from its saved results; return its path."""
    from piggyback_interp.core.runs import read_json
    from piggyback_interp.experiments.pipeline import load_graded
    from piggyback_interp.measures.evaluation import Evaluation
    from piggyback_interp.report.html import Report

    folder = Path(run_dir)
    record = read_json(folder / "run.json")
    if record is None:
        raise FileNotFoundError(
            f"{folder} is not a finished run folder (no run.json): run `piggyback demo` or "
            "`piggyback scan` with --out there first"
        )
    command = record.get("command")
    provenance = {k: v for k, v in record.items() if k != "steps"}
    provenance["steps"] = {
        name: f"{t.get('seconds')} s{' (cached)' if t.get('cached') else ''}"
        for name, t in record.get("steps", {}).items()
    }
    if command == "scan":
        scan = ScanResult.load(folder / "scan")
        sections = scan_sections(scan)
        verdict, detail = scan.verdict.headline, scan.verdict.detail
        title = f"Carrier scan: {record['models']['finetuned']['name']} vs {record['models']['base']['name']}"
    elif command == "demo":
        config = record["config"]
        evaluations = {
            p.parent.name: Evaluation.load(p)
            for p in sorted((folder / "evaluate").glob("*/evaluation.parquet"))
        }
        order = ["base", *config["methods"], "sft+prefix_kv"]
        evaluations = {k: evaluations[k] for k in order if k in evaluations}
        runs = {m: read_json(folder / "finetune" / m / "finetune.json") for m in config["methods"]}
        scan = ScanResult.load(folder / "scan" / "sft")
        graded = {
            m: load_graded(folder / "graded" / m)
            for m in config["methods"]
            if (folder / "graded" / m / "carriers.parquet").exists()
        }
        verdict, detail = demo_verdict(evaluations, scan, graded, regime_words(config))
        vectors = {
            "norms": pd.read_parquet(folder / "task_vectors" / "norms.parquet"),
            "cosine": None,
        }
        cosine = folder / "task_vectors" / "cosine.parquet"
        if cosine.exists():
            vectors["cosine"] = pd.read_parquet(cosine)
        sections = [
            training_section(runs),
            behaviour_section(evaluations, setting=config["setting"]),
            *([graded_section(graded)] if graded else []),
            *scan_sections(scan, what="the SFT model"),
            task_vector_section(vectors),
        ]
        title = f"The piggyback effect on {record['base']['name']} ({config['label']} demo)"
    else:
        raise UserError(
            f"{folder}/run.json is from {command!r}; reports exist for demo and scan runs"
        )
    sections.append(Section("How this was produced", _timing_note(record)))
    report = Report(
        title=title,
        verdict=verdict,
        verdict_detail=detail,
        sections=sections,
        provenance=provenance,
        wall_seconds=record.get("wall_seconds"),
    )
    return report.save(folder / "report.html")


__all__ = [
    "behaviour_section",
    "build_report",
    "demo_verdict",
    "graded_rows",
    "graded_section",
    "regime_words",
    "scan_sections",
    "task_vector_section",
    "training_section",
]
