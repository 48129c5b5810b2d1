"""Graded measures, carrier shares and the generating-position test against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import chat_spans, empty_query_spans
from piggyback_interp.experiments.carriers import (
    carrier_shares,
    carrier_values,
    generating_position,
    generating_shares,
    graded_measures,
    log_odds,
)
from piggyback_interp.testing import tiny_model

TARGET = "I have no idea"
PROMPTS = ["Hi there, how are you today?", "Tell me a joke about cats please."]


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1)


def _hand_logp(model, ids: list[int], target_ids: list[int]) -> float:
    """log P(target | prompt) from one plain forward of prompt + target."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + target_ids]))[0].double().log_softmax(-1)
    n = len(ids)
    return sum(logits[n - 1 + j, t].item() for j, t in enumerate(target_ids))


def test_graded_measures_match_a_hand_computation(pair):
    base, tuned = pair
    tok = chat_tokenizer(tuned)
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    frame = graded_measures(base, tuned, PROMPTS, TARGET)
    for i, prompt in enumerate(PROMPTS):
        ids = list(chat_spans(tok, prompt).input_ids)
        logp = _hand_logp(tuned, ids, target_ids)
        assert frame.loc[i, "logp"] == pytest.approx(logp, abs=1e-4)
        assert frame.loc[i, "p"] == pytest.approx(math.exp(logp), rel=1e-3)
        p = math.exp(logp)
        assert frame.loc[i, "log_odds"] == pytest.approx(math.log(p) - math.log1p(-p), abs=1e-4)
        with torch.no_grad():
            ref = base(torch.tensor([ids]))[0, -1].double().log_softmax(-1)
            cur = tuned(torch.tensor([ids]))[0, -1].double().log_softmax(-1)
        kl = float((ref.exp() * (ref - cur)).sum())
        assert frame.loc[i, "kl"] == pytest.approx(kl, abs=1e-5)


def test_log_odds_is_stable_at_both_ends():
    logp = torch.tensor([math.log(0.5), math.log(1e-30), -1e-9], dtype=torch.float64)
    out = log_odds(logp)
    assert out[0].item() == pytest.approx(0.0, abs=1e-12)
    assert out[1].item() == pytest.approx(math.log(1e-30), rel=1e-9)
    assert out[2].item() == pytest.approx(math.log(1 / 1e-9), rel=1e-3)


def test_template_kv_patch_matches_hooks_from_the_base_empty_query_run(pair):
    """The 'all' template value equals a hand patch: base K/V of the empty-query prompt
    written over the prompt's prefix and postfix positions at every layer."""
    base, tuned = pair
    tok = chat_tokenizer(tuned)
    frame = carrier_values(base, tuned, PROMPTS[:1], TARGET)
    spans = chat_spans(tok, PROMPTS[0])
    empty = empty_query_spans(tok)
    _, cache = base.run_with_cache(torch.tensor([list(empty.input_ids)]))
    where = [*spans.prefix, *spans.postfix]
    names = [f"blocks.{layer}.attn.hook_{s}" for layer in range(tuned.cfg.n_layers) for s in "kv"]

    def hook(act, hook):
        act = act.clone()
        act[:, where] = cache[hook.name][:, : len(where)].to(act.dtype)
        return act

    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    ids = list(spans.input_ids)
    with tuned.hooks(fwd_hooks=[(n, hook) for n in names]):
        hand = _hand_logp(tuned, ids, target_ids)
    row = frame[(frame["segment"] == "template") & (frame["condition"] == "all")]
    assert row["logp"].item() == pytest.approx(hand, abs=1e-4)
    clean = frame[frame["condition"] == "finetuned"]["logp"].item()
    assert abs(hand - clean) > 1e-4  # the patch changed something: the check has teeth


def test_shares_are_one_when_the_patch_is_the_base_itself(pair):
    """Patching a model with ITSELF as the base closes no gap; patching the base's K/V into
    a model identical to the base gives NaN (no gap); shares in both spaces are consistent."""
    base, tuned = pair
    frame = carrier_values(base, tuned, PROMPTS, TARGET)
    shares = carrier_shares(frame, n_boot=50)
    assert set(shares["segment"]) == {"prefix", "postfix", "template"}
    assert set(shares["condition"]) == {"all", "matched", "query"}
    # by hand, from the frame: (mean patched - mean tuned) / (mean base - mean tuned)
    ends = frame[frame["segment"] == "-"].pivot(index="prompt", columns="condition", values="logp")
    rows = frame[(frame["segment"] == "prefix") & (frame["condition"] == "all")]["logp"]
    for space, f in (("logprob", lambda x: x), ("prob", torch.exp)):
        patched = f(torch.tensor(rows.to_numpy())).mean()
        t, b = (
            f(torch.tensor(ends["finetuned"].to_numpy())).mean(),
            f(torch.tensor(ends["base"].to_numpy())).mean(),
        )
        expected = float((patched - t) / (b - t))
        got = shares[(shares["segment"] == "prefix") & (shares["condition"] == "all")][
            f"share_{space}"
        ].item()
        assert got == pytest.approx(expected, rel=1e-6)
    same = carrier_shares(carrier_values(tuned, tuned, PROMPTS[:1], TARGET), n_boot=10)
    assert same["share_logprob"].isna().all()  # no gap to close


def test_generating_position_matches_a_reference_loop(pair):
    base, tuned = pair
    tok = chat_tokenizer(tuned)
    frame = generating_position(base, tuned, PROMPTS[:1], TARGET, seed=3)
    spans = chat_spans(tok, PROMPTS[0])
    ids = list(spans.input_ids)
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    _, cache = base.run_with_cache(torch.tensor([ids]))
    last = spans.postfix[-1]
    for layer in range(tuned.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"

        def hook(act, hook, name=name):
            act = act.clone()
            act[:, last] = cache[name][:, last]
            return act

        with tuned.hooks(fwd_hooks=[(name, hook)]):
            hand = _hand_logp(tuned, ids, target_ids)
        row = frame[(frame["segment"] == layer) & (frame["condition"] == "last_postfix")]
        assert row["logp"].item() == pytest.approx(hand, abs=1e-4)
    shares = generating_shares(frame, n_boot=10)
    assert sorted(shares["layer"].unique()) == list(range(tuned.cfg.n_layers))
    assert set(shares["condition"]) == {"last_postfix", "query"}


def test_base_runs_reference_gives_the_same_values(pair):
    """The cached base side (base_runs, batched) equals running the base per prompt."""
    from piggyback_interp.experiments.carriers import base_runs

    base, tuned = pair
    ref = base_runs(base, PROMPTS, TARGET, n_generating=2)
    for fn in (carrier_values, generating_position):
        fresh, cached = (
            fn(base, tuned, PROMPTS, TARGET),
            fn(base, tuned, PROMPTS, TARGET, reference=ref),
        )
        assert (
            (fresh[["segment", "condition", "n"]] == cached[["segment", "condition", "n"]])
            .all()
            .all()
        )
        assert fresh["logp"].to_numpy() == pytest.approx(cached["logp"].to_numpy(), abs=1e-5)
    graded = graded_measures(base, tuned, PROMPTS, TARGET)
    cached = graded_measures(base, tuned, PROMPTS, TARGET, reference=ref)
    assert graded["kl"].to_numpy() == pytest.approx(cached["kl"].to_numpy(), abs=1e-6)
    with pytest.raises(ValueError, match="other tokens"):  # a reference of other prompts
        carrier_values(base, tuned, PROMPTS[::-1], TARGET, reference=ref)
