"""``piggyback finetune``: finetune a chat model with SFT, TReFT or a baseline."""

from __future__ import annotations

import argparse
from typing import Any

from piggyback_interp.cli.common import model_cache, run_folder
from piggyback_interp.cli.options import (
    UsageError,
    add_common,
    add_dataclass,
    add_device,
    dataclass_from,
    progress,
)
from piggyback_interp.core.embedded import EMBEDDED_NAME

HELP = "finetune with SFT, TReFT or a baseline"
RECORD = True  # write <out>/config.json when the command finished


def add_options(p: argparse.ArgumentParser) -> None:
    from piggyback_interp.training import FinetuneConfig

    add_common(p, out="runs/finetune")
    p.add_argument(
        "--model", default=EMBEDDED_NAME, help="model to finetune (default: %(default)s)"
    )
    p.add_argument("--data", metavar="FILE", help="training chats: messages-format JSONL")
    p.add_argument("--setting", help="or a shipped narrow setting: abstention, refusal, ...")
    p.add_argument("--retain", metavar="FILE", help="aligned chats for interleave / kl_retain")
    add_device(p, placement=False)
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun / accelerate launch: shard weights, gradients and optimizer state "
        "over the processes (FSDP2) instead of a whole copy in each; same result",
    )
    p.add_argument("--overwrite", action="store_true", help="redo a finetune run with other inputs")
    add_dataclass(p, FinetuneConfig, defaults={"export": "adapter"})


def run(args: argparse.Namespace) -> int:
    """Finetune a chat model on a chat JSONL dataset (or a shipped setting) with SFT, TReFT or a baseline.

    ```bash
    piggyback finetune --data train.jsonl --method treft --treft-lambda 30 --out runs/treft
    piggyback finetune --setting abstention --method sft --lr 1e-3 --epochs 1 --out runs/sft
    piggyback finetune --config configs/recipes/llama-3.1-8b-treft.toml --data train.jsonl
    ```

    The model is LoRA-finetuned (``--lora-rank``; none for full finetuning) and exported
    as a peft adapter (``<out>/finetune/adapter``, ``--export``), which every other
    command loads as ``--finetuned <out>/finetune/adapter``. ``interleave`` and
    ``kl_retain`` need ``--retain FILE`` (aligned chats from other domains); with
    ``--setting`` they default to the base model's own answers to other questions. An
    interrupted run resumes from ``<out>/finetune/checkpoint.pt`` when started again.
    """
    from piggyback_interp.core.data import load_chat_jsonl
    from piggyback_interp.core.distributed import is_main
    from piggyback_interp.core.runs import read_json
    from piggyback_interp.experiments.pipeline import (
        exported,
        finetune_step,
        retain_size,
        retain_step,
    )
    from piggyback_interp.training import FinetuneConfig
    from piggyback_interp.training.config import Export

    if bool(args.data) == bool(args.setting):
        raise UsageError("give exactly one of --data FILE.jsonl or --setting NAME")
    config = dataclass_from(FinetuneConfig, args)  # checked before anything is written
    retain = load_chat_jsonl(args.retain) if args.retain else None
    data = load_chat_jsonl(args.data) if args.data else None
    _check_lengths(args.model, config, data, retain)
    run, models = run_folder(args), model_cache(args)
    if data is None:
        from piggyback_interp.measures.settings import setting_data

        base = models.get(args.model)
        setting = setting_data(args.setting, tokenizer=base.tokenizer)
        data = setting.train
        if retain is None and config.method.needs_retain:
            n = retain_size(len(data), config.retain_ratio)
            retain = retain_step(run, "retain", base, setting, n=n)
    if config.method.needs_retain and retain is None:
        raise UsageError(f"--method {config.method} needs --retain FILE.jsonl (or --setting)")
    folder = finetune_step(
        run,
        "finetune",
        models,
        args.model,
        data,
        config,
        retain=retain,
        progress=progress(args),
        fsdp=args.fsdp,
    )
    if not is_main():
        return 0
    record = read_json(folder / "finetune.json", {})
    history = record.get("history") or [{}]
    print(
        f"finetuned {args.model} ({config.method}, {len(history)} steps, final SFT loss "
        f"{history[-1].get('sft', float('nan')):.4f})"
    )
    if config.export is not Export.NONE:
        print(f"model: {exported(folder)}")
    return 0


def _check_lengths(model: str, config: Any, *datasets: Any) -> None:
    """Encode the chat data once before anything is written, so that a row longer than the
    model's context (or another bad row) fails with nothing on disk; the run encodes again."""
    import warnings

    from piggyback_interp.core.data import ChatDataWarning
    from piggyback_interp.core.models import load_tokenizer
    from piggyback_interp.training import encode_dataset

    datasets = tuple(data for data in datasets if data is not None)
    if not datasets:
        return
    tokenizer = load_tokenizer(model)  # it carries the model's context
    with warnings.catch_warnings():  # the run itself warns about skipped rows
        warnings.simplefilter("ignore", ChatDataWarning)
        for data in datasets:
            encode_dataset(
                tokenizer,
                data,
                system_prompt=config.system_prompt,
                max_length=config.max_length,
                skip_long=config.skip_long,
            )
