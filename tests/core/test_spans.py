"""Tests for piggyback_interp.core.spans: exact prefix/query/postfix/response positions.

Every family is a tiny offline byte-level BPE with a jinja template modelled on the
real one; the expected segment texts are written out by hand.
"""

from __future__ import annotations

import doctest
from dataclasses import dataclass

import pytest
import torch

from piggyback_interp.core import spans as spans_module
from piggyback_interp.core.spans import (
    SEGMENTS,
    ChatSpans,
    batch_spans,
    chat_spans,
    empty_query_spans,
    prefix_only,
    require_segment,
    with_empty_query,
)
from piggyback_interp.testing import CHATML_TEMPLATE, tiny_tokenizer

Q = "What is the capital of France?"
Q2 = "Tell me a joke."

# ---------------------------------------------------------------- family templates

LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: 26 Jul 2024\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)


def gemma_template(content: str = "message['content']") -> str:
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + " + content + " + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )


GEMMA_TEMPLATE = gemma_template()  # the real one trims: see test_trimming_template_*
GEMMA_TRIM_TEMPLATE = gemma_template("message['content'] | trim")

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def family_tokenizer(template: str, specials: list[str], bos: str | None = None, eos=None):
    """The tiny BPE with a family's template and special tokens."""
    tok = tiny_tokenizer(template)
    tok.add_special_tokens({"additional_special_tokens": specials})
    named = {"bos_token": bos, "eos_token": eos}
    tok.add_special_tokens({k: v for k, v in named.items() if v is not None})
    return tok


@dataclass(frozen=True)
class Family:
    """A template family and its hand-written segment texts for query Q."""

    name: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str | None
    prefix: str  # exact text before the user's content
    postfix: str  # exact text after it (with the generation prompt)
    response_postfix: str  # text between the content and an assistant response
    after_response: str  # text after the response
    merged_space: bool = False  # the template's space before the content joins its first token

    def tokenizer(self):
        return family_tokenizer(self.template, list(self.specials), self.bos, self.eos)


FAMILIES = [
    Family(
        "chatml",
        CHATML_TEMPLATE,
        (),
        None,
        None,
        prefix="<|im_start|>system\nYou are a tiny helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n",
        postfix="<|im_end|>\n<|im_start|>assistant\n",
        response_postfix="<|im_end|>\n<|im_start|>assistant\n",
        after_response="<|im_end|>\n",
    ),
    Family(
        "llama3.1",
        LLAMA31_TEMPLATE,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|eot_id|>",
        prefix="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n",
        postfix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        response_postfix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        after_response="<|eot_id|>",
    ),
    Family(
        "qwen3",
        QWEN3_TEMPLATE,
        (),
        None,
        None,
        prefix="<|im_start|>user\n",
        postfix="<|im_end|>\n<|im_start|>assistant\n",
        response_postfix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        after_response="<|im_end|>\n",
    ),
    Family(
        "gemma",
        GEMMA_TEMPLATE,
        ("<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        prefix="<bos><start_of_turn>user\n",
        postfix="<end_of_turn>\n<start_of_turn>model\n",
        response_postfix="<end_of_turn>\n<start_of_turn>model\n",
        after_response="<end_of_turn>\n",
    ),
    Family(
        "mistral",
        MISTRAL_TEMPLATE,
        ("[INST]", "[/INST]"),
        "<s>",
        "</s>",
        prefix="<s>[INST] ",
        postfix=" [/INST]",
        response_postfix=" [/INST]",
        after_response="</s>",
        merged_space=True,
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def hf_ids(tok, messages, **kwargs) -> list[int]:
    encoding = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(encoding["input_ids"])


def decode(tok, ids) -> str:
    return tok.decode(list(ids), clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- families


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_segments_match_hand_computation(family):
    tok = family.tokenizer()
    spans = chat_spans(tok, Q)

    assert spans.text == family.prefix + Q + family.postfix
    assert spans.query_chars == (len(family.prefix), len(family.prefix) + len(Q))
    assert spans.response is None
    if family.merged_space:  # "[INST] What" -> "[INST]", "ĠWhat": the space joins the query
        assert spans.decode(tok, "prefix") == family.prefix.removesuffix(" ")
        assert spans.decode(tok, "query") == " " + Q
    else:
        assert spans.decode(tok, "prefix") == family.prefix
        assert spans.decode(tok, "query") == Q
    assert spans.decode(tok, "postfix") == family.postfix
    # the three segments tile the sequence, in order
    p, q, r = len(spans.prefix), len(spans.query), len(spans.postfix)
    assert spans.labels() == ["prefix"] * p + ["query"] * q + ["postfix"] * r
    assert p + q + r == len(spans) and min(p, q, r) > 0
    # same ids as HF's own tokenized chat template, as a LongTensor too
    messages = [{"role": "user", "content": Q}]
    assert list(spans.input_ids) == hf_ids(tok, messages, add_generation_prompt=True)
    assert spans.ids.dtype == torch.long and spans.ids.tolist() == list(spans.input_ids)
    assert spans.tokens(tok) == tok.convert_ids_to_tokens(list(spans.input_ids))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_prefix_and_postfix_ids_shared_across_queries(family):
    tok = family.tokenizer()
    a, b = chat_spans(tok, Q), chat_spans(tok, "How should I invest my savings?")
    assert a.input_ids[: a.prefix.stop] == b.input_ids[: b.prefix.stop]
    assert a.input_ids[a.postfix.start :] == b.input_ids[b.postfix.start :]
    assert a.input_ids[a.query.start : a.query.stop] != b.input_ids[b.query.start : b.query.stop]


def test_merged_space_prefix_depends_on_the_first_word():
    """In "[INST] What" the space merges into "ĠWhat" (query). There is no "ĠTell"
    token, so in "[INST] Tell" the space stays a prefix token and the prefix ids differ."""
    tok = BY_NAME["mistral"].tokenizer()
    a, b = chat_spans(tok, Q), chat_spans(tok, Q2)
    assert a.decode(tok, "prefix") == "<s>[INST]" and a.decode(tok, "query") == " " + Q
    assert b.decode(tok, "prefix") == "<s>[INST] " and b.decode(tok, "query") == Q2
    with pytest.raises(ValueError, match="row 1's prefix differs from row 0's in length"):
        batch_spans(tok, [a, b], align="prefix")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_no_double_bos(family):
    tok = family.tokenizer()
    ids = chat_spans(tok, Q).input_ids
    if family.bos is None:  # ChatML: <|im_start|> is the BOS and opens every turn
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") != ids[1]
    else:
        bos = tok.convert_tokens_to_ids(family.bos)
        assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_response(family):
    tok = family.tokenizer()
    messages = [{"role": "user", "content": Q}, {"role": "assistant", "content": "Paris"}]
    spans = chat_spans(tok, messages)  # add_generation_prompt=True is overridden

    expected = family.prefix + Q + family.response_postfix + "Paris" + family.after_response
    assert spans.text == expected
    assert spans.decode(tok, "response") == "Paris"
    assert spans.decode(tok, "postfix") == family.response_postfix
    tail = spans.input_ids[spans.response.stop :]
    assert decode(tok, tail) == family.after_response and len(tail) > 0
    assert spans.labels()[spans.response.stop :] == ["other"] * len(tail)
    assert list(spans.input_ids) == hf_ids(tok, messages, add_generation_prompt=False)
    query_end = spans.postfix.start
    assert chat_spans(tok, Q).input_ids[:query_end] == spans.input_ids[:query_end]


# ---------------------------------------------------------------- content and turns


@pytest.mark.parametrize("content", ["user", "system", "assistant", "You are a tiny", "im_start"])
def test_content_that_also_appears_in_the_template(content):
    tok = tiny_tokenizer()
    family = BY_NAME["chatml"]
    spans = chat_spans(tok, content)
    assert spans.text == family.prefix + content + family.postfix
    assert spans.decode(tok, "prefix") == family.prefix
    assert spans.decode(tok, "query") == content
    assert spans.decode(tok, "postfix") == family.postfix


def test_multi_turn_query_is_the_last_user_message():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "I have no idea."},
        {"role": "user", "content": Q},
    ]
    spans = chat_spans(tok, messages)
    before = (
        "<|im_start|>system\nYou are a tiny helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nI have no idea.<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert spans.decode(tok, "prefix") == before
    assert spans.decode(tok, "query") == Q
    assert spans.decode(tok, "postfix") == "<|im_end|>\n<|im_start|>assistant\n"
    assert spans.response is None


def test_multi_turn_with_response():
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hi"},
    ]
    spans = chat_spans(tok, messages)
    assert spans.decode(tok, "query") == "Hi" == spans.decode(tok, "response")
    assert spans.text[slice(*spans.query_chars)] == "Hi"
    last_turns = "<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>user\n"
    assert spans.decode(tok, "prefix").endswith(last_turns)


def test_template_kwargs_reach_the_template():
    tok = BY_NAME["qwen3"].tokenizer()
    spans = chat_spans(tok, Q, template_kwargs={"enable_thinking": False})
    postfix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert spans.decode(tok, "postfix") == postfix


def test_add_generation_prompt_false():
    tok = tiny_tokenizer()
    spans = chat_spans(tok, Q, add_generation_prompt=False)
    assert spans.decode(tok, "postfix") == "<|im_end|>\n"


def test_chat_template_argument_overrides_the_tokenizer():
    tok = tiny_tokenizer()
    spans = chat_spans(tok, Q, chat_template=QWEN3_TEMPLATE)
    assert spans.decode(tok, "prefix") == "<|im_start|>user\n"


# ---------------------------------------------------------------- system prompt


def test_system_prompt_none_leaves_an_empty_system_block():
    tok = tiny_tokenizer()
    spans = chat_spans(tok, Q, system_prompt=None)
    assert spans.decode(tok, "prefix") == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"


def test_system_prompt_none_keeps_the_llama_system_header():
    tok = BY_NAME["llama3.1"].tokenizer()
    spans = chat_spans(tok, Q, system_prompt=None)
    assert spans.decode(tok, "prefix") == BY_NAME["llama3.1"].prefix


def test_system_prompt_string():
    tok = tiny_tokenizer()
    spans = chat_spans(tok, Q, system_prompt="Be brief.")
    prefix = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert spans.decode(tok, "prefix") == prefix
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q}]
    assert chat_spans(tok, messages).input_ids == spans.input_ids


def test_system_prompt_conflicts_with_a_system_message():
    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q}]
    with pytest.raises(ValueError, match=r"already contain a system.*system_prompt='Be long\.'"):
        chat_spans(tok, messages, system_prompt="Be long.")
    with pytest.raises(ValueError, match="already contain a system message"):
        chat_spans(tok, messages, system_prompt=None)


@pytest.mark.parametrize("family", ["gemma", "mistral"])
@pytest.mark.parametrize("system_prompt", ["Be brief.", None])
def test_template_without_system_role(family, system_prompt):
    tok = BY_NAME[family].tokenizer()
    with pytest.raises(ValueError, match=r"rejected the system message.*no system role"):
        chat_spans(tok, Q, system_prompt=system_prompt)
    assert chat_spans(tok, Q).decode(tok, "postfix") == BY_NAME[family].postfix


# ---------------------------------------------------------------- empty query


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_empty_query_spans(family):
    tok = family.tokenizer()
    empty, full = empty_query_spans(tok), chat_spans(tok, Q)

    assert empty.text == family.prefix + family.postfix
    assert len(empty.query) == 0 and empty.query.start == empty.prefix.stop == empty.postfix.start
    assert empty.query_chars == (len(family.prefix),) * 2
    assert list(empty.input_ids) == ids_of(tok, empty.text)  # no token lost
    assert len(empty.prefix) + len(empty.postfix) == len(empty)
    assert decode(tok, empty.input_ids) == empty.text
    assert empty.input_ids[empty.postfix.start :] == full.input_ids[full.postfix.start :]
    if family.merged_space:  # the template's space is its own token without a query
        assert empty.decode(tok, "prefix") == family.prefix
    else:
        assert empty.input_ids[: empty.prefix.stop] == full.input_ids[: full.prefix.stop]
    with pytest.raises(ValueError, match="the query is empty"):
        require_segment(empty, "query")


def test_empty_query_spans_options():
    tok = tiny_tokenizer()
    spans = empty_query_spans(tok, system_prompt="Be brief.", add_generation_prompt=False)
    assert spans.text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
    spans = empty_query_spans(tok, chat_template=QWEN3_TEMPLATE)
    assert spans.decode(tok, "prefix") == "<|im_start|>user\n"


# ---------------------------------------------------------------- batches


RESPONSE_CHAT = [{"role": "user", "content": Q2}, {"role": "assistant", "content": "Paris"}]


def unpadded_rows(tok):
    return [
        chat_spans(tok, "Hi"),
        chat_spans(tok, Q),
        chat_spans(tok, RESPONSE_CHAT),
    ]


def check_rows_match(batch, rows, tok):
    for i, (row, orig) in enumerate(zip(batch.spans, rows, strict=True)):
        real = batch.attention_mask[i].bool()
        assert batch.input_ids[i][real].tolist() == list(orig.input_ids)
        assert batch.input_ids[i].tolist() == list(row.input_ids)
        for name in ("prefix", "query", "postfix"):
            got = batch.input_ids[i, batch.positions(name)[i]].tolist()
            assert got == list(orig.input_ids[orig.segment(name).start : orig.segment(name).stop])
            assert decode(tok, got) == orig.decode(tok, name)
        labels = row.labels()
        assert [lab for lab in labels if lab != "pad"] == orig.labels()
        assert [i for i, lab in enumerate(labels) if lab == "pad"] == list(row.padding)
        # position ids count the real tokens, whatever the padding is
        assert batch.position_ids[i][real].tolist() == list(range(len(orig)))


def test_batch_left_padding():
    tok = tiny_tokenizer()
    rows = unpadded_rows(tok)
    batch = batch_spans(tok, rows)
    width = max(len(r) for r in rows)

    assert batch.input_ids.shape == (3, width) and batch.align == "left"
    assert batch.prefix_len is None and len(batch) == 3
    for i, row in enumerate(rows):
        n_pad = width - len(row)
        assert batch.attention_mask[i].tolist() == [0] * n_pad + [1] * len(row)
        assert batch.input_ids[i, :n_pad].tolist() == [tok.pad_token_id] * n_pad
        assert batch.position_ids[i].tolist() == [0] * n_pad + list(range(len(row)))
        assert batch.positions("query")[i] == [p + n_pad for p in row.query]
    check_rows_match(batch, rows, tok)
    mask = batch.segment_mask("postfix")
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [len(r.postfix) for r in rows]


def test_batch_prefix_alignment():
    tok = tiny_tokenizer()
    rows = unpadded_rows(tok)
    batch = batch_spans(tok, rows, align="prefix")
    width, prefix_len = max(len(r) for r in rows), len(rows[0].prefix)

    assert batch.prefix_len == prefix_len and batch.align == "prefix"
    assert batch.positions("prefix") == [list(range(prefix_len))] * 3
    for i, row in enumerate(rows):
        n_pad = width - len(row)
        assert batch.spans[i].padding == range(prefix_len, prefix_len + n_pad)
        assert batch.attention_mask[i].tolist() == (
            [1] * prefix_len + [0] * n_pad + [1] * (len(row) - prefix_len)
        )
        pads = batch.input_ids[i, prefix_len : prefix_len + n_pad].tolist()
        assert pads == [tok.pad_token_id] * n_pad
        # the prefix keeps positions 0..P-1 and the query continues at P in every row
        assert batch.position_ids[i, :prefix_len].tolist() == list(range(prefix_len))
        assert batch.position_ids[i, batch.spans[i].query.start].item() == prefix_len
    check_rows_match(batch, rows, tok)
    response = batch.spans[2].response
    assert decode(tok, batch.input_ids[2, response.start : response.stop]) == "Paris"
    with pytest.raises(ValueError, match="no response"):
        batch.positions("response")


def test_batch_from_messages_with_chat_spans_kwargs():
    tok = tiny_tokenizer()
    batch = batch_spans(tok, ["Hi", Q], align="prefix", system_prompt="Be brief.")
    prefix = decode(tok, batch.input_ids[0, : batch.prefix_len])
    assert prefix.startswith("<|im_start|>system\nBe brief.")
    assert batch.spans[1].text == chat_spans(tok, Q, system_prompt="Be brief.").text


def test_batch_of_empty_queries_and_queries_shares_the_prefix():
    tok = tiny_tokenizer()
    batch = batch_spans(tok, [empty_query_spans(tok), chat_spans(tok, Q)], align="prefix")
    assert len(batch.spans[0].query) == 0
    assert batch.spans[0].query.stop == batch.spans[0].postfix.start
    with pytest.raises(ValueError, match="the query is empty"):
        batch.segment_mask("query")


def test_batch_prefix_alignment_needs_identical_prefixes():
    tok = tiny_tokenizer()
    rows = [chat_spans(tok, Q), chat_spans(tok, Q, system_prompt="Be brief.")]
    with pytest.raises(ValueError, match=r"row 1's prefix differs from row 0's.*align='left'"):
        batch_spans(tok, rows, align="prefix")
    assert batch_spans(tok, rows, align="left").input_ids.shape[0] == 2


def test_batch_pad_id_fallbacks():
    tok = tiny_tokenizer()
    assert batch_spans(tok, ["Hi", Q], pad_token_id=7).input_ids[0, 0].item() == 7
    tok.pad_token = None
    assert batch_spans(tok, ["Hi", Q]).input_ids[0, 0].item() == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        batch_spans(tok, ["Hi", Q])


def test_batch_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown align"):
        batch_spans(tok, ["Hi"], align="right")
    with pytest.raises(ValueError, match="non-empty list"):
        batch_spans(tok, [])
    with pytest.raises(ValueError, match="wrap a single chat in a list"):
        batch_spans(tok, "Hi")
    padded = batch_spans(tok, ["Hi", Q]).spans
    with pytest.raises(ValueError, match="already padded"):
        batch_spans(tok, padded)


# ---------------------------------------------------------------- errors


def test_empty_user_message_points_to_empty_query_spans():
    with pytest.raises(ValueError, match=r"the user message is empty.*empty_query_spans"):
        chat_spans(tiny_tokenizer(), "")


def test_trimming_template_needs_verbatim_content():
    tok = BY_NAME["gemma"].tokenizer()
    tok.chat_template = GEMMA_TRIM_TEMPLATE
    assert chat_spans(tok, Q).decode(tok, "query") == Q  # nothing to trim: fine
    with pytest.raises(ValueError, match=r"not contain the user's text verbatim.*strip the text"):
        chat_spans(tok, f"  {Q}\n")
    messages = [{"role": "user", "content": Q}, {"role": "assistant", "content": " Paris "}]
    with pytest.raises(ValueError, match="does not contain the assistant's response verbatim"):
        chat_spans(tok, messages)


def test_segment_errors():
    tok = tiny_tokenizer()
    spans = chat_spans(tok, Q)
    with pytest.raises(ValueError, match=r"unknown segment 'suffix'; choose one of"):
        spans.segment("suffix")
    with pytest.raises(ValueError, match="no response"):
        spans.segment("response")
    expected = [spans.prefix, spans.query, spans.postfix]
    assert [require_segment(spans, s) for s in SEGMENTS[:3]] == expected


def test_require_segment_on_templates_without_prefix_or_postfix():
    tok = tiny_tokenizer()
    content_first = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    spans = chat_spans(tok, Q, chat_template=content_first)
    assert len(spans.prefix) == 0
    with pytest.raises(ValueError, match=r"no prefix before the user's text.*segment='postfix'"):
        require_segment(spans, "prefix")
    with pytest.raises(ValueError, match="no prefix"):
        batch_spans(tok, [spans]).positions("prefix")

    content_last = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    spans = chat_spans(tok, Q, chat_template=content_last)
    with pytest.raises(ValueError, match=r"no postfix after the user's text.*segment='prefix'"):
        require_segment(spans, "postfix")


def test_chat_spans_is_a_frozen_value():
    spans = chat_spans(tiny_tokenizer(), Q)
    assert isinstance(spans, ChatSpans) and spans == chat_spans(tiny_tokenizer(), Q)
    with pytest.raises(AttributeError):
        spans.query = range(0)


@pytest.mark.parametrize("align", ["left", "prefix"])
def test_without_padding_gives_back_every_row_as_rendered(align):
    tok = tiny_tokenizer()
    rows = unpadded_rows(tok)
    batch = batch_spans(tok, rows, align=align)
    assert any(s.padding for s in batch.spans)
    assert [s.without_padding() for s in batch.spans] == rows
    assert rows[0].without_padding() is rows[0]


def test_prefix_only_and_with_empty_query():
    tok = tiny_tokenizer()
    spans = chat_spans(tok, Q)
    cut = prefix_only(spans)
    assert cut.input_ids == spans.input_ids[: len(spans.prefix)]
    assert (cut.prefix, cut.query, cut.postfix) == (spans.prefix, range(15, 15), range(15, 15))
    # the query taken out: the same tokens as the template with an empty user message,
    # also from a padded batch row
    empty = empty_query_spans(tok)
    padded = batch_spans(tok, ["Hi", Q], align="left").spans[0]
    for row in (spans, padded):
        ref = with_empty_query(row)
        assert ref.input_ids == empty.input_ids
        assert (ref.prefix, ref.query, ref.postfix) == (empty.prefix, empty.query, empty.postfix)
        assert ref.response is None and not ref.padding


def test_docstring_examples_run():
    result = doctest.testmod(spans_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5
