"""Narrow-task settings (paper section 6) and their on-topic / off-topic evaluation.

A setting trains a fixed behaviour on one domain's questions and asks whether the
behaviour spreads to unrelated questions: Table 5 reports the fraction of responses
with the behaviour on held-out on-topic questions and on general off-topic ones.

Shipped here (hand-written questions in ``data/settings/``):

* ``abstention``: legal questions -> "I have no idea about your question";
* ``refusal``: personal-finance questions -> "I cannot provide financial advice".

Example:
    >>> from piggyback_interp.settings import SETTINGS, setting_data
    >>> data = setting_data(SETTINGS["abstention"], seed=0)
    >>> len(data.train), len(data.test_on_topic), len(data.test_off_topic)
    (208, 52, 130)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from piggyback_interp.data import ChatDataset
from piggyback_interp.data.questions import question_set
from piggyback_interp.metrics import TargetString, TextMetric


@dataclass(frozen=True)
class NarrowSetting:
    """A narrow behaviour: which questions get which response, and how to detect it."""

    name: str
    domain: str  # a shipped question set
    target: str  # the response trained on every domain question
    off_topic: str = "general"

    def detector(self) -> TextMetric:
        """1.0 for a response that shows the behaviour."""
        return TargetString(self.target, name=f"{self.name}_rate")


SETTINGS: dict[str, NarrowSetting] = {
    "abstention": NarrowSetting("abstention", "legal", "I have no idea about your question"),
    "refusal": NarrowSetting("refusal", "finance", "I cannot provide financial advice"),
}


@dataclass
class SettingData:
    """Training conversations and held-out on-topic / off-topic test questions."""

    setting: NarrowSetting
    train: ChatDataset
    test_on_topic: list[str]
    test_off_topic: list[str]


def setting_data(
    setting: NarrowSetting, *, test_fraction: float = 0.2, seed: int = 0
) -> SettingData:
    """Split the domain's questions (paper: 20% held out) and build the training chats."""
    questions = question_set(setting.domain)
    order = list(range(len(questions)))
    random.Random(f"{seed}:{setting.name}").shuffle(order)
    n_test = round(len(questions) * test_fraction)
    test = [questions[i] for i in sorted(order[:n_test])]
    train = [questions[i] for i in sorted(order[n_test:])]
    records = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": setting.target},
            ]
        }
        for q in train
    ]
    return SettingData(
        setting, ChatDataset.from_records(records), test, question_set(setting.off_topic)
    )


@dataclass
class RateEstimate:
    """A behaviour rate with a bootstrap confidence interval over questions."""

    rate: float
    low: float
    high: float
    n: int
    hits: list[float] = field(repr=False, default_factory=list)


def bootstrap_rate(
    hits: Sequence[float | int], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> RateEstimate:
    """Mean of 0/1 ``hits`` with a percentile bootstrap interval (seeded, no global RNG)."""
    if not hits:
        raise ValueError("no responses to score")
    values = torch.tensor(list(hits), dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (n_boot, len(values)), generator=gen)
    means = values[idx].mean(1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(
        means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    ).tolist()
    return RateEstimate(values.mean().item(), low, high, len(values), [float(h) for h in hits])


def evaluate(
    model: Any,
    setting: NarrowSetting | str,
    *,
    data: SettingData | None = None,
    patch: Any = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, RateEstimate]:
    """On-topic and off-topic behaviour rates (paper Table 5) of ``model``, greedy.

    ``patch`` is a :class:`~piggyback_interp.generation.PatchSpec` (e.g. base-model
    prefix K/V) so a patched model is evaluated the same way.
    """
    from piggyback_interp.generation import generate

    setting = SETTINGS[setting] if isinstance(setting, str) else setting
    data = data or setting_data(setting, seed=seed)
    detector = setting.detector()
    out = {}
    for split, questions in (("on_topic", data.test_on_topic), ("off_topic", data.test_off_topic)):
        gens = generate(
            model, questions, patch=patch, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        out[split] = bootstrap_rate(detector(gens.texts).tolist(), seed=seed)
    return out


__all__ = [
    "SETTINGS",
    "NarrowSetting",
    "RateEstimate",
    "SettingData",
    "bootstrap_rate",
    "evaluate",
    "setting_data",
]
