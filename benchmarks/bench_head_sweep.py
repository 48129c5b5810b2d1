"""Head sweeps: the batched engine vs the loop (one patched full forward per cell).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_head_sweep.py --json [--layers N] [--prompts P] [--tiny]
Target (issue 17): speedup >= 3, max_abs_diff <= 1e-5.

Two parts, timed side by side in one run (see ``_pair.py`` for the pair and prompts):
``z``: ``head_sweep`` (every query head's attention output at the prefix) and ``kv``:
``kv_head_sweep`` (every key/value head's prefix keys and values, isolated), both over
N evenly spaced layers. Totals sum both parts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from _pair import load, parse_args, report, side_by_side

    from piggyback_interp.analysis.heads import head_sweep, kv_head_sweep

    args = parse_args(__doc__, default_layers=10)
    setup = load(args)
    base, ft, metric, layers = setup["base"], setup["ft"], setup["metric"], setup["layers"]
    parts = {}
    for name, fn in (("z", head_sweep), ("kv", kv_head_sweep)):

        def run(engine, batch, fn=fn):
            return fn(ft, base, batch, metric, layers=layers, engine=engine,
                      cells_per_batch=args.cells_per_batch, progress=False)  # fmt: skip

        parts[name] = side_by_side(
            lambda run=run: run("batched", setup["prefix"]),
            lambda run=run: run("loop", setup["left"]),
        )
    out = report(args, parts, setup)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
