"""Saving figures: standalone offline HTML always, PNG through kaleido 0.2.1's Chromium.

plotly 7's own ``fig.to_image`` needs kaleido >= 1, which drives a separately installed
Chrome (none offline). kaleido 0.2.1 ships its own headless Chromium; given plotly's
bundled ``plotly.min.js`` (its default is a CDN URL, which fails offline with "Failed to
serialize document") it renders plotly 7 figures with no network. It is optional: the
``png`` extra (``pip install 'piggyback-interp[png]'``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go

from piggyback_interp.core.io import atomic_write_bytes, atomic_write_text

DEFAULT_SIZE = (900, 500)


def plotlyjs_path() -> Path:
    """The ``plotly.min.js`` that ships inside the installed plotly package."""
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is not at {path}; reinstall plotly")
    return path


def kaleido_legacy_available() -> bool:
    """True when kaleido 0.2.1 (with its bundled Chromium: ``kaleido.scopes``) is installed."""
    try:
        return importlib.util.find_spec("kaleido.scopes.plotly") is not None
    except ModuleNotFoundError:
        return False


@functools.lru_cache(maxsize=1)
def _png_scope() -> Any:
    """One kaleido 0.2.1 Chromium for the process (started on the first export)."""
    from kaleido.scopes.plotly import PlotlyScope

    return PlotlyScope(plotlyjs=str(plotlyjs_path()), mathjax=False)


def _size(fig: go.Figure, width: int | None, height: int | None) -> tuple[int, int]:
    return (
        int(width or fig.layout.width or DEFAULT_SIZE[0]),
        int(height or fig.layout.height or DEFAULT_SIZE[1]),
    )


def figure_png(
    fig: go.Figure, *, width: int | None = None, height: int | None = None, scale: float = 1.0
) -> bytes:
    """The figure as PNG bytes, offline: kaleido 0.2.1's bundled Chromium running plotly's
    own plotly.js; without kaleido 0.2.1, plotly's ``to_image`` (kaleido >= 1 and a Chrome).

    Size: ``width``/``height``, else the figure's layout, else 900 x 500 pixels.
    Raises ``RuntimeError`` when no static export works here.
    """
    w, h = _size(fig, width, height)
    if kaleido_legacy_available():
        try:
            with warnings.catch_warnings():  # kaleido 0.2.1 calls Thread.setDaemon
                warnings.filterwarnings("ignore", "setDaemon", DeprecationWarning)
                return _png_scope().transform(
                    fig.to_dict(), format="png", width=w, height=h, scale=scale
                )
        except Exception as exc:  # a broken Chromium: say so, the HTML is still written
            raise RuntimeError(f"kaleido 0.2.1 could not render the PNG: {exc}") from exc
    try:
        return fig.to_image(format="png", width=w, height=h, scale=scale)
    except Exception as exc:
        raise RuntimeError(
            "no offline PNG export: install kaleido 0.2.1 (pip install 'piggyback-interp[png]', "
            f"it bundles Chromium) or kaleido>=1 with a Chrome; plotly said: {exc}"
        ) from exc


def save_figure(
    fig: go.Figure,
    path: str | os.PathLike[str],
    *,
    png: bool | None = None,
    width: int | None = None,
    height: int | None = None,
    scale: float = 1.0,
) -> list[Path]:
    """Write ``<path>.html`` (standalone: plotly.js inline, no CDN, opens offline) and,
    where a static export works, ``<path>.png``. Returns the written paths.

    ``path``: a name with or without ``.html`` / ``.png``. ``png=None``: write the PNG
    if possible, else warn and skip it; ``True``: raise if it fails; ``False``: HTML only.
    Both files are written atomically (temporary file + rename).

    Example:
        >>> import tempfile, plotly.graph_objects as go
        >>> out = tempfile.mkdtemp()
        >>> paths = save_figure(go.Figure(go.Bar(y=[1, 2])), f"{out}/bars", png=False)
        >>> [p.name for p in paths]
        ['bars.html']
    """
    if not isinstance(fig, go.Figure):
        raise ValueError(f"save_figure takes a plotly Figure, got {type(fig).__name__}")
    path = Path(path)
    base = path.with_suffix("") if path.suffix.lower() in (".html", ".htm", ".png") else path
    html_path = base.with_name(base.name + ".html")
    div_id = "piggyback-" + (re.sub(r"[^A-Za-z0-9_-]", "-", base.name) or "figure")
    html = fig.to_html(
        include_plotlyjs=True,
        full_html=True,
        div_id=div_id,
        config={"responsive": True, "displaylogo": False},
    )
    written = [atomic_write_text(html_path, html)]
    if png is False:
        return written
    try:
        data = figure_png(fig, width=width, height=height, scale=scale)
    except RuntimeError as exc:
        if png:
            raise
        warnings.warn(f"{exc}; wrote {html_path.name} only", RuntimeWarning, stacklevel=2)
        return written
    png_path = base.with_name(base.name + ".png")
    atomic_write_bytes(png_path, data)
    return [*written, png_path]


__all__ = ["figure_png", "kaleido_legacy_available", "plotlyjs_path", "save_figure"]
