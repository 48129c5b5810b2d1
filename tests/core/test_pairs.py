"""load_pair: compatibility checks, the memory-lean path and the repr (oracle: plain
transformers); shared-base pairs: a LoRA adapter on its own base loads as ONE copy of the
base weights (pair.base = the base, pair.finetuned = the same tensors + the adapter,
unmerged), and every experiment gives what the two-copy pair gives."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from piggyback_interp.analysis.kv_sweep import kv_layer_sweep
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.analysis.task_vectors import scaled_task_vector, task_vector
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.models import chat_tokenizer, load_model, model_info
from piggyback_interp.core.pairs import BaseReleasedError, IncompatiblePairError, load_pair
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.interventions import patch_prefix
from piggyback_interp.interventions.generation import PatchSpec, generate
from piggyback_interp.measures.metrics import LogOdds
from piggyback_interp.testing import save_tiny_model, tiny_model, tiny_tokenizer
from piggyback_interp.training.export import save_finetuned
from piggyback_interp.training.lora import apply_lora

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2, 1, 50, 51]])
TOL = 1e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    base_dir = save_tiny_model(root / "base", n_layers=4, seed=0)
    model = load_model(base_dir)
    apply_lora(model, rank=4, init_lora_weights=False)  # random lora_B: a real change
    adapter = save_finetuned(model, root / "adapter", merged=False)
    return base_dir, adapter


@pytest.fixture(scope="module")
def pairs(dirs):
    base_dir, adapter = dirs
    return load_pair(base_dir, adapter), load_pair(base_dir, adapter, shared=False)


def _storages(*models):
    return {t.untyped_storage().data_ptr() for m in models for t in m.parameters()}


def test_adapter_pair_shares_the_base_weights_by_default(pairs):
    shared, two = pairs
    assert shared.shared and not two.shared
    base, ft = _storages(shared.base), _storages(shared.finetuned)
    assert base <= ft  # every base tensor is the finetuned model's too
    lora = [n for n, _ in shared.finetuned.original_model.named_parameters() if "lora_" in n]
    assert len(ft - base) == len(lora) > 0  # the finetuned model adds the adapter only
    assert _storages(two.base).isdisjoint(_storages(two.finetuned))
    assert model_info(shared.finetuned).adapter_merged is False
    assert model_info(shared.base).kind != "adapter"


@torch.no_grad()
def test_logits_and_cache_equal_two_copies(pairs):
    shared, two = pairs
    for side in ("base", "finetuned"):
        a, b = getattr(shared, side), getattr(two, side)
        assert (a(IDS) - b(IDS)).abs().max().item() <= TOL, side
        _, cache_a = a.run_with_cache(IDS)
        _, cache_b = b.run_with_cache(IDS)
        for name in ("blocks.2.attn.hook_k", "blocks.3.hook_resid_post"):
            assert (cache_a[name] - cache_b[name]).abs().max().item() <= TOL, (side, name)
    assert (shared.base(IDS) - shared.finetuned(IDS)).abs().max() > 1e-2  # adapter is on


@torch.no_grad()
def test_hooks_on_one_model_never_fire_on_the_other(pairs):
    shared, _ = pairs
    fired = []
    with shared.base.hooks(
        fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: fired.append(1))]
    ):
        shared.finetuned(IDS)
        assert not fired
        shared.base(IDS)
    assert fired == [1]


@torch.no_grad()
def test_kv_prefix_patch_equals_two_copies(pairs):
    out = []
    for pair in pairs:
        batch = batch_spans(chat_tokenizer(pair.finetuned), QUESTIONS, align="left")
        kw = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        clean = pair.finetuned(batch.input_ids, **kw)
        with patch_prefix(pair.finetuned, pair.base, batch, layers=[1, 3]):
            patched = pair.finetuned(batch.input_ids, **kw)
        out.append((clean, patched))
    (clean_s, patched_s), (clean_t, patched_t) = out
    assert (patched_s - patched_t).abs().max().item() <= TOL
    assert (clean_s - clean_t).abs().max().item() <= TOL
    assert (patched_s - clean_s).abs().max() > 1e-2  # the patch does something


def test_sweeps_equal_two_copies(pairs):
    metric = LogOdds("I have no idea", "Paris")
    res, kv = [], []
    for pair in pairs:
        batch = batch_spans(chat_tokenizer(pair.finetuned), QUESTIONS, align="prefix")
        res.append(
            sweep(pair.finetuned, pair.base, batch, metric, cells_per_batch=4, progress=False)
        )
        kv.append(kv_layer_sweep(pair.finetuned, pair.base, batch, metric, progress=False))
    assert (res[0].values - res[1].values).abs().max().item() <= TOL
    assert res[0].values.std() > 1e-3
    assert (kv[0].values - kv[1].values).abs().max().item() <= TOL


def test_patched_generation_equals_two_copies(pairs):
    gens = [
        generate(
            pair.finetuned,
            QUESTIONS,
            patch=PatchSpec(pair.base, layers=[0, 2]),
            max_new_tokens=6,
            system_prompt=None,
        )
        for pair in pairs
    ]
    assert gens[0].token_ids == gens[1].token_ids


def test_task_vectors_read_the_right_weights(pairs, dirs):
    vectors = [task_vector(pair.base, pair.finetuned) for pair in pairs]
    from_adapter = task_vector(None, dirs[1])  # the adapter's own B @ A * scaling
    assert set(vectors[0].deltas) == set(vectors[1].deltas) == set(from_adapter.deltas)
    for name, delta in from_adapter.deltas.items():
        for vector in vectors:
            assert (vector.deltas[name] - delta).abs().max().item() <= TOL, name
    assert all(d.abs().max() > 0 for d in from_adapter.deltas.values())


@torch.no_grad()
def test_scaled_task_vector_on_one_model_leaves_the_other(pairs, dirs):
    """Editing the shared base weights in place would move the finetuned model too."""
    shared, _ = pairs
    vector = task_vector(None, dirs[1])
    ft_before, base_before = shared.finetuned(IDS), shared.base(IDS)
    with scaled_task_vector(shared.base, vector, alpha=1.0):
        assert torch.equal(shared.finetuned(IDS), ft_before)
        # base + the adapter's delta is the finetuned model
        assert (shared.base(IDS) - ft_before).abs().max().item() <= 1e-4
    assert torch.equal(shared.base(IDS), base_before)
    assert _storages(shared.base) <= _storages(shared.finetuned)  # the originals are back


@torch.no_grad()
def test_exporting_the_finetuned_model_leaves_the_base_bit_for_bit(pairs, tmp_path):
    shared, two = pairs
    before = {n: p.clone() for n, p in shared.base.original_model.named_parameters()}
    out = save_finetuned(shared.finetuned, tmp_path / "merged")
    for name, param in shared.base.original_model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert (load_model(out)(IDS) - two.finetuned(IDS)).abs().max().item() <= TOL


@torch.no_grad()
def test_reference_path_on_a_shared_pair(dirs):
    base_dir, adapter = dirs
    pair = load_pair(base_dir, adapter, reference=lambda base: base(IDS))
    assert pair.shared and not pair.has_base
    two = load_pair(base_dir, adapter, shared=False)
    assert (pair.reference - two.base(IDS)).abs().max().item() <= TOL


def test_two_copies_where_sharing_is_not_exact(dirs, tmp_path):
    base_dir, adapter = dirs
    assert not load_pair(base_dir, adapter, merge_adapter=True).shared
    other = save_tiny_model(tmp_path / "other", n_layers=4, seed=1)
    assert not load_pair(other, adapter).shared  # the adapter's base is another model
    with pytest.raises(UserError, match=r"not a LoRA adapter directory.*shared=False"):
        load_pair(base_dir, other, shared=True)
    with pytest.raises(UserError, match="applies to"):
        load_pair(other, adapter, shared=True)


def test_the_memory_benchmark_runs(tmp_path):
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pair_memory.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(bench), "--tiny", "--json", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.5 <= result["ratio"] <= 0.6 and result["max_abs_diff"] <= TOL
    assert result["two_copies_mb"] > result["shared_mb"] > 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@torch.no_grad()
def test_other_architectures_equal_two_copies(tmp_path, arch):
    base_dir = save_tiny_model(tmp_path / "base", arch, n_layers=3, seed=0)
    model = load_model(base_dir)
    apply_lora(model, rank=4, init_lora_weights=False)
    adapter = save_finetuned(model, tmp_path / "adapter", merged=False)
    shared = load_pair(base_dir, adapter)
    two = load_pair(base_dir, adapter, shared=False, merge_adapter=False)
    assert shared.shared and not two.shared
    out = []
    for pair in (shared, two):
        batch = batch_spans(chat_tokenizer(pair.finetuned), QUESTIONS, align="left")
        kw = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        with patch_prefix(pair.finetuned, pair.base, batch, layers=[1]):
            patched = pair.finetuned(batch.input_ids, **kw)
        out.append(
            (pair.base(batch.input_ids, **kw), pair.finetuned(batch.input_ids, **kw), patched)
        )
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)  # the same computation, on the same tensors


# ---------------------------------------------------------------- checks, lean path, repr


def test_pair_of_compatible_models(tmp_path):
    a = save_tiny_model(tmp_path / "a", "llama", seed=0)
    b = save_tiny_model(tmp_path / "b", "llama", seed=1)
    pair = load_pair(a, b)
    assert pair.has_base
    with torch.no_grad():
        assert not torch.equal(pair.base(IDS), pair.finetuned(IDS))
    assert pair.tokenizer.get_vocab() == chat_tokenizer(pair.finetuned).get_vocab()


def test_pair_refuses_other_architecture(tmp_path):
    a = save_tiny_model(tmp_path / "a", "llama", n_layers=2)
    b = save_tiny_model(tmp_path / "b", "llama", n_layers=3)
    with pytest.raises(IncompatiblePairError, match="num_hidden_layers is 2 in the base and 3"):
        load_pair(a, b)


def test_pair_refuses_other_chat_template(tmp_path):
    a = save_tiny_model(tmp_path / "a")
    b = save_tiny_model(tmp_path / "b")
    tok = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(b)
    with pytest.raises(IncompatiblePairError, match="chat template differs"):
        load_pair(a, b)


def test_pair_refuses_other_vocabulary_and_special_tokens(tmp_path):
    a = save_tiny_model(tmp_path / "a")
    b = save_tiny_model(tmp_path / "b")
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(b)
    with pytest.raises(IncompatiblePairError) as err:
        load_pair(a, b)
    assert "vocabulary" in str(err.value) and "special tokens" in str(err.value)


def test_lean_pair_computes_reference_then_releases_base(tmp_path):
    a = save_tiny_model(tmp_path / "a", seed=0)
    b = save_tiny_model(tmp_path / "b", seed=1)
    seen = {}

    def reference(base):
        seen["ref"] = weakref.ref(base)
        assert not torch.is_grad_enabled()
        return base(IDS)

    pair = load_pair(a, b, reference=reference)
    gc.collect()
    assert seen["ref"]() is None, "the base model is still alive after the lean load"
    with pytest.raises(BaseReleasedError, match="released"):
        _ = pair.base
    oracle = AutoModelForCausalLM.from_pretrained(a, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (pair.reference - oracle(IDS).logits).abs().max().item() <= 1e-5


def test_pair_accepts_loaded_bridges(tiny):
    from piggyback_interp.testing import tiny_model

    other = tiny_model(_arch_of(tiny), seed=3)
    pair = load_pair(tiny, other)
    assert pair.base is tiny and pair.finetuned is other


def _arch_of(model):
    return {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[
        type(model.original_model).__name__
    ]


def test_pair_repr_names_the_models_not_their_trees():
    pair = load_pair(tiny_model("llama", seed=0), tiny_model("llama", seed=1))
    text = repr(pair)
    assert len(text) < 600, len(text)  # was ~29,600: both module trees
    for fact in ("base=tiny-llama-L2-seed0", "finetuned=tiny-llama-L2-seed1", "layers=2",
                 "d_model=64", "dtype=float32", "device=cpu", "shared=False"):  # fmt: skip
        assert fact in text
    assert "Linear" not in text and "Embedding" not in text
    page = pair._repr_html_()
    assert "tiny-llama-L2-seed1" in page and "<table>" in page and "Linear" not in page
    pair.release_base()
    assert "base=released" in repr(pair)
