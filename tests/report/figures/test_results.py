"""Segment bars and the method comparison: their data equal aggregate_trials and summarize."""

import doctest
import math

import numpy as np
import pandas as pd
import pytest
import torch

import piggyback_interp.report.figures.results as results_module
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import chat_spans
from piggyback_interp.interventions.perturb import aggregate_trials, perturb_segments, trials_frame
from piggyback_interp.measures.evaluation import evaluate, summarize
from piggyback_interp.measures.judges import JudgeScore
from piggyback_interp.measures.settings import SettingData, setting_data
from piggyback_interp.report.figures import method_comparison, segment_bars


def test_segment_bars_equal_aggregate_trials(pair, candidates):
    _, model = pair
    tok = chat_tokenizer(model)
    target = tok.convert_tokens_to_ids("I") if "I" in tok.get_vocab() else 1
    per_prompt, scores = [], []
    for question in candidates[:3]:
        side = perturb_segments(model, chat_spans(tok, question), trials=4, seed=0)
        row = [p for name in ("prefix", "query", "postfix") for p in side[name]]
        with torch.no_grad():  # the perturbed prompt's log-prob of a fixed next token
            logits = torch.stack([model(p.ids[None])[0, -1] for p in row])
        scores.append(logits.log_softmax(-1)[:, target])
        per_prompt.append(row)
    frame = trials_frame(per_prompt, torch.stack(scores))
    fig = segment_bars(frame, unperturbed=-3.0)
    best, avg, line = fig.data
    assert (best.name, avg.name, line.name) == ("Best", "Avg", "unperturbed (-3)")
    assert list(best.x) == ["prefix", "query", "postfix"]
    for j, segment in enumerate(best.x):
        group = frame[frame["segment"] == segment]
        agg = aggregate_trials(
            torch.tensor(group.pivot(index="prompt", columns="trial", values="score").to_numpy())
        )
        assert best.y[j] == pytest.approx(agg["best"]) and avg.y[j] == pytest.approx(agg["avg"])
        assert best.error_y.array[j] == pytest.approx(agg["best_se"])
        assert avg.error_y.array[j] == pytest.approx(agg["avg_se"])
    assert fig.layout.shapes[0].y0 == -3.0  # the unperturbed line
    aggs = {
        s: aggregate_trials(
            torch.tensor(g.pivot(index="prompt", columns="trial", values="score").to_numpy())
        )
        for s, g in frame.groupby("segment")
    }
    again = segment_bars(aggs)  # {segment: aggregate} gives the same bars, same order
    assert list(again.data[0].x) == list(best.x)
    np.testing.assert_allclose(again.data[0].y, best.y)
    with pytest.raises(ValueError, match="every trial"):
        segment_bars(frame.iloc[1:])
    with pytest.raises(ValueError, match="'best' and 'avg'"):
        segment_bars({"prefix": {"mean": 1.0}})


# ---------------------------------------------------------------- method comparison


class _WordCountJudge:
    """A deterministic judge: 10 x the answer's word count, capped at 100."""

    judge_id = "test:word-count"

    def score_many(self, questions, answers):
        return [JudgeScore(min(100.0, 10.0 * len(a.split())), "score", 1.0) for a in answers]


def _small(name, n=3):
    full = setting_data(name)
    return SettingData(full.setting, full.train, full.test_on_topic[:n], full.test_off_topic[:n])


def test_method_comparison_equals_summary(pair, finetuned):
    base, _ = pair
    models = {"initial": base, "sft": finetuned["sft"][3], "treft": finetuned["treft"][3]}
    frames = []
    for method, model in models.items():
        result = evaluate(
            model,
            _small("abstention"),
            judge=_WordCountJudge(),
            seeds=(0, 1),
            temperature=1.0,
            max_new_tokens=5,
        )
        frames.append(result.responses.assign(method=method))
    responses = pd.concat(frames, ignore_index=True)
    summary = summarize(responses, ["behaviour", "alignment"], by=["method"])
    rows = summary.set_index(["method", "split", "metric"])
    fig = method_comparison(summary)
    on, off, em = fig.data
    assert (on.name, off.name, em.name) == ("on-topic", "off-topic", "EM-F1")
    assert list(on.x) == list(models)
    for trace, split in ((on, "on_topic"), (off, "off_topic")):
        for j, method in enumerate(trace.x):
            row = rows.loc[(method, split, "behaviour")]
            assert trace.y[j] == pytest.approx(row["mean"])
            assert trace.error_y.array[j] == pytest.approx(row["se"])  # 2 seeds: SE
            assert trace.error_y.arrayminus[j] == pytest.approx(row["se"])
    for j, method in enumerate(em.x):
        assert em.y[j] == pytest.approx(rows.loc[(method, "both", "em_f1"), "mean"])
    assert em.yaxis == "y2"  # its own row of panels
    align = method_comparison(summary, metric="alignment", em_f1=False)
    assert [t.name for t in align.data] == ["in-domain (on-topic)", "general (off-topic)"]
    assert align.data[1].y[0] == pytest.approx(
        rows.loc[("initial", "off_topic", "alignment"), "mean"]
    )
    with pytest.raises(ValueError, match="no on/off-topic rows for metric 'kl'"):
        method_comparison(summary, metric="kl")
    with pytest.raises(ValueError, match="not in the summary"):
        method_comparison(summary, methods=["dpo"])


def test_method_comparison_one_seed_uses_bootstrap_ci_and_facets(pair, finetuned):
    base, _ = pair
    frames, evaluations = [], {}
    for setting in ("abstention", "refusal"):
        for method, model in (("initial", base), ("sft", finetuned["sft"][3])):
            result = evaluate(model, _small(setting, 4), max_new_tokens=4)
            frames.append(result.responses.assign(method=method, setting=setting))
            if setting == "refusal":
                evaluations[method] = result
    summary = summarize(
        pd.concat(frames, ignore_index=True), ["behaviour"], by=["setting", "method"]
    )
    fig = method_comparison(summary)
    assert [a.text for a in fig.layout.annotations] == ["abstention", "refusal"]
    assert len(fig.data) == 4  # 2 settings x 2 splits, no EM-F1 rows
    refusal_off = fig.data[3]
    assert refusal_off.xaxis == "x2"
    rows = summary.set_index(["setting", "method", "split"])
    for j, method in enumerate(refusal_off.x):
        row = rows.loc[("refusal", method, "off_topic")]
        assert math.isnan(row["se"])  # one seed: no SE, so the bootstrap interval
        assert refusal_off.y[j] == pytest.approx(row["mean"])
        assert refusal_off.error_y.array[j] == pytest.approx(row["high"] - row["mean"])
        assert refusal_off.error_y.arrayminus[j] == pytest.approx(row["mean"] - row["low"])
        assert "bootstrap" in refusal_off.hovertext[j]
    direct = method_comparison(evaluations)  # {method: Evaluation}: the same bars
    assert list(direct.data[1].y) == list(refusal_off.y)
    assert list(direct.data[1].error_y.array) == list(refusal_off.error_y.array)


def test_doctests():
    result = doctest.testmod(results_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
