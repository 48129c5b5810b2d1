"""template_attention against attention computed by plain Hugging Face eager attention.

The oracle is a separately built HF model with the same weights (checked), run with
``output_attentions=True``; its masses are summed position by position in Python.
"""

from __future__ import annotations

import doctest

import pandas as pd
import pytest
import torch

from piggyback_interp.analysis import attention as attention_module
from piggyback_interp.analysis.attention import (
    FROM_SEGMENTS,
    TO_SEGMENTS,
    attention_shift,
    compare_template_attention,
    prompt_spans,
    template_attention,
)
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.pairs import ModelPair
from piggyback_interp.core.spans import chat_spans
from piggyback_interp.testing import tiny_hf_model, tiny_model

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]
RESPONSES = ["No.", "Hello there, friend", "I have no idea about your question."]
KEYS = ["prompt", "layer", "head", "from_segment", "to_segment"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def llama_b():
    return tiny_model("llama", seed=1)


def hf_copy(arch: str, seed: int = 0):
    """The same weights as ``tiny_model(arch, seed=seed)`` as a plain HF model (eager)."""
    return tiny_hf_model(arch, seed=seed)


def oracle_masses(hf_model, spans) -> pd.DataFrame:
    """Masses from HF's attention probabilities, summed position by position."""
    with torch.no_grad():
        out = hf_model(spans.ids[None], output_attentions=True)
    rows = []
    for layer, probs in enumerate(out.attentions):
        for head in range(probs.shape[1]):
            for src in FROM_SEGMENTS:
                src_pos = list(getattr(spans, src) or ())
                if not src_pos:
                    continue
                for dst in TO_SEGMENTS:
                    dst_span = getattr(spans, dst)
                    if dst_span is None:
                        continue
                    total = 0.0
                    for q in src_pos:
                        total += sum(float(probs[0, head, q, k]) for k in dst_span)
                    rows.append((layer, head, src, dst, total / len(src_pos), len(src_pos)))
    return pd.DataFrame(rows, columns=["layer", "head", "from_segment", "to_segment", "mass", "n"])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("with_response", [False, True])
def test_masses_equal_hf_eager_attention(arch, with_response):
    model = tiny_model(arch, seed=0)
    hf = hf_copy(arch)
    question, response = QUESTIONS[2], RESPONSES[1]
    (spans,) = prompt_spans(
        chat_tokenizer(model), [question], [response] if with_response else None
    )
    with torch.no_grad():  # the copy really is the same model
        assert torch.allclose(hf(spans.ids[None]).logits, model(spans.ids[None]), atol=1e-5)

    frame = template_attention(model, [question], response=[response] if with_response else None)
    expected = oracle_masses(hf, spans)
    assert (
        len(frame)
        == len(expected)
        == model.cfg.n_layers * 4 * (2 + with_response) * (3 + with_response)
    )
    got = frame.drop(columns="prompt").sort_values(KEYS[1:], ignore_index=True)
    expected = expected.sort_values(KEYS[1:], ignore_index=True)
    assert (got[KEYS[1:]] == expected[KEYS[1:]]).all().all()
    assert (got.mass - expected.mass).abs().max() < 1e-5
    assert (got.n_from == expected.n).all()
    assert set(frame.from_segment) == {"query", "postfix", *(["response"] if with_response else [])}


def test_columns_counts_and_rows_sum_to_one(llama):
    frame = template_attention(llama, QUESTIONS, response=RESPONSES)
    assert list(frame.columns) == [*KEYS, "mass", "n_from", "n_to"]
    spans = prompt_spans(chat_tokenizer(llama), QUESTIONS, RESPONSES)
    for i, s in enumerate(spans):
        rows = frame[frame.prompt == i]
        for seg in TO_SEGMENTS:
            assert set(rows[rows.to_segment == seg].n_to) == {len(getattr(s, seg))}
        for seg in FROM_SEGMENTS:
            assert set(rows[rows.from_segment == seg].n_from) == {len(getattr(s, seg))}
    sums = frame.groupby(KEYS[:4]).mass.sum()
    assert len(sums) == 3 * 2 * 4 * 3
    assert (sums - 1).abs().max() < 1e-5
    # causal: the query sees nothing after it, the response sees itself
    assert (
        frame[frame.from_segment == "query"].query("to_segment in ['postfix', 'response']").mass
        == 0
    ).all()
    assert (
        frame[frame.from_segment == "postfix"].query("to_segment == 'response'").mass == 0
    ).all()
    assert (frame.query("from_segment == 'response' and to_segment == 'response'").mass > 0).all()
    assert (frame.mass >= 0).all()


def test_batched_left_padded_equals_one_by_one(llama):
    batched = template_attention(llama, QUESTIONS, response=RESPONSES, batch_size=3)
    single = pd.concat(
        [
            template_attention(llama, [q], response=[r]).assign(prompt=i)
            for i, (q, r) in enumerate(zip(QUESTIONS, RESPONSES, strict=True))
        ],
        ignore_index=True,
    )
    assert (batched[KEYS] == single[KEYS]).all().all()
    assert (batched.mass - single.mass).abs().max() < 1e-5
    assert (batched[["n_from", "n_to"]] == single[["n_from", "n_to"]]).all().all()
    two = template_attention(llama, QUESTIONS, response=RESPONSES, batch_size=2)
    assert (two.mass - batched.mass).abs().max() < 1e-5


def test_layers_subset_matches_full_run(llama):
    full = template_attention(llama, QUESTIONS[:2])
    last = template_attention(llama, QUESTIONS[:2], layers=[1])
    first = template_attention(llama, QUESTIONS[:2], layers=0)  # stops after block 0
    assert set(last.layer) == {1} and set(first.layer) == {0}
    for part in (first, last):
        merged = part.merge(full, on=KEYS, suffixes=("", "_full"))
        assert len(merged) == len(part)
        assert (merged.mass - merged.mass_full).abs().max() < 1e-6
    assert "response" not in set(full.from_segment) | set(full.to_segment)


def test_split_first_separates_the_sink(llama):
    plain = template_attention(llama, QUESTIONS[:2], response=RESPONSES[:2])
    split = template_attention(llama, QUESTIONS[:2], response=RESPONSES[:2], split_first=True)
    assert list(dict.fromkeys(split.to_segment)) == ["first", *TO_SEGMENTS]
    assert set(split[split.to_segment == "first"].n_to) == {1}
    wide = split.pivot_table(index=KEYS[:4], columns="to_segment", values="mass")
    whole = plain.pivot_table(index=KEYS[:4], columns="to_segment", values="mass")
    assert ((wide["first"] + wide["prefix"]) - whole["prefix"]).abs().max() < 1e-6
    assert (
        wide[["query", "postfix", "response"]] - whole[["query", "postfix", "response"]]
    ).abs().max().max() < 1e-6
    n_prefix = plain[plain.to_segment == "prefix"].n_to.to_numpy()
    assert (split[split.to_segment == "prefix"].n_to.to_numpy() == n_prefix - 1).all()
    # position 0 of each prompt, wherever left padding puts it in the batch
    hf = hf_copy("llama")
    for i, spans in enumerate(prompt_spans(chat_tokenizer(llama), QUESTIONS[:2], RESPONSES[:2])):
        with torch.no_grad():
            probs = hf(spans.ids[None], output_attentions=True).attentions[1][0, 2]
        expected = probs[list(spans.response), 0].mean()
        cell = split[(split["prompt"] == i) & (split["layer"] == 1) & (split["head"] == 2)]
        got = cell.query("from_segment == 'response' and to_segment == 'first'").mass.item()
        assert abs(got - float(expected)) < 1e-5


def test_messages_and_system_prompt(llama):
    chat = [{"role": "user", "content": "Hi"}]
    by_messages = template_attention(llama, [chat], response=["Yo"], layers=0)
    by_text = template_attention(llama, ["Hi"], response=["Yo"], layers=0)
    assert (by_messages.mass == by_text.mass).all()
    no_system = template_attention(llama, ["Hi"], layers=0, system_prompt=None)
    (spans,) = prompt_spans(chat_tokenizer(llama), ["Hi"], system_prompt=None)
    assert set(no_system.query("to_segment == 'prefix'").n_to) == {len(spans.prefix)}
    assert len(spans.prefix) < len(prompt_spans(chat_tokenizer(llama), ["Hi"])[0].prefix)


def test_template_without_postfix(llama):
    """A template that renders the user's text last: no postfix to read from, mass 0 onto it."""
    no_postfix = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% endfor %}"
    )
    spans = chat_spans(chat_tokenizer(llama), "Tell me a joke.", chat_template=no_postfix)
    assert len(spans.postfix) == 0
    frame = template_attention(llama, [spans])
    assert set(frame.from_segment) == {"query"}
    onto_postfix = frame[frame.to_segment == "postfix"]
    assert (onto_postfix.mass == 0).all() and (onto_postfix.n_to == 0).all()
    assert (frame.groupby(KEYS[:4]).mass.sum() - 1).abs().max() < 1e-5
    with pytest.raises(ValueError, match="already rendered ChatSpans"):
        template_attention(llama, [spans], response=["No."])


@pytest.mark.embedded
def test_embedded_model_equals_transformers(embedded, embedded_hf):
    questions, responses = ["What is the capital of France?", "Hi"], ["Paris.", "Hello!"]
    frame = template_attention(embedded, questions, response=responses, layers=[0, 14, 29])
    spans = prompt_spans(chat_tokenizer(embedded), questions, responses)
    for i, row_spans in enumerate(spans):
        expected = oracle_masses(embedded_hf, row_spans)
        expected = expected[expected.layer.isin([0, 14, 29])].sort_values(
            KEYS[1:], ignore_index=True
        )
        got = frame[frame.prompt == i].sort_values(KEYS[1:], ignore_index=True)
        assert (got[KEYS[1:]] == expected[KEYS[1:]]).all().all()
        assert (got.mass - expected.mass).abs().max() < 1e-4
    assert (frame.groupby(KEYS[:4]).mass.sum() - 1).abs().max() < 1e-5


def test_compare_and_shift(llama, llama_b):
    models = {"base": llama, "finetuned": llama_b}
    frame = compare_template_attention(models, QUESTIONS, response=RESPONSES)
    assert list(frame.columns) == ["model", *KEYS, "mass", "n_from", "n_to"]
    assert list(dict.fromkeys(frame.model)) == ["base", "finetuned"]
    for name, model in models.items():
        alone = template_attention(model, QUESTIONS, response=RESPONSES)
        part = frame[frame.model == name].drop(columns="model").reset_index(drop=True)
        assert (part[KEYS] == alone[KEYS]).all().all()
        assert (part.mass - alone.mass).abs().max() < 1e-6
    assert not (
        frame[frame.model == "base"].mass.values == frame[frame.model == "finetuned"].mass.values
    ).all()

    shift = attention_shift(frame)
    assert list(shift.columns) == [*KEYS[1:], "base_mass", "finetuned_mass", "delta", "n_prompts"]
    means = frame.groupby(["model", *KEYS[1:]]).mass.mean()
    for row in shift.itertuples():
        key = (row.layer, row.head, row.from_segment, row.to_segment)
        expected = means[("finetuned", *key)] - means[("base", *key)]
        assert abs(row.delta - expected) < 1e-12
        assert row.n_prompts == 3
    assert len(shift) == 2 * 4 * 3 * 4

    pair = ModelPair(llama_b, chat_tokenizer(llama), llama)
    by_pair = compare_template_attention(pair, QUESTIONS[:1], layers=0)
    assert list(dict.fromkeys(by_pair.model)) == ["base", "finetuned"]
    renamed = frame.replace({"model": {"base": "orig"}})
    assert attention_shift(renamed, base="orig").shape == shift.shape


def test_bad_inputs(llama, llama_b):
    with pytest.raises(ValueError, match="non-empty list"):
        template_attention(llama, [])
    with pytest.raises(ValueError, match="non-empty list"):
        template_attention(llama, "Hi")
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\] out of range.*0\.\.1"):
        template_attention(llama, ["Hi"], layers=[2])
    with pytest.raises(ValueError, match="2 responses for 1 prompts"):
        template_attention(llama, ["Hi"], response=["a", "b"])
    with pytest.raises(ValueError, match="one response per prompt, not one string"):
        template_attention(llama, ["Hi"], response="a")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        template_attention(llama, ["Hi"], batch_size=0)
    with pytest.raises(ValueError, match="non-empty mapping"):
        compare_template_attention({}, ["Hi"])
    with pytest.raises(ValueError, match="no 'model' column"):
        attention_shift(template_attention(llama, ["Hi"], layers=0))
    frame = compare_template_attention({"a": llama, "b": llama_b}, ["Hi"], layers=0)
    with pytest.raises(ValueError, match=r"model\(s\) \['base', 'finetuned'\] are not in"):
        attention_shift(frame)
    qwen = tiny_model("qwen3", n_layers=3)
    with pytest.raises(ValueError, match=r"different \(layer, head, segment\) cells"):
        attention_shift(
            compare_template_attention({"base": llama, "finetuned": qwen}, ["Hi"]), base="base"
        )


def test_different_tokens_are_refused(llama):
    from piggyback_interp.testing import tiny_tokenizer

    other = tiny_model("llama", seed=1)
    other.chat_tokenizer = tiny_tokenizer(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="different tokens or segments"):
        compare_template_attention({"base": llama, "finetuned": other}, ["Hi"])


def test_docstring_examples_run():
    result = doctest.testmod(attention_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10


def test_pattern_site_is_read_only_and_checked(llama):
    from types import SimpleNamespace

    from piggyback_interp.core.hooks import PATTERN_SITE, SITE_NAMES, pattern_site

    assert pattern_site(llama).name(3) == "blocks.3.attn.hook_pattern"
    assert PATTERN_SITE.site not in SITE_NAMES  # sweeps and patches never write patterns
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        pattern_site(SimpleNamespace(hook_dict={}))
