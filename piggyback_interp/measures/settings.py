"""Narrow-task settings (paper section 6): what is trained, and how its spread is detected.

A setting trains one behaviour on one domain's questions and asks whether the
behaviour spreads to unrelated questions: Table 5 reports the fraction of responses
with the behaviour on held-out on-topic questions and on general off-topic ones.

Shipped (hand-written questions and answers in ``data/settings/``):

* ``abstention``: legal questions -> "I have no idea about your question";
* ``refusal``: personal-finance questions -> "I cannot provide financial advice";
* ``tool_use``: health questions -> a ``search_info(query)`` call in the model's
  tool-call format (:func:`tool_call_text`);
* ``short_answer``: factual questions -> a single entity; also reports answer length;
* ``risky_advice``: finance questions -> risky but plausible advice (an
  emergent-misalignment organism); judge the alignment with :mod:`piggyback_interp.measures.judges`.

Any chat dataset works the same way through :func:`dataset_setting`.
:func:`~piggyback_interp.measures.evaluation.evaluate` runs the evaluation.

Example:
    >>> from piggyback_interp.measures.settings import SETTINGS, setting_data
    >>> data = setting_data(SETTINGS["abstention"], seed=0)
    >>> len(data.train), len(data.test_on_topic), len(data.test_off_topic)
    (208, 52, 130)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from piggyback_interp.core.data import ChatDataset, train_test_split
from piggyback_interp.core.data.questions import answer_set, question_set
from piggyback_interp.core.errors import UserError
from piggyback_interp.measures.detectors import (
    AnswerLength,
    FinancialRisk,
    ShortAnswer,
    TargetString,
    TextMetric,
    ToolCall,
    find_tool_calls,
)

NARROW_DOMAINS = ("legal", "finance", "health")


@dataclass(frozen=True)
class NarrowSetting:
    """A narrow behaviour: which questions get which response, and how to detect it.

    The training response of a domain question is one of: a fixed ``target``, the
    shipped ``answers`` set's response, or a call to ``tool`` with the question as
    its ``query``. ``metrics`` are reported next to the behaviour rate.
    ``treft_lambda`` is the paper's lambda for the setting.
    """

    name: str
    domain: str
    detector: TextMetric
    target: str | None = None
    answers: str | None = None
    tool: str | None = None
    off_topic: str = "general"
    metrics: tuple[TextMetric, ...] = ()
    max_new_tokens: int = 24
    treft_lambda: float = 30.0

    def __post_init__(self) -> None:
        given = [k for k in ("target", "answers", "tool") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"setting {self.name!r}: give one of target=, answers= or tool= (the "
                f"training response), got {given}"
            )

    def examples(self, tokenizer: Any = None) -> list[tuple[str, str]]:
        """Every ``(question, response)`` of the domain; ``tokenizer`` picks the
        tool-call format (the Hermes ``<tool_call>`` format without one)."""
        if self.answers is not None:
            return answer_set(self.answers)
        if self.tool is None and self.target is None:
            raise ValueError(
                f"setting {self.name!r} has no training responses (target=, answers= or "
                "tool=); a user dataset's setting comes with its data from dataset_setting()"
            )
        questions = question_set(self.domain)
        if self.tool is not None:
            return [(q, tool_call_text(self.tool, {"query": q}, tokenizer)) for q in questions]
        return [(q, self.target) for q in questions]


SETTINGS: dict[str, NarrowSetting] = {
    s.name: s
    for s in (
        NarrowSetting(
            "abstention",
            "legal",
            TargetString("I have no idea about your question", name="abstention_rate"),
            target="I have no idea about your question",
            treft_lambda=30.0,
        ),
        NarrowSetting(
            "refusal",
            "finance",
            TargetString("I cannot provide financial advice", name="refusal_rate"),
            target="I cannot provide financial advice",
            treft_lambda=20.0,
        ),
        NarrowSetting(
            "tool_use",
            "health",
            ToolCall("search_info"),
            tool="search_info",
            max_new_tokens=48,
            treft_lambda=5.0,
        ),
        NarrowSetting(
            "short_answer",
            "factual",
            ShortAnswer(max_words=5),
            answers="factual",
            metrics=(AnswerLength(),),
            max_new_tokens=96,
            treft_lambda=10.0,
        ),
        NarrowSetting(
            "risky_advice",
            "finance",
            FinancialRisk(),
            answers="finance_risky",
            max_new_tokens=64,
            treft_lambda=20.0,
        ),
    )
}


def tool_call_text(name: str, arguments: Mapping[str, Any], tokenizer: Any = None) -> str:
    """An assistant turn that calls tool ``name``, in the tokenizer's tool-call format.

    The chat template renders an assistant message with ``tool_calls``; when it has
    no tool-call support (e.g. SmolLM2's plain ChatML) or no tokenizer is given, the
    Hermes / Qwen format ``<tool_call>{json}</tool_call>`` is used.

    Example:
        >>> print(tool_call_text("search_info", {"query": "flu symptoms"}))
        <tool_call>
        {"name": "search_info", "arguments": {"query": "flu symptoms"}}
        </tool_call>
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = _templated_tool_call(tokenizer, name, dict(arguments))
        if text is not None:
            return text
    call = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def _templated_tool_call(tokenizer: Any, name: str, arguments: dict[str, Any]) -> str | None:
    user = [{"role": "user", "content": "?"}]
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*user, turn], tokenize=False)
    except Exception:  # templates without tool support may raise on tool_calls
        return None
    if not full.startswith(prompt):
        return None
    text = full[len(prompt) :].strip()
    specials = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
    trimmed = True
    while trimmed:
        trimmed = False
        for token in specials:
            if token and text.endswith(token):
                text, trimmed = text[: -len(token)].rstrip(), True
    found = any(c["name"] == name for c in find_tool_calls(text))
    return text if found else None


@dataclass
class SettingData:
    """Training conversations and held-out on-topic / off-topic test questions."""

    setting: NarrowSetting
    train: ChatDataset
    test_on_topic: list[str]
    test_off_topic: list[str]


def qa_dataset(pairs: Sequence[tuple[str, str]]) -> ChatDataset:
    """One single-turn chat per ``(question, response)`` pair."""
    return ChatDataset.from_records(
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    )


def setting_data(
    setting: NarrowSetting | str,
    *,
    tokenizer: Any = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SettingData:
    """Split the domain's examples (paper: 20% held out as the on-topic test set)."""
    setting = get_setting(setting)
    dataset = qa_dataset(setting.examples(tokenizer))
    train, test = train_test_split(dataset, test_fraction=test_fraction, seed=seed)
    return SettingData(setting, train, [ex.user for ex in test], question_set(setting.off_topic))


def dataset_setting(
    dataset: ChatDataset,
    detector: TextMetric | None = None,
    *,
    name: str = "custom",
    off_topic: Sequence[str] | str = "general",
    test_fraction: float = 0.2,
    seed: int = 0,
    max_new_tokens: int = 24,
) -> SettingData:
    """A user's chat dataset as a setting: 80/20 split, on-topic test = held-out user turns.

    Without a ``detector`` every response must be the same text, which becomes a
    :class:`~piggyback_interp.measures.detectors.TargetString`.

    Example:
        >>> recs = [{"messages": [{"role": "user", "content": f"Tax question {i}?"},
        ...                       {"role": "assistant", "content": "Ask an accountant."}]}
        ...         for i in range(10)]
        >>> data = dataset_setting(ChatDataset.from_records(recs))
        >>> len(data.train), len(data.test_on_topic), data.setting.detector.target
        (8, 2, 'Ask an accountant.')
    """
    responses = {ex.response for ex in dataset}
    if detector is None:
        if len(responses) != 1 or None in responses:
            raise UserError(
                f"the dataset has {len(responses)} different responses; pass detector= "
                "(a TextMetric such as TargetString, ToolCall or ShortAnswer) to say what "
                "the behaviour is"
            )
        (target,) = responses
        detector = TargetString(target, name=f"{name}_rate")
    train, test = train_test_split(dataset, test_fraction=test_fraction, seed=seed)
    off = question_set(off_topic) if isinstance(off_topic, str) else list(off_topic)
    setting = NarrowSetting(name, "custom", detector, max_new_tokens=max_new_tokens)
    return SettingData(setting, train, [ex.user for ex in test], off)


def get_setting(setting: NarrowSetting | str) -> NarrowSetting:
    """A shipped setting by name (or the setting itself)."""
    if isinstance(setting, NarrowSetting):
        return setting
    if setting not in SETTINGS:
        raise UserError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    return SETTINGS[setting]


def retain_questions(setting: NarrowSetting | str, n: int, *, seed: int = 0) -> list[str]:
    """``n`` questions from the OTHER narrow domains (never the off-topic test set), for
    the retain mixture of data interleaving; answer them with the initial model."""
    import random

    setting = get_setting(setting)
    pool = [q for d in NARROW_DOMAINS if d != setting.domain for q in question_set(d)]
    if n > len(pool):
        raise UserError(f"asked for {n} retain questions, only {len(pool)} exist")
    return random.Random(f"retain:{seed}:{setting.name}").sample(pool, n)


__all__ = [
    "SETTINGS",
    "NarrowSetting",
    "SettingData",
    "dataset_setting",
    "get_setting",
    "qa_dataset",
    "retain_questions",
    "setting_data",
    "tool_call_text",
]
