"""A one-page HTML report of an experiment: verdict, sections of figures and tables, provenance.

The page is one self-contained file: plotly.js (the copy inside the installed plotly
package) is inlined once, every figure is an embedded plotly div, the CSS is inline, and
nothing is loaded from the network, so it opens offline. This module lays out the page
(header, contents, provenance, CSS); :mod:`piggyback_interp.report.sections` holds
:class:`~piggyback_interp.report.sections.Section` and renders each one (escaped text in
a tiny markdown subset, figures, tables). The page is a pure function of its input:
timestamps belong in ``provenance`` (``created``, ``finished`` or ``started``).

Example:
    >>> import tempfile, pandas as pd, plotly.graph_objects as go
    >>> report = Report(
    ...     title="Prefix patching",
    ...     verdict="The prefix carries the finetuned behaviour",
    ...     sections=[
    ...         Section(
    ...             "Layer sweep",
    ...             text="Patch the **prefix** of `resid_pre` from the base model.",
    ...             figures=[go.Figure(go.Scatter(y=[0.1, 0.8, 0.9]))],
    ...             tables=[("Recovery", pd.DataFrame({"layer": [0, 1], "recovery": [0.12345, 0.9]}))],
    ...             finding="Patching the prefix at layer 1 restores 90% of the base behaviour.",
    ...         )
    ...     ],
    ...     provenance={"model": "smollm2-135m-instruct", "seed": 0},
    ...     wall_seconds=723.4,
    ... )
    >>> html = report.to_html()
    >>> html.count("plotly.js v"), "0.123" in html, "12 min 3 s" in html
    (1, True, True)
    >>> report.save(f"{tempfile.mkdtemp()}/report.html").name
    'report.html'
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from piggyback_interp.core.io import atomic_write_text
from piggyback_interp.report.figures.save import plotlyjs_path
from piggyback_interp.report.sections import (
    Section,
    escape,
    inline_markdown,
    markdown_html,
    no_data_html,
    section_html,
)

# keys of ``provenance`` shown in the header (the first one present wins)
_WHEN_KEYS = ("created", "finished", "started", "date", "timestamp", "when")
_MODEL_KEYS = ("model", "models", "model_name", "base_model", "base")


@dataclass
class Report:
    """A one-page, self-contained, offline HTML report (see the module docstring).

    ``provenance``: what produced the result (model names and hashes, config, seeds,
    versions, machine, when); shown at the end as a key/value table and as JSON. The
    header reads from it: the model (the first of ``model``, ``models``, ``model_name``,
    ``base_model``, ``base``, then ``config["model"]``: a name, a mapping with
    ``display_name``/``name``, or ``{label: model}``), ``machine`` (a string, or
    :func:`piggyback_interp.core.provenance.machine`'s mapping) and when (the first of
    ``created``, ``finished``, ``started``, ``date``, ``timestamp``).
    ``wall_seconds``: how long the experiment took, shown in the header.
    """

    title: str
    verdict: str
    verdict_detail: str = ""
    sections: Sequence[Section] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    wall_seconds: float | int | None = None

    def to_html(self) -> str:
        """The whole page as one HTML string (the same input gives the same string)."""
        ids = _section_ids([s.title for s in self.sections])
        body = [
            _header(self),
            _toc(self.sections, ids),
            *(
                section_html(s, sid, i)
                for i, (s, sid) in enumerate(zip(self.sections, ids, strict=True))
            ),
            _provenance(self.provenance),
            "<footer>Made with piggyback_interp. One self-contained file: it opens offline.</footer>",
        ]
        plotlyjs = plotlyjs_path().read_text("utf-8")
        if "</script" in plotlyjs.lower():  # would end the inline <script> early
            raise RuntimeError(f"{plotlyjs_path()} contains '</script' and cannot be inlined")
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(self.title)}</title>\n"
            f"<style>{_CSS}</style>\n"
            f'<script type="text/javascript">{plotlyjs}</script>\n'
            '</head>\n<body>\n<main class="page">\n'
            + "\n".join(body)
            + "\n</main>\n</body>\n</html>\n"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page to ``path`` atomically (temporary file + rename); returns the path."""
        return atomic_write_text(path, self.to_html())


def duration(seconds: float | int | None) -> str:
    """A wall time for a reader: ``"4.2 s"``, ``"37 s"``, ``"12 min 3 s"``, ``"2 h 5 min"``
    (``"unknown"`` for None).

    Example:
        >>> duration(4.23), duration(723), duration(7500), duration(None)
        ('4.2 s', '12 min 3 s', '2 h 5 min', 'unknown')
    """
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    total = round(seconds)
    if total < 3600:
        return f"{total // 60} min {total % 60} s"
    return f"{total // 3600} h {total % 3600 // 60} min"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:48].strip("-")


def _section_ids(titles: Sequence[str]) -> list[str]:
    return [f"s{i + 1}-{_slug(t)}".rstrip("-") for i, t in enumerate(titles)]


# ---------------------------------------------------------------- header


def _name_of(value: object) -> str:
    if isinstance(value, Mapping):
        name = value.get("display_name") or value.get("name")
        if name:
            return str(name)
        return ", ".join(f"{k}: {_name_of(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_name_of(v) for v in value)
    return str(value)


def _model_name(provenance: Mapping[str, Any]) -> tuple[str, str] | None:
    """``("model", name)`` or ``("models", "base: A, finetuned: B")`` from the provenance."""
    config = provenance.get("config")
    for source in (provenance, config if isinstance(config, Mapping) else {}):
        for key in _MODEL_KEYS:
            value = source.get(key)
            if not value:
                continue
            several = isinstance(value, (list, tuple)) or (
                isinstance(value, Mapping) and not (value.get("display_name") or value.get("name"))
            )
            return ("models" if several else "model"), _name_of(value)
    return None


def _machine_name(machine: object) -> str | None:
    if isinstance(machine, Mapping):
        if machine.get("gpu"):
            return str(machine["gpu"])
        cpus, proc = machine.get("cpus"), machine.get("processor")
        if cpus:
            return f"{cpus} CPU cores" + (f" ({proc})" if proc else "")
        return str(machine.get("platform") or "") or None
    return str(machine) if machine else None


def _header(report: Report) -> str:
    prov = report.provenance
    meta = []
    machine = _machine_name(prov.get("machine"))
    if report.wall_seconds is not None:
        where = f" on {escape(machine)}" if machine else ""
        meta.append(f"Produced in <strong>{duration(float(report.wall_seconds))}</strong>{where}")
    elif machine:
        meta.append(f"Run on {escape(machine)}")
    when = next((prov[k] for k in _WHEN_KEYS if prov.get(k)), None)
    if when:
        meta.append(escape(when))
    model = _model_name(prov)
    if model:
        meta.append(f"{model[0]} <strong>{escape(model[1])}</strong>")
    meta_html = f'<p class="meta">{" · ".join(meta)}</p>' if meta else ""
    detail = (
        f'<div class="verdict-detail">{markdown_html(report.verdict_detail)}</div>'
        if report.verdict_detail.strip()
        else ""
    )
    return (
        "<header>\n"
        '<p class="kicker">Experiment report</p>\n'
        f"<h1>{escape(report.title)}</h1>\n"
        f"{meta_html}\n"
        '<div class="verdict" role="note">'
        '<div class="verdict-label">Verdict</div>'
        f'<p class="verdict-text">{inline_markdown(report.verdict)}</p>{detail}</div>\n'
        "</header>"
    )


def _toc(sections: Sequence[Section], ids: Sequence[str]) -> str:
    items = [
        f'<li><a href="#{sid}">{escape(s.title)}</a></li>'
        for s, sid in zip(sections, ids, strict=True)
    ]
    items.append('<li><a href="#provenance">Provenance</a></li>')
    cls = "toc toc-long" if len(items) > 6 else "toc"
    return f'<nav class="{cls}"><h2>Contents</h2><ol>' + "".join(items) + "</ol></nav>"


# ---------------------------------------------------------------- provenance


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, Mapping) and value:
        out = []
        for key, item in value.items():
            out += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, value)]


def _value_text(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (str, numbers.Number)) for v in value
    ):
        return ", ".join(str(v) for v in value) if value else "—"
    if isinstance(value, (str, numbers.Number, np.generic)):
        return str(value)
    return json.dumps(value, default=str)


def _kv_row(key: str, value: object, nested: bool = False) -> str:
    cls = ' class="nested"' if nested else ""
    return f'<tr{cls}><th scope="row">{escape(key)}</th><td>{escape(_value_text(value))}</td></tr>'


def _provenance(provenance: Mapping[str, Any]) -> str:
    if not provenance:
        return (
            '<section id="provenance"><h2>Provenance</h2>'
            + no_data_html("none recorded")
            + "</section>"
        )
    rows = []
    for name, value in provenance.items():
        if isinstance(value, Mapping) and value:  # a group: its name, then its keys
            rows.append(f'<tr class="group"><th colspan="2">{escape(name)}</th></tr>')
            rows += [_kv_row(key, item, nested=True) for key, item in _flatten(value)]
        else:
            rows.append(_kv_row(str(name), value))
    full = json.dumps(provenance, indent=2, default=str, ensure_ascii=False)
    return (
        '<section id="provenance"><h2>Provenance</h2>'
        f'<div class="table-wrap"><table class="kv"><tbody>{"".join(rows)}</tbody></table></div>'
        f"<details><summary>Full provenance (JSON)</summary><pre>{escape(full)}</pre></details>"
        "</section>"
    )


_CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa;
  --accent: #4C78A8; --good: #1a7f37; --mono: ui-monospace, SFMono-Regular, Menlo, Consolas,
  "Liberation Mono", "DejaVu Sans Mono", monospace; }
* { box-sizing: border-box; }
html { background: #eef1f4; }
body { margin: 0; color: var(--ink); font: 16px/1.55 -apple-system, BlinkMacSystemFont,
  "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans", "DejaVu Sans", sans-serif;
  -webkit-text-size-adjust: 100%; }
.page { max-width: 1000px; margin: 32px auto; padding: 40px 48px 28px; background: #fff;
  border: 1px solid var(--line); border-radius: 10px; }
h1 { font-size: 30px; line-height: 1.2; margin: 2px 0 10px; letter-spacing: -0.01em; }
h2 { font-size: 22px; line-height: 1.25; margin: 0 0 14px; padding-bottom: 8px;
  border-bottom: 1px solid var(--line); }
p { margin: 0 0 12px; }
code { font: 0.88em var(--mono); background: var(--soft); border: 1px solid var(--line);
  border-radius: 4px; padding: 1px 5px; }
.kicker { margin: 0; color: var(--muted); font-size: 13px; letter-spacing: 0.08em;
  text-transform: uppercase; }
.meta { color: var(--muted); font-size: 14.5px; margin: 0 0 18px; }
.meta strong { color: var(--ink); font-weight: 600; }
.verdict { border: 1px solid #b6cbe2; border-left: 6px solid var(--accent); background: #f1f6fb;
  border-radius: 8px; padding: 14px 20px 6px; margin: 0 0 26px; }
.verdict-label { font-size: 12.5px; font-weight: 700; letter-spacing: 0.08em;
  text-transform: uppercase; color: var(--accent); margin-bottom: 2px; }
.verdict-text { font-size: 20px; line-height: 1.35; font-weight: 600; margin: 0 0 8px; }
.verdict-detail p { color: #32383f; }
.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 20px 10px; margin: 0 0 34px; }
.toc h2 { font-size: 13px; font-weight: 700; letter-spacing: 0.08em; text-transform: uppercase;
  color: var(--muted); border: 0; padding: 0; margin: 0 0 4px; }
.toc ol { margin: 0; padding-left: 22px; }
.toc-long ol { columns: 2; column-gap: 36px; }
.toc li { margin: 2px 0; break-inside: avoid; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
section { margin: 0 0 40px; scroll-margin-top: 16px; }
section > h2 { counter-increment: sec; }
main { counter-reset: sec; }
section:not(#provenance) > h2::before { content: counter(sec) ". "; color: var(--muted); }
.finding { background: #effaf1; border: 1px solid #b7e1c0; border-left: 5px solid var(--good);
  border-radius: 6px; padding: 10px 16px; font-weight: 600; margin: 0 0 14px; }
.text { margin: 0 0 8px; }
figure { margin: 14px 0 22px; }
figure.plot { border: 1px solid var(--line); border-radius: 8px; padding: 6px; overflow: hidden; }
figcaption { font-size: 14px; font-weight: 600; color: var(--muted); margin: 0 0 6px; }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
figure.table .table-wrap { display: inline-block; max-width: 100%; min-width: 50%;
  vertical-align: top; }
figure.table figcaption { display: block; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { padding: 6px 16px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; white-space: nowrap; }
tbody tr:last-child > * { border-bottom: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody th { font-weight: 600; }
table.kv th { width: 32%; font: 13px var(--mono); color: var(--muted); font-weight: 400;
  white-space: normal; word-break: break-word; }
table.kv td { font: 13px var(--mono); word-break: break-all; }
table.kv tr.group th { font: 600 13px var(--mono); color: var(--ink); background: var(--soft);
  padding-top: 8px; }
table.kv th, table.kv td { padding-top: 4px; padding-bottom: 4px; }
table.kv tr.nested th { padding-left: 32px; }
table.kv tbody tr:nth-child(even) { background: none; }
details { margin: 14px 0 0; }
summary { cursor: pointer; color: var(--muted); font-size: 14px; }
pre { font: 12.5px/1.45 var(--mono); background: var(--soft); border: 1px solid var(--line);
  border-radius: 8px; padding: 12px 14px; overflow-x: auto; white-space: pre-wrap;
  word-break: break-all; }
.no-data { border: 1px dashed #c4ccd4; border-radius: 8px; background: var(--soft);
  color: var(--muted); padding: 18px; text-align: center; font-size: 14.5px; margin: 14px 0 22px; }
footer { color: var(--muted); font-size: 13px; border-top: 1px solid var(--line);
  padding-top: 12px; margin-top: 8px; }
@media (max-width: 720px) { .page { margin: 0; padding: 20px 16px; border: 0; border-radius: 0; }
  .toc-long ol { columns: 1; } h1 { font-size: 24px; } }
@media print { html { background: #fff; } .page { border: 0; margin: 0; max-width: none; } }
"""

__all__ = ["Report", "duration"]
