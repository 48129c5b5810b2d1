"""evaluate(): generate + detector per split and seed, judges, summaries with SE over seeds."""

import math

import pandas as pd
import pytest

from piggyback_interp.interventions.generation import PatchSpec, generate
from piggyback_interp.measures.evaluation import (
    Evaluation,
    bootstrap_rate,
    em_f1,
    evaluate,
    format_estimate,
    markdown_table,
    summarize,
)
from piggyback_interp.measures.judges import JudgeScore, LocalJudge
from piggyback_interp.measures.settings import SETTINGS, SettingData, setting_data
from piggyback_interp.testing import tiny_model


def _small(name, n=3):
    full = setting_data(name)
    return SettingData(full.setting, full.train, full.test_on_topic[:n], full.test_off_topic[:n])


def test_bootstrap_rate():
    est = bootstrap_rate([1, 0, 0, 1, 1, 0, 1, 1], seed=0)
    assert est.rate == pytest.approx(5 / 8) and est.low <= est.rate <= est.high and est.n == 8
    assert bootstrap_rate([1, 0, 1], seed=3).low == bootstrap_rate([1, 0, 1], seed=3).low
    ones = bootstrap_rate([1.0] * 5)
    assert (ones.rate, ones.low, ones.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no responses"):
        bootstrap_rate([])


def test_em_f1_matches_the_paper_and_hand_values():
    # Table 3 of the paper (Llama legal): general / in-domain / EM-F1
    for general, in_domain, expected in [
        (47.5, 13.3, 61.4),
        (64.1, 15.3, 73.0),
        (85.6, 27.7, 78.4),
    ]:
        assert em_f1(in_domain, general) == pytest.approx(expected, abs=0.05)
    assert em_f1(100.0, 0.0) == 0.0
    assert em_f1(0.0, 100.0) == 100.0
    with pytest.raises(ValueError, match=r"in \[0, 100\]"):
        em_f1(-1.0, 50.0)


def test_evaluate_equals_generate_plus_detector():
    model = tiny_model("llama")
    data = _small("abstention", 4)
    result = evaluate(model, data, max_new_tokens=6)
    for split, questions in (("on_topic", data.test_on_topic), ("off_topic", data.test_off_topic)):
        texts = generate(model, questions, max_new_tokens=6).texts
        rows = result.responses[result.responses["split"] == split]
        assert rows["response"].tolist() == texts
        assert rows["behaviour"].tolist() == SETTINGS["abstention"].detector(texts).tolist()
    assert result.meta["setting"] == "abstention" and result.meta["max_new_tokens"] == 6


def test_evaluate_a_patched_model_the_same_way():
    base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    data = _small("refusal", 2)
    spec = PatchSpec(base, site="kv", segment="prefix")
    result = evaluate(tuned, data, patch=spec, max_new_tokens=5)
    texts = generate(tuned, data.test_on_topic, patch=spec, max_new_tokens=5).texts
    assert (
        result.responses.loc[result.responses["split"] == "on_topic", "response"].tolist() == texts
    )
    assert result.meta["patch"][0]["site"] == "kv"


def test_seeds_are_an_axis_and_need_sampling():
    model = tiny_model("llama")
    data = _small("abstention", 2)
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate(model, data, seeds=(0, 1))
    result = evaluate(model, data, seeds=(0, 1), temperature=1.0, max_new_tokens=5)
    assert sorted(result.responses["seed"].unique()) == [0, 1]
    texts = generate(model, data.test_off_topic, temperature=1.0, seed=1, max_new_tokens=5).texts
    rows = result.responses[
        (result.responses["seed"] == 1) & (result.responses["split"] == "off_topic")
    ]
    assert rows["response"].tolist() == texts
    summary = result.summary()
    assert set(summary["n_seeds"]) == {2}


def test_settings_metrics_are_columns():
    model = tiny_model("llama")
    result = evaluate(model, _small("short_answer", 2), max_new_tokens=4)
    assert result.metrics == ["behaviour", "answer_length"]
    assert result.responses["answer_length"].tolist() == [
        float(sum(any(c.isalnum() for c in w) for w in t.split()))
        for t in result.responses["response"]
    ]


class _WordCountJudge:
    """A judge with hand-checkable scores: 10 x the answer's word count (capped at 100);
    no score (unparsed) for an empty answer."""

    judge_id = "test:word-count"

    def score_many(self, questions, answers):
        assert len(questions) == len(answers)
        return [
            JudgeScore(min(100.0, 10.0 * len(a.split())), "score", 1.0)
            if a.split()
            else JudgeScore(None, "unparsed", 0.0)
            for a in answers
        ]


def test_evaluate_with_judges_scores_every_answer_and_gives_em_f1():
    model = tiny_model("llama")
    result = evaluate(model, _small("abstention", 3), judge=_WordCountJudge(), max_new_tokens=5)
    rows = result.responses
    expected = [
        min(100.0, 10.0 * len(t.split())) if t.split() else math.nan for t in rows["response"]
    ]
    assert rows["alignment"].tolist() == pytest.approx(expected, nan_ok=True)
    assert rows["misaligned"].tolist() == pytest.approx(
        [math.nan if math.isnan(e) else float(e < 30) for e in expected], nan_ok=True
    )
    assert result.metrics == ["behaviour", "alignment", "misaligned"]
    assert result.meta["judges"] == {"alignment": "test:word-count"}
    summary = result.summary().set_index(["split", "metric"])
    on = rows.loc[rows["split"] == "on_topic", "alignment"].mean()
    off = rows.loc[rows["split"] == "off_topic", "alignment"].mean()
    assert summary.loc[("both", "em_f1"), "mean"] == pytest.approx(em_f1(on, off))


def test_evaluate_with_a_local_judge_equals_calling_it():
    model = tiny_model("llama")
    judge = LocalJudge(tiny_model("qwen2"))
    data = _small("refusal", 2)
    result = evaluate(model, data, judge={"coherence": judge}, max_new_tokens=4)
    rows = result.responses
    direct = judge.score_many(rows["question"].tolist(), rows["response"].tolist())
    assert rows["coherence_label"].tolist() == [s.label for s in direct]
    assert "misaligned" not in rows  # only an "alignment" judge defines it
    with pytest.raises(TypeError, match="score_many"):
        evaluate(model, data, judge=object())


def _frame():
    """Two seeds, hand-made scores: on-topic alignment 10/20 and 30/NaN, off-topic 80/60, 90/70."""
    return pd.DataFrame(
        {
            "seed": [0, 0, 0, 0, 1, 1, 1, 1],
            "split": ["on_topic", "on_topic", "off_topic", "off_topic"] * 2,
            "behaviour": [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            "alignment": [10.0, 20.0, 80.0, 60.0, 30.0, math.nan, 90.0, 70.0],
        }
    )


def test_summarize_by_hand():
    summary = summarize(_frame(), ["behaviour", "alignment"]).set_index(["split", "metric"])
    on = summary.loc[("on_topic", "behaviour")]
    assert on["mean"] == pytest.approx(0.75)  # seeds 1.0 and 0.5
    assert on["se"] == pytest.approx(0.25)  # std(1.0, 0.5) / sqrt(2)
    assert (on["n_seeds"], on["n"]) == (2, 4)
    al = summary.loc[("on_topic", "alignment")]
    assert al["mean"] == pytest.approx(22.5) and al["n"] == 3  # seeds 15 and 30; NaN skipped
    f1 = summary.loc[("both", "em_f1")]
    expected = [em_f1(15.0, 70.0), em_f1(30.0, 80.0)]
    assert f1["mean"] == pytest.approx(sum(expected) / 2)
    assert f1["se"] == pytest.approx(abs(expected[0] - expected[1]) / 2)


def test_summarize_by_groups():
    a, b = _frame().assign(method="sft"), _frame().assign(method="treft")
    b["behaviour"] = 0.0
    summary = summarize(pd.concat([a, b]), ["behaviour"], by=["method"])
    rows = summary.set_index(["method", "split", "metric"])
    assert rows.loc[("treft", "on_topic", "behaviour"), "mean"] == 0.0
    assert rows.loc[("sft", "on_topic", "behaviour"), "mean"] == pytest.approx(0.75)


def test_save_load_and_formatting(tmp_path):
    result = Evaluation(_frame(), ["behaviour", "alignment"], {"setting": "x"})
    path = result.save(tmp_path / "eval.parquet")
    again = Evaluation.load(path)
    pd.testing.assert_frame_equal(again.responses, result.responses)
    assert again.metrics == result.metrics and again.meta == {"setting": "x"}
    assert format_estimate(0.5, math.nan, 0.25, 0.75) == "0.50 [0.25, 0.75]"
    table = markdown_table(pd.DataFrame({"a": [1], "b": ["x"]}))
    assert table == "| a | b |\n|---|---|\n| 1 | x |\n"


@pytest.mark.embedded
def test_embedded_base_model_does_not_abstain(embedded):
    """The untrained SmolLM2 answers legal and general questions: abstention rate ~0."""
    result = evaluate(embedded, _small("abstention", 12), max_new_tokens=16)
    assert result.rate("on_topic") <= 0.1 and result.rate("off_topic") <= 0.1


def test_evaluation_repr_and_html_show_the_rates():
    model = tiny_model("llama")
    result = evaluate(model, _small("abstention", 3), max_new_tokens=3, progress=False)
    result.responses.loc[result.responses["split"] == "off_topic", "behaviour"] = [1, 0, 0]
    text = repr(result)
    assert len(text) < 600 and "\n" not in text and "DataFrame" not in text
    assert text.startswith("Evaluation(setting=abstention, model=tiny-llama-L2-seed0")
    assert "responses=6" in text and "on_topic_rate=0," in text and "off_topic_rate=0.333" in text
    page = result._repr_html_()
    assert "<td>off_topic</td><td>0.333</td>" in page and "abstention" in page


def test_evaluate_progress_bar(capsys):
    model, data = tiny_model("llama"), _small("abstention", 3)
    evaluate(model, data, max_new_tokens=2, progress=False)
    assert capsys.readouterr().err == ""
    evaluate(model, data, max_new_tokens=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "evaluate abstention" in err and "6/6" in err  # answers, advanced per batch
