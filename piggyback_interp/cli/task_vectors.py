"""``piggyback task-vectors``: compare the weight changes of finetuned models per layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from piggyback_interp.cli.common import run_folder, save_figure_html
from piggyback_interp.cli.options import UsageError, add_common, require
from piggyback_interp.core.embedded import EMBEDDED_NAME

HELP = "compare weight changes per layer"
RECORD = True  # write <out>/config.json when the command finished


def add_options(p: argparse.ArgumentParser) -> None:
    add_common(p, out="runs/task_vectors")
    p.add_argument("--base", default=EMBEDDED_NAME, help="base model (default: %(default)s)")
    p.add_argument("--finetuned", nargs="+", metavar="[LABEL=]PATH", help="finetuned models")
    p.add_argument("--overwrite", action="store_true", help="redo with other inputs")


def run(args: argparse.Namespace) -> int:
    """Task vectors (finetuned minus base weights): per-layer norms and cosines between models.

    ```bash
    piggyback task-vectors --base smollm2-135m-instruct \\
        --finetuned sft=runs/sft/finetune/adapter treft=runs/treft/finetune/adapter
    ```

    ``--finetuned`` takes ``label=path`` (or a path, labelled by its folder names):
    merged model directories or LoRA adapters (the LoRA update is used directly). Writes
    ``<out>/task_vectors/norms.parquet`` and, for several models, ``cosine.parquet`` and
    a heatmap.
    """
    from piggyback_interp.experiments.pipeline import task_vector_step

    require(args, "finetuned")
    finetuned = {}
    for item in args.finetuned:
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        label = label or "/".join(Path(path).parts[-3:])
        if not Path(path).exists():
            raise UsageError(
                f"--finetuned {item}: {path} does not exist; give a model directory or adapter folder"
            )
        finetuned[label] = path
    run = run_folder(args)
    frames = task_vector_step(run, "task_vectors", args.base, finetuned)
    norms = frames["norms"]
    print(norms.pivot(index="layer", columns="method", values="norm").round(4).to_string())
    if frames["cosine"] is not None:
        from piggyback_interp.report.figures import task_vector_heatmap

        print(frames["cosine"].groupby(["a", "b"])["cosine"].mean().round(3).to_string())
        save_figure_html(
            task_vector_heatmap(frames["cosine"]), Path(args.out) / "task_vectors" / "cosine"
        )
    return 0
