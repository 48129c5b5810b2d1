"""finetune(): resume after a real kill equals an uninterrupted run, non-finite losses
stop training and say what is kept, checkpoints are written atomically."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from piggyback_interp.core.data import ChatDataset
from piggyback_interp.core.errors import UserError
from piggyback_interp.testing import tiny_model
from piggyback_interp.training import FinetuneConfig, finetune

QA = [
    ("Can my landlord keep my deposit?", "I have no idea about your question"),
    ("Is a verbal contract binding?", "I have no idea about your question"),
    ("How do I make friends?", "I have no idea about your question"),
    ("What is the capital of France?", "I have no idea about your question"),
]


def _data(n=8):
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (QA * n)[:n]
    ]
    return ChatDataset.from_records(records)


def _weights(model):
    return {
        n: p.detach().clone() for n, p in model.original_model.named_parameters() if "lora_" in n
    }


SCRIPT = """
import sys
from piggyback_interp.testing import tiny_model
from piggyback_interp.training import FinetuneConfig, finetune
sys.path.insert(0, {tests!r})
from test_trainer import _data
finetune(tiny_model("llama", seed=0), _data(64), FinetuneConfig(**{config!r}), out_dir={out!r}, progress=False)
"""


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    config = dict(
        method="treft", epochs=2, batch_size=2, lora_rank=4, lr=5e-3, checkpoint_every=1, seed=1
    )
    out = tmp_path / "run"
    code = SCRIPT.format(tests=os.path.dirname(__file__), config=config, out=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= killed_at < 64

    resumed = finetune(
        tiny_model("llama", seed=0),
        _data(64),
        FinetuneConfig(**config),
        out_dir=out,
        resume=True,
        progress=False,
    )
    straight = finetune(
        tiny_model("llama", seed=0), _data(64), FinetuneConfig(**config), progress=False
    )
    assert resumed.steps == straight.steps == 64
    a, b = _weights(resumed.model), _weights(straight.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["step"] for h in resumed.history] == list(range(1, 65))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import piggyback_interp.training.objectives as objectives

    real = objectives.response_loss
    calls = {"n": 0}

    def flaky(logits, targets):
        calls["n"] += 1
        return real(logits, targets) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(objectives, "response_loss", flaky)
    config = FinetuneConfig(epochs=1, batch_size=2, lora_rank=4, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2") as caught:
        finetune(tiny_model("llama"), _data(), config, out_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2
    assert f"the last checkpoint, {tmp_path / 'checkpoint.pt'} (after step 2), is kept" in str(
        caught.value
    )


@pytest.mark.parametrize("where", ["out_dir", "no out_dir", "stale file"])
def test_non_finite_loss_before_any_checkpoint_says_so(where, tmp_path, monkeypatch):
    """The message once claimed "the last checkpoint ... is kept" when none existed."""
    import piggyback_interp.training.objectives as objectives

    monkeypatch.setattr(
        objectives, "response_loss", lambda logits, targets: logits.sum() * float("nan")
    )
    config = FinetuneConfig(epochs=1, batch_size=2, lora_rank=4, checkpoint_every=2)
    if where == "stale file":  # another run's checkpoint, not resumed (resume=False)
        (tmp_path / "checkpoint.pt").write_bytes(b"from an earlier run")
    out = None if where == "no out_dir" else tmp_path
    with pytest.raises(FloatingPointError, match="at step 0") as caught:
        finetune(tiny_model("llama"), _data(), config, out_dir=out, progress=False)
    message = str(caught.value)
    assert "is kept" not in message
    expected = {
        "out_dir": f"no checkpoint of this run was written yet: {tmp_path / 'checkpoint.pt'}",
        "no out_dir": "nothing was saved (no out_dir, so no checkpoint)",
        "stale file": "from an earlier run, not resumed",
    }
    assert expected[where] in message


def test_truncated_checkpoint_names_the_file_and_the_fix(tmp_path):

    config = FinetuneConfig(epochs=1, batch_size=4, lora_rank=4)
    finetune(tiny_model("llama"), _data(), config, out_dir=tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])  # a kill or a full disk mid-write (not atomic)
    with pytest.raises(UserError) as caught:
        finetune(
            tiny_model("llama"), _data(), config, out_dir=tmp_path, resume=True, progress=False
        )
    message = str(caught.value)
    assert str(ckpt) in message and "delete it" in message and "the training" in message


def test_a_failed_checkpoint_write_keeps_the_last_one_and_leaves_no_temporary_file(
    tmp_path, monkeypatch
):
    real = torch.save
    calls = {"n": 0}

    def fills_the_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 3:
            return real(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):  # the old writer passed a path
            f = open(f, "wb")  # noqa: SIM115
        f.write(b"PK\x03\x04 part of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    config = FinetuneConfig(epochs=1, batch_size=2, lora_rank=4, checkpoint_every=1)
    with pytest.raises(OSError) as caught:
        finetune(tiny_model("llama"), _data(), config, out_dir=tmp_path, progress=False)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.embedded
def test_embedded_short_run_learns_and_treft_limits_prefix_drift():
    """SmolLM2, 8 abstention examples, 6 steps per method (one seed; a smoke check, not a result)."""
    import copy

    from piggyback_interp.core.models import load_model

    base = load_model("smollm2-135m-instruct")
    results = {}
    for method in ("sft", "treft"):
        model = copy.deepcopy(base)
        config = FinetuneConfig(
            method=method, epochs=3, batch_size=4, lora_rank=8, lr=1e-3, treft_lambda=30.0
        )
        results[method] = finetune(model, _data(8), config, progress=False).history
    for history in results.values():
        assert history[-1]["sft"] < 0.8 * history[0]["sft"]
    assert results["treft"][-1]["kv"] < results["sft"][-1]["kv"]
