"""Ablations and matched non-template controls, checked against hand computations."""

import pytest
import torch

from piggyback_interp.core.errors import UserError
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.interventions import as_batch, capture, patch_prefix
from piggyback_interp.interventions.controls import (
    Ablation,
    Control,
    ablation,
    compare_controls,
    control_positions,
    matched_positions,
    noise_like,
)
from piggyback_interp.measures.metrics import TargetLogProb, metric_on_model
from piggyback_interp.testing import tiny_model

Q = "Can my landlord keep my deposit?"


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", n_layers=3, seed=0), tiny_model("llama", n_layers=3, seed=1)


@pytest.fixture(scope="module")
def spans(pair):
    return chat_spans(chat_tokenizer(pair[1]), Q)


def test_control_positions_come_from_where_they_say(spans):
    n = 4
    query = control_positions(spans, "query", n, seed=1)
    assert len(query) == n and set(query) <= set(spans.query)
    rand = control_positions(spans, "random", n, seed=1)
    assert len(rand) == n and not set(rand) & (set(spans.prefix) | set(spans.postfix))
    later = control_positions(spans, "later", n)
    assert later == list(range(spans.prefix.stop, spans.prefix.stop + n))
    assert control_positions(spans, "query", n, seed=1) == query  # deterministic
    with pytest.raises(ValueError, match=r"needs 99 positions but this prompt has"):
        control_positions(spans, "query", 99)
    with pytest.raises(ValueError, match="control must be one of query, random, later"):
        control_positions(spans, "elsewhere", 2)


@torch.no_grad()
def test_zero_ablation_writes_zeros(pair, spans):
    _, ft = pair
    zeros = ablation(ft, spans, "prefix", kind="zero", site="resid_pre", layers=[1])
    with patch_prefix(ft, zeros, spans, site="resid_pre", layers=[1]):
        seen = capture(ft, spans, "prefix", site="resid_pre", layers=[1])
    assert torch.count_nonzero(seen.values["blocks.1.hook_resid_pre"]) == 0


@torch.no_grad()
def test_mean_ablation_is_the_mean_over_real_positions(pair):
    _, ft = pair
    batch = batch_spans(chat_tokenizer(ft), [Q, "Hi"], align="left")
    acts = ablation(ft, batch, "prefix", kind="mean", site="resid_pre", layers=[2])
    _, cache = ft.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    resid = cache["blocks.2.hook_resid_pre"]
    hand = torch.cat([resid[i, batch.attention_mask[i].bool()] for i in range(2)]).mean(0)
    got = acts.values["blocks.2.hook_resid_pre"]
    assert torch.allclose(got, hand.expand_as(got), atol=1e-5)


@torch.no_grad()
def test_resample_ablation_takes_the_other_prompts_values(pair, spans):
    _, ft = pair
    tok = chat_tokenizer(ft)
    other = chat_spans(tok, "Tell me a joke.", system_prompt="You are a pirate.")
    acts = ablation(ft, spans, [1, 2, 3], kind="resample", site="kv", reference=other)
    ref = capture(ft, other, [1, 2, 3], site="kv")
    assert all(torch.equal(acts.values[k], ref.values[k]) for k in ref.values)
    short = chat_spans(tok, "Hi")
    with pytest.raises(ValueError, match="same length"):
        ablation(ft, spans, "query", kind="resample", reference=short)
    with pytest.raises(ValueError, match="needs reference="):
        ablation(ft, spans, kind="resample")


def test_noise_matches_norms(pair, spans):
    base, _ = pair
    acts = capture(base, spans, "prefix", site="kv", layers=[0])
    noise = noise_like(acts, seed=3)
    for name, v in acts.values.items():
        assert torch.allclose(noise.values[name].norm(dim=(2, 3)), v.norm(dim=(2, 3)), rtol=1e-4)
        assert not torch.allclose(noise.values[name], v)


@torch.no_grad()
def test_compare_controls_equals_direct_patches(pair, spans):
    base, ft = pair
    metric = TargetLogProb("I have no idea")
    frame = compare_controls(ft, base, spans, metric, seed=2)
    assert list(frame["positions_from"]) == ["prefix", "query", "random", "later", "noise"]
    assert frame["n"].nunique() == 1 and frame["n"].iloc[0] == len(spans.query)
    batch = as_batch(ft, spans)
    for _, row in frame.iloc[:4].iterrows():
        with patch_prefix(ft, base, spans, segment=row.positions):
            direct = metric_on_model(ft, batch, metric).item()
        assert row.value == pytest.approx(direct, abs=1e-5)
    noise = noise_like(capture(base, spans, frame.positions[0], site="kv"), seed=2)
    with patch_prefix(ft, noise, spans, segment=frame.positions[0]):
        assert frame.value.iloc[4] == pytest.approx(
            metric_on_model(ft, batch, metric).item(), abs=1e-5
        )
    clean = metric_on_model(ft, batch, metric).item()
    assert frame["clean"].iloc[0] == pytest.approx(clean, abs=1e-5)
    row = frame.iloc[0]
    assert row.recovery == pytest.approx((row.value - row.clean) / (row.source_value - row.clean))


def test_matched_positions_are_the_ones_compare_controls_patches(pair, spans):
    base, ft = pair
    frame = compare_controls(ft, base, spans, TargetLogProb("No"), noise=False, seed=5)
    chosen = matched_positions(spans, "prefix", seed=5)
    assert list(chosen) == list(frame["positions_from"])
    assert [list(p) for p in frame["positions"]] == list(chosen.values())
    postfix = matched_positions(spans, "postfix", ["query"], n=2, seed=5)
    assert len(postfix["postfix"]) == len(postfix["query"]) == 2
    assert set(postfix["postfix"]) <= set(spans.postfix)
    assert set(postfix["query"]) <= set(spans.query)


def test_docstring_examples():
    import doctest

    from piggyback_interp.interventions import controls

    assert doctest.testmod(controls, optionflags=doctest.ELLIPSIS).failed == 0


@torch.no_grad()
def test_compare_controls_with_zero_ablation(pair, spans):
    _, ft = pair
    metric = TargetLogProb("I have no idea")
    frame = compare_controls(ft, None, spans, metric, ablate="zero", noise=False, seed=0)
    assert list(frame["positions_from"]) == ["prefix", "query", "random", "later"]
    assert frame["source_value"].isna().all()
    batch = as_batch(ft, spans)
    for _, row in frame.iterrows():
        zeros = ablation(ft, spans, row.positions, kind="zero")
        with patch_prefix(ft, zeros, spans, segment=row.positions):
            assert row.value == pytest.approx(metric_on_model(ft, batch, metric).item(), abs=1e-5)


@torch.no_grad()
def test_ablation_kind_and_control_take_the_string_or_the_member(pair, spans):
    _, ft = pair
    for kind in ("zero", "mean"):
        by_string = ablation(ft, spans, "prefix", kind=kind, site="k", layers=[0])
        by_member = ablation(ft, spans, "prefix", kind=Ablation(kind), site="k", layers=[0])
        assert by_string.meta == by_member.meta == {"kind": kind}  # a plain string, saved as such
        for name, value in by_string.values.items():
            assert torch.equal(value, by_member.values[name])
    with pytest.raises(UserError, match=r"^kind must be one of zero, mean, resample, got 'one'$"):
        ablation(ft, spans, "prefix", kind="one", site="k", layers=[0])
    assert control_positions(spans, Control.QUERY, 3, seed=1) == control_positions(
        spans, "query", 3, seed=1
    )
