"""One cell of the map: finetune a fresh copy on the setting, then measure it.

:func:`run_cell` trains with the cell's method, strength and trained part, and records
greedy on/off-topic rates (also under the base template K/V), graded measures, carrier
shares and the generating-position test (:mod:`~piggyback_interp.experiments.carriers`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback_interp.core.provenance import versions
from piggyback_interp.experiments.map_config import ATTENTION, Cell, MapConfig, Method

# ------------------------------------------------------------------ data


def setting_data_for(config: MapConfig, tokenizer: Any) -> Any:
    """The setting's data, cut to the config's ``max_train`` and ``max_test``."""
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
    from piggyback_interp.core.models import chat_tokenizer

    t0 = time.perf_counter()
    model = load(config.model)
    data = setting_data_for(config, chat_tokenizer(model))
    trained = _train(cell, config, out, model, base, data, progress)
    seconds = {"train": time.perf_counter() - t0}
    measures = _measure(
        cell, config, model, base, data, trained.train, reference, progress, seconds
    )
    seconds["total"] = time.perf_counter() - t0
    return _summary(cell, config, base, trained, measures, seconds)


@dataclass
class _Trained:
    """What training a cell gave: the finetune result, the chats trained on, the early
    stopper (or None) and the finetune config."""

    result: Any
    train: Any
    stopper: Any
    config: Any


def _train(cell: Cell, config: MapConfig, out: Path, model: Any, base: Any, data: Any,
           progress: bool) -> _Trained:  # fmt: skip
    """Finetune ``model`` in place with the cell's method, strength and trained part."""
    from piggyback_interp.training import FinetuneConfig, finetune
    from piggyback_interp.training.lora import DEFAULT_TARGETS

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
    return _Trained(result, train, stopper, train_config)


def _measure(cell: Cell, config: MapConfig, model: Any, base: Any, data: Any, train: Any,
             reference: Any, progress: bool, seconds: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Every measure of a trained cell (each one's time into ``seconds``)."""
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

    def timed(name: str, compute: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = compute()
        seconds[name] = time.perf_counter() - start
        return value

    target = data.setting.target
    evaluation = timed("evaluate", lambda: evaluate(
        model, SettingData(data.setting, train, data.test_on_topic, data.test_off_topic),
        max_new_tokens=config.max_new_tokens, batch_size=32, progress=progress,
    ))  # fmt: skip
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
        if cell.method.name in config.generating_methods
        else None
    )
    return {"responses": evaluation.responses, "patched": patched, "graded_off": graded_off,
            "graded_on": graded_on, "carriers": carriers, "generating": generating}  # fmt: skip


def _summary(cell: Cell, config: MapConfig, base: Any, trained: _Trained,
             measures: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """A cell's JSON-able summary."""
    from piggyback_interp.core.models import model_info

    frame, patched, generating = measures["responses"], measures["patched"], measures["generating"]
    result, stopper = trained.result, trained.stopper
    drift = result.history[-1].get("drift") if result.history else None
    return {
        "cell": cell.name,
        "trained": cell.trained,
        "point": cell.point.label,
        "lr": cell.point.lr,
        "epochs": cell.point.epochs,
        "method": cell.method.name,
        "seed": cell.seed,
        "steps": result.steps,
        "early_stop": stopper.record if stopper else None,  # type: ignore[attr-defined]
        "on_topic": _rate(frame.loc[frame["split"] == "on_topic", "behaviour"], cell.seed),
        "off_topic": _rate(frame.loc[frame["split"] == "off_topic", "behaviour"], cell.seed),
        "template_patched": {
            split: _rate(patched.loc[patched["split"] == split, "behaviour"], cell.seed)
            for split in ("on_topic", "off_topic")
        },
        "graded_off": _mean(measures["graded_off"]),
        "graded_on": _mean(measures["graded_on"]),
        "carriers": measures["carriers"].to_dict("records"),
        "generating": generating.to_dict("records") if generating is not None else [],
        "final_prefix_drift": drift,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "model": model_info(base).to_dict()
        if hasattr(base, "piggyback_info")
        else str(config.model),
        "finetune_config": dataclasses.asdict(trained.config),
        "versions": versions(),
    }


def base_reference(base: Any, config: MapConfig) -> Any:
    """The base model's runs on the off-topic prompts, shared by every cell."""
    from piggyback_interp.core.models import chat_tokenizer
    from piggyback_interp.experiments.carriers import base_runs

    data = setting_data_for(config, chat_tokenizer(base))
    return base_runs(
        base, data.test_off_topic, data.setting.target, n_carrier=config.carrier_prompts,
        n_generating=config.generating_prompts,
    )  # fmt: skip


__all__ = ["base_reference", "inoculation_prompt", "run_cell", "setting_data_for"]
