"""load_model on tiny random models: oracle = plain transformers / peft."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from piggyback_interp.core.models import (
    ModelLoadError,
    chat_tokenizer,
    load_model,
    model_info,
    resolve_source,
)
from piggyback_interp.testing import save_tiny_model, tiny_hf_model

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2, 1, 50, 51]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama", seed=0)


def test_bridge_logits_equal_hf(tiny):
    """Bridge logits equal the HF model it wraps, for every tiny architecture."""
    hf = tiny.original_model
    with torch.no_grad():
        assert torch.equal(tiny(IDS), hf(IDS).logits)


def test_load_local_directory_matches_plain_transformers(tiny_dir):
    model = load_model(tiny_dir)
    oracle = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        diff = (model(IDS) - oracle(IDS).logits).abs().max().item()
    assert diff <= 1e-5
    info = model_info(model)
    assert info.kind == "local" and len(info.sha256) == 64
    assert chat_tokenizer(model).chat_template  # the chat template comes with the model


def test_no_double_bos_for_chat_text(tiny_dir):
    model = load_model(tiny_dir)
    tok = chat_tokenizer(model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert model.to_tokens(text)[0].tolist() == expected
    assert expected[0] == tok.bos_token_id and expected[1] != tok.bos_token_id


@pytest.mark.parametrize("merge", [True, False])
def test_lora_adapter_loads_merged_and_unmerged(tiny_dir, tmp_path, merge):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, cfg).eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = peft_model(IDS).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")(
            IDS
        ).logits

    model = load_model(adapter_dir, merge_adapter=merge)
    with torch.no_grad():
        got = model(IDS)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3  # the adapter really changed something
    has_lora = any("lora_A" in n for n, _ in model.original_model.named_parameters())
    assert has_lora is (not merge)
    info = model_info(model)
    assert info.kind == "adapter" and info.adapter_merged is merge


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(ModelLoadError, match=r"(?s)Hugging Face Hub.*local-dir"):
        load_model("nonexistent-org/nonexistent-model-xyz")


@pytest.mark.parametrize("name", ["./no/such/dir", "/definitely/not/here", "a/b/c"])
def test_missing_path_gives_clear_error(name):
    with pytest.raises(ModelLoadError, match="no model directory"):
        resolve_source(name)


def test_directory_without_model_gives_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"neither config\.json"):
        resolve_source(tmp_path)


def test_adapter_without_base_gives_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelLoadError, match=r"base=\.\.\."):
        resolve_source(tmp_path)


def test_tiny_hf_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_hf_model("gpt5")
