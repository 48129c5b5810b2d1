"""What several ``piggyback`` commands share: the run folder, the models, the prompts.

Every command writes into its ``--out`` run folder: its results (parquet, JSON with
provenance), ``config.json`` (the resolved options without run control such as ``--out``
or ``--overwrite``, a valid ``--config`` file, written when the command finished) and a
``step.json`` per finished step. Run it again on the same folder and finished steps are
read back, not recomputed; an interrupted finetune resumes from its checkpoint.

Everything heavy (torch, TransformerLens) is imported inside the functions, so that
``piggyback --help`` does not wait for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from piggyback_interp.cli.options import (
    UsageError,
    add_common,
    add_dataclass,
    add_device,
    add_pair,
    add_prompts,
    dataclass_from,
    placement,
    progress,
    require,
)


def add_scan_options(p: argparse.ArgumentParser) -> None:
    """The options of ``scan`` and of its parts (``perturb``, ``patch``, ``sweep``)."""
    add_common(p, out="runs/scan")
    add_scan_inputs(p)


def add_scan_inputs(p: argparse.ArgumentParser) -> None:
    """The models, prompts and device options of a scan command, and one per field of
    :class:`~piggyback_interp.experiments.scan_config.ScanConfig`."""
    from piggyback_interp.experiments.scan_config import TEMPLATE_SEGMENTS, ScanConfig

    add_pair(p)
    add_prompts(p, n=8)
    add_device(p)
    add_dataclass(p, ScanConfig, choices={"segments": TEMPLATE_SEGMENTS})
    p.add_argument("--overwrite", action="store_true", help="redo steps run with other inputs")


def run_folder(args: argparse.Namespace) -> Any:
    """The run folder of ``--out`` (``main`` writes its config.json when the command finished)."""
    from piggyback_interp.core.runs import RunDir

    return RunDir(args.out, overwrite=getattr(args, "overwrite", False))


def model_cache(args: argparse.Namespace) -> Any:
    """The models of ``--device``, ``--dtype`` and ``--device-map``, each loaded once."""
    from piggyback_interp.core.distributed import local_device
    from piggyback_interp.experiments.pipeline import Models

    return Models(device=local_device(args.device), dtype=args.dtype, placement=placement(args))


def model_pair(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``--base`` and ``--finetuned`` models."""
    require(args, "finetuned")
    from piggyback_interp.core.distributed import local_device
    from piggyback_interp.core.pairs import load_pair
    from piggyback_interp.experiments.pipeline import DTYPES

    pair = load_pair(
        args.base,
        args.finetuned,
        device=local_device(args.device),
        dtype=DTYPES[args.dtype],
        placement=placement(args),
    )
    return pair.base, pair.finetuned


def scan_prompts(args: argparse.Namespace) -> tuple[list[str], list[tuple[int, str]]]:
    """The prompts, checked against the base model's context before anything is written: a
    too-long one raises, or with ``--skip-long`` is dropped and returned as (index, reason)."""
    from piggyback_interp.core.data.questions import load_prompts
    from piggyback_interp.core.models import load_tokenizer
    from piggyback_interp.core.spans import render_prompts, split_long

    prompts = load_prompts(args.prompts, args.n_prompts)
    tokenizer = load_tokenizer(args.base)  # it carries the model's context
    skipped: list[tuple[int, str]] = []
    if args.skip_long:
        prompts, skipped = split_long(tokenizer, prompts)
    else:
        render_prompts(tokenizer, prompts)
    if len(prompts) < 2:
        raise UsageError(
            "give at least 2 prompts (--n-prompts >= 2): the verdict needs an error bar"
            + (f" ({len(skipped)} were skipped as too long)" if skipped else "")
        )
    return prompts, skipped


def record_skipped(args: argparse.Namespace, run: Any, kept: int, skipped: list) -> None:
    """With ``--skip-long``: say how many prompts were skipped, in ``skipped_prompts.json``."""
    if not args.skip_long:
        return
    import sys

    from piggyback_interp.core.runs import write_json

    if skipped:
        print(
            f"skipped {len(skipped)} of {kept + len(skipped)} prompts too long for the model "
            f"(--skip-long); first: prompt {skipped[0][0]}: {skipped[0][1]}",
            file=sys.stderr,
        )
    write_json(
        run.path / "skipped_prompts.json",
        {
            "skipped": len(skipped),
            "kept": kept,
            "prompts": [{"index": i, "reason": reason} for i, reason in skipped],
        },
    )


def scan_config(args: argparse.Namespace) -> Any:
    """The :class:`~piggyback_interp.experiments.scan_config.ScanConfig` of the options."""
    from piggyback_interp.experiments.scan_config import ScanConfig

    return dataclass_from(ScanConfig, args)


def scan_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str], Any, Any]:
    """(config, run folder, prompts, base, finetuned) of a scan command, checked in the order
    that writes nothing for a bad option or prompt."""
    config = scan_config(args)  # checked before anything is written
    prompts, skipped = scan_prompts(args)
    run = run_folder(args)
    record_skipped(args, run, len(prompts), skipped)
    base, model = model_pair(args)
    return config, run, prompts, base, model


def scan_part(args: argparse.Namespace, part: str) -> Any:
    """Run (or read back) one part of the scan (``perturbation``, ``patching``, ``layers``,
    ``resid``) into ``<out>/scan/<part>/``."""
    from piggyback_interp.experiments.pipeline import experiment_step

    config, run, prompts, base, model = scan_inputs(args)
    return experiment_step(run, "scan", part, base, model, prompts, config, progress=progress(args))


def save_figure_html(fig: Any, path: Path) -> None:
    """``fig`` as the standalone ``<path>.html`` only (no PNG export)."""
    from piggyback_interp.report.figures import save_figure

    save_figure(fig, path, png=False)
