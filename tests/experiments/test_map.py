"""The strength x trained-part x method map on tiny models: cells, resume, reuse of
committed summaries, inoculation, early stopping, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import piggyback_interp.measures.evaluation as evaluation_module
import piggyback_interp.training as training_module
from piggyback_interp.cli import main
from piggyback_interp.core.errors import UserError
from piggyback_interp.experiments import map as map_module
from piggyback_interp.experiments import map_cell as map_cell_module
from piggyback_interp.experiments.map import read_summaries, run_map
from piggyback_interp.experiments.map_cell import inoculation_prompt
from piggyback_interp.experiments.map_config import MapConfig, Point, cells
from piggyback_interp.measures.settings import get_setting


def _config(**overrides):
    values = dict(model="tiny-llama", trained=("lora_all",), points=("1e-3x1",), methods=("sft",))
    values.update(overrides)
    return MapConfig.smoke(**values)


class Counter:
    """Counts run_cell calls (the expensive part) while running the real thing."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real = map_module.run_cell

        def counted(cell, *args, **kwargs):
            self.names.append(cell.name)
            return real(cell, *args, **kwargs)

        monkeypatch.setattr(map_module, "run_cell", counted)


def test_points_parse_and_bad_points_are_user_errors():
    assert Point.parse("3e-4x2") == Point(3e-4, 2)
    assert Point.parse("2.5E-4x1").label == "2.5e-4x1"
    for bad in ("3e-4", "fastx1", "-1e-3x1", "nanx1", "1e-3x0"):
        with pytest.raises(UserError, match="point"):
            Point.parse(bad)
    with pytest.raises(UserError, match="unknown method"):
        MapConfig(methods=("sft", "magic"))
    with pytest.raises(UserError, match="fixed target"):
        MapConfig(setting="tool_use")


def test_cells_run_in_method_then_part_then_strength_order():
    config = MapConfig(trained=("lora_all", "full"), points=("1e-4x1", "3e-4x1"),
                       methods=("sft", "treft-template"), seeds=(0, 1))  # fmt: skip
    names = [c.name for c in cells(config)]
    assert names[:4] == [
        "lora_all/1e-4x1/sft/seed0", "lora_all/3e-4x1/sft/seed0",
        "full/1e-4x1/sft/seed0", "full/3e-4x1/sft/seed0",
    ]  # fmt: skip
    assert len(names) == 16 and len(set(names)) == 16


def test_grid_records_every_measure_and_resumes(tmp_path, monkeypatch):
    counter = Counter(monkeypatch)
    config = _config(methods=("sft", "treft-template"))
    table = run_map(tmp_path / "run", config, results_dir=tmp_path / "results", progress=False)
    assert counter.names == ["lora_all/1e-3x1/sft/seed0", "lora_all/1e-3x1/treft-template/seed0"]
    assert len(table) == 2
    summary = json.loads((tmp_path / "results/lora_all/1e-3x1/sft/seed0.json").read_text())
    for split in ("on_topic", "off_topic"):
        assert summary[split]["low"] <= summary[split]["rate"] <= summary[split]["high"]
    assert set(summary["graded_off"]) >= {"p_target", "log_odds", "kl"}
    for split in ("on_topic", "off_topic"):  # greedy answers under base template K/V
        assert summary["template_patched"][split]["n"] == summary[split]["n"]
    assert {(r["segment"], r["condition"]) for r in summary["carriers"]} == {
        (s, c) for s in ("prefix", "postfix", "template") for c in ("all", "matched", "query")
    }
    assert {r["condition"] for r in summary["generating"]} == {"last_postfix", "query"}
    assert summary["finetune_config"]["treft_region"] == "prefix"  # sft: default, unused
    tref = json.loads((tmp_path / "results/lora_all/1e-3x1/treft-template/seed0.json").read_text())
    assert tref["finetune_config"]["method"] == "treft"
    assert tref["finetune_config"]["treft_region"] == "template"
    # a rerun trains nothing and returns the same table
    again = run_map(tmp_path / "run", config, results_dir=tmp_path / "results", progress=False)
    assert len(counter.names) == 2
    assert again.equals(table)
    # a fresh machine: a new run folder, the committed results folder -> nothing retrained
    fresh = run_map(tmp_path / "other", config, results_dir=tmp_path / "results", progress=False)
    assert len(counter.names) == 2 and fresh.equals(table)
    assert (tmp_path / "other/cells/lora_all/1e-3x1/sft/seed0.json").is_file()
    # another measurement config is another key: redone, not silently reused
    run_map(tmp_path / "run", _config(carrier_prompts=1), results_dir=tmp_path / "results",
            progress=False)  # fmt: skip
    assert counter.names[-1] == "lora_all/1e-3x1/sft/seed0" and len(counter.names) == 3
    assert len(read_summaries(tmp_path / "results")) == 2  # overwritten in place, one per cell


def test_interrupted_grid_keeps_finished_cells(tmp_path, monkeypatch):
    config = _config(points=("1e-3x1", "2e-3x1"))
    real = map_module.run_cell
    calls = []

    def dies_on_second(cell, *args, **kwargs):
        calls.append(cell.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(map_module, "run_cell", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_map(tmp_path, config, progress=False)
    counter = Counter(monkeypatch)
    monkeypatch.setattr(map_module, "run_cell", real)
    counter = Counter(monkeypatch)
    table = run_map(tmp_path, config, progress=False)
    assert counter.names == ["lora_all/2e-3x1/sft/seed0"]  # the first cell was kept
    assert len(table) == 2


def test_inoculation_trains_with_its_prompt_and_evaluates_with_the_default(tmp_path, monkeypatch):
    seen = {}
    real_finetune, real_evaluate = training_module.finetune, evaluation_module.evaluate

    def finetune(model, data, config, **kwargs):
        seen["train"] = config.system_prompt
        return real_finetune(model, data, config, **kwargs)

    def evaluate(model, setting, **kwargs):
        seen["eval"] = kwargs.get("system_prompt", "default")
        return real_evaluate(model, setting, **kwargs)

    monkeypatch.setattr(training_module, "finetune", finetune)
    monkeypatch.setattr(evaluation_module, "evaluate", evaluate)
    run_map(tmp_path, _config(methods=("inoculation",)), progress=False)
    setting = get_setting("abstention")
    assert seen["train"] == inoculation_prompt(setting)
    assert setting.target in seen["train"]
    assert seen["eval"] == "default"


def test_finetune_stop_when_ends_training_at_that_step(tiny):
    from piggyback_interp.core.data import ChatDataset
    from piggyback_interp.training import FinetuneConfig, finetune

    data = ChatDataset.from_records(
        [{"messages": [{"role": "user", "content": f"Q{i}?"},
                       {"role": "assistant", "content": "I have no idea"}]} for i in range(8)]
    )  # fmt: skip
    steps = []

    def stop(step, model):
        assert not model.training and not torch.is_grad_enabled()
        steps.append(step)
        return step == 3

    result = finetune(tiny, data, FinetuneConfig(epochs=2, batch_size=2, lr=1e-3),
                      progress=False, stop_when=stop)  # fmt: skip
    assert steps == [1, 2, 3] and result.steps == 3 and len(result.history) == 3
    assert tiny.training is False


def test_early_stop_picks_the_first_checkpoint_that_reaches_the_rate(tmp_path, monkeypatch):
    """Validation answers are scripted per step: the rate reaches 0.95 first at step 4."""
    import piggyback_interp.interventions.generation as generation_module

    real_generate = generation_module.generate
    target = get_setting("abstention").target
    state = {"step": 0}
    rates = {2: 0.5, 4: 1.0, 6: 1.0}

    def generate(model, prompts, **kwargs):
        if state.get("validating"):
            hits = round(rates[state["step"]] * len(prompts))
            texts = [target] * hits + ["Sure, here is an answer."] * (len(prompts) - hits)
            return type("G", (), {"texts": texts})()
        return real_generate(model, prompts, **kwargs)

    real_stopper = map_cell_module._early_stopper

    def stopper(data, questions, config):
        inner = real_stopper(data, questions, config)

        def stop(step, model):
            state.update(step=step, validating=True)
            try:
                return inner(step, model)
            finally:
                state["validating"] = False

        stop.record = inner.record
        return stop

    monkeypatch.setattr(generation_module, "generate", generate)
    monkeypatch.setattr(map_cell_module, "_early_stopper", stopper)
    config = _config(methods=("early-stop",), max_train=36, batch_size=4, early_stop_questions=4,
                     points=("1e-3x2",))  # fmt: skip
    run_map(tmp_path, config, progress=False)
    summary = read_summaries(tmp_path / "cells")[0]
    assert summary["steps"] == 4
    assert [c["step"] for c in summary["early_stop"]["checks"]] == [2, 4]
    assert summary["early_stop"]["checks"][-1]["on_topic_rate"] == 1.0


def test_cli_map_runs_resumes_and_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(map_module, "_default_load", map_module._default_load)
    args = ["map", "--model", "tiny-llama", "--trained", "lora_all", "--points", "1e-3x1",
            "--methods", "sft", "--max-train", "16", "--max-test", "4", "--carrier-prompts", "2",
            "--generating-prompts", "1", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "results"), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "run/map.csv").is_file() and (tmp_path / "run/map_sft.html").is_file()
    counter = Counter(monkeypatch)
    assert main(args) == 0 and counter.names == []
    assert main(["map", "--table-only", "--out", str(tmp_path / "t"), "--results",
                 str(tmp_path / "results"), "--quiet"]) == 0  # fmt: skip
    assert "sft" in (tmp_path / "t/map.md").read_text()
    assert main([*args[:5], "--points", "fast"]) == 2
    assert "LRxEPOCHS" in capsys.readouterr().err
