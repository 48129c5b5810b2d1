"""Big-model placement (HF ``device_map``): a model spread over CPU and disk (accelerate
moves each offloaded layer in for its forward) patches, sweeps and generates exactly as
the same model loaded whole. On a GPU machine the same code path spreads layers over GPUs.
"""

from __future__ import annotations

import pytest
import torch

from piggyback_interp.analysis.kv_sweep import kv_layer_sweep
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core.models import ModelLoadError, chat_tokenizer, load_model
from piggyback_interp.core.pairs import load_pair
from piggyback_interp.core.placement import Placement
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.interventions import patch_prefix
from piggyback_interp.interventions.generation import PatchSpec, generate
from piggyback_interp.measures.metrics import LogOdds
from piggyback_interp.testing import save_tiny_model

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    return (
        save_tiny_model(root / "base", n_layers=N_LAYERS, seed=0),
        save_tiny_model(root / "ft", n_layers=N_LAYERS, seed=1),
        root / "offload",
    )


def split_map(n_layers: int) -> dict[str, str]:
    """The first half of the layers on CPU, the rest (and the head) offloaded to disk."""
    layers = {f"model.layers.{i}": "cpu" if i < n_layers // 2 else "disk" for i in range(n_layers)}
    return {
        "model.embed_tokens": "cpu",
        **layers,
        "model.norm": "disk",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }


@pytest.fixture(scope="module")
def models(dirs):
    base_dir, ft_dir, offload = dirs
    whole = load_pair(base_dir, ft_dir)
    placed = load_pair(
        base_dir, ft_dir, placement=Placement(split_map(N_LAYERS), offload_folder=str(offload))
    )
    return whole, placed


def test_placed_model_is_really_offloaded(models, dirs):
    _, placed = models
    hf = placed.finetuned.original_model
    assert hf.hf_device_map["model.layers.3"] == "disk"
    assert hf.lm_head.weight.device.type == "meta"  # the weights live on disk until used
    assert placed.finetuned.cfg.device == "cpu"  # inputs go where accelerate computes
    # each model offloads into its own subfolder
    assert len([p for p in dirs[2].iterdir() if p.is_dir()]) == 2


def test_logits_and_prefix_patch_equal_whole_model(models):
    whole, placed = models
    batch = batch_spans(chat_tokenizer(whole.finetuned), QUESTIONS, align="left")
    kw = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    out = {}
    for name, pair in (("whole", whole), ("placed", placed)):
        with torch.no_grad():
            clean = pair.finetuned(batch.input_ids, **kw)
            with patch_prefix(pair.finetuned, pair.base, batch, layers=[1, 3]):
                patched = pair.finetuned(batch.input_ids, **kw)
        out[name] = clean, patched
    assert torch.allclose(out["whole"][0], out["placed"][0], atol=1e-5)
    assert torch.allclose(out["whole"][1], out["placed"][1], atol=1e-5)
    assert (out["whole"][1] - out["whole"][0]).abs().max() > 1e-2  # the patch does something


def test_sweeps_equal_whole_model(models):
    whole, placed = models
    batch = batch_spans(chat_tokenizer(whole.finetuned), QUESTIONS, align="prefix")
    metric = LogOdds("I have no idea", "Paris")
    res = {
        name: sweep(pair.finetuned, pair.base, batch, metric, cells_per_batch=4, progress=False)
        for name, pair in (("whole", whole), ("placed", placed))
    }
    assert (res["whole"].values - res["placed"].values).abs().max() <= 1e-4
    assert res["whole"].values.std() > 1e-3
    kv = {
        name: kv_layer_sweep(pair.finetuned, pair.base, batch, metric, progress=False)
        for name, pair in (("whole", whole), ("placed", placed))
    }
    assert (kv["whole"].values - kv["placed"].values).abs().max() <= 1e-4


def test_patched_generation_equals_whole_model(models):
    whole, placed = models
    texts = {
        name: generate(
            pair.finetuned,
            QUESTIONS,
            patch=PatchSpec(pair.base),
            max_new_tokens=6,
            system_prompt=None,
        ).texts
        for name, pair in (("whole", whole), ("placed", placed))
    }
    assert texts["whole"] == texts["placed"]


def test_bad_placement_is_a_clear_error(dirs):
    base_dir = dirs[0]
    with pytest.raises(ModelLoadError, match="could not place"):
        load_model(base_dir, placement=Placement({"model.nonexistent": "cpu"}))


def test_disk_offload_of_safetensors_needs_no_folder(dirs, models):
    """transformers reads disk-placed weights straight from the safetensors files."""
    whole, _ = models
    model = load_model(dirs[0], placement=Placement(split_map(N_LAYERS)))
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(model(ids), whole.base(ids), atol=1e-5)
