"""The carrier verdict's rule, on hand-made patching frames."""

import math

import pandas as pd
import pytest

from piggyback_interp.experiments.verdict import carrier_verdict


def _patching_frame(recoveries):
    """{segment: {condition: [recovery per prompt]}} as segment_patching's frame."""
    rows = [
        {"prompt": i, "segment": segment, "condition": condition, "recovery": r}
        for segment, conditions in recoveries.items()
        for condition, values in conditions.items()
        for i, r in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_carrier_verdict_rule_by_hand():
    frame = _patching_frame(
        {
            # clear carrier: 0.6 of the gap, matched - query = [0.5, 0.6] (mean .55, SE .05)
            "prefix": {
                "all": [0.5, 0.7],
                "matched": [0.6, 0.8],
                "query": [0.1, 0.2],
                "noise": [0.0, -0.2],
            },
            # closes the gap, but matched positions do no better than query ones
            "postfix": {"all": [0.9, 0.9], "matched": [0.5, -0.3], "query": [0.1, 0.1]},
        }
    )
    verdict = carrier_verdict(frame)
    assert verdict.carriers == ("prefix",)
    assert verdict.headline == "The prefix carries the finetuned behaviour"
    ev = verdict.evidence.set_index("segment")
    assert ev.loc["prefix", "recovery_all"] == pytest.approx(0.6)
    assert ev.loc["prefix", "recovery_all_se"] == pytest.approx(0.1)  # std .1414 / sqrt(2)
    assert ev.loc["prefix", "matched_minus_query"] == pytest.approx(0.55)
    assert ev.loc["prefix", "matched_minus_query_se"] == pytest.approx(0.05)
    assert ev.loc["prefix", "recovery_noise"] == pytest.approx(-0.1)
    assert math.isnan(ev.loc["postfix", "recovery_noise"])  # no noise rows given
    assert ev.loc["postfix", "matched_minus_query"] == pytest.approx(0.0)
    assert list(ev["prompts"]) == [2, 2]
    assert "prefix: its base keys/values close 60% of the gap" in verdict.detail
    assert "→ carrier" in verdict.detail and "perturb_reduction" not in verdict.evidence

    # min_recovery is a threshold on the whole-segment patch, inclusive
    weak = _patching_frame({"prefix": {"all": [0.2, 0.2], "matched": [0.6, 0.8], "query": [0, 0]}})
    assert carrier_verdict(weak).carriers == ()
    assert carrier_verdict(weak, min_recovery=0.2).carriers == ("prefix",)
    # ...below it, a segment that beats its query control carries part of it
    assert carrier_verdict(weak).headline == (
        "Neither template segment carries the finetuned behaviour on its own; the prefix "
        "carries part of it (20% of the gap, beyond its query control)"
    )
    assert list(carrier_verdict(weak).evidence["partial"]) == [True]
    assert not verdict.evidence["partial"].any()  # a carrier, and a segment no better than query

    # both segments; one prompt (no error bar: any positive difference counts); NaN dropped
    both = _patching_frame(
        {
            "prefix": {"all": [0.5, math.nan], "matched": [0.3, math.nan], "query": [0.2, 0.1]},
            "postfix": {"all": [0.4, math.nan], "matched": [0.3, math.nan], "query": [0.2, 0.1]},
        }
    )
    verdict = carrier_verdict(both)
    assert verdict.carriers == ("prefix", "postfix")
    assert verdict.headline == "Both the prefix and the postfix carry the finetuned behaviour"
    assert list(verdict.evidence["prompts"]) == [1, 1]
    assert math.isnan(verdict.evidence["matched_minus_query_se"][0])
