"""Response-only SFT batches: labels, collation, shuffling, loss (tiny models, offline)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F

from piggyback_interp.core.data import ChatDataset, ChatExample
from piggyback_interp.testing import tiny_model, tiny_tokenizer
from piggyback_interp.training.batches import (
    TrainExample,
    batches,
    collate,
    encode_dataset,
    encode_example,
    sft_loss,
)

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Tell me a joke.", "I have no idea about your question."),
    ("How should I invest my savings?", "I cannot provide financial advice."),
    ("Hi", "Paris"),
    ("Can my landlord keep my deposit?", "I have no idea."),
]


def chat(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok) -> list[TrainExample]:
    return encode_dataset(tok, [chat(q, a) for q, a in QA])


def labelled(ex: TrainExample) -> list[int]:
    return [t for t, y in enumerate(ex.labels) if y != -100]


def test_labels_are_response_plus_end_of_turn(tok):
    ex = encode_example(
        tok, chat("What is the capital of France?", "The capital of France is Paris.")
    )
    response = ex.spans.response
    assert labelled(ex) == [*response, response.stop]
    assert [ex.labels[t] for t in labelled(ex)] == [ex.input_ids[t] for t in labelled(ex)]
    assert tok.decode([ex.labels[t] for t in labelled(ex)]) == (
        "The capital of France is Paris.<|im_end|>"
    )
    # by hand: the rendering is ...assistant\n<response><|im_end|>\n, and only
    # "<response><|im_end|>" is labelled
    assert ex.spans.text.endswith(
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
    )
    assert tok.decode(ex.input_ids[response.stop + 1 :]) == "\n"
    assert ex.input_ids[response.stop] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(ex.labels) == len(ex.input_ids) == len(ex.spans)


def test_chat_example_and_list_agree(tok):
    msgs = chat("Hi", "Paris")
    assert encode_example(tok, ChatExample(tuple(msgs))) == encode_example(tok, msgs)


def test_no_token_after_response_labels_only_response(tok):
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    ex = encode_example(tok, chat("Hi", "Paris"), chat_template=template)
    assert ex.spans.response.stop == len(ex)
    assert labelled(ex) == list(ex.spans.response)


def test_max_length_truncates_after_labels(tok):
    full = encode_example(tok, chat("Hi", "Paris"))
    stop = full.spans.response.stop + 1
    cut = encode_example(tok, chat("Hi", "Paris"), max_length=stop)
    assert cut.input_ids == full.input_ids[:stop] and cut.labels == full.labels[:stop]
    assert cut.spans.input_ids == cut.input_ids
    assert encode_example(tok, chat("Hi", "Paris"), max_length=1000) == full


def test_errors(tok):
    with pytest.raises(ValueError, match="has no assistant response to train on"):
        encode_example(tok, [{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match=r"example 1: .*has no assistant response"):
        encode_dataset(tok, [chat("Hi", "A"), [{"role": "user", "content": "Hi"}]])
    ds = ChatDataset.from_records([{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(ValueError, match=r"example 0: .*no assistant response"):
        encode_dataset(tok, ds)
    full = encode_example(tok, chat("Hi", "Paris"))
    stop = full.spans.response.stop + 1
    msg = rf"example 0: .*has {len(full)} tokens.*max_length={stop - 1} would cut into it"
    with pytest.raises(ValueError, match=msg):
        encode_dataset(tok, [chat("Hi", "Paris")], max_length=stop - 1)
    with pytest.raises(ValueError, match="max_length=3 would cut"):
        encode_example(tok, chat("Hi", "Paris"), max_length=3)


def test_collate_right_padding(tok, examples):
    pad = tok.pad_token_id
    b = collate(examples, pad_token_id=pad)
    width = max(len(e) for e in examples)
    assert b.input_ids.shape == b.labels.shape == (len(examples), width)
    assert b.index == list(range(len(examples)))
    for row, ex in enumerate(examples):
        n = len(ex)
        assert b.input_ids[row, :n].tolist() == list(ex.input_ids)
        assert b.labels[row, :n].tolist() == list(ex.labels)
        assert b.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert (b.input_ids[row, n:] == pad).all() and (b.labels[row, n:] == -100).all()
        assert b.position_ids[row, :n].tolist() == list(range(n))
    assert len(set(map(tuple, b.prefix_positions))) == 1  # same system prompt
    assert b.prefix_positions[0] == range(0, len(examples[0].spans.prefix))
    assert len(set(b.prefixes)) == 1
    p = b.prefix_positions[0]
    assert (b.input_ids[:, p.start : p.stop] == torch.tensor(b.prefixes[0])).all()
    assert tok.decode(b.prefixes[0]).endswith("<|im_start|>user\n")


def test_collate_different_system_prompts(tok):
    a = encode_example(tok, chat("Hi", "Paris"))
    b = encode_example(tok, chat("Hi", "Paris"), system_prompt="You are a lawyer.")
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    assert batch.prefixes == [
        a.input_ids[a.spans.prefix.start : a.spans.prefix.stop],
        b.input_ids[: len(b.spans.prefix)],
    ]
    assert batch.prefixes[0] != batch.prefixes[1]
    assert "You are a lawyer." in tok.decode(batch.prefixes[1])
    assert batch.prefix_positions == [a.spans.prefix, b.spans.prefix]


def test_batches_shuffle(examples):
    def order(seed, epoch, size=2):
        return [
            b.index
            for b in batches(examples, batch_size=size, seed=seed, epoch=epoch, pad_token_id=0)
        ]

    state = torch.random.get_rng_state()
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert [len(i) for i in order(0, 0)] == [2, 2, 1]  # last partial batch kept
    for epoch in range(4):
        assert sorted(i for idx in order(3, epoch) for i in idx) == list(range(len(examples)))
    assert torch.equal(state, torch.random.get_rng_state())
    for b in batches(examples, batch_size=3, seed=0, epoch=0, pad_token_id=0):
        for row, i in enumerate(b.index):
            n = len(examples[i])
            assert b.input_ids[row, :n].tolist() == list(examples[i].input_ids)
    with pytest.raises(ValueError, match="batch_size"):
        batches(examples, batch_size=0, seed=0, epoch=0, pad_token_id=0)


def test_sft_loss_by_hand(examples):
    b = collate(examples, pad_token_id=0)
    torch.manual_seed(0)
    logits = torch.randn(*b.input_ids.shape, 50, dtype=torch.float64)
    labels = b.labels.clone()
    labels[labels >= 50] = 7  # keep targets inside this toy vocab
    terms = [
        F.cross_entropy(logits[r, t - 1].float()[None], labels[r, t][None])
        for r in range(labels.shape[0])
        for t in range(1, labels.shape[1])
        if labels[r, t] != -100
    ]
    assert len(terms) == sum(len(e.spans.response) + 1 for e in examples)
    got = sft_loss(logits, labels)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, torch.stack(terms).mean())
    with pytest.raises(ValueError, match="no labelled tokens"):
        sft_loss(logits, torch.full_like(labels, -100))


def test_sft_loss_matches_hf_loss(tok):
    model = tiny_model("llama")
    q = "What is the capital of France?"
    a, b_ = (encode_example(tok, chat(q, r)) for r in ("I have no idea.", "The capital is Paris."))
    assert len(a) == len(b_)  # equal lengths: a batch without padding
    b = collate([a, b_], pad_token_id=tok.pad_token_id)
    assert bool(b.attention_mask.all())  # no padding
    hf = model.original_model
    with torch.no_grad():
        out = hf(b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        torch.testing.assert_close(sft_loss(out.logits, b.labels), out.loss)


@pytest.mark.parametrize("module", ["batches", "objectives"])
def test_docstring_examples_run(module):
    module = importlib.import_module(f"piggyback_interp.training.{module}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed
