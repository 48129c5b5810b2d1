"""The Table 5 reproduction: a two-step smoke run on a tiny model, resume, and the CLI."""

import pandas as pd
import pytest

from piggyback_interp.cli import main
from piggyback_interp.core.errors import StaleRunError
from piggyback_interp.experiments.reproduce import PATCHED, Table5Config, reproduce_table5, table5
from piggyback_interp.measures.evaluation import Evaluation
from piggyback_interp.testing import tiny_model


def _counting_loader(calls):
    def load(name):
        calls.append(name)
        return tiny_model(name.removeprefix("tiny-"))

    return load


def test_smoke_run_writes_the_table_and_resumes(tmp_path):
    config = Table5Config.smoke(model="tiny-llama", settings=("abstention",))
    calls = []
    summary = reproduce_table5(tmp_path, config, load=_counting_loader(calls), progress=False)
    # base + one fresh model per method (the patched SFT row reuses the SFT model)
    assert calls == ["tiny-llama"] * 4
    methods = ["base", "sft", PATCHED, "treft", "interleave"]
    assert summary["method"].drop_duplicates().tolist() == methods
    for name in ("table5.md", "summary.csv", "responses.parquet", "run.json", "config.json"):
        assert (tmp_path / name).is_file(), name
    responses = pd.read_parquet(tmp_path / "responses.parquet")
    assert len(responses) == len(methods) * 2 * 4  # 4 questions per split
    # the table's rates are the responses' detector hits
    sft = Evaluation.load(tmp_path / "cells" / "abstention" / "sft-seed0.parquet").responses
    row = summary.set_index(["method", "split"]).loc[("sft", "off_topic")]
    assert row["mean"] == pytest.approx(sft.loc[sft["split"] == "off_topic", "behaviour"].mean())
    assert (tmp_path / "retain" / "abstention.jsonl").is_file()
    assert "| abstention | treft |" in (tmp_path / "table5.md").read_text()

    # a second run finds every cell on disk: only the base model is loaded
    calls.clear()
    again = reproduce_table5(tmp_path, config, load=_counting_loader(calls), progress=False)
    assert calls == ["tiny-llama"]
    pd.testing.assert_frame_equal(again, summary)

    # a finished cell is lost: only that model is trained again
    (tmp_path / "cells" / "abstention" / "treft-seed0.parquet").unlink()
    calls.clear()
    reproduce_table5(tmp_path, config, load=_counting_loader(calls), progress=False)
    assert calls == ["tiny-llama"] * 2

    with pytest.raises(StaleRunError, match="another config"):
        reproduce_table5(tmp_path, Table5Config.smoke(model="tiny-llama"), progress=False)


def test_reverse_walk_shares_a_folder_and_gives_the_same_table(tmp_path):
    config = Table5Config.smoke(model="tiny-llama", settings=("refusal",))
    forward = reproduce_table5(tmp_path / "a", config, progress=False)
    # a reverse walker that finds half the cells written by a forward one
    reverse_dir = tmp_path / "b"
    reproduce_table5(reverse_dir, config, progress=False)
    for cell in ("sft-seed0", "sft+prefix_kv-seed0"):
        (reverse_dir / "cells" / "refusal" / f"{cell}.parquet").unlink()
    calls = []
    again = reproduce_table5(
        reverse_dir, config, load=_counting_loader(calls), progress=False, reverse=True
    )
    assert calls == ["tiny-llama"] * 2  # the base, and one SFT model for both SFT cells
    pd.testing.assert_frame_equal(again, forward)
    run = (reverse_dir / "run.json").read_text()
    assert '"refusal/sft-seed0"' in run


def test_table5_formats_mean_se_and_interval():
    summary = pd.DataFrame(
        {
            "setting": ["abstention"] * 2,
            "method": ["sft"] * 2,
            "split": ["on_topic", "off_topic"],
            "metric": ["behaviour"] * 2,
            "mean": [1.0, 0.5],
            "se": [0.0, 0.1],
            "low": [1.0, 0.3],
            "high": [1.0, 0.7],
            "n_seeds": [3, 3],
            "n": [156, 390],
        }
    )
    row = table5(summary).iloc[0]
    assert row["on-topic rate"] == "1.00 ± 0.00 [1.00, 1.00]"
    assert row["off-topic rate"] == "0.50 ± 0.10 [0.30, 0.70]"
    assert row["n (on / off)"] == "52/130"


def test_treft_lambda_and_region_reach_the_finetune_and_old_runs_resume(tmp_path):
    import json

    config = Table5Config.smoke(
        model="tiny-llama", settings=("refusal",), methods=("sft", "treft"),
        treft_lambda=7.0, treft_region="template",
    )  # fmt: skip
    reproduce_table5(tmp_path, config, progress=False)
    trained = json.loads(
        (tmp_path / "train" / "refusal" / "treft-seed0" / "finetune.json").read_text()
    )
    assert trained["config"]["treft_lambda"] == 7.0
    assert trained["config"]["treft_region"] == "template"
    assert "TReFT on the template with lambda 7.0" in (tmp_path / "table5.md").read_text()
    # the default: each setting's own lambda (refusal: 20), on the prefix
    default = Table5Config.smoke(
        model="tiny-llama", settings=("refusal",), methods=("sft", "treft")
    )
    reproduce_table5(tmp_path / "d", default, progress=False)
    trained = json.loads((tmp_path / "d/train/refusal/treft-seed0/finetune.json").read_text())
    assert (trained["config"]["treft_lambda"], trained["config"]["treft_region"]) == (
        20.0,
        "prefix",
    )
    # a folder written before these fields existed resumes with their defaults
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    del saved["treft_lambda"], saved["treft_region"]
    (tmp_path / "d" / "config.json").write_text(json.dumps(saved))
    calls = []
    reproduce_table5(tmp_path / "d", default, load=_counting_loader(calls), progress=False)
    assert calls == ["tiny-llama"]  # every cell read back
    with pytest.raises(StaleRunError, match="another config"):
        reproduce_table5(tmp_path / "d", config, progress=False)


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown setting"):
        Table5Config(settings=("astrology",))
    with pytest.raises(ValueError, match="compares sft, treft and interleave"):
        Table5Config(methods=("sft", "kl_train"))
    with pytest.raises(ValueError, match="keep 'sft'"):
        Table5Config(methods=("treft",))
    with pytest.raises(ValueError, match="treft_lambda must be a finite number > 0"):
        Table5Config(treft_lambda=-1.0)
    with pytest.raises(ValueError, match="treft_region"):
        Table5Config(treft_region="nowhere")


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "table5", "--smoke", "--model", "tiny-qwen2", "--quiet"]
    code = main([*argv, "--out", str(out), "--settings", "refusal"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| refusal | sft |" in printed and "wrote" in printed
    assert main(["reproduce", "table5", "--out", str(out), "--settings", "astrology"]) == 2
    flags = ["--methods", "sft", "treft", "--treft-region", "postfix", "--treft-lambda", "3"]
    assert main([*argv, "--out", str(tmp_path / "t"), "--settings", "refusal", *flags]) == 0
    saved = pd.read_json(tmp_path / "t" / "config.json", typ="series")
    assert (saved["treft_region"], saved["treft_lambda"]) == ("postfix", 3.0)
    assert list(saved["methods"]) == ["sft", "treft"]
