"""benchmarks/gpu_check.sh runs end to end in its CPU dry-run mode (on the embedded model:
the sweep benchmark needs a real tokenizer to find equal-length prompts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from piggyback_interp.testing import save_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_dry_run_writes_every_result(tmp_path):
    model = "smollm2-135m-instruct"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_MODEL": model}
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    machine = json.loads((out / "machine.json").read_text())
    assert machine["device"] == "cpu" and machine["model"] == model
    sweep = json.loads((out / "sweep-float32.json").read_text())
    assert sweep["device"] == "cpu" and sweep["max_abs_diff"] <= 1e-4  # equals TL's patching
    treft = json.loads((out / "treft-float32.json").read_text())
    assert treft["steps"] == 1 and treft["treft_step_s"] > 0 and treft["dtype"] == "float32"
    assert json.loads((out / "done.json").read_text())["gpu_check_seconds"] >= 0


def test_a_gpu_run_without_a_gpu_says_so(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", "llama", seed=0)
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_MODEL": str(model),
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "--dry-run" in done.stderr


def test_bad_option_is_refused(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), "--fast"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "--dry-run" in done.stderr
