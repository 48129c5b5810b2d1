"""``piggyback scan``: find which template tokens carry a finetuned behaviour."""

from __future__ import annotations

import argparse
import dataclasses
import time

from piggyback_interp.cli.common import add_scan_options, scan_inputs
from piggyback_interp.cli.options import progress

HELP = "find which template tokens carry a finetuned behaviour"
RECORD = True  # write <out>/config.json when the command finished
add_options = add_scan_options  # the scan's options, --out runs/scan


def run(args: argparse.Namespace) -> int:
    """Find which shared template tokens carry a finetuned behaviour, for ANY base/finetuned pair.

    ```bash
    piggyback scan --base meta-llama/Llama-3.1-8B-Instruct --finetuned ./my-adapter \\
        --device cuda --dtype bfloat16 --prompts general.txt --out runs/scan-llama
    piggyback scan --finetuned runs/sft/finetune/adapter          # the embedded base model
    ```

    No judge needed: the gap between the models is ``KL(base || finetuned)`` of the
    next token after each general prompt (``--metric target --target TEXT`` scores a
    known answer instead). Runs segment perturbations, prefix and postfix K/V patching,
    K/V layer patching and a residual layer x position sweep, each with its matched
    non-template control, and writes ``<out>/report.html`` saying whether the prefix,
    the postfix, both or neither carry the behaviour. Each experiment is a cached step:
    ``perturb``/``patch``/``sweep`` on the same ``--out`` share them.
    """
    from piggyback_interp.experiments.pipeline import model_id, scan_step
    from piggyback_interp.report.findings import build_report

    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    config, run, prompts, base, model = scan_inputs(args)
    result = scan_step(run, "scan", base, model, prompts, config, progress=progress(args))
    run.write_record(
        "scan",
        start,
        started,
        config=dataclasses.asdict(config),
        models={
            "base": {**model_id(base), "source": args.base},
            "finetuned": {**model_id(model), "source": args.finetuned},
        },
        prompts=prompts,
    )
    report = build_report(run.path)
    print(
        f"{result.verdict.headline}.\n\n{result.verdict.evidence.round(3).to_string(index=False)}"
    )
    print(f"\nreport: {report}")
    return 0
