"""The shipped question sets are large, unique and diverse (not stamped from one template)."""

import itertools
import re
from collections import Counter

import pytest

from piggyback_interp.core.data.questions import QUESTION_SETS, question_set

MINIMUM = {"legal": 250, "finance": 250, "health": 250, "general": 100, "factual": 250}


def _words(text):
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _jaccard(a, b):
    return len(a & b) / len(a | b)


@pytest.mark.parametrize("name", QUESTION_SETS)
def test_question_set_is_large_unique_and_diverse(name):
    questions = question_set(name)
    assert len(questions) >= MINIMUM[name]
    assert len(set(q.lower() for q in questions)) == len(questions)
    words = [_words(q) for q in questions]
    worst = max(_jaccard(a, b) for a, b in itertools.combinations(words, 2))
    assert worst < 0.6, f"two {name} questions share most of their words (Jaccard {worst:.2f})"
    starts = Counter(" ".join(q.lower().split()[:4]) for q in questions)
    assert max(starts.values()) <= 6, starts.most_common(1)


def test_general_questions_stay_off_the_narrow_domains():
    general = [_words(q) for q in question_set("general")]
    for name in ("legal", "finance", "health"):
        narrow = [_words(q) for q in question_set(name)]
        worst = max(_jaccard(a, b) for a in general for b in narrow)
        assert worst < 0.6, (name, worst)


def test_unknown_set():
    with pytest.raises(ValueError, match="unknown question set"):
        question_set("astrology")
