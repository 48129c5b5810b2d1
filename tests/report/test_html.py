"""The one-page HTML report: self-contained, escaped, deterministic, and it plots offline."""

from __future__ import annotations

import doctest
import re

import pandas as pd
import plotly.graph_objects as go
import pytest

import piggyback_interp.core.provenance as provenance_module
import piggyback_interp.report.html as report_module
from piggyback_interp.report.figures.save import plotlyjs_path, save_figure
from piggyback_interp.report.html import Report
from piggyback_interp.report.sections import Section

EVIL = "<script>alert('x')</script>"


def _figures() -> list[go.Figure]:
    line = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.1, 0.7, 0.9], name="prefix"))
    line.update_layout(title="Recovery per layer", template="plotly_white")
    bars = go.Figure(go.Bar(x=["sft", "treft"], y=[0.9, 0.2]))
    bars.update_layout(title="Abstention", template="plotly_white")
    return [line, bars]


def _report(**overrides: object) -> Report:
    table = pd.DataFrame({"method": ["sft", "treft"], "rate": [0.987654, 0.0123456], "n": [8, 8]})
    fields = {
        "title": "Prefix patching",
        "verdict": "The prefix carries the finetuned behaviour",
        "verdict_detail": "Patching `resid_pre` at the **prefix** restores it.\n\nOne seed.",
        "sections": [
            Section(
                "Layer sweep",
                text="What we patch.\n\nWhat it shows.",
                figures=_figures(),
                finding="Most of it comes back at layer 1.",
            ),
            Section("Method comparison", tables=[("Table 5", table)]),
        ],
        "provenance": {
            "created": "2026-05-02 14:03 UTC",
            "model": {"name": "tiny", "display_name": "Tiny Llama", "sha256": "ab" * 32},
            "config": {"seeds": [0, 1], "lr": 0.001},
            "machine": {"cpus": 2, "processor": "x86_64", "gpu": None},
        },
        "wall_seconds": 723.4,
    }
    fields.update(overrides)
    return Report(**fields)


def _without_plotlyjs(page: str) -> str:
    plotlyjs = plotlyjs_path().read_text("utf-8")
    assert page.count(plotlyjs) == 1
    return page.replace(plotlyjs, "")


def test_user_text_is_escaped_everywhere():
    frame = pd.DataFrame({EVIL: [EVIL], "x": [1.0]})
    page = _report(
        title=EVIL,
        verdict=EVIL,
        verdict_detail=EVIL,
        sections=[Section(EVIL, text=f"`{EVIL}` and {EVIL}", finding=EVIL, tables=[(EVIL, frame)])],
        provenance={EVIL: EVIL, "nested": {EVIL: [EVIL]}},
    ).to_html()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert f"<title>{EVIL}" not in page and "<code>&lt;script&gt;" in page


def test_plotlyjs_inlined_once_and_nothing_loaded_from_the_network():
    page = _report().to_html()
    rest = _without_plotlyjs(page)
    assert "plotly.js v" not in rest  # the one copy is the only one
    assert not re.search(r"<script[^>]*\ssrc=", rest, re.I)
    assert not re.search(r"<link\b", rest, re.I)
    attrs = re.findall(r"\b(?:src|href)\s*=\s*[\"']?([^\"'\s>]*)", rest, re.I)
    assert attrs and all(a.startswith("#") for a in attrs), attrs
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", rest, re.I)
    assert "@import" not in rest and "url(" not in rest
    assert rest.count('class="plotly-graph-div"') == 2


def test_toc_links_match_section_ids():
    page = _report(
        sections=[Section("Same"), Section("Same"), Section("Ünïcode & more!")]
    ).to_html()
    links = re.findall(r'<nav class="toc">.*?</nav>', page, re.S)[0]
    targets = re.findall(r'href="#([^"]+)"', links)
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert targets == ids and len(set(ids)) == len(ids) == 4
    assert ids[-1] == "provenance"


def test_header_shows_wall_time_machine_when_and_model():
    page = _report().to_html()
    header = re.findall(r"<header>.*?</header>", page, re.S)[0]
    assert "12 min 3 s" in header and "2 CPU cores (x86_64)" in header
    assert "2026-05-02 14:03 UTC" in header and "Tiny Llama" in header
    assert "The prefix carries the finetuned behaviour" in header
    assert "<details><summary>Full provenance (JSON)</summary>" in page
    assert "abababab" in page  # the hash is in the key/value table and the JSON
    scan = _report(
        provenance={"models": {"base": {"name": "A"}, "finetuned": {"name": "B"}}},
        wall_seconds=45,
    ).to_html()
    header = re.findall(r"<header>.*?</header>", scan, re.S)[0]
    assert "models <strong>base: A, finetuned: B</strong>" in header and "45 s" in header


def test_empty_sections_and_provenance_show_no_data():
    page = _report(sections=[Section("Empty", figures=[go.Figure()])], provenance={}).to_html()
    rest = _without_plotlyjs(page)
    assert 'class="plotly-graph-div"' not in rest and "No data: empty figure" in rest
    assert "No data: none recorded" in rest


def test_to_html_is_deterministic():
    assert _report().to_html() == _report().to_html()
    report = _report()
    assert report.to_html() == report.to_html()


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "runs" / "demo" / "report.html"
    report = _report()
    assert report.save(target) == target
    assert target.read_text("utf-8") == report.to_html()
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(provenance_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        _report(title="a new title").save(target)
    assert target.read_text("utf-8") == report.to_html()  # the old page, whole


def test_saved_report_plots_every_figure_in_headless_chromium(tmp_path):
    """As a reader would: the page opened offline, both graphs plotted, no page errors."""
    pytest.importorskip("kaleido")
    from piggyback_interp.report.figures import check_html_renders

    path = _report().save(tmp_path / "report.html")
    single = save_figure(_figures()[0], tmp_path / "single", png=False)[0]
    reports = check_html_renders([path, single], width=600, height=350, expect_graphs=2)
    page, one = reports
    assert page["ok"], page
    assert page["errors"] == [] and page["external_scripts"] == []
    assert page["graph_divs"] == 2 and [g["id"] for g in page["graphs"]] == ["fig-1-1", "fig-1-2"]
    assert [g["traces"] for g in page["graphs"]] == [["scatter"], ["bar"]]
    assert "Abstention" in page["graphs"][1]["texts"]
    assert all(g["png"]["non_background"] > 0.01 for g in page["graphs"])
    assert not one["ok"] and one["graph_divs"] == 1  # a page with one graph, two expected


def test_doctests():
    result = doctest.testmod(report_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
