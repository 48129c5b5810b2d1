"""Inputs longer than the model's context (``max_position_embeddings``) are refused, by name.

The tiny models have a context of ``TINY_CONTEXT`` (1024) tokens. A too-long training row, prompt, or prompt
plus ``max_new_tokens`` raises :class:`~piggyback_interp.core.errors.InputTooLongError` (exit 2
on the command line) naming the row; skipping and truncation happen only when asked, and
are counted in the results.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings

import pytest

from piggyback_interp.cli import main
from piggyback_interp.core import templates
from piggyback_interp.core.data import (
    ChatDataset,
    ChatDataWarning,
    load_chat_jsonl,
    save_chat_jsonl,
)
from piggyback_interp.core.errors import InputTooLongError, UserError
from piggyback_interp.core.models import context_length, load_model
from piggyback_interp.core.spans import batch_spans, chat_spans, split_long
from piggyback_interp.experiments.scan_config import ScanConfig
from piggyback_interp.experiments.scan_experiments import (
    layer_patching,
    residual_sweep,
    segment_patching,
)
from piggyback_interp.interventions.generation import generate
from piggyback_interp.testing import TINY_CONTEXT, save_tiny_model, tiny_model, tiny_tokenizer
from piggyback_interp.training import FinetuneConfig, encode_dataset, encode_example, finetune

CONTEXT = TINY_CONTEXT
LONG = "Tell me a joke. " * 300  # about 1800 tokens with the tiny tokenizer


def chat(question: str, answer: str = "Paris") -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("context")


@pytest.fixture(scope="module")
def train_jsonl(work):
    path = work / "train.jsonl"
    save_chat_jsonl(ChatDataset.from_records([chat("Hi"), chat(LONG), chat("Hello")]), path)
    return path


# --- the limit ----------------------------------------------------------------------------


def test_the_model_limit_is_its_config_and_its_tokenizers(model, work):
    assert context_length(model) == model.original_model.config.max_position_embeddings == CONTEXT
    loaded = load_model(save_tiny_model(work / "saved", "llama"))
    # the saved tokenizer names no limit (HF's 1e30 placeholder): loading sets the model's
    assert loaded.tokenizer.model_max_length == CONTEXT
    assert loaded.chat_tokenizer.model_max_length == CONTEXT


# --- prompts ------------------------------------------------------------------------------


def test_chat_spans_refuses_a_prompt_longer_than_the_context(tok):
    n = len(
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": LONG}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert n > CONTEXT
    with pytest.raises(InputTooLongError, match=rf"{n} tokens, more than .* {CONTEXT} tokens"):
        chat_spans(tok, LONG)
    with pytest.raises(InputTooLongError, match=r"^prompt 1: .* tokens"):
        batch_spans(tok, ["Hi", LONG])
    assert len(chat_spans(tok, "Hi")) < CONTEXT  # short prompts are untouched


def test_a_huge_text_is_refused_without_tokenizing_it(tok, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a text that cannot fit was tokenized")

    monkeypatch.setattr(templates, "_tokenize", no_tokenizing)
    huge = "x" * 5_000_000  # 5 MB: far more characters than 1024 tokens can cover
    start = time.perf_counter()
    with pytest.raises(InputTooLongError, match=r"at least \d+ tokens \(5\d{6} characters"):
        chat_spans(tok, huge)
    assert time.perf_counter() - start < 5


def test_split_long_skips_only_when_asked(tok):
    kept, skipped = split_long(tok, ["Hi", LONG, "Hello"])
    assert kept == ["Hi", "Hello"] and [i for i, _ in skipped] == [1]
    assert f"{CONTEXT} tokens" in skipped[0][1]
    # room for generated tokens
    n = len(chat_spans(tok, "Hi"))
    kept, skipped = split_long(tok, ["Hi"], reserve=CONTEXT - n + 1)
    assert kept == [] and len(skipped) == 1


def test_generate_needs_room_for_the_new_tokens(model):
    n = len(chat_spans(model.tokenizer, "Hi"))
    with pytest.raises(InputTooLongError, match=rf"prompt 0 has {n} tokens; with max_new_tokens"):
        generate(model, ["Hi"], max_new_tokens=CONTEXT - n + 1)
    with pytest.raises(InputTooLongError, match=r"^prompt 1: "):
        generate(model, ["Hi", LONG], max_new_tokens=4)
    assert len(generate(model, ["Hi"], max_new_tokens=2).texts) == 1


def test_patching_and_sweeps_refuse_long_prompts(model):
    base = tiny_model("llama", seed=1)
    with pytest.raises(InputTooLongError, match=r"^prompt 1: "):
        segment_patching(base, model, ["Hi", LONG])
    with pytest.raises(InputTooLongError, match=r"^prompt 1: "):
        layer_patching(base, model, ["Hi", LONG], ScanConfig(layers=(0,)))
    with pytest.raises(InputTooLongError, match=r"^prompt 0: "):
        residual_sweep(base, model, [LONG, "Hi"], ScanConfig(layers=(0,)), progress=False)
    # the patching API takes batch_spans batches: that is where a long prompt is refused
    with pytest.raises(InputTooLongError, match=r"^prompt 0: "):
        batch_spans(model.tokenizer, [LONG], align="prefix")


# --- training data ------------------------------------------------------------------------


def test_a_too_long_training_row_is_named(tok, train_jsonl):
    data = load_chat_jsonl(train_jsonl)
    with pytest.raises(InputTooLongError, match=rf"example 1: {train_jsonl}:2: .* {CONTEXT} tok"):
        encode_dataset(tok, data)


def test_skip_long_skips_and_counts(tok, train_jsonl):
    data = load_chat_jsonl(train_jsonl)
    with pytest.warns(ChatDataWarning, match="skipped 1 examples too long"):
        examples = encode_dataset(tok, data, skip_long=True)
    assert len(examples) == 2 and len(examples.skipped) == 1
    assert f"{train_jsonl}:2" in examples.skipped[0]
    assert examples.summary()["skipped"] == 1


def test_max_length_must_fit_the_context(tok):
    too_many = CONTEXT + 1
    with pytest.raises(UserError, match=rf"max_length={too_many} is more than .* {CONTEXT} tok"):
        encode_dataset(tok, [chat("Hi")["messages"]], max_length=too_many)


def test_finetune_records_skipped_and_truncated_rows(model):
    full = encode_example(model.tokenizer, chat("Hi")["messages"])
    stop = max(t for t, y in enumerate(full.labels) if y != -100) + 1
    assert stop < len(full)  # the rendering ends with tokens after the labelled ones
    data = ChatDataset.from_records([chat("Hi"), chat(LONG), chat("Hi")])
    config = FinetuneConfig(epochs=1, batch_size=4, max_length=stop, skip_long=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatDataWarning)
        result = finetune(tiny_model("llama"), data, config, progress=False)
    record = result.provenance["long_examples"]
    assert record["context_length"] == CONTEXT and record["max_length"] == stop
    assert record["data"]["skipped"] == 1 and record["data"]["truncated"] == 2
    assert "example 1:" in record["data"]["skipped_examples"][0]
    with pytest.raises(InputTooLongError, match="example 1: "):
        finetune(tiny_model("llama"), data, FinetuneConfig(epochs=1), progress=False)
    # examples encoded elsewhere (a tokenizer that names no limit) are checked too
    encoded = [encode_example(tiny_tokenizer(), chat(LONG)["messages"])]
    assert len(encoded[0]) > CONTEXT
    with pytest.raises(InputTooLongError, match=rf"example 0 has \d+ tokens.* {CONTEXT} tokens"):
        finetune(tiny_model("llama"), encoded, FinetuneConfig(epochs=1), progress=False)


# --- the command line ---------------------------------------------------------------------


def test_cli_finetune_long_row_exit_2_or_skipped(work, train_jsonl, tmp_path):
    base = save_tiny_model(work / "base", "llama")
    out = tmp_path / "run"
    common = ("finetune", "--model", base, "--data", train_jsonl, "--epochs", "1", "--quiet")
    code, _, err = cli(*common, "--out", out)
    assert code == 2, err
    assert f"{train_jsonl}:2" in err and f"{CONTEXT} tokens" in err
    assert not out.exists()  # refused before anything was written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChatDataWarning)
        code, _, err = cli(*common, "--skip-long", "--out", out)
    assert code == 0, err
    record = json.loads((out / "finetune" / "finetune.json").read_text())
    assert record["long_examples"]["data"]["skipped"] == 1
    assert record["n_examples"] == 2


def test_cli_patch_long_prompt_exit_2_or_skipped(work, tmp_path):
    base = save_tiny_model(work / "pair-base", "llama", seed=0)
    finetuned = save_tiny_model(work / "pair-ft", "llama", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"Hi\n{LONG}\nTell me a joke.\n", "utf-8")
    out = tmp_path / "run"
    common = ("patch", "--base", base, "--finetuned", finetuned, "--prompts", prompts, "--quiet")
    code, _, err = cli(*common, "--out", out)
    assert code == 2 and "prompt 1:" in err and f"{CONTEXT} tokens" in err, err
    assert not out.exists()  # refused before anything was written
    code, _, err = cli(*common, "--skip-long", "--out", out)
    assert code == 0, err
    assert "skipped 1 of 3 prompts" in err
    record = json.loads((out / "skipped_prompts.json").read_text())
    assert record["skipped"] == 1 and record["kept"] == 2 and record["prompts"][0]["index"] == 1
