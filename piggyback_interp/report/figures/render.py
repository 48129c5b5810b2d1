"""Check saved HTML figures the way a user sees them: opened in a headless browser.

:func:`check_html_renders` starts kaleido 0.2.1's bundled headless Chromium once and
loads every saved HTML file in it as a whole document (an iframe's ``srcdoc``: the
file's own markup, its inline plotly.js and its own ``Plotly.newPlot`` call). The only
additions are one script at the top of ``<head>`` that records page errors and a
Content-Security-Policy that blocks every network load (so a file that needs a CDN
fails). Once every graph of the page has plotted (a figure file has one, a report
several), it reads the live DOM of each (trace types, every text node: tick labels,
titles, annotations) and exports each plotted div to PNG with the page's own
``Plotly.toImage``, with pixel statistics computed in the browser.

(kaleido 0.2.1 offers no navigation or DevTools of its own; it loads one page and
evaluates its plotly scope there. The check is the loader script given to kaleido as
its "plotly.js": it defines ``Plotly.toImage`` to run the checks above and answer with a
JSON report. kaleido loses its page's context once the page has iframes, so all files
are checked in one request, and the Chromium is stopped afterwards.)
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from piggyback_interp.report.figures.save import kaleido_legacy_available

_LOADER = r"""
(function () {
  var FILES = __FILES__, W = __W__, H = __H__, WAIT_MS = __WAIT__;
  var GRACE_MS = Math.min(WAIT_MS, 10000);
  var HEAD = '\x3cmeta http-equiv="Content-Security-Policy" content="default-src \'none\'; ' +
    'script-src \'unsafe-inline\' \'unsafe-eval\'; style-src \'unsafe-inline\'; img-src data: blob:; ' +
    'font-src data:">' +
    '\x3cscript>window.__pgErrors = [];' +
    'window.addEventListener("error", function (e) { var t = e.target || {};' +
    ' window.__pgErrors.push(t.src || t.href ? "failed to load " + (t.src || t.href)' +
    ' : "error: " + (e.message || e)); }, true);' +
    'window.addEventListener("securitypolicyviolation", function (e) {' +
    ' window.__pgErrors.push("blocked network load: " + e.blockedURI); });' +
    '\x3c/script>';
  function waitFor(cond, ms) {
    var t0 = Date.now();
    return new Promise(function (resolve, reject) {
      (function poll() {
        var v = null;
        try { v = cond(); } catch (e) { return reject(e); }
        if (v) return resolve(v);
        if (Date.now() - t0 > ms) return reject(new Error("timed out after " + ms + " ms"));
        setTimeout(poll, 25);
      })();
    });
  }
  function pixelStats(url) {
    return new Promise(function (resolve, reject) {
      var img = new Image();
      img.onload = function () {
        var c = document.createElement("canvas");
        c.width = img.width; c.height = img.height;
        var ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0);
        var d = ctx.getImageData(0, 0, c.width, c.height).data, n = c.width * c.height;
        var s = 0, s2 = 0, diff = 0, colours = {};
        for (var p = 0; p < d.length; p += 4) {
          var y = 0.299 * d[p] + 0.587 * d[p + 1] + 0.114 * d[p + 2];
          s += y; s2 += y * y;
          if (d[p] !== d[0] || d[p + 1] !== d[1] || d[p + 2] !== d[2]) diff++;
          colours[(d[p] << 16) | (d[p + 1] << 8) | d[p + 2]] = 1;
        }
        var mean = s / n;
        resolve({width: c.width, height: c.height, mean: mean,
                 std: Math.sqrt(Math.max(0, s2 / n - mean * mean)),
                 non_background: diff / n, colours: Object.keys(colours).length});
      };
      img.onerror = function () { reject(new Error("the exported PNG does not decode")); };
      img.src = url;
    });
  }
  function check(frame) {
    var win = null, doc = null;
    function plotted(gd) { return gd._fullLayout && gd._fullData && gd.querySelector(".main-svg"); }
    function describe(gd) {
      var graph = {
        id: gd.id || null,
        traces: gd._fullData.map(function (t) { return t.type; }),
        page_size: [gd._fullLayout.width, gd._fullLayout.height],
        texts: Array.prototype.map.call(gd.querySelectorAll("text"), function (t) { return t.textContent; })
      };
      return win.Plotly.toImage(gd, {format: "png", width: W, height: H}).then(function (url) {
        return pixelStats(url).then(function (stats) { graph.png = stats; graph.png_data = url; return graph; });
      });
    }
    return frame.loaded.then(function () {
      win = frame.iframe.contentWindow; doc = win.document;
      // "load" fires after every script of the page ran: no Plotly now means none ever
      if (!win.Plotly) throw new Error("plotly.js is not defined in the page");
      var loadedAt = Date.now();
      return waitFor(function () {
        if ((win.__pgErrors || []).length && Date.now() - loadedAt > 3000) throw new Error("page errors");
        var all = Array.prototype.slice.call(doc.querySelectorAll(".plotly-graph-div"));
        var done = all.filter(plotted);
        // every graph plotted; or, after a grace period, the ones that did (the rest are
        // reported as not plotted)
        if (done.length && (done.length === all.length || Date.now() - loadedAt > GRACE_MS)) return done;
        return null;
      }, WAIT_MS).catch(function (e) {
        throw new Error("no plotted graph in the page (" + e.message + ")");
      });
    }).then(function (gds) {
      // plotly draws titles, annotations and margins in later ticks: wait until the DOM
      // of the graphs has not changed for 400 ms
      var last = "", since = Date.now();
      return waitFor(function () {
        var now = gds.map(function (gd) {
          return gd.getElementsByTagName("*").length + ":" + gd.textContent.length;
        }).join("|");
        if (now !== last) { last = now; since = Date.now(); }
        return Date.now() - since >= 400 ? gds : null;
      }, WAIT_MS);
    }).then(function (gds) {
      var report = {
        errors: (win.__pgErrors || []).slice(),
        plotly_version: win.Plotly ? win.Plotly.version : null,
        graph_divs: doc.querySelectorAll(".plotly-graph-div").length,
        external_scripts: Array.prototype.map.call(doc.querySelectorAll("script[src]"), function (s) { return s.src; })
      };
      // one graph at a time: each export clones the graph into the page
      return gds.reduce(function (chain, gd) {
        return chain.then(function (graphs) {
          return describe(gd).then(function (g) { return graphs.concat([g]); });
        });
      }, Promise.resolve([])).then(function (graphs) { report.graphs = graphs; return report; });
    }).catch(function (e) {
      return {errors: ((win && win.__pgErrors) || []).concat(["check failed: " + (e && e.message || e)])};
    });
  }
  function checkAll() {
    var frames = FILES.map(function (html) {
      var iframe = document.createElement("iframe");
      iframe.style.cssText = "width:" + W + "px;height:" + H + "px;border:0;display:block;";
      var loaded = new Promise(function (resolve) { iframe.addEventListener("load", resolve); });
      var m = /<head[^>]*>/i.exec(html);
      iframe.srcdoc = m ? html.slice(0, m.index + m[0].length) + HEAD + html.slice(m.index + m[0].length)
                        : HEAD + html;
      document.body.appendChild(iframe);
      return {iframe: iframe, loaded: loaded};
    });
    return Promise.all(frames.map(check)).then(function (reports) { return JSON.stringify(reports); });
  }
  window.Plotly = {version: "3.0.0", purge: function () {}, toImage: function () { return checkAll(); }};
})();
"""


_FIRST_GRAPH = ("traces", "page_size", "texts", "png", "rendered_png")


def _graph_ok(graph: dict[str, Any]) -> bool:
    png = graph.get("png") or {}
    return (
        bool(graph.get("traces"))
        and png.get("std", 0.0) > 1.0
        and png.get("non_background", 0.0) > 0.01
    )


def _verdict(report: dict[str, Any], expect_graphs: int | None) -> bool:
    graphs = report.get("graphs") or []
    divs = report.get("graph_divs") or 0
    count_ok = divs >= 1 if expect_graphs is None else divs == expect_graphs
    return (
        not report.get("errors")
        and count_ok
        and len(graphs) == divs
        and not report.get("external_scripts")
        and all(_graph_ok(g) for g in graphs)
    )


def _stop(scope: Any) -> None:
    """Stop kaleido's Chromium and close the pipes kaleido 0.2.1 leaves open."""
    proc = scope._proc
    scope._shutdown_kaleido()
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    reader = getattr(scope, "_std_error_thread", None)
    if reader is not None:
        reader.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None and not (reader is not None and reader.is_alive()):
            pipe.close()


def check_html_renders(
    paths: Sequence[str | os.PathLike[str]],
    *,
    width: int = 900,
    height: int = 500,
    png_dir: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
    expect_graphs: int | None = 1,
) -> list[dict[str, Any]]:
    """Open each saved HTML file in headless Chromium and report how it rendered.

    One report per file: ``path``, ``ok`` (no page error or blocked network load, the
    expected number of graphs, every one plotted with at least one trace and a non-blank
    PNG, no external script), ``errors``, ``plotly_version`` (of the file's own
    plotly.js), ``graph_divs`` (graphs in the page), and ``graphs``: one entry per plotted
    graph with its ``id``, ``traces`` (types), ``texts`` (every text node of the graph:
    tick labels, titles, annotations), ``page_size`` and ``png`` (width, height, mean/std
    of luminance, fraction of non-background pixels, distinct colours) of the graph
    exported at ``width`` x ``height``. ``traces``, ``texts``, ``page_size`` and ``png``
    are also given at the top level for the first graph.

    ``expect_graphs``: how many graphs each page must plot (a figure file: 1; a page
    with several figures, such as a :class:`~piggyback_interp.report.html.Report`: their
    number); ``None``: at least one. ``png_dir``: also write each graph's rendered PNG
    there as ``<name>.rendered.png`` (the first graph) and ``<name>.rendered-<k>.png``.

    Needs kaleido 0.2.1 (the ``png`` extra); raises ``RuntimeError`` without it.
    """
    if expect_graphs is not None and expect_graphs < 1:
        raise ValueError(f"expect_graphs must be at least 1 or None, got {expect_graphs}")
    if not kaleido_legacy_available():
        raise RuntimeError(
            "the render check needs kaleido 0.2.1: pip install 'piggyback-interp[png]'"
        )
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("pass at least one HTML file")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"no such file: {p}")
    reports = _browse([p.read_text("utf-8") for p in paths], width, height, timeout)
    out = []
    for path, report in zip(paths, reports, strict=True):
        graphs = report.get("graphs") or []
        for k, graph in enumerate(graphs):
            data_url = graph.pop("png_data", None)
            if png_dir is not None and data_url:
                suffix = "rendered" if k == 0 else f"rendered-{k + 1}"
                graph["rendered_png"] = str(
                    _write_png(Path(png_dir) / f"{path.stem}.{suffix}.png", data_url)
                )
        first = {key: graphs[0][key] for key in _FIRST_GRAPH if graphs and key in graphs[0]}
        out.append({"path": str(path), "ok": _verdict(report, expect_graphs), **report, **first})
    return out


def _browse(htmls: list[str], width: int, height: int, timeout: float) -> list[dict[str, Any]]:
    """The loader's raw JSON report per page: all pages checked in one kaleido request,
    its Chromium stopped afterwards (kaleido loses its page context after the iframes)."""
    from kaleido.scopes.plotly import PlotlyScope

    files = json.dumps(htmls).replace("<", "\\u003c")  # safe inside an inline <script>
    loader = (
        _LOADER.replace("__FILES__", files)
        .replace("__W__", str(int(width)))
        .replace("__H__", str(int(height)))
        .replace("__WAIT__", str(int(timeout * 1000 * 0.8)))
    )
    with tempfile.TemporaryDirectory(prefix="piggyback-render-") as tmp:
        loader_path = Path(tmp) / "render_check.js"
        loader_path.write_text(loader, "utf-8")
        scope = PlotlyScope(plotlyjs=str(loader_path), mathjax=False)
        answer: dict[str, Any] = {}

        def run() -> None:
            try:
                with warnings.catch_warnings():  # kaleido 0.2.1 calls Thread.setDaemon
                    warnings.filterwarnings("ignore", "setDaemon", DeprecationWarning)
                    answer["out"] = scope.transform({"data": [], "layout": {}}, format="svg")
            except Exception as exc:
                answer["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout)
        _stop(scope)  # its page context is gone after the iframes anyway
        if worker.is_alive():
            raise TimeoutError(f"the headless browser did not answer within {timeout} s")
        if "error" in answer:
            raise RuntimeError(f"the headless browser failed: {answer['error']}")
    return json.loads(answer["out"].decode("utf-8"))


def _write_png(target: Path, data_url: str) -> Path:
    """Write a ``data:image/png;base64,...`` URL's bytes to ``target`` atomically."""
    import base64

    from piggyback_interp.core.io import atomic_write_bytes

    return atomic_write_bytes(target, base64.b64decode(data_url.split(",", 1)[1]))


# ---------------------------------------------------------------- PNG files


def png_pixels(data: bytes) -> np.ndarray:
    """Decode a PNG into ``[height, width, 4]`` RGBA uint8 (with Pillow)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"not a PNG file ({image.format})")
            return np.asarray(image.convert("RGBA"))
    except UnidentifiedImageError as err:
        raise ValueError("not a PNG file (Pillow cannot read it)") from err


def png_stats(data: bytes) -> dict[str, float | int]:
    """Size and pixel statistics of a PNG: ``width``, ``height``, ``std`` of luminance,
    ``non_background`` (fraction of pixels unlike the top-left one), ``colours``."""
    px = png_pixels(data)
    rgb = px[..., :3] if px.shape[2] >= 3 else np.repeat(px[..., :1], 3, axis=2)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    flat = rgb.reshape(-1, 3)
    return {
        "width": int(px.shape[1]),
        "height": int(px.shape[0]),
        "mean": float(lum.mean()),
        "std": float(lum.std()),
        "non_background": float((flat != flat[0]).any(axis=1).mean()),
        "colours": len(np.unique(flat.astype(np.int64) @ np.array([65536, 256, 1]))),
    }


__all__ = ["check_html_renders", "png_pixels", "png_stats"]
