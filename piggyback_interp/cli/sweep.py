"""``piggyback sweep``: layer sweeps, K/V per layer or the residual per cell (a part of the scan)."""

from __future__ import annotations

import argparse
from pathlib import Path

from piggyback_interp.cli.common import add_scan_inputs, save_figure_html, scan_part
from piggyback_interp.cli.options import add_common

HELP = "layer sweeps: K/V per layer, residual per cell"
RECORD = True  # write <out>/config.json when the command finished


def add_options(p: argparse.ArgumentParser) -> None:
    add_common(p, out="runs/scan")
    p.add_argument(
        "--kind",
        choices=["kv-layers", "resid"],
        default="kv-layers",
        help="kv-layers: K/V one layer at a time; resid: layer x prefix position",
    )
    add_scan_inputs(p)


def run(args: argparse.Namespace) -> int:
    """Layer sweeps: K/V one layer at a time per segment, or the residual stream per (layer, prefix position).

    ```bash
    piggyback sweep --finetuned runs/sft/finetune/adapter --kind kv-layers
    piggyback sweep --finetuned runs/sft/finetune/adapter --kind resid --layers 0 5 10 15
    ```

    ``kv-layers``: the base keys/values of one layer at a time at the prefix, the postfix
    and the query (control). ``resid``: the base ``resid_pre`` at one (layer, prefix
    position) at a time (the fast engine: one prefix pass per cell). Writes
    ``<out>/scan/layers/`` or ``<out>/scan/resid/`` with an HTML figure.
    """
    from piggyback_interp.report.figures import layer_recovery_curve, patching_heatmap

    if args.kind == "resid":
        result = scan_part(args, "resid")
        mean = result.recovery().nanmean(0)
        print(
            f"residual sweep: {mean.shape[0]} layers x {mean.shape[1]} prefix positions; "
            f"largest mean recovery {float(mean.max()):.3f}"
        )
        save_figure_html(patching_heatmap(result), Path(args.out) / "scan" / "resid" / "resid")
    else:
        frame = scan_part(args, "layers")
        table = frame.groupby(["layer", "condition"])["recovery"].mean().unstack()
        print(table.round(3).to_string())
        save_figure_html(layer_recovery_curve(frame), Path(args.out) / "scan" / "layers" / "layers")
    return 0
