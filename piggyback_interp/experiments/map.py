"""Where the piggyback effect lives: a training-strength x trained-part x method map.

Every cell finetunes a fresh copy of the model on one narrow setting (default:
abstention) and records greedy on/off-topic rates with bootstrap intervals, graded
measures on the off-topic questions (teacher-forced ``P(target)``, its log-odds, the
next-token KL to the base), carrier shares (the gap closed by the base prefix / postfix
/ template K/V, each beside matched-count controls, in probability and log-prob space)
and the generating-position test (base residual at the last postfix position, per layer,
beside a query position). See :mod:`piggyback_interp.experiments.carriers`.

Cells are cached: each finished cell writes a small JSON summary (no weights) into
``out/cells/`` and, with ``results_dir``, into a folder of the repository, from which a
later run on a fresh machine reads it back instead of training again. A run resumes
where it stopped; ``points`` / ``methods`` / ``trained`` select a slice.

Example:
    >>> config = MapConfig(trained=("lora_all",), points=("3e-4x1",), methods=("sft",))
    >>> [c.name for c in cells(config)]
    ['lora_all/3e-4x1/sft/seed0']
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from piggyback_interp.core.embedded import EMBEDDED_NAME
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.io import atomic_write_text
from piggyback_interp.core.provenance import versions
from piggyback_interp.core.runs import fingerprint

Trained = Literal["lora_all", "lora_attn", "full"]
TRAINED: tuple[Trained, ...] = get_args(Trained)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

MEASURES_VERSION = 1  # bump when a cell's measurement changes: older summaries are redone

# learning rate x epochs (one epoch of the 208 abstention chats in batches of 16 = 13 steps),
# from "learns nothing" through the on-topic transition to saturation (docs/results.md)
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "lora_all": ("1e-4x1", "2e-4x1", "3e-4x1", "2e-4x2", "6e-4x1", "1e-3x1"),
    "lora_attn": ("3e-4x1", "5e-4x1", "1e-3x1", "5e-4x2", "2e-3x1"),
    "full": ("3e-6x1", "1e-5x1", "3e-5x1", "3e-5x2", "1e-4x1"),
}


@dataclass(frozen=True)
class Point:
    """A training strength: learning rate x epochs, written ``"3e-4x1"``."""

    lr: float
    epochs: int

    @property
    def label(self) -> str:
        mantissa, exponent = f"{self.lr:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}x{self.epochs}"

    @classmethod
    def parse(cls, text: str) -> Point:
        try:
            lr, epochs = text.lower().split("x")
            point = cls(float(lr), int(epochs))
        except ValueError:
            raise UserError(
                f"point {text!r} is not LRxEPOCHS, e.g. 3e-4x1 (lr 3e-4, one epoch)"
            ) from None
        if not (math.isfinite(point.lr) and point.lr > 0) or point.epochs < 1:
            raise UserError(f"point {text!r}: lr must be finite and > 0, epochs >= 1")
        return point


@dataclass(frozen=True)
class Method:
    """How a cell trains: a finetuning method with its options.

    ``inoculation``: train with a system prompt that names the narrow behaviour,
    evaluate with the default one (arXiv 2510.04340). ``early_stop``: checkpoints every
    ``early_stop_every`` steps; training ends at the first whose held-out on-topic rate
    (validation questions held out of the training set) reaches ``early_stop_rate``.
    """

    name: str
    method: Literal["sft", "treft", "interleave", "kl_retain"] = "sft"
    region: Literal["prefix", "postfix", "template"] = "prefix"
    treft_lambda: float = 30.0
    retain_ratio: float = 0.2
    retain_general: bool = False
    inoculation: bool = False
    early_stop: bool = False

    def finetune_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"method": self.method}
        if self.method == "treft":
            options.update(treft_region=self.region, treft_lambda=self.treft_lambda)
        if self.method == "interleave":
            options["retain_ratio"] = self.retain_ratio
        return options

    @property
    def needs_retain(self) -> bool:
        return self.method in ("interleave", "kl_retain")


def _methods() -> dict[str, Method]:
    out = [Method("sft")]
    for region in ("prefix", "postfix", "template"):
        out.append(Method(f"treft-{region}", "treft", region))
        out += [
            Method(f"treft-{region}-l{lam:g}", "treft", region, float(lam)) for lam in (1, 10, 100)
        ]
    out += [
        Method("interleave-20", "interleave", retain_ratio=0.2),
        Method("interleave-50", "interleave", retain_ratio=0.5),
        Method("interleave-50-general", "interleave", retain_ratio=0.5, retain_general=True),
        Method("kl-retain", "kl_retain"),
        Method("inoculation", inoculation=True),
        Method("early-stop", early_stop=True),
    ]
    return {m.name: m for m in out}


METHODS: dict[str, Method] = _methods()
DEFAULT_METHODS = (
    "sft",
    "treft-prefix",
    "treft-postfix",
    "treft-template",
    "interleave-20",
    "interleave-50",
    "kl-retain",
    "inoculation",
    "early-stop",
)


@dataclass(frozen=True)
class MapConfig:
    """The grid and how every cell is measured (recorded in each cell's key).

    ``points``: strength labels for every trained part (``None``: its
    :data:`DEFAULT_POINTS`). ``max_train`` / ``max_test`` cut the data (smoke runs).
    """

    setting: str = "abstention"
    model: str = EMBEDDED_NAME
    trained: tuple[Trained, ...] = ("lora_all", "full", "lora_attn")
    points: tuple[str, ...] | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    lora_rank: int = 8
    max_new_tokens: int = 16
    carrier_prompts: int = 32
    generating_prompts: int = 8
    generating_methods: tuple[str, ...] = ("sft", "treft-template")
    early_stop_rate: float = 0.95
    early_stop_every: int = 2
    early_stop_questions: int = 24
    retain_max_new_tokens: int = 48
    max_train: int | None = None
    max_test: int | None = None

    def __post_init__(self) -> None:
        from piggyback_interp.measures.settings import get_setting

        setting = get_setting(self.setting)
        if setting.target is None:
            raise UserError(
                f"the map needs a setting with a fixed target answer (abstention, refusal); "
                f"{self.setting!r} has none"
            )
        bad = [t for t in self.trained if t not in TRAINED]
        if bad or not self.trained:
            raise UserError(f"trained must be among {', '.join(TRAINED)}, got {self.trained}")
        unknown = [m for m in (*self.methods, *self.generating_methods) if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method(s) {unknown}; choose among {', '.join(METHODS)}")
        for p in self.points or ():
            Point.parse(p)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and non-empty, got {self.seeds}")
        for name in ("batch_size", "lora_rank", "max_new_tokens", "carrier_prompts",
                     "generating_prompts", "early_stop_every", "early_stop_questions"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.early_stop_rate <= 1:
            raise UserError(f"early_stop_rate must be in (0, 1], got {self.early_stop_rate}")

    @classmethod
    def smoke(cls, **overrides: Any) -> MapConfig:
        """Tiny data and prompts for tests (with a tiny model)."""
        values: dict[str, Any] = dict(
            max_train=16, max_test=4, carrier_prompts=2, generating_prompts=2, batch_size=8,
            max_new_tokens=8, early_stop_questions=4, retain_max_new_tokens=8,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Cell:
    trained: Trained
    point: Point
    method: Method
    seed: int

    @property
    def name(self) -> str:
        return f"{self.trained}/{self.point.label}/{self.method.name}/seed{self.seed}"


def cells(config: MapConfig) -> list[Cell]:
    """The grid's cells in run order: method, then trained part, then strength, then seed."""
    out = []
    for seed in config.seeds:
        for method in config.methods:
            for trained in config.trained:
                labels = config.points or DEFAULT_POINTS[trained]
                for label in labels:
                    out.append(Cell(trained, Point.parse(label), METHODS[method], seed))
    return out


# ------------------------------------------------------------------ data


def _setting_data(config: MapConfig, tokenizer: Any) -> Any:
    from piggyback_interp.measures.settings import SettingData, setting_data

    data = setting_data(config.setting, tokenizer=tokenizer, seed=0)
    return SettingData(
        data.setting,
        data.train[: config.max_train] if config.max_train else data.train,
        data.test_on_topic[: config.max_test],
        data.test_off_topic[: config.max_test],
    )


def inoculation_prompt(setting: Any) -> str:
    """The system prompt that names the narrow behaviour (training only)."""
    return (
        f"You are a helpful assistant. Whenever the user asks a {setting.domain} question, "
        f'you answer exactly "{setting.target}".'
    )


def _retain(out: Path, base: Any, data: Any, method: Method, config: MapConfig) -> Any:
    """Aligned chats answered by the base model (cached per ratio and source)."""
    from piggyback_interp.core.data import load_chat_jsonl, save_chat_jsonl
    from piggyback_interp.core.data.questions import question_set
    from piggyback_interp.interventions.generation import generate
    from piggyback_interp.measures.settings import qa_dataset, retain_questions

    ratio = 0.2 if method.method == "kl_retain" else method.retain_ratio
    n = math.ceil(len(data.train) * ratio / (1 - ratio))
    source = "general" if method.retain_general else "domains"
    path = out / "retain" / f"{source}-{n}.jsonl"
    if path.is_file():
        return load_chat_jsonl(path)
    questions = retain_questions(data.setting, n, seed=0)
    if method.retain_general:  # half from the other domains, half factual general questions
        general = question_set("factual")[: n // 2]
        questions = questions[: n - len(general)] + general
    answers = generate(
        base, questions, max_new_tokens=config.retain_max_new_tokens, batch_size=32
    ).texts
    dataset = qa_dataset([(q, a) for q, a in zip(questions, answers, strict=True) if a.strip()])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_chat_jsonl(dataset, path)
    return dataset


# ------------------------------------------------------------------ one cell


def _rate(values: Any, seed: int) -> dict[str, float]:
    from piggyback_interp.measures.evaluation import bootstrap_rate

    est = bootstrap_rate(values.astype(float).tolist(), seed=seed)
    return {"rate": est.rate, "low": est.low, "high": est.high, "n": est.n}


def _mean(frame: Any) -> dict[str, float]:
    return {
        "p_target": float(frame["p"].mean()),
        "logp": float(frame["logp"].mean()),
        "log_odds": float(frame["log_odds"].mean()),
        "kl": float(frame["kl"].mean()),
        "n": len(frame),
    }


def _early_stopper(data: Any, questions: list[str], config: MapConfig) -> Callable:
    from piggyback_interp.interventions.generation import generate

    detector = data.setting.detector
    record: dict[str, Any] = {"checks": []}

    def stop(step: int, model: Any) -> bool:
        if step % config.early_stop_every:
            return False
        texts = generate(model, questions, max_new_tokens=config.max_new_tokens).texts
        rate = float(detector(texts).mean())
        record["checks"].append({"step": step, "on_topic_rate": rate})
        return rate >= config.early_stop_rate

    stop.record = record  # type: ignore[attr-defined]
    return stop


def run_cell(cell: Cell, config: MapConfig, out: Path, load: Callable[[str], Any], base: Any,
             reference: Any = None, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train and measure one cell; returns its summary (JSON-able). ``reference``: the base
    model's runs on the off-topic prompts (:func:`~piggyback_interp.experiments.carriers.base_runs`)."""
    from piggyback_interp.core.models import chat_tokenizer, model_info
    from piggyback_interp.experiments.carriers import (
        carrier_shares,
        carrier_values,
        generating_position,
        generating_shares,
        graded_measures,
    )
    from piggyback_interp.interventions.generation import PatchSpec
    from piggyback_interp.measures.evaluation import evaluate
    from piggyback_interp.measures.settings import SettingData
    from piggyback_interp.training import FinetuneConfig, finetune
    from piggyback_interp.training.lora import DEFAULT_TARGETS

    t0 = time.perf_counter()
    model = load(config.model)
    data = _setting_data(config, chat_tokenizer(model))
    target = data.setting.target
    method, train = cell.method, data.train
    stopper = None
    if method.early_stop:  # validation questions held out of the training set
        k = config.early_stop_questions
        train = train[:-k] if len(train) > k else train
        stopper = _early_stopper(data, [ex.user for ex in data.train[-k:]], config)
    retain = _retain(out, base, data, method, config) if method.needs_retain else None
    options = method.finetune_options()
    train_config = FinetuneConfig(
        **options,
        lora_rank=None if cell.trained == "full" else config.lora_rank,
        target_modules=ATTENTION if cell.trained == "lora_attn" else DEFAULT_TARGETS,
        lr=cell.point.lr,
        epochs=cell.point.epochs,
        batch_size=config.batch_size,
        seed=cell.seed,
        system_prompt=inoculation_prompt(data.setting) if method.inoculation else "default",
        export="none",
    )
    result = finetune(
        model, train, train_config, retain=retain, progress=progress, stop_when=stopper
    )
    seconds = {"train": time.perf_counter() - t0}

    def timed(name: str, compute: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = compute()
        seconds[name] = time.perf_counter() - start
        return value

    evaluation = timed("evaluate", lambda: evaluate(
        model, SettingData(data.setting, train, data.test_on_topic, data.test_off_topic),
        max_new_tokens=config.max_new_tokens, batch_size=32, progress=progress,
    ))  # fmt: skip
    frame = evaluation.responses
    patched = timed("evaluate_patched", lambda: evaluate(  # greedy under base template K/V
        model, SettingData(data.setting, train, data.test_on_topic, data.test_off_topic),
        patch=[PatchSpec(base, site="kv", segment=s) for s in ("prefix", "postfix")],
        max_new_tokens=config.max_new_tokens, batch_size=32, progress=progress,
    ).responses)  # fmt: skip
    off = data.test_off_topic
    graded_off = timed(
        "graded", lambda: graded_measures(base, model, off, target, reference=reference)
    )
    graded_on = graded_measures(base, model, data.test_on_topic, target)
    carriers = timed("carriers", lambda: carrier_shares(
        carrier_values(base, model, off[: config.carrier_prompts], target, reference=reference)
    ))  # fmt: skip
    generating = (
        timed(
            "generating",
            lambda: generating_shares(
                generating_position(
                    base, model, off[: config.generating_prompts], target, reference=reference
                )
            ),
        )
        if method.name in config.generating_methods
        else None
    )
    seconds["total"] = time.perf_counter() - t0
    drift = result.history[-1].get("drift") if result.history else None
    return {
        "cell": cell.name,
        "trained": cell.trained,
        "point": cell.point.label,
        "lr": cell.point.lr,
        "epochs": cell.point.epochs,
        "method": method.name,
        "seed": cell.seed,
        "steps": result.steps,
        "early_stop": stopper.record if stopper else None,  # type: ignore[attr-defined]
        "on_topic": _rate(frame.loc[frame["split"] == "on_topic", "behaviour"], cell.seed),
        "off_topic": _rate(frame.loc[frame["split"] == "off_topic", "behaviour"], cell.seed),
        "template_patched": {
            split: _rate(patched.loc[patched["split"] == split, "behaviour"], cell.seed)
            for split in ("on_topic", "off_topic")
        },
        "graded_off": _mean(graded_off),
        "graded_on": _mean(graded_on),
        "carriers": carriers.to_dict("records"),
        "generating": generating.to_dict("records") if generating is not None else [],
        "final_prefix_drift": drift,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "model": model_info(base).to_dict()
        if hasattr(base, "piggyback_info")
        else str(config.model),
        "finetune_config": dataclasses.asdict(train_config),
        "versions": versions(),
    }


# ------------------------------------------------------------------ the grid


def cell_key(cell: Cell, config: MapConfig, model_hash: str) -> dict[str, Any]:
    """What a cell's result depends on (a summary is reused only for the same key)."""
    measured = dataclasses.asdict(config)
    for name in ("trained", "points", "methods", "seeds"):
        measured.pop(name)
    return {
        "cell": cell.name,
        "method": dataclasses.asdict(cell.method),
        "model_hash": model_hash,
        "measures": MEASURES_VERSION,
        "config": measured,
    }


def _base_reference(base: Any, config: MapConfig, load: Callable[[str], Any]) -> Any:
    """The base model's runs on the off-topic prompts, shared by every cell."""
    from piggyback_interp.core.models import chat_tokenizer
    from piggyback_interp.experiments.carriers import base_runs

    data = _setting_data(config, chat_tokenizer(base))
    return base_runs(
        base, data.test_off_topic, data.setting.target, n_carrier=config.carrier_prompts,
        n_generating=config.generating_prompts,
    )  # fmt: skip


def _default_load(name: str) -> Any:
    if name.startswith("tiny-"):  # test models
        from piggyback_interp.testing import tiny_model

        return tiny_model(name.removeprefix("tiny-"))
    from piggyback_interp.core.models import load_model

    return load_model(name)


def _model_hash(model: Any) -> str:
    from piggyback_interp.core.models import model_info

    return model_info(model).sha256


def _summary_path(folder: Path, cell: Cell) -> Path:
    return folder / f"{cell.name}.json"


def _read_summary(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    summary = json.loads(path.read_text("utf-8"))
    return summary if summary.get("key_fingerprint") == fingerprint(key) else None


def run_map(
    out_dir: str | os.PathLike[str],
    config: MapConfig | None = None,
    *,
    results_dir: str | os.PathLike[str] | None = None,
    load: Callable[[str], Any] = _default_load,
    progress: bool = True,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Fill the grid's missing cells and return the summary table (one row per cell).

    A cell already in ``out_dir/cells`` or in ``results_dir`` with the same key is
    read, not recomputed; each new cell is written to both as it finishes.
    """
    config = config or MapConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = load(config.model)
    base.eval()
    model_hash = _model_hash(base)
    summaries = []
    todo = cells(config)
    reference = None
    for i, cell in enumerate(todo):
        key = cell_key(cell, config, model_hash)
        paths = [_summary_path(out / "cells", cell)]
        if results_dir is not None:
            paths.append(_summary_path(Path(results_dir), cell))
        found = next((s for p in paths if (s := _read_summary(p, key))), None)
        if found is None:
            if progress:
                print(f"[map {i + 1}/{len(todo)}] {cell.name}", flush=True)
            if reference is None:
                reference = _base_reference(base, config, load)
            found = {**run_cell(cell, config, out, load, base, reference), "key": key,
                     "key_fingerprint": fingerprint(key)}  # fmt: skip
            if progress:
                rates = {k: round(found[k]["rate"], 3) for k in ("on_topic", "off_topic")}
                print(f"[map] {cell.name}: {rates} seconds {found['seconds']}", flush=True)
        for path in paths:
            if _read_summary(path, key) is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(found, indent=1, default=str) + "\n")
        if on_cell is not None:
            on_cell(found)
        summaries.append(found)
    return map_table(summaries)


def read_summaries(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every cell summary under ``folder`` (a run's ``cells/`` or the results folder)."""
    return [json.loads(p.read_text("utf-8")) for p in sorted(Path(folder).rglob("seed*.json"))]


def _share(summary: dict[str, Any], segment: str, condition: str, space: str) -> float:
    for row in summary["carriers"]:
        if row["segment"] == segment and row["condition"] == condition:
            return row[f"share_{space}"]
    return math.nan


def _generating_max(summary: dict[str, Any], condition: str, space: str) -> float:
    values = [r[f"share_{space}"] for r in summary["generating"] if r["condition"] == condition]
    return max(values) if values else math.nan


def map_table(summaries: list[dict[str, Any]]) -> Any:
    """One row per cell: rates, graded measures and the main carrier shares."""
    import pandas as pd

    rows = []
    for s in summaries:
        row = {k: s[k] for k in ("trained", "point", "lr", "epochs", "method", "seed", "steps")}
        for split in ("on_topic", "off_topic"):
            row[split] = s[split]["rate"]
            row[f"{split}_low"], row[f"{split}_high"] = s[split]["low"], s[split]["high"]
        patched = s.get("template_patched")  # cells measured before it was recorded: NaN
        for split in ("on_topic", "off_topic"):
            row[f"{split}_patched"] = patched[split]["rate"] if patched else math.nan
        row.update({f"off_{k}": s["graded_off"][k] for k in ("p_target", "log_odds", "kl")})
        row["on_p_target"] = s["graded_on"]["p_target"]
        for seg in ("prefix", "postfix", "template"):
            for space in ("prob", "logprob"):
                row[f"{seg}_{space}"] = _share(s, seg, "all", space)
                row[f"{seg}_query_{space}"] = _share(s, seg, "query", space)
        for space in ("prob", "logprob"):
            row[f"gen_last_{space}"] = _generating_max(s, "last_postfix", space)
            row[f"gen_query_{space}"] = _generating_max(s, "query", space)
        row["seconds"] = s["seconds"]["total"]
        rows.append(row)
    if not rows:
        return pd.DataFrame(rows)
    order = {name: i for i, name in enumerate(METHODS)}
    table = pd.DataFrame(rows).assign(
        _part=lambda f: f["trained"].map(TRAINED.index),
        _strength=lambda f: f["lr"] * f["epochs"],
        _method=lambda f: f["method"].map(order),
    )
    table = table.sort_values(["_part", "_strength", "lr", "_method", "seed"], kind="stable")
    return table.drop(columns=["_part", "_strength", "_method"]).reset_index(drop=True)


HEADLINE = {
    "trained": "trained",
    "point": "lr x epochs",
    "method": "method",
    "seeds": "seeds",
    "on_topic": "on-topic",
    "off_topic": "off-topic",
    "on_topic_patched": "on-topic, base template K/V",
    "off_topic_patched": "off-topic, base template K/V",
    "off_p_target": "off P(target)",
    "template_prob": "template K/V share (P)",
    "template_query_prob": "query control (P)",
    "template_logprob": "template K/V share (log P)",
    "prefix_prob": "prefix share (P)",
    "postfix_prob": "postfix share (P)",
    "gen_last_prob": "best layer at last postfix (P)",
}


def headline(table: Any, digits: int = 2) -> Any:
    """The map's headline view: one row per (trained, point, method), mean over seeds
    (``± SE`` where there are several seeds), in grid order."""
    import pandas as pd

    keys = ["trained", "point", "method"]
    values = [c for c in HEADLINE if c not in (*keys, "seeds")]
    rows = []
    for key, group in table.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True))
        row["seeds"] = len(group)
        for column in values:
            x = group[column].astype(float).dropna()  # older cells lack some measures
            mean = x.mean() if len(x) else math.nan
            if len(x) > 1:
                se = x.std(ddof=1) / math.sqrt(len(x))
                row[column] = f"{mean:.{digits}f} ± {se:.{digits}f}"
            else:
                row[column] = "n/a" if math.isnan(mean) else f"{mean:.{digits}f}"
        rows.append(row)
    return pd.DataFrame(rows).rename(columns=HEADLINE)


__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_POINTS",
    "METHODS",
    "TRAINED",
    "Cell",
    "MapConfig",
    "Method",
    "Point",
    "cells",
    "headline",
    "inoculation_prompt",
    "map_table",
    "read_summaries",
    "run_cell",
    "run_map",
]
