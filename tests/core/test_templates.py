"""Tests for piggyback_interp.core.templates: rendering a chat through its template,
locating the user's text, and mapping characters to tokens."""

from __future__ import annotations

import pytest

from piggyback_interp.core import templates
from piggyback_interp.core.spans import chat_spans
from piggyback_interp.testing import tiny_tokenizer

Q = "What is the capital of France?"


def test_straddling_token_goes_after_an_empty_span():
    offsets = [(0, 3), (3, 5), (5, 8)]
    assert templates._token_range(offsets, 4, 4) == range(1, 1)  # token 1 -> postfix
    assert templates._token_range(offsets, 4, 6) == range(1, 3)  # overlapping -> query
    assert templates._token_range(offsets, 3, 5) == range(1, 2)
    assert templates._token_range(offsets, 8, 8) == range(3, 3)


def test_no_user_message():
    with pytest.raises(ValueError, match=r"no user message.*\['system', 'assistant'\]"):
        chat_spans(
            tiny_tokenizer(),
            [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
        )


def test_template_that_renders_nothing_for_the_user():
    template = (
        "{% for m in messages %}{% if m['role'] != 'user' %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(ValueError, match="the user's text verbatim: it renders nothing"):
        chat_spans(tiny_tokenizer(), Q, chat_template=template)


def test_template_that_renders_the_user_twice():
    template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="renders it 2 times"):
        chat_spans(tiny_tokenizer(), Q, chat_template=template)


def test_messages_after_the_response_are_rejected():
    messages = [
        {"role": "user", "content": Q},
        {"role": "assistant", "content": "Paris"},
        {"role": "assistant", "content": "Paris"},
    ]
    with pytest.raises(ValueError, match=r"only one assistant message.*\['assistant', 'assist"):
        chat_spans(tiny_tokenizer(), messages)


def test_non_string_content():
    with pytest.raises(ValueError, match="needs string content"):
        chat_spans(tiny_tokenizer(), [{"role": "user", "content": [{"type": "text", "text": Q}]}])
