"""K/V sweeps: the batched engine vs the loop (one patched full forward per cell).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_kv_sweep.py --json [--layers N] [--prompts P] [--tiny]
Target (issue 17): speedup >= 3, max_abs_diff <= 1e-5.

Two parts, timed side by side in one run (see ``_pair.py`` for the pair and prompts):
``position``: ``sweep(site="kv")`` over prefix positions x N evenly spaced layers
(isolated per-position K/V patches); ``layer``: ``kv_layer_sweep`` (whole-prefix K/V,
one layer window at a time) over every layer. Totals sum both parts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from _pair import load, parse_args, report, side_by_side

    from piggyback_interp.analysis.kv_sweep import kv_layer_sweep
    from piggyback_interp.analysis.sweep import sweep

    args = parse_args(__doc__, default_layers=4)
    setup = load(args)
    base, ft, metric, layers = setup["base"], setup["ft"], setup["metric"], setup["layers"]
    cpb = args.cells_per_batch

    def position(engine, batch):
        return sweep(ft, base, batch, metric, site="kv", layers=layers, engine=engine,
                     cells_per_batch=cpb, progress=False)  # fmt: skip

    def layer(engine):
        return kv_layer_sweep(ft, base, setup["prefix"], metric, engine=engine,
                              windows_per_batch=cpb, progress=False)  # fmt: skip

    parts = {
        "position": side_by_side(
            lambda: position("batched", setup["prefix"]), lambda: position("loop", setup["left"])
        ),
        "layer": side_by_side(lambda: layer("batched"), lambda: layer("loop")),
    }
    out = report(args, parts, setup)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
