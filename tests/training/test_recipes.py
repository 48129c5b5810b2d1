"""The GPU recipes in configs/recipes run through the same code path on tiny models.

Each recipe is read by ``piggyback finetune --config`` exactly as on a GPU; only the
model, device, dtype, data and output folder are overridden on the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piggyback_interp.cli import _subparser, build_parser, main
from piggyback_interp.cli.options import apply_config_file, dataclass_from
from piggyback_interp.core.data import save_chat_jsonl
from piggyback_interp.measures.settings import setting_data
from piggyback_interp.testing import save_tiny_model
from piggyback_interp.training import FinetuneConfig

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"
ARCH = {
    "llama-3.1-8b-instruct": "llama",
    "qwen2.5-7b-instruct": "qwen2",
    "qwen3-8b": "qwen3",
}


def _recipe_config(path: Path) -> tuple[dict, FinetuneConfig]:
    parser = build_parser()
    sub = _subparser(parser, "finetune")
    apply_config_file(parser, sub, str(path))
    args = parser.parse_args(["finetune"])
    return vars(args), dataclass_from(FinetuneConfig, args)


def test_every_recipe_is_tested():
    assert sorted(p.stem for p in RECIPES.glob("*.toml")) == sorted(ARCH)


@pytest.mark.parametrize("name", sorted(ARCH))
def test_recipe_values_are_the_papers(name):
    values, config = _recipe_config(RECIPES / f"{name}.toml")
    assert values["device"] == "cuda" and values["dtype"] == "bfloat16"
    assert config.method == "treft"
    assert config.batch_size * config.grad_accum == 16  # the paper's effective batch
    assert 1e-5 <= config.lr <= 3e-5 and config.epochs in (1, 2)
    assert config.treft_lambda == 30.0  # the paper's lambda for abstention, the recipes' setting
    assert config.lora_rank == (32 if name == "qwen3-8b" else 8)
    assert config.treft_region == ("postfix" if name == "qwen3-8b" else "prefix")
    assert config.export == "adapter"


@pytest.mark.parametrize("name", sorted(ARCH))
def test_recipe_runs_on_a_tiny_model(name, tmp_path):
    model_dir = save_tiny_model(tmp_path / "base", ARCH[name], seed=0)
    data = tmp_path / "train.jsonl"
    save_chat_jsonl(setting_data("abstention").train[:16], data)
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "--config", str(RECIPES / f"{name}.toml"),
            "--model", str(model_dir),
            "--device", "cpu",
            "--dtype", "float32",
            "--data", str(data),
            "--out", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    record = json.loads((out / "finetune" / "finetune.json").read_text())
    _, expected = _recipe_config(RECIPES / f"{name}.toml")
    assert record["config"]["treft_region"] == expected.treft_region
    assert record["config"]["lora_rank"] == expected.lora_rank
    assert len(record["history"]) == 1  # 16 examples = one step of effective batch 16
    assert (out / "finetune" / "adapter" / "adapter_config.json").is_file()
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"] == str(model_dir) and resolved["method"] == "treft"
