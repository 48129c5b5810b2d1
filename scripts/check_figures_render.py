"""Open saved HTML figures in headless Chromium (kaleido 0.2.1's) and report how they render.

    .venv/bin/python scripts/check_figures_render.py runs/figures            # every *.html there
    .venv/bin/python scripts/check_figures_render.py a.html b.html --png-dir /tmp/rendered
    .venv/bin/python scripts/check_figures_render.py runs/demo/report.html --expect-graphs 0

Each file is loaded as a whole document with every network load blocked; its own
plotly.js plots it; the live page is then read (page errors, traces, text nodes) and the
plotted graph exported to PNG with pixel statistics (see
``piggyback_interp.report.figures.render``). Prints one JSON object; exits 1 if any file fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from piggyback_interp.report.figures import check_html_renders


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="HTML files or folders holding them")
    parser.add_argument("--png-dir", default=None, help="also write each rendered PNG here")
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--height", type=int, default=500)
    parser.add_argument(
        "--expect-graphs", type=int, default=1, help="graphs per page (0: at least one)"
    )
    args = parser.parse_args()
    files: list[Path] = []
    for raw in args.paths:
        path = Path(raw)
        files += sorted(path.glob("*.html")) if path.is_dir() else [path]
    if not files:
        print(json.dumps({"ok": False, "error": "no HTML files found"}))
        return 1
    reports = check_html_renders(
        files,
        width=args.width,
        height=args.height,
        png_dir=args.png_dir,
        expect_graphs=args.expect_graphs or None,
    )
    for report in reports:
        for entry in [report, *report.get("graphs", [])]:
            texts = entry.pop("texts", [])
            entry["n_texts"], entry["texts_head"] = len(texts), texts[:12]
    ok = all(r["ok"] for r in reports)
    print(json.dumps({"ok": ok, "files": len(reports), "reports": reports}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
