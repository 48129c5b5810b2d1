"""Tests for piggyback_interp.interventions.perturb: segment token perturbations and trial aggregation.

Nearest-neighbour replacements are checked against the brute-force cosine top-k of
tests/interventions/conftest.py; the perturbed prompts against the spans they came from.
"""

from __future__ import annotations

import doctest
import math
import random

import pytest
import torch

from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatSpans, chat_spans
from piggyback_interp.interventions import perturb as perturb_module
from piggyback_interp.interventions.neighbours import special_token_ids
from piggyback_interp.interventions.perturb import (
    Perturbation,
    aggregate_trials,
    perturb_segment,
    perturb_segments,
    perturbable_positions,
    trials_frame,
)
from piggyback_interp.testing import tiny_model, tiny_tokenizer

Q = "What is the capital of France?"

QWEN3_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
# the user's text comes first: no prefix at all
NO_PREFIX_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok(model):
    return chat_tokenizer(model)


@pytest.fixture(scope="module")
def spans(tok):
    return chat_spans(tok, Q)


# ---------------------------------------------------------------- perturb_segment


def changed_positions(perturbation, spans):
    return [
        i
        for i, (a, b) in enumerate(zip(perturbation.input_ids, spans.input_ids, strict=True))
        if a != b
    ]


def test_nearest_perturbation_replaces_only_recorded_prefix_positions(
    model, tok, spans, brute_force_top_k
):
    special = special_token_ids(tok)
    emb = model.W_E.detach()
    out = perturb_segment(model, spans, "prefix", n_tokens=10, top_k=5, trials=10, seed=0)
    assert [p.trial for p in out] == list(range(10))
    for p in out:
        assert p.segment == "prefix" and p.mode == "nearest" and p.n_tokens == 10
        assert list(p.positions) == sorted(set(p.positions))
        assert changed_positions(p, spans) == list(p.positions)
        assert all(pos in spans.prefix for pos in p.positions)
        assert p.original == tuple(spans.input_ids[pos] for pos in p.positions)
        assert p.replacement == tuple(p.input_ids[pos] for pos in p.positions)
        assert torch.equal(p.ids, torch.tensor(p.input_ids))
        assert len(p.input_ids) == len(spans)
        for old, new in zip(p.original, p.replacement, strict=True):
            assert new in brute_force_top_k(emb, old, 5, special)
            assert new not in special and old not in special


def test_perturbation_is_deterministic_per_seed_and_varies(model, spans):
    first = perturb_segment(model, spans, "prefix", trials=5, seed=3)
    assert first == perturb_segment(model, spans, "prefix", trials=5, seed=3)
    assert first != perturb_segment(model, spans, "prefix", trials=5, seed=4)
    assert len({p.input_ids for p in first}) == 5  # trials differ from each other
    assert len({p.positions for p in first}) > 1
    more = perturb_segment(model, spans, "prefix", trials=8, seed=3)
    assert more[:5] == first  # asking for more trials keeps the first ones


def test_perturbation_ignores_and_keeps_the_global_rngs(model, spans):
    # (beartype's runtime checks in this suite draw from Python's global `random`
    # themselves, so we check that results do not depend on the global seeds)
    random.seed(1)
    torch.manual_seed(1)
    torch_state = torch.random.get_rng_state()
    first = perturb_segment(model, spans, "query", trials=3)
    first += perturb_segment(model, spans, "query", trials=3, mode="random")
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    random.seed(2)
    torch.manual_seed(2)
    second = perturb_segment(model, spans, "query", trials=3)
    second += perturb_segment(model, spans, "query", trials=3, mode="random")
    assert first == second


def test_short_segment_uses_all_its_perturbable_positions(model, tok, spans):
    pool = perturbable_positions(spans, "postfix", tok)
    assert len(pool) == 6 < 10
    for p in perturb_segment(model, spans, "postfix", n_tokens=10, trials=4):
        assert list(p.positions) == pool and p.n_tokens == 6
        assert changed_positions(p, spans) == pool


def test_exclude_special_keeps_special_positions(model, tok, spans):
    special = special_token_ids(tok)
    special_positions = [i for i in spans.prefix if spans.input_ids[i] in special]
    assert len(special_positions) == 3  # <|im_start|>, <|im_end|>, <|im_start|>
    for p in perturb_segment(model, spans, "prefix", n_tokens=15, trials=3):
        assert p.n_tokens == len(spans.prefix) - 3
        assert not set(p.positions) & set(special_positions)
    everything = perturb_segment(
        model, spans, "prefix", n_tokens=15, trials=3, exclude_special=False
    )
    for p in everything:
        assert list(p.positions) == list(spans.prefix)
        assert changed_positions(p, spans) == list(spans.prefix)
        assert not set(p.replacement) & special


def test_random_mode_needs_only_a_tokenizer(tok, spans):
    special = special_token_ids(tok)
    out = perturb_segment(tok, spans, "query", mode="random", n_tokens=4, trials=6, seed=1)
    for p in out:
        assert p.mode == "random" and p.n_tokens == 4
        assert changed_positions(p, spans) == list(p.positions)
        assert all(pos in spans.query for pos in p.positions)
        for old, new in zip(p.original, p.replacement, strict=True):
            assert 0 <= new < len(tok) and new not in special and new != old
    assert out == perturb_segment(tok, spans, "query", mode="random", n_tokens=4, trials=6, seed=1)


def test_nearest_with_tokenizer_and_explicit_embedding_equals_model(model, tok, spans):
    from_model = perturb_segment(model, spans, "query", n_tokens=3, trials=3)
    explicit = perturb_segment(tok, spans, "query", n_tokens=3, trials=3, embedding=model.W_E)
    from_hf = perturb_segment(
        tok,
        spans,
        "query",
        n_tokens=3,
        trials=3,
        embedding=model.original_model.get_input_embeddings().weight,
    )
    assert from_model == explicit == from_hf


def test_embedding_rows_past_the_tokenizer_are_never_candidates(model, tok, spans):
    emb = model.W_E.detach()
    # padding rows that copy the query tokens' embeddings: cosine 1, but not real tokens
    extra = emb[list(spans.input_ids[spans.query.start : spans.query.stop])]
    padded = torch.cat([emb, extra])
    for p in perturb_segment(tok, spans, "query", n_tokens=7, top_k=1, embedding=padded):
        assert all(new < len(tok) for new in p.replacement)
    assert perturb_segment(tok, spans, "query", embedding=padded) == perturb_segment(
        tok, spans, "query", embedding=emb
    )


def test_explicit_positions_override_the_segment(model, tok, spans):
    pool = [1, 4, 16, 20, 23]
    out = perturb_segment(model, spans, "custom", positions=pool, n_tokens=3, trials=5)
    for p in out:
        assert p.segment == "custom" and p.n_tokens == 3
        assert set(p.positions) <= set(pool)
        assert changed_positions(p, spans) == list(p.positions)
    special_pos = spans.prefix.start  # <|im_start|>
    kept = perturb_segment(model, spans, "custom", positions=[special_pos, 1], n_tokens=2)
    assert all(p.positions == (1,) for p in kept)


def test_describe_names_each_replacement(tok, spans):
    p = perturb_segment(tok, spans, "query", mode="random", n_tokens=2, trials=1)[0]
    text = p.describe(tok)
    parts = text.split("; ")
    assert len(parts) == 2
    for part, pos, old, new in zip(parts, p.positions, p.original, p.replacement, strict=True):
        old_s = repr(tok.decode([old], clean_up_tokenization_spaces=False))
        new_s = repr(tok.decode([new], clean_up_tokenization_spaces=False))
        assert part == f"pos {pos} {old_s}→{new_s}"
    assert Perturbation((9,), (), (), (), "query", 0, "random").describe(tok) == ""


# ---------------------------------------------------------------- perturb_segments


def test_perturb_segments_match_counts_side_by_side(model, tok, spans):
    out = perturb_segments(model, spans, trials=3, seed=2)
    assert list(out) == ["prefix", "query", "postfix"]
    sizes = {name: len(perturbable_positions(spans, name, tok)) for name in out}
    assert sizes == {"prefix": 12, "query": 7, "postfix": 6}
    for name, trials in out.items():
        assert len(trials) == 3
        for p in trials:
            assert p.segment == name and p.n_tokens == 6
            assert all(pos in spans.segment(name) for pos in p.positions)
    assert out["query"] == perturb_segment(model, spans, "query", n_tokens=6, trials=3, seed=2)


def test_perturb_segments_with_given_n_tokens_caps_each_segment(tok, spans):
    out = perturb_segments(tok, spans, ("query", "prefix"), n_tokens=10, mode="random", trials=2)
    assert list(out) == ["query", "prefix"]
    assert {name: trials[0].n_tokens for name, trials in out.items()} == {
        "query": 7,
        "prefix": 10,
    }


def test_perturb_segments_without_exclude_special_counts_special_positions(tok, spans):
    out = perturb_segments(tok, spans, mode="random", trials=1, exclude_special=False)
    assert {trials[0].n_tokens for trials in out.values()} == {7}  # the query's 7 tokens


def test_perturb_segments_errors(tok, spans):
    with pytest.raises(ValueError, match=r"no positions=; call perturb_segment"):
        perturb_segments(tok, spans, mode="random", positions=[1])
    with pytest.raises(ValueError, match=r"non-empty tuple of names"):
        perturb_segments(tok, spans, "prefix", mode="random")
    with pytest.raises(ValueError, match=r"non-empty tuple of names"):
        perturb_segments(tok, spans, (), mode="random")
    with pytest.raises(ValueError, match=r"duplicates.*name each segment once"):
        perturb_segments(tok, spans, ("query", "query"), mode="random")


# ---------------------------------------------------------------- templates without a prefix


def test_qwen3_style_template_still_has_a_user_header_prefix():
    tok = tiny_tokenizer(chat_template=QWEN3_TEMPLATE)
    spans = chat_spans(tok, Q)
    assert spans.decode(tok, "prefix") == "<|im_start|>user\n"
    out = perturb_segment(tok, spans, "prefix", mode="random", n_tokens=10, trials=2)
    assert [p.n_tokens for p in out] == [2, 2]  # 'user', '\n' (not <|im_start|>)


def test_template_without_prefix_gives_the_empty_segment_error():
    tok = tiny_tokenizer(chat_template=NO_PREFIX_TEMPLATE)
    spans = chat_spans(tok, Q)
    assert len(spans.prefix) == 0
    with pytest.raises(ValueError, match=r"no prefix before the user's text.*segment='postfix'"):
        perturb_segment(tok, spans, "prefix", mode="random")
    with pytest.raises(ValueError, match=r"no prefix before the user's text"):
        perturb_segments(tok, spans, mode="random")
    out = perturb_segments(tok, spans, ("query", "postfix"), mode="random", trials=1)
    assert set(out) == {"query", "postfix"}


def test_hand_built_spans_with_empty_prefix():
    tok = tiny_tokenizer()
    ids = tuple(tok("Hi there", add_special_tokens=False)["input_ids"])
    spans = ChatSpans(
        ids, range(0, 0), range(0, len(ids)), range(len(ids), len(ids)), None, "", (0, 8)
    )
    with pytest.raises(ValueError, match=r"no prefix before the user's text"):
        perturb_segment(tok, spans, "prefix", mode="random")


# ---------------------------------------------------------------- errors


def test_perturb_segment_errors(model, tok, spans):
    with pytest.raises(ValueError, match=r"n_tokens must be a positive integer"):
        perturb_segment(model, spans, "prefix", n_tokens=0)
    with pytest.raises(ValueError, match=r"top_k must be a positive integer"):
        perturb_segment(model, spans, "prefix", top_k=0)
    with pytest.raises(ValueError, match=r"trials must be a positive integer"):
        perturb_segment(model, spans, "prefix", trials=0)
    with pytest.raises(ValueError, match=r"mode must be one of nearest, random, got 'swap'"):
        perturb_segment(model, spans, "prefix", mode="swap")
    with pytest.raises(ValueError, match=r"unknown segment 'suffix'.*positions="):
        perturb_segment(model, spans, "suffix")
    with pytest.raises(ValueError, match=r"unknown segment 'response'"):
        perturb_segment(model, spans, "response")
    with pytest.raises(ValueError, match=r"needs the input embedding.*embedding=model.W_E"):
        perturb_segment(tok, spans, "prefix")
    with pytest.raises(ValueError, match=r"expected a TransformerBridge.*or a tokenizer"):
        perturb_segment(object(), spans, "prefix", mode="random")
    with pytest.raises(ValueError, match=r"embedding has 10 rows but the tokenizer has"):
        perturb_segment(tok, spans, "prefix", embedding=torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"positions is empty"):
        perturb_segment(tok, spans, "x", mode="random", positions=[])
    with pytest.raises(ValueError, match=r"positions \[30\] are outside the prompt's 30 tokens"):
        perturb_segment(tok, spans, "x", mode="random", positions=[1, 30])
    with pytest.raises(ValueError, match=r"positions has duplicates"):
        perturb_segment(tok, spans, "x", mode="random", positions=[1, 1])
    with pytest.raises(ValueError, match=r"all 1 of its tokens are special.*exclude_special=False"):
        perturb_segment(tok, spans, "x", mode="random", positions=[0])
    with pytest.raises(ValueError, match=r"segment must be a non-empty string"):
        perturb_segment(tok, spans, "", mode="random", positions=[1])


# ---------------------------------------------------------------- aggregation


def test_aggregate_trials_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.9], [0.4, 0.0, 0.2]])
    out = aggregate_trials(scores)
    best = [0.5, 0.9, 0.4]  # per prompt: mean 0.6, deviations -0.1, 0.3, -0.2
    means = [0.3, 1.3 / 3, 0.2]
    mean_of_means = sum(means) / 3
    assert out["n_prompts"] == 3 and out["n_trials"] == 3
    assert out["best"] == pytest.approx(0.6)
    assert out["avg"] == pytest.approx(2.8 / 9)
    assert out["best_se"] == pytest.approx(math.sqrt(0.14 / 2) / math.sqrt(3))
    var = sum((m - mean_of_means) ** 2 for m in means) / 2
    assert out["avg_se"] == pytest.approx(math.sqrt(var) / math.sqrt(3))
    assert best == [round(max(row), 6) for row in scores.tolist()]
    lower = aggregate_trials(scores, higher_is_better=False)
    assert lower["best"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    assert lower["avg"] == out["avg"]


def test_aggregate_trials_single_prompt_has_nan_standard_error():
    out = aggregate_trials(torch.tensor([[1.0, 3.0]]))
    assert out["best"] == 3.0 and out["avg"] == 2.0
    assert math.isnan(out["best_se"]) and math.isnan(out["avg_se"])


def test_aggregate_trials_errors():
    with pytest.raises(ValueError, match=r"scores is empty.*prompts x trials"):
        aggregate_trials(torch.empty(0, 3))
    with pytest.raises(ValueError, match=r"scores contain NaN"):
        aggregate_trials(torch.tensor([[1.0, math.nan]]))


def test_trials_frame_is_tidy(tok, spans):
    per_prompt = [
        perturb_segment(tok, spans, "query", mode="random", n_tokens=2, trials=2, seed=s)
        for s in range(3)
    ]
    scores = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    frame = trials_frame(per_prompt, scores)
    assert list(frame.columns) == [
        "prompt",
        "segment",
        "trial",
        "mode",
        "n_tokens",
        "positions",
        "score",
    ]
    assert len(frame) == 6
    assert frame["prompt"].tolist() == [0, 0, 1, 1, 2, 2]
    assert frame["trial"].tolist() == [0, 1] * 3
    assert frame["score"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert set(frame["segment"]) == {"query"} and set(frame["mode"]) == {"random"}
    first = per_prompt[1][1]
    assert frame.loc[3, "positions"] == ",".join(map(str, first.positions))
    assert frame.loc[3, "n_tokens"] == 2


def test_trials_frame_with_segments_side_by_side(tok, spans):
    out = perturb_segments(tok, spans, mode="random", trials=2)
    row = [p for name in ("prefix", "query", "postfix") for p in out[name]]
    frame = trials_frame([row], torch.zeros(1, 6))
    assert frame["segment"].tolist() == ["prefix"] * 2 + ["query"] * 2 + ["postfix"] * 2
    assert set(frame["n_tokens"]) == {6}


def test_trials_frame_shape_mismatch(tok, spans):
    trials = perturb_segment(tok, spans, "query", mode="random", trials=2)
    with pytest.raises(ValueError, match=r"scores has shape \(1, 3\).*one score per perturbation"):
        trials_frame([trials], torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[1, 2\] trials each"):
        trials_frame([trials, trials[:1]], torch.zeros(2, 2))


def test_docstring_examples_run():
    result = doctest.testmod(perturb_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10
