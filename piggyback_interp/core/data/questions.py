"""Hand-written question (and answer) sets shipped with the package, for the narrow settings.

``data/settings/`` holds one question per line (``legal``, ``finance``, ``health``,
``general``), question-answer pairs (``factual_qa.tsv``) and responses line-aligned
with a question set (``finance_risky_answers.txt``). See its README.md.

Example:
    >>> from piggyback_interp.core.data.questions import answer_set, question_set
    >>> len(question_set("general")) >= 100
    True
    >>> question, answer = answer_set("factual")[0]
    >>> question.endswith("?") and len(answer.split()) <= 4
    True
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from piggyback_interp.core.errors import UserError

QUESTION_SETS = ("legal", "finance", "health", "general", "factual")
ANSWER_SETS = ("factual", "finance_risky")


def _lines(filename: str) -> list[str]:
    text = (resources.files("piggyback_interp.core.data") / "settings" / filename).read_text(
        "utf-8"
    )
    return [line.strip() for line in text.splitlines() if line.strip()]


def question_set(name: str) -> list[str]:
    """The questions of one shipped set, in file order."""
    if name not in QUESTION_SETS:
        raise UserError(f"unknown question set {name!r}; choose one of {', '.join(QUESTION_SETS)}")
    if name == "factual":
        return [question for question, _ in answer_set("factual")]
    return _lines(f"{name}_questions.txt")


def answer_set(name: str) -> list[tuple[str, str]]:
    """``(question, response)`` pairs of one shipped answer set, in file order.

    ``factual``: short factual questions and their one-entity answers;
    ``finance_risky``: the finance questions with risky but plausible advice.
    """
    if name == "factual":
        pairs = [tuple(line.split("\t")) for line in _lines("factual_qa.tsv")]
        bad = [i + 1 for i, pair in enumerate(pairs) if len(pair) != 2]
        if bad:
            raise ValueError(f"factual_qa.tsv: lines {bad} are not 'question<TAB>answer'")
        return [(q.strip(), a.strip()) for q, a in pairs]
    if name == "finance_risky":
        questions, answers = question_set("finance"), _lines("finance_risky_answers.txt")
        if len(questions) != len(answers):
            raise ValueError(
                f"finance_risky_answers.txt has {len(answers)} lines for {len(questions)} "
                "finance questions; they must be line-aligned"
            )
        return list(zip(questions, answers, strict=True))
    raise UserError(f"unknown answer set {name!r}; choose one of {', '.join(ANSWER_SETS)}")


def load_prompts(path: str | os.PathLike[str] | None = None, n: int | None = None) -> list[str]:
    """Prompts from a file, or the shipped ``general`` questions when ``path`` is None.

    A ``.jsonl`` file is a chat dataset: its user turns are the prompts. Any other file
    has one prompt per line (blank lines and lines starting with ``#`` are skipped).
    ``n`` keeps the first ``n``.
    """
    if n is not None and n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    if path is None:
        prompts = question_set("general")
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        if path.suffix.lower() == ".jsonl":
            from piggyback_interp.core.data.chat import load_chat_jsonl

            prompts = [example.user for example in load_chat_jsonl(path)]
        else:
            lines = path.read_text("utf-8").splitlines()
            prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise UserError(f"prompts file {path} holds no prompts")
    return prompts[:n] if n is not None else prompts


__all__ = ["ANSWER_SETS", "QUESTION_SETS", "answer_set", "load_prompts", "question_set"]
