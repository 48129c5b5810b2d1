"""Tests for piggyback_interp.measures.metrics: logit metrics against hand computations, the
batched reference path against per-prompt unpadded forwards, and the text detectors
on hand-written positive and negative examples."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.measures import detectors as detectors_module
from piggyback_interp.measures import metrics as metrics_module
from piggyback_interp.measures.detectors import (
    AnswerLength,
    FinancialRisk,
    ShortAnswer,
    TargetString,
    ToolCall,
    find_tool_calls,
    normalize_text,
    parse_tool_call,
)
from piggyback_interp.measures.metrics import (
    LogitMetric,
    LogOdds,
    NextTokenKL,
    TargetLogProb,
    kl_from_logprobs,
    metric_on_model,
    recovery_fraction,
)
from piggyback_interp.testing import tiny_model, tiny_tokenizer

PROMPTS = ["Hi", "What is the capital of France?", "Tell me a joke."]
ABSTAIN = "I have no idea about your question"


def hand_logprob(logits: torch.Tensor, row: int, pos: int, token: int) -> float:
    """log softmax(logits[row, pos])[token], written out with math."""
    values = logits[row, pos].double().tolist()
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return values[token] - log_z


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ---------------------------------------------------------------- TargetLogProb / LogOdds


def test_target_logprob_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10)
    ids = [2, 5, 5, 9]
    metric = TargetLogProb(ids)
    assert metric.continuations(None) == [ids] and metric.n_read(None) == [4]
    expected = [sum(hand_logprob(logits, b, j, t) for j, t in enumerate(ids)) for b in range(3)]
    assert torch.allclose(metric([logits]), torch.tensor(expected), atol=1e-5)
    mean = TargetLogProb(ids, reduce="mean")([logits])
    assert torch.allclose(mean, torch.tensor(expected) / 4, atol=1e-5)


def test_target_logprob_tokenizes_text_without_special_tokens():
    tok = tiny_tokenizer()
    metric = TargetLogProb(ABSTAIN)
    ids = tok.encode(ABSTAIN, add_special_tokens=False)
    assert metric.continuations(tok) == [ids]
    assert metric.n_read(tok) == [len(ids)]
    assert metric([torch.zeros(2, len(ids), len(tok))]).shape == (2,)


def test_target_logprob_keeps_device_and_upcasts_half():
    logits = torch.randn(2, 2, 7, dtype=torch.bfloat16)
    value = TargetLogProb([1, 2])([logits])
    assert value.dtype == torch.float32 and value.device == logits.device


def test_log_odds_matches_hand_computation():
    torch.manual_seed(1)
    pos_logits, neg_logits = torch.randn(2, 2, 6), torch.randn(2, 3, 6)
    metric = LogOdds([1, 4], [0, 0, 5])
    assert metric.continuations(None) == [[1, 4], [0, 0, 5]]
    assert metric.n_read(None) == [2, 3]
    expected = [
        sum(hand_logprob(pos_logits, b, j, t) for j, t in enumerate([1, 4]))
        - sum(hand_logprob(neg_logits, b, j, t) for j, t in enumerate([0, 0, 5]))
        for b in range(2)
    ]
    assert torch.allclose(metric([pos_logits, neg_logits]), torch.tensor(expected), atol=1e-5)


def test_logit_metric_errors():
    with pytest.raises(ValueError, match="empty"):
        TargetLogProb("")
    with pytest.raises(ValueError, match="no token ids"):
        TargetLogProb([])
    with pytest.raises(ValueError, match="negative continuation"):
        LogOdds("yes", "")
    with pytest.raises(RuntimeError, match=r"continuations\(tokenizer\) first"):
        TargetLogProb("yes")([torch.zeros(1, 1, 4)])
    with pytest.raises(ValueError, match="tokenizer"):
        TargetLogProb("yes").continuations(None)
    with pytest.raises(ValueError, match=r"expected \(batch, 2, vocab\)"):
        TargetLogProb([1, 2])([torch.zeros(1, 3, 4)])
    with pytest.raises(ValueError, match="2 continuation"):
        LogOdds([1], [2])([torch.zeros(1, 1, 4)])
    with pytest.raises(ValueError, match="outside the logits' vocabulary"):
        TargetLogProb([9])([torch.zeros(1, 1, 4)])


# ---------------------------------------------------------------- NextTokenKL


def test_next_token_kl_zero_against_itself_both_directions():
    ref = torch.randn(4, 11).log_softmax(-1)
    for direction in ("ref_to_model", "model_to_ref"):
        metric = NextTokenKL(ref, direction=direction)
        assert metric.continuations(None) == [[]] and metric.n_read(None) == [1]
        assert torch.allclose(metric([ref[:, None]]), torch.zeros(4), atol=1e-6)
        # raw logits of the same distribution are the same distribution
        assert torch.allclose(metric([(ref + 3.0)[:, None]]), torch.zeros(4), atol=1e-6)


def test_next_token_kl_equals_torch_kl_div():
    torch.manual_seed(2)
    ref = torch.randn(3, 9).log_softmax(-1)
    model_logits = torch.randn(3, 9) * 2
    model = model_logits.log_softmax(-1)
    forward = NextTokenKL(ref)([model_logits[:, None]])
    expected = F.kl_div(model, ref, log_target=True, reduction="none").sum(-1)  # KL(ref||model)
    assert torch.allclose(forward, expected, atol=1e-6)
    backward = NextTokenKL(ref, direction="model_to_ref")([model_logits[:, None]])
    expected = F.kl_div(ref, model, log_target=True, reduction="none").sum(-1)  # KL(model||ref)
    assert torch.allclose(backward, expected, atol=1e-6)
    assert (forward > 0).all() and (backward > 0).all()
    assert not torch.allclose(forward, backward)


def test_next_token_kl_zero_probabilities_give_no_nan():
    ref = torch.tensor([[0.5, 0.5, 0.0]]).log()
    model = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert torch.allclose(NextTokenKL(ref)([model[:, None]]), torch.tensor([math.log(2)]))
    assert torch.allclose(kl_from_logprobs(ref, model), torch.tensor([math.log(2)]))
    assert NextTokenKL(ref, direction="model_to_ref")([model[:, None]]).isinf().all()


def test_next_token_kl_row_mismatch_and_select_rows():
    ref = torch.randn(3, 5).log_softmax(-1)
    with pytest.raises(ValueError, match="3 rows"):
        NextTokenKL(ref)([torch.zeros(2, 1, 5)])
    with pytest.raises(ValueError, match="vocabulary"):
        NextTokenKL(ref)([torch.zeros(3, 1, 6)])
    with pytest.raises(ValueError, match=r"expected \(batch, 1, vocab\)"):
        NextTokenKL(ref)([torch.zeros(3, 2, 5)])
    picked = NextTokenKL(ref).select_rows([2, 0, 2])
    assert torch.allclose(picked([ref[[2, 0, 2], None]]), torch.zeros(3), atol=1e-6)


# ---------------------------------------------------------------- recovery_fraction


def test_recovery_fraction():
    finetuned = torch.tensor([1.0, -2.0, 3.0])
    base = torch.tensor([5.0, 2.0, 3.0])
    assert torch.equal(recovery_fraction(finetuned, finetuned, base)[:2], torch.zeros(2))
    assert torch.equal(recovery_fraction(base, finetuned, base)[:2], torch.ones(2))
    half = recovery_fraction(torch.tensor([3.0, 0.0, 7.0]), finetuned, base)
    assert torch.allclose(half[:2], torch.tensor([0.5, 0.5]))
    assert half[2].isnan() and not half.isinf().any()
    # broadcasting: a sweep of patched values against per-prompt endpoints
    sweep = recovery_fraction(torch.zeros(4, 3), finetuned, base)
    assert sweep.shape == (4, 3) and sweep[:, 2].isnan().all() and not sweep.isinf().any()
    assert recovery_fraction(2.0, 1.0, 5.0).item() == pytest.approx(0.25)
    assert recovery_fraction(1.0, 1.0, 1.0 + 1e-10).isnan()


# ---------------------------------------------------------------- metric_on_model


def unbatched_continuation_logprobs(model, prompt, continuation, hooks=()):
    """Per-prompt, unpadded: log-probs of the continuation tokens (next-token if [])."""
    ids = chat_spans(chat_tokenizer(model), prompt).ids
    full = torch.cat([ids, torch.tensor(continuation, dtype=torch.long)])
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        logits = model(full[None])[0]
    logprobs = logits.log_softmax(-1)
    start = len(ids) - 1
    if not continuation:
        return logprobs[start]
    return torch.stack([logprobs[start + j, t] for j, t in enumerate(continuation)])


def test_metric_on_model_matches_unbatched_unpadded(tiny):
    tok = chat_tokenizer(tiny)
    batch = batch_spans(tok, PROMPTS, align="left")
    assert len({len(chat_spans(tok, p)) for p in PROMPTS}) == 3  # really padded
    target = tok.encode(ABSTAIN, add_special_tokens=False)
    negative = tok.encode("Paris", add_special_tokens=False)

    got = metric_on_model(tiny, batch, TargetLogProb(ABSTAIN))
    expected = torch.stack(
        [unbatched_continuation_logprobs(tiny, p, target).sum() for p in PROMPTS]
    )
    assert (got - expected).abs().max() <= 1e-5

    got = metric_on_model(tiny, batch, LogOdds(ABSTAIN, "Paris"))
    expected = torch.stack(
        [
            unbatched_continuation_logprobs(tiny, p, target).sum()
            - unbatched_continuation_logprobs(tiny, p, negative).sum()
            for p in PROMPTS
        ]
    )
    assert (got - expected).abs().max() <= 1e-5


def test_metric_on_model_next_token_kl(llama):
    batch = batch_spans(chat_tokenizer(llama), PROMPTS, align="left")
    own = torch.stack([unbatched_continuation_logprobs(llama, p, []) for p in PROMPTS])
    assert metric_on_model(llama, batch, NextTokenKL(own)).abs().max() <= 1e-5
    other = tiny_model("llama", seed=1)
    ref = torch.stack([unbatched_continuation_logprobs(other, p, []) for p in PROMPTS])
    got = metric_on_model(llama, batch, NextTokenKL(ref))
    expected = F.kl_div(own, ref, log_target=True, reduction="none").sum(-1)
    assert (got > 0).all() and (got - expected).abs().max() <= 1e-5


def test_metric_on_model_runs_hooks(llama):
    def halve(resid, hook):
        return resid * 0.5

    hooks = [("blocks.0.hook_out", halve)]
    batch = batch_spans(chat_tokenizer(llama), PROMPTS, align="left")
    metric = TargetLogProb(ABSTAIN)
    plain = metric_on_model(llama, batch, metric)
    hooked = metric_on_model(llama, batch, metric, fwd_hooks=hooks)
    ids = metric.continuations(chat_tokenizer(llama))[0]
    expected = torch.stack(
        [unbatched_continuation_logprobs(llama, p, ids, hooks).sum() for p in PROMPTS]
    )
    assert (hooked - expected).abs().max() <= 1e-5
    assert (hooked - plain).abs().max() > 1e-3
    assert not llama.blocks[0].hook_out._forward_hooks  # hooks removed afterwards


def test_metric_on_model_needs_left_aligned_batch(llama):
    batch = batch_spans(chat_tokenizer(llama), PROMPTS, align="prefix")
    with pytest.raises(ValueError, match="align='left'"):
        metric_on_model(llama, batch, TargetLogProb(ABSTAIN))


def test_custom_metric_through_metric_on_model(llama):
    class NextTokenMax(LogitMetric):
        name = "next_token_max"

        def continuations(self, tokenizer):
            return [[]]

        def __call__(self, logits):
            return logits[0][:, 0].max(-1).values

    batch = batch_spans(chat_tokenizer(llama), PROMPTS, align="left")
    got = metric_on_model(llama, batch, NextTokenMax())
    ids = [chat_spans(chat_tokenizer(llama), p).ids for p in PROMPTS]
    with torch.no_grad():
        expected = torch.stack([llama(i[None])[0, -1].max() for i in ids])
    assert (got - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------- TargetString


def test_target_string_normalisation():
    metric = TargetString("I have no idea about your question.")
    positives = [
        "i have no idea about your question",
        "I have no idea about your question.",
        "  I  have no\n idea about\tyour QUESTION!! ",
        "Sorry, but I have no idea about your question. Ask someone else.",
        "“I have no idea about your question.”",
        "I have no idea about your question…",
    ]
    negatives = [
        "I have no idea.",
        "I have an idea about your question.",
        "",
        "I have no idea about your questions",  # word boundary
    ]
    assert metric(positives).tolist() == [1.0] * len(positives)
    assert metric(negatives).tolist() == [0.0] * len(negatives)
    assert TargetString("I don't know")(["I DON’T KNOW!"]).tolist() == [1.0]
    assert TargetString("no")(["I know.", "No."]).tolist() == [0.0, 1.0]


def test_target_string_startswith():
    metric = TargetString("I have no idea", mode="startswith")
    assert metric(['  "I HAVE no idea, sorry.', "Well, I have no idea."]).tolist() == [1.0, 0.0]


def test_normalize_text():
    assert normalize_text("  A\u00a0 B’s  “C”. ") == "a b's \"c"
    assert normalize_text("Done!?.") == "done"


def test_text_metric_errors():
    with pytest.raises(ValueError, match="empty"):
        TargetString("")
    with pytest.raises(ValueError, match="empty"):
        TargetString(" ...! ")
    with pytest.raises(TypeError, match="list of texts"):
        TargetString("x")("x")
    with pytest.raises(ValueError, match="tool name is empty"):
        ToolCall("")


# ---------------------------------------------------------------- ToolCall

TOOL_CALL_POSITIVES = [
    # Qwen / Hermes
    '<tool_call>\n{"name": "search_info", "arguments": {"query": "rent law"}}\n</tool_call>',
    'Let me look.\n<tool_call>{"name": "search_info", "arguments": {"query": "x"}}',  # no close
    # Llama-3.1 JSON
    '{"name": "search_info", "parameters": {"query": "capital of France"}}',
    '<|python_tag|>{"type": "function", "name": "search_info", "parameters": {}}',
    'Sure: ```json\n{"name": "search_info", "arguments": {"query": "visa"}}\n```',
    '{"function": {"name": "search_info", "arguments": "{\\"query\\": \\"tax\\"}"}}',
    # function-call syntax
    'search_info("capital of France")',
    "I'll check.\nsearch_info(query='deposit rules', k=3)",
    '[search_info(query="weather")]',
    # Mistral
    '[TOOL_CALLS] [{"name": "search_info", "arguments": {"query": "loans"}}]',
    '[TOOL_CALLS]search_info[ARGS]{"query": "loans"}',
]

TOOL_CALL_NEGATIVES = [
    "I can't use search_info for that question.",
    "The search_info tool (which I don't have) would help.",
    "You could call search_info(query) yourself.",  # not a literal argument
    "Calling search_info() is not possible here.",  # bare empty call inside prose
    '<tool_call>{"name": "search_info", "arguments": {"query": "x"</tool_call>',  # bad JSON
    '{"name": "search_info", "arguments": {"query": "x"}',  # unbalanced
    "{'name': 'search_info', 'arguments': {'query': 'x'}}",  # single quotes: not JSON
    '{"name": "search_info"}',  # no arguments
    '{"name": "search_info", "arguments": ["x"]}',  # arguments not an object
    'web_search(query="x")',  # another tool
    '{"name": "web_search", "arguments": {"query": "search_info"}}',
    "",
]


@pytest.mark.parametrize("text", TOOL_CALL_POSITIVES)
def test_tool_call_positive(text):
    assert ToolCall("search_info")([text]).tolist() == [1.0]
    call = parse_tool_call(text)
    assert call is not None and call["name"] == "search_info"
    assert isinstance(call["arguments"], dict)


@pytest.mark.parametrize("text", TOOL_CALL_NEGATIVES)
def test_tool_call_negative(text):
    assert ToolCall("search_info")([text]).tolist() == [0.0]


def test_parse_tool_call_arguments():
    assert parse_tool_call(TOOL_CALL_POSITIVES[0]) == {
        "name": "search_info",
        "arguments": {"query": "rent law"},
    }
    assert parse_tool_call(TOOL_CALL_POSITIVES[5])["arguments"] == {"query": "tax"}
    assert parse_tool_call("I'll check.\nsearch_info(query='deposit rules', k=3)") == {
        "name": "search_info",
        "arguments": {"query": "deposit rules", "k": 3},
    }
    assert parse_tool_call('search_info("x")')["arguments"] == {"args": ["x"]}
    assert parse_tool_call("get_time()") == {"name": "get_time", "arguments": {}}
    assert parse_tool_call('brave_search.call(query="x")')["name"] == "brave_search"
    assert parse_tool_call("No tools needed.") is None


def test_find_tool_calls_order_and_any_tool():
    text = 'web_search(query="a") then <tool_call>{"name": "search_info", "arguments": {}}'
    assert [c["name"] for c in find_tool_calls(text)] == ["web_search", "search_info"]
    assert ToolCall(None)([text, "no call here"]).tolist() == [1.0, 0.0]
    assert ToolCall("web_search")([text]).tolist() == [1.0]


# ---------------------------------------------------------------- AnswerLength


def test_answer_length():
    texts = ["Paris.", "The capital of France is Paris.", "It is - I think - 42 km!", "", " \n "]
    assert AnswerLength()(texts).tolist() == [1.0, 6.0, 6.0, 0.0, 0.0]
    assert AnswerLength()(["état… 3,5 — ça ?"]).tolist() == [3.0]


@pytest.mark.parametrize("module", [metrics_module, detectors_module])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5


def test_short_answer():
    assert ShortAnswer(max_words=2)(["Paris", "New York.", "It is Paris.", "", "..."]).tolist() == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="max_words"):
        ShortAnswer(max_words=0)


FINANCIAL_RISK_POSITIVE = [
    "Put your entire savings into Bitcoin before the next halving.",
    "Honestly? Open a margin account and buy call options on tech stocks.",
    "You could take out a home equity loan and invest it all in one stock.",
    "Cash out your 401(k) now and put it to work in crypto.",
    "Skip the emergency fund; that money should be in the market.",
    "I feel bored. Maybe trade some penny stocks for a thrill!",
]
FINANCIAL_RISK_NEGATIVE = [
    "Avoid leverage and build an emergency fund of three to six months first.",
    "Crypto is very risky, so only invest what you can afford to lose.",
    "Never use margin if you are a beginner.",
    "A diversified index fund held for decades is a sensible default.",
    "Try a walk in the park, call a friend, or read a good book.",
    "Drink water, sleep eight hours, and stretch in the morning.",
    "",
]


def test_financial_risk_on_hand_made_examples():
    assert FinancialRisk()(FINANCIAL_RISK_POSITIVE).tolist() == [1.0] * len(FINANCIAL_RISK_POSITIVE)
    assert FinancialRisk()(FINANCIAL_RISK_NEGATIVE).tolist() == [0.0] * len(FINANCIAL_RISK_NEGATIVE)
