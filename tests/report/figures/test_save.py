"""Saving figures: standalone offline HTML, a real PNG where kaleido 0.2.1 is installed,
a warning where it is not."""

import doctest
import re

import plotly.graph_objects as go
import pytest

from piggyback_interp.report.figures import patching_heatmap, png_stats, save_figure
from piggyback_interp.report.figures import save as figure_save


def test_save_figure_html_is_standalone_and_png_is_a_real_image(tmp_path, sweep_result):
    fig = patching_heatmap(sweep_result[0])
    paths = save_figure(fig, tmp_path / "heatmap.html", width=360, height=240)
    assert [p.name for p in paths] == ["heatmap.html", "heatmap.png"]
    html = paths[0].read_text("utf-8")
    assert len(html) > 3_000_000 and 'src="https://cdn.plot.ly' not in html
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js inline, nothing fetched
    assert '"1 system"' in html and "piggyback-heatmap" in html  # its own data and div
    stats = png_stats(paths[1].read_bytes())
    assert (stats["width"], stats["height"]) == (360, 240)
    assert stats["std"] > 5 and stats["non_background"] > 0.1 and stats["colours"] > 20


def test_save_figure_without_static_export_writes_html_and_warns(tmp_path, monkeypatch):
    fig = go.Figure(go.Bar(y=[1, 2]))
    assert save_figure(fig, tmp_path / "a", png=False) == [tmp_path / "a.html"]
    monkeypatch.setattr(figure_save, "kaleido_legacy_available", lambda: False)

    def no_chrome(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed")

    monkeypatch.setattr(go.Figure, "to_image", no_chrome)
    with pytest.warns(RuntimeWarning, match="kaleido 0.2.1"):
        assert save_figure(fig, tmp_path / "b") == [tmp_path / "b.html"]
    with pytest.raises(RuntimeError, match="no offline PNG export"):
        save_figure(fig, tmp_path / "c", png=True)
    with pytest.raises((ValueError, TypeError), match="Figure"):
        save_figure({"data": []}, tmp_path / "d")


def test_doctests():
    result = doctest.testmod(figure_save, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
