"""Saved figures opened in headless Chromium: each plots with its own plotly.js; a page
that needs a CDN is blocked."""

from piggyback_interp.report.figures import check_html_renders, save_figure


def test_saved_html_renders_in_headless_chromium(tmp_path, all_figures):
    """As a user would: each saved file opened in a browser, its own plotly.js plotting it."""
    paths = [save_figure(fig, tmp_path / name, png=False)[0] for name, fig in all_figures.items()]
    cdn = tmp_path / "needs_cdn.html"
    all_figures["bars"].write_html(cdn, include_plotlyjs="cdn")
    reports = {r["path"]: r for r in check_html_renders([*paths, cdn], width=500, height=350)}
    for path in paths:
        report = reports[str(path)]
        assert report["ok"], report
        assert report["plotly_version"].split(".")[0] >= "3" and report["png"]["std"] > 5
    texts = reports[str(tmp_path / "heatmap.html")]["texts"]
    assert "0 <|im_start|>" in texts and {"prefix", "query", "postfix"} <= set(texts)
    assert reports[str(tmp_path / "training.html")]["traces"] == ["scatter", "scatter", "heatmap"]
    blocked = reports[str(cdn)]
    assert not blocked["ok"] and any("cdn.plot.ly" in e for e in blocked["errors"]), blocked
