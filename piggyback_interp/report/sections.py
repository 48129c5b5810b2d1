"""A report's sections: the :class:`Section` dataclass and its HTML (text, figures, tables).

Everything the caller supplies is HTML-escaped. Text takes a tiny markdown subset
(blank-line paragraphs, `` `code` `` spans, ``**bold**``); floats in tables are shown to
3 significant digits; an empty figure, table or section shows a "No data" box instead.
:class:`~piggyback_interp.report.html.Report` lays the sections out on the page.

Example:
    >>> import pandas as pd
    >>> html = section_html(Section("Sweep", tables=[("T", pd.DataFrame({"x": [0.12345]}))]), "s1", 0)
    >>> "0.123" in html, html.startswith('<section id="s1">')
    (True, True)
"""

from __future__ import annotations

import html
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from piggyback_interp.core.display import format_value

_NUM = ' class="num"'
_FIGURE_CONFIG = {"responsive": True, "displaylogo": False}
# trace properties that hold a trace's data; a figure whose traces hold none is empty
_DATA_KEYS = (
    "x",
    "y",
    "z",
    "values",
    "labels",
    "r",
    "theta",
    "lat",
    "lon",
    "locations",
    "a",
    "b",
    "source",
    "dimensions",
    "cells",
    "node",
    "open",
    "close",
    "value",
)


@dataclass
class Section:
    """One part of a report: a finding, explanatory text, figures and tables.

    ``text``: plain text with blank-line paragraphs, `` `code` `` spans and ``**bold**``.
    ``tables``: ``(caption, frame)`` pairs; floats are shown to 3 significant digits,
    the index only when it is named or not the default ``0..n-1``.
    ``finding``: the one-sentence result, shown highlighted at the top of the section.
    """

    title: str
    text: str = ""
    figures: Sequence[go.Figure] = ()
    tables: Sequence[tuple[str, pd.DataFrame]] = ()
    finding: str | None = None


# ---------------------------------------------------------------- text


def escape(text: object) -> str:
    """``text`` as HTML text (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def inline_markdown(text: str) -> str:
    """Escape ``text``; `` `code` `` spans and ``**bold**`` (outside code) become markup."""
    parts = re.split(r"`([^`\n]+)`", text)
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append(f"<code>{escape(part)}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(part), flags=re.S))
    return "".join(out)


def markdown_html(text: str) -> str:
    """The report's markdown subset as HTML: blank-line paragraphs, `` `code` ``, ``**bold**``;
    everything else is escaped.

    Example:
        >>> markdown_html("A **bold** `x<y` claim.\\n\\n<script>")
        '<p>A <strong>bold</strong> <code>x&lt;y</code> claim.</p>\\n<p>&lt;script&gt;</p>'
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return "\n".join(f"<p>{inline_markdown(p)}</p>" for p in paragraphs)


# ---------------------------------------------------------------- sections


def no_data_html(what: str) -> str:
    return f'<div class="no-data">No data: {escape(what)}</div>'


def _nonempty(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, (str, bytes, Mapping)):
        return len(value) > 0
    try:
        return len(value) > 0  # type: ignore[arg-type]
    except TypeError:  # a scalar (an indicator's value)
        return True


def figure_has_data(fig: go.Figure) -> bool:
    """False for a figure with no traces, or whose traces hold no data (``x``, ``y``,
    ``z``, ``values``, ...).

    Example:
        >>> figure_has_data(go.Figure()), figure_has_data(go.Figure(go.Bar(y=[])))
        (False, False)
        >>> figure_has_data(go.Figure(go.Bar(y=[1])))
        True
    """
    for trace in fig.data:
        props = trace.to_plotly_json()
        if any(_nonempty(props.get(key)) for key in _DATA_KEYS):
            return True
    return False


def _figure_title(fig: go.Figure) -> str:
    text = fig.layout.title.text if fig.layout.title is not None else None
    return re.sub(r"<[^>]*>", " ", text).strip() if text else ""


def _figure(fig: go.Figure, div_id: str) -> str:
    if not isinstance(fig, go.Figure):
        raise ValueError(f"Section.figures takes plotly Figures, got {type(fig).__name__}")
    if not figure_has_data(fig):
        title = _figure_title(fig)
        return no_data_html(
            f"the figure {title!r} has nothing to plot" if title else "empty figure"
        )
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=_FIGURE_CONFIG)
    return f'<figure class="plot">{div}</figure>'


def _format_cell(value: object) -> tuple[str, bool]:
    """A cell's text and whether it is numeric (right-aligned)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "—", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, numbers.Real):
        return format_value(value), True
    return str(value), False


def _label(value: object) -> str:
    if isinstance(value, tuple):
        return " / ".join(str(v) for v in value if str(v))
    return str(value)


def _meaningful_index(index: pd.Index) -> bool:
    if any(name is not None for name in index.names):
        return True
    return not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1)


def _table(caption: str, frame: pd.DataFrame) -> str:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"Section.tables takes (caption, DataFrame), got {type(frame).__name__}")
    cap = f"<figcaption>{inline_markdown(caption)}</figcaption>" if caption else ""
    if len(frame) == 0 or len(frame.columns) == 0:
        return f'<figure class="table">{cap}{no_data_html("the table has no rows")}</figure>'
    show_index = _meaningful_index(frame.index)
    index_names = [_label(n) if n is not None else "" for n in frame.index.names]
    head = [f'<th scope="col">{escape(n)}</th>' for n in index_names] if show_index else []
    for col in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[col]) and not pd.api.types.is_bool_dtype(
            frame[col]
        )
        head.append(f'<th scope="col"{_NUM if numeric else ""}>{escape(_label(col))}</th>')
    rows = []
    for idx, row in zip(frame.index, frame.itertuples(index=False, name=None), strict=True):
        cells = []
        if show_index:
            keys = idx if isinstance(idx, tuple) else (idx,)
            cells += [f'<th scope="row">{escape(_format_cell(k)[0])}</th>' for k in keys]
        for value in row:
            text, numeric = _format_cell(value)
            cells.append(f"<td{_NUM if numeric else ''}>{escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<figure class="table">{cap}<div class="table-wrap"><table>'
        f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody>"
        "</table></div></figure>"
    )


def section_html(section: Section, sid: str, number: int) -> str:
    parts = [f'<section id="{sid}">', f"<h2>{escape(section.title)}</h2>"]
    if section.finding:
        parts.append(f'<p class="finding">{inline_markdown(section.finding)}</p>')
    if section.text.strip():
        parts.append(f'<div class="text">{markdown_html(section.text)}</div>')
    for k, fig in enumerate(section.figures):
        parts.append(_figure(fig, f"fig-{number + 1}-{k + 1}"))
    for caption, frame in section.tables:
        parts.append(_table(caption, frame))
    if len(parts) == 2:
        parts.append(no_data_html("this section has no content"))
    parts.append("</section>")
    return "\n".join(parts)


__all__ = [
    "Section",
    "escape",
    "figure_has_data",
    "inline_markdown",
    "markdown_html",
    "no_data_html",
    "section_html",
]
