"""Supervised-finetuning batches that train on the response tokens only.

A chat example is rendered with :func:`~piggyback_interp.core.spans.chat_spans`; its labels
are ``-100`` everywhere except the assistant's response and the one token after it
(the end-of-turn token, e.g. ``<|im_end|>``, so the model learns to stop). Labels are
aligned with ``input_ids`` (the Hugging Face convention): :func:`sft_loss` shifts them,
so the logits at position ``t`` predict the label at ``t + 1``.

Batches are right-padded, so the prefix sits at ``0 .. P-1`` in every row, and are
shuffled deterministically per ``(seed, epoch)`` without touching any global RNG.

An example longer than the model's context (or than ``max_length``) raises
:class:`~piggyback_interp.core.errors.InputTooLongError` naming it (``file:line`` for a loaded
JSONL); ``encode_dataset(..., skip_long=True)`` skips it instead and says how many.

Example:
    >>> from piggyback_interp.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris"}]
    >>> ex = encode_example(tok, chat)
    >>> tok.decode([t for t in ex.labels if t != -100])
    'Paris<|im_end|>'
    >>> batch = collate([ex, encode_example(tok, chat, system_prompt=None)], pad_token_id=0)
    >>> batch.input_ids.shape[0], batch.prefix_positions[0] == ex.spans.prefix
    (2, True)
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from piggyback_interp.core.data import ChatDataset, ChatDataWarning, ChatExample
from piggyback_interp.core.errors import InputTooLongError, UserError
from piggyback_interp.core.spans import ChatSpans, chat_spans, position_ids_from_mask
from piggyback_interp.core.templates import context_limit

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainExample:
    """One tokenised conversation with response-only labels.

    ``input_ids`` is the whole rendering (prompt, response, end of turn, ...);
    ``labels[t]`` is ``input_ids[t]`` for the response tokens and the first token
    after them, else ``-100``. ``spans`` gives the segment positions (after a
    ``max_length`` truncation its ``input_ids`` are the truncated ones, while
    ``text`` still describes the full rendering); ``truncated`` is how many tokens
    ``max_length`` cut from the end.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> ex = encode_example(tok, [{"role": "user", "content": "Hi"},
        ...                           {"role": "assistant", "content": "Paris"}])
        >>> len(ex) == len(ex.labels) == len(ex.spans)
        True
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    spans: ChatSpans
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


class EncodedDataset(list[TrainExample]):
    """The examples :func:`encode_dataset` encoded (a list), and what it did to long ones.

    ``skipped`` says, for each example skipped by ``skip_long=True``, where it is and how
    long (``"train.jsonl:7: the chat renders to 900 tokens, ..."``); ``truncated``
    counts the examples ``max_length`` cut (only tokens after the labelled ones).
    """

    def __init__(self, examples: Iterable[TrainExample] = (), skipped: Sequence[str] = ()) -> None:
        super().__init__(examples)
        self.skipped = list(skipped)

    @property
    def truncated(self) -> int:
        return sum(1 for e in self if e.truncated)

    def summary(self) -> dict[str, Any]:
        """``{"examples", "skipped", "truncated", "skipped_examples"}`` (the first 20)."""
        return {
            "examples": len(self),
            "skipped": len(self.skipped),
            "truncated": self.truncated,
            "skipped_examples": self.skipped[:20],
        }


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: ChatExample | Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None = "default",
    chat_template: str | None = None,
    max_length: int | None = None,
) -> TrainExample:
    """Render one conversation and label its response (plus the end-of-turn token).

    Args:
        tokenizer: a fast tokenizer with a chat template.
        example: a :class:`~piggyback_interp.core.data.ChatExample` or a list of
            ``{"role", "content"}`` messages; an assistant message must follow the
            last user message (that is the response), and nothing may follow it.
        system_prompt: as in :func:`~piggyback_interp.core.spans.chat_spans`.
        chat_template: a jinja template overriding the tokenizer's.
        max_length: keep at most this many tokens, cutting from the right; raises
            :class:`~piggyback_interp.core.errors.InputTooLongError` if that would cut a
            labelled token (the response or its end-of-turn token). Without it the limit
            is the model's context (the tokenizer's ``model_max_length``, see
            :func:`~piggyback_interp.core.templates.context_limit`), and a longer example raises.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> ex = encode_example(tok, [{"role": "user", "content": "Hi"},
        ...                           {"role": "assistant", "content": "Paris"}])
        >>> [tok.decode([ex.input_ids[t]]) for t, y in enumerate(ex.labels) if y != -100]
        ['Par', 'is', '<|im_end|>']
    """
    messages = _messages(example)
    roles = [m.get("role") for m in messages]
    if "user" in roles:
        q_idx = len(roles) - 1 - roles[::-1].index("user")
        if roles[q_idx + 1 : q_idx + 2] != ["assistant"]:
            raise UserError(
                f"{_where(example)}has no assistant response to train on; add "
                "{'role': 'assistant', 'content': ...} right after the last user message "
                f"(roles: {roles})"
            )
    _check_max_length(tokenizer, max_length)
    try:
        spans = chat_spans(
            tokenizer, messages, system_prompt=system_prompt, chat_template=chat_template
        )
    except InputTooLongError as err:
        source = getattr(example, "source", None)
        raise InputTooLongError(f"{source}: {err}" if source else str(err)) from err
    assert spans.response is not None
    ids = spans.input_ids
    n_tokens = len(ids)
    stop = min(spans.response.stop + 1, n_tokens)  # the response + the end-of-turn token
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise UserError(f"max_length must be a positive int or None, got {max_length!r}")
        if max_length < stop:
            raise InputTooLongError(
                f"{_where(example)}has {len(ids)} tokens and its response (with the end-of-turn "
                f"token) ends at token {stop}; max_length={max_length} would cut into it. "
                f"Raise max_length to at least {stop} or drop this example"
            )
        if len(ids) > max_length:
            ids = ids[:max_length]
            spans = replace(spans, input_ids=ids)
    labels = tuple(
        tok if spans.response.start <= t < stop else IGNORE_INDEX for t, tok in enumerate(ids)
    )
    return TrainExample(ids, labels, spans, n_tokens - len(ids))


def encode_dataset(
    tokenizer: PreTrainedTokenizerBase,
    data: ChatDataset | Iterable[ChatExample | Sequence[Mapping[str, Any]]],
    *,
    system_prompt: str | None = "default",
    max_length: int | None = None,
    skip_long: bool = False,
) -> EncodedDataset:
    """:func:`encode_example` for every conversation; errors name the example's index.

    An example longer than the model's context, or whose response ``max_length`` would
    cut, raises :class:`~piggyback_interp.core.errors.InputTooLongError`; with
    ``skip_long=True`` it is skipped instead, listed in the result's ``skipped``, and a
    :class:`~piggyback_interp.core.data.ChatDataWarning` says how many.

    Example:
        >>> from piggyback_interp.core.data import ChatDataset
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> ds = ChatDataset.from_records([{"messages": [
        ...     {"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]}
        ...     for i in range(3)])
        >>> len(encode_dataset(tiny_tokenizer(), ds))
        3
    """
    _check_max_length(tokenizer, max_length)
    out = EncodedDataset()
    for index, example in enumerate(data):
        try:
            out.append(
                encode_example(
                    tokenizer, example, system_prompt=system_prompt, max_length=max_length
                )
            )
        except InputTooLongError as err:
            if not skip_long:
                raise InputTooLongError(f"example {index}: {err}") from err
            out.skipped.append(f"example {index}: {err}")
        except ValueError as err:
            raise UserError(f"example {index}: {err}") from err
    if out.skipped:
        warnings.warn(
            f"skipped {len(out.skipped)} examples too long for the model (skip_long=True); "
            f"first: {out.skipped[0]}",
            ChatDataWarning,
            stacklevel=2,
        )
    return out


def _check_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> None:
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length must be a positive int or None, got {max_length!r}")
    limit = context_limit(tokenizer)
    if limit is not None and max_length > limit:
        raise UserError(
            f"max_length={max_length} is more than the model's context of {limit} tokens "
            f"(max_position_embeddings); use max_length <= {limit}"
        )


@dataclass
class TrainBatch:
    """Right-padded rows of :class:`TrainExample`; ``labels`` are ``-100`` at padding.

    ``prefix_positions[i]`` is row ``i``'s prefix range (``0 .. P-1``: right padding
    never moves it), ``prefixes[i]`` its prefix token ids, and ``index[i]`` which
    example (an index into the list given to :func:`batches`) the row is.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch pos"]
    prefix_positions: list[range]
    prefixes: list[tuple[int, ...]]
    index: list[int]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(examples: Sequence[TrainExample], *, pad_token_id: int) -> TrainBatch:
    """Right-pad examples into one batch (``index`` is ``0 .. len(examples)-1``).

    ``position_ids`` number the real tokens ``0, 1, 2, ...`` (pads repeat the last
    real position), as :func:`~piggyback_interp.core.spans.batch_spans` does.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> exs = [encode_example(tok, [{"role": "user", "content": q},
        ...                             {"role": "assistant", "content": "A"}]) for q in ("Hi", "Tell me a joke.")]
        >>> b = collate(exs, pad_token_id=tok.pad_token_id)
        >>> b.attention_mask.sum(-1).tolist() == [len(e) for e in exs], b.labels[0, -1].item()
        (True, -100)
    """
    return _collate(examples, list(range(len(examples))), pad_token_id)


def batches(
    examples: Sequence[TrainExample], *, batch_size: int, seed: int, epoch: int, pad_token_id: int
) -> Iterator[TrainBatch]:
    """One epoch of shuffled batches; the last, smaller batch is kept.

    The order is ``random.Random(f"{seed}:{epoch}").shuffle`` of the indices: the same
    for the same ``(seed, epoch)``, different across epochs, and no global RNG is used.

    Example:
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> exs = encode_dataset(tok, [[{"role": "user", "content": f"Q{i}"},
        ...                             {"role": "assistant", "content": "A"}] for i in range(5)])
        >>> [b.index for b in batches(exs, batch_size=2, seed=0, epoch=0, pad_token_id=0)]
        [[2, 3], [1, 0], [4]]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(examples) == 0:
        raise ValueError("no examples to batch; encode some with encode_dataset(...) first")
    order = list(range(len(examples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return (
        _collate([examples[i] for i in chunk], chunk, pad_token_id)
        for chunk in (order[s : s + batch_size] for s in range(0, len(order), batch_size))
    )


def labelled(
    labels: Int[Tensor, "batch pos"],
) -> tuple[tuple[Tensor, Tensor], Int[Tensor, " n"]]:
    """The ``(rows, positions)`` whose logits predict a labelled token (``t`` with
    ``labels[row, t + 1] != -100``), row by row, and the ``n`` tokens they predict.

    Example:
        >>> import torch
        >>> (rows, pos), targets = labelled(torch.tensor([[-100, 5, 6], [-100, -100, 7]]))
        >>> rows.tolist(), pos.tolist(), targets.tolist()
        ([0, 0, 1], [0, 1, 1], [5, 6, 7])
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, positions = keep.nonzero(as_tuple=True)
    return (rows, positions), labels[:, 1:][keep]


def response_loss(
    logits: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy, in float32, of the logits at the labelled positions
    (:func:`labelled`) against the tokens they predict."""
    if not targets.numel():
        raise ValueError("no labelled tokens after position 0; nothing to train on")
    return F.cross_entropy(logits.float(), targets)


def sft_loss(
    logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the labelled tokens, in float32.

    The logits at position ``t`` predict ``labels[:, t + 1]``; ``-100`` is ignored.
    Equals a Hugging Face causal LM's ``loss`` for the same ``labels``.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 5)
        >>> round(sft_loss(logits, torch.tensor([[-100, 2, 4]])).item(), 4)  # log(5)
        1.6094
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in batch/pos"
        )
    (rows, positions), targets = labelled(labels)
    return response_loss(logits[rows, positions], targets)


# --- helpers --------------------------------------------------------------------------


def _messages(example: object) -> list[dict[str, Any]]:
    if isinstance(example, ChatExample):
        return [dict(m) for m in example.messages]
    if isinstance(example, (str, Mapping)) or not isinstance(example, Sequence):
        raise TypeError(
            "expected a ChatExample or a list of {'role', 'content'} messages, got "
            f"{type(example).__name__}"
        )
    if not all(isinstance(m, Mapping) for m in example):
        raise TypeError("every message must be a {'role', 'content'} mapping")
    return [dict(m) for m in example]


def _where(example: object) -> str:
    source = getattr(example, "source", None)
    return f"{source}: this conversation " if source else "this conversation "


def _collate(examples: Sequence[TrainExample], index: list[int], pad_token_id: int) -> TrainBatch:
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    prefix_positions = [e.spans.prefix for e in examples]
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        labels=labels,
        prefix_positions=prefix_positions,
        prefixes=[
            e.input_ids[p.start : p.stop] for e, p in zip(examples, prefix_positions, strict=True)
        ],
        index=list(index),
    )
