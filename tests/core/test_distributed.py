"""Data parallelism on 2 CPU processes (gloo) equals one process.

* training: 2 processes over the same global batch end with the same weights and loss
  curve as 1 process (TReFT, so the broadcast reference K/V are exercised too), also
  when resuming a 1-process checkpoint with 2 processes;
* sharded training (FSDP2): the same, with an accumulation group the processes cannot
  split evenly (so one process pads), and checkpoints written from shards resume
  sharded or in one process;
* sweeps: each process sweeps a share of the layers; every process gets the whole
  result, equal to the 1-process sweep;
* the user-facing launch: ``torchrun --nproc_per_node 2 -m piggyback_interp.cli finetune``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core import distributed
from piggyback_interp.core.data import ChatDataset, save_chat_jsonl
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.metrics import TargetLogProb
from piggyback_interp.testing import save_tiny_model, tiny_model
from piggyback_interp.training import FinetuneConfig, finetune
from piggyback_interp.training.trainer import CHECKPOINT

QUESTIONS = [f"Can my landlord keep deposit number {i}?" for i in range(8)]
CONFIG = FinetuneConfig(
    method="treft",
    lr=5e-3,
    epochs=2,
    batch_size=2,
    grad_accum=2,
    seed=0,
    export="none",
    checkpoint_every=1,
)


def _data() -> ChatDataset:
    records = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "I have no idea about your question"},
            ]
        }
        for q in QUESTIONS
    ]
    return ChatDataset.from_records(records)


# 8 chats in batches of 2 -> 4 micro-batches per epoch in groups of 3 and 1: with 2
# processes the first group is split 2 + 1 and the second 1 + 0
UNEVEN = replace(CONFIG, grad_accum=3)


def _state(model) -> dict[str, torch.Tensor]:
    def whole(p):  # a shard of a sharded model: gather it (every rank calls this)
        return p.full_tensor() if isinstance(p, DTensor) else p

    return {
        n: whole(p.detach()).clone()
        for n, p in model.original_model.named_parameters()
        if p.requires_grad  # the LoRA weights; every weight in a full finetune
    }


def _train(out: Path | None = None, resume: bool = False, config=CONFIG, fsdp=False):
    torch.manual_seed(0)
    model = tiny_model("llama", seed=0)
    result = finetune(model, _data(), config, out_dir=out, resume=resume, progress=False, fsdp=fsdp)
    return _state(model), result.history, model


def _stop_at_the_second_step(monkeypatch) -> None:
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def stop(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("stopped")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", stop)


def _worker(rank: int, size: int, store: str, job: str, tmp: str) -> None:
    dist.init_process_group(  # a process left waiting fails after 2 minutes instead of hanging
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=size,
        timeout=timedelta(minutes=2),
    )
    try:
        if job == "train":
            state, history, _ = _train()
        elif job == "resume":
            state, history, _ = _train(Path(tmp) / "run", resume=True)
        elif job == "fsdp-nan":  # only rank 1 sees a non-finite loss, in its first pass
            import piggyback_interp.training.objectives as objectives

            with pytest.MonkeyPatch.context() as monkeypatch:
                real = objectives.response_loss
                monkeypatch.setattr(
                    objectives,
                    "response_loss",
                    lambda *a: real(*a) * (float("nan") if rank else 1.0),
                )
                with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
                    _train(config=UNEVEN, fsdp=True)
            state, history = {"raised": torch.tensor(1)}, []
        elif job == "fsdp-full":  # every weight trained (and its Adam state) sharded
            state, history, _ = _train(config=replace(UNEVEN, lora_rank=None), fsdp=True)
        elif job == "fsdp":
            state, history, model = _train(config=UNEVEN, fsdp=True)
            params = list(model.original_model.parameters())
            # what this process holds of the weights: about half of them
            state["held"] = torch.tensor(
                sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)
            )
        elif job == "fsdp-stop":  # stopped during the second step: the checkpoint holds step 1
            with pytest.MonkeyPatch.context() as monkeypatch:
                _stop_at_the_second_step(monkeypatch)
                with pytest.raises(KeyboardInterrupt):
                    _train(Path(tmp) / "run", config=UNEVEN, fsdp=True)
            state, history = {}, []
        elif job == "fsdp-resume":
            state, history, _ = _train(Path(tmp) / "run", resume=True, config=UNEVEN, fsdp=True)
        else:  # sweep
            base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
            batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi there"], align="prefix")
            result = sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
            state, history = {"values": result.values}, []
        torch.save({"state": state, "history": history}, Path(tmp) / f"{job}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(job: str, tmp: Path, size: int = 2) -> list[dict]:
    store = tmp / f"store-{job}"
    mp.spawn(_worker, args=(size, str(store), job, str(tmp)), nprocs=size, join=True)
    return [torch.load(tmp / f"{job}-{r}.pt", weights_only=True) for r in range(size)]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_outside_a_group_everything_is_single_process():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.gather(5) == [5]


def test_fsdp_in_one_process_says_it_shards_nothing():
    with pytest.warns(UserWarning, match="one process: nothing to shard"):
        state, history, model = _train(config=replace(CONFIG, epochs=1), fsdp=True)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert len(history) == 2 and state


def test_two_processes_train_like_one(tmp_path):
    single_state, single_history, _ = _train()
    results = _spawn("train", tmp_path)
    for r in results:  # every rank holds the same weights, equal to one process's
        _assert_same_weights(r["state"], single_state)
    assert len(results[0]["history"]) == len(single_history) == 4  # 8 chats / (2 x 2), 2 epochs
    for got, want in zip(results[0]["history"], single_history, strict=True):
        assert got["sft"] == pytest.approx(want["sft"], rel=1e-5)
        assert got["kv"] == pytest.approx(want["kv"], rel=1e-4, abs=1e-9)
    # the training moved the weights (LoRA's B starts at zero): not two untouched inits
    assert all(v.abs().sum() > 0 for n, v in single_state.items() if "lora_B" in n)


def test_two_processes_resume_a_one_process_checkpoint(tmp_path, monkeypatch):
    want_state, _, _ = _train()
    # one process, stopped during its second optimizer step: the checkpoint holds step 1
    with monkeypatch.context() as patched:
        _stop_at_the_second_step(patched)
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path / "run")
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["step"] == 1
    results = _spawn("resume", tmp_path)  # two processes go on from it
    for r in results:
        _assert_same_weights(r["state"], want_state)
    assert [h["step"] for h in results[0]["history"]] == [1, 2, 3, 4]


def test_sharded_processes_train_like_one(tmp_path):
    single_state, single_history, _ = _train(config=UNEVEN)
    results = _spawn("fsdp", tmp_path)
    for r in results:
        # each process held about half the weights (the shards of one matrix differ by a row)
        assert 0.45 < r["state"].pop("held").item() < 0.55
        _assert_same_weights(r["state"], single_state)
    assert len(results[0]["history"]) == len(single_history) == 4  # groups of 3 and 1, 2 epochs
    for got, want in zip(results[0]["history"], single_history, strict=True):
        assert got["sft"] == pytest.approx(want["sft"], rel=1e-5)  # the padding is not logged
        assert got["kv"] == pytest.approx(want["kv"], rel=1e-4, abs=1e-9)
    assert all(v.abs().sum() > 0 for n, v in single_state.items() if "lora_B" in n)


def test_sharded_full_finetune_trains_like_one_process(tmp_path):
    want_state, want_history, _ = _train(config=replace(UNEVEN, lora_rank=None))
    assert len(want_state) > 10  # every weight, not only adapters
    for r in _spawn("fsdp-full", tmp_path):
        _assert_same_weights(r["state"], want_state)
        assert [h["sft"] for h in r["history"]] == pytest.approx(
            [h["sft"] for h in want_history], rel=1e-5
        )


def test_a_non_finite_loss_on_one_sharded_process_stops_all(tmp_path):
    # the others must not wait for it in a collective: every process raises, none hangs
    assert [r["state"]["raised"].item() for r in _spawn("fsdp-nan", tmp_path)] == [1, 1]


def test_a_sharded_checkpoint_resumes_sharded_and_in_one_process(tmp_path):
    want_state, _, _ = _train(config=UNEVEN)
    _spawn("fsdp-stop", tmp_path)
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert saved["step"] == 1
    for name, value in saved["trainable"].items():  # whole tensors, not one rank's shard
        assert value.shape == want_state[name].shape, name
    shutil.copytree(tmp_path / "run", tmp_path / "one")
    one_state, one_history, _ = _train(tmp_path / "one", resume=True, config=UNEVEN)
    _assert_same_weights(one_state, want_state)
    assert [h["step"] for h in one_history] == [1, 2, 3, 4]
    for r in _spawn("fsdp-resume", tmp_path):
        _assert_same_weights(r["state"], want_state)


def test_two_processes_share_a_sweep(tmp_path):
    base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi there"], align="prefix")
    want = sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False).values
    results = _spawn("sweep", tmp_path)
    for r in results:
        torch.testing.assert_close(r["state"]["values"], want, rtol=1e-5, atol=1e-6)


def test_torchrun_launches_the_cli_unchanged(tmp_path):
    model_dir = save_tiny_model(tmp_path / "base", "llama", seed=0)
    data = tmp_path / "train.jsonl"
    save_chat_jsonl(_data(), data)
    options = [
        "finetune", "--model", str(model_dir), "--data", str(data), "--method", "treft",
        "--lr", "5e-3", "--epochs", "1", "--batch-size", "2", "--grad-accum", "2",
        "--export", "both", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = [sys.executable, "-m", "piggyback_interp.cli", *options, "--out", str(tmp_path / "one")]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "piggyback_interp.cli", *options]  # fmt: skip
    two = [*launch, "--out", str(tmp_path / "two")]
    fsdp = [*launch, "--fsdp", "--out", str(tmp_path / "fsdp")]
    for cmd in (one, two, fsdp):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    def exported(run: str, kind: str) -> dict[str, torch.Tensor]:
        name = "adapter_model" if kind == "adapter" else "model"
        return load_file(tmp_path / run / "finetune" / kind / f"{name}.safetensors")

    for run in ("two", "fsdp"):  # the sharded run exports whole weights, merged and not
        _assert_same_weights(exported(run, "adapter"), exported("one", "adapter"))
        _assert_same_weights(exported(run, "model"), exported("one", "model"))
        record = json.loads((tmp_path / run / "finetune" / "finetune.json").read_text())
        assert len(record["history"]) == 2  # 8 chats / (2 x 2)
        assert (record["processes"], record["fsdp"]) == (2, run == "fsdp")


def test_the_fsdp_benchmark_sees_each_process_hold_half(tmp_path):
    model = save_tiny_model(tmp_path / "tiny", "llama", seed=0)
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fsdp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(bench), "--json", "--model", str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trained"] == "full" and result["processes"] == 2
    for state in ("weights", "gradients", "adam_state"):
        assert 0.45 < result[f"{state}_ratio"] < 0.55, state
    assert result["ddp_weights_mb"] > 0 and result["max_abs_weight_diff"] < 1e-5
