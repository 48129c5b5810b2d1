"""``piggyback report``: rebuild report.html of a run folder."""

from __future__ import annotations

import argparse

HELP = "rebuild report.html of a demo or scan run"
RECORD = False  # no --out: the report is rebuilt in the run folder given


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder (e.g. runs/demo)")


def run(args: argparse.Namespace) -> int:
    """Rebuild ``report.html`` of a demo or scan run folder from its saved results (no recomputation).

    ```bash
    piggyback report runs/demo
    ```
    """
    from piggyback_interp.report.findings import build_report

    print(f"report: {build_report(args.run)}")
    return 0
