"""Adversarial probes of the ``piggyback`` command line, kept as a table.

Each row is what a user (or a careless config file) gives the CLI, the exit code and
message fragment it must get back, and a check that nothing on disk changed: a finished
run folder keeps every byte, and a command refused for bad input creates no folder.
See docs/errors.md for the exit codes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from piggyback_interp.cli import main
from piggyback_interp.testing import save_tiny_model

FT = ("finetune", "--model", "{base}", "--setting", "abstention", "--method", "sft")
FT += ("--epochs", "1", "--batch-size", "64", "--quiet")
SCAN = ("scan", "--base", "{base}", "--finetuned", "{adapter}", "--n-prompts", "2", "--quiet")
SCAN += ("--layers", "0", "--trials", "1")
CUDA_FIX = "pick one of those" if torch.cuda.is_available() else "use --device cpu"


class Probe(NamedTuple):
    name: str
    argv: tuple[str, ...]  # {base} {adapter} {run} {new} {config} are filled in
    config: str | None  # the text of {config} (a .toml file), if any
    code: int
    fragment: str  # in stderr (stdout for --version)
    patch: str | None = None  # a fault to inject, see _inject


PROBES = [
    # config files: typed values, booleans never from strings, nothing destructive
    Probe("overwrite-no", (*FT, "--config", "{config}", "--out", "{run}"),
          'overwrite = "no"\nlr = 5e-3\n', 2, "command line only"),
    Probe("overwrite-true-in-file", (*FT, "--lr", "5e-3", "--config", "{config}", "--out", "{run}"),
          "overwrite = true\n", 2, "pass --overwrite if you mean it"),
    Probe("resid-sweep-false-string", (*SCAN, "--config", "{config}", "--out", "{new}"),
          'resid_sweep = "false"\n', 2, "resid_sweep = 'false': expected true or false"),
    Probe("bool-for-int", (*FT, "--lr", "1e-2", "--config", "{config}", "--out", "{run}"),
          "epochs = true\n", 2, "epochs = True: expected an integer"),
    Probe("text-for-float", (*FT, "--config", "{config}", "--out", "{run}"),
          'lr = "fast"\n', 2, "lr = 'fast': expected a finite number"),
    Probe("nan-lr-in-file", (*FT, "--config", "{config}", "--out", "{run}"),
          "lr = nan\n", 2, "lr = nan: expected a finite number"),
    Probe("wrong-choice-in-file", (*FT, "--lr", "1e-2", "--config", "{config}", "--out", "{run}"),
          'dtype = "float64"\n', 2, "expected one of 'float32'"),
    Probe("unknown-key", (*FT, "--config", "{config}", "--out", "{run}"),
          "learning_rate = 0.1\n", 2, "unknown option(s) ['learning_rate']"),
    # ranges, checked before anything is written
    Probe("negative-lr-in-file", (*FT, "--config", "{config}", "--out", "{run}"),
          "lr = -1\n", 2, "lr must be a finite number > 0, got -1.0"),
    Probe("negative-lambda", (*FT, "--lr", "1e-2", "--treft-lambda", "-1", "--out", "{run}"),
          None, 2, "treft_lambda must be a finite number >= 0"),
    Probe("zero-batch", (*FT, "--lr", "1e-2", "--batch-size", "0", "--out", "{run}"),
          None, 2, "batch_size must be >= 1, got 0"),
    Probe("zero-rank", (*FT, "--lr", "1e-2", "--lora-rank", "0", "--out", "{new}"),
          None, 2, "lora_rank must be >= 1, got 0"),
    Probe("nan-lr-flag", (*FT, "--lr", "nan", "--out", "{new}"),
          None, 2, "argument --lr: invalid float value: 'nan'"),
    Probe("zero-trials", (*SCAN, "--trials", "0", "--out", "{new}"),
          None, 2, "trials must be >= 1, got 0"),
    Probe("zero-min-recovery", (*SCAN, "--config", "{config}", "--out", "{new}"),
          "min_recovery = 0\n", 2, "min_recovery must be in (0, 1], got 0.0"),
    # the machine
    Probe("cuda-without-cuda", (*FT, "--lr", "1e-2", "--device", "cuda:99", "--out", "{new}"),
          None, 2, CUDA_FIX),
    Probe("version", ("--version",), None, 0, "piggyback 0."),
    # a run folder of other inputs: refused, config.json untouched
    Probe("stale-run", (*FT, "--lr", "5e-3", "--out", "{run}"),
          None, 5, "pass --overwrite to redo it"),
    # internal errors are bugs, not bad input
    Probe("internal-error", (*FT, "--lr", "1e-2", "--out", "{run}"),
          None, 1, "internal error (a bug, not your input)", patch="bug"),
    # results that cannot be written: exit 4 with a message, never a traceback
    Probe("disk-full-checkpoint", (*FT, "--lr", "1e-2", "--out", "{new}"),
          None, 4, "out of disk space writing", patch="torch.save"),
    Probe("disk-full-safetensors", (*FT, "--lr", "1e-2", "--out", "{new}"),
          None, 4, "out of disk space writing", patch="safetensors"),
    # reusing a run's config.json is safe: nothing recomputed, nothing deleted
    Probe("config-json-reused", (*FT, "--config", "{run}/config.json", "--out", "{run}"),
          None, 0, ""),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model and the run folder of one finished ``piggyback finetune``."""
    work = tmp_path_factory.mktemp("probes")
    base = save_tiny_model(work / "base", "llama", seed=0)
    run = work / "run"
    result = _cli(*[a.format(base=base) for a in FT], "--lr", "1e-2", "--out", str(run))
    assert result[0] == 0, result[2]
    return {"base": base, "run": run, "adapter": run / "finetune" / "adapter"}


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse: --version, a flag that does not parse
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _inject(patch: str | None, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    if patch == "bug":
        import piggyback_interp.experiments.pipeline as pipeline

        def broken(*args, **kwargs):
            raise ValueError("an internal invariant broke")

        monkeypatch.setattr(pipeline, "finetune_step", broken)
    elif patch == "torch.save":
        monkeypatch.setattr(torch, "save", full)
    elif patch == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", full)


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe(probe: Probe, finished, tmp_path, monkeypatch):
    run, new = finished["run"], tmp_path / "new"
    config = tmp_path / "options.toml"
    if probe.config is not None:
        config.write_text(probe.config, "utf-8")
    names = {**{k: str(v) for k, v in finished.items()}, "new": str(new), "config": str(config)}
    argv = [a.format(**names) for a in probe.argv]
    before = snapshot(run)
    _inject(probe.patch, monkeypatch)

    code, out, err = _cli(*argv)

    assert code == probe.code, err
    assert probe.fragment in (out if probe.code == 0 else err), err
    assert snapshot(run) == before, "the finished run folder changed"
    if probe.code == 2:
        assert not new.exists(), "bad input created a run folder"
    if probe.code in (2, 4, 5):
        assert "Traceback" not in err
    if probe.code == 1:
        assert "Traceback" in err and "an internal invariant broke" in err


def test_config_json_records_no_run_control(finished):
    """config.json holds what the results depend on, never how the run was controlled."""
    config = json.loads((finished["run"] / "config.json").read_text("utf-8"))
    assert config["lr"] == 0.01 and config["method"] == "sft"
    for key in ("overwrite", "out", "quiet", "config", "record", "func", "command"):
        assert key not in config, key


def _without_dac_override() -> None:  # pragma: no cover - runs in the child process
    """Root ignores file modes; without these two capabilities it obeys them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_out(tmp_path):
    """A read-only --out (or a new one inside a read-only folder): exit 4, a message, no
    traceback, before any work. A real read-only folder, in a subprocess (as root, one
    without the capability to override file modes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        for out, message in ((locked, "is not writable"), (locked / "run", "cannot write")):
            proc = subprocess.run(
                [sys.executable, "-m", "piggyback_interp.cli", "finetune", "--setting",
                 "abstention", "--quiet", "--out", str(out)],
                capture_output=True, text=True, env=env, timeout=300,
                preexec_fn=_without_dac_override if root else None,
            )  # fmt: skip
            assert proc.returncode == 4, proc.stderr
            assert message in proc.stderr and "--out" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        ("FinetuneConfig", {"lr": NAN}, "lr must be a finite number > 0, got nan"),
        ("FinetuneConfig", {"lr": INF}, "lr must be a finite number > 0, got inf"),
        ("FinetuneConfig", {"treft_lambda": NAN}, "treft_lambda must be a finite number >= 0"),
        ("FinetuneConfig", {"kl_lambda": -1.0}, "kl_lambda must be a finite number >= 0"),
        ("FinetuneConfig", {"lora_alpha": 0}, "lora_alpha must be >= 1, got 0"),
        ("FinetuneConfig", {"max_length": 0}, "max_length must be >= 1, got 0"),
        ("FinetuneConfig", {"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
        ("FinetuneConfig", {"retain_ratio": NAN}, "retain_ratio must be in (0, 1)"),
        ("ScanConfig", {"min_recovery": NAN}, "min_recovery must be in (0, 1]"),
        ("DemoConfig", {"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ("DemoConfig", {"n_eval": 0}, "n_eval must be >= 1, got 0"),
        ("DemoConfig", {"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ("Table5Config", {"lr": INF}, "lr must be a finite number > 0, got inf"),
        ("Table5Config", {"batch_size_eval": 0}, "batch_size_eval must be >= 1, got 0"),
        ("Table5Config", {"max_train": 0}, "max_train must be >= 1, got 0"),
    ],
)
def test_config_ranges(cls, kwargs, message):
    """The config dataclasses refuse what cannot run, from Python as from the CLI."""
    from piggyback_interp.core.errors import UserError
    from piggyback_interp.experiments.demo import DemoConfig
    from piggyback_interp.experiments.reproduce import Table5Config
    from piggyback_interp.experiments.scan_config import ScanConfig
    from piggyback_interp.training import FinetuneConfig

    classes = {c.__name__: c for c in (FinetuneConfig, ScanConfig, DemoConfig, Table5Config)}
    with pytest.raises(UserError) as err:
        classes[cls](**kwargs)
    assert message in str(err.value)
