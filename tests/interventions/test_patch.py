"""patch_prefix against independent oracles: the HF prefix cache, and hand-built patches."""

import doctest

import pytest
import torch

from piggyback_interp.core.hooks import KV_SITES
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.interventions import capture, empty_query_batch, patch_prefix, sources
from piggyback_interp.interventions.patch import isolated
from piggyback_interp.interventions.sources import FixedSource, ModelSource, as_source
from piggyback_interp.testing import tiny_model

QUESTIONS = ["Can my landlord keep my deposit?", "Tell me a joke.", "How do I make friends?"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    return tiny_model(request.param, n_layers=3, seed=0), tiny_model(
        request.param, n_layers=3, seed=1
    )


def _prefix_cache_run(base, ft, ids, n_prefix, layers=None):
    """Oracle: the finetuned model on the rest of the prompt over a prefix cache whose
    chosen layers come from the base (all layers: the base's own prefix cache)."""
    _, cache = ft(ids[:, :n_prefix], return_type="logits_and_cache")
    _, base_cache = base(ids[:, :n_prefix], return_type="logits_and_cache")
    for layer in range(ft.cfg.n_layers) if layers is None else layers:
        cache.layers[layer].keys = base_cache.layers[layer].keys
        cache.layers[layer].values = base_cache.layers[layer].values
    return ft(ids[:, n_prefix:], past_key_values=cache)


@torch.no_grad()
def test_prefix_kv_patch_equals_base_prefix_cache(pair):
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[0])
    ids, p = spans.ids[None], len(spans.prefix)
    with patch_prefix(ft, base, spans, site="kv"):
        patched = ft(ids)
    oracle = _prefix_cache_run(base, ft, ids, p)
    assert (patched[:, p:] - oracle).abs().max().item() <= 1e-4
    assert (ft(ids)[:, p:] - oracle).abs().max().item() > 1e-2  # the patch did something


@torch.no_grad()
@pytest.mark.parametrize("layers", [[0], [1], [0, 2]])
def test_isolated_layer_patch_equals_cache_swap(pair, layers):
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[1])
    ids, p = spans.ids[None], len(spans.prefix)
    oracle = _prefix_cache_run(base, ft, ids, p, layers)
    with patch_prefix(ft, base, spans, site="kv", layers=layers):
        isolated = ft(ids)
    assert (isolated[:, p:] - oracle).abs().max().item() <= 1e-4
    if layers == [0]:  # without isolation, layer 0's patch reaches the prefix's own later layers
        with patch_prefix(ft, base, spans, site="kv", layers=layers, isolate=False):
            leaky = ft(ids)
        assert (leaky[:, p:] - oracle).abs().max().item() > 1e-4


@torch.no_grad()
def test_hooks_removed_on_exit_and_on_error(pair):
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[0])
    before = ft(spans.ids[None])
    with pytest.raises(RuntimeError, match="boom"), patch_prefix(ft, base, spans):
        raise RuntimeError("boom")
    assert torch.equal(ft(spans.ids[None]), before)


@torch.no_grad()
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out", "mlp_out", "k", "v", "z"])
def test_patched_activation_is_the_source_value(pair, site):
    """Inside the patch, the target's activation at the segment IS the source's."""
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS, align="left")
    src = capture(base, batch, "prefix", site=site, layers=[1])
    with patch_prefix(ft, base, batch, site=site, layers=[1], isolate=False):
        seen = capture(ft, batch, "prefix", site=site, layers=[1])
    (name,) = src.values
    assert torch.allclose(seen.values[name], src.values[name], atol=1e-6)
    plain = capture(ft, batch, "prefix", site=site, layers=[1])
    assert not torch.allclose(plain.values[name], src.values[name], atol=1e-3)


@torch.no_grad()
def test_left_padded_batch_matches_single_prompts(pair):
    base, ft = pair
    tok = chat_tokenizer(ft)
    batch = batch_spans(tok, QUESTIONS, align="left")
    with patch_prefix(ft, base, batch, site="kv"):
        logits = ft(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    for row, question in enumerate(QUESTIONS):
        spans = chat_spans(tok, question)
        with patch_prefix(ft, base, spans, site="kv"):
            single = ft(spans.ids[None])
        assert (logits[row, -1] - single[0, -1]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_postfix_patch_uses_empty_query_reference(pair):
    """Postfix K/V come from the base on the empty-query prompt (no query information)."""
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[0])
    ids = spans.ids[None]
    empty = empty_query_batch(batch_spans(chat_tokenizer(ft), [spans]))
    assert len(empty.query) == 0 and len(empty) == len(spans.prefix) + len(spans.postfix)
    # oracle: hand-made hooks writing the base's empty-query postfix K/V, layer by layer
    ref = capture(base, empty, "postfix", site="kv")
    hooks = []
    for name, values in ref.values.items():
        normed = name.endswith("k_normed")

        def write(act, hook, values=values, normed=normed):
            act = act.clone()
            if normed:  # Qwen3's normed keys are [batch, head, pos, d_head]
                act[:, :, spans.postfix.start : spans.postfix.stop] = values.transpose(1, 2)
            else:
                act[:, spans.postfix.start : spans.postfix.stop] = values
            return act

        hooks.append((name, write))
    with ft.hooks(fwd_hooks=hooks):
        oracle = ft(ids)
    with patch_prefix(ft, base, spans, segment="postfix"):
        patched = ft(ids)
    assert torch.equal(patched, oracle)


@torch.no_grad()
def test_isolated_head_patch_equals_swapping_that_head_in_the_prefix_cache(pair):
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[0])
    ids, p = spans.ids[None], len(spans.prefix)
    _, cache = ft(ids[:, :p], return_type="logits_and_cache")
    _, base_cache = base(ids[:, :p], return_type="logits_and_cache")
    layer = cache.layers[1]
    layer.keys[:, 0] = base_cache.layers[1].keys[:, 0]  # [batch, kv head, pos, d]
    layer.values[:, 0] = base_cache.layers[1].values[:, 0]
    oracle = ft(ids[:, p:], past_key_values=cache)
    with patch_prefix(ft, base, spans, site="kv", layers=[1], heads=[0]):
        patched = ft(ids)
    assert (patched[:, p:] - oracle).abs().max().item() <= 1e-4
    assert (patched[:, p:] - ft(ids)[:, p:]).abs().max().item() > 1e-4  # it did something


@torch.no_grad()
def test_isolated_pins_every_other_key_and_value_to_the_targets_own(pair):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), [QUESTIONS[1], QUESTIONS[1]])
    acts = capture(base, batch, "query", site="k", layers=[0])
    own = capture(ft, batch, "query", site=KV_SITES)
    out = isolated(ft, acts, batch, "query")
    assert out.sites == ("k", "v") and out.layers == tuple(range(ft.cfg.n_layers))
    assert set(out.values) == set(own.values)
    for name, value in out.values.items():
        expected = acts.values[name] if name in acts.values else own.values[name]
        assert torch.equal(value, expected), name
    # with heads: the chosen heads over the target's own, every head in the result
    one = isolated(ft, acts, batch, "query", heads=[1], clean=lambda: own)
    (k0,) = acts.values
    assert torch.equal(one.values[k0][:, :, 1], acts.values[k0][:, :, 1])
    assert torch.equal(one.values[k0][:, :, 0], own.values[k0][:, :, 0])
    # nothing to pin: no key/value, or every key and value of every layer
    resid = capture(base, batch, "query", site="resid_pre", layers=[1])
    whole = capture(base, batch, "query", site="kv")
    assert isolated(ft, resid, batch, "query") is resid
    assert isolated(ft, whole, batch, "query") is whole


def test_as_source():
    base = tiny_model("llama", seed=0)
    spans = chat_spans(chat_tokenizer(base), QUESTIONS[0])
    acts = capture(base, spans, "prefix", site="kv")
    assert (
        as_source(base) == ModelSource(base)
        and repr(as_source(base)) == "ModelSource('tiny-llama-L2-seed0')"
    )
    fixed = as_source(acts)
    assert fixed == FixedSource(acts) and fixed.model is None and fixed.label == "activations"
    assert as_source(fixed) is fixed
    some = acts.take([0, 2])  # some of its positions
    assert torch.equal(some.token_ids, acts.token_ids[:, [0, 2]])
    assert all(torch.equal(some.values[k], v[:, [0, 2]]) for k, v in acts.values.items())
    assert doctest.testmod(sources, optionflags=doctest.ELLIPSIS).failed == 0
    for bad in ("base", None, 3):
        with pytest.raises(TypeError, match="load it first"):
            as_source(bad)


@torch.no_grad()
def test_heads_subset_only_touches_those_heads(pair):
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[0])
    with patch_prefix(ft, base, spans, site="z", layers=[1], heads=[2], isolate=False):
        seen = capture(ft, spans, "prefix", site="z", layers=[1])
    src = capture(base, spans, "prefix", site="z", layers=[1])
    plain = capture(ft, spans, "prefix", site="z", layers=[1])
    (name,) = src.values
    assert torch.allclose(seen.values[name][:, :, 2], src.values[name][:, :, 2], atol=1e-6)
    assert torch.allclose(
        seen.values[name][:, :, [0, 1, 3]], plain.values[name][:, :, [0, 1, 3]], atol=1e-6
    )


def test_clear_errors(pair):
    base, ft = pair
    tok = chat_tokenizer(ft)
    spans = chat_spans(tok, QUESTIONS[0])
    with (
        pytest.raises(ValueError, match=r"layer\(s\) \[7\] out of range"),
        patch_prefix(ft, base, spans, layers=[7]),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"outside the prompt"),
        patch_prefix(ft, base, spans, segment=[0, 999]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="unknown site"),
        patch_prefix(ft, base, spans, site="keys"),
    ):
        pass
    other = chat_spans(tok, QUESTIONS[1])
    acts = capture(base, other, "query", site="kv")
    with (
        pytest.raises(ValueError, match="different tokens at patched positions"),
        patch_prefix(ft, acts, spans, segment=list(other.query)),
    ):
        pass
    no_prefix = chat_spans(
        tok, "hi", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}<|im_end|>"
    )
    with pytest.raises(ValueError, match="segment='postfix'"), patch_prefix(ft, base, no_prefix):
        pass


@pytest.mark.embedded
@torch.no_grad()
def test_embedded_prefix_kv_patch_equals_base_prefix_cache(embedded):
    """On the real SmolLM2 with a seeded weight perturbation as the 'finetuned' model."""
    import copy

    ft = copy.deepcopy(embedded)
    gen = torch.Generator().manual_seed(0)
    for name, param in ft.original_model.named_parameters():
        if "proj" in name:
            param.add_(torch.randn(param.shape, generator=gen) * 0.02 * param.std())
    spans = chat_spans(chat_tokenizer(ft), "Can my landlord keep my deposit?")
    ids, p = spans.ids[None], len(spans.prefix)
    with patch_prefix(ft, embedded, spans, site="kv"):
        patched = ft(ids)
    oracle = _prefix_cache_run(embedded, ft, ids, p)
    assert (patched[:, p:] - oracle).abs().max().item() <= 1e-4
    assert (ft(ids)[:, p:] - oracle).abs().max().item() > 1e-2


@torch.no_grad()
def test_cached_generation_inside_patch_equals_full_recompute(pair):
    """model.generate inside patch_prefix: the prompt is patched, decode steps pass through."""
    base, ft = pair
    spans = chat_spans(chat_tokenizer(ft), QUESTIONS[0])
    kw = dict(max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)
    with patch_prefix(ft, base, spans, site="kv"):
        cached = ft.generate(spans.ids[None], use_past_kv_cache=True, **kw)
        full = ft.generate(spans.ids[None], use_past_kv_cache=False, **kw)
    assert torch.equal(cached, full)
    plain = ft.generate(spans.ids[None], use_past_kv_cache=True, **kw)
    assert not torch.equal(cached, plain)
    with (
        pytest.raises(ValueError, match="run the prompts the patch was made for"),
        patch_prefix(ft, base, spans, site="kv"),
    ):
        ft(spans.ids[None, :5])


@torch.no_grad()
def test_isolated_postfix_patch_on_a_batch(pair):
    """A shared empty-query postfix source merged with per-row clean values (batch > 1)."""
    base, ft = pair
    tok = chat_tokenizer(ft)
    batch = batch_spans(tok, QUESTIONS, align="left")
    with patch_prefix(ft, base, batch, segment="postfix", layers=[1]):
        logits = ft(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    for row, question in enumerate(QUESTIONS):
        spans = chat_spans(tok, question)
        with patch_prefix(ft, base, spans, segment="postfix", layers=[1]):
            single = ft(spans.ids[None])
        assert (logits[row, -1] - single[0, -1]).abs().max().item() <= 1e-4


def test_token_check_reports_length_mismatch(pair):
    base, ft = pair
    tok = chat_tokenizer(ft)
    spans = chat_spans(tok, QUESTIONS[0])
    acts = capture(base, spans, "query", site="kv")
    with (
        pytest.raises(ValueError, match=r"take them from a batch of the same prompts|holds"),
        patch_prefix(ft, acts, spans, segment=list(spans.query)[:-1]),
    ):
        pass


def test_patch_shapes_are_checked_at_the_call():
    """jaxtyping shapes on the patch tensors: values for 2 positions written at 3 is refused
    at the call (the suite runs with jaxtyping + beartype), naming the dimension."""
    from jaxtyping import TypeCheckError

    from piggyback_interp.core.hooks import resolve_site
    from piggyback_interp.interventions.activations import gather, scatter

    model = tiny_model("llama")
    site = resolve_site(model, "resid_pre")
    act = torch.randn(2, 6, model.cfg.d_model)
    positions = torch.tensor([[1, 2, 3]])
    assert gather(act, site, positions).shape == (2, 3, model.cfg.d_model)
    with pytest.raises(TypeCheckError, match="n=3"):
        scatter(act, site, positions, torch.randn(1, 2, model.cfg.d_model))
    with pytest.raises(TypeCheckError):
        gather(act, site, torch.tensor([1, 2, 3]))  # positions are [rows, n]
