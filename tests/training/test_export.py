"""Finetuned bridges written as plain HF models and peft adapters, loaded back three ways."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from piggyback_interp.core.data import ChatDataset
from piggyback_interp.core.models import load_model
from piggyback_interp.testing import save_tiny_model
from piggyback_interp.training import FinetuneConfig, finetune
from piggyback_interp.training.export import save_finetuned
from piggyback_interp.training.lora import apply_lora

IDS = torch.tensor([[1, 40, 41, 42, 43, 44]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_merged_and_adapter_exports_reload_everywhere(tmp_path, arch):
    from peft import PeftModel

    base_dir = save_tiny_model(tmp_path / "base", arch)
    model = load_model(base_dir)
    apply_lora(model, rank=4, init_lora_weights=False)  # random adapters: a real change
    expected = model(IDS)
    plain = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    assert (plain(IDS).logits - expected).abs().max() > 1e-3

    merged = save_finetuned(model, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager")
    assert (hf(IDS).logits - expected).abs().max().item() <= 1e-5
    assert (load_model(merged)(IDS) - expected).abs().max().item() <= 1e-5

    adapter = save_finetuned(model, tmp_path / "adapter", merged=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (load_model(adapter)(IDS) - expected).abs().max().item() <= 1e-5
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"), adapter
    )
    assert (peft_model(IDS).logits - expected).abs().max().item() <= 1e-5


def test_finetune_writes_model_and_record(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base", "llama")
    data = ChatDataset.from_records(
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "I have no idea"},
                ]
            }
        ]
        * 4
    )
    model = load_model(base_dir)
    out = tmp_path / "run"
    result = finetune(
        model,
        data,
        FinetuneConfig(method="treft", epochs=1, batch_size=2, export="both"),
        out_dir=out,
        progress=False,
    )
    with torch.no_grad():
        expected = model(IDS)
        assert (load_model(out / "model")(IDS) - expected).abs().max().item() <= 1e-5
        assert (load_model(out / "adapter")(IDS) - expected).abs().max().item() <= 1e-5
    record = json.loads((out / "finetune.json").read_text())
    assert record["data_sha256"] == data.sha256 and record["steps"] == result.steps == 2
    assert record["config"]["method"] == "treft" and "torch" in record["versions"]
    assert [h["step"] for h in record["history"]] == [1, 2] and "drift" in record["history"][0]


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="needs LoRA"):
        FinetuneConfig(lora_rank=None, export="adapter")
    model = load_model(save_tiny_model(tmp_path / "base", "llama"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_finetuned(model, tmp_path / "x", merged=False)


def test_an_export_on_a_full_disk_leaves_no_partial_files(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)"): the export
    raises DiskError (exit code 4), and neither a partial file nor a temporary folder stays."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from piggyback_interp.core.errors import DiskError
    from piggyback_interp.testing import tiny_model

    model = tiny_model("llama")
    apply_lora(model, rank=4)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"part of the weights")
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskError) as caught:
        save_finetuned(model, tmp_path / "run" / "adapter", merged=False)
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.rglob("*")] == ["run"]
