"""``piggyback perturb``: perturb the template segments vs the query (a part of the scan)."""

from __future__ import annotations

import argparse
from pathlib import Path

from piggyback_interp.cli.common import add_scan_options, save_figure_html, scan_part

HELP = "perturb template segments vs the query"
RECORD = True  # write <out>/config.json when the command finished
add_options = add_scan_options  # the scan's options, --out runs/scan


def run(args: argparse.Namespace) -> int:
    """Perturb the template segments and, matched in count, the query; how much of the finetuned behaviour is left?

    ```bash
    piggyback perturb --finetuned runs/sft/finetune/adapter --trials 10
    ```

    Each template segment's tokens (and as many query tokens, the control) are replaced by
    nearest-neighbour tokens in the input of both models. ``reduction``: the fraction of
    the base-vs-finetuned gap (``--metric kl``: next-token KL; ``target``: log-prob of
    ``--target``) that disappears. Writes ``<out>/scan/perturbation/``.
    """
    from piggyback_interp.report.figures import carrier_bars

    frame = scan_part(args, "perturbation")
    table = frame.groupby(["control_for", "segment"], sort=False)["reduction"].agg(["mean", "sem"])
    print(table.round(3).to_string())
    fig = carrier_bars(frame, x="control_for", group="segment", value="reduction")
    save_figure_html(fig, Path(args.out) / "scan" / "perturbation" / "perturbation")
    return 0
