"""Narrow settings: data splits, bootstrap rates, and evaluate() against generate + detector."""

import pytest

from piggyback_interp.generation import generate
from piggyback_interp.settings import SETTINGS, SettingData, bootstrap_rate, evaluate, setting_data
from piggyback_interp.testing import tiny_model


@pytest.mark.parametrize("name", ["abstention", "refusal"])
def test_setting_data_split(name):
    setting = SETTINGS[name]
    data = setting_data(setting, seed=0)
    train_q = [ex.user for ex in data.train]
    assert len(train_q) >= 200 and len(data.test_on_topic) >= 50 and len(data.test_off_topic) >= 100
    assert not set(train_q) & set(data.test_on_topic)
    assert all(ex.response == setting.target for ex in data.train)
    assert setting_data(setting, seed=0).test_on_topic == data.test_on_topic
    assert setting_data(setting, seed=1).test_on_topic != data.test_on_topic


def test_bootstrap_rate():
    est = bootstrap_rate([1, 0, 0, 1, 1, 0, 1, 1], seed=0)
    assert est.rate == pytest.approx(5 / 8) and est.low <= est.rate <= est.high and est.n == 8
    assert bootstrap_rate([1, 0, 1], seed=3).low == bootstrap_rate([1, 0, 1], seed=3).low
    ones = bootstrap_rate([1.0] * 5)
    assert (ones.rate, ones.low, ones.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no responses"):
        bootstrap_rate([])


def test_evaluate_equals_generate_plus_detector():
    model = tiny_model("llama")
    setting = SETTINGS["abstention"]
    full = setting_data(setting)
    data = SettingData(setting, full.train, full.test_on_topic[:4], full.test_off_topic[:4])
    rates = evaluate(model, setting, data=data, max_new_tokens=6)
    for split, questions in (("on_topic", data.test_on_topic), ("off_topic", data.test_off_topic)):
        texts = generate(model, questions, max_new_tokens=6).texts
        assert rates[split].hits == setting.detector()(texts).tolist()
        assert rates[split].n == 4


@pytest.mark.embedded
def test_embedded_base_model_does_not_abstain(embedded):
    """The untrained SmolLM2 answers legal and general questions: abstention rate ~0."""
    setting = SETTINGS["abstention"]
    full = setting_data(setting)
    data = SettingData(setting, full.train, full.test_on_topic[:12], full.test_off_topic[:12])
    rates = evaluate(embedded, setting, data=data, max_new_tokens=16)
    assert rates["on_topic"].rate <= 0.1 and rates["off_topic"].rate <= 0.1
