"""``piggyback patch``: patch the base prefix/postfix K/V, with controls (a part of the scan)."""

from __future__ import annotations

import argparse
from pathlib import Path

from piggyback_interp.cli.common import add_scan_options, save_figure_html, scan_part

HELP = "patch base prefix/postfix K/V, with controls"
RECORD = True  # write <out>/config.json when the command finished
add_options = add_scan_options  # the scan's options, --out runs/scan


def run(args: argparse.Namespace) -> int:
    """Patch the base model's keys/values at the prefix and the postfix, with matched controls.

    ```bash
    piggyback patch --finetuned runs/sft/finetune/adapter --prompts my_prompts.txt
    ```

    Conditions per template segment: every position (``all``), ``n`` positions
    (``matched``), ``n`` query positions (``query``, the control) and noise of the base's
    norm (``noise``). ``recovery``: the fraction of the gap closed. Prints which segments
    carry the behaviour by the scan's rule. Writes ``<out>/scan/patching/``.
    """
    from piggyback_interp.experiments.verdict import carrier_verdict
    from piggyback_interp.report.figures import carrier_bars

    frame = scan_part(args, "patching")
    verdict = carrier_verdict(frame, min_recovery=args.min_recovery)
    table = frame.groupby(["segment", "condition"], sort=False)["recovery"].agg(["mean", "sem"])
    print(table.round(3).to_string())
    print(f"\n{verdict.headline}.\n{verdict.detail}")
    save_figure_html(carrier_bars(frame), Path(args.out) / "scan" / "patching" / "patching")
    return 0
