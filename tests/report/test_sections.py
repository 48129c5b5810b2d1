"""A report's sections: escaped markdown text, figures (or "No data"), number tables."""

from __future__ import annotations

import doctest
import re

import pandas as pd
import plotly.graph_objects as go

import piggyback_interp.report.sections as sections_module
from piggyback_interp.report.sections import Section, figure_has_data, markdown_html, section_html


def _html(section: Section) -> str:
    return section_html(section, "s1", 0)


def test_markdown_subset():
    assert markdown_html("a **b** `c**d**` <e>\n\n\n  second  ") == (
        "<p>a <strong>b</strong> <code>c**d**</code> &lt;e&gt;</p>\n<p>second</p>"
    )
    assert markdown_html("") == ""


def test_empty_figure_table_and_section_show_no_data():
    empty_table = pd.DataFrame({"a": pd.Series([], dtype=float)})
    no_points = go.Figure(go.Scatter(x=[], y=[]))
    no_points.update_layout(title="Cosines")
    html = _html(
        Section("Empty", figures=[go.Figure(), no_points], tables=[("Nothing", empty_table)])
    )
    assert 'class="plotly-graph-div"' not in html
    assert "No data: empty figure" in html and "No data: the figure &#x27;Cosines&#x27;" in html
    assert "No data: the table has no rows" in html
    assert "No data: this section has no content" in _html(Section("Blank"))
    assert not figure_has_data(no_points) and figure_has_data(go.Figure(go.Bar(y=[1])))
    plotted = _html(Section("One", figures=[go.Figure(go.Bar(y=[1]))]))
    assert plotted.count('class="plotly-graph-div"') == 1 and 'id="fig-1-1"' in plotted


def test_table_numbers_and_index():
    frame = pd.DataFrame({"v": [0.123456, 12345.6, float("nan"), 2e-7], "k": [1, 2, 3, 4]})
    table = re.findall(r"<table>.*?</table>", _html(Section("T", tables=[("plain", frame)])), re.S)[
        0
    ]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table)
    assert cells == ["0.123", "1", "12,300", "2", "—", "3", "2e-07", "4"]
    assert '<th scope="row">' not in table  # the default 0..n-1 index is hidden
    named = _html(Section("T", tables=[("named", frame.set_index("k"))]))
    table = re.findall(r"<table>.*?</table>", named, re.S)[0]
    assert '<th scope="col">k</th>' in table and '<th scope="row">1</th>' in table


def test_doctests():
    result = doctest.testmod(sections_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
