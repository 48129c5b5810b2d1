"""Task vectors: deltas against hand-made and peft-merged oracles, streaming, cosines, scaling."""

import contextlib
import copy
import doctest
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import piggyback_interp.analysis.task_vectors as tv_module
from piggyback_interp.analysis.task_vectors import (
    NON_LAYER,
    TaskVector,
    apply_task_vector,
    cosine_similarity,
    layer_index,
    module_name,
    scaled_task_vector,
    task_vector,
)
from piggyback_interp.core.models import load_model
from piggyback_interp.testing import save_tiny_model, tiny_hf_model, tiny_tokenizer

IDS = torch.tensor([[1, 40, 41, 42, 43, 44]])
GRID = 256.0  # weights and deltas on multiples of 1/256: sums and differences are exact

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"


def _known_deltas() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shapes = {Q0: (64, 64), DOWN1: (64, 128), NORM: (64,)}
    deltas = {}
    for name, shape in shapes.items():
        delta = torch.randint(-4, 5, shape, generator=gen).float() / GRID
        delta.view(-1)[0] = 1 / GRID  # never all zero
        deltas[name] = delta
    return deltas


def _on_grid(model: torch.nn.Module, names) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(torch.round(params[name] * GRID) / GRID)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny base and a finetuned copy that differs by known, exactly representable deltas."""
    root = tmp_path_factory.mktemp("task-vectors")
    deltas = _known_deltas()
    base = tiny_hf_model("llama")
    _on_grid(base, deltas)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")  # load_model needs the tokenizer
    finetuned = copy.deepcopy(base)
    params = dict(finetuned.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    finetuned.save_pretrained(root / "finetuned")
    tiny_tokenizer().save_pretrained(root / "finetuned")
    return {"base": root / "base", "finetuned": root / "finetuned", "deltas": deltas, "root": root}


@pytest.fixture(scope="module")
def bridges(dirs):
    return {"base": load_model(dirs["base"]), "finetuned": load_model(dirs["finetuned"])}


# ================================================================ names


def test_layer_and_module_names():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("blocks.5.attn.W_Q") == 5
    assert layer_index("model.embed_tokens.weight") is None
    assert module_name("model.layers.0.self_attn.q_proj.weight") == "self_attn.q_proj"
    assert module_name("model.layers.0.self_attn.q_proj.bias") == "self_attn.q_proj"
    assert module_name("model.layers.1.mlp.down_proj.weight") == "mlp.down_proj"
    assert module_name("transformer.h.3.attn.c_attn.weight") == "attn.c_attn"
    assert module_name("lm_head.weight") == "lm_head"
    assert TaskVector.layer(Q0) == 0 and TaskVector.module(NORM) == "model.norm"


# ================================================================ hand oracle


def test_directory_deltas_equal_known_deltas(dirs):
    vector = task_vector(dirs["base"], dirs["finetuned"])
    known = dirs["deltas"]
    assert set(vector.deltas) == set(known)  # untouched parameters are absent
    for name, delta in known.items():
        assert torch.equal(vector.deltas[name], delta), name
        assert vector.deltas[name].dtype == torch.float32
    frame = vector.norms().set_index("param")
    for name, delta in known.items():
        assert frame.loc[name, "norm"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-6)
    assert frame.loc[Q0, "layer"] == 0 and frame.loc[Q0, "module"] == "self_attn.q_proj"
    assert frame.loc[DOWN1, "layer"] == 1 and frame.loc[DOWN1, "module"] == "mlp.down_proj"
    assert frame.loc[NORM, "layer"] == NON_LAYER and frame.loc[NORM, "module"] == "model.norm"
    base = tiny_hf_model("llama")
    _on_grid(base, known)
    base_param = dict(base.named_parameters())[DOWN1]
    assert frame.loc[DOWN1, "base_norm"] == pytest.approx(
        float(base_param.detach().norm()), rel=1e-6
    )
    assert frame.loc[DOWN1, "relative"] == pytest.approx(
        frame.loc[DOWN1, "norm"] / frame.loc[DOWN1, "base_norm"]
    )
    assert vector.source["base"]["kind"] == "directory"
    assert vector.source["finetuned"]["path"] == str(dirs["finetuned"].resolve())


def test_layer_norms_aggregate_sum_of_squares(dirs):
    vector = task_vector(dirs["base"], dirs["finetuned"])
    layers = vector.layer_norms().set_index("layer")
    assert list(layers.index) == [NON_LAYER, 0, 1]
    for layer, name in ((0, Q0), (1, DOWN1), (NON_LAYER, NORM)):
        expected = float(torch.linalg.norm(dirs["deltas"][name]))
        assert layers.loc[layer, "norm"] == pytest.approx(expected, rel=1e-6)
        assert layers.loc[layer, "n_params"] == 1
    two = TaskVector(
        {Q0: torch.full((2,), 3.0), "model.layers.0.mlp.up_proj.weight": torch.full((2,), 4.0)}
    )
    row = two.layer_norms().iloc[0]
    assert row["norm"] == pytest.approx(math.sqrt(18 + 32))
    assert math.isnan(row["base_norm"]) and math.isnan(row["relative"])


def test_modules_filter(dirs):
    vector = task_vector(dirs["base"], dirs["finetuned"], modules="q_proj")
    assert list(vector.deltas) == [Q0]
    vector = task_vector(dirs["base"], dirs["finetuned"], modules=["mlp", "model.norm"])
    assert set(vector.deltas) == {DOWN1, NORM}
    with pytest.raises(ValueError, match="matches none"):
        task_vector(dirs["base"], dirs["finetuned"], modules=["nonexistent_proj"])


# ================================================================ loaded models


def test_loaded_models_equal_directory_path(dirs, bridges):
    from transformers import AutoModelForCausalLM

    expected = task_vector(dirs["base"], dirs["finetuned"])
    hf_finetuned = AutoModelForCausalLM.from_pretrained(dirs["finetuned"])
    for base, finetuned in (
        (bridges["base"], bridges["finetuned"]),  # two bridges
        (dirs["base"], bridges["finetuned"]),  # mixed
        (bridges["base"], hf_finetuned),  # bridge and plain HF module
    ):
        vector = task_vector(base, finetuned)
        assert list(vector.deltas) == list(expected.deltas)
        for name in expected.deltas:
            assert torch.equal(vector.deltas[name], expected.deltas[name])
        assert vector.base_norms == pytest.approx(expected.base_norms, rel=1e-6)
    assert task_vector(bridges["base"], bridges["finetuned"]).source["finetuned"]["kind"] == "model"


# ================================================================ LoRA adapters


def _lora_case(case: str):
    """(HF model, LoraConfig) for one adapter flavour."""
    from peft import LoraConfig

    if case == "plain":
        return tiny_hf_model("llama"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        )
    if case == "rslora":
        return tiny_hf_model("llama"), LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"]
        )
    if case == "patterns":
        return tiny_hf_model("llama"), LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        )
    if case == "bias":  # qwen2: q/k/v have biases
        return tiny_hf_model("qwen2"), LoraConfig(
            r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj"]
        )
    if case == "embedding":
        return tiny_hf_model("llama"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]
        )
    if case == "fan_in_fan_out":  # GPT-2's Conv1D stores weights transposed
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return GPT2LMHeadModel(config).eval(), LoraConfig(
            r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]
        )
    raise AssertionError(case)


def _randomise_lora(peft_model) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize(
    "case", ["plain", "rslora", "patterns", "bias", "embedding", "fan_in_fan_out"]
)
def test_adapter_deltas_equal_peft_merge(tmp_path, case):
    from peft import get_peft_model

    model, config = _lora_case(case)
    model.save_pretrained(tmp_path / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, config)
    _randomise_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    in_memory = task_vector(None, peft_model)  # a live peft model, adapters unmerged
    in_memory_full = task_vector(tmp_path / "base", peft_model)

    merged = peft_model.merge_and_unload().state_dict()  # the independent oracle
    oracle = {
        k: merged[k] - base_state[k]
        for k in base_state
        if not torch.equal(merged[k], base_state[k])
    }
    assert oracle, "the adapter changed nothing: the oracle is vacuous"

    for vector in (
        task_vector(tmp_path / "base", tmp_path / "adapter"),
        task_vector(None, tmp_path / "adapter"),
        in_memory,
        in_memory_full,
    ):
        assert set(vector.deltas) == set(oracle)
        for name, expected in oracle.items():
            assert vector.deltas[name].shape == expected.shape, name
            assert (vector.deltas[name] - expected).abs().max().item() <= 1e-6, name
    with_base = task_vector(tmp_path / "base", tmp_path / "adapter")
    assert with_base.base_norms.keys() == oracle.keys()
    name = next(iter(oracle))
    assert with_base.base_norms[name] == pytest.approx(float(base_state[name].norm()), rel=1e-6)
    alone = task_vector(None, tmp_path / "adapter")
    assert alone.base_norms == {} and math.isnan(alone.norms().base_norm.iloc[0])
    assert alone.source["finetuned"]["kind"] == "adapter" and alone.source["base"] is None


def test_bridge_lora_and_exported_adapter_agree(dirs, tmp_path):
    from piggyback_interp.training.export import save_finetuned
    from piggyback_interp.training.lora import apply_lora

    model = load_model(dirs["base"])
    apply_lora(model, rank=4, target_modules=("q_proj", "down_proj"), init_lora_weights=False)
    adapter = save_finetuned(model, tmp_path / "adapter", merged=False)
    merged = save_finetuned(model, tmp_path / "merged")
    from_adapter = task_vector(dirs["base"], adapter)
    from_merged = task_vector(dirs["base"], merged)
    from_bridge = task_vector(None, model)
    assert len(from_adapter) == 4  # q_proj and down_proj in 2 layers
    for vector in (from_merged, from_bridge, task_vector(dirs["base"], model)):
        assert set(vector.deltas) == set(from_adapter.deltas)
        for name, delta in from_adapter.deltas.items():
            assert (vector.deltas[name] - delta).abs().max().item() <= 1e-6, name


# ================================================================ streaming


class _SpyHandle:
    """A safe_open handle that records reads and how many earlier tensors are still alive."""

    def __init__(self, handle, log):
        self._handle, self._log, self._alive = handle, log, []

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name):
        return self._handle.get_slice(name)

    def get_tensor(self, name):
        self._alive = [ref for ref in self._alive if ref() is not None]
        self._log.append((name, len(self._alive)))
        tensor = self._handle.get_tensor(name)
        self._alive.append(weakref.ref(tensor))
        return tensor


def test_directories_are_streamed_tensor_by_tensor(dirs, monkeypatch):
    import safetensors
    import safetensors.torch
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole state dict / model was loaded")

    real_open, log = safetensors.safe_open, []
    monkeypatch.setattr(
        safetensors, "safe_open", lambda *a, **k: _SpyHandle(real_open(*a, **k), log)
    )
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors.torch, "load", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    vector = task_vector(dirs["base"], dirs["finetuned"])
    assert set(vector.deltas) == set(dirs["deltas"])
    n_params = len(dict(tiny_hf_model("llama").named_parameters()))
    assert len(log) == 2 * n_params  # every tensor read once from each model, one by one
    assert max(alive for _, alive in log) == 0  # no earlier tensor of that file still held


# ================================================================ cosine similarity


def _names(layer: int) -> tuple[str, str]:
    return (
        f"model.layers.{layer}.self_attn.q_proj.weight",
        f"model.layers.{layer}.self_attn.v_proj.weight",
    )


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture()
def hand_vectors():
    (q0, v0), (q1, v1), (q2, v2), (q3, _), (q4, v4) = (_names(i) for i in range(5))
    up0 = "model.layers.0.mlp.up_proj.weight"
    # fmt: off
    a = TaskVector(
        {
            q0: _t(1, 2), v0: _t(3, 4), up0: _t(5, 5),  # up0 only in a: left out of the comparison
            q1: _t(1, 0), v1: _t(0, 0),
            q2: _t(1, 1), v2: _t(0, 0),
            q3: _t(0, 0),
            q4: _t(1, 0), v4: _t(1, 0),
            NORM: _t(1, 2),
        }
    )
    b = TaskVector(
        {
            q0: _t(1, 2), v0: _t(3, 4),  # identical -> 1
            q1: _t(-2, 0), v1: _t(0, 0),  # negated -> -1
            q2: _t(1, -1), v2: _t(0, 0),  # orthogonal -> 0
            q3: _t(1, 1),  # zero in a -> NaN
            q4: _t(1, 0), v4: _t(0, 1),  # 1 / (sqrt 2 sqrt 2) = 0.5
            NORM: _t(2, 4),
        }
    )
    # fmt: on
    return {"a": a, "b": b, "c": a.scale(-3)}


def test_cosine_by_layer_hand_values(hand_vectors):
    frame = cosine_similarity(hand_vectors)
    assert list(frame.columns) == ["layer", "a", "b", "cosine", "numel"]
    ab = frame[(frame["a"] == "a") & (frame["b"] == "b")].set_index("layer")
    expected = {NON_LAYER: 1.0, 0: 1.0, 1: -1.0, 2: 0.0, 4: 0.5}
    for layer, value in expected.items():
        assert ab.loc[layer, "cosine"] == pytest.approx(value, abs=1e-7), layer
    assert math.isnan(ab.loc[3, "cosine"])
    assert ab.loc[0, "numel"] == 4  # up_proj (only in a) is not compared
    assert sorted(set(zip(frame["a"], frame["b"], strict=True))) == [
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
    ]  # unordered, no diagonal
    ac = frame[(frame["a"] == "a") & (frame["b"] == "c")].set_index("layer")
    assert ac.loc[0, "cosine"] == pytest.approx(-1.0) and math.isnan(ac.loc[3, "cosine"])
    assert list(frame.layer) == sorted(frame.layer)


def test_cosine_by_module_hand_values(hand_vectors):
    frame = cosine_similarity({"a": hand_vectors["a"], "b": hand_vectors["b"]}, by="module")
    assert list(frame.columns) == ["layer", "module", "a", "b", "cosine", "numel"]
    rows = frame.set_index(["layer", "module"]).cosine
    assert rows[(4, "self_attn.q_proj")] == pytest.approx(1.0)
    assert rows[(4, "self_attn.v_proj")] == pytest.approx(0.0)
    assert rows[(1, "self_attn.q_proj")] == pytest.approx(-1.0)
    assert math.isnan(rows[(1, "self_attn.v_proj")])  # zero in both
    assert rows[(NON_LAYER, "model.norm")] == pytest.approx(1.0)


def test_cosine_bad_input(hand_vectors):
    a = hand_vectors["a"]
    with pytest.raises(ValueError, match="two or more"):
        cosine_similarity({"a": a})
    with pytest.raises(ValueError, match="choose 'layer' or 'module'"):
        cosine_similarity(hand_vectors, by="head")
    with pytest.raises(ValueError, match="share no parameters"):
        cosine_similarity({"a": a, "x": TaskVector({"lm_head.weight": _t(1)})})
    with pytest.raises(ValueError, match="shape"):
        cosine_similarity({"a": a, "x": TaskVector({NORM: _t(1, 2, 3)})})


# ================================================================ scaling


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


def _same(model, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.original_model.state_dict().items())


@torch.no_grad()
def test_scaled_task_vector_interpolates_and_restores(dirs, bridges):
    base, finetuned = bridges["base"], bridges["finetuned"]
    vector = task_vector(dirs["base"], dirs["finetuned"])
    base_logits, ft_logits = base(IDS), finetuned(IDS)
    assert (base_logits - ft_logits).abs().max() > 1e-3
    before = _snapshot(base)

    with scaled_task_vector(base, vector, alpha=1) as model:  # an int alpha is fine
        assert model is base
        assert (base(IDS) - ft_logits).abs().max().item() <= 1e-5  # the bridge sees the HF weights
    assert _same(base, before) and torch.equal(base(IDS), base_logits)

    with scaled_task_vector(base, vector, alpha=0.0):
        assert torch.equal(base(IDS), base_logits)
    with scaled_task_vector(base, vector, alpha=0.5):
        half = base(IDS)
    assert (half - base_logits).abs().max() > 1e-4 and (half - ft_logits).abs().max() > 1e-4
    with scaled_task_vector(base, vector, alpha=-1.0):
        assert (base(IDS) - base_logits).abs().max() > 1e-4

    gen = torch.Generator().manual_seed(5)
    noisy = TaskVector(
        {name: torch.randn(d.shape, generator=gen) for name, d in vector.deltas.items()}
    )
    with scaled_task_vector(base, noisy, alpha=0.37):  # off-grid: subtracting would not be exact
        pass
    assert _same(base, before)
    with pytest.raises(RuntimeError, match="boom"), scaled_task_vector(base, noisy, alpha=0.37):
        raise RuntimeError("boom")
    assert _same(base, before)  # bit-identical after an exception too


@torch.no_grad()
def test_apply_task_vector_is_permanent(dirs):
    model = tiny_hf_model("llama")
    _on_grid(model, dirs["deltas"])
    vector = task_vector(dirs["base"], dirs["finetuned"])
    apply_task_vector(model, vector, alpha=1.0)
    params = dict(model.named_parameters())
    base = tiny_hf_model("llama")
    _on_grid(base, dirs["deltas"])
    for name, delta in dirs["deltas"].items():
        assert torch.equal(params[name], dict(base.named_parameters())[name] + delta)


def test_scaling_bad_input_leaves_model_untouched(bridges):
    model = bridges["base"]
    before = _snapshot(model)
    missing = TaskVector({"model.layers.9.mlp.up_proj.weight": torch.ones(128, 64)})
    with pytest.raises(ValueError, match="not in this"), scaled_task_vector(model, missing):
        pass
    wrong = TaskVector({Q0: torch.ones(64, 64), DOWN1: torch.ones(3, 3)})
    with pytest.raises(ValueError, match="shape"):
        apply_task_vector(model, wrong)
    assert _same(model, before)  # validated before any weight moved


# ================================================================ save / load


def test_save_load_round_trip(dirs, tmp_path):
    vector = task_vector(dirs["base"], dirs["finetuned"])
    out = vector.save(tmp_path / "vector")
    loaded = TaskVector.load(out)
    assert list(loaded.deltas) == list(vector.deltas)
    for name in vector.deltas:
        assert torch.equal(loaded.deltas[name], vector.deltas[name])
    assert loaded.base_norms == vector.base_norms
    assert loaded.source == json.loads(json.dumps(vector.source))
    record = json.loads((out / "task_vector.json").read_text())
    assert "versions" in record
    assert torch.equal(loaded.scale(2).deltas[Q0], 2 * vector.deltas[Q0])
    with pytest.raises(ValueError, match="no saved task vector"):
        TaskVector.load(tmp_path)


# ================================================================ bad input


def test_bad_inputs_say_what_to_do(dirs, tmp_path):
    base = dirs["base"]
    with pytest.raises(ValueError, match="is not a directory"):
        task_vector(base, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is not a directory"):
        task_vector("org/some-hub-model", dirs["finetuned"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        task_vector(base, tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"only \.bin"):
        task_vector(base, tmp_path / "bin")
    with pytest.raises(ValueError, match="base=None needs a LoRA adapter"):
        task_vector(None, dirs["finetuned"])


def test_mismatched_models(dirs, tmp_path):
    from safetensors import safe_open

    with safe_open(str(dirs["finetuned"] / "model.safetensors"), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    state[DOWN1] = state[DOWN1][:, :100].contiguous()
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{DOWN1}.*shape \\[64, 128\\].*\\[64, 100\\]"):
        task_vector(dirs["base"], tmp_path / "bad")

    one_layer = save_tiny_model(tmp_path / "one", "llama", n_layers=1)
    with pytest.raises(ValueError, match=r"in the base only.*model\.layers\.1"):
        task_vector(dirs["base"], one_layer)
    lenient = task_vector(dirs["base"], one_layer, strict=False)
    assert all(TaskVector.layer(name) != 1 for name in lenient.deltas)


def test_unsupported_adapters(dirs, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_hf_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="base is a LoRA adapter"):
        task_vector(tmp_path / "adapter", dirs["finetuned"])
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA adapters are not B @ A; merge"):
        task_vector(None, tmp_path / "adapter")


# ================================================================ docs


@pytest.mark.parametrize("name", ["", ".names", ".sources", ".vector", ".compare", ".apply"])
def test_doctests(name):
    import importlib

    module = importlib.import_module(tv_module.__name__ + name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.embedded
def test_embedded_directory_and_loaded_model_line_up(embedded):
    """The real (tied-embedding) model: streamed directory and loaded bridge name the same weights."""
    from piggyback_interp.core.embedded import embedded_model_dir

    assert len(task_vector(embedded_model_dir(), embedded)) == 0
    vector = TaskVector({"model.embed_tokens.weight": torch.full((49152, 576), 1e-3)})
    before = embedded(IDS)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(scaled_task_vector(embedded, vector, alpha=1.0))
        assert (embedded(IDS) - before).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.equal(embedded(IDS), before)


def test_docs_example_runs(capsys):
    """The runnable block of docs/task_vectors.md (SFT vs TReFT vs interleave on tiny models)."""
    text = (Path(__file__).parents[2] / "docs" / "task_vectors.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "docs/task_vectors.md", "exec"), namespace)
    frame = namespace["cosine_similarity"](namespace["vectors"])
    assert len(frame) == 3 * 2  # 3 unordered pairs x 2 layers (adapters touch no other weights)
    assert frame["cosine"].notna().all() and (frame["cosine"].abs() <= 1).all()
    assert "relative" in capsys.readouterr().out
