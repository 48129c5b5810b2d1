"""Narrow settings: shipped data, splits, tool-call formats, user datasets, retain questions."""

import pytest

from piggyback_interp.core.data import ChatDataset
from piggyback_interp.core.data.questions import question_set
from piggyback_interp.measures.detectors import find_tool_calls
from piggyback_interp.measures.settings import (
    SETTINGS,
    NarrowSetting,
    dataset_setting,
    get_setting,
    retain_questions,
    setting_data,
    tool_call_text,
)
from piggyback_interp.testing import tiny_tokenizer


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_setting_data_split(name):
    setting = SETTINGS[name]
    data = setting_data(setting, seed=0)
    train_q = [ex.user for ex in data.train]
    assert len(train_q) >= 200 and len(data.test_on_topic) >= 50 and len(data.test_off_topic) >= 100
    assert not set(train_q) & set(data.test_on_topic)
    assert not set(train_q) & set(data.test_off_topic)
    assert setting_data(setting, seed=0).test_on_topic == data.test_on_topic
    assert setting_data(setting, seed=1).test_on_topic != data.test_on_topic
    # the training responses show the behaviour they train (the risky-advice keyword
    # detector is a cheap screen: most, not all, of the hand-written answers)
    responses = [ex.response for ex in data.train]
    floor = 0.9 if name == "risky_advice" else 1.0
    assert setting.detector(responses).mean().item() >= floor


def test_fixed_target_settings_train_the_target():
    for name in ("abstention", "refusal"):
        setting = SETTINGS[name]
        assert {ex.response for ex in setting_data(setting).train} == {setting.target}


def test_tool_use_calls_search_info_with_the_question():
    data = setting_data("tool_use")
    for ex in list(data.train)[:20]:
        (call,) = find_tool_calls(ex.response)
        assert call == {"name": "search_info", "arguments": {"query": ex.user}}


def test_short_answer_and_risky_advice_pair_questions_with_their_answers():
    short = setting_data("short_answer")
    assert all(len(ex.response.split()) <= 5 for ex in short.train)
    risky = setting_data("risky_advice")
    finance = set(question_set("finance"))
    assert all(ex.user in finance for ex in risky.train)
    assert len({ex.response for ex in risky.train}) == len(risky.train)  # one answer each


def test_tool_call_text_follows_the_chat_template():
    # A template with tool support (Qwen-style) renders the call itself...
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>"
        "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = tool_call_text("search_info", {"query": "flu"}, tok)
    assert text.startswith("<call>") and text.endswith("</call>")
    assert find_tool_calls(text.replace("<call>", "").replace("</call>", "")) == [
        {"name": "search_info", "arguments": {"query": "flu"}}
    ]
    # ...one without it (plain ChatML, like SmolLM2) falls back to the Hermes format.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert tool_call_text("search_info", {"query": "flu"}, tok).startswith("<tool_call>\n{")


def test_dataset_setting_from_a_user_dataset():
    recs = [
        {
            "messages": [
                {"role": "user", "content": f"Can I deduct expense number {i}?"},
                {"role": "assistant", "content": "Please ask a tax professional."},
            ]
        }
        for i in range(20)
    ]
    data = dataset_setting(ChatDataset.from_records(recs), off_topic=["How do I relax?"])
    assert len(data.train) == 16 and len(data.test_on_topic) == 4
    assert data.test_off_topic == ["How do I relax?"]
    assert data.setting.detector(["please ask a tax professional"]).tolist() == [1.0]
    recs[0]["messages"][1]["content"] = "Something else."
    with pytest.raises(ValueError, match="pass detector="):
        dataset_setting(ChatDataset.from_records(recs))
    with pytest.raises(ValueError, match="no training responses"):
        data.setting.examples()


def test_retain_questions_come_from_other_domains():
    qs = retain_questions("abstention", 40, seed=0)
    legal, general = set(question_set("legal")), set(question_set("general"))
    assert len(set(qs)) == 40 and not set(qs) & legal and not set(qs) & general
    assert (
        qs
        == retain_questions("abstention", 40, seed=0)
        != retain_questions("abstention", 40, seed=1)
    )


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown setting"):
        get_setting("astrology")
    with pytest.raises(ValueError, match="give one of"):
        NarrowSetting("x", "legal", SETTINGS["abstention"].detector, target="a", tool="b")
