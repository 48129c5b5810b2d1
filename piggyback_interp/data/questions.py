"""Hand-written question sets shipped with the package (for the narrow-task settings).

Example:
    >>> from piggyback_interp.data.questions import QUESTION_SETS, question_set
    >>> len(question_set("general")) >= 100
    True
"""

from __future__ import annotations

from importlib import resources

QUESTION_SETS = ("legal", "finance", "health", "general")


def question_set(name: str) -> list[str]:
    """The questions of one shipped set, in file order."""
    if name not in QUESTION_SETS:
        raise ValueError(f"unknown question set {name!r}; choose one of {', '.join(QUESTION_SETS)}")
    text = (
        resources.files("piggyback_interp.data") / "settings" / f"{name}_questions.txt"
    ).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


__all__ = ["QUESTION_SETS", "question_set"]
