"""piggyback_interp.core.hf: the Hugging Face internals the rest of the toolkit reaches through it."""

import doctest

import torch

from piggyback_interp.core import hf
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.testing import tiny_hf_model, tiny_model


def test_docstring_example_runs():
    assert doctest.testmod(hf, optionflags=doctest.ELLIPSIS).failed == 0


def test_the_hf_model_of_a_bridge_shares_its_weights():
    model = tiny_model("llama")
    inner = hf.hf_model(model)
    assert hf.unwrap(model) == (inner, "")
    assert hf.hf_config(model) is inner.config
    assert hf.input_embedding(model) is inner.get_input_embeddings().weight
    plain = tiny_hf_model("llama")
    assert hf.unwrap(plain) == (plain, "") and hf.hf_config(plain) is plain.config
    assert hf.input_embedding(plain) is None  # not a bridge
    assert hf.self_attention(plain, 1) is plain.model.layers[1].self_attn


def test_wrapper_segments_leave_the_hf_parameter_name():
    name = "model.layers.0.self_attn.q_proj._original_component.base_layer.weight"
    assert hf.plain_parameter_name(name) == "model.layers.0.self_attn.q_proj.weight"


def test_forward_with_cache_matches_the_bridge_and_continues_from_its_cache():
    model = tiny_model("llama")
    batch = batch_spans(model.tokenizer, ["Tell me a joke.", "Hi"])
    with torch.no_grad():
        full = model(batch.input_ids, attention_mask=batch.attention_mask)
        last, cache = hf.forward_with_cache(
            model,
            batch.input_ids[:, :-1],
            batch.attention_mask[:, :-1],
            batch.position_ids[:, :-1],
            None,
        )
        torch.testing.assert_close(last, full[:, -2])
        step, _ = hf.forward_with_cache(
            model, batch.input_ids[:, -1:], batch.attention_mask, batch.position_ids[:, -1:], cache
        )
    torch.testing.assert_close(step, full[:, -1], atol=1e-5, rtol=1e-5)
    keys, values = hf.cache_layers(cache)[0]
    assert keys.shape[2] == values.shape[2] == batch.input_ids.shape[1]  # cache extended
    assert hf.cache_layers(hf.repeat_cache(cache, 3))[0][0].shape[0] == 3 * len(batch)
