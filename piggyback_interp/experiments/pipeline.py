"""The cached steps the ``piggyback`` commands and the demo are made of.

Each step takes a :class:`~piggyback_interp.core.runs.RunDir`, a step name and its inputs,
runs only if that step has not finished before with the same inputs (model hashes,
data hashes, configs), and returns what it produced, loaded from the step's folder.
Models are loaded once per process by :class:`Models`.

Example:
    >>> from piggyback_interp.core.runs import RunDir
    >>> models = Models()                                        # doctest: +SKIP
    >>> run = RunDir("runs/example")                             # doctest: +SKIP
    >>> ev = evaluate_step(run, "evaluate/base", models.get("smollm2-135m-instruct"),
    ...                    "abstention", limit=4)                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from piggyback_interp.core.data import ChatDataset, load_chat_jsonl, save_chat_jsonl
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.runs import RunDir, read_json
from piggyback_interp.experiments.registry import EXPERIMENTS
from piggyback_interp.experiments.scan import ScanResult
from piggyback_interp.experiments.scan_config import ScanConfig
from piggyback_interp.experiments.scan_experiments import check_gap
from piggyback_interp.measures.evaluation import Evaluation
from piggyback_interp.measures.settings import (
    SettingData,
    get_setting,
    qa_dataset,
    retain_questions,
)

CHECKPOINT = "checkpoint.pt"  # a resumable step's own checkpoint, inside its folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Models:
    """Load each model once: ``get(name)`` for a hub id, a local directory or a LoRA adapter."""

    def __init__(
        self, *, device: str = "cpu", dtype: str = "float32", placement: Any = None
    ) -> None:
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.device, self.dtype, self.placement = device, dtype, placement
        self._loaded: dict[str, Any] = {}

    def get(self, name: str | os.PathLike[str]) -> Any:
        from piggyback_interp.core.models import load_model

        key = str(name)
        if key not in self._loaded:
            self._loaded[key] = load_model(
                key, device=self.device, dtype=DTYPES[self.dtype], placement=self.placement
            )
        return self._loaded[key]

    def fresh(self, name: str | os.PathLike[str]) -> Any:
        """A new copy (to finetune in place, on one device), not kept."""
        from piggyback_interp.core.models import load_model

        return load_model(str(name), device=self.device, dtype=DTYPES[self.dtype])


def model_id(model: Any) -> dict[str, str]:
    """The model's name and weights hash, for provenance."""
    from piggyback_interp.core.models import model_info

    info = model_info(model)
    return {"name": info.display_name, "sha256": info.sha256}


def model_key(model: Any) -> dict[str, str]:
    """What identifies a model in a step key: its weights hash (a display name may change
    between versions; the weights do not), or its name where no hash is known (hub ids)."""
    ident = model_id(model)
    return {"sha256": ident["sha256"]} if ident["sha256"] != "unknown" else ident


def non_default(config: Any) -> dict[str, Any]:
    """A config dataclass's fields that differ from their defaults: a step key that stays
    the same when a later version adds an option (at its default)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != f.default
    }


def dataset_hash(data: ChatDataset | Sequence[Any]) -> str:
    """sha256 of a dataset's examples (order matters)."""
    digest = hashlib.sha256()
    for example in data:
        digest.update(repr(example).encode())
    return digest.hexdigest()


# --- steps ----------------------------------------------------------------------------


def retain_step(
    run: RunDir, name: str, base: Any, data: SettingData, *, n: int, max_new_tokens: int = 48
) -> ChatDataset:
    """``n`` aligned answers of ``base`` to questions outside the setting's domain (for interleaving)."""
    from piggyback_interp.interventions.generation import generate

    def compute(folder: Path) -> None:
        questions = retain_questions(data.setting, n, seed=0)
        answers = generate(base, questions, max_new_tokens=max_new_tokens, batch_size=32).texts
        pairs = [(q, a) for q, a in zip(questions, answers, strict=True) if a.strip()]
        save_chat_jsonl(qa_dataset(pairs), folder / "retain.jsonl")

    key = {"base": model_key(base), "setting": data.setting.name, "n": n, "tokens": max_new_tokens}
    return load_chat_jsonl(run.step(name, key, compute) / "retain.jsonl")


def retain_size(n_train: int, retain_ratio: float) -> int:
    """How many retain examples make ``retain_ratio`` of a mixture with ``n_train`` examples."""
    return math.ceil(n_train * retain_ratio / (1 - retain_ratio))


def finetune_step(
    run: RunDir,
    name: str,
    models: Models,
    model_name: str,
    data: ChatDataset,
    config: Any,
    *,
    retain: ChatDataset | None = None,
    progress: bool = True,
    fsdp: bool = False,
) -> Path:
    """Finetune a fresh copy of ``model_name`` (resuming its checkpoint); return the step folder.

    The folder holds ``finetune.json`` and the exported model (``adapter/`` and/or
    ``model/``, per ``config.export``); load it with ``models.get(folder / "adapter")``.
    ``fsdp`` shards the training over the processes of a launcher; it does not change
    the result, so it is not part of the step's key.
    """
    from piggyback_interp.training import finetune

    def compute(folder: Path) -> None:
        model = models.fresh(model_name)
        finetune(
            model,
            data,
            config,
            out_dir=folder,
            retain=retain,
            resume=True,
            progress=progress,
            fsdp=fsdp,
        )

    key = {
        "model": model_name,
        "data": dataset_hash(data),
        "retain": dataset_hash(retain) if retain is not None else None,
        "config": non_default(config),
    }
    return run.step(name, key, compute)


def exported(folder: Path) -> Path:
    """The loadable model a finetune step exported: its adapter, else its merged model."""
    for sub in ("adapter", "model"):
        if (folder / sub).is_dir():
            return folder / sub
    raise FileNotFoundError(
        f"{folder} holds no exported model (adapter/ or model/): finetune with export != 'none'"
    )


def evaluate_step(
    run: RunDir,
    name: str,
    model: Any,
    data: SettingData | str,
    *,
    patch_base: Any = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    seeds: Sequence[int] = (0,),
    temperature: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
) -> Evaluation:
    """Evaluate on- and off-topic behaviour (with ``patch_base``: under the base prefix K/V)."""
    from piggyback_interp.interventions.generation import PatchSpec
    from piggyback_interp.measures.evaluation import evaluate

    setting = data.setting if isinstance(data, SettingData) else get_setting(data)
    patch = PatchSpec(patch_base, site="kv", segment="prefix") if patch_base is not None else None

    def compute(folder: Path) -> None:
        evaluation = evaluate(
            model,
            data,
            patch=patch,
            limit=limit,
            max_new_tokens=max_new_tokens,
            seeds=seeds,
            temperature=temperature,
            batch_size=batch_size,
            progress=progress,
        )
        evaluation.save(folder / "evaluation.parquet")

    key = {
        "model": model_key(model),
        "patch_base": model_key(patch_base) if patch_base is not None else None,
        "setting": setting.name,
        "data": dataset_hash(data.test_on_topic + data.test_off_topic)
        if isinstance(data, SettingData)
        else None,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "seeds": list(seeds),
        "temperature": temperature,
    }
    return Evaluation.load(run.step(name, key, compute) / "evaluation.parquet")


def experiment_step(
    run: RunDir,
    name: str,
    part: str,
    base: Any,
    model: Any,
    prompts: Sequence[str],
    config: ScanConfig,
    *,
    progress: bool = True,
) -> Any:
    """One experiment of the carrier scan (``part``, a name in
    :data:`~piggyback_interp.experiments.registry.EXPERIMENTS`), cached in
    ``<run>/<name>/<part>``: ``piggyback perturb`` and ``piggyback scan`` on one folder share it.

    Its cache key is the models, the prompts and the experiment's own ScanConfig fields.
    A resumable experiment (the sweeps ``layers``, ``resid``) checkpoints into
    ``checkpoint.pt`` in the step folder: an interrupted one resumes from the cells it
    finished. Identical models (a zero gap on every prompt) raise
    :class:`~piggyback_interp.experiments.scan_experiments.ZeroGapError` before any work."""
    experiment = EXPERIMENTS[part]

    def compute(folder: Path) -> None:
        check_gap(base, model, list(prompts), config)
        sweeps = {"checkpoint": folder / CHECKPOINT} if experiment.resumable else {}
        value = experiment.run(base, model, list(prompts), config, progress=progress, **sweeps)
        experiment.save(value, folder.parent)

    settings = {k: v for k, v in non_default(config).items() if k in experiment.fields}
    key = {
        "base": model_key(base),
        "model": model_key(model),
        "prompts": list(prompts),
        "config": settings,
    }
    run.step(f"{name}/{part}", key, compute)
    return experiment.load(run.folder(name))


def scan_step(
    run: RunDir,
    name: str,
    base: Any,
    model: Any,
    prompts: Sequence[str],
    config: ScanConfig,
    *,
    progress: bool = True,
) -> ScanResult:
    """The carrier scan of ``base`` vs ``model`` on ``prompts``: each experiment a cached step."""
    parts = {
        part: experiment_step(run, name, part, base, model, prompts, config, progress=progress)
        for part, experiment in EXPERIMENTS.items()
        if experiment.enabled(config)
    }
    result = ScanResult.from_parts(config, parts)
    result.save(run.folder(name))
    return result


def task_vector_step(
    run: RunDir, name: str, base: str | os.PathLike[str], finetuned: Mapping[str, Any]
) -> dict[str, Any]:
    """Per-layer norms and pairwise cosines of ``{label: finetuned}`` task vectors vs ``base``.

    ``finetuned`` values are directories (merged models or LoRA adapters) or loaded
    models. Returns ``{"norms": frame, "cosine": frame}``.
    """
    import pandas as pd

    from piggyback_interp.analysis.task_vectors import cosine_similarity, task_vector
    from piggyback_interp.core.io import atomic_write_parquet

    def compute(folder: Path) -> None:
        vectors = {label: task_vector(base, source) for label, source in finetuned.items()}
        norms = pd.concat(
            [v.layer_norms().assign(method=label) for label, v in vectors.items()],
            ignore_index=True,
        )
        atomic_write_parquet(norms, folder / "norms.parquet")
        if len(vectors) > 1:
            atomic_write_parquet(cosine_similarity(vectors), folder / "cosine.parquet")

    def ident(source: Any) -> Any:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            record = read_json(path.parent / "step.json")
            return record["fingerprint"] if record else str(path.resolve())
        return model_key(source)

    key = {"base": str(base), "finetuned": {k: ident(v) for k, v in finetuned.items()}}
    folder = run.step(name, key, compute)
    cosine = folder / "cosine.parquet"
    return {
        "norms": pd.read_parquet(folder / "norms.parquet"),
        "cosine": pd.read_parquet(cosine) if cosine.exists() else None,
    }


def graded_step(
    run: RunDir,
    name: str,
    base: Any,
    model: Any,
    prompts: Sequence[str],
    target: str,
    *,
    reference: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Graded measures (P(target), log-odds, KL) and template carrier shares of ``model``
    on ``prompts`` (:mod:`piggyback_interp.experiments.carriers`), cached. ``reference``:
    returns the base model's runs on the same prompts
    (:func:`~piggyback_interp.experiments.carriers.base_runs`), called only if the step
    runs; pass one cached callable to every model's step and the base runs once."""

    from piggyback_interp.core.io import atomic_write_parquet
    from piggyback_interp.experiments.carriers import carrier_values, graded_measures

    def compute(folder: Path) -> None:
        ref = reference() if reference is not None else None
        atomic_write_parquet(
            graded_measures(base, model, prompts, target, reference=ref),
            folder / "graded.parquet",
        )
        atomic_write_parquet(
            carrier_values(base, model, prompts, target, reference=ref),
            folder / "carriers.parquet",
        )

    key = {"base": model_key(base), "model": model_key(model), "prompts": list(prompts),
           "target": target}  # fmt: skip
    return load_graded(run.step(name, key, compute))


def load_graded(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`graded_step` saved: ``graded`` (per prompt), ``values`` (per patch and
    prompt) and ``shares`` (per segment and condition)."""
    import pandas as pd

    from piggyback_interp.experiments.carriers import carrier_shares

    folder = Path(folder)
    values = pd.read_parquet(folder / "carriers.parquet")
    return {
        "graded": pd.read_parquet(folder / "graded.parquet"),
        "values": values,
        "shares": carrier_shares(values),
    }


__all__ = [
    "Models",
    "dataset_hash",
    "evaluate_step",
    "experiment_step",
    "exported",
    "finetune_step",
    "graded_step",
    "load_graded",
    "model_id",
    "model_key",
    "retain_size",
    "retain_step",
    "scan_step",
    "task_vector_step",
]
