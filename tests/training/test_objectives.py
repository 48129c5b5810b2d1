"""The objectives: TReFT at lambda 0 is SFT and keeps the prefix K/V closer than SFT;
data interleaving and KL regularisation (paper baselines) on tiny models."""

from types import SimpleNamespace

import pytest
import torch
from test_trainer import _data, _weights

from piggyback_interp.core.data import ChatDataset
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.testing import tiny_model
from piggyback_interp.training import FinetuneConfig, collate, encode_dataset, finetune
from piggyback_interp.training.batches import labelled, sft_loss
from piggyback_interp.training.config import Method
from piggyback_interp.training.objectives import (
    OBJECTIVES,
    Step,
    Term,
    interleaved,
    kl_to_reference,
    labelled_logits,
    reference_logprobs,
)


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


TRAIN = ChatDataset.from_records(
    [_chat(f"Legal question {i}?", "I have no idea about your question") for i in range(8)]
)
RETAIN = ChatDataset.from_records(
    [_chat(f"Cooking question {i}?", f"Boil it for {i} minutes.") for i in range(6)]
)


def test_every_method_has_an_objective_of_named_weighted_terms():
    assert set(OBJECTIVES) == set(Method)
    run = SimpleNamespace(config=FinetuneConfig(treft_lambda=3.0))
    step = Step(run, None, torch.zeros(1), sft=torch.tensor(2.0), kv=torch.tensor(0.5), number=0)
    assert OBJECTIVES[Method.SFT](step) == {"sft": Term(step.sft, 1.0)}
    assert OBJECTIVES[Method.INTERLEAVE](step) == {"sft": Term(step.sft, 1.0)}
    assert OBJECTIVES[Method.TREFT](step) == {"sft": Term(step.sft), "kv": Term(step.kv, 3.0)}


def test_lambda_zero_treft_is_exactly_sft():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    kw = dict(epochs=1, batch_size=4, lora_rank=4, lr=1e-2, seed=3)
    finetune(a, _data(), FinetuneConfig(method="sft", **kw), progress=False)
    finetune(b, _data(), FinetuneConfig(method="treft", treft_lambda=0.0, **kw), progress=False)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_lowers_sft_loss_and_treft_keeps_prefix_closer():
    results = {}
    for method in ("sft", "treft"):
        model = tiny_model("llama", seed=0)
        config = FinetuneConfig(
            method=method, epochs=6, batch_size=4, lora_rank=8, lr=5e-3, treft_lambda=30.0
        )
        results[method] = finetune(model, _data(), config, progress=False).history
    for history in results.values():  # a random tiny model learns slowly: ~17-19% in 12 steps
        assert history[-1]["sft"] < 0.9 * history[0]["sft"]
        # the reference is the initial model itself: zero up to float rounding (the
        # reference runs each chat alone, training pads them into batches; ~1e-14 on AMD)
        assert history[0]["kv"] == pytest.approx(0.0, abs=1e-10)
    assert results["treft"][-1]["kv"] < 0.5 * results["sft"][-1]["kv"]


def test_reference_logprobs_by_hand():
    model = tiny_model("llama")
    examples = encode_dataset(chat_tokenizer(model), TRAIN[:2])
    refs = reference_logprobs(model, examples)
    for ex, ref in zip(examples, refs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ex.input_ids]))[0]
        positions = [t for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != -100]
        assert torch.allclose(ref, logits[positions].log_softmax(-1), atol=1e-6)
        batch = collate([ex], pad_token_id=0)
        current = logits[positions]
        assert kl_to_reference(current, batch, [ref]).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_labelled_logits_are_the_full_forwards_at_the_labelled_positions(kind):
    """The unembedding runs on the labelled positions only; the oracle is the bridge's
    full forward of the padded batch, read at the positions sft_loss reads."""
    model = tiny_model(kind)
    examples = encode_dataset(chat_tokenizer(model), [*TRAIN[:2], *RETAIN[:2]])
    batch = collate(list(examples), pad_token_id=0)
    with torch.no_grad():
        full = model(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
        mine = labelled_logits(model, batch)
    (rows, pos), targets = labelled(batch.labels)
    assert mine.shape == (len(targets), full.shape[-1]) and len(set(rows.tolist())) == 4
    assert torch.allclose(mine, full[rows, pos], atol=1e-5)
    by_hand = -full[rows, pos].log_softmax(-1)[torch.arange(len(targets)), targets].mean()
    assert sft_loss(full, batch.labels).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_interleave_mixes_the_retain_share():
    examples = encode_dataset(chat_tokenizer(tiny_model("llama")), RETAIN)
    mixed = interleaved(examples, 8, FinetuneConfig(retain_ratio=0.2, seed=1))
    assert len(mixed) == 2 and all(m in examples for m in mixed)  # 2 / (8 + 2) = 20 %
    assert mixed == interleaved(examples, 8, FinetuneConfig(retain_ratio=0.2, seed=1))
    with pytest.raises(ValueError, match="needs 32 retain examples"):
        interleaved(examples, 8, FinetuneConfig(retain_ratio=0.8))
    result = finetune(
        tiny_model("llama"),
        TRAIN,
        FinetuneConfig(method="interleave", epochs=1, batch_size=2),
        retain=RETAIN,
        progress=False,
    )
    assert result.steps == 5  # (8 + 2) examples / batch 2
    with pytest.raises(ValueError, match="needs retain="):
        finetune(tiny_model("llama"), TRAIN, FinetuneConfig(method="interleave"), progress=False)


def _mean_kl(model, examples, refs):
    batch = collate(examples, pad_token_id=0)
    with torch.no_grad():
        logits = model(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    (rows, pos), _ = labelled(batch.labels)
    return kl_to_reference(logits[rows, pos], batch, refs).item()


@pytest.mark.parametrize("method", ["kl_train", "kl_retain"])
def test_kl_keeps_the_model_closer_to_its_initial_distribution(method):
    tok = chat_tokenizer(tiny_model("llama"))
    probe = encode_dataset(tok, RETAIN if method == "kl_retain" else TRAIN)
    refs = reference_logprobs(tiny_model("llama"), probe)
    kw = dict(epochs=3, batch_size=4, lora_rank=8, lr=1e-2, kl_lambda=50.0)
    sft = finetune(tiny_model("llama"), TRAIN, FinetuneConfig(method="sft", **kw), progress=False)
    kl = finetune(
        tiny_model("llama"),
        TRAIN,
        FinetuneConfig(method=method, **kw),
        retain=RETAIN,
        progress=False,
    )
    assert kl.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the model starts at its reference
    assert _mean_kl(kl.model, probe, refs) < 0.5 * _mean_kl(sft.model, probe, refs)
