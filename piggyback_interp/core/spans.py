"""Exact token positions of the chat-template segments around a user's query.

A rendered chat prompt splits into four segments:

* ``prefix``: the template tokens before the user's text (BOS, system block, earlier
  turns, the user header). Identical for every query of a conversation layout.
* ``query``: the tokens of the user's text (the last user message).
* ``postfix``: the template tokens after the user's text (end of turn, assistant
  header), also shared by every query.
* ``response``: the tokens of an assistant message after the query, if one is given.

Positions come from the rendered template and the tokenizer's character offsets,
never from per-model tables, so any chat template that renders the user's text
verbatim works.

No rendering may be longer than the model's context: :func:`chat_spans` raises
:class:`~piggyback_interp.core.errors.InputTooLongError` when it has more tokens than the
tokenizer's ``model_max_length``, which :func:`~piggyback_interp.core.models.load_model` sets
to the model's ``max_position_embeddings`` (see :func:`~piggyback_interp.core.templates.context_limit`).
:func:`split_long` drops the prompts that do not fit, when that is wanted.

Example:
    >>> from piggyback_interp.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> spans = chat_spans(tok, "What is the capital of France?")
    >>> spans.decode(tok, "query")
    'What is the capital of France?'
    >>> spans.decode(tok, "postfix")
    '<|im_end|>\\n<|im_start|>assistant\\n'
    >>> batch = batch_spans(tok, ["Hi", "What is the capital of France?"], align="prefix")
    >>> batch.prefix_len == len(spans.prefix)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from piggyback_interp.core import templates
from piggyback_interp.core.errors import InputTooLongError, UserError

Segment = Literal["prefix", "query", "postfix", "response"]
SEGMENTS: tuple[Segment, ...] = ("prefix", "query", "postfix", "response")
Align = Literal["left", "prefix"]
ALIGNS: tuple[Align, ...] = ("left", "prefix")


_EMPTY_SEGMENT_HINTS = {
    "prefix": "this chat template has no prefix before the user's text (it renders the "
    "user's text first); use segment='postfix'",
    "query": "the query is empty (spans from empty_query_spans keep only its position); "
    "use chat_spans with a non-empty user message",
    "postfix": "this chat template has no postfix after the user's text (nothing is "
    "rendered after it); use segment='prefix', or render with add_generation_prompt=True",
    "response": "the response is empty (the assistant message has empty content); "
    "give the assistant message some text",
}


@dataclass(frozen=True)
class ChatSpans:
    """One rendered chat prompt, its token ids and the position range of each segment.

    Ranges index ``input_ids``. Positions in no segment (e.g. the end-of-turn token
    after a response) are labelled ``"other"``; ``padding`` is only non-empty for
    the rows of a :class:`ChatBatch` (``input_ids`` is then the padded row, while
    ``text`` and ``query_chars`` still describe the unpadded rendering).

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> spans = chat_spans(tok, "Tell me a joke.")
        >>> spans.labels()[spans.query.start]
        'query'
        >>> spans.text[slice(*spans.query_chars)]
        'Tell me a joke.'
    """

    input_ids: tuple[int, ...]
    prefix: range
    query: range
    postfix: range
    response: range | None
    text: str
    query_chars: tuple[int, int]
    padding: range = range(0)

    @property
    def ids(self) -> Int[Tensor, " pos"]:
        """``input_ids`` as a 1-D LongTensor."""
        return torch.tensor(self.input_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def segment(self, name: str) -> range:
        """The position range of segment ``name`` (may be empty; see :func:`require_segment`)."""
        if name not in SEGMENTS:
            raise ValueError(f"unknown segment {name!r}; choose one of {SEGMENTS}")
        span = getattr(self, name)
        if span is None:
            raise ValueError(
                "these spans have no response: pass messages that end with an assistant "
                "message after the last user message, e.g. "
                "[{'role': 'user', ...}, {'role': 'assistant', 'content': ...}]"
            )
        return span

    def labels(self) -> list[str]:
        """The segment name of every position: a segment, ``"pad"`` or ``"other"``."""
        labels = ["other"] * len(self)
        named = [("pad", self.padding), *((name, getattr(self, name)) for name in SEGMENTS)]
        for name, span in named:
            for pos in span or ():
                labels[pos] = name
        return labels

    def tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The token strings of ``input_ids`` (as ``convert_ids_to_tokens`` gives them)."""
        return tokenizer.convert_ids_to_tokens(list(self.input_ids))

    def decode(self, tokenizer: PreTrainedTokenizerBase, segment: str | None = None) -> str:
        """The text of one segment's tokens (of all tokens when ``segment`` is None)."""
        span = range(len(self)) if segment is None else self.segment(segment)
        ids = list(self.input_ids[span.start : span.stop])
        return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def with_padding(self, n: int, pad_token_id: int, *, after_prefix: bool = False) -> ChatSpans:
        """Insert ``n`` pad tokens at the start (or after the prefix) and move the ranges."""
        if self.padding:
            raise ValueError("these spans are already padded; pad the unpadded spans instead")
        at = self.prefix.stop if after_prefix else 0
        ids = self.input_ids
        return replace(
            self,
            input_ids=ids[:at] + (pad_token_id,) * n + ids[at:],
            prefix=self.prefix if after_prefix else _shift(self.prefix, n),
            query=_shift(self.query, n),
            postfix=_shift(self.postfix, n),
            response=_shift(self.response, n),
            padding=range(at, at + n),
        )

    def without_padding(self) -> ChatSpans:
        """The spans of a padded batch row without its padding (itself when unpadded)."""
        pad = self.padding
        if not pad:
            return self

        def move(span: range | None) -> range | None:
            return span if span is None or span.start < pad.stop else _shift(span, -len(pad))

        ids = self.input_ids
        return replace(
            self,
            input_ids=ids[: pad.start] + ids[pad.stop :],
            prefix=move(self.prefix),
            query=move(self.query),
            postfix=move(self.postfix),
            response=move(self.response),
            padding=range(0),
        )


def _shift(span: range | None, by: int) -> range | None:
    return None if span is None else range(span.start + by, span.stop + by)


def require_segment(spans: ChatSpans, name: str) -> range:
    """``spans.segment(name)``, raising a clear error when that segment is empty.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> require_segment(chat_spans(tok, "Hi"), "postfix")
        range(17, 25)
        >>> require_segment(empty_query_spans(tok), "query")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the query is empty ...
    """
    span = spans.segment(name)
    if len(span) == 0:
        raise ValueError(_EMPTY_SEGMENT_HINTS[name])
    return span


def chat_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: templates.Messages,
    *,
    system_prompt: str | None = "default",
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> ChatSpans:
    """Render a chat and find the token positions of its prefix, query, postfix and response.

    Args:
        tokenizer: a fast tokenizer (character offsets are needed) with a chat template.
        messages: one user message as a string, or ``{"role", "content"}`` dicts. The query
            is the last user message; an assistant message right after it is the response
            (then the generation prompt is not added: the template's loop renders the
            assistant header itself).
        system_prompt: ``"default"`` keeps the template's own default; ``None`` passes an
            empty system message (the template's system header may remain); a string
            passes a system message with that text.
        add_generation_prompt: append the assistant header (ignored with a response).
        chat_template: a jinja template overriding the tokenizer's.
        template_kwargs: extra template variables, e.g. ``{"enable_thinking": False}``.

    A token that merges template text with the user's text (``[INST] What`` as one
    token ``▁What``) counts as query.

    Raises :class:`~piggyback_interp.core.errors.InputTooLongError` when the rendering has more
    tokens than :func:`~piggyback_interp.core.templates.context_limit` (the model's context); a text that cannot fit by
    its length alone is refused before it is tokenized.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> spans = chat_spans(tok, "Hi", system_prompt=None)
        >>> spans.decode(tok, "prefix")
        '<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n'
    """
    conversation = templates.with_system_prompt(templates.as_messages(messages), system_prompt)
    q_idx, r_idx = templates.query_and_response(conversation)
    if conversation[q_idx]["content"] == "":
        raise UserError(
            "the user message is empty; for the empty-query reference (postfix without any "
            "query information) use empty_query_spans(tokenizer, ...)"
        )
    fields = templates.locate_segments(
        tokenizer,
        conversation,
        q_idx,
        r_idx,
        add_generation_prompt=add_generation_prompt and r_idx is None,
        chat_template=chat_template,
        template_kwargs=template_kwargs,
    )
    return ChatSpans(**fields)


def empty_query_spans(
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str | None = "default",
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> ChatSpans:
    """The spans of the same template with an EMPTY user message.

    The postfix here carries no query information (the paper's base-model postfix
    reference). ``query`` is a zero-length range where the text would go; a token
    straddling that point belongs to the postfix, so no token is lost.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> spans = empty_query_spans(tok)
        >>> len(spans.query), spans.query.start == spans.prefix.stop == spans.postfix.start
        (0, True)
    """
    conversation = templates.with_system_prompt([{"role": "user", "content": ""}], system_prompt)
    fields = templates.locate_segments(
        tokenizer,
        conversation,
        len(conversation) - 1,
        None,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        template_kwargs=template_kwargs,
    )
    return ChatSpans(**fields)


def prefix_only(spans: ChatSpans) -> ChatSpans:
    """The prompt cut after its prefix: the prefix alone, with empty query and postfix.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> spans = chat_spans(tiny_tokenizer(), "Hi")
        >>> cut = prefix_only(spans)
        >>> cut.input_ids == spans.input_ids[: spans.prefix.stop], len(cut.postfix)
        (True, 0)
    """
    p = spans.prefix.stop
    return _template_only(spans.input_ids[:p], p, p)


def with_empty_query(spans: ChatSpans) -> ChatSpans:
    """The prompt's prefix followed by its postfix: its template with the query taken out.

    For templates that render the user's text verbatim this is token for token what
    the template renders for an EMPTY user message (:func:`empty_query_spans`): the
    paper's postfix reference, with no query information. Padding is dropped.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> with_empty_query(chat_spans(tok, "Hi")).input_ids == empty_query_spans(tok).input_ids
        True
    """
    ids = spans.input_ids
    prefix = ids[spans.prefix.start : spans.prefix.stop]
    postfix = ids[spans.postfix.start : spans.postfix.stop]
    return _template_only(prefix + postfix, len(prefix), len(prefix) + len(postfix))


def _template_only(ids: tuple[int, ...], p: int, end: int) -> ChatSpans:
    """Spans of template tokens alone: prefix ``0..p-1``, empty query, postfix ``p..end-1``."""
    return ChatSpans(
        input_ids=ids,
        prefix=range(p),
        query=range(p, p),
        postfix=range(p, end),
        response=None,
        text="",
        query_chars=(0, 0),
    )


@dataclass
class ChatBatch:
    """Padded chat prompts with the segment positions of every row.

    ``spans[i]`` gives row ``i``'s ranges in PADDED coordinates. ``position_ids`` is
    ``cumsum(attention_mask) - 1`` clamped at 0, right wherever the padding sits; pass
    it to the model with the mask. ``prefix_len`` is the shared prefix length when
    ``align == "prefix"`` (the prefix is then at positions ``0 .. prefix_len - 1`` in
    every row), else None.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> batch = batch_spans(tiny_tokenizer(), ["Hi", "Tell me a joke."])
        >>> batch.input_ids.shape == batch.segment_mask("query").shape
        True
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    spans: list[ChatSpans]
    align: str
    prefix_len: int | None = None

    def __len__(self) -> int:
        return len(self.spans)

    def positions(self, segment: str) -> list[list[int]]:
        """The padded positions of ``segment`` in every row."""
        return [list(require_segment(spans, segment)) for spans in self.spans]

    def segment_mask(self, segment: str) -> Bool[Tensor, "batch pos"]:
        """True at the positions of ``segment`` in every row."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for row, span in enumerate(self.positions(segment)):
            mask[row, span] = True
        return mask


def position_ids_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions that count only real tokens (padding anywhere in a row is skipped)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def batch_spans(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[templates.Messages | ChatSpans],
    *,
    align: str = "left",
    pad_token_id: int | None = None,
    **chat_spans_kwargs: Any,
) -> ChatBatch:
    """Render (with :func:`chat_spans`) and pad several chats into one batch.

    ``align="left"`` pads on the left. ``align="prefix"`` puts the padding between
    prefix and query, so the prefix sits at the same positions in every row (one prefix
    cache serves all rows); every row must then have identical prefix token ids. The
    pad id is ``pad_token_id``, else the tokenizer's pad token, else its eos token.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> batch = batch_spans(tiny_tokenizer(), ["Hi", "Tell me a joke."], align="prefix")
        >>> batch.attention_mask[0].tolist().index(0) == batch.prefix_len
        True
    """
    if align not in ALIGNS:
        raise ValueError(f"unknown align {align!r}; choose one of {ALIGNS}")
    if isinstance(conversations, str) or len(conversations) == 0:
        raise ValueError("conversations must be a non-empty list (wrap a single chat in a list)")
    rows = render_prompts(tokenizer, conversations, **chat_spans_kwargs)
    if align == "prefix":
        _check_shared_prefix(rows)
    pad = templates.pad_id(tokenizer, pad_token_id)
    width = max(len(row) for row in rows)
    after_prefix = align == "prefix"
    padded = [row.with_padding(width - len(row), pad, after_prefix=after_prefix) for row in rows]
    input_ids = torch.tensor([row.input_ids for row in padded], dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    for i, row in enumerate(padded):
        attention_mask[i, row.padding.start : row.padding.stop] = 0
    return ChatBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        spans=padded,
        align=align,
        prefix_len=len(rows[0].prefix) if align == "prefix" else None,
    )


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[templates.Messages | ChatSpans],
    **chat_spans_kwargs: Any,
) -> list[ChatSpans]:
    """:func:`chat_spans` of every prompt (spans pass through), each checked against the
    context; an :class:`~piggyback_interp.core.errors.InputTooLongError` names the prompt's index.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> tok = tiny_model("llama").tokenizer
        >>> render_prompts(tok, ["Hi", "Tell me a joke. " * 300])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        piggyback_interp.core.errors.InputTooLongError: prompt 1: the chat renders to ... tokens, ...
    """
    limit = templates.context_limit(tokenizer)
    rows = []
    for i, prompt in enumerate(prompts):
        try:
            row = (
                prompt
                if isinstance(prompt, ChatSpans)
                else chat_spans(tokenizer, prompt, **chat_spans_kwargs)
            )
            templates.check_tokens(len(row) - len(row.padding), limit)
        except InputTooLongError as err:
            raise InputTooLongError(f"prompt {i}: {err}") from err
        rows.append(row)
    return rows


def split_long(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[templates.Messages],
    *,
    reserve: int = 0,
    **chat_spans_kwargs: Any,
) -> tuple[list[templates.Messages], list[tuple[int, str]]]:
    """The prompts whose rendering fits the context with ``reserve`` tokens to spare, and
    ``(index, reason)`` for each one that does not (skipping long prompts, when asked).

    ``reserve`` leaves room for generated tokens (``max_new_tokens``). The prompts that fit
    are returned as given, in order.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> tok = tiny_model("llama").tokenizer
        >>> kept, skipped = split_long(tok, ["Hi", "Tell me a joke. " * 300])
        >>> kept, [i for i, _ in skipped]
        (['Hi'], [1])
    """
    limit = templates.context_limit(tokenizer)
    kept, skipped = [], []
    for i, prompt in enumerate(prompts):
        try:
            templates.check_tokens(
                len(chat_spans(tokenizer, prompt, **chat_spans_kwargs)) + reserve, limit
            )
        except InputTooLongError as err:
            skipped.append((i, str(err)))
        else:
            kept.append(prompt)
    return kept, skipped


def _check_shared_prefix(rows: list[ChatSpans]) -> None:
    first = rows[0].input_ids[: rows[0].prefix.stop]
    for i, row in enumerate(rows[1:], start=1):
        prefix = row.input_ids[row.prefix.start : row.prefix.stop]
        if prefix != first:
            pairs = enumerate(zip(prefix, first, strict=False))
            at = next((k for k, (a, b) in pairs if a != b), None)
            lengths = f"in length ({len(prefix)} vs {len(first)} tokens)"
            where = lengths if at is None else f"at token {at}"
            raise ValueError(
                f"align='prefix' needs identical prefix token ids in every row, but row {i}'s "
                f"prefix differs from row 0's {where}; use align='left'"
            )
