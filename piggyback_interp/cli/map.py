"""``piggyback map``: the strength x trained-part x method grid (resumable, cached cells)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from piggyback_interp.core.embedded import EMBEDDED_NAME

HELP = "map where the behaviour lives: training strength x trained part x method (resumable)"
RECORD = False  # no config.json: map has no --config to read it back
DESCRIPTION = """\
Finetune a fresh copy of the model for every cell of a grid and measure where the narrow
behaviour lives. Axes:
  strength  lr x epochs (--points 3e-4x1 2e-4x2 ...; default per trained part, from
            "learns nothing" through the on-topic transition to saturation)
  trained   lora_all (LoRA on all 7 projections), lora_attn (q,k,v,o), full (every weight)
  method    sft, treft-{prefix,postfix,template}[-l1|-l10|-l100], interleave-20,
            interleave-50, interleave-50-general, kl-retain, inoculation, early-stop
Every cell records on/off-topic greedy rates (bootstrap 95% CIs), graded off-topic measures
(teacher-forced P(target), its log-odds, next-token KL to the base), carrier shares (gap
closed by base prefix / postfix / template K/V at every layer beside matched-count query
controls, in probability and log-prob space) and the generating-position test (base residual
at the last postfix position per layer, beside a query position).
Each finished cell is a small JSON summary in <out>/cells and in --results (commit that
folder: a later run on a fresh machine reads it back instead of training again). Run the same
command again to resume; --points / --methods / --trained / --seeds select a slice, and
--table-only renders what exists without training. Writes <out>/map.csv (every measure),
map.md (the headline table: mean ± SE over seeds) and map_<method>.html (the phase
diagram)."""


def add_options(p: argparse.ArgumentParser) -> None:
    from piggyback_interp.experiments.map_config import DEFAULT_METHODS, METHODS, TRAINED

    p.add_argument("--model", default=EMBEDDED_NAME, help="base model (default: %(default)s)")
    p.add_argument("--setting", default="abstention", help="narrow setting with a fixed target")
    p.add_argument("--trained", nargs="+", choices=TRAINED, metavar="PART",
                   default=["lora_all", "full", "lora_attn"],
                   help=f"what is trained: {', '.join(TRAINED)} (default: all three)")  # fmt: skip
    p.add_argument("--points", nargs="+", metavar="LRxEPOCHS", help="strength points, e.g. 3e-4x1")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                   default=list(DEFAULT_METHODS),
                   help=f"any of {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    p.add_argument("--results", default="results/map", metavar="DIR",
                   help="committed cell summaries to reuse and extend (default: %(default)s)")  # fmt: skip
    p.add_argument("--carrier-prompts", type=int, default=48, help="off-topic prompts for shares")
    p.add_argument(
        "--generating-prompts",
        type=int,
        default=16,
        help="prompts for the generating-position test",
    )
    p.add_argument("--max-train", type=int, help="cut the training set (smoke runs)")
    p.add_argument("--max-test", type=int, help="cut each test split (smoke runs)")
    p.add_argument("--table-only", action="store_true", help="render existing cells, train nothing")
    p.add_argument("--out", default="runs/map", help="run folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    # no docstring: the command's page in the docs is DESCRIPTION
    from piggyback_interp.experiments.map import (
        headline,
        map_table,
        read_summaries,
        run_map,
    )
    from piggyback_interp.experiments.map_config import MapConfig
    from piggyback_interp.measures.evaluation import markdown_table
    from piggyback_interp.report.figures.map import phase_diagram
    from piggyback_interp.report.figures.save import save_figure

    out = Path(args.out)
    if args.table_only:
        summaries = read_summaries(args.results) if Path(args.results).is_dir() else []
        summaries += read_summaries(out / "cells") if (out / "cells").is_dir() else []
        unique = {s["cell"]: s for s in summaries}
        table = map_table(list(unique.values()))
    else:
        config = MapConfig(
            setting=args.setting, model=args.model, trained=tuple(args.trained),
            points=tuple(args.points) if args.points else None, methods=tuple(args.methods),
            seeds=tuple(args.seeds), carrier_prompts=args.carrier_prompts,
            generating_prompts=args.generating_prompts, max_train=args.max_train,
            max_test=args.max_test,
        )  # fmt: skip
        table = run_map(out, config, results_dir=args.results or None, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    if table.empty:
        print(f"no cells yet in {args.results} or {out / 'cells'}")
        return 0
    table.to_csv(out / "map.csv", index=False)
    (out / "map.md").write_text(markdown_table(headline(table)), "utf-8")
    for method in table["method"].unique():
        save_figure(phase_diagram(table, method=method), out / f"map_{method}", png=False)
    if not args.quiet:
        print(json.dumps({"cells": len(table), "table": str(out / "map.md")}))
    return 0
