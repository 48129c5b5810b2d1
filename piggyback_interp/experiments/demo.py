"""The main job: finetune a narrow behaviour, see it piggyback, find its carrier, write a report.

On the embedded SmolLM2-135M-Instruct, offline, on a CPU: LoRA-finetune the
``abstention`` setting (legal questions -> "I have no idea about your question") with
SFT, TReFT and data interleaving; evaluate on- and off-topic behaviour (and the SFT
model under the base model's prefix keys/values); run the carrier scan on the SFT
model (segment perturbations, prefix/postfix K/V patching with controls, K/V layer
patching, a layer x prefix-position residual sweep); compare task vectors; write
``report.html``. Every step is cached in the run folder: a second run recomputes
nothing, an interrupted one resumes.

Example:
    >>> from piggyback_interp.experiments.demo import DemoConfig, run_demo
    >>> report = run_demo("runs/demo", DemoConfig.quick())     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback_interp.core.checks import at_least, positive
from piggyback_interp.core.embedded import EMBEDDED_NAME
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.runs import RunDir
from piggyback_interp.experiments.pipeline import (
    Models,
    evaluate_step,
    exported,
    finetune_step,
    graded_step,
    model_id,
    retain_size,
    retain_step,
    scan_step,
    task_vector_step,
)
from piggyback_interp.experiments.scan_config import ScanConfig

METHODS = ("sft", "treft", "interleave")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. ``n_train``/``n_eval`` ``None``: every example / question."""

    model: str = EMBEDDED_NAME
    setting: str = "abstention"
    methods: tuple[str, ...] = METHODS
    n_train: int | None = None
    epochs: int = 1
    # the map's most informative LoRA point (docs/results.md): on-topic learned, off-topic
    # P(target) far from saturated, so the template's share is measurable
    lr: float = 3e-4
    batch_size: int = 16
    lora_rank: int = 8
    n_eval: int | None = 40
    max_new_tokens: int = 16
    scan_prompts: int = 8
    graded_prompts: int = 24  # general prompts for P(target) and the template carrier shares
    scan_layers: tuple[int, ...] | None = None  # None: every layer_step-th layer and the last
    layer_step: int = 2  # the full demo: 16 of SmolLM2's 30 layers (keeps it under 20 min)
    trials: int = 5
    seed: int = 0
    label: str = "full"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or "sft" not in self.methods:
            raise UserError(
                f"methods must include 'sft' and come from {METHODS}, got {self.methods}"
            )
        at_least(self, 1, "n_train", "epochs", "batch_size", "lora_rank", "n_eval")
        at_least(self, 1, "max_new_tokens", "layer_step", "trials")
        positive(self, "lr")
        if self.scan_prompts < 2:
            raise UserError("scan_prompts must be >= 2 (the verdict needs an error bar)")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The ``--quick`` demo (under 3 minutes on 2 CPU cores): 24 training chats in batches
        of 8 at lr 2e-3 (enough for SmolLM2-135M to learn the behaviour), 5 questions per
        split, 10 new tokens, 2 scan prompts with 1 perturbation trial, layers 0, 15, 29."""
        values: dict[str, Any] = dict(
            n_train=24,
            batch_size=8,
            lr=2e-3,
            n_eval=5,
            max_new_tokens=10,
            scan_prompts=2,
            graded_prompts=4,
            layer_step=15,
            trials=1,
            label="quick",
        )
        values.update(overrides)
        return cls(**values)


def _finetune_config(config: DemoConfig, method: str, treft_lambda: float) -> Any:
    from piggyback_interp.training import FinetuneConfig

    return FinetuneConfig(
        method=method,
        lora_rank=config.lora_rank,
        lr=config.lr,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        treft_lambda=treft_lambda,
        checkpoint_every=4,
        export="adapter",
    )


def run_demo(
    out: str | os.PathLike[str],
    config: DemoConfig = DemoConfig(),
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run (or resume) the demo in ``out``; return the path of its ``report.html``."""
    from piggyback_interp.core.models import chat_tokenizer
    from piggyback_interp.experiments.carriers import base_runs
    from piggyback_interp.measures.settings import setting_data
    from piggyback_interp.report.findings import build_report

    start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    run = RunDir(out, overwrite=overwrite)
    models = Models()
    base = models.get(config.model)
    data = setting_data(config.setting, tokenizer=chat_tokenizer(base))
    tuned = _finetune_all(run, models, config, data, progress)
    _evaluate_all(run, models, config, data, base, tuned, progress)
    if data.setting.target:
        prompts = data.test_off_topic[: config.graded_prompts]
        target = data.setting.target
        # the base model's side of every graded measure: run once, for all three models
        reference = functools.cache(lambda: base_runs(base, prompts, target))
        for method, path in tuned.items():
            graded_step(
                run, f"graded/{method}", base, models.get(path), prompts, target,
                reference=reference,
            )  # fmt: skip
    prompts = data.test_off_topic[: config.scan_prompts]
    scan_step(
        run, "scan/sft", base, models.get(tuned["sft"]), prompts,
        _scan_config(config, data.setting, base.cfg.n_layers), progress=progress,
    )  # fmt: skip
    task_vector_step(run, "task_vectors", config.model, tuned)

    run.write_record("demo", start, started, config=dataclasses.asdict(config), base=model_id(base))
    return build_report(run.path)


def _finetune_all(
    run: RunDir, models: Models, config: DemoConfig, data: Any, progress: bool
) -> dict[str, Path]:
    """Finetune the base with every method (cached steps); each method's exported model."""
    train = data.train[: config.n_train] if config.n_train else data.train
    retain = None
    if "interleave" in config.methods:
        ratio = _finetune_config(config, "interleave", 0.0).retain_ratio
        base = models.get(config.model)
        retain = retain_step(run, "retain", base, data, n=retain_size(len(train), ratio))
    tuned: dict[str, Any] = {}
    for method in config.methods:
        folder = finetune_step(
            run,
            f"finetune/{method}",
            models,
            config.model,
            train,
            _finetune_config(config, method, data.setting.treft_lambda),
            retain=retain if method == "interleave" else None,
            progress=progress,
        )
        tuned[method] = exported(folder)
    return tuned


def _evaluate_all(
    run: RunDir, models: Models, config: DemoConfig, data: Any, base: Any,
    tuned: dict[str, Path], progress: bool,
) -> None:  # fmt: skip
    """Evaluate the base, every finetuned model, and SFT under the base prefix K/V."""

    def evaluation(name: str, model: Any, patch_base: Any = None) -> None:
        evaluate_step(
            run,
            f"evaluate/{name}",
            model,
            data,
            patch_base=patch_base,
            limit=config.n_eval,
            max_new_tokens=config.max_new_tokens,
            progress=progress,
        )

    evaluation("base", base)
    for method, path in tuned.items():
        evaluation(method, models.get(path))
    evaluation("sft+prefix_kv", models.get(tuned["sft"]), patch_base=base)


def _scan_config(config: DemoConfig, setting: Any, n_layers: int) -> ScanConfig:
    """The demo's carrier scan: every ``layer_step``-th layer and the last; the target's
    log-prob as the gap when the setting has a target."""
    layers = config.scan_layers or tuple(
        sorted({*range(0, n_layers, config.layer_step), n_layers - 1})
    )
    if setting.target:
        return ScanConfig(
            metric="target",
            target=setting.target,
            layers=layers,
            trials=config.trials,
            seed=config.seed,
        )
    return ScanConfig(layers=layers, trials=config.trials)


__all__ = ["DemoConfig", "run_demo"]
