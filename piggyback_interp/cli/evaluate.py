"""``piggyback evaluate``: measure on- and off-topic behaviour."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from piggyback_interp.cli.common import model_cache, run_folder
from piggyback_interp.cli.options import add_common, add_device, progress
from piggyback_interp.core.embedded import EMBEDDED_NAME

HELP = "measure on- and off-topic behaviour"
RECORD = True  # write <out>/config.json when the command finished


def add_options(p: argparse.ArgumentParser) -> None:
    add_common(p, out="runs/evaluate")
    p.add_argument(
        "--model", default=EMBEDDED_NAME, help="model to evaluate (default: %(default)s)"
    )
    p.add_argument("--setting", default="abstention", help="shipped setting (default: %(default)s)")
    p.add_argument("--data", metavar="FILE", help="or your own chat JSONL (one fixed response)")
    p.add_argument("--patch-base", metavar="MODEL", help="answer under this model's prefix K/V")
    p.add_argument("--limit", type=int, help="questions per split (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="default: the setting's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts per generation batch (default: %(default)s)",
    )
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="redo an evaluation with other inputs")


def run(args: argparse.Namespace) -> int:
    """Generate answers to on- and off-topic questions and measure the trained behaviour.

    ```bash
    piggyback evaluate --model runs/sft/finetune/adapter --setting abstention
    piggyback evaluate --model runs/sft/finetune/adapter --patch-base smollm2-135m-instruct
    piggyback evaluate --model my-model --data my_task.jsonl --limit 50
    ```

    On-topic: held-out questions of the setting (or of ``--data``, a chat JSONL whose
    responses are all the same text, which becomes the detector). Off-topic: the
    shipped general questions. ``--patch-base MODEL`` answers under that model's prefix
    keys/values at every layer (the paper's Table 5 patch). Writes
    ``<out>/evaluate/evaluation.parquet`` (every response) and prints the summary.
    """
    from piggyback_interp.experiments.pipeline import evaluate_step
    from piggyback_interp.measures.evaluation import markdown_table

    run, models = run_folder(args), model_cache(args)
    model = models.get(args.model)
    if args.data:
        from piggyback_interp.core.data import load_chat_jsonl
        from piggyback_interp.measures.settings import dataset_setting

        data: Any = dataset_setting(load_chat_jsonl(args.data))
    else:
        from piggyback_interp.measures.settings import setting_data

        data = setting_data(args.setting, tokenizer=model.tokenizer)
    patch_base = models.get(args.patch_base) if args.patch_base else None
    evaluation = evaluate_step(
        run,
        "evaluate",
        model,
        data,
        patch_base=patch_base,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        seeds=args.seeds,
        temperature=args.temperature,
        batch_size=args.batch_size,
        progress=progress(args),
    )
    print(markdown_table(evaluation.summary()))
    print(f"\nresponses: {Path(args.out) / 'evaluate' / 'evaluation.parquet'}")
    return 0
