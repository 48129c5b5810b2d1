"""Shared look and small helpers of the figures: colours, token labels, mean ± SE, checks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

# one colour per segment / condition, the same in every figure
COLOURS: dict[str, str] = {
    "prefix": "#4C78A8",
    "query": "#F58518",
    "postfix": "#54A24B",
    "response": "#9D755D",
    "random": "#B279A2",
    "later": "#72B7B2",
    "noise": "#BAB0AC",
}
PALETTE: tuple[str, ...] = (
    "#4C78A8",
    "#F58518",
    "#54A24B",
    "#E45756",
    "#72B7B2",
    "#B279A2",
    "#FF9DA6",
    "#9D755D",
    "#EECA3B",
    "#BAB0AC",
)
SEGMENT_ORDER: tuple[str, ...] = ("prefix", "query", "postfix", "response")
TEMPLATE = "plotly_white"  # set on each figure, never as the global default
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def colour_map(labels: Iterable[str]) -> dict[str, str]:
    """A colour per label: the fixed ones for known segments/controls, then the palette."""
    unique = list(dict.fromkeys(labels))
    out = {label: COLOURS[label] for label in unique if label in COLOURS}
    spare = [c for c in PALETTE if c not in out.values()] or list(PALETTE)
    others = [label for label in unique if label not in out]
    out.update({label: spare[i % len(spare)] for i, label in enumerate(others)})
    return {label: out[label] for label in unique}


def with_alpha(hex_colour: str, alpha: float) -> str:
    """``"#4C78A8"`` -> ``"rgba(76,120,168,0.2)"``."""
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def display_token(token: str) -> str:
    """A tokenizer's raw token as a readable label: byte-level BPE's ``Ġ``/``Ċ`` and
    SentencePiece's ``▁`` become ``␣`` (space) and ``↵`` (newline); tabs ``⇥``."""
    table = {"Ġ": "␣", "▁": "␣", " ": "␣", "Ċ": "↵", "\n": "↵", "ĉ": "⇥", "\t": "⇥"}
    return "".join(table.get(ch, ch) for ch in token)


def html_escape(text: str) -> str:
    """Escape ``&``, ``<``, ``>`` so plotly draws ``<|im_start|>`` instead of parsing a tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mean_se(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise mean, standard error (sample std / sqrt(n)) and n over rows, NaN ignored.

    SE is NaN where fewer than two rows are finite."""
    finite = np.isfinite(matrix)
    n = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(finite, matrix, 0.0).sum(0)
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        dev = np.where(finite, matrix - mean, 0.0)
        var = (dev**2).sum(0) / np.maximum(n - 1, 1)
        se = np.where(n > 1, np.sqrt(var) / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, se, n


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise a ValueError naming the missing columns of ``frame``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} needs the columns {list(columns)}; missing {missing} "
            f"(got {list(frame.columns)})"
        )


def ordered(values: Iterable[object], first: Sequence[str] = ()) -> list:
    """Unique values, the names in ``first`` (in that order) before the rest (as they come)."""
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def finite(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
