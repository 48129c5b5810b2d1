"""Short summaries of result objects for the REPL and Jupyter: ``repr`` and ``_repr_html_``.

A class that mixes in :class:`Summarized` and defines ``_facts()`` (a few headline
``name -> value`` pairs) prints as one line of them, and in Jupyter as a small table of
them, plus the rows of ``_table()`` if it has any. Never whole tensors, frames or models.

Example:
    >>> class Result(Summarized):
    ...     def _facts(self):
    ...         return {"layers": list(range(24)), "recovery": 0.83456}
    >>> Result()
    Result(layers=[0, 1, 2, …, 23] (24), recovery=0.835)
    >>> "<td>0.835</td>" in Result()._repr_html_()
    True
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

REPR_WIDTH = 90  # the most characters one value takes in a repr


def format_value(value: Any) -> str:
    """A value as a person reads it: numbers to 3 significant digits, long lists elided.

    Example:
        >>> format_value(12345.6), format_value(0.000123), format_value(float("nan"))
        ('12,300', '0.000123', '—')
        >>> format_value((0, 1, 2, 3, 4, 5, 6, 7))
        '[0, 1, 2, …, 7] (8)'
    """
    if value is None:
        return "—"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's too
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and 1e3 <= abs(v) < 1e15:  # 12345.6 -> 12,300 (3 significant digits)
            digits = 2 - math.floor(math.log10(abs(v)))
            return f"{round(v, digits):,.0f}"
        return f"{v:.3g}"
    if isinstance(value, (list, tuple)):
        items = [format_value(v) for v in value]
        if len(items) > 6:
            items = [*items[:3], "…", items[-1]]
            return f"[{', '.join(items)}] ({len(value)})"
        return f"[{', '.join(items)}]"
    return str(value)


def _short(text: str, width: int = REPR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def html_table(
    rows: Iterable[Sequence[Any]], *, columns: Sequence[str] | None = None, caption: str = ""
) -> str:
    """A small HTML table (values through :func:`format_value`, escaped); with ``columns``
    a header row, without one the first cell of each row is its heading.

    Example:
        >>> html_table([("layers", 2)])
        '<table><tr><th style="text-align:left">layers</th><td>2</td></tr></table>'
    """

    def cell(tag: str, value: Any) -> str:
        style = ' style="text-align:left"' if tag == "th" else ""
        return f"<{tag}{style}>{html.escape(format_value(value))}</{tag}>"

    out = ["<table>"]
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    if columns is not None:
        out.append("<tr>" + "".join(cell("th", c) for c in columns) + "</tr>")
    for row in rows:
        first, *rest = row
        head = cell("td" if columns is not None else "th", first)
        out.append("<tr>" + head + "".join(cell("td", v) for v in rest) + "</tr>")
    out.append("</table>")
    return "".join(out)


class Summarized:
    """Mixin: a one-line ``repr`` and a ``_repr_html_`` from ``_facts()`` (and ``_table()``).

    A dataclass that mixes it in needs ``@dataclass(repr=False)`` (else the dataclass
    writes its own ``__repr__``, with every field in full).
    """

    def _facts(self) -> dict[str, Any]:
        """Headline ``name -> value`` pairs (``None`` values are left out)."""
        raise NotImplementedError

    def _shown(self) -> dict[str, Any]:
        return {k: v for k, v in self._facts().items() if v is not None}

    def _table(self) -> tuple[Sequence[str], list[Sequence[Any]]] | None:
        """``(columns, rows)`` of a small table shown under the facts in Jupyter."""
        return None

    def __repr__(self) -> str:
        facts = ", ".join(f"{k}={_short(format_value(v))}" for k, v in self._shown().items())
        return f"{type(self).__name__}({facts})"

    def _repr_html_(self) -> str:
        parts = [f"<strong>{type(self).__name__}</strong>", html_table(self._shown().items())]
        table = self._table()
        if table is not None:
            columns, rows = table
            parts.append(html_table(rows, columns=columns))
        return "<div>" + "".join(parts) + "</div>"


__all__ = ["Summarized", "format_value", "html_table"]
