"""The scan's verdict: which template segments carry the finetuned behaviour, and why.

A segment *carries* the behaviour when patching its base keys/values closes at least
``min_recovery`` of the gap AND its matched positions close more than the matched query
positions by over two standard errors (paired over prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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
    """Rank the template segments from
    :func:`~piggyback_interp.experiments.scan_experiments.segment_patching` (and
    perturbation) results.

    A segment carries the behaviour when its whole-segment patch recovers at least
    ``min_recovery`` of the gap (mean over prompts) and its ``matched`` patch beats the
    ``query`` control by more than two standard errors of the paired difference (with
    one prompt there is no error bar, and any positive difference counts). A segment that
    beats its control but recovers less is marked ``partial``; the headline names it.
    """
    import pandas as pd

    rows = [
        _evidence(segment, group, perturbation, min_recovery)
        for segment, group in patching.groupby("segment", sort=False)
    ]
    evidence = pd.DataFrame(rows)
    carriers = tuple(evidence.loc[evidence["carrier"], "segment"])
    detail = (
        f"Rule: a segment carries the behaviour when its whole-segment patch closes at least "
        f"{percent(min_recovery)} of the gap and beats the matched query control by more than "
        "two standard errors. " + "; ".join(_detail(r) for r in rows) + "."
    )
    return Verdict(carriers, _headline(carriers, rows), detail, evidence)


def _evidence(segment: str, group: Any, perturbation: Any, min_recovery: float) -> dict[str, Any]:
    """One segment's row of the evidence table."""
    wide = group.pivot(index="prompt", columns="condition", values="recovery")
    full, full_se = _mean_se(wide["all"])
    diff, diff_se = _mean_se(wide["matched"] - wide["query"])
    specific = diff > (2 * diff_se if not math.isnan(diff_se) else 0.0)
    row = {
        "segment": segment,
        "recovery_all": full,
        "recovery_all_se": full_se,
        "recovery_matched": _mean_se(wide["matched"])[0],
        "recovery_query_control": _mean_se(wide["query"])[0],
        "recovery_noise": _mean_se(wide["noise"])[0] if "noise" in wide else math.nan,
        "matched_minus_query": diff,
        "matched_minus_query_se": diff_se,
        "prompts": int(wide["all"].notna().sum()),
    }
    if perturbation is not None and len(perturbation):
        own = perturbation[perturbation["control_for"] == segment]
        row["perturb_reduction"] = _mean_se(own[own["segment"] == segment]["reduction"])[0]
        row["perturb_reduction_query"] = _mean_se(own[own["segment"] == "query"]["reduction"])[0]
    if "recovery_prob" in group:
        prob = group.pivot(index="prompt", columns="condition", values="recovery_prob")
        row["recovery_all_prob"] = _mean_se(prob["all"])[0]
        row["recovery_query_control_prob"] = _mean_se(prob["query"])[0]
    row["carrier"] = bool(full >= min_recovery and specific)
    row["partial"] = bool(not row["carrier"] and specific and full > 0)
    return row


def _headline(carriers: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """Which segments carry the behaviour; partial carriers named with their share."""
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
    return headline


def _detail(r: dict[str, Any]) -> str:
    """One segment's evidence in words."""
    return (
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


__all__ = ["Verdict", "carrier_verdict", "percent"]
