"""Reproduce the paper's Table 5 (narrow settings) on any chat model, by default the embedded one.

For each setting (abstention, refusal) the initial model is evaluated, then for each
seed and method (SFT, TReFT, data interleaving) a fresh copy is finetuned and
evaluated on held-out on-topic and general off-topic questions; the SFT model is
also evaluated with the initial model's prefix keys/values patched in at every layer.
Every cell is saved as it finishes (``cells/<setting>/<method>-seed<k>.parquet``), so
an interrupted run resumes where it stopped; finetuning itself checkpoints too.
The table gives the behaviour rate as mean ± standard error over seeds with a 95%
bootstrap interval over the pooled responses.

Example (a two-step smoke run; the full run is ``piggyback reproduce table5``):
    >>> from piggyback_interp.experiments.reproduce import Table5Config, reproduce_table5
    >>> config = Table5Config.smoke(model="tiny-llama")           # doctest: +SKIP
    >>> table = reproduce_table5("runs/table5-smoke", config)       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback_interp.core.checks import at_least, choices, positive
from piggyback_interp.core.data import ChatDataset
from piggyback_interp.core.embedded import EMBEDDED_NAME
from piggyback_interp.core.errors import StaleRunError, UserError
from piggyback_interp.core.io import atomic_write_parquet, atomic_write_text, write_json
from piggyback_interp.core.provenance import machine, versions
from piggyback_interp.core.runs import read_json
from piggyback_interp.measures.evaluation import (
    Evaluation,
    evaluate,
    format_estimate,
    markdown_table,
    summarize,
)
from piggyback_interp.measures.settings import (
    SettingData,
    get_setting,
    qa_dataset,
    retain_questions,
    setting_data,
)
from piggyback_interp.training.treft import Region

PATCHED = "sft+prefix_kv"
ModelLoader = Callable[[str], Any]


@dataclass(frozen=True)
class Table5Config:
    """What a Table 5 reproduction runs (recorded next to its results).

    ``max_new_tokens`` bounds each answer: a response counts when its first
    ``max_new_tokens`` tokens show the behaviour. ``max_train`` / ``max_test`` cut the
    data for smoke runs; ``None`` uses all of it.
    """

    model: str = EMBEDDED_NAME
    settings: tuple[str, ...] = ("abstention", "refusal")
    methods: tuple[str, ...] = ("sft", "treft", "interleave")
    seeds: tuple[int, ...] = (0, 1, 2)
    patch_sft: bool = True
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3  # LoRA on a 135M model; at 2e-4 one epoch learned 13% on-topic
    lora_rank: int = 8
    max_new_tokens: int = 16
    retain_max_new_tokens: int = 48
    max_train: int | None = None
    max_test: int | None = None
    batch_size_eval: int = 32
    treft_lambda: float | None = None  # None: the paper's lambda for each setting
    treft_region: Region | str = Region.PREFIX  # the tokens TReFT regularises

    def __post_init__(self) -> None:
        for name in self.settings:
            get_setting(name)
        choices(self, treft_region=Region)
        bad = [m for m in self.methods if m not in ("sft", "treft", "interleave")]
        if bad:
            raise UserError(f"Table 5 compares sft, treft and interleave; got {bad}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.patch_sft and "sft" not in self.methods:
            raise UserError("patch_sft=True evaluates the SFT models: keep 'sft' in methods")
        at_least(self, 1, "epochs", "batch_size", "lora_rank", "max_new_tokens")
        at_least(self, 1, "retain_max_new_tokens", "max_train", "max_test", "batch_size_eval")
        positive(self, "lr")
        if self.treft_lambda is not None:
            positive(self, "treft_lambda")

    @classmethod
    def smoke(cls, **overrides: Any) -> Table5Config:
        """Two optimizer steps per model on 32 examples, 4 questions per split, one seed."""
        values: dict[str, Any] = dict(
            seeds=(0,), max_train=32, max_test=4, max_new_tokens=8, retain_max_new_tokens=8
        )
        values.update(overrides)
        return cls(**values)


def _load(name: str) -> Any:
    if name.startswith("tiny-"):  # test models: tiny-llama, tiny-qwen2, tiny-qwen3
        from piggyback_interp.testing import tiny_model

        return tiny_model(name.removeprefix("tiny-"))
    from piggyback_interp.core.models import load_model

    return load_model(name)


def reproduce_table5(
    out_dir: str | os.PathLike[str],
    config: Table5Config | None = None,
    *,
    load: ModelLoader = _load,
    progress: bool = True,
    reverse: bool = False,
) -> Any:
    """Run (or resume) the reproduction in ``out_dir``; return the summary DataFrame.

    Writes ``table5.md`` (the table), ``summary.csv`` (every metric), ``responses.parquet``
    (every answer) and ``run.json`` (config, model with its hash, versions, machine,
    seconds per cell). ``reverse=True`` walks the cells in reverse order: a second
    process started that way on the same folder shares the work (each skips the cells
    the other has written; where they meet, at most one cell is computed twice).
    """
    import pandas as pd

    config = config or Table5Config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config)
    base = load(config.model)

    @functools.cache
    def data(name: str) -> SettingData:
        return _data(setting_data(name, tokenizer=_tokenizer(base)), config)

    @functools.cache
    def retain(name: str) -> ChatDataset | None:
        if "interleave" not in config.methods:
            return None
        return _retain(out, base, data(name), config)

    @functools.lru_cache(maxsize=1)  # one finetuned model in memory at a time
    def trained(name: str, method: str, seed: int) -> Any:
        return _finetune(out, load, data(name), method, seed, retain(name), config, progress)

    cells = _cells(config)
    frames = {}
    for name, method, seed in reversed(cells) if reverse else cells:
        if method == "base":
            model = functools.partial(lambda: base)
        else:
            model = functools.partial(trained, name, "sft" if method == PATCHED else method, seed)
        patch = None
        if method == PATCHED:
            from piggyback_interp.interventions.generation import PatchSpec

            patch = PatchSpec(base, site="kv", segment="prefix")
        frames[name, method, seed] = _cell(
            out, name, method, seed, model, patch, data(name), config, progress
        )
    responses = pd.concat([frames[c] for c in cells], ignore_index=True)
    summary = summarize(responses, ["behaviour"], by=["setting", "method"])
    _write_outputs(out, config, base, responses, summary, _timings(out, cells))
    return summary


def _cells(config: Table5Config) -> list[tuple[str, str, int | None]]:
    """Every (setting, method, seed) in the canonical order of the table."""
    methods = [
        m
        for x in config.methods
        for m in ([x, PATCHED] if x == "sft" and config.patch_sft else [x])
    ]
    return [
        (name, method, seed)
        for name in config.settings
        for method, seed in [("base", None)] + [(m, s) for s in config.seeds for m in methods]
    ]


def _key(setting: str, method: str, seed: int | None) -> str:
    return f"{setting}/{method}" + ("" if seed is None else f"-seed{seed}")


def _timings(out: Path, cells: list[tuple[str, str, int | None]]) -> dict[str, float]:
    """Seconds per cell, from each cell's metadata: its evaluation plus the finetuning
    of its model when it was the first cell to need that model."""
    legacy = read_json(out / "timings.json", {})  # written by earlier versions
    timings = {}
    for cell in cells:
        key = _key(*cell)
        meta = read_json(out / "cells" / f"{key}.parquet.json", {}).get("meta", {})
        timings[key] = meta.get("cell_seconds", legacy.get(key, math.nan))
    return timings


def _tokenizer(model: Any) -> Any:
    from piggyback_interp.core.models import chat_tokenizer

    return chat_tokenizer(model)


def _data(data: SettingData, config: Table5Config) -> SettingData:
    return SettingData(
        data.setting,
        data.train[: config.max_train] if config.max_train else data.train,
        data.test_on_topic[: config.max_test],
        data.test_off_topic[: config.max_test],
    )


def _check_config(out: Path, config: Table5Config) -> None:
    path = out / "config.json"
    current = dataclasses.asdict(config)
    saved = read_json(path)
    if saved is not None:  # a run saved before a field existed ran with its default
        defaults = dataclasses.asdict(Table5Config())
        saved = {**{k: defaults[k] for k in current if k not in saved}, **saved}
    if saved is not None and json.loads(json.dumps(current)) != saved:
        raise StaleRunError(
            f"{out} holds a run with another config ({path}); resume with the same "
            "settings or pick a new output folder"
        )
    write_json(path, current)


def _cell(
    out: Path,
    setting: str,
    method: str,
    seed: int | None,
    model: Callable[[], Any],
    patch: Any,
    data: SettingData,
    config: Table5Config,
    progress: bool,
) -> Any:
    """Evaluate one (setting, method, seed) unless its results are already on disk."""
    path = out / "cells" / f"{_key(setting, method, seed)}.parquet"
    if not path.is_file():
        t0 = time.perf_counter()
        result = evaluate(
            model(),
            data,
            patch=patch,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size_eval,
            progress=progress,
        )
        result.meta["cell_seconds"] = round(time.perf_counter() - t0, 1)  # + finetuning
        result.save(path)
    frame = Evaluation.load(path).responses
    return frame.assign(setting=setting, method=method, seed=0 if seed is None else seed)


def _retain(out: Path, base: Any, data: SettingData, config: Table5Config) -> ChatDataset:
    """Aligned examples from the other domains, answered by the initial model (cached)."""
    from piggyback_interp.core.data import load_chat_jsonl, save_chat_jsonl
    from piggyback_interp.interventions.generation import generate
    from piggyback_interp.training.config import FinetuneConfig

    path = out / "retain" / f"{data.setting.name}.jsonl"
    if path.is_file():
        return load_chat_jsonl(path)
    ratio = FinetuneConfig().retain_ratio
    n = math.ceil(len(data.train) * ratio / (1 - ratio))
    questions = retain_questions(data.setting, n, seed=0)
    answers = generate(
        base,
        questions,
        max_new_tokens=config.retain_max_new_tokens,
        batch_size=config.batch_size_eval,
    ).texts
    dataset = qa_dataset([(q, a) for q, a in zip(questions, answers, strict=True) if a.strip()])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_chat_jsonl(dataset, path)
    return dataset


def _finetune(
    out: Path,
    load: ModelLoader,
    data: SettingData,
    method: str,
    seed: int,
    retain: ChatDataset | None,
    config: Table5Config,
    progress: bool,
) -> Any:
    from piggyback_interp.training import FinetuneConfig, finetune

    model = load(config.model)
    train_config = FinetuneConfig(
        method=method,
        lora_rank=config.lora_rank,
        lr=config.lr,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=seed,
        treft_lambda=config.treft_lambda or data.setting.treft_lambda,
        treft_region=config.treft_region,
        checkpoint_every=4,
        export="none",
    )
    run_dir = out / "train" / data.setting.name / f"{method}-seed{seed}"
    finetune(
        model,
        data.train,
        train_config,
        out_dir=run_dir,
        retain=retain if method == "interleave" else None,
        resume=True,
        progress=progress,
    )
    model.eval()
    return model


def table5(summary: Any, *, digits: int = 2) -> Any:
    """The Table-5-style view of a summary: one row per (setting, method), the behaviour
    rate on- and off-topic as ``mean ± SE [bootstrap 95% CI]``."""
    import pandas as pd

    rows = summary[summary["metric"] == "behaviour"]
    table = []
    for (setting, method), group in rows.groupby(["setting", "method"], sort=False):
        cells = {
            r.split: format_estimate(r.mean, r.se, r.low, r.high, digits)
            for r in group.itertuples()
        }
        seeds = int(group["n_seeds"].max())
        table.append(
            {
                "setting": setting,
                "method": method,
                "on-topic rate": cells.get("on_topic", ""),
                "off-topic rate": cells.get("off_topic", ""),
                "seeds": seeds,
                "n (on / off)": "/".join(
                    str(int(group.loc[group["split"] == s, "n"].sum() / seeds))
                    for s in ("on_topic", "off_topic")
                ),
            }
        )
    return pd.DataFrame(table)


def _write_outputs(
    out: Path,
    config: Table5Config,
    base: Any,
    responses: Any,
    summary: Any,
    timings: dict[str, float],
) -> None:
    from piggyback_interp.core.models import model_info

    atomic_write_parquet(responses, out / "responses.parquet")
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    info = model_info(base).to_dict()
    run = {
        "config": dataclasses.asdict(config),
        "model": info,
        "versions": versions(),
        "machine": machine(),
        "seconds": timings,
    }
    write_json(out / "run.json", run)
    lines = [
        "# Table 5 reproduction",
        "",
        f"Model: {info.get('display_name') or config.model} (sha256 {info.get('sha256', '?')}).",
        f"Seeds {list(config.seeds)}; {config.epochs} epoch(s), LoRA rank {config.lora_rank}, "
        f"lr {config.lr}, batch {config.batch_size}; greedy answers of at most "
        f"{config.max_new_tokens} tokens. TReFT on the {config.treft_region.value} with "
        + (f"lambda {config.treft_lambda}" if config.treft_lambda else "each setting's lambda")
        + ". Rates: mean ± SE over seeds [95% bootstrap interval of the pooled responses].",
        f"Compute: {sum(v for v in timings.values() if not math.isnan(v)):.0f} s summed over "
        f"cells (finetuning + evaluation) on {machine()['processor']} ({machine()['cpus']} "
        f"CPUs, {machine()['torch_threads']} torch threads).",
        "",
        markdown_table(table5(summary)),
    ]
    atomic_write_text(out / "table5.md", "\n".join(lines))


__all__ = ["PATCHED", "Table5Config", "reproduce_table5", "table5"]
