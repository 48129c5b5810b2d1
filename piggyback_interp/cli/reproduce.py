"""``piggyback reproduce``: reproduce a table of the paper (resumable)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from piggyback_interp.cli.options import add_config, progress
from piggyback_interp.core.embedded import EMBEDDED_NAME

HELP = "reproduce a table of the paper (resumable)"
RECORD = True  # write <out>/config.json when the command finished


def add_options(p: argparse.ArgumentParser) -> None:
    from piggyback_interp.training.treft import Region

    p.add_argument("table", choices=["table5"], help="table5: narrow settings, SFT vs TReFT")
    p.add_argument("--out", help="output folder (default: runs/<table>[-smoke])")
    add_config(p)
    p.add_argument("--model", default=EMBEDDED_NAME, help="model name or directory")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0 1 2)")
    p.add_argument("--settings", nargs="+", help="settings (default: abstention refusal)")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3; the map's point: 3e-4)")
    p.add_argument("--epochs", type=int, help="epochs over the training set (default: 1)")
    p.add_argument(
        "--methods", nargs="+", choices=["sft", "treft", "interleave"],
        help="methods (default: sft treft interleave)",
    )  # fmt: skip
    p.add_argument(
        "--treft-lambda", type=float,
        help="TReFT's lambda for every setting (default: the paper's per setting)",
    )  # fmt: skip
    p.add_argument(
        "--treft-region", choices=[r.value for r in Region],
        help="the tokens TReFT regularises (default: prefix)",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="two steps per model, 4 questions")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="walk the cells in reverse: a second process on the same --out shares the work",
    )


def run(args: argparse.Namespace) -> int:
    """Reproduce a table of the paper (resumable): ``table5``, narrow settings, SFT vs TReFT.

    ```bash
    piggyback reproduce table5 --out runs/table5            # 3 seeds x 2 settings x 3 methods
    piggyback reproduce table5 --reverse --out runs/table5  # a second worker on the same folder
    piggyback reproduce table5 --smoke --out runs/smoke     # two optimizer steps per model
    piggyback reproduce table5 --lr 3e-4 --seeds 0 --out runs/table5-3e-4  # the map's point
    piggyback reproduce table5 --config runs/table5-3e-4/config.json --out runs/again
    piggyback reproduce table5 --lr 3e-4 --settings short_answer --methods sft treft \
        --treft-region template --treft-lambda 100 --out runs/t5-template-l100
    ```
    """
    from piggyback_interp.experiments.reproduce import Table5Config, reproduce_table5

    overrides: dict[str, Any] = {"model": args.model}
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.settings is not None:
        overrides["settings"] = tuple(args.settings)
    if args.methods is not None:
        overrides["methods"] = tuple(args.methods)
    for name in ("lr", "epochs", "treft_lambda", "treft_region"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = Table5Config.smoke(**overrides) if args.smoke else Table5Config(**overrides)
    out = args.out or ("runs/table5-smoke" if args.smoke else "runs/table5")
    args.out = out  # where config.json is recorded
    start = time.perf_counter()
    reproduce_table5(out, config, progress=progress(args), reverse=args.reverse)
    print((Path(out) / "table5.md").read_text("utf-8"))
    print(
        f"wrote {out}/ (table5.md, summary.csv, responses.parquet, run.json) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0
