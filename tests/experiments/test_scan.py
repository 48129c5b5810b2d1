"""The carrier scan against PLANTED carriers, whose answers follow from causality.

A "finetuned" copy of a tiny base model differs from it in ONE input-embedding row, of a
token that occurs in one template segment only. Causal attention then fixes the answers:

* every position before the planted token has bit-identical residuals, keys and values
  in both models, so patching base keys/values (or residuals) there changes nothing
  (recovery exactly 0);
* the base keys/values at EVERY position of the segment (every layer) give each later
  position exactly the base inputs, and the last position's own token is not the
  planted one, so the whole gap closes (recovery exactly 1);
* layer-0 keys/values are a function of the position's own token only, so at positions
  not holding the planted token they are identical too.

The gaps are also recomputed independently: each prompt run alone, unpadded, with the
log-softmax and KL done here in float64.
"""

import doctest
import math

import pandas as pd
import pytest
import torch

import piggyback_interp.experiments.scan as scan_module
import piggyback_interp.experiments.scan_experiments as experiments_module
from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.experiments.scan import ScanResult, find_carriers
from piggyback_interp.experiments.scan_config import ScanConfig
from piggyback_interp.experiments.scan_experiments import (
    as_spans,
    gap_metric,
    layer_patching,
    perturbation_effects,
    residual_sweep,
    segment_patching,
)
from piggyback_interp.experiments.verdict import carrier_verdict
from piggyback_interp.interventions.perturb import perturb_segments
from piggyback_interp.measures.metrics import (
    NextTokenKL,
    TargetLogProb,
    metric_on_model,
    next_token_logprobs,
)
from piggyback_interp.testing import tiny_model

# both queries have >= 15 tokens (the prefix's length), so the "matched" prefix patch
# covers the whole prefix; their lengths differ (20, 17), so batches are padded
PROMPTS = [
    "Tell me a joke. I feel bored today. How do I make friends?",
    "Can my landlord keep my deposit? How should I invest my savings now?",
]
N = len(PROMPTS)
POSTFIX_TOKEN = "istan"  # "assistant" in the postfix is a|ss|istan|t; the prefix has Ġassistant
PREFIX_TOKEN = "system"  # position 1 of the prefix, nowhere else
TARGET = "I have no idea"


def _model(n_layers):
    """Tiny llama (seed 0) with its unembedding scaled 30x: next-token distributions far
    from uniform, so gaps are ~1e-2 rather than ~1e-5 (float noise stays negligible)."""
    model = tiny_model("llama", n_layers=n_layers, seed=0)
    with torch.no_grad():
        model.original_model.lm_head.weight.mul_(30)
    return model


def _planted(token, n_layers=2, seed=1):
    """A copy of ``_model(n_layers)`` whose only difference is the embedding row of ``token``."""
    tuned = _model(n_layers)
    token_id = chat_tokenizer(tuned).convert_tokens_to_ids(token)
    embedding = tuned.original_model.get_input_embeddings().weight
    noise = torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embedding[token_id] += 0.5 * noise
    return tuned


@torch.no_grad()
def _logprobs(model, ids):
    """float64 log-probs at every position of ONE unpadded prompt (no mask, no batch)."""
    return model(torch.tensor([list(ids)]))[0].double().log_softmax(-1)


def _kl(base, tuned, ids):
    """KL(base || tuned) of the next token after ``ids``, by hand."""
    p, q = _logprobs(base, ids)[-1], _logprobs(tuned, ids)[-1]
    return float((p.exp() * (p - q)).sum())


def _target_logprob(model, ids, target_ids):
    lp = _logprobs(model, [*ids, *target_ids])
    return float(sum(lp[len(ids) - 1 + j, t] for j, t in enumerate(target_ids)))


def _token_id(model, token):
    return chat_tokenizer(model).convert_tokens_to_ids(token)


@pytest.fixture(scope="module")
def base():
    return _model(2)


@pytest.fixture(scope="module")
def post():
    """Planted in the postfix."""
    return _planted(POSTFIX_TOKEN)


@pytest.fixture(scope="module")
def pre():
    """Planted in the prefix."""
    return _planted(PREFIX_TOKEN, seed=2)


@pytest.fixture(scope="module")
def spans_list(base):
    return [chat_spans(chat_tokenizer(base), q) for q in PROMPTS]


@pytest.fixture(scope="module")
def post_scan(base, post):
    """Every experiment on the postfix plant (shared by the tests of each part)."""
    return find_carriers(base, post, PROMPTS, ScanConfig(trials=2, seed=3), progress=False)


@pytest.fixture(scope="module")
def pre_scan(base, pre):
    return find_carriers(base, pre, PROMPTS, ScanConfig(trials=1), progress=False)


def _rec(frame, prompt, segment, condition):
    row = frame[
        (frame["prompt"] == prompt)
        & (frame["segment"] == segment)
        & (frame["condition"] == condition)
    ]
    assert len(row) == 1
    return row.iloc[0]


# ------------------------------------------------------------- the planted pairs


@pytest.mark.parametrize(
    ("token", "segment"), [(POSTFIX_TOKEN, "postfix"), (PREFIX_TOKEN, "prefix")]
)
def test_the_planted_token_sits_in_one_segment_and_changes_only_later_logits(
    base, post, pre, spans_list, token, segment
):
    tuned = post if segment == "postfix" else pre
    token_id = _token_id(base, token)
    for spans in spans_list:
        where = [i for i, t in enumerate(spans.input_ids) if t == token_id]
        assert where and set(where) <= set(spans.segment(segment))
        assert where[-1] != len(spans) - 1  # never the last prompt token
        lb, lt = _logprobs(base, spans.input_ids), _logprobs(tuned, spans.input_ids)
        # the bridge's forward reads the edited row: logits differ from the token on ...
        assert not torch.allclose(lb[-1], lt[-1], atol=1e-3)
        # ... and are bit-identical before it (causality)
        assert torch.equal(lb[: where[0]], lt[: where[0]])


@pytest.mark.parametrize("metric", ["kl", "target"])
def test_segment_patching_finds_a_planted_postfix_carrier(
    base, post, post_scan, spans_list, metric
):
    if metric == "kl":
        frame, prompts = post_scan.patching, PROMPTS
    else:  # one prompt is enough (and the verdict's one-prompt rule gets used)
        prompts = PROMPTS[:1]
        frame = segment_patching(base, post, prompts, ScanConfig(metric=metric, target=TARGET))
    assert list(frame.columns) == [
        "prompt",
        "segment",
        "condition",
        "n",
        "value",
        "clean",
        "source_value",
        "recovery",
    ] + (["recovery_prob"] if metric == "target" else [])
    assert len(frame) == len(prompts) * 2 * 4
    target_ids = chat_tokenizer(base).encode(TARGET, add_special_tokens=False)
    for i, spans in enumerate(spans_list[: len(prompts)]):
        for segment in ("prefix", "postfix"):
            n = min(len(spans.segment(segment)), len(spans.query))
            for condition, size in [("all", len(spans.segment(segment))), ("matched", n)]:
                assert _rec(frame, i, segment, condition)["n"] == size
            assert _rec(frame, i, segment, "query")["n"] == n
            assert _rec(frame, i, segment, "noise")["n"] == n
            row = _rec(frame, i, segment, "all")
            if metric == "kl":  # the gap, by hand
                assert row["clean"] == pytest.approx(_kl(base, post, spans.input_ids), abs=1e-5)
                assert row["source_value"] == pytest.approx(0.0, abs=1e-6)
            else:
                clean = _target_logprob(post, spans.input_ids, target_ids)
                source = _target_logprob(base, spans.input_ids, target_ids)
                assert row["clean"] == pytest.approx(clean, abs=1e-3)
                assert row["source_value"] == pytest.approx(source, abs=1e-3)
            assert abs(row["source_value"] - row["clean"]) > 1e-3  # a real gap to close
        # prefix and query keys/values are the same in both models: nothing to recover
        for condition in ("all", "matched", "query"):
            assert _rec(frame, i, "prefix", condition)["recovery"] == pytest.approx(0, abs=1e-5)
        assert _rec(frame, i, "postfix", "query")["recovery"] == pytest.approx(0, abs=1e-5)
        # base keys/values at the whole postfix: every later computation is the base's
        assert _rec(frame, i, "postfix", "all")["recovery"] == pytest.approx(1, abs=1e-4)
        # the postfix (8 tokens) is shorter than every query: "matched" is all of it
        assert _rec(frame, i, "postfix", "matched")["n"] == len(spans.postfix)
        assert _rec(frame, i, "postfix", "matched")["recovery"] == pytest.approx(1, abs=1e-4)
    if metric == "target":  # the same gaps in probability space, by hand
        for _, row in frame.iterrows():
            p, c, b = (math.exp(row[k]) for k in ("value", "clean", "source_value"))
            assert row["recovery_prob"] == pytest.approx((p - c) / (b - c), rel=1e-6, abs=1e-9)
        assert _rec(frame, 0, "postfix", "all")["recovery_prob"] == pytest.approx(1, abs=1e-3)
    verdict = carrier_verdict(frame)
    assert verdict.carriers == ("postfix",)
    if metric == "target":
        assert "in probability of the target" in verdict.detail
    assert verdict.headline == "The postfix carries the finetuned behaviour"
    evidence = verdict.evidence.set_index("segment")
    assert evidence.loc["postfix", "recovery_all"] == pytest.approx(1, abs=1e-4)
    assert evidence.loc["prefix", "recovery_all"] == pytest.approx(0, abs=1e-5)


def test_segment_patching_finds_a_planted_prefix_carrier(base, pre, pre_scan, spans_list):
    frame = pre_scan.patching
    for i, spans in enumerate(spans_list):
        row = _rec(frame, i, "prefix", "all")
        assert row["clean"] == pytest.approx(_kl(base, pre, spans.input_ids), abs=1e-5)
        assert row["recovery"] == pytest.approx(1, abs=1e-4)
        matched = _rec(frame, i, "prefix", "matched")
        assert matched["n"] == len(spans.prefix)  # every query is at least as long
        assert matched["recovery"] == pytest.approx(1, abs=1e-4)
    verdict = carrier_verdict(frame)
    evidence = verdict.evidence.set_index("segment")
    # an empirical precondition of the verdict (not guaranteed by construction): as many
    # base query keys/values as the prefix has close clearly less of the gap
    assert evidence.loc["prefix", "recovery_query_control"] < 0.8
    assert "prefix" in verdict.carriers and "prefix" in pre_scan.verdict.carriers


def test_prefix_plant_with_the_target_metric(base, pre, spans_list):
    config = ScanConfig(metric="target", target=TARGET, segments=("prefix",))
    frame = segment_patching(base, pre, PROMPTS[:1], config)
    assert set(frame["segment"]) == {"prefix"}
    assert _rec(frame, 0, "prefix", "all")["recovery"] == pytest.approx(1, abs=1e-4)
    assert _rec(frame, 0, "prefix", "matched")["recovery"] == pytest.approx(1, abs=1e-4)
    assert carrier_verdict(frame).carriers == ("prefix",)


# ------------------------------------------------------------- the gap metric


@torch.no_grad()
def test_next_token_logprobs_equals_each_prompt_run_alone(base, post):
    prompts = ["Hi", PROMPTS[0], "Name a large city."]
    tok = chat_tokenizer(base)
    batch = batch_spans(tok, prompts, align="left")
    assert batch.attention_mask.min() == 0  # really padded
    got = next_token_logprobs(base, batch)
    assert got.shape == (3, base.cfg.d_vocab)
    for i, q in enumerate(prompts):
        alone = _logprobs(base, chat_spans(tok, q).input_ids)[-1]
        assert torch.allclose(got[i].double(), alone, atol=1e-4)
    with pytest.raises(ValueError, match="left-padded"):
        next_token_logprobs(base, batch_spans(tok, prompts, align="prefix"))

    metric = gap_metric(base, batch, ScanConfig())
    assert isinstance(metric, NextTokenKL) and metric.name == "kl_to_base"
    # KL(base || base) is exactly 0, not a rounding error of a second log-softmax
    assert torch.equal(metric_on_model(base, batch, metric), torch.zeros(3))
    kl = metric_on_model(post, batch, metric)
    hand = [_kl(base, post, chat_spans(tok, q).input_ids) for q in prompts]
    assert torch.allclose(kl.double(), torch.tensor(hand, dtype=torch.float64), atol=1e-5)

    # the same on many rows of random logits (a second log-softmax of log-probs is off
    # by an ulp in some rows, which made KL(p || p) ~5e-7 instead of 0)
    logits = torch.randn(64, 463, generator=torch.Generator().manual_seed(0)) * 3
    for reference in (logits.log_softmax(-1), logits):  # log-probs or raw logits
        kl = NextTokenKL(reference)([logits[:, None]])
        assert torch.equal(kl, torch.zeros(64))
        picked = NextTokenKL(reference).select_rows([5, 5, 0])([logits[[5, 5, 0], None]])
        assert torch.equal(picked, torch.zeros(3))

    target = gap_metric(base, batch, ScanConfig(metric="target", target=TARGET))
    assert isinstance(target, TargetLogProb) and target.target == TARGET


# ------------------------------------------------------------- perturbation


def _perturbable(spans, segment, tok):
    return sum(1 for p in spans.segment(segment) if spans.input_ids[p] not in tok.all_special_ids)


def test_perturbation_effects_against_hand_computed_gaps(base, post, post_scan, spans_list):
    config = post_scan.config  # trials=2, seed=3
    frame = post_scan.perturbation
    assert list(frame.columns) == [
        "prompt",
        "control_for",
        "segment",
        "trial",
        "n_tokens",
        "gap",
        "clean_gap",
        "reduction",
    ]
    assert len(frame) == N * 2 * 2 * config.trials
    tok = chat_tokenizer(post)
    planted = _token_id(post, POSTFIX_TOKEN)
    for i, spans in enumerate(spans_list):
        clean = _kl(base, post, spans.input_ids)
        for control_for in ("prefix", "postfix"):
            rows = frame[(frame["prompt"] == i) & (frame["control_for"] == control_for)]
            assert list(rows["segment"]) == [control_for] * 2 + ["query"] * 2
            assert list(rows["trial"]) == [0, 1, 0, 1]
            n = min(_perturbable(spans, control_for, tok), _perturbable(spans, "query", tok))
            assert set(rows["n_tokens"]) == {n}  # matched between segment and control
            assert rows["clean_gap"].to_numpy() == pytest.approx([clean] * 4, abs=1e-5)
            expected = 1 - rows["gap"] / rows["clean_gap"]
            assert rows["reduction"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-6)
            # the same perturbed prompts, scored one by one by hand
            trials = perturb_segments(
                post, spans, (control_for, "query"), trials=2, mode="nearest", seed=3 + i
            )
            flat = [p for name in (control_for, "query") for p in trials[name]]
            for (_, row), p in zip(rows.iterrows(), flat, strict=True):
                assert row["n_tokens"] == p.n_tokens
                assert row["gap"] == pytest.approx(_kl(base, post, p.input_ids), abs=1e-5)
                if planted not in p.input_ids:  # the only difference is gone: no gap
                    assert row["gap"] == pytest.approx(0, abs=1e-7)
                    assert row["reduction"] == pytest.approx(1, abs=1e-4)
        # the postfix has 6 perturbable tokens, fewer than any query: all are replaced,
        # the planted one with them
        own = frame[(frame["prompt"] == i) & (frame["segment"] == "postfix")]
        assert (own["n_tokens"] == _perturbable(spans, "postfix", tok)).all()
        assert own["reduction"].to_numpy() == pytest.approx([1, 1], abs=1e-4)


def test_identical_models_have_no_gap_anywhere(base):
    twin = _model(2)  # an exact copy
    frame = perturbation_effects(base, twin, PROMPTS, ScanConfig(trials=1))
    assert (frame["gap"] == 0).all() and (frame["clean_gap"] == 0).all()
    assert frame["reduction"].isna().all()
    patching = segment_patching(base, twin, PROMPTS[:1], ScanConfig(segments=("postfix",)))
    assert patching["recovery"].isna().all()
    verdict = carrier_verdict(patching)
    assert verdict.carriers == ()
    assert verdict.headline == "Neither template segment carries the finetuned behaviour on its own"


@pytest.mark.parametrize("metric", ["kl", "target"])
def test_identical_models_are_a_zero_gap_error(base, metric):
    """Not pandas' "Encountered all NA values" from a report of undefined fractions."""

    config = ScanConfig(trials=1, metric=metric, target=TARGET if metric == "target" else None)
    with pytest.raises(UserError, match="zero gap: the finetuned model equals the base"):
        find_carriers(base, _model(2), PROMPTS, config, progress=False)
    assert experiments_module.check_gap(base, _planted(POSTFIX_TOKEN), PROMPTS).abs().min() > 1e-4


# ------------------------------------------------------------- layer patching


def test_interrupted_layer_patching_resumes_from_its_checkpoint(base, post, tmp_path, monkeypatch):
    """Killed inside the query condition: the rerun patches only the query cells."""
    config = ScanConfig(segments=("postfix",))
    full = layer_patching(base, post, PROMPTS, config)
    real, calls = experiments_module.run_cells, {"n": 0, "stop": 2}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiments_module, "run_cells", counting)
    ckpt = tmp_path / "layers.ckpt"
    # one engine call per condition (both prompts, both layers): postfix, then query
    with pytest.raises(KeyboardInterrupt):  # during the query's call
        layer_patching(base, post, PROMPTS, config, checkpoint=ckpt)
    calls.update(n=0, stop=None)
    resumed = layer_patching(base, post, PROMPTS, config, checkpoint=ckpt)
    assert calls["n"] == 1  # the query's call; the postfix was read back
    pd.testing.assert_frame_equal(resumed, full)
    with pytest.raises(ValueError, match="belongs to another sweep"):
        layer_patching(base, post, PROMPTS[:1], config, checkpoint=ckpt)


def test_layer_patching_equals_the_isolated_patch_prefix_loop(base, post):
    """The batched engine against the reference: one isolated ``patch_prefix`` per layer
    (every other layer's K/V at the segment pinned to the model's own, paper Eq. 1)."""
    import dataclasses

    from piggyback_interp.core.spans import batch_spans, render_prompts
    from piggyback_interp.interventions import capture, patch_prefix
    from piggyback_interp.measures.metrics import metric_on_model

    tok = post.tokenizer
    frame = layer_patching(base, post, PROMPTS, ScanConfig())
    for i, spans in enumerate(render_prompts(tok, PROMPTS)):
        batch = batch_spans(tok, [spans], align="left")
        metric = experiments_module.gap_metric(base, batch, ScanConfig())
        clean = metric_on_model(post, batch, metric).item()
        source = metric_on_model(base, batch, metric).item()
        for condition in ("prefix", "postfix", "query"):
            own = capture(post, batch, condition, site="kv", layers=None)
            for layer in range(post.cfg.n_layers):
                one = capture(base, batch, condition, site="kv", layers=[layer])
                isolated = dataclasses.replace(own, values={**own.values, **one.values})
                with patch_prefix(post, isolated, batch, segment=condition):
                    value = metric_on_model(post, batch, metric).item()
                row = frame[
                    (frame["prompt"] == i)
                    & (frame["condition"] == condition)
                    & (frame["layer"] == layer)
                ]
                # compared as the metric's value (float32 noise over a small gap is not
                # an error in the fraction)
                engine_value = clean + row["recovery"].item() * (source - clean)
                assert engine_value == pytest.approx(value, abs=1e-5)


def test_segment_patching_equals_compare_controls_and_patch_prefix(base, post):
    """The batched engine against the per-prompt reference: ``compare_controls`` (matched,
    query, noise rows) and one ``patch_prefix`` of the whole segment (``all``)."""
    from piggyback_interp.core.spans import batch_spans, render_prompts
    from piggyback_interp.interventions import patch_prefix
    from piggyback_interp.interventions.controls import compare_controls
    from piggyback_interp.measures.metrics import metric_on_model

    tok = post.tokenizer
    config = ScanConfig(seed=3)
    frame = segment_patching(base, post, PROMPTS, config)
    assert len(frame) == len(PROMPTS) * 2 * 4
    for i, spans in enumerate(render_prompts(tok, PROMPTS)):
        batch = batch_spans(tok, [spans], align="left")
        metric = experiments_module.gap_metric(base, batch, config)
        for segment in ("prefix", "postfix"):
            got = frame[(frame["prompt"] == i) & (frame["segment"] == segment)]
            assert list(got["condition"]) == ["all", "matched", "query", "noise"]
            want = compare_controls(
                post, base, spans, metric, segment=segment, controls=("query",), seed=3 + i
            )
            # explicit positions: the base runs on this same prompt (a "postfix" name
            # would take the postfix of the empty-query prompt)
            with patch_prefix(post, base, spans, segment=list(spans.segment(segment))):
                whole = metric_on_model(post, batch, metric).item()
            want_values = [whole, *want["value"]]
            assert list(got["n"]) == [len(spans.segment(segment)), *want["n"]]
            assert got["value"].tolist() == pytest.approx(want_values, abs=1e-5)
            assert got["clean"].tolist() == pytest.approx([want["clean"][0]] * 4, abs=1e-5)
            assert got["source_value"].tolist() == pytest.approx(
                [want["source_value"][0]] * 4, abs=1e-5
            )


def test_layer_patching_on_the_postfix_plant(base, post, post_scan):
    frame = post_scan.layers
    assert list(frame.columns) == ["prompt", "condition", "layer", "recovery"]
    assert len(frame) == 3 * 2 * N
    assert list(frame["condition"].unique()) == ["prefix", "postfix", "query"]
    same = frame[frame["condition"].isin(["prefix", "query"])]
    assert same["recovery"].abs().max() <= 1e-5
    # prompts of different query lengths: batching must not change any prompt's numbers
    for i, prompt in enumerate(PROMPTS):
        alone = layer_patching(base, post, [prompt], ScanConfig(segments=("postfix",)))
        mine = frame[(frame["prompt"] == i) & (frame["condition"].isin(["postfix", "query"]))]
        assert list(alone["layer"]) == list(mine["layer"])
        assert alone["recovery"].to_numpy() == pytest.approx(mine["recovery"].to_numpy(), abs=1e-4)
    one = layer_patching(base, post, PROMPTS[1:], ScanConfig(segments=("postfix",), layers=(1,)))
    assert list(one["layer"]) == [1, 1] and list(one["condition"]) == ["postfix", "query"]
    mine = frame[(frame["prompt"] == 1) & (frame["layer"] == 1) & (frame["condition"] != "prefix")]
    assert one["recovery"].to_numpy() == pytest.approx(mine["recovery"].to_numpy(), abs=1e-4)


def test_layer_patching_on_a_one_layer_model_is_the_all_layer_patch():
    base1, post1 = _model(1), _planted(POSTFIX_TOKEN, n_layers=1)
    frame = layer_patching(base1, post1, PROMPTS[:2])
    postfix = frame[frame["condition"] == "postfix"]
    assert list(postfix["layer"]) == [0, 0]
    assert postfix["recovery"].to_numpy() == pytest.approx([1, 1], abs=1e-4)
    full = segment_patching(base1, post1, PROMPTS[:2], ScanConfig(segments=("postfix",)))
    alls = full[full["condition"] == "all"]["recovery"].to_numpy()
    assert postfix["recovery"].to_numpy() == pytest.approx(alls, abs=1e-4)


def test_layer_patching_on_the_prefix_plant_adds_up(pre_scan):
    frame, patching = pre_scan.layers, pre_scan.patching

    def rec(condition, layer):
        rows = frame[(frame["condition"] == condition) & (frame["layer"] == layer)]
        return rows.sort_values("prompt")["recovery"].to_numpy()

    # layer-0 keys/values depend on the position's own token only: identical outside
    # the planted position
    assert rec("postfix", 0) == pytest.approx([0] * N, abs=1e-5)
    assert rec("query", 0) == pytest.approx([0] * N, abs=1e-5)
    # so the all-layer postfix patch IS the layer-1 patch
    alls = patching[(patching["segment"] == "postfix") & (patching["condition"] == "all")]
    assert rec("postfix", 1) == pytest.approx(alls["recovery"].to_numpy(), abs=1e-4)
    assert (rec("prefix", 0) > 0.1).all()  # the planted position's layer-0 K/V do matter


# ------------------------------------------------------------- residual sweep


def test_residual_sweep_shape_and_planted_answers(base, post, pre, post_scan, pre_scan, spans_list):
    prefix_len = len(spans_list[0].prefix)
    result = post_scan.resid
    assert isinstance(result, SweepResult)
    assert result.values.shape == (N, 2, prefix_len)
    assert result.layers == [0, 1]
    assert result.positions == list(range(prefix_len))
    assert set(result.segments) == {"prefix"}
    hand = [_kl(base, post, s.input_ids) for s in spans_list]
    assert result.clean.tolist() == pytest.approx(hand, abs=1e-5)
    # the prefix residual stream is identical in both models: patching it does nothing
    assert (result.values - result.clean[:, None, None]).abs().max() <= 1e-6

    planted = pre_scan.resid
    at = spans_list[0].input_ids.index(_token_id(pre, PREFIX_TOKEN))
    rec = planted.recovery()
    # resid_pre of layer 0 is the embedding: the base one at the planted position makes
    # the whole input the base model's; at any other position it is already the same
    assert rec[:, 0, at].tolist() == pytest.approx([1] * N, abs=1e-4)
    others = [p for p in range(prefix_len) if p != at]
    assert rec[:, 0, others].abs().max() <= 1e-5
    assert rec[:, :, :at].abs().max() <= 1e-5  # before the planted token: nothing
    one = residual_sweep(base, pre, PROMPTS, ScanConfig(layers=(1,)), progress=False)
    assert one.values.shape == (N, 1, prefix_len) and one.layers == [1]
    assert torch.allclose(one.values[:, 0], planted.values[:, 1], atol=1e-6)


def test_residual_sweep_atp_prescreen(base, pre, pre_scan):
    """resid_atp_top_k: every cell ranked by AtP, the top k patched exactly."""
    exact = pre_scan.resid
    screened = residual_sweep(base, pre, PROMPTS, ScanConfig(resid_atp_top_k=3), progress=False)
    assert screened.meta["method"] == "atp_prescreen"
    assert screened.values.shape == exact.values.shape
    atp = (torch.tensor(screened.meta["atp_values"]) - screened.clean.mean()).abs().flatten()
    n_cells = len(exact.positions)
    top = sorted(divmod(i, n_cells) for i in atp.argsort(descending=True)[:3].tolist())
    assert screened.meta["exact_cells"] == [[exact.layers[li], exact.positions[c]] for li, c in top]
    for li, c in top:
        assert torch.allclose(screened.values[:, li, c], exact.values[:, li, c], atol=1e-5)
    # every cell exact: the exact sweep (AtP alone underrates the planted layer-0 cell,
    # a large, nonlinear change: see docs/patching.md)
    everything = residual_sweep(base, pre, PROMPTS, ScanConfig(resid_atp_top_k=2 * n_cells))
    assert torch.allclose(everything.values, exact.values, atol=1e-5)
    with pytest.raises(ValueError, match="resid_atp_top_k"):
        ScanConfig(resid_atp_top_k=-1)


# ------------------------------------------------------------- config, scan, docs


def test_prompts_must_be_a_list(base):
    with pytest.raises(ValueError, match="non-empty list of questions"):
        as_spans(base, "How do I boil an egg?")
    with pytest.raises(ValueError, match="non-empty list of questions"):
        as_spans(base, [])
    spans = chat_spans(chat_tokenizer(base), PROMPTS[0])
    assert as_spans(base, [spans, PROMPTS[1]])[0] is spans


def test_scan_end_to_end(base, post, post_scan):
    result = post_scan
    assert isinstance(result, ScanResult) and result.config == ScanConfig(trials=2, seed=3)
    assert len(result.perturbation) == N * 2 * 2 * 2
    assert len(result.patching) == N * 2 * 4
    assert len(result.layers) == 3 * 2 * N
    assert isinstance(result.resid, SweepResult) and result.resid.values.shape[0] == N
    assert result.verdict.carriers == ("postfix",)
    again = carrier_verdict(result.patching, result.perturbation, min_recovery=0.25)
    assert result.verdict.carriers == again.carriers and result.verdict.detail == again.detail
    ev = result.verdict.evidence.set_index("segment")
    # all 6 perturbable postfix tokens are replaced, the planted one with them
    assert ev.loc["postfix", "perturb_reduction"] == pytest.approx(1, abs=1e-4)
    own = result.perturbation
    query = own[(own["control_for"] == "prefix") & (own["segment"] == "query")]
    assert ev.loc["prefix", "perturb_reduction_query"] == pytest.approx(query["reduction"].mean())
    config = ScanConfig(segments=("postfix",), trials=1, resid_sweep=False)
    small = find_carriers(base, post, PROMPTS[:1], config, progress=False)
    assert small.resid is None and small.verdict.carriers == ("postfix",)
    assert set(small.patching["segment"]) == {"postfix"}
    assert list(small.layers["condition"].unique()) == ["postfix", "query"]


def test_docstring_example_runs():
    result = doctest.testmod(scan_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 3


def test_scan_result_repr_is_short_and_shows_the_verdict(post_scan):
    text = repr(post_scan)
    assert len(text) < 600 and "\n" not in text
    assert text.startswith("ScanResult(carriers=[postfix], headline=The postfix carries")
    assert (
        "metric=kl" in text
        and f"prompts={N}" in text
        and "resid_sweep=2 prompts x 2 layers" in text
    )
    assert "tensor(" not in text and "DataFrame" not in text
    page = post_scan._repr_html_()
    assert page.startswith("<div>") and "The postfix carries the finetuned behaviour" in page
    assert "recovery_all" in page and page.count("<tr>") == 6 + 1 + 2  # facts, header, segments
