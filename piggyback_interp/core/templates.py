"""Rendering a chat through its template, and mapping the user's text to tokens.

The steps under :func:`~piggyback_interp.core.spans.chat_spans`: the messages are
normalised (:func:`as_messages`, :func:`with_system_prompt`, :func:`query_and_response`),
rendered by the tokenizer's chat template, the user's text located in the rendering with
a sentinel (the template must render it verbatim), and its characters mapped to tokens
through the tokenizer's offsets (:func:`locate_segments`). Every rendering is checked
against the model's context (:func:`context_limit`) before and after tokenizing.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from piggyback_interp.core.errors import InputTooLongError, UserError

Messages = str | Sequence[Mapping[str, Any]]

# Hugging Face's model_max_length when a tokenizer names no limit is int(1e30)
_NO_LIMIT = 10**12


def context_limit(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens a rendering may have: the tokenizer's ``model_max_length``.

    A model loaded by this toolkit sets it to its context (``max_position_embeddings``);
    ``None`` when the tokenizer names no limit (Hugging Face's ``int(1e30)`` placeholder).

    Example:
        >>> from piggyback_interp.testing import tiny_model, tiny_tokenizer
        >>> context_limit(tiny_model("llama").tokenizer), context_limit(tiny_tokenizer())
        (1024, None)
    """
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def _too_long(size: str, limit: int) -> str:
    return (
        f"the chat renders to {size}, more than the model's context of {limit} tokens "
        "(max_position_embeddings); shorten it, or skip what does not fit (--skip-long on "
        "the command line; in Python skip_long=True for training data, split_long for prompts)"
    )


def check_tokens(n: int, limit: int | None) -> None:
    if limit is not None and n > limit:
        raise InputTooLongError(_too_long(f"{n} tokens", limit))


def check_characters(tokenizer: PreTrainedTokenizerBase, text: str, limit: int | None) -> None:
    """Refuse, without tokenizing it, a text too long for ``limit`` tokens by its length alone.

    A token covers at most as many characters of the text as its vocabulary entry has
    characters (a byte-level BPE entry has one per byte, a SentencePiece piece one per
    character), so a text longer than ``limit`` times the longest entry has more than
    ``limit`` tokens. A 50 MB training row is then refused at once, not tokenized first.
    """
    if limit is None or len(text) <= limit:
        return
    widest = _widest_token(tokenizer, len(tokenizer))
    if len(text) > limit * widest:
        at_least = math.ceil(len(text) / widest)
        size = f"at least {at_least} tokens ({len(text)} characters, at most {widest} per token)"
        raise InputTooLongError(_too_long(size, limit))


@functools.lru_cache(maxsize=8)
def _widest_token(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """The longest vocabulary entry in characters (cached per tokenizer and vocabulary size)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


# --- messages -------------------------------------------------------------------------


def as_messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(message) for message in messages]


def with_system_prompt(
    messages: list[dict[str, Any]], system_prompt: str | None
) -> list[dict[str, Any]]:
    if system_prompt == "default":
        return messages
    existing = [m for m in messages if m.get("role") == "system"]
    if existing:
        raise UserError(
            f"messages already contain a system message ({existing[0].get('content')!r}) and "
            f"system_prompt={system_prompt!r} was given; drop one of them (system_prompt="
            "'default' keeps the messages' own system message)"
        )
    return [{"role": "system", "content": system_prompt or ""}, *messages]


def query_and_response(messages: list[dict[str, Any]]) -> tuple[int, int | None]:
    """Index of the last user message and of the assistant message after it (or None)."""
    roles = [m.get("role") for m in messages]
    if "user" not in roles:
        raise UserError(f"no user message among the messages (roles {roles}); add one")
    q_idx = len(roles) - 1 - roles[::-1].index("user")
    after = roles[q_idx + 1 :]
    if after not in ([], ["assistant"]):
        raise UserError(
            f"after the last user message only one assistant message (the response) may "
            f"follow, got roles {after}; cut the conversation there"
        )
    for idx in (q_idx, q_idx + 1 if after else None):
        if idx is not None and not isinstance(messages[idx].get("content"), str):
            raise UserError(f"message {idx} needs string content, got {messages[idx]!r}")
    return q_idx, (q_idx + 1 if after else None)


# --- rendering ------------------------------------------------------------------------


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    chat_template: str | None,
    template_kwargs: Mapping[str, Any] | None,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            **(template_kwargs or {}),
        )
    except TemplateError as err:
        if messages[0].get("role") == "system":
            raise UserError(
                f"the chat template rejected the system message ({err}); this template "
                "probably has no system role: use system_prompt='default' and put any "
                "instructions into the user message"
            ) from err
        raise UserError(f"the chat template failed to render these messages: {err}") from err


def _locate(
    render: Any, messages: list[dict[str, Any]], idx: int, text: str, what: str
) -> tuple[int, int]:
    """Character span of message ``idx``'s content in ``text``, found with a sentinel."""
    sentinel = f"PIGGYBACKSENTINEL{uuid.uuid4().hex.upper()}"
    marked = [dict(m) for m in messages]
    marked[idx]["content"] = sentinel
    skeleton = render(marked)
    count = skeleton.count(sentinel)
    if count != 1:
        renders = "nothing for it" if count == 0 else f"it {count} times"
        raise UserError(
            f"the chat template does not contain the {what} verbatim: it renders {renders}, "
            "chat_spans needs it exactly once (does the template render this role?)"
        )
    before, after = skeleton.split(sentinel)
    content = messages[idx]["content"]
    if text != before + content + after:
        raise UserError(
            f"the chat template does not contain the {what} verbatim: it changes it (e.g. "
            "Gemma's and Llama-3's `| trim` strip surrounding whitespace); strip the text "
            "yourself, or pass a chat_template that renders the content unchanged"
        )
    return len(before), len(before) + len(content)


def locate_segments(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    q_idx: int,
    r_idx: int | None,
    **render_kwargs: Any,
) -> dict[str, Any]:
    """Render ``messages``, check it fits :func:`context_limit`, tokenize it, and find the
    token ranges of message ``q_idx`` (the query) and ``r_idx`` (the response, if any):
    the fields of a :class:`~piggyback_interp.core.spans.ChatSpans`."""

    def render(msgs: list[dict[str, Any]]) -> str:
        return _render(tokenizer, msgs, **render_kwargs)

    text = render(messages)
    limit = context_limit(tokenizer)
    check_characters(tokenizer, text, limit)
    q_chars = _locate(render, messages, q_idx, text, "user's text")
    ids, offsets = _tokenize(tokenizer, text)
    check_tokens(len(ids), limit)
    query = _token_range(offsets, *q_chars)
    end = len(ids)
    response = None
    if r_idx is not None:
        r_chars = _locate(render, messages, r_idx, text, "assistant's response")
        response = _token_range(offsets, *r_chars)
        if response.start < query.stop:
            raise ValueError("a token spans both the user's text and the response; cannot split")
        end = response.start
    return {
        "input_ids": tuple(ids),
        "prefix": range(0, query.start),
        "query": query,
        "postfix": range(query.stop, end),
        "response": response,
        "text": text,
        "query_chars": q_chars,
    }


# --- tokens ---------------------------------------------------------------------------


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (the template renders BOS itself)."""
    try:
        encoding = tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
    except NotImplementedError as err:
        raise ValueError("chat_spans needs a fast tokenizer (one with character offsets)") from err
    ids = [int(i) for i in encoding["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in encoding["offset_mapping"]]
    _check_offsets(text, offsets)
    return ids, offsets


def _check_offsets(text: str, offsets: list[tuple[int, int]]) -> None:
    """The tokens must cover the text in order (gaps may only be whitespace)."""
    covered = [False] * len(text)
    previous = 0
    for start, end in offsets:
        if start < previous:
            raise ValueError("the tokenizer's offsets go backwards; cannot map text to tokens")
        previous = start
        covered[start:end] = [True] * (end - start)
    lost = [i for i, c in enumerate(covered) if not c and not text[i].isspace()]
    if lost:
        raise ValueError(
            f"the tokenization does not reproduce the rendered text: character {lost[0]} "
            f"({text[lost[0]]!r}) is in no token (does the tokenizer normalize text away?)"
        )


def _token_range(offsets: list[tuple[int, int]], start: int, end: int) -> range:
    """The tokens overlapping characters ``[start, end)``; empty at ``start`` if ``start == end``.

    A token straddling ``start`` is inside; for an empty span it is left after it.
    """
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(offsets))
    if end == start:
        return range(first, first)
    stop = next((i for i in range(first, len(offsets)) if offsets[i][0] >= end), len(offsets))
    return range(first, stop)


def pad_id(tokenizer: PreTrainedTokenizerBase, pad_token_id: int | None) -> int:
    """``pad_token_id``, else the tokenizer's pad token, else its eos token."""
    for candidate in (pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_token_id=")
