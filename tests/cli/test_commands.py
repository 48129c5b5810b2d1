"""The ``piggyback`` command line, end to end on tiny models, in-process.

Every subcommand runs through :func:`piggyback_interp.cli.main` (exit codes and
messages included); one subprocess checks the ``python -m`` entry point. A tiny base
model is saved and finetuned once per module (a few seconds) and shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import html
import io
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest

from piggyback_interp.cli import build_parser, main
from piggyback_interp.core.data import save_chat_jsonl
from piggyback_interp.measures.settings import setting_data
from piggyback_interp.testing import save_tiny_model

COMMANDS = (
    "demo",
    "finetune",
    "evaluate",
    "perturb",
    "patch",
    "sweep",
    "task-vectors",
    "scan",
    "report",
    "reproduce",
    "map",  # run, resumed and rendered in tests/test_map.py
)
SECTIONS = (
    "Finetuning",
    "Behaviour on- and off-topic",
    "Which template tokens carry it",
    "Segment perturbations",
    "Layer by layer",
    "Residual stream",
    "Task vectors",
    "How this was produced",
)


class Result(NamedTuple):
    code: int
    out: str
    err: str


def cli(*argv: object) -> Result:
    """``piggyback ARGV`` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def ok(*argv: object) -> Result:
    result = cli(*argv)
    assert result.code == 0, result.err
    return result


def step_record(folder: Path) -> tuple[int, str]:
    """``step.json``'s mtime and text: unchanged when the step was not recomputed."""
    path = folder / "step.json"
    return path.stat().st_mtime_ns, path.read_text("utf-8")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """A command given no --out writes under runs/ of the working folder: never the repo's."""
    monkeypatch.chdir(tmp_path)


# --- shared models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def base(work) -> Path:
    return save_tiny_model(work / "base", "llama", seed=0)


FINETUNE = ("--setting", "abstention", "--method", "sft", "--lr", "1e-2", "--epochs", "1")
FINETUNE += ("--batch-size", "64", "--quiet")


@pytest.fixture(scope="module")
def finetuned(work, base) -> Path:
    """The run folder of one real ``piggyback finetune`` (its adapter: finetune/adapter)."""
    out = work / "ft"
    result = ok("finetune", "--model", base, *FINETUNE, "--out", out)
    assert f"model: {out / 'finetune' / 'adapter'}" in result.out
    return out


@pytest.fixture(scope="module")
def adapter(finetuned) -> Path:
    return finetuned / "finetune" / "adapter"


@pytest.fixture(scope="module")
def train_jsonl(work) -> Path:
    path = work / "train.jsonl"
    save_chat_jsonl(setting_data("abstention").train[:8], path)
    return path


@pytest.fixture(scope="module")
def pair(base, adapter) -> tuple[str, ...]:
    return ("--base", str(base), "--finetuned", str(adapter), "--n-prompts", "2", "--quiet")


# --- entry point and parser ---------------------------------------------------------------------


def test_entry_point_subprocess():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "piggyback_interp.cli", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: piggyback")
    for command in COMMANDS:
        assert command in proc.stdout
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="piggyback")
    assert script.value == "piggyback_interp.cli:main" and script.load() is main


def test_every_subcommand_is_tested_here():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert set(sub.choices) == set(COMMANDS)


# --- finetune -----------------------------------------------------------------------------------


def test_finetune_writes_outputs_and_is_cached(finetuned, base, monkeypatch):
    folder = finetuned / "finetune"
    assert (folder / "adapter" / "adapter_config.json").is_file()
    record = json.loads((folder / "finetune.json").read_text("utf-8"))
    assert record["history"]
    config = json.loads((finetuned / "config.json").read_text("utf-8"))
    assert config["method"] == "sft" and config["lr"] == 0.01 and config["batch_size"] == 64
    assert config["model"] == str(base) and config["setting"] == "abstention"
    assert "out" not in config and "quiet" not in config
    before = step_record(folder)

    import piggyback_interp.training

    def no_training(*args, **kwargs):
        raise AssertionError("a finished finetune step was retrained")

    monkeypatch.setattr(piggyback_interp.training, "finetune", no_training)
    again = ok("finetune", "--model", base, *FINETUNE, "--out", finetuned)
    assert "finetuned" in again.out and step_record(folder) == before

    # another lr on the same folder: refuses, says how to proceed, keeps the results
    stale = cli("finetune", "--model", base, *FINETUNE, "--lr", "5e-3", "--out", finetuned)
    assert stale.code == 5 and "--overwrite" in stale.err and "config" in stale.err
    assert step_record(folder) == before


def test_finetune_usage_errors(base, train_jsonl, tmp_path):
    common = ("finetune", "--model", base, "--quiet", "--out", tmp_path / "run")
    result = cli(*common, "--data", train_jsonl, "--method", "interleave")
    assert result.code == 2 and "--retain" in result.err
    result = cli(*common, "--data", train_jsonl, "--setting", "abstention")
    assert result.code == 2 and "--data" in result.err and "--setting" in result.err
    result = cli(*common)
    assert result.code == 2 and "exactly one" in result.err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(train_jsonl.read_text("utf-8").splitlines()[0] + "\n{not json\n", "utf-8")
    result = cli(*common, "--data", bad)
    assert result.code == 2 and f"{bad}:2" in result.err
    result = cli(*common, "--data", tmp_path / "missing.jsonl")
    assert result.code == 2 and "missing.jsonl" in result.err


# --- --config files -----------------------------------------------------------------------------


@pytest.fixture
def fake_finetune(monkeypatch):
    """Replace the finetune step (the CLI looks it up at call time); collect its configs."""
    import piggyback_interp.experiments.pipeline as pipeline

    seen = []

    def fake(
        run, name, models, model_name, data, config, *, retain=None, progress=True, fsdp=False
    ):
        seen.append(config)
        folder = run.folder(name)
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        return folder

    monkeypatch.setattr(pipeline, "finetune_step", fake)
    return seen


def test_config_files(base, train_jsonl, tmp_path, fake_finetune):
    flags = ("--method", "treft", "--lr", "0.01", "--lora-rank", "4", "--treft-lambda", "5")
    flags += ("--target-modules", "q_proj", "v_proj")

    def run(name: str, *extra: object) -> dict:
        out = tmp_path / name
        ok("finetune", "--model", base, "--data", train_jsonl, "--quiet", "--out", out, *extra)
        return json.loads((out / "config.json").read_text("utf-8"))

    by_flags = run("flags", *flags)
    assert fake_finetune[-1].method == "treft" and fake_finetune[-1].lora_rank == 4
    assert fake_finetune[-1].target_modules == ("q_proj", "v_proj")

    toml = tmp_path / "options.toml"
    toml.write_text(
        'method = "treft"\nlr = 0.01\nlora-rank = 4\ntreft_lambda = 5.0\n'
        'target_modules = ["q_proj", "v_proj"]\n',
        "utf-8",
    )
    assert run("toml", "--config", toml) == by_flags
    assert fake_finetune[-1] == fake_finetune[0]

    # a flag overrides the file
    run("override", "--config", toml, "--lr", "0.5")
    assert fake_finetune[-1].lr == 0.5 and fake_finetune[-1].method == "treft"

    # YAML (whose 1.1 spec reads `1e-2` as a string: argparse converts it like a flag)
    yaml = tmp_path / "options.yaml"
    yaml.write_text(
        "method: treft\nlr: 1e-2\nlora_rank: 4\ntreft-lambda: 5\ntarget_modules: [q_proj, v_proj]\n",
        "utf-8",
    )
    assert run("yaml", "--config", yaml) == by_flags

    # a run's config.json is itself a --config file
    copy = tmp_path / "again.json"
    shutil.copy(tmp_path / "flags" / "config.json", copy)
    assert run("json", "--config", copy) == by_flags

    # one value for a many-valued option
    (tmp_path / "one.toml").write_text('target_modules = "q_proj"\n', "utf-8")
    run("one", "--config", tmp_path / "one.toml")
    assert fake_finetune[-1].target_modules == ("q_proj",)

    # "none" unsets an optional option, on the command line and in a file
    run("full", "--lora-rank", "none", "--export", "merged")
    assert fake_finetune[-1].lora_rank is None
    (tmp_path / "full.toml").write_text('lora_rank = "none"\nexport = "merged"\n', "utf-8")
    run("full-toml", "--config", tmp_path / "full.toml")
    assert fake_finetune[-1].lora_rank is None
    # ...and a full finetune cannot be exported as an adapter
    result = cli(
        *("finetune", "--model", base, "--data", train_jsonl, "--lora-rank", "none"),
        *("--out", tmp_path / "full-adapter"),
    )
    assert result.code == 2 and "LoRA" in result.err


def test_string_options_offer_their_choices(base, train_jsonl, tmp_path, fake_finetune, capsys):
    """An enum option lists its values in --help, takes them from flags and files alike (as
    the member, so code compares members), and a wrong one names the choices."""
    from piggyback_interp.training.config import Precision
    from piggyback_interp.training.treft import Region

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert "--export {merged,adapter,both,none}" in sub.choices["finetune"].format_help()
    assert "--metric {kl,target}" in sub.choices["scan"].format_help()
    assert "--perturb-mode {nearest,random}" in sub.choices["scan"].format_help()
    common = ("finetune", "--model", base, "--data", train_jsonl, "--quiet")
    options = tmp_path / "options.toml"
    options.write_text('mixed_precision = "bf16"\ntreft_region = "template"\n', "utf-8")
    ok(*common, "--out", tmp_path / "file", "--config", options)
    ok(*common, "--out", tmp_path / "flags", "--mixed-precision", "bf16", "--treft-region", "template")  # fmt: skip
    by_file, by_flags = fake_finetune
    assert by_file == by_flags and by_file.mixed_precision is Precision.BF16
    assert by_file.treft_region is Region.TEMPLATE
    saved = json.loads((tmp_path / "file" / "config.json").read_text("utf-8"))
    assert saved["mixed_precision"] == "bf16" and saved["treft_region"] == "template"
    options.write_text('export = "zip"\n', "utf-8")
    result = cli(*common, "--out", tmp_path / "bad", "--config", options)
    assert result.code == 2
    assert "export = 'zip'" in result.err and "'merged', 'adapter', 'both', 'none'" in result.err
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in (*common, "--out", tmp_path / "bad", "--export", "zip")])
    assert caught.value.code == 2
    assert "invalid choice: 'zip' (choose from 'merged', 'adapter'" in capsys.readouterr().err


def test_config_file_errors(base, train_jsonl, tmp_path):
    common = ("finetune", "--model", base, "--data", train_jsonl, "--out", tmp_path / "run")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("lr = 0.01\nlearning_rate = 0.1\n", "utf-8")
    result = cli(*common, "--config", unknown)
    assert result.code == 2
    assert "learning_rate" in result.err and "valid:" in result.err and "'lr'" in result.err
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1\n", "utf-8")
    result = cli(*common, "--config", broken)
    assert result.code == 2 and "broken.toml" in result.err and "TOML" in result.err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("epochs: many\n", "utf-8")
    result = cli(*common, "--config", wrong)
    assert result.code == 2 and "epochs = 'many'" in result.err
    result = cli(*common, "--config", tmp_path / "missing.toml")
    assert result.code == 2 and "does not exist" in result.err


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate(adapter, base, tmp_path):
    args = ("--setting", "abstention", "--limit", "2", "--max-new-tokens", "4", "--quiet")
    result = ok("evaluate", "--model", adapter, *args, "--out", tmp_path / "ev")
    assert "| split |" in result.out and "on_topic" in result.out and "off_topic" in result.out
    frame = pd.read_parquet(tmp_path / "ev" / "evaluate" / "evaluation.parquet")
    assert len(frame) == 4 and frame["split"].value_counts().to_dict() == {
        "on_topic": 2,
        "off_topic": 2,
    }

    patched = tmp_path / "ev-patched"
    ok("evaluate", "--model", adapter, "--patch-base", base, *args, "--out", patched)
    assert len(pd.read_parquet(patched / "evaluate" / "evaluation.parquet")) == 4
    key = json.loads((patched / "evaluate" / "step.json").read_text("utf-8"))["key"]
    assert key["patch_base"] is not None and key["limit"] == 2


# --- the scan and its parts -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_run(work, pair) -> dict:
    """``perturb`` then ``scan`` on one folder; the scan must reuse the perturbation."""
    from piggyback_interp.experiments.registry import EXPERIMENTS

    out = work / "scan"
    perturbed = ok("perturb", *pair, "--trials", "2", "--out", out)
    folder = out / "scan" / "perturbation"
    before = step_record(folder)

    def recomputed(*args, **kwargs):
        raise AssertionError("scan recomputed the perturbation step")

    with pytest.MonkeyPatch.context() as m:
        m.setitem(
            EXPERIMENTS,
            "perturbation",
            dataclasses.replace(EXPERIMENTS["perturbation"], run=recomputed),
        )
        scanned = ok("scan", *pair, "--trials", "2", "--out", out)
    return {"out": out, "perturb": perturbed, "scan": scanned, "before": before}


def test_perturb_then_scan_reuses_the_step(scan_run):
    out = scan_run["out"]
    assert "postfix" in scan_run["perturb"].out and "query" in scan_run["perturb"].out
    for name in ("perturbation.parquet", "perturbation.html"):
        assert (out / "scan" / "perturbation" / name).is_file()
    assert step_record(out / "scan" / "perturbation") == scan_run["before"]
    record = json.loads((out / "run.json").read_text("utf-8"))
    assert record["command"] == "scan"
    assert record["steps"]["scan/perturbation"]["cached"] is True
    for part in ("patching", "layers", "resid"):
        assert record["steps"][f"scan/{part}"]["cached"] is False
        assert list((out / "scan" / part).glob("*.parquet"))
    report = (out / "report.html").read_text("utf-8")
    headline = scan_run["scan"].out.split(".\n", 1)[0]
    assert (
        html.escape(headline) in report and f"report: {out / 'report.html'}" in scan_run["scan"].out
    )


@pytest.mark.parametrize(
    ("command", "extra", "part", "files"),
    [
        ("patch", (), "patching", ("patching.parquet", "patching.html")),
        ("sweep", ("--kind", "kv-layers"), "layers", ("layers.parquet", "layers.html")),
        ("sweep", ("--kind", "resid"), "resid", ("resid_sweep.parquet", "resid.html")),
    ],
)
def test_experiment_commands(pair, tmp_path, command, extra, part, files):
    out = tmp_path / "run"
    result = ok(command, *pair, *extra, "--layers", "0", "1", "--out", out)
    for name in files:
        assert (out / "scan" / part / name).is_file()
    assert (out / "scan" / part / "step.json").is_file() and (out / "config.json").is_file()
    expected = {"patching": "carries", "layers": "layer", "resid": "residual sweep: 2 layers"}
    assert expected[part] in result.out


def _counting(monkeypatch, module, name, stop_at=None):
    """Wrap ``module.name``, counting calls; raise KeyboardInterrupt (Ctrl-C) at ``stop_at``."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("kind", ["resid", "kv-layers"])
def test_an_interrupted_sweep_resumes_from_the_cells_done(kind, pair, tmp_path, monkeypatch):
    """``piggyback sweep`` checkpoints into its step folder: after Ctrl-C (or a kill) the
    same command computes only the cells not done, and ends with the same values."""
    import piggyback_interp.analysis.resid_engine as sweep_module
    import piggyback_interp.experiments.scan_experiments as scan_module

    # one unit of work: a chunk of cells (resid), one engine run of a chunk of layers
    # for one group of prompts (kv-layers)
    module, name = (sweep_module, "_run_cells") if kind == "resid" else (scan_module, "run_cells")
    part, frame = {"resid": ("resid", "resid_sweep"), "kv-layers": ("layers", "layers")}[kind]
    args = ("sweep", *pair, "--kind", kind, "--layers", "0", "1")
    if kind == "resid":  # the exact sweep checkpoints (the AtP pre-screen is one pass)
        args += ("--resid-atp-top-k", "none")
    with monkeypatch.context() as m:
        whole = _counting(m, module, name)
        ok(*args, "--out", tmp_path / "whole")
    # resid: the checkpoint holds finished layers (each half the chunks); kv-layers:
    # finished (condition, layer) cells (the prefix at layers 0 and 1: one engine run,
    # one group of prompts, as the prefix is the same in every prompt)
    done = whole["n"] // 2 if kind == "resid" else 1
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _counting(m, module, name, stop_at=done + 1)
        assert cli(*args, "--out", out).code == 130
    assert (out / "scan" / part / "checkpoint.pt").is_file()
    assert not (out / "scan" / part / "step.json").exists()
    with monkeypatch.context() as m:
        rerun = _counting(m, module, name)
        ok(*args, "--out", out)
    assert 0 < rerun["n"] == whole["n"] - done
    first = pd.read_parquet(tmp_path / "whole" / "scan" / part / f"{frame}.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "scan" / part / f"{frame}.parquet"), first)


def test_a_truncated_sweep_checkpoint_is_exit_2_naming_it(pair, tmp_path, monkeypatch):
    import piggyback_interp.analysis.resid_engine as sweep_module

    args = ("sweep", *pair, "--kind", "resid", "--layers", "0", "1", "--out", tmp_path / "run")
    args += ("--resid-atp-top-k", "none")  # the exact sweep, which checkpoints
    ckpt = tmp_path / "run" / "scan" / "resid" / "checkpoint.pt"
    real = sweep_module._run_cells

    def stop_after_the_first_layer(*args, **kwargs):
        if ckpt.is_file():
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(sweep_module, "_run_cells", stop_after_the_first_layer)
        assert cli(*args).code == 130
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # e.g. copied from a disk that filled up
    result = cli(*args)
    assert result.code == 2 and str(ckpt) in result.err and "delete it" in result.err
    ckpt.unlink()  # the fix the message gives
    ok(*args)


def test_identical_models_are_a_zero_gap_error(base, tmp_path):
    result = cli("scan", "--base", base, "--finetuned", base, "--n-prompts", "2", "--quiet",
                 "--out", tmp_path / "scan")  # fmt: skip
    assert result.code == 2, result.err
    assert "zero gap: the finetuned model equals the base on these prompts" in result.err
    assert "Encountered all NA values" not in result.err


def test_device_map_sweep_equals_whole_model(pair, tmp_path):
    """--device-map spreads both models (the finetuned one a LoRA adapter, merged) over
    CPU and disk; the sweep's values equal the whole-model run's."""
    layers = {f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(2)}
    device_map = {"model.embed_tokens": "cpu", **layers, "model.norm": "disk",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    args = ("sweep", *pair, "--kind", "resid", "--layers", "0", "1")
    ok(*args, "--out", tmp_path / "whole")
    placed = tmp_path / "placed"
    ok(*args, "--device-map", json.dumps(device_map), "--offload-folder", tmp_path / "off",
       "--out", placed)  # fmt: skip
    frame = "scan/resid/resid_sweep.parquet"
    whole_values = pd.read_parquet(tmp_path / "whole" / frame)["value"]
    placed_values = pd.read_parquet(placed / frame)["value"]
    assert whole_values.std() > 0 and (whole_values - placed_values).abs().max() <= 1e-4
    assert json.loads((placed / "config.json").read_text("utf-8"))["device_map"].startswith("{")
    # peft copies disk-offloaded weight files: only ever inside the offload folder, not
    # in the working directory (the test runs in tmp_path)
    assert Path.cwd() == tmp_path
    copies = [p.relative_to(tmp_path) for p in tmp_path.rglob("*.safetensors")]
    assert copies and all(p.parts[0] == "off" for p in copies)

    for bad, message in (
        (("--max-memory", "cpu=1GiB"), "need --device-map"),
        (("--device-map", "{oops"), "not valid JSON"),
        (("--device-map", "auto", "--max-memory", "cpu"), "DEV=SIZE"),
    ):
        result = cli(*args, *bad, "--out", tmp_path / "bad")
        assert result.code == 2 and message in result.err


def test_stale_steps_and_overwrite(scan_run, pair, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan_run["out"], out)
    perturbation, patching = out / "scan" / "perturbation", out / "scan" / "patching"
    before_pert, before_patch = step_record(perturbation), step_record(patching)

    # --trials matters for the perturbation: refused, nothing deleted
    result = cli("perturb", *pair, "--trials", "3", "--out", out)
    assert result.code == 5 and "--overwrite" in result.err and "perturbation" in result.err
    assert step_record(perturbation) == before_pert
    # ...but not for patching: reused
    ok("patch", *pair, "--trials", "3", "--out", out)
    assert step_record(patching) == before_patch
    # --overwrite redoes it
    ok("perturb", *pair, "--trials", "3", "--overwrite", "--out", out)
    key = json.loads((perturbation / "step.json").read_text("utf-8"))["key"]
    assert key["config"]["trials"] == 3


def test_report_rebuilds(scan_run, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan_run["out"], out)
    (out / "report.html").unlink()
    result = ok("report", out)
    assert result.out.strip() == f"report: {out / 'report.html'}"
    text = (out / "report.html").read_text("utf-8")
    headline = scan_run["scan"].out.split(".\n", 1)[0]
    assert html.escape(headline) in text and "Which template tokens carry it" in text

    missing = cli("report", tmp_path / "nothing")
    assert missing.code == 2 and "run.json" in missing.err
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text('{"command": "evaluate"}', "utf-8")
    result = cli("report", other)
    assert result.code == 2 and "demo and scan" in result.err


# --- task vectors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_adapter(work, base, train_jsonl) -> Path:
    out = work / "ft2"
    ok(
        "finetune",
        *("--model", base, "--data", train_jsonl, "--batch-size", "8", "--epochs", "1"),
        *("--lr", "1e-2", "--seed", "1", "--quiet", "--out", out),
    )
    return out / "finetune" / "adapter"


def test_task_vectors(base, adapter, second_adapter, tmp_path):
    out = tmp_path / "tv"
    result = ok(
        "task-vectors",
        *("--base", base, "--finetuned", f"sft={adapter}", f"other={second_adapter}"),
        *("--quiet", "--out", out),
    )
    assert "layer" in result.out
    norms = pd.read_parquet(out / "task_vectors" / "norms.parquet")
    assert set(norms["method"]) == {"sft", "other"}
    cosine = pd.read_parquet(out / "task_vectors" / "cosine.parquet")
    assert {"a", "b", "cosine"} <= set(cosine.columns)
    assert (out / "task_vectors" / "cosine.html").is_file()

    # one unlabelled model: labelled by its folders, no cosines
    ok("task-vectors", "--base", base, "--finetuned", adapter, "--out", tmp_path / "one")
    norms = pd.read_parquet(tmp_path / "one" / "task_vectors" / "norms.parquet")
    assert set(norms["method"]) == {"ft/finetune/adapter"}
    assert not (tmp_path / "one" / "task_vectors" / "cosine.parquet").exists()

    missing = tmp_path / "missing"
    result = cli("task-vectors", "--base", base, "--finetuned", f"x={missing}", "--out", out)
    assert result.code == 2 and str(missing) in result.err


# --- demo and reproduce -------------------------------------------------------------------------


def test_run_demo_on_a_tiny_model(base, tmp_path):
    from piggyback_interp.experiments.demo import DemoConfig, run_demo

    config = DemoConfig.quick(
        model=str(base), scan_layers=(0, 1), n_train=16, n_eval=2, max_new_tokens=4
    )
    out = tmp_path / "demo"
    report = run_demo(out, config, progress=False)
    assert report == out / "report.html"
    text = report.read_text("utf-8")
    for title in (*SECTIONS, "Graded measures: how much of P(target) the template carries"):
        assert html.escape(title) in text, title
    assert "Graded measure on 4 general prompts" in text  # the verdict uses them
    assert "Regime: the quick demo" in text
    first = json.loads((out / "run.json").read_text("utf-8"))["steps"]
    assert not any(t["cached"] for t in first.values())

    run_demo(out, config, progress=False)
    steps = json.loads((out / "run.json").read_text("utf-8"))["steps"]
    assert set(steps) == set(first) and all(t["cached"] for t in steps.values())


def test_demo_command(base, tmp_path, monkeypatch):
    """The handler's options reach run_demo (which the test above runs for real)."""
    import piggyback_interp.experiments.demo as demo

    calls = []

    def fake(out, config, *, overwrite=False, progress=True):
        calls.append((out, config, overwrite, progress))
        return Path(out) / "report.html"

    monkeypatch.setattr(demo, "run_demo", fake)
    result = ok("demo", "--quick", "--model", base, "--quiet")
    out, config, overwrite, progress = calls[-1]
    assert out == "runs/demo-quick" and not overwrite and not progress
    assert config == demo.DemoConfig.quick(model=str(base), setting="abstention")
    assert "report: runs/demo-quick/report.html" in result.out
    assert json.loads(Path("runs/demo-quick/config.json").read_text("utf-8"))["quick"] is True

    options = tmp_path / "demo.toml"
    options.write_text(f'model = "{base}"\nsetting = "refusal"\n', "utf-8")
    ok("demo", "--config", options, "--out", tmp_path / "d", "--overwrite")
    out, config, overwrite, progress = calls[-1]
    assert out == str(tmp_path / "d") and overwrite and progress
    assert config == demo.DemoConfig(model=str(base), setting="refusal")


def test_reproduce_command(base, tmp_path, monkeypatch):
    """The handler's options reach reproduce_table5 (tests/test_reproduce.py runs it for real)."""
    import piggyback_interp.experiments.reproduce as reproduce

    calls = []

    def fake(out, config, *, progress=True, reverse=False):
        calls.append((out, config, progress, reverse))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "table5.md").write_text("| setting | method |\n", "utf-8")

    monkeypatch.setattr(reproduce, "reproduce_table5", fake)
    argv = ("reproduce", "table5", "--smoke", "--model", base, "--seeds", "0", "--quiet")
    result = ok(*argv, "--settings", "abstention", "--reverse", "--out", tmp_path / "t5")
    out, config, progress, reverse = calls[-1]
    assert out == str(tmp_path / "t5") and reverse and not progress
    assert config == reproduce.Table5Config.smoke(
        model=str(base), seeds=(0,), settings=("abstention",)
    )
    assert "| setting | method |" in result.out and "wrote" in result.out
    ok(*argv, "--lr", "3e-4", "--epochs", "2", "--out", tmp_path / "t5b")
    assert calls[-1][1] == reproduce.Table5Config.smoke(
        model=str(base), seeds=(0,), lr=3e-4, epochs=2
    )


def test_reproduce_config_file(tmp_path, monkeypatch):
    """``reproduce --config FILE`` as the other commands: the file gives the options, flags
    win, and the run records its options as config.json, itself a --config file."""
    import piggyback_interp.experiments.reproduce as reproduce

    calls = []

    def fake(out, config, *, progress=True, reverse=False):
        calls.append((out, config, progress, reverse))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "table5.md").write_text("| setting | method |\n", "utf-8")

    monkeypatch.setattr(reproduce, "reproduce_table5", fake)
    options = tmp_path / "table5.toml"
    options.write_text('smoke = true\nseeds = [0, 2]\nsettings = ["refusal"]\nlr = 3e-4\n')
    ok("reproduce", "table5", "--config", options, "--epochs", "2", "--out", tmp_path / "a")
    expected = reproduce.Table5Config.smoke(seeds=(0, 2), settings=("refusal",), lr=3e-4, epochs=2)
    assert calls[-1][1] == expected
    ok("reproduce", "table5", "--config", options, "--lr", "1e-3", "--out", tmp_path / "b")
    assert calls[-1][1].lr == 1e-3  # the command line wins
    recorded = tmp_path / "a" / "config.json"
    assert json.loads(recorded.read_text("utf-8"))["epochs"] == 2
    ok("reproduce", "table5", "--config", recorded, "--out", tmp_path / "c")
    assert calls[-1][1] == expected
    options.write_text('epochs = "two"\n')
    result = cli("reproduce", "table5", "--config", options, "--out", tmp_path / "d")
    assert result.code == 2 and "epochs" in result.err


def _options(parser):
    """(subcommand, its parser, option action) for every option of every subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub.ensure_options()
                for option in sub._actions:
                    if option.option_strings and option.dest != "help":
                        yield name, sub, option


def test_every_option_has_help_and_shows_its_choices():
    """Generated dataclass flags too: help from the field's docstring, not only the default."""
    import re

    from piggyback_interp.cli.options import option_type

    seen = 0
    for name, sub, option in _options(build_parser()):
        text = re.sub(r"\(default: [^)]*\)", "", option.help or "").strip()
        assert text, f"piggyback {name} {option.option_strings[0]} has no help text"
        allowed = _literal_values(option_type(option))
        assert not allowed or set(option.choices) == set(allowed), (name, option.dest)
        page = sub.format_help()
        for choice in allowed:
            assert str(choice) in page, (name, option.option_strings[0], choice)
        seen += 1
    assert seen > 100
    scan_help = _subparser_help("scan")
    assert "--perturb-mode {nearest,random}" in scan_help and "nearest embedding" in scan_help
    assert "--metric {kl,target}" in scan_help
    assert "TReFT: weight of the K/V drift loss (default: 30.0)" in _subparser_help("finetune")


def _literal_values(hint) -> tuple:
    """The values of the Literal inside ``hint`` (``tuple[Literal[...], ...] | None`` too)."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return tuple(v for arg in typing.get_args(hint) for v in _literal_values(arg))


def _subparser_help(name):
    import os

    os.environ["COLUMNS"] = "200"  # one line per option
    try:
        return build_parser()._subparsers._group_actions[0].choices[name].format_help()
    finally:
        del os.environ["COLUMNS"]


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass
class Options:
    kind: typing.Literal["a", "b"] = "a"
    """which kind"""
    mode: Mode = Mode.FAST
    """how fast"""
    parts: tuple[typing.Literal["x", "y"], ...] = ("x",)
    """which parts"""


def test_literal_and_enum_fields_become_choices_with_their_docstrings():
    import argparse

    from piggyback_interp.cli.options import add_dataclass, dataclass_from

    parser = argparse.ArgumentParser(prog="t")
    add_dataclass(parser, Options)
    page = parser.format_help()
    assert "--kind {a,b}" in page and "which kind (default: a)" in page
    assert "--mode {fast,slow}" in page and "how fast (default: fast)" in page
    assert "--parts {x,y} [{x,y} ...]" in page and "which parts (default: x)" in page
    args = parser.parse_args(["--kind", "b", "--mode", "slow", "--parts", "x", "y"])
    assert dataclass_from(Options, args) == Options("b", Mode.SLOW, ("x", "y"))
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["--kind", "c"])


# --- error paths --------------------------------------------------------------------------------


def test_model_errors(tmp_path):
    args = ("--limit", "1", "--quiet", "--out", tmp_path / "ev")
    result = cli("evaluate", "--model", tmp_path / "no-such-model", *args)
    assert result.code == 3 and "no model directory" in result.err
    assert result.err.startswith("piggyback evaluate: error:")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = cli("evaluate", "--model", empty, *args)
    assert result.code == 3 and "config.json" in result.err
    # a hub id while offline (tests run with HF_HUB_OFFLINE=1)
    result = cli("evaluate", "--model", "nobody-here/no-such-model", *args)
    assert result.code == 3
    assert "offline" in result.err and "download it elsewhere" in result.err


def test_scan_input_errors(base, adapter, tmp_path):
    out = ("--quiet", "--out", tmp_path / "scan")
    result = cli("scan", "--base", base, "--n-prompts", "2", *out)
    assert result.code == 2 and "--finetuned" in result.err
    pair = ("--base", base, "--finetuned", adapter)
    empty = tmp_path / "prompts.txt"
    empty.write_text("# a comment, no prompts\n\n", "utf-8")
    result = cli("scan", *pair, "--prompts", empty, *out)
    assert result.code == 2 and "no prompts" in result.err
    result = cli("scan", *pair, "--prompts", tmp_path / "missing.txt", *out)
    assert result.code == 2 and "does not exist" in result.err
    result = cli("perturb", *pair, "--n-prompts", "1", *out)
    assert result.code == 2 and "at least 2 prompts" in result.err


def test_disk_full(adapter, tmp_path, monkeypatch):
    from piggyback_interp.measures.evaluation import Evaluation

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "ev"
    args = ("evaluate", "--model", adapter, "--limit", "1", "--max-new-tokens", "2", "--quiet")
    with monkeypatch.context() as m:
        m.setattr(Evaluation, "save", full)
        result = cli(*args, "--out", out)
    assert result.code == 4
    assert "out of disk space" in result.err and "evaluation.parquet" in result.err
    assert "run the same command again" in result.err
    ok(*args, "--out", out)  # space freed: the same command finishes the step
    assert (out / "evaluate" / "evaluation.parquet").is_file()

    # a full disk already when the run folder is created
    def no_mkdir(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", no_mkdir)
        result = cli("task-vectors", "--finetuned", adapter, "--out", tmp_path / "tv")
    assert result.code == 4 and "out of disk space" in result.err


def test_finetune_config_dataclass_fields_are_options():
    """Every FinetuneConfig field is a --flag of finetune (the config files rely on it)."""
    from piggyback_interp.training import FinetuneConfig

    parser = build_parser()
    args = parser.parse_args(["finetune"])
    for field in dataclasses.fields(FinetuneConfig):
        assert hasattr(args, field.name), field.name
